//! A whole migration over TCP on 127.0.0.1 in one process, for the demo, `dbm bench
//! migrate` and the tests (feature `testing`): a guest of `pages` pages with a
//! [`Workload`], a [`TcpDestination`], one migration through [`migrate_to`], the
//! per-iteration records and the checksums of both RAMs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::error::{MigrationError, Result};
use super::guest::{new_log, GuestRam, PAGE_SIZE};
use super::precopy::{
    AutoConverge, Controller, Directive, IterationReport, Kind, LoopConfig, Outcome, StallAction,
    StallReport,
};
use super::ram::{RamState, SetupMode, RAM_ID};
use super::state::MigrationState;
use super::tcp::{migrate_to, DestOptions, SourceOptions, TcpDestination, DEFAULT_TIMEOUT};
use super::workload::{Workload, WorkloadConfig};
use crate::rng::SplitMix64;
use crate::units::{Bytes, BytesPerMs};

/// Parameters of [`migrate_over_tcp`].
#[derive(Debug, Clone, Copy)]
pub struct TcpMigration {
    /// Guest RAM in pages of [`PAGE_SIZE`] bytes.
    pub pages: u64,
    /// The vCPUs' writes.
    pub workload: WorkloadConfig,
    /// The loop's parameters (downtime limit, `max_bandwidth`, postcopy).
    pub loop_config: LoopConfig,
    /// Pages per RAM section.
    pub batch_pages: usize,
    /// How long the guest runs before the migration starts.
    pub warmup: Duration,
    /// Every timeout on both sides.
    pub timeout: Duration,
    /// The stall policy.
    pub auto_converge: AutoConverge,
    /// Postcopy: pages the destination guest reads at once when it starts.
    pub postcopy_touches: u32,
}

impl Default for TcpMigration {
    fn default() -> Self {
        TcpMigration {
            pages: 4096,
            workload: WorkloadConfig {
                vcpus: 2,
                writes_per_sec: 20_000,
                pattern: super::workload::Pattern::HOT_90_5,
                seed: 1,
            },
            loop_config: LoopConfig::default(),
            batch_pages: 64,
            warmup: Duration::from_millis(50),
            timeout: DEFAULT_TIMEOUT,
            auto_converge: AutoConverge::default(),
            postcopy_touches: 64,
        }
    }
}

/// One turn of the loop, for an `info migrate`-like line.
#[derive(Debug, Clone, Copy)]
pub struct IterationRecord {
    /// Turn number, from 0.
    pub iteration: u64,
    /// Time since the migration started.
    pub at: Duration,
    /// Pending bytes the loop decided on (exact if `exact`, else the estimate), control
    /// frames included.
    pub pending: Bytes,
    /// Whether `pending` is exact (the dirty log was synced).
    pub exact: bool,
    /// Bytes that fit the downtime limit at the measured bandwidth.
    pub threshold: Bytes,
    /// Measured bandwidth.
    pub bandwidth: BytesPerMs,
    /// Bytes newly dirtied per ms, measured between exact queries.
    pub dirty_rate: Option<BytesPerMs>,
    /// RAM pages put on the wire so far (a page sent twice counts twice).
    pub pages_sent: u64,
    /// Bytes on the wire so far.
    pub bytes_sent: Bytes,
    /// vCPU throttle, percent.
    pub throttle: u8,
}

fn mib(b: f64) -> f64 {
    b / f64::from(1u32 << 20)
}

impl std::fmt::Display for IterationRecord {
    /// `iter 3 at 0.412 s: pending 12.3 MiB (exact), threshold 38.4 MiB, bandwidth 128.0 MiB/s,
    /// dirty rate 4.1 MiB/s, pages sent 12345, throttle 0 %`
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "iter {} at {:.3} s: pending {:.1} MiB ({}), threshold {:.1} MiB, bandwidth {:.1} MiB/s, \
             dirty rate ",
            self.iteration,
            self.at.as_secs_f64(),
            mib(self.pending.get() as f64),
            if self.exact { "exact" } else { "estimate" },
            mib(self.threshold.get() as f64),
            mib(self.bandwidth.get() * 1000.0),
        )?;
        match self.dirty_rate {
            Some(r) => write!(f, "{:.1} MiB/s", mib(r.get() * 1000.0))?,
            None => write!(f, "-")?,
        }
        write!(
            f,
            ", pages sent {}, throttle {} %",
            self.pages_sent, self.throttle
        )
    }
}

/// What [`migrate_over_tcp`] measured.
#[derive(Debug, Clone)]
pub struct TcpOutcome {
    /// The loop's figures.
    pub outcome: Outcome,
    /// VM stop to the destination's Started, as the source saw it (zero if the loop gave
    /// up and the guest never stopped).
    pub downtime: Duration,
    /// Start of the migration to its end.
    pub total_time: Duration,
    /// One record per loop turn.
    pub iterations: Vec<IterationRecord>,
    /// RAM pages put on the wire (a page sent twice counts twice).
    pub pages_sent: u64,
    /// Guest RAM in pages.
    pub ram_pages: u64,
    /// On the wire, source to destination.
    pub wire_bytes: Bytes,
    /// Page writes the vCPUs made.
    pub guest_writes: u64,
    /// CRC32 of the source RAM at VM stop (at the end if the guest never stopped).
    pub source_checksum: u32,
    /// CRC32 of the destination RAM after the migration, if it completed.
    pub dest_checksum: Option<u32>,
    /// Pages whose CRC32 differs between source and destination (0 when equal; all pages
    /// when the migration did not complete).
    pub pages_differing: u64,
}

/// Per-page CRC32s and the CRC32 of the whole, of `pages` pages read by `read`.
fn checksums(pages: u64, mut read: impl FnMut(u64, &mut [u8])) -> (Vec<u32>, u32) {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut all = crc32fast::Hasher::new();
    let mut per = Vec::with_capacity(pages as usize);
    for p in 0..pages {
        read(p, &mut page);
        per.push(crc32fast::hash(&page));
        all.update(&page);
    }
    (per, all.finalize())
}

/// Records every turn, tells the caller, and defers the stall policy.
struct Recorder<'a> {
    inner: AutoConverge,
    pages: Arc<AtomicU64>,
    records: Vec<IterationRecord>,
    on_iteration: &'a mut dyn FnMut(&IterationRecord),
}

impl Controller for Recorder<'_> {
    fn on_iteration(&mut self, r: &IterationReport) -> Directive {
        let rec = IterationRecord {
            iteration: r.iteration,
            at: r.at,
            pending: r.pending.total(),
            exact: r.exact,
            threshold: r.threshold,
            bandwidth: r.bandwidth,
            dirty_rate: r.dirty_rate,
            pages_sent: self.pages.load(Ordering::Relaxed),
            bytes_sent: r.bytes_sent,
            throttle: r.throttle,
        };
        (self.on_iteration)(&rec);
        self.records.push(rec);
        Directive::Continue
    }

    fn on_stall(&mut self, report: &StallReport) -> StallAction {
        self.inner.on_stall(report)
    }
}

/// A whole migration over loopback TCP: a guest of `cfg.pages` pages (filled with
/// content) and its vCPU [`Workload`], a [`TcpDestination`], one attempt; then the
/// checksums of both RAMs.
///
/// # Errors
/// [`MigrationError::InvalidInput`] for bad parameters; the errors of [`migrate_to`] and
/// [`TcpDestination`] (the destination's own error when it has one).
pub fn migrate_over_tcp(cfg: &TcpMigration) -> Result<TcpOutcome> {
    migrate_over_tcp_with(cfg, &mut |_| {})
}

/// As [`migrate_over_tcp`], calling `on_iteration` at every turn of the loop (to print
/// `info migrate`-like lines as it goes).
///
/// # Errors
/// As [`migrate_over_tcp`].
pub fn migrate_over_tcp_with(
    cfg: &TcpMigration,
    on_iteration: &mut dyn FnMut(&IterationRecord),
) -> Result<TcpOutcome> {
    let ram = Arc::new(GuestRam::new(cfg.pages)?);
    let mut init = SplitMix64::new(cfg.workload.seed ^ 0x1417);
    for p in 0..cfg.pages {
        // One page in sixteen stays zero (sent as a flag).
        let v = init.next_u64();
        if !v.is_multiple_of(16) {
            ram.fill_page(p, v);
        }
    }
    let log = Arc::new(new_log(&ram)?);
    let mut state = RamState::new(
        RAM_ID,
        Arc::clone(&ram),
        Arc::clone(&log),
        SetupMode::Full,
        cfg.loop_config.postcopy,
        cfg.batch_pages,
    )?;
    let dest = TcpDestination::spawn(DestOptions {
        postcopy_touches: cfg.postcopy_touches,
        timeout: cfg.timeout,
        seed: cfg.workload.seed,
        ..DestOptions::default()
    })?;
    let mut vm = Workload::start(Arc::clone(&ram), Arc::clone(&log), cfg.workload)?;
    std::thread::sleep(cfg.warmup);
    let mut rec = Recorder {
        inner: cfg.auto_converge,
        pages: state.pages_sent_counter(),
        records: Vec::new(),
        on_iteration,
    };
    let source = migrate_to(
        dest.addr(),
        &SourceOptions {
            loop_config: cfg.loop_config,
            timeout: cfg.timeout,
            ..SourceOptions::default()
        },
        &mut vm,
        &mut [&mut state as &mut dyn MigrationState],
        &mut rec,
    );
    let guest_writes = vm.writes();
    let report = dest.join()?;
    let source = match source {
        Ok(s) => s,
        Err(e) => {
            vm.shutdown();
            // The destination's error says more about a corrupt stream than its Abort.
            let dest_err = report.attempts.into_iter().find_map(|a| a.error);
            return Err(match (e, dest_err) {
                (MigrationError::PeerAborted(_), Some(d)) => d,
                (e, _) => e,
            });
        }
    };
    // With the guest stopped (a completed migration), its RAM is the RAM at stop.
    let (src_pages, source_checksum) = checksums(cfg.pages, |p, b| ram.read_page(p, b));
    let (dest_checksum, pages_differing) = match (&source.outcome.kind, &report.guest) {
        (Kind::Completed | Kind::Postcopy, Some(g)) => {
            let (dst_pages, sum) = checksums(cfg.pages, |p, b| {
                if let Some(page) = g.page(p) {
                    b.copy_from_slice(page);
                }
            });
            let differing = src_pages
                .iter()
                .zip(&dst_pages)
                .filter(|(a, b)| a != b)
                .count() as u64;
            (Some(sum), differing)
        }
        _ => (None, cfg.pages),
    };
    vm.shutdown();
    Ok(TcpOutcome {
        outcome: source.outcome,
        downtime: source.outcome.downtime,
        total_time: source.outcome.total_time,
        iterations: rec.records,
        pages_sent: state.stats().pages_sent,
        ram_pages: cfg.pages,
        wire_bytes: source.wire.bytes,
        guest_writes,
        source_checksum,
        dest_checksum,
        pages_differing,
    })
}
