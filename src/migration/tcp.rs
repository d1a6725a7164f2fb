//! Both ends of a migration over TCP on 127.0.0.1, with real time and real vCPU threads.
//!
//! - [`TcpDestination`]: a listener on an ephemeral port and a thread running
//!   [`Destination`] for each connection, one source at a time (a source that connects
//!   meanwhile is refused: [`BUSY`]). Each connection gets a fresh nonce, the
//!   destination's first frame, which the Hello must echo. An attempt that fails before
//!   the destination guest runs leaves its RAM behind ([`RetainedRam`]) for the next
//!   connection of the same migration (its Hello names the migration's token: [`Session`]),
//!   so a retry from the source
//!   ([`SetupMode::Incremental`](super::ram::SetupMode::Incremental)) sends only what it
//!   re-dirtied; any other Hello is refused and the RAM stays.
//! - [`migrate_in_session`] ([`migrate_to`] for a first attempt): the source side of one
//!   attempt: connects, reads the destination's nonce, wraps the socket in a
//!   rate-limited [`FrameWriter`], runs a thread that turns the destination's frames into
//!   [`DestMessage`]s (the loop's [`Inbound`]), and calls [`precopy::run`] with
//!   [`RealClock`].
//!
//! `migration/harness.rs` (feature `testing`) runs both ends in one process for the demo,
//! the benchmark and the tests.
//!
//! With [`DestOptions::tls`] and [`SourceOptions::tls`] the connection runs TLS with
//! certificates, both ends authenticated ([`super::tls`], feature `tls`): the handshake
//! completes within the timeout before the destination's nonce, and every bound below holds
//! over it (a read's wait counts the records it takes to deliver a byte). Without them it is
//! plain TCP.
//!
//! No wait is unbounded: the sockets have read and write timeouts, the destination stops
//! waiting for a connection after its timeout, the return path's `recv` gives up after
//! the source's timeout, and the loop waits on a destination's preload answer no longer
//! than [`super::LoopConfig::answer_timeout`]. The destination also bounds what a peer that keeps sending, but
//! slowly, can hold it for: each frame must arrive within the read timeout plus its length
//! at the slowest rate allowed ([`DestOptions::min_frame_rate`], or the Hello's lower
//! `max_bandwidth`), counted from its first byte, and each attempt ends by
//! [`DestOptions::attempt_timeout`], unless its guest started here first (postcopy). The
//! source bounds what a destination that keeps reading, but slowly, can hold it for (its
//! guest stopped, during the switchover) the same way: each frame must be written whole
//! within the write timeout plus its length at [`SourceOptions::min_frame_rate`] (or the
//! lower `max_bandwidth`), counted from its first byte ([`PacedWrite`]), below TLS. Every
//! timeout is at most [`MAX_TIMEOUT`], so no deadline overflows.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::channel::{DestMessage, Inbound, Outbound};
use super::clock::RealClock;
use super::dest::{
    new_nonce, DestEvent, Destination, DestinationConfig, DestinationGuest, RetainedRam,
};
use super::dest_state::SharedDestState;
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::{Control, Frame, Hello, StateId, FRAME_OVERHEAD, STREAM_HEADER_LEN};
use super::guest::Vm;
use super::paced_write::{FrameClock, PacedWrite};
use super::precopy::{self, Controller, Endpoints, LoopConfig, Outcome};
use super::rate::RateLimiter;
use super::state::MigrationState;
use super::stream::{FrameReader, FrameWriter, WriterStats};
#[cfg(feature = "tls")]
use super::tls::{self, TlsClient, TlsReader, TlsServer, TlsWriter};
use crate::rng::SplitMix64;
use crate::units::{Bytes, BytesPerMs};

/// The default for every timeout here.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default for the longest attempt a destination serves ([`DestOptions::attempt_timeout`]).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3600);

/// The default slowest rate a frame may arrive at ([`DestOptions::min_frame_rate`]), or go out
/// at ([`SourceOptions::min_frame_rate`]), in bytes per second: 1 MiB/s, a 16 MiB frame in
/// 16 s.
pub const DEFAULT_MIN_FRAME_RATE: u64 = 1 << 20;

/// The longest timeout either end takes (a year): a longer one is
/// [`MigrationError::InvalidInput`], so that no deadline computed from it overflows.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// `timeout` as [`MigrationError::InvalidInput`] if it is zero or above [`MAX_TIMEOUT`].
fn check_timeout(what: &str, timeout: Duration) -> Result<()> {
    if timeout.is_zero() || timeout > MAX_TIMEOUT {
        return Err(MigrationError::InvalidInput(format!(
            "{what} must be positive and at most {MAX_TIMEOUT:?}, not {timeout:?}"
        )));
    }
    Ok(())
}

/// `rate` (a `min_frame_rate`) as [`MigrationError::InvalidInput`] if it is zero.
fn check_rate(rate: u64) -> Result<()> {
    if rate == 0 {
        return Err(MigrationError::InvalidInput(
            "min_frame_rate must be positive".into(),
        ));
    }
    Ok(())
}

/// How often a waiting thread (the destination's accept, the source's reader) looks at its
/// stop flag.
const POLL: Duration = Duration::from_millis(20);

/// How a [`TcpDestination`] behaves.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// Connections (attempts) it serves before it gives up.
    pub max_attempts: u32,
    /// It refuses to start its guest in the first `refuse_attempts` attempts (the failure
    /// tests' refusing destination).
    pub refuse_attempts: u32,
    /// Postcopy: pages the destination guest reads right after it starts, at random; each
    /// missing one becomes a PageRequest.
    pub postcopy_touches: u32,
    /// Read and write timeout of each connection (the longest wait for a byte), and the
    /// longest wait for a connection.
    pub timeout: Duration,
    /// The longest one attempt may last, from its connection until its end or, in
    /// postcopy, until the guest starts here: after that the source cannot take the guest
    /// back, and the attempt is bounded only by `timeout` and the frames' deadlines (a
    /// deadline then would lose the guest on both sides).
    pub attempt_timeout: Duration,
    /// The slowest rate, in bytes per second, at which a frame may arrive: a frame of `n`
    /// bytes must be whole within `timeout + n / rate` of its first byte. A Hello that
    /// declares a lower `max_bandwidth` lowers it to that for the rest of the attempt (the
    /// source's writer sends no faster; `attempt_timeout` still bounds the whole).
    pub min_frame_rate: u64,
    /// The largest guest RAM a Hello may ask for.
    pub max_ram_bytes: Bytes,
    /// Seed of the postcopy touches.
    pub seed: u64,
    /// The destination-side states besides RAM ([`DestState`](super::dest_state::DestState)), given to every attempt.
    pub states: Vec<SharedDestState>,
    /// Where to listen: 127.0.0.1 on a free port by default.
    pub bind: SocketAddr,
    /// TLS with certificates on every connection (none by default: plain TCP). The
    /// handshake must complete within `timeout`; a connection that fails it is a failed
    /// attempt ([`MigrationError::Tls`]).
    #[cfg(feature = "tls")]
    pub tls: Option<TlsServer>,
    /// Set to each attempt's number (from 1, as [`DestReport::attempts`] counts them) when
    /// its connection is accepted, before anything of it reaches a state: so a state that
    /// reports progress names the attempt as the report will, though attempts that failed
    /// before a Hello (a probe, a TLS handshake) never reached it.
    pub attempt: Option<Arc<std::sync::atomic::AtomicU32>>,
}

impl Default for DestOptions {
    fn default() -> Self {
        DestOptions {
            max_attempts: 1,
            refuse_attempts: 0,
            postcopy_touches: 0,
            timeout: DEFAULT_TIMEOUT,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            min_frame_rate: DEFAULT_MIN_FRAME_RATE,
            max_ram_bytes: DestinationConfig::default().max_ram_bytes,
            seed: 0,
            states: Vec::new(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            #[cfg(feature = "tls")]
            tls: None,
            attempt: None,
        }
    }
}

/// One connection a [`TcpDestination`] served.
#[derive(Debug)]
pub struct AttemptReport {
    /// `None` for the attempt that completed; the destination's error otherwise.
    pub error: Option<MigrationError>,
    /// Pages it held when the attempt began (kept from earlier attempts).
    pub pages_held_at_start: u64,
    /// Page entries written in this attempt.
    pub pages_written: u64,
    /// Pages it held when the attempt ended.
    pub pages_held_at_end: u64,
}

/// What a [`TcpDestination`] did.
#[derive(Debug)]
pub struct DestReport {
    /// The running guest, after an attempt that completed.
    pub guest: Option<DestinationGuest>,
    /// Every attempt, in order.
    pub attempts: Vec<AttemptReport>,
    /// Without a completed attempt: the RAM the last failed one left, which a new
    /// destination can start from ([`TcpDestination::spawn_with`]).
    pub retained: Option<RetainedRam>,
}

/// A destination listening on [`DestOptions::bind`] (127.0.0.1 by default), serving attempts
/// in a thread until one completes (or `max_attempts`, or no connection for `timeout`).
#[derive(Debug)]
pub struct TcpDestination {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<DestReport>>,
}

impl TcpDestination {
    /// Binds [`DestOptions::bind`] (by default 127.0.0.1 on an ephemeral port) and starts
    /// serving.
    ///
    /// # Errors
    /// [`MigrationError::Io`] if the socket or the thread cannot be created;
    /// [`MigrationError::InvalidInput`] for `max_attempts` 0, a zero timeout or one above
    /// [`MAX_TIMEOUT`], or a `min_frame_rate` of 0.
    pub fn spawn(options: DestOptions) -> Result<TcpDestination> {
        TcpDestination::spawn_with(options, None)
    }

    /// As [`TcpDestination::spawn`], starting from the RAM an earlier destination kept
    /// ([`DestReport::retained`]): a destination that survived a failed attempt.
    ///
    /// # Errors
    /// As [`TcpDestination::spawn`].
    pub fn spawn_with(options: DestOptions, kept: Option<RetainedRam>) -> Result<TcpDestination> {
        if options.max_attempts == 0 {
            return Err(MigrationError::InvalidInput(
                "max_attempts must be at least 1".into(),
            ));
        }
        check_timeout("timeout", options.timeout)?;
        check_timeout("attempt_timeout", options.attempt_timeout)?;
        check_rate(options.min_frame_rate)?;
        let listener = TcpListener::bind(options.bind)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("migration-dest".into())
            .spawn(move || serve(&listener, &options, &flag, kept))?;
        Ok(TcpDestination {
            addr,
            stop,
            thread: Some(thread),
        })
    }

    /// Where sources connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting new attempts, waits for the one in progress and returns the report.
    ///
    /// # Errors
    /// [`ProtocolError::DestinationThread`] if the destination thread panicked.
    pub fn join(self) -> Result<DestReport> {
        self.stop.store(true, Ordering::SeqCst);
        self.wait()
    }

    /// Waits until the destination is done on its own terms: an attempt completed (the
    /// guest started here), [`DestOptions::max_attempts`] were served, or no connection came
    /// within [`DestOptions::timeout`]; then returns the report. For a destination that
    /// runs as its own process and has nothing else to wait for.
    ///
    /// # Errors
    /// [`ProtocolError::DestinationThread`] if the destination thread panicked.
    pub fn wait(mut self) -> Result<DestReport> {
        let t = self
            .thread
            .take()
            .ok_or(ProtocolError::DestinationThread("was already joined"))?;
        t.join()
            .map_err(|_| ProtocolError::DestinationThread("panicked").into())
    }
}

impl Drop for TcpDestination {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for a connection until `timeout` or `stop`.
fn accept(listener: &TcpListener, timeout: Duration, stop: &AtomicBool) -> Option<TcpStream> {
    let deadline = Instant::now() + timeout;
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        match listener.accept() {
            Ok((s, _)) => return Some(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL / 4),
            Err(_) => return None,
        }
    }
    None
}

/// The destination thread: one [`Destination`] per connection, its RAM carried over from a
/// failed attempt to the next.
fn serve(
    listener: &TcpListener,
    o: &DestOptions,
    stop: &AtomicBool,
    mut kept: Option<RetainedRam>,
) -> DestReport {
    let mut report = DestReport {
        guest: None,
        attempts: Vec::new(),
        retained: None,
    };
    let mut rng = SplitMix64::new(o.seed ^ 0x7C9);
    for attempt in 0..o.max_attempts {
        let Some(sock) = accept(listener, o.timeout, stop) else {
            break;
        };
        if let Some(n) = &o.attempt {
            n.store(attempt.saturating_add(1), Ordering::SeqCst);
        }
        let held = kept.as_ref().map_or(0, RetainedRam::received_pages);
        let mut a = AttemptReport {
            error: None,
            pages_held_at_start: held,
            pages_written: 0,
            pages_held_at_end: held,
        };
        let config = DestinationConfig {
            refuse_start: (attempt < o.refuse_attempts)
                .then(|| format!("destination told to refuse attempt {attempt}")),
            max_ram_bytes: o.max_ram_bytes,
            nonce: Some(new_nonce()),
            ..DestinationConfig::default()
        };
        match prepare(sock, o) {
            Err(e) => a.error = Some(e.lift_tls()),
            Ok((from, to)) => {
                let timing = from.timing();
                let mut d = Destination::with_retained(from, to, config, kept.take());
                for st in &o.states {
                    d.add_state(std::sync::Arc::clone(st));
                }
                d.set_header_hook(Paced::header_hook(&timing));
                match drive(&mut d, listener, &timing, o, &mut rng, &mut a.pages_written) {
                    Ok(()) => {
                        a.pages_held_at_end = d.received_pages();
                        // Done: `run` returns at once with the guest.
                        match d.run() {
                            Ok(g) => report.guest = Some(g),
                            Err(e) => a.error = Some(e),
                        }
                    }
                    Err(e) => {
                        a.error = Some(e.lift_tls());
                        kept = d.into_retained();
                        a.pages_held_at_end = kept.as_ref().map_or(0, RetainedRam::received_pages);
                    }
                }
            }
        }
        let done = a.error.is_none();
        report.attempts.push(a);
        if done {
            break;
        }
    }
    if report.guest.is_none() {
        report.retained = kept;
    }
    report
}

/// An accepted connection, blocking with timeouts, past its TLS handshake if
/// [`DestOptions::tls`] (within the timeout), split into its two directions; the reading one
/// bounded in time ([`Paced`]), the attempt's end counted from this call (the connection),
/// not from the handshake's end.
fn prepare(sock: TcpStream, o: &DestOptions) -> Result<(Paced, WireWriter)> {
    let connected = Instant::now();
    sock.set_nonblocking(false)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(o.timeout))?;
    sock.set_write_timeout(Some(o.timeout))?;
    #[cfg(feature = "tls")]
    if let Some(server) = &o.tls {
        let deadline = Instant::now() + o.timeout.min(o.attempt_timeout);
        let (r, w) = tls::accept(server, sock, deadline, o.timeout)?;
        // The TLS reader starts with no timeout, and `Paced` sets one only when it differs
        // from the read timeout it assumes set: a source silent after its handshake kept
        // the first read waiting for good.
        let mut reader = WireReader::Tls(r);
        reader.set_read_timeout(o.timeout)?;
        return Ok((Paced::new(reader, o, connected), WireWriter::Tls(w)));
    }
    let back = PacedWrite::new(sock.try_clone()?, o.timeout)?;
    Ok((
        Paced::new(WireReader::Plain(sock), o, connected),
        WireWriter::Plain(back),
    ))
}

/// The reading direction of a connection: the socket, or TLS over it.
#[derive(Debug)]
enum WireReader {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(TlsReader),
}

impl WireReader {
    /// The longest one read waits (over TLS: in all, whatever the records it takes).
    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        match self {
            WireReader::Plain(s) => s.set_read_timeout(Some(timeout)),
            #[cfg(feature = "tls")]
            WireReader::Tls(r) => {
                r.set_read_timeout(Some(timeout));
                Ok(())
            }
        }
    }
}

impl Read for WireReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            WireReader::Plain(s) => s.read(buf),
            #[cfg(feature = "tls")]
            WireReader::Tls(r) => r.read(buf),
        }
    }
}

/// The writing direction of a connection: the socket, or TLS over it.
#[derive(Debug)]
enum WireWriter {
    Plain(PacedWrite),
    #[cfg(feature = "tls")]
    Tls(TlsWriter),
}

impl WireWriter {
    /// The handle that marks the frames written, for their deadlines.
    fn clock(&self) -> FrameClock {
        match self {
            WireWriter::Plain(s) => s.clock(),
            #[cfg(feature = "tls")]
            WireWriter::Tls(w) => w.clock(),
        }
    }

    /// Shuts the socket down (`how`); over TLS, a `close_notify` first if only our
    /// direction closes.
    fn shutdown(&mut self, how: Shutdown) {
        let sock = match self {
            WireWriter::Plain(s) => s.socket(),
            #[cfg(feature = "tls")]
            WireWriter::Tls(w) => {
                if how == Shutdown::Write {
                    w.close_notify();
                }
                w.socket()
            }
        };
        let _ = sock.shutdown(how);
    }
}

impl Write for WireWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            WireWriter::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            WireWriter::Tls(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            WireWriter::Plain(s) => s.flush(),
            #[cfg(feature = "tls")]
            WireWriter::Tls(w) => w.flush(),
        }
    }
}

/// Where the destination's reader is in the frame it reads, for the frame's deadline.
#[derive(Debug, Clone, Copy)]
enum FrameTime {
    /// Between frames: only the read timeout and the attempt's end bound a read.
    Between,
    /// The first bytes of a frame (its header, after the stream header for the first one)
    /// came; the first at `start`.
    Header { start: Instant },
    /// The header said how long the frame is: `left` bytes of payload and trailer are due
    /// by `due`.
    Body { due: Instant, left: u64 },
}

/// The time bounds of one attempt's reads.
#[derive(Debug)]
struct Timing {
    /// The longest wait for a byte.
    idle: Duration,
    /// The slowest rate a frame may arrive at, in bytes per second (at least 1).
    rate: u64,
    /// When the attempt must be over; `None` once the guest started here (a postcopy
    /// switchover): from then on the source cannot take it back, so ending the attempt
    /// would lose it, and only the read timeout and the frame's deadline bound a read
    /// (QEMU sets no overall deadline on an incoming postcopy either).
    attempt_end: Option<Instant>,
    frame: FrameTime,
}

impl Timing {
    /// When a frame whose first byte came at `start` and whose payload is `len` bytes must
    /// be whole: the read timeout, plus the whole frame (framing included) at `rate`.
    fn frame_due(&self, start: Instant, len: u32) -> Instant {
        let bytes = u64::from(len) + (FRAME_OVERHEAD + STREAM_HEADER_LEN) as u64;
        start + self.idle + Duration::from_secs_f64(bytes as f64 / self.rate.max(1) as f64)
    }
}

/// The destination's reading side of a connection. A read waits at most the read timeout,
/// and never past the attempt's end nor past the current frame's deadline (the read
/// timeout after the frame's first byte for its header, then [`Timing::frame_due`]). A
/// bound that passed is a [`io::ErrorKind::TimedOut`] error naming it.
#[derive(Debug)]
struct Paced {
    sock: WireReader,
    timing: Arc<parking_lot::Mutex<Timing>>,
    /// The socket's read timeout as last set.
    set: Duration,
}

impl Paced {
    /// The reading direction of an attempt whose connection came at `connected`.
    fn new(sock: WireReader, o: &DestOptions, connected: Instant) -> Paced {
        Paced {
            sock,
            set: o.timeout,
            timing: Arc::new(parking_lot::Mutex::new(Timing {
                idle: o.timeout,
                rate: o.min_frame_rate.max(1),
                attempt_end: Some(connected + o.attempt_timeout),
                frame: FrameTime::Between,
            })),
        }
    }

    fn timing(&self) -> Arc<parking_lot::Mutex<Timing>> {
        Arc::clone(&self.timing)
    }

    /// The [`FrameReader`]'s hook: a verified header sets its frame's deadline.
    fn header_hook(timing: &Arc<parking_lot::Mutex<Timing>>) -> super::stream::HeaderHook {
        let timing = Arc::clone(timing);
        Box::new(move |len| {
            let mut t = timing.lock();
            if let FrameTime::Header { start } = t.frame {
                let due = t.frame_due(start, len);
                t.frame = FrameTime::Body {
                    due,
                    left: u64::from(len) + 4,
                };
            }
        })
    }
}

impl Read for Paced {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let now = Instant::now();
        let mut t = self.timing.lock();
        let (limit, what) = match t.frame {
            FrameTime::Between => (now + t.idle, "no byte came"),
            FrameTime::Header { start } => (start + t.idle, "a frame header did not come whole"),
            FrameTime::Body { due, .. } => (due, "a frame did not come whole"),
        };
        let (limit, what) = match t.attempt_end {
            Some(end) if end < limit => (end, "the attempt lasted too long"),
            _ => (limit, what),
        };
        let timed_out = |t: &Timing| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{what} in time (read timeout {:?}, frames at {} bytes/s at least)",
                    t.idle, t.rate
                ),
            )
        };
        let Some(wait) = limit.checked_duration_since(now).filter(|w| !w.is_zero()) else {
            return Err(timed_out(&t));
        };
        // At most the read timeout (a far deadline leaves the socket as it is, with no
        // system call per read).
        let wait = wait.min(t.idle);
        if wait != self.set {
            self.sock.set_read_timeout(wait)?;
            self.set = wait;
        }
        match self.sock.read(buf) {
            Ok(n) => {
                t.frame = match t.frame {
                    FrameTime::Between if n > 0 => FrameTime::Header {
                        start: Instant::now(),
                    },
                    FrameTime::Body { due, left } => match left.saturating_sub(n as u64) {
                        0 => FrameTime::Between,
                        left => FrameTime::Body { due, left },
                    },
                    other => other,
                };
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(timed_out(&t))
            }
            Err(e) => Err(e),
        }
    }
}

/// Steps `d` to the end of the stream; in postcopy the guest touches pages as it starts. A
/// Hello that declares a rate limit below the floor lowers the floor to it.
fn drive(
    d: &mut Destination<Paced, WireWriter>,
    listener: &TcpListener,
    timing: &parking_lot::Mutex<Timing>,
    o: &DestOptions,
    rng: &mut SplitMix64,
    written: &mut u64,
) -> Result<()> {
    loop {
        turn_away(listener, o.timeout);
        match d.step()? {
            DestEvent::Hello(h) if h.max_bandwidth > 0 => {
                // The rate the source's limiter sends at, which its budget's truncation
                // may put below the limit itself (never below 10 bytes/s: one byte a
                // window).
                let sustained = super::rate::sustained_bytes_per_sec(
                    BytesPerMs::from_bytes_per_sec(h.max_bandwidth),
                );
                let mut t = timing.lock();
                t.rate = t.rate.min(sustained);
            }
            DestEvent::Pages { written: w, .. } => *written += w as u64,
            DestEvent::Switchover { postcopy: true } => {
                // The guest runs here now: the attempt's deadline no longer applies.
                timing.lock().attempt_end = None;
                let pages = d.hello().map_or(0, |h| h.ram_pages);
                for _ in 0..o
                    .postcopy_touches
                    .min(u32::try_from(pages).unwrap_or(u32::MAX))
                {
                    d.fetch_page(rng.below(pages))?;
                }
            }
            DestEvent::End => return Ok(()),
            _ => {}
        }
    }
}

/// The reason a destination gives a source that connects while it serves another.
pub const BUSY: &str = "the destination is serving another source";

/// Refuses every connection waiting on `listener` ([`BUSY`]): a destination serves one
/// source at a time, and a second one is told so at once rather than queued behind it.
fn turn_away(listener: &TcpListener, timeout: Duration) {
    while let Ok((sock, _)) = listener.accept() {
        let _ = sock.set_nonblocking(false);
        let _ = sock.set_write_timeout(Some(timeout));
        let mut w = FrameWriter::new(&sock);
        let _ = w.write_frame(&Frame::Refused {
            reason: BUSY.to_owned(),
        });
        let _ = sock.shutdown(Shutdown::Write);
    }
}

/// The source's stream: its [`FrameWriter`], and what its Hello declares beyond the loop's.
struct SourceOut {
    w: FrameWriter<WireWriter>,
    /// The writer's rate limit in bytes per second (0: none), for the Hello.
    max_bandwidth: u64,
    /// The destination's nonce for this connection, echoed by the Hello.
    nonce: u128,
    /// The kept RAM the Hello resumes ([`Session`]); 0 to start afresh.
    resume: u128,
    /// Whether the Hello was written.
    hello_sent: bool,
    /// Marks each frame for its deadline ([`PacedWrite`]).
    clock: FrameClock,
}

impl SourceOut {
    /// Runs `write`, which writes one frame of about `len` bytes, under that frame's
    /// deadline.
    fn framed(
        &mut self,
        len: Bytes,
        write: impl FnOnce(&mut FrameWriter<WireWriter>) -> Result<Bytes>,
    ) -> Result<Bytes> {
        self.clock.frame(len.get());
        let r = write(&mut self.w);
        self.clock.between();
        r
    }
}

impl Outbound for SourceOut {
    fn send(&mut self, state: StateId, payload: &[u8]) -> Result<Bytes> {
        let len = self.w.section_overhead() + Bytes(payload.len() as u64);
        self.framed(len, |w| w.send(state, payload))
    }

    fn control(&mut self, msg: &Control) -> Result<Bytes> {
        let len = self.w.control_cost(msg);
        match msg {
            Control::Hello(h) => {
                let hello = Control::Hello(Hello {
                    max_bandwidth: self.max_bandwidth,
                    nonce: self.nonce,
                    resume: self.resume,
                    ..h.clone()
                });
                let n = self.framed(len, |w| w.control(&hello))?;
                self.hello_sent = true;
                Ok(n)
            }
            other => {
                let n = self.framed(len, |w| w.control(other));
                // The stop's frames end with End (precopy: nothing follows) or the postcopy
                // Switchover (the push that follows runs with the guest running there).
                if matches!(other, Control::End | Control::Switchover { postcopy: true }) {
                    self.clock.chain(false);
                }
                n
            }
        }
    }

    /// The guest stopped: from here to End (or the postcopy Switchover) the frames share
    /// one deadline ([`FrameClock::chain`]), so a peer that reads each just in time cannot
    /// hold the stopped guest for the write timeout once per frame.
    fn lift_rate_limit(&mut self) {
        self.w.lift_rate_limit();
        self.clock.chain(true);
    }

    fn section_overhead(&self) -> Bytes {
        self.w.section_overhead()
    }

    fn control_cost(&self, msg: &Control) -> Bytes {
        self.w.control_cost(msg)
    }

    fn bytes_sent(&self) -> Bytes {
        self.w.bytes_sent()
    }
}

/// The source's side of the return path: a thread reading the destination's frames.
struct ReturnPath {
    rx: Receiver<Result<DestMessage>>,
    timeout: Duration,
}

impl Inbound for ReturnPath {
    fn try_recv(&mut self) -> Result<Option<DestMessage>> {
        match self.rx.try_recv() {
            Ok(m) => m.map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(MigrationError::PeerAborted(
                "the destination's stream ended".into(),
            )),
        }
    }

    fn recv(&mut self) -> Result<DestMessage> {
        match self.rx.recv_timeout(self.timeout) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => Err(MigrationError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from the destination within {:?}", self.timeout),
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(MigrationError::PeerAborted(
                "the destination's stream ended".into(),
            )),
        }
    }
}

/// Messages the return path holds for the loop at most. When they are all unread the reader
/// thread stops reading, and TCP's flow control holds the destination back: what the
/// source keeps for the loop is bounded by this many frames of at most
/// [`MAX_RETURN_FRAME_LEN`] bytes.
pub const RETURN_QUEUE: usize = 64;

/// The largest frame the source reads on the return path: the destination's frames are
/// Started (empty), Refused and Abort (a reason of at most
/// [`MAX_REASON_LEN`](super::frame::MAX_REASON_LEN) bytes), PageRequest (a state's request: 16 bytes
/// for RAM) and Report (a state's answer: 12 bytes for a stream disk's, 21 for a shared
/// disk's preload report).
pub const MAX_RETURN_FRAME_LEN: u32 = 64 << 10;

/// The reader thread: frames → messages, until an error, the end of the stream, `stop`, or
/// the loop's end (the receiver dropped). It blocks while [`RETURN_QUEUE`] messages wait.
fn read_return_path<R: Read>(
    mut r: FrameReader<R>,
    tx: &mpsc::SyncSender<Result<DestMessage>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::SeqCst) {
        let msg = match r.read_frame() {
            Ok(Frame::Started) => Ok(DestMessage::Started),
            Ok(Frame::Refused { reason }) => Ok(DestMessage::Refused(reason)),
            Ok(Frame::PageRequest { state, payload }) => {
                Ok(DestMessage::PageRequest { state, payload })
            }
            Ok(Frame::Abort { reason }) => Ok(DestMessage::Aborted(reason)),
            Ok(Frame::Report { state, payload }) => Ok(DestMessage::Report { state, payload }),
            Ok(other) => Err(ProtocolError::SourceFrameOnReturnPath { kind: other.kind() }.into()),
            // A read timeout between frames: the reader is still usable; look at `stop`.
            Err(MigrationError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => Err(e),
        };
        let last = msg.is_err();
        if tx.send(msg).is_err() || last {
            return;
        }
    }
}

/// The destination's Abort among the messages still in flight, if one comes within
/// [`ABORT_GRACE`].
fn peer_reason(inbound: &ReturnPath) -> Option<MigrationError> {
    let deadline = Instant::now() + ABORT_GRACE;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match inbound.rx.recv_timeout(left) {
            Ok(Ok(DestMessage::Aborted(why))) => return Some(MigrationError::PeerAborted(why)),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return None,
        }
    }
}

/// How long a source whose write failed waits for the destination's Abort.
const ABORT_GRACE: Duration = Duration::from_millis(200);

/// Parameters of the source side of an attempt.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The loop's parameters; `max_bandwidth` also sets the [`FrameWriter`]'s rate limit.
    pub loop_config: LoopConfig,
    /// Connect, write and answer timeout; the TLS handshake's too. At most
    /// [`MAX_TIMEOUT`].
    pub timeout: Duration,
    /// The slowest rate, in bytes per second, at which a frame may go out: a frame of `n`
    /// bytes must be written whole within `timeout + n / rate` of its first byte, or the
    /// attempt fails ([`io::ErrorKind::TimedOut`]); a lower `max_bandwidth` lowers it to
    /// that. As [`DestOptions::min_frame_rate`]: a destination that keeps reading, but
    /// slower, cannot hold the stopped guest longer than that.
    pub min_frame_rate: u64,
    /// TLS with certificates (none by default: plain TCP). The destination's certificate
    /// must name its IP address, or the name set with [`TlsClient::with_server_name`].
    #[cfg(feature = "tls")]
    pub tls: Option<TlsClient>,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            loop_config: LoopConfig::default(),
            timeout: DEFAULT_TIMEOUT,
            min_frame_rate: DEFAULT_MIN_FRAME_RATE,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// What the source side of an attempt did.
#[derive(Debug, Clone, Copy)]
pub struct SourceReport {
    /// The loop's figures; with [`RealClock`], `downtime` is measured from VM stop to the
    /// destination's Started as the source receives it.
    pub outcome: Outcome,
    /// The writer's counters.
    pub wire: WriterStats,
}

/// The source's side of the attempts of one migration to one destination: what binds them.
/// The destination issues a nonce on every connection; the first attempt that sends its
/// Hello makes that nonce the migration's token, and every later attempt names it in its
/// Hello (`resume`), so that the destination reuses the RAM an earlier attempt left only
/// for this migration. It also keeps the link's best figure from the last attempt
/// ([`IterationReport::link`](super::IterationReport::link)), which the next attempt takes as
/// its [`LoopConfig::link_estimate`](super::LoopConfig::link_estimate) unless that is set: a
/// retry whose guest is idle sends too little to measure the link by, and its figure of
/// the control message alone is held to that. Keep one for all the attempts
/// of a migration ([`migrate_in_session`]); [`migrate_to`] starts a new one each time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Session {
    token: Option<u128>,
    link: Option<BytesPerMs>,
}

impl Session {
    /// A migration that has not reached a destination yet.
    pub fn new() -> Session {
        Session::default()
    }

    /// The migration's token, once an attempt sent its Hello.
    pub fn token(&self) -> Option<u128> {
        self.token
    }

    /// The link's best figure as the last attempt reported it
    /// ([`IterationReport::link`](super::IterationReport::link): the highest window it
    /// measured, or what it was given, so the highest of every attempt so far: never
    /// lowered), for the next attempt's figure of the control message alone, the only one
    /// it carries. `None` until an attempt reported a figure above 0.
    pub fn link(&self) -> Option<BytesPerMs> {
        self.link
    }
}

/// Passes every report on to the caller's controller, keeping the last one's
/// [`IterationReport::link`](super::IterationReport::link) for the session.
struct KeepsTheLink<'a> {
    inner: &'a mut dyn Controller,
    link: BytesPerMs,
}

impl Controller for KeepsTheLink<'_> {
    fn on_iteration(&mut self, report: &super::IterationReport) -> super::Directive {
        self.link = report.link;
        self.inner.on_iteration(report)
    }

    fn on_stall(&mut self, report: &super::StallReport) -> super::StallAction {
        self.inner.on_stall(report)
    }
}

/// A reader whose reads fail once `until` has passed: [`read_nonce`]'s bound on the whole
/// frame. Each read of the channel waits at most its own timeout, and the frame reader
/// retries a timeout inside a frame; a peer dripping a byte within each read's timeout
/// would hold a frame open for as long as its length allows. The error is not a timeout,
/// so the frame reader fails at once instead of retrying it.
struct Until<R> {
    inner: R,
    until: Option<Instant>,
}

/// [`Until`]'s error.
#[derive(Debug)]
struct PastDeadline;

impl std::fmt::Display for PastDeadline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("past the deadline of the exchange")
    }
}

impl std::error::Error for PastDeadline {}

impl<R: Read> Read for Until<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.until.is_some_and(|u| Instant::now() >= u) {
            return Err(io::Error::other(PastDeadline));
        }
        self.inner.read(buf)
    }
}

/// Reads the destination's first frame, its Nonce, within `timeout` in all (a frame begun
/// but not finished by then included); then an [`io::ErrorKind::TimedOut`] error. Each read
/// of the channel waits at most [`POLL`] (over TLS too: a whole read), so the bound is
/// overshot by at most that.
fn read_nonce<R: Read>(r: &mut FrameReader<Until<R>>, timeout: Duration) -> Result<u128> {
    let deadline = Instant::now() + timeout;
    r.get_mut().until = Some(deadline);
    let nonce = read_nonce_until(r, timeout, deadline);
    r.get_mut().until = None;
    nonce
}

/// [`read_nonce`] with its deadline set.
fn read_nonce_until<R: Read>(
    r: &mut FrameReader<R>,
    timeout: Duration,
    deadline: Instant,
) -> Result<u128> {
    let timed_out = || {
        MigrationError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no Nonce from the destination within {timeout:?} (a destination that \
                 requires TLS waits for a handshake)"
            ),
        ))
    };
    loop {
        match r.read_frame() {
            Ok(Frame::Nonce { nonce }) => return Ok(nonce),
            Ok(Frame::Refused { reason }) => {
                return Err(MigrationError::DestinationRefused(reason))
            }
            Ok(Frame::Abort { reason }) => return Err(MigrationError::PeerAborted(reason)),
            Ok(other) => return Err(ProtocolError::NoNonce { kind: other.kind() }.into()),
            Err(MigrationError::Io(e))
                if e.get_ref().is_some_and(|inner| inner.is::<PastDeadline>()) =>
            {
                return Err(timed_out());
            }
            Err(MigrationError::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    return Err(timed_out());
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// The source side of one attempt to the destination at `addr`, as the first of its
/// migration ([`migrate_in_session`] with a new [`Session`]).
///
/// # Errors
/// As [`migrate_in_session`].
pub fn migrate_to(
    addr: SocketAddr,
    options: &SourceOptions,
    vm: &mut dyn Vm,
    states: &mut [&mut dyn MigrationState],
    controller: &mut dyn Controller,
) -> Result<SourceReport> {
    migrate_in_session(addr, options, &mut Session::new(), vm, states, controller)
}

/// The source side of one attempt of the migration `session` to the destination at
/// `addr`: reads the destination's Nonce, then runs [`precopy::run`] over a
/// [`FrameWriter`] on the socket, with a reader thread as the return path; the Hello
/// echoes the nonce and names the session's token.
///
/// On a cut, a timeout, a corrupt stream or an Abort from the destination the loop
/// runs every state's [`MigrationState::channel_failed`]: RAM re-dirties every page
/// it sent in the attempt, since some may have been lost in a socket buffer (unless
/// built with [`super::ram::ChannelLoss::CallerReconciles`]).
///
/// # Errors
/// [`MigrationError::InvalidInput`] for bad parameters ([`precopy::checked_config`], a
/// zero timeout or one above [`MAX_TIMEOUT`], a `min_frame_rate` of 0; nothing is
/// connected then); [`MigrationError::Io`] if the connection cannot be made
/// or no Nonce comes within the timeout, [`MigrationError::Tls`] if TLS fails (the
/// handshake, a certificate either end refuses, a destination without TLS),
/// [`MigrationError::DestinationRefused`] if the
/// destination refuses the connection (it serves another source: [`BUSY`]) and
/// [`ProtocolError::NoNonce`] for another first frame (the guest was not touched then);
/// the errors of [`precopy::run`], among them [`MigrationError::OutcomeUnknown`] (the VM
/// is left stopped). As with [`precopy::run`], on every other error the guest runs and
/// the states re-dirtied what the destination may lack.
pub fn migrate_in_session(
    addr: SocketAddr,
    options: &SourceOptions,
    session: &mut Session,
    vm: &mut dyn Vm,
    states: &mut [&mut dyn MigrationState],
    controller: &mut dyn Controller,
) -> Result<SourceReport> {
    let mut loop_config = precopy::checked_config(&options.loop_config)?;
    if loop_config.link_estimate.is_none() {
        loop_config.link_estimate = session.link;
    }
    check_timeout("timeout", options.timeout)?;
    check_rate(options.min_frame_rate)?;
    let sock = TcpStream::connect_timeout(&addr, options.timeout)?;
    sock.set_nodelay(true)?;
    sock.set_write_timeout(Some(options.timeout))?;
    let (mut back, sock) = source_wire(sock, addr, options)?;
    back.set_read_timeout(POLL)?;
    let back = Until {
        inner: back,
        until: None,
    };
    let mut back = FrameReader::with_max_frame_len(back, MAX_RETURN_FRAME_LEN);
    // The short timeout polls the stop flag between frames; inside a frame the reader
    // waits as long as any read of this source may.
    back.set_patience(options.timeout);
    let nonce = read_nonce(&mut back, options.timeout).map_err(MigrationError::lift_tls)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::sync_channel(RETURN_QUEUE);
    let flag = Arc::clone(&stop);
    let reader = std::thread::Builder::new()
        .name("migration-return".into())
        .spawn(move || read_return_path(back, &tx, &flag))?;
    // ZERO is "no limit" to the writer; a checked limit is at least 1 byte per 100 ms
    // window, and the limiter's budget never rounds a non-zero rate down to none.
    let limit = loop_config.max_bandwidth.unwrap_or(BytesPerMs::ZERO);
    // The writer sends no faster than its limit: a frame's deadline allows for it, as the
    // destination's does for the Hello's `max_bandwidth`.
    let clock = sock.clock();
    clock.set_rate(match super::rate::sustained_bytes_per_sec(limit) {
        0 => options.min_frame_rate,
        b => options.min_frame_rate.min(b),
    });
    let mut writer = SourceOut {
        w: FrameWriter::with_limiter(sock, RateLimiter::new(limit)),
        max_bandwidth: limit.bytes_per_sec(),
        nonce,
        resume: session.token.unwrap_or(0),
        hello_sent: false,
        clock,
    };
    let mut inbound = ReturnPath {
        rx,
        timeout: options.timeout,
    };
    let mut clock = RealClock::new();
    let mut keeps = KeepsTheLink {
        inner: controller,
        link: BytesPerMs::ZERO,
    };
    let result = precopy::run(
        &loop_config,
        Endpoints {
            clock: &mut clock,
            vm,
            out: &mut writer,
            inbound: &mut inbound,
        },
        states,
        &mut keeps,
    );
    if keeps.link > BytesPerMs::ZERO {
        session.link = Some(keeps.link);
    }
    // A write that failed because the destination gave up and closed: its Abort, if it
    // sent one, says why (a checksum mismatch, say), which the broken pipe does not.
    let result = match result {
        Err(e @ MigrationError::Io(_)) => Err(peer_reason(&inbound).unwrap_or(e).lift_tls()),
        r => r,
    };
    if writer.hello_sent && session.token.is_none() {
        session.token = Some(nonce);
    }
    let wire = writer.w.stats();
    // The attempt is over. After a success, close only our direction and let the reader
    // drain until the destination closes (closing a socket with unread bytes, say a late
    // PageRequest, resets the connection and could cut the destination's last frames);
    // after a failure close both. Either way the reader ends: at the end of the stream,
    // or at `stop` within the timeout.
    let how = if result.is_ok() {
        Shutdown::Write
    } else {
        Shutdown::Both
    };
    writer.w.get_mut().shutdown(how);
    if result.is_ok() {
        let deadline = Instant::now() + options.timeout;
        while !reader.is_finished() && Instant::now() < deadline {
            while inbound.rx.try_recv().is_ok() {}
            std::thread::sleep(POLL / 4);
        }
        if !reader.is_finished() {
            // The destination still sends, maybe a frame a byte at a time (each byte within
            // the poll, so no read times out): the reader looks at `stop` only between
            // frames, so its reads end here instead.
            writer.w.get_mut().shutdown(Shutdown::Read);
        }
    }
    stop.store(true, Ordering::SeqCst);
    // A reader blocked on a full queue ends when the receiver goes.
    drop(inbound);
    let _ = reader.join();
    result.map(|outcome| SourceReport { outcome, wire })
}

/// The source's two directions of a new connection: the socket's, or TLS's after its
/// handshake (by the timeout) if [`SourceOptions::tls`].
fn source_wire(
    sock: TcpStream,
    addr: SocketAddr,
    options: &SourceOptions,
) -> Result<(WireReader, WireWriter)> {
    #[cfg(feature = "tls")]
    if let Some(client) = &options.tls {
        let deadline = Instant::now() + options.timeout;
        let (r, w) = tls::connect(client, addr.ip(), sock, deadline, options.timeout)?;
        return Ok((WireReader::Tls(r), WireWriter::Tls(w)));
    }
    let _ = addr;
    let back = sock.try_clone()?;
    Ok((
        WireReader::Plain(back),
        WireWriter::Plain(PacedWrite::new(sock, options.timeout)?),
    ))
}

/// The TLS tests' certificate authority (rcgen, a dev-dependency).
#[cfg(all(test, feature = "tls"))]
#[path = "../../tests/common/pki.rs"]
#[allow(dead_code)]
mod test_pki;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::frame::FrameKind;
    use std::io::Write;

    #[cfg(feature = "tls")]
    use super::test_pki as pki;

    /// `attempt_timeout` bounds an attempt from its connection: a source that takes its
    /// time over the TLS handshake (here a second before it begins) does not add that to the
    /// attempt. The attempt's end was counted from the handshake's end, so an attempt could
    /// last up to twice `attempt_timeout`.
    #[cfg(feature = "tls")]
    #[test]
    fn an_attempt_is_timed_from_its_connection_not_its_handshakes_end() {
        use super::super::tls::TlsCreds;
        let dir = tempfile::tempdir().unwrap();
        pki::Ca::new("attempt").write_dir(dir.path(), &["localhost", "127.0.0.1"]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TlsClient::new(&TlsCreds::client_dir(dir.path())).unwrap();
        let o = DestOptions {
            tls: Some(TlsServer::new(&TlsCreds::server_dir(dir.path())).unwrap()),
            ..DestOptions::default()
        };
        let source = std::thread::spawn(move || {
            let sock = TcpStream::connect(addr).unwrap();
            std::thread::sleep(Duration::from_secs(1));
            let options = SourceOptions {
                tls: Some(client),
                ..SourceOptions::default()
            };
            source_wire(sock, addr, &options).map(|_| ())
        });
        let (sock, _) = listener.accept().unwrap();
        let accepted = Instant::now();
        let (from, _to) = prepare(sock, &o).unwrap();
        let handshaken = Instant::now();
        source.join().unwrap().unwrap();
        assert!(
            handshaken >= accepted + Duration::from_millis(500),
            "the handshake took {:?}",
            handshaken - accepted
        );
        let end = from.timing().lock().attempt_end.unwrap();
        assert!(
            end < accepted + o.attempt_timeout + Duration::from_millis(100),
            "the attempt ends {:?} after its connection (attempt_timeout {:?})",
            end - accepted,
            o.attempt_timeout
        );
    }

    /// A destination that floods the return path while the loop reads nothing: the reader
    /// thread stops at [`RETURN_QUEUE`] messages, TCP holds the destination back, and its
    /// writes time out long before the flood is through.
    #[test]
    fn the_return_path_holds_a_bounded_number_of_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dest = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (src, _) = listener.accept().unwrap();
        src.set_read_timeout(Some(POLL)).unwrap();
        let (tx, rx) = mpsc::sync_channel(RETURN_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let src = FrameReader::with_max_frame_len(src, MAX_RETURN_FRAME_LEN);
        let reader = std::thread::spawn(move || read_return_path(src, &tx, &flag));
        dest.set_write_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut w = FrameWriter::new(dest);
        let request = Frame::PageRequest {
            state: 1,
            payload: vec![0; 4096],
        };
        let flood: u64 = 256 << 20;
        let mut written = 0;
        while written < flood {
            match w.write_frame(&request) {
                Ok(n) => written += n.get(),
                Err(_) => break,
            }
        }
        assert!(
            written < 64 << 20,
            "the destination wrote {written} bytes into a return path nobody read"
        );
        stop.store(true, Ordering::SeqCst);
        drop(rx);
        drop(w);
        reader.join().unwrap();
    }

    /// A return frame larger than any the destination sends is refused before its payload
    /// is read.
    #[test]
    fn the_return_path_refuses_an_oversized_frame() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut dest = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (src, _) = listener.accept().unwrap();
        src.set_read_timeout(Some(POLL)).unwrap();
        let (tx, rx) = mpsc::sync_channel(RETURN_QUEUE);
        let stop = AtomicBool::new(false);
        let mut stream =
            crate::migration::frame::encode_stream_header(crate::migration::frame::STREAM_VERSION)
                .to_vec();
        let payload = vec![0u8; MAX_RETURN_FRAME_LEN as usize + 1];
        stream.extend(crate::migration::frame::encode_raw_frame(
            FrameKind::PageRequest as u8,
            0,
            &payload,
        ));
        // Then gone: the reader ends at the end of the stream whatever it made of it.
        let writer = std::thread::spawn(move || {
            let _ = dest.write_all(&stream);
        });
        read_return_path(
            FrameReader::with_max_frame_len(src, MAX_RETURN_FRAME_LEN),
            &tx,
            &stop,
        );
        match rx.try_recv().unwrap() {
            Err(MigrationError::Frame(crate::migration::frame::FrameError::Oversized {
                ..
            })) => {}
            other => panic!("{:?}", other.map(|m| m.kind())),
        }
        writer.join().unwrap();
    }
}
