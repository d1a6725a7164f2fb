//! `dbm bench load`: what opening an image and loading a fully dirty bitmap costs, ours
//! against QEMU's, as whole processes on the same image in the same run.
//!
//! The image: a 16 TiB bitmap-only qcow2 image (64 KiB clusters) with one bitmap at 64 KiB
//! granularity, every bit set and stored (512 data clusters of all ones, 32 MiB), as a long
//! run leaves it. Then, alternately, `--repeat` times each: `dbm info IMAGE` (which opens
//! the image and loads every consistent bitmap to count its dirty bytes) and
//! `qemu-img info IMAGE` (which opens it and, as every QEMU open of a qcow2 image with
//! bitmaps does, loads each bitmap into memory). Wall time of the whole process, medians.
//! Both outputs are checked: ours must report every byte dirty.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, Recording};

use crate::migrate_run::{loadavg, machine};
use crate::out::outln;
use crate::size::parse_size;
use crate::CmdResult;

/// Options of `dbm bench load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// Virtual disk size (suffixes K, M, G, T).
    #[arg(long, default_value = "16T", value_parser = parse_size, allow_negative_numbers = true)]
    pub disk_size: u64,
    /// Runs of each tool; the table shows medians.
    #[arg(long, default_value_t = 9)]
    pub repeat: usize,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn timed(cmd: &mut Command) -> Result<(Duration, String), String> {
    let start = Instant::now();
    let out = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| e.to_string())?;
    let t = start.elapsed();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok((t, String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn build(img: &Path, disk: u64) -> dirty_bitmap::Result<()> {
    let mut s = BitmapStore::create(FileStorage::create(img)?, disk, 65536)?;
    s.add("b0", 65536, Recording::Enabled)?;
    s.activate()?;
    s.tracker()?.mark(0, disk);
    s.close()?;
    Ok(())
}

/// Runs the load benchmark.
pub fn run(args: &LoadArgs) -> CmdResult {
    if args.repeat == 0 || args.disk_size == 0 {
        return Err("--repeat and --disk-size must be at least 1".into());
    }
    let dir = crate::work_dir::WorkDir::temp_in(None)?;
    let img = dir.path().join("full.qcow2");
    build(&img, args.disk_size)?;
    let exe = std::env::current_exe()?;
    let (mut ours, mut qemu) = (Vec::new(), Vec::new());
    for _ in 0..args.repeat {
        let (t, out) = timed(Command::new(&exe).arg("info").arg("--json").arg(&img))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        if v["bitmaps"][0]["dirty-bytes"].as_u64() != Some(args.disk_size) {
            return Err(format!("dbm info did not count every byte dirty: {out}").into());
        }
        ours.push(t);
        let (t, out) = timed(
            Command::new("qemu-img")
                .args(["info", "-f", "qcow2"])
                .arg(&img),
        )
        .map_err(|e| format!("qemu-img info: {e}"))?;
        if !out.contains("b0") {
            return Err(format!("qemu-img info does not list the bitmap: {out}").into());
        }
        qemu.push(t);
    }
    let (o, q) = (median(ours), median(qemu));
    let ratio = o.as_secs_f64() / q.as_secs_f64();
    outln!(
        "# dbm bench load\n\n- machine: {}\n- image: {} bytes of disk, one fully dirty bitmap at \
         64 KiB ({} MiB of bitmap data)\n- reproduce: `cargo run --release -- bench load \
         --disk-size {} --repeat {}`\n\n| tool | median ms (whole process) |\n|---|---|\n| \
         `dbm info` | {:.2} |\n| `qemu-img info` | {:.2} |\n\n- ours against QEMU's: \
         {ratio:.2}× (target ≤ 0.5×): {}\n- load average (1, 5, 15 min) at the end: {}",
        machine(),
        args.disk_size,
        (args.disk_size / 65536 / 8) >> 20,
        args.disk_size,
        args.repeat,
        o.as_secs_f64() * 1e3,
        q.as_secs_f64() * 1e3,
        if ratio <= 0.5 { "met" } else { "NOT met" },
        loadavg(),
    );
    Ok(std::process::ExitCode::SUCCESS)
}
