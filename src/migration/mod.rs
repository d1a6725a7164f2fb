//! Live migration: a precopy loop with pluggable states (RAM pages first), modelled on
//! QEMU's `migration_iteration_run`, with the estimate gate and the switchover decision on
//! one comparison ([`units::fits`]).
//!
//! - [`guest`]: guest RAM (an anonymous mapping), its dirty log, vCPU workloads, [`Vm`].
//! - [`state`]: the [`MigrationState`] trait and the destination's messages ([`Inbound`]).
//! - [`ram`]: RAM as a [`MigrationState`].
//! - [`precopy`]: the loop ([`run`]).
//! - [`clock`]: real and virtual time; [`sim`]: the virtual-clock simulation and its sweep.
//! - [`stream`], [`rate`], [`ram_codec`]: the wire (frames, rate limit, RAM payloads);
//!   [`dest`]: the destination; [`tcp`]: both ends over TCP on 127.0.0.1.
//!
//! Nothing below [`crate::store`] knows about this module; it only uses the bitmaps.

pub mod clock;
pub mod dest;
pub mod error;
pub mod guest;
pub mod precopy;
pub mod ram;
pub mod ram_codec;
pub mod rate;
pub mod sim;
pub mod state;
pub mod stream;
pub mod tcp;
pub use crate::units;

pub use clock::{Clock, RealClock};
pub use error::{MigrationError, Result};
pub use guest::{GuestRam, Pattern, Vm, Workload, WorkloadConfig, PAGE_SIZE};
pub use precopy::{
    run, AutoConverge, Controller, Directive, Endpoints, IterationReport, Kind, LoopConfig,
    Outcome, StallAction, StallReport,
};
pub use ram::{RamState, SetupMode};
pub use state::{Control, DestMessage, Inbound, MigrationState, Pending};
pub use units::{Bytes, BytesPerMs, Millis};

/// Identifies one migration state (a section of the stream, like a QEMU savevm handler's
/// section id).
pub type StateId = u32;

/// Where the loop and its states put what they send: a framed stream over a real channel
/// ([`stream::FrameWriter`]), or a simulated link under the virtual clock ([`sim::Sim`]).
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
    /// is a Section frame's framing ([`stream::SECTION_OVERHEAD`]), for links whose stream
    /// header is already out or not counted.
    fn section_overhead(&self) -> Bytes {
        stream::SECTION_OVERHEAD
    }

    /// The most bytes [`control(msg)`](Self::control) would put on the wire now. The
    /// default is the frame's own length ([`stream::control_wire_len`]).
    fn control_cost(&self, msg: &Control) -> Bytes {
        stream::control_wire_len(msg).unwrap_or(Bytes(u64::MAX))
    }

    /// All bytes put on the wire so far.
    fn bytes_sent(&self) -> Bytes;
}
