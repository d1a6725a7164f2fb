//! [`LatchingStorage`]: fail closed after the first I/O error (redb's `CheckedBackend`).

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::Storage;
use crate::error::{Error, Result};

/// Latches the first failure of a write, `set_len` or sync, and refuses every later one.
///
/// After a mutating call fails with anything but [`Error::InvalidInput`] or
/// [`Error::WrongState`] (refusals that guarantee the inner storage was not touched: a
/// read-only file, a range past the end, a [`FileStorage`](super::FileStorage) whose writer
/// locks are released during a hand-over), the on-disk state is unknown: a write may be half
/// done, and a failed `fdatasync` may have dropped dirty pages so that a retry would report
/// success for lost data. From then on every [`write_all_at`](Storage::write_all_at),
/// [`set_len`](Storage::set_len) and [`sync_data`](Storage::sync_data) returns
/// [`Error::Poisoned`] **without calling the inner storage**. Reads and `len` still work,
/// so the caller can inspect what is there. The only way out is to drop this and reopen.
///
/// The latch applies to calls that *start* after the failing call returned; calls already
/// in flight on other threads finish normally.
#[derive(Debug)]
pub struct LatchingStorage<S> {
    inner: S,
    poisoned: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl<S: Storage> LatchingStorage<S> {
    /// Wraps `inner`, not yet poisoned.
    #[must_use]
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            poisoned: AtomicBool::new(false),
            first_error: Mutex::new(None),
        }
    }

    /// Whether a mutating call has failed.
    #[must_use]
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    /// The message of the error that poisoned the storage, if any.
    #[must_use]
    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().clone()
    }

    /// The wrapped storage.
    #[must_use]
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped storage, consuming the latch.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Runs a mutating call unless poisoned, and latches its failure.
    fn guarded(&self, call: impl FnOnce(&S) -> Result<()>) -> Result<()> {
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let result = call(&self.inner);
        if let Err(e) = &result {
            if !matches!(e, Error::InvalidInput(_) | Error::WrongState(_)) {
                let mut first = self.first_error.lock();
                if first.is_none() {
                    *first = Some(e.to_string());
                }
                self.poisoned.store(true, Ordering::Release);
            }
        }
        result
    }
}

impl<S: Storage> Storage for LatchingStorage<S> {
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.guarded(|s| s.write_all_at(buf, offset))
    }

    fn set_len(&self, new_len: u64) -> Result<()> {
        self.guarded(|s| s.set_len(new_len))
    }

    fn sync_data(&self) -> Result<()> {
        self.guarded(|s| s.sync_data())
    }

    fn set_writer_locks(&self, held: bool) -> Result<()> {
        self.inner.set_writer_locks(held)
    }

    fn hold_data_file(&self, name: &[u8]) -> Result<()> {
        self.inner.hold_data_file(name)
    }

    fn forget_cached(&self) -> Result<()> {
        self.inner.forget_cached()
    }

    fn prefetch(&self, ranges: &[(u64, u64)]) {
        self.inner.prefetch(ranges);
    }
}
