//! `dbm migrate listen` and `dbm migrate send`: the two ends of a live migration, each its
//! own process, over TCP, on one qcow2 image both of them open (shared storage).
//!
//! Each side opens the image itself, writable, with QEMU's image locks
//! (`FileStorage::open(path, OpenMode::ReadWrite)`); the processes share nothing but the
//! file and the socket. The source holds the writer's locks while its bitmaps are active;
//! its stop (`SharedDiskState::complete`, the incremental inactivate) releases them, so
//! the destination can open the image writable after the source's End and activate it
//! before it answers Started (`SharedDiskDest`). After a failed hand-over the source takes
//! the locks and its bitmaps back before its guest resumes.
//!
//! - `listen`: binds, prints the address, serves attempts until the guest starts here (or
//!   the attempts or the wait run out); `--refuse N` refuses the first N attempts *after*
//!   opening and activating the image, which it puts back as the source left it before the
//!   refusal is sent. Once the guest started here it checks the source's log of marks
//!   against its bitmaps, runs its own disk writes for `--run-for`, and inactivates.
//! - `send`: activates the image, starts the guest (vCPU threads writing RAM, a disk
//!   writer marking every enabled bitmap through the store's `Tracker`, paused when the VM
//!   stops), migrates it, and prints the outcome. After a failure the guest runs on here
//!   for `--run-for`, then stops: every logged mark must be dirty in memory and on disk.
//!   On an unknown outcome (End sent, no answer) it exits with the guest stopped, or with
//!   `--fail-back-on-signal` waits for the operator's word that the destination is gone
//!   (SIGUSR1), then re-dirties, takes the image back (only if the destination changed
//!   nothing but the `in_use` flags) and resumes.
//! - `listen --test-crash-after-activate` (hidden, a test hook): each attempt, once it
//!   activated the image, waits to be killed without answering Started.
//! - `listen --test-stall-after-activate SECS` (hidden, a test hook): the first attempt,
//!   once it activated the image, waits SECS before it answers (a source with a shorter
//!   `--timeout` hears nothing: its outcome is unknown, while this listener lives on).
//!
//! With `--tls-creds DIR` on both sides the connection runs TLS with certificates, both
//! ends authenticated against DIR/ca-cert.pem (QEMU's `tls-creds-x509` layout and
//! `verify-peer=on`); `send --tls-hostname` names the server the destination's certificate
//! must carry (by default the IP address of `--to`).
//!
//! The log of marks (`--log`) holds one `offset length` line per 4 KiB disk write, written
//! after the mark returned and before the writer pauses, so when the source's VM has
//! stopped it lists every mark made and only marks made.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Subcommand;
use dirty_bitmap::migration::guest::new_log;
use dirty_bitmap::migration::precopy::{
    checked_config, Controller, Directive, IterationReport, StallAction, StallReport,
    MAX_ANSWER_TIMEOUT,
};
use dirty_bitmap::migration::tcp::{
    migrate_in_session, DestOptions, Session, SourceOptions, TcpDestination, MAX_TIMEOUT,
};
use dirty_bitmap::migration::tls::{TlsClient, TlsCreds, TlsServer};
use dirty_bitmap::migration::{
    AutoConverge, Bytes, BytesPerMs, DestState, GuestRam, Kind, LoopConfig, MigrationError,
    MigrationState, Millis, Pattern, RamState, SetupMode, SharedDestState, SharedDiskDest,
    SharedDiskState, StateId, Vm, Workload, WorkloadConfig, RAM_ID,
};
use dirty_bitmap::rng::SplitMix64;
use dirty_bitmap::storage::{FileStorage, Storage};
use dirty_bitmap::{BitmapStore, DirtyBitmap, FlushStats, OpenMode, SharedStore};

use crate::migrate_run::{counted_in_store, counted_on_disk, mark_missing, PAGE};
use crate::open::at;
use crate::out::emit;
use crate::signals::{self, Ended};
use crate::size::{self, human};
use crate::CmdResult;
use dirty_bitmap::migration::{DiskGuest as Guest, DiskWriter};

/// [`AutoConverge`], and a cancel at the first turn after SIGINT or SIGTERM: the loop
/// re-dirties what it sent and the guest runs on here, to stop with the image inactivated.
struct CancelOnStop(AutoConverge);

impl Controller for CancelOnStop {
    fn on_iteration(&mut self, report: &IterationReport) -> Directive {
        if signals::stop_requested() {
            Directive::Cancel
        } else {
            self.0.on_iteration(report)
        }
    }

    fn on_stall(&mut self, report: &StallReport) -> StallAction {
        if signals::stop_requested() {
            StallAction::Cancel
        } else {
            self.0.on_stall(report)
        }
    }
}

/// The name both ends give the disk state (`SharedDiskState` and `SharedDiskDest`).
const DISK_STATE: &str = "disk-bitmaps";
/// The disk state's section id on the source.
const DISK_ID: StateId = 2;

/// Exit status: logged marks missing from the bitmaps.
const EXIT_LOST: u8 = 2;
/// Exit status: no hand-over (listen: the guest did not start here; send: the guest runs
/// on at the source).
const EXIT_NOT_MIGRATED: u8 = 3;

/// Options of `dbm migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(subcommand)]
    pub side: Side,
}

/// The two ends.
#[derive(Debug, Subcommand)]
pub enum Side {
    /// The destination: listen for the source, open and activate the shared image after
    /// its End, start the guest here; print the address and what it received.
    Listen(ListenArgs),
    /// The source: run a guest on the image (RAM writes, disk writes marking its bitmaps)
    /// and migrate it to a `listen`ing destination; print the outcome.
    Send(SendArgs),
}

/// Options of `dbm migrate listen`.
#[derive(Debug, clap::Args)]
pub struct ListenArgs {
    /// The qcow2 image, on storage the source shares.
    pub image: PathBuf,
    /// Address to listen on; port 0 picks a free one (printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub bind: SocketAddr,
    /// Refuse to start the guest in the first N attempts, after opening and activating the
    /// image (which goes back as the source left it before the refusal is sent).
    #[arg(long, default_value_t = 0)]
    pub refuse: u32,
    /// Attempts (connections) to serve before giving up.
    #[arg(long, default_value_t = 1)]
    pub attempts: u32,
    /// Seconds to wait for each connection, and for each read or write on it.
    #[arg(long, default_value_t = 30.0)]
    pub timeout: f64,
    /// The largest guest RAM a source may send (suffixes K, M, G, T).
    #[arg(long, default_value = "64G", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub max_ram: u64,
    /// The source's log of marks (`send --log`): once the guest started here, every mark
    /// in it must be dirty in every enabled bitmap (exit 2 otherwise).
    #[arg(long)]
    pub check_log: Option<PathBuf>,
    /// Seconds the guest runs here after it started, or until SIGINT or SIGTERM; then it
    /// stops and the image is inactivated.
    #[arg(long, default_value_t = 0.0)]
    pub run_for: f64,
    /// 4 KiB disk writes per second the guest makes here while it runs, each marked in
    /// every enabled bitmap.
    #[arg(long, default_value_t = 0)]
    pub bitmap_writes_per_sec: u64,
    /// Append the marks made here to this file, as `send --log` does.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Random seed of the disk writes here (default: random; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Test hook: once an attempt opened and activated the image (its bitmaps `in_use`),
    /// print `test hook: ...` and wait to be killed, never answering Started: a destination
    /// that crashes after it took the image over. After 10 minutes it exits with status
    /// 137, as a SIGKILL would.
    #[arg(long, hide = true)]
    pub test_crash_after_activate: bool,
    /// Test hook: the first attempt that opened and activated the image waits this many
    /// seconds before it answers (Started, or the refusal of `--refuse`), printing `test
    /// hook: ...`: a destination whose answer comes after the source gave up waiting.
    #[arg(long, hide = true, default_value_t = 0.0)]
    pub test_stall_after_activate: f64,
    /// TLS with certificates (QEMU's `tls-creds-x509` layout): DIR/ca-cert.pem,
    /// DIR/server-cert.pem, DIR/server-key.pem. The source must present a certificate
    /// signed by the CA; a source without TLS is refused at the handshake.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
}

/// Options of `dbm migrate send`.
#[derive(Debug, clap::Args)]
pub struct SendArgs {
    /// The qcow2 image, on storage the destination shares; its enabled bitmaps record the
    /// guest's disk writes.
    pub image: PathBuf,
    /// The destination's address (`listen` prints it).
    #[arg(long)]
    pub to: SocketAddr,
    /// Guest RAM (suffixes K, M, G; a multiple of 4 KiB).
    #[arg(long, default_value = "64M", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub guest_ram: u64,
    /// vCPU threads writing guest pages (1 to 4096).
    #[arg(long, default_value_t = 1, value_parser = crate::size::vcpus)]
    pub vcpus: usize,
    /// Bytes per second the vCPUs write, in whole 4 KiB pages (suffixes K, M, G); 90 % of
    /// the writes go into 5 % of the pages.
    #[arg(long, default_value = "8M", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub dirty_rate: u64,
    /// 4 KiB disk writes per second, each marked in every enabled bitmap; 90 % of them go
    /// into a 64 GiB hot spot.
    #[arg(long, default_value_t = 10_000)]
    pub bitmap_writes_per_sec: u64,
    /// The rate limit (QEMU `max-bandwidth`), bytes per second (suffixes K, M, G).
    #[arg(long, default_value = "128M", value_parser = size::parse_size, allow_negative_numbers = true)]
    pub max_bandwidth: u64,
    /// The downtime limit in ms (QEMU `downtime-limit`); the disk's stop time counts in it.
    #[arg(long, default_value_t = 300)]
    pub downtime_limit: u64,
    /// Seconds the guest runs before the migration starts.
    #[arg(long, default_value_t = 0.5)]
    pub warm_up: f64,
    /// Attempts: after one that fails with the guest resumed here, the next starts
    /// `--retry-after` seconds later, in the same migration: the destination resumes the
    /// RAM it kept.
    #[arg(long, default_value_t = 1)]
    pub attempts: u32,
    /// Seconds between attempts.
    #[arg(long, default_value_t = 1.0)]
    pub retry_after: f64,
    /// After the last attempt failed: seconds the guest runs on here, or until SIGINT or
    /// SIGTERM; then it stops and the image is inactivated.
    #[arg(long, default_value_t = 0.0)]
    pub run_for: f64,
    /// Append one `offset length` line per disk write to this file, after its mark.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// When the outcome is unknown (End was sent, no answer came: the destination may run
    /// the guest), wait with the guest stopped for the operator's word instead of exiting:
    /// SIGUSR1 says the destination is gone without having started the guest, and the
    /// source takes its image back (only if the destination changed nothing but the
    /// `in_use` flags) and resumes; SIGINT or SIGTERM leave it stopped (exit 1).
    #[arg(long)]
    pub fail_back_on_signal: bool,
    /// Seconds to wait for the connection, each write, and each answer.
    #[arg(long, default_value_t = 10.0)]
    pub timeout: f64,
    /// Seconds the loop waits, switching nothing over, for the destination's answer to
    /// the bitmaps' preload (its BEGIN or a whole LOG) before it fails the attempt with the
    /// guest running here: 0.1 to 86400.
    #[arg(long, default_value_t = 60.0)]
    pub answer_timeout: f64,
    /// Random seed of the RAM contents and of the writes (default: random; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// TLS with certificates (QEMU's `tls-creds-x509` layout): DIR/ca-cert.pem,
    /// DIR/client-cert.pem, DIR/client-key.pem. The destination's certificate must be
    /// signed by the CA and name `--tls-hostname`.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// The name the destination's certificate must carry (QEMU's `tls-hostname`): a DNS
    /// name or an IP address; by default the IP address of `--to`.
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_hostname: Option<String>,
}

/// Runs `dbm migrate listen` or `dbm migrate send`.
pub fn run(args: &MigrateArgs) -> CmdResult {
    match &args.side {
        Side::Listen(a) => listen(a),
        Side::Send(a) => send(a),
    }
}

/// Prints one progress line at once; a closed stdout does not stop the migration.
fn say(line: impl AsRef<str>) {
    let _ = emit(&format!("{}\n", line.as_ref()));
}

/// Seconds as a duration, refusing what is negative, not a number, or longer than
/// [`MAX_TIMEOUT`] (a year: no deadline computed from it overflows).
fn seconds(what: &str, s: f64) -> Result<Duration, String> {
    let d = Duration::try_from_secs_f64(s)
        .map_err(|_| format!("--{what} {s}: not a number of seconds"))?;
    if d > MAX_TIMEOUT {
        return Err(format!(
            "--{what} {s}: more than a year ({} seconds)",
            MAX_TIMEOUT.as_secs()
        ));
    }
    Ok(d)
}

/// [`seconds`] for a `--timeout`, which must also be above zero (a zero wait fails every
/// attempt), so that it is refused before the image is opened rather than by each attempt.
fn timeout_seconds(s: f64) -> Result<Duration, String> {
    let d = seconds("timeout", s)?;
    if d.is_zero() {
        return Err(format!("--timeout {s}: must be above zero"));
    }
    Ok(d)
}

fn seed_or_random(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(rand::random::<u64>)
}

fn open_log(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| at(path, e))
}

/// What a log line must be, beyond two numbers.
const BAD_LINE: &str = "a length of 1 or more, ending below 2^64";

/// The `offset length` lines of a log of marks. A last line without its newline was cut
/// short and is skipped.
fn read_log(path: &Path) -> Result<Vec<(u64, u64)>, String> {
    let f = File::open(path).map_err(|e| at(path, e))?;
    let mut r = BufReader::new(f);
    let mut out = Vec::new();
    let mut line = String::new();
    for n in 1.. {
        line.clear();
        if r.read_line(&mut line).map_err(|e| at(path, e))? == 0 || !line.ends_with('\n') {
            break;
        }
        let mut it = line.split_whitespace().map(str::parse::<u64>);
        match (it.next(), it.next(), it.next()) {
            // A mark's last byte, `offset + length - 1`, must be a byte offset.
            (Some(Ok(o)), Some(Ok(l)), None) if l > 0 && o.checked_add(l - 1).is_some() => {
                out.push((o, l))
            }
            _ => {
                return Err(at(
                    path,
                    format!("line {n} is not `offset length` ({BAD_LINE})"),
                ))
            }
        }
    }
    Ok(out)
}

/// Names of the bitmaps that record writes (enabled).
fn enabled_bitmaps<S: Storage>(store: &BitmapStore<S>) -> Vec<String> {
    store
        .list()
        .into_iter()
        .filter(|b| b.enabled)
        .map(|b| b.name.to_string())
        .collect()
}

/// Marks of `marks` not dirty (first or last byte) in some counted bitmap of `store`
/// ([`counted_in_store`]), in memory while it is active; once it is inactive,
/// [`missing_on_disk`] is the count of the disk. Counted once per mark.
fn missing<S: Storage>(store: &BitmapStore<S>, marks: &[(u64, u64)]) -> Result<u64, String> {
    Ok(count_missing(&counted_in_store(store)?, marks))
}

/// Marks of `marks` missing from some of `bitmaps` ([`mark_missing`]), once per mark.
fn count_missing(bitmaps: &[DirtyBitmap], marks: &[(u64, u64)]) -> u64 {
    marks
        .iter()
        .filter(|&&(o, l)| bitmaps.iter().any(|b| mark_missing(b, o, l)))
        .count() as u64
}

/// [`missing`] as the image at `path` holds the bitmaps on disk ([`counted_on_disk`]: a
/// fresh read-only open, never `store`'s parked copies).
fn missing_on_disk<S: Storage>(
    store: &BitmapStore<S>,
    path: &Path,
    marks: &[(u64, u64)],
) -> Result<u64, String> {
    Ok(count_missing(&counted_on_disk(store, path)?, marks))
}

fn flush_line(s: &FlushStats) -> String {
    format!(
        "{} bytes, {} syncs, {:.1} ms",
        s.bytes_written,
        s.syncs,
        s.duration.as_secs_f64() * 1000.0
    )
}

/// CRC32 of the guest RAM, page by page in order (the same bytes as the destination's).
fn ram_crc(ram: &GuestRam) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let mut page = vec![0u8; PAGE as usize];
    for p in 0..ram.pages() {
        ram.read_page(p, &mut page);
        h.update(&page);
    }
    h.finalize()
}

// ---- listen ----

/// The destination's disk state: [`SharedDiskDest`] on the image, refusing the first
/// attempts after it activated, and saying what it does as it does it.
#[derive(Debug)]
struct ListenDisk {
    inner: SharedDiskDest<FileStorage>,
    image: PathBuf,
    refuse_left: u32,
    /// The attempt's number, as the destination's report counts attempts: every
    /// connection, those that failed before a Hello too (`DestOptions::attempt`).
    attempt: Arc<AtomicU32>,
    /// Whether this attempt opened and activated the image.
    activated: bool,
    /// The test hook `--test-crash-after-activate`.
    crash_after_activate: bool,
    /// The test hook `--test-stall-after-activate`, taken by the first attempt it stalls.
    stall_after_activate: Option<Duration>,
}

impl ListenDisk {
    fn attempt(&self) -> u32 {
        self.attempt.load(Ordering::SeqCst)
    }
}

impl DestState for ListenDisk {
    fn name(&self) -> &str {
        DISK_STATE
    }

    fn hello(
        &mut self,
        id: StateId,
        binding: dirty_bitmap::migration::Binding,
    ) -> dirty_bitmap::migration::Result<()> {
        self.activated = false;
        say(format!(
            "attempt {}: the source declared {DISK_STATE}",
            self.attempt()
        ));
        self.inner.hello(id, binding)
    }

    fn section(&mut self, payload: &[u8]) -> dirty_bitmap::migration::Result<Option<Vec<u8>>> {
        self.inner.section(payload)
    }

    fn switchover(&mut self, postcopy: bool) {
        self.inner.switchover(postcopy);
    }

    fn before_start(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.inner.before_start()?;
        self.activated = true;
        say(format!(
            "attempt {}: opened {} writable and activated it",
            self.attempt(),
            self.image.display()
        ));
        if self.crash_after_activate {
            // A crash between the activation and Started: the image stays as the
            // activation left it (`in_use` set, in place) and the source hears nothing.
            say(format!(
                "attempt {}: test hook: activated, waiting to be killed before Started",
                self.attempt()
            ));
            std::thread::sleep(Duration::from_secs(600));
            std::process::exit(137);
        }
        if let Some(stall) = self.stall_after_activate.take() {
            say(format!(
                "attempt {}: test hook: activated, answering in {:.1} s",
                self.attempt(),
                stall.as_secs_f64()
            ));
            std::thread::sleep(stall);
        }
        if self.refuse_left > 0 {
            self.refuse_left -= 1;
            return Err(MigrationError::DestinationRefused(format!(
                "as told (--refuse), attempt {}, after activating the image",
                self.attempt()
            )));
        }
        Ok(())
    }

    fn failed(&mut self) {
        self.inner.failed();
        let image = match (
            std::mem::take(&mut self.activated),
            self.inner.undo_failed(),
        ) {
            (false, _) => "the image was not opened".to_string(),
            (true, None) => "the image is inactive again, as the source left it".to_string(),
            (true, Some(e)) => format!(
                "the image could not be inactivated again ({e}): its bitmaps stay in use, \
                 inconsistent, and the source may take it back"
            ),
        };
        say(format!("attempt {}: failed; {image}", self.attempt()));
    }

    fn failed_after_start(&mut self) {
        self.inner.failed_after_start();
    }

    fn push_ended(&mut self) {
        self.inner.push_ended();
    }
}

fn listen(a: &ListenArgs) -> CmdResult {
    let timeout = timeout_seconds(a.timeout)?;
    let run_for = seconds("run-for", a.run_for)?;
    if a.attempts == 0 {
        return Err("--attempts must be at least 1".into());
    }
    // A log that cannot be written is refused before anything listens: found only after
    // the hand-over, the guest would have moved here for nothing.
    let mut log_file = match (&a.log, a.bitmap_writes_per_sec) {
        (Some(_), 0) => {
            return Err(
                "--log needs --bitmap-writes-per-sec above 0: no mark is made here without it"
                    .into(),
            )
        }
        (Some(path), _) => Some(open_log(path)?),
        (None, _) => None,
    };
    // The image must be one now (read beside the source's writer, force-sharing); it is
    // opened writable only once the source handed it over.
    let disk_size = crate::open::reader(&a.image, true)?.disk_size();
    let seed = seed_or_random(a.seed);
    let attempt = Arc::new(AtomicU32::new(0));
    let disk = Arc::new(Mutex::new(ListenDisk {
        inner: SharedDiskDest::file(DISK_STATE, a.image.clone()),
        image: a.image.clone(),
        refuse_left: a.refuse,
        attempt: Arc::clone(&attempt),
        activated: false,
        crash_after_activate: a.test_crash_after_activate,
        stall_after_activate: (a.test_stall_after_activate > 0.0)
            .then(|| seconds("test-stall-after-activate", a.test_stall_after_activate))
            .transpose()?,
    }));
    let tls = a
        .tls_creds
        .as_deref()
        .map(|dir| TlsServer::new(&TlsCreds::server_dir(dir)))
        .transpose()?;
    let dest = TcpDestination::spawn(DestOptions {
        tls,
        max_attempts: a.attempts,
        timeout,
        max_ram_bytes: Bytes(a.max_ram),
        seed,
        states: vec![Arc::clone(&disk) as SharedDestState],
        bind: a.bind,
        attempt: Some(attempt),
        ..DestOptions::default()
    })?;
    if let Some(dir) = &a.tls_creds {
        say(format!(
            "TLS: certificates in {}; a source must present one signed by its CA",
            dir.display()
        ));
    }
    say(format!("listening on {}", dest.addr()));
    let report = dest.wait()?;
    for (i, t) in report.attempts.iter().enumerate() {
        say(format!(
            "attempt {}: {}; pages held at start {}, written {}, held at end {}",
            i + 1,
            t.error
                .as_ref()
                .map_or_else(|| "completed".to_string(), |e| format!("failed: {e}")),
            t.pages_held_at_start,
            t.pages_written,
            t.pages_held_at_end
        ));
    }
    let Some(guest) = report.guest else {
        say("the guest did not start here");
        return Ok(ExitCode::from(EXIT_NOT_MIGRATED));
    };
    // The image is active here: SIGINT and SIGTERM are a stop request from now on (the
    // run below ends at once), never the process dying with its bitmaps `in_use`.
    signals::install();
    say(format!(
        "guest started here: RAM {} pages, crc32 {:08x}",
        guest.pages(),
        crc32fast::hash(guest.ram())
    ));
    let mut store = disk
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .inner
        .take_store()
        .ok_or("the guest started but the disk state holds no image")?;
    say(format!(
        "holding {} (active, write locks held); bitmaps recording: {}",
        a.image.display(),
        enabled_bitmaps(&store).join(", ")
    ));
    // Until the guest stops here the image is active; an error on the way inactivates it
    // first, so that it is never left `in_use`.
    let started = (|| -> Result<_, String> {
        let mut lost = 0;
        let marks = match &a.check_log {
            Some(log) => {
                let marks = read_log(log)?;
                lost += missing(&store, &marks)?;
                say(format!(
                    "source marks: {} logged in {}, {lost} missing",
                    marks.len(),
                    log.display(),
                ));
                marks
            }
            None => Vec::new(),
        };
        let writer = if a.bitmap_writes_per_sec > 0 {
            let file = log_file.take();
            Some(DiskWriter::start(
                store.tracker().map_err(|e| at(&a.image, e))?,
                disk_size,
                a.bitmap_writes_per_sec,
                seed,
                file,
            ))
        } else {
            None
        };
        Ok((lost, marks, writer))
    })();
    let (mut lost, source_marks, writer) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = store.inactivate();
            return Err(e.into());
        }
    };
    say(format!(
        "running: {} disk writes/s, seed {seed}, for {} s (SIGINT or SIGTERM stops it sooner)",
        a.bitmap_writes_per_sec,
        run_for.as_secs_f64()
    ));
    let (ended, ran) = signals::run_for(run_for);
    let own: Vec<(u64, u64)> = writer.map_or_else(Vec::new, |w| {
        w.pause();
        w.shutdown().into_iter().map(|o| (o, PAGE)).collect()
    });
    say(format!(
        "stopped after {:.2} s{}: {} marks made here",
        ran.as_secs_f64(),
        if ended == Ended::Signal {
            " (signal)"
        } else {
            ""
        },
        own.len()
    ));
    let stop = store.inactivate().map_err(|e| at(&a.image, e))?;
    let marks: Vec<(u64, u64)> = source_marks.iter().chain(&own).copied().collect();
    let on_disk = missing_on_disk(&store, &a.image, &marks)?;
    lost += on_disk;
    say(format!(
        "inactivated: {}; marks missing on disk: {on_disk}",
        flush_line(&stop)
    ));
    drop(store);
    Ok(if lost == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_LOST)
    })
}

// ---- send ----

/// After an unknown outcome, once the operator says the destination is gone without having
/// started the guest: what the loop does after a failure with the VM stopped. Every state
/// re-dirties what may have been lost in flight, then takes back what its stop handed over
/// (the disk state activates the image again: refused if another process holds its write
/// locks or changed more than the `in_use` flags), then the guest resumes. On an error the
/// guest stays stopped.
fn fail_back(
    states: &mut [&mut dyn MigrationState],
    source: &mut Source,
) -> dirty_bitmap::migration::Result<()> {
    for s in states.iter_mut() {
        s.channel_failed();
        s.resume_source();
    }
    for s in states.iter_mut() {
        s.reactivate()?;
    }
    Guest {
        vcpus: &mut source.vcpus,
        disk: Some(&source.writer),
    }
    .resume()
}

/// What a `send` run has to stop at the end.
struct Source {
    store: SharedStore<FileStorage>,
    vcpus: Workload,
    writer: DiskWriter,
    image: PathBuf,
}

impl Source {
    /// The guest runs on here for `d` (or until a signal), then stops: its disk writes
    /// drained, every logged mark checked in memory, the image inactivated, every mark
    /// checked on disk.
    fn run_on_and_stop(self, d: Duration) -> CmdResult {
        say(format!(
            "running here for {} s (SIGINT or SIGTERM stops it sooner)",
            d.as_secs_f64()
        ));
        let (ended, ran) = signals::run_for(d);
        self.writer.pause();
        let marks: Vec<(u64, u64)> = self
            .writer
            .shutdown()
            .into_iter()
            .map(|o| (o, PAGE))
            .collect();
        self.vcpus.shutdown();
        let mut st = self.store.lock();
        let in_memory = missing(&st, &marks)?;
        let stop = st.inactivate().map_err(|e| at(&self.image, e))?;
        let on_disk = missing_on_disk(&st, &self.image, &marks)?;
        say(format!(
            "stopped after {:.2} s{}: marks {} made, {in_memory} missing in memory; inactivated: {}; {on_disk} missing on disk",
            ran.as_secs_f64(),
            if ended == Ended::Signal { " (signal)" } else { "" },
            marks.len(),
            flush_line(&stop)
        ));
        Ok(ExitCode::from(if in_memory + on_disk == 0 {
            EXIT_NOT_MIGRATED
        } else {
            EXIT_LOST
        }))
    }
}

/// The guest, noting whether the loop stopped it (the hand-over began).
struct Stops<'a> {
    guest: Guest<'a>,
    stopped: bool,
}

impl Vm for Stops<'_> {
    fn stop(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.stopped = true;
        self.guest.stop()
    }
    fn resume(&mut self) -> dirty_bitmap::migration::Result<()> {
        self.guest.resume()
    }
    fn set_throttle(&mut self, percent: u8) {
        self.guest.set_throttle(percent);
    }
    fn run_until(&mut self, now: Duration) {
        self.guest.run_until(now);
    }
}

fn send(a: &SendArgs) -> CmdResult {
    let timeout = timeout_seconds(a.timeout)?;
    let warm_up = seconds("warm-up", a.warm_up)?;
    let run_for = seconds("run-for", a.run_for)?;
    let retry_after = seconds("retry-after", a.retry_after)?;
    let answer_timeout = seconds("answer-timeout", a.answer_timeout)?;
    if !(Duration::from_millis(100)..=MAX_ANSWER_TIMEOUT).contains(&answer_timeout) {
        return Err(format!(
            "--answer-timeout {}: must be from 0.1 to {} seconds",
            a.answer_timeout,
            MAX_ANSWER_TIMEOUT.as_secs()
        )
        .into());
    }
    if a.attempts == 0 {
        return Err("--attempts must be at least 1".into());
    }
    if a.guest_ram == 0 || !a.guest_ram.is_multiple_of(PAGE) {
        return Err(format!(
            "--guest-ram {}: not a positive multiple of 4 KiB",
            a.guest_ram
        )
        .into());
    }
    if a.vcpus == 0 {
        return Err("--vcpus must be at least 1".into());
    }
    // The loop's window is 100 ms: a lower rate could never send a byte.
    if a.max_bandwidth < 10 {
        return Err("--max-bandwidth must be at least 10 bytes/s (1 byte per 100 ms)".into());
    }
    let seed = seed_or_random(a.seed);
    // Credentials that do not load are refused before the image is touched.
    let tls = match &a.tls_creds {
        Some(dir) => {
            let client = TlsClient::new(&TlsCreds::client_dir(dir))?;
            Some(match &a.tls_hostname {
                Some(name) => client.with_server_name(name)?,
                None => client,
            })
        }
        None => None,
    };
    let batch_pages = 64u64;
    // A parameter the loop refuses is a bad argument: refused here, before the image is
    // opened, not by every attempt after the activation wrote `in_use`.
    let config = checked_config(&LoopConfig {
        downtime_limit: Millis(a.downtime_limit),
        max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(a.max_bandwidth)),
        iterate_chunk: Bytes((batch_pages * PAGE * 4).max(1 << 20)),
        answer_timeout,
        ..LoopConfig::default()
    })
    .map_err(|e| e.to_string())?;
    let mut st = crate::open::store(&a.image, OpenMode::ReadWrite)?;
    let bitmaps = enabled_bitmaps(&st);
    if bitmaps.is_empty() {
        return Err(at(&a.image, "no enabled bitmap records the guest's writes").into());
    }
    // Refused before anything is written: its marks could be counted nowhere.
    counted_in_store(&st).map_err(|e| at(&a.image, e))?;
    let pages = a.guest_ram / PAGE;
    let ram = Arc::new(GuestRam::new(pages)?);
    let log = Arc::new(new_log(&ram)?);
    // Distinct contents, so that a page the destination missed shows in its CRC.
    let mut init = SplitMix64::new(seed ^ 0x1417);
    for p in 0..pages {
        ram.fill_page(p, init.next_u64());
    }
    let mut ram_state = RamState::new(
        RAM_ID,
        Arc::clone(&ram),
        Arc::clone(&log),
        SetupMode::Full,
        false,
        batch_pages as usize,
    )?;
    let file = a.log.as_deref().map(open_log).transpose()?;
    // From the activation on: SIGINT and SIGTERM become a stop request (the warm-up ends,
    // an attempt is cancelled, no retry starts), and the guest stops with the image
    // inactivated, never killed with its bitmaps `in_use` (installed first, so that one
    // during the activation's own writes is a request too).
    signals::install();
    st.activate().map_err(|e| at(&a.image, e))?;
    let disk_size = st.disk_size();
    let store = SharedStore::new(st);
    say(format!(
        "activated {} (write locks held); bitmaps recording: {}",
        a.image.display(),
        bitmaps.join(", ")
    ));

    // From here until the guest stops the image is active: an error inactivates it first,
    // so that it is never left `in_use`.
    let tracker = match store.lock().tracker() {
        Ok(t) => t,
        Err(e) => {
            let _ = store.lock().inactivate();
            return Err(at(&a.image, e).into());
        }
    };
    let writer = DiskWriter::start(tracker, disk_size, a.bitmap_writes_per_sec, seed, file);
    let vcpus = match Workload::start(
        Arc::clone(&ram),
        Arc::clone(&log),
        WorkloadConfig {
            vcpus: a.vcpus,
            writes_per_sec: a.dirty_rate / PAGE,
            pattern: Pattern::HOT_90_5,
            seed,
        },
    ) {
        Ok(v) => v,
        Err(e) => {
            writer.pause();
            writer.shutdown();
            let _ = store.lock().inactivate();
            return Err(e.into());
        }
    };
    say(format!(
        "guest: RAM {}, vCPUs {} writing {}/s; disk writes {}/s; seed {seed}",
        human(a.guest_ram),
        a.vcpus,
        human(a.dirty_rate / PAGE * PAGE),
        a.bitmap_writes_per_sec
    ));
    signals::sleep_unless_stopped(warm_up);

    let mut disk_state = SharedDiskState::new(DISK_ID, DISK_STATE, store.clone());
    let mut source = Source {
        store,
        vcpus,
        writer,
        image: a.image.clone(),
    };
    // One migration over every attempt: a retry resumes the RAM the destination kept.
    let mut session = Session::new();
    for attempt in 1..=a.attempts {
        if signals::stop_requested() {
            // SIGINT or SIGTERM since the activation (the handlers no longer end the
            // process), in the warm-up, an attempt or the wait before this one, is a stop
            // request: no more attempts, and `run_for` below returns at once.
            say("stop requested (SIGINT or SIGTERM): no further attempts");
            break;
        }
        say(format!(
            "migrating to {}{} (attempt {attempt} of {})",
            a.to,
            match &a.tls_creds {
                Some(_) => format!(
                    " over TLS, verifying the certificate of {}",
                    a.tls_hostname
                        .clone()
                        .unwrap_or_else(|| a.to.ip().to_string())
                ),
                None => String::new(),
            },
            a.attempts
        ));
        let mut guest = Stops {
            guest: Guest {
                vcpus: &mut source.vcpus,
                disk: Some(&source.writer),
            },
            stopped: false,
        };
        let result = {
            let mut states: [&mut dyn MigrationState; 2] = [&mut ram_state, &mut disk_state];
            migrate_in_session(
                a.to,
                &SourceOptions {
                    loop_config: config,
                    timeout,
                    tls: tls.clone(),
                    ..SourceOptions::default()
                },
                &mut session,
                &mut guest,
                &mut states,
                &mut CancelOnStop(AutoConverge::default()),
            )
        };
        let stopped = guest.stopped;
        match result {
            Ok(r) if r.outcome.kind != Kind::NotConverging => {
                let o = r.outcome;
                // The guest is stopped here and its disk writes drained: the log is
                // complete.
                let crc = ram_crc(&ram);
                let marks = source.writer.shutdown();
                source.vcpus.shutdown();
                let active = source.store.lock().is_active();
                say(format!(
                    "handed over: downtime {:.1} ms (limit {} ms); switchover on network pending {} bytes and disk stop time {} ms",
                    o.downtime.as_secs_f64() * 1000.0,
                    a.downtime_limit,
                    o.pending_at_switch.must_precopy.get() + o.pending_at_switch.can_postcopy.get(),
                    o.pending_at_switch.disk_time.0,
                ));
                say(format!(
                    "disk: flushed during precopy {} bytes; stop (inside the downtime): {}",
                    o.disk_flushed.get(),
                    flush_line(&o.disk_stop)
                ));
                say(format!(
                    "sent {} bytes in {:.1} s, {} syncs; RAM at stop {} pages, crc32 {crc:08x}",
                    r.wire.bytes.get(),
                    o.total_time.as_secs_f64(),
                    o.exact_queries,
                    pages
                ));
                say(format!(
                    "marks: {} made{}",
                    marks.len(),
                    a.log
                        .as_ref()
                        .map_or_else(String::new, |l| format!(", logged to {}", l.display()))
                ));
                if active || !disk_state.handed_over() {
                    return Err(
                        "the hand-over completed but the source store is still active".into(),
                    );
                }
                say("source: bitmaps handed over (store inactive, write locks released)");
                return Ok(ExitCode::SUCCESS);
            }
            Ok(_) => {
                say("did not converge: the migration was cancelled and the guest runs on here");
            }
            Err(e @ MigrationError::OutcomeUnknown(_)) if a.fail_back_on_signal => {
                let verdict = signals::await_verdict(|| {
                    say(format!(
                        "hand-over outcome unknown: {e}; the guest stays stopped, waiting for \
                         the verdict (SIGUSR1: the destination is gone, fail back; SIGINT or \
                         SIGTERM: stay stopped)"
                    ));
                });
                if verdict == signals::Verdict::Stop {
                    say("no verdict: the source stays stopped");
                    let _ = source.writer.shutdown();
                    source.vcpus.shutdown();
                    return Err(e.into());
                }
                say("verdict: the destination is gone; failing back");
                let mut states: [&mut dyn MigrationState; 2] = [&mut ram_state, &mut disk_state];
                if let Err(r) = fail_back(&mut states, &mut source) {
                    // The image stays as it is (inactive here; in_use on disk if the
                    // destination set it): never clean, and the guest must not write.
                    let marks: Vec<(u64, u64)> = source
                        .writer
                        .shutdown()
                        .into_iter()
                        .map(|o| (o, PAGE))
                        .collect();
                    source.vcpus.shutdown();
                    let in_memory = missing(&source.store.lock(), &marks)?;
                    say(format!(
                        "source: cannot take its bitmaps back: {r}; the guest stays stopped; \
                         marks {} made, {in_memory} missing in memory",
                        marks.len()
                    ));
                    return Err(r.into());
                }
                say("source: took its bitmaps back from the dead destination (store active, write locks held); the guest resumed");
                // The session stays: a destination that is truly gone kept nothing, and a
                // new one starts afresh on a Hello that names it; one that outlived the
                // unknown outcome (its answer came too late) keeps this migration's RAM,
                // and refuses every Hello that does not resume it.
            }
            Err(
                e @ (MigrationError::OutcomeUnknown(_)
                | MigrationError::AfterStart(_)
                | MigrationError::SourceNotResumed { .. }),
            ) => {
                // The guest must not run here: stop the threads, leave the image as it is.
                say(format!(
                    "hand-over failed and the source stays stopped: {e}"
                ));
                let _ = source.writer.shutdown();
                source.vcpus.shutdown();
                return Err(e.into());
            }
            Err(e) => {
                say(format!("hand-over failed: {e}"));
                let active = source.store.lock().is_active();
                if !active || disk_state.handed_over() {
                    return Err("the guest resumed but the source store is not active".into());
                }
                // The stop's inactivate ran in this attempt (its figures are reset at each
                // setup) only if the VM stopped.
                if stopped && disk_state.disk_stop().syncs > 0 {
                    say("source: took its bitmaps back (store active, write locks held); the guest resumed");
                } else {
                    say("source: kept its bitmaps (the hand-over never began; store active, write locks held); the guest runs on");
                }
            }
        }
        if attempt < a.attempts && !signals::stop_requested() {
            say(format!("retrying in {} s", retry_after.as_secs_f64()));
            // A stop request during the wait ends it at once; the next attempt sees it
            // before it starts.
            signals::sleep_unless_stopped(retry_after);
        }
    }
    source.run_on_and_stop(run_for)
}

#[cfg(test)]
mod tests {
    use super::{count_missing, missing, missing_on_disk, read_log};
    use crate::migrate_run::{counted_in_store, counted_on_disk, lost_marks};
    use dirty_bitmap::storage::FileStorage;
    use dirty_bitmap::{BitmapState, BitmapStore, OpenMode, Recording};
    use std::io::Write as _;

    /// `a_mark_only_in_the_parked_copy_is_missing_on_disk` below: after `inactivate`,
    /// `store.load` is the parked in-memory copy ORed with the disk, so the "missing on
    /// disk" counts of `migrate listen`, `send` and the demo do not use it: they would
    /// count a mark the stop never wrote as present. A mark made through a tracker after
    /// the inactivate lands in the parked copy only: the disk counts must find it missing,
    /// and still find the mark made before.
    ///
    /// With a disabled bitmap `old` in use on disk before the run (a crash left it so;
    /// `activate` leaves it alone), only the bitmaps the store holds consistent are looked
    /// at: counting `old` would make every count an error ("bitmap old is in use on disk"),
    /// and a `listen` or `send` that handed over would exit 1.
    /// An image at `dir/i.qcow2` whose one bitmap `name` a crash left in use (activated,
    /// then dropped active), opened writable again: `name` reads inconsistent.
    fn crashed_with(
        dir: &tempfile::TempDir,
        name: &str,
        recording: Recording,
    ) -> (std::path::PathBuf, BitmapStore<FileStorage>) {
        let path = dir.path().join("i.qcow2");
        let mut store =
            BitmapStore::create(FileStorage::create(&path).unwrap(), 1 << 30, 65536).unwrap();
        store.add(name, 65536, recording).unwrap();
        store.activate().unwrap();
        drop(store);
        let store = BitmapStore::open(
            FileStorage::open(&path, OpenMode::ReadWrite).unwrap(),
            OpenMode::ReadWrite,
        )
        .unwrap();
        assert_eq!(store.list()[0].state, BitmapState::Inconsistent);
        (path, store)
    }

    #[test]
    fn a_mark_only_in_the_parked_copy_is_missing_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut store) = crashed_with(&dir, "old", Recording::Disabled);
        store.add("b", 65536, Recording::Enabled).unwrap();
        store.activate().unwrap();
        let tracker = store.tracker().unwrap();
        let (before, after) = (0u64, 1u64 << 20);
        tracker.mark(before, 4096);
        store.inactivate().unwrap();
        tracker.mark(after, 4096);
        // The premise: the store's own view holds the mark made after the stop.
        assert_eq!(missing(&store, &[(after, 4096)]).unwrap(), 0);
        assert_eq!(lost_marks(&counted_in_store(&store).unwrap(), &[after]), 0);
        let p = path.as_path();
        assert_eq!(missing_on_disk(&store, p, &[(before, 4096)]).unwrap(), 0);
        assert_eq!(missing_on_disk(&store, p, &[(after, 4096)]).unwrap(), 1);
        let on_disk = counted_on_disk(&store, p).unwrap();
        assert_eq!(lost_marks(&on_disk, &[before]), 0);
        assert_eq!(lost_marks(&on_disk, &[before, after]), 1);
        // The premise: `old` is still in use on disk.
        let disk =
            BitmapStore::open(FileStorage::open_shared(p).unwrap(), OpenMode::ReadOnly).unwrap();
        let old = disk.list().into_iter().find(|b| b.name == "old").unwrap();
        assert!(old.in_use && !old.enabled);
    }

    /// The counts leave out only the *disabled* bitmaps inconsistent at the open (the test
    /// above). An *enabled* one records nothing (`activate` leaves it alone), so leaving it
    /// out would make a run whose only enabled bitmap a crash left `in_use` count over no
    /// bitmap and report 0 missing. Such a bitmap is an error, in memory and on disk, in
    /// `dbm migrate` and in the demo's and drill's counts.
    #[test]
    fn an_enabled_bitmap_inconsistent_at_the_open_is_an_error_never_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut store) = crashed_with(&dir, "b", Recording::Enabled);
        store.activate().unwrap();
        store.inactivate().unwrap();
        let p = path.as_path();
        let marks = [(0u64, 4096u64)];
        assert!(missing(&store, &marks).is_err(), "counted over no bitmap");
        assert!(missing_on_disk(&store, p, &marks).is_err());
        assert!(counted_in_store(&store).is_err());
        assert!(counted_on_disk(&store, p).is_err());
    }

    /// A store whose bitmap is disabled or gone has no bitmap to count over: counting
    /// anyway, the demo, the drill and `migrate listen --check-log` would find every mark
    /// present and say "0 lost". A count over no enabled bitmap is an error; and a mark is
    /// present only if every byte of its 4 KiB write is dirty, in the demo's and drill's
    /// count too: its first granule alone is, below 4 KiB granularity, one of several bits
    /// the write sets.
    #[test]
    fn a_count_over_no_enabled_bitmap_is_an_error_and_every_granule_of_a_write_counts() {
        for recording in [None, Some(Recording::Disabled)] {
            let mut store =
                BitmapStore::create(dirty_bitmap::storage::MemStorage::new(), 1 << 30, 65536)
                    .unwrap();
            if let Some(r) = recording {
                store.add("b", 65536, r).unwrap();
            }
            store.activate().unwrap();
            assert!(
                counted_in_store(&store).is_err(),
                "{recording:?}: counted over no bitmap"
            );
            assert!(missing(&store, &[(0, 4096)]).is_err(), "{recording:?}");
        }
        let b = dirty_bitmap::DirtyBitmap::new(1 << 20, 512).unwrap();
        b.mark_dirty(0, 4096);
        assert_eq!(lost_marks(std::slice::from_ref(&b), &[0]), 0);
        b.clear(1024, 512);
        assert_eq!(
            lost_marks(&[b], &[0]),
            1,
            "a middle granule lost, not counted"
        );
        // A disk under 4 KiB: the writer's marks are cut at its end, and are all there.
        let small = dirty_bitmap::DirtyBitmap::new(1024, 512).unwrap();
        small.mark_dirty(0, 4096);
        assert_eq!(
            lost_marks(&[small], &[0]),
            0,
            "a mark cut at the disk's end"
        );
    }

    /// A log line whose mark would end past the last byte offset is refused, as any other
    /// malformed line is, rather than overflowing where its last byte is computed.
    #[test]
    fn a_mark_ending_past_2_pow_64_is_a_malformed_line() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        writeln!(f, "0 4096").unwrap();
        writeln!(f, "18446744073709551615 1").unwrap();
        f.flush().unwrap();
        assert_eq!(read_log(f.path()).unwrap(), vec![(0, 4096), (u64::MAX, 1)]);
        writeln!(f, "18446744073709551615 2").unwrap();
        f.flush().unwrap();
        let e = read_log(f.path()).unwrap_err();
        assert!(e.contains("line 3 is not `offset length`"), "{e}");
    }

    /// A mark counts as present only when every granule of it is dirty, not only its first
    /// and last bytes: below 4 KiB granularity a lost bit between them must be seen.
    #[test]
    fn a_mark_missing_a_middle_granule_is_counted_missing() {
        let b = dirty_bitmap::DirtyBitmap::new(1 << 20, 512).unwrap();
        b.mark_dirty(0, 4096);
        b.mark_dirty(8192, 4096);
        assert_eq!(
            count_missing(std::slice::from_ref(&b), &[(0, 4096), (8192, 4096)]),
            0
        );
        b.clear(1024, 512);
        assert_eq!(
            count_missing(std::slice::from_ref(&b), &[(0, 4096), (8192, 4096)]),
            1
        );
        assert_eq!(count_missing(std::slice::from_ref(&b), &[(4096, 4096)]), 1);
    }

    /// A mark at or past the disk's end (a log of a larger disk) counts missing, though
    /// `next_clean` finds no clean bit there. One that crosses the end is there up to it,
    /// as the writer marks it on a disk under 4 KiB: `send` and `listen` count such a mark
    /// present (no exit 2), as the demo's counter, `migrate_run::lost_marks`, does.
    #[test]
    fn a_mark_past_the_disks_end_is_counted_missing() {
        let disk = 1 << 20;
        let b = dirty_bitmap::DirtyBitmap::new(disk, 512).unwrap();
        b.mark_dirty(0, disk);
        let marks = [(0, 4096), (disk - 4096, 4096), (disk - 4096, 8192)];
        assert_eq!(count_missing(std::slice::from_ref(&b), &marks), 0);
        for m in [(disk, 4096), (u64::MAX, 1)] {
            assert_eq!(count_missing(std::slice::from_ref(&b), &[m]), 1, "{m:?}");
        }
        b.clear(disk - 512, 512);
        assert_eq!(
            count_missing(std::slice::from_ref(&b), &[(disk - 4096, 8192)]),
            1
        );
        // A disk under 4 KiB: the writer's marks, cut at its end, are all there.
        let small = dirty_bitmap::DirtyBitmap::new(2048, 512).unwrap();
        small.mark_dirty(0, 4096);
        assert_eq!(count_missing(std::slice::from_ref(&small), &[(0, 4096)]), 0);
        assert_eq!(
            crate::migrate_run::lost_marks(std::slice::from_ref(&small), &[0]),
            0
        );
    }
}
