//! Persistent dirty bitmaps for block devices.
//!
//! A dirty bitmap records which granules of a disk were written since a checkpoint, so that
//! incremental backup, storage migration and replication copy only those. This crate keeps
//! them in memory as a layered, lock-free [`DirtyBitmap`], and on disk in qcow2's
//! persistent-bitmap extension, byte-compatible with QEMU ([`format`](mod@format)).
//!
//! ```
//! use dirty_bitmap::DirtyBitmap;
//!
//! let bitmap = DirtyBitmap::new(16 << 40, 64 << 10)?; // 16 TiB at 64 KiB granularity
//! bitmap.mark_dirty(1 << 30, 4096);                    // from any I/O thread
//! assert_eq!(bitmap.next_dirty(0), Some(1 << 30));
//! assert_eq!(bitmap.dirty_bytes(), 64 << 10);
//!
//! // A flusher writes only the regions of the serialized bitmap that changed.
//! let changed = bitmap.take_changed();
//! assert_eq!(changed.iter().collect::<Vec<_>>(), vec![0]);
//! let mut region = vec![0u8; bitmap.region_len(0) as usize];
//! bitmap.serialize_region(0, &mut region)?;
//! assert_eq!(region[(1 << 30) / (64 << 10) / 8], 0x01);
//! # Ok::<(), dirty_bitmap::Error>(())
//! ```
//!
//! Opening a store needs only the crate root: a storage ([`FileStorage`] for a file,
//! [`MemStorage`] in memory), an [`OpenMode`], and for a new bitmap its [`Recording`] mode.
//!
//! ```
//! use dirty_bitmap::{BitmapStore, MemStorage, OpenMode, Recording};
//!
//! let mut store = BitmapStore::create(MemStorage::new(), 1 << 30, 64 << 10)?;
//! store.add("backup-1", 64 << 10, Recording::Enabled)?;
//! let bytes = store.close()?.into_storage().into_vec();
//!
//! let store = BitmapStore::open(MemStorage::from_bytes(bytes), OpenMode::ReadOnly)?;
//! assert_eq!(store.list()[0].granularity, 64 << 10);
//! # Ok::<(), dirty_bitmap::Error>(())
//! ```
//!
//! # Layers
//! Bottom first; a module uses only the floors below it (`docs/DESIGN.md`, "Module map",
//! kept by `tests/layers.rs`).
//! - [`format`](mod@format): pure codecs for qcow2 structures, with their own errors. No
//!   I/O, and no panic on any input. [`units`]: bytes, milliseconds, bandwidths and the one
//!   budget rule. [`rng`]: the seeded generator.
//! - [`error`]: the crate's [`Error`].
//! - [`bitmap`]: the in-memory bitmap: leaf words, summary levels for fast search, and the
//!   change map that tells a flusher what to write. [`storage`]: positional I/O, files with
//!   QEMU's locks, memory.
//! - [`image`]: the qcow2 container: header, refcounts, allocation, `qemu-img check`'s walk.
//! - [`flush`]: the incremental flush engine, the pending queries and the stop loop.
//! - [`tracker`]: the lock-free write path over all bitmaps of a disk.
//! - [`store`]: [`BitmapStore`], the bitmaps of one image: open, activate, inactivate,
//!   edit; [`SharedStore`] and the background [`FlushPolicy`] that drives it.
//! - [`migration`]: the page-level live-migration loop.
//!
//! Features: `cli` (default) builds `dbm`; `tls` (default) adds TLS with certificates to the
//! migration's TCP transport (`migration::tls`); `testing` adds the fault- and crash-injecting
//! storages, the migration simulation and harnesses, and the fuzz entry points.
//!
//! # Durability
//! A [`DirtyBitmap`] lives in memory. Marks are durable only once a flusher has taken the
//! changed regions with [`DirtyBitmap::take_changed`], serialized them, written them and
//! synced the storage. A mark racing with that take is either in the bytes taken or left in
//! the change map for the next take (see `docs/DESIGN.md`). A flusher whose write fails
//! must hand the regions back with [`DirtyBitmap::requeue_changed`]. Any doubt resolves to
//! *dirty*: [`DirtyBitmap::clear`] clears only granules entirely inside its range.
// The crate's lints, in one place. Every item is documented and no module uses `unsafe`
// except the items that say so, each with a `// SAFETY:` comment; modules that decode bytes
// from a file or a socket are declared with `parser_module!`, which adds the parser lints.
#![deny(missing_docs, unsafe_code)]

/// Declares a module that decodes untrusted bytes (an image file, a migration stream) under
/// the parser lints: no indexing or slicing that can panic, no `unwrap`, `expect` or
/// `panic!`, and no unchecked arithmetic, so that no input can make it panic. Its unit tests
/// are exempt; every decoder also has a test feeding it arbitrary bytes.
macro_rules! parser_module {
    ($(#[$attr:meta])* $vis:vis mod $name:ident;) => {
        $(#[$attr])*
        #[cfg_attr(
            not(test),
            deny(
                clippy::indexing_slicing,
                clippy::unwrap_used,
                clippy::expect_used,
                clippy::panic,
                clippy::arithmetic_side_effects
            )
        )]
        $vis mod $name;
    };
}

pub mod bitmap;
pub mod error;
pub mod flush;
parser_module! { pub mod format; }
#[cfg(feature = "testing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod image;
pub mod migration;
pub mod rng;
parser_module! { pub mod storage; }
pub mod store;
pub mod tracker;

/// Internals that `tests/loom.rs` races under `--cfg loom`; not part of the API.
#[cfg(loom)]
#[doc(hidden)]
pub mod loom_internals {
    pub use crate::store::InFlight;
    use crate::DirtyBitmap;

    /// What a durable store's `commit_in_flight` does with each registered write: sets
    /// its granules, on a disabled bitmap too, as a mark a store can wait for.
    pub fn or_range(bitmap: &DirtyBitmap, offset: u64, len: u64) {
        bitmap.or_range(offset, len);
    }

    /// The calling model thread announces its marks on the shared in-flight slot, as a
    /// thread beyond the owned slots does (a VMM with more than 32 I/O threads).
    pub fn on_the_shared_slot() {
        crate::bitmap::use_shared_slot();
    }

    /// A store's take of the primary change map (its flusher's): every region if a
    /// caller's public take or load may have hidden one.
    pub fn take_primary(bitmap: &DirtyBitmap) -> crate::ChangedRegions {
        bitmap.take_primary()
    }
}
pub mod units;

pub use bitmap::{ChangeConsumer, ChangedRegions, ConsumerStart, DirtyBitmap, DirtyExtents};
pub use error::{CheckFindings, Corruption, Error, RepairCommitted, Result, StateProblem};
pub use flush::{FlushStats, StopReport};
pub use format::BitmapName;
pub use image::{CheckReport, Image};
pub use storage::{FileStorage, MemStorage, OpenMode};
pub use store::background::{FlushPolicy, FlushThread, PolicyStats};
pub use store::durable::{DurableTracker, Intent, WriteInFlight};
pub use store::mode::StoreMode;
pub use store::write_log::{LoggedBitmap, WriteLog};
pub use store::{
    BitmapInfo, BitmapState, BitmapStore, Preloaded, Recording, SharedStore, StoreGuard,
    PRELOAD_WALK_BUDGET,
};
pub use tracker::Tracker;

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

/// The unit tests' seeds, taken as `tests/common/mod.rs` takes them: `DBM_TEST_SEED` when set,
/// otherwise random, and printed either way (cargo test shows it for a failing test), so a
/// failure reproduces with `DBM_TEST_SEED=<seed> cargo test --lib <name>`. Declared here in
/// the facade so every module, the bottom layer's too, may use it.
#[cfg(test)]
pub(crate) mod test_seed {
    use proptest::test_runner::{contextualize_config, Config, RngSeed};

    /// A randomised test's seed, printed under `test`'s name.
    pub(crate) fn seed(test: &str) -> u64 {
        let seed = env_seed();
        print_seed(test, seed);
        seed
    }

    /// `DBM_TEST_SEED` when set, otherwise fresh. A set value that is not a seed panics, as
    /// tests/common's does: a replay that silently ran another seed would pass as a replay.
    fn env_seed() -> u64 {
        match std::env::var("DBM_TEST_SEED") {
            Ok(s) => s.parse().unwrap_or_else(|e| {
                panic!("DBM_TEST_SEED={s:?} is not a seed (a decimal u64): {e}")
            }),
            Err(std::env::VarError::NotPresent) => crate::rng::unique_u64(),
            Err(e) => panic!("DBM_TEST_SEED is not a seed: {e}"),
        }
    }

    fn print_seed(test: &str, seed: u64) {
        eprintln!("{test}: seed {seed} (rerun with DBM_TEST_SEED={seed})");
    }

    /// `config` with its RNG seeded as [`seed`] takes it, printed under the running test's
    /// name, so a proptest's cases replay from the printed seed. Every `proptest!` block of
    /// the crate takes its config from here. proptest's own `PROPTEST_*` variables still
    /// apply (the macro reads them again); a `PROPTEST_RNG_SEED` overrides ours, and the seed
    /// printed is the one the runner uses.
    pub(crate) fn proptest_config(config: Config) -> Config {
        let name = std::thread::current()
            .name()
            .unwrap_or("proptest")
            .to_owned();
        let config = contextualize_config(Config {
            rng_seed: RngSeed::Fixed(env_seed()),
            ..config
        });
        match config.rng_seed {
            RngSeed::Fixed(used) => print_seed(&name, used),
            RngSeed::Random => unreachable!("contextualize_config keeps a fixed seed or sets one"),
        }
        config
    }
}
