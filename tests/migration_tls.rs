//! Migrations over TCP with TLS and certificates (`migration::tls`), both ends
//! authenticated as QEMU's `tls-creds-x509` with `verify-peer=on`. The certificates are
//! made at run time (`common::pki`) into a temporary directory, in QEMU's layout.
//!
//! - A hand-over over TLS arrives byte for byte, and nothing of the plain stream shows on
//!   the wire.
//! - Refusals are typed and leave the source's guest running: a source whose certificate
//!   another CA signed, a destination whose certificate does not name the server, a plain
//!   source against a TLS destination (within the timeout, no hang), a TLS source against a
//!   plain destination, a second source while one is served. A retry after a refused attempt, and after one cut mid-stream (the
//!   destination resumes the RAM it kept), completes.
//! - The destination's deadlines hold over TLS: a peer that drips raw bytes that never
//!   make a record is cut off at the read timeout.
//! - Credentials that do not load are typed errors.
//!
//! Every wait has a timeout: a hang fails the test.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::pki::Ca;
use dirty_bitmap::migration::guest::new_log;
use dirty_bitmap::migration::precopy::{Directive, StallAction, StallReport};
use dirty_bitmap::migration::tcp::{
    migrate_in_session, DestOptions, DestReport, Session, SourceOptions, SourceReport,
    TcpDestination,
};
use dirty_bitmap::migration::tls::{TlsClient, TlsCreds, TlsServer};
use dirty_bitmap::migration::{
    BytesPerMs, Controller, GuestRam, Kind, LoopConfig, MigrationError, MigrationState, Pattern,
    RamState, SetupMode, TlsError, Workload, WorkloadConfig, PAGE_SIZE, RAM_ID,
};
use dirty_bitmap::rng::SplitMix64;
use dirty_bitmap::DirtyBitmap;

/// Guest RAM: 4 MiB.
const PAGES: u64 = 1024;

// The postcopy test runs alone (`common::exclusive`); the others share the machine
// (`common::shared`). Its source stops pushing once every page went, and a page request
// that reaches it after that is answered by the push, not served: on two busy CPUs the
// destination's first request came too late now and then, and the test saw no request
// served.
use common::{exclusive, shared};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Keeps going on stalls.
struct NoStall;

impl Controller for NoStall {
    fn on_stall(&mut self, _: &StallReport) -> StallAction {
        StallAction::KeepGoing
    }
}

/// A configuration that converges quickly: no rate limit.
fn converging() -> LoopConfig {
    LoopConfig {
        max_bandwidth: None,
        ..LoopConfig::default()
    }
}

/// The source guest: RAM with content, its log, running vCPUs, and its migration.
struct Source {
    ram: Arc<GuestRam>,
    log: Arc<DirtyBitmap>,
    vm: Workload,
    session: Session,
}

impl Source {
    fn new(seed: u64) -> Source {
        let ram = Arc::new(GuestRam::new(PAGES).unwrap());
        let mut rng = SplitMix64::new(seed);
        for p in 0..PAGES {
            ram.fill_page(p, rng.next_u64());
        }
        let log = Arc::new(new_log(&ram).unwrap());
        let vm = Workload::start(
            Arc::clone(&ram),
            Arc::clone(&log),
            WorkloadConfig {
                vcpus: 2,
                writes_per_sec: 20_000,
                pattern: Pattern::HOT_90_5,
                seed,
            },
        )
        .unwrap();
        Source {
            ram,
            log,
            vm,
            session: Session::new(),
        }
    }

    fn state(&self, mode: SetupMode) -> RamState {
        RamState::new(
            RAM_ID,
            Arc::clone(&self.ram),
            Arc::clone(&self.log),
            mode,
            false,
            32,
        )
        .unwrap()
    }

    /// One attempt of this source's migration to `addr`, with `tls` (or plain TCP).
    fn migrate(
        &mut self,
        addr: SocketAddr,
        tls: Option<TlsClient>,
        timeout: Duration,
        state: &mut RamState,
    ) -> dirty_bitmap::migration::Result<SourceReport> {
        migrate_in_session(
            addr,
            &SourceOptions {
                loop_config: converging(),
                timeout,
                tls,
                ..SourceOptions::default()
            },
            &mut self.session,
            &mut self.vm,
            &mut [state as &mut dyn MigrationState],
            &mut NoStall,
        )
    }

    /// The guest runs: its vCPUs keep writing.
    fn assert_running(&self) {
        let before = self.vm.writes();
        let deadline = Instant::now() + TIMEOUT;
        while self.vm.writes() == before {
            assert!(Instant::now() < deadline, "the source guest does not run");
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// After a completed migration: the destination's RAM is the source's at stop.
    fn assert_same_ram(&self, report: &DestReport) {
        let guest = report.guest.as_ref().expect("the destination has no guest");
        let src = self.ram.snapshot();
        let dst = guest.ram();
        assert_eq!(dst.len(), src.len());
        for (p, (a, b)) in src
            .chunks_exact(PAGE_SIZE)
            .zip(dst.chunks_exact(PAGE_SIZE))
            .enumerate()
        {
            assert_eq!(
                crc32fast::hash(a),
                crc32fast::hash(b),
                "page {p} differs on the destination"
            );
        }
        assert!(
            src == dst,
            "destination RAM differs from the source at stop"
        );
    }
}

/// A CA's credentials in a temporary directory, QEMU's layout; the server certificate
/// names `localhost` and 127.0.0.1.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new(ca: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        Ca::new(ca).write_dir(dir.path(), &["localhost", "127.0.0.1"]);
        Pki { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn server(&self) -> TlsServer {
        TlsServer::new(&TlsCreds::server_dir(self.path())).unwrap()
    }

    fn client(&self) -> TlsClient {
        TlsClient::new(&TlsCreds::client_dir(self.path())).unwrap()
    }
}

fn tls_dest(pki: &Pki, max_attempts: u32, timeout: Duration) -> TcpDestination {
    TcpDestination::spawn(DestOptions {
        max_attempts,
        timeout,
        tls: Some(pki.server()),
        ..DestOptions::default()
    })
    .unwrap()
}

/// A proxy that forwards both directions and records what the source sent; from byte
/// `drip_after` of the source's on, it forwards one byte every `gap` (none: all at once).
/// It gives up after [`TIMEOUT`].
fn proxy(
    upstream: SocketAddr,
    drip_after: Option<(usize, Duration)>,
) -> (SocketAddr, JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let server = TcpStream::connect(upstream).unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            s.set_write_timeout(Some(TIMEOUT)).unwrap();
            s.set_nodelay(true).unwrap();
        }
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let back = thread::spawn(move || {
            let _ = std::io::copy(&mut s2, &mut c2);
            let _ = c2.shutdown(Shutdown::Write);
        });
        let (mut from, mut to) = (&client, &server);
        let start = Instant::now();
        let mut recorded = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        'read: while start.elapsed() < TIMEOUT {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            // The bytes before the drip point go at once, the rest a byte per `gap`. A read
            // may straddle the drip point (a short read under load): both parts of it go.
            let whole = match drip_after {
                Some((after, _)) => after.saturating_sub(recorded.len()).min(n),
                None => n,
            };
            recorded.extend_from_slice(&chunk[..whole]);
            if whole > 0 && to.write_all(&chunk[..whole]).is_err() {
                break;
            }
            if let Some((_, gap)) = drip_after {
                for &b in &chunk[whole..] {
                    thread::sleep(gap);
                    if start.elapsed() >= TIMEOUT {
                        break 'read;
                    }
                    recorded.push(b);
                    if to.write_all(&[b]).is_err() {
                        break 'read;
                    }
                }
            }
        }
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
        let _ = back.join();
        recorded
    });
    (addr, t)
}

/// The dripping proxy forwards every byte, in order, when a read straddles the drip point
/// (it once dropped the bytes of such a read before the point, and the destination saw a
/// corrupt TLS record instead of its read timeout).
#[test]
fn the_dripping_proxy_forwards_every_byte_in_order() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up = upstream.local_addr().unwrap();
    let sink = thread::spawn(move || {
        let (mut s, _) = upstream.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let (addr, proxy) = proxy(up, Some((150, Duration::from_millis(1))));
    let sent: Vec<u8> = (0..=255u8).cycle().take(300).collect();
    let mut c = TcpStream::connect(addr).unwrap();
    // Two writes of 100 bytes, then one of 100: whatever the reads coalesce, one of them
    // holds byte 150.
    for part in sent.chunks(100) {
        c.write_all(part).unwrap();
        thread::sleep(Duration::from_millis(20));
    }
    c.shutdown(Shutdown::Write).unwrap();
    let recorded = proxy.join().unwrap();
    let got = sink.join().unwrap();
    assert_eq!(recorded, sent);
    assert_eq!(
        got,
        sent,
        "the upstream got {} of {} bytes",
        got.len(),
        sent.len()
    );
}

/// The one error of a destination's one failed attempt.
fn only_error(report: &DestReport) -> &MigrationError {
    assert!(report.guest.is_none());
    assert_eq!(report.attempts.len(), 1, "{:?}", report.attempts);
    report.attempts[0]
        .error
        .as_ref()
        .expect("the attempt did not fail")
}

/// A whole hand-over over TLS, through a proxy that records the wire: the destination's
/// RAM is the source's at stop, and the source's bytes are TLS records (the first a
/// handshake record), in which the plain stream's magic never shows.
#[test]
fn a_guest_hands_over_over_tls_byte_for_byte() {
    let _g = shared();
    let pki = Pki::new("ca");
    let dest = tls_dest(&pki, 1, TIMEOUT);
    let (addr, recorder) = proxy(dest.addr(), None);
    let mut src = Source::new(1);
    let mut state = src.state(SetupMode::Full);
    // No server name: the destination's certificate must name 127.0.0.1.
    let r = src
        .migrate(addr, Some(pki.client()), TIMEOUT, &mut state)
        .unwrap();
    assert_eq!(r.outcome.kind, Kind::Completed);
    assert!(state.stats().pages_sent >= PAGES);
    let report = dest.join().unwrap();
    assert!(report.attempts[0].error.is_none(), "{:?}", report.attempts);
    src.assert_same_ram(&report);
    let wire = recorder.join().unwrap();
    assert!(wire.len() as u64 > PAGES * 512, "{} bytes", wire.len());
    assert_eq!(wire[0], 0x16, "the first byte is no TLS handshake record");
    // The plain stream's 8-byte header (magic and version): 4 bytes alone would turn up in
    // megabytes of ciphertext about once in a thousand runs.
    let mut header = dirty_bitmap::migration::frame::STREAM_MAGIC
        .to_be_bytes()
        .to_vec();
    header.extend_from_slice(&dirty_bitmap::migration::frame::STREAM_VERSION.to_be_bytes());
    assert!(
        !wire.windows(8).any(|w| w == header.as_slice()),
        "the plain stream's header is on the wire"
    );
}

/// A source whose certificate another CA signed (it trusts the destination's CA) is
/// refused at the handshake: the destination names the unknown issuer, the source the
/// alert; nothing was sent, and the guest runs on. The same source with its own
/// certificate then migrates to the same destination.
#[test]
fn a_source_certificate_from_another_ca_is_refused_and_a_retry_completes() {
    let _g = shared();
    let pki = Pki::new("ca");
    let other = Ca::new("another ca");
    let stranger = tempfile::tempdir().unwrap();
    let (cert, key) = other.leaf(&["migration-source"], true);
    std::fs::copy(
        pki.path().join("ca-cert.pem"),
        stranger.path().join("ca-cert.pem"),
    )
    .unwrap();
    std::fs::write(stranger.path().join("client-cert.pem"), cert).unwrap();
    std::fs::write(stranger.path().join("client-key.pem"), key).unwrap();
    let stranger = TlsClient::new(&TlsCreds::client_dir(stranger.path())).unwrap();

    let dest = tls_dest(&pki, 2, TIMEOUT);
    let mut src = Source::new(2);
    let mut state = src.state(SetupMode::Full);
    let e = src
        .migrate(dest.addr(), Some(stranger), TIMEOUT, &mut state)
        .unwrap_err();
    assert!(
        matches!(&e, MigrationError::Tls(TlsError::RefusedByPeer(alert)) if alert.contains("UnknownCA")),
        "{e}"
    );
    assert_eq!(state.stats().pages_sent, 0);
    assert_eq!(src.session.token(), None);
    src.assert_running();

    let mut state = src.state(SetupMode::Full);
    let r = src
        .migrate(dest.addr(), Some(pki.client()), TIMEOUT, &mut state)
        .unwrap();
    assert_eq!(r.outcome.kind, Kind::Completed);
    let report = dest.join().unwrap();
    assert_eq!(report.attempts.len(), 2, "{:?}", report.attempts);
    assert!(
        matches!(
            report.attempts[0].error,
            Some(MigrationError::Tls(TlsError::UnknownIssuer))
        ),
        "{:?}",
        report.attempts[0].error
    );
    assert!(report.attempts[1].error.is_none());
    src.assert_same_ram(&report);
}

/// A source that does not trust the destination's CA refuses its certificate: the
/// source's error names the unknown issuer.
#[test]
fn a_destination_certificate_from_another_ca_is_refused() {
    let _g = shared();
    let pki = Pki::new("ca");
    let theirs = Pki::new("another ca");
    let dest = tls_dest(&pki, 1, TIMEOUT);
    let mut src = Source::new(3);
    let mut state = src.state(SetupMode::Full);
    let e = src
        .migrate(dest.addr(), Some(theirs.client()), TIMEOUT, &mut state)
        .unwrap_err();
    assert!(
        matches!(e, MigrationError::Tls(TlsError::UnknownIssuer)),
        "{e}"
    );
    let report = dest.join().unwrap();
    assert!(
        matches!(
            only_error(&report),
            MigrationError::Tls(TlsError::RefusedByPeer(_))
        ),
        "{:?}",
        report.attempts
    );
    src.assert_running();
}

/// A source that asks for a server name the destination's certificate does not carry
/// refuses it; asking for one it carries (`localhost`), the retry in the same migration
/// completes.
#[test]
fn a_wrong_server_name_is_refused_and_the_right_one_completes() {
    let _g = shared();
    let pki = Pki::new("ca");
    let dest = tls_dest(&pki, 2, TIMEOUT);
    let mut src = Source::new(4);
    let mut state = src.state(SetupMode::Full);
    let wrong = pki.client().with_server_name("db.example.org").unwrap();
    let e = src
        .migrate(dest.addr(), Some(wrong), TIMEOUT, &mut state)
        .unwrap_err();
    assert!(
        matches!(&e, MigrationError::Tls(TlsError::WrongName(why)) if why.contains("db.example.org")),
        "{e}"
    );
    assert_eq!(state.stats().pages_sent, 0);
    src.assert_running();

    let right = pki.client().with_server_name("localhost").unwrap();
    assert_eq!(right.server_name().as_deref(), Some("localhost"));
    let mut state = src.state(SetupMode::Full);
    let r = src
        .migrate(dest.addr(), Some(right), TIMEOUT, &mut state)
        .unwrap();
    assert_eq!(r.outcome.kind, Kind::Completed);
    let report = dest.join().unwrap();
    assert!(
        matches!(
            report.attempts[0].error,
            Some(MigrationError::Tls(TlsError::RefusedByPeer(_)))
        ),
        "{:?}",
        report.attempts
    );
    src.assert_same_ram(&report);
}

/// A plain-TCP source against a TLS destination: the destination waits for a
/// ClientHello, the source for a Nonce. The destination gives up at its timeout (typed) and
/// closes; the source, whose timeout is longer, hears the close (a close, not its own
/// TimedOut); and a source whose timeout is the shorter gives up at its own, typed. Neither
/// hangs (each side's error is its own timeout or the other's close), and the source's guest
/// runs on.
#[test]
fn a_plain_source_against_a_tls_destination_fails_within_the_timeout() {
    let _g = shared();
    let pki = Pki::new("ca");
    let short = Duration::from_millis(800);
    let dest = tls_dest(&pki, 2, short);
    let mut src = Source::new(5);
    let mut state = src.state(SetupMode::Full);
    // The close, not the source's own timeout (that would be an Io TimedOut).
    let e = src
        .migrate(dest.addr(), None, short * 4, &mut state)
        .unwrap_err();
    assert!(
        matches!(
            e,
            MigrationError::Frame(dirty_bitmap::migration::frame::FrameError::Closed { .. })
        ),
        "{e}"
    );
    // The source gives up first.
    let e = src
        .migrate(dest.addr(), None, short / 2, &mut state)
        .unwrap_err();
    match &e {
        MigrationError::Io(io) => {
            assert_eq!(io.kind(), std::io::ErrorKind::TimedOut, "{io}");
            assert!(io.to_string().contains("TLS"), "{io}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(state.stats().pages_sent, 0);
    let report = dest.join().unwrap();
    assert_eq!(report.attempts.len(), 2, "{:?}", report.attempts);
    assert!(
        matches!(&report.attempts[0].error, Some(MigrationError::Tls(TlsError::Timeout(d))) if *d == short),
        "{:?}",
        report.attempts
    );
    assert!(
        matches!(
            &report.attempts[1].error,
            Some(MigrationError::Tls(TlsError::Closed))
        ),
        "{:?}",
        report.attempts
    );
    src.assert_running();
}

/// A TLS source against a plain destination is told that the destination speaks
/// no TLS (it answered the ClientHello with its plain Nonce).
#[test]
fn a_tls_source_against_a_plain_destination_is_told_so() {
    let _g = shared();
    let pki = Pki::new("ca");
    let dest = TcpDestination::spawn(DestOptions {
        timeout: Duration::from_secs(1),
        ..DestOptions::default()
    })
    .unwrap();
    let mut src = Source::new(6);
    let mut state = src.state(SetupMode::Full);
    let e = src
        .migrate(dest.addr(), Some(pki.client()), TIMEOUT, &mut state)
        .unwrap_err();
    assert!(
        matches!(&e, MigrationError::Tls(TlsError::NotTls(why)) if why.contains("plain")),
        "{e}"
    );
    let _ = dest.join().unwrap();
    src.assert_running();
}

/// An attempt over TLS cut mid-stream (a proxy forwards 512 KiB, then drips a byte every
/// 50 ms, never a whole record): the destination's read timeout ends it although bytes
/// keep coming, it keeps the RAM it received, and the source's retry over TLS resumes it
/// and completes. (The source re-dirtied every page it sent in the cut attempt, so the
/// retry's first pass may still be all of RAM.)
#[test]
fn a_dripping_peer_is_cut_off_over_tls_and_the_retry_resumes_the_kept_ram() {
    let _g = shared();
    let pki = Pki::new("ca");
    let idle = Duration::from_secs(1);
    let dest = tls_dest(&pki, 2, idle);
    let (addr, proxy) = proxy(dest.addr(), Some((512 << 10, Duration::from_millis(50))));
    let mut src = Source::new(7);
    let mut state = src.state(SetupMode::Full);
    let e = src
        .migrate(addr, Some(pki.client()), TIMEOUT, &mut state)
        .unwrap_err();
    assert!(
        !matches!(
            e,
            MigrationError::SourceNotResumed { .. }
                | MigrationError::OutcomeUnknown(_)
                | MigrationError::AfterStart(_)
        ),
        "{e}"
    );
    let dripped = proxy.join().unwrap().len();
    // Bytes came every 50 ms, well within the read timeout, for as long as the source
    // sent. The destination's TimedOut below is its own deadline cutting the drip: had it
    // waited out the proxy's [`TIMEOUT`], the proxy's shutdown would have ended the attempt
    // as a close.
    assert!(dripped > 512 << 10, "{dripped} bytes");
    src.assert_running();

    let mut again = src.state(SetupMode::Incremental);
    let r = src
        .migrate(dest.addr(), Some(pki.client()), TIMEOUT, &mut again)
        .unwrap();
    assert_eq!(r.outcome.kind, Kind::Completed);
    let report = dest.join().unwrap();
    assert_eq!(report.attempts.len(), 2, "{:?}", report.attempts);
    match &report.attempts[0].error {
        Some(MigrationError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
        other => panic!("expected the read timeout, got {other:?}"),
    }
    let kept = report.attempts[0].pages_held_at_end;
    assert!(kept > 0, "the destination kept nothing");
    assert_eq!(report.attempts[1].pages_held_at_start, kept);
    src.assert_same_ram(&report);
}

/// Credentials that do not load are typed errors naming the file.
#[test]
fn bad_credentials_are_typed_errors() {
    let pki = Pki::new("ca");
    let dir = pki.path();
    // A missing file.
    let missing = TlsCreds {
        key: dir.join("nope.pem"),
        ..TlsCreds::server_dir(dir)
    };
    match TlsServer::new(&missing) {
        Err(MigrationError::Tls(TlsError::ReadFile { path, source })) => {
            assert_eq!(path, dir.join("nope.pem"));
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    // No certificate where one should be (a key file given as the certificate).
    let swapped = TlsCreds {
        cert: dir.join("server-key.pem"),
        ..TlsCreds::server_dir(dir)
    };
    assert!(
        matches!(TlsServer::new(&swapped), Err(MigrationError::Tls(TlsError::BadPem { path, .. })) if path == dir.join("server-key.pem"))
    );
    // Not PEM at all.
    std::fs::write(dir.join("junk.pem"), b"-----BEGIN CERTIFICATE-----\n%%%%\n").unwrap();
    let junk = TlsCreds {
        ca: dir.join("junk.pem"),
        ..TlsCreds::client_dir(dir)
    };
    assert!(
        matches!(
            TlsClient::new(&junk),
            Err(MigrationError::Tls(TlsError::BadPem { .. }))
        ),
        "{:?}",
        TlsClient::new(&junk)
    );
    // A key that is not the certificate's.
    let mismatched = TlsCreds {
        key: dir.join("client-key.pem"),
        ..TlsCreds::server_dir(dir)
    };
    assert!(
        matches!(
            TlsServer::new(&mismatched),
            Err(MigrationError::Tls(TlsError::BadCredentials(_)))
        ),
        "{:?}",
        TlsServer::new(&mismatched)
    );
    // A server name that is neither a DNS name nor an address.
    assert!(matches!(
        pki.client().with_server_name("not a name!"),
        Err(MigrationError::Tls(TlsError::BadServerName(_)))
    ));
}

/// Postcopy over TLS: the destination's page requests come back on the return path while
/// the source's writer streams pages, both directions of the one TLS connection busy at
/// once; the pages arrive byte for byte.
#[test]
fn postcopy_over_tls_pulls_pages_and_arrives_byte_for_byte() {
    let _g = exclusive();
    let pki = Pki::new("ca");
    let dest = TcpDestination::spawn(DestOptions {
        postcopy_touches: 256,
        timeout: TIMEOUT,
        tls: Some(pki.server()),
        ..DestOptions::default()
    })
    .unwrap();
    let mut src = Source::new(8);
    let mut state = RamState::new(
        RAM_ID,
        Arc::clone(&src.ram),
        Arc::clone(&src.log),
        SetupMode::Full,
        true,
        32,
    )
    .unwrap();
    // Rate limited to about half of RAM per second: the switch comes after the first
    // window, with most pages still to send.
    let r = migrate_in_session(
        dest.addr(),
        &SourceOptions {
            loop_config: LoopConfig {
                max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(2 << 20)),
                // The push of the rest takes about half a second: the destination's
                // touches, which start at once, find pages missing and request them.
                max_postcopy_bandwidth: Some(BytesPerMs::from_bytes_per_sec(8 << 20)),
                postcopy: true,
                start_postcopy: true,
                ..LoopConfig::default()
            },
            timeout: TIMEOUT,
            tls: Some(pki.client()),
            ..SourceOptions::default()
        },
        &mut src.session,
        &mut src.vm,
        &mut [&mut state as &mut dyn MigrationState],
        &mut NoStall,
    )
    .unwrap();
    assert_eq!(r.outcome.kind, Kind::Postcopy);
    let report = dest.join().unwrap();
    let guest = report.guest.as_ref().unwrap();
    assert!(guest.was_postcopy());
    assert!(guest.page_requests() > 0, "no page was requested");
    assert!(r.outcome.requests_served > 0);
    src.assert_same_ram(&report);
}

/// Cancels the migration once it ran for `after`.
struct CancelAfter {
    start: Instant,
    after: Duration,
}

impl Controller for CancelAfter {
    fn on_iteration(&mut self, _: &dirty_bitmap::migration::IterationReport) -> Directive {
        if self.start.elapsed() >= self.after {
            Directive::Cancel
        } else {
            Directive::Continue
        }
    }
    fn on_stall(&mut self, _: &StallReport) -> StallAction {
        StallAction::KeepGoing
    }
}

/// One source at a time over TLS too: while a destination serves one, a second TLS source
/// is refused with [`BUSY`](dirty_bitmap::migration::tcp::BUSY) (the destination
/// answers its ClientHello with a plain Refused, which the source reads as such), its guest
/// untouched.
#[test]
fn a_second_tls_source_is_turned_away_while_one_is_served() {
    let _g = shared();
    let pki = Pki::new("ca");
    let dest = tls_dest(&pki, 1, TIMEOUT);
    let addr = dest.addr();
    let client = pki.client();
    let first = thread::spawn(move || {
        let mut src = Source::new(10);
        let mut state = src.state(SetupMode::Full);
        // Never switches over (nothing fits a limit of 0); cancelled after 2 s.
        migrate_in_session(
            addr,
            &SourceOptions {
                loop_config: LoopConfig {
                    downtime_limit: dirty_bitmap::migration::Millis(0),
                    max_bandwidth: Some(BytesPerMs::from_bytes_per_sec(4 << 20)),
                    ..LoopConfig::default()
                },
                timeout: TIMEOUT,
                tls: Some(client),
                ..SourceOptions::default()
            },
            &mut src.session,
            &mut src.vm,
            &mut [&mut state as &mut dyn MigrationState],
            &mut CancelAfter {
                start: Instant::now(),
                after: Duration::from_secs(2),
            },
        )
    });
    thread::sleep(Duration::from_millis(500));
    let mut src = Source::new(11);
    let mut state = src.state(SetupMode::Full);
    let e = src
        .migrate(addr, Some(pki.client()), TIMEOUT, &mut state)
        .unwrap_err();
    assert!(
        matches!(&e, MigrationError::DestinationRefused(r) if r == dirty_bitmap::migration::tcp::BUSY),
        "{e}"
    );
    assert_eq!(state.stats().pages_sent, 0);
    src.assert_running();
    let e = first.join().unwrap().unwrap_err();
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    let _ = dest.join().unwrap();
}

/// Over TLS, the destination's first read after the handshake has a timeout, though the TLS
/// reader starts with none and the pacing takes the read timeout as set: without one, a
/// source silent after its handshake (frozen, its host gone) would hold the serving thread
/// for good, no later attempt served, and the destination would never end. A client that
/// completes the handshake, reads the Nonce and sends nothing (`openssl s_client` with its
/// input held open) must see the attempt end on the read timeout.
#[test]
fn a_source_silent_after_its_handshake_is_cut_off_by_the_read_timeout() {
    let _g = shared();
    let pki = Pki::new("ca");
    // 2 s: the listener's accept waits that long for the client process to start too.
    let dest = tls_dest(&pki, 1, Duration::from_secs(2));
    let dir = pki.path();
    let mut client = std::process::Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(dest.addr().to_string())
        .arg("-servername")
        .arg("localhost")
        .arg("-CAfile")
        .arg(dir.join("ca-cert.pem"))
        .arg("-cert")
        .arg(dir.join("client-cert.pem"))
        .arg("-key")
        .arg(dir.join("client-key.pem"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_client (scripts/test.sh installs openssl)");
    // The Nonce frame came through the handshake: the destination waits for the Hello.
    let mut out = client.stdout.take().unwrap();
    let mut first = [0u8; 4];
    out.read_exact(&mut first)
        .expect("the destination's first frame");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(dest.join());
    });
    let joined = rx.recv_timeout(Duration::from_secs(15));
    // Held open until here (the silent source); then the process goes.
    let _ = client.kill();
    let _ = client.wait();
    let report = joined
        .expect("the destination still waits for a silent source after 15 s")
        .unwrap();
    match &report.attempts[0].error {
        Some(MigrationError::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
        other => panic!("expected the read timeout, got {other:?}"),
    }
}
