//! Time, in one concept for the whole module: [`Clock`]. The loop runs on it, and so does
//! the stream's rate limiter (`rate.rs`).
//!
//! - [`RealClock`]: the monotonic system clock; waiting sleeps.
//! - [`ManualClock`]: a shared counter that waiting advances, so that the rate limiter is
//!   tested without sleeping.
//! - The simulation's virtual clock (`sim::Sim`), where waiting lets the simulated guest
//!   and link move.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The one notion of time of the migration module. One loop serves both: real time over
/// TCP, virtual time in the simulation (where sending advances the clock and the simulated
/// guest dirties pages as it moves); the rate limiter waits for its windows on it too.
pub trait Clock {
    /// Time since an arbitrary origin; never goes backwards.
    fn now(&self) -> Duration;

    /// Waits until `deadline` (returns at once if it has passed). A virtual clock jumps.
    fn sleep_until(&mut self, deadline: Duration);
}

/// The monotonic system clock.
#[derive(Debug, Clone, Copy)]
pub struct RealClock {
    origin: Instant,
}

impl RealClock {
    /// A clock whose origin is now.
    pub fn new() -> Self {
        RealClock {
            origin: Instant::now(),
        }
    }
}

impl Default for RealClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn sleep_until(&mut self, deadline: Duration) {
        let now = self.now();
        if deadline > now {
            std::thread::sleep(deadline - now);
        }
    }
}

/// Simulated time in nanoseconds, shared by its clones; waiting advances it to the
/// deadline at once.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves time forward by `d` (a send that took `d` on a simulated link, say).
    pub fn advance(&self, d: Duration) {
        let n = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(n, Ordering::Relaxed);
    }

    /// The current simulated time.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        ManualClock::now(self)
    }

    /// Jumps to `deadline` (not back: a clone may have moved it past already).
    fn sleep_until(&mut self, deadline: Duration) {
        let n = u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_max(n, Ordering::Relaxed);
    }
}
