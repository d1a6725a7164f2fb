//! The copy-on-write commit protocol of [`BitmapStore`], and what every write checks first.
//!
//! - [`preflight`](BitmapStore::preflight): before the first write of any operation, the
//!   image passes the metadata walk with no corruption and every bitmap cluster has exactly
//!   one owner, so a refusal writes nothing and nothing is overwritten under another owner.
//! - [`commit`](BitmapStore::commit): a new directory into fresh clusters, refcounts flushed,
//!   the header write (the commit point), then the old clusters freed, only those
//!   [`safe_frees`](BitmapStore::safe_frees) proves this store alone referenced.
//! - [`write_flags_in_place`](BitmapStore::write_flags_in_place): the `in_use`/`auto` flags
//!   rewritten in place with one barrier when no torn sector can mix an entry, or QEMU's
//!   three-barrier sequence otherwise.
//!
//! The crash table of each step is in `docs/CRASH-CONSISTENCY.md`.

use super::{ceil_clusters, regions_per_cluster, BitmapStore, Slot};
use crate::bitmap::DirtyBitmap;
use crate::error::{internal, CheckFindings, Corruption, Result};
use crate::flush::FlushStats;
use crate::format::header::AUTOCLEAR_BITMAPS;
use crate::format::{
    encode_directory, encode_table, BitmapsExtension, DirEntry, ImageGeometry, TableEntry,
};
use crate::image::check::{References, WalkShape};
use crate::storage::Storage;

/// Most bytes of an all-ones table [`BitmapStore::write_all_ones_table`] writes at once.
const ALL_ONES_CHUNK: u64 = 1 << 20;

impl<S: Storage> BitmapStore<S> {
    /// The clusters of `frees` that are safe to release, as byte offsets: each cluster once,
    /// only those that the walk of the last [`preflight`](Self::preflight) found referenced
    /// at most once (by the owner being dropped, which named it), and none whose refcount
    /// is already 0.
    ///
    /// The walk is `Image::check`'s: it counts the header, L1 and L2 tables, guest data,
    /// snapshots, the LUKS header, the refcount structures and every bitmap structure. A
    /// cluster that anything else also references stays allocated: at worst a leak, never a
    /// loss. Clusters allocated since the walk had no reference and refcount 0 then (the
    /// preflight found no corruption, so no referenced cluster has refcount 0), so only
    /// this store references them. A walk a preload made earlier (`preflight_from`) may
    /// have counted a cluster the source freed and a bitmap took since: counted once, it
    /// is freed (refcount 1 at the activate, named by one bitmap: this store's alone);
    /// counted more, it stays allocated.
    fn safe_frees(&mut self, frees: Vec<(u64, u64)>) -> Result<Vec<u64>> {
        let cb = self.image.header().cluster_bits;
        let walk = self
            .walk
            .take()
            .ok_or_else(|| internal!("a commit without a preflight"))?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        let r = (|| {
            for (off, n) in frees {
                let first = off >> cb;
                for c in first..first.saturating_add(n) {
                    if seen.insert(c) && walk.at(c << cb) <= 1 && self.image.refcount(c << cb)? > 0
                    {
                        out.push(c << cb);
                    }
                }
            }
            Ok(out)
        })();
        self.walk = Some(walk);
        r
    }

    /// What every operation that writes checks before its first write, so that a refusal
    /// writes nothing:
    /// - the image passes the walk `Image::check` does with no corruption, so every
    ///   cluster anything references has a refcount at least as high, and the allocator
    ///   (which hands out only refcount-0 clusters) can never hand out a referenced one;
    /// - every cluster of the bitmap directory, of each bitmap table and of each consistent
    ///   bitmap's data has exactly one reference and refcount 1: bitmaps are written in
    ///   place, and a cluster shared with another table, another entry or other metadata
    ///   would be overwritten under its other owner.
    ///
    /// One walk over the file's metadata: each table is read once however many entries
    /// name it, so the cost is O(the file's metadata), never O(bitmaps × table). The walk's
    /// counts are kept for the frees of the operation's commit.
    ///
    /// # Errors
    /// [`Corruption::CheckFailed`], [`Corruption::SharedCluster`], I/O.
    pub(super) fn preflight(&mut self) -> Result<()> {
        if self.reuse_walk && self.active {
            let pre = self
                .walk
                .take()
                .zip(self.walk_shape)
                .map(|(refs, shape)| super::PreWalk { refs, shape });
            return self.preflight_from(pre);
        }
        self.preflight_fresh()
    }

    /// [`preflight`](Self::preflight) with a walk of its own.
    fn preflight_fresh(&mut self) -> Result<()> {
        self.walk = None;
        self.walk_shape = None;
        let shape = WalkShape::of(self.image.header());
        let (report, walk) = self.image.references()?;
        if report.corruptions > 0 {
            // Which repair applies: a walk of the rest of the image says whether any
            // finding lies outside the bitmaps (only on this refusal's path).
            let (base, _) = self.image.references_without_bitmaps()?;
            let found = match (base.corruptions, report.corruptions > base.corruptions) {
                (0, _) => CheckFindings::Bitmaps,
                (_, true) => CheckFindings::Both,
                (_, false) => CheckFindings::Image,
            };
            return Err(Corruption::CheckFailed {
                corruptions: report.corruptions,
                first: report.messages.first().cloned().unwrap_or_default(),
                found,
            }
            .into());
        }
        self.owns_bitmap_clusters(walk, Counted::Now)?;
        self.walk_shape = Some(shape);
        Ok(())
    }

    /// Runs `f` with every preflight of this active store's edits starting from the walk
    /// the last one made or started from (as [`preflight_from`](Self::preflight_from) starts
    /// from a preload's), instead of walking the image's metadata again: for a sequence of
    /// edits that must all fit in a migration's downtime (a destination taking over the
    /// stream's bitmaps: an activation, then removes and adds). The walk stands for the
    /// same reason a preload's does: it found every referenced cluster's refcount at least
    /// as high as its references, and each edit since is a qcow2 writer that keeps that
    /// true; and it is used only while the header's shape is the one its tables were read
    /// in (an edit that moves a table, growing the refcount table say, walks again). An
    /// inactive store's preflights walk as ever.
    pub(crate) fn reusing_walk<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        self.reuse_walk = true;
        // Reset on unwind too: a later edit outside the sequence walks afresh.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        self.reuse_walk = false;
        r.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// The activate's [`preflight`](Self::preflight), starting from the walk a
    /// [`preload`](Self::preload) made during the precopy, beside the writer, so that the
    /// downtime holds no walk (it grows with the guest's data: about 1.4 s for a 16 TiB
    /// disk whose every L2 table is allocated, docs/BENCHMARKS.md). Used only if the
    /// header's shape ([`WalkShape`]) is the same now, on disk and in this handle, as
    /// when that walk read the tables: no L1, refcount or snapshot table moved since.
    ///
    /// Why the earlier walk still stands: it found every referenced cluster's refcount at
    /// least as high as its references, and a writer of qcow2 keeps that true (it raises a
    /// refcount before it writes a reference, and allocates only refcount-0 clusters, so
    /// a cluster of refcount 1 never gains a second reference). So now too a bitmap
    /// cluster of refcount 1 has no reference but one, whatever the walk counted for it
    /// then (it may have been freed and allocated again since). Each bitmap cluster written
    /// in place must therefore have refcount 1, as `preflight` checks, and be named once
    /// among the bitmaps' structures (the directory, the tables, a consistent bitmap's data)
    /// and the image's own that the handle knows (`Image::is_structure_cluster`), which a
    /// fresh walk's count of exactly 1 covered; an in-use bitmap's data must name no such
    /// cluster and have a refcount covering its names, as a fresh walk asks. The trust this
    /// adds is in the writer between the two moments, as the store already trusts the
    /// guest's writer after its own walk; docs/DESIGN.md ("The activate's walk").
    ///
    /// The earlier walk can only spare the walk, never refuse for what it counted: if
    /// anything does not hold with it, a walk of its own runs as every other operation runs
    /// it, and its answer stands. A read that fails (the header, a table) fails the
    /// preflight, as it would fail a walk of its own.
    ///
    /// # Errors
    /// As [`preflight`](Self::preflight).
    pub(super) fn preflight_from(&mut self, pre: Option<super::PreWalk>) -> Result<()> {
        if let Some(pre) = pre {
            let cached = WalkShape::of(self.image.header());
            // The header's sector is read only to compare shapes; one that does not read
            // is refused, as any read a preflight needs.
            if pre.shape == cached && self.image.walk_shape_now()? == cached {
                match self.owns_bitmap_clusters(pre.refs, Counted::Before) {
                    Ok(()) => {
                        self.walk_shape = Some(pre.shape);
                        return Ok(());
                    }
                    // What the earlier walk cannot vouch for, a walk of its own judges.
                    Err(crate::Error::Corrupt(_)) => {}
                    // A read that failed fails the preflight, as in a walk of its own.
                    Err(e) => return Err(e),
                }
            }
        }
        self.preflight_fresh()
    }

    /// The second half of a preflight, on `walk`'s counts: each bitmap cluster written in
    /// place has refcount 1 and the walk counted it once (`Counted::Now`), or, with a walk
    /// made earlier (`Counted::Before`, see [`preflight_from`](Self::preflight_from)), it is
    /// named once among the structures checked here and the image's own, and an in-use
    /// bitmap's data names none of those and has a refcount covering its names. Keeps the
    /// counts for the commit's frees if so.
    fn owns_bitmap_clusters(&mut self, walk: References, counted: Counted) -> Result<()> {
        self.walk = None;
        let cs = self.image.cluster_size();
        // For `Counted::Before`: the clusters named so far by a bitmap structure written in
        // place, and how often an in-use bitmap's data names each (its refcount must cover
        // its names, as a fresh walk counts them). The image's own structures the handle
        // knows (cluster 0, the L1 and refcount tables, the refcount blocks, the snapshot
        // table's first cluster) name theirs once more.
        let mut named: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let mut in_use: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
        // Each cluster checked as soon as it is known, and a table's own clusters before
        // the table is read: the first shared cluster refuses, so entries that share a
        // table cost no read of it beyond the walk's, and nothing is listed.
        // `written`: the cluster is written in place, and must have refcount 1; a cluster of
        // an inconsistent bitmap is only named (`Counted::Before`).
        let mut owns = |image: &mut crate::image::Image<S>,
                        off: u64,
                        n: u64,
                        what: &'static str,
                        written: bool|
         -> Result<()> {
            for k in 0..n {
                let at = off.saturating_add(k.saturating_mul(cs));
                let references = walk.at(at);
                let refcount = image.refcount(at)?;
                let counted_ok = match counted {
                    Counted::Now => references == 1,
                    Counted::Before if written => {
                        !image.is_structure_cluster(at)
                            && !in_use.contains_key(&at)
                            && named.insert(at)
                    }
                    Counted::Before => {
                        let names = in_use.entry(at).or_insert(0);
                        *names += 1;
                        !named.contains(&at)
                            && refcount
                                >= names.saturating_add(u64::from(image.is_structure_cluster(at)))
                    }
                };
                if !counted_ok || (written && refcount != 1) {
                    return Err(Corruption::SharedCluster {
                        offset: at,
                        what,
                        references,
                        refcount,
                    }
                    .into());
                }
            }
            Ok(())
        };
        if let Some((off, size)) = self.dir {
            owns(
                &mut self.image,
                off,
                ceil_clusters(size, cs),
                "bitmap directory",
                true,
            )?;
        }
        for s in self.slots.iter().filter(|s| !s.stale) {
            owns(
                &mut self.image,
                s.entry.table_offset,
                ceil_clusters(u64::from(s.entry.table_size) * 8, cs),
                "bitmap table",
                true,
            )?;
            if !s.inconsistent {
                for t in self.read_table(&s.entry)? {
                    if let TableEntry::Data(off) = t {
                        owns(&mut self.image, off, 1, "bitmap data", true)?;
                    }
                }
            } else if matches!(counted, Counted::Before) {
                // Not written in place, so its refcount need not be 1, but it must cover every
                // name of the cluster (a fresh walk counts them all), and no cluster written
                // in place may be among them.
                for t in self.read_table(&s.entry)? {
                    if let TableEntry::Data(off) = t {
                        owns(&mut self.image, off, 1, "bitmap data", false)?;
                    }
                }
            }
        }
        self.walk = Some(walk);
        Ok(())
    }

    /// Whether cluster 0 still holds the header once the bitmaps extension is there (it
    /// grows by the extension's 24 bytes when the first bitmap is added). Checked before
    /// anything is allocated, so a refusal leaks nothing.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the sizes.
    pub(super) fn ensure_header_fits(&self, nb_bitmaps: u32) -> Result<()> {
        let mut area = self.image.area().clone();
        area.bitmaps = (nb_bitmaps > 0).then_some(BitmapsExtension {
            nb_bitmaps,
            directory_size: 1,
            directory_offset: self.image.cluster_size(),
        });
        Ok(area.encode().map(|_| ())?)
    }

    /// The clusters a bitmap owns: its data clusters, then its table.
    pub(super) fn owned_clusters(&self, entry: &DirEntry) -> Result<Vec<(u64, u64)>> {
        let cs = self.image.cluster_size();
        let mut out: Vec<(u64, u64)> = self
            .read_table(entry)?
            .into_iter()
            .filter_map(|t| match t {
                TableEntry::Data(off) => Some((off, 1)),
                _ => None,
            })
            .collect();
        out.push((
            entry.table_offset,
            ceil_clusters(u64::from(entry.table_size) * 8, cs),
        ));
        Ok(out)
    }

    /// Writes a table of `table_size` all-ones entries (QEMU's
    /// `BME_TABLE_ENTRY_FLAG_ALL_ONES`, which it loads as a cluster of set bits) into fresh
    /// clusters, in chunks of at most [`ALL_ONES_CHUNK`] bytes, and returns its offset: a
    /// bitmap with every bit set and no data cluster. The allocator hands out only
    /// refcount-0 clusters, so until a commit names the table it is a leak, never a
    /// cluster anything else references.
    ///
    /// # Errors
    /// As `Image::alloc_clusters`; I/O.
    pub(super) fn write_all_ones_table(&mut self, table_size: u32) -> Result<u64> {
        let cs = self.image.cluster_size();
        let cb = self.image.header().cluster_bits;
        let len = u64::from(table_size).saturating_mul(8);
        let off = self.image.alloc_clusters(ceil_clusters(len, cs))?;
        let per_chunk = (ALL_ONES_CHUNK / 8).min(u64::from(table_size)) as usize;
        let chunk = encode_table(&vec![TableEntry::Ones; per_chunk], cb)?;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(chunk.len() as u64);
            self.image
                .write_at(&chunk[..n as usize], off.saturating_add(at))?;
            at += n;
        }
        Ok(off)
    }

    /// Writes `bm` into fresh clusters: one data cluster per table entry with a set bit
    /// (zero-filled past the valid bytes), then the table. Returns the table offset. `bm`
    /// has this store's region size.
    pub(super) fn write_bitmap(&mut self, bm: &DirtyBitmap, stats: &mut FlushStats) -> Result<u64> {
        let cs = self.image.cluster_size();
        let cb = self.image.header().cluster_bits;
        let per_cluster = regions_per_cluster(cs, bm)?;
        let clusters = bm.serialized_len().div_ceil(cs);
        let mut entries = Vec::with_capacity(clusters as usize);
        let mut buf = vec![0u8; cs as usize];
        for c in 0..clusters {
            buf.fill(0);
            let first = c * per_cluster;
            let mut at = 0usize;
            for r in first..(first + per_cluster).min(bm.region_count()) {
                let rl = bm.region_len(r) as usize;
                bm.serialize_region(r, &mut buf[at..at + rl])?;
                at += rl;
            }
            if buf.iter().all(|&b| b == 0) {
                entries.push(TableEntry::Zeroes);
            } else {
                let off = self.image.alloc_clusters(1)?;
                self.image.write_at(&buf, off)?;
                entries.push(TableEntry::Data(off));
                stats.clusters_allocated += 1;
                stats.bytes_written += cs;
            }
        }
        stats.regions += bm.region_count();
        let table = encode_table(&entries, cb)?;
        let off = self
            .image
            .alloc_clusters(ceil_clusters(table.len() as u64, cs))?;
        self.image.write_at(&table, off)?;
        stats.bytes_written += table.len() as u64;
        Ok(off)
    }

    /// The directory commit every change goes through:
    /// 1. the new directory into fresh clusters;
    /// 2. refcounts flushed (new clusters durable as allocated);
    /// 3. the header with the new extension (or none) and autoclear bit 0, then a barrier:
    ///    the commit point;
    /// 4. the old directory and `frees` released, refcounts flushed.
    ///
    /// A crash before 3 leaves the old image plus leaked new clusters; after 3, the new
    /// image plus leaked old clusters until 4 is durable.
    pub(super) fn commit(&mut self, entries: Vec<DirEntry>, frees: Vec<(u64, u64)>) -> Result<()> {
        self.commit_as(entries, frees, true)
    }

    /// [`commit`](Self::commit), with autoclear bit 0 left clear in the header write when
    /// `trusted` is false: the caller cleared it durably before and sets it afterwards.
    pub(super) fn commit_as(
        &mut self,
        entries: Vec<DirEntry>,
        frees: Vec<(u64, u64)>,
        trusted: bool,
    ) -> Result<()> {
        let geo = self.geometry()?;
        let prepared = self.prepare_commit(entries, frees, &geo)?;
        self.finish_commit(prepared, trusted)
    }

    /// Steps 1 and 2 of [`commit`](Self::commit), everything before the header write: the
    /// new directory (its table sizes checked against `geo`) written into fresh clusters,
    /// the clusters to free after the commit point decided, refcounts flushed. A failure
    /// here leaves the image as it was, plus leaked clusters. `resize` runs it before it
    /// clears autoclear bit 0, so that a full disk or a read error never untrusts a bitmap.
    pub(super) fn prepare_commit(
        &mut self,
        entries: Vec<DirEntry>,
        mut frees: Vec<(u64, u64)>,
        geo: &ImageGeometry,
    ) -> Result<PreparedCommit> {
        self.log_whole();
        let cs = geo.cluster_size();
        if let Some((off, size)) = self.dir {
            frees.push((off, ceil_clusters(size, cs)));
        }
        // Decided before anything is allocated or written, so that nothing after the
        // commit point can fail on bad metadata.
        self.ensure_header_fits(u32::try_from(entries.len()).unwrap_or(u32::MAX))?;
        let frees = self.safe_frees(frees)?;
        let new_dir = if entries.is_empty() {
            None
        } else {
            let bytes = encode_directory(&entries, geo)?;
            let off = self
                .image
                .alloc_clusters(ceil_clusters(bytes.len() as u64, cs))?;
            self.image.write_at(&bytes, off)?;
            Some((off, bytes.len() as u64))
        };
        self.image.flush_refcounts()?;
        Ok(PreparedCommit {
            entries,
            new_dir,
            frees,
        })
    }

    /// Steps 3 and 4 of [`commit`](Self::commit) after
    /// [`prepare_commit`](Self::prepare_commit): the header write (the commit point), then
    /// the frees.
    pub(super) fn finish_commit(&mut self, prepared: PreparedCommit, trusted: bool) -> Result<()> {
        let PreparedCommit {
            entries,
            new_dir,
            frees,
        } = prepared;
        let area = self.image.area_mut();
        match new_dir {
            Some((off, size)) => {
                area.bitmaps = Some(BitmapsExtension {
                    nb_bitmaps: entries.len() as u32,
                    directory_size: size,
                    directory_offset: off,
                });
                if trusted {
                    area.header.autoclear_features |= AUTOCLEAR_BITMAPS;
                }
            }
            None => {
                area.bitmaps = None;
                area.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            }
        }
        self.image.write_header()?;
        // Committed: the new directory is the one in force, whatever happens next.
        self.dir = new_dir;
        for off in frees {
            self.image.free_clusters(off, 1)?;
        }
        self.image.flush_refcounts()?;
        // Stale entries vanished with the header rewrite; the others match `entries`. A
        // kept table goes with its bitmap while the entry still names it: a commit writes
        // only fresh clusters (a new directory, new tables) before its header write and
        // frees only what the new directory no longer names, so the table at that offset
        // is the one kept.
        let mut carried = Vec::new();
        for e in &entries {
            let old = self.slots.live_mut(e.name.as_bytes());
            carried.push(old.map_or((None, None, false, None), |s| {
                let same_table =
                    s.entry.table_offset == e.table_offset && s.entry.table_size == e.table_size;
                let table = if same_table { s.table.take() } else { None };
                (s.mem.take(), s.parked.take(), s.inconsistent, table)
            }));
        }
        self.slots = entries
            .into_iter()
            .zip(carried)
            .map(|(entry, (mem, parked, inconsistent, table))| Slot {
                entry,
                inconsistent,
                stale: false,
                mem,
                parked,
                table,
            })
            .collect();
        self.publish();
        Ok(())
    }

    /// Rewrites the directory in place with `entries` (same offset and size: only flags
    /// differ), QEMU's `update_ext_header_and_dir_in_place`:
    /// 1. autoclear bit 0 cleared in cluster 0, barrier: from here every bitmap is
    ///    untrusted, so a torn or half-written directory is never read as clean;
    /// 2. the directory in place, barrier;
    /// 3. autoclear bit 0 set, barrier: the new flags are in force.
    fn write_directory_in_place(&mut self, entries: Vec<DirEntry>) -> Result<()> {
        let (dir_off, dir_size) = self
            .dir
            .ok_or_else(|| internal!("consistent bitmaps without a directory"))?;
        let geo = self.geometry()?;
        let bytes = encode_directory(&entries, &geo)?;
        if bytes.len() as u64 != dir_size {
            return Err(internal!("in-place directory changed size"));
        }
        self.image.area_mut().header.autoclear_features &= !AUTOCLEAR_BITMAPS;
        self.image.write_header()?;
        self.image.write_at(&bytes, dir_off)?;
        self.image.sync()?;
        self.image.area_mut().header.autoclear_features |= AUTOCLEAR_BITMAPS;
        self.image.write_header()?;
        for (s, e) in self.slots.iter_mut().filter(|s| !s.stale).zip(entries) {
            s.set_entry(e);
        }
        Ok(())
    }

    /// Rewrites only the flags of directory entries in place, with one barrier, when a torn
    /// write cannot mix an entry: `entries` must differ from the directory on disk only in
    /// flags, and every entry's changed bytes must lie in one 512-byte sector of the file.
    /// The flags word is 4 bytes at offset 12 of an entry, entries are 8-byte aligned and
    /// the directory starts on a cluster, so the word never straddles a sector; a sector
    /// lands whole or not at all (the crash model of `docs/CRASH-CONSISTENCY.md`, the same
    /// one the header commit relies on). So after a crash every entry reads as wholly old or
    /// wholly new, never a mix, and the caller need not clear autoclear bit 0 around it.
    /// Falls back to [`write_directory_in_place`](Self::write_directory_in_place) (three
    /// barriers) when the check fails.
    ///
    /// The caller must have made durable everything a new entry vouches for before this
    /// (for clearing `in_use`: every data write), since this write may land at any moment.
    pub(super) fn write_flags_in_place(&mut self, entries: Vec<DirEntry>) -> Result<()> {
        let (dir_off, _) = self
            .dir
            .ok_or_else(|| internal!("consistent bitmaps without a directory"))?;
        let geo = self.geometry()?;
        let old_entries = self.current_entries();
        let old = encode_directory(&old_entries, &geo)?;
        let new = encode_directory(&entries, &geo)?;
        if !flags_only_change(dir_off, &old_entries, &entries, &old, &new) {
            return self.write_directory_in_place(entries);
        }
        self.image.write_at(&new, dir_off)?;
        self.image.sync()?;
        for (s, e) in self.slots.iter_mut().filter(|s| !s.stale).zip(entries) {
            s.set_entry(e);
        }
        Ok(())
    }
}

/// Whether replacing directory `old` (entries `old_e`) by `new` (entries `new_e`) at file
/// offset `dir_off` changes only flags, with each entry's changed bytes inside one
/// 512-byte sector, so that any sector-torn mix of the two reads every entry as wholly
/// old or wholly new.
pub(super) fn flags_only_change(
    dir_off: u64,
    old_e: &[DirEntry],
    new_e: &[DirEntry],
    old: &[u8],
    new: &[u8],
) -> bool {
    const SECTOR: u64 = 512;
    if old.len() != new.len() || old_e.len() != new_e.len() {
        return false;
    }
    let same_but_flags = old_e.iter().zip(new_e).all(|(a, b)| {
        a.name == b.name
            && a.table_offset == b.table_offset
            && a.table_size == b.table_size
            && a.granularity_bits == b.granularity_bits
    });
    if !same_but_flags {
        return false;
    }
    let mut at = 0u64;
    for e in old_e {
        let end = at.saturating_add(e.encoded_len());
        let mut sector = None;
        for i in at..end.min(old.len() as u64) {
            if old[i as usize] != new[i as usize] {
                let s = dir_off.saturating_add(i) / SECTOR;
                if *sector.get_or_insert(s) != s {
                    return false;
                }
            }
        }
        at = end;
    }
    true
}

/// A directory commit between [`BitmapStore::prepare_commit`] and
/// [`BitmapStore::finish_commit`]: the new directory on disk and counted, nothing named yet.
#[derive(Debug)]
pub(super) struct PreparedCommit {
    entries: Vec<DirEntry>,
    new_dir: Option<(u64, u64)>,
    frees: Vec<u64>,
}

impl PreparedCommit {
    /// Whether the commit names any bitmap (a directory), or removes the extension.
    pub(super) fn names_bitmaps(&self) -> bool {
        self.new_dir.is_some()
    }
}

/// When the walk a preflight judges by was made.
#[derive(Debug, Clone, Copy)]
enum Counted {
    /// Just now, with this handle holding the image: its counts are the image's.
    Now,
    /// Earlier, beside another writer (a preload): a cluster allocated since is not counted.
    Before,
}
