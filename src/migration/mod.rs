//! Live migration: a precopy loop with pluggable states (RAM pages first), modelled on
//! QEMU's `migration_iteration_run`, with the estimate gate and the switchover decision on
//! one comparison ([`units::fits`]).
//!
//! The modules, bottom first; each uses only the ones above it in this list (and
//! [`crate::units`], [`crate::rng`], the bitmaps), and this file only re-exports them:
//!
//! - [`frame`]: the frame codec (frames, [`Control`], [`StateId`]); pure, no I/O.
//! - [`clock`]: the one notion of time ([`Clock`]): real, manual, and the simulation's.
//! - [`error`]: [`MigrationError`] and the typed [`ProtocolError`].
//! - [`ram_codec`]: the RAM payloads of Section and PageRequest frames; pure.
//! - [`channel`]: the loop's two directions ([`Outbound`], [`Inbound`], [`DestMessage`]).
//! - [`state`]: the [`MigrationState`] trait and its [`Pending`] figures.
//! - [`rate`]: the stream's rate limiter.
//! - [`stream`]: the frames over a byte channel ([`stream::FrameWriter`],
//!   [`stream::FrameReader`]).
//! - [`memory`]: what RAM migration needs from a VMM: [`GuestMemory`] and [`DirtyLog`],
//!   and the order (harvest, fence, read) that loses no write.
//! - [`guest`]: guest RAM (an anonymous mapping), its dirty log, vCPU workloads, [`Vm`].
//! - [`dest_state`]: the destination's side of a state other than RAM ([`DestState`]).
//! - [`dest`]: the destination: its frame handling ([`dest::DestCore`]) and the one over a
//!   stream ([`dest::Destination`]).
//! - [`ram`]: RAM as a [`MigrationState`].
//! - [`disk`]: disk bitmaps on shared storage as a [`MigrationState`]
//!   ([`SharedDiskState`]): flushed during precopy, their stop time in the downtime.
//! - [`bitmap_codec`]: the payloads of a bitmap's sections in stream mode; pure.
//! - [`disk_stream`]: disk bitmaps in the stream, as deltas ([`StreamDiskState`],
//!   [`StreamDiskDest`]), for a destination with an image of its own.
//! - [`precopy`]: the loop ([`run`]).
//! - [`paced_write`]: a socket's writing half whose frames each go out whole by a deadline
//!   ([`paced_write::PacedWrite`]), under `tls` and `tcp`.
//! - [`sim`]: the virtual-clock simulation and its sweep; `tls` (feature `tls`): TLS with
//!   certificates, both ends authenticated, under the TCP transport; [`tcp`]: both ends over
//!   TCP on 127.0.0.1 by default, plain or over `tls`.
//!
//! Nothing below [`crate::store`] knows about this module; it uses the bitmaps and, for
//! [`disk`], the store.

pub mod channel;
pub mod clock;
pub mod dest;
pub mod dest_state;
pub mod disk;
pub mod disk_stream;
pub mod error;
parser_module! { pub mod bitmap_codec; }
parser_module! { pub mod disk_log_codec; }
parser_module! { pub mod frame; }
pub mod guest;
#[cfg(feature = "testing")]
pub mod harness;
pub mod memory;
pub mod paced_write;
pub mod precopy;
pub mod ram;
parser_module! { pub mod ram_codec; }
pub mod rate;
#[cfg(feature = "testing")]
pub mod sim;
pub mod state;
parser_module! { pub mod stream; }
pub mod tcp;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "testing")]
pub mod workload;
pub use crate::units;

pub use channel::{DestMessage, Inbound, Outbound};
pub use clock::{Clock, ManualClock, RealClock};
pub use dest_state::{Binding, DestState, SharedDestState};
pub use disk::{SharedDiskDest, SharedDiskState};
pub use disk_stream::{StreamDiskDest, StreamDiskState};
pub use error::{MigrationError, ProtocolError, Result, TlsError};
pub use frame::{Control, StateId};
pub use guest::{GuestRam, Vm, PAGE_SIZE};
pub use memory::{DirtyLog, DirtyPages, GuestMemory};
pub use precopy::{
    run, AutoConverge, Controller, Directive, Endpoints, IterationReport, Kind, LoopConfig,
    Outcome, StallAction, StallReport,
};
pub use ram::{RamState, SetupMode, RAM_ID};
pub use state::{MigrationState, Pending};
pub use units::{Bytes, BytesPerMs, Millis};
#[cfg(feature = "testing")]
pub use workload::{
    DiskGuest, DiskWriter, Pattern, Workload, WorkloadConfig, DISK_WRITE, MAX_VCPUS,
};
