//! The durable mode: write-intent bitmaps that stay consistent on disk at every instant.
//!
//! A store activated with [`BitmapStore::activate_durable`] keeps this invariant: **the
//! bitmap on disk, in place, covers every write whose mark was acknowledged.** It never
//! sets `in_use`, so after a crash or a power loss both this crate and QEMU load a
//! consistent bitmap that covers every acknowledged write: no full backup after a crash.
//! The trade: the first write to a clean granule waits for one ordered disk write (its
//! region, in place, then a barrier); a write to a granule already dirty and durable waits
//! for nothing.
//!
//! The parts:
//! - At activation every bitmap data cluster is allocated (`flush::allocate_all`): an
//!   all-zero cluster is a valid table entry, so from then on a commit is in-place region
//!   writes and one barrier, and allocation never runs on the intent path.
//! - `DurableBits`: per bitmap, the bits known to be on disk. A commit ORs in, after its
//!   barrier, exactly the bytes it wrote. The intent's fast path reads these, not the live
//!   bitmap: a bit another thread just set may not be on disk yet (thread A marks granule
//!   g and waits for the commit; thread B writes into g, sees the bit set, and must not be
//!   acknowledged before A's commit is durable).
//! - [`DurableTracker`]: the only marking handle of a durable store ([`BitmapStore::tracker`]
//!   refuses one). [`mark`](DurableTracker::mark) returns at once when every granule is
//!   durable; otherwise it sets the bits and waits for a group commit: one commit covers
//!   every intent pending when it takes the change maps, and the first waiter to find no
//!   commit running runs it (no thread of its own). [`intent`](DurableTracker::intent)
//!   gives a ticket an asynchronous stack polls ([`Intent::is_durable`]) while something
//!   else commits ([`DurableTracker::commit`], or a [`FlushPolicy`](crate::FlushPolicy),
//!   whose flush is the commit).
//! - Clears are durable when [`BitmapStore::clear`] returns: the durable bits are dropped
//!   first (so no intent is acknowledged on a bit about to go), then memory, then the
//!   regions are written in place with a barrier. A torn clear leaves only extra dirty bits.
//!
//! Crash reasoning, step by step, is in `docs/CRASH-CONSISTENCY.md`, "Durable mode".

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::durable_bits::{Durable, DurableBits};
use super::{BitmapStore, SharedStore};
use crate::bitmap::DirtyBitmap;
use crate::error::{Error, Result, StateProblem};
use crate::flush::{self, FlushStats};
use crate::storage::Storage;

impl<S: Storage> BitmapStore<S> {
    /// Activates the store in durable mode (see the [module documentation](self)): the
    /// bitmaps are loaded as by [`activate`](Self::activate), every bitmap data cluster is
    /// allocated (refcounts, zero or content clusters, table entries, one barrier), and
    /// `in_use` is **not** set: the disk stays consistent, and covers every mark a
    /// [`DurableTracker`] acknowledges. Marks go through
    /// [`SharedStore::durable_tracker`]; [`tracker`](Self::tracker) is refused.
    /// [`flush`](Self::flush) is then a commit (changed regions in place, one barrier), and
    /// [`inactivate`](Self::inactivate) commits what is left and writes nothing else.
    ///
    /// In this mode [`add`](Self::add), [`remove`](Self::remove), [`store`](Self::store),
    /// [`merge`](Self::merge) and resizing are refused while active (inactivate first).
    ///
    /// # Errors
    /// [`Error::WrongState`] if active, or if bitmaps of an earlier activation are parked
    /// (reopen the image: their marks since are not on disk); [`Error::ReadOnly`]; as
    /// [`activate`](Self::activate); I/O while allocating, which poisons the store (the
    /// disk stays consistent: see `docs/CRASH-CONSISTENCY.md`).
    pub fn activate_durable(&mut self) -> Result<()> {
        self.ensure_writable()?;
        if self.active {
            return Err(Error::WrongState(StateProblem::Active));
        }
        if self.slots.iter().any(|s| s.parked.is_some()) {
            return Err(Error::WrongState(StateProblem::ParkedBitmaps));
        }
        self.image.storage().set_writer_locks(true)?;
        let r = self.activate_durable_locked();
        if r.is_err() {
            for s in &mut self.slots {
                s.mem = None;
            }
            self.active = false;
            self.durable = None;
            let _ = self.image.storage().set_writer_locks(false);
        }
        r
    }

    fn activate_durable_locked(&mut self) -> Result<()> {
        self.load_for_activation(&mut super::Preloaded::default())?;
        let mut targets = self.flush_targets()?;
        if let Err(e) = flush::allocate_all(&mut self.image, &mut targets) {
            self.poisoned = true;
            return Err(e);
        }
        self.record_durable_mode()?;
        // Nothing marks the bitmaps yet (they are published below), and what each holds
        // is what its clusters now hold.
        let bits = targets
            .iter()
            .map(|t| Arc::new(DurableBits::of(&t.bitmap)))
            .collect();
        self.durable = Some(Durable { targets, bits });
        self.active = true;
        self.publish();
        Ok(())
    }

    /// Whether the store is active in durable mode.
    pub fn is_durable(&self) -> bool {
        self.durable.is_some()
    }

    /// The durable commit: every changed region in place, one barrier, then the bytes
    /// written become durable bits. Poisons the store on failure.
    pub(crate) fn commit_durable(&mut self) -> Result<FlushStats> {
        self.ensure_writable()?;
        let Some(d) = &self.durable else {
            return Err(Error::WrongState(StateProblem::NotActive));
        };
        let r = flush::commit_in_place(&mut self.image, &d.targets, |ti, r, bytes| {
            if let (Some(b), Some(t)) = (d.bits.get(ti), d.targets.get(ti)) {
                b.confirm(r, t.bitmap.region_size(), bytes);
            }
        });
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// A durable store's clear of slot `i`: durable bits first, memory, then a commit.
    pub(crate) fn clear_durable(&mut self, i: usize) -> Result<()> {
        let (Some(d), Some(m)) = (&self.durable, self.slots.get(i).and_then(|s| s.mem.clone()))
        else {
            return Err(Error::WrongState(StateProblem::NotActive));
        };
        if let Some(k) = d.targets.iter().position(|t| Arc::ptr_eq(&t.bitmap, &m)) {
            if let Some(b) = d.bits.get(k) {
                b.clear();
            }
        }
        m.clear(0, self.disk_size());
        self.commit_durable().map(|_| ())
    }

    /// The durable inactivation: a commit of what is left, then the `auto` flags if a
    /// bitmap's recording changed while active (`in_use` was never set).
    pub(crate) fn inactivate_durable(&mut self) -> Result<FlushStats> {
        let stats = self.commit_durable()?;
        let entries = self.current_entries();
        let mut changed = false;
        let mut new = entries.clone();
        for (e, s) in new.iter_mut().zip(self.slots.iter().filter(|s| !s.stale)) {
            if let Some(m) = &s.mem {
                if e.auto != m.is_enabled() {
                    e.auto = m.is_enabled();
                    changed = true;
                }
            }
        }
        if changed {
            self.write_flags_in_place(new)?;
        }
        self.durable = None;
        Ok(stats)
    }

    /// The marking handles for [`DurableTracker`]: each in-memory bitmap with its durable
    /// bits.
    fn durable_marks(&self) -> Result<Vec<(Arc<DirtyBitmap>, Arc<DurableBits>)>> {
        let d = self
            .durable
            .as_ref()
            .ok_or(Error::WrongState(StateProblem::NotDurable))?;
        Ok(d.targets
            .iter()
            .zip(&d.bits)
            .map(|(t, b)| (Arc::clone(&t.bitmap), Arc::clone(b)))
            .collect())
    }
}

impl<S: Storage> SharedStore<S> {
    /// The marking handle of a store active in durable mode
    /// ([`BitmapStore::activate_durable`]).
    ///
    /// # Errors
    /// [`Error::WrongState`] ([`StateProblem::NotDurable`]) if the store is not active in
    /// durable mode.
    pub fn durable_tracker(&self) -> Result<DurableTracker<S>> {
        let marks = self.lock().durable_marks()?;
        Ok(DurableTracker {
            inner: Arc::new(Inner {
                store: self.clone(),
                marks,
                commit: Mutex::new(CommitState::default()),
                done: Condvar::new(),
            }),
        })
    }
}

#[derive(Debug, Default)]
struct CommitState {
    /// A commit is running (its leader holds the store's lock).
    running: bool,
    /// Commits finished, failed ones included.
    finished: u64,
    /// A commit failed: every intent after it fails too (the store is poisoned).
    failed: bool,
}

#[derive(Debug)]
struct Inner<S: Storage> {
    store: SharedStore<S>,
    marks: Vec<(Arc<DirtyBitmap>, Arc<DurableBits>)>,
    commit: Mutex<CommitState>,
    done: Condvar,
}

/// Marks writes on a store active in durable mode, acknowledging a mark only once it is on
/// disk. See the [module documentation](self). Clones share one group commit.
#[derive(Debug)]
pub struct DurableTracker<S: Storage> {
    inner: Arc<Inner<S>>,
}

impl<S: Storage> Clone for DurableTracker<S> {
    fn clone(&self) -> Self {
        DurableTracker {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<S: Storage> DurableTracker<S> {
    /// The intent for a write of `len` bytes at `offset`: returns once every recording
    /// bitmap has every granule of it set **on disk**, and only then may the caller issue
    /// the write. At once, with no barrier, when that already holds; otherwise after the
    /// group commit that writes the bits (this thread may run it).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a range past the disk or of length 0; the commit's
    /// error (the store is then poisoned, and every later intent fails: the write must not
    /// be issued, since its mark may not be on disk).
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if len > 0 && self.is_durable(offset, len) {
            return Ok(());
        }
        self.mark_slow(offset, len)
    }

    /// [`mark`](Self::mark) past its fast path, out of line.
    #[inline(never)]
    fn mark_slow(&self, offset: u64, len: u64) -> Result<()> {
        self.intent(offset, len)?.wait()
    }

    /// Whether every recording bitmap has every granule of `[offset, offset + len)` set on
    /// disk: the fast path of [`mark`](Self::mark), one load per bitmap for a range inside
    /// one word.
    #[inline(always)]
    pub fn is_durable(&self, offset: u64, len: u64) -> bool {
        self.inner
            .marks
            .iter()
            .all(|(bm, d)| d.covers(offset, len) || !bm.is_enabled())
    }

    /// Sets the bits of a write of `len` bytes at `offset` in memory and returns a ticket
    /// that says when they are on disk, for a stack that must not block a thread per write:
    /// poll [`Intent::is_durable`] and issue the write once it says so, while something
    /// commits ([`commit`](Self::commit), [`Intent::wait`], or a
    /// [`FlushPolicy`](crate::FlushPolicy) on the store).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a range past the disk or of length 0.
    pub fn intent(&self, offset: u64, len: u64) -> Result<Intent<S>> {
        let disk = self.inner.marks.first().map_or(0, |(b, _)| b.disk_size());
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > disk) {
            return Err(Error::InvalidInput(format!(
                "an intent for {len} bytes at {offset} on a disk of {disk} bytes"
            )));
        }
        self.set(offset, len);
        Ok(Intent {
            tracker: self.clone(),
            offset,
            len,
        })
    }

    fn set(&self, offset: u64, len: u64) {
        for (bm, _) in &self.inner.marks {
            bm.mark_dirty(offset, len);
        }
    }

    /// Runs one group commit, or waits for the one running, and returns when it finished.
    ///
    /// # Errors
    /// The commit's error, or the first earlier commit failure.
    pub fn commit(&self) -> Result<()> {
        let inner = &self.inner;
        let mut st = inner.commit.lock();
        if st.failed {
            return Err(Error::Poisoned);
        }
        if st.running {
            let seen = st.finished;
            while st.finished == seen {
                inner.done.wait(&mut st);
            }
            return if st.failed {
                Err(Error::Poisoned)
            } else {
                Ok(())
            };
        }
        st.running = true;
        drop(st);
        let r = inner.store.lock().commit_durable();
        let mut st = inner.commit.lock();
        st.running = false;
        st.finished = st.finished.wrapping_add(1);
        if r.is_err() {
            st.failed = true;
        }
        inner.done.notify_all();
        r.map(|_| ())
    }
}

/// A ticket for the bits of one write ([`DurableTracker::intent`]).
#[derive(Debug)]
#[must_use = "the write may be issued only once the intent is durable"]
pub struct Intent<S: Storage> {
    tracker: DurableTracker<S>,
    offset: u64,
    len: u64,
}

impl<S: Storage> Intent<S> {
    /// Whether the write's bits are on disk: it may be issued.
    pub fn is_durable(&self) -> bool {
        self.tracker.is_durable(self.offset, self.len)
    }

    /// Waits until the write's bits are on disk, running group commits as needed.
    ///
    /// # Errors
    /// A commit's error: the write must not be issued.
    pub fn wait(self) -> Result<()> {
        loop {
            // Set again each round: a clear since may have dropped them (then this write
            // is after the clear, and must be recorded after it).
            self.tracker.set(self.offset, self.len);
            if self.is_durable() {
                return Ok(());
            }
            self.tracker.commit()?;
        }
    }
}
