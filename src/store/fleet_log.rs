//! The fleet's log: every revocation, removal and fleet-wide setting, in order, as the
//! nodes of a fleet wrote them (PostgreSQL table `fleet_log`), each entry tagged under
//! the fleet key and chained to the one before (its tag covers the previous entry's
//! tag). The database holds it; only the nodes can write an entry that verifies, and a
//! node notices an entry deleted, changed, reordered or reused (docs/CLUSTER.md, "What
//! the database can and cannot do to the fleet").
//!
//! Every enrollment is sealed with the number of entries the log held when it was made
//! (its *position*: part of the sealed key's associated data, so no writer can change
//! it). An entry `revoked`/`removed` of an identity, number `s`, ends *every* enrollment
//! of it made before: every one of position below `s`, whatever the database says of its
//! rows, on every node and across restarts. An enrollment made after the entry (its node
//! read the log first) is not ended. An entry `setting` sets a fleet-wide setting.
//!
//! This module is the state and its rules, without a database: [`LogState::apply`] takes
//! the rows read after [`LogState::seen`], [`LogState::next_entry`] makes the entry to
//! append. The store reads and writes (`crate::store::Store`).

use std::collections::HashMap;

use super::fleet_key::{FleetKey, Statement, TAG_LEN};

/// Kinds of entries.
pub mod kind {
    /// An identity revoked: its enrollments up to the bound are ended.
    pub const REVOKED: &str = "revoked";
    /// An identity removed (it may be enrolled again): likewise.
    pub const REMOVED: &str = "removed";
    /// A fleet-wide setting (`id` names it, `value` is its value).
    pub const SETTING: &str = "setting";
}

/// Rows read from the database at a time.
pub const READ_BATCH: usize = 10_000;

/// An entry as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetLogRow {
    /// Its place: 1, 2, 3, ... without a gap.
    pub seq: i64,
    /// The identity (or the setting's name).
    pub id: String,
    /// The setting's value (0 for a revocation or removal).
    pub value: i64,
    /// [`kind`].
    pub kind: String,
    /// When (seconds since the Unix epoch).
    pub at: i64,
    /// The fleet key's tag over all of the above and the previous entry's tag.
    pub tag: Vec<u8>,
}

impl FleetLogRow {
    fn fields(&self, prev: &[u8; TAG_LEN]) -> [Vec<u8>; 6] {
        [
            self.seq.to_be_bytes().to_vec(),
            self.id.as_bytes().to_vec(),
            self.value.to_be_bytes().to_vec(),
            self.kind.as_bytes().to_vec(),
            self.at.to_be_bytes().to_vec(),
            prev.to_vec(),
        ]
    }

    /// Whether its tag is the fleet key's, after the entry whose tag is `prev`.
    pub fn verifies(&self, key: &FleetKey, prev: &[u8; TAG_LEN]) -> bool {
        let fields = self.fields(prev);
        let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
        key.verify(Statement::LogEntry, &fields, &self.tag)
    }

    fn tag_array(&self) -> [u8; TAG_LEN] {
        let mut t = [0u8; TAG_LEN];
        if self.tag.len() == TAG_LEN {
            t.copy_from_slice(&self.tag);
        }
        t
    }
}

/// A verified revocation or removal, for the fleet to close the sessions it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The identity.
    pub id: String,
    /// Its enrollments of a position below this (the entry's number) are ended.
    pub before: u64,
    /// Removed (else revoked).
    pub removed: bool,
}

/// What a node has verified of the log.
#[derive(Debug, Default)]
pub struct LogState {
    /// Entries verified, without a gap, each chained to the one before.
    seen: u64,
    /// The tag of entry `seen` (zeros before the first).
    head: [u8; TAG_LEN],
    /// Identity → its enrollments of a position below this are ended, and whether the
    /// last entry of it was a revocation (the id stays taken) or a removal (free).
    dead: HashMap<Box<str>, (u64, bool)>,
    /// Setting → value, as the last entry setting it says.
    settings: HashMap<Box<str>, i64>,
    /// Revocations verified and not yet taken ([`LogState::take_revocations`]).
    unacted: Vec<Revocation>,
    /// What is wrong with the log past `seen`, if anything: nothing past it is applied.
    broken: Option<String>,
    /// What this node recorded before (its state directory): entry `.0` has tag `.1`.
    anchor: Option<(u64, [u8; TAG_LEN])>,
    /// The log's entry at the anchor was not the one recorded.
    anchor_differs: bool,
    /// The tags of the last entries verified (an appender checks its own among them).
    recent: std::collections::VecDeque<(u64, [u8; TAG_LEN])>,
}

/// Entries whose tags [`LogState::tag_of`] remembers.
const RECENT: usize = 256;

/// What [`LogState::apply`] found wrong, newly.
pub type Problem = String;

impl LogState {
    /// Entries verified so far, and the last one's tag.
    pub fn seen(&self) -> (u64, [u8; TAG_LEN]) {
        (self.seen, self.head)
    }

    /// Sets what this node recorded before: the log must hold that very entry.
    pub fn set_anchor(&mut self, seq: u64, tag: [u8; TAG_LEN]) {
        self.anchor = (seq > 0).then_some((seq, tag));
        self.anchor_differs = false;
    }

    /// Whether the log, as verified so far, holds the recorded entry (`Some(false)`:
    /// it differs; `None`: not reached).
    pub fn anchor_holds(&self) -> Option<bool> {
        match self.anchor {
            None => Some(true),
            Some(_) if self.anchor_differs => Some(false),
            Some((seq, _)) if self.seen >= seq => Some(true),
            Some(_) => None,
        }
    }

    /// What is wrong with the log past what is verified, if anything.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Notes what is wrong with the log from here on (nothing more is applied, and no
    /// entry can be appended). Returns whether it is news.
    pub fn break_at(&mut self, problem: Problem) -> bool {
        let newly = self.broken.is_none();
        if newly {
            self.broken = Some(problem);
        }
        newly
    }

    /// Applies `rows`, read after [`LogState::seen`] in order of `seq`: each that is the
    /// next one and verifies after the one before. Stops at the first that is not (a
    /// gap, a reused number, a tag that does not verify, an entry changed): nothing past
    /// it is applied, and the problem is returned once.
    pub fn apply(&mut self, key: &FleetKey, rows: &[FleetLogRow]) -> Option<Problem> {
        for row in rows {
            if self.broken.is_some() {
                break;
            }
            let next = self.seen + 1;
            let problem = if row.seq < 1 || row.seq as u64 != next {
                Some(format!(
                    "entry {next} is missing (found {} after entry {}): deleted, or the log was rolled back",
                    row.seq, self.seen
                ))
            } else if !row.verifies(key, &self.head) {
                Some(format!(
                    "entry {next} does not verify under the fleet key after entry {}: forged, changed, or written in another's place",
                    self.seen
                ))
            } else {
                None
            };
            if let Some(p) = problem {
                self.broken = Some(p.clone());
                return Some(p);
            }
            self.seen = next;
            self.head = row.tag_array();
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back((next, self.head));
            if let Some((seq, tag)) = self.anchor {
                if seq == next && tag != self.head {
                    self.anchor_differs = true;
                }
            }
            match row.kind.as_str() {
                kind::REVOKED | kind::REMOVED => {
                    self.dead
                        .insert(row.id.as_str().into(), (next, row.kind == kind::REVOKED));
                    self.unacted.push(Revocation {
                        id: row.id.clone(),
                        before: next,
                        removed: row.kind == kind::REMOVED,
                    });
                }
                kind::SETTING => {
                    self.settings.insert(row.id.as_str().into(), row.value);
                }
                // A kind of a newer tallyd: verified, but not understood here.
                _ => {}
            }
        }
        None
    }

    /// The entry to append now: the next number, chained to the last verified.
    pub fn next_entry(
        &self,
        key: &FleetKey,
        id: &str,
        value: i64,
        kind: &str,
        at: i64,
    ) -> FleetLogRow {
        let mut row = FleetLogRow {
            seq: self.seen as i64 + 1,
            id: id.to_owned(),
            value,
            kind: kind.to_owned(),
            at,
            tag: Vec::new(),
        };
        let fields = row.fields(&self.head);
        let fields: Vec<&[u8]> = fields.iter().map(Vec::as_slice).collect();
        row.tag = key.tag(Statement::LogEntry, &fields).to_vec();
        row
    }

    /// The tag of verified entry `seq`, if it is one of the last few verified.
    pub fn tag_of(&self, seq: u64) -> Option<[u8; TAG_LEN]> {
        self.recent.iter().find(|(s, _)| *s == seq).map(|(_, t)| *t)
    }

    /// Whether a verified revocation ended `id`'s enrollment of position `pos`.
    pub fn is_dead(&self, id: &str, pos: i64) -> bool {
        self.dead
            .get(id)
            .is_some_and(|(before, _)| pos < 0 || (pos as u64) < *before)
    }

    /// Whether any enrollment of `id` was revoked or removed.
    pub fn was_revoked(&self, id: &str) -> bool {
        self.dead.contains_key(id)
    }

    /// Whether the last entry of `id` revoked it (it stays taken until removed).
    pub fn is_revoked_now(&self, id: &str) -> bool {
        self.dead.get(id).is_some_and(|(_, revoked)| *revoked)
    }

    /// A setting, as the log last set it.
    pub fn setting(&self, name: &str) -> Option<i64> {
        self.settings.get(name).copied()
    }

    /// The revocations verified and not yet taken.
    pub fn peek_revocations(&self) -> impl Iterator<Item = &Revocation> {
        self.unacted.iter()
    }

    /// The revocations verified since the last call.
    pub fn take_revocations(&mut self) -> Vec<Revocation> {
        std::mem::take(&mut self.unacted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::SecretKey;

    fn key() -> FleetKey {
        FleetKey::derive(&SecretKey::from_bytes([3; 32]))
    }

    /// A log as a node of the fleet writes it.
    fn written(entries: &[(&str, i64, &str)]) -> Vec<FleetLogRow> {
        let k = key();
        let mut writer = LogState::default();
        let mut rows = Vec::new();
        for (id, value, kind) in entries {
            let row = writer.next_entry(&k, id, *value, kind, 1000);
            assert_eq!(writer.apply(&k, std::slice::from_ref(&row)), None);
            rows.push(row);
        }
        rows
    }

    #[test]
    fn a_revocation_ends_every_enrollment_made_before_it() {
        let rows = written(&[
            ("open_enrollment", 1, kind::SETTING),
            ("a", 0, kind::REVOKED),
            ("b", 0, kind::REMOVED),
        ]);
        let mut s = LogState::default();
        assert_eq!(s.apply(&key(), &rows), None);
        assert_eq!(s.seen().0, 3);
        // a's entry is number 2: enrollments after 0 or 1 entries are ended, one made
        // after it (position 2) is not.
        assert!(s.is_dead("a", 0) && s.is_dead("a", 1) && !s.is_dead("a", 2));
        assert!(s.is_dead("b", 2) && !s.is_dead("b", 3));
        assert!(!s.is_dead("c", 0));
        // A position no enrollment has (a writer's negative number) is ended too.
        assert!(s.is_dead("a", -1));
        let r = s.take_revocations();
        assert_eq!(
            r,
            vec![
                Revocation {
                    id: "a".into(),
                    before: 2,
                    removed: false
                },
                Revocation {
                    id: "b".into(),
                    before: 3,
                    removed: true
                },
            ]
        );
        assert!(s.take_revocations().is_empty());
    }

    #[test]
    fn a_deleted_reused_reordered_or_forged_entry_stops_the_log() {
        let rows = written(&[
            ("a", 0, kind::REVOKED),
            ("b", 0, kind::REVOKED),
            ("c", 0, kind::REVOKED),
        ]);
        // Deleted: entry 2 missing.
        let mut s = LogState::default();
        let p = s.apply(&key(), &[rows[0].clone(), rows[2].clone()]);
        assert!(p.unwrap().contains("entry 2 is missing"));
        assert_eq!(s.seen().0, 1);
        assert!(!s.is_dead("c", 0), "nothing past a gap is applied");
        // Reported once; nothing more applied after.
        assert_eq!(s.apply(&key(), &rows[1..]), None);
        assert_eq!(s.seen().0, 1);
        // Reused: a node that had not seen entry 2 writes another in its place...
        let mut other = LogState::default();
        other.apply(&key(), &rows[..1]);
        let reused = other.next_entry(&key(), "x", 9, kind::SETTING, 1);
        let mut s = LogState::default();
        s.apply(&key(), &rows[..2]);
        // ...for a node that saw the original entry 2, the next one must be 3.
        let p = s.apply(&key(), std::slice::from_ref(&reused)).unwrap();
        assert!(p.contains("entry 3 is missing"), "{p}");
        // Changed: a field altered.
        let mut changed = rows[1].clone();
        changed.id = "z".into();
        let mut s = LogState::default();
        let p = s.apply(&key(), &[rows[0].clone(), changed]).unwrap();
        assert!(p.contains("entry 2 does not verify"), "{p}");
        // Forged under another key.
        let forged = LogState::default().next_entry(
            &FleetKey::derive(&SecretKey::from_bytes([4; 32])),
            "a",
            0,
            kind::REVOKED,
            1,
        );
        let mut s = LogState::default();
        assert!(s.apply(&key(), &[forged]).is_some());
        assert_eq!(s.seen().0, 0);
        // Broken from outside (the last verified entry gone): nothing more applied.
        let mut s = LogState::default();
        s.apply(&key(), &rows[..1]);
        assert!(s.break_at("gone".into()));
        assert!(!s.break_at("again".into()));
        assert_eq!(s.apply(&key(), &rows[1..]), None);
        assert_eq!(s.seen().0, 1);
        assert_eq!(s.broken(), Some("gone"));
    }

    #[test]
    fn the_recorded_anchor_must_be_in_the_log() {
        let rows = written(&[("a", 0, kind::REVOKED), ("b", 0, kind::REVOKED)]);
        let mut s = LogState::default();
        s.set_anchor(2, rows[1].tag_array());
        assert_eq!(s.anchor_holds(), None);
        s.apply(&key(), &rows);
        assert_eq!(s.anchor_holds(), Some(true));
        // Another log with the same number of entries is not the one recorded.
        let others = written(&[("a", 0, kind::REVOKED), ("z", 0, kind::REMOVED)]);
        let mut s = LogState::default();
        s.set_anchor(2, rows[1].tag_array());
        s.apply(&key(), &others);
        assert_eq!(s.anchor_holds(), Some(false));
        // A shorter log never reaches it.
        let mut s = LogState::default();
        s.set_anchor(2, rows[1].tag_array());
        s.apply(&key(), &rows[..1]);
        assert_eq!(s.anchor_holds(), None);
    }

    #[test]
    fn settings_take_the_last_value() {
        let rows = written(&[
            ("open_enrollment", 1, kind::SETTING),
            ("open_enrollment", 0, kind::SETTING),
        ]);
        let mut s = LogState::default();
        s.apply(&key(), &rows);
        assert_eq!(s.setting("open_enrollment"), Some(0));
        assert_eq!(s.setting("other"), None);
        assert!(s.take_revocations().is_empty());
    }
}
