//! Repairing an image whose bitmaps QEMU refuses (`dbm check -r`), without touching guest
//! data, and without a false clean in any bitmap it keeps.
//!
//! QEMU refuses to open an image with a broken bitmap directory entry or table (the VM does
//! not boot), and its only way out is a full copy (`qemu-img convert
//! --skip-broken-bitmaps`). [`repair`] instead:
//! - with [`Repair::All`]: raises to 1 the refcount of each cluster a kept bitmap or the
//!   directory owns that has refcount 0 (as `qemu-img check -r all` repairs a refcount
//!   below its references), commits a new directory holding only the bitmaps QEMU would
//!   load and this library can keep (or drops the bitmaps extension when the directory
//!   cannot be read as a whole, or shares a cluster with other metadata, whose bytes it
//!   then holds), each kept bitmap that is consistent all dirty, then frees
//!   what only the removed entries referenced;
//! - with [`Repair::Leaks`]: frees leaked clusters, but never one that a broken directory
//!   entry may own (reclaiming a broken bitmap's clusters as leaks would destroy its data
//!   behind its entry), and lowers a cluster the directory or a kept bitmap owns to its
//!   one reference, never below (and never to 1 where a guest table names the cluster
//!   without COPIED: see `fix_leaks`). When the directory cannot be read as a whole (or
//!   shares a cluster with other metadata), any leaked cluster may be a bitmap's, and none
//!   is freed.
//!
//! A bitmap is kept when QEMU would load it and, beyond what QEMU checks, its table lies
//! in the file and decodes and its data clusters lie in the file (also for a bitmap in
//! use, whose table QEMU never reads but `qemu-img check` and every later write's check
//! do), and none of its clusters is shared with other metadata, the directory, an earlier
//! kept bitmap, the table of an earlier entry found broken for its table or data (not one
//! triage refused for its entry alone), or itself. (The last keeps a
//! table many entries name, or a run of overlapping ones, from being read once per entry
//! on a hostile image; it makes the outcome depend on the directory's order: a good table
//! overlapping a broken one is removed when the broken entry comes first, kept when it
//! comes after. Either way no bit is read as clean.) Removing any other leaves no false
//! clean only because the kept bitmaps come out of the same commit all dirty (a table of all-ones entries each, which
//! QEMU loads): a removed bitmap may have held writes a kept one lacks (a later checkpoint
//! removed, the older one kept), and "what changed since" a checkpoint is the union of the
//! bitmaps still in the image (`src/store/checkpoint.rs`), so with the kept bits as they
//! were it would miss them. A kept bitmap in use stays as it is: it already counts as all
//! dirty.
//!
//! Everything is decided before the first write: the walk of every other structure
//! (L1/L2 tables, refcount structures, snapshots, the header) must find no corruption;
//! which bitmaps stay; the refcounts raised (in memory, before anything is allocated, so
//! the allocator never hands out a cluster the repair keeps). A cluster is freed only down
//! to the number of references the metadata that stays holds, so nothing still referenced
//! is ever freed. Crash reasoning: `docs/CRASH-CONSISTENCY.md`, "Repair".

use std::collections::BTreeMap;

use super::triage::triage_bitmaps;
use super::{ceil_clusters, BitmapStore, Slot};
use crate::error::{CheckFindings, Corruption, Error, Result};
use crate::format::directory::MAX_TABLE_SIZE;
use crate::format::table::TABLE_ENTRY_OFFSET_MASK;
use crate::format::{BitmapName, DirEntry, RawDirEntry, TableEntry};
use crate::image::{check_in_file, read_metadata, Image};
use crate::storage::{OpenMode, Storage};

/// Bytes of a broken table read at once by [`lenient_claims`].
const CLAIM_READ_CHUNK: u64 = 1 << 20;

/// What [`repair`] may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Free leaked clusters that nothing may own (`qemu-img check -r leaks`).
    Leaks,
    /// Remove broken bitmaps (or the whole extension when the directory is unreadable),
    /// then free what only they referenced (`qemu-img check -r all`).
    All,
}

/// What [`repair`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// The bitmaps removed, each with why QEMU refused it.
    pub removed: Vec<(BitmapName, String)>,
    /// Why the whole bitmaps extension was dropped, if it was.
    pub extension_dropped: Option<String>,
    /// Clusters whose refcount was lowered to their references.
    pub leaks_freed: u64,
    /// Leaked clusters left alone: a broken directory entry may own them, or the directory
    /// or a kept bitmap owns them at refcount 1 (their one reference, which the walk does
    /// not see while a broken entry keeps the directory from decoding as a whole).
    pub leaks_kept: u64,
    /// Leaked clusters lowered only to refcount 2 (or left there): their one reference is
    /// an entry of the active L1 or L2 tables without the COPIED flag, which `qemu-img
    /// check` calls corrupt at refcount 1. `qemu-img check -r leaks` sets the flag and
    /// frees them; this repair writes no guest metadata.
    pub leaks_uncopied: u64,
    /// Clusters a kept bitmap or the directory owns whose refcount was 0, raised to their
    /// one reference ([`Repair::All`] only).
    pub refcounts_raised: u64,
    /// The kept bitmaps the repair left consistent with every bit set, in the commit that
    /// removed others ([`Repair::All`] only): a removed bitmap may have held writes a kept
    /// one lacks (a later checkpoint's), and "what changed since" a kept one is the union of
    /// the bitmaps still in the image.
    pub made_all_dirty: Vec<BitmapName>,
}

/// Repairs the image in `storage` (opened writable) as `what` says, and returns it with a
/// report. An image with nothing to repair is left unwritten.
///
/// # Errors
/// [`Error::Corrupt`] when the walk of everything but the bitmaps finds corruption (a
/// refcount below its references: `qemu-img check -r all` is the tool for that), the
/// header cannot be read ([`Image::open_untrusting_bitmaps`]), or (with [`Repair::All`]) a
/// cluster a kept bitmap, the directory or a removed entry's table names has refcount 0 and
/// no refcount block covers it ([`Corruption::Refcount`]: the file grew past its refcount
/// blocks; the repair would have to raise that refcount so that the commit cannot allocate
/// the cluster while the old directory still names it); I/O. Each is found before the
/// first write. [`Error::RepairedThenFailed`] when anything fails after the header write
/// that commits a removal (the frees, their flush, the leak repair): it carries the report
/// of what was committed. A failure of that header write itself is returned as it is (it
/// may or may not have landed: check the image again).
pub fn repair<S: Storage>(storage: S, what: Repair) -> Result<(Image<S>, RepairReport)> {
    let (image, ext_problem) = Image::open_untrusting_bitmaps(storage, OpenMode::ReadWrite)?;
    let (base_report, base) = image.references_without_bitmaps()?;
    if base_report.corruptions > 0 {
        // `qemu-img check -r all` repairs the rest, and keeps a broken bitmap (a table past
        // the end of the file becomes one of zeros: clean): say so when any bitmap is
        // broken, or the bitmaps add findings, or that cannot be told.
        let bitmaps_broken = ext_problem.is_some()
            || triage_bitmaps(&image)?.is_some_and(|t| !t.is_sound())
            || image
                .references()
                .map_or(true, |(full, _)| full.corruptions > base_report.corruptions);
        return Err(Corruption::CheckFailed {
            corruptions: base_report.corruptions,
            first: base_report.messages.first().cloned().unwrap_or_default(),
            found: if bitmaps_broken {
                CheckFindings::Both
            } else {
                CheckFindings::Image
            },
        }
        .into());
    }
    let triage = triage_bitmaps(&image)?;
    let cs = image.cluster_size();
    let file_clusters = image.storage().len()?.div_ceil(cs);
    let dir = image
        .area()
        .bitmaps
        .map(|e| (e.directory_offset, e.directory_size));
    // Which entries QEMU would load and own their clusters alone: triage's verdict, then
    // what the entry owns (a table that loads and lies in the file, data clusters in the
    // file, even for an entry in use, whose table QEMU never reads), then overlaps (with
    // other metadata, the directory, an earlier kept bitmap, itself). `claimed` ends as the
    // clusters the directory and the kept entries own: each has exactly one reference in
    // the image the repair leaves, unless a broken entry (see `lenient_claims`) names it.
    let mut keep: Vec<(DirEntry, Vec<u64>)> = Vec::new();
    let mut broken: Vec<(BitmapName, String)> = Vec::new();
    let mut broken_raw: Vec<&RawDirEntry> = Vec::new();
    let mut claimed = ClusterSet::default();
    // The tables of entries found broken here, and why: another entry naming the same
    // table is broken for the same reason, and one naming part of it shares its clusters,
    // without a read (a table many entries name is read once, kept or not).
    let mut rejected = ClusterSet::default();
    let mut verdicts: std::collections::HashMap<(u64, u32, bool), String> = Default::default();
    if let Some((off, size)) = dir {
        claimed.insert(off / cs, (off / cs).saturating_add(ceil_clusters(size, cs)));
    }
    if let Some(t) = &triage {
        for b in &t.bitmaps {
            let name = BitmapName::from(b.entry.raw.name.as_slice());
            let why = match (&b.entry.verdict, &b.broken) {
                (Ok(e), None) => {
                    // The reason names whether the entry is in use: kept per flag.
                    let table = (e.table_offset, e.table_size, e.in_use);
                    let first = e.table_offset / cs;
                    let n = ceil_clusters(u64::from(e.table_size).saturating_mul(8), cs);
                    let overlap = rejected
                        .first_in(first, first.saturating_add(n))
                        .map(|c| c.saturating_mul(cs));
                    let verdict = match (verdicts.get(&table), overlap) {
                        (Some(why), _) => Err(why.clone()),
                        (None, Some(c)) => Err(format!(
                            "its table shares cluster {c:#x} with a broken entry's table"
                        )),
                        (None, None) => kept_or_why(&image, e, file_clusters, &base, &claimed)?,
                    };
                    match verdict {
                        Ok(owned) => {
                            for &c in &owned {
                                claimed.insert(c / cs, c / cs + 1);
                            }
                            keep.push((e.clone(), owned));
                            continue;
                        }
                        Err(why) => {
                            // One run for the whole table (its clusters are contiguous).
                            rejected.insert(first, first.saturating_add(n));
                            verdicts.insert(table, why.clone());
                            why
                        }
                    }
                }
                (Ok(_), Some(why)) => why.clone(),
                (Err(p), _) => p.to_string(),
            };
            broken.push((name, why));
            broken_raw.push(&b.entry.raw);
        }
    }
    // The extension's own fields broken: nothing in it can be trusted, as with a
    // directory that cannot be read (the image opened with the extension untrusted).
    // A directory that shares a cluster with other metadata (a refcount block, an L2
    // table) holds their bytes, whatever its entries decode to: untrusted as a whole, as
    // one that cannot be read. Its clusters are never freed (the commit's walk counts them
    // twice).
    let dir_shared = dir.and_then(|(off, size)| {
        let first = off / cs;
        (first..first.saturating_add(ceil_clusters(size, cs)))
            .find(|&c| base.at(c.saturating_mul(cs)) > 0)
            .map(|c| {
                format!(
                    "the bitmap directory shares cluster {:#x} with other metadata",
                    c.saturating_mul(cs)
                )
            })
    });
    let unreadable = ext_problem
        .map(|c| c.to_string())
        .or_else(|| triage.as_ref().and_then(|t| t.unreadable.clone()))
        .or(dir_shared);
    let mut report = RepairReport::default();
    let mut image = image;
    if what == Repair::All {
        if unreadable.is_some() {
            keep.clear();
        }
        // Before anything is allocated: a cluster the repair keeps (a kept bitmap's, or
        // the old directory's until the commit point) at refcount 0 is what the allocator
        // hands out first, and the new directory would be written over it. Each has one
        // reference, so its refcount goes to 1, as `qemu-img check -r all` repairs a
        // refcount below its references; it reaches the disk with the commit's refcounts,
        // before the header write (or with the leak repair's).
        let dir_clusters = dir.map_or(0..0, |(off, size)| {
            let first = off / cs;
            first
                ..first
                    .saturating_add(ceil_clusters(size, cs))
                    .min(file_clusters)
        });
        let kept = keep
            .iter()
            .flat_map(|(_, owned)| owned.iter().map(|&c| c / cs));
        for c in dir_clusters.chain(kept) {
            let off = c.saturating_mul(cs);
            if image.refcount(off)? == 0 {
                image.raise_refcount(off, 1)?;
                report.refcounts_raised = report.refcounts_raised.saturating_add(1);
            }
        }
        // A removed entry is in force too until the commit point, and QEMU may load it
        // (it checks neither a cluster named twice nor one shared with another bitmap): a
        // crash after the new directory is written over one of its clusters, before the
        // header, would leave it loading the directory's bytes as its bits. Its clusters
        // at refcount 0 are raised for the commit as well; the leak repair after the
        // commit, which no longer sees them referenced, frees them again.
        let mut removed = ClusterSet::default();
        lenient_claims(&image, &broken_raw, &mut removed)?;
        for (&start, &end) in &removed.runs {
            for c in start..end.min(file_clusters) {
                let off = c.saturating_mul(cs);
                if image.refcount(off)? == 0 {
                    image.raise_refcount(off, 1)?;
                }
            }
        }
    }
    if what == Repair::All && (unreadable.is_some() || !broken.is_empty()) {
        report.extension_dropped = unreadable;
        report.removed = broken;
        // From the commit point on, the removal stands whatever fails after it: the error
        // then carries the report of what was committed.
        let after_commit = |report: RepairReport, error| Error::RepairedThenFailed {
            committed: Box::new(crate::error::RepairCommitted {
                removed: report.removed,
                extension_dropped: report.extension_dropped,
                made_all_dirty: report.made_all_dirty,
                refcounts_raised: report.refcounts_raised,
            }),
            error: Box::new(error),
        };
        let (repaired, made_all_dirty) = match rewrite_directory(image, keep, dir, base) {
            Ok(r) => r,
            Err(RewriteFailed {
                error,
                committed: Some(made_all_dirty),
            }) => {
                report.made_all_dirty = made_all_dirty;
                return Err(after_commit(report, error));
            }
            Err(RewriteFailed { error, .. }) => return Err(error),
        };
        image = repaired;
        report.made_all_dirty = made_all_dirty;
        // The new directory decodes whole, so the walk counts every reference exactly;
        // the old directory is no longer kept.
        let committed = report.clone();
        return fix_leaks(image, &Protect::Nothing, &ClusterSet::default(), report)
            .map_err(|e| after_commit(committed, e));
    }
    // Leaks only (or nothing broken): protect what a broken entry may own, or everything
    // when the directory cannot be read.
    let protect = if unreadable.is_some() {
        Protect::Everything
    } else {
        let mut p = ClusterSet::default();
        lenient_claims(&image, &broken_raw, &mut p)?;
        Protect::These(p)
    };
    fix_leaks(image, &protect, &claimed, report)
}

/// The clusters `e` (an entry triage finds loadable) owns, when the repair may keep it:
/// [`owned_clusters`], none of them referenced by other metadata (`base`), already
/// `claimed` (the directory, an earlier kept bitmap) or named twice by `e` itself, so that
/// each has exactly one reference. Otherwise why it is broken.
///
/// The table's own clusters are looked at first: an entry naming a table already kept (or
/// other metadata) is broken without reading the table again, so many entries naming one
/// table cost one read of it.
fn kept_or_why<S: Storage>(
    image: &Image<S>,
    e: &DirEntry,
    file_clusters: u64,
    base: &crate::image::check::References,
    claimed: &ClusterSet,
) -> Result<std::result::Result<Vec<u64>, String>> {
    let cs = image.cluster_size();
    let taken = |c: u64| base.at(c) > 0 || claimed.contains(c / cs);
    let mut shared = table_clusters(e, cs).find(|&c| taken(c));
    let mut owned = Vec::new();
    if shared.is_none() {
        owned = match owned_clusters(image, e, file_clusters)? {
            Ok(o) => o,
            Err(why) => return Ok(Err(why)),
        };
        shared = owned.iter().copied().find(|&c| taken(c));
    }
    if let Some(c) = shared {
        return Ok(Err(format!(
            "its table or data shares cluster {c:#x} with other metadata"
        )));
    }
    let mut sorted = owned.clone();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Ok(Err(format!(
            "its table or data names cluster {:#x} twice",
            w[0]
        )));
    }
    Ok(Ok(owned))
}

/// A set of clusters (indexes), kept as disjoint runs `start -> end` (end exclusive), so a
/// claim of a long run costs one entry, not one per cluster.
#[derive(Debug, Default)]
struct ClusterSet {
    runs: BTreeMap<u64, u64>,
}

impl ClusterSet {
    /// Adds the clusters `[start, end)`, merging the runs it touches.
    fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        if let Some((&s, &e)) = self.runs.range(..=start).next_back() {
            if e >= end {
                return;
            }
            if e >= start {
                start = s;
            }
        }
        while let Some((&s, &e)) = self.runs.range(start..=end).next() {
            self.runs.remove(&s);
            end = end.max(e);
        }
        self.runs.insert(start, end);
    }

    fn contains(&self, c: u64) -> bool {
        self.runs
            .range(..=c)
            .next_back()
            .is_some_and(|(_, &e)| c < e)
    }

    /// The first cluster of `[start, end)` in the set, in two lookups however long the
    /// range.
    fn first_in(&self, start: u64, end: u64) -> Option<u64> {
        if self.contains(start) {
            return Some(start);
        }
        self.runs.range(start..end).next().map(|(&s, _)| s)
    }
}

/// The byte offsets of the clusters of `e`'s table.
fn table_clusters(e: &DirEntry, cs: u64) -> impl Iterator<Item = u64> {
    let len = u64::from(e.table_size).saturating_mul(8);
    let first = e.table_offset;
    (0..ceil_clusters(len, cs)).map(move |k| first.saturating_add(k.saturating_mul(cs)))
}

/// The clusters a loadable entry owns (its table's and its data clusters'), or why the
/// repair cannot keep it: its table lies past the end of the file or does not decode, or
/// a data cluster lies past the end (`file_clusters` clusters: the walk's measure). Each
/// also holds for an entry in use, whose table QEMU never reads: `qemu-img check` and the
/// preflight of every later write count such a table as corrupt, and QEMU reads zeros for
/// a data cluster past the end (a bitmap that is not in use would lose its bits to them,
/// and the allocator, to which such clusters are free, would write over it). Removing
/// such a bitmap is no false clean: the removal's commit leaves every kept bitmap all
/// dirty ([`rewrite_directory`]).
///
/// # Errors
/// I/O.
fn owned_clusters<S: Storage>(
    image: &Image<S>,
    e: &DirEntry,
    file_clusters: u64,
) -> Result<std::result::Result<Vec<u64>, String>> {
    let cs = image.cluster_size();
    let len = u64::from(e.table_size).saturating_mul(8);
    let in_use = if e.in_use { "in use, and " } else { "" };
    let bytes = match read_metadata(image.storage(), "bitmap table", e.table_offset, len) {
        Ok(b) => b,
        Err(Error::Corrupt(c)) => return Ok(Err(format!("{in_use}{c}"))),
        Err(err) => return Err(err),
    };
    let table = match crate::format::decode_table(&bytes, e.table_size, image.header().cluster_bits)
    {
        Ok(t) => t,
        Err(c) => return Ok(Err(format!("{in_use}its table cannot be loaded: {c}"))),
    };
    let mut out: Vec<u64> = table_clusters(e, cs).collect();
    for t in table {
        if let TableEntry::Data(off) = t {
            if off / cs >= file_clusters {
                return Ok(Err(format!(
                    "{in_use}its data cluster {off:#x} lies past the end of the file"
                )));
            }
            out.push(off);
        }
    }
    Ok(Ok(out))
}

/// Every cluster of the file the `broken` entries may own, read leniently: each table as
/// far as it lies in the file, each table entry's offset bits taken as they are.
///
/// Bounded by the file, whatever the entries say: no table QEMU writes has more than
/// [`MAX_TABLE_SIZE`] entries (`BME_MAX_TABLE_SIZE`), so no bitmap owns a cluster named
/// past that entry of its table or lying past it, and a larger `table_size` is read only
/// that far; the tables' byte ranges are clipped to the file and merged, so a byte shared
/// by many entries' tables is read once (a word names the same cluster in every table
/// that holds it: all tables start on a cluster, so their words line up); the reads go in
/// chunks of [`CLAIM_READ_CHUNK`]; and only clusters inside the file are recorded (a
/// cluster past it cannot be leaked), as runs.
///
/// # Errors
/// I/O: the repair stops rather than free a cluster a table it could not read may name.
fn lenient_claims<S: Storage>(
    image: &Image<S>,
    broken: &[&RawDirEntry],
    set: &mut ClusterSet,
) -> Result<()> {
    let cs = image.cluster_size();
    let storage = image.storage();
    let file = storage.len()?;
    let file_clusters = file.div_ceil(cs);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for raw in broken {
        let off = raw.table_offset / cs * cs;
        let len = u64::from(raw.table_size.min(MAX_TABLE_SIZE)).saturating_mul(8);
        let end = off.saturating_add(len);
        set.insert(off / cs, end.div_ceil(cs).min(file_clusters));
        // Whole words inside the file (`off` is 8-aligned, so the words stay aligned).
        let end = end.min(off.saturating_add(file.saturating_sub(off) / 8 * 8));
        if off < end {
            ranges.push((off, end));
        }
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (s, e) in ranges {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    let mut buf = vec![0u8; CLAIM_READ_CHUNK as usize];
    for (start, end) in merged {
        let mut at = start;
        while at < end {
            let n = CLAIM_READ_CHUNK.min(end - at);
            check_in_file("bitmap table", at, n, file)?;
            let bytes = &mut buf[..n as usize];
            storage.read_exact_at(bytes, at)?;
            // Runs of zero entries (a sparse table) are skipped a block at a time.
            const ZEROS: [u8; 4096] = [0; 4096];
            for block in bytes.chunks(ZEROS.len()) {
                if block == &ZEROS[..block.len()] {
                    continue;
                }
                for w in block.chunks_exact(8) {
                    let mut v = [0u8; 8];
                    v.copy_from_slice(w);
                    let d = u64::from_be_bytes(v) & TABLE_ENTRY_OFFSET_MASK;
                    if d != 0 && d < file {
                        set.insert(d / cs, d / cs + 1);
                    }
                }
            }
            at += n;
        }
    }
    Ok(())
}

/// Commits a directory of `keep` (none: the extension goes), through the store's commit,
/// with the old directory's clusters freed where nothing else references them. Returns the
/// names of the kept bitmaps it made all dirty.
///
/// This commit removes bitmaps, and a removed bitmap may hold writes no kept one has (a
/// later checkpoint's: "since X" is the union of X and every bitmap still in the image, see
/// `src/store/checkpoint.rs`). So each kept entry that is consistent is committed with a
/// new table of all-ones entries (QEMU's `BME_TABLE_ENTRY_FLAG_ALL_ONES`, which it loads
/// as a cluster of set bits), written into fresh clusters before the commit point: any
/// "since" over the kept bitmaps is then a full backup, never a false clean. Its old table
/// and data clusters are among the commit's frees, released after the header write. A
/// kept entry in use stays as it is: its bits already count as all dirty.
///
/// Crash reasoning: before the header write the old directory, with the old tables, is in
/// force and the new tables are leaked clusters (the allocator hands out only refcount-0
/// clusters, and every cluster the old directory names was raised to its one reference
/// before, in [`repair`]); after it, the kept bitmaps are all dirty and the old tables
/// leaked until the frees are durable.
fn rewrite_directory<S: Storage>(
    image: Image<S>,
    keep: Vec<(DirEntry, Vec<u64>)>,
    dir: Option<(u64, u64)>,
    mut walk: crate::image::check::References,
) -> std::result::Result<(Image<S>, Vec<BitmapName>), RewriteFailed> {
    let cs = image.cluster_size();
    // The walk the commit's frees consult: everything but the bitmaps, the kept bitmaps'
    // clusters, and the old directory once, so that a directory cluster shared with
    // anything else has two references and is kept.
    if let Some((off, size)) = dir {
        walk.add(off, ceil_clusters(size, cs).saturating_mul(cs));
    }
    for (_, owned) in &keep {
        for &c in owned {
            walk.add(c, cs);
        }
    }
    let old: Vec<DirEntry> = keep.iter().map(|(e, _)| e.clone()).collect();
    let mut st = BitmapStore::with_new_image(image);
    st.slots = old
        .iter()
        .map(|e| Slot {
            inconsistent: e.in_use,
            entry: e.clone(),
            stale: false,
            mem: None,
            parked: None,
            table: None,
        })
        .collect();
    st.dir = dir;
    st.walk = Some(walk);
    st.walk_shape = None;
    // The commit's own refusal of a header it cannot rewrite, before the tables below are
    // allocated and written: nothing is written before a refusal.
    let uncommitted = |error| RewriteFailed {
        error,
        committed: None,
    };
    st.ensure_header_fits(u32::try_from(keep.len()).unwrap_or(u32::MAX))
        .map_err(uncommitted)?;
    let mut entries = Vec::with_capacity(keep.len());
    let mut frees = Vec::new();
    let mut made_all_dirty = Vec::new();
    for (mut e, owned) in keep {
        if !e.in_use {
            e.table_offset = st.write_all_ones_table(e.table_size).map_err(uncommitted)?;
            frees.extend(owned.into_iter().map(|c| (c, 1)));
            made_all_dirty.push(e.name.clone());
        }
        entries.push(e);
    }
    if let Err(error) = st.commit(entries, frees) {
        // `commit` names the new directory once its header write returned: from then on the
        // removal stands, and what failed after it (the frees, their flush) is at worst a
        // leak. A failure in the header write itself may or may not have committed; it is
        // returned as it is.
        let committed = (st.dir != dir).then_some(made_all_dirty);
        return Err(RewriteFailed { error, committed });
    }
    Ok((st.image, made_all_dirty))
}

/// A [`rewrite_directory`] that failed: the error, and the bitmaps made all dirty when the
/// commit point had passed.
struct RewriteFailed {
    error: Error,
    committed: Option<Vec<BitmapName>>,
}

/// Which leaked clusters a leak repair leaves alone.
enum Protect {
    /// None: the broken entries are gone, and what they owned is free to take back.
    Nothing,
    /// Every one: the directory cannot be read, so any may hold a bitmap's data.
    Everything,
    /// The clusters a broken directory entry may own.
    These(ClusterSet),
}

/// Lowers the refcount of every leaked cluster to its references, except those `protect`
/// keeps, and never below 1 for a cluster in `kept` (the directory's and the kept
/// bitmaps'): each has exactly one reference, which the walk does not see when a broken
/// entry makes the directory undecodable as a whole. Flushes the refcounts when they
/// changed here or before (`report.refcounts_raised`).
///
/// Never to 1 for a cluster whose one reference is an active L1 or L2 entry without the
/// COPIED flag (a snapshot deleted by a QEMU that crashed before it set the flag again):
/// `qemu-img check` calls that entry corrupt at refcount 1, and QEMU's repair sets the
/// flag then, which writes guest metadata this repair leaves alone. It goes down to 2
/// (`leaks_uncopied`).
fn fix_leaks<S: Storage>(
    mut image: Image<S>,
    protect: &Protect,
    kept: &ClusterSet,
    mut report: RepairReport,
) -> Result<(Image<S>, RepairReport)> {
    let (_, refs) = image.references()?;
    let cs = image.cluster_size();
    let mut changed = report.refcounts_raised > 0;
    // (cluster, refcount on disk, refcount to lower it to), for every leak not protected.
    let mut lower = Vec::new();
    for c in 0..refs.clusters() {
        let off = c.saturating_mul(cs);
        let rc = image.refcount(off)?;
        let r = refs.at(off);
        if rc <= r {
            continue;
        }
        let to = if kept.contains(c) { r.max(1) } else { r };
        let protected = match protect {
            Protect::Nothing => false,
            Protect::Everything => true,
            Protect::These(p) => p.contains(c),
        };
        if protected || rc <= to {
            report.leaks_kept = report.leaks_kept.saturating_add(1);
            continue;
        }
        lower.push((c, rc, to));
    }
    let to_one: Vec<u64> = lower
        .iter()
        .filter(|&&(_, _, to)| to == 1)
        .map(|&(c, _, _)| c)
        .collect();
    let uncopied = image.named_without_copied(&to_one)?;
    for (c, rc, mut to) in lower {
        let off = c.saturating_mul(cs);
        if to == 1 && uncopied.binary_search(&c).is_ok() {
            report.leaks_uncopied = report.leaks_uncopied.saturating_add(1);
            if rc <= 2 {
                continue;
            }
            to = 2;
        } else {
            report.leaks_freed = report.leaks_freed.saturating_add(1);
        }
        image.lower_refcount(off, to)?;
        changed = true;
    }
    if changed {
        image.flush_refcounts()?;
        image.sync()?;
    }
    Ok((image, report))
}
