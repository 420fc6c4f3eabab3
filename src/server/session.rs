//! A server-side session (spec 8): frames in, backend calls, responses out.
//!
//! One task owns the connection and its [`Session`]. It reads only while fewer than
//! `max_in_flight` requests are with the backend (back-pressure, not buffering), and
//! ends on the peer's CLOSE, a command (takeover, revocation), the idle deadline, a
//! protocol failure, EOF, or shutdown (after draining in-flight requests).

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::conn::Stream;
use super::registry::{CloseAsk, Command, Stats};
use super::ServerState;
use crate::backend::{Reply, Request};
use crate::config::Limits;
use crate::proto::{
    decode_frame, Body, CloseCode, Id, ProtocolError, Session, SessionFrame, Status,
};

/// How a session ended, for the log.
#[derive(Debug)]
pub(super) enum End {
    /// The device sent CLOSE.
    PeerClosed(CloseCode, String),
    /// This side sent CLOSE.
    Closed(CloseCode, &'static str),
    /// The device broke a rule; CLOSE was sent.
    Failed(ProtocolError),
    /// EOF without CLOSE.
    Truncated,
    /// The socket failed.
    Io(std::io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::PeerClosed(code, reason) => write!(f, "closed by device: {code} {reason:?}"),
            End::Closed(code, reason) => write!(f, "closed by server: {code}: {reason}"),
            End::Failed(e) => write!(f, "protocol error: {e}"),
            End::Truncated => f.write_str("truncated: connection ended without CLOSE"),
            End::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

type Answer = oneshot::Sender<Result<Reply, String>>;

pub(super) struct SessionTask {
    state: Arc<ServerState>,
    id: Id,
    session: Session,
    stream: Stream,
    out: BytesMut,
    commands: mpsc::Receiver<Command>,
    close_signal: watch::Receiver<CloseAsk>,
    stats: Arc<Stats>,
    /// Backend work: requests yield `Some((seq, reply))`, messages `None`.
    inflight: JoinSet<Option<(u64, Reply)>>,
    inflight_seq: HashMap<tokio::task::Id, u64>,
    /// Server-initiated requests waiting for the device's RESPONSE.
    pending: HashMap<u64, Answer>,
    limits: Limits,
    paused_logged: bool,
}

impl SessionTask {
    pub(super) fn new(
        state: Arc<ServerState>,
        id: Id,
        session: Session,
        stream: Stream,
        commands: mpsc::Receiver<Command>,
        close_signal: watch::Receiver<CloseAsk>,
        stats: Arc<Stats>,
    ) -> Self {
        let limits = state.limits();
        SessionTask {
            state,
            id,
            session,
            stream,
            out: BytesMut::new(),
            commands,
            close_signal,
            stats,
            inflight: JoinSet::new(),
            inflight_seq: HashMap::new(),
            pending: HashMap::new(),
            limits,
            paused_logged: false,
        }
    }

    /// Runs the session to its end.
    pub(super) async fn run(mut self, shutdown: CancellationToken) -> End {
        let idle_timeout = self.limits.idle_timeout();
        // One timer for the idle deadline, moved only when it fires early: re-arming it
        // for every frame would cost a timer-wheel update per request.
        let mut last_frame = Instant::now();
        let idle = sleep_until(last_frame + idle_timeout);
        tokio::pin!(idle);
        let mut drain: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        // Shutdown and close requests are waited on by futures made once per session, so
        // that no waiter is registered and removed again on every loop iteration.
        let shutting_down = shutdown.cancelled();
        let mut close_rx = self.close_signal.clone();
        let close_asked = async move {
            loop {
                if let Some(asked) = *close_rx.borrow_and_update() {
                    return asked;
                }
                if close_rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        };
        tokio::pin!(shutting_down, close_asked);
        loop {
            // Frames already buffered (pipelined) are handled before reading more.
            if drain.is_none() {
                match self.handle_buffered() {
                    Ok(0) => {}
                    Ok(_) => last_frame = Instant::now(),
                    Err(end) => return self.finish(end).await,
                }
            }
            if let Err(e) = self.flush().await {
                return End::Io(e);
            }
            if drain.is_some() && self.inflight.is_empty() {
                return self
                    .close(CloseCode::SHUTDOWN, "server shutting down")
                    .await;
            }
            let full = self.inflight.len() >= self.limits.max_in_flight;
            if full && !self.paused_logged {
                info!(id = %self.id, limit = self.limits.max_in_flight, "in-flight request limit reached (limits.max_in_flight): reading paused until the backend answers");
                self.paused_logged = true;
            }
            let can_read = drain.is_none() && !full;
            tokio::select! {
                biased;
                _ = &mut shutting_down, if drain.is_none() => {
                    drain = Some(Box::pin(tokio::time::sleep(self.limits.drain_timeout)));
                }
                (code, reason) = &mut close_asked => return self.close(code, reason).await,
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Request { payload, reply }) => self.send_request(payload, reply),
                    Some(Command::Message { payload, sent }) => {
                        let _ = sent.send(self.seal(&Body::Message { payload }).map(drop).map_err(|e| e.to_string()));
                    }
                    None => {}
                },
                Some(done) = self.inflight.join_next_with_id(), if !self.inflight.is_empty() => self.answer(done),
                r = self.stream.rd.read_buf(&mut self.stream.buf), if can_read => match r {
                    // Spec 8.6: EOF before CLOSE is truncation, never an orderly end.
                    Ok(0) => return End::Truncated,
                    Ok(_) => {}
                    Err(e) => return End::Io(e),
                },
                _ = &mut idle, if drain.is_none() => {
                    if last_frame.elapsed() < idle_timeout {
                        idle.as_mut().reset(last_frame + idle_timeout);
                        continue;
                    }
                    warn!(id = %self.id, idle = ?idle_timeout, "closing idle session (1.5x limits.keepalive without a frame)");
                    return self.close(CloseCode::IDLE_TIMEOUT, "no frame within the idle deadline").await;
                }
                _ = async { drain.as_mut().expect("draining").await }, if drain.is_some() => {
                    warn!(id = %self.id, abandoned = self.inflight.len(), "drain deadline passed (limits.drain_timeout); closing with requests unanswered");
                    return self.close(CloseCode::SHUTDOWN, "server shutting down").await;
                }
            }
        }
    }

    /// Handles complete frames in the read buffer while the in-flight limit allows.
    /// Returns how many frames were accepted.
    fn handle_buffered(&mut self) -> Result<usize, End> {
        let mut n = 0;
        while self.inflight.len() < self.limits.max_in_flight {
            let frame = match decode_frame(&mut self.stream.buf, self.limits.max_frame_len) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(End::Failed(e.into())),
            };
            let frame = self.session.open(frame).map_err(End::Failed)?;
            self.stats.frames_in.fetch_add(1, Ordering::Relaxed);
            n += 1;
            self.on_frame(frame)?;
        }
        Ok(n)
    }

    fn on_frame(&mut self, frame: SessionFrame) -> Result<(), End> {
        match frame.body {
            Body::Request { payload } => {
                let req = Request {
                    id: self.id.clone(),
                    seq: frame.seq,
                    payload,
                };
                let fut = self.state.backend.request(req);
                let timeout = self.limits.backend_timeout;
                let seq = frame.seq;
                let handle = self.inflight.spawn(async move {
                    let reply = tokio::time::timeout(timeout, fut)
                        .await
                        .unwrap_or_else(|_| {
                            Reply::error(Status::TIMEOUT, "backend did not answer in time")
                        });
                    Some((seq, reply))
                });
                self.inflight_seq.insert(handle.id(), seq);
            }
            Body::Message { payload } => {
                let fut = self.state.backend.message(self.id.clone(), payload);
                let timeout = self.limits.backend_timeout;
                self.inflight.spawn(async move {
                    let _ = tokio::time::timeout(timeout, fut).await;
                    None
                });
            }
            Body::Response {
                req_seq,
                status,
                payload,
            } => match self.pending.remove(&req_seq) {
                Some(answer) => {
                    let _ = answer.send(Ok(Reply { status, payload }));
                }
                // Spec 8.4: a RESPONSE to nothing pending is a protocol error.
                None => {
                    return Err(End::Failed(ProtocolError::UnsolicitedAnswer {
                        what: "RESPONSE",
                        got: req_seq,
                        last_sent: self.session.last_sent(),
                    }))
                }
            },
            Body::Ping => self.send(Body::Pong {
                ping_seq: frame.seq,
            }),
            Body::Pong { .. } => {}
            Body::Close { code, reason } => return Err(End::PeerClosed(code, reason)),
        }
        Ok(())
    }

    /// A backend task finished: send its RESPONSE.
    fn answer(
        &mut self,
        done: Result<(tokio::task::Id, Option<(u64, Reply)>), tokio::task::JoinError>,
    ) {
        let (seq, reply) = match done {
            Ok((task, result)) => {
                self.inflight_seq.remove(&task);
                match result {
                    Some(r) => r,
                    None => return,
                }
            }
            Err(e) => match self.inflight_seq.remove(&e.id()) {
                Some(seq) => {
                    warn!(id = %self.id, seq, "backend task failed: {e}");
                    (seq, Reply::error(Status::BACKEND_ERROR, "backend failed"))
                }
                None => return,
            },
        };
        let max = self.session.max_payload(crate::proto::FrameType::Response);
        let reply = if reply.payload.len() > max {
            warn!(id = %self.id, seq, len = reply.payload.len(), max, "backend reply too large for one frame");
            Reply::error(Status::BACKEND_ERROR, "reply too large")
        } else {
            reply
        };
        self.send(Body::Response {
            req_seq: seq,
            status: reply.status,
            payload: reply.payload,
        });
    }

    fn send_request(&mut self, payload: Bytes, reply: Answer) {
        match self.seal(&Body::Request { payload }) {
            Ok(seq) => {
                self.pending.insert(seq, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }

    fn send(&mut self, body: Body) {
        if let Err(e) = self.seal(&body) {
            debug!(id = %self.id, "not sent: {e}");
        }
    }

    fn seal(&mut self, body: &Body) -> Result<u64, ProtocolError> {
        let seq = self.session.seal(body, &mut self.out)?;
        self.stats.frames_out.fetch_add(1, Ordering::Relaxed);
        Ok(seq)
    }

    /// Writes what is buffered. A device that stops reading is cut off after one
    /// keepalive interval rather than holding the task forever.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let write = self.stream.wr.write_all(&self.out);
        match tokio::time::timeout(self.limits.keepalive, write).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "device does not read",
                ))
            }
        }
        self.out.clear();
        Ok(())
    }

    /// Ends the session after `end`: answers CLOSE with CLOSE, reports a failure with
    /// CLOSE PROTOCOL_ERROR (spec 8.3, 8.6).
    async fn finish(mut self, end: End) -> End {
        let (code, reason) = match &end {
            End::PeerClosed(..) => (CloseCode::NORMAL, "closed"),
            End::Failed(e) => {
                warn!(id = %self.id, peer = %self.stream.peer, reason = %e, "refused frame; closing session");
                (e.close_code(), "protocol error")
            }
            End::Truncated | End::Io(_) | End::Closed(..) => return end,
        };
        self.send_close(code, reason).await;
        end
    }

    /// Sends CLOSE and ends the session.
    async fn close(mut self, code: CloseCode, reason: &'static str) -> End {
        self.send_close(code, reason).await;
        End::Closed(code, reason)
    }

    /// Abandons in-flight work, sends CLOSE (if this side still may), and lingers until
    /// the device closes, so the CLOSE is not lost to a reset.
    async fn send_close(&mut self, code: CloseCode, reason: &str) {
        self.abandon();
        if self
            .seal(&Body::Close {
                code,
                reason: reason.into(),
            })
            .is_ok()
        {
            let _ = self.flush().await;
        }
        self.stream.linger(Duration::from_secs(2)).await;
    }

    /// Drops in-flight backend work and fails server-initiated requests.
    fn abandon(&mut self) {
        self.inflight.abort_all();
        for (_, answer) in self.pending.drain() {
            let _ = answer.send(Err("session ended before the device answered".into()));
        }
    }
}
