//! `dbm info`: an image's geometry and its bitmaps, as text or JSON.
//!
//! The JSON form (documented in `docs/CLI.md`) is one object with keys in sorted order:
//!
//! ```json
//! {
//!   "backing-file": null,
//!   "bitmaps": [
//!     { "dirty-bytes": 4096, "enabled": true, "flags": ["auto"], "granularity": 65536,
//!       "in-use": false, "name": "b0",
//!       "reason": "consistent: every acknowledged write is covered (durable mode)",
//!       "state": "consistent" }
//!   ],
//!   "cluster-size": 65536, "disk-length": 1073741824, "file-length": 262144,
//!   "filename": "disk.qcow2", "format": "qcow2", "mode": "durable", "mode-flags": 1,
//!   "refcount-bits": 16, "version": 3, "virtual-size": 1073741824
//! }
//! ```
//!
//! `dirty-bytes` is `null` for an inconsistent bitmap: its bits cannot be trusted, so every
//! granule must be treated as dirty. `mode` is what the image's mode extension records
//! (`durable`, `deferred` when there is none or its flags word is 0, `unknown`;
//! [`StoreMode`]), `mode-flags` its flags word when durable or unknown (`null` when
//! deferred or malformed), and each bitmap's `reason` says why its
//! state is what it is, given the mode.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use dirty_bitmap::format::directory::{FLAG_AUTO, FLAG_IN_USE};
use dirty_bitmap::format::header::{
    AUTOCLEAR_DATA_FILE_RAW, COMPAT_LAZY_REFCOUNTS, COMPRESSION_ZSTD, INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY, INCOMPAT_EXTL2,
};
use dirty_bitmap::format::BitmapName;
use dirty_bitmap::storage::{FileStorage, Storage};
use dirty_bitmap::store::triage::triage_bitmaps;
use dirty_bitmap::{BitmapState, BitmapStore, Image, StoreMode};
use serde_json::{json, Value};

use crate::open::{at, image_untrusting_bitmaps, reader};
use crate::out::emit;
use crate::CmdResult;

/// Options of `dbm info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// The qcow2 image.
    pub image: PathBuf,
    /// Print one JSON object (see docs/CLI.md) instead of text (`--output json`).
    #[arg(long)]
    pub json: bool,
    /// `human` (the default) or `json`, as `qemu-img info --output`.
    #[arg(long, value_parser = ["human", "json"])]
    pub output: Option<String>,
    /// The image format: only `qcow2` (accepted for `qemu-img info -f qcow2`).
    #[arg(short = 'f', long = "format", value_parser = ["qcow2"])]
    pub format: Option<String>,
    /// Open with QEMU's force-share locking, as `qemu-img -U`: works beside a running QEMU
    /// writer, but reads an image that may be changing (bitmaps QEMU holds show in use).
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

/// What `dbm info` reports about an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The path as given.
    pub filename: String,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// The virtual size as QEMU reports it: the header's, rounded down to 512.
    pub virtual_size: u64,
    /// The length bitmaps cover: the same.
    pub disk_length: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u64,
    /// The image file's length in bytes.
    pub file_length: u64,
    /// The backing file name, if any (lossy UTF-8).
    pub backing_file: Option<String>,
    /// How the image says its bitmaps are kept.
    pub mode: StoreMode,
    /// Every bitmap, in directory order.
    pub bitmaps: Vec<BitmapReport>,
    /// Why the bitmap directory cannot be read as a whole, if it cannot (then `bitmaps`
    /// lists the entries read before the problem).
    pub directory_problem: Option<String>,
    /// The keys `qemu-img info --output=json` prints, with its meaning (`qemu_keys`).
    pub qemu: serde_json::Map<String, Value>,
}

/// What `qemu-img info --output=json` prints about the image (all but `children`), from
/// its cluster 0 and the bitmaps listed: `actual-size` (the file's allocated bytes),
/// `dirty-flag`, `backing-filename` (with `full-backing-filename` and
/// `backing-filename-format`) and `format-specific` (`compat`, `compression-type`,
/// `lazy-refcounts`, `refcount-bits`, `data-file`, `data-file-raw`, `corrupt`,
/// `extended-l2` and the bitmaps' `name`, `granularity` and `flags`). `filename`,
/// `format`, `virtual-size` and `cluster-size` are the keys `dbm info` already has.
pub fn qemu_keys(
    filename: &str,
    image: &Image<FileStorage>,
    bitmaps: &[BitmapReport],
) -> serde_json::Map<String, Value> {
    use std::os::unix::fs::MetadataExt;
    let area = image.area();
    let h = &area.header;
    let v3 = h.version >= 3;
    let mut data = serde_json::Map::new();
    data.insert("compat".into(), json!(if v3 { "1.1" } else { "0.10" }));
    data.insert(
        "compression-type".into(),
        json!(if h.compression_type == COMPRESSION_ZSTD {
            "zstd"
        } else {
            "zlib"
        }),
    );
    if v3 {
        data.insert(
            "lazy-refcounts".into(),
            json!(h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0),
        );
    }
    if !bitmaps.is_empty() {
        let list: Vec<Value> = bitmaps
            .iter()
            .map(|b| json!({"flags": b.flags(), "name": b.qemu_name, "granularity": b.granularity}))
            .collect();
        data.insert("bitmaps".into(), Value::Array(list));
    }
    data.insert(
        "refcount-bits".into(),
        json!(1u64 << h.refcount_order.min(6)),
    );
    if let Some(df) = area.data_file_name() {
        // As `qcow2_get_specific_info`: the name (up to its first NUL) whenever the extension holds one,
        // data-file-raw only when the image has a data file (the incompatible bit).
        data.insert("data-file".into(), json!(String::from_utf8_lossy(df)));
        if h.has_data_file() {
            data.insert(
                "data-file-raw".into(),
                json!(h.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0),
            );
        }
    }
    if v3 {
        data.insert(
            "corrupt".into(),
            json!(h.incompatible_features & INCOMPAT_CORRUPT != 0),
        );
        data.insert(
            "extended-l2".into(),
            json!(h.incompatible_features & INCOMPAT_EXTL2 != 0),
        );
    }
    let mut out = serde_json::Map::new();
    // The open file's own path, not `filename` (a lossy rendering of a path that need not
    // be UTF-8).
    let actual = std::fs::metadata(image.storage().path())
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    out.insert("actual-size".into(), json!(actual));
    out.insert(
        "dirty-flag".into(),
        json!(h.incompatible_features & INCOMPAT_DIRTY != 0),
    );
    out.insert(
        "format-specific".into(),
        json!({"type": "qcow2", "data": Value::Object(data)}),
    );
    if let Some(b) = &area.backing_file {
        let name = String::from_utf8_lossy(b).into_owned();
        // QEMU's `bdrv_make_absolute_filename`: an empty, absolute or protocol name
        // (`nbd:...`, `file:...`: a `:` before any `/`, `path_has_protocol`) as it is,
        // else relative to the image's directory.
        let has_protocol = name
            .find([':', '/'])
            .is_some_and(|i| name[i..].starts_with(':'));
        let full = match filename.rfind('/') {
            Some(i) if !(name.is_empty() || name.starts_with('/') || has_protocol) => {
                format!("{}{name}", &filename[..=i])
            }
            _ => name.clone(),
        };
        out.insert("backing-filename".into(), json!(name));
        out.insert("full-backing-filename".into(), json!(full));
        if let Some(f) = &area.backing_format {
            out.insert(
                "backing-filename-format".into(),
                json!(String::from_utf8_lossy(f)),
            );
        }
    }
    out
}

/// One bitmap in [`ImageInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapReport {
    /// Its name, escaped as [`BitmapName`]'s `Display` writes it (`\xNN`, `\\`), the form
    /// every command takes back.
    pub name: String,
    /// Its name as `qemu-img info` prints it: the bytes up to the first NUL, invalid UTF-8
    /// replaced by U+FFFD, nothing escaped.
    pub qemu_name: String,
    /// Disk bytes per bit.
    pub granularity: u64,
    /// The `auto` flag (QEMU's enabled).
    pub enabled: bool,
    /// The `in_use` flag on disk.
    pub in_use: bool,
    /// Whether its data can be trusted.
    pub consistent: bool,
    /// Dirty bytes; `None` when inconsistent (treat as all dirty).
    pub dirty_bytes: Option<u64>,
    /// Why it can be trusted or not ([`reason`], or why it is broken).
    pub reason: String,
    /// QEMU refuses it (a directory entry or table it cannot load).
    pub broken: bool,
}

/// Why a bitmap with these flags can be trusted or not, in an image whose mode extension
/// says `mode`. `in_use` decides first: a bitmap in use is inconsistent whatever the mode
/// (a deferred writer holds it or crashed; QEMU sets it too, and keeps our extension).
/// A bitmap that is not in use is consistent, and the mode says what that covers.
pub fn reason(mode: StoreMode, consistent: bool, in_use: bool) -> &'static str {
    match (consistent, in_use, mode) {
        (false, true, _) => {
            "inconsistent: in use by a writer, or its writer stopped without saving it \
             (treat as all dirty)"
        }
        (false, false, _) => {
            "inconsistent: a program without bitmap support modified the image (treat as \
             all dirty)"
        }
        (true, _, StoreMode::Durable) => {
            "consistent: every acknowledged write is covered (durable mode)"
        }
        (true, _, StoreMode::Deferred) => "consistent: saved cleanly; no writer holds it",
        (true, _, _) => "consistent: not in use, but the mode is unknown, so what it covers is too",
    }
}

impl BitmapReport {
    /// The flags as `qemu-img info` names them, in its order.
    pub fn flags(&self) -> Vec<&'static str> {
        let mut f = Vec::new();
        if self.in_use {
            f.push("in-use");
        }
        if self.enabled {
            f.push("auto");
        }
        f
    }
}

/// Reads everything [`ImageInfo`] holds from an open store.
pub fn gather(
    filename: String,
    store: &BitmapStore<FileStorage>,
) -> dirty_bitmap::Result<ImageInfo> {
    let image = store.image();
    let mode = store.mode();
    // Every consistent bitmap is built to count its bits: refused as a whole, before
    // anything is read, when that would build more than an activation may hold.
    store.ensure_loadable_in_turn(0)?;
    let mut bitmaps = Vec::new();
    for b in store.list() {
        let consistent = b.state == BitmapState::Consistent;
        let dirty_bytes = if consistent {
            Some(store.load(&b.name)?.dirty_bytes())
        } else {
            None
        };
        bitmaps.push(BitmapReport {
            name: b.name.to_string(),
            qemu_name: String::from_utf8_lossy(b.name.qemu_name()).into_owned(),
            granularity: b.granularity,
            enabled: b.enabled,
            in_use: b.in_use,
            consistent,
            dirty_bytes,
            reason: reason(mode, consistent, b.in_use).to_string(),
            broken: false,
        });
    }
    let qemu = qemu_keys(&filename, image, &bitmaps);
    image_info(filename, image, mode, bitmaps, None, qemu)
}

/// The geometry facts of `image`, with the bitmaps and the rest given.
fn image_info(
    filename: String,
    image: &Image<FileStorage>,
    mode: StoreMode,
    bitmaps: Vec<BitmapReport>,
    directory_problem: Option<String>,
    qemu: serde_json::Map<String, Value>,
) -> dirty_bitmap::Result<ImageInfo> {
    let h = image.header();
    Ok(ImageInfo {
        filename,
        version: h.version,
        // QEMU's value: it keeps the disk in whole 512-byte sectors.
        virtual_size: h.disk_length(),
        disk_length: h.disk_length(),
        cluster_size: h.cluster_size(),
        refcount_bits: 1u64 << h.refcount_order.min(6),
        file_length: image.storage().len()?,
        backing_file: image
            .area()
            .backing_file
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        mode,
        bitmaps,
        directory_problem,
        qemu,
    })
}

/// What `dbm info` says about an image whose bitmaps QEMU refuses: the geometry, and each
/// bitmap whose directory entry could be read, broken or not (`store::triage`). `None` when
/// the bitmaps are not what is wrong.
pub fn gather_broken(
    filename: String,
    image: &Image<FileStorage>,
    extension_problem: Option<dirty_bitmap::Corruption>,
) -> Option<ImageInfo> {
    if let Some(c) = extension_problem {
        let problem = format!("the bitmaps extension itself: {c}");
        let mode = StoreMode::of(image.area());
        return image_info(
            filename,
            image,
            mode,
            Vec::new(),
            Some(problem),
            serde_json::Map::new(),
        )
        .ok();
    }
    let triage = triage_bitmaps(image).ok().flatten()?;
    if triage.is_sound() {
        return None;
    }
    let mode = StoreMode::of(image.area());
    // QEMU refuses the image for any broken bitmap but one whose table reaches past the
    // end of the file, which it reads as zeros (and then says so only if nothing else
    // makes it refuse the image).
    let qemu_refuses = triage
        .bitmaps
        .iter()
        .any(|b| b.broken.is_some() && !b.table_past_end);
    let bitmaps = triage
        .bitmaps
        .iter()
        .map(|b| {
            let raw = &b.entry.raw;
            let reason = match &b.broken {
                Some(why) if b.table_past_end && !qemu_refuses => format!(
                    "broken: {why}; QEMU reads the missing table as zeros, so it may load \
                     the bitmap as clean and a QEMU writer save it so: remove it with `dbm \
                     check -r all` before QEMU opens the image"
                ),
                Some(why) => format!(
                    "broken: {why}; QEMU refuses to open the image until it is removed \
                     (`dbm check -r all`)"
                ),
                None if qemu_refuses => "not loaded: another bitmap of this image is broken, \
                                         so QEMU refuses the image (treat as all dirty)"
                    .to_string(),
                None => "not loaded: another bitmap of this image is broken, and dbm refuses \
                         the image until `dbm check -r all` removes it (treat as all dirty)"
                    .to_string(),
            };
            let name = BitmapName::from(raw.name.as_slice());
            BitmapReport {
                name: name.to_string(),
                qemu_name: String::from_utf8_lossy(name.qemu_name()).into_owned(),
                granularity: 1u64
                    .checked_shl(u32::from(raw.granularity_bits))
                    .unwrap_or(0),
                enabled: raw.flags & FLAG_AUTO != 0,
                in_use: raw.flags & FLAG_IN_USE != 0,
                consistent: false,
                dirty_bytes: None,
                reason,
                broken: b.broken.is_some(),
            }
        })
        .collect();
    image_info(
        filename,
        image,
        mode,
        bitmaps,
        triage.unreadable.clone(),
        serde_json::Map::new(),
    )
    .ok()
}

/// The text form.
pub fn text(info: &ImageInfo) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "image: {}", info.filename);
    let _ = writeln!(s, "format: qcow2 (version {})", info.version);
    let _ = writeln!(s, "virtual size: {} bytes", info.virtual_size);
    let _ = writeln!(s, "cluster size: {}", info.cluster_size);
    let _ = writeln!(s, "refcount bits: {}", info.refcount_bits);
    let _ = writeln!(s, "file length: {}", info.file_length);
    let _ = writeln!(
        s,
        "backing file: {}",
        info.backing_file.as_deref().unwrap_or("(none)")
    );
    // The facts of `qemu-img info`'s JSON the lines above do not give, as `key: value`
    // with its key's dashes as spaces (`format-specific.data` flattened, bitmaps below).
    let line = |s: &mut String, k: &str, v: &Value| {
        let v = match v {
            Value::String(x) => x.clone(),
            other => other.to_string(),
        };
        let _ = writeln!(s, "{}: {v}", k.replace('-', " "));
    };
    for (k, v) in &info.qemu {
        match (k.as_str(), v) {
            ("format-specific", Value::Object(fs)) => {
                if let Some(Value::Object(data)) = fs.get("data") {
                    let shown = ["bitmaps", "refcount-bits"];
                    for (dk, dv) in data.iter().filter(|(dk, _)| !shown.contains(&dk.as_str())) {
                        line(&mut s, dk, dv);
                    }
                }
            }
            ("backing-filename", _) => {}
            _ => line(&mut s, k, v),
        }
    }
    let _ = writeln!(s, "mode: {}", info.mode);
    if let Some(p) = &info.directory_problem {
        let _ = writeln!(
            s,
            "bitmap directory: unreadable ({p}); the bitmaps below are the entries read before it"
        );
    }
    let _ = writeln!(s, "bitmaps: {}", info.bitmaps.len());
    for b in &info.bitmaps {
        s.push_str(&bitmap_text(b));
    }
    s
}

/// One bitmap's block in the text form.
pub fn bitmap_text(b: &BitmapReport) -> String {
    let flags = b.flags();
    let flags = if flags.is_empty() {
        "(none)".to_string()
    } else {
        flags.join(", ")
    };
    let (state, dirty) = match b.dirty_bytes {
        Some(n) if b.consistent => ("consistent", n.to_string()),
        _ if b.broken => ("broken", "unknown (treat as all dirty)".to_string()),
        _ => ("inconsistent", "unknown (treat as all dirty)".to_string()),
    };
    format!(
        "  name: {}\n    granularity: {}\n    enabled: {}\n    flags: {flags}\n    state: {state}\n    reason: {}\n    dirty bytes: {dirty}\n",
        b.name, b.granularity, b.enabled, b.reason
    )
}

/// The JSON form (see the module docs).
pub fn json(info: &ImageInfo) -> Value {
    let bitmaps: Vec<Value> = info.bitmaps.iter().map(bitmap_json).collect();
    let mut v = json!({
        "filename": info.filename,
        "format": "qcow2",
        "version": info.version,
        "virtual-size": info.virtual_size,
        "disk-length": info.disk_length,
        "cluster-size": info.cluster_size,
        "refcount-bits": info.refcount_bits,
        "file-length": info.file_length,
        "backing-file": info.backing_file,
        "mode": info.mode.name(),
        "mode-flags": info.mode.flags(),
        "bitmaps": bitmaps,
        "bitmap-directory-problem": info.directory_problem,
    });
    if let Value::Object(m) = &mut v {
        for (k, x) in &info.qemu {
            m.insert(k.clone(), x.clone());
        }
    }
    v
}

/// One bitmap in the JSON form.
pub fn bitmap_json(b: &BitmapReport) -> Value {
    json!({
        "name": b.name,
        "granularity": b.granularity,
        "flags": b.flags(),
        "enabled": b.enabled,
        "in-use": b.in_use,
        "state": if b.consistent {
            "consistent"
        } else if b.broken {
            "broken"
        } else {
            "inconsistent"
        },
        "reason": b.reason,
        "dirty-bytes": if b.consistent { b.dirty_bytes } else { None },
    })
}

/// Runs `dbm info`.
pub fn run(args: &InfoArgs) -> CmdResult {
    let name = args.image.display().to_string();
    // Bitmaps QEMU refuses: report each one and keep going.
    let broken = |e: String| {
        image_untrusting_bitmaps(&args.image, args.force_share)
            .ok()
            .and_then(|(img, ext)| gather_broken(name.clone(), &img, ext))
            .ok_or(e)
    };
    let info = match reader(&args.image, args.force_share) {
        Ok(st) => match gather(name.clone(), &st) {
            Ok(info) => info,
            // The open reads no table: one QEMU refuses (a reserved bit in an entry, a table
            // past the end of the file) fails only the load of its bitmap, here.
            Err(e @ dirty_bitmap::Error::Corrupt(_)) => broken(at(&args.image, e))?,
            Err(e) => return Err(at(&args.image, e).into()),
        },
        Err(e) => broken(e)?,
    };
    if args.json || args.output.as_deref() == Some("json") {
        emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json(&info))?
        ))?;
    } else {
        emit(&text(&info))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(consistent: bool) -> BitmapReport {
        BitmapReport {
            name: "b".into(),
            qemu_name: "b".into(),
            granularity: 65536,
            enabled: true,
            in_use: !consistent,
            consistent,
            dirty_bytes: consistent.then_some(4096),
            reason: reason(StoreMode::Durable, consistent, !consistent).to_string(),
            broken: false,
        }
    }

    #[test]
    fn inconsistent_dirty_bytes_are_unknown() {
        let b = sample(false);
        assert!(bitmap_text(&b).contains("dirty bytes: unknown (treat as all dirty)"));
        assert!(bitmap_text(&b).contains("state: inconsistent"));
        assert_eq!(bitmap_json(&b)["dirty-bytes"], Value::Null);
        assert_eq!(bitmap_json(&b)["flags"], json!(["in-use", "auto"]));
    }

    #[test]
    fn consistent_json_is_sorted_and_complete() {
        let b = sample(true);
        let s = serde_json::to_string(&bitmap_json(&b)).unwrap();
        assert_eq!(
            s,
            r#"{"dirty-bytes":4096,"enabled":true,"flags":["auto"],"granularity":65536,"in-use":false,"name":"b","reason":"consistent: every acknowledged write is covered (durable mode)","state":"consistent"}"#
        );
    }

    #[test]
    fn in_use_decides_before_the_mode() {
        for mode in [
            StoreMode::Durable,
            StoreMode::Deferred,
            StoreMode::Unknown { flags: 2 },
        ] {
            assert!(reason(mode, false, true).starts_with("inconsistent: in use"));
            assert!(reason(mode, false, false).starts_with("inconsistent: a program"));
            assert!(reason(mode, true, false).starts_with("consistent"));
        }
        assert_eq!(
            reason(StoreMode::Durable, true, false),
            "consistent: every acknowledged write is covered (durable mode)"
        );
        assert_eq!(
            reason(StoreMode::Deferred, true, false),
            "consistent: saved cleanly; no writer holds it"
        );
        assert!(reason(StoreMode::Malformed { len: 3 }, true, false).contains("mode is unknown"));
    }
}
