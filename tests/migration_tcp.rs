//! Migrations over TCP on 127.0.0.1 with real vCPU threads and the real clock.

mod common;

use std::time::Duration;

use dirty_bitmap::migration::tcp::{migrate_over_tcp, TcpMigration};
use dirty_bitmap::migration::{BytesPerMs, Kind, LoopConfig, Millis};

#[test]
fn smoke_migrate_over_tcp() {
    let cfg = TcpMigration {
        pages: 1024,
        loop_config: LoopConfig {
            downtime_limit: Millis(50),
            max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(16 << 20)),
            ..LoopConfig::default()
        },
        warmup: Duration::from_millis(20),
        ..TcpMigration::default()
    };
    let o = migrate_over_tcp(&cfg).unwrap();
    for r in &o.iterations {
        eprintln!("{r}");
    }
    eprintln!("downtime {:?} total {:?} pages {}", o.downtime, o.total_time, o.pages_sent);
    assert_eq!(o.outcome.kind, Kind::Completed);
    assert_eq!(o.pages_differing, 0);
    assert_eq!(Some(o.source_checksum), o.dest_checksum);
}
