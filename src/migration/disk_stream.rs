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
//! bits), and at the stop a COMPLETE section (payloads in [`super::bitmap_codec`]). Every
//! section carries the state's next sequence number, never reused within a migration.
//! Sending never clears a source bit.
//!
//! **A retry sends only what changed since.** The source remembers, per region, the
//! sequence number of the section that last carried it since the destination last
//! reported. A failed attempt leaves those in doubt. Every attempt's setup sends a QUERY
//! (before it, the destination may walk its image for the take-over:
//! [`StreamDiskDest::with_prewalk`]); the destination answers (a Report frame) with the last sequence number it
//! applied, `n`, of the data it kept for this migration (0 if it kept nothing). The
//! destination applies sections whole and in stream order, so it holds every section up to
//! `n` and none after: the source re-queues only the regions last carried after `n`
//! (every region changed since its send is in the change consumer already). A report of
//! 0 (a new destination process, another migration, kept data dropped) or one below an
//! earlier report re-queues every region and resends every START, which resets the
//! destination's copy: any doubt resends. A report above the last number sent is refused
//! ([`ProtocolError::ReportBeyondSent`]): the destination claims data it was never sent.
//!
//! Destination: [`StreamDiskDest`] (a [`DestState`]) builds each bitmap in memory as the
//! regions arrive; after End (or the postcopy Switchover) and before Started it opens its
//! own image, checks everything that could refuse, then activates it holding every bitmap
//! (no crash point shows one clean without the source's bits). A failed attempt's bitmaps are
//! kept, bound to the migration ([`Binding`]: its id, and its token when the destination
//! issues nonces) and to the source stream that sent them (a random id in its STARTs and
//! QUERYs: a new source numbers from 1 again), and resumed only by a QUERY of that stream
//! in an attempt of the same migration; an attempt that does not resume them drops them
//! when a START of its own would not fit in the memory bound beside them. Regions that
//! arrive after the start (postcopy, with
//! [`defer_to_postcopy`](StreamDiskState::defer_to_postcopy)) are ORed into the running
//! bitmap, so the destination guest's marks are never overwritten.
//!
//! Each bitmap records at the destination as its START said. The source checks at the stop
//! that it still records so ([`MigrationError::RecordingChanged`] if not, before anything of
//! the stop is sent), so that the destination never stops recording where the source did.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::bitmap_codec::{self, BitmapSection, RegionBody, Start};
use super::channel::Outbound;
use super::dest_state::{Binding, DestState};
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{StateId, MAX_FRAME_LEN};
use super::state::{MigrationState, Pending};
use crate::bitmap::{ChangeConsumer, ChangedRegions, ConsumerStart, DirtyBitmap, IncompleteHold};
use crate::storage::Storage;
use crate::store::{
    BitmapState, BitmapStore, Preloaded, Recording, ACTIVE_MEMORY_LIMIT, PRELOAD_WALK_BUDGET,
};
use crate::units::Bytes;

/// Regions per REGIONS section, at most: fewer where 64 raw entries of a bitmap's region
/// size would not fit in one frame (at most 7 of 2 MiB).
pub const REGIONS_PER_SECTION: u64 = 64;

/// What a REGIONS section's payload may hold of region entries: the frame's limit less the
/// section's own headers and a margin for the frame's wrapping of a section (its state id).
const SECTION_ENTRY_ROOM: u64 = MAX_FRAME_LEN as u64
    - (bitmap_codec::HEADER_LEN + bitmap_codec::REGIONS_HEADER_LEN) as u64
    - 64;

/// A fresh stream id: random, never 0.
fn new_stream_id() -> u64 {
    loop {
        let id = crate::rng::unique_u64();
        if id != 0 {
            return id;
        }
    }
}

/// One bitmap the source streams.
#[derive(Debug)]
struct Streamed {
    name: String,
    bitmap: Arc<DirtyBitmap>,
    consumer: ChangeConsumer,
    /// Regions taken from the consumer and not all sent yet, and the next region of it to
    /// send (regions below it are sent).
    queue: Option<(ChangedRegions, u64)>,
    /// The sequence number of the START the destination holds, or may hold if the attempt
    /// that sent it is in doubt; `None`: it must be sent (again).
    start_seq: Option<u64>,
    /// The recording flag that START carried (meaningful while `start_seq` is `Some`).
    start_enabled: bool,
    /// Per region, the sequence number of the section that last carried it since the
    /// destination's last report (0: none). Empty until the first send.
    sent_seq: Vec<u64>,
    /// The consumer's changed regions as of the last exact query or take: the estimate's
    /// stale view of them.
    seen: u64,
    /// Wire bytes of the entries of the regions queued and changed, as the last exact
    /// query counted them (each as [`bitmap_codec::push_region`] will encode it).
    seen_bytes: u64,
    /// A running average of the wire bytes of one region entry as sent (the raw size
    /// until the first section): the estimate's cost per region.
    entry_avg: u64,
}

impl Streamed {
    /// Wire bytes of one region entry sent raw: the most any entry takes.
    fn entry_max(&self) -> u64 {
        self.bitmap
            .region_size()
            .saturating_add(bitmap_codec::REGION_ENTRY_LEN as u64)
    }

    /// Regions in one REGIONS section: [`REGIONS_PER_SECTION`], or as many raw entries as
    /// fit in a frame, at least 1 (a region is at most 2 MiB, a frame's payload 16 MiB).
    /// With 64 entries of 2 MiB a dense section would pass the frame's limit and fail
    /// every attempt.
    fn per_section(&self) -> u64 {
        (SECTION_ENTRY_ROOM / self.entry_max().max(1)).clamp(1, REGIONS_PER_SECTION)
    }

    /// Counts, exactly, the regions queued and not sent and those changed since the last
    /// take, and the wire bytes of their entries as they are now; hands the changed ones
    /// back to the consumer. A region in both is counted twice (an upper bound).
    fn count_exact(&mut self) {
        let taken = self.consumer.take_changed();
        let mut buf = Vec::new();
        let mut scratch = Vec::new();
        let mut bytes = 0u64;
        let queued = self
            .queue
            .as_ref()
            .map(|(q, next)| (q, *next))
            .into_iter()
            .flat_map(|(q, next)| q.iter().filter(move |&r| r >= next));
        for r in taken.iter().chain(queued) {
            buf.resize(usize::try_from(self.bitmap.region_len(r)).unwrap_or(0), 0);
            bytes = bytes.saturating_add(match self.bitmap.serialize_region(r, &mut buf) {
                Ok(()) => bitmap_codec::region_entry_len(&buf, &mut scratch),
                Err(_) => self.entry_max(),
            });
        }
        if !taken.is_empty() {
            self.consumer.requeue_changed(&taken);
        }
        self.seen = taken.len();
        self.seen_bytes = bytes;
    }

    fn queued(&self) -> u64 {
        self.queue.as_ref().map_or(0, |(q, next)| {
            q.iter().filter(|&r| r >= *next).count() as u64
        })
    }

    /// REGIONS sections that sending what is left takes: the rest of the queue in
    /// sections of its own, then the changed regions in others (the order
    /// [`StreamDiskState::send`] takes them in), so each part rounds up on its own. One
    /// run of `queued + seen` regions would price up to one section less than the stop
    /// sends.
    fn sections_left(&self) -> u64 {
        let p = self.per_section();
        self.queued().div_ceil(p) + self.seen.div_ceil(p)
    }

    /// Hands the regions taken but not sent back to the consumer.
    fn requeue_unsent(&mut self) {
        if let Some((q, next)) = self.queue.take() {
            let mut unsent = ChangedRegions::empty(q.region_count());
            for r in q.iter().filter(|&r| r >= next) {
                unsent.insert(r);
            }
            if !unsent.is_empty() {
                self.consumer.requeue_changed(&unsent);
            }
        }
    }

    /// The destination holds nothing of this bitmap: every region and the START again.
    fn resend_all(&mut self) {
        self.queue = None;
        self.consumer
            .requeue_changed(&ChangedRegions::all(self.bitmap.region_count()));
        self.start_seq = None;
        self.sent_seq.clear();
    }

    /// The destination holds every section up to `applied` and none after: re-queues the
    /// regions last carried after it (a START after it, or one whose recording flag is no
    /// longer the bitmap's: the whole bitmap, which the resent START resets there).
    fn resolve(&mut self, applied: u64) {
        if self.start_seq.is_none_or(|s| s > applied)
            || self.bitmap.is_enabled() != self.start_enabled
        {
            self.resend_all();
            return;
        }
        let mut lost = ChangedRegions::empty(self.bitmap.region_count());
        for (r, &seq) in self.sent_seq.iter().enumerate() {
            if seq > applied {
                lost.insert(r as u64);
            }
        }
        if !lost.is_empty() {
            self.consumer.requeue_changed(&lost);
        }
        self.sent_seq.clear();
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
    /// This source stream's id (random, never 0), in its STARTs and QUERYs: the
    /// destination resumes only what this stream sent, whose numbers it knows.
    stream_id: u64,
    /// The next section's sequence number (the first is 1; never reused).
    next_seq: u64,
    /// The destination's last accepted report (0: none, or it held nothing).
    confirmed: u64,
    /// The setup sent a QUERY and its Report has not come.
    awaiting: bool,
    /// An attempt failed and no report since says what the destination holds.
    unresolved: bool,
    /// Regions due when the last report was taken (everything changed since its send, or
    /// not held), over every bitmap.
    due_after_report: Option<u64>,
    /// Wire bytes the last [`complete`](MigrationState::complete) put on the wire.
    complete_bytes: Bytes,
    /// QEMU's way, for benchmarks: nothing during precopy, every bitmap whole at the stop.
    qemu_baseline: bool,
    /// Regions may go after a postcopy switch ([`defer_to_postcopy`](Self::defer_to_postcopy)).
    postcopy: bool,
    /// The postcopy switch happened: what is left is pushed to a running destination.
    switched: bool,
    /// QEMU's way ([`qemu_baseline`](Self::qemu_baseline)): this attempt's stop sent every
    /// bitmap whole, so nothing is left (at a postcopy switch too: the push after it ends
    /// only once every state's figure is 0).
    sent_whole: bool,
}

impl StreamDiskState {
    /// Streams `bitmaps` (`(name, bitmap)`, at most 65,535, names of 1..=1023 bytes)
    /// under section id `id` and state name `name`. Each bitmap gets a change consumer
    /// of its own that starts with every region, so the first pass sends each whole.
    /// While the state lives, a store holding one of these bitmaps refuses to remove it
    /// ([`crate::Error::Busy`]), as QEMU refuses to remove a bitmap it migrates: the
    /// stream never reads a bitmap its store no longer marks.
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
            let entry_max = b
                .region_size()
                .saturating_add(bitmap_codec::REGION_ENTRY_LEN as u64);
            out.push(Streamed {
                name: n,
                bitmap: b,
                consumer,
                queue: None,
                start_seq: None,
                start_enabled: false,
                sent_seq: Vec::new(),
                seen,
                seen_bytes: seen.saturating_mul(entry_max),
                entry_avg: entry_max,
            });
        }
        Ok(StreamDiskState {
            id,
            name: name.into(),
            bitmaps: out,
            overhead: Bytes(0),
            regions_sent: 0,
            sections_sent: 0,
            stream_id: new_stream_id(),
            next_seq: 1,
            confirmed: 0,
            awaiting: false,
            unresolved: false,
            due_after_report: None,
            complete_bytes: Bytes(0),
            qemu_baseline: false,
            postcopy: false,
            switched: false,
            sent_whole: false,
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

    /// With `on`, regions still to send at a postcopy switch go after it, as RAM's pages
    /// do: they count as `can_postcopy`, the switch sends only each bitmap's START (if not
    /// sent) and its COMPLETE, and the loop's background push sends the rest to the running
    /// destination, which ORs them into its live bitmap, never over the marks its guest
    /// made since it started. The destination's bitmap is then a superset of the source's
    /// at the stop (a bit the source cleared after sending it stays until the next
    /// backup), never missing a mark of either side. A precopy switchover still sends
    /// everything before the start.
    #[must_use]
    pub fn defer_to_postcopy(mut self, on: bool) -> Self {
        self.postcopy = on;
        self
    }

    /// Wire bytes the last [`complete`](MigrationState::complete) (the stop) put on the
    /// wire: the bitmaps' part of the bytes sent inside the downtime.
    pub fn complete_bytes(&self) -> Bytes {
        self.complete_bytes
    }

    /// Every bitmap of an active `store`, by its name. A bitmap left out would leave the
    /// destination's own bitmap of that name, if it has one, as it was: clean where the
    /// source's is dirty. So a bitmap that cannot be streamed refuses the whole state, as
    /// QEMU refuses a migration with an inconsistent bitmap.
    ///
    /// # Errors
    /// As [`new`](Self::new); [`crate::Error::WrongState`] if the store is not active, or
    /// is active in durable mode ([`crate::StateProblem::Durable`]: it hands out no live
    /// bitmap; migrate it on shared storage); [`crate::Error::Inconsistent`] for an
    /// inconsistent bitmap (remove it first); [`crate::Error::Unsupported`] for a name
    /// that is not UTF-8 (the stream's STARTs carry UTF-8 names); [`crate::Error::Arriving`]
    /// for a bitmap still arriving from an incoming migration's postcopy push (the
    /// regions still to come would reach this host's copy alone, never the next one's).
    pub fn from_store<S: Storage>(
        id: StateId,
        name: impl Into<String>,
        store: &BitmapStore<S>,
    ) -> Result<Self> {
        if !store.is_active() {
            return Err(crate::Error::WrongState(crate::StateProblem::NotActive).into());
        }
        if store.is_durable() {
            return Err(crate::Error::WrongState(crate::StateProblem::Durable).into());
        }
        let mut bitmaps = Vec::new();
        for info in store.list() {
            let Some(utf8) = info.name.to_str() else {
                return Err(crate::Error::Unsupported(format!(
                    "bitmap {:?} has a name that is not UTF-8, which the stream cannot carry",
                    info.name
                ))
                .into());
            };
            let bm = store.bitmap(info.name.as_bytes())?;
            if bm.is_incomplete() {
                return Err(crate::Error::Arriving { name: info.name }.into());
            }
            bitmaps.push((utf8.to_owned(), bm));
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

    /// Wire bytes of sending region entries of `entries` bytes in all, in `sections`
    /// REGIONS sections, of bitmap `b`, plus its START if not sent and its COMPLETE.
    fn wire(&self, b: &Streamed, sections: u64, entries: u64) -> Bytes {
        self.wire_with(b, sections, entries, b.start_seq.is_none())
    }

    /// Wire bytes of sending every region of bitmap `b` raw, its START and its COMPLETE
    /// (QEMU's whole bitmap; ours while the destination's copy is unknown, an upper bound).
    fn wire_all(&self, b: &Streamed) -> Bytes {
        let regions = b.bitmap.region_count();
        let sections = regions.div_ceil(b.per_section());
        self.wire_with(b, sections, regions.saturating_mul(b.entry_max()), true)
    }

    /// Wire bytes of region entries of `entries` bytes in all, in `sections` REGIONS
    /// sections of bitmap `b`, with its START if `start`, and its COMPLETE (a header and
    /// its flags byte); each section also pays the channel's overhead.
    fn wire_with(&self, b: &Streamed, sections: u64, entries: u64, start: bool) -> Bytes {
        let section = self
            .overhead
            .get()
            .saturating_add(bitmap_codec::HEADER_LEN as u64);
        let mut n = entries.saturating_add(
            sections.saturating_mul(section + bitmap_codec::REGIONS_HEADER_LEN as u64),
        );
        if start {
            n = n.saturating_add(section + (bitmap_codec::START_LEN + b.name.len()) as u64);
        }
        Bytes(n.saturating_add(section + bitmap_codec::COMPLETE_LEN as u64))
    }

    fn start_of(i: usize, b: &Streamed, stream: u64) -> Start {
        Start {
            index: i as u16,
            stream,
            name: b.name.clone(),
            granularity_bits: b.bitmap.granularity().trailing_zeros() as u8,
            enabled: b.bitmap.is_enabled(),
            disk_size: b.bitmap.disk_size(),
            region_size: u32::try_from(b.bitmap.region_size()).unwrap_or(u32::MAX),
        }
    }

    /// The next section's sequence number.
    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq = s.saturating_add(1);
        s
    }

    /// Sends bitmap `i`'s START if needed, then its queued regions, taking more from its
    /// consumer when the queue runs out, until `budget` (or everything, if `None`).
    ///
    /// Each region's section number is recorded before the section goes to the channel: a
    /// send that fails may still have put it on the wire, so it is in doubt like the rest.
    fn send(&mut self, out: &mut dyn Outbound, i: usize, budget: Option<Bytes>) -> Result<Bytes> {
        let mut sent = Bytes(0);
        if i >= self.bitmaps.len() {
            return Ok(sent);
        }
        let id = self.id;
        if self.bitmaps.get(i).is_some_and(|b| b.start_seq.is_none()) {
            let seq = self.seq();
            let Some(b) = self.bitmaps.get_mut(i) else {
                return Ok(sent);
            };
            b.start_seq = Some(seq);
            let start = Self::start_of(i, b, self.stream_id);
            b.start_enabled = start.enabled;
            sent += out.send(id, &bitmap_codec::encode_start(&start, seq))?;
        }
        let mut buf = Vec::new();
        let mut scratch = Vec::new();
        // QEMU's sections carry every region's bytes.
        let raw = self.qemu_baseline;
        loop {
            if budget.is_some_and(|bud| sent >= bud) {
                break;
            }
            let seq = self.next_seq;
            let Some(b) = self.bitmaps.get_mut(i) else {
                break;
            };
            if b.queue
                .as_ref()
                .is_none_or(|(q, next)| q.iter().all(|r| r < *next))
            {
                // `seen` counts the consumer's regions not taken yet, and only a take
                // moves them to the queue. Were it reset by a turn that sends queued
                // regions alone, a postcopy push whose budget ran out with the queue's last
                // section would price nothing left while the consumer still held the
                // regions the stop's exact count found, and End would go without them.
                b.seen = 0;
                let t = b.consumer.take_changed();
                if t.is_empty() {
                    b.queue = None;
                    break;
                }
                b.queue = Some((t, 0));
            }
            let per_section = usize::try_from(b.per_section()).unwrap_or(1);
            let Some((q, next)) = b.queue.as_mut() else {
                break;
            };
            if b.sent_seq.is_empty() {
                b.sent_seq = vec![0; usize::try_from(b.bitmap.region_count()).unwrap_or(0)];
            }
            let mut section = bitmap_codec::begin_regions(i as u16, seq);
            let from = *next;
            let batch: Vec<u64> = q.iter().filter(|&r| r >= from).take(per_section).collect();
            let mut entries = 0u64;
            for &r in &batch {
                buf.resize(usize::try_from(b.bitmap.region_len(r)).unwrap_or(0), 0);
                b.bitmap.serialize_region(r, &mut buf)?;
                entries += if raw {
                    bitmap_codec::push_region_raw(&mut section, r, &buf)
                } else {
                    bitmap_codec::push_region(&mut section, r, &buf, &mut scratch)
                };
            }
            if let Some(n) = u64::try_from(batch.len()).ok().filter(|&n| n > 0) {
                // Three parts the old average, one part this section's.
                b.entry_avg = (b.entry_avg.saturating_mul(3) + entries.div_ceil(n)).div_ceil(4);
            }
            // The section is whole: from here it counts as sent (in doubt until a report),
            // so that no number is recorded for a section that never went.
            for &r in &batch {
                if let Some(s) = b.sent_seq.get_mut(r as usize) {
                    *s = seq;
                }
            }
            if let Some(&last) = batch.last() {
                *next = last + 1;
            }
            let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            bitmap_codec::finish_regions(&mut section, n);
            self.next_seq = seq.saturating_add(1);
            self.regions_sent += u64::from(n);
            self.sections_sent += 1;
            sent += out.send(id, &section)?;
        }
        Ok(sent)
    }

    /// Every bitmap's every region and START again: the destination holds nothing sure.
    fn resend_all(&mut self) {
        for b in &mut self.bitmaps {
            b.resend_all();
        }
        self.confirmed = 0;
        self.unresolved = false;
        self.awaiting = false;
    }

    /// The attempt failed: what was taken and not sent goes back to the consumers; what
    /// was sent stays in doubt until the next attempt's report.
    fn failed(&mut self) {
        for b in &mut self.bitmaps {
            b.requeue_unsent();
        }
        self.awaiting = false;
        if self.qemu_baseline {
            // QEMU's way sends whole bitmaps at every stop.
            self.sent_whole = false;
            self.resend_all();
        } else if self.next_seq > 1 {
            self.unresolved = true;
        }
    }

    /// At the stop, before anything of it is sent: every bitmap whose START the destination
    /// holds (or may hold) must still record as that START said, or the destination would
    /// record its guest's writes where the source stopped recording (or the reverse). The
    /// START cannot go twice in one attempt, so a changed one fails the stop; it and every
    /// region go again in the next attempt (the START replaces the destination's copy).
    fn check_recording(&mut self) -> Result<()> {
        let mut changed = None;
        for b in &mut self.bitmaps {
            if b.start_seq.is_some() && b.bitmap.is_enabled() != b.start_enabled {
                changed.get_or_insert_with(|| MigrationError::RecordingChanged {
                    bitmap: b.name.clone(),
                    enabled_at_start: b.start_enabled,
                });
                b.resend_all();
            }
        }
        changed.map_or(Ok(()), Err)
    }

    /// Regions of every bitmap due when the destination's last report was taken: those it
    /// did not hold or that changed since their send (`None` before any report). Against
    /// [`region_count`](Self::region_count), what a retry saved.
    pub fn due_after_report(&self) -> Option<u64> {
        self.due_after_report
    }

    /// Regions of every bitmap.
    pub fn region_count(&self) -> u64 {
        self.bitmaps.iter().map(|b| b.bitmap.region_count()).sum()
    }

    /// Sections numbered so far (the last sequence number used).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.saturating_sub(1)
    }
}

impl MigrationState for StreamDiskState {
    fn id(&self) -> StateId {
        self.id
    }

    fn name(&self) -> &str {
        &self.name
    }

    /// Learns the framing, and asks the destination what it kept (a QUERY: the loop waits
    /// for the Report before the first turn). After an attempt that sent anything the
    /// answer says what to send again; on every attempt the wait lets the destination make
    /// its take-over's reference walk before it answers
    /// ([`StreamDiskDest::with_prewalk`]), so that the walk is over before anything of the
    /// attempt is sent, and never inside the downtime. QEMU's way
    /// ([`qemu_baseline`](Self::qemu_baseline)) asks nothing: it sends nothing before the
    /// stop.
    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.overhead = out.section_overhead();
        self.complete_bytes = Bytes(0);
        self.awaiting = false;
        self.switched = false;
        self.sent_whole = false;
        if self.qemu_baseline {
            return Ok(Bytes(0));
        }
        // Waiting before anything is sent: whatever the answer, nothing of this attempt is
        // lost to it.
        self.awaiting = true;
        out.send(self.id, &bitmap_codec::encode_query(self.stream_id))
    }

    fn awaits_report(&self) -> bool {
        self.awaiting
    }

    /// The destination's Report: it holds every section up to `n` and none after. Regions
    /// last carried after `n` go back to the queue; `n` = 0 (it holds nothing) or below an
    /// earlier report (it lost what it said it held) resends everything.
    ///
    /// # Errors
    /// [`ProtocolError::ReportBeyondSent`] when `n` is above the last section sent, a
    /// Report that does not decode, or one that was not asked for; nothing changes then.
    fn report(&mut self, payload: &[u8]) -> Result<()> {
        let n = bitmap_codec::decode_report(payload)?;
        if !self.awaiting {
            return Err(ProtocolError::UnexpectedMessage {
                kind: super::frame::FrameKind::Report,
                when: "to a state that asked nothing",
            }
            .into());
        }
        let sent = self.last_seq();
        if n > sent {
            return Err(ProtocolError::ReportBeyondSent {
                state: self.id,
                reported: n,
                sent,
            }
            .into());
        }
        self.awaiting = false;
        if n == 0 || n < self.confirmed {
            self.resend_all();
        } else {
            for b in &mut self.bitmaps {
                b.resolve(n);
            }
            self.confirmed = n;
            self.unresolved = false;
        }
        self.due_after_report = Some(
            self.bitmaps
                .iter()
                .map(|b| b.consumer.changed_region_count())
                .sum(),
        );
        Ok(())
    }

    /// Exact: wire bytes of every region queued or changed, each bitmap's START if not
    /// sent yet and its COMPLETE. The change maps are current (marks set them as they
    /// happen): the exact figure takes each consumer's changed regions, serializes and
    /// sparse-encodes each to learn its entry's length, and puts them back (as
    /// `docs/DESIGN.md` says). The estimate counts only the
    /// regions queued or changed as of the last exact query or take, so that once
    /// everything was sent it falls to zero, as a drained RAM's does, and the loop runs
    /// the exact query that finds what changed since. After a failure, until the
    /// destination's report says what it holds, every region counts (it may hold nothing).
    fn pending(&mut self, exact: bool) -> Pending {
        let mut total = Bytes(0);
        if self.sent_whole {
            return Pending::default();
        }
        if self.qemu_baseline || self.unresolved || self.awaiting {
            // Whole bitmaps: QEMU's way every time; ours while the destination's copy is
            // unknown.
            for b in &self.bitmaps {
                total += self.wire_all(b);
            }
            return Pending {
                must_precopy: total,
                // QEMU's way sends nothing before the stop.
                stop_only: if self.qemu_baseline { total } else { Bytes(0) },
                ..Pending::default()
            };
        }
        let mut late = Bytes(0);
        for i in 0..self.bitmaps.len() {
            let Some(b) = self.bitmaps.get_mut(i) else {
                continue;
            };
            if exact {
                b.count_exact();
            }
            let left = b.queued() + b.seen;
            // The entries as the exact query encoded them; the estimate at the average.
            let entries = if exact {
                b.seen_bytes
            } else {
                left.saturating_mul(b.entry_avg)
            };
            if let Some(b) = self.bitmaps.get(i) {
                // Only regions, so that it reaches 0 once they are all sent.
                let estimate = Bytes(entries);
                if self.switched {
                    // Pushed to the running destination.
                    late += estimate;
                } else if self.postcopy {
                    // START and COMPLETE go at the switch; the regions may follow it.
                    if exact {
                        let fixed = self.wire(b, 0, 0);
                        total += fixed;
                        late += self.wire(b, b.sections_left(), entries) - fixed;
                    } else {
                        late += estimate;
                    }
                } else if exact {
                    total += self.wire(b, b.sections_left(), entries);
                } else {
                    total += estimate;
                }
            }
        }
        Pending {
            must_precopy: total,
            can_postcopy: late,
            ..Pending::default()
        }
    }

    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes> {
        let mut sent = Bytes(0);
        if self.qemu_baseline || self.awaiting {
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
    ///
    /// # Errors
    /// [`MigrationError::RecordingChanged`], before anything is sent, when a bitmap's
    /// recording flag is no longer the one its START carried; the channel's errors.
    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        if self.awaiting {
            // No report came (a loop that did not wait for it): the destination's copy is
            // unknown, so every START and region goes again, and the STARTs reset it.
            self.resend_all();
        }
        self.check_recording()?;
        let mut sent = Bytes(0);
        for i in 0..self.bitmaps.len() {
            if let Some(b) = self.bitmaps.get(i) {
                b.bitmap.wait_for_marks();
            }
            sent += self.send(out, i, None)?;
            let seq = self.seq();
            sent += out.send(
                self.id,
                &bitmap_codec::encode_complete(i as u16, seq, false),
            )?;
        }
        self.sent_whole = self.qemu_baseline;
        self.complete_bytes = sent;
        Ok(sent)
    }

    /// With [`defer_to_postcopy`](StreamDiskState::defer_to_postcopy): each bitmap's START
    /// if not sent, and its COMPLETE; the regions follow in the background push. Without:
    /// everything now ([`complete`](MigrationState::complete)).
    ///
    /// # Errors
    /// As [`complete`](MigrationState::complete).
    fn postcopy_start(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        if !self.postcopy || self.qemu_baseline {
            return self.complete(out);
        }
        if self.awaiting {
            self.resend_all();
        }
        self.check_recording()?;
        let mut sent = Bytes(0);
        for i in 0..self.bitmaps.len() {
            if let Some(b) = self.bitmaps.get_mut(i) {
                b.bitmap.wait_for_marks();
                // The push after the switch ends once `pending` counts nothing left: it
                // must count what the consumer holds now, whether or not an exact figure
                // was taken since the VM stopped.
                b.seen = b.seen.max(b.consumer.changed_region_count());
            }
            // A zero budget sends the START, if needed, and no region.
            sent += self.send(out, i, Some(Bytes(0)))?;
            let seq = self.seq();
            sent += out.send(self.id, &bitmap_codec::encode_complete(i as u16, seq, true))?;
        }
        self.switched = true;
        self.complete_bytes = sent;
        Ok(sent)
    }

    fn channel_failed(&mut self) {
        self.failed();
    }

    fn cancel(&mut self) {
        self.failed();
    }

    fn resume_source(&mut self) {
        self.failed();
    }
}

/// One bitmap as the destination receives it.
#[derive(Debug)]
struct Incoming {
    start: Start,
    /// Shared with the store once it is activated with it (`before_start`).
    bitmap: Arc<DirtyBitmap>,
    complete: bool,
    /// Its COMPLETE said regions may follow the start (a postcopy push).
    more: bool,
    /// The bitmap the store holds for it, from the start on: late regions and the all-dirty
    /// mark go there, also once the caller took the store ([`StreamDiskDest::take_store`]).
    live: Option<Arc<DirtyBitmap>>,
    /// From a postcopy start until the push ends: `live` is incomplete, and the store holding
    /// it refuses to copy, remove, disable or stop it meanwhile ([`crate::Error::Arriving`]).
    /// Dropped without completing (the push broke off, or this destination went away), it
    /// fills `live`.
    hold: Option<IncompleteHold>,
}

/// The bitmaps of one migration as this destination holds them, and the last section
/// number it applied to them (0: none). Sections are applied whole and in order, so this
/// holds exactly every section up to `applied` the source sent.
#[derive(Debug, Default)]
struct Held {
    incoming: BTreeMap<u16, Incoming>,
    applied: u64,
    /// The source stream whose sections these are (its QUERY or first START says).
    stream: Option<u64>,
}

/// The destination's side of a [`StreamDiskState`]: see the [module documentation](self).
pub struct StreamDiskDest<S: Storage> {
    name: String,
    open: Box<dyn FnMut() -> crate::Result<BitmapStore<S>> + Send>,
    /// Opens the image read-only beside a writer, for the take-over's reference walk made
    /// during the precopy ([`with_prewalk`](StreamDiskDest::with_prewalk)).
    prewalk_open: Option<Box<dyn FnMut() -> crate::Result<BitmapStore<S>> + Send>>,
    /// The walk made in the current attempt (held empty when it could not be made).
    prewalk: Option<Preloaded>,
    /// The last take-over was given a walk made during the precopy.
    took_over_from_prewalk: bool,
    /// [`file`](StreamDiskDest::file)'s mark that the current attempt's walk dropped the
    /// image's cache, which the next writable open takes: cleared at every Hello, so that
    /// a drop counts for its own attempt alone.
    cache_dropped: Option<super::disk::CacheDrop>,
    max_bytes: u64,
    /// The migration of the current attempt.
    binding: Binding,
    /// What the current attempt holds.
    current: Held,
    /// Bitmaps whose START came in the current attempt (a kept one's may be replaced).
    started_now: BTreeSet<u16>,
    /// Sections of the current attempt so far.
    sections: u64,
    /// The current attempt resumed the kept bitmaps.
    resumed: bool,
    /// What a failed attempt left, and the migration it belongs to.
    kept: Option<(Binding, Held)>,
    store: Option<BitmapStore<S>>,
    /// The names under which the take-over put the stream's copy into `store` (adopted in
    /// place of the image's own, or added once the image's own was removed): the only
    /// bitmaps [`failed`](DestState::failed) removes. A name still waiting for its
    /// removal when the take-over failed holds the image's own bitmap, untouched.
    installed: Vec<String>,
    started: bool,
    /// The current attempt's switchover starts the guest before the stream ends
    /// ([`DestState::switchover`]): only then may a COMPLETE promise regions after it.
    postcopy: bool,
}

impl<S: Storage> std::fmt::Debug for StreamDiskDest<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDiskDest")
            .field("name", &self.name)
            .field("bitmaps", &self.current.incoming.len())
            .field("applied", &self.current.applied)
            .field("kept", &self.kept.as_ref().map(|(_, h)| h.applied))
            .field("started", &self.started)
            .finish()
    }
}

/// The default bound on the bitmaps a [`StreamDiskDest`] holds in memory.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;

/// What one bitmap held by a [`StreamDiskDest`] costs in memory besides its words and its
/// name, at most: the [`DirtyBitmap`] itself (its per-thread counter shards are inline, 33
/// cache lines), the least heap its two summary towers' level lists and its change map
/// take, its [`Incoming`] record, and its entries in the destination's maps. A START of
/// one bit costs this much, not one byte (`the_memory_cost_is_never_below_a_bitmaps_own`).
const BITMAP_FIXED_COST: u64 =
    (std::mem::size_of::<DirtyBitmap>() + std::mem::size_of::<Incoming>() + 1024) as u64;

/// The memory a bitmap of `serialized` bytes named `name_len` bytes costs a
/// [`StreamDiskDest`], at most: its words (the serialized bytes rounded up to a word,
/// within the fixed part), its towers (a bit per 64 bytes of bitmap each, a little more
/// for their upper levels) and change map (a bit per region of at least 512 bytes), under
/// 1/128 of the words together; the fixed part; the name.
fn held_cost(serialized: u64, name_len: usize) -> u64 {
    serialized
        .saturating_add(serialized / 128)
        .saturating_add(BITMAP_FIXED_COST)
        .saturating_add(name_len as u64)
}

/// What a take-over does to the destination's image, decided (and checked) before anything
/// is written: see [`StreamDiskDest::plan`].
#[derive(Default)]
struct Plan {
    /// Incoming bitmaps the image holds consistent at their granularity: the activation
    /// holds the stream's copies in their place.
    adopt: Vec<(String, Arc<DirtyBitmap>)>,
    /// Names the image holds inconsistent (an earlier attempt that took over and died
    /// left them `in_use`) or at another granularity: removed, then added again.
    remove: Vec<String>,
    /// Incoming bitmaps to add, holding the stream's copy, with the START's recording.
    add: Vec<(String, Recording, Arc<DirtyBitmap>)>,
}

impl<S: Storage + 'static> StreamDiskDest<S> {
    /// The state named `name` (as the source's [`StreamDiskState`]), opening its own image
    /// with `open` (writable) when it takes over. It holds at most [`DEFAULT_MAX_BYTES`] of
    /// bitmaps in memory, those a failed attempt left included, each counted with its fixed
    /// cost (its structure, counters and name: a few KiB however few bits it has); a START
    /// that would exceed it is refused before anything is allocated. A START that fits
    /// without what a failed attempt left (an attempt that did not resume it) drops that
    /// data instead: its migration, if it comes back, sends everything again.
    pub fn new(
        name: impl Into<String>,
        open: impl FnMut() -> crate::Result<BitmapStore<S>> + Send + 'static,
    ) -> Self {
        StreamDiskDest {
            name: name.into(),
            open: Box::new(open),
            prewalk_open: None,
            prewalk: None,
            took_over_from_prewalk: false,
            cache_dropped: None,
            max_bytes: DEFAULT_MAX_BYTES,
            binding: Binding::default(),
            current: Held::default(),
            started_now: BTreeSet::new(),
            sections: 0,
            resumed: false,
            postcopy: false,
            kept: None,
            store: None,
            installed: Vec::new(),
            started: false,
        }
    }

    /// This destination, making the take-over's reference walk of its image (every L1 and
    /// L2 table and the refcounts: O(the image's metadata), about a second for a 16 TiB
    /// disk whose every L2 table is allocated) during the precopy, through `open`, a
    /// read-only open that another process's writer does not stop
    /// ([`FileStorage::open_shared`](crate::FileStorage::open_shared): a mirror may still
    /// be filling the disk). Once per attempt, at the source's QUERY (the attempt's first
    /// section, which the source sends at its setup and whose answer it waits for before
    /// it sends anything more: the walk is over before the stop), within
    /// [`PRELOAD_WALK_BUDGET`], as [`BitmapStore::preload_walk_within`] makes it. The
    /// take-over then starts from that walk ([`BitmapStore::activate_with_preloaded`])
    /// instead of walking inside the downtime, as long as the image's tables are where the
    /// walk read them; otherwise, if the open or the walk failed, or if the attempt had no
    /// QUERY (QEMU's way, [`StreamDiskState::qemu_baseline`], sends nothing before the
    /// stop), it walks as without this. The walk holds the thread that reads the stream
    /// (and its counts, 4 bytes a cluster of the file, until the take-over), as a shared
    /// disk's preload does; the source waits for the answer for at most
    /// [`LoopConfig::answer_timeout`](super::LoopConfig::answer_timeout).
    #[must_use]
    pub fn with_prewalk(
        mut self,
        open: impl FnMut() -> crate::Result<BitmapStore<S>> + Send + 'static,
    ) -> Self {
        self.prewalk_open = Some(Box::new(open));
        self
    }

    /// Whether the current attempt holds a walk made during the precopy that the take-over
    /// may start from ([`with_prewalk`](Self::with_prewalk)).
    pub fn prewalked(&self) -> bool {
        self.prewalk.as_ref().is_some_and(Preloaded::has_walk)
    }

    /// Whether the last take-over ([`before_start`](DestState::before_start)) was given a
    /// walk made during the precopy. The store still walks if the image's tables moved
    /// since that walk read them.
    pub fn took_over_from_prewalk(&self) -> bool {
        self.took_over_from_prewalk
    }

    /// Makes the current attempt's walk ([`with_prewalk`](Self::with_prewalk)), at its
    /// QUERY, before the answer: the source waits for that answer before it sends anything
    /// more, so the walk ends before the stop. At no other section: the source may have
    /// stopped by then (QEMU's way sends everything at the stop), and a walk there would be
    /// inside the downtime, twice if the take-over could not use it.
    fn prewalk_at_query(&mut self) {
        let Some(open) = self.prewalk_open.as_mut() else {
            return;
        };
        // A failed open or walk only leaves the walk to the take-over, which fails alike
        // if the image cannot be read then.
        self.prewalk = Some(
            open()
                .map(|st| st.preload_walk_within(PRELOAD_WALK_BUDGET))
                .unwrap_or_default(),
        );
    }

    /// The active store, once the destination started; it is the caller's from here on.
    /// Regions a postcopy push still brings are ORed into its bitmaps after that too: until
    /// the push ended (End, or the stream failed and the bitmaps were filled), each such
    /// bitmap is held incomplete, and the store refuses with [`crate::Error::Arriving`] to
    /// copy it (`load`, `changed_since`, a merge from it), remove it, change its recording
    /// flag (a checkpoint's too) or inactivate, so that no late region lands where no reader
    /// looks.
    pub fn take_store(&mut self) -> Option<BitmapStore<S>> {
        self.store.take()
    }

    /// This destination, holding at most `max_bytes` of bitmaps in memory (counted as
    /// [`new`](Self::new) says).
    #[must_use]
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The active store while the guest runs here and before [`take_store`](Self::take_store):
    /// the destination guest marks its writes on its bitmaps (postcopy regions that arrive
    /// later are ORed into them).
    pub fn store(&self) -> Option<&BitmapStore<S>> {
        self.store.as_ref()
    }

    /// The last section number the current attempt holds (0: none).
    pub fn applied(&self) -> u64 {
        self.current.applied
    }

    /// The last section number of what a failed attempt left (`None`: nothing kept).
    pub fn kept_applied(&self) -> Option<u64> {
        self.kept.as_ref().map(|(_, h)| h.applied)
    }

    /// Whether the current attempt resumed what a failed one left.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// The source asks what this destination holds of its migration: the kept bitmaps if
    /// they belong to the same migration (they become this attempt's), else nothing. The
    /// answer is the last section number held.
    fn query(&mut self, stream: u64) -> Result<Vec<u8>> {
        if self.sections != 0 {
            return Err(bad("a QUERY after other sections of the attempt".into()));
        }
        self.current.stream = Some(stream);
        self.prewalk_at_query();
        match self.kept.take() {
            // The same migration, and the same source stream: its numbers are the ones
            // this destination counted.
            Some((b, mut held)) if b == self.binding && held.stream == Some(stream) => {
                // COMPLETE is per attempt: the stop sends it again.
                for inc in held.incoming.values_mut() {
                    inc.complete = false;
                }
                self.current = held;
                self.resumed = true;
            }
            other => self.kept = other,
        }
        Ok(bitmap_codec::encode_report(self.current.applied))
    }

    fn start(&mut self, s: Start) -> Result<()> {
        if self.current.stream.is_some_and(|id| id != s.stream) {
            return Err(bad(format!(
                "bitmap {} of stream {:#x} in an attempt of stream {:#x}",
                s.index,
                s.stream,
                self.current.stream.unwrap_or(0)
            )));
        }
        // The guest runs here: the store holds each bitmap the take-over found, and a
        // record replaced now would lose what its COMPLETE said of regions still to come
        // (and its live bitmap), so a push that broke off would leave it without the
        // all-dirty mark (`failed_after_start`). QEMU refuses a second START too.
        if self.started {
            return Err(bad(format!(
                "bitmap {} started after the destination started",
                s.index
            )));
        }
        // One START per bitmap and attempt, before its COMPLETE: a resumed bitmap's START
        // replaces it only until this attempt's COMPLETE of it (which `query` cleared).
        if self.started_now.contains(&s.index)
            || self
                .current
                .incoming
                .get(&s.index)
                .is_some_and(|i| i.complete)
        {
            return Err(bad(format!("bitmap {} started twice", s.index)));
        }
        // Two bitmaps of one name cannot both be stored: refused here, where nothing is
        // written yet (a resumed bitmap of another index counts too).
        if let Some((&other, _)) = self
            .current
            .incoming
            .iter()
            .find(|&(&i, inc)| i != s.index && inc.start.name == s.name)
        {
            return Err(bad(format!(
                "bitmap {} is named {:?}, as bitmap {other} is",
                s.index, s.name
            )));
        }
        // A START for a resumed bitmap replaces it (the source resends it whole), but only
        // once every check passed: a failed section leaves what is held as it was, so
        // that the count of sections held stays true.
        let granularity = 1u64 << s.granularity_bits;
        // The bitmap's own limits (a region size the decoder passes but a bitmap refuses, a
        // disk size of 0 or of more than 2^32 granules) refuse the START before anything
        // below, which may drop kept data, and before anything is allocated.
        DirtyBitmap::check_geometry(s.disk_size, granularity, u64::from(s.region_size))?;
        let bytes = s.disk_size.div_ceil(granularity).div_ceil(8);
        let cost = held_cost(bytes, s.name.len());
        // What a failed attempt left counts too, while it is kept: until its migration
        // resumes it, another attempt holding something of its own fails or succeeds, or
        // a START does not fit beside it.
        let cost_of = |i: &Incoming| held_cost(i.bitmap.serialized_len(), i.start.name.len());
        let own: u64 = self
            .current
            .incoming
            .iter()
            .filter(|&(&i, _)| i != s.index)
            .map(|(_, inc)| cost_of(inc))
            .fold(0u64, u64::saturating_add);
        let kept: u64 = self
            .kept
            .iter()
            .flat_map(|(_, h)| h.incoming.values())
            .map(cost_of)
            .fold(0u64, u64::saturating_add);
        let needed = own.saturating_add(cost);
        if needed > self.max_bytes {
            return Err(MigrationError::InvalidInput(format!(
                "bitmap {:?} of {bytes} bytes ({cost} held in memory) would exceed this \
                 destination's limit of {} with the {own} this attempt holds",
                s.name, self.max_bytes
            )));
        }
        if needed.saturating_add(kept) > self.max_bytes {
            // The kept data is not this attempt's: a QUERY, which comes first or never, did
            // not resume it. Kept, it would refuse this START at every attempt, since an
            // attempt that applies nothing keeps it (`failed`), until the process restarts.
            // Dropped (before the allocation below, so that the bound holds throughout, and
            // after every check that can refuse this START: the geometry above, so that a
            // START refused drops nothing), its migration, if it comes back, is told 0 and
            // sends everything again: more bytes, never a bit missing.
            self.kept = None;
        }
        let bitmap =
            DirtyBitmap::with_region_size(s.disk_size, granularity, u64::from(s.region_size))?;
        bitmap.set_enabled(s.enabled);
        self.started_now.insert(s.index);
        self.current.stream = Some(s.stream);
        self.current.incoming.insert(
            s.index,
            Incoming {
                start: s,
                bitmap: Arc::new(bitmap),
                complete: false,
                more: false,
                live: None,
                hold: None,
            },
        );
        Ok(())
    }

    /// Every check that can refuse the take-over, on the opened image `st`, writing
    /// nothing: each bitmap's disk size, its name given once, and what the store would
    /// refuse ([`BitmapStore::check_replace`]: names, room in the directory and the header;
    /// its memory limit over every consistent bitmap it will hold). What the activation
    /// itself checks first (the store writable, its locks, the preflight) is refused by
    /// it before its first write.
    fn plan(&self, st: &BitmapStore<S>) -> Result<Plan> {
        let list = st.list();
        let mut names = BTreeSet::new();
        let mut plan = Plan::default();
        for inc in self.current.incoming.values() {
            let s = &inc.start;
            if st.disk_size() != s.disk_size {
                return Err(MigrationError::InvalidInput(format!(
                    "bitmap {:?} covers {} bytes, this image {}",
                    s.name,
                    s.disk_size,
                    st.disk_size()
                )));
            }
            if !names.insert(s.name.as_str()) {
                return Err(bad(format!("bitmap {:?} sent twice", s.name)));
            }
            let granularity = 1u64 << s.granularity_bits;
            let existing = list.iter().find(|b| b.name.as_bytes() == s.name.as_bytes());
            let content = Arc::clone(&inc.bitmap);
            match existing {
                Some(b)
                    if !b.in_use
                        && b.state == BitmapState::Consistent
                        && b.granularity == granularity =>
                {
                    plan.adopt.push((s.name.clone(), content));
                }
                other => {
                    if other.is_some() {
                        plan.remove.push(s.name.clone());
                    }
                    let rec = if s.enabled {
                        Recording::Enabled
                    } else {
                        Recording::Disabled
                    };
                    plan.add.push((s.name.clone(), rec, content));
                }
            }
        }
        // The store's limit, over what the active store will hold: each bitmap consistent
        // on disk (the activation loads it, even one removed right after) and each added.
        let disk = st.disk_size();
        let needed = list
            .iter()
            .filter(|b| b.state == BitmapState::Consistent)
            .map(|b| disk.div_ceil(b.granularity).div_ceil(8))
            .chain(plan.add.iter().map(|(_, _, b)| b.serialized_len()))
            .fold(0u64, u64::saturating_add);
        if needed > ACTIVE_MEMORY_LIMIT {
            return Err(crate::Error::Unsupported(format!(
                "the image would hold {needed} bytes of bitmaps in memory, more than the \
                 limit of {ACTIVE_MEMORY_LIMIT}"
            ))
            .into());
        }
        let remove: Vec<&[u8]> = plan.remove.iter().map(|n| n.as_bytes()).collect();
        let add: Vec<(&str, u64)> = plan
            .add
            .iter()
            .map(|(n, _, b)| (n.as_str(), b.granularity()))
            .collect();
        st.check_replace(&remove, &add)?;
        Ok(plan)
    }

    fn regions(&mut self, index: u16, regions: &[(u64, RegionBody<'_>)]) -> Result<()> {
        let Some(inc) = self.current.incoming.get_mut(&index) else {
            return Err(bad(format!("regions of bitmap {index} before its START")));
        };
        // After COMPLETE only once the guest runs here, and only if the COMPLETE said more
        // may follow (a postcopy push, ORed below).
        if inc.complete && !(self.started && inc.more) {
            return Err(bad(format!("regions of bitmap {index} after its COMPLETE")));
        }
        // Check every entry first, so a bad section changes nothing.
        for &(r, body) in regions {
            if r >= inc.bitmap.region_count() {
                return Err(bad(format!(
                    "region {r} is past bitmap {index}'s {} regions",
                    inc.bitmap.region_count()
                )));
            }
            let len = usize::try_from(inc.bitmap.region_len(r)).unwrap_or(usize::MAX);
            body.check(len)
                .map_err(|e| bad(format!("region {r} of bitmap {index}: {e}")))?;
        }
        // After the start the regions go to the bitmap the store holds, found at the start:
        // the caller may have taken the store by now, and `inc.bitmap` may be a copy of it
        // (another region size) or, adopted, the very same bitmap, whose marks replacing a
        // region would erase.
        let running = if self.started {
            Some(inc.live.clone().ok_or_else(|| {
                MigrationError::Internal(format!(
                    "bitmap {:?} runs without its live bitmap",
                    inc.start.name
                ))
            })?)
        } else {
            None
        };
        if let Some(live) = &running {
            // The store holds it at the START's disk size and granularity (`plan`), so a
            // region's bytes sit at the same serialized offset in both.
            if live.granularity() != inc.bitmap.granularity()
                || live.disk_size() != inc.bitmap.disk_size()
            {
                return Err(MigrationError::Internal(format!(
                    "the running bitmap {:?} is not the START's shape",
                    inc.start.name
                )));
            }
        }
        // One region's bytes at a time (checked above, so no write below fails): a sparse
        // section expands to at most one region's length here, however many it names.
        let mut buf = Vec::new();
        for &(r, body) in regions {
            buf.resize(usize::try_from(inc.bitmap.region_len(r)).unwrap_or(0), 0);
            body.expand(&mut buf)?;
            let bytes = &buf[..];
            match &running {
                // After the start: OR into the running bitmap, never over its marks, and
                // whether it records or not (these are the source's bits, not writes).
                // The region is numbered in the source's geometry (the START's region
                // size, which `inc.bitmap` has), not in the store's.
                Some(live) => {
                    live.or_serialized(r.saturating_mul(inc.bitmap.region_size()), bytes)?;
                }
                None => {
                    inc.bitmap.load_region_unflagged(r, bytes)?;
                }
            }
        }
        Ok(())
    }

    /// [`failed`](DestState::failed)'s undo of a take-over that installed `installed` in
    /// the active store `st`: see there.
    fn undo_take_over(&mut self, st: &mut BitmapStore<S>, installed: &[String]) {
        // Installed bitmaps that could not be removed.
        let mut held = Vec::new();
        // The stream's bitmaps, none of the image's own chain: removing one that records
        // leaves the image's own bitmaps as the activation loaded them.
        let foreign: Vec<&[u8]> = installed.iter().map(|n| n.as_bytes()).collect();
        for name in installed {
            match st.bitmap(name.as_bytes()) {
                Ok(_) => match st
                    .remove_replaced(name.as_bytes(), &foreign)
                    .or_else(|_| st.remove_replaced(name.as_bytes(), &foreign))
                {
                    Ok(_) => {}
                    // A write failed (now or in the take-over): nothing more is written,
                    // and every bitmap the store holds stays `in_use`.
                    Err(crate::Error::Poisoned) => return,
                    Err(_) => held.push(name),
                },
                // Absent (its add failed before the commit naming it), or inconsistent:
                // nothing reads it as clean.
                Err(crate::Error::NotFound { .. } | crate::Error::Inconsistent { .. }) => {}
                // Not known to be either: nothing more is written.
                Err(_) => return,
            }
        }
        for name in held {
            let Ok(live) = st.bitmap(name.as_bytes()) else {
                return;
            };
            if let Some(inc) = self
                .current
                .incoming
                .values_mut()
                .find(|i| i.start.name == *name)
            {
                if Arc::ptr_eq(&inc.bitmap, &live) {
                    inc.bitmap = Arc::new(inc.bitmap.snapshot());
                }
            }
            // Every bit, recording or not: the bits stand for the writes no one marked.
            live.fill();
        }
        let _ = st.inactivate();
    }
}

fn bad(reason: String) -> MigrationError {
    super::frame::FrameError::payload("bitmap", reason).into()
}

impl<S: Storage + 'static> StreamDiskDest<S> {
    /// [`before_start`](DestState::before_start)'s writes after the activation, on the
    /// active store `st`: the bitmaps of `remove` go, those of `add` come holding the
    /// stream's copies, and each incoming bitmap records as its START said.
    fn install(
        &mut self,
        st: &mut BitmapStore<S>,
        remove: &[String],
        add: Vec<(String, Recording, Arc<DirtyBitmap>)>,
        adopted: &[String],
    ) -> Result<()> {
        for name in remove {
            // An untrusted bitmaps extension (autoclear bit 0 clear) goes whole with
            // the store's first commit: a name of it planned for removal may be gone by
            // now, which is what its removal was for.
            if !st
                .list()
                .iter()
                .any(|b| b.name.as_bytes() == name.as_bytes())
            {
                continue;
            }
            // The adopted bitmaps and the ones still to be removed hold nothing of
            // the image's own history: an inconsistent bitmap of it going leaves
            // them as they are (every other one of the image is made all dirty).
            let foreign: Vec<&[u8]> = adopted.iter().chain(remove).map(|n| n.as_bytes()).collect();
            st.remove_replaced(name.as_bytes(), &foreign)?;
        }
        // Every name the image held and the stream replaces is gone: whatever the store
        // holds under an added name from here on (even after an add that failed late)
        // is the stream's, never the image's own.
        for (name, rec, content) in add {
            self.installed.push(name.clone());
            st.add_holding(&name, rec, content)?;
        }
        for inc in self.current.incoming.values_mut() {
            st.set_enabled(inc.start.name.as_bytes(), inc.start.enabled)?;
            inc.live = Some(st.bitmap(inc.start.name.as_bytes())?);
        }
        Ok(())
    }
}

impl StreamDiskDest<crate::storage::FileStorage> {
    /// The state named `name` over the image file at `path` (the destination's own disk, on
    /// this host: one page cache for it and for whatever fills it), opened writable with
    /// QEMU's locks at the take-over, and walked during the precopy through a read-only
    /// open with QEMU's force-share locking ([`with_prewalk`](Self::with_prewalk)), which a
    /// mirror still writing the disk does not stop.
    ///
    /// The walk's open first drops the file's cached pages
    /// ([`Storage::forget_cached`]: pages a failed barrier
    /// on this host left clean there), during the precopy; the take-over's writable open
    /// then keeps the cache once ([`FileStorage::keeping_cache`](crate::FileStorage::keeping_cache)),
    /// and only when the walk of the same attempt dropped it since the last writable open
    /// (a Hello forgets the drop), as
    /// [`SharedDiskDest::file_on_one_host`](super::SharedDiskDest::file_on_one_host)'s
    /// activation does after its preload. Dropping it there, inside the downtime, costs
    /// what the host holds cached of the file: 170 to 225 ms for a 4 GiB file cached whole
    /// (docs/BENCHMARKS.md, session 37), more for a disk a mirror just filled through the
    /// cache. Why the pages kept are the disk's: a page the drop left because it was dirty
    /// and whose writeback failed later reports that error, unseen, to the take-over's
    /// first barrier (the activation's flags commit when the image holds a consistent
    /// bitmap, else the first remove's or add's, before its directory commit), which
    /// fails the take-over and poisons the store, naming nothing new clean; a writer between the walk and the take-over that saw such an
    /// error itself is the mirror on this host, whose job fails, and the storage migration
    /// with it, in that attempt. For an image another host writes, build the state with
    /// [`new`](Self::new) and [`with_prewalk`](Self::with_prewalk) over opens that read
    /// the device ([`FileStorage::reading_the_device`](crate::FileStorage::reading_the_device)).
    pub fn file(name: impl Into<String>, path: impl Into<std::path::PathBuf>) -> Self {
        let (writable, reader, drop) = super::disk::one_host_opens(path.into());
        let mut d = Self::new(name, writable).with_prewalk(reader);
        d.cache_dropped = Some(drop);
        d
    }
}

impl<S: Storage + 'static> DestState for StreamDiskDest<S> {
    fn name(&self) -> &str {
        &self.name
    }

    /// A new attempt of migration `binding` starts empty; what a failed attempt left stays
    /// kept (the Hello may still be refused) until a QUERY of the same migration resumes
    /// it.
    fn hello(&mut self, _id: StateId, binding: Binding) -> Result<()> {
        self.binding = binding;
        self.current = Held::default();
        self.started_now.clear();
        self.sections = 0;
        self.resumed = false;
        self.store = None;
        self.installed.clear();
        self.started = false;
        self.postcopy = false;
        self.prewalk = None;
        if let Some(d) = &self.cache_dropped {
            d.forget();
        }
        Ok(())
    }

    fn switchover(&mut self, postcopy: bool) {
        self.postcopy = postcopy;
    }

    /// Applies one section whole, or refuses it changing nothing. Numbers must rise within
    /// the attempt and above what it resumed: the count of what is held stays exact.
    fn section(&mut self, payload: &[u8]) -> Result<Option<Vec<u8>>> {
        let sec = bitmap_codec::decode(payload)?;
        if let BitmapSection::Query { stream } = sec.body {
            let answer = self.query(stream)?;
            self.sections += 1;
            return Ok(Some(answer));
        }
        if sec.seq <= self.current.applied {
            return Err(bad(format!(
                "section {} after section {}",
                sec.seq, self.current.applied
            )));
        }
        match sec.body {
            BitmapSection::Start(s) => self.start(s)?,
            BitmapSection::Regions { index, regions } => self.regions(index, &regions)?,
            BitmapSection::Complete { index, more } => {
                match self.current.incoming.get_mut(&index) {
                    // One COMPLETE per bitmap and attempt: a second one would change what
                    // the first said of regions still to come.
                    Some(i) if i.complete => {
                        return Err(bad(format!("bitmap {index} completed twice")))
                    }
                    Some(i) => {
                        i.complete = true;
                        i.more = more;
                    }
                    None => {
                        return Err(bad(format!("COMPLETE of bitmap {index} before its START")))
                    }
                }
            }
            BitmapSection::Query { .. } => {}
        }
        self.current.applied = sec.seq;
        self.sections += 1;
        Ok(None)
    }

    /// Every bitmap complete, the image opened, and every check that can refuse done
    /// (`plan`) before anything is written. Then the image is activated with
    /// the stream's copies of the bitmaps it holds consistent
    /// ([`BitmapStore::activate_with`], which writes what [`BitmapStore::activate`] writes:
    /// the mode's flags word when the image was last left durable, then the `in_use`
    /// flags, after checks of its own); then, active, each bitmap it holds inconsistent or at another
    /// granularity is removed, and each it lacks is added holding the stream's copy
    /// (`BitmapStore::add_holding`); then each bitmap records as its START said (the
    /// source's flag wins over the image's `auto`). The content is written by the store's
    /// next flush, after the guest started here, not in the downtime.
    ///
    /// Crash reasoning: the activation sets `in_use` on every bitmap it holds before
    /// anything else is written; a removed bitmap is absent; an added one is `in_use` in
    /// the very commit that names it. So at any crash point each bitmap of the stream is
    /// absent, inconsistent, or (before the activation) the image's own copy as it was:
    /// never clean without the source's bits. A failure after the activation (I/O) leaves
    /// the active store to [`failed`](DestState::failed).
    fn before_start(&mut self) -> Result<()> {
        if let Some((i, _)) = self.current.incoming.iter().find(|(_, inc)| !inc.complete) {
            return Err(bad(format!("bitmap {i} never completed")));
        }
        // Regions promised after the start can only come in postcopy: after a precopy
        // switchover the stream has ended, and such a bitmap lacks what its source still
        // held.
        if !self.postcopy {
            if let Some((i, _)) = self.current.incoming.iter().find(|(_, inc)| inc.more) {
                return Err(bad(format!(
                    "bitmap {i} completed with regions to follow, but the switchover was \
                     not postcopy"
                )));
            }
        }
        let mut st = (self.open)()?;
        let plan = self.plan(&st)?;
        let adopted: Vec<String> = plan.adopt.iter().map(|(n, _)| n.clone()).collect();
        self.installed.clear();
        // The activation starts from the walk made during the precopy if there is one and
        // the image's tables are where it read them, or walks the image's metadata once
        // (inside the downtime: it grows with the guest's data); the removes and adds
        // after it start from that walk instead of each walking again
        // (`BitmapStore::reusing_walk`).
        let Plan { adopt, remove, add } = plan;
        let pre = self.prewalk.take().unwrap_or_default();
        self.took_over_from_prewalk = pre.has_walk();
        let installed = st.reusing_walk(|st| -> Result<Result<()>> {
            st.activate_with_preloaded(adopt, pre)?;
            // From here the store holds the stream's copy under each adopted name.
            self.installed = adopted.clone();
            Ok(self.install(st, &remove, add, &adopted))
        })?;
        self.store = Some(st);
        installed?;
        if self.postcopy {
            // Regions follow the start: each such bitmap is incomplete until the push ends.
            for inc in self.current.incoming.values_mut().filter(|i| i.more) {
                inc.hold = inc.live.as_ref().map(DirtyBitmap::hold_incomplete);
            }
        }
        self.started = true;
        // The guest runs here from now on: nothing of this migration is resumed again.
        self.kept = None;
        Ok(())
    }

    /// The push after the start broke off: a bitmap whose regions could still follow is
    /// missing some, and the guest runs here on it, so every granule of it is marked dirty
    /// (the next backup copies everything; a clean bit here could be a lost mark), whether
    /// it records or not: the marks stand for the source's bits, not for writes.
    fn failed_after_start(&mut self) {
        for inc in self.current.incoming.values_mut().filter(|i| i.more) {
            if let Some(live) = &inc.live {
                live.fill();
            }
            if let Some(hold) = inc.hold.take() {
                hold.complete();
            }
        }
    }

    /// Every region the source pushed after the start arrived: the bitmaps are complete.
    fn push_ended(&mut self) {
        for inc in self.current.incoming.values_mut() {
            if let Some(hold) = inc.hold.take() {
                hold.complete();
            }
        }
    }

    /// Undoes the take-over, if any, and keeps what this attempt holds for the next
    /// attempt of the same migration, unless it holds nothing of its own (then what an
    /// earlier attempt left stays kept).
    ///
    /// The image must not end with a bitmap the take-over installed reading consistent with
    /// fewer than all its bits set (a bitmap of the image it had not replaced yet stays as
    /// the image had it): the source
    /// resumes, and writes that reach this image after the failed stop (a mirror still
    /// running) are marked nowhere here, so a stream bitmap stored now would read clean for
    /// them later. As QEMU's destination stores no migrated bitmap of a failed incoming
    /// migration, each bitmap the take-over installed is removed (the one it added, and the
    /// one it adopted in place of the image's own copy, whose content the stream's had
    /// replaced), one remove commit each; then the store is inactivated, which writes back
    /// the image's other bitmaps as the take-over left them (no guest ran here: as the
    /// activation loaded them, or all dirty once the take-over removed an inconsistent
    /// bitmap of the image, which may have held writes they lack), and clears their
    /// `in_use`. Only what the take-over installed is removed: a bitmap of the stream's
    /// name that the image held at another granularity and the take-over had not removed
    /// yet when it failed is the image's own, written back so; one the image held
    /// inconsistent stays so.
    ///
    /// A removal that fails without poisoning the store (a transient read error of its
    /// preflight) is tried once more; if that fails too, the bitmap stays in the store,
    /// marked dirty everywhere (after the copy kept for the retry, if the store shares it,
    /// is split off: the next report counts on it being exact), and the inactivation goes
    /// ahead: it writes that bitmap consistent and all dirty, never clean for a write after
    /// the failed stop, and gives the image's other bitmaps back without `in_use` (dropped
    /// active, the store would leave every one of them `in_use`, to be repaired before QEMU
    /// uses them).
    ///
    /// Crash reasoning: until its remove commit, a stream bitmap is `in_use` (the
    /// activation's flags commit, or the add commit, set it); after, absent. One whose
    /// removal failed is `in_use` until the inactivation's flags commit, which comes after
    /// its content (every bit set) is written and a barrier; after, consistent and all
    /// dirty. If the store is poisoned (an I/O error of a write), nothing more is written:
    /// it is dropped active, so every bitmap it still holds stays `in_use` (inconsistent,
    /// never clean). A retry's take-over adopts or replaces what it finds (`plan`).
    fn failed(&mut self) {
        // The attempt's walk (its counts: 4 bytes a cluster of the file) is not the next
        // attempt's, which walks at its own QUERY (its drop of the cache is forgotten at the
        // next Hello).
        self.prewalk = None;
        // The take-over is undone (its bitmaps removed, or filled where a removal fails)
        // and the copies kept exact for a retry: no hold may refuse that.
        for inc in self.current.incoming.values_mut() {
            if let Some(hold) = inc.hold.take() {
                hold.complete();
            }
        }
        let installed = std::mem::take(&mut self.installed);
        if let Some(mut st) = self.store.take() {
            self.undo_take_over(&mut st, &installed);
        }
        for inc in self.current.incoming.values_mut() {
            inc.live = None;
        }
        self.started = false;
        if self.resumed || self.current.applied > 0 {
            self.kept = Some((self.binding, std::mem::take(&mut self.current)));
        }
        self.resumed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    const DISK: u64 = 1 << 30;

    fn dest() -> StreamDiskDest<MemStorage> {
        StreamDiskDest::new("s", || BitmapStore::create(MemStorage::new(), DISK, 65536))
    }

    fn start_of(index: u16, seq: u64) -> Vec<u8> {
        bitmap_codec::encode_start(
            &Start {
                index,
                stream: S1,
                name: format!("b{index}"),
                granularity_bits: 16,
                enabled: true,
                disk_size: DISK,
                region_size: 512,
            },
            seq,
        )
    }

    /// Region `r` of bitmap `index`, every bit set, as section `seq`.
    fn full_region(index: u16, r: u64, seq: u64) -> Vec<u8> {
        let mut s = bitmap_codec::begin_regions(index, seq);
        bitmap_codec::push_region(&mut s, r, &[0xFF; 512], &mut Vec::new());
        bitmap_codec::finish_regions(&mut s, 1);
        s
    }

    /// Region `r` of bitmap `index` with no bit set, as section `seq`.
    fn empty_region(index: u16, r: u64, seq: u64) -> Vec<u8> {
        let mut s = bitmap_codec::begin_regions(index, seq);
        bitmap_codec::push_region(&mut s, r, &[0; 512], &mut Vec::new());
        bitmap_codec::finish_regions(&mut s, 1);
        s
    }

    /// A link that keeps every payload sent, in order.
    struct Wire(Vec<Vec<u8>>);

    impl Outbound for Wire {
        fn send(&mut self, _: StateId, payload: &[u8]) -> Result<Bytes> {
            self.0.push(payload.to_vec());
            Ok(Bytes(payload.len() as u64))
        }
        fn control(&mut self, _: &super::super::frame::Control) -> Result<Bytes> {
            Ok(Bytes(0))
        }
        fn bytes_sent(&self) -> Bytes {
            Bytes(0)
        }
    }

    /// The source stream of these tests.
    const S1: u64 = 0x51;

    /// A bitmap of 2 MiB regions, dense, sent 64 regions a section, would make sections of
    /// 128 MiB where a frame holds 16, and every attempt would fail on the frame's limit. A
    /// section holds as many raw entries as fit in a frame.
    #[test]
    fn a_section_of_large_dense_regions_fits_in_a_frame() {
        let region = 2 << 20;
        // 10 regions of 2 MiB, every bit set (a dense region is sent raw).
        let disk = 10 * region * 8 * 512;
        let b = Arc::new(DirtyBitmap::with_region_size(disk, 512, region).unwrap());
        b.mark_dirty(0, disk);
        let mut st = StreamDiskState::new(1, "s", vec![("b".into(), b)]).unwrap();
        let mut wire = Wire(Vec::new());
        set_up(&mut st, &mut wire);
        st.complete(&mut wire).unwrap();
        let mut regions = 0;
        for payload in &wire.0 {
            let frame = super::super::frame::Frame::Section {
                state: 1,
                payload: payload.clone(),
            };
            assert!(
                super::super::frame::encode_frame(1, &frame).is_ok(),
                "a section of {} bytes does not fit in a frame",
                payload.len()
            );
            if let BitmapSection::Regions { regions: r, .. } =
                bitmap_codec::decode(payload).unwrap().body
            {
                regions += r.len();
            }
        }
        assert_eq!(regions, 10, "every region is sent once");
    }

    /// The postcopy push resets a bitmap's count of changed regions not yet taken (`seen`)
    /// only at a turn that takes them. Reset at every turn, a turn whose budget ran out on
    /// the queue's last section would leave the queue empty and `seen` 0, so `pending`
    /// would say nothing is left while the consumer still holds the regions the stop's
    /// exact count found, and the loop would send End without them: a write in no bitmap of
    /// the destination.
    #[test]
    fn the_postcopy_push_sends_the_regions_changed_before_the_stop() {
        let g = 512;
        let region_disk = 512 * 8 * g; // 512 bytes of bits per region
        let b = Arc::new(DirtyBitmap::with_region_size(DISK, g, 512).unwrap());
        for r in 0..100 {
            b.mark_dirty(r * region_disk, 512);
        }
        let mut st = StreamDiskState::new(1, "s", vec![("b".into(), Arc::clone(&b))])
            .unwrap()
            .defer_to_postcopy(true);
        let mut wire = Wire(Vec::new());
        set_up(&mut st, &mut wire);
        // The START, then one section of 64 regions; the rest stay queued (the consumer
        // starts with every region changed: 512 of them).
        st.iterate(&mut wire, Bytes(1)).unwrap();
        st.iterate(&mut wire, Bytes(1)).unwrap();
        assert_eq!(st.bitmaps[0].queued(), 512 - 64);
        // A later write in region 0, already sent, then the stop.
        let late = 4 * g;
        b.mark_dirty(late, 512);
        assert!(st.pending(true).total() > Bytes(0));
        st.postcopy_start(&mut wire).unwrap();
        let sent_before = wire.0.len();
        let mut turns = 0;
        while st.pending(false).total() > Bytes(0) {
            st.iterate(&mut wire, Bytes(1)).unwrap();
            turns += 1;
            assert!(turns < 100, "the push does not end");
        }
        let late_sent = wire.0[sent_before..].iter().any(|payload| {
            match bitmap_codec::decode(payload).unwrap().body {
                BitmapSection::Regions { regions, .. } => regions.iter().any(|(r, _)| *r == 0),
                _ => false,
            }
        });
        assert!(
            late_sent,
            "the push ended after {turns} turns without region 0, changed before the stop"
        );
    }

    fn report<T: Storage + 'static>(d: &mut StreamDiskDest<T>) -> u64 {
        let answer = d.section(&bitmap_codec::encode_query(S1)).unwrap().unwrap();
        bitmap_codec::decode_report(&answer).unwrap()
    }

    const M1: Binding = Binding {
        migration_id: 1,
        token: 7,
    };

    #[test]
    fn kept_bitmaps_serve_only_a_query_of_the_same_migration() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 0);
        d.section(&start_of(0, 1)).unwrap();
        d.section(&full_region(0, 2, 2)).unwrap();
        d.failed();
        assert_eq!(d.kept_applied(), Some(2));
        // Another migration (another token): nothing reported, the kept bitmaps stay.
        d.hello(3, Binding { token: 8, ..M1 }).unwrap();
        assert_eq!(report(&mut d), 0);
        assert!(!d.resumed());
        assert_eq!(d.kept_applied(), Some(2));
        // It applies nothing and fails: what was kept is not replaced by nothing.
        d.failed();
        assert_eq!(d.kept_applied(), Some(2));
        // An attempt of the same migration that sends no QUERY starts empty.
        d.hello(3, M1).unwrap();
        assert!(
            d.section(&full_region(0, 2, 3)).is_err(),
            "no START in this attempt"
        );
        // The same migration's QUERY resumes them.
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 2);
        assert!(d.resumed());
        assert_eq!(d.kept_applied(), None);
    }

    /// Numbers mean something only to the stream that chose them: a new source of the
    /// same migration (a new `StreamDiskState`, whose numbers start again at 1) never
    /// resumes what another stream left, even when it sent as many sections.
    #[test]
    fn kept_bitmaps_serve_only_the_stream_that_sent_them() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_of(0, 1)).unwrap();
        d.section(&full_region(0, 2, 2)).unwrap();
        d.failed();
        // Another stream of the same migration asks: nothing for it, the kept data stays.
        d.hello(3, M1).unwrap();
        let other = d
            .section(&bitmap_codec::encode_query(S1 + 1))
            .unwrap()
            .unwrap();
        assert_eq!(bitmap_codec::decode_report(&other).unwrap(), 0);
        assert!(!d.resumed());
        // A START of a stream other than the attempt's is refused.
        assert!(d.section(&start_of(0, 1)).is_err());
        d.failed();
        assert_eq!(d.kept_applied(), Some(2));
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 2);
        assert!(d.resumed());
    }

    #[test]
    fn kept_bitmaps_count_in_the_memory_bound() {
        // Room for one bitmap of 1 GiB at 64 KiB (2 KiB, and its fixed cost).
        let mut d = dest().with_max_bytes(held_cost(2048, 2));
        d.hello(3, M1).unwrap();
        d.section(&start_of(0, 1)).unwrap();
        d.failed();
        // Another migration whose bitmap does not fit even alone: refused, and what the
        // failed attempt left stays.
        d.hello(3, Binding { token: 8, ..M1 }).unwrap();
        let e = d
            .section(&start_named(0, 1, "b0", true, DISK * 2, 512))
            .unwrap_err();
        assert!(matches!(e, MigrationError::InvalidInput(_)), "{e}");
        d.failed();
        assert_eq!(d.kept_applied(), Some(1));
        // The same migration resumes and replaces it within the bound.
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 1);
        d.section(&start_of(0, 2)).unwrap();
        d.section(&full_region(0, 1, 3)).unwrap();
        d.failed();
        // A START refused for the bound leaves the resumed bitmap as it was: what the
        // report counts is still held.
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 3);
        // (A disk twice as large: twice the bitmap, over the bound by itself.)
        let e = d
            .section(&start_named(0, 4, "b0", true, DISK * 2, 512))
            .unwrap_err();
        assert!(matches!(e, MigrationError::InvalidInput(_)), "{e}");
        d.failed();
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 3);
        assert_eq!(
            d.current.incoming.get(&0).map(|i| i.bitmap.count()),
            Some(512 * 8),
            "the bitmap the report counts is held, with its region"
        );
    }

    /// What an abandoned migration left must not count against the bound for every later
    /// migration: one whose bitmap fits only without it would be refused at its first
    /// START, apply nothing, leave the old data kept, and every attempt would fail the same
    /// way until the destination process restarts. A START that fits without the kept data
    /// drops it (its migration, if it comes back, is told 0 and sends everything again);
    /// one that does not fit even alone is refused and drops nothing.
    #[test]
    fn kept_bitmaps_give_way_to_another_migrations_start_that_fits_without_them() {
        // Room for one bitmap of 1 GiB at 64 KiB (2 KiB, and its fixed cost).
        let mut d = dest().with_max_bytes(held_cost(2048, 2));
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 0);
        d.section(&start_of(0, 1)).unwrap();
        d.section(&full_region(0, 2, 2)).unwrap();
        d.failed();
        assert_eq!(d.kept_applied(), Some(2));
        // Migration M2 (its source and token are not M1's).
        let m2 = Binding {
            migration_id: 2,
            token: 9,
        };
        d.hello(3, m2).unwrap();
        assert_eq!(report(&mut d), 0);
        d.section(&start_of(0, 1))
            .unwrap_or_else(|e| panic!("M2's START is refused beside M1's kept data: {e}"));
        assert_eq!(d.kept_applied(), None, "M1's data is dropped");
        d.section(&full_region(0, 3, 2)).unwrap();
        d.failed();
        assert_eq!(d.kept_applied(), Some(2), "M2's own data is kept");
        // M2 resumes its own data.
        d.hello(3, m2).unwrap();
        assert_eq!(report(&mut d), 2);
        assert!(d.resumed());
        // M1, back, holds nothing here: it is told so and sends everything again.
        d.failed();
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 0);
        assert!(!d.resumed());
    }

    /// A START that fits the bound only without what an abandoned migration left must not
    /// drop that data and then be refused for its own bitmap's geometry (a region size that
    /// is not a power of two, a disk size of 0: the decoder passes both), the kept data
    /// gone for nothing. The geometry is checked before anything is dropped.
    #[test]
    fn a_start_refused_for_its_geometry_drops_no_kept_data() {
        // (disk size, region size): each START fits the bound only without M1's data.
        for (disk, region) in [(DISK, 3u32), (0, 512)] {
            let mut d = dest().with_max_bytes(held_cost(2048, 2));
            d.hello(3, M1).unwrap();
            assert_eq!(report(&mut d), 0);
            d.section(&start_of(0, 1)).unwrap();
            d.section(&full_region(0, 2, 2)).unwrap();
            d.failed();
            assert_eq!(d.kept_applied(), Some(2));
            let m2 = Binding {
                migration_id: 2,
                token: 9,
            };
            d.hello(3, m2).unwrap();
            assert_eq!(report(&mut d), 0);
            let e = d
                .section(&start_named(0, 1, "b0", true, disk, region))
                .unwrap_err();
            assert!(
                matches!(e, MigrationError::Bitmap(crate::Error::InvalidInput(_))),
                "{e}"
            );
            assert_eq!(
                d.kept_applied(),
                Some(2),
                "disk {disk}, region {region}: the refused START ({e}) dropped M1's data"
            );
            assert_eq!(d.applied(), 0);
            // M1, back, resumes its data.
            d.failed();
            d.hello(3, M1).unwrap();
            assert_eq!(report(&mut d), 2);
            assert!(d.resumed());
        }
    }

    #[test]
    fn numbers_must_rise_and_a_query_comes_first() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_of(0, 5)).unwrap();
        assert!(d.section(&bitmap_codec::encode_query(S1)).is_err());
        assert!(
            d.section(&full_region(0, 1, 5)).is_err(),
            "a repeated number"
        );
        assert!(d.section(&full_region(0, 1, 4)).is_err(), "a lower number");
        d.section(&full_region(0, 1, 9)).unwrap();
        assert_eq!(d.applied(), 9);
        // After a resume, numbers continue above what was kept.
        d.failed();
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 9);
        assert!(d.section(&full_region(0, 1, 9)).is_err());
        d.section(&full_region(0, 1, 12)).unwrap();
    }

    #[test]
    fn a_start_replaces_a_resumed_bitmap_but_not_one_of_its_own_attempt() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_of(0, 1)).unwrap();
        d.section(&full_region(0, 3, 2)).unwrap();
        d.section(&bitmap_codec::encode_complete(0, 3, false))
            .unwrap();
        d.failed();
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 3);
        // COMPLETE is per attempt: not complete until this attempt's.
        assert!(d.before_start().is_err());
        d.failed();
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 3);
        // The source resends it whole: the old copy's region 3 is gone.
        d.section(&start_of(0, 4)).unwrap();
        assert!(
            d.section(&start_of(0, 5)).is_err(),
            "started twice in one attempt"
        );
        let held = &d.current.incoming[&0].bitmap;
        assert_eq!(held.count(), 0);
        d.section(&bitmap_codec::encode_complete(0, 6, false))
            .unwrap();
        d.before_start().unwrap();
        let st = d.take_store().unwrap();
        assert_eq!(st.bitmap("b0").unwrap().count(), 0);
    }

    /// The exact figure is what the stop sends, to the byte: with the START still to go and
    /// after it, with regions changed and with none, and with a channel that adds its own
    /// bytes per section. (It once left out the COMPLETE's flags byte, and a switchover
    /// whose figure equalled the threshold overshot the downtime limit by that byte.)
    #[test]
    fn the_exact_figure_is_what_the_stop_sends() {
        struct Wire(u64);
        impl Outbound for Wire {
            fn send(&mut self, _: StateId, payload: &[u8]) -> Result<Bytes> {
                let n = payload.len() as u64 + self.0;
                Ok(Bytes(n))
            }
            fn control(&mut self, _: &super::super::frame::Control) -> Result<Bytes> {
                Ok(Bytes(0))
            }
            fn bytes_sent(&self) -> Bytes {
                Bytes(0)
            }
            fn section_overhead(&self) -> Bytes {
                Bytes(self.0)
            }
        }
        for overhead in [0, 9] {
            for changes in [&[][..], &[0u64][..], &[0, 3 << 20, 700 << 20][..]] {
                for start_sent in [false, true] {
                    let b = Arc::new(DirtyBitmap::with_region_size(DISK, 65536, 512).unwrap());
                    let mut s =
                        StreamDiskState::new(1, "s", vec![("b".into(), Arc::clone(&b))]).unwrap();
                    let mut w = Wire(overhead);
                    set_up(&mut s, &mut w);
                    if start_sent {
                        s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
                    }
                    for &off in changes {
                        b.mark_dirty(off, 4096);
                    }
                    let p = s.pending(true);
                    let sent = s.complete(&mut w).unwrap();
                    assert_eq!(
                        p.total(),
                        sent,
                        "overhead {overhead}, changes {changes:?}, START sent {start_sent}"
                    );
                }
            }
        }
        // An `iterate` that stopped partway through its queue: 100 regions of 512 bytes
        // (256 MiB of disk each at 64 KiB), 64 a section, 36 left queued. The stop sends
        // them in a section of their own, then the region changed since in another.
        for overhead in [0, 9] {
            let b = Arc::new(DirtyBitmap::with_region_size(100 << 28, 65536, 512).unwrap());
            assert_eq!(b.region_count(), 100);
            let mut s = StreamDiskState::new(1, "s", vec![("b".into(), Arc::clone(&b))]).unwrap();
            let mut w = Wire(overhead);
            set_up(&mut s, &mut w);
            // The START, then one section of 64 regions.
            s.iterate(&mut w, Bytes(1)).unwrap();
            s.iterate(&mut w, Bytes(1)).unwrap();
            assert_eq!(s.regions_sent(), 64);
            b.mark_dirty(0, 4096);
            let p = s.pending(true);
            let sent = s.complete(&mut w).unwrap();
            assert_eq!(s.regions_sent(), 64 + 36 + 1);
            assert_eq!(
                p.total(),
                sent,
                "overhead {overhead}, after a partial queue"
            );
        }
    }

    /// The source's side, against a destination that reports: only what the report does
    /// not cover goes again; a report of 0 sends everything; one of sections never sent
    /// is refused and changes nothing.
    #[test]
    fn the_source_requeues_only_what_the_report_does_not_cover() {
        let b = Arc::new(DirtyBitmap::with_region_size(DISK, 65536, 512).unwrap());
        let regions = b.region_count();
        assert_eq!(regions, 4);
        let mut s = StreamDiskState::new(1, "s", vec![("b".into(), Arc::clone(&b))]).unwrap();
        let mut w = Wire(Vec::new());
        // The first attempt asks too (its destination walks before it answers); the
        // answer 0 leaves every region due, as a fresh consumer holds them.
        s.setup(&mut w).unwrap();
        assert!(s.awaits_report());
        assert_eq!(w.0, vec![bitmap_codec::encode_query(s.stream_id)]);
        s.report(&bitmap_codec::encode_report(0)).unwrap();
        // START (1) and one REGIONS section (2) with the 4 regions.
        s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
        assert_eq!((s.last_seq(), s.regions_sent()), (2, 4));
        s.channel_failed();
        s.cancel();
        let retry = |s: &mut StreamDiskState, report: u64| -> Result<u64> {
            let mut w = Wire(Vec::new());
            s.setup(&mut w)?;
            assert!(s.awaits_report());
            assert_eq!(w.0, vec![bitmap_codec::encode_query(s.stream_id)]);
            s.report(&bitmap_codec::encode_report(report))?;
            let before = s.regions_sent();
            s.iterate(&mut w, Bytes(u64::MAX))?;
            let n = s.regions_sent() - before;
            s.cancel();
            Ok(n)
        };
        // Sections never sent: refused, nothing resolved (still waiting).
        assert!(matches!(
            retry(&mut s, 3),
            Err(MigrationError::Protocol(ProtocolError::ReportBeyondSent {
                reported: 3,
                sent: 2,
                ..
            }))
        ));
        s.cancel();
        // Everything held: nothing again.
        assert_eq!(retry(&mut s, 2).unwrap(), 0);
        // A change since: that region only.
        b.mark_dirty(0, 1);
        assert_eq!(retry(&mut s, 2).unwrap(), 1);
        // A report below an earlier one (2): nothing it said before can be trusted, so
        // everything goes again, the START included.
        // (Sections so far: 1 START, 2 REGIONS ×4, 3 REGIONS ×1.)
        assert_eq!(retry(&mut s, 1).unwrap(), 4);
        // Nothing held: START and every region.
        let mut w = Wire(Vec::new());
        s.setup(&mut w).unwrap();
        s.report(&bitmap_codec::encode_report(0)).unwrap();
        s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
        // The QUERY, the START, the 4 regions.
        assert_eq!(w.0.len(), 3);
        assert!(matches!(
            bitmap_codec::decode(&w.0[1]).unwrap().body,
            BitmapSection::Start(_)
        ));
        assert!(matches!(
            bitmap_codec::decode(&w.0[2]).unwrap().body,
            BitmapSection::Regions { ref regions, .. } if regions.len() == 4
        ));
    }

    // ----- The take-over, failures around it, and what the image says afterwards -----

    use crate::storage::{CrashMode, CrashStorage, OpenMode};

    /// Bitmap `index`'s START, named `name`, of `disk_size` bytes at 64 KiB granularity,
    /// with change-map regions of `region_size`, as section `seq`.
    fn start_named(
        index: u16,
        seq: u64,
        name: &str,
        enabled: bool,
        disk_size: u64,
        region_size: u32,
    ) -> Vec<u8> {
        bitmap_codec::encode_start(
            &Start {
                index,
                stream: S1,
                name: name.into(),
                granularity_bits: 16,
                enabled,
                disk_size,
                region_size,
            },
            seq,
        )
    }

    /// Region `r` of bitmap `index`, `len` bytes whose first `ones` bytes have every bit
    /// set, as section `seq`.
    fn region_of(index: u16, r: u64, len: usize, ones: usize, seq: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        bytes[..ones].fill(0xFF);
        let mut s = bitmap_codec::begin_regions(index, seq);
        bitmap_codec::push_region(&mut s, r, &bytes, &mut Vec::new());
        bitmap_codec::finish_regions(&mut s, 1);
        s
    }

    /// An image of `DISK` bytes (64 KiB clusters) holding bitmap "b" at 64 KiB
    /// granularity: `in_use` (an earlier destination activated it and died), or consistent
    /// with its `auto` flag as `recording` says.
    fn image_with_b(in_use: bool, recording: Recording) -> Vec<u8> {
        let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
        st.add("b", 65536, recording).unwrap();
        if in_use {
            st.activate().unwrap();
        }
        st.image().storage().to_vec()
    }

    /// A destination whose image is `storage` (shared, so that the test reads it after).
    /// One attempt of two bitmaps, both complete: "b" recording with region 1 set, "c" not
    /// recording with region 2 set, whose COMPLETE says regions may follow the start when
    /// `c_more`.
    fn b_and_c<T: Storage + 'static>(d: &mut StreamDiskDest<T>, c_more: bool) {
        d.hello(3, M1).unwrap();
        b_and_c_sections(d, c_more);
    }

    /// `b_and_c`'s sections, in the attempt under way.
    fn b_and_c_sections<T: Storage + 'static>(d: &mut StreamDiskDest<T>, c_more: bool) {
        d.section(&start_named(0, 1, "b", true, DISK, 512)).unwrap();
        d.section(&full_region(0, 1, 2)).unwrap();
        d.section(&start_named(1, 3, "c", false, DISK, 512))
            .unwrap();
        d.section(&full_region(1, 2, 4)).unwrap();
        d.section(&bitmap_codec::encode_complete(0, 5, false))
            .unwrap();
        d.section(&bitmap_codec::encode_complete(1, 6, c_more))
            .unwrap();
        // Regions may follow the start in postcopy alone.
        d.switchover(c_more);
    }

    fn dest_on<T: Storage + 'static>(storage: &Arc<T>) -> StreamDiskDest<Arc<T>> {
        let s = Arc::clone(storage);
        StreamDiskDest::new("s", move || {
            BitmapStore::open(Arc::clone(&s), OpenMode::ReadWrite)
        })
    }

    /// The image `bytes` opened read-only.
    fn reopen(bytes: Vec<u8>) -> BitmapStore<MemStorage> {
        BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly).unwrap()
    }

    /// A memory image that counts the reads starting at `at` (the L1 table: only the
    /// reference walk reads it).
    #[derive(Debug)]
    struct ReadsAt {
        inner: MemStorage,
        at: u64,
        reads: std::sync::atomic::AtomicU64,
    }

    impl Storage for ReadsAt {
        fn len(&self) -> crate::Result<u64> {
            self.inner.len()
        }
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> crate::Result<()> {
            if offset == self.at {
                self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> crate::Result<()> {
            self.inner.write_all_at(buf, offset)
        }
        fn set_len(&self, new_len: u64) -> crate::Result<()> {
            self.inner.set_len(new_len)
        }
        fn sync_data(&self) -> crate::Result<()> {
            self.inner.sync_data()
        }
    }

    /// The take-over walks the image's metadata once, however many bitmaps it removes and
    /// adds: the walk grows with the guest's data (about a second for a 16 TiB disk whose
    /// every L2 table is allocated, docs/BENCHMARKS.md) and runs between End and Started.
    /// Here the image holds "b" in use (removed, then added again) and the stream brings
    /// "c" too: an activation, a remove, two adds and a flag change, one walk (one read of
    /// the L1 table), where each walked again.
    #[test]
    fn the_take_over_walks_the_image_once() {
        let bytes = image_with_b(true, Recording::Enabled);
        let at = crate::format::HeaderArea::decode(&bytes[..65536])
            .unwrap()
            .header
            .l1_table_offset;
        let img = Arc::new(ReadsAt {
            inner: MemStorage::from_bytes(bytes),
            at,
            reads: Default::default(),
        });
        let mut d = dest_on(&img);
        b_and_c(&mut d, false);
        let before = img.reads.load(std::sync::atomic::Ordering::SeqCst);
        d.before_start().unwrap();
        let walks = img.reads.load(std::sync::atomic::Ordering::SeqCst) - before;
        assert_eq!(walks, 1, "the take-over read the L1 table {walks} times");
        let mut st = d.take_store().unwrap();
        let names: Vec<String> = st.list().into_iter().map(|b| b.name.to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(
            st.load("b").unwrap().count() > 0,
            "the stream's bits of \"b\" are lost"
        );
        // The frees the remove made by the activation's walk leave a sound image.
        st.inactivate().unwrap();
        let r = st.image().check().unwrap();
        assert!(r.is_clean(), "{:?}", r.messages);
    }

    /// `dest_on`, making the take-over's walk during the precopy through a read-only open
    /// of the same storage.
    fn prewalking_dest_on<T: Storage + 'static>(storage: &Arc<T>) -> StreamDiskDest<Arc<T>> {
        let s = Arc::clone(storage);
        dest_on(storage).with_prewalk(move || BitmapStore::open(Arc::clone(&s), OpenMode::ReadOnly))
    }

    /// An image holding "b" in use, whose reads of the L1 table are counted.
    fn counted_image() -> Arc<ReadsAt> {
        let bytes = image_with_b(true, Recording::Enabled);
        let at = crate::format::HeaderArea::decode(&bytes[..65536])
            .unwrap()
            .header
            .l1_table_offset;
        Arc::new(ReadsAt {
            inner: MemStorage::from_bytes(bytes),
            at,
            reads: Default::default(),
        })
    }

    /// The reads of the L1 table so far.
    fn l1_reads(img: &ReadsAt) -> u64 {
        img.reads.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The stream's bitmaps as the take-over left them, the image sound once stopped.
    fn taken_over_soundly<T: Storage + 'static>(d: &mut StreamDiskDest<T>) {
        let mut st = d.take_store().unwrap();
        let mut names: Vec<String> = st.list().into_iter().map(|b| b.name.to_string()).collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
        assert!(
            st.load("b").unwrap().is_dirty(1 << 28),
            "the stream's bits of \"b\" are lost"
        );
        assert!(
            st.load("c").unwrap().is_dirty(2 << 28),
            "the stream's bits of \"c\" are lost"
        );
        st.inactivate().unwrap();
        let r = st.image().check().unwrap();
        assert!(r.is_clean(), "{:?}", r.messages);
    }

    /// `b_and_c` after the source's QUERY, which a source of ours sends at every attempt's
    /// setup (and waits for the answer of before anything more): the attempt's first
    /// section.
    fn queried_b_and_c<T: Storage + 'static>(d: &mut StreamDiskDest<T>, c_more: bool) {
        d.hello(3, M1).unwrap();
        let answer = d.section(&bitmap_codec::encode_query(S1)).unwrap();
        assert_eq!(answer, Some(bitmap_codec::encode_report(0)));
        b_and_c_sections(d, c_more);
    }

    /// With a walk made during the precopy (`with_prewalk`), the take-over walks nothing
    /// inside the downtime: the walk grows with the guest's data (about a second for a
    /// 16 TiB disk whose every L2 table is allocated) and ran between End and Started. The
    /// walk is made at the QUERY, before its answer (the source waits for that answer
    /// before it sends anything more), and at no other section; the take-over then reads
    /// no byte of the L1 table, and the activation and the remove and add after it, which
    /// free and allocate by that walk, leave a sound image holding the stream's bits.
    #[test]
    fn a_take_over_after_a_precopy_walk_walks_nothing_in_the_downtime() {
        let img = counted_image();
        let mut d = prewalking_dest_on(&img);
        d.hello(3, M1).unwrap();
        assert_eq!(l1_reads(&img), 0, "a walk at the Hello");
        d.section(&bitmap_codec::encode_query(S1)).unwrap();
        assert_eq!(l1_reads(&img), 1, "no walk before the QUERY's answer");
        assert!(d.prewalked());
        b_and_c_sections(&mut d, false);
        assert_eq!(
            l1_reads(&img),
            1,
            "a walk at a section other than the QUERY"
        );
        d.before_start().unwrap();
        assert_eq!(
            l1_reads(&img),
            1,
            "the take-over walked inside the downtime"
        );
        taken_over_soundly(&mut d);
    }

    /// The precopy's walk stands only while the header locates the tables where it read
    /// them: an L1 table one entry longer by the take-over (a zero entry inside its
    /// cluster: valid, but another table) makes the take-over walk, and its result is as
    /// sound. A walk that the image's open fails to make leaves the take-over to walk too.
    #[test]
    fn a_precopy_walk_the_image_moved_away_from_makes_the_take_over_walk() {
        let img = counted_image();
        let mut d = prewalking_dest_on(&img);
        queried_b_and_c(&mut d, false);
        assert!(d.prewalked());
        let mut n = [0u8; 4];
        img.inner.read_exact_at(&mut n, 36).unwrap();
        let l1_size = u32::from_be_bytes(n);
        img.inner
            .write_all_at(&(l1_size + 1).to_be_bytes(), 36)
            .unwrap();
        let before = l1_reads(&img);
        d.before_start().unwrap();
        assert_eq!(
            l1_reads(&img) - before,
            1,
            "the take-over trusted a moved walk"
        );
        taken_over_soundly(&mut d);

        let img = counted_image();
        let mut d = dest_on(&img).with_prewalk(|| Err(crate::Error::Poisoned));
        queried_b_and_c(&mut d, false);
        assert!(!d.prewalked());
        d.before_start().unwrap();
        assert_eq!(l1_reads(&img), 1, "the take-over made no walk of its own");
        taken_over_soundly(&mut d);
    }

    /// Between the walk and the take-over another writer of the image (the mirror filling
    /// the disk, a management tool) allocates and frees clusters: here a bitmap "x" is
    /// added and filled, then removed (its clusters freed and counted 0), and "y" added and
    /// filled (reusing some of them). The take-over starts from the older walk (the
    /// header's shape did not change), frees and allocates by it, and leaves a sound image
    /// holding the stream's bits and "y"'s.
    #[test]
    fn a_take_over_from_a_walk_the_image_was_written_after_stays_sound() {
        let img = counted_image();
        let mut d = prewalking_dest_on(&img);
        queried_b_and_c(&mut d, false);
        assert!(d.prewalked());
        {
            let mut w = BitmapStore::open(Arc::clone(&img), OpenMode::ReadWrite).unwrap();
            w.activate().unwrap();
            w.add("x", 65536, Recording::Enabled).unwrap();
            w.add("y", 65536, Recording::Enabled).unwrap();
            w.bitmap("x").unwrap().fill();
            w.flush().unwrap();
            w.remove("x").unwrap();
            w.bitmap("y").unwrap().mark_dirty(0, 1 << 30);
            w.inactivate().unwrap();
            assert!(w.image().check().unwrap().is_clean());
        }
        let before = l1_reads(&img);
        d.before_start().unwrap();
        assert_eq!(l1_reads(&img) - before, 0, "the take-over walked");
        let mut st = d.take_store().unwrap();
        assert!(st.load("b").unwrap().is_dirty(1 << 28));
        assert!(st.load("c").unwrap().is_dirty(2 << 28));
        assert_eq!(st.load("y").unwrap().count(), (1 << 30) / 65536);
        st.inactivate().unwrap();
        let r = st.image().check().unwrap();
        assert!(r.is_clean(), "{:?}", r.messages);
    }

    /// `StreamDiskDest::file` walks at the QUERY through a read-only open that QEMU's
    /// writer locks do not stop (a writable holder of the image stands for the mirror that
    /// fills the destination's disk during the precopy), and holds nothing of the image
    /// after it: once that writer let go, the take-over opens it writable, starting from the
    /// walk, and leaves it sound.
    #[test]
    fn a_file_destination_walks_beside_a_writer_and_lets_go_before_the_take_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dest.qcow2");
        {
            let mut st =
                BitmapStore::create(crate::FileStorage::create(&path).unwrap(), DISK, 65536)
                    .unwrap();
            st.add("b", 65536, Recording::Enabled).unwrap();
        }
        let mirror = crate::FileStorage::open(&path, OpenMode::ReadWrite).unwrap();
        let mut d = StreamDiskDest::file("s", &path);
        d.hello(3, M1).unwrap();
        d.section(&bitmap_codec::encode_query(S1)).unwrap();
        assert!(d.prewalked(), "no walk beside the image's writer");
        b_and_c_sections(&mut d, false);
        drop(mirror);
        d.before_start().unwrap();
        taken_over_soundly(&mut d);
    }

    /// No walk is made at any section but the QUERY: QEMU's way sends no QUERY and
    /// everything at the stop, where a walk is inside the downtime (twice, if the
    /// take-over cannot use it). Such an attempt walks once, at the take-over. The next
    /// attempt's QUERY walks again, and a walk of an attempt that failed before its
    /// take-over is not left to the next one.
    #[test]
    fn no_walk_is_made_for_the_take_over_but_at_the_query() {
        let img = counted_image();
        let mut d = prewalking_dest_on(&img);
        d.hello(3, M1).unwrap();
        d.section(&start_named(0, 1, "b", true, DISK, 512)).unwrap();
        d.section(&full_region(0, 1, 2)).unwrap();
        d.switchover(false);
        d.section(&bitmap_codec::encode_complete(0, 3, false))
            .unwrap();
        assert_eq!(l1_reads(&img), 0, "a walk at a section other than a QUERY");
        assert!(!d.prewalked());
        d.before_start().unwrap();
        assert_eq!(l1_reads(&img), 1);
        let mut st = d.take_store().unwrap();
        assert!(st.load("b").unwrap().is_dirty(1 << 28));
        st.inactivate().unwrap();
        assert!(st.image().check().unwrap().is_clean());
        drop(st);
        d.failed();
        // An attempt that walks at its QUERY and fails before its take-over.
        d.hello(4, M1).unwrap();
        let before = l1_reads(&img);
        d.section(&bitmap_codec::encode_query(S1 + 1)).unwrap();
        assert!(d.prewalked());
        assert_eq!(l1_reads(&img) - before, 1);
        d.failed();
        assert!(
            !d.prewalked(),
            "a failed attempt kept its walk (and its counts)"
        );
        d.hello(5, M1).unwrap();
        assert!(!d.prewalked(), "a walk of a failed attempt kept");
    }

    /// A COMPLETE that promises regions after the start, followed by a precopy switchover
    /// and End, cannot be taken over as it stands: nothing can follow End, so the bitmap
    /// would be trusted (written consistent at the next stop) without the regions its
    /// source still holds. It is refused, writing nothing; the same stream in postcopy
    /// starts.
    #[test]
    fn regions_promised_after_a_precopy_switchover_are_refused() {
        let before = image_with_b(true, Recording::Enabled);
        let img = Arc::new(MemStorage::from_bytes(before.clone()));
        let mut d = dest_on(&img);
        b_and_c(&mut d, true);
        d.switchover(false);
        let e = d.before_start().unwrap_err();
        assert!(e.to_string().contains("not postcopy"), "{e}");
        assert!(img.to_vec() == before, "the refusal wrote to the image");
        d.failed();
        let img = Arc::new(MemStorage::from_bytes(before));
        let mut d = dest_on(&img);
        b_and_c(&mut d, true);
        d.before_start().unwrap();
    }

    /// After a postcopy start, a bitmap whose regions are still being pushed must not be
    /// checkpointed past, read by `changed_since` or removed on the destination's store:
    /// the late regions would go to a bitmap no slot holds (the source's writes in no
    /// bitmap any reader consults) and an incremental backup would read a union without
    /// them. Until the push ends, each such bitmap is refused to every edit or read that
    /// would take it as complete; after End it is whole. A destination that goes away
    /// mid-push leaves it all dirty.
    #[test]
    fn a_bitmap_still_arriving_after_a_postcopy_start_is_neither_read_nor_dropped() {
        let late = 3u64 << 28;
        for ended in [true, false] {
            let mut d = dest();
            d.hello(3, M1).unwrap();
            d.section(&start_of(0, 1)).unwrap();
            d.section(&bitmap_codec::encode_complete(0, 2, true))
                .unwrap();
            d.switchover(true);
            d.before_start().unwrap();
            let mut st = d.take_store().unwrap();
            let arriving = |e: crate::Error| matches!(e, crate::Error::Arriving { .. });
            assert!(arriving(st.checkpoint("c").unwrap_err()));
            assert!(arriving(st.changed_since("b0").unwrap_err()));
            assert!(arriving(st.load("b0").unwrap_err()));
            assert!(arriving(st.set_enabled("b0", false).unwrap_err()));
            assert!(arriving(st.remove("b0").unwrap_err()));
            assert!(arriving(st.inactivate().unwrap_err()));
            assert!(st.is_active(), "the refused stop wrote");
            // Nor is it migrated on from here: the late regions would stay on this host.
            match StreamDiskState::from_store(9, "onward", &st) {
                Err(MigrationError::Bitmap(e)) => assert!(arriving(e)),
                other => panic!("an onward stream of an arriving bitmap: {other:?}"),
            }
            d.section(&full_region(0, 3, 3)).unwrap();
            if ended {
                d.push_ended();
                let since = st.changed_since("b0").unwrap();
                assert!(since.is_dirty(late), "the late region is in the bitmap");
                assert_eq!(since.count(), 4096, "exactly the pushed region");
                st.checkpoint("c").unwrap();
                st.remove("b0").unwrap();
            } else {
                drop(d);
                assert_eq!(st.load("b0").unwrap().count(), DISK / 65536, "all dirty");
            }
            drop(st.close().unwrap());
        }
    }

    /// A START that names a bitmap the attempt already holds under another index is refused:
    /// two incoming bitmaps cannot both be stored under one name.
    #[test]
    fn a_start_naming_another_bitmap_of_the_attempt_is_refused() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_named(0, 1, "b", true, DISK, 512)).unwrap();
        let e = d
            .section(&start_named(1, 2, "b", true, DISK, 512))
            .unwrap_err();
        assert!(matches!(e, MigrationError::Frame(_)), "{e}");
        assert_eq!(d.current.incoming.len(), 1);
        assert_eq!(d.applied(), 1, "the refused section is not applied");
    }

    /// A take-over that the image refuses (a bitmap of another disk size, a name the
    /// image cannot hold) writes nothing to it: the destination's image, which holds "b"
    /// `in_use` from a destination that died, is byte for byte as it was, and "b" still
    /// reads inconsistent, never empty and clean.
    #[test]
    fn a_refused_take_over_writes_nothing_to_the_image() {
        for second in [
            start_named(1, 3, "c", true, DISK * 2, 512),
            start_named(1, 3, "c\0d", true, DISK, 512),
        ] {
            let before = image_with_b(true, Recording::Enabled);
            let img = Arc::new(MemStorage::from_bytes(before.clone()));
            let mut d = dest_on(&img);
            d.hello(3, M1).unwrap();
            d.section(&start_named(0, 1, "b", true, DISK, 512)).unwrap();
            d.section(&full_region(0, 1, 2)).unwrap();
            d.section(&second).unwrap();
            d.section(&bitmap_codec::encode_complete(0, 4, false))
                .unwrap();
            d.section(&bitmap_codec::encode_complete(1, 5, false))
                .unwrap();
            assert!(d.before_start().is_err());
            d.failed();
            assert!(d.take_store().is_none());
            let after = img.to_vec();
            let st = reopen(after.clone());
            let b = st.list().into_iter().find(|i| i.name == "b").unwrap();
            assert!(b.in_use, "\"b\" must stay inconsistent: {b:?}");
            assert_eq!(st.list().len(), 1, "{:?}", st.list());
            assert!(after == before, "the refusal wrote to the image");
        }
    }

    /// A crash anywhere in a take-over (the image holds "b" `in_use` from a destination
    /// that died; the stream brings "b" and a new "c") or in the stop after it leaves each
    /// bitmap absent, inconsistent, or holding every bit the stream gave it: never
    /// consistent and short of a bit.
    #[test]
    fn a_crash_during_the_take_over_never_leaves_a_bitmap_clean_without_its_bits() {
        let img = Arc::new(CrashStorage::from_bytes(image_with_b(
            true,
            Recording::Enabled,
        )));
        let mut d = dest_on(&img);
        b_and_c(&mut d, false);
        d.before_start().unwrap();
        // Then the guest runs here, and the store's stop writes the content: the crash
        // points cover the image after it too, with both bitmaps consistent.
        d.take_store().unwrap().inactivate().unwrap();
        let mut checked = 0;
        for mode in [
            CrashMode::Dropped,
            CrashMode::Kept,
            CrashMode::Torn { seed: 1 },
            CrashMode::Torn { seed: 2 },
        ] {
            for (point, bytes) in img.crash_images(mode) {
                let st = reopen(bytes);
                for (name, region) in [("b", 1u64), ("c", 2)] {
                    let Some(info) = st.list().into_iter().find(|i| i.name == name) else {
                        continue;
                    };
                    if info.in_use {
                        continue;
                    }
                    let held = st.load(name).unwrap();
                    // The stream's region: 512 bytes of bitmap, 4096 granules of 64 KiB.
                    let (off, len) = (region << 28, 1u64 << 28);
                    assert_eq!(
                        held.dirty_bytes(),
                        len,
                        "{mode:?}, crash after op {point}: {name:?} reads consistent \
                         without the stream's bits"
                    );
                    assert_eq!(held.next_dirty(0), Some(off));
                    checked += 1;
                }
            }
        }
        println!("{checked} consistent bitmaps checked");
        assert!(checked > 0);
    }

    /// A write of the take-over fails (each in turn, and every one after it): the take-over
    /// is refused, the attempt fails, and the image holds each bitmap of the stream absent,
    /// inconsistent, or with every bit the stream gave it (a bitmap whose regions were to
    /// follow the start, dirty everywhere): never clean without them.
    #[test]
    fn a_write_error_in_the_take_over_leaves_no_bitmap_clean_without_its_bits() {
        use crate::storage::{FaultPlan, FaultStorage, Landed, Trigger};
        let mut failed = 0;
        for n in 1.. {
            let img = Arc::new(FaultStorage::new(
                MemStorage::from_bytes(image_with_b(true, Recording::Enabled)),
                FaultPlan::new().fail_write(Trigger::From(n), Landed::Nothing),
            ));
            let mut d = dest_on(&img);
            b_and_c(&mut d, true);
            if d.before_start().is_ok() {
                break;
            }
            failed += 1;
            d.failed();
            let st = reopen(img.inner().to_vec());
            for (name, region) in [("b", 1u64), ("c", 2)] {
                let Some(info) = st.list().into_iter().find(|i| i.name == name) else {
                    continue;
                };
                if !info.in_use {
                    let held = st.load(name).unwrap();
                    let (off, len) = (region << 28, 1u64 << 28);
                    assert!(
                        held.next_clean(off).is_none_or(|c| c >= off + len),
                        "write {n} failed: {name:?} reads consistent without its bits"
                    );
                }
            }
        }
        assert!(failed > 0);
    }

    /// A failed take-over's undo removes a recording bitmap it added: that ends no chain of
    /// the image's (the bitmap was the stream's), so the image's own disabled "o" comes back
    /// exact, not all dirty.
    #[test]
    fn undoing_an_added_recording_bitmap_leaves_the_images_own_exact() {
        let own = 3u64 << 28;
        let before = {
            let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
            st.add("o", 65536, Recording::Enabled).unwrap();
            st.activate().unwrap();
            st.bitmap("o").unwrap().mark_dirty(own, 65536);
            st.set_enabled("o", false).unwrap();
            st.inactivate().unwrap();
            st.image().storage().to_vec()
        };
        let img = Arc::new(MemStorage::from_bytes(before));
        let mut d = dest_on(&img);
        d.hello(3, M1).unwrap();
        d.section(&start_named(0, 1, "c", true, DISK, 512)).unwrap();
        d.section(&full_region(0, 1, 2)).unwrap();
        d.section(&bitmap_codec::encode_complete(0, 3, false))
            .unwrap();
        d.before_start().unwrap();
        d.failed();
        let st = reopen(img.to_vec());
        assert!(st.list().iter().all(|i| i.name != "c"), "{:?}", st.list());
        let o = st.load("o").unwrap();
        assert_eq!(
            o.dirty_bytes(),
            65536,
            "the image's own \"o\" came back all dirty"
        );
        assert!(o.is_dirty(own));
    }

    /// The attempt fails after `before_start` succeeded (a later state refused to start,
    /// or Started could not be sent): no bitmap of the stream is left consistent on the
    /// image, neither one whose regions were to follow the start (postcopy), recording or
    /// not, nor a complete one (the source resumes; writes reaching this image after the
    /// failed stop would be marked nowhere). What the attempt keeps for a retry is its
    /// exact copy.
    #[test]
    fn a_failure_after_the_take_over_never_writes_an_incomplete_bitmap_clean() {
        let img = Arc::new(MemStorage::from_bytes(
            BitmapStore::create(MemStorage::new(), DISK, 65536)
                .unwrap()
                .image()
                .storage()
                .to_vec(),
        ));
        let mut d = dest_on(&img);
        d.hello(3, M1).unwrap();
        // "b": the store's region size (so the store holds the same bitmap), recording.
        d.section(&start_named(0, 1, "b", true, DISK, 4096))
            .unwrap();
        d.section(&region_of(0, 0, 2048, 512, 2)).unwrap();
        d.section(&bitmap_codec::encode_complete(0, 3, true))
            .unwrap();
        d.switchover(true);
        // "d": regions of its own size (the store holds a copy), not recording.
        d.section(&start_named(1, 4, "d", false, DISK, 512))
            .unwrap();
        d.section(&full_region(1, 1, 5)).unwrap();
        d.section(&bitmap_codec::encode_complete(1, 6, true))
            .unwrap();
        d.switchover(true);
        // "e": complete at the switch.
        d.section(&start_named(2, 7, "e", true, DISK, 512)).unwrap();
        d.section(&full_region(2, 3, 8)).unwrap();
        d.section(&bitmap_codec::encode_complete(2, 9, false))
            .unwrap();
        d.before_start().unwrap();
        d.failed();
        let st = reopen(img.to_vec());
        for name in ["b", "d", "e"] {
            if let Some(info) = st.list().into_iter().find(|i| i.name == name) {
                assert!(info.in_use, "{name:?} reads consistent: {info:?}");
            }
        }
        // The retry resumes the exact copies, and its take-over holds them.
        d.hello(3, M1).unwrap();
        assert_eq!(report(&mut d), 9);
        assert_eq!(d.current.incoming[&0].bitmap.count(), 512 * 8);
        assert_eq!(d.current.incoming[&1].bitmap.count(), 512 * 8);
        for (i, seq) in [(0u16, 10u64), (1, 11), (2, 12)] {
            d.section(&bitmap_codec::encode_complete(i, seq, false))
                .unwrap();
        }
        d.before_start().unwrap();
        let mut st = d.take_store().unwrap();
        for name in ["b", "d", "e"] {
            assert_eq!(st.bitmap(name).unwrap().count(), 512 * 8, "{name:?}");
        }
        st.inactivate().unwrap();
        let st = reopen(img.to_vec());
        for name in ["b", "d", "e"] {
            assert_eq!(st.load(name).unwrap().count(), 512 * 8, "{name:?}");
        }
    }

    /// A crash anywhere in a take-over and in its undo after a later failure (the image
    /// holds "b" consistent with a bit of its own, which the take-over adopts, and "o",
    /// which is not in the stream; the stream brings "b" and a new "c") never leaves a
    /// bitmap of the stream consistent with the stream's bits (before the activation "b" is
    /// the image's own copy, as it was), and leaves "o" as it was or `in_use`; the undo
    /// ends with "b" and "c" absent and "o" as it was.
    #[test]
    fn a_crash_while_a_failed_take_over_is_undone_never_leaves_a_stream_bitmap_consistent() {
        // Region 3 (the stream sets regions 1 and 2).
        let own = 3u64 << 28;
        let before = {
            let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
            st.add("b", 65536, Recording::Enabled).unwrap();
            st.add("o", 65536, Recording::Enabled).unwrap();
            st.activate().unwrap();
            st.bitmap("b").unwrap().mark_dirty(own, 65536);
            st.bitmap("o").unwrap().mark_dirty(own, 65536);
            st.inactivate().unwrap();
            st.image().storage().to_vec()
        };
        let img = Arc::new(CrashStorage::from_bytes(before));
        let mut d = dest_on(&img);
        b_and_c(&mut d, false);
        d.before_start().unwrap();
        d.failed();
        let only_own = |st: &BitmapStore<MemStorage>, name: &[u8]| {
            let held = st.load(name).unwrap();
            held.count() == 1 && held.is_dirty(own)
        };
        let end = reopen(img.live_image());
        let names: Vec<String> = end.list().into_iter().map(|i| i.name.to_string()).collect();
        assert_eq!(names, ["o"], "the undo leaves the image's own bitmap alone");
        assert!(only_own(&end, b"o"));
        let mut checked = 0;
        for mode in [
            CrashMode::Dropped,
            CrashMode::Kept,
            CrashMode::Torn { seed: 1 },
            CrashMode::Torn { seed: 2 },
        ] {
            for (point, bytes) in img.crash_images(mode) {
                let st = reopen(bytes);
                for info in st.list() {
                    if info.in_use {
                        continue;
                    }
                    let fine = match info.name.as_bytes() {
                        n @ (b"b" | b"o") => only_own(&st, n),
                        _ => false,
                    };
                    assert!(
                        fine,
                        "{mode:?}, crash after op {point}: {:?} reads consistent with {} bits",
                        info.name,
                        st.load(&info.name).unwrap().count()
                    );
                    checked += 1;
                }
            }
        }
        println!("{checked} consistent bitmaps checked");
        assert!(checked > 0);
    }

    /// An image whose bitmaps extension is untrusted (autoclear bit 0 clear, as a withdrawn
    /// stop or a writer without bitmap support leaves it) naming two of the stream's
    /// bitmaps: both are planned for removal, and the first removal's commit drops the
    /// whole untrusted extension, so the second finds its bitmap gone (`NotFound`) after
    /// the take-over has written. The take-over skips a planned removal whose bitmap is
    /// gone, and stores the stream's bitmaps.
    #[test]
    fn a_take_over_replaces_two_bitmaps_of_an_untrusted_extension() {
        let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
        st.add("b", 65536, Recording::Enabled).unwrap();
        st.add("c", 65536, Recording::Enabled).unwrap();
        let mut image = st.image().storage().to_vec();
        // Autoclear bit 0: the low bit of the big-endian word at 88.
        image[95] &= !1;
        let img = Arc::new(MemStorage::from_bytes(image));
        let mut d = dest_on(&img);
        d.hello(3, M1).unwrap();
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        for (i, name) in ["b", "c"].iter().enumerate() {
            let i = i as u16;
            d.section(&start_named(i, next(), name, true, DISK, 512))
                .unwrap();
            d.section(&full_region(i, 1, next())).unwrap();
            d.section(&bitmap_codec::encode_complete(i, next(), false))
                .unwrap();
        }
        d.before_start()
            .expect("the take-over of an untrusted extension's names");
        let mut st = d.take_store().expect("the store taken over");
        st.inactivate().unwrap();
        let st = reopen(img.to_vec());
        for name in ["b", "c"] {
            let b = st.load(name).unwrap();
            assert!(b.count() > 0, "{name} holds the stream's bits");
        }
        let r = st.image().check().unwrap();
        assert_eq!(r.corruptions, 0, "{r:?}");
    }

    /// A take-over that fails while a bitmap of the stream's name, which the image held at
    /// another granularity, is still waiting for its removal (a transient read error in
    /// that removal's preflight, which poisons nothing) must not have `failed` remove it:
    /// it is the image's own "y", which the take-over never replaced. Nor may "y" go when
    /// the removal that failed is that of an earlier bitmap the image held `in_use` ("x").
    /// `failed` removes only what the take-over installed: "y" is back as the image had it,
    /// and "x" stays `in_use`.
    #[test]
    fn a_failed_take_over_leaves_a_bitmap_it_had_not_replaced_yet_as_the_image_had_it() {
        use crate::storage::{FaultPlan, FaultStorage, Trigger};
        type Img = Arc<FaultStorage<MemStorage>>;
        // A bit of the image's own "y", outside the stream's region 1.
        let own = 3u64 << 28;
        for with_x in [false, true] {
            let before = {
                let mut st = if with_x {
                    // "x" `in_use`: a destination that activated the image died.
                    let mut x = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
                    x.add("x", 65536, Recording::Enabled).unwrap();
                    x.activate().unwrap();
                    let bytes = MemStorage::from_bytes(x.image().storage().to_vec());
                    BitmapStore::open(bytes, OpenMode::ReadWrite).unwrap()
                } else {
                    BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap()
                };
                st.add("y", 131072, Recording::Enabled).unwrap();
                st.activate().unwrap();
                st.bitmap("y").unwrap().mark_dirty(own, 65536);
                st.inactivate().unwrap();
                st.image().storage().to_vec()
            };
            let stream = |d: &mut StreamDiskDest<Img>| {
                d.hello(3, M1).unwrap();
                let mut seq = 0;
                let mut next = || {
                    seq += 1;
                    seq
                };
                let names: &[&str] = if with_x { &["x", "y"] } else { &["y"] };
                for (i, name) in names.iter().enumerate() {
                    let i = i as u16;
                    d.section(&start_named(i, next(), name, true, DISK, 512))
                        .unwrap();
                    d.section(&full_region(i, 1, next())).unwrap();
                    d.section(&bitmap_codec::encode_complete(i, next(), false))
                        .unwrap();
                }
            };
            // A dry run counts the reads up to the end of the activation: the next one is
            // the first of the take-over's first removal.
            let activated = {
                let img: Img = Arc::new(FaultStorage::new(
                    MemStorage::from_bytes(before.clone()),
                    FaultPlan::new(),
                ));
                let mut d = dest_on(&img);
                stream(&mut d);
                let mut st = (d.open)().unwrap();
                let plan = d.plan(&st).unwrap();
                assert!(plan.adopt.is_empty());
                let first = if with_x { "x" } else { "y" };
                assert_eq!(plan.remove.first().map(String::as_str), Some(first));
                // As the take-over runs them: the removal starts from the activation's
                // walk.
                st.reusing_walk(|st| {
                    st.activate_with(plan.adopt).unwrap();
                    let n = img.reads();
                    st.remove(first).unwrap();
                    assert!(img.reads() > n, "the removal reads");
                    n
                })
            };
            let img: Img = Arc::new(FaultStorage::new(
                MemStorage::from_bytes(before),
                FaultPlan::new().fail_read(Trigger::Nth(activated + 1)),
            ));
            let mut d = dest_on(&img);
            stream(&mut d);
            assert!(d.before_start().is_err(), "with_x {with_x}");
            d.failed();
            assert!(d.take_store().is_none());
            let st = reopen(img.inner().to_vec());
            let list = st.list();
            let y = list.iter().find(|i| i.name == "y").unwrap_or_else(|| {
                panic!("with_x {with_x}: the image's own \"y\" is gone: {list:?}")
            });
            assert!(!y.in_use, "with_x {with_x}: {y:?}");
            assert_eq!(y.granularity, 131072, "with_x {with_x}: {y:?}");
            let held = st.load("y").unwrap();
            assert_eq!(
                held.count(),
                1,
                "with_x {with_x}: \"y\" holds only its own bit"
            );
            assert!(held.is_dirty(own));
            if with_x {
                let x = list.iter().find(|i| i.name == "x").unwrap();
                assert!(x.in_use, "{x:?}");
            }
        }
    }

    /// A removal in `failed` that fails without poisoning the store (a transient read error
    /// in its preflight) must not end the undo there with the store dropped active: the
    /// image's own "other", which the stream never touched, would stay `in_use`, which QEMU
    /// refuses until a repair. A failed removal is tried once more (one read error: the
    /// stream's bitmaps end absent); if it fails again (a second read error, the retry's
    /// first, injected by a second fault layer), that bitmap is marked dirty everywhere and
    /// the inactivation goes ahead. Either way "other" is back as it was, no bitmap of the
    /// stream reads consistent without every bit, and the copies kept for the retry are
    /// exact.
    #[test]
    fn a_removal_that_fails_in_the_undo_still_gives_the_images_other_bitmaps_back() {
        use crate::storage::{FaultPlan, FaultStorage, Trigger};
        // A bit of the image's own, outside the stream's regions.
        let own = 3u64 << 28;
        let before = {
            let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
            st.add("b", 65536, Recording::Enabled).unwrap();
            st.add("other", 65536, Recording::Enabled).unwrap();
            st.activate().unwrap();
            st.bitmap("b").unwrap().mark_dirty(own, 65536);
            st.bitmap("other").unwrap().mark_dirty(own, 65536);
            st.inactivate().unwrap();
            st.image().storage().to_vec()
        };
        let all = DISK / 65536;
        // The destination, after a take-over of "b" and "c" on `before`, on two fault
        // layers: the inner one counts only the reads the outer one passes on.
        let take_over = || {
            let img = Arc::new(FaultStorage::new(
                FaultStorage::new(MemStorage::from_bytes(before.clone()), FaultPlan::new()),
                FaultPlan::new(),
            ));
            let mut d = dest_on(&img);
            d.hello(3, M1).unwrap();
            // "b" (adopted) at the store's region size, so the store holds the very bitmap
            // the attempt keeps; "c" (added) at another.
            d.section(&start_named(0, 1, "b", true, DISK, 4096))
                .unwrap();
            d.section(&region_of(0, 0, 2048, 512, 2)).unwrap();
            d.section(&bitmap_codec::encode_complete(0, 3, false))
                .unwrap();
            d.section(&start_named(1, 4, "c", false, DISK, 512))
                .unwrap();
            d.section(&full_region(1, 2, 5)).unwrap();
            d.section(&bitmap_codec::encode_complete(1, 6, false))
                .unwrap();
            d.before_start().unwrap();
            assert!(Arc::ptr_eq(
                &d.current.incoming[&0].bitmap,
                &d.store().unwrap().bitmap("b").unwrap()
            ));
            (img, d)
        };
        // A dry run: the reads a removal of "b" makes when its first read fails (the
        // preflight's check reads on past an error, and fails after).
        let per_attempt = {
            let (img, mut d) = take_over();
            let from = img.reads();
            img.set_plan(FaultPlan::new().fail_read(Trigger::Nth(from + 1)));
            assert!(d.store.as_mut().unwrap().remove("b").is_err());
            img.reads() - from
        };
        for twice in [false, true] {
            let (img, mut d) = take_over();
            // The undo's first read fails (its first removal's preflight); `twice`, the
            // retry's first too: the inner layer saw all of the first removal's reads but
            // the failed one.
            img.set_plan(FaultPlan::new().fail_read(Trigger::Nth(img.reads() + 1)));
            if twice {
                let inner = img.inner();
                inner.set_plan(
                    FaultPlan::new().fail_read(Trigger::Nth(inner.reads() + per_attempt)),
                );
            }
            d.failed();
            let case = format!("twice: {twice}");
            let st = reopen(img.inner().inner().to_vec());
            let list = st.list();
            let other = list.iter().find(|i| i.name == "other").unwrap();
            assert!(!other.in_use, "{case}: {other:?}");
            let o = st.load("other").unwrap();
            assert_eq!(o.count(), 1, "{case}");
            assert!(o.is_dirty(own), "{case}");
            for name in ["b", "c"] {
                let Some(info) = list.iter().find(|i| i.name == name) else {
                    continue;
                };
                if !info.in_use {
                    assert_eq!(
                        st.load(name).unwrap().count(),
                        all,
                        "{case}: {name:?} reads consistent without every bit"
                    );
                }
            }
            let mut names: Vec<String> = list.iter().map(|i| i.name.to_string()).collect();
            names.sort();
            if twice {
                // "b" left in the store, marked dirty everywhere, and written so; "c" removed.
                assert_eq!(names, ["b", "other"], "{case}");
                assert!(list.iter().all(|i| !i.in_use), "{case}: {list:?}");
            } else {
                assert_eq!(names, ["other"], "{case}: the retried removals");
            }
            // The copies kept for the retry are exact ("b"'s was the store's own).
            d.hello(3, M1).unwrap();
            assert_eq!(report(&mut d), 6, "{case}");
            for i in [0u16, 1] {
                assert_eq!(
                    d.current.incoming[&i].bitmap.count(),
                    512 * 8,
                    "{case}: {i}"
                );
            }
        }
    }

    /// After the start, regions that follow (postcopy) reach a bitmap that does not record
    /// guest writes too, and so does the all-dirty mark of a push that broke off: they are
    /// the source's bits, not writes of the destination guest.
    #[test]
    fn late_regions_and_the_all_dirty_mark_reach_a_bitmap_that_does_not_record() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_named(0, 1, "d", false, DISK, 512))
            .unwrap();
        d.section(&bitmap_codec::encode_complete(0, 2, true))
            .unwrap();
        d.switchover(true);
        d.before_start().unwrap();
        d.section(&full_region(0, 2, 3)).unwrap();
        let live = d.store().unwrap().bitmap("d").unwrap();
        assert!(!live.is_enabled());
        assert_eq!(live.count(), 512 * 8, "the late region is missing");
        d.failed_after_start();
        assert_eq!(live.count(), live.bit_count(), "not dirty everywhere");
        assert!(!live.is_enabled());
    }

    /// Once the caller has taken the store, a late region finds no store to OR into;
    /// replacing the region in the attempt's own bitmap, which the store adopted, would
    /// erase the destination guest's marks in it, and the all-dirty mark of a push that
    /// breaks off would do nothing. Both reach the bitmap the store holds, found at the
    /// start.
    #[test]
    fn late_regions_reach_the_running_bitmap_after_the_store_was_taken() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_named(0, 1, "d", true, DISK, 512)).unwrap();
        d.section(&bitmap_codec::encode_complete(0, 2, true))
            .unwrap();
        d.switchover(true);
        d.before_start().unwrap();
        let st = d.take_store().unwrap();
        let live = st.bitmap("d").unwrap();
        // The destination guest writes a granule of region 2 (512 bytes of bitmap a region:
        // 4,096 granules of 64 KiB).
        let guest = 2 * 4096 * 65536 + 7 * 65536;
        live.mark_dirty(guest, 1);
        // A late region 2 from the source with no bit set in it.
        d.section(&empty_region(0, 2, 3)).unwrap();
        assert!(live.is_dirty(guest), "the guest's mark was erased");
        d.section(&full_region(0, 3, 4)).unwrap();
        assert_eq!(live.count(), 512 * 8 + 1, "the late region is missing");
        d.failed_after_start();
        assert_eq!(live.count(), live.bit_count(), "not dirty everywhere");
    }

    /// The bound counts what a bitmap costs in memory, not only its bits: a flood of tiny
    /// STARTs (1 bit each) is refused long before their real memory passes the bound.
    #[test]
    fn the_memory_bound_counts_each_bitmaps_fixed_cost() {
        let max = 64 << 10;
        let mut d = dest().with_max_bytes(max);
        d.hello(3, M1).unwrap();
        let mut refused = None;
        for i in 0..1000u16 {
            let s = bitmap_codec::encode_start(
                &Start {
                    index: i,
                    stream: S1,
                    name: format!("b{i}"),
                    granularity_bits: 9,
                    enabled: true,
                    disk_size: 512,
                    region_size: 512,
                },
                u64::from(i) + 1,
            );
            if let Err(e) = d.section(&s) {
                assert!(matches!(e, MigrationError::InvalidInput(_)), "{e}");
                refused = Some(i);
                break;
            }
        }
        let real: u64 = d
            .current
            .incoming
            .values()
            .map(|inc| (inc.bitmap.memory_usage() + inc.start.name.len()) as u64)
            .sum();
        println!("refused at {refused:?}, {real} bytes held");
        assert!(refused.is_some(), "1,000 STARTs taken, {real} bytes held");
        assert!(real <= max, "{real} bytes held under a bound of {max}");
    }

    /// The cost the bound counts is never below what a bitmap held here takes: at the
    /// smallest and largest geometries a START can ask for, and between.
    #[test]
    fn the_memory_cost_is_never_below_a_bitmaps_own() {
        for (disk, g) in [
            (512, 512),
            (65536 * 7 + 1, 512),
            (DISK, 65536),
            (DISK + 1, 4096),
            (16 << 40, 1 << 31),
            (1 << 36, 512),
        ] {
            for region in [512, 4096, 2 << 20] {
                let b = DirtyBitmap::with_region_size(disk, g, region).unwrap();
                let own = (b.memory_usage() + std::mem::size_of::<Incoming>() + 1023) as u64;
                let cost = held_cost(b.serialized_len(), 1023);
                assert!(
                    cost >= own,
                    "disk {disk}, granularity {g}, region {region}: {cost} < {own}"
                );
            }
        }
    }

    /// The destination image holds "b" consistent with the other recording flag: the
    /// stream's flag wins, in memory and in what the image says once written.
    #[test]
    fn the_streams_recording_flag_wins_over_the_destination_images() {
        for enabled in [true, false] {
            let other = if enabled {
                Recording::Disabled
            } else {
                Recording::Enabled
            };
            let img = Arc::new(MemStorage::from_bytes(image_with_b(false, other)));
            let mut d = dest_on(&img);
            d.hello(3, M1).unwrap();
            d.section(&start_named(0, 1, "b", enabled, DISK, 512))
                .unwrap();
            d.section(&bitmap_codec::encode_complete(0, 2, false))
                .unwrap();
            d.before_start().unwrap();
            let mut st = d.take_store().unwrap();
            assert_eq!(st.bitmap("b").unwrap().is_enabled(), enabled);
            st.inactivate().unwrap();
            drop(st);
            let info = reopen(img.to_vec()).list().remove(0);
            assert_eq!(info.enabled, enabled, "{info:?}");
        }
    }

    /// The source's recording flag changes after its START went: the stop refuses (the
    /// destination would record where the source no longer does, or the reverse), before
    /// it sends anything, and the retry sends the START again with the flag as it is. A
    /// change between attempts is found by the retry's report, which resends the START.
    #[test]
    fn a_recording_flag_changed_after_its_start_fails_the_stop_and_the_retry_resends_it() {
        let starts = |w: &Wire| -> Vec<bool> {
            w.0.iter()
                .filter_map(|p| match bitmap_codec::decode(p).unwrap().body {
                    BitmapSection::Start(s) => Some(s.enabled),
                    _ => None,
                })
                .collect()
        };
        for postcopy in [false, true] {
            let b = Arc::new(DirtyBitmap::with_region_size(DISK, 65536, 512).unwrap());
            b.mark_dirty(0, 1);
            let mut s = StreamDiskState::new(1, "s", vec![("b".into(), Arc::clone(&b))])
                .unwrap()
                .defer_to_postcopy(postcopy);
            let stop = |s: &mut StreamDiskState, w: &mut Wire| {
                if postcopy {
                    s.postcopy_start(w)
                } else {
                    s.complete(w)
                }
            };
            let mut w = Wire(Vec::new());
            set_up(&mut s, &mut w);
            s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
            assert_eq!(starts(&w), [true]);
            b.set_enabled(false);
            let sent = w.0.len();
            let e = stop(&mut s, &mut w).unwrap_err();
            assert!(
                matches!(
                    e,
                    MigrationError::RecordingChanged {
                        ref bitmap,
                        enabled_at_start: true,
                    } if bitmap == "b"
                ),
                "postcopy {postcopy}: {e}"
            );
            assert_eq!(w.0.len(), sent, "the refused stop sent something");
            s.resume_source();
            // The retry: the destination holds everything sent; the START goes again.
            let mut w = Wire(Vec::new());
            s.setup(&mut w).unwrap();
            s.report(&bitmap_codec::encode_report(s.last_seq()))
                .unwrap();
            s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
            stop(&mut s, &mut w).unwrap();
            assert_eq!(starts(&w), [false], "postcopy {postcopy}");
            // Changed between attempts: the retry's report finds it, and the START goes
            // again in that attempt; its stop succeeds.
            s.cancel();
            b.set_enabled(true);
            let mut w = Wire(Vec::new());
            s.setup(&mut w).unwrap();
            s.report(&bitmap_codec::encode_report(s.last_seq()))
                .unwrap();
            s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
            stop(&mut s, &mut w).unwrap();
            assert_eq!(starts(&w), [true], "postcopy {postcopy}");
        }
    }

    /// `s`'s setup on `w`, and the answer 0 to its QUERY of a first attempt (the destination
    /// holds nothing).
    fn set_up(s: &mut StreamDiskState, w: &mut dyn Outbound) {
        s.setup(w).unwrap();
        if s.awaits_report() && s.last_seq() == 0 {
            s.report(&bitmap_codec::encode_report(0)).unwrap();
        }
    }

    /// Every payload of `w`, applied in order to a new attempt of `d`.
    fn deliver<T: Storage + 'static>(d: &mut StreamDiskDest<T>, w: &Wire) {
        d.hello(3, M1).unwrap();
        for p in &w.0 {
            d.section(p).unwrap();
        }
    }

    /// A bitmap removed from the source store during a stream-mode migration and added
    /// again under its name would go on being streamed from the removed copy, which nothing
    /// marks any more, so a write marked on the new one would never reach the destination
    /// (a false clean). A bitmap the stream reads is busy, as QEMU's is: the store refuses
    /// to remove it while the stream lives.
    #[test]
    fn a_streamed_bitmap_is_busy_and_a_write_after_a_remove_reaches_the_destination() {
        const G: u64 = 1 << 30;
        let disk = 8 * G;
        let mut store = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
        store.add("b", 65536, Recording::Enabled).unwrap();
        store.activate().unwrap();
        let tracker = store.tracker().unwrap();
        tracker.mark(G, 4096);
        let mut s = StreamDiskState::from_store(1, "s", &store).unwrap();
        let mut w = Wire(Vec::new());
        set_up(&mut s, &mut w);
        s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
        // A backup tool removes "b" and adds it again; the guest writes at 7 GiB.
        match store.remove("b") {
            Err(crate::Error::Busy { name }) => assert_eq!(name.as_bytes(), b"b"),
            Ok(_) => store.add("b", 65536, Recording::Enabled).unwrap(),
            Err(e) => panic!("remove: {e}"),
        }
        tracker.mark(7 * G, 4096);
        s.complete(&mut w).unwrap();
        let mut d = StreamDiskDest::new("s", move || {
            BitmapStore::create(MemStorage::new(), disk, 65536)
        });
        deliver(&mut d, &w);
        d.before_start().unwrap();
        let b = d.take_store().unwrap().bitmap("b").unwrap();
        assert!(b.is_dirty(G), "the destination's b lost the write at 1 GiB");
        assert!(
            b.is_dirty(7 * G),
            "the destination's b lost the write at 7 GiB, marked on the source's b"
        );
        // Once the stream is gone, the bitmap can be removed.
        drop(s);
        store.remove("b").unwrap();
    }

    /// A merge (or a `store`, which ORs the same way) into a bitmap the stream reads, after
    /// the stop's last take of it, would OR bits into the source's copy that never reach the
    /// destination, which would start without them (a false clean). As QEMU refuses a merge
    /// into a busy bitmap, the store refuses both while the stream lives, before any write;
    /// the source stays intact, and a merge once the stream is gone is taken.
    #[test]
    fn a_merge_into_a_streamed_bitmap_is_refused_while_the_stream_lives() {
        const G: u64 = 1 << 30;
        let disk = 8 * G;
        let mut store = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
        store.add("b0", 65536, Recording::Enabled).unwrap();
        store.add("x", 65536, Recording::Enabled).unwrap();
        store.activate().unwrap();
        store.bitmap("x").unwrap().mark_dirty(0, 65536);
        assert!(store.bitmap("x").unwrap().is_dirty(0));
        let mut s = StreamDiskState::from_store(1, "s", &store).unwrap();
        let mut w = Wire(Vec::new());
        set_up(&mut s, &mut w);
        s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
        s.complete(&mut w).unwrap();
        match store.merge("x", "b0") {
            Err(crate::Error::Busy { name }) => assert_eq!(name.as_bytes(), b"b0"),
            other => panic!("a merge into a streamed bitmap: {other:?}"),
        }
        assert!(!store.bitmap("b0").unwrap().is_dirty(0));
        let mut d = StreamDiskDest::new("s", move || {
            BitmapStore::create(MemStorage::new(), disk, 65536)
        });
        deliver(&mut d, &w);
        d.before_start().unwrap();
        // `store` ORs as `merge` does.
        let bits = store.load("x").unwrap();
        match store.store("b0", &bits) {
            Err(crate::Error::Busy { name }) => assert_eq!(name.as_bytes(), b"b0"),
            other => panic!("a store into a streamed bitmap: {other:?}"),
        }
        assert!(!store.bitmap("b0").unwrap().is_dirty(0));
        drop(s);
        store.merge("x", "b0").unwrap();
        assert!(store.bitmap("b0").unwrap().is_dirty(0));
    }

    /// A clear of a bitmap the stream reads is refused as QEMU refuses one of a busy
    /// bitmap, before it changes a bit; once the stream is gone it is taken.
    #[test]
    fn a_clear_of_a_streamed_bitmap_is_refused_while_the_stream_lives() {
        let mut store = BitmapStore::create(MemStorage::new(), 1 << 30, 65536).unwrap();
        store.add("b", 65536, Recording::Enabled).unwrap();
        store.activate().unwrap();
        store.tracker().unwrap().mark(0, 4096);
        let mut s = StreamDiskState::from_store(1, "s", &store).unwrap();
        let mut w = Wire(Vec::new());
        set_up(&mut s, &mut w);
        match store.clear("b") {
            Err(crate::Error::Busy { name }) => assert_eq!(name.as_bytes(), b"b"),
            other => panic!("a clear of a streamed bitmap: {other:?}"),
        }
        assert!(store.bitmap("b").unwrap().is_dirty(0));
        drop(s);
        store.clear("b").unwrap();
        assert!(!store.bitmap("b").unwrap().is_dirty(0));
    }

    /// A checkpoint on the source while the stream reads "b" would disable it and hand its
    /// recording to "c2", which the stream does not carry; the writes after it would reach
    /// no bitmap of the destination ("since b" there would lack them). As QEMU's migrating
    /// bitmaps, a streamed bitmap is busy: the store refuses to stop it recording (a
    /// checkpoint, a disable), before any write, and the writes stay in "b".
    #[test]
    fn a_streamed_bitmap_keeps_recording_through_a_checkpoint_or_a_disable() {
        const G: u64 = 1 << 30;
        let disk = 8 * G;
        let mut store = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
        store.add("b", 65536, Recording::Enabled).unwrap();
        store.activate().unwrap();
        let tracker = store.tracker().unwrap();
        let mut s = StreamDiskState::from_store(1, "s", &store).unwrap();
        let mut w = Wire(Vec::new());
        set_up(&mut s, &mut w);
        s.iterate(&mut w, Bytes(u64::MAX)).unwrap();
        let before = store.image().storage().to_vec();
        match store.checkpoint("c2") {
            Err(crate::Error::Busy { name }) => assert_eq!(name.as_bytes(), b"b"),
            other => panic!("checkpoint of a streamed bitmap: {other:?}"),
        }
        match store.set_enabled("b", false) {
            Err(crate::Error::Busy { name }) => assert_eq!(name.as_bytes(), b"b"),
            other => panic!("disable of a streamed bitmap: {other:?}"),
        }
        assert!(
            store.image().storage().to_vec() == before,
            "a refusal wrote"
        );
        // Nor an enable of a disabled streamed bitmap (QEMU refuses it too): the stop would
        // fail on the changed flag. Setting the flag it has changes nothing and is allowed.
        store.set_enabled("b", true).unwrap();
        let mut other = BitmapStore::create(MemStorage::new(), disk, 65536).unwrap();
        other.add("o", 65536, Recording::Disabled).unwrap();
        other.activate().unwrap();
        let o = StreamDiskState::from_store(2, "o", &other).unwrap();
        match other.set_enabled("o", true) {
            Err(crate::Error::Busy { name }) => assert_eq!(name.as_bytes(), b"o"),
            r => panic!("enable of a streamed bitmap: {r:?}"),
        }
        drop(o);
        other.set_enabled("o", true).unwrap();
        tracker.mark(5 * G, 4096);
        s.complete(&mut w).unwrap();
        let mut d = StreamDiskDest::new("s", move || {
            BitmapStore::create(MemStorage::new(), disk, 65536)
        });
        deliver(&mut d, &w);
        d.before_start().unwrap();
        let b = d.take_store().unwrap().bitmap("b").unwrap();
        assert!(b.is_dirty(5 * G), "the destination's b lost the write");
        // Once the stream is gone, the checkpoint goes ahead.
        drop(s);
        assert_eq!(
            store.checkpoint("c2").unwrap().map(|n| n.to_string()),
            Some("b".to_string())
        );
    }

    /// The source's store holds "b" inconsistent (its bits unknown, so all dirty), which
    /// `from_store` cannot stream; were it left out of the stream, the destination, whose
    /// own image holds an older "b" consistent, would activate that one as it is, clean
    /// where the source's is dirty. A bitmap that cannot be streamed refuses the state, as
    /// QEMU refuses the migration (`add_bitmaps_to_list`).
    #[test]
    fn an_inconsistent_source_bitmap_refuses_the_stream() {
        let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
        st.add("b", 65536, Recording::Enabled).unwrap();
        st.add("c", 65536, Recording::Enabled).unwrap();
        // Activated and never stopped: "b" is `in_use` on disk.
        st.activate().unwrap();
        let bytes = st.image().storage().to_vec();
        drop(st);
        let mut src =
            BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadWrite).unwrap();
        // "c" is written again and stored clean; "b" stays inconsistent.
        src.remove("c").unwrap();
        src.add("c", 65536, Recording::Enabled).unwrap();
        src.activate().unwrap();
        assert_eq!(src.list()[0].state, BitmapState::Inconsistent);
        match StreamDiskState::from_store(1, "s", &src) {
            Err(MigrationError::Bitmap(crate::Error::Inconsistent { name })) => {
                assert_eq!(name, "b");
            }
            Ok(_) => panic!("a state streaming without the inconsistent \"b\""),
            Err(e) => panic!("{e}"),
        }
    }

    /// A source bitmap whose name is not UTF-8 was streamed under a lossy copy of its
    /// name, so the destination's bitmap of the real name was left as it was. The stream
    /// carries UTF-8 names only, so such a bitmap refuses the state.
    #[test]
    fn a_source_bitmap_whose_name_is_not_utf8_refuses_the_stream() {
        let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
        st.add("zname-x", 65536, Recording::Enabled).unwrap();
        let mut bytes = st.image().storage().to_vec();
        drop(st);
        let at: Vec<usize> = bytes
            .windows(7)
            .enumerate()
            .filter(|(_, w)| *w == b"zname-x")
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 1, "the name is in the directory only");
        bytes[at[0]] = 0xe2;
        let mut src =
            BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadWrite).unwrap();
        src.activate().unwrap();
        assert_eq!(src.list()[0].name.as_bytes(), b"\xe2name-x");
        let e = StreamDiskState::from_store(1, "s", &src).unwrap_err();
        assert!(
            matches!(e, MigrationError::Bitmap(crate::Error::Unsupported(_))),
            "{e}"
        );
    }

    /// A second COMPLETE of a bitmap is refused, also after the destination started: one
    /// that says no regions follow would clear what the first said of regions still to
    /// come, and a push that then breaks off would leave that bitmap without its missing
    /// regions and without the all-dirty mark.
    #[test]
    fn a_repeated_complete_is_refused() {
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_of(0, 1)).unwrap();
        d.section(&bitmap_codec::encode_complete(0, 2, true))
            .unwrap();
        d.switchover(true);
        d.before_start().unwrap();
        let again = d.section(&bitmap_codec::encode_complete(0, 3, false));
        // The push breaks off: the regions still to come never arrive.
        d.failed_after_start();
        let b = d.store().unwrap().bitmap("b0").unwrap();
        assert_eq!(
            b.count(),
            b.bit_count(),
            "the bitmap whose regions may never come is not all dirty"
        );
        assert!(again.is_err(), "a second COMPLETE of bitmap 0 was accepted");
        // Before the start too.
        let mut d = dest();
        d.hello(3, M1).unwrap();
        d.section(&start_of(0, 1)).unwrap();
        d.section(&bitmap_codec::encode_complete(0, 2, false))
            .unwrap();
        assert!(d
            .section(&bitmap_codec::encode_complete(0, 3, false))
            .is_err());
        assert_eq!(d.applied(), 2, "the refused section is not applied");
    }

    /// After a postcopy take-over, a START for a bitmap the attempt resumed is a repeat
    /// too, not only a START of this attempt: it would replace the bitmap's record, whose
    /// COMPLETE said regions may follow, with one that says none do and runs on no live
    /// bitmap, so a push that then breaks off would skip it, and the running bitmap would
    /// keep regions never sent, read clean. A START once the destination started, or after
    /// the bitmap's COMPLETE in the attempt, is refused, changing nothing.
    #[test]
    fn a_start_after_the_take_over_or_after_its_complete_is_refused() {
        // Attempt 1 sends bitmap 0's START and a region, and fails; attempt 2 resumes it.
        let resumed = || {
            let mut d = dest();
            d.hello(3, M1).unwrap();
            assert_eq!(report(&mut d), 0);
            d.section(&start_of(0, 1)).unwrap();
            d.section(&full_region(0, 2, 2)).unwrap();
            d.failed();
            d.hello(3, M1).unwrap();
            assert_eq!(report(&mut d), 2);
            assert!(d.resumed());
            d.section(&bitmap_codec::encode_complete(0, 3, true))
                .unwrap();
            d.switchover(true);
            d
        };
        let mut d = resumed();
        d.before_start().unwrap();
        // After the start: the resumed bitmap's START again, and a new bitmap's.
        let again = d.section(&start_of(0, 4));
        let new = d.section(&start_of(1, 5));
        // The push breaks off: the regions still to come never arrive.
        d.failed_after_start();
        let b = d.store().unwrap().bitmap("b0").unwrap();
        assert_eq!(
            b.count(),
            b.bit_count(),
            "the bitmap whose regions may never come is not all dirty"
        );
        let e = again.unwrap_err();
        assert!(matches!(e, MigrationError::Frame(_)), "{e}");
        let e = new.unwrap_err();
        assert!(matches!(e, MigrationError::Frame(_)), "{e}");
        assert_eq!(d.applied(), 3, "the refused sections are not applied");
        assert_eq!(d.current.incoming.len(), 1);
        // Before the start: a START after the bitmap's COMPLETE of this attempt.
        let mut d = resumed();
        let e = d.section(&start_of(0, 4)).unwrap_err();
        assert!(matches!(e, MigrationError::Frame(_)), "{e}");
        assert_eq!(d.applied(), 3, "the refused section is not applied");
        assert!(d.current.incoming[&0].complete);
        d.before_start().unwrap();
    }

    /// The take-over removes the image's inconsistent "b" (the stream replaces it), and a
    /// removal of an inconsistent bitmap makes every bitmap kept all dirty; that must not
    /// reach the stream's adopted "c" (shared with the copy kept for a retry), whose
    /// content is the source's, none of the image's history. Only the image's own "z" is
    /// made all dirty; "c" ends as the stream gave it.
    #[test]
    fn a_take_over_replacing_an_inconsistent_bitmap_dirties_only_the_images_own() {
        let mut st = BitmapStore::create(MemStorage::new(), DISK, 65536).unwrap();
        st.add("b", 65536, Recording::Enabled).unwrap();
        st.add("c", 65536, Recording::Disabled).unwrap();
        st.add("z", 65536, Recording::Disabled).unwrap();
        let z = st.load("z").unwrap();
        z.mark_dirty(0, 4096);
        st.store("z", &z).unwrap();
        let mut bytes = st.image().storage().to_vec();
        let area = crate::format::HeaderArea::decode(&bytes[..65536]).unwrap();
        let dir = usize::try_from(area.bitmaps.unwrap().directory_offset).unwrap();
        // "b" is the first entry: its name at 24, its flags word at 12, in_use bit 0.
        assert_eq!(bytes[dir + 24], b'b');
        bytes[dir + 15] |= 1;
        let img = Arc::new(MemStorage::from_bytes(bytes));
        let mut d = dest_on(&img);
        b_and_c(&mut d, false);
        let want_c: Vec<_> = d.current.incoming[&1].bitmap.dirty_extents().collect();
        d.before_start().unwrap();
        let mut st = d.take_store().unwrap();
        st.inactivate().unwrap();
        drop(st);
        let r = reopen(img.to_vec());
        assert_eq!(
            r.load("c").unwrap().dirty_extents().collect::<Vec<_>>(),
            want_c,
            "the stream's c"
        );
        assert_eq!(r.load("z").unwrap().count(), DISK / 65536, "the image's z");
        assert!(r.load("b").is_ok());
    }
}
