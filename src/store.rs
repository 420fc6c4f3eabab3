//! The identity store: SQLite (WAL, full durability, `secure_delete`), versioned schema.
//!
//! It holds every secret the server keeps besides its two key files: identity keys, the
//! outstanding per-identity enrollment tokens and the open enrollment key. Each is sealed
//! with XChaCha20-Poly1305 under the *store key* (kept outside the database, spec 13.9),
//! with a fresh random nonce per row and the row's identity (id, generation or expiry) as
//! associated data: a copy of the database alone reveals no secret, a sealed value cannot
//! be moved to another row, and two enrollments of one id share nothing.
//!
//! Every enrollment gets a *generation*, a number never used before in this database
//! (`AUTOINCREMENT`): it names one key of one id, so a session can be tied to the key it
//! was made with (spec 7.3, removal during a handshake).
//!
//! Deleted and overwritten secrets are zeroed in the file (`secure_delete`), and the WAL
//! is checkpointed and truncated after a revocation or removal, so the old page images
//! do not linger there either.
//!
//! Every method blocks; async callers run them on `spawn_blocking`, except
//! [`Store::cached_key`] once [`Store::load_key_index`] has run (the daemon's handshake
//! path). The database can be opened by the daemon and by admin commands at the same time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use zeroize::Zeroizing;

use crate::proto::frame::{EnrollMode, Id};
use crate::proto::schedule::scrubbed;
use crate::proto::SecretKey;

/// File name of the database in the state directory.
pub const DB_FILE: &str = "identities.db";

/// The schema version this build writes (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 1;

/// Length of a sealed 32-byte secret: 24-byte nonce, 32-byte ciphertext, 16-byte tag.
const SEALED_LEN: usize = 24 + 32 + 16;

/// The migrations: `MIGRATIONS[n]` takes a database from version `n` to `n + 1`.
/// Version 0 is an empty database.
const MIGRATIONS: &[&str] = &["
    CREATE TABLE identities (
        generation INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        key        BLOB,               -- sealed k; NULL once revoked
        created    INTEGER NOT NULL,
        last_seen  INTEGER,
        revoked    INTEGER,
        mode       TEXT NOT NULL
    ) STRICT;
    CREATE TABLE tokens (
        id      TEXT PRIMARY KEY NOT NULL,
        secret  BLOB NOT NULL,         -- sealed token credential
        issued  INTEGER NOT NULL,
        expires INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE settings (
        name    TEXT PRIMARY KEY NOT NULL,
        value   BLOB NOT NULL,
        updated INTEGER NOT NULL
    ) STRICT;
    -- One row shaped like an identity: unknown and revoked ids read and unseal it, so a
    -- HELLO costs the same whether or not its id is enrolled (spec 7.5).
    CREATE TABLE decoy (
        generation INTEGER PRIMARY KEY,
        key        BLOB NOT NULL
    ) STRICT;
"];

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
    #[error("{path}: schema version {found} is newer than this tallyd understands (up to {SCHEMA_VERSION}); run the newer tallyd, or restore a backup")]
    TooNew {
        /// The database.
        path: PathBuf,
        /// Its `user_version`.
        found: u32,
    },
    /// The store key does not open the database's sealed values.
    #[error("the store key does not open this identity database: store.key was replaced, or belongs to another state directory")]
    WrongStoreKey,
    /// A sealed value is damaged.
    #[error("identity store: damaged sealed value ({0})")]
    Corrupt(&'static str),
    /// SQLite failed.
    #[error("identity store: {0}")]
    Sqlite(#[from] rusqlite::Error),
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
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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

/// The identity store.
pub struct Store {
    /// Commits are durable before they return (enrollment, revocation).
    conn: Mutex<Connection>,
    /// For bookkeeping that may be lost in a crash (`last_seen`) and for reads on the
    /// handshake path, so they never queue behind a durable write.
    relaxed: Mutex<Connection>,
    sealer: Sealer,
    /// The sealed keys in memory, once [`Store::load_key_index`] ran.
    index: OnceLock<KeyIndex>,
}

/// The sealed key of every usable identity, and the decoy's, held in memory so that a
/// handshake's key lookup is a map lookup and one unseal on the caller's thread: no
/// SQLite, no hop to a blocking pool, whatever a flood of HELLOs asks for (issue 11).
///
/// The keys stay sealed here as in the database (spec 13.9): a plaintext identity key
/// exists only while a handshake (or the check at load) unseals it. Every change to the
/// identities goes through this `Store` and updates the index under the write
/// connection's lock, after its commit; the daemon is the only writer while it runs: it
/// holds the state directory's lock, and admin commands go through its control socket
/// or, if it does not answer there, change nothing ([`crate::secrets::lock_state_dir`]).
struct KeyIndex {
    keys: RwLock<SealedKeys>,
    decoy: [u8; SEALED_LEN],
}

/// Id → (generation, sealed key).
type SealedKeys = HashMap<Box<str>, (i64, [u8; SEALED_LEN])>;

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

fn connection(path: &Path, synchronous: &str) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    // Deleted and overwritten rows are zeroed in the file, not left in free space.
    conn.pragma_update(None, "secure_delete", "ON")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

/// Whether `id` has a row (revoked or not).
fn is_enrolled(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT EXISTS(SELECT 1 FROM identities WHERE id = ?1)")?
        .query_row([id], |r| r.get(0))?)
}

/// Brings the schema to [`SCHEMA_VERSION`], refusing databases this build cannot use.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == 0 {
        let tables: i64 = tx.query_row(
            "SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table'",
            [],
            |r| r.get(0),
        )?;
        if tables > 0 {
            return Err(StoreError::Unversioned(path.to_owned()));
        }
    }
    if version > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            path: path.to_owned(),
            found: version,
        });
    }
    for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", n as u32 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

impl Store {
    /// Opens (and creates, or migrates, if needed) the database at `path`.
    pub fn open(path: &Path, store_key: SecretKey) -> Result<Store, StoreError> {
        // Create the file 0600 before SQLite does: its -wal and -shm files copy the
        // database's mode when they are created.
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path);
        }
        let mut conn = connection(path, "FULL")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        migrate(&mut conn, path)?;
        let relaxed = connection(path, "NORMAL")?;
        #[cfg(unix)]
        for suffix in ["", "-wal", "-shm"] {
            // With a looser umask, or copied in by hand.
            use std::os::unix::fs::PermissionsExt;
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        }
        let store = Store {
            conn: Mutex::new(conn),
            relaxed: Mutex::new(relaxed),
            sealer: Sealer::new(&store_key),
            index: OnceLock::new(),
        };
        store.init_secrets()?;
        Ok(store)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn relaxed(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.relaxed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates the decoy row and the open enrollment key on first open, and checks that
    /// the store key opens them afterwards.
    fn init_secrets(&self) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let decoy: Option<Vec<u8>> = tx
            .query_row("SELECT key FROM decoy WHERE generation = 0", [], |r| {
                r.get(0)
            })
            .optional()?;
        match decoy {
            Some(sealed) => {
                self.sealer.open(&assoc(ad::DECOY, "", 0), &sealed)?;
            }
            None => {
                let sealed = self
                    .sealer
                    .seal(&assoc(ad::DECOY, "", 0), &crate::secrets::random_bytes());
                tx.execute(
                    "INSERT INTO decoy (generation, key) VALUES (0, ?1)",
                    [sealed],
                )?;
            }
        }
        if self.find_open_key(&tx)?.is_none() {
            self.put_open_key(&tx)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Seals a fresh open key into `settings`, replacing the one there; returns it.
    fn put_open_key(&self, tx: &rusqlite::Transaction) -> Result<SecretKey, StoreError> {
        let at = now();
        let key = SecretKey::from_bytes(crate::secrets::random_bytes());
        let sealed = self.sealer.seal(&assoc(ad::OPEN, "", at), key.expose());
        tx.execute(
            "INSERT OR REPLACE INTO settings (name, value, updated) VALUES ('open_key', ?1, ?2)",
            params![sealed, at],
        )?;
        Ok(key)
    }

    /// The open enrollment key `EK` (spec 6.1): what the open token carries.
    pub fn open_key(&self) -> Result<SecretKey, StoreError> {
        self.read_open_key(&self.relaxed())
    }

    fn read_open_key(&self, conn: &Connection) -> Result<SecretKey, StoreError> {
        self.find_open_key(conn)?
            .ok_or(StoreError::Corrupt("the open enrollment key is missing"))
    }

    /// The open key, unsealed (a wrong store key fails here), or `None` before it exists.
    fn find_open_key(&self, conn: &Connection) -> Result<Option<SecretKey>, StoreError> {
        let row: Option<(Vec<u8>, i64)> = conn
            .query_row(
                "SELECT value, updated FROM settings WHERE name = 'open_key'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(sealed, updated)| self.sealer.open(&assoc(ad::OPEN, "", updated), &sealed))
            .transpose()
    }

    /// Replaces the open enrollment key with a fresh one: every open token issued before
    /// stops working at once. Returns the new key.
    pub fn rotate_open_key(&self) -> Result<SecretKey, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let key = self.put_open_key(&tx)?;
        tx.commit()?;
        drop(conn);
        self.scrub();
        Ok(key)
    }

    /// Issues a per-identity enrollment token for `id`, valid until `expires`: a fresh
    /// random credential, replacing any token issued for `id` before. Refused if `id` is
    /// enrolled (remove it first).
    pub fn issue_token(&self, id: &Id, expires: i64) -> Result<SecretKey, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if is_enrolled(&tx, id.as_str())? {
            return Err(StoreError::Taken(id.clone()));
        }
        let secret = SecretKey::from_bytes(crate::secrets::random_bytes());
        let sealed = self
            .sealer
            .seal(&assoc(ad::TOKEN, id.as_str(), expires), secret.expose());
        tx.execute(
            "INSERT OR REPLACE INTO tokens (id, secret, issued, expires) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), sealed, now(), expires],
        )?;
        tx.commit()?;
        Ok(secret)
    }

    /// Revokes the outstanding token of `id`. Returns whether there was one.
    pub fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM tokens WHERE id = ?1", [id])?;
        self.scrub();
        Ok(n == 1)
    }

    /// The outstanding tokens (expired ones included), ordered by id.
    pub fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, issued, expires FROM tokens ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(TokenRow {
                id: r.get(0)?,
                issued: r.get(1)?,
                expires: r.get(2)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// What an ENROLL_INIT for `mode` and `id` needs, at time `at`: the credential to
    /// check its tag with, and whether the id is taken. One read.
    pub fn enroll_lookup(
        &self,
        mode: EnrollMode,
        id: &Id,
        at: i64,
    ) -> Result<EnrollLookup, StoreError> {
        let conn = self.relaxed();
        let enrolled = is_enrolled(&conn, id.as_str())?;
        match mode {
            EnrollMode::Open => Ok(EnrollLookup {
                credential: Ok(self.read_open_key(&conn)?),
                enrolled,
                token_ref: None,
            }),
            EnrollMode::Token => {
                let row: Option<(Vec<u8>, i64)> = conn
                    .prepare_cached("SELECT secret, expires FROM tokens WHERE id = ?1")?
                    .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                let Some((sealed, expires)) = row else {
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
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let at = now();
        if let Some(token) = token_ref {
            let n = tx.execute(
                "DELETE FROM tokens WHERE id = ?1 AND secret = ?2 AND expires > ?3",
                params![id.as_str(), token, at],
            )?;
            if n != 1 {
                return Err(StoreError::TokenGone(id.clone()));
            }
        } else {
            // An id enrolled in open mode has no use for a token issued for it.
            tx.execute("DELETE FROM tokens WHERE id = ?1", [id.as_str()])?;
        }
        let res = tx.execute(
            "INSERT INTO identities (id, key, created, mode) VALUES (?1, NULL, ?2, ?3)",
            params![id.as_str(), at, mode.as_str()],
        );
        match res {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                return Err(StoreError::Taken(id.clone()))
            }
            Err(e) => return Err(e.into()),
        }
        let generation = tx.last_insert_rowid();
        let sealed = self
            .sealer
            .seal(&assoc(ad::IDENTITY, id.as_str(), generation), key.expose());
        tx.execute(
            "UPDATE identities SET key = ?2 WHERE generation = ?1",
            params![generation, sealed],
        )?;
        let sealed = sealed_array(&sealed)?;
        tx.commit()?;
        self.reindex(|keys| {
            keys.insert(id.as_str().into(), (generation, sealed));
        });
        drop(conn);
        Ok(generation as u64)
    }

    /// The key of a usable identity: `None` if it is unknown or revoked.
    ///
    /// From the index when it is loaded ([`Store::cached_key`]); else one statement that
    /// always yields exactly one row (the identity's, or the decoy's) and one unseal,
    /// whichever the case, so that the work does not tell an enrolled id from an unknown
    /// one (spec 7.5), on the relaxed connection: it never waits for a durable write.
    pub fn key(&self, id: &Id) -> Result<Option<IdentityKey>, StoreError> {
        if let Some(found) = self.cached_key(id) {
            return found;
        }
        let conn = self.relaxed();
        let (real, generation, sealed): (bool, i64, Vec<u8>) = conn
            .prepare_cached(
                "SELECT 1, generation, key FROM identities WHERE id = ?1 AND revoked IS NULL \
                 UNION ALL SELECT 0, generation, key FROM decoy WHERE generation = 0 LIMIT 1",
            )?
            .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        drop(conn);
        self.unseal_key(id, real.then_some(generation), &sealed)
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
            Some((generation, sealed)) => self.unseal_key(id, Some(generation), &sealed),
            None => self.unseal_key(id, None, &index.decoy),
        })
    }

    /// Unseals an identity's key (`generation` given) or the decoy's (`None`).
    fn unseal_key(
        &self,
        id: &Id,
        generation: Option<i64>,
        sealed: &[u8],
    ) -> Result<Option<IdentityKey>, StoreError> {
        let ad = match generation {
            Some(g) => assoc(ad::IDENTITY, id.as_str(), g),
            None => assoc(ad::DECOY, "", 0),
        };
        let key = self.sealer.open(&ad, sealed)?;
        Ok(generation.map(|g| IdentityKey {
            key,
            generation: g as u64,
        }))
    }

    /// Reads the sealed keys of every usable identity into memory, checking each opens
    /// with the store key; from then on [`Store::cached_key`] answers and every change
    /// to the identities updates the index. For the daemon (admin commands do not need
    /// it). Returns the number of keys; loading twice is a no-op.
    pub fn load_key_index(&self) -> Result<usize, StoreError> {
        // Under the write lock: no insert, revocation or removal runs while it loads.
        let conn = self.conn();
        if let Some(index) = self.index.get() {
            return Ok(index.keys().len());
        }
        let decoy: Vec<u8> =
            conn.query_row("SELECT key FROM decoy WHERE generation = 0", [], |r| {
                r.get(0)
            })?;
        let rows: usize = conn.query_row("SELECT COUNT(*) FROM identities", [], |r| r.get(0))?;
        // Room to double before a rehash, which would hold the write lock (and every
        // handshake) for a pass over the whole map.
        let mut keys = HashMap::with_capacity(2 * rows + 1024);
        let mut stmt = conn.prepare(
            "SELECT id, generation, key FROM identities WHERE revoked IS NULL AND key IS NOT NULL",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id: String = row.get(0)?;
            let generation: i64 = row.get(1)?;
            let sealed: Vec<u8> = row.get(2)?;
            // The store key itself was checked at open (the decoy, the open key): a row
            // that does not open was damaged or moved, and only its device is refused.
            if let Err(e) = self
                .sealer
                .open(&assoc(ad::IDENTITY, &id, generation), &sealed)
            {
                tracing::error!(
                    id,
                    generation,
                    "the stored key of this identity does not open ({e}); its handshakes \
                     will be refused: remove the identity and enroll the device again"
                );
                continue;
            }
            keys.insert(id.into_boxed_str(), (generation, sealed_array(&sealed)?));
        }
        drop(rows);
        drop(stmt);
        let n = keys.len();
        let _ = self.index.set(KeyIndex {
            keys: RwLock::new(keys),
            decoy: sealed_array(&decoy)?,
        });
        drop(conn);
        Ok(n)
    }

    /// Applies `change` to the index, if loaded. Called with the write connection locked,
    /// after the commit.
    fn reindex(&self, change: impl FnOnce(&mut SealedKeys)) {
        if let Some(index) = self.index.get() {
            change(&mut index.keys());
        }
    }

    /// Records the last successful handshake of several identities in one transaction
    /// (the daemon batches them; losing a batch in a crash loses only bookkeeping).
    pub fn touch_many(&self, seen: &[(Id, i64)]) -> Result<(), StoreError> {
        let mut conn = self.relaxed();
        let tx = conn.transaction()?;
        {
            let mut stmt =
                tx.prepare_cached("UPDATE identities SET last_seen = ?2 WHERE id = ?1")?;
            for (id, at) in seen {
                stmt.execute(params![id.as_str(), at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Revokes an identity and erases its key. Returns false if it was already revoked.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE identities SET revoked = ?2, key = NULL WHERE id = ?1 AND revoked IS NULL",
            params![id, now()],
        )?;
        self.reindex(|keys| {
            keys.remove(id);
        });
        if n == 1 {
            drop(conn);
            self.scrub();
            return Ok(true);
        }
        if is_enrolled(&conn, id)? {
            Ok(false)
        } else {
            Err(StoreError::NotFound(id.to_owned()))
        }
    }

    /// Deletes an identity, so that its id can be enrolled again (with a new token, or
    /// in open mode). Returns false if there was none.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let n = conn.execute("DELETE FROM identities WHERE id = ?1", [id])?;
        self.reindex(|keys| {
            keys.remove(id);
        });
        drop(conn);
        if n == 1 {
            self.scrub();
        }
        Ok(n == 1)
    }

    /// Copies the WAL into the database and truncates it, so that page images holding
    /// erased secrets do not stay in the `-wal` file. Best effort: with a reader active
    /// the checkpoint may be partial, and the next one completes it.
    fn scrub(&self) {
        let conn = self.conn();
        let r: Result<(i64, i64, i64), _> =
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            });
        match r {
            Ok((0, _, _)) => {}
            Ok(_) => tracing::debug!("WAL checkpoint incomplete: a reader was active"),
            Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed"),
        }
    }

    /// Every identity, ordered by id.
    pub fn list(&self) -> Result<Vec<IdentityRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, generation, created, last_seen, revoked, mode FROM identities ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(IdentityRow {
                id: r.get(0)?,
                generation: r.get::<_, i64>(1)? as u64,
                created: r.get(2)?,
                last_seen: r.get(3)?,
                revoked: r.get(4)?,
                mode: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Number of identities.
    pub fn count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM identities", [], |r| r.get(0))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(matches!(e, StoreError::TooNew { found: 2, .. }), "{e}");
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
