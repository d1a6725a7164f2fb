//! `dbm bench migrate-disk`: the disk part of a live migration's downtime, ours against
//! QEMU's approach, on the demo's workload.
//!
//! For each bitmap count (1 and 4 by default) and each mode, the same migration runs with
//! two approaches, alternating (ours first in odd runs, QEMU's first in even ones), each
//! `--repeat` times:
//! - **ours**: [`SharedDiskState`](dirty_bitmap::migration::SharedDiskState): the changed
//!   regions flushed once per measurement window during precopy, the stop's disk time
//!   counted against the downtime limit, the incremental `inactivate` inside the downtime;
//! - **QEMU's**: [`SharedDiskState::qemu_baseline`](dirty_bitmap::migration::SharedDiskState::qemu_baseline):
//!   nothing flushed during precopy, no disk time in the switchover rule, every bitmap
//!   stored whole (`inactivate_full_rewrite`) inside the downtime.
//!
//! Modes (`--modes`, both by default): **shared** storage (both hosts see one image), as
//! above; **stream** (the destination has an image of its own, the bitmaps travel in the
//! migration stream):
//! - **ours**: [`StreamDiskState`](dirty_bitmap::migration::StreamDiskState): each
//!   bitmap's changed regions sent during precopy, only what changed since left for the
//!   stop;
//! - **QEMU's**: [`StreamDiskState::qemu_baseline`](dirty_bitmap::migration::StreamDiskState::qemu_baseline):
//!   nothing sent during precopy (its pending, the whole bitmaps, counted against the
//!   threshold), every bitmap whole at the stop.
//!
//! The disk part of the downtime in stream mode is the bitmap sections' wire bytes at the
//! stop ([`StreamDiskState::complete_bytes`](dirty_bitmap::migration::StreamDiskState::complete_bytes)).
//!
//! Every run is [`migrate_run::migrate`] with a disk ([`DiskParams`]): a fresh guest, a
//! fresh sparse image with the bitmaps, a disk writer marking throughout, the destination
//! behind a TCP listener on 127.0.0.1 that opens the image after the hand-over and counts
//! the marks it lacks. A run that does not converge, or whose destination RAM differs,
//! is an error; lost marks or a `qemu-img check` that is not clean are printed, then make
//! the command fail.

use crate::work_dir::WorkDir;
use std::error::Error;
use std::path::PathBuf;
use std::time::Duration;

use dirty_bitmap::migration::{Millis, Pattern};

use super::migrate::{grouped, mib_arg, ms};
use crate::demo::DISK_WRITES_PER_SEC;
use crate::migrate_run::{self, DiskMode, DiskParams, DiskRun, End, Params, Run, PAGE};
use crate::out::emit;
use crate::size::{human, parse_size};
use crate::CmdResult;

type Res<T> = Result<T, Box<dyn Error>>;

/// The target: ours' disk part at most this share of QEMU's.
const TARGET: f64 = 1.0 / 20.0;

/// Options of `dbm bench migrate-disk`. The defaults are `dbm demo`'s migration part.
#[derive(Debug, clap::Args)]
pub struct MigrateDiskArgs {
    /// Directory for the images (a temporary directory inside it, removed at the end;
    /// default: the system's).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Guest RAM (suffixes K, M, G; a multiple of 4 KiB).
    #[arg(long, default_value = "1G", value_parser = parse_size, allow_negative_numbers = true)]
    pub guest_ram: u64,
    /// vCPU threads writing guest pages (1 to 4096).
    #[arg(long, default_value_t = 2, value_parser = crate::size::vcpus)]
    pub vcpus: usize,
    /// Bytes per second the vCPUs write, in whole 4 KiB pages (suffixes K, M, G); 90 % of
    /// the writes go into 5 % of the pages.
    #[arg(long, default_value = "32M", value_parser = parse_size, allow_negative_numbers = true)]
    pub dirty_rate: u64,
    /// The rate limit (QEMU `max-bandwidth`), bytes per second (suffixes K, M, G).
    #[arg(long, default_value = "128M", value_parser = parse_size, allow_negative_numbers = true)]
    pub max_bandwidth: u64,
    /// Downtime limit in ms (QEMU `downtime-limit`).
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Virtual disk size (suffixes K, M, G, T).
    #[arg(long, default_value = "16T", value_parser = parse_size, allow_negative_numbers = true)]
    pub disk_size: u64,
    /// Bytes of disk per bit (suffixes K, M, G).
    #[arg(long, default_value = "64K", value_parser = parse_size, allow_negative_numbers = true)]
    pub granularity: u64,
    /// Bitmap counts to measure (comma-separated); every bitmap is enabled, so every disk
    /// write marks each.
    #[arg(long, value_delimiter = ',', default_values = ["1", "4"])]
    pub bitmaps: Vec<usize>,
    /// 4 KiB disk writes per second (90 % into a 64 GiB hot spot, the rest anywhere).
    #[arg(long, default_value_t = DISK_WRITES_PER_SEC)]
    pub disk_writes: u64,
    /// Modes to measure (comma-separated): `shared` (one image both hosts see), `stream`
    /// (the bitmaps in the migration stream, to a destination with an image of its own),
    /// `durable` (shared, the store in durable mode on both hosts; ours only: QEMU has no
    /// such mode).
    #[arg(long, value_delimiter = ',', default_values = ["shared", "stream", "durable"])]
    pub modes: Vec<DiskMode>,
    /// Runs per approach, mode and bitmap count; every figure is the median.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// A short run: a 64 MiB guest, a 1 TiB disk written 6,250 times a second (the same
    /// share of each bitmap changed per second as 16 TiB at 100,000), one run per approach
    /// (overrides --guest-ram, --disk-size, --disk-writes and --repeat).
    #[arg(long)]
    pub quick: bool,
    /// Random seed (default: random; printed either way). Run r of both approaches uses
    /// seed + r.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Where the bitmaps migrate.
type Mode = DiskMode;

/// One run's figures.
struct Sample {
    bitmaps: usize,
    mode: Mode,
    qemu: bool,
    rep: usize,
    run: Run,
    disk: DiskRun,
}

impl Sample {
    fn approach(&self) -> &'static str {
        if self.qemu {
            "QEMU's"
        } else {
            "ours"
        }
    }

    fn downtime(&self) -> Duration {
        self.run.downtime.unwrap_or_default()
    }

    /// Switched over, within the downtime limit.
    fn within(&self) -> bool {
        self.run.converged()
            && self.downtime() <= Duration::from_millis(self.run.params.downtime_limit.get())
    }

    /// Stream mode: the bitmap sections' wire bytes inside the downtime.
    fn stream_bytes(&self) -> u64 {
        self.disk.stream_bytes_in_downtime.map_or(0, |b| b.get())
    }
}

fn say(s: impl AsRef<str>) -> Res<()> {
    emit(&format!("{}\n", s.as_ref()))?;
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Medians of one approach's runs.
struct Medians {
    /// Stream mode: the bitmap sections' wire bytes inside the downtime.
    stream_bytes: u64,
    /// Every byte on the wire inside the downtime (RAM included).
    wire_in_downtime: u64,
    /// Runs that never switched over (their figures are left out of the medians).
    unconverged: usize,
    disk_ms: f64,
    bytes: u64,
    syncs: u64,
    downtime_ms: f64,
    total_ms: f64,
    /// Runs over the limit, of `runs`.
    over: usize,
    runs: usize,
}

impl Medians {
    fn of(all: &[&Sample]) -> Medians {
        let samples: Vec<&Sample> = all.iter().copied().filter(|s| s.run.converged()).collect();
        let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(|s| f(s)).collect());
        Medians {
            stream_bytes: m(&|s| s.stream_bytes() as f64).round() as u64,
            wire_in_downtime: m(&|s| s.run.bytes_in_downtime.map_or(0, |b| b.get()) as f64).round()
                as u64,
            unconverged: all.len() - samples.len(),
            disk_ms: m(&|s| ms(s.disk.stop.duration)),
            bytes: m(&|s| s.disk.stop.bytes_written as f64).round() as u64,
            syncs: m(&|s| s.disk.stop.syncs as f64).round() as u64,
            downtime_ms: m(&|s| ms(s.downtime())),
            total_ms: m(&|s| ms(s.run.total_time)),
            over: all.iter().filter(|s| !s.within()).count(),
            runs: all.len(),
        }
    }

    fn within_cell(&self) -> String {
        if self.over == 0 {
            format!("yes ({} of {})", self.runs, self.runs)
        } else if self.unconverged > 0 {
            format!(
                "**no** ({} of {} over, of which {} never switched over)",
                self.over, self.runs, self.unconverged
            )
        } else {
            format!("**no** ({} of {} over)", self.over, self.runs)
        }
    }
}

/// `1/12.3`, or `-` for a ratio that cannot be formed.
fn one_in(r: f64) -> String {
    if r.is_finite() && r > 0.0 {
        format!("1/{:.1}", 1.0 / r)
    } else if r == 0.0 {
        "0".into()
    } else {
        "-".into()
    }
}

/// Runs `dbm bench migrate-disk`.
pub fn run(args: &MigrateDiskArgs) -> CmdResult {
    // The quick form keeps the share of each bitmap the disk writes change per second: a
    // 16th of the disk, a 16th of the writes.
    let (guest_ram, repeat, disk_size, disk_writes) = if args.quick {
        (64 << 20, 1, 1 << 40, DISK_WRITES_PER_SEC / 16)
    } else {
        (
            args.guest_ram,
            args.repeat,
            args.disk_size,
            args.disk_writes,
        )
    };
    if guest_ram == 0 || !guest_ram.is_multiple_of(PAGE) {
        return Err(format!("--guest-ram {guest_ram} is not a positive multiple of 4 KiB").into());
    }
    if args.modes.is_empty() {
        return Err("--modes takes shared, stream and durable".into());
    }
    if args.vcpus == 0 || repeat == 0 {
        return Err("--vcpus and --repeat must be at least 1".into());
    }
    if args.bitmaps.is_empty() || args.bitmaps.iter().any(|&n| n == 0 || n > 64) {
        return Err("--bitmaps takes counts from 1 to 64".into());
    }
    if args.max_bandwidth < 10 {
        return Err("--max-bandwidth must be at least 10 bytes/s".into());
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let tmp = WorkDir::temp_in(args.dir.as_deref())?;

    say("# dbm bench migrate-disk")?;
    say("")?;
    say(format!("- machine: {}", migrate_run::machine()))?;
    say(format!(
        "- load average (1, 5, 15 min) at the start: {}",
        migrate_run::loadavg()
    ))?;
    say(format!(
        "- guest: {} ({} pages of 4 KiB), {} vCPU threads writing {}/s of 4 KiB pages (90 % \
         of the writes into 5 % of the pages); max-bandwidth {}/s, downtime limit {} ms, \
         auto-converge; over TCP on 127.0.0.1; seed {seed} (run r: seed + r, the same for \
         both approaches)",
        human(guest_ram),
        guest_ram / PAGE,
        args.vcpus,
        human(args.dirty_rate / PAGE * PAGE),
        human(args.max_bandwidth),
        args.downtime_limit,
    ))?;
    say(format!(
        "- disk: {} at {} granularity ({} of bitmap each), {} writes of 4 KiB per second (90 % \
         into a 64 GiB hot spot, the rest anywhere), marked on every bitmap throughout; a fresh \
         image per run in {}",
        human(disk_size),
        human(args.granularity),
        human(disk_size.div_ceil(args.granularity).div_ceil(8)),
        grouped(disk_writes),
        tmp.path().display()
    ))?;
    say(
        "- ours: the bitmaps' changed regions flushed during precopy, the stop's disk time \
         counted against the limit, the incremental `inactivate` inside the downtime; \
         QEMU's: nothing flushed before the stop, no disk time in the switchover rule, \
         `inactivate_full_rewrite` (every bitmap stored whole) inside the downtime",
    )?;
    say(
        "- stream mode (the destination has an image of its own, created empty, the same disk \
         size): ours sends each bitmap's changed regions during precopy, only what changed \
         since is left for the stop; QEMU's (`dirty-bitmaps`) sends nothing before the stop, \
         counts the whole bitmaps in its pending figure, and sends them whole at the stop \
         (every region's bytes; QEMU sends an all-zero chunk as a flag)",
    )?;
    say(format!(
        "- every figure is the median of {repeat} run(s) per approach, ours and QEMU's \
         alternating; the disk part of the downtime is, on shared storage, the stop's own \
         `FlushStats` (bitmap data and table bytes, barriers, wall time), in stream mode the \
         bitmap sections' wire bytes at the stop"
    ))?;
    say(format!(
        "- reproduce: `cargo run --release -- bench migrate-disk{}`",
        reproduce(args, seed)
    ))?;
    say("")?;

    let limit = Millis(args.downtime_limit);
    let mut samples: Vec<Sample> = Vec::new();
    let mut modes: Vec<Mode> = Vec::new();
    for &m in &args.modes {
        if !modes.contains(&m) {
            modes.push(m);
        }
    }
    let approaches = |m: Mode| if m == Mode::Durable { 1 } else { 2 };
    let total: usize = modes
        .iter()
        .map(|&m| approaches(m) * args.bitmaps.len() * repeat)
        .sum();
    for &mode in &modes {
        for &n in &args.bitmaps {
            for rep in 0..repeat {
                let order: &[bool] = if mode == Mode::Durable {
                    &[false]
                } else if rep % 2 == 0 {
                    &[false, true]
                } else {
                    &[true, false]
                };
                for &qemu in order {
                    crate::out::errln!(
                        "dbm bench migrate-disk: run {} of {total}: {n} bitmap(s), {}, {}, \
                         repetition {}",
                        samples.len() + 1,
                        mode.name(),
                        if qemu { "QEMU's" } else { "ours" },
                        rep + 1
                    );
                    let params = Params {
                        ram_bytes: guest_ram,
                        vcpus: args.vcpus,
                        writes_per_sec: args.dirty_rate / PAGE,
                        pattern: Pattern::HOT_90_5,
                        max_bandwidth: args.max_bandwidth,
                        downtime_limit: limit,
                        batch_pages: 64,
                        auto_converge: true,
                        time_cap: Some(Duration::from_secs(120)),
                        progress: None,
                        seed: seed.wrapping_add(rep as u64),
                    };
                    let disk = DiskParams {
                        image: tmp.path().join(format!("bitmaps-{n}.qcow2")),
                        disk_size,
                        granularity: args.granularity,
                        bitmaps: n,
                        writes_per_sec: disk_writes,
                        qemu_baseline: qemu,
                        mode,
                        refuse: false,
                    };
                    let run = migrate_run::migrate(&params, Some(&disk), &mut |_| {})?;
                    let what = format!(
                        "{n} bitmap(s), {}, {} run {}",
                        mode.name(),
                        if qemu { "QEMU's" } else { "our" },
                        rep + 1
                    );
                    // In the stream the bitmaps count against the threshold: QEMU's whole
                    // bitmaps can alone exceed it, and ours' changed regions can come back
                    // faster than the link sends them (uniform writes over many regions).
                    // On shared storage ours' disk time (the stop's remainder and the
                    // destination's load) can alone take the limit. Either approach can
                    // then not switch over; its row says so.
                    let baseline_stuck = true;
                    match &run.end {
                        End::Converged => {}
                        End::Stalled | End::TimeCap if baseline_stuck => {}
                        End::Stalled => {
                            return Err(format!(
                                "{what}: the migration did not converge, even fully throttled"
                            )
                            .into())
                        }
                        End::TimeCap => {
                            return Err(
                                format!("{what}: the migration did not converge in 120 s").into()
                            )
                        }
                        End::Failed(e) => {
                            return Err(format!("{what}: the migration failed: {e}").into())
                        }
                    }
                    if run.converged() && !matches!(run.verified, Some((_, true))) {
                        return Err(format!(
                            "{what}: the destination RAM differs from the source RAM at stop"
                        )
                        .into());
                    }
                    let d = run.disk.clone().ok_or("a disk run without its figures")?;
                    samples.push(Sample {
                        bitmaps: n,
                        mode,
                        qemu,
                        rep,
                        run,
                        disk: d,
                    });
                }
            }
        }
    }
    drop(tmp);

    let shared: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.mode == Mode::Shared || s.mode == Mode::Durable)
        .collect();
    let stream: Vec<&Sample> = samples.iter().filter(|s| s.mode == Mode::Stream).collect();
    let heading = format!(
        "{} guest, limit {} ms, {} disk, {} writes/s",
        human(guest_ram),
        args.downtime_limit,
        human(disk_size),
        grouped(disk_writes)
    );
    if !shared.is_empty() {
        say(format!("## Every run, shared storage ({heading})"))?;
        say("")?;
        say(
        "| bitmaps | mode | approach | run | downtime ms | within limit | disk ms | disk bytes | \
         disk syncs | disk time at switch ms | of which destination, estimated ms | \
         destination activate ms | flushed in precopy | total ms | disk writes | marks lost | \
         qemu-img check |",
    )?;
        say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for s in &shared {
            say(format!(
            "| {} | {} | {} | {} | {:.1} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            s.bitmaps,
            s.mode.name(),
            s.approach(),
            s.rep + 1,
            ms(s.downtime()),
            if s.within() {
                "yes"
            } else if s.run.converged() {
                "**no**"
            } else {
                match s.run.end {
                    End::TimeCap => "**no**: never switched over (120 s cap)",
                    _ => "**no**: never switched over (stalled, fully throttled)",
                }
            },
            ms(s.disk.stop.duration),
            grouped(s.disk.stop.bytes_written),
            s.disk.stop.syncs,
            s.disk
                .disk_time_at_switch
                .map_or_else(|| "-".into(), |m| m.get().to_string()),
            s.disk
                .dest_time_estimate
                .map_or_else(|| "-".into(), |m| m.get().to_string()),
            s.disk
                .dest_activate
                .map_or_else(|| "-".into(), |d| format!("{:.1}", ms(d))),
            grouped(s.disk.flushed.get()),
            ms(s.run.total_time),
            grouped(s.disk.marks),
            s.disk.marks_lost,
            s.disk.qemu_check.replace('|', "/").replace('\n', " "),
        ))?;
        }
        say("")?;
    }
    if !stream.is_empty() {
        say(format!(
            "## Every run, bitmaps in the stream ({heading}; the destination's own image)"
        ))?;
        say("")?;
        say(
            "| bitmaps | approach | run | switched over | downtime ms | within limit | bitmap \
             bytes in downtime | all bytes in downtime | regions sent | destination activate \
             ms | total ms | throttle % | disk writes | marks lost | qemu-img check |",
        )?;
        say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for s in &stream {
            say(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {} |",
                s.bitmaps,
                s.approach(),
                s.rep + 1,
                match &s.run.end {
                    End::Converged => "yes".to_string(),
                    End::Stalled => "**no**: stalled, fully throttled".to_string(),
                    End::TimeCap => "**no**: 120 s cap".to_string(),
                    End::Failed(e) => format!("**no**: {e}"),
                },
                s.run
                    .downtime
                    .map_or_else(|| "-".into(), |d| format!("{:.1}", ms(d))),
                if s.within() { "yes" } else { "**no**" },
                s.disk
                    .stream_bytes_in_downtime
                    .map_or_else(|| "-".into(), |b| grouped(b.get())),
                s.run
                    .bytes_in_downtime
                    .map_or_else(|| "-".into(), |b| grouped(b.get())),
                grouped(s.disk.stream_regions_sent),
                s.disk
                    .dest_activate
                    .map_or_else(|| "-".into(), |d| format!("{:.1}", ms(d))),
                ms(s.run.total_time),
                s.run.throttle,
                grouped(s.disk.marks),
                s.disk.marks_lost,
                s.disk.qemu_check.replace('|', "/").replace('\n', " "),
            ))?;
        }
        say("")?;
    }

    let mut met_all = true;
    if !shared.is_empty() {
        say(format!(
        "## The disk part of the downtime, shared storage: ours against QEMU's (target: ≤ 1/{:.0} of it, and \
         no downtime over the limit)",
        1.0 / TARGET
    ))?;
        say("")?;
        say(
        "| bitmaps | mode | ours: disk ms | ours: disk bytes | ours: disk syncs | ours: downtime ms \
         | ours: within limit | ours: total ms | QEMU's: disk ms | QEMU's: disk bytes | QEMU's: \
         disk syncs | QEMU's: downtime ms | QEMU's: within limit | QEMU's: total ms | ours / \
         QEMU's, disk ms | ours / QEMU's, disk bytes | target |",
    )?;
        say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for mode in [Mode::Shared] {
            for &n in &args.bitmaps {
                let pick = |q: bool| -> Vec<&Sample> {
                    samples
                        .iter()
                        .filter(|s| s.bitmaps == n && s.mode == mode && s.qemu == q)
                        .collect()
                };
                let (ours, qemu) = (Medians::of(&pick(false)), Medians::of(&pick(true)));
                let ratio = ours.disk_ms / qemu.disk_ms;
                let ratio_bytes = ours.bytes as f64 / qemu.bytes as f64;
                let met = ratio <= TARGET && ours.over == 0;
                met_all &= met;
                let verdict = if met {
                    "**met**".to_string()
                } else {
                    let mut why = Vec::new();
                    if ratio.is_nan() || ratio > TARGET {
                        why.push(one_in(ratio));
                    }
                    if ours.over > 0 {
                        why.push(format!("{} downtime(s) over the limit", ours.over));
                    }
                    format!("**not met**: {}", why.join(", "))
                };
                say(format!(
                "| {n} | {} | {:.2} | {} | {} | {:.1} | {} | {:.0} | {:.2} | {} | {} | {:.1} | {} | \
                 {:.0} | {} | {} | {verdict} |",
                mode.name(),
                ours.disk_ms,
                grouped(ours.bytes),
                ours.syncs,
                ours.downtime_ms,
                ours.within_cell(),
                ours.total_ms,
                qemu.disk_ms,
                grouped(qemu.bytes),
                qemu.syncs,
                qemu.downtime_ms,
                qemu.within_cell(),
                qemu.total_ms,
                one_in(ratio),
                one_in(ratio_bytes),
            ))?;
            }
        }
        say("")?;
    }
    if !stream.is_empty() {
        say(format!(
            "## The disk part of the downtime, bitmaps in the stream: ours against QEMU's \
             (the bitmap sections' wire bytes at the stop; target: ≤ 1/{:.0} of QEMU's, and \
             no downtime over the limit)",
            1.0 / TARGET
        ))?;
        say("")?;
        say(
            "| bitmaps | ours: bitmap bytes in downtime | ours: all bytes in downtime | ours: \
             downtime ms | ours: within limit | ours: total ms | QEMU's: bitmap bytes in \
             downtime | QEMU's: all bytes in downtime | QEMU's: downtime ms | QEMU's: within \
             limit | QEMU's: total ms | ours / QEMU's, bitmap bytes | target |",
        )?;
        say("|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
        for &n in &args.bitmaps {
            let pick = |q: bool| -> Vec<&Sample> {
                stream
                    .iter()
                    .copied()
                    .filter(|s| s.bitmaps == n && s.qemu == q)
                    .collect()
            };
            let (ours, qemu) = (Medians::of(&pick(false)), Medians::of(&pick(true)));
            let none = |m: &Medians| m.unconverged == m.runs;
            let ratio = if none(&ours) || none(&qemu) {
                f64::NAN
            } else {
                ours.stream_bytes as f64 / qemu.stream_bytes as f64
            };
            // QEMU's never switching over leaves no ratio; ours must still switch over
            // within the limit every time.
            let met = ours.over == 0 && (none(&qemu) || ratio <= TARGET);
            met_all &= met;
            let verdict = if met && none(&qemu) {
                "**met**: QEMU's never switched over".to_string()
            } else if met {
                "**met**".to_string()
            } else {
                let mut why = Vec::new();
                if !none(&qemu) && !none(&ours) && (ratio.is_nan() || ratio > TARGET) {
                    why.push(one_in(ratio));
                }
                if ours.unconverged > 0 {
                    why.push(format!(
                        "{} of {} of ours never switched over",
                        ours.unconverged, ours.runs
                    ));
                }
                if ours.over > ours.unconverged {
                    why.push(format!(
                        "{} downtime(s) over the limit",
                        ours.over - ours.unconverged
                    ));
                }
                format!("**not met**: {}", why.join(", "))
            };
            let cell = |m: &Medians, v: String| if none(m) { "-".to_string() } else { v };
            say(format!(
                "| {n} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {verdict} |",
                cell(&ours, grouped(ours.stream_bytes)),
                cell(&ours, grouped(ours.wire_in_downtime)),
                cell(&ours, format!("{:.1}", ours.downtime_ms)),
                ours.within_cell(),
                cell(&ours, format!("{:.0}", ours.total_ms)),
                cell(&qemu, grouped(qemu.stream_bytes)),
                cell(&qemu, grouped(qemu.wire_in_downtime)),
                cell(&qemu, format!("{:.1}", qemu.downtime_ms)),
                qemu.within_cell(),
                cell(&qemu, format!("{:.0}", qemu.total_ms)),
                one_in(ratio),
            ))?;
        }
        say("")?;
    }
    if samples.iter().any(|s| s.mode == Mode::Durable) {
        durable_table(&samples, &args.bitmaps)?;
    }
    let lost: u64 = samples.iter().map(|s| s.disk.marks_lost).sum();
    let marks: u64 = samples.iter().map(|s| s.disk.marks).sum();
    let unclean: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.disk.qemu_check != "clean" && !s.disk.qemu_check.starts_with("not run"))
        .collect();
    let over = |q: bool| {
        samples
            .iter()
            .filter(|s| s.qemu == q && !s.within())
            .count()
    };
    let runs_of = |q: bool| samples.iter().filter(|s| s.qemu == q).count();
    let stuck = samples.iter().filter(|s| !s.run.converged()).count();
    let stuck_in = |m: Mode| {
        samples
            .iter()
            .filter(|s| s.mode == m && !s.run.converged())
            .count()
    };
    say(format!(
        "- {} runs, {}, every destination RAM equal to the source RAM at stop; \
         marks lost: {lost} of {} disk writes; downtime over the limit: ours {} of {}, QEMU's \
         {} of {}; target {}",
        samples.len(),
        if stuck == 0 {
            "all converged".to_string()
        } else {
            format!(
                "all converged but {stuck} ({} on shared storage, {} in stream mode; listed \
                 as never switched over: what the disk or the bitmaps left to send took of \
                 the limit stayed over it)",
                stuck_in(Mode::Shared),
                stuck_in(Mode::Stream)
            )
        },
        grouped(marks),
        over(false),
        runs_of(false),
        over(true),
        runs_of(true),
        if met_all {
            "met in every row"
        } else {
            "not met in every row"
        }
    ))?;
    say(format!(
        "- qemu-img check: {}",
        match samples.first().map(|s| s.disk.qemu_check.as_str()) {
            Some(c) if c.starts_with("not run") => "not run (qemu-img is not installed)".into(),
            _ if unclean.is_empty() => "clean after every run".to_string(),
            _ => format!("**not clean** after {} run(s)", unclean.len()),
        }
    ))?;
    say(format!(
        "- load average at the end: {}",
        migrate_run::loadavg()
    ))?;
    if lost > 0 {
        return Err(format!("{lost} disk writes were not dirty on the destination").into());
    }
    if let Some(s) = unclean.first() {
        return Err(format!(
            "qemu-img check after {} bitmap(s), {} run {}: {}",
            s.bitmaps,
            s.approach(),
            s.rep + 1,
            s.disk.qemu_check
        )
        .into());
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// The durable mode beside the deferred one, both ours, medians per bitmap count: the
/// disk part of the downtime (the stop, which has nothing left to write in durable mode,
/// and the destination's activate), and what the durable marks cost the writer (disk
/// writes made per second of migration).
fn durable_table(samples: &[Sample], bitmaps: &[usize]) -> Res<()> {
    say("## Shared storage: durable mode against the deferred mode (ours, medians)")?;
    say("")?;
    say(
        "| bitmaps | deferred: stop ms | deferred: stop bytes (max) | deferred: destination \
         activate ms | deferred: downtime ms | deferred: disk writes/s | durable: stop ms | \
         durable: stop bytes (max) | durable: stop syncs (max) | durable: destination activate \
         ms | durable: downtime ms | durable: disk writes/s | durable: marks lost | durable: \
         qemu-img check |",
    )?;
    say("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")?;
    let fmt_ms = |v: Vec<f64>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", median(v))
        }
    };
    for &n in bitmaps {
        let of = |m: Mode| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|s| s.bitmaps == n && s.mode == m && !s.qemu && s.run.converged())
                .collect()
        };
        let row = |v: &[&Sample]| {
            let stop_ms = fmt_ms(v.iter().map(|s| ms(s.disk.stop.duration)).collect());
            let bytes = v
                .iter()
                .map(|s| s.disk.stop.bytes_written)
                .max()
                .map_or_else(|| "-".into(), grouped);
            let dest = fmt_ms(
                v.iter()
                    .filter_map(|s| s.disk.dest_activate.map(ms))
                    .collect(),
            );
            let down = fmt_ms(v.iter().map(|s| ms(s.downtime())).collect());
            let rate = if v.is_empty() {
                "-".to_string()
            } else {
                grouped(median(
                    v.iter()
                        .map(|s| s.disk.marks as f64 / s.run.total_time.as_secs_f64().max(1e-9))
                        .collect(),
                ) as u64)
            };
            (stop_ms, bytes, dest, down, rate)
        };
        let (deferred, durable) = (of(Mode::Shared), of(Mode::Durable));
        let d = row(&deferred);
        let u = row(&durable);
        let syncs = durable
            .iter()
            .map(|s| s.disk.stop.syncs)
            .max()
            .map_or_else(|| "-".into(), |x| x.to_string());
        let lost: u64 = durable.iter().map(|s| s.disk.marks_lost).sum();
        let unclean = durable
            .iter()
            .filter(|s| s.disk.qemu_check != "clean")
            .count();
        let check = if durable.is_empty() {
            "-".to_string()
        } else if unclean == 0 {
            "clean".to_string()
        } else {
            format!("**not clean** in {unclean}")
        };
        say(format!(
            "| {n} | {} | {} | {} | {} | {} | {} | {} | {syncs} | {} | {} | {} | {lost} | {check} |",
            d.0, d.1, d.2, d.3, d.4, u.0, u.1, u.2, u.3, u.4
        ))?;
    }
    say("")?;
    Ok(())
}

/// The options that reproduce this run, seed included.
fn reproduce(args: &MigrateDiskArgs, seed: u64) -> String {
    let mut s = String::new();
    if args.quick {
        s.push_str(" --quick");
    } else {
        s.push_str(&format!(
            " --guest-ram {} --disk-size {} --disk-writes {} --repeat {}",
            mib_arg(args.guest_ram),
            mib_arg(args.disk_size),
            args.disk_writes,
            args.repeat
        ));
    }
    s.push_str(&format!(
        " --vcpus {} --dirty-rate {} --max-bandwidth {} --downtime-limit {} --granularity {} \
         --bitmaps {}",
        args.vcpus,
        mib_arg(args.dirty_rate),
        mib_arg(args.max_bandwidth),
        args.downtime_limit,
        mib_arg(args.granularity),
        args.bitmaps
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(","),
    ));
    if let Some(d) = &args.dir {
        s.push_str(&format!(" --dir {}", d.display()));
    }
    s.push_str(&format!(
        " --modes {}",
        args.modes
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(",")
    ));
    s.push_str(&format!(" --seed {seed}"));
    s
}
