//! [`FaultStorage`]: fails chosen operations, for fault-injection tests.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::Storage;
use crate::error::{Error, Result};

/// `EIO` on Linux and the BSDs.
const EIO: i32 = 5;
/// `ENOSPC` on Linux and the BSDs.
const ENOSPC: i32 = 28;

/// Which calls of one kind fail. Calls are counted from 1, per kind, since the storage was
/// created (the counters are not reset when the plan changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trigger {
    /// No call fails.
    #[default]
    Never,
    /// Exactly the n-th call fails.
    Nth(u64),
    /// The n-th call and every later one fail.
    From(u64),
}

impl Trigger {
    /// Whether call number `call` (counting from 1) fails.
    #[must_use]
    pub fn fires(self, call: u64) -> bool {
        match self {
            Trigger::Never => false,
            Trigger::Nth(n) => call == n,
            Trigger::From(n) => call >= n,
        }
    }
}

/// What a failed [`write_all_at`](Storage::write_all_at) leaves in the inner storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Landed {
    /// Nothing was written.
    #[default]
    Nothing,
    /// The first `n` bytes (at most the whole buffer) were written: a torn write.
    Prefix(usize),
    /// Everything was written, but the caller is still told it failed.
    All,
}

/// The faults a [`FaultStorage`] injects. Build it with [`FaultPlan::new`] and the
/// `fail_*` methods; the default fails nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct FaultPlan {
    /// Which [`read_exact_at`](Storage::read_exact_at) calls fail with `EIO`.
    pub read: Trigger,
    /// Which [`write_all_at`](Storage::write_all_at) calls fail with `EIO`.
    pub write: Trigger,
    /// What a failed write leaves behind.
    pub landed: Landed,
    /// Which [`sync_data`](Storage::sync_data) calls fail with `EIO`. A failed sync does
    /// not call the inner sync, so nothing becomes durable.
    pub sync: Trigger,
    /// Which growing [`set_len`](Storage::set_len) calls fail with `ENOSPC`, changing
    /// nothing. Only calls that would grow the storage are counted here.
    pub grow: Trigger,
}

impl FaultPlan {
    /// A plan that fails nothing.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Fails the reads `trigger` picks with `EIO`.
    #[must_use]
    pub fn fail_read(mut self, trigger: Trigger) -> Self {
        self.read = trigger;
        self
    }

    /// Fails the writes `trigger` picks with `EIO`, after `landed` of each reached the
    /// inner storage.
    #[must_use]
    pub fn fail_write(mut self, trigger: Trigger, landed: Landed) -> Self {
        self.write = trigger;
        self.landed = landed;
        self
    }

    /// Fails the syncs `trigger` picks with `EIO`.
    #[must_use]
    pub fn fail_sync(mut self, trigger: Trigger) -> Self {
        self.sync = trigger;
        self
    }

    /// Fails the growing `set_len` calls `trigger` picks with `ENOSPC`:
    /// `Trigger::Nth(1)` for "once", `Trigger::From(1)` for "always".
    #[must_use]
    pub fn fail_grow(mut self, trigger: Trigger) -> Self {
        self.grow = trigger;
        self
    }
}

/// Fails the operations a [`FaultPlan`] picks and counts every call.
///
/// A test and fuzzing tool: stack it on a [`MemStorage`](super::MemStorage) or a
/// [`CrashStorage`](super::CrashStorage), usually under a
/// [`LatchingStorage`](super::LatchingStorage) as the image would have it. Every call is
/// counted, failed or not, including calls the inner storage rejects.
#[derive(Debug)]
pub struct FaultStorage<S> {
    inner: S,
    plan: Mutex<FaultPlan>,
    reads: AtomicU64,
    writes: AtomicU64,
    set_lens: AtomicU64,
    grows: AtomicU64,
    syncs: AtomicU64,
}

/// Bumps a call counter and returns the new count.
fn bump(counter: &AtomicU64) -> u64 {
    counter.fetch_add(1, Ordering::SeqCst).saturating_add(1)
}

fn os_error(code: i32) -> Error {
    Error::Io(io::Error::from_raw_os_error(code))
}

impl<S: Storage> FaultStorage<S> {
    /// Wraps `inner` with `plan`.
    #[must_use]
    pub fn new(inner: S, plan: FaultPlan) -> Self {
        Self {
            inner,
            plan: Mutex::new(plan),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            set_lens: AtomicU64::new(0),
            grows: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    /// Replaces the plan, for example to arm a fault after setting up an image. Call counts
    /// carry on from where they are: use [`writes`](Self::writes) and friends to aim.
    pub fn set_plan(&self, plan: FaultPlan) {
        *self.plan.lock() = plan;
    }

    /// The current plan.
    #[must_use]
    pub fn plan(&self) -> FaultPlan {
        *self.plan.lock()
    }

    /// `read_exact_at` calls so far.
    #[must_use]
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    /// `write_all_at` calls so far.
    #[must_use]
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// `set_len` calls so far.
    #[must_use]
    pub fn set_lens(&self) -> u64 {
        self.set_lens.load(Ordering::SeqCst)
    }

    /// `set_len` calls so far that asked to grow the storage.
    #[must_use]
    pub fn grows(&self) -> u64 {
        self.grows.load(Ordering::SeqCst)
    }

    /// `sync_data` calls so far.
    #[must_use]
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::SeqCst)
    }

    /// The wrapped storage.
    #[must_use]
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// The wrapped storage, consuming the wrapper.
    #[must_use]
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Storage> Storage for FaultStorage<S> {
    fn len(&self) -> Result<u64> {
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let call = bump(&self.reads);
        if self.plan().read.fires(call) {
            return Err(os_error(EIO));
        }
        self.inner.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let call = bump(&self.writes);
        let plan = self.plan();
        if !plan.write.fires(call) {
            return self.inner.write_all_at(buf, offset);
        }
        let landed = match plan.landed {
            Landed::Nothing => &[][..],
            Landed::Prefix(n) => buf.get(..n).unwrap_or(buf),
            Landed::All => buf,
        };
        if !landed.is_empty() {
            // A prefix the inner storage refuses (past the end) is reported as that error.
            self.inner.write_all_at(landed, offset)?;
        }
        Err(os_error(EIO))
    }

    fn set_len(&self, new_len: u64) -> Result<()> {
        bump(&self.set_lens);
        if new_len > self.inner.len()? {
            let call = bump(&self.grows);
            if self.plan().grow.fires(call) {
                return Err(os_error(ENOSPC));
            }
        }
        self.inner.set_len(new_len)
    }

    fn sync_data(&self) -> Result<()> {
        let call = bump(&self.syncs);
        if self.plan().sync.fires(call) {
            return Err(os_error(EIO));
        }
        self.inner.sync_data()
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
