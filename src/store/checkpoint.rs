//! Checkpoints: a chain of bitmaps, one per backup, of which only the newest records.
//!
//! [`BitmapStore::checkpoint`] appends the new bitmap at the end of the directory and, in
//! the same directory commit, disables the one that was recording, so every write lands in
//! the old bitmap (before the commit) or the new one (after it).
//!
//! "What changed since checkpoint X" ([`BitmapStore::changed_since`]) is the union of X and
//! every bitmap created after it, but the image does not say which those are. The
//! directory order is the creation order only for bitmaps added one commit at a time, as
//! here: QEMU keeps the entries it loaded in place and appends the bitmaps one run of it
//! created newest first, so after two checkpoints in one QEMU session the newer one lies
//! before the older (`tests/checkpoint.rs`, `what_changed_since_a_checkpoint_qemu_made`).
//! Nothing else in the format records when a bitmap was made. So the union takes every
//! bitmap of the image: bits from before X, or from a bitmap unrelated to the chain, cost
//! extra copies; a missing bitmap would corrupt a backup. Removing the oldest checkpoint
//! after each backup ([`BitmapStore::remove`], one commit) keeps the union tight.

use super::{BitmapStore, Recording, SinceInactivate};
use crate::bitmap::DirtyBitmap;
use crate::error::{invalid_input, Error, Result, StateProblem};
use crate::format::BitmapName;
use crate::storage::Storage;

/// The granularity of the first checkpoint of an image with no recording bitmap: QEMU's
/// default for a disk with 64 KiB clusters.
pub const DEFAULT_CHECKPOINT_GRANULARITY: u64 = 64 << 10;

impl<S: Storage> BitmapStore<S> {
    /// Starts checkpoint `new`: in one directory commit, the bitmap that records (the
    /// chain's newest) is disabled and `new` is added enabled, at the same granularity. With
    /// no recording bitmap, `new` starts the chain at [`DEFAULT_CHECKPOINT_GRANULARITY`].
    /// Returns the name of the bitmap it disabled.
    ///
    /// Every write is in one of them: before the commit in the old bitmap, after it in
    /// `new`. With no recording bitmap, writes made since the last one stopped are in no
    /// bitmap, and the union of [`changed_since`](Self::changed_since) over the old chain's
    /// bitmaps and the new one lacks them: remove the old chain first. On an active store,
    /// `new` is published to the trackers before the old one
    /// stops recording, so a mark racing the call lands in one of them or both, never in
    /// neither. A crash before the commit leaves the chain as it was (and only leaked
    /// clusters); after it, both entries as the commit wrote them.
    ///
    /// Active in durable mode, a write is marked before it is issued, so one whose intent
    /// was acknowledged before the call may land after it: it is in `new` (on disk, before
    /// the call returns) when it was registered
    /// ([`DurableTracker::begin_write`](super::durable::DurableTracker::begin_write), its
    /// guard alive at the call). A caller of plain
    /// [`mark`](super::durable::DurableTracker::mark) drains its writes before the call,
    /// as QEMU does around a transaction: otherwise such a write is only in the old bitmap,
    /// and lost to the chain once that is removed. The same holds for a deferred
    /// [`Tracker`](crate::Tracker) whose writer marks before it writes: it drains around
    /// the call, or marks after the write lands (docs/DESIGN.md, "Disk marks and VM stop").
    ///
    /// Inactive after an incremental [`inactivate`](Self::inactivate), the old bitmap is
    /// disabled on disk as the stop wrote it: marks made since, in its parked copy, reach
    /// the disk only when a later [`activate`](Self::activate) resumes it and a flush or
    /// stop writes them; another process reading the image meanwhile does not see them.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when more than one bitmap records (a chain has one), or as
    /// [`add`](Self::add) for `new`; [`Error::Busy`] when a
    /// [`ChangeConsumer`](crate::ChangeConsumer) reads the recording bitmap (a migration
    /// stream: the writes would go to `new`, which it does not carry); [`Error::Arriving`]
    /// while the recording bitmap's bits are still arriving (a postcopy push: they would
    /// land in a bitmap that no longer records, after the checkpoint's reader looked);
    /// [`Error::Inconsistent`] when the recording bitmap is
    /// inconsistent, or the image's bitmaps extension is untrusted (autoclear bit 0 clear),
    /// which a commit would drop with every bitmap in it (remove the bitmaps and start a new
    /// chain, then back up in full); [`Error::WrongState`]
    /// ([`StateProblem::UntrustedBitmaps`]) for such an extension whose directory does not
    /// read;
    /// [`Error::ReadOnly`]; I/O.
    pub fn checkpoint(&mut self, new: &str) -> Result<Option<BitmapName>> {
        // The store's own state first: a read-only or poisoned store is refused as such,
        // not for a chain it could never fix.
        self.ensure_writable()?;
        // An untrusted bitmaps extension: its bitmaps would vanish with the commit below,
        // and the chain with them. Refused as an inconsistent recording bitmap is, or, when
        // its directory does not read (no slot lists it), as untrusted.
        if let Some(s) = self.slots.iter().find(|s| s.stale) {
            return Err(Error::Inconsistent {
                name: s.entry.name.clone(),
            });
        }
        if self.image.stale_bitmaps().is_some() {
            return Err(Error::WrongState(StateProblem::UntrustedBitmaps));
        }
        let recording: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.stale && self.records(s))
            .map(|(i, _)| i)
            .collect();
        match recording[..] {
            [] => {
                self.add(new, DEFAULT_CHECKPOINT_GRANULARITY, Recording::Enabled)?;
                Ok(None)
            }
            [i] => {
                let slot = &self.slots[i];
                if slot.inconsistent {
                    return Err(Error::Inconsistent {
                        name: slot.entry.name.clone(),
                    });
                }
                // A bitmap a migration stream reads keeps recording: writes from here on
                // would be in `new` alone, which the stream does not carry.
                self.ensure_not_busy(i)?;
                let old = slot.entry.name.clone();
                let g = 1u64 << slot.entry.granularity_bits;
                self.add_disabling(new, g, Recording::Enabled, Some(i))?;
                Ok(Some(old))
            }
            _ => {
                let names: Vec<String> = recording
                    .iter()
                    .map(|&i| self.slots[i].entry.name.to_string())
                    .collect();
                Err(invalid_input!(
                    "{} bitmaps record ({}); a checkpoint chain has one",
                    names.len(),
                    names.join(", ")
                ))
            }
        }
    }

    /// Whether slot `s` records: its in-memory flag while active (or parked), else the
    /// `auto` flag on disk.
    pub(super) fn records(&self, s: &super::Slot) -> bool {
        match s.mem.as_ref().or(s.parked.as_ref()) {
            Some(m) => m.is_enabled(),
            None => s.entry.auto,
        }
    }

    /// What changed since checkpoint `since`: the union of bitmap `since` and every other
    /// bitmap of the image, at `since`'s granularity (each other bitmap's dirty extents
    /// dirty every granule they touch). Every other bitmap, because the image cannot tell
    /// which were created after `since` (see the module docs): the union holds every write
    /// made since while a bitmap of the image recorded, and may hold writes from before it.
    /// A write made while none recorded (the chain's latest disabled by
    /// [`set_enabled`](Self::set_enabled), before a [`checkpoint`](Self::checkpoint) starts
    /// a new chain) is in no bitmap, here as in QEMU: after such a gap, a "since" from
    /// before it needs a full backup (remove the old chain's bitmaps). Read from memory
    /// where the store holds the bitmaps, else from disk.
    ///
    /// # Errors
    /// [`Error::NotFound`]; [`Error::Inconsistent`] when any bitmap of the image is
    /// inconsistent (it may be a later checkpoint whose bits cannot be trusted: remove the
    /// bitmaps and start a new chain, then back up in full; removing that bitmap alone
    /// leaves every other bitmap all dirty, see [`remove`](Self::remove));
    /// [`Error::Unsupported`] before anything is read when the
    /// bitmaps and the union add up to more than an activation may hold
    /// ([`ensure_loadable_in_turn`](Self::ensure_loadable_in_turn)); [`Error::Arriving`]
    /// while any bitmap's bits are still arriving (a postcopy push); [`Error::Corrupt`];
    /// I/O.
    ///
    /// A store that handed the image over (its inactivation released the writer locks)
    /// reads as [`load`](Self::load) does, the disk ORed into each kept copy, and only
    /// while the image is byte for byte as it left it: once another writer activated it
    /// (its marks may be in its memory alone) or changed it, [`Error::WrongState`]
    /// ([`StateProblem::ChangedWhileInactive`]).
    pub fn changed_since(&self, since: impl AsRef<[u8]>) -> Result<DirtyBitmap> {
        let first = self.find(since.as_ref())?;
        // The union is one more bitmap at `since`'s granularity.
        self.ensure_loadable_in_turn(self.memory_needed(std::iter::once(&self.slots[first])))?;
        let handed = self.handed_over()?;
        if matches!(
            handed,
            Some(SinceInactivate::InUseSet | SinceInactivate::Changed)
        ) {
            return Err(Error::WrongState(StateProblem::ChangedWhileInactive));
        }
        let load = |name: &[u8]| self.load_slot(self.find_consistent(name)?, handed);
        let base = load(since.as_ref())?;
        // A fresh bitmap at `since`'s granularity; each other bitmap's dirty granules dirty
        // every granule of it they touch.
        let out = self.new_bitmap(base.granularity())?;
        out.merge_from(&base)?;
        for (i, s) in self.slots.iter().enumerate() {
            if i == first {
                continue;
            }
            out.merge_from(&load(s.entry.name.as_bytes())?)?;
        }
        Ok(out)
    }

    /// Writes [`changed_since`](Self::changed_since)`(since)` into a new disabled bitmap
    /// `into`, which `qemu-nbd -B INTO` exports (what QEMU's pull-mode backup does with
    /// `block-dirty-bitmap-merge`). Remove it after the backup. On an inactive store only:
    /// an active one's disk copy of `into` would be `in_use`, which `qemu-nbd` refuses.
    ///
    /// One directory commit names `into` with its content written before it
    /// ([`add_from`](Self::add_from)): a crash or a failure leaves `into` absent or whole,
    /// never consistent and empty (a backup through it would copy nothing).
    ///
    /// A store that handed the image over takes the writer locks back, and checks the
    /// image, before it reads anything (as [`add`](Self::add) does before it writes), so
    /// the union holds what another writer flushed meanwhile and nobody writes between the
    /// read and the commit.
    ///
    /// # Errors
    /// As [`changed_since`](Self::changed_since) and [`add`](Self::add);
    /// [`Error::WrongState`] on an active store.
    pub fn export_since(&mut self, since: impl AsRef<[u8]>, into: &str) -> Result<()> {
        // Before the union is built (up to the load budget's work): a store that cannot
        // write `into` says so first.
        self.ensure_writable()?;
        if self.active {
            return Err(Error::WrongState(StateProblem::Active));
        }
        self.reclaimed(|s| {
            let union = s.changed_since(since)?;
            s.add_from(into, union.granularity(), Recording::Disabled, &union)
        })
    }
}
