//! One connection before it is a session: enrollment (spec 6) or the session handshake
//! (spec 7), under the handshake deadline. Every failure is answered with an ERROR
//! frame (spec 10.1), logged with its precise reason, and ends only this connection.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::admission::Ticket;
use super::registry::{Entry, Mailbox, RegisterError};
use super::session;
use super::tarpit::Farewell;
use super::ServerState;
use crate::proto::enroll::InitReceived;
use crate::proto::frame::{EnrollInit, EnrollMode, ErrorFrame, FrameType, Mode};
use crate::proto::handshake::{Established, HelloReceived, ServerLimits};
use crate::proto::{ErrorCode, FrameError, ProtocolError, SecretKey, HANDSHAKE_MAX_FRAME_LEN};
use crate::secrets::random_bytes;
use crate::server::fleet::ClaimError;
use crate::store::{now, NoCredential, StoreError};
use crate::wire::{read_frame, ReadError};

/// Why a connection ended before becoming a session.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("first frame is {0}, not ENROLL_INIT, HELLO or SEALED_HELLO")]
    FirstFrame(String),
    #[error("{0} mode refused by this daemon's policy (encryption = \"{1}\" in its configuration); the device must be configured for the other mode")]
    ModeRefused(Mode, &'static str),
    #[error("session handshake failed: unknown or revoked identity {0}")]
    UnknownIdentity(Claimed),
    #[error("peer closed after SERVER_AUTH for unknown or revoked identity {0}")]
    UnknownAbandoned(Claimed),
    #[error("CLIENT_FINISH for identity {0} did not verify: wrong key, or a replayed handshake")]
    BadFinish(Claimed),
    #[error("device {0} abandoned the handshake after SERVER_AUTH (no CLIENT_FINISH): its key may not match (re-enrolled elsewhere, or a stale credential?), or it stopped or lost its connection")]
    Abandoned(Claimed),
    #[error("enrollment of {id} ({mode} mode) refused: {why}")]
    EnrollRefused {
        id: crate::proto::Id,
        mode: &'static str,
        why: &'static str,
    },
    #[error("identity {0} is already enrolled")]
    Taken(crate::proto::Id),
    #[error("identity store failed: {0}")]
    Store(String),
    #[error("no complete first frame within {0:?} (limits.first_frame_timeout)")]
    FirstFrameDeadline(Duration),
    #[error("handshake deadline of {0:?} passed (limits.handshake_timeout)")]
    Deadline(Duration),
    #[error("too many enrollments at once ({0})")]
    EnrollBusy(&'static str),
    #[error("no ENROLL_CONFIRM within {0:?} of ENROLL_REPLY (limits.first_frame_timeout)")]
    ConfirmDeadline(Duration),
}

/// The identity a handshake claimed: `None` for a SEALED_HELLO whose id did not open
/// (sealed to another server key, or forged), answered as an unknown id (spec 7.5).
#[derive(Debug)]
struct Claimed(Option<crate::proto::Id>);

impl std::fmt::Display for Claimed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(id) => id.fmt(f),
            None => f.write_str("(a sealed id that does not open with this daemon's key: a device enrolled with another server, or a forgery)"),
        }
    }
}

impl Refusal {
    /// The ERROR code to send, or `None` when the peer is gone.
    fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            Refusal::Read(ReadError::Eof | ReadError::Truncated | ReadError::Io(_)) => return None,
            Refusal::Read(ReadError::Frame(_)) | Refusal::FirstFrame(_) => ErrorCode::MALFORMED,
            Refusal::Protocol(e) => e.error_code(),
            Refusal::ModeRefused(..) => ErrorCode::MODE_REFUSED,
            Refusal::UnknownIdentity(_) => ErrorCode::AUTH_FAILED,
            // Spec 7.5: a peer that closes after SERVER_AUTH gets nothing, whether or not
            // the id is known: the reply depends only on what the peer sent.
            Refusal::UnknownAbandoned(_) | Refusal::Abandoned(_) => return None,
            Refusal::EnrollRefused { .. } => ErrorCode::ENROLL_REFUSED,
            Refusal::BadFinish(_) => ErrorCode::AUTH_FAILED,
            Refusal::Taken(_) => ErrorCode::ID_TAKEN,
            Refusal::Store(_) => ErrorCode::INTERNAL,
            Refusal::Deadline(_) | Refusal::FirstFrameDeadline(_) | Refusal::ConfirmDeadline(_) => {
                ErrorCode::TIMEOUT
            }
            Refusal::EnrollBusy(_) => ErrorCode::BUSY,
        })
    }

    /// A short name, for the refusal summaries.
    fn kind(&self) -> &'static str {
        match self {
            Refusal::Read(ReadError::Eof | ReadError::Truncated | ReadError::Io(_)) => {
                "closed by the peer"
            }
            Refusal::Read(ReadError::Frame(_)) | Refusal::FirstFrame(_) => "malformed",
            Refusal::Protocol(_) => "protocol error",
            Refusal::ModeRefused(..) => "mode refused",
            Refusal::UnknownIdentity(_) | Refusal::UnknownAbandoned(_) => "unknown identity",
            Refusal::BadFinish(_) | Refusal::Abandoned(_) => "wrong key",
            Refusal::EnrollRefused { .. } | Refusal::Taken(_) => "enrollment refused",
            Refusal::Store(_) => "store error",
            Refusal::FirstFrameDeadline(_) => "first-frame deadline",
            Refusal::Deadline(_) | Refusal::ConfirmDeadline(_) => "handshake deadline",
            Refusal::EnrollBusy(_) => "enrollments busy",
        }
    }
}

/// How a connection that did not fail before becoming a session went.
enum Opened {
    /// A session, with the instant its key lookup started and the position of the
    /// key it was made with.
    Session(Established, Instant, KeyRef),
    /// An enrollment whose ENROLL_CONFIRM verified: to be stored, then answered.
    Confirmed(Box<Commit>),
}

/// A verified enrollment not yet stored. Its commit runs outside the deadlines and the
/// pool of unauthenticated slots: once the device has confirmed, cancelling the store
/// midway would leave it unsure whether it is enrolled.
struct Commit {
    pending: crate::proto::enroll::PendingIdentity,
    id: crate::proto::Id,
    mode: EnrollMode,
    token_ref: Option<Vec<u8>>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The byte stream of one connection, with its read buffer.
pub(super) struct Stream {
    pub rd: OwnedReadHalf,
    pub wr: OwnedWriteHalf,
    pub buf: BytesMut,
    pub peer: SocketAddr,
}

impl Stream {
    /// Hands a stranger's connection to the tarpit, to end with `farewell` when due. The
    /// halves are put together first: dropping them would shut the write half down (a
    /// FIN, a packet the daemon pays for, before the reset).
    fn park(self, state: &ServerState, farewell: Farewell) {
        if let Ok(tcp) = self.rd.reunite(self.wr) {
            state.tarpit.park(tcp, farewell, Instant::now());
        }
    }

    async fn read(&mut self) -> Result<Bytes, ReadError> {
        read_frame(&mut self.rd, &mut self.buf, HANDSHAKE_MAX_FRAME_LEN).await
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), ReadError> {
        Ok(self.wr.write_all(bytes).await?)
    }

    /// Sends ERROR `code` now and ends the connection gently. Bounded in time: the
    /// connection still holds a `max_connections` permit.
    async fn answer(&mut self, code: ErrorCode) {
        let mut out = BytesMut::new();
        ErrorFrame::new(code).encode(&mut out);
        let sent = tokio::time::timeout(Duration::from_secs(1), self.write(&out)).await;
        if matches!(sent, Ok(Ok(()))) {
            self.linger(Duration::from_millis(250)).await;
        }
    }

    /// Ends the connection gently: FIN, then read (and drop) until the peer closes, so
    /// the last frame sent is not destroyed by a reset. Bounded in time.
    pub async fn linger(&mut self, max: Duration) {
        let _ = self.wr.shutdown().await;
        // On the heap: an array here would sit in every connection task's state for its
        // whole life.
        let mut sink = vec![0u8; 1024];
        let _ = tokio::time::timeout(max, async {
            while matches!(self.rd.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// Answers a connection over a limit with ERROR BUSY, if its socket takes it at once,
/// and closes it: no task and no wait for a peer that may not read.
pub(super) fn refuse_busy(stream: TcpStream) {
    let mut out = BytesMut::new();
    ErrorFrame::new(ErrorCode::BUSY).encode(&mut out);
    let _ = stream.try_write(&out);
}

/// An established session's future (see [`session::run`]), on the heap at its own size.
pub(super) type LiveSession = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves one connection until it is a session (returned, to be run) or has ended.
/// `ticket` is its unauthenticated slot, returned as soon as the connection is a session
/// or has failed (before any linger).
///
/// The caller holds this future on the heap and drops it before it runs the session:
/// the handshake's state (this future's size) is not kept for the session's life.
pub(super) async fn serve(
    state: Arc<ServerState>,
    tcp: TcpStream,
    peer: SocketAddr,
    ticket: Ticket,
    shutdown: CancellationToken,
) -> Option<LiveSession> {
    let _ = tcp.set_nodelay(true);
    let (rd, wr) = tcp.into_split();
    let mut stream = Stream {
        rd,
        wr,
        buf: BytesMut::with_capacity(256),
        peer,
    };
    let outcome = tokio::select! {
        _ = shutdown.cancelled() => return None,
        // Counted and logged when it was evicted; reset without a word (no FIN handshake
        // and no TIME_WAIT for a stranger's connection).
        _ = ticket.evicted() => {
            stream.park(&state, Farewell::Reset);
            return None;
        }
        r = Box::pin(open(&state, &mut stream, &ticket)) => r,
    };
    drop(ticket);
    match outcome {
        Ok(Opened::Confirmed(commit)) => {
            match Box::pin(commit_enrollment(&state, &mut stream, *commit)).await {
                Ok(()) => stream.linger(Duration::from_secs(1)).await,
                // After a valid ENROLL_CONFIRM: the device itself, answered at once.
                Err(refusal) => {
                    if let Some(code) = refuse(&state, &stream, refusal) {
                        stream.answer(code).await;
                    }
                }
            }
        }
        Ok(Opened::Session(est, key_lookup, key)) => {
            return start_session(state, stream, est, (key_lookup, key), shutdown).await;
        }
        Err(refusal) => {
            if let Some(code) = refuse(&state, &stream, refusal) {
                // Answered late, from the tarpit (limits.refusal_delay): a stranger that
                // reconnects whenever refused must not set the pace of the daemon's work.
                stream.park(&state, Farewell::Error(code));
            }
        }
    }
    None
}

/// Logs (or counts) a refusal; returns the ERROR to answer it with, if any.
fn refuse(state: &ServerState, stream: &Stream, refusal: Refusal) -> Option<ErrorCode> {
    let peer = stream.peer;
    let full = state.note_refusal(refusal.kind(), &peer);
    match refusal {
        Refusal::Read(ReadError::Eof) => {
            debug!("connection closed before a handshake")
        }
        ref r if full => warn!(reason = %r, "refused"),
        ref r => debug!(reason = %r, "refused"),
    }
    refusal.code()
}

/// Reads the first frame (under `limits.first_frame_timeout`) and runs enrollment or
/// the session handshake (under `limits.handshake_timeout`).
async fn open(
    state: &ServerState,
    stream: &mut Stream,
    ticket: &Ticket,
) -> Result<Opened, Refusal> {
    let limits = state.limits();
    let first = tokio::time::timeout(limits.first_frame_timeout, stream.read())
        .await
        .map_err(|_| Refusal::FirstFrameDeadline(limits.first_frame_timeout))??;
    ticket.framed();
    let rest = async {
        match FrameType::of(&first) {
            Ok(FrameType::EnrollInit) => enroll(state, stream, &first)
                .await
                .map(|c| Opened::Confirmed(Box::new(c))),
            Ok(FrameType::Hello | FrameType::SealedHello) => handshake(state, stream, &first)
                .await
                .map(|(est, at, key)| Opened::Session(est, at, key)),
            Ok(other) => Err(Refusal::FirstFrame(format!("{other:?}"))),
            Err(e) => Err(Refusal::Protocol(e.into())),
        }
    };
    tokio::time::timeout(limits.handshake_timeout, rest)
        .await
        .unwrap_or(Err(Refusal::Deadline(limits.handshake_timeout)))
}

/// Runs a store call on the blocking pool (every store method blocks).
async fn on_store<T: Send + 'static>(
    state: &ServerState,
    call: impl FnOnce(&crate::store::Store) -> T + Send + 'static,
) -> Result<T, Refusal> {
    let store = state.store.clone();
    tokio::task::spawn_blocking(move || call(&store))
        .await
        .map_err(|e| Refusal::Store(e.to_string()))
}

fn store_failed(e: StoreError) -> Refusal {
    Refusal::Store(e.to_string())
}

/// Spec 6.3, the server side of enrollment.
async fn enroll(state: &ServerState, stream: &mut Stream, init: &[u8]) -> Result<Commit, Refusal> {
    // In a fleet, open enrollment is the fleet's decision (its log), not this node's.
    let open = state.open_enrollment();
    let decided;
    let params = if open == state.params.allow_open {
        &state.params
    } else {
        decided = crate::proto::enroll::ServerParams {
            static_secret: state.params.static_secret.clone(),
            allow_open: open,
        };
        &decided
    };
    let init = match InitReceived::parse(params, init) {
        // Named with the id it claimed: the operator can tell which device still uses
        // the open token.
        Err(ProtocolError::OpenModeDisabled) => {
            let id = EnrollInit::decode(init).map(|i| i.id)?;
            return Err(Refusal::EnrollRefused {
                id,
                mode: EnrollMode::Open.as_str(),
                why: if state.fleet.is_some() {
                    "open enrollment is off for the fleet (`tallyd open-enrollment on` turns it on): issue this device a per-identity token with `tallyd token --id`"
                } else {
                    "open enrollment is off (open_enrollment = false): issue this device a per-identity token with `tallyd token --id`"
                },
            });
        }
        r => r?,
    };
    if let Some(limit) = state.enroll_budget_spent() {
        return Err(Refusal::EnrollBusy(limit));
    }
    let (id, mode) = (init.id().clone(), init.mode());
    let lookup_id = id.clone();
    let lookup = on_store(state, move |s| s.enroll_lookup(mode, &lookup_id, now()))
        .await?
        .map_err(store_failed)?;
    let refused = |why| Refusal::EnrollRefused {
        id: id.clone(),
        mode: mode.as_str(),
        why,
    };
    // Spec 6.2 step 2: the tag is checked before any X25519, against a filler when the
    // server holds no credential for this id, so every stranger costs one HMAC.
    let missing = lookup.credential.as_ref().err().copied();
    let verified = match init.verify(
        lookup.credential.ok(),
        SecretKey::from_bytes(random_bytes()),
    ) {
        Ok(v) => v,
        Err(ProtocolError::BadTag(_)) => {
            return Err(refused(match missing {
                Some(NoCredential::NoToken) => "no token is outstanding for this id (never issued, already used, revoked or replaced by a newer one)",
                Some(NoCredential::Expired) => "its token expired; issue a new one with `tallyd token --id`",
                None if mode == EnrollMode::Open => "wrong open token (rotated, or from another server)",
                None => "wrong token (made for another id, or replaced by a newer one)",
            }))
        }
        Err(e) => return Err(e.into()),
    };
    // Spec 6.2: an enrolled id is refused before any X25519, so a replayed ENROLL_INIT
    // costs one HMAC, not two DH operations.
    if lookup.enrolled {
        return Err(Refusal::Taken(id));
    }
    // Only a proven credential spends the enrollment budget.
    let permit = state.try_enroll().map_err(Refusal::EnrollBusy)?;
    let mut out = BytesMut::new();
    let wait = verified.reply(&state.params, random_bytes(), &mut out)?;
    stream.write(&out).await?;
    // ENROLL_CONFIRM follows one round trip later. A short deadline: a replayed
    // ENROLL_INIT of an unfinished enrollment still verifies (spec 6.5), and must not
    // hold one of the few enrollment permits for the whole handshake deadline.
    let wait_confirm = state.limits().first_frame_timeout;
    let confirm = tokio::time::timeout(wait_confirm, stream.read())
        .await
        .map_err(|_| Refusal::ConfirmDeadline(wait_confirm))??;
    let pending = wait.handle_confirm(&confirm)?;
    Ok(Commit {
        pending,
        id,
        mode,
        token_ref: lookup.token_ref,
        _permit: permit,
    })
}

/// Stores a confirmed enrollment and, once the commit is durable, sends ENROLL_DONE
/// (spec 6.2 step 4).
async fn commit_enrollment(
    state: &ServerState,
    stream: &mut Stream,
    commit: Commit,
) -> Result<(), Refusal> {
    let Commit {
        pending,
        id,
        mode,
        token_ref,
        _permit,
    } = commit;
    let key = pending.identity_key().clone();
    let insert_id = id.clone();
    let stored = on_store(state, move |s| {
        s.insert(&insert_id, &key, mode, token_ref.as_deref())
    })
    .await?;
    match stored {
        Ok(_generation) => {}
        Err(StoreError::Taken(id)) => return Err(Refusal::Taken(id)),
        Err(StoreError::TokenGone(_)) => {
            return Err(Refusal::EnrollRefused {
                id,
                mode: mode.as_str(),
                why: "its token was revoked, replaced or used by another enrollment meanwhile",
            })
        }
        Err(e) => return Err(store_failed(e)),
    }
    // Durable now (synchronous = FULL).
    let mut out = BytesMut::new();
    pending.committed(&mut out);
    tracing::Span::current().record("id", tracing::field::display(&id));
    state.metrics.enrollment();
    info!(mode = mode.as_str(), "enrolled");
    // Stored whether or not DONE arrives (spec 6.4: the device retries with a handshake).
    let _ = stream.write(&out).await;
    Ok(())
}

/// Spec 7.2, the server side of the session handshake.
async fn handshake(
    state: &ServerState,
    stream: &mut Stream,
    hello: &[u8],
) -> Result<(Established, Instant, KeyRef), Refusal> {
    // Spec 7.2 row 4a: the policy decides on the first frame's type alone, before the
    // X25519 work of a SEALED_HELLO.
    let policy = state.encryption;
    match HelloReceived::check_mode(hello, |mode| policy.accepts(mode)) {
        Err(ProtocolError::ModeRefused(mode)) => {
            return Err(Refusal::ModeRefused(mode, policy.as_str()))
        }
        other => other?,
    };
    let hello = HelloReceived::parse(hello, &state.server_key)?;
    let id = hello.id().cloned();
    // A revocation or removal committed after this instant is caught at registration.
    let key_lookup = Instant::now();
    // In memory (the daemon loads the index at start): a flood of HELLOs never queues
    // devices' lookups behind its own on a blocking pool.
    let key = match &id {
        Some(id) => match state.store.cached_key(id) {
            Some(found) => found,
            None => {
                let lookup = id.clone();
                on_store(state, move |s| s.key(&lookup)).await?
            }
        }
        .map_err(store_failed)?,
        // Spec 7.5: a sealed id that did not open is answered as an unknown id, from a
        // decoy key unsealed like any other, so that the work is the same.
        None => state.store.decoy_key().map_err(store_failed)?,
    };
    let id = Claimed(id);
    let known = key.is_some();
    let key_ref = KeyRef {
        log_pos: key.as_ref().map_or(0, |k| k.log_pos),
        generation: key.as_ref().map_or(0, |k| k.generation),
    };
    let mut out = BytesMut::new();
    // Spec 7.5: an unknown or revoked identity gets the same reply, from a random key.
    let limits = state.limits();
    let wait = hello.respond(
        key.map(|k| k.key),
        SecretKey::from_bytes(random_bytes()),
        &mut random_bytes(),
        ServerLimits {
            max_frame_len: limits.max_frame_len,
            keepalive: limits.keepalive,
        },
        &mut out,
    );
    stream.write(&out).await?;
    // A client that cannot verify SERVER_AUTH closes without a finish (spec 7.2).
    let finish = match stream.read().await {
        Ok(f) => f,
        Err(ReadError::Eof | ReadError::Truncated) if !known => {
            return Err(Refusal::UnknownAbandoned(id))
        }
        Err(ReadError::Eof | ReadError::Truncated) => return Err(Refusal::Abandoned(id)),
        Err(e) => return Err(e.into()),
    };
    match wait.handle_finish(&finish) {
        Ok(est) => Ok((est, key_lookup, key_ref)),
        Err(ProtocolError::BadTag(_)) if !known => Err(Refusal::UnknownIdentity(id)),
        Err(ProtocolError::BadTag(_)) => Err(Refusal::BadFinish(id)),
        Err(e) => Err(e.into()),
    }
}

/// Registers an authenticated connection's session: the session's future, to run on
/// the connection's task, or `None` if it was refused (and answered).
async fn start_session(
    state: Arc<ServerState>,
    stream: Stream,
    est: Established,
    (
        key_lookup,
        KeyRef {
            log_pos,
            generation,
        },
    ): (Instant, KeyRef),
    shutdown: CancellationToken,
) -> Option<LiveSession> {
    let Established {
        id,
        session,
        verified,
    } = est;
    // Authenticated (CLIENT_FINISH verified): from here on every line names it.
    tracing::Span::current().record("id", tracing::field::display(&id));
    let mut stream = stream;
    // In a fleet, the identity is claimed across the nodes first (spec 7.3 fleet-wide),
    // one handshake of an identity at a time on this node, so that this node's claims
    // and registrations of it come in one order.
    let (epoch, claiming) = match &state.fleet {
        None => (0, None),
        Some(fleet) => match fleet.claim(&id, stream.peer).await {
            Ok((granted, claiming)) => (granted.epoch, Some(claiming)),
            Err(e) => {
                let code = match e {
                    ClaimError::Held { .. } => ErrorCode::TAKEOVER_REFUSED,
                    ClaimError::Fenced | ClaimError::Unavailable(_) | ClaimError::Crowded => {
                        ErrorCode::BUSY
                    }
                };
                warn!("refused: {e}");
                answer_refused(&mut stream, code).await;
                return None;
            }
        },
    };
    let conn = state.registry.next_conn();
    let mailbox = Arc::new(Mailbox::of_enrollment(generation));
    let entry = Entry {
        conn,
        epoch,
        log_pos,
        peer: stream.peer,
        since: SystemTime::now(),
        mailbox: mailbox.clone(),
    };
    // In a fleet, the state machine admits the claim and the registry registers the
    // session under one lock; else the claim is released (or kept for an older session
    // of the id live here), and the next handshake of the id need not wait for this
    // one's farewell.
    let register = || {
        state
            .registry
            .register(&verified, &id, entry, state.takeover, key_lookup)
    };
    let registered = match claiming {
        Some(claiming) => claiming.register(register),
        None => register(),
    };
    let registration = match registered {
        Ok(r) => r,
        Err(e) => {
            let code = match e {
                RegisterError::TakeoverRefused | RegisterError::Superseded => {
                    ErrorCode::TAKEOVER_REFUSED
                }
                // The same answer as for a revoked identity (spec 7.5).
                RegisterError::Invalidated => ErrorCode::AUTH_FAILED,
                RegisterError::TooLate | RegisterError::Fenced => ErrorCode::BUSY,
            };
            warn!("refused: {e}");
            answer_refused(&mut stream, code).await;
            return None;
        }
    };
    state.note_seen(&id);
    state.metrics.handshake();
    // Per-session lines are debug: at the default level a line per session would cost
    // the daemon more than the handshake does (a write to the journal each). Sessions
    // that end abnormally are logged at info when they end.
    debug!("session started");
    Some(Box::pin(session::run(
        state,
        id,
        session,
        (stream.rd, stream.wr, stream.buf),
        mailbox,
        registration,
        shutdown,
    )))
}

/// Which key a handshake used: its place in a fleet's log, and its enrollment.
#[derive(Debug, Clone, Copy)]
struct KeyRef {
    log_pos: u64,
    generation: u64,
}

/// Answers an authenticated connection that gets no session with ERROR `code`.
async fn answer_refused(stream: &mut Stream, code: ErrorCode) {
    let mut out = BytesMut::new();
    ErrorFrame::new(code).encode(&mut out);
    if stream.write(&out).await.is_ok() {
        stream.linger(Duration::from_secs(1)).await;
    }
}

impl From<FrameError> for Refusal {
    fn from(e: FrameError) -> Self {
        Refusal::Protocol(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without making one.
    fn future_size<A, F: Future>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// Issue 13: an idle session costs its future's size for its whole life. The
    /// connection's task holds the session's future alone (the handshake's, 1.1 KiB, is
    /// dropped first), and that future is about 1.2 KiB (it was 2.2 KiB inside a
    /// 1.1 KiB task before the driver was written out as its own future). A bound with
    /// some room for compiler versions: a change that pushes past it costs every idle
    /// session as much, and should be measured (`tally bench --mode idle`).
    #[test]
    fn an_idle_session_holds_only_its_own_future() {
        type Session = (
            Arc<ServerState>,
            crate::proto::Id,
            crate::proto::Session,
            (OwnedReadHalf, OwnedWriteHalf, BytesMut),
            Arc<Mailbox>,
            crate::server::registry::Registration,
            CancellationToken,
        );
        let live = future_size(|(a, b, c, d, e, f, g): Session| session::run(a, b, c, d, e, f, g));
        assert!(live <= 1400, "the session's future is {live} bytes");
        type Serve = (
            Arc<ServerState>,
            TcpStream,
            SocketAddr,
            Ticket,
            CancellationToken,
        );
        let handshake = future_size(|(a, b, c, d, e): Serve| serve(a, b, c, d, e));
        assert!(
            handshake > 2 * std::mem::size_of::<LiveSession>(),
            "serve is boxed and dropped before the session: only worth it while it is large"
        );
    }
}
