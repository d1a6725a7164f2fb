//! The README's console sessions, run as they stand: each `$ ` line through `sh -c` in a
//! directory of its own, with `dbm` on the `PATH`, the repository's `scripts/` and a socket
//! in that directory for `/tmp/nbd.sock`. The example's outputs must be what the commands
//! print; the incremental backup's placeholder lines ("  ... writes ...") become writes of
//! random bytes into disk.raw, each marked in the checkpoint that records (`dbm mark`), as
//! the storage stack in the README would, and its last line (`cmp`) must succeed.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::qemu::tool;
use common::seeded_rng;
use rand::RngExt;

const RAW: u64 = 64 << 20;

/// The first ```console block after the heading `heading`, as its lines.
fn console_block(heading: &str) -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let after = readme
        .split_once(heading)
        .unwrap_or_else(|| panic!("README.md has no {heading:?}"))
        .1;
    let body = after
        .split_once("```console\n")
        .and_then(|(_, b)| b.split_once("\n```"))
        .unwrap_or_else(|| panic!("no console block after {heading:?}"))
        .0;
    body.lines().map(str::to_string).collect()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Ends a `qemu-nbd --fork` a failed line left waiting for its one client: it exits after
/// a client connects and leaves.
struct EndServer<'a>(&'a Path);

impl Drop for EndServer<'_> {
    fn drop(&mut self) {
        let sock = self.0.join("nbd.sock");
        if sock.exists() {
            drop(std::os::unix::net::UnixStream::connect(sock));
        }
    }
}

/// Runs one `$ ` line in `dir`; its stdout. A failure panics with both streams.
fn run_line(dir: &Path, line: &str) -> String {
    let sock = dir.join("nbd.sock");
    let cmd = line
        .replace("/tmp/nbd.sock", sock.to_str().unwrap())
        .replace("scripts/", &format!("{}/scripts/", root().display()));
    let bin = Path::new(env!("CARGO_BIN_EXE_dbm")).parent().unwrap();
    // The QEMU tools are required: `tool` fails the test when one is missing.
    let qemu = tool("qemu-nbd");
    let path = format!(
        "{}:{}:{}",
        bin.display(),
        qemu.parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Files, not pipes: a server a line leaves running in the background (`&`) would hold
    // a pipe open and the read of it would wait for good.
    let (out_path, err_path) = (dir.join(".stdout"), dir.join(".stderr"));
    let status = Command::new("sh")
        .args(["-c", &cmd])
        .current_dir(dir)
        .env("PATH", path)
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .status()
        .unwrap();
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        status.success(),
        "{cmd}: {status}\nstdout: {stdout}\nstderr: {}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    // A `qemu-nbd --fork` ends after its one client: its locks are released before it
    // removes its socket, so the next line, which may write the image, waits for that.
    if !cmd.contains("qemu-nbd") && sock.exists() {
        let start = Instant::now();
        while sock.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{cmd}: qemu-nbd did not end after its client"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    stdout
}

/// The example: each command's output is what the README shows after it.
#[test]
fn the_readme_example_prints_what_it_shows() {
    let dir = tempfile::tempdir().unwrap();
    let _end = EndServer(dir.path());
    let lines = console_block("### Example");
    let mut i = 0;
    let mut ran = 0;
    while i < lines.len() {
        let cmd = lines[i]
            .strip_prefix("$ ")
            .unwrap_or_else(|| panic!("line {i} is no command: {:?}", lines[i]));
        let expected: Vec<&str> = lines[i + 1..]
            .iter()
            .take_while(|l| !l.starts_with("$ "))
            .map(String::as_str)
            .collect();
        let out = run_line(dir.path(), cmd);
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(got, expected, "{cmd}");
        i += 1 + expected.len();
        ran += 1;
    }
    assert!(ran >= 8, "the example ran {ran} commands");
}

/// The incremental backup of a raw disk, with writes where the README says the storage
/// stack writes: the restore from the full backup and the incremental equals the disk.
#[test]
fn the_readme_incremental_backup_restores_the_disk() {
    let (mut rng, _) = seeded_rng("readme_backup");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let _end = EndServer(d);
    let raw: Vec<u8> = (0..RAW).map(|_| rng.random()).collect();
    std::fs::write(d.join("disk.raw"), raw).unwrap();
    let mut recording: Option<String> = None;
    let mut writes = 0;
    let mut ran = Vec::new();
    for line in console_block("### An incremental backup of a raw disk") {
        if let Some(cmd) = line.strip_prefix("$ ") {
            run_line(d, cmd);
            if let Some(rest) = cmd.strip_prefix("dbm checkpoint disk.qcow2 ") {
                recording = rest.split_whitespace().next().map(str::to_string);
            }
            ran.push(cmd.split_whitespace().next().unwrap_or("").to_string());
        } else if line.trim_start().starts_with("...") {
            let name = recording.clone().expect("a write before any checkpoint");
            for _ in 0..20 {
                let len = rng.random_range(1..64u64) * 4096;
                let off = rng.random_range(0..(RAW - len) / 512) * 512;
                let bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("disk.raw"))
                    .unwrap();
                std::os::unix::fs::FileExt::write_all_at(&f, &bytes, off).unwrap();
                run_line(d, &format!("dbm mark disk.qcow2 {name} {off} {len}"));
                writes += 1;
            }
        }
    }
    assert!(writes >= 40, "{writes} writes");
    assert_eq!(ran.last().map(String::as_str), Some("cmp"), "{ran:?}");
}
