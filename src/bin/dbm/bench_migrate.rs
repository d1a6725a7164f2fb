//! `dbm bench migrate`: live migration with real vCPU threads and the real clock, swept
//! over guest dirty rate × bandwidth (`max-bandwidth`). For each point: converged or not,
//! syncs and loop turns, total time, downtime against the limit, bytes and pages sent,
//! pages resent, the final vCPU throttle. Prints Markdown (machine, load, parameters, the
//! table, the command that reproduces it) and draws an SVG: total time against dirty rate,
//! one line per bandwidth, dashed where the run gave up.
//!
//! Every point is a fresh guest and a fresh destination ([`migrate_run::migrate`]). A run
//! gives up on the stall guard's first report (or, with `--auto-converge`, once the vCPUs
//! are throttled to 99 %), or at the time cap: `--cap-passes` times the time a full pass
//! over RAM takes at the bandwidth, plus one second.

use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use clap::ValueEnum;
use dirty_bitmap::migration::{Millis, Pattern};

use super::plot::{Chart, Series};
use crate::migrate_run::{self, format_line, line_header, End, Params, Run, PAGE};
use crate::out::emit;
use crate::size::human;
use crate::size::parse_size;
use crate::CmdResult;

type Res<T> = Result<T, Box<dyn Error>>;

/// Where the vCPUs write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PatternArg {
    /// Every page equally likely.
    Uniform,
    /// 90 % of the writes into 5 % of the pages.
    Hot,
    /// Page after page, wrapping around.
    Sequential,
}

impl PatternArg {
    fn pattern(self) -> Pattern {
        match self {
            PatternArg::Uniform => Pattern::Uniform,
            PatternArg::Hot => Pattern::HOT_90_5,
            PatternArg::Sequential => Pattern::Sequential,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            PatternArg::Uniform => "uniform over all pages",
            PatternArg::Hot => "90 % of the writes into 5 % of the pages",
            PatternArg::Sequential => "sequential sweeps",
        }
    }
}

/// Options of `dbm bench migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Guest RAM (suffixes K, M, G; a multiple of 4 KiB).
    #[arg(long, default_value = "128M", value_parser = parse_size, allow_negative_numbers = true)]
    pub guest_ram: u64,
    /// vCPU threads (1 to 4096).
    #[arg(long, default_value_t = 2, value_parser = crate::size::vcpus)]
    pub vcpus: usize,
    /// Bandwidths (`max-bandwidth`) to sweep, bytes per second (comma-separated, suffixes
    /// K, M, G).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, allow_negative_numbers = true,
          default_values = ["32M", "64M", "128M", "256M"])]
    pub bandwidths: Vec<u64>,
    /// Guest dirty rates to sweep, bytes per second of 4 KiB page writes (comma-separated,
    /// suffixes K, M, G).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, allow_negative_numbers = true,
          default_values = ["0", "8M", "32M", "64M", "128M", "256M"])]
    pub dirty_rates: Vec<u64>,
    /// Where the vCPUs write.
    #[arg(long, value_enum, default_value_t = PatternArg::Uniform)]
    pub pattern: PatternArg,
    /// Downtime limit in ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Throttle the vCPUs on stalls (20 % more each time) instead of giving up on the
    /// first.
    #[arg(long)]
    pub auto_converge: bool,
    /// Time cap per run, in full passes over RAM at the run's bandwidth (plus 1 s).
    #[arg(long, default_value_t = 3.0)]
    pub cap_passes: f64,
    /// Pages per batch.
    #[arg(long, default_value_t = 64)]
    pub batch_pages: usize,
    /// Print every run's `info migrate`-like lines too.
    #[arg(long)]
    pub lines: bool,
    /// Write the plot (total time against dirty rate, a line per bandwidth) to this SVG.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// A short run: a 16 MiB guest, 64 MiB/s, dirty rates 0, 4M and 256M, a 50 ms limit
    /// (overrides those options).
    #[arg(long)]
    pub quick: bool,
    /// Random seed (default: random; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
}

fn say(s: impl AsRef<str>) -> Res<()> {
    emit(&format!("{}\n", s.as_ref()))?;
    Ok(())
}

fn mib(bytes_per_sec: u64) -> String {
    let v = bytes_per_sec as f64 / (1 << 20) as f64;
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// `1,234,567`.
pub(super) fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub(super) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The guest's page writes per second it ran (the run's time less the downtime), MiB/s:
/// below the asked rate when the vCPU threads do not get the CPU, or are throttled.
fn achieved(r: &Run) -> f64 {
    let secs = r
        .total_time
        .saturating_sub(r.downtime.unwrap_or_default())
        .as_secs_f64();
    if secs > 0.0 {
        (r.guest_writes * PAGE) as f64 / secs / (1 << 20) as f64
    } else {
        0.0
    }
}

/// The table's "converged" cell.
fn end_cell(r: &Run) -> String {
    match &r.end {
        End::Converged => "yes".into(),
        End::Stalled => "no: stalled".into(),
        End::TimeCap => "no: time cap".into(),
        End::Failed(e) => format!("no: error: {}", e.replace('|', "/")),
    }
}

/// Runs `dbm bench migrate`.
pub fn run(args: &MigrateArgs) -> CmdResult {
    let mut guest_ram = args.guest_ram;
    let mut bandwidths = args.bandwidths.clone();
    let mut rates = args.dirty_rates.clone();
    let mut limit = args.downtime_limit;
    if args.quick {
        guest_ram = 16 << 20;
        bandwidths = vec![64 << 20];
        rates = vec![0, 4 << 20, 256 << 20];
        limit = 50;
    }
    if bandwidths.is_empty() || rates.is_empty() {
        return Err("--bandwidths and --dirty-rates need at least one value each".into());
    }
    if let Some(b) = bandwidths.iter().find(|&&b| b == 0) {
        return Err(format!("bandwidth {b} is not positive").into());
    }
    if args.vcpus == 0 || args.batch_pages == 0 {
        return Err("--vcpus and --batch-pages must be at least 1".into());
    }
    if !(args.cap_passes > 0.0 && args.cap_passes.is_finite()) {
        return Err("--cap-passes must be positive".into());
    }
    if guest_ram == 0 || !guest_ram.is_multiple_of(PAGE) {
        return Err(format!("--guest-ram {guest_ram} is not a positive multiple of 4 KiB").into());
    }
    let seed = args.seed.unwrap_or_else(rand::random);

    say("# dbm bench migrate")?;
    say("")?;
    say(format!("- machine: {}", migrate_run::machine()))?;
    say(format!(
        "- load average (1, 5, 15 min) at the start: {}",
        migrate_run::loadavg()
    ))?;
    say(format!(
        "- guest: {} ({} pages of 4 KiB), {} vCPU threads, page writes {}; seed {seed}",
        human(guest_ram),
        guest_ram / PAGE,
        args.vcpus,
        args.pattern.describe()
    ))?;
    say(format!(
        "- loop: downtime limit {limit} ms, batches of {} pages, {}; a run gives up at {} full \
         passes over RAM at its bandwidth + 1 s",
        args.batch_pages,
        if args.auto_converge {
            "auto-converge (+20 % throttle per stall, up to 99 %)"
        } else {
            "no auto-converge (gives up on the first stall report)"
        },
        args.cap_passes
    ))?;
    say(format!(
        "- reproduce: `cargo run --release -- bench migrate{}`",
        reproduce(args, seed)
    ))?;
    say("")?;

    let mut runs: Vec<Run> = Vec::new();
    for &bw in &bandwidths {
        for &rate in &rates {
            let pass = Duration::from_secs_f64(guest_ram as f64 / bw as f64);
            let params = Params {
                ram_bytes: guest_ram,
                vcpus: args.vcpus,
                writes_per_sec: rate / PAGE,
                pattern: args.pattern.pattern(),
                max_bandwidth: bw,
                downtime_limit: Millis(limit),
                batch_pages: args.batch_pages,
                auto_converge: args.auto_converge,
                time_cap: Some(pass.mul_f64(args.cap_passes) + Duration::from_secs(1)),
                progress: None,
                seed,
            };
            if args.lines {
                say(format!(
                    "### dirty rate {} MiB/s, bandwidth {} MiB/s",
                    mib(rate),
                    mib(bw)
                ))?;
                say("")?;
                say("```")?;
                say(line_header())?;
            }
            let mut failed = None;
            let run = migrate_run::migrate(&params, None, &mut |l| {
                if args.lines {
                    if let Err(e) = say(format_line(l)) {
                        failed.get_or_insert(e);
                    }
                }
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            if args.lines {
                say("```")?;
                say("")?;
            }
            if run.verified.is_some_and(|(_, same)| !same) {
                return Err(format!(
                    "dirty rate {rate}, bandwidth {bw}: the destination RAM differs from the \
                     source RAM at stop"
                )
                .into());
            }
            runs.push(run);
        }
    }

    say(format!(
        "## Dirty rate × bandwidth, {} guest, limit {limit} ms ({})",
        human(guest_ram),
        runs.first().map_or("", |r| r.transport)
    ))?;
    say("")?;
    say(
        "| dirty rate MiB/s | achieved MiB/s | bandwidth MiB/s | rate / bandwidth | converged | \
         syncs | loop turns | total ms | downtime ms | limit ms | within limit | bytes sent | pages sent | pages \
         resent | throttle % |",
    )?;
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    let mut over = 0;
    for r in &runs {
        let p = &r.params;
        let rate = p.writes_per_sec * PAGE;
        let (down, within) = match r.downtime {
            Some(d) => {
                let ok = d <= Duration::from_millis(limit);
                over += usize::from(!ok);
                (format!("{:.1}", ms(d)), if ok { "yes" } else { "**no**" })
            }
            None => ("-".into(), "-"),
        };
        say(format!(
            "| {} | {:.1} | {} | {:.2} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {} |",
            mib(rate),
            achieved(r),
            mib(p.max_bandwidth),
            rate as f64 / p.max_bandwidth as f64,
            end_cell(r),
            r.syncs,
            r.iterations,
            ms(r.total_time),
            down,
            limit,
            within,
            grouped(r.bytes_sent.get()),
            grouped(r.pages_sent),
            grouped(r.pages_resent()),
            r.throttle
        ))?;
    }
    say("")?;
    let converged = runs.iter().filter(|r| r.converged()).count();
    say(format!(
        "- {converged} of {} runs converged; {over} measured a downtime over the limit; every \
         converged run's destination RAM equals the source RAM at stop (CRC32 per page and \
         byte for byte)",
        runs.len()
    ))?;
    say(format!(
        "- load average at the end: {}",
        migrate_run::loadavg()
    ))?;

    if let Some(path) = &args.svg {
        let mut series = Vec::new();
        for (i, &bw) in bandwidths.iter().enumerate() {
            let pts = |ok: bool| -> Vec<(f64, f64)> {
                runs.iter()
                    .filter(|r| r.params.max_bandwidth == bw && r.converged() == ok)
                    .map(|r| {
                        (
                            (r.params.writes_per_sec * PAGE) as f64 / (1 << 20) as f64,
                            r.total_time.as_secs_f64(),
                        )
                    })
                    .collect()
            };
            series.push(Series {
                name: format!("{} MiB/s, converged", mib(bw)),
                points: pts(true),
                dashed: false,
                colour: Some(i),
            });
            let gave_up = pts(false);
            if !gave_up.is_empty() {
                series.push(Series {
                    name: format!("{} MiB/s, gave up", mib(bw)),
                    points: gave_up,
                    dashed: true,
                    colour: Some(i),
                });
            }
        }
        let chart = Chart {
            title: format!(
                "Live migration of a {} guest: total time against dirty rate ({} ms limit)",
                human(guest_ram),
                limit
            ),
            x_label: format!(
                "guest dirty rate, MiB/s of 4 KiB page writes ({})",
                args.pattern.describe()
            ),
            y_label: "total time, s (dashed: until the run gave up)".into(),
            x_log: false,
            y_log: false,
            series,
        };
        std::fs::write(path, chart.to_svg())?;
        say(format!("- plot: {}", path.display()))?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The options that reproduce this run, seed included.
fn reproduce(args: &MigrateArgs, seed: u64) -> String {
    let list = |v: &[u64]| v.iter().map(|&b| mib_arg(b)).collect::<Vec<_>>().join(",");
    let mut s = String::new();
    if args.quick {
        s.push_str(" --quick");
    } else {
        s.push_str(&format!(
            " --guest-ram {} --bandwidths {} --dirty-rates {} --downtime-limit {}",
            mib_arg(args.guest_ram),
            list(&args.bandwidths),
            list(&args.dirty_rates),
            args.downtime_limit
        ));
    }
    s.push_str(&format!(
        " --vcpus {} --pattern {} --cap-passes {} --batch-pages {}",
        args.vcpus,
        format!("{:?}", args.pattern).to_lowercase(),
        args.cap_passes,
        args.batch_pages
    ));
    if args.auto_converge {
        s.push_str(" --auto-converge");
    }
    if let Some(p) = &args.svg {
        s.push_str(&format!(" --svg {}", p.display()));
    }
    s.push_str(&format!(" --seed {seed}"));
    s
}

/// A size as the shortest `parse_size` spelling.
pub(super) fn mib_arg(b: u64) -> String {
    for (shift, suffix) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if b != 0 && b.is_multiple_of(1 << shift) {
            return format!("{}{suffix}", b >> shift);
        }
    }
    b.to_string()
}
