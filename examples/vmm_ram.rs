//! A VMM migrating its guest's RAM with its own memory and its own dirty log: the way a
//! hypervisor plugs into the migration loop instead of using this crate's `GuestRam`.
//!
//! - The guest memory is the VMM's (here a vector of atomic words standing for its
//!   mapping); it implements [`GuestMemory`]: page size, page count, copy one page.
//! - The dirty log is the VMM's (here a bitmap in KVM's layout that the vCPU threads set;
//!   with KVM it would be `KVM_GET_DIRTY_LOG` or the dirty ring); it implements
//!   [`DirtyLog`]: hand over the pages dirtied since the last harvest, take back pages
//!   a failed attempt gives up.
//! - The vCPUs follow the writer's order: store into the page, `fence(SeqCst)`, then mark.
//!   The RAM state harvests, fences, and only then copies, so a write racing a copy is
//!   sent again.
//! - [`Vm::stop`] returns only when no write is in flight and none can start.
//!
//! The link is an in-process destination (the simulation's `Loopback`); over TCP the same
//! state goes to `migration::tcp::migrate_to`.
//!
//! `cargo run --example vmm_ram`

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering::{AcqRel, Relaxed, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8};
use std::sync::{Arc, RwLock};
use std::thread;
use std::time::Duration;

use dirty_bitmap::migration::sim::{DestModel, Loopback};
use dirty_bitmap::migration::{
    self, run, AutoConverge, Bytes, Control, DestMessage, DirtyLog, DirtyPages, Endpoints,
    GuestMemory, Inbound, Kind, LoopConfig, MigrationState, Millis, Outbound, RamState, RealClock,
    SetupMode, StateId, Vm, RAM_ID,
};
use dirty_bitmap::rng::SplitMix64;

const PAGE_SIZE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
const PAGES: u64 = 2048; // 8 MiB

/// The VMM's guest memory: atomic words, so that a vCPU may write while a page is copied.
struct VmmMemory {
    words: Vec<AtomicU64>,
}

impl GuestMemory for VmmMemory {
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    fn pages(&self) -> u64 {
        PAGES
    }

    fn read_page(&self, page: u64, out: &mut [u8]) {
        let words = &self.words[page as usize * WORDS_PER_PAGE..][..WORDS_PER_PAGE];
        for (w, chunk) in words.iter().zip(out.chunks_exact_mut(8)) {
            chunk.copy_from_slice(&w.load(Relaxed).to_le_bytes());
        }
    }

    fn migration_id(&self) -> u64 {
        0x5EED_0000_0000_0001
    }
}

/// The VMM's dirty log: one bit per page in 64-bit words, KVM's layout.
struct VmmDirtyLog {
    bits: Vec<AtomicU64>,
}

impl VmmDirtyLog {
    fn mark(&self, page: u64) {
        self.bits[(page / 64) as usize].fetch_or(1 << (page % 64), Relaxed);
    }
}

impl DirtyLog for VmmDirtyLog {
    fn page_size(&self) -> usize {
        PAGE_SIZE
    }

    fn pages(&self) -> u64 {
        PAGES
    }

    fn harvest(&self, into: &mut DirtyPages<'_>) {
        // Fetch and clear, as KVM_GET_DIRTY_LOG does; the state's fence follows.
        let taken: Vec<u64> = self.bits.iter().map(|w| w.swap(0, AcqRel)).collect();
        into.add_words(0, &taken);
    }

    fn redirty(&self, first: u64, count: u64) {
        for page in first..first + count {
            self.mark(page);
        }
    }
}

/// The vCPUs: one thread writing pages; `gate` is held (shared) across each write and its
/// mark, and taken exclusively by `stop`.
struct Vcpus {
    gate: Arc<RwLock<bool>>,
    quit: Arc<AtomicBool>,
    /// Auto-converge: percent of time the vCPUs sit out.
    throttle: Arc<AtomicU8>,
    thread: Option<thread::JoinHandle<u64>>,
}

impl Vcpus {
    fn start(mem: Arc<VmmMemory>, log: Arc<VmmDirtyLog>) -> Vcpus {
        let gate = Arc::new(RwLock::new(true));
        let quit = Arc::new(AtomicBool::new(false));
        let throttle = Arc::new(AtomicU8::new(0));
        let (g, q, t) = (Arc::clone(&gate), Arc::clone(&quit), Arc::clone(&throttle));
        let thread = thread::spawn(move || {
            let mut rng = SplitMix64::new(7);
            let mut writes = 0u64;
            while !q.load(Relaxed) {
                {
                    let running = g.read().unwrap();
                    // A burst of 20 page writes, 90 % of them into 64 hot pages.
                    for _ in 0..20 {
                        if !*running {
                            break;
                        }
                        let page = if rng.below(10) < 9 {
                            rng.below(64)
                        } else {
                            rng.below(PAGES)
                        };
                        let word = page as usize * WORDS_PER_PAGE + rng.below(512) as usize;
                        // Store, fence, mark: the writer's half of the order.
                        mem.words[word].store(rng.next_u64(), Relaxed);
                        fence(SeqCst);
                        log.mark(page);
                        writes += 1;
                    }
                }
                let slow = 100 / (100 - u64::from(t.load(Relaxed).min(99)));
                thread::sleep(Duration::from_micros(200 * slow));
            }
            writes
        });
        Vcpus {
            gate,
            quit,
            throttle,
            thread: Some(thread),
        }
    }

    fn shut_down(&mut self) -> u64 {
        self.quit.store(true, Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap())
    }
}

impl Vm for Vcpus {
    /// Taking the gate exclusively waits for the write in flight; none starts until resume.
    /// A VMM also pauses its devices here and drains the guest's disk I/O: every disk
    /// write completed or cancelled, and marked in its disk bitmaps.
    fn stop(&mut self) -> migration::Result<()> {
        *self.gate.write().unwrap() = false;
        Ok(())
    }

    fn resume(&mut self) -> migration::Result<()> {
        *self.gate.write().unwrap() = true;
        Ok(())
    }

    fn set_throttle(&mut self, percent: u8) {
        self.throttle.store(percent, Relaxed);
    }
}

/// Both directions of the in-process channel, as the loop takes them: two handles on one
/// loopback.
#[derive(Clone)]
struct Link(Rc<RefCell<Loopback>>);

impl Outbound for Link {
    fn send(&mut self, state: StateId, payload: &[u8]) -> migration::Result<Bytes> {
        self.0.borrow_mut().send(state, payload)
    }

    fn control(&mut self, msg: &Control) -> migration::Result<Bytes> {
        self.0.borrow_mut().control(msg)
    }

    fn bytes_sent(&self) -> Bytes {
        self.0.borrow().bytes_sent()
    }
}

impl Inbound for Link {
    fn try_recv(&mut self) -> migration::Result<Option<DestMessage>> {
        self.0.borrow_mut().try_recv()
    }

    fn recv(&mut self) -> migration::Result<DestMessage> {
        self.0.borrow_mut().recv()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mem = Arc::new(VmmMemory {
        words: (0..PAGES as usize * WORDS_PER_PAGE)
            .map(|i| AtomicU64::new(i as u64 * 0x9E37_79B9))
            .collect(),
    });
    let log = Arc::new(VmmDirtyLog {
        bits: (0..PAGES.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
    });
    let mut vcpus = Vcpus::start(Arc::clone(&mem), Arc::clone(&log));

    // The RAM state over the VMM's memory and log; the first pass sends every page.
    let mut ram = RamState::new(
        RAM_ID,
        Arc::clone(&mem),
        Arc::clone(&log),
        SetupMode::Full,
        false,
        64,
    )?;
    let link = Link(Rc::new(RefCell::new(Loopback::new(DestModel::new(
        RAM_ID, PAGES, 1,
    )))));
    let config = LoopConfig {
        downtime_limit: Millis(30),
        iterate_chunk: Bytes(1 << 20),
        ..LoopConfig::default()
    };
    let (mut out, mut inbound) = (link.clone(), link.clone());
    let outcome = run(
        &config,
        Endpoints {
            clock: &mut RealClock::new(),
            vm: &mut vcpus,
            out: &mut out,
            inbound: &mut inbound,
        },
        &mut [&mut ram as &mut dyn MigrationState],
        &mut AutoConverge::default(),
    );
    let writes = vcpus.shut_down();
    let outcome = outcome?;
    assert_eq!(outcome.kind, Kind::Completed);

    // The VM is stopped: the destination holds exactly the source's RAM.
    let mut page = vec![0u8; PAGE_SIZE];
    let link = link.0.borrow();
    let dest = link.dest.ram();
    for p in 0..PAGES {
        mem.read_page(p, &mut page);
        assert_eq!(
            &dest[p as usize * PAGE_SIZE..][..PAGE_SIZE],
            &page[..],
            "page {p}"
        );
    }
    println!(
        "migrated {} pages of {} B with the guest writing ({writes} page writes): {} pages \
         sent, {} syncs of the VMM's dirty log, downtime {:?}; destination RAM equals source",
        PAGES,
        PAGE_SIZE,
        ram.stats().pages_sent,
        ram.stats().syncs,
        outcome.downtime
    );
    Ok(())
}
