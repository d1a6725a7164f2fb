//! The SIGKILL drill: `dbm workload --log` on a fresh image, killed at seeded random moments
//! (during background flushes, during `prepare_stop`, during and after `inactivate`).
//! After every kill:
//! - `dbm info` and the library agree on the bitmap's state, and it is either inconsistent
//!   or consistent and equal to the logged marks (every logged mark covered, nothing else);
//!   killed before the stop began it must be inconsistent, and after `inactivated` was
//!   printed it must be consistent;
//! - `qemu-img check` finds no corruption (exit 0, or 3 for leaks), and `dbm check` exits
//!   as it does;
//! - QEMU agrees: `qemu-img info` lists the bitmap without `in-use` exactly when we call it
//!   consistent (an inconsistent one is listed `in-use` or, autoclear bit 0 clear, not at
//!   all), and a consistent one reads the same through `qemu-nbd -B` + `nbdinfo --map`.
//!
//! One run completes and is checked the same way.
//!
//! CI runs a handful of kills; `DBM_KILL_DRILL=N` runs N. The seed is printed; rerun with
//! `DBM_TEST_SEED=<seed>`. A missing QEMU tool fails the test.

mod common;

use dirty_bitmap::OpenMode;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::qemu::{self, nbd_dirty, p};
use common::seeded_rng;
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapState, BitmapStore, DirtyBitmap};
use rand::rngs::SmallRng;
use rand::RngExt;
use serde_json::Value;

const DISK: u64 = 1 << 40;
const GRANULARITY: u64 = 64 << 10;
const NAME: &str = "b";
/// Seconds of writes per run: short, but many background flushes (every 20 ms).
const DURATION: &str = "0.6";
const FLUSH_MS: &str = "20";
/// Kills in CI when `DBM_KILL_DRILL` is not set.
const CI_KILLS: usize = 6;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `dbm` to completion; it must not have panicked.
fn dbm(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args(args)
        .output()
        .expect("failed to run dbm");
    assert_ne!(out.status.code(), Some(101), "dbm {args:?} panicked");
    out
}

fn dbm_ok(args: &[&str]) -> String {
    let out = dbm(args);
    assert!(
        out.status.success(),
        "dbm {args:?}: {:?}\n{}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A fresh 1 TiB bitmap-only image with one enabled bitmap.
fn fresh(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.qcow2");
    dbm_ok(&["create", p(&img), "--size", "1T"]);
    dbm_ok(&["bitmap", p(&img), "--add", NAME]);
    img
}

/// When to send SIGKILL.
#[derive(Debug, Clone, Copy)]
enum Kill {
    /// This long after the start.
    At(Duration),
    /// This long after the workload printed this progress line.
    After(&'static str, Duration),
    /// Let it finish.
    Never,
}

/// What one workload run left.
struct Run {
    status: ExitStatus,
    /// The progress lines printed before the end.
    lines: Vec<String>,
    stderr: String,
}

impl Run {
    fn killed(&self) -> bool {
        self.status.signal() == Some(9)
    }

    fn saw(&self, line: &str) -> bool {
        self.lines.iter().any(|l| l == line)
    }
}

fn workload(img: &Path, log: &Path, seed: u64, kill: Kill) -> Run {
    workload_with(img, log, seed, kill, &[])
}

fn workload_with(img: &Path, log: &Path, seed: u64, kill: Kill, extra: &[&str]) -> Run {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args([
            "workload",
            p(img),
            "--bitmap",
            NAME,
            "--duration",
            DURATION,
            "--flush-interval",
            FLUSH_MS,
            "--log",
            p(log),
            "--seed",
            &seed.to_string(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start dbm workload");
    let start = Instant::now();
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    // The progress line a kill waited for and never saw.
    let mut missed = None;
    match kill {
        Kill::At(d) => {
            std::thread::sleep(d.saturating_sub(start.elapsed()));
            // SIGKILL on Unix; harmless if the process has already exited (still a zombie).
            child.kill().unwrap();
        }
        Kill::After(what, d) => {
            let mut hit = false;
            while let Ok(line) = rx.recv() {
                hit = line == what;
                lines.push(line);
                if hit {
                    std::thread::sleep(d);
                    break;
                }
            }
            child.kill().unwrap();
            if !hit {
                missed = Some(what);
            }
        }
        Kill::Never => {}
    }
    let status = child.wait().unwrap();
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    // Without the line (renamed, or never printed) the run was not killed where the caller
    // asked: it ran to its end, and would pass as a drill that killed nothing there.
    if let Some(what) = missed {
        panic!("dbm workload ({status:?}) never printed {what:?}: {lines:?}\n{stderr}");
    }
    Run {
        status,
        lines,
        stderr,
    }
}

/// The logged marks. Only the last line may lack its newline (a write(2) the kill cut
/// short, whose mark was never made); it is skipped.
fn read_log(log: &Path) -> Vec<(u64, u64)> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let s = String::from_utf8(bytes).expect("the log is ASCII");
    let complete = match s.rfind('\n') {
        Some(i) => &s[..=i],
        None => "",
    };
    complete
        .lines()
        .map(|l| {
            let (o, n) = l
                .split_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            (o.parse().unwrap(), n.parse().unwrap())
        })
        .collect()
}

fn expected_extents(marks: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let bm = DirtyBitmap::new(DISK, GRANULARITY).unwrap();
    for &(o, n) in marks {
        bm.mark_dirty(o, n);
    }
    bm.dirty_extents().collect()
}

/// Checks what a run left; returns the bitmap's extents when it is consistent.
fn check_after(img: &Path, log: &Path, run: &Run, what: &str) -> Option<Vec<(u64, u64)>> {
    let marks = read_log(log);
    let ctx = format!(
        "{what}: status {:?}, {} logged marks, progress {:?}, stderr {:?}",
        run.status,
        marks.len(),
        run.lines,
        run.stderr
    );
    assert!(
        run.killed() || run.status.success(),
        "{ctx}: neither killed nor successful"
    );

    // QEMU: no corruption; leaks are allowed. Our check agrees.
    let q = qemu::run("qemu-img", &["check", "-f", "qcow2", p(img)]);
    let qcode = q.status.code().unwrap();
    assert!(
        qcode == 0 || qcode == 3,
        "{ctx}: qemu-img check exit {qcode}: {}{}",
        text(&q.stdout),
        text(&q.stderr)
    );
    let ours = dbm(&["check", p(img)]).status.code();
    assert_eq!(
        ours,
        Some(qcode),
        "{ctx}: dbm check disagrees with qemu-img"
    );

    // dbm info and the library agree on the state.
    let info: Value = serde_json::from_str(&dbm_ok(&["info", "--json", p(img)])).unwrap();
    let b = &info["bitmaps"][0];
    assert_eq!(b["name"], NAME, "{ctx}");
    let info_consistent = match b["state"].as_str() {
        Some("consistent") => true,
        Some("inconsistent") => false,
        other => panic!("{ctx}: state {other:?}"),
    };
    let store = BitmapStore::open(
        FileStorage::open(img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let list = store.list();
    assert_eq!(list.len(), 1, "{ctx}");
    let consistent = list[0].state == BitmapState::Consistent;
    assert_eq!(
        consistent, info_consistent,
        "{ctx}: dbm info and the library"
    );

    eprintln!(
        "{what}: killed {}, {} marks logged, last progress {:?}, {}, qemu-img check {qcode}",
        run.killed(),
        marks.len(),
        run.lines.last().map(String::as_str).unwrap_or(""),
        if consistent {
            "consistent"
        } else {
            "inconsistent"
        },
    );
    if run.saw("inactivated") {
        assert!(consistent, "{ctx}: inactivate completed but not consistent");
    }
    if !run.saw("stopping") && !marks.is_empty() {
        assert!(
            !consistent,
            "{ctx}: killed while active with marks logged, yet consistent"
        );
    }
    // QEMU's view of the same image decides too: what we call inconsistent QEMU must not
    // trust (listed with `in-use`, or not listed at all: autoclear bit 0 clear makes it
    // ignore the bitmaps extension), else `qemu-nbd -B` would export a false clean; what we
    // call consistent it lists without `in-use` and exports with our bits.
    let listed = qemu::qemu_bitmaps(img);
    let qemu_trusts = listed
        .iter()
        .any(|(n, _, flags)| n == NAME && !flags.iter().any(|f| f == "in-use"));
    assert_eq!(
        qemu_trusts, consistent,
        "{ctx}: qemu-img info lists {listed:?}, we say consistent = {consistent}"
    );
    if !consistent {
        // `in_use` may read clear here: a kill inside inactivate's autoclear dance leaves the
        // directory untrusted (autoclear bit 0 clear) instead.
        assert!(b["dirty-bytes"].is_null(), "{ctx}: {b}");
        return None;
    }
    // Consistent: every logged mark was made before inactivate, and nothing else was; QEMU
    // reads the same bits.
    let got: Vec<(u64, u64)> = store.load(NAME).unwrap().dirty_extents().collect();
    assert_eq!(got, expected_extents(&marks), "{ctx}: bits != logged marks");
    assert_eq!(
        nbd_dirty(img, NAME),
        got,
        "{ctx}: nbdinfo --map differs from our reader"
    );
    let dirty: u64 = got.iter().map(|e| e.1).sum();
    assert_eq!(b["dirty-bytes"].as_u64(), Some(dirty), "{ctx}");
    Some(got)
}

/// The kill for drill run `i`: cycles through the phases, with a random delay in each.
fn pick(i: usize, rng: &mut SmallRng) -> Kill {
    let ms = |rng: &mut SmallRng, max: u64| Duration::from_micros(rng.random_range(0..max * 1000));
    match i % 5 {
        // Anywhere in the run; one in four within activation and the first flush.
        0 if rng.random_bool(0.25) => Kill::At(ms(rng, 15)),
        0 => Kill::At(ms(rng, 700)),
        // The early background flushes (the first one allocates every cluster).
        1 => Kill::After("activated", ms(rng, 60)),
        // prepare_stop, with the writes still going.
        2 => Kill::After("stopping", ms(rng, 60)),
        // inactivate (a few ms), and just after it.
        3 => Kill::After("inactivating", ms(rng, 3)),
        // Once inactivate returned: the bitmap must be consistent and equal the log.
        _ => Kill::After("inactivated", ms(rng, 1)),
    }
}

#[test]
fn sigkill_drill() {
    let kills = common::env_number("DBM_KILL_DRILL", CI_KILLS);
    // Fewer kills than phases could leave the assertions below without a case to see.
    assert!(
        kills >= 5,
        "DBM_KILL_DRILL={kills}: the drill needs at least 5 kills"
    );
    let (mut rng, _) = seeded_rng("sigkill_drill");
    let (mut consistent, mut inconsistent) = (0, 0);
    for i in 0..kills {
        let dir = tempfile::tempdir().unwrap();
        let img = fresh(dir.path());
        let log = dir.path().join("marks.log");
        let kill = pick(i, &mut rng);
        let run = workload(&img, &log, rng.random(), kill);
        let what = format!("kill {i} ({kill:?})");
        match check_after(&img, &log, &run, &what) {
            Some(_) => consistent += 1,
            None => inconsistent += 1,
        }
    }
    eprintln!(
        "sigkill_drill: {kills} kills: {inconsistent} left inconsistent, {consistent} consistent"
    );
    // The phases above make both outcomes occur: a kill during the run leaves `in_use`, and
    // one after inactivate returned leaves the bitmap consistent, equal to the log
    // (`check_after` compares them).
    assert!(inconsistent > 0, "no kill left the bitmap inconsistent");
    assert!(consistent > 0, "no kill left the bitmap consistent");
}

#[test]
fn completed_run_matches_the_log_and_nbdinfo() {
    let (mut rng, _) = seeded_rng("completed_run_matches_the_log_and_nbdinfo");
    let dir = tempfile::tempdir().unwrap();
    let img = fresh(dir.path());
    let log = dir.path().join("marks.log");
    let run = workload(&img, &log, rng.random(), Kill::Never);
    assert!(run.status.success(), "{:?} {}", run.status, run.stderr);
    for line in ["activated", "stopping", "inactivating", "inactivated"] {
        assert!(run.saw(line), "missing {line:?} in {:?}", run.lines);
    }
    let stop = run
        .lines
        .iter()
        .find(|l| l.starts_with("stop: rounds "))
        .unwrap_or_else(|| panic!("no stop line in {:?}", run.lines));
    assert!(stop.contains("syncs") && stop.contains("ms"), "{stop}");
    assert!(
        run.lines
            .iter()
            .any(|l| l.starts_with("background flushes: ")
                && !l.starts_with("background flushes: 0,")),
        "no background flush in {:?}",
        run.lines
    );
    // check_after compares nbdinfo --map with our reader for every consistent image.
    check_after(&img, &log, &run, "completed run").expect("consistent after a run");
    assert!(read_log(&log).len() > 1000, "too few marks logged");
    assert!(
        std::fs::read(&log).unwrap().ends_with(b"\n"),
        "a completed run leaves whole lines"
    );
}

/// A missing, disabled or inconsistent bitmap, or bad numbers, fail with status 1 before
/// the image is touched.
#[test]
fn refuses_what_it_cannot_run() {
    let dir = tempfile::tempdir().unwrap();
    let img = fresh(dir.path());
    let before = std::fs::read(&img).unwrap();
    let fails = |args: &[&str], says: &str| {
        let mut all = vec!["workload", p(&img), "--duration", "0.1"];
        all.extend(args);
        let out = dbm(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    };
    fails(&["--bitmap", "nope"], "bitmap \"nope\" not found");
    fails(&["--bitmap", NAME, "--rate", "0"], "--rate");
    fails(&["--bitmap", NAME, "--duration=-1"], "--duration");
    fails(&["--bitmap", NAME, "--duration", "NaN"], "--duration");
    let log_in_missing_dir = dir.path().join("no/such/dir/marks.log");
    fails(
        &["--bitmap", NAME, "--log", p(&log_in_missing_dir)],
        "marks.log",
    );
    assert_eq!(std::fs::read(&img).unwrap(), before, "a refused run wrote");
    dbm_ok(&["bitmap", p(&img), "--disable", NAME]);
    let disabled = std::fs::read(&img).unwrap();
    fails(&["--bitmap", NAME], "disabled");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        disabled,
        "the refusal of a disabled bitmap wrote"
    );
    // An inconsistent bitmap: kill a run while it is active.
    dbm_ok(&["bitmap", p(&img), "--enable", NAME]);
    let log = dir.path().join("marks.log");
    let run = workload(&img, &log, 1, Kill::After("activated", Duration::ZERO));
    assert!(run.killed());
    assert!(check_after(&img, &log, &run, "killed at activation").is_none());
    let inconsistent = std::fs::read(&img).unwrap();
    fails(&["--bitmap", NAME], "inconsistent");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        inconsistent,
        "the refusal of an inconsistent bitmap wrote"
    );
}

/// Durable mode's drill, QEMU the judge: `dbm workload --durable` logs each write only
/// after its intent returned; killed at random moments after it activated, the image holds
/// the bitmap without `in_use` (`qemu-img info`), `qemu-nbd -B` + `nbdinfo --map` shows
/// every logged write dirty, and `qemu-img check` finds nothing (the clusters were all
/// allocated before `activated`).
#[test]
fn durable_sigkill_drill_qemu_finds_every_logged_write() {
    let kills = common::env_number("DBM_KILL_DRILL", 4usize);
    assert!(kills > 0, "DBM_KILL_DRILL=0 runs no kill");
    let (mut rng, _) = seeded_rng("durable_sigkill_drill");
    let (mut logged, mut killed) = (0, 0);
    for i in 0..kills {
        let dir = tempfile::tempdir().unwrap();
        let img = fresh(dir.path());
        let log = dir.path().join("marks.log");
        let delay = Duration::from_micros(rng.random_range(0..400_000));
        let run = workload_with(
            &img,
            &log,
            rng.random(),
            Kill::After("activated", delay),
            &["--durable", "--rate", "20000"],
        );
        let marks = read_log(&log);
        let ctx = format!(
            "kill {i} {delay:?} after activated: status {:?}, {} logged, {:?}, {}",
            run.status,
            marks.len(),
            run.lines,
            run.stderr
        );
        assert!(run.killed() || run.status.success(), "{ctx}");
        let q = qemu::run("qemu-img", &["check", "-f", "qcow2", p(&img)]);
        assert_eq!(q.status.code(), Some(0), "{ctx}: {}", text(&q.stdout));
        let listed = qemu::qemu_bitmaps(&img);
        assert_eq!(listed.len(), 1, "{ctx}");
        assert!(
            !listed[0].2.iter().any(|f| f == "in-use"),
            "{ctx}: {:?}",
            listed[0]
        );
        let dirty = DirtyBitmap::new(DISK, GRANULARITY).unwrap();
        for (o, n) in nbd_dirty(&img, NAME) {
            dirty.mark_dirty(o, n);
        }
        let lost = marks.iter().filter(|&&(o, _)| !dirty.is_dirty(o)).count();
        eprintln!(
            "durable kill {i}: {delay:?} after activated, killed {}, {} writes logged, {lost} \
             missing in nbdinfo --map",
            run.killed(),
            marks.len()
        );
        assert_eq!(lost, 0, "{ctx}: logged writes missing from the bitmap");
        logged += marks.len();
        killed += usize::from(run.killed());
    }
    assert!(logged > 0, "no kill came after a logged write");
    // A kill lands within 400 ms of `activated` in a 600 ms run: a drill in which every run
    // ended on its own tested no kill at all.
    assert!(killed > 0, "none of the {kills} runs was killed");
}

/// A progress line that cannot be written (stdout on a full disk) does not end the run:
/// ended at the first line with the store active, it would leave the bitmap `in_use` (a
/// full backup next), and after the stop exit with status 1 though the stop had committed.
/// The run goes on, losing its lines with one warning; the bitmap ends consistent and holds
/// what it marked; both modes.
#[test]
fn a_stdout_that_cannot_be_written_does_not_end_the_run() {
    for durable in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let img = fresh(dir.path());
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let mut args = vec![
            "workload",
            p(&img),
            "--bitmap",
            NAME,
            "--duration",
            "0.2",
            "--rate",
            "2000",
        ];
        if durable {
            args.push("--durable");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_dbm"))
            .args(&args)
            .stdout(full)
            .stderr(std::process::Stdio::piped())
            .output()
            .expect("failed to run dbm");
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "durable {durable}: {err}");
        assert_eq!(
            err.matches("progress lines are lost").count(),
            1,
            "durable {durable}: {err}"
        );
        let info = dbm_ok(&["info", "--json", p(&img)]);
        let v: serde_json::Value = serde_json::from_str(&info).unwrap();
        let b = &v["bitmaps"][0];
        assert_eq!(b["in-use"], false, "durable {durable}: {info}");
        assert!(
            b["dirty-bytes"].as_u64().is_some_and(|d| d > 0),
            "durable {durable}: {info}"
        );
    }
}
