//! The write log of an active store ([`WriteLog`]), and how a [`Preloaded`] copy follows it.
//!
//! A reader that preloads the bitmaps of an image another process keeps writing (a
//! migration destination on shared storage) must otherwise read every cluster again once
//! the writer stops, inside the downtime. With the log it reads only the regions the writer
//! wrote since: the writer starts a log, the reader preloads after that start, and every
//! log the writer takes goes to the reader, which reads those regions again. Its copy then
//! equals the disk after the writer's last log, taken after its inactivate.
//!
//! Why the regions a log names are enough: a bitmap's bytes on disk change only through
//!
//! - a flush or a durable commit, which writes only the regions it took from the change
//!   maps (and the table entries of their clusters); every one of them is logged;
//! - a directory commit (add, remove, store, merge, clear or resize while inactive,
//!   QEMU's full rewrite), which may move a table or give it new clusters: the log
//!   then says *whole*, and the reader preloads again or reads everything.
//!
//! A flush that fails part-way makes the log whole too (it may have written regions it then
//! handed back). So a region no log names was not written after the log started, and a
//! preload read after the start holds it as the disk does. A log names a region as often
//! as it was written, never less; one more read costs a few microseconds.
//!
//! The reader checks what it can: each log carries the log's id and its sequence number
//! (a log missed or out of order ends the trust), each bitmap its table's offset (a table
//! that moved ends it for that bitmap), and the last log each bitmap's dirty count, which
//! must equal the count of the reader's copy. Whatever fails a check is read whole at the
//! activate, as without a log.

use super::durable_bits::DurableBits;
use super::{BitmapStore, Logging, Preloaded};
use std::collections::HashMap;
use std::sync::Arc;

use crate::bitmap::{ChangedRegions, DirtyBitmap};
use crate::error::Result;
use crate::flush::{FlushStats, Taken};
use crate::format::BitmapName;
use crate::storage::Storage;

pub use super::{LoggedBitmap, WriteLog};

impl<S: Storage> BitmapStore<S> {
    /// Starts (or starts again) a log of the regions this store writes on disk, and returns
    /// its id (random, never 0). A reader of the same image that loads after this returns
    /// can then follow the writes with [`Preloaded::apply`] instead of reading everything
    /// again. See the [module documentation](self).
    pub fn start_write_log(&mut self) -> u64 {
        let id = crate::rng::unique_u64().max(1);
        self.write_log = Some(Logging {
            id,
            seq: 0,
            whole: false,
            bitmaps: Vec::new(),
        });
        id
    }

    /// Ends the log, if one runs, without a last take: for a writer whose reader is gone
    /// (a migration cancelled before its stop). A log nobody takes would otherwise be kept
    /// up by every flush, a bitmap's entry for each new name, until the next start.
    pub fn stop_write_log(&mut self) {
        self.write_log = None;
    }

    /// Regions' worth of bytes a reader's [`Preloaded::apply`] of `log` reads: the
    /// header's sector, and for each bitmap it names that this store holds, its regions and
    /// its table (read whole); a name this store does not hold, its regions and a table of
    /// the size its regions imply.
    pub(crate) fn log_apply_reads(&self, log: &WriteLog) -> u64 {
        let cs = self.image.cluster_size();
        log.bitmaps.iter().fold(1u64, |n, b| {
            let entries = self
                .slots
                .position(b.name.as_bytes())
                .map(|i| u64::from(self.slots[i].entry.table_size))
                .unwrap_or_else(|| {
                    b.regions
                        .region_count()
                        .saturating_mul(b.region_size)
                        .div_ceil(cs)
                });
            n.saturating_add(super::region_reads(&b.regions, b.region_size, cs))
                .saturating_add(self.table_regions(entries))
        })
    }

    /// The regions written since the start of the log or its previous take, or `None` with
    /// no log running. On an inactive store it is the last take ([`WriteLog::last`]: it
    /// names every bitmap the store holds, with its dirty count) and it ends the log.
    pub fn take_write_log(&mut self) -> Option<WriteLog> {
        let log = self.write_log.as_mut()?;
        log.seq = log.seq.saturating_add(1);
        let mut out = WriteLog {
            id: log.id,
            seq: log.seq,
            whole: std::mem::take(&mut log.whole),
            last: !self.active,
            bitmaps: std::mem::take(&mut log.bitmaps),
        };
        if out.last {
            self.write_log = None;
            // Each name's first position (a directory may hold 65,535 bitmaps).
            let mut at: HashMap<BitmapName, usize> = HashMap::new();
            for (i, b) in out.bitmaps.iter().enumerate() {
                at.entry(b.name.clone()).or_insert(i);
            }
            for s in self.slots.iter().filter(|s| !s.stale) {
                let Some(m) = s.parked.as_ref() else { continue };
                let i = match at.get(&s.entry.name) {
                    Some(&i) => i,
                    None => {
                        out.bitmaps.push(LoggedBitmap {
                            name: s.entry.name.clone(),
                            table_offset: s.entry.table_offset,
                            region_size: m.region_size(),
                            regions: ChangedRegions::empty(m.region_count()),
                            dirty: None,
                        });
                        out.bitmaps.len() - 1
                    }
                };
                out.bitmaps[i].dirty = Some(m.count());
            }
        }
        Some(out)
    }

    /// What the next [`take_write_log`](Self::take_write_log) would hold, counted: the
    /// regions' worth of bytes a reader reads for the regions it names (a region of two
    /// bitmaps counts twice; a data cluster of which a quarter or more of the regions are
    /// named is read whole, and counts whole), and whether it is whole. `None` with no
    /// log running; 0 regions only when none is named.
    pub fn write_log_pending(&self) -> Option<(u64, bool)> {
        let log = self.write_log.as_ref()?;
        let cs = self.image.cluster_size();
        Some((
            log.bitmaps
                .iter()
                .map(|b| super::region_reads(&b.regions, b.region_size, cs))
                .fold(0u64, u64::saturating_add),
            log.whole,
        ))
    }

    /// The outcome of a flush or commit over `targets` (each bitmap with its table's
    /// offset, `flush::Target::ids`; empty when no log runs): the regions it took go to the log
    /// (a failure makes the log whole: it may have written some of them).
    pub(super) fn logged(
        &mut self,
        targets: &[(Arc<DirtyBitmap>, u64)],
        r: Result<(FlushStats, Taken)>,
    ) -> Result<FlushStats> {
        let Some(log) = self.write_log.as_mut() else {
            return r.map(|(s, _)| s);
        };
        let (stats, taken) = match r {
            Ok(x) => x,
            Err(e) => {
                log.whole = true;
                return Err(e);
            }
        };
        // The slot holding each in-memory bitmap, and each logged (name, table), by the
        // first match (a directory may hold 65,535 bitmaps).
        let mut held: HashMap<*const DirtyBitmap, usize> = HashMap::new();
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(m) = &s.mem {
                held.entry(Arc::as_ptr(m)).or_insert(i);
            }
        }
        let mut logged: HashMap<(BitmapName, u64), usize> = HashMap::new();
        for (i, b) in log.bitmaps.iter().enumerate() {
            logged.entry((b.name.clone(), b.table_offset)).or_insert(i);
        }
        for ((bitmap, table_offset), regions) in targets.iter().zip(&taken) {
            if regions.is_empty() {
                continue;
            }
            let Some(slot) = held.get(&Arc::as_ptr(bitmap)).map(|&i| &self.slots[i]) else {
                log.whole = true;
                continue;
            };
            let key = (slot.entry.name.clone(), *table_offset);
            match logged.get(&key).map(|&i| &mut log.bitmaps[i]) {
                Some(b) if b.regions.region_count() == regions.region_count() => {
                    b.regions.union_with(regions);
                }
                Some(_) => log.whole = true,
                None => {
                    logged.insert(key, log.bitmaps.len());
                    log.bitmaps.push(LoggedBitmap {
                        name: slot.entry.name.clone(),
                        table_offset: *table_offset,
                        region_size: bitmap.region_size(),
                        regions: regions.clone(),
                        dirty: None,
                    });
                }
            }
        }
        Ok(stats)
    }

    /// A directory commit: the log, if any, is whole.
    pub(super) fn log_whole(&mut self) {
        if let Some(log) = self.write_log.as_mut() {
            log.whole = true;
        }
    }
}

impl Preloaded {
    /// Builds the durable bits of every bitmap held, for an
    /// [`activate_durable_preloaded`](BitmapStore::activate_durable_preloaded): then the
    /// activate does not build them (a copy of each bitmap, inside the downtime). Later
    /// [`apply`](Self::apply) calls keep them equal to the bitmaps.
    pub fn prepare_durable(&mut self) {
        for p in &mut self.bitmaps {
            if p.bits.is_none() {
                p.bits = Some(DurableBits::of(&p.bitmap));
            }
        }
    }

    /// Follows the log `id` of the writer ([`BitmapStore::start_write_log`]) from the take
    /// after number `after` on (0: from the first): this preload must have been read after
    /// that start returned, and after take `after` was taken. Until then, and after a log
    /// that does not follow (another id, a sequence number skipped), [`apply`](Self::apply)
    /// reads nothing and the activate reads every bitmap whole.
    pub fn follow(&mut self, id: u64, after: u64) {
        self.follows = Some((id, after.saturating_add(1)));
    }

    /// Whether the writer's log made this preload whole again: after a log that is whole or
    /// that does not follow, only a new preload (of a new log) spares the activate a full
    /// read.
    pub fn is_following(&self) -> bool {
        self.follows.is_some()
    }

    /// Whether this preload follows the log ([`is_following`](Self::is_following)) with
    /// every bitmap of the directory it was read from, each kept up to date by every log
    /// so far: then the activate reads again only what the last log names. A bitmap the
    /// preload could not read, or one a log could not be applied to (its table moved, its
    /// geometry differs, it left the directory), is loaded whole by the activate. It also
    /// holds the preload's reference walk, still of the image's shape at the last log
    /// applied, so that the activate walks nothing either (see
    /// [`BitmapStore::preload`]); without it the activate's walk is downtime too.
    pub fn follows_every_bitmap(&self) -> bool {
        self.is_following()
            && !self.skipped
            && self.walk.is_some()
            && self.bitmaps.iter().all(|p| p.intact)
    }

    /// Reads again, through `reader` (a read-only store of the same image, opened with it),
    /// every region `log` names, so that each bitmap held equals the disk as the writer left
    /// it at that take; with the last log (taken from the inactive writer), a bitmap whose
    /// dirty count matches the writer's is then current, and the activate reads none of it.
    /// A log that is whole or does not follow ends the following (see
    /// [`follow`](Self::follow)): the activate then reads every bitmap.
    ///
    /// # Errors
    /// A table or cluster that does not read; the preload then stops following.
    pub fn apply<S: Storage>(&mut self, reader: &BitmapStore<S>, log: &WriteLog) -> Result<()> {
        // A table the walk read that moved since (the writer grew its L1 or refcount table)
        // leaves the walk standing for no moment after: dropped, so the activate walks and
        // the preload no longer says it follows.
        if let Some(w) = &self.walk {
            if reader.image.walk_shape_now().ok() != Some(w.shape) {
                self.walk = None;
            }
        }
        match self.follows {
            Some((id, seq)) if id == log.id && seq == log.seq && !log.whole => {
                self.follows = Some((id, seq.saturating_add(1)));
            }
            _ => {
                self.stop_following();
                return Ok(());
            }
        }
        let r = self.apply_regions(reader, log);
        if r.is_err() {
            self.stop_following();
        }
        r
    }

    fn stop_following(&mut self) {
        self.follows = None;
        for p in &mut self.bitmaps {
            p.current = false;
        }
    }

    fn apply_regions<S: Storage>(&mut self, reader: &BitmapStore<S>, log: &WriteLog) -> Result<()> {
        // Each name's first logged bitmap (a directory may hold 65,535 bitmaps).
        let mut logged_as: HashMap<&BitmapName, &LoggedBitmap> = HashMap::new();
        for b in &log.bitmaps {
            logged_as.entry(&b.name).or_insert(b);
        }
        for p in self.bitmaps.iter_mut().filter(|p| p.intact) {
            let logged = logged_as.get(&p.name).copied();
            let Some(entry) = reader
                .slots
                .position(p.name.as_bytes())
                .map(|i| &reader.slots[i])
                .filter(|s| !s.stale)
                .map(|s| &s.entry)
            else {
                p.intact = false;
                continue;
            };
            if let Some(b) = logged {
                if b.table_offset != p.table_offset
                    || entry.table_offset != p.table_offset
                    || b.region_size != p.bitmap.region_size()
                    || b.regions.region_count() != p.bitmap.region_count()
                {
                    // Never trusted again: the activate reads it whole.
                    p.intact = false;
                    continue;
                }
                if !b.regions.is_empty() {
                    let (bm, bits) = (&p.bitmap, &p.bits);
                    reader.walk_some_regions(entry, bm, &b.regions, |r, bytes| {
                        bm.load_region_unflagged(r, bytes)?;
                        if let Some(bits) = bits {
                            bits.load_region(r, bm.region_size(), bytes);
                        }
                        Ok(())
                    })?;
                }
            }
            if log.last {
                p.current = p.intact && logged.and_then(|b| b.dirty) == Some(p.bitmap.count());
            }
        }
        if log.last {
            self.follows = None;
        }
        Ok(())
    }
}
