//! Both ends of a migration over TCP on 127.0.0.1, with real time and real vCPU threads.
//!
//! - [`TcpDestination`]: a listener on an ephemeral port and a thread running
//!   [`Destination`] for each connection. An attempt that fails before the destination
//!   guest runs leaves its RAM behind ([`RetainedRam`]) for the next connection, so a
//!   retry from the source ([`SetupMode::Incremental`](super::ram::SetupMode::Incremental)) sends only what it re-dirtied.
//! - [`migrate_to`]: the source side of one attempt: connects, wraps the socket in a
//!   rate-limited [`FrameWriter`], runs a thread that turns the destination's frames into
//!   [`DestMessage`]s (the loop's [`Inbound`]), and calls [`precopy::run`] with
//!   [`RealClock`].
//!
//! `migration/harness.rs` (feature `testing`) runs both ends in one process for the demo,
//! the benchmark and the tests.
//!
//! No wait is unbounded: the sockets have read and write timeouts, the destination stops
//! waiting for a connection after its timeout, and the return path's `recv` gives up after
//! the source's timeout.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::channel::{DestMessage, Inbound};
use super::clock::RealClock;
use super::dest::{DestEvent, Destination, DestinationConfig, DestinationGuest, RetainedRam};
use super::dest_state::SharedDestState;
use super::error::{MigrationError, ProtocolError, Result};
use super::frame::Frame;
use super::guest::Vm;
use super::precopy::{self, Controller, Endpoints, LoopConfig, Outcome};
use super::rate::RateLimiter;
use super::state::MigrationState;
use super::stream::{FrameReader, FrameWriter, WriterStats};
use crate::rng::SplitMix64;
use crate::units::{Bytes, BytesPerMs};

/// The default for every timeout here.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// Read and write timeout of each connection, and the longest wait for one.
    pub timeout: Duration,
    /// The largest guest RAM a Hello may ask for.
    pub max_ram_bytes: Bytes,
    /// Seed of the postcopy touches.
    pub seed: u64,
    /// The destination-side states besides RAM ([`DestState`]), given to every attempt.
    pub states: Vec<SharedDestState>,
    /// Where to listen: 127.0.0.1 on a free port by default.
    pub bind: SocketAddr,
}

impl Default for DestOptions {
    fn default() -> Self {
        DestOptions {
            max_attempts: 1,
            refuse_attempts: 0,
            postcopy_touches: 0,
            timeout: DEFAULT_TIMEOUT,
            max_ram_bytes: DestinationConfig::default().max_ram_bytes,
            seed: 0,
            states: Vec::new(),
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
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
    /// [`MigrationError::InvalidInput`] for `max_attempts` 0.
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
            ..DestinationConfig::default()
        };
        match prepare(sock, o.timeout) {
            Err(e) => a.error = Some(e),
            Ok((from, to)) => {
                let mut d = Destination::with_retained(from, to, config, kept.take());
                for st in &o.states {
                    d.add_state(std::sync::Arc::clone(st));
                }
                match drive(&mut d, o, &mut rng, &mut a.pages_written) {
                    Ok(()) => {
                        a.pages_held_at_end = d.received_pages();
                        // Done: `run` returns at once with the guest.
                        match d.run() {
                            Ok(g) => report.guest = Some(g),
                            Err(e) => a.error = Some(e),
                        }
                    }
                    Err(e) => {
                        a.pages_held_at_end = d.received_pages();
                        a.error = Some(e);
                        kept = d.into_retained();
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

/// An accepted connection, blocking with timeouts, split into its two directions.
fn prepare(sock: TcpStream, timeout: Duration) -> Result<(TcpStream, TcpStream)> {
    sock.set_nonblocking(false)?;
    sock.set_nodelay(true)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let back = sock.try_clone()?;
    Ok((sock, back))
}

/// Steps `d` to the end of the stream; in postcopy the guest touches pages as it starts.
fn drive(
    d: &mut Destination<TcpStream, TcpStream>,
    o: &DestOptions,
    rng: &mut SplitMix64,
    written: &mut u64,
) -> Result<()> {
    loop {
        match d.step()? {
            DestEvent::Pages { written: w, .. } => *written += w as u64,
            DestEvent::Switchover { postcopy: true } => {
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

/// The reader thread: frames → messages, until an error, the end of the stream or `stop`.
fn read_return_path(sock: TcpStream, tx: &mpsc::Sender<Result<DestMessage>>, stop: &AtomicBool) {
    let mut r = FrameReader::new(sock);
    while !stop.load(Ordering::SeqCst) {
        let msg = match r.read_frame() {
            Ok(Frame::Started) => Ok(DestMessage::Started),
            Ok(Frame::Refused { reason }) => Ok(DestMessage::Refused(reason)),
            Ok(Frame::PageRequest { state, payload }) => {
                Ok(DestMessage::PageRequest { state, payload })
            }
            Ok(Frame::Abort { reason }) => Ok(DestMessage::Aborted(reason)),
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
#[derive(Debug, Clone, Copy)]
pub struct SourceOptions {
    /// The loop's parameters; `max_bandwidth` also sets the [`FrameWriter`]'s rate limit.
    pub loop_config: LoopConfig,
    /// Connect, write and answer timeout.
    pub timeout: Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            loop_config: LoopConfig::default(),
            timeout: DEFAULT_TIMEOUT,
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

/// The source side of one attempt to the destination at `addr`: [`precopy::run`] over a
/// [`FrameWriter`] on the socket, with a reader thread as the return path.
///
/// On a cut, a timeout, a corrupt stream or an Abort from the destination the loop
/// runs every state's [`MigrationState::channel_failed`]: RAM re-dirties every page
/// it sent in the attempt, since some may have been lost in a socket buffer (unless
/// built with [`super::ram::ChannelLoss::CallerReconciles`]).
///
/// # Errors
/// [`MigrationError::InvalidInput`] for bad parameters ([`precopy::checked_config`];
/// nothing is connected then); the errors of [`precopy::run`], among them
/// [`MigrationError::OutcomeUnknown`] (the VM is left stopped); [`MigrationError::Io`]
/// if the connection cannot be made (the guest was not touched then). As with
/// [`precopy::run`], on every other error the guest runs and the states re-dirtied what
/// the destination may lack.
pub fn migrate_to(
    addr: SocketAddr,
    options: &SourceOptions,
    vm: &mut dyn Vm,
    states: &mut [&mut dyn MigrationState],
    controller: &mut dyn Controller,
) -> Result<SourceReport> {
    let loop_config = precopy::checked_config(&options.loop_config)?;
    let sock = TcpStream::connect_timeout(&addr, options.timeout)?;
    sock.set_nodelay(true)?;
    sock.set_write_timeout(Some(options.timeout))?;
    let back = sock.try_clone()?;
    back.set_read_timeout(Some(POLL))?;
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let flag = Arc::clone(&stop);
    let reader = std::thread::Builder::new()
        .name("migration-return".into())
        .spawn(move || read_return_path(back, &tx, &flag))?;
    // ZERO is "no limit" to the writer; a checked limit is at least 1 byte per 100 ms
    // window, and the limiter's budget never rounds a non-zero rate down to none.
    let limit = loop_config.max_bandwidth.unwrap_or(BytesPerMs::ZERO);
    let mut writer = FrameWriter::with_limiter(sock, RateLimiter::new(limit));
    let mut inbound = ReturnPath {
        rx,
        timeout: options.timeout,
    };
    let mut clock = RealClock::new();
    let result = precopy::run(
        &loop_config,
        Endpoints {
            clock: &mut clock,
            vm,
            out: &mut writer,
            inbound: &mut inbound,
        },
        states,
        controller,
    );
    // A write that failed because the destination gave up and closed: its Abort, if it
    // sent one, says why (a checksum mismatch, say), which the broken pipe does not.
    let result = match result {
        Err(e @ MigrationError::Io(_)) => Err(peer_reason(&inbound).unwrap_or(e)),
        r => r,
    };
    let wire = writer.stats();
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
    let _ = writer.get_ref().shutdown(how);
    if result.is_ok() {
        let deadline = Instant::now() + options.timeout;
        while !reader.is_finished() && Instant::now() < deadline {
            while inbound.rx.try_recv().is_ok() {}
            std::thread::sleep(POLL / 4);
        }
    }
    stop.store(true, Ordering::SeqCst);
    let _ = reader.join();
    result.map(|outcome| SourceReport { outcome, wire })
}
