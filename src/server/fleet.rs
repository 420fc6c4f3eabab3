//! Several daemons, one fleet: the rules of spec 7.3 across daemons that share a
//! PostgreSQL store (docs/CLUSTER.md is the design, with its failure cases).
//!
//! - Each daemon is a *node*: a row in `nodes` with a heartbeat renewed every
//!   [`HEARTBEAT`]. A node whose heartbeat is older than [`STALE`] is dead: any node
//!   deletes it, and its claims with it.
//! - A session is established only once its node *claims* the identity
//!   (`tally_claim`, one statement): free, held by a dead node, or taken over from a
//!   live one (whose node is told on `tally_close`, with the claim's epoch: a late
//!   notice never closes a newer session), or refused under `takeover = "reject"`.
//! - A node that cannot renew its heartbeat for [`FENCE_AFTER`] *fences* itself: it
//!   closes every session and refuses handshakes with BUSY until it can, so that when
//!   the others declare it dead and serve its devices, it no longer does.
//! - Every change to an identity is announced on `tally_identity`: each node refreshes
//!   that identity in its key index and closes its session if it was revoked or
//!   removed. A node whose notification connection drops reloads its whole index and
//!   checks its claims when it is back (it may have missed notices).
//! - A send to a device whose session is on another node goes through `sends` and
//!   `tally_send`; the answer comes back through the same row and `tally_result`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backend::{BoxFuture, Reply, SendError, SendKind};
use crate::config::TakeoverPolicy;
use crate::proto::{CloseCode, Id, Status};
use crate::server::registry::{self, Fleetwide, Registry, SessionInfo};
use crate::store::postgres::{channel, PendingSend, Postgres, SendOutcome};
use crate::store::{Store, StoreError};

/// How often a node renews its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node whose heartbeat has not been renewed for this long fences itself.
pub const FENCE_AFTER: Duration = Duration::from_secs(3);
/// A node whose heartbeat is older than this is dead: its claims are free.
pub const STALE: Duration = Duration::from_secs(5);
/// How long a handshake waits for its claim (the database's answer, and another
/// handshake of the same identity on this node) before it is refused BUSY.
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the notification connection may take to answer a ping (sent every
/// [`HEARTBEAT`]) before it is taken for dead, reopened, and the missed notices caught
/// up with.
pub const LISTEN_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a session could not claim its identity.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// A live session on another node holds it and `takeover = "reject"`.
    #[error("identity has a live session on node {node} and takeover = \"reject\"")]
    Held {
        /// That node's address.
        node: String,
    },
    /// The database cannot be reached, or this node is fenced.
    #[error("the fleet's database is unavailable: {0}")]
    Unavailable(String),
}

/// This daemon's part in the fleet.
pub struct Fleet {
    store: Arc<Store>,
    registry: Arc<Registry>,
    /// This node's name in `nodes`: random, new at every start.
    node: String,
    /// Its listening address, as `tallyd sessions` shows it.
    addr: Mutex<String>,
    /// Sends of this node waiting for their answer, by call number.
    waiting: Mutex<HashMap<i64, oneshot::Sender<()>>>,
    /// One lock per identity being claimed on this node: its handshakes claim and
    /// register it one at a time.
    claiming: Mutex<HashMap<Id, Arc<tokio::sync::Mutex<()>>>>,
    /// Releases still to do (one failed, or must wait): tried every [`HEARTBEAT`] by
    /// their own task, so that no claim is left behind to refuse the device elsewhere.
    releasing: Mutex<Vec<Release>>,
    /// When this node joined (its first heartbeat was sent no earlier).
    joined: Instant,
    /// Bumped each time the notification connection is lost: a catch-up that finishes
    /// lets the node register sessions again only if none was lost since it began.
    deafness: std::sync::atomic::AtomicU64,
    /// Identity notices, for the task that applies them in order.
    identities: mpsc::UnboundedSender<(String, String)>,
}

/// A release still to do.
#[derive(Debug)]
enum Release {
    /// This node's claim of the id with this epoch.
    Claim(String, u64),
    /// Every claim of this node of the id, once no session of it is live here: a claim
    /// whose epoch is not known (its statement's answer was lost), or one that must stay
    /// while an older session of the id is live here (the claim's row, naming this node
    /// with a newer epoch, still covers that session: a takeover elsewhere closes it).
    Idle(String, Instant),
}

/// Takes the [`Release::Idle`] entries of the ids `which` picks out of `queue`: each
/// id once, with the time of its oldest entry.
fn take_idle(queue: &mut Vec<Release>, which: impl Fn(&str) -> bool) -> HashMap<String, Instant> {
    let mut oldest: HashMap<String, Instant> = HashMap::new();
    queue.retain(|r| match r {
        Release::Idle(id, at) if which(id) => {
            let e = oldest.entry(id.clone()).or_insert(*at);
            *e = (*e).min(*at);
            false
        }
        _ => true,
    });
    oldest
}

/// A handshake's hold on its identity's claim lock on this node, from its claim to its
/// registration (dropped after either).
pub struct Claiming {
    fleet: Arc<Fleet>,
    id: Id,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for Claiming {
    fn drop(&mut self) {
        let mut locks = lock(&self.fleet.claiming);
        // The map's reference and this guard's: nobody else waits for it.
        if locks
            .get(&self.id)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            locks.remove(&self.id);
        }
        self.guard.take();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("node", &self.node)
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}

/// The notification connection: its messages, and the client that keeps it open (and
/// pings it).
struct Listening {
    client: tokio_postgres::Client,
    notices: mpsc::UnboundedReceiver<tokio_postgres::Notification>,
}

fn pg(store: &Store) -> &Postgres {
    store
        .engine()
        .postgres()
        .expect("a fleet runs on the PostgreSQL store")
}

/// Opens `node`'s notification connection and listens on every channel. Its
/// `application_name` says what it is (`tallyd notices <node>` in `pg_stat_activity`).
async fn listen(pg: &Postgres, node: &str) -> Result<Listening, StoreError> {
    let mut config = pg.config().clone();
    let app = config.get_application_name().unwrap_or("tallyd").to_owned();
    config.application_name(format!("{app} notices {node}"));
    let (client, mut connection) = config
        .connect(pg.tls())
        .await
        .map_err(|e| pg.error_chain(&e))?;
    let (tx, notices) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    warn!(error = %e, "fleet: the notification connection failed");
                    return;
                }
                None => return,
            }
        }
    });
    let sql: String = [
        channel::IDENTITY,
        channel::CLOSE,
        channel::SEND,
        channel::RESULT,
    ]
    .iter()
    .map(|c| format!("LISTEN {c};"))
    .collect();
    client.batch_execute(&sql).await.map_err(|e| pg.error(e))?;
    Ok(Listening { client, notices })
}

impl Fleet {
    /// Joins the fleet as a new node listening on `addr`, and starts listening for
    /// notices: before the key index is loaded (`Store::load_key_index`), so that no
    /// change committed after the load goes unseen. Call [`Fleet::run`] next.
    pub fn join(
        store: Arc<Store>,
        registry: Arc<Registry>,
        addr: SocketAddr,
    ) -> Result<(Arc<Fleet>, FleetTasks), StoreError> {
        let node = hex::encode(&crate::secrets::random_bytes()[..6]);
        let joined = Instant::now();
        let pg = pg(&store);
        let listening = pg.block_on(async {
            let listening = listen(pg, &node).await?;
            pg.join(&node, &addr.to_string()).await?;
            Ok::<_, StoreError>(listening)
        })?;
        info!(node, store = pg.place(), "joined the fleet");
        let (identities, identity_notices) = mpsc::unbounded_channel();
        let fleet = Arc::new(Fleet {
            store,
            registry: registry.clone(),
            node,
            addr: Mutex::new(addr.to_string()),
            waiting: Mutex::default(),
            claiming: Mutex::default(),
            releasing: Mutex::default(),
            joined,
            deafness: Default::default(),
            identities,
        });
        registry.join_fleet(Arc::new(Handle(Arc::downgrade(&fleet))));
        Ok((
            fleet.clone(),
            FleetTasks {
                fleet,
                listening,
                identity_notices,
            },
        ))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// This node's listening address.
    pub fn addr(&self) -> String {
        lock(&self.addr).clone()
    }

    /// The address this node listens on, once bound (the configured one may be port 0,
    /// or replaced by systemd's socket), as the fleet's `tallyd sessions` shows it.
    pub async fn advertise(self: &Arc<Self>, addr: SocketAddr) {
        *lock(&self.addr) = addr.to_string();
        let this = self.clone();
        let done = self
            .pg()
            .spawn(async move { this.pg().join(&this.node, &this.addr()).await })
            .await;
        if let Ok(Err(e)) = done {
            warn!(error = %e, "fleet: could not record this node's address");
        }
    }

    fn pg(&self) -> &Postgres {
        pg(&self.store)
    }

    /// Whether this node is fenced (cut off from the database).
    pub fn fenced(&self) -> bool {
        self.registry.is_fenced()
    }

    /// Claims `id` for a new session from `peer`: its epoch, and the hold on the
    /// identity's claim lock on this node to keep until the session is registered (or
    /// refused), or why not. Waits at most [`CLAIM_TIMEOUT`].
    pub async fn claim(
        self: &Arc<Self>,
        id: &Id,
        peer: SocketAddr,
        policy: TakeoverPolicy,
    ) -> Result<(u64, Claiming), ClaimError> {
        if self.fenced() {
            return Err(ClaimError::Unavailable(
                "this node is fenced: it could not renew its heartbeat".into(),
            ));
        }
        // A claim now could take the id from a live session elsewhere, for a session
        // this node would refuse anyway.
        if self.registry.is_deaf() {
            return Err(ClaimError::Unavailable(
                "this node is catching up with the fleet's notices".into(),
            ));
        }
        let mutex = self.claim_lock(id);
        let (tx, mut rx) = oneshot::channel();
        let (this, id2) = (self.clone(), id.clone());
        // On the store's runtime, to the end even if this handshake stops waiting: a
        // claim made too late is released, and the lock is held until then, so that the
        // next handshake's claim comes after it.
        self.pg().spawn(async move {
            let claiming = Claiming {
                fleet: this.clone(),
                id: id2.clone(),
                guard: Some(mutex.lock_owned().await),
            };
            if tx.is_closed() {
                return;
            }
            let outcome = this.claim_now(&id2, peer, policy).await;
            if let Err(ClaimError::Unavailable(_)) = &outcome {
                // The statement may have run and its answer been lost: this node may
                // hold a claim it does not know the epoch of.
                lock(&this.releasing).push(Release::Idle(id2.to_string(), Instant::now()));
            }
            if let Err(Ok((epoch, claiming))) = tx.send(outcome.map(|e| (e, claiming))) {
                // Claimed after the handshake stopped waiting.
                this.unclaim(&id2, epoch);
                drop(claiming);
            }
        });
        match tokio::time::timeout(CLAIM_TIMEOUT, &mut rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(ClaimError::Unavailable("the claim was dropped".into())),
            Err(_) => {
                // The claim may have been sent just now: it is not left behind.
                rx.close();
                if let Ok(Ok((epoch, claiming))) = rx.try_recv() {
                    self.unclaim(id, epoch);
                    drop(claiming);
                }
                Err(ClaimError::Unavailable(format!(
                    "no claim within {CLAIM_TIMEOUT:?}"
                )))
            }
        }
    }

    /// The claim lock of `id` on this node.
    fn claim_lock(&self, id: &Id) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = lock(&self.claiming);
        if locks.len() >= 1024 {
            // Locks left by handshakes that gave up waiting.
            locks.retain(|_, m| Arc::strong_count(m) > 1);
        }
        locks.entry(id.clone()).or_default().clone()
    }

    /// [`Fleet::claim`]'s statement, with the identity's claim lock held.
    async fn claim_now(
        &self,
        id: &Id,
        peer: SocketAddr,
        policy: TakeoverPolicy,
    ) -> Result<u64, ClaimError> {
        let claim = self
            .pg()
            .claim(
                id.as_str(),
                &self.node,
                &peer.to_string(),
                policy == TakeoverPolicy::Reject,
                self.registry.is_live(id),
                STALE,
            )
            .await
            .map_err(|e| ClaimError::Unavailable(e.to_string()))?;
        let old = claim.old_node.unwrap_or_default();
        match claim.outcome.as_str() {
            "refused" => Err(ClaimError::Held { node: old }),
            outcome => {
                if outcome == "took_over" && old != self.node {
                    debug!(old_node = old, "took the identity over from another node");
                }
                if claim.in_a_row as usize >= registry::PING_PONG_TAKEOVERS {
                    warn!(
                        id = %id, old_peer = claim.old_peer.as_deref().unwrap_or(""),
                        new_peer = %peer, takeovers = claim.in_a_row,
                        "identity taken over repeatedly, each within {}s of the last, across the fleet: two devices may share it; consider takeover = \"reject\"",
                        registry::PING_PONG_WINDOW.as_secs()
                    );
                }
                Ok(claim.epoch)
            }
        }
    }

    /// A claim of `id` with `epoch` that was not registered (its session was refused,
    /// or its handshake gave up), with the id's claim lock held: released, unless an
    /// older session of `id` is live here. Its row now names this node with the newer
    /// epoch, which still covers that session (a takeover elsewhere closes every session
    /// of the id here up to that epoch); it is released once no session of the id is
    /// live here ([`Release::Idle`]).
    pub fn unclaim(self: &Arc<Self>, id: &Id, epoch: u64) {
        if self.registry.is_live(id) {
            lock(&self.releasing).push(Release::Idle(id.to_string(), Instant::now()));
        } else {
            self.release(id, epoch);
        }
    }

    /// Releases a claim (a session refused after its claim, or ended), and a claim of
    /// the id waiting for no session of it to be live here ([`Release::Idle`]).
    pub fn release(self: &Arc<Self>, id: &Id, epoch: u64) {
        let this = self.clone();
        let id = id.to_string();
        self.pg().spawn(async move {
            this.release_now(&id, epoch).await;
            let waiting = take_idle(&mut lock(&this.releasing), |i| i == id).remove(&id);
            if let Some(since) = waiting {
                this.release_idle(id, since).await;
            }
        });
    }

    /// Releases a claim now, or queues it to be tried again.
    async fn release_now(&self, id: &str, epoch: u64) {
        if let Err(e) = self.pg().release(id, &self.node, epoch).await {
            info!(id, error = %e, "fleet: could not release a claim; trying again in a second");
            lock(&self.releasing).push(Release::Claim(id.to_owned(), epoch));
        }
    }

    /// [`Release::Idle`]: with the id's claim lock held (no claim of it is on its way
    /// here), if no session of it is live here, deletes every claim of it this node
    /// holds. Queued again otherwise, and for as long as a statement whose answer was
    /// lost may still commit (the statement timeout and a second after it was queued).
    async fn release_idle(self: &Arc<Self>, id: String, since: Instant) {
        let Ok(key) = Id::new(&id) else { return };
        let _claiming = Claiming {
            fleet: self.clone(),
            id: key.clone(),
            guard: Some(self.claim_lock(&key).lock_owned().await),
        };
        if self.registry.is_live(&key) {
            lock(&self.releasing).push(Release::Idle(id, since));
            return;
        }
        let done = self.pg().release_all(&id, &self.node).await;
        if let Err(e) = &done {
            debug!(id, error = %e, "fleet: could not release a claim; trying again in a second");
        }
        let settled =
            since.elapsed() > crate::store::postgres::STATEMENT_TIMEOUT + Duration::from_secs(1);
        if done.is_err() || !settled {
            lock(&self.releasing).push(Release::Idle(id, since));
        }
    }

    /// Does the releases queued, once (those that fail or must wait are queued again).
    async fn releases(self: &Arc<Self>) {
        let mut queued = std::mem::take(&mut *lock(&self.releasing));
        let idle = take_idle(&mut queued, |_| true);
        for release in queued {
            if let Release::Claim(id, epoch) = release {
                self.release_now(&id, epoch).await;
            }
        }
        for (id, since) in idle {
            self.release_idle(id, since).await;
        }
    }

    /// Whether `id` has a live session on any node.
    pub async fn is_live(self: &Arc<Self>, id: &Id) -> Result<bool, StoreError> {
        if self.registry.is_live(id) {
            return Ok(true);
        }
        let this = self.clone();
        let id = id.to_string();
        self.pg()
            .spawn(async move { this.pg().holder(&id, STALE).await })
            .await
            .map_err(|e| self.pg().error(e))?
            .map(|h| h.is_some())
    }

    /// Every session of the fleet, sorted by identity: this node's with their frame
    /// counts, the others' as their claims show them.
    pub async fn sessions(self: &Arc<Self>) -> Result<Vec<SessionInfo>, StoreError> {
        let this = self.clone();
        let claims = self
            .pg()
            .spawn(async move { this.pg().fleet_sessions(STALE).await })
            .await
            .map_err(|e| self.pg().error(e))??;
        let mut here: HashMap<String, SessionInfo> = self
            .registry
            .list()
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let mut out = Vec::with_capacity(claims.len().max(here.len()));
        for c in claims {
            match here.remove(&c.id) {
                Some(mut s) if c.node == self.node => {
                    s.node = Some(self.addr());
                    out.push(s);
                }
                _ => out.push(SessionInfo {
                    id: c.id,
                    peer: c.peer,
                    since: c.since.max(0) as u64,
                    frames_in: 0,
                    frames_out: 0,
                    node: Some(c.addr),
                    elsewhere: c.node != self.node,
                }),
            }
        }
        // Sessions whose claim is not written yet (or was lost: they are being closed).
        for (_, mut s) in here {
            s.node = Some(self.addr());
            out.push(s);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// A send to a device whose session is on another node.
    async fn send_elsewhere(
        self: Arc<Self>,
        id: Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Reply>, SendError> {
        let this = self.clone();
        let run = async move {
            let pg = this.pg();
            let failed = |e: StoreError| SendError::Elsewhere(e.to_string());
            let holder = pg.holder(id.as_str(), STALE).await.map_err(failed)?;
            let Some(node) = holder.filter(|n| *n != this.node) else {
                return Err(SendError::Offline(id.to_string()));
            };
            let bytes = crate::secrets::random_bytes();
            let call = i64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")) & i64::MAX;
            let (tx, rx) = oneshot::channel();
            this.lock_waiting().insert(call, tx);
            let send = PendingSend {
                origin: this.node.clone(),
                id: id.to_string(),
                request: kind == SendKind::Request,
                payload: payload.to_vec(),
                timeout,
            };
            let asked = pg.put_send(call, &node, &this.node, &send).await;
            // The holder gives up at `timeout`, and says so: a little longer here.
            let answered = match asked {
                Ok(()) => tokio::time::timeout(timeout + Duration::from_secs(1), rx)
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            this.lock_waiting().remove(&call);
            let outcome = pg.finish_send(call).await;
            asked.map_err(failed)?;
            match outcome.map_err(failed)? {
                Some(SendOutcome::Answer(status, body)) => Ok(Some(Reply {
                    status: Status(status),
                    payload: body.into(),
                })),
                Some(SendOutcome::Sent) => Ok(None),
                Some(SendOutcome::Failed(kind, why)) => Err(match kind.as_str() {
                    "offline" => SendError::Offline(id.to_string()),
                    "ended" => SendError::SessionEnded,
                    "timeout" => SendError::Timeout(timeout),
                    _ => SendError::Elsewhere(why),
                }),
                None if answered => Err(SendError::Elsewhere("the answer was lost".into())),
                None => Err(SendError::Timeout(timeout)),
            }
        };
        self.pg()
            .spawn(run)
            .await
            .unwrap_or_else(|e| Err(SendError::Elsewhere(e.to_string())))
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<i64, oneshot::Sender<()>>> {
        lock(&self.waiting)
    }

    /// Serves a send another node handed to this one.
    async fn serve_send(self: Arc<Self>, call: i64) {
        let pg = self.pg();
        let send = match pg.take_send(call).await {
            Ok(Some(send)) => send,
            Ok(None) => return,
            Err(e) => {
                warn!(call, error = %e, "fleet: could not read a send");
                return;
            }
        };
        let kind = if send.request {
            SendKind::Request
        } else {
            SendKind::Message
        };
        let outcome = match Id::new(&send.id) {
            Err(e) => SendOutcome::Failed("refused".into(), e.to_string()),
            Ok(id) => match self
                .registry
                .send_here(&id, kind, send.payload.into(), send.timeout)
                .await
            {
                Ok(Some(reply)) => SendOutcome::Answer(reply.status.0, reply.payload.to_vec()),
                Ok(None) => SendOutcome::Sent,
                Err(e) => {
                    let kind = match e {
                        SendError::Offline(_) => "offline",
                        SendError::SessionEnded => "ended",
                        SendError::Timeout(_) => "timeout",
                        _ => "refused",
                    };
                    SendOutcome::Failed(kind.into(), e.to_string())
                }
            },
        };
        if let Err(e) = pg.answer_send(call, &send.origin, &outcome).await {
            warn!(call, error = %e, "fleet: could not write a send's answer");
        }
    }

    /// Leaves the fleet (a daemon shutting down): its claims go with its row.
    pub async fn leave(self: &Arc<Self>) {
        let this = self.clone();
        let left = self
            .pg()
            .spawn(async move { this.pg().leave(&this.node).await })
            .await;
        match left {
            Ok(Ok(())) => info!(node = self.node, "left the fleet"),
            Ok(Err(e)) => {
                warn!(error = %e, "could not leave the fleet (the others will see this node die)")
            }
            Err(e) => {
                warn!(error = %e, "could not leave the fleet (the others will see this node die)")
            }
        }
    }

    /// Closes every session: this node lost its claims, or may have (`fenced`: and
    /// registers none until it is unfenced). Returns false if it was fenced already.
    fn drop_sessions(&self, fenced: bool, why: &'static str) -> bool {
        let Some(n) = self.registry.lose_claims(fenced, CloseCode::SHUTDOWN, why) else {
            return false;
        };
        if n > 0 {
            warn!(
                sessions = n,
                "fleet: {why}: closing every session of this node"
            );
        }
        true
    }

    /// After the notification connection was down (registrations are refused until
    /// this is done): reloads the key index, closes the sessions of identities revoked,
    /// removed or enrolled again meanwhile, and those whose claims are no longer this
    /// node's. Tried again every [`HEARTBEAT`] until it succeeds, unless the connection
    /// is lost again meanwhile (`deafness` moved on: that loss's catch-up takes over).
    async fn catch_up(self: Arc<Self>, deafness: u64, stop: CancellationToken) {
        loop {
            match self.try_catch_up().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "fleet: could not catch up with the notices missed (no session is registered meanwhile); trying again")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            if self.deafness.load(Ordering::SeqCst) != deafness {
                return;
            }
        }
        if self.registry.hear_again(deafness) {
            info!("fleet: caught up with the notices missed: serving again");
        }
    }

    async fn try_catch_up(self: &Arc<Self>) -> Result<(), StoreError> {
        // Every session registered (none is, until this is done): their claims were
        // written before the query below.
        let epochs = self.registry.epochs();
        let store = self.store.clone();
        let (keys, gone) = tokio::task::spawn_blocking(move || store.reload_key_index())
            .await
            .map_err(|e| self.pg().error(e))??;
        info!(keys, changed = gone.len(), "fleet: key index reloaded");
        for id in gone.iter().filter_map(|id| Id::new(id).ok()) {
            if self.registry.invalidate(
                &id,
                CloseCode::REVOKED,
                "identity revoked or removed on another node",
            ) {
                info!(id = %id, "identity revoked or removed on another node while this node was not listening: session closed");
            }
        }
        // A session whose claim is gone, or another node's, was taken over unheard. (A
        // claim of this node with a newer epoch covers an older session: `unclaim`.)
        let claims: HashMap<String, u64> =
            self.pg().claims_of(&self.node).await?.into_iter().collect();
        for (id, epoch) in epochs {
            if claims.get(id.as_str()).is_none_or(|e| *e < epoch) {
                self.registry.close_epoch(
                    &id,
                    epoch,
                    CloseCode::TAKEN_OVER,
                    "a newer session of this identity took over on another node",
                );
            }
        }
        Ok(())
    }

    /// Applies one identity notice: refreshes the identity's key in the index (it
    /// leaves the index if it cannot be read), then closes its session if it was
    /// revoked or removed. In this order: a handshake that read the old key from the
    /// index did so before the session is invalidated, and is refused.
    async fn identity_changed(self: &Arc<Self>, op: &str, name: &str) -> Result<(), StoreError> {
        #[cfg(debug_assertions)]
        test_pause("TALLYD_TEST_PAUSE_BEFORE_REFRESH_MS").await;
        let store = self.store.clone();
        let owned = name.to_owned();
        let refreshed = tokio::task::spawn_blocking(move || store.refresh(&owned))
            .await
            .map_err(|e| self.pg().error(e))
            .and_then(|r| r);
        let Ok(id) = Id::new(name) else {
            return Ok(());
        };
        let close = match op {
            "revoked" => Some((CloseCode::REVOKED, "identity revoked")),
            "removed" => Some((CloseCode::REMOVED, "identity removed")),
            _ => None,
        };
        if let Some((code, reason)) = close {
            if self.registry.invalidate(&id, code, reason) {
                info!(id = %id, "{reason} on another node: session closed");
            }
        }
        refreshed.map(|_| ())
    }

    /// Acts on one notice (identity notices go to their own task, in order: a slow
    /// read of an identity holds up no takeover and no send).
    fn notice(self: &Arc<Self>, channel: &str, payload: &str) {
        let mut words = payload.split(' ');
        match channel {
            channel::IDENTITY => {
                if let (Some(op), Some(id)) = (words.next(), words.next()) {
                    let _ = self.identities.send((op.to_owned(), id.to_owned()));
                }
            }
            channel::CLOSE => {
                let (Some(node), Some(epoch), Some(id)) =
                    (words.next(), words.next(), words.next())
                else {
                    return;
                };
                let (Ok(epoch), Ok(id)) = (epoch.parse(), Id::new(id)) else {
                    return;
                };
                if node == self.node {
                    self.registry.close_epoch(
                        &id,
                        epoch,
                        CloseCode::TAKEN_OVER,
                        "a newer session of this identity took over on another node",
                    );
                }
            }
            channel::SEND => {
                if let (Some(node), Some(Ok(call))) = (words.next(), words.next().map(str::parse)) {
                    if node == self.node {
                        tokio::spawn(self.clone().serve_send(call));
                    }
                }
            }
            channel::RESULT => {
                if let (Some(node), Some(Ok(call))) =
                    (words.next(), words.next().map(str::parse::<i64>))
                {
                    if node == self.node {
                        if let Some(tx) = self.lock_waiting().remove(&call) {
                            let _ = tx.send(());
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

/// The fleet's tasks, to start with [`FleetTasks::run`] once the daemon serves.
pub struct FleetTasks {
    fleet: Arc<Fleet>,
    listening: Listening,
    identity_notices: mpsc::UnboundedReceiver<(String, String)>,
}

impl FleetTasks {
    /// Runs the heartbeat and the notices until `stop`, on the store's runtime.
    pub fn run(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let FleetTasks {
            fleet,
            listening,
            identity_notices,
        } = self;
        let store = fleet.store.clone();
        let pg = pg(&store);
        let beat = {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            pg.spawn(async move { heartbeat(fleet, stop).await })
        };
        let identities = {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            pg.spawn(async move { identities(fleet, identity_notices, stop).await })
        };
        let releases = {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            pg.spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(HEARTBEAT) => {}
                    }
                    if !fleet.fenced() {
                        fleet.releases().await;
                    }
                }
            })
        };
        pg.spawn(async move {
            notices(fleet, listening, stop).await;
            let _ = beat.await;
            let _ = identities.await;
            let _ = releases.await;
        })
    }
}

async fn heartbeat(fleet: Arc<Fleet>, stop: CancellationToken) {
    // When the last heartbeat that was renewed was sent: the database's timestamp of
    // it is later, so this node fences itself before the others can see it stale.
    let mut last_ok = fleet.joined;
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let fence_at = tokio::time::Instant::from_std(last_ok + FENCE_AFTER);
        let fenced = fleet.fenced();
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            _ = tokio::time::sleep_until(fence_at), if !fenced => {
                fence(&fleet, "no heartbeat renewed");
                continue;
            }
        }
        let pg = fleet.pg();
        let sent = Instant::now();
        let beat = tokio::select! {
            beat = tokio::time::timeout(HEARTBEAT, pg.heartbeat(&fleet.node, STALE)) => beat,
            _ = tokio::time::sleep_until(fence_at), if !fenced => {
                fence(&fleet, "the heartbeat is not answered");
                continue;
            }
        };
        match beat {
            Ok(Ok(true)) => {
                last_ok = sent;
                if fleet.registry.unfence() {
                    info!("fleet: the database is back: serving again");
                }
            }
            Ok(Ok(false)) => {
                // Declared dead by another node: its claims are gone, and others may
                // serve its devices already.
                warn!("fleet: this node was declared dead (its heartbeat was late); joining again");
                fleet.drop_sessions(false, "this node was declared dead by the fleet");
                // Its claims went with its row; not a claim whose answer was lost (its
                // statement may still commit, after the node joins again).
                lock(&fleet.releasing).retain(|r| matches!(r, Release::Idle(..)));
                let addr = fleet.addr();
                let join = tokio::time::timeout(HEARTBEAT, pg.join(&fleet.node, &addr));
                if let Ok(Ok(())) = join.await {
                    last_ok = sent;
                }
            }
            Ok(Err(e)) => debug!(error = %e, "fleet: heartbeat failed"),
            Err(_) => debug!("fleet: heartbeat timed out"),
        }
    }
}

fn fence(fleet: &Fleet, why: &str) {
    if fleet.drop_sessions(true, "this node is cut off from the fleet's database") {
        warn!(
            error = why,
            "fleet: no heartbeat for {FENCE_AFTER:?}: fencing this node (sessions closed, handshakes refused BUSY) until the database answers"
        );
    }
}

/// Applies identity notices in the order they came; one that cannot be read is tried
/// again a second later (meanwhile the identity is out of the index).
async fn identities(
    fleet: Arc<Fleet>,
    mut notices: mpsc::UnboundedReceiver<(String, String)>,
    stop: CancellationToken,
) {
    loop {
        let (op, id) = tokio::select! {
            _ = stop.cancelled() => return,
            n = notices.recv() => match n {
                Some(n) => n,
                None => return,
            },
        };
        if let Err(e) = fleet.identity_changed(&op, &id).await {
            warn!(id, error = %e, "fleet: could not read an identity's key (its handshakes fail until it is read); trying again");
            let again = fleet.identities.clone();
            tokio::spawn(async move {
                tokio::time::sleep(HEARTBEAT).await;
                // Read again: the identity's state now, whatever the notice said.
                let _ = again.send(("changed".into(), id));
            });
        }
    }
}

async fn notices(fleet: Arc<Fleet>, mut listening: Listening, stop: CancellationToken) {
    let mut ping = tokio::time::interval(HEARTBEAT);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The catch-up under way, if any (the loss it is for, and its task).
    let mut catching_up: Option<(u64, tokio::task::JoinHandle<()>)> = None;
    loop {
        let alive = tokio::select! {
            _ = stop.cancelled() => return,
            // A catch-up that ended: done (or superseded), or it panicked, and is
            // started again (else the node would stay deaf).
            ended = async { (&mut catching_up.as_mut().expect("checked").1).await },
                if catching_up.is_some() =>
            {
                let (loss, _) = catching_up.take().expect("checked");
                if ended.is_err() {
                    warn!("fleet: the catch-up with missed notices failed; starting it again");
                    catching_up = Some((
                        loss,
                        tokio::spawn(fleet.clone().catch_up(loss, stop.clone())),
                    ));
                }
                true
            }
            n = listening.notices.recv() => match n {
                Some(n) => {
                    fleet.notice(n.channel(), n.payload());
                    true
                }
                None => false,
            },
            // A connection that died without a word (a host or a network gone) is
            // noticed by its ping, not hours later by TCP.
            _ = ping.tick() => {
                fleet.pg().count_queries(1);
                let pong = tokio::time::timeout(
                    LISTEN_PING_TIMEOUT,
                    listening.client.batch_execute(""),
                );
                matches!(pong.await, Ok(Ok(())))
            }
        };
        if alive {
            continue;
        }
        // The connection dropped: notices may have been missed meanwhile, and until the
        // node has caught up with them it registers no session.
        let deafness = fleet.deafness.fetch_add(1, Ordering::SeqCst) + 1;
        fleet.registry.deafen(deafness);
        warn!("fleet: the notification connection is lost (no session is registered until it is back); opening it again");
        #[cfg(debug_assertions)]
        test_pause("TALLYD_TEST_PAUSE_BEFORE_RELISTEN_MS").await;
        listening = loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
            match listen(fleet.pg(), &fleet.node).await {
                Ok(l) => break l,
                Err(e) => debug!(error = %e, "fleet: cannot listen for notices yet"),
            }
        };
        info!("fleet: listening for notices again");
        // On its own task: the notices that come meanwhile are acted on.
        catching_up = Some((
            deafness,
            tokio::spawn(fleet.clone().catch_up(deafness, stop.clone())),
        ));
    }
}

/// Test builds only: waits the milliseconds in the environment variable `var`, to let
/// tests/fleet.rs hold a handshake between two of its steps and race another node
/// against it.
#[cfg(debug_assertions)]
pub async fn test_pause(var: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        warn!("{var}: pausing {ms} ms (a test hook of debug builds)");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

/// The registry's view of the fleet: a weak reference (the fleet holds the registry).
struct Handle(std::sync::Weak<Fleet>);

impl Fleetwide for Handle {
    fn released(&self, id: &Id, epoch: u64) {
        if let Some(fleet) = self.0.upgrade() {
            fleet.release(id, epoch);
        }
    }

    fn send_elsewhere(
        &self,
        id: Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<Result<Option<Reply>, SendError>> {
        let fleet = self.0.upgrade();
        Box::pin(async move {
            match fleet {
                Some(f) => f.send_elsewhere(id, kind, payload, timeout).await,
                None => Err(SendError::Offline(id.to_string())),
            }
        })
    }
}
