//! The migration module's error type.

use std::io;

/// Everything that can end a migration attempt. After any of them but
/// [`MigrationError::OutcomeUnknown`] (and errors after a postcopy switch) the source
/// resumes its guest and keeps (or re-dirties) every page it had not confirmed as
/// delivered.
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
    /// The frame that starts the destination (End, or the postcopy Switchover) was
    /// written, but no definite answer came back: the return path timed out, closed or
    /// broke, or said something else. The destination may be running the guest, so the
    /// source VM is left **stopped** and the states untouched (QEMU's postcopy-paused).
    /// Only a caller that learns the destination did not start (it is gone, or says so)
    /// may resume the source; it must first run [`channel_failed`] and
    /// [`resume_source`] on every state, so that nothing in flight is lost.
    ///
    /// [`channel_failed`]: super::MigrationState::channel_failed
    /// [`resume_source`]: super::MigrationState::resume_source
    #[error("migration outcome unknown: the destination may be running the guest ({0})")]
    OutcomeUnknown(#[source] Box<MigrationError>),
    /// A parameter is outside its documented range; the message names it.
    #[error("invalid migration parameter: {0}")]
    InvalidInput(String),
    /// An error from the bitmap or store layer.
    #[error(transparent)]
    Bitmap(#[from] crate::Error),
}

/// The migration module's result.
pub type Result<T> = std::result::Result<T, MigrationError>;
