//! The virtual-clock simulation: a link that advances time by bytes / bandwidth, a guest
//! that dirties pages as virtual time passes (deterministic from a seed), a destination
//! model that applies what arrives, and the scenario sweep behind `dbm simulate` and the
//! downtime proof.
//!
//! # Downtime, precisely
//! From VM stop to the destination's `Started`: the bytes the loop put on the wire in
//! between (the Switchover frame, the states' final sections and End, framing included:
//! the simulated link counts exactly the bytes [`super::stream::FrameWriter`] would
//! write) at the link's
//! bandwidth, plus the fixed `switchover_cost`. In integers: a switchover violates the
//! limit iff `bytes_in_downtime > link_bw × (downtime_limit − switchover_cost)`, with
//! `link_bw` in bytes per ms. The link's own virtual clock rounds each send up to the next
//! nanosecond, so a measured bandwidth is never above the link's.
//!
//! A scenario may also have a disk bitmap on shared storage ([`DiskSim`], run by
//! [`SimDiskState`]): the guest's disk writes mark its regions as virtual time passes, its
//! flushes take virtual time at the disk's rate and barrier latency (the state measures them
//! as [`SharedDiskState`](super::SharedDiskState) measures a real disk), and its stop
//! writes the remainder inside the downtime. Then the bound is on time: a switchover
//! violates the limit iff `bytes_in_downtime / link_bw + disk stop time + switchover_cost >
//! downtime_limit`, computed exactly in nanoseconds.
//!
//! # The failure matrix
//! Faults at points of the protocol: [`World::fail_at_send`] (the n-th send),
//! [`World::link_fault`] ([`LinkFault`]: the link cut inside the downtime before End, right
//! after End, or right after Started), [`DestModel::refuse`] and
//! [`DestModel::crash_before_started`] (a destination that took over and died before it
//! answered). Real disk states run under the clock with [`SimMarked`]: the guest's disk
//! writes ([`SimDiskWriter`]) mark the store's bitmaps as virtual time passes and are logged,
//! so a test checks that no mark is lost (`tests/migration_matrix.rs`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::channel::{DestMessage, Inbound, Outbound};
use super::clock::Clock;
use super::dest::{DestCore, DestinationConfig};
use super::dest_state::SharedDestState;
use super::disk_stream::{StreamDiskDest, StreamDiskState};
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{control_wire_len, Control, Frame, StateId, SECTION_OVERHEAD, STREAM_VERSION};
use super::guest::{new_log, GuestRam, Vm, PAGE_SIZE};
use super::precopy::{
    run, Controller, Directive, Endpoints, IterationReport, Kind, LoopConfig, Outcome, Rule,
    StallAction, StallReport,
};
use super::ram::{RamState, SetupMode, RAM_ID};
use super::ram_codec::{self, RAM_STATE_NAME};
use super::state::{MigrationState, Pending};
use super::workload::Pattern;
use crate::flush::{DiskRate, FlushStats, StopWork};
use crate::rng::SplitMix64;
use crate::storage::MemStorage;
use crate::store::BitmapStore;
use crate::units::{threshold, Bytes, BytesPerMs, Millis};
use crate::DirtyBitmap;

/// Percent of [`Scenario::random`] scenarios with a large RAM.
pub const LARGE_RAM_PERCENT: u64 = 2;

/// The largest RAM of a [`Scenario::random`] scenario, in pages.
pub const LARGE_RAM_MAX_PAGES: u64 = 2048;

/// The simulated destination: the real destination's frame handling ([`DestCore`], as
/// [`super::dest::Destination`] runs it over a stream) fed straight from the simulated
/// link, with its answers queued for the loop's [`Inbound`]. It keeps its RAM across
/// attempts as a destination process does ([`DestCore::into_retained`]), so a retry fills
/// it incrementally. Unlike the real one it never blocks: in postcopy its guest touches
/// pages as virtual time passes and queues a request for each missing one.
///
/// It is built for one guest: a Hello for another geometry or RAM section id is refused
/// ([`ProtocolError::WrongGuest`]). Sections of other states are refused when they come
/// ([`ProtocolError::NoHandler`]). Errors are returned to the sender at once, where the
/// real destination would send an Abort; a refusal and the source's Abort travel as on a
/// real channel.
#[derive(Debug)]
pub struct DestModel {
    ram_id: StateId,
    pages: u64,
    page_size: usize,
    /// The destination of the current attempt (and the RAM kept from earlier ones).
    core: Option<DestCore>,
    /// Frames the current attempt's core received (the next frame's sequence number).
    frames: u64,
    requested: Vec<bool>,
    touch_rng: SplitMix64,
    /// Pages the destination guest touches per ms in postcopy.
    pub touch_rate: f64,
    touch_credit: f64,
    /// Refuse to start, with this reason (failure tests).
    pub refuse: Option<String>,
    /// Page requests sent.
    pub requests: u64,
    /// Destination-side states every attempt takes (a stream-mode disk bitmap).
    pub states: Vec<SharedDestState>,
    /// Die after the states' `before_start` ran and before Started is written (failure
    /// tests): the answer is never sent, no state hears `failed` (a killed process undoes
    /// nothing: a disk state's store stays as its activation left it, in the state, for the
    /// test to drop as the process's exit would), the kept RAM is gone, and every later
    /// frame fails as on a reset connection until [`restart`](Self::restart). It fires once.
    pub crash_before_started: bool,
    dead: bool,
    outbox: VecDeque<DestMessage>,
}

impl DestModel {
    /// An empty destination for `pages` pages of [`PAGE_SIZE`] bytes of RAM in section
    /// `ram_id`.
    pub fn new(ram_id: StateId, pages: u64, seed: u64) -> Self {
        DestModel {
            ram_id,
            pages,
            page_size: PAGE_SIZE,
            core: None,
            frames: 0,
            requested: vec![false; pages as usize],
            touch_rng: SplitMix64::new(seed ^ 0xDE57),
            touch_rate: 0.0,
            touch_credit: 0.0,
            refuse: None,
            requests: 0,
            states: Vec::new(),
            crash_before_started: false,
            dead: false,
            outbox: VecDeque::new(),
        }
    }

    /// Whether the destination died ([`crash_before_started`](Self::crash_before_started))
    /// and was not restarted.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// A new destination process after a crash: nothing kept, ready for a Hello.
    pub fn restart(&mut self) {
        self.dead = false;
        self.core = None;
        self.frames = 0;
        self.outbox.clear();
    }

    /// The connection closed under the destination (the link was cut): an attempt that
    /// has not started the guest fails, and its states hear `failed`, as a destination
    /// reading a closed stream does; one that started keeps running. Answers not yet read
    /// are lost with the connection.
    fn disconnect(&mut self) {
        self.outbox.clear();
        if let Some(core) = self.core.as_mut() {
            if !core.is_running() && core.check_live().is_ok() {
                core.fail(&MigrationError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "simulated link cut",
                )));
            }
        }
    }

    /// This destination, for pages of `page_size` bytes.
    #[must_use]
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        self.page_size = page_size;
        self
    }

    /// The destination's RAM (empty before the first Hello).
    pub fn ram(&self) -> &[u8] {
        self.core.as_ref().map_or(&[], DestCore::ram)
    }

    /// RAM sections the current attempt applied (0 before the first Hello).
    pub fn sections_applied(&self) -> u64 {
        self.core.as_ref().map_or(0, DestCore::sections_applied)
    }

    /// Whether every page arrived (and none was discarded since).
    pub fn complete(&self) -> bool {
        self.missing() == 0
    }

    /// Whether page `page` arrived (and was not discarded since).
    pub fn has_page(&self, page: u64) -> bool {
        self.core.as_ref().is_some_and(|c| c.has_page(page))
    }

    fn missing(&self) -> u64 {
        self.pages
            - self
                .core
                .as_ref()
                .filter(|c| c.pages() == self.pages)
                .map_or(0, DestCore::received_pages)
    }

    /// Whether the destination guest runs and pulls what it lacks (postcopy).
    fn postcopy_running(&self) -> bool {
        self.core
            .as_ref()
            .is_some_and(|c| c.is_running() && !c.is_done())
    }

    /// Feeds `frame` to the current attempt's core; its answers go to the outbox.
    fn apply(&mut self, frame: Frame) -> Result<()> {
        if self.dead {
            return Err(MigrationError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated destination died",
            )));
        }
        let Some(core) = self.core.as_mut() else {
            // Nothing before the first Hello: as a destination reading a stream that does
            // not start with one.
            return Err(ProtocolError::UnexpectedFrame {
                kind: frame.kind(),
                seq: 0,
                phase: "AwaitHello",
            }
            .into());
        };
        let seq = self.frames;
        self.frames += 1;
        let outbox = &mut self.outbox;
        let res = core.apply(frame, seq, Some(STREAM_VERSION), &mut |f| {
            match f {
                Frame::Started => outbox.push_back(DestMessage::Started),
                Frame::Refused { reason } => {
                    outbox.push_back(DestMessage::Refused(reason.clone()));
                }
                Frame::Report { state, payload } => {
                    outbox.push_back(DestMessage::Report {
                        state: *state,
                        payload: payload.clone(),
                    });
                }
                _ => {}
            }
            Ok(())
        });
        if self.crash_before_started && self.outbox.back() == Some(&DestMessage::Started) {
            // The states took over (`before_start` ran), then the process died before its
            // answer went out: no Started, no `failed`, nothing kept. The frame that
            // started it was delivered: its sender saw no error.
            self.outbox.pop_back();
            self.crash_before_started = false;
            self.dead = true;
            self.core = None;
            return Ok(());
        }
        match res {
            Ok(_) => Ok(()),
            // The refusal went to the outbox, as Refused goes on the return path.
            Err(MigrationError::DestinationRefused(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Applies a control frame.
    ///
    /// # Errors
    /// [`ProtocolError::WrongGuest`] for a Hello that does not match this destination, and
    /// the errors of [`DestCore::apply`] (a postcopy End with pages missing, say).
    pub fn control(&mut self, msg: &Control) -> Result<()> {
        match msg {
            Control::Hello(h) => {
                let ram_state = h
                    .states
                    .iter()
                    .find(|s| s.name == RAM_STATE_NAME)
                    .map(|s| s.id);
                if h.page_size as usize != self.page_size
                    || h.ram_pages != self.pages
                    || ram_state != Some(self.ram_id)
                {
                    return Err(ProtocolError::WrongGuest {
                        pages: h.ram_pages,
                        page_size: h.page_size,
                        ram_state,
                        expected_pages: self.pages,
                        expected_page_size: self.page_size as u32,
                        expected_state: self.ram_id,
                    }
                    .into());
                }
                // A new attempt: a new destination, from the RAM the last one kept. Kept
                // pages serve only a Hello of the same guest (`DestCore::new`); another
                // guest's Hello is refused and they stay. What the last attempt said and
                // its source never read went with its connection (over TCP each attempt
                // has its own): a report of its log would fail this one.
                self.outbox.clear();
                let kept = self.core.take().and_then(DestCore::into_retained);
                let config = DestinationConfig {
                    refuse_start: self.refuse.clone(),
                    max_ram_bytes: Bytes(u64::MAX),
                    ..DestinationConfig::default()
                };
                let mut core = DestCore::new(config, kept);
                core.set_section_handler(Box::new(|_, name, _| {
                    Err(ProtocolError::NoHandler(name.to_owned()).into())
                }));
                for st in &self.states {
                    core.add_state(Arc::clone(st));
                }
                self.core = Some(core);
                self.frames = 0;
                self.requested.fill(false);
                self.apply(Frame::Hello(h.clone()))
            }
            Control::Abort(_) => {
                // The source gives up: the destination fails (and keeps its RAM for a
                // retry); the sender has nothing to hear about it.
                let _ = self.apply(msg.to_frame());
                Ok(())
            }
            _ => self.apply(msg.to_frame()),
        }
    }

    /// Applies one payload of section `state`.
    ///
    /// # Errors
    /// The errors of [`DestCore::apply`]: [`MigrationError::Frame`] for a payload that does
    /// not decode, [`MigrationError::Protocol`] for a section of a state that is not RAM or
    /// pages outside its RAM.
    pub fn receive(&mut self, state: StateId, payload: &[u8]) -> Result<()> {
        self.apply(Frame::Section {
            state,
            payload: payload.to_vec(),
        })
    }

    /// Lets the destination guest run for `ms` (postcopy only): it touches pages and
    /// requests each missing one once.
    fn run_for(&mut self, ms: f64) {
        if !self.postcopy_running() || self.touch_rate <= 0.0 {
            return;
        }
        self.touch_credit += ms * self.touch_rate;
        let n = (self.touch_credit as u64).min(4 * self.pages);
        self.touch_credit -= self.touch_credit.floor();
        for _ in 0..n {
            let p = self.touch_rng.below(self.pages);
            if !self.has_page(p) && !self.requested[p as usize] {
                self.requested[p as usize] = true;
                self.requests += 1;
                self.outbox.push_back(DestMessage::PageRequest {
                    state: self.ram_id,
                    payload: ram_codec::encode_page_request(p, 1),
                });
            }
        }
    }
}

/// Wire bytes of a section of `payload_len` bytes: what [`super::stream::FrameWriter`]
/// writes for it after the stream's first frame.
fn section_wire(payload_len: usize) -> Bytes {
    SECTION_OVERHEAD + Bytes(payload_len as u64)
}

/// Wire bytes of a control frame, as [`section_wire`].
fn control_wire(msg: &Control) -> Result<Bytes> {
    control_wire_len(msg).ok_or_else(|| {
        MigrationError::InvalidInput(format!("control frame {msg:?} does not encode"))
    })
}

/// An in-process link straight into a [`DestModel`], with no delay: for real-time runs
/// of the loop (real vCPU threads, [`super::RealClock`]) without a socket.
#[derive(Debug)]
pub struct Loopback {
    /// The destination.
    pub dest: DestModel,
    bytes: Bytes,
}

impl Loopback {
    /// A link to `dest`.
    pub fn new(dest: DestModel) -> Self {
        Loopback {
            dest,
            bytes: Bytes::ZERO,
        }
    }
}

impl Outbound for Loopback {
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes> {
        let wire = section_wire(payload.len());
        self.bytes += wire;
        self.dest.receive(state, payload)?;
        Ok(wire)
    }

    fn control(&mut self, msg: &Control) -> Result<Bytes> {
        let wire = control_wire(msg)?;
        self.bytes += wire;
        self.dest.control(msg)?;
        Ok(wire)
    }

    // No rate limit of its own (the loop's applies while the VM runs), and the stream's
    // framing: the trait's defaults for `lift_rate_limit`, `section_overhead` and
    // `control_cost`.

    fn bytes_sent(&self) -> Bytes {
        self.bytes
    }
}

impl Inbound for Loopback {
    fn try_recv(&mut self) -> Result<Option<DestMessage>> {
        Ok(self.dest.outbox.pop_front())
    }

    fn recv(&mut self) -> Result<DestMessage> {
        self.try_recv()?
            .ok_or_else(|| MigrationError::PeerAborted("destination has nothing to say".into()))
    }
}

/// A guest that dirties pages as virtual time passes.
#[derive(Debug)]
struct SimGuest {
    ram: Arc<GuestRam>,
    log: Arc<DirtyBitmap>,
    /// Page writes per ms at full speed.
    rate: f64,
    pattern: Pattern,
    rng: SplitMix64,
    credit: f64,
    writes: u64,
    running: bool,
    throttle: u8,
}

impl SimGuest {
    fn run_for(&mut self, ms: f64) {
        if !self.running || self.rate <= 0.0 {
            return;
        }
        self.credit += ms * self.rate * f64::from(100 - self.throttle.min(99)) / 100.0;
        let due = self.credit.floor();
        self.credit -= due;
        // Past a few writes per page, more writes change nothing the migration can see.
        let n = (due as u64).min(4 * self.ram.pages());
        for _ in 0..n {
            let page = self
                .pattern
                .pick(&mut self.rng, self.ram.pages(), self.writes);
            let word = self.rng.below((PAGE_SIZE / 8) as u64) as usize;
            let value = self.writes.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            self.ram
                .write_and_mark(&self.log, page, |r| r.write_word(page, word, value));
            self.writes += 1;
        }
    }
}

/// The simulated world: virtual time, the link, the guest and the destination.
#[derive(Debug)]
pub struct World {
    now_ns: u64,
    /// Link bandwidth in whole bytes per ms (integer, so that the downtime arithmetic is
    /// exact).
    link_bw: u64,
    bytes: Bytes,
    sends: u64,
    /// Fail the send with this index (0-based) with a connection reset (failure tests).
    pub fail_at_send: Option<u64>,
    /// Cut the link at this point of the protocol (failure tests); it fires once.
    pub link_fault: Option<LinkFault>,
    /// The link is cut: every send and receive fails until the next Hello, which opens a
    /// new connection.
    cut: bool,
    guest: SimGuest,
    /// The destination.
    pub dest: DestModel,
}

impl World {
    fn advance_to(&mut self, t_ns: u64) {
        if t_ns <= self.now_ns {
            return;
        }
        let ms = (t_ns - self.now_ns) as f64 / 1e6;
        self.now_ns = t_ns;
        self.guest.run_for(ms);
        self.dest.run_for(ms);
    }
}

/// A handle on the shared [`World`]; the clock, the link and the VM are all views of it.
#[derive(Debug, Clone)]
pub struct Sim(Rc<RefCell<World>>);

impl Sim {
    /// A world with guest `ram` marking `log` at `dirty_rate` page writes per ms in
    /// `pattern`, a link of `link_bw`, and a destination. The link runs at whole bytes
    /// per ms: `link_bw` rounded down, at least 1 ([`Sim::link_bw`] says what it is).
    pub fn new(
        ram: Arc<GuestRam>,
        log: Arc<DirtyBitmap>,
        dirty_rate: f64,
        pattern: Pattern,
        link_bw: BytesPerMs,
        seed: u64,
    ) -> Sim {
        let pages = ram.pages();
        Sim(Rc::new(RefCell::new(World {
            now_ns: 0,
            link_bw: (link_bw.get().floor() as u64).max(1),
            bytes: Bytes::ZERO,
            sends: 0,
            fail_at_send: None,
            link_fault: None,
            cut: false,
            guest: SimGuest {
                ram,
                log,
                rate: dirty_rate,
                pattern,
                rng: SplitMix64::new(seed),
                credit: 0.0,
                writes: 0,
                running: true,
                throttle: 0,
            },
            dest: DestModel::new(RAM_ID, pages, seed),
        })))
    }

    /// Mutable access to the world (between runs).
    pub fn world(&self) -> std::cell::RefMut<'_, World> {
        self.0.borrow_mut()
    }

    /// Sends (sections and control frames) the link carried or failed so far: the index
    /// the next one gets ([`World::fail_at_send`]).
    pub fn sends(&self) -> u64 {
        self.0.borrow().sends
    }

    /// Guest page writes so far.
    pub fn guest_writes(&self) -> u64 {
        self.0.borrow().guest.writes
    }

    /// What the link carried.
    pub fn bytes_sent_total(&self) -> Bytes {
        self.0.borrow().bytes
    }

    /// The link's bandwidth (whole bytes per ms).
    pub fn link_bw(&self) -> BytesPerMs {
        BytesPerMs::from_bytes_per_ms(self.0.borrow().link_bw as f64)
    }

    /// Sets the guest's page writes per ms from now on (0: idle).
    pub fn set_dirty_rate(&self, pages_per_ms: f64) {
        let mut w = self.0.borrow_mut();
        w.guest.rate = pages_per_ms;
        w.guest.credit = 0.0;
    }

    /// Whether the simulated guest runs (not stopped).
    pub fn guest_running(&self) -> bool {
        self.0.borrow().guest.running
    }

    /// The vCPU throttle (percent) the loop last set: 0 is full speed.
    pub fn guest_throttle(&self) -> u8 {
        self.0.borrow().guest.throttle
    }

    /// Virtual time now.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.0.borrow().now_ns)
    }
}

impl Clock for Sim {
    fn now(&self) -> Duration {
        Sim::now(self)
    }

    fn sleep_until(&mut self, deadline: Duration) {
        let t = u64::try_from(deadline.as_nanos()).unwrap_or(u64::MAX);
        self.0.borrow_mut().advance_to(t);
    }
}

/// A cut of the simulated link at a point of the protocol ([`World::link_fault`]), for the
/// failure matrix. Each leaves the link cut (every later send and receive of the attempt
/// fails as on a reset connection) until the next attempt's Hello, a new connection; the
/// destination sees the connection close ([`DestModel`]: an attempt that has not started
/// fails and its states hear `failed`; one that started runs on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkFault {
    /// Inside the downtime, before End: the states' stop work is done, End is never
    /// delivered. The destination cannot have started; the source hears the cut and
    /// takes its guest back.
    BeforeEnd,
    /// Right after End reached the destination: it starts the guest, and its Started is
    /// lost with the connection. The source cannot tell
    /// ([`MigrationError::OutcomeUnknown`]).
    AfterEnd,
    /// Right after the source read Started (postcopy: the destination runs the guest and
    /// pulls what it lacks): the source's next send or receive fails
    /// ([`MigrationError::AfterStart`]).
    AfterStarted,
}

fn link_cut() -> MigrationError {
    MigrationError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        "simulated link cut",
    ))
}

impl World {
    /// Cuts the link now; the destination sees its connection close.
    fn cut_link(&mut self) {
        self.cut = true;
        self.dest.disconnect();
    }

    /// Puts `wire` bytes on the link (advancing time), or fails the send when told to.
    fn transmit(&mut self, wire: Bytes) -> Result<()> {
        if self.cut {
            return Err(link_cut());
        }
        if self.fail_at_send == Some(self.sends) {
            self.sends += 1;
            return Err(MigrationError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated link cut",
            )));
        }
        self.sends += 1;
        // Rounded up: the simulated link is never faster than `link_bw`.
        let ns = (u128::from(wire.get()) * 1_000_000).div_ceil(u128::from(self.link_bw));
        let t = self
            .now_ns
            .saturating_add(u64::try_from(ns).unwrap_or(u64::MAX));
        self.advance_to(t);
        self.bytes += wire;
        Ok(())
    }
}

impl Outbound for Sim {
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes> {
        let mut w = self.0.borrow_mut();
        let wire = section_wire(payload.len());
        w.transmit(wire)?;
        w.dest.receive(state, payload)?;
        Ok(wire)
    }

    fn control(&mut self, msg: &Control) -> Result<Bytes> {
        let mut w = self.0.borrow_mut();
        let wire = control_wire(msg)?;
        let end = matches!(msg, Control::End);
        if matches!(msg, Control::Hello(_)) {
            // A new attempt connects anew.
            w.cut = false;
        }
        if end && !w.cut && w.link_fault == Some(LinkFault::BeforeEnd) {
            w.link_fault = None;
            w.cut_link();
            return Err(link_cut());
        }
        w.transmit(wire)?;
        w.dest.control(msg)?;
        if end && w.link_fault == Some(LinkFault::AfterEnd) {
            // Delivered; the answer is lost with the connection.
            w.link_fault = None;
            w.cut_link();
        }
        Ok(wire)
    }

    // No rate limit of its own (the loop's applies while the VM runs), and the stream's
    // framing: the trait's defaults for `lift_rate_limit`, `section_overhead` and
    // `control_cost`.

    fn bytes_sent(&self) -> Bytes {
        self.0.borrow().bytes
    }
}

impl Inbound for Sim {
    fn try_recv(&mut self) -> Result<Option<DestMessage>> {
        let mut w = self.0.borrow_mut();
        if w.cut {
            return Err(link_cut());
        }
        let msg = w.dest.outbox.pop_front();
        if msg == Some(DestMessage::Started) && w.link_fault == Some(LinkFault::AfterStarted) {
            w.link_fault = None;
            w.cut_link();
        }
        Ok(msg)
    }

    fn recv(&mut self) -> Result<DestMessage> {
        if self.0.borrow().dest.is_dead() {
            return Err(MigrationError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "simulated destination died",
            )));
        }
        self.try_recv()?.ok_or_else(|| {
            MigrationError::PeerAborted("simulated destination has nothing to say".into())
        })
    }
}

impl Vm for Sim {
    fn stop(&mut self) -> Result<()> {
        self.0.borrow_mut().guest.running = false;
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        self.0.borrow_mut().guest.running = true;
        Ok(())
    }

    fn set_throttle(&mut self, percent: u8) {
        self.0.borrow_mut().guest.throttle = percent.min(99);
    }

    fn run_until(&mut self, now: Duration) {
        self.sleep_until(now);
    }
}

/// One simulated migration's parameters. Everything derives from `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Seed of the scenario (its guest, its destination).
    pub seed: u64,
    /// Guest RAM in pages.
    pub pages: u64,
    /// Pages per batch.
    pub batch_pages: usize,
    /// Link bandwidth (whole bytes per ms: the simulated link rounds down).
    pub link_bw: BytesPerMs,
    /// Rate limit (`None`: unlimited).
    pub max_bandwidth: Option<BytesPerMs>,
    /// `avail_switchover_bandwidth` (never above the link's).
    pub switchover_bw: Option<BytesPerMs>,
    /// Downtime limit.
    pub downtime_limit: Millis,
    /// Fixed switchover cost.
    pub switchover_cost: Millis,
    /// Guest page writes per ms.
    pub dirty_rate: f64,
    /// Where the guest writes.
    pub pattern: Pattern,
    /// Postcopy: `None` off; `Some(k)` requested after k exact queries (0: from the
    /// start), and on a stall.
    pub postcopy: Option<u32>,
    /// Comparisons.
    pub rule: Rule,
    /// Cancel the attempt after this many exact queries (the observation run of an
    /// equality scenario).
    pub cancel_after_exact: Option<u64>,
    /// A disk bitmap on shared storage, if any.
    pub disk: Option<DiskSim>,
    /// A disk bitmap streamed to the destination's own image, if any.
    pub stream: Option<StreamSim>,
}

/// A simulated stream-mode disk bitmap: a real [`DirtyBitmap`] the guest's disk writes
/// mark (and now and then clear a range of, as a backup tool does), streamed by a real
/// [`StreamDiskState`] to a real [`StreamDiskDest`] over an in-memory image.
#[derive(Debug, Clone, Copy)]
pub struct StreamSim {
    /// Change-map regions of 512 bytes (each covers 256 MiB of disk at 64 KiB).
    pub regions: u64,
    /// Disk writes per guest RAM page write.
    pub writes_per_page_write: f64,
}

impl StreamSim {
    /// The granularity.
    pub const GRANULARITY: u64 = 64 << 10;
    /// The region size.
    pub const REGION: u64 = 512;

    /// The stream of scenario `seed`, from a stream of its own: a third of the scenarios.
    pub fn random(seed: u64) -> Option<StreamSim> {
        let mut r = SplitMix64::new(seed ^ 0x0057_AEA4);
        (r.below(3) == 0).then(|| StreamSim {
            regions: 1 + r.below(64),
            writes_per_page_write: r.unit() * 4.0,
        })
    }

    /// The disk size.
    pub fn disk_size(&self) -> u64 {
        self.regions * Self::REGION * 8 * Self::GRANULARITY
    }
}

/// A [`StreamDiskState`] whose bitmap the simulated guest's disk writes mark as virtual
/// time passes (lazily, before each call: marks happen only while the guest runs).
#[derive(Debug)]
pub struct SimStreamState {
    sim: Sim,
    stream: StreamDiskState,
    bitmap: Arc<DirtyBitmap>,
    params: StreamSim,
    rng: SplitMix64,
    credit: f64,
    guest_writes: u64,
}

impl SimStreamState {
    /// The state for `params`, marked by the guest of `sim`.
    ///
    /// # Errors
    /// A bitmap that cannot be built.
    pub fn new(sim: Sim, params: StreamSim, seed: u64) -> Result<SimStreamState> {
        let bitmap = Arc::new(DirtyBitmap::with_region_size(
            params.disk_size(),
            StreamSim::GRANULARITY,
            StreamSim::REGION,
        )?);
        let stream = StreamDiskState::new(
            STREAM_ID,
            "disk-stream",
            vec![("b".to_string(), Arc::clone(&bitmap))],
        )?;
        let guest_writes = sim.guest_writes();
        Ok(SimStreamState {
            sim,
            stream,
            bitmap,
            params,
            rng: SplitMix64::new(seed ^ 0x57),
            credit: 0.0,
            guest_writes,
        })
    }

    /// This state with its regions deferred past a postcopy switch
    /// ([`StreamDiskState::defer_to_postcopy`]).
    #[must_use]
    pub fn defer_to_postcopy(mut self, on: bool) -> Self {
        self.stream = self.stream.defer_to_postcopy(on);
        self
    }

    /// The source's bitmap.
    pub fn bitmap(&self) -> &Arc<DirtyBitmap> {
        &self.bitmap
    }

    /// The streaming state (its counters).
    pub fn inner(&self) -> &StreamDiskState {
        &self.stream
    }

    fn accrue(&mut self) {
        let w = self.sim.guest_writes();
        let new = w.saturating_sub(self.guest_writes);
        self.guest_writes = w;
        self.credit += new as f64 * self.params.writes_per_page_write;
        let disk = self.params.disk_size();
        while self.credit >= 1.0 {
            self.credit -= 1.0;
            let off = self.rng.below(disk / 4096) * 4096;
            if self.rng.below(200) == 0 {
                // A backup took a range: its bits go, and the stream must replace them.
                self.bitmap.clear(off, (64 << 20).min(disk - off));
            } else {
                self.bitmap.mark_dirty(off, 4096);
            }
        }
    }
}

/// Whether every dirty granule of `b` is dirty in `a`.
fn covers(a: &DirtyBitmap, b: &DirtyBitmap) -> bool {
    b.dirty_extents().all(|(off, len)| {
        a.next_clean(off)
            .is_none_or(|c| c >= off.saturating_add(len))
    })
}

/// The stream-mode disk state's section id.
pub const STREAM_ID: StateId = 3;

impl MigrationState for SimStreamState {
    fn id(&self) -> StateId {
        self.stream.id()
    }
    fn name(&self) -> &str {
        self.stream.name()
    }
    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.accrue();
        self.stream.setup(out)
    }
    fn pending(&mut self, exact: bool) -> Pending {
        if exact {
            self.accrue();
        }
        self.stream.pending(exact)
    }
    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes> {
        self.accrue();
        self.stream.iterate(out, budget)
    }
    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.accrue();
        self.stream.complete(out)
    }
    fn postcopy_start(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.accrue();
        self.stream.postcopy_start(out)
    }
    fn awaits_report(&self) -> bool {
        self.stream.awaits_report()
    }
    fn report(&mut self, payload: &[u8]) -> Result<()> {
        self.stream.report(payload)
    }
    fn channel_failed(&mut self) {
        self.stream.channel_failed();
    }
    fn cancel(&mut self) {
        self.stream.cancel();
    }
    fn resume_source(&mut self) {
        self.stream.resume_source();
    }
}

/// The simulated guest's disk writes, made as virtual time passes: a number of writes per
/// guest RAM page write, each of 4 KiB at a random offset (deterministic from the seed),
/// marked through a [`Tracker`](crate::Tracker) (so on every bitmap of a store) and then
/// logged. The log is what a test checks the bitmaps against: every mark in it was made.
///
/// Like [`SimStreamState`]'s, the marks are made lazily, by [`accrue`](Self::accrue), for
/// the guest's writes since the last call; the guest writes only while it runs, so nothing
/// is marked for a stopped guest, and a hook that accrues first (as [`SimMarked`]'s do)
/// sees every write made before the VM stopped: the `Vm` contract's drained disk I/O.
#[derive(Debug)]
pub struct SimDiskWriter {
    sim: Sim,
    tracker: crate::Tracker,
    disk_size: u64,
    writes_per_page_write: f64,
    rng: SplitMix64,
    credit: f64,
    guest_writes: u64,
    log: Vec<u64>,
}

impl SimDiskWriter {
    /// Disk writes of the guest of `sim` to a disk of `disk_size` bytes (at least 4 KiB),
    /// `writes_per_page_write` per guest page write, marked through `tracker`.
    pub fn new(
        sim: Sim,
        tracker: crate::Tracker,
        disk_size: u64,
        writes_per_page_write: f64,
        seed: u64,
    ) -> SimDiskWriter {
        let guest_writes = sim.guest_writes();
        SimDiskWriter {
            sim,
            tracker,
            disk_size,
            writes_per_page_write,
            rng: SplitMix64::new(seed ^ 0xD15C_3A7E),
            credit: 0.0,
            guest_writes,
            log: Vec::new(),
        }
    }

    /// Marks (then logs) the disk writes of the guest's page writes since the last call.
    pub fn accrue(&mut self) {
        let w = self.sim.guest_writes();
        let new = w.saturating_sub(self.guest_writes);
        self.guest_writes = w;
        self.credit += new as f64 * self.writes_per_page_write;
        let blocks = (self.disk_size / 4096).max(1);
        while self.credit >= 1.0 {
            self.credit -= 1.0;
            let off = self.rng.below(blocks) * 4096;
            self.tracker.mark(off, 4096);
            self.log.push(off);
        }
    }

    /// The offset of every write marked so far, in order.
    pub fn marks(&self) -> &[u64] {
        &self.log
    }
}

/// A migration state whose disk bitmaps the simulated guest writes as virtual time passes:
/// each hook of `state` (a [`SharedDiskState`](super::SharedDiskState) or a
/// [`StreamDiskState`] over the bitmaps `writer` marks) runs after
/// [`SimDiskWriter::accrue`], so the state sees the marks as it would see a guest's
/// concurrent writes at that instant.
#[derive(Debug)]
pub struct SimMarked<M> {
    /// The state.
    pub state: M,
    /// The guest's disk writes.
    pub writer: SimDiskWriter,
}

// Every hook is forwarded, the defaulted ones too: a wrapper that let one fall back to the
// default would change what the loop does with the state (a stream state that awaits the
// destination's report would not be waited for).
impl<M: MigrationState> MigrationState for SimMarked<M> {
    fn id(&self) -> StateId {
        self.state.id()
    }
    fn name(&self) -> &str {
        self.state.name()
    }
    fn ram_geometry(&self) -> Option<(u32, u64)> {
        self.state.ram_geometry()
    }
    fn migration_id(&self) -> Option<u64> {
        self.state.migration_id()
    }
    fn awaits_report(&self) -> bool {
        self.state.awaits_report()
    }
    fn report(&mut self, payload: &[u8]) -> Result<()> {
        self.writer.accrue();
        self.state.report(payload)
    }
    fn notice(&mut self, payload: &[u8]) -> Result<()> {
        self.writer.accrue();
        self.state.notice(payload)
    }
    fn setup(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.writer.accrue();
        self.state.setup(out)
    }
    fn pending(&mut self, exact: bool) -> Pending {
        self.writer.accrue();
        self.state.pending(exact)
    }
    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> Result<Bytes> {
        self.writer.accrue();
        self.state.iterate(out, budget)
    }
    fn flush(&mut self) -> Result<Bytes> {
        self.writer.accrue();
        self.state.flush()
    }
    fn flush_before_exact(&mut self) -> Result<Bytes> {
        self.writer.accrue();
        self.state.flush_before_exact()
    }
    fn after_flush(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.writer.accrue();
        self.state.after_flush(out)
    }
    fn stopped(&mut self) {
        self.state.stopped();
    }
    fn complete(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.writer.accrue();
        self.state.complete(out)
    }
    fn disk_stop(&self) -> FlushStats {
        self.state.disk_stop()
    }
    fn postcopy_start(&mut self, out: &mut dyn Outbound) -> Result<Bytes> {
        self.writer.accrue();
        self.state.postcopy_start(out)
    }
    fn serve(&mut self, out: &mut dyn Outbound, request: &[u8]) -> Result<Bytes> {
        self.writer.accrue();
        self.state.serve(out, request)
    }
    fn channel_failed(&mut self) {
        self.writer.accrue();
        self.state.channel_failed();
    }
    fn cancel(&mut self) {
        self.writer.accrue();
        self.state.cancel();
    }
    fn resume_source(&mut self) {
        self.writer.accrue();
        self.state.resume_source();
    }
    fn reactivate(&mut self) -> Result<()> {
        self.writer.accrue();
        self.state.reactivate()
    }
}

/// A simulated disk bitmap: its size in regions, how the guest's writes mark it, and the
/// disk under it.
#[derive(Debug, Clone, Copy)]
pub struct DiskSim {
    /// Change-map regions (of [`DiskSim::REGION`] bytes each).
    pub regions: u64,
    /// Disk writes per guest RAM page write, each marking one random region.
    pub writes_per_page_write: f64,
    /// The disk's write rate, bytes per ms.
    pub write_rate: u64,
    /// One barrier, in µs.
    pub barrier_us: u64,
}

impl DiskSim {
    /// The region size.
    pub const REGION: u64 = 4096;

    /// The disk of scenario `seed` (limit and cost in ms), drawn from a stream of its own so
    /// that the other parameters of a seed do not move: half the scenarios have none. Of
    /// those with one, one in ten is an edge whose stop takes exactly what the limit leaves
    /// after the fixed cost (a guest that never writes the disk, a barrier that long: the
    /// network gets a threshold of 0), and one in ten a disk whose barrier alone exceeds
    /// it; the rest spread rates, latencies and write loads.
    pub fn random(seed: u64, limit: u64, cost: u64) -> Option<DiskSim> {
        let mut r = SplitMix64::new(seed ^ 0xD15C_5EED);
        if r.coin() {
            return None;
        }
        let left_us = limit.saturating_sub(cost) * 1000;
        let regions = 16 + r.below(4081);
        match r.below(10) {
            0 => Some(DiskSim {
                regions,
                writes_per_page_write: 0.0,
                write_rate: 1 << 20,
                barrier_us: left_us,
            }),
            1 => Some(DiskSim {
                regions,
                writes_per_page_write: r.unit() * 2.0,
                write_rate: 1 << 20,
                barrier_us: left_us + 1 + r.below(1000),
            }),
            _ => {
                let (lo, hi) = (200f64.ln(), 2e6f64.ln());
                Some(DiskSim {
                    regions,
                    writes_per_page_write: r.unit() * 4.0,
                    write_rate: (lo + r.unit() * (hi - lo)).exp() as u64,
                    barrier_us: 20 + r.below(left_us.clamp(1, 20_000)),
                })
            }
        }
    }

    /// The virtual time `work` takes on this disk, in ns, rounded up.
    pub fn time_ns(&self, work: StopWork) -> u64 {
        let data =
            (u128::from(work.bytes.get()) * 1_000_000).div_ceil(u128::from(self.write_rate.max(1)));
        let barriers = u128::from(work.barriers) * u128::from(self.barrier_us) * 1000;
        u64::try_from(data + barriers).unwrap_or(u64::MAX)
    }
}

/// A [`DiskSim`] as a migration state under the virtual clock: the simulated counterpart of
/// [`SharedDiskState`](super::SharedDiskState), with the same figures (a [`DiskRate`]
/// measured from its flushes, [`StopWork`] of the remaining regions, the directory and the
/// barriers) and the same hooks.
#[derive(Debug)]
pub struct SimDiskState {
    sim: Sim,
    disk: DiskSim,
    changed: Vec<bool>,
    count: u64,
    /// Regions changed as of the last exact query (the estimate's stale view).
    seen: u64,
    rng: SplitMix64,
    credit: f64,
    guest_writes: u64,
    rate: DiskRate,
    stop: FlushStats,
    /// Nanoseconds the stop took.
    pub stop_ns: u64,
}

/// The simulated disk's section id.
pub const DISK_ID: StateId = 2;

impl SimDiskState {
    /// The state of `disk`, marked by the guest of `sim`.
    pub fn new(sim: Sim, disk: DiskSim, seed: u64) -> SimDiskState {
        let guest_writes = sim.guest_writes();
        SimDiskState {
            sim,
            disk,
            changed: vec![false; usize::try_from(disk.regions).unwrap_or(0)],
            count: 0,
            seen: 0,
            rng: SplitMix64::new(seed ^ 0xD15C),
            credit: 0.0,
            guest_writes,
            rate: DiskRate::new(),
            stop: FlushStats::default(),
            stop_ns: 0,
        }
    }

    /// Marks the regions the guest's disk writes since the last call touched.
    fn accrue(&mut self) {
        let w = self.sim.guest_writes();
        let new = w.saturating_sub(self.guest_writes);
        self.guest_writes = w;
        self.credit += new as f64 * self.disk.writes_per_page_write;
        while self.credit >= 1.0 {
            self.credit -= 1.0;
            let r = self.rng.below(self.disk.regions.max(1)) as usize;
            if let Some(c) = self.changed.get_mut(r) {
                if !*c {
                    *c = true;
                    self.count += 1;
                }
            }
        }
    }

    fn work(&self, regions: u64) -> StopWork {
        StopWork {
            bytes: Bytes(regions * DiskSim::REGION),
            barriers: u64::from(regions > 0) + 1,
        }
    }

    /// Writes every changed region (and a barrier), taking the virtual time it costs;
    /// returns what it did.
    fn write_out(&mut self, commit: bool) -> FlushStats {
        let regions = self.count;
        let mut work = StopWork {
            bytes: Bytes(regions * DiskSim::REGION),
            barriers: u64::from(regions > 0),
        };
        if commit {
            work = self.work(regions);
        }
        let ns = self.disk.time_ns(work);
        let sync_ns = work.barriers * self.disk.barrier_us * 1000;
        let until = self.sim.now() + Duration::from_nanos(ns);
        self.sim.clone().sleep_until(until);
        self.changed.iter_mut().for_each(|c| *c = false);
        self.count = 0;
        FlushStats {
            regions,
            bytes_written: work.bytes.get(),
            clusters_allocated: 0,
            syncs: work.barriers,
            sync_time: Duration::from_nanos(sync_ns),
            duration: Duration::from_nanos(ns),
        }
    }
}

impl MigrationState for SimDiskState {
    fn id(&self) -> StateId {
        DISK_ID
    }
    fn name(&self) -> &str {
        "disk-bitmaps"
    }
    fn setup(&mut self, _: &mut dyn Outbound) -> Result<Bytes> {
        self.accrue();
        let mut f = self.write_out(false);
        if f.syncs == 0 {
            // Nothing to write: time one barrier, as SharedDiskState does.
            let lat = Duration::from_micros(self.disk.barrier_us);
            let until = self.sim.now() + lat;
            self.sim.clone().sleep_until(until);
            f.syncs = 1;
            f.sync_time = lat;
            f.duration = lat;
        }
        self.rate.observe(&f);
        Ok(Bytes(0))
    }
    fn pending(&mut self, exact: bool) -> Pending {
        if exact {
            self.accrue();
            self.seen = self.count;
        }
        Pending {
            disk_time: self.rate.time(self.work(self.seen)),
            ..Pending::default()
        }
    }
    fn iterate(&mut self, _: &mut dyn Outbound, _: Bytes) -> Result<Bytes> {
        Ok(Bytes(0))
    }
    fn flush(&mut self) -> Result<Bytes> {
        self.accrue();
        if self.count == 0 {
            return Ok(Bytes(0));
        }
        let f = self.write_out(false);
        self.rate.observe(&f);
        self.seen = self.count;
        Ok(Bytes(f.bytes_written))
    }
    fn complete(&mut self, _: &mut dyn Outbound) -> Result<Bytes> {
        self.accrue();
        let t0 = self.sim.now();
        self.stop = self.write_out(true);
        self.stop_ns =
            u64::try_from(self.sim.now().saturating_sub(t0).as_nanos()).unwrap_or(u64::MAX);
        Ok(Bytes(0))
    }
    fn disk_stop(&self) -> FlushStats {
        self.stop
    }
    fn cancel(&mut self) {}
    fn resume_source(&mut self) {}
}

/// What one scenario did.
#[derive(Debug, Clone)]
pub struct ScenarioResult {
    /// The scenario.
    pub scenario: Scenario,
    /// The loop's outcome, or its error's text.
    pub outcome: std::result::Result<Outcome, String>,
    /// What the link could carry within the limit: `link_bw × (limit − cost)`.
    pub allowed: Bytes,
    /// Downtime minus the limit in ms (negative: within) for a switchover.
    pub overshoot_ms: Option<f64>,
    /// The switchover exceeded the limit.
    pub violation: bool,
    /// For a switchover: destination RAM equals source RAM (per-page CRC and full
    /// compare).
    pub content_ok: Option<bool>,
    /// The switchover was decided on a pending figure exactly equal to the threshold.
    pub equal_at_switch: bool,
    /// An estimate exactly equal to the threshold was seen by the gate.
    pub equal_estimate_seen: bool,
    /// The threshold was 0 at some decision after the first window.
    pub zero_threshold_seen: bool,
    /// A measurement window closed with no bytes sent.
    pub empty_window_seen: bool,
    /// The estimates the loop saw after the first measurement window and before its first
    /// exact query.
    pub first_pass_estimates: Vec<Bytes>,
    /// For a switchover with a disk: the virtual time its stop took, in ns.
    pub disk_stop_ns: u64,
    /// For a switchover with a streamed bitmap: whether the destination's equals the
    /// source's at the stop (after a postcopy switch, whose regions are deferred: holds
    /// every bit of it).
    pub stream_ok: Option<bool>,
}

/// The sim's controller: postcopy per scenario, auto-converge on stalls, cancel at the end.
struct SimControl {
    postcopy: Option<u32>,
    cancel_after_exact: Option<u64>,
    exact_seen: u64,
    stalls: u32,
    equal_estimate_seen: bool,
    zero_threshold_seen: bool,
    empty_window_seen: bool,
    estimates: Vec<Bytes>,
}

impl Controller for SimControl {
    fn on_iteration(&mut self, r: &IterationReport) -> Directive {
        if self.exact_seen == 0 && r.windows > 0 {
            self.estimates.push(r.estimate);
        }
        if r.exact {
            self.exact_seen += 1;
        }
        if r.windows > 0 {
            self.equal_estimate_seen |= r.estimate == r.threshold;
            self.zero_threshold_seen |= r.threshold == Bytes(0);
        }
        self.empty_window_seen |= r.empty_windows > 0;
        if self
            .cancel_after_exact
            .is_some_and(|n| self.exact_seen >= n)
        {
            return Directive::Cancel;
        }
        match self.postcopy {
            Some(k) if self.exact_seen >= u64::from(k) => Directive::StartPostcopy,
            _ => Directive::Continue,
        }
    }

    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        self.stalls += 1;
        if self.postcopy.is_some() && self.stalls == 1 {
            StallAction::Postcopy
        } else if self.stalls <= 3 {
            StallAction::Throttle(r.throttle.saturating_add(30).min(90))
        } else {
            StallAction::Cancel
        }
    }
}

fn crc_pages(ram: &[u8]) -> Vec<u32> {
    ram.chunks_exact(PAGE_SIZE).map(crc32fast::hash).collect()
}

impl Scenario {
    /// A random scenario from `seed`: sizes, rates and limits spread so that some
    /// converge at once, some after several passes, some never; about one in twenty has a
    /// downtime limit of 0. RAM is 2 to 24 pages, except in [`LARGE_RAM_PERCENT`] % of
    /// scenarios, where it is log-uniform from 25 to [`LARGE_RAM_MAX_PAGES`] pages (drawn
    /// from a stream of its own, so the other parameters of a seed do not move).
    pub fn random(seed: u64) -> Scenario {
        let mut r = SplitMix64::new(seed);
        let mut pages = 2 + r.below(23);
        let mut large = SplitMix64::new(seed ^ 0x1A56_E0A3);
        if large.below(100) < LARGE_RAM_PERCENT {
            let (lo, hi) = (25f64.ln(), (LARGE_RAM_MAX_PAGES as f64).ln());
            pages = ((lo + large.unit() * (hi - lo)).exp() as u64).clamp(25, LARGE_RAM_MAX_PAGES);
        }
        let ram_wire = pages * (PAGE_SIZE as u64 + 16);
        let downtime_limit = if r.below(20) == 0 {
            0
        } else {
            1 + r.below(500)
        };
        // Threshold as a fraction of RAM: 0 to 1.2.
        let frac = r.unit() * 1.2;
        // Whole bytes per ms, as the simulated link runs.
        let link_bw = ((ram_wire as f64 * frac) / downtime_limit.max(1) as f64).max(64.0) as u64;
        let page_rate = link_bw as f64 / PAGE_SIZE as f64;
        let dirty_rate = if r.below(10) == 0 {
            0.0
        } else {
            page_rate * r.unit() * 1.5
        };
        let pattern = match r.below(3) {
            0 => Pattern::Uniform,
            1 => Pattern::HOT_90_5,
            _ => Pattern::Sequential,
        };
        let max_bandwidth = if r.below(2) == 0 {
            None
        } else {
            let per_ms = ((link_bw as f64) * (0.1 + r.unit() * 1.4)).max(1.0) as u64;
            Some(BytesPerMs::from_bytes_per_ms(per_ms as f64))
        };
        let switchover_bw = if r.below(6) == 0 {
            // Whole bytes per second, QEMU's unit for this parameter.
            let per_sec = ((link_bw * 1000) as f64 * (0.5 + r.unit() * 0.5)) as u64;
            Some(BytesPerMs::from_bytes_per_sec(per_sec))
        } else {
            None
        };
        let switchover_cost = if r.below(5) == 0 {
            r.below(downtime_limit / 2 + 1)
        } else {
            0
        };
        let postcopy = if r.below(4) == 0 {
            Some(r.below(4) as u32)
        } else {
            None
        };
        Scenario {
            seed,
            pages,
            batch_pages: 1 + r.below(8) as usize,
            link_bw: BytesPerMs::from_bytes_per_ms(link_bw as f64),
            max_bandwidth,
            switchover_bw,
            downtime_limit: Millis(downtime_limit),
            switchover_cost: Millis(switchover_cost),
            dirty_rate,
            pattern,
            postcopy,
            rule: Rule::Fixed,
            cancel_after_exact: None,
            disk: DiskSim::random(seed, downtime_limit, switchover_cost),
            stream: StreamSim::random(seed),
        }
    }

    /// The same scenario without its disk bitmaps.
    pub fn without_disk(self) -> Scenario {
        Scenario {
            disk: None,
            stream: None,
            ..self
        }
    }

    /// The loop parameters of this scenario.
    pub fn config(&self) -> LoopConfig {
        LoopConfig {
            downtime_limit: self.downtime_limit,
            max_bandwidth: self.max_bandwidth,
            avail_switchover_bandwidth: self.switchover_bw,
            link_estimate: None,
            switchover_cost: self.switchover_cost,
            max_postcopy_bandwidth: None,
            postcopy: self.postcopy.is_some(),
            start_postcopy: false,
            stall_rounds: 3,
            iterate_chunk: Bytes((self.batch_pages as u64 * 2 * PAGE_SIZE as u64).max(1)),
            answer_timeout: super::precopy::DEFAULT_ANSWER_TIMEOUT,
            rule: self.rule,
        }
    }

    /// Runs the scenario and checks downtime and content.
    ///
    /// # Errors
    /// Only for a scenario that cannot be set up (RAM allocation).
    pub fn run(&self) -> Result<ScenarioResult> {
        let ram = Arc::new(GuestRam::new(self.pages)?);
        let log = Arc::new(new_log(&ram)?);
        // Some initial content, so that a missed page shows.
        let mut init = SplitMix64::new(self.seed ^ 0x1417);
        for p in 0..self.pages {
            ram.fill_page(p, init.next_u64());
        }
        let sim = Sim::new(
            Arc::clone(&ram),
            Arc::clone(&log),
            self.dirty_rate,
            self.pattern,
            self.link_bw,
            self.seed,
        );
        sim.world().dest.touch_rate = self.link_bw.get() / PAGE_SIZE as f64;
        let mut state = RamState::new(
            RAM_ID,
            Arc::clone(&ram),
            Arc::clone(&log),
            SetupMode::Full,
            self.postcopy.is_some(),
            self.batch_pages,
        )?;
        let mut control = SimControl {
            postcopy: self.postcopy,
            cancel_after_exact: self.cancel_after_exact,
            exact_seen: 0,
            stalls: 0,
            equal_estimate_seen: false,
            zero_threshold_seen: false,
            empty_window_seen: false,
            estimates: Vec::new(),
        };
        let mut disk = self
            .disk
            .map(|d| SimDiskState::new(sim.clone(), d, self.seed));
        // With postcopy the stream's regions may follow the switch, as RAM's pages do.
        let deferred = self.postcopy.is_some();
        let mut stream = self
            .stream
            .map(|p| {
                SimStreamState::new(sim.clone(), p, self.seed)
                    .map(|s| s.defer_to_postcopy(deferred))
            })
            .transpose()?;
        let stream_dest = self.stream.map(|p| {
            let disk = p.disk_size();
            Arc::new(std::sync::Mutex::new(StreamDiskDest::new(
                "disk-stream",
                move || BitmapStore::create(MemStorage::new(), disk, 65536),
            )))
        });
        if let Some(d) = &stream_dest {
            sim.world()
                .dest
                .states
                .push(Arc::clone(d) as SharedDestState);
        }
        let (mut clock, mut vm, mut out, mut inbound) =
            (sim.clone(), sim.clone(), sim.clone(), sim.clone());
        let mut states: Vec<&mut dyn MigrationState> = vec![&mut state];
        if let Some(d) = disk.as_mut() {
            states.push(d);
        }
        if let Some(s) = stream.as_mut() {
            states.push(s);
        }
        let outcome = run(
            &self.config(),
            Endpoints {
                clock: &mut clock,
                vm: &mut vm,
                out: &mut out,
                inbound: &mut inbound,
            },
            &mut states,
            &mut control,
        );
        drop(states);
        let disk_ns = disk.as_ref().map_or(0, |d| d.stop_ns);
        // The link's own figure (whole bytes per ms), so that `allowed` is exact.
        let link_bw = sim.link_bw();
        let allowed = link_bw * (self.downtime_limit - self.switchover_cost);
        let mut result = ScenarioResult {
            scenario: *self,
            outcome: outcome.as_ref().map(|o| *o).map_err(|e| e.to_string()),
            allowed,
            overshoot_ms: None,
            violation: false,
            content_ok: None,
            equal_at_switch: false,
            equal_estimate_seen: control.equal_estimate_seen,
            zero_threshold_seen: control.zero_threshold_seen,
            empty_window_seen: control.empty_window_seen,
            first_pass_estimates: control.estimates,
            disk_stop_ns: 0,
            stream_ok: None,
        };
        if let Ok(o) = outcome {
            if matches!(o.kind, Kind::Completed | Kind::Postcopy) {
                let b = o.bytes_in_downtime.get();
                // In ns × link bytes per ms, exactly: wire time + disk time ≤ the limit
                // less the fixed cost.
                let link = u128::from(link_bw.get() as u64);
                let left_ns =
                    u128::from((self.downtime_limit - self.switchover_cost).get()) * 1_000_000;
                result.violation =
                    u128::from(b) * 1_000_000 + u128::from(disk_ns) * link > left_ns * link;
                result.disk_stop_ns = disk_ns;
                result.overshoot_ms = Some(
                    b as f64 / link_bw.get()
                        + disk_ns as f64 / 1e6
                        + self.switchover_cost.get() as f64
                        - self.downtime_limit.get() as f64,
                );
                let compared = if o.kind == Kind::Completed {
                    o.pending_at_switch.total()
                } else {
                    o.pending_at_switch.must_precopy
                };
                result.equal_at_switch = compared == o.threshold_at_switch;
                let src = ram.snapshot();
                let w = sim.world();
                let dst = w.dest.ram();
                let mut same = crc_pages(&src) == crc_pages(dst) && src == dst;
                // The streamed bitmap: the destination's image holds the source's bits at
                // the stop, exactly (clears included); after a postcopy switch with the
                // regions deferred, every one of them (late regions are ORed, so a bit the
                // source cleared after sending it may stay).
                if let (Some(s), Some(d)) = (&stream, &stream_dest) {
                    let held = d
                        .lock()
                        .ok()
                        .and_then(|mut d| d.take_store())
                        .and_then(|st| st.bitmap("b").ok());
                    let equal = held.is_some_and(|b| {
                        if deferred && o.kind == Kind::Postcopy {
                            covers(&b, s.bitmap())
                        } else {
                            b.dirty_extents().eq(s.bitmap().dirty_extents())
                        }
                    });
                    result.stream_ok = Some(equal);
                    same &= equal;
                }
                result.content_ok = Some(same);
            }
        }
        Ok(result)
    }
}

/// An equality scenario from `seed`: the threshold is set (through
/// `avail_switchover_bandwidth`) to exactly one of the estimates the loop sees in its first
/// pass, so the gate meets `estimate == threshold`. `None` when no such setting exists
/// for this seed (estimates too large for the link, or no exact f64 product).
///
/// # Errors
/// As [`Scenario::run`].
pub fn equality_scenario(seed: u64, rule: Rule) -> Result<Option<Scenario>> {
    let mut base = Scenario::random(seed);
    let mut r = SplitMix64::new(seed ^ 0xE0);
    base.postcopy = None;
    base.disk = None;
    base.stream = None;
    base.max_bandwidth = None;
    base.switchover_cost = Millis(0);
    // A first pass of 200 to 900 ms, so that the threshold exists before it ends.
    let ram_wire = base.pages * (PAGE_SIZE as u64 + 16);
    let link = (ram_wire / (200 + r.below(700))).max(64);
    base.link_bw = BytesPerMs::from_bytes_per_ms(link as f64);
    base.dirty_rate = link as f64 / PAGE_SIZE as f64 * (0.05 + r.unit() * 0.75);
    // Observation: threshold 0 throughout (a limit of 0; an override of 0 would mean
    // "measure", as in QEMU), stop at the first exact query.
    let mut observe = base;
    observe.downtime_limit = Millis(0);
    observe.cancel_after_exact = Some(1);
    let seen = observe.run()?.first_pass_estimates;
    if seen.is_empty() {
        return Ok(None);
    }
    // The first pass's estimates after the first window only fall; the gate first opens
    // on the one picked.
    let t = seen[r.below(seen.len() as u64) as usize].get();
    let min_limit = t.div_ceil(link).max(1);
    for limit in min_limit..=2000 {
        if (t * 1000) % limit != 0 {
            continue;
        }
        let bps = t * 1000 / limit;
        let bw = BytesPerMs::from_bytes_per_sec(bps);
        // The override must not promise more than the link carries.
        if bw > base.link_bw || threshold(bw, Millis(limit)) != Bytes(t) {
            continue;
        }
        let mut s = base;
        s.downtime_limit = Millis(limit);
        s.switchover_bw = Some(bw);
        s.rule = rule;
        return Ok(Some(s));
    }
    Ok(None)
}

/// Totals of a sweep.
#[derive(Debug, Clone, Default)]
pub struct SweepReport {
    /// Scenarios run.
    pub scenarios: u64,
    /// Of which equality scenarios.
    pub equality_scenarios: u64,
    /// Switchovers (precopy completions and postcopy switches).
    pub switchovers: u64,
    /// Postcopy switches.
    pub postcopy: u64,
    /// Switchovers over the downtime limit.
    pub violations: u64,
    /// Largest downtime minus limit over all switchovers, in ms (negative: all within).
    pub largest_overshoot_ms: Option<f64>,
    /// Runs the caller gave up on after stalls.
    pub non_converging: u64,
    /// Switchovers whose destination RAM differed from the source.
    pub content_mismatches: u64,
    /// Runs that ended with an error.
    pub errors: u64,
    /// Switchovers decided on a figure exactly equal to the threshold.
    pub equal_at_switch: u64,
    /// Runs whose gate saw an estimate equal to the threshold.
    pub equal_estimate_seen: u64,
    /// Runs that saw a threshold of 0 after the first window.
    pub zero_threshold_seen: u64,
    /// Runs with a measurement window that sent nothing.
    pub empty_window_seen: u64,
    /// Scenarios with more than 24 pages of RAM (the large-RAM slice).
    pub large_ram: u64,
    /// Of which switched over.
    pub large_ram_switchovers: u64,
    /// The largest RAM of the sweep, in pages.
    pub largest_ram_pages: u64,
    /// Scenarios with a disk bitmap on shared storage.
    pub disk_scenarios: u64,
    /// Of which switched over (the stop's disk time inside the downtime).
    pub disk_switchovers: u64,
    /// The longest disk stop of a switchover, in ms.
    pub largest_disk_stop_ms: f64,
    /// Disk scenarios whose stop takes exactly what the limit leaves after the fixed cost.
    pub disk_fills_budget: u64,
    /// Disk scenarios whose stop alone exceeds it.
    pub disk_exceeds_budget: u64,
    /// Of those two kinds, switchovers (each would leave the network no time: none is
    /// right).
    pub disk_edge_switchovers: u64,
    /// Scenarios with a bitmap streamed to the destination's own image.
    pub stream_scenarios: u64,
    /// Of which switched over with the destination's bitmap equal to the source's (after a
    /// postcopy switch: holding every bit of it).
    pub stream_equal: u64,
    /// Seeds of the scenarios that violated the limit, mismatched or failed (first 20).
    pub failing_seeds: Vec<u64>,
}

impl SweepReport {
    fn add(&mut self, r: &ScenarioResult) {
        self.scenarios += 1;
        let large = r.scenario.pages > 24;
        self.large_ram += u64::from(large);
        self.large_ram_switchovers += u64::from(large && r.content_ok.is_some());
        self.largest_ram_pages = self.largest_ram_pages.max(r.scenario.pages);
        if r.scenario.stream.is_some() {
            self.stream_scenarios += 1;
            self.stream_equal += u64::from(r.stream_ok == Some(true));
        }
        if let Some(d) = r.scenario.disk {
            let left_us = (r.scenario.downtime_limit - r.scenario.switchover_cost).get() * 1000;
            let fills = d.barrier_us == left_us && d.writes_per_page_write == 0.0;
            let exceeds = d.barrier_us > left_us;
            self.disk_fills_budget += u64::from(fills);
            self.disk_exceeds_budget += u64::from(exceeds);
            self.disk_edge_switchovers += u64::from((fills || exceeds) && r.content_ok.is_some());
            self.disk_scenarios += 1;
            self.disk_switchovers += u64::from(r.content_ok.is_some());
            self.largest_disk_stop_ms = self.largest_disk_stop_ms.max(r.disk_stop_ns as f64 / 1e6);
        }
        let bad = r.violation || r.content_ok == Some(false) || r.outcome.is_err();
        match &r.outcome {
            Ok(o) => match o.kind {
                Kind::Completed | Kind::Postcopy => {
                    self.switchovers += 1;
                    self.postcopy += u64::from(o.kind == Kind::Postcopy);
                }
                Kind::NotConverging => self.non_converging += 1,
            },
            Err(_) => self.errors += 1,
        }
        self.violations += u64::from(r.violation);
        self.content_mismatches += u64::from(r.content_ok == Some(false));
        if let Some(o) = r.overshoot_ms {
            self.largest_overshoot_ms = Some(self.largest_overshoot_ms.map_or(o, |m| m.max(o)));
        }
        self.equal_at_switch += u64::from(r.equal_at_switch);
        self.equal_estimate_seen += u64::from(r.equal_estimate_seen);
        self.zero_threshold_seen += u64::from(r.zero_threshold_seen);
        self.empty_window_seen += u64::from(r.empty_window_seen);
        if bad && self.failing_seeds.len() < 20 {
            self.failing_seeds.push(r.scenario.seed);
        }
    }

    /// No violation, no content mismatch, no error.
    pub fn clean(&self) -> bool {
        self.violations == 0 && self.content_mismatches == 0 && self.errors == 0
    }
}

/// The seed of scenario `i` of a sweep with seed `seed`.
pub fn scenario_seed(seed: u64, i: u64) -> u64 {
    SplitMix64::new(seed ^ i.wrapping_mul(0xA076_1D64_78BD_642F)).next_u64()
}

/// Runs `n` scenarios of the sweep `seed` with `rule`: one in ten an equality scenario
/// (falling back to a random one when none exists for its seed), the rest random.
///
/// # Errors
/// As [`Scenario::run`].
pub fn sweep(n: u64, seed: u64, rule: Rule) -> Result<SweepReport> {
    let mut report = SweepReport::default();
    for i in 0..n {
        let s = scenario_seed(seed, i);
        let scenario = if i % 10 == 9 {
            match equality_scenario(s, rule)? {
                Some(eq) => {
                    report.equality_scenarios += 1;
                    eq
                }
                None => Scenario {
                    rule,
                    ..Scenario::random(s)
                },
            }
        } else {
            Scenario {
                rule,
                ..Scenario::random(s)
            }
        };
        report.add(&scenario.run()?);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::frame::{Hello, StateInfo};

    /// A destination state that answers every section with a Report.
    #[derive(Debug)]
    struct Chatty;

    impl crate::migration::DestState for Chatty {
        fn name(&self) -> &str {
            "chatty"
        }
        fn section(&mut self, _: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(Some(b"news".to_vec()))
        }
    }

    fn hello() -> Control {
        Control::Hello(Hello {
            version: STREAM_VERSION,
            page_size: PAGE_SIZE as u32,
            ram_pages: 4,
            migration_id: 1,
            max_bandwidth: 0,
            nonce: 0,
            resume: 0,
            incremental: false,
            states: vec![
                StateInfo {
                    id: RAM_ID,
                    name: RAM_STATE_NAME.into(),
                },
                StateInfo {
                    id: 9,
                    name: "chatty".into(),
                },
            ],
        })
    }

    /// What an attempt's destination said and its source never read does not stay in the
    /// simulated return path into the next attempt (over TCP each attempt has a connection
    /// of its own): there a shared disk's source would refuse a preload report of the
    /// earlier attempt's log, failing a good retry.
    #[test]
    fn a_new_attempt_reads_nothing_an_earlier_one_said() {
        let mut dest = DestModel::new(RAM_ID, 4, 1);
        dest.states.push(Arc::new(std::sync::Mutex::new(Chatty)));
        let mut link = Loopback::new(dest);
        link.control(&hello()).unwrap();
        link.send(9, b"x").unwrap();
        assert_eq!(link.dest.outbox.len(), 1, "{:?}", link.dest.outbox);
        link.control(&hello()).unwrap();
        assert!(link.try_recv().unwrap().is_none());
    }
}
