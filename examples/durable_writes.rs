//! A storage stack with write-intent bitmaps (durable mode): a write to the disk is issued
//! only once its bit is on disk, so after a crash or power loss the bitmap is consistent
//! and covers every write, and the next backup stays incremental.
//!
//! 1. A raw disk and a bitmap-only qcow2 image beside it, activated in durable mode: every
//!    bitmap cluster is allocated now, and `in_use` is never set.
//! 2. Four writer threads. Each write: `DurableTracker::begin_write` (the intent, as
//!    `mark`: returns at once when the granule is already dirty and on disk; otherwise
//!    waits for a group commit, which one of the waiting threads runs), then the data
//!    write, then the guard dropped. The guard keeps the write in flight for the store, so
//!    a checkpoint, a clear or a hand-over may run beside the writers: a write acknowledged
//!    before it and landing after it is marked in the bitmaps recording after it. (Plain
//!    `mark` is enough for a stack that drains its writes around those calls, as QEMU
//!    does.) An asynchronous stack would use `register_write` and `intent`, and poll the
//!    ticket instead.
//! 3. "Crash": the process stops without inactivating. The image is reopened as QEMU
//!    would: the bitmap is consistent and holds every write.
//!
//! `cargo run --example durable_writes`

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use dirty_bitmap::{BitmapState, BitmapStore, FileStorage, OpenMode, Recording, SharedStore};

const DISK_SIZE: u64 = 1 << 30;
const GRANULARITY: u64 = 64 << 10;
const NAME: &str = "since-last-backup";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let raw = dir.path().join("disk.raw");
    let image = dir.path().join("disk.qcow2");
    let disk = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&raw)?;
    disk.set_len(DISK_SIZE)?;

    // 1. The image, with one bitmap, active in durable mode.
    let mut store = BitmapStore::create(FileStorage::create(&image)?, DISK_SIZE, 65536)?;
    store.add(NAME, GRANULARITY, Recording::Enabled)?;
    store.activate_durable()?;
    let store = SharedStore::new(store);
    let intents = store.durable_tracker()?;

    // 2. Four writers: the intent (registered in flight) first, then the write.
    let written: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let intents = intents.clone();
                let disk = &disk;
                s.spawn(move || -> Result<Vec<u64>, String> {
                    let mut offsets = Vec::new();
                    for k in 0..64u64 {
                        // Spread over the disk, some granules written twice.
                        let offset = ((t * 7919 + k * 104_729) % (DISK_SIZE / 4096)) * 4096;
                        let in_flight = intents
                            .begin_write(offset, 4096)
                            .map_err(|e| e.to_string())?;
                        disk.write_all_at(&[0xAB; 4096], offset)
                            .map_err(|e| e.to_string())?;
                        // Completed: the store no longer needs to carry it over a change.
                        drop(in_flight);
                        offsets.push(offset);
                    }
                    Ok(offsets)
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .expect("a writer panicked")
                    .expect("a write failed")
            })
            .collect()
    });
    println!(
        "{} writes issued, each after its intent was on disk",
        written.len()
    );

    // 3. A crash: no inactivate, no close (the store is left as it is, its locks held).
    // Read the image as it is on disk, as `qemu-img -U` would beside a running writer.
    drop(intents);
    let after = BitmapStore::open(FileStorage::open_shared(&image)?, OpenMode::ReadOnly)?;
    let info = after
        .list()
        .into_iter()
        .find(|b| b.name.as_bytes() == NAME.as_bytes())
        .ok_or("the bitmap is gone")?;
    assert_eq!(info.state, BitmapState::Consistent);
    assert!(!info.in_use);
    let bitmap = after.load(NAME)?;
    assert!(written.iter().all(|&o| bitmap.is_dirty(o)));
    println!(
        "after the crash: {NAME:?} is consistent (not in_use) and covers all {} writes: {} \
         dirty bytes",
        written.len(),
        bitmap.dirty_bytes()
    );
    // (A real crash ends the process here; this one closes the store properly.)
    store
        .try_into_inner()
        .map_err(|_| "still shared")?
        .inactivate()?;
    Ok(())
}
