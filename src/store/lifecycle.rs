//! The lifecycle of [`BitmapStore`]: [`activate`](BitmapStore::activate) (in-memory bitmaps
//! authoritative, `in_use` set on disk), [`inactivate`](BitmapStore::inactivate) (the
//! remainder flushed, then `in_use` cleared in place), the seal that keeps marks from
//! returning between the last serialize and the durable "clean", and
//! [`close`](BitmapStore::close).

use std::sync::Arc;
use std::time::Instant;

use super::{BitmapStore, Claim, Preloaded, SinceInactivate, WriterLocks, ACTIVE_MEMORY_LIMIT};
use crate::bitmap::{ChangedRegions, DirtyBitmap};
use crate::error::{internal, Error, Result, StateProblem};
use crate::flush::{self, FlushStats};
use crate::format::{encode_directory, BitmapName, DirEntry};
use crate::image::Image;
use crate::storage::Storage;

impl<S: Storage> BitmapStore<S> {
    /// Marks every consistent bitmap `in_use` on disk and makes its in-memory copy
    /// authoritative, so that a crash from now on leaves it inconsistent rather than falsely
    /// clean. Only the directory's flags words change, in place, with one barrier: each
    /// lies inside one sector, so a torn write leaves every entry old (clean as the last
    /// stop left it: marks made while inactive were never durable) or new (`in_use`); see
    /// `docs/CRASH-CONSISTENCY.md`. (QEMU clears
    /// autoclear bit 0 around the directory write, with three barriers; that sequence is
    /// the fallback should the directory ever differ in more than the flags.) Inconsistent
    /// bitmaps are left alone. Does nothing if already active.
    ///
    /// Before that, if the image records the durable mode (a mode extension,
    /// [`mode`](Self::mode)), its flags word is cleared in place and a barrier follows, so
    /// that it never says durable while this writer sets `in_use` (`src/store/mode.rs`).
    ///
    /// The in-memory copy is the one kept by the last incremental
    /// [`inactivate`](Self::inactivate) when there is one (a resumed hand-over): it is *not*
    /// reloaded from disk, so every bit it holds survives, including marks made through a
    /// [`Tracker`](crate::Tracker) or an `Arc` while the store was inactive. Those marks sit
    /// in its change map and reach the disk at the next flush or inactivation. A bitmap
    /// added while the store was inactive after such an inactivation, while a tracker
    /// lived, is parked too, and resumed the same way. Other consistent bitmaps (first
    /// activation, added with no tracker alive, before any activation or after a reopen)
    /// are loaded from disk.
    ///
    /// A store that handed the image over (an inactivation released its writer locks)
    /// checks first, whether or not it kept bitmaps in memory, that cluster 0, the
    /// directory and the refcounts it caches are still what it last wrote: if another
    /// program (a migration target that took the disk over) wrote them meanwhile, the
    /// cached refcounts and tables are stale and the image must be reopened. A directory
    /// that differs only in `in_use` bits another writer set is taken back only after
    /// [`accept_destination_in_use`](Self::accept_destination_in_use).
    ///
    /// # Errors
    /// [`Error::ReadOnly`], [`Error::Poisoned`]; [`Error::WrongState`]
    /// ([`StateProblem::ChangedWhileInactive`]) if the image changed while inactive; load
    /// errors as [`load`](Self::load); I/O.
    pub fn activate(&mut self) -> Result<()> {
        self.activate_preloaded(Preloaded::default())
    }

    /// [`activate`](Self::activate), starting from bitmaps [`preload`](Self::preload)ed
    /// from this image earlier (by another handle, while another process still wrote it):
    /// a bitmap loaded from disk is refreshed from its preloaded copy instead of read into
    /// fresh memory. Every cluster of such a bitmap is still read and every word set from
    /// it, so the result is the same as `activate`'s, whatever the preloaded copy held;
    /// what is saved is the allocation of the bitmaps and building them up, which is most
    /// of a load when many clusters hold bits. The exception: a bitmap the preload kept
    /// current through the writer's last write log (`Preloaded::apply`, whose dirty count
    /// matched the writer's) is taken as it is, reading nothing; its equality with the disk
    /// rests on the log naming every region the writer wrote (`write_log.rs`). A preloaded bitmap that matches no bitmap of the directory by
    /// name, granularity and size is dropped.
    ///
    /// # Errors
    /// As [`activate`](Self::activate).
    pub fn activate_preloaded(&mut self, mut pre: Preloaded) -> Result<()> {
        // Taken first, whatever this call does: a permission left set by a call that
        // returned early would let a later, unrelated activation take `in_use` bits back.
        let accept = std::mem::take(&mut self.accept_in_use);
        self.ensure_writable()?;
        if self.active {
            return Ok(());
        }
        // A resumed hand-over takes the writer's locks back first: while another process
        // (the destination) holds the image writable, this fails and nothing is read or
        // written.
        let before = self.take_writer_locks()?;
        // Still inactive after a failure: hold what the store held before.
        self.activation_body(
            before,
            |s| {
                s.ensure_resumable(before, accept)
                    .and_then(|_| s.activate_locked(&mut pre))
            },
            |_| {},
        )
    }

    /// Runs an activation's `body` after [`take_writer_locks`](Self::take_writer_locks)
    /// returned `before`. If it fails, `undo` runs and the locks go back to `before`. If it
    /// unwinds (a [`Storage`] read that panicked: reads are not guarded as writes are, so
    /// nothing poisoned the image), the same happens and the store is poisoned, before the
    /// panic goes on. Otherwise a caller that survived the panic would hold a store whose
    /// locks say held (every later edit then skipping the check that the image is still as
    /// this handle left it, and every read taking its parked copies for the image's
    /// bitmaps) and whose slots may hold bitmaps of an activation that never happened.
    pub(super) fn activation_body(
        &mut self,
        before: WriterLocks,
        body: impl FnOnce(&mut Self) -> Result<()>,
        undo: impl FnOnce(&mut Self),
    ) -> Result<()> {
        let mut unwound = None;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(self)))
            .unwrap_or_else(|panic| {
                unwound = Some(panic);
                Err(Error::Poisoned)
            });
        if unwound.is_some() {
            // First: the undo below calls into the storage again, which may panic too.
            self.poisoned = true;
        }
        if r.is_err() {
            undo(self);
            self.restore_writer_locks(before);
        }
        if let Some(panic) = unwound {
            std::panic::resume_unwind(panic);
        }
        r
    }

    /// Takes QEMU's writer locks on the image (again): [`Error::Locked`] while another
    /// process holds the image writable, and then nothing changed. Returns what the store
    /// held before, for [`restore_writer_locks`](Self::restore_writer_locks).
    ///
    /// Only a store that released them takes them: one that holds them (since its open,
    /// or an edit's [`reclaim_writer`](Self::reclaim_writer)) keeps them as they are. Taking
    /// held bytes again would test for conflicts, and a conflict then (an opener between
    /// taking its bytes and testing them, which fails its own test on ours) must not cost
    /// the store the bytes it holds while it goes on writing.
    pub(super) fn take_writer_locks(&mut self) -> Result<WriterLocks> {
        let before = self.writer;
        if before == WriterLocks::Released {
            self.lock_released_image(|_| Ok(()))?;
        }
        self.writer = WriterLocks::Held;
        Ok(before)
    }

    /// Before an activation reads or writes anything, with the writer locks taken: a store
    /// that handed the image over (an inactivation released its locks; `before` is what
    /// it held when the activation began) must find the image still as it last wrote it
    /// ([`ensure_unchanged_since_inactivate`](Self::ensure_unchanged_since_inactivate)),
    /// whether or not it parked any bitmap: its cached header, directory and refcounts are
    /// what its next commit starts from, and another writer's changes would be lost to it
    /// (a bitmap dropped from the directory, clusters in use handed out again).
    ///
    /// True when the image differs only in `in_use` bits a destination set in place
    /// ([`SinceInactivate::InUseSet`]) and `accept` (the caller called
    /// [`accept_destination_in_use`](Self::accept_destination_in_use) before this
    /// activation): the disk then says `in_use` where this handle's directory says clear,
    /// until an activation writes its own flags. Without that, such an image is refused as
    /// changed: the writer that set `in_use` may have run a guest whose writes are in no
    /// bitmap this handle holds. Once accepted, the handle's copy of cluster 0 is read
    /// again from the disk (another writer may have laid it out its own way).
    ///
    /// # Errors
    /// [`StateProblem::ChangedWhileInactive`]; I/O from the check's reads.
    pub(super) fn ensure_resumable(&mut self, before: WriterLocks, accept: bool) -> Result<bool> {
        if before == WriterLocks::Held && self.slots.iter().all(|s| s.parked.is_none()) {
            // Held since the open: nobody else could write the image.
            return Ok(false);
        }
        let in_use_set = match self.image_since_inactivate()? {
            SinceInactivate::Unchanged => false,
            SinceInactivate::InUseSet if accept => true,
            SinceInactivate::InUseSet | SinceInactivate::Changed => {
                return Err(Error::WrongState(StateProblem::ChangedWhileInactive));
            }
        };
        self.image.refresh_known_cluster0()?;
        Ok(in_use_set)
    }

    /// Lets the next activation ([`activate`](Self::activate),
    /// [`activate_durable`](Self::activate_durable) and their preloaded forms) of a store
    /// that handed the image over take it back when its directory differs from what this
    /// handle left only in `in_use` bits set in place: a migration destination that
    /// activated the image and died, or failed, before it started the guest. Call it only
    /// then (the fail-back of a hand-over whose destination never said it started, as
    /// [`SharedDiskState`](crate::migration::SharedDiskState) does): any other writer that
    /// set `in_use` may have written guest data, which no bitmap this handle holds has, and
    /// taking the image back would then be a false clean. Without it such an image is
    /// refused ([`StateProblem::ChangedWhileInactive`]). The next activation call takes it
    /// first, whatever it then does (succeeds, fails, or finds the store active); a stop
    /// of the active store drops it (it is for the hand-over before it, not the next).
    pub fn accept_destination_in_use(&mut self) {
        self.accept_in_use = true;
    }

    /// Back to `before` after a failed activation: released again if the store had
    /// released them (an inactive node's locks, so the destination can still open the
    /// image); otherwise kept.
    pub(super) fn restore_writer_locks(&mut self, before: WriterLocks) {
        // The state first: a storage that panics in the call below leaves the store
        // believing what it must (a handed-over store checks the image again).
        self.writer = before;
        if before == WriterLocks::Released {
            let _ = self.image.storage().set_writer_locks(false);
        }
    }

    /// Runs `edit` (an edit of an inactive store: `add`, `remove`, `store`, `clear`,
    /// `set_enabled`, `merge`, `resize`, `export_since`, and what is built on them) after
    /// [`reclaim_writer`](Self::reclaim_writer), before it reads or writes anything. If
    /// this call took the locks back and `edit` fails (refused, or failed part-way), they
    /// are released again: the store is still an inactive node, and the image stays open
    /// to the destination. Its next write takes them back and checks the image again,
    /// which also refuses a commit that may have landed unseen (its caches then differ
    /// from the disk).
    pub(super) fn reclaimed<T>(&mut self, edit: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let handed = self.writer == WriterLocks::Released;
        self.reclaim_writer()?;
        let r = edit(self);
        if handed && r.is_err() && self.writer == WriterLocks::Reclaimed {
            let _ = self.image.storage().set_writer_locks(false);
            self.writer = WriterLocks::Released;
        }
        r
    }

    /// Before an edit of an inactive store ([`reclaimed`](Self::reclaimed)): if an
    /// inactivation released the writer locks, they are taken back, and the image must
    /// still be what this handle last wrote ([`StateProblem::ChangedWhileInactive`]
    /// otherwise: the cached refcounts, tables and directory would be stale, and a commit
    /// from them could free or overwrite clusters another writer uses, or write its bitmaps
    /// clean). Nothing is written before either check. The locks stay taken until the next
    /// [`inactivate`](Self::inactivate) (a no-op otherwise on an inactive store) releases
    /// them again, the edit fails, or the store is dropped.
    ///
    /// # Errors
    /// [`Error::Locked`] while another process holds the image writable;
    /// [`StateProblem::ChangedWhileInactive`]; I/O from the check's reads.
    pub(super) fn reclaim_writer(&mut self) -> Result<()> {
        if self.writer != WriterLocks::Released {
            return Ok(());
        }
        // The parked copies, which the edits read and apply to, get the disk ORed in, as
        // a resume does (`load_mems`). What a merge ORed in before a failure only adds bits.
        self.lock_released_image(|s| {
            s.ensure_unchanged_since_inactivate()?;
            s.slots.iter().try_for_each(|slot| match &slot.parked {
                Some(p) => s.merge_disk_into(&slot.entry, p),
                None => Ok(()),
            })
        })?;
        self.writer = WriterLocks::Reclaimed;
        Ok(())
    }

    /// Takes the writer locks of a store that released them, forgets the cached pages
    /// (another writer had the image meanwhile: what it wrote is read from the device, not
    /// from pages its failed barrier may have left in the cache, `Storage::forget_cached`),
    /// then runs `check`, which reads and must not write. If either of the last two fails
    /// or unwinds (reads are not guarded as writes are), the locks are released again
    /// before the error returns or the panic goes on: the store still says released
    /// (`self.writer` is the caller's to set, after this succeeds), and whoever it handed
    /// the image to must be able to take it.
    fn lock_released_image(&mut self, check: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        self.image.storage().set_writer_locks(true)?;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.image.storage().forget_cached()?;
            check(self)
        }));
        if !matches!(r, Ok(Ok(()))) {
            let _ = self.image.storage().set_writer_locks(false);
        }
        match r {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// [`activate`](Self::activate), with `content` standing for the named bitmaps in
    /// place of what the disk holds of them (a migration destination whose bitmaps came
    /// over the stream). Each named bitmap is held in memory as given (shared with the
    /// caller; copied only if its change-map region size is not this store's), with every
    /// region counted as changed: the next [`flush`](Self::flush) or
    /// [`inactivate`](Self::inactivate) writes it whole, and the disk then holds it. Its
    /// recording follows the directory's `auto` flag. Nothing of these bitmaps is read
    /// from the disk, and nothing but the `in_use` flags is written here, so the call
    /// costs what an activate of empty bitmaps costs, whatever they hold.
    ///
    /// Crash reasoning: the activate's commit sets `in_use` before this returns; until a
    /// flush has written the content, the disk holds the old bitmap marked `in_use`, which
    /// QEMU and this crate read as inconsistent, never as clean.
    ///
    /// # Errors
    /// Checked before anything is written: [`Error::NotFound`] for a name the directory
    /// lacks; [`Error::Inconsistent`] for a bitmap `in_use` on disk;
    /// [`Error::InvalidInput`] for a bitmap whose disk size or granularity is not the
    /// directory's, a name given twice, or one bitmap object given for two names or held
    /// as another bitmap's parked copy (each bitmap needs its own change map; a bitmap
    /// must not be held by two stores either, which this cannot see);
    /// [`Error::WrongState`] if active. Then as [`activate`](Self::activate).
    pub fn activate_with(&mut self, content: Vec<(String, Arc<DirtyBitmap>)>) -> Result<()> {
        self.activate_with_preloaded(content, Preloaded::default())
    }

    /// [`activate_with`](Self::activate_with), starting from what `pre` holds: a reference
    /// walk made earlier beside a writer ([`preload_walk_within`](Self::preload_walk_within)
    /// or [`preload`](Self::preload)), which spares the walk inside the downtime under the
    /// same conditions as in [`activate_preloaded`](Self::activate_preloaded) (the header's
    /// shape unchanged, every bitmap cluster written in place still owned by its bitmap;
    /// otherwise the activation walks, and that walk judges), and preloaded bitmaps, which
    /// stand for the bitmaps not named in `content` as in `activate_preloaded`. A bitmap
    /// `pre` holds under a name of `content` is dropped: the content replaces the disk's.
    ///
    /// # Errors
    /// As [`activate_with`](Self::activate_with).
    pub fn activate_with_preloaded(
        &mut self,
        content: Vec<(String, Arc<DirtyBitmap>)>,
        mut pre: Preloaded,
    ) -> Result<()> {
        // Taken first, as every activation call takes it; handed on to the activation
        // below only if this call gets there.
        let accept = std::mem::take(&mut self.accept_in_use);
        self.ensure_writable()?;
        if self.active {
            return Err(Error::WrongState(StateProblem::Active));
        }
        let mut adopted: Vec<(BitmapName, Arc<DirtyBitmap>)> = Vec::with_capacity(content.len());
        for (name, bm) in content {
            let i = self.find_consistent(name.as_bytes())?;
            let e = &self.slots[i].entry;
            if bm.disk_size() != self.disk_size() || bm.granularity() != 1u64 << e.granularity_bits
            {
                return Err(Error::InvalidInput(format!(
                    "bitmap {name:?} covers {} bytes at granularity {}; the image's covers {} \
                     at {}",
                    bm.disk_size(),
                    bm.granularity(),
                    self.disk_size(),
                    1u64 << e.granularity_bits
                )));
            }
            if adopted.iter().any(|(n, _)| *n == e.name) {
                return Err(Error::InvalidInput(format!("bitmap {name:?} given twice")));
            }
            // One object held for two bitmaps would share one change map: the stop's flush
            // drains it for the first, writes nothing of the second, and clears `in_use` on
            // both, leaving the second consistent on disk without its bits.
            let aliased =
                adopted.iter().any(|(_, b)| Arc::ptr_eq(b, &bm))
                    || self.slots.iter().enumerate().any(|(j, s)| {
                        j != i && s.parked.as_ref().is_some_and(|p| Arc::ptr_eq(p, &bm))
                    });
            if aliased {
                return Err(Error::InvalidInput(format!(
                    "bitmap {name:?} is the same object as another bitmap this store holds or \
                     is given; each needs its own"
                )));
            }
            adopted.push((e.name.clone(), bm));
        }
        self.accept_in_use = accept;
        pre.adopted = adopted;
        self.activate_preloaded(pre)
    }

    /// `bm` as this store holds an adopted bitmap of `entry`: its own geometry (a copy
    /// if the region size differs), recording as `entry` says, every region changed.
    pub(super) fn adopt(&self, entry: &DirEntry, bm: Arc<DirtyBitmap>) -> Result<Arc<DirtyBitmap>> {
        let held = if bm.region_size() == self.region_size() {
            bm
        } else {
            let copy = self.new_bitmap(1u64 << entry.granularity_bits)?;
            copy.merge_from(&bm)?;
            Arc::new(copy)
        };
        held.set_enabled(entry.auto);
        held.requeue_changed(&ChangedRegions::all(held.region_count()));
        Ok(held)
    }

    fn activate_locked(&mut self, pre: &mut Preloaded) -> Result<()> {
        let mems = self.load_mems(pre)?;
        // The mode's flags are cleared (the word in place and a barrier, only if a flag is
        // set) before any `in_use` is set, so the image never says durable while this
        // deferred writer is active (`mode.rs`).
        self.record_deferred_mode()?;
        if mems.iter().any(Option::is_some) {
            let mut entries = self.current_entries();
            for (e, m) in entries.iter_mut().zip(&mems) {
                if m.is_some() {
                    e.in_use = true;
                }
            }
            self.write_flags_in_place(entries)?;
        }
        for (s, m) in self.slots.iter_mut().zip(mems) {
            s.mem = m;
            s.parked = None;
        }
        self.active = true;
        self.activations += 1;
        self.parked_durable = false;
        self.parking = false;
        self.publish();
        Ok(())
    }

    /// The bitmaps an activation holds, and their slots' `mem` set to them (not yet
    /// published, nothing written): durable mode's first step.
    pub(super) fn load_for_activation(&mut self, pre: &mut Preloaded) -> Result<()> {
        let mems = self.load_mems(pre)?;
        for (s, m) in self.slots.iter_mut().zip(mems) {
            s.mem = m;
            s.parked = None;
        }
        Ok(())
    }

    /// The checks of an activation, then each slot's bitmap as it will hold it (`None` for
    /// an inconsistent one). Writes nothing. The caller took the writer locks and ran
    /// [`ensure_resumable`](Self::ensure_resumable): the cached directory and tables are the
    /// image's.
    fn load_mems(&mut self, pre: &mut Preloaded) -> Result<Vec<Option<Arc<DirtyBitmap>>>> {
        self.taken_as_is = 0;
        // Every consistent bitmap is about to be held in memory. QEMU caps each at 512 MiB
        // but not their sum; a crafted image with 65535 entries could ask for 32 TiB. The
        // sum is checked before anything is allocated.
        let needed = self.memory_needed(self.slots.iter().filter(|s| !s.inconsistent));
        if needed > ACTIVE_MEMORY_LIMIT {
            return Err(Error::Unsupported(format!(
                "activating would hold {needed} bytes of bitmaps in memory, more than the \
                 limit of {ACTIVE_MEMORY_LIMIT}"
            )));
        }
        // From here on bitmaps are written in place: each of their clusters must be theirs
        // alone (see `preflight`), or nothing is written. A preload's walk spares the one
        // inside the downtime when the image's tables are where it read them.
        self.preflight_from(pre.walk.take())?;
        let mut mems = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            mems.push(if s.inconsistent {
                None
            } else if let Some(bm) = pre.take_adopted(&s.entry.name) {
                Some(self.adopt(&s.entry, bm)?)
            } else if let Some(p) = &s.parked {
                // The disk may hold marks the parked copy lacks: a writer of this crate
                // that took the image over flushes in place, leaving cluster 0, the
                // directory and the refcounts as they were. What is on disk is ORed in.
                self.merge_disk_into(&s.entry, p)?;
                Some(Arc::clone(p))
            } else {
                let shape = (
                    self.disk_size(),
                    1u64 << s.entry.granularity_bits,
                    self.region_size(),
                );
                Some(match pre.take(&s.entry.name, shape) {
                    // Equal to the disk (it followed the writer's log to its end): taken as
                    // it is, with its durable bits if it has them.
                    Some(p) if p.current && p.table_offset == s.entry.table_offset => {
                        self.taken_as_is += 1;
                        let _ = p.bitmap.take_primary();
                        p.bitmap.set_enabled_unshared(s.entry.auto);
                        let bm = Arc::new(p.bitmap);
                        if let Some(bits) = p.bits {
                            pre.ready_bits.push((Arc::clone(&bm), bits));
                        }
                        bm
                    }
                    Some(p) => Arc::new(self.refresh_disk(&s.entry, p.bitmap)?),
                    None => Arc::new(self.load_disk(&s.entry)?),
                })
            });
        }
        Ok(mems)
    }

    /// Resuming parked bitmaps is only safe if nobody else wrote the image's metadata
    /// while it was inactive (another QEMU taking the disk over stores its bitmaps into new
    /// clusters and frees ours, and changes the refcounts this handle caches). Cluster 0
    /// must still be byte for byte what this handle last wrote, and so must the directory,
    /// except for the `in_use` flag bits: a destination that activated the image (set
    /// `in_use` on its bitmaps, in place) and then died before it started the guest wrote
    /// nothing else, and this handle's parked bitmaps hold every bit the disk does and
    /// every mark since. The activation then writes its own flags over them. Any other
    /// difference is refused, and the bitmaps stay as the disk says (`in_use`, so
    /// inconsistent, if the destination set it; never falsely clean). An edit, which is no
    /// fail-back, refuses `in_use` bits set by another writer too: that writer may have
    /// written guest data that no bitmap this handle holds has.
    pub(super) fn ensure_unchanged_since_inactivate(&mut self) -> Result<()> {
        match self.image_since_inactivate()? {
            SinceInactivate::Unchanged => self.image.refresh_known_cluster0(),
            SinceInactivate::InUseSet | SinceInactivate::Changed => {
                Err(Error::WrongState(StateProblem::ChangedWhileInactive))
            }
        }
    }

    /// Writes only what changed since the last flush, then clears `in_use` in place: the
    /// incremental stop. Call it with the guest stopped. Afterwards every bitmap is on disk,
    /// clean, exactly as QEMU would read it, and the store is inactive.
    ///
    /// Write order (crash reasoning in `docs/CRASH-CONSISTENCY.md`):
    /// 1. the remaining changed regions, as in [`flush`](Self::flush), then a barrier if
    ///    anything was written (still `in_use`: a crash leaves the bitmaps inconsistent);
    /// 2. the directory in place with `in_use` clear and `auto` from each bitmap's enabled
    ///    state, barrier: the commit point. Only the 4-byte flags words change, each inside
    ///    one sector, so a torn write leaves every entry old (`in_use`) or new (clean, its
    ///    data durable since 1). If the directory ever changed otherwise, QEMU's dance
    ///    (autoclear bit 0 cleared, directory, bit 0 set) is used instead.
    ///
    /// Two barriers (one if nothing remained), plus the refcount flush if the remainder
    /// allocates.
    ///
    /// The in-memory bitmaps are kept (parked): [`activate`](Self::activate) resumes them.
    /// Does nothing if not active.
    ///
    /// Call it with the guest stopped; if it is not, the bitmaps are sealed while this runs
    /// (see [`DirtyBitmap::seal`]): a mark that would write waits until the outcome is on
    /// disk and then lands in the parked bitmap, so no mark returns in between.
    ///
    /// # Errors
    /// - [`Error::Arriving`] while a bitmap's bits are still arriving (a migration
    ///   destination's bitmap during the source's postcopy push), before anything is
    ///   written; nothing is poisoned: stop once the migration ended.
    /// - [`Error::MarksDuringInactivate`] if a bitmap changed while this ran other than
    ///   through a mark (for example a `clear` on its `Arc`; a `merge_from` waits on the
    ///   seal as a mark does): `in_use` is set again
    ///   and the store stays active.
    /// - [`Error::Poisoned`] or I/O: the store is then poisoned and the memory keeps every
    ///   bit. If the write saying "clean" may have reached the disk, the store says "doubt"
    ///   again before any mark returns (`in_use` in place, or else autoclear bit 0
    ///   cleared); if that fails too, the marks stay held ([`marks_held`](Self::marks_held)).
    ///   The disk holds `in_use` set or autoclear bit 0 clear (every bitmap loads as
    ///   inconsistent), or, while the marks are held, the completed state with every bit
    ///   marked before the call. Never falsely clean.
    pub fn inactivate(&mut self) -> Result<FlushStats> {
        if self.durable.is_some() {
            return self.stop_with(|s| {
                let stats = s.inactivate_durable()?;
                s.park();
                s.parked_durable = true;
                Ok(stats)
            });
        }
        self.stop_with(Self::inactivate_incremental)
    }

    /// What both inactivations share: nothing to do unless active; a bitmap still arriving
    /// refuses the stop ([`Error::Arriving`]) before anything, poisoning nothing; `stop`
    /// runs with the bitmaps sealed ([`sealed`](Self::sealed)); any failure of it but
    /// [`Error::MarksDuringInactivate`] poisons the store; the barriers and the time are
    /// measured around it.
    fn stop_with(
        &mut self,
        stop: impl FnOnce(&mut Self) -> Result<FlushStats>,
    ) -> Result<FlushStats> {
        if !self.active {
            if self.writer == WriterLocks::Reclaimed {
                // An edit took the locks back after the last inactivation; the store is
                // an inactive node again.
                let _ = self.image.storage().set_writer_locks(false);
                self.writer = WriterLocks::Released;
            }
            return Ok(FlushStats::default());
        }
        // A permission to take back a destination's `in_use` is for the hand-over that
        // came before it: this one's destination may run the guest, whatever happens next.
        self.accept_in_use = false;
        self.ensure_writable()?;
        // Refused before anything is written: a bitmap still arriving would be written
        // consistent without its late bits, which would then land in memory alone.
        (0..self.slots.len()).try_for_each(|i| self.ensure_arrived(i))?;
        let start = Instant::now();
        let syncs0 = self.image.sync_count();
        let sync_time0 = self.image.sync_time();
        self.claim = Claim::Nothing;
        // A stop that unwinds (a `Storage` that panicked) ends as a failed one before the
        // panic goes on: "doubt" said again, the store poisoned, the seal lifted unless the
        // marks must stay held. Otherwise the seal would outlive it, every later stop
        // refused on the poisoned image before it reaches `sealed`, and the marking threads
        // would wait for good.
        let mut unwound = None;
        let r = self.sealed(|s| {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stop(s)))
                .unwrap_or_else(|panic| {
                    unwound = Some(panic);
                    Err(Error::Poisoned)
                });
            if matches!(r, Err(ref e) if !matches!(e, Error::MarksDuringInactivate)) {
                // Still sealed: no mark has returned since the last serialize, so whatever
                // the disk says is true until the seal is lifted.
                s.withdraw_claim();
            }
            r
        });
        if matches!(r, Err(ref e) if !matches!(e, Error::MarksDuringInactivate)) {
            self.poisoned = true;
            self.forget_tables();
        }
        if let Some(panic) = unwound {
            std::panic::resume_unwind(panic);
        }
        let mut stats = r?;
        if !self.active {
            // Inactive: hold only what QEMU's inactive node holds, so that the destination
            // can open the image writable. Failing to release only makes it fail to open.
            let _ = self.image.storage().set_writer_locks(false);
            self.writer = WriterLocks::Released;
        }
        stats.syncs = self.image.sync_count().saturating_sub(syncs0);
        stats.sync_time = self.image.sync_time().saturating_sub(sync_time0);
        stats.duration = start.elapsed();
        Ok(stats)
    }

    fn inactivate_incremental(&mut self) -> Result<FlushStats> {
        let mut targets = self.flush_targets()?;
        // With its barrier: the data is durable before any entry says clean.
        let r = flush::flush(&mut self.image, &mut targets, true, self.rewrite_threshold);
        let stats = self.logged(&flush::Target::ids(&targets), r)?;
        self.keep_tables(targets);
        if self.slots.iter().any(|s| s.mem.is_some()) {
            let mut entries = self.current_entries();
            for (e, s) in entries
                .iter_mut()
                .zip(self.slots.iter().filter(|s| !s.stale))
            {
                if let Some(m) = &s.mem {
                    e.in_use = false;
                    e.auto = m.is_enabled();
                }
            }
            self.claim = Claim::InPlace;
            self.write_flags_in_place(entries)?;
            self.refuse_late_marks()?;
        }
        self.park();
        Ok(stats)
    }

    /// After a stop failed (its bitmaps still sealed): if it may have written "clean", says
    /// "doubt" on disk again before any mark can return. An in-place stop whose directory
    /// stays where it is writes that directory back with `in_use` set for every in-memory
    /// bitmap (the others as they were); failing that, or after a commit of a new
    /// directory (the header may point to either), autoclear bit 0 is cleared, which makes
    /// every bitmap of the image inconsistent. Both writes go through the poison
    /// ([`Image::withdraw_at`]). If neither reaches the disk, the marks stay held
    /// ([`marks_held`](Self::marks_held)): the disk may say clean, so no mark may return.
    fn withdraw_claim(&mut self) {
        let claim = std::mem::replace(&mut self.claim, Claim::Nothing);
        if claim == Claim::Nothing {
            return;
        }
        // A write here that unwinds (a `Storage` that panicked, maybe again) counts as one
        // that failed: the marks stay held, and `marks_held` says so, rather than the
        // panic leaving the bitmaps sealed with nothing reporting it.
        use std::panic::{catch_unwind, AssertUnwindSafe};
        let done = |r: std::thread::Result<Result<()>>| matches!(r, Ok(Ok(())));
        if claim == Claim::InPlace
            && done(catch_unwind(AssertUnwindSafe(|| {
                self.restore_in_use_in_place()
            })))
        {
            return;
        }
        if !done(catch_unwind(AssertUnwindSafe(|| {
            self.image.untrust_bitmaps()
        }))) {
            self.marks_held = true;
        }
    }

    /// The directory in place, with `in_use` set for every in-memory bitmap, then a
    /// barrier. Its entries differ from what the failed stop wrote only in flags, so it
    /// has the same size and place.
    fn restore_in_use_in_place(&mut self) -> Result<()> {
        let (dir_off, dir_size) = self
            .dir
            .ok_or_else(|| internal!("in-memory bitmaps without a directory"))?;
        let mut entries = self.current_entries();
        for (e, s) in entries
            .iter_mut()
            .zip(self.slots.iter().filter(|s| !s.stale))
        {
            if s.mem.is_some() {
                e.in_use = true;
            }
        }
        let bytes = encode_directory(&entries, &self.geometry()?)?;
        if bytes.len() as u64 != dir_size {
            return Err(internal!("the directory changed size"));
        }
        self.image.withdraw_at(&bytes, dir_off)?;
        for (s, e) in self.slots.iter_mut().filter(|s| !s.stale).zip(entries) {
            s.set_entry(e);
        }
        Ok(())
    }

    /// How many bitmaps the last activation took from its preload as they were (current:
    /// it followed the writer's log to its end, and the table did not move), reading none of
    /// their data; every other bitmap it read from disk. 0 after an activation without a
    /// preload; after one that failed, what it had counted before it failed.
    pub fn taken_as_preloaded(&self) -> usize {
        self.taken_as_is
    }

    /// How many activations of this handle succeeded, in either mode: a holder that read
    /// the number when it handed the store over can tell whether another holder of a
    /// [`SharedStore`](super::SharedStore) took it back (and perhaps handed it out again) since.
    pub fn activations(&self) -> u64 {
        self.activations
    }

    /// Whether a stop ([`inactivate`](Self::inactivate),
    /// [`inactivate_full_rewrite`](Self::inactivate_full_rewrite)) failed after it may
    /// have written "clean" on disk, and the write that would have said "doubt" again
    /// failed too. The in-memory bitmaps then stay sealed ([`DirtyBitmap::seal`]): a mark
    /// that would set a bit waits, so that no guest write it guards goes ahead while the
    /// disk may claim the bitmap clean without it. Do not resume the writers (a failed
    /// migration leaves the source stopped); reopen the image on working storage. Calling
    /// [`DirtyBitmap::unseal`] lets the marks return and gives that guarantee up.
    pub fn marks_held(&self) -> bool {
        self.marks_held
    }

    /// Runs an inactivation with every in-memory bitmap sealed ([`DirtyBitmap::seal`]):
    /// sealing waits for the marks in flight, so the last take-and-serialize sees every bit
    /// a returned mark relied on (one that found its bit already set may have returned on
    /// another mark's unfinished work), and a mark that would write waits until the outcome
    /// is on disk. So no mark returns, and no guest write it guards goes ahead, between the
    /// last serialize and the durable "clean"; the waiting marks then land in the parked
    /// bitmaps (or, if the inactivation failed, in the still active ones). Unsealed on every
    /// path but [`marks_held`](Self::marks_held) (an unwind of `f`
    /// [`stop_with`](Self::stop_with) turns into a failure first).
    fn sealed<T>(&mut self, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let mems: Vec<Arc<DirtyBitmap>> = self.slots.iter().filter_map(|s| s.mem.clone()).collect();
        DirtyBitmap::seal_all(&mems.iter().map(|m| &**m).collect::<Vec<_>>());
        let r = f(self);
        if !self.marks_held {
            for m in &mems {
                m.unseal();
            }
        }
        r
    }

    /// After an inactivation's commit wrote "clean": a mark that arrived after its region
    /// was taken is in memory only, while the directory says clean (as is a region a public
    /// `take_changed` may have taken from under the stop: `primary_pending`). Put `in_use` back (in
    /// place, one barrier) and stay active, so the disk never claims a bit it lacks; the
    /// caller must stop the writers first. Both inactivation paths end with it.
    fn refuse_late_marks(&mut self) -> Result<()> {
        if !self.slots.iter().any(|s| {
            s.mem
                .as_ref()
                .is_some_and(|m| m.primary_pending() > 0 || m.marks_in_flight())
        }) {
            return Ok(());
        }
        let mut back = self.current_entries();
        for (e, s) in back.iter_mut().zip(self.slots.iter().filter(|s| !s.stale)) {
            if s.mem.is_some() {
                e.in_use = true;
            }
        }
        self.write_flags_in_place(back)?;
        Err(Error::MarksDuringInactivate)
    }

    /// Keeps the in-memory bitmaps for a later [`activate`](Self::activate) and goes
    /// inactive.
    fn park(&mut self) {
        for s in &mut self.slots {
            s.parked = s.mem.take();
            // Inactive, the image may pass to another writer: read the tables again.
            s.table = None;
        }
        self.active = false;
        self.parking = true;
    }

    /// **A benchmark baseline, not for production use: call [`inactivate`](Self::inactivate).**
    ///
    /// QEMU's stop (`qcow2_store_persistent_dirty_bitmaps`): stores every in-memory bitmap
    /// whole into fresh clusters and commits one new directory with `in_use` cleared and
    /// `auto` from each bitmap's enabled state, then frees the old clusters. Inconsistent
    /// entries are copied unchanged. It exists so that the benchmarks (`dbm bench flush`,
    /// `dbm demo`), the fuzz harness and the tests can measure the incremental
    /// [`inactivate`](Self::inactivate) against what QEMU writes at a stop; the result on
    /// disk is equivalent, but it writes every bitmap whole and allocates fresh clusters
    /// for all of them. The in-memory bitmaps are parked as by `inactivate`. Does nothing
    /// if not active.
    ///
    /// # Errors
    /// - [`Error::Arriving`] as for [`inactivate`](Self::inactivate), before anything is
    ///   written.
    /// - [`Error::MarksDuringInactivate`] as for [`inactivate`](Self::inactivate), whose
    ///   seal this shares: `in_use` is set again in place and the store stays active.
    /// - [`Error::WrongState`] ([`StateProblem::Durable`]) on a store active in durable
    ///   mode, before anything is written: use [`inactivate`](Self::inactivate).
    /// - I/O errors; the store is then poisoned, and the disk says "doubt" (the bitmaps
    ///   `in_use`, or autoclear bit 0 clear) or the marks are held, as for
    ///   [`inactivate`](Self::inactivate).
    pub fn inactivate_full_rewrite(&mut self) -> Result<FlushStats> {
        // The durable mode's tables are written in place and its trackers commit into
        // them until `inactivate_durable` closes them: relocating and freeing them here
        // would leave those commits landing in freed clusters.
        self.ensure_not_durable()?;
        if self.active {
            // What the commit checks, asked before the stop writes every bitmap anew (a
            // refusal after those writes would fail the stop, untrust every bitmap and
            // poison the store): a cluster 0 with room for the directory's extension, and
            // a walk for its frees (a failed edit's preflight may have dropped
            // `activate`'s).
            self.ensure_header_fits(
                u32::try_from(self.current_entries().len()).unwrap_or(u32::MAX),
            )?;
            if self.walk.is_none() {
                self.preflight()?;
            }
        }
        self.stop_with(|s| {
            let mut stats = FlushStats::default();
            s.full_rewrite(&mut stats)?;
            s.refuse_late_marks()?;
            s.park();
            Ok(stats)
        })
    }

    fn full_rewrite(&mut self, stats: &mut FlushStats) -> Result<()> {
        let mut entries = self.current_entries();
        let mut frees = Vec::new();
        let mems: Vec<Option<Arc<DirtyBitmap>>> =
            self.slots.iter().map(|s| s.mem.clone()).collect();
        // What the rewrite took from the change maps; `write` fills it, and every region in
        // it goes back on an error or an unwind.
        let taken = std::cell::RefCell::new(Vec::<(Arc<DirtyBitmap>, ChangedRegions)>::new());
        let hand_back = || {
            for (m, t) in taken.borrow().iter() {
                m.requeue_changed(t);
            }
        };
        let write = || {
            for (i, m) in mems.iter().enumerate() {
                let Some(m) = m else { continue };
                frees.extend(self.owned_clusters(&self.slots[i].entry)?);
                // The whole bitmap is written, so the change map restarts empty.
                taken.borrow_mut().push((Arc::clone(m), m.take_primary()));
                let table = self.write_bitmap(m, stats)?;
                entries[i].table_offset = table;
                entries[i].in_use = false;
                entries[i].auto = m.is_enabled();
            }
            if mems.iter().any(Option::is_some) {
                self.claim = Claim::Relocated;
                self.commit(entries, frees)?;
            }
            Ok(())
        };
        let r = flush::handing_back_on_unwind(write, hand_back);
        if r.is_err() {
            hand_back();
        }
        r
    }

    /// [`inactivate`](Self::inactivate)s and hands the image back.
    ///
    /// On a store already inactive after an incremental inactivate, marks a
    /// [`Tracker`](crate::Tracker) made since (in the parked copies) are dropped with it:
    /// the disk holds what that stop wrote (docs/DESIGN.md: such marks are not durable
    /// while inactive). [`activate`](Self::activate) first, then close, to keep them.
    ///
    /// # Errors
    /// As [`inactivate`](Self::inactivate). The store is gone then, whatever the error:
    /// one that [`inactivate`](Self::inactivate) calls retryable
    /// ([`Error::Arriving`], [`Error::MarksDuringInactivate`]) leaves the
    /// image `in_use` on disk (its bitmaps read as inconsistent, all dirty, never clean)
    /// and the marks held in memory lost. A caller that may meet those calls `inactivate`
    /// itself, retries, and closes after.
    pub fn close(mut self) -> Result<Image<S>> {
        self.inactivate()?;
        Ok(self.image)
    }
}
