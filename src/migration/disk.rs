//! Disk bitmaps as a [`MigrationState`] on shared storage: both hosts see one image, the
//! source hands its bitmaps over at the stop ([`BitmapStore::inactivate`](crate::BitmapStore::inactivate)) and the
//! destination takes them at its start ([`BitmapStore::activate`](crate::BitmapStore::activate)).
//!
//! [`SharedDiskState`] sends nothing on the wire. While the VM runs, the loop calls its
//! [`flush`](MigrationState::flush) once per measurement window: the store's changed
//! regions go to disk, and the state measures the disk's write rate and barrier latency
//! from those flushes ([`DiskRate`]). Its pending figure is [`Pending::disk_time`]: what
//! the stop will write ([`BitmapStore::stop_work_estimate`](crate::BitmapStore::stop_work_estimate), or
//! [`stop_work_exact`](crate::BitmapStore::stop_work_exact) on the exact query) at those figures.
//! The loop takes it off the downtime limit before it compares the network pending with
//! the rest, so the stop's disk time is inside the downtime budget. The figure also holds
//! the destination's activate of the shared image ([`SharedDiskState::dest_time`]): at
//! setup the state loads every bitmap from disk as the destination will
//! ([`BitmapStore::time_load`](crate::BitmapStore::time_load)) and times it, and one
//! barrier stands for the destination's flags commit. That load happens after End and
//! before Started, so it is downtime as much as the source's stop is. A destination that
//! preloads ([`SharedDiskDest::with_preload`]) reads the bitmaps at the state's BEGIN and
//! follows its write log; it answers BEGIN (and each whole LOG) once its preload ended,
//! and only an answer that says "following" prices its activate as a read of what the last
//! LOG names, and of every LOG sent that it has not yet said it applied (each LOG it applies
//! while following is answered). Until the answer comes the figure waits
//! ([`Pending::awaiting_destination`]): the preload runs in the thread that reads the
//! stream, and a switchover sent meanwhile would wait for it inside the downtime; so it
//! does until the destination said it applied the LOGs sent before its answer was read
//! (it catches up on those queued behind its preload).
//!
//! The hooks, as QEMU's shared-storage migration runs them:
//! - [`complete`](MigrationState::complete) (VM stopped, its disk I/O drained) runs the
//!   incremental inactivate: the remaining regions, then `in_use` cleared; the store then
//!   holds only a reader's image lock, so the destination can open the image writable.
//! - Before the switchover a failure leaves the store active: nothing to undo, every mark
//!   is in memory and reaches the disk at the next flush.
//! - After a failed hand-over (the destination did not start),
//!   [`reactivate`](MigrationState::reactivate) activates the store again before the VM
//!   resumes: it takes the writer's locks back (refused while the destination holds them)
//!   and resumes the parked bitmaps with every mark. The destination may have set `in_use`
//!   (it activated, then died before it started the guest); that is the only difference
//!   accepted.
//! - On [`MigrationError::OutcomeUnknown`] the loop calls nothing: the store stays
//!   inactive and the source stays stopped.

use super::channel::Outbound;
use super::dest_state::{Binding, DestState};
use super::disk_log_codec::{self, LogSection};
use super::error::{MigrationError, Result};
use super::frame::{StateId, SECTION_OVERHEAD};
use super::state::{MigrationState, Pending};
use crate::error::StateProblem;
use crate::flush::{DiskRate, FlushStats};
use crate::storage::Storage;
use crate::store::mode::StoreMode;
use crate::store::{BitmapStore, SharedStore};
use crate::units::{Bytes, Millis};

/// A duration in whole milliseconds, rounded up (as the stop's own time is).
fn millis_up(t: std::time::Duration) -> Millis {
    Millis(u64::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

/// The most flush rounds [`SharedDiskState`] runs right before an exact query (each one
/// a barrier, a fraction of a millisecond with little to write back).
pub const CONVERGE_ROUNDS: u32 = 8;

/// A [`BitmapStore`] on an image both hosts share, as a migration
/// state: flushed during precopy, its stop time counted in the downtime, handed over at the
/// stop and taken back when the hand-over fails. See the [module documentation](self).
///
/// The store must be active when the migration starts, and stay so until the stop hands
/// it over: a store another holder inactivated meanwhile fails the attempt's next flush,
/// log or stop with [`WrongState`](crate::Error::WrongState)
/// ([`NotActive`](crate::StateProblem::NotActive)). A failure in precopy leaves it as that
/// holder left it; one at the stop takes it back before the guest resumes.
/// Marks go to it through a [`Tracker`](crate::Tracker) or its bitmaps, without its lock,
/// throughout.
#[derive(Debug)]
pub struct SharedDiskState<S: Storage> {
    id: StateId,
    name: String,
    store: SharedStore<S>,
    rate: DiskRate,
    flushed: FlushStats,
    stop: FlushStats,
    handed_over: bool,
    /// The store's activation count when the stop handed it over: a fail-back accepts a
    /// destination's `in_use` only while no activation came since.
    handed_over_at: u64,
    /// QEMU's way, for benchmarks: no flush before the stop, no disk time in the figure,
    /// the whole bitmaps rewritten inside the downtime.
    qemu_baseline: bool,
    /// The destination's activate of the shared image, timed at setup: a load of the
    /// bitmaps as it will do it ([`BitmapStore::time_load`](crate::BitmapStore::time_load))
    /// plus one barrier with nothing to write back (its commit of the `in_use` flags).
    /// Downtime the stop does not see.
    dest_activate: Option<std::time::Duration>,
    /// The parts of `dest_activate` a preload that follows the log leaves inside the
    /// downtime: the time per region read, and the barrier of the flags commit (the
    /// reference walk it made during the precopy: `BitmapStore::preload`).
    dest_per_region: std::time::Duration,
    dest_commit: std::time::Duration,
    /// The write log this attempt began (0 before), the last take sent, and the take of
    /// the last whole LOG sent (0 for BEGIN): the destination preloads again there.
    log_id: u64,
    log_seq: u64,
    whole_at: u64,
    /// The destination said its preload follows the log from `whole_at` on
    /// ([`disk_log_codec::PreloadReport`]): only then is its activate priced as a read of
    /// what the last LOG names, and otherwise as a whole load.
    dest_following: bool,
    /// The destination answered the BEGIN or the last whole LOG (following or not): until
    /// it has, its preload may still be running, in the thread that would read the
    /// switchover, and the figure waits ([`Pending::awaiting_destination`]).
    dest_answered: bool,
    /// The LOGs sent since the last whole one (or BEGIN) that a destination that may follow
    /// the log has not said it applied: (take, reads: the regions named and one table per
    /// bitmap named). Queued before the destination's switchover, each is read inside the
    /// downtime; the figure prices them, and waits
    /// while the destination catches up on those sent before its answer (`catch_up_to`).
    unapplied: Vec<(u64, u64)>,
    /// The last take sent when the answer to the BEGIN or last whole LOG was read: the
    /// LOGs up to it may have queued behind the preload, and the figure waits until the
    /// destination said it applied them (it is catching up). Later LOGs are priced, not
    /// waited for: a report's lag would otherwise hold the switchover.
    catch_up_to: u64,
    /// A store error met where the trait cannot return one (the pending query): the next
    /// [`flush`](MigrationState::flush) of the same attempt returns it, and until then the
    /// figure says the stop cannot be timed. It belongs to its attempt: `setup` drops it,
    /// and so does `complete` (a figure taken after the stop is a report; the stop's own
    /// I/O returns its own errors).
    error: Option<crate::Error>,
}

impl<S: Storage> SharedDiskState<S> {
    /// The state for `store`, with section id `id` and name `name` (unique among the
    /// migration's states).
    pub fn new(id: StateId, name: impl Into<String>, store: SharedStore<S>) -> Self {
        SharedDiskState {
            id,
            name: name.into(),
            store,
            rate: DiskRate::new(),
            flushed: FlushStats::default(),
            stop: FlushStats::default(),
            handed_over: false,
            handed_over_at: 0,
            qemu_baseline: false,
            dest_activate: None,
            dest_per_region: std::time::Duration::ZERO,
            dest_commit: std::time::Duration::ZERO,
            log_id: 0,
            log_seq: 0,
            whole_at: 0,
            dest_following: false,
            dest_answered: false,
            unapplied: Vec::new(),
            catch_up_to: 0,
            error: None,
        }
    }

    /// **A benchmark baseline, not for production use.** QEMU's shared-storage migration
    /// of persistent bitmaps: nothing is flushed while the VM runs, the loop is told of no
    /// disk time, and the stop stores every bitmap whole
    /// ([`BitmapStore::inactivate_full_rewrite`](crate::BitmapStore::inactivate_full_rewrite))
    /// inside the downtime. The result on disk is the same; the downtime is not. For
    /// `dbm bench migrate`, which compares the two.
    pub fn qemu_baseline(id: StateId, name: impl Into<String>, store: SharedStore<S>) -> Self {
        SharedDiskState {
            qemu_baseline: true,
            ..Self::new(id, name, store)
        }
    }

    /// The disk's figures measured so far.
    pub fn disk_rate(&self) -> DiskRate {
        self.rate
    }

    /// The flushes run while the VM ran (setup included), summed.
    pub fn flushed(&self) -> FlushStats {
        self.flushed
    }

    /// Whether the store is handed over (inactivated by the stop and not taken back).
    pub fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// The store.
    pub fn store(&self) -> &SharedStore<S> {
        &self.store
    }

    /// The destination's part of the downtime if it had to read every bitmap whole: its
    /// load of the bitmaps and one barrier (its flags commit's, or in durable mode the one
    /// that makes what it loaded durable), both timed at setup
    /// ([`Millis::MAX`] before). With the write log it reads only the regions of the last
    /// log (see [`pending`](MigrationState::pending)).
    pub fn dest_time(&self) -> Millis {
        self.dest_activate.map_or(Millis::MAX, millis_up)
    }

    /// Sends `log`, if any, as a LOG section; the bytes put on the wire. A whole one makes
    /// the destination preload again: until it says it follows from there, its activate is
    /// priced whole.
    fn send_log(&mut self, out: &mut dyn Outbound, log: Option<crate::WriteLog>) -> Result<Bytes> {
        let Some(log) = log else {
            return Ok(Bytes(0));
        };
        // Before the send: a report that answers this LOG may be read as soon as it went.
        self.log_seq = log.seq;
        if log.whole && !log.last {
            self.whole_at = log.seq;
            self.dest_following = false;
            self.dest_answered = false;
            self.unapplied.clear();
        } else if !self.dest_answered || self.dest_following {
            // The last LOG (whole or not) is answered by Started, never by a report: kept,
            // it overcounts the reports still coming by one, and the earlier LOGs' reports
            // stay counted.
            // Not kept for a destination that said it does not follow: it applies nothing,
            // and its activate is priced whole.
            let reads = self.store.lock().log_apply_reads(&log);
            self.unapplied.push((log.seq, reads));
        }
        out.send(self.id, &disk_log_codec::encode_log(&log))
    }

    /// `n` region reads at the destination, at the time per region timed at setup.
    fn region_reads(&self, n: u64) -> std::time::Duration {
        self.dest_per_region
            .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The destination's reads of the LOGs sent since the last whole one that it has not
    /// said it applied, at the time per region read timed at setup: each LOG's regions, the
    /// table of each bitmap it names and the header's sector, in regions' worth of bytes
    /// (`BitmapStore::log_apply_reads`). Queued before its switchover, they are read
    /// inside the downtime, each LOG on its own (a region named by two is read twice), so
    /// no whole load bounds them.
    fn unapplied_time(&self) -> Millis {
        if self.dest_activate.is_none() {
            return Millis::MAX;
        }
        let reads = self
            .unapplied
            .iter()
            .fold(0u64, |n, &(_, r)| n.saturating_add(r));
        millis_up(self.region_reads(reads))
    }

    /// Whether the destination said its preload follows this attempt's write log from the
    /// last whole LOG on: the figures then price its activate as a read of what the last
    /// LOG names, and otherwise as a whole load ([`dest_time`](Self::dest_time)).
    pub fn dest_follows_log(&self) -> bool {
        self.dest_following
    }

    /// The destination's part of the downtime when its preload follows the write log and
    /// the last log names `regions` regions, the checks of its activate
    /// (`BitmapStore::activate_check_reads`) counted among them (the LOGs not yet applied
    /// come on top: `unapplied_time`): those reads and one barrier (timed at setup): out
    /// of durable mode its flags commit's, in durable mode the one that makes what it
    /// loaded durable before its trackers vouch for it; the whole load when the log is
    /// whole, and never more. No reference walk: a preload that says it follows made it
    /// during the precopy, and the activate starts from it (`BitmapStore::preload`).
    fn dest_time_after(&self, regions: u64, whole: bool) -> Millis {
        let Some(full) = self.dest_activate else {
            return Millis::MAX;
        };
        if whole {
            return millis_up(full);
        }
        let reads = self.region_reads(regions);
        millis_up(reads.saturating_add(self.dest_commit).min(full))
    }

    fn observe(&mut self, s: &FlushStats) {
        self.rate.observe(s);
        self.flushed.accumulate(s);
    }
}

/// Refuses a store that is no longer active after the setup found it active: another
/// holder of the [`SharedStore`] inactivated it (or closed it) during precopy. Its flushes
/// would find nothing pending, its write log would end early, and the stop's inactivate
/// would return having written nothing: the marks made since, held only by its parked
/// bitmaps, would reach no disk the destination reads. In precopy the attempt then fails
/// with the guest running and the store left as its holder left it; at the stop, the
/// source resumes through `reactivate`, which takes the store back (in the mode its image
/// records) or, when another writer holds it, refuses and leaves the guest stopped.
fn ensure_still_active<S: Storage>(st: &BitmapStore<S>) -> Result<()> {
    if st.is_active() {
        Ok(())
    } else {
        Err(crate::Error::WrongState(StateProblem::NotActive).into())
    }
}

/// Refuses, before anything is written, a destination whose mode is not the one the
/// source left the image in (its mode extension: durable after a durable source's stop,
/// deferred after a deferred one's). Its activation would change cluster 0 (a deferred one
/// clears the durable flag, a durable one records it and allocates), and if the attempt
/// then failed, its `failed` would put back the `in_use` flags but not that: the source's
/// take-back would find the image changed while inactive and refuse it, leaving the guest
/// stopped. A mode this crate does not know is left to the activation.
fn ensure_same_mode<S: Storage>(st: &BitmapStore<S>, durable: bool) -> Result<()> {
    let left = match StoreMode::of(st.image().area()) {
        StoreMode::Durable => true,
        StoreMode::Deferred => false,
        _ => return Ok(()),
    };
    if left == durable {
        return Ok(());
    }
    let name = |d: bool| if d { "durable" } else { "deferred" };
    Err(MigrationError::InvalidInput(format!(
        "the source left the image in {} mode and this destination would take it over in {} \
         mode: build both sides in the same mode",
        name(left),
        name(durable)
    )))
}

impl<S: Storage> MigrationState for SharedDiskState<S> {
    fn id(&self) -> StateId {
        self.id
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Flushes what changed so far (the first measurement of the disk), times one
    /// barrier if that flush had nothing to write, and times a load of the bitmaps and one
    /// barrier with nothing to write back (the destination's activate).
    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.stop = FlushStats::default();
        // Each attempt's destination preloads anew, and says so.
        self.dest_following = false;
        self.dest_answered = false;
        self.unapplied.clear();
        self.log_id = 0;
        self.log_seq = 0;
        self.whole_at = 0;
        // A figure's error of an earlier attempt (one that was cancelled, or failed after
        // the figure taken at its stop) says nothing of this one: a store that still fails
        // fails this attempt's own flushes and figures.
        self.error = None;
        if self.qemu_baseline {
            if self.store.lock().is_active() {
                self.handed_over = false;
            }
            return Ok(Bytes(0));
        }
        let (flushed, barrier) = {
            let mut st = self.store.lock();
            if !st.is_active() {
                // Still handed over by an earlier attempt: `reactivate` must take it back.
                return Err(MigrationError::Bitmap(crate::Error::WrongState(
                    crate::StateProblem::NotActive,
                )));
            }
            self.handed_over = false;
            let f = st.flush()?;
            let b = if f.syncs == 0 {
                Some(st.barrier()?)
            } else {
                None
            };
            (f, b)
        };
        self.observe(&flushed);
        if let Some(b) = barrier {
            self.rate.observe(&b);
        }
        let mut st = self.store.lock();
        let load = st.time_load_parts()?;
        // The destination's commit is a few sectors and one barrier, on a disk the flush
        // above just synced: time one such barrier (the flushes' barriers carry their
        // data's write-back and would overstate it).
        let commit = st.barrier()?.sync_time;
        self.dest_per_region = load
            .regions
            .checked_div(u32::try_from(load.region_count.max(1)).unwrap_or(u32::MAX))
            .unwrap_or_default();
        self.dest_commit = commit;
        self.dest_activate = Some(
            load.walk
                .saturating_add(load.regions)
                .saturating_add(commit),
        );
        // From here on every region written is logged; the destination preloads when this
        // BEGIN reaches it, so after the start, and reads again what each log names.
        let id = st.start_write_log();
        drop(st);
        self.log_id = id;
        out.send(self.id, &disk_log_codec::encode_begin(id))
    }

    fn pending(&mut self, exact: bool) -> Pending {
        if self.qemu_baseline {
            return Pending::default();
        }
        let (work, logged, region_size, log_bytes, checks) = {
            let st = self.store.lock();
            let w = if exact {
                st.stop_work_exact()
            } else {
                Ok(st.stop_work_estimate())
            };
            let rs = st.region_size().max(1);
            let disk = st.disk_size();
            let logged = st.write_log_pending();
            // The last LOG goes out inside the downtime: its bytes are pending.
            let log_bytes = logged.map_or(Bytes(0), |_| {
                let len = disk_log_codec::log_len_bound(st.list().iter().map(|b| {
                    let bytes = disk.div_ceil(b.granularity.max(1)).div_ceil(8);
                    (b.name.len(), bytes.div_ceil(rs))
                }));
                Bytes(len) + SECTION_OVERHEAD
            });
            // What the destination's activate checks beyond the regions (an error prices
            // the whole load).
            let checks = st.activate_check_reads().unwrap_or(u64::MAX);
            (w, logged, rs, log_bytes, checks)
        };
        let (disk_time, dest_disk_time) = match work {
            Ok(w) => {
                // The destination reads again what the last log will name (the regions
                // logged since the last one went out, and those the stop writes) and what
                // the logs it has not said it applied name (queued before the switchover);
                // if it said its preload follows the log. Otherwise it loads whole.
                let dest = match logged {
                    Some((regions, whole)) if self.dest_following => {
                        self.dest_time_after(
                            regions
                                .saturating_add(w.bytes.0.div_ceil(region_size))
                                .saturating_add(checks),
                            whole,
                        ) + self.unapplied_time()
                    }
                    _ => self.dest_time(),
                };
                (self.rate.time(w) + dest, dest)
            }
            Err(e) => {
                self.error = Some(e);
                (Millis::MAX, Millis::MAX)
            }
        };
        // Nothing goes out before the stop but the logs each flush sends: the last one
        // is every byte this state has pending, and only the stop sends it.
        Pending {
            disk_time,
            dest_disk_time,
            must_precopy: log_bytes,
            stop_only: log_bytes,
            // A log begun and its last preload point unanswered (the qemu baseline begins
            // none), or a destination that follows it catching up on the LOGs sent before
            // its answer was read (queued behind its preload).
            awaiting_destination: self.log_id != 0
                && (!self.dest_answered
                    || (self.dest_following
                        && self
                            .unapplied
                            .first()
                            .is_some_and(|&(seq, _)| seq <= self.catch_up_to))),
            ..Pending::default()
        }
    }

    fn iterate(&mut self, _out: &mut dyn Outbound, _budget: Bytes) -> Result<Bytes> {
        Ok(Bytes(0))
    }

    /// The destination's preload report ([`disk_log_codec::PreloadReport`]): "following"
    /// for this attempt's log from its last whole LOG on lets the figures price the
    /// destination's activate as a read of what the last LOG names; "not following" (a
    /// preload or a re-read that failed, or no preload at all) prices it whole again.
    /// Either answer to the BEGIN or the last whole LOG ends the figure's wait
    /// ([`Pending::awaiting_destination`]). A report of an earlier whole LOG's preload is
    /// stale and changes nothing.
    ///
    /// # Errors
    /// A payload that does not decode, or names a log this attempt did not begin or a
    /// take it has not sent: the attempt fails.
    fn notice(&mut self, payload: &[u8]) -> Result<()> {
        let r = disk_log_codec::decode_report(payload)?;
        if self.log_id == 0 || r.id != self.log_id || r.through > self.log_seq {
            return Err(MigrationError::InvalidInput(format!(
                "the destination reported a preload of log {} after take {} through take {}, \
                 where this attempt's log is {} and its last take sent {}",
                r.id, r.after, r.through, self.log_id, self.log_seq
            )));
        }
        if r.after == self.whole_at {
            if !self.dest_answered {
                self.catch_up_to = self.log_seq;
            }
            self.dest_following = r.following;
            self.dest_answered = true;
            if r.following {
                self.unapplied.retain(|&(seq, _)| seq > r.through);
            } else {
                self.unapplied.clear();
            }
        }
        Ok(())
    }

    /// One report per LOG a following destination has not said it applied, and the answer
    /// to the BEGIN or last whole LOG while it has not come.
    fn reports_outstanding(&self) -> usize {
        if self.log_id == 0 {
            return 0;
        }
        self.unapplied
            .len()
            .saturating_add(usize::from(!self.dest_answered))
    }

    /// Writes the changed regions, if any, and measures the disk with them.
    fn flush(&mut self) -> Result<Bytes> {
        if let Some(e) = self.error.take() {
            return Err(e.into());
        }
        if self.qemu_baseline {
            return Ok(Bytes(0));
        }
        let s = {
            let mut st = self.store.lock();
            ensure_still_active(&st)?;
            if st.pending_estimate() == 0 {
                return Ok(Bytes(0));
            }
            st.flush()?
        };
        self.observe(&s);
        Ok(Bytes(s.bytes_written))
    }

    /// Flushes while each round finds fewer changed regions than the round before found
    /// (at most [`CONVERGE_ROUNDS`] rounds). A round takes a fixed barrier plus time per
    /// region, and the guest's writes during it are the next round's work, so the rounds
    /// shrink towards the few regions one short round sees changed: what the stop then
    /// writes, instead of all that changed during the first, long round.
    fn flush_before_exact(&mut self) -> Result<Bytes> {
        if let Some(e) = self.error.take() {
            return Err(e.into());
        }
        if self.qemu_baseline {
            return Ok(Bytes(0));
        }
        let mut written = Bytes(0);
        let mut last = u64::MAX;
        for _ in 0..CONVERGE_ROUNDS {
            let s = {
                let mut st = self.store.lock();
                ensure_still_active(&st)?;
                let now = st.pending_estimate();
                if now == 0 || now >= last {
                    break;
                }
                last = now;
                st.flush()?
            };
            self.observe(&s);
            written += Bytes(s.bytes_written);
        }
        Ok(written)
    }

    /// Sends the write log: the regions written since the last one went out.
    fn after_flush(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        let log = {
            let mut st = self.store.lock();
            ensure_still_active(&st)?;
            match st.write_log_pending() {
                Some((0, false)) | None => None,
                Some(_) => st.take_write_log(),
            }
        };
        self.send_log(out, log)
    }

    /// The incremental inactivate, with the VM stopped (in durable mode every mark is on
    /// disk already, and it writes nothing); then the last write log, with each bitmap's
    /// dirty count, so that the destination reads again only what it names.
    ///
    /// An error of the figure the loop took after the stop is dropped here: that figure
    /// only reports (the decision was taken on the one before, which an error keeps from
    /// switching over), and the inactivate reads and writes all it needs itself, returning
    /// its own errors, so nothing that could leave the disk falsely clean is lost.
    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.error = None;
        // The activation count read under the same lock as the stop: an activation by
        // another holder right after it counts as one after the hand-over.
        let (s, log, at) = if self.qemu_baseline {
            let mut st = self.store.lock();
            ensure_still_active(&st)?;
            (st.inactivate_full_rewrite()?, None, st.activations())
        } else {
            let mut st = self.store.lock();
            ensure_still_active(&st)?;
            let s = st.inactivate()?;
            (s, st.take_write_log(), st.activations())
        };
        self.rate.observe(&s);
        self.stop = s;
        self.handed_over = true;
        self.handed_over_at = at;
        self.send_log(out, log)
    }

    fn disk_stop(&self) -> FlushStats {
        self.stop
    }

    /// Nothing to undo: the store is still active and holds every mark. Its write log,
    /// started for this attempt's destination, ends (a retry starts one of its own).
    fn cancel(&mut self) {
        self.store.lock().stop_write_log();
    }

    /// Nothing to re-dirty: nothing went on the wire. A write log still running (the stop
    /// failed before its last take, or never ran) ends, as at a cancel.
    fn resume_source(&mut self) {
        self.store.lock().stop_write_log();
    }

    /// Activates the store again if it is inactive (the stop, this attempt's or an earlier
    /// one's, handed it over, or another holder inactivated it and the stop refused it;
    /// `in_use` bits set since are taken back only in the first case), in
    /// durable mode if its image records that mode (its durable trackers are then new: take
    /// them again). Refuses, so that the
    /// source stays stopped, while a failed stop holds the marks
    /// ([`BitmapStore::marks_held`](crate::BitmapStore::marks_held)): the disk may then
    /// say clean, and a resumed guest's writes would wait on the sealed bitmaps.
    fn reactivate(&mut self) -> Result<()> {
        // One lock for the whole decision: another holder of the store may activate it, or
        // fail a stop that holds the marks, between two.
        let mut st = self.store.lock();
        if st.marks_held() {
            return Err(crate::Error::WrongState(StateProblem::MarksHeld).into());
        }
        // Whatever this attempt did, an inactive store is taken back: the guest resumes
        // only on bitmaps the disk says are in use. One another holder took back already
        // stays as it is.
        if !st.is_active() {
            // Handed over by a stop of this migration (this attempt's or an earlier one's),
            // and not activated since: the destination never said it started, so `in_use`
            // bits it set and left are all it wrote, and this store's bitmaps hold every
            // mark. Not handed over (another holder inactivated the store, and this stop
            // refused it), or taken back and handed out again by another holder since:
            // whoever set `in_use` may have written guest data these bitmaps lack, so the
            // activation refuses such an image and the guest stays stopped. The mode the
            // image records: durable after a durable store's inactivate (this attempt's
            // stop, an earlier one's, or another holder's), else deferred.
            if self.handed_over && st.activations() == self.handed_over_at {
                st.accept_destination_in_use();
            }
            if StoreMode::of(st.image().area()) == StoreMode::Durable {
                st.activate_durable()?;
            } else {
                st.activate()?;
            }
        }
        self.handed_over = false;
        Ok(())
    }
}

/// The destination's side of a [`SharedDiskState`] ([`DestState`]): on the same image the
/// source hands over, it opens and activates the store only after the source's End (or
/// postcopy Switchover) and before it answers Started, so it takes the bitmaps only once
/// the source's inactivate made them clean on disk; and if the attempt fails after that,
/// it inactivates again, which puts the flags back as the source left them (the source's
/// [`BitmapStore::activate`](crate::BitmapStore::activate) accepts exactly that).
///
/// With [`with_preload`](Self::with_preload) (as [`file`](Self::file) sets it up) it reads
/// the bitmaps at the source's BEGIN, while the source still runs
/// ([`BitmapStore::preload`](crate::BitmapStore::preload)), follows the source's write log,
/// tells the source whether it does, and its activate refreshes them from the disk
/// ([`BitmapStore::activate_preloaded`](crate::BitmapStore::activate_preloaded)) instead
/// of loading them into fresh memory: the same bitmaps, in a fraction of the downtime.
pub struct SharedDiskDest<S: Storage> {
    name: String,
    open: Opener<S>,
    preload: Option<Opener<S>>,
    preloaded: Option<crate::Preloaded>,
    /// The log and take the last preload follows from (set whether or not it succeeded).
    preload_at: Option<(u64, u64)>,
    /// The last take the preload applied while it followed the log (the take it follows
    /// from until it applied one after it).
    through: u64,
    /// What this attempt last told the source of its preload.
    told: Option<disk_log_codec::PreloadReport>,
    /// The source switched over: nothing more is told.
    switched: bool,
    /// The read-only store the preload came from, which reads what each log names.
    reader: Option<crate::BitmapStore<S>>,
    /// The source's last log, read at the activate.
    last_log: Option<crate::WriteLog>,
    from_preload: bool,
    /// Bitmaps the last activate took as they were preloaded, reading none of them.
    taken_current: usize,
    store: Option<crate::BitmapStore<S>>,
    durable: bool,
    /// Why the last failed attempt's inactivate failed, leaving the bitmaps `in_use`.
    undo_error: Option<crate::Error>,
    /// [`file_on_one_host`](SharedDiskDest::file_on_one_host)'s mark that the current
    /// attempt's preload dropped the image's cache, which the next writable open takes:
    /// cleared at every Hello, so that a drop counts for its own attempt alone.
    cache_dropped: Option<CacheDrop>,
}

type Opener<S> = Box<dyn FnMut() -> crate::Result<crate::BitmapStore<S>> + Send>;

impl<S: Storage> std::fmt::Debug for SharedDiskDest<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDiskDest")
            .field("name", &self.name)
            .field("active", &self.store.is_some())
            .finish()
    }
}

impl<S: Storage + 'static> SharedDiskDest<S> {
    /// The state named `name` (as the source's [`SharedDiskState`]), opening its store with
    /// `open` when it takes over.
    ///
    /// Give it a preload ([`with_preload`](Self::with_preload); [`file`](SharedDiskDest::file)
    /// does): once it follows the source's write log, this end says so, and the source's
    /// downtime figure prices its activate as a read of what the last log names. Without
    /// one (or when the preload fails) the activate loads every bitmap whole inside the
    /// downtime, and the source, told so, prices exactly that. Either way this end answers
    /// each BEGIN and whole LOG once its preload ended, and the source does not switch
    /// over before: a switchover read while the preload still ran would wait for the rest
    /// of it inside the downtime.
    pub fn new(
        name: impl Into<String>,
        open: impl FnMut() -> crate::Result<crate::BitmapStore<S>> + Send + 'static,
    ) -> Self {
        SharedDiskDest {
            name: name.into(),
            open: Box::new(open),
            preload: None,
            preloaded: None,
            preload_at: None,
            through: 0,
            told: None,
            switched: false,
            reader: None,
            last_log: None,
            from_preload: false,
            taken_current: 0,
            store: None,
            durable: false,
            undo_error: None,
            cache_dropped: None,
        }
    }

    /// Activates the store in durable mode
    /// ([`BitmapStore::activate_durable_preloaded`](crate::BitmapStore::activate_durable_preloaded)):
    /// nothing is written at the start when the source kept it durable too (every cluster
    /// is allocated and no flag changes), and one barrier makes what it read durable.
    ///
    /// The mode must be the source's: a destination whose mode is not the one the source
    /// left the image in refuses at the start, before it writes anything, so that the
    /// source can take the image back.
    #[must_use]
    pub fn durable(mut self) -> Self {
        self.durable = true;
        self
    }

    /// Preloads at the source's BEGIN (and again at each whole LOG), in the thread that
    /// reads the stream: `open` opens the image read-only beside the running source (for a
    /// file, [`FileStorage::open_shared`](crate::FileStorage::open_shared)). A preload that
    /// fails is skipped: the activate then loads the bitmaps whole. The preload also makes
    /// the reference walk the activate would otherwise make inside the downtime
    /// ([`BitmapStore::preload`](crate::BitmapStore::preload)); until it holds one, this
    /// end does not say it follows.
    #[must_use]
    pub fn with_preload(
        mut self,
        open: impl FnMut() -> crate::Result<crate::BitmapStore<S>> + Send + 'static,
    ) -> Self {
        self.preload = Some(Box::new(open));
        self
    }

    /// Whether the last activate started from bitmaps preloaded during the precopy.
    pub fn activated_from_preload(&self) -> bool {
        self.from_preload
    }

    /// How many bitmaps the last activate took as they were preloaded and kept up to date
    /// from the source's write log, reading none of their data inside the downtime.
    pub fn activated_current(&self) -> usize {
        self.taken_current
    }

    /// Preloads through a fresh read-only store, following the source's log `id` from the
    /// take after `after` on; a preload that fails leaves none (the activate then loads the
    /// bitmaps whole).
    fn preload_following(&mut self, id: u64, after: u64) {
        self.preloaded = None;
        self.reader = None;
        self.preload_at = Some((id, after));
        self.through = after;
        let Some(open) = self.preload.as_mut() else {
            return;
        };
        let Ok(reader) = open() else { return };
        let Ok(mut pre) = reader.preload() else {
            return;
        };
        pre.follow(id, after);
        if self.durable {
            pre.prepare_durable();
        }
        self.preloaded = Some(pre);
        self.reader = Some(reader);
    }

    /// No preload: the activate loads the bitmaps whole inside the downtime, as QEMU's
    /// destination does (the benchmarks' baseline, whose source, as QEMU's, prices no disk
    /// time at all). A source of this crate's own stop prices that whole load: see
    /// [`new`](Self::new).
    #[must_use]
    pub fn without_preload(mut self) -> Self {
        self.preload = None;
        self
    }

    /// Why the last attempt that failed after taking the image over could not inactivate
    /// it again (`None` when it could, or took nothing): its bitmaps then stay `in_use` on
    /// disk, inconsistent (never clean), and the source's take-back accepts exactly that.
    /// Cleared at each Hello.
    pub fn undo_failed(&self) -> Option<&crate::Error> {
        self.undo_error.as_ref()
    }

    /// The active store, once the destination started; it is the caller's from here on.
    pub fn take_store(&mut self) -> Option<crate::BitmapStore<S>> {
        self.store.take()
    }

    /// The report to send after a section, if it differs from the last one this attempt
    /// sent: every BEGIN and whole LOG is answered once its preload ended, following or not
    /// (no preload, or one that failed, answers "not following" at once), each LOG applied
    /// while following says so (its take), and a re-read that failed says the preload
    /// stopped following. The source does not switch over until its BEGIN or last whole
    /// LOG is answered (before that, the preload may still be running in the thread that
    /// reads the switchover), and it prices the regions of every LOG sent and not yet
    /// applied (LOGs queued behind a preload are read before the switchover is).
    fn news(&mut self) -> Option<Vec<u8>> {
        if self.switched {
            return None;
        }
        let (id, after) = self.preload_at?;
        let now = disk_log_codec::PreloadReport {
            // Every bitmap: one the activate loads whole is downtime the source must
            // price as such.
            following: self
                .preloaded
                .as_ref()
                .is_some_and(crate::Preloaded::follows_every_bitmap),
            id,
            after,
            through: self.through,
        };
        if self.told == Some(now) {
            return None;
        }
        self.told = Some(now);
        Some(disk_log_codec::encode_report(now))
    }
}

impl SharedDiskDest<crate::storage::FileStorage> {
    /// The state named `name` over the image file at `path`, opened writable with QEMU's
    /// locks (which the source released when it inactivated), and preloaded at the
    /// source's BEGIN through a read-only force-share open. Both read the device, never what this host
    /// cached before ([`FileStorage::reading_the_device`](crate::storage::FileStorage::reading_the_device)):
    /// the source writes the image from another host during precopy and at the stop, and
    /// on storage whose caches are not coherent, pages this host cached earlier would hide
    /// those writes. The writable open also drops the whole cache before its first read,
    /// as every writable open does (`Storage::forget_cached`).
    pub fn file(name: impl Into<String>, path: impl Into<std::path::PathBuf>) -> Self {
        let path = path.into();
        let shared = path.clone();
        Self::new(name, move || {
            let f = crate::storage::FileStorage::open(&path, crate::OpenMode::ReadWrite)?
                .reading_the_device();
            crate::BitmapStore::open(f, crate::OpenMode::ReadWrite)
        })
        .with_preload(move || {
            let f = crate::storage::FileStorage::open_shared(&shared)?.reading_the_device();
            crate::BitmapStore::open(f, crate::OpenMode::ReadOnly)
        })
    }

    /// [`file`](Self::file) for a destination on the source's host (one page cache, so
    /// what this host caches is what the source wrote): reads go through the cache. The
    /// preload drops the file's cache before its first read (pages a failed barrier on this
    /// host left clean there, `Storage::forget_cached`), and the activation's open, inside
    /// the downtime, keeps what the preload read cached (`FileStorage::keeping_cache`,
    /// once, and only when a preload of the same attempt ran since the last writable open:
    /// a Hello forgets the drop; dropping it there cost 4 to 8 ms of downtime). The writers
    /// of the file on this host between the preload and the activation are the source's
    /// store, whose failed barrier fails the migration, and the source guest's QEMU, whose
    /// failed guest flush the guest sees: the pages that can go stale then are guest data
    /// and QEMU's metadata, not the bitmaps' clusters, which only the source's store
    /// writes. Reading the device as [`file`](Self::file) does, beside
    /// a source on the same host, slowed the source's flushes until, with four 16 TiB
    /// bitmaps, it never switched over (docs/BENCHMARKS.md). Wrong across hosts on storage
    /// whose caches are not coherent: the destination would start on stale bitmaps.
    pub fn file_on_one_host(name: impl Into<String>, path: impl Into<std::path::PathBuf>) -> Self {
        let (writable, reader, drop) = one_host_opens(path.into());
        let mut d = Self::new(name, writable).with_preload(reader);
        d.cache_dropped = Some(drop);
        d
    }
}

/// The mark that a read-only open of [`one_host_opens`] dropped the image's cache, which
/// the next writable open takes; a destination forgets it at each Hello, so that a drop
/// counts for its own attempt alone.
#[derive(Debug)]
pub(super) struct CacheDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CacheDrop {
    /// The next writable open drops the cache again, unless a read-only open drops it first.
    pub(super) fn forget(&self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The opens of a destination whose image file this host's page cache holds for every
/// writer of it (one host): a writable one with QEMU's locks, and a read-only one with
/// QEMU's force-share locking, made during the precopy, which drops the file's cache
/// first. The writable open keeps the cache once (`FileStorage::keeping_cache`) when a
/// read-only open dropped it since the last writable open and the last
/// [`CacheDrop::forget`].
pub(super) fn one_host_opens(
    path: std::path::PathBuf,
) -> (
    impl FnMut() -> crate::Result<crate::BitmapStore<crate::storage::FileStorage>> + Send + 'static,
    impl FnMut() -> crate::Result<crate::BitmapStore<crate::storage::FileStorage>> + Send + 'static,
    CacheDrop,
) {
    let shared = path.clone();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (taken, set) = (
        std::sync::Arc::clone(&dropped),
        std::sync::Arc::clone(&dropped),
    );
    let writable = move || {
        let f = crate::storage::FileStorage::open(&path, crate::OpenMode::ReadWrite)?;
        let f = if taken.swap(false, std::sync::atomic::Ordering::SeqCst) {
            f.keeping_cache()
        } else {
            f
        };
        crate::BitmapStore::open(f, crate::OpenMode::ReadWrite)
    };
    let reader = move || {
        let f = crate::storage::FileStorage::open_shared(&shared)?;
        f.forget_cached()?;
        set.store(true, std::sync::atomic::Ordering::SeqCst);
        crate::BitmapStore::open(f, crate::OpenMode::ReadOnly)
    };
    (writable, reader, CacheDrop(dropped))
}

impl<S: Storage + 'static> DestState for SharedDiskDest<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn hello(&mut self, _id: StateId, _binding: Binding) -> Result<()> {
        // A store still held from an earlier attempt that failed after taking over was
        // given back in `failed`; nothing is open writable here before the start. The
        // preload waits for the source's BEGIN (its log must start first).
        self.store = None;
        self.preloaded = None;
        self.preload_at = None;
        self.through = 0;
        self.told = None;
        self.switched = false;
        self.reader = None;
        self.last_log = None;
        self.undo_error = None;
        if let Some(d) = &self.cache_dropped {
            d.forget();
        }
        Ok(())
    }

    /// From here on nothing is told: a report now would reach a source that waits for
    /// Started (which skips it).
    fn switchover(&mut self, _postcopy: bool) {
        self.switched = true;
    }

    /// The source's BEGIN: preload now, read-only beside the running source. Its LOGs:
    /// read again the regions each names; a whole one: preload again, following the log
    /// from there. A preload that cannot follow is never trusted as is: the activate reads
    /// every bitmap again. Whenever the preload starts or stops following the log, the
    /// answer tells the source ([`disk_log_codec::PreloadReport`]), whose figures price
    /// this end's activate as a read of the last LOG's regions only while it follows.
    fn section(&mut self, payload: &[u8]) -> Result<Option<Vec<u8>>> {
        // Regions are kept only for a bitmap the preload holds, at its region count: a LOG
        // costs at most the preload's own region sets, whatever it names.
        let pre = self.preloaded.as_ref();
        let holds = |name: &[u8], regions: u64| pre.is_some_and(|p| p.holds(name, regions));
        match disk_log_codec::decode(payload, holds)? {
            LogSection::Begin(id) => self.preload_following(id, 0),
            LogSection::Log(log) if log.whole && !log.last => {
                self.preload_following(log.id, log.seq);
            }
            // The last one arrives inside the downtime: read with the activate, so that
            // the activate's time holds it. Nothing is told then.
            LogSection::Log(log) if log.last => {
                self.last_log = Some(log);
                return Ok(None);
            }
            LogSection::Log(log) => {
                if let (Some(pre), Some(reader)) = (self.preloaded.as_mut(), self.reader.as_ref()) {
                    // Only while every bitmap follows (else the answer said "not following",
                    // the source prices a whole load and keeps no LOG for it: reads here
                    // would be downtime in no figure; the last LOG, inside the downtime, is
                    // applied with the activate, whose price is the whole load). A read that
                    // fails ends the following.
                    if pre.follows_every_bitmap() {
                        let _ = pre.apply(reader, &log);
                        if pre.follows_every_bitmap() {
                            // Applied: the source's figure no longer counts its regions.
                            self.through = log.seq;
                        }
                    }
                }
            }
        }
        Ok(self.news())
    }

    fn before_start(&mut self) -> Result<()> {
        if let (Some(log), Some(pre), Some(reader)) = (
            self.last_log.take(),
            self.preloaded.as_mut(),
            self.reader.as_ref(),
        ) {
            // A read that fails ends the following; the activate reads it all.
            let _ = pre.apply(reader, &log);
        }
        self.reader = None;
        let mut st = (self.open)()?;
        ensure_same_mode(&st, self.durable)?;
        self.from_preload = false;
        self.taken_current = 0;
        match (self.preloaded.take(), self.durable) {
            (Some(pre), false) => {
                st.activate_preloaded(pre)?;
                self.from_preload = true;
            }
            (Some(pre), true) => {
                st.activate_durable_preloaded(pre)?;
                self.from_preload = true;
            }
            (None, false) => st.activate()?,
            (None, true) => st.activate_durable()?,
        }
        // What the activation itself took without reading (a preloaded copy flagged current
        // whose table moved is read again).
        self.taken_current = st.taken_as_preloaded();
        self.store = Some(st);
        Ok(())
    }

    fn failed(&mut self) {
        self.preloaded = None;
        self.preload_at = None;
        self.through = 0;
        self.told = None;
        self.reader = None;
        self.last_log = None;
        if let Some(mut st) = self.store.take() {
            // Clears the in_use flags it set, in place: the image is again as the source
            // left it. If this fails, the flags stay in_use (inconsistent, never clean)
            // and the source's activate refuses nothing it should not.
            self.undo_error = st.inactivate().err();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::DirtyBitmap;
    use crate::storage::{FaultPlan, FaultStorage, MemStorage, Trigger};
    use crate::store::{BitmapStore, Recording};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    const DISK: u64 = 1 << 40;
    const G: u64 = 65536;

    /// A guest that keeps writing while a flush runs: at every barrier, it marks one fresh
    /// granule for every two regions (4 KiB) the flush wrote since the last barrier, each
    /// in a region of its own. The longer a flush, the more it leaves for the next.
    #[derive(Debug)]
    struct Busy {
        inner: MemStorage,
        guest: Arc<Mutex<Option<Arc<DirtyBitmap>>>>,
        written: AtomicU64,
        next: AtomicU64,
    }

    impl Storage for Busy {
        fn len(&self) -> crate::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
            self.written.fetch_add(buf.len() as u64, Ordering::SeqCst);
            self.inner.write_all_at(buf, offset)
        }
        fn set_len(&self, new_len: u64) -> crate::Result<()> {
            self.inner.set_len(new_len)
        }
        fn sync_data(&self) -> crate::Result<()> {
            let written = self.written.swap(0, Ordering::SeqCst);
            if let Some(b) = self.guest.lock().unwrap().as_ref() {
                for _ in 0..written / 4096 / 2 {
                    // Region r, granule 2 and up: bits nothing set before.
                    let n = self.next.fetch_add(1, Ordering::SeqCst);
                    let r = n % b.region_count();
                    let granule = 2 + n / b.region_count();
                    b.mark_dirty(b.region_disk_range(r).0 + granule * G, 1);
                }
            }
            self.inner.sync_data()
        }
    }

    /// 256 regions changed and a guest that writes half as many regions as each flush
    /// takes: one flush leaves about 128 for the stop, the converging flush before the
    /// exact query a few.
    fn left_after(converge: bool) -> u64 {
        let guest = Arc::new(Mutex::new(None));
        let storage = Busy {
            inner: MemStorage::new(),
            guest: Arc::clone(&guest),
            written: AtomicU64::new(0),
            next: AtomicU64::new(0),
        };
        let mut st = BitmapStore::create(storage, DISK, 65536).unwrap();
        // The guest writes in step with the flush's write calls, one per changed region:
        // keep them one per region (no whole rewrite, which would make them a few long
        // runs).
        st.set_rewrite_threshold(2.0).unwrap();
        st.add("b", G, Recording::Enabled).unwrap();
        st.activate().unwrap();
        let b = st.bitmap("b").unwrap();
        // Every region holds a bit and has its cluster: the flushes below write in place.
        for r in 0..b.region_count() {
            b.mark_dirty(b.region_disk_range(r).0, 1);
        }
        st.flush().unwrap();
        for r in 0..256 {
            b.mark_dirty(b.region_disk_range(r).0 + G, 1);
        }
        *guest.lock().unwrap() = Some(Arc::clone(&b));
        let mut state = SharedDiskState::new(1, "disk", SharedStore::new(st));
        if converge {
            state.flush_before_exact().unwrap();
        } else {
            state.flush().unwrap();
        }
        b.changed_region_count()
    }

    /// A link that takes every payload.
    struct Sink;

    impl Outbound for Sink {
        fn send(&mut self, _: StateId, payload: &[u8]) -> Result<Bytes> {
            Ok(Bytes(payload.len() as u64))
        }
        fn control(&mut self, _: &crate::migration::Control) -> Result<Bytes> {
            Ok(Bytes(0))
        }
        fn bytes_sent(&self) -> Bytes {
            Bytes(0)
        }
    }

    type Faulty = FaultStorage<MemStorage>;

    /// A source state over an active store with one enabled bitmap holding a mark, and the
    /// number of barriers a fault-free stop of it issues.
    fn faulty_source() -> (SharedDiskState<Faulty>, Arc<DirtyBitmap>, u64) {
        let stop_syncs = {
            let (mut state, _) = faulty_store();
            let y0 = state.store.lock().image().storage().syncs();
            state.complete(&mut Sink).unwrap();
            let y = state.store.lock().image().storage().syncs();
            y - y0
        };
        let (state, b) = faulty_store();
        (state, b, stop_syncs)
    }

    /// A migration that fails before its stop's last take (cancelled while the guest runs,
    /// or given up with the guest stopped and resumed) ends the write log its setup
    /// started: no flush after it keeps up a log nobody takes.
    #[test]
    fn a_failed_migration_ends_the_write_log() {
        for resumed in [false, true] {
            let (mut state, b) = faulty_store();
            state.setup(&mut Sink).unwrap();
            assert!(state.store.lock().write_log_pending().is_some());
            if resumed {
                state.resume_source();
                state.reactivate().unwrap();
            } else {
                state.cancel();
            }
            assert_eq!(state.store.lock().write_log_pending(), None, "{resumed}");
            b.mark_dirty(G, 1);
            state.store.lock().flush().unwrap();
            assert_eq!(state.store.lock().write_log_pending(), None, "{resumed}");
        }
    }

    fn faulty_store() -> (SharedDiskState<Faulty>, Arc<DirtyBitmap>) {
        let mut st = BitmapStore::create(
            FaultStorage::new(MemStorage::new(), FaultPlan::new()),
            DISK,
            65536,
        )
        .unwrap();
        st.add("b", G, Recording::Enabled).unwrap();
        st.activate().unwrap();
        let b = st.bitmap("b").unwrap();
        b.mark_dirty(0, 1);
        (SharedDiskState::new(1, "disk", SharedStore::new(st)), b)
    }

    /// A destination whose undo (the inactivate after a failed attempt) fails says so: the
    /// failure is kept (`undo_failed`), the bitmaps stay `in_use`, and `dbm migrate listen`
    /// does not print that the image is inactive again.
    #[test]
    fn a_destination_whose_undo_fails_says_so() {
        let bytes = {
            let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
            st.add("b", G, Recording::Enabled).unwrap();
            st.activate().unwrap();
            st.inactivate().unwrap();
            st.image().storage().to_vec()
        };
        for fail in [false, true] {
            let fs = Arc::new(FaultStorage::new(
                MemStorage::from_bytes(bytes.clone()),
                FaultPlan::new(),
            ));
            let opened = Arc::clone(&fs);
            let mut dest = SharedDiskDest::new("disk", move || {
                BitmapStore::open(Arc::clone(&opened), crate::OpenMode::ReadWrite)
            });
            dest.before_start().unwrap();
            if fail {
                fs.set_plan(FaultPlan::new().fail_sync(Trigger::From(fs.syncs())));
            }
            dest.failed();
            assert_eq!(dest.undo_failed().is_some(), fail);
            let d = BitmapStore::open(
                MemStorage::from_bytes(fs.inner().to_vec()),
                crate::OpenMode::ReadOnly,
            )
            .unwrap();
            if fail {
                assert!(d.list().iter().all(|b| b.in_use), "{:?}", d.list());
            } else {
                assert!(d.list().iter().all(|b| !b.in_use), "{:?}", d.list());
            }
        }
    }

    /// The stop's last barrier fails: the inactivate may have written "clean". It takes
    /// that back before the guest resumes, so the source resumes, and a write of the
    /// resumed guest is never missing from a bitmap the disk calls clean.
    #[test]
    fn a_failed_stop_says_doubt_on_disk_before_the_source_resumes() {
        let (mut state, b, syncs) = faulty_source();
        let plan = |y0| FaultPlan::new().fail_sync(Trigger::Nth(y0 + syncs));
        {
            let st = state.store.lock();
            st.image()
                .storage()
                .set_plan(plan(st.image().storage().syncs()));
        }
        state
            .complete(&mut Sink)
            .expect_err("the last barrier fails");
        state.resume_source();
        state.reactivate().unwrap();
        // The resumed guest writes a granule nothing marked before.
        b.mark_dirty(7 * G, 1);
        let bytes = state.store.lock().image().storage().inner().to_vec();
        let d =
            BitmapStore::open(MemStorage::from_bytes(bytes), crate::OpenMode::ReadOnly).unwrap();
        let info = d.list().into_iter().find(|i| i.name == "b").unwrap();
        if info.state == crate::BitmapState::Consistent {
            assert!(
                d.load("b").unwrap().is_dirty(7 * G),
                "clean on disk without the resumed guest's write"
            );
        }
    }

    /// Every barrier from the stop's last on fails: nothing can take the "clean" back, so
    /// the marks are held and the source is not resumed (the loop reports
    /// `SourceNotResumed`).
    #[test]
    fn a_failed_stop_that_cannot_say_doubt_keeps_the_source_stopped() {
        let (mut state, _, syncs) = faulty_source();
        {
            let st = state.store.lock();
            let y0 = st.image().storage().syncs();
            st.image()
                .storage()
                .set_plan(FaultPlan::new().fail_sync(Trigger::From(y0 + syncs)));
        }
        state
            .complete(&mut Sink)
            .expect_err("the last barrier fails");
        state.resume_source();
        let e = state.reactivate().expect_err("the marks are held");
        assert!(
            matches!(
                e,
                MigrationError::Bitmap(crate::Error::WrongState(StateProblem::MarksHeld))
            ),
            "{e}"
        );
    }

    /// A source state over a store active in durable mode with bitmap "b", set up.
    fn durable_source() -> (SharedDiskState<MemStorage>, SharedStore<MemStorage>) {
        let mut s = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
        s.add("b", G, Recording::Enabled).unwrap();
        s.activate_durable().unwrap();
        let shared = SharedStore::new(s);
        let mut state = SharedDiskState::new(2, "disk", shared.clone());
        state.setup(&mut Sink).unwrap();
        (state, shared)
    }

    /// `e` is the refusal of a store that is not active.
    fn assert_not_active(e: &MigrationError) {
        assert!(
            matches!(
                e,
                MigrationError::Bitmap(crate::Error::WrongState(StateProblem::NotActive))
            ),
            "{e}"
        );
    }

    /// A durable store handed over by the stop, then taken back by another holder of the
    /// `SharedStore` before the fail-back runs: `activate_durable` on the active store
    /// would refuse (`Active`) and leave the source stopped (a deferred store's `activate`
    /// on an active store returns). The fail-back leaves an active store as it is.
    #[test]
    fn a_fail_back_leaves_a_store_another_holder_took_back() {
        let (mut state, shared) = durable_source();
        state.complete(&mut Sink).unwrap();
        assert!(state.handed_over());
        shared.lock().activate_durable().unwrap();
        state.resume_source();
        state.reactivate().unwrap();
        assert!(shared.lock().is_durable());
        assert!(!state.handed_over());
    }

    /// A durable store another holder inactivated during an attempt fails the stop
    /// (`complete`), and the fail-back takes it back durable, the mode its image records,
    /// not the mode an earlier stop recorded (deferred, when none ran): in that mode its
    /// durable trackers would serve nothing.
    #[test]
    fn a_store_inactivated_before_the_stop_is_taken_back_in_the_mode_its_image_records() {
        let (mut state, shared) = durable_source();
        shared.lock().inactivate().unwrap();
        let e = state
            .complete(&mut Sink)
            .expect_err("the store is not active");
        assert_not_active(&e);
        state.resume_source();
        state.reactivate().unwrap();
        let st = shared.lock();
        assert!(st.is_active());
        assert!(
            st.is_durable(),
            "taken back out of the mode its image records"
        );
    }

    /// An attempt that ends `OutcomeUnknown` leaves the store handed over (inactive, clean
    /// on disk). A retry's `setup` that refuses the inactive store keeps the hand-over
    /// flag, so the fail-back's `reactivate` still takes the store back: with the flag
    /// cleared it would do nothing, and the guest would resume on bitmaps the disk calls
    /// clean.
    #[test]
    fn a_retry_after_a_hand_over_still_takes_the_store_back() {
        let (mut state, b) = faulty_store();
        state.complete(&mut Sink).unwrap();
        assert!(state.handed_over());
        let e = state
            .setup(&mut Sink)
            .expect_err("the store is handed over");
        assert_not_active(&e);
        state.resume_source();
        state.reactivate().unwrap();
        assert!(
            state.store.lock().is_active(),
            "the fail-back left the store inactive"
        );
        b.mark_dirty(7 * G, 1);
        let bytes = state.store.lock().image().storage().inner().to_vec();
        let d =
            BitmapStore::open(MemStorage::from_bytes(bytes), crate::OpenMode::ReadOnly).unwrap();
        let info = d.list().into_iter().find(|i| i.name == "b").unwrap();
        assert_eq!(
            info.state,
            crate::BitmapState::Inconsistent,
            "the resumed guest writes on a bitmap the disk calls clean"
        );
    }

    /// The last write log is this state's only pending byte and only the stop sends it:
    /// a figure that counted it as something precopy could send kept the loop from the
    /// exact query a drained RAM needs (see `Pending::stop_only`).
    #[test]
    fn the_last_write_log_is_pending_for_the_stop_only() {
        let (mut state, _shared) = durable_source();
        for exact in [false, true] {
            let p = state.pending(exact);
            assert!(p.must_precopy > Bytes(0), "exact {exact}: {p:?}");
            assert_eq!(p.stop_only, p.must_precopy, "exact {exact}: {p:?}");
            assert_eq!(state.iterate(&mut Sink, Bytes(1 << 20)).unwrap(), Bytes(0));
        }
    }

    /// A link that keeps every payload, for a destination to read.
    #[derive(Default)]
    struct Wire(Vec<Vec<u8>>);

    impl Outbound for Wire {
        fn send(&mut self, _: StateId, payload: &[u8]) -> Result<Bytes> {
            self.0.push(payload.to_vec());
            Ok(Bytes(payload.len() as u64))
        }
        fn control(&mut self, _: &crate::migration::Control) -> Result<Bytes> {
            Ok(Bytes(0))
        }
        fn bytes_sent(&self) -> Bytes {
            Bytes(0)
        }
    }

    /// What the destination answered to what the source sent since the last call.
    fn answers<S: Storage + 'static>(
        wire: &mut Wire,
        dest: &mut SharedDiskDest<S>,
    ) -> Vec<Vec<u8>> {
        std::mem::take(&mut wire.0)
            .iter()
            .filter_map(|p| dest.section(p).unwrap())
            .collect()
    }

    /// The guest writes at `at` (bitmap "b"), a flush writes it, and its log goes out.
    fn write_and_log<S: Storage>(state: &mut SharedDiskState<S>, wire: &mut Wire, at: u64) {
        state.store.lock().bitmap("b").unwrap().mark_dirty(at, 1);
        state.flush().unwrap();
        state.after_flush(wire).unwrap();
    }

    /// A source on an active store and a destination on the same image, preloading
    /// through `preload` (read-only opens of the image) unless it is `None`.
    fn shared_pair(
        preload: bool,
    ) -> (
        SharedDiskState<Arc<MemStorage>>,
        SharedDiskDest<Arc<MemStorage>>,
        Arc<MemStorage>,
    ) {
        let mem = Arc::new(MemStorage::new());
        let mut st = BitmapStore::create(Arc::clone(&mem), DISK, 65536).unwrap();
        st.add("b", G, Recording::Enabled).unwrap();
        st.activate().unwrap();
        st.bitmap("b").unwrap().mark_dirty(0, 1);
        let state = SharedDiskState::new(1, "disk", SharedStore::new(st));
        let (w, r) = (Arc::clone(&mem), Arc::clone(&mem));
        let dest = SharedDiskDest::new("disk", move || {
            BitmapStore::open(Arc::clone(&w), crate::OpenMode::ReadWrite)
        });
        let dest = if preload {
            dest.with_preload(move || BitmapStore::open(Arc::clone(&r), crate::OpenMode::ReadOnly))
        } else {
            dest
        };
        (state, dest, mem)
    }

    /// The source priced the destination's activate as a read of the last log's regions
    /// from its setup on, whether or not the destination preloaded: one built without a
    /// preload (or whose preload failed) loaded every bitmap inside the downtime, in no
    /// figure. Now the figure holds the whole load until the destination says its preload
    /// follows the log, and again from a whole LOG until it says so anew; and it waits
    /// until the BEGIN and each whole LOG are answered, following or not (found by a
    /// review: a switchover sent while the preload still ran waited for it, inside the
    /// downtime).
    #[test]
    fn the_destinations_activate_is_priced_whole_until_it_says_its_preload_follows() {
        for preload in [true, false] {
            let (mut state, mut dest, _) = shared_pair(preload);
            dest.hello(1, Binding::default()).unwrap();
            let mut wire = Wire::default();
            state.setup(&mut wire).unwrap();
            // Timings as a large bitmap's: its whole load far above a read of a few
            // regions (those measured here are a millisecond or less either way).
            state.dest_per_region = std::time::Duration::from_micros(10);
            state.dest_commit = std::time::Duration::from_millis(1);
            state.dest_activate = Some(std::time::Duration::from_millis(500));
            let whole = state.dest_time();
            assert_eq!(whole, Millis(500));
            assert_eq!(state.pending(false).dest_disk_time, whole);
            assert_eq!(state.pending(true).dest_disk_time, whole);
            assert!(!state.dest_follows_log());
            assert!(state.pending(false).awaiting_destination);
            assert!(state.pending(true).awaiting_destination);
            let told = answers(&mut wire, &mut dest);
            assert_eq!(told.len(), 1, "preload {preload}: {told:?}");
            assert_eq!(
                disk_log_codec::decode_report(&told[0]).unwrap().following,
                preload
            );
            state.notice(&told[0]).unwrap();
            assert!(
                !state.pending(true).awaiting_destination,
                "preload {preload}"
            );
            assert_eq!(state.dest_follows_log(), preload);
            if !preload {
                assert_eq!(state.pending(true).dest_disk_time, whole);
                continue;
            }
            let following = state.pending(true).dest_disk_time;
            assert!(following < Millis(100), "{following:?}");
            // A flush and its log: the destination says it applied it.
            write_and_log(&mut state, &mut wire, 1 << 30);
            let told = answers(&mut wire, &mut dest);
            assert_eq!(told.len(), 1, "{told:?}");
            let r = disk_log_codec::decode_report(&told[0]).unwrap();
            assert!(r.following && r.after == 0 && r.through == 1, "{r:?}");
            state.notice(&told[0]).unwrap();
            assert!(state.dest_follows_log());
            // A directory commit makes the log whole: priced whole until the
            // destination's new preload says it follows from there.
            state.store.lock().add("c", G, Recording::Disabled).unwrap();
            write_and_log(&mut state, &mut wire, 2 << 30);
            assert!(!state.dest_follows_log());
            assert!(state.pending(false).awaiting_destination);
            assert_eq!(state.pending(false).dest_disk_time, whole);
            let told = answers(&mut wire, &mut dest);
            assert_eq!(told.len(), 1, "{told:?}");
            // The report of the first preload, arriving late, changes nothing.
            let stale = disk_log_codec::encode_report(disk_log_codec::PreloadReport {
                following: true,
                id: state.log_id,
                after: 0,
                through: 0,
            });
            state.notice(&stale).unwrap();
            assert!(!state.dest_follows_log());
            assert!(state.pending(false).awaiting_destination, "a stale answer");
            state.notice(&told[0]).unwrap();
            assert!(state.dest_follows_log());
            assert!(!state.pending(false).awaiting_destination);
            // After the switchover the destination tells nothing more, the last log
            // included.
            dest.switchover(false);
            state.complete(&mut wire).unwrap();
            assert!(answers(&mut wire, &mut dest).is_empty());
        }
    }

    /// An activate that starts from its preload's walk still reads the header, every
    /// bitmap's table and the refcount blocks behind the bitmaps' clusters. The walk's
    /// price covers them while the walk is in the figure (it reads them too); once the walk
    /// has left the figure, the figure prices them itself. With 9 bitmaps and a millisecond
    /// per read, nothing logged, the following figure holds at least the 9 tables and the
    /// header.
    #[test]
    fn a_following_destinations_figure_holds_the_reads_of_its_activates_checks() {
        let (mut state, mut dest, _) = shared_pair(true);
        for i in 0..8 {
            state
                .store
                .lock()
                .add(&format!("more{i}"), G, Recording::Enabled)
                .unwrap();
        }
        dest.hello(1, Binding::default()).unwrap();
        let mut wire = Wire::default();
        state.setup(&mut wire).unwrap();
        state.dest_per_region = std::time::Duration::from_millis(1);
        state.dest_commit = std::time::Duration::ZERO;
        state.dest_activate = Some(std::time::Duration::from_secs(10));
        let told = answers(&mut wire, &mut dest);
        assert_eq!(told.len(), 1, "{told:?}");
        state.notice(&told[0]).unwrap();
        assert!(state.dest_follows_log());
        let figure = state.pending(true).dest_disk_time;
        assert!(figure >= Millis(10), "{figure:?}");
        assert!(figure < Millis(10_000), "{figure:?}");
    }

    /// The destination answers its BEGIN once the preload ended, but the LOGs the source
    /// sent meanwhile are still queued before it, and it reads their regions (and a table
    /// per bitmap, each LOG on its own) before it reads the switchover: inside the
    /// downtime, so the figure counts more than the last log's regions. Every LOG sent is
    /// priced, beyond any whole load, until the destination says it applied it (a report
    /// per LOG applied while it follows), and the figure waits until it caught up on the
    /// LOGs sent before its answer was read; later LOGs are priced, not waited for (a
    /// report's lag would hold the switchover).
    #[test]
    fn logs_the_destination_has_not_applied_are_priced_until_it_says_it_did() {
        let (mut state, mut dest, _) = shared_pair(true);
        dest.hello(1, Binding::default()).unwrap();
        let mut wire = Wire::default();
        state.setup(&mut wire).unwrap();
        // A millisecond per region read, nothing else, and a whole load of 5 ms: the
        // figure counts reads, past the whole load.
        state.dest_per_region = std::time::Duration::from_millis(1);
        state.dest_commit = std::time::Duration::ZERO;
        state.dest_activate = Some(std::time::Duration::from_millis(5));
        // The activate's own checks, a read each, come on top of what the LOGs name (the
        // last log's part of the figure is at most the whole load).
        let c = state.store.lock().activate_check_reads().unwrap().min(5);
        // Three LOGs of four regions each, in four data clusters (16 regions each), so
        // each region is read alone (six reads with the table and the header's sector),
        // go out while the destination preloads: queued behind the BEGIN.
        let b = state.store.lock().bitmap("b").unwrap();
        let log = |state: &mut SharedDiskState<_>, wire: &mut Wire, k: u64| {
            for j in 0..4u64 {
                b.mark_dirty(b.region_disk_range(1 + (k * 4 + j) * 16).0, 1);
            }
            state.flush().unwrap();
            state.after_flush(wire).unwrap();
        };
        for k in 0..3 {
            log(&mut state, &mut wire, k);
        }
        // The destination answers BEGIN, then applies each LOG and says so.
        let told = answers(&mut wire, &mut dest);
        assert_eq!(told.len(), 4, "{told:?}");
        state.notice(&told[0]).unwrap();
        assert!(state.dest_follows_log());
        for k in 0..3u64 {
            // Catching up: priced, and waited for.
            let p = state.pending(false);
            assert_eq!(p.dest_disk_time, Millis(c + 6 * (3 - k)));
            assert!(p.awaiting_destination, "LOG {} of 3 not applied", k + 1);
            let d = disk_log_codec::decode_report(&told[k as usize + 1]).unwrap();
            assert!(d.following && d.through == k + 1, "{d:?}");
            state.notice(&told[k as usize + 1]).unwrap();
        }
        let p = state.pending(false);
        assert_eq!(p.dest_disk_time, Millis(c));
        assert!(!p.awaiting_destination);
        // Caught up: later LOGs are priced until reported applied, never waited for.
        for k in 3..6 {
            log(&mut state, &mut wire, k);
            let p = state.pending(false);
            assert_eq!(p.dest_disk_time, Millis(c + 6 * (k - 2)));
            assert!(!p.awaiting_destination);
        }
        assert_eq!(state.reports_outstanding(), 3);
        for r in answers(&mut wire, &mut dest) {
            state.notice(&r).unwrap();
        }
        assert_eq!(state.pending(false).dest_disk_time, Millis(c));
        assert_eq!(state.reports_outstanding(), 0);
    }

    /// The reports a following destination still owes at the stop are counted even when
    /// the stop's last LOG is whole (a directory commit between the exact figure and the
    /// stop): that LOG is answered by Started, not by a report, and the earlier LOGs'
    /// reports still come.
    #[test]
    fn a_whole_last_log_keeps_the_reports_still_coming_counted() {
        let (mut state, mut dest, _) = shared_pair(true);
        dest.hello(1, Binding::default()).unwrap();
        let mut wire = Wire::default();
        state.setup(&mut wire).unwrap();
        for r in answers(&mut wire, &mut dest) {
            state.notice(&r).unwrap();
        }
        for at in [1u64 << 30, 2 << 30, 3 << 30] {
            write_and_log(&mut state, &mut wire, at);
        }
        assert_eq!(state.reports_outstanding(), 3);
        state.store.lock().add("c", G, Recording::Disabled).unwrap();
        state.complete(&mut wire).unwrap();
        assert!(
            state.reports_outstanding() >= 3,
            "{}",
            state.reports_outstanding()
        );
    }

    /// A report that names a log this attempt never began, a take it never sent, or that
    /// does not decode fails the attempt; so does one to a source that began no log.
    #[test]
    fn a_preload_report_for_another_log_or_a_take_never_sent_is_refused() {
        let (mut state, _, _) = shared_pair(false);
        let report = |id, after, through| {
            disk_log_codec::encode_report(disk_log_codec::PreloadReport {
                following: true,
                id,
                after,
                through,
            })
        };
        assert!(state.notice(&report(1, 0, 0)).is_err(), "no log begun");
        state.setup(&mut Wire::default()).unwrap();
        let id = state.log_id;
        assert!(state.notice(&report(id ^ 1, 0, 0)).is_err());
        assert!(
            state.notice(&report(id, 1, 1)).is_err(),
            "take 1 never sent"
        );
        assert!(
            state.notice(&report(id, 0, 1)).is_err(),
            "take 1 never sent, so never applied"
        );
        assert!(state.notice(&[1, 2, 3]).is_err());
        assert!(!state.dest_follows_log());
        state.notice(&report(id, 0, 0)).unwrap();
        assert!(state.dest_follows_log());
        // A "not following" for the same preload prices it whole again.
        let mut stopped = report(id, 0, 0);
        stopped[0] = 0;
        state.notice(&stopped).unwrap();
        assert!(!state.dest_follows_log());
        // A destination that said it does not follow applies no LOG: none is kept for it
        // (a long migration would keep them all).
        write_and_log(&mut state, &mut Wire::default(), 1 << 30);
        assert!(state.unapplied.is_empty(), "{:?}", state.unapplied);
    }

    /// A preload that followed and then could not read what a log names says it stopped.
    #[test]
    fn a_destination_says_when_its_preload_stops_following() {
        let (mut state, mut dest, mem) = shared_pair(true);
        dest.hello(1, Binding::default()).unwrap();
        let mut wire = Wire::default();
        state.setup(&mut wire).unwrap();
        let told = answers(&mut wire, &mut dest);
        assert_eq!(told.len(), 1);
        state.notice(&told[0]).unwrap();
        // A log whose region the reader cannot read: the image cut short under it.
        state
            .store
            .lock()
            .bitmap("b")
            .unwrap()
            .mark_dirty(3 << 30, 1);
        state.flush().unwrap();
        let len = mem.len().unwrap();
        state.after_flush(&mut wire).unwrap();
        let bytes = mem.to_vec();
        mem.set_len(4096).unwrap();
        let told = answers(&mut wire, &mut dest);
        mem.set_len(len).unwrap();
        mem.write_all_at(&bytes, 0).unwrap();
        assert_eq!(told.len(), 1, "{told:?}");
        let r = disk_log_codec::decode_report(&told[0]).unwrap();
        assert!(!r.following, "{r:?}");
        state.notice(&told[0]).unwrap();
        assert!(!state.dest_follows_log());
    }

    type SharedFaulty = Arc<FaultStorage<MemStorage>>;

    /// A source on an active store of `names` (each with one bit) on a fault-injecting
    /// storage, and a destination whose preload, once its open read the directory, makes
    /// reads fail from `fail(reads so far + 1)`.
    fn faulty_preload(
        names: &[&str],
        fail: fn(u64) -> Trigger,
    ) -> (
        SharedFaulty,
        SharedDiskState<SharedFaulty>,
        SharedDiskDest<SharedFaulty>,
    ) {
        let fs: SharedFaulty = Arc::new(FaultStorage::new(MemStorage::new(), FaultPlan::new()));
        let mut st = BitmapStore::create(Arc::clone(&fs), DISK, 65536).unwrap();
        for name in names {
            st.add(name, G, Recording::Enabled).unwrap();
        }
        st.activate().unwrap();
        for name in names {
            st.bitmap(name).unwrap().mark_dirty(0, 1);
        }
        let state = SharedDiskState::new(1, "disk", SharedStore::new(st));
        let (w, r) = (Arc::clone(&fs), Arc::clone(&fs));
        let dest = SharedDiskDest::new("disk", move || {
            BitmapStore::open(Arc::clone(&w), crate::OpenMode::ReadWrite)
        })
        .with_preload(move || {
            let reader = BitmapStore::open(Arc::clone(&r), crate::OpenMode::ReadOnly)?;
            r.set_plan(FaultPlan::new().fail_read(fail(r.reads() + 1)));
            Ok(reader)
        });
        (fs, state, dest)
    }

    /// A preload that could not read a bitmap skips it (the activate then loads it whole),
    /// so it does not say it follows the log: the source would price the activate as a read
    /// of the last log's regions. Only a preload that holds every bitmap, each kept up to
    /// date, says so.
    #[test]
    fn a_preload_that_could_not_read_a_bitmap_never_says_it_follows() {
        // Every read after the open fails: the preload reads no bitmap.
        let (fs, mut state, mut dest) = faulty_preload(&["b"], Trigger::From);
        dest.hello(1, Binding::default()).unwrap();
        let mut wire = Wire::default();
        state.setup(&mut wire).unwrap();
        let mut told = answers(&mut wire, &mut dest);
        fs.set_plan(FaultPlan::new());
        write_and_log(&mut state, &mut wire, 1 << 30);
        told.extend(answers(&mut wire, &mut dest));
        // BEGIN answered once, "not following"; the log changes nothing.
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(!disk_log_codec::decode_report(&told[0]).unwrap().following);
        state.notice(&told[0]).unwrap();
        assert!(!state.dest_follows_log());
        assert!(!state.pending(true).awaiting_destination);
        assert_eq!(state.pending(true).dest_disk_time, state.dest_time());
    }

    /// A preload that skipped a bitmap answers "not following" (the source prices a whole
    /// load and keeps no LOG for it), and reads nothing a later LOG names: each such read,
    /// queued before the switchover, would be downtime in no figure.
    #[test]
    fn a_preload_that_does_not_follow_reads_no_log() {
        // The first read after the open fails: the first bitmap is skipped, the other
        // preloaded.
        let (fs, mut state, mut dest) = faulty_preload(&["a", "b"], Trigger::Nth);
        dest.hello(1, Binding::default()).unwrap();
        let mut wire = Wire::default();
        state.setup(&mut wire).unwrap();
        let told = answers(&mut wire, &mut dest);
        assert_eq!(told.len(), 1, "{told:?}");
        assert!(!disk_log_codec::decode_report(&told[0]).unwrap().following);
        state.notice(&told[0]).unwrap();
        fs.set_plan(FaultPlan::new());
        // LOGs naming regions of both bitmaps: the destination reads none of them.
        for at in [1u64 << 30, 2 << 30, 3 << 30] {
            state.store.lock().bitmap("a").unwrap().mark_dirty(at, 1);
            write_and_log(&mut state, &mut wire, at);
        }
        let before = fs.reads();
        let more = answers(&mut wire, &mut dest);
        assert!(more.is_empty(), "{more:?}");
        assert_eq!(
            fs.reads(),
            before,
            "the destination read what the LOGs name"
        );
        assert!(state.unapplied.is_empty());
        assert_eq!(state.pending(true).dest_disk_time, state.dest_time());
    }

    #[test]
    fn the_flush_before_the_exact_query_runs_until_it_stops_shrinking() {
        let once = left_after(false);
        let converged = left_after(true);
        assert!((100..=140).contains(&once), "one flush left {once} regions");
        assert!(
            converged <= 8,
            "the converging flush left {converged} regions"
        );
    }
}
