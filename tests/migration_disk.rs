//! Disk bitmaps inside the migration loop, shared-storage mode: the store is flushed during
//! precopy, its stop time is counted in the downtime, and no mark is lost when a hand-over
//! fails. Judged with QEMU's tools where the disk is concerned.

mod common;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::qemu::{assert_qemu_clean, qemu_bitmaps};
use dirty_bitmap::migration::guest::{new_log, Vm};
use dirty_bitmap::migration::sim::{DestModel, Loopback, Sim};
use dirty_bitmap::migration::{
    run, AutoConverge, Bytes, BytesPerMs, Clock, Control, Controller, DestMessage, Endpoints,
    GuestRam, Inbound, Kind, LoopConfig, MigrationError, MigrationState, Millis, Outbound, Pattern,
    Pending, RamState, RealClock, SetupMode, SharedDiskState, StallAction, StallReport, StateId,
    Workload, WorkloadConfig, RAM_ID,
};
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, OpenMode, Recording, SharedStore};

const GIB: u64 = 1 << 30;
const DISK: u64 = 64 * GIB;
const DISK_ID: StateId = 2;

// ---------------------------------------------------------------------------------------
// The switchover rule with a disk stop time, under the virtual clock.

/// A disk state whose stop takes `stop` of virtual time and sends nothing: what the loop
/// sees of a [`SharedDiskState`], with the disk under the simulation's clock. It claims
/// `log` bytes for its last write log (sent only at the stop), and cannot time its stop
/// before virtual time `timed_from` (no disk measurement yet).
struct VirtualDisk {
    sim: Sim,
    stop: Millis,
    log: Bytes,
    timed_from: Duration,
    completed: bool,
}

impl VirtualDisk {
    fn new(sim: &Sim, stop: Millis, log: Bytes, timed_from: Duration) -> VirtualDisk {
        VirtualDisk {
            sim: sim.clone(),
            stop,
            log,
            timed_from,
            completed: false,
        }
    }
}

/// A guest of `pages` pages (each filled with its own contents if `filled`, else zero)
/// dirtying `rate` pages per ms over a 2,000 B/ms link under the virtual clock (`seed`),
/// and its RAM state (able to switch to postcopy if `postcopy`).
fn sim_guest(pages: u64, filled: bool, rate: f64, postcopy: bool, seed: u64) -> (Sim, RamState) {
    let ram = Arc::new(GuestRam::new(pages).unwrap());
    if filled {
        for p in 0..pages {
            ram.fill_page(p, 0x5EED ^ p);
        }
    }
    let log = Arc::new(new_log(&ram).unwrap());
    let sim = Sim::new(
        Arc::clone(&ram),
        Arc::clone(&log),
        rate,
        Pattern::Uniform,
        BytesPerMs::from_bytes_per_ms(2000.0),
        seed,
    );
    let state = RamState::new(RAM_ID, ram, log, SetupMode::Full, postcopy, 8).unwrap();
    (sim, state)
}

impl MigrationState for VirtualDisk {
    fn id(&self) -> StateId {
        DISK_ID
    }
    fn name(&self) -> &str {
        "disk"
    }
    fn setup(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn pending(&mut self, _exact: bool) -> Pending {
        if self.completed {
            return Pending::default();
        }
        Pending {
            must_precopy: self.log,
            stop_only: self.log,
            disk_time: if self.sim.now() < self.timed_from {
                Millis::MAX
            } else {
                self.stop
            },
            ..Pending::default()
        }
    }
    fn iterate(
        &mut self,
        _: &mut dyn Outbound,
        _: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn complete(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        let until = self.sim.now() + self.stop.as_duration();
        self.sim.sleep_until(until);
        self.completed = true;
        Ok(Bytes(0))
    }
    fn cancel(&mut self) {}
    fn resume_source(&mut self) {}
}

struct GiveUpAfter(u32);

impl Controller for GiveUpAfter {
    fn on_stall(&mut self, _: &StallReport) -> StallAction {
        self.0 = self.0.saturating_sub(1);
        if self.0 == 0 {
            StallAction::Cancel
        } else {
            StallAction::KeepGoing
        }
    }
}

/// [`run`] under `sim`'s virtual clock, link and VM.
fn run_in_sim(
    sim: &Sim,
    cfg: &LoopConfig,
    states: &mut [&mut dyn MigrationState],
    control: &mut dyn Controller,
) -> dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome> {
    let (mut c, mut v, mut o, mut i) = (sim.clone(), sim.clone(), sim.clone(), sim.clone());
    run(
        cfg,
        Endpoints {
            clock: &mut c,
            vm: &mut v,
            out: &mut o,
            inbound: &mut i,
        },
        states,
        control,
    )
}

/// One simulated migration of a 256-page guest dirtying `rate` pages per ms over a link of
/// 1 MB/s-ish, with a disk state whose stop takes `stop`.
fn simulate(
    stop: Millis,
    rate: f64,
) -> (
    dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome>,
    Sim,
) {
    simulate_with(stop, Bytes(0), Duration::ZERO, rate)
}

/// RAM and a virtual disk under `sim`, a downtime limit of 300 ms, `max_bandwidth`, giving
/// up at the third stall.
fn run_beside_disk(
    sim: &Sim,
    ram: &mut RamState,
    disk: &mut VirtualDisk,
    max_bandwidth: Option<BytesPerMs>,
) -> dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome> {
    let cfg = LoopConfig {
        downtime_limit: Millis(300),
        max_bandwidth,
        ..LoopConfig::default()
    };
    run_in_sim(
        sim,
        &cfg,
        &mut [ram as &mut dyn MigrationState, disk],
        &mut GiveUpAfter(3),
    )
}

/// [`simulate`], with a disk state that claims `last_log` bytes for its last write log and
/// times its stop from virtual time `timed_from` on.
fn simulate_with(
    stop: Millis,
    last_log: Bytes,
    timed_from: Duration,
    rate: f64,
) -> (
    dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome>,
    Sim,
) {
    let (sim, mut state) = sim_guest(256, false, rate, false, 7);
    let mut disk = VirtualDisk::new(&sim, stop, last_log, timed_from);
    let r = run_beside_disk(&sim, &mut state, &mut disk, None);
    (r, sim)
}

#[test]
fn the_disk_stop_time_comes_off_the_limit_and_the_downtime_includes_it() {
    for stop in [0u64, 50, 150, 250] {
        let (r, sim) = simulate(Millis(stop), 0.05);
        let o = r.unwrap();
        assert_eq!(o.kind, Kind::Completed, "stop {stop} ms");
        assert_eq!(o.pending_at_switch.disk_time, Millis(stop));
        assert!(o.exact_at_switch);
        // The threshold the network pending was held to is the link's bytes in what is
        // left of the limit once the disk took its part.
        let link = sim.link_bw().get();
        let left = (300 - stop) as f64;
        assert!(
            o.threshold_at_switch.get() as f64 <= link * left,
            "stop {stop}: threshold {} over {link} B/ms × {left} ms",
            o.threshold_at_switch
        );
        assert!(o.pending_at_switch.total() <= o.threshold_at_switch);
        // The downtime counts the disk's stop and stays within the limit.
        assert!(
            o.downtime >= Duration::from_millis(stop),
            "stop {stop}: {o:?}"
        );
        assert!(
            o.downtime <= Duration::from_millis(300),
            "stop {stop}: {o:?}"
        );
    }
}

#[test]
fn a_disk_stop_that_takes_the_whole_limit_never_switches_over() {
    // Equal to the limit: nothing is left for the network, not even the control frames.
    // Above it: the same. The loop reports stalls and the controller gives up.
    for stop in [300u64, 301, 10_000] {
        let (r, sim) = simulate(Millis(stop), 0.05);
        let o = r.unwrap();
        assert_eq!(o.kind, Kind::NotConverging, "stop {stop} ms");
        assert!(sim.guest_running(), "the source must keep running");
        assert_eq!(o.downtime, Duration::ZERO);
    }
}

/// A low rate limit with RAM batches larger than a window's allowance: after RAM's last
/// batch the carried-over bytes hold the next windows back with nothing left to send. Found
/// by a review: those windows measured 0, and every empty window after them kept that 0, so
/// once the disk's stop could be timed no figure fitted (the liveness failure above, back
/// under a rate limit). A window counts as held back only when something was left to send.
#[test]
fn windows_held_back_with_nothing_to_send_keep_the_links_last_measurement() {
    let (sim, mut state) = sim_guest(16, true, 0.0, false, 7);
    let mut disk = VirtualDisk::new(
        &sim,
        Millis(50),
        Bytes(6 << 10),
        Duration::from_millis(1000),
    );
    // 10 KB a window; a batch of 8 pages is about 33 KB.
    let limit = BytesPerMs::from_bytes_per_ms(100.0);
    let o = run_beside_disk(&sim, &mut state, &mut disk, Some(limit)).unwrap();
    assert_eq!(o.kind, Kind::Completed, "{o:?}");
    assert!(o.threshold_at_switch > Bytes(0), "{o:?}");
    assert!(o.empty_windows > 0, "no window went by empty: {o:?}");
    assert!(o.downtime <= Duration::from_millis(300), "{o:?}");
}

/// `AutoConverge` with postcopy: once fully throttled, asking for postcopy at every stall
/// would run the loop for good when a disk stop takes the whole limit, as the switch to
/// postcopy never fits either. It gives up at the first stall after its request. (A cap on
/// the stalls ends the run here should it not give up.)
#[test]
fn auto_converge_gives_up_when_even_the_postcopy_switch_cannot_fit() {
    struct Capped {
        inner: AutoConverge,
        stalls: u32,
        gave_up: bool,
    }
    impl Controller for Capped {
        fn on_stall(&mut self, r: &StallReport) -> StallAction {
            self.stalls += 1;
            let a = self.inner.on_stall(r);
            self.gave_up |= a == StallAction::Cancel;
            if self.stalls >= 40 {
                return StallAction::Cancel;
            }
            a
        }
    }
    let (sim, mut state) = sim_guest(256, false, 0.05, true, 7);
    let mut disk = VirtualDisk::new(&sim, Millis(300), Bytes(0), Duration::ZERO);
    let cfg = LoopConfig {
        downtime_limit: Millis(300),
        max_bandwidth: None,
        postcopy: true,
        ..LoopConfig::default()
    };
    let mut control = Capped {
        inner: AutoConverge {
            postcopy: true,
            ..AutoConverge::default()
        },
        stalls: 0,
        gave_up: false,
    };
    let r = run_in_sim(
        &sim,
        &cfg,
        &mut [&mut state as &mut dyn MigrationState, &mut disk],
        &mut control,
    );
    assert_eq!(r.unwrap().kind, Kind::NotConverging);
    assert!(
        control.gave_up,
        "AutoConverge never gave up ({} stalls)",
        control.stalls
    );
    assert!(sim.guest_running(), "the source must keep running");
}

/// A shared-storage disk state's last write log goes out only at the stop: it is in every
/// figure, but nothing sends it while the VM runs. Here the disk's stop cannot be timed
/// until a while after RAM sent everything as of its last sync, in a first pass that
/// carried little (its pages were zero): the link's measurement, and so the threshold, is
/// below the log, and only an exact query can find what the guest dirtied since. The loop
/// runs one, sends what it found (which measures the link again), and switches over, where
/// a loop that took the log for something left to send waited, sending nothing, until it
/// gave up.
#[test]
fn a_disk_states_last_log_does_not_keep_a_drained_ram_from_its_exact_query() {
    let (r, sim) = simulate_with(
        Millis(50),
        Bytes(12 << 10),
        Duration::from_millis(300),
        0.05,
    );
    let o = r.unwrap();
    assert_eq!(o.kind, Kind::Completed, "{o:?}");
    assert!(o.exact_at_switch);
    assert!(
        o.downtime <= Duration::from_millis(300),
        "over the limit: {o:?}"
    );
    assert!(!sim.guest_running());
}

/// The same with an idle guest. Its RAM goes out whole in the first pass, and after it
/// every window goes by empty; measuring the link at 0 in each, no figure would fit once
/// the disk's stop can be timed (the last log is in every one), and the loop would give up.
/// A window in which nothing was sent says nothing of the link: it keeps the last
/// measurement, and the loop switches over.
#[test]
fn windows_that_went_by_empty_keep_the_links_last_measurement() {
    let (r, sim) = simulate_with(Millis(50), Bytes(6 << 10), Duration::from_millis(1000), 0.0);
    let o = r.unwrap();
    assert_eq!(o.kind, Kind::Completed, "{o:?}");
    assert!(o.empty_windows > 0, "no window went by empty: {o:?}");
    assert!(o.threshold_at_switch > Bytes(0), "{o:?}");
    assert!(
        o.downtime <= Duration::from_millis(300),
        "over the limit: {o:?}"
    );
    assert!(!sim.guest_running());
}

/// Bytes only the stop sends are never held to the link's best figure, only the control
/// message alone is: a first version compared every drained figure (the control message and
/// such bytes) at it, and a review found that QEMU's baseline stream state counts its whole
/// bitmaps as such bytes, which a carried figure from a faster attempt (or a window inflated
/// by a burst) would then switch over a link that cannot send them within the limit. Here
/// the guest is idle, its RAM goes out, and a disk state's last log of 580 KB waits for the
/// stop; the attempt carries a figure ten times the link's 2000 bytes/ms, under which the
/// log would fit 300 ms: every figure that holds it is compared at the last measurement,
/// and the attempt does not switch over on the carried figure.
#[test]
fn bytes_only_the_stop_sends_are_never_held_to_a_carried_link_figure() {
    const LOG: u64 = 580_000;
    let (sim, mut state) = sim_guest(240, true, 0.0, false, 9);
    // The disk's stop cannot be timed before 800 ms: RAM is long drained by then.
    let mut disk = VirtualDisk::new(&sim, Millis(0), Bytes(LOG), Duration::from_millis(800));
    let mut rec = Reports(Vec::new());
    // Turns of 8 pages (about 16 ms at the link): the pass ends partway through a window.
    let cfg = LoopConfig {
        downtime_limit: Millis(300),
        max_bandwidth: None,
        iterate_chunk: Bytes(8 * 4096),
        link_estimate: Some(BytesPerMs::from_bytes_per_ms(20_000.0)),
        ..LoopConfig::default()
    };
    let o = run_in_sim(
        &sim,
        &cfg,
        &mut [&mut state as &mut dyn MigrationState, &mut disk],
        &mut rec,
    )
    .unwrap();
    let holding_the_log: Vec<_> = rec
        .0
        .iter()
        .filter(|r| r.pending.stop_only == Bytes(LOG))
        .collect();
    assert!(!holding_the_log.is_empty());
    for r in holding_the_log {
        assert!(
            r.threshold.get() as f64 <= r.bandwidth.get() * 300.0 + 1.0,
            "a figure holding the log compared at more than the last measurement: {r:?}"
        );
    }
    // The link's 2000 bytes/ms fit the log in 290 ms; the window the pass ended in measured
    // a fraction of that, which does not: the attempt gives up rather than trust more.
    assert_eq!(o.kind, Kind::NotConverging, "{o:?}");
}

/// Every report; on a stall, gives up.
struct Reports(Vec<dirty_bitmap::migration::IterationReport>);

impl Controller for Reports {
    fn on_iteration(
        &mut self,
        r: &dirty_bitmap::migration::IterationReport,
    ) -> dirty_bitmap::migration::Directive {
        self.0.push(*r);
        dirty_bitmap::migration::Directive::Continue
    }
    fn on_stall(&mut self, _: &StallReport) -> StallAction {
        StallAction::Cancel
    }
}

/// A state that claims `claim` bytes pending for the wire and sends none (the sim's
/// destination has no handler for its sections): the decision alone is under test.
struct Claims(Bytes);

impl MigrationState for Claims {
    fn id(&self) -> StateId {
        3
    }
    fn name(&self) -> &str {
        "claims"
    }
    fn setup(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn pending(&mut self, _: bool) -> Pending {
        Pending {
            must_precopy: self.0,
            ..Pending::default()
        }
    }
    fn iterate(
        &mut self,
        _: &mut dyn Outbound,
        _: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn complete(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn cancel(&mut self) {}
    fn resume_source(&mut self) {}
}

/// The edge: network pending exactly `bandwidth × (limit − switchover cost − disk time)`
/// switches over (the one `≤`), one byte more does not, on the gate and the decision alike.
#[test]
fn network_pending_equal_to_what_the_disk_leaves_switches_one_byte_more_does_not() {
    let bw = 1000u64; // bytes per ms
    let limit = 300u64;
    let cost = 20u64;
    for disk in [0u64, 1, 100, 279] {
        for extra in [0u64, 1] {
            let pages = 4;
            let ram = Arc::new(GuestRam::new(pages).unwrap());
            let log = Arc::new(new_log(&ram).unwrap());
            let link = BytesPerMs::from_bytes_per_ms(bw as f64);
            let sim = Sim::new(
                Arc::clone(&ram),
                Arc::clone(&log),
                0.0,
                Pattern::Uniform,
                link,
                3,
            );
            // RAM that nobody writes: after its first pass it has nothing pending.
            let mut ram = RamState::new(RAM_ID, ram, log, SetupMode::Full, false, 8).unwrap();
            let control = sim.control_cost(&Control::Switchover { postcopy: true })
                + sim.control_cost(&Control::End);
            let budget = bw * (limit - cost - disk);
            let claim = Bytes(budget + extra).saturating_sub(control);
            let mut net = Claims(claim);
            let mut d = VirtualDisk::new(&sim, Millis(disk), Bytes(0), Duration::ZERO);
            let cfg = LoopConfig {
                downtime_limit: Millis(limit),
                switchover_cost: Millis(cost),
                avail_switchover_bandwidth: Some(link),
                max_bandwidth: None,
                ..LoopConfig::default()
            };
            let r = run_in_sim(
                &sim,
                &cfg,
                &mut [&mut ram as &mut dyn MigrationState, &mut net, &mut d],
                &mut GiveUpAfter(2),
            )
            .unwrap();
            let want = if extra == 0 {
                Kind::Completed
            } else {
                Kind::NotConverging
            };
            assert_eq!(r.kind, want, "disk {disk} ms, pending budget + {extra}");
            if extra == 0 {
                assert_eq!(r.threshold_at_switch, Bytes(budget));
                assert_eq!(r.pending_at_switch.total(), Bytes(budget));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// A real store on a file, real vCPU threads and a disk writer marking throughout.

/// The guest: vCPUs writing RAM and a disk writer ([`DiskWriter`]) marking the image's
/// bitmaps, 20,000 writes a second; stopping it stops both and drains the disk write in
/// flight, as the `Vm` contract asks.
struct Guest {
    vcpus: Workload,
    disk: DiskWriter,
}

impl Vm for Guest {
    fn stop(&mut self) -> dirty_bitmap::migration::Result<()> {
        DiskGuest {
            vcpus: &mut self.vcpus,
            disk: Some(&self.disk),
        }
        .stop()
    }
    fn resume(&mut self) -> dirty_bitmap::migration::Result<()> {
        DiskGuest {
            vcpus: &mut self.vcpus,
            disk: Some(&self.disk),
        }
        .resume()
    }
    fn set_throttle(&mut self, percent: u8) {
        self.vcpus.set_throttle(percent);
    }
    fn run_until(&mut self, now: Duration) {
        self.vcpus.run_until(now);
    }
}

struct LinkOut<'a, 'b>(&'a RefCell<&'b mut Loopback>);
struct LinkIn<'a, 'b>(&'a RefCell<&'b mut Loopback>);

impl Outbound for LinkOut<'_, '_> {
    fn send(&mut self, state: StateId, payload: &[u8]) -> dirty_bitmap::migration::Result<Bytes> {
        self.0.borrow_mut().send(state, payload)
    }
    fn control(&mut self, msg: &Control) -> dirty_bitmap::migration::Result<Bytes> {
        self.0.borrow_mut().control(msg)
    }
    fn lift_rate_limit(&mut self) {
        self.0.borrow_mut().lift_rate_limit();
    }
    fn section_overhead(&self) -> Bytes {
        self.0.borrow().section_overhead()
    }
    fn control_cost(&self, msg: &Control) -> Bytes {
        self.0.borrow().control_cost(msg)
    }
    fn bytes_sent(&self) -> Bytes {
        self.0.borrow().bytes_sent()
    }
}

impl Inbound for LinkIn<'_, '_> {
    fn try_recv(&mut self) -> dirty_bitmap::migration::Result<Option<DestMessage>> {
        self.0.borrow_mut().try_recv()
    }
    fn recv(&mut self) -> dirty_bitmap::migration::Result<DestMessage> {
        self.0.borrow_mut().recv()
    }
}

/// A fresh image of a 64 GiB disk with bitmap `b` (64 KiB granularity), active.
fn new_store(dir: &Path) -> (PathBuf, SharedStore<FileStorage>) {
    let img = dir.join("disk.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), DISK, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    (img, SharedStore::new(s))
}

struct Rig {
    guest: Guest,
    ram: RamState,
    disk: SharedDiskState<FileStorage>,
    link: Loopback,
    pages: u64,
}

/// [`new_store`], active in durable mode.
fn new_durable_store(dir: &Path) -> (PathBuf, SharedStore<FileStorage>) {
    let img = dir.join("disk.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), DISK, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.activate_durable().unwrap();
    (img, SharedStore::new(s))
}

/// [`new_durable_store`] or [`new_store`].
fn new_store_in_mode(dir: &Path, durable: bool) -> (PathBuf, SharedStore<FileStorage>) {
    if durable {
        new_durable_store(dir)
    } else {
        new_store(dir)
    }
}

/// The destination's side of the disk state where a test has nothing to activate there:
/// it takes the source's write log and does nothing with it (the source's sections need a
/// handler), and answers its BEGIN and each whole LOG "not following" (the source waits
/// for that answer before it switches over).
#[derive(Debug)]
struct IgnoresTheLog(&'static str);

impl dirty_bitmap::migration::DestState for IgnoresTheLog {
    fn name(&self) -> &str {
        self.0
    }
    fn section(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<Option<Vec<u8>>> {
        use dirty_bitmap::migration::disk_log_codec::{self, LogSection, PreloadReport};
        let at = match disk_log_codec::decode(payload, |_, _| false)? {
            LogSection::Begin(id) => (id, 0),
            LogSection::Log(log) if log.whole && !log.last => (log.id, log.seq),
            LogSection::Log(_) => return Ok(None),
        };
        Ok(Some(disk_log_codec::encode_report(PreloadReport {
            following: false,
            id: at.0,
            after: at.1,
            through: at.1,
        })))
    }
}

fn rig(store: &SharedStore<FileStorage>, seed: u64) -> Rig {
    let durable = store.lock().is_durable();
    let pages = 256;
    let ram = Arc::new(GuestRam::new(pages).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let workload = WorkloadConfig {
        vcpus: 1,
        writes_per_sec: 5_000,
        pattern: Pattern::HOT_90_5,
        seed,
    };
    let vcpus = Workload::start(Arc::clone(&ram), Arc::clone(&log), workload).unwrap();
    let disk = if durable {
        DiskWriter::start_durable(store.durable_tracker().unwrap(), DISK, 20_000, seed, None)
    } else {
        DiskWriter::start(store.lock().tracker().unwrap(), DISK, 20_000, seed, None)
    };
    std::thread::sleep(Duration::from_millis(20));
    let state = RamState::new(RAM_ID, ram, log, SetupMode::Full, false, 16).unwrap();
    let mut dest = DestModel::new(RAM_ID, pages, seed);
    dest.states
        .push(Arc::new(std::sync::Mutex::new(IgnoresTheLog(
            "disk-bitmaps",
        ))));
    Rig {
        guest: Guest { vcpus, disk },
        ram: state,
        disk: SharedDiskState::new(DISK_ID, "disk-bitmaps", store.clone()),
        link: Loopback::new(dest),
        pages,
    }
}

fn cfg() -> LoopConfig {
    LoopConfig {
        max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(4 << 20)),
        ..LoopConfig::default()
    }
}

fn attempt(
    r: &mut Rig,
    inbound: Option<&mut dyn Inbound>,
) -> dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome> {
    attempt_controlled(r, inbound, &mut AutoConverge::default())
}

/// [`attempt`] with `control` deciding at each turn.
fn attempt_controlled(
    r: &mut Rig,
    inbound: Option<&mut dyn Inbound>,
    control: &mut dyn Controller,
) -> dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome> {
    let link = RefCell::new(&mut r.link);
    let mut default_in = LinkIn(&link);
    let inbound: &mut dyn Inbound = match inbound {
        Some(i) => i,
        None => &mut default_in,
    };
    run(
        &cfg(),
        Endpoints {
            clock: &mut RealClock::new(),
            vm: &mut r.guest,
            out: &mut LinkOut(&link),
            inbound,
        },
        &mut [&mut r.ram as &mut dyn MigrationState, &mut r.disk],
        control,
    )
}

/// Every logged mark is dirty in bitmap `b` of `img` as read from disk, which QEMU sees
/// without `in_use`, and `qemu-img check` is clean.
fn assert_on_disk(img: &Path, marks: &[u64]) {
    let s = BitmapStore::open(
        FileStorage::open(img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let b = s.load("b").unwrap();
    let lost: Vec<u64> = marks.iter().copied().filter(|&o| !b.is_dirty(o)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} marks lost on disk, first {:?}",
        lost.len(),
        marks.len(),
        lost.first()
    );
    drop(s);
    let q = qemu_bitmaps(img);
    assert_eq!(q.len(), 1);
    assert!(!q[0].2.iter().any(|f| f == "in-use"), "{q:?}");
    assert_qemu_clean(img);
}

#[test]
fn a_hand_over_flushes_during_precopy_and_the_downtime_holds_the_inactivate() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 11);
    let o = attempt(&mut r, None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    // Precopy flushed the disk bitmap; the stop wrote only the remainder and the commit.
    assert!(o.disk_flushed > Bytes(0), "{o:?}");
    assert!(o.disk_stop.syncs >= 1, "{o:?}");
    assert!(o.disk_stop.duration <= o.downtime, "{o:?}");
    assert!(o.pending_at_switch.disk_time < Millis::MAX);
    // The destination's load of the bitmaps is downtime too, and in the figure: at least
    // the 1 ms a load rounds up to (with the write log it reads only the regions of the
    // last log, so the figure holds less than the whole load).
    let dest = r.disk.dest_time();
    assert!(dest >= Millis(1) && dest < Millis::MAX, "{dest:?}");
    assert!(o.pending_at_switch.disk_time >= Millis(1), "{o:?}");
    assert!(r.disk.handed_over());
    assert!(!store.lock().is_active());
    // The guest is stopped, its disk writes drained: every mark made is on disk.
    let marks = r.guest.disk.marks();
    assert!(marks.len() > 100, "the writer made {} marks", marks.len());
    let dst = r.link.dest.ram().to_vec();
    assert_eq!(dst.len() as u64, r.pages * 4096);
    assert_on_disk(&img, &marks);
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

#[test]
fn a_refused_hand_over_activates_the_store_again_before_the_guest_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 12);
    r.link.dest.refuse = Some("no".into());
    let e = attempt(&mut r, None).unwrap_err();
    assert!(matches!(e, MigrationError::DestinationRefused(_)), "{e}");
    // Active again, holding every mark; the guest runs and marks on.
    assert!(store.lock().is_active());
    assert!(!r.disk.handed_over());
    let before = r.guest.disk.marks().len();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        r.guest.disk.marks().len() > before,
        "the guest did not resume its disk writes"
    );
    // A retry hands over.
    r.link.dest.refuse = None;
    let o = attempt(&mut r, None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    let marks = r.guest.disk.marks();
    assert_on_disk(&img, &marks);
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// Inactivates the store from outside the migration at its first turn, as another holder
/// of the `SharedStore` may.
struct InactivateOnce(SharedStore<FileStorage>, bool);

impl Controller for InactivateOnce {
    fn on_iteration(
        &mut self,
        _: &dirty_bitmap::migration::IterationReport,
    ) -> dirty_bitmap::migration::Directive {
        if !self.1 {
            self.1 = true;
            self.0.lock().inactivate().unwrap();
            // The guest marks on, into the parked bitmap alone.
            std::thread::sleep(Duration::from_millis(30));
        }
        dirty_bitmap::migration::Directive::Continue
    }
    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        AutoConverge::default().on_stall(r)
    }
}

/// A store inactivated during precopy by another holder of the `SharedStore` fails the
/// attempt in precopy, the guest running on. Otherwise its flushes would find nothing
/// pending, its write log would end early, and the stop's inactivate would return having
/// written nothing, so the hand-over would complete with the marks made since, held by the
/// parked bitmap alone, on no disk the destination reads. Once the store is active again, a
/// retry hands over every mark.
#[test]
fn a_store_inactivated_by_another_holder_during_precopy_fails_the_hand_over_and_keeps_every_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 14);
    let e =
        attempt_controlled(&mut r, None, &mut InactivateOnce(store.clone(), false)).unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Bitmap(dirty_bitmap::Error::WrongState(
                dirty_bitmap::StateProblem::NotActive
            ))
        ),
        "{e}"
    );
    // The store stays as its other holder left it (it may be handing the image to
    // someone else); the guest's marks are in its parked bitmap. Its holder takes it back,
    // and a retry hands over every mark.
    assert!(!store.lock().is_active());
    assert!(!r.disk.handed_over());
    store.lock().activate().unwrap();
    let o = attempt(&mut r, None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    let marks = r.guest.disk.marks();
    assert!(marks.len() > 100, "the writer made {} marks", marks.len());
    assert_on_disk(&img, &marks);
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// The source stayed stopped (`SourceNotResumed`) and its store inactive, and the image
/// keeps the foreign writer's `in_use`: never taken back as clean. Then ends the guest.
fn stayed_stopped_on_the_foreign_in_use(
    e: &MigrationError,
    store: &SharedStore<FileStorage>,
    img: &Path,
    r: Rig,
) {
    assert!(matches!(e, MigrationError::SourceNotResumed { .. }), "{e}");
    assert!(!store.lock().is_active());
    let d = BitmapStore::open(
        FileStorage::open(img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert!(
        d.list().iter().all(|b| b.in_use),
        "the foreign writer's in_use was taken back: {:?}",
        d.list()
    );
    drop(d);
    r.guest.disk.shutdown();
    let mut vcpus = r.guest.vcpus;
    vcpus.resume().unwrap();
    vcpus.shutdown();
}

/// The guest, but its first stop (the switchover's) first lets another holder of the
/// `SharedStore` inactivate it, and another writer take the image, set `in_use`, write
/// guest data (marked at `FOREIGN`) and die without closing: its mark is in no bitmap
/// the source holds.
struct ForeignWriterAtTheStop<'a> {
    guest: &'a mut Guest,
    store: SharedStore<FileStorage>,
    img: PathBuf,
    done: bool,
}

const FOREIGN: u64 = 7 * GIB + 12345;

impl Vm for ForeignWriterAtTheStop<'_> {
    fn stop(&mut self) -> dirty_bitmap::migration::Result<()> {
        if !self.done {
            self.done = true;
            self.store.lock().inactivate().unwrap();
            let mut other = BitmapStore::open(
                FileStorage::open(&self.img, OpenMode::ReadWrite).unwrap(),
                OpenMode::ReadWrite,
            )
            .unwrap();
            other.activate().unwrap();
            other.tracker().unwrap().mark(FOREIGN, 4096);
            drop(other);
        }
        self.guest.stop()
    }
    fn resume(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.guest.resume()
    }
    fn set_throttle(&mut self, percent: u8) {
        self.guest.set_throttle(percent);
    }
    fn run_until(&mut self, now: Duration) {
        self.guest.run_until(now);
    }
}

/// A stop that failed because another holder had inactivated the store does not take the
/// image back accepting any `in_use` bit on it, as it may after its own hand-over (a
/// destination that never started wrote nothing but those bits). Here no hand-over
/// happened, and the writer that set `in_use` wrote guest data the source's bitmaps lack:
/// taking it back and resuming would store them consistent without those writes. The source
/// must stay stopped (`SourceNotResumed`), the image's bitmap inconsistent.
#[test]
fn a_stop_that_never_handed_over_does_not_take_back_a_foreign_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 15);
    let e = {
        let link = RefCell::new(&mut r.link);
        let mut vm = ForeignWriterAtTheStop {
            guest: &mut r.guest,
            store: store.clone(),
            img: img.clone(),
            done: false,
        };
        run(
            &cfg(),
            Endpoints {
                clock: &mut RealClock::new(),
                vm: &mut vm,
                out: &mut LinkOut(&link),
                inbound: &mut LinkIn(&link),
            },
            &mut [&mut r.ram as &mut dyn MigrationState, &mut r.disk],
            &mut AutoConverge::default(),
        )
        .unwrap_err()
    };
    stayed_stopped_on_the_foreign_in_use(&e, &store, &img, r);
}

/// In durable mode every mark is on disk when it returns: the stop has nothing left to
/// write (0 bytes, no allocation), and the image the destination takes holds every mark.
#[test]
fn in_durable_mode_the_stop_writes_nothing_and_every_mark_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_durable_store(dir.path());
    let mut r = rig(&store, 21);
    let o = attempt(&mut r, None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    assert_eq!(o.disk_stop.bytes_written, 0, "{o:?}");
    assert!(o.disk_stop.duration <= o.downtime, "{o:?}");
    assert!(r.disk.handed_over());
    assert!(!store.lock().is_active());
    let marks = r.guest.disk.marks();
    assert!(marks.len() > 100, "the writer made {} marks", marks.len());
    assert_on_disk(&img, &marks);
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// A refused hand-over in durable mode takes the store back in durable mode before the
/// guest resumes: the writer's durable tracker, taken before the attempt, marks on through
/// the new activation, and a retry's stop again writes nothing.
#[test]
fn in_durable_mode_a_refused_hand_over_takes_the_store_back_durable_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_durable_store(dir.path());
    let mut r = rig(&store, 22);
    r.link.dest.refuse = Some("no".into());
    let e = attempt(&mut r, None).unwrap_err();
    assert!(matches!(e, MigrationError::DestinationRefused(_)), "{e}");
    assert!(store.lock().is_durable(), "not taken back in durable mode");
    let before = r.guest.disk.marks().len();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        r.guest.disk.marks().len() > before,
        "the guest's durable marks did not go on"
    );
    r.link.dest.refuse = None;
    let o = attempt(&mut r, None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    assert_eq!(o.disk_stop.bytes_written, 0, "{o:?}");
    let marks = r.guest.disk.marks();
    assert_on_disk(&img, &marks);
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// The destination's answers, but when asked to start it opens the image writable (a
/// destination taking the disk over) and then refuses, keeping it open.
struct TakesTheImage<'a, 'b> {
    link: LinkIn<'a, 'b>,
    img: PathBuf,
    held: Option<FileStorage>,
}

impl Inbound for TakesTheImage<'_, '_> {
    fn try_recv(&mut self) -> dirty_bitmap::migration::Result<Option<DestMessage>> {
        self.link.try_recv()
    }
    fn recv(&mut self) -> dirty_bitmap::migration::Result<DestMessage> {
        // The source inactivated: its writer locks are released, so this open succeeds.
        self.held = Some(FileStorage::open(&self.img, OpenMode::ReadWrite).unwrap());
        let _ = self.link.recv()?;
        Ok(DestMessage::Refused("changed my mind".into()))
    }
}

/// The destination's answers, but while the source waits for the answer to its End (the
/// store handed over), another holder of the `SharedStore` takes the store back and hands
/// it out again, and another writer then takes the image, sets `in_use`, writes guest data
/// (marked at `FOREIGN`) and dies; then the destination refuses.
struct ReactivatedThenTakenByAnother<'a, 'b> {
    link: LinkIn<'a, 'b>,
    store: SharedStore<FileStorage>,
    img: PathBuf,
}

impl Inbound for ReactivatedThenTakenByAnother<'_, '_> {
    fn try_recv(&mut self) -> dirty_bitmap::migration::Result<Option<DestMessage>> {
        self.link.try_recv()
    }
    fn recv(&mut self) -> dirty_bitmap::migration::Result<DestMessage> {
        {
            let mut st = self.store.lock();
            st.activate().unwrap();
            st.inactivate().unwrap();
        }
        let mut other = BitmapStore::open(
            FileStorage::open(&self.img, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        other.activate().unwrap();
        other.tracker().unwrap().mark(FOREIGN, 4096);
        drop(other);
        let _ = self.link.recv()?;
        Ok(DestMessage::Refused("changed my mind".into()))
    }
}

/// As above, with the hand-over flag set from the stop until the fail-back, and a store
/// that another holder took back and handed out again in between (whose image another
/// writer then set `in_use` on, writing guest data): the fail-back must not take the image
/// back over that writer's `in_use`. It accepts a destination's `in_use` only if no
/// activation of the store came after the stop's hand-over.
#[test]
fn a_fail_back_does_not_accept_in_use_after_another_holder_reactivated_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 16);
    let e = {
        let link = RefCell::new(&mut r.link);
        let mut inb = ReactivatedThenTakenByAnother {
            link: LinkIn(&link),
            store: store.clone(),
            img: img.clone(),
        };
        run(
            &cfg(),
            Endpoints {
                clock: &mut RealClock::new(),
                vm: &mut r.guest,
                out: &mut LinkOut(&link),
                inbound: &mut inb,
            },
            &mut [&mut r.ram as &mut dyn MigrationState, &mut r.disk],
            &mut AutoConverge::default(),
        )
        .unwrap_err()
    };
    stayed_stopped_on_the_foreign_in_use(&e, &store, &img, r);
}

#[test]
fn the_source_cannot_take_back_an_image_the_destination_holds_and_stays_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 13);
    let e = {
        let link = RefCell::new(&mut r.link);
        let mut inb = TakesTheImage {
            link: LinkIn(&link),
            img: img.clone(),
            held: None,
        };
        let e = run(
            &cfg(),
            Endpoints {
                clock: &mut RealClock::new(),
                vm: &mut r.guest,
                out: &mut LinkOut(&link),
                inbound: &mut inb,
            },
            &mut [&mut r.ram as &mut dyn MigrationState, &mut r.disk],
            &mut AutoConverge::default(),
        )
        .unwrap_err();
        assert!(inb.held.is_some());
        // While the destination holds the image, the source cannot activate.
        match &e {
            MigrationError::SourceNotResumed { cause, resume } => {
                assert!(
                    matches!(**cause, MigrationError::DestinationRefused(_)),
                    "{cause}"
                );
                assert!(
                    matches!(
                        **resume,
                        MigrationError::Bitmap(dirty_bitmap::Error::Locked { .. })
                    ),
                    "{resume}"
                );
            }
            other => panic!("expected SourceNotResumed, got {other}"),
        }
        e
    };
    let _ = e;
    // The source stays stopped: neither its vCPUs nor its disk writer run.
    let before = r.guest.disk.marks().len();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(r.guest.disk.marks().len(), before);
    assert!(!store.lock().is_active());
    // Once the destination let go, the source takes the image back and resumes.
    r.disk.reactivate().unwrap();
    assert!(store.lock().is_active());
    r.guest.resume().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let o = attempt(&mut r, None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    assert_on_disk(&img, &r.guest.disk.marks());
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

// ---------------------------------------------------------------------------------------
// The store's side of a hand-over: locks, and a destination that died after activating.

#[test]
fn inactivate_releases_the_write_locks_and_activate_takes_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    // Active: nobody else opens it writable, nor does qemu-img read it without -U.
    assert!(matches!(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap_err(),
        dirty_bitmap::Error::Locked { .. }
    ));
    store.lock().inactivate().unwrap();
    // Inactive: a destination opens it writable, and QEMU reads it.
    let dest = FileStorage::open(&img, OpenMode::ReadWrite).unwrap();
    assert!(matches!(
        store.lock().activate().unwrap_err(),
        dirty_bitmap::Error::Locked { .. }
    ));
    assert!(!store.lock().is_active());
    drop(dest);
    common::qemu::ok("qemu-img", &["info", common::qemu::p(&img)]);
    store.lock().activate().unwrap();
    assert!(store.lock().is_active());
    assert!(matches!(
        FileStorage::open(&img, OpenMode::ReadWrite).unwrap_err(),
        dirty_bitmap::Error::Locked { .. }
    ));
}

#[test]
fn a_destination_that_died_after_activating_leaves_an_image_the_source_reclaims_with_every_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let tracker = store.lock().tracker().unwrap();
    tracker.mark(0, 4096);
    store.lock().inactivate().unwrap();
    // A mark while handed over (the guest must not write then, but the bitmap keeps it).
    tracker.mark(7 * GIB, 4096);
    {
        // The destination opens and activates (sets in_use), then dies without a word.
        let mut d = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        d.activate().unwrap();
    }
    // Meanwhile the disk says in_use: inconsistent, never clean.
    assert!(qemu_bitmaps(&img)[0].2.iter().any(|f| f == "in-use"));
    // The fail-back, which knows the destination never started the guest, takes it back.
    store.lock().accept_destination_in_use();
    store.lock().activate().unwrap();
    tracker.mark(9 * GIB, 4096);
    store.lock().inactivate().unwrap();
    assert_on_disk(&img, &[0, 7 * GIB, 9 * GIB]);
}

#[test]
fn a_destination_that_changed_more_than_the_flags_is_refused_and_the_bitmap_reads_inconsistent() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    store.lock().bitmap("b").unwrap().mark_dirty(0, 4096);
    store.lock().inactivate().unwrap();
    {
        let mut d = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        d.activate().unwrap();
        d.add("theirs", 65536, Recording::Enabled).unwrap();
    }
    let e = store.lock().activate().unwrap_err();
    assert!(
        matches!(
            e,
            dirty_bitmap::Error::WrongState(dirty_bitmap::StateProblem::ChangedWhileInactive)
        ),
        "{e}"
    );
    assert!(!store.lock().is_active());
    // The disk's copy of `b` is in_use (the destination activated it): never clean.
    let q = qemu_bitmaps(&img);
    let b = q.iter().find(|(n, ..)| n == "b").unwrap();
    assert!(b.2.iter().any(|f| f == "in-use"), "{q:?}");
}

// ---------------------------------------------------------------------------------------
// Over TCP, with the destination's side of the disk state.

use dirty_bitmap::migration::tcp::{
    migrate_in_session, migrate_to, DestOptions, Session, SourceOptions, TcpDestination,
};
use dirty_bitmap::migration::{DestState, DiskGuest, DiskWriter, SharedDestState, SharedDiskDest};

/// A destination-side state that cannot take over.
#[derive(Debug)]
struct CannotTakeOver;

impl DestState for CannotTakeOver {
    fn name(&self) -> &str {
        "other"
    }
    fn before_start(&mut self) -> dirty_bitmap::migration::Result<()> {
        Err(MigrationError::InvalidInput("no room for it here".into()))
    }
}

/// A source state that only declares itself (its destination side is `CannotTakeOver`).
struct Declared;

impl MigrationState for Declared {
    fn id(&self) -> StateId {
        9
    }
    fn name(&self) -> &str {
        "other"
    }
    fn setup(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn pending(&mut self, _: bool) -> Pending {
        Pending::default()
    }
    fn iterate(
        &mut self,
        _: &mut dyn Outbound,
        _: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn complete(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn cancel(&mut self) {}
    fn resume_source(&mut self) {}
}

/// An attempt over TCP whose destination holds `dest` and, after it, a state that cannot
/// take over ([`CannotTakeOver`]): the destination's refusal, as the source reports it.
fn refused_attempt(r: &mut Rig, dest: SharedDestState) -> String {
    let other: SharedDestState = Arc::new(Mutex::new(CannotTakeOver));
    let mut declared = Declared;
    match tcp_attempt(r, vec![dest, other], Some(&mut declared)).unwrap_err() {
        MigrationError::DestinationRefused(why) => why,
        other => panic!("expected a refusal, got {other}"),
    }
}

fn tcp_attempt(
    r: &mut Rig,
    dest_states: Vec<SharedDestState>,
    extra: Option<&mut dyn MigrationState>,
) -> dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome> {
    let dest = TcpDestination::spawn(DestOptions {
        states: dest_states,
        ..DestOptions::default()
    })
    .unwrap();
    let mut states: Vec<&mut dyn MigrationState> = vec![&mut r.ram, &mut r.disk];
    if let Some(e) = extra {
        states.push(e);
    }
    let res = migrate_to(
        dest.addr(),
        &SourceOptions {
            loop_config: cfg(),
            ..SourceOptions::default()
        },
        &mut r.guest,
        &mut states,
        &mut AutoConverge::default(),
    );
    // A refusal or a failed attempt is in the report; an Err is the thread's panic.
    dest.join().expect("the destination thread");
    res.map(|s| s.outcome)
}

#[test]
fn over_tcp_the_destination_activates_the_shared_image_after_end_with_every_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 21);
    let dest = Arc::new(Mutex::new(SharedDiskDest::file(
        "disk-bitmaps",
        img.clone(),
    )));
    let o = tcp_attempt(&mut r, vec![dest.clone() as SharedDestState], None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    assert!(!store.lock().is_active());
    // It read the bitmaps at the source's BEGIN, beside the running source, and read
    // again what each write log named: the marks made after that read are there too.
    assert!(dest.lock().unwrap().activated_from_preload());
    // The destination holds the image now, active: every mark the source made is dirty.
    let mut d = dest
        .lock()
        .unwrap()
        .take_store()
        .expect("the destination took over");
    assert!(d.is_active());
    let marks = r.guest.disk.marks();
    assert!(marks.len() > 100, "the writer made {} marks", marks.len());
    let b = d.bitmap("b").unwrap();
    assert!(marks.iter().all(|&m| b.is_dirty(m)));
    // And the source cannot take it back while it does.
    assert!(matches!(
        store.lock().activate().unwrap_err(),
        dirty_bitmap::Error::Locked { .. }
    ));
    d.inactivate().unwrap();
    drop(d);
    assert_on_disk(&img, &marks);
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// The source priced a destination's activate as a preload that followed its write log
/// whatever the destination did: one built without a preload loaded every bitmap inside
/// the downtime, in no figure. Now the destination says when its preload follows the log,
/// and until then the source prices the whole load: here at the switchover too.
#[test]
fn over_tcp_a_destination_without_a_preload_is_priced_a_whole_load() {
    for preload in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (img, store) = new_store(dir.path());
        // A 16 MiB bitmap with a bit in every word: its whole load (every cluster read and
        // compared) takes milliseconds beyond a read of the few regions a log names, so
        // the two prices differ at the figure's millisecond.
        {
            store.lock().add("big", 512, Recording::Enabled).unwrap();
            let big = store.lock().bitmap("big").unwrap();
            for k in 0..DISK / (64 * 512) {
                big.mark_dirty(k * 64 * 512, 1);
            }
        }
        let mut r = rig(&store, 27);
        let mut dest = SharedDiskDest::file("disk-bitmaps", img.clone());
        if !preload {
            dest = dest.without_preload();
        }
        let dest = Arc::new(Mutex::new(dest));
        let o = tcp_attempt(&mut r, vec![dest.clone() as SharedDestState], None).unwrap();
        assert_eq!(o.kind, Kind::Completed);
        assert_eq!(dest.lock().unwrap().activated_from_preload(), preload);
        // The source switches over only once the destination answered its BEGIN:
        // "following" with a preload, "not following" without.
        assert_eq!(r.disk.dest_follows_log(), preload);
        assert!(!o.pending_at_switch.awaiting_destination, "{o:?}");
        if !preload {
            assert!(r.disk.dest_time() >= Millis(3), "{:?}", r.disk.dest_time());
            assert_eq!(
                o.pending_at_switch.dest_disk_time,
                r.disk.dest_time(),
                "preload {preload}: {o:?}"
            );
        }
        let mut d = dest.lock().unwrap().take_store().unwrap();
        let marks = r.guest.disk.marks();
        let b = d.bitmap("b").unwrap();
        assert!(marks.iter().all(|&m| b.is_dirty(m)), "preload {preload}");
        d.inactivate().unwrap();
        r.guest.disk.shutdown();
        r.guest.vcpus.resume().unwrap();
        r.guest.vcpus.shutdown();
    }
}

/// The destination preloads in the thread that reads the stream, and answers every BEGIN,
/// not only a preload that followed the log once it has run: a source that priced the whole
/// load (it had heard nothing, and the whole load fit the limit) would switch over while
/// the preload still ran, and its End would wait in the socket for the rest of the preload,
/// inside the downtime and in no figure. The source does not switch over before the answer:
/// here a preload that takes 3 s, with a guest that converges well before that.
#[test]
fn over_tcp_the_source_does_not_switch_over_before_the_destinations_preload_answered() {
    const PRELOAD: Duration = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 31);
    let shared = img.clone();
    let dest = SharedDiskDest::file("disk-bitmaps", img.clone()).with_preload(move || {
        std::thread::sleep(PRELOAD);
        let f = FileStorage::open_shared(&shared)?;
        BitmapStore::open(f, OpenMode::ReadOnly)
    });
    let dest = Arc::new(Mutex::new(dest));
    let o = tcp_attempt(&mut r, vec![dest.clone() as SharedDestState], None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    // The answer came before the switchover: the figure priced a refresh from the
    // preload, which the activate then did.
    assert!(r.disk.dest_follows_log(), "{o:?}");
    assert!(!o.pending_at_switch.awaiting_destination, "{o:?}");
    assert!(dest.lock().unwrap().activated_from_preload());
    // None of the preload's 3 s is in the downtime.
    assert!(o.downtime < Duration::from_secs(1), "{o:?}");
    // The wait was no stall: the guest was not throttled.
    assert_eq!((o.stalls, o.throttle), (0, 0), "{o:?}");
    let mut d = dest.lock().unwrap().take_store().unwrap();
    let marks = r.guest.disk.marks();
    let b = d.bitmap("b").unwrap();
    assert!(marks.iter().all(|&m| b.is_dirty(m)));
    d.inactivate().unwrap();
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// One attempt over TCP to a shared-storage destination on `path` (durable or not) that
/// must complete with the preloaded copy current at the stop (its activate read the bitmap
/// no second time). Returns the store the destination took over and a copy of its bitmap
/// "b" (a durable store hands out no live bitmap), after checking the writer made marks.
fn take_over_following_the_log(
    r: &mut Rig,
    path: &Path,
    durable: bool,
) -> (BitmapStore<FileStorage>, dirty_bitmap::DirtyBitmap) {
    let mut dest = SharedDiskDest::file("disk-bitmaps", path.to_path_buf());
    if durable {
        dest = dest.durable();
    }
    let dest = Arc::new(Mutex::new(dest));
    let o = tcp_attempt(r, vec![dest.clone() as SharedDestState], None).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    assert_eq!(
        dest.lock().unwrap().activated_current(),
        1,
        "durable {durable}: the activate read the bitmap again"
    );
    let d = dest
        .lock()
        .unwrap()
        .take_store()
        .expect("the destination took over");
    let b = d.load("b").unwrap();
    let made = r.guest.disk.marks().len();
    assert!(made > 100, "the writer made {made} marks");
    (d, b)
}

/// The destination follows the source's write log during precopy and at the stop: its
/// activate takes the preloaded bitmap as it is (reading none of its data inside the
/// downtime), and what it holds is what the disk holds, every mark included; in both modes.
#[test]
fn over_tcp_the_destination_follows_the_write_log_and_its_start_reads_no_bitmap_data() {
    for durable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (img, store) = new_store_in_mode(dir.path(), durable);
        let mut r = rig(&store, 23);
        let (d, b) = take_over_following_the_log(&mut r, &img, durable);
        assert_eq!(d.is_durable(), durable);
        let held = common::serialize_all(&b);
        let marks = r.guest.disk.marks();
        assert!(marks.iter().all(|&m| b.is_dirty(m)));
        // Nothing marked it since: its inactivate writes no region, and the disk then
        // holds what the source left there. A region the copy held stale would differ.
        let mut d = d;
        d.inactivate().unwrap();
        drop(d);
        let on_disk = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
            OpenMode::ReadOnly,
        )
        .unwrap()
        .load("b")
        .unwrap();
        assert_eq!(
            held,
            common::serialize_all(&on_disk),
            "durable {durable}: the destination holds what the disk does not"
        );
        r.guest.disk.shutdown();
        r.guest.vcpus.resume().unwrap();
        r.guest.vcpus.shutdown();
    }
}

/// Two hosts on shared storage whose page caches are not coherent, as two loop devices
/// over one file are (a LUN two hosts see, without a cluster file system): the source on
/// one, the destination on the other. The destination preloads at BEGIN, then reads again
/// the regions each LOG names, and activates at the stop; every read must come from the
/// device, not from what its host cached before the source wrote, or it starts (and, in
/// durable mode, vouches for) a bitmap without the source's later marks. QEMU drops the
/// file's cache at the activation for this (`raw_co_invalidate_cache`).
#[test]
fn a_destination_on_another_host_reads_the_source_writes_not_its_own_cache() {
    for durable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.qcow2");
        {
            let mut s =
                BitmapStore::create(FileStorage::create(&img).unwrap(), DISK, 65536).unwrap();
            s.add("b", 65536, Recording::Enabled).unwrap();
        }
        // A block device does not grow: room for every cluster the run allocates.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let (src_dev, dest_dev) = (common::Loop::attach(&img), common::Loop::attach(&img));
        // Another opener on the destination's host (the last close of a block device drops
        // its cache, which would hide what this test looks for).
        let _other_opener = std::fs::File::open(&dest_dev.0).unwrap();
        let mut s = BitmapStore::open(
            FileStorage::open(&src_dev.0, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        if durable {
            s.activate_durable().unwrap();
        } else {
            s.activate().unwrap();
        }
        let store = SharedStore::new(s);
        let mut r = rig(&store, 29);
        // It followed the log from the device: at the stop the preloaded copy was current.
        let (d, b) = take_over_following_the_log(&mut r, &dest_dev.0, durable);
        let marks = r.guest.disk.marks();
        let missing = marks.iter().filter(|&&m| !b.is_dirty(m)).count();
        assert_eq!(
            missing,
            0,
            "durable {durable}: the destination started without {missing} of {} marks",
            marks.len()
        );
        drop(d);
        r.guest.disk.shutdown();
        r.guest.vcpus.resume().unwrap();
        r.guest.vcpus.shutdown();
    }
}

#[test]
fn a_destination_that_cannot_take_over_refuses_and_leaves_the_image_as_the_source_left_it() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 22);
    // The disk's destination side takes over first (activates: in_use set), then the other
    // state cannot: the destination refuses, and the disk side puts its flags back.
    let dest = Arc::new(Mutex::new(SharedDiskDest::file(
        "disk-bitmaps",
        img.clone(),
    )));
    let why = refused_attempt(&mut r, dest.clone());
    assert!(why.contains("no room"), "{why}");
    assert!(dest.lock().unwrap().take_store().is_none());
    // The source took its bitmaps back (the directory was as it left it) and runs on.
    assert!(store.lock().is_active());
    let before = r.guest.disk.marks().len();
    std::thread::sleep(Duration::from_millis(50));
    assert!(r.guest.disk.marks().len() > before);
    store.lock().inactivate().unwrap();
    let marks = r.guest.disk.shutdown();
    store.lock().activate().unwrap();
    store.lock().inactivate().unwrap();
    assert_on_disk(&img, &marks);
    r.guest.vcpus.shutdown();
}

/// A destination built in the other mode than the source's refuses the mismatch before it
/// writes anything. Taking the image over (a deferred one clearing the durable flag the
/// source left, a durable one recording it and allocating), its `failed` after a failed
/// attempt would put back the `in_use` flags but not that: the source would find cluster 0
/// changed while inactive, refuse to take the image back, and the guest would stay stopped.
/// The source resumes in its own mode.
#[test]
fn a_destination_in_the_other_mode_refuses_before_it_writes_and_the_source_resumes() {
    for source_durable in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (img, store) = new_store_in_mode(dir.path(), source_durable);
        let mut r = rig(&store, 24);
        let mut dest = SharedDiskDest::file("disk-bitmaps", img.clone());
        if !source_durable {
            dest = dest.durable();
        }
        let dest = Arc::new(Mutex::new(dest));
        let why = refused_attempt(&mut r, dest.clone());
        assert!(why.contains("same mode"), "durable {source_durable}: {why}");
        assert!(dest.lock().unwrap().take_store().is_none());
        // The source took the image back, in its own mode, and its guest runs on.
        assert!(store.lock().is_active(), "durable {source_durable}");
        assert_eq!(store.lock().is_durable(), source_durable);
        let before = r.guest.disk.marks().len();
        std::thread::sleep(Duration::from_millis(50));
        assert!(r.guest.disk.marks().len() > before);
        let marks = r.guest.disk.shutdown();
        store.lock().inactivate().unwrap();
        assert_on_disk(&img, &marks);
        r.guest.vcpus.shutdown();
    }
}

// ---------------------------------------------------------------------------------------
// Stream mode: the destination has its own image; the bitmap travels as deltas.

use dirty_bitmap::migration::{StreamDiskDest, StreamDiskState};
use dirty_bitmap::FlushPolicy;

fn extents(b: &dirty_bitmap::DirtyBitmap) -> Vec<(u64, u64)> {
    b.dirty_extents().collect()
}

/// Panics with the first difference of two extent lists.
fn assert_same(a: &[(u64, u64)], b: &[(u64, u64)], what: &str) {
    if let Some(i) = (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i)) {
        panic!(
            "{what}: {} against {} extents, first difference at {i}: {:?} against {:?}",
            a.len(),
            b.len(),
            a.get(i),
            b.get(i)
        );
    }
}

/// The stream, and a `clear` of the first half of the disk (the 64 GiB disk's bitmap is
/// 128 KiB) as soon as the stream's first pass went out: a change that removes bits the
/// destination already has. It happens inside a precopy turn, while the guest runs, so a
/// later turn's exact figure (and the stop, if it follows) sees its regions; a clear from
/// the controller could come with the switchover's own report, after the hand-over.
struct ClearsAfterFirstPass<'a> {
    inner: &'a mut StreamDiskState,
    bitmap: Arc<dirty_bitmap::DirtyBitmap>,
    done: bool,
}

impl MigrationState for ClearsAfterFirstPass<'_> {
    fn id(&self) -> StateId {
        self.inner.id()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn setup(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.setup(out)
    }
    fn pending(&mut self, exact: bool) -> Pending {
        self.inner.pending(exact)
    }
    fn iterate(
        &mut self,
        out: &mut dyn Outbound,
        budget: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        let n = self.inner.iterate(out, budget)?;
        if !self.done && self.inner.regions_sent() >= self.inner.region_count() {
            self.bitmap.clear(0, DISK / 2);
            self.done = true;
        }
        Ok(n)
    }
    fn complete(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.complete(out)
    }
    fn awaits_report(&self) -> bool {
        self.inner.awaits_report()
    }
    fn report(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<()> {
        self.inner.report(payload)
    }
    fn channel_failed(&mut self) {
        self.inner.channel_failed();
    }
    fn cancel(&mut self) {
        self.inner.cancel();
    }
    fn resume_source(&mut self) {
        self.inner.resume_source();
    }
}

/// An empty image of the same disk for the destination, and its side of the stream (which
/// walks the image at the source's QUERY, during the precopy: `StreamDiskDest::file`).
fn stream_dest(dir: &Path) -> (PathBuf, Arc<Mutex<StreamDiskDest<FileStorage>>>) {
    let img = dir.join("dest.qcow2");
    drop(BitmapStore::create(FileStorage::create(&img).unwrap(), DISK, 65536).unwrap());
    let d = StreamDiskDest::file("disk-stream", &img);
    (img, Arc::new(Mutex::new(d)))
}

/// One attempt over TCP with RAM and `stream`, the destination taking `dest`.
fn stream_attempt(
    r: &mut Rig,
    stream: &mut StreamDiskState,
    dest: &Arc<Mutex<StreamDiskDest<FileStorage>>>,
    refuse: bool,
) -> dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome> {
    stream_attempt_with(r, stream, dest, refuse, &mut AutoConverge::default())
}

fn stream_attempt_with(
    r: &mut Rig,
    stream: &mut dyn MigrationState,
    dest: &Arc<Mutex<StreamDiskDest<FileStorage>>>,
    refuse: bool,
    control: &mut dyn Controller,
) -> dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome> {
    let d = TcpDestination::spawn(DestOptions {
        states: vec![Arc::clone(dest) as SharedDestState],
        refuse_attempts: u32::from(refuse),
        ..DestOptions::default()
    })
    .unwrap();
    let res = migrate_to(
        d.addr(),
        &SourceOptions {
            loop_config: cfg(),
            ..SourceOptions::default()
        },
        &mut r.guest,
        // The stream first: its first pass goes out before RAM's.
        &mut [stream, &mut r.ram],
        control,
    );
    // A refusal or a failed attempt is in the report; an Err is the thread's panic.
    d.join().expect("the destination thread");
    res.map(|s| s.outcome)
}

#[test]
fn stream_mode_hands_over_the_bitmap_exactly_while_the_flusher_takes_its_own_regions() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 31);
    let bitmap = store.lock().bitmap("b").unwrap();
    let mut stream = StreamDiskState::from_store(5, "disk-stream", &store.lock()).unwrap();
    // The source's own flusher keeps writing the same bitmap to the source's image.
    let flusher = FlushPolicy::every(Duration::from_millis(20))
        .spawn(store.clone())
        .unwrap();
    // A clear while the stream runs: its regions go again, replacing what was sent.
    let (dest_img, dest) = stream_dest(dir.path());
    let mut clearing = ClearsAfterFirstPass {
        inner: &mut stream,
        bitmap: Arc::clone(&bitmap),
        done: false,
    };
    let o = stream_attempt_with(
        &mut r,
        &mut clearing,
        &dest,
        false,
        &mut AutoConverge::default(),
    )
    .unwrap();
    assert!(
        clearing.done,
        "the first pass never went out before the stop"
    );
    assert_eq!(o.kind, Kind::Completed);
    assert!(stream.regions_sent() > 0);
    // The source's first attempt asked (a QUERY), and the destination walked its image
    // before it answered: the take-over inside the downtime started from that walk.
    assert!(dest.lock().unwrap().took_over_from_prewalk());
    // The guest is stopped and its disk writes drained: the destination's bitmap is the
    // source's, bit for bit (the clear included).
    let mut d = dest
        .lock()
        .unwrap()
        .take_store()
        .expect("the destination took over");
    assert!(d.is_active());
    let at_dest = extents(&d.bitmap("b").unwrap());
    assert_same(&at_dest, &extents(&bitmap), "destination against source");
    assert!(!at_dest.is_empty());
    d.inactivate().unwrap();
    drop(d);
    assert_qemu_clean(&dest_img);
    // The flusher saw every change too: the source's image holds the same bits.
    flusher.stop().unwrap();
    store.lock().inactivate().unwrap();
    let src = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert_same(
        &extents(&src.load("b").unwrap()),
        &extents(&bitmap),
        "source image against source memory",
    );
    drop(src);
    assert_qemu_clean(&img);
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// One stream-mode attempt over TCP, with a channel timeout of 1 s and `answer_timeout`,
/// to a destination whose walk at the QUERY takes `walk`: the outcome, the destination's
/// state and the source's stream. The guest's threads are shut down.
fn slow_walk_attempt(
    seed: u64,
    walk: Duration,
    answer_timeout: Duration,
) -> (
    dirty_bitmap::migration::Result<dirty_bitmap::migration::tcp::SourceReport>,
    Arc<Mutex<StreamDiskDest<FileStorage>>>,
    StreamDiskState,
) {
    let dir = tempfile::tempdir().unwrap();
    let (_img, store) = new_store(dir.path());
    let mut r = rig(&store, seed);
    let mut stream = StreamDiskState::from_store(5, "disk-stream", &store.lock()).unwrap();
    let img = dir.path().join("dest.qcow2");
    drop(BitmapStore::create(FileStorage::create(&img).unwrap(), DISK, 65536).unwrap());
    let (w, p) = (img.clone(), img.clone());
    let dest = Arc::new(Mutex::new(
        StreamDiskDest::new("disk-stream", move || {
            BitmapStore::open(
                FileStorage::open(&w, OpenMode::ReadWrite)?,
                OpenMode::ReadWrite,
            )
        })
        .with_prewalk(move || {
            std::thread::sleep(walk);
            BitmapStore::open(FileStorage::open_shared(&p)?, OpenMode::ReadOnly)
        }),
    ));
    let d = TcpDestination::spawn(DestOptions {
        states: vec![Arc::clone(&dest) as SharedDestState],
        ..DestOptions::default()
    })
    .unwrap();
    let res = migrate_to(
        d.addr(),
        &SourceOptions {
            loop_config: LoopConfig {
                answer_timeout,
                ..cfg()
            },
            timeout: Duration::from_secs(1),
            ..SourceOptions::default()
        },
        &mut r.guest,
        &mut [&mut stream, &mut r.ram],
        &mut AutoConverge::default(),
    );
    let _ = d.join();
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
    (res, dest, stream)
}

/// A stream-mode destination that takes 1.5 s to walk its image before it answers the
/// QUERY, under a channel timeout of 1 s: the source waits for that answer for up to the
/// loop's answer timeout, not the channel's (nothing is sent meanwhile, and the guest
/// runs), and the migration completes, its take-over starting from the walk.
#[test]
fn stream_mode_over_tcp_a_walk_longer_than_the_channel_timeout_is_waited_for() {
    let (res, dest, _) = slow_walk_attempt(
        33,
        Duration::from_millis(1500),
        LoopConfig::default().answer_timeout,
    );
    assert_eq!(res.unwrap().outcome.kind, Kind::Completed);
    assert!(dest.lock().unwrap().took_over_from_prewalk());
}

/// The same wait, bounded: a walk of 2.5 s against an answer timeout of 1.2 s (and a
/// channel timeout of 1 s) fails the attempt with `NoAnswer` after at least the answer
/// timeout, before anything but the Hello and the QUERY was sent.
#[test]
fn stream_mode_over_tcp_a_walk_past_the_answer_timeout_fails_with_no_answer() {
    let (res, _, stream) =
        slow_walk_attempt(34, Duration::from_millis(2500), Duration::from_millis(1200));
    match res {
        Err(MigrationError::Protocol(ProtocolError::NoAnswer { waited_ms })) => {
            assert!(waited_ms >= 1200, "{waited_ms} ms")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        stream.regions_sent(),
        0,
        "the stream sent before the answer"
    );
}

#[test]
fn stream_mode_a_refused_attempt_requeues_what_it_sent_and_a_retry_hands_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_img, store) = new_store(dir.path());
    let mut r = rig(&store, 32);
    let bitmap = store.lock().bitmap("b").unwrap();
    let regions = bitmap.region_count();
    let mut stream = StreamDiskState::from_store(5, "disk-stream", &store.lock()).unwrap();
    let (_dest_img, dest) = stream_dest(dir.path());
    let e = stream_attempt(&mut r, &mut stream, &dest, true).unwrap_err();
    assert!(matches!(e, MigrationError::DestinationRefused(_)), "{e}");
    let sent_first = stream.regions_sent();
    assert!(
        sent_first >= regions,
        "the first attempt sent {sent_first} of {regions}"
    );
    // Sending cleared no source bit, and every region is queued again.
    assert!(dest.lock().unwrap().take_store().is_none());
    let p = stream.pending(true);
    assert!(
        p.must_precopy.get() >= regions * bitmap.region_size(),
        "after a failure every region sent must be pending again: {p:?}"
    );
    let o = stream_attempt(&mut r, &mut stream, &dest, false).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    let d = dest.lock().unwrap().take_store().unwrap();
    assert_same(
        &extents(&d.bitmap("b").unwrap()),
        &extents(&bitmap),
        "destination against source",
    );
    let marks = r.guest.disk.marks();
    assert!(marks.len() > 100, "the writer made {} marks", marks.len());
    assert!(marks.iter().all(|&m| bitmap.is_dirty(m)));
    r.guest.disk.shutdown();
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

/// Over TCP, a refused attempt and a retry of the same migration (one [`Session`], so the
/// retry's Hello names the first attempt's token): the destination kept what it applied and
/// reports it, and the retry sends only what changed since, while a disk writer marks
/// throughout; the destination ends with the source's bitmap exactly.
#[test]
fn stream_mode_over_tcp_a_retry_of_the_same_migration_sends_only_what_changed_since() {
    const BIG: u64 = 1 << 40;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), BIG, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let store = SharedStore::new(s);
    let bitmap = store.lock().bitmap("b").unwrap();
    let regions = bitmap.region_count();
    // History in every region: a retry that skipped a region would miss its bit.
    for r in 0..regions {
        bitmap.mark_dirty(bitmap.region_disk_range(r).0, 4096);
    }
    let pages = 256;
    let ram = Arc::new(GuestRam::new(pages).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let vcpus = Workload::start(
        Arc::clone(&ram),
        Arc::clone(&log),
        WorkloadConfig {
            vcpus: 1,
            writes_per_sec: 5_000,
            pattern: Pattern::HOT_90_5,
            seed: 41,
        },
    )
    .unwrap();
    // Few writes a second, most of them in a hot 64 GiB (32 of the 512 regions).
    let tracker = store.lock().tracker().unwrap();
    let mut guest = Guest {
        vcpus,
        disk: DiskWriter::start(tracker, BIG, 500, 41, None),
    };
    let mut ram_state = RamState::new(RAM_ID, ram, log, SetupMode::Full, false, 16).unwrap();
    let mut stream = StreamDiskState::from_store(5, "disk-stream", &store.lock()).unwrap();
    let dest_img = dir.path().join("dest.qcow2");
    drop(BitmapStore::create(FileStorage::create(&dest_img).unwrap(), BIG, 65536).unwrap());
    let path = dest_img.clone();
    let dest = Arc::new(Mutex::new(StreamDiskDest::new("disk-stream", move || {
        BitmapStore::open(
            FileStorage::open(&path, OpenMode::ReadWrite)?,
            OpenMode::ReadWrite,
        )
    })));
    let d = TcpDestination::spawn(DestOptions {
        states: vec![Arc::clone(&dest) as SharedDestState],
        max_attempts: 2,
        refuse_attempts: 1,
        ..DestOptions::default()
    })
    .unwrap();
    let mut session = Session::new();
    let source = SourceOptions {
        loop_config: cfg(),
        ..SourceOptions::default()
    };
    let mut attempt = |stream: &mut StreamDiskState, ram_state: &mut RamState| {
        migrate_in_session(
            d.addr(),
            &source,
            &mut session,
            &mut guest,
            &mut [stream as &mut dyn MigrationState, ram_state],
            &mut AutoConverge::default(),
        )
    };
    let e = attempt(&mut stream, &mut ram_state).unwrap_err();
    assert!(matches!(e, MigrationError::DestinationRefused(_)), "{e}");
    let first = stream.regions_sent();
    assert!(
        first >= regions,
        "the first attempt sent {first} of {regions}"
    );
    let o = attempt(&mut stream, &mut ram_state).unwrap().outcome;
    assert_eq!(o.kind, Kind::Completed);
    // A refusal or a failed attempt is in the report; an Err is the thread's panic.
    d.join().expect("the destination thread");
    let retry = stream.regions_sent() - first;
    println!("first attempt {first} regions, retry {retry}");
    assert!(
        dest.lock().unwrap().resumed(),
        "the retry resumed what was kept"
    );
    assert!(
        retry * 4 < first,
        "the retry sent {retry} regions, the first attempt {first}"
    );
    let mut held = dest.lock().unwrap().take_store().unwrap();
    assert_same(
        &extents(&held.bitmap("b").unwrap()),
        &extents(&bitmap),
        "destination against source",
    );
    let marks = guest.disk.marks();
    assert!(!marks.is_empty());
    let b = held.bitmap("b").unwrap();
    assert!(marks.iter().all(|&m| b.is_dirty(m)));
    held.inactivate().unwrap();
    drop(held);
    assert_qemu_clean(&dest_img);
    guest.disk.shutdown();
    guest.vcpus.resume().unwrap();
    guest.vcpus.shutdown();
}

// ---------------------------------------------------------------------------------------
// Stream mode under the virtual clock: failures, then a retry.

use dirty_bitmap::migration::bitmap_codec;
use dirty_bitmap::migration::sim::{SimStreamState, StreamSim};
use dirty_bitmap::migration::ProtocolError;
use dirty_bitmap::rng::SplitMix64;
use dirty_bitmap::storage::MemStorage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SimFailure {
    Cancel,
    /// The link cut early (the third send).
    Cut,
    /// The link cut once the destination applied the stream's whole first pass.
    CutLate,
    /// As `CutLate`, then the destination is a new process: it kept nothing.
    CutLateFreshDest,
    /// The destination fails on the stream's fourth section (START and two REGIONS
    /// applied): a section sent and lost, as one in flight when a channel fails.
    DestFailsMidStream,
    Refuse,
}

/// A destination state that fails on its section number `at` and passes the rest on.
#[derive(Debug)]
struct FailAtSeq {
    inner: Arc<Mutex<StreamDiskDest<MemStorage>>>,
    at: u64,
}

impl DestState for FailAtSeq {
    fn name(&self) -> &str {
        "disk-stream"
    }
    fn hello(
        &mut self,
        id: StateId,
        binding: dirty_bitmap::migration::Binding,
    ) -> dirty_bitmap::migration::Result<()> {
        self.inner.lock().unwrap().hello(id, binding)
    }
    fn section(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<Option<Vec<u8>>> {
        if bitmap_codec::decode(payload)?.seq == self.at {
            return Err(MigrationError::InvalidInput("lost in flight".into()));
        }
        self.inner.lock().unwrap().section(payload)
    }
    fn switchover(&mut self, postcopy: bool) {
        self.inner.lock().unwrap().switchover(postcopy);
    }
    fn before_start(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.inner.lock().unwrap().before_start()
    }
    fn failed(&mut self) {
        self.inner.lock().unwrap().failed();
    }
}

/// Cancels on the second turn.
struct CancelSoon(u32);

impl Controller for CancelSoon {
    fn on_iteration(
        &mut self,
        _: &dirty_bitmap::migration::IterationReport,
    ) -> dirty_bitmap::migration::Directive {
        self.0 += 1;
        if self.0 == 2 {
            dirty_bitmap::migration::Directive::Cancel
        } else {
            dirty_bitmap::migration::Directive::Continue
        }
    }
    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        AutoConverge::default().on_stall(r)
    }
}

/// Cuts the link at the next send once the destination applied the stream's section
/// `at` (the first pass), so that the cut comes late in precopy.
struct CutWhenApplied {
    sim: Sim,
    dest: Arc<Mutex<StreamDiskDest<MemStorage>>>,
    at: u64,
    cut: bool,
}

impl Controller for CutWhenApplied {
    fn on_iteration(
        &mut self,
        _: &dirty_bitmap::migration::IterationReport,
    ) -> dirty_bitmap::migration::Directive {
        if !self.cut && self.dest.lock().unwrap().applied() >= self.at {
            self.cut = true;
            let next = self.sim.sends();
            self.sim.world().fail_at_send = Some(next);
        }
        dirty_bitmap::migration::Directive::Continue
    }
    fn on_stall(&mut self, r: &StallReport) -> StallAction {
        AutoConverge::default().on_stall(r)
    }
}

fn stream_sim_dest(disk: u64) -> Arc<Mutex<StreamDiskDest<MemStorage>>> {
    Arc::new(Mutex::new(StreamDiskDest::new("disk-stream", move || {
        BitmapStore::create(MemStorage::new(), disk, 65536)
    })))
}

/// A guest whose RAM and streamed disk bitmap are written as virtual time passes, a failure
/// in the first attempt, then a retry: the source keeps its bits, every region the attempt
/// sent is pending again until the destination says what it holds, the retry sends only
/// what the destination does not provably hold (measurably less than the first attempt
/// when it kept the first pass; everything when it kept nothing), and the destination's
/// image ends with the source's bitmap exactly.
#[test]
fn stream_mode_failures_under_the_virtual_clock_requeue_and_a_retry_hands_over_exactly() {
    for failure in [
        SimFailure::Cancel,
        SimFailure::Cut,
        SimFailure::CutLate,
        SimFailure::CutLateFreshDest,
        SimFailure::DestFailsMidStream,
        SimFailure::Refuse,
    ] {
        let pages = 64;
        let ram = Arc::new(GuestRam::new(pages).unwrap());
        let log = Arc::new(new_log(&ram).unwrap());
        let link = BytesPerMs::from_bytes_per_ms(20_000.0);
        let sim = Sim::new(
            Arc::clone(&ram),
            Arc::clone(&log),
            0.2,
            Pattern::Uniform,
            link,
            9,
        );
        // Many regions and few disk writes: most regions hold only the history marked
        // before the migration, so a retry that did not resend them would miss them.
        let params = StreamSim {
            regions: 512,
            writes_per_page_write: 0.05,
        };
        let disk = params.disk_size();
        let dest = stream_sim_dest(disk);
        let first_dest: SharedDestState = if failure == SimFailure::DestFailsMidStream {
            Arc::new(Mutex::new(FailAtSeq {
                inner: Arc::clone(&dest),
                at: 4,
            }))
        } else {
            Arc::clone(&dest) as SharedDestState
        };
        sim.world().dest.states.push(first_dest);
        let mut stream = SimStreamState::new(sim.clone(), params, 9).unwrap();
        // The bitmap has history before the migration starts.
        for k in 0..200u64 {
            stream.bitmap().mark_dirty((k * 7919 * 65536) % disk, 4096);
        }
        let mut ram_state = RamState::new(RAM_ID, ram, log, SetupMode::Full, false, 8).unwrap();
        let cfg = LoopConfig {
            max_bandwidth: None,
            ..LoopConfig::default()
        };
        match failure {
            SimFailure::Cut => sim.world().fail_at_send = Some(3),
            SimFailure::Refuse => sim.world().dest.refuse = Some("no".into()),
            _ => {}
        }
        let run_once = |ram_state: &mut RamState,
                        stream: &mut SimStreamState,
                        control: &mut dyn Controller| {
            run_in_sim(
                &sim,
                &cfg,
                &mut [ram_state as &mut dyn MigrationState, stream],
                control,
            )
        };
        // START and the 8 REGIONS sections of the first pass (512 regions, 64 a section).
        let first_pass = 1 + 512 / 64;
        let first = match failure {
            SimFailure::Cancel => run_once(&mut ram_state, &mut stream, &mut CancelSoon(0)),
            SimFailure::CutLate | SimFailure::CutLateFreshDest => run_once(
                &mut ram_state,
                &mut stream,
                &mut CutWhenApplied {
                    sim: sim.clone(),
                    dest: Arc::clone(&dest),
                    at: first_pass,
                    cut: false,
                },
            ),
            _ => run_once(&mut ram_state, &mut stream, &mut AutoConverge::default()),
        };
        // Each failure as itself: an attempt that failed for another reason (a setup or
        // protocol error before any section) would pass as any of them.
        let as_injected = match (failure, &first) {
            (SimFailure::Cancel, Err(MigrationError::Cancelled)) => true,
            (
                SimFailure::Cut | SimFailure::CutLate | SimFailure::CutLateFreshDest,
                Err(MigrationError::Io(e)),
            ) => e.to_string().contains("simulated link cut"),
            (SimFailure::DestFailsMidStream, Err(MigrationError::InvalidInput(m))) => {
                m == "lost in flight"
            }
            (SimFailure::Refuse, Err(MigrationError::DestinationRefused(_))) => true,
            _ => false,
        };
        assert!(
            as_injected,
            "{failure:?}: the first attempt must fail as injected: {first:?}"
        );
        assert!(sim.guest_running(), "{failure:?}: the source must run on");
        let sent_first = stream.inner().regions_sent();
        let bits_before = stream.bitmap().count();
        assert!(bits_before > 0, "{failure:?}");
        // Until the destination says what it holds, the whole bitmap is pending.
        let p = stream.pending(true);
        assert!(
            p.must_precopy.get() >= 512 * bitmap_codec::REGION_ENTRY_LEN as u64,
            "{failure:?}: {p:?}"
        );
        assert!(dest.lock().unwrap().take_store().is_none());
        let kept = dest.lock().unwrap().kept_applied();
        if matches!(
            failure,
            SimFailure::CutLate | SimFailure::CutLateFreshDest | SimFailure::Refuse
        ) {
            assert!(
                kept.is_some_and(|n| n >= first_pass),
                "{failure:?}: the destination keeps the first pass: {kept:?}"
            );
        }
        if failure == SimFailure::DestFailsMidStream {
            assert_eq!(kept, Some(3), "START and two REGIONS sections applied");
        }
        let dest = if failure == SimFailure::CutLateFreshDest {
            // A new destination process: nothing kept.
            let fresh = stream_sim_dest(disk);
            sim.world().dest.states = vec![Arc::clone(&fresh) as SharedDestState];
            fresh
        } else {
            sim.world().dest.states = vec![Arc::clone(&dest) as SharedDestState];
            dest
        };
        sim.world().fail_at_send = None;
        sim.world().dest.refuse = None;
        let o = run_once(&mut ram_state, &mut stream, &mut AutoConverge::default()).unwrap();
        assert_eq!(o.kind, Kind::Completed, "{failure:?}");
        let retry = stream.inner().regions_sent() - sent_first;
        println!("{failure:?}: first attempt {sent_first} regions, retry {retry}");
        match failure {
            // It held the first pass: only what changed since, and the cut section.
            SimFailure::CutLate | SimFailure::Refuse => {
                assert!(dest.lock().unwrap().resumed(), "{failure:?}");
                assert!(
                    retry * 4 < sent_first,
                    "{failure:?}: the retry sent {retry} regions, the first attempt {sent_first}"
                );
            }
            // It held nothing: everything again.
            SimFailure::CutLateFreshDest => {
                assert!(!dest.lock().unwrap().resumed());
                assert!(retry >= 512, "{failure:?}: the retry sent {retry} regions");
            }
            // Everything but the two sections it applied (128 regions), and not those.
            SimFailure::DestFailsMidStream => {
                assert!(dest.lock().unwrap().resumed());
                assert!(retry >= 512 - 128, "{failure:?}: the retry sent {retry}");
                assert!(retry < 512, "{failure:?}: the retry sent {retry}");
            }
            // What the first attempt did not send, at least.
            SimFailure::Cancel | SimFailure::Cut => {
                assert!(
                    retry + sent_first >= 512,
                    "{failure:?}: {sent_first} + {retry}"
                );
            }
        }
        let held = dest
            .lock()
            .unwrap()
            .take_store()
            .expect("the destination took over");
        assert_same(
            &extents(&held.bitmap("b").unwrap()),
            &extents(stream.bitmap()),
            &format!("{failure:?}: destination against source"),
        );
    }
}

/// A destination that reports more than it was ever sent, once it holds something (a
/// first attempt's QUERY it answers truly): the source refuses the report (a typed error,
/// the guest running on, nothing trusted of it), and a later attempt to an honest
/// destination hands the bitmap over exactly.
#[derive(Debug)]
struct Liar(Arc<Mutex<StreamDiskDest<MemStorage>>>);

impl DestState for Liar {
    fn name(&self) -> &str {
        "disk-stream"
    }
    fn hello(
        &mut self,
        id: StateId,
        binding: dirty_bitmap::migration::Binding,
    ) -> dirty_bitmap::migration::Result<()> {
        self.0.lock().unwrap().hello(id, binding)
    }
    fn section(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<Option<Vec<u8>>> {
        let answer = self.0.lock().unwrap().section(payload)?;
        Ok(answer.map(|a| {
            if a == bitmap_codec::encode_report(0) {
                a
            } else {
                bitmap_codec::encode_report(1 << 40)
            }
        }))
    }
    fn switchover(&mut self, postcopy: bool) {
        self.0.lock().unwrap().switchover(postcopy);
    }
    fn before_start(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.0.lock().unwrap().before_start()
    }
    fn failed(&mut self) {
        self.0.lock().unwrap().failed();
    }
}

/// What [`stream_sim_rig`] builds.
type StreamSimRig = (
    Arc<GuestRam>,
    Arc<dirty_bitmap::DirtyBitmap>,
    Sim,
    Arc<Mutex<StreamDiskDest<MemStorage>>>,
    SimStreamState,
);

/// A 64-page guest dirtying `rate` pages per ms under the virtual clock, and a streamed
/// bitmap of 64 regions written `writes` times per page write, 50 granules marked: the
/// guest's RAM and log, the simulation, the destination's state over an in-memory image,
/// and the source's stream.
fn stream_sim_rig(rate: f64, writes: f64, seed: u64) -> StreamSimRig {
    let ram = Arc::new(GuestRam::new(64).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let sim = Sim::new(
        Arc::clone(&ram),
        Arc::clone(&log),
        rate,
        Pattern::Uniform,
        BytesPerMs::from_bytes_per_ms(20_000.0),
        seed,
    );
    let params = StreamSim {
        regions: 64,
        writes_per_page_write: writes,
    };
    let disk = params.disk_size();
    let dest = stream_sim_dest(disk);
    let stream = SimStreamState::new(sim.clone(), params, seed).unwrap();
    for k in 0..50u64 {
        stream.bitmap().mark_dirty((k * 7919 * 65536) % disk, 4096);
    }
    (ram, log, sim, dest, stream)
}

#[test]
fn stream_mode_a_report_of_sections_never_sent_is_refused() {
    let (ram, log, sim, dest, mut stream) = stream_sim_rig(0.2, 0.05, 11);
    let mut ram_state = RamState::new(RAM_ID, ram, log, SetupMode::Full, false, 8).unwrap();
    let cfg = LoopConfig {
        max_bandwidth: None,
        ..LoopConfig::default()
    };
    let run_once = |ram_state: &mut RamState, stream: &mut SimStreamState| {
        run_in_sim(
            &sim,
            &cfg,
            &mut [ram_state as &mut dyn MigrationState, stream],
            &mut AutoConverge::default(),
        )
    };
    // A refused first attempt: the destination holds every section it was sent.
    sim.world().dest.refuse = Some("no".into());
    sim.world()
        .dest
        .states
        .push(Arc::new(Mutex::new(Liar(Arc::clone(&dest)))) as SharedDestState);
    let first = run_once(&mut ram_state, &mut stream);
    assert!(
        matches!(first, Err(MigrationError::DestinationRefused(_))),
        "{first:?}"
    );
    sim.world().dest.refuse = None;
    let sent = stream.inner().last_seq();
    assert!(sent > 0);
    // The retry hears a report of section 2^40: refused, typed, the guest runs on.
    let e = run_once(&mut ram_state, &mut stream).unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Protocol(ProtocolError::ReportBeyondSent { reported, sent: s, .. })
                if reported == 1 << 40 && s == sent
        ),
        "{e}"
    );
    assert!(sim.guest_running());
    assert!(dest.lock().unwrap().take_store().is_none());
    // Nothing of the lie was trusted: the whole bitmap is still pending.
    assert!(stream.pending(true).must_precopy.get() >= 64 * bitmap_codec::REGION_ENTRY_LEN as u64);
    // An honest destination: the retry resumes and hands over exactly.
    sim.world().dest.states = vec![Arc::clone(&dest) as SharedDestState];
    let o = run_once(&mut ram_state, &mut stream).unwrap();
    assert_eq!(o.kind, Kind::Completed);
    assert!(dest.lock().unwrap().resumed());
    let held = dest.lock().unwrap().take_store().unwrap();
    assert_same(
        &extents(&held.bitmap("b").unwrap()),
        &extents(stream.bitmap()),
        "destination against source",
    );
}

/// The simulated link, whose destination takes `delay` of virtual time to answer each
/// Report-bearing message the loop waits for before its first turn (a stream disk's
/// destination walking its image before it answers the QUERY: seconds for a large one).
struct SlowAnswers {
    sim: Sim,
    delay: Duration,
}

impl Inbound for SlowAnswers {
    fn try_recv(&mut self) -> dirty_bitmap::migration::Result<Option<DestMessage>> {
        self.sim.try_recv()
    }
    fn recv(&mut self) -> dirty_bitmap::migration::Result<DestMessage> {
        let m = self.sim.recv()?;
        if matches!(m, DestMessage::Report { .. }) {
            let at = self.sim.now() + self.delay;
            self.sim.sleep_until(at);
        }
        Ok(m)
    }
}

/// An idle guest's retry in stream mode, whose destination takes 2 s to answer the QUERY
/// (its walk), switches over. The retry has next to nothing to send while the VM runs, so
/// its first window, from the Hello, is its one measurement of the link: with the wait for
/// the answer inside it, the Hello, the header and the QUERY would measure the link at a
/// few bytes over 2 s, a threshold below even the control frames, and the retry would
/// never converge. The wait is left out of that window.
#[test]
fn stream_mode_an_idle_retry_whose_destination_answers_slowly_switches_over() {
    let (ram, log, sim, dest, mut stream) = stream_sim_rig(0.0, 0.0, 12);
    sim.world()
        .dest
        .states
        .push(Arc::clone(&dest) as SharedDestState);
    let cfg = LoopConfig {
        max_bandwidth: None,
        ..LoopConfig::default()
    };
    let migrate = |ram_state: &mut RamState, stream: &mut SimStreamState| {
        let (mut c, mut v, mut o) = (sim.clone(), sim.clone(), sim.clone());
        let mut i = SlowAnswers {
            sim: sim.clone(),
            delay: Duration::from_secs(2),
        };
        run(
            &cfg,
            Endpoints {
                clock: &mut c,
                vm: &mut v,
                out: &mut o,
                inbound: &mut i,
            },
            &mut [ram_state as &mut dyn MigrationState, stream],
            &mut AutoConverge::default(),
        )
    };
    // Refused at its end: the destination holds everything, and the guest stays idle.
    sim.world().dest.refuse = Some("no".into());
    let ram_state =
        |mode| RamState::new(RAM_ID, Arc::clone(&ram), Arc::clone(&log), mode, false, 8).unwrap();
    let e = migrate(&mut ram_state(SetupMode::Full), &mut stream).unwrap_err();
    assert!(matches!(e, MigrationError::DestinationRefused(_)), "{e}");
    sim.world().dest.refuse = None;
    let o = migrate(&mut ram_state(SetupMode::Incremental), &mut stream).unwrap();
    assert_eq!(o.kind, Kind::Completed, "{o:?}");
    assert!(dest.lock().unwrap().resumed());
    let held = dest.lock().unwrap().take_store().unwrap();
    assert_same(
        &extents(&held.bitmap("b").unwrap()),
        &extents(stream.bitmap()),
        "destination against source",
    );
}

/// What the destination side saw after Started, in order.
#[derive(Debug, Clone, Copy)]
enum AfterStart {
    /// Its guest marked the granule at this offset.
    Mark(u64),
    /// A region of the source's arrived (ORed into the running bitmap).
    Late(u64),
}

/// The destination's guest in postcopy: at the start and before each section that arrives
/// after it, it marks a few granules on the running bitmap (through the destination
/// store), and logs them with the regions that arrive.
#[derive(Debug)]
struct GuestAfterStart<S: dirty_bitmap::storage::Storage> {
    inner: Arc<Mutex<StreamDiskDest<S>>>,
    rng: SplitMix64,
    disk: u64,
    started: bool,
    log: Arc<Mutex<Vec<AfterStart>>>,
    /// Fail on this many-th section after the start (the push breaks off).
    fail_late: Option<usize>,
    late_sections: usize,
}

impl<S: dirty_bitmap::storage::Storage + 'static> GuestAfterStart<S> {
    fn mark(&mut self, n: u64) {
        let live = self
            .inner
            .lock()
            .unwrap()
            .store()
            .expect("the guest runs here")
            .bitmap("b")
            .unwrap();
        for _ in 0..n {
            let off = self.rng.below(self.disk / 65536) * 65536;
            live.mark_dirty(off, 4096);
            self.log.lock().unwrap().push(AfterStart::Mark(off));
        }
    }
}

impl<S: dirty_bitmap::storage::Storage + 'static> DestState for GuestAfterStart<S> {
    fn name(&self) -> &str {
        "disk-stream"
    }
    fn hello(
        &mut self,
        id: StateId,
        binding: dirty_bitmap::migration::Binding,
    ) -> dirty_bitmap::migration::Result<()> {
        self.started = false;
        self.inner.lock().unwrap().hello(id, binding)
    }
    fn section(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<Option<Vec<u8>>> {
        if self.started {
            self.late_sections += 1;
            if self.fail_late == Some(self.late_sections) {
                return Err(MigrationError::InvalidInput("the push breaks off".into()));
            }
            self.mark(3);
            if let bitmap_codec::BitmapSection::Regions { regions, .. } =
                bitmap_codec::decode(payload)?.body
            {
                let mut log = self.log.lock().unwrap();
                log.extend(regions.iter().map(|&(r, _)| AfterStart::Late(r)));
            }
        }
        self.inner.lock().unwrap().section(payload)
    }
    fn switchover(&mut self, postcopy: bool) {
        self.inner.lock().unwrap().switchover(postcopy);
    }
    fn before_start(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.inner.lock().unwrap().before_start()?;
        self.started = true;
        self.mark(8);
        Ok(())
    }
    fn failed(&mut self) {
        self.inner.lock().unwrap().failed();
    }
    fn failed_after_start(&mut self) {
        self.inner.lock().unwrap().failed_after_start();
    }
    fn push_ended(&mut self) {
        self.inner.lock().unwrap().push_ended();
    }
}

/// A 64-page guest dirtying 0.2 pages per ms over a 2,000 B/ms link under the virtual
/// clock, and its RAM state, able to switch to postcopy.
fn postcopy_guest(seed: u64) -> (Sim, RamState) {
    sim_guest(64, false, 0.2, true, seed)
}

/// Postcopy requested from the start, no rate limit.
fn postcopy_config() -> LoopConfig {
    LoopConfig {
        max_bandwidth: None,
        postcopy: true,
        start_postcopy: true,
        ..LoopConfig::default()
    }
}

/// A postcopy migration with the stream's regions deferred past the switch, the
/// destination's guest marking after Started (failing the push on its `fail_late`-th late
/// section, if set): the loop's result, what the destination saw after the start, the
/// destination, the source's bitmap and its logged marks.
#[allow(clippy::type_complexity)]
fn deferred_postcopy(
    seed: u64,
    fail_late: Option<usize>,
) -> (
    dirty_bitmap::migration::Result<dirty_bitmap::migration::Outcome>,
    Vec<AfterStart>,
    Arc<Mutex<StreamDiskDest<MemStorage>>>,
    Arc<dirty_bitmap::DirtyBitmap>,
    Vec<u64>,
) {
    // A slow link: the switch comes long before the bitmap's first pass is through.
    let (sim, mut ram_state) = postcopy_guest(seed);
    let regions = 4096u64;
    let disk = regions * 512 * 8 * 65536;
    let bitmap = Arc::new(dirty_bitmap::DirtyBitmap::with_region_size(disk, 65536, 512).unwrap());
    // The source's marks, logged: one granule in 16 (a bit in every other byte, so that no
    // region's entry is shorter sparse than raw: the first pass is the whole 2 MiB) and
    // more at random.
    let mut rng = SplitMix64::new(seed);
    let mut source_marks = Vec::new();
    for r in 0..regions {
        let first = bitmap.region_disk_range(r).0;
        source_marks.extend((0..256).map(|k| first + k * 16 * 65536));
    }
    for _ in 0..2000 {
        source_marks.push(rng.below(disk / 65536) * 65536);
    }
    for &m in &source_marks {
        bitmap.mark_dirty(m, 4096);
    }
    let mut stream = StreamDiskState::new(
        5,
        "disk-stream",
        vec![("b".to_string(), Arc::clone(&bitmap))],
    )
    .unwrap()
    .defer_to_postcopy(true);
    let dest = stream_sim_dest(disk);
    let after = Arc::new(Mutex::new(Vec::new()));
    sim.world()
        .dest
        .states
        .push(Arc::new(Mutex::new(GuestAfterStart {
            inner: Arc::clone(&dest),
            rng: SplitMix64::new(seed ^ 0xD0),
            disk,
            started: false,
            log: Arc::clone(&after),
            fail_late,
            late_sections: 0,
        })) as SharedDestState);
    let out = run_in_sim(
        &sim,
        &postcopy_config(),
        &mut [&mut ram_state as &mut dyn MigrationState, &mut stream],
        &mut AutoConverge::default(),
    );
    let after = after.lock().unwrap().clone();
    (out, after, dest, bitmap, source_marks)
}

/// Postcopy with the stream's regions deferred past the switch: the destination's guest
/// marks granules after Started, the source's late regions arrive afterwards (ORed), and
/// the destination's final bitmap is exactly the union of the source's and the guest's
/// marks: no destination mark lost to a late region, no source mark missing.
#[test]
fn stream_mode_postcopy_merges_the_destination_guests_marks_with_the_late_regions() {
    let seed = 0x005E_ED0B;
    println!("seed {seed:#x}");
    let (out, after, dest, bitmap, source_marks) = deferred_postcopy(seed, None);
    assert_eq!(out.unwrap().kind, Kind::Postcopy);
    let regions = bitmap.region_count();
    let disk = bitmap.disk_size();
    let late: Vec<u64> = after
        .iter()
        .filter_map(|e| match e {
            AfterStart::Late(r) => Some(*r),
            AfterStart::Mark(_) => None,
        })
        .collect();
    let dest_marks: Vec<u64> = after
        .iter()
        .filter_map(|e| match e {
            AfterStart::Mark(m) => Some(*m),
            AfterStart::Late(_) => None,
        })
        .collect();
    println!(
        "{} regions after Started, {} destination marks",
        late.len(),
        dest_marks.len()
    );
    assert!(
        late.len() as u64 > regions / 4,
        "{} late regions",
        late.len()
    );
    // Some destination mark fell in a region whose source copy arrived after it: the
    // case a replace would lose.
    let span = bitmap.region_disk_range(0).1;
    let overwritten_by_a_replace = after.iter().enumerate().any(|(i, e)| match e {
        AfterStart::Mark(m) => after[i + 1..]
            .iter()
            .any(|l| matches!(l, AfterStart::Late(r) if *r == m / span)),
        AfterStart::Late(_) => false,
    });
    assert!(overwritten_by_a_replace);
    let held = dest.lock().unwrap().take_store().unwrap();
    let at_dest = held.bitmap("b").unwrap();
    let lost_dest: Vec<&u64> = dest_marks
        .iter()
        .filter(|&&m| !at_dest.is_dirty(m))
        .collect();
    assert!(
        lost_dest.is_empty(),
        "destination marks lost: {lost_dest:?}"
    );
    let missing: Vec<&u64> = source_marks
        .iter()
        .filter(|&&m| !at_dest.is_dirty(m))
        .collect();
    assert!(
        missing.is_empty(),
        "source marks missing: {}",
        missing.len()
    );
    // Exactly the union: nothing but the two logs.
    let expected = dirty_bitmap::DirtyBitmap::with_region_size(disk, 65536, 512).unwrap();
    for &m in source_marks.iter().chain(&dest_marks) {
        expected.mark_dirty(m, 4096);
    }
    assert_same(
        &extents(&at_dest),
        &extents(&expected),
        "destination against the union",
    );
}

/// QEMU's baseline sends every bitmap whole at the stop, also at a postcopy switch, so
/// after that its figure counts no bitmap whole: counted whole, the push after the start
/// would never end (the loop failing it, `AfterStart`, once RAM has nothing left to push)
/// and the destination, never told End, would leave every bitmap `in_use`. Before the
/// switch, its figure (all of it for the stop: `Pending::stop_only`) does not keep a
/// drained RAM from the exact query once windows go by empty, where the loop would give up
/// ("not converging"). The postcopy ends, and the destination holds the source's bitmap.
#[test]
fn stream_mode_qemus_baseline_through_a_postcopy_switch_ends() {
    let seed = 0x005E_ED0D;
    println!("seed {seed:#x}");
    let (sim, mut ram_state) = postcopy_guest(seed);
    let disk = 64 * GIB;
    let bitmap = Arc::new(dirty_bitmap::DirtyBitmap::new(disk, 65536).unwrap());
    let mut rng = SplitMix64::new(seed);
    for _ in 0..500 {
        bitmap.mark_dirty(rng.below(disk / 65536) * 65536, 4096);
    }
    let mut stream = StreamDiskState::qemu_baseline(
        5,
        "disk-stream",
        vec![("b".to_string(), Arc::clone(&bitmap))],
    )
    .unwrap();
    let dest = stream_sim_dest(disk);
    sim.world()
        .dest
        .states
        .push(Arc::clone(&dest) as SharedDestState);
    let out = run_in_sim(
        &sim,
        &postcopy_config(),
        &mut [&mut ram_state as &mut dyn MigrationState, &mut stream],
        &mut AutoConverge::default(),
    );
    assert_eq!(out.unwrap().kind, Kind::Postcopy);
    let held = dest
        .lock()
        .unwrap()
        .take_store()
        .expect("the destination took over");
    let at_dest = held.bitmap("b").unwrap();
    assert_same(
        &extents(&at_dest),
        &extents(&bitmap),
        "destination against source",
    );
}

/// The push after the start breaks off (the destination fails on a late section): the
/// source reports `AfterStart` and stays stopped, and the destination, whose guest runs
/// on, never holds a bitmap that reads clean where a mark may be missing: it is dirty
/// everywhere.
#[test]
fn stream_mode_a_postcopy_push_that_breaks_off_leaves_the_destination_bitmap_all_dirty() {
    let seed = 0x005E_ED0C;
    println!("seed {seed:#x}");
    let (out, after, dest, bitmap, source_marks) = deferred_postcopy(seed, Some(5));
    let e = out.unwrap_err();
    assert!(matches!(e, MigrationError::AfterStart(_)), "{e}");
    assert!(after.iter().any(|e| matches!(e, AfterStart::Late(_))));
    let held = dest
        .lock()
        .unwrap()
        .take_store()
        .expect("the guest runs there");
    let at_dest = held.bitmap("b").unwrap();
    assert!(source_marks.iter().all(|&m| at_dest.is_dirty(m)));
    assert_eq!(at_dest.count(), bitmap.bit_count(), "every granule dirty");
}

/// Over TCP: a postcopy migration whose stream defers its regions past the switch, a disk
/// writer marking the source's bitmap until the stop and the destination's guest marking
/// its own after Started: the destination's bitmap ends as exactly the union of the
/// source's bitmap at the stop and the destination guest's logged marks.
#[test]
fn stream_mode_over_tcp_postcopy_late_regions_merge_with_the_destination_guests_marks() {
    const BIG: u64 = 1 << 40;
    let seed = 43;
    println!("seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("big.qcow2");
    let mut s = BitmapStore::create(FileStorage::create(&img).unwrap(), BIG, 65536).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let store = SharedStore::new(s);
    let bitmap = store.lock().bitmap("b").unwrap();
    // One granule in 16 (a bit in every other byte): no region's entry is shorter sparse
    // than raw, so the first pass is the whole bitmap and still under way at the switch.
    for r in 0..bitmap.region_count() {
        let (first, len) = bitmap.region_disk_range(r);
        for off in (first..first + len).step_by(16 * 65536) {
            bitmap.mark_dirty(off, 4096);
        }
    }
    let pages = 256;
    let ram = Arc::new(GuestRam::new(pages).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let vcpus = Workload::start(
        Arc::clone(&ram),
        Arc::clone(&log),
        WorkloadConfig {
            vcpus: 1,
            writes_per_sec: 5_000,
            pattern: Pattern::HOT_90_5,
            seed,
        },
    )
    .unwrap();
    let tracker = store.lock().tracker().unwrap();
    let mut guest = Guest {
        vcpus,
        disk: DiskWriter::start(tracker, BIG, 500, seed, None),
    };
    // The source's marks below are the writer's: it has written before the migration
    // starts (an optimized build can reach the stop within its first 2 ms).
    let t0 = std::time::Instant::now();
    while guest.disk.marks().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the disk writer never wrote"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut ram_state = RamState::new(RAM_ID, ram, log, SetupMode::Full, true, 16).unwrap();
    let mut stream = StreamDiskState::from_store(5, "disk-stream", &store.lock())
        .unwrap()
        .defer_to_postcopy(true);
    let dest_img = dir.path().join("dest.qcow2");
    drop(BitmapStore::create(FileStorage::create(&dest_img).unwrap(), BIG, 65536).unwrap());
    let path = dest_img.clone();
    let dest = Arc::new(Mutex::new(StreamDiskDest::new("disk-stream", move || {
        BitmapStore::open(
            FileStorage::open(&path, OpenMode::ReadWrite)?,
            OpenMode::ReadWrite,
        )
    })));
    let after = Arc::new(Mutex::new(Vec::new()));
    let d = TcpDestination::spawn(DestOptions {
        states: vec![Arc::new(Mutex::new(GuestAfterStart {
            inner: Arc::clone(&dest),
            rng: SplitMix64::new(seed),
            disk: BIG,
            started: false,
            log: Arc::clone(&after),
            fail_late: None,
            late_sections: 0,
        })) as SharedDestState],
        ..DestOptions::default()
    })
    .unwrap();
    let o = migrate_to(
        d.addr(),
        &SourceOptions {
            loop_config: LoopConfig {
                postcopy: true,
                start_postcopy: true,
                ..cfg()
            },
            ..SourceOptions::default()
        },
        &mut guest,
        &mut [&mut stream as &mut dyn MigrationState, &mut ram_state],
        &mut AutoConverge::default(),
    )
    .unwrap()
    .outcome;
    // A refusal or a failed attempt is in the report; an Err is the thread's panic.
    d.join().expect("the destination thread");
    assert_eq!(o.kind, Kind::Postcopy);
    let after = after.lock().unwrap().clone();
    let late = after
        .iter()
        .filter(|e| matches!(e, AfterStart::Late(_)))
        .count();
    let dest_marks: Vec<u64> = after
        .iter()
        .filter_map(|e| match e {
            AfterStart::Mark(m) => Some(*m),
            AfterStart::Late(_) => None,
        })
        .collect();
    println!(
        "{late} regions after Started, {} destination marks",
        dest_marks.len()
    );
    assert!(late > 0, "no region came after Started");
    // The source is stopped: its bitmap is as it was at the stop.
    let marks = guest.disk.marks();
    assert!(!marks.is_empty());
    // The destination's guest marks 8 granules at its start (`GuestAfterStart`).
    assert!(
        dest_marks.len() >= 8,
        "{} destination marks",
        dest_marks.len()
    );
    let mut held = dest.lock().unwrap().take_store().unwrap();
    let at_dest = held.bitmap("b").unwrap();
    assert!(
        marks.iter().all(|&m| at_dest.is_dirty(m)),
        "a source mark lost"
    );
    assert!(
        dest_marks.iter().all(|&m| at_dest.is_dirty(m)),
        "a destination mark lost"
    );
    let expected = dirty_bitmap::DirtyBitmap::new(BIG, 65536).unwrap();
    expected.merge_from(&bitmap).unwrap();
    for &m in &dest_marks {
        expected.mark_dirty(m, 4096);
    }
    assert_same(
        &extents(&at_dest),
        &extents(&expected),
        "destination against the union",
    );
    held.inactivate().unwrap();
    drop(held);
    assert_qemu_clean(&dest_img);
    guest.disk.shutdown();
    guest.vcpus.shutdown();
}

/// A state that passes everything to a [`StreamDiskState`] and sums what its precopy
/// turns (`iterate`) and its stop (`complete`) put on the wire.
struct Counted<'a> {
    inner: &'a mut StreamDiskState,
    iterated: Bytes,
    completed: Bytes,
    /// The smallest exact pending figure the loop saw.
    min_exact: Option<Bytes>,
}

impl MigrationState for Counted<'_> {
    fn id(&self) -> StateId {
        self.inner.id()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn setup(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.setup(out)
    }
    fn pending(&mut self, exact: bool) -> Pending {
        let p = self.inner.pending(exact);
        if exact {
            self.min_exact = Some(self.min_exact.map_or(p.total(), |m| m.min(p.total())));
        }
        p
    }
    fn iterate(
        &mut self,
        out: &mut dyn Outbound,
        budget: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        let n = self.inner.iterate(out, budget)?;
        self.iterated += n;
        Ok(n)
    }
    fn complete(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        let n = self.inner.complete(out)?;
        self.completed += n;
        Ok(n)
    }
    fn awaits_report(&self) -> bool {
        self.inner.awaits_report()
    }
    fn report(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<()> {
        self.inner.report(payload)
    }
    fn channel_failed(&mut self) {
        self.inner.channel_failed();
    }
    fn cancel(&mut self) {
        self.inner.cancel();
    }
    fn resume_source(&mut self) {
        self.inner.resume_source();
    }
}

#[test]
fn stream_mode_qemus_baseline_sends_nothing_before_the_stop_and_every_bitmap_whole_at_it() {
    let dir = tempfile::tempdir().unwrap();
    let (img, store) = new_store(dir.path());
    let mut r = rig(&store, 33);
    let bitmap = store.lock().bitmap("b").unwrap();
    let regions = bitmap.region_count();
    let mut stream =
        StreamDiskState::qemu_baseline_from_store(5, "disk-stream", &store.lock()).unwrap();
    let (dest_img, dest) = stream_dest(dir.path());
    let d = TcpDestination::spawn(DestOptions {
        states: vec![Arc::clone(&dest) as SharedDestState],
        ..DestOptions::default()
    })
    .unwrap();
    let mut counted = Counted {
        inner: &mut stream,
        iterated: Bytes(0),
        completed: Bytes(0),
        min_exact: None,
    };
    let o = migrate_to(
        d.addr(),
        &SourceOptions {
            loop_config: cfg(),
            ..SourceOptions::default()
        },
        &mut r.guest,
        &mut [&mut counted as &mut dyn MigrationState, &mut r.ram],
        &mut AutoConverge::default(),
    )
    .unwrap()
    .outcome;
    // A refusal or a failed attempt is in the report; an Err is the thread's panic.
    d.join().expect("the destination thread");
    let (iterated, completed, min_exact) = (counted.iterated, counted.completed, counted.min_exact);
    assert_eq!(o.kind, Kind::Completed);
    // Nothing before the stop; at it, every region of the bitmap, once.
    assert_eq!(iterated, Bytes(0));
    let whole = regions * bitmap.region_size();
    assert!(
        completed.get() > whole,
        "the stop sent {completed:?}, the bitmap is {whole} bytes"
    );
    assert!(o.bytes_in_downtime >= completed);
    // The pending figure never fell below the whole bitmap: the threshold accounts for it.
    assert!(min_exact.unwrap().get() > whole);
    assert_eq!(stream.regions_sent(), regions);
    assert_eq!(stream.complete_bytes(), completed);
    // The destination's bitmap is the source's, bit for bit.
    let mut dst = dest.lock().unwrap().take_store().unwrap();
    let at_dest = extents(&dst.bitmap("b").unwrap());
    assert_same(&at_dest, &extents(&bitmap), "destination against source");
    assert!(!at_dest.is_empty());
    let marks = r.guest.disk.marks();
    assert!(marks.len() > 100, "the writer made {} marks", marks.len());
    let b = dst.bitmap("b").unwrap();
    assert!(marks.iter().all(|&m| b.is_dirty(m)));
    dst.inactivate().unwrap();
    drop(dst);
    assert_qemu_clean(&dest_img);
    r.guest.disk.shutdown();
    store.lock().inactivate().unwrap();
    assert_qemu_clean(&img);
    r.guest.vcpus.resume().unwrap();
    r.guest.vcpus.shutdown();
}

// ---------------------------------------------------------------------------------------
// The flush before the exact figure.

/// A [`SharedDiskState`] whose guest marks one granule in a region not marked before at
/// every estimate and every precopy turn (`iterate`). Under the virtual clock nothing else runs between the
/// loop's calls, so whatever the stop writes was marked after the loop's last flush.
struct MarkingDisk {
    inner: SharedDiskState<dirty_bitmap::storage::MemStorage>,
    bitmap: Arc<dirty_bitmap::DirtyBitmap>,
    next: u64,
    regions: u64,
    /// Every figure the inner state returned, with whether it was exact.
    figures: Vec<(bool, Pending)>,
}

impl MarkingDisk {
    fn mark(&mut self) {
        // One region is 2 GiB of disk at 64 KiB granularity.
        self.bitmap
            .mark_dirty((self.next % self.regions) * 2 * GIB, 4096);
        self.next += 1;
    }
}

impl MigrationState for MarkingDisk {
    fn id(&self) -> StateId {
        self.inner.id()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn setup(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.setup(out)
    }
    fn pending(&mut self, exact: bool) -> Pending {
        if !exact {
            // The guest wrote just before the loop's estimate.
            self.mark();
        }
        let p = self.inner.pending(exact);
        self.figures.push((exact, p));
        p
    }
    fn iterate(
        &mut self,
        out: &mut dyn Outbound,
        budget: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        self.mark();
        self.inner.iterate(out, budget)
    }
    fn flush(&mut self) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.flush()
    }
    fn flush_before_exact(&mut self) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.flush_before_exact()
    }
    fn after_flush(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.after_flush(out)
    }
    fn notice(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<()> {
        self.inner.notice(payload)
    }
    fn complete(&mut self, out: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        self.inner.complete(out)
    }
    fn disk_stop(&self) -> dirty_bitmap::FlushStats {
        self.inner.disk_stop()
    }
    fn cancel(&mut self) {
        self.inner.cancel();
    }
    fn resume_source(&mut self) {
        self.inner.resume_source();
    }
    fn reactivate(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.inner.reactivate()
    }
}

/// The loop flushes the disk states right before the exact figure that may decide the
/// switchover, so the stop writes only what was marked after it: here nothing, although
/// the guest marked a new region at every turn of the precopy (without that flush, the
/// stop writes every region marked since the last measurement window closed).
#[test]
fn the_stop_writes_only_what_changed_after_the_flush_before_the_exact_figure() {
    let pages = 256;
    let ram = Arc::new(GuestRam::new(pages).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let sim = Sim::new(
        Arc::clone(&ram),
        Arc::clone(&log),
        0.5,
        Pattern::Uniform,
        BytesPerMs::from_bytes_per_ms(2000.0),
        5,
    );
    let disk = 1024 * GIB;
    let mut st =
        BitmapStore::create(dirty_bitmap::storage::MemStorage::new(), disk, 65536).unwrap();
    st.add("b", 65536, Recording::Enabled).unwrap();
    st.activate().unwrap();
    let bitmap = st.bitmap("b").unwrap();
    let store = SharedStore::new(st);
    let mut disk_state = MarkingDisk {
        inner: SharedDiskState::new(DISK_ID, "disk", store.clone()),
        bitmap: Arc::clone(&bitmap),
        next: 0,
        regions: disk / (2 * GIB),
        figures: Vec::new(),
    };
    let mut ram_state = RamState::new(RAM_ID, ram, log, SetupMode::Full, false, 8).unwrap();
    let cfg = LoopConfig {
        downtime_limit: Millis(300),
        max_bandwidth: None,
        ..LoopConfig::default()
    };
    sim.world()
        .dest
        .states
        .push(Arc::new(std::sync::Mutex::new(IgnoresTheLog("disk"))));
    let out = run_in_sim(
        &sim,
        &cfg,
        &mut [&mut disk_state as &mut dyn MigrationState, &mut ram_state],
        &mut GiveUpAfter(3),
    )
    .unwrap();
    assert_eq!(out.kind, Kind::Completed);
    let marked = disk_state.next;
    assert!(
        marked >= 5,
        "the guest marked {marked} regions during precopy"
    );
    assert!(out.disk_flushed > Bytes(0), "{out:?}");
    assert_eq!(
        out.disk_stop.bytes_written, 0,
        "the stop wrote bitmap data although nothing was marked after the last flush: {:?}",
        out.disk_stop
    );
    // Every mark is on the image: a fresh open of its bytes (the inactive store's `load`
    // would hand out its parked copy, with the disk's bits ORed in, and could not show a
    // region the flush took and never wrote).
    assert!(!store.lock().is_active());
    let bytes = store.lock().image().storage().to_vec();
    let held = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly)
        .unwrap()
        .load("b")
        .unwrap();
    assert_same(
        &extents(&held),
        &extents(&bitmap),
        "the image against memory",
    );
    assert_eq!(held.count(), marked.min(disk / (2 * GIB)));
    // Each figure carries its own destination part, within its disk time: the decision's
    // is the decision's, the stop's the stop's (a part taken from another figure can
    // exceed the whole it is reported beside).
    let exact: Vec<Pending> = disk_state
        .figures
        .iter()
        .filter(|(e, _)| *e)
        .map(|(_, p)| *p)
        .collect();
    assert!(exact.len() >= 2, "{:?}", disk_state.figures);
    for (_, p) in &disk_state.figures {
        assert!(
            p.dest_disk_time >= Millis(1) && p.dest_disk_time <= p.disk_time,
            "{p:?}"
        );
    }
    let (decision, at_stop) = (exact[exact.len() - 2], exact[exact.len() - 1]);
    assert_eq!(
        out.pending_at_switch.dest_disk_time,
        decision.dest_disk_time
    );
    assert_eq!(out.pending_at_stop.dest_disk_time, at_stop.dest_disk_time);
    assert!(out.pending_at_switch.disk_time >= decision.disk_time);
}

// ---------------------------------------------------------------------------------------
// A figure's error and the next attempt.

type Faulty = dirty_bitmap::storage::FaultStorage<dirty_bitmap::storage::MemStorage>;

/// The simulated VM, which at its first stop arms one failed read of the store's image:
/// the read of the exact figure the loop takes right after the stop (in durable mode the
/// store keeps no table, so that figure reads each bitmap's).
struct FailsAFigureAtTheStop {
    sim: Sim,
    store: SharedStore<Faulty>,
    /// The read number armed, once armed.
    armed: Option<u64>,
}

impl Vm for FailsAFigureAtTheStop {
    fn stop(&mut self) -> dirty_bitmap::migration::Result<()> {
        Vm::stop(&mut self.sim)?;
        if self.armed.is_none() {
            let st = self.store.lock();
            let f = st.image().storage();
            let n = f.reads() + 1;
            f.set_plan(
                dirty_bitmap::storage::FaultPlan::new()
                    .fail_read(dirty_bitmap::storage::Trigger::Nth(n)),
            );
            self.armed = Some(n);
        }
        Ok(())
    }
    fn resume(&mut self) -> dirty_bitmap::migration::Result<()> {
        Vm::resume(&mut self.sim)
    }
    fn set_throttle(&mut self, percent: u8) {
        self.sim.set_throttle(percent);
    }
    fn run_until(&mut self, now: Duration) {
        self.sim.run_until(now);
    }
}

/// The figure taken right after the VM stop fails once (a transient read error of a table),
/// and the destination then refuses; the state does not keep that error for its next flush,
/// where the retry would fail at its first flush with the first attempt's error. A figure's
/// error belongs to its attempt; the stop's own I/O reports its own errors.
#[test]
fn a_figure_that_failed_after_the_stop_does_not_fail_the_retry() {
    let pages = 64;
    let ram = Arc::new(GuestRam::new(pages).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let sim = Sim::new(
        Arc::clone(&ram),
        Arc::clone(&log),
        0.05,
        Pattern::Uniform,
        BytesPerMs::from_bytes_per_ms(2000.0),
        13,
    );
    let mut st = BitmapStore::create(
        Faulty::new(
            dirty_bitmap::storage::MemStorage::new(),
            dirty_bitmap::storage::FaultPlan::new(),
        ),
        DISK,
        65536,
    )
    .unwrap();
    st.add("b", 65536, Recording::Enabled).unwrap();
    st.activate_durable().unwrap();
    let store = SharedStore::new(st);
    store
        .durable_tracker()
        .unwrap()
        .mark(5 * 65536, 4096)
        .unwrap();
    let mut disk = SharedDiskState::new(DISK_ID, "disk", store.clone());
    sim.world()
        .dest
        .states
        .push(Arc::new(std::sync::Mutex::new(IgnoresTheLog("disk"))));
    sim.world().dest.refuse = Some("no".into());
    let cfg = LoopConfig {
        downtime_limit: Millis(300),
        max_bandwidth: None,
        // The retry's incremental pass may send too little to measure the link by.
        avail_switchover_bandwidth: Some(BytesPerMs::from_bytes_per_ms(2000.0)),
        ..LoopConfig::default()
    };
    let mut vm = FailsAFigureAtTheStop {
        sim: sim.clone(),
        store: store.clone(),
        armed: None,
    };
    let mut attempt = |mode: SetupMode, vm: &mut FailsAFigureAtTheStop| {
        let mut ram_state =
            RamState::new(RAM_ID, Arc::clone(&ram), Arc::clone(&log), mode, false, 8).unwrap();
        let (mut c, mut o, mut i) = (sim.clone(), sim.clone(), sim.clone());
        run(
            &cfg,
            Endpoints {
                clock: &mut c,
                vm,
                out: &mut o,
                inbound: &mut i,
            },
            &mut [&mut ram_state as &mut dyn MigrationState, &mut disk],
            &mut GiveUpAfter(3),
        )
    };
    let e = attempt(SetupMode::Full, &mut vm).unwrap_err();
    assert!(
        matches!(e, MigrationError::DestinationRefused(_)),
        "the stop's own I/O must not have failed: {e}"
    );
    let armed = vm.armed.expect("the VM stopped");
    let reads = store.lock().image().storage().reads();
    assert!(
        reads >= armed,
        "the figure after the stop read nothing ({reads} reads, armed {armed})"
    );
    assert!(store.lock().is_active(), "the refusal took the store back");
    sim.world().dest.refuse = None;
    let o = attempt(SetupMode::Incremental, &mut vm).unwrap_or_else(|e| panic!("the retry: {e}"));
    assert_eq!(o.kind, Kind::Completed, "{o:?}");
    assert!(!store.lock().is_active());
    // The mark on the image, read anew (not the store's parked copy).
    let bytes = store.lock().image().storage().inner().to_vec();
    let on_disk = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly)
        .unwrap()
        .load("b")
        .unwrap();
    assert!(on_disk.is_dirty(5 * 65536));
}

// ---------------------------------------------------------------------------------------
// A stream-mode take-over that fails after it wrote.

/// A source state that sends nothing, for a destination state of the same name.
struct Silent(StateId, &'static str);

impl MigrationState for Silent {
    fn id(&self) -> StateId {
        self.0
    }
    fn name(&self) -> &str {
        self.1
    }
    fn setup(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn pending(&mut self, _: bool) -> Pending {
        Pending::default()
    }
    fn iterate(
        &mut self,
        _: &mut dyn Outbound,
        _: Bytes,
    ) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn complete(&mut self, _: &mut dyn Outbound) -> dirty_bitmap::migration::Result<Bytes> {
        Ok(Bytes(0))
    }
    fn cancel(&mut self) {}
    fn resume_source(&mut self) {}
}

/// A destination state whose `before_start` refuses while `refuse` is set: declared after
/// the stream (a higher section id), it refuses once the stream took over.
#[derive(Debug)]
struct RefusesToStart(Arc<std::sync::atomic::AtomicBool>);

impl DestState for RefusesToStart {
    fn name(&self) -> &str {
        "refuser"
    }
    fn before_start(&mut self) -> dirty_bitmap::migration::Result<()> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(MigrationError::InvalidInput("not now".into()));
        }
        Ok(())
    }
}

/// A later destination state refuses to start after the stream's take-over activated the
/// destination's image with the stream's bitmaps. An undo that inactivated the store would
/// write each of them consistent as of the failed stop, and with the source resumed, the
/// destination image would hold bitmaps reading clean for writes that reach it after that
/// point (a mirror). As QEMU's destination stores no migrated bitmap of a failed incoming
/// migration, each bitmap of the stream reads absent or `in_use` after the failure, the
/// image's own other bitmaps are as they were, and a retry hands over exactly.
#[test]
fn stream_mode_a_take_over_that_fails_after_it_wrote_leaves_no_stream_bitmap_consistent() {
    const SIZE: u64 = 64 * GIB;
    let dir = tempfile::tempdir().unwrap();
    // The destination's image: "b" consistent at the stream's granularity with bits of its
    // own (the take-over adopts it), "other" consistent and not in the stream, no "c"
    // (the take-over adds it).
    let dest_img = dir.path().join("dest.qcow2");
    {
        let mut st =
            BitmapStore::create(FileStorage::create(&dest_img).unwrap(), SIZE, 65536).unwrap();
        st.add("b", 65536, Recording::Enabled).unwrap();
        st.add("other", 65536, Recording::Enabled).unwrap();
        st.activate().unwrap();
        st.bitmap("b").unwrap().mark_dirty(40 * GIB, 65536);
        st.bitmap("other").unwrap().mark_dirty(50 * GIB, 65536);
        st.inactivate().unwrap();
    }
    let path = dest_img.clone();
    let dest = Arc::new(Mutex::new(StreamDiskDest::new("disk-stream", move || {
        BitmapStore::open(
            FileStorage::open(&path, OpenMode::ReadWrite)?,
            OpenMode::ReadWrite,
        )
    })));
    let refuse = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let pages = 32;
    let ram = Arc::new(GuestRam::new(pages).unwrap());
    let log = Arc::new(new_log(&ram).unwrap());
    let sim = Sim::new(
        Arc::clone(&ram),
        Arc::clone(&log),
        0.05,
        Pattern::Uniform,
        BytesPerMs::from_bytes_per_ms(20_000.0),
        17,
    );
    sim.world()
        .dest
        .states
        .push(Arc::clone(&dest) as SharedDestState);
    sim.world()
        .dest
        .states
        .push(Arc::new(Mutex::new(RefusesToStart(Arc::clone(&refuse)))));
    let source = |offset: u64| {
        let b = Arc::new(dirty_bitmap::DirtyBitmap::with_region_size(SIZE, 65536, 4096).unwrap());
        b.mark_dirty(offset, 3 * 65536);
        b
    };
    let (b, c) = (source(GIB), source(2 * GIB));
    let mut stream = StreamDiskState::new(
        5,
        "disk-stream",
        vec![("b".into(), Arc::clone(&b)), ("c".into(), Arc::clone(&c))],
    )
    .unwrap();
    let cfg = LoopConfig {
        max_bandwidth: None,
        ..LoopConfig::default()
    };
    let mut attempt = |mode: SetupMode| {
        let mut ram_state =
            RamState::new(RAM_ID, Arc::clone(&ram), Arc::clone(&log), mode, false, 8).unwrap();
        run_in_sim(
            &sim,
            &cfg,
            &mut [
                &mut ram_state as &mut dyn MigrationState,
                &mut stream,
                &mut Silent(9, "refuser"),
            ],
            &mut GiveUpAfter(3),
        )
    };
    let e = attempt(SetupMode::Full).unwrap_err();
    assert!(
        matches!(e, MigrationError::DestinationRefused(ref why) if why.contains("not now")),
        "{e}"
    );
    assert!(dest.lock().unwrap().take_store().is_none());
    // Neither of the stream's bitmaps reads consistent, to QEMU or to us.
    let q = qemu_bitmaps(&dest_img);
    for name in ["b", "c"] {
        if let Some((_, _, flags)) = q.iter().find(|(n, _, _)| n == name) {
            assert!(
                flags.iter().any(|f| f == "in-use"),
                "{name:?} reads consistent after the failed take-over: {q:?}"
            );
        }
    }
    {
        let st = BitmapStore::open(
            FileStorage::open(&dest_img, OpenMode::ReadOnly).unwrap(),
            OpenMode::ReadOnly,
        )
        .unwrap();
        for name in ["b", "c"] {
            if let Some(info) = st.list().into_iter().find(|i| i.name == name) {
                assert!(info.in_use, "{name:?} reads consistent: {info:?}");
            }
        }
        // The image's own bitmap outside the stream is as it was.
        let other = st.list().into_iter().find(|i| i.name == "other").unwrap();
        assert!(!other.in_use, "{other:?}");
        let o = st.load("other").unwrap();
        assert_eq!(o.count(), 1);
        assert!(o.is_dirty(50 * GIB));
    }
    assert_qemu_clean(&dest_img);
    // The retry hands over exactly.
    refuse.store(false, std::sync::atomic::Ordering::SeqCst);
    let o = attempt(SetupMode::Incremental).unwrap_or_else(|e| panic!("the retry: {e}"));
    assert_eq!(o.kind, Kind::Completed);
    let mut st = dest
        .lock()
        .unwrap()
        .take_store()
        .expect("the retry took over");
    assert_same(
        &extents(&st.bitmap("b").unwrap()),
        &extents(&b),
        "b at the destination against the source",
    );
    assert_same(
        &extents(&st.bitmap("c").unwrap()),
        &extents(&c),
        "c at the destination against the source",
    );
    st.inactivate().unwrap();
    drop(st);
    assert_qemu_clean(&dest_img);
}
