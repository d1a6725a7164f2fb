//! Memory: a 16 TiB bitmap at 64 KiB granularity (2^28 bits, 32 MiB of leaf words) must
//! cost at most 32 MiB + 1 %. Measured with a counting allocator, not taken on trust.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use dirty_bitmap::DirtyBitmap;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counter is only bookkeeping.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::SeqCst);
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::SeqCst);
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::SeqCst);
        // SAFETY: `ptr` came from this allocator with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn sixteen_tib_bitmap_costs_at_most_32_mib_plus_one_percent() {
    let before = LIVE.load(Ordering::SeqCst);
    let bm = DirtyBitmap::new(16 << 40, 64 << 10).unwrap();
    let measured = LIVE.load(Ordering::SeqCst) - before;
    let leaf = 32usize << 20;
    let limit = leaf + leaf / 100;
    eprintln!(
        "16 TiB at 64 KiB: {measured} bytes allocated ({:.3} % over the 32 MiB of leaf words), memory_usage() = {}",
        (measured - leaf) as f64 * 100.0 / leaf as f64,
        bm.memory_usage()
    );
    assert!(measured <= limit, "{measured} > {limit}");
    // memory_usage() is exactly the heap measured plus the struct itself.
    assert_eq!(
        bm.memory_usage(),
        measured + std::mem::size_of::<DirtyBitmap>()
    );
    assert!(bm.memory_usage() <= limit);
    // Marking does not allocate.
    let before_marks = LIVE.load(Ordering::SeqCst);
    for i in 0..10_000u64 {
        bm.mark_dirty(i * 1_700_000_017 % (16 << 40), 4096);
    }
    assert_eq!(LIVE.load(Ordering::SeqCst), before_marks);
}
