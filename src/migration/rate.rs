//! The stream's rate limiter: QEMU's `max-bandwidth`, enforced per 100 ms window.
//!
//! QEMU (`migration_rate_limit`, `BUFFER_DELAY`) lets `max_bandwidth / 10` bytes out per
//! 100 ms window; once a window's budget is used, the sender sleeps until the window ends.
//! One difference: QEMU forgets what a window overshot (the last buffer may cross the
//! budget) when the next window starts, so a stream of large buffers can exceed the limit.
//! Here the overshoot is carried into the next windows as debt, so over any run of windows
//! the bytes sent stay within `max_bandwidth × elapsed` plus one window's budget and one
//! frame. Idle windows earn no credit: a burst after a pause is still one budget per window.
//!
//! Time comes from the module's one [`Clock`]: [`RealClock`] sleeps for real,
//! [`ManualClock`](super::clock::ManualClock) is a shared counter that waiting advances, so the limiter is tested
//! without sleeping.

use std::fmt;
use std::time::Duration;

use super::clock::{Clock, RealClock};
use crate::units::{Bytes, BytesPerMs, Millis};

/// The window over which the limit is enforced (QEMU's `BUFFER_DELAY`).
pub const RATE_WINDOW: Duration = Duration::from_millis(100);

/// The rate a [`RateLimiter`] at `max_bandwidth` sends at over many windows, in bytes per
/// second: its window budget (truncated, at least 1 byte) once per [`RATE_WINDOW`]; 0
/// without a limit. Below the limit when the budget truncates (19 bytes/s sends 1 byte per
/// window, 10 bytes/s): a frame's deadline at the slowest rate allowed counts with this
/// figure on both ends (`tcp.rs`), or a healthy link at such a limit would time out.
pub fn sustained_bytes_per_sec(max_bandwidth: BytesPerMs) -> u64 {
    if max_bandwidth == BytesPerMs::ZERO {
        return 0;
    }
    let per_sec = Duration::from_secs(1).as_nanos() / RATE_WINDOW.as_nanos();
    budget_of(max_bandwidth)
        .get()
        .saturating_mul(u64::try_from(per_sec).unwrap_or(u64::MAX))
}

/// The bytes one window may carry at `max_bandwidth` (not zero): truncated, at least 1.
fn budget_of(max_bandwidth: BytesPerMs) -> Bytes {
    let window = Millis::from_duration(RATE_WINDOW);
    Bytes((max_bandwidth * window).get().max(1))
}

/// Holds a sender to `max_bandwidth`, per [`RATE_WINDOW`].
pub struct RateLimiter {
    /// The limit; zero is no limit (QEMU's `RATE_LIMIT_DISABLED`).
    max_bandwidth: BytesPerMs,
    clock: Box<dyn Clock + Send>,
    window_start: Duration,
    /// Bytes charged to the current window, including debt carried from earlier ones.
    used: u64,
    slept: Duration,
    sleeps: u64,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("max_bandwidth", &self.max_bandwidth)
            .field("window_start", &self.window_start)
            .field("used", &self.used)
            .field("slept", &self.slept)
            .field("sleeps", &self.sleeps)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// No limit.
    pub fn unlimited() -> RateLimiter {
        RateLimiter::new(BytesPerMs::ZERO)
    }

    /// At most `max_bandwidth` in real time; [`BytesPerMs::ZERO`] is no limit.
    pub fn new(max_bandwidth: BytesPerMs) -> RateLimiter {
        RateLimiter::with_clock(max_bandwidth, Box::new(RealClock::new()))
    }

    /// At most `max_bandwidth` on `clock`; [`BytesPerMs::ZERO`] is no limit.
    pub fn with_clock(max_bandwidth: BytesPerMs, clock: Box<dyn Clock + Send>) -> RateLimiter {
        let window_start = clock.now();
        RateLimiter {
            max_bandwidth,
            clock,
            window_start,
            used: 0,
            slept: Duration::ZERO,
            sleeps: 0,
        }
    }

    /// The limit; [`BytesPerMs::ZERO`] is none.
    pub fn max_bandwidth(&self) -> BytesPerMs {
        self.max_bandwidth
    }

    /// Changes the limit; [`BytesPerMs::ZERO`] lifts it. Debt already charged stays.
    pub fn set_max_bandwidth(&mut self, max_bandwidth: BytesPerMs) {
        self.max_bandwidth = max_bandwidth;
    }

    /// The bytes one window may carry (`max_bandwidth × 100 ms`, truncated), at least 1 so
    /// that a tiny limit still makes progress (the debt keeps the long-run rate right);
    /// `None` without a limit.
    pub fn window_budget(&self) -> Option<Bytes> {
        if self.max_bandwidth == BytesPerMs::ZERO {
            return None;
        }
        Some(self.budget_bytes())
    }

    fn budget_bytes(&self) -> Bytes {
        budget_of(self.max_bandwidth)
    }

    /// Starts the windows that have ended by `now`, paying one budget of debt for each.
    fn roll(&mut self, now: Duration, budget: u64) {
        let Some(elapsed) = now.checked_sub(self.window_start) else {
            return;
        };
        let windows = elapsed.as_nanos() / RATE_WINDOW.as_nanos();
        if windows == 0 {
            return;
        }
        let windows32 = u32::try_from(windows).unwrap_or(u32::MAX);
        self.window_start += RATE_WINDOW * windows32;
        let paid = budget.saturating_mul(u64::try_from(windows).unwrap_or(u64::MAX));
        self.used = self.used.saturating_sub(paid);
    }

    /// Blocks until the current window has budget left. Call before sending.
    pub fn wait(&mut self) {
        loop {
            let Some(Bytes(budget)) = self.window_budget() else {
                return;
            };
            let now = self.clock.now();
            self.roll(now, budget);
            if self.used < budget {
                return;
            }
            // Sleep to the end of the window, and as many more as the debt needs.
            let windows_owed = (self.used - budget) / budget + 1;
            let end =
                self.window_start + RATE_WINDOW * u32::try_from(windows_owed).unwrap_or(u32::MAX);
            let d = end.saturating_sub(now).max(Duration::from_nanos(1));
            self.clock.sleep_until(now + d);
            self.slept += d;
            self.sleeps += 1;
        }
    }

    /// Charges `bytes` just sent to the current window.
    pub fn record(&mut self, bytes: Bytes) {
        if self.max_bandwidth == BytesPerMs::ZERO {
            return;
        }
        self.used = self.used.saturating_add(bytes.get());
    }

    /// Total time spent sleeping.
    pub fn slept(&self) -> Duration {
        self.slept
    }

    /// How many times the limiter slept.
    pub fn sleeps(&self) -> u64 {
        self.sleeps
    }

    /// The clock's time.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }
}

#[cfg(test)]
mod tests {
    use super::super::clock::ManualClock;
    use super::*;

    /// A limiter of `bw` bytes per second on a manual clock.
    fn limited(bytes_per_sec: u64) -> (RateLimiter, ManualClock) {
        let c = ManualClock::new();
        let bw = BytesPerMs::from_bytes_per_sec(bytes_per_sec);
        (RateLimiter::with_clock(bw, Box::new(c.clone())), c)
    }

    #[test]
    fn budget_is_a_tenth_of_the_rate() {
        let (l, _) = limited(128 << 20);
        assert_eq!(l.window_budget(), Some(Bytes((128 << 20) / 10)));
        assert_eq!(limited(10_000).0.window_budget(), Some(Bytes(1000)));
        assert_eq!(limited(5).0.window_budget(), Some(Bytes(1)));
        assert_eq!(limited(0).0.window_budget(), None);
        // Per millisecond, as the loop's figures are: 10 B/ms is 1000 bytes per window.
        let c = ManualClock::new();
        let l = RateLimiter::with_clock(BytesPerMs::from_bytes_per_ms(10.0), Box::new(c));
        assert_eq!(l.window_budget(), Some(Bytes(1000)));
        assert_eq!(l.max_bandwidth().bytes_per_sec(), 10_000);
    }

    /// A frame's deadline is not counted with the limit itself: the limiter's truncated
    /// budget sends below it (19 bytes/s: one byte per window, 10 bytes/s), so a healthy
    /// link at such a limit would miss its deadline. The figure the deadlines use is what
    /// the limiter sends over many windows, one byte at a time.
    #[test]
    fn the_sustained_rate_is_what_the_limiter_sends() {
        for bytes_per_sec in [19u64, 10, 199, 10_000, 123_456] {
            let (mut l, c) = limited(bytes_per_sec);
            let mut sent = 0u64;
            while c.now() < Duration::from_secs(100) {
                l.wait();
                l.record(Bytes(1));
                sent += 1;
            }
            let sustained = sustained_bytes_per_sec(BytesPerMs::from_bytes_per_sec(bytes_per_sec));
            let measured = sent / 100;
            assert!(
                sustained.abs_diff(measured) <= sustained / 50 + 1,
                "{bytes_per_sec} bytes/s: the limiter sent {measured} a second, the \
                 deadlines count {sustained}"
            );
            assert!(sustained <= bytes_per_sec);
        }
        assert_eq!(sustained_bytes_per_sec(BytesPerMs::ZERO), 0);
    }

    #[test]
    fn unlimited_never_sleeps() {
        let (mut l, c) = limited(0);
        for _ in 0..1000 {
            l.wait();
            l.record(Bytes(1 << 20));
        }
        assert_eq!(c.now(), Duration::ZERO);
        assert_eq!(l.sleeps(), 0);
    }

    #[test]
    fn sleeps_to_the_window_end_once_the_budget_is_used() {
        let (mut l, c) = limited(10_000); // 1000 bytes per window
        l.wait();
        l.record(Bytes(600));
        l.wait();
        assert_eq!(c.now(), Duration::ZERO, "budget left");
        l.record(Bytes(600)); // 1200: over by 200
        c.advance(Duration::from_millis(30));
        l.wait();
        assert_eq!(
            c.now(),
            Duration::from_millis(100),
            "slept to the window end"
        );
        // 200 of debt carried: 800 more fit in this window.
        l.record(Bytes(799));
        l.wait();
        assert_eq!(c.now(), Duration::from_millis(100));
        l.record(Bytes(1));
        l.wait();
        assert_eq!(c.now(), Duration::from_millis(200));
    }

    #[test]
    fn a_huge_frame_owes_several_windows() {
        let (mut l, c) = limited(10_000);
        l.wait();
        l.record(Bytes(5_500)); // five and a half budgets
        l.wait();
        assert_eq!(c.now(), Duration::from_millis(500));
        assert_eq!(l.sleeps(), 1);
    }

    #[test]
    fn idle_windows_earn_no_credit() {
        let (mut l, c) = limited(10_000);
        c.advance(Duration::from_secs(10));
        l.wait();
        l.record(Bytes(1000));
        l.wait();
        assert_eq!(c.now(), Duration::from_millis(10_100));
    }

    #[test]
    fn a_slow_link_is_not_throttled_further() {
        // The link moves 500 bytes per 100 ms; the limit is 1000 per window.
        let (mut l, c) = limited(10_000);
        for _ in 0..100 {
            l.wait();
            l.record(Bytes(500));
            c.advance(Duration::from_millis(100));
        }
        assert_eq!(l.sleeps(), 0);
    }
}
