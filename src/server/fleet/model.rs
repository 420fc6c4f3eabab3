//! The fleet's claim, epoch, heartbeat, fence, deafness and audit rules, model-checked
//! (stateright): every interleaving of a small fleet, driving the real state machine of
//! each node ([`super::node::Node`]) against a model of the database (`tally_claims`, the
//! heartbeat's liveness and deletion of dead nodes, `tally_close` notices, the reads of a
//! node's claims by its catch-up and its audit).
//!
//! Explored, in nine scenarios (each small enough for `cargo test`): two nodes, one
//! identity's handshakes (or two identities', sharing batches) on either at any time,
//! sessions ending or refused after their claim, statements' answers delivered late
//! (across the handshake's deadline and the batch's) or lost, notices delivered late or
//! (under "reject") lost, a notification connection broken (its notices lost, the node
//! deaf until it listens again and has caught up), a revocation committed while
//! handshakes are on their way, a database outage, a node paused
//! (SIGSTOP) and resumed, time advancing a second at a time; `takeover = "reject"` and
//! `"replace"`. A statement runs when it is sent while the database is up, and hangs
//! while it is down; heartbeats are answered at once while it is up (their late answers
//! are unit-tested in `node`). Checked in every state reached (docs/CLUSTER.md, "What is
//! model-checked"):
//!
//! - **one serving session per identity** (`takeover = "reject"`): never two nodes
//!   whose sessions of one identity may still serve; a node's sessions serve until
//!   [`Node::serving_until`], after which it fences itself before anything else;
//! - **every serving session is covered by its node's claim**: the database's claim of
//!   the identity is that node's, with that epoch or a newer one; under "replace", unless
//!   the news of its takeover is on its way (the taking node's answer or notice, or the
//!   node is deaf and will catch up), or its node's audit finds it within its bound
//!   (an audit every second here, one more per answer that may be lost);
//! - **no claim leaked**: a node that is quiescent (nothing in flight, nothing queued,
//!   not fenced) holds a claim in the database only for a session live on it;
//! - **no session of a revoked identity on a node that applied the revocation**, and a
//!   revoked identity's live session is being closed (its notice on its way, or its node
//!   deaf and catching up). The rule is the registry's and the key index's (a handshake
//!   that looked its key up before the revocation was applied is refused at
//!   registration), copied here; the registry's unit tests keep the two in step.
//!
//! - **queued delivery** (spec 8.8; the issue's "delivered by exactly one node, never
//!   lost while unacknowledged"): messages are queued at any time, each live session
//!   delivers the next queued after its last only when its node's machine says it may
//!   ([`Node::may_deliver`], asked by the session before it fetches and again before
//!   it hands what it fetched to the device), the device acknowledges in order and the
//!   ACK deletes the row. Checked: *one node at a time delivers an identity's queue*
//!   (`reject`: no delivery while another node's session of the identity may
//!   deliver). Without the machine's say (`gate: false`) the checker finds a node
//!   resumed from a pause delivering beside the other in 24 steps; without its
//!   `serving_until` bound, 27. Also checked, though they hold by the model's own
//!   rules (the row deleted by the device's ACK alone, a session delivering after the
//!   last it delivered), so that a change to those rules here cannot pass unseen: *a
//!   queued message is never lost while unacknowledged*, *a device never receives a
//!   message before an earlier one still queued*. The code's side of those two is
//!   tested elsewhere: the crash tests (tests/fleet.rs, tests/queue.rs), the session's
//!   `Cursor` (unit tests) and which sessions fetch (`delivery::model`).
//!
//! And, so that the check is not vacuous, that each scenario reaches what its faults
//! allow: a session registered, a node fenced, a node paused past its fence holding a
//! session another node serves, a claim whose answer never came released, a session
//! taken over unheard closed by the catch-up, one taken over unannounced closed by an
//! audit, a queued message acknowledged, and one that a paused node delivered
//! unacknowledged delivered again by the other node.
//!
//! Bounded: "no claim leaked" is checked in the states a node settles in within the
//! horizon (3-6 s); a claim whose answer never came is released for `SETTLE` (6 s)
//! after, beyond it (the unit tests of `node` follow those releases to their end).
//! Statements run when they are sent: a statement that commits late, after the node
//! gave up on it, is not explored here (the release of every claim of an id names the
//! batches before it, so that it never deletes a later claim). An outage breaks the
//! notification connections only in the scenarios that explore their loss.
//!
//! Not modelled: the fleet's log and its tags (the store's, tested in tests/fleet.rs and
//! tests/fleet_database.rs), live sends, and which sessions read the queue at their
//! start (the registry's marks: `crate::server::delivery`'s own model); a session here
//! delivers one message per step, without a window.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use stateright::{Checker, Model, Property};

use super::node::{Action, Batch, ClaimKind, ClaimRow, Finish, Node, Ticket, STALE};
use crate::proto::Id;

/// Seconds since the model's start (the database's clock and every node's: they run
/// at one rate; a node's *wall* clock plays no part in these rules).
type Secs = u32;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Claim {
    node: usize,
    epoch: u64,
    /// The node's batch that made it.
    batch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Db {
    up: bool,
    /// Live rows of `nodes`: each one's last heartbeat.
    nodes: BTreeMap<usize, Secs>,
    claims: BTreeMap<Id, Claim>,
    epochs: u64,
    /// Identities whose revocation committed (the fleet's log).
    revoked: std::collections::BTreeSet<Id>,
    /// The queue (spec 8.8): each identity's messages not yet acknowledged, by id.
    queue: BTreeMap<Id, BTreeSet<u8>>,
    /// The last message id given (ids only grow).
    last_msg: u8,
}

/// A statement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Request {
    Batch(Batch),
    Heartbeat(u64),
    Join(Secs),
    /// The catch-up after loss `.0` of the notification connection: this node's claims.
    CatchUp(u64),
    /// An audit: this node's claims.
    Audit(u64),
}

/// A statement's answer, not yet delivered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Answer {
    Batch(u64, Result<Vec<ClaimRow>, String>),
    Heartbeat(u64, Result<bool, String>),
    Join(Secs, bool),
    /// This node's claims (id, epoch) and the revocations committed, or the catch-up
    /// failed.
    CatchUp(
        u64,
        Option<(BTreeMap<Id, u64>, std::collections::BTreeSet<Id>)>,
    ),
    Audit(u64, BTreeMap<Id, u64>),
}

/// A node's notification connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Conn {
    /// Notices reach the node.
    Up,
    /// Dead (the database went away, or the connection broke): notices are lost, and
    /// the node has not found out yet (its ping does, `Step::Deafen`).
    Dead,
    /// The node knows, and opens it again when the database answers.
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct NodeState {
    machine: Node,
    paused: bool,
    /// The registry: the live session of each identity here, with its claim's epoch.
    sessions: BTreeMap<Id, u64>,
    answers: Vec<Answer>,
    /// Claims answered, waiting for their handshake to register.
    granted: Vec<(Ticket, Id, u64)>,
    /// Claims asked for, not answered yet.
    asked: BTreeMap<Ticket, Id>,
    /// When each handshake on its way looked its key up (the count of revocations this
    /// node had applied then): as the registry's `key_lookup`.
    lookups: BTreeMap<Ticket, u8>,
    /// Revocations applied: the key index (a revoked id's handshakes fail) and the
    /// registry's tombstones (when each was applied, by the same count).
    applied: BTreeMap<Id, u8>,
    /// `tally_identity` notices of revocations on their way here.
    revocations: Vec<Id>,
    /// `tally_close` notices on their way here: id, and the epoch taken over.
    notices: Vec<(Id, u64)>,
    conn: Conn,
    /// Each live session's deliveries (as its `delivery::Cursor`).
    deliveries: BTreeMap<Id, Delivering>,
}

/// A session's place in its identity's queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Delivering {
    /// The session's claim.
    epoch: u64,
    /// The last message delivered.
    after: u8,
    /// Delivered, not acknowledged yet, in order.
    unacked: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    now: Secs,
    db: Db,
    nodes: Vec<NodeState>,
    /// What the environment may still do.
    left: Budget,
    /// Sessions of a node whose claim is not theirs (node, id), since when.
    uncovered: BTreeMap<(usize, Id), Secs>,
    /// Witnesses for `sometimes` properties.
    released_lost: bool,
    closed_by_claims_read: bool,
    closed_revoked: bool,
    /// The device of each identity: every message it received.
    received: BTreeMap<Id, BTreeSet<u8>>,
    /// Messages queued, and those the device acknowledged and the database deleted.
    queued: BTreeMap<Id, BTreeSet<u8>>,
    acknowledged: BTreeMap<Id, BTreeSet<u8>>,
    /// Broken rules, noted when the step that breaks them is taken: a message delivered
    /// while another node's session of the identity may deliver, or while an earlier
    /// message is queued that the device never received.
    delivered_beside: bool,
    out_of_order: bool,
    /// Witnesses: a message delivered again by another node than the first.
    redelivered_elsewhere: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Step {
    Tick,
    Timer(usize),
    Connect(usize, usize),
    Register(usize, usize),
    Refuse(usize, usize),
    End(usize, Id),
    Deliver(usize, usize),
    LoseAnswer(usize, usize),
    Notice(usize, usize),
    LoseNotice(usize, usize),
    Outage,
    Pause(usize),
    Resume(usize),
    /// Identity `k` is revoked (the revocation commits, its notice goes to every node
    /// listening).
    Revoke(usize),
    /// Node `i` applies the `k`th revocation notice on its way.
    Revocation(usize, usize),
    /// Node `i`'s notification connection breaks (its notices on their way are lost).
    Cut(usize),
    /// Node `i` finds its notification connection dead.
    Deafen(usize),
    /// Node `i` listens again.
    Relisten(usize),
    /// A message is queued for identity `k` (the transaction commits).
    Enqueue(usize),
    /// Node `i`'s session of `id` delivers its next queued message.
    Fetch(usize, Id),
    /// The device acknowledges the oldest message node `i`'s session of `id` delivered
    /// (the row is deleted).
    Ack(usize, Id),
}

/// Handshakes the environment may make, and faults it may cause: database outages,
/// nodes paused, answers or notices lost, notification connections broken,
/// revocations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Budget {
    handshakes: u8,
    outages: u8,
    pauses: u8,
    losses: u8,
    cuts: u8,
    revokes: u8,
    /// Messages queued.
    sends: u8,
}

struct Fleet {
    base: Instant,
    ids: Vec<Id>,
    nodes: usize,
    horizon: Secs,
    /// What the environment may do in all.
    budget: Budget,
    reject: bool,
    /// How often each node audits its claims (`None`: `AUDIT_EVERY`, beyond the
    /// horizon).
    audit_every: Option<Secs>,
    /// Sessions deliver only when their node's machine says they may
    /// ([`Node::may_deliver`], as the session does); `false` only to show the rule is
    /// needed.
    gate: bool,
}

fn name(i: usize) -> String {
    format!("n{i}")
}

impl Fleet {
    fn at(&self, s: Secs) -> Instant {
        self.base + Duration::from_secs(u64::from(s))
    }

    fn stale(s: Secs) -> Secs {
        STALE.as_secs() as Secs + s
    }

    /// Whether node `i`'s timers are due.
    fn due(&self, state: &State, i: usize) -> bool {
        let n = &state.nodes[i];
        !n.paused
            && n.machine
                .poll_timeout()
                .is_some_and(|t| t <= self.at(state.now))
    }

    /// Carries out node `i`'s actions, as `super::drive` and `super::Fleet::execute`
    /// do, with the registry's part.
    fn pump(&self, state: &mut State, i: usize) {
        let now = self.at(state.now);
        let mut heartbeats = Vec::new();
        let mut sent = Vec::new();
        let n = &mut state.nodes[i];
        while let Some(action) = n.machine.poll_action() {
            match action {
                Action::Answer(ticket, answer) => {
                    if let Some(id) = n.asked.remove(&ticket) {
                        match answer {
                            Ok(g) => n.granted.push((ticket, id, g.epoch)),
                            Err(_) => {
                                n.lookups.remove(&ticket);
                            }
                        }
                    }
                }
                // Statements run as they are sent while the database is up (their
                // answers come later, or are lost); sent while it is down, they hang
                // until the node gives up on them.
                Action::Run(batch) => sent.push(Request::Batch(batch)),
                // Heartbeats are answered at once while the database is up, and fail
                // while it is down (the machine's unit tests cover late answers): the
                // interleavings explored are the claims'.
                Action::Heartbeat(no) => heartbeats.push(no),
                Action::Fence | Action::Rejoin => {
                    // Every session closed (the registry's `close_all`); claims granted
                    // before are not admitted (the machine's `admits`, at `Register`).
                    for (id, epoch) in std::mem::take(&mut n.sessions) {
                        n.machine.ended(&id, epoch, now);
                    }
                    if action == Action::Rejoin {
                        sent.push(Request::Join(state.now));
                    }
                }
                Action::Unfence => {}
                Action::CatchUp(loss) => sent.push(Request::CatchUp(loss)),
                Action::Audit(no) => sent.push(Request::Audit(no)),
                Action::Close(id, epoch) => {
                    if n.sessions.get(&id).is_some_and(|e| *e <= epoch) {
                        n.sessions.remove(&id);
                        n.machine.ended(&id, epoch, now);
                        state.closed_by_claims_read = true;
                    }
                }
            }
        }
        for request in sent {
            match (state.db.up, request) {
                (true, request) => self.run(state, i, request),
                // The catch-up's reads fail at once (or at their statement timeout):
                // it never hangs.
                (false, Request::CatchUp(loss)) => {
                    state.nodes[i].answers.push(Answer::CatchUp(loss, None));
                }
                (false, _) => {}
            }
        }
        for no in heartbeats {
            if state.db.up {
                self.run(state, i, Request::Heartbeat(no));
                if let Some(answer) = state.nodes[i].answers.pop() {
                    self.deliver(state, i, answer);
                }
            }
            self.pump(state, i);
        }
    }

    /// Runs a statement of node `i` in the database.
    fn run(&self, state: &mut State, i: usize, request: Request) {
        let now = state.now;
        let db = &mut state.db;
        let answer = match request {
            Request::Join(sent) => {
                db.nodes.insert(i, now);
                Answer::Join(sent, true)
            }
            Request::CatchUp(loss) => {
                Answer::CatchUp(loss, Some((db.claims_of(i), db.revoked.clone())))
            }
            Request::Audit(no) => Answer::Audit(no, db.claims_of(i)),
            Request::Heartbeat(no) => {
                let alive = db.nodes.contains_key(&i);
                if alive {
                    db.nodes.insert(i, now);
                }
                // Dead nodes go, and their claims with them (the cascade).
                let dead: Vec<usize> = db
                    .nodes
                    .iter()
                    .filter(|(_, hb)| Fleet::stale(**hb) <= now)
                    .map(|(n, _)| *n)
                    .collect();
                for d in dead {
                    db.nodes.remove(&d);
                    db.claims.retain(|_, c| c.node != d);
                }
                Answer::Heartbeat(no, Ok(alive))
            }
            Request::Batch(batch) => {
                // The claims' foreign key: a node declared dead claims nothing.
                if !db.nodes.contains_key(&i) {
                    let why = "violates foreign key constraint".to_string();
                    state.nodes[i]
                        .answers
                        .push(Answer::Batch(batch.no, Err(why)));
                    return;
                }
                for (id, epoch) in &batch.releases {
                    if db
                        .claims
                        .get(id)
                        .is_some_and(|c| c.node == i && c.epoch == *epoch)
                    {
                        db.claims.remove(id);
                    }
                }
                for id in &batch.release_all {
                    if db
                        .claims
                        .get(id)
                        .is_some_and(|c| c.node == i && c.batch < batch.no)
                    {
                        db.claims.remove(id);
                    }
                }
                let mut rows = Vec::new();
                for c in &batch.claims {
                    let cur = db.claims.get(&c.id).cloned();
                    let live = cur.as_ref().is_some_and(|cur| {
                        if cur.node == i {
                            c.self_live
                        } else {
                            db.nodes
                                .get(&cur.node)
                                .is_some_and(|hb| Fleet::stale(*hb) > now)
                        }
                    });
                    if let (Some(cur), true) = (&cur, live && self.reject) {
                        rows.push(row(ClaimKind::Refused, cur.epoch, Some(cur)));
                        continue;
                    }
                    // Free, held by a dead node, or taken over: a new epoch.
                    db.epochs += 1;
                    let claim = Claim {
                        node: i,
                        epoch: db.epochs,
                        batch: batch.no,
                    };
                    db.claims.insert(c.id.clone(), claim);
                    let kind = if live {
                        ClaimKind::TookOver
                    } else {
                        ClaimKind::Claimed
                    };
                    rows.push(row(kind, db.epochs, cur.as_ref()));
                }
                for t in &batch.announce {
                    let old = t.old_node[1..].parse::<usize>().expect("n<i>");
                    // Delivered to a node listening; lost for one that is not.
                    if state.nodes[old].conn == Conn::Up {
                        state.nodes[old].notices.push((t.id.clone(), t.old_epoch));
                    }
                }
                if !batch.release_all.is_empty() {
                    state.released_lost = true;
                }
                Answer::Batch(batch.no, Ok(rows))
            }
        };
        state.nodes[i].answers.push(answer);
    }

    fn deliver(&self, state: &mut State, i: usize, answer: Answer) {
        let now = self.at(state.now);
        let n = &mut state.nodes[i];
        let m = &mut n.machine;
        match answer {
            Answer::Batch(no, a) => m.batch_done(no, a, now),
            Answer::Heartbeat(no, a) => m.heartbeat_done(no, a, now),
            Answer::Join(sent, ok) => m.rejoined(ok, self.at(sent), now),
            // As `super::Fleet::try_catch_up`: the key index reloaded (the revocations
            // missed are applied), then the machine closes the sessions whose claims are
            // not among those read (`Action::Close`).
            Answer::CatchUp(loss, Some((claims, revoked))) => {
                for id in revoked {
                    state.closed_revoked |= NodeState::apply_revocation(n, id, now);
                }
                n.machine.caught_up(loss, Ok(claims), now);
            }
            Answer::CatchUp(loss, None) => {
                m.caught_up(loss, Err("the database is down".into()), now);
            }
            Answer::Audit(no, claims) => m.audited(no, Ok(claims), now),
        }
    }
}

impl Fleet {
    /// The message node `i`'s session of `id` (claim `epoch`) would deliver next: the
    /// first queued after the last it delivered, if its node's machine lets it
    /// deliver (as `ServerRole::start_fetch` and `ServerRole::deliver` ask).
    fn next_delivery(&self, s: &State, i: usize, id: &Id, epoch: u64) -> Option<u8> {
        let n = &s.nodes[i];
        if n.paused || (self.gate && !n.machine.may_deliver(id, epoch, self.at(s.now))) {
            return None;
        }
        let after = n
            .deliveries
            .get(id)
            .filter(|d| d.epoch == epoch)
            .map_or(0, |d| d.after);
        s.db.queue.get(id)?.range(after + 1..).next().copied()
    }

    /// Whether node `i`'s session of `id` has been without its claim for less than an
    /// audit takes to find it: an audit every `audit_every`, one more for each answer
    /// that may be lost, and the second the clock moves at a time.
    fn audit_will_find(&self, s: &State, i: usize, id: &Id) -> bool {
        let Some(every) = self.audit_every else {
            return false;
        };
        let bound = every * (1 + Secs::from(self.budget.losses)) + 1;
        s.uncovered
            .get(&(i, id.clone()))
            .is_some_and(|since| s.now - since <= bound)
    }

    /// Notes since when each session has been without its node's claim.
    fn track_uncovered(&self, s: &mut State) {
        let mut now_uncovered = BTreeMap::new();
        for (i, n) in s.nodes.iter().enumerate() {
            for (id, e) in &n.sessions {
                let covered =
                    s.db.claims
                        .get(id)
                        .is_some_and(|c| c.node == i && c.epoch >= *e);
                if !covered {
                    let since = s.uncovered.get(&(i, id.clone())).copied().unwrap_or(s.now);
                    now_uncovered.insert((i, id.clone()), since);
                }
            }
        }
        s.uncovered = now_uncovered;
    }

    /// Whether node `i`, whose session of `id` with claim `epoch` was taken over, is
    /// being told: the taking node's answer (its row names the claim superseded) or its
    /// notice is on its way, or node `i` may have missed notices and will catch up.
    fn being_told(&self, s: &State, i: usize, id: &Id, epoch: u64) -> bool {
        let n = &s.nodes[i];
        let names = |old_node: &str, old_epoch: u64| old_node == name(i) && old_epoch >= epoch;
        let audit_closes = n.answers.iter().any(|a| match a {
            Answer::Audit(_, claims) => claims.get(id).is_none_or(|c| *c < epoch),
            _ => false,
        });
        n.conn != Conn::Up
            || n.machine.is_deaf()
            || audit_closes
            || n.notices.iter().any(|(nid, e)| nid == id && *e >= epoch)
            || s.nodes.iter().any(|m| {
                m.machine
                    .announcing()
                    .any(|t| t.id == *id && names(&t.old_node, t.old_epoch))
                    || m.answers.iter().any(|a| match a {
                        Answer::Batch(_, Ok(rows)) => rows.iter().any(|r| {
                            r.kind == ClaimKind::TookOver
                                && r.old_node
                                    .as_deref()
                                    .zip(r.old_epoch)
                                    .is_some_and(|(node, e)| names(node, e))
                        }),
                        _ => false,
                    })
            })
    }
}

impl NodeState {
    /// A revocation of `id` applied (as `Registry::invalidate` and the key index): its
    /// live session closed, its handshakes that looked the key up before refused.
    /// Returns whether it closed a session.
    fn apply_revocation(n: &mut NodeState, id: Id, now: Instant) -> bool {
        if n.applied.contains_key(&id) {
            return false;
        }
        let count = n.applied.len() as u8 + 1;
        n.applied.insert(id.clone(), count);
        let Some(epoch) = n.sessions.remove(&id) else {
            return false;
        };
        n.machine.ended(&id, epoch, now);
        true
    }
}

impl Db {
    /// Node `i`'s claims: id and epoch.
    fn claims_of(&self, i: usize) -> BTreeMap<Id, u64> {
        self.claims
            .iter()
            .filter(|(_, c)| c.node == i)
            .map(|(id, c)| (id.clone(), c.epoch))
            .collect()
    }
}

fn row(kind: ClaimKind, epoch: u64, old: Option<&Claim>) -> ClaimRow {
    ClaimRow {
        kind,
        epoch,
        in_a_row: 0,
        old_node: old.map(|c| name(c.node)),
        old_peer: None,
        old_epoch: old.map(|c| c.epoch),
    }
}

impl Model for Fleet {
    type State = State;
    type Action = Step;

    fn init_states(&self) -> Vec<State> {
        let nodes = (0..self.nodes)
            .map(|i| NodeState {
                machine: match self.audit_every {
                    None => Node::new(name(i), self.base),
                    Some(every) => Node::new(name(i), self.base)
                        .with_audit_every(Duration::from_secs(every.into()), self.base),
                },
                paused: false,
                sessions: BTreeMap::new(),
                answers: Vec::new(),
                granted: Vec::new(),
                asked: BTreeMap::new(),
                lookups: BTreeMap::new(),
                applied: BTreeMap::new(),
                revocations: Vec::new(),
                notices: Vec::new(),
                conn: Conn::Up,
                deliveries: BTreeMap::new(),
            })
            .collect();
        vec![State {
            now: 0,
            db: Db {
                up: true,
                nodes: (0..self.nodes).map(|i| (i, 0)).collect(),
                claims: BTreeMap::new(),
                epochs: 0,
                revoked: Default::default(),
                queue: BTreeMap::new(),
                last_msg: 0,
            },
            nodes,
            left: self.budget,
            uncovered: BTreeMap::new(),
            released_lost: false,
            closed_by_claims_read: false,
            closed_revoked: false,
            received: BTreeMap::new(),
            queued: BTreeMap::new(),
            acknowledged: BTreeMap::new(),
            delivered_beside: false,
            out_of_order: false,
            redelivered_elsewhere: false,
        }]
    }

    fn actions(&self, state: &State, steps: &mut Vec<Step>) {
        // A running node handles its due timers before time moves on.
        let due = (0..self.nodes).any(|i| self.due(state, i));
        if state.now < self.horizon && !due {
            steps.push(Step::Tick);
        }
        if state.left.outages > 0 || !state.db.up {
            steps.push(Step::Outage);
        }
        if state.left.sends > 0 && state.db.up {
            steps.extend((0..self.ids.len()).map(Step::Enqueue));
        }
        if state.left.revokes > 0 && state.db.up {
            steps.extend(
                (0..self.ids.len())
                    .filter(|k| !state.db.revoked.contains(&self.ids[*k]))
                    .map(Step::Revoke),
            );
        }
        for (i, n) in state.nodes.iter().enumerate() {
            if n.paused {
                steps.push(Step::Resume(i));
                continue;
            }
            if state.left.pauses > 0 {
                steps.push(Step::Pause(i));
            }
            if self.due(state, i) {
                steps.push(Step::Timer(i));
            }
            match n.conn {
                Conn::Up if state.left.cuts > 0 => steps.push(Step::Cut(i)),
                Conn::Up => {}
                Conn::Dead => steps.push(Step::Deafen(i)),
                Conn::Down if state.db.up => steps.push(Step::Relisten(i)),
                Conn::Down => {}
            }
            if state.left.handshakes > 0 {
                steps.extend((0..self.ids.len()).map(|k| Step::Connect(i, k)));
            }
            for k in 0..n.granted.len() {
                steps.push(Step::Register(i, k));
                steps.push(Step::Refuse(i, k));
            }
            steps.extend(n.sessions.keys().map(|id| Step::End(i, id.clone())));
            if state.db.up {
                for (id, epoch) in &n.sessions {
                    if self.next_delivery(state, i, id, *epoch).is_some() {
                        steps.push(Step::Fetch(i, id.clone()));
                    }
                    if n.deliveries.get(id).is_some_and(|d| !d.unacked.is_empty()) {
                        steps.push(Step::Ack(i, id.clone()));
                    }
                }
            }
            for (k, answer) in n.answers.iter().enumerate() {
                steps.push(Step::Deliver(i, k));
                // A catch-up's answer always comes (it is the node's own task).
                if state.left.losses > 0 && !matches!(answer, Answer::CatchUp(..)) {
                    steps.push(Step::LoseAnswer(i, k));
                }
            }
            steps.extend((0..n.revocations.len()).map(|k| Step::Revocation(i, k)));
            for k in 0..n.notices.len() {
                steps.push(Step::Notice(i, k));
                // PostgreSQL loses no notice on a live connection (a broken one loses
                // them all: `Cut`); the scenarios under "reject" lose single ones too.
                if state.left.losses > 0 && self.reject {
                    steps.push(Step::LoseNotice(i, k));
                }
            }
        }
    }

    fn next_state(&self, last: &State, step: Step) -> Option<State> {
        let mut s = last.clone();
        let now = self.at(s.now);
        match step {
            // Time moves on, and the running nodes' timers fire (a paused node's fire
            // when it resumes: `Timer`, racing whatever else it does then).
            Step::Tick => {
                s.now += 1;
                let now = self.at(s.now);
                for i in 0..self.nodes {
                    if self.due(&s, i) {
                        s.nodes[i].machine.handle_timeout(now);
                        self.pump(&mut s, i);
                    }
                }
            }
            Step::Outage => {
                if s.db.up {
                    s.left.outages -= 1;
                    // Every connection breaks, the notification connections too (in the
                    // scenarios that explore their loss: in the others it would multiply
                    // the states tenfold).
                    for n in s.nodes.iter_mut().filter(|_| self.budget.cuts > 0) {
                        if n.conn == Conn::Up {
                            n.conn = Conn::Dead;
                            n.notices.clear();
                            n.revocations.clear();
                        }
                    }
                }
                s.db.up = !s.db.up;
            }
            Step::Cut(i) => {
                s.left.cuts -= 1;
                let n = &mut s.nodes[i];
                n.conn = Conn::Dead;
                n.notices.clear();
                n.revocations.clear();
            }
            Step::Deafen(i) => {
                let n = &mut s.nodes[i];
                n.conn = Conn::Down;
                n.machine.notices_lost(now);
                self.pump(&mut s, i);
            }
            Step::Relisten(i) => {
                let n = &mut s.nodes[i];
                n.conn = Conn::Up;
                n.machine.listening(now);
                self.pump(&mut s, i);
            }
            Step::Pause(i) => {
                s.left.pauses -= 1;
                s.nodes[i].paused = true;
            }
            Step::Resume(i) => s.nodes[i].paused = false,
            Step::Timer(i) => {
                s.nodes[i].machine.handle_timeout(now);
                self.pump(&mut s, i);
            }
            Step::Connect(i, k) => {
                s.left.handshakes -= 1;
                let id = self.ids[k].clone();
                let n = &mut s.nodes[i];
                // A revoked key is out of the index: the handshake fails before its
                // claim.
                if !n.applied.contains_key(&id) {
                    let ticket = n.machine.claim(id.clone(), "peer".into(), now);
                    n.asked.insert(ticket, id);
                    n.lookups.insert(ticket, n.applied.len() as u8);
                    self.pump(&mut s, i);
                }
            }
            Step::Revoke(k) => {
                s.left.revokes -= 1;
                let id = self.ids[k].clone();
                s.db.revoked.insert(id.clone());
                for n in s.nodes.iter_mut().filter(|n| n.conn == Conn::Up) {
                    n.revocations.push(id.clone());
                }
            }
            Step::Revocation(i, k) => {
                let n = &mut s.nodes[i];
                let id = n.revocations.remove(k);
                s.closed_revoked |= NodeState::apply_revocation(n, id, now);
                self.pump(&mut s, i);
            }
            Step::Register(i, k) => {
                let n = &mut s.nodes[i];
                let (ticket, id, epoch) = n.granted.remove(k);
                let looked_up = n.lookups.remove(&ticket).unwrap_or(0);
                // As the registry: refused if a revocation was applied since its key was
                // looked up (`Registry::register`'s tombstones).
                let invalidated = n.applied.get(&id).is_some_and(|at| *at > looked_up);
                // As `super::Claiming::register`: only a claim the machine admits.
                if !invalidated && n.machine.admits(ticket) == Ok(epoch) {
                    // A newer session of the id replaces an older one here.
                    n.sessions.insert(id, epoch);
                    n.machine.finish(ticket, Finish::Registered, now);
                } else {
                    n.machine.finish(ticket, Finish::Dropped, now);
                }
                self.pump(&mut s, i);
            }
            Step::Refuse(i, k) => {
                let n = &mut s.nodes[i];
                let (ticket, _, _) = n.granted.remove(k);
                n.lookups.remove(&ticket);
                n.machine.finish(ticket, Finish::Dropped, now);
                self.pump(&mut s, i);
            }
            Step::End(i, id) => {
                let n = &mut s.nodes[i];
                let epoch = n.sessions.remove(&id)?;
                n.machine.ended(&id, epoch, now);
                self.pump(&mut s, i);
            }
            Step::Deliver(i, k) => {
                let answer = s.nodes[i].answers.remove(k);
                self.deliver(&mut s, i, answer);
                self.pump(&mut s, i);
            }
            Step::LoseAnswer(i, k) => {
                s.left.losses -= 1;
                s.nodes[i].answers.remove(k);
            }
            Step::Notice(i, k) => {
                let (id, old_epoch) = s.nodes[i].notices.remove(k);
                let n = &mut s.nodes[i];
                // As `super::Fleet::notice`: the machine first, then the registry.
                n.machine.superseded(&id, old_epoch);
                if let Some(epoch) = n.sessions.get(&id).copied() {
                    if epoch <= old_epoch {
                        n.sessions.remove(&id);
                        n.machine.ended(&id, epoch, now);
                        self.pump(&mut s, i);
                    }
                }
            }
            Step::LoseNotice(i, k) => {
                s.left.losses -= 1;
                s.nodes[i].notices.remove(k);
            }
            Step::Enqueue(k) => {
                s.left.sends -= 1;
                let id = self.ids[k].clone();
                s.db.last_msg += 1;
                let m = s.db.last_msg;
                s.db.queue.entry(id.clone()).or_default().insert(m);
                s.queued.entry(id).or_default().insert(m);
            }
            Step::Fetch(i, id) => {
                let epoch = *s.nodes[i].sessions.get(&id)?;
                let m = self.next_delivery(&s, i, &id, epoch)?;
                // Another node's session of the identity that may deliver too.
                s.delivered_beside |= s.nodes.iter().enumerate().any(|(j, o)| {
                    j != i
                        && o.sessions
                            .get(&id)
                            .is_some_and(|e| o.machine.may_deliver(&id, *e, now))
                });
                let queued = s.db.queue.get(&id).cloned().unwrap_or_default();
                let received = s.received.entry(id.clone()).or_default();
                s.out_of_order |= queued.range(..m).any(|earlier| !received.contains(earlier));
                s.redelivered_elsewhere |= received.contains(&m)
                    && s.nodes.iter().enumerate().any(|(j, o)| {
                        j != i
                            && o.deliveries
                                .get(&id)
                                .is_some_and(|d| d.unacked.contains(&m))
                    });
                received.insert(m);
                let d = s.nodes[i].deliveries.entry(id).or_insert(Delivering {
                    epoch,
                    after: 0,
                    unacked: Vec::new(),
                });
                d.after = m;
                d.unacked.push(m);
            }
            // The ACK deletes the row whichever node's session carries it (the device
            // acknowledged it: no claim needed); one already deleted is not there.
            Step::Ack(i, id) => {
                let d = s.nodes[i].deliveries.get_mut(&id)?;
                let m = d.unacked.remove(0);
                if s.db.queue.get_mut(&id).is_some_and(|q| q.remove(&m)) {
                    s.acknowledged.entry(id).or_default().insert(m);
                }
            }
        }
        // A session's deliveries end with it.
        for n in &mut s.nodes {
            let live = &n.sessions;
            n.deliveries.retain(|id, d| live.get(id) == Some(&d.epoch));
        }
        if !self.reject {
            self.track_uncovered(&mut s);
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "one serving session per identity",
                |m: &Fleet, s: &State| {
                    if !m.reject {
                        return true;
                    }
                    let now = m.at(s.now);
                    m.ids.iter().all(|id| {
                        s.nodes
                            .iter()
                            .filter(|n| {
                                n.sessions.contains_key(id)
                                    && n.machine.serving_until().is_some_and(|t| now < t)
                            })
                            .count()
                            <= 1
                    })
                },
            ),
            Property::always("no claim leaked", |_: &Fleet, s: &State| {
                s.db.claims.iter().all(|(id, c)| {
                    let n = &s.nodes[c.node];
                    let quiescent = s.db.nodes.contains_key(&c.node)
                        && !n.paused
                        && !n.machine.is_fenced()
                        && n.answers.is_empty()
                        && n.granted.is_empty()
                        && n.asked.is_empty()
                        && n.machine.is_quiescent();
                    !quiescent || n.sessions.contains_key(id)
                })
            }),
            Property::always(
                "every serving session is covered by its node's claim",
                |m: &Fleet, s: &State| {
                    let now = m.at(s.now);
                    s.nodes.iter().enumerate().all(|(i, n)| {
                        let serving = n.machine.serving_until().is_some_and(|t| now < t);
                        !serving
                            || n.sessions.iter().all(|(id, e)| {
                                let covered =
                                    s.db.claims
                                        .get(id)
                                        .is_some_and(|c| c.node == i && c.epoch >= *e);
                                // Under "replace" a takeover elsewhere supersedes it; the
                                // node must be hearing of it (`being_told`), or its audit
                                // will find it within its bound.
                                covered
                                    || (!m.reject
                                        && (m.being_told(s, i, id, *e)
                                            || m.audit_will_find(s, i, id)))
                            })
                    })
                },
            ),
            Property::always(
                "no session of an identity whose revocation its node applied",
                |_: &Fleet, s: &State| {
                    s.nodes
                        .iter()
                        .all(|n| n.sessions.keys().all(|id| !n.applied.contains_key(id)))
                },
            ),
            Property::always(
                "a revoked identity's session is being closed",
                |_: &Fleet, s: &State| {
                    s.nodes.iter().all(|n| {
                        n.sessions
                            .keys()
                            .filter(|id| s.db.revoked.contains(*id))
                            .all(|id| {
                                n.revocations.contains(id)
                                    || n.conn != Conn::Up
                                    || n.machine.is_deaf()
                            })
                    })
                },
            ),
            Property::always(
                "one node at a time delivers an identity's queue",
                |m: &Fleet, s: &State| !m.reject || !s.delivered_beside,
            ),
            Property::always(
                "a queued message is never lost while unacknowledged",
                |_: &Fleet, s: &State| {
                    s.queued.iter().all(|(id, sent)| {
                        let queue = s.db.queue.get(id);
                        let acked = s.acknowledged.get(id);
                        let received = s.received.get(id);
                        sent.iter().all(|m| {
                            let in_queue = queue.is_some_and(|q| q.contains(m));
                            let acked = acked.is_some_and(|a| a.contains(m));
                            // Gone only once the device received and acknowledged it.
                            in_queue != acked && (!acked || received.is_some_and(|r| r.contains(m)))
                        })
                    })
                },
            ),
            Property::always(
                "a device never receives a message before an earlier one still queued",
                |_: &Fleet, s: &State| !s.out_of_order,
            ),
            Property::sometimes(
                "a queued message is acknowledged",
                |m: &Fleet, s: &State| m.budget.sends == 0 || !s.acknowledged.is_empty(),
            ),
            Property::sometimes(
                "a message unacknowledged on a paused node is delivered by the other",
                |m: &Fleet, s: &State| {
                    m.budget.sends == 0 || m.budget.pauses == 0 || s.redelivered_elsewhere
                },
            ),
            Property::sometimes(
                "a revoked identity's session is closed",
                |m: &Fleet, s: &State| m.budget.revokes == 0 || s.closed_revoked,
            ),
            Property::sometimes("a session is registered", |_: &Fleet, s: &State| {
                s.nodes.iter().any(|n| !n.sessions.is_empty())
            }),
            Property::sometimes("a node fences itself", |m: &Fleet, s: &State| {
                (m.budget.outages == 0 && m.budget.pauses == 0)
                    || s.nodes.iter().any(|n| n.machine.is_fenced())
            }),
            // The machine closes what a read of its claims finds uncovered (`Close`):
            // the catch-up's in the scenarios that break connections, the audit's in
            // those whose audit runs within the horizon (never both in one scenario).
            Property::sometimes(
                "a session taken over unheard is closed by the catch-up",
                |m: &Fleet, s: &State| m.reject || m.budget.cuts == 0 || s.closed_by_claims_read,
            ),
            Property::sometimes(
                "a node paused past its fence holds a session another node serves",
                |m: &Fleet, s: &State| {
                    let now = m.at(s.now);
                    m.budget.pauses == 0
                        || s.nodes.iter().any(|p| {
                            p.paused
                                && p.machine.serving_until().is_some_and(|t| t <= now)
                                && p.sessions.keys().any(|id| {
                                    s.nodes
                                        .iter()
                                        .any(|n| !n.paused && n.sessions.contains_key(id))
                                })
                        })
                },
            ),
            Property::sometimes(
                "a session taken over unannounced is closed by an audit",
                |m: &Fleet, s: &State| m.reject || m.budget.losses == 0 || s.closed_by_claims_read,
            ),
            Property::sometimes(
                "a claim whose answer never came is released",
                |m: &Fleet, s: &State| m.budget.losses == 0 || s.released_lost,
            ),
        ]
    }
}

/// Explores every state of `model` and asserts its properties (every `always` holds,
/// every `sometimes` is reached); says how many states it saw. (The delivery model's
/// too.)
pub(crate) fn check<M>(name: &str, model: M)
where
    M: Model + Send + Sync + 'static,
    M::State: std::fmt::Debug + std::hash::Hash + Send + Sync + Clone + PartialEq + 'static,
    M::Action: std::fmt::Debug + Clone + PartialEq,
{
    let started = std::time::Instant::now();
    let checker = model.checker().spawn_bfs().join();
    eprintln!(
        "{name}: {} states in {:.1} s",
        checker.unique_state_count(),
        started.elapsed().as_secs_f64()
    );
    checker.assert_properties();
}

/// A fleet of two nodes serving `ids` for `horizon` seconds (`TALLY_MODEL_HORIZON`
/// overrides it), with `handshakes` handshakes and the faults given: database outages,
/// nodes paused, answers or notices lost, notification connections broken. Under
/// `takeover = "reject"` unless `replace`.
fn fleet(ids: &[&str], horizon: Secs, handshakes: u8, faults: [u8; 4]) -> Fleet {
    let [outages, pauses, losses, cuts] = faults;
    let horizon = std::env::var("TALLY_MODEL_HORIZON")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(horizon);
    Fleet {
        base: Instant::now(),
        ids: ids.iter().map(|i| Id::new(i).unwrap()).collect(),
        nodes: 2,
        horizon,
        budget: Budget {
            handshakes,
            outages,
            pauses,
            losses,
            cuts,
            revokes: 0,
            sends: 0,
        },
        reject: true,
        audit_every: None,
        gate: true,
    }
}

/// [`fleet`] under `takeover = "replace"`.
fn replacing(ids: &[&str], horizon: Secs, handshakes: u8, faults: [u8; 4]) -> Fleet {
    Fleet {
        reject: false,
        ..fleet(ids, horizon, handshakes, faults)
    }
}

/// A node paused (SIGSTOP) past its fence and resumed, while the other takes its
/// identity: they never both serve it.
#[test]
fn a_paused_node_and_a_takeover() {
    check("paused", fleet(&["a"], 6, 2, [0, 1, 0, 0]));
}

/// A node paused, and the database away for a while.
#[test]
fn a_paused_node_and_a_database_outage() {
    check("paused and outage", fleet(&["a"], 5, 2, [1, 1, 0, 0]));
}

/// The database away for a while, and an answer or a notice lost.
#[test]
fn a_database_outage_and_lost_answers() {
    check("outage", fleet(&["a"], 6, 2, [1, 0, 1, 0]));
}

/// Two identities, a node paused: one identity's rules never disturb the other's
/// (they share batches and statements).
#[test]
fn two_identities_and_a_paused_node() {
    check("two identities", fleet(&["a", "b"], 5, 2, [0, 1, 0, 0]));
}

/// `takeover = "replace"`, a takeover's answer lost (the taking node never learns what
/// it took over, and never announces it): the session taken over is found by its
/// node's audit of its claims, and closed within the audit's bound.
#[test]
fn replace_with_a_lost_answer() {
    let fleet = Fleet {
        audit_every: Some(1),
        ..replacing(&["a"], 3, 2, [0, 0, 1, 0])
    };
    check("replace, lost answer", fleet);
}

/// `takeover = "replace"`, a notification connection broken: a session taken over
/// while its node was not listening is closed when the node catches up.
#[test]
fn replace_with_a_broken_notification_connection() {
    check(
        "replace, notices lost",
        replacing(&["a"], 5, 2, [0, 0, 0, 1]),
    );
}

/// A revocation, a handshake in flight on either node, a notification connection
/// broken: no node that applied the revocation keeps or registers a session of it (a
/// handshake that looked its key up before is refused at registration), and a node
/// that has not applied it yet is being told (its notice on its way, or it is deaf and
/// will catch up).
#[test]
fn a_revocation_a_handshake_in_flight_and_a_broken_notification_connection() {
    let mut fleet = fleet(&["a"], 3, 2, [0, 0, 0, 1]);
    fleet.budget.revokes = 1;
    check("revocation", fleet);
}

/// Queued delivery (spec 8.8) in a fleet: messages queued at any time, delivered by the
/// sessions as their node's machine allows, acknowledged by the device; a node paused
/// past its fence while the other takes the identity over. One node at a time delivers,
/// nothing unacknowledged is lost, nothing is delivered before an earlier message still
/// queued; a message the paused node delivered unacknowledged is delivered again by the
/// other.
#[test]
fn queued_delivery_with_a_paused_node() {
    let mut fleet = fleet(&["a"], 6, 2, [0, 1, 0, 0]);
    fleet.budget.sends = 2;
    check("delivery, paused", fleet);
}

/// Queued delivery across a database outage and a lost answer or notice.
#[test]
fn queued_delivery_with_an_outage_and_lost_answers() {
    let mut fleet = fleet(&["a"], 6, 2, [1, 0, 1, 0]);
    fleet.budget.sends = 1;
    check("delivery, outage", fleet);
}

/// Without the machine's say ([`Node::may_deliver`]) a node resumed from a pause
/// delivers before its timer fences it, while the other node's session of the
/// identity delivers too: the checker finds it.
#[test]
fn without_the_machines_say_a_resumed_node_delivers_beside_the_other() {
    let mut fleet = fleet(&["a"], 6, 2, [0, 1, 0, 0]);
    fleet.budget.sends = 1;
    fleet.gate = false;
    let checker = fleet.checker().spawn_bfs().join();
    let path = checker
        .discovery("one node at a time delivers an identity's queue")
        .expect("a counterexample");
    eprintln!("without the gate: {} steps", path.into_actions().len());
}
