//! [`BitmapStore::resize`]: change the virtual disk size of a bitmap-only image, with every
//! bitmap resized the way QEMU resizes it (`qemu-img resize`, `block_resize`).
//!
//! What QEMU does (measured with `qemu-img resize` 10.0 on images holding persistent
//! bitmaps; `tests/qemu_interop.rs` compares our result with it):
//! - every bitmap keeps its name, granularity and `auto` flag, and gets the table size the
//!   new disk size needs;
//! - growing keeps every bit and adds *clean* bits for the new area (`hbitmap_truncate`);
//!   ours are *dirty* there (below);
//! - shrinking drops the bits past the new end (the granule that straddles it keeps its
//!   bit); `qemu-img` asks for `--shrink`, a guard of the command line, not of the format;
//! - the L1 table grows to exactly the entries the new size needs, in fresh clusters
//!   (`qcow2_grow_l1_table`), and never shrinks;
//! - the size must be a multiple of 512, and the resize is refused while any bitmap is
//!   inconsistent (`qcow2_truncate_bitmaps_check`).
//!
//! The new area is dirty, where QEMU makes it clean: a grown disk reads zeros there, but an
//! older backup need not. The area may have been inside the disk before a shrink since the
//! bitmap's checkpoint (a backup taken then holds the data it had, which the disk lost with
//! the shrink and reads as zeros now), and a device may hold old data there (an extended
//! logical volume that was not zeroed). Neither can be told from the image, so the doubt
//! resolves to dirty: a backup copies the grown area once more. Over a backing file the
//! backing file's data would show through (QEMU zero-fills it, a guest-data write), so
//! growing such an image is refused.
//!
//! QEMU writes the new size into the header first and stores the bitmaps at close, with
//! `in_use` protecting them in between. We commit the new size, the L1 table and the new
//! directory in one header write instead. When the bitmaps extension lies in the first
//! sector of cluster 0 (clusters up to 4 KiB), a crash leaves the old image or the new one,
//! both consistent. When it lies past the first sector, autoclear bit 0 is cleared durably
//! around the commit, so a crash in between leaves every bitmap inconsistent (all dirty),
//! never a torn mix that loads as clean (write order and crash table in
//! `docs/CRASH-CONSISTENCY.md`, "`resize`").

use crate::bitmap::DirtyBitmap;
use crate::error::{invalid_input, Error, Result, StateProblem};
use crate::flush::FlushStats;
use crate::format::extension::{EXT_BITMAPS, EXT_END};
use crate::format::header::{AUTOCLEAR_BITMAPS, MAX_L1_BYTES};
use crate::format::table_size;
use crate::image::read_metadata;
use crate::storage::{Storage, SECTOR_SIZE};

use super::{ceil_clusters, BitmapStore};

impl<S: Storage> BitmapStore<S> {
    /// Resizes the virtual disk to `new_disk_size` bytes and every bitmap with it, as
    /// `qemu-img resize` (with `--shrink` when smaller) does: bits below the smaller of the
    /// two sizes are kept, bits past a shrunk end are dropped; a grown area is dirty, where
    /// QEMU makes it clean (it may have been inside the disk before a shrink, and an older
    /// backup may hold data there that the disk no longer reads: the module docs). The
    /// image must hold no guest data (a bitmap-only image, see
    /// [`create`](Self::create)).
    ///
    /// Write order: each bitmap whole into fresh data clusters and a fresh table; a larger
    /// L1 table into fresh clusters when the new size needs one; a fresh directory;
    /// refcounts flushed; one header write with the new size, L1 table and directory (the
    /// commit point); then the old directory, tables, data and L1 table freed. A crash
    /// leaves the old image or the new one, at worst with leaked clusters; when the bitmaps
    /// extension lies past the first sector of cluster 0, autoclear bit 0 is cleared
    /// durably around the commit, and a crash in that window leaves every bitmap
    /// inconsistent instead (never falsely clean).
    ///
    /// The store must be inactive and hold no in-memory bitmaps from an incremental
    /// [`inactivate`](Self::inactivate): a [`Tracker`](crate::Tracker) may still mark those
    /// for the old size, and their marks would not reach a resized disk. Reopen the image
    /// first. The same size writes nothing.
    ///
    /// # Errors
    /// - [`Error::WrongState`]: the store is active ([`StateProblem::Active`]) or keeps
    ///   parked bitmaps ([`StateProblem::ParkedBitmaps`]). Nothing is written.
    /// - [`Error::InvalidInput`]: the size is not a multiple of 512, is 0 while bitmaps
    ///   exist, needs an L1 table above 32 MiB, or makes a bitmap exceed QEMU's limits.
    ///   Nothing is written.
    /// - [`Error::Inconsistent`]: a bitmap is inconsistent (QEMU refuses too); remove it
    ///   first. Nothing is written.
    /// - [`Error::Unsupported`]: the image has guest data, snapshots or an external data
    ///   file, or a backing file and the disk would grow (the grown area would show the
    ///   backing file's data, which QEMU zero-fills), or the bitmaps at the new size would
    ///   add up to more than [`ACTIVE_MEMORY_LIMIT`](super::ACTIVE_MEMORY_LIMIT) (the
    ///   resize builds each, and no activation could hold them). Nothing is written.
    /// - [`Error::ReadOnly`], [`Error::Poisoned`], [`Error::Corrupt`] for a bad table, I/O.
    ///   An I/O error poisons the store; the disk then holds the old or the new image, or
    ///   (a failure inside the header writes at clusters above 4 KiB, see
    ///   docs/CRASH-CONSISTENCY.md) every bitmap untrusted, never one loaded wrong. A
    ///   failure before them (the file cannot grow, a read fails) leaves the old image with
    ///   its bitmaps trusted.
    pub fn resize(&mut self, new_disk_size: u64) -> Result<()> {
        self.ensure_writable()?;
        self.reclaimed(|s| s.resize_reclaimed(new_disk_size))
    }

    fn resize_reclaimed(&mut self, new_disk_size: u64) -> Result<()> {
        if self.active {
            return Err(Error::WrongState(StateProblem::Active));
        }
        if self.slots.iter().any(|s| s.parked.is_some()) {
            return Err(Error::WrongState(StateProblem::ParkedBitmaps));
        }
        if !new_disk_size.is_multiple_of(512) {
            return Err(invalid_input!(
                "the new size {new_disk_size} must be a multiple of 512"
            ));
        }
        if let Some(s) = self.slots.iter().find(|s| s.inconsistent) {
            return Err(Error::Inconsistent {
                name: s.entry.name.clone(),
            });
        }
        let header = self.image.header().clone();
        if header.nb_snapshots > 0 || header.has_data_file() {
            return Err(Error::Unsupported(
                "resize handles images without snapshots or an external data file".to_string(),
            ));
        }
        if new_disk_size == self.disk_size() && header.size == new_disk_size {
            return Ok(());
        }
        // Over a backing file, the grown area would show the backing file's data: QEMU
        // zero-fills it (`bdrv_co_truncate`), which is guest data this crate does not
        // write.
        if new_disk_size > header.size && self.image.area().backing_file.is_some() {
            return Err(Error::Unsupported(
                "growing an image with a backing file: QEMU zero-fills the grown area over \
                 the backing file's data (use qemu-img resize)"
                    .to_string(),
            ));
        }
        if new_disk_size == 0 && !self.slots.is_empty() {
            return Err(invalid_input!("a 0-byte disk cannot hold a bitmap"));
        }
        let cs = self.image.cluster_size();
        let l1_len = u64::from(header.l1_size) * 8;
        let l1 = read_metadata(
            self.image.storage(),
            "L1 table",
            header.l1_table_offset,
            l1_len,
        )?;
        if l1.iter().any(|&b| b != 0) {
            return Err(Error::Unsupported(
                "resize handles bitmap-only images; this one holds guest data".to_string(),
            ));
        }
        let mut grown = header.clone();
        grown.size = new_disk_size;
        let needed = grown.l1_entries_needed();
        if needed.saturating_mul(8) > MAX_L1_BYTES {
            return Err(invalid_input!(
                "a disk of {new_disk_size} bytes needs an L1 table above 32 MiB"
            ));
        }
        let new_l1 = u32::try_from(needed)
            .ok()
            .filter(|&n| n > header.l1_size)
            .map(|n| (n, u64::from(n) * 8));
        let mut entries = self.current_entries();
        for e in &mut entries {
            e.table_size = table_size(new_disk_size, e.granularity_bits, cs)?;
        }
        // The resize builds every bitmap at the new size, one after another (and an image
        // whose bitmaps at that size add up past the limit could not be activated after):
        // refused, as an activation or a load of them all is, before anything is written.
        let at_new_size = entries
            .iter()
            .map(|e| {
                new_disk_size
                    .div_ceil(1u64 << e.granularity_bits)
                    .div_ceil(8)
            })
            .fold(0u64, u64::saturating_add);
        if at_new_size > super::ACTIVE_MEMORY_LIMIT {
            return Err(Error::Unsupported(format!(
                "at {new_disk_size} bytes the bitmaps would take {at_new_size} bytes, more \
                 than the limit of {}",
                super::ACTIVE_MEMORY_LIMIT
            )));
        }
        // Cluster 0 as this crate encodes it must hold the header (the commit rewrites it),
        // which an image laid out otherwise may not allow: decided before anything is
        // allocated. Every table decodes and every data cluster lies in the file (the
        // preflight's walk reports anything else as corruption), so nothing below fails on
        // bad metadata before its first write: a refusal writes nothing.
        self.ensure_header_fits(u32::try_from(entries.len()).unwrap_or(u32::MAX))?;
        self.preflight()?;
        // Every input is valid: from here on, only I/O can fail, and the
        // in-memory header may be ahead of the disk, so any failure poisons the store.
        let r = self.resize_commit(new_disk_size, entries, new_l1);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn resize_commit(
        &mut self,
        new_disk_size: u64,
        mut entries: Vec<crate::format::DirEntry>,
        new_l1: Option<(u32, u64)>,
    ) -> Result<()> {
        let cs = self.image.cluster_size();
        // First what only leaks until the commit names it: each bitmap's new table and
        // data, and the new L1 table, in fresh clusters. A failure here (a full disk when
        // the file grows, a read error) leaves the image as it was, its bitmaps trusted.
        let mut frees = Vec::new();
        for (i, e) in entries.iter_mut().enumerate() {
            let old = self.slots[i].entry.clone();
            frees.extend(self.owned_clusters(&old)?);
            let loaded = self.load_disk(&old)?;
            let resized = DirtyBitmap::with_region_size(
                new_disk_size,
                1u64 << old.granularity_bits,
                self.region_size(),
            )?;
            for (off, len) in loaded.dirty_extents() {
                if off < new_disk_size {
                    resized.mark_dirty(off, len.min(new_disk_size - off));
                }
            }
            // The grown area, from the granule that straddles the old end on.
            let old_size = loaded.disk_size();
            if new_disk_size > old_size {
                resized.mark_dirty(old_size, new_disk_size - old_size);
            }
            drop(loaded);
            e.table_offset = self.write_bitmap(&resized, &mut FlushStats::default())?;
        }
        let moved_l1 = match new_l1 {
            Some((l1_size, l1_len)) => {
                let n = ceil_clusters(l1_len, cs);
                let off = self.image.alloc_clusters(n)?;
                // The old table is all zeros (checked), so the new one is too.
                self.image.write_at(&vec![0u8; (n * cs) as usize], off)?;
                let old = self.image.header();
                frees.push((
                    old.l1_table_offset,
                    ceil_clusters(u64::from(old.l1_size) * 8, cs),
                ));
                Some((off, l1_size))
            }
            None => None,
        };
        // The new directory too (its table sizes checked against the new size), and every
        // refcount flushed: from here on nothing is allocated or read.
        let mut grown = self.image.header().clone();
        grown.size = new_disk_size;
        let prepared = self.prepare_commit(entries, frees, &grown.geometry()?)?;
        // The commit's header write changes the size and L1 fields (first sector) and the
        // bitmaps extension. If the extension lies past the first sector (after QEMU's
        // feature-name table, for clusters above 4 KiB), a torn write could pair the new
        // size with the old directory, or the reverse, and a table of the same length would
        // then load bits cut at the wrong size as consistent. So autoclear bit 0 is cleared
        // durably first (the header as it is on disk, only the first sector changes), the
        // commit keeps it clear, and a last header write sets it (again only the first
        // sector): a crash in between leaves every bitmap untrusted, never falsely clean.
        let bracket = prepared.names_bitmaps()
            && bitmaps_extension_end(&self.image.area().encode()?) > SECTOR_SIZE;
        if bracket {
            self.image.area_mut().header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            self.image.write_header()?;
        }
        if let Some((off, l1_size)) = moved_l1 {
            self.image.move_l1(off, l1_size);
        }
        // The commit's header write makes the size durable together with the new
        // directory and L1 table.
        self.image.area_mut().header.size = new_disk_size;
        self.finish_commit(prepared, !bracket)?;
        if bracket {
            self.image.area_mut().header.autoclear_features |= AUTOCLEAR_BITMAPS;
            self.image.write_header()?;
        }
        Ok(())
    }
}

/// Where the bitmaps extension's data ends in an encoded cluster 0 (0 when there is none).
pub(super) fn bitmaps_extension_end(area: &[u8]) -> u64 {
    let be32 = |at: usize| {
        area.get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_be_bytes)
    };
    let mut at = be32(100).unwrap_or(0) as usize;
    while let (Some(kind), Some(len)) = (be32(at), be32(at + 4)) {
        let data = at + 8;
        if kind == EXT_BITMAPS {
            return (data + len as usize) as u64;
        }
        if kind == EXT_END {
            break;
        }
        at = data + (len as usize).div_ceil(8) * 8;
    }
    0
}
