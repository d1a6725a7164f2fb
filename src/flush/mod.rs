//! The incremental flush engine, the pending-bytes queries and the stop loop.
//!
//! Kevin Wolf's 2018 idea (`qemu-devel`, "Restoring bitmaps after failed/cancelled
//! migration"): keep an in-memory map of which parts of the persistent bitmap are stale, and
//! write most of it *before* the VM stops, so that the stop itself writes only the
//! remainder. The in-memory map is [`DirtyBitmap`]'s change map. Its regions are smaller
//! than a cluster or equal to it (the store uses 4 KiB, or the cluster size if that is
//! smaller): region `r` lies in bitmap table entry (data cluster) `r / per_cluster`, at byte
//! `(r % per_cluster) × region_size` of it. Small regions keep a scattered workload from
//! rewriting whole clusters: 64 KiB of bitmap at 64 KiB granularity covers 32 GiB of disk,
//! 4 KiB covers 2 GiB.
//!
//! This module knows the image and the bitmaps it is handed; it knows nothing of the
//! directory or of the bitmap store (`src/store/`), which sits above it and calls it.
//!
//! # Why in-place writes are safe
//! The engine only runs while the store is active, and while active every bitmap it flushes
//! is `in_use` on disk. A crash at any point therefore leaves the bitmap *inconsistent*,
//! whatever mix of old and new bytes its clusters hold; it is never read as clean. The only
//! thing a flush must keep right is the refcounts, so that `qemu-img check` stays clean:
//!
//! 1. every cluster whose table entry is not a data cluster (0, or the all-ones marker),
//!    that holds a changed region and now has a set bit gets a fresh cluster, and **the
//!    refcounts are flushed first** (refblocks, barrier, reftable entries, barrier);
//! 2. then the data: changed regions in place (each a whole number of 512-byte sectors at a
//!    sector-aligned offset, except a shorter last region) and fresh clusters whole (every
//!    region of the cluster, changed or not: the old entry said 0 or all ones, and the
//!    in-memory bitmap holds every bit of it), sorted by offset and coalesced;
//! 3. then the table entries that point at the fresh clusters, in place, and 0 for every
//!    all-ones entry whose cluster no longer holds a set bit (it had no data cluster, so
//!    nothing is freed);
//! 4. then (when the caller asks for `sync`, as a flush of its own does) one barrier.
//!
//! No durable table entry can point at a cluster whose durable refcount is 0, since the
//! refcount was durable before the entry was written. A crash between 1 and 3 leaks the
//! fresh clusters (refcount 1, no reference), which `qemu-img check -r leaks` reclaims;
//! QEMU leaks the same way in its own store. A flush never clears `in_use`.
//!
//! # No bit is forgotten
//! The changed regions are taken with [`DirtyBitmap::take_changed`] before the bytes are
//! serialized (the order that makes a racing mark land in one or the other). If anything
//! fails after the take, every taken region is handed back with
//! [`DirtyBitmap::requeue_changed`], so the next flush (after a reopen) writes it again.

mod cost;
mod stop;

pub use cost::{DiskRate, StopWork};

#[cfg(feature = "testing")]
#[doc(hidden)]
pub use stop::run_stop_loop_with;
pub use stop::{run_stop_loop, StopReport, StopSource, MAX_STOP_ROUNDS};

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bitmap::{ChangedRegions, DirtyBitmap};
use crate::error::{internal, Error, Result};
use crate::format::table::TABLE_ENTRY_LEN;
use crate::format::TableEntry;
use crate::image::Image;
use crate::storage::Storage;

/// Coalesced writes are cut at this many bytes, to bound the copy buffers.
const MAX_WRITE: usize = 8 << 20;

/// The default changed fraction of a bitmap's regions from which a flush rewrites every
/// region of its data clusters in place
/// ([`BitmapStore::set_rewrite_threshold`](crate::BitmapStore::set_rewrite_threshold)),
/// measured with `dbm bench flush`: its crossover sweep times both ways on the same
/// bitmaps with changed regions spread evenly, the worst case of the in-place writes (one
/// write per region, none adjacent), while the whole rewrite, one sequential run per
/// stretch of adjacent data clusters, costs the same at every fraction. From 3/8 on the
/// whole rewrite was no slower, for one bitmap and for four (`docs/BENCHMARKS.md`,
/// "Issue 14").
pub const DEFAULT_REWRITE_THRESHOLD: f64 = 0.375;

/// What one flush (or an inactivation) did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Change-map regions taken and written (or found to need no write).
    pub regions: u64,
    /// Bitmap data and table-entry bytes written. Refcount blocks and header or directory
    /// writes are not counted.
    pub bytes_written: u64,
    /// Fresh data clusters allocated for regions whose table entry was not a data cluster.
    pub clusters_allocated: u64,
    /// Barriers (`sync_data`) issued, including the refcount flush's.
    pub syncs: u64,
    /// Of `duration`, the time spent in those barriers: what the stop-cost model
    /// ([`DiskRate`]) tells apart from the time spent writing.
    pub sync_time: Duration,
    /// Wall-clock time spent.
    pub duration: Duration,
}

impl FlushStats {
    /// Adds `other`'s counts and duration to `self`.
    pub fn accumulate(&mut self, other: &FlushStats) {
        self.regions = self.regions.saturating_add(other.regions);
        self.bytes_written = self.bytes_written.saturating_add(other.bytes_written);
        self.clusters_allocated = self
            .clusters_allocated
            .saturating_add(other.clusters_allocated);
        self.syncs = self.syncs.saturating_add(other.syncs);
        self.sync_time = self.sync_time.saturating_add(other.sync_time);
        self.duration = self.duration.saturating_add(other.duration);
    }
}

/// One bitmap to flush: the authoritative in-memory bitmap and its table as on disk.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) bitmap: Arc<DirtyBitmap>,
    pub(crate) table_offset: u64,
    pub(crate) table: Vec<TableEntry>,
}

impl Target {
    /// Each target's bitmap with its table's offset: which bitmap a flush's
    /// [`Taken`] sets belong to.
    pub(crate) fn ids(targets: &[Target]) -> Vec<(Arc<DirtyBitmap>, u64)> {
        targets
            .iter()
            .map(|t| (Arc::clone(&t.bitmap), t.table_offset))
            .collect()
    }
}

/// What a cluster whose table entry is not a data cluster needs, once one of its regions
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Nothing: the cluster is all zero and its entry already says so.
    Nothing,
    /// A fresh cluster holding the whole cluster's bytes, then a table entry pointing at it.
    Fresh,
    /// No set bit, but the entry is the all-ones marker: set the entry to 0.
    ZeroEntry,
}

/// What a cluster with table entry `entry` (0 or the all-ones marker) and serialized
/// contents `bytes` needs.
fn plan(entry: TableEntry, bytes: &[u8]) -> Action {
    match entry {
        TableEntry::Ones if bytes.iter().all(|&b| b == 0) => Action::ZeroEntry,
        TableEntry::Zeroes if bytes.iter().all(|&b| b == 0) => Action::Nothing,
        _ => Action::Fresh,
    }
}

/// One planned write or entry change of a flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Overwrite changed region `r` in its data cluster, at this file offset. An
    /// all-zero region keeps its cluster (zeroes are written in place): the cluster stays
    /// referenced, so nothing leaks, and the bits read back as 0.
    InPlace { r: u64, off: u64 },
    /// Cluster (table entry) `c`, whose entry is not a data cluster, needs `action`.
    Cluster { c: u64, action: Action },
}

/// How a target's regions map onto its clusters: region `r` lies in cluster
/// `r / per_cluster`, at byte `(r % per_cluster) × region_size` of it.
#[derive(Debug, Clone, Copy)]
struct Layout {
    cluster_size: u64,
    region_size: u64,
    per_cluster: u64,
}

impl Layout {
    fn of(t: &Target, cluster_size: u64) -> Result<Self> {
        let region_size = t.bitmap.region_size();
        // Both are powers of two, so a region no larger than a cluster divides it, and
        // every region starts at a multiple of its size (≥ 512) inside its cluster: every
        // in-place write is sector-aligned. The store's bitmaps always fit (see
        // `BitmapStore::region_size`); a unit test checks the refusal, so it does not panic
        // in debug builds.
        if region_size > cluster_size || !cluster_size.is_multiple_of(region_size) {
            return Err(Error::Internal(format!(
                "change-map regions of {region_size} bytes do not divide {cluster_size}-byte clusters"
            )));
        }
        Ok(Self {
            cluster_size,
            region_size,
            per_cluster: cluster_size / region_size,
        })
    }

    /// The regions of cluster `c`, clipped to the bitmap.
    fn regions_of(&self, t: &Target, c: u64) -> std::ops::Range<u64> {
        let first = c.saturating_mul(self.per_cluster);
        first
            ..first
                .saturating_add(self.per_cluster)
                .min(t.bitmap.region_count())
    }

    /// Valid (serialized) bytes of cluster `c`: the cluster size, or less for the last one.
    fn cluster_len(&self, t: &Target, c: u64) -> u64 {
        t.bitmap
            .serialized_len()
            .saturating_sub(c.saturating_mul(self.cluster_size))
            .min(self.cluster_size)
    }
}

fn entry_of(t: &Target, c: u64) -> Result<TableEntry> {
    usize::try_from(c)
        .ok()
        .and_then(|i| t.table.get(i))
        .copied()
        .ok_or_else(|| internal!("cluster {c} past a table of {} entries", t.table.len()))
}

/// Serializes regions `regions` of `bm` back to back into `out`, which must be exactly
/// their length.
fn serialize_regions(
    bm: &DirtyBitmap,
    regions: std::ops::Range<u64>,
    out: &mut [u8],
) -> Result<()> {
    let mut at = 0usize;
    for r in regions {
        let len = bm.region_len(r) as usize;
        let dst = out
            .get_mut(at..at.saturating_add(len))
            .ok_or_else(|| internal!("region {r} does not fit its buffer"))?;
        bm.serialize_region(r, dst)?;
        at = at.saturating_add(len);
    }
    Ok(())
}

/// The steps a flush of `regions` (taken from `t`'s change map) needs, in region order:
/// each changed region inside a data cluster is written in place; each cluster whose entry
/// is 0 or the all-ones marker and that holds a changed region is planned once, from all
/// of its bytes (serialized into `scratch`), because a fresh cluster must be written whole.
///
/// With `allocate`, every such cluster gets a fresh one, all zero or not.
fn plan_target(
    t: &Target,
    regions: &ChangedRegions,
    layout: Layout,
    scratch: &mut Vec<u8>,
    allocate: bool,
) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut last_cluster = None;
    for r in regions.iter() {
        let c = r / layout.per_cluster;
        match entry_of(t, c)? {
            TableEntry::Data(off) => steps.push(Step::InPlace {
                r,
                off: off
                    .saturating_add((r % layout.per_cluster).saturating_mul(layout.region_size)),
            }),
            // Regions come in ascending order, so a cluster's regions are adjacent.
            e if last_cluster != Some(c) => {
                last_cluster = Some(c);
                scratch.clear();
                scratch.resize(layout.cluster_len(t, c) as usize, 0);
                serialize_regions(&t.bitmap, layout.regions_of(t, c), scratch)?;
                steps.push(Step::Cluster {
                    c,
                    action: if allocate {
                        Action::Fresh
                    } else {
                        plan(e, scratch)
                    },
                });
            }
            _ => {}
        }
    }
    Ok(steps)
}

/// The changed-region count times the region size of every bitmap: a lock-free upper-bound
/// style estimate that costs one counter read per bitmap (a popcount of its change map: 8
/// words for a 16 TiB bitmap at 64 KiB granularity), no lock, no I/O. It does not know which
/// regions need a fresh cluster; the exact count (`pending_exact`) does.
///
/// The one implementation of the estimate: the store's, the tracker's and the background
/// flusher's all call it.
pub fn pending_estimate<'a>(bitmaps: impl IntoIterator<Item = &'a Arc<DirtyBitmap>>) -> u64 {
    bitmaps.into_iter().fold(0u64, |acc, b| {
        acc.saturating_add(b.primary_pending().saturating_mul(b.region_size()))
    })
}

/// The exact bytes a flush of `targets` would write now: the region bytes of every changed
/// region with a data cluster, a whole cluster plus an 8-byte table entry for every cluster
/// that needs a fresh one, 8 bytes for an all-ones entry that becomes 0. Refcount metadata
/// is not counted, as in [`FlushStats::bytes_written`].
///
/// A target the flush at `rewrite_threshold` would rewrite whole ([`rewrites_whole`]) is
/// counted as that flush writes it: every region of its data clusters, so that a stop
/// decided on this figure writes no more than it.
///
/// It takes each change map and hands every region back (with
/// [`DirtyBitmap::requeue_changed`]) before returning, error or not, so nothing is lost.
pub(crate) fn pending_exact(
    targets: &[Target],
    cluster_size: u64,
    rewrite_threshold: f64,
) -> Result<u64> {
    pending_exact_work(targets, cluster_size, rewrite_threshold).map(|(bytes, _)| bytes)
}

/// [`pending_exact`], and how many clusters the flush would allocate (each one means a
/// refcount flush, with its barriers, before the data).
pub(crate) fn pending_exact_work(
    targets: &[Target],
    cluster_size: u64,
    rewrite_threshold: f64,
) -> Result<(u64, u64)> {
    let taken: Vec<ChangedRegions> = targets.iter().map(|t| t.bitmap.take_primary()).collect();
    let count = || -> Result<(u64, u64)> {
        let mut total = 0u64;
        let mut fresh = 0u64;
        let mut scratch = Vec::new();
        for (t, regions) in targets.iter().zip(&taken) {
            let layout = Layout::of(t, cluster_size)?;
            let expanded;
            let regions =
                if rewrites_whole(regions.len(), t.bitmap.region_count(), rewrite_threshold) {
                    expanded = with_data_regions(t, regions, layout);
                    &expanded
                } else {
                    regions
                };
            for step in plan_target(t, regions, layout, &mut scratch, false)? {
                let n = match step {
                    Step::InPlace { r, .. } => t.bitmap.region_len(r),
                    Step::Cluster { action, .. } => match action {
                        Action::Nothing => 0,
                        Action::Fresh => {
                            fresh = fresh.saturating_add(1);
                            cluster_size.saturating_add(TABLE_ENTRY_LEN as u64)
                        }
                        Action::ZeroEntry => TABLE_ENTRY_LEN as u64,
                    },
                };
                total = total.saturating_add(n);
            }
        }
        Ok((total, fresh))
    };
    let r = count();
    for (t, regions) in targets.iter().zip(&taken) {
        t.bitmap.requeue_changed(regions);
    }
    r
}

/// Sorts `writes` by offset and merges the adjacent ones (up to [`MAX_WRITE`] bytes each).
fn coalesce(mut writes: Vec<(u64, Vec<u8>)>) -> Vec<(u64, Vec<u8>)> {
    writes.sort_by_key(|w| w.0);
    let mut out: Vec<(u64, Vec<u8>)> = Vec::with_capacity(writes.len());
    for (off, bytes) in writes {
        if let Some((lo, lb)) = out.last_mut() {
            if lo.saturating_add(lb.len() as u64) == off && lb.len() + bytes.len() <= MAX_WRITE {
                lb.extend_from_slice(&bytes);
                continue;
            }
        }
        out.push((off, bytes));
    }
    out
}

/// Flushes every changed region of `targets` in place (see the module docs for the order),
/// then issues one barrier if `sync` and anything was written. Updates each target's
/// `table` to what was written.
///
/// A target whose changed regions are at least `rewrite_threshold` of all its regions (and
/// at least [`MIN_REWRITE_REGIONS`]) is rewritten whole instead: every region of its data
/// clusters is written in place, the unchanged ones with what the in-memory bitmap holds
/// (the authority while active: the bytes on disk, or a later mark's newer bits, which
/// stay in the change map), which turns scattered region writes into a few long
/// sequential runs. The same order and the same crash reasoning hold: only the data
/// clusters are widened, and a changed region of a cluster whose entry is 0 or all ones is
/// planned as in any flush (a fresh cluster and its entry, or a 0 entry).
///
/// # Errors
/// Any error from the image (which poisons it on a failed write or sync). Every taken
/// region has then been handed back to its bitmap.
pub(crate) fn flush<S: Storage>(
    image: &mut Image<S>,
    targets: &mut [Target],
    sync: bool,
    rewrite_threshold: f64,
) -> Result<(FlushStats, Taken)> {
    let start = Instant::now();
    let syncs0 = image.sync_count();
    let sync_time0 = image.sync_time();
    let taken: Taken = targets.iter().map(|t| t.bitmap.take_primary()).collect();
    let whole: Vec<bool> = targets
        .iter()
        .zip(&taken)
        .map(|(t, r)| rewrites_whole(r.len(), t.bitmap.region_count(), rewrite_threshold))
        .collect();
    // The unwind's hand-back cannot borrow `targets` beside the write.
    let bitmaps: Vec<Arc<DirtyBitmap>> = targets.iter().map(|t| Arc::clone(&t.bitmap)).collect();
    let r = handing_back_on_unwind(
        || write_taken(image, targets, &taken, sync, false, &whole),
        || {
            for (b, regions) in bitmaps.iter().zip(&taken) {
                b.requeue_changed(regions);
            }
        },
    )
    .map(|mut stats| {
        stats.regions = taken.iter().map(ChangedRegions::len).sum();
        stats
    });
    finish(image, targets, &taken, r, (start, syncs0, sync_time0)).map(|s| (s, taken))
}

/// Runs `f`; should it unwind (a `Storage` that panicked), runs `hand_back` first, which
/// gives the regions `f`'s caller took from its change maps back to their bitmaps. An
/// error hands them back too ([`finish`]); an unwind would skip that, and a region taken,
/// not written and not in its change map is one no later flush writes: a stop would clear
/// `in_use` over a bitmap without its marks, a durable commit would never confirm its
/// intents, and a retried merge would find its bits set and commit nothing. (The image
/// poisons itself on an unwind through a write, so nothing is written afterwards.)
pub(crate) fn handing_back_on_unwind<T>(f: impl FnOnce() -> T, hand_back: impl FnOnce()) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        hand_back();
        std::panic::resume_unwind(panic)
    })
}

/// Hands every region of `taken` back to its target's bitmap.
fn requeue(targets: &[Target], taken: &[ChangedRegions]) {
    for (t, regions) in targets.iter().zip(taken) {
        t.bitmap.requeue_changed(regions);
    }
}

/// Fewer changed regions than this are always written alone, whatever the fraction: a
/// few writes cost no more than one long run, and a small bitmap is not worth rewriting.
pub const MIN_REWRITE_REGIONS: u64 = 64;

/// Whether a flush that took `changed` of a bitmap's `regions` regions rewrites it whole
/// at `threshold`
/// ([`BitmapStore::set_rewrite_threshold`](crate::BitmapStore::set_rewrite_threshold)): at
/// least [`MIN_REWRITE_REGIONS`] changed, and at least that fraction of them.
pub fn rewrites_whole(changed: u64, regions: u64, threshold: f64) -> bool {
    changed >= MIN_REWRITE_REGIONS && changed as f64 >= threshold * regions as f64
}

/// The regions a flush or commit took, one set per target in target order: every region
/// whose bytes on disk it may have changed, but for a region it wrote without taking it (a
/// whole rewrite's unchanged region, a fresh cluster's other regions), which holds what it
/// held or a later mark's newer bits, still in the change map.
pub(crate) type Taken = Vec<ChangedRegions>;

/// What a flush that took `taken` ends with: on success its barriers and time since
/// `(start, syncs, sync time)`; on failure every taken region handed back (nothing taken
/// may be forgotten: the next flush writes it again) and the error.
fn finish<S: Storage>(
    image: &Image<S>,
    targets: &[Target],
    taken: &[ChangedRegions],
    r: Result<FlushStats>,
    (start, syncs0, sync_time0): (Instant, u64, Duration),
) -> Result<FlushStats> {
    match r {
        Ok(mut stats) => {
            stats.syncs = image.sync_count().saturating_sub(syncs0);
            stats.sync_time = image.sync_time().saturating_sub(sync_time0);
            stats.duration = start.elapsed();
            Ok(stats)
        }
        Err(e) => {
            requeue(targets, taken);
            Err(e)
        }
    }
}

/// One data write: serialized regions `regions` of target `ti`, written at `off` as `len`
/// bytes (the regions' bytes, or a whole cluster with a zero tail for a fresh cluster).
#[derive(Debug, Clone)]
struct Item {
    off: u64,
    ti: usize,
    regions: std::ops::Range<u64>,
    len: u64,
}

/// Gives every cluster of `targets` whose table entry is not a data cluster a fresh one,
/// written whole from the in-memory bitmap (an all-zero cluster too), in the order of a
/// flush with one barrier more: refcounts first (durable), then the data, a barrier, then
/// the table entries, then a barrier. Every step leaves the bitmap reading as before (an
/// entry points at its cluster only once the cluster durably holds what the entry meant),
/// so a bitmap that is not `in_use` stays consistent at every crash point. Afterwards every region can be written in place
/// ([`commit_in_place`]). Nothing is taken from the change maps.
///
/// # Errors
/// As [`flush`].
pub(crate) fn allocate_all<S: Storage>(
    image: &mut Image<S>,
    targets: &mut [Target],
) -> Result<FlushStats> {
    let cs = image.cluster_size();
    let mut all = Vec::with_capacity(targets.len());
    for t in targets.iter() {
        let layout = Layout::of(t, cs)?;
        let mut regions = ChangedRegions::empty(t.bitmap.region_count());
        for (c, e) in t.table.iter().enumerate() {
            if !matches!(e, TableEntry::Data(_)) {
                for r in layout.regions_of(t, c as u64) {
                    regions.insert(r);
                }
            }
        }
        all.push(regions);
    }
    let start = Instant::now();
    let mut stats = write_taken(image, targets, &all, true, true, &[])?;
    stats.regions = all.iter().map(ChangedRegions::len).sum();
    stats.duration = start.elapsed();
    Ok(stats)
}

/// A durable store's commit: every changed region of `targets` (whose clusters are all data
/// clusters, see [`allocate_all`]) written in place, adjacent ones coalesced, then one
/// barrier; then `confirm(target, region, bytes)` for every region, with the bytes that
/// reached the disk. A region is serialized after its take, so a mark that returned before
/// the take is in those bytes (one racing with it is there or in the change map again).
///
/// # Errors
/// A region whose cluster is not a data cluster ([`Error::Internal`]); I/O. Every taken
/// region is then handed back to its bitmap and nothing is confirmed.
pub(crate) fn commit_in_place<S: Storage>(
    image: &mut Image<S>,
    targets: &[Target],
    mut confirm: impl FnMut(usize, u64, &[u8]),
) -> Result<(FlushStats, Taken)> {
    let start = Instant::now();
    let syncs0 = image.sync_count();
    let sync_time0 = image.sync_time();
    let taken: Taken = targets.iter().map(|t| t.bitmap.take_primary()).collect();
    let mut written: Vec<(usize, u64, Vec<u8>)> = Vec::new();
    let write = || -> Result<FlushStats> {
        let cs = image.cluster_size();
        let mut writes = Vec::new();
        for (ti, (t, regions)) in targets.iter().zip(&taken).enumerate() {
            let layout = Layout::of(t, cs)?;
            for r in regions.iter() {
                let c = r / layout.per_cluster;
                let TableEntry::Data(off) = entry_of(t, c)? else {
                    return Err(internal!(
                        "region {r} of a durable bitmap has no data cluster"
                    ));
                };
                let at =
                    off.saturating_add((r % layout.per_cluster).saturating_mul(layout.region_size));
                let mut bytes = vec![0u8; t.bitmap.region_len(r) as usize];
                t.bitmap.serialize_region(r, &mut bytes)?;
                writes.push((at, bytes.clone()));
                written.push((ti, r, bytes));
            }
        }
        let mut stats = FlushStats::default();
        for (off, bytes) in coalesce(writes) {
            image.write_at(&bytes, off)?;
            stats.bytes_written = stats.bytes_written.saturating_add(bytes.len() as u64);
        }
        if stats.bytes_written > 0 {
            image.sync()?;
        }
        stats.regions = taken.iter().map(ChangedRegions::len).sum();
        Ok(stats)
    };
    let r = handing_back_on_unwind(write, || requeue(targets, &taken));
    if r.is_ok() {
        // After the barrier: these bytes are on disk.
        for (ti, r, bytes) in &written {
            confirm(*ti, *r, bytes);
        }
    }
    finish(image, targets, &taken, r, (start, syncs0, sync_time0)).map(|s| (s, taken))
}

/// `taken` and every region whose cluster is a data cluster: what a whole rewrite of `t`
/// writes (a cluster that is not data is planned from its changed regions, as always).
fn with_data_regions(t: &Target, taken: &ChangedRegions, layout: Layout) -> ChangedRegions {
    let mut all = taken.clone();
    for (c, e) in t.table.iter().enumerate() {
        if matches!(e, TableEntry::Data(_)) {
            for r in layout.regions_of(t, c as u64) {
                all.insert(r);
            }
        }
    }
    all
}

/// Writes `taken` (one set per target) in the flush order of the module docs; a target
/// whose `whole` is true is written with every region of its data clusters.
fn write_taken<S: Storage>(
    image: &mut Image<S>,
    targets: &mut [Target],
    taken: &[ChangedRegions],
    sync: bool,
    allocate: bool,
    whole: &[bool],
) -> Result<FlushStats> {
    let cs = image.cluster_size();
    let mut items: Vec<Item> = Vec::new();
    // (target, cluster) awaiting a fresh cluster.
    let mut fresh: Vec<(usize, u64)> = Vec::new();
    // (target, cluster, new entry).
    let mut entries: Vec<(usize, u64, TableEntry)> = Vec::new();
    let mut scratch = Vec::new();
    let mut layouts = Vec::with_capacity(targets.len());
    for (ti, (t, regions)) in targets.iter().zip(taken).enumerate() {
        let layout = Layout::of(t, cs)?;
        layouts.push(layout);
        let expanded;
        let regions = if whole.get(ti).copied().unwrap_or(false) {
            expanded = with_data_regions(t, regions, layout);
            &expanded
        } else {
            regions
        };
        for step in plan_target(t, regions, layout, &mut scratch, allocate)? {
            match step {
                Step::InPlace { r, off } => items.push(Item {
                    off,
                    ti,
                    regions: r..r.saturating_add(1),
                    len: t.bitmap.region_len(r),
                }),
                Step::Cluster { c, action } => match action {
                    Action::Nothing => {}
                    Action::ZeroEntry => entries.push((ti, c, TableEntry::Zeroes)),
                    Action::Fresh => fresh.push((ti, c)),
                },
            }
        }
    }
    let mut stats = FlushStats::default();
    // 1. Fresh clusters, refcounts durable before anything can point at them.
    if !fresh.is_empty() {
        let n = fresh.len() as u64;
        let first = image.alloc_clusters(n)?;
        image.flush_refcounts()?;
        stats.clusters_allocated = n;
        for (k, (ti, c)) in fresh.into_iter().enumerate() {
            let off = first.saturating_add((k as u64).saturating_mul(cs));
            // QEMU writes whole clusters, zero past the valid bytes.
            items.push(Item {
                off,
                ti,
                regions: layouts[ti].regions_of(&targets[ti], c),
                len: cs,
            });
            entries.push((ti, c, TableEntry::Data(off)));
        }
    }
    // 2. The data, sorted by offset; adjacent writes coalesced into runs of at most
    //    MAX_WRITE bytes, serialized straight into one reused buffer. A region is
    //    serialized now, after its take: a mark racing with this is in these bytes or in
    //    the change map for the next flush.
    items.sort_by_key(|i| i.off);
    let mut buf: Vec<u8> = Vec::new();
    let mut i = 0;
    while let Some(first) = items.get(i) {
        let start = first.off;
        let mut end = start.saturating_add(first.len);
        let mut j = i + 1;
        while let Some(next) = items.get(j) {
            let grown = end.saturating_add(next.len).saturating_sub(start);
            if next.off != end || grown > MAX_WRITE as u64 {
                break;
            }
            end = end.saturating_add(next.len);
            j += 1;
        }
        buf.clear();
        buf.resize(end.saturating_sub(start) as usize, 0);
        for it in &items[i..j] {
            let at = it.off.saturating_sub(start) as usize;
            let bm = &targets[it.ti].bitmap;
            let valid: u64 = it.regions.clone().map(|r| bm.region_len(r)).sum();
            let dst = buf
                .get_mut(at..at.saturating_add(valid as usize))
                .ok_or_else(|| internal!("regions {:?} do not fit their write", it.regions))?;
            serialize_regions(bm, it.regions.clone(), dst)?;
        }
        image.write_at(&buf, start)?;
        stats.bytes_written = stats.bytes_written.saturating_add(buf.len() as u64);
        i = j;
    }
    // 2b. For `allocate_all` the bitmap is not `in_use`: an entry must never reach the
    //     disk before the bytes of the cluster it points to, or a crash could leave a
    //     consistent bitmap reading that cluster's bits (all set, for an all-ones entry)
    //     as what the cluster held before. A flush's bitmap is `in_use` until its
    //     inactivation, which writes nothing but flags after its own barrier.
    if allocate && !entries.is_empty() && stats.bytes_written > 0 {
        image.sync()?;
    }
    // 3. The table entries, in place, sorted and coalesced.
    let mut table_writes = Vec::with_capacity(entries.len());
    for &(ti, c, e) in &entries {
        let t = &targets[ti];
        let at = t
            .table_offset
            .saturating_add(c.saturating_mul(TABLE_ENTRY_LEN as u64));
        table_writes.push((at, e.to_raw().to_be_bytes().to_vec()));
    }
    for (off, bytes) in coalesce(table_writes) {
        image.write_at(&bytes, off)?;
        stats.bytes_written = stats.bytes_written.saturating_add(bytes.len() as u64);
    }
    for (ti, c, e) in entries {
        if let Some(slot) = usize::try_from(c)
            .ok()
            .and_then(|i| targets[ti].table.get_mut(i))
        {
            *slot = e;
        }
    }
    // 4. One barrier, so the bytes written are durable before the next step.
    if sync && stats.bytes_written > 0 {
        image.sync()?;
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_sorts_and_merges_adjacent() {
        let w = vec![
            (1024, vec![2u8; 512]),
            (0, vec![1u8; 512]),
            (512, vec![3u8; 512]),
            (4096, vec![4u8; 8]),
        ];
        let c = coalesce(w);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].0, 0);
        assert_eq!(c[0].1.len(), 1536);
        assert_eq!(&c[0].1[512..1024], &[3u8; 512][..]);
        assert_eq!(c[1], (4096, vec![4u8; 8]));
    }

    #[test]
    fn plan_covers_every_entry_kind() {
        assert_eq!(plan(TableEntry::Zeroes, &[0, 0]), Action::Nothing);
        assert_eq!(plan(TableEntry::Zeroes, &[0, 1]), Action::Fresh);
        assert_eq!(plan(TableEntry::Ones, &[0, 0]), Action::ZeroEntry);
        assert_eq!(plan(TableEntry::Ones, &[1, 0]), Action::Fresh);
    }

    /// 4 clusters of 4 KiB, regions of 512 B: a changed region in a data cluster is written
    /// in place at its own offset; two changed regions of one zero-entry cluster plan that
    /// cluster once, from all of its bytes.
    #[test]
    fn sub_cluster_regions_map_into_their_cluster() {
        let cs = 4096u64;
        // 16 KiB of bitmap at 512 B granularity: 64 MiB of disk.
        let bm = Arc::new(DirtyBitmap::with_region_size(64 << 20, 512, 512).unwrap());
        let t = Target {
            bitmap: Arc::clone(&bm),
            table_offset: 0,
            table: vec![
                TableEntry::Data(1 << 20),
                TableEntry::Zeroes,
                TableEntry::Ones,
                TableEntry::Zeroes,
            ],
        };
        let layout = Layout::of(&t, cs).unwrap();
        assert_eq!(layout.per_cluster, 8);
        let region_disk = 512 * 8 * 512;
        // Region 3 (cluster 0), regions 9 and 15 (cluster 1), region 16 cleared (cluster 2).
        bm.mark_dirty(3 * region_disk, 1);
        bm.mark_dirty(9 * region_disk, 1);
        bm.mark_dirty(15 * region_disk, 1);
        bm.mark_dirty(16 * region_disk, 1);
        bm.clear(16 * region_disk, region_disk);
        let taken = bm.take_changed();
        let steps = plan_target(&t, &taken, layout, &mut Vec::new(), false).unwrap();
        assert_eq!(
            steps,
            vec![
                Step::InPlace {
                    r: 3,
                    off: (1 << 20) + 3 * 512
                },
                Step::Cluster {
                    c: 1,
                    action: Action::Fresh
                },
                Step::Cluster {
                    c: 2,
                    action: Action::ZeroEntry
                },
            ]
        );
        // A region larger than the cluster cannot be placed.
        let big = Target {
            bitmap: Arc::new(DirtyBitmap::with_region_size(64 << 20, 512, 8192).unwrap()),
            table_offset: 0,
            table: vec![TableEntry::Zeroes; 2],
        };
        assert!(matches!(Layout::of(&big, cs), Err(Error::Internal(_))));
    }
}
