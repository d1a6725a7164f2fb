//! The crate's error types.
//!
//! One [`Error`] for every fallible public function. Malformed on-disk bytes get their own
//! [`Corruption`] enum, whose variants carry the offset and what was found there; it lives
//! with the pure codecs in [`format`](crate::format), which return `Result<_, Corruption>`,
//! and the I/O layer lifts that into [`Error::Corrupt`].
//!
//! An inconsistent bitmap is a *state*, not an error: it loads as inconsistent and the caller
//! treats every bit as dirty.
//!
//! The variants split by what the caller can do about them: a bad value it passed
//! ([`Error::InvalidInput`]), a call the store's state does not allow yet or any more
//! ([`Error::WrongState`], typed by [`StateProblem`]), a name that is missing or taken
//! ([`Error::NotFound`], [`Error::Exists`]), a limit of the format, the crate or the machine
//! ([`Error::Unsupported`]), and a broken invariant of the crate itself ([`Error::Internal`],
//! never expected: a bug to report).

use std::io;
use std::path::PathBuf;

use crate::format::{BitmapName, InvalidValue};
pub use crate::format::{
    CheckFindings, Corruption, EntryProblem, RefcountEntryProblem, TableEntryProblem,
};

/// Everything that can go wrong in this crate.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying storage failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// On-disk bytes violate the format or one of QEMU's limits.
    #[error("corrupt image: {0}")]
    Corrupt(#[from] Corruption),
    /// The image uses a feature this crate does not implement, or needs more than one of
    /// its limits (or the machine's) allows: an image too large to check or to address, a
    /// reftable above 8 MiB, bitmaps that would not fit the memory limit of
    /// [`activate`](crate::BitmapStore::activate), an allocation the crate sizes from the
    /// image that failed (the check's counters, say). The message names the feature or the
    /// limit. A buffer a storage could not allocate (a read, or a
    /// [`MemStorage`](crate::storage::MemStorage) that cannot grow) is an
    /// [`Error::Io`] of kind `OutOfMemory` instead, as the storage's other failures are.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A caller passed a value outside the documented range, or options that conflict (for
    /// example force-share on a writable open); the message names it. Nothing was changed:
    /// from a [`Storage`](crate::storage::Storage)'s `write_all_at` or `set_len` it
    /// guarantees the storage was not touched.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The call is valid, but not in the state the store or image is in; the payload says
    /// which state, and so what to do first (activate, inactivate, reopen). Nothing was
    /// changed.
    #[error("wrong state: {0}")]
    WrongState(StateProblem),
    /// No bitmap of that name.
    #[error("bitmap {name:?} not found")]
    NotFound {
        /// The name asked for, byte for byte.
        name: BitmapName,
    },
    /// A bitmap of that name already exists.
    #[error("bitmap {name:?} already exists")]
    Exists {
        /// The name asked for, byte for byte.
        name: BitmapName,
    },
    /// An invariant of this crate did not hold: never expected, a bug to report (debug builds
    /// panic where most are detected; release builds return this rather than panic). Also
    /// the report of a caller's [`Storage`](crate::storage::Storage) that panicked inside
    /// the background flusher (`FlushThread::stop`). Treat the store as after an I/O
    /// error: drop it and reopen the image.
    #[error("internal error (a bug in dirty-bitmap, please report it): {0}")]
    Internal(String),
    /// An earlier I/O error left the store in an unknown state; it refuses all further
    /// writes until it is reopened.
    #[error("storage refused the operation after an earlier I/O error; reopen it")]
    Poisoned,
    /// A bitmap changed while [`BitmapStore::inactivate`](crate::BitmapStore::inactivate)
    /// was writing the bitmaps out, other than through a mark (marks wait while the
    /// bitmaps are sealed, and so does a `merge_from`): for example a `clear` on a shared
    /// bitmap. The bitmaps were
    /// put back `in_use` and the store stays active, so the disk never claims a bit it
    /// lacks. Stop the writers and inactivate again.
    #[error("marks arrived while inactivating; stop the writers first (the store stays active)")]
    MarksDuringInactivate,
    /// The bitmap was not saved cleanly (in_use was set on disk, or a program without bitmap
    /// support changed the image). Treat every bit as dirty; the only operation allowed on
    /// it is removal, which leaves every consistent bitmap kept all dirty
    /// ([`remove`](crate::BitmapStore::remove)): it may be a later checkpoint, holding
    /// writes no other bitmap has. So the message says what a backup must do: remove the
    /// bitmaps and start a new chain, then back up in full. In that order: a write between
    /// a full backup and a later new chain would be in neither.
    #[error(
        "bitmap {name:?} is inconsistent: its bits cannot be trusted, so treat the whole disk \
         as changed; remove the bitmaps and start a new chain, then back up in full"
    )]
    Inconsistent {
        /// The bitmap's name, byte for byte.
        name: BitmapName,
    },
    /// The bitmap's changes are read by a [`ChangeConsumer`](crate::ChangeConsumer) (QEMU
    /// calls such a bitmap busy): while any consumer of it exists, the store refuses to drop
    /// its in-memory bitmap, as [`remove`](crate::BitmapStore::remove) would, and to change
    /// its recording flag ([`set_enabled`](crate::BitmapStore::set_enabled), or a
    /// [`checkpoint`](crate::BitmapStore::checkpoint) that would hand its recording over to
    /// a bitmap the consumer does not read), to OR bits into it
    /// ([`merge`](crate::BitmapStore::merge), [`store`](crate::BitmapStore::store)), and to
    /// clear it ([`clear`](crate::BitmapStore::clear), as QEMU refuses). The
    /// consumer would go on reading a bitmap the store no longer marks: a write marked on a
    /// new bitmap (of the same name, or the checkpoint's) would never reach it; and bits
    /// ORed in after a migration stream's last take of the bitmap would never reach the
    /// destination. Drop every consumer of the bitmap first. Nothing was changed.
    #[error("bitmap {name:?} is busy: a change consumer reads it; drop the consumer first")]
    Busy {
        /// The bitmap's name, byte for byte.
        name: BitmapName,
    },
    /// The bitmap's bits are still arriving: a migration destination's bitmap while the
    /// source's postcopy push runs (QEMU keeps such a bitmap busy until its migration
    /// completes). Until the migration ends the store refuses what would take it as
    /// complete or leave its late bits nowhere: a copy of it ([`load`](crate::BitmapStore::load),
    /// [`changed_since`](crate::BitmapStore::changed_since), a
    /// [`merge`](crate::BitmapStore::merge) from it), its removal, a change of its
    /// recording flag (a checkpoint's too), and a stop that would write it consistent.
    /// Nothing was changed.
    #[error(
        "bitmap {name:?} is still arriving from a migration's source; wait until the \
         migration ends"
    )]
    Arriving {
        /// The bitmap's name, byte for byte.
        name: BitmapName,
    },
    /// A change was asked of an image opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,
    /// Another holder of the image file (QEMU, or another open of this crate, also in this
    /// process) holds one of QEMU's image locks that conflicts with the open (or with a
    /// raw data file's hold, `path` then naming the data file, or with taking back writer
    /// locks an inactivation released); nothing was read or written. `shared: false`: the open uses `perm` and the other holder refuses
    /// to share it (QEMU's `Failed to get "write" lock`); `shared: true`: the open refuses to
    /// share `perm` and the other holder uses it (`Failed to get shared "write" lock`).
    #[error(
        "failed to get {}\"{perm}\" lock: is another process using the image {}?",
        if *.shared { "shared " } else { "" },
        .path.display()
    )]
    Locked {
        /// The image file.
        path: PathBuf,
        /// QEMU's name for the permission (`"consistent read"`, `"write"`,
        /// `"write unchanged"`, `"resize"`).
        perm: &'static str,
        /// Whether the open refused to share `perm` (rather than wanting to use it).
        shared: bool,
    },
    /// The kernel or the file system cannot take the open-file-description byte-range locks
    /// QEMU's image locking uses (not Linux, or for example `ENOLCK` from a network file
    /// system). The file was closed. Opening with `Locking::Off` goes without the locks.
    #[error(
        "cannot take QEMU's image locks on {}: {source}; open with locking off to go without",
        .path.display()
    )]
    LockUnsupported {
        /// The image file.
        path: PathBuf,
        /// What the lock call returned.
        source: io::Error,
    },
    /// A [`repair`](crate::store::repair::repair) committed its change to the bitmaps
    /// (`committed` says what it removed and left all dirty, as its report would) and then
    /// failed (freeing the old clusters, or in the leak repair that follows): the committed
    /// change stands, and what was left undone is at worst a leak. Repair again once the
    /// storage works.
    #[error("the repair was committed, then failed: {error}")]
    RepairedThenFailed {
        /// What the repair committed.
        committed: Box<RepairCommitted>,
        /// The error after the commit.
        error: Box<Error>,
    },
}

/// What a repair had committed when it failed ([`Error::RepairedThenFailed`]): the fields of
/// its report (`store::repair::RepairReport`) that the commit made true.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairCommitted {
    /// The bitmaps removed, each with why QEMU refused it.
    pub removed: Vec<(BitmapName, String)>,
    /// Why the whole bitmaps extension was dropped, if it was.
    pub extension_dropped: Option<String>,
    /// The kept bitmaps left consistent with every bit set.
    pub made_all_dirty: Vec<BitmapName>,
    /// Clusters a kept bitmap or the directory owns whose refcount 0 was raised to 1.
    pub refcounts_raised: u64,
}

/// The state an operation needs and the store, image or migration destination is not in:
/// the payload of [`Error::WrongState`] and
/// [`MigrationError::WrongState`](crate::migration::MigrationError::WrongState).
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StateProblem {
    /// The store is inactive and the call needs the in-memory bitmaps.
    #[error("the store is not active; call activate() first")]
    NotActive,
    /// The store is active and the call needs it inactive.
    #[error("the store is active; inactivate it first")]
    Active,
    /// Another program wrote the image while the store was inactive: its cached refcounts
    /// and tables are stale.
    #[error("the image changed while inactive; reopen it")]
    ChangedWhileInactive,
    /// An incremental inactivate kept bitmaps in memory for a later activate, and a
    /// [`Tracker`](crate::Tracker) may still mark them.
    #[error("bitmaps kept for activate() are in memory; reopen the image")]
    ParkedBitmaps,
    /// Creating an image needs empty storage.
    #[error("the storage is not empty; an image is created only on empty storage")]
    StorageNotEmpty,
    /// The store is not active in durable mode and the call needs it.
    #[error("the store is not active in durable mode; call activate_durable() first")]
    NotDurable,
    /// The store is active in durable mode: marks go through its durable tracker, never a
    /// deferred one, and no live bitmap is handed out
    /// ([`BitmapStore::bitmap`](crate::BitmapStore::bitmap)): reads take a copy
    /// ([`BitmapStore::load`](crate::BitmapStore::load)).
    #[error(
        "the store is active in durable mode: mark through SharedStore::durable_tracker, read \
         through load()"
    )]
    Durable,
    /// A deferred [`Tracker`](crate::Tracker) of this store still exists: it follows the
    /// store's bitmaps, and its marks cannot wait for the disk, so a durable activation is
    /// refused until every such tracker is dropped.
    #[error("deferred Trackers of this store still exist; drop them before activate_durable()")]
    DeferredTrackers,
    /// The migration destination's guest is not running yet.
    #[error("the guest does not run on this destination yet")]
    GuestNotRunning,
    /// A stop failed after it may have written "clean" on disk, and could not take it back:
    /// the in-memory bitmaps stay sealed, so no guest write they guard may go ahead
    /// ([`BitmapStore::marks_held`](crate::BitmapStore::marks_held)).
    #[error(
        "a failed stop may have left the bitmaps clean on disk; marks are held; reopen the image"
    )]
    MarksHeld,
    /// This handle released QEMU's writer locks on the image (an inactivation, so that a
    /// migration destination could open it writable) and has not taken them back: it
    /// writes nothing until it does.
    #[error("the writer locks on the image were released (an inactive node); take them back before writing")]
    WriterLocksReleased,
    /// The image's bitmaps extension is untrusted (autoclear bit 0 clear: a writer that
    /// does not know bitmaps changed the image) and its directory does not read, so its
    /// bitmaps cannot be listed; a commit would drop them, and with them a checkpoint
    /// chain ([`BitmapStore::checkpoint`](crate::BitmapStore::checkpoint) refuses).
    #[error("the image's bitmaps extension is untrusted and its directory does not read; a checkpoint would drop its chain (add a bitmap to start a new one)")]
    UntrustedBitmaps,
}

impl From<InvalidValue> for Error {
    fn from(value: InvalidValue) -> Self {
        Error::InvalidInput(value.0)
    }
}

/// Shorthand for `Result<T, dirty_bitmap::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds an [`Error::InvalidInput`] from format arguments.
macro_rules! invalid_input {
    ($($arg:tt)*) => {
        $crate::error::Error::InvalidInput(format!($($arg)*))
    };
}
pub(crate) use invalid_input;

/// Builds an [`Error::Internal`] from format arguments, for an invariant that failed. Debug
/// builds panic here (the `debug_assert!` of the invariant); release builds return the
/// error.
macro_rules! internal {
    ($($arg:tt)*) => {{
        if cfg!(debug_assertions) {
            panic!("internal error: {}", format!($($arg)*));
        }
        $crate::error::Error::Internal(format!($($arg)*))
    }};
}
pub(crate) use internal;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every state a caller can be told about reads as one sentence: no run of spaces left
    /// by a broken line in its message.
    #[test]
    fn state_messages_have_no_runs_of_spaces() {
        for p in [
            StateProblem::NotActive,
            StateProblem::Active,
            StateProblem::ChangedWhileInactive,
            StateProblem::ParkedBitmaps,
            StateProblem::StorageNotEmpty,
            StateProblem::NotDurable,
            StateProblem::Durable,
            StateProblem::DeferredTrackers,
            StateProblem::GuestNotRunning,
            StateProblem::MarksHeld,
            StateProblem::WriterLocksReleased,
            StateProblem::UntrustedBitmaps,
        ] {
            let m = Error::WrongState(p).to_string();
            assert!(!m.contains("  "), "{p:?}: {m:?}");
        }
    }

    /// An inconsistent bitmap's name is kept byte for byte, as `NotFound`'s is: a name
    /// that is not UTF-8 is not replaced by U+FFFD, and its message escapes the bytes.
    #[test]
    fn an_inconsistent_name_keeps_its_bytes() {
        let raw: &[u8] = b"b\xff";
        let e = Error::Inconsistent { name: raw.into() };
        let Error::Inconsistent { name } = &e else {
            unreachable!()
        };
        assert_eq!(name.as_bytes(), raw);
        assert_eq!(
            e.to_string(),
            "bitmap \"b\\xff\" is inconsistent: its bits cannot be trusted, so treat the \
             whole disk as changed; remove the bitmaps and start a new chain, then back up in \
             full"
        );
    }
}
