//! Time for the loop: the real monotonic clock, or a virtual one driven by the simulation.

use std::time::{Duration, Instant};

/// The loop's notion of time. One loop serves both: real time over TCP, virtual time in
/// the simulation (where sending advances the clock and the simulated guest dirties pages
/// as it moves).
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
