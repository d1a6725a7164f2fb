//! The migration loop: precopy iterations, the switchover rule, the postcopy switch and the
//! stall guard, modelled on QEMU's `migration_iteration_run` (`migration/migration.c`).
//!
//! One turn of the loop:
//! 1. **Counters.** Once at least [`BUFFER_DELAY`] (100 ms) passed since the window
//!    started: bandwidth = bytes sent in the window / its length (or
//!    `avail_switchover_bandwidth` if set). The first window runs from the Hello, so the
//!    Hello and the states' setup count in it. A window with no bytes sent, none of whose
//!    turns the rate limiter held back while something was left to send, had nothing to
//!    send and measures nothing: the last measurement stands (QEMU measures it as 0, as
//!    this loop measures a held-back one).
//!    Before the first window closes the bandwidth is 0. Each closed window also runs
//!    every state's [`flush`](MigrationState::flush) (a disk state writes its changed
//!    regions, and measures the disk's rate and barrier latency as it does).
//! 2. **Estimate** every state's pending (cheap, stale), plus the control message the
//!    switchover sends. A figure ([`Pending`]) has bytes for the wire and `disk_time`,
//!    the time the states' stops spend on their own storage.
//! 3. **Gate**: the figure's threshold is `bandwidth × (downtime_limit − switchover_cost
//!    − disk_time − query_time)` (0 when the disk alone takes the rest of the limit;
//!    `query_time` is the last exact query's time: the stop runs that query once more,
//!    with the VM stopped, before [`MigrationState::complete`]); if
//!    [`fits`]`(estimate, threshold)` (or, with postcopy requested, the estimate's
//!    `must_precopy` fits), flush every state again (a disk state's stop then holds only
//!    what changes from here until the VM stops), then run the
//!    **exact** query (syncs the dirty logs, and counts a disk state's remaining regions
//!    exactly). With nothing left to send as of the last sync (the control message, and
//!    [`Pending::stop_only`] bytes only the stop sends), the exact query runs with the gate
//!    shut too: only a sync can find more. A figure of the control message alone (nothing
//!    to send at all, not even at the stop) is compared at the link's best figure
//!    ([`IterationReport::link`]: the highest any window of this attempt measured, or
//!    [`LoopConfig::link_estimate`], an earlier attempt's), not the last window's: an idle
//!    guest's retry has only its Hello to measure by. Its 49 bytes are all that rides on
//!    that figure (QEMU completes on a pending figure of 0 unchecked). While a state
//!    waits on its destination ([`Pending::awaiting_destination`]: a shared disk's
//!    destination has not yet said whether its preload follows the write log, and its
//!    preload may still be running in the thread that would read the switchover; or it is
//!    catching up on the logs queued behind that preload), no exact query runs and
//!    nothing is decided, for at most [`LoopConfig::answer_timeout`].
//! 4. **Decide on the exact figure only**: postcopy if requested and `must_precopy` fits;
//!    else complete if the total fits. Both with [`fits`], the same comparison as the gate,
//!    so an estimate equal to the threshold is always re-checked against fresh data
//!    (QEMU 10.1 gated with `<` and decided with `<=` on the estimate: 455a6167f254).
//!    A switchover stops the VM at once: nothing but the comparison runs between the
//!    exact figure and `Vm::stop` (the controller hears of that turn when the attempt
//!    is over). The guest still writes until `stop` has parked it; those pages go out in
//!    the downtime, and [`Outcome::pending_at_stop`] bounds what the downtime sends.
//! 5. Otherwise the [`Controller`] hears of the turn; then the **stall guard** after an
//!    exact figure that did not fit, the **no-progress guard** after turns that
//!    neither synced, sent nor flushed, or the **dirty-rate guard** after periods without
//!    an exact figure in which more than half of what was sent was dirtied again
//!    ([`StallKind`]); none counts a turn that waits on a destination's answer. The
//!    stall guard measures a figure as its bytes plus its disk time at the bandwidth, so
//!    a disk state's flushes count as progress (a disk-only migration that sends nothing is not reported stuck while
//!    its flushes shrink its stop; it switches over once its figure fits what the link
//!    was measured at, with only its Hello and setup to measure by if its guest writes
//!    nothing (its last log is [`Pending::stop_only`], never held to an earlier attempt's
//!    figure): give it `avail_switchover_bandwidth`).
//! 6. **Iterate** the states within the rate limiter's budget (`max_bandwidth` per 100 ms
//!    window, overshoot carried into the next window), or sleep to the window's end.
//!
//! The loop speaks the stream's protocol (`docs/FORMAT.md`, "Migration stream") through
//! [`Outbound`]: a Hello before the states' setup, then the destination's
//! [`DestMessage::Report`] to each state whose setup asked what was kept
//! ([`MigrationState::awaits_report`]), waited for before the first turn, and any other
//! Report, read at each precopy turn, to its state's [`MigrationState::notice`] (a shared
//! disk's destination tells whether its preload follows the source's write log; one that
//! arrives while the loop waits for Started is skipped); precopy completion is VM stop, a
//! Switchover frame, every state's `complete`, End, and the destination's
//! [`DestMessage::Started`] ends the downtime; postcopy is VM stop, every state's
//! `postcopy_start` (RAM's discards), Switchover(postcopy), Started, then page requests
//! served ahead of the background push, and End. A failure sends an Abort (best effort);
//! unless the failure proves that the destination applied every section sent (a refusal,
//! or a cancel before the first section), every state's `channel_failed` runs; then
//! `cancel` (VM running) or `resume_source` (VM stopped), and the VM resumes, unless the
//! frame that starts the destination was written and no definite answer came
//! ([`MigrationError::OutcomeUnknown`]: the VM stays stopped), or a state cannot take its
//! storage back or the VM does not resume ([`MigrationError::SourceNotResumed`]: stopped). An Abort from the
//! destination during precopy ends the attempt at the next turn.
//!
//! The loop is generic over [`Clock`], [`Vm`], [`Outbound`] and [`Inbound`]: the same code
//! runs under the virtual clock ([`super::sim`]) and over a real channel.

use std::time::Duration;

use super::channel::{DestMessage, Inbound, Outbound};
use super::clock::Clock;
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{Control, FrameKind, Hello, StateId, StateInfo, STREAM_VERSION};
use super::guest::Vm;
use super::state::{MigrationState, Pending};
use crate::units::{fits, threshold, Bytes, BytesPerMs, Millis};

/// Bandwidth is measured over windows at least this long (QEMU's `BUFFER_DELAY`); the rate
/// limiter's window too.
pub const BUFFER_DELAY: Millis = Millis(100);

/// QEMU's default downtime limit.
pub const DEFAULT_DOWNTIME_LIMIT: Millis = Millis(300);

/// The default [`LoopConfig::answer_timeout`]: a preload of many large bitmaps on slow
/// storage takes seconds, not a minute.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest [`LoopConfig::answer_timeout`]: a day (the wait is never unbounded).
pub const MAX_ANSWER_TIMEOUT: Duration = Duration::from_secs(86_400);

/// QEMU's default `max-bandwidth`, 128 MiB/s.
pub const DEFAULT_MAX_BANDWIDTH_BYTES_PER_SEC: u64 = 128 << 20;

/// A message of the destination the loop does not take before the switchover.
fn unexpected_before_switchover(msg: &DestMessage) -> MigrationError {
    ProtocolError::UnexpectedMessage {
        kind: msg.kind(),
        when: "before the switchover",
    }
    .into()
}

/// The most Reports the loop reads in one precopy turn, and, per state, the most it skips
/// while it waits for Started (news a destination sent before it read the switchover: a
/// shared disk's destination sends one when its preload's state changes, in answer to a
/// section).
const MAX_LATE_REPORTS: usize = 64;

/// Which comparisons gate the exact query and decide the switchover.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Ours: [`fits`] (`≤`) for the gate and the decision, and the decision only on an
    /// exact figure.
    Fixed,
    /// QEMU 10.1 (7aaa1fc072, before 455a6167f254): gate with `<`, decide with `<=` on
    /// whatever figure is at hand, estimate included. For the bug test only (feature
    /// `testing`).
    #[cfg(feature = "testing")]
    Qemu101,
}

/// Parameters of a migration.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Longest acceptable downtime (QEMU `downtime-limit`, default 300 ms, at most 2000 s).
    pub downtime_limit: Millis,
    /// Rate limit while the VM runs (QEMU `max-bandwidth`, default 128 MiB/s); `None`
    /// for unlimited. The switchover itself is not limited, as in QEMU.
    pub max_bandwidth: Option<BytesPerMs>,
    /// Bandwidth to assume for the switchover instead of the measured one (QEMU
    /// `avail-switchover-bandwidth`).
    pub avail_switchover_bandwidth: Option<BytesPerMs>,
    /// What the link carried in an earlier attempt of the same migration
    /// ([`IterationReport::link`]; [`super::tcp::Session`] carries it from one attempt to
    /// the next, filling `None`): the least the link's best figure starts from. It is used
    /// only for a figure of the control message alone (nothing to send at all: an idle
    /// guest's retry, whose own windows measure little more than its Hello), never for a
    /// figure with pages, regions or bytes only the stop sends. `None`: none here
    /// (`migrate_in_session` takes the session's); `Some(0)`: none at all.
    pub link_estimate: Option<BytesPerMs>,
    /// Fixed part of the downtime that does not depend on bytes (stopping the vCPUs,
    /// starting the destination). Subtracted from the limit before the threshold.
    pub switchover_cost: Millis,
    /// Rate limit of the background push after a postcopy switch (QEMU
    /// `max-postcopy-bandwidth`, default 0: unlimited); `None` for unlimited. The
    /// destination's page requests are answered at once, outside it: a low limit leaves
    /// the link to the pages the guest waits for.
    pub max_postcopy_bandwidth: Option<BytesPerMs>,
    /// Postcopy capability: the states were built with it, and the loop may switch.
    pub postcopy: bool,
    /// Postcopy requested from the start (QEMU `migrate-start-postcopy`); it can also be
    /// requested by [`Directive::StartPostcopy`] or [`StallAction::Postcopy`].
    pub start_postcopy: bool,
    /// Exact figures in a row without a 10 % improvement before the stall guard reports.
    pub stall_rounds: u32,
    /// Most bytes one `iterate` call may send (keeps the loop responsive).
    pub iterate_chunk: Bytes,
    /// Longest the loop waits, with the guest running, on a destination a state's figure
    /// waits on ([`Pending::awaiting_destination`]: a shared disk's destination preloading
    /// its bitmaps, then catching up on the logs queued meanwhile), and on the answers to
    /// the states' setup questions before the first turn
    /// ([`MigrationState::awaits_report`]: a stream disk's destination walks its image
    /// before it answers; that wait ends at the first channel receive that times out past
    /// this, so it may last up to this plus the channel's own timeout), before it fails the
    /// attempt with
    /// [`ProtocolError::NoAnswer`] (default 60 s; from one measurement window, 100 ms, to
    /// [`MAX_ANSWER_TIMEOUT`]). No switchover happens meanwhile, and no stall guard counts
    /// the wait. While the source still sends, the socket's write timeout may end the wait
    /// first (a destination that preloads reads nothing meanwhile).
    pub answer_timeout: Duration,
    /// Comparisons (hidden: only the bug test changes it).
    #[doc(hidden)]
    pub rule: Rule,
}

impl Default for LoopConfig {
    fn default() -> Self {
        LoopConfig {
            downtime_limit: DEFAULT_DOWNTIME_LIMIT,
            max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(
                DEFAULT_MAX_BANDWIDTH_BYTES_PER_SEC,
            )),
            avail_switchover_bandwidth: None,
            link_estimate: None,
            switchover_cost: Millis(0),
            max_postcopy_bandwidth: None,
            postcopy: false,
            start_postcopy: false,
            stall_rounds: 5,
            iterate_chunk: Bytes(1 << 20),
            answer_timeout: DEFAULT_ANSWER_TIMEOUT,
            rule: Rule::Fixed,
        }
    }
}

/// One turn of the loop, for an `info migrate`-like line.
#[derive(Debug, Clone, Copy)]
pub struct IterationReport {
    /// Turn number, from 0.
    pub iteration: u64,
    /// Clock time of the report.
    pub at: Duration,
    /// The estimate's total, control message included (what the gate compared).
    pub estimate: Bytes,
    /// The figure the decision saw (exact if `exact`), control message included.
    pub pending: Pending,
    /// Whether `pending` is exact.
    pub exact: bool,
    /// The threshold of `pending` (the decision's). The gate compared `estimate` with the
    /// estimate's own threshold, which differs when the exact figure's disk time does, or
    /// when this turn's exact query took another time than the last one (`query_time`).
    pub threshold: Bytes,
    /// Last measured bandwidth (before the `avail_switchover_bandwidth` override).
    pub bandwidth: BytesPerMs,
    /// The link's best figure: the highest bandwidth any window of this attempt measured,
    /// or [`LoopConfig::link_estimate`] if higher (so never lower than what it was given).
    /// A figure of the control message alone is compared at it; the figure to carry into a
    /// retry.
    pub link: BytesPerMs,
    /// Bytes found newly pending by the exact query per ms since the previous one.
    pub dirty_rate: Option<BytesPerMs>,
    /// Bytes on the wire so far.
    pub bytes_sent: Bytes,
    /// Current vCPU throttle, in percent.
    pub throttle: u8,
    /// Measurement windows closed so far (the threshold is 0 until the first closes).
    pub windows: u64,
    /// Of which windows with no bytes sent.
    pub empty_windows: u64,
}

/// What the caller wants after an [`IterationReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Directive {
    /// Carry on.
    Continue,
    /// Request postcopy (needs the capability).
    StartPostcopy,
    /// Cancel: states re-dirty, the VM keeps running, the loop returns
    /// [`MigrationError::Cancelled`].
    Cancel,
}

/// Why the loop reports that it is not converging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallKind {
    /// `rounds` exact figures in a row did not improve by 10 %.
    NoImprovement,
    /// `rounds` turns in a row, over at least `stall_rounds` measurement windows, ran no
    /// exact query and sent nothing although the rate limiter allowed it: a state that
    /// keeps bytes pending but sends none. Without this guard such a loop would spin,
    /// since the stall guard proper only counts exact figures.
    NoProgress,
    /// No exact query ran for two periods of `stall_rounds` measurement windows in a row,
    /// and in each the pending estimate grew back by more than half of what was sent
    /// (QEMU's auto-converge test, `bytes_dirty_period > bytes_xfer_period / 2` twice,
    /// made at its bitmap syncs): a state dirtied about as fast as the link carries it,
    /// whose estimate never falls to the threshold, so no exact figure ever comes for the
    /// stall guard proper to count. `rounds` is the periods counted, `best` and `last` the
    /// estimates at the start and end of the last one.
    DirtiedAsFastAsSent,
}

/// The stall guard's report.
#[derive(Debug, Clone, Copy)]
pub struct StallReport {
    /// Why.
    pub kind: StallKind,
    /// Exact figures without improvement ([`StallKind::NoImprovement`]), or turns without
    /// progress ([`StallKind::NoProgress`]).
    pub rounds: u32,
    /// Smallest exact total seen since the last report (for [`StallKind::NoProgress`],
    /// the last exact total, or the estimate if there was none).
    pub best: Bytes,
    /// The last exact total ([`StallKind::NoProgress`]: the current estimate).
    pub last: Bytes,
    /// Current threshold.
    pub threshold: Bytes,
    /// Current vCPU throttle, in percent.
    pub throttle: u8,
    /// Postcopy was requested already (by the configuration, a directive or an earlier
    /// stall's answer): a stall after that means the switch to it does not fit either.
    pub postcopy_requested: bool,
}

/// The caller's answer to "not converging".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallAction {
    /// Keep iterating.
    KeepGoing,
    /// Auto-converge: throttle the vCPUs by this many percent.
    Throttle(u8),
    /// Switch to postcopy (needs the capability).
    Postcopy,
    /// Give up: states re-dirty, the VM keeps running, the loop returns
    /// an [`Outcome`] of [`Kind::NotConverging`].
    Cancel,
}

/// The caller's hooks into the loop.
pub trait Controller {
    /// Called every turn after the decision, with the figures it was taken on. On the turn
    /// that switches over, the VM stops right after the exact figure (nothing runs in
    /// between but the comparison, so no caller code widens the gap in which the guest
    /// still writes); that turn's report comes when the attempt is over, and its
    /// directive is ignored.
    fn on_iteration(&mut self, report: &IterationReport) -> Directive {
        let _ = report;
        Directive::Continue
    }

    /// Called when the loop is not converging (see [`StallKind`]).
    fn on_stall(&mut self, report: &StallReport) -> StallAction;
}

/// A [`Controller`] that auto-converges: each stall raises the throttle by `step` percent
/// up to `max_throttle`, then switches to postcopy if `postcopy`, else gives up; it gives
/// up too on a stall with postcopy requested already (the switch to it does not fit
/// either: a disk stop that takes the whole limit, say), where asking again would keep the
/// loop going for good.
#[derive(Debug, Clone, Copy)]
pub struct AutoConverge {
    /// Throttle increase per stall.
    pub step: u8,
    /// Highest throttle.
    pub max_throttle: u8,
    /// Fall back to postcopy once fully throttled.
    pub postcopy: bool,
}

impl Default for AutoConverge {
    fn default() -> Self {
        AutoConverge {
            step: 20,
            max_throttle: 99,
            postcopy: false,
        }
    }
}

impl Controller for AutoConverge {
    fn on_stall(&mut self, report: &StallReport) -> StallAction {
        if report.throttle < self.max_throttle {
            StallAction::Throttle(
                report
                    .throttle
                    .saturating_add(self.step)
                    .min(self.max_throttle),
            )
        } else if self.postcopy && !report.postcopy_requested {
            StallAction::Postcopy
        } else {
            StallAction::Cancel
        }
    }
}

/// How a migration ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Precopy switchover; the destination runs the guest.
    Completed,
    /// Postcopy switch, then every page delivered; the destination runs the guest.
    Postcopy,
    /// The caller gave up on a stall; the source guest keeps running.
    NotConverging,
}

/// Figures of a finished migration.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// How it ended.
    pub kind: Kind,
    /// Clock time from just before the VM stop was requested to the destination's
    /// `Started` (zero if it never stopped).
    pub downtime: Duration,
    /// Bytes sent from VM stop to `Started`: what the downtime bound is about.
    pub bytes_in_downtime: Bytes,
    /// The figure the switchover was decided on (control message included).
    pub pending_at_switch: Pending,
    /// The exact figure again, taken just after the VM stopped (control message
    /// included): `pending_at_switch` plus what the guest wrote between the decision's
    /// sync and the stop (nothing under the virtual clock; with real vCPUs, the pages
    /// written in those microseconds). `bytes_in_downtime` never exceeds it (for
    /// postcopy, its `must_precopy`). Zero when the VM never stopped.
    pub pending_at_stop: Pending,
    /// Whether that figure was exact.
    pub exact_at_switch: bool,
    /// The threshold it was compared with.
    pub threshold_at_switch: Bytes,
    /// The last exact query's time, which that threshold took off the limit beside the
    /// disk time (the stop runs the query once more): `threshold_at_switch` is the
    /// bandwidth × (limit − switchover cost − disk time − this).
    pub query_time_at_switch: Millis,
    /// Total bytes on the wire.
    pub total_bytes: Bytes,
    /// Clock time from start to end.
    pub total_time: Duration,
    /// Loop turns.
    pub iterations: u64,
    /// Exact queries.
    pub exact_queries: u64,
    /// Stall reports.
    pub stalls: u32,
    /// Final vCPU throttle.
    pub throttle: u8,
    /// Postcopy page requests served.
    pub requests_served: u64,
    /// Measurement windows closed with no bytes sent (each kept the last measurement, but
    /// one the rate limiter held back, which measured 0).
    pub empty_windows: u64,
    /// What the states wrote to their own storage inside the downtime (a disk state's
    /// final flush and commit): bytes, barriers and time, summed. Its time is part of
    /// `downtime`.
    pub disk_stop: crate::flush::FlushStats,
    /// Bytes the states' [`flush`](MigrationState::flush) wrote while the VM ran.
    pub disk_flushed: Bytes,
}

/// The loop's view of the [`Outbound`]: a sized wrapper, so that states get it as
/// `&mut dyn Outbound` whatever the caller's type. `sections` counts the Section frames
/// handed to the channel in this attempt (sent or not).
struct Meter<'a, O: Outbound + ?Sized> {
    inner: &'a mut O,
    sections: u64,
}

impl<O: Outbound + ?Sized> Outbound for Meter<'_, O> {
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes> {
        self.sections = self.sections.saturating_add(1);
        self.inner.send(state, payload)
    }

    fn control(&mut self, msg: &Control) -> Result<Bytes> {
        self.inner.control(msg)
    }

    fn lift_rate_limit(&mut self) {
        self.inner.lift_rate_limit();
    }

    fn section_overhead(&self) -> Bytes {
        self.inner.section_overhead()
    }

    fn control_cost(&self, msg: &Control) -> Bytes {
        self.inner.control_cost(msg)
    }

    fn bytes_sent(&self) -> Bytes {
        self.inner.bytes_sent()
    }
}

/// Everything the loop drives.
pub struct Endpoints<'a, C: ?Sized, V: ?Sized, O: ?Sized, I: ?Sized> {
    /// Time.
    pub clock: &'a mut C,
    /// The source guest.
    pub vm: &'a mut V,
    /// To the destination.
    pub out: &'a mut O,
    /// From the destination.
    pub inbound: &'a mut I,
}

/// Runs one migration attempt of `states` (in order, like QEMU's handler list).
///
/// On `Ok`, with [`Kind::Completed`] or [`Kind::Postcopy`] the source VM is left stopped
/// (the destination runs the guest); with [`Kind::NotConverging`] it runs.
///
/// `config` is checked and normalised first ([`checked_config`]).
///
/// # Errors
/// [`MigrationError::InvalidInput`] for bad parameters (nothing sent); the channel's
/// errors; [`MigrationError::DestinationRefused`]; [`MigrationError::Cancelled`] on
/// [`Directive::Cancel`]. Before the frame that starts the destination (End, or the
/// postcopy Switchover) is written, and after a definite refusal or Abort from the
/// destination, every error leaves the source VM running and each state's unconfirmed
/// data re-dirtied, but [`MigrationError::SourceNotResumed`] (the VM was stopped and a
/// state's [`MigrationState::reactivate`] or the VM's resume failed: it stays stopped); unless the failure proves nothing was lost in flight (a refusal, or
/// a cancel or bad input before any Section frame went out), each state's
/// [`MigrationState::channel_failed`] runs first, since data sent before the last sync
/// may not have been applied. Once that frame is written, a missing or unreadable answer
/// is [`MigrationError::OutcomeUnknown`] with the source VM still stopped: the
/// destination may be running the guest, so the source must not (QEMU's
/// postcopy-paused). Likewise any error after a postcopy switch.
pub fn run<C, V, O, I>(
    config: &LoopConfig,
    ends: Endpoints<'_, C, V, O, I>,
    states: &mut [&mut dyn MigrationState],
    control: &mut dyn Controller,
) -> Result<Outcome>
where
    C: Clock + ?Sized,
    V: Vm + ?Sized,
    O: Outbound + ?Sized,
    I: Inbound + ?Sized,
{
    let config = &checked_config(config)?;
    validate_states(states)?;
    let Endpoints {
        clock,
        vm,
        out,
        inbound,
    } = ends;
    let mut l = Loop {
        config,
        clock,
        vm,
        out: Meter {
            inner: out,
            sections: 0,
        },
        inbound,
        control,
        start: Duration::ZERO,
        bytes_start: Bytes(0),
        window_start: Duration::ZERO,
        window_bytes: Bytes(0),
        carry: Bytes(0),
        bandwidth: BytesPerMs::ZERO,
        link: config.link_estimate.unwrap_or(BytesPerMs::ZERO),
        expected: BytesPerMs::ZERO,
        postcopy_requested: config.start_postcopy,
        throttle: 0,
        iterations: 0,
        exact_queries: 0,
        stalls: 0,
        last_exact: None,
        requests_served: 0,
        windows: 0,
        empty_windows: 0,
        held_back: false,
        idle_turns: 0,
        idle_since: Duration::ZERO,
        awaiting_since: None,
        disk_flushed: Bytes(0),
        query_time: Millis(0),
    };
    l.start = l.clock.now();
    l.bytes_start = l.out.bytes_sent();
    let hello = Control::Hello(hello(states));
    if let Err(e) = l.out.control(&hello) {
        return Err(l.fail_running(states, e));
    }
    for i in 0..states.len() {
        if let Err(e) = states[i].setup(&mut l.out) {
            return Err(l.fail_running(states, e));
        }
    }
    let asked = l.clock.now();
    if let Err(e) = l.await_reports(states) {
        return Err(l.fail_running(states, e));
    }
    // The first window runs from the Hello: what it and the states' setup put on the wire
    // counts (a lower bound on the link, as every measurement is). An attempt with nothing
    // to send while the VM runs (an idle guest's incremental retry) has no other. The wait
    // for the reports is not sending time (a stream disk's destination walks its image
    // before it answers, seconds for a large one): it is left out of that window, which
    // would otherwise measure the link at a few bytes over those seconds.
    l.window_start = l.start.saturating_add(l.clock.now().saturating_sub(asked));
    l.window_bytes = l.bytes_start;
    l.precopy(states)
}

/// The Hello frame for `states`: their ids and names, and the RAM geometry of the one that
/// is RAM (none: 0 pages) and whether its first pass is incremental.
fn hello(states: &[&mut dyn MigrationState]) -> Hello {
    let ram = states.iter().find(|s| s.ram_geometry().is_some());
    let (page_size, ram_pages) = ram
        .and_then(|s| s.ram_geometry())
        .unwrap_or((super::guest::PAGE_SIZE as u32, 0));
    Hello {
        version: STREAM_VERSION,
        page_size,
        ram_pages,
        incremental: ram.is_some_and(|s| s.ram_incremental()),
        migration_id: states.iter().find_map(|s| s.migration_id()).unwrap_or(0),
        states: states
            .iter()
            .map(|s| StateInfo {
                id: s.id(),
                name: s.name().to_owned(),
            })
            .collect(),
        ..Hello::default()
    }
}

/// `config` checked, and normalised as QEMU reads it: an `avail_switchover_bandwidth` of
/// 0 means "use the measured bandwidth" (`None`), a `max_postcopy_bandwidth` of 0 means
/// "unlimited" (`None`).
///
/// # Errors
/// [`MigrationError::InvalidInput`] for a downtime limit above 2000 s, a switchover cost
/// above the limit, a zero `stall_rounds` or `iterate_chunk`, `start_postcopy` without
/// `postcopy`, or a `max_bandwidth` or non-zero `max_postcopy_bandwidth` under 1 byte
/// per 100 ms window (nothing could ever be sent: the loop would wait forever, and a
/// rate that rounds to 0 bytes/s means *unlimited* to a [`super::rate::RateLimiter`]).
pub fn checked_config(config: &LoopConfig) -> Result<LoopConfig> {
    let mut c = *config;
    if c.avail_switchover_bandwidth.is_some_and(|b| b.get() == 0.0) {
        c.avail_switchover_bandwidth = None;
    }
    if c.max_postcopy_bandwidth.is_some_and(|b| b.get() == 0.0) {
        c.max_postcopy_bandwidth = None;
    }
    for (name, max) in [
        ("max_bandwidth", c.max_bandwidth),
        ("max_postcopy_bandwidth", c.max_postcopy_bandwidth),
    ] {
        if let Some(max) = max {
            if max * BUFFER_DELAY < Bytes(1) {
                return Err(MigrationError::InvalidInput(format!(
                    "{name} {max} is under 1 byte per {BUFFER_DELAY} window (use None \
                     for no limit)"
                )));
            }
        }
    }
    validate(&c)?;
    Ok(c)
}

fn validate(config: &LoopConfig) -> Result<()> {
    if config.downtime_limit > Millis(2_000_000) {
        return Err(MigrationError::InvalidInput(format!(
            "downtime_limit {} is above 2000 s",
            config.downtime_limit
        )));
    }
    if config.switchover_cost > config.downtime_limit {
        return Err(MigrationError::InvalidInput(format!(
            "switchover_cost {} exceeds downtime_limit {}",
            config.switchover_cost, config.downtime_limit
        )));
    }
    if config.stall_rounds == 0 || config.iterate_chunk == Bytes(0) {
        return Err(MigrationError::InvalidInput(
            "stall_rounds and iterate_chunk must be positive".into(),
        ));
    }
    if config.answer_timeout < BUFFER_DELAY.as_duration()
        || config.answer_timeout > MAX_ANSWER_TIMEOUT
    {
        return Err(MigrationError::InvalidInput(format!(
            "answer_timeout {:?} is outside {BUFFER_DELAY}..={MAX_ANSWER_TIMEOUT:?}",
            config.answer_timeout
        )));
    }
    if (config.start_postcopy) && !config.postcopy {
        return Err(MigrationError::InvalidInput(
            "start_postcopy needs the postcopy capability".into(),
        ));
    }
    Ok(())
}

fn validate_states(states: &[&mut dyn MigrationState]) -> Result<()> {
    for (i, s) in states.iter().enumerate() {
        let earlier = &states[..i];
        if earlier
            .iter()
            .any(|t| t.id() == s.id() || t.name() == s.name())
        {
            return Err(MigrationError::InvalidInput(format!(
                "state {} (id {}) has a duplicate id or name",
                s.name(),
                s.id()
            )));
        }
        if s.name().is_empty() || s.name().len() > 255 {
            return Err(MigrationError::InvalidInput(format!(
                "state name {:?} is not 1..=255 bytes",
                s.name()
            )));
        }
        if s.ram_geometry().is_some() && earlier.iter().any(|t| t.ram_geometry().is_some()) {
            return Err(MigrationError::InvalidInput(
                "two states claim to be the guest's RAM".into(),
            ));
        }
    }
    Ok(())
}

struct Loop<'a, C: ?Sized, V: Vm + ?Sized, O: Outbound + ?Sized, I: ?Sized> {
    config: &'a LoopConfig,
    clock: &'a mut C,
    vm: &'a mut V,
    out: Meter<'a, O>,
    inbound: &'a mut I,
    control: &'a mut dyn Controller,
    start: Duration,
    bytes_start: Bytes,
    window_start: Duration,
    window_bytes: Bytes,
    /// Bytes sent beyond the previous window's allowance, charged to this one.
    carry: Bytes,
    bandwidth: BytesPerMs,
    /// The link's best figure: the highest window measurement of this attempt, or the
    /// config's `link_estimate` if higher.
    link: BytesPerMs,
    /// The bandwidth the switchover is computed with: `avail_switchover_bandwidth`, or
    /// the measured one.
    expected: BytesPerMs,
    postcopy_requested: bool,
    throttle: u8,
    iterations: u64,
    exact_queries: u64,
    stalls: u32,
    /// (time, exact total) of the previous exact query, for the dirty rate.
    last_exact: Option<(Duration, Bytes)>,
    requests_served: u64,
    windows: u64,
    empty_windows: u64,
    /// A turn of the current window had no budget while something was left to send (the
    /// rate limiter held it back, bytes carried over from an earlier window using up this
    /// one's allowance).
    held_back: bool,
    /// Turns in a row without progress (no exact query, nothing sent although the rate
    /// limiter allowed it), and the clock time of the first of them.
    idle_turns: u32,
    idle_since: Duration,
    /// Since when the figure has waited on a destination's answer
    /// ([`Pending::awaiting_destination`]), bounded by [`LoopConfig::answer_timeout`].
    awaiting_since: Option<Duration>,
    disk_flushed: Bytes,
    /// How long the last exact query took, rounded up: the stop runs that query once more
    /// with the VM stopped (RAM's last sync, a disk state's count of what its stop
    /// writes), so it is taken off the downtime limit as `disk_time` is.
    query_time: Millis,
}

/// Auto-converge's throttle ends with the attempt, whatever its end (every path drops the
/// loop), as QEMU's `migration_cleanup` ends it: a guest that runs on here after a
/// failure or `NotConverging` runs at full speed again, and a retry starts from 0.
impl<C: ?Sized, V: Vm + ?Sized, O: Outbound + ?Sized, I: ?Sized> Drop for Loop<'_, C, V, O, I> {
    fn drop(&mut self) {
        if self.throttle > 0 {
            self.vm.set_throttle(0);
        }
    }
}

/// The figures a turn decided on.
#[derive(Debug, Clone, Copy)]
struct Turn {
    estimate: Bytes,
    p: Pending,
    exact: bool,
    /// The threshold `p` was compared with.
    threshold: Bytes,
}

/// Whether an attempt that failed with `e`, after `sections` Section frames went to the
/// channel, may have lost data in flight. Only two failures prove that nothing was: a
/// definite refusal (the destination applied every section up to End before it refused),
/// and a source-side failure (a cancel, a bad parameter) before any section went out. A
/// source-side failure after that proves nothing: a section may still be in a socket
/// buffer when the destination fails on it (or on an earlier one) for its own reasons,
/// while the source's Abort is still accepted by the channel; so may a page resent in that
/// section and since cleared from the pages sent since the last sync. A cut, a timeout, a
/// corrupt stream or an Abort from the destination are in doubt too.
fn in_doubt(e: &MigrationError, sections: u64) -> bool {
    match e {
        MigrationError::DestinationRefused(_) => false,
        MigrationError::Cancelled | MigrationError::InvalidInput(_) => sections > 0,
        _ => true,
    }
}

/// `d` in whole milliseconds, rounded up.
fn millis_up(d: Duration) -> Millis {
    Millis(u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
}

/// What the states wrote to their own storage inside the downtime, summed.
fn disk_stop(states: &[&mut dyn MigrationState]) -> crate::flush::FlushStats {
    let mut total = crate::flush::FlushStats::default();
    for s in states {
        total.accumulate(&s.disk_stop());
    }
    total
}

/// Whether the stall guard counts `now` as progress over `best`.
fn improved(now: Bytes, best: Bytes) -> bool {
    // now < 0.9 × best, in integers.
    u128::from(now.get()) * 10 < u128::from(best.get()) * 9
}

impl<C, V, O, I> Loop<'_, C, V, O, I>
where
    C: Clock + ?Sized,
    V: Vm + ?Sized,
    O: Outbound + ?Sized,
    I: Inbound + ?Sized,
{
    /// The byte threshold of figure `p`: what the wire can carry in the downtime limit
    /// once the fixed switchover cost and the states' disk time are taken off it.
    fn threshold_of(&self, p: Pending) -> Bytes {
        // The control message alone (nothing to send, not even at the stop) at the link's
        // best figure: windows with nothing to send say little of the link, and only its
        // 49 bytes ride on that figure. Not when the caller set the switchover bandwidth.
        let bandwidth = if self.config.avail_switchover_bandwidth.is_none()
            && self.is_idle(p)
            && self.expected < self.link
        {
            self.link
        } else {
            self.expected
        };
        threshold(
            bandwidth,
            self.config.downtime_limit
                - self.config.switchover_cost
                - p.disk_time
                - self.query_time,
        )
    }

    /// Whether `p` holds nothing to send while the VM runs but the control message (and
    /// bytes only the stop sends, [`Pending::stop_only`]).
    fn is_drained(&self, p: Pending) -> bool {
        p.total() - p.stop_only == self.control_cost().total()
    }

    /// Whether `p` is the control message alone: nothing at all to send, not even at the
    /// stop. Only such a figure is held to the link's best figure; bytes only the stop
    /// sends may be a disk log or, for QEMU's baseline stream state, whole bitmaps, which a
    /// stale or burst-inflated figure must not carry.
    fn is_idle(&self, p: Pending) -> bool {
        p.total() == self.control_cost().total()
    }

    /// The stall guard's measure of a figure: its bytes, plus its disk time at the
    /// switchover bandwidth, so that progress on either side counts.
    fn stall_measure(&self, p: Pending) -> Bytes {
        p.total() + self.expected * p.disk_time
    }

    fn gate(&self, p: Pending) -> bool {
        let thr = self.threshold_of(p);
        let postcopy = self.config.postcopy && self.postcopy_requested;
        match self.config.rule {
            Rule::Fixed => fits(p.total(), thr) || (postcopy && fits(p.must_precopy, thr)),
            // QEMU 10.1: `pending_size < threshold_size`.
            #[cfg(feature = "testing")]
            Rule::Qemu101 => p.total() < thr,
        }
    }

    /// The control frames of a switchover: the Switchover frame must precede the start
    /// (both modes); End precedes it in precopy only, so it is counted as `can_postcopy`.
    fn control_cost(&self) -> Pending {
        Pending {
            must_precopy: self
                .out
                .control_cost(&Control::Switchover { postcopy: true }),
            can_postcopy: self.out.control_cost(&Control::End),
            disk_time: Millis(0),
            dest_disk_time: Millis(0),
            stop_only: Bytes(0),
            awaiting_destination: false,
        }
    }

    fn pending(&self, states: &mut [&mut dyn MigrationState], exact: bool) -> Pending {
        let control = self.control_cost();
        states
            .iter_mut()
            .fold(control, |acc, s| acc + s.pending(exact))
    }

    /// Closes the measurement window if it is at least [`BUFFER_DELAY`] long.
    fn update_counters(&mut self) {
        let now = self.clock.now();
        let elapsed = now.saturating_sub(self.window_start);
        if elapsed < BUFFER_DELAY.as_duration() {
            return;
        }
        let sent = self.out.bytes_sent() - self.window_bytes;
        self.windows += 1;
        self.empty_windows += u64::from(sent == Bytes(0));
        // A window in which nothing was sent, and no turn with something left to send was
        // held back by the rate limiter, had nothing to send: it says nothing of the link,
        // and the last measurement stands. Measuring it as 0 would leave a threshold of 0
        // for good once the states have nothing to send while the VM runs: no figure would
        // ever fit, not even the control frames (QEMU completes on a pending figure of 0
        // instead, unchecked). One held back (an earlier burst's bytes used up its
        // allowance) measures 0, as QEMU measures it: keeping the burst's figure would
        // decide more turns on a rate above the limit.
        if sent > Bytes(0) || self.held_back {
            let ms = elapsed.as_nanos() as f64 / 1e6;
            self.bandwidth = BytesPerMs::from_bytes_per_ms(sent.get() as f64 / ms);
            if self.link < self.bandwidth {
                self.link = self.bandwidth;
            }
        }
        self.expected = self
            .config
            .avail_switchover_bandwidth
            .unwrap_or(self.bandwidth);
        // Overshoot beyond this window's allowance is charged to the next.
        self.carry = match self.config.max_bandwidth {
            Some(max) => sent + self.carry - max * Millis(elapsed.as_millis() as u64),
            None => Bytes(0),
        };
        self.window_start = now;
        self.window_bytes = self.out.bytes_sent();
        self.held_back = false;
    }

    /// Bytes the rate limiter still allows in this window.
    fn allowance(&self) -> Bytes {
        match self.config.max_bandwidth {
            Some(max) => {
                max * BUFFER_DELAY - (self.out.bytes_sent() - self.window_bytes) - self.carry
            }
            None => self.config.iterate_chunk,
        }
    }

    /// The switchover this figure decides, if any: `Some(true)` for postcopy,
    /// `Some(false)` for a precopy completion.
    fn decide(&self, p: Pending, exact: bool) -> Option<bool> {
        // A state waits on its destination (the exact query's own flush may have sent a
        // whole write log, which the destination preloads again before it answers).
        if p.awaiting_destination {
            return None;
        }
        let thr = self.threshold_of(p);
        let postcopy = self.config.postcopy && self.postcopy_requested;
        let (to_postcopy, complete) = match self.config.rule {
            Rule::Fixed => (
                exact && postcopy && fits(p.must_precopy, thr),
                exact && fits(p.total(), thr),
            ),
            #[cfg(feature = "testing")]
            Rule::Qemu101 => (postcopy && p.must_precopy <= thr, p.total() <= thr),
        };
        if to_postcopy {
            Some(true)
        } else if complete {
            Some(false)
        } else {
            None
        }
    }

    /// This turn's report, at clock time `at`; an exact figure also updates the dirty
    /// rate's reference point.
    fn report(
        &mut self,
        at: Duration,
        estimate: Bytes,
        p: Pending,
        exact: bool,
    ) -> IterationReport {
        let mut dirty_rate = None;
        if exact {
            self.exact_queries += 1;
            if let Some((t, _)) = self.last_exact {
                let ms = at.saturating_sub(t).as_nanos() as f64 / 1e6;
                if ms > 0.0 {
                    dirty_rate = Some(BytesPerMs::from_bytes_per_ms(
                        (p.total() - estimate).get() as f64 / ms,
                    ));
                }
            }
            self.last_exact = Some((at, p.total()));
        }
        let report = IterationReport {
            iteration: self.iterations,
            at,
            estimate,
            pending: p,
            exact,
            threshold: self.threshold_of(p),
            bandwidth: self.bandwidth,
            link: self.link,
            dirty_rate,
            bytes_sent: self.out.bytes_sent() - self.bytes_start,
            throttle: self.throttle,
            windows: self.windows,
            empty_windows: self.empty_windows,
        };
        self.iterations += 1;
        report
    }

    fn precopy(mut self, states: &mut [&mut dyn MigrationState]) -> Result<Outcome> {
        let mut best: Option<Bytes> = None;
        let mut rounds = 0u32;
        // The dirty-rate guard ([`StallKind::DirtiedAsFastAsSent`]): the period's start
        // (window count, estimate, bytes sent), and the periods in a row dirtied high.
        let mut period: Option<(u64, Bytes, Bytes)> = None;
        let mut dirty_high = 0u32;
        loop {
            // The destination speaks during precopy to give up (an Abort after a corrupt
            // frame, say: stop sending at once) or with a state's news (a shared disk's
            // preload now follows the log: the figure below uses it).
            if let Err(e) = self.poll_precopy(states) {
                return Err(self.fail_running(states, e));
            }
            let windows = self.windows;
            self.update_counters();
            let mut flushed = Bytes(0);
            if self.windows != windows {
                flushed += self.flush_states(states, false)?;
            }
            let mut p = self.pending(states, false);
            let mut exact = false;
            let estimate = p.total();
            // With nothing left to send as of the last sync (bytes only the stop sends do
            // not count: a disk state's last write log), only an exact query can make
            // progress (find what the guest dirtied since), even when the gate is shut: the
            // threshold may be too small for even the control message.
            let drained = self.is_drained(p);
            // While a state waits on its destination's answer, no figure can decide: no
            // exact query either (it would sync and flush at every turn for nothing).
            if !p.awaiting_destination && (self.gate(p) || drained) {
                // A disk state's stop writes what changed since its last flush: flushing
                // here leaves the exact figure (and the stop, if it follows) only what
                // changes from now until the VM stops. (A state with nothing changed
                // since its last flush writes nothing.)
                flushed += self.flush_states(states, true)?;
                let t0 = self.clock.now();
                p = self.pending(states, true);
                self.query_time = millis_up(self.clock.now().saturating_sub(t0));
                exact = true;
            }
            // Nothing between the exact figure and the VM stop but this comparison: the
            // guest keeps writing until `stop`, and whatever it writes goes out in the
            // downtime.
            if let Some(postcopy) = self.decide(p, exact) {
                let turn = Turn {
                    estimate,
                    p,
                    exact,
                    threshold: self.threshold_of(p),
                };
                return if postcopy {
                    self.postcopy(states, turn)
                } else {
                    self.complete(states, turn)
                };
            }

            let now = self.clock.now();
            let report = self.report(now, estimate, p, exact);
            match self.control.on_iteration(&report) {
                Directive::Continue => {}
                Directive::StartPostcopy => self.request_postcopy(states)?,
                Directive::Cancel => {
                    return Err(self.fail_running(states, MigrationError::Cancelled))
                }
            }

            let thr = self.threshold_of(p);
            let measure = self.stall_measure(p);
            let mut stall = None;
            // A turn spent waiting on a destination's answer is no stall of the guest's,
            // and no guard counts it: no exact figure is taken (the stall guard proper),
            // the turn is not idle (below), and the dirty-rate guard starts its periods
            // again (RAM syncs nothing meanwhile, so its figure cannot fall by what goes
            // out, the disk's write log included). The wait has its own bound.
            if !p.awaiting_destination {
                self.awaiting_since = None;
            }
            if p.awaiting_destination {
                period = None;
                dirty_high = 0;
                let since = *self.awaiting_since.get_or_insert(now);
                let waited = now.saturating_sub(since);
                if waited > self.config.answer_timeout {
                    return Err(self.fail_running(
                        states,
                        ProtocolError::NoAnswer {
                            waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                        }
                        .into(),
                    ));
                }
            } else if exact {
                period = None;
                dirty_high = 0;
                match best {
                    Some(b) if !improved(measure, b) => rounds += 1,
                    _ => {
                        best = Some(measure);
                        rounds = 0;
                    }
                }
                if rounds >= self.config.stall_rounds {
                    stall = Some(StallReport {
                        kind: StallKind::NoImprovement,
                        rounds,
                        best: best.unwrap_or(measure),
                        last: measure,
                        threshold: thr,
                        throttle: self.throttle,
                        postcopy_requested: self.postcopy_requested,
                    });
                    rounds = 0;
                    best = Some(measure);
                }
            } else if self.idle_turns >= self.config.stall_rounds
                && now.saturating_sub(self.idle_since)
                    >= BUFFER_DELAY.as_duration() * self.config.stall_rounds
            {
                // No-progress guard: the stall guard proper only counts exact figures,
                // and a loop that neither sends nor syncs would never reach one.
                stall = Some(StallReport {
                    kind: StallKind::NoProgress,
                    rounds: self.idle_turns,
                    best: self.last_exact.map_or(estimate, |(_, b)| b),
                    last: estimate,
                    threshold: thr,
                    throttle: self.throttle,
                    postcopy_requested: self.postcopy_requested,
                });
                self.idle_turns = 0;
            } else {
                let sent_now = self.out.bytes_sent();
                match period {
                    None => period = Some((self.windows, estimate, sent_now)),
                    Some((w0, e0, s0))
                        if self.windows >= w0 + u64::from(self.config.stall_rounds) =>
                    {
                        let sent = sent_now - s0;
                        // What the guest dirtied in the period: what is pending now, less
                        // what was pending at its start and has been sent since.
                        let dirtied = (estimate + sent) - e0;
                        if sent > Bytes(0) && dirtied.get() > sent.get() / 2 {
                            dirty_high += 1;
                        } else {
                            dirty_high = 0;
                        }
                        period = Some((self.windows, estimate, sent_now));
                        if dirty_high >= 2 {
                            stall = Some(StallReport {
                                kind: StallKind::DirtiedAsFastAsSent,
                                rounds: dirty_high,
                                best: e0,
                                last: estimate,
                                threshold: thr,
                                throttle: self.throttle,
                                postcopy_requested: self.postcopy_requested,
                            });
                            dirty_high = 0;
                        }
                    }
                    Some(_) => {}
                }
            }
            if let Some(r) = stall {
                self.stalls += 1;
                match self.control.on_stall(&r) {
                    StallAction::KeepGoing => {}
                    StallAction::Throttle(pct) => {
                        self.throttle = pct.min(99);
                        self.vm.set_throttle(self.throttle);
                    }
                    StallAction::Postcopy => self.request_postcopy(states)?,
                    StallAction::Cancel => {
                        let _ = self.fail_running(states, MigrationError::Cancelled);
                        return Ok(self.outcome(
                            Kind::NotConverging,
                            Turn {
                                estimate,
                                p,
                                exact,
                                threshold: thr,
                            },
                            Pending::default(),
                            Duration::ZERO,
                            Bytes(0),
                            crate::flush::FlushStats::default(),
                        ));
                    }
                }
            }

            let budget = self.allowance().min(self.config.iterate_chunk);
            // Held back: the rate limiter gave no budget while something was left to send
            // (a drained turn with no budget has nothing the limiter holds back).
            self.held_back |=
                budget == Bytes(0) && p.total() - p.stop_only != self.control_cost().total();
            let mut sent = Bytes(0);
            if budget > Bytes(0) {
                for i in 0..states.len() {
                    if sent >= budget {
                        break;
                    }
                    match states[i].iterate(&mut self.out, budget - sent) {
                        Ok(n) => sent += n,
                        Err(e) => return Err(self.fail_running(states, e)),
                    }
                }
            }
            // Progress: a sync or bytes out. A turn the rate limiter held back is neither
            // progress nor idleness (every window allows at least one byte, so it ends),
            // and neither is one that waits on a destination's answer.
            if exact || sent > Bytes(0) || flushed > Bytes(0) || p.awaiting_destination {
                self.idle_turns = 0;
            } else if budget > Bytes(0) {
                if self.idle_turns == 0 {
                    self.idle_since = now;
                }
                self.idle_turns = self.idle_turns.saturating_add(1);
            }
            if sent == Bytes(0) {
                // Rate limited, or nothing to send right now: wait for the window's end
                // (a window that sent nothing keeps the last measurement, unless the rate
                // limiter held it back).
                let deadline = self.window_start + BUFFER_DELAY.as_duration();
                let deadline = deadline.max(self.clock.now() + Duration::from_millis(1));
                self.clock.sleep_until(deadline);
            }
            self.vm.run_until(self.clock.now());
        }
    }

    /// Runs every state's [`flush`](MigrationState::flush) (or, right before an exact
    /// query, its [`flush_before_exact`](MigrationState::flush_before_exact)) while the VM
    /// runs and counts what they wrote; a flush that fails fails the attempt (the VM still
    /// running).
    fn flush_states(
        &mut self,
        states: &mut [&mut dyn MigrationState],
        before_exact: bool,
    ) -> Result<Bytes> {
        let mut flushed = Bytes(0);
        for i in 0..states.len() {
            let r = if before_exact {
                states[i].flush_before_exact()
            } else {
                states[i].flush()
            };
            let r = r.and_then(|n| states[i].after_flush(&mut self.out).map(|_| n));
            match r {
                Ok(n) => flushed += n,
                Err(e) => return Err(self.fail_running(states, e)),
            }
        }
        self.disk_flushed += flushed;
        Ok(flushed)
    }

    /// Waits for the destination's report to every state that asked for one in its setup
    /// ([`MigrationState::awaits_report`]) and hands it over, before anything else is sent.
    /// The destination may work before it answers (a stream disk's walks its image: up to
    /// `PRELOAD_WALK_BUDGET` and an open, more than a short channel timeout), so a receive
    /// that times out is tried again until [`LoopConfig::answer_timeout`] has passed since
    /// the wait began, and then the attempt fails with [`ProtocolError::NoAnswer`]; nothing
    /// is sent meanwhile, and the guest runs.
    fn await_reports(&mut self, states: &mut [&mut dyn MigrationState]) -> Result<()> {
        let mut want: Vec<StateId> = states
            .iter()
            .filter(|s| s.awaits_report())
            .map(|s| s.id())
            .collect();
        let began = self.clock.now();
        while !want.is_empty() {
            let msg = match self.inbound.recv() {
                Err(MigrationError::Io(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    let waited = self.clock.now().saturating_sub(began);
                    if waited < self.config.answer_timeout {
                        continue;
                    }
                    return Err(ProtocolError::NoAnswer {
                        waited_ms: u64::try_from(waited.as_millis()).unwrap_or(u64::MAX),
                    }
                    .into());
                }
                other => other?,
            };
            match msg {
                DestMessage::Report { state, payload } => {
                    let Some(at) = want.iter().position(|&w| w == state) else {
                        // News of a state that asked nothing (a shared disk's preload
                        // answers its BEGIN): the state takes or refuses it.
                        Self::notice(states, state, &payload)?;
                        continue;
                    };
                    want.swap_remove(at);
                    if let Some(s) = states.iter_mut().find(|s| s.id() == state) {
                        s.report(&payload)?;
                    }
                }
                DestMessage::Refused(why) => return Err(MigrationError::DestinationRefused(why)),
                DestMessage::Aborted(why) => return Err(MigrationError::PeerAborted(why)),
                other => return Err(unexpected_before_switchover(&other)),
            }
        }
        Ok(())
    }

    /// Reads everything the destination said during precopy: an Abort, or a state's news
    /// ([`MigrationState::notice`]), which that state takes (the next figure uses it) or
    /// refuses.
    fn poll_precopy(&mut self, states: &mut [&mut dyn MigrationState]) -> Result<()> {
        // At most this many per turn: a destination that keeps talking cannot hold the
        // loop here.
        for _ in 0..MAX_LATE_REPORTS {
            let Some(msg) = self.inbound.try_recv()? else {
                break;
            };
            match msg {
                DestMessage::Aborted(why) => return Err(MigrationError::PeerAborted(why)),
                DestMessage::Report { state, payload } => Self::notice(states, state, &payload)?,
                other => return Err(unexpected_before_switchover(&other)),
            }
        }
        Ok(())
    }

    /// Hands a Report the destination sent unasked to its state.
    fn notice(
        states: &mut [&mut dyn MigrationState],
        state: StateId,
        payload: &[u8],
    ) -> Result<()> {
        match states.iter_mut().find(|s| s.id() == state) {
            Some(s) => s.notice(payload),
            None => Err(ProtocolError::UnexpectedMessage {
                kind: FrameKind::Report,
                when: "for a state this migration does not have",
            }
            .into()),
        }
    }

    fn request_postcopy(&mut self, states: &mut [&mut dyn MigrationState]) -> Result<()> {
        if !self.config.postcopy {
            let e =
                MigrationError::InvalidInput("postcopy requested without the capability".into());
            return Err(self.fail_running(states, e));
        }
        self.postcopy_requested = true;
        Ok(())
    }

    /// Failure with the VM running: tell the destination (best effort: the channel may be
    /// what failed), and every state re-dirties.
    fn fail_running(
        &mut self,
        states: &mut [&mut dyn MigrationState],
        e: MigrationError,
    ) -> MigrationError {
        self.abort_and_redirty(states, &e, |s| s.cancel());
        e
    }

    /// Tells the destination (best effort: the channel may be what failed); then every
    /// state re-dirties what may be lost in flight if the channel is in doubt, and runs
    /// `hook` (`cancel` with the VM running, `resume_source` with it stopped).
    fn abort_and_redirty(
        &mut self,
        states: &mut [&mut dyn MigrationState],
        e: &MigrationError,
        hook: impl Fn(&mut dyn MigrationState),
    ) {
        let told = self
            .out
            .control(&Control::Abort(format!("source: {e}")))
            .is_ok();
        let lost = !told || in_doubt(e, self.out.sections);
        for s in states.iter_mut() {
            if lost {
                s.channel_failed();
            }
            hook(&mut **s);
        }
    }

    /// Failure with the VM stopped, when the destination certainly did not start (the
    /// frame that starts it was never written, or it answered Refused or Abort):
    /// re-dirty, then resume.
    ///
    /// Every state takes back what its stop handed over
    /// ([`MigrationState::reactivate`]) before the VM resumes; if one cannot, or the VM
    /// does not resume, the VM stays stopped: [`MigrationError::SourceNotResumed`].
    fn fail_stopped(
        &mut self,
        states: &mut [&mut dyn MigrationState],
        e: MigrationError,
    ) -> MigrationError {
        self.abort_and_redirty(states, &e, |s| s.resume_source());
        let mut taken_back = Ok(());
        for s in states.iter_mut() {
            if let Err(r) = s.reactivate() {
                taken_back = Err(r);
                break;
            }
        }
        match taken_back.and_then(|()| self.vm.resume()) {
            Ok(()) => e,
            Err(r) => MigrationError::SourceNotResumed {
                cause: Box::new(e),
                resume: Box::new(r),
            },
        }
    }

    /// A switchover that failed: resume the source if the destination certainly did not
    /// start; leave it stopped, states untouched, on [`MigrationError::OutcomeUnknown`].
    fn fail_switchover(
        &mut self,
        states: &mut [&mut dyn MigrationState],
        e: MigrationError,
    ) -> MigrationError {
        match e {
            e @ MigrationError::OutcomeUnknown(_) => e,
            e => self.fail_stopped(states, e),
        }
    }

    fn outcome(
        &self,
        kind: Kind,
        turn: Turn,
        at_stop: Pending,
        downtime: Duration,
        in_downtime: Bytes,
        disk_stop: crate::flush::FlushStats,
    ) -> Outcome {
        Outcome {
            kind,
            downtime,
            bytes_in_downtime: in_downtime,
            pending_at_switch: turn.p,
            pending_at_stop: at_stop,
            exact_at_switch: turn.exact,
            threshold_at_switch: turn.threshold,
            query_time_at_switch: self.query_time,
            total_bytes: self.out.bytes_sent() - self.bytes_start,
            total_time: self.clock.now().saturating_sub(self.start),
            iterations: self.iterations,
            exact_queries: self.exact_queries,
            stalls: self.stalls,
            throttle: self.throttle,
            requests_served: self.requests_served,
            empty_windows: self.empty_windows,
            disk_stop,
            disk_flushed: self.disk_flushed,
        }
    }

    /// Waits for the destination to start, once the frame that starts it was written;
    /// page requests cannot come before it runs. Only Refused and Abort say for certain
    /// that it did not start; no answer (a timeout, a closed or corrupt return path) or a
    /// wrong one is [`MigrationError::OutcomeUnknown`].
    fn await_start(&mut self, states: &[&mut dyn MigrationState]) -> Result<()> {
        let unknown = |e| MigrationError::OutcomeUnknown(Box::new(e));
        // A destination that keeps sending news instead of starting is answered as one
        // that sent anything else: its news are bounded by the sections it read (the
        // reports the states still expect, `reports_outstanding`), and the loop read up to
        // this many at each turn.
        let expected = states
            .iter()
            .fold(0usize, |n, s| n.saturating_add(s.reports_outstanding()));
        let allowed = MAX_LATE_REPORTS
            .saturating_mul(states.len().max(1))
            .saturating_add(expected);
        for _ in 0..allowed {
            return match self.inbound.recv().map_err(unknown)? {
                DestMessage::Started => Ok(()),
                DestMessage::Refused(why) => Err(MigrationError::DestinationRefused(why)),
                DestMessage::Aborted(why) => Err(MigrationError::PeerAborted(why)),
                // A state's news sent before the destination read the switchover (its
                // answer to a precopy section): too late for any figure.
                DestMessage::Report { .. } => continue,
                other => Err(unknown(
                    ProtocolError::UnexpectedMessage {
                        kind: other.kind(),
                        when: "instead of starting",
                    }
                    .into(),
                )),
            };
        }
        Err(unknown(
            ProtocolError::UnexpectedMessage {
                kind: FrameKind::Report,
                when: "again and again instead of starting",
            }
            .into(),
        ))
    }

    /// Stops the VM at the decision. The downtime starts before `stop` is called, as in
    /// QEMU, so the time and bytes stopping takes count in it. Then the exact figure is
    /// taken once more, with the guest stopped: what the guest wrote since the decision's
    /// sync.
    fn stop(
        &mut self,
        states: &mut [&mut dyn MigrationState],
    ) -> Result<(Duration, Bytes, Pending)> {
        let t_stop = self.clock.now();
        let b_stop = self.out.bytes_sent();
        if let Err(e) = self.vm.stop() {
            // The VM may have stopped in part: nothing was handed over yet (no state's
            // stop ran), so it resumes as a running failure's VM does.
            let e = self.fail_running(states, e);
            return Err(match self.vm.resume() {
                Ok(()) => e,
                Err(r) => MigrationError::SourceNotResumed {
                    cause: Box::new(e),
                    resume: Box::new(r),
                },
            });
        }
        self.out.lift_rate_limit();
        for s in states.iter_mut() {
            s.stopped();
        }
        let at_stop = self.pending(states, true);
        Ok((t_stop, b_stop, at_stop))
    }

    /// The report of the turn that switched over, once the attempt is over; its directive
    /// is ignored (the switchover already happened).
    fn report_switch(&mut self, t_stop: Duration, turn: Turn) {
        let report = self.report(t_stop, turn.estimate, turn.p, turn.exact);
        let _ = self.control.on_iteration(&report);
    }

    fn complete(mut self, states: &mut [&mut dyn MigrationState], turn: Turn) -> Result<Outcome> {
        let (t_stop, b_stop, at_stop) = match self.stop(states) {
            Ok(s) => s,
            Err(e) => {
                self.report_switch(self.clock.now(), turn);
                return Err(e);
            }
        };
        let result = (|| {
            self.out.control(&Control::Switchover { postcopy: false })?;
            for s in states.iter_mut() {
                s.complete(&mut self.out)?;
            }
            // End starts the destination: from here on, only its answer tells.
            self.out.control(&Control::End)?;
            self.await_start(states)
        })();
        let downtime = self.clock.now().saturating_sub(t_stop);
        let in_downtime = self.out.bytes_sent() - b_stop;
        if let Err(e) = result {
            let e = self.fail_switchover(states, e);
            self.report_switch(t_stop, turn);
            return Err(e);
        }
        self.report_switch(t_stop, turn);
        let disk = disk_stop(states);
        Ok(self.outcome(Kind::Completed, turn, at_stop, downtime, in_downtime, disk))
    }

    fn postcopy(mut self, states: &mut [&mut dyn MigrationState], turn: Turn) -> Result<Outcome> {
        let (t_stop, b_stop, at_stop) = match self.stop(states) {
            Ok(s) => s,
            Err(e) => {
                self.report_switch(self.clock.now(), turn);
                return Err(e);
            }
        };
        let result = (|| {
            for s in states.iter_mut() {
                s.postcopy_start(&mut self.out)?;
            }
            // Switchover(postcopy) starts the destination.
            self.out.control(&Control::Switchover { postcopy: true })?;
            self.await_start(states)
        })();
        if let Err(e) = result {
            let e = self.fail_switchover(states, e);
            self.report_switch(t_stop, turn);
            return Err(e);
        }
        let downtime = self.clock.now().saturating_sub(t_stop);
        let in_downtime = self.out.bytes_sent() - b_stop;

        // The destination runs the guest: from here on the source cannot resume, and every
        // error says so in its type.
        let served = self.serve_postcopy(states);
        self.report_switch(t_stop, turn);
        served.map_err(|e| MigrationError::AfterStart(Box::new(e)))?;
        let disk = disk_stop(states);
        Ok(self.outcome(Kind::Postcopy, turn, at_stop, downtime, in_downtime, disk))
    }

    /// After a postcopy switch: serves page requests ahead of the background push, then
    /// sends End. Each turn serves requests until `iterate_chunk` bytes went out (the last
    /// request served whole, however many pages it names) before it pushes: a destination
    /// that keeps asking cannot starve the push, which alone ends the migration. With [`LoopConfig::max_postcopy_bandwidth`], the push sends at most that
    /// rate times the time since the destination started, plus one chunk and the one batch
    /// a state may send past its budget; a turn with nothing allowed waits a millisecond
    /// and serves requests again.
    fn serve_postcopy(&mut self, states: &mut [&mut dyn MigrationState]) -> Result<()> {
        let push_start = self.clock.now();
        let mut pushed = Bytes(0);
        loop {
            let mut served = Bytes(0);
            while served < self.config.iterate_chunk {
                let Some(msg) = self.inbound.try_recv()? else {
                    break;
                };
                served += self.handle_postcopy_message(states, msg)?;
            }
            let left = states
                .iter_mut()
                .fold(Pending::default(), |acc, s| acc + s.pending(false));
            if left.total() == Bytes(0) {
                break;
            }
            let chunk = self.config.iterate_chunk;
            let budget = match self.config.max_postcopy_bandwidth {
                Some(max) => {
                    let elapsed = self.clock.now().saturating_sub(push_start);
                    let millis = Millis(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX));
                    ((max * millis + chunk) - pushed).min(chunk)
                }
                None => chunk,
            };
            if budget == Bytes(0) {
                let until = self.clock.now() + Duration::from_millis(1);
                self.clock.sleep_until(until);
                continue;
            }
            let mut sent = Bytes(0);
            for s in states.iter_mut() {
                if sent >= budget {
                    break;
                }
                sent += s.iterate(&mut self.out, budget - sent)?;
            }
            if sent == Bytes(0) {
                return Err(ProtocolError::NoProgress.into());
            }
            pushed += sent;
        }
        // Requests still in flight are for pages already pushed: the destination has
        // them by the time it reads End.
        self.out.control(&Control::End)?;
        Ok(())
    }

    /// Answers one message of the destination after a postcopy switch; the bytes sent.
    fn handle_postcopy_message(
        &mut self,
        states: &mut [&mut dyn MigrationState],
        msg: DestMessage,
    ) -> Result<Bytes> {
        match msg {
            DestMessage::PageRequest { state, payload } => {
                let s = states
                    .iter_mut()
                    .find(|s| s.id() == state)
                    .ok_or(ProtocolError::RequestForUnknownState(state))?;
                let sent = s.serve(&mut self.out, &payload)?;
                self.requests_served += 1;
                Ok(sent)
            }
            DestMessage::Started => Err(ProtocolError::UnexpectedMessage {
                kind: FrameKind::Started,
                when: "after it started",
            }
            .into()),
            DestMessage::Report { .. } => Err(ProtocolError::UnexpectedMessage {
                kind: FrameKind::Report,
                when: "after it started",
            }
            .into()),
            DestMessage::Refused(why) => Err(MigrationError::DestinationRefused(why)),
            DestMessage::Aborted(why) => Err(MigrationError::PeerAborted(why)),
        }
    }
}
