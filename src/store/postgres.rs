//! The shared store: PostgreSQL, for several daemons serving one fleet (docs/CLUSTER.md).
//!
//! The same identities, tokens and sealed values as the SQLite store, plus the fleet's
//! tables (`nodes`, `sessions`, `sends`, unlogged: they describe live connections, which
//! do not outlive a crash of the database either) and the claim function that keeps one
//! live session per identity across daemons. Every change to an identity is announced
//! with `NOTIFY tally_identity` in its own transaction, so that every daemon's key index
//! follows it once it commits.
//!
//! The driver is `tokio-postgres`, pooled by `deadpool-postgres`, on a runtime of its own
//! (one worker thread): [`Engine`]'s blocking methods wait for it from any thread, and
//! the fleet's async calls ([`Postgres::spawn`]) run there, whichever runtime asks.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use postgres_openssl::MakeTlsConnector;

use super::pgconf::{self, PasswordSources, TlsSettings};
use super::{
    redacted, Engine, FleetLogRow, IdentityRow, KeyRow, Logged, SealedRow, StoreError, TokenRow,
    SCHEMA_VERSION,
};
use crate::proto::frame::{EnrollMode, Id};

/// Connections in the pool of one daemon.
pub const POOL_SIZE: usize = 16;

/// How long a pool waits for a connection to the database before an operation fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest any statement may run (`statement_timeout`, set on every connection
/// unless the URL's `options` set one): a database that hangs fails the operation, it
/// does not hold a handshake, a notice or a lock for ever. Reading every key (a start,
/// a reload) and migrations are allowed [`LONG_STATEMENT_TIMEOUT`].
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
/// See [`STATEMENT_TIMEOUT`].
pub const LONG_STATEMENT_TIMEOUT: Duration = Duration::from_secs(300);

/// TCP keepalives on every connection: a database host that is gone without a word is
/// noticed in about [`KEEPALIVE_IDLE`] + 3 × [`KEEPALIVE_INTERVAL`], not hours later.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
/// See [`KEEPALIVE_IDLE`].
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);

/// Channels the daemons `LISTEN` on.
pub mod channel {
    /// `enrolled <id>`, `revoked <id>`, `removed <id>`, `setting <name>`: a hint to read
    /// the fleet's log and the identity's row again.
    pub const IDENTITY: &str = "tally_identity";
    /// `<old node> <old epoch> <new node> <new epoch> <tag> <id>`: a takeover, tagged by
    /// the node that took over (`server::fleet::Takeover`).
    pub const CLOSE: &str = "tally_close";
    /// `<node> <call>`: a send for a device whose session the node holds.
    pub const SEND: &str = "tally_send";
    /// `<node> <call>`: the answer to the node's send is in `sends`.
    pub const RESULT: &str = "tally_result";
    /// `<id>`: a message was queued for the identity (a hint: the node holding its
    /// session reads the queue, whose rows are tagged).
    pub const QUEUED: &str = "tally_queued";
    /// `<node>`: outcomes of messages the node queued wait in `queue_outcomes`.
    pub const OUTCOME: &str = "tally_outcome";
}

/// The migrations: `MIGRATIONS[n]` takes a database from version `n` to `n + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
    CREATE TABLE identities (
        generation bigint PRIMARY KEY,
        id         text NOT NULL UNIQUE,
        key        bytea,              -- sealed k; NULL once revoked
        created    bigint NOT NULL,
        last_seen  bigint,
        revoked    bigint,
        mode       text NOT NULL
    );
    -- Generations are never reused, removed rows' included.
    CREATE SEQUENCE generations;
    CREATE TABLE tokens (
        id      text PRIMARY KEY,
        secret  bytea NOT NULL,
        issued  bigint NOT NULL,
        expires bigint NOT NULL
    );
    CREATE TABLE settings (
        name    text PRIMARY KEY,
        value   bytea NOT NULL,
        updated bigint NOT NULL
    );
    CREATE TABLE decoy (
        generation bigint PRIMARY KEY,
        key        bytea NOT NULL
    );
    -- The fleet's log: every revocation and removal, and every change of a fleet-wide
    -- setting, in order, each tagged under the fleet key (which the database never
    -- sees). A node never uses a key row of a generation this log ends, even if a writer
    -- restores the row, and notices a deleted entry (a gap, or a log shorter than the
    -- node has seen: its state directory keeps the count).
    CREATE TABLE fleet_log (
        seq        bigint PRIMARY KEY,
        id         text NOT NULL,
        value      bigint NOT NULL,
        kind       text NOT NULL,
        at         bigint NOT NULL,
        tag        bytea NOT NULL
    );
    -- The daemons of the fleet, alive while their heartbeat is fresh.
    -- Each node's acknowledgement of the fleet's log (the entries it verified, the last
    -- one's tag), tagged under the fleet key: a node that sees another ahead of what it
    -- can read knows entries are hidden from it.
    CREATE UNLOGGED TABLE nodes (
        node      text PRIMARY KEY,
        addr      text NOT NULL,
        started   timestamptz NOT NULL DEFAULT clock_timestamp(),
        heartbeat timestamptz NOT NULL DEFAULT clock_timestamp(),
        log_seen  bigint NOT NULL DEFAULT 0,
        log_head  bytea,
        log_tag   bytea
    );
    -- Claim epochs, fleet-wide: a claim's epoch is greater than every earlier claim's of
    -- any identity, even after its row was deleted (a late tally_close names an epoch
    -- no later session can have).
    CREATE SEQUENCE tally_epochs;
    -- One claim per identity: the node holding its live session, and the claim's epoch.
    CREATE UNLOGGED TABLE sessions (
        id            text PRIMARY KEY,
        node          text NOT NULL REFERENCES nodes ON DELETE CASCADE,
        epoch         bigint NOT NULL,
        since         timestamptz NOT NULL,
        peer          text NOT NULL,
        takeovers     integer NOT NULL DEFAULT 0,
        last_takeover timestamptz,
        -- The node's batch (server::fleet::node) that made the claim: a release of
        -- every claim of an id by a later batch never deletes a claim made after it,
        -- even when it runs late.
        batch         bigint NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_node ON sessions (node);
    -- Server-initiated requests and messages on their way to another node, and back.
    -- Each send is tagged under the fleet key by its origin, bound to the session (the
    -- claim's epoch) it is for; each answer by the node that served it.
    CREATE UNLOGGED TABLE sends (
        call       bigint PRIMARY KEY,
        node       text NOT NULL,
        origin     text NOT NULL,
        id         text NOT NULL,
        epoch      bigint NOT NULL,
        request    boolean NOT NULL,
        payload    bytea NOT NULL,
        timeout_ms bigint NOT NULL,
        stamp      bigint NOT NULL,
        tag        bytea NOT NULL,
        created    timestamptz NOT NULL DEFAULT clock_timestamp(),
        done       boolean NOT NULL DEFAULT false,
        status     integer,
        answer     bytea,
        error      text,
        answer_tag bytea
    );
    -- A node's batch of claim work in one statement (group commit: every claim and
    -- release of its handshakes of a round trip; server::fleet::node). First it deletes
    -- its claims of the sessions that ended (`rel_ids` with `rel_epochs`: a release
    -- names its epoch, and never deletes a newer claim), and every claim it holds of
    -- `all_ids` made by an earlier batch than `p_batch` (claims whose answer never came).
    -- Then it claims `ids` in order for sessions from `peers` (spec 7.3 across the
    -- fleet), one row each: the holder of an id, if any, is live if its node's
    -- heartbeat is younger than `p_stale_ms` (or, for `p_node` itself, if `self_live`
    -- says a session of it is live there). A live holder refuses with `p_reject`; else
    -- it is taken over: the epoch grows (the taking node tells the old one on
    -- tally_close, with a tag under the fleet key, in its next batch). A dead holder's
    -- claim is taken without a word. Each row: the outcome (claimed, took_over,
    -- refused), the new epoch, the takeovers in a row (each within 60 s of the last),
    -- and the old holder, its peer and its epoch. Last, it announces `notices` on
    -- tally_close (delivered when the statement commits). Row by row, by the primary
    -- key (the batches are small; a set-based DELETE was planned as a scan).
    CREATE FUNCTION tally_claims(p_node text, p_reject boolean, p_stale_ms bigint,
                                 p_batch bigint, rel_ids text[], rel_epochs bigint[],
                                 all_ids text[], ids text[], peers text[],
                                 self_live boolean[], notices text[])
    RETURNS TABLE (outcome text, new_epoch bigint, in_a_row integer, old_node text,
                   old_peer text, old_epoch bigint)
    LANGUAGE plpgsql AS $$
    #variable_conflict use_column
    DECLARE
        i integer;
        cur sessions%ROWTYPE;
        inserted boolean;
        live boolean;
        n integer;
        e bigint;
    BEGIN
        FOR i IN 1 .. cardinality(rel_ids) LOOP
            DELETE FROM sessions s
              WHERE s.id = rel_ids[i] AND s.node = p_node AND s.epoch = rel_epochs[i];
        END LOOP;
        FOR i IN 1 .. cardinality(all_ids) LOOP
            DELETE FROM sessions s
              WHERE s.id = all_ids[i] AND s.node = p_node AND s.batch < p_batch;
        END LOOP;
        FOR i IN 1 .. cardinality(ids) LOOP
            inserted := false;
            LOOP
                SELECT * INTO cur FROM sessions s WHERE s.id = ids[i] FOR UPDATE;
                EXIT WHEN FOUND;
                INSERT INTO sessions (id, node, epoch, since, peer, batch)
                    VALUES (ids[i], p_node, nextval('tally_epochs'), now(), peers[i], p_batch)
                    ON CONFLICT (id) DO NOTHING RETURNING epoch INTO e;
                IF FOUND THEN
                    inserted := true;
                    EXIT;
                END IF;
            END LOOP;
            IF inserted THEN
                outcome := 'claimed'; new_epoch := e; in_a_row := 0;
                old_node := NULL; old_peer := NULL; old_epoch := NULL;
                RETURN NEXT;
                CONTINUE;
            END IF;
            IF cur.node = p_node THEN
                live := self_live[i];
            ELSE
                SELECT x.heartbeat > clock_timestamp() - p_stale_ms * interval '1 millisecond'
                  INTO live FROM nodes x WHERE x.node = cur.node;
                live := coalesce(live, false);
            END IF;
            IF live AND p_reject THEN
                outcome := 'refused'; new_epoch := cur.epoch; in_a_row := cur.takeovers;
                old_node := cur.node; old_peer := cur.peer; old_epoch := cur.epoch;
                RETURN NEXT;
                CONTINUE;
            END IF;
            n := CASE WHEN NOT live THEN 0
                      WHEN cur.last_takeover > clock_timestamp() - interval '60 seconds'
                          THEN cur.takeovers + 1
                      ELSE 1 END;
            UPDATE sessions s SET node = p_node, epoch = nextval('tally_epochs'),
                since = now(), peer = peers[i], takeovers = n, batch = p_batch,
                last_takeover = CASE WHEN live THEN clock_timestamp() ELSE cur.last_takeover END
              WHERE s.id = ids[i] RETURNING s.epoch INTO e;
            outcome := CASE WHEN live THEN 'took_over' ELSE 'claimed' END;
            new_epoch := e; in_a_row := n;
            old_node := cur.node; old_peer := cur.peer; old_epoch := cur.epoch;
            RETURN NEXT;
        END LOOP;
        IF cardinality(notices) > 0 THEN
            PERFORM pg_notify('tally_close', x) FROM unnest(notices) AS x;
        END IF;
    END $$;
"#,
    r#"
    -- The durable queue (store::queue, spec 8.8): each enrollment numbers its messages.
    ALTER TABLE identities ADD COLUMN next_msg_id bigint NOT NULL DEFAULT 1;
    ALTER TABLE identities ADD COLUMN queued_messages bigint NOT NULL DEFAULT 0;
    ALTER TABLE identities ADD COLUMN queued_bytes bigint NOT NULL DEFAULT 0;
    CREATE TABLE queue (
        generation bigint NOT NULL,
        msg_id     bigint NOT NULL,
        id         text NOT NULL,
        kind       smallint NOT NULL,
        payload    bytea NOT NULL,
        digest     bytea NOT NULL,     -- SHA-256 of the payload, under the tag
        queued     bigint NOT NULL,
        expires    bigint NOT NULL,
        origin     smallint NOT NULL,
        delivered  integer NOT NULL DEFAULT 0,
        -- The node it was queued on (where its outcome is reported), and the fleet
        -- key's tag over the row (store::queue::postgres): a row no node wrote is never
        -- delivered.
        node       text NOT NULL,
        tag        bytea NOT NULL,
        PRIMARY KEY (generation, msg_id)
    );
    CREATE INDEX queue_expires ON queue (expires);
    -- Each enrollment's count and bytes, kept in its row: the bound check reads one row.
    CREATE FUNCTION tally_queue_count() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            UPDATE identities SET queued_messages = queued_messages + 1,
                                  queued_bytes = queued_bytes + octet_length(NEW.payload)
             WHERE generation = NEW.generation;
            RETURN NEW;
        END IF;
        UPDATE identities SET queued_messages = queued_messages - 1,
                              queued_bytes = queued_bytes - octet_length(OLD.payload)
         WHERE generation = OLD.generation;
        RETURN OLD;
    END $$;
    CREATE TRIGGER queue_count AFTER INSERT OR DELETE ON queue
        FOR EACH ROW EXECUTE FUNCTION tally_queue_count();
    -- Outcomes of queued messages on their way to the node that queued them, each
    -- tagged under the fleet key by the node that saw it.
    CREATE TABLE queue_outcomes (
        node       text NOT NULL,
        generation bigint NOT NULL,
        msg_id     bigint NOT NULL,
        id         text NOT NULL,
        origin     smallint NOT NULL,
        code       smallint NOT NULL,
        status     integer NOT NULL,
        payload    bytea NOT NULL,
        tag        bytea NOT NULL,
        created    timestamptz NOT NULL DEFAULT clock_timestamp(),
        PRIMARY KEY (node, generation, msg_id)
    );
"#,
];

/// Runs `body` in one transaction on a pooled connection, from any thread: `$tx` is the
/// transaction, `$e` maps a driver error to a [`StoreError`]. An early `return` in
/// `body` still commits (what ran before it is kept; after a failed statement the
/// database rolls it all back).
macro_rules! transaction {
    ($pg:expr, |$tx:ident, $e:ident| $body:block) => {{
        let pg = $pg;
        pg.block_on(async {
            let $e = |e: tokio_postgres::Error| pg.error(e);
            let mut client = pg.client().await?;
            let $tx = client.transaction().await.map_err($e)?;
            let out: Result<_, StoreError> = async $body.await;
            let out = out?;
            $tx.commit().await.map_err($e)?;
            Ok::<_, StoreError>(out)
        })
    }};
}

/// The PostgreSQL engine: a handle (clones share one pool, runtime and counter): the
/// store's identity engine, and the fleet's statements (`server::fleet::db`), on one
/// database.
#[derive(Clone)]
pub struct Postgres(Arc<Shared>);

struct Shared {
    pool: Pool,
    config: tokio_postgres::Config,
    /// Its own runtime; shut down in the background when the store is dropped.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    place: String,
    /// Statements sent to the database, for the benchmarks' "queries per handshake".
    queries: AtomicU64,
    /// The TLS of every connection (`sslmode`...), and its settings for error messages.
    tls: MakeTlsConnector,
    tls_settings: TlsSettings,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Postgres({})", self.0.place)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// The rows of `fleet_log` its readers read: a row of a size no node writes is not one
/// (a gap, which stops the log), and is not counted by the appenders either.
const LOG_ROW: &str =
    "octet_length(id) <= 255 AND octet_length(kind) <= 32 AND octet_length(tag) = 32";

/// Locks `fleet_log` in `mode` (`EXCLUSIVE` to append, `SHARE` to enroll: no append
/// meanwhile) and returns the number of its last entry (0: none).
async fn lock_log_end(
    tx: &tokio_postgres::Transaction<'_>,
    mode: &str,
) -> Result<i64, tokio_postgres::Error> {
    tx.batch_execute(&format!("LOCK TABLE fleet_log IN {mode} MODE"))
        .await?;
    tx.query_one(
        &format!("SELECT coalesce(max(seq), 0) FROM fleet_log WHERE {LOG_ROW}"),
        &[],
    )
    .await?
    .try_get(0)
}

/// Appends `entry` to the fleet's log in `tx`, if the log's last entry is the one
/// before it: the table is locked first (entries commit in the order of their numbers),
/// and the entry is announced on `tally_identity` (`kind id`) at the commit.
/// [`Logged::Moved`] if the log holds more (another node appended: read, try again); an
/// error if it holds fewer than the node verified (rolled back).
async fn log_entry(
    tx: &tokio_postgres::Transaction<'_>,
    entry: &FleetLogRow,
    place: &str,
) -> Result<Logged<()>, StoreError> {
    let e = |e: tokio_postgres::Error| StoreError::Postgres {
        place: place.to_owned(),
        message: e.to_string(),
    };
    let last = lock_log_end(tx, "EXCLUSIVE").await.map_err(e)?;
    if last >= entry.seq {
        return Ok(Logged::Moved);
    }
    if last < entry.seq - 1 {
        return Err(StoreError::FleetLogDamaged(format!(
            "it ends at entry {last}, but this node verified {} entries: deleted, or rolled back",
            entry.seq - 1
        )));
    }
    let inserted = tx
        .execute(
            "INSERT INTO fleet_log (seq, id, value, kind, at, tag) VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &entry.seq,
                &entry.id,
                &entry.value,
                &entry.kind,
                &entry.at,
                &entry.tag,
            ],
        )
        .await
        .map_err(e)?;
    if inserted != 1 {
        return Err(StoreError::FleetLogDamaged(
            "the table did not take the entry written (a rule or a trigger of a database writer?)"
                .into(),
        ));
    }
    tx.execute(
        "SELECT pg_notify('tally_identity', $1 || ' ' || $2)",
        &[&entry.kind, &entry.id],
    )
    .await
    .map_err(e)?;
    Ok(Logged::Appended(()))
}

impl Postgres {
    /// Connects to the database at `url` and brings its schema to [`SCHEMA_VERSION`].
    /// TLS as its `sslmode` says, the password from the URL or `passwords` ([`pgconf`]).
    pub fn connect(url: &str, passwords: PasswordSources<'_>) -> Result<Postgres, StoreError> {
        let place = redacted(url);
        let fail = |message: String| StoreError::Postgres {
            place: place.clone(),
            message,
        };
        let settings = pgconf::Settings::parse(url).map_err(|e| fail(e.to_string()))?;
        let tls_settings = settings.tls;
        let mut config = settings.config;
        let source = pgconf::resolve_password(
            &mut config,
            passwords,
            &|name| std::env::var_os(name),
            &|warning| tracing::warn!("{warning}"),
        )
        .map_err(|e| fail(e.to_string()))?;
        tracing::info!(store = %place, password = %source, sslmode = %tls_settings.mode, "connecting to the fleet's database");
        let tls = tls_settings.connector().map_err(|e| fail(e.to_string()))?;
        if config.get_application_name().is_none() {
            config.application_name("tallyd");
        }
        config
            .connect_timeout(CONNECT_TIMEOUT)
            .keepalives(true)
            .keepalives_idle(KEEPALIVE_IDLE)
            .keepalives_interval(KEEPALIVE_INTERVAL)
            .keepalives_retries(3)
            .tcp_user_timeout(KEEPALIVE_IDLE + 3 * KEEPALIVE_INTERVAL);
        let options = config.get_options().unwrap_or_default();
        if !options.contains("statement_timeout") {
            let options = format!(
                "{options} -c statement_timeout={}",
                STATEMENT_TIMEOUT.as_millis()
            );
            config.options(options.trim_start());
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tally-postgres")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start its runtime: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let pg = Postgres(Arc::new(Shared {
            pool,
            config,
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            place,
            queries: AtomicU64::new(0),
            tls,
            tls_settings,
        }));
        pg.block_on(pg.migrate())?;
        Ok(pg)
    }

    /// The database, without its password.
    pub fn place(&self) -> &str {
        &self.0.place
    }

    /// The connection settings (for the fleet's `LISTEN` connection).
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.0.config
    }

    /// The TLS connector of every connection (for the fleet's `LISTEN` connection).
    pub fn tls(&self) -> MakeTlsConnector {
        self.0.tls.clone()
    }

    /// Statements sent so far.
    pub fn queries(&self) -> u64 {
        self.0.queries.load(Ordering::Relaxed)
    }

    /// Counts `n` statements.
    pub fn count_queries(&self, n: u64) {
        self.0.queries.fetch_add(n, Ordering::Relaxed);
    }

    /// An error of this database.
    pub fn error(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Postgres {
            place: self.0.place.clone(),
            message: self.0.tls_settings.explain(e.to_string()),
        }
    }

    /// An error of this database with its causes, which the driver's own message leaves
    /// out ("error performing TLS handshake", "db error"): for connecting.
    pub fn error_chain(&self, e: &(dyn std::error::Error + 'static)) -> StoreError {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            let text = cause.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            source = cause.source();
        }
        self.error(message)
    }

    /// Runs `f` on the store's runtime (for async callers on any runtime).
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.handle.spawn(f)
    }

    /// Waits for `f`, run on the store's own runtime, from any thread. A plain thread
    /// (a blocking-pool thread: where the daemon calls the store from) just waits; a
    /// thread inside an async runtime (which may not block in place: a current-thread
    /// runtime cannot) waits on a thread of its own, so that no runtime's worker ever
    /// blocks on another runtime.
    pub fn block_on<T: Send>(&self, f: impl Future<Output = T> + Send) -> T {
        if tokio::runtime::Handle::try_current().is_err() {
            return self.0.handle.block_on(f);
        }
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| self.0.handle.block_on(f));
            match waiter.join() {
                Ok(out) => out,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// A pooled connection.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.0.pool.get().await.map_err(|e| self.error_chain(&e))
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(|e| self.error(e))?;
        let e = |e| self.error(e);
        tx.batch_execute(&format!(
            "SET LOCAL statement_timeout = {}",
            LONG_STATEMENT_TIMEOUT.as_millis()
        ))
        .await
        .map_err(e)?;
        // `CREATE TABLE IF NOT EXISTS` of an existing table says so with a NOTICE, which
        // the driver logs at every start: not news.
        tx.batch_execute("SET LOCAL client_min_messages = warning")
            .await
            .map_err(e)?;
        // Daemons starting together migrate one at a time.
        tx.execute("SELECT pg_advisory_xact_lock(7420)", &[])
            .await
            .map_err(e)?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS tally_schema (version integer NOT NULL)")
            .await
            .map_err(e)?;
        let version: i32 = match tx
            .query_opt("SELECT version FROM tally_schema", &[])
            .await
            .map_err(e)?
        {
            Some(row) => row.try_get(0).map_err(e)?,
            None => {
                tx.execute("INSERT INTO tally_schema (version) VALUES (0)", &[])
                    .await
                    .map_err(e)?;
                0
            }
        };
        if version as u32 > SCHEMA_VERSION {
            return Err(StoreError::TooNew {
                place: self.0.place.clone(),
                found: version as u32,
            });
        }
        for (n, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).await.map_err(e)?;
            tx.execute("UPDATE tally_schema SET version = $1", &[&(n as i32 + 1)])
                .await
                .map_err(e)?;
        }
        tx.commit().await.map_err(e)?;
        Ok(())
    }

    /// Column `i` of a row: a column a database writer changed is an error that says
    /// so, never a panic.
    fn col<'a, T: tokio_postgres::types::FromSql<'a>>(
        &self,
        r: &'a tokio_postgres::Row,
        i: usize,
    ) -> Result<T, StoreError> {
        r.try_get(i).map_err(|e| {
            self.error(format!(
                "a row this tallyd cannot read (column {i}: {e}): the schema was changed in the database?"
            ))
        })
    }

    /// The one row a query of one row answered.
    fn one<'a>(
        &self,
        rows: &'a [tokio_postgres::Row],
    ) -> Result<&'a tokio_postgres::Row, StoreError> {
        rows.first()
            .ok_or_else(|| self.error("a query of one row answered none"))
    }

    /// One query of the identity store, outside a transaction.
    fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.count_queries(1);
        self.block_on(async {
            self.client()
                .await?
                .query(sql, params)
                .await
                .map_err(|e| self.error(e))
        })
    }
}

/// Whether a database error is the violation of a unique constraint.
fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

impl Engine for Postgres {
    fn init(
        &self,
        decoy: &dyn Fn() -> Vec<u8>,
        open: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<(Vec<u8>, SealedRow), StoreError> {
        // Sealed before the transaction: the closures are not `Send`.
        let new_decoy = decoy();
        let at = super::now();
        let new_open = open(at);
        self.count_queries(4);
        transaction!(self, |tx, e| {
            tx.execute(
                "INSERT INTO decoy (generation, key) VALUES (0, $1) ON CONFLICT DO NOTHING",
                &[&new_decoy],
            )
            .await
            .map_err(e)?;
            tx.execute(
                "INSERT INTO settings (name, value, updated) VALUES ('open_key', $1, $2) \
                     ON CONFLICT DO NOTHING",
                &[&new_open, &at],
            )
            .await
            .map_err(e)?;
            let d = tx
                .query_one("SELECT key FROM decoy WHERE generation = 0", &[])
                .await
                .map_err(e)?;
            let o = tx
                .query_one(
                    "SELECT value, updated FROM settings WHERE name = 'open_key'",
                    &[],
                )
                .await
                .map_err(e)?;
            Ok((
                d.try_get(0).map_err(e)?,
                (o.try_get(0).map_err(e)?, o.try_get(1).map_err(e)?),
            ))
        })
    }

    fn open_key(&self) -> Result<Option<SealedRow>, StoreError> {
        let rows = self.query(
            "SELECT value, updated FROM settings WHERE name = 'open_key'",
            &[],
        )?;
        rows.first()
            .map(|r| Ok((self.col(r, 0)?, self.col(r, 1)?)))
            .transpose()
    }

    fn put_open_key(&self, sealed: &[u8], updated: i64) -> Result<(), StoreError> {
        self.query(
            "INSERT INTO settings (name, value, updated) VALUES ('open_key', $1, $2) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated = excluded.updated",
            &[&sealed, &updated],
        )?;
        Ok(())
    }

    fn issue_token(
        &self,
        id: &Id,
        sealed: &[u8],
        issued: i64,
        expires: i64,
    ) -> Result<(), StoreError> {
        self.count_queries(2);
        let taken = transaction!(self, |tx, e| {
            // Serialises with an enrollment of the same id (its INSERT's lock).
            let enrolled = tx
                .query_opt(
                    "SELECT 1 FROM identities WHERE id = $1 FOR SHARE",
                    &[&id.as_str()],
                )
                .await
                .map_err(e)?
                .is_some();
            if enrolled {
                return Ok(true);
            }
            tx.execute(
                "INSERT INTO tokens (id, secret, issued, expires) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (id) DO UPDATE SET secret = excluded.secret, \
                     issued = excluded.issued, expires = excluded.expires",
                &[&id.as_str(), &sealed, &issued, &expires],
            )
            .await
            .map_err(e)?;
            Ok(false)
        })?;
        if taken {
            return Err(StoreError::Taken(id.clone()));
        }
        Ok(())
    }

    fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(!self
            .query("DELETE FROM tokens WHERE id = $1 RETURNING 1", &[&id])?
            .is_empty())
    }

    fn tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
        self.query("SELECT id, issued, expires FROM tokens ORDER BY id", &[])?
            .iter()
            .map(|r| {
                Ok(TokenRow {
                    id: self.col(r, 0)?,
                    issued: self.col(r, 1)?,
                    expires: self.col(r, 2)?,
                })
            })
            .collect()
    }

    fn enroll_lookup(&self, id: &str) -> Result<(bool, Option<SealedRow>), StoreError> {
        let rows = self.query(
            "SELECT EXISTS(SELECT 1 FROM identities WHERE id = $1), \
             (SELECT secret FROM tokens WHERE id = $1), (SELECT expires FROM tokens WHERE id = $1)",
            &[&id],
        )?;
        let r = self.one(&rows)?;
        let secret: Option<Vec<u8>> = self.col(r, 1)?;
        let expires: Option<i64> = self.col(r, 2)?;
        Ok((self.col(r, 0)?, secret.zip(expires)))
    }

    fn insert(
        &self,
        id: &Id,
        mode: EnrollMode,
        token: Option<&[u8]>,
        at: i64,
        seal: &dyn Fn(i64) -> Vec<u8>,
    ) -> Result<(i64, Vec<u8>), StoreError> {
        // The generation first (a sequence value is never handed out twice, whatever
        // happens to this transaction), so that the key is sealed for it before the
        // transaction, which must not hold `seal` (not `Send`).
        let rows = self.query("SELECT nextval('generations')", &[])?;
        let generation: i64 = self.col(self.one(&rows)?, 0)?;
        let sealed = seal(generation);
        // The enrollment is sealed with the log's length as the node read it: no entry
        // may be appended meanwhile (a removal of this id written now would end it).
        let pos = super::split_key(&sealed)?.0;
        self.count_queries(5);
        enum Out {
            Stored,
            Taken,
            TokenGone,
            Moved,
        }
        let out = transaction!(self, |tx, e| {
            let last = lock_log_end(&tx, "SHARE").await.map_err(e)?;
            if last != pos {
                return Ok(Out::Moved);
            }
            let consumed = match token {
                Some(token) => tx
                    .execute(
                        "DELETE FROM tokens WHERE id = $1 AND secret = $2 AND expires > $3",
                        &[&id.as_str(), &token, &at],
                    )
                    .await
                    .map_err(e)?,
                None => {
                    tx.execute("DELETE FROM tokens WHERE id = $1", &[&id.as_str()])
                        .await
                        .map_err(e)?;
                    1
                }
            };
            if consumed != 1 {
                return Ok(Out::TokenGone);
            }
            let inserted = tx
                .execute(
                    "INSERT INTO identities (generation, id, key, created, mode) \
                         VALUES ($1, $2, $3, $4, $5)",
                    &[&generation, &id.as_str(), &sealed, &at, &mode.as_str()],
                )
                .await;
            match inserted {
                Ok(_) => {}
                Err(err) if is_unique_violation(&err) => return Ok(Out::Taken),
                Err(err) => return Err(e(err)),
            }
            tx.execute(
                "SELECT pg_notify('tally_identity', 'enrolled ' || $1)",
                &[&id.as_str()],
            )
            .await
            .map_err(e)?;
            Ok(Out::Stored)
        })?;
        match out {
            Out::Stored => Ok((generation, sealed)),
            Out::Taken => Err(StoreError::Taken(id.clone())),
            Out::TokenGone => Err(StoreError::TokenGone(id.clone())),
            Out::Moved => Err(StoreError::FleetLogMoved),
        }
    }

    fn key(&self, id: &str) -> Result<Option<(i64, Vec<u8>)>, StoreError> {
        let rows = self.query(
            "SELECT generation, key FROM identities \
             WHERE id = $1 AND revoked IS NULL AND key IS NOT NULL",
            &[&id],
        )?;
        rows.first()
            .map(|r| Ok((self.col(r, 0)?, self.col(r, 1)?)))
            .transpose()
    }

    fn keys(&self) -> Result<Vec<KeyRow>, StoreError> {
        self.count_queries(2);
        let rows = transaction!(self, |tx, e| {
            tx.batch_execute(&format!(
                "SET LOCAL statement_timeout = {}",
                LONG_STATEMENT_TIMEOUT.as_millis()
            ))
            .await
            .map_err(e)?;
            tx.query(
                "SELECT id, generation, key FROM identities \
                 WHERE revoked IS NULL AND key IS NOT NULL",
                &[],
            )
            .await
            .map_err(e)
        })?;
        rows.iter()
            .map(|r| Ok((self.col(r, 0)?, self.col(r, 1)?, self.col(r, 2)?)))
            .collect()
    }

    fn touch_many(&self, seen: &[(Id, i64)]) -> Result<(), StoreError> {
        let ids: Vec<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
        let ats: Vec<i64> = seen.iter().map(|(_, at)| *at).collect();
        self.query(
            "UPDATE identities i SET last_seen = v.at \
             FROM unnest($1::text[], $2::bigint[]) AS v(id, at) WHERE i.id = v.id",
            &[&ids, &ats],
        )?;
        Ok(())
    }

    /// Not used by the store of a fleet, which revokes through its log
    /// ([`Engine::revoke_logged`]): refused.
    fn revoke(&self, id: &str, _at: i64) -> Result<Option<bool>, StoreError> {
        Err(StoreError::NotFleet(format!(
            "revoking {id} without the fleet's log"
        )))
    }

    /// See [`Postgres::revoke`].
    fn remove(&self, id: &str) -> Result<bool, StoreError> {
        Err(StoreError::NotFleet(format!(
            "removing {id} without the fleet's log"
        )))
    }

    fn has_fleet_log(&self) -> bool {
        true
    }

    fn revoke_logged(
        &self,
        id: &str,
        at: i64,
        entry: &FleetLogRow,
    ) -> Result<Logged<Option<bool>>, StoreError> {
        self.count_queries(6);
        let place = self.0.place.clone();
        transaction!(self, |tx, e| {
            if let Logged::Moved = log_entry(&tx, entry, &place).await? {
                return Ok(Logged::Moved);
            }
            let n = tx
                .execute(
                    "UPDATE identities SET revoked = $2, key = NULL \
                         WHERE id = $1 AND revoked IS NULL",
                    &[&id, &at],
                )
                .await
                .map_err(e)?;
            if n == 1 {
                return Ok(Logged::Appended(Some(true)));
            }
            let exists = tx
                .query_opt("SELECT 1 FROM identities WHERE id = $1", &[&id])
                .await
                .map_err(e)?
                .is_some();
            Ok(Logged::Appended(exists.then_some(false)))
        })
    }

    fn remove_logged(&self, id: &str, entry: &FleetLogRow) -> Result<Logged<bool>, StoreError> {
        self.count_queries(5);
        let place = self.0.place.clone();
        transaction!(self, |tx, e| {
            if let Logged::Moved = log_entry(&tx, entry, &place).await? {
                return Ok(Logged::Moved);
            }
            let n = tx
                .execute("DELETE FROM identities WHERE id = $1", &[&id])
                .await
                .map_err(e)?;
            Ok(Logged::Appended(n == 1))
        })
    }

    fn append_log(&self, entry: &FleetLogRow) -> Result<Logged<()>, StoreError> {
        self.count_queries(4);
        let place = self.0.place.clone();
        transaction!(self, |tx, _e| { log_entry(&tx, entry, &place).await })
    }

    fn fleet_log(&self, after: u64, limit: usize) -> Result<Vec<FleetLogRow>, StoreError> {
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query(
            &format!(
                "SELECT seq, id, value, kind, at, tag FROM fleet_log WHERE seq > $1 \
                 AND {LOG_ROW} ORDER BY seq LIMIT $2"
            ),
            &[&after, &limit],
        )?
        .iter()
        .map(|r| {
            Ok(FleetLogRow {
                seq: self.col(r, 0)?,
                id: self.col(r, 1)?,
                value: self.col(r, 2)?,
                kind: self.col(r, 3)?,
                at: self.col(r, 4)?,
                tag: self.col(r, 5)?,
            })
        })
        .collect()
    }

    fn list(&self) -> Result<Vec<IdentityRow>, StoreError> {
        self.query(
            "SELECT id, generation, created, last_seen, revoked, mode, \
             (SELECT COUNT(*) FROM queue q WHERE q.generation = identities.generation) \
             FROM identities ORDER BY id",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok(IdentityRow {
                id: self.col(r, 0)?,
                generation: self.col::<i64>(r, 1)? as u64,
                created: self.col(r, 2)?,
                last_seen: self.col(r, 3)?,
                revoked: self.col(r, 4)?,
                mode: self.col(r, 5)?,
                queued: self.col::<i64>(r, 6)? as u64,
            })
        })
        .collect()
    }

    fn count(&self) -> Result<u64, StoreError> {
        let rows = self.query("SELECT COUNT(*) FROM identities", &[])?;
        let n: i64 = self.col(self.one(&rows)?, 0)?;
        Ok(n as u64)
    }
}
