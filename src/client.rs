//! The client library (tokio): enroll with a token, connect with a credential, send
//! requests and messages, and receive what the server sends.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tally::client::ClientError> {
//! use tally::client::{Client, ClientOptions};
//! use tally::proto::credential::Credential;
//! let cred = Credential::from_file(&std::fs::read_to_string("device.cred").unwrap())?;
//! let (client, mut incoming) = Client::connect(&cred, ClientOptions::default()).await?;
//! let answer = client.request("temperature?").await?;
//! # Ok(()) }
//! ```
//!
//! One task per connection owns the socket and the [`Session`]; [`Client`] is a cheap
//! handle to it. Requests may be issued concurrently; each waits for its own RESPONSE.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{sleep_until, Instant};

use crate::proto::credential::{Credential, CredentialError, EnrollmentToken};
use crate::proto::enroll::ClientAwaitReply;
use crate::proto::error::TagKind;
use crate::proto::handshake::ClientAwaitAuth;
use crate::proto::{
    decode_frame, Body, CloseCode, ErrorCode, Id, ProtocolError, Session, Status,
    DEFAULT_MAX_FRAME_LEN, HANDSHAKE_MAX_FRAME_LEN,
};
use crate::secrets::random_bytes;
use crate::wire::{read_frame, ReadError};

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
    /// The server refused with an (unauthenticated) ERROR frame.
    #[error("refused by the server: {0}")]
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
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(Arc::new(e))
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

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Send a PING after this long without sending anything. Match the server's.
    pub keepalive: Duration,
    /// Session frame limit (spec 3.2). Match the server's.
    pub max_frame_len: u32,
    /// Time for TCP connect plus handshake (or enrollment).
    pub connect_timeout: Duration,
    /// Capacity of the queue of server requests and messages not yet taken.
    pub incoming_capacity: usize,
    /// Retries of a connection attempt that failed for a reason that may pass.
    pub retry: Retry,
}

/// Retries, with jittered exponential backoff, of an attempt that failed for a reason
/// that may pass ([`ClientError::is_transient`]: ERROR BUSY, a connection refused,
/// reset or closed before the server answered, a timeout). Each retry is logged
/// (`tracing`, level WARN) with its reason and delay.
#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    /// Attempts after the first; 0 never retries.
    pub retries: u32,
    /// The first delay; it doubles with each retry, up to `max_delay`. Each delay is
    /// drawn uniformly between half of it and all of it, so that devices refused
    /// together do not come back together.
    pub initial_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            retries: 4,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl Retry {
    /// No retries.
    pub fn never() -> Self {
        Retry {
            retries: 0,
            ..Retry::default()
        }
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
                    let r = random_bytes();
                    let jitter =
                        f64::from(u32::from_le_bytes([r[0], r[1], r[2], r[3]])) / 2f64.powi(32);
                    let delay = self.delay(n, jitter);
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

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            keepalive: Duration::from_secs(30),
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            connect_timeout: Duration::from_secs(10),
            incoming_capacity: 64,
            retry: Retry::default(),
        }
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
/// once the server confirmed it stored the identity.
pub async fn enroll(
    server: &str,
    token: &EnrollmentToken,
    id: Id,
    timeout: Duration,
) -> Result<Credential, ClientError> {
    enroll_with(server, token, id, timeout, &Retry::default()).await
}

/// [`enroll`], retrying as `retry` says while nothing was stored: only failures before
/// ENROLL_CONFIRM was sent are retried.
pub async fn enroll_with(
    server: &str,
    token: &EnrollmentToken,
    id: Id,
    timeout: Duration,
    retry: &Retry,
) -> Result<Credential, ClientError> {
    let what = format!("enrollment of {id} at {server}");
    retry
        .run(&what, || enroll_once(server, token, id.clone(), timeout))
        .await
}

async fn enroll_once(
    server: &str,
    token: &EnrollmentToken,
    id: Id,
    timeout: Duration,
) -> Result<Credential, ClientError> {
    // Set once ENROLL_CONFIRM is on its way: from then on, no failure is retried.
    let confirmed = std::sync::atomic::AtomicBool::new(false);
    let run = async {
        let mut tcp = dial(server).await?;
        let mut buf = BytesMut::new();
        let mut out = BytesMut::new();
        let wait = ClientAwaitReply::start(token.client_params(id), random_bytes(), &mut out);
        tcp.write_all(&out).await?;
        let reply = read_frame(&mut tcp, &mut buf, HANDSHAKE_MAX_FRAME_LEN).await?;
        out.clear();
        let wait = wait.handle_reply(&reply, &mut out)?;
        // From here on the server may store the identity: no retry.
        confirmed.store(true, std::sync::atomic::Ordering::Relaxed);
        let unconfirmed = |e: ClientError| ClientError::Unconfirmed(Box::new(e));
        tcp.write_all(&out)
            .await
            .map_err(|e| unconfirmed(e.into()))?;
        let done = read_frame(&mut tcp, &mut buf, HANDSHAKE_MAX_FRAME_LEN)
            .await
            .map_err(|e| unconfirmed(e.into()))?;
        let (id, key) = wait.handle_done(&done)?;
        let _ = tcp.shutdown().await;
        Ok(Credential {
            id,
            key,
            server: server.to_owned(),
        })
    };
    match tokio::time::timeout(timeout, run).await {
        Ok(r) => r,
        Err(_) if confirmed.load(std::sync::atomic::Ordering::Relaxed) => Err(
            ClientError::Unconfirmed(Box::new(ClientError::Timeout("ENROLL_DONE"))),
        ),
        Err(_) => Err(ClientError::Timeout("enrollment")),
    }
}

/// Something the server sent on its own.
#[derive(Debug)]
pub enum Incoming {
    /// A REQUEST: answer it with [`IncomingRequest::respond`].
    Request(IncomingRequest),
    /// A one-way MESSAGE.
    Message(Bytes),
}

/// Serves what the server sends until the session ends: each REQUEST is answered with
/// `handler(payload)`, run concurrently on its own task; each MESSAGE goes to `on_message`.
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
        }
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
        let open = async {
            let mut tcp = dial(&cred.server).await?;
            let mut buf = BytesMut::new();
            let mut out = BytesMut::new();
            let wait = ClientAwaitAuth::start(&cred.id, cred.key.clone(), random_bytes(), &mut out);
            tcp.write_all(&out).await?;
            let auth = read_frame(&mut tcp, &mut buf, HANDSHAKE_MAX_FRAME_LEN).await?;
            out.clear();
            let session = wait.handle_server_auth(&auth, &mut out, opts.max_frame_len)?;
            Ok::<_, ClientError>((tcp, buf, out, session))
        };
        let (tcp, buf, out, session) = tokio::time::timeout(opts.connect_timeout, open)
            .await
            .unwrap_or(Err(ClientError::Timeout("handshake")))?;
        let (tx, rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(opts.incoming_capacity);
        let (end_tx, end_rx) = watch::channel(None);
        let (rd, wr) = tcp.into_split();
        let conn = Connection {
            rd,
            wr,
            buf,
            out,
            session,
            opts,
            pending: HashMap::new(),
            incoming: in_tx,
            tx: tx.downgrade(),
            closing: None,
        };
        tokio::spawn(async move {
            let end = conn.run(rx).await;
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

/// How long `close` waits for the server's CLOSE.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

struct Connection {
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    buf: BytesMut,
    out: BytesMut,
    session: Session,
    opts: ClientOptions,
    pending: HashMap<u64, Pending>,
    incoming: mpsc::Sender<Incoming>,
    tx: mpsc::WeakSender<Cmd>,
    /// Set once this side sent CLOSE: who to tell when the server's CLOSE arrives.
    closing: Option<Option<oneshot::Sender<()>>>,
}

impl Connection {
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) -> ClientError {
        let end = self.serve(&mut rx).await;
        for (_, p) in self.pending.drain() {
            let _ = p.send(Err(end.clone()));
        }
        if let Some(Some(done)) = self.closing.take() {
            let _ = done.send(());
        }
        end
    }

    async fn serve(&mut self, rx: &mut mpsc::Receiver<Cmd>) -> ClientError {
        let keepalive = self.opts.keepalive;
        let silence_limit = keepalive * 2;
        let mut last_sent = Instant::now();
        let mut last_recv = Instant::now();
        // One timer each, moved only when it fires early (not re-armed per frame).
        let ping = sleep_until(last_sent + keepalive);
        let silence = sleep_until(last_recv + silence_limit);
        let close_wait = sleep_until(last_recv + CLOSE_WAIT);
        tokio::pin!(ping, silence, close_wait);
        let mut commands_open = true;
        let mut close_armed = false;
        loop {
            if let Err(e) = self.handle_buffered() {
                return self.fail(e).await;
            }
            // Writes happen inside the select, so that reading (and every deadline) goes
            // on while the server is slow to read: a server that stops reading cannot
            // hang the session past the silence deadline.
            let writing = !self.out.is_empty();
            tokio::select! {
                r = self.wr.write(&self.out), if writing => match r {
                    Ok(n) => {
                        let _ = self.out.split_to(n);
                        last_sent = Instant::now();
                    }
                    Err(e) if crate::wire::is_cut(&e) => return ClientError::Truncated,
                    Err(e) => return e.into(),
                },
                cmd = rx.recv(), if commands_open && self.closing.is_none() => match cmd {
                    Some(cmd) => self.command(cmd),
                    // Every handle was dropped: end the session politely.
                    None => { commands_open = false; self.start_close(None); }
                },
                r = self.rd.read_buf(&mut self.buf) => match r {
                    // Spec 8.6: EOF or a reset before the server's CLOSE is truncation.
                    Ok(0) => return ClientError::Truncated,
                    Ok(_) => last_recv = Instant::now(),
                    Err(e) if crate::wire::is_cut(&e) => return ClientError::Truncated,
                    Err(e) => return e.into(),
                },
                _ = &mut ping, if self.closing.is_none() => {
                    if last_sent.elapsed() >= keepalive {
                        let _ = self.session.seal(&Body::Ping, &mut self.out);
                        ping.as_mut().reset(Instant::now() + keepalive);
                    } else {
                        ping.as_mut().reset(last_sent + keepalive);
                    }
                }
                _ = &mut silence => {
                    if last_recv.elapsed() >= silence_limit {
                        return ClientError::Timeout("the server sent nothing for two keepalive intervals");
                    }
                    silence.as_mut().reset(last_recv + silence_limit);
                }
                // Spec 8.6: after our CLOSE, wait a short while for the server's.
                _ = &mut close_wait, if close_armed => {
                    return ClientError::Timeout("the server did not answer CLOSE");
                }
            }
            if self.closing.is_some() && !close_armed {
                close_wait.as_mut().reset(Instant::now() + CLOSE_WAIT);
                close_armed = true;
            }
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Request { payload, reply } => {
                match self.session.seal(&Body::Request { payload }, &mut self.out) {
                    Ok(seq) => {
                        self.pending.insert(seq, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            Cmd::Message { payload, sent } => {
                let r = self
                    .session
                    .seal(&Body::Message { payload }, &mut self.out)
                    .map(drop)
                    .map_err(Into::into);
                let _ = sent.send(r);
            }
            Cmd::Respond {
                req_seq,
                status,
                payload,
            } => {
                let _ = self.session.seal(
                    &Body::Response {
                        req_seq,
                        status,
                        payload,
                    },
                    &mut self.out,
                );
            }
            Cmd::Close { done } => self.start_close(Some(done)),
        }
    }

    fn start_close(&mut self, done: Option<oneshot::Sender<()>>) {
        let _ = self.session.seal(
            &Body::Close {
                code: CloseCode::NORMAL,
                reason: String::new(),
            },
            &mut self.out,
        );
        self.closing = Some(done);
    }

    /// Handles every complete frame in the buffer. `Err` ends the session.
    fn handle_buffered(&mut self) -> Result<(), Ended> {
        loop {
            let frame = match decode_frame(&mut self.buf, self.opts.max_frame_len) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(e) => return Err(Ended::Violation(e.into())),
            };
            let frame = self.session.open(frame).map_err(Ended::Violation)?;
            match frame.body {
                Body::Response {
                    req_seq,
                    status,
                    payload,
                } => match self.pending.remove(&req_seq) {
                    Some(p) => {
                        let _ = p.send(Ok((status, payload)));
                    }
                    // Spec 8.4: a RESPONSE to nothing pending is a protocol error.
                    None => {
                        return Err(Ended::Violation(ProtocolError::UnsolicitedAnswer {
                            what: "RESPONSE",
                            got: req_seq,
                            last_sent: self.session.last_sent(),
                        }))
                    }
                },
                Body::Request { payload } => {
                    let req = IncomingRequest {
                        payload,
                        seq: frame.seq,
                        tx: self.tx.upgrade(),
                    };
                    // Nobody listening, or a full queue: the request is answered UNAVAILABLE by Drop.
                    let _ = self.incoming.try_send(Incoming::Request(req));
                }
                Body::Message { payload } => {
                    let _ = self.incoming.try_send(Incoming::Message(payload));
                }
                Body::Ping => {
                    let _ = self.session.seal(
                        &Body::Pong {
                            ping_seq: frame.seq,
                        },
                        &mut self.out,
                    );
                }
                Body::Pong { .. } => {}
                Body::Close { code, reason } => return Err(Ended::PeerClosed(code, reason)),
            }
        }
    }

    /// Ends the session: answers CLOSE (spec 8.6) or reports a violation with CLOSE.
    async fn fail(&mut self, ended: Ended) -> ClientError {
        let (reply, end) = match ended {
            Ended::PeerClosed(code, reason) => {
                let end = if self.closing.is_some() {
                    ClientError::SessionClosed
                } else {
                    ClientError::Closed { code, reason }
                };
                (CloseCode::NORMAL, end)
            }
            // Spec 8.3: an injected ERROR means the connection is not the server's any
            // more; end it as a cut, without a CLOSE.
            Ended::Violation(ProtocolError::InjectedError(_)) => {
                let _ = self.wr.shutdown().await;
                return ClientError::Truncated;
            }
            Ended::Violation(e) => (e.close_code(), ClientError::from(e)),
        };
        if self.session.can_send() {
            let _ = self.session.seal(
                &Body::Close {
                    code: reply,
                    reason: String::new(),
                },
                &mut self.out,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.wr.write_all(&self.out)).await;
        let _ = self.wr.shutdown().await;
        end
    }
}

enum Ended {
    PeerClosed(CloseCode, String),
    Violation(ProtocolError),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec 13.10: once ENROLL_CONFIRM is sent the server may have stored the identity;
    /// a server that never answers DONE must not make the client enroll again.
    #[tokio::test]
    async fn an_enrollment_is_not_retried_after_confirm() {
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
            // Answers every ENROLL_INIT with a valid ENROLL_REPLY, reads the CONFIRM,
            // and then says nothing.
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
                held.push(tcp);
            }
        });
        let err = enroll_with(
            &addr,
            &token,
            Id::new("dev").unwrap(),
            Duration::from_millis(500),
            &Retry::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::Unconfirmed(_)), "{err:?}");
        assert!(!err.is_transient());
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "no retry"
        );
    }

    #[test]
    fn retry_delays_double_up_to_the_maximum_with_equal_jitter() {
        let r = Retry::default();
        assert_eq!(r.delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(r.delay(0, 1.0), Duration::from_millis(200));
        assert_eq!(r.delay(2, 1.0), Duration::from_millis(800));
        assert_eq!(r.delay(9, 1.0), r.max_delay);
        assert_eq!(r.delay(40, 0.0), r.max_delay / 2);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_and_others_are_not() {
        let r = Retry {
            retries: 3,
            initial_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
        };
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
