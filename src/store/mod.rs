//! The identity store: identities, their keys, enrollment tokens and the open key.
//!
//! It holds every secret the server keeps besides its two key files: identity keys, the
//! outstanding per-identity enrollment tokens and the open enrollment key. Each is sealed
//! with XChaCha20-Poly1305 under the *store key* (kept outside the database, spec 13.9),
//! with a fresh random nonce per row and the row's identity (id, generation or expiry) as
//! associated data: a copy of the database alone reveals no secret, a sealed value cannot
//! be moved to another row, and two enrollments of one id share nothing.
//!
//! Every enrollment gets a *generation*, a number never used before in this database:
//! it names one key of one id, so a session can be tied to the key it was made with
//! (spec 7.3, removal during a handshake).
//!
//! Two databases hold it, behind one interface ([`Engine`]): SQLite, the embedded
//! default (one daemon, one file in its state directory, [`sqlite`]), and PostgreSQL, the
//! shared store of several daemons serving one fleet (`store = "postgres://..."`,
//! [`postgres`], docs/CLUSTER.md). Above the engine, and the same for both, [`Store`]
//! seals and unseals, and keeps the in-memory index of sealed keys that handshakes read.
//!
//! Every method blocks; async callers run them on `spawn_blocking`, except
//! [`Store::cached_key`] once [`Store::load_key_index`] has run (the daemon's handshake
//! path).

pub mod fleet_key;
pub mod fleet_log;
pub mod pgconf;
pub mod postgres;
pub mod queue;
pub mod sqlite;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use zeroize::Zeroizing;

use crate::proto::frame::{EnrollMode, Id};
use crate::proto::schedule::scrubbed;
use crate::proto::SecretKey;

/// File name of the SQLite database in the state directory.
pub const DB_FILE: &str = "identities.db";

/// The schema version this build writes (SQLite's `user_version`, PostgreSQL's
/// `tally_schema` table).
pub const SCHEMA_VERSION: u32 = 2;

/// Length of a sealed 32-byte secret: 24-byte nonce, 32-byte ciphertext, 16-byte tag.
pub const SEALED_LEN: usize = 24 + 32 + 16;

/// Associated-data labels of the sealed values, one per kind of row.
mod ad {
    pub const IDENTITY: &[u8] = b"tally store identity key";
    pub const TOKEN: &[u8] = b"tally store enrollment token";
    pub const OPEN: &[u8] = b"tally store open enrollment key";
    pub const DECOY: &[u8] = b"tally store decoy";
}

/// A store operation that failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The identity is already enrolled.
    #[error("identity {0} is already enrolled")]
    Taken(Id),
    /// No such identity.
    #[error("no identity {0}")]
    NotFound(String),
    /// The token that authorised an enrollment was revoked, replaced, consumed or
    /// expired while the enrollment ran.
    #[error("the enrollment token of {0} was revoked, replaced, used or expired meanwhile")]
    TokenGone(Id),
    /// The database was made by a tallyd older than schema versioning.
    #[error("{0}: this identity database predates schema versioning (a development build of tallyd); it cannot be used. Move it aside and enroll the devices again")]
    Unversioned(PathBuf),
    /// The database was made by a newer tallyd.
    #[error("{place}: schema version {found} is newer than this tallyd understands (up to {SCHEMA_VERSION}); run the newer tallyd, or restore a backup")]
    TooNew {
        /// The database (a file, or a PostgreSQL address without its password).
        place: String,
        /// Its schema version.
        found: u32,
    },
    /// The store key does not open the database's sealed values.
    #[error("the store key does not open this identity database: store.key was replaced, or belongs to another state directory (every daemon of a fleet needs the same store.key)")]
    WrongStoreKey,
    /// A sealed value is damaged.
    #[error("identity store: damaged sealed value ({0})")]
    Corrupt(&'static str),
    /// SQLite failed.
    #[error("identity store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed, or could not be reached.
    #[error("identity store (PostgreSQL {place}): {message}")]
    Postgres {
        /// The server, without its password.
        place: String,
        /// What failed.
        message: String,
    },
    /// The fleet's log is not the one a node verified before: rolled back or changed.
    #[error("the fleet's log (its revocations and settings) is not what this node verified before (recorded in {file}: {seen} entries): {why}. Entries were deleted or changed, or the database was restored from an older backup, so an identity revoked since could be served again. Restore the lost entries (a newer backup); or, if the restore was deliberate and every identity revoked since that backup has been revoked again (and the fleet's settings set again), delete {file} on every node to accept the database as it is")]
    RevocationsRolledBack {
        /// The node's record.
        file: String,
        /// How many entries it had verified.
        seen: u64,
        /// What is wrong.
        why: String,
    },
    /// The fleet's log does not verify past some entry: nothing can be appended.
    #[error("the fleet's log is damaged ({0}): no revocation, removal or fleet setting can be made until it is repaired. Compare the table fleet_log with a backup; or delete its entries from the damaged one on, then revoke (or set) again what they held: each node's journal has a line per entry it verified ('the fleet's log says ...'), and every node must then have its fleet-log file deleted (docs/CLUSTER.md)")]
    FleetLogDamaged(String),
    /// An entry was appended to the fleet's log while this node enrolled (read it, and
    /// enroll again).
    #[error("the fleet's log changed while this node enrolled: try again")]
    FleetLogMoved,
    /// Other nodes kept appending to the fleet's log.
    #[error("the fleet's log kept changing while this node appended to it: try again")]
    FleetLogBusy,
    /// A fleet-wide setting asked of a daemon that is not one of a fleet.
    #[error("{0} is a setting of a fleet (a PostgreSQL store); this daemon's own is in its configuration file")]
    NotFleet(String),
    /// A file of the state directory could not be read or written.
    #[error("{file}: {message}")]
    LocalFile {
        /// The file.
        file: String,
        /// What failed.
        message: String,
    },
    /// The `store` setting is not a database this build knows.
    #[error("store = {0:?}: not a PostgreSQL URL (postgres://user@host/database); leave `store` out for the embedded SQLite database in the state directory")]
    BadLocation(String),
}

/// Where the identities are kept.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// An SQLite file (the embedded default: `identities.db` in the state directory).
    Sqlite(PathBuf),
    /// A PostgreSQL database, shared by the daemons of a fleet (a `postgres://` URL or a
    /// libpq `key=value` string).
    Postgres(String),
}

impl Location {
    /// The `store` setting of the configuration: `None` is SQLite in `state_dir`.
    pub fn from_setting(setting: Option<&str>, state_dir: &Path) -> Result<Self, StoreError> {
        match setting {
            None => Ok(Location::Sqlite(state_dir.join(DB_FILE))),
            Some(s) if s.starts_with("postgres://") || s.starts_with("postgresql://") => {
                pgconf::Settings::parse(s).map_err(|e| StoreError::Postgres {
                    place: redacted(s),
                    message: e.to_string(),
                })?;
                Ok(Location::Postgres(s.to_owned()))
            }
            Some(s) => Err(StoreError::BadLocation(redacted(s))),
        }
    }

    /// Whether several daemons can share it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Location::Postgres(_))
    }
}

/// A connection string without its password, for messages and logs: rebuilt from
/// what the driver parses (user, hosts and ports, database), nothing else of it, so that
/// no form of password (`user:pw@`, `?password=`, `password=` in key=value form) and no
/// other parameter gets through. The TLS parameters the driver does not know
/// (`sslmode=verify-full`, `sslrootcert`...) are set aside first ([`pgconf`]).
pub fn redacted(url: &str) -> String {
    let Ok(c) = pgconf::without_tls_params(url).parse::<tokio_postgres::Config>() else {
        return match url.split_once("://") {
            Some((scheme, _)) if scheme.chars().all(|c| c.is_ascii_alphanumeric()) => {
                format!("{scheme}://(not shown)")
            }
            _ => "(a connection string that does not parse)".to_owned(),
        };
    };
    let mut out = String::from("postgres://");
    if let Some(user) = c.get_user() {
        out.push_str(user);
        out.push('@');
    }
    let ports = c.get_ports();
    for (i, host) in c.get_hosts().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match host {
            tokio_postgres::config::Host::Tcp(name) => out.push_str(name),
            tokio_postgres::config::Host::Unix(path) => out.push_str(&path.display().to_string()),
        }
        // One port for every host, or one each.
        if let Some(port) = ports.get(i).or(ports.first().filter(|_| ports.len() == 1)) {
            out.push_str(&format!(":{port}"));
        }
    }
    if let Some(db) = c.get_dbname() {
        out.push('/');
        out.push_str(db);
    }
    out
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&redacted(url)),
        }
    }
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Location({self})")
    }
}

/// One identity, as listed for the operator (no key).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdentityRow {
    /// The identity.
    pub id: String,
    /// Its enrollment generation.
    pub generation: u64,
    /// Enrollment time (seconds since the Unix epoch).
    pub created: i64,
    /// Last successful session handshake, if any.
    pub last_seen: Option<i64>,
    /// Revocation time, if revoked.
    pub revoked: Option<i64>,
    /// `open` or `token`.
    pub mode: String,
    /// Messages queued for it (spec 8.8).
    #[serde(default)]
    pub queued: u64,
}

/// An outstanding per-identity enrollment token, as listed for the operator (no secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenRow {
    /// The identity it may enroll.
    pub id: String,
    /// When it was issued (seconds since the Unix epoch).
    pub issued: i64,
    /// When it stops working.
    pub expires: i64,
}

/// Why the server holds no usable credential for an ENROLL_INIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoCredential {
    /// No token was issued for the id (or it was consumed, revoked or replaced).
    NoToken,
    /// The id's token expired.
    Expired,
}

/// What the server needs to answer an ENROLL_INIT.
#[derive(Debug)]
pub struct EnrollLookup {
    /// The credential `c` for the mode and id, or why there is none.
    pub credential: Result<SecretKey, NoCredential>,
    /// The id is enrolled already (revoked or not).
    pub enrolled: bool,
    /// In token mode, the sealed token row: the enrollment consumes exactly this token.
    pub token_ref: Option<Vec<u8>>,
}

/// The key of a usable identity, and the generation it belongs to.
#[derive(Debug)]
pub struct IdentityKey {
    /// The identity key `k`.
    pub key: SecretKey,
    /// Its enrollment generation.
    pub generation: u64,
    /// In a fleet, the entries of the fleet's log before its enrollment (a revocation
    /// written later ends it); 0 otherwise.
    pub log_pos: u64,
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The associated data of an identity's sealed key: its id and generation and, in a
/// fleet, the number of entries of the fleet's log its enrollment was made after (when
/// not 0): a revocation written later ends it, and no writer can change that number.
fn identity_ad(id: &str, generation: i64, pos: i64) -> Vec<u8> {
    let mut a = assoc(ad::IDENTITY, id, generation);
    if pos != 0 {
        a.extend_from_slice(&pos.to_be_bytes());
    }
    a
}

/// A sealed key as the database holds it: the sealed value, after the log position
/// (8 bytes) when not 0.
fn stored_key(pos: i64, sealed: Vec<u8>) -> Vec<u8> {
    if pos == 0 {
        return sealed;
    }
    let mut out = Vec::with_capacity(8 + sealed.len());
    out.extend_from_slice(&pos.to_be_bytes());
    out.extend_from_slice(&sealed);
    out
}

/// [`stored_key`] read back: the log position and the sealed value.
fn split_key(stored: &[u8]) -> Result<(i64, &[u8]), StoreError> {
    match stored.len() {
        SEALED_LEN => Ok((0, stored)),
        n if n == 8 + SEALED_LEN => {
            let pos = i64::from_be_bytes(stored[..8].try_into().expect("8 bytes"));
            Ok((pos, &stored[8..]))
        }
        _ => Err(StoreError::Corrupt("a sealed key has the wrong length")),
    }
}

/// Associated data: `label ‖ u8 len(id) ‖ id ‖ u64 n`.
fn assoc(label: &[u8], id: &str, n: i64) -> Vec<u8> {
    let mut a = Vec::with_capacity(label.len() + 1 + id.len() + 8);
    a.extend_from_slice(label);
    a.push(id.len() as u8);
    a.extend_from_slice(id.as_bytes());
    a.extend_from_slice(&n.to_be_bytes());
    a
}

/// XChaCha20-Poly1305 under the store key, with a random nonce per sealed value.
struct Sealer(XChaCha20Poly1305);

impl Sealer {
    fn new(store_key: &SecretKey) -> Self {
        Sealer(XChaCha20Poly1305::new(store_key.expose().into()))
    }

    fn seal(&self, ad: &[u8], secret: &[u8; 32]) -> Vec<u8> {
        let mut nonce = [0u8; 24];
        getrandom::getrandom(&mut nonce).expect("the operating system's random source failed");
        // Scrubbed: the cipher's keystream and the plaintext's copy stay on the stack.
        scrubbed(|| {
            let mut buf = Zeroizing::new(*secret);
            let tag = self
                .0
                .encrypt_inout_detached(&XNonce::from(nonce), ad, (&mut buf[..]).into())
                .expect("32 bytes is within the AEAD's limits");
            let mut out = Vec::with_capacity(SEALED_LEN);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&buf[..]);
            out.extend_from_slice(&tag);
            out
        })
    }

    fn open(&self, ad: &[u8], sealed: &[u8]) -> Result<SecretKey, StoreError> {
        if sealed.len() != SEALED_LEN {
            return Err(StoreError::Corrupt("wrong length"));
        }
        let nonce = XNonce::try_from(&sealed[..24]).expect("24 bytes");
        let tag = chacha20poly1305::Tag::try_from(&sealed[56..]).expect("16 bytes");
        // Decrypted in place, in the key's own heap buffer; the keystream is scrubbed.
        scrubbed(|| {
            SecretKey::fill(|key| {
                key.copy_from_slice(&sealed[24..56]);
                self.0
                    .decrypt_inout_detached(&nonce, ad, (&mut key[..]).into(), &tag)
                    .map_err(|_| StoreError::WrongStoreKey)
            })
        })
    }
}

/// A sealed value as a database holds it, with what its associated data names (the
/// token's expiry, the open key's update time).
pub type SealedRow = (Vec<u8>, i64);

/// An identity's sealed key row: id, generation, sealed key.
pub type KeyRow = (String, i64, Vec<u8>);

pub use fleet_log::{FleetLogRow, Revocation};

/// What an append to the fleet's log found ([`Engine::revoke_logged`] and its kin).
#[derive(Debug)]
pub enum Logged<T> {
    /// Appended, in the same transaction as the change it records.
    Appended(T),
    /// The log holds entries this node has not verified yet: nothing was changed; read
    /// them, and try again.
    Moved,
}

/// What a database does for the [`Store`]: rows in, rows out, each method one
/// transaction. The engine never sees a plaintext secret: sealing and unsealing happen
/// above it, the same for every engine.
pub trait Engine: Send + Sync {
    /// Creates the decoy (`decoy()`) and the open key (`open(at)`, sealed for its update
    /// time `at`) if missing, in one transaction; returns both as stored.
    fn init(
        &self,
        decoy: &dyn Fn() -> Vec<u8>,
        open: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<(Vec<u8>, SealedRow), StoreError>;
    /// The sealed open key and its update time.
    fn open_key(&self) -> Result<Option<SealedRow>, StoreError>;
    /// Replaces the open key.
    fn put_open_key(&self, sealed: &[u8], updated: i64) -> Result<(), StoreError>;
    /// Stores a token for `id`, replacing any; [`StoreError::Taken`] if `id` is enrolled.
    fn issue_token(
        &self,
        id: &Id,
        sealed: &[u8],
        issued: i64,
        expires: i64,
    ) -> Result<(), StoreError>;
    /// Deletes `id`'s token; whether there was one.
    fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;
    /// Every outstanding token, ordered by id.
    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError>;
    /// Whether `id` is enrolled (revoked or not), and its sealed token and expiry.
    fn enroll_lookup(&self, id: &str) -> Result<(bool, Option<SealedRow>), StoreError>;
    /// Stores a new identity with a fresh generation `g` and the key `seal(g)`, in one
    /// transaction that fails with [`StoreError::Taken`] if `id` exists and, given a
    /// token, consumes it (which must be outstanding and unexpired at `at`, else
    /// [`StoreError::TokenGone`]); else deletes any token of `id`. Durable on return.
    /// Returns the generation and the sealed key.
    fn insert(
        &self,
        id: &Id,
        mode: EnrollMode,
        token: Option<&[u8]>,
        at: i64,
        seal: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<(i64, Vec<u8>), StoreError>;
    /// The generation and sealed key of a usable (enrolled, not revoked) identity.
    fn key(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError>;
    /// Every usable identity's key row.
    fn keys(&self) -> Result<Vec<KeyRow>, StoreError>;
    /// Records last handshakes (bookkeeping: may be lost in a crash).
    fn touch_many(&self, seen: &[(Id, i64)]) -> Result<(), StoreError>;
    /// Revokes `id` at `at` and erases its key: `Some(false)` if it was revoked already,
    /// `None` if there is no such identity.
    fn revoke(&self, id: &str, at: i64) -> Result<Option<bool>, StoreError>;
    /// Deletes `id`; whether there was one.
    fn remove(&self, id: &str) -> Result<bool, StoreError>;
    /// Every identity, ordered by id.
    fn list(&self) -> Result<Vec<IdentityRow>, StoreError>;
    /// Number of identities.
    fn count(&self) -> Result<u64, StoreError>;
    /// After a secret was erased: make sure no copy of it lingers (SQLite's WAL).
    fn scrub(&self) {}
    /// The PostgreSQL engine, for the fleet's coordination (`crate::server::fleet`).
    /// Whether this engine keeps a fleet's log (PostgreSQL). An engine of one daemon
    /// does not: its daemon is the only writer of its database.
    fn has_fleet_log(&self) -> bool {
        false
    }

    /// At most `limit` entries of the fleet's log after `after`, in order.
    fn fleet_log(&self, _after: u64, _limit: usize) -> Result<Vec<FleetLogRow>, StoreError> {
        Ok(Vec::new())
    }

    /// [`Engine::revoke`], appending `entry` to the fleet's log in the same transaction,
    /// if the log's last entry is the one before it (else [`Logged::Moved`], or an error
    /// if the log holds fewer entries than that: rolled back). Returns whether the
    /// identity's row existed and was not marked revoked.
    fn revoke_logged(
        &self,
        id: &str,
        _at: i64,
        _entry: &FleetLogRow,
    ) -> Result<Logged<Option<bool>>, StoreError> {
        Err(StoreError::NotFleet(id.to_owned()))
    }

    /// [`Engine::remove`], appending `entry` as [`Engine::revoke_logged`] does.
    fn remove_logged(&self, id: &str, _entry: &FleetLogRow) -> Result<Logged<bool>, StoreError> {
        Err(StoreError::NotFleet(id.to_owned()))
    }

    /// Appends `entry` (a setting) as [`Engine::revoke_logged`] does.
    fn append_log(&self, entry: &FleetLogRow) -> Result<Logged<()>, StoreError> {
        Err(StoreError::NotFleet(entry.id.clone()))
    }
}

/// The identity store.
pub struct Store {
    engine: Box<dyn Engine>,
    sealer: Sealer,
    /// The sealed keys in memory, once [`Store::load_key_index`] ran.
    index: OnceLock<KeyIndex>,
    /// Held by this process's changes to the identities from their commit to the update
    /// of the index, and by refreshes of the index from the database (other daemons'
    /// changes, announced by PostgreSQL): the index never applies an older state of an
    /// identity after a newer one.
    changes: Mutex<()>,
    /// What an unknown or revoked id's lookup unseals (spec 7.5).
    decoy: [u8; SEALED_LEN],
    /// Authenticates what the nodes of a fleet write for each other.
    fleet_key: fleet_key::FleetKey,
    /// What this node verified of the fleet's log: a key row of an ended enrollment is
    /// never used, even if a database writer restores it (docs/CLUSTER.md).
    log: Mutex<fleet_log::LogState>,
    /// Held while the log is read and applied: one reader at a time.
    log_reading: Mutex<()>,
}

/// The sealed key of every usable identity, and the decoy's, held in memory so that a
/// handshake's key lookup is a map lookup and one unseal on the caller's thread: no
/// database, no hop to a blocking pool, whatever a flood of HELLOs asks for (issue 11).
///
/// The keys stay sealed here as in the database (spec 13.9): a plaintext identity key
/// exists only while a handshake (or the check at load) unseals it. Every change this
/// process makes to the identities updates the index after its commit. With SQLite the
/// daemon is the only writer while it runs: it holds the state directory's lock, and
/// admin commands go through its control socket or, if it does not answer there, change
/// nothing ([`crate::secrets::lock_state_dir`]). With PostgreSQL the other daemons of the
/// fleet write too, and announce each change ([`Store::refresh`]).
struct KeyIndex {
    keys: RwLock<SealedKeys>,
}

/// Id → (generation, log position of its enrollment, sealed key).
type SealedKeys = HashMap<Box<str>, (i64, i64, [u8; SEALED_LEN])>;

impl KeyIndex {
    fn keys(&self) -> std::sync::RwLockWriteGuard<'_, SealedKeys> {
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn sealed_array(sealed: &[u8]) -> Result<[u8; SEALED_LEN], StoreError> {
    sealed
        .try_into()
        .map_err(|_| StoreError::Corrupt("a sealed key has the wrong length"))
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(..)")
    }
}

impl Store {
    /// Opens (and creates, or migrates, if needed) the SQLite database at `path`.
    pub fn open(path: &Path, store_key: SecretKey) -> Result<Store, StoreError> {
        Store::with_engine(Box::new(sqlite::Sqlite::open(path)?), store_key)
    }

    /// Opens the store at `location` (creating or migrating its schema if needed); a
    /// PostgreSQL store's password may come from `passwords` (or the environment, as
    /// libpq: [`pgconf`]).
    pub fn open_at(
        location: &Location,
        store_key: SecretKey,
        passwords: pgconf::PasswordSources<'_>,
    ) -> Result<Store, StoreError> {
        Store::open_shared(location, store_key, passwords).map(|(store, _)| store)
    }

    /// [`Store::open_at`], with a handle on the database if it is shared (PostgreSQL):
    /// what a daemon of a fleet runs the fleet's own statements on
    /// (`server::fleet::db`).
    pub fn open_shared(
        location: &Location,
        store_key: SecretKey,
        passwords: pgconf::PasswordSources<'_>,
    ) -> Result<(Store, Option<postgres::Postgres>), StoreError> {
        match location {
            Location::Sqlite(path) => Ok((Store::open(path, store_key)?, None)),
            Location::Postgres(url) => {
                let pg = postgres::Postgres::connect(url, passwords)?;
                let store = Store::with_engine(Box::new(pg.clone()), store_key)?;
                Ok((store, Some(pg)))
            }
        }
    }

    /// A store on `engine`: creates the decoy and the open key on first open, and
    /// checks that the store key opens them afterwards.
    pub fn with_engine(engine: Box<dyn Engine>, store_key: SecretKey) -> Result<Store, StoreError> {
        let sealer = Sealer::new(&store_key);
        let (decoy, (open, updated)) = engine.init(
            &|| sealer.seal(&assoc(ad::DECOY, "", 0), &crate::secrets::random_bytes()),
            &|at| sealer.seal(&assoc(ad::OPEN, "", at), &crate::secrets::random_bytes()),
        )?;
        sealer.open(&assoc(ad::DECOY, "", 0), &decoy)?;
        sealer.open(&assoc(ad::OPEN, "", updated), &open)?;
        Ok(Store {
            engine,
            sealer,
            index: OnceLock::new(),
            changes: Mutex::new(()),
            decoy: sealed_array(&decoy)?,
            fleet_key: fleet_key::FleetKey::derive(&store_key),
            log: Mutex::default(),
            log_reading: Mutex::new(()),
        })
    }

    /// The fleet key (derived from the store key).
    pub fn fleet_key(&self) -> &fleet_key::FleetKey {
        &self.fleet_key
    }

    fn log(&self) -> std::sync::MutexGuard<'_, fleet_log::LogState> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a verified revocation ended `id`'s enrollment made after `pos` entries
    /// of the fleet's log.
    fn is_revoked(&self, id: &str, pos: i64) -> bool {
        self.log().is_dead(id, pos)
    }

    /// Whether a verified revocation or removal of `id` (of any of its enrollments) is
    /// known.
    pub fn was_revoked(&self, id: &str) -> bool {
        self.log().was_revoked(id)
    }

    /// How much of the fleet's log is verified: its entries, and the last one's tag.
    pub fn fleet_log_seen(&self) -> (u64, [u8; fleet_key::TAG_LEN]) {
        self.log().seen()
    }

    /// What this node recorded of the log before (its state directory): the log must
    /// hold that very entry ([`Store::fleet_log_check`], after the index is loaded).
    pub fn set_fleet_log_anchor(&self, seq: u64, tag: [u8; fleet_key::TAG_LEN]) {
        self.log().set_anchor(seq, tag);
    }

    /// Whether the fleet's log holds what this node recorded before, and verifies
    /// without a break: `Err` says what is wrong.
    pub fn fleet_log_check(&self) -> Result<(), String> {
        let log = self.log();
        if let Some(b) = log.broken() {
            return Err(b.to_owned());
        }
        match log.anchor_holds() {
            Some(true) => Ok(()),
            Some(false) => Err("its entries differ from those this node verified".into()),
            None => Err(format!(
                "it holds {} verified entries, fewer than this node verified",
                log.seen().0
            )),
        }
    }

    /// Reads the entries of the fleet's log not yet verified and applies those that
    /// verify, in order, up to the first that does not (logged once; nothing past it is
    /// applied): from then on a key row of an enrollment a revocation ended is never
    /// used, whatever the database says of it; the revocations wait for
    /// [`Store::take_revocations`], and leave the key index.
    pub fn sync_revocations(&self) -> Result<(), StoreError> {
        let changes = self.changes();
        self.sync_locked()?;
        drop(changes);
        Ok(())
    }

    /// [`Store::sync_revocations`], with `changes` held.
    fn sync_locked(&self) -> Result<(), StoreError> {
        if !self.engine.has_fleet_log() {
            return Ok(());
        }
        let _reading = self.log_reading.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let (after, head) = self.log().seen();
            // From the last entry this node verified, which must still be there as it
            // was (a writer that deletes or changes it while no one appends is noticed
            // here, not only at the next append).
            let mut rows = self
                .engine
                .fleet_log(after.saturating_sub(1), fleet_log::READ_BATCH + 1)?;
            if after > 0 {
                let kept = rows
                    .first()
                    .is_some_and(|r| r.seq as u64 == after && r.tag[..] == head[..]);
                if !kept {
                    let problem =
                        format!("entry {after}, which this node verified, is gone or changed");
                    let newly = self.log().break_at(problem.clone());
                    if newly {
                        tracing::error!(
                            "the fleet's log is not as the nodes wrote it: {problem}. No \
                             revocation or fleet setting can be made until it is repaired \
                             (docs/CLUSTER.md, \"What the database can and cannot do to the \
                             fleet\")"
                        );
                    }
                    return Ok(());
                }
                rows.remove(0);
            }
            let full = rows.len() >= fleet_log::READ_BATCH;
            let mut log = self.log();
            let before = log.seen().0;
            let problem = log.apply(&self.fleet_key, &rows);
            let progressed = log.seen().0 > before;
            let dead: Vec<(String, u64)> = log
                .peek_revocations()
                .map(|r| (r.id.clone(), r.before))
                .collect();
            drop(log);
            // Ended enrollments leave the index at once.
            self.reindex(|keys| {
                for (id, before) in &dead {
                    if keys
                        .get(id.as_str())
                        .is_some_and(|(_, pos, _)| (*pos.max(&0) as u64) < *before)
                    {
                        keys.remove(id.as_str());
                    }
                }
            });
            if let Some(p) = problem {
                tracing::error!(
                    "the fleet's log is not as the nodes wrote it: {p}. Nothing past it is \
                     applied, and no revocation or fleet setting can be made until it is \
                     repaired (docs/CLUSTER.md, \"What the database can and cannot do to the \
                     fleet\")"
                );
            }
            if !(full && progressed) {
                return Ok(());
            }
        }
    }

    /// A fleet-wide setting, as the fleet's log last set it (verified), if it did.
    pub fn fleet_setting(&self, name: &str) -> Option<i64> {
        self.log().setting(name)
    }

    /// Sets a fleet-wide setting: an entry of the fleet's log, tagged under the fleet
    /// key (every node applies it when it hears of it). Refused without a fleet.
    pub fn set_fleet_setting(&self, name: &str, value: i64) -> Result<(), StoreError> {
        let _changes = self.changes();
        self.append(
            |entry| self.engine.append_log(entry),
            name,
            value,
            fleet_log::kind::SETTING,
        )
    }

    /// Appends an entry to the fleet's log with `write` (which makes the change it
    /// records in the same transaction): after reading the log to its end, chained to
    /// its last entry; again if another node appended meanwhile.
    fn append<T>(
        &self,
        write: impl Fn(&FleetLogRow) -> Result<Logged<T>, StoreError>,
        id: &str,
        value: i64,
        kind: &str,
    ) -> Result<T, StoreError> {
        if !self.engine.has_fleet_log() {
            return Err(StoreError::NotFleet(id.to_owned()));
        }
        for _ in 0..16 {
            self.sync_locked()?;
            let entry = {
                let log = self.log();
                if let Some(b) = log.broken() {
                    return Err(StoreError::FleetLogDamaged(b.to_owned()));
                }
                log.next_entry(&self.fleet_key, id, value, kind, now())
            };
            match write(&entry)? {
                Logged::Appended(out) => {
                    // Read back: the entry must be in the log as written, and verified
                    // here, before anyone is told it is done.
                    self.sync_locked()?;
                    let kept = {
                        let log = self.log();
                        let seq = entry.seq as u64;
                        log.seen().0 >= seq
                            && log.broken().is_none()
                            && log.tag_of(seq).is_none_or(|t| t[..] == entry.tag[..])
                    };
                    if !kept {
                        return Err(StoreError::FleetLogDamaged(format!(
                            "entry {}, just written, is not in it as written (a rule, a \
                             trigger or a writer removed or changed it)",
                            entry.seq
                        )));
                    }
                    return Ok(out);
                }
                Logged::Moved => continue,
            }
        }
        Err(StoreError::FleetLogBusy)
    }

    /// The revocations verified since the last call, for the fleet to close the
    /// sessions made with their keys.
    pub fn take_revocations(&self) -> Vec<Revocation> {
        self.log().take_revocations()
    }

    /// The database engine (the fleet coordinates through PostgreSQL's).
    pub fn engine(&self) -> &dyn Engine {
        &*self.engine
    }

    fn changes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open enrollment key `EK` (spec 6.1): what the open token carries.
    pub fn open_key(&self) -> Result<SecretKey, StoreError> {
        let (sealed, updated) = self
            .engine
            .open_key()?
            .ok_or(StoreError::Corrupt("the open enrollment key is missing"))?;
        self.sealer.open(&assoc(ad::OPEN, "", updated), &sealed)
    }

    /// Replaces the open enrollment key with a fresh one: every open token issued before
    /// stops working at once. Returns the new key.
    pub fn rotate_open_key(&self) -> Result<SecretKey, StoreError> {
        let at = now();
        let key = SecretKey::from_bytes(crate::secrets::random_bytes());
        let sealed = self.sealer.seal(&assoc(ad::OPEN, "", at), key.expose());
        self.engine.put_open_key(&sealed, at)?;
        self.engine.scrub();
        Ok(key)
    }

    /// Issues a per-identity enrollment token for `id`, valid until `expires`: a fresh
    /// random credential, replacing any token issued for `id` before. Refused if `id` is
    /// enrolled (remove it first).
    pub fn issue_token(&self, id: &Id, expires: i64) -> Result<SecretKey, StoreError> {
        let secret = SecretKey::from_bytes(crate::secrets::random_bytes());
        let sealed = self
            .sealer
            .seal(&assoc(ad::TOKEN, id.as_str(), expires), secret.expose());
        self.engine.issue_token(id, &sealed, now(), expires)?;
        Ok(secret)
    }

    /// Revokes the outstanding token of `id`. Returns whether there was one.
    pub fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let existed = self.engine.revoke_token(id)?;
        self.engine.scrub();
        Ok(existed)
    }

    /// The outstanding tokens (expired ones included), ordered by id.
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.engine.tokens()
    }

    /// What an ENROLL_INIT for `mode` and `id` needs, at time `at`: the credential to
    /// check its tag with, and whether the id is taken.
    pub fn enroll_lookup(
        &self,
        mode: EnrollMode,
        id: &Id,
        at: i64,
    ) -> Result<EnrollLookup, StoreError> {
        let (enrolled, token) = self.engine.enroll_lookup(id.as_str())?;
        // An id whose key this node holds (verified) is enrolled, whatever the database
        // says: a writer that deletes its row does not free it for someone else.
        let enrolled = enrolled
            || self.log().is_revoked_now(id.as_str())
            || self.index.get().is_some_and(|i| {
                i.keys
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(id.as_str())
            });
        match mode {
            EnrollMode::Open => Ok(EnrollLookup {
                credential: Ok(self.open_key()?),
                enrolled,
                token_ref: None,
            }),
            EnrollMode::Token => {
                let Some((sealed, expires)) = token else {
                    return Ok(EnrollLookup {
                        credential: Err(NoCredential::NoToken),
                        enrolled,
                        token_ref: None,
                    });
                };
                let secret = self
                    .sealer
                    .open(&assoc(ad::TOKEN, id.as_str(), expires), &sealed)?;
                let credential = if expires <= at {
                    Err(NoCredential::Expired)
                } else {
                    Ok(secret)
                };
                Ok(EnrollLookup {
                    credential,
                    enrolled,
                    token_ref: Some(sealed),
                })
            }
        }
    }

    /// Stores a new identity in one transaction that fails if it exists and, in token
    /// mode, consumes the token `token_ref` (which must still be outstanding and
    /// unexpired). Returns the new generation once the commit is durable.
    pub fn insert(
        &self,
        id: &Id,
        key: &SecretKey,
        mode: EnrollMode,
        token_ref: Option<&[u8]>,
    ) -> Result<u64, StoreError> {
        let changes = self.changes();
        for _ in 0..16 {
            match self.insert_once(id, key, mode, token_ref) {
                Err(StoreError::FleetLogMoved) => continue,
                done => {
                    drop(changes);
                    return done;
                }
            }
        }
        Err(StoreError::FleetLogBusy)
    }

    /// [`Store::insert`] once, with `changes` held.
    fn insert_once(
        &self,
        id: &Id,
        key: &SecretKey,
        mode: EnrollMode,
        token_ref: Option<&[u8]>,
    ) -> Result<u64, StoreError> {
        // In a fleet, the log first: the enrollment is sealed with the number of log
        // entries before it, and ended only by a revocation or removal written after.
        self.sync_locked()?;
        let pos = {
            let log = self.log();
            // Past a break, removals other nodes applied are unknown here: an enrollment
            // sealed before them would be ended on those nodes.
            if let Some(b) = log.broken() {
                return Err(StoreError::FleetLogDamaged(b.to_owned()));
            }
            // A revoked id stays taken (as its row does with one daemon), even if a
            // writer deleted the row: only a removal frees it.
            if log.is_revoked_now(id.as_str()) {
                return Err(StoreError::Taken(id.clone()));
            }
            log.seen().0 as i64
        };
        let seal = |generation| {
            let sealed = self
                .sealer
                .seal(&identity_ad(id.as_str(), generation, pos), key.expose());
            stored_key(pos, sealed)
        };
        let (generation, stored) = self.engine.insert(id, mode, token_ref, now(), &seal)?;
        let (pos, sealed) = split_key(&stored)?;
        let sealed = sealed_array(sealed)?;
        self.reindex(|keys| {
            keys.insert(id.as_str().into(), (generation, pos, sealed));
        });
        Ok(generation as u64)
    }

    /// The key of a usable identity: `None` if it is unknown or revoked.
    ///
    /// From the index when it is loaded ([`Store::cached_key`]); else one read and one
    /// unseal, of the identity's key or of the decoy, whichever the case.
    pub fn key(&self, id: &Id) -> Result<Option<IdentityKey>, StoreError> {
        if let Some(found) = self.cached_key(id) {
            return found;
        }
        let row = self.engine.key(id.as_str())?;
        let row = match &row {
            Some((generation, stored)) => Some((*generation, split_key(stored)?)),
            None => None,
        };
        match row {
            Some((generation, (pos, sealed))) if !self.is_revoked(id.as_str(), pos) => {
                self.unseal_key(id, Some((generation, pos)), sealed)
            }
            _ => self.unseal_key(id, None, &self.decoy),
        }
    }

    /// Whether `id` has a key in the in-memory index (`false` before it is loaded).
    pub fn is_indexed(&self, id: &Id) -> bool {
        self.index.get().is_some_and(|index| {
            index
                .keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(id.as_str())
        })
    }

    /// [`Store::key`] from memory, without blocking: `None` if the index is not loaded.
    /// The same work for a known and an unknown id: one map lookup, one unseal.
    pub fn cached_key(&self, id: &Id) -> Option<Result<Option<IdentityKey>, StoreError>> {
        let index = self.index.get()?;
        let found = index
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id.as_str())
            .copied();
        Some(match found {
            Some((generation, pos, sealed)) => {
                self.unseal_key(id, Some((generation, pos)), &sealed)
            }
            None => self.unseal_key(id, None, &self.decoy),
        })
    }

    /// The work of an unknown id without an id (spec 7.5): the decoy unsealed, for a
    /// handshake whose sealed id did not open. Always `Ok(None)` unless the store is
    /// damaged.
    pub fn decoy_key(&self) -> Result<Option<IdentityKey>, StoreError> {
        // The same map lookup as a claimed id (on "", which no id is), then the decoy.
        if let Some(index) = self.index.get() {
            let found = index
                .keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get("")
                .copied();
            debug_assert!(found.is_none(), "no id is empty");
        }
        self.sealer
            .open(&assoc(ad::DECOY, "", 0), &self.decoy)
            .map(|_decoy| None)
    }

    /// Unseals an identity's key (its generation and log position given) or the decoy's
    /// (`None`).
    fn unseal_key(
        &self,
        id: &Id,
        enrollment: Option<(i64, i64)>,
        sealed: &[u8],
    ) -> Result<Option<IdentityKey>, StoreError> {
        let ad = match enrollment {
            Some((g, pos)) => identity_ad(id.as_str(), g, pos),
            None => assoc(ad::DECOY, "", 0),
        };
        let key = self.sealer.open(&ad, sealed)?;
        Ok(enrollment.map(|(g, pos)| IdentityKey {
            key,
            generation: g as u64,
            log_pos: pos.max(0) as u64,
        }))
    }

    /// Whether a key row may be used: no verified revocation written after its
    /// enrollment ended it (a row restored after its revocation is refused), and it
    /// opens with the store key.
    fn usable(&self, id: &str, generation: i64, pos: i64, sealed: &[u8]) -> bool {
        if self.is_revoked(id, pos) {
            tracing::error!(
                id,
                generation,
                "the database holds a key of this identity that was revoked or removed: \
                 the row was restored (a rollback, or a database writer); it is not used"
            );
            return false;
        }
        self.key_opens(id, generation, pos, sealed)
    }

    /// Whether the sealed key row opens with the store key; logs the identity if not.
    fn key_opens(&self, id: &str, generation: i64, pos: i64, sealed: &[u8]) -> bool {
        match self.sealer.open(&identity_ad(id, generation, pos), sealed) {
            Ok(_) => true,
            Err(e) => {
                // The store key itself was checked at open (the decoy, the open key): a
                // row that does not open was damaged or moved, and only its device is
                // refused.
                tracing::error!(
                    id,
                    generation,
                    "the stored key of this identity does not open ({e}); its handshakes \
                     will be refused: remove the identity and enroll the device again"
                );
                false
            }
        }
    }

    /// Reads the sealed keys of every usable identity into memory, checking each opens
    /// with the store key; from then on [`Store::cached_key`] answers and every change
    /// to the identities updates the index. For the daemon (admin commands do not need
    /// it). Returns the number of keys; loading twice is a no-op.
    pub fn load_key_index(&self) -> Result<usize, StoreError> {
        let changes = self.changes();
        if let Some(index) = self.index.get() {
            return Ok(index.keys().len());
        }
        let keys = self.read_keys()?;
        let n = keys.len();
        let _ = self.index.set(KeyIndex {
            keys: RwLock::new(keys),
        });
        drop(changes);
        Ok(n)
    }

    fn read_keys(&self) -> Result<SealedKeys, StoreError> {
        // The revocations first: a key row they end is left out even if the database
        // says it is usable. (Callers hold `changes`.)
        self.sync_locked()?;
        let rows = self.engine.keys()?;
        // Room to double before a rehash, which would hold the write lock (and every
        // handshake) for a pass over the whole map.
        let mut keys = HashMap::with_capacity(2 * rows.len() + 1024);
        for (id, generation, stored) in rows {
            let Ok((pos, sealed)) = split_key(&stored) else {
                tracing::error!(id, generation, "the stored key of this identity has the wrong length; its handshakes will be refused");
                continue;
            };
            if self.usable(&id, generation, pos, sealed) {
                keys.insert(
                    id.into_boxed_str(),
                    (generation, pos, sealed_array(sealed)?),
                );
            }
        }
        Ok(keys)
    }

    /// Reads every key again into the loaded index (a daemon of a fleet that may have
    /// missed changes announced while its notification connection was down). Returns
    /// the number of keys, and the identities whose key the index held and no longer
    /// does, or holds from another enrollment now (revoked, removed or enrolled again
    /// meanwhile: their sessions were made with a key that is no longer theirs).
    pub fn reload_key_index(&self) -> Result<(usize, Vec<String>), StoreError> {
        let changes = self.changes();
        let Some(index) = self.index.get() else {
            drop(changes);
            return Ok((self.load_key_index()?, Vec::new()));
        };
        let keys = self.read_keys()?;
        let n = keys.len();
        let mut old = index.keys();
        let gone = old
            .iter()
            .filter(|(id, (generation, _, _))| keys.get(*id).map(|k| k.0) != Some(*generation))
            .map(|(id, _)| id.to_string())
            .collect();
        *old = keys;
        drop(old);
        drop(changes);
        Ok((n, gone))
    }

    /// Reads the fleet's log and then `id`'s row again into the loaded index, under one
    /// lock: another daemon of the fleet enrolled, revoked or removed it. Returns
    /// whether the id is usable now. If the log or the row cannot be read, the id leaves
    /// the index (its handshakes fail until a refresh succeeds): a key that may be
    /// revoked is never kept, nor one read without the log.
    pub fn refresh(&self, id: &str) -> Result<bool, StoreError> {
        let changes = self.changes();
        let row = self.sync_locked().and_then(|()| self.engine.key(id));
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                self.reindex(|keys| {
                    keys.remove(id);
                });
                return Err(e);
            }
        };
        let entry = match &row {
            Some((generation, stored)) => match split_key(stored) {
                Ok((pos, sealed)) if self.usable(id, *generation, pos, sealed) => {
                    sealed_array(sealed).ok().map(|s| (*generation, pos, s))
                }
                _ => None,
            },
            None => None,
        };
        let usable = entry.is_some();
        self.reindex(|keys| match entry {
            Some(e) => {
                keys.insert(id.into(), e);
            }
            None => {
                keys.remove(id);
            }
        });
        drop(changes);
        Ok(usable)
    }

    /// Applies `change` to the index, if loaded. Called with `changes` held.
    fn reindex(&self, change: impl FnOnce(&mut SealedKeys)) {
        if let Some(index) = self.index.get() {
            change(&mut index.keys());
        }
    }

    /// Records the last successful handshake of several identities in one transaction
    /// (the daemon batches them; losing a batch in a crash loses only bookkeeping).
    pub fn touch_many(&self, seen: &[(Id, i64)]) -> Result<(), StoreError> {
        self.engine.touch_many(seen)
    }

    /// Revokes an identity and erases its key. Returns false if it was already revoked.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        if self.engine.has_fleet_log() {
            return self.revoke_logged(id, false);
        }
        let changes = self.changes();
        let revoked = self.engine.revoke(id, now());
        if revoked.is_ok() {
            self.reindex(|keys| {
                keys.remove(id);
            });
        }
        drop(changes);
        match revoked? {
            Some(true) => {
                self.engine.scrub();
                Ok(true)
            }
            Some(false) => Ok(false),
            None => Err(StoreError::NotFound(id.to_owned())),
        }
    }

    /// Deletes an identity, so that its id can be enrolled again (with a new token, or
    /// in open mode). Returns false if there was none.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        if self.engine.has_fleet_log() {
            return self.revoke_logged(id, true);
        }
        let changes = self.changes();
        let existed = self.engine.remove(id)?;
        self.reindex(|keys| {
            keys.remove(id);
        });
        drop(changes);
        if existed {
            self.engine.scrub();
        }
        Ok(existed)
    }

    /// [`Store::revoke`] or [`Store::remove`] in a fleet: an entry of the fleet's log
    /// ends every enrollment of `id` this node can know of, whatever its row says (the
    /// entry is written even if the row is gone, or already marked revoked: a database
    /// writer may have put it so). Refused for an id neither the database nor this
    /// node knows.
    fn revoke_logged(&self, id: &str, remove: bool) -> Result<bool, StoreError> {
        let changes = self.changes();
        let held = self.index.get().is_some_and(|i| {
            i.keys
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(id)
        });
        let listed = self.engine.enroll_lookup(id)?.0;
        // Revoked and not removed since: still enrolled for the fleet, row or not.
        let revoked = self.log().is_revoked_now(id);
        let held = held || revoked;
        if !held && !listed && !self.was_revoked(id) {
            drop(changes);
            return match remove {
                true => Ok(false),
                false => Err(StoreError::NotFound(id.to_owned())),
            };
        }
        let at = now();
        let kind = if remove {
            fleet_log::kind::REMOVED
        } else {
            fleet_log::kind::REVOKED
        };
        let newly = self.append(
            |entry| match remove {
                true => self.engine.remove_logged(id, entry).map(|l| match l {
                    Logged::Appended(existed) => Logged::Appended(existed),
                    Logged::Moved => Logged::Moved,
                }),
                false => self.engine.revoke_logged(id, at, entry).map(|l| match l {
                    Logged::Appended(row) => Logged::Appended(row != Some(false)),
                    Logged::Moved => Logged::Moved,
                }),
            },
            id,
            0,
            kind,
        );
        if newly.is_ok() {
            self.reindex(|keys| {
                keys.remove(id);
            });
        }
        drop(changes);
        let newly = newly?;
        self.engine.scrub();
        Ok(newly || held)
    }

    /// Every identity, ordered by id.
    pub fn list(&self) -> Result<Vec<IdentityRow>, StoreError> {
        self.engine.list()
    }

    /// Number of identities.
    pub fn count(&self) -> Result<u64, StoreError> {
        self.engine.count()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connection_string_is_shown_without_any_password() {
        for (url, shown) in [
            (
                "postgres://tally:s3cret@db.example:5433/tally",
                "postgres://tally@db.example:5433/tally",
            ),
            // An '@' in the password, percent-encoded; and one in the query string.
            (
                "postgres://tally:p%40ss@db/tally?password=other&application_name=x",
                "postgres://tally@db:5432/tally",
            ),
            (
                "postgresql://tally@a:1,b:2/tally?sslmode=disable",
                "postgres://tally@a:1,b:2/tally",
            ),
            (
                "host=db user=tally password=kv-secret dbname=tally",
                "postgres://tally@db/tally",
            ),
            (
                "postgres://tally:s3cret@db:notaport/x",
                "postgres://(not shown)",
            ),
            // TLS parameters the driver does not know do not make it unparsable.
            (
                "postgres://tally:s3cret@db/tally?sslmode=verify-full&sslrootcert=/etc/tally/ca.crt",
                "postgres://tally@db:5432/tally",
            ),
            ("sqlite:///var/lib/tally/pw", "sqlite://(not shown)"),
        ] {
            assert_eq!(super::redacted(url), shown, "{url}");
        }
        let e = super::Location::from_setting(Some("postgress://u:s3cret@h/db"), Path::new("."));
        assert!(!format!("{e:?}").contains("s3cret"), "{e:?}");
    }

    use super::*;
    use rusqlite::Connection;

    fn store(dir: &Path) -> Store {
        Store::open(&dir.join(DB_FILE), SecretKey::from_bytes([9; 32])).unwrap()
    }

    fn raw(dir: &Path) -> Connection {
        Connection::open(dir.join(DB_FILE)).unwrap()
    }

    #[test]
    fn insert_lookup_revoke_remove() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let id = Id::new("dev").unwrap();
        let g1 = s
            .insert(&id, &SecretKey::from_bytes([1; 32]), EnrollMode::Open, None)
            .unwrap();
        assert!(matches!(
            s.insert(&id, &SecretKey::from_bytes([2; 32]), EnrollMode::Open, None),
            Err(StoreError::Taken(_))
        ));
        let k = s.key(&id).unwrap().unwrap();
        assert_eq!(k.key.expose(), &[1; 32]);
        assert_eq!(k.generation, g1);
        assert!(s.key(&Id::new("nope").unwrap()).unwrap().is_none());
        s.touch_many(&[(id.clone(), 1_795_000_000)]).unwrap();
        assert!(s.revoke("dev").unwrap());
        assert!(!s.revoke("dev").unwrap());
        assert!(matches!(s.revoke("nope"), Err(StoreError::NotFound(_))));
        assert!(s.key(&id).unwrap().is_none());
        let key: Option<Vec<u8>> = raw(dir.path())
            .query_row("SELECT key FROM identities", [], |r| r.get(0))
            .unwrap();
        assert_eq!(key, None, "a revoked identity's key is erased");
        let rows = s.list().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].last_seen, Some(1_795_000_000));
        assert!(rows[0].revoked.is_some());
        assert!(s.remove("dev").unwrap());
        assert!(!s.remove("dev").unwrap());
        let g2 = s
            .insert(&id, &SecretKey::from_bytes([3; 32]), EnrollMode::Open, None)
            .unwrap();
        assert!(g2 > g1, "generations are never reused");
        assert_eq!(s.key(&id).unwrap().unwrap().generation, g2);
        // AUTOINCREMENT: even removing the newest row does not free its generation.
        assert!(s.remove("dev").unwrap());
        let g3 = s
            .insert(&id, &SecretKey::from_bytes([4; 32]), EnrollMode::Open, None)
            .unwrap();
        assert!(g3 > g2);
    }

    /// What `cached_key` answers, as (generation, key bytes); `None` for unknown.
    fn cached(s: &Store, id: &str) -> Option<(u64, [u8; 32])> {
        s.cached_key(&Id::new(id).unwrap())
            .expect("the index is loaded")
            .unwrap()
            .map(|k| (k.generation, *k.key.expose()))
    }

    #[test]
    fn the_key_index_follows_every_change_to_the_identities() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let (a, b) = (Id::new("a").unwrap(), Id::new("b").unwrap());
        let ga = s.insert(&a, &SecretKey::from_bytes([1; 32]), EnrollMode::Open, None);
        s.insert(&b, &SecretKey::from_bytes([2; 32]), EnrollMode::Open, None)
            .unwrap();
        s.revoke("b").unwrap();
        assert!(s.cached_key(&a).is_none(), "no index before it is loaded");
        assert_eq!(
            s.load_key_index().unwrap(),
            1,
            "revoked keys are not loaded"
        );
        assert_eq!(s.load_key_index().unwrap(), 1, "loading twice is a no-op");
        assert_eq!(cached(&s, "a"), Some((ga.unwrap(), [1; 32])));
        assert_eq!(cached(&s, "b"), None, "revoked before the load");
        assert_eq!(cached(&s, "nope"), None, "unknown: the decoy, unsealed");
        // Changes after the load: insert, revoke, remove, insert again.
        let c = Id::new("c").unwrap();
        let gc = s
            .insert(&c, &SecretKey::from_bytes([3; 32]), EnrollMode::Open, None)
            .unwrap();
        assert_eq!(cached(&s, "c"), Some((gc, [3; 32])));
        assert!(s.revoke("c").unwrap());
        assert_eq!(cached(&s, "c"), None);
        assert!(s.remove("a").unwrap());
        assert_eq!(cached(&s, "a"), None);
        let ga2 = s
            .insert(&a, &SecretKey::from_bytes([4; 32]), EnrollMode::Open, None)
            .unwrap();
        assert_eq!(cached(&s, "a"), Some((ga2, [4; 32])));
        // A refused insert leaves the index alone.
        assert!(s
            .insert(&a, &SecretKey::from_bytes([5; 32]), EnrollMode::Open, None)
            .is_err());
        assert_eq!(cached(&s, "a"), Some((ga2, [4; 32])));
        // Memory and SQLite agree, and `key` answers from memory.
        for id in ["a", "b", "c", "nope"] {
            let id = Id::new(id).unwrap();
            let sql = Store::open(&dir.path().join(DB_FILE), SecretKey::from_bytes([9; 32]))
                .unwrap()
                .key(&id)
                .unwrap()
                .map(|k| (k.generation, *k.key.expose()));
            assert_eq!(sql, cached(&s, id.as_str()), "{id}");
            assert_eq!(
                s.key(&id).unwrap().map(|k| k.generation),
                sql.map(|(g, _)| g)
            );
        }
    }

    #[test]
    fn a_key_that_does_not_open_is_left_out_of_the_index_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let id = Id::new("dev").unwrap();
        s.insert(&id, &SecretKey::from_bytes([1; 32]), EnrollMode::Open, None)
            .unwrap();
        // The sealed key moved to another row: its associated data no longer matches.
        raw(dir.path())
            .execute("UPDATE identities SET id = 'other'", [])
            .unwrap();
        let ok = Id::new("ok").unwrap();
        s.insert(&ok, &SecretKey::from_bytes([2; 32]), EnrollMode::Open, None)
            .unwrap();
        assert_eq!(s.load_key_index().unwrap(), 1);
        assert_eq!(cached(&s, "other"), None, "refused like an unknown id");
        assert_eq!(cached(&s, "ok").map(|(_, k)| k), Some([2; 32]));
    }

    #[test]
    fn tokens_are_single_use_expire_and_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let id = Id::new("dev").unwrap();
        let far = now() + 3600;
        let first = s.issue_token(&id, far).unwrap();
        let second = s.issue_token(&id, far).unwrap();
        assert!(!first.ct_eq(&second));
        let l = s.enroll_lookup(EnrollMode::Token, &id, now()).unwrap();
        assert!(
            l.credential.as_ref().unwrap().ct_eq(&second),
            "the newest token replaces the first"
        );
        assert!(!l.enrolled);
        // Expired at a later time.
        let late = s.enroll_lookup(EnrollMode::Token, &id, far).unwrap();
        assert_eq!(late.credential.err(), Some(NoCredential::Expired));
        // Consumed by the enrollment.
        s.insert(
            &id,
            &SecretKey::from_bytes([1; 32]),
            EnrollMode::Token,
            l.token_ref.as_deref(),
        )
        .unwrap();
        let after = s.enroll_lookup(EnrollMode::Token, &id, now()).unwrap();
        assert_eq!(after.credential.err(), Some(NoCredential::NoToken));
        assert!(after.enrolled);
        assert!(s.tokens().unwrap().is_empty());
        // No token for an enrolled id.
        assert!(matches!(s.issue_token(&id, far), Err(StoreError::Taken(_))));
        // A revoked token cannot be used by an enrollment already past its INIT.
        let other = Id::new("dev-2").unwrap();
        s.issue_token(&other, far).unwrap();
        let l = s.enroll_lookup(EnrollMode::Token, &other, now()).unwrap();
        assert_eq!(s.tokens().unwrap().len(), 1);
        assert!(s.revoke_token("dev-2").unwrap());
        assert!(!s.revoke_token("dev-2").unwrap());
        assert!(matches!(
            s.insert(
                &other,
                &SecretKey::from_bytes([1; 32]),
                EnrollMode::Token,
                l.token_ref.as_deref()
            ),
            Err(StoreError::TokenGone(_))
        ));
        assert!(s.key(&other).unwrap().is_none());
    }

    #[test]
    fn open_key_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let a = s.open_key().unwrap();
        assert!(
            a.ct_eq(&store(dir.path()).open_key().unwrap()),
            "stable across opens"
        );
        let b = s.rotate_open_key().unwrap();
        assert!(!a.ct_eq(&b));
        assert!(b.ct_eq(&s.open_key().unwrap()));
        let l = s
            .enroll_lookup(EnrollMode::Open, &Id::new("x").unwrap(), now())
            .unwrap();
        assert!(l.credential.unwrap().ct_eq(&b));
    }

    #[test]
    fn database_and_its_wal_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.insert(
            &Id::new("dev").unwrap(),
            &SecretKey::from_bytes([1; 32]),
            EnrollMode::Open,
            None,
        )
        .unwrap();
        for name in [
            DB_FILE.to_owned(),
            format!("{DB_FILE}-wal"),
            format!("{DB_FILE}-shm"),
        ] {
            let mode = std::fs::metadata(dir.path().join(&name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
    }

    #[test]
    fn keys_are_sealed_per_row_and_the_wrong_store_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let id = Id::new("dev").unwrap();
        let s = store(dir.path());
        // Enrolls `dev` with the key 5a..5a; returns the sealed value stored.
        let enroll = || -> Vec<u8> {
            let key = SecretKey::from_bytes([0x5a; 32]);
            s.insert(&id, &key, EnrollMode::Open, None).unwrap();
            raw(dir.path())
                .query_row("SELECT key FROM identities", [], |r| r.get(0))
                .unwrap()
        };
        let first = enroll();
        assert_eq!(first.len(), SEALED_LEN);
        assert!(!first.windows(32).any(|w| w == [0x5a; 32]));
        // The same key enrolled again under the same id is sealed differently.
        s.remove("dev").unwrap();
        let second = enroll();
        assert_ne!(first[24..56], second[24..56], "no pad is reused");
        assert_eq!(
            store(dir.path()).key(&id).unwrap().unwrap().key.expose(),
            &[0x5a; 32]
        );
        // A sealed key moved to another row does not open there.
        raw(dir.path())
            .execute(
                "INSERT INTO identities (id, key, created, mode) VALUES ('thief', ?1, 0, 'open')",
                [&second],
            )
            .unwrap();
        assert!(matches!(
            s.key(&Id::new("thief").unwrap()),
            Err(StoreError::WrongStoreKey)
        ));
        assert!(matches!(
            Store::open(&dir.path().join(DB_FILE), SecretKey::from_bytes([8; 32])),
            Err(StoreError::WrongStoreKey)
        ));
    }

    #[test]
    fn schema_versions_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path());
        let v: u32 = raw(dir.path())
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        raw(dir.path())
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let e = Store::open(&dir.path().join(DB_FILE), SecretKey::from_bytes([9; 32])).unwrap_err();
        assert!(
            matches!(e, StoreError::TooNew { found, .. } if found == SCHEMA_VERSION + 1),
            "{e}"
        );
        // The layout before versioning.
        let old = tempfile::tempdir().unwrap();
        raw(old.path())
            .execute_batch(
                "CREATE TABLE identities (id TEXT PRIMARY KEY NOT NULL, key BLOB NOT NULL,
                 created INTEGER NOT NULL, last_seen INTEGER, revoked INTEGER, mode TEXT NOT NULL) STRICT;",
            )
            .unwrap();
        let e = Store::open(&old.path().join(DB_FILE), SecretKey::from_bytes([9; 32])).unwrap_err();
        assert!(matches!(e, StoreError::Unversioned(_)), "{e}");
        assert!(e.to_string().contains("predates schema versioning"));
    }
}
