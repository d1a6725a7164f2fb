//! The write log ([`WriteLog`]) and a preload that follows it: after the writer's last log,
//! the activate of a preloaded copy reads none of the bitmap data and holds exactly what a
//! full load of the disk holds; whatever breaks the chain (a missed log, a directory change)
//! makes the activate read everything again, never trust a stale copy.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use common::{seeded_rng, serialize_all};
use dirty_bitmap::storage::Storage;
use dirty_bitmap::{
    BitmapStore, MemStorage, OpenMode, Preloaded, Recording, SharedStore, WriteLog,
};
use rand::{Rng, RngExt};

const DISK: u64 = 1 << 40;
const G: u64 = 65536;
const NAMES: [&str; 2] = ["a", "b"];

/// One image shared by the writer, the reader and the destination, counting bytes read.
#[derive(Debug, Default)]
struct Counted {
    inner: MemStorage,
    read: AtomicU64,
    syncs: AtomicU64,
}

impl Storage for Counted {
    fn len(&self) -> dirty_bitmap::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.read.fetch_add(buf.len() as u64, SeqCst);
        self.inner.read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.inner.write_all_at(buf, offset)
    }
    fn set_len(&self, new_len: u64) -> dirty_bitmap::Result<()> {
        self.inner.set_len(new_len)
    }
    fn sync_data(&self) -> dirty_bitmap::Result<()> {
        self.syncs.fetch_add(1, SeqCst);
        self.inner.sync_data()
    }
}

type Disk = Arc<Counted>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Deferred,
    Durable,
}

/// A writer with two bitmaps, active in `mode`, holding some bits on disk already.
fn writer(mode: Mode, rng: &mut impl Rng) -> (Disk, SharedStore<Disk>) {
    let disk: Disk = Arc::default();
    let mut s = BitmapStore::create(Arc::clone(&disk), DISK, 65536).unwrap();
    for n in NAMES {
        s.add(n, G, Recording::Enabled).unwrap();
    }
    s.activate().unwrap();
    let s = SharedStore::new(s);
    writes(&s, Mode::Deferred, rng, 2000);
    let mut s = s.try_into_inner().unwrap();
    s.inactivate().unwrap();
    let mut s = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
    match mode {
        Mode::Deferred => s.activate().unwrap(),
        Mode::Durable => s.activate_durable().unwrap(),
    }
    (disk, SharedStore::new(s))
}

/// `n` random 4 KiB writes marked on the writer (through its durable tracker in durable
/// mode, so each is on disk when it returns), and now and then a clear of one bitmap.
fn writes(s: &SharedStore<Disk>, mode: Mode, rng: &mut impl Rng, n: usize) {
    marks(s, mode, rng, n);
    if rng.random_bool(0.2) {
        s.lock().clear(NAMES[rng.random_range(0..2)]).unwrap();
    }
}

/// `n` random 4 KiB writes marked on the writer, each on `a` and half of them on `b`.
fn marks(s: &SharedStore<Disk>, mode: Mode, rng: &mut impl Rng, n: usize) {
    let t = (mode == Mode::Durable).then(|| s.durable_tracker().unwrap());
    let (a, b) = match mode {
        Mode::Deferred => {
            let st = s.lock();
            (
                Some(st.bitmap(NAMES[0]).unwrap()),
                Some(st.bitmap(NAMES[1]).unwrap()),
            )
        }
        Mode::Durable => (None, None),
    };
    for _ in 0..n {
        let off = rng.random_range(0..DISK / 4096) * 4096;
        match (&t, &a, &b) {
            (Some(t), _, _) => t.mark(off, 4096).unwrap(),
            (None, Some(a), Some(b)) => {
                a.mark_dirty(off, 4096);
                if rng.random_bool(0.5) {
                    b.mark_dirty(off, 4096);
                }
            }
            _ => unreachable!(),
        }
    }
}

/// What a full load of the disk holds now, bitmap by bitmap.
fn on_disk(disk: &Disk) -> Vec<Vec<u8>> {
    let r = BitmapStore::open(Arc::clone(disk), OpenMode::ReadOnly).unwrap();
    NAMES
        .iter()
        .map(|n| serialize_all(&r.load(n).unwrap()))
        .collect()
}

/// Starts the writer's log, then a reader's preload that follows it.
fn start_following(
    disk: &Disk,
    s: &SharedStore<Disk>,
    mode: Mode,
) -> (BitmapStore<Disk>, Preloaded) {
    let id = s.lock().start_write_log();
    let reader = BitmapStore::open(Arc::clone(disk), OpenMode::ReadOnly).unwrap();
    let mut pre = reader.preload().unwrap();
    pre.follow(id, 0);
    if mode == Mode::Durable {
        pre.prepare_durable();
    }
    (reader, pre)
}

/// Rounds of writes and flushes with the reader applying each log except those `skip`
/// names; the writer inactivated; the last log applied. The logs taken, in order.
fn follow(
    disk: &Disk,
    s: SharedStore<Disk>,
    mode: Mode,
    rng: &mut impl Rng,
    skip: Option<usize>,
) -> (Preloaded, Vec<WriteLog>) {
    let (reader, mut pre) = start_following(disk, &s, mode);
    let mut logs = Vec::new();
    for round in 0..6 {
        writes(&s, mode, rng, 300);
        s.lock().flush().unwrap();
        let log = s.lock().take_write_log().unwrap();
        assert!(!log.last && !log.whole, "{log:?}");
        if skip != Some(round) {
            pre.apply(&reader, &log).unwrap();
        }
        logs.push(log);
    }
    // Written after the last log of the running store: the stop's own regions.
    writes(&s, mode, rng, 50);
    let mut s = s.try_into_inner().unwrap();
    s.inactivate().unwrap();
    let last = s.take_write_log().unwrap();
    assert!(last.last, "{last:?}");
    assert!(s.take_write_log().is_none(), "the last take ends the log");
    pre.apply(&reader, &last).unwrap();
    logs.push(last);
    (pre, logs)
}

/// The destination's activate from `pre`, which must hold what a full load of the disk
/// held before it; the bytes it read, and the store.
fn activate(disk: &Disk, pre: Preloaded, mode: Mode, seed: u64) -> (u64, BitmapStore<Disk>) {
    let want = on_disk(disk);
    let mut d = BitmapStore::open(Arc::clone(disk), OpenMode::ReadWrite).unwrap();
    let before = disk.read.load(SeqCst);
    match mode {
        Mode::Deferred => d.activate_preloaded(pre).unwrap(),
        Mode::Durable => d.activate_durable_preloaded(pre).unwrap(),
    }
    let read = disk.read.load(SeqCst) - before;
    let held: Vec<Vec<u8>> = NAMES
        .iter()
        .map(|n| serialize_all(&d.load(n).unwrap()))
        .collect();
    assert_eq!(
        held, want,
        "{mode:?}: the activate holds what the disk holds (seed {seed})"
    );
    (read, d)
}

fn bitmap_bytes() -> u64 {
    DISK / G / 8
}

#[test]
fn a_preload_that_follows_every_log_is_taken_as_it_is_and_equals_the_disk() {
    for mode in [Mode::Deferred, Mode::Durable] {
        let (mut rng, seed) = seeded_rng("write_log_follow");
        let (disk, s) = writer(mode, &mut rng);
        let (pre, logs) = follow(&disk, s, mode, &mut rng, None);
        assert!(
            logs.iter()
                .any(|l| l.bitmaps.iter().any(|b| !b.regions.is_empty())),
            "the logs name no region (seed {seed})"
        );
        assert_eq!(pre.current(), 2, "{mode:?}, seed {seed}");
        let (read, d) = activate(&disk, pre, mode, seed);
        assert_eq!(d.taken_as_preloaded(), 2, "{mode:?}, seed {seed}");
        // A full read is two bitmaps' bytes; the activate reads only metadata.
        assert!(
            read < bitmap_bytes() / 8,
            "{mode:?}: the activate read {read} bytes (seed {seed})"
        );
        drop(d);
    }
}

#[test]
fn a_missed_log_makes_the_activate_read_everything() {
    for mode in [Mode::Deferred, Mode::Durable] {
        let (mut rng, seed) = seeded_rng("write_log_missed");
        let (disk, s) = writer(mode, &mut rng);
        let (pre, _) = follow(&disk, s, mode, &mut rng, Some(2));
        assert_eq!(pre.current(), 0, "{mode:?}, seed {seed}");
        let (read, d) = activate(&disk, pre, mode, seed);
        assert_eq!(d.taken_as_preloaded(), 0, "{mode:?}, seed {seed}");
        assert!(
            read >= 2 * bitmap_bytes(),
            "{mode:?}: the activate read {read} bytes (seed {seed})"
        );
    }
}

/// The chain's checks, with the applies done right: a copy missing only the last log's
/// regions is what a skipped apply of the last log would leave. Its dirty count differs
/// from the writer's, so it is not current.
///
/// Marks only, no clear: a clear at the end could leave a bitmap empty on disk and in the
/// copy alike (seed 914634385746565281 cleared `b`, which the copy held empty already), and
/// such a copy equals the disk and is rightly current. 300 random 4 KiB marks on a 2^24-bit
/// bitmap holding a few thousand bits set at least one new bit in each bitmap.
#[test]
fn a_copy_that_misses_the_stops_regions_is_not_current() {
    let (mut rng, seed) = seeded_rng("write_log_last");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let (reader, mut pre) = start_following(&disk, &s, Mode::Deferred);
    marks(&s, Mode::Deferred, &mut rng, 300);
    let mut s = s.try_into_inner().unwrap();
    s.inactivate().unwrap();
    let mut last = s.take_write_log().unwrap();
    for b in &mut last.bitmaps {
        b.regions = dirty_bitmap::ChangedRegions::empty(b.regions.region_count());
    }
    pre.apply(&reader, &last).unwrap();
    assert_eq!(pre.current(), 0, "seed {seed}");
    let _ = activate(&disk, pre, Mode::Deferred, seed);
}

#[test]
fn a_directory_change_makes_the_log_whole_and_ends_the_following() {
    let (mut rng, seed) = seeded_rng("write_log_whole");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let (reader, mut pre) = start_following(&disk, &s, Mode::Deferred);
    writes(&s, Mode::Deferred, &mut rng, 100);
    let mut s = s.try_into_inner().unwrap();
    s.flush().unwrap();
    // Removed and added again under the same name: a new table, new clusters.
    s.remove(NAMES[1]).unwrap();
    s.add(NAMES[1], G, Recording::Enabled).unwrap();
    let log = s.take_write_log().unwrap();
    assert!(log.whole, "{log:?}");
    pre.apply(&reader, &log).unwrap();
    assert!(!pre.is_following());
    s.inactivate().unwrap();
    let last = s.take_write_log().unwrap();
    pre.apply(&reader, &last).unwrap();
    assert_eq!(pre.current(), 0, "seed {seed}");
    let _ = activate(&disk, pre, Mode::Deferred, seed);
}

/// The durable bits the preload built and kept are what the disk holds: a mark on a granule
/// the writer cleared (dirty in the preload, clean on disk after the clear) must wait for
/// a commit, and a mark on a granule dirty on disk must not.
#[test]
fn durable_bits_kept_by_the_preload_never_claim_a_cleared_granule() {
    let (mut rng, seed) = seeded_rng("write_log_durable_bits");
    let (disk, s) = writer(Mode::Durable, &mut rng);
    let (reader, mut pre) = start_following(&disk, &s, Mode::Durable);
    let t = s.durable_tracker().unwrap();
    let kept = 7 * G;
    let cleared = 9 * G;
    t.mark(kept, 4096).unwrap();
    t.mark(cleared, 4096).unwrap();
    let log = s.lock().take_write_log().unwrap();
    pre.apply(&reader, &log).unwrap();
    s.lock().clear(NAMES[0]).unwrap();
    s.lock().clear(NAMES[1]).unwrap();
    t.mark(kept, 4096).unwrap();
    drop(t);
    let log = s.lock().take_write_log().unwrap();
    pre.apply(&reader, &log).unwrap();
    let mut s = s.try_into_inner().unwrap();
    s.inactivate().unwrap();
    pre.apply(&reader, &s.take_write_log().unwrap()).unwrap();
    assert_eq!(pre.current(), 2, "seed {seed}");
    let (_, d) = activate(&disk, pre, Mode::Durable, seed);
    let d = SharedStore::new(d);
    let t = d.durable_tracker().unwrap();
    let syncs = disk.syncs.load(SeqCst);
    t.mark(kept, 4096).unwrap();
    assert_eq!(
        disk.syncs.load(SeqCst),
        syncs,
        "a durable granule needs no commit"
    );
    t.mark(cleared, 4096).unwrap();
    assert!(
        disk.syncs.load(SeqCst) > syncs,
        "a granule the writer cleared was taken as durable (seed {seed})"
    );
    let r = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
    assert!(r.load(NAMES[0]).unwrap().is_dirty(cleared));
}
