//! The client library (tokio): enroll with a token, connect with a credential, send
//! requests and messages, and receive what the server sends.
//!
//! A device depends on this with the crate's default feature (`client`): the protocol
//! core and this module, without the daemon's SQLite, HTTP client or clap.
//!
//! **Enroll** once, with the token the operator gave (`tallyd token`), and keep the
//! credential (it is a secret: mode 0600):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tally::client::{self, EnrollmentToken, Id};
//! let token = EnrollmentToken::parse(&std::fs::read_to_string("enroll.token")?)?;
//! let id = Id::new("sensor-42")?;
//! let cred = client::enroll("server.example:7420", &token, id, &Default::default()).await?;
//! std::fs::write("sensor-42.cred", cred.to_file().as_bytes())?; // then chmod 600
//! # Ok(()) }
//! ```
//!
//! **Connect** on every start, then send requests (each gets the server's answer) and
//! answer what the server asks:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use tally::client::{Client, ClientOptions, Credential, Status};
//! let cred = Credential::from_file(&std::fs::read_to_string("sensor-42.cred")?)?;
//! let (client, incoming) = Client::connect(&cred, ClientOptions::default()).await?;
//! let answer = client.request("temperature?").await?;
//! println!("server said {answer:?}");
//! tokio::spawn(tally::client::serve_incoming(
//!     incoming,
//!     |payload| async move { (Status::OK, payload) }, // the server's requests
//!     |message| println!("message: {message:?}"),
//! ));
//! # Ok(()) }
//! ```
//!
//! **Stay connected**: a device on a persistent connection runs a [`Link`], which makes
//! the session again whenever it is lost (a daemon restart, a network cut, a takeover),
//! with jittered backoff, and reports [`LinkEvent`]s: up, down, server requests, stopped.
//!
//! Each connection runs the device's state machine, [`Device`]: the handshake, then the
//! session, which one task owns with the socket; [`Client`] is a cheap handle to it.
//! Requests may be issued concurrently; each waits for its own RESPONSE.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::proto::connection::{CloseAnswer, Connection, End, Event};

use crate::proto::device::{self, Device, HandshakeFailure};
use crate::proto::enroll::ClientAwaitReply;
use crate::proto::error::TagKind;
use crate::proto::handshake::ServerLimits;
use crate::proto::{Misuse, ProtocolError, DEFAULT_MAX_FRAME_LEN, HANDSHAKE_MAX_FRAME_LEN};
use crate::random::random_bytes;
use crate::wire::{read_frame, ReadError};

mod link;
pub use link::{Link, LinkEvent};
// `tally listen`'s local socket for `tally request` and `tally message`: the CLI's
// machinery, not the device's API.
#[doc(hidden)]
pub mod share;

// What a device program needs from the protocol core, here with the client.
pub use crate::proto::credential::{Credential, CredentialError, EnrollmentToken};
pub use crate::proto::{CloseCode, DeliveryKind, ErrorCode, Id, Mode, Status};

/// What went wrong, for a caller to match on.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The server address.
        addr: String,
        /// The cause.
        source: Arc<io::Error>,
    },
    /// The connection failed.
    #[error("connection error: {0}")]
    Io(Arc<io::Error>),
    /// The server refused with an (unauthenticated) ERROR frame. Its message says what
    /// the code can mean and what to check ([`refusal_hint`]).
    #[error("refused by the server: {0}: {hint}", hint = refusal_hint(*.0))]
    Refused(ErrorCode),
    /// The server did not prove it holds this identity's key.
    #[error("the server did not authenticate: the identity is unknown or revoked, the key is wrong, or this is not the right server")]
    AuthFailed,
    /// Enrollment: the server did not prove it holds the pinned static key.
    #[error("the server did not prove it holds the key in the token: wrong server, or a man in the middle")]
    ServerNotAuthentic,
    /// The server broke the protocol (bad tag, sequence, format).
    #[error("protocol violation: {0}")]
    Protocol(ProtocolError),
    /// The session ended with an authenticated CLOSE from the server.
    #[error("session closed by the server: {code} {reason:?}")]
    Closed {
        /// Close code.
        code: CloseCode,
        /// Close reason.
        reason: String,
    },
    /// The connection ended without CLOSE: the session was cut (spec 8.6).
    #[error("connection ended without a CLOSE frame (truncated)")]
    Truncated,
    /// Something took too long.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The request got a RESPONSE with a status other than OK.
    #[error("request failed with status {status}")]
    Status {
        /// The status.
        status: Status,
        /// The payload that came with it.
        payload: Bytes,
    },
    /// A token or credential could not be read.
    #[error(transparent)]
    Credential(#[from] CredentialError),
    /// The enrollment was confirmed, but the server's answer did not arrive: the server
    /// may have stored the identity. Not retried.
    #[error("enrollment confirmed but not answered ({0}): the server may have stored the identity; if `tally request` fails with this credential, ask the operator to `tallyd remove` the id and issue a new token")]
    Unconfirmed(Box<ClientError>),
    /// The session was closed by this side.
    #[error("session already closed")]
    SessionClosed,
    /// The server's first bytes cannot start a Tally frame: another protocol answered.
    #[error("this does not look like a Tally server (it answered with {0})")]
    NotTally(String),
    /// Sent through the running `tally listen` of the identity ([`share`]): the error
    /// its session gave, as it would have been printed, or what went wrong on the way.
    #[error("{0}")]
    Relayed(String),
}

/// Reads the server's first frame of a handshake or enrollment. Bytes that cannot start
/// one (an HTTP status line, an SSH banner, a TLS alert) are named: pointing a device at
/// the wrong port is common, and "frame length 1213486160" says nothing.
async fn read_first_frame(tcp: &mut TcpStream, buf: &mut BytesMut) -> Result<Bytes, ClientError> {
    match read_frame(tcp, buf, HANDSHAKE_MAX_FRAME_LEN).await {
        Err(ReadError::Frame(e)) => Err(other_protocol(buf)
            .map(ClientError::NotTally)
            .unwrap_or_else(|| ReadError::Frame(e).into())),
        r => Ok(r?),
    }
}

/// What a reply that is not a Tally frame looks like, if it looks like something.
fn other_protocol(bytes: &[u8]) -> Option<String> {
    if bytes.starts_with(b"HTTP/") {
        return Some("HTTP".into());
    }
    if bytes.starts_with(b"SSH-") {
        return Some("an SSH banner".into());
    }
    if matches!(bytes, [0x15 | 0x16, 0x03, ..]) {
        return Some("TLS".into());
    }
    let line = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let text = line.len() >= 4
        && line
            .iter()
            .all(|&b| b == b'\r' || b == b'\t' || (0x20..0x7f).contains(&b));
    text.then(|| {
        let shown = String::from_utf8_lossy(&line[..line.len().min(40)]);
        format!("text: {:?}", shown.trim_end())
    })
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(Arc::new(e))
    }
}

/// What a refusal can mean, and what to check: every possible cause, since the server
/// does not say which (spec 7.5 and 13.10: a stranger learns nothing from a refusal).
pub fn refusal_hint(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::ENROLL_REFUSED => "the enrollment token did not verify here: it is mistyped, already used, expired or withdrawn (a per-identity token enrolls one id, once: check --id), or it is the open token and this server does not accept open enrollment, or it was issued by another server (check --server); the operator's `tallyd tokens` lists the tokens outstanding, and its log says which",
        ErrorCode::ID_TAKEN => "this id is enrolled already: enroll with another id, or ask the operator to `tallyd remove` it first (to replace a device)",
        ErrorCode::AUTH_FAILED => "the identity is unknown or revoked, the key is wrong, or this is not the right server",
        ErrorCode::BUSY => "the server is at one of its limits (connections, handshakes or enrollments in progress, or it is cut off from its fleet's database): try again later",
        ErrorCode::TAKEOVER_REFUSED => "this identity has a live session already and the server keeps the first one (takeover = \"reject\"): another device or process is using this credential",
        ErrorCode::TIMEOUT => "the handshake took longer than the server allows: a slow or lossy link",
        ErrorCode::INTERNAL => "the server failed (its store): try again later; its log says why",
        ErrorCode::UNSUPPORTED_VERSION => "the server speaks another version of the protocol: upgrade the older side",
        ErrorCode::MODE_REFUSED => "the server's policy does not accept this session mode (its `encryption` setting): a device sending the authenticated mode to a server that requires encryption must drop --authenticate-only; the reverse needs the operator to allow it. This client never switches mode on its own (spec 7.8)",
        ErrorCode::MALFORMED => "the server could not read what this client sent: another protocol, or a bug on one side",
        _ => "a code this client does not know (a newer server)",
    }
}

impl ClientError {
    /// Whether a new attempt may succeed: the server was busy, or the connection failed
    /// before the server answered (refused, reset, closed, timed out). Authentication
    /// failures and protocol violations are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Refused(ErrorCode::BUSY)
                | ClientError::Connect { .. }
                | ClientError::Io(_)
                | ClientError::Truncated
                | ClientError::Timeout(_)
        )
    }
}

impl From<ReadError> for ClientError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Eof | ReadError::Truncated => ClientError::Truncated,
            ReadError::Frame(f) => ClientError::Protocol(f.into()),
            ReadError::Io(e) => e.into(),
        }
    }
}

impl From<ProtocolError> for ClientError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Refused(code) => ClientError::Refused(code),
            // Spec 8.3: an ERROR inside a session was injected; the session is cut.
            ProtocolError::InjectedError(_) => ClientError::Truncated,
            ProtocolError::BadTag(TagKind::ServerAuth) => ClientError::AuthFailed,
            ProtocolError::BadTag(TagKind::EnrollReply) => ClientError::ServerNotAuthentic,
            e => ClientError::Protocol(e),
        }
    }
}

/// Client settings: start from [`ClientOptions::default`] and change what you need.
///
/// ```
/// use std::time::Duration;
/// use tally::client::{Backoff, ClientOptions};
/// let opts = ClientOptions::default()
///     .with_max_frame_len(4096) // a small device: the server sends nothing larger
///     .with_connect_timeout(Duration::from_secs(5))
///     .with_retry(Backoff::never());
/// assert_eq!(opts.keepalive, None); // the server's, announced in the handshake
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientOptions {
    /// Send a PING after this long without sending anything. `None` (the default):
    /// the interval the server announces in the handshake (spec 8.5); a value longer
    /// than the server's is shortened to it.
    pub keepalive: Option<Duration>,
    /// The largest session frame this client accepts (spec 3.2), announced to the
    /// server in HELLO (256 bytes to 16 MiB). What the client sends is bounded by
    /// the limit the server announces.
    pub max_frame_len: u32,
    /// Time for the TCP connect, and then for each answer of the server before the
    /// session (SERVER_AUTH; ENROLL_REPLY and ENROLL_DONE), each counted from the frame
    /// it answers. Spec 7.4: at least 10 s (the default), since a server may send a
    /// refusal up to 7.5 s late.
    pub connect_timeout: Duration,
    /// Capacity of the queue of server requests and messages not yet taken.
    pub incoming_capacity: usize,
    /// Retries of a connection attempt that failed for a reason that may pass.
    pub retry: Backoff,
    /// The session mode (spec 7.7): [`Mode::Encrypted`] by default; the authenticated
    /// mode only where something on the path must read the payloads. A refusal of the
    /// mode (`MODE_REFUSED`) is never answered by trying the other one (spec 7.8).
    pub mode: Mode,
}

/// How long to wait before trying again, with jittered exponential backoff: one type for
/// the retries of one connection or enrollment ([`ClientOptions::retry`]:
/// [`Backoff::default`]) and for a [`Link`] that keeps a session up
/// ([`Link::start`]: [`Backoff::link`]).
///
/// An attempt retried (`Client::connect`, [`enroll`]) failed for a reason that may pass
/// ([`ClientError::is_transient`]: ERROR BUSY, a connection refused, reset or closed
/// before the server answered, a timeout); it is retried `retries` times, each retry
/// logged (`tracing`, level WARN) with its reason and delay. A `Link` tries until it is
/// stopped and does not count `retries`; after a takeover or a refusal that will not
/// pass by itself it waits on the slower `refused_delay` scale.
///
/// ```
/// use std::time::Duration;
/// use tally::client::Backoff;
/// let r = Backoff::link().with_delays(Duration::from_millis(500), Duration::from_secs(30));
/// assert_eq!(r.max_delay, Duration::from_secs(30));
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Backoff {
    /// Attempts after the first, for one connection or enrollment; 0 never retries.
    /// (A `Link` does not count them.)
    pub retries: u32,
    /// The delay after the first failure that may pass by itself (the server shut down,
    /// restarted or is busy, the connection was cut or refused, a timeout). It doubles
    /// with each failure in a row, up to `max_delay`; each delay is drawn uniformly
    /// between half of it and all of it, so that devices refused together do not come
    /// back together.
    pub initial_delay: Duration,
    /// The longest such delay.
    pub max_delay: Duration,
    /// A `Link`'s delay after its session was taken over by a newer one of the same
    /// identity (CLOSE `TAKEN_OVER`, spec 7.3: another device may be using this
    /// identity), the server refused the takeover (ERROR `TAKEOVER_REFUSED`), or an
    /// attempt failed in a way that will not pass soon (the server did not authenticate:
    /// unknown or revoked identity, wrong key; an unsupported version; not a Tally
    /// server). Those unauthenticated failures could be forged by someone on the path, so
    /// they slow the link down rather than stop it. It doubles each time in a row, up to
    /// `max_refused_delay`; each delay is drawn between all of it and one and a half times
    /// it (never shorter).
    pub refused_delay: Duration,
    /// The longest delay after such refusals.
    pub max_refused_delay: Duration,
    /// A `Link`'s session that stayed up this long starts the delays over from the first.
    pub stable_after: Duration,
}

impl Default for Backoff {
    /// The retries of one connection or enrollment: 4, from 0.2 s doubling up to 5 s.
    fn default() -> Self {
        Backoff {
            retries: 4,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            ..Backoff::link()
        }
    }
}

impl Backoff {
    /// A [`Link`]'s: from 1 s doubling up to 60 s after failures that may pass; from 10 s
    /// up to 10 min after takeovers and refusals; over again after a session of 60 s.
    pub fn link() -> Self {
        Backoff {
            retries: 0,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            refused_delay: Duration::from_secs(10),
            max_refused_delay: Duration::from_secs(600),
            stable_after: Duration::from_secs(60),
        }
    }

    /// `retries` attempts after the first, the delay starting at `initial_delay` and
    /// doubling up to `max_delay`.
    pub fn new(retries: u32, initial_delay: Duration, max_delay: Duration) -> Self {
        Backoff {
            retries,
            initial_delay,
            max_delay,
            ..Backoff::default()
        }
    }

    /// No retries.
    pub fn never() -> Self {
        Backoff {
            retries: 0,
            ..Backoff::default()
        }
    }

    /// Delays after failures that may pass: from `initial` doubling up to `max`.
    pub fn with_delays(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_delay = initial;
        self.max_delay = max;
        self
    }

    /// A `Link`'s delays after takeovers and refusals: from `initial` doubling up to `max`.
    pub fn with_refused_delays(mut self, initial: Duration, max: Duration) -> Self {
        self.refused_delay = initial;
        self.max_refused_delay = max;
        self
    }

    /// A `Link`'s session up for `stable_after` starts the delays over.
    pub fn with_stable_after(mut self, stable_after: Duration) -> Self {
        self.stable_after = stable_after;
        self
    }

    /// The delay before retry number `n` (from 0), with `jitter` in [0, 1).
    pub fn delay(&self, n: u32, jitter: f64) -> Duration {
        let full = self
            .initial_delay
            .saturating_mul(1u32 << n.min(20))
            .min(self.max_delay);
        full.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are spent.
    /// `what` names it in the log (e.g. "connect to 10.0.0.1:7420").
    pub async fn run<T, F, Fut>(&self, what: &str, mut attempt: F) -> Result<T, ClientError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut n = 0;
        loop {
            match attempt().await {
                Err(e) if e.is_transient() && n < self.retries => {
                    let delay = self.delay(n, jitter());
                    n += 1;
                    tracing::warn!(
                        "{what}: {e}; retrying in {} ms (retry {n} of {})",
                        delay.as_millis(),
                        self.retries
                    );
                    tokio::time::sleep(delay).await;
                }
                r => return r,
            }
        }
    }
}

/// A uniform random number in [0, 1), for backoff jitter.
fn jitter() -> f64 {
    let r = random_bytes();
    f64::from(u32::from_le_bytes([r[0], r[1], r[2], r[3]])) / 2f64.powi(32)
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keepalive: None,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            connect_timeout: Duration::from_secs(10),
            incoming_capacity: 64,
            retry: Backoff::default(),
            mode: Mode::Encrypted,
        }
    }
}

impl ClientOptions {
    /// Sends a PING after `keepalive` without sending anything, if that is shorter than
    /// the server's interval.
    pub fn with_keepalive(mut self, keepalive: Duration) -> Self {
        self.keepalive = Some(keepalive);
        self
    }

    /// Announces `max_frame_len` (256 bytes to 16 MiB) as this client's frame limit.
    pub fn with_max_frame_len(mut self, max_frame_len: u32) -> Self {
        self.max_frame_len = max_frame_len;
        self
    }

    /// Bounds TCP connect plus handshake (or enrollment) by `timeout`.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Holds up to `capacity` server requests and messages not yet taken.
    pub fn with_incoming_capacity(mut self, capacity: usize) -> Self {
        self.incoming_capacity = capacity;
        self
    }

    /// Retries failed connection attempts as `retry` says.
    pub fn with_retry(mut self, retry: Backoff) -> Self {
        self.retry = retry;
        self
    }
}

async fn dial(addr: &str) -> Result<TcpStream, ClientError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| ClientError::Connect {
            addr: addr.to_owned(),
            source: Arc::new(e),
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Enrolls `id` at `server` with an enrollment token (spec 6). Returns the credential
/// once the server confirmed it stored the identity. Of `options`, the connect timeout
/// (each answer of the server is awaited that long) and the retries apply (only failures
/// before ENROLL_CONFIRM was sent are retried: nothing was stored).
pub async fn enroll(
    server: &str,
    token: &EnrollmentToken,
    id: Id,
    options: &ClientOptions,
) -> Result<Credential, ClientError> {
    let what = format!("enrollment of {id} at {server}");
    let timeout = options.connect_timeout;
    options
        .retry
        .run(&what, || enroll_once(server, token, id.clone(), timeout))
        .await
}

async fn enroll_once(
    server: &str,
    token: &EnrollmentToken,
    id: Id,
    timeout: Duration,
) -> Result<Credential, ClientError> {
    // Spec 7.4: each answer is waited for `timeout` (10 s by default), counted from the
    // frame it answers; the TCP connect has its own.
    let answer = |what: &'static str| move |_| ClientError::Timeout(what);
    let mut tcp = tokio::time::timeout(timeout, dial(server))
        .await
        .map_err(answer("connect"))??;
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let wait = ClientAwaitReply::start(token.client_params(id), random_bytes(), &mut out);
    tcp.write_all(&out).await?;
    let reply = tokio::time::timeout(timeout, read_first_frame(&mut tcp, &mut buf))
        .await
        .map_err(answer("ENROLL_REPLY"))??;
    out.clear();
    let wait = wait.handle_reply(&reply, &mut out)?;
    // From here on the server may store the identity: no retry, and any failure leaves
    // the enrollment uncertain (spec 6.4), never refused.
    let unconfirmed = |e: ClientError| ClientError::Unconfirmed(Box::new(e));
    tcp.write_all(&out)
        .await
        .map_err(|e| unconfirmed(e.into()))?;
    let done = tokio::time::timeout(
        timeout,
        read_frame(&mut tcp, &mut buf, HANDSHAKE_MAX_FRAME_LEN),
    )
    .await
    .map_err(|_| unconfirmed(ClientError::Timeout("ENROLL_DONE")))?
    .map_err(|e| unconfirmed(e.into()))?;
    // A bad or injected ENROLL_DONE too.
    let (id, key) = wait.handle_done(&done).map_err(|e| unconfirmed(e.into()))?;
    let _ = tcp.shutdown().await;
    Ok(Credential {
        id,
        key,
        server: server.to_owned(),
        server_key: token.server_static,
    })
}

/// Something the server sent on its own.
#[derive(Debug)]
#[non_exhaustive]
pub enum Incoming {
    /// A REQUEST: answer it with [`IncomingRequest::respond`].
    Request(IncomingRequest),
    /// A one-way MESSAGE.
    Message(Bytes),
    /// A queued message or request (spec 8.8): handle it, then
    /// [`IncomingDelivery::ack`] it. Dropping it unacknowledged leaves it queued: the
    /// server delivers it again in the next session.
    Delivery(IncomingDelivery),
}

/// Serves what the server sends until the session ends: each REQUEST is answered with
/// `handler(payload)`, run concurrently on its own task; each MESSAGE goes to `on_message`;
/// queued ones (spec 8.8) are handled the same way, one at a time in the order they
/// come, then acknowledged (a queued request with the handler's answer).
///
/// ```no_run
/// # async fn demo(incoming: tokio::sync::mpsc::Receiver<tally::client::Incoming>) {
/// use tally::proto::Status;
/// tally::client::serve_incoming(
///     incoming,
///     |payload| async move { (Status::OK, payload) },   // answer server requests
///     |message| println!("message: {message:?}"),
/// )
/// .await;
/// # }
/// ```
pub async fn serve_incoming<H, F, M>(
    mut incoming: mpsc::Receiver<Incoming>,
    handler: H,
    mut on_message: M,
) where
    H: Fn(Bytes) -> F,
    F: std::future::Future<Output = (Status, Bytes)> + Send + 'static,
    M: FnMut(Bytes),
{
    while let Some(item) = incoming.recv().await {
        match item {
            Incoming::Request(req) => {
                let answer = handler(req.payload.clone());
                tokio::spawn(async move {
                    let (status, payload) = answer.await;
                    let _ = req.respond(status, payload).await;
                });
            }
            Incoming::Message(payload) => on_message(payload),
            // Handled like a live request or message, then acknowledged with the
            // handler's answer (a message: OK).
            // In the order they come (spec 8.8: a device that drops redeliveries by the
            // highest id it handled must handle them in order): this waits for the
            // handler.
            Incoming::Delivery(d) => match d.kind {
                crate::proto::DeliveryKind::Request => {
                    let (status, payload) = handler(d.payload.clone()).await;
                    let _ = d.ack(status, payload).await;
                }
                crate::proto::DeliveryKind::Message => {
                    on_message(d.payload.clone());
                    let _ = d.ack(Status::OK, Bytes::new()).await;
                }
            },
        }
    }
}

/// A queued message or request from the server (spec 8.8), delivered at least once.
///
/// Acknowledge it once it is handled ([`IncomingDelivery::ack`]); the server deletes it
/// then. A device that must not handle a message twice records the highest
/// [`IncomingDelivery::msg_id`] it handled (durably) and acknowledges, without handling
/// again, a delivery at or below it: a redelivery after a reboot or a cut connection.
#[derive(Debug)]
pub struct IncomingDelivery {
    /// The message id: per identity, increasing in the order the messages were queued.
    pub msg_id: u64,
    /// A queued request (the acknowledgement carries the answer) or message.
    pub kind: crate::proto::DeliveryKind,
    /// The payload.
    pub payload: Bytes,
    tx: Option<mpsc::Sender<Cmd>>,
}

impl Drop for IncomingDelivery {
    /// Dropped unacknowledged: its place in the server's window would stay taken for
    /// the whole session, so the session is ended (spec 8.8 has no other way to decline
    /// a delivery); the message comes again in the next one.
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Cmd::Unacknowledged {
                msg_id: self.msg_id,
            });
        }
    }
}

impl IncomingDelivery {
    /// Acknowledges the delivery: for a queued request, with the answer (`status`,
    /// `payload`); for a message, [`Status::OK`] and an empty payload. Fails with
    /// [`ClientError::SessionClosed`] if the session is gone (then it stays queued).
    pub async fn ack(mut self, status: Status, payload: Bytes) -> Result<(), ClientError> {
        let tx = self.tx.take().ok_or(ClientError::SessionClosed)?;
        tx.send(Cmd::Ack {
            msg_id: self.msg_id,
            status,
            payload,
        })
        .await
        .map_err(|_| ClientError::SessionClosed)
    }
}

/// A REQUEST from the server. Dropping it unanswered answers status UNAVAILABLE.
#[derive(Debug)]
pub struct IncomingRequest {
    /// The request's payload.
    pub payload: Bytes,
    seq: u64,
    tx: Option<mpsc::Sender<Cmd>>,
}

impl IncomingRequest {
    /// Sends the RESPONSE. Fails with [`ClientError::SessionClosed`] if the session is
    /// gone (every [`Client`] handle was dropped, or it ended).
    pub async fn respond(mut self, status: Status, payload: Bytes) -> Result<(), ClientError> {
        let tx = self.tx.take().ok_or(ClientError::SessionClosed)?;
        tx.send(Cmd::Respond {
            req_seq: self.seq,
            status,
            payload,
        })
        .await
        .map_err(|_| ClientError::SessionClosed)
    }
}

impl Drop for IncomingRequest {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let payload = Bytes::from_static(b"no handler answered");
            let _ = tx.try_send(Cmd::Respond {
                req_seq: self.seq,
                status: Status::UNAVAILABLE,
                payload,
            });
        }
    }
}

#[derive(Debug)]
enum Cmd {
    Request {
        payload: Bytes,
        reply: oneshot::Sender<Result<(Status, Bytes), ClientError>>,
    },
    Message {
        payload: Bytes,
        sent: oneshot::Sender<Result<(), ClientError>>,
    },
    Respond {
        req_seq: u64,
        status: Status,
        payload: Bytes,
    },
    Ack {
        msg_id: u64,
        status: Status,
        payload: Bytes,
    },
    /// A delivery was dropped unacknowledged.
    Unacknowledged {
        msg_id: u64,
    },
    Close {
        done: oneshot::Sender<()>,
    },
}

/// A live session with the server.
#[derive(Debug, Clone)]
pub struct Client {
    id: Id,
    tx: mpsc::Sender<Cmd>,
    ended: watch::Receiver<Option<ClientError>>,
}

impl Client {
    /// Connects and runs the session handshake (spec 7) with `cred`, retrying as
    /// `opts.retry` says.
    pub async fn connect(
        cred: &Credential,
        opts: ClientOptions,
    ) -> Result<(Client, mpsc::Receiver<Incoming>), ClientError> {
        let what = format!("session with {} as {}", cred.server, cred.id);
        opts.retry
            .run(&what, || Self::connect_once(cred, opts.clone()))
            .await
    }

    async fn connect_once(
        cred: &Credential,
        opts: ClientOptions,
    ) -> Result<(Client, mpsc::Receiver<Incoming>), ClientError> {
        // Spec 7.4: the TCP connect, then the server's answer to HELLO, each within
        // `connect_timeout` (the handshake's deadline runs from HELLO, in the device's
        // state machine).
        let tcp = tokio::time::timeout(opts.connect_timeout, dial(&cred.server))
            .await
            .unwrap_or(Err(ClientError::Timeout("connect")))?;
        let (tcp, session) = handshake(tcp, cred, &opts).await?;
        let (tx, rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(opts.incoming_capacity);
        let (end_tx, end_rx) = watch::channel(None);
        let role = ClientRole {
            rx,
            commands_open: true,
            pending: HashMap::new(),
            incoming: in_tx,
            tx: tx.downgrade(),
            closing: None,
            end: None,
        };
        tokio::spawn(async move {
            let end = drive(session, tcp, role).await;
            let _ = end_tx.send(Some(end));
        });
        Ok((
            Client {
                id: cred.id.clone(),
                tx,
                ended: end_rx,
            },
            in_rx,
        ))
    }

    /// The identity of this session.
    pub fn id(&self) -> &Id {
        &self.id
    }

    /// Sends a REQUEST and waits for its RESPONSE: `Ok(payload)` if the status is OK,
    /// [`ClientError::Status`] otherwise.
    pub async fn request(&self, payload: impl Into<Bytes>) -> Result<Bytes, ClientError> {
        match self.request_with_status(payload).await? {
            (Status::OK, payload) => Ok(payload),
            (status, payload) => Err(ClientError::Status { status, payload }),
        }
    }

    /// Sends a REQUEST and returns the RESPONSE's status and payload.
    pub async fn request_with_status(
        &self,
        payload: impl Into<Bytes>,
    ) -> Result<(Status, Bytes), ClientError> {
        let (reply, rx) = oneshot::channel();
        self.send(Cmd::Request {
            payload: payload.into(),
            reply,
        })
        .await?;
        rx.await.unwrap_or_else(|_| Err(self.end_reason()))
    }

    /// Sends a one-way MESSAGE (returns once it is written to the connection buffer).
    pub async fn message(&self, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        let (sent, rx) = oneshot::channel();
        self.send(Cmd::Message {
            payload: payload.into(),
            sent,
        })
        .await?;
        rx.await.unwrap_or_else(|_| Err(self.end_reason()))
    }

    /// Ends the session with CLOSE NORMAL and waits for the server's CLOSE.
    pub async fn close(self) -> Result<(), ClientError> {
        let (done, rx) = oneshot::channel();
        self.send(Cmd::Close { done }).await?;
        let _ = rx.await;
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(Option::is_some).await;
        match self.end_reason() {
            ClientError::SessionClosed => Ok(()),
            other => Err(other),
        }
    }

    /// Waits until the session ends and returns why.
    pub async fn closed(&self) -> ClientError {
        let mut ended = self.ended.clone();
        let _ = ended.wait_for(Option::is_some).await;
        self.end_reason()
    }

    async fn send(&self, cmd: Cmd) -> Result<(), ClientError> {
        self.tx.send(cmd).await.map_err(|_| self.end_reason())
    }

    fn end_reason(&self) -> ClientError {
        self.ended
            .borrow()
            .clone()
            .unwrap_or(ClientError::SessionClosed)
    }
}

type Pending = oneshot::Sender<Result<(Status, Bytes), ClientError>>;

/// The client's side of the session driver: commands from [`Client`] handles in,
/// responses to their waiters and the server's requests and messages out.
struct ClientRole {
    rx: mpsc::Receiver<Cmd>,
    /// False once every handle was dropped (the session is being closed).
    commands_open: bool,
    pending: HashMap<u64, Pending>,
    incoming: mpsc::Sender<Incoming>,
    tx: mpsc::WeakSender<Cmd>,
    /// Who waits for [`Client::close`] to complete.
    closing: Option<oneshot::Sender<()>>,
    /// Why the session ended, once it did.
    end: Option<ClientError>,
}

impl crate::driver::Role for ClientRole {
    type Work = Option<Cmd>;

    // The client's backlog is mostly its own requests: it always reads (the server holds
    // back instead), so that the two ends never both stop reading.
    const HOLD_WHEN_BACKLOGGED: bool = false;

    fn poll_work(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Cmd>> {
        if !self.commands_open {
            return std::task::Poll::Pending;
        }
        self.rx.poll_recv(cx)
    }

    fn apply(&mut self, cmd: Option<Cmd>, conn: &mut Connection, now: Duration) {
        match cmd {
            Some(Cmd::Request { payload, reply }) => match conn.request(payload, now) {
                Ok(seq) => {
                    self.pending.insert(seq, reply);
                }
                Err(e) => {
                    let _ = reply.send(Err(not_sent(e)));
                }
            },
            Some(Cmd::Message { payload, sent }) => {
                let _ = sent.send(conn.message(payload, now).map_err(not_sent));
            }
            Some(Cmd::Respond {
                req_seq,
                status,
                payload,
            }) => {
                let _ = conn.respond(req_seq, status, payload, now);
            }
            Some(Cmd::Ack {
                msg_id,
                status,
                payload,
            }) => {
                let _ = conn.ack(msg_id, status, payload, now);
            }
            Some(Cmd::Unacknowledged { msg_id }) => {
                let reason = format!(
                    "queued message {msg_id} dropped unacknowledged: it comes again in the next session"
                );
                conn.close(CloseCode::NORMAL, &reason, now);
            }
            Some(Cmd::Close { done }) => {
                self.closing = Some(done);
                conn.close(CloseCode::NORMAL, "", now);
            }
            // Every handle was dropped: end the session politely.
            None => {
                self.commands_open = false;
                conn.close(CloseCode::NORMAL, "", now);
            }
        }
    }

    fn event(&mut self, event: Event, conn: &mut Connection, now: Duration) {
        match event {
            Event::Response {
                req_seq,
                status,
                payload,
            } => {
                if let Some(p) = self.pending.remove(&req_seq) {
                    let _ = p.send(Ok((status, payload)));
                }
            }
            Event::Request { seq, payload } => {
                let req = IncomingRequest {
                    payload,
                    seq,
                    tx: self.tx.upgrade(),
                };
                // Nobody listening, or a full queue: answered UNAVAILABLE by Drop.
                let _ = self.incoming.try_send(Incoming::Request(req));
            }
            Event::Message { payload } => {
                let _ = self.incoming.try_send(Incoming::Message(payload));
            }
            // Nobody listening, or a full queue: it cannot be acknowledged, and the
            // session ends (as the delivery's Drop has it); it stays queued and comes
            // again in the next session.
            Event::Delivery {
                msg_id,
                kind,
                payload,
            } => {
                let delivery = IncomingDelivery {
                    msg_id,
                    kind,
                    payload,
                    tx: self.tx.upgrade(),
                };
                if let Err(e) = self.incoming.try_send(Incoming::Delivery(delivery)) {
                    let (reason, item) = match e {
                        mpsc::error::TrySendError::Full(i) => ("incoming queue full", i),
                        mpsc::error::TrySendError::Closed(i) => {
                            ("nobody takes what the server sends", i)
                        }
                    };
                    // Closed here, not by its Drop.
                    if let Incoming::Delivery(mut d) = item {
                        d.tx = None;
                    }
                    conn.close(
                        CloseCode::NORMAL,
                        &format!("queued message {msg_id} not taken: {reason}"),
                        now,
                    );
                }
            }
            Event::Closed(end) => {
                let end = ended(end);
                for seq in conn.pending_requests() {
                    if let Some(p) = self.pending.remove(&seq) {
                        let _ = p.send(Err(end.clone()));
                    }
                }
                self.end = Some(end);
            }
            _ => {}
        }
    }
}

/// Why a request or message could not be sent: the session is closing, or it does not
/// fit.
fn not_sent(e: ProtocolError) -> ClientError {
    match e {
        ProtocolError::Misuse(Misuse::Closed) => ClientError::SessionClosed,
        e => ClientError::from(e),
    }
}

/// What a session's end means to the caller.
fn ended(end: End) -> ClientError {
    match end {
        End::PeerClosed { code, reason } => ClientError::Closed { code, reason },
        End::Closed {
            answer: CloseAnswer::Nothing,
            ..
        } => ClientError::Timeout("the server did not answer CLOSE"),
        // A cut after this side's CLOSE is still a cut, not an orderly end.
        End::Closed {
            answer: CloseAnswer::Eof,
            ..
        } => ClientError::Truncated,
        End::Closed {
            code: CloseCode::IDLE_TIMEOUT,
            ..
        } => ClientError::Timeout("the server sent nothing for two keepalive intervals"),
        End::Closed { .. } => ClientError::SessionClosed,
        End::Truncated => ClientError::Truncated,
        End::Failed(e) => ClientError::from(e),
    }
}

/// Runs the session handshake (spec 7) over `tcp` with the device's state machine;
/// returns the session once CLIENT_FINISH is written, and the origin of its clock.
async fn handshake(
    mut tcp: TcpStream,
    cred: &Credential,
    opts: &ClientOptions,
) -> Result<(TcpStream, (Connection, ServerLimits, Instant)), ClientError> {
    let origin = Instant::now();
    let config = device::Config {
        max_frame_len: opts.max_frame_len,
        keepalive: opts.keepalive,
        handshake_timeout: opts.connect_timeout,
        mode: opts.mode,
        ..device::Config::default()
    };
    let mut device = Device::new(
        &cred.id,
        cred.key.clone(),
        &cred.server_key,
        &mut random_bytes(),
        config,
        origin.elapsed(),
    );
    // The server's first bytes, to name another protocol that answered instead.
    let mut first = Vec::new();
    let mut buf = BytesMut::new();
    let limits = loop {
        // HELLO, then CLIENT_FINISH, under the handshake's deadline: the driver starts
        // with an empty send buffer.
        if let Some(out) = device.poll_transmit() {
            tcp.write_all(&out).await?;
        }
        match device.poll_event() {
            Some(device::Event::Established(limits)) => break limits,
            Some(device::Event::HandshakeFailed(f)) => return Err(refused(f, &first)),
            Some(_) => continue,
            None => {}
        }
        let deadline = device.poll_timeout().map(|t| origin + t);
        let read = tcp.read_buf(&mut buf);
        let read = match deadline {
            Some(at) => tokio::time::timeout_at(at, read).await.ok(),
            None => Some(read.await),
        };
        let now = origin.elapsed();
        match read {
            None => device.handle_timeout(now),
            Some(Ok(0)) => device.handle_eof(now),
            Some(Ok(_)) => {
                if first.len() < 256 {
                    first.extend_from_slice(&buf[..buf.len().min(256 - first.len())]);
                }
                device.handle_input(&buf, now);
                buf.clear();
            }
            Some(Err(e)) if crate::wire::is_cut(&e) => device.handle_eof(now),
            Some(Err(e)) => return Err(e.into()),
        }
    };
    if let Some(out) = device.poll_transmit() {
        tcp.write_all(&out).await?;
    }
    let conn = device
        .into_connection()
        .expect("established, everything taken");
    Ok((tcp, (conn, limits, origin)))
}

/// What a failed handshake means to the caller. `first`: the server's first bytes.
fn refused(failure: HandshakeFailure, first: &[u8]) -> ClientError {
    match failure {
        HandshakeFailure::Failed(ProtocolError::Frame(e)) => other_protocol(first)
            .map(ClientError::NotTally)
            .unwrap_or(ClientError::Protocol(e.into())),
        HandshakeFailure::Failed(e) => e.into(),
        HandshakeFailure::TimedOut => ClientError::Timeout("handshake"),
        HandshakeFailure::Truncated => ClientError::Truncated,
        _ => ClientError::SessionClosed,
    }
}

/// Runs the session until it ends; returns why.
async fn drive(
    (conn, limits, origin): (Connection, ServerLimits, Instant),
    tcp: TcpStream,
    mut role: ClientRole,
) -> ClientError {
    // A backlog that has not drained within a keepalive interval ends the session.
    let write_stall = conn.config().keepalive.unwrap_or(limits.keepalive);
    let outcome =
        crate::driver::run_connection(conn, origin, tcp.into_split(), &mut role, write_stall).await;
    let end = match outcome {
        crate::driver::Outcome::Ended(_) => role.end.take().unwrap_or(ClientError::SessionClosed),
        crate::driver::Outcome::Io(e) if crate::wire::is_cut(&e) => ClientError::Truncated,
        crate::driver::Outcome::Io(e) => e.into(),
    };
    for (_, p) in role.pending.drain() {
        let _ = p.send(Err(end.clone()));
    }
    if let Some(done) = role.closing.take() {
        let _ = done.send(());
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec 7.4: the client waits for each answer from the frame it answers, not for the
    /// whole exchange. A server that takes 0.6 s for ENROLL_REPLY and 0.6 s more for
    /// ENROLL_DONE is within a 1 s wait for each, though the exchange takes 1.2 s.
    #[tokio::test]
    async fn enrollment_waits_for_each_answer_not_the_whole_exchange() {
        use crate::proto::enroll::{ServerAwaitConfirm, ServerParams};
        use crate::proto::frame::EnrollMode;
        let params = ServerParams {
            static_secret: x25519_dalek::StaticSecret::from([0x21; 32]),
            allow_open: true,
        };
        let token = EnrollmentToken {
            mode: EnrollMode::Open,
            credential: crate::proto::SecretKey::from_bytes([3; 32]),
            server_static: params.static_public(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = BytesMut::new();
            let init = read_frame(&mut tcp, &mut buf, HANDSHAKE_MAX_FRAME_LEN)
                .await
                .unwrap();
            let mut out = BytesMut::new();
            let wait = ServerAwaitConfirm::handle_init(
                &params,
                &init,
                |_, _| crate::proto::SecretKey::from_bytes([3; 32]),
                [4; 32],
                &mut out,
            )
            .unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            tcp.write_all(&out).await.unwrap();
            let confirm = read_frame(&mut tcp, &mut buf, HANDSHAKE_MAX_FRAME_LEN)
                .await
                .unwrap();
            let pending = wait.handle_confirm(&confirm).unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            let mut done = BytesMut::new();
            pending.committed(&mut done);
            tcp.write_all(&done).await.unwrap();
        });
        let id = Id::new("slow-answers").unwrap();
        let options = ClientOptions::default()
            .with_connect_timeout(Duration::from_secs(1))
            .with_retry(Backoff::never());
        let cred = enroll(&addr, &token, id.clone(), &options)
            .await
            .expect("each answer came within 1 s");
        assert_eq!(cred.id, id);
        server.await.unwrap();
    }

    #[test]
    fn every_refusal_says_what_it_can_mean() {
        let codes = [
            (ErrorCode::UNSUPPORTED_VERSION, "version"),
            (ErrorCode::MALFORMED, "could not read"),
            (ErrorCode::AUTH_FAILED, "unknown or revoked"),
            (ErrorCode::ENROLL_REFUSED, "token"),
            (ErrorCode::ID_TAKEN, "enrolled already"),
            (ErrorCode::BUSY, "try again later"),
            (ErrorCode::TAKEOVER_REFUSED, "live session"),
            (ErrorCode::TIMEOUT, "longer than the server allows"),
            (ErrorCode::INTERNAL, "its log says why"),
            (ErrorCode::MODE_REFUSED, "never switches mode"),
            (ErrorCode(0x7777), "does not know"),
        ];
        let mut seen = std::collections::HashSet::new();
        for (code, words) in codes {
            let shown = ClientError::Refused(code).to_string();
            assert!(
                shown.contains(&code.to_string()) && shown.contains(words),
                "{shown}"
            );
            assert!(
                seen.insert(refusal_hint(code)),
                "{code}: the same words as another"
            );
        }
    }

    /// A server that answers every ENROLL_INIT with a valid ENROLL_REPLY, reads the
    /// CONFIRM, then does `after` (nothing, an ERROR, a bad ENROLL_DONE). Returns the
    /// enrollment's result and how many connections the client made.
    async fn enroll_against(after: Vec<u8>) -> (ClientError, usize) {
        use crate::proto::enroll::{ServerAwaitConfirm, ServerParams};
        use x25519_dalek::{PublicKey, StaticSecret};
        let params = ServerParams {
            static_secret: StaticSecret::from([7; 32]),
            allow_open: true,
        };
        let token = EnrollmentToken {
            mode: crate::proto::frame::EnrollMode::Open,
            credential: crate::proto::SecretKey::from_bytes([1; 32]),
            server_static: PublicKey::from(&params.static_secret).to_bytes(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = accepted.clone();
        let credential = token.credential.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = BytesMut::new();
                let init = read_frame(&mut tcp, &mut buf, 256).await.unwrap();
                let mut out = BytesMut::new();
                let _wait = ServerAwaitConfirm::handle_init(
                    &params,
                    &init,
                    |_, _| credential.clone(),
                    [5; 32],
                    &mut out,
                )
                .unwrap();
                tcp.write_all(&out).await.unwrap();
                let _confirm = read_frame(&mut tcp, &mut buf, 256).await.unwrap();
                tcp.write_all(&after).await.unwrap();
                held.push(tcp);
            }
        });
        let options = ClientOptions::default().with_connect_timeout(Duration::from_millis(500));
        let err = enroll(&addr, &token, Id::new("dev").unwrap(), &options)
            .await
            .unwrap_err();
        (err, accepted.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Spec 13.10 and 6.4: once ENROLL_CONFIRM is sent the server may have stored the
    /// identity; whatever happens then (silence, an ERROR, a bad ENROLL_DONE: either could
    /// be injected) the enrollment is uncertain, and the client does not enroll again.
    #[tokio::test]
    async fn an_enrollment_is_not_retried_after_confirm() {
        let busy = vec![0, 0, 0, 4, 0x1f, 0, 6, 1];
        let mut bad_done = vec![0u8; 37];
        bad_done[..5].copy_from_slice(&[0, 0, 0, 33, 0x04]);
        for after in [Vec::new(), busy, bad_done] {
            let (err, connections) = enroll_against(after.clone()).await;
            assert!(
                matches!(err, ClientError::Unconfirmed(_)),
                "{after:?}: {err:?}"
            );
            assert!(!err.is_transient());
            assert_eq!(connections, 1, "no retry after {after:?}");
        }
    }

    #[test]
    fn retry_delays_double_up_to_the_maximum_with_equal_jitter() {
        let r = Backoff::default();
        assert_eq!(r.delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(r.delay(0, 1.0), Duration::from_millis(200));
        assert_eq!(r.delay(2, 1.0), Duration::from_millis(800));
        assert_eq!(r.delay(9, 1.0), r.max_delay);
        assert_eq!(r.delay(40, 0.0), r.max_delay / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_others_are_not() {
        let r = Backoff::new(3, Duration::from_millis(10), Duration::from_millis(40));
        let mut calls = 0;
        let busy = r
            .run("test", || {
                calls += 1;
                async { Err::<(), _>(ClientError::Refused(ErrorCode::BUSY)) }
            })
            .await;
        assert!(matches!(busy, Err(ClientError::Refused(ErrorCode::BUSY))));
        assert_eq!(calls, 4, "the first attempt and three retries");
        let mut calls = 0;
        let auth = r
            .run("test", || {
                calls += 1;
                async { Err::<(), _>(ClientError::AuthFailed) }
            })
            .await;
        assert!(matches!(auth, Err(ClientError::AuthFailed)));
        assert_eq!(calls, 1);
        let mut calls = 0;
        let ok = r
            .run("test", || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(ClientError::Truncated)
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(ok.unwrap(), 3);
    }

    /// A server request that arrived after the last [`Client`] handle was dropped has
    /// no way back to the session: answering it is an error, not a panic.
    #[tokio::test]
    async fn answering_without_a_session_is_an_error() {
        let req = IncomingRequest {
            payload: Bytes::from_static(b"q"),
            seq: 1,
            tx: None,
        };
        assert!(matches!(
            req.respond(Status::OK, Bytes::new()).await,
            Err(ClientError::SessionClosed)
        ));
    }
}
