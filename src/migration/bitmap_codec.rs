//! The payloads of a disk bitmap's sections in the migration stream (stream mode: the
//! destination has its own image, and the bitmap's changed regions travel as RAM pages do),
//! and of the destination's Report.
//!
//! Pure codecs: no I/O, no panic on any payload, allocation bounded by the payload length;
//! every field is read through the checked readers of `frame.rs`. The byte layout
//! (big-endian) is in `docs/FORMAT.md`, section "Migration stream":
//!
//! | kind (1) | bitmap index (2) | sequence (8) | body |
//! |---|---|---|---|
//! | 1 START | index | seq | stream id (8), granularity bits (1), flags (1: bit 0 enabled), disk size (8), region size (4), name length (2), name |
//! | 2 REGIONS | index | seq | count (4), then per region: region number (8), encoding (1), length (4), body |
//! | 3 COMPLETE | index | seq | flags (1: bit 0, regions may follow the start) |
//! | 4 QUERY | 0 | 0 | stream id (8) |
//!
//! A REGIONS entry *replaces* the destination's copy of the region (a `clear` on the
//! source removes bits, so an OR would keep them). Its body is the region's serialized
//! bytes ([`ENCODING_RAW`]) or, when shorter, only its non-zero bytes ([`ENCODING_SPARSE`]:
//! per non-zero byte, the count of zero bytes skipped before it as a LEB128 varint of at
//! most 3 bytes, then the byte). A region of a disk written here and there holds a few
//! bits among thousands, so its sparse body is tens of bytes against the raw kilobytes. The sequence number counts the state's
//! sections (1, 2, ... across every attempt of a migration, never reused): the destination
//! applies sections whole and in order, so "every section up to `n`" names exactly what it
//! holds. The stream id is random per source state: numbers mean something only between
//! the source that chose them and what the destination kept of that source's sections.
//! QUERY asks the destination for that `n` (its Report: [`encode_report`]).

use super::error::Result;
use super::frame::{be_u16, be_u32, be_u64, be_u8, field, FrameError};

/// The kind byte of a START section.
pub const KIND_START: u8 = 1;
/// The kind byte of a REGIONS section.
pub const KIND_REGIONS: u8 = 2;
/// The kind byte of a COMPLETE section.
pub const KIND_COMPLETE: u8 = 3;
/// The kind byte of a QUERY section: the source asks what the destination kept.
pub const KIND_QUERY: u8 = 4;
/// Bytes of every section before its body: kind (1), index (2), sequence (8).
pub const HEADER_LEN: usize = 11;
/// Bytes of a Report payload: the last sequence number applied.
pub const REPORT_LEN: usize = 8;
/// Bytes of a START body before the name.
pub const START_LEN: usize = 24;
/// Bytes of a QUERY body: the stream id.
pub const QUERY_LEN: usize = 8;
/// Bytes of a COMPLETE body: its flags ([`FLAG_MORE`]).
pub const COMPLETE_LEN: usize = 1;
/// Bytes of a REGIONS body before the first entry: the count.
pub const REGIONS_HEADER_LEN: usize = 4;
/// Bytes of a region entry before its body: region number (8), encoding (1), length (4).
pub const REGION_ENTRY_LEN: usize = 13;
/// A region entry's encoding: the body is the region's serialized bytes.
pub const ENCODING_RAW: u8 = 0;
/// A region entry's encoding: the body is the region's non-zero bytes, each after the
/// count of zero bytes before it (since the region's start, or since the byte before it)
/// as a minimal LEB128 varint of at most [`MAX_GAP_BYTES`] bytes.
pub const ENCODING_SPARSE: u8 = 1;
/// The longest varint of a sparse body: gaps below 2^21 (regions are at most 2 MiB).
pub const MAX_GAP_BYTES: usize = 3;
/// The longest bitmap name (qcow2's limit).
pub const MAX_NAME_LEN: usize = 1023;
/// Flag bit of a START: the bitmap records writes (qcow2's `auto`).
pub const FLAG_ENABLED: u8 = 0x01;
/// Flag bit of a COMPLETE: regions of the bitmap may still follow, after the destination
/// started (a postcopy push).
pub const FLAG_MORE: u8 = 0x01;

/// A bitmap's identity, sent before any of its regions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Its index among the state's bitmaps.
    pub index: u16,
    /// The source stream's id (random per source state, never 0): what the destination
    /// keeps of this bitmap is resumed only by a QUERY of the same stream.
    pub stream: u64,
    /// Its name (1..=1023 bytes).
    pub name: String,
    /// log2 of its granularity.
    pub granularity_bits: u8,
    /// Whether it records writes.
    pub enabled: bool,
    /// The disk size it covers.
    pub disk_size: u64,
    /// Its change-map region size in bytes of serialized bitmap.
    pub region_size: u32,
}

/// One decoded section: its sequence number and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section<'a> {
    /// Its sequence number among the state's sections (0 for a QUERY).
    pub seq: u64,
    /// What it says.
    pub body: BitmapSection<'a>,
}

/// What one section says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapSection<'a> {
    /// A bitmap's identity.
    Start(Start),
    /// Regions of bitmap `index`, each `(region number, body)`.
    Regions {
        /// The bitmap.
        index: u16,
        /// The regions, in the order sent.
        regions: Vec<(u64, RegionBody<'a>)>,
    },
    /// Every region of bitmap `index` was sent, or with `more`, every region that must
    /// precede the destination's start (the rest follows it).
    Complete {
        /// The bitmap.
        index: u16,
        /// Regions may follow the start.
        more: bool,
    },
    /// The source asks what the destination kept of this migration's earlier attempts.
    Query {
        /// The source stream's id (as its STARTs carry).
        stream: u64,
    },
}

fn bad(reason: impl Into<String>) -> FrameError {
    FrameError::payload("bitmap", reason)
}

/// The header of a section: kind, index, sequence number.
fn header(kind: u8, index: u16, seq: u64, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN.saturating_add(body));
    out.push(kind);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out
}

/// Encodes a START section, number `seq`.
///
/// # Panics
/// Never for a name of at most [`MAX_NAME_LEN`] bytes; a longer one is cut (the caller
/// checked it: qcow2 names are never longer).
pub fn encode_start(s: &Start, seq: u64) -> Vec<u8> {
    let name = s.name.as_bytes();
    let name = name.get(..name.len().min(MAX_NAME_LEN)).unwrap_or_default();
    let mut out = header(KIND_START, s.index, seq, START_LEN.saturating_add(name.len()));
    out.extend_from_slice(&s.stream.to_be_bytes());
    out.push(s.granularity_bits);
    out.push(if s.enabled { FLAG_ENABLED } else { 0 });
    out.extend_from_slice(&s.disk_size.to_be_bytes());
    out.extend_from_slice(&s.region_size.to_be_bytes());
    out.extend_from_slice(&(name.len() as u16).to_be_bytes());
    out.extend_from_slice(name);
    out
}

/// A REGIONS section for bitmap `index`, number `seq`, to be filled with [`push_region`]
/// and closed with [`finish_regions`].
pub fn begin_regions(index: u16, seq: u64) -> Vec<u8> {
    let mut out = header(KIND_REGIONS, index, seq, REGIONS_HEADER_LEN);
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// One region's body as a REGIONS entry carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionBody<'a> {
    /// The region's serialized bytes ([`ENCODING_RAW`]).
    Raw(&'a [u8]),
    /// Its non-zero bytes with the gaps before them ([`ENCODING_SPARSE`]), unchecked.
    Sparse(&'a [u8]),
}

impl RegionBody<'_> {
    /// Checks that the body describes a region of `len` bytes, without writing anything:
    /// a raw body of exactly `len` bytes, or a sparse one whose varints are minimal and at
    /// most [`MAX_GAP_BYTES`] long, whose bytes are non-zero and whose offsets stay below
    /// `len`.
    ///
    /// # Errors
    /// [`FrameError::BadPayload`] naming the fault.
    pub fn check(&self, len: usize) -> Result<()> {
        self.walk(len, |_, _| {})
    }

    /// Writes the region into `out` (its length is the region's): every byte the body
    /// does not set is zero.
    ///
    /// # Errors
    /// As [`check`](Self::check) with `out.len()`; `out` is then partly written.
    pub fn expand(&self, out: &mut [u8]) -> Result<()> {
        if let RegionBody::Raw(b) = self {
            if b.len() == out.len() {
                out.copy_from_slice(b);
                return Ok(());
            }
        }
        out.fill(0);
        let len = out.len();
        self.walk(len, |at, byte| {
            if let Some(o) = out.get_mut(at) {
                *o = byte;
            }
        })
    }

    /// Calls `f(offset, byte)` for every byte a sparse body sets (for a raw body, only
    /// checks its length), after checking it as [`check`](Self::check) does.
    fn walk(&self, len: usize, mut f: impl FnMut(usize, u8)) -> Result<()> {
        let body = match *self {
            RegionBody::Raw(b) if b.len() == len => return Ok(()),
            RegionBody::Raw(b) => {
                return Err(bad(format!("a raw region of {} bytes, not {len}", b.len())).into())
            }
            RegionBody::Sparse(b) => b,
        };
        let mut it = body.iter().copied();
        let mut next = 0usize;
        while let Some(first) = it.next() {
            let gap = read_gap(first, &mut it)?;
            let byte = it
                .next()
                .ok_or_else(|| bad("a sparse gap without its byte"))?;
            if byte == 0 {
                return Err(bad("a zero byte in a sparse region").into());
            }
            let offset = next.saturating_add(gap);
            if offset >= len {
                return Err(bad(format!("a sparse byte at {offset}, past the region's {len}")).into());
            }
            f(offset, byte);
            next = offset.saturating_add(1);
        }
        Ok(())
    }
}

/// The bit shift of each byte of a gap's varint.
const GAP_SHIFTS: [u32; MAX_GAP_BYTES] = [0, 7, 14];
/// The first gap too long for a varint of [`MAX_GAP_BYTES`] bytes.
const GAP_LIMIT: usize = 1 << 21;

/// A minimal LEB128 varint of at most [`MAX_GAP_BYTES`] bytes, `first` and then what
/// `rest` holds: its value.
fn read_gap(first: u8, rest: &mut impl Iterator<Item = u8>) -> Result<usize> {
    let mut v = 0usize;
    let mut byte = first;
    for (i, shift) in GAP_SHIFTS.into_iter().enumerate() {
        if i > 0 {
            byte = rest.next().ok_or_else(|| bad("a truncated sparse gap"))?;
        }
        v |= usize::from(byte & 0x7F).checked_shl(shift).unwrap_or(0);
        if byte & 0x80 == 0 {
            if i > 0 && byte == 0 {
                return Err(bad("a sparse gap not in its shortest form").into());
            }
            return Ok(v);
        }
    }
    Err(bad(format!("a sparse gap longer than {MAX_GAP_BYTES} bytes")).into())
}

fn push_gap(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push(((v % 0x80) as u8) | 0x80);
        v /= 0x80;
    }
    out.push(v as u8);
}

/// The sparse body of the region `bytes` into `out` (cleared first), given up (returns
/// `false`) as soon as it would not be shorter than the raw bytes.
fn sparse_into(bytes: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    if bytes.len() > GAP_LIMIT {
        return false;
    }
    let mut next = 0usize;
    for (c, chunk) in bytes.chunks(8).enumerate() {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        for (j, &b) in chunk.iter().enumerate() {
            if b != 0 {
                let at = c.saturating_mul(8).saturating_add(j);
                push_gap(out, at.saturating_sub(next));
                out.push(b);
                next = at.saturating_add(1);
                if out.len() >= bytes.len() {
                    return false;
                }
            }
        }
    }
    out.len() < bytes.len()
}

/// Appends region `region`, whose serialized bytes are `bytes`, to a section from
/// [`begin_regions`]: sparse if that is shorter, raw otherwise. `scratch` is a buffer
/// the caller keeps between calls. Returns the entry's length, header included.
pub fn push_region(section: &mut Vec<u8>, region: u64, bytes: &[u8], scratch: &mut Vec<u8>) -> u64 {
    if sparse_into(bytes, scratch) {
        push_entry(section, region, ENCODING_SPARSE, scratch)
    } else {
        push_region_raw(section, region, bytes)
    }
}

/// Appends region `region` raw (its serialized `bytes`), whatever they hold: QEMU's
/// whole-bitmap sections, for the benchmark baseline. Returns the entry's length.
pub fn push_region_raw(section: &mut Vec<u8>, region: u64, bytes: &[u8]) -> u64 {
    push_entry(section, region, ENCODING_RAW, bytes)
}

/// Appends region `region` with `body` as it is (a decoded entry, re-encoded byte for
/// byte). Returns the entry's length.
pub fn push_region_body(section: &mut Vec<u8>, region: u64, body: RegionBody<'_>) -> u64 {
    match body {
        RegionBody::Raw(b) => push_entry(section, region, ENCODING_RAW, b),
        RegionBody::Sparse(b) => push_entry(section, region, ENCODING_SPARSE, b),
    }
}

fn push_entry(section: &mut Vec<u8>, region: u64, encoding: u8, body: &[u8]) -> u64 {
    section.extend_from_slice(&region.to_be_bytes());
    section.push(encoding);
    section.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    section.extend_from_slice(body);
    entry_len(body.len())
}

fn entry_len(body: usize) -> u64 {
    (REGION_ENTRY_LEN as u64).saturating_add(body as u64)
}

/// The length [`push_region`] gives the entry of a region whose serialized bytes are
/// `bytes`, header included.
pub fn region_entry_len(bytes: &[u8], scratch: &mut Vec<u8>) -> u64 {
    entry_len(if sparse_into(bytes, scratch) {
        scratch.len()
    } else {
        bytes.len()
    })
}

/// Writes the count of `n` regions into a section from [`begin_regions`].
pub fn finish_regions(section: &mut [u8], n: u32) {
    if let Some(c) = section.get_mut(HEADER_LEN..HEADER_LEN.saturating_add(REGIONS_HEADER_LEN)) {
        c.copy_from_slice(&n.to_be_bytes());
    }
}

/// Encodes a COMPLETE section, number `seq`; with `more`, regions may follow the start.
pub fn encode_complete(index: u16, seq: u64, more: bool) -> Vec<u8> {
    let mut out = header(KIND_COMPLETE, index, seq, COMPLETE_LEN);
    out.push(if more { FLAG_MORE } else { 0 });
    out
}

/// Encodes a QUERY section of stream `stream`.
pub fn encode_query(stream: u64) -> Vec<u8> {
    let mut out = header(KIND_QUERY, 0, 0, QUERY_LEN);
    out.extend_from_slice(&stream.to_be_bytes());
    out
}

/// Encodes the destination's Report: every section of the state up to number `applied`
/// that the source sent is applied here (0: it holds nothing of the migration).
pub fn encode_report(applied: u64) -> Vec<u8> {
    applied.to_be_bytes().to_vec()
}

/// Decodes a Report.
///
/// # Errors
/// [`FrameError::BadPayload`] unless it is exactly [`REPORT_LEN`] bytes.
pub fn decode_report(payload: &[u8]) -> Result<u64> {
    be_u64(payload, 0)
        .filter(|_| payload.len() == REPORT_LEN)
        .ok_or_else(|| bad(format!("a Report of {} bytes, not {REPORT_LEN}", payload.len())).into())
}

/// Decodes one section. Checks the framing only; whether a region fits its bitmap is the
/// receiver's check.
///
/// # Errors
/// [`FrameError::BadPayload`] for a truncated or over-long payload, an unknown kind, an
/// empty, over-long or non-UTF-8 name, a granularity outside 9..=31, a zero region size,
/// a region entry whose length runs past the payload, a sequence number of 0 on a START,
/// REGIONS or COMPLETE, a QUERY with an index or sequence number, or a stream id of 0.
pub fn decode(payload: &[u8]) -> Result<Section<'_>> {
    let kind = be_u8(payload, 0).ok_or_else(|| bad("empty payload"))?;
    let index = be_u16(payload, 1).ok_or_else(|| bad("truncated header"))?;
    let seq = be_u64(payload, 3).ok_or_else(|| bad("truncated header"))?;
    let body = payload.get(HEADER_LEN..).unwrap_or_default();
    if kind == KIND_QUERY {
        let stream = be_u64(body, 0)
            .filter(|&s| s != 0 && body.len() == QUERY_LEN)
            .ok_or_else(|| bad("a QUERY body is a stream id (8 bytes, not 0)"))?;
        if index != 0 || seq != 0 {
            return Err(bad("a QUERY has no index or sequence number").into());
        }
        return Ok(Section {
            seq,
            body: BitmapSection::Query { stream },
        });
    }
    if seq == 0 {
        return Err(bad(format!("section kind {kind} numbered 0")).into());
    }
    let body = match kind {
        KIND_START => decode_start(index, body).map(BitmapSection::Start)?,
        KIND_REGIONS => decode_regions(index, body)?,
        KIND_COMPLETE => match body {
            [flags] if flags & !FLAG_MORE == 0 => BitmapSection::Complete {
                index,
                more: flags & FLAG_MORE != 0,
            },
            _ => return Err(bad("a COMPLETE body is one flags byte, bit 0 at most").into()),
        },
        k => return Err(bad(format!("unknown bitmap section kind {k}")).into()),
    };
    Ok(Section { seq, body })
}

fn decode_start(index: u16, body: &[u8]) -> Result<Start> {
    let short = || bad("truncated START");
    let stream = be_u64(body, 0).ok_or_else(short)?;
    let granularity_bits = be_u8(body, 8).ok_or_else(short)?;
    let flags = be_u8(body, 9).ok_or_else(short)?;
    let disk_size = be_u64(body, 10).ok_or_else(short)?;
    let region_size = be_u32(body, 18).ok_or_else(short)?;
    let name_len = usize::from(be_u16(body, 22).ok_or_else(short)?);
    if stream == 0 {
        return Err(bad("stream id 0").into());
    }
    if !(9..=31).contains(&granularity_bits) {
        return Err(bad(format!("granularity bits {granularity_bits} not in 9..=31")).into());
    }
    if flags & !FLAG_ENABLED != 0 {
        return Err(bad(format!("reserved START flags {flags:#04x}")).into());
    }
    if region_size == 0 {
        return Err(bad("region size 0").into());
    }
    if name_len == 0 || name_len > MAX_NAME_LEN {
        return Err(bad(format!("name length {name_len} not in 1..={MAX_NAME_LEN}")).into());
    }
    let name = field(body, START_LEN, name_len).ok_or_else(short)?;
    if body.len() != START_LEN.saturating_add(name_len) {
        return Err(bad("bytes after the START name").into());
    }
    let name = std::str::from_utf8(name)
        .map_err(|_| bad("name is not UTF-8"))?
        .to_owned();
    Ok(Start {
        index,
        stream,
        name,
        granularity_bits,
        enabled: flags & FLAG_ENABLED != 0,
        disk_size,
        region_size,
    })
}

fn decode_regions(index: u16, body: &[u8]) -> Result<BitmapSection<'_>> {
    let count = be_u32(body, 0).ok_or_else(|| bad("truncated REGIONS"))?;
    let mut at = REGIONS_HEADER_LEN;
    // Each entry takes at least its 13 header bytes (`REGION_ENTRY_LEN`), so the count cannot ask for more
    // entries than the payload can hold.
    let room = body.len().saturating_sub(at) / REGION_ENTRY_LEN;
    if usize::try_from(count).map_or(true, |c| c > room) {
        return Err(bad(format!("{count} regions do not fit {} bytes", body.len())).into());
    }
    let mut regions = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    for _ in 0..count {
        let short = || bad("truncated region entry");
        let region = be_u64(body, at).ok_or_else(short)?;
        let encoding = be_u8(body, at.saturating_add(8)).ok_or_else(short)?;
        let len = usize::try_from(be_u32(body, at.saturating_add(9)).ok_or_else(short)?)
            .map_err(|_| short())?;
        let start = at.saturating_add(REGION_ENTRY_LEN);
        let bytes = field(body, start, len).ok_or_else(short)?;
        let b = match encoding {
            ENCODING_RAW => RegionBody::Raw(bytes),
            ENCODING_SPARSE => RegionBody::Sparse(bytes),
            e => return Err(bad(format!("unknown region encoding {e}")).into()),
        };
        regions.push((region, b));
        at = start.saturating_add(len);
    }
    if at != body.len() {
        return Err(bad("bytes after the last region").into());
    }
    Ok(BitmapSection::Regions { index, regions })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> Start {
        Start {
            index: 3,
            stream: 0xABCD,
            name: "backup-1".into(),
            granularity_bits: 16,
            enabled: true,
            disk_size: 16 << 40,
            region_size: 4096,
        }
    }

    #[test]
    fn sections_round_trip() {
        let s = start();
        assert_eq!(
            decode(&encode_start(&s, 1)).unwrap(),
            Section {
                seq: 1,
                body: BitmapSection::Start(s.clone())
            }
        );
        let mut r = begin_regions(3, 2);
        let mut scratch = Vec::new();
        push_region(&mut r, 7, &[1, 2, 3], &mut scratch);
        push_region(&mut r, 9, &[], &mut scratch);
        let mut sparse = vec![0u8; 4096];
        sparse[5] = 0x10;
        sparse[300] = 0x81;
        sparse[4095] = 1;
        assert_eq!(push_region(&mut r, 11, &sparse, &mut scratch), 13 + 8);
        finish_regions(&mut r, 3);
        let section = decode(&r).unwrap();
        assert_eq!(section.seq, 2);
        let BitmapSection::Regions { index: 3, regions } = section.body else {
            panic!("{section:?}");
        };
        assert_eq!(regions[0], (7, RegionBody::Raw(&[1u8, 2, 3][..])));
        assert_eq!(regions[1], (9, RegionBody::Raw(&[][..])));
        // 5 zero bytes, 0x10; 294 (a two-byte varint), 0x81; 3794 (two bytes), 1.
        assert_eq!(
            regions[2],
            (11, RegionBody::Sparse(&[5, 0x10, 0xA6, 0x02, 0x81, 0xD2, 0x1D, 1][..]))
        );
        let mut back = vec![0xEEu8; 4096];
        regions[2].1.expand(&mut back).unwrap();
        assert_eq!(back, sparse);
        // A region of all ones, or one with too many bytes set, goes raw.
        for dense in [vec![0xFFu8; 4096], (0..4096).map(|i| u8::from(i % 3 != 0)).collect()] {
            let mut r = begin_regions(0, 1);
            assert_eq!(push_region(&mut r, 0, &dense, &mut scratch), 13 + 4096);
        }
        for more in [false, true] {
            assert_eq!(
                decode(&encode_complete(3, u64::MAX, more)).unwrap(),
                Section {
                    seq: u64::MAX,
                    body: BitmapSection::Complete { index: 3, more }
                }
            );
        }
        assert_eq!(
            decode(&encode_query(u64::MAX)).unwrap(),
            Section {
                seq: 0,
                body: BitmapSection::Query { stream: u64::MAX }
            }
        );
        for n in [0, 1, 1 << 40, u64::MAX] {
            assert_eq!(decode_report(&encode_report(n)).unwrap(), n);
        }
    }

    /// Every sparse body that breaks a rule is refused, and none writes past its region.
    #[test]
    fn bad_sparse_bodies_are_refused() {
        let ok = |b: &[u8], len: usize| RegionBody::Sparse(b).check(len).is_ok();
        assert!(ok(&[], 16), "an all-zero region");
        assert!(ok(&[15, 1], 16), "the last byte");
        assert!(!ok(&[16, 1], 16), "past the end");
        assert!(!ok(&[0, 0], 16), "a zero byte");
        assert!(!ok(&[3], 16), "a gap without its byte");
        assert!(!ok(&[0x80], 16), "a truncated varint");
        assert!(!ok(&[0x81, 0x00, 1], 1 << 20), "a varint not in its shortest form");
        assert!(!ok(&[0x80, 0x80, 0x80, 0x01, 1], usize::MAX), "a 4-byte varint");
        assert!(ok(&[0xFF, 0xFF, 0x7F, 1], 1 << 21), "the longest gap");
        // Offsets rise: after byte 15, a gap of 0 is byte 16, past a 16-byte region.
        assert!(!ok(&[15, 1, 0, 1], 16));
        assert!(ok(&[14, 1, 0, 1], 16));
        assert!(RegionBody::Raw(&[0; 15]).check(16).is_err());
        let mut out = [0u8; 16];
        assert!(RegionBody::Sparse(&[14, 1, 0, 2]).expand(&mut out).is_ok());
        assert_eq!(&out[14..], &[1, 2]);
        // An unknown encoding byte.
        let mut r = begin_regions(0, 1);
        push_region_raw(&mut r, 0, &[1]);
        finish_regions(&mut r, 1);
        r[HEADER_LEN + REGIONS_HEADER_LEN + 8] = 2;
        assert!(decode(&r).is_err());
    }

    /// Random regions of a few bits, many bits or runs come back byte for byte, and the
    /// encoder picks the shorter body.
    #[test]
    fn regions_round_trip_through_either_encoding() {
        let seed = crate::test_seed::seed("regions_round_trip_through_either_encoding");
        let mut rng = crate::rng::SplitMix64::new(seed);
        let mut scratch = Vec::new();
        for _ in 0..2000 {
            let len = 512usize << rng.below(4);
            let density = rng.below(64) + 1;
            let region: Vec<u8> = (0..len)
                .map(|_| if rng.below(64) < density { rng.below(256) as u8 } else { 0 })
                .collect();
            let mut r = begin_regions(0, 1);
            let n = push_region(&mut r, 0, &region, &mut scratch);
            assert!(n <= (REGION_ENTRY_LEN + len) as u64);
            finish_regions(&mut r, 1);
            let s = decode(&r).unwrap();
            let BitmapSection::Regions { regions, .. } = s.body else {
                panic!()
            };
            let mut back = vec![0xEEu8; len];
            regions[0].1.expand(&mut back).unwrap();
            assert_eq!(back, region, "seed {seed}");
            assert_eq!(n, region_entry_len(&region, &mut scratch));
        }
    }

    #[test]
    fn bad_payloads_are_refused_without_panic() {
        let good = encode_start(&start(), 5);
        // Every truncation of a START fails.
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "{n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert!(decode(&long).is_err());
        // A count that asks for more entries than the payload holds.
        let mut r = begin_regions(0, 1);
        finish_regions(&mut r, u32::MAX);
        assert!(decode(&r).is_err());
        // A region length past the end.
        let mut r = begin_regions(0, 1);
        push_region_raw(&mut r, 0, &[0; 8]);
        finish_regions(&mut r, 1);
        r.truncate(r.len() - 1);
        assert!(decode(&r).is_err());
        // Unknown kind, granularity out of range, reserved flags.
        assert!(decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]).is_err());
        let mut g = good.clone();
        g[HEADER_LEN + 8] = 8;
        assert!(decode(&g).is_err());
        let mut f = good.clone();
        f[HEADER_LEN + 9] = 2;
        assert!(decode(&f).is_err());
        let mut z = good;
        z[HEADER_LEN..HEADER_LEN + 8].fill(0);
        assert!(decode(&z).is_err(), "stream id 0");
        // Sequence number 0 outside a QUERY; a QUERY with an index, a number or a body.
        assert!(decode(&encode_complete(0, 0, false)).is_err());
        let c = encode_complete(0, 1, false);
        assert!(decode(&c[..c.len() - 1]).is_err(), "COMPLETE without flags");
        let mut c = encode_complete(0, 1, true);
        c[HEADER_LEN] = 2;
        assert!(decode(&c).is_err(), "reserved COMPLETE flag");
        c.push(0);
        assert!(decode(&c).is_err());
        assert!(decode(&begin_regions(0, 0)).is_err());
        let mut q = encode_query(1);
        q[2] = 1;
        assert!(decode(&q).is_err());
        let mut q = encode_query(1);
        q[10] = 1;
        assert!(decode(&q).is_err());
        let mut q = encode_query(1);
        q.push(0);
        assert!(decode(&q).is_err());
        assert!(decode(&encode_query(0)).is_err());
        let q = encode_query(1);
        assert!(decode(&q[..q.len() - 1]).is_err());
        // A Report of any length but 8.
        for n in [0, 7, 9] {
            assert!(decode_report(&vec![0; n]).is_err(), "{n}");
        }
    }
}
