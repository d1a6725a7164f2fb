//! Migrations over TCP on 127.0.0.1 with real vCPU threads and the real clock.

mod common;

use std::time::Duration;

use dirty_bitmap::migration::tcp::{migrate_over_tcp, TcpMigration};
use dirty_bitmap::migration::{BytesPerMs, Kind, LoopConfig, Millis, Pattern, WorkloadConfig};

fn env(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(d)
}

#[test]
fn experiment() {
    let bw = env("X_BW", 0);
    let cfg = TcpMigration {
        pages: env("X_PAGES", 1024),
        workload: WorkloadConfig {
            vcpus: 2,
            writes_per_sec: env("X_WPS", 20000),
            pattern: Pattern::HOT_90_5,
            seed: 1,
        },
        loop_config: LoopConfig {
            downtime_limit: Millis(env("X_LIMIT", 50)),
            max_bandwidth: (bw > 0).then(|| BytesPerMs::from_bytes_per_sec(bw << 20)),
            ..LoopConfig::default()
        },
        warmup: Duration::from_millis(20),
        ..TcpMigration::default()
    };
    let mut d = vec![];
    for i in 0..env("X_RUNS", 10) {
        let mut c = cfg;
        c.workload.seed = i;
        let o = migrate_over_tcp(&c).unwrap();
        if env("X_V", 0) > 0 {
            for r in &o.iterations {
                eprintln!("{r}");
            }
        }
        assert_eq!(o.outcome.kind, Kind::Completed);
        assert_eq!(o.pages_differing, 0);
        eprintln!(
            "run {i}: downtime {:.1} ms total {:.0} ms iters {} thr {} pend {} indown {}",
            o.downtime.as_secs_f64() * 1e3,
            o.total_time.as_secs_f64() * 1e3,
            o.iterations.len(),
            o.outcome.threshold_at_switch.get(),
            o.outcome.pending_at_switch.total().get(),
            o.outcome.bytes_in_downtime.get()
        );
        d.push(o.downtime.as_secs_f64() * 1e3);
    }
    d.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!("{d:.1?}");
}
