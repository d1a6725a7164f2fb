//! The crate's error types.
//!
//! One [`Error`] for every fallible public function. Malformed on-disk bytes get their own
//! [`Corruption`] enum, whose variants carry the offset and what was found there; it lives
//! with the pure codecs in [`format`](crate::format), which return `Result<_, Corruption>`,
//! and the I/O layer lifts that into [`Error::Corrupt`].
//!
//! An inconsistent bitmap is a *state*, not an error: it loads as inconsistent and the caller
//! treats every bit as dirty.

use std::io;
use std::path::PathBuf;

use crate::format::InvalidValue;
pub use crate::format::{Corruption, EntryProblem, RefcountEntryProblem, TableEntryProblem};

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
    /// The image uses a feature this crate does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A caller passed a value outside the documented range; the message names it.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A named object (for example a bitmap) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// An earlier I/O error left the store in an unknown state; it refuses all further
    /// writes until it is reopened.
    #[error("storage refused the operation after an earlier I/O error; reopen it")]
    Poisoned,
    /// A bitmap changed while [`BitmapStore::inactivate`](crate::BitmapStore::inactivate)
    /// was writing the bitmaps out, other than through a mark (marks wait while the
    /// bitmaps are sealed): for example a `merge_from` on a shared bitmap. The bitmaps were
    /// put back `in_use` and the store stays active, so the disk never claims a bit it
    /// lacks. Stop the writers and inactivate again.
    #[error("marks arrived while inactivating; stop the writers first (the store stays active)")]
    MarksDuringInactivate,
    /// The bitmap was not saved cleanly (in_use was set on disk, or a program without bitmap
    /// support changed the image). Treat every bit as dirty; the only operation allowed on
    /// it is removal.
    #[error("bitmap {name:?} is inconsistent; it can only be removed")]
    Inconsistent {
        /// The bitmap's name.
        name: String,
    },
    /// A change was asked of an image opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,
    /// Another holder of the image file (QEMU, or another open of this crate, also in this
    /// process) holds one of QEMU's image locks that conflicts with the open; nothing was
    /// read or written. `shared: false`: the open uses `perm` and the other holder refuses
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
