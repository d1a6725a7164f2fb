//! The RAM state: guest pages, sent in bounded batches, re-sent when the guest dirties them.
//!
//! Two bitmaps at page granularity:
//! - the guest's dirty **log** (shared with the vCPUs, which mark it after each write);
//! - this state's **to-send** bitmap, the pages dirty as of the last sync. A sync
//!   ([`DirtyBitmap::take_dirty`] on the log, merged into to-send) is what the exact
//!   pending query and the completion do; the estimate only counts to-send.
//!
//! A third, **sent-since-sync**, records every page put on the wire since the last sync
//! before the VM stopped. On [`cancel`](MigrationState::cancel) and
//! [`resume_source`](MigrationState::resume_source) both to-send and sent-since-sync go
//! back into the log: a retry ([`SetupMode::Incremental`]) to the same destination then
//! sends those pages and nothing else, and no page the destination may lack is lost.
//!
//! # Payloads (section `id`)
//! The first byte says what follows:
//! - `0` setup: page size (u32 LE), page count (u64 LE);
//! - `1` pages: a batch as `ram_codec::encode_pages` writes it (byte offsets of pages);
//! - `2` discard (postcopy switch): run count (u32 LE), then per run first page and page
//!   count (u64 LE each). The destination drops those pages and requests them on access.
//!
//! # Pending, in wire bytes
//! `pending` counts what the pages will cost on the wire, not just their 4 KiB each: a
//! batch of k pages costs `k × per_page + per_batch + frame`, where `per_page` and
//! `per_batch` are measured from the codec at construction and `frame` is the largest
//! framing overhead the [`Outbound`] has added to a send of this state so far (the setup
//! message measures it before any page goes out). So the bytes [`complete`] sends never
//! exceed the last exact pending, and the downtime bound holds on real bytes.
//!
//! [`complete`]: MigrationState::complete

use std::sync::atomic::{fence, Ordering::SeqCst};
use std::sync::Arc;

use super::error::{MigrationError, Result};
use super::guest::{check_log, new_log, GuestRam, SplitMix64, PAGE_SIZE};
use super::state::{MigrationState, Pending};
use super::units::Bytes;
use super::{Outbound, StateId};
use crate::DirtyBitmap;

/// Stand-in for `ram_codec::encode_pages` until the stream branch lands (same signature):
/// page count (u32 LE), then per page its byte offset (u64 LE) and its bytes.
pub(crate) fn encode_pages(page_size: usize, pages: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + pages.len() * (8 + page_size));
    out.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for (off, data) in pages {
        out.extend_from_slice(&off.to_le_bytes());
        out.extend_from_slice(&data[..page_size]);
    }
    out
}

/// Stand-in for `ram_codec::decode_pages` (same signature), the inverse of
/// [`encode_pages`].
///
/// # Errors
/// [`MigrationError::Stream`] when the payload's length does not match its count.
pub(crate) fn decode_pages(page_size: usize, payload: &[u8]) -> Result<Vec<(u64, &[u8])>> {
    let bad = || MigrationError::Stream(format!("bad RAM page batch of {} bytes", payload.len()));
    let (count, mut rest) = payload.split_first_chunk::<4>().ok_or_else(bad)?;
    let count = u32::from_le_bytes(*count) as usize;
    if rest.len() != count.checked_mul(8 + page_size).ok_or_else(bad)? {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let (off, tail) = rest.split_first_chunk::<8>().ok_or_else(bad)?;
        let (data, tail) = tail.split_at(page_size);
        out.push((u64::from_le_bytes(*off), data));
        rest = tail;
    }
    Ok(out)
}

/// Payload tag: setup message.
pub const TAG_SETUP: u8 = 0;
/// Payload tag: a batch of pages.
pub const TAG_PAGES: u8 = 1;
/// Payload tag: postcopy discard runs.
pub const TAG_DISCARD: u8 = 2;

/// A RAM payload, decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum RamMessage<'a> {
    /// Geometry of the source RAM.
    Setup {
        /// Bytes per page.
        page_size: u32,
        /// Number of pages.
        pages: u64,
    },
    /// Pages as `(byte offset, bytes)`.
    Pages(Vec<(u64, &'a [u8])>),
    /// Postcopy: page runs `(first page, page count)` whose destination copy is stale or
    /// missing.
    Discard(Vec<(u64, u64)>),
}

impl RamMessage<'_> {
    /// Parses a RAM payload.
    ///
    /// # Errors
    /// [`MigrationError::Stream`] for an unknown tag or a malformed body.
    pub fn decode(payload: &[u8]) -> Result<RamMessage<'_>> {
        let bad = |what: &str| MigrationError::Stream(format!("bad RAM {what} message"));
        match payload.split_first() {
            Some((&TAG_SETUP, body)) if body.len() == 12 => Ok(RamMessage::Setup {
                page_size: u32::from_le_bytes(body[..4].try_into().map_err(|_| bad("setup"))?),
                pages: u64::from_le_bytes(body[4..].try_into().map_err(|_| bad("setup"))?),
            }),
            Some((&TAG_PAGES, body)) => Ok(RamMessage::Pages(decode_pages(PAGE_SIZE, body)?)),
            Some((&TAG_DISCARD, body)) => {
                let (n, rest) = body
                    .split_first_chunk::<4>()
                    .ok_or_else(|| bad("discard"))?;
                let n = u32::from_le_bytes(*n) as usize;
                if Some(rest.len()) != n.checked_mul(16) {
                    return Err(bad("discard"));
                }
                Ok(RamMessage::Discard(
                    rest.chunks_exact(16)
                        .map(|c| {
                            let mut a = [0u8; 8];
                            let mut b = [0u8; 8];
                            a.copy_from_slice(&c[..8]);
                            b.copy_from_slice(&c[8..]);
                            (u64::from_le_bytes(a), u64::from_le_bytes(b))
                        })
                        .collect(),
                ))
            }
            _ => Err(bad("section")),
        }
    }
}

/// How [`RamState::setup`](MigrationState::setup) chooses the first pages to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupMode {
    /// To a fresh destination: every page (the log is cleared; the full pass covers it).
    Full,
    /// A retry to a destination that kept what it received: only the pages dirty in the
    /// log (which a failed attempt re-dirtied).
    Incremental,
}

/// Counters of a [`RamState`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamStats {
    /// Pages put on the wire (a page sent twice counts twice).
    pub pages_sent: u64,
    /// Syncs of the dirty log (exact queries, completion, postcopy switch).
    pub syncs: u64,
    /// Pages the last sync found newly dirty.
    pub dirty_at_last_sync: u64,
    /// Pages served on destination request (postcopy).
    pub pages_served: u64,
}

/// Guest RAM as a [`MigrationState`].
#[derive(Debug)]
pub struct RamState {
    id: StateId,
    ram: Arc<GuestRam>,
    log: Arc<DirtyBitmap>,
    to_send: DirtyBitmap,
    sent_since_sync: DirtyBitmap,
    mode: SetupMode,
    postcopy: bool,
    in_postcopy: bool,
    stopped: bool,
    batch_pages: usize,
    cursor: u64,
    per_page: u64,
    per_batch: u64,
    frame: u64,
    buf: Vec<u8>,
    stats: RamStats,
}

impl RamState {
    /// The RAM state of section `id` for `ram`, whose vCPUs mark `log`, sending batches
    /// of up to `batch_pages` pages. With `postcopy` (QEMU's postcopy-ram capability) its
    /// pages count as `can_postcopy`.
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] when `log` does not cover `ram` at page
    /// granularity or `batch_pages` is 0.
    pub fn new(
        id: StateId,
        ram: Arc<GuestRam>,
        log: Arc<DirtyBitmap>,
        mode: SetupMode,
        postcopy: bool,
        batch_pages: usize,
    ) -> Result<Self> {
        check_log(&ram, &log)?;
        if batch_pages == 0 {
            return Err(MigrationError::InvalidInput(
                "batch_pages must be at least 1".into(),
            ));
        }
        // Measure the codec on pages that do not compress.
        let mut rng = SplitMix64::new(0x5eed);
        let sample: Vec<u8> = (0..2 * PAGE_SIZE).map(|_| rng.next_u64() as u8).collect();
        let one = encode_pages(PAGE_SIZE, &[(0, &sample[..PAGE_SIZE])]).len() as u64;
        let two = encode_pages(
            PAGE_SIZE,
            &[
                (0, &sample[..PAGE_SIZE]),
                (PAGE_SIZE as u64, &sample[PAGE_SIZE..]),
            ],
        )
        .len() as u64;
        let per_page = two.saturating_sub(one).max(PAGE_SIZE as u64);
        Ok(RamState {
            id,
            to_send: new_log(&ram)?,
            sent_since_sync: new_log(&ram)?,
            ram,
            log,
            mode,
            postcopy,
            in_postcopy: false,
            stopped: false,
            batch_pages,
            cursor: 0,
            per_page,
            // The tag byte and the codec's own header.
            per_batch: 1 + one.saturating_sub(per_page),
            frame: 0,
            buf: vec![0u8; batch_pages * PAGE_SIZE],
            stats: RamStats::default(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> RamStats {
        self.stats
    }

    /// Pages to send as of the last sync.
    pub fn dirty_pages(&self) -> u64 {
        self.to_send.count()
    }

    /// Wire bytes of `k` pages in batches.
    fn wire(&self, k: u64) -> Bytes {
        let batches = k.div_ceil(self.batch_pages as u64);
        Bytes(k * self.per_page + batches * (self.per_batch + self.frame))
    }

    /// Upper bound on the wire bytes of the discard message for `k` dirty pages (one run
    /// per page at worst); 0 when there is nothing to discard.
    fn discard_bound(&self, k: u64) -> Bytes {
        if k == 0 {
            Bytes(0)
        } else {
            Bytes(1 + 4 + 16 * k + self.frame)
        }
    }

    fn send(&mut self, out: &mut dyn Outbound, payload: &[u8]) -> Result<Bytes> {
        let n = out.send(self.id, payload)?;
        self.frame = self.frame.max(n.get().saturating_sub(payload.len() as u64));
        Ok(n)
    }

    /// Moves the log into to-send. The fence pairs with the one in
    /// [`GuestRam::write_and_mark`]: see `guest.rs` for why no write is lost.
    fn sync(&mut self) {
        let taken = self.log.take_dirty();
        fence(SeqCst);
        self.stats.syncs += 1;
        self.stats.dirty_at_last_sync = taken.count();
        // Same geometry by construction.
        let _ = self.to_send.merge_from(&taken);
        if !self.stopped {
            let _ = self.sent_since_sync.take_dirty();
        }
    }

    /// Takes up to one batch of pages from to-send, from the cursor on, wrapping once.
    fn next_batch(&mut self) -> Vec<u64> {
        let mut pages = Vec::with_capacity(self.batch_pages);
        let page = PAGE_SIZE as u64;
        let mut from = self.cursor * page;
        let mut wrapped = false;
        while pages.len() < self.batch_pages {
            match self.to_send.next_dirty(from) {
                Some(off) => {
                    let p = off / page;
                    self.to_send.clear(p * page, page);
                    pages.push(p);
                    from = (p + 1) * page;
                }
                None if !wrapped && self.cursor != 0 => {
                    wrapped = true;
                    from = 0;
                }
                None => break,
            }
        }
        if let Some(&last) = pages.last() {
            self.cursor = (last + 1) % self.ram.pages();
        }
        pages
    }

    /// Copies and sends `pages`, after recording them as sent (so that a failed send
    /// leaves them to be re-dirtied by `cancel`).
    fn send_pages(&mut self, out: &mut dyn Outbound, pages: &[u64]) -> Result<Bytes> {
        let page = PAGE_SIZE as u64;
        for &p in pages {
            self.sent_since_sync.mark_dirty(p * page, page);
        }
        let mut buf = std::mem::take(&mut self.buf);
        if buf.len() < pages.len() * PAGE_SIZE {
            buf.resize(pages.len() * PAGE_SIZE, 0);
        }
        for (i, &p) in pages.iter().enumerate() {
            self.ram
                .read_page(p, &mut buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]);
        }
        let entries: Vec<(u64, &[u8])> = pages
            .iter()
            .enumerate()
            .map(|(i, &p)| (p * page, &buf[i * PAGE_SIZE..(i + 1) * PAGE_SIZE]))
            .collect();
        let mut payload = vec![TAG_PAGES];
        payload.extend_from_slice(&encode_pages(PAGE_SIZE, &entries));
        drop(entries);
        self.buf = buf;
        let n = self.send(out, &payload)?;
        self.stats.pages_sent += pages.len() as u64;
        Ok(n)
    }

    fn send_all(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        let mut sent = Bytes(0);
        loop {
            let batch = self.next_batch();
            if batch.is_empty() {
                return Ok(sent);
            }
            sent += self.send_pages(out, &batch)?;
        }
    }

    fn redirty(&mut self) {
        // Same geometry by construction.
        let _ = self.log.merge_from(&self.to_send.take_dirty());
        let _ = self.log.merge_from(&self.sent_since_sync.take_dirty());
        self.stopped = false;
        self.in_postcopy = false;
    }
}

impl MigrationState for RamState {
    fn id(&self) -> StateId {
        self.id
    }

    fn name(&self) -> &str {
        "ram"
    }

    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        match self.mode {
            SetupMode::Full => {
                // Everything goes out once; what the log held is covered by that pass.
                let _ = self.log.take_dirty();
                self.to_send.mark_dirty(0, self.ram.size());
            }
            SetupMode::Incremental => self.sync(),
        }
        let _ = self.sent_since_sync.take_dirty();
        self.cursor = 0;
        let mut payload = vec![TAG_SETUP];
        payload.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        payload.extend_from_slice(&self.ram.pages().to_le_bytes());
        self.send(out, &payload)
    }

    fn pending(&mut self, exact: bool) -> Pending {
        if exact && !self.in_postcopy {
            self.sync();
        }
        let k = self.to_send.count();
        if self.postcopy {
            Pending {
                must_precopy: if self.in_postcopy {
                    Bytes(0)
                } else {
                    self.discard_bound(k)
                },
                can_postcopy: self.wire(k),
            }
        } else {
            Pending {
                must_precopy: self.wire(k),
                can_postcopy: Bytes(0),
            }
        }
    }

    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes> {
        let mut sent = Bytes(0);
        while sent < budget {
            let batch = self.next_batch();
            if batch.is_empty() {
                break;
            }
            sent += self.send_pages(out, &batch)?;
        }
        Ok(sent)
    }

    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.stopped = true;
        if !self.in_postcopy {
            self.sync();
        }
        self.send_all(out)
    }

    fn postcopy_start(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        if !self.postcopy {
            return Err(MigrationError::InvalidInput(
                "RAM state was set up without postcopy".into(),
            ));
        }
        self.stopped = true;
        self.sync();
        self.in_postcopy = true;
        let page = PAGE_SIZE as u64;
        let runs: Vec<(u64, u64)> = self
            .to_send
            .dirty_extents()
            .map(|(off, len)| (off / page, len.div_ceil(page)))
            .collect();
        if runs.is_empty() {
            return Ok(Bytes(0));
        }
        let mut payload = Vec::with_capacity(5 + 16 * runs.len());
        payload.push(TAG_DISCARD);
        payload.extend_from_slice(&(runs.len() as u32).to_le_bytes());
        for (first, n) in runs {
            payload.extend_from_slice(&first.to_le_bytes());
            payload.extend_from_slice(&n.to_le_bytes());
        }
        self.send(out, &payload)
    }

    fn serve(&mut self, out: &mut dyn Outbound, offset: u64, len: u64) -> Result<Bytes> {
        let page = PAGE_SIZE as u64;
        let end = offset
            .checked_add(len)
            .filter(|&e| len > 0 && e <= self.ram.size())
            .ok_or_else(|| {
                MigrationError::InvalidInput(format!(
                    "page request [{offset}, +{len}) outside RAM of {} bytes",
                    self.ram.size()
                ))
            })?;
        // Sent whether or not it is still in to-send: the destination may have asked while
        // a background copy was on its way; a duplicate of a frozen page is harmless.
        let pages: Vec<u64> = (offset / page..end.div_ceil(page)).collect();
        let mut sent = Bytes(0);
        for chunk in pages.chunks(self.batch_pages) {
            for &p in chunk {
                self.to_send.clear(p * page, page);
            }
            sent += self.send_pages(out, chunk)?;
            self.stats.pages_served += chunk.len() as u64;
        }
        Ok(sent)
    }

    fn cancel(&mut self) {
        self.redirty();
    }

    fn resume_source(&mut self) {
        self.redirty();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stand_in_codec_round_trips_and_rejects_bad_lengths() {
        let a = vec![1u8; PAGE_SIZE];
        let b = vec![2u8; PAGE_SIZE];
        let enc = encode_pages(PAGE_SIZE, &[(0, &a), (8192, &b)]);
        let dec = decode_pages(PAGE_SIZE, &enc).unwrap();
        assert_eq!(dec, vec![(0, &a[..]), (8192, &b[..])]);
        assert!(decode_pages(PAGE_SIZE, &enc[..enc.len() - 1]).is_err());
        assert!(decode_pages(PAGE_SIZE, &[]).is_err());
        assert!(decode_pages(PAGE_SIZE, &[255, 255, 255, 255]).is_err());
    }

    #[test]
    fn ram_messages_decode() {
        assert!(RamMessage::decode(&[]).is_err());
        assert!(RamMessage::decode(&[9]).is_err());
        assert!(RamMessage::decode(&[TAG_DISCARD, 1, 0, 0, 0]).is_err());
        let mut d = vec![TAG_DISCARD, 1, 0, 0, 0];
        d.extend_from_slice(&5u64.to_le_bytes());
        d.extend_from_slice(&2u64.to_le_bytes());
        assert_eq!(
            RamMessage::decode(&d).unwrap(),
            RamMessage::Discard(vec![(5, 2)])
        );
    }
}
