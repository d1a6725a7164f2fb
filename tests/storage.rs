//! The storage layer: one conformance suite that every backend and wrapper passes, then
//! named scenarios for the latch, the fault plan and the crash images.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dirty_bitmap::storage::{
    CrashMode, CrashStorage, FaultPlan, FaultStorage, FileStorage, Landed, LatchingStorage,
    Locking, MemStorage, Op, OpenMode, Storage, StorageExt, Trigger, MAX_STORAGE_LEN, SECTOR_SIZE,
};
use dirty_bitmap::Error;

mod common;

// ---------------------------------------------------------------------------------------
// helpers

fn is_eof(r: dirty_bitmap::Result<()>) -> bool {
    matches!(r, Err(Error::Io(e)) if e.kind() == ErrorKind::UnexpectedEof)
}

fn is_invalid<T>(r: dirty_bitmap::Result<T>) -> bool {
    matches!(r, Err(Error::InvalidInput(_)))
}

fn os_error<T: std::fmt::Debug>(r: dirty_bitmap::Result<T>) -> Option<i32> {
    match r {
        Err(Error::Io(e)) => e.raw_os_error(),
        other => panic!("expected an OS error, got {other:?}"),
    }
}

fn contents(s: &dyn Storage) -> Vec<u8> {
    s.read_vec_at(0, s.len().unwrap()).unwrap()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

// ---------------------------------------------------------------------------------------
// conformance

/// The contract of [`Storage`] and [`StorageExt`], checked on storages made by `make`
/// from initial contents.
fn conformance(make: impl Fn(&[u8]) -> Box<dyn Storage>) {
    let init = pattern(1000);

    // len and plain reads
    let s = make(&init);
    assert_eq!(s.len().unwrap(), 1000);
    assert_eq!(contents(&*s), init);
    let mut buf = [0u8; 10];
    s.read_exact_at(&mut buf, 500).unwrap();
    assert_eq!(&buf[..], &init[500..510]);

    // reads past the end are errors, not short reads
    assert!(is_eof(s.read_exact_at(&mut [0u8; 2], 999)));
    assert!(is_eof(s.read_exact_at(&mut [0u8; 1], 1000)));
    assert!(is_eof(s.read_exact_at(&mut [0u8; 1], 5000)));
    assert!(is_eof(s.read_exact_at(&mut [], 1001)));
    assert!(s.read_vec_at(990, 11).is_err());

    // zero-length reads and writes at len() are fine
    s.read_exact_at(&mut [], 1000).unwrap();
    s.read_exact_at(&mut [], 0).unwrap();
    s.write_all_at(&[], 1000).unwrap();
    assert_eq!(s.read_vec_at(1000, 0).unwrap(), Vec::<u8>::new());

    // writes past the end are errors and change nothing
    assert!(is_invalid(s.write_all_at(&[9, 9], 999)));
    assert!(is_invalid(s.write_all_at(&[9], 1000)));
    assert!(is_invalid(s.write_all_at(&[], 1001)));
    assert!(is_invalid(s.write_zeroes_at(990, 11)));
    assert_eq!(s.len().unwrap(), 1000);
    assert_eq!(contents(&*s), init);

    // writes inside land
    s.write_all_at(&[0xEE; 2], 998).unwrap();
    s.write_all_at(&[0xDD; 4], 0).unwrap();
    let mut expected = init.clone();
    expected[998..].fill(0xEE);
    expected[..4].fill(0xDD);
    assert_eq!(contents(&*s), expected);

    // set_len grows with zeroes and shrinks; no stale bytes come back
    s.set_len(5000).unwrap();
    assert_eq!(s.len().unwrap(), 5000);
    let grown = contents(&*s);
    assert_eq!(&grown[..1000], &expected[..]);
    assert!(grown[1000..].iter().all(|&b| b == 0));
    s.write_all_at(&[1; 100], 4900).unwrap();
    s.set_len(10).unwrap();
    assert_eq!(contents(&*s), &expected[..10]);
    s.set_len(4999).unwrap();
    assert!(contents(&*s)[10..].iter().all(|&b| b == 0));
    s.set_len(0).unwrap();
    assert!(s.is_empty().unwrap());
    s.read_exact_at(&mut [], 0).unwrap();
    assert!(is_eof(s.read_exact_at(&mut [0], 0)));
    s.sync_data().unwrap();

    // offsets near u64::MAX give errors, not panics or overflow
    let s = make(&init);
    for offset in [
        u64::MAX,
        u64::MAX - 1,
        u64::MAX - 3,
        MAX_STORAGE_LEN - 2,
        MAX_STORAGE_LEN,
    ] {
        assert!(
            s.read_exact_at(&mut [0u8; 4], offset).is_err(),
            "{offset:#x}"
        );
        assert!(s.write_all_at(&[0u8; 4], offset).is_err(), "{offset:#x}");
        assert!(s.read_vec_at(offset, 4).is_err(), "{offset:#x}");
        assert!(s.write_zeroes_at(offset, 4).is_err(), "{offset:#x}");
        assert!(s.read_u64_be_at(offset).is_err(), "{offset:#x}");
    }
    assert!(s.read_exact_at(&mut [], u64::MAX).is_err());
    assert!(is_invalid(s.write_all_at(&[], u64::MAX)));
    assert!(s.read_vec_at(0, u64::MAX).is_err());
    assert!(s.read_vec_at(1, u64::MAX).is_err());
    assert!(s.write_zeroes_at(1, u64::MAX).is_err());
    assert!(is_invalid(s.set_len(u64::MAX)));
    assert!(is_invalid(s.set_len(MAX_STORAGE_LEN + 1)));
    assert!(s.grow_to(u64::MAX).is_err());
    assert_eq!(s.len().unwrap(), 1000);
    assert_eq!(contents(&*s), init);

    // StorageExt conveniences
    let s = make(&init);
    s.write_u64_be_at(8, 0x0102_0304_0506_0708).unwrap();
    assert_eq!(s.read_u64_be_at(8).unwrap(), 0x0102_0304_0506_0708);
    assert_eq!(s.read_vec_at(8, 8).unwrap(), [1, 2, 3, 4, 5, 6, 7, 8]);
    s.write_u32_be_at(996, 0xA1B2_C3D4).unwrap();
    assert_eq!(s.read_u32_be_at(996).unwrap(), 0xA1B2_C3D4);
    assert!(s.read_u32_be_at(997).is_err());
    assert!(s.write_u64_be_at(993, 1).is_err());
    s.grow_to(200_000).unwrap();
    s.grow_to(100).unwrap();
    assert_eq!(s.len().unwrap(), 200_000);
    s.write_all_at(&[0xFF; 200_000], 0).unwrap();
    s.write_zeroes_at(3, 150_000).unwrap();
    let all = contents(&*s);
    assert_eq!(&all[..3], &[0xFF; 3]);
    assert!(all[3..150_003].iter().all(|&b| b == 0));
    assert!(all[150_003..].iter().all(|&b| b == 0xFF));
    // Forgetting the cache after a barrier keeps every byte (dirty ones too: written after
    // the barrier, not yet synced).
    s.sync_data().unwrap();
    s.write_all_at(&[7; 5], 10).unwrap();
    s.forget_cached().unwrap();
    let now = contents(&*s);
    assert_eq!(&now[10..15], &[7; 5]);
    assert_eq!(&now[15..], &all[15..]);

    // an empty storage
    let s = make(&[]);
    assert_eq!(s.len().unwrap(), 0);
    s.read_exact_at(&mut [], 0).unwrap();
    assert!(is_eof(s.read_exact_at(&mut [0], 0)));
    assert!(is_invalid(s.write_all_at(&[0], 0)));
    s.sync_data().unwrap();
}

#[test]
fn conformance_mem() {
    conformance(|b| Box::new(MemStorage::from_bytes(b)));
}

/// Makes file storages in one temporary directory.
struct FileMaker {
    dir: tempfile::TempDir,
    next: AtomicUsize,
}

impl FileMaker {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            next: AtomicUsize::new(0),
        }
    }

    fn path(&self) -> PathBuf {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        self.dir.path().join(format!("image-{n}"))
    }

    fn make(&self, bytes: &[u8]) -> FileStorage {
        let s = FileStorage::create(self.path()).unwrap();
        s.set_len(bytes.len() as u64).unwrap();
        s.write_all_at(bytes, 0).unwrap();
        s
    }
}

#[test]
fn conformance_file() {
    let maker = FileMaker::new();
    conformance(|b| Box::new(maker.make(b)));
}

#[test]
fn conformance_crash() {
    conformance(|b| Box::new(CrashStorage::from_bytes(b)));
}

#[test]
fn conformance_latching_mem() {
    conformance(|b| Box::new(LatchingStorage::new(MemStorage::from_bytes(b))));
}

#[test]
fn conformance_fault_without_faults() {
    conformance(|b| {
        Box::new(FaultStorage::new(
            MemStorage::from_bytes(b),
            FaultPlan::new(),
        ))
    });
}

#[test]
fn conformance_shared_handles() {
    conformance(|b| Box::new(Arc::new(MemStorage::from_bytes(b))));
    conformance(|b| {
        let boxed: Box<dyn Storage> = Box::new(MemStorage::from_bytes(b));
        Box::new(boxed)
    });
    let arc: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(pattern(4)));
    let by_ref: &dyn Storage = &*arc;
    assert_eq!(by_ref.read_vec_at(0, 4).unwrap(), pattern(4));
    assert_eq!((&by_ref).len().unwrap(), 4);
}

// ---------------------------------------------------------------------------------------
// FileStorage

#[test]
fn file_read_only_refuses_writes_and_reopen_sees_synced_data() {
    let maker = FileMaker::new();
    let path = maker.path();
    {
        let s = FileStorage::create(&path).unwrap();
        s.set_len(4096).unwrap();
        s.write_all_at(b"QFI\xfb", 0).unwrap();
        s.sync_data().unwrap();
    }
    assert!(
        FileStorage::create(&path).is_err(),
        "create must not clobber"
    );
    let ro = FileStorage::open(&path, OpenMode::ReadOnly).unwrap();
    assert!(!ro.is_writable());
    assert_eq!(ro.len().unwrap(), 4096);
    assert_eq!(ro.read_vec_at(0, 4).unwrap(), b"QFI\xfb");
    assert!(is_invalid(ro.write_all_at(b"x", 0)));
    assert!(is_invalid(ro.set_len(0)));
    assert_eq!(ro.len().unwrap(), 4096);
    assert!(FileStorage::open(maker.path(), OpenMode::ReadWrite).is_err());
}

// ---------------------------------------------------------------------------------------
// LatchingStorage

type Latched = LatchingStorage<FaultStorage<MemStorage>>;

fn latched(plan: FaultPlan) -> Latched {
    LatchingStorage::new(FaultStorage::new(
        MemStorage::from_bytes(vec![0; 4096]),
        plan,
    ))
}

#[test]
fn latch_after_failed_write_refuses_every_mutation_without_calling_inner() {
    let s = latched(FaultPlan::new().fail_write(Trigger::Nth(2), Landed::Nothing));
    s.write_all_at(&[1], 0).unwrap();
    assert_eq!(os_error(s.write_all_at(&[2], 1)), Some(5));
    assert!(s.is_poisoned());
    assert!(s.first_error().is_some());

    assert!(matches!(s.write_all_at(&[3], 2), Err(Error::Poisoned)));
    assert!(matches!(s.set_len(8192), Err(Error::Poisoned)));
    assert!(matches!(s.sync_data(), Err(Error::Poisoned)));
    assert!(matches!(s.write_zeroes_at(0, 10), Err(Error::Poisoned)));
    let inner = s.inner();
    assert_eq!((inner.writes(), inner.set_lens(), inner.syncs()), (2, 0, 0));

    // reads still work and show only what landed
    assert_eq!(s.len().unwrap(), 4096);
    assert_eq!(s.read_vec_at(0, 3).unwrap(), [1, 0, 0]);
}

#[test]
fn latch_after_failed_sync_never_syncs_again() {
    let s = latched(FaultPlan::new().fail_sync(Trigger::Nth(1)));
    s.write_all_at(&[1], 0).unwrap();
    assert_eq!(os_error(s.sync_data()), Some(5));
    for _ in 0..3 {
        assert!(matches!(s.sync_data(), Err(Error::Poisoned)));
    }
    assert_eq!(s.inner().syncs(), 1, "a failed fsync must never be retried");
    assert!(matches!(s.write_all_at(&[1], 0), Err(Error::Poisoned)));
    assert_eq!(s.inner().writes(), 1);
}

#[test]
fn latch_after_failed_growth() {
    let s = latched(FaultPlan::new().fail_grow(Trigger::Nth(1)));
    assert_eq!(os_error(s.set_len(1 << 20)), Some(28));
    assert!(s.is_poisoned());
    // the inner fault would succeed now; the latch still refuses
    assert!(matches!(s.set_len(1 << 20), Err(Error::Poisoned)));
    assert_eq!(s.inner().set_lens(), 1);
}

#[test]
fn latch_ignores_invalid_input_that_touched_nothing() {
    let s = latched(FaultPlan::new());
    assert!(is_invalid(s.write_all_at(&[1; 2], 4095)));
    assert!(is_invalid(s.set_len(u64::MAX)));
    assert!(s.read_exact_at(&mut [0; 2], 4095).is_err());
    assert!(!s.is_poisoned());
    s.write_all_at(&[1], 4095).unwrap();
    s.sync_data().unwrap();
}

/// A `FileStorage` refuses writes while its writer locks are released (a hand-over),
/// touching nothing, and the latch over it does not take that refusal for a failed write:
/// once the locks are taken back, writes go through instead of returning `Poisoned` for
/// good.
#[test]
fn latch_ignores_a_refusal_while_the_writer_locks_are_released() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latched");
    let s = LatchingStorage::new(FileStorage::create(&path).unwrap());
    s.set_len(512).unwrap();
    s.write_all_at(&[1; 512], 0).unwrap();
    s.set_writer_locks(false).unwrap();
    assert!(matches!(
        s.write_all_at(&[2; 512], 0),
        Err(Error::WrongState(_))
    ));
    assert!(!s.is_poisoned(), "the refusal wrote nothing");
    s.set_writer_locks(true).unwrap();
    s.write_all_at(&[3; 512], 0).unwrap();
    s.sync_data().unwrap();
    assert_eq!(s.read_vec_at(0, 512).unwrap(), vec![3; 512]);
}

#[test]
fn latch_over_crash_storage_keeps_unsynced_writes_unsynced() {
    let fault = FaultStorage::new(
        CrashStorage::from_bytes(vec![0; 1024]),
        FaultPlan::new().fail_sync(Trigger::Nth(1)),
    );
    let s = LatchingStorage::new(fault);
    s.write_all_at(&[7; 4], 0).unwrap();
    assert!(s.sync_data().is_err());
    let crash = s.inner().inner();
    assert_eq!(crash.durable_image(), vec![0; 1024]);
    assert_eq!(
        crash.ops().len(),
        1,
        "the failed sync never reached the log"
    );
}

// ---------------------------------------------------------------------------------------
// FaultStorage

#[test]
fn trigger_fires() {
    assert!(!Trigger::Never.fires(1));
    assert!(!Trigger::Nth(3).fires(2));
    assert!(Trigger::Nth(3).fires(3));
    assert!(!Trigger::Nth(3).fires(4));
    assert!(!Trigger::From(3).fires(2));
    assert!(Trigger::From(3).fires(3));
    assert!(Trigger::From(3).fires(u64::MAX));
}

#[test]
fn fault_fails_exactly_the_nth_write() {
    let s = FaultStorage::new(
        MemStorage::from_bytes(vec![0; 8]),
        FaultPlan::new().fail_write(Trigger::Nth(3), Landed::Nothing),
    );
    for i in 0..5u8 {
        let r = s.write_all_at(&[i + 1], u64::from(i));
        assert_eq!(r.is_err(), i == 2, "write {}", i + 1);
    }
    assert_eq!(s.writes(), 5);
    assert_eq!(s.inner().to_vec(), [1, 2, 0, 4, 5, 0, 0, 0]);
}

#[test]
fn fault_torn_and_complete_failed_writes() {
    let s = FaultStorage::new(
        MemStorage::from_bytes(vec![0; 8]),
        FaultPlan::new().fail_write(Trigger::From(1), Landed::Prefix(3)),
    );
    assert_eq!(os_error(s.write_all_at(&[9; 6], 1)), Some(5));
    assert_eq!(s.inner().to_vec(), [0, 9, 9, 9, 0, 0, 0, 0]);
    // a prefix longer than the buffer is the whole buffer
    assert!(s.write_all_at(&[8; 2], 6).is_err());
    assert_eq!(s.inner().to_vec(), [0, 9, 9, 9, 0, 0, 8, 8]);

    s.set_plan(FaultPlan::new().fail_write(Trigger::Nth(3), Landed::All));
    assert!(s.write_all_at(&[5; 8], 0).is_err());
    assert_eq!(s.inner().to_vec(), [5; 8]);
    s.write_all_at(&[6], 0).unwrap();
    assert_eq!(s.writes(), 4);
}

#[test]
fn fault_fails_exactly_the_nth_sync() {
    let crash = CrashStorage::from_bytes(vec![0; 16]);
    let s = FaultStorage::new(&crash, FaultPlan::new().fail_sync(Trigger::Nth(2)));
    s.write_all_at(&[1], 0).unwrap();
    s.sync_data().unwrap();
    s.write_all_at(&[2], 1).unwrap();
    assert_eq!(os_error(s.sync_data()), Some(5));
    assert_eq!(crash.durable_image()[..2], [1, 0]);
    s.sync_data().unwrap();
    assert_eq!(crash.durable_image()[..2], [1, 2]);
    assert_eq!((s.syncs(), s.writes()), (3, 2));
}

#[test]
fn fault_growth_once_and_always() {
    let once = FaultStorage::new(
        MemStorage::from_bytes(vec![0; 16]),
        FaultPlan::new().fail_grow(Trigger::Nth(1)),
    );
    once.set_len(8).unwrap(); // shrinking is not growth
    assert_eq!(os_error(once.set_len(4096)), Some(28));
    assert_eq!(once.len().unwrap(), 8);
    once.set_len(4096).unwrap();
    assert_eq!((once.set_lens(), once.grows()), (3, 2));

    let always = FaultStorage::new(
        MemStorage::from_bytes(vec![0; 16]),
        FaultPlan::new().fail_grow(Trigger::From(1)),
    );
    for _ in 0..3 {
        assert_eq!(os_error(always.set_len(17)), Some(28));
    }
    always.set_len(16).unwrap();
    always.set_len(4).unwrap();
    assert_eq!(always.len().unwrap(), 4);
    assert!(always.grow_to(5).is_err());
}

#[test]
fn fault_fails_the_nth_read() {
    let s = FaultStorage::new(
        MemStorage::from_bytes(vec![3; 16]),
        FaultPlan::new().fail_read(Trigger::Nth(2)),
    );
    assert_eq!(s.read_u32_be_at(0).unwrap(), 0x0303_0303);
    assert_eq!(os_error(s.read_u32_be_at(0)), Some(5));
    s.read_u32_be_at(0).unwrap();
    assert_eq!(s.reads(), 3);
}

// ---------------------------------------------------------------------------------------
// CrashStorage

/// The scripted sequence the crash-image tests check by hand:
///
/// ```text
/// base: 1024 bytes of 0xAA (sectors 0 and 1)
/// op 0  write 100×0x01 at 10
/// op 1  sync
/// op 2  set_len 2048
/// op 3  write 1024×0x02 at 256     (pieces 256..512, 512..1024, 1024..1280)
/// op 4  write 10×0x03 at 1500      (piece 1500..1510)
/// op 5  sync
/// op 6  write 600×0x04 at 1100     (pieces 1100..1536, 1536..1700)
/// ```
fn scripted() -> CrashStorage {
    let s = CrashStorage::from_bytes(vec![0xAA; 1024]);
    s.write_all_at(&[1; 100], 10).unwrap();
    s.sync_data().unwrap();
    s.set_len(2048).unwrap();
    s.write_all_at(&[2; 1024], 256).unwrap();
    s.write_all_at(&[3; 10], 1500).unwrap();
    s.sync_data().unwrap();
    s.write_all_at(&[4; 600], 1100).unwrap();
    s
}

/// The image after ops 0 and 1.
fn synced_once() -> Vec<u8> {
    let mut d = vec![0xAA; 1024];
    d[10..110].fill(1);
    d
}

/// The image after ops 0 to 5.
fn synced_twice() -> Vec<u8> {
    let mut d = synced_once();
    d.resize(2048, 0);
    d[256..1280].fill(2);
    d[1500..1510].fill(3);
    d
}

fn live_at_end() -> Vec<u8> {
    let mut d = synced_twice();
    d[1100..1700].fill(4);
    d
}

#[test]
fn crash_log_and_points() {
    let s = scripted();
    assert_eq!(s.op_count(), 7);
    let ops = s.ops();
    assert_eq!(
        ops[0],
        Op::Write {
            offset: 10,
            data: Arc::from(&[1u8; 100][..])
        }
    );
    assert_eq!(ops[1], Op::Sync);
    assert_eq!(ops[2], Op::SetLen(2048));
    assert_eq!(s.crash_points(), (0..=7).collect::<Vec<_>>());
    assert_eq!(s.live_image(), live_at_end());
    assert_eq!(s.durable_image(), synced_twice());
    assert!(is_invalid(s.crash_image(8, CrashMode::Kept)));

    // failed and empty writes are not logged; a sync after the start or a sync is no point
    let t = CrashStorage::from_bytes(vec![0; 8]);
    t.sync_data().unwrap();
    assert!(t.write_all_at(&[1], 8).is_err());
    t.write_all_at(&[], 8).unwrap();
    t.write_all_at(&[1], 0).unwrap();
    t.sync_data().unwrap();
    t.sync_data().unwrap();
    assert!(t.set_len(u64::MAX).is_err());
    assert_eq!(t.ops().len(), 4);
    assert_eq!(t.crash_points(), [0, 2, 3]);
}

#[test]
fn crash_dropped_is_the_durable_state() {
    let s = scripted();
    let expected = [
        vec![0xAA; 1024], // 0: nothing synced
        vec![0xAA; 1024], // 1: op 0 unsynced
        synced_once(),
        synced_once(),
        synced_once(),
        synced_once(),
        synced_twice(),
        synced_twice(),
    ];
    for (k, want) in expected.iter().enumerate() {
        assert_eq!(
            &s.crash_image(k, CrashMode::Dropped).unwrap(),
            want,
            "point {k}"
        );
    }
}

#[test]
fn crash_kept_is_the_live_state() {
    let s = scripted();
    // Replay the script on a MemStorage, comparing after every op.
    let mem = MemStorage::from_bytes(vec![0xAA; 1024]);
    assert_eq!(s.crash_image(0, CrashMode::Kept).unwrap(), mem.to_vec());
    for (k, op) in s.ops().iter().enumerate() {
        match op {
            Op::Write { offset, data } => mem.write_all_at(data, *offset).unwrap(),
            Op::SetLen(n) => mem.set_len(*n).unwrap(),
            Op::Sync | Op::FailedSync => {}
        }
        assert_eq!(
            s.crash_image(k + 1, CrashMode::Kept).unwrap(),
            mem.to_vec(),
            "point {}",
            k + 1
        );
    }
    assert_eq!(s.crash_image(7, CrashMode::Kept).unwrap(), live_at_end());
    assert_eq!(s.crash_image(5, CrashMode::Kept).unwrap(), synced_twice());
}

/// The pieces of the unsynced tail at crash point 5 (ops 2 to 4), with their bytes.
const TAIL_AT_5: [(usize, usize, u8); 4] = [
    (256, 512, 2),
    (512, 1024, 2),
    (1024, 1280, 2),
    (1500, 1510, 3),
];

#[test]
fn crash_torn_is_a_per_sector_mix() {
    let s = scripted();
    let durable = synced_once();
    let mut lengths = std::collections::BTreeSet::new();
    let mut landed_counts = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let img = s.crash_image(5, CrashMode::Torn { seed }).unwrap();
        assert!(
            img.len() == 1024 || img.len() == 2048,
            "seed {seed}: len {}",
            img.len()
        );
        lengths.insert(img.len());
        // Every byte outside the tail's pieces is the durable byte (or a zero of the growth).
        let mut covered = vec![false; img.len()];
        let mut landed = 0;
        for (start, end, value) in TAIL_AT_5 {
            if start >= img.len() {
                continue;
            }
            let piece = &img[start..end];
            let old: Vec<u8> = (start..end)
                .map(|i| durable.get(i).copied().unwrap_or(0))
                .collect();
            assert!(
                piece == &old[..] || piece.iter().all(|&b| b == value),
                "seed {seed}: piece {start}..{end} is neither old nor new"
            );
            if piece.iter().all(|&b| b == value) && piece != &old[..] {
                landed += 1;
            }
            covered[start..end].fill(true);
        }
        for (i, &b) in img.iter().enumerate() {
            if !covered[i] {
                assert_eq!(
                    b,
                    durable.get(i).copied().unwrap_or(0),
                    "seed {seed}: byte {i}"
                );
            }
        }
        // the synced write is never lost
        assert!(img[10..110].iter().all(|&b| b == 1), "seed {seed}");
        landed_counts.insert(landed);
    }
    assert_eq!(
        lengths.len(),
        2,
        "the set_len happened under some seeds and not others"
    );
    assert!(
        landed_counts.iter().any(|&n| n > 0 && n < 4),
        "some seed tears the tail: {landed_counts:?}"
    );
}

#[test]
fn crash_torn_pieces_follow_absolute_sectors() {
    // One unsynced write from 500 to 1100 crosses sectors 0, 1 and 2 at 512 and 1024.
    let s = CrashStorage::from_bytes(vec![0; 2048]);
    s.write_all_at(&[7; 600], 500).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let img = s.crash_image(1, CrashMode::Torn { seed }).unwrap();
        let pieces = [(500, 512), (512, 1024), (1024, 1100)];
        let mut mask = 0u8;
        for (bit, (a, b)) in pieces.into_iter().enumerate() {
            let p = &img[a..b];
            assert!(p.iter().all(|&x| x == 7) || p.iter().all(|&x| x == 0));
            if p[0] == 7 {
                mask |= 1 << bit;
            }
        }
        seen.insert(mask);
    }
    assert!(
        seen.len() >= 6,
        "per-sector choices vary with the seed: {seen:?}"
    );
    assert_eq!(SECTOR_SIZE, 512);
}

#[test]
fn crash_torn_same_seed_same_image() {
    let s = scripted();
    for k in s.crash_points() {
        for seed in [0, 1, 42, u64::MAX] {
            let a = s.crash_image(k, CrashMode::Torn { seed }).unwrap();
            let b = s.crash_image(k, CrashMode::Torn { seed }).unwrap();
            assert_eq!(a, b, "point {k} seed {seed}");
        }
    }
    let distinct: std::collections::BTreeSet<Vec<u8>> = (0..16)
        .map(|seed| s.crash_image(7, CrashMode::Torn { seed }).unwrap())
        .collect();
    assert!(distinct.len() > 1);
}

#[test]
fn crash_synced_writes_are_never_lost() {
    let s = scripted();
    let modes = [CrashMode::Dropped, CrashMode::Kept]
        .into_iter()
        .chain((0..32).map(|seed| CrashMode::Torn { seed }));
    for mode in modes {
        for k in s.crash_points() {
            let img = s.crash_image(k, mode).unwrap();
            if k >= 2 {
                assert!(img[10..110].iter().all(|&b| b == 1), "{mode:?} point {k}");
            }
            if k >= 6 {
                // ops 2 to 4 are durable; only op 6 (1100..1700) may differ
                let d = synced_twice();
                assert_eq!(img.len(), 2048);
                assert_eq!(img[..1100], d[..1100], "{mode:?} point {k}");
                assert_eq!(img[1700..], d[1700..], "{mode:?} point {k}");
            }
            if k == 2 || k == 6 {
                // right after a sync every mode agrees
                assert_eq!(img, s.crash_image(k, CrashMode::Dropped).unwrap());
            }
        }
    }
}

/// A failed barrier loses its tail's writes, not its length changes (the file system's
/// metadata, which a failed data writeback does not undo): the live length stays after the
/// cache is dropped, and the length lands at the next barrier, in the crash images walked
/// one by one and all at once alike; before that barrier a crash may or may not have it.
#[test]
fn crash_a_failed_barrier_keeps_its_length_changes() {
    let s = CrashStorage::from_bytes(vec![0x11; 4096]);
    s.set_len(8192).unwrap();
    s.write_all_at(&[0x22; 512], 6144).unwrap();
    s.fail_sync();
    s.forget_cached().unwrap();
    assert_eq!(s.len().unwrap(), 8192);
    let mut at = [0u8; 512];
    s.read_exact_at(&mut at, 6144).unwrap();
    assert_eq!(at, [0; 512], "a write of the failed tail was kept");
    assert_eq!(s.crash_image(3, CrashMode::Dropped).unwrap().len(), 4096);
    assert_eq!(s.crash_image(3, CrashMode::Kept).unwrap().len(), 8192);
    let lens: std::collections::BTreeSet<usize> = (0..16)
        .map(|seed| s.crash_image(3, CrashMode::Torn { seed }).unwrap().len())
        .collect();
    assert_eq!(
        lens,
        [4096, 8192].into(),
        "a torn crash has the length or not"
    );
    s.write_all_at(&[0x33; 512], 0).unwrap();
    s.sync_data().unwrap();
    let synced = s.crash_image(5, CrashMode::Dropped).unwrap();
    assert_eq!(synced.len(), 8192);
    assert_eq!(synced[..512], [0x33; 512]);
    assert_eq!(synced[6144..6656], [0; 512]);
    let walked: Vec<(usize, usize)> = s
        .crash_images(CrashMode::Dropped)
        .map(|(k, img)| (k, img.len()))
        .collect();
    assert_eq!(walked.last(), Some(&(5, 8192)), "{walked:?}");
}

#[test]
fn crash_unsynced_shrink_happens_or_not() {
    let s = CrashStorage::from_bytes(vec![0x11; 2048]);
    s.set_len(512).unwrap();
    s.write_all_at(&[0x22; 512], 0).unwrap();
    assert_eq!(
        s.crash_image(2, CrashMode::Dropped).unwrap(),
        vec![0x11; 2048]
    );
    assert_eq!(s.crash_image(2, CrashMode::Kept).unwrap(), vec![0x22; 512]);
    let mut outcomes = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let img = s.crash_image(2, CrashMode::Torn { seed }).unwrap();
        assert!(img.len() == 512 || img.len() == 2048);
        assert!(img[..512].iter().all(|&b| b == 0x11) || img[..512].iter().all(|&b| b == 0x22));
        assert!(img[512..].iter().all(|&b| b == 0x11));
        outcomes.insert((img.len(), img[0]));
    }
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
}

#[test]
fn crash_images_iterator_matches_crash_image() {
    let s = scripted();
    for mode in [
        CrashMode::Dropped,
        CrashMode::Kept,
        CrashMode::Torn { seed: 7 },
    ] {
        let walked: Vec<(usize, Vec<u8>)> = s.crash_images(mode).collect();
        assert_eq!(walked.len(), s.crash_points().len());
        for (k, img) in walked {
            assert_eq!(img, s.crash_image(k, mode).unwrap(), "{mode:?} point {k}");
        }
    }
}

#[test]
fn crash_storage_is_usable_through_the_trait_object() {
    let s: Arc<CrashStorage> = Arc::new(CrashStorage::new());
    let dynamic: Arc<dyn Storage> = s.clone();
    dynamic.set_len(4096).unwrap();
    dynamic.write_u64_be_at(0, 42).unwrap();
    dynamic.sync_data().unwrap();
    assert_eq!(s.op_count(), 3);
    let img = s.crash_image(3, CrashMode::Dropped).unwrap();
    assert_eq!(MemStorage::from_bytes(img).read_u64_be_at(0).unwrap(), 42);
}

// ---------------------------------------------------------------------------------------
// model checks: random operation sequences against a plain vector

/// One file as two hosts see a LUN: two loop devices over it, each with a page cache of
/// its own. On this host a plain reader (`other`) and a handle reading the device
/// (`FileStorage::reading_the_device`) open one device; the other host writes through the
/// other device.
struct TwoHosts {
    other: std::fs::File,
    device: FileStorage,
    writer: std::fs::File,
    _devs: [common::Loop; 2],
    _dir: tempfile::TempDir,
}

impl TwoHosts {
    /// Bytes of the shared file, all zeros at first.
    const LEN: u64 = 4 << 20;

    fn new() -> TwoHosts {
        use dirty_bitmap::storage::Locking;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("shared");
        std::fs::write(&file, vec![0u8; Self::LEN as usize]).unwrap();
        let devs = [common::Loop::attach(&file), common::Loop::attach(&file)];
        let other = std::fs::File::open(&devs[1].0).unwrap();
        let device = FileStorage::open_with(&devs[1].0, OpenMode::ReadOnly, Locking::Off)
            .unwrap()
            .reading_the_device();
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&devs[0].0)
            .unwrap();
        TwoHosts {
            other,
            device,
            writer,
            _devs: devs,
            _dir: dir,
        }
    }

    /// This host's plain reader caches the whole device, sequentially (so readahead caches
    /// it in large folios: a range drop of a write's own pages leaves a folio reaching
    /// past it); then the other host writes each `(offset, bytes)` and its barrier makes
    /// them durable. Asserts the premise: this host's cache still holds what each range
    /// held before, hiding the write.
    fn write_hidden(&self, writes: &[(u64, &[u8])]) {
        use std::os::unix::fs::FileExt;
        let mut chunk = vec![0u8; 64 << 10];
        for off in (0..Self::LEN).step_by(chunk.len()) {
            self.other.read_exact_at(&mut chunk, off).unwrap();
        }
        let before: Vec<Vec<u8>> = writes
            .iter()
            .map(|&(at, bytes)| {
                let mut old = vec![0u8; bytes.len()];
                self.other.read_exact_at(&mut old, at).unwrap();
                old
            })
            .collect();
        for &(at, bytes) in writes {
            self.writer.write_all_at(bytes, at).unwrap();
        }
        self.writer.sync_data().unwrap();
        for (&(at, bytes), old) in writes.iter().zip(&before) {
            let mut cached = vec![0u8; bytes.len()];
            self.other.read_exact_at(&mut cached, at).unwrap();
            assert_eq!(
                &cached, old,
                "the premise: this host's cache hides the write at {at}"
            );
        }
    }

    /// What the device-reading handle reads at `at`, `len` bytes.
    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.device.read_exact_at(&mut buf, at).unwrap();
        buf
    }
}

/// A read through one of two loop devices over one file returns what its cache holds, not
/// what the other wrote since, unless the handle reads the device
/// (`FileStorage::reading_the_device`), at several offsets.
#[test]
fn a_handle_reading_the_device_sees_another_hosts_write_its_cache_would_hide() {
    let hosts = TwoHosts::new();
    for (i, at) in [8192, (1 << 20), (2 << 20) + 4096, (3 << 20) + (320 << 10)]
        .into_iter()
        .enumerate()
    {
        let word = [b'h', b'o', b's', b'0' + i as u8];
        hosts.write_hidden(&[(at, &word)]);
        assert_eq!(
            hosts.read(at, 4),
            word,
            "a handle reading the device, at {at}"
        );
    }
}

/// A handle reading the device that was told to read ranges ahead
/// (`Storage::prefetch`) reads them from the device all the same: the prefetch drops what
/// this host cached around them before the kernel reads them ahead, and the first read of
/// each then takes that. As the test above, with the ranges prefetched after the other
/// host's write and before their reads, two at once; then a range read once, and one left
/// unread when the handle read something else, are read from the device again.
#[test]
fn a_prefetch_reading_the_device_sees_another_hosts_write_its_cache_would_hide() {
    let hosts = TwoHosts::new();
    for (i, pair) in [
        [8192, (2 << 20) + 4096],
        [(1 << 20), (3 << 20) + (320 << 10)],
    ]
    .into_iter()
    .enumerate()
    {
        let words = [0u8, 1].map(|j| [b'h', b'o', b'0' + i as u8, b'0' + j]);
        hosts.write_hidden(&[(pair[0], &words[0]), (pair[1], &words[1])]);
        hosts.device.prefetch(&pair.map(|at| (at, 4)));
        for (at, word) in pair.into_iter().zip(words) {
            assert_eq!(
                hosts.read(at, 4),
                word,
                "a prefetched range reading the device, at {at}"
            );
        }
        // Once read, a range is not fresh any more: the next read drops what this host
        // cached as any read does.
        let again = [b'a', b'g', b'0' + i as u8, b'0'];
        hosts.write_hidden(&[(pair[0], &again)]);
        assert_eq!(
            hosts.read(pair[0], 4),
            again,
            "a prefetched range read a second time, at {}",
            pair[0]
        );
    }
    // A range left unread when the handle reads anything else is not fresh either.
    let at = 2 << 20;
    hosts.device.prefetch(&[(at, 4), (8192, 4)]);
    hosts.read(0, 4);
    hosts.write_hidden(&[(at, b"last")]);
    assert_eq!(
        hosts.read(at, 4),
        b"last",
        "a range prefetched before another read"
    );
}

/// A handle reading the device drops a prefetched range's pages once it read them (so that
/// a later drop of the whole file's cache, a writable open's inside a migration's
/// downtime, does not pay for them), and only those: the next prefetched range, 64 KiB
/// further in the same 8 MiB window, stays as the kernel read it ahead.
#[cfg(target_os = "linux")]
#[test]
fn a_prefetched_range_reading_the_device_is_dropped_once_read_and_its_neighbour_kept() {
    // Not under /tmp, which may be a tmpfs (whose pages are the file: never dropped).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
    let plain = std::fs::File::open(&path).unwrap();
    // Written back, so that its cached pages are clean and can be dropped.
    plain.sync_all().unwrap();
    let device = FileStorage::open(&path, OpenMode::ReadOnly)
        .unwrap()
        .reading_the_device();
    let (a, b) = (128u64 << 10, 192u64 << 10);
    device.prefetch(&[(a, 4096), (b, 4096)]);
    // The advice starts the reads; wait until the kernel holds both.
    let start = std::time::Instant::now();
    let cached = |at: u64| resident_pages(&plain, at, 4096) == 1;
    while !cached(a) || !cached(b) {
        assert!(
            start.elapsed().as_secs() < 5,
            "the kernel did not read the ranges ahead"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let mut buf = vec![0u8; 4096];
    device.read_exact_at(&mut buf, a).unwrap();
    assert!(buf.iter().all(|&x| x == 0x5a));
    assert!(!cached(a), "the range read is still cached");
    assert!(cached(b), "the next range was dropped with it");
    device.read_exact_at(&mut buf, b).unwrap();
    assert!(!cached(b));
}

/// A handle reading the device returns what a plain read does, for any offset and length,
/// on a file whose length is not a multiple of 4 KiB, and refuses a range past the end as a
/// plain read does.
#[test]
fn a_handle_reading_the_device_reads_any_range_as_a_plain_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    let len = 3 * 4096 + 1000;
    let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    let device = FileStorage::open(&path, OpenMode::ReadOnly)
        .unwrap()
        .reading_the_device();
    for (off, n) in [
        (0, 1),
        (0, 4096),
        (1, 4095),
        (4095, 2),
        (5000, 7000),
        (len - 1, 1),
        (len - 1000, 1000),
        (0, len),
        (len, 0),
    ] {
        let mut got = vec![0u8; n];
        device.read_exact_at(&mut got, off as u64).unwrap();
        assert!(got == bytes[off..off + n], "{off}+{n}");
    }
    for (off, n) in [(len - 1, 2), (len, 1), (len + 4096, 1)] {
        let mut got = vec![0u8; n];
        assert!(
            device.read_exact_at(&mut got, off as u64).is_err(),
            "{off}+{n}"
        );
    }
}

/// A FIFO named `fifo` in `dir`.
fn mkfifo(dir: &Path) -> PathBuf {
    let fifo = dir.join("fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo (coreutils) runs");
    assert!(status.success());
    fifo
}

/// An image's data file name that names a FIFO: a writable open refuses it (QEMU refuses
/// what is neither a regular file nor a block device) instead of blocking until some
/// process opens the FIFO for writing.
#[test]
fn a_data_file_name_naming_a_fifo_is_refused_without_waiting() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = mkfifo(dir.path());
    let img = FileStorage::create(dir.path().join("img")).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let name = fifo.as_os_str().as_bytes().to_vec();
    std::thread::spawn(move || {
        let r = img.hold_data_file(&name).map_err(|e| e.to_string());
        // The image's locks go before the reopen below.
        drop(img);
        let _ = tx.send(r);
    });
    // A bound on a hang, not a speed.
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the open waited for a writer of the FIFO");
    let e = r.expect_err("a FIFO is not a data file");
    assert!(
        e.contains("neither a regular file nor a block device"),
        "{e}"
    );
    // Nor a character device (refused before it is opened).
    let img = FileStorage::open(dir.path().join("img"), OpenMode::ReadWrite).unwrap();
    let e = img.hold_data_file(b"/dev/null").unwrap_err().to_string();
    assert!(
        e.contains("neither a regular file nor a block device"),
        "{e}"
    );
    drop(img);
    // A regular file is taken.
    let data = dir.path().join("data");
    std::fs::write(&data, b"").unwrap();
    let img = FileStorage::open(dir.path().join("img"), OpenMode::ReadWrite).unwrap();
    img.hold_data_file(data.as_os_str().as_bytes()).unwrap();
}

/// A data file held again by the handle that holds it (a store opened again over the same
/// storage) is no conflict with the handle's own locks, which still stand against another
/// writer.
#[test]
fn a_data_file_held_again_by_its_holder_is_no_conflict() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::write(&data, b"").unwrap();
    let name = data.as_os_str().as_bytes();
    let img = FileStorage::create(dir.path().join("img")).unwrap();
    img.hold_data_file(name).unwrap();
    img.hold_data_file(name).unwrap();
    let other = FileStorage::create(dir.path().join("img2")).unwrap();
    let e = other.hold_data_file(name).unwrap_err();
    assert!(matches!(e, dirty_bitmap::Error::Locked { .. }), "{e}");
    drop(img);
    other.hold_data_file(name).unwrap();
}

/// An image path naming a FIFO (`dbm info FIFO`, or the `-b` image of a merge opened
/// while the target image holds its write locks): every open refuses it instead of
/// blocking until some process opens the FIFO's other end; so with a directory and a
/// character device.
#[test]
fn an_image_path_naming_a_fifo_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = mkfifo(dir.path());
    let (tx, rx) = std::sync::mpsc::channel();
    let path = fifo.clone();
    std::thread::spawn(move || {
        let mut errors = Vec::new();
        for (mode, locking) in [
            (OpenMode::ReadOnly, Locking::On),
            (OpenMode::ReadOnly, Locking::ForceShare),
            (OpenMode::ReadWrite, Locking::On),
            (OpenMode::ReadOnly, Locking::Off),
        ] {
            errors.push(
                FileStorage::open_with(&path, mode, locking)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            );
        }
        let _ = tx.send(errors);
    });
    // A bound on a hang, not a speed.
    let errors = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("an open waited for the FIFO's other end");
    for r in errors {
        let e = r.expect_err("a FIFO is not an image");
        assert!(
            e.contains("neither a regular file nor a block device"),
            "{e}"
        );
    }
    for other in [dir.path(), Path::new("/dev/null")] {
        let e = FileStorage::open(other, OpenMode::ReadOnly)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("neither a regular file nor a block device"),
            "{}: {e}",
            other.display()
        );
    }
    // A regular file opens, reads and writes.
    let img = dir.path().join("img");
    std::fs::write(&img, [7u8; 4096]).unwrap();
    let s = FileStorage::open(&img, OpenMode::ReadWrite).unwrap();
    s.write_all_at(&[9u8; 512], 512).unwrap();
    let mut got = [0u8; 1024];
    s.read_exact_at(&mut got, 0).unwrap();
    assert!(got[..512].iter().all(|&b| b == 7) && got[512..].iter().all(|&b| b == 9));
}

mod model {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Write { offset: u64, len: usize, byte: u8 },
        Read { offset: u64, len: usize },
        SetLen(u64),
        Sync,
    }

    fn offset() -> impl Strategy<Value = u64> {
        prop_oneof![
            4 => 0u64..3000,
            1 => any::<u64>(),
            1 => (u64::MAX - 2000)..=u64::MAX,
            1 => (MAX_STORAGE_LEN - 2000)..=(MAX_STORAGE_LEN + 2000),
        ]
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (offset(), 0usize..1200, any::<u8>())
                .prop_map(|(offset, len, byte)| Step::Write { offset, len, byte }),
            2 => (offset(), 0usize..1200).prop_map(|(offset, len)| Step::Read { offset, len }),
            // Lengths either small or above MAX_STORAGE_LEN: a huge valid length would
            // really allocate.
            2 => prop_oneof![0u64..3000, (MAX_STORAGE_LEN + 1)..=u64::MAX].prop_map(Step::SetLen),
            2 => Just(Step::Sync),
        ]
    }

    fn fits(offset: u64, len: usize, size: usize) -> bool {
        offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= size as u64)
    }

    proptest! {
        #![proptest_config(common::seeded_proptest(ProptestConfig::default()))]

        /// Every backend agrees with a vector model, never panics, and the crash images at
        /// every point agree with the model's history.
        #[test]
        fn backends_match_the_model_and_crash_images_match_its_history(
            init_len in 0usize..2000,
            steps in proptest::collection::vec(step(), 0..40),
        ) {
            let init = pattern(init_len);
            let maker = FileMaker::new();
            let crash = CrashStorage::from_bytes(init.clone());
            let backends: Vec<Box<dyn Storage>> = vec![
                Box::new(MemStorage::from_bytes(init.clone())),
                Box::new(maker.make(&init)),
                Box::new(LatchingStorage::new(MemStorage::from_bytes(init.clone()))),
                Box::new(&crash),
            ];
            let mut model = init.clone();
            // history[k]: the model once the crash log held k ops
            let mut history = vec![model.clone()];
            for step in &steps {
                match *step {
                    Step::Write { offset, len, byte } => {
                        let ok = fits(offset, len, model.len());
                        let buf = vec![byte; len];
                        for b in &backends {
                            prop_assert_eq!(b.write_all_at(&buf, offset).is_ok(), ok, "{:?}", b);
                        }
                        if ok {
                            let start = offset as usize;
                            model[start..start + len].copy_from_slice(&buf);
                        }
                    }
                    Step::Read { offset, len } => {
                        let ok = fits(offset, len, model.len());
                        for b in &backends {
                            let mut buf = vec![0; len];
                            let r = b.read_exact_at(&mut buf, offset);
                            prop_assert_eq!(r.is_ok(), ok, "{:?}", b);
                            if ok {
                                let start = offset as usize;
                                prop_assert_eq!(&buf[..], &model[start..start + len]);
                            }
                        }
                    }
                    Step::SetLen(n) => {
                        let ok = n <= MAX_STORAGE_LEN;
                        for b in &backends {
                            prop_assert_eq!(b.set_len(n).is_ok(), ok, "{:?}", b);
                        }
                        if ok {
                            model.resize(n as usize, 0);
                        }
                    }
                    Step::Sync => {
                        for b in &backends {
                            prop_assert!(b.sync_data().is_ok());
                        }
                    }
                }
                while history.len() <= crash.op_count() {
                    history.push(model.clone());
                }
                for b in &backends {
                    prop_assert_eq!(b.len().unwrap(), model.len() as u64);
                }
            }
            for b in &backends {
                prop_assert_eq!(&contents(&**b), &model);
            }

            let ops = crash.ops();
            for k in crash.crash_points() {
                let last_sync = ops[..k].iter().rposition(|op| *op == Op::Sync);
                let durable = &history[last_sync.unwrap_or(0)];
                prop_assert_eq!(&crash.crash_image(k, CrashMode::Dropped).unwrap(), durable);
                prop_assert_eq!(&crash.crash_image(k, CrashMode::Kept).unwrap(), &history[k]);
                let tail = &ops[last_sync.map_or(0, |s| s + 1)..k];
                let mut lengths: Vec<usize> = vec![durable.len()];
                lengths.extend(tail.iter().filter_map(|op| match op {
                    Op::SetLen(n) => Some(*n as usize),
                    _ => None,
                }));
                for seed in 0..4 {
                    let torn = crash.crash_image(k, CrashMode::Torn { seed }).unwrap();
                    prop_assert!(lengths.contains(&torn.len()));
                    // A byte no tail write touched is the durable byte, or a zero of growth.
                    for (p, &b) in torn.iter().enumerate() {
                        let touched = tail.iter().any(|op| matches!(op,
                            Op::Write { offset, data }
                                if (*offset as usize..*offset as usize + data.len()).contains(&p)));
                        if !touched {
                            prop_assert!(b == durable.get(p).copied().unwrap_or(0) || b == 0);
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// sharing between threads

#[test]
fn concurrent_writers_on_shared_handles() {
    let maker = FileMaker::new();
    let storages: Vec<Arc<dyn Storage>> = vec![
        Arc::new(MemStorage::from_bytes(vec![0; 8 * 4096])),
        Arc::new(maker.make(&vec![0; 8 * 4096])),
        Arc::new(CrashStorage::from_bytes(vec![0; 8 * 4096])),
        Arc::new(LatchingStorage::new(MemStorage::from_bytes(vec![
            0;
            8 * 4096
        ]))),
    ];
    for s in storages {
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let s = &s;
                scope.spawn(move || {
                    for i in 0..64u64 {
                        s.write_all_at(&[t + 1; 64], u64::from(t) * 4096 + i * 64)
                            .unwrap();
                    }
                    s.sync_data().unwrap();
                });
            }
        });
        let all = contents(&*s);
        for t in 0..8usize {
            assert!(
                all[t * 4096..(t + 1) * 4096]
                    .iter()
                    .all(|&b| b == t as u8 + 1),
                "{s:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// the system calls of a durable commit

/// A write through `FileStorage` queries no timestamps: with a stat before each write (the
/// range check, as it once was), kernels with multigrain timestamps dirty the inode at
/// every write and each `fdatasync` commits the journal too (about 1.5× its time on this
/// project's machine, `src/storage/file.rs`). Run under `strace`, 50 naive durable
/// intents (each a 4 KiB write and a barrier) may make only the stats of opening the image.
#[test]
fn durable_commits_issue_no_stat_per_write() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=pwrite64,fdatasync,stat,fstat,newfstatat,statx,lstat",
        ])
        .arg(env!("CARGO_BIN_EXE_dbm"))
        .args([
            "bench",
            "durable",
            "--disk-size",
            "16G",
            "--threads",
            "1",
            "--intents",
            "50",
            "--modes",
            "naive",
            "--write-through",
            "0",
            "--ceiling-secs",
            "0",
            "--dir",
        ])
        .arg(dir.path())
        .output()
        .expect("strace must be installed (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&trace).unwrap();
    let call = |l: &str, n: &str| {
        l.split_whitespace()
            .nth(1)
            .is_some_and(|c| c.starts_with(&format!("{n}(")))
    };
    // The commits: from the first barrier to the last (loading the program and opening
    // the image stat files; those are not what this is about).
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.iter().position(|l| call(l, "fdatasync")).unwrap();
    let last = lines.iter().rposition(|l| call(l, "fdatasync")).unwrap();
    let commits = &lines[first..=last];
    let count = |names: &[&str]| {
        commits
            .iter()
            .filter(|l| names.iter().any(|n| call(l, n)))
            .count()
    };
    let syncs = count(&["fdatasync"]);
    let writes = count(&["pwrite64"]);
    let stats = count(&["stat", "fstat", "newfstatat", "statx", "lstat"]);
    println!("between the first and the last barrier: {writes} pwrite64, {syncs} fdatasync, {stats} stat calls");
    assert!(syncs >= 50, "the 50 intents made {syncs} barriers");
    assert!(
        stats < 10,
        "{stats} stat calls for {writes} writes and {syncs} barriers: a stat per write"
    );
}

/// A failed barrier (`CrashStorage::fail_sync`): the writes since the last barrier never
/// land, not at a later barrier either, while reads return them until the cache is
/// forgotten; a crash before the failure may still keep them, and writes after it follow
/// the usual rules.
#[test]
fn crash_storage_models_a_failed_sync() {
    let s = CrashStorage::from_bytes(vec![0u8; 1024]);
    s.write_all_at(&[1; 512], 0).unwrap();
    s.sync_data().unwrap();
    s.write_all_at(&[2; 512], 0).unwrap();
    s.write_all_at(&[3; 512], 512).unwrap();
    let before_failure = s.op_count();
    s.fail_sync();
    s.write_all_at(&[4; 512], 512).unwrap();
    s.sync_data().unwrap();
    let durable = s.durable_image();
    assert_eq!(
        &durable[..512],
        &[1; 512],
        "a write lost by the failed sync landed"
    );
    assert_eq!(&durable[512..], &[4; 512]);
    // Reads still see the lost write, until the cache is forgotten.
    assert_eq!(&contents(&s)[..512], &[2; 512]);
    s.forget_cached().unwrap();
    assert_eq!(contents(&s), durable);
    // A crash before the failure may have kept it.
    let kept = s.crash_image(before_failure, CrashMode::Kept).unwrap();
    assert_eq!(&kept[..512], &[2; 512]);
    // And every crash image after it lacks it.
    for (point, image) in s.crash_images(CrashMode::Kept) {
        if point > before_failure {
            assert_eq!(&image[..512], &[1; 512], "point {point}");
        }
    }
}

/// Pages of `file` resident in the page cache (`mincore` over a mapping of it).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn resident_pages(file: &std::fs::File, offset: u64, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let page = 4096usize;
    let pages = len.div_ceil(page);
    let mut vec = vec![0u8; pages];
    // SAFETY: a shared read-only mapping of `len` bytes of an open file, unmapped below;
    // `mincore` writes one byte per page into `vec`, which holds `pages` bytes.
    unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            offset as libc::off_t,
        );
        assert_ne!(addr, libc::MAP_FAILED, "mmap failed");
        let r = libc::mincore(addr, len, vec.as_mut_ptr());
        libc::munmap(addr, len);
        assert_eq!(r, 0, "mincore failed");
    }
    vec.iter().filter(|&&b| b & 1 != 0).count()
}

/// `FileStorage::forget_cached` drops the file's clean pages; after `keeping_cache` the
/// next call (a writable open's) keeps them, and only that one: a later call (a store
/// taking its writer locks back, which must not be skipped for the handle's whole life)
/// drops them again.
#[cfg(target_os = "linux")]
#[test]
fn forget_cached_drops_the_files_clean_pages_and_keeping_cache_skips_it_once() {
    use std::io::Read;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("cached");
    let len = 1 << 20;
    std::fs::write(&path, vec![7u8; len]).unwrap();
    let probe = std::fs::File::open(&path).unwrap();
    probe.sync_all().unwrap();
    let warm = || {
        let mut buf = Vec::new();
        std::fs::File::open(&path)
            .unwrap()
            .read_to_end(&mut buf)
            .unwrap();
        assert!(
            resident_pages(&probe, 0, len) > 0,
            "reading did not cache the file"
        );
    };
    let s = FileStorage::open(&path, OpenMode::ReadWrite).unwrap();
    warm();
    s.forget_cached().unwrap();
    assert_eq!(
        resident_pages(&probe, 0, len),
        0,
        "forget_cached kept pages"
    );
    drop(s);
    let s = FileStorage::open(&path, OpenMode::ReadWrite)
        .unwrap()
        .keeping_cache();
    warm();
    s.forget_cached().unwrap();
    assert!(
        resident_pages(&probe, 0, len) > 0,
        "keeping_cache did not skip the next call"
    );
    s.forget_cached().unwrap();
    assert_eq!(
        resident_pages(&probe, 0, len),
        0,
        "keeping_cache skipped a later call too"
    );
}

/// `StreamDiskDest::file` drops the image's cached pages at its walk (the source's QUERY,
/// during the precopy), and the take-over's writable open, inside the downtime, keeps
/// what is cached then (dropping it there cost 170 to 225 ms for a 4 GiB file cached
/// whole). The image holds a freed cluster that neither the walk nor the activation reads
/// (bitmap "x" removed), so a drop shows as pages missing after either.
#[cfg(target_os = "linux")]
#[test]
fn a_stream_file_destination_drops_the_cache_at_its_walk_and_not_in_the_downtime() {
    use dirty_bitmap::migration::{bitmap_codec, DestState, StreamDiskDest};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = CachedImage::new(dir.path());
    let (path, resident, warm) = (&img.path, || img.resident(), || img.warm());
    let all = img.warm_whole();
    let mut d = StreamDiskDest::file("s", path);
    d.hello(3, migration(1)).unwrap();
    d.section(&bitmap_codec::encode_query(0x51)).unwrap();
    assert!(d.prewalked());
    assert!(resident() < all, "the walk's open kept the file's cache");
    assert_eq!(warm(), all);
    d.switchover(false);
    d.before_start().unwrap();
    assert!(d.took_over_from_prewalk());
    assert_eq!(
        resident(),
        all,
        "the take-over dropped the cache inside the downtime"
    );
    drop(d.take_store());
    // Without a walk since the last writable open, the next take-over drops it.
    d.failed();
    d.hello(4, migration(2)).unwrap();
    assert_eq!(warm(), all);
    d.switchover(false);
    d.before_start().unwrap();
    assert!(
        resident() < all,
        "a writable open with no walk before it kept the cache"
    );
    d.failed();
    // A drop counts for its own attempt alone: one that failed before its take-over leaves
    // none to the next (which asks nothing here, as QEMU's way: no walk, so it drops).
    d.hello(5, migration(3)).unwrap();
    d.section(&bitmap_codec::encode_query(0x52)).unwrap();
    assert!(d.prewalked());
    d.failed();
    d.hello(6, migration(3)).unwrap();
    assert_eq!(warm(), all);
    d.switchover(false);
    d.before_start().unwrap();
    assert!(
        resident() < all,
        "a drop of a failed attempt's walk kept the cache at the next take-over"
    );
}

/// `SharedDiskDest::file_on_one_host`'s preload drops the image's cache and the activation's
/// writable open keeps it, within one attempt only: a preload of an attempt that failed
/// before its activation leaves no drop to the next attempt, whose activation (with no
/// preload of its own) drops the cache again.
#[cfg(target_os = "linux")]
#[test]
fn a_one_host_shared_destinations_cache_drop_counts_for_its_own_attempt_alone() {
    use dirty_bitmap::migration::{disk_log_codec, DestState, SharedDiskDest};
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = CachedImage::new(dir.path());
    let (path, resident, warm) = (&img.path, || img.resident(), || img.warm());
    let all = img.warm_whole();
    let binding = migration(1);
    let mut d = SharedDiskDest::file_on_one_host("d", path);
    // Within one attempt: the preload drops the cache, the activation keeps it.
    d.hello(2, binding).unwrap();
    d.section(&disk_log_codec::encode_begin(6)).unwrap();
    assert!(resident() < all, "the preload kept the file's cache");
    assert_eq!(warm(), all);
    d.switchover(false);
    d.before_start().unwrap();
    assert_eq!(
        resident(),
        all,
        "the activation dropped the cache inside the downtime"
    );
    d.failed();
    d.hello(3, binding).unwrap();
    d.section(&disk_log_codec::encode_begin(7)).unwrap();
    assert!(resident() < all, "the preload kept the file's cache");
    d.failed();
    d.hello(4, binding).unwrap();
    assert_eq!(warm(), all);
    d.switchover(false);
    d.before_start().unwrap();
    assert!(
        resident() < all,
        "a drop of a failed attempt's preload kept the cache at the next activation"
    );
}

/// A bitmap-only image on a file whose page cache a test reads (`mincore`), holding 16 MiB
/// freed with a bitmap "x" (at 512 B on 64 GiB: a bit in each of its 256 data clusters),
/// past the kernel's read-ahead around what an open, a walk or an activation reads: a drop
/// of the cache shows as pages missing after any of them. It holds bitmap "b".
#[cfg(target_os = "linux")]
struct CachedImage {
    path: PathBuf,
    probe: std::fs::File,
    len: usize,
}

#[cfg(target_os = "linux")]
impl CachedImage {
    fn new(dir: &Path) -> Self {
        use dirty_bitmap::{BitmapStore, DirtyBitmap, Recording};
        let path = dir.join("image.qcow2");
        let disk = 64 << 30;
        let mut s = BitmapStore::create(FileStorage::create(&path).unwrap(), disk, 65536).unwrap();
        s.add("x", 512, Recording::Disabled).unwrap();
        let bits = DirtyBitmap::new(disk, 512).unwrap();
        for k in 0..256u64 {
            bits.mark_dirty(k * (disk / 256), 512);
        }
        s.store("x", &bits).unwrap();
        s.add("b", 65536, Recording::Enabled).unwrap();
        s.remove("x").unwrap();
        drop(s);
        let probe = std::fs::File::open(&path).unwrap();
        probe.sync_all().unwrap();
        let len = probe.metadata().unwrap().len() as usize;
        CachedImage { path, probe, len }
    }

    /// Pages of the file in the page cache.
    fn resident(&self) -> usize {
        resident_pages(&self.probe, 0, self.len)
    }

    /// [`warm`](Self::warm), which must leave every page of the file cached: their count.
    fn warm_whole(&self) -> usize {
        let all = self.warm();
        assert_eq!(
            all,
            self.len.div_ceil(4096),
            "reading did not cache the whole file"
        );
        all
    }

    /// Reads the whole file (through the cache), and returns [`resident`](Self::resident).
    fn warm(&self) -> usize {
        use std::io::Read;
        let mut buf = Vec::new();
        std::fs::File::open(&self.path)
            .unwrap()
            .read_to_end(&mut buf)
            .unwrap();
        self.resident()
    }
}

/// The binding of migration `id`, without nonces.
#[cfg(target_os = "linux")]
fn migration(id: u64) -> dirty_bitmap::migration::Binding {
    dirty_bitmap::migration::Binding {
        migration_id: id,
        token: 0,
    }
}
