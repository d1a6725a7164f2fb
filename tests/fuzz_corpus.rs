//! Replays every committed fuzz input through its `dirty_bitmap::fuzzing` entry point:
//! the seed corpus (`fuzz/corpus/<target>/`) and the minimised crashes
//! (`fuzz/regressions/<target>/`). See `docs/FUZZING.md`.

use std::fs;
use std::path::Path;

use dirty_bitmap::fuzzing;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("header", fuzzing::header),
    ("directory", fuzzing::directory),
    ("bitmap_table", fuzzing::bitmap_table),
    ("refcount_block", fuzzing::refcount_block),
    ("open_image", fuzzing::open_image),
    ("migration_stream", fuzzing::migration_stream),
    ("repair", fuzzing::repair),
];

/// Runs every regular file of `dir` (if it exists) through `f`; returns how many.
fn replay(dir: &Path, f: Target) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut paths: Vec<_> = entries
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    for p in &paths {
        let data = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        eprintln!("replaying {}", p.display());
        f(&data);
    }
    paths.len()
}

#[test]
fn replay_corpus_and_regressions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut total = 0;
    for (name, f) in TARGETS {
        let seeds = replay(&root.join("corpus").join(name), f);
        let dir = root.join("regressions").join(name);
        let regressions = replay(&dir, f);
        assert!(seeds > 0, "fuzz/corpus/{name}/ is empty");
        assert!(
            regressions > 0 || !dir.exists(),
            "fuzz/regressions/{name}/ exists and is empty"
        );
        println!("{name}: replayed {seeds} corpus files and {regressions} regressions");
        total += seeds + regressions;
    }
    println!("replayed {total} files in all");
}

/// `fuzzing::open_image` returns quietly once the store refuses an image (after checking
/// only that the error is not I/O), so a library that refused every image would replay
/// green. The seeds are images QEMU's tools or this crate wrote: every one must open, and
/// together they must list bitmaps, so that the replay loads and checks something.
#[test]
fn the_open_image_seeds_open_and_list_bitmaps() {
    use dirty_bitmap::storage::MemStorage;
    use dirty_bitmap::{BitmapStore, OpenMode};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/open_image");
    let (mut seeds, mut listed) = (0, 0);
    for e in fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if !p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"))
        {
            continue;
        }
        let s = BitmapStore::open(
            MemStorage::from_bytes(fs::read(&p).unwrap()),
            OpenMode::ReadOnly,
        )
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        seeds += 1;
        listed += s.list().len();
    }
    println!("{seeds} seeds open, {listed} bitmaps listed");
    assert!(
        seeds >= 10 && listed >= seeds,
        "{seeds} seeds, {listed} bitmaps"
    );
}
