//! `dbm bench`: measurements that print a table (and draw a plot) in one run, for
//! `docs/BENCHMARKS.md`. One subcommand per benchmark.

#[path = "bench_backup.rs"]
mod backup;
#[path = "bench_ceiling.rs"]
mod ceiling;
#[path = "bench_durable.rs"]
mod durable;
#[path = "bench_flush.rs"]
mod flush;
#[path = "bench_load.rs"]
mod load;
#[path = "bench_migrate.rs"]
mod migrate;
#[path = "bench_migrate_disk.rs"]
mod migrate_disk;
#[path = "plot.rs"]
pub mod plot;

use clap::Subcommand;

use crate::CmdResult;

/// Options of `dbm bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Bench,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Bench {
    /// Stop-time cost of the incremental flush on a 16 TiB bitmap-only image, side by side
    /// with QEMU's whole rewrite, the physical floor and QEMU's own store.
    Flush(flush::FlushArgs),
    /// Live migration with real vCPU threads and the real clock, swept over guest dirty
    /// rate × bandwidth: converged or not, syncs, total time, downtime against the limit,
    /// bytes and pages sent, pages resent. (The disk bitmaps' part of the downtime:
    /// `migrate-disk`.)
    Migrate(migrate::MigrateArgs),
    /// The disk part of a live migration's downtime, ours against QEMU's approach, on the
    /// demo's workload with 1 and 4 bitmaps of 16 TiB: disk ms, bytes and barriers in the
    /// downtime, the downtime against the limit, the ratio and the 1/20 target.
    MigrateDisk(migrate_disk::MigrateDiskArgs),
    /// What the durable mode's intents cost: latency and throughput of intents on clean
    /// granules, and the cost of one on a granule already durable, against no tracking,
    /// the deferred mode and one barrier per intent, at 1, 4 and 16 threads.
    Durable(durable::DurableArgs),
    /// What a backup tool pays: attaching a raw disk (ours against `qemu-img create …
    /// preallocation=metadata`) and listing what changed (`dbm dump --since` against
    /// `qemu-nbd -B` + `nbdinfo --map`), side by side.
    Backup(backup::BackupArgs),
    /// Opening an image and loading a fully dirty 16 TiB bitmap: `dbm info` against
    /// `qemu-img info` on the same image, whole processes, in one run.
    Load(load::LoadArgs),
}

/// Runs the chosen benchmark.
pub fn run(args: &BenchArgs) -> CmdResult {
    match &args.which {
        Bench::Flush(a) => flush::run(a),
        Bench::Migrate(a) => migrate::run(a),
        Bench::MigrateDisk(a) => migrate_disk::run(a),
        Bench::Durable(a) => durable::run(a),
        Bench::Backup(a) => backup::run(a),
        Bench::Load(a) => load::run(a),
    }
}
