//! A server-side session: the server's [`Role`] in the session driver.
//!
//! The rules of spec section 8 are [`Connection`]'s; the loop is [`crate::driver`]'s.
//! What is the server's: REQUESTs and MESSAGEs go to the backend, whose futures the
//! session polls on its own task (no task, timer or channel hop per request: an answer
//! that is ready at once, as the echo backend's is, is sealed in the same wake-up as its
//! request); answers that take longer come back as work, under `backend_timeout`; at
//! most `max_in_flight` are with the backend,
//! as many more wait in a queue, and only then does reading pause (so PINGs and CLOSE
//! are read while the backend is busy); commands from the registry send
//! server-initiated requests (at most `server_requests_in_flight` awaiting the
//! device's answer: beyond, the sender is refused at once) and messages; a close
//! signal (takeover, revocation) or shutdown (after the in-flight requests are
//! answered, up to `drain_timeout`) ends the session.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{debug, info, warn};

use super::delivery::{Cursor, Outcome as Delivered};
use super::metrics::BackendOutcome;
use super::registry::{Command, Mail, Mailbox, Registration};
use super::ServerState;
use crate::backend::{BoxFuture, Reply, Request, SendError};
use crate::driver::{Outcome, Role};
use crate::proto::connection::{Config, Connection, End as SessionEnd, Event};
use crate::proto::{CloseCode, Id, Misuse, ProtocolError, Session, Status};
use crate::store::queue::{self, QueueError, Queued};

/// How a session ended, for the log.
#[derive(Debug)]
pub(super) enum End {
    /// As the session reports it.
    Session(SessionEnd),
    /// The socket failed, or the device stopped reading.
    Io(std::io::Error),
}

impl End {
    /// Closed by either side with CLOSE `NORMAL`, or by the server shutting down.
    pub(super) fn is_clean(&self) -> bool {
        matches!(
            self,
            End::Session(
                SessionEnd::PeerClosed {
                    code: CloseCode::NORMAL,
                    ..
                } | SessionEnd::Closed {
                    code: CloseCode::NORMAL | CloseCode::SHUTDOWN,
                    ..
                }
            )
        )
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Session(SessionEnd::PeerClosed { code, reason }) => {
                write!(f, "closed by device: {code} {reason:?}")
            }
            End::Session(SessionEnd::Closed { code, reason, .. }) => {
                write!(f, "closed by server: {code}: {reason}")
            }
            End::Session(SessionEnd::Failed(e)) => write!(f, "protocol error: {e}"),
            End::Session(SessionEnd::Truncated) => {
                f.write_str("truncated: connection ended without CLOSE")
            }
            End::Io(e) => write!(f, "i/o error: {e}"),
        }
    }
}

type Answer = oneshot::Sender<Result<Reply, SendError>>;

/// What the server side waits for besides the socket.
pub(crate) enum Work {
    Command(Box<Command>),
    /// A request's answer (a message's completion is `None`).
    Backend(Option<(u64, Reply)>),
    CloseAsked(CloseCode, &'static str),
    Shutdown,
    DrainDeadline,
    /// A message was queued for this identity (spec 8.8).
    Queued,
    /// The next queued messages, and whether more may follow.
    Fetched(Fetched),
}

type Fetched = Result<(Vec<Queued>, bool), QueueError>;

/// How long a session whose deliveries are held back waits before it asks again.
const HOLD: Duration = Duration::from_secs(1);

/// The limits a session reads on every request: a copy of these, not of all of
/// [`crate::config::Limits`] (every idle session holds it).
struct SessionLimits {
    max_in_flight: usize,
    /// Server-initiated requests awaiting the device's answer, at most.
    server_requests_in_flight: usize,
    backend_timeout: Duration,
    drain_timeout: Duration,
    idle_timeout: Duration,
}

impl Delivery {
    /// A session's, at its start: it fetches from the queue only if its identity was
    /// marked as one that may have messages when it was registered.
    fn start(mailbox: &Mailbox, in_flight: usize) -> Box<Delivery> {
        let mark = mailbox.take_mark();
        Box::new(Delivery {
            generation: mailbox.generation,
            cursor: match mark {
                Some(_) => Cursor::new(),
                None => Cursor::nothing_queued(),
            },
            fetch: None,
            in_flight,
            mark,
        })
    }
}

/// A session's durable delivery (spec 8.8), on the heap: an idle session's future
/// holds one pointer for it.
struct Delivery {
    /// The enrollment the session's key belongs to: its queue, and only its, is
    /// delivered and acknowledged (an old enrollment's late ACK touches nothing of a new
    /// enrollment of the same id).
    generation: u64,
    /// Its place in its identity's queue.
    cursor: Cursor,
    /// The fetch of the next queued messages, while one is on its way.
    fetch: Option<BoxFuture<Fetched>>,
    /// Queued messages delivered and not acknowledged, at most.
    in_flight: usize,
    /// The identity's mark in the registry's record of queues (`Registry::queued`):
    /// given back when the session finds its queue empty.
    mark: Option<u64>,
}

/// Backend work that was not done when first polled: requests yield `Some((seq,
/// reply))`, messages `None`.
type Inflight = FuturesUnordered<BoxFuture<Option<(u64, Reply)>>>;

struct ServerRole {
    state: Arc<ServerState>,
    id: Id,
    /// Commands and close requests from the registry, and the counters it lists.
    mailbox: Arc<Mailbox>,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// When shutting down: the deadline for the in-flight requests (made then, not
    /// per loop iteration).
    drain: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Shutdown was asked (it is taken once).
    stopping: bool,
    /// Made when a backend first answers late (it allocates): most sessions never need
    /// it.
    inflight: Option<Inflight>,
    /// Requests and messages read while `max_in_flight` were with the backend: reading
    /// pauses once as many again wait (plus what the read that crossed that brought).
    queued: std::collections::VecDeque<Event>,
    /// Server-initiated requests waiting for the device's RESPONSE (a sender that gave
    /// up leaves its request here until the device answers): at most
    /// `limits.server_requests_in_flight`.
    pending: HashMap<u64, Answer>,
    limits: SessionLimits,
    paused_logged: std::cell::Cell<bool>,
    /// The session's place in the registry: given up as soon as the session is over,
    /// before the last bytes are written and the socket closed, so that a device that
    /// saw the end and reconnects at once is never refused as a duplicate (`takeover =
    /// "reject"`).
    registration: Option<Registration>,
    /// Durable delivery (spec 8.8): boxed, as the idle session's future is kept small.
    delivery: Box<Delivery>,
}

/// Runs an authenticated connection's session to its end, then unregisters it
/// (`registration`) and logs how it ended. The connection's task holds this future on
/// the heap, at its own size, for the session's whole life.
pub(super) async fn run(
    state: Arc<ServerState>,
    id: Id,
    session: Session,
    (rd, wr, leftover): (OwnedReadHalf, OwnedWriteHalf, BytesMut),
    mailbox: Arc<Mailbox>,
    registration: Registration,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    // In a block: the whole `Limits` is not kept in this future across the session.
    let (config, write_stall, limits, in_flight) = {
        let limits = state.limits();
        let mut config = Config::server();
        config.idle_timeout = Some(limits.idle_timeout());
        config.close_timeout = Duration::from_secs(2);
        config.max_frame_len = limits.max_frame_len;
        // A device that reads nothing for a keepalive interval is cut off.
        let write_stall = limits.keepalive;
        let mine = SessionLimits {
            max_in_flight: limits.max_in_flight,
            server_requests_in_flight: limits.server_requests_in_flight,
            backend_timeout: limits.backend_timeout,
            drain_timeout: limits.drain_timeout,
            idle_timeout: limits.idle_timeout(),
        };
        (config, write_stall, mine, limits.deliveries_in_flight)
    };
    // Made in a plain function: a borrow of a local here would keep it in this
    // future for the session's life.
    let mut role = ServerRole::new(
        state,
        id,
        mailbox,
        shutdown,
        limits,
        registration,
        in_flight,
    );
    role.start_fetch();
    let outcome =
        crate::driver::run(session, config, (rd, wr), leftover, &mut role, write_stall).await;
    role.abandon();
    // After it left the registry: a scrape in between counts it low, never twice.
    role.state.metrics.session_ended(role.mailbox.totals());
    let end = match outcome {
        Outcome::Ended(end) => End::Session(end),
        Outcome::Io(e) => End::Io(e),
    };
    let (duration_ms, frames_in, frames_out) = (
        started.elapsed().as_millis() as u64,
        role.mailbox.frames_in.load(Ordering::Relaxed),
        role.mailbox.frames_out.load(Ordering::Relaxed),
    );
    if end.is_clean() {
        debug!(duration_ms, frames_in, frames_out, end = %end, "session ended");
    } else {
        info!(duration_ms, frames_in, frames_out, end = %end, "session ended");
    }
}

impl ServerRole {
    /// A session's role at its start.
    fn new(
        state: Arc<ServerState>,
        id: Id,
        mailbox: Arc<Mailbox>,
        shutdown: CancellationToken,
        limits: SessionLimits,
        registration: Registration,
        in_flight: usize,
    ) -> ServerRole {
        ServerRole {
            // First: the mailbox moves below.
            delivery: Delivery::start(&mailbox, in_flight),
            state,
            id,
            mailbox,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            drain: None,
            stopping: false,
            inflight: None,
            queued: std::collections::VecDeque::new(),
            pending: HashMap::new(),
            limits,
            paused_logged: std::cell::Cell::new(false),
            registration: Some(registration),
        }
    }
}

impl Drop for ServerRole {
    /// However the session ends (a panic, or its task dropped at shutdown): commands still
    /// queued and senders waiting for room learn at once that it ended, not after their
    /// timeout.
    fn drop(&mut self) {
        self.mailbox.end();
    }
}

impl ServerRole {
    /// Sends the RESPONSE to request `seq`.
    fn answer(&mut self, seq: u64, reply: Reply, conn: &mut Connection, now: Duration) {
        let len = reply.payload.len();
        if let Err(e) = conn.respond(seq, reply.status, reply.payload, now) {
            // Too large: answered BACKEND_ERROR instead (spec 8.4). Else the session
            // is over.
            warn!(seq, len, "backend reply not sent as is: {e}");
        }
    }

    /// Hands a REQUEST or MESSAGE to the backend, or queues it while `max_in_flight`
    /// are there. The backend's future is polled once at once: if it is ready, the
    /// request is answered now; else it waits among `inflight`, under the timeout.
    fn dispatch(&mut self, event: Event, conn: &mut Connection, now: Duration) {
        // Once this side sent CLOSE (takeover, revocation, drain deadline, a refused
        // frame), nothing more goes to the backend.
        if !conn.is_open() {
            return;
        }
        if self.inflight_len() >= self.limits.max_in_flight {
            self.queued.push_back(event);
            return;
        }
        let timeout = self.limits.backend_timeout;
        match event {
            Event::Request { seq, payload } => {
                let req = Request {
                    id: self.id.clone(),
                    seq,
                    payload,
                };
                let mut fut = self.state.backend.request(req);
                match poll_once(&mut fut) {
                    // Answered at once: counted by this session alone (summed at scrape),
                    // no clock read, no shared counter or histogram touched: on the echo
                    // backend at 8 in flight those cost 11% of the CPU per request.
                    Poll::Ready(Ok(reply)) => {
                        let m = &self.mailbox;
                        let n = match outcome(&reply) {
                            BackendOutcome::Ok => &m.answered_ok,
                            _ => &m.answered_error,
                        };
                        // One writer (this session): no read-modify-write needed.
                        n.store(n.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                        self.answer(seq, reply, conn, now)
                    }
                    Poll::Ready(Err(())) => {
                        self.state.metrics.backend_panicked_at_once();
                        self.answer(seq, panicked(seq), conn, now)
                    }
                    Poll::Pending => {
                        let started = Instant::now();
                        let state = self.state.clone();
                        self.late(Box::pin(async move {
                            let (reply, how) = match tokio::time::timeout(
                                timeout,
                                AssertUnwindSafe(fut).catch_unwind(),
                            )
                            .await
                            {
                                Ok(Ok(reply)) => {
                                    let how = outcome(&reply);
                                    (reply, how)
                                }
                                Ok(Err(_)) => (panicked(seq), BackendOutcome::Panic),
                                Err(_) => (
                                    Reply::error(Status::TIMEOUT, "backend did not answer in time"),
                                    BackendOutcome::Timeout,
                                ),
                            };
                            state.metrics.backend(how, started.elapsed());
                            Some((seq, reply))
                        }))
                    }
                }
            }
            Event::Message { payload } => {
                let mut fut = self.state.backend.message(self.id.clone(), payload);
                if poll_once(&mut fut).is_pending() {
                    self.late(Box::pin(async move {
                        let _ = tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind())
                            .await;
                        None
                    }));
                }
            }
            _ => {}
        }
    }

    /// Once this side sent CLOSE, in-flight and queued backend work is dropped (the old
    /// loop did the same when it closed): a revoked device's requests must not reach the
    /// backend after its revocation.
    fn stop_if_closing(&mut self, conn: &Connection) {
        if !(conn.is_open() || self.inflight_len() == 0 && self.queued.is_empty()) {
            self.queued.clear();
            self.inflight = None;
        }
    }

    /// Backend futures not done when first polled.
    fn inflight_len(&self) -> usize {
        self.inflight.as_ref().map_or(0, FuturesUnordered::len)
    }

    /// Waits for a backend future that was not done when first polled.
    fn late(&mut self, fut: BoxFuture<Option<(u64, Reply)>>) {
        self.inflight
            .get_or_insert_with(FuturesUnordered::new)
            .push(fut);
    }

    /// Drops in-flight backend work, fails server-initiated requests and commands still
    /// queued, and takes no more.
    fn abandon(&mut self) {
        // Out of the registry first (see `registration`).
        self.registration.take();
        self.queued.clear();
        self.inflight = None;
        self.mailbox.end();
        for (_, answer) in self.pending.drain() {
            let _ = answer.send(Err(SendError::SessionEnded));
        }
    }

    fn count(&self, conn: &Connection) {
        let s = conn.session();
        let m = &self.mailbox;
        m.frames_in.store(s.last_received(), Ordering::Relaxed);
        m.frames_out.store(s.last_sent(), Ordering::Relaxed);
        m.bytes_in.store(conn.bytes_received(), Ordering::Relaxed);
        m.bytes_out.store(conn.bytes_sent(), Ordering::Relaxed);
    }

    /// Fetches the next queued messages if the cursor says so (spec 8.8).
    fn start_fetch(&mut self) {
        let delivery = &mut self.delivery;
        let Some(limit) = delivery.cursor.poll_fetch(delivery.in_flight) else {
            return;
        };
        if !self.may_deliver() {
            return self.hold();
        }
        let (d, delivery) = (&self.state.deliveries, &mut self.delivery);
        let (d, id, after) = (d.clone(), self.id.clone(), delivery.cursor.after());
        let generation = delivery.generation;
        // The first fetch of an identity marked as one that may have messages unmarks it
        // if there are none (`Registry::queue_empty`).
        let unmark = match after {
            0 => delivery.mark.take(),
            _ => None,
        };
        let registry = self.state.registry.clone();
        // On a task of its own: what it finds expired (deleted) is reported, and an
        // empty queue unmarked, even if the session ends first (a device that sends one
        // request and leaves).
        let fetch = self.state.tasks.spawn(async move {
            let got = d
                .queue()
                .next(&id, generation, after, limit, queue::now_ms())
                .await;
            match got {
                Ok(next) => {
                    d.report_gone(next.expired, &Delivered::Expired);
                    if let (true, Some(mark)) = (next.messages.is_empty() && !next.more, unmark) {
                        registry.queue_empty(&id, mark);
                    }
                    Ok((next.messages, next.more))
                }
                Err(e) => {
                    // Tried again after a pause, not in a loop.
                    warn!("fetching queued messages failed (tried again in a second): {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    Err(e)
                }
            }
        });
        delivery.fetch = Some(Box::pin(async move {
            fetch
                .await
                .unwrap_or_else(|_| Err(QueueError::Db("the fetch's task failed".into())))
        }));
    }

    /// Whether this session may deliver queued messages now: in a fleet, only while its
    /// node serves under its claim (`fleet::node::Node::may_deliver`); a session being
    /// closed never.
    fn may_deliver(&self) -> bool {
        self.registration
            .as_ref()
            .is_some_and(Registration::may_deliver)
    }

    /// Holds deliveries back ([`ServerRole::may_deliver`] said no: the node may be taken
    /// for dead, or the claim was superseded, and the session is about to be closed):
    /// nothing is fetched, and the session asks again in a second. What is queued stays
    /// queued, for this session or the next, on any node.
    fn hold(&mut self) {
        self.delivery.fetch = Some(Box::pin(async {
            tokio::time::sleep(HOLD).await;
            Ok((Vec::new(), true))
        }));
    }

    /// Delivers fetched messages, in order, while the session is open (and may deliver:
    /// its node may have stopped serving while the fetch was on its way).
    fn deliver(&mut self, fetched: Fetched, conn: &mut Connection, now: Duration) {
        if !self.may_deliver() {
            // Not delivered: fetched again once it may. (The fetch counted them
            // delivered: one that expires before it is delivered again is reported
            // "unconfirmed", not "expired". Rare: the node stopped serving during the
            // fetch.)
            return self.delivery.cursor.fetched(&[], true);
        }
        let (d, delivery) = (self.state.deliveries.clone(), &mut self.delivery);
        let generation = delivery.generation;
        let cursor = &mut delivery.cursor;
        let (messages, more) = match fetched {
            Ok(got) => got,
            Err(_) => return cursor.failed(),
        };
        let mut delivered = Vec::with_capacity(messages.len());
        let mut settled = 0;
        for m in messages {
            let msg_id = m.msg_id;
            match conn.deliver(msg_id, m.kind, m.payload, now) {
                Ok(()) => {
                    d.counts.delivered.fetch_add(1, Ordering::Relaxed);
                }
                // Larger than the device takes: it can never be delivered. Withdrawn,
                // and its sender told why.
                Err(e @ ProtocolError::Misuse(Misuse::PayloadTooLarge { .. })) => {
                    settled += 1;
                    let (d, id, reason) = (d.clone(), self.id.clone(), e.to_string());
                    self.state.tasks.spawn(async move {
                        if let Ok(gone) = d.queue().purge(&id, generation, Some(msg_id)).await {
                            let why = Delivered::Undeliverable(format!(
                                "too large for the frame limit the device announced: {reason}"
                            ));
                            d.report_gone(gone, &why);
                        }
                    });
                }
                // The session is closing: the rest stays queued for the next one.
                Err(_) => break,
            }
            delivered.push(msg_id);
        }
        cursor.fetched(&delivered, more);
        for _ in 0..settled {
            cursor.settled();
        }
    }

    /// The device acknowledged queued message `msg_id`: deleted, then its sender told.
    fn acknowledged(&mut self, msg_id: u64, status: Status, payload: bytes::Bytes) {
        let (d, delivery) = (self.state.deliveries.clone(), &mut self.delivery);
        delivery.cursor.settled();
        let (id, generation) = (self.id.clone(), delivery.generation);
        // On the daemon's tasks: a shutdown waits for it to be recorded.
        self.state.tasks.spawn(async move {
            let outcome = Delivered::Acknowledged {
                status,
                payload: payload.clone(),
            };
            match d.queue().ack(generation, msg_id, status, payload).await {
                // Handed to the node it was queued on with the deletion.
                Ok(Some(removed)) if removed.node.is_some() => {
                    d.counted(&id, msg_id, removed.origin, &outcome)
                }
                Ok(Some(removed)) => {
                    d.report(&id, generation, msg_id, removed.origin, None, outcome)
                }
                // Expired or purged meanwhile: its sender was told so then.
                Ok(None) => {}
                Err(e) => warn!(
                    msg_id,
                    "recording an acknowledgement failed: the message stays queued and is delivered again: {e}"
                ),
            }
        });
    }

    /// Shutting down and nothing in flight: close.
    fn drained(&self, conn: &mut Connection, now: Duration) {
        if self.stopping && self.inflight_len() == 0 && self.queued.is_empty() {
            conn.close(CloseCode::SHUTDOWN, "server shutting down", now);
        }
    }
}

/// Polls a backend's future once, without a waker (it is polled again, with the
/// session's, if it is not ready); a panic in the backend is `Err`.
fn poll_once<T>(fut: &mut BoxFuture<T>) -> Poll<Result<T, ()>> {
    let mut cx = Context::from_waker(Waker::noop());
    match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
        Ok(Poll::Ready(v)) => Poll::Ready(Ok(v)),
        Ok(Poll::Pending) => Poll::Pending,
        Err(_) => Poll::Ready(Err(())),
    }
}

/// A backend's answer, for the metrics.
fn outcome(reply: &Reply) -> BackendOutcome {
    if reply.status == Status::OK {
        BackendOutcome::Ok
    } else {
        BackendOutcome::Error
    }
}

/// The answer to a request whose backend future panicked.
fn panicked(seq: u64) -> Reply {
    warn!(seq, "backend panicked while answering");
    Reply::error(Status::BACKEND_ERROR, "backend failed")
}

impl Role for ServerRole {
    type Work = Work;

    fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Work> {
        // In this order: shutdown, a close asked for, commands, the backend's answers,
        // the drain deadline.
        if !self.stopping && self.shutdown.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Work::Shutdown);
        }
        if let Poll::Ready(mail) = self.mailbox.poll_mail(cx) {
            return Poll::Ready(match mail {
                Mail::Close(code, reason) => Work::CloseAsked(code, reason),
                Mail::Command(cmd) => Work::Command(cmd),
                Mail::Queued => Work::Queued,
            });
        }
        let delivery = &mut self.delivery;
        if let Some(fetch) = delivery.fetch.as_mut() {
            if let Poll::Ready(got) = fetch.as_mut().poll(cx) {
                delivery.fetch = None;
                return Poll::Ready(Work::Fetched(got));
            }
        }
        if let Some(inflight) = self.inflight.as_mut().filter(|f| !f.is_empty()) {
            if let Poll::Ready(Some(done)) = inflight.poll_next_unpin(cx) {
                return Poll::Ready(Work::Backend(done));
            }
        }
        if let Some(drain) = &mut self.drain {
            if drain.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Work::DrainDeadline);
            }
        }
        Poll::Pending
    }

    fn apply(&mut self, work: Work, conn: &mut Connection, now: Duration) {
        match work {
            Work::Command(cmd) => match *cmd {
                // At the limit, refused at once: the sender learns why, the device is
                // not asked (a burst of sends ran as many handlers on it at once).
                Command::Request { reply, .. }
                    if self.pending.len() >= self.limits.server_requests_in_flight =>
                {
                    let _ = reply.send(Err(SendError::Busy {
                        id: self.id.to_string(),
                        limit: self.limits.server_requests_in_flight,
                    }));
                }
                Command::Request { payload, reply } => match conn.request(payload, now) {
                    Ok(seq) => {
                        self.pending.insert(seq, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(SendError::Refused(e)));
                    }
                },
                Command::Message { payload, sent } => {
                    let _ = sent.send(conn.message(payload, now).map_err(SendError::Refused));
                }
            },
            Work::Backend(done) => {
                if let Some((seq, reply)) = done {
                    self.answer(seq, reply, conn, now);
                }
                // Those queued meanwhile, while there is room (each may be answered at
                // once).
                while self.inflight_len() < self.limits.max_in_flight {
                    match self.queued.pop_front() {
                        Some(next) => self.dispatch(next, conn, now),
                        None => break,
                    }
                }
                self.drained(conn, now);
            }
            Work::CloseAsked(code, reason) => conn.close(code, reason, now),
            Work::Queued => self.delivery.cursor.noticed(),
            Work::Fetched(got) => self.deliver(got, conn, now),
            Work::Shutdown => {
                self.stopping = true;
                self.drain = Some(Box::pin(tokio::time::sleep(self.limits.drain_timeout)));
                self.drained(conn, now);
            }
            Work::DrainDeadline => {
                self.drain = None;
                warn!(abandoned = self.inflight_len(), "drain deadline passed (limits.drain_timeout); closing with requests unanswered");
                conn.close(CloseCode::SHUTDOWN, "server shutting down", now);
            }
        }
        if conn.is_open() {
            self.start_fetch();
        }
        self.stop_if_closing(conn);
    }

    fn event(&mut self, event: Event, conn: &mut Connection, now: Duration) {
        match event {
            e @ (Event::Request { .. } | Event::Message { .. }) => self.dispatch(e, conn, now),
            Event::Response {
                req_seq,
                status,
                payload,
            } => {
                if let Some(answer) = self.pending.remove(&req_seq) {
                    let _ = answer.send(Ok(Reply { status, payload }));
                }
            }
            Event::Ack {
                msg_id,
                status,
                payload,
            } => {
                self.acknowledged(msg_id, status, payload);
                if conn.is_open() {
                    self.start_fetch();
                }
            }
            Event::Closed(SessionEnd::Failed(e)) => {
                warn!(reason = %e, "refused frame; closing session");
                self.abandon();
            }
            Event::Closed(SessionEnd::Closed {
                code: CloseCode::IDLE_TIMEOUT,
                ..
            }) => {
                warn!(
                    idle_secs = self.limits.idle_timeout.as_secs_f64(),
                    "closed idle session (1.5x limits.keepalive without a frame)"
                );
                self.abandon();
            }
            Event::Closed(_) => self.abandon(),
            _ => {}
        }
        self.stop_if_closing(conn);
    }

    fn after(&mut self, conn: &Connection) {
        self.count(conn);
    }

    fn may_read(&self, conn: &Connection) -> bool {
        // Closing: read the device's CLOSE or EOF (frames in between are dropped).
        if !conn.is_open() {
            return true;
        }
        let full = self.queued.len() >= self.limits.max_in_flight;
        if full && !self.paused_logged.replace(true) {
            info!(limit = self.limits.max_in_flight, "in-flight request limit reached (limits.max_in_flight): reading paused until the backend answers");
        }
        !self.stopping && !full
    }
}
