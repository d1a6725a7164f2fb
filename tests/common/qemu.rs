//! QEMU tools for the integration tests. A missing tool fails the test; nothing is skipped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    let found = Command::new("which").arg(name).output();
    match found {
        Ok(o) if o.status.success() => PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()),
        _ => panic!("{name} is required for the QEMU interop tests but was not found; install qemu-utils / libnbd-bin"),
    }
}

/// Waits, at most `limit`, until a server listens on the Unix socket `sock`: a connection
/// succeeds. The socket's file appears when the server binds it, before it listens, and a
/// client that connects in between is refused (a CI run's `nbdinfo` was). The probe's
/// connection closes at once, so a server that ends after its first client (`qemu-nbd`
/// without `-t`) must run persistent.
pub fn wait_until_listening(sock: &Path, limit: Duration) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < limit,
            "nothing listens on {} after {limit:?}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("failed to run {name}: {e}"))
}

pub fn ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img create` of a qcow2 image of 512-byte clusters at `img`, `size` (as qemu-img
/// reads it: "64M") of guest disk with every cluster allocated (`preallocation=metadata`:
/// an L2 table per 64 clusters, a sparse file).
pub fn small_clusters_all_allocated(img: &Path, size: &str) {
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,preallocation=metadata",
            p(img),
            size,
        ],
    );
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `qemu-img check` must exit 0 and report no leaks.
pub fn assert_qemu_clean(img: &Path) {
    let out = run("qemu-img", &["check", "-f", "qcow2", p(img)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "qemu-img check: {text}");
    assert!(text.contains("No errors"), "qemu-img check: {text}");
    assert!(!text.contains("leaked"), "qemu-img check: {text}");
}

/// `(name, granularity, flags)` from `qemu-img info --output=json`.
pub fn qemu_bitmaps(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let json = ok(
        "qemu-img",
        &["info", "-f", "qcow2", "--output=json", p(img)],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    bitmap_triples(&v["format-specific"]["data"]["bitmaps"])
}

/// [`qemu_bitmaps`] with `qemu-img info -U` (force-share), for an image one of our writable
/// handles holds locked.
pub fn qemu_bitmaps_shared(img: &Path) -> Vec<(String, u64, Vec<String>)> {
    let json = ok(
        "qemu-img",
        &["info", "-U", "-f", "qcow2", "--output=json", p(img)],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    bitmap_triples(&v["format-specific"]["data"]["bitmaps"])
}

/// `(name, granularity, flags)` of each bitmap in a JSON list shaped like `qemu-img info`'s
/// (which `dbm info --json` follows).
pub fn bitmap_triples(list: &serde_json::Value) -> Vec<(String, u64, Vec<String>)> {
    let Some(list) = list.as_array() else {
        return Vec::new();
    };
    list.iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["granularity"].as_u64().unwrap(),
                b["flags"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect()
}

pub struct Nbd(Child);

impl Drop for Nbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `qemu-nbd -t -r -f qcow2 -B NAME -k SOCK IMG`: a persistent read-only export of `img`
/// with bitmap `name` on the Unix socket `sock`, to be spawned.
pub fn qemu_nbd_export(sock: &Path, img: &Path, name: &str) -> Command {
    let mut c = Command::new(tool("qemu-nbd"));
    c.args(["-t", "-r", "-f", "qcow2", "-B", name, "-k", p(sock), p(img)]);
    c
}

/// Runs `f` on the URI of a read-only `qemu-nbd` export of `img` with bitmap `name`
/// (`-B`), stopping the server afterwards.
fn with_nbd_export<T>(img: &Path, name: &str, f: impl FnOnce(&Path) -> T) -> T {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let child = qemu_nbd_export(&sock, img, name)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start qemu-nbd");
    let _guard = Nbd(child);
    wait_until_listening(&sock, Duration::from_secs(10));
    f(&sock)
}

/// Appends `[off, off + len)` to `out`, merging it into the last extent if adjacent.
fn push_merged(out: &mut Vec<(u64, u64)>, off: u64, len: u64) {
    match out.last_mut() {
        Some(last) if last.0 + last.1 == off => last.1 += len,
        _ => out.push((off, len)),
    }
}

/// The virtual disk size a qcow2 image's header records (bytes 24 to 32): where a map of
/// its bitmap must end, so that a map cut short never reads the tail as clean.
fn qcow2_virtual_size(img: &Path) -> u64 {
    use std::io::Read;
    let mut h = [0u8; 32];
    std::fs::File::open(img)
        .and_then(|mut f| f.read_exact(&mut h))
        .unwrap_or_else(|e| panic!("reading the header of {}: {e}", img.display()));
    assert_eq!(
        &h[..4],
        b"QFI\xfb",
        "{} is not a qcow2 image",
        img.display()
    );
    u64::from_be_bytes(h[24..32].try_into().unwrap())
}

/// Dirty extents of bitmap `name` as qemu-nbd exports them, adjacent ones merged. The map
/// must cover the whole disk, extent after extent.
pub fn nbd_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let map = with_nbd_export(img, name, |sock| {
        let uri = format!("nbd+unix:///?socket={}", p(sock));
        ok(
            "nbdinfo",
            &[&format!("--map=qemu:dirty-bitmap:{name}"), &uri],
        )
    });
    let mut out: Vec<(u64, u64)> = Vec::new();
    // Every line is an extent (offset, length, type, description), each starting where
    // the one before ended: a line that does not parse (another output format) fails
    // rather than reads as clean.
    let mut end = 0u64;
    for line in map.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("nbdinfo --map line {line:?} does not parse"))
        };
        let (off, len, ty) = (num(0), num(1), num(2));
        assert_eq!(off, end, "nbdinfo --map leaves a gap before {line:?}");
        end = off + len;
        if ty == 1 {
            push_merged(&mut out, off, len);
        }
    }
    assert_eq!(
        end,
        qcow2_virtual_size(img),
        "nbdinfo --map ends before the disk does"
    );
    out
}

/// Dirty extents of bitmap `name` as QEMU's own NBD client reads them from a `qemu-nbd`
/// export: `qemu-img map` over the `nbd` driver with `x-dirty-bitmap`, which reports the
/// bitmap's dirty extents as holes (`"data": false`) and its clean ones as data. Where
/// [`nbd_dirty`]'s nbdinfo walks the export in requests of at most 2 GiB, QEMU's client asks
/// for 64-bit extents (NBD extended headers), so it reads a disk of exabytes in one pass.
/// Adjacent extents merged.
pub fn qemu_map_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    // Extended headers came with QEMU 9.0; before, the client asks in requests below 2 GiB
    // and the largest disks would take days, a hang rather than a failure.
    let version = ok("qemu-img", &["--version"]);
    let major: u32 = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("qemu-img --version: {version}"));
    assert!(
        major >= 9,
        "qemu-img map over NBD needs QEMU 9.0 or later (64-bit block status): {version}"
    );
    let json = with_nbd_export(img, name, |sock| {
        ok(
            "qemu-img",
            &[
                "map",
                "--output=json",
                "--image-opts",
                &format!(
                    "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
                    p(sock)
                ),
            ],
        )
    });
    let v: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("qemu-img map printed no JSON ({e}): {json}"));
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut end = 0;
    for e in v.as_array().expect("qemu-img map prints an array") {
        let (off, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        assert_eq!(off, end, "qemu-img map left a gap: {json}");
        end = off + len;
        if !e["data"].as_bool().unwrap() {
            push_merged(&mut out, off, len);
        }
    }
    assert_eq!(
        end,
        qcow2_virtual_size(img),
        "qemu-img map ends before the disk does: {json}"
    );
    out
}

/// `qemu-img check` of an image given as bytes (written to a temporary file): its exit
/// status (0 clean, 1 check not completed, 2 corruption, 3 leaks only) and everything it
/// printed.
pub fn check_bytes(bytes: &[u8]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("check.qcow2");
    std::fs::write(&img, bytes).unwrap();
    let out = run("qemu-img", &["check", "-f", "qcow2", p(&img)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}
