//! The loop's two directions: [`Outbound`], where the loop and its states put what they
//! send, and [`Inbound`], the return path that brings the destination's [`DestMessage`]s.

use super::error::Result;
use super::frame::{control_wire_len, Control, FrameKind, StateId, SECTION_OVERHEAD};
use crate::units::Bytes;

/// Where the loop and its states put what they send: a framed stream over a real channel
/// ([`super::stream::FrameWriter`]), or a simulated link under the virtual clock ([`super::sim::Sim`]).
/// The loop only ever sends through this trait, and both implementations put the same
/// bytes on the wire (the stream's frames), so the pending figures, counted in wire bytes,
/// mean the same thing under both clocks.
pub trait Outbound {
    /// Sends one opaque payload of state `state` (a Section frame), and returns the bytes it
    /// put on the wire (payload plus framing). May block for the rate limiter.
    ///
    /// # Errors
    /// The channel's error; the attempt is then over.
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes>;

    /// Sends a control frame (Hello, Switchover, End, Abort), and returns its bytes on the
    /// wire. A Switchover lifts the rate limit: the downtime is not throttled.
    ///
    /// # Errors
    /// The channel's error.
    fn control(&mut self, msg: &Control) -> Result<Bytes>;

    /// The VM stopped: from now on nothing waits for the rate limit (the downtime is not
    /// throttled, as in QEMU). Postcopy's discards go out before the Switchover frame, so
    /// the loop calls this at the stop rather than relying on the Switchover alone. The
    /// default does nothing: a link without a rate limiter of its own.
    fn lift_rate_limit(&mut self) {}

    /// The most framing bytes a later [`send`](Self::send) adds to its payload. The default
    /// is a Section frame's framing ([`SECTION_OVERHEAD`]), for links whose stream
    /// header is already out or not counted.
    fn section_overhead(&self) -> Bytes {
        SECTION_OVERHEAD
    }

    /// The most bytes [`control(msg)`](Self::control) would put on the wire now. The
    /// default is the frame's own length ([`control_wire_len`]).
    fn control_cost(&self, msg: &Control) -> Bytes {
        control_wire_len(msg).unwrap_or(Bytes(u64::MAX))
    }

    /// All bytes put on the wire so far.
    fn bytes_sent(&self) -> Bytes;
}

/// A message from the destination to the source: the stream's destination frames
/// (Started, Refused, PageRequest, Abort, Report), as the return path delivers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestMessage {
    /// The destination resumed the guest (after a precopy End or a postcopy switchover).
    /// The downtime ends here.
    Started,
    /// The destination will not start the guest; the reason.
    Refused(String),
    /// Postcopy: the destination's guest touched data it does not have. The payload is
    /// the state's own request (for RAM, [`super::ram_codec::encode_page_request`]).
    PageRequest {
        /// The state (section) the request is for.
        state: StateId,
        /// The state's request.
        payload: Vec<u8>,
    },
    /// The destination gave up; its reason (a corrupt stream, say).
    Aborted(String),
    /// A state's answer to its source's query (see [`super::MigrationState::awaits_report`]):
    /// what the destination kept of it from a failed attempt of the same migration.
    Report {
        /// The state (section) it is for.
        state: StateId,
        /// The state's answer.
        payload: Vec<u8>,
    },
}

impl DestMessage {
    /// The kind of the stream frame that carries this message.
    pub fn kind(&self) -> FrameKind {
        match self {
            DestMessage::Started => FrameKind::Started,
            DestMessage::Refused(_) => FrameKind::Refused,
            DestMessage::PageRequest { .. } => FrameKind::PageRequest,
            DestMessage::Aborted(_) => FrameKind::Abort,
            DestMessage::Report { .. } => FrameKind::Report,
        }
    }
}

/// The return path: messages from the destination. Over TCP it is a receiving thread
/// feeding a channel; under the virtual clock, the simulated destination's queue.
pub trait Inbound {
    /// The next message if one has arrived, without waiting.
    ///
    /// # Errors
    /// The channel's error (a corrupt or cut return stream).
    fn try_recv(&mut self) -> Result<Option<DestMessage>>;

    /// Waits for the next message.
    ///
    /// # Errors
    /// The channel's error: [`MigrationError::Io`](super::MigrationError::Io) with
    /// [`std::io::ErrorKind::TimedOut`] when the destination is silent for longer than the
    /// return path's timeout, [`MigrationError::PeerAborted`](super::MigrationError::PeerAborted)
    /// once the return path has ended (a simulated channel says `PeerAborted` for both).
    fn recv(&mut self) -> Result<DestMessage>;
}
