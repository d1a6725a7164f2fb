//! `dbm`: the dirty-bitmap command line.
//!
//! Errors go to stderr as `dbm: ...` with exit status 1 (usage errors too); `check` also
//! exits 2 (corrupt) or 3 (leaks only), `simulate` exits 2 on a downtime-limit violation,
//! a content mismatch or a scenario that ended in an error, and `migrate` exits 2 on a missing mark and 3 when the guest did
//! not move. Nothing here panics on bad input.

mod bench;
mod bitmap_cmd;
mod check;
mod checkpoint;
mod create;
mod demo;
mod drill;
mod dump;
mod info;
mod mark;
mod migrate_cmd;
mod migrate_run;
mod open;
mod out;
mod signals;
mod simulate;
mod size;
mod work_dir;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "dbm",
    version,
    about = "Persistent dirty bitmaps for block devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a guest-like write workload on a temporary 16 TiB bitmap-only qcow2 image:
    /// background flushes, prepare_stop, inactivate, a reopen and a check; print what the
    /// stop cost against a full store. Then live-migrate a 1 GiB guest whose vCPUs keep
    /// writing: one line per iteration, the downtime, and the destination RAM checked
    /// against the source's.
    Demo(DemoArgs),
    /// Create a qcow2 image that holds no guest data, only room for persistent bitmaps.
    Create(create::CreateArgs),
    /// Show an image's geometry and its bitmaps.
    Info(info::InfoArgs),
    /// Add, remove, clear, enable, disable or merge a bitmap (`qemu-img bitmap`'s verbs).
    Bitmap(bitmap_cmd::BitmapArgs),
    /// Print a bitmap as `offset length type dirty|clean` rows over the whole disk, as
    /// `nbdinfo --map=qemu:dirty-bitmap:NAME` prints them (or, with `--since CHECKPOINT`,
    /// what changed since a checkpoint).
    Dump(dump::DumpArgs),
    /// Start a checkpoint: in one commit, disable the recording bitmap and add a new one;
    /// or export what changed since a checkpoint into a bitmap `qemu-nbd -B` serves.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Mark a byte range dirty in a bitmap and store it.
    Mark(mark::MarkArgs),
    /// Check refcounts and the bitmap directory and tables; exit 0 clean, 2 corrupt,
    /// 3 leaks only (as `qemu-img check`).
    Check(check::CheckArgs),
    /// Activate an image and mark random 4 KiB writes at a steady rate with background
    /// flushes, then prepare_stop and inactivate; print the flush statistics.
    Workload(workload::WorkloadArgs),
    /// Run a benchmark and print its table (`dbm bench flush`, `migrate`, `migrate-disk`,
    /// `durable`, `backup`, `load`).
    Bench(bench::BenchArgs),
    /// Run the migration loop over random virtual-clock scenarios; exit 2 if any
    /// switchover exceeded its downtime limit, any destination RAM differed, or any
    /// scenario's migration ended in an error.
    Simulate(simulate::SimulateArgs),
    /// Live-migrate a guest between two processes over TCP, on one image both open:
    /// `dbm migrate listen IMAGE` on the destination, `dbm migrate send IMAGE --to ADDR` on
    /// the source. Exit 0 migrated, 2 marks missing, 3 not migrated (the guest did not
    /// start at the destination, or runs on at the source with every mark).
    Migrate(migrate_cmd::MigrateArgs),
    /// Failure drills (`dbm drill migrate`): the migration failure matrix over TCP with the
    /// disk bitmaps written throughout; exit 2 on any lost mark, corruption, unexpected
    /// outcome, failed retry or failed step.
    Drill(DrillArgs),
}

/// `dbm drill`'s drills.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    #[command(subcommand)]
    which: Drill,
}

#[derive(Debug, Subcommand)]
enum Drill {
    /// The failure matrix of a migration whose RAM and disk bitmap are written throughout,
    /// in shared-storage and stream modes: one line per case (mode, failure, outcome,
    /// marks made, marks lost, where the bitmap is, qemu-img check, retry).
    Migrate(drill::DrillArgs),
}

/// Options of `dbm demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for the images, kept afterwards (default: a temporary directory, removed
    /// after). `demo.qcow2`, `demo-full-store.qcow2` and (without `--no-migration`)
    /// `demo-migrate.qcow2` in it are replaced; nothing else in it is touched.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Virtual disk size (suffixes K, M, G, T).
    #[arg(long, default_value = "16T", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub disk_size: u64,
    /// Bytes of disk per bit (suffixes K, M, G).
    #[arg(long, default_value = "64K", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub granularity: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Rounds of one second; each round moves the guest's hot spot.
    #[arg(long, default_value_t = 10)]
    pub rounds: u32,
    /// 4 KiB writes per round, over all threads.
    #[arg(long, default_value_t = 2_000_000)]
    pub writes_per_round: u64,
    /// Share of writes, in percent, that land anywhere on the disk; the rest go to a 64 GiB
    /// hot spot that moves every round.
    #[arg(long, default_value_t = 0.1)]
    pub uniform_percent: f64,
    /// Milliseconds between background flushes.
    #[arg(long, default_value_t = 100)]
    pub flush_interval: u64,
    /// Random seed (default: random; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Skip the migration part.
    #[arg(long)]
    pub no_migration: bool,
    /// Migration part: guest RAM (suffixes K, M, G; a multiple of 4 KiB).
    #[arg(long, default_value = "1G", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub guest_ram: u64,
    /// Migration part: vCPU threads writing guest pages (1 to 4096).
    #[arg(long, default_value_t = 2, value_parser = crate::size::vcpus)]
    pub vcpus: usize,
    /// Migration part: bytes per second the vCPUs write, in whole 4 KiB pages (suffixes
    /// K, M, G); 90 % of the writes go into 5 % of the pages.
    #[arg(long, default_value = "32M", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub dirty_rate: u64,
    /// Migration part: the rate limit (QEMU `max-bandwidth`), bytes per second (suffixes
    /// K, M, G).
    #[arg(long, default_value = "128M", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub max_bandwidth: u64,
    /// Migration part: the downtime limit in ms (QEMU `downtime-limit`).
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
}

/// What a command returns: its exit status, or an error printed as `dbm: ...` with exit 1.
pub type CmdResult = Result<ExitCode, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version go to stdout with status 0; usage errors exit 1 (as
            // qemu-img's do), so that 2 and 3 keep their `check` meanings.
            if !e.use_stderr() {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // Usage errors read as every other error does: `dbm: ...`.
            let text = e.render().to_string();
            crate::out::to_stderr(&format!(
                "dbm: {}",
                text.strip_prefix("error: ").unwrap_or(&text)
            ));
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Create(args) => create::run(&args),
        Command::Info(args) => info::run(&args),
        Command::Bitmap(args) => bitmap_cmd::run(&args),
        Command::Dump(args) => dump::run(&args),
        Command::Checkpoint(args) => checkpoint::run(&args),
        Command::Mark(args) => mark::run(&args),
        Command::Check(args) => check::run(&args),
        Command::Workload(args) => workload::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Simulate(args) => simulate::run(&args),
        Command::Drill(args) => match &args.which {
            Drill::Migrate(a) => drill::run(a),
        },
        Command::Migrate(args) => migrate_cmd::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            crate::out::errln!("dbm: {e}");
            ExitCode::FAILURE
        }
    }
}
