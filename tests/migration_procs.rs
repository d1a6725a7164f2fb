//! The source and the destination of a migration as two `dbm` processes over TCP, on one
//! image file with QEMU's locks on (`dbm migrate send` and `dbm migrate listen`). Each
//! process opens the image itself; they share nothing but the file and the socket. Judged
//! by the processes' own reports, by the library reading the image afterwards, and by
//! QEMU's tools (`qemu-img`, `qemu-nbd` + `nbdinfo`): a missing tool fails the test.

mod common;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::qemu::{assert_qemu_clean, nbd_dirty, p, qemu_bitmaps, qemu_bitmaps_shared, run};
use dirty_bitmap::storage::FileStorage;
use dirty_bitmap::{BitmapStore, OpenMode};

/// Long enough for a loaded 2-core machine; a hang fails the test after it.
const WAIT: Duration = Duration::from_secs(120);

/// A running `dbm`: its stdout lines as they come, its stderr collected.
struct Proc {
    name: &'static str,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(name: &'static str, args: &[&str]) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dbm"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start dbm");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut err, sink) = (child.stderr.take().unwrap(), Arc::clone(&stderr));
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            sink.lock().unwrap().push_str(&s);
        });
        Proc {
            name,
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} stdout:\n{}\n{} stderr:\n{}",
            self.name,
            self.seen.join("\n"),
            self.name,
            self.stderr.lock().unwrap()
        )
    }

    /// The next line starting with `prefix`, skipping the others; fails after [`WAIT`] or
    /// at the end of the output.
    fn wait_for(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line {prefix:?} within {WAIT:?}\n{}", self.describe())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Let the stderr reader finish, for the message.
                    let _ = self.child.wait();
                    std::thread::sleep(Duration::from_millis(50));
                    panic!(
                        "{} ended without a line {prefix:?}\n{}",
                        self.name,
                        self.describe()
                    )
                }
            }
        }
    }

    /// Sends `sig`.
    fn signal(&self, sig: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: a plain kill(2) of our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Kills it with SIGKILL (no handler, no clean-up: a crash) and waits until it is gone.
    fn kill_hard(mut self) {
        self.signal(libc::SIGKILL);
        let status = self.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", self.describe());
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: a plain kill(2) of our own child, which has not been reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    }

    /// Waits for the exit (at most [`WAIT`]); its status and every stdout line.
    fn finish(mut self) -> (i32, Vec<String>, String) {
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {WAIT:?}\n{}",
                self.name,
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at the end of the pipe.
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(l);
        }
        std::thread::sleep(Duration::from_millis(50));
        let code = status
            .code()
            .unwrap_or_else(|| panic!("{} killed by a signal\n{}", self.name, self.describe()));
        assert!(
            !self.stderr.lock().unwrap().contains("panicked"),
            "{}",
            self.describe()
        );
        let err = self.stderr.lock().unwrap().clone();
        (code, std::mem::take(&mut self.seen), err)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dbm_ok(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dbm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A 64 GiB bitmap-only image with one enabled bitmap `b` of 64 KiB granularity, made by
/// `dbm create` and `dbm bitmap --add`.
fn new_image(dir: &Path) -> PathBuf {
    let img = dir.join("disk.qcow2");
    dbm_ok(&["create", p(&img), "--size", "64G"]);
    dbm_ok(&["bitmap", p(&img), "--add", "b"]);
    img
}

/// The `offset length` lines of a log of marks (complete lines only).
fn read_marks(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap();
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .map(|l| {
            let mut f = l.split_whitespace().map(|x| x.parse::<u64>().unwrap());
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect()
}

/// The number in `line` right after `key` (as in `key 123`).
fn number_after(line: &str, key: &str) -> u64 {
    let rest = &line[line
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} not in {line:?}"))
        + key.len()..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("no number after {key:?} in {line:?}"))
}

/// The hex word after `crc32 ` in `line`.
fn crc_in(line: &str) -> String {
    let i = line
        .find("crc32 ")
        .unwrap_or_else(|| panic!("no crc32 in {line:?}"));
    line[i + 6..].split_whitespace().next().unwrap().to_string()
}

/// After both processes are gone: bitmap `b` is consistent (QEMU lists it without
/// `in-use`), `qemu-img check` is clean, and every mark is dirty in it, as the library
/// reads the file and as `qemu-nbd` exports it.
fn assert_every_mark_on_disk(img: &Path, marks: &[(u64, u64)]) {
    let q = qemu_bitmaps(img);
    assert_eq!(q.len(), 1, "{q:?}");
    assert_eq!(q[0].0, "b");
    assert!(!q[0].2.iter().any(|f| f == "in-use"), "{q:?}");
    assert!(q[0].2.iter().any(|f| f == "auto"), "{q:?}");
    assert_qemu_clean(img);
    let s = BitmapStore::open(
        FileStorage::open(img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    let b = s.load("b").unwrap();
    let lost: Vec<_> = marks
        .iter()
        .filter(|&&(o, l)| !b.is_dirty(o) || !b.is_dirty(o + l - 1))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} marks not dirty on disk, first {:?}",
        lost.len(),
        marks.len(),
        lost.first()
    );
    drop(s);
    let extents = nbd_dirty(img, "b");
    let covered = |o: u64, l: u64| extents.iter().any(|&(s, n)| s <= o && o + l <= s + n);
    let lost: Vec<_> = marks.iter().filter(|&&(o, l)| !covered(o, l)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} marks not dirty in qemu-nbd's export, first {:?}",
        lost.len(),
        marks.len(),
        lost.first()
    );
}

/// A second writer cannot open the image: the library (QEMU's lock bytes), `dbm mark` and
/// `qemu-img info` (which takes a shared lock a writer refuses) all fail.
fn assert_held_by_a_writer(img: &Path) {
    match FileStorage::open(img, OpenMode::ReadWrite) {
        Err(dirty_bitmap::Error::Locked { .. }) => {}
        Err(e) => panic!("expected a lock conflict, got {e}"),
        Ok(_) => panic!("a second writer opened {}", img.display()),
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dbm"))
        .args(["mark", p(img), "b", "0", "4096"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lock"), "{err}");
    let out = run("qemu-img", &["info", "-f", "qcow2", p(img)]);
    assert!(!out.status.success(), "qemu-img info opened a held image");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lock"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Force-sharing, QEMU sees the holder's bitmap in use.
    let q = qemu_bitmaps_shared(img);
    assert!(q[0].2.iter().any(|f| f == "in-use"), "{q:?}");
}

/// `dbm migrate listen IMG ARGS...`, once it said where it listens: the process and the
/// address.
fn listen(img: &str, args: &[&str]) -> (Proc, String) {
    let mut all = vec!["migrate", "listen", img];
    all.extend(args);
    let mut dest = Proc::spawn("listen", &all);
    let addr = dest.wait_for("listening on ")["listening on ".len()..].to_string();
    (dest, addr)
}

/// The source's options for a small guest: 16 MiB of RAM, one vCPU, 5,000 disk writes/s.
fn send_args<'a>(img: &'a str, to: &'a str, log: &'a str, seed: &'a str) -> Vec<&'a str> {
    vec![
        "migrate",
        "send",
        img,
        "--to",
        to,
        "--guest-ram",
        "16M",
        "--vcpus",
        "1",
        "--dirty-rate",
        "4M",
        "--bitmap-writes-per-sec",
        "5000",
        "--max-bandwidth",
        "64M",
        "--warm-up",
        "0.3",
        "--timeout",
        "60",
        "--log",
        log,
        "--seed",
        seed,
    ]
}

#[test]
fn two_processes_hand_the_image_over_and_the_destination_finds_every_mark() {
    let (_, seed) = common::seeded_rng("procs_hand_over");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let marks = dir.path().join("marks.log");
    let dest_marks = dir.path().join("dest-marks.log");
    let (mut dest, addr) = listen(
        p(&img),
        &[
            "--check-log",
            p(&marks),
            "--run-for",
            "600",
            "--bitmap-writes-per-sec",
            "2000",
            "--log",
            p(&dest_marks),
            "--timeout",
            "60",
            "--seed",
            &seed,
        ],
    );
    let src = Proc::spawn("send", &send_args(p(&img), &addr, p(&marks), &seed));
    let (code, out, err) = src.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "send:\n{text}\n{err}");
    assert!(text.contains("handed over: downtime"), "{text}");
    assert!(
        text.contains("source: bitmaps handed over (store inactive, write locks released)"),
        "{text}"
    );
    let at_stop = out.iter().find(|l| l.contains("RAM at stop")).unwrap();
    let made = number_after(
        out.iter().find(|l| l.starts_with("marks: ")).unwrap(),
        "marks:",
    );
    let logged = read_marks(&marks);
    assert!(made > 0);
    assert_eq!(logged.len() as u64, made, "{text}");

    // The destination started the guest on the source's RAM and holds the image, active,
    // with every mark the source made.
    let started = dest.wait_for("guest started here");
    assert_eq!(crc_in(&started), crc_in(at_stop), "{started} / {at_stop}");
    let checked = dest.wait_for("source marks: ");
    assert_eq!(number_after(&checked, "source marks:"), made, "{checked}");
    assert!(checked.ends_with(", 0 missing"), "{checked}");
    dest.wait_for("running: ");
    assert_held_by_a_writer(&img);
    // And it writes: its own log grows.
    let deadline = Instant::now() + WAIT;
    while read_marks(&dest_marks).len() < 64 {
        assert!(Instant::now() < deadline, "the destination made no marks");
        std::thread::sleep(Duration::from_millis(20));
    }

    dest.terminate();
    let (code, out, err) = dest.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "listen:\n{text}\n{err}");
    assert!(text.contains("attempt 1: completed"), "{text}");
    assert!(
        out.iter()
            .any(|l| l.starts_with("stopped after") && l.contains("(signal)")),
        "{text}"
    );
    assert!(text.contains("marks missing on disk: 0"), "{text}");
    let mut all = logged;
    all.extend(read_marks(&dest_marks));
    assert_every_mark_on_disk(&img, &all);
}

#[test]
fn two_processes_a_refused_hand_over_fails_back_to_the_source_with_every_mark() {
    let (_, seed) = common::seeded_rng("procs_fail_back");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let marks = dir.path().join("marks.log");
    // The destination opens and activates the image, then refuses to start the guest.
    let (dest, addr) = listen(p(&img), &["--refuse", "1", "--timeout", "60"]);
    let mut args = send_args(p(&img), &addr, p(&marks), &seed);
    args.extend(["--run-for", "600"]);
    let mut src = Proc::spawn("send", &args);
    let failed = src.wait_for("hand-over failed");
    assert!(failed.contains("refused"), "{failed}");
    src.wait_for("source: took its bitmaps back (store active, write locks held)");
    src.wait_for("running here");

    let (code, out, err) = dest.finish();
    let text = out.join("\n");
    assert_eq!(code, 3, "listen:\n{text}\n{err}");
    assert!(text.contains("writable and activated it"), "{text}");
    assert!(
        text.contains("the image is inactive again, as the source left it"),
        "{text}"
    );
    assert!(text.contains("the guest did not start here"), "{text}");

    // The source holds the image again, as a writer, and its guest marks on.
    assert_held_by_a_writer(&img);
    let before = read_marks(&marks).len();
    let deadline = Instant::now() + WAIT;
    while read_marks(&marks).len() < before + 256 {
        assert!(
            Instant::now() < deadline,
            "the source made no marks after it resumed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    src.terminate();
    let (code, out, err) = src.finish();
    let text = out.join("\n");
    assert_eq!(code, 3, "send:\n{text}\n{err}");
    let last = out
        .iter()
        .find(|l| l.starts_with("stopped after"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(last.contains("(signal)"), "{last}");
    let logged = read_marks(&marks);
    assert_eq!(number_after(last, "marks"), logged.len() as u64, "{last}");
    assert!(last.contains(" 0 missing in memory"), "{last}");
    assert!(last.ends_with(" 0 missing on disk"), "{last}");
    assert_every_mark_on_disk(&img, &logged);
}

/// A probe connection that sends nothing (attempt 1), a refused hand-over (attempt 2),
/// then a retry that hands over every mark (attempt 3). The listener numbers what each
/// attempt does as its closing summary does, counting the probe: its "opened" lines name
/// attempts 2 and 3, never 1.
#[test]
fn two_processes_a_refused_hand_over_then_a_retry_that_hands_over_every_mark() {
    let (_, seed) = common::seeded_rng("procs_retry");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let marks = dir.path().join("marks.log");
    let (dest, addr) = listen(
        p(&img),
        &[
            "--refuse",
            "1",
            "--attempts",
            "3",
            "--check-log",
            p(&marks),
            "--timeout",
            "60",
        ],
    );
    drop(std::net::TcpStream::connect(&addr).unwrap());
    let mut args = send_args(p(&img), &addr, p(&marks), &seed);
    args.extend(["--attempts", "2", "--retry-after", "0.5"]);
    let src = Proc::spawn("send", &args);
    let (code, out, err) = src.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "send:\n{text}\n{err}");
    let took_back = out
        .iter()
        .position(|l| l.starts_with("source: took its bitmaps back"))
        .unwrap_or_else(|| panic!("{text}"));
    let handed = out
        .iter()
        .position(|l| l.starts_with("source: bitmaps handed over"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(took_back < handed, "{text}");
    let at_stop = out.iter().find(|l| l.contains("RAM at stop")).unwrap();
    let logged = read_marks(&marks);
    let made = number_after(
        out.iter().find(|l| l.starts_with("marks: ")).unwrap(),
        "marks:",
    );
    assert_eq!(logged.len() as u64, made, "{text}");

    let (code, out, err) = dest.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "listen:\n{text}\n{err}");
    assert!(text.contains("attempt 1: failed: "), "{text}");
    assert!(!text.contains("attempt 1: opened"), "{text}");
    assert!(text.contains("attempt 2: opened"), "{text}");
    assert!(text.contains("as told (--refuse), attempt 2,"), "{text}");
    assert!(
        text.contains("attempt 2: failed; the image is inactive again"),
        "{text}"
    );
    assert!(text.contains("attempt 3: opened"), "{text}");
    assert!(text.contains("attempt 3: completed"), "{text}");
    let started = out
        .iter()
        .find(|l| l.starts_with("guest started here"))
        .unwrap();
    assert_eq!(crc_in(started), crc_in(at_stop), "{text}");
    let checked = out.iter().find(|l| l.starts_with("source marks:")).unwrap();
    assert_eq!(number_after(checked, "source marks:"), made, "{checked}");
    assert!(checked.ends_with(", 0 missing"), "{checked}");
    assert!(text.contains("marks missing on disk: 0"), "{text}");
    assert_every_mark_on_disk(&img, &logged);
}

/// After a fail-back, `send` runs its further `--attempts` in the same migration (the same
/// session), not as a new one: a listener that outlived the unknown outcome (its answer
/// came after the source stopped waiting) keeps the first attempt's RAM for that migration
/// and refuses every Hello that does not resume it, so no attempt of a new session could
/// complete. The session is kept: this listener resumes, and a new one would start afresh.
#[test]
fn two_processes_a_fail_back_then_a_retry_to_the_listener_that_outlived_it_hands_over() {
    let (_, seed) = common::seeded_rng("procs_fail_back_retry");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let marks = dir.path().join("marks.log");
    let (mut dest, addr) = listen(
        p(&img),
        &[
            "--refuse",
            "1",
            "--attempts",
            "2",
            "--test-stall-after-activate",
            "3",
            "--timeout",
            "60",
        ],
    );
    let mut args = send_args(p(&img), &addr, p(&marks), &seed);
    // The source waits 1 s for each answer: the listener's comes 3 s after its activation.
    let t = args.iter().position(|a| *a == "--timeout").unwrap();
    args[t + 1] = "1";
    args.extend([
        "--attempts",
        "2",
        "--retry-after",
        "0.5",
        "--fail-back-on-signal",
    ]);
    let mut src = Proc::spawn("send", &args);
    dest.wait_for("attempt 1: test hook: activated");
    let unknown = src.wait_for("hand-over outcome unknown");
    assert!(unknown.contains("waiting for the verdict"), "{unknown}");
    // The listener refuses (too late for the source to hear it) and puts the image back
    // as the source left it; it lives on, keeping the attempt's RAM.
    dest.wait_for("attempt 1: failed; the image is inactive again");
    src.signal(libc::SIGUSR1);
    src.wait_for("source: took its bitmaps back from the dead destination");
    let (code, out, err) = src.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "send:\n{text}\n{err}");
    assert!(
        out.iter()
            .any(|l| l.starts_with("source: bitmaps handed over")),
        "{text}"
    );
    let (code, out, err) = dest.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "listen:\n{text}\n{err}");
    assert!(text.contains("attempt 2: completed"), "{text}");
    assert_every_mark_on_disk(&img, &read_marks(&marks));
}

/// A destination process that activated the image and is killed (SIGKILL) before it
/// answers Started, the source waiting with `--fail-back-on-signal`: started with the test
/// hook of `listen`, killed once it says it activated; the source told (SIGUSR1) that it
/// died. `extra` goes to `send`. Returns the two processes' state: the source, waiting for
/// its reclaim to be judged.
fn crash_the_destination_after_it_activated(
    img: &Path,
    marks: &Path,
    seed: &str,
    extra: &[&str],
) -> Proc {
    let (mut dest, addr) = listen(p(img), &["--test-crash-after-activate", "--timeout", "60"]);
    let mut args = send_args(p(img), &addr, p(marks), seed);
    args.extend(["--fail-back-on-signal", "--run-for", "600"]);
    args.extend(extra);
    let mut src = Proc::spawn("send", &args);
    dest.wait_for("attempt 1: opened");
    dest.wait_for("attempt 1: test hook: activated");
    // The destination holds the image, activated: its write locks, the bitmap in use.
    assert_held_by_a_writer(img);
    dest.kill_hard();
    // It died without a word: the in_use flags it set stay on disk, its locks went with it.
    let q = qemu_bitmaps(img);
    assert!(q[0].2.iter().any(|f| f == "in-use"), "{q:?}");
    let unknown = src.wait_for("hand-over outcome unknown");
    assert!(unknown.contains("waiting for the verdict"), "{unknown}");
    // The source waits stopped: its guest makes no marks.
    let n = read_marks(marks).len();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(read_marks(marks).len(), n, "the source's guest ran on");
    src
}

#[test]
fn two_processes_a_destination_killed_after_activating_fails_back_then_a_new_pair_hands_over() {
    let (_, seed) = common::seeded_rng("procs_dest_crash");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let marks = dir.path().join("marks.log");
    let mut src = crash_the_destination_after_it_activated(&img, &marks, &seed, &[]);
    // The operator's word: the destination is gone. The only difference on disk is the
    // in_use flags: the source takes the image back and resumes with every mark.
    src.signal(libc::SIGUSR1);
    src.wait_for("verdict: the destination is gone");
    src.wait_for("source: took its bitmaps back from the dead destination");
    src.wait_for("running here");
    assert_held_by_a_writer(&img);
    let before = read_marks(&marks).len();
    let deadline = Instant::now() + WAIT;
    while read_marks(&marks).len() < before + 256 {
        assert!(
            Instant::now() < deadline,
            "the source made no marks after it resumed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    src.terminate();
    let (code, out, err) = src.finish();
    let text = out.join("\n");
    assert_eq!(code, 3, "send:\n{text}\n{err}");
    let last = out
        .iter()
        .find(|l| l.starts_with("stopped after"))
        .unwrap_or_else(|| panic!("{text}"));
    let logged = read_marks(&marks);
    assert_eq!(number_after(last, "marks"), logged.len() as u64, "{last}");
    assert!(last.contains(" 0 missing in memory"), "{last}");
    assert!(last.ends_with(" 0 missing on disk"), "{last}");
    // Not left locked: a writer opens it, and QEMU's tools read it without force-sharing.
    drop(FileStorage::open(&img, OpenMode::ReadWrite).unwrap());
    assert_every_mark_on_disk(&img, &logged);

    // A new pair hands over, and the destination finds every mark of both runs.
    let marks2 = dir.path().join("marks2.log");
    let (dest, addr) = listen(p(&img), &["--check-log", p(&marks2), "--timeout", "60"]);
    let src = Proc::spawn("send", &send_args(p(&img), &addr, p(&marks2), &seed));
    let (code, out, err) = src.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "send:\n{text}\n{err}");
    assert!(text.contains("source: bitmaps handed over"), "{text}");
    let (code, out, err) = dest.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "listen:\n{text}\n{err}");
    let checked = out.iter().find(|l| l.starts_with("source marks:")).unwrap();
    assert!(checked.ends_with(", 0 missing"), "{checked}");
    assert!(text.contains("marks missing on disk: 0"), "{text}");
    let mut all = logged;
    all.extend(read_marks(&marks2));
    assert_every_mark_on_disk(&img, &all);
}

/// A SIGINT while `send` waits `--retry-after` before its next attempt is seen during the
/// wait, not only before it: otherwise the next attempt would start, a hand-over against
/// the operator's stop. The stop ends the wait at once, no attempt starts, and the resumed
/// guest stops as at the end of its run, every mark on disk.
#[test]
fn two_processes_a_stop_during_the_retry_wait_starts_no_further_attempt() {
    let (_, seed) = common::seeded_rng("procs_stop_in_retry_wait");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let marks = dir.path().join("marks.log");
    let extra = ["--attempts", "2", "--retry-after", "30"];
    let mut src = crash_the_destination_after_it_activated(&img, &marks, &seed, &extra);
    // The verdict installs the handlers: from then on SIGINT is a stop request.
    src.signal(libc::SIGUSR1);
    src.wait_for("source: took its bitmaps back from the dead destination");
    src.wait_for("retrying in 30 s");
    let asked = Instant::now();
    src.signal(libc::SIGINT);
    src.wait_for("stop requested (SIGINT or SIGTERM): no further attempts");
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "the stop waited for the retry: {:?}",
        asked.elapsed()
    );
    let (code, out, err) = src.finish();
    let text = out.join("\n");
    assert_eq!(code, 3, "send:\n{text}\n{err}");
    assert!(!text.contains("(attempt 2 of 2)"), "{text}");
    let last = out
        .iter()
        .find(|l| l.starts_with("stopped after"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(last.contains("(signal)"), "{last}");
    let logged = read_marks(&marks);
    assert_eq!(number_after(last, "marks"), logged.len() as u64, "{last}");
    assert!(last.ends_with(" 0 missing on disk"), "{last}");
    drop(FileStorage::open(&img, OpenMode::ReadWrite).unwrap());
    assert_every_mark_on_disk(&img, &logged);
}

/// SIGTERM to `send` once it holds the image active but before any wait for a verdict:
/// in the warm-up, during an attempt (cancelled at its next turn) and in the
/// `--retry-after` wait after a refused hand-over. Each killed
/// the process with the image `in_use` (every bitmap of the chain then all dirty); each is
/// now a stop request: no attempt starts, the guest stops, and the image is inactivated
/// with every mark on disk.
#[test]
fn two_processes_a_stop_before_any_verdict_inactivates_the_source() {
    let (_, seed) = common::seeded_rng("procs_stop_before_verdict");
    let seed = seed.to_string();
    for case in ["warm-up", "attempt", "retry wait"] {
        let dir = tempfile::tempdir().unwrap();
        let img = new_image(dir.path());
        let marks = dir.path().join("marks.log");
        let refuse: &[&str] = if case != "retry wait" {
            &["--timeout", "60"]
        } else {
            &["--refuse", "1", "--attempts", "2", "--timeout", "60"]
        };
        let (dest, addr) = listen(p(&img), refuse);
        let mut args = send_args(p(&img), &addr, p(&marks), &seed);
        if case == "warm-up" {
            let w = args.iter().position(|a| *a == "--warm-up").unwrap();
            args[w + 1] = "60";
        } else if case == "attempt" {
            // 16 MiB at 1 MiB/s: an attempt of 16 s at least.
            let w = args.iter().position(|a| *a == "--max-bandwidth").unwrap();
            args[w + 1] = "1M";
            args.extend(["--attempts", "2", "--retry-after", "60"]);
        } else {
            args.extend(["--attempts", "2", "--retry-after", "60"]);
        }
        let mut src = Proc::spawn("send", &args);
        if case == "warm-up" {
            src.wait_for("guest: ");
            // Some marks first.
            std::thread::sleep(Duration::from_millis(300));
        } else if case == "attempt" {
            src.wait_for("migrating to ");
            std::thread::sleep(Duration::from_millis(500));
        } else {
            src.wait_for("retrying in 60 s");
        }
        let asked = Instant::now();
        src.terminate();
        src.wait_for("stop requested (SIGINT or SIGTERM): no further attempts");
        assert!(asked.elapsed() < Duration::from_secs(20), "{case}");
        let (code, out, err) = src.finish();
        let text = out.join("\n");
        assert_eq!(code, 3, "{case}: send:\n{text}\n{err}");
        assert!(!text.contains("(attempt 2 of 2)"), "{text}");
        if case == "attempt" {
            assert!(text.contains("hand-over failed: "), "{text}");
            assert!(text.contains("cancel"), "{text}");
        }
        let last = out
            .iter()
            .find(|l| l.starts_with("stopped after"))
            .unwrap_or_else(|| panic!("{case}: {text}"));
        assert!(last.contains("(signal)"), "{last}");
        let logged = read_marks(&marks);
        assert!(!logged.is_empty(), "{case}: no marks");
        assert!(last.ends_with(" 0 missing on disk"), "{last}");
        drop(dest);
        // Inactivated: consistent and not in use, with every mark.
        let st = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
            OpenMode::ReadOnly,
        )
        .unwrap();
        assert!(
            st.list()
                .iter()
                .all(|b| b.state == dirty_bitmap::BitmapState::Consistent),
            "{case}: {:?}",
            st.list()
        );
        assert_every_mark_on_disk(&img, &logged);
    }
}

#[test]
fn two_processes_a_killed_destination_that_changed_more_than_the_flags_is_not_reclaimed() {
    let (_, seed) = common::seeded_rng("procs_dest_crash_changed");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let marks = dir.path().join("marks.log");
    let mut src = crash_the_destination_after_it_activated(&img, &marks, &seed, &[]);
    // What the dead destination wrote besides the flags: a bitmap of its own.
    {
        let mut d = BitmapStore::open(
            FileStorage::open(&img, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        d.add("theirs", 65536, dirty_bitmap::Recording::Enabled)
            .unwrap();
    }
    src.signal(libc::SIGUSR1);
    src.wait_for("verdict: the destination is gone");
    let refused = src.wait_for("source: cannot take its bitmaps back");
    assert!(refused.contains("changed while inactive"), "{refused}");
    assert!(refused.contains("the guest stays stopped"), "{refused}");
    let logged = read_marks(&marks);
    assert!(!logged.is_empty());
    assert_eq!(
        number_after(&refused, "marks"),
        logged.len() as u64,
        "{refused}"
    );
    assert!(refused.ends_with(" 0 missing in memory"), "{refused}");
    let (code, out, err) = src.finish();
    assert_eq!(code, 1, "send:\n{}\n{err}", out.join("\n"));
    // Never clean: the disk says b is in use (inconsistent), and the library refuses to
    // read it as a bitmap.
    let q = qemu_bitmaps(&img);
    let b = q.iter().find(|(n, ..)| n == "b").unwrap();
    assert!(b.2.iter().any(|f| f == "in-use"), "{q:?}");
    let s = BitmapStore::open(
        FileStorage::open(&img, OpenMode::ReadOnly).unwrap(),
        OpenMode::ReadOnly,
    )
    .unwrap();
    assert!(
        matches!(s.load("b"), Err(dirty_bitmap::Error::Inconsistent { .. })),
        "{:?}",
        s.load("b").map(|b| b.count())
    );
    drop(s);
    assert_qemu_clean(&img);
    // Not left locked.
    drop(FileStorage::open(&img, OpenMode::ReadWrite).unwrap());
}

/// Both processes with `--tls-creds` (QEMU's layout, made at run time): a source that asks
/// for a server name the destination's certificate does not carry is refused at the
/// handshake, before the hand-over begins, and its guest runs on; a second source with
/// the right `--tls-hostname` hands the guest over to the same destination, every mark
/// with it.
#[test]
fn two_processes_over_tls_refuse_a_wrong_server_name_then_hand_over() {
    let (_, seed) = common::seeded_rng("procs_tls");
    let seed = seed.to_string();
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let creds = dir.path().join("tls");
    common::pki::Ca::new("migration ca").write_dir(&creds, &["localhost", "127.0.0.1"]);
    let marks = dir.path().join("marks.log");
    let mut dest = Proc::spawn(
        "listen",
        &[
            "migrate",
            "listen",
            p(&img),
            "--tls-creds",
            p(&creds),
            "--attempts",
            "2",
            "--check-log",
            p(&marks),
            "--timeout",
            "60",
        ],
    );
    dest.wait_for("TLS: certificates in");
    let addr = dest.wait_for("listening on ")["listening on ".len()..].to_string();

    let wrong_log = dir.path().join("wrong-marks.log");
    let mut args = send_args(p(&img), &addr, p(&wrong_log), &seed);
    args.extend(["--tls-creds", p(&creds), "--tls-hostname", "db.example.org"]);
    let (code, out, err) = Proc::spawn("send (wrong name)", &args).finish();
    let text = out.join("\n");
    assert_eq!(code, 3, "send:\n{text}\n{err}");
    assert!(
        text.contains("over TLS, verifying the certificate of db.example.org"),
        "{text}"
    );
    assert!(
        text.contains(
            "hand-over failed: TLS: the destination's certificate does not name the server"
        ),
        "{text}"
    );
    assert!(text.contains("the hand-over never began"), "{text}");

    let mut args = send_args(p(&img), &addr, p(&marks), &seed);
    args.extend(["--tls-creds", p(&creds), "--tls-hostname", "localhost"]);
    let (code, out, err) = Proc::spawn("send", &args).finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "send:\n{text}\n{err}");
    assert!(text.contains("handed over: downtime"), "{text}");
    let at_stop = out.iter().find(|l| l.contains("RAM at stop")).unwrap();

    let (code, out, err) = dest.finish();
    let text = out.join("\n");
    assert_eq!(code, 0, "listen:\n{text}\n{err}");
    assert!(
        text.contains("attempt 1: failed: TLS: the peer refused the TLS handshake"),
        "{text}"
    );
    assert!(text.contains("attempt 2: completed"), "{text}");
    let started = out
        .iter()
        .find(|l| l.starts_with("guest started here"))
        .unwrap();
    assert_eq!(crc_in(started), crc_in(at_stop), "{started} / {at_stop}");
    assert!(text.contains(", 0 missing"), "{text}");
    assert!(text.contains("marks missing on disk: 0"), "{text}");
    assert_every_mark_on_disk(&img, &read_marks(&marks));
}
