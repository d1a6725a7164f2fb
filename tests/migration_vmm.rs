//! The RAM state over memory and a dirty log a VMM owns (`migration::memory`): the loop
//! migrates a plain `Vec<u8>` memory whose writes an external log records, pages of 4 KiB
//! and of 16 KiB, through a failure and an incremental retry; and the order the log
//! contract requires (harvest, fence, then the page copies) holds at the full setup too,
//! checked on a model of a weakly ordered machine.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dirty_bitmap::migration::frame::Control;
use dirty_bitmap::migration::sim::{DestModel, Loopback};
use dirty_bitmap::migration::{
    run, AutoConverge, Bytes, DestMessage, DirtyLog, DirtyPages, Endpoints, GuestMemory, Inbound,
    Kind, LoopConfig, ManualClock, MigrationError, MigrationState, Millis, Outbound, RamState,
    Result, SetupMode, StateId, Vm, RAM_ID,
};
use dirty_bitmap::rng::SplitMix64;

/// Guest memory in a plain `Vec<u8>`, behind a lock (the test's guest writes from the
/// loop's thread, between turns).
struct VecMemory {
    bytes: Mutex<Vec<u8>>,
    page_size: usize,
}

impl VecMemory {
    fn new(pages: u64, page_size: usize) -> VecMemory {
        VecMemory {
            bytes: Mutex::new(vec![0; pages as usize * page_size]),
            page_size,
        }
    }

    fn write(&self, page: u64, offset: usize, value: u64) {
        let start = page as usize * self.page_size + offset % (self.page_size - 7);
        self.bytes.lock().unwrap()[start..start + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }
}

impl GuestMemory for VecMemory {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn pages(&self) -> u64 {
        (self.bytes.lock().unwrap().len() / self.page_size) as u64
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        let start = page as usize * self.page_size;
        out.copy_from_slice(&self.bytes.lock().unwrap()[start..start + self.page_size]);
    }

    fn migration_id(&self) -> u64 {
        0x7E57_0000_0000_0001
    }
}

/// A dirty log kept outside the crate: the set of pages written since the last harvest,
/// handed over and emptied by each harvest.
#[derive(Default)]
struct RecordingLog {
    pages: u64,
    page_size: usize,
    dirty: Mutex<BTreeSet<u64>>,
    harvests: AtomicU64,
    redirtied: AtomicU64,
}

impl RecordingLog {
    fn record(&self, page: u64) {
        self.dirty.lock().unwrap().insert(page);
    }
}

impl DirtyLog for RecordingLog {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn harvest(&self, into: &mut DirtyPages<'_>) {
        self.harvests.fetch_add(1, Relaxed);
        for p in std::mem::take(&mut *self.dirty.lock().unwrap()) {
            into.add(p);
        }
    }

    fn redirty(&self, first: u64, count: u64) {
        self.redirtied.fetch_add(count, Relaxed);
        self.dirty.lock().unwrap().extend(first..first + count);
    }
}

/// A link into the sim's destination model that takes `bytes / bandwidth` of virtual time
/// per send, and can be cut at a given send.
#[derive(Clone)]
struct Link(Rc<RefCell<LinkInner>>);

struct LinkInner {
    loopback: Loopback,
    clock: ManualClock,
    bytes_per_ms: u64,
    sends: u64,
    cut_at_send: Option<u64>,
}

impl Link {
    fn new(dest: DestModel, clock: &ManualClock, bytes_per_ms: u64) -> Link {
        Link(Rc::new(RefCell::new(LinkInner {
            loopback: Loopback::new(dest),
            clock: clock.clone(),
            bytes_per_ms,
            sends: 0,
            cut_at_send: None,
        })))
    }

    fn dest_ram(&self) -> Vec<u8> {
        self.0.borrow().loopback.dest.ram().to_vec()
    }
}

impl LinkInner {
    fn transmit(&mut self, wire: Bytes) -> Result<()> {
        self.sends += 1;
        if self.cut_at_send == Some(self.sends) {
            return Err(MigrationError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "test link cut",
            )));
        }
        let ns = wire.get() * 1_000_000 / self.bytes_per_ms;
        self.clock.advance(Duration::from_nanos(ns));
        Ok(())
    }
}

impl Outbound for Link {
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes> {
        let mut l = self.0.borrow_mut();
        let wire = l.loopback.section_overhead() + Bytes(payload.len() as u64);
        l.transmit(wire)?;
        l.loopback.send(state, payload)
    }

    fn control(&mut self, msg: &Control) -> Result<Bytes> {
        let mut l = self.0.borrow_mut();
        let wire = l.loopback.control_cost(msg);
        l.transmit(wire)?;
        l.loopback.control(msg)
    }

    fn bytes_sent(&self) -> Bytes {
        self.0.borrow().loopback.bytes_sent()
    }
}

impl Inbound for Link {
    fn try_recv(&mut self) -> Result<Option<DestMessage>> {
        self.0.borrow_mut().loopback.try_recv()
    }

    fn recv(&mut self) -> Result<DestMessage> {
        self.0.borrow_mut().loopback.recv()
    }
}

/// The VMM side of a guest that writes: `rate` page writes per virtual ms while it runs,
/// each one a store into memory and then a record in the log.
struct TestVm<W: FnMut(u64, u64)> {
    write: W,
    pages: u64,
    rate: f64,
    running: bool,
    last: Duration,
    credit: f64,
    rng: SplitMix64,
    writes: u64,
}

impl<W: FnMut(u64, u64)> Vm for TestVm<W> {
    fn stop(&mut self) -> Result<()> {
        self.running = false;
        Ok(())
    }

    fn resume(&mut self) -> Result<()> {
        self.running = true;
        Ok(())
    }

    fn set_throttle(&mut self, _percent: u8) {}

    fn run_until(&mut self, now: Duration) {
        let ms = now.saturating_sub(self.last).as_secs_f64() * 1e3;
        self.last = self.last.max(now);
        if !self.running {
            return;
        }
        self.credit += ms * self.rate;
        while self.credit >= 1.0 {
            self.credit -= 1.0;
            let page = self.rng.below(self.pages);
            self.writes += 1;
            (self.write)(page, self.writes.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        }
    }
}

fn config() -> LoopConfig {
    LoopConfig {
        downtime_limit: Millis(50),
        max_bandwidth: None,
        iterate_chunk: Bytes(64 << 10),
        ..LoopConfig::default()
    }
}

fn migrate<M: GuestMemory, L: DirtyLog, V: Vm>(
    state: &mut RamState<M, L>,
    vm: &mut V,
    clock: &ManualClock,
    link: &Link,
) -> Result<dirty_bitmap::migration::Outcome> {
    let (mut c, mut o, mut i) = (clock.clone(), link.clone(), link.clone());
    run(
        &config(),
        Endpoints {
            clock: &mut c,
            vm,
            out: &mut o,
            inbound: &mut i,
        },
        &mut [state as &mut dyn MigrationState],
        &mut AutoConverge::default(),
    )
}

/// One guest: memory, log, link, VM, all at `page_size`.
fn guest(pages: u64, page_size: usize) -> (Arc<VecMemory>, Arc<RecordingLog>, ManualClock, Link) {
    let mem = Arc::new(VecMemory::new(pages, page_size));
    let log = Arc::new(RecordingLog {
        pages,
        page_size,
        ..RecordingLog::default()
    });
    let mut init = SplitMix64::new(page_size as u64);
    for p in 0..pages {
        mem.write(p, 0, init.next_u64());
        log.record(p);
    }
    let clock = ManualClock::new();
    // About 20 MB/s: RAM of 256 pages of 4 KiB takes 50 ms a pass.
    let dest = DestModel::new(RAM_ID, pages, 1).with_page_size(page_size);
    let link = Link::new(dest, &clock, 20_000);
    (mem, log, clock, link)
}

fn writer(
    mem: &Arc<VecMemory>,
    log: &Arc<RecordingLog>,
    pages: u64,
    rate: f64,
    seed: u64,
) -> TestVm<impl FnMut(u64, u64)> {
    let (m, l) = (Arc::clone(mem), Arc::clone(log));
    TestVm {
        // The store, then the record: the writer's half of the log contract.
        write: move |page, value| {
            m.write(page, (value % 4096) as usize, value);
            l.record(page);
        },
        pages,
        rate,
        running: true,
        last: Duration::ZERO,
        credit: 0.0,
        rng: SplitMix64::new(seed),
        writes: 0,
    }
}

#[test]
fn a_vec_memory_and_an_external_log_migrate_whole() {
    for page_size in [4096, 16 << 10] {
        let pages = 256;
        let (mem, log, clock, link) = guest(pages, page_size);
        let mut vm = writer(&mem, &log, pages, 0.5, 3);
        let mut state = RamState::new(
            RAM_ID,
            Arc::clone(&mem),
            Arc::clone(&log),
            SetupMode::Full,
            false,
            16,
        )
        .unwrap();
        let o = migrate(&mut state, &mut vm, &clock, &link).unwrap();
        assert_eq!(o.kind, Kind::Completed, "{page_size}: {o:?}");
        assert!(vm.writes > 0, "{page_size}: the guest never wrote");
        // More than the setup's and the final harvest: the loop synced while the guest ran.
        assert!(log.harvests.load(Relaxed) > 2, "{page_size}");
        assert!(log.dirty.lock().unwrap().is_empty());
        assert!(
            state.stats().pages_sent > pages,
            "{page_size}: {:?}",
            state.stats()
        );
        assert!(
            mem.snapshot() == link.dest_ram(),
            "{page_size}: RAM differs"
        );
    }
}

#[test]
fn a_failed_attempt_gives_its_pages_back_to_the_external_log() {
    let (pages, page_size) = (128, 16 << 10);
    let (mem, log, clock, link) = guest(pages, page_size);
    let mut vm = writer(&mem, &log, pages, 0.2, 5);
    let mut state = RamState::new(
        RAM_ID,
        Arc::clone(&mem),
        Arc::clone(&log),
        SetupMode::Full,
        false,
        8,
    )
    .unwrap();
    // Cut mid first pass: the Hello is send 1, then batches of 8 pages.
    link.0.borrow_mut().cut_at_send = Some(6);
    let e = migrate(&mut state, &mut vm, &clock, &link).unwrap_err();
    assert!(matches!(e, MigrationError::Io(_)), "{e}");
    assert!(vm.running);
    // Every page sent (5 batches), and every page left to send, is back in the log.
    assert!(
        log.redirtied.load(Relaxed) >= pages,
        "{}",
        log.redirtied.load(Relaxed)
    );
    assert_eq!(log.dirty.lock().unwrap().len() as u64, pages);

    link.0.borrow_mut().cut_at_send = None;
    let mut again = RamState::new(
        RAM_ID,
        Arc::clone(&mem),
        Arc::clone(&log),
        SetupMode::Incremental,
        false,
        8,
    )
    .unwrap();
    let o = migrate(&mut again, &mut vm, &clock, &link).unwrap();
    assert_eq!(o.kind, Kind::Completed, "{o:?}");
    assert!(
        mem.snapshot() == link.dest_ram(),
        "RAM differs after the retry"
    );
}

#[test]
fn a_log_of_another_geometry_is_refused() {
    let mem = Arc::new(VecMemory::new(8, 4096));
    for (pages, page_size) in [(9, 4096), (8, 8192)] {
        let log = Arc::new(RecordingLog {
            pages,
            page_size,
            ..RecordingLog::default()
        });
        let r = RamState::new(RAM_ID, Arc::clone(&mem), log, SetupMode::Full, false, 4);
        assert!(matches!(r, Err(MigrationError::InvalidInput(_))), "{r:?}");
    }
    let odd = Arc::new(VecMemory::new(8, 3000));
    let log = Arc::new(RecordingLog {
        pages: 8,
        page_size: 3000,
        ..RecordingLog::default()
    });
    assert!(RamState::new(RAM_ID, odd, log, SetupMode::Full, false, 4).is_err());
}

/// A guest on a weakly ordered machine, as the migration thread sees it: a guest store is
/// invisible to the migration thread's reads until something orders it before them. The
/// writer follows the contract (store, `fence(SeqCst)`, mark), so in the C++ model:
///
/// - a mark that sets the bit (a read-modify-write after the writer's fence) releases the
///   writer's earlier stores to the harvest that takes the bit (acquire);
/// - a mark that finds the bit already set writes nothing, so only the migration thread's
///   own fence after the harvest ([`DirtyLog::fence`]) makes that store visible.
///
/// Memory and log in one (the RAM state holds it twice). It also checks the order itself:
/// every page read must come after a harvest and then a fence.
struct WeakGuest {
    page_size: usize,
    pages: u64,
    inner: Mutex<Weak>,
}

#[derive(Default)]
struct Weak {
    /// What the migration thread's reads see.
    visible: Vec<u8>,
    /// The guest's memory in its own program order.
    latest: Vec<u8>,
    /// Stores not yet visible to the migration thread: (sequence, byte offset, value).
    pending: Vec<(u64, usize, u64)>,
    /// Per page: the sequence number of the store whose mark set the bit, if set.
    dirty: Vec<Option<u64>>,
    seq: u64,
    /// A harvest happened and a fence followed it.
    fenced: bool,
    reads_unordered: u64,
    harvests: u64,
}

impl Weak {
    fn publish(&mut self, upto: u64) {
        let (now, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|&(s, ..)| s <= upto);
        self.pending = later;
        for (_, start, value) in now {
            self.visible[start..start + 8].copy_from_slice(&value.to_le_bytes());
        }
    }
}

impl WeakGuest {
    fn new(pages: u64, page_size: usize) -> WeakGuest {
        let len = pages as usize * page_size;
        WeakGuest {
            page_size,
            pages,
            inner: Mutex::new(Weak {
                visible: vec![0; len],
                latest: vec![0; len],
                dirty: vec![None; pages as usize],
                ..Weak::default()
            }),
        }
    }

    /// The guest's write protocol: store, fence, mark.
    fn write(&self, page: u64, value: u64) {
        let mut w = self.inner.lock().unwrap();
        w.seq += 1;
        let seq = w.seq;
        let start = page as usize * self.page_size + (value as usize % (self.page_size / 8)) * 8;
        w.latest[start..start + 8].copy_from_slice(&value.to_le_bytes());
        w.pending.push((seq, start, value));
        let bit = &mut w.dirty[page as usize];
        if bit.is_none() {
            *bit = Some(seq);
        }
    }

    fn latest(&self) -> Vec<u8> {
        self.inner.lock().unwrap().latest.clone()
    }
}

impl GuestMemory for WeakGuest {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        let mut w = self.inner.lock().unwrap();
        if !w.fenced {
            w.reads_unordered += 1;
        }
        let start = page as usize * self.page_size;
        out.copy_from_slice(&w.visible[start..start + self.page_size]);
    }

    fn migration_id(&self) -> u64 {
        0x7E57_0000_0000_0002
    }
}

impl DirtyLog for WeakGuest {
    fn page_size(&self) -> usize {
        self.page_size
    }

    fn pages(&self) -> u64 {
        self.pages
    }

    fn harvest(&self, into: &mut DirtyPages<'_>) {
        let mut w = self.inner.lock().unwrap();
        w.harvests += 1;
        w.fenced = false;
        let mut released = 0;
        for p in 0..self.pages {
            if let Some(seq) = w.dirty[p as usize].take() {
                released = released.max(seq);
                into.add(p);
            }
        }
        // Taking a bit synchronizes with the mark that set it, and so with every store
        // before that mark.
        w.publish(released);
    }

    fn fence(&self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let mut w = self.inner.lock().unwrap();
        w.fenced = w.harvests > 0;
        w.publish(u64::MAX);
    }

    fn redirty(&self, first: u64, count: u64) {
        let mut w = self.inner.lock().unwrap();
        for p in first..first + count {
            w.dirty[p as usize].get_or_insert(0);
        }
    }
}

/// The full setup discards what the log held, since the first pass sends every page; the
/// copies of that pass must still come after a fence. A page written twice before the
/// migration (the second mark finds the bit set and writes nothing) has its second store
/// ordered before the copies only by that fence: without it, the first pass sends the
/// first value, the log no longer has the page, and the destination keeps it stale. The
/// guest also writes during the migration.
#[test]
fn the_full_setup_fences_its_harvest_before_the_first_pass() {
    let (pages, page_size) = (64, 4096);
    let g = Arc::new(WeakGuest::new(pages, page_size));
    for round in 1..=2 {
        for p in 0..pages {
            g.write(p, 2 * p + round);
        }
    }
    let clock = ManualClock::new();
    let link = Link::new(DestModel::new(RAM_ID, pages, 2), &clock, 20_000);
    let w = Arc::clone(&g);
    let mut vm = TestVm {
        write: move |page, value| w.write(page, value),
        pages,
        rate: 0.2,
        running: true,
        last: Duration::ZERO,
        credit: 0.0,
        rng: SplitMix64::new(9),
        writes: 0,
    };
    let mut state = RamState::new(
        RAM_ID,
        Arc::clone(&g),
        Arc::clone(&g),
        SetupMode::Full,
        false,
        4,
    )
    .unwrap();
    let o = migrate(&mut state, &mut vm, &clock, &link).unwrap();
    assert_eq!(o.kind, Kind::Completed, "{o:?}");
    assert!(vm.writes > 0);
    assert_eq!(
        g.inner.lock().unwrap().reads_unordered,
        0,
        "a page was read after a harvest with no fence in between"
    );
    let (src, dst) = (g.latest(), link.dest_ram());
    let stale: Vec<usize> = (0..pages as usize)
        .filter(|&p| {
            src[p * page_size..(p + 1) * page_size] != dst[p * page_size..(p + 1) * page_size]
        })
        .collect();
    assert!(
        stale.is_empty(),
        "stale on the destination: pages {stale:?}"
    );
}
