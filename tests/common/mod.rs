//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod pki;
pub mod qemu;

use dirty_bitmap::storage::CrashMode;

/// The crash images a sweep builds at each point: the unsynced writes dropped, kept, and
/// torn at 512-byte sectors two ways.
pub const CRASH_MODES: [CrashMode; 4] = [
    CrashMode::Dropped,
    CrashMode::Kept,
    CrashMode::Torn { seed: 1 },
    CrashMode::Torn { seed: 2 },
];

use rand::rngs::SmallRng;
use rand::SeedableRng;

/// Tests that time what two CPUs can do take [`exclusive`] and run alone; the others of
/// their file take [`shared`] and run beside each other.
static EXCLUSIVE: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Runs beside the other [`shared`] tests of the file, never beside an [`exclusive`] one.
pub fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    EXCLUSIVE.read().unwrap_or_else(|e| e.into_inner())
}

/// Runs alone among the file's tests that take [`shared`] or [`exclusive`].
pub fn exclusive() -> std::sync::RwLockWriteGuard<'static, ()> {
    EXCLUSIVE.write().unwrap_or_else(|e| e.into_inner())
}

/// A randomised test's seed: `DBM_TEST_SEED` when set, otherwise random. It is printed
/// either way (cargo test shows it for a failing test), so a failure reproduces with
/// `DBM_TEST_SEED=<seed> cargo test <name>`.
pub fn test_seed(test: &str) -> u64 {
    let seed = env_seed();
    print_seed(test, seed);
    seed
}

/// `DBM_TEST_SEED` when set, otherwise random. A set value that is not a seed panics
/// ([`seed_from`]).
fn env_seed() -> u64 {
    let value = match std::env::var("DBM_TEST_SEED") {
        Ok(s) => Some(s),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => {
            panic!("DBM_TEST_SEED={v:?} is not a seed (a decimal u64)")
        }
    };
    seed_from(value.as_deref()).unwrap_or_else(rand::random::<u64>)
}

fn print_seed(test: &str, seed: u64) {
    eprintln!("{test}: seed {seed} (rerun with DBM_TEST_SEED={seed})");
}

/// A seeded RNG, from [`test_seed`].
pub fn seeded_rng(test: &str) -> (SmallRng, u64) {
    let seed = test_seed(test);
    (SmallRng::seed_from_u64(seed), seed)
}

/// `config` with its RNG seeded from `DBM_TEST_SEED` as [`test_seed`] takes it, printed the
/// same way under the running test's name, so a proptest's cases replay from the printed seed.
/// Every `proptest!` block of the tests takes its config from here:
/// `#![proptest_config(common::seeded_proptest(ProptestConfig::with_cases(n)))]`. proptest's
/// own `PROPTEST_*` variables still apply (the macro reads them again); a `PROPTEST_RNG_SEED`
/// overrides ours, and the seed printed is the one the runner uses.
pub fn seeded_proptest(config: proptest::test_runner::Config) -> proptest::test_runner::Config {
    use proptest::test_runner::{contextualize_config, RngSeed};
    let name = std::thread::current()
        .name()
        .unwrap_or("proptest")
        .to_owned();
    let config = contextualize_config(proptest::test_runner::Config {
        rng_seed: RngSeed::Fixed(env_seed()),
        ..config
    });
    match config.rng_seed {
        RngSeed::Fixed(used) => print_seed(&name, used),
        RngSeed::Random => unreachable!("contextualize_config keeps a fixed seed or sets one"),
    }
    config
}

/// A number a test takes from the environment variable `var` (a longer sweep, say), or
/// `default` when it is unset. A set value that does not parse panics, naming the variable
/// and the value: a run asked for that silently ran the default would pass as that run.
pub fn env_number<T>(var: &str, default: T) -> T
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match std::env::var(var) {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("{var}={s:?} is not a number: {e}")),
        Err(std::env::VarError::NotPresent) => default,
        Err(e) => panic!("{var} is not a number: {e}"),
    }
}

/// The seed a `DBM_TEST_SEED` value names: `None` when unset. A value that is not a decimal
/// `u64` panics, naming the variable and the value: a replay that silently ran a random seed
/// would pass as a replay of the failure it never ran.
pub fn seed_from(value: Option<&str>) -> Option<u64> {
    value.map(|s| {
        s.parse()
            .unwrap_or_else(|e| panic!("DBM_TEST_SEED={s:?} is not a seed (a decimal u64): {e}"))
    })
}

/// The first of `ranges` (`(offset, length)` in disk bytes, clipped to the disk) that
/// `bm` does not hold dirty in every granule, or `None` when it holds them all. Checked
/// against `bm`'s merged dirty extents: a range is held exactly when one extent contains
/// it, so a clean granule anywhere inside, not only at its ends, makes it missing.
pub fn first_not_dirty(
    bm: &dirty_bitmap::DirtyBitmap,
    ranges: impl IntoIterator<Item = (u64, u64)>,
) -> Option<(u64, u64)> {
    let size = bm.disk_size();
    let extents: Vec<(u64, u64)> = bm.dirty_extents().collect();
    ranges.into_iter().find(|&(off, len)| {
        if off >= size || len == 0 {
            return false;
        }
        let end = off.saturating_add(len).min(size);
        // The last extent starting at or before `off`; extents are sorted and merged.
        let i = extents.partition_point(|&(s, _)| s <= off);
        i == 0 || {
            let (s, l) = extents[i - 1];
            end > s + l
        }
    })
}

/// Serializes a whole bitmap, region by region.
pub fn serialize_all(bm: &dirty_bitmap::DirtyBitmap) -> Vec<u8> {
    let mut out = vec![0u8; bm.serialized_len() as usize];
    let rs = bm.region_size() as usize;
    for r in 0..bm.region_count() {
        let start = r as usize * rs;
        let len = bm.region_len(r) as usize;
        bm.serialize_region(r, &mut out[start..start + len])
            .unwrap();
    }
    out
}

/// Takes the changed regions of `bm` and serializes each into its place in `shadow` (a
/// buffer of `serialized_len` bytes), as a flusher would write them to disk.
pub fn flush_changed(bm: &dirty_bitmap::DirtyBitmap, shadow: &mut [u8]) {
    let rs = bm.region_size() as usize;
    for r in bm.take_changed().iter() {
        let start = r as usize * rs;
        let len = bm.region_len(r) as usize;
        bm.serialize_region(r, &mut shadow[start..start + len])
            .unwrap();
    }
}

/// Merged extents of set bits in a serialized bitmap, in bytes of a disk of `disk_size`.
pub fn extents_of_bytes(bytes: &[u8], granularity: u64, disk_size: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, &byte) in bytes.iter().enumerate() {
        if byte == 0 {
            continue;
        }
        for k in 0..8 {
            if byte & (1 << k) == 0 {
                continue;
            }
            let bit = i as u64 * 8 + k;
            let s = bit * granularity;
            if s >= disk_size {
                continue;
            }
            let e = (s + granularity).min(disk_size);
            match out.last_mut() {
                Some((os, ol)) if *os + *ol == s => *ol = e - *os,
                _ => out.push((s, e - s)),
            }
        }
    }
    out
}

/// A loop device over a file, detached when dropped (`losetup`, run as root): two of them
/// over one file have page caches of their own, as two hosts on one LUN do.
pub struct Loop(pub std::path::PathBuf);

impl Loop {
    pub fn attach(file: &std::path::Path) -> Loop {
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup (util-linux) runs");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(std::path::PathBuf::from(
            String::from_utf8(out.stdout).unwrap().trim(),
        ))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}
