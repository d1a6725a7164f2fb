//! [`FlushPolicy`]: background flushes of a [`SharedStore`] on a timer and/or when enough
//! has changed.
//!
//! The flusher drives the store from above: it takes the store's mutex only to call
//! [`BitmapStore::flush`](super::BitmapStore::flush) (and, with a threshold and something
//! pending below it, tries it without waiting to see whether the store is durable), which
//! runs the engine of
//! [`crate::flush`]. The size trigger reads [`flush::pending_estimate`] from the store's
//! in-memory bitmaps without any lock, from the list the store republishes whenever its
//! bitmaps change.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::SharedStore;
use crate::error::{invalid_input, Error, Result};
use crate::flush::{self, FlushStats};
use crate::storage::Storage;
use crate::tracker::TrackedSet;

/// When a background thread flushes a shared store: every `interval`, and/or whenever the
/// lock-free estimate of its changed regions exceeds `max_pending_bytes` (checked every
/// `poll`; the store's published gauge, which counts its bitmaps parked by an incremental
/// stop too, where [`pending_estimate`](super::BitmapStore::pending_estimate) says 0 while
/// inactive: an inactive store is then locked at each poll and skipped). On a store in
/// durable mode a threshold makes any pending region due at the next poll: each is an
/// intent a write waits on ([`DurableTracker`](super::durable::DurableTracker)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushPolicy {
    /// Flush at least this often (none: no timer).
    pub interval: Option<Duration>,
    /// Flush whenever more than this many bytes of regions have changed (none: no
    /// threshold).
    pub max_pending_bytes: Option<u64>,
    /// How often the threshold is checked.
    pub poll: Duration,
}

impl Default for FlushPolicy {
    /// Every 100 ms, no threshold.
    fn default() -> Self {
        Self {
            interval: Some(Duration::from_millis(100)),
            max_pending_bytes: None,
            poll: Duration::from_millis(10),
        }
    }
}

/// What a [`FlushThread`] did, returned by [`FlushThread::stop`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyStats {
    /// Flushes run.
    pub flushes: u64,
    /// Their statistics, summed.
    pub total: FlushStats,
}

#[derive(Debug, Default)]
struct Shared {
    stopped: Mutex<bool>,
    wake: Condvar,
    stats: Mutex<PolicyStats>,
    error: Mutex<Option<Error>>,
}

/// The running background flusher. [`stop`](Self::stop) it (dropping it stops it too).
///
/// Stopping joins the thread, which may be waiting for the store's mutex: do not stop or
/// drop the handle while holding that mutex.
#[derive(Debug)]
#[must_use = "dropping the handle stops the flusher at once"]
pub struct FlushThread {
    shared: Arc<Shared>,
    handle: Option<JoinHandle<()>>,
}

impl FlushPolicy {
    /// Flushes every `interval`.
    pub fn every(interval: Duration) -> Self {
        Self {
            interval: Some(interval),
            ..Self::default()
        }
    }

    /// Flushes whenever more than `bytes` of regions have changed.
    pub fn when_pending_above(bytes: u64) -> Self {
        Self {
            interval: None,
            max_pending_bytes: Some(bytes),
            ..Self::default()
        }
    }

    /// Starts a thread that flushes `store` by this policy. The thread takes the store's
    /// mutex only to flush (with a threshold and something pending below it, it tries the
    /// mutex without waiting, to see whether the store is durable: then whatever is
    /// pending is due); it reads the estimate without a lock, at each poll from the
    /// in-memory bitmaps the store holds then (the list its trackers follow), so a bitmap
    /// an [`add`](super::BitmapStore::add), a
    /// [`checkpoint`](super::BitmapStore::checkpoint) or an activation after the spawn
    /// brought counts as the others do. Marks never take the mutex either: they go to the
    /// bitmaps through a [`Tracker`](crate::Tracker) or
    /// [`BitmapStore::bitmap`](super::BitmapStore::bitmap), or, in durable mode, a
    /// [`DurableTracker`](super::durable::DurableTracker), whose intents this thread's
    /// flushes (the durable commits) make durable.
    ///
    /// While the store is inactive the thread skips its flushes. The first flush error
    /// stops the thread; [`FlushThread::is_running`] then says false, and
    /// [`FlushThread::stop`] returns it (the store is then poisoned; in durable mode,
    /// [`Intent::poll`](super::durable::Intent::poll) returns [`Error::Poisoned`]).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a policy with neither a timer nor a threshold, or a zero
    /// `poll` or `interval` (`poll` is checked whether or not the policy has a threshold);
    /// an error spawning the thread.
    pub fn spawn<S: Storage + 'static>(self, store: SharedStore<S>) -> Result<FlushThread> {
        if self.interval.is_none() && self.max_pending_bytes.is_none() {
            return Err(invalid_input!(
                "a flush policy needs an interval or a threshold"
            ));
        }
        if self.poll.is_zero() || self.interval.is_some_and(|i| i.is_zero()) {
            return Err(invalid_input!("flush intervals must be above 0"));
        }
        let shared = Arc::new(Shared::default());
        let gauge = store.lock().pending_gauge();
        let sh = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("dbm-flush".into())
            .spawn(move || self.run(&store, &gauge, &sh))?;
        Ok(FlushThread {
            shared,
            handle: Some(handle),
        })
    }

    fn run<S: Storage>(self, store: &SharedStore<S>, gauge: &TrackedSet, sh: &Shared) {
        let mut last = Instant::now();
        loop {
            let now = Instant::now();
            let mut wait = self.poll;
            if let Some(i) = self.interval {
                let until = i.saturating_sub(now.duration_since(last));
                wait = if self.max_pending_bytes.is_some() {
                    wait.min(until)
                } else {
                    until
                };
            }
            {
                let mut stopped = sh.stopped.lock();
                if *stopped {
                    return;
                }
                if !wait.is_zero() {
                    let _ = sh.wake.wait_for(&mut stopped, wait);
                }
                if *stopped {
                    return;
                }
            }
            let due_time = self.interval.is_some_and(|i| last.elapsed() >= i);
            let estimate = self
                .max_pending_bytes
                .map(|_| flush::pending_estimate(gauge.load().iter()));
            let due_bytes = self
                .max_pending_bytes
                .zip(estimate)
                .is_some_and(|(b, e)| e > b);
            // Anything pending below the threshold is due on a durable store: there a
            // changed region is an intent a write waits on, and a threshold would hold a
            // lone one back for good. Whether the store is durable is read under its lock,
            // taken for that without waiting (held, it is tried again at the next poll).
            let pending = estimate.is_some_and(|e| e > 0);
            if !(due_time || due_bytes || pending) {
                continue;
            }
            let guard = if due_time || due_bytes {
                Some(store.lock())
            } else {
                store
                    .inner
                    .try_lock()
                    .map(|guard| super::StoreGuard { guard })
            };
            let Some(mut s) = guard else {
                continue;
            };
            let r = {
                // Checked under the store lock: stop() holds no store lock, but once it has
                // set the flag no new flush starts (the flag is re-read here).
                if *sh.stopped.lock() {
                    return;
                }
                if !(due_time || due_bytes || s.is_durable()) {
                    continue;
                }
                let r = if s.is_active() {
                    s.flush().map(Some)
                } else {
                    Ok(None)
                };
                drop(s);
                r
            };
            last = Instant::now();
            match r {
                Ok(Some(st)) => {
                    let mut stats = sh.stats.lock();
                    stats.flushes = stats.flushes.saturating_add(1);
                    stats.total.accumulate(&st);
                }
                Ok(None) => {}
                Err(e) => {
                    *sh.error.lock() = Some(e);
                    return;
                }
            }
        }
    }
}

impl FlushThread {
    /// Stops the thread and waits for it: no flush runs after this returns (one that had
    /// already started finishes first).
    ///
    /// # Errors
    /// The flush error that stopped the thread early, if any; [`Error::Internal`] if the
    /// thread panicked (a bug here, or in the store's [`Storage`]).
    pub fn stop(mut self) -> Result<PolicyStats> {
        self.shutdown()?;
        if let Some(e) = self.shared.error.lock().take() {
            return Err(e);
        }
        Ok(*self.shared.stats.lock())
    }

    /// What the thread has done so far.
    pub fn stats(&self) -> PolicyStats {
        *self.shared.stats.lock()
    }

    /// Whether the thread still runs: false once a flush error stopped it (then
    /// [`stop`](Self::stop) returns that error, and the store is poisoned) or it panicked.
    pub fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    fn shutdown(&mut self) -> Result<()> {
        *self.shared.stopped.lock() = true;
        self.shared.wake.notify_all();
        if let Some(h) = self.handle.take() {
            h.join()
                .map_err(|_| Error::Internal("the flush thread panicked".into()))?;
        }
        Ok(())
    }
}

impl Drop for FlushThread {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
