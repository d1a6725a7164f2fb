//! The migration stream and destination over real TCP on 127.0.0.1: content arrives byte for
//! byte; a corrupt, cut, reordered or wrong-version stream is a typed error on the receiving
//! side and an Abort (or an I/O error) on the sending side, never a hang; a refusing
//! destination; postcopy demand paging; and the rate limiter's long-run throughput on a
//! simulated clock.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use dirty_bitmap::migration::dest::{DestEvent, Destination, DestinationConfig, DestinationGuest};
use dirty_bitmap::migration::frame::{
    encode_stream_header, Frame, FrameError, Hello, StateInfo, STREAM_VERSION,
};
use dirty_bitmap::migration::ram_codec::{encode_discards, encode_pages, RAM_STATE_NAME};
use dirty_bitmap::migration::rate::RateLimiter;
use dirty_bitmap::migration::stream::{FrameReader, FrameWriter};
use dirty_bitmap::migration::{
    Bytes, BytesPerMs, ManualClock, MigrationError, Outbound, ProtocolError, Result, RAM_ID,
};
use rand::rngs::SmallRng;
use rand::RngExt;

const PAGE: usize = 4096;
const PAGES: usize = 300;
const BATCH: usize = 32;
/// The migration id of the guest these tests migrate.
const MIGRATION_ID: u64 = 0x5EED_0000_0000_0001;
/// No wait in these tests may last longer: a hang fails instead of blocking the suite.
const TIMEOUT: Duration = Duration::from_secs(20);

fn hello(pages: usize) -> Frame {
    Frame::Hello(Hello {
        version: STREAM_VERSION,
        page_size: PAGE as u32,
        ram_pages: pages as u64,
        migration_id: MIGRATION_ID,
        max_bandwidth: 0,
        nonce: 0,
        resume: 0,
        incremental: false,
        states: vec![StateInfo {
            id: RAM_ID,
            name: RAM_STATE_NAME.into(),
        }],
    })
}

/// Random RAM; about one page in eight is all zeros, to exercise the zero-page flag.
fn random_ram(rng: &mut SmallRng, pages: usize) -> Vec<u8> {
    let mut ram = vec![0u8; pages * PAGE];
    for p in ram.chunks_mut(PAGE) {
        if rng.random_range(0..8) != 0 {
            rng.fill(p);
        }
    }
    ram
}

fn page_of(ram: &[u8], p: usize) -> &[u8] {
    &ram[p * PAGE..(p + 1) * PAGE]
}

/// Sends `pages` of `ram` in batches through the Outbound boundary.
fn send_pages(out: &mut dyn Outbound, ram: &[u8], pages: &[usize]) -> Result<()> {
    for chunk in pages.chunks(BATCH) {
        let batch: Vec<(u64, &[u8])> = chunk.iter().map(|&p| (p as u64, page_of(ram, p))).collect();
        out.send(RAM_ID, &encode_pages(PAGE, &batch))?;
    }
    Ok(())
}

/// A destination on an ephemeral port, in a thread; returns the source's socket.
fn spawn_destination(
    config: DestinationConfig,
) -> (TcpStream, JoinHandle<Result<DestinationGuest>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        let back = s.try_clone().unwrap();
        Destination::new(s, back, config).run()
    });
    let src = TcpStream::connect(addr).unwrap();
    src.set_read_timeout(Some(TIMEOUT)).unwrap();
    src.set_write_timeout(Some(TIMEOUT)).unwrap();
    (src, dest)
}

/// A whole precopy stream for `ram` as bytes, with the offset where each frame starts (and
/// the end): Hello, every page, some pages again with new content after a "dirty" pass,
/// Switchover, End. Returns the RAM as of the switchover.
fn precopy_stream(rng: &mut SmallRng) -> (Vec<u8>, Vec<usize>, Vec<u8>) {
    let mut ram = random_ram(rng, PAGES);
    let mut w = FrameWriter::new(Vec::new());
    let mut starts = vec![0];
    w.write_frame(&hello(PAGES)).unwrap();
    starts.push(w.stats().bytes.get() as usize);
    let all: Vec<usize> = (0..PAGES).collect();
    for chunk in all.chunks(BATCH) {
        send_pages(&mut w, &ram, chunk).unwrap();
        starts.push(w.stats().bytes.get() as usize);
    }
    // The guest dirtied some pages; they go again, after the switchover.
    let dirty: Vec<usize> = (0..PAGES).filter(|_| rng.random_bool(0.1)).collect();
    for &p in &dirty {
        rng.fill(&mut ram[p * PAGE..(p + 1) * PAGE]);
    }
    w.write_frame(&Frame::Switchover { postcopy: false })
        .unwrap();
    starts.push(w.stats().bytes.get() as usize);
    for chunk in dirty.chunks(BATCH) {
        send_pages(&mut w, &ram, chunk).unwrap();
        starts.push(w.stats().bytes.get() as usize);
    }
    w.write_frame(&Frame::End).unwrap();
    let bytes = w.into_inner();
    starts.push(bytes.len());
    // The first frame starts after the 8-byte stream header.
    starts[0] = 8;
    (bytes, starts, ram)
}

/// Writes raw bytes to the destination on one thread while reading its answer on this one.
/// The destination closes when it fails, so the writes may end in a reset; its answer (an
/// Abort, sent before it closed) is still read first.
fn send_raw_and_wait(src: TcpStream, bytes: &[u8]) -> Result<()> {
    let mut w = src.try_clone()?;
    let bytes = bytes.to_vec();
    let writer = thread::spawn(move || w.write_all(&bytes));
    let answer = FrameReader::new(src).wait_started();
    let _ = writer.join().unwrap();
    answer
}

fn dest_frame_error(dest: JoinHandle<Result<DestinationGuest>>) -> FrameError {
    match dest.join().unwrap() {
        Err(MigrationError::Frame(e)) => e,
        other => panic!("destination: expected a frame error, got {other:?}"),
    }
}

fn assert_aborted(r: Result<()>, what: &str) {
    match r {
        Err(MigrationError::PeerAborted(reason)) => {
            assert!(
                reason.contains(what),
                "abort reason {reason:?} lacks {what:?}"
            )
        }
        other => panic!("source: expected an Abort mentioning {what:?}, got {other:?}"),
    }
}

#[test]
fn pages_over_tcp_arrive_byte_for_byte() {
    let (mut rng, _) = common::seeded_rng("pages_over_tcp_arrive_byte_for_byte");
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let mut ram = random_ram(&mut rng, PAGES);
    let mut w = FrameWriter::new(src.try_clone().unwrap());
    w.write_frame(&hello(PAGES)).unwrap();
    let all: Vec<usize> = (0..PAGES).collect();
    let zero_first = ram
        .chunks(PAGE)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count();
    send_pages(&mut w, &ram, &all).unwrap();
    let mut pages_sent = PAGES;
    let mut sections = PAGES.div_ceil(BATCH);
    // Two more dirty rounds: pages re-sent must overwrite the old copies.
    for round in 0..2 {
        let dirty: Vec<usize> = (0..PAGES).filter(|_| rng.random_bool(0.2)).collect();
        pages_sent += dirty.len();
        sections += dirty.len().div_ceil(BATCH);
        for &p in &dirty {
            rng.fill(&mut ram[p * PAGE..(p + 1) * PAGE]);
        }
        if round == 1 {
            w.write_frame(&Frame::Switchover { postcopy: false })
                .unwrap();
        }
        send_pages(&mut w, &ram, &dirty).unwrap();
    }
    w.write_frame(&Frame::End).unwrap();
    let sent = w.stats();
    FrameReader::new(src).wait_started().unwrap();
    let guest = dest.join().unwrap().unwrap();
    assert_eq!(guest.pages(), PAGES as u64);
    assert!(!guest.was_postcopy());
    for p in 0..PAGES {
        assert_eq!(
            guest.page(p as u64).unwrap(),
            page_of(&ram, p),
            "page {p} differs"
        );
    }
    assert_eq!(guest.ram(), &ram[..]);
    // Counters: every frame's bytes, and zero pages cost 9 bytes instead of 4105.
    assert_eq!(w.bytes_sent(), sent.bytes);
    assert!(sent.frames >= 4 + (PAGES / BATCH) as u64);
    let zero = ram
        .chunks(PAGE)
        .filter(|p| p.iter().all(|&b| b == 0))
        .count();
    assert!(zero > 0, "the RAM has zero pages");
    assert!(zero_first > 0, "the first pass has zero pages");
    // The entries: 9 bytes for a zero page (of the first pass: the dirty rounds fill
    // theirs at random), 9 + 4096 for any other; and each section's header, under 64
    // bytes. A zero page sent whole would add 4096, more than every header together.
    let entries = (zero_first * 9 + (pages_sent - zero_first) * (PAGE + 9)) as u64;
    let got = sent.section_bytes.get();
    assert!(
        got >= entries && got <= entries + (sections * 64) as u64,
        "{got} section bytes for {pages_sent} pages in {sections} sections, {zero_first} \
         of them zero (entries {entries})"
    );
}

#[test]
fn corrupt_byte_is_a_checksum_error_and_an_abort() {
    let (mut rng, _) = common::seeded_rng("corrupt_byte_is_a_checksum_error_and_an_abort");
    for _ in 0..4 {
        let (mut bytes, starts, _) = precopy_stream(&mut rng);
        // Any byte of any frame (the stream header has its own test below).
        let at = rng.random_range(8..bytes.len());
        bytes[at] ^= rng.random_range(1..=255u8);
        let (src, dest) = spawn_destination(DestinationConfig::default());
        let answer = send_raw_and_wait(src, &bytes);
        let e = dest_frame_error(dest);
        let frame_start = *starts.iter().filter(|&&s| s <= at).max().unwrap();
        match e {
            FrameError::HeaderChecksum { offset, .. } => {
                assert_eq!(offset as usize, frame_start);
                assert!(at < frame_start + 20, "header error for a payload byte");
            }
            FrameError::PayloadChecksum { offset, .. } => {
                assert_eq!(offset as usize, frame_start);
                assert!(at >= frame_start + 20, "payload error for a header byte");
            }
            other => panic!("corrupt byte at {at}: {other:?}"),
        }
        assert_aborted(answer, "checksum");
    }
}

#[test]
fn bad_magic_is_an_error_and_an_abort() {
    let (mut rng, _) = common::seeded_rng("bad_magic_is_an_error_and_an_abort");
    let (mut bytes, _, _) = precopy_stream(&mut rng);
    bytes[rng.random_range(0..4)] ^= 0x20;
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let answer = send_raw_and_wait(src, &bytes);
    assert!(matches!(
        dest_frame_error(dest),
        FrameError::BadMagic { .. }
    ));
    assert_aborted(answer, "magic");
}

#[test]
fn cut_connection_is_truncated_and_an_abort() {
    let (mut rng, _) = common::seeded_rng("cut_connection_is_truncated_and_an_abort");
    let (bytes, starts, _) = precopy_stream(&mut rng);
    // Inside a frame, never on a boundary.
    let cut = loop {
        let c = rng.random_range(9..bytes.len());
        if !starts.contains(&c) {
            break c;
        }
    };
    let (mut src, dest) = spawn_destination(DestinationConfig::default());
    src.write_all(&bytes[..cut]).unwrap();
    src.shutdown(Shutdown::Write).unwrap();
    let answer = FrameReader::new(src).wait_started();
    let e = dest_frame_error(dest);
    assert!(
        matches!(e, FrameError::Truncated { offset, .. } if offset as usize == cut),
        "{e:?}"
    );
    assert_aborted(answer, "cut");
}

#[test]
fn cut_on_a_frame_boundary_before_end_is_an_error() {
    let (mut rng, _) = common::seeded_rng("cut_on_a_frame_boundary_before_end_is_an_error");
    let (bytes, starts, _) = precopy_stream(&mut rng);
    let cut = starts[rng.random_range(1..starts.len() - 1)];
    let (mut src, dest) = spawn_destination(DestinationConfig::default());
    src.write_all(&bytes[..cut]).unwrap();
    src.shutdown(Shutdown::Write).unwrap();
    let answer = FrameReader::new(src).wait_started();
    assert!(matches!(dest_frame_error(dest), FrameError::Closed { .. }));
    assert_aborted(answer, "closed");
}

#[test]
fn destination_gone_is_an_io_error_at_the_source() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let back = s.try_clone().unwrap();
        let mut d = Destination::new(s, back, DestinationConfig::default());
        // Take the Hello and two sections, then vanish (the process died, say).
        for _ in 0..3 {
            d.step().unwrap();
        }
    });
    let src = TcpStream::connect(addr).unwrap();
    src.set_write_timeout(Some(TIMEOUT)).unwrap();
    let ram = vec![0x5Au8; PAGES * PAGE];
    let mut w = FrameWriter::new(src);
    w.write_frame(&hello(PAGES)).unwrap();
    let all: Vec<usize> = (0..PAGES).collect();
    send_pages(&mut w, &ram, &all[..2 * BATCH]).unwrap();
    dest.join().unwrap();
    // Keep sending: the kernel takes a few writes, then the reset surfaces.
    let mut err = None;
    for _ in 0..1000 {
        if let Err(e) = send_pages(&mut w, &ram, &all) {
            err = Some(e);
            break;
        }
    }
    assert!(matches!(err, Some(MigrationError::Io(_))), "{err:?}");
    // The writer stays failed.
    assert!(matches!(
        send_pages(&mut w, &ram, &all[..1]),
        Err(MigrationError::Frame(FrameError::Failed(_)))
    ));
}

#[test]
fn reordered_frames_are_a_sequence_gap_and_an_abort() {
    let (mut rng, _) = common::seeded_rng("reordered_frames_are_a_sequence_gap_and_an_abort");
    let (bytes, starts, _) = precopy_stream(&mut rng);
    // Swap frames i and i + 1 (two RAM sections; frame 0 is the Hello).
    let i = rng.random_range(1..(PAGES / BATCH));
    let (a, b, c) = (starts[i], starts[i + 1], starts[i + 2]);
    let mut swapped = bytes[..a].to_vec();
    swapped.extend_from_slice(&bytes[b..c]);
    swapped.extend_from_slice(&bytes[a..b]);
    swapped.extend_from_slice(&bytes[c..]);
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let answer = send_raw_and_wait(src, &swapped);
    let e = dest_frame_error(dest);
    assert_eq!(
        e,
        FrameError::SequenceGap {
            offset: a as u64,
            expected: i as u64,
            found: i as u64 + 1
        }
    );
    assert_aborted(answer, "sequence gap");
}

#[test]
fn replayed_frame_is_an_error_and_an_abort() {
    let (mut rng, _) = common::seeded_rng("replayed_frame_is_an_error_and_an_abort");
    let (bytes, starts, _) = precopy_stream(&mut rng);
    let i = rng.random_range(1..(PAGES / BATCH));
    let mut replayed = bytes[..starts[i + 1]].to_vec();
    replayed.extend_from_slice(&bytes[starts[i]..starts[i + 1]]);
    replayed.extend_from_slice(&bytes[starts[i + 1]..]);
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let answer = send_raw_and_wait(src, &replayed);
    assert!(matches!(dest_frame_error(dest), FrameError::Replay { .. }));
    assert_aborted(answer, "replayed");
}

#[test]
fn wrong_version_is_refused_with_an_abort() {
    let (mut rng, _) = common::seeded_rng("wrong_version_is_refused_with_an_abort");
    let (bytes, _, _) = precopy_stream(&mut rng);
    let mut v2 = encode_stream_header(STREAM_VERSION + 1).to_vec();
    v2.extend_from_slice(&bytes[8..]);
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let answer = send_raw_and_wait(src, &v2);
    assert_eq!(
        dest_frame_error(dest),
        FrameError::UnsupportedVersion {
            found: STREAM_VERSION + 1
        }
    );
    assert_aborted(answer, "version");
}

#[test]
fn refusing_destination_answers_refused() {
    let (mut rng, _) = common::seeded_rng("refusing_destination_answers_refused");
    let (bytes, _, _) = precopy_stream(&mut rng);
    let config = DestinationConfig {
        refuse_start: Some("no capacity".into()),
        ..DestinationConfig::default()
    };
    let (src, dest) = spawn_destination(config);
    let answer = send_raw_and_wait(src, &bytes);
    assert!(matches!(answer, Err(MigrationError::DestinationRefused(r)) if r == "no capacity"));
    assert!(matches!(
        dest.join().unwrap(),
        Err(MigrationError::DestinationRefused(_))
    ));
}

#[test]
fn source_abort_ends_the_destination() {
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let mut w = FrameWriter::new(src.try_clone().unwrap());
    w.write_frame(&hello(4)).unwrap();
    w.abort("cancelled by the operator");
    let r = dest.join().unwrap();
    assert!(
        matches!(r, Err(MigrationError::PeerAborted(ref s)) if s == "cancelled by the operator"),
        "{r:?}"
    );
}

#[test]
fn page_out_of_range_and_missing_pages_are_errors() {
    // A page index past the RAM.
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let mut w = FrameWriter::new(src.try_clone().unwrap());
    w.write_frame(&hello(4)).unwrap();
    let page = vec![1u8; PAGE];
    w.send(RAM_ID, &encode_pages(PAGE, &[(4, &page)])).unwrap();
    let r = dest.join().unwrap();
    assert!(
        matches!(
            r,
            Err(MigrationError::Protocol(ProtocolError::PageOutOfRange {
                page: 4,
                ..
            }))
        ),
        "{r:?}"
    );
    assert_aborted(FrameReader::new(src).wait_started(), "outside");

    // End before every page arrived.
    let (src, dest) = spawn_destination(DestinationConfig::default());
    let mut w = FrameWriter::new(src.try_clone().unwrap());
    w.write_frame(&hello(4)).unwrap();
    w.send(
        RAM_ID,
        &encode_pages(PAGE, &[(0, &page), (1, &page), (3, &page)]),
    )
    .unwrap();
    w.write_frame(&Frame::Switchover { postcopy: false })
        .unwrap();
    w.write_frame(&Frame::End).unwrap();
    let r = dest.join().unwrap();
    assert!(
        matches!(
            r,
            Err(MigrationError::Protocol(ProtocolError::PageNeverReceived {
                page: 2,
                ..
            }))
        ),
        "{r:?}"
    );
    assert_aborted(FrameReader::new(src).wait_started(), "page 2");

    // A Hello asking for more RAM than the destination allows.
    let config = DestinationConfig {
        max_ram_bytes: Bytes(1 << 20),
        ..DestinationConfig::default()
    };
    let (src, dest) = spawn_destination(config);
    let mut w = FrameWriter::new(src.try_clone().unwrap());
    w.write_frame(&hello(257)).unwrap();
    assert!(matches!(
        dest.join().unwrap(),
        Err(MigrationError::InvalidInput(_))
    ));
    assert_aborted(FrameReader::new(src).wait_started(), "limit");
}

/// Postcopy: precopy one round, dirty some pages, discard them and switch over; the
/// destination starts at once, pulls a stale page on demand, writes to it, and the
/// background push of that page must not overwrite the guest's write.
#[test]
fn postcopy_pulls_missing_pages_on_demand() {
    let (mut rng, _) = common::seeded_rng("postcopy_pulls_missing_pages_on_demand");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut ram = random_ram(&mut rng, PAGES);
    let old_ram = ram.clone();
    let mut dirty: Vec<usize> = (0..PAGES).filter(|_| rng.random_bool(0.3)).collect();
    if dirty.is_empty() {
        dirty.push(0);
    }
    for &p in &dirty {
        // Never all zeros, so the stale copy and the new one always differ.
        rng.fill(&mut ram[p * PAGE..(p + 1) * PAGE]);
        ram[p * PAGE] |= 1;
        ram[p * PAGE + 1] = !old_ram[p * PAGE + 1];
    }
    let wanted = dirty[rng.random_range(0..dirty.len())];

    let src_ram = ram.clone();
    let src_dirty = dirty.clone();
    let source = thread::spawn(move || -> Result<u64> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        let mut w = FrameWriter::new(s.try_clone()?);
        w.write_frame(&hello(PAGES))?;
        let all: Vec<usize> = (0..PAGES).collect();
        send_pages(&mut w, &old_ram, &all)?;
        let discards: Vec<u64> = src_dirty.iter().map(|&p| p as u64).collect();
        w.send(RAM_ID, &encode_discards(PAGE, &discards))?;
        w.write_frame(&Frame::Switchover { postcopy: true })?;
        // The return path, read on its own thread, as the source keeps pushing.
        let (tx, rx) = mpsc::channel();
        let mut r = FrameReader::new(s);
        let replies = thread::spawn(move || {
            while let Ok(f) = r.read_frame() {
                if tx.send(f).is_err() {
                    break;
                }
            }
        });
        assert_eq!(rx.recv_timeout(TIMEOUT).unwrap(), Frame::Started);
        // Serve the first demand request before any background push.
        let Frame::PageRequest { state, payload } = rx.recv_timeout(TIMEOUT).unwrap() else {
            panic!("expected a page request");
        };
        assert_eq!(state, RAM_ID);
        let (first, count) = dirty_bitmap::migration::ram_codec::decode_page_request(&payload)?;
        let req: Vec<usize> = (first..first + u64::from(count))
            .map(|p| p as usize)
            .collect();
        send_pages(&mut w, &src_ram, &req)?;
        // Background push of every dirty page (the requested one again, too).
        send_pages(&mut w, &src_ram, &src_dirty)?;
        w.write_frame(&Frame::End)?;
        replies.join().unwrap();
        Ok(first)
    });

    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let back = s.try_clone().unwrap();
    let mut d = Destination::new(s, back, DestinationConfig::default());
    loop {
        match d.step().unwrap() {
            DestEvent::Switchover { postcopy } => {
                assert!(postcopy);
                break;
            }
            DestEvent::End => panic!("End before the switchover"),
            _ => {}
        }
    }
    assert!(d.is_running());
    for &p in &dirty {
        assert!(!d.has_page(p as u64), "stale page {p} was not discarded");
    }
    assert_eq!(d.received_pages(), (PAGES - dirty.len()) as u64);
    let got = d.fetch_page(wanted as u64).unwrap();
    assert_eq!(
        &got[..],
        page_of(&ram, wanted),
        "demand-fetched page {wanted}"
    );
    // The guest writes to it; the background copy must not undo that.
    got.fill(0xEE);
    let guest = d.run().unwrap();
    assert_eq!(source.join().unwrap().unwrap(), wanted as u64);
    assert!(guest.was_postcopy());
    assert_eq!(guest.page_requests(), 1);
    for p in 0..PAGES {
        let want = if p == wanted {
            vec![0xEE; PAGE]
        } else {
            page_of(&ram, p).to_vec()
        };
        assert_eq!(guest.page(p as u64).unwrap(), &want[..], "page {p}");
    }
}

/// The limiter on a simulated clock: long-run throughput within 2% of max_bandwidth, and no
/// 100 ms window carrying more than its budget plus one frame.
#[test]
fn rate_limiter_holds_max_bandwidth_over_a_long_run() {
    let (mut rng, _) = common::seeded_rng("rate_limiter_holds_max_bandwidth_over_a_long_run");
    for max in [1 << 20, 3_000_000u64, 64 << 10] {
        let clock = ManualClock::new();
        let bw = BytesPerMs::from_bytes_per_sec(max);
        let limiter = RateLimiter::with_clock(bw, Box::new(clock.clone()));
        let mut w = FrameWriter::with_limiter(std::io::sink(), limiter);
        let budget = w.limiter().window_budget().unwrap().get();
        let mut windows: Vec<u64> = Vec::new();
        let mut largest = 0u64;
        let payload = vec![0xA5u8; 64 << 10];
        while clock.now() < Duration::from_secs(60) {
            let len = rng.random_range(1..=payload.len());
            let n = w.send(RAM_ID, &payload[..len]).unwrap().get();
            largest = largest.max(n);
            // The frame went out at the time the limiter let it go.
            let win = (clock.now().as_nanos() / 100_000_000) as usize;
            if windows.len() <= win {
                windows.resize(win + 1, 0);
            }
            windows[win] += n;
            // A fast link: each write costs a microsecond.
            clock.advance(Duration::from_micros(1));
        }
        let secs = clock.now().as_secs_f64();
        let rate = w.stats().bytes.get() as f64 / secs;
        let err = (rate - max as f64).abs() / max as f64;
        eprintln!(
            "max {max} B/s: {rate:.0} B/s over {secs:.1} s ({:.2}% off), slept {:?}",
            err * 100.0,
            w.limiter().slept()
        );
        assert!(err < 0.02, "max {max}: long-run rate {rate:.0} B/s");
        for (i, &b) in windows.iter().enumerate() {
            assert!(
                b <= budget + largest,
                "window {i}: {b} bytes, budget {budget}"
            );
        }
    }
}

/// A link slower than the limit is never throttled further: the limiter does not sleep.
#[test]
fn rate_limiter_does_not_slow_a_slower_link() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(
        BytesPerMs::from_bytes_per_sec(10 << 20),
        Box::new(clock.clone()),
    );
    let mut w = FrameWriter::with_limiter(std::io::sink(), limiter);
    let payload = vec![1u8; 32 << 10];
    for _ in 0..1000 {
        let n = w.send(RAM_ID, &payload).unwrap().get();
        // 5 MiB/s link.
        clock.advance(Duration::from_secs_f64(n as f64 / (5 << 20) as f64));
    }
    assert_eq!(w.limiter().sleeps(), 0);
}

/// A minimal check that nothing here depends on TcpStream: the same destination runs over
/// an in-memory pipe.
#[test]
fn destination_runs_over_any_read_write() {
    let (mut rng, _) = common::seeded_rng("destination_runs_over_any_read_write");
    let (bytes, _, ram) = precopy_stream(&mut rng);
    let mut answers = Vec::new();
    let guest = Destination::new(&bytes[..], &mut answers, DestinationConfig::default())
        .run()
        .unwrap();
    assert_eq!(guest.ram(), &ram[..]);
    let mut r = FrameReader::new(&answers[..]);
    r.wait_started().unwrap();
    let mut rest = Vec::new();
    (&answers[r.bytes_read().get() as usize..])
        .read_to_end(&mut rest)
        .unwrap();
    assert!(rest.is_empty(), "only Started was sent");
}

/// The seeds of `fuzz/make-migration-corpus.py`, an independent implementation of
/// docs/FORMAT.md in Python, migrate completely through the Rust destination.
#[test]
fn python_encoded_streams_migrate() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/migration_stream");
    let ps = 512;
    let pattern = |i: usize| -> Vec<u8> {
        if i == 2 {
            vec![0; ps]
        } else {
            (0..ps).map(|j| ((i * 37 + j) & 0xFF) as u8).collect()
        }
    };
    for (name, postcopy) in [
        ("seed-reader-precopy", false),
        ("seed-reader-postcopy", true),
    ] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let mut answers = Vec::new();
        let guest = Destination::new(&bytes[1..], &mut answers, DestinationConfig::default())
            .run()
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(guest.was_postcopy(), postcopy, "{name}");
        let mut want: Vec<Vec<u8>> = (0..4).map(pattern).collect();
        if postcopy {
            want[0] = vec![0x44; ps];
            want[3] = vec![0x33; ps];
        } else {
            want[1] = vec![0xEE; ps];
        }
        for (p, w) in want.iter().enumerate() {
            assert_eq!(guest.page(p as u64).unwrap(), &w[..], "{name}: page {p}");
        }
        FrameReader::new(&answers[..]).wait_started().unwrap();
    }
}

/// The disk bitmap seeds of `fuzz/make-migration-corpus.py` (mode 2, a Section payload)
/// decode with the Rust codec to what the Python encoder meant, and the Report seed too.
#[test]
fn python_encoded_bitmap_sections_decode() {
    use dirty_bitmap::migration::bitmap_codec::{self, BitmapSection, RegionBody};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/migration_stream");
    let section = |name: &str| -> Vec<u8> {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        // Mode 2, kind Section, then the state id (3).
        assert_eq!(&bytes[..6], &[2, 2, 0, 0, 0, 3], "{name}");
        bytes[6..].to_vec()
    };
    let stream = 0x5EED_5EED_0000_0001;
    let s = section("seed-payload-bitmap-start");
    let d = bitmap_codec::decode(&s).unwrap();
    let BitmapSection::Start(st) = d.body else {
        panic!("{d:?}")
    };
    assert_eq!(
        (
            d.seq,
            st.index,
            st.stream,
            st.name.as_str(),
            st.granularity_bits,
            st.enabled
        ),
        (1, 0, stream, "b", 16, true)
    );
    assert_eq!((st.disk_size, st.region_size), (1 << 30, 512));
    let s = section("seed-payload-bitmap-regions");
    let d = bitmap_codec::decode(&s).unwrap();
    assert_eq!(d.seq, 2);
    let BitmapSection::Regions { index: 0, regions } = d.body else {
        panic!("{d:?}")
    };
    assert_eq!(
        regions[..2],
        [
            (0, RegionBody::Raw(&[0xA5u8; 512][..])),
            (3, RegionBody::Raw(&[0u8; 512][..]))
        ]
    );
    // The third, sparse: 0x01 at byte 7, 0x80 at byte 300.
    assert_eq!(
        regions[2],
        (5, RegionBody::Sparse(&[7, 0x01, 0xA4, 0x02, 0x80][..]))
    );
    let mut region = [0xEEu8; 512];
    regions[2].1.expand(&mut region).unwrap();
    let mut want = [0u8; 512];
    want[7] = 0x01;
    want[300] = 0x80;
    assert_eq!(region, want);
    assert_eq!(regions.len(), 3);
    let s = section("seed-payload-bitmap-complete");
    let d = bitmap_codec::decode(&s).unwrap();
    assert_eq!(
        (d.seq, d.body),
        (
            3,
            BitmapSection::Complete {
                index: 0,
                more: true
            }
        )
    );
    let s = section("seed-payload-bitmap-query");
    assert_eq!(
        bitmap_codec::decode(&s).unwrap().body,
        BitmapSection::Query { stream }
    );
    let r = std::fs::read(dir.join("seed-payload-report")).unwrap();
    assert_eq!(&r[..6], &[2, 10, 0, 0, 0, 3]);
    assert_eq!(bitmap_codec::decode_report(&r[6..]).unwrap(), 17);
}

/// The bytes of a stream of `frames` as the source writes them.
fn stream_of(frames: &[Frame]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for f in frames {
        w.write_frame(f).unwrap();
    }
    w.into_inner()
}

/// A Hello of the largest size the format allows (65,535 states, about 460 KB): the
/// duplicate-name check is a hash lookup per state, so it answers at once (a scan of the
/// states before each would be 2 × 10⁹ comparisons).
#[test]
fn max_size_hello_is_checked_for_duplicates() {
    let states = |dup: bool| -> Vec<StateInfo> {
        let mut v = vec![StateInfo {
            id: RAM_ID,
            name: RAM_STATE_NAME.into(),
        }];
        v.extend((1..u32::from(u16::MAX)).map(|i| StateInfo {
            id: RAM_ID + i,
            name: format!("state-{i}"),
        }));
        if dup {
            let last = v.len() - 1;
            v[last].name = "state-1".into();
        }
        v
    };
    for dup in [false, true] {
        let Frame::Hello(mut h) = hello(4) else {
            unreachable!()
        };
        h.states = states(dup);
        assert_eq!(h.states.len(), 65_535);
        let bytes = stream_of(&[Frame::Hello(h)]);
        assert!(bytes.len() > 400_000, "{}", bytes.len());
        let mut d = Destination::new(&bytes[..], Vec::new(), DestinationConfig::default());
        d.set_section_handler(Box::new(|_, _, _| Ok(())));
        let r = d.step();
        if dup {
            assert!(
                matches!(
                    r,
                    Err(MigrationError::Protocol(ProtocolError::DuplicateStateName(ref s)))
                        if s == "state-1"
                ),
                "{r:?}"
            );
        } else {
            assert!(matches!(r, Ok(DestEvent::Hello(_))), "{r:?}");
        }
    }
}

/// A Hello of 4 pages for the guest `id`.
fn hello_for(id: u64) -> Frame {
    let Frame::Hello(h) = hello(4) else {
        unreachable!()
    };
    Frame::Hello(Hello {
        migration_id: id,
        ..h
    })
}

/// A first attempt of guest `id` that delivered all 4 pages of `ram` and was cut before
/// the switchover: what the destination keeps.
fn kept_after_cut(id: u64, ram: &[u8]) -> dirty_bitmap::migration::dest::RetainedRam {
    let pages: Vec<(u64, &[u8])> = (0..4).map(|p| (p as u64, page_of(ram, p))).collect();
    let bytes = stream_of(&[
        hello_for(id),
        Frame::Section {
            state: RAM_ID,
            payload: encode_pages(PAGE, &pages),
        },
    ]);
    let mut d = Destination::new(&bytes[..], Vec::new(), DestinationConfig::default());
    d.step().unwrap();
    d.step().unwrap();
    assert!(d.step().is_err(), "the stream was cut");
    let kept = d.into_retained().expect("RAM kept after a failed attempt");
    assert_eq!((kept.received_pages(), kept.migration_id()), (4, id));
    kept
}

/// Kept RAM serves only a retry of the same guest: the same migration id completes from
/// it with nothing resent. A Hello of another guest of the same size, or one whose RAM the
/// destination cannot map, is refused at the Hello, and the kept RAM stays as it was for
/// the retry of the guest it belongs to.
#[test]
fn kept_ram_is_reused_only_for_the_same_migration_id() {
    let (mut rng, _) = common::seeded_rng("kept_ram_is_reused_only_for_the_same_migration_id");
    let ram = random_ram(&mut rng, 4);
    let (a, b) = (rng.random::<u64>(), rng.random::<u64>());
    assert_ne!(a, b);
    // The retry: no page resent (the guest did not write since), switchover, End.
    let retry = |id| {
        stream_of(&[
            hello_for(id),
            Frame::Switchover { postcopy: false },
            Frame::End,
        ])
    };

    let bytes = retry(a);
    let mut answers = Vec::new();
    let mut d = Destination::with_retained(
        &bytes[..],
        &mut answers,
        DestinationConfig::default(),
        Some(kept_after_cut(a, &ram)),
    );
    d.step().unwrap();
    assert!(d.resumed_from_retained());
    let guest = d.run().unwrap();
    assert_eq!(guest.ram(), &ram[..]);
    FrameReader::new(&answers[..]).wait_started().unwrap();

    // Another guest; and another guest asking for more RAM than the destination maps.
    let huge = {
        let Frame::Hello(h) = hello_for(b) else {
            unreachable!()
        };
        stream_of(&[Frame::Hello(Hello {
            ram_pages: 1 << 40,
            ..h
        })])
    };
    for bytes in [retry(b), huge] {
        let mut answers = Vec::new();
        let mut d = Destination::with_retained(
            &bytes[..],
            &mut answers,
            DestinationConfig::default(),
            Some(kept_after_cut(a, &ram)),
        );
        let r = d.step();
        assert!(
            matches!(
                r,
                Err(MigrationError::Protocol(
                    ProtocolError::KeptRamNotResumed { .. }
                ))
            ),
            "{r:?}"
        );
        assert!(!d.resumed_from_retained());
        let kept = d.into_retained().expect("the kept RAM was dropped");
        assert_eq!((kept.received_pages(), kept.migration_id()), (4, a));
        for p in 0..4 {
            assert_eq!(kept.page(p as u64), Some(page_of(&ram, p)));
        }
    }
}

/// A Hello for guest `id` that echoes `nonce` and resumes `resume`.
fn hello_with(id: u64, nonce: u128, resume: u128) -> Frame {
    let Frame::Hello(h) = hello_for(id) else {
        unreachable!()
    };
    Frame::Hello(Hello { nonce, resume, ..h })
}

/// A destination that issues nonces: it speaks first (a Nonce frame), refuses a Hello
/// that does not echo its nonce (a recorded attempt replayed), and binds the RAM a failed
/// attempt leaves to that migration's token: a Hello that does not resume it by that token
/// is refused, the RAM kept as it was; the one that does resumes it.
#[test]
fn kept_ram_is_bound_to_the_nonce_of_the_migration_that_left_it() {
    let (mut rng, _) = common::seeded_rng("kept_ram_is_bound_to_the_nonce");
    let ram = random_ram(&mut rng, 4);
    let id = 0xD1;
    let (n1, n2) = (0x1111_u128 << 64, 0x2222_u128 << 64);
    let config = |nonce| DestinationConfig {
        nonce: Some(nonce),
        ..DestinationConfig::default()
    };
    // The first attempt, fresh: all four pages, then cut. Its RAM belongs to token n1.
    let pages: Vec<(u64, &[u8])> = (0..4).map(|p| (p as u64, page_of(&ram, p))).collect();
    let first = stream_of(&[
        hello_with(id, n1, 0),
        Frame::Section {
            state: RAM_ID,
            payload: encode_pages(PAGE, &pages),
        },
    ]);
    let mut answers = Vec::new();
    let mut d = Destination::new(&first[..], &mut answers, config(n1));
    d.step().unwrap();
    d.step().unwrap();
    assert!(d.step().is_err(), "the stream was cut");
    let kept = d.into_retained().unwrap();
    assert_eq!((kept.received_pages(), kept.token()), (4, n1));
    // It spoke first.
    assert_eq!(
        FrameReader::new(&answers[..]).read_frame().unwrap(),
        Frame::Nonce { nonce: n1 }
    );

    let end = [Frame::Switchover { postcopy: false }, Frame::End];
    let attempt = |hello: Frame, nonce: u128, kept| {
        let mut frames = vec![hello];
        frames.extend(end.iter().cloned());
        let bytes = std::io::Cursor::new(stream_of(&frames));
        let mut d = Destination::with_retained(bytes, Vec::new(), config(nonce), Some(kept));
        let r = d.step();
        (r, d)
    };
    // Replayed: the first attempt's Hello (nonce n1), and a retry's (nonce n3, resuming
    // n1), to a connection that issued n2. The retry's would resume the kept RAM but for
    // the nonce.
    let mut kept = kept;
    for replayed in [hello_with(id, n1, 0), hello_with(id, n1 + 3, n1)] {
        let (r, d) = attempt(replayed, n2, kept);
        assert!(
            matches!(
                r,
                Err(MigrationError::Protocol(ProtocolError::WrongNonce { .. }))
            ),
            "{r:?}"
        );
        kept = d.into_retained().unwrap();
    }
    return_kept(&kept, &ram);
    // Another source with the guest's id, fresh or naming a token it does not have.
    for resume in [0, n2, n1 + 1] {
        let (r, d) = attempt(hello_with(id, n2, resume), n2, kept);
        assert!(
            matches!(
                r,
                Err(MigrationError::Protocol(
                    ProtocolError::KeptRamNotResumed { .. }
                ))
            ),
            "resume {resume:#x}: {r:?}"
        );
        kept = d.into_retained().expect("the kept RAM was dropped");
        assert_eq!((kept.received_pages(), kept.token()), (4, n1));
        return_kept(&kept, &ram);
    }
    // The migration's own retry resumes it and completes with nothing resent.
    let (r, d) = attempt(hello_with(id, n2, n1), n2, kept);
    assert!(matches!(r, Ok(DestEvent::Hello(_))), "{r:?}");
    assert!(d.resumed_from_retained());
    let guest = d.run().unwrap();
    assert_eq!(guest.ram(), &ram[..]);
}

/// Checks that `kept` still holds `ram`.
fn return_kept(kept: &dirty_bitmap::migration::dest::RetainedRam, ram: &[u8]) {
    for p in 0..4 {
        assert_eq!(kept.page(p as u64), Some(page_of(ram, p)));
    }
}

// ---------------------------------------------------------------------------------------
// RAM sections that cost more than they carry
// ---------------------------------------------------------------------------------------

/// A destination core that has taken the Hello for `pages` pages.
fn core_after_hello(pages: usize) -> dirty_bitmap::migration::dest::DestCore {
    let mut core = dirty_bitmap::migration::dest::DestCore::new(DestinationConfig::default(), None);
    core.apply(hello(pages), 0, Some(STREAM_VERSION), &mut |_| Ok(()))
        .unwrap();
    core
}

fn ram_section(payload: Vec<u8>) -> Frame {
    Frame::Section {
        state: RAM_ID,
        payload,
    }
}

#[test]
fn a_page_repeated_in_one_section_is_refused_before_any_byte_lands() {
    let mut core = core_after_hello(4);
    let (a, b) = (vec![0xAAu8; PAGE], vec![0xBBu8; PAGE]);
    let section = encode_pages(PAGE, &[(1, &a), (2, &b), (1, &b)]);
    let r = core.apply(ram_section(section), 1, None, &mut |_| Ok(()));
    assert!(
        matches!(
            r,
            Err(MigrationError::Protocol(ProtocolError::RepeatedPage {
                page: 1
            }))
        ),
        "{r:?}"
    );
    // Nothing of the section was applied.
    assert!(core.ram().iter().all(|&x| x == 0));
    assert_eq!(core.received_pages(), 0);

    // The same for repeated zero-page entries (9 bytes of stream each).
    let mut core = core_after_hello(4);
    let zero = vec![0u8; PAGE];
    let section = encode_pages(PAGE, &[(3, &zero), (3, &zero)]);
    assert!(section.len() < 2 * PAGE, "zero pages travel as flags");
    let r = core.apply(ram_section(section), 1, None, &mut |_| Ok(()));
    assert!(
        matches!(
            r,
            Err(MigrationError::Protocol(ProtocolError::RepeatedPage {
                page: 3
            }))
        ),
        "{r:?}"
    );
}

/// How many of the host pages of `[addr, addr + len)` this process has written: mapped
/// exclusively to it (`/proc/self/pagemap` bit 56) or swapped out (bit 62). A page only
/// read maps the kernel's shared zero page, which is not exclusive. Exactly this range:
/// the mapping around it may hold other tests' allocations, which the kernel merges into
/// one area (its `Anonymous:` figure in `/proc/self/smaps` counts them too).
fn written_host_pages(addr: usize, len: usize) -> u64 {
    use std::os::unix::fs::FileExt;
    // SAFETY: `sysconf` reads a constant of the system and touches no memory of ours.
    #[allow(unsafe_code)]
    let host_page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
    let first = addr / host_page;
    let end = (addr + len).div_ceil(host_page);
    let mut entries = vec![0u8; (end - first) * 8];
    std::fs::File::open("/proc/self/pagemap")
        .unwrap()
        .read_exact_at(&mut entries, first as u64 * 8)
        .unwrap();
    entries
        .chunks_exact(8)
        .map(|e| u64::from_le_bytes(e.try_into().unwrap()))
        .filter(|e| e & (1 << 56) != 0 || e & (1 << 62) != 0)
        .count() as u64
}

#[test]
fn zero_pages_over_untouched_memory_write_nothing_and_still_zero_a_written_page() {
    const PAGES: usize = 2048;
    let mut core = core_after_hello(PAGES);
    let (base, len) = (core.ram().as_ptr() as usize, core.ram().len());
    assert_eq!(len, PAGES * PAGE);
    let before = written_host_pages(base, len);
    // 2048 zero-page entries, 18 KiB of stream: the destination's RAM was never written,
    // so they must not make the kernel back 8 MiB of it.
    let zero = vec![0u8; PAGE];
    let batch: Vec<(u64, &[u8])> = (0..PAGES as u64).map(|p| (p, &zero[..])).collect();
    core.apply(
        ram_section(encode_pages(PAGE, &batch)),
        1,
        None,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(core.received_pages(), PAGES as u64);
    let after = written_host_pages(base, len);
    assert!(
        after <= before,
        "zero pages backed {} host pages of untouched memory",
        after - before
    );
    // A zero page over a page that holds data still zeroes it.
    let mut core = core_after_hello(4);
    let data = vec![0x5Au8; PAGE];
    core.apply(
        ram_section(encode_pages(PAGE, &[(2, &data)])),
        1,
        None,
        &mut |_| Ok(()),
    )
    .unwrap();
    core.apply(
        ram_section(encode_pages(PAGE, &[(2, &zero)])),
        2,
        None,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert!(core.ram()[2 * PAGE..3 * PAGE].iter().all(|&x| x == 0));
}

/// A destination state that refuses every Hello, as a state may (say, a disk image it
/// cannot open).
#[derive(Debug)]
struct RefusesHello;

impl dirty_bitmap::migration::DestState for RefusesHello {
    fn name(&self) -> &str {
        "disk"
    }
    fn hello(
        &mut self,
        _: dirty_bitmap::migration::StateId,
        _: dirty_bitmap::migration::Binding,
    ) -> Result<()> {
        Err(MigrationError::InvalidInput("this state refuses".into()))
    }
}

/// A retry takes the kept RAM from the destination only once every state accepted the
/// Hello: taken before a destination state refuses it, the kept RAM would be dropped with
/// the failed attempt, and the next retry, which sends only what the guest wrote again,
/// could never complete.
#[test]
fn a_hello_a_state_refuses_keeps_the_kept_ram() {
    let (mut rng, _) = common::seeded_rng("a_hello_a_state_refuses_keeps_the_kept_ram");
    let ram = random_ram(&mut rng, 4);
    let id = 0xD2;
    let Frame::Hello(h) = hello_for(id) else {
        unreachable!()
    };
    let mut states = h.states.clone();
    states.push(StateInfo {
        id: RAM_ID + 1,
        name: "disk".into(),
    });
    let bytes = stream_of(&[Frame::Hello(Hello { states, ..h })]);
    let mut d = Destination::with_retained(
        &bytes[..],
        Vec::new(),
        DestinationConfig::default(),
        Some(kept_after_cut(id, &ram)),
    );
    d.add_state(std::sync::Arc::new(std::sync::Mutex::new(RefusesHello)));
    let r = d.step();
    assert!(
        matches!(r, Err(MigrationError::InvalidInput(ref m)) if m.contains("refuses")),
        "{r:?}"
    );
    let kept = d.into_retained().expect("the kept RAM was dropped");
    assert_eq!((kept.received_pages(), kept.migration_id()), (4, id));
    for p in 0..4 {
        assert_eq!(kept.page(p as u64), Some(page_of(&ram, p)));
    }
}
