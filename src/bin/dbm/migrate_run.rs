//! One live migration of a guest with real vCPU threads and the real clock, shared by
//! `dbm demo` (its migration part) and `dbm bench migrate` (one point of the sweep).
//!
//! [`migrate`] fills a guest RAM with distinct page contents, starts the vCPU threads
//! ([`Workload`]), runs the precopy loop to a destination and, once the loop returns,
//! compares the destination's RAM with the source's, page by page (CRC32) and byte for
//! byte. The source guest is still stopped then, so its RAM is the RAM at the stop.
//!
//! Lines: the loop's controller turns [`IterationReport`]s into [`Line`]s, one per exact
//! query (a dirty-log sync, QEMU's "dirty sync count") plus, when asked, a progress line
//! every `progress` in between, as polling QEMU's `info migrate` would show.

use std::cell::Cell;
use std::error::Error;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dirty_bitmap::migration::guest::{new_log, SplitMix64};
use dirty_bitmap::migration::sim::{DestModel, Loopback, RAM_ID};
use dirty_bitmap::migration::{
    self, Bytes, BytesPerMs, Controller, DestMessage, Directive, Endpoints, GuestRam, Inbound,
    IterationReport, Kind, LoopConfig, MigrationState, Millis, Outbound, Pattern, Pending,
    RamState, RealClock, SetupMode, StallAction, StallReport, StateId, Vm, Workload,
    WorkloadConfig, PAGE_SIZE,
};
use dirty_bitmap::DirtyBitmap;

type Res<T> = Result<T, Box<dyn Error>>;

/// Page size as u64.
pub const PAGE: u64 = PAGE_SIZE as u64;

/// One migration's parameters.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub ram_bytes: u64,
    /// vCPU threads.
    pub vcpus: usize,
    /// Guest page writes per second, over all vCPUs (each write fills one 4 KiB page).
    pub writes_per_sec: u64,
    /// Where they land.
    pub pattern: Pattern,
    /// The loop's rate limit (`max-bandwidth`), bytes per second.
    pub max_bandwidth: u64,
    /// Downtime limit.
    pub downtime_limit: Millis,
    /// Pages per batch.
    pub batch_pages: usize,
    /// Auto-converge: on a stall, throttle the vCPUs 20 % more (up to 99 %); else give up
    /// on the first stall.
    pub auto_converge: bool,
    /// Give up (cancel) after this long.
    pub time_cap: Option<Duration>,
    /// A progress line at most this often between syncs (`None`: sync lines only).
    pub progress: Option<Duration>,
    /// Seed of the RAM contents and the vCPUs' page choice.
    pub seed: u64,
}

impl Params {
    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.ram_bytes / PAGE
    }
}

/// One `info migrate`-like line.
#[derive(Debug, Clone, Copy)]
pub struct Line {
    /// Time since the migration started.
    pub at: Duration,
    /// Exact queries (dirty-log syncs) so far, this one included.
    pub syncs: u64,
    /// Whether this line is a sync (exact figure) or a progress line (estimate).
    pub exact: bool,
    /// Pending bytes the loop saw (exact or estimate), control message included.
    pub pending: Bytes,
    /// Threshold: bandwidth × downtime limit.
    pub threshold: Bytes,
    /// Last measured bandwidth.
    pub bandwidth: BytesPerMs,
    /// Guest pages dirtied per second: at a sync, the pages the sync found over the time
    /// since the previous sync (or since the start); between syncs, the pages dirty in the
    /// log over the time since the last sync. Distinct pages, as QEMU's dirty-pages-rate.
    /// `None` when that time is under 100 ms.
    pub dirty_pages_per_sec: Option<f64>,
    /// Pages put on the wire so far (a page sent twice counts twice).
    pub pages_sent: u64,
    /// vCPU throttle, percent.
    pub throttle: u8,
}

impl Line {
    /// Expected downtime if the loop switched over now: pending / bandwidth, in ms
    /// (`None` before the first bandwidth measurement).
    pub fn expected_downtime_ms(&self) -> Option<f64> {
        (self.bandwidth.get() > 0.0).then(|| self.pending.get() as f64 / self.bandwidth.get())
    }
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Precopy switchover; the destination runs the guest.
    Converged,
    /// The stall guard reported and the run gave up (no auto-converge, or fully
    /// throttled): the source keeps running.
    Stalled,
    /// Cancelled at the time cap: the source keeps running.
    TimeCap,
    /// The loop failed; its error.
    Failed(String),
}

/// What one migration did.
#[derive(Debug, Clone)]
pub struct Run {
    /// The parameters.
    pub params: Params,
    /// How it ended.
    pub end: End,
    /// The lines, in order.
    pub lines: Vec<Line>,
    /// Loop turns.
    pub iterations: u64,
    /// Exact queries (syncs).
    pub syncs: u64,
    /// Downtime (VM stop to the destination's `Started`), for a switchover.
    pub downtime: Option<Duration>,
    /// Bytes sent during the downtime, for a switchover.
    pub bytes_in_downtime: Option<Bytes>,
    /// Pending figure and threshold the switchover was decided on.
    pub switch: Option<(Pending, Bytes)>,
    /// From the start of the loop to its end.
    pub total_time: Duration,
    /// Bytes on the wire.
    pub bytes_sent: Bytes,
    /// Pages sent, resends included.
    pub pages_sent: u64,
    /// Guest page writes during the migration.
    pub guest_writes: u64,
    /// Final vCPU throttle, percent.
    pub throttle: u8,
    /// For a switchover: pages compared, and whether every page of the destination equals
    /// the source's at the stop (CRC32 per page and a full compare).
    pub verified: Option<(u64, bool)>,
    /// The transport: what carried the stream.
    pub transport: &'static str,
}

impl Run {
    /// Pages sent more than once: everything beyond the first full pass.
    pub fn pages_resent(&self) -> u64 {
        self.pages_sent.saturating_sub(self.params.pages())
    }

    /// Whether the run switched over.
    pub fn converged(&self) -> bool {
        self.end == End::Converged
    }
}

/// A [`MigrationState`] that forwards to the RAM state and publishes its counters to the
/// controller (the loop holds the state mutably while it calls the controller).
struct Counted<'a> {
    ram: &'a mut RamState,
    pages_sent: Rc<Cell<u64>>,
    syncs: Rc<Cell<(u64, u64)>>,
}

impl Counted<'_> {
    fn publish(&self) {
        let s = self.ram.stats();
        self.pages_sent.set(s.pages_sent);
        self.syncs.set((s.syncs, s.dirty_at_last_sync));
    }
}

impl MigrationState for Counted<'_> {
    fn id(&self) -> StateId {
        self.ram.id()
    }
    fn name(&self) -> &str {
        self.ram.name()
    }
    fn setup(&mut self, out: &mut dyn Outbound) -> migration::Result<Bytes> {
        let r = self.ram.setup(out);
        self.publish();
        r
    }
    fn pending(&mut self, exact: bool) -> Pending {
        let r = self.ram.pending(exact);
        self.publish();
        r
    }
    fn iterate(&mut self, out: &mut dyn Outbound, budget: Bytes) -> migration::Result<Bytes> {
        let r = self.ram.iterate(out, budget);
        self.publish();
        r
    }
    fn complete(&mut self, out: &mut dyn Outbound) -> migration::Result<Bytes> {
        let r = self.ram.complete(out);
        self.publish();
        r
    }
    fn postcopy_start(&mut self, out: &mut dyn Outbound) -> migration::Result<Bytes> {
        let r = self.ram.postcopy_start(out);
        self.publish();
        r
    }
    fn serve(
        &mut self,
        out: &mut dyn Outbound,
        offset: u64,
        len: u64,
    ) -> migration::Result<Bytes> {
        let r = self.ram.serve(out, offset, len);
        self.publish();
        r
    }
    fn cancel(&mut self) {
        self.ram.cancel();
        self.publish();
    }
    fn resume_source(&mut self) {
        self.ram.resume_source();
        self.publish();
    }
}

/// The controller: lines, the time cap, and the stall policy.
struct Watch<'a> {
    params: Params,
    log: Arc<DirtyBitmap>,
    pages_sent: Rc<Cell<u64>>,
    syncs: Rc<Cell<(u64, u64)>>,
    /// Time of the previous sync (the loop's clock), for the dirty rate.
    last_sync: Duration,
    last_line: Option<Duration>,
    lines: Vec<Line>,
    on_line: &'a mut dyn FnMut(&Line),
    stalled: bool,
    capped: bool,
    start: Instant,
    /// Loop turns seen (the loop's own count is lost when it returns an error).
    turns: u64,
}

impl Controller for Watch<'_> {
    fn on_iteration(&mut self, r: &IterationReport) -> Directive {
        self.turns += 1;
        let (syncs, found) = self.syncs.get();
        let since = r.at.saturating_sub(self.last_sync).as_secs_f64();
        // Over less than a measurement window the figure is noise.
        let rate = |pages: u64| {
            (since >= 0.1).then(|| pages as f64 / since)
        };
        let due = match (self.params.progress, self.last_line) {
            (Some(_), None) => true,
            (Some(every), Some(t)) => r.at >= t + every,
            (None, _) => false,
        };
        if r.exact || due {
            let line = Line {
                at: r.at,
                syncs,
                exact: r.exact,
                pending: if r.exact { r.pending.total() } else { r.estimate },
                threshold: r.threshold,
                bandwidth: r.bandwidth,
                dirty_pages_per_sec: if r.exact {
                    rate(found)
                } else {
                    rate(self.log.count())
                },
                pages_sent: self.pages_sent.get(),
                throttle: r.throttle,
            };
            if r.exact {
                self.last_sync = r.at;
            }
            self.last_line = Some(r.at);
            (self.on_line)(&line);
            self.lines.push(line);
        }
        if self
            .params
            .time_cap
            .is_some_and(|cap| self.start.elapsed() >= cap)
        {
            self.capped = true;
            return Directive::Cancel;
        }
        Directive::Continue
    }

    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        if self.params.auto_converge && r.throttle < 99 {
            StallAction::Throttle(r.throttle.saturating_add(20).min(99))
        } else {
            self.stalled = true;
            StallAction::Cancel
        }
    }
}

/// Runs one migration with `params`, calling `on_line` for every line as it happens.
///
/// # Errors
/// Bad parameters (RAM size, vCPUs, batch), a mapping or thread that cannot be created.
/// A migration that fails or gives up is not an error: see [`Run::end`].
pub fn migrate(params: &Params, on_line: &mut dyn FnMut(&Line)) -> Res<Run> {
    if params.ram_bytes == 0 || params.ram_bytes % PAGE != 0 {
        return Err(format!(
            "guest RAM of {} bytes is not a positive multiple of 4 KiB",
            params.ram_bytes
        )
        .into());
    }
    if params.max_bandwidth == 0 {
        return Err("the bandwidth must be at least 1 byte/s".into());
    }
    let pages = params.pages();
    let ram = Arc::new(GuestRam::new(pages)?);
    let log = Arc::new(new_log(&ram)?);
    // Distinct contents, so that a page the destination missed shows.
    let mut init = SplitMix64::new(params.seed ^ 0x1417);
    for p in 0..pages {
        ram.fill_page(p, init.next_u64());
    }
    let mut vm = Workload::start(
        Arc::clone(&ram),
        Arc::clone(&log),
        WorkloadConfig {
            vcpus: params.vcpus,
            writes_per_sec: params.writes_per_sec,
            pattern: params.pattern,
            seed: params.seed,
        },
    )?;
    let mut state = RamState::new(
        RAM_ID,
        Arc::clone(&ram),
        Arc::clone(&log),
        SetupMode::Full,
        false,
        params.batch_pages,
    )?;
    let config = LoopConfig {
        downtime_limit: params.downtime_limit,
        max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(params.max_bandwidth)),
        iterate_chunk: Bytes((params.batch_pages as u64 * PAGE * 4).max(1 << 20)),
        ..LoopConfig::default()
    };
    let pages_sent = Rc::new(Cell::new(0));
    let syncs = Rc::new(Cell::new((0, 0)));
    let mut watch = Watch {
        params: *params,
        log: Arc::clone(&log),
        pages_sent: Rc::clone(&pages_sent),
        syncs: Rc::clone(&syncs),
        last_sync: Duration::ZERO,
        last_line: None,
        lines: Vec::new(),
        on_line,
        stalled: false,
        capped: false,
        start: Instant::now(),
        turns: 0,
    };
    let writes_before = vm.writes();
    let mut counted = Counted {
        ram: &mut state,
        pages_sent: Rc::clone(&pages_sent),
        syncs: Rc::clone(&syncs),
    };

    // The transport: an in-process link into a destination model.
    let mut link = Loopback::new(DestModel::new(RAM_ID, pages, params.seed));
    let transport = "in-process loopback";
    let mut clock = RealClock::new();
    let started = Instant::now();
    let result = {
        let cell = std::cell::RefCell::new(&mut link);
        let mut out = LinkOut(&cell);
        let mut inbound = LinkIn(&cell);
        migration::run(
            &config,
            Endpoints {
                clock: &mut clock,
                vm: &mut vm,
                out: &mut out,
                inbound: &mut inbound,
            },
            &mut [&mut counted as &mut dyn MigrationState],
            &mut watch,
        )
    };
    let wall = started.elapsed();
    let guest_writes = vm.writes() - writes_before;
    let (syncs_done, _) = syncs.get();
    let mut run = Run {
        params: *params,
        end: End::Failed(String::new()),
        lines: std::mem::take(&mut watch.lines),
        iterations: 0,
        syncs: syncs_done,
        downtime: None,
        bytes_in_downtime: None,
        switch: None,
        total_time: wall,
        bytes_sent: link.bytes_sent(),
        pages_sent: pages_sent.get(),
        guest_writes,
        throttle: 0,
        verified: None,
        transport,
    };
    match result {
        Ok(o) => {
            run.iterations = o.iterations;
            run.total_time = o.total_time;
            run.throttle = o.throttle;
            match o.kind {
                Kind::Completed | Kind::Postcopy => {
                    run.end = End::Converged;
                    run.downtime = Some(o.downtime);
                    run.bytes_in_downtime = Some(o.bytes_in_downtime);
                    run.switch = Some((o.pending_at_switch, o.threshold_at_switch));
                    // The source is stopped: its RAM is the RAM at the stop.
                    run.verified = Some((pages, same_ram(&ram, link.dest.ram())));
                    vm.resume()?;
                }
                Kind::NotConverging => run.end = End::Stalled,
            }
        }
        Err(e) => {
            run.end = if watch.capped {
                End::TimeCap
            } else if watch.stalled {
                End::Stalled
            } else {
                End::Failed(e.to_string())
            };
            run.iterations = watch.turns;
        }
    }
    vm.shutdown();
    Ok(run)
}

/// Whether `dest` holds exactly the pages of `ram`: CRC32 per page, then every byte.
fn same_ram(ram: &GuestRam, dest: &[u8]) -> bool {
    if dest.len() as u64 != ram.size() {
        return false;
    }
    let mut page = vec![0u8; PAGE_SIZE];
    dest.chunks_exact(PAGE_SIZE).enumerate().all(|(p, d)| {
        ram.read_page(p as u64, &mut page);
        crc32fast::hash(&page) == crc32fast::hash(d) && page == d
    })
}

/// The loopback's sending half (the loop takes its two ends as separate borrows).
struct LinkOut<'a, 'b>(&'a std::cell::RefCell<&'b mut Loopback>);
/// The loopback's receiving half.
struct LinkIn<'a, 'b>(&'a std::cell::RefCell<&'b mut Loopback>);

impl Outbound for LinkOut<'_, '_> {
    fn send(&mut self, state: StateId, payload: &[u8]) -> migration::Result<Bytes> {
        self.0.borrow_mut().send(state, payload)
    }
    fn bytes_sent(&self) -> Bytes {
        self.0.borrow().bytes_sent()
    }
}

impl Inbound for LinkIn<'_, '_> {
    fn try_recv(&mut self) -> migration::Result<Option<DestMessage>> {
        self.0.borrow_mut().try_recv()
    }
    fn recv(&mut self) -> migration::Result<DestMessage> {
        self.0.borrow_mut().recv()
    }
}

/// `1.5 GiB`-style size.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Bytes per ms as MiB/s.
pub fn mib_s(rate: BytesPerMs) -> f64 {
    rate.get() * 1000.0 / (1 << 20) as f64
}

/// The header of the [`Line`] table.
pub fn line_header() -> String {
    format!(
        "{:>8} {:>4} {:>5} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>8}",
        "time ms",
        "sync",
        "",
        "pending",
        "threshold",
        "bandwidth",
        "dirty rate",
        "exp. down",
        "pages sent",
        "throttle"
    )
}

/// One [`Line`] under [`line_header`]: `exact` for a sync, `est.` for a progress line;
/// rates in MiB/s, the expected downtime in ms.
pub fn format_line(l: &Line) -> String {
    let down = l
        .expected_downtime_ms()
        .map_or_else(|| "-".to_string(), |ms| format!("{ms:.0} ms"));
    format!(
        "{:>8.0} {:>4} {:>5} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10} {:>7} %",
        l.at.as_secs_f64() * 1000.0,
        l.syncs,
        if l.exact { "exact" } else { "est." },
        human(l.pending.get()),
        human(l.threshold.get()),
        format!("{:.1} MiB/s", mib_s(l.bandwidth)),
        l.dirty_pages_per_sec.map_or_else(
            || "-".to_string(),
            |r| format!("{:.1} MiB/s", r * PAGE as f64 / (1 << 20) as f64)
        ),
        down,
        l.pages_sent,
        l.throttle
    )
}

/// The load average (1, 5, 15 min) from `/proc/loadavg` ("unknown" elsewhere).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// CPU model, CPU count and kernel, as far as `/proc` tells.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "{cpu}, {} CPUs, kernel {kernel}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}
