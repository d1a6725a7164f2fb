//! The payload of a RAM Section: a batch of pages, with all-zero pages sent as a flag
//! (as QEMU's `RAM_SAVE_FLAG_ZERO`), and the payload of a RAM PageRequest.
//!
//! Pure codecs: no I/O, no panic on any payload, allocation bounded by the payload length;
//! the parser lints below (as in `src/format` and `src/storage`) hold the decoders to it, and
//! every field is read through the checked readers of `frame.rs`. The byte layout is in
//! `docs/FORMAT.md`, section "Migration stream".

use super::error::Result;
use super::frame::{be_u32, be_u64, be_u8, field, FrameError};

/// The name of the RAM state in a Hello frame.
pub const RAM_STATE_NAME: &str = "ram";
/// The smallest page size accepted.
pub const MIN_PAGE_SIZE: usize = 512;
/// The largest page size accepted (64 KiB, as arm64 and ppc64 guests use).
pub const MAX_PAGE_SIZE: usize = 64 << 10;
/// Bytes before the first page entry: page size (4), count (4).
pub const PAGES_HEADER_LEN: usize = 8;
/// Bytes of a page entry before its data: page index (8), flags (1).
pub const PAGE_ENTRY_LEN: usize = 9;
/// Page entry flag: the page is all zeros and no data follows.
pub const PAGE_FLAG_ZERO: u8 = 0x01;
/// Page entry flag: the source's copy changed since it was sent; the destination must
/// treat the page as missing (QEMU's postcopy discard). No data follows.
pub const PAGE_FLAG_DISCARD: u8 = 0x02;
/// Length of a RAM PageRequest payload: first page (8), count (4).
pub const PAGE_REQUEST_LEN: usize = 12;

/// What a zero page decodes to; long enough for the largest page size.
static ZERO_PAGE: [u8; MAX_PAGE_SIZE] = [0; MAX_PAGE_SIZE];

fn bad(reason: impl Into<String>) -> FrameError {
    FrameError::payload("RAM", reason)
}

/// Checks that `page_size` is a power of two in [`MIN_PAGE_SIZE`]..=[`MAX_PAGE_SIZE`].
///
/// # Errors
/// [`FrameError::BadPayload`] otherwise.
pub fn check_page_size(page_size: usize) -> Result<()> {
    if page_size.is_power_of_two() && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        Ok(())
    } else {
        Err(bad(format!(
            "page size {page_size} is not a power of two in {MIN_PAGE_SIZE}..={MAX_PAGE_SIZE}"
        ))
        .into())
    }
}

/// Whether a page is all zeros. The inner fold over fixed chunks vectorises.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Encodes a batch of `(page index, page bytes)`; all-zero pages become a flag.
///
/// # Panics
/// If `page_size` fails [`check_page_size`], a page is not `page_size` bytes, or there are
/// more than `u32::MAX` pages: all three are the caller's bugs, not data errors.
pub fn encode_pages(page_size: usize, pages: &[(u64, &[u8])]) -> Vec<u8> {
    assert!(
        check_page_size(page_size).is_ok(),
        "encode_pages: bad page size {page_size}"
    );
    assert!(
        u32::try_from(pages.len()).is_ok(),
        "encode_pages: more than u32::MAX pages"
    );
    let count = u32::try_from(pages.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(
        pages
            .len()
            .saturating_mul(PAGE_ENTRY_LEN.saturating_add(page_size))
            .saturating_add(PAGES_HEADER_LEN),
    );
    out.extend_from_slice(&(page_size as u32).to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for &(index, data) in pages {
        assert_eq!(
            data.len(),
            page_size,
            "encode_pages: page {index} is {} bytes, not {page_size}",
            data.len()
        );
        out.extend_from_slice(&index.to_be_bytes());
        if is_zero(data) {
            out.push(PAGE_FLAG_ZERO);
        } else {
            out.push(0);
            out.extend_from_slice(data);
        }
    }
    out
}

/// Encodes a batch of discards: the source's pages that changed since they were sent, which
/// the destination must drop before a postcopy switchover (QEMU's discard bitmap).
///
/// # Panics
/// As [`encode_pages`].
pub fn encode_discards(page_size: usize, pages: &[u64]) -> Vec<u8> {
    assert!(
        check_page_size(page_size).is_ok(),
        "encode_discards: bad page size {page_size}"
    );
    assert!(
        u32::try_from(pages.len()).is_ok(),
        "encode_discards: more than u32::MAX pages"
    );
    let count = u32::try_from(pages.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(
        pages
            .len()
            .saturating_mul(PAGE_ENTRY_LEN)
            .saturating_add(PAGES_HEADER_LEN),
    );
    out.extend_from_slice(&(page_size as u32).to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for &index in pages {
        out.extend_from_slice(&index.to_be_bytes());
        out.push(PAGE_FLAG_DISCARD);
    }
    out
}

/// One entry of a RAM section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEntry<'a> {
    /// Page index and its bytes (zeros for a zero page).
    Data(u64, &'a [u8]),
    /// The page is stale: drop it.
    Discard(u64),
}

impl PageEntry<'_> {
    /// The page index.
    pub fn page(&self) -> u64 {
        match *self {
            PageEntry::Data(p, _) | PageEntry::Discard(p) => p,
        }
    }
}

/// Decodes a RAM section made by [`encode_pages`] or [`encode_discards`]; zero pages come
/// back as a slice of zeros. Page indexes are not range-checked here (the payload does not
/// know the RAM size); the destination checks them.
///
/// # Errors
/// [`FrameError::BadPayload`] (as [`super::MigrationError::Frame`]) if `page_size` is not
/// valid or not the payload's, the count does not fit the payload, an entry is cut short or
/// has unknown flags, or bytes follow the last entry.
pub fn decode_entries(page_size: usize, payload: &[u8]) -> Result<Vec<PageEntry<'_>>> {
    check_page_size(page_size)?;
    // Checked above: a zero page is a prefix of ZERO_PAGE.
    let zero_page = ZERO_PAGE.get(..page_size).unwrap_or_default();
    let (Some(stored), Some(count)) = (be_u32(payload, 0), be_u32(payload, 4)) else {
        return Err(bad(format!("{} bytes, shorter than its header", payload.len())).into());
    };
    if usize::try_from(stored).ok() != Some(page_size) {
        return Err(bad(format!(
            "page size {stored} in the payload, expected {page_size}"
        ))
        .into());
    }
    let count = count as usize;
    let mut rest = payload.get(PAGES_HEADER_LEN..).unwrap_or_default();
    // The count bound: every entry takes at least PAGE_ENTRY_LEN bytes, so a count the
    // payload cannot hold is refused before anything is allocated for it.
    if count > rest.len() / PAGE_ENTRY_LEN {
        return Err(bad(format!("{count} pages cannot fit in {} bytes", rest.len())).into());
    }
    let mut pages = Vec::with_capacity(count);
    for i in 0..count {
        let (Some(index), Some(flags)) = (be_u64(rest, 0), be_u8(rest, 8)) else {
            return Err(bad(format!("entry {i} of {count} cut short")).into());
        };
        rest = rest.get(PAGE_ENTRY_LEN..).unwrap_or_default();
        match flags {
            PAGE_FLAG_ZERO => pages.push(PageEntry::Data(index, zero_page)),
            PAGE_FLAG_DISCARD => pages.push(PageEntry::Discard(index)),
            0 => {
                let Some(data) = field(rest, 0, page_size) else {
                    return Err(bad(format!(
                        "page {index} (entry {i}) has {} of {page_size} bytes",
                        rest.len()
                    ))
                    .into());
                };
                pages.push(PageEntry::Data(index, data));
                rest = rest.get(page_size..).unwrap_or_default();
            }
            f => {
                return Err(bad(format!(
                    "page {index} (entry {i}) has unknown flags {f:#04x}"
                ))
                .into())
            }
        }
    }
    if !rest.is_empty() {
        return Err(bad(format!("{} bytes after the last page", rest.len())).into());
    }
    Ok(pages)
}

/// Decodes a batch encoded by [`encode_pages`] into `(page index, bytes)`; zero pages come
/// back as a slice of zeros. Page indexes are not range-checked here.
///
/// # Errors
/// The errors of [`decode_entries`], and [`FrameError::BadPayload`] for a discard entry
/// (use [`decode_entries`] for sections that may carry them).
pub fn decode_pages(page_size: usize, payload: &[u8]) -> Result<Vec<(u64, &[u8])>> {
    decode_entries(page_size, payload)?
        .into_iter()
        .map(|e| match e {
            PageEntry::Data(p, d) => Ok((p, d)),
            PageEntry::Discard(p) => {
                Err(bad(format!("discard of page {p} in a page batch")).into())
            }
        })
        .collect()
}

/// Encodes a RAM PageRequest: `count` pages from `first`.
pub fn encode_page_request(first: u64, count: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAGE_REQUEST_LEN);
    out.extend_from_slice(&first.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    out
}

/// Decodes a RAM PageRequest into `(first page, count)`.
///
/// # Errors
/// [`FrameError::BadPayload`] unless the payload is exactly [`PAGE_REQUEST_LEN`] bytes with a
/// non-zero count whose range does not overflow.
pub fn decode_page_request(payload: &[u8]) -> Result<(u64, u32)> {
    let (Some(first), Some(count), PAGE_REQUEST_LEN) =
        (be_u64(payload, 0), be_u32(payload, 8), payload.len())
    else {
        return Err(bad(format!(
            "page request of {} bytes, expected 12",
            payload.len()
        ))
        .into());
    };
    if count == 0 || first.checked_add(u64::from(count)).is_none() {
        return Err(bad(format!("page request of {count} pages from {first}")).into());
    }
    Ok((first, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::error::MigrationError;
    use proptest::prelude::*;

    fn is_bad(r: Result<Vec<(u64, &[u8])>>) -> bool {
        matches!(r, Err(MigrationError::Frame(FrameError::BadPayload { .. })))
    }

    #[test]
    fn zero_pages_are_a_flag() {
        let data = vec![7u8; 4096];
        let zero = vec![0u8; 4096];
        let enc = encode_pages(4096, &[(3, &data), (9, &zero)]);
        assert_eq!(enc.len(), 8 + 9 + 4096 + 9);
        assert_eq!(enc[8 + 8], 0);
        assert_eq!(enc[8 + 9 + 4096 + 8], PAGE_FLAG_ZERO);
        let dec = decode_pages(4096, &enc).unwrap();
        assert_eq!(dec, vec![(3, &data[..]), (9, &zero[..])]);
    }

    #[test]
    fn refuses_bad_payloads() {
        let data = vec![1u8; 512];
        let enc = encode_pages(512, &[(0, &data), (1, &data)]);
        assert!(is_bad(decode_pages(1024, &enc)), "page size mismatch");
        assert!(is_bad(decode_pages(1000, &enc)), "not a power of two");
        assert!(is_bad(decode_pages(256, &enc)), "too small");
        assert!(is_bad(decode_pages(1 << 17, &enc)), "too large");
        for cut in 0..enc.len() {
            assert!(is_bad(decode_pages(512, &enc[..cut])), "cut at {cut}");
        }
        let mut long = enc.clone();
        long.push(0);
        assert!(is_bad(decode_pages(512, &long)), "trailing byte");
        let mut flags = enc.clone();
        flags[8 + 8] = 2;
        assert!(is_bad(decode_pages(512, &flags)), "unknown flags");
        // A count of 2^32 - 1 in a 9-byte body is refused before allocating.
        let mut huge = enc[..8].to_vec();
        huge[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 9]);
        assert!(is_bad(decode_pages(512, &huge)));
        assert_eq!(decode_pages(512, &encode_pages(512, &[])).unwrap(), vec![]);
    }

    #[test]
    fn discards() {
        let enc = encode_discards(4096, &[5, 1 << 40]);
        assert_eq!(enc.len(), 8 + 2 * 9);
        assert_eq!(
            decode_entries(4096, &enc).unwrap(),
            vec![PageEntry::Discard(5), PageEntry::Discard(1 << 40)]
        );
        assert!(is_bad(decode_pages(4096, &enc)));
    }

    #[test]
    fn page_requests() {
        assert_eq!(
            decode_page_request(&encode_page_request(42, 3)).unwrap(),
            (42, 3)
        );
        assert!(decode_page_request(&encode_page_request(42, 0)).is_err());
        assert!(decode_page_request(&encode_page_request(u64::MAX, 1)).is_err());
        assert!(decode_page_request(&[0; 11]).is_err());
    }

    proptest! {
        #![proptest_config(crate::test_seed::proptest_config(ProptestConfig::default()))]

        #[test]
        fn round_trip(
            shift in 9u32..=16,
            pages in proptest::collection::vec((any::<u64>(), any::<u8>(), any::<bool>()), 0..6),
        ) {
            let ps = 1usize << shift;
            let bufs: Vec<(u64, Vec<u8>)> = pages
                .iter()
                .map(|&(i, fill, zero)| (i, vec![if zero { 0 } else { fill }; ps]))
                .collect();
            let refs: Vec<(u64, &[u8])> = bufs.iter().map(|(i, b)| (*i, &b[..])).collect();
            let enc = encode_pages(ps, &refs);
            prop_assert_eq!(decode_pages(ps, &enc).unwrap(), refs);
        }
    }
}
