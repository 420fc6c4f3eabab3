//! The identity store: SQLite (WAL, full durability), one row per identity.
//!
//! Identity keys are stored wrapped: `stored = k XOR HKDF(store_key, "tally store wrap" ‖ id)`,
//! with the store key kept outside the database (spec 13.9), so a copy of the database
//! alone reveals no key. Sequence state is never stored: it belongs to live sessions.
//!
//! Every method blocks; async callers run them on `spawn_blocking`. The database can be
//! opened by the daemon and by admin commands at the same time.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hkdf::Hkdf;
use rusqlite::{params, Connection, ErrorCode, OptionalExtension};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::proto::frame::{EnrollMode, Id};
use crate::proto::SecretKey;

/// File name of the database in the state directory.
pub const DB_FILE: &str = "identities.db";

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
    /// SQLite failed.
    #[error("identity store: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// One identity, as listed for the operator (no key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRow {
    /// The identity.
    pub id: String,
    /// Enrollment time (seconds since the Unix epoch).
    pub created: i64,
    /// Last successful session handshake, if any.
    pub last_seen: Option<i64>,
    /// Revocation time, if revoked.
    pub revoked: Option<i64>,
    /// `open` or `token`.
    pub mode: String,
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The identity store.
pub struct Store {
    /// Commits are durable before they return (enrollment, revocation).
    conn: Mutex<Connection>,
    /// For bookkeeping that may be lost in a crash (`last_seen`): no fsync per commit.
    relaxed: Mutex<Connection>,
    store_key: SecretKey,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(..)")
    }
}

impl Store {
    /// Opens (and creates, if needed) the database at `path`.
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
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // An enrollment is confirmed only after its commit is durable (spec 6.2 step 4).
        conn.pragma_update(None, "synchronous", "FULL")?;
        let relaxed = Connection::open(path)?;
        relaxed.busy_timeout(Duration::from_secs(5))?;
        relaxed.pragma_update(None, "synchronous", "NORMAL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS identities (
                 id        TEXT PRIMARY KEY NOT NULL,
                 key       BLOB NOT NULL,
                 created   INTEGER NOT NULL,
                 last_seen INTEGER,
                 revoked   INTEGER,
                 mode      TEXT NOT NULL
             ) STRICT;",
        )?;
        #[cfg(unix)]
        for suffix in ["", "-wal", "-shm"] {
            // Databases made by earlier versions, or with a looser umask.
            use std::os::unix::fs::PermissionsExt;
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            let _ = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600));
        }
        Ok(Store {
            conn: Mutex::new(conn),
            relaxed: Mutex::new(relaxed),
            store_key,
        })
    }

    fn wrap(&self, id: &str, key: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        let mut pad = Zeroizing::new([0u8; 32]);
        Hkdf::<Sha256>::new(None, self.store_key.expose())
            .expand_multi_info(&[b"tally store wrap", id.as_bytes()], pad.as_mut())
            .expect("32 bytes is a valid length");
        let mut out = Zeroizing::new([0u8; 32]);
        for i in 0..32 {
            out[i] = key[i] ^ pad[i];
        }
        out
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a new identity in one transaction that fails if it exists. Returns once
    /// the commit is durable.
    pub fn insert(&self, id: &Id, key: &SecretKey, mode: EnrollMode) -> Result<(), StoreError> {
        let wrapped = self.wrap(id.as_str(), key.expose());
        let res = self.conn().execute(
            "INSERT INTO identities (id, key, created, mode) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), &wrapped[..], now(), mode.as_str()],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == ErrorCode::ConstraintViolation =>
            {
                Err(StoreError::Taken(id.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The key of a usable identity: `None` if it is unknown or revoked.
    pub fn key(&self, id: &Id) -> Result<Option<SecretKey>, StoreError> {
        let row: Option<(Vec<u8>, Option<i64>)> = self
            .conn()
            .query_row(
                "SELECT key, revoked FROM identities WHERE id = ?1",
                [id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        // The unwrap runs for unknown and revoked identities too, on a filler, so that
        // the work does not depend on whether the identity exists (spec 7.5).
        let usable = matches!(&row, Some((w, None)) if w.len() == 32);
        let wrapped: Zeroizing<[u8; 32]> = Zeroizing::new(match &row {
            Some((w, _)) if w.len() == 32 => w[..].try_into().expect("32 bytes"),
            _ => [0; 32],
        });
        let key = SecretKey::from_bytes(*self.wrap(id.as_str(), &wrapped));
        Ok(usable.then_some(key))
    }

    /// Whether the identity exists and is not revoked: the re-check after a handshake,
    /// for a revocation that raced with it. A read; no write.
    pub fn is_usable(&self, id: &Id) -> Result<bool, StoreError> {
        Ok(self
            .relaxed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM identities WHERE id = ?1 AND revoked IS NULL)",
                [id.as_str()],
                |r| r.get(0),
            )?)
    }

    /// Records the last successful handshake of several identities in one transaction
    /// (the daemon batches them; losing a batch in a crash loses only bookkeeping).
    pub fn touch_many(&self, seen: &[(Id, i64)]) -> Result<(), StoreError> {
        let mut conn = self.relaxed.lock().unwrap_or_else(|e| e.into_inner());
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

    /// Revokes an identity. Returns false if it was already revoked.
    pub fn revoke(&self, id: &str) -> Result<bool, StoreError> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE identities SET revoked = ?2 WHERE id = ?1 AND revoked IS NULL",
            params![id, now()],
        )?;
        if n == 1 {
            return Ok(true);
        }
        let exists: bool = conn.query_row(
            "SELECT EXISTS(SELECT 1 FROM identities WHERE id = ?1)",
            [id],
            |r| r.get(0),
        )?;
        if exists {
            Ok(false)
        } else {
            Err(StoreError::NotFound(id.to_owned()))
        }
    }

    /// Deletes an identity, so that its id can be enrolled again. Returns false if there
    /// was none.
    pub fn remove(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM identities WHERE id = ?1", [id])?
            == 1)
    }

    /// Every identity, ordered by id.
    pub fn list(&self) -> Result<Vec<IdentityRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id, created, last_seen, revoked, mode FROM identities ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(IdentityRow {
                id: r.get(0)?,
                created: r.get(1)?,
                last_seen: r.get(2)?,
                revoked: r.get(3)?,
                mode: r.get(4)?,
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

    #[test]
    fn insert_lookup_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let id = Id::new("dev").unwrap();
        s.insert(&id, &SecretKey::from_bytes([1; 32]), EnrollMode::Token)
            .unwrap();
        assert!(matches!(
            s.insert(&id, &SecretKey::from_bytes([2; 32]), EnrollMode::Open),
            Err(StoreError::Taken(_))
        ));
        assert_eq!(s.key(&id).unwrap().unwrap().expose(), &[1; 32]);
        assert!(s.key(&Id::new("nope").unwrap()).unwrap().is_none());
        assert!(s.is_usable(&id).unwrap());
        s.touch_many(&[(id.clone(), 1_795_000_000)]).unwrap();
        assert!(s.revoke("dev").unwrap());
        assert!(!s.is_usable(&id).unwrap());
        assert!(s.key(&id).unwrap().is_none());
        assert!(s.remove("dev").unwrap());
        assert!(!s.remove("dev").unwrap());
        s.insert(&id, &SecretKey::from_bytes([3; 32]), EnrollMode::Token)
            .unwrap();
        assert_eq!(
            s.key(&id).unwrap().unwrap().expose(),
            &[3; 32],
            "a removed id can be enrolled again"
        );
        assert!(s.is_usable(&id).unwrap());
        s.touch_many(&[(id.clone(), 1_795_000_001)]).unwrap();
        s.revoke("dev").unwrap();
        assert!(!s.revoke("dev").unwrap());
        assert!(matches!(s.revoke("nope"), Err(StoreError::NotFound(_))));
        assert!(s.key(&id).unwrap().is_none());
        let rows = s.list().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].mode, "token");
        assert_eq!(rows[0].last_seen, Some(1_795_000_001));
        assert!(rows[0].revoked.is_some());
        assert!(!s.is_usable(&Id::new("nope").unwrap()).unwrap());
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
    fn keys_are_not_stored_in_the_clear_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let id = Id::new("dev").unwrap();
        store(dir.path())
            .insert(&id, &SecretKey::from_bytes([0x5a; 32]), EnrollMode::Open)
            .unwrap();
        let raw: Vec<u8> = Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .query_row("SELECT key FROM identities", [], |r| r.get(0))
            .unwrap();
        assert_ne!(raw, vec![0x5a; 32]);
        assert_eq!(
            store(dir.path()).key(&id).unwrap().unwrap().expose(),
            &[0x5a; 32]
        );
        // The wrong store key yields a different (useless) key, not the real one.
        let other = Store::open(&dir.path().join(DB_FILE), SecretKey::from_bytes([8; 32])).unwrap();
        assert_ne!(other.key(&id).unwrap().unwrap().expose(), &[0x5a; 32]);
    }
}
