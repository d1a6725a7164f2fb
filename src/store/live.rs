//! The live side of [`BitmapStore`]: flush, the pending queries, the stop loop and the
//! lock-free handles, on an active store. The engine itself is [`crate::flush`]; this file
//! only gathers the store's bitmaps and tables for it.

use std::sync::Arc;

use super::BitmapStore;
use crate::bitmap::DirtyBitmap;
use crate::error::{internal, Result};
use crate::flush::{self, FlushStats, StopReport, StopSource, StopWork};
use crate::storage::Storage;
use crate::tracker::Tracker;
use crate::units::{Bytes, BytesPerMs, Millis};

impl<S: Storage> BitmapStore<S> {
    /// The flush targets of an active store: every in-memory bitmap with its table (the
    /// kept copy, or read from disk).
    ///
    /// # Errors
    /// [`Error::Internal`](crate::Error::Internal) when two slots hold one bitmap object:
    /// the flush would drain its change map for the first and write nothing of the second
    /// (`activate_with` refuses such content; this is the backstop, and the stop then fails
    /// with every `in_use` still set).
    pub(super) fn flush_targets(&self) -> Result<Vec<flush::Target>> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for s in &self.slots {
            if let Some(m) = &s.mem {
                if !seen.insert(Arc::as_ptr(m)) {
                    return Err(internal!(
                        "bitmap {:?} shares its object with another bitmap of the store",
                        s.entry.name.to_string()
                    ));
                }
                out.push(flush::Target {
                    bitmap: Arc::clone(m),
                    table_offset: s.entry.table_offset,
                    table: match &s.table {
                        Some(t) => t.clone(),
                        None => self.read_table(&s.entry)?,
                    },
                });
            }
        }
        Ok(out)
    }

    /// Drops every kept table: after a failure, what the disk holds is not known.
    pub(super) fn forget_tables(&mut self) {
        for s in &mut self.slots {
            s.table = None;
        }
    }

    /// Keeps the tables of `targets` after a flush that succeeded: each is what the disk
    /// now holds at its offset (the engine updates a target's table only once its entry
    /// write returned). A target whose bitmap or table no longer matches its slot is
    /// skipped.
    pub(super) fn keep_tables(&mut self, targets: Vec<flush::Target>) {
        for t in targets {
            if let Some(s) = self.slots.iter_mut().find(|s| {
                s.entry.table_offset == t.table_offset
                    && s.mem.as_ref().is_some_and(|m| Arc::ptr_eq(m, &t.bitmap))
            }) {
                s.table = Some(t.table);
            }
        }
    }

    /// Writes the change-map regions of every in-memory bitmap that changed since the last
    /// flush, in place, into their data clusters (fresh clusters for regions that had none:
    /// refcounts first, then data, then the table entry), then one barrier. `in_use` stays
    /// set (in durable mode, where no bitmap is `in_use`, this is the durable commit,
    /// `docs/DESIGN.md`). Marks may continue concurrently: a racing mark is either written now or left for
    /// the next flush. The write order and its crash reasoning are in [`crate::flush`].
    ///
    /// # Errors
    /// [`Error::WrongState`](crate::Error::WrongState) if the store is not active, [`Error::Poisoned`](crate::Error::Poisoned), a bad table,
    /// I/O. On an error every taken region is handed back to its bitmap and the store
    /// refuses further writes until it is reopened; the disk still says `in_use` (in
    /// durable mode, docs/CRASH-CONSISTENCY.md says what a failed commit leaves).
    pub fn flush(&mut self) -> Result<FlushStats> {
        self.ensure_writable()?;
        self.ensure_active()?;
        if self.durable.is_some() {
            return self.commit_durable();
        }
        let r = self.flush_targets().and_then(|mut t| {
            let r = flush::flush(&mut self.image, &mut t, true, self.rewrite_threshold);
            let r = self.logged(&flush::Target::ids(&t), r);
            if r.is_ok() {
                self.keep_tables(t);
            }
            r
        });
        if r.is_err() {
            self.poisoned = true;
            self.forget_tables();
        }
        r
    }

    /// Sets the changed fraction of a bitmap's regions from which a flush (and the stop's
    /// flush) rewrites every region of the bitmap's data clusters in place, in long
    /// sequential runs, instead of writing the changed regions alone: 0 rewrites whole at
    /// every flush that changed at least [`flush::MIN_REWRITE_REGIONS`] regions, above 1
    /// never. The default is
    /// [`flush::DEFAULT_REWRITE_THRESHOLD`], the crossover `dbm bench flush` measures.
    /// Either way the flush is the same in-place flush, with the same crash reasoning
    /// (`docs/CRASH-CONSISTENCY.md`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) for a negative or NaN fraction.
    pub fn set_rewrite_threshold(&mut self, fraction: f64) -> Result<()> {
        if fraction.is_nan() || fraction < 0.0 {
            return Err(crate::error::invalid_input!(
                "a rewrite threshold is a fraction of 0 or more, not {fraction}"
            ));
        }
        self.rewrite_threshold = fraction;
        Ok(())
    }

    /// The rewrite threshold in force ([`set_rewrite_threshold`](Self::set_rewrite_threshold)).
    pub fn rewrite_threshold(&self) -> f64 {
        self.rewrite_threshold
    }

    /// Every in-memory bitmap of an active store, in directory order (the inconsistent ones
    /// have none). Empty when inactive.
    ///
    /// # Errors
    /// [`Error::WrongState`](crate::Error::WrongState)
    /// ([`StateProblem::Durable`](crate::StateProblem::Durable)) while the store is active
    /// in durable mode, as [`bitmap`](Self::bitmap).
    ///
    /// Their primary change maps are the store's, as [`bitmap`](Self::bitmap) says.
    pub fn bitmaps(&self) -> Result<Vec<Arc<DirtyBitmap>>> {
        self.ensure_not_durable()?;
        Ok(self.slots.iter().filter_map(|s| s.mem.clone()).collect())
    }

    /// A [`Tracker`] over every in-memory bitmap: it marks the enabled ones. It follows the
    /// store: bitmaps added later, and those a later [`activate`](Self::activate) loads,
    /// are marked too (every mark that starts after the call that made them returns), and
    /// it keeps working across [`inactivate`](Self::inactivate) and
    /// [`activate`](Self::activate), which resume the same bitmaps. Its marks cannot wait
    /// for the disk, so it never marks a store in durable mode: this call refuses one there,
    /// and [`activate_durable`](Self::activate_durable) is refused while a tracker taken
    /// here (or a clone of it) exists.
    ///
    /// # Errors
    /// [`Error::WrongState`](crate::Error::WrongState) if the store is not active, or is
    /// active in durable mode.
    pub fn tracker(&self) -> Result<Tracker> {
        self.ensure_active()?;
        self.ensure_not_durable()?;
        Ok(Tracker::following(&self.tracked))
    }

    /// The store's published list of in-memory bitmaps (active or parked), as it stands at
    /// each load: what a [`FlushPolicy`](super::background::FlushPolicy) reads its
    /// estimate from, without the store's lock.
    pub(super) fn pending_gauge(&self) -> crate::tracker::TrackedSet {
        Arc::clone(&self.gauge)
    }

    /// The pending bytes, estimated for free: [`flush::pending_estimate`] over the in-memory
    /// bitmaps (changed regions times the region size). No lock, no I/O. 0 when inactive.
    pub fn pending_estimate(&self) -> u64 {
        flush::pending_estimate(self.slots.iter().filter_map(|s| s.mem.as_ref()))
    }

    /// The exact bytes a flush would write now, allocations included (a whole cluster plus
    /// a table entry for each cluster that needs a fresh one; every region of its data
    /// clusters for a bitmap the flush would rewrite whole, see
    /// [`set_rewrite_threshold`](Self::set_rewrite_threshold); in durable mode, whose
    /// commit writes only the regions it took, never); refcount metadata is not counted.
    /// Takes each change map, counts, and hands every region back. 0 when inactive.
    ///
    /// # Errors
    /// A bad table; I/O reading it. No region is lost either way.
    pub fn pending_exact(&self) -> Result<u64> {
        if !self.active {
            return Ok(0);
        }
        let targets = self.flush_targets()?;
        flush::pending_exact(&targets, self.image.cluster_size(), self.stop_threshold())
    }

    /// The rewrite threshold the next flush or stop plans with: the durable mode's commit
    /// writes only the regions it took, in place, never a whole bitmap.
    fn stop_threshold(&self) -> f64 {
        if self.durable.is_some() {
            f64::INFINITY
        } else {
            self.rewrite_threshold
        }
    }

    /// What [`inactivate`](Self::inactivate) would write now, estimated for free: the
    /// [`pending_estimate`](Self::pending_estimate), a barrier after the data if there is
    /// any and one for the commit (whose small in-place directory write
    /// [`StopWork`] counts in its barrier). It
    /// assumes no allocation (the flushes before a stop allocate; see
    /// [`stop_work_exact`](Self::stop_work_exact)). Nothing when inactive.
    pub fn stop_work_estimate(&self) -> StopWork {
        if !self.active {
            return StopWork::default();
        }
        self.stop_work(self.pending_estimate(), 0)
    }

    /// What [`inactivate`](Self::inactivate) would write now, exactly: the
    /// [`pending_exact`](Self::pending_exact) bytes and the barriers: one
    /// after the data, one for the commit (in durable mode only if a bitmap's recording
    /// changed: it never set `in_use`), and the refcount flush's two if a region needs a
    /// fresh cluster. No region is lost (as `pending_exact`). Nothing when inactive.
    ///
    /// # Errors
    /// As [`pending_exact`](Self::pending_exact).
    pub fn stop_work_exact(&self) -> Result<StopWork> {
        if !self.active {
            return Ok(StopWork::default());
        }
        let targets = self.flush_targets()?;
        let (bytes, fresh) =
            flush::pending_exact_work(&targets, self.image.cluster_size(), self.stop_threshold())?;
        Ok(self.stop_work(bytes, fresh))
    }

    fn stop_work(&self, data: u64, fresh_clusters: u64) -> StopWork {
        // The deferred stop's commit writes the flags (`in_use` cleared) whenever a bitmap
        // is in memory; the durable one only when a bitmap's recording changed
        // (`inactivate_durable`: `in_use` was never set).
        let commit = self.slots.iter().any(|s| {
            s.mem
                .as_ref()
                .is_some_and(|m| self.durable.is_none() || m.is_enabled() != s.entry.auto)
        });
        StopWork {
            bytes: Bytes(data),
            barriers: u64::from(data > 0)
                + u64::from(commit)
                + if fresh_clusters > 0 { 2 } else { 0 },
        }
    }

    /// Issues one barrier and reports it (its time in
    /// [`FlushStats::sync_time`]): a measurement of the disk's barrier latency for
    /// [`DiskRate`](flush::DiskRate) when no flush had anything to write.
    ///
    /// # Errors
    /// [`Error::ReadOnly`](crate::Error::ReadOnly), [`Error::Poisoned`](crate::Error::Poisoned);
    /// [`Error::WrongState`](crate::Error::WrongState)
    /// ([`WriterLocksReleased`](crate::StateProblem::WriterLocksReleased)) on a store an
    /// inactivation handed over (its writer locks released: another writer may own the image now, and this
    /// handle's first write rewrites cluster 0 when it clears an unknown autoclear bit);
    /// I/O.
    pub fn barrier(&mut self) -> Result<FlushStats> {
        self.ensure_writable()?;
        if self.writer == super::WriterLocks::Released {
            return Err(crate::Error::WrongState(
                crate::StateProblem::WriterLocksReleased,
            ));
        }
        let start = std::time::Instant::now();
        let t0 = self.image.sync_time();
        self.image.sync()?;
        Ok(FlushStats {
            syncs: 1,
            sync_time: self.image.sync_time().saturating_sub(t0),
            duration: start.elapsed(),
            ..FlushStats::default()
        })
    }

    /// Flushes until the exact pending bytes fit the budget
    /// [`threshold`](crate::units::threshold)`(bandwidth, downtime_limit)` (`bandwidth ×
    /// downtime_limit`, the migration loop's switchover threshold), so that the stop-time
    /// [`inactivate`](Self::inactivate) writes at most that. The same comparison
    /// ([`fits`](crate::units::fits), `≤`) gates the exact query on the estimate and decides
    /// to stop, so a stale estimate equal to the budget can never end the loop (QEMU's `<` /
    /// `<=` mismatch). Gives up after [`flush::MAX_STOP_ROUNDS`] rounds with
    /// `converged == false` if marks outpace the flushes.
    ///
    /// # Errors
    /// As [`flush`](Self::flush) and [`pending_exact`](Self::pending_exact).
    pub fn prepare_stop(
        &mut self,
        bandwidth: BytesPerMs,
        downtime_limit: Millis,
    ) -> Result<StopReport> {
        self.ensure_writable()?;
        self.ensure_active()?;
        flush::run_stop_loop(self, bandwidth, downtime_limit)
    }
}

/// The stop loop of [`BitmapStore::prepare_stop`]: the estimate is
/// [`pending_estimate`](BitmapStore::pending_estimate), the exact figure
/// [`pending_exact`](BitmapStore::pending_exact), the flush [`flush`](BitmapStore::flush).
impl<S: Storage> StopSource for BitmapStore<S> {
    fn estimate(&mut self) -> u64 {
        self.pending_estimate()
    }

    fn exact(&mut self) -> Result<u64> {
        self.pending_exact()
    }

    fn flush(&mut self) -> Result<FlushStats> {
        BitmapStore::flush(self)
    }
}
