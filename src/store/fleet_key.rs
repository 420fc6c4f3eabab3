//! What the nodes of a fleet tell each other through PostgreSQL, authenticated.
//!
//! The database is storage and transport, never an authority (docs/CLUSTER.md, "What
//! the database can and cannot do to the fleet"): whatever makes a node act on a device
//! — a revocation, a takeover that closes a session, a send, the answer to a send — is
//! tagged with HMAC-SHA256 under the *fleet key*, derived from `store.key`, which every
//! node holds and the database never sees. A node acts on nothing it cannot verify.
//!
//! A tag covers a label naming what it is (so that no tag can be moved from one kind of
//! statement to another) and every field of the statement, each length-prefixed:
//! `HMAC(fleet key, label ‖ 0x00 ‖ u32 len(f1) ‖ f1 ‖ u32 len(f2) ‖ f2 ‖ ...)`.

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::proto::SecretKey;

/// What a tag is for: each kind of statement has its own label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Statement {
    /// An entry of the fleet's log (revocations, removals, fleet-wide settings): `seq, id,
    /// generation (or value), kind, at`.
    LogEntry,
    /// A takeover across nodes (`tally_close`): `id, old node, old epoch, new node,
    /// new epoch`.
    Takeover,
    /// A send to a device on another node: `call, origin, node, id, epoch, request,
    /// timeout, stamp, payload`.
    Send,
    /// The outcome of a send, written back by the node holding the session: `call,
    /// origin, node, id, epoch, outcome`.
    Answer,
    /// A node's acknowledgement of the fleet's log: `node, entries verified, last tag`.
    LogAck,
    /// A message in the durable queue (spec 8.8): `generation, msg_id, id, kind,
    /// payload, expires, origin, node`.
    Queued,
    /// The outcome of a queued message, for the node that queued it: `node, id,
    /// generation, msg_id, origin, code, status, payload`.
    Outcome,
}

impl Statement {
    fn label(self) -> &'static [u8] {
        match self {
            Statement::LogEntry => b"tally fleet v1 log entry",
            Statement::Takeover => b"tally fleet v1 takeover",
            Statement::Send => b"tally fleet v1 send",
            Statement::Answer => b"tally fleet v1 answer",
            Statement::LogAck => b"tally fleet v1 log acknowledgement",
            Statement::Queued => b"tally fleet v1 queued message",
            Statement::Outcome => b"tally fleet v1 queued outcome",
        }
    }
}

/// Length of a tag.
pub const TAG_LEN: usize = 32;

/// The fleet key: `HKDF-SHA256(ikm = store key, info = "tally fleet v1 key")`.
#[derive(Clone)]
pub struct FleetKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for FleetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetKey(..)")
    }
}

type HmacSha256 = hmac::Hmac<Sha256>;

impl FleetKey {
    /// Derives the fleet key from the store key.
    pub fn derive(store_key: &SecretKey) -> FleetKey {
        let mut key = Zeroizing::new([0u8; 32]);
        hkdf::Hkdf::<Sha256>::new(None, store_key.expose())
            .expand(b"tally fleet v1 key", key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        FleetKey(key)
    }

    fn mac(&self, what: Statement, fields: &[&[u8]]) -> HmacSha256 {
        let mut mac =
            <HmacSha256 as KeyInit>::new_from_slice(&self.0[..]).expect("HMAC takes any key");
        mac.update(what.label());
        mac.update(&[0]);
        for f in fields {
            mac.update(&(f.len() as u32).to_be_bytes());
            mac.update(f);
        }
        mac
    }

    /// The tag of a statement.
    pub fn tag(&self, what: Statement, fields: &[&[u8]]) -> [u8; TAG_LEN] {
        self.mac(what, fields).finalize().into_bytes().into()
    }

    /// Whether `tag` is the statement's tag (compared in constant time).
    pub fn verify(&self, what: Statement, fields: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(what, fields).verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> FleetKey {
        FleetKey::derive(&SecretKey::from_bytes([b; 32]))
    }

    #[test]
    fn a_tag_verifies_only_for_its_key_label_and_fields() {
        let k = key(1);
        let tag = k.tag(Statement::Send, &[b"ab", b"c"]);
        assert!(k.verify(Statement::Send, &[b"ab", b"c"], &tag));
        // Another key, another kind of statement, other fields, fields moved across
        // their boundary, a truncated tag: none verifies.
        assert!(!key(2).verify(Statement::Send, &[b"ab", b"c"], &tag));
        assert!(!k.verify(Statement::Answer, &[b"ab", b"c"], &tag));
        assert!(!k.verify(Statement::Send, &[b"ab", b"d"], &tag));
        assert!(!k.verify(Statement::Send, &[b"a", b"bc"], &tag));
        assert!(!k.verify(Statement::Send, &[b"ab", b"c"], &tag[..16]));
    }

    #[test]
    fn the_fleet_key_is_not_the_store_key() {
        let store = SecretKey::from_bytes([7; 32]);
        assert_ne!(&key(7).0[..], &store.expose()[..]);
        assert_eq!(format!("{:?}", key(7)), "FleetKey(..)");
    }
}
