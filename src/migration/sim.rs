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

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use super::channel::{DestMessage, Inbound, Outbound};
use super::clock::Clock;
use super::dest::{DestCore, DestinationConfig};
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{control_wire_len, Control, Frame, StateId, SECTION_OVERHEAD, STREAM_VERSION};
use super::guest::{new_log, GuestRam, Vm, PAGE_SIZE};
use super::precopy::{
    run, Controller, Directive, Endpoints, IterationReport, Kind, LoopConfig, Outcome, Rule,
    StallAction, StallReport,
};
use super::ram::{RamState, SetupMode, RAM_ID};
use super::ram_codec::{self, RAM_STATE_NAME};
use super::state::MigrationState;
use super::workload::Pattern;
use crate::rng::SplitMix64;
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
    outbox: VecDeque<DestMessage>,
}

impl DestModel {
    /// An empty destination for `pages` pages of RAM in section `ram_id`.
    pub fn new(ram_id: StateId, pages: u64, seed: u64) -> Self {
        DestModel {
            ram_id,
            pages,
            core: None,
            frames: 0,
            requested: vec![false; pages as usize],
            touch_rng: SplitMix64::new(seed ^ 0xDE57),
            touch_rate: 0.0,
            touch_credit: 0.0,
            refuse: None,
            requests: 0,
            outbox: VecDeque::new(),
        }
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
                _ => {}
            }
            Ok(())
        });
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
                if h.page_size as usize != PAGE_SIZE
                    || h.ram_pages != self.pages
                    || ram_state != Some(self.ram_id)
                {
                    return Err(ProtocolError::WrongGuest {
                        pages: h.ram_pages,
                        page_size: h.page_size,
                        ram_state,
                        expected_pages: self.pages,
                        expected_page_size: PAGE_SIZE as u32,
                        expected_state: self.ram_id,
                    }
                    .into());
                }
                // A new attempt: a new destination, from the RAM the last one kept. Kept
                // pages serve only a Hello of the same guest (`DestCore::new`); another
                // guest's Hello is refused and they stay.
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

impl World {
    /// Puts `wire` bytes on the link (advancing time), or fails the send when told to.
    fn transmit(&mut self, wire: Bytes) -> Result<()> {
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
        w.transmit(wire)?;
        w.dest.control(msg)?;
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
        Ok(self.0.borrow_mut().dest.outbox.pop_front())
    }

    fn recv(&mut self) -> Result<DestMessage> {
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
        }
    }

    /// The loop parameters of this scenario.
    pub fn config(&self) -> LoopConfig {
        LoopConfig {
            downtime_limit: self.downtime_limit,
            max_bandwidth: self.max_bandwidth,
            avail_switchover_bandwidth: self.switchover_bw,
            switchover_cost: self.switchover_cost,
            postcopy: self.postcopy.is_some(),
            start_postcopy: false,
            stall_rounds: 3,
            iterate_chunk: Bytes((self.batch_pages as u64 * 2 * PAGE_SIZE as u64).max(1)),
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
        let (mut clock, mut vm, mut out, mut inbound) =
            (sim.clone(), sim.clone(), sim.clone(), sim.clone());
        let outcome = run(
            &self.config(),
            Endpoints {
                clock: &mut clock,
                vm: &mut vm,
                out: &mut out,
                inbound: &mut inbound,
            },
            &mut [&mut state as &mut dyn MigrationState],
            &mut control,
        );
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
        };
        if let Ok(o) = outcome {
            if matches!(o.kind, Kind::Completed | Kind::Postcopy) {
                let b = o.bytes_in_downtime.get();
                result.violation = o.bytes_in_downtime > allowed;
                result.overshoot_ms = Some(
                    b as f64 / link_bw.get() + self.switchover_cost.get() as f64
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
                result.content_ok = Some(crc_pages(&src) == crc_pages(dst) && src == dst);
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
