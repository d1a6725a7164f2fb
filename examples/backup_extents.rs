//! An incremental backup from a persistent dirty bitmap: read the changed extents, copy
//! only those from the disk, then start the next increment.
//!
//! 1. Set up: a raw disk, a bitmap-only qcow2 image beside it with a bitmap that recorded
//!    some writes since the last full backup (the `block_device` example shows the write
//!    side).
//! 2. The next increment starts first: a checkpoint stops the bitmap and starts a new one
//!    in one commit, so every write from here on is in the new one, whether or not the
//!    copy below sees it. (Clearing the bitmap after the copy instead would lose a write
//!    made between the two.) An inconsistent bitmap, after a crash, means "everything
//!    changed": start a new chain and take a full backup.
//! 3. The backup: copy each dirty extent of the stopped bitmap from the disk into the
//!    backup file at the same offset, then remove that bitmap. Only then: a copy that
//!    fails is retried from the same stopped bitmap, with no new checkpoint (or, if new
//!    checkpoints came since, from the union of every bitmap since it:
//!    `BitmapStore::changed_since`), and a bitmap removed before its copy succeeded takes
//!    the writes only it held out of every backup.
//!
//! `cargo run --example backup_extents`

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use dirty_bitmap::{BitmapState, BitmapStore, FileStorage, OpenMode, Recording};

const DISK_SIZE: u64 = 256 << 20;
const GRANULARITY: u64 = 64 << 10;
/// The bitmap that recorded since the last backup.
const NAME: &str = "since-backup-0";
/// The one that records from this backup on.
const NEXT: &str = "since-backup-1";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    let image = dir.path().join("disk.qcow2");
    let backup = dir.path().join("backup.raw");

    // 1. A disk with a full backup already taken (all zeros here), then three writes,
    // recorded in the bitmap.
    let disk = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&raw)?;
    disk.set_len(DISK_SIZE)?;
    let full = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&backup)?;
    full.set_len(DISK_SIZE)?;
    let mut store = BitmapStore::create(FileStorage::create(&image)?, DISK_SIZE, 64 << 10)?;
    store.add(NAME, GRANULARITY, Recording::Enabled)?;
    store.activate()?;
    let tracker = store.tracker()?;
    for (offset, len, byte) in [
        (0x10_0000u64, 4096u64, 1u8),
        (0x10_1000, 8192, 2),
        (0x800_0000, 1 << 20, 3),
    ] {
        disk.write_all_at(&vec![byte; len as usize], offset)?;
        tracker.mark(offset, len);
    }
    store.inactivate()?;
    store.close()?;

    // 2. The next increment starts before the copy.
    let mut store = BitmapStore::open(
        FileStorage::open(&image, OpenMode::ReadWrite)?,
        OpenMode::ReadWrite,
    )?;
    let info = store
        .list()
        .into_iter()
        .find(|b| b.name.as_bytes() == NAME.as_bytes())
        .ok_or("no such bitmap")?;
    if info.state != BitmapState::Consistent {
        // After a crash the bitmap cannot be trusted: every region may have changed.
        println!(
            "bitmap {} is inconsistent: start a new chain, then take a full backup",
            info.name
        );
        return Ok(());
    }
    let stopped = store.checkpoint(NEXT)?;
    assert_eq!(stopped.map(|n| n.to_string()).as_deref(), Some(NAME));
    println!("checkpoint {NEXT}: {NAME} stopped, {NEXT} records from here");

    // 3. The backup, from the stopped bitmap.
    let bitmap = store.load(NAME)?;
    let mut buf = Vec::new();
    let mut copied = 0;
    for (offset, len) in bitmap.dirty_extents() {
        buf.resize(len as usize, 0);
        disk.read_exact_at(&mut buf, offset)?;
        full.write_all_at(&buf, offset)?;
        copied += len;
        println!("copied [{offset:#x}, {:#x}), {len} bytes", offset + len);
    }
    full.sync_data()?;
    println!("backup: {copied} of {DISK_SIZE} bytes copied");

    // The backup now equals the disk, having read only the dirty extents.
    let mut a = vec![0u8; 1 << 20];
    let mut b = vec![0u8; 1 << 20];
    for at in (0..DISK_SIZE).step_by(1 << 20) {
        disk.read_exact_at(&mut a, at)?;
        full.read_exact_at(&mut b, at)?;
        assert!(a == b, "backup differs from the disk at {at:#x}");
    }
    // The two small writes share one 64 KiB granule; the 1 MiB write is 16 granules.
    assert_eq!(copied, GRANULARITY + (1 << 20));
    // Its increment is in the backup; the next one is in NEXT.
    store.remove(NAME)?;
    assert_eq!(store.load(NEXT)?.dirty_bytes(), 0);
    println!("bitmap {NAME} removed; {NEXT} holds the next increment");
    Ok(())
}
