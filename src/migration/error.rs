//! The migration module's error type.

use std::io;

/// Everything that can end a migration attempt. After any of them the source resumes its
/// guest and keeps (or re-dirties) every page it had not confirmed as delivered.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The channel failed (connection reset, cut mid-stream, timeout).
    #[error("migration channel I/O error: {0}")]
    Io(#[from] io::Error),
    /// The stream is well framed but breaks the protocol: a frame its receiver does not
    /// allow at that point, a state or page it did not declare. The message says which.
    #[error("corrupt migration stream: {0}")]
    Stream(String),
    /// The stream's framing is broken, typed: bad magic or version, a checksum mismatch, an
    /// unknown kind, an oversized, truncated or out-of-order frame, a malformed payload.
    #[error("corrupt migration stream: {0}")]
    Frame(#[from] super::stream::FrameError),
    /// The peer ended the stream early or aborted; the message gives its reason if it sent one.
    #[error("migration aborted by peer: {0}")]
    PeerAborted(String),
    /// The destination refused to start the guest.
    #[error("destination refused to start: {0}")]
    DestinationRefused(String),
    /// The caller cancelled the migration.
    #[error("migration cancelled")]
    Cancelled,
    /// A parameter is outside its documented range; the message names it.
    #[error("invalid migration parameter: {0}")]
    InvalidInput(String),
    /// An error from the bitmap or store layer.
    #[error(transparent)]
    Bitmap(#[from] crate::Error),
}

/// The migration module's result.
pub type Result<T> = std::result::Result<T, MigrationError>;
