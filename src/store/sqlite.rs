//! The embedded store: one SQLite file (WAL, full durability, `secure_delete`),
//! versioned schema (`PRAGMA user_version`).
//!
//! Deleted and overwritten secrets are zeroed in the file (`secure_delete`), and the WAL
//! is checkpointed and truncated after a revocation or removal ([`Engine::scrub`]), so
//! the old page images do not linger there either. The database can be opened by the
//! daemon and by admin commands at the same time.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::{Engine, IdentityRow, KeyRow, SealedRow, StoreError, TokenRow, SCHEMA_VERSION};
use crate::proto::frame::{EnrollMode, Id};

/// The migrations: `MIGRATIONS[n]` takes a database from version `n` to `n + 1`.
/// Version 0 is an empty database.
const MIGRATIONS: &[&str] = &[
    "
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
",
    "
    -- The durable queue (store::queue, spec 8.8): each enrollment numbers its messages.
    ALTER TABLE identities ADD COLUMN next_msg_id INTEGER NOT NULL DEFAULT 1;
    -- What each enrollment has queued, kept by the triggers below: the bounds are
    -- checked in O(1), not by reading every payload.
    ALTER TABLE identities ADD COLUMN queued_messages INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE identities ADD COLUMN queued_bytes INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE queue (
        generation INTEGER NOT NULL,   -- the enrollment it is for
        msg_id     INTEGER NOT NULL,
        kind       INTEGER NOT NULL,   -- 1 request, 2 message (spec 4.5)
        payload    BLOB NOT NULL,
        queued     INTEGER NOT NULL,   -- Unix milliseconds
        expires    INTEGER NOT NULL,   -- Unix milliseconds
        origin     INTEGER NOT NULL,   -- 0 control socket, 1 backend
        delivered  INTEGER NOT NULL DEFAULT 0,   -- times sent in a DELIVER
        PRIMARY KEY (generation, msg_id)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX queue_expires ON queue (expires);
    CREATE TRIGGER queue_added AFTER INSERT ON queue BEGIN
        UPDATE identities SET queued_messages = queued_messages + 1,
                              queued_bytes = queued_bytes + length(NEW.payload)
        WHERE generation = NEW.generation;
    END;
    CREATE TRIGGER queue_removed AFTER DELETE ON queue BEGIN
        UPDATE identities SET queued_messages = queued_messages - 1,
                              queued_bytes = queued_bytes - length(OLD.payload)
        WHERE generation = OLD.generation;
    END;
",
];

/// The SQLite engine.
pub struct Sqlite {
    /// Commits are durable before they return (enrollment, revocation).
    conn: Mutex<Connection>,
    /// For bookkeeping that may be lost in a crash (`last_seen`) and for reads, so they
    /// never queue behind a durable write.
    relaxed: Mutex<Connection>,
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
            place: path.display().to_string(),
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

fn open_key_row(conn: &Connection) -> Result<Option<SealedRow>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT value, updated FROM settings WHERE name = 'open_key'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

fn put_open_key(conn: &Connection, sealed: &[u8], updated: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT OR REPLACE INTO settings (name, value, updated) VALUES ('open_key', ?1, ?2)",
        params![sealed, updated],
    )?;
    Ok(())
}

impl Sqlite {
    /// Opens (and creates, or migrates, if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Sqlite, StoreError> {
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
        Ok(Sqlite {
            conn: Mutex::new(conn),
            relaxed: Mutex::new(relaxed),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn relaxed(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.relaxed.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Engine for Sqlite {
    fn init(
        &self,
        decoy: &dyn Fn() -> Vec<u8>,
        open: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<(Vec<u8>, SealedRow), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found: Option<Vec<u8>> = tx
            .query_row("SELECT key FROM decoy WHERE generation = 0", [], |r| {
                r.get(0)
            })
            .optional()?;
        let decoy = match found {
            Some(sealed) => sealed,
            None => {
                let sealed = decoy();
                tx.execute(
                    "INSERT INTO decoy (generation, key) VALUES (0, ?1)",
                    [&sealed],
                )?;
                sealed
            }
        };
        let open = match open_key_row(&tx)? {
            Some(row) => row,
            None => {
                let at = super::now();
                let sealed = open(at);
                put_open_key(&tx, &sealed, at)?;
                (sealed, at)
            }
        };
        tx.commit()?;
        Ok((decoy, open))
    }

    fn open_key(&self) -> Result<Option<SealedRow>, StoreError> {
        open_key_row(&self.relaxed())
    }

    fn put_open_key(&self, sealed: &[u8], updated: i64) -> Result<(), StoreError> {
        put_open_key(&self.conn(), sealed, updated)
    }

    fn issue_token(
        &self,
        id: &Id,
        sealed: &[u8],
        issued: i64,
        expires: i64,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if is_enrolled(&tx, id.as_str())? {
            return Err(StoreError::Taken(id.clone()));
        }
        tx.execute(
            "INSERT OR REPLACE INTO tokens (id, secret, issued, expires) VALUES (?1, ?2, ?3, ?4)",
            params![id.as_str(), sealed, issued, expires],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("DELETE FROM tokens WHERE id = ?1", [id])?;
        Ok(n == 1)
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
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

    fn enroll_lookup(&self, id: &str) -> Result<(bool, Option<SealedRow>), StoreError> {
        let conn = self.relaxed();
        let enrolled = is_enrolled(&conn, id)?;
        let token = conn
            .prepare_cached("SELECT secret, expires FROM tokens WHERE id = ?1")?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok((enrolled, token))
    }

    fn insert(
        &self,
        id: &Id,
        mode: EnrollMode,
        token: Option<&[u8]>,
        at: i64,
        seal: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<(i64, Vec<u8>), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(token) = token {
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
        let sealed = seal(generation);
        tx.execute(
            "UPDATE identities SET key = ?2 WHERE generation = ?1",
            params![generation, sealed],
        )?;
        tx.commit()?;
        Ok((generation, sealed))
    }

    fn key(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        Ok(self
            .relaxed()
            .prepare_cached(
                "SELECT generation, key FROM identities \
                 WHERE id = ?1 AND revoked IS NULL AND key IS NOT NULL",
            )?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?)
    }

    fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        // On the durable connection: no write of this process runs while it reads.
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, generation, key FROM identities WHERE revoked IS NULL AND key IS NOT NULL",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn touch_many(&self, seen: &[(Id, i64)]) -> Result<(), StoreError> {
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

    fn revoke(&self, id: &str, at: i64) -> Result<Option<bool>, StoreError> {
        let conn = self.conn();
        let n = conn.execute(
            "UPDATE identities SET revoked = ?2, key = NULL WHERE id = ?1 AND revoked IS NULL",
            params![id, at],
        )?;
        if n == 1 {
            return Ok(Some(true));
        }
        Ok(is_enrolled(&conn, id)?.then_some(false))
    }

    fn remove(&self, id: &str) -> Result<bool, StoreError> {
        // Its queued messages stay until the daemon withdraws them and tells their
        // senders (store::queue: a removed enrollment's queue is never delivered).
        let n = self
            .conn()
            .execute("DELETE FROM identities WHERE id = ?1", [id])?;
        Ok(n == 1)
    }

    fn list(&self) -> Result<Vec<IdentityRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id, generation, created, last_seen, revoked, mode,
                    queued_messages
             FROM identities ORDER BY id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(IdentityRow {
                id: r.get(0)?,
                generation: r.get::<_, i64>(1)? as u64,
                created: r.get(2)?,
                last_seen: r.get(3)?,
                revoked: r.get(4)?,
                mode: r.get(5)?,
                queued: r.get::<_, i64>(6)? as u64,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM identities", [], |r| r.get(0))?)
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
}
