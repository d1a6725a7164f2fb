//! Live migration: a precopy loop with pluggable states (RAM pages first), modelled on
//! QEMU's `migration_iteration_run`, with the estimate gate and the switchover decision on
//! one comparison ([`units::fits`]).
//!
//! Nothing below [`crate::store`] knows about this module; it only uses the bitmaps.

pub mod units;

pub use units::{Bytes, BytesPerMs, Millis};
