//! What the loop migrates: [`MigrationState`]s (QEMU's savevm handlers), and what each
//! still has to send ([`Pending`]).

use super::channel::Outbound;
use super::error::{MigrationError, Result};
use super::frame::StateId;
use crate::flush::FlushStats;
use crate::units::{Bytes, Millis};

/// What a state still has to do before the destination can run: bytes to send, split as
/// QEMU splits them, and time the stop spends off the wire (a disk bitmap's final flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// Bytes that must reach the destination before it can run (with the VM stopped, they
    /// are all downtime).
    pub must_precopy: Bytes,
    /// Bytes the destination can pull after it started (postcopy).
    pub can_postcopy: Bytes,
    /// Time spent on storage between the stop and the destination's start (for a
    /// [`super::disk::SharedDiskState`], the source's incremental inactivate: its
    /// remaining regions and the flags commit at the measured disk rate and barrier
    /// latency; and the destination's activate of the same image: its load of the
    /// bitmaps, timed at setup, and its flags commit). It is downtime in both modes, and
    /// the loop takes it off the downtime limit before it turns the rest into a byte
    /// threshold. [`Millis::MAX`] while the state cannot tell (no disk measurement yet):
    /// no switchover then.
    pub disk_time: Millis,
    /// Of `disk_time`, the destination's part: for a [`super::disk::SharedDiskState`],
    /// its activate of the image (the regions it reads again and its flags commit), as the
    /// source timed it when it took this figure. Never more than `disk_time` (which is
    /// [`Millis::MAX`] while the source's own part cannot be timed yet); zero for states
    /// the destination starts without storage work; [`Millis::MAX`] when the state cannot
    /// tell.
    pub dest_disk_time: Millis,
    /// Of `must_precopy`, the bytes only the stop sends (a
    /// [`super::disk::SharedDiskState`]'s last write log): no
    /// [`iterate`](MigrationState::iterate) sends them while the VM runs. A figure with
    /// nothing but these and the control frames has nothing left to send as of the last
    /// sync, and the loop runs the exact query that finds what the guest changed since
    /// (a threshold of 0 would otherwise keep it from ever looking). Never more than
    /// `must_precopy`.
    pub stop_only: Bytes,
    /// The state's figure waits on its destination, whose answers decide what the
    /// downtime holds: for a [`super::disk::SharedDiskState`], the destination's preload
    /// report for the source's BEGIN or last whole LOG (its preload runs in the thread
    /// that reads the stream, so a switchover before it answered would wait, inside the
    /// downtime, for the rest of it), and then its reports that it applied the LOGs sent
    /// before that answer was read (queued behind the preload, each read before the
    /// switchover). No switchover while any state waits: the loop runs no exact query, no
    /// stall guard counts a turn spent waiting, and the wait is bounded by
    /// [`super::LoopConfig::answer_timeout`].
    pub awaiting_destination: bool,
}

impl Pending {
    /// Every byte: what a precopy switchover would send with the VM stopped.
    pub fn total(self) -> Bytes {
        self.must_precopy + self.can_postcopy
    }
}

impl std::ops::Add for Pending {
    type Output = Pending;
    fn add(self, rhs: Pending) -> Pending {
        Pending {
            must_precopy: self.must_precopy + rhs.must_precopy,
            can_postcopy: self.can_postcopy + rhs.can_postcopy,
            // The states' stops run one after the other.
            disk_time: self.disk_time + rhs.disk_time,
            dest_disk_time: self.dest_disk_time + rhs.dest_disk_time,
            stop_only: self.stop_only + rhs.stop_only,
            awaiting_destination: self.awaiting_destination || rhs.awaiting_destination,
        }
    }
}

/// One migrated piece of the guest (RAM, a device, a dirty bitmap), driven by the loop.
///
/// Every byte goes through the [`Outbound`] the loop passes in, which makes the same state
/// work over a real stream and under the virtual clock. The contract that keeps the
/// downtime within its limit: after [`pending(true)`](Self::pending) returned `p` with the
/// guest stopped right after, [`complete`](Self::complete) puts at most `p.total()` bytes
/// on the wire (framing included), and [`postcopy_start`](Self::postcopy_start) at most
/// `p.must_precopy`.
pub trait MigrationState {
    /// The section id of this state in the stream.
    fn id(&self) -> StateId;

    /// Its name in the Hello frame (unique, 1..=255 bytes; RAM is
    /// [`super::ram_codec::RAM_STATE_NAME`]).
    fn name(&self) -> &str;

    /// Guest RAM geometry for the Hello frame, `(page size, pages)`, if this state is the
    /// guest's RAM. At most one state of a migration may say so.
    fn ram_geometry(&self) -> Option<(u32, u64)> {
        None
    }

    /// Whether this state is the guest's RAM and its first pass sends only what an earlier
    /// attempt left dirty ([`super::SetupMode::Incremental`]), for the Hello frame
    /// ([`super::frame::Hello::incremental`]): a destination that did not keep that
    /// attempt's RAM then refuses the Hello. The default: no.
    fn ram_incremental(&self) -> bool {
        false
    }

    /// The guest's migration id for the Hello frame, if this state is the guest's RAM:
    /// the same for every attempt of the same guest, different for another guest.
    fn migration_id(&self) -> Option<u64> {
        None
    }

    /// Starts the migration (the VM is running), after the loop sent the Hello. A state
    /// learns the channel's framing cost here ([`Outbound::section_overhead`]) for its
    /// pending figures.
    ///
    /// # Errors
    /// The channel's error.
    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes>;

    /// What is left to send. The estimate (`exact == false`) is cheap and may be stale: it
    /// does not see what the guest changed since the last exact query. The exact figure
    /// first collects those changes.
    fn pending(&mut self, exact: bool) -> Pending;

    /// Whether the state's [`setup`](Self::setup) asked its destination counterpart what it
    /// kept from an earlier attempt of the same migration, and the state sends nothing more
    /// until it hears ([`report`](Self::report)). After every state's setup and before the
    /// first precopy turn, the loop waits for one [`super::DestMessage::Report`] per state
    /// that says so. The default: no.
    fn awaits_report(&self) -> bool {
        false
    }

    /// The destination's answer to the query of [`setup`](Self::setup), in the state's own
    /// format.
    ///
    /// # Errors
    /// A report the state refuses (one that names data it never sent: hostile or corrupt);
    /// the attempt fails. The default refuses every report: the state asked nothing.
    fn report(&mut self, payload: &[u8]) -> Result<()> {
        let _ = payload;
        Err(MigrationError::InvalidInput(format!(
            "state {} asked its destination nothing",
            self.name()
        )))
    }

    /// A Report its destination counterpart sent unasked during precopy (every Report for
    /// a state that is not awaiting [`report`](Self::report)'s answer), in the state's own
    /// format: news the state's figures may use, such as a shared-storage destination's
    /// preload ([`super::disk::SharedDiskState`]). One still in flight at the switchover
    /// is too late for any figure: the loop skips it while it waits for Started (a
    /// destination sends none once it read the switchover).
    ///
    /// # Errors
    /// A payload the state refuses; the attempt fails. The default refuses every one: the
    /// state's destination has nothing to tell it.
    fn notice(&mut self, payload: &[u8]) -> Result<()> {
        let _ = payload;
        Err(MigrationError::InvalidInput(format!(
            "state {} takes no news from its destination",
            self.name()
        )))
    }

    /// How many Reports its destination counterpart may still send unasked for sections
    /// already sent (a shared disk's: one per write LOG not yet reported applied, and the
    /// answer to its BEGIN or last whole LOG while it has not come). While it waits for
    /// Started, the loop skips that many besides its fixed allowance. The default: none.
    fn reports_outstanding(&self) -> usize {
        0
    }

    /// Sends up to about `budget` bytes (a state may overshoot by one batch) while the VM
    /// runs, and returns the bytes put on the wire.
    ///
    /// # Errors
    /// The channel's error.
    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes>;

    /// Work off the wire while the VM runs: a disk state writes its changed regions here,
    /// so that the stop only writes what changed since. The loop calls it once per
    /// measurement window, whatever the rate limiter allows, and again right before each
    /// exact query (the figure that may decide the switchover), and counts the bytes it
    /// returns (written to the state's storage) as progress for the stall guards. The
    /// default does nothing.
    ///
    /// # Errors
    /// The storage's error; the attempt then fails before the switchover.
    fn flush(&mut self) -> Result<Bytes> {
        Ok(Bytes(0))
    }

    /// The [`flush`](Self::flush) right before an exact query. The guest keeps writing
    /// while a flush runs, so what it writes meanwhile is left for the stop; a state may
    /// therefore flush again here while each round leaves less than the one before, so
    /// that the exact figure (and the stop, if it follows) holds only what changes during
    /// the last, shortest round. Counted as [`flush`](Self::flush) is. The default is one
    /// [`flush`](Self::flush).
    ///
    /// # Errors
    /// As [`flush`](Self::flush).
    fn flush_before_exact(&mut self) -> Result<Bytes> {
        self.flush()
    }

    /// Right after each [`flush`](Self::flush) or
    /// [`flush_before_exact`](Self::flush_before_exact), while the VM runs: tells the
    /// destination what that flush changed on storage both hosts share, so that its
    /// start reads only what changed after (a [`super::SharedDiskState`] sends its write
    /// log). Returns the bytes put on the wire. The default sends nothing.
    ///
    /// # Errors
    /// The channel's error; the attempt then fails before the switchover.
    fn after_flush(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        let _ = out;
        Ok(Bytes(0))
    }

    /// Sends everything left, with the VM stopped (and its disk I/O drained: see
    /// [`super::Vm::stop`]). A disk state writes its remainder and hands its storage over
    /// here; the time counts in the downtime.
    ///
    /// # Errors
    /// The channel's error.
    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes>;

    /// The VM stopped for the switchover: called once, right after the stop, before the
    /// loop's exact query at the stop and [`complete`](Self::complete) or
    /// [`postcopy_start`](Self::postcopy_start). A state that syncs a dirty log in both
    /// may take the query's sync as its last (the guest writes nothing more), so that the
    /// downtime holds one sync, not two. The default does nothing; a state that wraps
    /// another passes it on.
    fn stopped(&mut self) {}

    /// What the state wrote to its own storage inside the downtime (in
    /// [`complete`](Self::complete) or [`postcopy_start`](Self::postcopy_start)): bytes,
    /// barriers and time, for [`super::Outcome::disk_stop`]. The default: nothing.
    fn disk_stop(&self) -> FlushStats {
        FlushStats::default()
    }

    /// Postcopy switch, with the VM stopped: sends what the destination needs before it
    /// can run (for RAM, which of its pages are stale or missing). Afterwards
    /// [`iterate`](Self::iterate) pushes the rest in the background and
    /// [`serve`](Self::serve) answers the destination's requests.
    ///
    /// A state without postcopy support keeps the default, which sends everything now
    /// ([`complete`](Self::complete)); its pending figure is then all `must_precopy`.
    ///
    /// # Errors
    /// The channel's error.
    fn postcopy_start(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.complete(out)
    }

    /// Postcopy: answers the destination's request (the payload of its PageRequest frame,
    /// in this state's own format) now.
    ///
    /// # Errors
    /// The channel's error; [`MigrationError::Frame`] or [`MigrationError::Protocol`] for a
    /// request that does not decode or lies outside the state; [`MigrationError::InvalidInput`]
    /// for a state that cannot postcopy.
    fn serve(&mut self, out: &mut dyn Outbound, request: &[u8]) -> Result<Bytes> {
        let _ = (out, request);
        Err(MigrationError::InvalidInput(format!(
            "state {} does not support postcopy",
            self.name()
        )))
    }

    /// The attempt failed in a way that does not prove the destination applied everything
    /// sent (a cut, a timeout, a corrupt stream, an Abort from the destination, and also a
    /// cancel once any section went out: the destination may fail on a section still in
    /// flight): what was sent before the last sync may never have been applied, so it must
    /// go back as dirty too. The loop calls this before [`cancel`](Self::cancel) or
    /// [`resume_source`](Self::resume_source); not after a refusal (the destination
    /// applied everything up to End) nor after a cancel before any section.
    ///
    /// The default does nothing, which is right only for a state whose `cancel` already
    /// re-dirties everything it sent in the attempt. RAM re-dirties every page sent in
    /// the attempt ([`super::ram::RamState::redirty_undelivered`] with 0), unless told
    /// that its caller reconciles with the destination's applied count.
    fn channel_failed(&mut self) {}

    /// The attempt failed before the switchover (the VM kept running): put back, as dirty,
    /// everything the destination may not have, so that a retry sends only that.
    fn cancel(&mut self);

    /// The hand-over failed after [`complete`](Self::complete) (the destination did not
    /// start): as [`cancel`](Self::cancel), before the loop resumes the VM.
    fn resume_source(&mut self);

    /// After [`resume_source`](Self::resume_source), before the VM resumes: take back
    /// what the stop handed over (a disk state activates its store again, so that the
    /// guest's next writes are marked on an `in_use` bitmap, not on one the disk says is
    /// clean). The default does nothing.
    ///
    /// # Errors
    /// The state cannot take its storage back (another process holds it, or it changed
    /// in a way that cannot be reconciled): the loop then leaves the VM stopped and
    /// returns [`MigrationError::SourceNotResumed`].
    fn reactivate(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_adds() {
        let a = Pending {
            must_precopy: Bytes(1),
            can_postcopy: Bytes(2),
            disk_time: Millis(3),
            dest_disk_time: Millis(1),
            stop_only: Bytes(1),
            awaiting_destination: false,
        };
        assert_eq!((a + a).total(), Bytes(6));
        // Two states' stops run one after the other.
        assert_eq!((a + a).disk_time, Millis(6));
        assert_eq!((a + a).dest_disk_time, Millis(2));
        assert_eq!((a + a).stop_only, Bytes(2));
        // One state that waits on its destination holds the whole figure.
        let waits = Pending {
            awaiting_destination: true,
            ..a
        };
        assert!(!(a + a).awaiting_destination);
        assert!((a + waits).awaiting_destination);
        assert!((waits + a).awaiting_destination);
    }
}
