//! `dbm`: the dirty-bitmap command line.
//!
//! Errors go to stderr with a non-zero exit status; nothing here panics on bad input.

mod demo;
mod size;

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
    /// Run a guest-like write workload on a large in-memory bitmap, flushing changed
    /// regions to a file while the writers run, and print a summary.
    Demo(DemoArgs),
}

/// Options of `dbm demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory for the flushed bitmap file (default: a temporary directory, removed after).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Virtual disk size (suffixes K, M, G, T).
    #[arg(long, default_value = "16T", value_parser = size::parse_size)]
    pub disk_size: u64,
    /// Bytes of disk per bit (suffixes K, M, G).
    #[arg(long, default_value = "64K", value_parser = size::parse_size)]
    pub granularity: u64,
    /// Writer threads.
    #[arg(long, default_value_t = 4)]
    pub threads: usize,
    /// Flush rounds; each round moves the guest's hot spot.
    #[arg(long, default_value_t = 4)]
    pub rounds: u32,
    /// 4 KiB writes per round, over all threads.
    #[arg(long, default_value_t = 2_000_000)]
    pub writes_per_round: u64,
    /// Share of writes, in percent, that land anywhere on the disk; the rest go to a 64 GiB
    /// hot spot that moves every round.
    #[arg(long, default_value_t = 0.1)]
    pub uniform_percent: f64,
    /// Random seed (default: random; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dbm: {e}");
            ExitCode::FAILURE
        }
    }
}
