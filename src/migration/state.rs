//! What the loop migrates: [`MigrationState`]s (QEMU's savevm handlers), and what it hears
//! back from the destination ([`Inbound`], [`DestMessage`]).

use super::error::{MigrationError, Result};
use super::units::Bytes;
use super::{Outbound, StateId};

/// Bytes a state still has to send, split as QEMU splits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// Bytes that must reach the destination before it can run (with the VM stopped, they
    /// are all downtime).
    pub must_precopy: Bytes,
    /// Bytes the destination can pull after it started (postcopy).
    pub can_postcopy: Bytes,
}

impl Pending {
    /// Everything: what a precopy switchover would send with the VM stopped.
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

    /// A short name for reports.
    fn name(&self) -> &str;

    /// Starts the migration (the VM is running).
    ///
    /// # Errors
    /// The channel's error.
    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes>;

    /// What is left to send. The estimate (`exact == false`) is cheap and may be stale: it
    /// does not see what the guest changed since the last exact query. The exact figure
    /// first collects those changes.
    fn pending(&mut self, exact: bool) -> Pending;

    /// Sends up to about `budget` bytes (a state may overshoot by one batch) while the VM
    /// runs, and returns the bytes put on the wire.
    ///
    /// # Errors
    /// The channel's error.
    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes>;

    /// Sends everything left, with the VM stopped.
    ///
    /// # Errors
    /// The channel's error.
    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes>;

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

    /// Postcopy: sends the bytes `[offset, offset + len)` the destination asked for, now.
    ///
    /// # Errors
    /// The channel's error; [`MigrationError::InvalidInput`] for a range outside the state
    /// or a state that cannot postcopy.
    fn serve(&mut self, out: &mut dyn Outbound, offset: u64, len: u64) -> Result<Bytes> {
        let _ = (out, offset, len);
        Err(MigrationError::InvalidInput(format!(
            "state {} does not support postcopy",
            self.name()
        )))
    }

    /// The attempt failed before the switchover (the VM kept running): put back, as dirty,
    /// everything the destination may not have, so that a retry sends only that.
    fn cancel(&mut self);

    /// The hand-over failed after [`complete`](Self::complete) (the destination did not
    /// start): as [`cancel`](Self::cancel), before the loop resumes the VM.
    fn resume_source(&mut self);
}

/// A message from the destination to the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestMessage {
    /// The destination resumed the guest (after a precopy completion or a postcopy
    /// switch). The downtime ends here.
    Started,
    /// The destination will not start the guest; the reason.
    Refused(String),
    /// Postcopy: the destination's guest touched bytes it does not have.
    PageRequest {
        /// The state (section) the bytes belong to.
        state: StateId,
        /// Offset within the state.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Postcopy: the destination has every byte of every state.
    Done,
}

/// The return path: messages from the destination. Over TCP it is a receiving thread
/// feeding a channel; under the virtual clock, the simulated destination's queue.
pub trait Inbound {
    /// The next message if one has arrived, without waiting.
    ///
    /// # Errors
    /// The channel's error.
    fn try_recv(&mut self) -> Result<Option<DestMessage>>;

    /// Waits for the next message.
    ///
    /// # Errors
    /// The channel's error, or [`MigrationError::PeerAborted`] when the destination is
    /// gone.
    fn recv(&mut self) -> Result<DestMessage>;
}

/// The loop's own section: control messages to the destination.
pub const CONTROL: StateId = 0;

/// A control message of the loop (section [`CONTROL`]); one byte on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Precopy complete: every state sent everything; the destination may start.
    Complete = 1,
    /// Postcopy switch: the destination may start and pull what it misses.
    PostcopyRun = 2,
    /// Postcopy: every state sent everything.
    PostcopyDone = 3,
}

impl Control {
    /// The payload.
    pub fn encode(self) -> [u8; 1] {
        [self as u8]
    }

    /// Parses a payload.
    ///
    /// # Errors
    /// [`MigrationError::Stream`] for anything but one known byte.
    pub fn decode(payload: &[u8]) -> Result<Control> {
        match payload {
            [1] => Ok(Control::Complete),
            [2] => Ok(Control::PostcopyRun),
            [3] => Ok(Control::PostcopyDone),
            _ => Err(MigrationError::Stream(format!(
                "bad control message {payload:02x?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_round_trips() {
        for c in [
            Control::Complete,
            Control::PostcopyRun,
            Control::PostcopyDone,
        ] {
            assert_eq!(Control::decode(&c.encode()).unwrap(), c);
        }
        assert!(Control::decode(&[]).is_err());
        assert!(Control::decode(&[4]).is_err());
        assert!(Control::decode(&[1, 1]).is_err());
    }

    #[test]
    fn pending_adds() {
        let a = Pending {
            must_precopy: Bytes(1),
            can_postcopy: Bytes(2),
        };
        assert_eq!((a + a).total(), Bytes(6));
    }
}
