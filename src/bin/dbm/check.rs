//! `dbm check`: refcounts, bitmap directory and tables through [`Image::check`], with
//! `qemu-img check`'s exit codes: 0 clean, 2 corruptions, 3 leaks only, 1 when some
//! refcounts could not be read (QEMU's "internal errors", `check-errors`: a refcount table
//! entry whose offset is not cluster-aligned) as for every other error. An image whose
//! header cannot be read exits 1; one QEMU refuses to open for its bitmaps extension's own
//! fields exits 2, the problem the first finding.
//!
//! As `qemu-img check`: the findings go to stderr, the summary to stdout, ending with
//! `Image end offset: N`. The JSON form is one object with sorted keys: QEMU's
//! `check-errors`, `filename`, `format` (`"qcow2"`), `image-end-offset`, `total-clusters`
//! (the virtual disk's clusters, as QEMU counts them), and ours: `corruptions`,
//! `exit-code`, `file-clusters`, `leaks`, `messages` (QEMU's wording, at most 1000).
//!
//! [`Image::check`]: dirty_bitmap::Image::check

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use dirty_bitmap::storage::{FileStorage, OpenMode};
use dirty_bitmap::store::repair::{repair, Repair, RepairReport};
use dirty_bitmap::{CheckReport, Corruption, Image};
use serde_json::{json, Value};

use crate::open::{at, image_untrusting_bitmaps};
use crate::out::{emit, emit_done};
use crate::CmdResult;

/// Options of `dbm check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The qcow2 image (opened read-only; writable with `-r`).
    pub image: PathBuf,
    /// Print one JSON object instead of text (`--output json`).
    #[arg(long)]
    pub json: bool,
    /// `human` (the default) or `json`, as `qemu-img check --output`.
    #[arg(long, value_parser = ["human", "json"])]
    pub output: Option<String>,
    /// The image format: only `qcow2` (accepted for `qemu-img check -f qcow2`).
    #[arg(short = 'f', long = "format", value_parser = ["qcow2"])]
    pub format: Option<String>,
    /// Print nothing (but "Check failed" when some refcounts could not be read, as
    /// `qemu-img check -q`); the exit status says it all.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Open with QEMU's force-share locking, as `qemu-img -U`: works beside a running QEMU
    /// writer, but reads an image that may be changing (bitmaps QEMU holds show in use).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Repair, as `qemu-img check -r`: `leaks` frees leaked clusters no bitmap entry may
    /// own (down to refcount 2 where a guest table names one without the COPIED flag,
    /// which this tool never sets); `all` also removes the bitmaps QEMU refuses (or the
    /// whole bitmaps extension when the directory cannot be read) and frees what only they
    /// referenced. Guest data is not touched; after a removal every kept consistent bitmap
    /// is made all dirty (a removed one may have held writes it lacks: the next backup
    /// from it is a full one). Opens the image writable.
    #[arg(short = 'r', long = "repair", value_name = "leaks|all", value_parser = ["leaks", "all"], conflicts_with = "force_share")]
    pub repair: Option<String>,
}

/// The findings, one per line, as `qemu-img check` prints them on stderr.
pub fn findings(r: &CheckReport) -> String {
    let mut s = String::new();
    for m in &r.messages {
        let _ = writeln!(s, "{m}");
    }
    s
}

/// The summary, as `qemu-img check` prints it on stdout; `virtual_clusters` is the
/// virtual disk's size in clusters.
pub fn text(r: &CheckReport, virtual_clusters: u64) -> String {
    let mut s = String::new();
    if r.is_clean() {
        s.push_str("No errors were found on the image.\n");
    }
    if r.corruptions > 0 {
        let _ = writeln!(
            s,
            "\n{} errors were found on the image.\nData may be corrupted, or further writes to \
             the image may corrupt it.",
            r.corruptions
        );
    }
    if r.leaks > 0 {
        let _ = writeln!(
            s,
            "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but \
             no harm to data.",
            r.leaks
        );
    }
    if r.check_errors > 0 {
        let _ = writeln!(
            s,
            "\n{} internal errors have occurred during the check.",
            r.check_errors
        );
    }
    let f = r.frag;
    if virtual_clusters != 0 && f.allocated != 0 {
        let pct = |n: u64, of: u64| n as f64 * 100.0 / of as f64;
        let _ = writeln!(
            s,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            f.allocated,
            virtual_clusters,
            pct(f.allocated, virtual_clusters),
            pct(f.fragmented, f.allocated),
            pct(f.compressed, f.allocated),
        );
    }
    let _ = writeln!(s, "Image end offset: {}", r.image_end_offset);
    s
}

/// What a repair did, one line per action.
pub fn repaired_text(r: &RepairReport) -> String {
    let mut s = String::new();
    if r.refcounts_raised > 0 {
        let _ = writeln!(
            s,
            "Repaired {} clusters a kept bitmap or the directory owns at refcount 0",
            r.refcounts_raised
        );
    }
    if let Some(why) = &r.extension_dropped {
        let _ = writeln!(
            s,
            "Removed the bitmaps extension: the bitmap directory cannot be read ({why})"
        );
    }
    for (name, why) in &r.removed {
        let _ = writeln!(s, "Removed bitmap {name}: {why}");
    }
    for name in &r.made_all_dirty {
        let _ = writeln!(
            s,
            "Made bitmap {name} all dirty: a removed bitmap may have held writes it lacks"
        );
    }
    if r.leaks_freed > 0 {
        let _ = writeln!(s, "Repaired {} leaked clusters", r.leaks_freed);
    }
    if r.leaks_kept > 0 {
        let _ = writeln!(
            s,
            "Kept {} leaked clusters a bitmap entry may own (remove the broken bitmaps with -r all)",
            r.leaks_kept
        );
    }
    if r.leaks_uncopied > 0 {
        let _ = writeln!(
            s,
            "Kept {} leaked clusters at refcount 2: the guest tables name each without the \
             COPIED flag, which refcount 1 needs (qemu-img check -r leaks sets the flags; \
             dbm writes no guest metadata)",
            r.leaks_uncopied
        );
    }
    if s.is_empty() {
        s.push_str("Nothing to repair\n");
    }
    s
}

/// The JSON form (see the module docs); `virtual_clusters` is the virtual disk's size in
/// clusters, rounded up (QEMU's `total-clusters`).
pub fn json(filename: &str, r: &CheckReport, virtual_clusters: u64) -> Value {
    let mut v = json!({
        "filename": filename,
        "format": "qcow2",
        "check-errors": r.check_errors,
        "image-end-offset": r.image_end_offset,
        "total-clusters": virtual_clusters,
        "corruptions": r.corruptions,
        "leaks": r.leaks,
        "file-clusters": r.total_clusters,
        "messages": r.messages,
        "exit-code": r.exit_code(),
    });
    // As QEMU: present when not zero.
    for (k, n) in [
        ("allocated-clusters", r.frag.allocated),
        ("fragmented-clusters", r.frag.fragmented),
        ("compressed-clusters", r.frag.compressed),
    ] {
        if n != 0 {
            v[k] = json!(n);
        }
    }
    v
}

/// Counts a problem of the bitmaps extension's own fields as a corruption, first among
/// the findings: QEMU refuses to open such an image at all ("found bitmaps extension with
/// zero bitmaps", "Reserved field is not zero", ...), which [`Image::check`] cannot see,
/// as it judges the image with the extension untrusted.
///
/// [`Image::check`]: dirty_bitmap::Image::check
pub fn count_extension_problem(r: &mut CheckReport, problem: Option<&Corruption>) {
    if let Some(c) = problem {
        r.corrupt_first(format!(
            "ERROR {c} (QEMU refuses to open the image; `dbm check -r all` removes the \
             extension)"
        ));
    }
}

/// Runs `dbm check`.
pub fn run(args: &CheckArgs) -> CmdResult {
    // Whether a repair wrote anything: only then is a lost report a committed change's.
    let mut wrote = false;
    let (img, problem) = match &args.repair {
        None => image_untrusting_bitmaps(&args.image, args.force_share)?,
        Some(what) => {
            let what = if what == "all" {
                Repair::All
            } else {
                Repair::Leaks
            };
            let storage = FileStorage::open(&args.image, OpenMode::ReadWrite)
                .map_err(|e| at(&args.image, e))?;
            let (img, done) = match repair(storage, what) {
                Ok(r) => r,
                // Committed, then a later step failed: what was committed is still told.
                Err(dirty_bitmap::Error::RepairedThenFailed { committed, error }) => {
                    if !args.quiet {
                        let c = *committed;
                        crate::out::to_stderr(&repaired_text(&RepairReport {
                            removed: c.removed,
                            extension_dropped: c.extension_dropped,
                            made_all_dirty: c.made_all_dirty,
                            refcounts_raised: c.refcounts_raised,
                            ..RepairReport::default()
                        }));
                    }
                    let e = format!("the repair was committed, then failed: {error}");
                    return Err(at(&args.image, e).into());
                }
                Err(e) => return Err(at(&args.image, e).into()),
            };
            // What was done goes to stderr, as qemu-img's findings do; the check of the
            // repaired image follows.
            if !args.quiet {
                crate::out::to_stderr(&repaired_text(&done));
            }
            wrote = !done.removed.is_empty()
                || done.extension_dropped.is_some()
                || done.leaks_freed > 0
                || done.refcounts_raised > 0
                || !done.made_all_dirty.is_empty();
            // The verdict is the file's, as QEMU would open it now: the image the repair
            // hands back holds the header it read, with a refused extension untrusted in
            // memory (and `-r leaks` leaves that extension on disk). The storage, and its
            // writer locks, carry over, so nothing else changes the file in between.
            Image::open_untrusting_bitmaps(img.into_storage(), OpenMode::ReadOnly)
                .map_err(|e| at(&args.image, e))?
        }
    };
    let h = img.header();
    // QEMU's count: the disk in whole 512-byte sectors.
    let virtual_clusters = h.disk_length().div_ceil(h.cluster_size());
    let mut report = img.check().map_err(|e| at(&args.image, e))?;
    count_extension_problem(&mut report, problem.as_ref());
    let json_out = args.json || args.output.as_deref() == Some("json");
    if !args.quiet {
        // As qemu-img: the findings on stderr in both forms.
        crate::out::to_stderr(&findings(&report));
        let out = if json_out {
            let v = json(&args.image.display().to_string(), &report, virtual_clusters);
            format!("{}\n", serde_json::to_string_pretty(&v)?)
        } else {
            text(&report, virtual_clusters)
        };
        // After a repair that wrote, the exit status is the repaired file's verdict,
        // printed or not.
        if wrote {
            emit_done(&out);
        } else {
            emit(&out)?;
        }
    }
    if report.check_errors > 0 {
        // As qemu-img, whatever `-q` says.
        crate::out::to_stderr("dbm: Check failed\n");
    }
    Ok(ExitCode::from(
        u8::try_from(report.exit_code()).unwrap_or(1),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts() {
        let mut r = CheckReport {
            total_clusters: 5,
            ..CheckReport::default()
        };
        assert!(text(&r, 16).starts_with("No errors were found on the image."));
        r.leaks = 1;
        r.messages
            .push("Leaked cluster 4 refcount=1 reference=0".into());
        assert!(text(&r, 16).contains("1 leaked clusters were found"));
        assert!(!text(&r, 16).contains("Leaked cluster 4"));
        assert_eq!(findings(&r), "Leaked cluster 4 refcount=1 reference=0\n");
        assert_eq!(json("i", &r, 16)["exit-code"], 3);
        assert_eq!(json("i", &r, 16)["total-clusters"], 16);
        assert_eq!(json("i", &r, 16)["file-clusters"], 5);
        r.corruptions = 2;
        assert!(text(&r, 16).contains("2 errors were found"));
        assert_eq!(json("i", &r, 16)["exit-code"], 2);
    }
}
