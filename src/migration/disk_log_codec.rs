//! The payloads of a shared-storage disk state's sections
//! ([`SharedDiskState`](super::SharedDiskState)): the source's write log
//! ([`WriteLog`]), so that the destination reads again only the regions the source wrote
//! since its preload, during precopy, and at the stop only those of the last log.
//!
//! Pure codecs: no I/O, no panic on any payload, allocation bounded by the payload length
//! and by what the caller holds (an entry keeps regions only for a bitmap the caller holds
//! under its name with its region count, and a name keeps them once in a LOG); every field
//! is read through the checked readers of `frame.rs`. The byte layout (big-endian) is in `docs/FORMAT.md`, section
//! "Migration stream":
//!
//! | kind (1) | body |
//! |---|---|
//! | 1 BEGIN | log id (8): the source started its log; the destination preloads now |
//! | 2 LOG | log id (8), sequence (8), flags (1: bit 0 whole, bit 1 last), count (2), then per bitmap: name length (2), name, table offset (8), region size (8), region count (8), dirty count (8, all ones when absent), encoding (1), regions |
//!
//! The regions of an entry are, with encoding 0, a count (4) and that many region numbers
//! (8 each, ascending); with encoding 1, one bit per region (bit `k` of byte `i` is region
//! `8 i + k`), `ceil(region count / 8)` bytes. The encoder picks the shorter.
//!
//! The destination answers, in a Report frame during precopy ([`PreloadReport`]): following
//! (1) or not (0) (1), log id (8), the take after which it follows the log (8: 0 for a
//! preload at BEGIN, the sequence number of the whole LOG it preloaded again at), and the
//! last take it applied (8). It answers every BEGIN and whole LOG once its preload ended
//! (following or not), and each LOG it applied while following. The source does not
//! switch over before its BEGIN or last whole LOG is answered; until it hears "following"
//! for its log as it last made it whole, it prices the destination's activate as a whole
//! load, and after that as a read of the regions of every LOG not yet applied and of the
//! last one.

use std::collections::BTreeSet;

use super::error::Result;
use super::frame::{be_u16, be_u32, be_u64, be_u8, field, FrameError};
use crate::bitmap::ChangedRegions;
use crate::format::BitmapName;
use crate::store::write_log::{LoggedBitmap, WriteLog};

/// The kind byte of a BEGIN section.
pub const KIND_BEGIN: u8 = 1;
/// The kind byte of a LOG section.
pub const KIND_LOG: u8 = 2;
const FLAG_WHOLE: u8 = 1;
const FLAG_LAST: u8 = 2;
const ENCODING_LIST: u8 = 0;
const ENCODING_BITS: u8 = 1;
/// The dirty count of an entry that has none.
const NO_DIRTY: u64 = u64::MAX;
/// Bytes of an entry besides its name and regions.
const ENTRY_FIXED_LEN: usize = 2 + 8 + 8 + 8 + 8 + 1;

/// A decoded section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogSection {
    /// The source started its log `id`.
    Begin(u64),
    /// One take of the source's log.
    Log(WriteLog),
}

fn bad(reason: impl Into<String>) -> FrameError {
    FrameError::payload("disk log", reason)
}

/// Length of a [`PreloadReport`] payload.
pub const PRELOAD_REPORT_LEN: usize = 25;

/// What a shared-storage destination tells its source of its preload, in a Report frame
/// during precopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreloadReport {
    /// Whether the preload follows the log: the activate then reads again only what the
    /// last LOG names. If not, it reads every bitmap whole.
    pub following: bool,
    /// The log (BEGIN's id).
    pub id: u64,
    /// The take after which the preload follows: 0 from BEGIN, or the sequence number of
    /// the whole LOG it preloaded again at.
    pub after: u64,
    /// The last take the destination applied (read again the regions it names): `after`
    /// until it applied one after it. LOGs sent after it are still queued before the
    /// destination, and it reads their regions before it can start.
    pub through: u64,
}

/// Encodes a preload report.
pub fn encode_report(r: PreloadReport) -> Vec<u8> {
    let mut out = vec![u8::from(r.following)];
    out.extend_from_slice(&r.id.to_be_bytes());
    out.extend_from_slice(&r.after.to_be_bytes());
    out.extend_from_slice(&r.through.to_be_bytes());
    out
}

/// Decodes a preload report.
///
/// # Errors
/// [`FrameError::BadPayload`] for a payload that is not [`PRELOAD_REPORT_LEN`] bytes, a
/// first byte other than 0 or 1, a log id of 0, or a last take applied before the take
/// the preload follows after.
pub fn decode_report(payload: &[u8]) -> Result<PreloadReport> {
    let malformed = || {
        bad(format!(
            "a preload report is {PRELOAD_REPORT_LEN} bytes: following (0 or 1), log id (not 0), \
             take followed after, last take applied (not before it)"
        ))
    };
    if payload.len() != PRELOAD_REPORT_LEN {
        return Err(malformed().into());
    }
    let following = match be_u8(payload, 0) {
        Some(0) => false,
        Some(1) => true,
        _ => return Err(malformed().into()),
    };
    let (Some(id), Some(after), Some(through)) = (
        be_u64(payload, 1),
        be_u64(payload, 9),
        be_u64(payload, 17),
    ) else {
        return Err(malformed().into());
    };
    if id == 0 || through < after {
        return Err(malformed().into());
    }
    Ok(PreloadReport {
        following,
        id,
        after,
        through,
    })
}

/// Encodes a BEGIN section.
pub fn encode_begin(id: u64) -> Vec<u8> {
    let mut out = vec![KIND_BEGIN];
    out.extend_from_slice(&id.to_be_bytes());
    out
}

/// Encodes a LOG section.
pub fn encode_log(log: &WriteLog) -> Vec<u8> {
    let mut out = vec![KIND_LOG];
    out.extend_from_slice(&log.id.to_be_bytes());
    out.extend_from_slice(&log.seq.to_be_bytes());
    let flags = if log.whole { FLAG_WHOLE } else { 0 } | if log.last { FLAG_LAST } else { 0 };
    out.push(flags);
    let n = u16::try_from(log.bitmaps.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    for b in log.bitmaps.iter().take(usize::from(n)) {
        let name = b.name.as_bytes();
        let name = name.get(..usize::from(u16::MAX)).unwrap_or(name);
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&b.table_offset.to_be_bytes());
        out.extend_from_slice(&b.region_size.to_be_bytes());
        let rc = b.regions.region_count();
        out.extend_from_slice(&rc.to_be_bytes());
        out.extend_from_slice(&b.dirty.unwrap_or(NO_DIRTY).to_be_bytes());
        let bits_len = rc.div_ceil(8);
        let list_len = 4u64.saturating_add(b.regions.len().saturating_mul(8));
        // A list's count is a u32: longer sets go as bits, whatever their lengths.
        if list_len <= bits_len && b.regions.len() <= u64::from(u32::MAX) {
            out.push(ENCODING_LIST);
            out.extend_from_slice(&(b.regions.len() as u32).to_be_bytes());
            for r in b.regions.iter() {
                out.extend_from_slice(&r.to_be_bytes());
            }
        } else {
            out.push(ENCODING_BITS);
            let mut bits = vec![0u8; usize::try_from(bits_len).unwrap_or(0)];
            for r in b.regions.iter() {
                if let Some(byte) = usize::try_from(r / 8).ok().and_then(|i| bits.get_mut(i)) {
                    *byte |= 1 << (r % 8);
                }
            }
            out.extend_from_slice(&bits);
        }
    }
    out
}

/// The most bytes a LOG of these bitmaps (each `(name length, region count)`) takes,
/// whatever regions it names.
pub fn log_len_bound(bitmaps: impl IntoIterator<Item = (usize, u64)>) -> u64 {
    bitmaps.into_iter().fold(20u64, |acc, (name, regions)| {
        acc.saturating_add(ENTRY_FIXED_LEN as u64)
            .saturating_add(name as u64)
            .saturating_add(4)
            .saturating_add(regions.div_ceil(8))
    })
}

/// Decodes a section. `holds(name, region_count)` says whether the caller holds a bitmap
/// of that name with that many regions (at most one per name): only such an entry keeps
/// its regions, the first of its name in the LOG. Any other entry (a name the caller does
/// not hold, or holds with another region count: it cannot apply to that bitmap, which the
/// reader then reads whole) keeps no regions and a region count of 0, so that it matches
/// no bitmap; nothing is allocated for it. So a LOG costs at most a bit per region of the
/// bitmaps the caller holds, whatever it names.
///
/// A name given twice in a LOG that is not whole is refused, before anything is allocated
/// for it: the writer logs a bitmap once per table, and its table moves only by a
/// directory commit, which makes the log whole. In a whole LOG (whose regions no reader
/// follows) only the first entry of a name keeps regions.
///
/// # Errors
/// [`FrameError::BadPayload`] for an empty, truncated or over-long payload, an unknown
/// kind, a log id of 0, reserved flags, an empty name, a name repeated in a LOG that is not
/// whole, a region size of 0, an unknown encoding, a region number not below the region
/// count or out of order, or bits past the region count.
pub fn decode(payload: &[u8], holds: impl Fn(&[u8], u64) -> bool) -> Result<LogSection> {
    let kind = be_u8(payload, 0).ok_or_else(|| bad("empty payload"))?;
    let body = payload.get(1..).unwrap_or_default();
    match kind {
        KIND_BEGIN => match be_u64(body, 0) {
            Some(id) if id != 0 && body.len() == 8 => Ok(LogSection::Begin(id)),
            _ => Err(bad("a BEGIN body is a log id (8 bytes, not 0)").into()),
        },
        KIND_LOG => decode_log(body, &holds).map(LogSection::Log),
        k => Err(bad(format!("unknown disk log section kind {k}")).into()),
    }
}

/// A checked reader over a body: every read past the end is `None`.
struct Cursor<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        let b = field(self.body, self.at, len)?;
        self.at = self.at.checked_add(len)?;
        Some(b)
    }
    fn u8(&mut self) -> Option<u8> {
        let v = be_u8(self.body, self.at)?;
        self.at = self.at.checked_add(1)?;
        Some(v)
    }
    fn u16(&mut self) -> Option<u16> {
        let v = be_u16(self.body, self.at)?;
        self.at = self.at.checked_add(2)?;
        Some(v)
    }
    fn u32(&mut self) -> Option<u32> {
        let v = be_u32(self.body, self.at)?;
        self.at = self.at.checked_add(4)?;
        Some(v)
    }
    fn u64(&mut self) -> Option<u64> {
        let v = be_u64(self.body, self.at)?;
        self.at = self.at.checked_add(8)?;
        Some(v)
    }
    fn left(&self) -> usize {
        self.body.len().saturating_sub(self.at)
    }
}

fn decode_log(body: &[u8], holds: &dyn Fn(&[u8], u64) -> bool) -> Result<WriteLog> {
    let short = || bad("truncated LOG");
    let mut c = Cursor { body, at: 0 };
    let id = c.u64().ok_or_else(short)?;
    let seq = c.u64().ok_or_else(short)?;
    let flags = c.u8().ok_or_else(short)?;
    let n = c.u16().ok_or_else(short)?;
    if id == 0 {
        return Err(bad("log id 0").into());
    }
    if flags & !(FLAG_WHOLE | FLAG_LAST) != 0 {
        return Err(bad(format!("reserved LOG flags {flags:#04x}")).into());
    }
    // Each entry takes at least its fixed bytes: the count cannot ask for more.
    let room = c.left() / ENTRY_FIXED_LEN;
    let mut bitmaps = Vec::with_capacity(usize::from(n).min(room));
    let whole = flags & FLAG_WHOLE != 0;
    // The names so far (slices of the payload): at most one per entry.
    let mut names: BTreeSet<&[u8]> = BTreeSet::new();
    for i in 0..n {
        let name_len = usize::from(c.u16().ok_or_else(short)?);
        if name_len == 0 {
            return Err(bad("empty bitmap name").into());
        }
        let name = c.bytes(name_len).ok_or_else(short)?;
        let first = names.insert(name);
        if !first && !whole {
            return Err(bad(format!("entry {i} repeats the name of an earlier one")).into());
        }
        let table_offset = c.u64().ok_or_else(short)?;
        let region_size = c.u64().ok_or_else(short)?;
        let region_count = c.u64().ok_or_else(short)?;
        let dirty = c.u64().ok_or_else(short)?;
        let encoding = c.u8().ok_or_else(short)?;
        if region_size == 0 {
            return Err(bad("region size 0").into());
        }
        let keep = first && holds(name, region_count);
        let mut regions = ChangedRegions::empty(if keep { region_count } else { 0 });
        match encoding {
            ENCODING_LIST => {
                let count = c.u32().ok_or_else(short)?;
                let mut last = None;
                for _ in 0..count {
                    let r = c.u64().ok_or_else(short)?;
                    if r >= region_count || last.is_some_and(|l| r <= l) {
                        return Err(bad(format!(
                            "region {r} not below {region_count} or out of order"
                        ))
                        .into());
                    }
                    last = Some(r);
                    if keep {
                        regions.insert(r);
                    }
                }
            }
            ENCODING_BITS => {
                let len = usize::try_from(region_count.div_ceil(8)).map_err(|_| short())?;
                let bits = c.bytes(len).ok_or_else(short)?;
                for (i, &byte) in bits.iter().enumerate() {
                    let mut b = byte;
                    while b != 0 {
                        let r = (i as u64)
                            .saturating_mul(8)
                            .saturating_add(u64::from(b.trailing_zeros()));
                        b &= b.wrapping_sub(1);
                        if r >= region_count {
                            return Err(bad(format!("region bit {r} past {region_count}")).into());
                        }
                        if keep {
                            regions.insert(r);
                        }
                    }
                }
            }
            e => return Err(bad(format!("unknown region encoding {e}")).into()),
        }
        bitmaps.push(LoggedBitmap {
            name: BitmapName::from(name),
            table_offset,
            region_size,
            regions,
            dirty: (dirty != NO_DIRTY).then_some(dirty),
        });
    }
    if c.left() != 0 {
        return Err(bad("bytes after the last LOG entry").into());
    }
    Ok(WriteLog {
        id,
        seq,
        whole,
        last: flags & FLAG_LAST != 0,
        bitmaps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(regions: &[u64], count: u64) -> WriteLog {
        let mut r = ChangedRegions::empty(count);
        for &x in regions {
            r.insert(x);
        }
        WriteLog {
            id: 7,
            seq: 3,
            whole: false,
            last: true,
            bitmaps: vec![LoggedBitmap {
                name: BitmapName::from("b0"),
                table_offset: 1 << 20,
                region_size: 4096,
                regions: r,
                dirty: Some(42),
            }],
        }
    }

    /// The caller of these tests: it holds bitmap "b0" of 8,192 regions.
    fn b0(name: &[u8], region_count: u64) -> bool {
        name == b"b0" && region_count == 8192
    }

    /// A caller that holds nothing.
    fn none(_: &[u8], _: u64) -> bool {
        false
    }

    #[test]
    fn a_preload_report_round_trips_and_nothing_else_decodes() {
        for r in [
            PreloadReport { following: true, id: 7, after: 0, through: 0 },
            PreloadReport { following: true, id: 7, after: 3, through: 9 },
            PreloadReport { following: false, id: u64::MAX, after: 12, through: 12 },
        ] {
            let bytes = encode_report(r);
            assert_eq!(bytes.len(), PRELOAD_REPORT_LEN);
            assert_eq!(decode_report(&bytes).unwrap(), r);
            for cut in 0..bytes.len() {
                assert!(decode_report(&bytes[..cut]).is_err(), "cut at {cut}");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert!(decode_report(&long).is_err());
            let mut flag = bytes.clone();
            flag[0] = 2;
            assert!(decode_report(&flag).is_err());
        }
        let zero_id = encode_report(PreloadReport { following: true, id: 0, after: 0, through: 0 });
        assert!(decode_report(&zero_id).is_err());
        let backwards = encode_report(PreloadReport { following: true, id: 7, after: 3, through: 2 });
        assert!(decode_report(&backwards).is_err());
    }

    #[test]
    fn a_log_round_trips_in_both_encodings() {
        for (regions, count) in [(vec![3, 8000], 8192u64), ((0..8192).step_by(3).collect(), 8192)] {
            let l = log(&regions, count);
            let bytes = encode_log(&l);
            assert_eq!(decode(&bytes, b0).unwrap(), LogSection::Log(l));
        }
        assert_eq!(decode(&encode_begin(5), none).unwrap(), LogSection::Begin(5));
    }

    #[test]
    fn the_bound_holds_for_any_regions() {
        for regions in [vec![], vec![1, 2], (0..8192).collect::<Vec<_>>(), (0..8192).step_by(70).collect()] {
            let len = encode_log(&log(&regions, 8192)).len() as u64;
            assert!(len <= log_len_bound([(2, 8192)]), "{len}");
        }
    }

    #[test]
    fn the_shorter_encoding_is_chosen() {
        let sparse = encode_log(&log(&[1, 2], 8192));
        let dense = encode_log(&log(&(0..8192).collect::<Vec<_>>(), 8192));
        assert!(sparse.len() < 100, "{}", sparse.len());
        assert!(dense.len() < 8192 / 8 + 100, "{}", dense.len());
    }

    /// An entry keeps regions only for a bitmap the caller holds under its name with its
    /// region count; any other keeps none, and nothing is allocated for it.
    #[test]
    fn an_entry_the_caller_does_not_hold_keeps_nothing() {
        let bytes = encode_log(&log(&[1, 2], 8192));
        let other_count = |n: &[u8], c: u64| n == b"b0" && c == 100;
        for l in [decode(&bytes, none), decode(&bytes, other_count)] {
            let LogSection::Log(l) = l.unwrap() else {
                panic!("not a log")
            };
            assert_eq!(l.bitmaps[0].regions.region_count(), 0);
            assert!(l.bitmaps[0].regions.is_empty());
        }
        // A region count of 2^62 (2^56 words, were they allocated) for a name not held.
        let bytes = repeated(b"x", 1, 1 << 62);
        let LogSection::Log(l) = decode(&bytes, b0).unwrap() else {
            panic!("not a log")
        };
        assert_eq!(l.bitmaps[0].name, "x");
        assert_eq!(l.bitmaps[0].regions.region_count(), 0);
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused_or_decoded_without_panic() {
        let bytes = encode_log(&log(&[1, 5, 77], 8192));
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n], b0).is_err(), "a log cut at {n}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let _ = decode(&b, b0);
            }
        }
    }

    /// A LOG payload (not whole) of `n` entries named `name`, each of `region_count`
    /// regions, none named (the list encoding, count 0).
    fn repeated(name: &[u8], n: u16, region_count: u64) -> Vec<u8> {
        repeated_with(0, name, n, region_count)
    }

    /// [`repeated`] with LOG flags `flags`.
    fn repeated_with(flags: u8, name: &[u8], n: u16, region_count: u64) -> Vec<u8> {
        let mut out = vec![KIND_LOG];
        out.extend_from_slice(&7u64.to_be_bytes());
        out.extend_from_slice(&1u64.to_be_bytes());
        out.push(flags);
        out.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(&(1u64 << 20).to_be_bytes());
            out.extend_from_slice(&4096u64.to_be_bytes());
            out.extend_from_slice(&region_count.to_be_bytes());
            out.extend_from_slice(&NO_DIRTY.to_be_bytes());
            out.push(ENCODING_LIST);
            out.extend_from_slice(&0u32.to_be_bytes());
        }
        out
    }

    /// A LOG repeating one name, each entry of the caller's largest region count, would
    /// allocate that bitmap's region set per entry (65,535 entries: 1 GiB from a 2.6 MB
    /// payload) before anything is checked against what the caller holds. A name repeated
    /// in a LOG that is not whole is refused before anything is allocated.
    #[test]
    fn a_name_repeated_in_a_log_is_refused_before_allocating() {
        let bytes = repeated(b"b", 1000, 131_072);
        let holds_b = |n: &[u8], c: u64| n == b"b" && c == 131_072;
        for e in [decode(&bytes, none), decode(&bytes, holds_b)] {
            let e = e.unwrap_err();
            assert!(
                matches!(
                    e,
                    crate::migration::MigrationError::Frame(FrameError::BadPayload { .. })
                ),
                "{e}"
            );
        }
        // In a whole LOG (a table moved: one name at two offsets) a repeat decodes, and
        // only the first entry of the name keeps regions.
        let bytes = repeated_with(FLAG_WHOLE, b"b", 1000, 131_072);
        let LogSection::Log(l) = decode(&bytes, holds_b).unwrap() else {
            panic!("not a log")
        };
        assert_eq!(l.bitmaps.len(), 1000);
        assert_eq!(l.bitmaps[0].regions.region_count(), 131_072);
        assert!(l.bitmaps[1..]
            .iter()
            .all(|b| b.regions.region_count() == 0));
    }
}
