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
        self.0.lock().frame = Frame::Between;
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
            let due = now
                .checked_add(t.idle)
                .and_then(|d| d.checked_add(at_rate))
                .map_or(far, |d| d.min(far));
            t.frame = Frame::Due(due);
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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let sock = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let timeout = Duration::from_millis(200);
        let mut w = PacedWrite::new(sock, timeout).unwrap();
        let clock = w.clock();
        clock.set_rate(16 << 20);
        let frame = vec![7u8; 32 << 20];
        clock.frame(frame.len() as u64);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            peer.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = peer.read(&mut buf);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let t0 = Instant::now();
        let e = w.write_all(&frame).unwrap_err();
        let took = t0.elapsed();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        reader.join().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // Due in 0.2 s + 32 MiB at 16 MiB/s = 2.2 s; the peer takes about 3 MiB/s, a
        // write of about 10 s less what the socket buffers hold: the deadline cuts it.
        assert!(
            e.to_string().contains("a frame did not go out whole"),
            "{e}"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }
}
