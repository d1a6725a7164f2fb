//! An asymmetric memory barrier: a free [`light`] side on the mark path and a costly
//! [`heavy`] side in the rare calls that must know which marks are in flight
//! ([`DirtyBitmap::set_enabled`](super::DirtyBitmap::set_enabled)).
//!
//! The pattern it serves is store buffering: a mark stores "in flight" into its slot and
//! then loads the `enabled` flag; `set_enabled(false)` stores the flag and then loads the
//! slots. Plain release/acquire accesses allow both loads to miss the other side's store,
//! and a `SeqCst` fence on the mark side (an `mfence` on x86-64) would nearly double the
//! cost of marking a clean bit.
//!
//! The pair `light()` + `heavy()` gives the guarantee of a `SeqCst` fence on both sides:
//! for a light barrier L in one thread and a heavy barrier H in another, either every
//! access before L is visible to the accesses after H, or every access before H is
//! visible to the accesses after L.
//!
//! - On Linux, `light()` is a compiler fence and `heavy()` is `membarrier(2)` with
//!   `MEMBARRIER_CMD_PRIVATE_EXPEDITED`: the kernel interrupts every CPU currently running
//!   a thread of this process, which executes a full barrier there, and a thread not
//!   running passed through one when it was switched out. The compiler fence keeps the
//!   compiler from moving the mark's accesses across that point. This is the pairing
//!   `membarrier(2)` documents, and the one Linux's own RCU and folly's
//!   `asymmetricHeavyBarrier` use.
//! - Where `membarrier` is missing or refused (old kernels, seccomp), and on other
//!   systems, both sides are `fence(SeqCst)`.
//! - Under `--cfg loom`, both sides are `fence(SeqCst)`, which loom models.
//! - Under Miri, which has no `membarrier`, both sides are `fence(SeqCst)` too.

#[cfg(not(all(not(loom), not(miri), any(target_os = "linux", target_os = "android"))))]
mod imp {
    #[cfg(loom)]
    use loom::sync::atomic::fence;
    #[cfg(not(loom))]
    use std::sync::atomic::fence;
    use std::sync::atomic::Ordering::SeqCst;

    #[inline(always)]
    pub fn init() {}

    #[inline(always)]
    pub fn light() {
        fence(SeqCst);
    }

    #[inline(always)]
    pub fn free_light_is_valid() -> bool {
        true
    }

    #[inline(always)]
    pub fn light_free() {
        fence(SeqCst);
    }

    pub fn heavy() {
        fence(SeqCst);
    }
}

#[cfg(all(not(loom), not(miri), any(target_os = "linux", target_os = "android")))]
mod imp {
    use std::sync::atomic::Ordering::{Relaxed, SeqCst};
    use std::sync::atomic::{compiler_fence, fence, AtomicBool};
    use std::sync::Once;

    const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

    /// Set once this process is registered for expedited private membarriers; never
    /// cleared. A light barrier that reads it stale (false) issues a real fence, which is
    /// always enough; one that reads true pairs with a heavy barrier that is a membarrier,
    /// because `heavy` only runs after `INIT` completed.
    static EXPEDITED: AtomicBool = AtomicBool::new(false);
    static INIT: Once = Once::new();

    #[allow(unsafe_code)]
    fn membarrier(cmd: libc::c_int) -> libc::c_long {
        // SAFETY: membarrier(2) takes a command and flags (and, since Linux 5.10, a CPU id
        // that is ignored without MEMBARRIER_CMD_FLAG_CPU); it reads and writes no user
        // memory, so any argument values are memory-safe.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_uint,
                0 as libc::c_int,
            )
        }
    }

    /// Registers for expedited membarriers if the kernel offers them. Cheap after the
    /// first call; bitmaps call it when they are built so that marks take the free path.
    pub fn init() {
        INIT.call_once(|| {
            let supported = membarrier(MEMBARRIER_CMD_QUERY);
            if supported >= 0
                && supported & libc::c_long::from(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0
                && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) == 0
            {
                EXPEDITED.store(true, Relaxed);
            }
        });
    }

    #[inline(always)]
    pub fn light() {
        if EXPEDITED.load(Relaxed) {
            compiler_fence(SeqCst);
        } else {
            fence(SeqCst);
        }
    }

    pub fn free_light_is_valid() -> bool {
        EXPEDITED.load(Relaxed)
    }

    #[inline(always)]
    pub fn light_free() {
        compiler_fence(SeqCst);
    }

    pub fn heavy() {
        init();
        if EXPEDITED.load(Relaxed) {
            // After a successful registration the command cannot fail: EINVAL, ENOSYS
            // and EPERM are all excluded by the query and the registration.
            let ret = membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED);
            assert_eq!(
                ret,
                0,
                "membarrier(PRIVATE_EXPEDITED) failed after registration: {}",
                std::io::Error::last_os_error()
            );
        } else {
            fence(SeqCst);
        }
    }
}

/// Registers for the cheap light barrier, if the system offers it.
#[inline]
pub(crate) fn init() {
    imp::init();
}

/// The mark side: free where the heavy side is a membarrier.
#[inline(always)]
pub(crate) fn light() {
    imp::light();
}

/// Whether [`light_free`] is a light barrier in this process: true once it is registered
/// for expedited membarriers, and wherever both sides are fences anyway. Read after
/// [`init`]; once true it stays true, so every later [`heavy`] pairs with [`light_free`].
pub(crate) fn free_light_is_valid() -> bool {
    imp::free_light_is_valid()
}

/// The mark side without [`light`]'s check of the registration, for a caller that read
/// [`free_light_is_valid`] true after [`init`]: a compiler fence on Linux, `fence(SeqCst)`
/// where both sides are fences.
#[inline(always)]
pub(crate) fn light_free() {
    imp::light_free();
}

/// The waiting side: orders this thread's earlier accesses against every other thread's
/// light barrier, as a `SeqCst` fence on both sides would.
pub(crate) fn heavy() {
    imp::heavy();
}
