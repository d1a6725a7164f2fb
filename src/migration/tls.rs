//! TLS with certificates for the TCP transport ([`super::tcp`]), as QEMU's
//! `tls-creds-x509` with `verify-peer=on`: both ends authenticate.
//!
//! - [`TlsCreds`]: the three PEM files of one end: the CA that signs both ends'
//!   certificates, this end's certificate and its private key. [`TlsCreds::server_dir`]
//!   and [`TlsCreds::client_dir`] take them from a directory laid out as QEMU's
//!   (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`; `client-cert.pem`,
//!   `client-key.pem`).
//! - [`TlsServer`] ([`DestOptions::tls`](super::tcp::DestOptions::tls)): the destination
//!   presents its certificate and requires one from the source, signed by the CA.
//! - [`TlsClient`] ([`SourceOptions::tls`](super::tcp::SourceOptions::tls)): the source
//!   presents its certificate and verifies the destination's against the CA and a server
//!   name (by default the destination's IP address, which its certificate must then name).
//!
//! TLS 1.3 only, on rustls with the `ring` provider; no session resumption (every attempt
//! does a full handshake). The handshake completes, within the connection's timeout,
//! before the first frame: the destination's Nonce. A failure is a typed
//! [`TlsError`] in [`MigrationError::Tls`].
//!
//! Each end uses its connection from two threads at once (the source's writer and its
//! return-path reader; the destination's paced reader and its answers), but a rustls
//! connection is one state machine. So the two halves ([`TlsReader`], [`TlsWriter`]) share
//! it behind a mutex, each with its own clone of the socket, and neither holds the lock
//! across a blocking socket call: the reader reads raw bytes outside it and decrypts under
//! it; the writer encrypts under it and writes the records outside it. The writer is the
//! only one that writes to the socket, so records leave in the order they were sealed.
//! The reader's wait is bounded as the socket's read timeout bounds a plain read: one
//! `read` call returns within its timeout whatever number of records it takes. The
//! writer's records go out through a [`PacedWrite`], so a frame's deadline bounds all of
//! its records as it bounds a plain frame's bytes.
//!
//! The end of the stream needs no `close_notify`: the migration protocol ends explicitly
//! (End, Started), and a stream cut between frames is an error at the frame layer, so a
//! close without one reads as the end of the stream, as it does over plain TCP.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, Connection, RootCertStore,
    ServerConfig, ServerConnection,
};

use super::error::{MigrationError, Result, TlsError};
use super::frame::Frame;
use super::paced_write::{FrameClock, PacedWrite};
use super::stream::FrameReader;

/// The PEM files of one end: the CA certificate(s) that sign both ends' certificates,
/// this end's certificate (chain), and its private key (PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCreds {
    /// The CA certificate(s) the peer's certificate must chain to.
    pub ca: PathBuf,
    /// This end's certificate, then any intermediates.
    pub cert: PathBuf,
    /// This end's private key.
    pub key: PathBuf,
}

impl TlsCreds {
    /// A destination's files in QEMU's layout: `dir/ca-cert.pem`, `dir/server-cert.pem`,
    /// `dir/server-key.pem`.
    pub fn server_dir(dir: &Path) -> TlsCreds {
        TlsCreds {
            ca: dir.join("ca-cert.pem"),
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
        }
    }

    /// A source's files in QEMU's layout: `dir/ca-cert.pem`, `dir/client-cert.pem`,
    /// `dir/client-key.pem`.
    pub fn client_dir(dir: &Path) -> TlsCreds {
        TlsCreds {
            ca: dir.join("ca-cert.pem"),
            cert: dir.join("client-cert.pem"),
            key: dir.join("client-key.pem"),
        }
    }

    /// The three files, parsed.
    fn load(&self) -> std::result::Result<Loaded, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certs(&self.ca)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::BadCredentials(format!("{}: {e}", self.ca.display())))?;
        }
        let chain = certs(&self.cert)?;
        let bytes = read(&self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::BadPem {
            path: self.key.clone(),
            what: match e {
                rustls::pki_types::pem::Error::NoItemsFound => "no private key in it".into(),
                e => format!("not a PEM private key: {e}"),
            },
        })?;
        Ok(Loaded {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }
}

/// [`TlsCreds`] parsed.
struct Loaded {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn read(path: &Path) -> std::result::Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::ReadFile {
        path: path.to_owned(),
        source,
    })
}

/// The certificates of a PEM file: at least one, none malformed.
fn certs(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let bad = |what: String| TlsError::BadPem {
        path: path.to_owned(),
        what,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

/// rustls's *ring* provider. rustls 0.23.48 deprecates it for having no post-quantum key
/// exchange; its alternative, aws-lc-rs, needs a C and assembler build this crate does not
/// otherwise have. Both ends of the stream are this crate, so they always agree on the
/// provider. The deprecation is allowed here only, so that a lock file update does not
/// break the build; moving to a post-quantum key exchange means moving to aws-lc-rs.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn unusable(e: impl fmt::Display) -> TlsError {
    TlsError::BadCredentials(e.to_string())
}

/// The destination's TLS configuration: it presents its certificate and requires the
/// source's, signed by the CA. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TlsServer {
    config: Arc<ServerConfig>,
}

impl TlsServer {
    /// Loads `creds` ([`TlsCreds::server_dir`] for QEMU's layout).
    ///
    /// # Errors
    /// [`MigrationError::Tls`]: [`TlsError::ReadFile`] for a file that cannot be read,
    /// [`TlsError::BadPem`] for one without the certificate or key it should hold,
    /// [`TlsError::BadCredentials`] for credentials that do not make a configuration (a key
    /// that does not match the certificate).
    pub fn new(creds: &TlsCreds) -> Result<TlsServer> {
        let l = creds.load()?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(l.roots, Arc::clone(&provider))
            .build()
            .map_err(unusable)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(unusable)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(l.chain, l.key)
            .map_err(unusable)?;
        // Nothing resumes a session: no tickets after the handshake.
        config.send_tls13_tickets = 0;
        Ok(TlsServer {
            config: Arc::new(config),
        })
    }
}

/// The source's TLS configuration: it presents its certificate and verifies the
/// destination's against the CA and the server name. Cheap to clone.
#[derive(Debug, Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl TlsClient {
    /// Loads `creds` ([`TlsCreds::client_dir`] for QEMU's layout). The destination's
    /// certificate must name its IP address, unless [`TlsClient::with_server_name`] says
    /// what else.
    ///
    /// # Errors
    /// As [`TlsServer::new`].
    pub fn new(creds: &TlsCreds) -> Result<TlsClient> {
        let l = creds.load()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(unusable)?
            .with_root_certificates(l.roots)
            .with_client_auth_cert(l.chain, l.key)
            .map_err(unusable)?;
        config.resumption = Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// The name the destination's certificate must carry (QEMU's `tls-hostname`): a DNS
    /// name, or an IP address.
    ///
    /// # Errors
    /// [`TlsError::BadServerName`] for anything else.
    pub fn with_server_name(mut self, name: &str) -> Result<TlsClient> {
        self.server_name = Some(
            ServerName::try_from(name.to_owned())
                .map_err(|_| TlsError::BadServerName(name.to_owned()))?,
        );
        Ok(self)
    }

    /// The name set by [`TlsClient::with_server_name`], if any.
    pub fn server_name(&self) -> Option<String> {
        self.server_name.as_ref().map(|n| n.to_str().into_owned())
    }
}

/// A rustls error, typed.
fn classify(e: rustls::Error) -> TlsError {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(CertificateError::UnknownIssuer) => TlsError::UnknownIssuer,
        E::InvalidCertificate(
            c @ (CertificateError::NotValidForName
            | CertificateError::NotValidForNameContext { .. }),
        ) => TlsError::WrongName(E::InvalidCertificate(c).to_string()),
        e @ E::InvalidCertificate(_) => TlsError::BadCertificate(e.to_string()),
        E::NoCertificatesPresented => TlsError::NoCertificate,
        E::AlertReceived(AlertDescription::CloseNotify) => TlsError::Closed,
        E::AlertReceived(a) => TlsError::RefusedByPeer(format!("{a:?}")),
        e
        @ (E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::PeerSentOversizedRecord) => {
            TlsError::NotTls(e.to_string())
        }
        e => TlsError::Protocol(e.to_string()),
    }
}

/// A TLS failure under the frame layer: an I/O error carrying the [`TlsError`], which
/// [`MigrationError::lift_tls`] raises again.
fn io_error(e: TlsError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Raw bytes read from the socket at most at once.
const RAW_READ: usize = 32 << 10;

/// Plaintext encrypted in one [`TlsWriter::write`] at most (rustls's buffer limit).
const WRITE_CHUNK: usize = 64 << 10;

/// The bytes of the peer's that the handshake kept, to tell what a peer that does not
/// speak TLS said.
const SNIFF: usize = 4 << 10;

/// Raw bytes read from the socket and not yet given to rustls.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    at: usize,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.at >= self.buf.len()
    }

    /// Hands rustls one batch; whatever it takes is gone from here. A record that breaks
    /// the protocol is an error.
    fn feed(&mut self, conn: &mut Connection) -> std::result::Result<(), FeedError> {
        let rest = self.buf.get(self.at..).unwrap_or_default();
        let n = conn.read_tls(&mut &rest[..]).map_err(FeedError::Io)?;
        if n == 0 {
            // rustls reads no more (a close_notify came): the rest is dropped.
            self.buf.clear();
            self.at = 0;
        } else {
            self.at += n;
        }
        conn.process_new_packets().map_err(FeedError::Tls)?;
        Ok(())
    }
}

enum FeedError {
    Io(io::Error),
    Tls(rustls::Error),
}

/// Reads once from `sock`, waiting until `deadline` at most, whatever its read timeout
/// was (it is set here). `Ok(None)`: the deadline passed.
fn read_by(
    sock: &mut TcpStream,
    set: &mut Option<Duration>,
    buf: &mut [u8],
    deadline: Instant,
) -> io::Result<Option<usize>> {
    loop {
        let Some(left) = deadline
            .checked_duration_since(Instant::now())
            .filter(|l| !l.is_zero())
        else {
            return Ok(None);
        };
        if *set != Some(left) {
            sock.set_read_timeout(Some(left))?;
            *set = Some(left);
        }
        match sock.read(buf) {
            Ok(n) => return Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes what rustls has to send to `sock`.
fn flush_tls(conn: &mut Connection, out: &mut Vec<u8>, sock: &mut TcpStream) -> io::Result<()> {
    out.clear();
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    sock.write_all(out)
}

/// The handshake on `sock` (blocking, its write timeout set), by `deadline`. Returns the
/// raw bytes read past it.
fn handshake(
    conn: &mut Connection,
    sock: &mut TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> std::result::Result<Pending, Failed> {
    let mut pending = Pending::default();
    let mut raw = vec![0u8; RAW_READ];
    let mut out = Vec::new();
    let mut seen = Vec::new();
    let mut set = None;
    while conn.is_handshaking() {
        flush_tls(conn, &mut out, sock).map_err(Failed::Io)?;
        if !pending.is_empty() {
            match pending.feed(conn) {
                Ok(()) => continue,
                Err(FeedError::Io(e)) => return Err(Failed::Io(e)),
                Err(FeedError::Tls(e)) => {
                    // Tell the peer why (an alert), best effort.
                    let _ = flush_tls(conn, &mut out, sock);
                    return Err(Failed::Tls(classify(e), seen));
                }
            }
        }
        let n = match read_by(sock, &mut set, &mut raw, deadline) {
            Ok(Some(0)) => return Err(Failed::Tls(TlsError::Closed, seen)),
            Ok(Some(n)) => n,
            Ok(None) => return Err(Failed::Tls(TlsError::Timeout(timeout), seen)),
            Err(e) => return Err(Failed::Io(e)),
        };
        let got = raw.get(..n).unwrap_or_default();
        let keep = SNIFF.saturating_sub(seen.len()).min(got.len());
        seen.extend_from_slice(got.get(..keep).unwrap_or_default());
        pending = Pending {
            buf: got.to_vec(),
            at: 0,
        };
    }
    // The client's Finished.
    flush_tls(conn, &mut out, sock).map_err(Failed::Io)?;
    Ok(pending)
}

/// Why a handshake failed: the socket, or TLS (with the peer's first bytes).
enum Failed {
    Io(io::Error),
    Tls(TlsError, Vec<u8>),
}

/// A connection past its handshake, split into its two directions.
fn split(
    conn: Connection,
    sock: TcpStream,
    pending: Pending,
    timeout: Duration,
) -> io::Result<(TlsReader, TlsWriter)> {
    let back = sock.try_clone()?;
    let conn = Arc::new(Mutex::new(conn));
    Ok((
        TlsReader {
            sock: back,
            conn: Arc::clone(&conn),
            pending,
            raw: vec![0u8; RAW_READ],
            timeout: None,
            set: None,
            eof: false,
        },
        TlsWriter {
            sock: PacedWrite::new(sock, timeout)?,
            conn,
            out: Vec::new(),
            failed: None,
        },
    ))
}

/// The destination's side: the handshake on an accepted connection, by `deadline`
/// (`timeout` names the wait in the error). `sock` is blocking, its write timeout set.
///
/// # Errors
/// [`MigrationError::Tls`] for a handshake that fails or times out,
/// [`MigrationError::Io`] from the socket.
pub(crate) fn accept(
    server: &TlsServer,
    mut sock: TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(TlsReader, TlsWriter)> {
    let mut conn = Connection::Server(
        ServerConnection::new(Arc::clone(&server.config))
            .map_err(|e| TlsError::Protocol(e.to_string()))?,
    );
    match handshake(&mut conn, &mut sock, deadline, timeout) {
        Ok(pending) => Ok(split(conn, sock, pending, timeout)?),
        Err(Failed::Io(e)) => Err(e.into()),
        Err(Failed::Tls(e, _)) => Err(e.into()),
    }
}

/// The source's side: the handshake on a new connection to `ip`, by `deadline`.
///
/// # Errors
/// [`MigrationError::Tls`] for a handshake that fails or times out;
/// [`MigrationError::DestinationRefused`] if what came instead of TLS is a plain
/// destination's refusal (it serves another source), [`TlsError::NotTls`] naming a plain
/// destination if it is its Nonce; [`MigrationError::Io`] from the socket.
pub(crate) fn connect(
    client: &TlsClient,
    ip: IpAddr,
    mut sock: TcpStream,
    deadline: Instant,
    timeout: Duration,
) -> Result<(TlsReader, TlsWriter)> {
    let name = client
        .server_name
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(ip.into()));
    let mut conn = Connection::Client(
        ClientConnection::new(Arc::clone(&client.config), name)
            .map_err(|e| TlsError::Protocol(e.to_string()))?,
    );
    match handshake(&mut conn, &mut sock, deadline, timeout) {
        Ok(pending) => Ok(split(conn, sock, pending, timeout)?),
        Err(Failed::Io(e)) => Err(e.into()),
        Err(Failed::Tls(e @ (TlsError::NotTls(_) | TlsError::Closed), seen)) => {
            Err(plain_answer(&seen).unwrap_or(MigrationError::Tls(e)))
        }
        Err(Failed::Tls(e, _)) => Err(e.into()),
    }
}

/// What a destination that answered a ClientHello with a plain migration stream said:
/// its refusal (busy), or its Nonce (it has no TLS).
fn plain_answer(seen: &[u8]) -> Option<MigrationError> {
    match FrameReader::new(seen).read_frame() {
        Ok(Frame::Refused { reason }) => Some(MigrationError::DestinationRefused(reason)),
        Ok(Frame::Nonce { .. }) => Some(
            TlsError::NotTls("the destination sent a plain migration stream (no TLS there)".into())
                .into(),
        ),
        _ => None,
    }
}

/// The reading half of a TLS connection: plaintext, as a [`Read`]. One `read` waits at
/// most [`TlsReader::set_read_timeout`] (no bound by default) in all, whatever the records
/// it takes; then it fails with [`io::ErrorKind::TimedOut`], and the bytes it read stay
/// for the next call. A TLS failure is an [`io::ErrorKind::InvalidData`] error carrying
/// its [`TlsError`] ([`MigrationError::lift_tls`]); the peer's close, with or without
/// `close_notify`, is the end of the stream.
pub struct TlsReader {
    sock: TcpStream,
    conn: Arc<Mutex<Connection>>,
    pending: Pending,
    raw: Vec<u8>,
    /// The longest one `read` waits.
    timeout: Option<Duration>,
    /// The socket's read timeout as last set.
    set: Option<Duration>,
    /// The socket's end came (and rustls knows it).
    eof: bool,
}

impl fmt::Debug for TlsReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsReader")
            .field("sock", &self.sock)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl TlsReader {
    /// The longest one [`Read::read`] waits (`None`: no bound).
    pub fn set_read_timeout(&mut self, timeout: Option<Duration>) {
        self.timeout = timeout;
    }
}

impl Read for TlsReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Far enough to be no bound, near enough not to overflow.
        let deadline = Instant::now() + self.timeout.unwrap_or(Duration::from_secs(1 << 30));
        loop {
            {
                let mut conn = self.conn.lock();
                match conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The peer closed without close_notify: the end, as over plain TCP.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if !self.pending.is_empty() {
                    match self.pending.feed(&mut conn) {
                        Ok(()) => continue,
                        Err(FeedError::Io(e)) => return Err(e),
                        Err(FeedError::Tls(e)) => return Err(io_error(classify(e))),
                    }
                }
                if self.eof {
                    return Ok(0);
                }
            }
            // No plaintext and nothing to decrypt: wait for the peer, outside the lock.
            let Some(n) = read_by(&mut self.sock, &mut self.set, &mut self.raw, deadline)? else {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no TLS record came in time",
                ));
            };
            if n == 0 {
                self.eof = true;
                let mut conn = self.conn.lock();
                // Tells rustls the stream ended.
                conn.read_tls(&mut &[][..])?;
                continue;
            }
            self.pending.buf.clear();
            self.pending
                .buf
                .extend_from_slice(self.raw.get(..n).unwrap_or_default());
            self.pending.at = 0;
        }
    }
}

/// The writing half of a TLS connection: plaintext, as a [`Write`]; each `write` seals
/// its bytes and writes the records to the socket through a [`PacedWrite`] (the write
/// timeout bounds each system call and a frame's deadline all of the frame's records, as
/// for a plain socket). After a failed socket write the stream is broken (a record may be
/// cut) and every later `write` fails.
pub struct TlsWriter {
    sock: PacedWrite,
    conn: Arc<Mutex<Connection>>,
    out: Vec<u8>,
    failed: Option<String>,
}

impl fmt::Debug for TlsWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsWriter")
            .field("sock", &self.sock)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl TlsWriter {
    /// The socket (to shut it down).
    pub fn socket(&self) -> &TcpStream {
        self.sock.socket()
    }

    /// The handle that marks the frames written, for their deadlines.
    pub fn clock(&self) -> FrameClock {
        self.sock.clock()
    }

    /// Sends `close_notify`, best effort (a failed stream sends nothing).
    pub fn close_notify(&mut self) {
        if self.failed.is_some() {
            return;
        }
        self.out.clear();
        {
            let mut conn = self.conn.lock();
            conn.send_close_notify();
            while conn.wants_write() {
                if conn.write_tls(&mut self.out).is_err() {
                    break;
                }
            }
        }
        let _ = self.sock.write_all(&self.out);
    }
}

impl Write for TlsWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(why) = &self.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("the TLS stream broke earlier: {why}"),
            ));
        }
        let take = buf.get(..WRITE_CHUNK.min(buf.len())).unwrap_or_default();
        self.out.clear();
        let n = {
            let mut conn = self.conn.lock();
            let n = conn.writer().write(take)?;
            while conn.wants_write() {
                conn.write_tls(&mut self.out)?;
            }
            n
        };
        if let Err(e) = self.sock.write_all(&self.out) {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
