//! Units of the migration loop and of the stop budget, as newtypes, so that the unit confusions of QEMU's history
//! (bits against bytes, per second against per millisecond) do not compile.
//!
//! - [`Bytes`] is an amount of data.
//! - [`Millis`] is a span of time in milliseconds.
//! - [`BytesPerMs`] is a bandwidth or a dirty rate in bytes per millisecond, QEMU's unit for
//!   `threshold_size` arithmetic (`migration_update_counters`: "Both in unit bytes/ms").
//!
//! The only products and quotients defined are the ones that keep their units right:
//! `BytesPerMs × Millis = Bytes` and `Bytes / Millis = BytesPerMs`. A bandwidth is built only
//! through a constructor that names its unit, [`BytesPerMs::from_bytes_per_ms`] or
//! [`BytesPerMs::from_bytes_per_sec`], and every bandwidth, amount and span that crosses the
//! public API of [`crate::migration`] is one of these types.
//!
//! So a raw per-second figure where a bandwidth is wanted does not compile:
//!
//! ```compile_fail,E0308
//! use dirty_bitmap::migration::rate::RateLimiter;
//! // 128 MiB/s as a bare number: a `u64` is not a `BytesPerMs`.
//! let _ = RateLimiter::new(128 << 20);
//! ```
//!
//! nor does an amount where a rate is wanted (the seed's bits-versus-bytes slip, in types):
//!
//! ```compile_fail,E0308
//! use dirty_bitmap::migration::{Bytes, LoopConfig};
//! let _ = LoopConfig {
//!     max_bandwidth: Some(Bytes(128 << 20)),
//!     ..LoopConfig::default()
//! };
//! ```
//!
//! nor a rate times a rate, or a span where a rate is wanted:
//!
//! ```compile_fail,E0308
//! use dirty_bitmap::units::{threshold, Millis};
//! let _ = threshold(Millis(300), Millis(300));
//! ```
//!
//! while the same calls with the units named do:
//!
//! ```
//! use dirty_bitmap::migration::rate::RateLimiter;
//! use dirty_bitmap::units::threshold;
//! use dirty_bitmap::migration::{Bytes, BytesPerMs, LoopConfig, Millis};
//! let bw = BytesPerMs::from_bytes_per_sec(128 << 20);
//! let _ = RateLimiter::new(bw);
//! let _ = LoopConfig { max_bandwidth: Some(bw), ..LoopConfig::default() };
//! assert_eq!(threshold(BytesPerMs::from_bytes_per_ms(10.0), Millis(300)), Bytes(3000));
//! ```

use std::fmt;
use std::ops::{Add, AddAssign, Mul, Sub};

/// An amount of data in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(pub u64);

/// A span of time in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

/// A rate in bytes per millisecond. Finite and never negative.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct BytesPerMs(f64);

impl Bytes {
    /// No bytes.
    pub const ZERO: Bytes = Bytes(0);

    /// The byte count.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// `self - other`, or zero if `other` is larger.
    pub fn saturating_sub(self, other: Bytes) -> Bytes {
        Bytes(self.0.saturating_sub(other.0))
    }

    /// The time these bytes take at `rate`, rounded up; [`Millis::MAX`] when the rate is 0
    /// and there are bytes to send.
    pub fn time_at(self, rate: BytesPerMs) -> Millis {
        if self.0 == 0 {
            return Millis(0);
        }
        if rate.0 <= 0.0 {
            return Millis::MAX;
        }
        let ms = (self.0 as f64 / rate.0).ceil();
        if ms >= u64::MAX as f64 {
            Millis::MAX
        } else {
            Millis(ms as u64)
        }
    }
}

impl Millis {
    /// The longest representable span.
    pub const MAX: Millis = Millis(u64::MAX);

    /// The milliseconds.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// From a [`std::time::Duration`], truncated to whole milliseconds.
    pub fn from_duration(d: std::time::Duration) -> Millis {
        Millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// As a [`std::time::Duration`].
    pub fn as_duration(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

impl BytesPerMs {
    /// A rate of zero.
    pub const ZERO: BytesPerMs = BytesPerMs(0.0);

    /// A rate from bytes per millisecond. Negative, NaN and infinite values become 0 (an
    /// unknown rate is treated as no bandwidth, which can only delay a switchover).
    pub fn from_bytes_per_ms(bytes_per_ms: f64) -> BytesPerMs {
        if bytes_per_ms.is_finite() && bytes_per_ms > 0.0 {
            BytesPerMs(bytes_per_ms)
        } else {
            BytesPerMs(0.0)
        }
    }

    /// A rate from bytes per second (QEMU's `max-bandwidth` and
    /// `avail-switchover-bandwidth` unit).
    pub fn from_bytes_per_sec(bytes_per_sec: u64) -> BytesPerMs {
        BytesPerMs::from_bytes_per_ms(bytes_per_sec as f64 / 1000.0)
    }

    /// The rate in bytes per millisecond.
    pub fn get(self) -> f64 {
        self.0
    }

    /// The rate in bytes per second, rounded down.
    pub fn bytes_per_sec(self) -> u64 {
        (self.0 * 1000.0) as u64
    }
}

impl Add for Bytes {
    type Output = Bytes;
    fn add(self, rhs: Bytes) -> Bytes {
        Bytes(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Bytes {
    fn add_assign(&mut self, rhs: Bytes) {
        *self = *self + rhs;
    }
}

impl Sub for Bytes {
    type Output = Bytes;
    /// Saturating: never below zero.
    fn sub(self, rhs: Bytes) -> Bytes {
        self.saturating_sub(rhs)
    }
}

impl Add for Millis {
    type Output = Millis;
    fn add(self, rhs: Millis) -> Millis {
        Millis(self.0.saturating_add(rhs.0))
    }
}

impl AddAssign for Millis {
    fn add_assign(&mut self, rhs: Millis) {
        *self = *self + rhs;
    }
}

impl Sub for Millis {
    type Output = Millis;
    /// Saturating: never below zero.
    fn sub(self, rhs: Millis) -> Millis {
        Millis(self.0.saturating_sub(rhs.0))
    }
}

/// `bandwidth × time = bytes`, truncated as QEMU stores `threshold_size` (a double product
/// cast to `uint64_t`), saturating.
impl Mul<Millis> for BytesPerMs {
    type Output = Bytes;
    fn mul(self, rhs: Millis) -> Bytes {
        let b = self.0 * rhs.0 as f64;
        if b >= u64::MAX as f64 {
            Bytes(u64::MAX)
        } else {
            Bytes(b as u64)
        }
    }
}

/// `bytes / time = bandwidth`. A zero span gives a zero rate (QEMU skips the update then).
impl std::ops::Div<Millis> for Bytes {
    type Output = BytesPerMs;
    fn div(self, rhs: Millis) -> BytesPerMs {
        if rhs.0 == 0 {
            BytesPerMs::ZERO
        } else {
            BytesPerMs::from_bytes_per_ms(self.0 as f64 / rhs.0 as f64)
        }
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} B", self.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ms", self.0)
    }
}

impl fmt::Display for BytesPerMs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} B/ms", self.0)
    }
}

/// The switchover threshold: the bytes that can be sent within `downtime_limit` at
/// `bandwidth` (`threshold_size = expected_bw_per_ms × downtime_limit`).
pub fn threshold(bandwidth: BytesPerMs, downtime_limit: Millis) -> Bytes {
    bandwidth * downtime_limit
}

/// The one comparison of the loop: do `pending` bytes fit `threshold`? The estimate gate
/// (whether to run the exact query) and the switchover decision both call this, so they can
/// never disagree (the bug that QEMU's 455a6167f254 fixed: `<` on the gate, `<=` on the
/// switchover).
pub fn fits(pending: Bytes, threshold: Bytes) -> bool {
    pending <= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threshold_is_bandwidth_times_limit() {
        // QEMU's defaults: 128 MiB/s and 300 ms.
        let bw = BytesPerMs::from_bytes_per_sec(128 << 20);
        assert_eq!(threshold(bw, Millis(300)), Bytes(40_265_318));
        assert_eq!(threshold(BytesPerMs::ZERO, Millis(300)), Bytes(0));
    }

    #[test]
    fn fits_is_inclusive() {
        assert!(fits(Bytes(10), Bytes(10)));
        assert!(fits(Bytes(0), Bytes(0)));
        assert!(!fits(Bytes(11), Bytes(10)));
    }

    #[test]
    fn rates_and_times() {
        assert_eq!(
            Bytes(1000) / Millis(10),
            BytesPerMs::from_bytes_per_ms(100.0)
        );
        assert_eq!(Bytes(1000) / Millis(0), BytesPerMs::ZERO);
        assert_eq!(
            Bytes(1001).time_at(BytesPerMs::from_bytes_per_ms(100.0)),
            Millis(11)
        );
        assert_eq!(Bytes(1).time_at(BytesPerMs::ZERO), Millis::MAX);
        assert_eq!(Bytes(0).time_at(BytesPerMs::ZERO), Millis(0));
        assert_eq!(BytesPerMs::from_bytes_per_ms(f64::NAN), BytesPerMs::ZERO);
        assert_eq!(BytesPerMs::from_bytes_per_ms(-1.0), BytesPerMs::ZERO);
        assert_eq!(Bytes(3) - Bytes(5), Bytes(0));
    }
}
