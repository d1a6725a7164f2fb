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
//!   refuses one, and [`BitmapStore::bitmap`] hands out no live bitmap, whose `clear` or
//!   `set_enabled` would go behind the durable bits). [`mark`](DurableTracker::mark) returns at once when every granule is
//!   durable; otherwise it sets the bits and waits for a group commit: one commit covers
//!   every intent pending when it takes the change maps, and the first waiter to find no
//!   commit running runs it (no thread of its own). [`intent`](DurableTracker::intent)
//!   gives a ticket an asynchronous stack polls ([`Intent::is_durable`]) while something
//!   else commits ([`DurableTracker::commit`], or a [`FlushPolicy`](crate::FlushPolicy),
//!   whose flush is the commit).
//! - Clears are durable when [`BitmapStore::clear`] returns: the durable bits are dropped
//!   first (so no intent is acknowledged on a bit about to go), then memory, then the
//!   regions are written in place with a barrier. A torn clear leaves only extra dirty bits.
//! - Writes in flight: an intent is acknowledged before its write is issued, and the store
//!   cannot see the write complete. A write acknowledged before a checkpoint, an `add` of a
//!   recording bitmap, a `set_enabled` or a clear, landing after it, would be in no bitmap
//!   recording after it (a checkpoint's new bitmap starts empty), or cleared. A caller that
//!   does not drain its writes around those calls (as QEMU does around a transaction)
//!   registers each write ([`DurableTracker::begin_write`], a guard it drops once the write
//!   completed); each such call, once its change is published, marks every registered
//!   write in the bitmaps that record after it (a clear: in the bitmap it clears), on
//!   disk, before it returns (`BitmapStore::commit_in_flight`; why the registry misses no
//!   write that needs it: `InFlight` in `durable_bits.rs`).
//!
//! Crash reasoning, step by step, is in `docs/CRASH-CONSISTENCY.md`, "Durable mode".

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::durable_bits::{Durable, DurableBits, DurableSet, InFlight, Marks};
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
    /// The directory changes keep the invariant at every crash point: [`add`](Self::add)
    /// allocates the new bitmap's clusters before the directory names it, and trackers mark
    /// it from their next intent; [`remove`](Self::remove) commits the directory, then
    /// frees; [`store`](Self::store) and [`merge`](Self::merge) OR into memory and commit
    /// before they return; [`set_enabled`](Self::set_enabled) writes the flags in place.
    /// [`resize`](Self::resize) needs an inactive store, as in the deferred mode.
    ///
    /// After a durable [`inactivate`](Self::inactivate) (a migration that failed after
    /// its stop) it activates again from the disk, which holds every acknowledged mark.
    /// Durable trackers follow the store: their intents fail between the inactivation and
    /// this call, and mark the bitmaps of this activation after it.
    ///
    /// A deferred [`Tracker`](crate::Tracker) taken from an earlier activation
    /// ([`tracker`](Self::tracker)) would follow this one's bitmaps and mark them in memory
    /// only, its marks acknowledged with nothing on disk: the call is refused while one
    /// exists. Drop every such tracker first.
    ///
    /// # Errors
    /// [`Error::WrongState`] if active, if bitmaps of an earlier deferred activation are
    /// parked (reopen the image: their marks since are not on disk), while a deferred
    /// tracker of this store exists ([`StateProblem::DeferredTrackers`]), or if the image
    /// changed since a durable inactivation ([`StateProblem::ChangedWhileInactive`]);
    /// [`Error::ReadOnly`]; as
    /// [`activate`](Self::activate); I/O while allocating, which poisons the store (the
    /// disk stays consistent: see `docs/CRASH-CONSISTENCY.md`).
    pub fn activate_durable(&mut self) -> Result<()> {
        self.activate_durable_preloaded(super::Preloaded::default())
    }

    /// [`activate_durable`](Self::activate_durable) starting from bitmaps read at
    /// [`preload`](Self::preload) time, refreshed from the disk as
    /// [`activate_preloaded`](Self::activate_preloaded) does (a migration destination's
    /// way to keep the load out of the downtime).
    ///
    /// # Errors
    /// As [`activate_durable`](Self::activate_durable).
    pub fn activate_durable_preloaded(&mut self, mut pre: super::Preloaded) -> Result<()> {
        // Taken first, whatever this call does (as `activate_preloaded`).
        let accept = std::mem::take(&mut self.accept_in_use);
        self.ensure_writable()?;
        if self.active {
            return Err(Error::WrongState(StateProblem::Active));
        }
        if self.slots.iter().any(|s| s.parked.is_some()) && !self.parked_durable {
            return Err(Error::WrongState(StateProblem::ParkedBitmaps));
        }
        // A deferred `Tracker` follows `tracked`, which this activation fills with its
        // bitmaps: its marks would land in memory only and return, while the disk stays
        // consistent without them. Only trackers hold the set besides the store, and none
        // is made while durable (`tracker` refuses), so a count of one means none exists
        // now or later in this activation.
        if Arc::strong_count(&self.tracked) > 1 {
            return Err(Error::WrongState(StateProblem::DeferredTrackers));
        }
        // While another process (a migration destination) holds the image writable, this
        // fails and nothing is read or written.
        let before = self.take_writer_locks()?;
        self.activation_body(
            before,
            |s| {
                let in_use_set = s.ensure_resumable(before, accept)?;
                s.resume_durable_parked()?;
                s.activate_durable_locked(&mut pre, in_use_set)
            },
            |s| {
                for slot in &mut s.slots {
                    slot.mem = None;
                }
                s.active = false;
                s.durable = None;
            },
        )
    }

    /// Bitmaps parked by a durable inactivation are dropped, and the activation loads the
    /// disk: it holds every acknowledged mark, while the parked copies may hold bits of
    /// intents that failed after the inactivation (never acknowledged, their writes never
    /// issued), bits no durable-bit copy may vouch for. The caller checked that nobody else
    /// wrote the image since ([`ensure_resumable`](Self::ensure_resumable): this handle's
    /// metadata would be stale otherwise, and the parked copies then stay).
    fn resume_durable_parked(&mut self) -> Result<()> {
        if self.slots.iter().all(|s| s.parked.is_none()) {
            return Ok(());
        }
        for s in &mut self.slots {
            s.parked = None;
        }
        self.parked_durable = false;
        self.parking = false;
        self.publish();
        Ok(())
    }

    /// `in_use_set`: a destination set `in_use` in place on the directory this handle
    /// wrote ([`ensure_resumable`](Self::ensure_resumable)); the flags are written back
    /// clear once what was loaded is durable.
    fn activate_durable_locked(
        &mut self,
        pre: &mut super::Preloaded,
        in_use_set: bool,
    ) -> Result<()> {
        self.load_for_activation(pre)?;
        // Before the allocation's first write: a mode that cannot be recorded would refuse
        // the activation after it.
        self.ensure_durable_mode_fits()?;
        let loaded = self.image.sync_count();
        let mut targets = self.flush_targets()?;
        if let Err(e) = flush::allocate_all(&mut self.image, &mut targets) {
            self.poisoned = true;
            return Err(e);
        }
        self.record_durable_mode()?;
        // Every bit loaded becomes a durable bit below, which a fast path acknowledges
        // with no barrier. But a read returns what a write put in the page cache, not what
        // is on disk: a writer that died between a commit's region write and its barrier
        // (an intent never acknowledged) leaves bits a power loss would drop. A barrier
        // after the reads makes what they returned durable (it flushes every dirty page of
        // the file, whoever wrote it; the writer locks keep anyone else from writing
        // since). A page a failed barrier left behind is clean and no barrier writes it,
        // but the writable open asked the cache to drop the file's clean pages first
        // (`Storage::forget_cached`; a migration destination's preload did, before its
        // first read), so no read here returned one. The allocation's and
        // the mode's barriers, when they ran, came after the reads too; only when neither
        // ran is one issued here.
        if self.image.sync_count() == loaded {
            if let Err(e) = self.image.sync() {
                self.poisoned = true;
                return Err(e);
            }
        }
        // A destination that took the image over and died before it started the guest
        // left `in_use` on the entries, in place, and nothing else. What was loaded is
        // every bit the disk holds, durable since the barrier above, so the flags go back
        // clear (in place, one barrier) before any intent is acknowledged: a durable
        // bitmap is never `in_use` on disk. A crash before that barrier leaves them
        // `in_use` (inconsistent, never clean).
        if in_use_set {
            let entries = self.current_entries();
            if let Err(e) = self.write_flags_in_place(entries) {
                self.poisoned = true;
                return Err(e);
            }
        }
        // Nothing marks the bitmaps yet (they are published below), and what each holds
        // is what its clusters now hold, on disk.
        let ready = std::mem::take(&mut pre.ready_bits);
        self.durable = Some(Durable::new(
            targets,
            &self.durable_set,
            self.disk_size(),
            ready,
        ));
        self.active = true;
        self.activations += 1;
        self.parking = false;
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
        let ids = match &self.write_log {
            Some(_) => flush::Target::ids(&d.targets),
            None => Vec::new(),
        };
        let r = self.logged(&ids, r);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// A durable store's clear of slot `i`: durable bits first, memory, the writes
    /// registered in flight set again, then a commit.
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
        // A fast path that read a bit dropped above as covering its write must not answer
        // after this returns: the epoch moves after the drop (`DurableTracker::is_durable`).
        self.durable_set.bump();
        m.clear(0, self.disk_size());
        // A write acknowledged before the clear and still in flight lands after it: its
        // bits stay (registered writes only: see `InFlight` in `durable_bits.rs`), in the
        // same commit.
        self.mark_in_flight(Some(&m));
        self.commit_durable().map(|_| ())
    }

    /// After a change of which bitmaps record: every write registered in flight
    /// ([`DurableTracker::begin_write`]) is marked in every bitmap that records now, and
    /// committed, so that it is on disk before the change's call returns. The caller has
    /// published the change (the trackers' view and epoch, the flags in memory): see
    /// `InFlight` in `durable_bits.rs` for why a write this misses marks those bitmaps
    /// itself. A write already on disk costs nothing (no bit changes, no barrier). Poisons
    /// the store on failure, as every durable commit does; the bitmaps that recorded before
    /// the change still hold the write on disk (its intent was durable in them).
    pub(crate) fn commit_in_flight(&mut self) -> Result<()> {
        if self.durable.is_none() {
            return Ok(());
        }
        if self.mark_in_flight(None) {
            self.commit_durable()?;
        }
        Ok(())
    }

    /// Marks every write registered in flight into `only`, or, when `None`, into every
    /// bitmap of the durable list that records; whether there was any.
    fn mark_in_flight(&self, only: Option<&Arc<DirtyBitmap>>) -> bool {
        let Some(d) = &self.durable else {
            return false;
        };
        let writes = self.durable_set.in_flight.snapshot();
        if writes.is_empty() {
            return false;
        }
        for t in &d.targets {
            let take = match only {
                Some(m) => Arc::ptr_eq(m, &t.bitmap),
                None => t.bitmap.is_enabled(),
            };
            if take {
                for &(offset, len) in &writes {
                    t.bitmap.or_range(offset, len);
                }
                // A bit a racing mark (another intent's fan-out) set in memory is not set
                // again, and its region may not be recorded yet: set in memory is not on
                // disk. Once the marks in flight end, every such region is recorded, and the
                // commit that follows writes it.
                t.bitmap.wait_for_marks();
            }
        }
        true
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
        if let Some(mut d) = self.durable.take() {
            d.close();
        }
        Ok(stats)
    }

    /// The list a [`DurableTracker`] marks: each in-memory bitmap with its durable bits,
    /// replaced by `add`, `remove` and each durable activation and inactivation.
    fn durable_marks(&self) -> Result<DurableSet> {
        if self.durable.is_none() {
            return Err(Error::WrongState(StateProblem::NotDurable));
        }
        Ok(Arc::clone(&self.durable_set))
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
        Ok(DurableTracker::current(Arc::new(Inner {
            store: self.clone(),
            marks,
            commit: Mutex::new(CommitState::default()),
            done: Condvar::new(),
            arrivals: AtomicU64::new(0),
        })))
    }
}

#[derive(Debug, Default)]
struct CommitState {
    /// A commit is running (its leader holds the store's lock).
    running: bool,
    /// Commits finished, failed ones included.
    finished: u64,
    /// A commit failed on I/O or a poisoned store: every intent after it fails too (the
    /// store is poisoned, and never activates again). Not set by a commit that found the
    /// store inactivated.
    failed: bool,
}

#[derive(Debug)]
struct Inner<S: Storage> {
    store: SharedStore<S>,
    marks: DurableSet,
    commit: Mutex<CommitState>,
    done: Condvar,
    /// Intents that set their bits, ever: a leader gathers while it grows.
    arrivals: AtomicU64,
}

/// The most times a commit's leader yields, waiting for intents still arriving, before
/// it takes the change maps.
const GATHER_ROUNDS: u32 = 16;

/// Marks writes on a store active in durable mode, acknowledging a mark only once it is on
/// disk. See the [module documentation](self). Clones share one group commit.
///
/// A tracker follows its store: a bitmap [`add`](BitmapStore::add)ed later receives every
/// intent that starts after the call returned, and a removed one none; after an
/// [`inactivate`](BitmapStore::inactivate) its intents fail until the store is activated
/// in durable mode again, and then mark that activation's bitmaps. Each handle keeps
/// the list of bitmaps it last saw; after an `add`, a `remove`, a checkpoint, a
/// `set_enabled` or a durable clear its fast path reads the store's current list instead
/// (one lock-free load more), until the handle is cloned or [`refresh`](Self::refresh)ed.
///
/// Never mark, [`begin_write`](Self::begin_write), [`commit`](Self::commit) or
/// [`Intent::wait`] while the same thread holds the store's lock
/// ([`SharedStore::lock`]): a mark that needs a commit takes that lock, which is not
/// re-entrant, and the thread would wait for itself for good. [`Intent::poll`] only tries
/// it, and may be called there.
#[derive(Debug)]
pub struct DurableTracker<S: Storage> {
    inner: Arc<Inner<S>>,
    /// `inner.marks`, one pointer nearer: the fast path reads its epoch.
    set: DurableSet,
    /// The view at `epoch` (open): the current one while the store's epoch is still
    /// `epoch`.
    cached: Marks,
    epoch: u64,
}

impl<S: Storage> Clone for DurableTracker<S> {
    /// A handle on the same group commit, with the store's current list.
    fn clone(&self) -> Self {
        Self::current(Arc::clone(&self.inner))
    }
}

impl<S: Storage> DurableTracker<S> {
    /// A handle with the current view: the epoch read first, so a view published after
    /// it only makes the copy look stale (and, until the bump, is the shared view anyway).
    /// A closed view (an empty list, which would vouch for every range) is never current:
    /// its epoch is one no store reaches. The view is one value, so the copy is open
    /// exactly when it holds its activation's bitmaps.
    fn current(inner: Arc<Inner<S>>) -> Self {
        let epoch = inner.marks.epoch.load(SeqCst);
        let cached = inner.marks.view.load_full();
        let epoch = if cached.open { epoch } else { u64::MAX };
        DurableTracker {
            set: Arc::clone(&inner.marks),
            inner,
            cached,
            epoch,
        }
    }

    /// Takes the store's current list of bitmaps as this handle's own, so that its fast
    /// path reads no shared list after an [`add`](BitmapStore::add), a
    /// [`remove`](BitmapStore::remove), a [`checkpoint`](BitmapStore::checkpoint), a
    /// [`set_enabled`](BitmapStore::set_enabled) or a [`clear`](BitmapStore::clear).
    pub fn refresh(&mut self) {
        *self = Self::current(Arc::clone(&self.inner));
    }

    /// Runs `f` on the list current at `epoch`, a value of the store's epoch the caller
    /// read, and its disk size: this handle's copy while `epoch` is its own, else the
    /// store's; `closed` while the store is not active in durable mode (its inactivation
    /// changed the epoch, so no handle's copy is current then). The store's view is read
    /// after the epoch, so it is the one published at `epoch` or a later one.
    #[inline(always)]
    fn with_marks_at<R>(
        &self,
        epoch: u64,
        closed: R,
        f: impl FnOnce(&[(Arc<DirtyBitmap>, Arc<DurableBits>)], u64) -> R,
    ) -> R {
        if epoch == self.epoch {
            return f(&self.cached.marks, self.cached.disk_size);
        }
        let view = self.set.view.load();
        if !view.open {
            return closed;
        }
        f(&view.marks, view.disk_size)
    }

    /// The intent for a write of `len` bytes at `offset`: returns once every recording
    /// bitmap has every granule of it set **on disk**, and only then may the caller issue
    /// the write. At once, with no barrier, when that already holds; otherwise after the
    /// group commit that writes the bits (this thread may run it).
    ///
    /// The store cannot see when the write completes. So a caller of plain `mark` must
    /// have no write in flight whose mark returned before a
    /// [`checkpoint`](BitmapStore::checkpoint), a [`clear`](BitmapStore::clear), a
    /// [`set_enabled`](BitmapStore::set_enabled) or an [`add`](BitmapStore::add) of a
    /// recording bitmap (it drains its writes around them, as QEMU does around a
    /// transaction): such a write, landing after the call, would be in no bitmap recording
    /// after it (a checkpoint's new bitmap starts empty, and the old one is then
    /// [`remove`](BitmapStore::remove)d), or cleared. A caller that does not drain uses
    /// [`begin_write`](Self::begin_write), whose guard keeps the write in flight for
    /// those calls.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a range past the disk or of length 0;
    /// [`Error::WrongState`] while the store is not active in durable mode (after an
    /// inactivate, until the next durable activation); the commit's error (the store is
    /// then poisoned, and every later intent that needs a commit fails; one whose bits a
    /// commit made durable before the failure still returns at once). In every case the
    /// write must not be issued: its mark may not be on disk.
    #[inline]
    pub fn mark(&self, offset: u64, len: u64) -> Result<()> {
        if len > 0 && self.is_durable(offset, len) {
            return Ok(());
        }
        self.mark_slow(offset, len)
    }

    /// [`mark`](Self::mark) for a write the store keeps track of until it completes:
    /// registered in flight first (as [`register_write`](Self::register_write)), then
    /// marked. Issue the write once this returns, and drop the guard once the write
    /// completed, failed or was abandoned. While the guard lives, a
    /// [`checkpoint`](BitmapStore::checkpoint), an [`add`](BitmapStore::add) of a recording
    /// bitmap or a [`set_enabled`](BitmapStore::set_enabled) marks the write, on disk, in
    /// every bitmap that records after it, and a [`clear`](BitmapStore::clear) leaves it in
    /// the bitmap it clears, before they return: no need to drain writes around them.
    ///
    /// Costs beside `mark`'s: a lock of one of several shards, twice.
    ///
    /// # Errors
    /// As [`mark`](Self::mark): the write must not be issued (the guard is dropped).
    pub fn begin_write(&self, offset: u64, len: u64) -> Result<WriteInFlight> {
        let guard = self.register_write(offset, len)?;
        self.mark(offset, len)?;
        Ok(guard)
    }

    /// Registers a write of `len` bytes at `offset` in flight until the guard drops,
    /// without marking it: for a stack that takes its [`intent`](Self::intent) itself.
    /// Call it **before** the write's [`mark`](Self::mark) or [`intent`](Self::intent)
    /// (the order is what makes the registry complete: a registration a store call does
    /// not see came after that call's change, so the intent after it marks the bitmaps of
    /// after the change), and drop the guard once the write completed, failed or was
    /// abandoned. See [`begin_write`](Self::begin_write).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a range past the disk or of length 0.
    pub fn register_write(&self, offset: u64, len: u64) -> Result<WriteInFlight> {
        let disk = self.set.view.load().disk_size;
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > disk) {
            return Err(Error::InvalidInput(format!(
                "a write of {len} bytes at {offset} on a disk of {disk} bytes"
            )));
        }
        let registry = Arc::clone(&self.set.in_flight);
        let (shard, id) = registry.insert(offset, len);
        Ok(WriteInFlight {
            registry,
            shard,
            id,
        })
    }

    /// [`mark`](Self::mark) past its fast path, out of line.
    #[inline(never)]
    fn mark_slow(&self, offset: u64, len: u64) -> Result<()> {
        self.intent(offset, len)?.wait()
    }

    /// Whether every recording bitmap has every granule of `[offset, offset + len)` set on
    /// disk: the fast path of [`mark`](Self::mark), for a range inside one word one load
    /// per bitmap (two for one not covered), between two loads of the store's epoch. False
    /// for a range past the disk of the current activation (even when no bitmap records:
    /// such a write must fail), and while the store is not active in durable mode.
    ///
    /// It reads the store's epoch before and after the bitmaps, and answers false if the
    /// epoch moved in between: a checkpoint, a `set_enabled`, a clear, an `add`, a
    /// `remove` or an inactivation ran during the reads.
    #[inline(always)]
    pub fn is_durable(&self, offset: u64, len: u64) -> bool {
        // Why a `true` never leaves the write in no recording bitmap. The answer is made of
        // several reads (the epoch, then per bitmap its durable bits and maybe its
        // `enabled` flag), and a checkpoint, a hand-over, an `add`, a `remove` or an
        // inactivation may run between them. A bitmap read disabled is skipped, so without
        // more a checkpoint between the epoch read and the read of the old bitmap's flag
        // would have the write skipped in the old bitmap, disabled by then, and not
        // required in the new one, missing from the list read: acknowledged in neither. So
        // the read is a seqlock's: the epoch is read again after the last bitmap, and the
        // answer counts only if it did not move. Every change that can make a skipped
        // bitmap wrong moves the epoch first: a new view is stored, then the epoch bumped
        // (`Durable::replace`: `add`, `remove`, a checkpoint's new bitmap, activation,
        // inactivation), and a durable disable bumps the epoch before it clears the flag in
        // memory (`BitmapStore::stop_recording`; its flags write and barrier come before
        // both).
        //
        // Two changes make a read answer wrong the other way, and bump the epoch *after*
        // their change: an enable (a bitmap read disabled and skipped starts recording:
        // `BitmapStore::set_enabled`) and a clear (a durable bit read as covering the
        // write is dropped: `BitmapStore::clear_durable`). If `e0` read that bump, the
        // read between saw the change (the flag set; the bit dropped, or set again by a
        // later commit, durable then); if `e1` read it and `e0` did not, the answer is
        // refused. So an answer that counts made every read before the bump, which comes
        // before the change's call returns: the mark overlapped the call, and its write
        // counts as in flight at it (a caller drains, or registers it:
        // `DurableTracker::begin_write`), never as one marked after it.
        //
        // Every access involved is `SeqCst` (the view's `ArcSwap` store and load included),
        // but the argument needs only acquire and release: each step is a read that sees a
        // write, and with it everything its writer did before (message passing; no
        // store-buffering shape, so loom, which models `SeqCst` accesses as
        // acquire-release, checks it as it is). Say the two epoch reads `e0` and `e1`
        // agree, and a read `r` between them saw bitmap X disabled. Either X was never
        // enabled in this activation (the disk never said it records), or `r` saw a
        // disable's clear `c` (a read-modify-write, or one after it), and that disable's
        // bump `b` came before `c` in its thread: `b` happens before `r`, which comes
        // before `e1`, so `e1` sees `b`'s value or a later one, and so does `e0`, equal to
        // it (the epoch only grows). `e0` reading from the bumps after `b`
        // (read-modify-writes all) synchronizes with `b`: the list read is the one current
        // at `b` or later (this handle's copy was read after its epoch was, and is used
        // only while that epoch is `e0`; the store's view is read after `e0`), and
        // everything the disabling thread did before `b` is visible: its flags write and
        // barrier done, a checkpoint's new bitmap in the list, the bitmap a hand-over
        // enabled first read enabled (unless a later disable cleared it, which the same
        // argument covers). A bitmap read enabled was read covered. A list replaced between
        // `e0` and `e1` is refused too, so the durable bits of an activation that closed
        // (then maybe cleared on the inactive store, then activated again) are never
        // believed after the close. A change after `e1` comes after this answer: the
        // disable of a bitmap read covered drops no durable bit.
        //
        // The cost on the fast path is the second load of the epoch, a word it already
        // read.
        let e0 = self.set.epoch.load(SeqCst);
        let covered = self.with_marks_at(e0, false, |marks, disk_size| {
            #[cfg(test)]
            super::durable_bits::hook::read_start();
            offset.checked_add(len).is_some_and(|e| e <= disk_size)
                && marks.iter().all(|(bm, d)| {
                    let r = d.covers(offset, len) || !bm.is_enabled();
                    #[cfg(test)]
                    super::durable_bits::hook::read_next();
                    r
                })
        });
        covered && self.set.epoch.load(SeqCst) == e0
    }

    /// Sets the bits of a write of `len` bytes at `offset` in memory and returns a ticket
    /// that says when they are on disk, for a stack that must not block a thread per write:
    /// poll [`Intent::poll`] (or [`Intent::is_durable`]) and issue the write once it says
    /// so, while something commits ([`commit`](Self::commit), [`Intent::wait`], or a
    /// [`FlushPolicy`](crate::FlushPolicy) on the store); `poll` also says when a commit
    /// failed, which `is_durable` alone never does.
    ///
    /// As for [`mark`](Self::mark), the store cannot see the write complete: register it
    /// first ([`register_write`](Self::register_write)), or drain writes around a
    /// checkpoint, a clear, a `set_enabled` or an `add` of a recording bitmap.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a range past the disk or of length 0.
    pub fn intent(&self, offset: u64, len: u64) -> Result<Intent<S>> {
        let disk = self.set.view.load().disk_size;
        if len == 0 || offset.checked_add(len).is_none_or(|e| e > disk) {
            return Err(Error::InvalidInput(format!(
                "an intent for {len} bytes at {offset} on a disk of {disk} bytes"
            )));
        }
        self.set(offset, len);
        self.inner.arrivals.fetch_add(1, SeqCst);
        Ok(Intent {
            tracker: self.clone(),
            offset,
            len,
        })
    }

    /// Sets the bits in memory. Over several bitmaps the fan-out announces itself, as
    /// [`crate::Tracker::mark`]'s does, so that handing recording over (enable B, then
    /// disable A) never leaves a write in neither.
    fn set(&self, offset: u64, len: u64) {
        let epoch = self.set.epoch.load(SeqCst);
        self.with_marks_at(epoch, (), |marks, _| match marks {
            [] => {}
            [(only, _)] => only.mark_dirty(offset, len),
            several => {
                crate::bitmap::mark_fanned_out(several.iter().map(|(bm, _)| &**bm), offset, len)
            }
        })
    }

    /// [`set`](Self::set) without waiting on a sealed bitmap (a stop running): false if one
    /// was sealed, having set the others; a later call sets it.
    fn set_unless_sealed(&self, offset: u64, len: u64) -> bool {
        let epoch = self.set.epoch.load(SeqCst);
        self.with_marks_at(epoch, true, |marks, _| match marks {
            [] => true,
            [(only, _)] => only.mark_dirty_unless_sealed(offset, len),
            several => crate::bitmap::mark_fanned_out_unless_sealed(
                several.iter().map(|(bm, _)| &**bm),
                offset,
                len,
            ),
        })
    }

    /// Runs one group commit, or waits for the one running, and returns when it finished.
    ///
    /// # Errors
    /// The commit's error; [`Error::Poisoned`] once an earlier or concurrent commit of this
    /// tracker failed, and for a poisoned store (a failed durable add or checkpoint poisons it and ends the trackers'
    /// view: it never activates again); otherwise [`Error::WrongState`]
    /// ([`StateProblem::NotActive`]) once the store left its durable activation.
    pub fn commit(&self) -> Result<()> {
        let inner = &self.inner;
        if !inner.marks.view.load().open {
            // Poison first, as `Intent::poll` says it: a failed durable add or checkpoint
            // also closes the view, and that store never activates again ("not active"
            // would have its caller wait for an activation). Only tried: a holder of the
            // store's lock may be the one closing the view, and waits for nothing here.
            let poisoned = inner.commit.lock().failed
                || inner
                    .store
                    .inner
                    .try_lock()
                    .is_some_and(|s| s.poisoned || s.image.is_poisoned());
            return Err(if poisoned {
                Error::Poisoned
            } else {
                Error::WrongState(StateProblem::NotActive)
            });
        }
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
        // Should the commit unwind (a `Storage` that panicked), the waiters must not wait
        // for a `finished` that never comes, and its taken regions are lost to the change
        // maps: the guard ends the commit as failed and poisons the store.
        let mut guard = LeaderGuard {
            inner: &**inner,
            armed: true,
        };
        // Gather first. The threads the last commit released come back with their next
        // intents within microseconds; a leader that took the change maps at once would
        // leave them to the commit after, and the threads would split into two groups
        // taking turns, each commit carrying half of them. So it yields while intents
        // keep arriving (a bounded number of times; once, about a microsecond, when none
        // comes). A bit set after the maps are taken is simply the next commit's.
        for _ in 0..GATHER_ROUNDS {
            let seen = inner.arrivals.load(SeqCst);
            std::thread::yield_now();
            if inner.arrivals.load(SeqCst) == seen {
                break;
            }
        }
        let r = inner.store.lock().commit_durable();
        guard.armed = false;
        let mut st = inner.commit.lock();
        st.running = false;
        st.finished = st.finished.wrapping_add(1);
        // Only a real failure (the store is then poisoned, for good) fails every later
        // intent. A store inactivated since the open check above says `WrongState`: the
        // waiters go round again and find it closed, and a later durable activation of
        // the same store takes intents again.
        if matches!(r, Err(ref e) if !matches!(e, Error::WrongState(_))) {
            st.failed = true;
        }
        inner.done.notify_all();
        r.map(|_| ())
    }
}

/// Ends a group commit whose leader unwound (see [`DurableTracker::commit`]): the commit
/// counts as finished and failed, the waiters are woken, and the store is poisoned.
struct LeaderGuard<'a, S: Storage> {
    inner: &'a Inner<S>,
    armed: bool,
}

impl<S: Storage> Drop for LeaderGuard<'_, S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // The leader's lock on the store was a temporary of the commit's expression,
        // released by the unwinding before this guard.
        self.inner.store.lock().poisoned = true;
        let mut st = self.inner.commit.lock();
        st.running = false;
        st.finished = st.finished.wrapping_add(1);
        st.failed = true;
        self.inner.done.notify_all();
    }
}

/// A write in flight on a durable store ([`DurableTracker::begin_write`],
/// [`DurableTracker::register_write`]), until this guard drops. `Send`: drop it on the
/// thread that sees the write complete.
#[derive(Debug)]
#[must_use = "the write counts as in flight until the guard drops: keep it until the write completed"]
pub struct WriteInFlight {
    registry: Arc<InFlight>,
    shard: usize,
    id: u64,
}

impl Drop for WriteInFlight {
    fn drop(&mut self) {
        self.registry.remove(self.shard, self.id);
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

    /// [`is_durable`](Self::is_durable) for a stack that polls while another thread
    /// commits (a [`FlushPolicy`](crate::FlushPolicy) on the store, say), or the reason
    /// the bits will never be durable in this activation: `Ok(false)` means "not yet".
    /// The store's state is read without waiting (`try_lock`): while a commit holds the
    /// store, a failure it is about to report shows at a later poll.
    ///
    /// A "not yet" sets the write's bits again, as each round of [`wait`](Self::wait)
    /// does: a [`clear`](BitmapStore::clear) since the intent may have dropped them, or a
    /// checkpoint, an enable or an `add` changed which bitmaps record (the write, not yet
    /// issued, comes after that change and must be recorded after it); and after a new
    /// durable activation ([`BitmapStore::activate_durable`]) they are set in its bitmaps.
    /// Without that, no commit would ever cover them and the poll would say "not yet" for
    /// good. It never waits: a bitmap sealed by a stop running is set at a later poll. A
    /// bit already set costs a load (with several recording bitmaps, an announced fan-out).
    ///
    /// # Errors
    /// [`Error::Poisoned`] once a commit failed or the store was poisoned (the write must
    /// not be issued; the store refuses every write until it is reopened);
    /// [`Error::WrongState`] ([`StateProblem::NotActive`]) while the store is not in a
    /// durable activation (after an inactivation, until the next `activate_durable`);
    /// [`Error::InvalidInput`], as [`wait`](Self::wait)'s, once the disk was shrunk past
    /// the write.
    pub fn poll(&self) -> Result<bool> {
        if self.is_durable() {
            return Ok(true);
        }
        let inner = &self.tracker.inner;
        if inner.commit.lock().failed {
            return Err(Error::Poisoned);
        }
        // Poison first: a failed durable add or checkpoint also closes the view, and the
        // store never activates again.
        if let Some(s) = inner.store.inner.try_lock() {
            if s.poisoned || s.image.is_poisoned() {
                return Err(Error::Poisoned);
            }
        }
        let view = inner.marks.view.load();
        if !view.open {
            return Err(Error::WrongState(StateProblem::NotActive));
        }
        self.past_the_disk(view.disk_size)?;
        let _ = self.tracker.set_unless_sealed(self.offset, self.len);
        Ok(false)
    }

    /// [`Error::InvalidInput`] if the write ends past a disk of `disk` bytes (shrunk since
    /// the intent): no bit can ever cover it.
    fn past_the_disk(&self, disk: u64) -> Result<()> {
        if self.offset.checked_add(self.len).is_none_or(|e| e > disk) {
            return Err(Error::InvalidInput(format!(
                "an intent for {} bytes at {} on a disk now of {disk} bytes",
                self.len, self.offset
            )));
        }
        Ok(())
    }

    /// Waits until the write's bits are on disk, running group commits as needed.
    ///
    /// # Errors
    /// A commit's error: the write must not be issued. [`Error::InvalidInput`] if the
    /// disk was shrunk since the intent (an inactivation, a resize and a new durable
    /// activation) and the write now lies past its end: no bit can ever cover it.
    pub fn wait(self) -> Result<()> {
        loop {
            // Set again each round: a clear since may have dropped them (then this write
            // is after the clear, and must be recorded after it).
            self.tracker.set(self.offset, self.len);
            if self.is_durable() {
                return Ok(());
            }
            self.past_the_disk(self.tracker.set.view.load().disk_size)?;
            self.tracker.commit()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::rc::Rc;

    use super::super::durable_bits::hook;
    use super::*;
    use crate::storage::{CrashStorage, MemStorage};
    use crate::{OpenMode, Recording};

    /// The image a crash now would leave (every unsynced write lost), opened read-only.
    fn durable_image(crash: &CrashStorage) -> BitmapStore<MemStorage> {
        BitmapStore::open(
            MemStorage::from_bytes(crash.durable_image()),
            OpenMode::ReadOnly,
        )
        .unwrap()
    }

    /// A durable store of `bitmaps` (name, recording) over crash storage, and a mark of
    /// the clean granule 7 × 64 KiB through a tracker whose fast path runs `race` on the
    /// store once, at its read point `at` (0: after the first epoch read; `k + 1`: after
    /// reading bitmap `k`). Returns the storage to crash.
    fn mark_racing(
        bitmaps: &[(&str, Recording)],
        at: usize,
        race: impl Fn(&mut BitmapStore<Arc<CrashStorage>>) + 'static,
    ) -> Arc<CrashStorage> {
        mark_again_racing(bitmaps, false, at, race)
    }

    /// [`mark_racing`], the granule marked once first when `durable_first` (so that the
    /// fast path finds it durable in every bitmap recording then).
    fn mark_again_racing(
        bitmaps: &[(&str, Recording)],
        durable_first: bool,
        at: usize,
        race: impl Fn(&mut BitmapStore<Arc<CrashStorage>>) + 'static,
    ) -> Arc<CrashStorage> {
        let crash = Arc::new(CrashStorage::new());
        let mut s = BitmapStore::create(Arc::clone(&crash), 1 << 30, 65536).unwrap();
        for &(name, recording) in bitmaps {
            s.add(name, 65536, recording).unwrap();
        }
        s.activate_durable().unwrap();
        let shared = SharedStore::new(s);
        let t = shared.durable_tracker().unwrap();
        if durable_first {
            t.mark(RACED, 4096).unwrap();
        }
        let ran = Rc::new(RefCell::new(false));
        {
            let (shared, ran) = (shared.clone(), Rc::clone(&ran));
            hook::set_read(move |k| {
                if k == at && !*ran.borrow() {
                    *ran.borrow_mut() = true;
                    race(&mut shared.lock());
                }
            });
        }
        let r = t.mark(RACED, 4096);
        hook::clear_read();
        assert!(*ran.borrow(), "the fast path never reached read point {at}");
        r.unwrap();
        crash
    }

    /// The granule [`mark_racing`] marks.
    const RACED: u64 = 7 << 16;

    /// The fast path must not count a bitmap it read disabled as one that need not hold the
    /// write on the strength of an epoch read once, before the list. A checkpoint that runs
    /// between the two reads (a new bitmap "b" published, then "a" disabled) leaves a clean
    /// granule reading durable: "a" not covering it but disabled, "b" not in the list the
    /// fast path held. The write would be acknowledged with its granule in neither bitmap,
    /// and `changed_since("b")` would call it clean, no crash needed. The checkpoint runs
    /// here right after the fast path's first read of the epoch.
    #[test]
    fn a_checkpoint_racing_the_fast_path_never_acknowledges_a_write_in_no_bitmap() {
        let crash = mark_racing(&[("a", Recording::Enabled)], 0, |s| {
            s.checkpoint("b").unwrap();
        });
        let clean = RACED;
        let image = durable_image(&crash);
        assert!(
            image.changed_since("b").unwrap().is_dirty(clean),
            "acknowledged after the checkpoint began, and changed_since(\"b\") calls it \
             clean (in \"a\": {})",
            image.load("a").unwrap().is_dirty(clean)
        );
    }

    /// A hand-over by the user (enable "b", then disable "a") with "b" before "a" in the
    /// list moves the epoch, so a fast path that read "b" disabled before the enable and
    /// "a" disabled after the disable cannot acknowledge the write, which would be in
    /// neither bitmap. The hand-over runs here between the two reads.
    #[test]
    fn a_hand_over_racing_the_fast_path_never_acknowledges_a_write_in_no_bitmap() {
        let bitmaps = [("b", Recording::Disabled), ("a", Recording::Enabled)];
        let crash = mark_racing(&bitmaps, 1, |s| {
            s.set_enabled("b", true).unwrap();
            s.set_enabled("a", false).unwrap();
        });
        let clean = RACED;
        let image = durable_image(&crash);
        let (a, b) = (image.load("a").unwrap(), image.load("b").unwrap());
        assert!(
            b.is_enabled() && !a.is_enabled(),
            "the hand-over is not on disk"
        );
        assert!(
            b.is_dirty(clean),
            "acknowledged after the hand-over began, and \"b\", recording, lacks it (in \
             \"a\": {})",
            a.is_dirty(clean)
        );
    }

    /// A clear bumps the trackers' epoch after it drops the cleared bitmap's durable bits,
    /// so a fast path that read "a" covered before the clear and "b" after it returns
    /// cannot acknowledge the write after the clear returned, with its granule clean in
    /// "a", on disk and in memory. The clear runs here between the two reads.
    #[test]
    fn a_clear_racing_the_fast_path_never_acknowledges_a_write_it_dropped() {
        let bitmaps = [("a", Recording::Enabled), ("b", Recording::Enabled)];
        let crash = mark_again_racing(&bitmaps, true, 1, |s| s.clear("a").unwrap());
        assert!(
            durable_image(&crash).load("a").unwrap().is_dirty(RACED),
            "acknowledged after the clear of \"a\" returned, and \"a\" lacks it on disk"
        );
    }

    /// An enable bumps the epoch after it sets the flag, so a fast path that read "b"
    /// disabled (skipped) before the enable and "a" covered after it cannot acknowledge the
    /// write after the enable returned with its granule clean in "b", recording. The
    /// enable runs here between the two reads.
    #[test]
    fn an_enable_racing_the_fast_path_never_acknowledges_a_write_missing_from_it() {
        let bitmaps = [("b", Recording::Disabled), ("a", Recording::Enabled)];
        let crash = mark_again_racing(&bitmaps, true, 1, |s| s.set_enabled("b", true).unwrap());
        let b = durable_image(&crash).load("b").unwrap();
        assert!(b.is_enabled(), "the enable is not on disk");
        assert!(
            b.is_dirty(RACED),
            "acknowledged after the enable of \"b\" returned, and \"b\" lacks it on disk"
        );
    }

    /// A durable store of `bitmaps` (name, recording) over crash storage, and a tracker.
    fn durable_store(
        bitmaps: &[(&str, Recording)],
    ) -> (
        Arc<CrashStorage>,
        SharedStore<Arc<CrashStorage>>,
        DurableTracker<Arc<CrashStorage>>,
    ) {
        let crash = Arc::new(CrashStorage::new());
        let mut s = BitmapStore::create(Arc::clone(&crash), 1 << 30, 65536).unwrap();
        for &(name, recording) in bitmaps {
            s.add(name, 65536, recording).unwrap();
        }
        s.activate_durable().unwrap();
        let shared = SharedStore::new(s);
        let t = shared.durable_tracker().unwrap();
        (crash, shared, t)
    }

    /// A granule written and completed before the change under test: it must not be
    /// marked by it (the registry holds only writes in flight).
    const DONE: u64 = 3 << 16;

    /// A durable intent is acknowledged before its write is issued, and a checkpoint
    /// between the two starts the new bitmap empty and disables the old one, which holds
    /// the write. The write lands after the checkpoint; once the old checkpoint is removed
    /// (after its backup, which may have read the granule before the write landed),
    /// `changed_since("b")` must still call it dirty: a write registered in flight is
    /// marked in the new bitmap, on disk, before the checkpoint returns.
    #[test]
    fn a_write_in_flight_across_a_checkpoint_is_in_the_new_bitmap() {
        let (crash, shared, t) = durable_store(&[("a", Recording::Enabled)]);
        drop(t.begin_write(DONE, 4096).unwrap());
        let w = t.begin_write(RACED, 4096).unwrap();
        shared.lock().checkpoint("b").unwrap();
        // The write lands now, after the checkpoint, and completes.
        drop(w);
        assert!(t.set.in_flight.snapshot().is_empty(), "a guard stayed");
        shared.lock().remove("a").unwrap();
        let live = shared.lock().changed_since("b").unwrap();
        assert!(
            live.is_dirty(RACED),
            "a write in flight across the checkpoint is clean in changed_since(\"b\")"
        );
        assert!(
            !live.is_dirty(DONE),
            "a write completed before the checkpoint is in its new bitmap"
        );
        assert!(
            durable_image(&crash).load("b").unwrap().is_dirty(RACED),
            "a write in flight across the checkpoint is not in \"b\" on disk"
        );
    }

    /// Runs `call` while another thread's mark of the 512 bytes at `offset` in bitmap
    /// `name` is held between writing its word and recording its change-map region
    /// (announced throughout). `call` runs on a thread of its own; the mark is released
    /// once `call` returned or a second passed, whichever is first. Returns whether `call`
    /// returned while the mark was held: it must not, since it waits for the marks in
    /// flight. Without that wait `call` returns within the second on any machine this
    /// runs on (it needs no I/O wait); a call slower than that would let the test pass
    /// without the race, so the second is a margin, not a proof.
    fn returned_while_a_mark_was_held(
        shared: &SharedStore<Arc<CrashStorage>>,
        name: &str,
        offset: u64,
        call: impl FnOnce() + Send + 'static,
    ) -> bool {
        use std::time::Duration;
        let bitmap = {
            let s = shared.lock();
            let i = s.find_consistent(name).unwrap();
            Arc::clone(s.slots[i].mem.as_ref().unwrap())
        };
        let (written, paused) = std::sync::mpsc::channel();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let racer = std::thread::spawn(move || {
            bitmap.mark_pausing_before_its_record(offset, 512, || {
                written.send(()).unwrap();
                // Released by the test; the bound only keeps a broken test from hanging.
                let _ = held.recv_timeout(Duration::from_secs(30));
            });
        });
        paused.recv().unwrap();
        let (done, returned) = std::sync::mpsc::channel();
        let caller = std::thread::spawn(move || {
            call();
            done.send(()).unwrap();
        });
        let early = returned.recv_timeout(Duration::from_secs(1)).is_ok();
        release.send(()).unwrap();
        racer.join().unwrap();
        caller.join().unwrap();
        early
    }

    /// Set in memory is not on disk. A racing intent's fan-out (another writer, on the same
    /// granule) has set "b"'s bit when the enable runs and has not yet recorded its
    /// change-map region; the enable's OR of the registered write finds the bit set, and
    /// its commit takes no region of "b". Returning then would leave the write in flight on
    /// disk in "a" alone (removed after a backup, nothing holds it). The enable waits for
    /// the marks in flight before its commit.
    #[test]
    fn an_enable_writes_a_write_in_flight_whose_bit_a_racing_mark_set_unrecorded() {
        let (crash, shared, t) =
            durable_store(&[("a", Recording::Enabled), ("b", Recording::Disabled)]);
        let w = t.begin_write(RACED, 4096).unwrap();
        let s = shared.clone();
        let early = returned_while_a_mark_was_held(&shared, "b", RACED + 512, move || {
            s.lock().set_enabled("b", true).unwrap();
        });
        assert!(
            !early,
            "the enable returned while a mark of \"b\" was in flight"
        );
        assert!(
            durable_image(&crash).load("b").unwrap().is_dirty(RACED),
            "the enable returned with the write in flight not in \"b\" on disk"
        );
        drop(w);
    }

    /// The same for a durable `store` (and `merge`, which ORs the same way): "on disk when
    /// it returns" held only for the bits it changed in memory, not for one a racing mark
    /// had set and not yet recorded.
    #[test]
    fn a_durable_store_writes_a_bit_a_racing_mark_set_unrecorded() {
        let (crash, shared, _t) = durable_store(&[("a", Recording::Enabled)]);
        let s = shared.clone();
        let early = returned_while_a_mark_was_held(&shared, "a", RACED, move || {
            let bits = DirtyBitmap::new(1 << 30, 65536).unwrap();
            bits.mark_dirty(RACED, 4096);
            s.lock().store("a", &bits).unwrap();
        });
        assert!(!early, "the store returned while a mark was in flight");
        assert!(
            durable_image(&crash).load("a").unwrap().is_dirty(RACED),
            "the store returned with its bit not on disk"
        );
    }

    /// A durable clear keeps the bits of a write whose intent was acknowledged before it
    /// and that lands after it, on disk.
    #[test]
    fn a_clear_keeps_a_write_in_flight() {
        let (crash, shared, t) = durable_store(&[("a", Recording::Enabled)]);
        drop(t.begin_write(DONE, 4096).unwrap());
        let w = t.begin_write(RACED, 4096).unwrap();
        shared.lock().clear("a").unwrap();
        drop(w);
        let live = shared.lock().load("a").unwrap();
        assert!(live.is_dirty(RACED), "a clear dropped a write in flight");
        assert!(!live.is_dirty(DONE), "a clear kept a completed write");
        assert!(
            durable_image(&crash).load("a").unwrap().is_dirty(RACED),
            "a clear dropped a write in flight on disk"
        );
    }

    /// A hand-over by the user (enable "b", disable "a") while a write acknowledged against
    /// "a" alone is in flight: "b" takes the write too, so that once "a" is removed a
    /// bitmap still holds it.
    #[test]
    fn a_write_in_flight_across_a_hand_over_is_in_the_bitmap_taking_over() {
        let (crash, shared, t) =
            durable_store(&[("a", Recording::Enabled), ("b", Recording::Disabled)]);
        let w = t.begin_write(RACED, 4096).unwrap();
        shared.lock().set_enabled("b", true).unwrap();
        shared.lock().set_enabled("a", false).unwrap();
        drop(w);
        shared.lock().remove("a").unwrap();
        assert!(
            shared.lock().load("b").unwrap().is_dirty(RACED),
            "a write in flight across the hand-over is not in \"b\""
        );
        assert!(
            durable_image(&crash).load("b").unwrap().is_dirty(RACED),
            "a write in flight across the hand-over is not in \"b\" on disk"
        );
    }

    /// An `add` of a recording bitmap takes the writes in flight too, and a stack that
    /// takes its own intent registers first ([`DurableTracker::register_write`]).
    #[test]
    fn a_recording_bitmap_added_takes_a_write_in_flight() {
        let (crash, shared, t) = durable_store(&[("a", Recording::Enabled)]);
        let w = t.register_write(RACED, 4096).unwrap();
        t.intent(RACED, 4096).unwrap().wait().unwrap();
        shared.lock().add("b", 65536, Recording::Enabled).unwrap();
        drop(w);
        assert!(
            durable_image(&crash).load("b").unwrap().is_dirty(RACED),
            "a write in flight across the add is not in \"b\" on disk"
        );
        assert!(matches!(
            t.register_write(1 << 30, 1),
            Err(Error::InvalidInput(_))
        ));
        // The guard may be dropped by the thread that sees the write complete.
        fn send_sync<T: Send + Sync>() {}
        send_sync::<WriteInFlight>();
    }

    /// A durable activation opens the trackers' list (`closed` false) and publishes its
    /// bitmaps, and an inactivation leaves the list empty, so a tracker reading between the
    /// two steps could see an open store with no bitmap, whose fast path would vouch for
    /// any write: an empty list records nothing. At every step of the activation's
    /// publication, a handle's view (its own copy, a fresh clone's, and that clone's later)
    /// must not call a clean granule durable.
    #[test]
    fn a_tracker_never_sees_an_open_store_without_its_bitmaps() {
        let mut s = BitmapStore::create(MemStorage::new(), 1 << 30, 65536).unwrap();
        s.add("a", 65536, Recording::Enabled).unwrap();
        s.activate_durable().unwrap();
        let shared = SharedStore::new(s);
        let t = shared.durable_tracker().unwrap();
        let _ = shared.lock().inactivate().unwrap();
        let clean = 7 << 16;
        let bad = Rc::new(RefCell::new(Vec::new()));
        let clones = Rc::new(RefCell::new(Vec::new()));
        let steps = Rc::new(RefCell::new(0));
        {
            let (bad, clones, steps) = (Rc::clone(&bad), Rc::clone(&clones), Rc::clone(&steps));
            let t = t.clone();
            hook::set(move || {
                let k = {
                    let mut n = steps.borrow_mut();
                    *n += 1;
                    *n
                };
                if t.is_durable(clean, 4096) {
                    bad.borrow_mut()
                        .push(format!("step {k}: the handle's view"));
                }
                let c = t.clone();
                if c.is_durable(clean, 4096) {
                    bad.borrow_mut()
                        .push(format!("step {k}: a fresh clone's copy"));
                }
                clones.borrow_mut().push((k, c));
            });
        }
        let r = shared.lock().activate_durable();
        hook::clear();
        r.unwrap();
        assert!(
            *steps.borrow() >= 2,
            "the hook ran at {} steps",
            steps.borrow()
        );
        for (k, c) in clones.borrow().iter() {
            if c.is_durable(clean, 4096) {
                bad.borrow_mut()
                    .push(format!("a clone made at step {k}, afterwards"));
            }
        }
        assert!(
            bad.borrow().is_empty(),
            "a clean granule read durable: {:?}",
            bad.borrow()
        );
        t.mark(clean, 4096).unwrap();
        assert!(shared.lock().load("a").unwrap().is_dirty(clean));
    }

    /// A group commit that finds the store inactivated under it (it passed the open check,
    /// then waited for the store's lock while `inactivate` ran) does not mark the commit
    /// state failed, as a real poison does: nothing would reset it, and after the next
    /// durable activation every intent of every clone would fail with [`Error::Poisoned`],
    /// the store healthy. The race is placed deterministically: the store's lock is held
    /// until the leader is running, then the store is inactivated.
    #[test]
    fn a_commit_racing_an_inactivation_does_not_poison_the_next_activation() {
        let mut s = BitmapStore::create(MemStorage::new(), 1 << 30, 65536).unwrap();
        s.add("a", 65536, Recording::Enabled).unwrap();
        s.activate_durable().unwrap();
        let shared = SharedStore::new(s);
        let t = shared.durable_tracker().unwrap();
        let mut guard = shared.lock();
        let leader = {
            let t = t.clone();
            std::thread::spawn(move || t.commit())
        };
        // Past the open check, and waiting for the store's lock (which `guard` holds).
        while !t.inner.commit.lock().running {
            std::thread::yield_now();
        }
        let _ = guard.inactivate().unwrap();
        drop(guard);
        let r = leader.join().unwrap();
        assert!(
            matches!(r, Err(Error::WrongState(StateProblem::NotActive))),
            "{r:?}"
        );
        shared.lock().activate_durable().unwrap();
        let clean = 9 << 16;
        let r = t.mark(clean, 4096);
        assert!(r.is_ok(), "a healthy store's intent failed: {r:?}");
        assert!(shared.lock().load("a").unwrap().is_dirty(clean));
    }

    /// Polls `intent` with a commit between polls, at most `rounds` times; whether it said
    /// durable.
    fn polled_durable<S: Storage>(intent: &Intent<S>, t: &DurableTracker<S>, rounds: u32) -> bool {
        for _ in 0..rounds {
            if intent.poll().unwrap() {
                return true;
            }
            t.commit().unwrap();
        }
        false
    }

    /// A polled intent whose bits a change since the intent dropped, or moved to bitmaps
    /// that do not hold them, is set again by the poll (as each round of `wait` sets it),
    /// and the next commit makes it durable: a clear of its bitmap (its bit dropped), a
    /// checkpoint (the new bitmap records, the old one stops), and an enable of a second
    /// bitmap. Without it the poll said "not yet" for good and the write was never issued.
    #[test]
    fn a_polled_intent_is_set_again_after_a_clear_a_checkpoint_or_an_enable() {
        type Change = fn(&mut BitmapStore<Arc<CrashStorage>>);
        let changes: [(&str, &str, Change); 3] = [
            ("clear", "a", |s| s.clear("a").unwrap()),
            ("checkpoint", "b", |s| {
                s.checkpoint("b").unwrap();
            }),
            ("enable", "c", |s| s.set_enabled("c", true).unwrap()),
        ];
        for (what, holds, change) in changes {
            let (crash, shared, t) =
                durable_store(&[("a", Recording::Enabled), ("c", Recording::Disabled)]);
            let intent = t.intent(RACED, 4096).unwrap();
            change(&mut shared.lock());
            assert!(
                polled_durable(&intent, &t, 3),
                "{what}: an intent pending across it never became durable"
            );
            assert!(
                durable_image(&crash).load(holds).unwrap().is_dirty(RACED),
                "{what}: the write is not in {holds:?} on disk"
            );
        }
    }

    /// A poll never waits: with the intent's bitmap sealed (a stop running), a poll that
    /// must set the bits again says "not yet" at once, and once the seal is lifted a poll
    /// sets them and a commit makes them durable.
    #[test]
    fn a_poll_does_not_wait_on_a_sealed_bitmap() {
        // One recording bitmap, and two (a fan-out).
        for two in [false, true] {
            let list: &[(&str, Recording)] = if two {
                &[("a", Recording::Enabled), ("c", Recording::Enabled)]
            } else {
                &[("a", Recording::Enabled)]
            };
            let (_crash, shared, t) = durable_store(list);
            let intent = t.intent(RACED, 4096).unwrap();
            shared.lock().clear("a").unwrap();
            let a = Arc::clone(&t.set.view.load().marks[0].0);
            a.seal();
            let (tx, rx) = std::sync::mpsc::channel();
            let poller = std::thread::spawn(move || {
                let r = intent.poll();
                tx.send(r.is_ok_and(|d| !d)).unwrap();
                intent
            });
            let answered = rx.recv_timeout(std::time::Duration::from_secs(10));
            a.unseal();
            assert_eq!(
                answered,
                Ok(true),
                "two bitmaps {two}: a poll waited on the seal"
            );
            let intent = poller.join().unwrap();
            assert!(
                !a.is_dirty(RACED),
                "two bitmaps {two}: a sealed bitmap was marked"
            );
            assert!(
                polled_durable(&intent, &t, 3),
                "two bitmaps {two}: never durable after the unseal"
            );
        }
    }

    /// An intent taken in one durable activation and polled after the store was
    /// inactivated says `NotActive`; after the next `activate_durable` the poll sets its
    /// bits in the new activation's bitmaps, and a commit makes it durable.
    #[test]
    fn a_polled_intent_is_set_in_the_next_activation() {
        let (crash, shared, t) = durable_store(&[("a", Recording::Enabled)]);
        let intent = t.intent(RACED, 4096).unwrap();
        let _ = shared.lock().inactivate().unwrap();
        let r = intent.poll();
        assert!(
            matches!(r, Err(Error::WrongState(StateProblem::NotActive))),
            "{r:?}"
        );
        shared.lock().clear("a").unwrap();
        shared.lock().activate_durable().unwrap();
        assert!(
            polled_durable(&intent, &t, 3),
            "never durable after the activation"
        );
        assert!(durable_image(&crash).load("a").unwrap().is_dirty(RACED));
    }
}
