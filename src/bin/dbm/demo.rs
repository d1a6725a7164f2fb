//! `dbm demo`: a guest-like workload on a large in-memory bitmap, flushed incrementally.
//!
//! Writer threads issue random 4 KiB writes, most of them in a 64 GiB hot spot that moves
//! every round, paced evenly over the round like a running guest. While they run, the main
//! thread flushes the changed regions of the change map to a file every `--flush-ms`. When
//! the writers stop (the "VM stop"), one last flush writes what is left: that final flush
//! is the only part that would fall inside a downtime. At the end the file is read back
//! and compared with the bitmap.

use std::error::Error;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use dirty_bitmap::{ChangedRegions, DirtyBitmap};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::DemoArgs;

const WRITE: u64 = 4096;
const HOT_SPOT: u64 = 64 << 30;
const ROUND: Duration = Duration::from_millis(1000);
const FLUSH_EVERY: Duration = Duration::from_millis(100);
const TICK: Duration = Duration::from_millis(5);

/// Outcome of one flush pass.
struct Pass {
    taken: ChangedRegions,
    bytes: u64,
}

/// Writes every region changed since the last take to `file` at its serialized offset.
fn flush(bm: &DirtyBitmap, file: &File, buf: &mut [u8]) -> std::io::Result<Pass> {
    let taken = bm.take_changed();
    let mut bytes = 0;
    for r in taken.iter() {
        let len = bm.region_len(r) as usize;
        let out = &mut buf[..len];
        bm.serialize_region(r, out)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if let Err(e) = file.write_all_at(out, r * bm.region_size()) {
            // Hand the regions back: a failed flush must not forget what changed.
            bm.requeue_changed(&taken);
            return Err(e);
        }
        bytes += len as u64;
    }
    Ok(Pass { taken, bytes })
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn run(args: &DemoArgs) -> Result<(), Box<dyn Error>> {
    if args.threads == 0 || args.rounds == 0 || args.writes_per_round == 0 {
        return Err("--threads, --rounds and --writes-per-round must be at least 1".into());
    }
    if !(0.0..=100.0).contains(&args.uniform_percent) {
        return Err(format!(
            "--uniform-percent {} is not in 0..=100",
            args.uniform_percent
        )
        .into());
    }
    let bm = Arc::new(DirtyBitmap::new(args.disk_size, args.granularity)?);
    let seed = args.seed.unwrap_or_else(rand::random);
    let tmp;
    let dir: PathBuf = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let path = dir.join("bitmap.bin");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    file.set_len(bm.serialized_len())?;

    let leaf = bm.bit_count().div_ceil(64) * 8;
    println!(
        "dbm demo: {} disk at {} granularity: {} bits, {} of bitmap in {} regions of {}",
        human(bm.disk_size()),
        human(bm.granularity()),
        bm.bit_count(),
        human(bm.serialized_len()),
        bm.region_count(),
        human(bm.region_size()),
    );
    println!(
        "memory: {} ({} of leaf words + {:.2} % for summaries and change map)",
        human(bm.memory_usage() as u64),
        human(leaf),
        (bm.memory_usage() as f64 - leaf as f64) * 100.0 / leaf as f64
    );
    println!(
        "{} writer threads, {} writes of 4 KiB per round over {} ms ({} % anywhere on the disk, \
         the rest in a 64 GiB hot spot that moves every round), flushing to {} every {} ms; seed {seed}",
        args.threads,
        args.writes_per_round,
        ROUND.as_millis(),
        args.uniform_percent,
        path.display(),
        FLUSH_EVERY.as_millis(),
    );
    println!();
    println!(
        "{:>5} {:>9} {:>10} {:>8} {:>16} {:>7} {:>20} {:>9}",
        "round",
        "writes",
        "dirty",
        "changed",
        "flushed running",
        "passes",
        "final flush",
        "final ms"
    );

    let mut rng = SmallRng::seed_from_u64(seed);
    let mark_nanos = Arc::new(AtomicU64::new(0));
    let mut total_writes = 0u64;
    let mut buf = vec![0u8; bm.region_size() as usize];
    let mut final_regions_total = 0;
    for round in 1..=args.rounds {
        let hot = args.disk_size.saturating_sub(HOT_SPOT).max(1);
        let hot_start = rng.random_range(0..hot) / WRITE * WRITE;
        let per_thread = args.writes_per_round / args.threads as u64;
        let writers: Vec<_> = (0..args.threads)
            .map(|t| {
                let bm = Arc::clone(&bm);
                let mark_nanos = Arc::clone(&mark_nanos);
                let mut rng = SmallRng::seed_from_u64(seed ^ (u64::from(round) << 32) ^ t as u64);
                let (disk, uniform) = (args.disk_size, args.uniform_percent / 100.0);
                thread::spawn(move || {
                    let start = Instant::now();
                    let ticks = (ROUND.as_millis() / TICK.as_millis()) as u64;
                    let mut done = 0u64;
                    for tick in 1..=ticks {
                        let target = per_thread * tick / ticks;
                        let offsets: Vec<u64> = (done..target)
                            .map(|_| {
                                let off = if rng.random::<f64>() < uniform {
                                    rng.random_range(0..disk)
                                } else {
                                    hot_start + rng.random_range(0..HOT_SPOT.min(disk))
                                };
                                off / WRITE * WRITE
                            })
                            .collect();
                        let t0 = Instant::now();
                        for off in offsets {
                            bm.mark_dirty(off, WRITE);
                        }
                        mark_nanos.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        done = target;
                        if tick == ticks {
                            break;
                        }
                        if let Some(wait) =
                            (start + TICK * tick as u32).checked_duration_since(Instant::now())
                        {
                            thread::sleep(wait);
                        }
                    }
                    done
                })
            })
            .collect();

        // Flush while the guest runs.
        let mut running_regions = 0;
        let mut changed_this_round: Option<ChangedRegions> = None;
        let mut passes = 0u32;
        let round_start = Instant::now();
        // Poll for the writers' end every millisecond, so that the first flush after the
        // "VM stop" is the final one.
        while writers.iter().any(|w| !w.is_finished()) {
            let next = round_start + FLUSH_EVERY * (passes + 1);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                thread::sleep(wait.min(Duration::from_millis(1)));
                continue;
            }
            let pass = flush(&bm, &file, &mut buf)?;
            file.sync_data()?;
            running_regions += pass.taken.len();
            match &mut changed_this_round {
                Some(c) => c.union_with(&pass.taken),
                None => changed_this_round = Some(pass.taken),
            }
            passes += 1;
        }
        let mut writes = 0;
        for w in writers {
            writes += w.join().map_err(|_| "a writer thread panicked")?;
        }
        total_writes += writes;

        // "VM stopped": the final flush is all that is left.
        let t0 = Instant::now();
        let fin = flush(&bm, &file, &mut buf)?;
        file.sync_data()?;
        let final_ms = t0.elapsed().as_secs_f64() * 1000.0;
        final_regions_total += fin.taken.len();
        let changed = match changed_this_round {
            Some(mut c) => {
                c.union_with(&fin.taken);
                c.len()
            }
            None => fin.taken.len(),
        };
        println!(
            "{:>5} {:>9} {:>10} {:>8} {:>16} {:>7} {:>20} {:>9.2}",
            round,
            writes,
            human(bm.dirty_bytes()),
            changed,
            running_regions,
            passes,
            format!("{} ({})", fin.taken.len(), human(fin.bytes)),
            final_ms
        );
    }

    let t0 = Instant::now();
    let extents = bm.dirty_extents().count();
    let list_time = t0.elapsed();
    let secs = mark_nanos.load(Ordering::Relaxed) as f64 / 1e9;
    println!();
    println!(
        "dirty: {} in {} extents (listed in {:.1} ms)",
        human(bm.dirty_bytes()),
        extents,
        list_time.as_secs_f64() * 1000.0
    );
    println!(
        "marks: {total_writes} in {:.1} ms of marking time over all threads = {:.1} M marks/s per thread",
        secs * 1000.0,
        total_writes as f64 / secs / 1e6
    );

    // Verify: the file holds exactly the bitmap.
    let mut on_file = vec![0u8; bm.serialized_len() as usize];
    file.read_exact_at(&mut on_file, 0)?;
    let reloaded = DirtyBitmap::new(args.disk_size, args.granularity)?;
    let mut in_memory = vec![0u8; bm.region_size() as usize];
    for r in 0..bm.region_count() {
        let start = (r * bm.region_size()) as usize;
        let len = bm.region_len(r) as usize;
        bm.serialize_region(r, &mut in_memory[..len])?;
        if in_memory[..len] != on_file[start..start + len] {
            return Err(format!("region {r} on file differs from memory").into());
        }
        reloaded.load_region(r, &on_file[start..start + len])?;
    }
    if reloaded.count() != bm.count() || !reloaded.dirty_extents().eq(bm.dirty_extents()) {
        return Err("the bitmap reloaded from the file differs from memory".into());
    }
    println!(
        "verified: the flushed file equals the in-memory bitmap ({} compared, {} dirty bits reloaded); \
         {} regions were left for the {} stop-time flushes",
        human(on_file.len() as u64),
        reloaded.count(),
        final_regions_total,
        args.rounds
    );
    println!(
        "a whole-bitmap rewrite at each stop (QEMU's way) would have written {} each time instead",
        human(bm.serialized_len())
    );
    Ok(())
}
