//! The fleet's log: every revocation, removal and fleet-wide setting, in order, as the
//! nodes of a fleet wrote them (PostgreSQL table `fleet_log`), each entry tagged under
//! the fleet key and chained to the one before (its tag covers the previous entry's
//! tag). The database holds it; only the nodes can write an entry that verifies, and a
//! node notices an entry deleted, changed, reordered or reused (docs/CLUSTER.md, "What
//! the database can and cannot do to the fleet").
//!
//! An entry `revoked`/`removed` of an identity ends *every* enrollment of it up to a
//! bound: the highest generation the writing node knew of (of any identity, generations
//! being unique and growing), and on each reader the generation it holds for that
//! identity, whatever the database says of its rows. A key row of an ended generation is
//! never used, restored or not. An entry `setting` sets a fleet-wide setting.
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
    /// The bound (revocations: generations up to it are ended) or the setting's value.
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
    /// Its enrollments (generations) up to this one are ended.
    pub upto: u64,
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
    /// Identity → its generations up to this one are ended.
    dead: HashMap<Box<str>, i64>,
    /// Setting → value, as the last entry setting it says.
    settings: HashMap<Box<str>, i64>,
    /// Revocations verified and not yet taken ([`LogState::take_revocations`]).
    unacted: Vec<Revocation>,
    /// The highest generation this node has verified (a sealed key row that opened, or
    /// its own enrollment): the bound of the revocations it writes.
    max_generation: i64,
    /// What is wrong with the log past `seen`, if anything: nothing past it is applied.
    broken: Option<String>,
    /// What this node recorded before (its state directory): entry `.0` has tag `.1`.
    anchor: Option<(u64, [u8; TAG_LEN])>,
    /// The log's entry at the anchor was not the one recorded.
    anchor_differs: bool,
}

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

    /// Applies `rows`, read after [`LogState::seen`] in order of `seq`: each that is the
    /// next one and verifies after the one before. Stops at the first that is not (a
    /// gap, a reused number, a tag that does not verify, an entry changed): nothing past
    /// it is applied, and the problem is returned once. `held(id)` is the generation
    /// the caller holds for an identity: a revocation ends it too.
    pub fn apply(
        &mut self,
        key: &FleetKey,
        rows: &[FleetLogRow],
        held: impl Fn(&str) -> Option<i64>,
    ) -> Option<Problem> {
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
            if let Some((seq, tag)) = self.anchor {
                if seq == next && tag != self.head {
                    self.anchor_differs = true;
                }
            }
            match row.kind.as_str() {
                kind::REVOKED | kind::REMOVED => {
                    let bound = row.value.max(held(&row.id).unwrap_or(0)).max(0);
                    let dead = self.dead.entry(row.id.as_str().into()).or_insert(0);
                    *dead = (*dead).max(bound);
                    self.unacted.push(Revocation {
                        id: row.id.clone(),
                        upto: bound as u64,
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

    /// Whether a verified revocation ended `id`'s enrollment `generation`.
    pub fn is_dead(&self, id: &str, generation: i64) -> bool {
        self.dead.get(id).is_some_and(|upto| generation <= *upto)
    }

    /// Whether any enrollment of `id` was revoked or removed.
    pub fn was_revoked(&self, id: &str) -> bool {
        self.dead.contains_key(id)
    }

    /// A setting, as the log last set it.
    pub fn setting(&self, name: &str) -> Option<i64> {
        self.settings.get(name).copied()
    }

    /// Notes a generation this node verified.
    pub fn saw_generation(&mut self, generation: i64) {
        self.max_generation = self.max_generation.max(generation);
    }

    /// The highest generation this node has verified.
    pub fn max_generation(&self) -> i64 {
        self.max_generation
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

    /// A log of `n` entries as a node of the fleet writes them.
    fn written(entries: &[(&str, i64, &str)]) -> Vec<FleetLogRow> {
        let k = key();
        let mut writer = LogState::default();
        let mut rows = Vec::new();
        for (id, value, kind) in entries {
            let row = writer.next_entry(&k, id, *value, kind, 1000);
            assert_eq!(writer.apply(&k, std::slice::from_ref(&row), |_| None), None);
            rows.push(row);
        }
        rows
    }

    #[test]
    fn a_revocation_ends_every_enrollment_up_to_its_bound_and_the_one_held() {
        let rows = written(&[("a", 10, kind::REVOKED), ("b", 10, kind::REMOVED)]);
        let mut s = LogState::default();
        // This node holds b's enrollment 12, which the writer did not know of.
        assert_eq!(s.apply(&key(), &rows, |id| (id == "b").then_some(12)), None);
        assert_eq!(s.seen().0, 2);
        assert!(s.is_dead("a", 10) && s.is_dead("a", 1) && !s.is_dead("a", 11));
        assert!(s.is_dead("b", 12) && !s.is_dead("b", 13));
        assert!(!s.is_dead("c", 1));
        let r = s.take_revocations();
        assert_eq!(
            r,
            vec![
                Revocation {
                    id: "a".into(),
                    upto: 10,
                    removed: false
                },
                Revocation {
                    id: "b".into(),
                    upto: 12,
                    removed: true
                },
            ]
        );
        assert!(s.take_revocations().is_empty());
    }

    #[test]
    fn a_deleted_reused_reordered_or_forged_entry_stops_the_log() {
        let rows = written(&[
            ("a", 1, kind::REVOKED),
            ("b", 2, kind::REVOKED),
            ("c", 3, kind::REVOKED),
        ]);
        // Deleted: entry 2 missing.
        let mut s = LogState::default();
        let p = s.apply(&key(), &[rows[0].clone(), rows[2].clone()], |_| None);
        assert!(p.unwrap().contains("entry 2 is missing"));
        assert_eq!(s.seen().0, 1);
        assert!(!s.is_dead("c", 3), "nothing past a gap is applied");
        // Reported once; nothing more applied after.
        assert_eq!(s.apply(&key(), &rows[1..], |_| None), None);
        assert_eq!(s.seen().0, 1);
        // Reused: entry 2 deleted and another written with its number by a node that
        // had not seen it cannot chain to entry 1's successor...
        let mut other = LogState::default();
        other.apply(&key(), &rows[..1], |_| None);
        let reused = other.next_entry(&key(), "x", 9, kind::SETTING, 1);
        let mut s = LogState::default();
        s.apply(&key(), &rows[..2], |_| None);
        // ...for a node that saw the original entry 2, the next one must be 3.
        let p = s
            .apply(&key(), std::slice::from_ref(&reused), |_| None)
            .unwrap();
        assert!(p.contains("entry 3 is missing"), "{p}");
        // Changed: a field altered, or a tag from elsewhere.
        let mut changed = rows[1].clone();
        changed.value = 99;
        let mut s = LogState::default();
        let p = s
            .apply(&key(), &[rows[0].clone(), changed], |_| None)
            .unwrap();
        assert!(p.contains("entry 2 does not verify"), "{p}");
        // Forged under another key.
        let forged = LogState::default().next_entry(
            &FleetKey::derive(&SecretKey::from_bytes([4; 32])),
            "a",
            1,
            kind::REVOKED,
            1,
        );
        let mut s = LogState::default();
        assert!(s.apply(&key(), &[forged], |_| None).is_some());
        assert_eq!(s.seen().0, 0);
    }

    #[test]
    fn the_recorded_anchor_must_be_in_the_log() {
        let rows = written(&[("a", 1, kind::REVOKED), ("b", 2, kind::REVOKED)]);
        let mut s = LogState::default();
        s.set_anchor(2, rows[1].tag_array());
        assert_eq!(s.anchor_holds(), None);
        s.apply(&key(), &rows, |_| None);
        assert_eq!(s.anchor_holds(), Some(true));
        // Another log with the same number of entries is not the one recorded.
        let others = written(&[("a", 1, kind::REVOKED), ("z", 5, kind::REMOVED)]);
        let mut s = LogState::default();
        s.set_anchor(2, rows[1].tag_array());
        s.apply(&key(), &others, |_| None);
        assert_eq!(s.anchor_holds(), Some(false));
        // A shorter log never reaches it.
        let mut s = LogState::default();
        s.set_anchor(2, rows[1].tag_array());
        s.apply(&key(), &rows[..1], |_| None);
        assert_eq!(s.anchor_holds(), None);
    }

    #[test]
    fn settings_take_the_last_value() {
        let rows = written(&[
            ("open_enrollment", 1, kind::SETTING),
            ("open_enrollment", 0, kind::SETTING),
        ]);
        let mut s = LogState::default();
        s.apply(&key(), &rows, |_| None);
        assert_eq!(s.setting("open_enrollment"), Some(0));
        assert_eq!(s.setting("other"), None);
        assert!(s.take_revocations().is_empty());
    }
}
