//! What a stop costs on the disk: the bytes and barriers an inactivation will write
//! ([`StopWork`]), and the rate that turns them into time ([`DiskRate`]), measured from the
//! flushes that run before the stop, the slower of their means and the last flush's (the
//! migration loop prices the network by its last window too).

use std::time::Duration;

use super::FlushStats;
use crate::units::{Bytes, Millis};

/// The disk work of a stop: what [`BitmapStore::inactivate`](crate::BitmapStore::inactivate)
/// would write if it ran now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StopWork {
    /// Bitmap data and table entries.
    pub bytes: Bytes,
    /// Barriers: one after the data (if any), one for the commit, and the refcount flush's
    /// two when a region needs a fresh cluster. The commit's own write (the directory,
    /// rewritten in place with its flags words changed) is a few sectors, and its time is
    /// counted in its barrier's: a disk that never had data to flush has no measured rate,
    /// and the commit must still be timed.
    pub barriers: u64,
}

impl std::ops::Add for StopWork {
    type Output = StopWork;
    fn add(self, rhs: StopWork) -> StopWork {
        StopWork {
            bytes: self.bytes + rhs.bytes,
            barriers: self.barriers.saturating_add(rhs.barriers),
        }
    }
}

/// The disk's write rate and barrier latency, measured from flushes ([`FlushStats`]: the
/// bytes written, and the time spent writing apart from the time spent in barriers).
///
/// Until a flush has written bytes, the rate is unknown, and until one has issued a
/// barrier, the latency is: [`time`](Self::time) of work that needs an unknown figure is
/// [`Millis::MAX`], which keeps a migration from switching over on a guess (as the loop's
/// threshold is 0 until its first measurement window closes).
///
/// Each figure is the slower of its mean over every observation and the last flush's
/// that measured it: a disk that slowed down (a writeback storm on a shared LUN) is priced
/// at its last flush, not at a mean hundreds of fast flushes hold down, and a single fast
/// flush does not price a slow disk as fast. [`time`](Self::time) rounds up to the next
/// millisecond.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DiskRate {
    bytes: u64,
    write_time: Duration,
    barriers: u64,
    barrier_time: Duration,
    /// The last flush that wrote bytes: its bytes per nanosecond.
    last_rate: Option<f64>,
    /// The last flush that issued barriers: its mean barrier time.
    last_latency: Option<Duration>,
}

impl DiskRate {
    /// Nothing measured yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one flush's figures.
    pub fn observe(&mut self, s: &FlushStats) {
        let write_time = s.duration.saturating_sub(s.sync_time);
        if s.bytes_written > 0 {
            self.last_rate = Some(s.bytes_written as f64 / (write_time.as_nanos().max(1) as f64));
        }
        if let Some(n) = u32::try_from(s.syncs).ok().filter(|&n| n > 0) {
            self.last_latency = Some(s.sync_time / n);
        }
        self.bytes = self.bytes.saturating_add(s.bytes_written);
        self.write_time = self
            .write_time
            .saturating_add(s.duration.saturating_sub(s.sync_time));
        self.barriers = self.barriers.saturating_add(s.syncs);
        self.barrier_time = self.barrier_time.saturating_add(s.sync_time);
    }

    /// Bytes per nanosecond written, if any byte was: the lower of the mean and the last
    /// flush's.
    fn bytes_per_ns(&self) -> Option<f64> {
        let mean = (self.bytes > 0)
            .then(|| self.bytes as f64 / (self.write_time.as_nanos().max(1) as f64))?;
        Some(self.last_rate.map_or(mean, |last| last.min(mean)))
    }

    /// The time of one barrier, if one was measured: the longer of the mean and the last
    /// flush's.
    pub fn barrier_latency(&self) -> Option<Duration> {
        let mean = u32::try_from(self.barriers)
            .ok()
            .filter(|&n| n > 0)
            .map(|n| self.barrier_time / n)?;
        Some(self.last_latency.map_or(mean, |last| last.max(mean)))
    }

    /// The time `work` takes at the measured figures, rounded up to whole milliseconds;
    /// [`Millis::MAX`] when it needs a figure not measured yet.
    pub fn time(&self, work: StopWork) -> Millis {
        let mut ns = 0f64;
        if work.bytes > Bytes::ZERO {
            match self.bytes_per_ns() {
                Some(r) => ns += work.bytes.get() as f64 / r,
                None => return Millis::MAX,
            }
        }
        if work.barriers > 0 {
            match self.barrier_latency() {
                Some(l) => ns += l.as_nanos() as f64 * work.barriers as f64,
                None => return Millis::MAX,
            }
        }
        let ms = (ns / 1e6).ceil();
        if ms >= u64::MAX as f64 {
            Millis::MAX
        } else {
            Millis(ms as u64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(bytes: u64, syncs: u64, write_ms: u64, sync_ms: u64) -> FlushStats {
        FlushStats {
            bytes_written: bytes,
            syncs,
            sync_time: Duration::from_millis(sync_ms),
            duration: Duration::from_millis(write_ms + sync_ms),
            ..FlushStats::default()
        }
    }

    #[test]
    fn unknown_figures_cost_forever() {
        let r = DiskRate::new();
        assert_eq!(r.time(StopWork::default()), Millis(0));
        let one_barrier = StopWork {
            bytes: Bytes(0),
            barriers: 1,
        };
        assert_eq!(r.time(one_barrier), Millis::MAX);
        let mut r = DiskRate::new();
        // A barrier alone: latency known, rate not.
        r.observe(&stats(0, 1, 0, 4));
        assert_eq!(r.time(one_barrier), Millis(4));
        let data = StopWork {
            bytes: Bytes(1),
            barriers: 1,
        };
        assert_eq!(r.time(data), Millis::MAX);
    }

    #[test]
    fn time_is_bytes_at_the_write_rate_plus_barriers_at_their_latency() {
        let mut r = DiskRate::new();
        // 10 MB in 10 ms of writing (1 MB/ms), 2 barriers in 6 ms (3 ms each).
        r.observe(&stats(10_000_000, 2, 10, 6));
        let work = StopWork {
            bytes: Bytes(2_500_000),
            barriers: 2,
        };
        // 2.5 ms + 6 ms, rounded up.
        assert_eq!(r.time(work), Millis(9));
        // The slower of the mean and the last flush: another 10 MB in 30 ms makes the
        // mean 0.5 MB/ms and the last 1/3 MB/ms, which prices it.
        r.observe(&stats(10_000_000, 0, 30, 0));
        assert_eq!(r.time(work), Millis(14));
        assert_eq!(r.barrier_latency(), Some(Duration::from_millis(3)));
        // A fast flush after it: the mean (30 MB in 41 ms) is now the slower.
        r.observe(&stats(10_000_000, 0, 1, 0));
        assert_eq!(r.time(work), Millis(10));
    }

    /// A disk that slowed down is priced at its last flush: 600 barriers of 1 ms, then a
    /// flush whose two barriers took 100 ms each. The mean (1.33 ms) priced the stop's two
    /// barriers at 3 ms, where they take 200: a switchover decided to fit ran 200 ms over.
    #[test]
    fn a_disk_that_slowed_down_is_priced_at_its_last_flush() {
        let mut r = DiskRate::new();
        for _ in 0..300 {
            r.observe(&stats(4096, 2, 1, 2));
        }
        r.observe(&stats(4096, 2, 1, 200));
        let stop = StopWork {
            bytes: Bytes(0),
            barriers: 2,
        };
        assert_eq!(r.time(stop), Millis(200));
        assert_eq!(r.barrier_latency(), Some(Duration::from_millis(100)));
    }
}
