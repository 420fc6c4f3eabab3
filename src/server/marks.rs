//! Which identities may have queued messages: the registry's record, kept under its lock
//! with the sessions, so that a session reads its identity's queue at its start only
//! when there may be something in it (sans-IO; `delivery::model` checks it with the
//! session's `delivery::Cursor`).

use std::collections::{BTreeMap, HashSet};

use crate::proto::Id;

/// Which identities may have queued messages (sans-IO; the registry keeps one under its
/// lock, with the sessions): a session fetches from the queue at its start only if its
/// identity is marked, so that a handshake of a device with nothing queued costs no
/// read of the queue.
///
/// A message queued marks its identity (and tells its live session); a session takes
/// the mark its identity had when it was registered, and a first fetch that finds the
/// queue empty gives it back with [`Marks::empty`], which unmarks only if nothing marked
/// the identity since. Marks are numbered across all identities and never reused: a
/// mark given back late (by a first fetch that outlived its session) cannot match a
/// newer one of the same identity, even after it was unmarked in between (`delivery::model` found
/// that with a count per identity, which starts again at 1). Never a message left
/// unseen (`delivery::model` checks every interleaving): a superset of the identities with
/// messages.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Marks {
    marked: BTreeMap<Id, u64>,
    /// The number of the last mark set.
    last: u64,
}

impl Marks {
    /// A message was queued for `id` (or may have been).
    pub fn queued(&mut self, id: &Id) {
        self.last += 1;
        self.marked.insert(id.clone(), self.last);
    }

    /// `id`'s mark, if it is marked.
    pub fn get(&self, id: &Id) -> Option<u64> {
        self.marked.get(id).copied()
    }

    /// A session that took `mark` found `id`'s queue empty: unmarked, unless marked
    /// again since.
    pub fn empty(&mut self, id: &Id, mark: u64) {
        if self.get(id) == Some(mark) {
            self.marked.remove(id);
        }
    }

    /// The number of the last mark set (before a read of the identities with messages,
    /// for [`Marks::prune`]).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Unmarks the identities that are not in `queued` (the identities with messages, as
    /// read after mark `before` was the last), except those marked since.
    pub fn prune(&mut self, queued: &HashSet<Id>, before: u64) {
        self.marked
            .retain(|id, mark| *mark > before || queued.contains(id));
    }
}
