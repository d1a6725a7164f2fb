//! The destination side: reads the source's stream, applies RAM sections into its own
//! anonymous mapping, answers the switchover with Started or Refused, pulls missing pages on
//! demand in postcopy, and at the end hands back its copy of the guest.
//!
//! The conversation (source → destination unless marked ←):
//!
//! ```text
//! precopy:  [← Nonce], Hello, Section*, Switchover{postcopy: false}, Section*, End,
//!           ← Started | Refused
//! postcopy: [← Nonce], Hello, Section*, [RAM discards], Switchover{postcopy: true},
//!           ← Started | Refused, (Section | ← PageRequest)*, End
//! ```
//!
//! With [`DestinationConfig::nonce`] the destination speaks first: a Nonce the Hello must
//! echo, so that a recorded attempt cannot be replayed, and RAM kept from a failed attempt
//! is reused only by a Hello that resumes that migration by name (`Hello::resume`); any
//! other Hello is refused and the kept RAM stays. A Hello whose RAM pass is incremental
//! (`Hello::incremental`: only what an earlier attempt left dirty) is refused unless it
//! resumes kept RAM, before any page: the pages it will not send would be missing.
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
//! The frame handling is [`DestCore`], which does no I/O: [`Destination`] drives it from a
//! [`FrameReader`] and answers through a [`FrameWriter`], and the virtual-clock simulation
//! (`sim.rs`) drives the same core from its simulated link.
//!
//! Every read of a [`Destination`] blocks; give the channel a read timeout to bound a wait
//! for a silent source.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{Read, Write};

use memmap2::MmapMut;

use super::dest_state::{self, Binding, SharedDestState};
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{Frame, Hello, StateId, MAX_FRAME_LEN, STREAM_VERSION};
use super::ram_codec::{self, PageEntry, RAM_STATE_NAME};
use super::stream::{FrameReader, FrameWriter, HeaderHook};
use crate::error::StateProblem;
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
    /// The nonce this destination issues for the connection: [`Destination`] sends it as
    /// its first frame ([`Frame::Nonce`]), and the Hello must echo it
    /// ([`ProtocolError::WrongNonce`] otherwise). Kept RAM is then bound to the migration
    /// that left it: reused only by a Hello whose `resume` names it. `None` (an in-process
    /// channel, the simulation): no nonce, and kept RAM is bound to the migration id and
    /// geometry alone.
    pub nonce: Option<u128>,
}

impl Default for DestinationConfig {
    fn default() -> Self {
        DestinationConfig {
            refuse_start: None,
            max_ram_bytes: Bytes(64 << 30),
            max_frame_len: MAX_FRAME_LEN,
            nonce: None,
        }
    }
}

/// A fresh nonce for [`DestinationConfig::nonce`]: random, never 0.
pub fn new_nonce() -> u128 {
    loop {
        let n = (u128::from(crate::rng::unique_u64()) << 64) | u128::from(crate::rng::unique_u64());
        if n != 0 {
            return n;
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

impl Phase {
    /// Its name in error messages.
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitHello => "AwaitHello",
            Phase::Precopy => "Precopy",
            Phase::Stopped => "Stopped",
            Phase::Postcopy => "Postcopy",
            Phase::Done => "Done",
            Phase::Failed => "Failed",
        }
    }
}

/// Handles sections of states other than RAM (a dirty-bitmap state, say).
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
            Err(ProtocolError::PageOutOfRange {
                page,
                pages: self.pages,
            }
            .into())
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
/// ([`super::SetupMode::Incremental`]) sends only the pages it re-dirtied. With nonces
/// ([`DestinationConfig::nonce`]) the Hello must also name the migration that left the RAM
/// (its `resume` equal to [`RetainedRam::token`]). Any other Hello (another guest, another
/// geometry, another migration of the same guest) is refused and the kept pages stay, for
/// the retry of the migration they belong to.
///
/// Why that is safe: a section is applied whole or not at all (every check comes before
/// the first byte is written, and a frame cut or corrupted in transit fails its checksum
/// before it is applied), so each page held is the source's page as of some send; the
/// source re-dirties every page it sent in the attempt unless the failure proves that every
/// section sent was applied (a refusal, or a cancel before the first section; then every
/// page sent since its last sync and every page still to send suffice), and its log holds
/// every page written since, so any page held here that is stale is dirty at the source.
pub struct RetainedRam {
    ram: DestRam,
    migration_id: u64,
    /// The migration it belongs to: the nonce of its first attempt here (0 without nonces).
    token: u128,
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

    /// The migration these pages belong to: the nonce of its first attempt here, which
    /// every Hello resuming them names in `resume` (0 for RAM kept without nonces).
    pub fn token(&self) -> u128 {
        self.token
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

/// The destination's side of the conversation, without I/O: it takes the source's frames
/// one by one ([`DestCore::apply`]), keeps the RAM and the phase, and hands its answers
/// (Started, Refused) to a callback. [`Destination`] runs it over a stream; the simulation
/// (`sim.rs`) runs it over its simulated link, so both apply frames with the same code.
///
/// After an error the core is failed, and every later [`apply`](DestCore::apply) returns
/// [`ProtocolError::Failed`].
pub struct DestCore {
    config: DestinationConfig,
    phase: Phase,
    hello: Option<Hello>,
    ram: Option<DestRam>,
    ram_state: Option<StateId>,
    states: BTreeMap<StateId, String>,
    handler: Option<SectionHandler>,
    /// Destination-side states, by name, and the ids this attempt's Hello gave them.
    dest_states: Vec<SharedDestState>,
    declared: BTreeMap<StateId, usize>,
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
    /// The migration the RAM of this attempt belongs to (see [`RetainedRam::token`]).
    token: u128,
}

impl fmt::Debug for DestCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestCore")
            .field("phase", &self.phase)
            .field("hello", &self.hello)
            .field("received", &self.received_pages())
            .finish()
    }
}

impl DestCore {
    /// A destination that has seen nothing yet, starting from the RAM a failed attempt left
    /// (`kept`) if the Hello resumes it ([`RetainedRam`]); a Hello that does not is refused
    /// and `kept` stays ([`DestCore::into_retained`]).
    pub fn new(config: DestinationConfig, kept: Option<RetainedRam>) -> DestCore {
        DestCore {
            config,
            phase: Phase::AwaitHello,
            hello: None,
            ram: None,
            ram_state: None,
            states: BTreeMap::new(),
            handler: None,
            dest_states: Vec::new(),
            declared: BTreeMap::new(),
            postcopy: false,
            failure: None,
            ran: false,
            retained: kept,
            resumed: false,
            ram_sections: 0,
            token: 0,
        }
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
                token: self.token,
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

    /// RAM sections applied in this attempt, in stream order.
    pub fn sections_applied(&self) -> u64 {
        self.ram_sections
    }

    /// Accepts sections of states other than RAM. Without a handler, a Hello declaring such
    /// a state is refused.
    pub fn set_section_handler(&mut self, handler: SectionHandler) {
        self.handler = Some(handler);
    }

    /// Takes the state of that name: a Hello that declares it calls its hooks (see
    /// [`DestState`](super::dest_state::DestState)) instead of the section handler.
    pub fn add_state(&mut self, state: SharedDestState) {
        self.dest_states.push(state);
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

    /// The number of pages of the guest's RAM (0 before the Hello or without RAM).
    pub fn pages(&self) -> u64 {
        self.ram.as_ref().map_or(0, |r| r.pages)
    }

    /// The whole RAM (empty before the Hello or without RAM).
    pub fn ram(&self) -> &[u8] {
        match &self.ram {
            Some(r) => &r.map[..r.pages as usize * r.page_size],
            None => &[],
        }
    }

    /// Whether the guest runs here (postcopy after switchover, or the end).
    pub fn is_running(&self) -> bool {
        matches!(self.phase, Phase::Postcopy | Phase::Done)
    }

    /// Whether the migration completed.
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Fails unless frames may still come: after an error, and after the end.
    ///
    /// # Errors
    /// [`ProtocolError::Failed`] with the earlier error, or [`ProtocolError::Complete`].
    pub fn check_live(&self) -> Result<()> {
        match self.phase {
            Phase::Failed => {
                Err(ProtocolError::Failed(self.failure.clone().unwrap_or_default()).into())
            }
            Phase::Done => Err(ProtocolError::Complete.into()),
            _ => Ok(()),
        }
    }

    /// Marks the core failed with `e` (an error of its channel, say). Unless the guest
    /// started here, every declared [`DestState`](super::dest_state::DestState) hears of it
    /// ([`DestState::failed`](super::dest_state::DestState::failed)); if it runs here and the
    /// stream had not ended (postcopy), each hears that the rest will not come
    /// ([`DestState::failed_after_start`](super::dest_state::DestState::failed_after_start)).
    pub fn fail(&mut self, e: &MigrationError) {
        if self.phase != Phase::Failed && !self.ran {
            self.undo_states();
        } else if self.phase == Phase::Postcopy {
            // The guest runs here and the rest will not come.
            for &i in self.declared.values() {
                if let Some(s) = self.dest_states.get(i) {
                    dest_state::lock(s).failed_after_start();
                }
            }
        }
        self.phase = Phase::Failed;
        self.failure = Some(e.to_string());
    }

    /// Applies the source's frame number `seq` of a stream of version `stream_version`
    /// (the stream header's; `None` before one was read). Started and Refused go to
    /// `reply`: a refusal is sent best effort (the refusal is the error either way), a
    /// failed Started is the error.
    ///
    /// # Errors
    /// [`MigrationError::PeerAborted`] when the source aborts,
    /// [`MigrationError::DestinationRefused`] when this destination refused to start,
    /// [`MigrationError::Protocol`] for a frame the protocol does not allow here,
    /// [`MigrationError::Frame`] for a RAM section that does not decode,
    /// [`MigrationError::InvalidInput`] for a Hello this destination cannot take, and the
    /// errors of `reply` and of the section handler. After any error the core is failed.
    pub fn apply(
        &mut self,
        frame: Frame,
        seq: u64,
        stream_version: Option<u32>,
        reply: &mut dyn FnMut(&Frame) -> Result<()>,
    ) -> Result<DestEvent> {
        self.check_live()?;
        let res = self.apply_inner(frame, seq, stream_version, reply);
        if let Err(e) = &res {
            self.fail(e);
        }
        res
    }

    fn apply_inner(
        &mut self,
        frame: Frame,
        seq: u64,
        stream_version: Option<u32>,
        reply: &mut dyn FnMut(&Frame) -> Result<()>,
    ) -> Result<DestEvent> {
        match (self.phase, frame) {
            (_, Frame::Abort { reason }) => Err(MigrationError::PeerAborted(reason)),
            (Phase::AwaitHello, Frame::Hello(h)) => {
                self.accept(h, stream_version.unwrap_or(STREAM_VERSION))
            }
            (
                Phase::Precopy | Phase::Stopped | Phase::Postcopy,
                Frame::Section { state, payload },
            ) => self.section(state, &payload, reply),
            (Phase::Precopy, Frame::Switchover { postcopy }) => {
                for &i in self.declared.values() {
                    if let Some(s) = self.dest_states.get(i) {
                        dest_state::lock(s).switchover(postcopy);
                    }
                }
                if postcopy {
                    self.start(reply)?;
                    self.phase = Phase::Postcopy;
                    self.postcopy = true;
                } else {
                    self.phase = Phase::Stopped;
                }
                Ok(DestEvent::Switchover { postcopy })
            }
            (Phase::Stopped | Phase::Postcopy, Frame::End) => {
                if let Some(p) = self.ram.as_ref().and_then(DestRam::first_missing) {
                    return Err(ProtocolError::PageNeverReceived {
                        page: p,
                        received: self.received_pages(),
                        pages: self.pages(),
                    }
                    .into());
                }
                if self.phase == Phase::Stopped {
                    self.start(reply)?;
                } else {
                    for &i in self.declared.values() {
                        if let Some(s) = self.dest_states.get(i) {
                            dest_state::lock(s).push_ended();
                        }
                    }
                }
                self.phase = Phase::Done;
                Ok(DestEvent::End)
            }
            (phase, f) => Err(ProtocolError::UnexpectedFrame {
                kind: f.kind(),
                seq,
                phase: phase.name(),
            }
            .into()),
        }
    }

    /// Answers the switchover: Started, or Refused when configured to refuse.
    /// Every declared [`DestState`](super::dest_state::DestState) hears that the attempt failed, once.
    fn undo_states(&mut self) {
        for &i in self.declared.values() {
            if let Some(s) = self.dest_states.get(i) {
                dest_state::lock(s).failed();
            }
        }
        self.declared.clear();
    }

    fn start(&mut self, reply: &mut dyn FnMut(&Frame) -> Result<()>) -> Result<()> {
        let mut refuse = self.config.refuse_start.clone();
        if refuse.is_none() {
            for &i in self.declared.values() {
                if let Some(s) = self.dest_states.get(i) {
                    let mut s = dest_state::lock(s);
                    if let Err(e) = s.before_start() {
                        refuse = Some(format!("state {}: {e}", s.name()));
                        break;
                    }
                }
            }
        }
        if let Some(reason) = refuse {
            // Undone before the source hears the refusal: it takes its state back as soon
            // as it does (a disk image's write locks, say).
            self.undo_states();
            // Best effort, like Abort: the refusal is the error either way.
            let _ = reply(&Frame::Refused {
                reason: reason.clone(),
            });
            return Err(MigrationError::DestinationRefused(reason));
        }
        reply(&Frame::Started)?;
        self.ran = true;
        Ok(())
    }

    fn accept(&mut self, h: Hello, stream_version: u32) -> Result<DestEvent> {
        if h.version != stream_version {
            return Err(ProtocolError::HelloVersion {
                hello: h.version,
                stream: stream_version,
            }
            .into());
        }
        if self.config.nonce.is_some_and(|n| n != h.nonce) {
            return Err(ProtocolError::WrongNonce { found: h.nonce }.into());
        }
        let mut ram_state = None;
        let mut declared = BTreeMap::new();
        let mut states = BTreeMap::new();
        // Up to 65,535 states: one hash lookup each, not a scan of the ones before.
        let mut names = HashSet::with_capacity(h.states.len());
        for s in &h.states {
            if !names.insert(s.name.as_str()) {
                return Err(ProtocolError::DuplicateStateName(s.name.clone()).into());
            }
            if states.insert(s.id, s.name.clone()).is_some() {
                return Err(ProtocolError::DuplicateStateId(s.id).into());
            }
            if s.name == RAM_STATE_NAME {
                ram_state = Some(s.id);
            } else if let Some(i) = self
                .dest_states
                .iter()
                .position(|d| dest_state::lock(d).name() == s.name)
            {
                declared.insert(s.id, i);
            } else if self.handler.is_none() {
                return Err(MigrationError::InvalidInput(format!(
                    "this destination has no handler for state {:?}",
                    s.name
                )));
            }
        }
        // With nonces, the RAM of this attempt belongs to the migration the Hello resumes,
        // or, starting afresh, to this attempt.
        let token = match self.config.nonce {
            Some(n) if h.resume == 0 => n,
            Some(_) => h.resume,
            None => 0,
        };
        match ram_state {
            Some(_) => {
                let ps = h.page_size as usize;
                ram_codec::check_page_size(ps)?;
                // Kept RAM is reused only by the migration that left it: same migration id,
                // same geometry, and (with nonces) a Hello that resumes it by its token.
                // Any other Hello is refused and the kept RAM stays, untouched, for that
                // migration's retry: it is taken only once every check passed, the
                // destination states' `hello` below included.
                self.ram = match &self.retained {
                    Some(kept)
                        if kept.migration_id == h.migration_id
                            && kept.ram.page_size == ps
                            && kept.ram.pages == h.ram_pages
                            && (self.config.nonce.is_none() || kept.token == h.resume) =>
                    {
                        None
                    }
                    Some(kept) => {
                        return Err(ProtocolError::KeptRamNotResumed {
                            migration_id: h.migration_id,
                            pages: h.ram_pages,
                            kept_id: kept.migration_id,
                            kept_pages: kept.ram.pages,
                        }
                        .into())
                    }
                    // An incremental first pass sends only what the attempt that left
                    // the kept RAM re-dirtied: with nothing kept, the rest would never
                    // come (in postcopy, after the guest started here).
                    None if h.incremental => {
                        return Err(ProtocolError::NoKeptRam {
                            migration_id: h.migration_id,
                        }
                        .into())
                    }
                    None => Some(DestRam::new(
                        ps,
                        h.ram_pages,
                        self.config.max_ram_bytes.get(),
                    )?),
                };
            }
            None if h.incremental => {
                return Err(ProtocolError::NoKeptRam {
                    migration_id: h.migration_id,
                }
                .into())
            }
            None if h.ram_pages != 0 => {
                return Err(ProtocolError::RamWithoutState {
                    pages: h.ram_pages,
                    name: RAM_STATE_NAME,
                }
                .into())
            }
            None => {}
        }
        let binding = Binding {
            migration_id: h.migration_id,
            token,
        };
        for (&id, &i) in &declared {
            if let Some(s) = self.dest_states.get(i) {
                dest_state::lock(s).hello(id, binding)?;
            }
        }
        if ram_state.is_some() && self.ram.is_none() {
            // Every check passed: the kept RAM the checks above matched is taken now.
            self.resumed = true;
            self.ram = Some(
                self.retained
                    .take()
                    .map(|k| k.ram)
                    .ok_or_else(|| MigrationError::internal("kept RAM vanished"))?,
            );
        }
        self.declared = declared;
        self.ram_state = ram_state;
        self.states = states;
        self.token = token;
        self.hello = Some(h.clone());
        self.phase = Phase::Precopy;
        Ok(DestEvent::Hello(h))
    }

    fn section(
        &mut self,
        state: StateId,
        payload: &[u8],
        reply: &mut dyn FnMut(&Frame) -> Result<()>,
    ) -> Result<DestEvent> {
        if Some(state) != self.ram_state {
            let Some(name) = self.states.get(&state) else {
                return Err(ProtocolError::UndeclaredState(state).into());
            };
            if let Some(s) = self
                .declared
                .get(&state)
                .and_then(|&i| self.dest_states.get(i))
            {
                let answer = dest_state::lock(s).section(payload)?;
                if let Some(payload) = answer {
                    reply(&Frame::Report { state, payload })?;
                }
                return Ok(DestEvent::Section { state });
            }
            let handler = self
                .handler
                .as_mut()
                .ok_or_else(|| ProtocolError::NoHandler(name.clone()))?;
            handler(state, name, payload)?;
            return Ok(DestEvent::Section { state });
        }
        let running = self.phase == Phase::Postcopy;
        let ram = self.ram.as_mut().ok_or(ProtocolError::NoRam)?;
        let entries = ram_codec::decode_entries(ram.page_size, payload)?;
        // Check every index first, so a bad section changes nothing.
        for e in &entries {
            ram.check(e.page())?;
            if running && matches!(e, PageEntry::Discard(_)) {
                return Err(ProtocolError::DiscardAfterStart { page: e.page() }.into());
            }
        }
        let mut pages: Vec<u64> = entries.iter().map(PageEntry::page).collect();
        pages.sort_unstable();
        if let Some(&[page, _]) = pages.windows(2).find(|w| w.first() == w.last()) {
            return Err(ProtocolError::RepeatedPage { page }.into());
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
                    // A zero page over a page that is already zero (never written, or
                    // zeroed before) writes nothing, as QEMU's `ram_handle_zero` checks
                    // `buffer_is_zero` first: reading a never-touched page of the anonymous
                    // mapping costs no memory, writing it would allocate one.
                    let dst = &mut ram.map[r];
                    if !(ram_codec::is_zero(data) && ram_codec::is_zero(dst)) {
                        dst.copy_from_slice(data);
                    }
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

    /// Page `page` of the RAM, mutably, if in range.
    fn page_mut(&mut self, page: u64) -> Option<&mut [u8]> {
        let ram = self.ram.as_mut()?;
        (page < ram.pages).then(|| {
            let r = ram.range(page);
            &mut ram.map[r]
        })
    }

    /// The guest this core handed over: its RAM and how it started.
    fn into_guest(self, page_requests: u64) -> DestinationGuest {
        DestinationGuest {
            ram: self.ram,
            postcopy: self.postcopy,
            page_requests,
        }
    }
}

/// The destination of one migration attempt over a channel split into a reader (from the
/// source) and a writer (to it): a [`DestCore`] fed by a [`FrameReader`], answering on a
/// [`FrameWriter`].
pub struct Destination<R: Read, W: Write> {
    reader: FrameReader<R>,
    writer: FrameWriter<W>,
    core: DestCore,
    page_requests: u64,
    /// The nonce to send before the first read ([`DestinationConfig::nonce`]).
    nonce_to_send: Option<u128>,
}

impl<R: Read, W: Write> fmt::Debug for Destination<R, W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Destination")
            .field("phase", &self.core.phase)
            .field("hello", &self.core.hello)
            .field("received", &self.received_pages())
            .finish()
    }
}

impl<R: Read, W: Write> Destination<R, W> {
    /// A destination reading the source's stream from `from` and answering on `to`.
    /// Nothing is read or written yet.
    pub fn new(from: R, to: W, config: DestinationConfig) -> Destination<R, W> {
        Destination::with_retained(from, to, config, None)
    }

    /// As [`Destination::new`], starting from the RAM a failed attempt left (`kept`) if
    /// the Hello resumes it ([`RetainedRam`]); a Hello that does not is refused and `kept`
    /// stays ([`Destination::into_retained`]).
    pub fn with_retained(
        from: R,
        to: W,
        config: DestinationConfig,
        kept: Option<RetainedRam>,
    ) -> Destination<R, W> {
        Destination {
            reader: FrameReader::with_max_frame_len(from, config.max_frame_len),
            writer: FrameWriter::new(to),
            nonce_to_send: config.nonce,
            core: DestCore::new(config, kept),
            page_requests: 0,
        }
    }

    /// After a failed attempt: the RAM to start the next attempt from, unless the guest ran
    /// here (postcopy: the RAM is the destination guest's now) or no Hello came.
    pub fn into_retained(self) -> Option<RetainedRam> {
        self.core.into_retained()
    }

    /// Whether this attempt started from RAM kept from a failed one (the Hello's migration
    /// id and geometry matched it).
    pub fn resumed_from_retained(&self) -> bool {
        self.core.resumed_from_retained()
    }

    /// Accepts sections of states other than RAM. Without a handler, a Hello declaring such
    /// a state is refused.
    pub fn set_section_handler(&mut self, handler: SectionHandler) {
        self.core.set_section_handler(handler);
    }

    /// Takes the state of that name ([`DestCore::add_state`]).
    pub fn add_state(&mut self, state: SharedDestState) {
        self.core.add_state(state);
    }

    /// The source's Hello, once read.
    pub fn hello(&self) -> Option<&Hello> {
        self.core.hello()
    }

    /// Pages received (and not discarded).
    pub fn received_pages(&self) -> u64 {
        self.core.received_pages()
    }

    /// Whether page `page` is here.
    pub fn has_page(&self, page: u64) -> bool {
        self.core.has_page(page)
    }

    /// Whether the guest runs here (postcopy after switchover, or the end).
    pub fn is_running(&self) -> bool {
        self.core.is_running()
    }

    /// Whether the migration completed.
    pub fn is_done(&self) -> bool {
        self.core.is_done()
    }

    /// The reader (for its counters or its channel).
    pub fn reader(&self) -> &FrameReader<R> {
        &self.reader
    }

    /// Tells `hook` each frame's payload length before the payload is read
    /// ([`FrameReader::set_header_hook`]): a channel that bounds a frame's time uses it.
    pub fn set_header_hook(&mut self, hook: HeaderHook) {
        self.reader.set_header_hook(hook);
    }

    /// Reads and applies one frame.
    ///
    /// # Errors
    /// [`MigrationError::PeerAborted`] when the source aborts,
    /// [`MigrationError::DestinationRefused`] when this destination refused to start,
    /// [`MigrationError::Frame`] or [`MigrationError::Io`] from the stream,
    /// [`MigrationError::Protocol`] for a frame the protocol does not allow here,
    /// [`MigrationError::InvalidInput`] for a Hello this destination cannot take. All but
    /// the first two are also sent to the source as an Abort. After any error the
    /// destination is failed and every later call returns [`ProtocolError::Failed`].
    pub fn step(&mut self) -> Result<DestEvent> {
        self.core.check_live()?;
        if let Some(nonce) = self.nonce_to_send.take() {
            if let Err(e) = self.writer.write_frame(&Frame::Nonce { nonce }) {
                self.fail(&e);
                return Err(e);
            }
        }
        let frame = match self.reader.read_frame() {
            Ok(f) => f,
            Err(e) => {
                self.fail(&e);
                return Err(e);
            }
        };
        let seq = self.reader.frames_read().saturating_sub(1);
        let version = self.reader.version();
        let writer = &mut self.writer;
        let res = self.core.apply(frame, seq, version, &mut |f| {
            writer.write_frame(f).map(drop)
        });
        if let Err(e) = &res {
            self.abort_source(e);
        }
        res
    }

    /// Fails the destination, and tells the source.
    fn fail(&mut self, e: &MigrationError) {
        self.core.fail(e);
        self.abort_source(e);
    }

    /// Sends the source an Abort for `e`, except for an Abort from the source itself and a
    /// refusal, which already sent Refused.
    fn abort_source(&mut self, e: &MigrationError) {
        match e {
            MigrationError::PeerAborted(_) | MigrationError::DestinationRefused(_) => {}
            other => self.writer.abort(&format!("destination: {other}")),
        }
    }

    /// Postcopy: page `page` for the running guest. If it is missing, sends a PageRequest
    /// and applies incoming frames until it arrives.
    ///
    /// # Errors
    /// [`MigrationError::WrongState`] ([`StateProblem::GuestNotRunning`]) if the guest is
    /// not running here; [`MigrationError::InvalidInput`] if `page` is out of range (or the
    /// guest has no RAM); the errors of [`Destination::step`], and
    /// [`ProtocolError::EndedWithoutPage`] if the stream ends without the page.
    pub fn fetch_page(&mut self, page: u64) -> Result<&mut [u8]> {
        if !self.is_running() {
            return Err(MigrationError::WrongState(StateProblem::GuestNotRunning));
        }
        let (pages, ram_state) = match (self.core.pages(), self.core.ram_state) {
            (pages, Some(id)) if self.core.ram.is_some() => (pages, id),
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
                if self.core.phase == Phase::Done {
                    return Err(ProtocolError::EndedWithoutPage { page }.into());
                }
                self.step()?;
            }
        }
        self.core
            .page_mut(page)
            .ok_or_else(|| MigrationError::internal("a checked page is not in RAM"))
    }

    /// Steps until the end and hands back the running guest.
    ///
    /// # Errors
    /// The errors of [`Destination::step`].
    pub fn run(mut self) -> Result<DestinationGuest> {
        while !self.core.is_done() {
            self.step()?;
        }
        Ok(self.core.into_guest(self.page_requests))
    }
}
