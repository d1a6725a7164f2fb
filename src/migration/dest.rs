//! The destination side: reads the source's stream, applies RAM sections into its own
//! anonymous mapping, answers the switchover with Started or Refused, pulls missing pages on
//! demand in postcopy, and at the end hands back its copy of the guest.
//!
//! The conversation (source → destination unless marked ←):
//!
//! ```text
//! precopy:  Hello, Section*, Switchover{postcopy: false}, Section*, End, ← Started | Refused
//! postcopy: Hello, Section*, [RAM discards], Switchover{postcopy: true}, ← Started | Refused,
//!           (Section | ← PageRequest)*, End
//! ```
//!
//! Invariants:
//! - a page index is checked against the RAM size before any byte is written;
//! - the destination starts its guest only with every page received (precopy), or, in
//!   postcopy, serves a page to its guest only once received; a page that was received and
//!   then discarded by the source counts as missing again;
//! - once its guest runs (postcopy), a page already present is never overwritten: the
//!   guest may have written it since, and the source's copy is frozen, so a second copy
//!   (a background push racing a demand request) carries nothing new. This is QEMU's
//!   `UFFDIO_COPY` failing with `EEXIST`;
//! - any error is reported back to the source as an Abort frame (best effort: the channel
//!   may be the thing that failed), except an Abort from the source itself and a refusal,
//!   which already sent Refused. After an error the destination stays failed.
//!
//! Every read blocks; give the channel a read timeout to bound a wait for a silent source.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{Read, Write};

use memmap2::MmapMut;

use super::error::{MigrationError, Result};
use super::ram_codec::{self, PageEntry, RAM_STATE_NAME};
use super::stream::{Frame, FrameReader, FrameWriter, Hello, MAX_FRAME_LEN, STREAM_VERSION};
use super::StateId;
use crate::units::Bytes;

/// How a destination behaves.
#[derive(Debug, Clone)]
pub struct DestinationConfig {
    /// When set, the destination refuses to start its guest with this reason (a test hook,
    /// and what a destination says when it cannot take the guest).
    pub refuse_start: Option<String>,
    /// The largest guest RAM a Hello may ask for.
    pub max_ram_bytes: Bytes,
    /// The largest frame payload the reader accepts.
    pub max_frame_len: u32,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            refuse_start: None,
            max_ram_bytes: Bytes(64 << 30),
            max_frame_len: MAX_FRAME_LEN,
        }
    }
}

/// What one [`Destination::step`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DestEvent {
    /// The Hello was accepted and the RAM mapped.
    Hello(Hello),
    /// A RAM section: pages written and discards applied.
    Pages {
        /// Pages written.
        written: usize,
        /// Pages ignored because the running guest already has them (postcopy).
        ignored: usize,
        /// Pages the source declared stale.
        discarded: usize,
    },
    /// A section of another state, given to the section handler.
    Section {
        /// Its state.
        state: StateId,
    },
    /// The source stopped its guest. With `postcopy`, this destination answered Started and
    /// its guest runs now.
    Switchover {
        /// Whether postcopy began.
        postcopy: bool,
    },
    /// Everything arrived and the guest runs (Started was sent here in precopy).
    End,
}

/// Where the destination is in the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHello,
    Precopy,
    /// Precopy switchover: the source is stopped and sends its last pages.
    Stopped,
    /// Postcopy: the destination guest runs and pulls what it lacks.
    Postcopy,
    Done,
    Failed,
}

/// Handles sections of states other than RAM (the next issue's bitmaps).
pub type SectionHandler = Box<dyn FnMut(StateId, &str, &[u8]) -> Result<()> + Send>;

/// The destination's RAM: a mapping and the set of pages it holds.
struct DestRam {
    map: MmapMut,
    page_size: usize,
    pages: u64,
    received: Vec<u64>,
    received_count: u64,
}

impl DestRam {
    fn new(page_size: usize, pages: u64, max_bytes: u64) -> Result<DestRam> {
        let bytes = pages
            .checked_mul(page_size as u64)
            .filter(|&b| b <= max_bytes)
            .ok_or_else(|| {
                MigrationError::InvalidInput(format!(
                    "guest RAM of {pages} pages of {page_size} bytes exceeds this destination's \
                     limit of {max_bytes} bytes"
                ))
            })?;
        let len = usize::try_from(bytes).map_err(|_| {
            MigrationError::InvalidInput("guest RAM exceeds the address space".into())
        })?;
        // An anonymous mapping reads as zeros and costs nothing until written. A zero-length
        // mapping is not allowed, so an empty RAM maps one byte it never exposes.
        let map = MmapMut::map_anon(len.max(1))?;
        let words = usize::try_from(pages.div_ceil(64))
            .map_err(|_| MigrationError::InvalidInput("too many pages".into()))?;
        Ok(DestRam {
            map,
            page_size,
            pages,
            received: vec![0; words],
            received_count: 0,
        })
    }

    fn has(&self, page: u64) -> bool {
        page < self.pages && self.received[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, page: u64, on: bool) {
        let w = &mut self.received[(page / 64) as usize];
        let bit = 1u64 << (page % 64);
        match (*w & bit != 0, on) {
            (false, true) => self.received_count += 1,
            (true, false) => self.received_count -= 1,
            _ => {}
        }
        if on {
            *w |= bit;
        } else {
            *w &= !bit;
        }
    }

    fn range(&self, page: u64) -> std::ops::Range<usize> {
        // page < pages and pages × page_size fits usize (checked in new).
        let start = page as usize * self.page_size;
        start..start + self.page_size
    }

    fn check(&self, page: u64) -> Result<()> {
        if page < self.pages {
            Ok(())
        } else {
            Err(MigrationError::Stream(format!(
                "page {page} is outside the guest's {} pages",
                self.pages
            )))
        }
    }

    fn first_missing(&self) -> Option<u64> {
        let (w, word) = self
            .received
            .iter()
            .enumerate()
            .find(|(_, &w)| w != u64::MAX)?;
        let p = w as u64 * 64 + u64::from((!word).trailing_zeros());
        (p < self.pages).then_some(p)
    }
}

/// The destination's guest after a successful migration: its RAM, which equals the source's
/// at the moment the source stopped (plus, after postcopy, what the guest wrote since).
pub struct DestinationGuest {
    ram: Option<DestRam>,
    postcopy: bool,
    page_requests: u64,
}

impl fmt::Debug for DestinationGuest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestinationGuest")
            .field("page_size", &self.page_size())
            .field("pages", &self.pages())
            .field("postcopy", &self.postcopy)
            .finish()
    }
}

impl DestinationGuest {
    /// The whole RAM.
    pub fn ram(&self) -> &[u8] {
        match &self.ram {
            Some(r) => &r.map[..r.pages as usize * r.page_size],
            None => &[],
        }
    }

    /// The whole RAM, mutably (the resumed guest runs on it).
    pub fn ram_mut(&mut self) -> &mut [u8] {
        match &mut self.ram {
            Some(r) => {
                let len = r.pages as usize * r.page_size;
                &mut r.map[..len]
            }
            None => &mut [],
        }
    }

    /// Page `page`, if in range.
    pub fn page(&self, page: u64) -> Option<&[u8]> {
        let r = self.ram.as_ref()?;
        (page < r.pages).then(|| &r.map[r.range(page)])
    }

    /// The page size (0 without RAM).
    pub fn page_size(&self) -> usize {
        self.ram.as_ref().map_or(0, |r| r.page_size)
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.ram.as_ref().map_or(0, |r| r.pages)
    }

    /// Whether the guest started before the end (postcopy).
    pub fn was_postcopy(&self) -> bool {
        self.postcopy
    }

    /// PageRequest frames sent.
    pub fn page_requests(&self) -> u64 {
        self.page_requests
    }
}

/// What a destination keeps from an attempt that failed before its guest ran: its RAM, the
/// set of pages it holds, and the migration id of the guest they belong to. A new
/// [`Destination`] built with it ([`Destination::with_retained`]) starts from there when
/// the next Hello carries the same migration id and geometry, so the source's retry
/// ([`super::SetupMode::Incremental`]) sends only the pages it re-dirtied. A Hello with
/// another id (another guest of the same size) starts from empty RAM and the kept pages are
/// dropped: an incremental retry that did not come from the same guest then fails at End
/// with pages missing, and never completes onto another guest's pages.
///
/// Why that is safe: a section is applied whole or not at all (every check comes before
/// the first byte is written, and a frame cut or corrupted in transit fails its checksum
/// before it is applied), so each page held is the source's page as of some send; the
/// source re-dirties every page it sent since its last sync and every page still to send,
/// and its log holds every page written since, so any page held here that is stale is
/// dirty at the source.
pub struct RetainedRam {
    ram: DestRam,
    migration_id: u64,
    sections_applied: u64,
}

impl fmt::Debug for RetainedRam {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedRam")
            .field("pages", &self.ram.pages)
            .field("received", &self.ram.received_count)
            .field("migration_id", &self.migration_id)
            .finish()
    }
}

impl RetainedRam {
    /// Pages held.
    pub fn received_pages(&self) -> u64 {
        self.ram.received_count
    }

    /// The migration id of the guest whose pages these are (from its Hello).
    pub fn migration_id(&self) -> u64 {
        self.migration_id
    }

    /// RAM sections the failed attempt applied, in stream order: everything the source
    /// sent after them was lost (the source's `RamState::redirty_undelivered` takes it).
    pub fn sections_applied(&self) -> u64 {
        self.sections_applied
    }

    /// Whether page `page` is held.
    pub fn has_page(&self, page: u64) -> bool {
        self.ram.has(page)
    }

    /// Page `page`, if held.
    pub fn page(&self, page: u64) -> Option<&[u8]> {
        self.ram
            .has(page)
            .then(|| &self.ram.map[self.ram.range(page)])
    }

    /// The number of pages of the guest it belongs to.
    pub fn pages(&self) -> u64 {
        self.ram.pages
    }
}

/// The destination of one migration attempt over a channel split into a reader (from the
/// source) and a writer (to it).
pub struct Destination<R: Read, W: Write> {
    reader: FrameReader<R>,
    writer: FrameWriter<W>,
    config: DestinationConfig,
    phase: Phase,
    hello: Option<Hello>,
    ram: Option<DestRam>,
    ram_state: Option<StateId>,
    states: BTreeMap<StateId, String>,
    handler: Option<SectionHandler>,
    page_requests: u64,
    postcopy: bool,
    failure: Option<String>,
    /// The guest ran here (Started was sent): the RAM is no longer the source's alone.
    ran: bool,
    /// RAM kept from a failed attempt, until the Hello says whether it is this guest's.
    retained: Option<RetainedRam>,
    /// The Hello's id matched the kept RAM, and this attempt started from it.
    resumed: bool,
    /// RAM sections applied in this attempt.
    ram_sections: u64,
}

impl<R: Read, W: Write> fmt::Debug for Destination<R, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("phase", &self.phase)
            .field("hello", &self.hello)
            .field("received", &self.received_pages())
            .finish()
    }
}

impl<R: Read, W: Write> Destination<R, W> {
    /// A destination reading the source's stream from `from` and answering on `to`.
    /// Nothing is read or written yet.
    pub fn new(from: R, to: W, config: DestinationConfig) -> Destination<R, W> {
        Destination {
            reader: FrameReader::with_max_frame_len(from, config.max_frame_len),
            writer: FrameWriter::new(to),
            config,
            phase: Phase::AwaitHello,
            hello: None,
            ram: None,
            ram_state: None,
            states: BTreeMap::new(),
            handler: None,
            page_requests: 0,
            postcopy: false,
            failure: None,
            ran: false,
            retained: None,
            resumed: false,
            ram_sections: 0,
        }
    }

    /// As [`Destination::new`], starting from the RAM a failed attempt left (`kept`) if
    /// the Hello's migration id and geometry match it; otherwise the RAM starts empty and
    /// `kept` is dropped.
    pub fn with_retained(
        from: R,
        to: W,
        config: DestinationConfig,
        kept: Option<RetainedRam>,
    ) -> Destination<R, W> {
        let mut d = Destination::new(from, to, config);
        d.retained = kept;
        d
    }

    /// After a failed attempt: the RAM to start the next attempt from, unless the guest ran
    /// here (postcopy: the RAM is the destination guest's now) or no Hello came.
    pub fn into_retained(self) -> Option<RetainedRam> {
        if self.ran {
            return None;
        }
        match (self.ram, &self.hello) {
            (Some(ram), Some(h)) => Some(RetainedRam {
                ram,
                migration_id: h.migration_id,
                sections_applied: self.ram_sections,
            }),
            // No Hello (or no RAM in it): what was kept is still the old guest's.
            _ => self.retained.map(|k| RetainedRam {
                sections_applied: 0,
                ..k
            }),
        }
    }

    /// Whether this attempt started from RAM kept from a failed one (the Hello's migration
    /// id and geometry matched it).
    pub fn resumed_from_retained(&self) -> bool {
        self.resumed
    }

    /// Accepts sections of states other than RAM. Without a handler, a Hello declaring such
    /// a state is refused.
    pub fn set_section_handler(&mut self, handler: SectionHandler) {
        self.handler = Some(handler);
    }

    /// The source's Hello, once read.
    pub fn hello(&self) -> Option<&Hello> {
        self.hello.as_ref()
    }

    /// Pages received (and not discarded).
    pub fn received_pages(&self) -> u64 {
        self.ram.as_ref().map_or(0, |r| r.received_count)
    }

    /// Whether page `page` is here.
    pub fn has_page(&self, page: u64) -> bool {
        self.ram.as_ref().is_some_and(|r| r.has(page))
    }

    /// Whether the guest runs here (postcopy after switchover, or the end).
    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Postcopy | Phase::Done)
    }

    /// Whether the migration completed.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The reader (for its counters or its channel).
    pub fn reader(&self) -> &FrameReader<R> {
        &self.reader
    }

    /// Reads and applies one frame.
    ///
    /// # Errors
    /// [`MigrationError::PeerAborted`] when the source aborts,
    /// [`MigrationError::DestinationRefused`] when this destination refused to start,
    /// [`MigrationError::Frame`] or [`MigrationError::Io`] from the stream,
    /// [`MigrationError::Stream`] for a frame the protocol does not allow here,
    /// [`MigrationError::InvalidInput`] for a Hello this destination cannot take. All but
    /// the first two are also sent to the source as an Abort. After any error the
    /// destination is failed and every later call returns [`MigrationError::Stream`].
    pub fn step(&mut self) -> Result<DestEvent> {
        match self.phase {
            Phase::Failed => {
                return Err(MigrationError::Stream(format!(
                    "destination failed earlier: {}",
                    self.failure.as_deref().unwrap_or("")
                )))
            }
            Phase::Done => {
                return Err(MigrationError::Stream(
                    "the migration is complete; nothing more to read".into(),
                ))
            }
            _ => {}
        }
        let res = self.step_inner();
        if let Err(e) = &res {
            self.fail(e);
        }
        res
    }

    fn fail(&mut self, e: &MigrationError) {
        self.phase = Phase::Failed;
        self.failure = Some(e.to_string());
        match e {
            MigrationError::PeerAborted(_) | MigrationError::DestinationRefused(_) => {}
            other => self.writer.abort(&format!("destination: {other}")),
        }
    }

    fn step_inner(&mut self) -> Result<DestEvent> {
        let frame = self.reader.read_frame()?;
        match (self.phase, frame) {
            (_, Frame::Abort { reason }) => Err(MigrationError::PeerAborted(reason)),
            (Phase::AwaitHello, Frame::Hello(h)) => self.accept(h),
            (
                Phase::Precopy | Phase::Stopped | Phase::Postcopy,
                Frame::Section { state, payload },
            ) => self.section(state, &payload),
            (Phase::Precopy, Frame::Switchover { postcopy }) => {
                if postcopy {
                    self.start()?;
                    self.phase = Phase::Postcopy;
                    self.postcopy = true;
                } else {
                    self.phase = Phase::Stopped;
                }
                Ok(DestEvent::Switchover { postcopy })
            }
            (Phase::Stopped | Phase::Postcopy, Frame::End) => {
                if let Some(p) = self.ram.as_ref().and_then(DestRam::first_missing) {
                    return Err(MigrationError::Stream(format!(
                        "End with page {p} never received ({} of {} pages here)",
                        self.received_pages(),
                        self.ram.as_ref().map_or(0, |r| r.pages)
                    )));
                }
                if self.phase == Phase::Stopped {
                    self.start()?;
                }
                self.phase = Phase::Done;
                Ok(DestEvent::End)
            }
            (phase, f) => Err(MigrationError::Stream(format!(
                "unexpected {:?} frame {} while {phase:?}",
                f.kind(),
                self.reader.frames_read() - 1
            ))),
        }
    }

    /// Answers the switchover: Started, or Refused when configured to refuse.
    fn start(&mut self) -> Result<()> {
        if let Some(reason) = self.config.refuse_start.clone() {
            // Best effort, like Abort: the refusal is the error either way.
            let _ = self.writer.write_frame(&Frame::Refused {
                reason: reason.clone(),
            });
            return Err(MigrationError::DestinationRefused(reason));
        }
        self.writer.write_frame(&Frame::Started)?;
        self.ran = true;
        Ok(())
    }

    fn accept(&mut self, h: Hello) -> Result<DestEvent> {
        let stream_version = self.reader.version().unwrap_or(STREAM_VERSION);
        if h.version != stream_version {
            return Err(MigrationError::Stream(format!(
                "Hello says version {} but the stream header says {stream_version}",
                h.version
            )));
        }
        let mut ram_state = None;
        let mut states = BTreeMap::new();
        // Up to 65,535 states: one hash lookup each, not a scan of the ones before.
        let mut names = HashSet::with_capacity(h.states.len());
        for s in &h.states {
            if !names.insert(s.name.as_str()) {
                return Err(MigrationError::Stream(format!(
                    "state {:?} declared twice",
                    s.name
                )));
            }
            if states.insert(s.id, s.name.clone()).is_some() {
                return Err(MigrationError::Stream(format!(
                    "state id {} declared twice",
                    s.id
                )));
            }
            if s.name == RAM_STATE_NAME {
                ram_state = Some(s.id);
            } else if self.handler.is_none() {
                return Err(MigrationError::InvalidInput(format!(
                    "this destination has no handler for state {:?}",
                    s.name
                )));
            }
        }
        match ram_state {
            Some(_) => {
                let ps = h.page_size as usize;
                ram_codec::check_page_size(ps)?;
                // Kept RAM is reused only for the same guest: same migration id, same
                // geometry. Otherwise it is dropped (it belongs to a guest that is not
                // coming back on this destination).
                self.ram = Some(match self.retained.take() {
                    Some(kept)
                        if kept.migration_id == h.migration_id
                            && kept.ram.page_size == ps
                            && kept.ram.pages == h.ram_pages =>
                    {
                        self.resumed = true;
                        kept.ram
                    }
                    _ => DestRam::new(ps, h.ram_pages, self.config.max_ram_bytes.get())?,
                });
            }
            None if h.ram_pages != 0 => {
                return Err(MigrationError::Stream(format!(
                    "Hello has {} RAM pages but no {RAM_STATE_NAME:?} state",
                    h.ram_pages
                )))
            }
            None => {}
        }
        self.ram_state = ram_state;
        self.states = states;
        self.hello = Some(h.clone());
        self.phase = Phase::Precopy;
        Ok(DestEvent::Hello(h))
    }

    fn section(&mut self, state: StateId, payload: &[u8]) -> Result<DestEvent> {
        if Some(state) != self.ram_state {
            let Some(name) = self.states.get(&state) else {
                return Err(MigrationError::Stream(format!(
                    "section of state {state}, which the Hello did not declare"
                )));
            };
            let handler = self
                .handler
                .as_mut()
                .ok_or_else(|| MigrationError::Stream(format!("no handler for {name:?}")))?;
            handler(state, name, payload)?;
            return Ok(DestEvent::Section { state });
        }
        let running = self.phase == Phase::Postcopy;
        let ram = self
            .ram
            .as_mut()
            .ok_or_else(|| MigrationError::Stream("RAM section without RAM".into()))?;
        let entries = ram_codec::decode_entries(ram.page_size, payload)?;
        // Check every index first, so a bad section changes nothing.
        for e in &entries {
            ram.check(e.page())?;
            if running && matches!(e, PageEntry::Discard(_)) {
                return Err(MigrationError::Stream(format!(
                    "discard of page {} after the guest started",
                    e.page()
                )));
            }
        }
        let (mut written, mut ignored, mut discarded) = (0, 0, 0);
        for e in entries {
            match e {
                PageEntry::Data(page, data) => {
                    if running && ram.has(page) {
                        ignored += 1;
                        continue;
                    }
                    let r = ram.range(page);
                    ram.map[r].copy_from_slice(data);
                    ram.set(page, true);
                    written += 1;
                }
                PageEntry::Discard(page) => {
                    ram.set(page, false);
                    discarded += 1;
                }
            }
        }
        self.ram_sections += 1;
        Ok(DestEvent::Pages {
            written,
            ignored,
            discarded,
        })
    }

    /// Postcopy: page `page` for the running guest. If it is missing, sends a PageRequest
    /// and applies incoming frames until it arrives.
    ///
    /// # Errors
    /// [`MigrationError::InvalidInput`] if the guest is not running here or `page` is out of
    /// range; the errors of [`Destination::step`], and [`MigrationError::Stream`] if the
    /// stream ends without the page.
    pub fn fetch_page(&mut self, page: u64) -> Result<&mut [u8]> {
        if !self.is_running() {
            return Err(MigrationError::InvalidInput(
                "fetch_page before the guest runs here".into(),
            ));
        }
        let (pages, ram_state) = match (&self.ram, self.ram_state) {
            (Some(r), Some(id)) => (r.pages, id),
            _ => return Err(MigrationError::InvalidInput("no RAM".into())),
        };
        if page >= pages {
            return Err(MigrationError::InvalidInput(format!(
                "page {page} is outside the guest's {pages} pages"
            )));
        }
        if !self.has_page(page) {
            let req = Frame::PageRequest {
                state: ram_state,
                payload: ram_codec::encode_page_request(page, 1),
            };
            if let Err(e) = self.writer.write_frame(&req) {
                self.fail(&e);
                return Err(e);
            }
            self.page_requests += 1;
            while !self.has_page(page) {
                if self.phase == Phase::Done {
                    return Err(MigrationError::Stream(format!(
                        "the stream ended without page {page}"
                    )));
                }
                self.step()?;
            }
        }
        let ram = self
            .ram
            .as_mut()
            .ok_or_else(|| MigrationError::InvalidInput("no RAM".into()))?;
        let r = ram.range(page);
        Ok(&mut ram.map[r])
    }

    /// Steps until the end and hands back the running guest.
    ///
    /// # Errors
    /// The errors of [`Destination::step`].
    pub fn run(mut self) -> Result<DestinationGuest> {
        while self.phase != Phase::Done {
            self.step()?;
        }
        Ok(DestinationGuest {
            ram: self.ram,
            postcopy: self.postcopy,
            page_requests: self.page_requests,
        })
    }
}
