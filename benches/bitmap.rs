//! In-memory bitmap benchmarks on a 16 TiB disk at 64 KiB granularity (2^28 bits, 32 MiB
//! of bitmap), each run side by side with vm-memory's `AtomicBitmap` (what Rust VMMs use)
//! and a flat `Vec<AtomicU64>` where they have the operation.
//!
//! `cargo bench --bench bitmap`; figures go to docs/BENCHMARKS.md.

use std::cell::Cell;
use std::hint::black_box;
use std::num::NonZeroUsize;
use std::sync::atomic::{
    compiler_fence, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::Release, Ordering::SeqCst,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use dirty_bitmap::{DirtyBitmap, Tracker};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use vm_memory::bitmap::AtomicBitmap;

const DISK: u64 = 16 << 40;
const GRAN: u64 = 64 << 10;
const NBITS: u64 = DISK / GRAN;
const SEED: u64 = 0x5eed;

/// The naive peer: a flat array of atomic words, one `fetch_or` per word touched, and a
/// linear scan to find anything. The second array, a bit per 8 words, is used only by the
/// floors [`mark_summarized`](Self::mark_summarized) and [`mark_whole`](Self::mark_whole);
/// the third, a bit per 512 words (a change-map region of ours at this size), only by the
/// latter.
struct Flat(Box<[AtomicU64]>, Box<[AtomicU64]>, Box<[AtomicU64]>);

/// What the whole-protocol floor reads besides the arrays: the state byte, the consumer
/// count, and the per-thread lines of announcements and counters.
struct Whole {
    state: AtomicU8,
    consumers: AtomicU64,
    lines: Box<[Line]>,
}

/// A thread's announcement sequence and bit counter, on a line of their own.
#[repr(align(128))]
struct Line {
    marks: AtomicU64,
    count: AtomicU64,
}

thread_local! {
    /// The calling thread's line in [`Whole::lines`].
    static LINE: Cell<usize> = const { Cell::new(0) };
}

impl Whole {
    fn new() -> Self {
        Whole {
            state: AtomicU8::new(1),
            consumers: AtomicU64::new(0),
            lines: (0..32)
                .map(|_| Line {
                    marks: AtomicU64::new(0),
                    count: AtomicU64::new(0),
                })
                .collect(),
        }
    }
}

impl Flat {
    fn new(nbits: u64) -> Self {
        let words = nbits.div_ceil(64);
        let zeroed = |n: u64| (0..n).map(|_| AtomicU64::new(0)).collect();
        Flat(
            zeroed(words),
            zeroed(words.div_ceil(8 * 64)),
            zeroed(words.div_ceil(512 * 64)),
        )
    }
    fn mark_bits(&self, first: u64, end: u64) {
        let mut b = first;
        while b < end {
            let w = b / 64;
            let hi = end.min((w + 1) * 64);
            let mask = (!0u64 >> (64 - (hi - b))) << (b % 64);
            self.0[w as usize].fetch_or(mask, SeqCst);
            b = hi;
        }
    }
    /// The floor of a clean-bit mark for a bitmap that, like ours, answers an already-dirty
    /// bit with one load: the load, then the `fetch_or`.
    fn mark_checked(&self, bit: u64) {
        let w = &self.0[(bit / 64) as usize];
        let m = 1u64 << (bit % 64);
        if w.load(SeqCst) & m == 0 {
            w.fetch_or(m, SeqCst);
        }
    }
    /// [`mark_checked`](Self::mark_checked) plus what lets a store wait for marks in flight:
    /// a plain store to the thread's own line before the `fetch_or` and one after
    /// (src/bitmap/count.rs), and nothing else of ours (no counter, summaries or change map).
    fn mark_announced(&self, bit: u64, slot: &Slot) {
        self.announced(bit, slot, |_| {});
    }
    /// [`mark_announced`](Self::mark_announced) plus the one step that lets a search skip
    /// clean words, as src/bitmap/summary.rs does: after the `fetch_or`, the bit of the
    /// word's block (8 words) in a summary array is read, and set if clear. The read must
    /// come after the word's write (a clear that empties the block clears the summary bit
    /// and then reads the words), so it cannot overlap the locked instruction.
    fn mark_summarized(&self, bit: u64, slot: &Slot) {
        self.announced(bit, slot, |w| {
            let (sw, sm) = (&self.1[w / 8 / 64], 1u64 << (w / 8 % 64));
            if sw.load(SeqCst) & sm == 0 {
                sw.fetch_or(sm, SeqCst);
            }
        });
    }
    /// [`mark_summarized`](Self::mark_summarized), then `N` instructions that do nothing
    /// (`nop`s, in blocks of 8), before the announcement ends: a probe, not a floor. Each
    /// costs a quarter of a cycle when nothing waits, so where one of them costs more, the
    /// marks wait on memory and the loop runs as fast as the out-of-order window holds
    /// marks whose leaf lines are still on their way (docs/BENCHMARKS.md, session 18).
    fn mark_padded<const N: usize>(&self, bit: u64, slot: &Slot) {
        self.announced(bit, slot, |w| {
            let (sw, sm) = (&self.1[w / 8 / 64], 1u64 << (w / 8 % 64));
            if sw.load(SeqCst) & sm == 0 {
                sw.fetch_or(sm, SeqCst);
            }
            for _ in 0..N / 8 {
                // SAFETY: `nop` reads and writes no memory, register or flag.
                unsafe {
                    std::arch::asm!(
                        "nop; nop; nop; nop; nop; nop; nop; nop",
                        options(nomem, nostack, preserves_flags)
                    )
                };
            }
        });
    }
    /// Every step of our clean-bit mark (src/bitmap/mod.rs, `mark_word`), written as
    /// leanly as we could, outside the library's structure (not a proven lower bound): the
    /// state byte before and after the announcement, the thread's line from a thread-local
    /// index, the write with its old value, the counter, the block's summary bit (and the
    /// full-word check), the region's change bit and the consumer check, each read before
    /// it is written. Direct arrays, fixed shifts. The already-dirty check inline, the rest
    /// out of line, as ours.
    #[inline(always)]
    fn mark_whole(&self, bit: u64, whole: &Whole) {
        let w = (bit / 64) as usize;
        let m = 1u64 << (bit % 64);
        if self.0[w].load(SeqCst) & m == 0 {
            self.whole_rest(w, m, whole);
        }
    }
    #[inline(never)]
    fn whole_rest(&self, w: usize, mask: u64, whole: &Whole) {
        if whole.state.load(SeqCst) != 1 {
            return;
        }
        let Some(line) = whole.lines.get(LINE.with(Cell::get)) else {
            return;
        };
        let seq = line.marks.load(Relaxed) | 1;
        line.marks.store(seq, Release);
        compiler_fence(SeqCst);
        if whole.state.load(SeqCst) == 1 {
            let old = self.0[w].fetch_or(mask, SeqCst);
            let new = old | mask;
            if new != old {
                let gained = mask & !old;
                let n = if gained & gained.wrapping_sub(1) == 0 {
                    1
                } else {
                    u64::from(gained.count_ones())
                };
                line.count.store(line.count.load(Relaxed) + n, Relaxed);
                let b = w / 8;
                let (sw, sm) = (&self.1[b / 64], 1u64 << (b % 64));
                if sw.load(SeqCst) & sm == 0 || new == !0 {
                    sw.fetch_or(sm, SeqCst);
                }
                let r = w / 512;
                let (cw, cm) = (&self.2[r / 64], 1u64 << (r % 64));
                if cw.load(SeqCst) & cm == 0 || whole.consumers.load(SeqCst) != 0 {
                    cw.fetch_or(cm, SeqCst);
                }
            }
        }
        line.marks.store(seq + 1, Release);
    }
    /// The announced mark of `bit`: `after(word)` runs after the `fetch_or`, inside the
    /// announcement. Inlined, so each floor compiles to its own straight-line code.
    #[inline(always)]
    fn announced(&self, bit: u64, slot: &Slot, after: impl FnOnce(usize)) {
        let w = (bit / 64) as usize;
        let word = &self.0[w];
        let m = 1u64 << (bit % 64);
        if word.load(SeqCst) & m == 0 {
            let seq = slot.0.load(Relaxed) | 1;
            slot.0.store(seq, Release);
            compiler_fence(SeqCst);
            word.fetch_or(m, SeqCst);
            after(w);
            slot.0.store(seq + 1, Release);
        }
    }
    /// Every set bit in order, merged into extents. The words are read a cache line (8
    /// words) at a time and a line whose OR is zero is skipped with one branch: a word at
    /// a time, the same scan measured 2.5 ms in one build and 6.4 to 7.0 ms in another of
    /// the same source, by where the linker placed its two-branch loop.
    fn extents(&self, gran: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (c, line) in self.0.chunks(8).enumerate() {
            let mut any = 0;
            for w in line {
                any |= w.load(SeqCst);
            }
            if any == 0 {
                continue;
            }
            for (j, w) in line.iter().enumerate() {
                let mut v = w.load(SeqCst);
                while v != 0 {
                    let bit = (c * 8 + j) as u64 * 64 + u64::from(v.trailing_zeros());
                    v &= v - 1;
                    let s = bit * gran;
                    match out.last_mut() {
                        Some((o, l)) if *o + *l == s => *l += gran,
                        _ => out.push((s, gran)),
                    }
                }
            }
        }
        out
    }
    fn take(&self) -> Vec<u64> {
        self.0.iter().map(|w| w.swap(0, SeqCst)).collect()
    }
    fn reset(&self) {
        for w in self.0.iter().chain(self.1.iter()).chain(self.2.iter()) {
            w.store(0, SeqCst);
        }
    }
}

/// A thread's in-flight word, on its own cache line pair as in src/bitmap/count.rs.
#[repr(align(128))]
struct Slot(AtomicU64);

fn vmm(disk: u64, gran: u64) -> AtomicBitmap {
    AtomicBitmap::new(disk as usize, NonZeroUsize::new(gran as usize).unwrap())
}

/// Times `iters` calls of `op(k)` with k counting up, resetting between passes over `span`
/// fresh positions so that every call lands on a clean bit; resets are not timed.
fn clean_pass(iters: u64, span: u64, mut reset: impl FnMut(), mut op: impl FnMut(u64)) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        reset();
        let n = (iters - done).min(span);
        let t = Instant::now();
        for k in 0..n {
            op(k);
        }
        total += t.elapsed();
        done += n;
    }
    total
}

/// A permutation of 0..NBITS that lands each step in a different word.
fn scatter(k: u64) -> u64 {
    (k.wrapping_mul(0x9E37_79B1) ^ (k >> 13)) % NBITS
}

/// The floors of a clean-bit mark ([`Flat::mark_checked`], [`Flat::mark_announced`],
/// [`Flat::mark_summarized`], [`Flat::mark_whole`]) over the positions `pos(k)`, so that
/// each clean-bit group shows how much of the gap to the peers any design with a one-load
/// dirty-bit path, with marks a store can wait for, or with a summary a search can skip by,
/// must pay on this machine, and what every step of ours costs written without the
/// library's structure (it takes a bit number, as flat does, not a byte range). Three
/// probes ([`Flat::mark_padded`]) add instructions that do nothing to the summary floor,
/// to show what one more instruction per mark costs in each group.
fn floors(g: &mut Group<'_>, flat: &Flat, span: u64, pos: fn(u64) -> u64) {
    floor(g, "floor: load, fetch_or", flat, span, |k| {
        flat.mark_checked(black_box(pos(k)))
    });
    let slot = Slot(AtomicU64::new(0));
    floor(g, "floor: load, announce, fetch_or", flat, span, |k| {
        flat.mark_announced(black_box(pos(k)), &slot)
    });
    floor(
        g,
        "floor: load, announce, fetch_or, summary",
        flat,
        span,
        |k| flat.mark_summarized(black_box(pos(k)), &slot),
    );
    // Each probe inlined into its own loop, as the floors are (no call through a pointer).
    floor(g, "probe: summary, then 16 nops", flat, span, |k| {
        flat.mark_padded::<16>(black_box(pos(k)), &slot)
    });
    floor(g, "probe: summary, then 32 nops", flat, span, |k| {
        flat.mark_padded::<32>(black_box(pos(k)), &slot)
    });
    floor(g, "probe: summary, then 64 nops", flat, span, |k| {
        flat.mark_padded::<64>(black_box(pos(k)), &slot)
    });
    let whole = Whole::new();
    floor(g, "floor: the whole protocol, lean", flat, span, |k| {
        flat.mark_whole(black_box(pos(k)), &whole)
    });
}

type Group<'a> = criterion::BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// One floor: `op(k)` over clean passes of `span` positions, the flat array reset between
/// them. Generic, so that each floor's mark is inlined into its loop as the peers' are.
fn floor(g: &mut Group<'_>, name: &str, flat: &Flat, span: u64, mut op: impl FnMut(u64)) {
    g.bench_function(name, |b| {
        b.iter_custom(|n| clean_pass(n, span, || flat.reset(), &mut op))
    });
}

fn mark(c: &mut Criterion) {
    let bm = DirtyBitmap::new(DISK, GRAN).unwrap();
    let vm = vmm(DISK, GRAN);
    let flat = Flat::new(NBITS);

    let mut g = c.benchmark_group("mark_4k_clean_bit_sequential");
    g.bench_function("dirty-bitmap", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                NBITS,
                || bm.clear(0, DISK),
                |k| bm.mark_dirty(black_box(k * GRAN), 4096),
            )
        })
    });
    g.bench_function("vm-memory", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                NBITS,
                || vm.reset(),
                |k| vm.set_addr_range(black_box((k * GRAN) as usize), 4096),
            )
        })
    });
    g.bench_function("flat", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                NBITS,
                || flat.reset(),
                |k| flat.mark_bits(black_box(k), k + 1),
            )
        })
    });
    floors(&mut g, &flat, NBITS, |k| k);
    g.finish();

    let mut g = c.benchmark_group("mark_4k_clean_bit_scattered");
    let span = NBITS / 64;
    g.bench_function("dirty-bitmap", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                span,
                || bm.clear(0, DISK),
                |k| bm.mark_dirty(black_box(scatter(k) * GRAN), 4096),
            )
        })
    });
    g.bench_function("vm-memory", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                span,
                || vm.reset(),
                |k| vm.set_addr_range(black_box((scatter(k) * GRAN) as usize), 4096),
            )
        })
    });
    g.bench_function("flat", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                span,
                || flat.reset(),
                |k| {
                    let s = scatter(k);
                    flat.mark_bits(black_box(s), s + 1)
                },
            )
        })
    });
    floors(&mut g, &flat, span, scatter);
    g.finish();

    let mut g = c.benchmark_group("mark_4k_dirty_bit");
    bm.mark_dirty(0, DISK);
    vm.set_addr_range(0, DISK as usize);
    flat.mark_bits(0, NBITS);
    // The position counts up in a register (not through the closure's captured state), so
    // the loop adds as little as possible to the operation measured.
    g.bench_function("dirty-bitmap", |b| {
        b.iter_custom(|n| {
            let t = Instant::now();
            for k in 0..n {
                bm.mark_dirty(black_box((k & (NBITS - 1)) * GRAN), 4096);
            }
            t.elapsed()
        })
    });
    g.bench_function("vm-memory", |b| {
        b.iter_custom(|n| {
            let t = Instant::now();
            for k in 0..n {
                vm.set_addr_range(black_box(((k & (NBITS - 1)) * GRAN) as usize), 4096);
            }
            t.elapsed()
        })
    });
    g.bench_function("flat", |b| {
        b.iter_custom(|n| {
            let t = Instant::now();
            for k in 0..n {
                let bit = black_box(k & (NBITS - 1));
                flat.mark_bits(bit, bit + 1);
            }
            t.elapsed()
        })
    });
    g.finish();

    // A tracker over two bitmaps, the write already dirty in both: the tracker checks both
    // words before it would announce a fan-out, so this should cost what calling both
    // bitmaps' mark_dirty directly does.
    let mut g = c.benchmark_group("tracker_mark_4k_dirty_bit_two_bitmaps");
    let pair = [
        Arc::new(DirtyBitmap::new(DISK, GRAN).unwrap()),
        Arc::new(DirtyBitmap::new(DISK, GRAN).unwrap()),
    ];
    for b in &pair {
        b.mark_dirty(0, DISK);
    }
    let tracker = Tracker::new(pair.to_vec());
    g.bench_function("tracker", |b| {
        b.iter_custom(|n| {
            let t = Instant::now();
            for k in 0..n {
                tracker.mark(black_box((k & (NBITS - 1)) * GRAN), 4096);
            }
            t.elapsed()
        })
    });
    g.bench_function("two_mark_dirty", |b| {
        b.iter_custom(|n| {
            let t = Instant::now();
            for k in 0..n {
                let off = black_box((k & (NBITS - 1)) * GRAN);
                pair[0].mark_dirty(off, 4096);
                pair[1].mark_dirty(off, 4096);
            }
            t.elapsed()
        })
    });
    g.finish();
    drop(tracker);
    drop(pair);

    let mut g = c.benchmark_group("mark_1m_range_clean");
    let ranges = DISK >> 20;
    let per = (1 << 20) / GRAN;
    g.bench_function("dirty-bitmap", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                ranges,
                || bm.clear(0, DISK),
                |k| bm.mark_dirty(black_box(k << 20), 1 << 20),
            )
        })
    });
    g.bench_function("vm-memory", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                ranges,
                || vm.reset(),
                |k| vm.set_addr_range(black_box((k << 20) as usize), 1 << 20),
            )
        })
    });
    g.bench_function("flat", |b| {
        b.iter_custom(|n| {
            clean_pass(
                n,
                ranges,
                || flat.reset(),
                |k| flat.mark_bits(black_box(k * per), (k + 1) * per),
            )
        })
    });
    g.finish();
}

fn extents(c: &mut Criterion) {
    let mut rng = SmallRng::seed_from_u64(SEED);
    // 1,000 separate extents of 1..=8 granules at random places.
    let bm = DirtyBitmap::new(DISK, GRAN).unwrap();
    let flat = Flat::new(NBITS);
    let mut starts: Vec<u64> = (0..1000)
        .map(|_| rng.random_range(0..NBITS / 16) * 16)
        .collect();
    starts.sort_unstable();
    starts.dedup();
    for &s in &starts {
        let n = rng.random_range(1..=8);
        bm.mark_dirty(s * GRAN, n * GRAN);
        flat.mark_bits(s, s + n);
    }
    assert_eq!(bm.dirty_extents().collect::<Vec<_>>(), flat.extents(GRAN));
    let mut g = c.benchmark_group("dirty_extents_1000");
    g.bench_function("dirty-bitmap", |b| {
        b.iter(|| bm.dirty_extents().collect::<Vec<_>>())
    });
    g.bench_function("flat", |b| b.iter(|| flat.extents(GRAN)));
    g.finish();

    // Half of all bits set at random: 2^27 dirty bits in ~2^26 extents.
    let bm = DirtyBitmap::new(DISK, GRAN).unwrap();
    let flat = Flat::new(NBITS);
    let mut region = vec![0u8; bm.region_size() as usize];
    for r in 0..bm.region_count() {
        rng.fill(&mut region[..]);
        bm.load_region(r, &region).unwrap();
    }
    for (i, w) in flat.0.iter().enumerate() {
        let mut bytes = [0u8; 8];
        let off = i as u64 * 8;
        bm.serialize_region(off / bm.region_size(), &mut region)
            .unwrap();
        let at = (off % bm.region_size()) as usize;
        bytes.copy_from_slice(&region[at..at + 8]);
        w.store(u64::from_le_bytes(bytes), SeqCst);
    }
    let mut g = c.benchmark_group("dirty_extents_50pct_random");
    g.sample_size(10);
    g.bench_function("dirty-bitmap", |b| b.iter(|| bm.dirty_extents().count()));
    g.bench_function("flat", |b| b.iter(|| flat.extents(GRAN).len()));
    g.finish();
}

fn flush_regions(c: &mut Criterion) {
    let bm = DirtyBitmap::new(DISK, GRAN).unwrap();
    let flat = Flat::new(NBITS);
    let mut out = vec![0u8; bm.serialized_len() as usize];
    let rs = bm.region_size();
    let mut g = c.benchmark_group("take_changed_serialize_8192_regions");
    g.sample_size(20);
    g.bench_function("dirty-bitmap", |b| {
        b.iter_batched(
            || {
                // Flip one granule per region, so every region really changes.
                for r in 0..bm.region_count() {
                    let off = bm.region_disk_range(r).0 + (r % 7) * GRAN;
                    if bm.is_dirty(off) {
                        bm.clear(off, GRAN);
                    } else {
                        bm.mark_dirty(off, 1);
                    }
                }
            },
            |()| {
                let taken = bm.take_changed();
                assert_eq!(taken.len(), 8192, "the setup must change every region");
                for r in taken.iter() {
                    let s = (r * rs) as usize;
                    bm.serialize_region(r, &mut out[s..s + rs as usize])
                        .unwrap();
                }
                taken.len()
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("flat_copy_all_words", |b| {
        b.iter(|| {
            for (chunk, w) in out.chunks_mut(8).zip(flat.0.iter()) {
                chunk.copy_from_slice(&w.load(SeqCst).to_le_bytes());
            }
        })
    });
    g.finish();
}

fn take_dirty(c: &mut Criterion) {
    // A 1 TiB guest's dirty log at 4 KiB pages: 2^28 bits.
    let ram = 1u64 << 40;
    let page = 4096u64;
    let pages = ram / page;
    let bm = DirtyBitmap::new(ram, page).unwrap();
    let vm = vmm(ram, page);
    let flat = Flat::new(pages);
    for (label, dirty) in [("0.01pct", pages / 10_000), ("1pct", pages / 100)] {
        let mut rng = SmallRng::seed_from_u64(SEED);
        let picks: Vec<u64> = (0..dirty).map(|_| rng.random_range(0..pages)).collect();
        let mut g = c.benchmark_group(format!("take_dirty_1tib_ram_{label}"));
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(3));
        g.bench_function("dirty-bitmap", |b| {
            b.iter_batched(
                || picks.iter().for_each(|&p| bm.mark_dirty(p * page, page)),
                |()| bm.take_dirty(),
                BatchSize::PerIteration,
            )
        });
        g.bench_function("vm-memory", |b| {
            b.iter_batched(
                || picks.iter().for_each(|&p| vm.set_bit(p as usize)),
                |()| vm.get_and_reset(),
                BatchSize::PerIteration,
            )
        });
        g.bench_function("flat", |b| {
            b.iter_batched(
                || picks.iter().for_each(|&p| flat.mark_bits(p, p + 1)),
                |()| flat.take(),
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, mark, extents, flush_regions, take_dirty);
criterion_main!(benches);
