//! The migration module's error type, and [`ProtocolError`]: what a well-framed stream or
//! return path can say that the protocol does not allow.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use super::frame::{EncodeError, FrameError, FrameKind, StateId};
use crate::error::StateProblem;

/// Everything that can end a migration attempt. After any of them but
/// [`MigrationError::OutcomeUnknown`], [`MigrationError::AfterStart`] and
/// [`MigrationError::SourceNotResumed`] the source
/// resumes its guest and keeps (or re-dirties) every page it had not confirmed as
/// delivered.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The channel failed (connection reset, cut mid-stream, timeout).
    #[error("migration channel I/O error: {0}")]
    Io(#[from] io::Error),
    /// The stream is well framed but breaks the protocol: a frame its receiver does not
    /// allow at that point, a state or page it did not declare. The variant says which.
    #[error("corrupt migration stream: {0}")]
    Protocol(#[from] ProtocolError),
    /// The stream's framing is broken, typed: bad magic or version, a checksum mismatch, an
    /// unknown kind, an oversized, truncated or out-of-order frame, a malformed payload.
    #[error("corrupt migration stream: {0}")]
    Frame(#[from] FrameError),
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
    /// [`resume_source`] on every state, so that nothing in flight is lost, then
    /// [`reactivate`] on every state (a shared-storage disk state takes its image back; it
    /// refuses an image the destination changed beyond the `in_use` flags, and the VM must
    /// then stay stopped), and only then resume the VM.
    ///
    /// [`channel_failed`]: super::MigrationState::channel_failed
    /// [`resume_source`]: super::MigrationState::resume_source
    /// [`reactivate`]: super::MigrationState::reactivate
    #[error("migration outcome unknown: the destination may be running the guest ({0})")]
    OutcomeUnknown(#[source] Box<MigrationError>),
    /// The attempt failed after the destination started the guest (postcopy: `Started`
    /// came, then the channel, the destination or a state failed while pages were still
    /// being pulled and pushed). The guest runs on the destination now: **the source must
    /// not resume it**, and cannot migrate it again. The cause is inside.
    #[error("migration failed after the destination started the guest; the source must not resume it ({0})")]
    AfterStart(#[source] Box<MigrationError>),
    /// The hand-over failed and the destination did not start, but the source could not
    /// take back what it handed over at the stop (a state's
    /// [`reactivate`](super::MigrationState::reactivate) failed, say because another
    /// process holds the image's write locks or changed its bitmaps), or the VM would not
    /// resume: **the source VM is left stopped**. Its disk bitmaps keep every mark in
    /// memory; on disk they read clean only if nothing wrote since the stop, and the guest
    /// must not write before they are active again. `cause` is why the hand-over failed,
    /// `resume` why the source could not take over again.
    #[error("migration failed ({cause}) and the source could not take over again ({resume}); the source VM is stopped")]
    SourceNotResumed {
        /// Why the hand-over failed.
        cause: Box<MigrationError>,
        /// Why the source could not take over again.
        resume: Box<MigrationError>,
    },
    /// Stream mode: a disk bitmap's recording (enabled) flag on the source is no longer the
    /// one its START carried, so the destination would record its guest's writes where the
    /// source stopped recording, or the reverse. Found at the stop, before anything of it
    /// is sent: the source resumes, and the next attempt sends that bitmap's START (and
    /// every region of it) again, with the flag as it is then.
    #[error(
        "bitmap {bitmap:?} changed its recording after its START carried enabled = \
         {enabled_at_start}; the next attempt sends it again"
    )]
    RecordingChanged {
        /// The bitmap's name.
        bitmap: String,
        /// The flag its START carried.
        enabled_at_start: bool,
    },
    /// A parameter is outside its documented range, or options conflict (postcopy asked of
    /// a state or loop set up without it, a Hello asking for more RAM than the destination's
    /// limit); the message names it.
    #[error("invalid migration parameter: {0}")]
    InvalidInput(String),
    /// The call is valid but not in the destination's current state (for example
    /// [`StateProblem::GuestNotRunning`] from `Destination::fetch_page`).
    #[error("wrong state: {0}")]
    WrongState(StateProblem),
    /// An invariant of this crate did not hold: never expected, a bug to report (debug builds
    /// panic where it is detected).
    #[error("internal error (a bug in dirty-bitmap, please report it): {0}")]
    Internal(String),
    /// An error from the bitmap or store layer.
    #[error(transparent)]
    Bitmap(#[from] crate::Error),
    /// TLS on the connection failed: credentials that do not load, a handshake that does
    /// not complete, a peer whose certificate is refused or that refuses ours
    /// ([`super::tls`], feature `tls`), or, later in an attempt, a corrupt record or an
    /// alert from the peer. Failing at the handshake, nothing was sent over the connection
    /// and the source's guest was not touched; failing later, the attempt ended as any
    /// channel failure does (the loop re-dirtied what may be lost in flight, unless the
    /// caller reconciles the channel's losses itself).
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

impl MigrationError {
    /// The [`TlsError`] inside an I/O error, raised to [`MigrationError::Tls`]: the TLS
    /// layer under a [`FrameReader`](super::stream::FrameReader) reports through
    /// [`io::Error`], which the reader passes on as [`MigrationError::Io`]. Any other error
    /// is returned as it is.
    pub fn lift_tls(self) -> MigrationError {
        match self {
            MigrationError::Io(e) if e.get_ref().is_some_and(|inner| inner.is::<TlsError>()) => {
                match e.into_inner().map(|inner| inner.downcast::<TlsError>()) {
                    Some(Ok(t)) => MigrationError::Tls(*t),
                    // Unreachable: the guard checked the type.
                    Some(Err(other)) => MigrationError::Io(io::Error::other(other)),
                    None => MigrationError::Internal("an I/O error lost its TLS error".into()),
                }
            }
            other => other,
        }
    }
}

/// Why TLS on a migration connection failed, typed: what to fix is in the variant
/// (credentials, the CA, the server name, the peer's configuration).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A credentials file could not be read (missing, unreadable).
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A credentials file holds no PEM item of the kind needed (a certificate, a private
    /// key), or a malformed one.
    #[error("{}: {what}", path.display())]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// The credentials load but do not make a TLS configuration: a key that does not match
    /// its certificate, a key type not supported, a CA certificate that cannot be a trust
    /// anchor.
    #[error("unusable TLS credentials: {0}")]
    BadCredentials(String),
    /// The server name to verify the destination's certificate against is neither a DNS
    /// name nor an IP address.
    #[error("invalid TLS server name {0:?}")]
    BadServerName(String),
    /// The handshake did not complete within the connection's timeout (a peer that does
    /// not speak TLS and waits for the other side, say: a plain-TCP source).
    #[error("no TLS handshake within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during the TLS handshake")]
    Closed,
    /// The peer does not speak TLS: its first bytes are no TLS record (a destination
    /// without TLS sends a plain migration stream).
    #[error("the peer does not speak TLS: {0}")]
    NotTls(String),
    /// The peer's certificate is not signed by the configured CA.
    #[error("the peer's certificate is not signed by the configured CA")]
    UnknownIssuer,
    /// The destination's certificate is signed by the CA but not valid for the server name
    /// the source asked for (`--tls-hostname`).
    #[error("the destination's certificate does not name the server: {0}")]
    WrongName(String),
    /// The peer's certificate was refused for another reason: expired or not yet valid,
    /// a bad signature, not meant for this use (a client certificate on the server).
    #[error("the peer's certificate was refused: {0}")]
    BadCertificate(String),
    /// The peer presented no certificate (a source without a client certificate).
    #[error("the peer presented no certificate")]
    NoCertificate,
    /// The peer refused the handshake with a TLS alert: most often it did not accept our
    /// certificate (`UnknownCA`: another CA signed it; `BadCertificate`: the name or use
    /// does not fit). The alert's name is given.
    #[error("the peer refused the TLS handshake (alert {0})")]
    RefusedByPeer(String),
    /// Any other TLS failure, during the handshake or on a record after it.
    #[error("{0}")]
    Protocol(String),
}

impl MigrationError {
    /// A [`MigrationError::Internal`] for an invariant that failed. Debug builds panic here
    /// (the `debug_assert!` of the invariant); release builds return the error.
    pub(crate) fn internal(what: &str) -> Self {
        if cfg!(debug_assertions) {
            panic!("internal error: {what}");
        }
        MigrationError::Internal(what.to_string())
    }
}

/// A frame that does not encode is the caller's bad value.
impl From<EncodeError> for MigrationError {
    fn from(e: EncodeError) -> Self {
        MigrationError::InvalidInput(e.to_string())
    }
}

/// What a well-framed conversation does that the protocol does not allow, on either side.
/// Each variant names the frame, state or page at fault.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The destination read a frame its phase does not allow (a Section before the Hello,
    /// a second Switchover, a destination's frame from the source).
    #[error("unexpected {kind:?} frame {seq} while {phase}")]
    UnexpectedFrame {
        /// The frame's kind.
        kind: FrameKind,
        /// Its sequence number.
        seq: u64,
        /// The destination's phase when it came.
        phase: &'static str,
    },
    /// The Hello does not echo the nonce the destination issued for this connection: a
    /// recorded attempt replayed, or a Hello meant for another connection.
    #[error(
        "the Hello echoes nonce {found:#x}, not the one this destination issued for the connection"
    )]
    WrongNonce {
        /// The nonce in the Hello.
        found: u128,
    },
    /// The destination keeps RAM from a failed attempt and the Hello does not resume it
    /// (another guest, another geometry, or not the migration that left it: its `resume`
    /// does not name that RAM). The kept RAM stays; only the Hello is refused.
    #[error(
        "this destination keeps the RAM of guest {kept_id:#x} ({kept_pages} pages) for the \
         migration that left it; a Hello of guest {migration_id:#x} ({pages} pages) that does \
         not resume it is refused"
    )]
    KeptRamNotResumed {
        /// The Hello's migration id.
        migration_id: u64,
        /// The Hello's RAM pages.
        pages: u64,
        /// The migration id of the kept RAM.
        kept_id: u64,
        /// Its pages.
        kept_pages: u64,
    },
    /// The Hello says the RAM's first pass is incremental ([`super::frame::Hello::incremental`]:
    /// only what an earlier attempt left dirty), and this destination kept no RAM of that
    /// migration (it restarted, or is another host, or the RAM it kept is gone): the pages
    /// the source will not send would be missing. Refused before any page; the source
    /// retries with a full pass ([`super::SetupMode::Full`]).
    #[error(
        "the Hello of guest {migration_id:#x} resumes an earlier attempt's RAM (an incremental          first pass), and this destination has no RAM kept for it: retry with a full pass"
    )]
    NoKeptRam {
        /// The Hello's migration id.
        migration_id: u64,
    },
    /// The source expected the destination's Nonce as its first frame.
    #[error("expected the destination's Nonce first, got {kind:?}")]
    NoNonce {
        /// The frame's kind.
        kind: FrameKind,
    },
    /// The source read a source's frame (Hello, Section, Switchover, End) on the return
    /// path, where only the destination's frames belong.
    #[error("the destination sent a {kind:?} frame")]
    SourceFrameOnReturnPath {
        /// The frame's kind.
        kind: FrameKind,
    },
    /// The source waited for the destination's answer to the switchover (Started, Refused
    /// or Abort) and read another frame.
    #[error("expected Started, Refused or Abort, got {kind:?}")]
    NotAnAnswer {
        /// The frame's kind.
        kind: FrameKind,
    },
    /// The loop received a destination message its phase does not allow.
    #[error("destination sent {kind:?} {when}")]
    UnexpectedMessage {
        /// The kind of the frame that carried it.
        kind: FrameKind,
        /// When it came: "before the switchover", "instead of starting", "after it started".
        when: &'static str,
    },
    /// A state's figure waited on its destination ([`super::Pending::awaiting_destination`]:
    /// a shared disk's preload report, then its reports of the logs queued behind the
    /// preload) for longer than [`super::LoopConfig::answer_timeout`]: the destination's
    /// preload hangs, it does not answer BEGIN, or it falls behind the source's write log;
    /// or the answer to a state's setup question (a stream disk's QUERY, which its
    /// destination answers after walking its image) did not come within it. The attempt
    /// fails with the guest running.
    #[error("the destination did not answer or catch up in {waited_ms} ms (its preload of the shared disk's bitmaps and the write logs queued behind it, or its answer to a state's setup)")]
    NoAnswer {
        /// How long the loop waited, in ms.
        waited_ms: u64,
    },
    /// The Hello's version is not the stream header's.
    #[error("Hello says version {hello} but the stream header says {stream}")]
    HelloVersion {
        /// The version in the Hello.
        hello: u32,
        /// The version in the stream header.
        stream: u32,
    },
    /// The Hello declares a state name twice.
    #[error("state {0:?} declared twice")]
    DuplicateStateName(String),
    /// The Hello declares a state id twice.
    #[error("state id {0} declared twice")]
    DuplicateStateId(StateId),
    /// The Hello gives RAM a size but declares no RAM state.
    #[error("Hello has {pages} RAM pages but no {name:?} state")]
    RamWithoutState {
        /// The RAM pages in the Hello.
        pages: u64,
        /// The RAM state's name (`ram_codec::RAM_STATE_NAME`).
        name: &'static str,
    },
    /// The Hello does not describe the guest this destination holds (the simulated
    /// destination of `sim.rs` is built for one guest).
    #[error(
        "Hello for {pages} pages of {page_size} bytes in state {ram_state:?}, expected \
         {expected_pages} of {expected_page_size} in state {expected_state}"
    )]
    WrongGuest {
        /// RAM pages in the Hello.
        pages: u64,
        /// Page size in the Hello.
        page_size: u32,
        /// The Hello's RAM state id, if it declares one.
        ram_state: Option<StateId>,
        /// The destination's RAM pages.
        expected_pages: u64,
        /// The destination's page size.
        expected_page_size: u32,
        /// The destination's RAM state id.
        expected_state: StateId,
    },
    /// A Section of a state the Hello did not declare.
    #[error("section of state {0}, which the Hello did not declare")]
    UndeclaredState(StateId),
    /// A Section of a declared state that nothing on this destination handles.
    #[error("no handler for {0:?}")]
    NoHandler(String),
    /// A RAM Section on a destination that has no RAM.
    #[error("RAM section without RAM")]
    NoRam,
    /// A RAM Section names a page past the end of RAM.
    #[error("page {page} is outside the guest's {pages} pages")]
    PageOutOfRange {
        /// The page.
        page: u64,
        /// The guest's pages.
        pages: u64,
    },
    /// A RAM Section names one page twice. Refused before any byte of the section is
    /// applied: a repeat has no meaning, and repeated zero-page entries would let 9 bytes
    /// of stream cost a page-sized write each.
    #[error("page {page} appears twice in one RAM section")]
    RepeatedPage {
        /// The page.
        page: u64,
    },
    /// A discard arrived once the destination's guest ran (postcopy): a page it may have
    /// written since cannot be dropped.
    #[error("discard of page {page} after the guest started")]
    DiscardAfterStart {
        /// The page.
        page: u64,
    },
    /// End came with a page missing.
    #[error("End with page {page} never received ({received} of {pages} pages here)")]
    PageNeverReceived {
        /// The first missing page.
        page: u64,
        /// Pages received.
        received: u64,
        /// The guest's pages.
        pages: u64,
    },
    /// The stream ended while the destination's guest waited for a page (postcopy).
    #[error("the stream ended without page {page}")]
    EndedWithoutPage {
        /// The page.
        page: u64,
    },
    /// A page request names pages past the end of RAM.
    #[error("page request for {count} pages from {first}, outside RAM of {pages} pages")]
    RequestOutOfRange {
        /// The first page asked for.
        first: u64,
        /// How many.
        count: u32,
        /// The guest's pages.
        pages: u64,
    },
    /// The destination reports it applied sections of a state up to a number the source
    /// never reached: it claims data it was never sent (a hostile or confused peer). The
    /// source trusts nothing of the report.
    #[error("the destination reports state {state}'s sections applied up to {reported}, but only {sent} were sent")]
    ReportBeyondSent {
        /// The state.
        state: StateId,
        /// The number it reports.
        reported: u64,
        /// The last number the source sent.
        sent: u64,
    },
    /// A page request for a state this migration does not carry.
    #[error("page request for unknown state {0}")]
    RequestForUnknownState(StateId),
    /// Postcopy: the states say bytes are pending, but none of them sent any (a state
    /// that breaks its [`super::MigrationState`] contract).
    #[error("postcopy: bytes pending but no state sent any")]
    NoProgress,
    /// The destination failed earlier; its error.
    #[error("destination failed earlier: {0}")]
    Failed(String),
    /// The destination completed; nothing more is read.
    #[error("the migration is complete; nothing more to read")]
    Complete,
    /// The destination's thread is gone without a report (it panicked, or was joined).
    #[error("the destination thread {0}")]
    DestinationThread(&'static str),
}

/// The migration module's result.
pub type Result<T> = std::result::Result<T, MigrationError>;
