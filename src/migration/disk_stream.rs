//! Disk bitmaps in the migration stream, as deltas (stream mode): the destination has an
//! image of its own (after a storage migration), and the bitmaps' changed regions travel
//! as RAM pages do, during precopy, so that only what changed since it was last sent is
//! left for the downtime. QEMU's `dirty-bitmaps` capability sends whole bitmaps after the
//! stop (`migration/block-dirty-bitmap.c`).
//!
//! Source: [`StreamDiskState`] reads each bitmap through a [`ChangeConsumer`] of its own,
//! so the disk flusher's takes and the stream's never steal each other's regions. Per
//! bitmap it sends a START section (name, granularity, disk size, flags), REGIONS
//! sections whose entries *replace* the destination's copy of a region (a `clear` removes
//! bits), and at the stop a COMPLETE section (payloads in [`super::bitmap_codec`]).
//! Sending never clears a source bit. A failed attempt re-queues every region it sent (the
//! source cannot know what the destination kept), so the retry sends them again with
//! everything changed since.
//!
//! Destination: [`StreamDiskDest`] (a [`DestState`]) builds each bitmap in memory as the
//! regions arrive; after End (or the postcopy Switchover) and before Started it opens its
//! own image, stores every bitmap into it and activates it. Regions that arrive after the
//! start (none with this source, whose postcopy switch sends everything first) are ORed
//! into the running bitmap, so the destination guest's marks are never overwritten.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::bitmap_codec::{self, BitmapSection, Start};
use super::channel::Outbound;
use super::dest_state::DestState;
use super::error::{MigrationError, Result};
use super::frame::StateId;
use super::state::{MigrationState, Pending};
use crate::bitmap::{ChangeConsumer, ChangedRegions, ConsumerStart, DirtyBitmap};
use crate::storage::Storage;
use crate::store::{BitmapStore, Recording};
use crate::units::Bytes;

/// Regions per REGIONS section.
pub const REGIONS_PER_SECTION: u64 = 64;

/// One bitmap the source streams.
#[derive(Debug)]
struct Streamed {
    name: String,
    bitmap: Arc<DirtyBitmap>,
    consumer: ChangeConsumer,
    /// Regions taken from the consumer and not all sent yet, and the next region of it to
    /// send (regions below it are sent).
    queue: Option<(ChangedRegions, u64)>,
    /// Every region taken in this attempt (sent, or in the queue): what a failure
    /// re-queues.
    taken: Option<ChangedRegions>,
    start_sent: bool,
    /// The consumer's changed regions as of the last exact query or take: the estimate's
    /// stale view of them.
    seen: u64,
}

impl Streamed {
    fn queued(&self) -> u64 {
        self.queue.as_ref().map_or(0, |(q, next)| {
            q.iter().filter(|&r| r >= *next).count() as u64
        })
    }

    /// Puts back every region taken in this attempt.
    fn requeue(&mut self) {
        if let Some(t) = self.taken.take() {
            self.consumer.requeue_changed(&t);
        }
        self.queue = None;
        self.start_sent = false;
    }
}

/// Disk bitmaps streamed to a destination with its own image: see the
/// [module documentation](self).
#[derive(Debug)]
pub struct StreamDiskState {
    id: StateId,
    name: String,
    bitmaps: Vec<Streamed>,
    overhead: Bytes,
    regions_sent: u64,
    sections_sent: u64,
    /// Wire bytes the last [`complete`](MigrationState::complete) put on the wire.
    complete_bytes: Bytes,
    /// QEMU's way, for benchmarks: nothing during precopy, every bitmap whole at the stop.
    qemu_baseline: bool,
}

impl StreamDiskState {
    /// Streams `bitmaps` (`(name, bitmap)`, at most 65,535, names of 1..=1023 bytes)
    /// under section id `id` and state name `name`. Each bitmap gets a change consumer
    /// of its own that starts with every region, so the first pass sends each whole.
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] for a bad name or too many bitmaps; a bitmap with
    /// no room for another consumer.
    pub fn new(
        id: StateId,
        name: impl Into<String>,
        bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
    ) -> Result<Self> {
        if bitmaps.len() > usize::from(u16::MAX) {
            return Err(MigrationError::InvalidInput(format!(
                "{} bitmaps in one state; at most {}",
                bitmaps.len(),
                u16::MAX
            )));
        }
        let mut out = Vec::with_capacity(bitmaps.len());
        for (n, b) in bitmaps {
            if n.is_empty() || n.len() > bitmap_codec::MAX_NAME_LEN {
                return Err(MigrationError::InvalidInput(format!(
                    "bitmap name {n:?} is not 1..=1023 bytes"
                )));
            }
            let consumer = b.add_consumer(ConsumerStart::AllRegions)?;
            let seen = b.region_count();
            out.push(Streamed {
                name: n,
                bitmap: b,
                consumer,
                queue: None,
                taken: None,
                start_sent: false,
                seen,
            });
        }
        Ok(StreamDiskState {
            id,
            name: name.into(),
            bitmaps: out,
            overhead: Bytes(0),
            regions_sent: 0,
            sections_sent: 0,
            complete_bytes: Bytes(0),
            qemu_baseline: false,
        })
    }

    /// **A benchmark baseline, not for production use.** QEMU's `dirty-bitmaps` capability
    /// (`migration/block-dirty-bitmap.c`): nothing is sent while the VM runs (its iterate
    /// sends nothing outside postcopy), the pending figure is every region of every bitmap
    /// plus each START and COMPLETE, in wire bytes (so the loop's threshold accounts for
    /// it, as QEMU's pending does), and the stop sends every bitmap whole. The destination
    /// ends with the same bitmaps; the downtime does not. QEMU sends an all-zero chunk as a
    /// flag without its bytes; this baseline sends every region's bytes. For
    /// `dbm bench migrate-disk`, which compares the two. Arguments as [`new`](Self::new).
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn qemu_baseline(
        id: StateId,
        name: impl Into<String>,
        bitmaps: Vec<(String, Arc<DirtyBitmap>)>,
    ) -> Result<Self> {
        Ok(StreamDiskState {
            qemu_baseline: true,
            ..Self::new(id, name, bitmaps)?
        })
    }

    /// [`qemu_baseline`](Self::qemu_baseline) over every in-memory bitmap of an active
    /// `store`, as [`from_store`](Self::from_store).
    ///
    /// # Errors
    /// As [`from_store`](Self::from_store).
    pub fn qemu_baseline_from_store<S: Storage>(
        id: StateId,
        name: impl Into<String>,
        store: &BitmapStore<S>,
    ) -> Result<Self> {
        Ok(StreamDiskState {
            qemu_baseline: true,
            ..Self::from_store(id, name, store)?
        })
    }

    /// Wire bytes the last [`complete`](MigrationState::complete) (the stop) put on the
    /// wire: the bitmaps' part of the bytes sent inside the downtime.
    pub fn complete_bytes(&self) -> Bytes {
        self.complete_bytes
    }

    /// Every in-memory bitmap of an active `store`, by its name.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`crate::Error::WrongState`] if the store is not active.
    pub fn from_store<S: Storage>(
        id: StateId,
        name: impl Into<String>,
        store: &BitmapStore<S>,
    ) -> Result<Self> {
        if !store.is_active() {
            return Err(crate::Error::WrongState(crate::StateProblem::NotActive).into());
        }
        let mut bitmaps = Vec::new();
        for info in store.list() {
            if let Ok(b) = store.bitmap(&info.name) {
                bitmaps.push((
                    String::from_utf8_lossy(info.name.as_bytes()).into_owned(),
                    b,
                ));
            }
        }
        Self::new(id, name, bitmaps)
    }

    /// Regions put on the wire so far, over every attempt (resends included).
    pub fn regions_sent(&self) -> u64 {
        self.regions_sent
    }

    /// REGIONS sections put on the wire so far.
    pub fn sections_sent(&self) -> u64 {
        self.sections_sent
    }

    fn region_wire(b: &Streamed) -> u64 {
        b.bitmap
            .region_size()
            .saturating_add(bitmap_codec::REGION_ENTRY_LEN as u64)
    }

    /// Wire bytes of sending `regions` of bitmap `b`, plus its START if not sent and its
    /// COMPLETE: an upper bound (every region counted at the full region size).
    fn wire(&self, b: &Streamed, regions: u64) -> Bytes {
        let section = self
            .overhead
            .get()
            .saturating_add(bitmap_codec::HEADER_LEN as u64);
        let sections = regions.div_ceil(REGIONS_PER_SECTION);
        let mut n = regions.saturating_mul(Self::region_wire(b)).saturating_add(
            sections.saturating_mul(section + bitmap_codec::REGIONS_HEADER_LEN as u64),
        );
        if !b.start_sent {
            n = n.saturating_add(section + (bitmap_codec::START_LEN + b.name.len()) as u64);
        }
        // COMPLETE.
        Bytes(n.saturating_add(section))
    }

    fn start_of(i: usize, b: &Streamed) -> Start {
        Start {
            index: i as u16,
            name: b.name.clone(),
            granularity_bits: b.bitmap.granularity().trailing_zeros() as u8,
            enabled: b.bitmap.is_enabled(),
            disk_size: b.bitmap.disk_size(),
            region_size: u32::try_from(b.bitmap.region_size()).unwrap_or(u32::MAX),
        }
    }

    /// Sends bitmap `i`'s START if needed, then its queued regions, taking more from its
    /// consumer when the queue runs out, until `budget` (or everything, if `None`).
    fn send(&mut self, out: &mut dyn Outbound, i: usize, budget: Option<Bytes>) -> Result<Bytes> {
        let mut sent = Bytes(0);
        let Some(b) = self.bitmaps.get_mut(i) else {
            return Ok(sent);
        };
        if !b.start_sent {
            sent += out.send(self.id, &bitmap_codec::encode_start(&Self::start_of(i, b)))?;
            b.start_sent = true;
        }
        let mut buf = Vec::new();
        b.seen = 0;
        loop {
            if budget.is_some_and(|bud| sent >= bud) {
                break;
            }
            if b.queue
                .as_ref()
                .is_none_or(|(q, next)| q.iter().all(|r| r < *next))
            {
                let t = b.consumer.take_changed();
                if t.is_empty() {
                    b.queue = None;
                    break;
                }
                match &mut b.taken {
                    Some(all) => all.union_with(&t),
                    None => b.taken = Some(t.clone()),
                }
                b.queue = Some((t, 0));
            }
            let Some((q, next)) = b.queue.as_mut() else {
                break;
            };
            let mut section = bitmap_codec::begin_regions(i as u16);
            let from = *next;
            let batch: Vec<u64> = q
                .iter()
                .filter(|&r| r >= from)
                .take(REGIONS_PER_SECTION as usize)
                .collect();
            let mut n = 0u32;
            for r in batch {
                buf.resize(usize::try_from(b.bitmap.region_len(r)).unwrap_or(0), 0);
                b.bitmap.serialize_region(r, &mut buf)?;
                bitmap_codec::push_region(&mut section, r, &buf);
                n += 1;
                *next = r + 1;
            }
            bitmap_codec::finish_regions(&mut section, n);
            sent += out.send(self.id, &section)?;
            self.regions_sent += u64::from(n);
            self.sections_sent += 1;
        }
        Ok(sent)
    }

    fn requeue_all(&mut self) {
        for b in &mut self.bitmaps {
            b.requeue();
        }
    }
}

impl MigrationState for StreamDiskState {
    fn id(&self) -> StateId {
        self.id
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.overhead = out.section_overhead();
        self.complete_bytes = Bytes(0);
        for b in &mut self.bitmaps {
            b.start_sent = false;
            b.taken = None;
        }
        Ok(Bytes(0))
    }

    /// Exact: wire bytes of every region queued or changed, each bitmap's START if not
    /// sent yet and its COMPLETE. The change maps are current (marks set them as they
    /// happen): the exact figure only reads their counters. The estimate counts only the
    /// regions queued or changed as of the last exact query or take, so that once
    /// everything was sent it falls to zero, as a drained RAM's does, and the loop runs
    /// the exact query that finds what changed since.
    fn pending(&mut self, exact: bool) -> Pending {
        let mut total = Bytes(0);
        if self.qemu_baseline {
            // Whole bitmaps, every time: nothing goes before the stop.
            for b in &self.bitmaps {
                total += self.wire(b, b.bitmap.region_count());
            }
            return Pending {
                must_precopy: total,
                ..Pending::default()
            };
        }
        for i in 0..self.bitmaps.len() {
            let Some(b) = self.bitmaps.get_mut(i) else {
                continue;
            };
            if exact {
                b.seen = b.consumer.changed_region_count();
            }
            let left = b.queued() + b.seen;
            if let Some(b) = self.bitmaps.get(i) {
                total += if exact {
                    self.wire(b, left)
                } else if left == 0 {
                    Bytes(0)
                } else {
                    Bytes(left.saturating_mul(Self::region_wire(b)))
                };
            }
        }
        Pending {
            must_precopy: total,
            ..Pending::default()
        }
    }

    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes> {
        let mut sent = Bytes(0);
        if self.qemu_baseline {
            return Ok(sent);
        }
        for i in 0..self.bitmaps.len() {
            if sent >= budget {
                break;
            }
            sent += self.send(out, i, Some(budget - sent))?;
        }
        Ok(sent)
    }

    /// Everything left, then each bitmap's COMPLETE. The VM is stopped and its disk I/O
    /// drained; the marks still in flight are waited for before the last take.
    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        let mut sent = Bytes(0);
        for i in 0..self.bitmaps.len() {
            if let Some(b) = self.bitmaps.get(i) {
                b.bitmap.wait_for_marks();
            }
            sent += self.send(out, i, None)?;
            sent += out.send(self.id, &bitmap_codec::encode_complete(i as u16))?;
        }
        self.complete_bytes = sent;
        Ok(sent)
    }

    fn channel_failed(&mut self) {
        self.requeue_all();
    }

    fn cancel(&mut self) {
        self.requeue_all();
    }

    fn resume_source(&mut self) {
        self.requeue_all();
    }
}

/// One bitmap as the destination receives it.
#[derive(Debug)]
struct Incoming {
    start: Start,
    bitmap: DirtyBitmap,
    complete: bool,
}

/// The destination's side of a [`StreamDiskState`]: see the [module documentation](self).
pub struct StreamDiskDest<S: Storage> {
    name: String,
    open: Box<dyn FnMut() -> crate::Result<BitmapStore<S>> + Send>,
    max_bytes: u64,
    incoming: BTreeMap<u16, Incoming>,
    store: Option<BitmapStore<S>>,
    started: bool,
}

impl<S: Storage> std::fmt::Debug for StreamDiskDest<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDiskDest")
            .field("name", &self.name)
            .field("bitmaps", &self.incoming.len())
            .field("started", &self.started)
            .finish()
    }
}

/// The default bound on the bitmaps a [`StreamDiskDest`] holds in memory.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

impl<S: Storage + 'static> StreamDiskDest<S> {
    /// The state named `name` (as the source's [`StreamDiskState`]), opening its own image
    /// with `open` (writable) when it takes over. It holds at most [`DEFAULT_MAX_BYTES`] of
    /// bitmaps in memory; a START that would exceed it is refused before anything is
    /// allocated.
    pub fn new(
        name: impl Into<String>,
        open: impl FnMut() -> crate::Result<BitmapStore<S>> + Send + 'static,
    ) -> Self {
        StreamDiskDest {
            name: name.into(),
            open: Box::new(open),
            max_bytes: DEFAULT_MAX_BYTES,
            incoming: BTreeMap::new(),
            store: None,
            started: false,
        }
    }

    /// The active store, once the destination started; it is the caller's from here on.
    pub fn take_store(&mut self) -> Option<BitmapStore<S>> {
        self.store.take()
    }

    fn start(&mut self, s: Start) -> Result<()> {
        if self.incoming.contains_key(&s.index) {
            return Err(bad(format!("bitmap {} started twice", s.index)));
        }
        let granularity = 1u64 << s.granularity_bits;
        let bytes = s.disk_size.div_ceil(granularity).div_ceil(8);
        let held: u64 = self
            .incoming
            .values()
            .map(|i| i.bitmap.serialized_len())
            .sum();
        if held.saturating_add(bytes) > self.max_bytes {
            return Err(MigrationError::InvalidInput(format!(
                "bitmap {:?} of {bytes} bytes would exceed this destination's limit of {}",
                s.name, self.max_bytes
            )));
        }
        let bitmap =
            DirtyBitmap::with_region_size(s.disk_size, granularity, u64::from(s.region_size))?;
        bitmap.set_enabled(s.enabled);
        self.incoming.insert(
            s.index,
            Incoming {
                start: s,
                bitmap,
                complete: false,
            },
        );
        Ok(())
    }

    fn regions(&mut self, index: u16, regions: &[(u64, &[u8])]) -> Result<()> {
        let Some(inc) = self.incoming.get_mut(&index) else {
            return Err(bad(format!("regions of bitmap {index} before its START")));
        };
        if inc.complete {
            return Err(bad(format!("regions of bitmap {index} after its COMPLETE")));
        }
        // Check every entry first, so a bad section changes nothing.
        for &(r, bytes) in regions {
            if r >= inc.bitmap.region_count() || bytes.len() as u64 != inc.bitmap.region_len(r) {
                return Err(bad(format!(
                    "region {r} of {} bytes does not fit bitmap {index}",
                    bytes.len()
                )));
            }
        }
        let running = self
            .store
            .as_ref()
            .and_then(|st| st.bitmap(inc.start.name.as_bytes()).ok());
        for &(r, bytes) in regions {
            match &running {
                // After the start: OR into the running bitmap, never over its marks.
                Some(live) => or_region(live, r, bytes)?,
                None => inc.bitmap.load_region(r, bytes)?,
            }
        }
        Ok(())
    }
}

fn bad(reason: String) -> MigrationError {
    super::frame::FrameError::payload("bitmap", reason).into()
}

/// Marks in `live` every bit set in `bytes`, region `r` of a bitmap of `live`'s geometry.
fn or_region(live: &DirtyBitmap, r: u64, bytes: &[u8]) -> Result<()> {
    let (start, _) = live.region_disk_range(r);
    let g = live.granularity();
    for (i, &byte) in bytes.iter().enumerate() {
        for bit in 0..8u64 {
            if byte & (1 << bit) != 0 {
                let off = start + (i as u64 * 8 + bit) * g;
                if off < live.disk_size() {
                    live.mark_dirty(off, 1);
                }
            }
        }
    }
    Ok(())
}

impl<S: Storage + 'static> DestState for StreamDiskDest<S> {
    fn name(&self) -> &str {
        &self.name
    }

    fn hello(&mut self, _id: StateId) -> Result<()> {
        // Every region comes again in this attempt: the source re-queued all it sent.
        self.incoming.clear();
        self.store = None;
        self.started = false;
        Ok(())
    }

    fn section(&mut self, payload: &[u8]) -> Result<()> {
        match bitmap_codec::decode(payload)? {
            BitmapSection::Start(s) => self.start(s),
            BitmapSection::Regions { index, regions } => self.regions(index, &regions),
            BitmapSection::Complete { index } => match self.incoming.get_mut(&index) {
                Some(i) => {
                    i.complete = true;
                    Ok(())
                }
                None => Err(bad(format!("COMPLETE of bitmap {index} before its START"))),
            },
        }
    }

    /// Every bitmap complete, the image opened, each bitmap stored into it (added if
    /// missing, with the source's granularity and recording), then activated.
    fn before_start(&mut self) -> Result<()> {
        if let Some((i, _)) = self.incoming.iter().find(|(_, inc)| !inc.complete) {
            return Err(bad(format!("bitmap {i} never completed")));
        }
        let mut st = (self.open)()?;
        for inc in self.incoming.values() {
            let s = &inc.start;
            if st.disk_size() != s.disk_size {
                return Err(MigrationError::InvalidInput(format!(
                    "bitmap {:?} covers {} bytes, this image {}",
                    s.name,
                    s.disk_size,
                    st.disk_size()
                )));
            }
            let existing = st
                .list()
                .into_iter()
                .find(|b| b.name.as_bytes() == s.name.as_bytes());
            // A bitmap of that name that is inconsistent (an earlier attempt that took
            // over and died left it in_use) or of another granularity is replaced: the
            // source sent this one whole.
            let stale = existing
                .as_ref()
                .is_some_and(|b| b.in_use || b.granularity != 1u64 << s.granularity_bits);
            if stale {
                st.remove(s.name.as_bytes())?;
            }
            if existing.is_none() || stale {
                let rec = if s.enabled {
                    Recording::Enabled
                } else {
                    Recording::Disabled
                };
                st.add(&s.name, 1u64 << s.granularity_bits, rec)?;
            }
            st.store(s.name.as_bytes(), &inc.bitmap)?;
        }
        st.activate()?;
        self.store = Some(st);
        self.started = true;
        Ok(())
    }

    fn failed(&mut self) {
        if let Some(mut st) = self.store.take() {
            let _ = st.inactivate();
        }
        self.started = false;
    }
}
