//! The writing side's time bound on a TCP connection, under TLS if any: [`PacedWrite`].
//!
//! A socket's write timeout alone bounds one `send`, which returns a partial count
//! whenever a byte moved: a peer that reads a little before each timeout keeps a
//! `write_all` going without end. So a frame, once its first byte is written, must be
//! written whole within the write timeout plus its length at the slowest rate allowed
//! ([`FrameClock::set_rate`]): every `send` waits at most the write timeout and never past
//! that deadline, and a deadline that passed is an [`io::ErrorKind::TimedOut`] error naming
//! the bound. The same bound the destination's reads have (`tcp.rs`, `Paced`), counted
//! from the frame's first byte as there.
//!
//! While the guest is stopped ([`FrameClock::chain`]) the frames share one budget: the
//! write timeout once, then each frame's length at that rate, added to the deadline of the
//! frame before, and so is the source's own time between the two frames (from the end of
//! the one to the first byte of the next: the stop's disk writes, a state's encoding), so
//! that only the time the peer takes is bounded, never the source's own (`frame_due`).
//! Each frame bounded alone would let a peer that reads every frame just inside its own
//! deadline hold the stopped guest for the write timeout once per frame.

use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the writer is in the frame it writes.
#[derive(Debug, Clone, Copy)]
enum Frame {
    /// Between frames: only the write timeout bounds a `send`.
    Between,
    /// A frame of this many bytes is next; its clock starts at its first `send`.
    Next(u64),
    /// The frame must be written whole by this instant.
    Due(Instant),
}

#[derive(Debug)]
struct Timing {
    /// The longest one `send` waits.
    idle: Duration,
    /// The slowest rate a frame may go out at, in bytes per second; `None`: no frame
    /// deadline.
    rate: Option<u64>,
    frame: Frame,
    /// Frames share one budget ([`FrameClock::chain`]).
    chained: bool,
    /// The deadline of the chain's last frame, and when that frame ended (written whole).
    last_due: Option<(Instant, Instant)>,
}

/// The deadline of a frame whose first byte goes out at `now`, `at_rate` its length at the
/// slowest rate allowed: `now` plus the write timeout `idle` plus `at_rate`; or, chained
/// after a frame due at `last` that ended at `ended`, `last` plus the source's own time
/// since (`now − ended`) plus `at_rate`. `None` where it would overflow.
fn frame_due(
    now: Instant,
    chained_after: Option<(Instant, Instant)>,
    idle: Duration,
    at_rate: Duration,
) -> Option<Instant> {
    let base = match chained_after {
        Some((last, ended)) => last.checked_add(now.saturating_duration_since(ended))?,
        None => now.checked_add(idle)?,
    };
    base.checked_add(at_rate)
}

/// The handle that tells a [`PacedWrite`] where frames begin and end.
#[derive(Debug, Clone)]
pub struct FrameClock(Arc<parking_lot::Mutex<Timing>>);

impl FrameClock {
    /// Frames must go out at `rate` bytes per second at least (0 counts as 1).
    pub fn set_rate(&self, rate: u64) {
        self.0.lock().rate = Some(rate.max(1));
    }

    /// The next bytes written begin a frame of `len` bytes on the wire.
    pub fn frame(&self, len: u64) {
        self.0.lock().frame = Frame::Next(len);
    }

    /// The frame was written whole, or given up: the writes that follow belong to none.
    pub fn between(&self) {
        let mut t = self.0.lock();
        t.frame = Frame::Between;
        if let Some((due, _)) = t.last_due {
            t.last_due = Some((due, Instant::now()));
        }
    }

    /// `true`: the frames from now on share one budget (the guest is stopped: see the
    /// module documentation); `false`: each frame is bounded alone again.
    pub fn chain(&self, on: bool) {
        let mut t = self.0.lock();
        t.chained = on;
        t.last_due = None;
    }
}

/// The writing half of a connection's socket, bounded in time per frame (see the module
/// documentation).
#[derive(Debug)]
pub struct PacedWrite {
    sock: TcpStream,
    timing: Arc<parking_lot::Mutex<Timing>>,
    /// The socket's write timeout as last set.
    set: Duration,
}

impl PacedWrite {
    /// `sock` (blocking), each `send` waiting at most `timeout`; no frame deadline until
    /// [`FrameClock::set_rate`].
    ///
    /// # Errors
    /// Setting the socket's write timeout ([`io::ErrorKind::InvalidInput`] for zero).
    pub fn new(sock: TcpStream, timeout: Duration) -> io::Result<PacedWrite> {
        sock.set_write_timeout(Some(timeout))?;
        Ok(PacedWrite {
            sock,
            set: timeout,
            timing: Arc::new(parking_lot::Mutex::new(Timing {
                idle: timeout,
                rate: None,
                frame: Frame::Between,
                chained: false,
                last_due: None,
            })),
        })
    }

    /// The socket (to shut it down).
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// The handle that marks this writer's frames.
    pub fn clock(&self) -> FrameClock {
        FrameClock(Arc::clone(&self.timing))
    }
}

impl Write for PacedWrite {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let now = Instant::now();
        let mut t = self.timing.lock();
        if let (Frame::Next(len), Some(rate)) = (t.frame, t.rate) {
            let at_rate = Duration::from_secs_f64(len as f64 / rate as f64);
            // Far enough to be no bound, near enough not to overflow.
            let far = now + Duration::from_secs(1 << 30);
            let after = t.last_due.filter(|_| t.chained);
            let due = frame_due(now, after, t.idle, at_rate).map_or(far, |d| d.min(far));
            t.frame = Frame::Due(due);
            if t.chained {
                // Until `between` says when it ended, it ends now (a frame given up early).
                t.last_due = Some((due, now));
            }
        }
        let timed_out = |t: &Timing, what: &str| {
            let rate = t.rate.map_or(String::new(), |r| {
                format!(", frames at {r} bytes/s at least")
            });
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} in time (write timeout {:?}{rate})", t.idle),
            )
        };
        let (wait, what) = match t.frame {
            Frame::Due(due) => {
                let Some(left) = due.checked_duration_since(now).filter(|w| !w.is_zero()) else {
                    return Err(timed_out(&t, "a frame did not go out whole"));
                };
                if left < t.idle {
                    (left, "a frame did not go out whole")
                } else {
                    (t.idle, "the peer took no byte")
                }
            }
            Frame::Between | Frame::Next(_) => (t.idle, "the peer took no byte"),
        };
        // A far deadline leaves the socket as it is, with no system call per write.
        if wait != self.set {
            self.sock.set_write_timeout(Some(wait))?;
            self.set = wait;
        }
        match self.sock.write(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(timed_out(&t, what))
            }
            r => r,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// A peer that takes a little before every write timeout: the frame's deadline ends
    /// the write, where the write timeout alone never would.
    #[test]
    fn a_frame_to_a_peer_that_trickles_times_out_by_its_deadline() {
        // Due in 0.3 s + 32 MiB at 64 MiB/s = 0.8 s; the peer takes 3 MiB/s, a write of
        // about 10 s less what the socket buffers hold: the deadline cuts it.
        let (e, took) = frames_to_a_paced_peer(TIGHT, false, 1, 32 << 20, 3.0 * (1 << 20) as f64);
        let e = e.expect("the frame's deadline passed");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(
            e.to_string().contains("a frame did not go out whole"),
            "{e}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    /// The bound the deadline tests cut a slow peer with: a write timeout of 0.3 s, frames
    /// at 64 MiB/s at least.
    const TIGHT: (Duration, u64) = (Duration::from_millis(300), 64 << 20);

    /// `n` frames of `len` bytes written to a peer that reads at `peer_rate` bytes per
    /// second (paced by the bytes it has read, so sleep overshoot does not accumulate),
    /// chained or not, under `bound` (the write timeout, and the slowest frame rate in
    /// bytes per second): the first error and when it came, or `None` with the time taken.
    fn frames_to_a_paced_peer(
        bound: (Duration, u64),
        chained: bool,
        n: usize,
        len: usize,
        peer_rate: f64,
    ) -> (Option<io::Error>, Duration) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let mut w = PacedWrite::new(sock, bound.0).unwrap();
        let clock = w.clock();
        clock.set_rate(bound.1);
        clock.chain(chained);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            peer.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            let t0 = Instant::now();
            let mut got = 0u64;
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(k) = peer.read(&mut buf) {
                    got += k as u64;
                }
                let due = t0 + Duration::from_secs_f64(got as f64 / peer_rate);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        });
        let frame = vec![7u8; len];
        let t0 = Instant::now();
        let mut err = None;
        for _ in 0..n {
            clock.frame(len as u64);
            let r = w.write_all(&frame);
            clock.between();
            if let Err(e) = r {
                err = Some(e);
                break;
            }
        }
        let took = t0.elapsed();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().unwrap();
        (err, took)
    }

    /// A frame starting after the chain's deadline passed does not get the write timeout
    /// afresh: a peer that finishes each frame just before its deadline (the source's own
    /// work between frames then passing it) would hold the stopped guest for the write
    /// timeout once per frame again. The chain credits the source's own time instead, and
    /// nothing else.
    #[test]
    fn a_chained_frame_adds_only_the_sources_own_time() {
        let t0 = Instant::now();
        let idle = Duration::from_secs(10);
        let len = Duration::from_millis(5);
        let ms = Duration::from_millis;
        assert_eq!(frame_due(t0, None, idle, len), Some(t0 + idle + len));
        // The last frame was due at t0 + 10 s and ended 0.5 ms before; the next starts
        // 1 ms after that, past the last deadline: 1 ms of the source's own time.
        let last = t0 + idle;
        let ended = last - Duration::from_micros(500);
        let now = ended + ms(1);
        assert_eq!(
            frame_due(now, Some((last, ended)), idle, len),
            Some(last + ms(1) + len)
        );
        // Well before the deadline, the same.
        let ended = t0 + ms(100);
        assert_eq!(
            frame_due(ended + ms(3), Some((last, ended)), idle, len),
            Some(last + ms(3) + len)
        );
    }

    /// Bounded one by one, frames to a peer that takes each just inside its own deadline
    /// (0.3 s + 8 MiB at 64 MiB/s = 0.425 s; the peer takes 8 MiB in about 0.27 s) never
    /// time out, so the stopped guest would wait the write timeout once per frame. Chained,
    /// 24 frames share 0.3 s + 24 × 0.125 s = 3.3 s, which the peer's 6.4 s (less what the
    /// socket buffers hold) passes: the chain's deadline ends it. A peer that keeps up
    /// finishes chained frames: 8 × 8 MiB under a write timeout of 30 s and frames at 1
    /// MiB/s share 94 s, which no machine's loopback needs, however loaded (it takes well
    /// under a second), so the run stays short and asserts no speed.
    #[test]
    fn chained_frames_share_one_deadline() {
        let (e, took) = frames_to_a_paced_peer(TIGHT, true, 24, 8 << 20, 30.0 * (1 << 20) as f64);
        let e = e.expect("the chain's deadline passed");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("did not go out whole"), "{e}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        let keeps_up = (Duration::from_secs(30), 1 << 20);
        let (e, took) = frames_to_a_paced_peer(keeps_up, true, 8, 8 << 20, f64::INFINITY);
        assert!(e.is_none(), "{e:?} after {took:?}");
    }
}
