//! The RAM state: guest pages, sent in bounded batches, re-sent when the guest dirties them.
//!
//! It reads the guest's pages through a [`GuestMemory`] and learns which changed from a
//! [`DirtyLog`] (`memory.rs`, with the ordering contract both follow); [`GuestRam`] and a
//! [`DirtyBitmap`] are the defaults, a VMM brings its own.
//!
//! Two page sets:
//! - the guest's dirty **log** (the VMM's, or a bitmap the vCPUs mark after each write);
//! - this state's **to-send** bitmap, the pages dirty as of the last sync. A sync
//!   ([`DirtyLog::harvest`], then [`DirtyLog::fence`], merged into to-send) is what the
//!   exact pending query and the completion do; the estimate only counts to-send. Every
//!   harvest is followed by the fence before any page is read, the one a full setup makes
//!   to discard what the log held included.
//!
//! A third, **sent-since-sync**, records every page put on the wire since the last sync
//! before the VM stopped. On [`cancel`](MigrationState::cancel) and
//! [`resume_source`](MigrationState::resume_source) both to-send and sent-since-sync go
//! back into the log: a retry ([`SetupMode::Incremental`]) to the same destination then
//! sends those pages and nothing else. That covers a refusal, and a cancel before any
//! section went out. Otherwise (the channel or the peer failed, or a cancel with sections
//! possibly in flight) a page sent *before* the last sync may never have been applied:
//! [`channel_failed`](MigrationState::channel_failed) then
//! re-dirties every page sent in the attempt (or, with
//! [`ChannelLoss::CallerReconciles`], leaves the exact reconciliation to the caller).
//!
//! # Payloads (section `id`)
//! Exactly the stream's RAM payloads ([`ram_codec`], `docs/FORMAT.md`): batches of
//! `(page index, page)` from [`ram_codec::encode_pages`] (all-zero pages as a flag), and,
//! at a postcopy switchover, the stale pages from [`ram_codec::encode_discards`]. The
//! geometry goes in the Hello frame ([`MigrationState::ram_geometry`]); a postcopy request
//! is [`ram_codec::decode_page_request`]'s `(first page, count)`.
//!
//! # Pending, in wire bytes
//! `pending` counts what the pages will cost on the wire, not just their 4 KiB each: a
//! batch of k pages costs `k × (PAGE_ENTRY_LEN + page size) + PAGES_HEADER_LEN + frame`,
//! where `frame` is the channel's Section overhead ([`Outbound::section_overhead`], learnt
//! at setup, and raised if a send ever reports more). A zero page costs less than it is
//! counted for. So the bytes [`complete`] sends never exceed the last exact pending, and
//! the downtime bound holds on real bytes.
//!
//! [`complete`]: MigrationState::complete

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use super::channel::Outbound;
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{StateId, MAX_FRAME_LEN};
use super::guest::{GuestRam, PAGE_SIZE};
use super::memory::{DirtyLog, DirtyPages, GuestMemory};
use super::ram_codec::{self, RAM_STATE_NAME};
use super::state::{MigrationState, Pending};
use crate::units::Bytes;
use crate::DirtyBitmap;

/// The section id RAM takes in this crate's migrations (the simulation of `sim.rs`, both
/// ends of `tcp.rs`, `dbm migrate`). Any id works on the wire: the Hello says which one
/// is RAM, by its name [`RAM_STATE_NAME`].
pub const RAM_ID: StateId = 1;

/// Most discard entries in one section (9 bytes each: far below the frame limit).
pub const DISCARDS_PER_SECTION: usize = 1 << 16;

/// The largest `batch_pages` whose section fits the stream's frame limit, for pages of
/// [`PAGE_SIZE`] bytes ([`max_batch_pages`] for others).
pub const MAX_BATCH_PAGES: usize = max_batch_pages(PAGE_SIZE);

/// The largest `batch_pages` whose section fits the stream's frame limit, for pages of
/// `page_size` bytes.
pub const fn max_batch_pages(page_size: usize) -> usize {
    (MAX_FRAME_LEN as usize - 4 - ram_codec::PAGES_HEADER_LEN)
        / (ram_codec::PAGE_ENTRY_LEN + page_size)
}

/// How [`RamState::setup`](MigrationState::setup) chooses the first pages to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupMode {
    /// To a fresh destination: every page (the log is harvested and what it held dropped:
    /// the full pass covers it).
    Full,
    /// A retry to a destination that kept what it received: only the pages dirty in the
    /// log (which a failed attempt re-dirtied). The Hello says so
    /// ([`Hello::incremental`](super::frame::Hello::incremental)), and a destination that
    /// kept no RAM of this migration refuses it before any page
    /// ([`ProtocolError::NoKeptRam`]): retry with [`SetupMode::Full`] then.
    Incremental,
}

/// What a [`RamState`] does when the channel or the peer failed mid-attempt
/// ([`MigrationState::channel_failed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChannelLoss {
    /// Re-dirty every page sent in the attempt (`redirty_undelivered(0)`): a page sent
    /// before the last sync may have been lost in flight, and the source cannot know
    /// which. Safe without any help from the destination; a retry resends what the
    /// attempt sent.
    #[default]
    RedirtyAllSent,
    /// Do nothing more than `cancel`: the caller learns from the destination how many
    /// RAM sections it applied and calls [`RamState::redirty_undelivered`] with that
    /// count itself, which re-dirties only what was really lost. A caller that chooses
    /// this and then does not call it may lose pages.
    CallerReconciles,
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
    /// Pages the first pass had to send: all of RAM for [`SetupMode::Full`]; for
    /// [`SetupMode::Incremental`], the pages dirty in the log at setup, which is what a
    /// retry costs beyond what the guest dirties while it runs.
    pub pages_at_setup: u64,
}

/// Guest RAM as a [`MigrationState`]: the pages of a [`GuestMemory`] `M`, dirty as a
/// [`DirtyLog`] `L` reports them. The defaults are this crate's [`GuestRam`] and a
/// [`DirtyBitmap`] log.
pub struct RamState<M = GuestRam, L = DirtyBitmap> {
    id: StateId,
    ram: Arc<M>,
    log: Arc<L>,
    page_size: usize,
    pages: u64,
    migration_id: u64,
    /// Where a harvest puts its pages before they join to-send; it holds the last
    /// harvest's pages until the next harvest empties it.
    harvested: DirtyBitmap,
    to_send: DirtyBitmap,
    sent_since_sync: DirtyBitmap,
    mode: SetupMode,
    postcopy: bool,
    in_postcopy: bool,
    stopped: bool,
    /// A sync ran since the VM stopped ([`MigrationState::stopped`]): the log holds
    /// nothing more, and the completion does not sync again.
    synced_stopped: bool,
    batch_pages: usize,
    cursor: u64,
    frame: u64,
    buf: Vec<u8>,
    stats: RamStats,
    pages_sent: Arc<AtomicU64>,
    /// Per page: 1 + the index (in this attempt) of the last section that carried it,
    /// saturating at [`u32::MAX`] (which then means "that section or a later one"); 0 if
    /// none did. Four bytes a page, not eight: a tag that saturated is judged against
    /// `sections` instead (see [`redirty_undelivered`](Self::redirty_undelivered)).
    last_section: Vec<u32>,
    /// Sections of this state sent in this attempt.
    sections: u64,
    on_loss: ChannelLoss,
}

impl<M, L> fmt::Debug for RamState<M, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamState")
            .field("id", &self.id)
            .field("page_size", &self.page_size)
            .field("pages", &self.pages)
            .field("mode", &self.mode)
            .field("postcopy", &self.postcopy)
            .field("in_postcopy", &self.in_postcopy)
            .field("stopped", &self.stopped)
            .field("batch_pages", &self.batch_pages)
            .field("to_send", &self.to_send.count())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<M: GuestMemory, L: DirtyLog> RamState<M, L> {
    /// The RAM state of section `id` for `ram`, whose writes `log` reports, sending
    /// batches of up to `batch_pages` pages. With `postcopy` (QEMU's postcopy-ram
    /// capability) its pages count as `can_postcopy`.
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] when the page size is not one the stream carries
    /// ([`ram_codec::check_page_size`]), `ram` has no pages or more than a page-granular
    /// [`DirtyBitmap`] holds, `log` tracks another page size or page count, or
    /// `batch_pages` is 0 or above [`max_batch_pages`] for the page size.
    pub fn new(
        id: StateId,
        ram: Arc<M>,
        log: Arc<L>,
        mode: SetupMode,
        postcopy: bool,
        batch_pages: usize,
    ) -> Result<Self> {
        let (page_size, pages) = (ram.page_size(), ram.pages());
        ram_codec::check_page_size(page_size)
            .map_err(|e| MigrationError::InvalidInput(format!("guest memory: {e}")))?;
        if log.page_size() != page_size || log.pages() != pages {
            return Err(MigrationError::InvalidInput(format!(
                "dirty log tracks {} pages of {} bytes, guest memory is {pages} pages of \
                 {page_size} bytes",
                log.pages(),
                log.page_size()
            )));
        }
        let max = max_batch_pages(page_size);
        if batch_pages == 0 || batch_pages > max {
            return Err(MigrationError::InvalidInput(format!(
                "batch_pages {batch_pages} is not in 1..={max}"
            )));
        }
        let set = || -> Result<DirtyBitmap> {
            let size = pages
                .checked_mul(page_size as u64)
                .filter(|_| pages > 0)
                .ok_or_else(|| {
                    MigrationError::InvalidInput(format!(
                        "guest memory of {pages} pages of {page_size} bytes"
                    ))
                })?;
            Ok(DirtyBitmap::new(size, page_size as u64)?)
        };
        Ok(RamState {
            id,
            migration_id: ram.migration_id(),
            page_size,
            pages,
            harvested: set()?,
            to_send: set()?,
            sent_since_sync: set()?,
            ram,
            log,
            mode,
            postcopy,
            in_postcopy: false,
            stopped: false,
            synced_stopped: false,
            batch_pages,
            cursor: 0,
            frame: 0,
            buf: vec![0u8; batch_pages * page_size],
            stats: RamStats::default(),
            pages_sent: Arc::new(AtomicU64::new(0)),
            last_section: vec![0; usize::try_from(pages).unwrap_or(usize::MAX)],
            sections: 0,
            on_loss: ChannelLoss::default(),
        })
    }

    /// This state, with `policy` on a channel or peer failure (default
    /// [`ChannelLoss::RedirtyAllSent`]).
    #[must_use]
    pub fn with_channel_loss(mut self, policy: ChannelLoss) -> Self {
        self.on_loss = policy;
        self
    }

    /// Counters so far.
    pub fn stats(&self) -> RamStats {
        self.stats
    }

    /// Pages to send as of the last sync.
    pub fn dirty_pages(&self) -> u64 {
        self.to_send.count()
    }

    /// A live counter of the pages put on the wire, readable while the loop runs (for
    /// `info migrate`-like progress lines).
    pub fn pages_sent_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.pages_sent)
    }

    /// Wire bytes of `k` pages in batches, each page counted with its data.
    fn wire(&self, k: u64) -> Bytes {
        let batches = k.div_ceil(self.batch_pages as u64);
        let per_page = (ram_codec::PAGE_ENTRY_LEN + self.page_size) as u64;
        Bytes(k * per_page + batches * (ram_codec::PAGES_HEADER_LEN as u64 + self.frame))
    }

    /// Wire bytes of the discard sections for `k` dirty pages; 0 when there is nothing to
    /// discard.
    fn discard_bound(&self, k: u64) -> Bytes {
        let sections = k.div_ceil(DISCARDS_PER_SECTION as u64);
        Bytes(
            k * ram_codec::PAGE_ENTRY_LEN as u64
                + sections * (ram_codec::PAGES_HEADER_LEN as u64 + self.frame),
        )
    }

    fn send(&mut self, out: &mut dyn Outbound, payload: &[u8]) -> Result<Bytes> {
        self.sections = self.sections.saturating_add(1);
        let n = out.send(self.id, payload)?;
        self.frame = self.frame.max(n.get().saturating_sub(payload.len() as u64));
        Ok(n)
    }

    /// Harvests the log into `harvested`, then fences: the only way this state takes the
    /// log, so every page read that follows is ordered after the harvest (the contract in
    /// `memory.rs`; for the default log, the fence pairs with the one in
    /// [`GuestRam::write_and_mark`]). Returns how many pages the harvest handed over.
    fn harvest(&mut self) -> u64 {
        let _ = self.harvested.take_dirty();
        self.log
            .harvest(&mut DirtyPages::new(&self.harvested, self.pages));
        self.log.fence();
        self.harvested.count()
    }

    /// Moves the log into to-send.
    fn sync(&mut self) {
        let dirty = self.harvest();
        self.stats.syncs += 1;
        self.stats.dirty_at_last_sync = dirty;
        // Same geometry by construction.
        let _ = self.to_send.merge_from(&self.harvested);
        if !self.stopped {
            let _ = self.sent_since_sync.take_dirty();
        }
        self.synced_stopped = self.stopped;
    }

    /// Takes up to one batch of pages from to-send, from the cursor on, wrapping once.
    fn next_batch(&mut self, limit: usize) -> Vec<u64> {
        let limit = limit.clamp(1, self.batch_pages);
        let mut pages = Vec::with_capacity(limit);
        let page = self.page_size as u64;
        let mut from = self.cursor * page;
        let mut wrapped = false;
        while pages.len() < limit {
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
            self.cursor = (last + 1) % self.pages;
        }
        pages
    }

    /// Copies and sends `pages`, after recording them as sent (so that a failed send
    /// leaves them to be re-dirtied by `cancel`).
    fn send_pages(&mut self, out: &mut dyn Outbound, pages: &[u64]) -> Result<Bytes> {
        let ps = self.page_size;
        let page = ps as u64;
        // The section about to go out is number `self.sections` (from 0).
        let tag = u32::try_from(self.sections.saturating_add(1)).unwrap_or(u32::MAX);
        for &p in pages {
            self.sent_since_sync.mark_dirty(p * page, page);
            self.last_section[p as usize] = tag;
        }
        let mut buf = std::mem::take(&mut self.buf);
        if buf.len() < pages.len() * ps {
            buf.resize(pages.len() * ps, 0);
        }
        for (i, &p) in pages.iter().enumerate() {
            self.ram.read_page(p, &mut buf[i * ps..(i + 1) * ps]);
        }
        let entries: Vec<(u64, &[u8])> = pages
            .iter()
            .enumerate()
            .map(|(i, &p)| (p, &buf[i * ps..(i + 1) * ps]))
            .collect();
        let payload = ram_codec::encode_pages(ps, &entries);
        drop(entries);
        self.buf = buf;
        let n = self.send(out, &payload)?;
        self.stats.pages_sent += pages.len() as u64;
        self.pages_sent.fetch_add(pages.len() as u64, Relaxed);
        Ok(n)
    }

    fn send_all(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        let mut sent = Bytes(0);
        loop {
            let batch = self.next_batch(self.batch_pages);
            if batch.is_empty() {
                return Ok(sent);
            }
            sent += self.send_pages(out, &batch)?;
        }
    }

    /// After a failed attempt, once the destination that kept its memory says how many of
    /// this attempt's RAM sections it applied (`RetainedRam::sections_applied`): marks in
    /// the log every page whose last copy went out in a later section, which the channel
    /// lost in flight. [`cancel`](MigrationState::cancel) cannot know that: a page sent
    /// before the last sync may still have been in a socket buffer when the channel was
    /// cut. With `applied` 0 every page sent in the attempt is marked (safe when the
    /// figure is unknown; what [`MigrationState::channel_failed`] does by default, see
    /// [`ChannelLoss`]). Marking more is always safe; it only costs a resend.
    ///
    /// A page's tag saturates after [`u32::MAX`] − 1 sections; such a page counts as
    /// delivered only when `applied` covers every section of the attempt.
    pub fn redirty_undelivered(&self, applied: u64) {
        let mut run: Option<(u64, u64)> = None;
        for (p, &tag) in self.last_section.iter().enumerate() {
            let p = p as u64;
            let last = if tag == u32::MAX {
                self.sections
            } else {
                u64::from(tag)
            };
            if last <= applied {
                continue;
            }
            run = match run {
                Some((first, n)) if first + n == p => Some((first, n + 1)),
                Some((first, n)) => {
                    self.log.redirty(first, n);
                    Some((p, 1))
                }
                None => Some((p, 1)),
            };
        }
        if let Some((first, n)) = run {
            self.log.redirty(first, n);
        }
    }

    /// Gives every page of `set` back to the log, and clears `set`.
    fn give_back(log: &L, set: &DirtyBitmap) {
        let page = set.granularity();
        for (off, len) in set.take_dirty().dirty_extents() {
            log.redirty(off / page, len.div_ceil(page));
        }
    }

    fn redirty(&mut self) {
        Self::give_back(&self.log, &self.to_send);
        Self::give_back(&self.log, &self.sent_since_sync);
        self.stopped = false;
        self.synced_stopped = false;
        self.in_postcopy = false;
    }
}

impl<M: GuestMemory, L: DirtyLog> MigrationState for RamState<M, L> {
    fn id(&self) -> StateId {
        self.id
    }

    fn name(&self) -> &str {
        RAM_STATE_NAME
    }

    fn ram_geometry(&self) -> Option<(u32, u64)> {
        Some((self.page_size as u32, self.pages))
    }

    fn ram_incremental(&self) -> bool {
        self.mode == SetupMode::Incremental
    }

    fn migration_id(&self) -> Option<u64> {
        Some(self.migration_id)
    }

    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        match self.mode {
            SetupMode::Full => {
                // Everything goes out once; what the log held is covered by that pass,
                // whose copies all follow this harvest and its fence.
                self.harvest();
                self.to_send
                    .mark_dirty(0, self.pages * self.page_size as u64);
            }
            SetupMode::Incremental => self.sync(),
        }
        let _ = self.sent_since_sync.take_dirty();
        self.last_section.fill(0);
        self.sections = 0;
        self.stats.pages_at_setup = self.to_send.count();
        self.cursor = 0;
        self.frame = out.section_overhead().get();
        Ok(Bytes(0))
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
                ..Pending::default()
            }
        } else {
            Pending {
                must_precopy: self.wire(k),
                can_postcopy: Bytes(0),
                ..Pending::default()
            }
        }
    }

    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes> {
        let mut sent = Bytes(0);
        while sent < budget {
            // In the postcopy push the loop paces the budget (`max_postcopy_bandwidth`)
            // and the writer does not: a batch fits what is left of it (one page at
            // least), so that frames keep coming at the paced rate. Whole batches would
            // leave a silence of a batch's time at that rate, which could outlast the
            // destination's read timeout after its guest started.
            let limit = if self.in_postcopy {
                let per_page = (ram_codec::PAGE_ENTRY_LEN + self.page_size) as u64;
                usize::try_from((budget - sent).0 / per_page).unwrap_or(usize::MAX)
            } else {
                self.batch_pages
            };
            let batch = self.next_batch(limit);
            if batch.is_empty() {
                break;
            }
            sent += self.send_pages(out, &batch)?;
        }
        Ok(sent)
    }

    fn stopped(&mut self) {
        self.stopped = true;
        self.synced_stopped = false;
    }

    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.stopped = true;
        if !self.in_postcopy && !self.synced_stopped {
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
        if !self.synced_stopped {
            self.sync();
        }
        self.in_postcopy = true;
        let page = self.page_size as u64;
        let mut stale = Vec::with_capacity(self.to_send.count() as usize);
        for (off, len) in self.to_send.dirty_extents() {
            stale.extend(off / page..(off + len).div_ceil(page));
        }
        let mut sent = Bytes(0);
        for chunk in stale.chunks(DISCARDS_PER_SECTION) {
            sent += self.send(out, &ram_codec::encode_discards(self.page_size, chunk))?;
        }
        Ok(sent)
    }

    fn serve(&mut self, out: &mut dyn Outbound, request: &[u8]) -> Result<Bytes> {
        let (first, count) = ram_codec::decode_page_request(request)?;
        let end = first
            .checked_add(u64::from(count))
            .filter(|&e| e <= self.pages)
            .ok_or(ProtocolError::RequestOutOfRange {
                first,
                count,
                pages: self.pages,
            })?;
        let page = self.page_size as u64;
        // Sent whether or not it is still in to-send: the destination may have asked while
        // a background copy was on its way; a duplicate of a frozen page is harmless (the
        // destination never overwrites a page it holds once its guest runs).
        let pages: Vec<u64> = (first..end).collect();
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

    fn channel_failed(&mut self) {
        if self.on_loss == ChannelLoss::RedirtyAllSent {
            self.redirty_undelivered(0);
        }
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
    use crate::migration::frame::Frame;
    use crate::migration::guest::new_log;
    use crate::migration::stream::FrameWriter;

    /// A writer past its stream header (the loop sends the Hello before any setup).
    fn started() -> FrameWriter<Vec<u8>> {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(&Frame::Started).unwrap();
        w
    }

    fn rig(pages: u64, batch: usize, postcopy: bool) -> (Arc<GuestRam>, RamState) {
        let ram = Arc::new(GuestRam::new(pages).unwrap());
        for p in 0..pages {
            ram.fill_page(p, p + 1);
        }
        let log = Arc::new(new_log(&ram).unwrap());
        let s = RamState::new(1, Arc::clone(&ram), log, SetupMode::Full, postcopy, batch).unwrap();
        (ram, s)
    }

    #[test]
    fn sections_are_ram_codec_batches_of_page_indexes() {
        let (ram, mut s) = rig(5, 2, false);
        let mut w = FrameWriter::new(Vec::new());
        s.setup(&mut w).unwrap();
        s.iterate(&mut w, Bytes(1)).unwrap();
        let bytes = w.into_inner();
        // Stream header, frame header, state id, then the codec's payload.
        let payload = &bytes[8 + 20 + 4..bytes.len() - 4];
        let pages = ram_codec::decode_pages(PAGE_SIZE, payload).unwrap();
        let mut want = vec![0u8; PAGE_SIZE];
        assert_eq!(pages.len(), 2);
        for (i, (index, data)) in pages.into_iter().enumerate() {
            assert_eq!(index, i as u64);
            ram.read_page(index, &mut want);
            assert_eq!(data, &want[..]);
        }
    }

    #[test]
    fn exact_pending_bounds_what_complete_sends() {
        for (pages, batch) in [(1, 1), (7, 3), (9, 4), (16, 16)] {
            let (ram, mut s) = rig(pages, batch, false);
            // Some zero pages: they cost less than counted.
            ram.write_page(0, &[0; PAGE_SIZE]);
            let mut w = started();
            s.setup(&mut w).unwrap();
            let before = w.bytes_sent();
            let p = s.pending(true);
            let sent = s.complete(&mut w).unwrap();
            assert_eq!(w.bytes_sent() - before, sent);
            assert!(sent <= p.total(), "{pages}/{batch}: {sent:?} > {p:?}");
            // Tight for non-zero pages: one zero page is the whole slack.
            assert_eq!(p.total().get() - sent.get(), PAGE_SIZE as u64);
        }
    }

    /// Memory of any page size, every page filled but page 0 (zero).
    struct Filled {
        page_size: usize,
        pages: u64,
    }

    impl GuestMemory for Filled {
        fn page_size(&self) -> usize {
            self.page_size
        }
        fn pages(&self) -> u64 {
            self.pages
        }
        fn read_page(&self, page: u64, out: &mut [u8]) {
            out.fill(page as u8);
        }
        fn migration_id(&self) -> u64 {
            1
        }
    }

    #[test]
    fn exact_pending_bounds_what_complete_sends_at_any_page_size() {
        for page_size in [512, 16 << 10, 64 << 10] {
            let (pages, batch) = (9, 4);
            let ram = Arc::new(Filled { page_size, pages });
            let log =
                Arc::new(DirtyBitmap::new(pages * page_size as u64, page_size as u64).unwrap());
            let mut s = RamState::new(1, ram, log, SetupMode::Full, false, batch).unwrap();
            assert_eq!(s.ram_geometry(), Some((page_size as u32, pages)));
            let mut w = started();
            s.setup(&mut w).unwrap();
            let before = w.bytes_sent();
            let p = s.pending(true);
            let sent = s.complete(&mut w).unwrap();
            assert_eq!(w.bytes_sent() - before, sent);
            // Page 0 is zero: its data is the whole slack.
            assert_eq!(
                p.total().get() - sent.get(),
                page_size as u64,
                "{page_size}"
            );
        }
        let big = Arc::new(Filled {
            page_size: 64 << 10,
            pages: 1,
        });
        let log = Arc::new(DirtyBitmap::new(64 << 10, 64 << 10).unwrap());
        let too_many = max_batch_pages(64 << 10) + 1;
        assert!(RamState::new(1, big, log, SetupMode::Full, false, too_many).is_err());
    }

    #[test]
    fn discards_and_page_requests() {
        let (_, mut s) = rig(6, 4, true);
        let mut w = started();
        s.setup(&mut w).unwrap();
        let p = s.pending(true);
        assert_eq!(p.must_precopy, Bytes(6 * 9 + 8 + SECTION_FRAME));
        let sent = s.postcopy_start(&mut w).unwrap();
        assert_eq!(sent, p.must_precopy);
        let n = s
            .serve(&mut w, &ram_codec::encode_page_request(4, 2))
            .unwrap();
        assert_eq!(n, Bytes(2 * (9 + PAGE_SIZE as u64) + 8 + SECTION_FRAME));
        assert_eq!(s.stats().pages_served, 2);
        assert!(s
            .serve(&mut w, &ram_codec::encode_page_request(5, 2))
            .is_err());
        assert!(s.serve(&mut w, &[0; 3]).is_err());
    }

    const SECTION_FRAME: u64 = crate::migration::frame::SECTION_OVERHEAD.get();

    /// Past 2^32 − 2 sections a page's tag saturates: a page whose last copy went out in a
    /// section after the last one the destination applied is marked again, whatever its
    /// tag; a saturated tag is marked unless every section was applied.
    #[test]
    fn a_page_sent_after_the_tags_saturate_is_redirtied_unless_every_section_was_applied() {
        let (_, mut s) = rig(4, 1, false);
        let mut w = started();
        s.setup(&mut w).unwrap();
        s.sections = u64::from(u32::MAX) - 2;
        // Pages 0, 1 and 2 go out in sections 2^32 - 2, 2^32 - 1 and 2^32 (from 1).
        for _ in 0..3 {
            s.iterate(&mut w, Bytes(1)).unwrap();
        }
        assert_eq!(s.last_section[..3], [u32::MAX - 1, u32::MAX, u32::MAX]);
        let log_pages =
            |s: &RamState| -> Vec<(u64, u64)> { s.log.take_dirty().dirty_extents().collect() };
        let _ = log_pages(&s);
        let page = PAGE_SIZE as u64;
        // The destination applied the section that carried page 1, not page 2's: page 2
        // is marked, and page 1 with it (its tag cannot tell the two apart); page 0 not.
        s.redirty_undelivered(u64::from(u32::MAX));
        assert_eq!(log_pages(&s), [(page, 2 * page)]);
        s.redirty_undelivered(u64::from(u32::MAX) - 2);
        assert_eq!(log_pages(&s), [(0, 3 * page)]);
        // Every section applied: nothing to resend.
        s.redirty_undelivered(s.sections);
        assert_eq!(log_pages(&s), []);
    }

    #[test]
    fn batch_size_is_bounded_by_the_frame_limit() {
        let ram = Arc::new(GuestRam::new(1).unwrap());
        let log = Arc::new(new_log(&ram).unwrap());
        for bad in [0, MAX_BATCH_PAGES + 1] {
            assert!(RamState::new(
                1,
                Arc::clone(&ram),
                Arc::clone(&log),
                SetupMode::Full,
                false,
                bad
            )
            .is_err());
        }
        let payload = 4
            + ram_codec::PAGES_HEADER_LEN
            + MAX_BATCH_PAGES * (ram_codec::PAGE_ENTRY_LEN + PAGE_SIZE);
        assert!(payload <= MAX_FRAME_LEN as usize);
    }
}
