//! `dbm bench backup`: what a backup tool pays, ours beside QEMU's tools in one run.
//!
//! 1. Attaching a raw disk: `dbm create IMAGE --data-file RAW` (the library call, in this
//!    process) against `qemu-img create -f qcow2 -o data_file=RAW2,data_file_raw=on,
//!    preallocation=metadata` (a process), for `--disk-size` at 64 KiB and 2 MiB clusters,
//!    each over its own sparse raw file; `--repeat` rounds interleaved, medians. The
//!    default size is 16 TiB less 2 MiB: ext4 refuses a file of 16 TiB.
//! 2. Listing what changed: a bitmap-only image of `--disk-size` at 64 KiB granularity with
//!    `--extents` dirty extents (one granule each, evenly spread), listed whole-disk by
//!    `dbm dump IMAGE --since B` (a process, output to a file) against `qemu-nbd -r -B B`
//!    started and `nbdinfo --map=qemu:dirty-bitmap:B` run against it (from the server's
//!    start to nbdinfo's exit, output to a file). The two outputs must be byte-identical.

use crate::work_dir::WorkDir;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, Recording};

use crate::migrate_run::{loadavg, machine};
use crate::out::emit;
use crate::size::{human, parse_size};
use crate::CmdResult;

/// Options of `dbm bench backup`.
#[derive(Debug, clap::Args)]
pub struct BackupArgs {
    /// Directory for the images (default: a temporary directory under /tmp).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Disk size (suffixes K, M, G, T); a multiple of 2 MiB.
    #[arg(long, default_value = "17592183947264", value_parser = parse_size, allow_negative_numbers = true)]
    pub disk_size: u64,
    /// Dirty extents of the listing part.
    #[arg(long, default_value_t = 1_000_000)]
    pub extents: u64,
    /// Rounds of each part (medians).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Skip the creation part.
    #[arg(long)]
    pub no_create: bool,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn sparse(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(size)
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// One round of the creation part at cluster size `cs`: (ours, QEMU's).
fn create_round(dir: &Path, disk: u64, cs: u64) -> Result<(Duration, Duration), String> {
    let (raw, img) = (dir.join("ours.raw"), dir.join("ours.qcow2"));
    let (raw2, img2) = (dir.join("qemu.raw"), dir.join("qemu.qcow2"));
    for p in [&raw, &img, &raw2, &img2] {
        let _ = std::fs::remove_file(p);
    }
    sparse(&raw, disk)?;
    sparse(&raw2, disk)?;
    let name = raw
        .to_str()
        .ok_or("the directory is not UTF-8")?
        .to_string();
    let start = Instant::now();
    let st = BitmapStore::create_with_data_file(
        FileStorage::create(&img).map_err(|e| e.to_string())?,
        disk,
        cs,
        &name,
    )
    .map_err(|e| e.to_string())?;
    drop(st);
    let ours = start.elapsed();
    let start = Instant::now();
    run_ok(
        Command::new("qemu-img").args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!(
                "cluster_size={cs},data_file={},data_file_raw=on,preallocation=metadata",
                raw2.display()
            ),
            &img2.display().to_string(),
            &disk.to_string(),
        ]),
        "qemu-img create",
    )?;
    let qemu = start.elapsed();
    let same = std::fs::metadata(&img).map(|m| m.len()).ok()
        == std::fs::metadata(&img2).map(|m| m.len()).ok();
    if !same {
        return Err("our image and qemu-img's differ in length".into());
    }
    for p in [&raw, &img, &raw2, &img2] {
        let _ = std::fs::remove_file(p);
    }
    Ok((ours, qemu))
}

/// One round of the listing part: (ours, QEMU's), after checking both outputs agree.
fn list_round(dir: &Path, img: &Path) -> Result<(Duration, Duration), String> {
    let (a, b) = (dir.join("dump.txt"), dir.join("nbdinfo.txt"));
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let start = Instant::now();
    let out = std::fs::File::create(&a).map_err(|e| e.to_string())?;
    let st = Command::new(exe)
        .args(["dump", &img.display().to_string(), "--since", "b"])
        .stdout(out)
        .status()
        .map_err(|e| e.to_string())?;
    let ours = start.elapsed();
    if !st.success() {
        return Err("dbm dump failed".into());
    }
    let sock = dir.join("nbd.sock");
    let _ = std::fs::remove_file(&sock);
    let start = Instant::now();
    let mut server = Command::new("qemu-nbd")
        .args(["-t", "-r", "-f", "qcow2", "-B", "b", "-k"])
        .arg(&sock)
        .arg(img)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("qemu-nbd: {e}"))?;
    // Listening, not only bound: its socket file appears before it listens, and a client
    // in between is refused. The probe's connection ends at once (hence `-t`: a server
    // that ended after its first client would serve nobody else).
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if let Ok(Some(status)) = server.try_wait() {
            return Err(format!("qemu-nbd exited at its start: {status}"));
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = server.kill();
            return Err("qemu-nbd did not start".into());
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let out = std::fs::File::create(&b).map_err(|e| e.to_string())?;
    let st = Command::new("nbdinfo")
        .arg("--map=qemu:dirty-bitmap:b")
        .arg(format!("nbd+unix:///?socket={}", sock.display()))
        .stdout(out)
        .status();
    let qemu = start.elapsed();
    let _ = server.kill();
    let _ = server.wait();
    if !st.map_err(|e| format!("nbdinfo: {e}"))?.success() {
        return Err("nbdinfo failed".into());
    }
    let (x, y) = (
        std::fs::read(&a).map_err(|e| e.to_string())?,
        std::fs::read(&b).map_err(|e| e.to_string())?,
    );
    if x != y {
        return Err("dbm dump and nbdinfo --map printed different rows".into());
    }
    Ok((ours, qemu))
}

/// Runs `dbm bench backup`.
pub fn run(args: &BackupArgs) -> CmdResult {
    if args.repeat == 0 || !args.disk_size.is_multiple_of(2 << 20) || args.disk_size == 0 {
        return Err("--repeat must be at least 1 and --disk-size a multiple of 2 MiB".into());
    }
    let work = WorkDir::given_or_temp(args.dir.as_deref())?;
    let dir = work.path();
    emit(&format!(
        "# dbm bench backup\n\n- machine: {}\n- load average (1, 5, 15 min) at the start: {}\n\
         - disk {} ({} bytes), {} rounds, medians; files in {}\n\
         - reproduce: `cargo run --release -- bench backup --disk-size {} --extents {} \
         --repeat {}`\n\n",
        machine(),
        loadavg(),
        human(args.disk_size),
        args.disk_size,
        args.repeat,
        dir.display(),
        args.disk_size,
        args.extents,
        args.repeat,
    ))?;
    if !args.no_create {
        emit(
            "## Attaching a raw disk\n\n| cluster size | L2 tables | ours: `create_with_data_file` ms | \
             `qemu-img create … preallocation=metadata` ms | ours / QEMU |\n|---|---|---|---|---|\n",
        )?;
        for cs in [64u64 << 10, 2 << 20] {
            crate::out::errln!("dbm bench backup: creating at {} clusters", human(cs));
            let mut r = (Vec::new(), Vec::new());
            for _ in 0..args.repeat {
                let (o, q) = create_round(dir, args.disk_size, cs)?;
                r.0.push(o);
                r.1.push(q);
            }
            let (o, q) = (median(r.0), median(r.1));
            let l2 = args.disk_size.div_ceil(cs) * 8;
            emit(&format!(
                "| {} | {} | {} | {} | {:.2} |\n",
                human(cs),
                human(l2),
                ms(o),
                ms(q),
                o.as_secs_f64() / q.as_secs_f64().max(1e-9)
            ))?;
        }
        emit("\n")?;
    }
    crate::out::errln!("dbm bench backup: a bitmap with {} extents", args.extents);
    let img = dir.join("extents.qcow2");
    let _ = std::fs::remove_file(&img);
    let mut st = BitmapStore::create(FileStorage::create(&img)?, args.disk_size, 65536)?;
    st.add("b", 65536, Recording::Enabled)?;
    st.activate()?;
    let t = st.tracker()?;
    let step = (args.disk_size / args.extents.max(1)).max(2 * 65536) / 65536 * 65536;
    let mut n = 0u64;
    let mut off = 0u64;
    while n < args.extents && off < args.disk_size {
        t.mark(off, 65536);
        off += step;
        n += 1;
    }
    drop(t);
    st.inactivate()?;
    drop(st);
    emit(&format!(
        "## Listing what changed: {n} dirty extents of one granule\n\n| round | `dbm dump --since b` ms | \
         `qemu-nbd -B b` + `nbdinfo --map` ms | ours / QEMU |\n|---|---|---|---|\n"
    ))?;
    let mut r = (Vec::new(), Vec::new());
    for k in 0..args.repeat {
        let (o, q) = list_round(dir, &img)?;
        emit(&format!(
            "| {} | {} | {} | {:.2} |\n",
            k + 1,
            ms(o),
            ms(q),
            o.as_secs_f64() / q.as_secs_f64().max(1e-9)
        ))?;
        r.0.push(o);
        r.1.push(q);
    }
    let (o, q) = (median(r.0), median(r.1));
    emit(&format!(
        "| median | {} | {} | {:.2} |\n\n- both printed the same {} rows, byte for byte\n\
         - load average at the end: {}\n",
        ms(o),
        ms(q),
        o.as_secs_f64() / q.as_secs_f64().max(1e-9),
        std::fs::read_to_string(dir.join("dump.txt"))
            .map(|s| s.lines().count())
            .unwrap_or(0),
        loadavg()
    ))?;
    let _ = std::fs::remove_file(&img);
    Ok(std::process::ExitCode::SUCCESS)
}
