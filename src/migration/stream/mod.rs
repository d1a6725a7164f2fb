//! The migration stream's I/O: [`FrameWriter`] puts the frames of [`super::frame`] on a
//! byte channel, [`FrameReader`] takes them off it.
//!
//! Invariants the reader enforces, so that a damaged stream is an error and never a wrong
//! frame:
//! - the header checksum is verified before the length is believed, so a corrupt length
//!   never makes the reader allocate or wait for bytes that will not come;
//! - no length above the reader's `max_frame_len` (at most [`MAX_FRAME_LEN`]) is accepted,
//!   and the payload buffer grows only as bytes arrive;
//! - sequence numbers start at 0 and go up by one per frame: a gap or a replay is an error;
//! - after any error the reader (and the writer) stays failed: a torn stream cannot be
//!   resynchronised, only restarted.
//!
//! The reader is fed untrusted bytes (the fuzz target `migration_stream` drives it), so it
//! is under the same parser lints as the codec of `frame.rs`.

use std::io::{self, Read, Write};

use super::channel::Outbound;
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{
    check_len, control_wire_len, decode_stream_header, encode_raw, encode_stream_header,
    payload_crc, Control, Frame, FrameError, FrameHeader, FrameKind, StateId, FRAME_HEADER_LEN,
    FRAME_TRAILER_LEN, MAX_FRAME_LEN, SECTION_OVERHEAD, STREAM_HEADER_LEN, STREAM_VERSION,
};
use super::rate::RateLimiter;
use crate::units::{Bytes, BytesPerMs};

/// Byte and frame counters of a [`FrameWriter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriterStats {
    /// Put on the wire: stream header, frame headers, payloads, trailers.
    pub bytes: Bytes,
    /// Frames written.
    pub frames: u64,
    /// Section payloads (the states' own bytes, without framing).
    pub section_bytes: Bytes,
}

/// Writes a migration stream: the stream header before the first frame, then frames with
/// consecutive sequence numbers, each held back by the rate limiter and flushed at once; a
/// frame larger than the limiter's window budget goes out in pieces of that budget, each
/// held back and flushed in turn.
///
/// Once the source sends [`Frame::Switchover`] the VM is stopped and the limiter is lifted,
/// as QEMU lifts its rate limit for the completion phase: downtime is not throttled.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: W,
    header_sent: bool,
    next_seq: u64,
    stats: WriterStats,
    limiter: RateLimiter,
    failed: Option<String>,
}

impl<W: Write> FrameWriter<W> {
    /// A writer without a rate limit.
    pub fn new(inner: W) -> FrameWriter<W> {
        FrameWriter::with_limiter(inner, RateLimiter::unlimited())
    }

    /// A writer whose frames wait for `limiter`.
    pub fn with_limiter(inner: W, limiter: RateLimiter) -> FrameWriter<W> {
        FrameWriter {
            inner,
            header_sent: false,
            next_seq: 0,
            stats: WriterStats::default(),
            limiter,
            failed: None,
        }
    }

    /// Writes one frame and returns its size on the wire (with the stream header if this
    /// is the first frame).
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] for a frame that does not encode (the stream is
    /// unchanged); [`MigrationError::Io`] from the channel, after which the writer is failed
    /// and every later call returns [`FrameError::Failed`].
    pub fn write_frame(&mut self, frame: &Frame) -> Result<Bytes> {
        self.check_failed()?;
        let payload = frame.encode_payload()?;
        check_len(payload.len())?;
        if let Frame::Switchover { .. } = frame {
            // The VM is stopped from here on: not even the Switchover frame itself waits
            // for the limiter (it would add up to a window to the downtime).
            self.limiter.set_max_bandwidth(BytesPerMs::ZERO);
        }
        self.put(frame.kind() as u8, &[&payload])
    }

    /// Sends an Abort frame, best effort: errors are ignored, since the stream is being
    /// given up anyway.
    pub fn abort(&mut self, reason: &str) {
        let _ = self.write_frame(&Frame::Abort {
            reason: reason.to_owned(),
        });
    }

    fn check_failed(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(FrameError::Failed(why.clone()).into()),
            None => Ok(()),
        }
    }

    /// Writes a frame of `kind` with the concatenation of `parts` as payload.
    fn put(&mut self, kind: u8, parts: &[&[u8]]) -> Result<Bytes> {
        let mut wire = Vec::new();
        if !self.header_sent {
            wire.extend_from_slice(&encode_stream_header(STREAM_VERSION));
        }
        let frame = encode_raw(kind, self.next_seq, parts);
        wire.extend_from_slice(&frame);
        // Under a rate limit the frame goes out in pieces of at most one window's budget,
        // each after its own wait: the bytes of a frame larger than a window keep coming
        // at the limit, so the reader never waits longer than about one window between
        // two of them (a frame written whole and then paid for by the following pauses
        // would leave the reader idle for `len / rate`, longer than its timeout at a low
        // legal rate).
        let piece = self.limiter.window_budget().map_or(wire.len(), |b| {
            usize::try_from(b.get()).unwrap_or(usize::MAX).max(1)
        });
        for chunk in wire.chunks(piece.max(1)) {
            self.limiter.wait();
            let res = self
                .inner
                .write_all(chunk)
                .and_then(|()| self.inner.flush());
            if let Err(e) = res {
                self.failed = Some(format!("write of frame {} failed: {e}", self.next_seq));
                return Err(e.into());
            }
            self.limiter.record(Bytes(chunk.len() as u64));
        }
        let n = Bytes(wire.len() as u64);
        self.header_sent = true;
        self.next_seq = self.next_seq.saturating_add(1);
        self.stats.bytes = add(self.stats.bytes, n);
        self.stats.frames = self.stats.frames.saturating_add(1);
        Ok(n)
    }

    /// Sets the rate limit (QEMU's `max-bandwidth`); [`BytesPerMs::ZERO`] lifts it.
    pub fn set_max_bandwidth(&mut self, max_bandwidth: BytesPerMs) {
        self.limiter.set_max_bandwidth(max_bandwidth);
    }

    /// The rate limiter.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// The byte and frame counters.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// The channel.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The channel, mutably. Writing to it directly breaks the stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Gives the channel back.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Outbound for FrameWriter<W> {
    /// Sends `payload` as a Section frame of `state`.
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes> {
        self.check_failed()?;
        check_len(payload.len().saturating_add(4))?;
        let n = self.put(FrameKind::Section as u8, &[&state.to_be_bytes(), payload])?;
        self.stats.section_bytes = add(self.stats.section_bytes, Bytes(payload.len() as u64));
        Ok(n)
    }

    fn control(&mut self, msg: &Control) -> Result<Bytes> {
        self.write_frame(&msg.to_frame())
    }

    fn lift_rate_limit(&mut self) {
        self.limiter.set_max_bandwidth(BytesPerMs::ZERO);
    }

    fn section_overhead(&self) -> Bytes {
        let header = if self.header_sent {
            0
        } else {
            STREAM_HEADER_LEN as u64
        };
        add(SECTION_OVERHEAD, Bytes(header))
    }

    fn control_cost(&self, msg: &Control) -> Bytes {
        let header = match (self.header_sent, msg) {
            (false, m) if !matches!(m, Control::Hello(_)) => STREAM_HEADER_LEN as u64,
            _ => 0,
        };
        control_wire_len(msg).map_or(Bytes(u64::MAX), |n| add(n, Bytes(header)))
    }

    fn bytes_sent(&self) -> Bytes {
        self.stats.bytes
    }
}

/// Told each frame's payload length once its header is verified, before the payload is
/// read: a channel that bounds a frame's time sets the frame's deadline from it.
pub type HeaderHook = Box<dyn FnMut(u32) + Send>;

/// Reads a migration stream written by [`FrameWriter`], verifying everything the module
/// documentation lists.
pub struct FrameReader<R: Read> {
    inner: R,
    on_header: Option<HeaderHook>,
    max_len: u32,
    version: Option<u32>,
    next_seq: u64,
    offset: u64,
    /// Where the unit being read (stream header or frame) started.
    unit_start: u64,
    failed: Option<FrameError>,
    /// How long a read timeout inside a unit is retried ([`set_patience`](Self::set_patience)).
    patience: Option<std::time::Duration>,
}

/// The result of filling a buffer: how many bytes arrived before EOF.
enum Fill {
    Full,
    Eof(usize),
}

impl<R: Read + std::fmt::Debug> std::fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameReader")
            .field("inner", &self.inner)
            .field("max_len", &self.max_len)
            .field("version", &self.version)
            .field("next_seq", &self.next_seq)
            .field("offset", &self.offset)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<R: Read> FrameReader<R> {
    /// A reader accepting payloads up to [`MAX_FRAME_LEN`].
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader::with_max_frame_len(inner, MAX_FRAME_LEN)
    }

    /// A reader accepting payloads up to `max_len` bytes (capped at [`MAX_FRAME_LEN`]).
    pub fn with_max_frame_len(inner: R, max_len: u32) -> FrameReader<R> {
        FrameReader {
            inner,
            on_header: None,
            max_len: max_len.min(MAX_FRAME_LEN),
            version: None,
            next_seq: 0,
            offset: 0,
            unit_start: 0,
            failed: None,
            patience: None,
        }
    }

    /// For a channel read with a short timeout (to poll a stop flag between frames): a
    /// timeout that arrives after a unit's first byte is retried for up to `patience`
    /// instead of failing the reader, so that a frame whose second half is late (a lost
    /// segment resent) is read whole, wherever the gap falls: in its header, its payload or
    /// its trailer, each of which waits at most `patience` from its own first timeout. A
    /// timeout before a unit's first byte still returns at once, and leaves the reader
    /// usable.
    pub fn set_patience(&mut self, patience: std::time::Duration) {
        self.patience = Some(patience);
    }

    /// Calls `hook` with each frame's payload length once the frame's header is verified,
    /// before its payload is read.
    pub fn set_header_hook(&mut self, hook: HeaderHook) {
        self.on_header = Some(hook);
    }

    /// The stream's version, once its header has been read.
    pub fn version(&self) -> Option<u32> {
        self.version
    }

    /// Bytes consumed so far.
    pub fn bytes_read(&self) -> Bytes {
        Bytes(self.offset)
    }

    /// Frames read so far.
    pub fn frames_read(&self) -> u64 {
        self.next_seq
    }

    /// The channel.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The channel, mutably (to set a timeout, say). Reading from it breaks the stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Whether read error `e` is a timeout inside a unit (after its first byte) that is
    /// retried: within the patience, counted from `waiting`, the first timeout of the part
    /// being read (set here on the first call).
    fn waits_out(&self, e: &io::Error, waiting: &mut Option<std::time::Instant>) -> bool {
        matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) && self.offset > self.unit_start
            && self
                .patience
                .is_some_and(|p| waiting.get_or_insert_with(std::time::Instant::now).elapsed() < p)
    }

    /// Reads until `buf` is full or the stream ends.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<Fill> {
        let mut got = 0usize;
        let mut waiting = None;
        // `got` stays below `buf.len()` inside the loop, so the rest is never empty.
        while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
            match self.inner.read(rest) {
                Ok(0) => return Ok(Fill::Eof(got)),
                Ok(n) => {
                    got = got.saturating_add(n);
                    self.offset = self.offset.saturating_add(n as u64);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if self.waits_out(&e, &mut waiting) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Fill::Full)
    }

    /// Reads a payload of `len` bytes, or what arrives of it before the stream ends. The
    /// buffer grows only as bytes arrive, so a sender that stops early costs no more memory
    /// than it sent.
    fn read_payload(&mut self, len: u64) -> io::Result<Vec<u8>> {
        let mut payload = Vec::new();
        let mut waiting = None;
        loop {
            let before = payload.len();
            let want = len.saturating_sub(before as u64);
            // Returns at the length or at the end of the stream; a timeout keeps the bytes
            // read before it in `payload`.
            let got = (&mut self.inner).take(want).read_to_end(&mut payload);
            self.offset = self
                .offset
                .saturating_add(payload.len().saturating_sub(before) as u64);
            match got {
                Ok(_) => return Ok(payload),
                Err(e) if self.waits_out(&e, &mut waiting) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads and verifies the next frame.
    ///
    /// An I/O error that arrives before any byte of the frame (a read timeout while waiting)
    /// leaves the reader usable; every other error fails it for good.
    ///
    /// # Errors
    /// [`MigrationError::Frame`] for a corrupt, short, out-of-order or unsupported stream
    /// (the variants of [`FrameError`]), [`MigrationError::Io`] from the channel.
    pub fn read_frame(&mut self) -> Result<Frame> {
        if let Some(e) = &self.failed {
            return Err(FrameError::Failed(e.to_string()).into());
        }
        match self.read_inner() {
            Ok(f) => Ok(f),
            Err(MigrationError::Io(e)) if self.offset == self.unit_start => {
                Err(MigrationError::Io(e))
            }
            Err(e) => {
                self.failed = Some(match &e {
                    MigrationError::Frame(f) => f.clone(),
                    other => FrameError::Failed(other.to_string()),
                });
                Err(e)
            }
        }
    }

    fn read_inner(&mut self) -> Result<Frame> {
        self.unit_start = self.offset;
        if self.version.is_none() {
            let start = self.offset;
            let mut h = [0u8; STREAM_HEADER_LEN];
            if let Fill::Eof(got) = self.fill(&mut h)? {
                return Err(if got == 0 {
                    FrameError::Closed {
                        offset: start,
                        frames: 0,
                    }
                } else {
                    FrameError::Truncated {
                        offset: self.offset,
                        what: "stream header",
                        needed: STREAM_HEADER_LEN.saturating_sub(got) as u64,
                    }
                }
                .into());
            }
            self.version = Some(decode_stream_header(&h)?);
        }
        self.unit_start = self.offset;
        let at = self.offset;
        let mut h = [0u8; FRAME_HEADER_LEN];
        if let Fill::Eof(got) = self.fill(&mut h)? {
            return Err(if got == 0 {
                FrameError::Closed {
                    offset: at,
                    frames: self.next_seq,
                }
            } else {
                FrameError::Truncated {
                    offset: self.offset,
                    what: "frame header",
                    needed: FRAME_HEADER_LEN.saturating_sub(got) as u64,
                }
            }
            .into());
        }
        let header = FrameHeader::decode(&h, at, self.max_len)?;
        if header.seq != self.next_seq {
            let (expected, found) = (self.next_seq, header.seq);
            return Err(if found > expected {
                FrameError::SequenceGap {
                    offset: at,
                    expected,
                    found,
                }
            } else {
                FrameError::Replay {
                    offset: at,
                    expected,
                    found,
                }
            }
            .into());
        }
        if let Some(hook) = &mut self.on_header {
            hook(header.len);
        }
        // The length is checksummed and bounded.
        let len = u64::from(header.len);
        let payload = self.read_payload(len)?;
        if (payload.len() as u64) < len {
            return Err(FrameError::Truncated {
                offset: self.offset,
                what: "frame payload",
                needed: len.saturating_sub(payload.len() as u64),
            }
            .into());
        }
        let mut t = [0u8; FRAME_TRAILER_LEN];
        if let Fill::Eof(got) = self.fill(&mut t)? {
            return Err(FrameError::Truncated {
                offset: self.offset,
                what: "frame trailer",
                needed: FRAME_TRAILER_LEN.saturating_sub(got) as u64,
            }
            .into());
        }
        let stored = u32::from_be_bytes(t);
        let computed = payload_crc(&h, &[&payload]);
        if stored != computed {
            return Err(FrameError::PayloadChecksum {
                offset: at,
                seq: header.seq,
                stored,
                computed,
            }
            .into());
        }
        let frame = Frame::decode_payload(header.kind, &payload)?;
        self.next_seq = self.next_seq.saturating_add(1);
        Ok(frame)
    }

    /// Source side: waits for the destination's answer to the switchover.
    ///
    /// # Errors
    /// [`MigrationError::DestinationRefused`] for Refused, [`MigrationError::PeerAborted`]
    /// for Abort, [`ProtocolError::NotAnAnswer`] for any other frame, and the errors of
    /// [`FrameReader::read_frame`].
    pub fn wait_started(&mut self) -> Result<()> {
        match self.read_frame()? {
            Frame::Started => Ok(()),
            Frame::Refused { reason } => Err(MigrationError::DestinationRefused(reason)),
            Frame::Abort { reason } => Err(MigrationError::PeerAborted(reason)),
            other => Err(ProtocolError::NotAnAnswer { kind: other.kind() }.into()),
        }
    }
}

/// `a + b`, saturating as `Bytes`' own `+` is, spelled out for the parser lints above.
fn add(a: Bytes, b: Bytes) -> Bytes {
    Bytes(a.get().saturating_add(b.get()))
}

#[cfg(test)]
mod tests;
