//! `dbm simulate`: the virtual-clock scenario sweep of the migration loop.
//!
//! Prints the number of switchovers, downtime-limit violations, the largest overshoot and
//! the non-converging runs; exits 0 when no switchover exceeded its limit, every
//! destination RAM matched its source and no scenario's migration ended in an error, 2
//! otherwise (1 when the command itself fails, as every command).
//!
//! The JSON form is one object with keys in sorted order:
//!
//! ```json
//! { "content-mismatches": 0, "empty-window-runs": 95, "equal-at-switch": 79,
//!   "equal-estimate-runs": 100, "equality-scenarios": 100, "errors": 0,
//!   "failing-seeds": [], "largest-overshoot-ms": 0.0, "non-converging": 47,
//!   "postcopy": 150, "rule": "fixed", "scenarios": 1000, "seed": 1, "switchovers": 953,
//!   "violations": 0, "zero-threshold-runs": 120 }
//! ```

use std::fmt::Write as _;
use std::process::ExitCode;

use dirty_bitmap::migration::precopy::Rule;
use dirty_bitmap::migration::sim;
use serde_json::json;

use crate::out::emit;
use crate::CmdResult;

/// Options of `dbm simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Number of scenarios.
    #[arg(long, default_value_t = 10_000)]
    pub scenarios: u64,
    /// Sweep seed (default: random; printed either way).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run with QEMU 10.1's comparison pair (`<` gate, `<=` switchover on the estimate),
    /// to see its violations.
    #[arg(long, hide = true)]
    pub qemu_10_1_rule: bool,
}

/// Runs the sweep and reports it.
pub fn run(args: &SimulateArgs) -> CmdResult {
    let seed = args.seed.unwrap_or_else(rand::random);
    let rule = if args.qemu_10_1_rule {
        Rule::Qemu101
    } else {
        Rule::Fixed
    };
    let r = sim::sweep(args.scenarios, seed, rule)?;
    let rule_name = if args.qemu_10_1_rule {
        "qemu-10.1"
    } else {
        "fixed"
    };
    let text = if args.json {
        let v = json!({
            "content-mismatches": r.content_mismatches,
            "disk-scenarios": r.disk_scenarios,
            "stream-scenarios": r.stream_scenarios,
            "stream-equal": r.stream_equal,
            "disk-switchovers": r.disk_switchovers,
            "largest-disk-stop-ms": r.largest_disk_stop_ms,
            "empty-window-runs": r.empty_window_seen,
            "equal-at-switch": r.equal_at_switch,
            "equal-estimate-runs": r.equal_estimate_seen,
            "equality-scenarios": r.equality_scenarios,
            "errors": r.errors,
            "failing-seeds": r.failing_seeds,
            "largest-overshoot-ms": r.largest_overshoot_ms,
            "non-converging": r.non_converging,
            "postcopy": r.postcopy,
            "rule": rule_name,
            "scenarios": r.scenarios,
            "seed": seed,
            "switchovers": r.switchovers,
            "violations": r.violations,
            "zero-threshold-runs": r.zero_threshold_seen,
        });
        format!("{v}\n")
    } else {
        let mut s = String::new();
        let _ = writeln!(s, "seed {seed}, rule {rule_name}");
        let _ = writeln!(
            s,
            "scenarios {} ({} with an estimate set to equal the threshold)",
            r.scenarios, r.equality_scenarios
        );
        let _ = writeln!(s, "switchovers {} ({} postcopy)", r.switchovers, r.postcopy);
        let _ = writeln!(
            s,
            "with a disk bitmap on shared storage {} ({} switched over, longest disk stop \
             {:.3} ms, inside the downtime)",
            r.disk_scenarios, r.disk_switchovers, r.largest_disk_stop_ms
        );
        let _ = writeln!(
            s,
            "with a disk bitmap streamed to the destination's own image {} ({} switched over \
             with the destination's bitmap equal to the source's at the stop, or after a \
             postcopy switch holding all of it)",
            r.stream_scenarios, r.stream_equal
        );
        let _ = writeln!(s, "downtime-limit violations {}", r.violations);
        match r.largest_overshoot_ms {
            Some(o) => {
                let _ = writeln!(
                    s,
                    "largest overshoot {o:.3} ms (negative: within the limit)"
                );
            }
            None => {
                let _ = writeln!(s, "largest overshoot - (no switchover)");
            }
        }
        let _ = writeln!(s, "non-converging runs {}", r.non_converging);
        let _ = writeln!(s, "content mismatches {}", r.content_mismatches);
        let _ = writeln!(s, "errors {}", r.errors);
        let _ = writeln!(
            s,
            "edges: estimate == threshold in {} runs, switch at pending == threshold {}, \
             threshold 0 in {} runs, empty window in {} runs",
            r.equal_estimate_seen, r.equal_at_switch, r.zero_threshold_seen, r.empty_window_seen
        );
        if !r.failing_seeds.is_empty() {
            let _ = writeln!(s, "failing scenario seeds {:?}", r.failing_seeds);
        }
        s
    };
    emit(&text)?;
    Ok(if r.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
