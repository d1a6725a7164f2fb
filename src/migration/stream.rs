//! The migration stream: a versioned sequence of checksummed frames over any byte channel.
//!
//! Each direction of a migration channel is one stream: an 8-byte stream header (magic and
//! version) followed by frames. A frame is a 20-byte header (kind, sequence number, payload
//! length, and a CRC32 of the header), the payload, and a CRC32 of header and payload. The
//! byte layout is in `docs/FORMAT.md`, section "Migration stream".
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
//! The codec functions ([`encode_stream_header`], [`FrameHeader::decode`],
//! [`Frame::decode_payload`], [`encode_frame`]) are pure; [`FrameReader`] and
//! [`FrameWriter`] add the I/O.

use std::io::{self, Read, Write};

use super::error::{MigrationError, Result};
use super::rate::RateLimiter;
use super::state::Control;
use super::{Outbound, StateId};
use crate::units::{Bytes, BytesPerMs};

/// The stream magic, "DBMM" (dirty-bitmap migration).
pub const STREAM_MAGIC: u32 = 0x4442_4D4D;
/// The stream version this crate writes (2: the Hello carries a migration id).
pub const STREAM_VERSION: u32 = 2;
/// The oldest stream version this crate reads. Version 1's Hello had no migration id, so a
/// destination could not tell whose RAM it kept; it is refused.
pub const MIN_STREAM_VERSION: u32 = 2;
/// Length of the fixed part of a Hello payload: version (4), page size (4), RAM pages (8),
/// migration id (8), state count (2).
pub const HELLO_FIXED_LEN: usize = 26;
/// Length of the stream header: magic (4), version (4).
pub const STREAM_HEADER_LEN: usize = 8;
/// Length of a frame header.
pub const FRAME_HEADER_LEN: usize = 20;
/// Length of the frame trailer (payload CRC32).
pub const FRAME_TRAILER_LEN: usize = 4;
/// Framing bytes per frame: header and trailer.
pub const FRAME_OVERHEAD: usize = FRAME_HEADER_LEN + FRAME_TRAILER_LEN;
/// The largest payload the protocol allows (16 MiB). Readers may set a lower limit.
pub const MAX_FRAME_LEN: u32 = 16 << 20;
/// The longest reason string a writer puts into a Refused or Abort frame; longer ones are
/// cut at a character boundary.
pub const MAX_REASON_LEN: usize = 4096;

// Offsets in the frame header.
const OFF_KIND: usize = 0;
const OFF_FLAGS: usize = 1;
const OFF_RESERVED: usize = 2;
const OFF_SEQ: usize = 4;
const OFF_LEN: usize = 12;
const OFF_HEADER_CRC: usize = 16;

/// How the framing of a stream is broken. Each variant says where.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The stream does not start with [`STREAM_MAGIC`].
    #[error("bad stream magic {found:#010x} (expected {STREAM_MAGIC:#010x})")]
    BadMagic {
        /// The four bytes found, big-endian.
        found: u32,
    },
    /// The stream's version is not one this crate reads.
    #[error("unsupported stream version {found} (this build reads {MIN_STREAM_VERSION}..={STREAM_VERSION})")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// A frame header's checksum does not match its bytes.
    #[error("frame header checksum mismatch at byte {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderChecksum {
        /// Stream offset of the frame.
        offset: u64,
        /// The CRC32 in the header.
        stored: u32,
        /// The CRC32 of the header bytes.
        computed: u32,
    },
    /// A frame's payload checksum does not match.
    #[error("frame {seq} checksum mismatch at byte {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    PayloadChecksum {
        /// Stream offset of the frame.
        offset: u64,
        /// The frame's sequence number.
        seq: u64,
        /// The CRC32 in the trailer.
        stored: u32,
        /// The CRC32 of header and payload.
        computed: u32,
    },
    /// A frame kind this version does not define.
    #[error("unknown frame kind {kind} at byte {offset}")]
    UnknownKind {
        /// Stream offset of the frame.
        offset: u64,
        /// The kind byte.
        kind: u8,
    },
    /// A flags or reserved field is not zero.
    #[error("reserved frame header bits set at byte {offset}: {value:#x}")]
    Reserved {
        /// Stream offset of the frame.
        offset: u64,
        /// Flags (high byte) and reserved field (low 16 bits).
        value: u32,
    },
    /// A frame is longer than the reader allows.
    #[error("frame of {len} bytes at byte {offset} exceeds the limit of {max}")]
    Oversized {
        /// Stream offset of the frame.
        offset: u64,
        /// The payload length in the header.
        len: u32,
        /// The reader's limit.
        max: u32,
    },
    /// The stream ended inside its header or inside a frame.
    #[error("stream cut at byte {offset}: {needed} more bytes of the {what} were expected")]
    Truncated {
        /// Stream offset where the bytes ran out.
        offset: u64,
        /// What was being read.
        what: &'static str,
        /// How many more bytes it needed.
        needed: u64,
    },
    /// The stream ended cleanly between frames, when another frame was expected.
    #[error("stream closed at byte {offset} after {frames} frames")]
    Closed {
        /// Stream offset of the end.
        offset: u64,
        /// Frames read before it.
        frames: u64,
    },
    /// A frame's sequence number is past the expected one: frames were lost or reordered.
    #[error("sequence gap at byte {offset}: expected frame {expected}, found {found}")]
    SequenceGap {
        /// Stream offset of the frame.
        offset: u64,
        /// The sequence number the reader expected.
        expected: u64,
        /// The one in the frame.
        found: u64,
    },
    /// A frame's sequence number was already seen: a replayed or reordered frame.
    #[error("replayed frame at byte {offset}: expected frame {expected}, found {found}")]
    Replay {
        /// Stream offset of the frame.
        offset: u64,
        /// The sequence number the reader expected.
        expected: u64,
        /// The one in the frame.
        found: u64,
    },
    /// A frame's payload does not decode as its kind says (or a RAM payload is malformed).
    #[error("bad {what} payload: {reason}")]
    BadPayload {
        /// The kind of payload.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The reader or writer failed earlier; the stream cannot be resynchronised.
    #[error("stream already failed: {0}")]
    Failed(String),
}

impl FrameError {
    pub(crate) fn payload(what: &'static str, reason: impl Into<String>) -> FrameError {
        FrameError::BadPayload {
            what,
            reason: reason.into(),
        }
    }
}

/// The kind byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// Source → destination, first frame: version, page size, RAM size, states.
    Hello = 1,
    /// Source → destination: one opaque payload of one state.
    Section = 2,
    /// Source → destination: the source guest is stopped.
    Switchover = 3,
    /// Source → destination: everything has been sent.
    End = 4,
    /// Destination → source: the destination guest is running.
    Started = 5,
    /// Destination → source: the destination will not start; carries the reason.
    Refused = 6,
    /// Destination → source: postcopy demand request for a state's data.
    PageRequest = 7,
    /// Either direction: the sender gives up; carries the reason.
    Abort = 8,
}

impl FrameKind {
    /// The kind for a byte, if defined.
    pub fn from_u8(b: u8) -> Option<FrameKind> {
        Some(match b {
            1 => FrameKind::Hello,
            2 => FrameKind::Section,
            3 => FrameKind::Switchover,
            4 => FrameKind::End,
            5 => FrameKind::Started,
            6 => FrameKind::Refused,
            7 => FrameKind::PageRequest,
            8 => FrameKind::Abort,
            _ => return None,
        })
    }
}

/// One migration state as the Hello frame declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateInfo {
    /// The id its Section frames carry.
    pub id: StateId,
    /// Its name (1..=255 bytes of UTF-8), such as [`super::ram_codec::RAM_STATE_NAME`].
    pub name: String,
}

/// The Hello frame: what the source is about to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The stream version the source speaks (equal to the stream header's).
    pub version: u32,
    /// Guest page size in bytes.
    pub page_size: u32,
    /// Guest RAM size in pages.
    pub ram_pages: u64,
    /// Which guest this is: random per source guest, the same for every attempt of its
    /// migration. A destination reuses the RAM a failed attempt left only for a Hello with
    /// the same id (and geometry), so a retry never completes onto another guest's pages.
    pub migration_id: u64,
    /// The states whose sections follow, with unique ids and names.
    pub states: Vec<StateInfo>,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// One opaque payload of state `state`.
    Section {
        /// The state.
        state: StateId,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// The source guest stopped. With `postcopy`, the destination starts now and pulls
    /// missing pages with [`Frame::PageRequest`]; without it, it starts after [`Frame::End`].
    Switchover {
        /// Whether the rest of the migration is postcopy.
        postcopy: bool,
    },
    /// Everything has been sent.
    End,
    /// The destination guest runs.
    Started,
    /// The destination refuses to start.
    Refused {
        /// Why.
        reason: String,
    },
    /// A demand request of state `state` (for RAM: [`super::ram_codec::encode_page_request`]).
    PageRequest {
        /// The state.
        state: StateId,
        /// The state's request.
        payload: Vec<u8>,
    },
    /// The sender gives up.
    Abort {
        /// Why.
        reason: String,
    },
}

/// A decoded and verified frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The frame kind.
    pub kind: FrameKind,
    /// The sequence number.
    pub seq: u64,
    /// The payload length.
    pub len: u32,
}

/// Encodes the stream header for `version`.
pub fn encode_stream_header(version: u32) -> [u8; STREAM_HEADER_LEN] {
    let mut h = [0u8; STREAM_HEADER_LEN];
    h[0..4].copy_from_slice(&STREAM_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&version.to_be_bytes());
    h
}

/// Decodes a stream header and returns its version.
///
/// # Errors
/// [`FrameError::BadMagic`], or [`FrameError::UnsupportedVersion`] for a version outside
/// [`MIN_STREAM_VERSION`]..=[`STREAM_VERSION`].
pub fn decode_stream_header(h: &[u8; STREAM_HEADER_LEN]) -> std::result::Result<u32, FrameError> {
    let magic = be32(&h[0..4]);
    if magic != STREAM_MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = be32(&h[4..8]);
    if !(MIN_STREAM_VERSION..=STREAM_VERSION).contains(&version) {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    Ok(version)
}

fn be32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

impl FrameHeader {
    /// Decodes and verifies a frame header found at stream offset `offset` (for error
    /// messages). The checksum is checked first, so no field of a damaged header is believed.
    ///
    /// # Errors
    /// [`FrameError::HeaderChecksum`], [`FrameError::Reserved`], [`FrameError::UnknownKind`],
    /// or [`FrameError::Oversized`] for a length above `max_len`.
    pub fn decode(
        h: &[u8; FRAME_HEADER_LEN],
        offset: u64,
        max_len: u32,
    ) -> std::result::Result<FrameHeader, FrameError> {
        let stored = be32(&h[OFF_HEADER_CRC..]);
        let computed = crc32fast::hash(&h[..OFF_HEADER_CRC]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum {
                offset,
                stored,
                computed,
            });
        }
        let reserved = (u32::from(h[OFF_FLAGS]) << 16)
            | u32::from(u16::from_be_bytes([h[OFF_RESERVED], h[OFF_RESERVED + 1]]));
        if reserved != 0 {
            return Err(FrameError::Reserved {
                offset,
                value: reserved,
            });
        }
        let kind = FrameKind::from_u8(h[OFF_KIND]).ok_or(FrameError::UnknownKind {
            offset,
            kind: h[OFF_KIND],
        })?;
        let len = be32(&h[OFF_LEN..]);
        if len > max_len {
            return Err(FrameError::Oversized {
                offset,
                len,
                max: max_len,
            });
        }
        Ok(FrameHeader {
            kind,
            seq: be64(&h[OFF_SEQ..]),
            len,
        })
    }

    /// Encodes the header with its checksum. The caller guarantees `len` fits the protocol.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        raw_header(self.kind as u8, self.seq, self.len)
    }
}

/// A header with any kind byte (tests build unknown kinds with it).
fn raw_header(kind: u8, seq: u64, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[OFF_KIND] = kind;
    h[OFF_SEQ..OFF_SEQ + 8].copy_from_slice(&seq.to_be_bytes());
    h[OFF_LEN..OFF_LEN + 4].copy_from_slice(&len.to_be_bytes());
    let crc = crc32fast::hash(&h[..OFF_HEADER_CRC]);
    h[OFF_HEADER_CRC..].copy_from_slice(&crc.to_be_bytes());
    h
}

/// The trailer checksum: CRC32 of the frame header and the payload parts.
fn payload_crc(header: &[u8; FRAME_HEADER_LEN], parts: &[&[u8]]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(header);
    for p in parts {
        c.update(p);
    }
    c.finalize()
}

/// Encodes a frame of `kind` whose payload is the concatenation of `parts`; the caller
/// guarantees the total fits a u32.
fn encode_raw(kind: u8, seq: u64, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let header = raw_header(kind, seq, len as u32);
    let mut out = Vec::with_capacity(FRAME_OVERHEAD + len);
    out.extend_from_slice(&header);
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&payload_crc(&header, parts).to_be_bytes());
    out
}

/// Cuts a reason string to [`MAX_REASON_LEN`] bytes at a character boundary.
fn cut_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    let mut end = MAX_REASON_LEN;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Section { .. } => FrameKind::Section,
            Frame::Switchover { .. } => FrameKind::Switchover,
            Frame::End => FrameKind::End,
            Frame::Started => FrameKind::Started,
            Frame::Refused { .. } => FrameKind::Refused,
            Frame::PageRequest { .. } => FrameKind::PageRequest,
            Frame::Abort { .. } => FrameKind::Abort,
        }
    }

    /// Encodes the payload.
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] for a Hello whose state names are empty or longer
    /// than 255 bytes, or with more than 65535 states.
    pub fn encode_payload(&self) -> Result<Vec<u8>> {
        Ok(match self {
            Frame::Hello(h) => {
                let n = u16::try_from(h.states.len()).map_err(|_| {
                    MigrationError::InvalidInput("more than 65535 states in Hello".into())
                })?;
                let mut p = Vec::with_capacity(HELLO_FIXED_LEN + h.states.len() * 8);
                p.extend_from_slice(&h.version.to_be_bytes());
                p.extend_from_slice(&h.page_size.to_be_bytes());
                p.extend_from_slice(&h.ram_pages.to_be_bytes());
                p.extend_from_slice(&h.migration_id.to_be_bytes());
                p.extend_from_slice(&n.to_be_bytes());
                for s in &h.states {
                    let len = u8::try_from(s.name.len())
                        .ok()
                        .filter(|&l| l > 0)
                        .ok_or_else(|| {
                            MigrationError::InvalidInput(format!(
                                "state name {:?} is not 1..=255 bytes",
                                s.name
                            ))
                        })?;
                    p.extend_from_slice(&s.id.to_be_bytes());
                    p.push(len);
                    p.extend_from_slice(s.name.as_bytes());
                }
                p
            }
            Frame::Section { state, payload } | Frame::PageRequest { state, payload } => {
                let mut p = Vec::with_capacity(4 + payload.len());
                p.extend_from_slice(&state.to_be_bytes());
                p.extend_from_slice(payload);
                p
            }
            Frame::Switchover { postcopy } => vec![u8::from(*postcopy)],
            Frame::End | Frame::Started => Vec::new(),
            Frame::Refused { reason } | Frame::Abort { reason } => {
                cut_reason(reason).as_bytes().to_vec()
            }
        })
    }

    /// Decodes the payload of a frame of `kind`. The whole payload must be used.
    ///
    /// # Errors
    /// [`FrameError::BadPayload`] naming the kind and what is wrong.
    pub fn decode_payload(kind: FrameKind, p: &[u8]) -> std::result::Result<Frame, FrameError> {
        let bad = |what, reason: &str| FrameError::payload(what, reason);
        let exact_empty = |what| {
            if p.is_empty() {
                Ok(())
            } else {
                Err(FrameError::payload(
                    what,
                    format!("{} bytes where none belong", p.len()),
                ))
            }
        };
        let text = |what| {
            std::str::from_utf8(p)
                .map(str::to_owned)
                .map_err(|e| FrameError::payload(what, format!("reason is not UTF-8: {e}")))
        };
        Ok(match kind {
            FrameKind::Hello => {
                const FIXED: usize = HELLO_FIXED_LEN;
                if p.len() < FIXED {
                    return Err(bad("Hello", "shorter than 26 bytes"));
                }
                let version = be32(&p[0..]);
                let page_size = be32(&p[4..]);
                let ram_pages = be64(&p[8..]);
                let migration_id = be64(&p[16..]);
                let n = usize::from(u16::from_be_bytes([p[24], p[25]]));
                // Each state takes at least 6 bytes: bound the allocation by the payload.
                if n > (p.len() - FIXED) / 6 {
                    return Err(bad("Hello", "more states than the payload can hold"));
                }
                let mut states = Vec::with_capacity(n);
                let mut at = FIXED;
                for _ in 0..n {
                    let Some(fixed) = p.get(at..at + 5) else {
                        return Err(bad("Hello", "state list cut short"));
                    };
                    let id = be32(fixed);
                    let len = usize::from(fixed[4]);
                    if len == 0 {
                        return Err(bad("Hello", "empty state name"));
                    }
                    let Some(name) = p.get(at + 5..at + 5 + len) else {
                        return Err(bad("Hello", "state name cut short"));
                    };
                    let name = std::str::from_utf8(name)
                        .map_err(|_| bad("Hello", "state name is not UTF-8"))?;
                    states.push(StateInfo {
                        id,
                        name: name.to_owned(),
                    });
                    at += 5 + len;
                }
                if at != p.len() {
                    return Err(bad("Hello", "trailing bytes after the state list"));
                }
                Frame::Hello(Hello {
                    version,
                    page_size,
                    ram_pages,
                    migration_id,
                    states,
                })
            }
            FrameKind::Section | FrameKind::PageRequest => {
                let what = if kind == FrameKind::Section {
                    "Section"
                } else {
                    "PageRequest"
                };
                if p.len() < 4 {
                    return Err(bad(what, "shorter than its 4-byte state id"));
                }
                let state = be32(p);
                let payload = p[4..].to_vec();
                if kind == FrameKind::Section {
                    Frame::Section { state, payload }
                } else {
                    Frame::PageRequest { state, payload }
                }
            }
            FrameKind::Switchover => match p {
                [0] => Frame::Switchover { postcopy: false },
                [1] => Frame::Switchover { postcopy: true },
                _ => return Err(bad("Switchover", "mode is not the single byte 0 or 1")),
            },
            FrameKind::End => {
                exact_empty("End")?;
                Frame::End
            }
            FrameKind::Started => {
                exact_empty("Started")?;
                Frame::Started
            }
            FrameKind::Refused => Frame::Refused {
                reason: text("Refused")?,
            },
            FrameKind::Abort => Frame::Abort {
                reason: text("Abort")?,
            },
        })
    }
}

/// Encodes `frame` with sequence number `seq`: header, payload, trailer.
///
/// # Errors
/// [`MigrationError::InvalidInput`] if the payload does not encode or is longer than
/// [`MAX_FRAME_LEN`].
pub fn encode_frame(seq: u64, frame: &Frame) -> Result<Vec<u8>> {
    let payload = frame.encode_payload()?;
    check_len(payload.len())?;
    Ok(encode_raw(frame.kind() as u8, seq, &[&payload]))
}

fn check_len(len: usize) -> Result<u32> {
    u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_LEN)
        .ok_or_else(|| {
            MigrationError::InvalidInput(format!(
                "frame payload of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit"
            ))
        })
}

/// Encodes a frame with any kind byte and correct checksums (for tests of the reader).
#[doc(hidden)]
pub fn encode_raw_frame(kind: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    encode_raw(kind, seq, &[payload])
}

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
/// consecutive sequence numbers, each held back by the rate limiter and flushed at once.
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
        self.limiter.wait();
        let res = self
            .inner
            .write_all(&wire)
            .and_then(|()| self.inner.flush());
        if let Err(e) = res {
            self.failed = Some(format!("write of frame {} failed: {e}", self.next_seq));
            return Err(e.into());
        }
        let n = Bytes(wire.len() as u64);
        self.limiter.record(n);
        self.header_sent = true;
        self.next_seq += 1;
        self.stats.bytes += n;
        self.stats.frames += 1;
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

/// Framing bytes of a Section frame around its state's payload: frame header, state id,
/// trailer (the stream header comes on top for the first frame of a stream).
pub const SECTION_OVERHEAD: Bytes = Bytes((FRAME_OVERHEAD + 4) as u64);

/// Bytes a control message's frame takes on the wire, the stream header included for a
/// Hello (always the first frame of a stream); `None` if it does not encode.
pub fn control_wire_len(msg: &Control) -> Option<Bytes> {
    let payload = msg.to_frame().encode_payload().ok()?;
    let header = match msg {
        Control::Hello(_) => STREAM_HEADER_LEN as u64,
        _ => 0,
    };
    Some(Bytes(header + (FRAME_OVERHEAD + payload.len()) as u64))
}

impl<W: Write> Outbound for FrameWriter<W> {
    /// Sends `payload` as a Section frame of `state`.
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes> {
        self.check_failed()?;
        check_len(payload.len().saturating_add(4))?;
        let n = self.put(FrameKind::Section as u8, &[&state.to_be_bytes(), payload])?;
        self.stats.section_bytes += Bytes(payload.len() as u64);
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
        SECTION_OVERHEAD + Bytes(header)
    }

    fn control_cost(&self, msg: &Control) -> Bytes {
        let header = match (self.header_sent, msg) {
            (false, m) if !matches!(m, Control::Hello(_)) => STREAM_HEADER_LEN as u64,
            _ => 0,
        };
        control_wire_len(msg).map_or(Bytes(u64::MAX), |n| n + Bytes(header))
    }

    fn bytes_sent(&self) -> Bytes {
        self.stats.bytes
    }
}

/// Reads a migration stream written by [`FrameWriter`], verifying everything the module
/// documentation lists.
#[derive(Debug)]
pub struct FrameReader<R: Read> {
    inner: R,
    max_len: u32,
    version: Option<u32>,
    next_seq: u64,
    offset: u64,
    /// Where the unit being read (stream header or frame) started.
    unit_start: u64,
    failed: Option<FrameError>,
}

/// The result of filling a buffer: how many bytes arrived before EOF.
enum Fill {
    Full,
    Eof(usize),
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
            max_len: max_len.min(MAX_FRAME_LEN),
            version: None,
            next_seq: 0,
            offset: 0,
            unit_start: 0,
            failed: None,
        }
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

    /// Reads until `buf` is full or the stream ends.
    fn fill(&mut self, buf: &mut [u8]) -> io::Result<Fill> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) => return Ok(Fill::Eof(got)),
                Ok(n) => {
                    got += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Fill::Full)
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
                        needed: (STREAM_HEADER_LEN - got) as u64,
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
                    needed: (FRAME_HEADER_LEN - got) as u64,
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
        // The length is checksummed and bounded; still, the buffer grows only as bytes
        // arrive, so a sender that stops early costs no more memory than it sent.
        let len = u64::from(header.len);
        let mut payload = Vec::new();
        let got = (&mut self.inner).take(len).read_to_end(&mut payload);
        self.offset += payload.len() as u64;
        got?;
        if (payload.len() as u64) < len {
            return Err(FrameError::Truncated {
                offset: self.offset,
                what: "frame payload",
                needed: len - payload.len() as u64,
            }
            .into());
        }
        let mut t = [0u8; FRAME_TRAILER_LEN];
        if let Fill::Eof(got) = self.fill(&mut t)? {
            return Err(FrameError::Truncated {
                offset: self.offset,
                what: "frame trailer",
                needed: (FRAME_TRAILER_LEN - got) as u64,
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
        self.next_seq += 1;
        Ok(frame)
    }

    /// Source side: waits for the destination's answer to the switchover.
    ///
    /// # Errors
    /// [`MigrationError::DestinationRefused`] for Refused, [`MigrationError::PeerAborted`]
    /// for Abort, [`MigrationError::Stream`] for any other frame, and the errors of
    /// [`FrameReader::read_frame`].
    pub fn wait_started(&mut self) -> Result<()> {
        match self.read_frame()? {
            Frame::Started => Ok(()),
            Frame::Refused { reason } => Err(MigrationError::DestinationRefused(reason)),
            Frame::Abort { reason } => Err(MigrationError::PeerAborted(reason)),
            other => Err(MigrationError::Stream(format!(
                "expected Started, Refused or Abort, got {:?}",
                other.kind()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::rate::ManualClock;
    use proptest::prelude::*;

    fn hello() -> Frame {
        Frame::Hello(Hello {
            version: STREAM_VERSION,
            page_size: 4096,
            ram_pages: 1 << 20,
            migration_id: 0x0123_4567_89AB_CDEF,
            states: vec![
                StateInfo {
                    id: 1,
                    name: "ram".into(),
                },
                StateInfo {
                    id: 7,
                    name: "dirty-bitmaps".into(),
                },
            ],
        })
    }

    fn all_kinds() -> Vec<Frame> {
        vec![
            hello(),
            Frame::Section {
                state: 1,
                payload: vec![1, 2, 3],
            },
            Frame::Section {
                state: 0xFFFF_FFFF,
                payload: vec![],
            },
            Frame::Switchover { postcopy: false },
            Frame::Switchover { postcopy: true },
            Frame::End,
            Frame::Started,
            Frame::Refused {
                reason: "no room".into(),
            },
            Frame::PageRequest {
                state: 1,
                payload: vec![0; 12],
            },
            Frame::Abort {
                reason: "ünicode".into(),
            },
        ]
    }

    fn encode_all(frames: &[Frame]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        for f in frames {
            w.write_frame(f).unwrap();
        }
        w.into_inner()
    }

    fn frame_err(r: Result<Frame>) -> FrameError {
        match r {
            Err(MigrationError::Frame(e)) => e,
            other => panic!("expected a frame error, got {other:?}"),
        }
    }

    #[test]
    fn every_kind_round_trips() {
        let frames = all_kinds();
        let bytes = encode_all(&frames);
        let mut r = FrameReader::new(&bytes[..]);
        for f in &frames {
            assert_eq!(&r.read_frame().unwrap(), f);
        }
        assert_eq!(r.version(), Some(STREAM_VERSION));
        assert_eq!(r.bytes_read(), Bytes(bytes.len() as u64));
        assert!(matches!(
            frame_err(r.read_frame()),
            FrameError::Closed { frames: 10, .. }
        ));
    }

    #[test]
    fn encoded_sizes_match_the_format() {
        assert_eq!(encode_stream_header(1).len(), 8);
        assert_eq!(encode_frame(0, &Frame::End).unwrap().len(), 24);
        assert_eq!(
            encode_frame(0, &Frame::Switchover { postcopy: true })
                .unwrap()
                .len(),
            25
        );
        // Hello: 26 fixed + (4 + 1 + 3) + (4 + 1 + 13).
        assert_eq!(hello().encode_payload().unwrap().len(), 26 + 8 + 18);
        // The exact bytes of an End frame with seq 5.
        let f = encode_frame(5, &Frame::End).unwrap();
        assert_eq!(&f[..16], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0]);
        assert_eq!(be32(&f[16..]), crc32fast::hash(&f[..16]));
        assert_eq!(be32(&f[20..]), crc32fast::hash(&f[..20]));
        let mut w = FrameWriter::new(Vec::new());
        let n = w.send(3, &[9; 100]).unwrap();
        assert_eq!(n, Bytes(8 + 24 + 4 + 100));
        assert_eq!(w.bytes_sent(), n);
        assert_eq!(w.stats().section_bytes, Bytes(100));
    }

    #[test]
    fn bad_magic() {
        let mut bytes = encode_all(&[Frame::End]);
        bytes[0] = b'X';
        let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
        assert_eq!(e, FrameError::BadMagic { found: 0x5842_4D4D });
    }

    #[test]
    fn unsupported_version() {
        let mut bytes = encode_stream_header(STREAM_VERSION + 1).to_vec();
        bytes.extend(encode_frame(0, &Frame::End).unwrap());
        let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
        assert_eq!(
            e,
            FrameError::UnsupportedVersion {
                found: STREAM_VERSION + 1
            }
        );
        // Version 1 (a Hello without a migration id) is no longer read.
        let e = frame_err(FrameReader::new(&encode_stream_header(1)[..]).read_frame());
        assert_eq!(e, FrameError::UnsupportedVersion { found: 1 });
        let e = frame_err(FrameReader::new(&encode_stream_header(0)[..]).read_frame());
        assert_eq!(e, FrameError::UnsupportedVersion { found: 0 });
    }

    #[test]
    fn header_checksum_catches_a_corrupt_length() {
        let mut bytes = encode_all(&[Frame::Section {
            state: 1,
            payload: vec![0; 16],
        }]);
        bytes[8 + OFF_LEN + 3] ^= 0x01;
        let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
        assert!(
            matches!(e, FrameError::HeaderChecksum { offset: 8, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn payload_checksum() {
        let mut bytes = encode_all(&[Frame::Section {
            state: 1,
            payload: vec![0; 16],
        }]);
        bytes[8 + 20 + 6] ^= 0x80;
        let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
        assert!(
            matches!(
                e,
                FrameError::PayloadChecksum {
                    seq: 0,
                    offset: 8,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn unknown_kind_and_reserved_bits() {
        let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
        bytes.extend(encode_raw_frame(9, 0, &[]));
        let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
        assert_eq!(e, FrameError::UnknownKind { offset: 8, kind: 9 });

        let mut h = raw_header(4, 0, 0);
        h[OFF_RESERVED + 1] = 1;
        let crc = crc32fast::hash(&h[..OFF_HEADER_CRC]);
        h[OFF_HEADER_CRC..].copy_from_slice(&crc.to_be_bytes());
        let e = FrameHeader::decode(&h, 0, MAX_FRAME_LEN).unwrap_err();
        assert_eq!(
            e,
            FrameError::Reserved {
                offset: 0,
                value: 1
            }
        );
    }

    #[test]
    fn oversized_frame_is_refused_before_reading_it() {
        let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
        // A valid header claiming 2^32 - 1 bytes, and nothing behind it.
        bytes.extend(raw_header(2, 0, u32::MAX));
        let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
        assert_eq!(
            e,
            FrameError::Oversized {
                offset: 8,
                len: u32::MAX,
                max: MAX_FRAME_LEN
            }
        );
        let bytes = encode_all(&[Frame::Section {
            state: 1,
            payload: vec![0; 100],
        }]);
        let e = frame_err(FrameReader::with_max_frame_len(&bytes[..], 64).read_frame());
        assert!(matches!(
            e,
            FrameError::Oversized {
                len: 104,
                max: 64,
                ..
            }
        ));
        // The writer refuses to produce one.
        let mut w = FrameWriter::new(Vec::new());
        let big = vec![0u8; MAX_FRAME_LEN as usize];
        assert!(matches!(
            w.send(1, &big),
            Err(MigrationError::InvalidInput(_))
        ));
        assert_eq!(w.stats().bytes, Bytes(0), "a refused frame writes nothing");
    }

    #[test]
    fn truncation_at_every_point() {
        let frames = [
            hello(),
            Frame::Section {
                state: 1,
                payload: vec![5; 40],
            },
            Frame::End,
        ];
        let bytes = encode_all(&frames);
        let mut boundaries = vec![0usize, 8];
        let mut at = 8;
        for (seq, f) in frames.iter().enumerate() {
            at += encode_frame(seq as u64, f).unwrap().len();
            boundaries.push(at);
        }
        for cut in 0..bytes.len() {
            let mut r = FrameReader::new(&bytes[..cut]);
            let mut n = 0;
            let err = loop {
                match r.read_frame() {
                    Ok(f) => {
                        assert_eq!(f, frames[n], "cut at {cut}");
                        n += 1;
                    }
                    Err(e) => break e,
                }
            };
            let MigrationError::Frame(e) = err else {
                panic!("cut at {cut}: {err:?}");
            };
            if boundaries.contains(&cut) {
                assert!(
                    matches!(e, FrameError::Closed { .. }),
                    "cut at {cut}: {e:?}"
                );
            } else {
                assert!(
                    matches!(e, FrameError::Truncated { .. }),
                    "cut at {cut}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn gap_and_replay() {
        let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
        bytes.extend(encode_frame(0, &Frame::End).unwrap());
        bytes.extend(encode_frame(2, &Frame::End).unwrap());
        let mut r = FrameReader::new(&bytes[..]);
        r.read_frame().unwrap();
        let e = frame_err(r.read_frame());
        assert_eq!(
            e,
            FrameError::SequenceGap {
                offset: 32,
                expected: 1,
                found: 2
            }
        );
        // The reader stays failed.
        assert!(matches!(frame_err(r.read_frame()), FrameError::Failed(_)));

        let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
        bytes.extend(encode_frame(0, &Frame::End).unwrap());
        bytes.extend(encode_frame(0, &Frame::End).unwrap());
        let mut r = FrameReader::new(&bytes[..]);
        r.read_frame().unwrap();
        assert!(matches!(
            frame_err(r.read_frame()),
            FrameError::Replay {
                expected: 1,
                found: 0,
                ..
            }
        ));
    }

    #[test]
    fn bad_payloads() {
        for (kind, p) in [
            (FrameKind::End, &[1u8][..]),
            (FrameKind::Started, &[0u8][..]),
            (FrameKind::Switchover, &[2u8][..]),
            (FrameKind::Switchover, &[][..]),
            (FrameKind::Section, &[0u8, 0, 0][..]),
            (FrameKind::Abort, &[0xFFu8][..]),
            (FrameKind::Hello, &[0u8; HELLO_FIXED_LEN - 1][..]),
        ] {
            let e = Frame::decode_payload(kind, p).unwrap_err();
            assert!(
                matches!(e, FrameError::BadPayload { .. }),
                "{kind:?}: {e:?}"
            );
        }
        // A Hello claiming 65535 states in a short payload.
        let mut p = hello().encode_payload().unwrap();
        p[24] = 0xFF;
        p[25] = 0xFF;
        assert!(Frame::decode_payload(FrameKind::Hello, &p).is_err());
        let mut p = hello().encode_payload().unwrap();
        p.push(0);
        assert!(Frame::decode_payload(FrameKind::Hello, &p).is_err());
    }

    /// A channel that times out whenever its script says so, and reads bytes otherwise.
    struct Flaky {
        data: Vec<u8>,
        at: usize,
        /// Read call numbers that time out.
        timeouts: Vec<usize>,
        calls: usize,
        /// Largest read.
        chunk: usize,
    }

    impl Read for Flaky {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            if self.timeouts.contains(&self.calls) {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "timeout"));
            }
            let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn timeout_between_frames_is_retryable_and_inside_one_is_not() {
        let frames = [Frame::Started, Frame::End];
        let data = encode_all(&frames);
        // Reads of at most 8 bytes: call 1 times out before the stream header; then 2 reads
        // the stream header, 3..=5 frame 0's header, 6 its trailer; call 7 times out before
        // frame 1.
        let mut r = FrameReader::new(Flaky {
            data: data.clone(),
            at: 0,
            timeouts: vec![1, 7],
            calls: 0,
            chunk: 8,
        });
        assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
        assert_eq!(r.read_frame().unwrap(), Frame::Started);
        assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
        assert_eq!(r.read_frame().unwrap(), Frame::End);

        // Call 2, right after the stream header, is between units: retryable. Call 8 comes
        // after 8 bytes of frame 1's header: the reader fails.
        let mut r = FrameReader::new(Flaky {
            data,
            at: 0,
            timeouts: vec![2, 8],
            calls: 0,
            chunk: 8,
        });
        assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
        assert_eq!(r.read_frame().unwrap(), Frame::Started);
        assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
        assert!(matches!(
            r.read_frame(),
            Err(MigrationError::Frame(FrameError::Failed(_)))
        ));
    }

    #[test]
    fn write_error_fails_the_writer() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::BrokenPipe, "cut"))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = FrameWriter::new(Broken);
        assert!(matches!(w.send(1, b"x"), Err(MigrationError::Io(_))));
        assert!(matches!(
            w.send(1, b"x"),
            Err(MigrationError::Frame(FrameError::Failed(_)))
        ));
        assert_eq!(w.bytes_sent(), Bytes(0));
    }

    #[test]
    fn switchover_lifts_the_rate_limit() {
        let clock = ManualClock::new();
        let limiter = RateLimiter::with_clock(
            BytesPerMs::from_bytes_per_sec(1000),
            Box::new(clock.clone()),
        );
        let mut w = FrameWriter::with_limiter(Vec::new(), limiter);
        w.send(1, &[0; 200]).unwrap();
        w.send(1, &[0; 200]).unwrap();
        assert!(clock.now() > std::time::Duration::ZERO, "the limiter slept");
        w.send(1, &[0; 200]).unwrap();
        // The window's budget is used: the Switchover frame itself does not wait.
        let t = clock.now();
        w.write_frame(&Frame::Switchover { postcopy: false })
            .unwrap();
        for _ in 0..10 {
            w.send(1, &[0; 200]).unwrap();
        }
        assert_eq!(clock.now(), t, "no sleep after switchover");
        assert_eq!(w.limiter().max_bandwidth(), BytesPerMs::ZERO);
    }

    #[test]
    fn wait_started_maps_answers() {
        let ok = encode_all(&[Frame::Started]);
        FrameReader::new(&ok[..]).wait_started().unwrap();
        let refused = encode_all(&[Frame::Refused {
            reason: "no".into(),
        }]);
        assert!(matches!(
            FrameReader::new(&refused[..]).wait_started(),
            Err(MigrationError::DestinationRefused(r)) if r == "no"
        ));
        let abort = encode_all(&[Frame::Abort {
            reason: "bad".into(),
        }]);
        assert!(matches!(
            FrameReader::new(&abort[..]).wait_started(),
            Err(MigrationError::PeerAborted(r)) if r == "bad"
        ));
        let end = encode_all(&[Frame::End]);
        assert!(matches!(
            FrameReader::new(&end[..]).wait_started(),
            Err(MigrationError::Stream(_))
        ));
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN);
        let bytes = encode_all(&[Frame::Abort { reason }]);
        let Frame::Abort { reason } = FrameReader::new(&bytes[..]).read_frame().unwrap() else {
            panic!("not an abort");
        };
        assert_eq!(reason.len(), MAX_REASON_LEN);
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
        prop_oneof![
            (
                any::<u32>(),
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec((any::<u32>(), "[a-z]{1,12}"), 0..4)
            )
                .prop_map(|(version, page_size, ram_pages, migration_id, s)| {
                    Frame::Hello(Hello {
                        version,
                        page_size,
                        ram_pages,
                        migration_id,
                        states: s
                            .into_iter()
                            .map(|(id, name)| StateInfo { id, name })
                            .collect(),
                    })
                }),
            (any::<u32>(), bytes()).prop_map(|(state, payload)| Frame::Section { state, payload }),
            any::<bool>().prop_map(|postcopy| Frame::Switchover { postcopy }),
            Just(Frame::End),
            Just(Frame::Started),
            ".{0,20}".prop_map(|reason| Frame::Refused { reason }),
            (any::<u32>(), bytes())
                .prop_map(|(state, payload)| Frame::PageRequest { state, payload }),
            ".{0,20}".prop_map(|reason| Frame::Abort { reason }),
        ]
    }

    /// Reads `bytes` to the first error; returns the frames before it.
    fn read_all(bytes: &[u8]) -> (Vec<Frame>, MigrationError) {
        let mut r = FrameReader::new(bytes);
        let mut out = Vec::new();
        loop {
            match r.read_frame() {
                Ok(f) => out.push(f),
                Err(e) => return (out, e),
            }
        }
    }

    proptest! {
        #[test]
        fn round_trip(frames in proptest::collection::vec(arb_frame(), 0..12)) {
            let bytes = encode_all(&frames);
            let (got, err) = read_all(&bytes);
            prop_assert_eq!(&got, &frames);
            let closed = matches!(err, MigrationError::Frame(FrameError::Closed { .. }));
            prop_assert!(closed, "{:?}", err);
        }

        #[test]
        fn single_byte_corruption_is_an_error(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            pos in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let mut bytes = encode_all(&frames);
            let at = pos.index(bytes.len());
            bytes[at] ^= xor;
            let (got, err) = read_all(&bytes);
            // Every frame decoded is the one written, and the damaged one never decodes.
            prop_assert!(got.len() < frames.len(), "corruption at {} went unnoticed", at);
            prop_assert_eq!(&got[..], &frames[..got.len()]);
            let framed = matches!(err, MigrationError::Frame(_));
            prop_assert!(framed, "{:?}", err);
        }

        #[test]
        fn truncation_is_an_error(
            frames in proptest::collection::vec(arb_frame(), 1..8),
            pos in any::<prop::sample::Index>(),
        ) {
            let bytes = encode_all(&frames);
            let cut = pos.index(bytes.len());
            let (got, err) = read_all(&bytes[..cut]);
            prop_assert!(got.len() < frames.len());
            prop_assert_eq!(&got[..], &frames[..got.len()]);
            let short = matches!(
                err,
                MigrationError::Frame(FrameError::Truncated { .. } | FrameError::Closed { .. })
            );
            prop_assert!(short, "{:?}", err);
        }
    }
}
