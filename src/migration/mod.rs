//! Live migration: a precopy loop with pluggable states (RAM pages first), modelled on
//! QEMU's `migration_iteration_run`, with the estimate gate and the switchover decision on
//! one comparison ([`units::fits`]).
//!
//! - [`guest`]: guest RAM (an anonymous mapping), its dirty log, vCPU workloads, [`Vm`].
//! - [`state`]: the [`MigrationState`] trait and the destination's messages ([`Inbound`]).
//! - [`ram`]: RAM as a [`MigrationState`].
//! - [`precopy`]: the loop ([`run`]).
//! - [`clock`]: real and virtual time; [`sim`]: the virtual-clock simulation and its sweep.
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
pub mod units;

pub use clock::{Clock, RealClock};
pub use error::{MigrationError, Result};
pub use guest::{GuestRam, Pattern, Vm, Workload, WorkloadConfig, PAGE_SIZE};
pub use precopy::{
    run, AutoConverge, Controller, Directive, Endpoints, IterationReport, Kind, LoopConfig,
    Outcome, StallAction, StallReport,
};
pub use ram::{RamState, SetupMode};
pub use state::{Control, DestMessage, Inbound, MigrationState, Pending, CONTROL};
pub use units::{Bytes, BytesPerMs, Millis};

/// Identifies one migration state (a section of the stream, like a QEMU savevm handler's
/// section id).
pub type StateId = u32;

/// Where a source state puts what it sends: a framed stream over a real channel, or a
/// simulated link under the virtual clock. The loop only ever sends through this trait.
pub trait Outbound {
    /// Sends one opaque payload of state `state`, and returns the bytes it put on the wire
    /// (payload plus framing). May block for the rate limiter.
    ///
    /// # Errors
    /// The channel's error; the attempt is then over.
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes>;

    /// All bytes put on the wire so far.
    fn bytes_sent(&self) -> Bytes;
}
