//! The stop loop: flush until what is left to write at the stop fits the downtime budget,
//! deciding on an exact figure with the one comparison the migration loop uses.

use super::FlushStats;
use crate::error::Result;
use crate::units::{self, Bytes, BytesPerMs, Millis};

/// How many estimate/exact/flush rounds [`run_stop_loop`] runs before it gives up and
/// reports that it did not converge (marks outpacing the flushes).
pub const MAX_STOP_ROUNDS: u32 = 1000;

/// What the stop loop works on: a cheap estimate, an exact count, and a flush.
pub trait StopSource {
    /// The cheap estimate of the pending bytes (may be stale or imprecise).
    fn estimate(&mut self) -> u64;
    /// The exact pending bytes now. Must not lose what it counts.
    ///
    /// # Errors
    /// As the source's I/O.
    fn exact(&mut self) -> Result<u64>;
    /// Writes what is pending now.
    ///
    /// # Errors
    /// As the source's I/O.
    fn flush(&mut self) -> Result<FlushStats>;
}

/// What [`run_stop_loop`] (and the store's `prepare_stop`, which runs it) ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StopReport {
    /// The byte budget: [`units::threshold`] of the bandwidth and the downtime limit.
    pub threshold: Bytes,
    /// The pending bytes the decision was taken on. When `converged`, it came from the exact
    /// query and [`units::fits`] the budget.
    pub pending: Bytes,
    /// Whether the loop stopped because `pending` fit the budget (rather than after
    /// [`MAX_STOP_ROUNDS`]).
    pub converged: bool,
    /// Rounds run.
    pub rounds: u32,
    /// Exact queries run.
    pub exact_queries: u32,
    /// The flushes the loop ran, summed.
    pub flushed: FlushStats,
}

/// Flushes until the exact pending bytes fit the budget `threshold(bandwidth,
/// downtime_limit)` (the bytes that can be sent within the limit at the bandwidth, as the
/// migration loop computes its switchover threshold): each round reads the estimate, runs
/// the exact query if the estimate [`units::fits`] the budget, stops if the figure it has
/// fits (which, with the same comparison on both sides, is always the exact one), and
/// flushes otherwise. The one comparison on both sides keeps the two from disagreeing
/// (QEMU's 7aaa1fc072 gated with `<` and decided with `<=`, and switched over on a stale
/// estimate equal to the threshold; fixed by 455a6167f254).
///
/// # Errors
/// The first error of the source.
pub fn run_stop_loop<P: StopSource + ?Sized>(
    src: &mut P,
    bandwidth: BytesPerMs,
    downtime_limit: Millis,
) -> Result<StopReport> {
    run_stop_loop_with(src, bandwidth, downtime_limit, units::fits, units::fits)
}

/// [`run_stop_loop`] with the gate (estimate → exact query) and the decision comparisons
/// given separately. [`run_stop_loop`] passes [`units::fits`] for both; the tests (feature
/// `testing`, which re-exports this from [`crate::flush`]) pass QEMU's buggy pair to show
/// what it would have done.
///
/// # Errors
/// The first error of the source.
pub fn run_stop_loop_with<P: StopSource + ?Sized>(
    src: &mut P,
    bandwidth: BytesPerMs,
    downtime_limit: Millis,
    gate: fn(Bytes, Bytes) -> bool,
    decide: fn(Bytes, Bytes) -> bool,
) -> Result<StopReport> {
    let threshold = units::threshold(bandwidth, downtime_limit);
    let mut report = StopReport {
        threshold,
        pending: Bytes::ZERO,
        converged: false,
        rounds: 0,
        exact_queries: 0,
        flushed: FlushStats::default(),
    };
    while report.rounds < MAX_STOP_ROUNDS {
        report.rounds = report.rounds.saturating_add(1);
        let mut pending = Bytes(src.estimate());
        if gate(pending, threshold) {
            pending = Bytes(src.exact()?);
            report.exact_queries = report.exact_queries.saturating_add(1);
        }
        report.pending = pending;
        if decide(pending, threshold) {
            report.converged = true;
            return Ok(report);
        }
        let s = src.flush()?;
        report.flushed.accumulate(&s);
    }
    Ok(report)
}
