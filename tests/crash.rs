//! Crash consistency of every `BitmapStore` operation.
//!
//! One run on a `CrashStorage` of: create, add ×3, activate, flushes with concurrent marks,
//! inactivate, marks while inactive, activate, flush, inactivate, activate, remove,
//! inactivate, merge, clear, store, reopen, resize (grow), resize (shrink), merge from another
//! image, activate, flush, inactivate, then twice activate, flush, and the relocating
//! `inactivate_full_rewrite`. Then the image a crash after every op would leave,
//! with the unsynced tail dropped, kept, or torn at 512-byte sectors (two seeds,
//! `DBM_CRASH_TEARS=N` for N), for 512 B,
//! 4 KiB and 64 KiB clusters. Every image must:
//! - open with the library (or not be an image yet: no magic before `create` finished);
//! - show no refcount corruption in our check, nor in `qemu-img check` (exit 0 or 3), and
//!   the two agree on whether clusters leak (every image, or a seeded 1 in N with
//!   `DBM_CRASH_SAMPLE=N`);
//! - leak only inside the leak window of the operation the crash interrupted
//!   ([`LEAK_WINDOWS`], the table of `docs/CRASH-CONSISTENCY.md`), and every window that can
//!   leak must be seen leaking at least once (so the classification is not vacuous);
//! - list every bitmap the last checkpoint requires (only `remove`, once its header write
//!   was issued, may drop the one it removes);
//! - never be falsely clean: every bitmap is inconsistent, or holds every bit marked before
//!   the last operation that completed before the crash point (an inactive merge, clear,
//!   store or resize) or the last inactivate that *started* before it (a crash part-way
//!   through an inactivate may leave a bitmap clean only with all of its marks), clipped to the image's disk size. Inside a commit
//!   operation, once its header write was issued, the operation's result is allowed instead:
//!   for `clear` that is an exactly empty bitmap, for `resize` the new size with the bits
//!   clipped to it; before that write, only the old state. The disk size is always the old
//!   or (after the header write) the new one.
//!
//! The write order of each operation is asserted too: a commit writes cluster 0 once (a
//! bracketed resize three times, the first add at 64 KiB clusters twice, bit 0 set only in
//! the second), after the refcounts of its new clusters, and only refcounts after it;
//! `activate` writes no refcounts.

mod common;

use dirty_bitmap::{OpenMode, Recording};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::qemu::{p, run};
use common::{first_not_dirty, seeded_rng};
use dirty_bitmap::storage::{CrashMode, CrashStorage, FileStorage, MemStorage, Op};
use dirty_bitmap::{BitmapState, BitmapStore, DirtyBitmap};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

const MIB: u64 = 1 << 20;
const DISK: u64 = 32 * MIB;
/// The disk after the grow and after the shrink (odd multiples of 512).
const GROWN: u64 = 48 * MIB + 3 * 512;
const SHRUNK: u64 = 20 * MIB + 512;
/// Random marks of the first sections stay below this offset, so that the granules marked
/// at [`FRESH_FLUSH`] and [`FRESH_INACTIVATE`] lie in data clusters nothing else touched.
const MARKED: u64 = DISK - 4 * MIB;
/// Granules past [`MARKED`]. At 512-byte clusters each of bitmap a's data clusters covers
/// 2 MiB of disk, and these two lie in its last two, unallocated until the mark is written:
/// the flush and the inactivate that write them allocate, so their leak windows hold crash
/// points whatever the marker thread's timing did to the other flushes and inactivates.
const FRESH_FLUSH: (u64, u64) = (DISK - 3 * MIB, 512);
const FRESH_INACTIVATE: (u64, u64) = (DISK - MIB, 512);

type Marks = Vec<(u64, u64)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Kind {
    Create,
    Add,
    Activate,
    Flush,
    Inactivate,
    Remove,
    Merge,
    MergeFrom,
    Clear,
    Store,
    Resize,
    /// `inactivate_full_rewrite`: QEMU's relocating store at the stop.
    FullRewrite,
}

/// Which writes open an operation's leak window. A crash after such a write was issued and
/// before the operation's last op (its final barrier) may leave leaked clusters (`qemu-img
/// check` exit 3); a crash anywhere else must leave none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Opens {
    /// Never leaks: nothing is referenced by durable metadata without its refcount, nor the
    /// reverse.
    Never,
    /// The first write to a refcount block or the reftable: the refcounts of fresh clusters
    /// (or of freed ones) reaching the disk before the metadata that references them (or
    /// stops referencing them) is durable. QEMU: `qcow2_alloc_clusters` in
    /// `store_bitmap_data`/`store_bitmap`/`bitmap_list_store`, written back by
    /// `qcow2_flush_caches` in `update_ext_header_and_dir` (or earlier by cache eviction), and
    /// `free_bitmap_clusters` after the commit; for flush, a guest write's cluster allocation
    /// (`qcow2_alloc_cluster_link_l2` after the refcount update).
    RefcountWrite,
    /// The first refcount write or the first cluster-0 write, which clears autoclear bit 0:
    /// while it is clear the directory is untrusted, so every bitmap cluster counts as
    /// leaked until the final header write sets it again and its barrier completes. QEMU:
    /// `update_ext_header_and_dir_in_place`, whose comments say the same.
    RefcountOrHeaderWrite,
}

/// The leak table of `docs/CRASH-CONSISTENCY.md`, one row per operation.
const LEAK_WINDOWS: &[(Kind, Opens)] = &[
    (Kind::Create, Opens::Never),
    (Kind::Add, Opens::RefcountWrite),
    // Flags in place with one barrier: the image never holds a cleared autoclear bit.
    (Kind::Activate, Opens::Never),
    (Kind::Flush, Opens::RefcountWrite),
    // The incremental stop writes its flush part, then the directory's flags in place: no
    // cluster 0 (asserted in `classify`), bit 0 stays set, only fresh clusters may leak.
    (Kind::Inactivate, Opens::RefcountWrite),
    (Kind::Remove, Opens::RefcountWrite),
    (Kind::Merge, Opens::RefcountWrite),
    (Kind::MergeFrom, Opens::RefcountWrite),
    (Kind::Clear, Opens::RefcountWrite),
    (Kind::Store, Opens::RefcountWrite),
    (Kind::Resize, Opens::RefcountOrHeaderWrite),
    (Kind::FullRewrite, Opens::RefcountOrHeaderWrite),
];

/// The operations that commit through one cluster-0 write (copy-on-write).
fn is_commit(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Add
            | Kind::Remove
            | Kind::Merge
            | Kind::MergeFrom
            | Kind::Clear
            | Kind::Store
            | Kind::Resize
    )
}

/// One operation's ops in the log: `ops[start..end]`.
#[derive(Debug, Clone, Copy)]
struct Span {
    kind: Kind,
    start: usize,
    end: usize,
}

/// What a consistent bitmap must hold.
#[derive(Debug, Clone)]
enum Req {
    /// Every bit of these ranges (clipped to the disk).
    Superset(Marks),
    /// No bit at all: the result of a completed clear.
    Empty,
}

/// The durable state required from op `at` on: after an operation completed, or from the
/// start of an inactivate.
#[derive(Debug, Clone)]
struct Checkpoint {
    at: usize,
    size: u64,
    required: BTreeMap<&'static str, Req>,
}

struct Run {
    crash: CrashStorage,
    spans: Vec<Span>,
    checkpoints: Vec<Checkpoint>,
}

fn mark_some(t: &dirty_bitmap::Tracker, rng: &mut SmallRng, disk: u64, n: usize, log: &mut Marks) {
    for _ in 0..n {
        let off = rng.random_range(0..disk - 8192);
        let len = rng.random_range(1..8192);
        t.mark(off, len);
        log.push((off, len));
    }
}

fn random_bitmap(rng: &mut SmallRng, disk: u64, g: u64, n: usize) -> (DirtyBitmap, Marks) {
    let bm = DirtyBitmap::new(disk, g).unwrap();
    let mut log = Vec::new();
    for _ in 0..n {
        let off = rng.random_range(0..disk - 8192);
        let len = rng.random_range(1..8192);
        bm.mark_dirty(off, len);
        log.push((off, len));
    }
    (bm, log)
}

/// Runs `f` as one operation of `kind` and records its span.
fn op<T>(crash: &CrashStorage, spans: &mut Vec<Span>, kind: Kind, f: impl FnOnce() -> T) -> T {
    let start = crash.op_count();
    let r = f();
    spans.push(Span {
        kind,
        start,
        end: crash.op_count(),
    });
    r
}

fn run_workload(cs: u64, seed: u64) -> Run {
    let crash = CrashStorage::new();
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut marks: Marks = Vec::new();
    let mut cps = Vec::new();
    let mut spans = Vec::new();
    let c = &crash;
    let mut s = op(c, &mut spans, Kind::Create, || {
        BitmapStore::create(c, DISK, cs).unwrap()
    });
    for (name, g, on) in [
        ("a", 512, Recording::Enabled),
        ("b", 4096, Recording::Enabled),
        ("d", 65536, Recording::Disabled),
    ] {
        op(c, &mut spans, Kind::Add, || s.add(name, g, on).unwrap());
    }
    op(c, &mut spans, Kind::Activate, || s.activate().unwrap());
    let t = s.tracker().unwrap();

    // Flushes with concurrent marks.
    {
        let store = Mutex::new(s);
        let stop = Arc::new(AtomicBool::new(false));
        let marker = {
            let t = t.clone();
            let stop = Arc::clone(&stop);
            let mut r = SmallRng::seed_from_u64(seed ^ 0x5eed);
            std::thread::spawn(move || {
                let mut log = Vec::new();
                while !stop.load(Ordering::Relaxed) && log.len() < 400 {
                    mark_some(&t, &mut r, MARKED, 1, &mut log);
                    std::thread::yield_now();
                }
                log
            })
        };
        for _ in 0..3 {
            op(c, &mut spans, Kind::Flush, || store.lock().flush().unwrap());
            std::thread::yield_now();
        }
        stop.store(true, Ordering::Relaxed);
        marks.extend(marker.join().unwrap());
        s = store.into_inner();
    }
    mark_some(&t, &mut rng, MARKED, 20, &mut marks);
    let sup = |m: &Marks| Req::Superset(m.clone());
    let required = |m: &Marks, names: &[&'static str]| {
        let mut r = BTreeMap::from([("d", Req::Superset(vec![]))]);
        for &n in names {
            r.insert(n, sup(m));
        }
        r
    };
    let started = c.op_count();
    op(c, &mut spans, Kind::Inactivate, || s.inactivate().unwrap());
    cps.push(Checkpoint {
        at: started,
        size: DISK,
        required: required(&marks, &["a", "b"]),
    });

    // Marks while inactive: kept in memory, written by the next inactivate.
    mark_some(&t, &mut rng, MARKED, 10, &mut marks);
    op(c, &mut spans, Kind::Activate, || s.activate().unwrap());
    mark_some(&t, &mut rng, MARKED, 20, &mut marks);
    t.mark(FRESH_FLUSH.0, FRESH_FLUSH.1);
    marks.push(FRESH_FLUSH);
    op(c, &mut spans, Kind::Flush, || s.flush().unwrap());
    mark_some(&t, &mut rng, MARKED, 20, &mut marks);
    t.mark(FRESH_INACTIVATE.0, FRESH_INACTIVATE.1);
    marks.push(FRESH_INACTIVATE);
    let started = c.op_count();
    op(c, &mut spans, Kind::Inactivate, || s.inactivate().unwrap());
    cps.push(Checkpoint {
        at: started,
        size: DISK,
        required: required(&marks, &["a", "b"]),
    });

    op(c, &mut spans, Kind::Activate, || s.activate().unwrap());
    mark_some(&t, &mut rng, MARKED, 5, &mut marks);
    op(c, &mut spans, Kind::Remove, || s.remove("b").unwrap());
    mark_some(&t, &mut rng, MARKED, 5, &mut marks);
    let started = c.op_count();
    op(c, &mut spans, Kind::Inactivate, || s.inactivate().unwrap());
    let mut req = required(&marks, &["a"]);
    cps.push(Checkpoint {
        at: started,
        size: DISK,
        required: req.clone(),
    });

    // Inactive copy-on-write operations, each durable when it returns.
    op(c, &mut spans, Kind::Merge, || s.merge("a", "d").unwrap());
    req.insert("d", sup(&marks));
    cps.push(Checkpoint {
        at: c.op_count(),
        size: DISK,
        required: req.clone(),
    });
    op(c, &mut spans, Kind::Clear, || s.clear("a").unwrap());
    req.insert("a", Req::Empty);
    cps.push(Checkpoint {
        at: c.op_count(),
        size: DISK,
        required: req.clone(),
    });
    let (bm, stored) = random_bitmap(&mut rng, DISK, 512, 30);
    op(c, &mut spans, Kind::Store, || s.store("a", &bm).unwrap());
    req.insert("a", sup(&stored));
    cps.push(Checkpoint {
        at: c.op_count(),
        size: DISK,
        required: req.clone(),
    });

    // Resize needs a store without parked bitmaps: reopen (opening writes nothing).
    drop(s);
    let before = c.op_count();
    let mut s = BitmapStore::open(c, OpenMode::ReadWrite).unwrap();
    assert_eq!(c.op_count(), before, "opening wrote");
    for size in [GROWN, SHRUNK] {
        op(c, &mut spans, Kind::Resize, || s.resize(size).unwrap());
        cps.push(Checkpoint {
            at: c.op_count(),
            size,
            required: req.clone(),
        });
    }

    let other = {
        let mut o = BitmapStore::create(MemStorage::new(), SHRUNK, 65536).unwrap();
        o.add("src", 65536, Recording::Enabled).unwrap();
        let (bm, m) = random_bitmap(&mut rng, SHRUNK, 65536, 10);
        o.store("src", &bm).unwrap();
        if let Some(Req::Superset(d)) = req.get_mut("d") {
            d.extend(m);
        }
        o
    };
    op(c, &mut spans, Kind::MergeFrom, || {
        s.merge_from(&other, "src", "d").unwrap();
    });
    cps.push(Checkpoint {
        at: c.op_count(),
        size: SHRUNK,
        required: req.clone(),
    });

    // The resized bitmaps work on: activate, mark, flush and the incremental stop; then
    // twice QEMU's relocating stop (new tables and a new directory, the old ones freed).
    for stop in [Kind::Inactivate, Kind::FullRewrite, Kind::FullRewrite] {
        op(c, &mut spans, Kind::Activate, || s.activate().unwrap());
        let t = s.tracker().unwrap();
        let mut late = Vec::new();
        mark_some(&t, &mut rng, SHRUNK, 20, &mut late);
        op(c, &mut spans, Kind::Flush, || s.flush().unwrap());
        mark_some(&t, &mut rng, SHRUNK, 20, &mut late);
        let started = c.op_count();
        op(c, &mut spans, stop, || {
            if stop == Kind::FullRewrite {
                s.inactivate_full_rewrite().unwrap();
            } else {
                s.inactivate().unwrap();
            }
        });
        if let Some(Req::Superset(a)) = req.get_mut("a") {
            a.extend(late);
        }
        cps.push(Checkpoint {
            at: started,
            size: SHRUNK,
            required: req.clone(),
        });
    }
    drop(s);
    // Spans tile the log: every op belongs to exactly one operation.
    for w in spans.windows(2) {
        assert_eq!(w[0].end, w[1].start, "ops outside any operation");
    }
    assert_eq!(spans.last().unwrap().end, crash.op_count());
    Run {
        crash,
        spans,
        checkpoints: cps,
    }
}

fn has_magic(image: &[u8]) -> bool {
    image.len() >= 4 && image[..4] == [0x51, 0x46, 0x49, 0xfb]
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// `qemu-img check` of the image at `path` finds no error (exit 0), or leaked clusters
/// alone (exit 3), as a crash may leave.
fn assert_qemu_check_no_errors(path: &std::path::Path, ctx: &str) {
    let out = run("qemu-img", &["check", "-f", "qcow2", p(path)]);
    let code = out.status.code();
    assert!(
        code == Some(0) || code == Some(3),
        "{ctx}: qemu-img check exit {code:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

/// Where the refcount structures were when each op was issued: the refblocks (never moved
/// nor freed, so the final reftable lists them all) and every reftable with the op index at
/// which the next one replaced it (after which its clusters may be reused).
struct RefcountLayout {
    cluster_bits: u32,
    blocks: HashSet<u64>,
    /// `(first cluster, clusters, in force until op index)`.
    tables: Vec<(u64, u64, usize)>,
}

impl RefcountLayout {
    fn new(ops: &[Op], live: &[u8]) -> Self {
        let cluster_bits = be32(live, 20);
        let table_at = |off: u64, clusters: u32| (off >> cluster_bits, u64::from(clusters));
        let mut tables: Vec<(u64, u64, usize)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let Op::Write { offset, data } = op else {
                continue;
            };
            if *offset == 0 && data.len() >= 104 && tables.is_empty() {
                let (c, n) = table_at(be64(data, 48), be32(data, 56));
                tables.push((c, n, usize::MAX));
            } else if *offset == 48 && data.len() == 12 {
                if let Some(last) = tables.last_mut() {
                    last.2 = i;
                }
                let (c, n) = table_at(be64(data, 0), be32(data, 8));
                tables.push((c, n, usize::MAX));
            }
        }
        let (rt, rtc) = (be64(live, 48), u64::from(be32(live, 56)));
        let mut blocks = HashSet::new();
        for k in 0..(rtc << cluster_bits) / 8 {
            let e = be64(live, (rt + 8 * k) as usize) & !511;
            if e != 0 {
                blocks.insert(e >> cluster_bits);
            }
        }
        Self {
            cluster_bits,
            blocks,
            tables,
        }
    }

    /// Whether op `i` writes a refcount block, a reftable or the reftable pointer.
    fn is_refcount_write(&self, i: usize, op: &Op) -> bool {
        let Op::Write { offset, data } = op else {
            return false;
        };
        if *offset == 48 && data.len() == 12 {
            return true;
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + data.len() as u64 - 1) >> self.cluster_bits;
        (first..=last).any(|c| self.blocks.contains(&c))
            || self
                .tables
                .iter()
                .any(|&(c, n, until)| i < until && first < c + n && c <= last)
    }
}

fn is_header_write(op: &Op) -> bool {
    matches!(op, Op::Write { offset: 0, data } if data.len() >= 104)
}

/// Whether a crash at `point` may tear a cluster-0 write: the unsynced tail of the log
/// before it holds one. The torn-header tests try 64 tear patterns there, one elsewhere.
fn header_write_unsynced(ops: &[Op], point: usize) -> bool {
    ops[..point]
        .iter()
        .rev()
        .take_while(|o| !matches!(o, Op::Sync))
        .any(is_header_write)
}

/// Where a span's landmarks are in the log (op indexes).
#[derive(Debug, Clone, Copy, Default)]
struct Landmarks {
    /// The write that opens the leak window, if the operation has one.
    open: Option<usize>,
    /// A commit's header write: from here the new size may be on disk.
    commit: Option<usize>,
    /// The last cluster-0 write: from here the result may be trusted.
    trusted: Option<usize>,
}

/// Every span's [`Landmarks`], after checking the span's write order.
fn classify(run: &Run) -> Vec<Landmarks> {
    let ops = run.crash.ops();
    let layout = RefcountLayout::new(&ops, &run.crash.live_image());
    let opens: HashMap<Kind, Opens> = LEAK_WINDOWS.iter().copied().collect();
    run.spans
        .iter()
        .map(|sp| {
            let range = sp.start..sp.end;
            let refc = range
                .clone()
                .find(|&i| layout.is_refcount_write(i, &ops[i]));
            let headers: Vec<usize> = range
                .clone()
                .filter(|&i| is_header_write(&ops[i]))
                .collect();
            let mut commit = None;
            if is_commit(sp.kind) {
                // One header write, the commit point; a resize whose bitmaps extension lies
                // past the first sector brackets it with two more (autoclear bit 0 cleared
                // after the new clusters and their refcounts are written, set last). The first add at 64 KiB clusters (the extension's data in
                // the second sector) writes the new cluster 0 with bit 0 clear, the commit
                // point, then the same bytes with bit 0 set (`Image::put_header`). Before the
                // commit, the new clusters' refcounts (if any were allocated); after it, only
                // refcount writes (frees) and the last header.
                let h = match headers.len() {
                    1 => headers[0],
                    3 if sp.kind == Kind::Resize => {
                        assert!(
                            refc.is_none_or(|r| r < headers[0]),
                            "{sp:?}: the bracket opens before the refcounts are written"
                        );
                        headers[1]
                    }
                    2 if sp.kind == Kind::Add => {
                        let data = |i: usize| match &ops[i] {
                            Op::Write { data, .. } => data.to_vec(),
                            _ => unreachable!(),
                        };
                        let (mut first, second) = (data(headers[0]), data(headers[1]));
                        assert!(
                            first[95] & 1 == 0 && second[95] & 1 == 1,
                            "{sp:?}: the bracket's first write trusts the extension"
                        );
                        first[95] |= 1;
                        assert!(
                            first == second,
                            "{sp:?}: the bracket changes more than bit 0"
                        );
                        headers[0]
                    }
                    _ => panic!("{sp:?}: header writes {headers:?}"),
                };
                commit = Some(h);
                for (i, o) in ops.iter().enumerate().take(sp.end).skip(h + 1) {
                    assert!(
                        !matches!(o, Op::Write { .. })
                            || layout.is_refcount_write(i, o)
                            || is_header_write(o),
                        "{sp:?}: op {i} after the commit is not a refcount write"
                    );
                }
                let allocated = (sp.start..h)
                    .any(|i| matches!(ops[i], Op::Write { .. }) && !is_header_write(&ops[i]));
                if allocated {
                    assert!(
                        refc.is_some_and(|r| r < h),
                        "{sp:?}: no refcount flush before the commit"
                    );
                }
            }
            if sp.kind == Kind::Activate {
                assert!(refc.is_none(), "{sp:?}: activate wrote refcounts");
            }
            if sp.kind == Kind::Inactivate {
                assert!(
                    headers.is_empty(),
                    "{sp:?}: inactivate wrote cluster 0 at {headers:?}"
                );
            }
            let open = match opens[&sp.kind] {
                Opens::Never => None,
                Opens::RefcountWrite => refc,
                Opens::RefcountOrHeaderWrite => match (refc, headers.first().copied()) {
                    (Some(r), Some(h)) => Some(r.min(h)),
                    (r, h) => r.or(h),
                },
            };
            Landmarks {
                open,
                commit,
                trusted: headers.last().copied(),
            }
        })
        .collect()
}

/// Checks that a consistent bitmap meets `req` on a disk of `size` bytes; `Err` names what
/// is missing.
fn meets(bm: &DirtyBitmap, req: &Req, size: u64) -> Result<(), String> {
    match req {
        Req::Empty if bm.count() == 0 => Ok(()),
        Req::Empty => Err(format!("{} bits set after a clear", bm.count())),
        Req::Superset(marks) => {
            assert_eq!(bm.disk_size(), size);
            // Every granule of every mark, not only its ends.
            match first_not_dirty(bm, marks.iter().copied()) {
                Some((off, len)) => Err(format!("misses ({off}, {len})")),
                None => Ok(()),
            }
        }
    }
}

#[derive(Default)]
struct Tally {
    points: usize,
    inconsistent: usize,
    clean_checked: usize,
    /// Consistent bitmaps before the first checkpoint: never activated, nothing required.
    unrequired: usize,
    new_state_seen: usize,
    leaks_in_window: BTreeMap<Kind, usize>,
}

#[test]
fn no_crash_point_is_corrupt_leaky_or_falsely_clean() {
    let (mut rng, seed) = seeded_rng("no_crash_point_is_corrupt_leaky_or_falsely_clean");
    let dir = tempfile::tempdir().unwrap();
    let mut qemu_checked = 0;
    let mut qemu_leaks = 0;
    // qemu-img check runs on every crash image; DBM_CRASH_SAMPLE=N checks a seeded 1 in N.
    let every: u32 = common::env_number("DBM_CRASH_SAMPLE", 1);
    assert!(
        every > 0,
        "DBM_CRASH_SAMPLE=0: a sample of 1 in 0 checks nothing"
    );
    // Two tear patterns per crash point; DBM_CRASH_TEARS=N for a longer sweep.
    let tears: u64 = common::env_number("DBM_CRASH_TEARS", 2);
    let mut leaks_by_kind: BTreeMap<Kind, usize> = BTreeMap::new();
    for cs in [512u64, 4096, 65536] {
        let w = run_workload(cs, seed ^ cs);
        let windows = classify(&w);
        let created = w.spans[0].end;
        let mut tally = Tally::default();
        let modes = [CrashMode::Dropped, CrashMode::Kept]
            .into_iter()
            .chain((0..tears).map(|k| CrashMode::Torn { seed: seed ^ k }));
        for mode in modes {
            for (point, image) in w.crash.crash_images(mode) {
                tally.points += 1;
                let ctx = format!("cs {cs} {mode:?} point {point} (seed {seed})");
                if !has_magic(&image) {
                    assert!(point < created, "{ctx}: lost the magic");
                    continue;
                }
                // The operation the crash interrupted (a crash at its last op is after it).
                let at = w
                    .spans
                    .iter()
                    .position(|sp| sp.start < point && point <= sp.end);
                let (span, marks) = match at {
                    Some(k) => (Some(w.spans[k]), windows[k]),
                    None => (None, Landmarks::default()),
                };
                let open = marks.open;
                let issued = |at: Option<usize>| at.is_some_and(|h| h < point);
                let ctx = format!("{ctx} in {span:?}");
                // Every image opens, a torn first add's too (`Image::put_header`).
                let s =
                    BitmapStore::open(MemStorage::from_bytes(image.clone()), OpenMode::ReadOnly)
                        .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let r = s.image().check().unwrap();
                assert_eq!(r.corruptions, 0, "{ctx}: {:?}", r.messages);
                let leaked = r.leaks > 0;
                // qemu-img check: never corruption, and the same verdict on leaks.
                if rng.random_range(0..every) == 0 {
                    let path = dir.path().join("c.qcow2");
                    std::fs::write(&path, &image).unwrap();
                    let out = run("qemu-img", &["check", "-f", "qcow2", p(&path)]);
                    let code = out.status.code();
                    assert!(
                        code == Some(if leaked { 3 } else { 0 }),
                        "{ctx}: qemu-img check {code:?}, our check {} leaks: {}{}",
                        r.leaks,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    qemu_checked += 1;
                    qemu_leaks += usize::from(leaked);
                }
                // Leaks only inside the interrupted operation's window.
                if leaked {
                    let sp = span.unwrap_or_else(|| panic!("{ctx}: leak outside any operation"));
                    assert!(
                        open.is_some_and(|o| o < point) && point < sp.end,
                        "{ctx}: {} leaked clusters outside the leak window (opens at {open:?}): {:?}",
                        r.leaks,
                        r.messages
                    );
                    *tally.leaks_in_window.entry(sp.kind).or_default() += 1;
                }

                // Never falsely clean.
                let before = w.checkpoints.iter().rev().find(|c| c.at <= point);
                let result = span
                    .filter(|sp| is_commit(sp.kind))
                    .and_then(|sp| w.checkpoints.iter().find(|c| c.at == sp.end));
                let size = s.disk_size();
                let sizes: Vec<u64> = before
                    .iter()
                    .chain(result.iter().filter(|_| issued(marks.commit)))
                    .map(|c| c.size)
                    .collect();
                let after = result.filter(|_| issued(marks.trusted));
                assert!(
                    before.is_none() || sizes.contains(&size),
                    "{ctx}: disk size {size}, expected one of {sizes:?}"
                );
                let listed = s.list();
                // Every bitmap required is in the image: one missing would be a tracked
                // disk's history lost. Only the removal that drops it may, from its commit.
                for name in before.iter().flat_map(|c| c.required.keys()) {
                    let removed = span.is_some_and(|sp| sp.kind == Kind::Remove)
                        && issued(marks.commit)
                        && result.is_some_and(|c| !c.required.contains_key(name));
                    assert!(
                        removed || listed.iter().any(|i| i.name.to_str() == Some(*name)),
                        "{ctx}: {name} is required, yet missing from the image"
                    );
                }
                for info in listed {
                    if info.state == BitmapState::Inconsistent {
                        tally.inconsistent += 1;
                        continue;
                    }
                    let bm = s.load(&info.name).unwrap();
                    let name = info.name.to_str().unwrap();
                    let verdict = |c: Option<&Checkpoint>| {
                        let c = c.filter(|c| c.size == size)?;
                        Some(c.required.get(name).map_or(Ok(()), |q| meets(&bm, q, size)))
                    };
                    let old = verdict(before);
                    let new = verdict(after);
                    match (old, new) {
                        (Some(Ok(())), _) => {}
                        (_, Some(Ok(()))) => tally.new_state_seen += 1,
                        // Before the first checkpoint (the first inactivate's start) no mark
                        // was required yet: a consistent bitmap there was never activated
                        // (activate sets in_use with one barrier, before any mark), so it is
                        // as added: empty.
                        (None, None) if before.is_none() => {
                            assert_eq!(
                                bm.count(),
                                0,
                                "{ctx}: {name} consistent before the first inactivate, with bits"
                            );
                            tally.unrequired += 1;
                            continue;
                        }
                        // After it, a consistent bitmap is checked against the state before
                        // the operation or its result: the size assertion above leaves only
                        // the result's size with the result not yet trusted (a resize between
                        // its commit and the header write that sets autoclear bit 0 again),
                        // where the store lists no consistent bitmap. Unchecked, it would pass.
                        (None, None) => panic!(
                            "{ctx}: {name} consistent, yet no checkpoint's requirement applies"
                        ),
                        (o, n) => panic!("{ctx}: false clean: {name}: old {o:?}, new {n:?}"),
                    }
                    tally.clean_checked += 1;
                }
            }
        }
        eprintln!(
            "cs {cs}: {} crash images, {} inconsistent bitmaps, {} consistent bitmaps checked \
             ({} only as the interrupted operation's result), {} consistent before any \
             requirement (empty); leaks inside windows by operation: {:?}",
            tally.points,
            tally.inconsistent,
            tally.clean_checked,
            tally.new_state_seen,
            tally.unrequired,
            tally.leaks_in_window
        );
        assert!(tally.points > 100 && tally.inconsistent > 0 && tally.clean_checked > 0);
        for (k, n) in tally.leaks_in_window {
            *leaks_by_kind.entry(k).or_default() += n;
        }
        // The final image is clean, at the shrunk size.
        let s = BitmapStore::open(
            MemStorage::from_bytes(w.crash.live_image()),
            OpenMode::ReadOnly,
        )
        .unwrap();
        assert!(s.image().check().unwrap().is_clean());
        assert_eq!(s.disk_size(), SHRUNK);
    }
    // Every window that can leak was seen leaking: the classification is not vacuous.
    for kind in [
        Kind::Add,
        Kind::Flush,
        Kind::Inactivate,
        Kind::Remove,
        Kind::Merge,
        Kind::MergeFrom,
        Kind::Clear,
        Kind::Store,
        Kind::Resize,
        Kind::FullRewrite,
    ] {
        assert!(
            leaks_by_kind.get(&kind).is_some_and(|&n| n > 0),
            "no crash image of {kind:?} leaked: {leaks_by_kind:?}"
        );
    }
    eprintln!(
        "qemu-img check ran on {qemu_checked} crash images: {qemu_leaks} with leaks only, the rest clean"
    );
    assert!(qemu_checked > 0);
}

/// A resize whose header write tears at every sector boundary, many ways: the bitmaps
/// extension of a 64 KiB-cluster image sits in the second sector of cluster 0 (after QEMU's
/// feature-name table), the size in the first. A new directory beside the old size (or the
/// reverse) must never load as a consistent bitmap that lacks bits: for each of 32 tear
/// patterns at every crash point, every bitmap is inconsistent, or holds every old bit below
/// its disk size, or is the completed resize, which for a grow holds the grown area too
/// (dirty: it may have been inside the disk before a shrink).
#[test]
fn torn_resize_header_is_never_falsely_clean() {
    for (from, to) in [(GROWN, SHRUNK), (SHRUNK, GROWN)] {
        let crash = CrashStorage::new();
        let mut s = BitmapStore::create(&crash, from, 65536).unwrap();
        s.add("a", 512, Recording::Enabled).unwrap();
        let bm = DirtyBitmap::new(from, 512).unwrap();
        let marks: Marks = (0..from / MIB).map(|m| (m * MIB + 4096, 512)).collect();
        for &(o, l) in &marks {
            bm.mark_dirty(o, l);
        }
        s.store("a", &bm).unwrap();
        let start = crash.op_count();
        s.resize(to).unwrap();
        let end = crash.op_count();
        drop(s);
        let mut consistent = 0;
        let ops = crash.ops();
        for point in start..=end {
            let seeds = if header_write_unsynced(&ops, point) {
                64
            } else {
                1
            };
            for seed in 0..seeds {
                let image = crash.crash_image(point, CrashMode::Torn { seed }).unwrap();
                let ctx = format!("{from} -> {to}, point {point} of {start}..{end}, tear {seed}");
                let s = match BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly) {
                    Ok(s) => s,
                    Err(e) => panic!("{ctx}: {e}"),
                };
                assert_eq!(s.image().check().unwrap().corruptions, 0, "{ctx}");
                let size = s.disk_size();
                assert!(size == from || size == to, "{ctx}: size {size}");
                for info in s.list() {
                    if info.state == BitmapState::Inconsistent {
                        continue;
                    }
                    consistent += 1;
                    let bm = s.load(&info.name).unwrap();
                    let mut want = marks.clone();
                    if size == to && to > from {
                        want.push((from, to - from));
                    }
                    assert!(
                        meets(&bm, &Req::Superset(want), size).is_ok(),
                        "{ctx}: false clean at size {size}"
                    );
                    // Trusted only once the final header write (bit 0 set) was issued.
                    if size == to {
                        assert!(
                            point + 1 >= end,
                            "{ctx}: the new size is trusted before the end"
                        );
                    }
                }
            }
        }
        assert!(consistent > 0);
    }
}

/// A refcount-table growth inside a flush (512-byte clusters: one reftable cluster covers
/// 8 MiB of file, and the flush of a fully dirty 4 MiB bitmap crosses it), crashed at every
/// point from the barrier before the growth's first write to the barrier after its header
/// write, and at points spread over the rest of the flush: every image opens with no
/// corruption (here and in `qemu-img check` at the growth's two steps: a leak at most,
/// never a refcount below its references), and the active bitmap stays `in_use` (never
/// clean). docs/CRASH-CONSISTENCY.md ("Reftable growth") says step 1 may leak; the test
/// prints whether it did. No crash test reached a growth before.
#[test]
fn a_reftable_growth_inside_a_flush_is_never_corrupt_or_falsely_clean() {
    const GIB: u64 = 1 << 30;
    let crash = CrashStorage::new();
    let mut s = BitmapStore::create(&crash, 16 * GIB, 512).unwrap();
    s.add("b", 512, Recording::Enabled).unwrap();
    s.activate().unwrap();
    let before = s.image().header().refcount_table_offset;
    let start = crash.op_count();
    s.bitmap("b").unwrap().mark_dirty(0, 16 * GIB);
    s.flush().unwrap();
    let end = crash.op_count();
    assert_ne!(
        s.image().header().refcount_table_offset,
        before,
        "the flush must grow the refcount table"
    );
    drop(s);
    let ops = crash.ops();
    // The growth's commit: the 12 bytes of reftable offset and size at header offset 48.
    let commit = (start..end)
        .find(|&i| matches!(&ops[i], Op::Write { offset: 48, data } if data.len() == 12))
        .expect("the growth's header write");
    let syncs_before: Vec<usize> = (start..commit)
        .filter(|&i| matches!(ops[i], Op::Sync))
        .collect();
    // Step 1 (dirty refblocks, the new table) runs between the last two barriers before it.
    let from = syncs_before[syncs_before.len().saturating_sub(2)];
    let window = from..=(commit + 2).min(end);
    let spread = (start..=end).step_by(97);
    let mut points: Vec<usize> = window.clone().chain(spread).collect();
    points.sort_unstable();
    points.dedup();
    let mut leaked_in_step_1 = false;
    for &point in &points {
        for mode in [
            CrashMode::Dropped,
            CrashMode::Kept,
            CrashMode::Torn { seed: point as u64 },
        ] {
            let ctx = format!("point {point} of {start}..{end} (commit at {commit}), {mode:?}");
            let image = crash.crash_image(point, mode).unwrap();
            let st = BitmapStore::open(MemStorage::from_bytes(image.clone()), OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let r = st.image().check().unwrap();
            assert_eq!(r.corruptions, 0, "{ctx}: {:?}", r.messages);
            let b = st.list().into_iter().find(|i| i.name == "b").unwrap();
            assert!(b.in_use, "{ctx}: the active bitmap reads clean");
            if r.leaks > 0 && point <= commit && window.contains(&point) {
                leaked_in_step_1 = true;
            }
            if mode == CrashMode::Kept && (point == commit || point == commit + 1) {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("grown.qcow2");
                std::fs::write(&path, &image).unwrap();
                assert_qemu_check_no_errors(&path, &ctx);
            }
        }
    }
    eprintln!("step 1 of the growth leaked at some crash point: {leaked_in_step_1}");
}

/// The stop's in-place whole rewrite (the crossover's branch, `flush::rewrites_whole`: at
/// least 64 changed regions and the threshold's fraction of them, here a threshold of 0)
/// writes every region of the bitmap from memory, those the stop did not take too. Every
/// region holds a random granule of its own (so that no two regions read alike), a flush
/// gives each its cluster, then random granules in 96 of the 128 regions are marked and the
/// store inactivated. A crash at any point of that inactivate, the unsynced tail dropped,
/// kept or torn, leaves an image with no corruption in which "b" is either in use or holds
/// exactly what memory held (a region written from another region's bytes, or zeros, is
/// caught); and some crash point leaves it consistent, so the check is not vacuous. At
/// 512-byte clusters (one region a cluster) and 64 KiB ones (sixteen).
#[test]
fn a_stop_rewriting_every_region_is_never_falsely_clean() {
    let (mut rng, seed) = seeded_rng("a_stop_rewriting_every_region_is_never_falsely_clean");
    // 128 regions at 512-byte granules: of 512 bytes of bits at 512-byte clusters, of
    // 4 KiB at 64 KiB ones (16 a cluster).
    for (cs, disk) in [(512, 256 * MIB), (65536, 2048 * MIB)] {
        let crash = CrashStorage::new();
        let mut s = BitmapStore::create(&crash, disk, cs).unwrap();
        s.add("b", 512, Recording::Enabled).unwrap();
        s.activate().unwrap();
        s.set_rewrite_threshold(0.0).unwrap();
        let b = s.bitmap("b").unwrap();
        let regions = b.region_count();
        assert_eq!(regions, 128);
        let granule_in = |rng: &mut SmallRng, r: u64| {
            let (start, len) = b.region_disk_range(r);
            start + rng.random_range(0..len / 512) * 512
        };
        for r in 0..regions {
            b.mark_dirty(granule_in(&mut rng, r), 512);
        }
        s.flush().unwrap();
        for r in 0..96 {
            b.mark_dirty(granule_in(&mut rng, r), 512);
        }
        let memory: Vec<_> = b.snapshot().dirty_extents().collect();
        let start = crash.op_count();
        let stats = s.inactivate().unwrap();
        let end = crash.op_count();
        // 96 regions taken, every region's bytes written: the whole branch.
        assert_eq!(stats.regions, 96, "{stats:?}");
        assert_eq!(
            stats.bytes_written,
            b.serialized_len(),
            "the stop rewrote every region ({stats:?})"
        );
        drop(s);
        let mut consistent = 0;
        for point in start..=end {
            for mode in [
                CrashMode::Dropped,
                CrashMode::Kept,
                CrashMode::Torn { seed: point as u64 },
            ] {
                let ctx = format!(
                    "seed {seed}, {cs}-byte clusters, point {point} of {start}..{end}, {mode:?}"
                );
                let image = crash.crash_image(point, mode).unwrap();
                let st = BitmapStore::open(MemStorage::from_bytes(image), OpenMode::ReadOnly)
                    .unwrap_or_else(|e| panic!("{ctx}: {e}"));
                let r = st.image().check().unwrap();
                assert_eq!(r.corruptions, 0, "{ctx}: {:?}", r.messages);
                let info = st.list().into_iter().find(|i| i.name == "b").unwrap();
                if info.in_use {
                    continue;
                }
                consistent += 1;
                let held: Vec<_> = st.load("b").unwrap().dirty_extents().collect();
                assert!(held == memory, "{ctx}: \"b\" on disk differs from memory");
            }
        }
        assert!(consistent > 0, "{cs}: no crash point left \"b\" consistent");
    }
}

/// An add on an image whose bitmaps extension is untrusted (autoclear bit 0 cleared by a
/// program without bitmap support, which may then have written the disk unrecorded) rewrites
/// cluster 0 with bit 0 set (first sector) and a new extension, which at 64 KiB clusters lies
/// in the second sector, where the untrusted one lies too. A crash that lands the first
/// sector but not the second must not pair bit 0 with the untrusted extension: its directory
/// (never freed) would load `a` as consistent without the unrecorded writes. For every crash
/// point of the add, torn 64 ways, and for every cluster-0 write of the add landed in its
/// first sector alone: `a` is never consistent, here nor for `qemu-img info`, and the image
/// shows no corruption (here and in `qemu-img check`). 4 KiB clusters (the extension in the
/// first sector) too.
#[test]
fn a_torn_add_never_trusts_an_untrusted_directory_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut sector0_only = 0;
    // Not vacuous: `a` is seen (untrusted) and `b` trusted in some crash images.
    let (mut a_seen, mut b_trusted) = (0, 0);
    for cluster in [4096u64, 65536] {
        let disk = 32 * MIB;
        let first = CrashStorage::new();
        let mut s = BitmapStore::create(&first, disk, cluster).unwrap();
        s.add("a", 65536, Recording::Enabled).unwrap();
        let bm = DirtyBitmap::new(disk, 65536).unwrap();
        bm.mark_dirty(0, 65536);
        bm.mark_dirty(5 * MIB, 65536);
        s.store("a", &bm).unwrap();
        drop(s);
        // The bitmap-unaware writer: autoclear bit 0 cleared (the field at 88), then guest
        // writes `a` never records.
        let mut image = first.live_image();
        image[95] &= !1;
        let crash = CrashStorage::from_bytes(image);
        let mut s = BitmapStore::open(&crash, OpenMode::ReadWrite).unwrap();
        assert!(s
            .list()
            .iter()
            .all(|b| b.state == BitmapState::Inconsistent));
        s.add("b", 65536, Recording::Enabled).unwrap();
        drop(s);
        let ops = crash.ops();
        let check = |image: Vec<u8>, ctx: &str, qemu: bool| {
            let s = BitmapStore::open(MemStorage::from_bytes(image.clone()), OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(s.image().check().unwrap().corruptions, 0, "{ctx}");
            let mut seen = (0, 0);
            for info in s.list() {
                assert!(
                    info.name != "a" || info.state == BitmapState::Inconsistent,
                    "{ctx}: the untrusted bitmap a loads as {:?}",
                    info.state
                );
                seen.0 += usize::from(info.name == "a");
                seen.1 += usize::from(info.name == "b" && info.state != BitmapState::Inconsistent);
            }
            if qemu {
                let path = dir.path().join("torn.qcow2");
                std::fs::write(&path, &image).unwrap();
                for (name, _, flags) in common::qemu::qemu_bitmaps(&path) {
                    assert!(
                        name != "a" || flags.iter().any(|f| f == "in-use"),
                        "{ctx}: qemu-img info trusts a: {flags:?}"
                    );
                }
                assert_qemu_check_no_errors(&path, ctx);
            }
            seen
        };
        // Deterministic: each cluster-0 write of the add, only its first sector landed on
        // the durable image before it.
        for (i, op) in ops.iter().enumerate() {
            let Op::Write { offset: 0, data } = op else {
                continue;
            };
            let mut image = crash.crash_image(i, CrashMode::Dropped).unwrap();
            let n = data.len().min(512);
            image[..n].copy_from_slice(&data[..n]);
            sector0_only += 1;
            let (a, b) = check(
                image,
                &format!("{cluster}: op {i}, first sector alone"),
                true,
            );
            a_seen += a;
            b_trusted += b;
        }
        for point in crash.crash_points() {
            let seeds = if header_write_unsynced(&ops, point) {
                64
            } else {
                1
            };
            for seed in 0..seeds {
                let image = crash.crash_image(point, CrashMode::Torn { seed }).unwrap();
                let (a, b) = check(
                    image,
                    &format!("{cluster}: point {point}, tear {seed}"),
                    false,
                );
                a_seen += a;
                b_trusted += b;
            }
        }
    }
    assert!(sector0_only >= 2 && a_seen > 0 && b_trusted > 0);
}

/// The first add to an image without a bitmaps extension, and the removal of its only
/// bitmap, change cluster 0 in two sectors at 64 KiB clusters: the autoclear field and the
/// extension's frame (at 0x1F8) in the first, the extension's 24 data bytes (at 0x200) in
/// the second. A crash that lands one of the two sectors alone must leave an image that
/// opens, here and for QEMU (`qemu-img info` succeeds, `qemu-img check` exits 0 or 3), and
/// no bitmap consistent unless it is the complete old or new state: the old `a` with
/// exactly its stored bits (a removal), the new `b` empty (an add). A frame with bit 0 set
/// over the other state's data reads `nb_bitmaps = 0`, which QEMU refuses as corrupt
/// ("found bitmaps extension with zero bitmaps"); with bit 0 clear it ignores the
/// extension. For 4 KiB and 64 KiB clusters, on the handle that created the image and on
/// one opened on it: each cluster-0 write of the operation with its first sector alone
/// landed, and with its second sector alone; every crash point torn 64 ways where a
/// cluster-0 write is unsynced, and dropped and kept at every crash point.
#[test]
fn a_torn_first_add_or_last_remove_always_opens() {
    let dir = tempfile::tempdir().unwrap();
    let disk = 32 * MIB;
    let marks = [(0, 65536), (5 * MIB, 65536)];
    let stored = DirtyBitmap::new(disk, 65536).unwrap();
    for (o, l) in marks {
        stored.mark_dirty(o, l);
    }
    let stored: Marks = stored.dirty_extents().collect();
    let (mut single_sector, mut qemu_checked, mut old_seen, mut new_seen) = (0, 0, 0, 0);
    for cluster in [4096u64, 65536] {
        for remove in [false, true] {
            for reopen in [false, true] {
                let name = format!(
                    "{cluster}: {}{}",
                    if remove {
                        "remove the last"
                    } else {
                        "first add"
                    },
                    if reopen { ", reopened" } else { "" }
                );
                let mut crash = Arc::new(CrashStorage::new());
                let mut s = BitmapStore::create(Arc::clone(&crash), disk, cluster).unwrap();
                if remove {
                    s.add("a", 65536, Recording::Enabled).unwrap();
                    let bm = DirtyBitmap::new(disk, 65536).unwrap();
                    for (o, l) in marks {
                        bm.mark_dirty(o, l);
                    }
                    s.store("a", &bm).unwrap();
                }
                if reopen {
                    drop(s);
                    crash = Arc::new(CrashStorage::from_bytes(crash.live_image()));
                    s = BitmapStore::open(Arc::clone(&crash), OpenMode::ReadWrite).unwrap();
                }
                let start = crash.op_count();
                if remove {
                    s.remove("a").unwrap();
                } else {
                    s.add("b", 65536, Recording::Enabled).unwrap();
                }
                drop(s);
                let ops = crash.ops();
                let check = |image: Vec<u8>, ctx: &str, qemu: bool| {
                    let s = BitmapStore::open(
                        MemStorage::from_bytes(image.clone()),
                        OpenMode::ReadOnly,
                    )
                    .unwrap_or_else(|e| panic!("{ctx}: refused: {e}"));
                    assert_eq!(s.image().check().unwrap().corruptions, 0, "{ctx}");
                    let mut trusted = Vec::new();
                    let mut seen = (0, 0);
                    for info in s.list() {
                        if info.state == BitmapState::Inconsistent {
                            continue;
                        }
                        let n = info.name.to_str().unwrap().to_string();
                        let bits: Marks = s.load(&info.name).unwrap().dirty_extents().collect();
                        if remove {
                            assert!(
                                n == "a" && bits == stored,
                                "{ctx}: {n} consistent: {bits:?}"
                            );
                            seen.0 += 1;
                        } else {
                            assert!(
                                n == "b" && bits.is_empty(),
                                "{ctx}: {n} consistent: {bits:?}"
                            );
                            seen.1 += 1;
                        }
                        trusted.push(n);
                    }
                    if qemu {
                        let path = dir.path().join("torn.qcow2");
                        std::fs::write(&path, &image).unwrap();
                        for (n, _, flags) in common::qemu::qemu_bitmaps(&path) {
                            assert!(
                                trusted.contains(&n) || flags.iter().any(|f| f == "in-use"),
                                "{ctx}: qemu-img info trusts {n} ({flags:?}), we list {trusted:?}"
                            );
                        }
                        assert_qemu_check_no_errors(&path, ctx);
                    }
                    seen
                };
                let mut tally = |seen: (usize, usize)| {
                    old_seen += seen.0;
                    new_seen += seen.1;
                };
                // Deterministic: each cluster-0 write of the operation with one of its first
                // two sectors landed alone on the durable image before it.
                for (i, op) in ops.iter().enumerate().skip(start) {
                    let Op::Write { offset: 0, data } = op else {
                        continue;
                    };
                    for sector in [0usize, 1] {
                        let at = sector * 512;
                        if data.len() <= at {
                            continue;
                        }
                        let mut image = crash.crash_image(i, CrashMode::Dropped).unwrap();
                        let end = data.len().min(at + 512);
                        image[at..end].copy_from_slice(&data[at..end]);
                        single_sector += 1;
                        qemu_checked += 1;
                        tally(check(
                            image,
                            &format!("{name}: op {i}, sector {sector} alone"),
                            true,
                        ));
                    }
                }
                for point in crash.crash_points().into_iter().filter(|&p| p >= start) {
                    for mode in [CrashMode::Dropped, CrashMode::Kept] {
                        let image = crash.crash_image(point, mode).unwrap();
                        qemu_checked += 1;
                        tally(check(
                            image,
                            &format!("{name}: point {point}, {mode:?}"),
                            true,
                        ));
                    }
                    if !header_write_unsynced(&ops, point) {
                        continue;
                    }
                    for seed in 0..64 {
                        let image = crash.crash_image(point, CrashMode::Torn { seed }).unwrap();
                        tally(check(
                            image,
                            &format!("{name}: point {point}, tear {seed}"),
                            false,
                        ));
                    }
                }
            }
        }
    }
    eprintln!(
        "{single_sector} single-sector landings, {qemu_checked} images checked by QEMU; \
         consistent: the old a {old_seen} times, the new b {new_seen} times"
    );
    // Not vacuous: the old and the new state are each seen trusted.
    assert!(single_sector >= 8 && old_seen > 0 && new_seen > 0);
}

/// Found by two reviews: on an overlay (`qemu-img create -b BASE -F qcow2`), the first add
/// and the removal of the last bitmap move the backing file name by the bitmaps
/// extension's 32 bytes, and cluster 0 was written in one write across the first sector
/// (the name's offset) and the next (the frames and the name). Landed apart, the old offset
/// read the new extension's data as the name (a NUL first: QEMU opened the overlay with no
/// backing file, the guest reading zeros where the base had data), or ended the extension
/// area inside the new frames ("Header extension too large": the image did not open).
///
/// For QEMU's overlays at 64 KiB clusters (the end marker at 0x1F8 and the name in the
/// second sector), the same without a backing format extension (QEMU before 6.1: the end
/// marker in the first sector), and 4 KiB clusters with a name past byte 512: every write
/// into cluster 0 of the first add and of the last removal, with every subset of the
/// sectors it changes landed on the image before it, and every crash point with the
/// unsynced tail dropped and kept. Each image must open, here and for `qemu-img info` and
/// `qemu-img check`, naming the base, with the old bitmap or the new one or none trusted.
#[test]
fn a_torn_header_write_keeps_an_overlays_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("d".repeat(200)).join("e".repeat(200));
    std::fs::create_dir_all(&long).unwrap();
    let (short_base, long_base) = (dir.path().join("base.qcow2"), long.join("base.qcow2"));
    for b in [&short_base, &long_base] {
        common::qemu::ok("qemu-img", &["create", "-f", "qcow2", p(b), "32M"]);
    }
    let marks = [(0u64, 65536u64), (5 * MIB, 65536)];
    let stored: Marks = {
        let bm = DirtyBitmap::new(32 * MIB, 65536).unwrap();
        for (o, l) in marks {
            bm.mark_dirty(o, l);
        }
        bm.dirty_extents().collect()
    };
    let torn = dir.path().join("torn.qcow2");
    let (mut landings, mut seen_old, mut seen_new, mut moves) = (0, 0, 0, 0);
    for (cluster, base, with_format) in [
        (65536u64, &short_base, true),
        (65536, &short_base, false),
        (4096, &long_base, true),
    ] {
        let name = p(base).as_bytes().to_vec();
        let ov = dir.path().join("ov.qcow2");
        let cs = cluster.to_string();
        common::qemu::ok(
            "qemu-img",
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                &format!("cluster_size={cs}"),
                "-F",
                "qcow2",
                "-b",
                p(base),
                p(&ov),
                "32M",
            ],
        );
        let mut bytes = std::fs::read(&ov).unwrap();
        if !with_format {
            let c0 = cluster as usize;
            let mut area = dirty_bitmap::format::HeaderArea::decode(&bytes[..c0]).unwrap();
            area.backing_format = None;
            bytes[..c0].copy_from_slice(&area.encode().unwrap());
        }
        for remove in [false, true] {
            let ctx = format!(
                "{cluster}, {}backing format: {}",
                if with_format { "" } else { "no " },
                if remove {
                    "remove the last"
                } else {
                    "first add"
                }
            );
            let mut before = bytes.clone();
            if remove {
                let crash = Arc::new(CrashStorage::from_bytes(before));
                let mut s = BitmapStore::open(Arc::clone(&crash), OpenMode::ReadWrite).unwrap();
                s.add("a", 65536, Recording::Enabled).unwrap();
                let bm = DirtyBitmap::new(32 * MIB, 65536).unwrap();
                for (o, l) in marks {
                    bm.mark_dirty(o, l);
                }
                s.store("a", &bm).unwrap();
                drop(s.close().unwrap());
                before = crash.durable_image();
            }
            let crash = Arc::new(CrashStorage::from_bytes(before));
            let mut s = BitmapStore::open(Arc::clone(&crash), OpenMode::ReadWrite).unwrap();
            let start = crash.op_count();
            if remove {
                s.remove("a").unwrap();
            } else {
                s.add("b", 65536, Recording::Enabled).unwrap();
            }
            drop(s);
            let ops = crash.ops();
            let mut images: Vec<(String, Vec<u8>)> = Vec::new();
            for (i, op) in ops.iter().enumerate().skip(start) {
                let Op::Write { offset, data } = op else {
                    continue;
                };
                let at = *offset as usize;
                if at >= cluster as usize {
                    continue;
                }
                let old = crash.crash_image(i, CrashMode::Dropped).unwrap();
                let mut new = old.clone();
                new[at..at + data.len()].copy_from_slice(data);
                if new[8..16] != old[8..16] {
                    moves += 1;
                }
                let changed: Vec<usize> = (0..new.len().div_ceil(512))
                    .filter(|&k| {
                        let r = k * 512..((k + 1) * 512).min(new.len());
                        old[r.clone()] != new[r]
                    })
                    .collect();
                assert!(changed.len() <= 8, "{ctx}: op {i} changes {changed:?}");
                for subset in 0..1u32 << changed.len() {
                    let mut img = old.clone();
                    for (bit, &k) in changed.iter().enumerate() {
                        if subset >> bit & 1 == 1 {
                            let r = k * 512..((k + 1) * 512).min(new.len());
                            img[r.clone()].copy_from_slice(&new[r]);
                        }
                    }
                    landings += 1;
                    images.push((
                        format!("{ctx}: op {i}, sectors {subset:#b} of {changed:?}"),
                        img,
                    ));
                }
            }
            for point in crash.crash_points().into_iter().filter(|&k| k >= start) {
                for mode in [CrashMode::Dropped, CrashMode::Kept] {
                    let img = crash.crash_image(point, mode).unwrap();
                    images.push((format!("{ctx}: point {point}, {mode:?}"), img));
                }
            }
            let mut done = HashSet::new();
            for (at, img) in images {
                if !done.insert(img.clone()) {
                    continue;
                }
                let s = BitmapStore::open(MemStorage::from_bytes(img.clone()), OpenMode::ReadOnly)
                    .unwrap_or_else(|e| panic!("{at}: refused: {e}"));
                assert_eq!(
                    s.image().area().backing_file.as_deref(),
                    Some(&name[..]),
                    "{at}: the backing file"
                );
                assert_eq!(s.image().check().unwrap().corruptions, 0, "{at}");
                for info in s.list() {
                    if info.state == BitmapState::Inconsistent {
                        continue;
                    }
                    let bits: Marks = s.load(&info.name).unwrap().dirty_extents().collect();
                    match info.name.to_str().unwrap() {
                        "a" if remove && bits == stored => seen_old += 1,
                        "b" if !remove && bits.is_empty() => seen_new += 1,
                        n => panic!("{at}: {n} consistent: {bits:?}"),
                    }
                }
                std::fs::write(&torn, &img).unwrap();
                let info = common::qemu::ok("qemu-img", &["info", "--output=json", p(&torn)]);
                let info: serde_json::Value = serde_json::from_str(&info).unwrap();
                assert_eq!(
                    info["backing-filename"].as_str(),
                    Some(p(base)),
                    "{at}: qemu-img info"
                );
                assert_qemu_check_no_errors(&torn, &at);
            }
        }
    }
    eprintln!(
        "{landings} landings, {moves} writes of the name's offset; trusted: the old a \
         {seen_old} times, the new b {seen_new} times"
    );
    assert!(landings >= 24 && moves >= 12 && seen_old > 0 && seen_new > 0);
}

/// A process killed in the middle of a name move leaves a cluster 0 that opens naming the
/// right file but is not the bytes this crate encodes (the name at the spare place, or a
/// stray copy of it) until the next header write. A store that handed the image over must
/// not compare cluster 0 byte for byte with its encoding before taking it back: every later
/// take-back (a failed migration's source resuming) would refuse it as changed while
/// inactive, and the guest would stay stopped. Each crash image of the move, opened,
/// activated, inactivated (which hands the image over) and activated again, must be taken
/// back.
#[test]
fn a_store_takes_back_an_image_a_crash_left_in_the_middle_of_a_name_move() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    common::qemu::ok("qemu-img", &["create", "-f", "qcow2", p(&base), "32M"]);
    let ov = dir.path().join("ov.qcow2");
    common::qemu::ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            p(&base),
            p(&ov),
            "32M",
        ],
    );
    let crash = Arc::new(CrashStorage::from_bytes(std::fs::read(&ov).unwrap()));
    let mut s = BitmapStore::open(Arc::clone(&crash), OpenMode::ReadWrite).unwrap();
    s.add("b", 65536, Recording::Enabled).unwrap();
    drop(s);
    let ops = crash.ops();
    // Crash points inside the move: after the offset names the spare place, up to the
    // spare place's clearing.
    let field_writes: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Op::Write { offset: 8, data } if data.len() == 8))
        .map(|(i, _)| i)
        .collect();
    let [to_spare, to_new] = field_writes[..] else {
        panic!("the move writes the offset twice: {field_writes:?}")
    };
    let mut points = 0;
    for k in to_spare + 1..=ops.len() {
        if k < ops.len() && !matches!(ops[k], Op::Sync) {
            continue;
        }
        let img = crash.crash_image(k, CrashMode::Dropped).unwrap();
        let path = dir.path().join("cut.qcow2");
        std::fs::write(&path, &img).unwrap();
        let mut st = BitmapStore::open(
            FileStorage::open(&path, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        st.activate().unwrap();
        st.inactivate().unwrap();
        st.activate()
            .unwrap_or_else(|e| panic!("crash after op {k} (moves at {to_spare}, {to_new}): {e}"));
        st.inactivate().unwrap();
        drop(st);
        points += 1;
    }
    assert!(points >= 4, "{points} crash points");
}

/// Found by reviews: the spec lets a writer change an image with unknown autoclear bits
/// only after it has cleared them, and this crate's first write clears them with a header
/// write. When cluster 0 was laid out by another program (here a feature table one entry
/// longer than QEMU's), that write re-lays it: it moved a backing file name before the bit
/// was cleared, and without a backing file it changed two sectors in one write, one of
/// which could land under the old field. The field now goes first, alone. For an overlay and
/// a plain image: every write into cluster 0 of the first add, with every subset of the
/// sectors it changes landed, and every crash point: an image whose cluster 0 differs from
/// the original has the unknown bit clear; at every crash point it opens, naming the
/// backing file (a torn re-lay of another program's layout may not: the known limit).
#[test]
fn a_header_write_clears_unknown_autoclear_bits_before_anything_else() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    common::qemu::ok("qemu-img", &["create", "-f", "qcow2", p(&base), "32M"]);
    let mut changed = 0;
    for overlay in [true, false] {
        let ov = dir.path().join(format!("ov-{overlay}.qcow2"));
        let mut args = vec!["create", "-f", "qcow2"];
        if overlay {
            args.extend(["-F", "qcow2", "-b", p(&base)]);
        }
        args.extend([p(&ov), "32M"]);
        common::qemu::ok("qemu-img", &args);
        let mut bytes = std::fs::read(&ov).unwrap();
        // The feature name table (type 0x6803f857) one 48-byte entry longer, everything
        // after it moved up, the name's offset with it; autoclear bit 7 set.
        let mut at = be32(&bytes, 100) as usize;
        while be32(&bytes, at) != 0x6803_f857 {
            assert_ne!(be32(&bytes, at), 0, "no feature table");
            at += 8 + (be32(&bytes, at + 4) as usize).div_ceil(8) * 8;
        }
        let len = be32(&bytes, at + 4) as usize;
        let mut entry = [0u8; 48];
        entry[0] = 2; // autoclear
        entry[1] = 7;
        entry[2..2 + 9].copy_from_slice(b"a new bit");
        let end = at + 8 + len;
        let mut c0 = bytes[..65536].to_vec();
        c0.splice(end..end, entry);
        c0.truncate(65536);
        c0[at + 4..at + 8].copy_from_slice(&((len + 48) as u32).to_be_bytes());
        if overlay {
            let name_at = u64::from_be_bytes(c0[8..16].try_into().unwrap()) + 48;
            c0[8..16].copy_from_slice(&name_at.to_be_bytes());
        }
        let autoclear = u64::from_be_bytes(c0[88..96].try_into().unwrap()) | 1 << 7;
        c0[88..96].copy_from_slice(&autoclear.to_be_bytes());
        bytes[..65536].copy_from_slice(&c0);
        let backing = overlay.then(|| p(&base).as_bytes().to_vec());
        let area = dirty_bitmap::format::HeaderArea::decode(&bytes[..65536]).unwrap();
        assert_eq!(area.backing_file, backing);

        let crash = Arc::new(CrashStorage::from_bytes(bytes.clone()));
        let mut s = BitmapStore::open(Arc::clone(&crash), OpenMode::ReadWrite).unwrap();
        s.add("b", 65536, Recording::Enabled).unwrap();
        drop(s);
        let ops = crash.ops();
        for (i, o) in ops.iter().enumerate() {
            match o {
                Op::Write { offset, data } => eprintln!("OP {i} W {offset}+{}", data.len()),
                o => eprintln!("OP {i} {o:?}"),
            }
        }
        let mut images = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let Op::Write { offset, data } = op else {
                continue;
            };
            let at = *offset as usize;
            if at >= 65536 {
                continue;
            }
            let old = crash.crash_image(i, CrashMode::Dropped).unwrap();
            let mut new = old.clone();
            new[at..at + data.len()].copy_from_slice(data);
            let sectors: Vec<usize> = (0..65536 / 512)
                .filter(|&k| old[k * 512..(k + 1) * 512] != new[k * 512..(k + 1) * 512])
                .collect();
            assert!(sectors.len() <= 8, "op {i} changes {sectors:?}");
            for subset in 0..1u32 << sectors.len() {
                let mut img = old.clone();
                for (bit, &k) in sectors.iter().enumerate() {
                    if subset >> bit & 1 == 1 {
                        img[k * 512..(k + 1) * 512].copy_from_slice(&new[k * 512..(k + 1) * 512]);
                    }
                }
                images.push((
                    format!("op {i}, sectors {subset:#b} of {sectors:?}"),
                    img,
                    false,
                ));
            }
        }
        for k in 0..=crash.op_count() {
            for mode in [CrashMode::Dropped, CrashMode::Kept] {
                images.push((
                    format!("crash after op {k} ({mode:?})"),
                    crash.crash_image(k, mode).unwrap(),
                    true,
                ));
            }
        }
        for (what, img, whole) in images {
            if img[..65536] == bytes[..65536] {
                continue;
            }
            changed += 1;
            let autoclear = u64::from_be_bytes(img[88..96].try_into().unwrap());
            assert_eq!(
                autoclear & 1 << 7,
                0,
                "overlay {overlay}, {what}: cluster 0 changed under the unknown bit"
            );
            // A torn re-lay of another program's layout may fail to open (the known limit
            // of docs/CRASH-CONSISTENCY.md); a crash between whole writes may not.
            if !whole {
                continue;
            }
            let s = BitmapStore::open(MemStorage::from_bytes(img), OpenMode::ReadOnly)
                .unwrap_or_else(|e| panic!("overlay {overlay}, {what}: {e}"));
            assert_eq!(
                s.image().area().backing_file,
                backing,
                "overlay {overlay}, {what}"
            );
        }
    }
    assert!(changed > 0);
}

/// Where the data of the bitmaps extension (magic 0x23852875) of cluster 0 `image` starts.
fn bitmaps_extension_data(image: &[u8]) -> usize {
    let mut at = be32(image, 100) as usize;
    loop {
        let (kind, len) = (be32(image, at), be32(image, at + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            return at + 8;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// A data-file name of 485 bytes puts the bitmaps extension's 24 data bytes across the
/// sector boundary at 1024 (64 KiB clusters: the header, the data-file extension, QEMU's
/// feature table, then the bitmaps extension at 520 + 488): `nb_bitmaps` and
/// `bitmap_directory_size` in the second sector, `bitmap_directory_offset` in the third.
/// `checkpoint c2` over `c1` changes all three. A crash that lands a subset of the sectors
/// of a cluster-0 write must leave, here and for QEMU, the old chain (`c1` consistent and
/// enabled, no `c2`), the new one (`c1` consistent and disabled, `c2` consistent and
/// enabled) or autoclear bit 0 clear, nothing trusted: never `c1` disabled without `c2`
/// (the old sector with the new offset names the new directory's first entry alone), after
/// which nothing records and `--since c1` misses every later write. Every subset of the
/// changed sectors of each cluster-0 write of the checkpoint is landed on the durable image
/// before it and checked with `qemu-img info` and `qemu-img check`; every crash point of
/// the checkpoint is dropped and kept, and torn 64 ways where a cluster-0 write is unsynced.
#[test]
fn a_torn_checkpoint_over_a_straddling_extension_is_the_old_chain_or_the_new_one() {
    let dir = tempfile::tempdir().unwrap();
    // A deep directory: the raw file's absolute path is exactly 485 bytes long.
    let mut raw = dir.path().to_path_buf();
    while raw.as_os_str().len() < 485 - 100 {
        raw.push("d".repeat(80));
    }
    std::fs::create_dir_all(&raw).unwrap();
    let fill = 485 - raw.as_os_str().len() - 1;
    raw.push("r".repeat(fill));
    let raw_name = raw.to_str().unwrap().to_string();
    assert_eq!(raw_name.len(), 485);
    let disk = 32 * MIB;
    std::fs::File::create(&raw).unwrap().set_len(disk).unwrap();

    let crash = CrashStorage::new();
    let mut s = BitmapStore::create_with_data_file(&crash, disk, 65536, &raw_name).unwrap();
    assert_eq!(s.checkpoint("c1").unwrap(), None);
    let data = bitmaps_extension_data(&crash.live_image());
    assert!(data < 1024 && data + 24 > 1024, "extension data at {data}");
    let start = crash.op_count();
    assert_eq!(s.checkpoint("c2").unwrap().unwrap().to_string(), "c1");
    drop(s);
    let ops = crash.ops();

    let old = vec![("c1".to_string(), true)];
    let new = vec![("c1".to_string(), false), ("c2".to_string(), true)];
    let (mut landings, mut old_seen, mut new_seen, mut untrusted_seen) = (0, 0, 0, 0);
    let mut check = |image: Vec<u8>, ctx: &str, qemu: bool| {
        let s = BitmapStore::open(MemStorage::from_bytes(image.clone()), OpenMode::ReadOnly)
            .unwrap_or_else(|e| panic!("{ctx}: refused: {e}"));
        assert_eq!(s.image().check().unwrap().corruptions, 0, "{ctx}");
        let list = s.list();
        let trusted: Vec<(String, bool)> = list
            .iter()
            .filter(|b| b.state != BitmapState::Inconsistent)
            .map(|b| (b.name.to_string(), b.enabled))
            .collect();
        if trusted.is_empty() {
            // Untrusted: each bitmap of the directory inconsistent, or none listed when the
            // untrusted extension names no directory that reads.
            assert_eq!(
                image[95] & 1,
                0,
                "{ctx}: bit 0 set, nothing trusted: {list:?}"
            );
            untrusted_seen += 1;
        } else if trusted == old && list.len() == 1 {
            old_seen += 1;
        } else if trusted == new && list.len() == 2 {
            new_seen += 1;
        } else {
            panic!("{ctx}: neither chain: {list:?}");
        }
        if qemu {
            let path = dir.path().join("torn.qcow2");
            std::fs::write(&path, &image).unwrap();
            let names: Vec<&str> = trusted.iter().map(|(n, _)| n.as_str()).collect();
            for (n, _, flags) in common::qemu::qemu_bitmaps(&path) {
                let auto = flags.iter().any(|f| f == "auto");
                assert!(
                    flags.iter().any(|f| f == "in-use")
                        || trusted.iter().any(|(t, e)| *t == n && *e == auto),
                    "{ctx}: qemu-img info trusts {n} ({flags:?}), we list {names:?}"
                );
            }
            assert_qemu_check_no_errors(&path, ctx);
        }
    };
    // Deterministic: each cluster-0 write of the checkpoint, every subset of the sectors
    // it changes landed on the durable image before it.
    for (i, op) in ops.iter().enumerate().skip(start) {
        let Op::Write { offset: 0, data } = op else {
            continue;
        };
        let before = crash.crash_image(i, CrashMode::Dropped).unwrap();
        let changed: Vec<usize> = (0..data.len().div_ceil(512))
            .filter(|&s| {
                let r = s * 512..data.len().min(s * 512 + 512);
                before.get(r.clone()) != data.get(r)
            })
            .collect();
        assert!(changed.len() <= 6, "op {i} changes sectors {changed:?}");
        for subset in 0u32..1 << changed.len() {
            let mut image = before.clone();
            let mut landed = Vec::new();
            for (k, &s) in changed.iter().enumerate() {
                if subset >> k & 1 == 1 {
                    let r = s * 512..data.len().min(s * 512 + 512);
                    image[r.clone()].copy_from_slice(&data[r]);
                    landed.push(s);
                }
            }
            landings += 1;
            check(
                image,
                &format!("op {i}, sectors {landed:?} of {changed:?}"),
                true,
            );
        }
    }
    for point in crash.crash_points().into_iter().filter(|&p| p >= start) {
        for mode in [CrashMode::Dropped, CrashMode::Kept] {
            let image = crash.crash_image(point, mode).unwrap();
            check(image, &format!("point {point}, {mode:?}"), false);
        }
        if !header_write_unsynced(&ops, point) {
            continue;
        }
        for seed in 0..64 {
            let image = crash.crash_image(point, CrashMode::Torn { seed }).unwrap();
            check(image, &format!("point {point}, tear {seed}"), false);
        }
    }
    eprintln!(
        "{landings} landings; the old chain {old_seen} times, the new one {new_seen} times, \
         every bitmap untrusted {untrusted_seen} times"
    );
    // Not vacuous: both chains are seen.
    assert!(landings >= 4 && old_seen > 0 && new_seen > 0);
}

/// A backing file offset inside the header (below `header_length`), which QEMU opens (it
/// then reads no extension, and header bytes as the name), is not moved like any name when
/// the first add re-lays cluster 0: the move zeroes the bytes under the old place behind a
/// barrier before rewriting the header, so a crash there would leave the refcount table's
/// offset 0 (this crate refuses the image; QEMU takes cluster 0 for its refcount table). At
/// every crash point of the add, the header bytes under the name must be as they were, and
/// the image must open writable here and for `qemu-img check`.
#[test]
fn a_backing_name_inside_the_header_is_never_zeroed_by_a_move() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("x.qcow2");
    common::qemu::ok("qemu-img", &["create", "-f", "qcow2", p(&img), "1G"]);
    let mut bytes = std::fs::read(&img).unwrap();
    // The name: the 8 bytes of the refcount table's offset (65536 here).
    bytes[8..16].copy_from_slice(&48u64.to_be_bytes());
    bytes[16..20].copy_from_slice(&8u32.to_be_bytes());
    let under = bytes[48..56].to_vec();
    assert_eq!(under, 65536u64.to_be_bytes());
    std::fs::write(&img, &bytes).unwrap();
    // QEMU opens it.
    common::qemu::ok("qemu-img", &["info", p(&img)]);
    let crash = Arc::new(CrashStorage::from_bytes(bytes));
    let mut s = BitmapStore::open(Arc::clone(&crash), OpenMode::ReadWrite).unwrap();
    let start = crash.op_count();
    s.add("b0", 65536, Recording::Enabled).unwrap();
    drop(s);
    let mut seen = 0;
    for point in crash.crash_points().into_iter().filter(|&k| k >= start) {
        for mode in [CrashMode::Dropped, CrashMode::Kept] {
            let at = format!("point {point}, {mode:?}");
            let image = crash.crash_image(point, mode).unwrap();
            assert_eq!(image[48..56], under[..], "{at}: the header under the name");
            drop(
                BitmapStore::open(MemStorage::from_bytes(image.clone()), OpenMode::ReadWrite)
                    .unwrap_or_else(|e| panic!("{at}: refused: {e}")),
            );
            std::fs::write(&img, &image).unwrap();
            assert_qemu_check_no_errors(&img, &at);
            seen += 1;
        }
    }
    eprintln!("{seen} crash images");
    assert!(seen >= 4);
}
