//! Live sessions, one per identity (spec 7.3), and the commands other tasks send them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::{oneshot, Semaphore};
use tracing::warn;

use crate::backend::Reply;
use crate::config::TakeoverPolicy;
use crate::proto::handshake::FinishVerified;
use crate::proto::{CloseCode, Id};

/// Takeovers of one identity within [`PING_PONG_WINDOW`] that make it look shared.
pub const PING_PONG_TAKEOVERS: usize = 3;
/// Window for [`PING_PONG_TAKEOVERS`].
pub const PING_PONG_WINDOW: Duration = Duration::from_secs(60);

/// Commands a live session holds before senders wait for room.
pub const MAILBOX_COMMANDS: usize = 16;

/// What can be asked of a live session.
#[derive(Debug)]
pub enum Command {
    /// Send a REQUEST to the device; the RESPONSE (or why none came) goes to `reply`.
    Request {
        /// Payload.
        payload: Bytes,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Reply, SendError>>,
    },
    /// Send a one-way MESSAGE to the device; `sent` learns whether it was written.
    Message {
        /// Payload.
        payload: Bytes,
        /// Whether it was sealed and queued (or why not).
        sent: oneshot::Sender<Result<(), SendError>>,
    },
}

pub use crate::backend::{SendError, SendKind};

/// The registry as backends see it ([`crate::backend::Devices`]): sending only.
pub(crate) struct Sessions(
    pub(crate) Arc<Registry>,
    /// The daemon, once it is made (after the backend was attached): for queueing.
    pub(crate) Arc<std::sync::OnceLock<std::sync::Weak<super::ServerState>>>,
);

impl crate::backend::Devices for Sessions {
    fn send(
        &self,
        id: Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> crate::backend::BoxFuture<Result<Option<Reply>, SendError>> {
        let registry = self.0.clone();
        Box::pin(async move { registry.send(&id, kind, payload, timeout).await })
    }

    fn enqueue(
        &self,
        id: Id,
        kind: crate::proto::DeliveryKind,
        payload: Bytes,
        ttl: Option<Duration>,
    ) -> crate::backend::BoxFuture<Result<u64, String>> {
        let state = self.1.get().and_then(std::sync::Weak::upgrade);
        Box::pin(async move {
            let state = state.ok_or("the daemon is not ready")?;
            let d = &state.deliveries;
            let limits = state.limits();
            let origin = crate::store::queue::Origin::Backend;
            d.enqueue(&state.registry, &limits, id, kind, payload, ttl, origin)
                .await
                .map(|q| q.msg_id)
                .map_err(|e| e.to_string())
        })
    }
}

/// How many counters [`Mailbox::totals`] gives.
pub const TOTALS: usize = 6;

/// What the registry (and `tallyd send`, backends, revocation) can ask of one live
/// session, and its counters: one allocation of about 200 bytes per session, shared by
/// its registry entry and its task. (The tokio mpsc and watch channels it replaces cost
/// 800 and 360 bytes per session, measured: the mpsc allocates room for 32 commands at
/// once.)
///
/// Commands wait in a queue of at most [`MAILBOX_COMMANDS`]; a sender waits for room.
/// A close is kept apart from the queue, so that a full queue can never hold back a
/// takeover or a revocation.
#[derive(Debug)]
pub struct Mailbox {
    inbox: Mutex<Inbox>,
    /// Room in the queue: a sender takes a permit, the session gives it back when it
    /// takes the command. Closed when the session ends (waiting senders fail).
    room: Semaphore,
    /// The session's task, woken for a command or a close.
    waker: AtomicWaker,
    /// Frames accepted from the device.
    pub frames_in: AtomicU64,
    /// Frames sent to the device.
    pub frames_out: AtomicU64,
    /// Bytes received from the device.
    pub bytes_in: AtomicU64,
    /// Bytes sent to the device.
    pub bytes_out: AtomicU64,
    /// REQUESTs the backend answered at once (ready when polled first), with OK and with
    /// another status: counted here, by the session alone, and summed at scrape, so that
    /// the request path touches no shared counter and reads no clock (`metrics`).
    pub answered_ok: AtomicU64,
    /// See `answered_ok`.
    pub answered_error: AtomicU64,
    /// The enrollment the session's key belongs to (its queue, spec 8.8): here rather
    /// than in the session's future, which every idle session holds.
    pub generation: u64,
}

#[derive(Debug, Default)]
struct Inbox {
    commands: VecDeque<Box<Command>>,
    /// The close asked for (the latest, if several were), until the session takes it.
    close: Option<(CloseCode, &'static str)>,
    /// The session ended: nothing more is taken.
    ended: bool,
    /// A message was queued for the identity since the session last looked (spec 8.8).
    queued: bool,
    /// The identity's mark in the registry's record of queues when the session was
    /// registered (`Registry::queued`), until the session takes it.
    mark: Option<u64>,
}

/// What a session finds in its [`Mailbox`].
#[derive(Debug)]
pub enum Mail {
    /// A close was asked for (takeover, revocation, removal, an operator).
    Close(CloseCode, &'static str),
    /// A command.
    Command(Box<Command>),
    /// A message was queued for this identity: deliver it.
    Queued,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox {
            inbox: Mutex::default(),
            room: Semaphore::new(MAILBOX_COMMANDS),
            waker: AtomicWaker::new(),
            frames_in: AtomicU64::new(0),
            frames_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            answered_ok: AtomicU64::new(0),
            answered_error: AtomicU64::new(0),
            generation: 0,
        }
    }
}

impl Mailbox {
    /// The mailbox of a session of enrollment `generation`.
    pub fn of_enrollment(generation: u64) -> Mailbox {
        Mailbox {
            generation,
            ..Mailbox::default()
        }
    }
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `cmd`, waiting for room; gives it back if the session has ended.
    pub async fn send(&self, cmd: Box<Command>) -> Result<(), Box<Command>> {
        match self.room.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => return Err(cmd),
        }
        let mut inbox = self.lock();
        if inbox.ended {
            return Err(cmd);
        }
        inbox.commands.push_back(cmd);
        drop(inbox);
        self.waker.wake();
        Ok(())
    }

    /// Frames in, out, bytes in, out, and requests answered at once with OK and not,
    /// so far.
    pub fn totals(&self) -> [u64; TOTALS] {
        [
            &self.frames_in,
            &self.frames_out,
            &self.bytes_in,
            &self.bytes_out,
            &self.answered_ok,
            &self.answered_error,
        ]
        .map(|c| c.load(Ordering::Relaxed))
    }

    /// Asks the session to send CLOSE with `code` and `reason`, and end.
    pub fn ask_close(&self, code: CloseCode, reason: &'static str) {
        self.lock().close = Some((code, reason));
        self.waker.wake();
    }

    /// For the session, at its start: the identity's mark in the registry's record of
    /// queues when it was registered, if it was marked (it may have queued messages).
    pub fn take_mark(&self) -> Option<u64> {
        self.lock().mark.take()
    }

    /// Tells the session that a message was queued for its identity (spec 8.8).
    pub fn notify_queued(&self) {
        self.lock().queued = true;
        self.waker.wake();
    }

    /// For the session: a close asked for first, else the next command; registers the
    /// task's waker when there is neither.
    pub fn poll_mail(&self, cx: &mut Context<'_>) -> Poll<Mail> {
        // A command is work done: it takes tokio's budget, as a channel's receive does, so
        // that senders that keep the mailbox full cannot keep the session's task from
        // ever yielding.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        self.waker.register(cx.waker());
        let mut inbox = self.lock();
        if let Some((code, reason)) = inbox.close.take() {
            coop.made_progress();
            return Poll::Ready(Mail::Close(code, reason));
        }
        if std::mem::take(&mut inbox.queued) {
            coop.made_progress();
            return Poll::Ready(Mail::Queued);
        }
        match inbox.commands.pop_front() {
            Some(cmd) => {
                drop(inbox);
                self.room.add_permits(1);
                coop.made_progress();
                Poll::Ready(Mail::Command(cmd))
            }
            None => Poll::Pending,
        }
    }

    /// For the session, when it ends: commands still queued are dropped (their senders
    /// learn the session ended) and no more are taken.
    pub fn end(&self) {
        let dropped = {
            let mut inbox = self.lock();
            inbox.ended = true;
            std::mem::take(&mut inbox.commands)
        };
        self.room.close();
        drop(dropped);
    }
}

/// One live session.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Unique number of the connection.
    pub conn: u64,
    /// The epoch of its fleet-wide claim (0 without a fleet).
    pub epoch: u64,
    /// In a fleet, the position of the enrollment whose key the session was made with
    /// (the entries of the fleet's log before it): a revocation ends the enrollments
    /// before it. 0 without a fleet.
    pub log_pos: u64,
    /// The device's address.
    pub peer: SocketAddr,
    /// When the session was established.
    pub since: SystemTime,
    /// Commands, close requests and counters.
    pub mailbox: Arc<Mailbox>,
}

/// A live session as listed for the operator.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SessionInfo {
    /// Identity.
    pub id: String,
    /// Peer address.
    pub peer: String,
    /// Established at (seconds since the Unix epoch).
    pub since: u64,
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// In a fleet: the listening address of the node holding the session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// In a fleet: held by another node (whose frame counts this one does not know).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub elsewhere: bool,
}

/// What the registry asks of the fleet, when the daemons share a PostgreSQL store
/// (`crate::server::fleet`): the claim of a session that ended is released, and a send
/// to a device without a session here goes to the node holding it.
pub trait Fleetwide: Send + Sync {
    /// `id`'s session with claim `epoch` ended.
    fn released(&self, id: &Id, epoch: u64);
    /// Whether `id`'s session with claim `epoch` may deliver queued messages now (its
    /// node serves, and the claim is not known superseded).
    fn may_deliver(&self, id: &Id, epoch: u64) -> bool;
    /// Sends to `id`, whose session is not on this node.
    fn send_elsewhere(
        &self,
        id: Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> crate::backend::BoxFuture<Result<Option<Reply>, SendError>>;
}

/// Why a session that completed its handshake was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// The identity has a live session and the policy is `reject` (spec 7.3).
    #[error("identity has a live session and takeover = \"reject\"")]
    TakeoverRefused,
    /// The identity was revoked or removed after its key was looked up for this
    /// handshake: the key the session was made with is no longer the identity's.
    #[error("identity was revoked or removed during the handshake")]
    Invalidated,
    /// The handshake's key was looked up longer ago than revocations are remembered
    /// (the handshake deadline and a second): whether it is still valid is not known.
    #[error("handshake took longer than its deadline to be registered")]
    TooLate,
    /// In a fleet: a newer claim of the identity (on another node, or a later handshake
    /// here) took over this one before it was registered (the fleet's state machine
    /// says so: `fleet::node::Node::admits`).
    #[error("a newer session of this identity took over before this one was registered")]
    Superseded,
    /// In a fleet: this node is fenced, may have lost its claims since this one was
    /// made (it was declared dead by the fleet), or is not hearing the fleet's notices
    /// (the fleet's state machine says so).
    #[error("this node is cut off from the fleet's database")]
    Fenced,
}

#[derive(Debug, Default)]
struct Live {
    sessions: HashMap<Id, Entry>,
    /// When each recently revoked or removed identity was invalidated. A handshake whose
    /// key lookup started before that instant may hold a key that is no longer valid.
    /// Kept for `tombstone_ttl`: no handshake outlives its deadline.
    tombstones: HashMap<Id, Instant>,
    tombstone_ttl: Duration,
    /// When `tombstones` were last pruned.
    pruned: Option<Instant>,
    /// Identities that may have queued messages (spec 8.8): a session fetches from the
    /// queue at its start only if its identity is marked.
    queued: super::marks::Marks,
}

impl Live {
    /// Asks `id`'s live session to close. Returns whether there was one.
    fn ask_close(&self, id: &Id, code: CloseCode, reason: &'static str) -> bool {
        match self.sessions.get(id) {
            Some(e) => {
                e.mailbox.ask_close(code, reason);
                true
            }
            None => false,
        }
    }
}

/// All live sessions.
#[derive(Default)]
pub struct Registry {
    live: Mutex<Live>,
    takeovers: Mutex<HashMap<Id, VecDeque<Instant>>>,
    next_conn: AtomicU64,
    /// The fleet, if this daemon is one of several.
    fleet: std::sync::OnceLock<Arc<dyn Fleetwide>>,
    /// Server-initiated sends to this daemon's sessions (`tallyd status`).
    pub sends: SendCounts,
}

/// Server-initiated REQUESTs and MESSAGEs handed to this daemon's sessions (from
/// `tallyd send`, the backend, or another node of a fleet), as `tallyd status` shows them.
#[derive(Debug, Default)]
pub struct SendCounts {
    /// REQUESTs handed to a session.
    pub requests: AtomicU64,
    /// Of those, answered by the device in time.
    pub answered: AtomicU64,
    /// REQUESTs whose sender waits for the device's answer now.
    pub waiting: AtomicU64,
    /// MESSAGEs written to a session.
    pub messages: AtomicU64,
}

/// Counts one waiting sender while it lives.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("live", &self.len())
            .field("fleet", &self.fleet.get().is_some())
            .finish_non_exhaustive()
    }
}

/// A registered session: dropping it removes the session from the registry (if it is
/// still the identity's live one), however the session task ends, panics included.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    id: Id,
    conn: u64,
    epoch: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = self.registry.lock();
        if live
            .sessions
            .get(&self.id)
            .is_some_and(|e| e.conn == self.conn)
        {
            live.sessions.remove(&self.id);
            drop(live);
            if let Some(fleet) = self.registry.fleet.get() {
                fleet.released(&self.id, self.epoch);
            }
        }
    }
}

impl Registration {
    /// Whether this session may deliver queued messages now: always on a daemon of its
    /// own; in a fleet, as its node's state machine says (`fleet::node::Node::may_deliver`).
    pub fn may_deliver(&self) -> bool {
        self.registry
            .fleet
            .get()
            .is_none_or(|f| f.may_deliver(&self.id, self.epoch))
    }
}

impl Registry {
    /// Makes this registry one node's of a fleet: ended sessions release their claims,
    /// sends reach other nodes, and takeovers are counted by the fleet's claims (the
    /// registry no longer counts its own).
    pub fn join_fleet(&self, fleet: Arc<dyn Fleetwide>) {
        let _ = self.fleet.set(fleet);
    }

    /// Whether this daemon is one of a fleet.
    pub fn in_fleet(&self) -> bool {
        self.fleet.get().is_some()
    }

    /// A number for a new connection.
    pub fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long a revocation or removal is remembered for handshakes in flight: at
    /// least the longest handshake deadline in force. Only ever grows.
    pub fn set_handshake_deadline(&self, deadline: Duration) {
        let mut live = self.lock();
        live.tombstone_ttl = live.tombstone_ttl.max(deadline + Duration::from_secs(1));
    }

    /// Makes `entry` the live session of `id`. Requires proof that the newcomer's
    /// CLIENT_FINISH verified (spec 7.3): a replayed HELLO can never get here.
    /// `key_lookup` is when the handshake started to look up the identity's key: if the
    /// identity was revoked or removed since, the session is refused, before it can take
    /// anything over.
    pub fn register(
        self: &Arc<Self>,
        _verified: &FinishVerified,
        id: &Id,
        entry: Entry,
        policy: TakeoverPolicy,
        key_lookup: Instant,
    ) -> Result<Registration, RegisterError> {
        let (conn, epoch) = (entry.conn, entry.epoch);
        let mut live = self.lock();
        let ttl = live.tombstone_ttl;
        // One clock read for every age below.
        let now = Instant::now();
        let age = |at: Instant| now.saturating_duration_since(at);
        // Pruned at most once a second (a pass over the map per handshake would cost a
        // storm of revocations dear); an entry older than `ttl` is ignored.
        if live
            .pruned
            .is_none_or(|at| age(at) >= Duration::from_secs(1))
        {
            live.tombstones.retain(|_, at| age(*at) < ttl);
            live.pruned = Some(now);
        }
        if live
            .tombstones
            .get(id)
            .is_some_and(|at| *at >= key_lookup && age(*at) < ttl)
        {
            return Err(RegisterError::Invalidated);
        }
        // A revocation older than `ttl` is forgotten: a handshake that looked its key up
        // before that cannot be told apart from one that did not.
        if !ttl.is_zero() && age(key_lookup) >= ttl {
            return Err(RegisterError::TooLate);
        }
        if let Some(old) = live.sessions.get(id) {
            if policy == TakeoverPolicy::Reject {
                return Err(RegisterError::TakeoverRefused);
            }
            old.mailbox.ask_close(
                CloseCode::TAKEN_OVER,
                "a newer session of this identity took over",
            );
            if !self.in_fleet() {
                self.note_takeover(id, old.peer, entry.peer);
            }
        }
        // Whether the identity may have queued messages, for the session's start (a
        // message queued after this reaches it through its mailbox).
        entry.mailbox.lock().mark = live.queued.get(id);
        live.sessions.insert(id.clone(), entry);
        Ok(Registration {
            registry: self.clone(),
            id: id.clone(),
            conn,
            epoch,
        })
    }

    /// After `id` was revoked or removed in the store: refuses every handshake of `id`
    /// whose key lookup started before now, and closes its live session with `code`.
    /// Returns whether there was a live session.
    pub fn invalidate(&self, id: &Id, code: CloseCode, reason: &'static str) -> bool {
        let mut live = self.lock();
        live.tombstones.insert(id.clone(), Instant::now());
        live.ask_close(id, code, reason)
    }

    /// In a fleet: the enrollments of `id` made before entry `before` of the fleet's
    /// log were revoked or removed (an entry the node verified): as
    /// [`Registry::invalidate`], but the live session is closed only if it was made
    /// with the key of one of them. Returns whether it was.
    pub fn invalidate_before(
        &self,
        id: &Id,
        before: u64,
        code: CloseCode,
        reason: &'static str,
    ) -> bool {
        let mut live = self.lock();
        live.tombstones.insert(id.clone(), Instant::now());
        match live.sessions.get(id) {
            Some(e) if e.log_pos < before => {
                e.mailbox.ask_close(code, reason);
                true
            }
            _ => false,
        }
    }

    /// In a fleet: `id`'s claims up to `epoch` were superseded (another node took the
    /// identity over from that claim; claim epochs only grow, fleet-wide). Asks the
    /// live session to close if its claim is one of them (a newer session here is left
    /// alone). Returns whether a session was asked to close. (A registration still on
    /// its way is refused by the fleet's state machine, told first.)
    pub fn close_epoch(&self, id: &Id, epoch: u64, code: CloseCode, reason: &'static str) -> bool {
        let live = self.lock();
        match live.sessions.get(id) {
            Some(e) if e.epoch <= epoch => {
                e.mailbox.ask_close(code, reason);
                true
            }
            _ => false,
        }
    }

    /// A message was queued for `id` (spec 8.8): marks it as one that may have some, and
    /// tells its live session, if any. Marking and registering are one lock apart: a
    /// session registered before is told, one registered after sees the mark.
    pub fn queued(&self, id: &Id) {
        let mut live = self.lock();
        live.queued.queued(id);
        if let Some(e) = live.sessions.get(id) {
            e.mailbox.notify_queued();
        }
    }

    /// The number of the last mark set (`Marks::last`).
    pub fn marks_last(&self) -> u64 {
        self.lock().queued.last()
    }

    /// Unmarks the identities without messages (`Marks::prune`).
    pub fn prune_marks(&self, queued: &std::collections::HashSet<Id>, before: u64) {
        self.lock().queued.prune(queued, before);
    }

    /// A session of `id` found its queue empty: unmarked, if nothing marked it since
    /// `mark` (the mark it was registered with).
    pub fn queue_empty(&self, id: &Id, mark: u64) {
        self.lock().queued.empty(id, mark);
    }

    /// In a fleet: this node lost its claims, or may have (fenced, declared dead): every
    /// live session is asked to close. Returns how many there were.
    pub fn close_all(&self, code: CloseCode, reason: &'static str) -> usize {
        let live = self.lock();
        for e in live.sessions.values() {
            e.mailbox.ask_close(code, reason);
        }
        live.sessions.len()
    }

    /// Whether `id` has a live session here.
    pub fn is_live(&self, id: &Id) -> bool {
        self.lock().sessions.contains_key(id)
    }

    /// Logs identities that keep taking each other over: two devices sharing one id.
    fn note_takeover(&self, id: &Id, old: SocketAddr, new: SocketAddr) {
        let now = Instant::now();
        let mut map = self.takeovers.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, times| {
            times
                .back()
                .is_some_and(|t| now.duration_since(*t) < PING_PONG_WINDOW)
        });
        let times = map.entry(id.clone()).or_default();
        times.push_back(now);
        while times
            .front()
            .is_some_and(|t| now.duration_since(*t) >= PING_PONG_WINDOW)
        {
            times.pop_front();
        }
        if times.len() >= PING_PONG_TAKEOVERS {
            warn!(
                id = %id, old_peer = %old, new_peer = %new, takeovers = times.len(),
                "identity taken over repeatedly within {}s: two devices may share it; consider takeover = \"reject\"",
                PING_PONG_WINDOW.as_secs()
            );
        }
    }

    /// The mailbox of `id`'s live session.
    pub fn mailbox(&self, id: &Id) -> Option<Arc<Mailbox>> {
        self.lock().sessions.get(id).map(|e| e.mailbox.clone())
    }

    /// Asks `id`'s live session to close. Returns whether there was one.
    pub fn close(&self, id: &Id, code: CloseCode, reason: &'static str) -> bool {
        self.lock().ask_close(id, code, reason)
    }

    /// Sends a REQUEST (returning the device's answer) or a MESSAGE (returning `None`
    /// once written) to `id`'s live session: here, or in a fleet on the node holding it.
    pub async fn send(
        &self,
        id: &Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Reply>, SendError> {
        match (self.mailbox(id), self.fleet.get()) {
            (None, Some(fleet)) => {
                fleet
                    .send_elsewhere(id.clone(), kind, payload, timeout)
                    .await
            }
            _ => self.send_here(id, kind, payload, timeout).await,
        }
    }

    /// [`Registry::send`] to a session of this daemon only.
    pub async fn send_here(
        &self,
        id: &Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Reply>, SendError> {
        let mailbox = self
            .mailbox(id)
            .ok_or_else(|| SendError::Offline(id.to_string()))?;
        Self::send_to(&self.sends, mailbox, kind, payload, timeout).await
    }

    /// [`Registry::send_here`] to `id`'s session if its claim epoch is `epoch` or older
    /// (the claim the origin read may be a newer claim of this node that still covers
    /// the session): a fleet send is bound to the session its origin addressed, never
    /// to a later one.
    pub async fn send_here_at(
        &self,
        id: &Id,
        epoch: u64,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Reply>, SendError> {
        let mailbox = match self.lock().sessions.get(id) {
            Some(e) if e.epoch <= epoch => e.mailbox.clone(),
            Some(_) => return Err(SendError::SessionEnded),
            None => return Err(SendError::Offline(id.to_string())),
        };
        Self::send_to(&self.sends, mailbox, kind, payload, timeout).await
    }

    /// Sends to one session's mailbox and waits for the outcome, up to `timeout`.
    async fn send_to(
        counts: &SendCounts,
        mailbox: Arc<Mailbox>,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Reply>, SendError> {
        let gone = || SendError::SessionEnded;
        let wait = async {
            match kind {
                SendKind::Request => {
                    let (reply, rx) = oneshot::channel();
                    let _waiting = Waiting::new(&counts.waiting);
                    mailbox
                        .send(Box::new(Command::Request { payload, reply }))
                        .await
                        .map_err(|_| gone())?;
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    let answer = rx.await.map_err(|_| gone())?;
                    if answer.is_ok() {
                        counts.answered.fetch_add(1, Ordering::Relaxed);
                    }
                    answer.map(Some)
                }
                SendKind::Message => {
                    let (sent, rx) = oneshot::channel();
                    mailbox
                        .send(Box::new(Command::Message { payload, sent }))
                        .await
                        .map_err(|_| gone())?;
                    let written = rx.await.map_err(|_| gone())?;
                    if written.is_ok() {
                        counts.messages.fetch_add(1, Ordering::Relaxed);
                    }
                    written.map(|()| None)
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(SendError::Timeout(timeout)))
    }

    /// Each live session's [`Mailbox::totals`].
    pub fn totals(&self) -> Vec<[u64; TOTALS]> {
        let live = self.lock();
        live.sessions.values().map(|e| e.mailbox.totals()).collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().sessions.len()
    }

    /// Whether there are no live sessions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The identities with a live session.
    pub fn ids(&self) -> Vec<Id> {
        self.lock().sessions.keys().cloned().collect()
    }

    /// Every live session, sorted by identity.
    pub fn list(&self) -> Vec<SessionInfo> {
        let live = self.lock();
        let mut out: Vec<SessionInfo> = live
            .sessions
            .iter()
            .map(|(id, e)| SessionInfo {
                id: id.to_string(),
                peer: e.peer.to_string(),
                since: e
                    .since
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                frames_in: e.mailbox.frames_in.load(Ordering::Relaxed),
                frames_out: e.mailbox.frames_out.load(Ordering::Relaxed),
                node: None,
                elsewhere: false,
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::testing::established_in;
    use crate::proto::Mode;
    use std::task::Waker;

    /// Registers connection `conn` of `id` (after a real handshake) whose key was
    /// looked up at `looked_up`, in a registry whose handshakes have 1 s.
    fn register(
        registry: &Arc<Registry>,
        id: &Id,
        conn: u64,
        looked_up: Instant,
    ) -> Result<Registration, RegisterError> {
        registry.set_handshake_deadline(Duration::from_secs(1));
        let (_, est) = established_in(Mode::Authenticated, 1024);
        let entry = Entry {
            conn,
            epoch: 0,
            log_pos: 0,
            peer: "127.0.0.1:1".parse().unwrap(),
            since: SystemTime::now(),
            mailbox: Arc::new(Mailbox::default()),
        };
        registry.register(&est.verified, id, entry, TakeoverPolicy::Replace, looked_up)
    }

    /// A revocation that lands while a handshake holds the key it looked up (its claim
    /// in a fleet can take a while): the session is refused however late it registers,
    /// and one whose key was looked up after the revocation is not.
    #[test]
    fn a_revocation_after_the_key_was_looked_up_refuses_the_registration() {
        let registry = Arc::new(Registry::default());
        let id = Id::new("race-4").unwrap();
        let looked_up = Instant::now();
        assert!(!registry.invalidate(&id, CloseCode::REVOKED, "revoked"));
        let refused = register(&registry, &id, 1, looked_up);
        assert_eq!(refused.err(), Some(RegisterError::Invalidated));
        assert!(!registry.is_live(&id));
        // Enrolled again and looked up after the revocation: served.
        let after = Instant::now() + Duration::from_millis(1);
        let registered = register(&registry, &id, 2, after);
        assert!(registered.is_ok());
        assert!(registry.is_live(&id));
    }

    /// A handshake older than revocations are remembered (its deadline and a second)
    /// cannot be told apart from one that looked its key up before a revocation now
    /// forgotten: refused.
    #[test]
    fn a_handshake_older_than_revocations_are_remembered_is_refused() {
        let registry = Arc::new(Registry::default());
        let id = Id::new("slow").unwrap();
        let Some(looked_up) = Instant::now().checked_sub(Duration::from_millis(2001)) else {
            return;
        };
        let refused = register(&registry, &id, 1, looked_up);
        assert_eq!(refused.err(), Some(RegisterError::TooLate));
    }

    /// A session fetches from the queue at its start only for a marked identity: a
    /// message queued before the registration marks it, one queued after is told to the
    /// session; an empty fetch unmarks it, unless a message was queued since.
    #[test]
    fn a_queued_message_is_never_missed_by_a_session_that_skips_its_first_fetch() {
        let registry = Arc::new(Registry::default());
        let id = Id::new("sleepy").unwrap();
        let now = Instant::now();
        let mark = |registry: &Arc<Registry>| registry.mailbox(&id).unwrap().take_mark();
        // Nothing queued: no mark, no fetch.
        let first = register(&registry, &id, 1, now).unwrap();
        assert_eq!(mark(&registry), None);
        // Queued while the session lives: its mailbox is told.
        let mailbox = registry.mailbox(&id).unwrap();
        registry.queued(&id);
        assert!(matches!(poll(&mailbox), Poll::Ready(Mail::Queued)));
        drop(first);
        // The next session sees the mark...
        let second = register(&registry, &id, 2, now).unwrap();
        let seen = mark(&registry).expect("marked");
        // ...and a message queued after its empty fetch read the queue keeps the mark.
        registry.queued(&id);
        registry.queue_empty(&id, seen);
        drop(second);
        let third = register(&registry, &id, 3, now).unwrap();
        let seen = mark(&registry).expect("still marked");
        // An empty fetch with nothing queued since: unmarked.
        registry.queue_empty(&id, seen);
        drop(third);
        let _fourth = register(&registry, &id, 4, now).unwrap();
        assert_eq!(mark(&registry), None);
    }

    fn message() -> (Box<Command>, oneshot::Receiver<Result<(), SendError>>) {
        let (sent, rx) = oneshot::channel();
        let cmd = Command::Message {
            payload: Bytes::from_static(b"m"),
            sent,
        };
        (Box::new(cmd), rx)
    }

    fn poll(m: &Mailbox) -> Poll<Mail> {
        m.poll_mail(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test]
    async fn a_full_queue_never_holds_back_a_close() {
        let m = Mailbox::default();
        for _ in 0..MAILBOX_COMMANDS {
            m.send(message().0).await.unwrap();
        }
        // The queue is full: one more sender waits for room...
        let waiting = tokio::time::timeout(Duration::from_millis(50), m.send(message().0));
        assert!(waiting.await.is_err(), "a 17th command was taken");
        // ...but a close is taken at once, and first.
        m.ask_close(CloseCode::TAKEN_OVER, "taken over");
        assert!(matches!(
            poll(&m),
            Poll::Ready(Mail::Close(CloseCode::TAKEN_OVER, _))
        ));
        // Then the commands, in order, each giving its room back.
        assert!(matches!(poll(&m), Poll::Ready(Mail::Command(_))));
        m.send(message().0).await.unwrap();
        for _ in 0..MAILBOX_COMMANDS {
            assert!(matches!(poll(&m), Poll::Ready(Mail::Command(_))));
        }
        assert!(poll(&m).is_pending());
    }

    #[tokio::test]
    async fn a_session_that_ends_fails_queued_and_waiting_commands() {
        let m = Arc::new(Mailbox::default());
        let mut queued = Vec::new();
        for _ in 0..MAILBOX_COMMANDS {
            let (cmd, rx) = message();
            m.send(cmd).await.unwrap();
            queued.push(rx);
        }
        let waiting = tokio::spawn({
            let m = m.clone();
            async move { m.send(message().0).await.is_err() }
        });
        tokio::task::yield_now().await;
        m.end();
        assert!(waiting.await.unwrap(), "a waiting sender was not told");
        for rx in queued {
            assert!(
                rx.await.is_err(),
                "a queued command was neither sent nor failed"
            );
        }
        assert!(m.send(message().0).await.is_err());
    }

    #[tokio::test]
    async fn a_command_wakes_the_session() {
        let m = Arc::new(Mailbox::default());
        let session = tokio::spawn({
            let m = m.clone();
            async move { std::future::poll_fn(|cx| m.poll_mail(cx)).await }
        });
        tokio::task::yield_now().await;
        m.send(message().0).await.unwrap();
        let mail = tokio::time::timeout(Duration::from_secs(5), session).await;
        assert!(matches!(mail, Ok(Ok(Mail::Command(_)))));
    }
}
