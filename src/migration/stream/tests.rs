//! The stream's tests: the codec of `frame.rs` and the reader and writer of `mod.rs`.

use super::*;
use crate::migration::clock::ManualClock;
use crate::migration::frame::*;
use crate::migration::frame::{OFF_HEADER_CRC, OFF_LEN, OFF_RESERVED};
use proptest::prelude::*;

fn hello() -> Frame {
    Frame::Hello(Hello {
        version: STREAM_VERSION,
        page_size: 4096,
        ram_pages: 1 << 20,
        migration_id: 0x0123_4567_89AB_CDEF,
        max_bandwidth: 64 << 20,
        nonce: 0x0011_2233_4455_6677_8899_AABB_CCDD_EEFF,
        resume: 7,
        incremental: true,
        states: vec![
            StateInfo {
                id: 1,
                name: "ram".into(),
            },
            StateInfo {
                id: 7,
                name: "dirty-bitmaps".into(),
            },
        ],
    })
}

fn all_kinds() -> Vec<Frame> {
    vec![
        hello(),
        Frame::Nonce { nonce: u128::MAX },
        Frame::Nonce { nonce: 1 },
        Frame::Section {
            state: 1,
            payload: vec![1, 2, 3],
        },
        Frame::Section {
            state: 0xFFFF_FFFF,
            payload: vec![],
        },
        Frame::Switchover { postcopy: false },
        Frame::Switchover { postcopy: true },
        Frame::End,
        Frame::Started,
        Frame::Refused {
            reason: "no room".into(),
        },
        Frame::PageRequest {
            state: 1,
            payload: vec![0; 12],
        },
        Frame::Abort {
            reason: "ünicode".into(),
        },
        Frame::Report {
            state: 3,
            payload: vec![0, 0, 0, 0, 0, 0, 0, 17],
        },
    ]
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut w = FrameWriter::new(Vec::new());
    for f in frames {
        w.write_frame(f).unwrap();
    }
    w.into_inner()
}

fn frame_err(r: Result<Frame>) -> FrameError {
    match r {
        Err(MigrationError::Frame(e)) => e,
        other => panic!("expected a frame error, got {other:?}"),
    }
}

#[test]
fn every_kind_round_trips() {
    let frames = all_kinds();
    let bytes = encode_all(&frames);
    let mut r = FrameReader::new(&bytes[..]);
    for f in &frames {
        assert_eq!(&r.read_frame().unwrap(), f);
    }
    assert_eq!(r.version(), Some(STREAM_VERSION));
    assert_eq!(r.bytes_read(), Bytes(bytes.len() as u64));
    assert!(matches!(
        frame_err(r.read_frame()),
        FrameError::Closed { frames: 13, .. }
    ));
}

#[test]
fn encoded_sizes_match_the_format() {
    assert_eq!(encode_stream_header(1).len(), 8);
    assert_eq!(encode_frame(0, &Frame::End).unwrap().len(), 24);
    assert_eq!(
        encode_frame(0, &Frame::Switchover { postcopy: true })
            .unwrap()
            .len(),
        25
    );
    // Hello: 67 fixed + (4 + 1 + 3) + (4 + 1 + 13).
    assert_eq!(hello().encode_payload().unwrap().len(), 67 + 8 + 18);
    assert_eq!(
        encode_frame(0, &Frame::Nonce { nonce: 1 }).unwrap().len(),
        24 + NONCE_LEN
    );
    // The exact bytes of an End frame with seq 5.
    let f = encode_frame(5, &Frame::End).unwrap();
    assert_eq!(&f[..16], &[4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0]);
    assert_eq!(be_u32(&f, 16).unwrap(), crc32fast::hash(&f[..16]));
    assert_eq!(be_u32(&f, 20).unwrap(), crc32fast::hash(&f[..20]));
    let mut w = FrameWriter::new(Vec::new());
    let n = w.send(3, &[9; 100]).unwrap();
    assert_eq!(n, Bytes(8 + 24 + 4 + 100));
    assert_eq!(w.bytes_sent(), n);
    assert_eq!(w.stats().section_bytes, Bytes(100));
}

#[test]
fn bad_magic() {
    let mut bytes = encode_all(&[Frame::End]);
    bytes[0] = b'X';
    let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
    assert_eq!(e, FrameError::BadMagic { found: 0x5842_4D4D });
}

#[test]
fn unsupported_version() {
    let mut bytes = encode_stream_header(STREAM_VERSION + 1).to_vec();
    bytes.extend(encode_frame(0, &Frame::End).unwrap());
    let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
    assert_eq!(
        e,
        FrameError::UnsupportedVersion {
            found: STREAM_VERSION + 1
        }
    );
    // Version 1 (a Hello without a migration id) is no longer read.
    let e = frame_err(FrameReader::new(&encode_stream_header(1)[..]).read_frame());
    assert_eq!(e, FrameError::UnsupportedVersion { found: 1 });
    let e = frame_err(FrameReader::new(&encode_stream_header(0)[..]).read_frame());
    assert_eq!(e, FrameError::UnsupportedVersion { found: 0 });
}

#[test]
fn header_checksum_catches_a_corrupt_length() {
    let mut bytes = encode_all(&[Frame::Section {
        state: 1,
        payload: vec![0; 16],
    }]);
    bytes[8 + OFF_LEN + 3] ^= 0x01;
    let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
    assert!(
        matches!(e, FrameError::HeaderChecksum { offset: 8, .. }),
        "{e:?}"
    );
}

#[test]
fn payload_checksum() {
    let mut bytes = encode_all(&[Frame::Section {
        state: 1,
        payload: vec![0; 16],
    }]);
    bytes[8 + 20 + 6] ^= 0x80;
    let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
    assert!(
        matches!(
            e,
            FrameError::PayloadChecksum {
                seq: 0,
                offset: 8,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn unknown_kind_and_reserved_bits() {
    let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
    bytes.extend(encode_raw_frame(11, 0, &[]));
    let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
    assert_eq!(e, FrameError::UnknownKind { offset: 8, kind: 11 });

    let mut h = raw_header(4, 0, 0);
    h[OFF_RESERVED + 1] = 1;
    let crc = crc32fast::hash(&h[..OFF_HEADER_CRC]);
    h[OFF_HEADER_CRC..].copy_from_slice(&crc.to_be_bytes());
    let e = FrameHeader::decode(&h, 0, MAX_FRAME_LEN).unwrap_err();
    assert_eq!(
        e,
        FrameError::Reserved {
            offset: 0,
            value: 1
        }
    );
}

#[test]
fn oversized_frame_is_refused_before_reading_it() {
    let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
    // A valid header claiming 2^32 - 1 bytes, and nothing behind it.
    bytes.extend(raw_header(2, 0, u32::MAX));
    let e = frame_err(FrameReader::new(&bytes[..]).read_frame());
    assert_eq!(
        e,
        FrameError::Oversized {
            offset: 8,
            len: u32::MAX,
            max: MAX_FRAME_LEN
        }
    );
    let bytes = encode_all(&[Frame::Section {
        state: 1,
        payload: vec![0; 100],
    }]);
    let e = frame_err(FrameReader::with_max_frame_len(&bytes[..], 64).read_frame());
    assert!(matches!(
        e,
        FrameError::Oversized {
            len: 104,
            max: 64,
            ..
        }
    ));
    // The writer refuses to produce one.
    let mut w = FrameWriter::new(Vec::new());
    let big = vec![0u8; MAX_FRAME_LEN as usize];
    assert!(matches!(
        w.send(1, &big),
        Err(MigrationError::InvalidInput(_))
    ));
    assert_eq!(w.stats().bytes, Bytes(0), "a refused frame writes nothing");
}

#[test]
fn truncation_at_every_point() {
    let frames = [
        hello(),
        Frame::Section {
            state: 1,
            payload: vec![5; 40],
        },
        Frame::End,
    ];
    let bytes = encode_all(&frames);
    let mut boundaries = vec![0usize, 8];
    let mut at = 8;
    for (seq, f) in frames.iter().enumerate() {
        at += encode_frame(seq as u64, f).unwrap().len();
        boundaries.push(at);
    }
    for cut in 0..bytes.len() {
        let mut r = FrameReader::new(&bytes[..cut]);
        let mut n = 0;
        let err = loop {
            match r.read_frame() {
                Ok(f) => {
                    assert_eq!(f, frames[n], "cut at {cut}");
                    n += 1;
                }
                Err(e) => break e,
            }
        };
        let MigrationError::Frame(e) = err else {
            panic!("cut at {cut}: {err:?}");
        };
        if boundaries.contains(&cut) {
            assert!(
                matches!(e, FrameError::Closed { .. }),
                "cut at {cut}: {e:?}"
            );
        } else {
            assert!(
                matches!(e, FrameError::Truncated { .. }),
                "cut at {cut}: {e:?}"
            );
        }
    }
}

#[test]
fn gap_and_replay() {
    let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
    bytes.extend(encode_frame(0, &Frame::End).unwrap());
    bytes.extend(encode_frame(2, &Frame::End).unwrap());
    let mut r = FrameReader::new(&bytes[..]);
    r.read_frame().unwrap();
    let e = frame_err(r.read_frame());
    assert_eq!(
        e,
        FrameError::SequenceGap {
            offset: 32,
            expected: 1,
            found: 2
        }
    );
    // The reader stays failed.
    assert!(matches!(frame_err(r.read_frame()), FrameError::Failed(_)));

    let mut bytes = encode_stream_header(STREAM_VERSION).to_vec();
    bytes.extend(encode_frame(0, &Frame::End).unwrap());
    bytes.extend(encode_frame(0, &Frame::End).unwrap());
    let mut r = FrameReader::new(&bytes[..]);
    r.read_frame().unwrap();
    assert!(matches!(
        frame_err(r.read_frame()),
        FrameError::Replay {
            expected: 1,
            found: 0,
            ..
        }
    ));
}

#[test]
fn bad_payloads() {
    for (kind, p) in [
        (FrameKind::End, &[1u8][..]),
        (FrameKind::Started, &[0u8][..]),
        (FrameKind::Switchover, &[2u8][..]),
        (FrameKind::Switchover, &[][..]),
        (FrameKind::Section, &[0u8, 0, 0][..]),
        (FrameKind::Abort, &[0xFFu8][..]),
        (FrameKind::Hello, &[0u8; HELLO_FIXED_LEN - 1][..]),
        (FrameKind::Nonce, &[0u8; NONCE_LEN - 1][..]),
        (FrameKind::Nonce, &[0u8; NONCE_LEN + 1][..]),
    ] {
        let e = Frame::decode_payload(kind, p).unwrap_err();
        assert!(
            matches!(e, FrameError::BadPayload { .. }),
            "{kind:?}: {e:?}"
        );
    }
    // A Hello claiming 65535 states in a short payload.
    let mut p = hello().encode_payload().unwrap();
    p[HELLO_FIXED_LEN - 2] = 0xFF;
    p[HELLO_FIXED_LEN - 1] = 0xFF;
    assert!(Frame::decode_payload(FrameKind::Hello, &p).is_err());
    let mut p = hello().encode_payload().unwrap();
    p.push(0);
    assert!(Frame::decode_payload(FrameKind::Hello, &p).is_err());
    // Incremental is one byte, 0 or 1.
    let mut p = hello().encode_payload().unwrap();
    p[HELLO_FIXED_LEN - 3] = 2;
    assert!(matches!(
        Frame::decode_payload(FrameKind::Hello, &p),
        Err(FrameError::BadPayload { .. })
    ));
}

/// A channel that times out whenever its script says so, and reads bytes otherwise.
struct Flaky {
    data: Vec<u8>,
    at: usize,
    /// Read call numbers that time out.
    timeouts: Vec<usize>,
    calls: usize,
    /// Largest read.
    chunk: usize,
}

impl Read for Flaky {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.timeouts.contains(&self.calls) {
            return Err(io::Error::new(io::ErrorKind::WouldBlock, "timeout"));
        }
        let n = buf.len().min(self.chunk).min(self.data.len() - self.at);
        buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[test]
fn timeout_between_frames_is_retryable_and_inside_one_is_not() {
    let frames = [Frame::Started, Frame::End];
    let data = encode_all(&frames);
    // Reads of at most 8 bytes: call 1 times out before the stream header; then 2 reads
    // the stream header, 3..=5 frame 0's header, 6 its trailer; call 7 times out before
    // frame 1.
    let mut r = FrameReader::new(Flaky {
        data: data.clone(),
        at: 0,
        timeouts: vec![1, 7],
        calls: 0,
        chunk: 8,
    });
    assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
    assert_eq!(r.read_frame().unwrap(), Frame::Started);
    assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
    assert_eq!(r.read_frame().unwrap(), Frame::End);

    // Call 2, right after the stream header, is between units: retryable. Call 8 comes
    // after 8 bytes of frame 1's header: the reader fails.
    let mut r = FrameReader::new(Flaky {
        data,
        at: 0,
        timeouts: vec![2, 8],
        calls: 0,
        chunk: 8,
    });
    assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
    assert_eq!(r.read_frame().unwrap(), Frame::Started);
    assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
    assert!(matches!(
        r.read_frame(),
        Err(MigrationError::Frame(FrameError::Failed(_)))
    ));
}

/// The patience covers a frame's payload as well as its header and trailer, so a timeout in
/// the middle of a payload (a destination's Abort whose reason comes late) is waited out
/// and does not fail the reader for good.
#[test]
fn with_patience_a_timeout_inside_a_payload_is_waited_out() {
    let abort = Frame::Abort {
        reason: "no room here".repeat(20),
    };
    let data = encode_all(&[abort.clone(), Frame::End]);
    // Reads of at most 8 bytes: call 1 reads the stream header, 2..=4 the frame header,
    // and calls 8 to 10 time out inside the 240-byte reason.
    let flaky = |data: Vec<u8>| Flaky {
        data,
        at: 0,
        timeouts: vec![8, 9, 10],
        calls: 0,
        chunk: 8,
    };
    let mut r = FrameReader::new(flaky(data.clone()));
    r.set_patience(std::time::Duration::from_secs(60));
    assert_eq!(r.read_frame().unwrap(), abort);
    assert_eq!(r.read_frame().unwrap(), Frame::End);
    // Without patience the same timeouts fail the reader, as inside a header.
    let mut r = FrameReader::new(flaky(data));
    assert!(matches!(r.read_frame(), Err(MigrationError::Io(_))));
    assert!(matches!(
        r.read_frame(),
        Err(MigrationError::Frame(FrameError::Failed(_)))
    ));
}

#[test]
fn write_error_fails_the_writer() {
    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "cut"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut w = FrameWriter::new(Broken);
    assert!(matches!(w.send(1, b"x"), Err(MigrationError::Io(_))));
    assert!(matches!(
        w.send(1, b"x"),
        Err(MigrationError::Frame(FrameError::Failed(_)))
    ));
    assert_eq!(w.bytes_sent(), Bytes(0));
}

#[test]
fn switchover_lifts_the_rate_limit() {
    let clock = ManualClock::new();
    let limiter = RateLimiter::with_clock(
        BytesPerMs::from_bytes_per_sec(1000),
        Box::new(clock.clone()),
    );
    let mut w = FrameWriter::with_limiter(Vec::new(), limiter);
    w.send(1, &[0; 200]).unwrap();
    w.send(1, &[0; 200]).unwrap();
    assert!(clock.now() > std::time::Duration::ZERO, "the limiter slept");
    w.send(1, &[0; 200]).unwrap();
    // The window's budget is used: the Switchover frame itself does not wait.
    let t = clock.now();
    w.write_frame(&Frame::Switchover { postcopy: false })
        .unwrap();
    for _ in 0..10 {
        w.send(1, &[0; 200]).unwrap();
    }
    assert_eq!(clock.now(), t, "no sleep after switchover");
    assert_eq!(w.limiter().max_bandwidth(), BytesPerMs::ZERO);
}

/// Records when each write reached it, on the limiter's clock.
struct Timed {
    clock: ManualClock,
    writes: Vec<(std::time::Duration, usize)>,
    bytes: Vec<u8>,
}

impl std::io::Write for Timed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writes.push((self.clock.now(), buf.len()));
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A frame ten windows long at the limit arrives as it is paid for, one window's budget at
/// a time: the reader never waits more than one window between two pieces, and the stream
/// is the same bytes as unlimited.
#[test]
fn a_frame_larger_than_a_window_goes_out_at_the_rate() {
    let clock = ManualClock::new();
    // 100 bytes per 100 ms window.
    let limiter = RateLimiter::with_clock(
        BytesPerMs::from_bytes_per_sec(1000),
        Box::new(clock.clone()),
    );
    let inner = Timed {
        clock: clock.clone(),
        writes: Vec::new(),
        bytes: Vec::new(),
    };
    let mut w = FrameWriter::with_limiter(inner, limiter);
    w.send(1, &[7; 1000]).unwrap();
    w.send(1, &[8; 1000]).unwrap();
    let window = std::time::Duration::from_millis(100);
    let t = w.get_ref();
    assert!(t.writes.iter().all(|&(_, n)| n <= 100), "{:?}", t.writes);
    for pair in t.writes.windows(2) {
        assert!(pair[1].0 - pair[0].0 <= window, "{:?}", t.writes);
    }
    // Paid as it goes: about 2,072 bytes at 1,000 bytes/s.
    assert!(clock.now() >= std::time::Duration::from_secs(2), "{:?}", clock.now());
    let mut plain = FrameWriter::new(Vec::new());
    plain.send(1, &[7; 1000]).unwrap();
    plain.send(1, &[8; 1000]).unwrap();
    assert_eq!(w.into_inner().bytes, plain.into_inner());
}

#[test]
fn wait_started_maps_answers() {
    let ok = encode_all(&[Frame::Started]);
    FrameReader::new(&ok[..]).wait_started().unwrap();
    let refused = encode_all(&[Frame::Refused {
        reason: "no".into(),
    }]);
    assert!(matches!(
        FrameReader::new(&refused[..]).wait_started(),
        Err(MigrationError::DestinationRefused(r)) if r == "no"
    ));
    let abort = encode_all(&[Frame::Abort {
        reason: "bad".into(),
    }]);
    assert!(matches!(
        FrameReader::new(&abort[..]).wait_started(),
        Err(MigrationError::PeerAborted(r)) if r == "bad"
    ));
    let end = encode_all(&[Frame::End]);
    assert!(matches!(
        FrameReader::new(&end[..]).wait_started(),
        Err(MigrationError::Protocol(ProtocolError::NotAnAnswer {
            kind: FrameKind::End
        }))
    ));
}

#[test]
fn long_reasons_are_cut_on_a_char_boundary() {
    let reason = "é".repeat(MAX_REASON_LEN);
    let bytes = encode_all(&[Frame::Abort { reason }]);
    let Frame::Abort { reason } = FrameReader::new(&bytes[..]).read_frame().unwrap() else {
        panic!("not an abort");
    };
    assert_eq!(reason.len(), MAX_REASON_LEN);
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..64);
    prop_oneof![
        (
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<bool>(),
            proptest::collection::vec((any::<u32>(), "[a-z]{1,12}"), 0..4)
        )
            .prop_map(
                |(version, page_size, ram_pages, migration_id, max_bandwidth, incremental, s)| {
                    Frame::Hello(Hello {
                        version,
                        page_size,
                        ram_pages,
                        migration_id,
                        max_bandwidth,
                        nonce: u128::from(migration_id) << 3,
                        resume: u128::from(ram_pages),
                        incremental,
                        states: s
                        .into_iter()
                        .map(|(id, name)| StateInfo { id, name })
                        .collect(),
                    })
                },
            ),
        (any::<u32>(), bytes()).prop_map(|(state, payload)| Frame::Section { state, payload }),
        any::<bool>().prop_map(|postcopy| Frame::Switchover { postcopy }),
        Just(Frame::End),
        Just(Frame::Started),
        ".{0,20}".prop_map(|reason| Frame::Refused { reason }),
        (any::<u32>(), bytes()).prop_map(|(state, payload)| Frame::PageRequest { state, payload }),
        ".{0,20}".prop_map(|reason| Frame::Abort { reason }),
        any::<u128>().prop_map(|nonce| Frame::Nonce { nonce }),
        (any::<u32>(), bytes()).prop_map(|(state, payload)| Frame::Report { state, payload }),
    ]
}

/// Reads `bytes` to the first error; returns the frames before it.
fn read_all(bytes: &[u8]) -> (Vec<Frame>, MigrationError) {
    let mut r = FrameReader::new(bytes);
    let mut out = Vec::new();
    loop {
        match r.read_frame() {
            Ok(f) => out.push(f),
            Err(e) => return (out, e),
        }
    }
}

proptest! {
    #![proptest_config(crate::test_seed::proptest_config(ProptestConfig::default()))]

    #[test]
    fn round_trip(frames in proptest::collection::vec(arb_frame(), 0..12)) {
        let bytes = encode_all(&frames);
        let (got, err) = read_all(&bytes);
        prop_assert_eq!(&got, &frames);
        let closed = matches!(err, MigrationError::Frame(FrameError::Closed { .. }));
        prop_assert!(closed, "{:?}", err);
    }

    #[test]
    fn single_byte_corruption_is_an_error(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        pos in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut bytes = encode_all(&frames);
        let at = pos.index(bytes.len());
        bytes[at] ^= xor;
        let (got, err) = read_all(&bytes);
        // Every frame decoded is the one written, and the damaged one never decodes.
        prop_assert!(got.len() < frames.len(), "corruption at {} went unnoticed", at);
        prop_assert_eq!(&got[..], &frames[..got.len()]);
        let framed = matches!(err, MigrationError::Frame(_));
        prop_assert!(framed, "{:?}", err);
    }

    #[test]
    fn truncation_is_an_error(
        frames in proptest::collection::vec(arb_frame(), 1..8),
        pos in any::<prop::sample::Index>(),
    ) {
        let bytes = encode_all(&frames);
        let cut = pos.index(bytes.len());
        let (got, err) = read_all(&bytes[..cut]);
        prop_assert!(got.len() < frames.len());
        prop_assert_eq!(&got[..], &frames[..got.len()]);
        let short = matches!(
            err,
            MigrationError::Frame(FrameError::Truncated { .. } | FrameError::Closed { .. })
        );
        prop_assert!(short, "{:?}", err);
    }
}
