//! The crate's error types.
//!
//! One [`Error`] for every fallible public function. Malformed on-disk bytes get their own
//! [`Corruption`] enum, whose variants carry the offset and what was found there; pure codecs
//! return `Result<_, Corruption>` and the I/O layer lifts that into [`Error::Corrupt`].
//!
//! An inconsistent bitmap is a *state*, not an error: it loads as inconsistent and the caller
//! treats every bit as dirty.

use std::io;

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
}

/// Malformed on-disk data, with where it was found and what was there.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corruption {
    /// A structure ends before its fixed size.
    #[error(
        "{what} at offset {offset:#x} is truncated: needs {needed} bytes, {available} available"
    )]
    Truncated {
        /// The structure being decoded.
        what: &'static str,
        /// Where it starts.
        offset: u64,
        /// Bytes the structure needs.
        needed: u64,
        /// Bytes that were there.
        available: u64,
    },
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
