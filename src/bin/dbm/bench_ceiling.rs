//! The disk's own ceiling for a group commit, with no bitmap code: what `dbm bench
//! durable`'s group commit is measured against besides the naive mode.
//!
//! Writer threads each write one random 4 KiB page in each of `parts` equal parts of a file
//! as large as the bitmaps' clusters (one part per bitmap, as an intent on a clean granule
//! dirties a page of each; the file written whole and synced first, as a durable
//! activation leaves it) and wait until they are durable, three ways:
//!
//! - `naive`: under one lock, the pages and an `fdatasync` (one barrier per write);
//! - `batched`: a writer that finds no commit covering its page leads one: it takes every
//!   waiting page, writes them, and issues one `fdatasync`; one commit at a time;
//! - `overlapped`: the same, with up to [`OVERLAP`] commits in flight (the next batch's
//!   pages written and its barrier issued while the last one's barrier runs). The pages
//!   are written under a lock (as a commit writes them under the store's), the barrier
//!   outside it.
//!
//! Beside them, one writer's page and `fdatasync` with and without an `fstat` before each
//! write (the range check `FileStorage` once made): on kernels with multigrain timestamps
//! the stat makes every barrier commit the journal too (`src/storage/file.rs`).
//!
//! The ratio `batched / naive` (or `overlapped / naive`) is the most any group commit can
//! gain over one barrier per write on this disk at this thread count: a commit still writes
//! one page per waiting write, and only the barriers are shared.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

/// Commits in flight at most in the `overlapped` row.
pub const OVERLAP: u32 = 4;
/// Rounds of the three rows, interleaved; each row's figure is its median round.
const ROUNDS: usize = 3;
/// Page size.
const PAGE: u64 = 4096;

/// Writes per second in each way, and writes per barrier in the batched ones.
pub struct Ceiling {
    pub naive: f64,
    pub batched: f64,
    pub batched_per_barrier: f64,
    pub overlapped: f64,
    pub overlapped_per_barrier: f64,
    /// One writer: mean µs per page and `fdatasync`, without and with an `fstat` before
    /// each write.
    pub plain_us: f64,
    pub stat_us: f64,
}

#[derive(Default)]
struct Commits {
    pending: Vec<u64>,
    /// Writes queued, ever.
    arrivals: u64,
    /// The arrivals the last commit to take the queue covers.
    taken: u64,
    /// The arrivals every finished commit covers: all commits that took earlier have
    /// finished too (their pages were written before this one's barrier started).
    done: u64,
    /// The first write or barrier that failed: every writer stops (one waiting for a
    /// commit that failed would wait for good), and the row is no figure.
    failed: Option<String>,
    in_flight: u32,
    commits: u64,
}

/// One row: `threads` writers for `secs`, a page in each of `parts` parts of `span` bytes
/// per write, at most `max_in_flight` commits (0: naive). Returns writes per second and
/// barriers per second.
fn row(
    file: &File,
    (span, parts): (u64, u64),
    threads: usize,
    max_in_flight: u32,
    secs: f64,
) -> Result<(f64, f64), String> {
    let state = Mutex::new(Commits::default());
    let woken = Condvar::new();
    let writes = Mutex::new(());
    let part_pages = (span / PAGE / parts.max(1)).max(1);
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let page = [0xa5u8; PAGE as usize];
    let start = Instant::now();
    let total: u64 = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (state, woken, writes, page) = (&state, &woken, &writes, &page);
                sc.spawn(move || {
                    let mut rng = SmallRng::seed_from_u64(0x5eed ^ t as u64);
                    let mut n = 0u64;
                    while Instant::now() < stop {
                        let offs: Vec<u64> = (0..parts.max(1))
                            .map(|k| (k * part_pages + rng.random_range(0..part_pages)) * PAGE)
                            .collect();
                        if max_in_flight == 0 {
                            let _g = writes.lock();
                            let r = offs
                                .iter()
                                .try_for_each(|&o| file.write_all_at(page, o))
                                .and_then(|()| file.sync_data());
                            let mut st = state.lock();
                            if let Err(e) = r {
                                st.failed.get_or_insert(e.to_string());
                            }
                            if st.failed.is_some() {
                                return n;
                            }
                            st.commits += 1;
                            n += 1;
                            continue;
                        }
                        let mut st = state.lock();
                        st.pending.extend_from_slice(&offs);
                        st.arrivals += 1;
                        let me = st.arrivals;
                        while st.done < me {
                            if st.failed.is_some() {
                                return n;
                            }
                            if st.taken >= me || st.in_flight >= max_in_flight {
                                woken.wait(&mut st);
                                continue;
                            }
                            st.in_flight += 1;
                            // Gather, as the crate's leader does: yield while writes arrive.
                            for _ in 0..16 {
                                let seen = st.arrivals;
                                drop(st);
                                std::thread::yield_now();
                                st = state.lock();
                                if st.arrivals == seen {
                                    break;
                                }
                            }
                            drop(st);
                            let w = writes.lock();
                            st = state.lock();
                            let batch = std::mem::take(&mut st.pending);
                            let upto = st.arrivals;
                            st.taken = upto;
                            drop(st);
                            let r = batch.iter().try_for_each(|&o| file.write_all_at(page, o));
                            drop(w);
                            let r = r.and_then(|()| file.sync_data());
                            st = state.lock();
                            st.in_flight -= 1;
                            // A failed commit counts as none, and its writes as never
                            // durable: the waiters it covered stop with it.
                            match r {
                                Ok(()) => {
                                    st.commits += 1;
                                    st.done = st.done.max(upto);
                                }
                                Err(e) => {
                                    st.failed.get_or_insert(e.to_string());
                                }
                            }
                            woken.notify_all();
                            if st.failed.is_some() {
                                return n;
                            }
                        }
                        drop(st);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let el = start.elapsed().as_secs_f64().max(1e-9);
    let st = state.lock();
    if let Some(e) = &st.failed {
        return Err(format!("the ceiling's writes failed: {e}"));
    }
    Ok((total as f64 / el, st.commits as f64 / el))
}

/// One writer for `secs`: a page and an `fdatasync` per write, with an `fstat` before each
/// write when `stat`. Mean µs per write.
fn one_writer(file: &File, span: u64, stat: bool, secs: f64) -> Result<f64, String> {
    let mut rng = SmallRng::seed_from_u64(0x57a7);
    let page = [0x5au8; PAGE as usize];
    let stop = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < stop {
        if stat {
            file.metadata().map_err(|e| e.to_string())?;
        }
        let off = rng.random_range(0..span / PAGE) * PAGE;
        file.write_all_at(&page, off)
            .and(file.sync_data())
            .map_err(|e| format!("the ceiling's writes failed: {e}"))?;
        n += 1;
    }
    Ok(start.elapsed().as_secs_f64() * 1e6 / n.max(1) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Measures the three ways with `threads` writers on a file of `span` bytes in `parts`
/// parts under `dir`, `secs` per row and round.
pub fn measure(
    dir: &Path,
    (span, parts): (u64, u64),
    threads: usize,
    secs: f64,
) -> Result<Ceiling, String> {
    let path = dir.join("bench-ceiling.bin");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let span = span.max(PAGE) / PAGE * PAGE;
    let chunk = vec![0x11u8; 1 << 20];
    let mut off = 0;
    while off < span {
        let n = (span - off).min(chunk.len() as u64) as usize;
        file.write_all_at(&chunk[..n], off)
            .map_err(|e| e.to_string())?;
        off += n as u64;
    }
    file.sync_all().map_err(|e| e.to_string())?;
    let mut r: [Vec<(f64, f64)>; 3] = Default::default();
    let (mut plain, mut stat) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (k, fly) in [0, 1, OVERLAP].into_iter().enumerate() {
            r[k].push(row(&file, (span, parts), threads, fly, secs)?);
        }
        plain.push(one_writer(&file, span, false, secs / 2.0)?);
        stat.push(one_writer(&file, span, true, secs / 2.0)?);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    let writes = |k: usize| median(r[k].iter().map(|x| x.0).collect());
    let per_barrier = |k: usize| {
        median(
            r[k].iter()
                .map(|&(w, c)| if c > 0.0 { w / c } else { 0.0 })
                .collect(),
        )
    };
    Ok(Ceiling {
        naive: writes(0),
        batched: writes(1),
        batched_per_barrier: per_barrier(1),
        overlapped: writes(2),
        overlapped_per_barrier: per_barrier(2),
        plain_us: median(plain),
        stat_us: median(stat),
    })
}
