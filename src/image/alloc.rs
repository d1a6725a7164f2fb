//! A first-fit cluster allocator over the qcow2 refcount structures.
//!
//! # Invariants
//! - The in-memory reftable and cached refblocks are the image's refcounts as they will be
//!   after the next [`Refcounts::flush`]. Every change is buffered: blocks are marked dirty
//!   and reach storage only in `flush`, so callers control when refcounts become durable.
//! - A cluster inside the file is handed out only if its refcount is 0 *and* it is not one
//!   of the structures the header names (cluster 0, the L1 table, the reftable) or a
//!   refblock; the second test protects against images whose refcounts are already wrong.
//!   A cluster past the end of the file holds nothing and is handed out whatever a
//!   (corrupt) refblock says of it, its refcount set to 1; every writing operation's
//!   preflight walk has refused an image where a refcount disagrees with the references
//!   (`docs/CRASH-CONSISTENCY.md`, "Ownership and frees").
//! - New refblocks are placed at the start of the run that needs them, so in the common
//!   case a refblock describes itself, as QEMU's do (`alloc_refcount_block`).
//!
//! # Crash reasoning
//! - `flush` writes dirty refblocks, then a barrier, then reftable entries that point to new
//!   blocks, then a barrier. A reftable entry can therefore never reach the disk before the
//!   block it points to (a freshly allocated cluster may hold stale bytes).
//! - Callers flush refcounts *before* the header write that makes new clusters reachable,
//!   so a crash leaves at worst clusters with a refcount and no reference: leaks, never a
//!   reference to a cluster with refcount 0.
//! - Growing the reftable writes new blocks and the new table into clusters nobody
//!   references, flushes every dirty block, and only then switches the header's 12-byte
//!   reftable pointer (one sector, one write). The old table is freed afterwards.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::error::{internal, Corruption, Error, Result};
use crate::format::refcount::{
    decode_reftable, encode_reftable, entries_per_block, get_refcount, set_refcount,
    REFTABLE_ENTRY_LEN,
};
use crate::format::Header;
use crate::storage::{Storage, StorageExt};

/// QEMU's `QCOW_MAX_REFTABLE_SIZE`: the refcount table is at most 8 MiB.
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Header offset of refcount_table_offset (u64) followed by refcount_table_clusters (u32).
pub(super) const HEADER_REFTABLE_FIELDS: usize = 48;

/// The refcount state of one image: reftable, a cache of refblocks, and the free hint.
#[derive(Debug)]
pub(crate) struct Refcounts {
    cluster_bits: u32,
    order: u32,
    /// log2 of the refcount entries per refblock.
    block_shift: u32,
    reftable_offset: u64,
    reftable_clusters: u64,
    reftable: Vec<Option<u64>>,
    dirty_entries: BTreeSet<u64>,
    blocks: HashMap<u64, Vec<u8>>,
    dirty_blocks: BTreeSet<u64>,
    /// Cluster indexes holding refblocks.
    block_clusters: HashSet<u64>,
    /// Cluster ranges `[start, end)` never handed out: cluster 0 and the L1 table.
    reserved: Vec<(u64, u64)>,
    /// Lowest cluster that may be free.
    hint: u64,
    /// Barriers issued so far (for flush statistics).
    pub(crate) syncs: super::Barriers,
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a.div_ceil(b.max(1))
}

impl Refcounts {
    /// Reads the reftable named by `header`. Blocks are read lazily.
    ///
    /// # Errors
    /// [`Corruption::PastEnd`] if the table lies past the end of the file,
    /// [`Corruption::RefcountTableEntry`] for a bad entry, or an I/O error.
    pub(crate) fn load<S: Storage + ?Sized>(storage: &S, header: &Header) -> Result<Self> {
        let cs = header.cluster_size();
        let len = u64::from(header.refcount_table_clusters)
            .checked_mul(cs)
            .filter(|&l| l <= MAX_REFTABLE_BYTES)
            .ok_or(Corruption::TableGeometry {
                table: "refcount table",
                offset: header.refcount_table_offset,
                entries: u64::from(header.refcount_table_clusters),
            })?;
        let bytes = read_metadata(storage, "refcount table", header.refcount_table_offset, len)?;
        let reftable = decode_reftable(&bytes, header.cluster_bits)?;
        // Each refblock must be a cluster of its own: two entries naming one block would
        // let a crafted image make the block cache hold a copy per entry, far more memory
        // than the file justifies, and every refcount change would land twice.
        let mut block_clusters = HashSet::new();
        for off in reftable.iter().flatten() {
            if !block_clusters.insert(off >> header.cluster_bits) {
                return Err(Corruption::Refcount {
                    cluster: *off,
                    what: "two refcount table entries name the same refcount block",
                }
                .into());
            }
        }
        Self::with_reftable(header, reftable, block_clusters)
    }

    /// The refcounts of an image whose reftable was not read (a read-only open of a
    /// reftable [`load`](Self::load) refuses): no block, so nothing is ever allocated from
    /// them. [`Image`](super::Image) answers every refcount question of such an image with
    /// the load's error instead of asking these.
    pub(crate) fn unread(header: &Header) -> Result<Self> {
        Self::with_reftable(header, Vec::new(), HashSet::new())
    }

    fn with_reftable(
        header: &Header,
        reftable: Vec<Option<u64>>,
        block_clusters: HashSet<u64>,
    ) -> Result<Self> {
        let cs = header.cluster_size();
        let per_block = entries_per_block(header.cluster_bits, header.refcount_order)?;
        let l1_len = u64::from(header.l1_size).saturating_mul(8);
        let l1_start = header.l1_table_offset >> header.cluster_bits;
        let mut reserved = vec![(0, 1)];
        if l1_len > 0 {
            reserved.push((l1_start, l1_start.saturating_add(ceil_div(l1_len, cs))));
        }
        Ok(Self {
            cluster_bits: header.cluster_bits,
            order: header.refcount_order,
            block_shift: per_block.trailing_zeros(),
            reftable_offset: header.refcount_table_offset,
            reftable_clusters: u64::from(header.refcount_table_clusters),
            reftable,
            dirty_entries: BTreeSet::new(),
            blocks: HashMap::new(),
            dirty_blocks: BTreeSet::new(),
            block_clusters,
            reserved,
            hint: 0,
            syncs: super::Barriers::default(),
        })
    }

    fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Guards the L1 table at `offset` (`len` bytes) instead of the current one: from now on
    /// the old table is an ordinary cluster run that can be freed, and the new one is never
    /// handed out or freed.
    pub(crate) fn move_l1(&mut self, offset: u64, len: u64) {
        let start = offset >> self.cluster_bits;
        self.reserved = vec![(0, 1)];
        if len > 0 {
            self.reserved.push((
                start,
                start.saturating_add(ceil_div(len, self.cluster_size())),
            ));
        }
    }

    /// The reftable's byte offset and its size in clusters (as the header must say).
    pub(crate) fn reftable_location(&self) -> (u64, u64) {
        (self.reftable_offset, self.reftable_clusters)
    }

    /// Whether the reftable and every cached refblock with nothing waiting for
    /// [`flush`](Self::flush) still hold on disk what this cache holds: `false` once
    /// another writer allocated or freed a cluster they count, so that the cache would
    /// hand out or free clusters by stale counts. Blocks not cached are read fresh when
    /// needed, so they cannot be stale. Reads only.
    ///
    /// # Errors
    /// I/O, or a table or block past the end of the file.
    pub(crate) fn cache_matches_disk(&self, storage: &(impl Storage + ?Sized)) -> Result<bool> {
        if self.dirty_entries.is_empty() {
            let len = self.reftable_clusters << self.cluster_bits;
            let bytes = read_metadata(storage, "refcount table", self.reftable_offset, len)?;
            if decode_reftable(&bytes, self.cluster_bits)? != self.reftable {
                return Ok(false);
            }
        }
        for (index, block) in &self.blocks {
            if self.dirty_blocks.contains(index) {
                continue;
            }
            let Some(Some(offset)) = usize::try_from(*index)
                .ok()
                .and_then(|i| self.reftable.get(i))
                .copied()
            else {
                return Ok(false);
            };
            let disk = read_metadata(storage, "refcount block", offset, self.cluster_size())?;
            if &disk != block {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether nothing is waiting for [`flush`](Self::flush).
    pub(crate) fn is_clean(&self) -> bool {
        self.dirty_blocks.is_empty() && self.dirty_entries.is_empty()
    }

    /// Whether cluster index `cluster` holds one of the image's own structures this cache
    /// knows of: cluster 0, the active L1 table, the reftable or a refblock. Never handed
    /// out, whatever its refcount says.
    pub(crate) fn is_reserved(&self, cluster: u64) -> bool {
        let rt_start = self.reftable_offset >> self.cluster_bits;
        let rt_end = rt_start.saturating_add(self.reftable_clusters);
        (rt_start..rt_end).contains(&cluster)
            || self.block_clusters.contains(&cluster)
            || self
                .reserved
                .iter()
                .any(|&(s, e)| (s..e).contains(&cluster))
    }

    fn block_for(
        &mut self,
        storage: &(impl Storage + ?Sized),
        index: u64,
    ) -> Result<Option<&mut Vec<u8>>> {
        let Some(Some(offset)) = usize::try_from(index)
            .ok()
            .and_then(|i| self.reftable.get(i))
            .copied()
        else {
            return Ok(None);
        };
        if !self.blocks.contains_key(&index) {
            let block = read_metadata(storage, "refcount block", offset, self.cluster_size())?;
            self.blocks.insert(index, block);
        }
        Ok(self.blocks.get_mut(&index))
    }

    /// The refcount of cluster index `cluster` (0 where no refblock covers it).
    pub(crate) fn get(&mut self, storage: &(impl Storage + ?Sized), cluster: u64) -> Result<u64> {
        let index = cluster >> self.block_shift;
        let slot = cluster & ((1u64 << self.block_shift) - 1);
        let order = self.order;
        match self.block_for(storage, index)? {
            Some(block) => Ok(get_refcount(block, order, slot)?),
            None => Ok(0),
        }
    }

    fn set(&mut self, storage: &(impl Storage + ?Sized), cluster: u64, value: u64) -> Result<()> {
        let index = cluster >> self.block_shift;
        let slot = cluster & ((1u64 << self.block_shift) - 1);
        let order = self.order;
        let at = cluster << self.cluster_bits;
        let block = self
            .block_for(storage, index)?
            .ok_or(Corruption::Refcount {
                cluster: at,
                what: "no refcount block covers the cluster",
            })?;
        set_refcount(block, order, slot, value)?;
        self.dirty_blocks.insert(index);
        Ok(())
    }

    fn is_free(&mut self, storage: &(impl Storage + ?Sized), cluster: u64) -> Result<bool> {
        Ok(!self.is_reserved(cluster) && self.get(storage, cluster)? == 0)
    }

    /// First cluster of the first run of `n` free clusters at or after the hint.
    ///
    /// Clusters past the end of the file hold nothing, so they count as free whatever a
    /// (corrupt) refblock says: the scan never runs further than the file plus `n`.
    fn find_free_run(&mut self, storage: &(impl Storage + ?Sized), n: u64) -> Result<u64> {
        let eof = ceil_div(storage.len()?, self.cluster_size());
        let mut start = self.hint;
        let mut len = 0u64;
        let mut c = self.hint;
        while len < n {
            let free = if c >= eof {
                !self.is_reserved(c)
            } else {
                self.is_free(storage, c)?
            };
            if free {
                if len == 0 {
                    start = c;
                }
                len += 1;
            } else {
                len = 0;
            }
            c = c
                .checked_add(1)
                .ok_or_else(|| Error::Unsupported("the image has no free clusters left".into()))?;
        }
        Ok(start)
    }

    /// Reftable indexes of the clusters `[start, start + n)` that have no refblock.
    fn missing_blocks(&self, start: u64, n: u64) -> Vec<u64> {
        let first = start >> self.block_shift;
        let last = start.saturating_add(n).saturating_sub(1) >> self.block_shift;
        (first..=last)
            .filter(|&i| {
                !matches!(
                    usize::try_from(i).ok().and_then(|i| self.reftable.get(i)),
                    Some(Some(_))
                )
            })
            .collect()
    }

    /// Allocates `n` contiguous clusters (first fit), sets their refcounts to 1 in memory
    /// and grows the file to cover them. Returns the byte offset of the first.
    ///
    /// # Errors
    /// [`Error::Internal`] for `n == 0` (no caller asks for it), [`Error::Unsupported`] if the
    /// reftable would exceed 8 MiB or the image the 64-bit offsets, corruption found in
    /// refcount blocks, or an I/O error.
    ///
    /// `header` is the image's in-memory header: when the reftable has to grow, the move is
    /// committed by rewriting its two reftable fields on disk, and `header` is updated in
    /// the same step, so the in-memory header never disagrees with the disk.
    pub(crate) fn alloc(
        &mut self,
        storage: &(impl Storage + ?Sized),
        header: &mut Header,
        n: u64,
    ) -> Result<u64> {
        if n == 0 {
            return Err(internal!("cannot allocate 0 clusters"));
        }
        let mut k = 0u64;
        loop {
            let span = n.saturating_add(k);
            let s = self.find_free_run(storage, span)?;
            let missing = self.missing_blocks(s, span);
            let table_len = self.reftable.len() as u64;
            if let Some(&max) = missing.iter().filter(|&&i| i >= table_len).max() {
                self.grow_reftable(storage, header, max.saturating_add(1))?;
                k = 0;
                continue;
            }
            let m = missing.len() as u64;
            if m > k {
                k = m;
                continue;
            }
            // Blocks first (at s..s+m), then the run: every range the run touches now has a
            // block, since `missing` was computed over the larger span.
            let cs = self.cluster_size();
            for (j, &index) in missing.iter().enumerate() {
                let cluster = s.saturating_add(j as u64);
                self.install_block(index, cluster);
            }
            for c in s..s.saturating_add(m).saturating_add(n) {
                self.set(storage, c, 1)?;
            }
            let end = s.saturating_add(m).saturating_add(n);
            self.hint = end;
            storage.grow_to(
                end.checked_mul(cs)
                    .ok_or_else(|| Error::Unsupported("image too large".into()))?,
            )?;
            return Ok(s.saturating_add(m) << self.cluster_bits);
        }
    }

    fn install_block(&mut self, index: u64, cluster: u64) {
        let cs = self.cluster_size();
        self.blocks.insert(index, vec![0u8; cs as usize]);
        if let Some(e) = usize::try_from(index)
            .ok()
            .and_then(|i| self.reftable.get_mut(i))
        {
            *e = Some(cluster << self.cluster_bits);
        }
        self.block_clusters.insert(cluster);
        self.dirty_entries.insert(index);
        self.dirty_blocks.insert(index);
    }

    /// Decrements the refcount of the `n` clusters at byte offset `offset`, in memory.
    ///
    /// # Errors
    /// [`Corruption::Refcount`] if one of them already has refcount 0, or it is a refcount
    /// structure; the clusters before it were freed.
    pub(crate) fn free(
        &mut self,
        storage: &(impl Storage + ?Sized),
        offset: u64,
        n: u64,
    ) -> Result<()> {
        let first = offset >> self.cluster_bits;
        for c in first..first.saturating_add(n) {
            self.refuse_structure(c)?;
            let v = self.get(storage, c)?;
            let v = v.checked_sub(1).ok_or(Corruption::Refcount {
                cluster: c << self.cluster_bits,
                what: "freeing a cluster whose refcount is already 0",
            })?;
            self.lower_cluster(storage, c, v)?;
        }
        Ok(())
    }

    /// Lowers the refcount of the cluster holding byte `offset` to `to`, which must be below
    /// it, in one step. A refcount structure (the reftable, a refblock) may be lowered to 1
    /// (a leaked reference to it, which `qemu-img check -r leaks` repairs too), never to 0:
    /// it stays in use.
    pub(crate) fn lower(
        &mut self,
        storage: &(impl Storage + ?Sized),
        offset: u64,
        to: u64,
    ) -> Result<()> {
        let c = offset >> self.cluster_bits;
        if to == 0 {
            self.refuse_structure(c)?;
        }
        if self.get(storage, c)? <= to {
            return Err(internal!("lowering a refcount to {to} or more"));
        }
        self.lower_cluster(storage, c, to)
    }

    /// Raises the refcount of the cluster holding byte `offset` to `to`, which must be above
    /// it, in memory: the repair of a refcount below its references that `qemu-img check
    /// -r all` makes. A failure changes nothing.
    ///
    /// # Errors
    /// [`Corruption::Refcount`] when no refcount block covers the cluster (a repair that
    /// needs one refuses rather than allocate it); [`Error::Internal`] if `to` is not above
    /// the current refcount; corruption or I/O reading the block.
    pub(crate) fn raise(
        &mut self,
        storage: &(impl Storage + ?Sized),
        offset: u64,
        to: u64,
    ) -> Result<()> {
        let c = offset >> self.cluster_bits;
        if self.get(storage, c)? >= to {
            return Err(internal!("raising a refcount to {to} or less"));
        }
        self.set(storage, c, to)
    }

    /// Refuses to lower the refcount of cluster `c` if it holds a refcount structure.
    fn refuse_structure(&self, c: u64) -> Result<()> {
        let rt_start = self.reftable_offset >> self.cluster_bits;
        if self.block_clusters.contains(&c)
            || (rt_start..rt_start.saturating_add(self.reftable_clusters)).contains(&c)
        {
            return Err(Corruption::Refcount {
                cluster: c << self.cluster_bits,
                what: "refusing to free a refcount structure",
            }
            .into());
        }
        Ok(())
    }

    /// Sets the refcount of cluster `c` to `v`, lower than it was (not 0 for a refcount
    /// structure: the callers refuse that).
    fn lower_cluster(&mut self, storage: &(impl Storage + ?Sized), c: u64, v: u64) -> Result<()> {
        self.set(storage, c, v)?;
        if v == 0 && c < self.hint {
            self.hint = c;
        }
        Ok(())
    }

    /// Writes every dirty refblock where the in-memory reftable places it (no barrier).
    fn write_dirty_blocks(&self, storage: &(impl Storage + ?Sized)) -> Result<()> {
        for &index in &self.dirty_blocks {
            let offset = usize::try_from(index)
                .ok()
                .and_then(|i| self.reftable.get(i))
                .copied()
                .flatten();
            if let (Some(offset), Some(block)) = (offset, self.blocks.get(&index)) {
                storage.write_all_at(block, offset)?;
            }
        }
        Ok(())
    }

    /// Writes every dirty refblock, then (after a barrier) every changed reftable entry,
    /// then syncs. Does nothing, not even a sync, when nothing is dirty.
    ///
    /// # Errors
    /// An I/O error; the dirty state is kept so the caller can poison the image.
    pub(crate) fn flush(&mut self, storage: &(impl Storage + ?Sized)) -> Result<()> {
        if self.is_clean() {
            return Ok(());
        }
        self.write_dirty_blocks(storage)?;
        if !self.dirty_entries.is_empty() {
            // The blocks must be durable before a reftable entry points at them.
            self.syncs.sync(storage)?;
            for &index in &self.dirty_entries {
                let entry = usize::try_from(index)
                    .ok()
                    .and_then(|i| self.reftable.get(i))
                    .copied()
                    .flatten()
                    .unwrap_or(0);
                let at = index
                    .checked_mul(REFTABLE_ENTRY_LEN as u64)
                    .and_then(|o| o.checked_add(self.reftable_offset))
                    .ok_or_else(|| internal!("reftable index {index} out of range"))?;
                storage.write_u64_be_at(at, entry)?;
            }
        }
        self.syncs.sync(storage)?;
        self.dirty_blocks.clear();
        self.dirty_entries.clear();
        Ok(())
    }

    /// Replaces the reftable with one of at least `min_entries` entries, placed at the end
    /// of the file with the refblocks that describe it (`qcow2_refcount_area`).
    fn grow_reftable(
        &mut self,
        storage: &(impl Storage + ?Sized),
        header: &mut Header,
        min_entries: u64,
    ) -> Result<()> {
        let cs = self.cluster_size();
        let per_cluster = cs / REFTABLE_ENTRY_LEN as u64;
        let tail = ceil_div(storage.len()?, cs).max(self.hint);
        let mut entries = min_entries.max(self.reftable.len() as u64);
        let (table_clusters, blocks) = loop {
            // 50% slack, whole clusters, as QEMU sizes a new table.
            entries =
                ceil_div(entries.saturating_mul(3) / 2, per_cluster).saturating_mul(per_cluster);
            if entries.saturating_mul(REFTABLE_ENTRY_LEN as u64) > MAX_REFTABLE_BYTES {
                return Err(Error::Unsupported(
                    "the refcount table would exceed 8 MiB".to_string(),
                ));
            }
            let tc = ceil_div(entries.saturating_mul(REFTABLE_ENTRY_LEN as u64), cs);
            let mut k = 0u64;
            let mut missing;
            loop {
                missing = self.missing_blocks(tail, k.saturating_add(tc));
                if missing.len() as u64 <= k {
                    break;
                }
                k = missing.len() as u64;
            }
            let last = missing.iter().copied().max().unwrap_or(0);
            if last < entries {
                break (tc, missing);
            }
        };
        let m = blocks.len() as u64;
        let old_offset = self.reftable_offset;
        let old_clusters = self.reftable_clusters;
        self.reftable.resize(entries as usize, None);
        for (j, &index) in blocks.iter().enumerate() {
            self.install_block(index, tail.saturating_add(j as u64));
        }
        let table_start = tail.saturating_add(m);
        for c in tail..table_start.saturating_add(table_clusters) {
            self.set(storage, c, 1)?;
        }
        let end = table_start.saturating_add(table_clusters);
        storage.grow_to(end.saturating_mul(cs))?;
        // 1. Every dirty block (new ones included), durable before anything points at it.
        self.write_dirty_blocks(storage)?;
        // 2. The new table, then a barrier.
        let new_offset = table_start << self.cluster_bits;
        let table = encode_reftable(&self.reftable, self.cluster_bits)?;
        storage.write_all_at(&table, new_offset)?;
        self.syncs.sync(storage)?;
        // 3. The commit: one 12-byte write inside the first sector of the header, encoded
        //    from the in-memory header it updates (the header's one owner is `Image`, which
        //    handed it in), so a live handle's header is the disk's.
        let clusters32 = u32::try_from(table_clusters)
            .map_err(|_| internal!("refcount table of {table_clusters} clusters"))?;
        let mut updated = header.clone();
        updated.refcount_table_offset = new_offset;
        updated.refcount_table_clusters = clusters32;
        let encoded = updated.encode()?;
        let fields = encoded
            .get(HEADER_REFTABLE_FIELDS..HEADER_REFTABLE_FIELDS + 12)
            .ok_or_else(|| internal!("header too short for the reftable fields"))?;
        storage.write_all_at(fields, HEADER_REFTABLE_FIELDS as u64)?;
        self.syncs.sync(storage)?;
        self.dirty_blocks.clear();
        self.dirty_entries.clear();
        self.reftable_offset = new_offset;
        self.reftable_clusters = table_clusters;
        *header = updated;
        // 4. The old table is now unreferenced; a crash before the next flush leaks it.
        self.free(storage, old_offset, old_clusters)?;
        Ok(())
    }
}

/// Reads a metadata structure after checking it lies inside the file.
pub(crate) fn read_metadata<S: Storage + ?Sized>(
    storage: &S,
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    check_in_file(what, offset, len, storage.len()?)?;
    storage.read_vec_at(offset, len)
}

/// [`Corruption::PastEnd`] when `len` bytes of `what` at `offset` pass the end of a file of
/// `file_len` bytes: the check [`read_metadata`] makes, for a caller reading into a buffer
/// of its own.
pub(crate) fn check_in_file(
    what: &'static str,
    offset: u64,
    len: u64,
    file_len: u64,
) -> Result<()> {
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(Corruption::PastEnd {
            what,
            offset,
            len,
            file_len,
        }
        .into());
    }
    Ok(())
}
