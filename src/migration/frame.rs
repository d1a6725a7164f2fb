//! The migration stream's frame codec: the stream header, frame headers and trailers, and
//! the payload of every frame kind, with the control messages of the loop ([`Control`])
//! beside the frames they become.
//!
//! Each direction of a migration channel is one stream: an 8-byte stream header (magic and
//! version) followed by frames. A frame is a 20-byte header (kind, sequence number, payload
//! length, and a CRC32 of the header), the payload, and a CRC32 of header and payload. The
//! byte layout is in `docs/FORMAT.md`, section "Migration stream".
//!
//! Pure: no I/O, and no panic on any input (the parser lints below, as in `src/format` and
//! `src/storage`, hold the decoders to it). Every field is read through the checked readers
//! at the end of this file. [`super::stream`] adds the I/O ([`super::stream::FrameWriter`],
//! [`super::stream::FrameReader`]) and the invariants that span frames (sequence numbers,
//! a failed stream stays failed).
//!
//! This module is the bottom of `migration`: it imports nothing from its siblings, and
//! they all build on it.

use crate::units::Bytes;

/// Identifies one migration state (a section of the stream, like a QEMU savevm handler's
/// section id).
pub type StateId = u32;

/// The stream magic, "DBMM" (dirty-bitmap migration).
pub const STREAM_MAGIC: u32 = 0x4442_4D4D;
/// The stream version this crate writes (8: a shared disk's destination answers every
/// BEGIN and whole LOG, following or not, and each LOG it applied, its report carrying the
/// last take applied, and its source does not switch over until BEGIN or the last whole
/// LOG is answered; 7: a shared disk's destination reports whether
/// its preload follows the source's write log, in Report frames during precopy; 6: the
/// Hello says whether the RAM's first pass is incremental ([`Hello::incremental`]); 5 gave a disk bitmap's region entries an
/// encoding, raw or sparse; 4 gave sections sequence numbers and destinations the Report
/// ([`Frame::Report`]) of what they kept from a failed attempt of the same migration).
pub const STREAM_VERSION: u32 = 8;
/// The oldest stream version this crate reads. Version 7's shared-disk destinations
/// answered only a preload that followed the log, in a report without the last take
/// applied; version 6's sources refuse a Report during
/// precopy; version 5's Hello did not say whether the
/// RAM's first pass was incremental; version 4's region entries had no encoding byte;
/// version 3's disk bitmap sections had no sequence number and its destinations no
/// Report; version 2's Hello was bound to nothing but a per-guest id sent in clear. All
/// are refused.
pub const MIN_STREAM_VERSION: u32 = 8;
/// Length of the fixed part of a Hello payload: version (4), page size (4), RAM pages (8),
/// migration id (8), max bandwidth (8), nonce (16), resume (16), incremental (1), state
/// count (2).
pub const HELLO_FIXED_LEN: usize = 67;
/// Length of a Nonce payload.
pub const NONCE_LEN: usize = 16;
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

// Offsets in the frame header, for the tests of `stream/tests.rs` that build damaged
// headers (the codec itself names the fields by destructuring).
#[cfg(test)]
pub(crate) const OFF_RESERVED: usize = 2;
#[cfg(test)]
pub(crate) const OFF_LEN: usize = 12;
#[cfg(test)]
pub(crate) const OFF_HEADER_CRC: usize = 16;

/// Framing bytes of a Section frame around its state's payload: frame header, state id,
/// trailer (the stream header comes on top for the first frame of a stream).
pub const SECTION_OVERHEAD: Bytes = Bytes((FRAME_OVERHEAD + 4) as u64);

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

/// A frame that cannot be encoded: the caller's mistake, not the stream's. The stream and
/// the loop report it as [`super::MigrationError::InvalidInput`] with this message.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A Hello declares more states than its 16-bit count holds.
    #[error("more than 65535 states in Hello")]
    TooManyStates,
    /// A state name in a Hello is empty or longer than 255 bytes.
    #[error("state name {0:?} is not 1..=255 bytes")]
    StateName(String),
    /// A payload longer than [`MAX_FRAME_LEN`].
    #[error("frame payload of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLong {
        /// The payload's length.
        len: usize,
    },
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
    /// Destination → source, its first frame: the nonce this connection's Hello must echo.
    Nonce = 9,
    /// Destination → source: a state's answer to its source's query (what it kept).
    Report = 10,
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
            9 => FrameKind::Nonce,
            10 => FrameKind::Report,
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
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
    /// The rate limit of the source's writer while its guest runs, in bytes per second;
    /// 0 for none. A destination that bounds the time a frame may take allows a frame its
    /// length at this rate (if below its own floor), so a legal low limit with large
    /// sections is not mistaken for a stalled peer.
    pub max_bandwidth: u64,
    /// The nonce the destination issued for this connection ([`Frame::Nonce`]), echoed; 0
    /// on a channel whose destination issues none. A destination that issued one refuses
    /// a Hello that does not echo it, so a recorded attempt cannot be replayed.
    pub nonce: u128,
    /// The kept RAM this attempt continues: the nonce of the first attempt of this
    /// migration to reach this destination (every later attempt names it); 0 to start
    /// afresh. A destination that keeps RAM from a failed attempt reuses it only for a
    /// Hello that names it, and refuses any other Hello without dropping it.
    pub resume: u128,
    /// The RAM's first pass sends only the pages dirtied since an earlier attempt
    /// ([`super::SetupMode::Incremental`]): the rest must already be at the destination,
    /// in the RAM it kept from that attempt. A destination that resumes no kept RAM
    /// refuses such a Hello before any page, since the pages the source will not send
    /// would be missing (in postcopy, after its guest started).
    pub incremental: bool,
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
    /// The destination's first frame on a connection: the nonce the Hello must echo.
    Nonce {
        /// Random, never 0, never reused by the destination.
        nonce: u128,
    },
    /// A state's answer to its source's query, in the state's own format (a stream-mode
    /// disk bitmap: [`super::bitmap_codec::encode_report`]).
    Report {
        /// The state.
        state: StateId,
        /// The state's answer.
        payload: Vec<u8>,
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

/// A control message of the loop: the stream's source frames other than sections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// The first frame of an attempt: what the sections that follow belong to.
    Hello(Hello),
    /// The source guest stopped. Precopy (`postcopy == false`): the last sections and End
    /// follow, and the destination starts at End. Postcopy: the destination starts now.
    Switchover {
        /// Whether the rest is postcopy.
        postcopy: bool,
    },
    /// Every state sent everything.
    End,
    /// The source gives up this attempt; the reason.
    Abort(String),
}

impl Control {
    /// The stream frame of this message.
    pub fn to_frame(&self) -> Frame {
        match self {
            Control::Hello(h) => Frame::Hello(h.clone()),
            Control::Switchover { postcopy } => Frame::Switchover {
                postcopy: *postcopy,
            },
            Control::End => Frame::End,
            Control::Abort(reason) => Frame::Abort {
                reason: reason.clone(),
            },
        }
    }
}

/// Bytes a control message's frame takes on the wire, the stream header included for a
/// Hello (always the first frame of a stream); `None` if it does not encode.
pub fn control_wire_len(msg: &Control) -> Option<Bytes> {
    let payload = msg.to_frame().encode_payload().ok()?;
    let header = match msg {
        Control::Hello(_) => STREAM_HEADER_LEN,
        _ => 0,
    };
    let len = header
        .checked_add(FRAME_OVERHEAD)?
        .checked_add(payload.len())?;
    Some(Bytes(u64::try_from(len).ok()?))
}

/// Encodes the stream header for `version`.
pub fn encode_stream_header(version: u32) -> [u8; STREAM_HEADER_LEN] {
    let [m0, m1, m2, m3] = STREAM_MAGIC.to_be_bytes();
    let [v0, v1, v2, v3] = version.to_be_bytes();
    [m0, m1, m2, m3, v0, v1, v2, v3]
}

/// Decodes a stream header and returns its version.
///
/// # Errors
/// [`FrameError::BadMagic`], or [`FrameError::UnsupportedVersion`] for a version outside
/// [`MIN_STREAM_VERSION`]..=[`STREAM_VERSION`].
pub fn decode_stream_header(h: &[u8; STREAM_HEADER_LEN]) -> Result<u32, FrameError> {
    let [m0, m1, m2, m3, v0, v1, v2, v3] = *h;
    let magic = u32::from_be_bytes([m0, m1, m2, m3]);
    if magic != STREAM_MAGIC {
        return Err(FrameError::BadMagic { found: magic });
    }
    let version = u32::from_be_bytes([v0, v1, v2, v3]);
    if !(MIN_STREAM_VERSION..=STREAM_VERSION).contains(&version) {
        return Err(FrameError::UnsupportedVersion { found: version });
    }
    Ok(version)
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
    ) -> Result<FrameHeader, FrameError> {
        // The layout, by name: kind, flags, reserved (2), seq (8), len (4), header CRC (4).
        let [kind, flags, r0, r1, s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, l2, l3, c0, c1, c2, c3] =
            *h;
        let stored = u32::from_be_bytes([c0, c1, c2, c3]);
        let computed = crc32fast::hash(&[
            kind, flags, r0, r1, s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, l2, l3,
        ]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum {
                offset,
                stored,
                computed,
            });
        }
        let reserved = (u32::from(flags) << 16) | u32::from(u16::from_be_bytes([r0, r1]));
        if reserved != 0 {
            return Err(FrameError::Reserved {
                offset,
                value: reserved,
            });
        }
        let kind = FrameKind::from_u8(kind).ok_or(FrameError::UnknownKind { offset, kind })?;
        let len = u32::from_be_bytes([l0, l1, l2, l3]);
        if len > max_len {
            return Err(FrameError::Oversized {
                offset,
                len,
                max: max_len,
            });
        }
        Ok(FrameHeader {
            kind,
            seq: u64::from_be_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
            len,
        })
    }

    /// Encodes the header with its checksum. The caller guarantees `len` fits the protocol.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        raw_header(self.kind as u8, self.seq, self.len)
    }
}

/// A header with any kind byte (the tests build unknown kinds with it).
pub(crate) fn raw_header(kind: u8, seq: u64, len: u32) -> [u8; FRAME_HEADER_LEN] {
    let [s0, s1, s2, s3, s4, s5, s6, s7] = seq.to_be_bytes();
    let [l0, l1, l2, l3] = len.to_be_bytes();
    // Flags and reserved bytes are zero.
    let body = [
        kind, 0, 0, 0, s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, l2, l3,
    ];
    let [c0, c1, c2, c3] = crc32fast::hash(&body).to_be_bytes();
    [
        kind, 0, 0, 0, s0, s1, s2, s3, s4, s5, s6, s7, l0, l1, l2, l3, c0, c1, c2, c3,
    ]
}

/// The trailer checksum: CRC32 of the frame header and the payload parts.
pub(crate) fn payload_crc(header: &[u8; FRAME_HEADER_LEN], parts: &[&[u8]]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(header);
    for p in parts {
        c.update(p);
    }
    c.finalize()
}

/// Encodes a frame of `kind` whose payload is the concatenation of `parts`, with sequence
/// number `seq`. The caller checked the total with [`check_len`].
pub(crate) fn encode_raw(kind: u8, seq: u64, parts: &[&[u8]]) -> Vec<u8> {
    let len = parts
        .iter()
        .fold(0usize, |acc, p| acc.saturating_add(p.len()));
    let header = raw_header(kind, seq, u32::try_from(len).unwrap_or(u32::MAX));
    let mut out = Vec::with_capacity(FRAME_OVERHEAD.saturating_add(len));
    out.extend_from_slice(&header);
    for p in parts {
        out.extend_from_slice(p);
    }
    out.extend_from_slice(&payload_crc(&header, parts).to_be_bytes());
    out
}

/// `len` as a frame length, if the protocol allows it.
///
/// # Errors
/// [`EncodeError::TooLong`] above [`MAX_FRAME_LEN`].
pub(crate) fn check_len(len: usize) -> Result<u32, EncodeError> {
    u32::try_from(len)
        .ok()
        .filter(|&l| l <= MAX_FRAME_LEN)
        .ok_or(EncodeError::TooLong { len })
}

/// Cuts a reason string to [`MAX_REASON_LEN`] bytes at a character boundary.
fn cut_reason(reason: &str) -> &str {
    if reason.len() <= MAX_REASON_LEN {
        return reason;
    }
    // The longest prefix of whole characters within the limit: the last character start
    // at or below it (the string is longer, so the limit is not its end).
    let end = reason
        .char_indices()
        .map(|(i, _)| i)
        .take_while(|&i| i <= MAX_REASON_LEN)
        .last()
        .unwrap_or(0);
    reason.get(..end).unwrap_or_default()
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
            Frame::Nonce { .. } => FrameKind::Nonce,
            Frame::Report { .. } => FrameKind::Report,
        }
    }

    /// Encodes the payload.
    ///
    /// # Errors
    /// [`EncodeError::TooManyStates`] for a Hello with more than 65535 states,
    /// [`EncodeError::StateName`] for one whose state names are empty or longer than 255
    /// bytes.
    pub fn encode_payload(&self) -> Result<Vec<u8>, EncodeError> {
        Ok(match self {
            Frame::Hello(h) => {
                let n = u16::try_from(h.states.len()).map_err(|_| EncodeError::TooManyStates)?;
                let mut p = Vec::with_capacity(
                    HELLO_FIXED_LEN.saturating_add(h.states.len().saturating_mul(8)),
                );
                p.extend_from_slice(&h.version.to_be_bytes());
                p.extend_from_slice(&h.page_size.to_be_bytes());
                p.extend_from_slice(&h.ram_pages.to_be_bytes());
                p.extend_from_slice(&h.migration_id.to_be_bytes());
                p.extend_from_slice(&h.max_bandwidth.to_be_bytes());
                p.extend_from_slice(&h.nonce.to_be_bytes());
                p.extend_from_slice(&h.resume.to_be_bytes());
                p.push(u8::from(h.incremental));
                p.extend_from_slice(&n.to_be_bytes());
                for s in &h.states {
                    let len = u8::try_from(s.name.len())
                        .ok()
                        .filter(|&l| l > 0)
                        .ok_or_else(|| EncodeError::StateName(s.name.clone()))?;
                    p.extend_from_slice(&s.id.to_be_bytes());
                    p.push(len);
                    p.extend_from_slice(s.name.as_bytes());
                }
                p
            }
            Frame::Section { state, payload }
            | Frame::PageRequest { state, payload }
            | Frame::Report { state, payload } => {
                let mut p = Vec::with_capacity(payload.len().saturating_add(4));
                p.extend_from_slice(&state.to_be_bytes());
                p.extend_from_slice(payload);
                p
            }
            Frame::Switchover { postcopy } => vec![u8::from(*postcopy)],
            Frame::End | Frame::Started => Vec::new(),
            Frame::Refused { reason } | Frame::Abort { reason } => {
                cut_reason(reason).as_bytes().to_vec()
            }
            Frame::Nonce { nonce } => nonce.to_be_bytes().to_vec(),
        })
    }

    /// Decodes the payload of a frame of `kind`. The whole payload must be used.
    ///
    /// # Errors
    /// [`FrameError::BadPayload`] naming the kind and what is wrong.
    pub fn decode_payload(kind: FrameKind, p: &[u8]) -> Result<Frame, FrameError> {
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
            FrameKind::Hello => Frame::Hello(decode_hello(p)?),
            FrameKind::Section | FrameKind::PageRequest | FrameKind::Report => {
                let what = match kind {
                    FrameKind::Section => "Section",
                    FrameKind::PageRequest => "PageRequest",
                    _ => "Report",
                };
                let Some((state, payload)) = p.split_first_chunk::<4>() else {
                    return Err(bad(what, "shorter than its 4-byte state id"));
                };
                let state = u32::from_be_bytes(*state);
                let payload = payload.to_vec();
                match kind {
                    FrameKind::Section => Frame::Section { state, payload },
                    FrameKind::PageRequest => Frame::PageRequest { state, payload },
                    _ => Frame::Report { state, payload },
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
            FrameKind::Nonce => Frame::Nonce {
                nonce: be_u128(p, 0)
                    .filter(|_| p.len() == NONCE_LEN)
                    .ok_or_else(|| bad("Nonce", "not exactly 16 bytes"))?,
            },
        })
    }
}

/// Decodes a Hello payload: the fixed part, then `count` states of id (4), name length (1)
/// and name, and nothing after them.
fn decode_hello(p: &[u8]) -> Result<Hello, FrameError> {
    let bad = |reason: &str| FrameError::payload("Hello", reason);
    let short = || bad("shorter than its fixed part");
    if p.len() < HELLO_FIXED_LEN {
        return Err(short());
    }
    let version = be_u32(p, 0).ok_or_else(short)?;
    let page_size = be_u32(p, 4).ok_or_else(short)?;
    let ram_pages = be_u64(p, 8).ok_or_else(short)?;
    let migration_id = be_u64(p, 16).ok_or_else(short)?;
    let max_bandwidth = be_u64(p, 24).ok_or_else(short)?;
    let nonce = be_u128(p, 32).ok_or_else(short)?;
    let resume = be_u128(p, 48).ok_or_else(short)?;
    let incremental = match be_u8(p, 64).ok_or_else(short)? {
        0 => false,
        1 => true,
        _ => return Err(bad("incremental is not 0 or 1")),
    };
    let n = usize::from(be_u16(p, 65).ok_or_else(short)?);
    // Each state takes at least 6 bytes: bound the allocation by the payload.
    if n > p.len().saturating_sub(HELLO_FIXED_LEN) / 6 {
        return Err(bad("more states than the payload can hold"));
    }
    let mut states = Vec::with_capacity(n);
    let mut at = HELLO_FIXED_LEN;
    for _ in 0..n {
        let Some(fixed) = field(p, at, 5) else {
            return Err(bad("state list cut short"));
        };
        let (Some(id), Some(len)) = (be_u32(fixed, 0), be_u8(fixed, 4)) else {
            return Err(bad("state list cut short"));
        };
        let len = usize::from(len);
        if len == 0 {
            return Err(bad("empty state name"));
        }
        // `at + 5` is in the payload: `field` just read up to it.
        let name_at = at.saturating_add(5);
        let Some(name) = field(p, name_at, len) else {
            return Err(bad("state name cut short"));
        };
        let name = std::str::from_utf8(name).map_err(|_| bad("state name is not UTF-8"))?;
        states.push(StateInfo {
            id,
            name: name.to_owned(),
        });
        at = name_at.saturating_add(len);
    }
    if at != p.len() {
        return Err(bad("trailing bytes after the state list"));
    }
    Ok(Hello {
        version,
        page_size,
        ram_pages,
        migration_id,
        max_bandwidth,
        nonce,
        resume,
        incremental,
        states,
    })
}

/// Encodes `frame` with sequence number `seq`: header, payload, trailer.
///
/// # Errors
/// [`EncodeError`] if the payload does not encode or is longer than [`MAX_FRAME_LEN`].
pub fn encode_frame(seq: u64, frame: &Frame) -> Result<Vec<u8>, EncodeError> {
    let payload = frame.encode_payload()?;
    check_len(payload.len())?;
    Ok(encode_raw(frame.kind() as u8, seq, &[&payload]))
}

/// Encodes a frame with any kind byte and correct checksums, for tests of the reader and the
/// fuzz harnesses (feature `testing`): never part of what the library sends.
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub fn encode_raw_frame(kind: u8, seq: u64, payload: &[u8]) -> Vec<u8> {
    encode_raw(kind, seq, &[payload])
}

// Checked big-endian readers, as `src/format/bytes.rs` has them for the qcow2 codecs: a
// field that does not fit is `None`, never a panic.

/// `bytes[at..at + len]`, or `None` if that range is not inside `bytes`.
pub(crate) fn field(bytes: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    bytes.get(at..at.checked_add(len)?)
}

/// The byte at `at`.
pub(crate) fn be_u8(bytes: &[u8], at: usize) -> Option<u8> {
    bytes.get(at).copied()
}

/// The big-endian u16 at `at`.
pub(crate) fn be_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(field(bytes, at, 2)?.try_into().ok()?))
}

/// The big-endian u32 at `at`.
pub(crate) fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(field(bytes, at, 4)?.try_into().ok()?))
}

/// The big-endian u64 at `at`.
pub(crate) fn be_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(field(bytes, at, 8)?.try_into().ok()?))
}

/// The big-endian u128 at `at`.
pub(crate) fn be_u128(bytes: &[u8], at: usize) -> Option<u128> {
    Some(u128::from_be_bytes(field(bytes, at, 16)?.try_into().ok()?))
}
