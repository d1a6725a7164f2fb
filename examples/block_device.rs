//! A file-backed block device that records its writes in a persistent dirty bitmap: the way
//! a storage stack or a VMM embeds this crate.
//!
//! - The guest disk is a raw file; the bitmaps live in a bitmap-only qcow2 image beside it
//!   (`BitmapStore::create`), which QEMU's tools read as well.
//! - Every write goes to the raw file, then marks a [`Tracker`] (lock-free, from any
//!   thread), and only then is acknowledged.
//! - A background [`FlushPolicy`] writes the changed regions of the bitmap while the
//!   writers run, so the stop at close has little left to write.
//! - At close: stop the flusher, `inactivate` (the clean stop: the last changed regions and
//!   `in_use` cleared), close. Reopened, the bitmap is consistent and holds every write.
//!
//! `cargo run --example block_device`

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use dirty_bitmap::{
    BitmapState, BitmapStore, FileStorage, FlushPolicy, OpenMode, Recording, SharedStore, Tracker,
};

/// A raw disk whose writes are tracked.
struct BlockDevice {
    disk: File,
    tracker: Tracker,
}

impl BlockDevice {
    /// Writes `buf` at `offset`, then records it. The data write comes first: a backup that
    /// takes the bitmap between the two reads the region again next time, since the mark
    /// lands after the take. Marking first could let a take clear the bit before the data
    /// arrives, and the backup would miss the write.
    fn write(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.disk.write_all_at(buf, offset)?;
        self.tracker.mark(offset, buf.len() as u64);
        Ok(())
    }
}

const DISK_SIZE: u64 = 1 << 30;
const GRANULARITY: u64 = 64 << 10;
const WRITERS: u64 = 4;
const WRITES_EACH: u64 = 200;

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

    // One bitmap that records every write from now on.
    let mut store = BitmapStore::create(FileStorage::create(&image)?, DISK_SIZE, 64 << 10)?;
    store.add("since-full-backup", GRANULARITY, Recording::Enabled)?;
    // `in_use` is set on disk: a crash from here on leaves the bitmap inconsistent (read as
    // all dirty), never falsely clean.
    store.activate()?;
    let device = BlockDevice {
        disk,
        tracker: store.tracker()?,
    };
    let store = SharedStore::new(store);
    let flusher = FlushPolicy::every(Duration::from_millis(20)).spawn(store.clone())?;

    // Four writer threads, 4 KiB writes at scattered offsets.
    let offsets: Vec<u64> = (0..WRITERS)
        .flat_map(|t| (0..WRITES_EACH).map(move |i| ((t * 7919 + i * 104_729) * 4096) % DISK_SIZE))
        .collect();
    std::thread::scope(|s| {
        for chunk in offsets.chunks(WRITES_EACH as usize) {
            let device = &device;
            s.spawn(move || {
                for &off in chunk {
                    device.write(off, &[0xAB; 4096]).expect("write");
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
        }
    });

    // Close: stop the flusher, then the clean stop, then close the image.
    let policy = flusher.stop()?;
    let mut store = store
        .try_into_inner()
        .map_err(|_| "the store is still shared")?;
    let stop = store.inactivate()?;
    println!(
        "{} background flushes wrote {} bytes; the stop wrote {} bytes with {} barriers in {:?}",
        policy.flushes, policy.total.bytes_written, stop.bytes_written, stop.syncs, stop.duration
    );
    store.close()?;

    // Reopened read-only (as a backup tool would), the bitmap is consistent and holds every
    // write: each written 4 KiB lies in a dirty 64 KiB granule.
    let store = BitmapStore::open(
        FileStorage::open(&image, OpenMode::ReadOnly)?,
        OpenMode::ReadOnly,
    )?;
    let info = &store.list()[0];
    assert_eq!(info.state, BitmapState::Consistent);
    let bitmap = store.load("since-full-backup")?;
    for &off in &offsets {
        assert!(
            bitmap.is_dirty(off),
            "write at {off:#x} missing from the bitmap"
        );
    }
    println!(
        "bitmap {}: {} dirty bytes in {} extents; all {} writes recorded",
        info.name,
        bitmap.dirty_bytes(),
        bitmap.dirty_extents().count(),
        offsets.len()
    );
    Ok(())
}
