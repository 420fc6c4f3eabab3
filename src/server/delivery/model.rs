//! When a session looks at its identity's queue, model-checked (stateright): the real
//! [`Marks`] and [`Cursor`] of one identity on one node, against a model of the queue's
//! rows, the `tally_queued` notices on their way (in a fleet, from any node), the
//! notification connection lost and listened again, the node restarted, and sessions
//! that come and go, each with its fetches (a fetch reads the queue at one moment and
//! answers later; the first runs on a task of its own, which outlives its session).
//!
//! Checked in every state reached (the rules of `Registry::queued`, `Registry::register`,
//! `ServerRole::start_fetch` and `ServerRole::deliver`, copied here step by step):
//!
//! - **no message left unseen by a live session**: once nothing is on its way (no
//!   notice, no fetch, no acknowledgement due, the notification connection up and the
//!   marks read again after it was lost), the identity's queue is empty: whatever was
//!   queued was delivered in this session and acknowledged;
//! - **no message forgotten for the next session**: with no session and nothing on its
//!   way, an identity with messages is marked, so that its next session fetches.
//!
//! The sweep's pruning of marks (every minute: those of identities without messages,
//! read from the store, unless marked since) is explored too, and fetches shortened by
//! rows deleted under them (an older session's acknowledgement committing late).
//!
//! And, so that the check is not vacuous, that the scenarios reach: a session that
//! started unmarked (no fetch) delivers a message queued later, an empty first fetch
//! unmarks, a message delivered in one session is delivered again in the next (its
//! acknowledgement never came), and a first fetch outlives its session and still
//! unmarks.

use std::collections::BTreeSet;

use stateright::{Model, Property};

use super::Cursor;
use crate::proto::Id;
use crate::server::marks::Marks;

/// Deliveries a session has unacknowledged, at most (`limits.deliveries_in_flight`).
const WINDOW: usize = 1;

fn id() -> Id {
    Id::new("sensor").expect("a valid id")
}

/// A fetch: of messages after `after`, at most `limit`; what it read (once it did), and
/// the mark it gives back if it finds nothing (a session's first fetch).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Fetch {
    after: u64,
    limit: usize,
    /// The ids it chose (`ORDER BY msg_id LIMIT`), once it read the queue.
    read: Option<Vec<u64>>,
    unmark: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Session {
    cursor: Cursor,
    /// The mark taken at registration, until the first fetch takes it.
    mark: Option<u64>,
    /// The mailbox was told a message was queued.
    notified: bool,
    fetch: Option<Fetch>,
    /// Delivered, not acknowledged.
    outstanding: BTreeSet<u64>,
    /// Started unmarked: no fetch at its start.
    unmarked_start: bool,
    /// Messages delivered in this session.
    delivered: BTreeSet<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    /// The queue's rows (message ids), as committed.
    queue: BTreeSet<u64>,
    next_id: u64,
    /// `tally_queued` notices on their way to the node.
    notices: u8,
    /// The notification connection is lost: notices sent now are lost.
    deaf: bool,
    /// Listening again: the marks are being read again from the store.
    reload: bool,
    /// The sweep's pruning of marks: the last mark when it started, then whether the
    /// identity had messages when it read the store.
    prune: Option<(u64, Option<bool>)>,
    marks: Marks,
    session: Option<Session>,
    /// First fetches of sessions that ended, still running.
    orphans: Vec<Fetch>,
    /// Messages delivered in an earlier session (for the witness of a redelivery).
    delivered_before: BTreeSet<u64>,
    budget: Budget,
    /// Witnesses.
    seen: Seen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Budget {
    enqueues: u8,
    sessions: u8,
    losses: u8,
    restarts: u8,
    prunes: u8,
    /// Acknowledgements of a session's deliveries that commit after it ended.
    late_acks: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Seen {
    unmarked_start_delivered: bool,
    unmarked: bool,
    redelivered: bool,
    orphan_unmarked: bool,
    /// A fetch came back short while rows remained after it.
    shortened: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Step {
    /// A message is committed (on any node); its notice leaves unless the node is deaf.
    Enqueue,
    /// A notice reaches the node: `Registry::queued`.
    Notice,
    /// A session registers (`Registry::register`) and starts (`ServerRole::new`,
    /// `start_fetch`).
    Register,
    /// The session takes its mailbox's news (`Work::Queued`).
    Mail,
    /// The session's fetch reads the queue.
    Read,
    /// Its answer reaches the session (`deliver`).
    Done,
    /// An orphaned fetch reads the queue, or (read already) ends.
    Orphan(usize),
    /// The device acknowledges a delivery: its row deleted.
    Ack(u64),
    /// The acknowledgement of a delivery of an ended session commits now.
    LateAck(u64),
    /// The session ends (its fetch, if any, goes on).
    End,
    /// The notification connection is lost.
    Lose,
    /// Listening again: the marks to be read again (the catch-up).
    Relisten,
    /// The identities with messages read again and marked (`mark_queued`: their live
    /// sessions told).
    Reload,
    /// The node restarts: sessions, notices and marks gone; marked from the store.
    Restart,
    /// The sweep notes the last mark...
    PruneStart,
    /// ...reads which identities have messages...
    PruneRead,
    /// ...and unmarks the others, except those marked since.
    PruneApply,
}

struct Delivery {
    budget: Budget,
}

/// `ServerRole::start_fetch`.
fn start_fetch(s: &mut Session) {
    if s.fetch.is_some() {
        return;
    }
    if let Some(limit) = s.cursor.poll_fetch(WINDOW) {
        let after = s.cursor.after();
        let unmark = if after == 0 { s.mark.take() } else { None };
        s.fetch = Some(Fetch {
            after,
            limit,
            read: None,
            unmark,
        });
    }
}

fn read(queue: &BTreeSet<u64>, f: &mut Fetch) {
    f.read = Some(queue.range(f.after + 1..).take(f.limit).copied().collect());
}

/// What a fetch answers (`queue::postgres::PgQueue::next`): the rows it chose that are
/// still there (one deleted meanwhile, by an acknowledgement of an older session, is
/// not returned), and whether more may follow: a full answer, or rows after the last
/// one it chose.
fn answer(queue: &BTreeSet<u64>, f: &Fetch) -> Option<(Vec<u64>, bool)> {
    let chosen = f.read.as_ref()?;
    let rows: Vec<u64> = chosen
        .iter()
        .copied()
        .filter(|m| queue.contains(m))
        .collect();
    let last = chosen.last().copied().unwrap_or(f.after);
    let more = rows.len() >= f.limit || queue.range(last + 1..).next().is_some();
    Some((rows, more))
}

impl Model for Delivery {
    type State = State;
    type Action = Step;

    fn init_states(&self) -> Vec<State> {
        vec![State {
            queue: BTreeSet::new(),
            next_id: 1,
            notices: 0,
            deaf: false,
            reload: false,
            prune: None,
            marks: Marks::default(),
            session: None,
            orphans: Vec::new(),
            delivered_before: BTreeSet::new(),
            budget: self.budget,
            seen: Seen::default(),
        }]
    }

    fn actions(&self, s: &State, steps: &mut Vec<Step>) {
        if s.budget.enqueues > 0 {
            steps.push(Step::Enqueue);
        }
        if s.notices > 0 {
            steps.push(Step::Notice);
        }
        match &s.session {
            None if s.budget.sessions > 0 => steps.push(Step::Register),
            None => {}
            Some(sess) => {
                if sess.notified {
                    steps.push(Step::Mail);
                }
                match &sess.fetch {
                    Some(f) if f.read.is_none() => steps.push(Step::Read),
                    Some(_) => steps.push(Step::Done),
                    None => {}
                }
                for m in &sess.outstanding {
                    steps.push(Step::Ack(*m));
                }
                steps.push(Step::End);
            }
        }
        for i in 0..s.orphans.len() {
            steps.push(Step::Orphan(i));
        }
        if s.budget.losses > 0 && !s.deaf {
            steps.push(Step::Lose);
        }
        if s.deaf {
            steps.push(Step::Relisten);
        }
        if s.reload {
            steps.push(Step::Reload);
        }
        if s.budget.restarts > 0 {
            steps.push(Step::Restart);
        }
        match s.prune {
            None if s.budget.prunes > 0 => steps.push(Step::PruneStart),
            None => {}
            Some((_, None)) => steps.push(Step::PruneRead),
            Some((_, Some(_))) => steps.push(Step::PruneApply),
        }
        if s.budget.late_acks > 0 {
            for m in s.delivered_before.intersection(&s.queue) {
                steps.push(Step::LateAck(*m));
            }
        }
    }

    fn next_state(&self, last: &State, step: Step) -> Option<State> {
        let mut s = last.clone();
        let id = id();
        match step {
            Step::Enqueue => {
                s.budget.enqueues -= 1;
                s.queue.insert(s.next_id);
                s.next_id += 1;
                if !s.deaf {
                    s.notices += 1;
                }
            }
            Step::Notice => {
                s.notices -= 1;
                s.marks.queued(&id);
                if let Some(sess) = &mut s.session {
                    sess.notified = true;
                }
            }
            Step::Register => {
                s.budget.sessions -= 1;
                let mark = s.marks.get(&id);
                let mut sess = Session {
                    cursor: match mark {
                        Some(_) => Cursor::new(),
                        None => Cursor::nothing_queued(),
                    },
                    mark,
                    notified: false,
                    fetch: None,
                    outstanding: BTreeSet::new(),
                    unmarked_start: mark.is_none(),
                    delivered: BTreeSet::new(),
                };
                start_fetch(&mut sess);
                s.session = Some(sess);
            }
            Step::Mail => {
                let sess = s.session.as_mut()?;
                sess.notified = false;
                sess.cursor.noticed();
                start_fetch(sess);
            }
            Step::Read => {
                let queue = s.queue.clone();
                read(&queue, s.session.as_mut()?.fetch.as_mut()?);
            }
            Step::Done => {
                let sess = s.session.as_mut()?;
                let f = sess.fetch.take()?;
                let (got, more) = answer(&s.queue, &f)?;
                if got.len() < f.limit && more {
                    s.seen.shortened = true;
                }
                if let (true, Some(mark)) = (got.is_empty() && !more, f.unmark) {
                    s.marks.empty(&id, mark);
                    s.seen.unmarked = true;
                }
                sess.cursor.fetched(&got, more);
                for m in &got {
                    if s.delivered_before.contains(m) {
                        s.seen.redelivered = true;
                    }
                    sess.outstanding.insert(*m);
                    sess.delivered.insert(*m);
                }
                if sess.unmarked_start && !got.is_empty() {
                    s.seen.unmarked_start_delivered = true;
                }
                start_fetch(sess);
            }
            Step::Orphan(i) => {
                let f = &mut s.orphans[i];
                if f.read.is_none() {
                    let queue = s.queue.clone();
                    read(&queue, f);
                } else {
                    let f = s.orphans.remove(i);
                    if let (Some((got, more)), Some(mark)) = (answer(&s.queue, &f), f.unmark) {
                        if got.is_empty() && !more {
                            s.marks.empty(&id, mark);
                            s.seen.orphan_unmarked = true;
                        }
                    }
                }
            }
            Step::LateAck(m) => {
                s.budget.late_acks -= 1;
                s.queue.remove(&m);
            }
            Step::Ack(m) => {
                let sess = s.session.as_mut()?;
                sess.outstanding.remove(&m);
                sess.cursor.settled();
                s.queue.remove(&m);
                start_fetch(sess);
            }
            Step::End => {
                let sess = s.session.take()?;
                // Every fetch runs on a task of its own, but only a first one has a
                // mark to give back: only those are followed after the session.
                if let Some(f) = sess.fetch.filter(|f| f.unmark.is_some()) {
                    s.orphans.push(f);
                }
                s.delivered_before.extend(sess.delivered);
            }
            Step::Lose => {
                s.budget.losses -= 1;
                s.deaf = true;
                s.notices = 0;
            }
            Step::Relisten => {
                s.deaf = false;
                s.reload = true;
            }
            Step::Reload => {
                s.reload = false;
                if !s.queue.is_empty() {
                    s.marks.queued(&id);
                    if let Some(sess) = &mut s.session {
                        sess.notified = true;
                    }
                }
            }
            Step::PruneStart => {
                s.budget.prunes -= 1;
                s.prune = Some((s.marks.last(), None));
            }
            Step::PruneRead => {
                let (before, _) = s.prune?;
                s.prune = Some((before, Some(!s.queue.is_empty())));
            }
            Step::PruneApply => {
                let (before, has) = s.prune.take()?;
                let has = has?;
                let queued = if has {
                    [id.clone()].into()
                } else {
                    Default::default()
                };
                s.marks.prune(&queued, before);
            }
            Step::Restart => {
                s.budget.restarts -= 1;
                s.prune = None;
                if let Some(sess) = s.session.take() {
                    s.delivered_before.extend(sess.delivered);
                }
                s.orphans.clear();
                s.notices = 0;
                s.deaf = false;
                s.reload = false;
                s.marks = Marks::default();
                if !s.queue.is_empty() {
                    s.marks.queued(&id);
                }
            }
        }
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(
                "no message left unseen by a live session",
                |_: &Delivery, s: &State| {
                    let Some(sess) = &s.session else {
                        return true;
                    };
                    let settled = s.notices == 0
                        && !s.deaf
                        && !s.reload
                        && !sess.notified
                        && sess.fetch.is_none()
                        && sess.outstanding.is_empty();
                    !settled || s.queue.is_empty()
                },
            ),
            Property::always(
                "no message forgotten for the next session",
                |_: &Delivery, s: &State| {
                    let settled = s.session.is_none() && s.notices == 0 && !s.deaf && !s.reload;
                    !settled || s.queue.is_empty() || s.marks.get(&id()).is_some()
                },
            ),
            Property::sometimes(
                "a session started unmarked delivers a message queued later",
                |_: &Delivery, s: &State| s.seen.unmarked_start_delivered,
            ),
            Property::sometimes(
                "a fetch shortened under it is followed by another (with late acknowledgements)",
                |m: &Delivery, s: &State| m.budget.late_acks == 0 || s.seen.shortened,
            ),
            Property::sometimes("an empty first fetch unmarks", |_: &Delivery, s: &State| {
                s.seen.unmarked
            }),
            Property::sometimes(
                "a message unacknowledged in one session is delivered in the next",
                |_: &Delivery, s: &State| s.seen.redelivered,
            ),
            Property::sometimes(
                "a first fetch outlives its session and unmarks",
                |_: &Delivery, s: &State| s.seen.orphan_unmarked,
            ),
        ]
    }
}

fn check(name: &str, budget: Budget) {
    crate::server::fleet::model::check(name, Delivery { budget });
}

#[test]
fn sessions_coming_and_going_see_every_message() {
    check(
        "sessions, notices, fetches",
        Budget {
            enqueues: 2,
            sessions: 3,
            losses: 0,
            restarts: 0,
            prunes: 0,
            late_acks: 0,
        },
    );
}

#[test]
fn a_lost_notification_connection_or_a_restart_forgets_no_message() {
    check(
        "lost notices, restarts",
        Budget {
            enqueues: 2,
            sessions: 2,
            losses: 1,
            restarts: 1,
            prunes: 0,
            late_acks: 0,
        },
    );
}

#[test]
fn the_sweep_pruning_marks_forgets_no_message() {
    check(
        "pruned marks",
        Budget {
            enqueues: 2,
            sessions: 2,
            losses: 0,
            restarts: 0,
            prunes: 2,
            late_acks: 0,
        },
    );
}

/// A fetch whose chosen rows are deleted under it (an older session's acknowledgement
/// committing late) comes back short: it is not taken for the end of the queue.
#[test]
fn a_fetch_shortened_by_a_late_acknowledgement_stops_nothing() {
    check(
        "late acknowledgements",
        Budget {
            enqueues: 3,
            sessions: 2,
            losses: 0,
            restarts: 0,
            prunes: 0,
            late_acks: 1,
        },
    );
}
