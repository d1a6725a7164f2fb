//! Rough stop-time figures for the incremental flush on a 16 TiB bitmap-only image at 64 KiB
//! granularity, fully dirty, with 1 and 4 bitmaps: the incremental `inactivate` after a
//! flush and 100 ms of 4 KiB writes at 20,000/s, side by side with QEMU's whole rewrite
//! (`inactivate_full_rewrite`) after the same workload, and the physical floor (the same
//! number of bytes written to a scratch file, then one fdatasync).
//!
//! `cargo run --release --example flush_figures [DIR]` (default: a temp dir).

use dirty_bitmap::Recording;
use std::io::Write;
use std::time::Instant;

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::BitmapStore;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

const TIB: u64 = 1 << 40;

fn main() -> dirty_bitmap::Result<()> {
    let dir = match std::env::args().nth(1) {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir()?,
    };
    let disk = 16 * TIB;
    println!("bitmaps | stop | bytes | syncs | ms");
    for n in [1usize, 4] {
        let path = dir.path().join(format!("img{n}.qcow2"));
        let mut s = BitmapStore::create(FileStorage::create(&path)?, disk, 65536)?;
        for i in 0..n {
            s.add(&format!("b{i}"), 65536, Recording::Enabled)?;
        }
        s.activate()?;
        let t = s.tracker()?;
        let mut rng = SmallRng::seed_from_u64(1);
        t.mark(0, disk);
        let f = s.flush()?;
        println!(
            "{n} | first flush (fully dirty) | {} | {} | {:.1}",
            f.bytes_written,
            f.syncs,
            f.duration.as_secs_f64() * 1e3
        );
        let workload = |rng: &mut SmallRng| {
            // 100 ms at 20,000 writes/s. Fully dirty: the bits are set already, so the
            // marks change nothing; clear some granules first so they count.
            for _ in 0..2000 {
                let off = rng.random_range(0..disk / 4096) * 4096;
                for b in t.bitmaps().iter() {
                    b.clear(off & !65535, 65536);
                }
                t.mark(off, 4096);
            }
        };
        workload(&mut rng);
        let pending = s.pending_exact()?;
        let inc = s.inactivate()?;
        println!(
            "{n} | incremental inactivate | {} | {} | {:.2}",
            inc.bytes_written,
            inc.syncs,
            inc.duration.as_secs_f64() * 1e3
        );
        // The physical floor for the same bytes.
        let floor_path = dir.path().join("floor");
        let mut ff = std::fs::File::create(&floor_path)?;
        let buf = vec![0xA5u8; pending as usize];
        let t0 = Instant::now();
        ff.write_all(&buf)?;
        ff.sync_data()?;
        println!(
            "{n} | physical floor | {pending} | 1 | {:.2}",
            t0.elapsed().as_secs_f64() * 1e3
        );
        s.activate()?;
        workload(&mut rng);
        let full = s.inactivate_full_rewrite()?;
        println!(
            "{n} | full rewrite (QEMU) | {} | {} | {:.2}",
            full.bytes_written,
            full.syncs,
            full.duration.as_secs_f64() * 1e3
        );
    }
    Ok(())
}
