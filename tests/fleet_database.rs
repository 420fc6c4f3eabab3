//! The link to a fleet's database (issue 26, items 4 and 5): TLS as `sslmode` says, and
//! the password kept out of files other users read. Real `tallyd` processes against
//! throwaway PostgreSQL clusters (tests/common/postgres.rs) with TLS or scram-sha-256;
//! skipped without PostgreSQL (never under CI).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::bin::{self, text, Daemon};
use common::postgres::{make_ca, Cluster, Options};
use tempfile::TempDir;

/// A place for the nodes of one test: one pair of keys (`keys/`), copied into each
/// node's state directory.
struct Nodes {
    root: TempDir,
    made: usize,
}

impl Nodes {
    fn new() -> Nodes {
        let root = tempfile::tempdir().unwrap();
        let keys = root.path().join("keys");
        let out = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .arg("--state-dir")
            .arg(&keys)
            .arg("init")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        Nodes { root, made: 0 }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// A file of this test with `text` and `mode`.
    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// A new node: its state directory (the fleet's keys) and its configuration file
    /// (`store`, then `extra`; mode `mode`). Returns `tallyd --config FILE`, its
    /// environment cleared of libpq's password variables.
    fn node(&mut self, store: &str, extra: &str, mode: u32) -> (Command, PathBuf) {
        self.made += 1;
        let dir = self.path(&format!("node{}", self.made));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        for key in ["server.key", "store.key"] {
            std::fs::copy(self.path("keys").join(key), dir.join(key)).unwrap();
        }
        let config = self.file(
            &format!("node{}.toml", self.made),
            &format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nstore = \"{store}\"\n{extra}",
                dir.display()
            ),
            mode,
        );
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
        cmd.arg("--config")
            .arg(&config)
            .env_remove("PGPASSWORD")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env("PGPASSFILE", self.path("no-pgpass"));
        (cmd, config)
    }
}

/// Runs `cmd`, a daemon that must refuse to start: its stderr. (It gets 60 s to exit;
/// one still running then is a failure, not a hang.)
fn refused(mut cmd: Command) -> String {
    let mut child = cmd
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = bin::lines(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log: Vec<String> = stderr.try_iter().collect();
            panic!("tallyd did not refuse to start: {log:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader thread sees the pipe's end once the process is gone.
    let log: Vec<String> = stderr.iter().collect();
    assert!(!status.success(), "tallyd exited 0: {log:#?}");
    log.join("\n")
}

/// Starts `cmd`, a daemon that must start (it opened the store and listens).
fn started(cmd: Command) -> Daemon {
    bin::start_cmd(cmd, false).0
}

#[test]
fn verify_full_against_a_database_without_tls_refuses_to_start() {
    let Some(cluster) = Cluster::start("fleet database: verify-full, no TLS") else {
        return;
    };
    let mut nodes = Nodes::new();
    let ca = make_ca(nodes.root.path(), "ca");
    // Before the fix: the node connected in plaintext (sslmode=require failed to parse).
    let store = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        cluster.url(),
        ca.display()
    );
    let (cmd, _) = nodes.node(&store, "", 0o600);
    let err = refused(cmd);
    assert!(
        err.contains("the server does not offer TLS and sslmode=verify-full requires it"),
        "{err}"
    );
    // verify-full without a CA says what to add.
    let (cmd, _) = nodes.node(&format!("{}?sslmode=verify-full", cluster.url()), "", 0o600);
    let err = refused(cmd);
    assert!(
        err.contains("sslmode=verify-full needs sslrootcert=FILE"),
        "{err}"
    );
    assert_eq!(
        cluster.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'nodes'"),
        "0",
        "no node got as far as the schema"
    );
}

#[test]
fn verify_full_serves_with_the_database_ca_and_refuses_another_ca() {
    let options = Options {
        tls: true,
        ..Options::default()
    };
    let Some(cluster) = Cluster::start_with("fleet database: verify-full", options) else {
        return;
    };
    let mut nodes = Nodes::new();
    let wrong = make_ca(nodes.root.path(), "other-ca");
    let with_ca = |ca: &Path| {
        format!(
            "{}?sslmode=verify-full&sslrootcert={}",
            cluster.url(),
            ca.display()
        )
    };
    let (cmd, _) = nodes.node(&with_ca(&wrong), "", 0o600);
    let err = refused(cmd);
    assert!(
        err.contains(&format!(
            "does not verify against sslrootcert={}",
            wrong.display()
        )),
        "{err}"
    );
    // The right CA: the pool's connections and the notification connection are all
    // encrypted.
    let (cmd, _) = nodes.node(&with_ca(cluster.ca()), "", 0o600);
    let node = started(cmd);
    let ssl = cluster.psql(
        "SELECT string_agg(DISTINCT s.ssl::text, ',') || ' ' || count(*) \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.application_name LIKE 'tallyd%'",
    );
    let (encrypted, count) = ssl.split_once(' ').unwrap();
    assert_eq!(encrypted, "true", "{ssl}");
    assert!(count.parse::<u32>().unwrap() >= 2, "{ssl}");
    // require with the CA verifies too (as libpq: verify-ca), and so refuses the wrong one.
    let (cmd, _) = nodes.node(
        &format!(
            "{}?sslmode=require&sslrootcert={}",
            cluster.url(),
            wrong.display()
        ),
        "",
        0o600,
    );
    let err = refused(cmd);
    assert!(err.contains("does not verify against"), "{err}");
    drop(node);
}

const PASSWORD: &str = "correct horse: battery\\staple";

fn password_cluster(test: &str) -> Option<Cluster> {
    Cluster::start_with(
        test,
        Options {
            password: Some(PASSWORD),
            ..Options::default()
        },
    )
}

/// `PASSWORD` in a URL (percent-encoded).
fn encoded(pw: &str) -> String {
    pw.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn a_configuration_holding_the_password_must_not_be_readable_by_every_user() {
    let Some(cluster) = password_cluster("fleet database: password in the config") else {
        return;
    };
    let mut nodes = Nodes::new();
    let store = format!(
        "postgres://postgres:{}@127.0.0.1:{}/postgres",
        encoded(PASSWORD),
        cluster.port
    );
    // Before the fix: it started, the password readable by any local user.
    let (cmd, config) = nodes.node(&store, "", 0o644);
    let err = refused(cmd);
    assert!(
        err.contains(&config.display().to_string()) && err.contains("mode 644"),
        "{err}"
    );
    assert!(
        err.contains(&format!("chmod 640 {}", config.display())),
        "{err}"
    );
    assert!(!err.contains("horse"), "the password is not shown: {err}");
    // Readable by its owner and group only: accepted, and the password works.
    let (cmd, _) = nodes.node(&store, "", 0o640);
    drop(started(cmd));
}

#[test]
fn the_password_comes_from_a_file_a_credential_pgpassword_or_pgpass() {
    let Some(cluster) = password_cluster("fleet database: password sources") else {
        return;
    };
    let mut nodes = Nodes::new();
    let store = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    // Without a password the database refuses the node.
    let (cmd, _) = nodes.node(&store, "", 0o644);
    let err = refused(cmd);
    assert!(err.contains("password missing"), "{err}");

    // store_password_file, 0600. Before the fix: an unknown setting.
    let file = nodes.file("db-password", &format!("{PASSWORD}\n"), 0o600);
    let extra = format!("store_password_file = \"{}\"\n", file.display());
    let (cmd, _) = nodes.node(&store, &extra, 0o644);
    let node = started(cmd);
    assert!(
        node.startup_log
            .iter()
            .any(|l| l.contains("password=store_password_file")),
        "{:#?}",
        node.startup_log
    );
    drop(node);
    // ... refused if others may read it.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (cmd, _) = nodes.node(&store, &extra, 0o644);
    let err = refused(cmd);
    assert!(
        err.contains(&format!("chmod 600 {}", file.display())) && !err.contains("horse"),
        "{err}"
    );

    // The systemd credential db-password (LoadCredential=db-password:FILE).
    let creds = nodes.path("credentials");
    std::fs::create_dir(&creds).unwrap();
    let cred = creds.join("db-password");
    std::fs::write(&cred, PASSWORD).unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o400)).unwrap();
    let (mut cmd, _) = nodes.node(&store, "", 0o644);
    cmd.env("CREDENTIALS_DIRECTORY", &creds);
    drop(started(cmd));

    // $PGPASSWORD, as libpq. Before the fix: "password missing".
    let (mut cmd, _) = nodes.node(&store, "", 0o644);
    cmd.env("PGPASSWORD", PASSWORD);
    drop(started(cmd));

    // libpq's password file ($PGPASSFILE), with its escapes.
    let escaped = PASSWORD.replace('\\', "\\\\").replace(':', "\\:");
    let pgpass = nodes.file(
        "pgpass",
        &format!(
            "# tally\nother:*:*:*:wrong\n127.0.0.1:{}:postgres:postgres:{escaped}\n",
            cluster.port
        ),
        0o600,
    );
    let (mut cmd, _) = nodes.node(&store, "", 0o644);
    cmd.env("PGPASSFILE", &pgpass);
    drop(started(cmd));
    // ... ignored, with a warning, if others may read it (as libpq).
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (mut cmd, _) = nodes.node(&store, "", 0o644);
    cmd.env("PGPASSFILE", &pgpass);
    let err = refused(cmd);
    assert!(
        err.contains("group or world access") && err.contains("chmod 600"),
        "{err}"
    );
}

/// The PostgreSQL store, called from inside an async runtime of either flavour, waits
/// for its database without `block_in_place` (which panics on a current-thread
/// runtime): issue 29. Fails on the build before (it panicked here).
#[test]
fn the_store_answers_from_a_current_thread_runtime() {
    let Some(cluster) = Cluster::start("store from a current-thread runtime") else {
        return;
    };
    let location = tally::store::Location::Postgres(cluster.url());
    let key = tally::proto::SecretKey::from_bytes([7; 32]);
    let store = tally::store::Store::open_at(
        &location,
        key,
        tally::store::pgconf::PasswordSources::default(),
    )
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let count = runtime.block_on(async { store.count() }).unwrap();
    assert_eq!(count, 0);
    let multi = tokio::runtime::Runtime::new().unwrap();
    assert_eq!(multi.block_on(async { store.count() }).unwrap(), 0);
}

/// A node told that an identity changed (revoked on another node), whose read of it
/// fails (the database answers nothing sensible for a moment): the key it held leaves
/// its index, so that no handshake is served with a key that may be revoked; it comes
/// back only once a read succeeds. (Was reached in tests/fleet.rs by a sleep compiled
/// into debug builds before the node's read.)
#[test]
fn a_key_that_cannot_be_read_again_leaves_the_index() {
    let Some(cluster) = Cluster::start("refresh fails closed") else {
        return;
    };
    let location = tally::store::Location::Postgres(cluster.url());
    let open = || {
        let key = tally::proto::SecretKey::from_bytes([7; 32]);
        tally::store::Store::open_at(
            &location,
            key,
            tally::store::pgconf::PasswordSources::default(),
        )
        .unwrap()
    };
    // Two nodes' stores on one database.
    let (here, there) = (open(), open());
    let id = tally::proto::Id::new("stale-1").unwrap();
    let device_key = tally::proto::SecretKey::from_bytes([9; 32]);
    there
        .insert(
            &id,
            &device_key,
            tally::proto::frame::EnrollMode::Open,
            None,
        )
        .unwrap();
    here.load_key_index().unwrap();
    let known = |store: &tally::store::Store| {
        store
            .cached_key(&id)
            .expect("index loaded")
            .unwrap()
            .is_some()
    };
    assert!(known(&here));
    // Revoked on the other node; this node's read of it fails.
    assert!(there.revoke("stale-1").unwrap());
    cluster.psql("ALTER TABLE identities RENAME TO identities_away; ALTER TABLE fleet_log RENAME TO fleet_log_away");
    assert!(here.refresh("stale-1").is_err());
    assert!(!known(&here), "a key that may be revoked stayed usable");
    // Read again once the database answers: revoked, it stays out.
    cluster.psql("ALTER TABLE identities_away RENAME TO identities; ALTER TABLE fleet_log_away RENAME TO fleet_log");
    assert!(here.refresh("stale-1").is_ok());
    assert!(!known(&here));
}

/// A fleet's enqueue writer (group commit on PostgreSQL): enqueues waiting at once go
/// as one transaction, and each still gets its own answer. An identity's messages take
/// their ids in the order they were sent; an identity whose messages do not all fit
/// under its bound gets the ones that fit, in order, and a refusal for each of the
/// others; an id not enrolled is refused; every row is tagged so that its delivery
/// verifies it. Fewer statements than messages: they were batched.
#[test]
fn enqueues_waiting_at_once_commit_together_each_with_its_own_answer() {
    use tally::store::queue::{now_ms, Refusal};
    let Some(cluster) = Cluster::start("queue group commit") else {
        return;
    };
    let (pg, queues) = fleet_queues(&cluster, &["meter-1", "meter-2"], 1);
    let q = &queues[0];
    let id = |s: &str| tally::proto::Id::new(s).unwrap();
    // meter-1 without a bound to speak of, meter-2 bounded at 3 messages, ghost not
    // enrolled: interleaved, all sent before any is answered.
    let mut sends = Vec::new();
    for n in 0..60 {
        sends.push(match n % 6 {
            1 => queued_message("meter-2", n, 3),
            5 => queued_message("ghost", n, 100),
            _ => queued_message("meter-1", n, 1000),
        });
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let before = pg.queries();
    let answers = runtime.block_on(futures_util::future::join_all(
        sends
            .iter()
            .map(|(msg, bounds)| q.enqueue(msg.clone(), *bounds)),
    ));
    let statements = pg.queries() - before;
    let mut meter1 = Vec::new();
    let mut meter2 = Vec::new();
    for ((msg, _), answer) in sends.iter().zip(answers) {
        let answer = answer.expect("the transaction committed");
        match msg.id.as_str() {
            "meter-1" => meter1.push(answer.expect("meter-1 queued").1),
            "meter-2" => meter2.push(answer),
            _ => assert_eq!(answer, Err(Refusal::NotEnrolled("ghost".into()))),
        }
    }
    assert_eq!(meter1, (1..=40).collect::<Vec<u64>>(), "in the order sent");
    assert_eq!(meter2.len(), 10);
    for (k, answer) in meter2.iter().enumerate() {
        match (k, answer) {
            (0..3, Ok((_, msg_id))) => assert_eq!(*msg_id, k as u64 + 1),
            (3.., Err(Refusal::Full { messages: 3, .. })) => {}
            other => panic!("meter-2's {k}th answer: {other:?}"),
        }
    }
    assert!(
        statements < 60,
        "{statements} statements for 60 messages: not batched"
    );
    // Delivered as sent, every tag verified (a row that does not verify is not).
    let generation = runtime
        .block_on(q.generation(&id("meter-1")))
        .unwrap()
        .unwrap();
    let next = runtime
        .block_on(q.next(&id("meter-1"), generation, 0, 100, now_ms()))
        .unwrap();
    let payloads: Vec<String> = next
        .messages
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = sends
        .iter()
        .enumerate()
        .filter(|(_, (m, _))| m.id.as_str() == "meter-1")
        .map(|(n, _)| format!("set {n}"))
        .collect();
    assert_eq!(payloads, expected);
}

/// `ids` enrolled in a fleet's store in `cluster`, and the queues of `nodes` nodes on it.
fn fleet_queues(
    cluster: &Cluster,
    ids: &[&str],
    nodes: usize,
) -> (
    tally::store::postgres::Postgres,
    Vec<tally::store::queue::postgres::PgQueue>,
) {
    let location = tally::store::Location::Postgres(cluster.url());
    let key = tally::proto::SecretKey::from_bytes([7; 32]);
    let (store, pg) =
        tally::store::Store::open_shared(&location, key.clone(), Default::default()).unwrap();
    let pg = pg.expect("a PostgreSQL store");
    for name in ids {
        store
            .insert(
                &tally::proto::Id::new(name).unwrap(),
                &tally::proto::SecretKey::from_bytes([4; 32]),
                tally::proto::frame::EnrollMode::Open,
                None,
            )
            .unwrap();
    }
    let fleet_key = tally::store::fleet_key::FleetKey::derive(&key);
    let queues = (0..nodes)
        .map(|n| {
            tally::store::queue::postgres::PgQueue::new(
                pg.clone(),
                fleet_key.clone(),
                format!("n{n}"),
            )
        })
        .collect();
    (pg, queues)
}

/// A message `n` for `to`, under a bound of `max_messages`.
fn queued_message(
    to: &str,
    n: usize,
    max_messages: u32,
) -> (tally::store::queue::NewMessage, tally::store::queue::Bounds) {
    let msg = tally::store::queue::NewMessage {
        id: tally::proto::Id::new(to).unwrap(),
        kind: tally::proto::DeliveryKind::Message,
        payload: bytes::Bytes::from(format!("set {n}")),
        expires_ms: tally::store::queue::now_ms() + 3_600_000,
        origin: tally::store::queue::Origin::Control,
    };
    let bounds = tally::store::queue::Bounds {
        max_messages,
        max_bytes: 1 << 20,
    };
    (msg, bounds)
}

/// Two nodes' enqueue writers at once, over the same identities taken in opposite
/// orders, each identity bounded: every batch commits (their rows are locked in one
/// order on every node, so neither deadlocks the other), every identity ends with
/// exactly its bound queued, ids 1 to the bound with none given twice, and every other
/// message refused as full.
#[test]
fn two_nodes_queueing_for_the_same_identities_at_once_neither_deadlock_nor_overfill() {
    use tally::store::queue::Refusal;
    let Some(cluster) = Cluster::start("queue writers of two nodes") else {
        return;
    };
    let names: Vec<String> = (0..20).map(|k| format!("valve-{k:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (_pg, queues) = fleet_queues(&cluster, &refs, 2);
    const BOUND: u32 = 15;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let answers = runtime.block_on(async {
        let mut all = Vec::new();
        for (node, q) in queues.iter().enumerate() {
            for round in 0..10 {
                for k in 0..names.len() {
                    // Node 0 goes up the ids, node 1 down.
                    let k = if node == 0 { k } else { names.len() - 1 - k };
                    let (msg, bounds) = queued_message(&names[k], round, BOUND);
                    let q = q.clone();
                    all.push(tokio::spawn(
                        async move { (k, q.enqueue(msg, bounds).await) },
                    ));
                }
            }
        }
        futures_util::future::join_all(all).await
    });
    let mut queued: Vec<Vec<u64>> = vec![Vec::new(); names.len()];
    let mut full = 0;
    for answer in answers {
        let (k, answer) = answer.unwrap();
        match answer.expect("every batch committed") {
            Ok((_, msg_id)) => queued[k].push(msg_id),
            Err(Refusal::Full { messages, .. }) => {
                assert_eq!(messages, u64::from(BOUND));
                full += 1;
            }
            Err(other) => panic!("{other}"),
        }
    }
    for (k, mut ids) in queued.into_iter().enumerate() {
        ids.sort_unstable();
        assert_eq!(
            ids,
            (1..=u64::from(BOUND)).collect::<Vec<u64>>(),
            "{}",
            names[k]
        );
    }
    assert_eq!(full, 2 * 10 * names.len() - names.len() * BOUND as usize);
}
