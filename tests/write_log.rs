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

/// One image shared by the writer, the reader and the destination, counting bytes read,
/// and reads that touch the watched range (`watch`).
#[derive(Debug, Default)]
struct Counted {
    inner: MemStorage,
    read: AtomicU64,
    syncs: AtomicU64,
    watch_from: AtomicU64,
    watch_len: AtomicU64,
    watched: AtomicU64,
    /// Milliseconds each watched read sleeps.
    slow_ms: AtomicU64,
    /// The first watched read adds one entry to the header's L1 size first (the tables a
    /// walk reads change under it).
    bump_l1_size: std::sync::atomic::AtomicBool,
}

impl Counted {
    /// Counts, from now on, the reads that touch `[from, from + len)`.
    fn watch(&self, from: u64, len: u64) {
        self.watch_from.store(from, SeqCst);
        self.watch_len.store(len, SeqCst);
        self.watched.store(0, SeqCst);
    }
}

impl Storage for Counted {
    fn len(&self) -> dirty_bitmap::Result<u64> {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> dirty_bitmap::Result<()> {
        self.read.fetch_add(buf.len() as u64, SeqCst);
        let from = self.watch_from.load(SeqCst);
        let len = self.watch_len.load(SeqCst);
        if len > 0 && offset < from + len && from < offset + buf.len() as u64 {
            self.watched.fetch_add(1, SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(self.slow_ms.load(SeqCst)));
            if self.bump_l1_size.swap(false, SeqCst) {
                let mut b = [0u8; 4];
                self.inner.read_exact_at(&mut b, 36)?;
                let n = u32::from_be_bytes(b) + 1;
                self.inner.write_all_at(&n.to_be_bytes(), 36)?;
            }
        }
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

/// The active L1 table of `disk`'s image, as `(offset, bytes)`.
fn l1_of(disk: &Disk) -> (u64, u64) {
    let r = BitmapStore::open(Arc::clone(disk), OpenMode::ReadOnly).unwrap();
    let h = r.image().header();
    (h.l1_table_offset, u64::from(h.l1_size) * 8)
}

/// Counts, from now on, the reads of `disk`'s active L1 table (which only a reference walk
/// reads).
fn watch_l1(disk: &Disk) {
    let (l1, len) = l1_of(disk);
    assert!(len > 0);
    disk.watch(l1, len);
}

/// The reads of the L1 table the activate of `pre` made (see [`activate`]).
fn l1_reads_of_activate(disk: &Disk, pre: Preloaded, mode: Mode, seed: u64) -> u64 {
    watch_l1(disk);
    let (_, d) = activate(disk, pre, mode, seed);
    drop(d);
    disk.watched.load(SeqCst)
}

/// Sets the 16-bit refcount of the cluster at `offset` (an image of this file: refcount
/// order 4, every cluster counted by the first refcount block).
fn set_refcount(disk: &Disk, offset: u64, value: u16) {
    let r = BitmapStore::open(Arc::clone(disk), OpenMode::ReadOnly).unwrap();
    let h = r.image().header().clone();
    assert_eq!(h.refcount_order, 4);
    let cs = h.cluster_size();
    let mut e = [0u8; 8];
    disk.inner
        .read_exact_at(&mut e, h.refcount_table_offset)
        .unwrap();
    let block = u64::from_be_bytes(e) & !(cs - 1);
    let c = offset / cs;
    assert!(c < cs / 2, "cluster {c} is past the first refcount block");
    disk.inner
        .write_all_at(&value.to_be_bytes(), block + 2 * c)
        .unwrap();
}

/// The activate's preflight walked every L1 and L2 table and the refcounts inside the
/// downtime: for a 16 TiB disk whose every L2 table is allocated, 1.4 s warm
/// (docs/BENCHMARKS.md), where QEMU's destination walks nothing. The preload now makes that
/// walk during the precopy, and the activate starts from it: it reads no byte of the L1
/// table (a plain activate of the same image reads it, which shows the watch sees the
/// walk).
#[test]
fn the_activate_from_a_preload_makes_no_reference_walk() {
    for mode in [Mode::Deferred, Mode::Durable] {
        let (mut rng, seed) = seeded_rng("write_log_no_walk");
        let (disk, s) = writer(mode, &mut rng);
        let (pre, _) = follow(&disk, s, mode, &mut rng, None);
        assert_eq!(pre.current(), 2, "{mode:?}, seed {seed}");
        let (l1, len) = l1_of(&disk);
        assert!(len > 0);
        disk.watch(l1, len);
        let (_, d) = activate(&disk, pre, mode, seed);
        assert_eq!(
            disk.watched.load(SeqCst),
            0,
            "{mode:?}: the activate read the L1 table (seed {seed})"
        );
        // Its stop (a full rewrite, which frees by the preload's counts, out of durable
        // mode), and a plain activate of the same image, which walks.
        let mut d = d;
        match mode {
            Mode::Deferred => d.inactivate_full_rewrite().unwrap(),
            Mode::Durable => d.inactivate().unwrap(),
        };
        assert!(d.image().check().unwrap().is_clean(), "{mode:?}");
        drop(d);
        let mut plain = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
        disk.watch(l1, len);
        match mode {
            Mode::Deferred => plain.activate().unwrap(),
            Mode::Durable => plain.activate_durable().unwrap(),
        }
        assert!(
            disk.watched.load(SeqCst) > 0,
            "{mode:?}: the watch saw no walk"
        );
        plain.inactivate().unwrap();
        assert!(plain.image().check().unwrap().is_clean(), "{mode:?}");
    }
}

/// A preload's walk stands for the image only while the header locates its tables where
/// the walk read them: a header that changed since (here its dirty bit, set and cleared
/// again by hand between two logs) drops the walk at the next log the preload applies,
/// the preload no longer says it follows (the source then prices the whole load, walk
/// included), and the activate walks again.
#[test]
fn a_header_that_changed_after_the_preload_walk_makes_the_activate_walk() {
    let (mut rng, seed) = seeded_rng("write_log_moved");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let (reader, mut pre) = start_following(&disk, &s, Mode::Deferred);
    assert!(pre.follows_every_bitmap(), "seed {seed}");
    // Incompatible features, big-endian at 72; bit 0 is the dirty bit.
    let flip = |on: bool| {
        let mut b = [0u8; 8];
        disk.inner.read_exact_at(&mut b, 72).unwrap();
        let v = u64::from_be_bytes(b);
        let v = if on { v | 1 } else { v & !1 };
        disk.inner.write_all_at(&v.to_be_bytes(), 72).unwrap();
    };
    writes(&s, Mode::Deferred, &mut rng, 100);
    s.lock().flush().unwrap();
    pre.apply(&reader, &s.lock().take_write_log().unwrap())
        .unwrap();
    assert!(pre.follows_every_bitmap(), "seed {seed}");
    flip(true);
    writes(&s, Mode::Deferred, &mut rng, 100);
    s.lock().flush().unwrap();
    pre.apply(&reader, &s.lock().take_write_log().unwrap())
        .unwrap();
    assert!(
        !pre.follows_every_bitmap(),
        "a header that changed left the walk standing (seed {seed})"
    );
    flip(false);
    let mut s = s.try_into_inner().unwrap();
    s.inactivate().unwrap();
    pre.apply(&reader, &s.take_write_log().unwrap()).unwrap();
    assert!(
        l1_reads_of_activate(&disk, pre, Mode::Deferred, seed) > 0,
        "the activate trusted a walk the header moved away from (seed {seed})"
    );
}

/// The same when the header changes after the last log the preload applied (here the L1
/// table's size, one entry more, by hand: the entry lies inside its cluster and is zero,
/// so the image is valid either way, and its walk reads another table): the activate
/// reads the header again and walks.
#[test]
fn a_header_that_changed_after_the_last_log_makes_the_activate_walk() {
    let (mut rng, seed) = seeded_rng("write_log_moved_late");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let (pre, _) = follow(&disk, s, Mode::Deferred, &mut rng, None);
    assert_eq!(pre.current(), 2, "seed {seed}");
    bump_l1_size(&disk);
    assert!(
        l1_reads_of_activate(&disk, pre, Mode::Deferred, seed) > 0,
        "the activate trusted a walk of another header (seed {seed})"
    );
}

/// A walk that finds a corruption is not kept: the preload does not say it follows, and
/// the activate walks and refuses, as a plain one does (here the L1 table's refcount is
/// 0 while the header names it).
#[test]
fn a_preload_of_a_corrupt_image_keeps_no_walk_and_the_activate_refuses() {
    let (mut rng, seed) = seeded_rng("write_log_corrupt");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let mut s = s.try_into_inner().unwrap();
    s.inactivate().unwrap();
    let (l1, _) = l1_of(&disk);
    set_refcount(&disk, l1, 0);
    let reader = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
    let mut pre = reader.preload().unwrap();
    pre.follow(7, 0);
    assert_eq!(pre.len(), 2);
    assert!(!pre.follows_every_bitmap(), "seed {seed}");
    let mut d = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
    let e = d.activate_preloaded(pre).unwrap_err();
    assert!(
        matches!(
            e,
            dirty_bitmap::Error::Corrupt(dirty_bitmap::Corruption::CheckFailed { .. })
        ),
        "{e:?}"
    );
}

/// The preload's walk only spares a walk; it never decides alone: a bitmap cluster shared
/// since the preload (here the directory's refcount raised to 2 by hand) fails the check
/// made with it, and the full preflight then refuses the activate, writing nothing.
#[test]
fn a_cluster_shared_after_the_preload_walk_is_refused_by_the_activate() {
    let (mut rng, seed) = seeded_rng("write_log_shared");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let (pre, _) = follow(&disk, s, Mode::Deferred, &mut rng, None);
    let dir = {
        let r = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
        r.image().area().bitmaps.unwrap().directory_offset
    };
    set_refcount(&disk, dir, 2);
    let before = disk.inner.to_vec();
    let mut d = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
    let e = d.activate_preloaded(pre).unwrap_err();
    assert!(
        matches!(
            e,
            dirty_bitmap::Error::Corrupt(dirty_bitmap::Corruption::SharedCluster { .. })
        ),
        "{e:?} (seed {seed})"
    );
    assert!(disk.inner.to_vec() == before, "the refused activate wrote");
}

/// The header's L1 size, one entry more (inside the L1's cluster, a zero entry: valid).
fn bump_l1_size(disk: &Disk) {
    let (_, len) = l1_of(disk);
    assert!(len < 65536, "the L1 table fills its cluster");
    let entries = u32::try_from(len / 8 + 1).unwrap();
    disk.inner.write_all_at(&entries.to_be_bytes(), 36).unwrap();
}

/// A data cluster the writer allocates after the preload's walk was not counted by it
/// (count 0): the activate still walks nothing, since refcount 1 alone (and being named
/// once) proves it the bitmap's. Each bitmap here holds one bit until the preload; then a
/// mark at the disk's end takes a new data cluster of `a`.
#[test]
fn a_bitmap_cluster_allocated_after_the_preload_walk_needs_no_walk() {
    let disk: Disk = Arc::default();
    let mut s = BitmapStore::create(Arc::clone(&disk), DISK, 65536).unwrap();
    for n in NAMES {
        s.add(n, G, Recording::Enabled).unwrap();
    }
    s.activate().unwrap();
    for n in NAMES {
        s.bitmap(n).unwrap().mark_dirty(0, 4096);
    }
    let s = SharedStore::new(s);
    let (reader, mut pre) = start_following(&disk, &s, Mode::Deferred);
    let len_at_walk = disk.len().unwrap();
    s.lock()
        .bitmap(NAMES[0])
        .unwrap()
        .mark_dirty(DISK - 4096, 4096);
    s.lock().flush().unwrap();
    pre.apply(&reader, &s.lock().take_write_log().unwrap())
        .unwrap();
    assert!(pre.follows_every_bitmap());
    assert!(
        disk.len().unwrap() > len_at_walk,
        "the flush allocated no cluster"
    );
    let mut s = s.try_into_inner().unwrap();
    s.inactivate().unwrap();
    pre.apply(&reader, &s.take_write_log().unwrap()).unwrap();
    watch_l1(&disk);
    let (_, d) = activate(&disk, pre, Mode::Deferred, 0);
    assert_eq!(
        disk.watched.load(SeqCst),
        0,
        "a cluster allocated after the walk made the activate walk"
    );
    assert!(d.bitmap(NAMES[0]).unwrap().is_dirty(DISK - 4096));
    drop(d);
}

/// The header is read again inside the activate, not taken from the writable handle's
/// open: a handle opened before the header changed (here its L1 size, by hand) still
/// walks.
#[test]
fn a_header_that_changed_after_the_writable_open_makes_the_activate_walk() {
    let (mut rng, seed) = seeded_rng("write_log_moved_open");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let (pre, _) = follow(&disk, s, Mode::Deferred, &mut rng, None);
    let mut d = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
    bump_l1_size(&disk);
    watch_l1(&disk);
    d.activate_preloaded(pre).unwrap();
    assert!(
        disk.watched.load(SeqCst) > 0,
        "the activate trusted the header of its open (seed {seed})"
    );
    drop(d);
}

/// A walk during which the header changed read tables the image may no longer have: the
/// preload keeps no walk (here the L1 size grows as the walk reads the L1 table).
#[test]
fn a_header_that_changed_during_the_preload_walk_leaves_no_walk() {
    let (mut rng, seed) = seeded_rng("write_log_moved_during");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let reader = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
    watch_l1(&disk);
    disk.bump_l1_size.store(true, SeqCst);
    let mut pre = reader.preload().unwrap();
    assert!(!disk.bump_l1_size.load(SeqCst), "the walk read no L1");
    pre.follow(s.lock().start_write_log(), 0);
    assert!(!pre.follows_every_bitmap(), "seed {seed}");
}

/// A walk that runs past its budget is given up: the preload keeps no walk and does not
/// say it follows (here each read of the L1 table takes 50 ms against a budget of 1 ms).
#[test]
fn a_preload_walk_past_its_budget_is_not_kept() {
    let (mut rng, seed) = seeded_rng("write_log_budget");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let reader = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
    watch_l1(&disk);
    disk.slow_ms.store(50, SeqCst);
    let mut pre = reader
        .preload_within(std::time::Duration::from_millis(1))
        .unwrap();
    disk.slow_ms.store(0, SeqCst);
    assert_eq!(pre.len(), 2);
    pre.follow(s.lock().start_write_log(), 0);
    assert!(!pre.follows_every_bitmap(), "seed {seed}");
    // The same preload with the default budget keeps its walk.
    let mut pre = reader.preload().unwrap();
    pre.follow(s.lock().start_write_log(), 0);
    assert!(pre.follows_every_bitmap(), "seed {seed}");
}

/// The budget holds for the whole walk, not only its counting pass: its comparison with the
/// refcount blocks and its second pass over the L2 tables (the COPIED flags) stop at it
/// too. Here the first refcount block's read takes 300 ms against a budget of 200 ms, after
/// the counting pass: the walk is given up, not kept.
#[test]
fn a_preload_walk_past_its_budget_after_the_counting_pass_is_not_kept() {
    let (mut rng, seed) = seeded_rng("write_log_budget_late");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let reader = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
    let block = {
        let h = reader.image().header();
        let mut e = [0u8; 8];
        disk.inner
            .read_exact_at(&mut e, h.refcount_table_offset)
            .unwrap();
        u64::from_be_bytes(e) & !(h.cluster_size() - 1)
    };
    disk.watch(block, 1);
    disk.slow_ms.store(300, SeqCst);
    let mut pre = reader
        .preload_within(std::time::Duration::from_millis(200))
        .unwrap();
    disk.slow_ms.store(0, SeqCst);
    assert!(
        disk.watched.load(SeqCst) > 0,
        "the walk read no refcount block"
    );
    pre.follow(s.lock().start_write_log(), 0);
    assert!(!pre.follows_every_bitmap(), "seed {seed}");
}

/// Where `b`'s first data entry lies, what `a`'s first data entry holds, the active L1
/// table's offset, and a setter of a bitmap's `in_use` flag, on `disk` as it is now.
struct Entries {
    b_first: u64,
    a_first_raw: u64,
    l1: u64,
    flags_at: Vec<(String, u64)>,
}

impl Entries {
    fn of(disk: &Disk) -> Entries {
        let r = BitmapStore::open(Arc::clone(disk), OpenMode::ReadOnly).unwrap();
        let area = r.image().area().clone();
        drop(r);
        let ext = area.bitmaps.unwrap();
        let geo =
            dirty_bitmap::format::ImageGeometry::new(area.header.cluster_bits, area.header.size)
                .unwrap();
        let mut dir = vec![0u8; ext.directory_size as usize];
        disk.inner
            .read_exact_at(&mut dir, ext.directory_offset)
            .unwrap();
        let entries = dirty_bitmap::format::decode_directory(&dir, ext.nb_bitmaps, &geo).unwrap();
        let first_data = |name: &str| {
            let e = entries
                .iter()
                .find(|e| e.name.as_bytes() == name.as_bytes())
                .unwrap();
            (0..u64::from(e.table_size))
                .map(|i| {
                    let mut raw = [0u8; 8];
                    let at = e.table_offset + 8 * i;
                    disk.inner.read_exact_at(&mut raw, at).unwrap();
                    (at, u64::from_be_bytes(raw))
                })
                .find(|&(_, raw)| raw & 0x00FF_FFFF_FFFF_FE00 != 0)
                .unwrap()
        };
        // Each entry's flags word: at 12 in an entry; entries are 8-aligned, 24 bytes and
        // the name (no extra data here).
        let mut at = ext.directory_offset;
        let mut flags_at = Vec::new();
        for e in &entries {
            flags_at.push((
                String::from_utf8_lossy(e.name.as_bytes()).into_owned(),
                at + 12,
            ));
            at += (24 + e.name.as_bytes().len() as u64).div_ceil(8) * 8;
        }
        Entries {
            b_first: first_data(NAMES[1]).0,
            a_first_raw: first_data(NAMES[0]).1,
            l1: area.header.l1_table_offset,
            flags_at,
        }
    }

    /// Sets `name`'s `in_use` flag on `disk`.
    fn set_in_use(&self, disk: &Disk, name: &str) {
        let at = self.flags_at.iter().find(|(n, _)| n == name).unwrap().1;
        let mut f = [0u8; 4];
        disk.inner.read_exact_at(&mut f, at).unwrap();
        let flags = u32::from_be_bytes(f) | 1;
        disk.inner.write_all_at(&flags.to_be_bytes(), at).unwrap();
    }
}

/// How `b`'s first data entry is made to share a cluster after the preload.
#[derive(Debug, Clone, Copy)]
enum Share {
    /// `a`'s first data cluster.
    WithA,
    /// `a`'s first data cluster, with `b` marked `in_use` (inconsistent: its data is not
    /// written in place, but what it names is still named).
    WithAWhileInUse,
    /// The active L1 table's cluster.
    WithL1,
    /// `a`'s first data cluster, both in use (refcount 1: a fresh walk counts two).
    BothInUse,
    /// The L1 table's cluster, `b` in use (refcount 1: a fresh walk counts two).
    InUseWithL1,
}

/// Found by reviews: a fresh walk counted a cluster named by two structures twice, and
/// refused; a walk made before the two came to share it counts it once or not at all. The
/// activate's check names each cluster once, the image's own structures included:
/// `b`'s first data entry pointed by hand, after the preload, at `a`'s first data cluster
/// (also with `b` in use) or at the L1 table's cluster (refcounts left at 1) is refused,
/// and nothing is written.
#[test]
fn a_cluster_two_structures_share_after_the_preload_is_refused() {
    for share in [
        Share::WithA,
        Share::WithAWhileInUse,
        Share::WithL1,
        Share::BothInUse,
        Share::InUseWithL1,
    ] {
        let (mut rng, seed) = seeded_rng("write_log_twice");
        let (disk, s) = writer(Mode::Deferred, &mut rng);
        let (pre, _) = follow(&disk, s, Mode::Deferred, &mut rng, None);
        let en = Entries::of(&disk);
        let raw = match share {
            Share::WithA | Share::WithAWhileInUse | Share::BothInUse => en.a_first_raw,
            Share::WithL1 | Share::InUseWithL1 => en.l1,
        };
        disk.inner
            .write_all_at(&raw.to_be_bytes(), en.b_first)
            .unwrap();
        if !matches!(share, Share::WithA | Share::WithL1) {
            en.set_in_use(&disk, NAMES[1]);
            let r = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadOnly).unwrap();
            assert!(r.list()[1].in_use, "{:?}", r.list());
        }
        if let Share::BothInUse = share {
            en.set_in_use(&disk, NAMES[0]);
        }
        let before = disk.inner.to_vec();
        let mut d = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
        let e = d.activate_preloaded(pre).unwrap_err();
        assert!(
            matches!(e, dirty_bitmap::Error::Corrupt(_)),
            "{share:?}: {e:?} (seed {seed})"
        );
        assert!(
            disk.inner.to_vec() == before,
            "{share:?}: the refused activate wrote"
        );
    }
}

/// Two in-use bitmaps whose data name one cluster of refcount 2 pass a fresh walk (nothing
/// in use is written, and the refcount covers both names), and the check made with the
/// preload's walk accepts them too: refusing any second name would fall back to the full
/// preflight, inside the downtime, unpriced. It asks whether the refcount covers the names:
/// no walk.
#[test]
fn in_use_bitmaps_sharing_a_cluster_their_refcount_covers_need_no_walk() {
    let (mut rng, seed) = seeded_rng("write_log_in_use_shared");
    let (disk, s) = writer(Mode::Deferred, &mut rng);
    let (pre, _) = follow(&disk, s, Mode::Deferred, &mut rng, None);
    let en = Entries::of(&disk);
    disk.inner
        .write_all_at(&en.a_first_raw.to_be_bytes(), en.b_first)
        .unwrap();
    set_refcount(&disk, en.a_first_raw & 0x00FF_FFFF_FFFF_FE00, 2);
    for n in NAMES {
        en.set_in_use(&disk, n);
    }
    // A fresh walk accepts this image (a plain activate of a copy).
    let mut copy = BitmapStore::open(
        MemStorage::from_bytes(disk.inner.to_vec()),
        OpenMode::ReadWrite,
    )
    .unwrap();
    copy.activate().unwrap();
    drop(copy);
    let (l1, len) = l1_of(&disk);
    disk.watch(l1, len);
    let mut d = BitmapStore::open(Arc::clone(&disk), OpenMode::ReadWrite).unwrap();
    d.activate_preloaded(pre).unwrap();
    assert_eq!(
        disk.watched.load(SeqCst),
        0,
        "the activate walked (seed {seed})"
    );
    drop(d);
}
