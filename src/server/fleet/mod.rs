//! Several daemons, one fleet: the rules of spec 7.3 across daemons that share a
//! PostgreSQL store (docs/CLUSTER.md is the design, with its failure cases).
//!
//! - Each daemon is a *node*: a row in `nodes` with a heartbeat renewed every
//!   [`HEARTBEAT`]. A node whose heartbeat is older than [`STALE`] is dead: any node
//!   deletes it, and its claims with it.
//! - A session is established only once its node *claims* the identity
//!   (`tally_claims`, one statement for a batch of claims): free, held by a dead node,
//!   or taken over from a live one (whose node is told on `tally_close`, with the
//!   claim's epoch: a late notice never closes a newer session), or refused under
//!   `takeover = "reject"`.
//! - A node that cannot renew its heartbeat for [`FENCE_AFTER`] *fences* itself: it
//!   closes every session and refuses handshakes with BUSY until it can, so that when
//!   the others declare it dead and serve its devices, it no longer does.
//! - Every change to an identity is announced on `tally_identity`: each node refreshes
//!   that identity in its key index and closes its session if it was revoked or
//!   removed. A node whose notification connection drops reloads its whole index and
//!   checks its claims when it is back (it may have missed notices).
//! - A send to a device whose session is on another node goes through `sends` and
//!   `tally_send`; the answer comes back through the same row and `tally_result`.
//!
//! The claims, releases, heartbeat, fence, deafness and admission of sessions are the
//! sans-IO state machine of [`node`], driven by one task here; [`db`] holds the
//! statements it runs. The registry holds sessions only.

pub mod db;
#[cfg(test)]
pub(crate) mod model;
pub mod node;

use std::collections::{BTreeMap, HashMap};
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
use crate::server::registry::{self, Fleetwide, RegisterError, Registry, SessionInfo};
use crate::store::fleet_key::{self, FleetKey, Statement};
use crate::store::postgres::{channel, Postgres};
use crate::store::{Store, StoreError};
use db::{FleetDb, LogAck, PendingSend, SendFailure, SendOutcome};

use node::{Action, Finish, Node, NotAdmitted, Ticket};
pub use node::{ClaimError, Granted, Takeover, CLAIM_TIMEOUT, FENCE_AFTER, HEARTBEAT, STALE};

/// How far a send's stamp (its origin's clock) may be from the clock of the node that
/// serves it: a send is served only within this window, and remembered for as long, so
/// that none is served twice (the nodes' clocks must agree within it: NTP).
pub const SEND_SKEW: Duration = Duration::from_secs(60);
/// Sends served within [`SEND_SKEW`] that a node remembers; beyond, a send is refused.
pub const SERVED_SENDS: usize = 100_000;
/// Notices waiting to be dispatched. Beyond, the node reads everything again as after a
/// lost notification connection (registering no session meanwhile: a takeover notice may
/// have been lost): a flood of notices costs it reads and a pause, never unbounded memory.
pub const NOTICE_QUEUE: usize = 65_536;
/// Identity notices waiting to be applied. Beyond, the node reads every key again once,
/// without pausing anything (they are hints to read, and all is read).
pub const IDENTITY_QUEUE: usize = 4096;
/// Sends from other nodes this node serves at once; beyond, a send is not served (its
/// origin times out).
pub const SERVING_SENDS: usize = 1024;
/// The file in the state directory that keeps how much of the fleet's revocation log
/// this node has verified: a database whose log is shorter was rolled back.
pub const REVOCATIONS_FILE: &str = "fleet-log";

/// How long the notification connection may take to answer a ping (sent every
/// [`HEARTBEAT`]) before it is taken for dead, reopened, and the missed notices caught
/// up with.
pub const LISTEN_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// This daemon's part in the fleet.
pub struct Fleet {
    store: Arc<Store>,
    /// The fleet's statements, on the store's database.
    db: FleetDb,
    registry: Arc<Registry>,
    /// This node's name in `nodes`: random, new at every start.
    node: String,
    /// Its listening address, as `tallyd sessions` shows it.
    addr: Mutex<String>,
    /// Sends of this node waiting for their answer, by call number (woken by each
    /// `tally_result` notice for them: a hint to read the answer).
    waiting: Mutex<HashMap<i64, Arc<tokio::sync::Notify>>>,
    /// The claims, releases, heartbeat and fence ([`node`]), and the handshakes waiting
    /// for their claims' answers.
    machine: Mutex<Machine>,
    /// Wakes the task that drives the machine.
    wake: tokio::sync::Notify,
    /// How `takeover` is set (`reject`: a claim is refused while a live session holds
    /// it elsewhere).
    reject: bool,
    /// Identity notices, for the task that applies them in order.
    identities: mpsc::Sender<(String, String)>,
    /// Where this node keeps how much of the revocation log it has verified, and that
    /// count as last written.
    revocations_file: std::path::PathBuf,
    revocations_written: std::sync::atomic::AtomicU64,
    /// Held while that record is written.
    recording: Mutex<()>,
    /// Sends served lately: call → when (no send is served twice).
    served: Mutex<HashMap<i64, Instant>>,
    /// Room for serving sends of other nodes ([`SERVING_SENDS`]).
    serving: Arc<tokio::sync::Semaphore>,
    /// Notices and rows that did not verify.
    rejected: Rejected,
    /// Set when identity notices overflowed their queue: every key is read again.
    resync: tokio::sync::Notify,
    /// Woken when outcomes of messages queued on this node wait in the store
    /// (`tally_outcome`, or notices were lost).
    outcomes: Arc<tokio::sync::Notify>,
}

/// The state machine, and who waits for its answers.
struct Machine {
    node: Node,
    answers: HashMap<Ticket, oneshot::Sender<Result<Granted, ClaimError>>>,
}

impl Takeover {
    fn tag(&self, key: &FleetKey) -> [u8; fleet_key::TAG_LEN] {
        key.tag(
            Statement::Takeover,
            &[
                self.id.as_str().as_bytes(),
                self.old_node.as_bytes(),
                &self.old_epoch.to_be_bytes(),
                self.new_node.as_bytes(),
                &self.new_epoch.to_be_bytes(),
            ],
        )
    }

    /// The notice's payload: `old_node old_epoch new_node new_epoch tag id`.
    pub fn encode(&self, key: &FleetKey) -> String {
        format!(
            "{} {} {} {} {} {}",
            self.old_node,
            self.old_epoch,
            self.new_node,
            self.new_epoch,
            hex::encode(self.tag(key)),
            self.id
        )
    }

    /// A notice's payload, if it is well formed and its tag verifies.
    pub fn verified(payload: &str, key: &FleetKey) -> Option<Takeover> {
        let mut words = payload.splitn(6, ' ');
        let old_node = words.next()?.to_owned();
        let old_epoch = words.next()?.parse().ok()?;
        let new_node = words.next()?.to_owned();
        let new_epoch = words.next()?.parse().ok()?;
        let tag = hex::decode(words.next()?).ok()?;
        let id = Id::new(words.next()?).ok()?;
        let t = Takeover {
            id,
            old_node,
            old_epoch,
            new_node,
            new_epoch,
        };
        let fields: [&[u8]; 5] = [
            t.id.as_str().as_bytes(),
            t.old_node.as_bytes(),
            &t.old_epoch.to_be_bytes(),
            t.new_node.as_bytes(),
            &t.new_epoch.to_be_bytes(),
        ];
        key.verify(Statement::Takeover, &fields, &tag).then_some(t)
    }
}

/// The fields a send's tag covers.
fn send_fields(send: &PendingSend) -> [Vec<u8>; 9] {
    [
        send.call.to_be_bytes().to_vec(),
        send.origin.as_bytes().to_vec(),
        send.node.as_bytes().to_vec(),
        send.id.as_bytes().to_vec(),
        send.epoch.to_be_bytes().to_vec(),
        vec![u8::from(send.request)],
        (send.timeout.as_millis().min(u128::from(u64::MAX)) as u64)
            .to_be_bytes()
            .to_vec(),
        send.stamp.to_be_bytes().to_vec(),
        send.payload.clone(),
    ]
}

fn send_tag(key: &FleetKey, send: &PendingSend) -> Vec<u8> {
    let fields = send_fields(send);
    let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
    key.tag(Statement::Send, &fields).to_vec()
}

fn send_verifies(key: &FleetKey, send: &PendingSend) -> bool {
    let fields = send_fields(send);
    let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
    key.verify(Statement::Send, &fields, &send.tag)
}

/// The fields an answer's tag covers: the send it answers, and the outcome.
fn answer_fields(send: &PendingSend, outcome: &SendOutcome) -> [Vec<u8>; 6] {
    [
        send.call.to_be_bytes().to_vec(),
        send.origin.as_bytes().to_vec(),
        send.node.as_bytes().to_vec(),
        send.id.as_bytes().to_vec(),
        send.epoch.to_be_bytes().to_vec(),
        outcome.encode(),
    ]
}

fn answer_tag(key: &FleetKey, send: &PendingSend, outcome: &SendOutcome) -> Vec<u8> {
    let fields = answer_fields(send, outcome);
    let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
    key.tag(Statement::Answer, &fields).to_vec()
}

fn answer_verifies(key: &FleetKey, send: &PendingSend, outcome: &SendOutcome, tag: &[u8]) -> bool {
    let fields = answer_fields(send, outcome);
    let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
    key.verify(Statement::Answer, &fields, tag)
}

/// Whether `ack` is `node`'s acknowledgement of the fleet's log, tagged under the fleet
/// key (the tag [`Fleet::log_ack`] makes).
fn ack_verifies(key: &FleetKey, node: &str, ack: &LogAck) -> bool {
    key.verify(
        Statement::LogAck,
        &[node.as_bytes(), &ack.seen.to_be_bytes(), &ack.head],
        &ack.tag,
    )
}

/// Milliseconds since the Unix epoch, by this node's clock.
fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Logs what did not verify, each kind at most once every [`REJECTED_LOG_EVERY`] (a
/// database role that floods the channels must not flood the log too), with how many
/// of that kind since.
#[derive(Debug, Default)]
struct Rejected(Mutex<HashMap<&'static str, (Option<Instant>, u64)>>);

/// See [`Rejected`].
const REJECTED_LOG_EVERY: Duration = Duration::from_secs(10);

impl Rejected {
    fn note(&self, what: &'static str) {
        let mut kinds = lock(&self.0);
        let now = Instant::now();
        let (at, count) = kinds.entry(what).or_insert((None, 0));
        *count += 1;
        if at.is_none_or(|t| now.duration_since(t) >= REJECTED_LOG_EVERY) {
            warn!(
                ignored = *count,
                "fleet: {what}: ignored (forged or replayed through the database, or written by a node with another store.key); more are counted, not logged, for {}s",
                REJECTED_LOG_EVERY.as_secs()
            );
            *at = Some(now);
            *count = 0;
        }
    }
}

/// A handshake's claim, from its answer to its registration ([`Claiming::register`]):
/// dropped before, the claim is released (or kept while an older session of the
/// identity is live here, whose claim it now is).
pub struct Claiming {
    fleet: Arc<Fleet>,
    ticket: Ticket,
    done: bool,
}

impl Claiming {
    /// Registers the session with `register` if the state machine admits the claim
    /// ([`Node::admits`]), under the machine's lock: a fence, a loss of notices or a
    /// takeover notice either comes before (and the session is refused) or after (and
    /// closes it). The claim is then the session's, or released.
    pub fn register<R>(
        mut self,
        register: impl FnOnce() -> Result<R, RegisterError>,
    ) -> Result<R, RegisterError> {
        let fleet = self.fleet.clone();
        let registered = admit_and_register(&fleet.machine, self.ticket, register);
        self.done = true;
        fleet.wake.notify_one();
        registered
    }
}

/// [`Claiming::register`]'s rule: `register` runs only if the machine admits `ticket`,
/// under the machine's lock, and the machine is told how it went under the same lock.
fn admit_and_register<R>(
    machine: &Mutex<Machine>,
    ticket: Ticket,
    register: impl FnOnce() -> Result<R, RegisterError>,
) -> Result<R, RegisterError> {
    // Declared before the guard, so dropped after it if anything below unwinds: a
    // registration dropped tells the fleet (`Handle::released`), which takes this lock.
    let registered;
    let mut m = lock(machine);
    registered = match m.node.admits(ticket) {
        Ok(_) => register(),
        Err(NotAdmitted::CutOff) => Err(RegisterError::Fenced),
        Err(NotAdmitted::Superseded) => Err(RegisterError::Superseded),
    };
    let how = match registered {
        Ok(_) => Finish::Registered,
        Err(_) => Finish::Dropped,
    };
    m.node.finish(ticket, how, Instant::now());
    drop(m);
    registered
}

/// A verified takeover of this node's claim of `t.id` up to `t.old_epoch`: the machine
/// first (a registration still on its way is not admitted), then the registry (a
/// session registered before is closed). In this order, under each one's lock in turn,
/// no session of a superseded claim stays live.
fn taken_over(machine: &Mutex<Machine>, registry: &Registry, t: &Takeover) {
    lock(machine).node.superseded(&t.id, t.old_epoch);
    registry.close_epoch(
        &t.id,
        t.old_epoch,
        CloseCode::TAKEN_OVER,
        "a newer session of this identity took over on another node",
    );
}

impl Drop for Claiming {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        {
            let mut m = lock(&self.fleet.machine);
            // A ticket done before its answer gets none: nobody waits for it.
            m.answers.remove(&self.ticket);
            m.node.finish(self.ticket, Finish::Dropped, Instant::now());
        }
        self.fleet.wake.notify_one();
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
    notices: mpsc::Receiver<tokio_postgres::Notification>,
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
    let (tx, notices) = mpsc::channel(NOTICE_QUEUE);
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => match tx.try_send(n) {
                    Ok(()) => {}
                    // Too many waiting: this connection ends, and the node reads
                    // everything again, as when it is lost.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        warn!("fleet: more than {NOTICE_QUEUE} notices wait to be acted on (a flood on the fleet's channels?): reading everything again instead");
                        return;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                },
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
        channel::QUEUED,
        channel::OUTCOME,
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
    /// change committed after the load goes unseen. Call `Fleet::run` next.
    pub fn join(
        store: Arc<Store>,
        db: FleetDb,
        registry: Arc<Registry>,
        addr: SocketAddr,
        state_dir: &std::path::Path,
        takeover: TakeoverPolicy,
    ) -> Result<(Arc<Fleet>, FleetTasks), StoreError> {
        let node = hex::encode(&crate::secrets::random_bytes()[..6]);
        let joined = Instant::now();
        let pg = db.pg();
        let listening = pg.block_on(async {
            let listening = listen(pg, &node).await?;
            db.join(&node, &addr.to_string()).await?;
            Ok::<_, StoreError>(listening)
        })?;
        info!(node, store = pg.place(), "joined the fleet");
        let (identities, identity_notices) = mpsc::channel(IDENTITY_QUEUE);
        let fleet = Arc::new(Fleet {
            store,
            db,
            registry: registry.clone(),
            node: node.clone(),
            addr: Mutex::new(addr.to_string()),
            waiting: Mutex::default(),
            machine: Mutex::new(Machine {
                node: Node::new(node, joined),
                answers: HashMap::new(),
            }),
            wake: tokio::sync::Notify::new(),
            reject: takeover == TakeoverPolicy::Reject,
            identities,
            revocations_file: state_dir.join(REVOCATIONS_FILE),
            revocations_written: Default::default(),
            recording: Mutex::default(),
            served: Mutex::default(),
            serving: Arc::new(tokio::sync::Semaphore::new(SERVING_SENDS)),
            rejected: Rejected::default(),
            resync: tokio::sync::Notify::new(),
            outcomes: Arc::default(),
        });
        // What this node verified of the fleet's log before: the log must still hold it
        // (checked once the index, and the log with it, is loaded: `check_revocations`).
        if let Some((seq, tag)) = fleet.recorded_log()? {
            fleet.store.set_fleet_log_anchor(seq, tag);
        }
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

    /// Marks the identities with queued messages in the registry (their next sessions
    /// fetch from the queue).
    async fn deliveries_marked(&self) -> Result<usize, crate::store::queue::QueueError> {
        let queue = crate::store::queue::Queue::Postgres(self.queue());
        crate::server::delivery::mark_queued(&queue, &self.registry).await
    }

    /// The fleet's durable queue, as this node uses it (spec 8.8).
    pub fn queue(&self) -> crate::store::queue::postgres::PgQueue {
        crate::store::queue::postgres::PgQueue::new(
            self.db.pg().clone(),
            self.store.fleet_key().clone(),
            self.node.clone(),
        )
    }

    /// Woken when outcomes of messages queued on this node may wait in the store
    /// (`crate::server::delivery::Deliveries::collect` reads them).
    pub fn outcomes(&self) -> Arc<tokio::sync::Notify> {
        self.outcomes.clone()
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
            .spawn(async move { this.db.join(&this.node, &this.addr()).await })
            .await;
        if let Ok(Err(e)) = done {
            warn!(error = %e, "fleet: could not record this node's address");
        }
    }

    fn pg(&self) -> &Postgres {
        self.db.pg()
    }

    /// Statements sent to the database by this daemon (identity store and fleet).
    pub fn queries(&self) -> u64 {
        self.pg().queries()
    }

    /// Whether this node is fenced (cut off from the database).
    pub fn fenced(&self) -> bool {
        lock(&self.machine).node.is_fenced()
    }

    /// Applies an event to the state machine at the current time, and wakes its task.
    fn with_node<T>(&self, event: impl FnOnce(&mut Node, Instant) -> T) -> T {
        let out = event(&mut lock(&self.machine).node, Instant::now());
        self.wake.notify_one();
        out
    }

    /// Claims `id` for a new session from `peer`: the claim, to hold until the session
    /// is registered (or refused), or why not. Waits at most [`CLAIM_TIMEOUT`] (the state
    /// machine answers by then). One handshake of an identity at a time on this node:
    /// the next claims once this one's [`Claiming`] is dropped.
    pub async fn claim(
        self: &Arc<Self>,
        id: &Id,
        peer: SocketAddr,
    ) -> Result<(Granted, Claiming), ClaimError> {
        let (tx, rx) = oneshot::channel();
        let ticket = {
            let mut m = lock(&self.machine);
            let ticket = m.node.claim(id.clone(), peer.to_string(), Instant::now());
            m.answers.insert(ticket, tx);
            ticket
        };
        self.wake.notify_one();
        // Dropped before the answer (the handshake's task ended), the claim is released
        // when it comes.
        let claiming = Claiming {
            fleet: self.clone(),
            ticket,
            done: false,
        };
        let answer = tokio::time::timeout(CLAIM_TIMEOUT + HEARTBEAT, rx).await;
        let granted = match answer {
            Ok(Ok(answer)) => answer?,
            _ => {
                return Err(ClaimError::Unavailable(
                    "the fleet's task did not answer the claim".into(),
                ))
            }
        };
        if granted.in_a_row as usize >= registry::PING_PONG_TAKEOVERS {
            warn!(
                id = %id, old_peer = granted.old_peer.as_deref().unwrap_or(""),
                new_peer = %peer, takeovers = granted.in_a_row,
                "identity taken over repeatedly, each within {}s of the last, across the fleet: two devices may share it; consider takeover = \"reject\"",
                registry::PING_PONG_WINDOW.as_secs()
            );
        }
        Ok((granted, claiming))
    }

    /// The count and last tag of the fleet's log this node recorded in its state
    /// directory (`None`: nothing recorded, a new node).
    fn recorded_log(&self) -> Result<Option<(u64, [u8; fleet_key::TAG_LEN])>, StoreError> {
        let file = self.revocations_file.display().to_string();
        let text = match std::fs::read_to_string(&self.revocations_file) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(StoreError::LocalFile {
                    file,
                    message: e.to_string(),
                })
            }
        };
        let mut words = text.split_whitespace();
        let seq = words.next().and_then(|w| w.parse::<u64>().ok());
        let mut tag = [0u8; fleet_key::TAG_LEN];
        let tag_ok = words
            .next()
            .is_some_and(|w| hex::decode_to_slice(w, &mut tag).is_ok());
        match (seq, tag_ok, words.next()) {
            (Some(seq), true, None) => Ok(Some((seq, tag))),
            _ => Err(StoreError::LocalFile {
                file,
                message: "not a record of the fleet's log (its number of entries and the last one's tag, in hex): damaged; delete it on this node only if the database is known to be intact".into(),
            }),
        }
    }

    /// At start, once the key index is loaded (the fleet's log is read with it):
    /// refuses a database whose log does not hold what this node verified before (rolled
    /// back or changed: a revoked identity could be served again), or that does not
    /// verify; then records how far it is verified.
    pub fn check_revocations(&self) -> Result<(), StoreError> {
        let recorded = self.recorded_log()?;
        if let Err(why) = self.store.fleet_log_check() {
            return Err(StoreError::RevocationsRolledBack {
                file: self.revocations_file.display().to_string(),
                seen: recorded.map_or(0, |r| r.0),
                why,
            });
        }
        self.revocations_written
            .store(recorded.map_or(0, |r| r.0), Ordering::SeqCst);
        self.store.take_revocations();
        self.record_revocations()
    }

    /// At start: open enrollment is decided once for the fleet, in its log, by
    /// `tallyd open-enrollment on|off` only; without a verified setting it is off. A
    /// node whose configuration disagrees says so (the fleet's setting applies).
    pub fn settle_open_enrollment(&self, configured: bool) -> Result<(), StoreError> {
        let word = |on: bool| if on { "on" } else { "off" };
        let fleet = self
            .store
            .fleet_setting(super::OPEN_ENROLLMENT)
            .is_some_and(|v| v != 0);
        if fleet != configured {
            warn!(
                "fleet: this node's configuration says open_enrollment = {configured}, but open enrollment is {} for the whole fleet, and the fleet's setting applies (`tallyd open-enrollment on|off` changes it for every node; it is off until that is run once)",
                word(fleet)
            );
        }
        Ok(())
    }

    /// Writes how far the fleet's log is verified (its number of entries and the last
    /// one's tag), if further than last written. One writer at a time.
    fn record_revocations(&self) -> Result<(), StoreError> {
        let _one = lock(&self.recording);
        let (n, tag) = self.store.fleet_log_seen();
        if n <= self.revocations_written.load(Ordering::SeqCst) {
            return Ok(());
        }
        crate::secrets::write_secret_file(
            &self.revocations_file,
            format!("{n} {}\n", hex::encode(tag)).as_bytes(),
        )
        .map_err(|e| StoreError::LocalFile {
            file: self.revocations_file.display().to_string(),
            message: e.to_string(),
        })?;
        self.revocations_written.store(n, Ordering::SeqCst);
        Ok(())
    }

    /// This node's acknowledgement of the fleet's log, for its heartbeat.
    fn log_ack(&self) -> LogAck {
        let (seen, head) = self.store.fleet_log_seen();
        let seen = seen as i64;
        let tag = self.store.fleet_key().tag(
            Statement::LogAck,
            &[self.node.as_bytes(), &seen.to_be_bytes(), &head],
        );
        LogAck {
            seen,
            head: head.to_vec(),
            tag: tag.to_vec(),
        }
    }

    /// Compares this node's view of the fleet's log with the other nodes'
    /// acknowledgements (verified): one ahead of what this node can read, after reading
    /// again, means entries are hidden from it (a database writer showing each node its
    /// own table): it fences itself until it can read them.
    async fn check_peers(self: &Arc<Self>, peers: &[(String, LogAck)]) {
        let key = self.store.fleet_key();
        let ahead = |seen: u64| {
            peers
                .iter()
                .find(|(node, a)| a.seen > seen as i64 && ack_verifies(key, node, a))
        };
        let mut seen = self.store.fleet_log_seen().0;
        if ahead(seen).is_some() {
            // Perhaps only not read yet: read, then compare again.
            let store = self.store.clone();
            let _ = tokio::task::spawn_blocking(move || store.sync_revocations()).await;
            self.apply_revocations().await;
            seen = self.store.fleet_log_seen().0;
        }
        match ahead(seen) {
            Some((node, a)) => {
                // Fenced first (nothing registered from now on), then its sessions
                // closed with this reason (the machine's fence finds them closed).
                if !self.with_node(|n, now| n.hold(true, now)) {
                    self.drop_sessions("entries of the fleet's log are hidden from this node");
                    tracing::error!(
                        peer = node,
                        peer_entries = a.seen,
                        entries = seen,
                        "fleet: another node has verified entries of the fleet's log that this node cannot read (hidden from it by the database, or damaged): fencing this node (sessions closed, handshakes refused BUSY) until it can; docs/CLUSTER.md"
                    );
                }
            }
            None => {
                if self.with_node(|n, now| n.hold(false, now)) {
                    info!("fleet: this node reads every entry of the fleet's log the others verified again");
                }
            }
        }
    }

    /// Waits (at most `wait`) until every other live node acknowledges (tagged, in its
    /// heartbeat) that it verified the fleet's log up to entry `seq`. Returns the
    /// number of nodes of the fleet (this one included) and the addresses of those
    /// that did not.
    pub async fn confirmations(self: &Arc<Self>, seq: u64, wait: Duration) -> (usize, Vec<String>) {
        let deadline = Instant::now() + wait;
        loop {
            let this = self.clone();
            let acks = self
                .pg()
                .spawn(async move { this.db.log_acks(&this.node, STALE).await })
                .await;
            let Ok(Ok(acks)) = acks else {
                return (1, vec!["(the fleet's nodes could not be read)".into()]);
            };
            let key = self.store.fleet_key();
            let missing: Vec<String> = acks
                .iter()
                .filter(|(node, _, ack)| {
                    !ack.as_ref()
                        .is_some_and(|a| a.seen >= seq as i64 && ack_verifies(key, node, a))
                })
                .map(|(_, addr, _)| addr.clone())
                .collect();
            if missing.is_empty() || Instant::now() >= deadline {
                return (acks.len() + 1, missing);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Writes this node's record of the fleet's log now (after an entry it appended).
    pub async fn record_log(self: &Arc<Self>) -> Result<(), StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.record_revocations())
            .await
            .map_err(|e| self.pg().error(e))?
    }

    /// Closes the sessions made with a key that a newly verified revocation ended, and
    /// records how far the log is verified.
    async fn apply_revocations(self: &Arc<Self>) {
        for r in self.store.take_revocations() {
            // The journal keeps what the log said (an operator repairing a damaged log
            // reads it there).
            info!(
                id = r.id,
                entry = r.before,
                "fleet: the fleet's log says this identity was {}",
                if r.removed { "removed" } else { "revoked" }
            );
            let Ok(id) = Id::new(&r.id) else { continue };
            let (code, reason) = if r.removed {
                (CloseCode::REMOVED, "identity removed")
            } else {
                (CloseCode::REVOKED, "identity revoked")
            };
            if self.registry.invalidate_before(&id, r.before, code, reason) {
                info!(id = %id, "{reason} (a revocation verified under the fleet key): session closed");
            }
        }
        let this = self.clone();
        let recorded = tokio::task::spawn_blocking(move || this.record_revocations()).await;
        if let Ok(Err(e)) = recorded {
            warn!(error = %e, "fleet: could not record how much of the revocation log this node has verified");
        }
    }

    /// A session of `id` with claim `epoch` ended: its claim is released.
    pub fn release(&self, id: &Id, epoch: u64) {
        self.with_node(|node, now| node.ended(id, epoch, now));
    }

    /// Whether this node's session of `id` with claim `epoch` may deliver queued
    /// messages now ([`Node::may_deliver`]).
    pub fn may_deliver(&self, id: &Id, epoch: u64) -> bool {
        lock(&self.machine)
            .node
            .may_deliver(id, epoch, Instant::now())
    }

    /// Whether `id` has a live session on any node.
    pub async fn is_live(self: &Arc<Self>, id: &Id) -> Result<bool, StoreError> {
        if self.registry.is_live(id) {
            return Ok(true);
        }
        let this = self.clone();
        let id = id.to_string();
        self.pg()
            .spawn(async move { this.db.holder(&id, STALE).await })
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
            .spawn(async move { this.db.fleet_sessions(STALE).await })
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

    /// A send to a device whose session is on another node: tagged under the fleet key
    /// and bound to that session's claim epoch; its answer is used only if its tag
    /// verifies.
    async fn send_elsewhere(
        self: Arc<Self>,
        id: Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Option<Reply>, SendError> {
        let this = self.clone();
        let run = async move {
            let db = &this.db;
            let failed = |e: StoreError| SendError::Elsewhere(e.to_string());
            let holder = db.holder(id.as_str(), STALE).await.map_err(failed)?;
            let Some((node, epoch)) = holder.filter(|(n, _)| *n != this.node) else {
                return Err(SendError::Offline(id.to_string()));
            };
            let bytes = crate::secrets::random_bytes();
            let call = i64::from_be_bytes(bytes[..8].try_into().expect("8 bytes")) & i64::MAX;
            let woken = Arc::new(tokio::sync::Notify::new());
            this.lock_waiting().insert(call, woken.clone());
            let mut send = PendingSend {
                call,
                node,
                origin: this.node.clone(),
                id: id.to_string(),
                epoch,
                request: kind == SendKind::Request,
                payload: payload.to_vec(),
                timeout,
                stamp: unix_ms(),
                tag: Vec::new(),
            };
            send.tag = send_tag(this.store.fleet_key(), &send);
            let asked = db.put_send(&send).await;
            // The holder gives up at `timeout`, and says so: a little longer here. A
            // notice is a hint: the answer is read and verified at each, and waited
            // for again if there is none that verifies.
            let deadline = tokio::time::Instant::now() + timeout + Duration::from_secs(1);
            let mut answer = None;
            if asked.is_ok() {
                while tokio::time::timeout_at(deadline, woken.notified())
                    .await
                    .is_ok()
                {
                    if let Ok(Some((outcome, tag))) = db.send_outcome(call, false).await {
                        if answer_verifies(this.store.fleet_key(), &send, &outcome, &tag) {
                            answer = Some(outcome);
                            break;
                        }
                        this.rejected
                            .note("the answer to a send whose tag does not verify");
                    }
                }
            }
            this.lock_waiting().remove(&call);
            let last = db.send_outcome(call, true).await;
            asked.map_err(failed)?;
            if answer.is_none() {
                // Answered just as the wait ended.
                if let Some((outcome, tag)) = last.map_err(failed)? {
                    if answer_verifies(this.store.fleet_key(), &send, &outcome, &tag) {
                        answer = Some(outcome);
                    }
                }
            }
            match answer {
                Some(SendOutcome::Answer(status, body)) => Ok(Some(Reply {
                    status: Status(status),
                    payload: body.into(),
                })),
                Some(SendOutcome::Sent) => Ok(None),
                Some(SendOutcome::Failed(kind, why)) => Err(match kind {
                    SendFailure::Offline => SendError::Offline(id.to_string()),
                    SendFailure::Ended => SendError::SessionEnded,
                    SendFailure::Timeout => SendError::Timeout(timeout),
                    SendFailure::Refused => SendError::Elsewhere(why),
                }),
                None => Err(SendError::Timeout(timeout)),
            }
        };
        self.pg()
            .spawn(run)
            .await
            .unwrap_or_else(|e| Err(SendError::Elsewhere(e.to_string())))
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Arc<tokio::sync::Notify>>> {
        lock(&self.waiting)
    }

    /// Whether a send may be served: addressed to this node, tagged by a node of the
    /// fleet, not served (nor answered) before, stamped within [`SEND_SKEW`] of this
    /// node's clock. Remembers it as served. Refused as `Err((why, tell))`: `tell`, the
    /// origin is answered why (a send it tagged for this node, never seen here, refused
    /// by this node's clock, with a timeout short enough that this node remembers the
    /// call for as long as its origin waits: each call gets at most one answer).
    fn admit_send(&self, call: i64, send: &PendingSend) -> Result<(), (&'static str, bool)> {
        if send.call != call || send.node != self.node {
            return Err((
                "a send row that is not the one its notice names, or not for this node",
                false,
            ));
        }
        if !send_verifies(self.store.fleet_key(), send) {
            return Err(("a send whose tag does not verify", false));
        }
        let mut served = lock(&self.served);
        // Remembered by this node's monotonic clock: a step of the wall clock does not
        // forget a send that may still pass the stamp check.
        if served.len() >= SERVED_SENDS / 2 {
            served.retain(|_, at| at.elapsed() <= 2 * SEND_SKEW);
        }
        // Before the clock's checks: a replayed send that was served must not be
        // answered "refused" (its origin may still wait for the device's answer).
        if served.contains_key(&call) {
            return Err(("a send served before (replayed)", false));
        }
        if served.len() >= SERVED_SENDS {
            return Err((
                "a send beyond the number this node remembers within a minute",
                false,
            ));
        }
        let now = unix_ms();
        let skew = SEND_SKEW.as_millis() as i64;
        let timeout = send.timeout.as_millis().min(i64::MAX as u128) as i64;
        let clock = if (now - send.stamp).abs() > skew {
            Some("a send stamped too far from this node's clock (replayed, or the nodes' clocks differ by more than a minute: NTP)")
        } else if now > send.stamp.saturating_add(timeout).saturating_add(2000) {
            Some("a send older than its timeout (held back: its origin has given up)")
        } else {
            None
        };
        if let Some(why) = clock {
            // Answered once: remembered as served from now on.
            let tell = send.timeout < SEND_SKEW;
            if tell {
                served.insert(call, Instant::now());
            }
            return Err((why, tell));
        }
        drop(served);
        let newest = Id::new(&send.id)
            .ok()
            .and_then(|id| lock(&self.machine).node.claimed(&id));
        if newest.is_none_or(|newest| send.epoch > newest) {
            return Err(("a send bound to a claim this node did not make", false));
        }
        let mut served = lock(&self.served);
        // Checked again: the lock was let go for the machine's (never both at once).
        if served.contains_key(&call) {
            return Err(("a send served before (replayed)", false));
        }
        served.insert(call, Instant::now());
        Ok(())
    }

    /// Serves a send another node handed to this one, if it verifies.
    async fn serve_send(self: Arc<Self>, call: i64) {
        let db = &self.db;
        let send = match db.take_send(call).await {
            Ok(Some(send)) => send,
            Ok(None) => return,
            Err(e) => {
                warn!(call, error = %e, "fleet: could not read a send");
                return;
            }
        };
        if let Err((what, tell)) = self.admit_send(call, &send) {
            // Nothing is delivered. A send its origin tagged for this node, refused by
            // this node's clock, is answered why (the operator learns the clocks
            // differ, not just that the device timed out); any other is not answered.
            self.rejected.note(what);
            if tell {
                let outcome = SendOutcome::Failed(SendFailure::Refused, what.to_owned());
                let tag = answer_tag(self.store.fleet_key(), &send, &outcome);
                if let Err(e) = db.answer_send(call, &send.origin, &outcome, &tag).await {
                    warn!(call, error = %e, "fleet: could not write a send's answer");
                }
            }
            return;
        }
        let kind = if send.request {
            SendKind::Request
        } else {
            SendKind::Message
        };
        let outcome = match Id::new(&send.id) {
            Err(e) => SendOutcome::Failed(SendFailure::Refused, e.to_string()),
            Ok(id) => match self
                .registry
                .send_here_at(
                    &id,
                    send.epoch,
                    kind,
                    send.payload.clone().into(),
                    send.timeout,
                )
                .await
            {
                Ok(Some(reply)) => SendOutcome::Answer(reply.status.0, reply.payload.to_vec()),
                Ok(None) => SendOutcome::Sent,
                Err(e) => {
                    let kind = match e {
                        SendError::Offline(_) => SendFailure::Offline,
                        SendError::SessionEnded => SendFailure::Ended,
                        SendError::Timeout(_) => SendFailure::Timeout,
                        _ => SendFailure::Refused,
                    };
                    SendOutcome::Failed(kind, e.to_string())
                }
            },
        };
        let tag = answer_tag(self.store.fleet_key(), &send, &outcome);
        if let Err(e) = db.answer_send(call, &send.origin, &outcome, &tag).await {
            warn!(call, error = %e, "fleet: could not write a send's answer");
        }
    }

    /// Leaves the fleet (a daemon shutting down): its claims go with its row.
    pub async fn leave(self: &Arc<Self>) {
        let this = self.clone();
        let left = self
            .pg()
            .spawn(async move { this.db.leave(&this.node).await })
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

    /// Closes every session: this node lost its claims, or may have (the machine
    /// registers none until it may again).
    fn drop_sessions(&self, why: &'static str) {
        let n = self.registry.close_all(CloseCode::SHUTDOWN, why);
        if n > 0 {
            warn!(
                sessions = n,
                "fleet: {why}: closing every session of this node"
            );
        }
    }

    /// After the notification connection was down ([`Action::CatchUp`]; the machine
    /// admits no session until this is done): reloads the key index, closes the sessions
    /// of identities revoked, removed or enrolled again meanwhile, and reads this node's
    /// claims, for the machine to close the sessions whose claims are no longer this
    /// node's ([`Node::caught_up`]).
    async fn try_catch_up(self: &Arc<Self>) -> Result<BTreeMap<Id, u64>, StoreError> {
        let store = self.store.clone();
        let (keys, gone) = tokio::task::spawn_blocking(move || store.reload_key_index())
            .await
            .map_err(|e| self.pg().error(e))??;
        info!(keys, changed = gone.len(), "fleet: key index reloaded");
        // After the reload: a `tally_queued` notice of an identity that was not in the
        // index yet marked nothing (a failure here fails the catch-up, tried again).
        self.deliveries_marked()
            .await
            .map_err(|e| self.pg().error(e))?;
        // Sessions made with a key that a verified revocation ended are closed; a key
        // that is just gone from the database (no revocation says why) leaves its
        // session alone: the database cannot end a session on its own word.
        self.apply_revocations().await;
        for id in gone.iter().filter(|id| !self.store.was_revoked(id)) {
            if Id::new(id).is_ok_and(|id| self.registry.is_live(&id)) {
                warn!(id, "fleet: the key of this identity is no longer in the database, and no revocation in the fleet's log says why: its live session is kept, its new handshakes fail (a database writer?)");
            }
        }
        self.claims().await
    }

    /// This node's claims in the database: id and epoch.
    async fn claims(&self) -> Result<BTreeMap<Id, u64>, StoreError> {
        let rows = self.db.claims_of(&self.node).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, epoch)| Id::new(&id).ok().map(|id| (id, epoch)))
            .collect())
    }

    /// Applies one identity notice: refreshes the identity's key in the index (it
    /// leaves the index if it cannot be read), then closes its session if it was
    /// revoked or removed. In this order: a handshake that read the old key from the
    /// index did so before the session is invalidated, and is refused.
    async fn identity_changed(self: &Arc<Self>, op: &str, name: &str) -> Result<(), StoreError> {
        let store = self.store.clone();
        let owned = name.to_owned();
        // A setting: the log. An identity: the log, then its row, under one lock
        // (`Store::refresh`: it leaves the index if either cannot be read).
        let setting = op == "setting";
        let refreshed = tokio::task::spawn_blocking(move || {
            if setting {
                return store.sync_revocations().map(|()| true);
            }
            store.refresh(&owned)
        })
        .await
        .map_err(|e| self.pg().error(e))
        .and_then(|r| r);
        // A notice is a hint: only a revocation verified under the fleet key closes a
        // session, and only one made with the key it ends.
        self.apply_revocations().await;
        if setting {
            if name == super::OPEN_ENROLLMENT && refreshed.is_ok() {
                let open = self.store.fleet_setting(super::OPEN_ENROLLMENT) == Some(1);
                info!(
                    "fleet: open enrollment is {} for the whole fleet now",
                    if open { "on" } else { "off" }
                );
            }
            return refreshed.map(|_| ());
        }
        // A message may have been queued while this node did not have the identity in
        // its index (a new enrollment, or a read that failed and is tried again): its
        // `tally_queued` notice marked nothing. So an identity whose key is in the
        // index after a notice of it is marked (an extra mark costs a session one
        // empty read; a notice of an id that is not enrolled marks nothing, and costs
        // no memory). The catch-up's reload of every key marks from the store.
        if matches!(refreshed, Ok(true)) {
            if let Ok(id) = Id::new(name) {
                self.registry.queued(&id);
            }
        }
        if refreshed.is_ok() && matches!(op, "revoked" | "removed") && !self.store.was_revoked(name)
        {
            self.rejected.note(
                "a notice that an identity was revoked or removed, with no revocation of it in the fleet's log that verifies",
            );
        }
        refreshed.map(|_| ())
    }

    /// Acts on one notice (identity notices go to their own task, in order: a slow
    /// read of an identity holds up no takeover and no send).
    /// When identity notices overflow their queue, every key is read again instead.
    fn notice(self: &Arc<Self>, channel: &str, payload: &str) {
        let mut words = payload.split(' ');
        match channel {
            channel::IDENTITY => {
                let (Some(op), Some(id)) = (words.next(), words.next()) else {
                    return;
                };
                if !matches!(op, "enrolled" | "revoked" | "removed" | "setting")
                    || Id::new(id).is_err()
                {
                    self.rejected.note("an identity notice that no node sends");
                    return;
                }
                if let Err(mpsc::error::TrySendError::Full(_)) =
                    self.identities.try_send((op.to_owned(), id.to_owned()))
                {
                    self.rejected.note(
                        "identity notices beyond the queue (a flood on tally_identity?): every key is read again instead",
                    );
                    self.resync.notify_one();
                }
            }
            channel::CLOSE => match Takeover::verified(payload, self.store.fleet_key()) {
                Some(t) => {
                    if t.old_node == self.node {
                        taken_over(&self.machine, &self.registry, &t);
                    }
                }
                None => self
                    .rejected
                    .note("a tally_close notice whose tag does not verify"),
            },
            channel::SEND => {
                if let (Some(node), Some(Ok(call))) = (words.next(), words.next().map(str::parse)) {
                    if node == self.node {
                        match self.serving.clone().try_acquire_owned() {
                            Ok(permit) => {
                                let this = self.clone();
                                tokio::spawn(async move {
                                    this.serve_send(call).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => self
                                .rejected
                                .note("a send beyond those this node serves at once"),
                        }
                    }
                }
            }
            // A hint: the session reads the queue, whose rows are verified. Only an
            // enrolled identity is marked (a flood of made-up ids costs no memory;
            // what was queued before the index was loaded is read at the start).
            channel::QUEUED => match Id::new(payload) {
                Ok(id) if self.store.is_indexed(&id) => self.registry.queued(&id),
                _ => self
                    .rejected
                    .note("a tally_queued notice of no enrolled identity"),
            },
            // A hint too: the outcomes are read and verified.
            channel::OUTCOME if payload == self.node => self.outcomes.notify_one(),
            channel::RESULT => {
                if let (Some(node), Some(Ok(call))) =
                    (words.next(), words.next().map(str::parse::<i64>))
                {
                    if node == self.node {
                        // A hint, coalesced: the answer is read and verified.
                        if let Some(woken) = self.lock_waiting().get(&call) {
                            woken.notify_one();
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
    identity_notices: mpsc::Receiver<(String, String)>,
}

impl FleetTasks {
    /// Runs the heartbeat and the notices until `stop`, on the store's runtime.
    pub fn run(self, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let FleetTasks {
            fleet,
            listening,
            identity_notices,
        } = self;
        let pg = fleet.pg().clone();
        let drive = {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            pg.spawn(async move { drive(fleet, stop).await })
        };
        let identities = {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            pg.spawn(async move { identities(fleet, identity_notices, stop).await })
        };
        pg.spawn(async move {
            notices(fleet, listening, stop).await;
            let _ = drive.await;
            let _ = identities.await;
        })
    }
}

/// Drives the state machine ([`node`]): answers the handshakes waiting for their claims,
/// runs its statements (each on its own task, its answer fed back), and its timers.
async fn drive(fleet: Arc<Fleet>, stop: CancellationToken) {
    loop {
        let mut todo = Vec::new();
        let next = {
            let mut m = lock(&fleet.machine);
            let now = Instant::now();
            if m.node.poll_timeout().is_some_and(|t| t <= now) {
                m.node.handle_timeout(now);
            }
            while let Some(action) = m.node.poll_action() {
                match action {
                    // A handshake that stopped waiting dropped its `Claiming`: the
                    // machine knows.
                    Action::Answer(ticket, answer) => {
                        if let Some(tx) = m.answers.remove(&ticket) {
                            let _ = tx.send(answer);
                        }
                    }
                    other => todo.push(other),
                }
            }
            m.node.poll_timeout()
        };
        for action in todo {
            fleet.execute(action);
        }
        let next = next.map_or_else(
            || tokio::time::Instant::now() + HEARTBEAT,
            tokio::time::Instant::from_std,
        );
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = fleet.wake.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
        }
    }
}

impl Fleet {
    /// Carries out one action of the state machine (not an answer: [`drive`] gives
    /// those).
    fn execute(self: &Arc<Self>, action: Action) {
        match action {
            Action::Answer(..) => {}
            Action::Run(batch) => {
                let this = self.clone();
                self.pg().spawn(async move {
                    let key = this.store.fleet_key();
                    let notices: Vec<String> =
                        batch.announce.iter().map(|t| t.encode(key)).collect();
                    let ms = STALE.as_millis() as i64;
                    let run = db::run_batch(&this.db, &this.node, this.reject, ms, &batch, &notices);
                    let answer = match tokio::time::timeout(node::BATCH_TIMEOUT, run).await {
                        Ok(Ok(rows)) => Ok(rows),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no answer within {:?}", node::BATCH_TIMEOUT)),
                    };
                    if let Err(e) = &answer {
                        let releases = batch.releases.len() + batch.release_all.len();
                        if releases > 0 {
                            info!(error = %e, releases, "fleet: could not release a claim; trying again in a second");
                        }
                        if !batch.claims.is_empty() {
                            debug!(error = %e, claims = batch.claims.len(), "fleet: the claims' statement failed");
                        }
                    }
                    this.with_node(|node, now| node.batch_done(batch.no, answer, now));
                });
            }
            Action::Heartbeat(no) => {
                let this = self.clone();
                self.pg().spawn(async move {
                    let ack = this.log_ack();
                    let beat = this.db.heartbeat(&this.node, STALE, &ack);
                    let answer = match tokio::time::timeout(HEARTBEAT, beat).await {
                        Ok(Ok(beat)) => {
                            // Renewed as of when it was sent: told to the machine at once
                            // (after the next heartbeat went, a renewal counts for nothing).
                            this.with_node(|node, now| node.heartbeat_done(no, Ok(beat.alive), now));
                            this.check_peers(&beat.peers).await;
                            for dead in &beat.dead {
                                warn!(
                                    node = dead.node,
                                    addr = dead.addr,
                                    claims_freed = dead.claims,
                                    "fleet: declared node {} ({}) dead: no heartbeat for {:.1} s; session claims it held, now free: {} (their devices are served by whichever node they reach)",
                                    dead.node,
                                    dead.addr,
                                    dead.silent.as_secs_f64(),
                                    dead.claims
                                );
                            }
                            return;
                        }
                        Ok(Err(e)) => {
                            debug!(error = %e, "fleet: heartbeat failed");
                            Err(e.to_string())
                        }
                        Err(_) => {
                            debug!("fleet: heartbeat timed out");
                            Err("timed out".into())
                        }
                    };
                    this.with_node(|node, now| node.heartbeat_done(no, answer, now));
                });
            }
            Action::Fence => {
                warn!(
                    "fleet: no heartbeat renewed for {FENCE_AFTER:?}: fencing this node (sessions closed, handshakes refused BUSY) until the database answers"
                );
                self.drop_sessions("this node is cut off from the fleet's database");
            }
            Action::Unfence => info!("fleet: the database is back: serving again"),
            Action::Audit(no) => {
                let this = self.clone();
                self.pg().spawn(async move {
                    let read = tokio::time::timeout(node::BATCH_TIMEOUT, this.claims());
                    let answer = match read.await {
                        Ok(Ok(claims)) => Ok(claims),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("timed out".into()),
                    };
                    if let Err(e) = &answer {
                        warn!(error = %e, "fleet: could not read this node's claims back to find sessions taken over unannounced (tried again at the next audit)");
                    }
                    this.with_node(|node, now| node.audited(no, answer, now));
                });
            }
            Action::Close(id, epoch) => {
                if self.registry.close_epoch(
                    &id,
                    epoch,
                    CloseCode::TAKEN_OVER,
                    "its claim was taken over on another node, unannounced",
                ) {
                    warn!(id = %id, epoch, "fleet: a session whose claim is gone or another node's (a takeover whose notice never came): closed");
                }
            }
            Action::CatchUp(loss) => {
                let this = self.clone();
                self.pg().spawn(async move {
                    // On its own task, so that a panic in it is a failure like any other.
                    let inner = this.clone();
                    let done = tokio::spawn(async move { inner.try_catch_up().await }).await;
                    let claims = match done {
                        Ok(Ok(claims)) => Ok(claims),
                        Ok(Err(e)) => {
                            warn!(error = %e, "fleet: could not catch up with the notices missed (no session is registered meanwhile); trying again");
                            Err(e.to_string())
                        }
                        Err(e) => {
                            warn!(error = %e, "fleet: the catch-up with missed notices failed; trying again");
                            Err(e.to_string())
                        }
                    };
                    if this.with_node(|node, now| node.caught_up(loss, claims, now)) {
                        info!("fleet: caught up with the notices missed: serving again");
                    }
                });
            }
            Action::Rejoin => {
                // Declared dead by another node: its claims are gone, and others may
                // serve its devices already.
                warn!("fleet: this node was declared dead (its heartbeat was late); joining again");
                self.drop_sessions("this node was declared dead by the fleet");
                let this = self.clone();
                self.pg().spawn(async move {
                    let sent = Instant::now();
                    let addr = this.addr();
                    let join = tokio::time::timeout(HEARTBEAT, this.db.join(&this.node, &addr));
                    let ok = matches!(join.await, Ok(Ok(())));
                    this.with_node(|node, now| node.rejoined(ok, sent, now));
                });
            }
        }
    }
}

/// Applies identity notices in the order they came; one that cannot be read is tried
/// again a second later (meanwhile the identity is out of the index).
async fn identities(
    fleet: Arc<Fleet>,
    mut notices: mpsc::Receiver<(String, String)>,
    stop: CancellationToken,
) {
    loop {
        let (op, id) = tokio::select! {
            _ = stop.cancelled() => return,
            // Notices were dropped: read the log and every key again (what they would
            // have made the node read).
            _ = fleet.resync.notified() => {
                let store = fleet.store.clone();
                match tokio::task::spawn_blocking(move || store.reload_key_index()).await {
                    Ok(Ok((keys, _))) => {
                        fleet.apply_revocations().await;
                        // Queued notices of identities indexed only now marked nothing.
                        if let Err(e) = fleet.deliveries_marked().await {
                            warn!("fleet: cannot read which identities have queued messages: {e}");
                        }
                        info!(keys, "fleet: every key read again after a flood of identity notices");
                    }
                    _ => {
                        warn!("fleet: could not read every key again after a flood of identity notices; trying again");
                        fleet.resync.notify_one();
                        tokio::time::sleep(HEARTBEAT).await;
                    }
                }
                continue;
            }
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
                let _ = again.send(("changed".into(), id)).await;
            });
        }
    }
}

async fn notices(fleet: Arc<Fleet>, mut listening: Listening, stop: CancellationToken) {
    let mut ping = tokio::time::interval(HEARTBEAT);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let alive = tokio::select! {
            _ = stop.cancelled() => return,
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
        // The connection dropped: notices may have been missed meanwhile. The machine
        // admits no session until the node has caught up with them.
        fleet.with_node(|node, now| node.notices_lost(now));
        warn!("fleet: the notification connection is lost (no session is registered until it is back); opening it again");
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
        // Messages may have been queued, and outcomes forwarded, unheard: the outcomes
        // are read, and the catch-up marks the identities with messages again once it
        // reloaded the key index, which tells their live sessions (only theirs: not
        // every session reads its queue).
        fleet.outcomes.notify_one();
        // The catch-up runs on its own task (the machine's action): the notices that
        // come meanwhile are acted on.
        fleet.with_node(|node, now| node.listening(now));
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

    fn may_deliver(&self, id: &Id, epoch: u64) -> bool {
        self.0.upgrade().is_some_and(|f| f.may_deliver(id, epoch))
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

#[cfg(test)]
mod tests {
    //! The drivers' order of locks and events, with the real machine and registry: what
    //! the sleeps of debug builds reached from outside before (issue 29).
    use super::*;
    use crate::proto::testing::established_in;
    use crate::proto::Mode;
    use crate::server::registry::{Entry, Mailbox, Registration};
    use node::{ClaimKind, ClaimRow};

    fn machine() -> Mutex<Machine> {
        Mutex::new(Machine {
            node: Node::new("me".into(), Instant::now()),
            answers: HashMap::new(),
        })
    }

    /// A claim of `id` granted with `epoch` by the machine.
    fn granted(machine: &Mutex<Machine>, id: &Id, epoch: u64) -> Ticket {
        let mut m = lock(machine);
        let now = Instant::now();
        let ticket = m.node.claim(id.clone(), "peer".into(), now);
        let no = loop {
            match m.node.poll_action() {
                Some(Action::Run(batch)) => break batch.no,
                Some(_) => {}
                None => panic!("no batch"),
            }
        };
        let row = ClaimRow {
            kind: ClaimKind::Claimed,
            epoch,
            in_a_row: 0,
            old_node: None,
            old_peer: None,
            old_epoch: None,
        };
        m.node.batch_done(no, Ok(vec![row]), now);
        ticket
    }

    /// Registers `id`'s session with claim `epoch` in `registry`, through the machine.
    fn register(
        machine: &Mutex<Machine>,
        registry: &Arc<Registry>,
        id: &Id,
        ticket: Ticket,
        epoch: u64,
    ) -> Result<Registration, RegisterError> {
        let (_, est) = established_in(Mode::Authenticated, 1024);
        let entry = Entry {
            conn: registry.next_conn(),
            epoch,
            log_pos: 0,
            peer: "127.0.0.1:1".parse().unwrap(),
            since: std::time::SystemTime::now(),
            mailbox: Arc::new(Mailbox::default()),
        };
        admit_and_register(machine, ticket, || {
            registry.register(
                &est.verified,
                id,
                entry,
                TakeoverPolicy::Replace,
                Instant::now(),
            )
        })
    }

    fn takeover(id: &Id, old_epoch: u64) -> Takeover {
        Takeover {
            id: id.clone(),
            old_node: "me".into(),
            old_epoch,
            new_node: "other".into(),
            new_epoch: old_epoch + 1,
        }
    }

    /// A takeover heard between the claim and the registration: the session is never
    /// live here.
    #[test]
    fn a_takeover_heard_before_the_registration_refuses_it() {
        let (machine, registry) = (machine(), Arc::new(Registry::default()));
        let id = Id::new("race-1").unwrap();
        let ticket = granted(&machine, &id, 7);
        taken_over(&machine, &registry, &takeover(&id, 7));
        let refused = register(&machine, &registry, &id, ticket, 7);
        assert_eq!(refused.err(), Some(RegisterError::Superseded));
        assert!(!registry.is_live(&id));
    }

    /// A takeover heard just after the registration: the session is asked to close.
    #[test]
    fn a_takeover_heard_after_the_registration_closes_the_session() {
        let (machine, registry) = (machine(), Arc::new(Registry::default()));
        let id = Id::new("race-1").unwrap();
        let ticket = granted(&machine, &id, 7);
        let registration = register(&machine, &registry, &id, ticket, 7).unwrap();
        let mailbox = registry.mailbox(&id).unwrap();
        taken_over(&machine, &registry, &takeover(&id, 7));
        let waker = futures_util::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(matches!(
            mailbox.poll_mail(&mut cx),
            std::task::Poll::Ready(registry::Mail::Close(CloseCode::TAKEN_OVER, _))
        ));
        drop(registration);
        assert!(!registry.is_live(&id));
    }

    /// The node fenced between the claim and the registration: refused, and the claim
    /// is released.
    #[test]
    fn a_fence_between_the_claim_and_the_registration_refuses_it() {
        let (machine, registry) = (machine(), Arc::new(Registry::default()));
        let id = Id::new("race-3").unwrap();
        let ticket = granted(&machine, &id, 3);
        lock(&machine).node.hold(true, Instant::now());
        let refused = register(&machine, &registry, &id, ticket, 3);
        assert_eq!(refused.err(), Some(RegisterError::Fenced));
        assert!(!registry.is_live(&id));
        let mut m = lock(&machine);
        let released = std::iter::from_fn(|| m.node.poll_action())
            .any(|a| matches!(a, Action::Run(b) if b.releases == vec![(id.clone(), 3)]));
        assert!(released, "the claim of a refused session is released");
    }
}
