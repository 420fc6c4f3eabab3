//! Several daemons, one fleet (issue 16, docs/CLUSTER.md): two or three real `tallyd`
//! processes on one throwaway PostgreSQL cluster, and real devices (`tally listen`,
//! `tally request`, the client library). Each test starts its own cluster; without
//! PostgreSQL installed they are skipped with a message (never under CI).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::bin::{self, expect_line, text, Daemon};
use common::netns::Link;
use common::postgres::Cluster;
use common::proxy::Proxy;
use tempfile::TempDir;

struct Node {
    daemon: Daemon,
    dir: PathBuf,
}

impl Node {
    /// `tallyd ARGS` against this node (an admin command through its control socket).
    fn admin(&self, args: &[&str]) -> std::process::Output {
        bin::admin(&self.dir, args)
    }

    /// An admin command that must succeed: its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "tallyd {args:?} on {}: {}",
            self.daemon.addr,
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

struct Fleet {
    cluster: Cluster,
    root: TempDir,
    nodes: Vec<Node>,
    takeover: &'static str,
    /// The network of each node that has its own (a namespace: tests of faults between
    /// a node and the database); the others share the host's.
    links: Vec<Option<Link>>,
    /// More configuration for every node.
    extra: &'static str,
}

/// The configuration of the node named `name` (`node0`, `node1`, ...): its file
/// `NAME.toml` beside its state directory `NAME`. A node with a `link` of its own
/// listens on its address there, and reaches the database through it.
fn config(
    fleet_root: &Path,
    cluster: &Cluster,
    name: &str,
    takeover: &str,
    extra: &str,
    link: Option<&Link>,
) -> PathBuf {
    let dir = fleet_root.join(name);
    let path = fleet_root.join(format!("{name}.toml"));
    let (listen, store) = match link {
        None => ("127.0.0.1".to_owned(), cluster.url()),
        Some(l) => (
            l.node_ip.clone(),
            format!("postgres://postgres@{}/postgres", l.db),
        ),
    };
    std::fs::write(
        &path,
        format!(
            "listen = \"{listen}:0\"\nstate_dir = \"{}\"\nstore = \"{store}\"\ntakeover = \"{takeover}\"\n{extra}",
            dir.display(),
        ),
    )
    .unwrap();
    path
}

/// A new state directory `name` under the fleet's root (0700), holding the fleet's
/// keys (those of node 0: one fleet, one server key and one store key).
fn keyed_dir(fleet_root: &Path, name: &str) -> PathBuf {
    let dir = fleet_root.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for key in ["server.key", "store.key"] {
        std::fs::copy(fleet_root.join("node0").join(key), dir.join(key)).unwrap();
    }
    dir
}

impl Fleet {
    /// `n` nodes on a new cluster, sharing one pair of key files; `None` if PostgreSQL
    /// is not installed (outside CI).
    fn start(test: &str, n: usize, takeover: &'static str) -> Option<Fleet> {
        Fleet::start_with(test, n, takeover, &[], "")
    }

    /// [`Fleet::start`], with the nodes `linked` each in a network of its own (`None`
    /// where that cannot be done, outside CI) and `extra` configuration for all.
    fn start_with(
        test: &str,
        n: usize,
        takeover: &'static str,
        linked: &[usize],
        extra: &'static str,
    ) -> Option<Fleet> {
        let cluster = Cluster::start(test)?;
        let db: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.port).parse().unwrap();
        let mut links = Vec::new();
        for i in 0..n {
            links.push(match linked.contains(&i) {
                true => Some(Link::create(test, db)?),
                false => None,
            });
        }
        Some(Fleet::start_on(cluster, n, takeover, links, extra))
    }

    /// [`Fleet::start_with`] on `cluster`.
    fn start_on(
        cluster: Cluster,
        n: usize,
        takeover: &'static str,
        links: Vec<Option<Link>>,
        extra: &'static str,
    ) -> Fleet {
        let root = tempfile::tempdir().unwrap();
        // The first node's keys, copied to the others: one fleet, one server key and
        // one store key (distributed as systemd credentials in production).
        let first = config(root.path(), &cluster, "node0", takeover, extra, None);
        let init = Command::new(env!("CARGO_BIN_EXE_tallyd"))
            .arg("--config")
            .arg(&first)
            .arg("init")
            .output()
            .unwrap();
        assert!(init.status.success(), "{}", text(&init.stderr));
        for i in 1..n {
            keyed_dir(root.path(), &format!("node{i}"));
        }
        let mut fleet = Fleet {
            cluster,
            root,
            nodes: Vec::new(),
            takeover,
            links,
            extra,
        };
        for i in 0..n {
            fleet.nodes.push(fleet.start_node(i));
        }
        // Open enrollment is the fleet's, off until turned on: the tests enroll their
        // devices with the open token (unless a test's configuration says otherwise).
        if !extra.contains("open_enrollment = false") {
            fleet.open_enrollment(true);
        }
        fleet
    }

    /// `tallyd open-enrollment on|off` through node 0; waits until every node applies it.
    fn open_enrollment(&self, on: bool) {
        let word = if on { "on" } else { "off" };
        self.nodes[0].ok(&["open-enrollment", word]);
        let want = format!("open enrollment is {word} for the whole fleet");
        for node in &self.nodes {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !node.ok(&["open-enrollment"]).contains(&want) {
                assert!(Instant::now() < deadline, "a node never applied: {want}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn start_node(&self, i: usize) -> Node {
        self.start_node_env(i, &[])
    }

    /// Starts node `i` with `env` in its environment.
    fn start_node_env(&self, i: usize, env: &[(&str, &std::ffi::OsStr)]) -> Node {
        let link = self.links.get(i).and_then(Option::as_ref);
        let path = config(
            self.root.path(),
            &self.cluster,
            &format!("node{i}"),
            self.takeover,
            self.extra,
            link,
        );
        let tallyd = env!("CARGO_BIN_EXE_tallyd");
        let mut cmd = match link {
            Some(link) => link.command(tallyd),
            None => Command::new(tallyd),
        };
        cmd.arg("--config").arg(&path).envs(env.iter().copied());
        let (daemon, _) = bin::start_cmd(cmd, false);
        Node {
            daemon,
            dir: self.root.path().join(format!("node{i}")),
        }
    }

    /// Enrolls `id` through node `n`; returns its credential file.
    fn enroll(&self, n: usize, id: &str) -> PathBuf {
        let node = &self.nodes[n];
        bin::enroll(&node.daemon, &node.dir, id, self.root.path())
    }

    /// A copy of `cred` pointing at `server`.
    fn cred_for(&self, cred: &Path, server: &str, name: &str) -> PathBuf {
        let text = std::fs::read_to_string(cred).unwrap();
        let out: String = text
            .lines()
            .map(|l| {
                if l.starts_with("server =") {
                    format!("server = \"{server}\"\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        let path = self.root.path().join(name);
        std::fs::write(&path, out).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        path
    }

    /// `cred` pointed at node `n`.
    fn at(&self, cred: &Path, n: usize) -> PathBuf {
        let name = format!(
            "{}-at-{n}.cred",
            cred.file_stem().unwrap().to_string_lossy()
        );
        self.cred_for(cred, &self.nodes[n].daemon.addr, &name)
    }

    /// The sessions `tallyd sessions --json` on node `n` lists: (id, node address).
    fn sessions(&self, n: usize) -> Vec<(String, String)> {
        let json = self.nodes[n].ok(&["sessions", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_owned(),
                    s["node"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect()
    }

    /// Waits (up to `secs`) until node `n` lists exactly `want`.
    fn await_sessions(&self, n: usize, want: &[(&str, usize)], secs: u64) {
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(id, node)| (id.to_string(), self.nodes[*node].daemon.addr.clone()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.sessions(n);
            if got == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {n} lists {got:?}, not {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `tally request --cred CRED PAYLOAD`: its output.
fn request(cred: &Path, payload: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["request", "--cred"])
        .arg(cred)
        .arg(payload)
        .output()
        .unwrap()
}

#[test]
fn a_device_enrolled_on_one_node_is_served_by_every_node() {
    let Some(f) = Fleet::start("fleet: enrolled on one node", 3, "replace") else {
        return;
    };
    let cred = f.enroll(0, "meter-1");
    // The other nodes heard of the enrollment (tally_identity) and hold its key in
    // their index: a handshake there costs no query for the key.
    for n in 0..3 {
        let out = request(&f.at(&cred, n), &format!("hello {n}"));
        assert!(out.status.success(), "node {n}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), format!("hello {n}"));
    }
    // The identities are the fleet's: listed the same by every node.
    for n in 0..3 {
        let ids = f.nodes[n].ok(&["identities"]);
        assert!(ids.contains("meter-1"), "node {n}: {ids}");
    }
    // A token issued on one node enrolls on another.
    let token = f.nodes[1].ok(&["token", "--id", "meter-2"]);
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .env("TALLY_TOKEN", token.trim())
        .args([
            "enroll",
            "--id",
            "meter-2",
            "--server",
            &f.nodes[2].daemon.addr,
            "--out",
        ])
        .arg(f.root.path().join("meter-2.cred"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        f.nodes[0].ok(&["tokens"]).lines().count() <= 1,
        "the token was used up"
    );
    let out = request(&f.at(&f.root.path().join("meter-2.cred"), 0), "ping");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn one_live_session_per_identity_across_nodes_replace() {
    let Some(f) = Fleet::start("fleet: takeover across nodes", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "pump-1");
    let (_a, a_lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&a_lines, "connected as pump-1");
    f.await_sessions(1, &[("pump-1", 0)], 10);
    // The same identity reconnects to the other node: it takes the session over there,
    // and the first node closes its own with TAKEN_OVER.
    let (_b, b_lines) = bin::listen(&["--echo", "--no-reconnect"], &f.at(&cred, 1));
    expect_line(&b_lines, "connected as pump-1");
    let lost = expect_line(&a_lines, "session lost");
    assert!(
        lost.contains("TAKEN_OVER") || lost.contains("taken over"),
        "{lost}"
    );
    // One session in the fleet, on node 1, whichever node is asked.
    f.await_sessions(0, &[("pump-1", 1)], 10);
    f.await_sessions(1, &[("pump-1", 1)], 10);
    // Both devices stop; the claim is deleted. Node 0 remembers that its claim was
    // superseded: the identity's next claim there must have a greater epoch (epochs
    // are fleet-wide, they do not start again at 1 with a new row), or it is refused.
    drop((_a, _b));
    f.await_sessions(0, &[], 10);
    let out = request(&f.at(&cred, 0), "back on node 0");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn one_live_session_per_identity_across_nodes_reject() {
    let Some(f) = Fleet::start("fleet: reject across nodes", 2, "reject") else {
        return;
    };
    let cred = f.enroll(0, "valve-1");
    let (_a, a_lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&a_lines, "connected as valve-1");
    // Another node refuses a second session while the first lives.
    let out = request(&f.at(&cred, 1), "second");
    assert!(!out.status.success(), "a second session was accepted");
    assert!(
        text(&out.stderr).contains("session takeover refused"),
        "{}",
        text(&out.stderr)
    );
    f.nodes[1]
        .daemon
        .expect_log(&["refused", "live session on node", "reject"]);
    // The first session is untouched.
    f.await_sessions(1, &[("valve-1", 0)], 10);
    // Once it ends, the claim is released and another node serves the identity.
    drop(_a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = request(&f.at(&cred, 1), "after");
        if out.status.success() {
            assert_eq!(text(&out.stdout).trim(), "after");
            break;
        }
        assert!(Instant::now() < deadline, "{}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn revoke_and_remove_close_the_session_on_whichever_node_holds_it() {
    let Some(f) = Fleet::start("fleet: revoke across nodes", 2, "replace") else {
        return;
    };
    let doomed = f.enroll(0, "doomed");
    let removed = f.enroll(0, "removed");
    let (_a, a_lines) = bin::listen(&["--echo"], &f.at(&doomed, 0));
    expect_line(&a_lines, "connected as doomed");
    let (_b, b_lines) = bin::listen(&["--echo"], &f.at(&removed, 1));
    expect_line(&b_lines, "connected as removed");
    f.await_sessions(1, &[("doomed", 0), ("removed", 1)], 10);
    // Revoked through node 1; the session is on node 0.
    let out = f.nodes[1].ok(&["revoke", "doomed"]);
    let revoked = Instant::now();
    assert!(out.contains("its live session was closed"), "{out}");
    let line = expect_line(&a_lines, "revoked");
    let took = revoked.elapsed();
    eprintln!("revocation on node 1 closed the session on node 0 in {took:?}: {line}");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    // Removed through node 0; the session is on node 1.
    let out = f.nodes[0].ok(&["remove", "removed"]);
    let at = Instant::now();
    assert!(out.contains("its live session was closed"), "{out}");
    expect_line(&b_lines, "removed");
    assert!(
        at.elapsed() < Duration::from_secs(1),
        "took {:?}",
        at.elapsed()
    );
    // Neither identity gets a session on any node now.
    for n in 0..2 {
        for cred in [&doomed, &removed] {
            let out = request(&f.at(cred, n), "x");
            assert!(
                !out.status.success(),
                "node {n} served a revoked or removed identity"
            );
        }
    }
    f.await_sessions(0, &[], 10);
}

#[test]
fn server_initiated_traffic_is_routed_to_the_node_holding_the_session() {
    let Some(f) = Fleet::start("fleet: sends across nodes", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "field-unit");
    let (_a, a_lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&a_lines, "connected as field-unit");
    f.await_sessions(1, &[("field-unit", 0)], 10);
    // A REQUEST through node 1 reaches the device on node 0; its answer comes back.
    let out = f.nodes[1].admin(&["send", "field-unit", "--request", "reboot?"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "reboot?");
    // A MESSAGE too.
    let out = f.nodes[1].admin(&["send", "field-unit", "fyi"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("sent to field-unit"),
        "{}",
        text(&out.stderr)
    );
    // A big payload goes through the database, not in a notification (8000 bytes at most).
    let big = "x".repeat(20_000);
    let out = f.nodes[1].admin(&["send", "field-unit", "--request", &big]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).len(), 20_000);
    // A device with no session anywhere is offline, from either node.
    for n in 0..2 {
        let out = f.nodes[n].admin(&["send", "nobody", "--request", "x"]);
        assert!(!out.status.success());
        assert!(
            text(&out.stderr).contains("not connected"),
            "{}",
            text(&out.stderr)
        );
    }
    // Nothing is left in the database's mailbox.
    assert_eq!(f.cluster.psql("SELECT count(*) FROM sends"), "0");
}

#[test]
fn sessions_lists_the_fleet() {
    let Some(f) = Fleet::start("fleet: sessions", 3, "replace") else {
        return;
    };
    let mut listeners = Vec::new();
    for n in 0..3 {
        let id = format!("dev-{n}");
        let cred = f.enroll(n, &id);
        let (child, lines) = bin::listen(&["--echo"], &f.at(&cred, n));
        expect_line(&lines, &format!("connected as {id}"));
        listeners.push(child);
    }
    for n in 0..3 {
        f.await_sessions(n, &[("dev-0", 0), ("dev-1", 1), ("dev-2", 2)], 10);
    }
    // The table names the node of each session.
    let table = f.nodes[0].ok(&["sessions"]);
    assert!(table.contains("NODE"), "{table}");
    assert!(table.contains(&f.nodes[2].daemon.addr), "{table}");
    // `tallyd identities` on any node shows every device of the fleet online.
    let json = f.nodes[0].ok(&["identities", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    for row in rows.as_array().unwrap() {
        assert_eq!(row["online"], serde_json::Value::Bool(true), "{json}");
    }
    assert_eq!(rows.as_array().unwrap().len(), 3, "{json}");
    // Sessions that end release their claims: gone from every node's list.
    drop(listeners);
    f.await_sessions(1, &[], 10);
}

#[test]
fn a_node_killed_releases_its_claims_and_its_devices_reconnect_elsewhere() {
    let Some(mut f) = Fleet::start("fleet: kill -9", 2, "reject") else {
        return;
    };
    let a = f.nodes[0].daemon.addr.clone();
    let b = f.nodes[1].daemon.addr.clone();
    // Devices reach the fleet through a TCP pass-through balancer, node 0 first.
    let lb = Proxy::start(&[&a, &b]);
    let cred = f.enroll(0, "sensor-9");
    let cred = f.cred_for(&cred, &lb.addr.to_string(), "sensor-9-lb.cred");
    let (_dev, lines) = bin::listen(&["--echo"], &cred);
    expect_line(&lines, "connected as sensor-9");
    f.await_sessions(1, &[("sensor-9", 0)], 10);
    // kill -9: no CLOSE, no release, no goodbye to the database.
    let killed = Instant::now();
    f.nodes[0].daemon.child.kill().unwrap();
    f.nodes[0].daemon.child.wait().unwrap();
    // The device sees its connection drop and reconnects through the balancer to node
    // 1, which refuses it (takeover = "reject") while node 0's claim looks live...
    expect_line(&lines, "session lost");
    let refused = expect_line(&lines, "session takeover refused");
    eprintln!("{refused}");
    // ...and takes the claim once node 0's heartbeat is stale (5 s): the device is
    // served at its next attempt (the link waits 10 s or more after that refusal).
    f.await_sessions(1, &[("sensor-9", 1)], 40);
    eprintln!(
        "sensor-9 served by node 1 {:?} after the kill",
        killed.elapsed()
    );
    // The dead node is gone from the fleet's tables (the listing leaves a stale node
    // out at once; its row goes at node 1's next heartbeat, within a second), and the
    // node that declared it dead says so (issue 27).
    let deadline = Instant::now() + Duration::from_secs(3);
    while f.cluster.psql("SELECT count(*) FROM nodes") != "1" {
        assert!(Instant::now() < deadline, "node 0 was not declared dead");
        std::thread::sleep(Duration::from_millis(100));
    }
    let said = f.nodes[1]
        .daemon
        .expect_log(&["fleet: declared node", "dead: no heartbeat for"]);
    assert!(
        said.contains(&format!("({a})")) && said.contains("session claims it held, now free: 1"),
        "{said}"
    );
    let out = f.nodes[1].admin(&["send", "sensor-9", "--request", "still there?"]);
    assert_eq!(text(&out.stdout), "still there?", "{}", text(&out.stderr));
    // A restarted node 0 joins the fleet again (a new node) and serves.
    f.nodes[0] = f.start_node(0);
    let other = f.enroll(0, "sensor-10");
    let out = request(&f.at(&other, 0), "hi");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_node_cut_off_from_the_database_fences_itself_and_serves_again_after() {
    let Some(f) = Fleet::start("fleet: fencing", 1, "replace") else {
        return;
    };
    let cred = f.enroll(0, "cut-1");
    let (_dev, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as cut-1");
    // "connected" is printed once CLIENT_FINISH is sent (spec 7.2: one round trip);
    // the node's claim may still be on its way to the database.
    f.await_sessions(0, &[("cut-1", 0)], 10);
    // The database goes away: within FENCE_AFTER (3 s) the node closes its sessions,
    // since it can no longer hold their claims.
    let stopped = Instant::now();
    f.cluster.stop();
    let lost = expect_line(&lines, "session lost");
    eprintln!(
        "fenced {:?} after the database stopped: {lost}",
        stopped.elapsed()
    );
    assert!(lost.contains("SHUTDOWN") || lost.contains("shut"), "{lost}");
    f.nodes[0].daemon.expect_log(&["fencing this node"]);
    // Back: the node serves again and the device's link reconnects.
    f.cluster.restart();
    f.nodes[0].daemon.expect_log(&["the database is back"]);
    expect_line(&lines, "reconnected as cut-1");
}

// The races between a handshake's claim and its registration (a takeover, a fence, a
// loss of notices, a revocation in between) are decided by the fleet's state machine and
// the registry, and unit-tested there on a virtual clock (src/server/fleet/node.rs,
// src/server/registry.rs); they were reached here by sleeps compiled into debug builds.

/// A request at node `n` with `cred`, tried again (a claim or an index being caught
/// up with) until it is answered or `secs` pass: whether it was.
fn served_within(f: &Fleet, cred: &Path, n: usize, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if request(&f.at(cred, n), "anyone?").status.success() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_revocation_missed_while_not_listening_closes_the_session_when_back() {
    let test = "fleet: revocation missed";
    // Node 0 in a network of its own: its new connections to the database can be held
    // back while those it has open still work.
    let Some(f) = Fleet::start_with(test, 2, "replace", &[0], "") else {
        return;
    };
    let link = f.links[0].as_ref().unwrap();
    let cred = f.enroll(0, "missed-1");
    let other = f.at(&f.enroll(0, "missed-2"), 0);
    let (_dev, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as missed-1");
    f.await_sessions(0, &[("missed-1", 0)], 10);
    // Node 0's notification connection is cut (the others' are not), and it cannot
    // open a new one: its heartbeat and claims go on through the connections it has.
    link.set_faults(0, false, true);
    let addr = &f.nodes[0].daemon.addr;
    let node = f
        .cluster
        .psql(&format!("SELECT node FROM nodes WHERE addr = '{addr}'"));
    let cut = f.cluster.psql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'tallyd notices {node}'"
    ));
    assert_eq!(cut, "t", "node 0's notification connection not found");
    f.nodes[0]
        .daemon
        .expect_log(&["the notification connection failed"]);
    // Deaf to the fleet, node 0 registers no new session meanwhile (a takeover or a
    // revocation elsewhere would go unheard): another device is refused BUSY.
    let out = request(&other, "while deaf");
    assert!(
        !out.status.success(),
        "node 0 registered a session while deaf"
    );
    assert!(text(&out.stderr).contains("busy"), "{}", text(&out.stderr));
    // ...and the device is revoked on node 1 while node 0 cannot listen: node 0 never
    // hears of it, and must close the session when it catches up.
    let revoked = f.nodes[1].admin(&["revoke", "missed-1"]);
    assert!(revoked.status.success(), "{}", text(&revoked.stderr));
    link.heal();
    let line = expect_line(&lines, "revoked");
    eprintln!("{line}");
    f.nodes[0].daemon.expect_log(&[
        "a revocation verified under the fleet key",
        "session closed",
    ]);
    assert!(
        !served_within(&f, &cred, 0, 0),
        "node 0 served a revoked device"
    );
    // Caught up: node 0 serves again.
    assert!(
        served_within(&f, &other, 0, 10),
        "node 0 did not serve again"
    );
}

#[test]
fn a_claim_whose_release_failed_is_released_once_the_database_answers() {
    let Some(f) = Fleet::start("fleet: release retried", 2, "reject") else {
        return;
    };
    let cred = f.enroll(0, "held-1");
    let (dev, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as held-1");
    f.await_sessions(0, &[("held-1", 0)], 10);
    // The session ends while its claim cannot be deleted (the table is away)...
    f.cluster
        .psql("ALTER TABLE sessions RENAME TO sessions_away");
    drop(dev);
    std::thread::sleep(Duration::from_secs(1));
    f.cluster
        .psql("ALTER TABLE sessions_away RENAME TO sessions");
    // ...and is released later: with takeover = "reject", a claim left behind would
    // refuse the device everywhere else for as long as node 0 lives.
    assert!(
        served_within(&f, &cred, 1, 10),
        "node 1 still refuses held-1: node 0's claim was never released"
    );
    f.nodes[0].daemon.expect_log(&["could not release a claim"]);
}

#[test]
fn a_handshake_costs_the_database_one_claim_and_one_release() {
    let Some(f) = Fleet::start_with(
        "fleet: statements per handshake",
        1,
        "replace",
        &[],
        "metrics_listen = \"127.0.0.1:0\"\n",
    ) else {
        return;
    };
    let cred = f.at(&f.enroll(0, "counted-1"), 0);
    let addr = bin::metrics_addr(&f.nodes[0].daemon);
    let handshakes = "tally_handshakes_total{outcome=\"ok\"}";
    let before = bin::scrape(&addr);
    let started = Instant::now();
    const N: f64 = 20.0;
    for _ in 0..N as usize {
        assert!(request(&cred, "x").status.success());
    }
    f.await_sessions(0, &[], 10);
    let after = bin::scrape(&addr);
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        bin::metric(&after, handshakes) - bin::metric(&before, handshakes),
        N
    );
    // The key comes from the index (no statement); each session's claim and its
    // release are one statement each, the handshakes coming one at a time (under load
    // they share batches: server::fleet::node). Besides them only the node's own rhythm: three
    // statements per heartbeat and the notification connection's ping, each second,
    // and the last-seen times, written in batches (spec-free bookkeeping).
    let queries = bin::metric(&after, "tally_store_queries_total")
        - bin::metric(&before, "tally_store_queries_total");
    let rhythm = 4.0 * (secs.ceil() + 1.0) + 2.0;
    assert!(
        queries >= 2.0 * N && queries <= 2.0 * N + rhythm,
        "{queries} statements for {N} handshakes in {secs:.1} s"
    );
}

#[test]
fn a_claim_answered_after_its_handshake_gave_up_still_covers_the_live_session() {
    let Some(f) = Fleet::start("fleet: a late claim", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "late-1");
    let (_s1, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as late-1");
    f.await_sessions(1, &[("late-1", 0)], 10);
    late_claim(&f, &cred, "late-1");
    // ...and its claim, made once the lock is gone, names node 0 with a newer epoch.
    // It must not be released while the first session lives: that session would be
    // left without a claim, and another node could serve late-1 without closing it.
    std::thread::sleep(Duration::from_secs(2));
    f.await_sessions(1, &[("late-1", 0)], 1);
    let out = f.nodes[1].admin(&["send", "late-1", "--request", "still yours?"]);
    assert_eq!(text(&out.stdout), "still yours?", "{}", text(&out.stderr));
    // The covering claim does what it is kept for: a takeover on node 1 names its
    // (newer) epoch, and node 0 closes the older session with it.
    let (b, b_lines) = bin::listen(&["--echo", "--no-reconnect"], &f.at(&cred, 1));
    expect_line(&b_lines, "connected as late-1");
    let lost = expect_line(&lines, "session lost");
    assert!(
        lost.contains("TAKEN_OVER") || lost.contains("taken over"),
        "{lost}"
    );
    drop(_s1);
    f.await_sessions(0, &[("late-1", 1)], 10);
    // And nothing is left behind once the sessions end.
    drop(b);
    f.await_sessions(0, &[], 10);
    assert_eq!(
        f.cluster
            .psql("SELECT count(*) FROM sessions WHERE id = 'late-1'"),
        "0"
    );
}

#[test]
fn a_node_frozen_past_the_stale_limit_drops_its_sessions_when_it_wakes() {
    let Some(f) = Fleet::start("fleet: frozen node", 2, "reject") else {
        return;
    };
    let cred = f.enroll(0, "frozen-1");
    let (_dev, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as frozen-1");
    f.await_sessions(1, &[("frozen-1", 0)], 10);
    // Node 0 stops for 7 s (a VM paused, a stop-the-world): node 1 declares it dead
    // after 5 s, and its claims go with it.
    let pid = f.nodes[0].daemon.child.id().to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig} {pid}");
    };
    signal("-STOP");
    let frozen = Instant::now();
    f.await_sessions(1, &[], 10);
    assert!(
        frozen.elapsed() >= Duration::from_secs(4),
        "declared dead too soon"
    );
    // The listing leaves a stale node out at once; its row goes at node 1's next
    // heartbeat (within a second).
    let deadline = Instant::now() + Duration::from_secs(3);
    while f.cluster.psql("SELECT count(*) FROM nodes") != "1" {
        assert!(Instant::now() < deadline, "node 0 was not declared dead");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(7).saturating_sub(frozen.elapsed()));
    signal("-CONT");
    // Awake, it must not go on serving what the fleet gave away: it closes its
    // sessions, joins again, and serves the device afresh.
    let lost = expect_line(&lines, "session lost");
    assert!(lost.contains("SHUTDOWN") || lost.contains("shut"), "{lost}");
    f.nodes[0]
        .daemon
        .expect_log(&["this node was declared dead"]);
    expect_line(&lines, "reconnected as frozen-1");
    f.await_sessions(1, &[("frozen-1", 0)], 20);
}

/// Locks `id`'s claim row for 3 s while a second connection of it asks node 0 for a
/// session: the handshake gives up on its claim (2 s) and is refused BUSY; the claim
/// goes through once the lock is gone, after the handshake stopped waiting.
fn late_claim(f: &Fleet, cred: &Path, id: &str) {
    let cluster = &f.cluster;
    std::thread::scope(|scope| {
        let locker = scope.spawn(|| {
            cluster.psql(&format!(
                "BEGIN; SELECT 1 FROM sessions WHERE id = '{id}' FOR UPDATE; \
                 SELECT pg_sleep(3); COMMIT"
            ))
        });
        std::thread::sleep(Duration::from_millis(500));
        let second = request(&f.at(cred, 0), "second");
        assert!(!second.status.success(), "{}", text(&second.stdout));
        assert!(
            text(&second.stderr).contains("busy"),
            "{}",
            text(&second.stderr)
        );
        locker.join().unwrap();
    });
}

#[test]
fn a_late_claim_kept_for_a_live_session_is_released_when_that_session_ends() {
    let Some(f) = Fleet::start("fleet: a late claim released", 2, "reject") else {
        return;
    };
    let cred = f.enroll(0, "late-2");
    let (s1, lines) = bin::listen(&["--echo", "--no-reconnect"], &f.at(&cred, 0));
    expect_line(&lines, "connected as late-2");
    f.await_sessions(1, &[("late-2", 0)], 10);
    late_claim(&f, &cred, "late-2");
    std::thread::sleep(Duration::from_secs(1));
    // The first session ends: its own release names the older epoch, the kept claim
    // goes too, or node 1 would refuse late-2 (takeover = "reject") while node 0 lives.
    drop(s1);
    assert!(
        served_within(&f, &cred, 1, 5),
        "node 1 still refuses late-2: node 0's kept claim was left behind"
    );
}

#[test]
fn the_readme_fleet_configuration_runs_as_written() {
    // A database with TLS, its server certificate signed by a CA of the test's.
    let tls = common::postgres::Options {
        tls: true,
        ..Default::default()
    };
    let Some(cluster) = Cluster::start_with("fleet: the README's configuration", tls) else {
        return;
    };
    let f = Fleet::start_on(cluster, 1, "replace", vec![], "");
    // The node configuration of README "Running several daemons", with this machine's
    // address, directory, database and CA in place of the example's; its TLS settings
    // (sslmode=verify-full) as written.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = &readme[readme
        .find("## Running several daemons")
        .expect("README: Running several daemons")..];
    let open = "<<'TOML'\n";
    let start = section.find(open).expect("README: the node's config") + open.len();
    let toml = &section[start..start + section[start..].find("TOML\n").unwrap()];
    let dir = f.root.path().join("readme-node");
    let mut replaced = 0;
    let config: String = toml
        .lines()
        .map(|l| {
            let (key, _) = l.split_once(" = ").expect("key = value");
            let value = match key {
                "listen" => "127.0.0.1:0".to_owned(),
                "state_dir" => dir.display().to_string(),
                "store" => {
                    let url = l.split('"').nth(1).expect("store = \"URL\"");
                    let (_, query) = url.split_once('?').expect("README: the store URL's TLS");
                    assert!(query.contains("sslmode=verify-full"), "{query}");
                    let ca = query
                        .split('&')
                        .find_map(|p| p.strip_prefix("sslrootcert="))
                        .expect("README: sslrootcert");
                    let query = query.replace(ca, &f.cluster.ca().display().to_string());
                    format!("{}?{query}", f.cluster.url())
                }
                _ => return format!("{l}\n"),
            };
            replaced += 1;
            format!("{key} = \"{value}\"\n")
        })
        .collect();
    assert_eq!(replaced, 3, "README's node config changed: {toml}");
    let path = f.root.path().join("readme-node.toml");
    std::fs::write(&path, &config).unwrap();
    // As "every other node": the fleet's keys copied in, then `tallyd --config` with
    // that file: it joins the fleet and serves.
    keyed_dir(f.root.path(), "readme-node");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.arg("--config").arg(&path);
    let (daemon, _) = bin::start_cmd(cmd, false);
    let cred = f.enroll(0, "readme-1");
    let cred = f.cred_for(&cred, &daemon.addr, "readme-1-at-readme.cred");
    // The new node learns of the enrollment from its notification (tally_identity):
    // under load that can take longer than starting `tally request` does.
    let deadline = Instant::now() + Duration::from_secs(10);
    let out = loop {
        let out = request(&cred, "as written");
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(f.cluster.psql("SELECT count(*) FROM nodes"), "2");
}

#[test]
fn an_identity_taken_over_back_and_forth_across_nodes_is_reported() {
    let Some(f) = Fleet::start("fleet: ping-pong", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "twin-1");
    // Two devices sharing one identity, each reconnecting to its own node: every
    // connection takes the session over from the other, across the fleet.
    let mut previous: Option<(bin::KillOnDrop, std::sync::mpsc::Receiver<String>)> = None;
    for n in [0, 1, 0, 1] {
        // (A device taken over waits 10 s or more before it tries again: spec 7.3.)
        let (dev, lines) = bin::listen(&["--echo"], &f.at(&cred, n));
        expect_line(&lines, "connected as twin-1");
        if let Some((_old, old_lines)) = previous.take() {
            let lost = expect_line(&old_lines, "session lost");
            assert!(
                lost.contains("taken over") || lost.contains("TAKEN_OVER"),
                "{lost}"
            );
        }
        f.await_sessions(0, &[("twin-1", n)], 10);
        previous = Some((dev, lines));
    }
    // The third takeover within 60 s is the one reported, by the node that made it.
    f.nodes[1]
        .daemon
        .expect_log(&["twin-1", "taken over repeatedly", "across the fleet"]);
}

// What the database can and cannot do to the fleet (issue 26, docs/CLUSTER.md): a
// database role is storage and transport, never an authority.

/// Runs `sql` with psql as `user` (a role of the test cluster, trust authentication).
fn psql_as(f: &Fleet, user: &str, sql: &str) -> std::process::Output {
    let url = f
        .cluster
        .url()
        .replacen("postgres@", &format!("{user}@"), 1);
    Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &url,
            "-c",
            sql,
        ])
        .output()
        .unwrap()
}

/// The name of node `n` in the `nodes` table.
fn node_name(f: &Fleet, n: usize) -> String {
    let name = f.cluster.psql(&format!(
        "SELECT node FROM nodes WHERE addr = '{}'",
        f.nodes[n].daemon.addr
    ));
    assert!(!name.is_empty(), "node {n} is not in the nodes table");
    name
}

/// Enrolls `id` on node `from` and waits until node `to` serves it: node `to` has
/// applied every identity notice sent before that enrollment's (they come in order).
fn barrier(f: &Fleet, from: usize, to: usize, id: &str) {
    let cred = f.enroll(from, id);
    assert!(
        served_within(f, &cred, to, 20),
        "node {to} never heard of {id}, enrolled on node {from}"
    );
}

/// No line of `lines` says the session was lost (so far).
fn still_connected(lines: &std::sync::mpsc::Receiver<String>) {
    while let Ok(line) = lines.try_recv() {
        assert!(
            !line.contains("session lost") && !line.contains("closed by the server"),
            "the device's session ended: {line}"
        );
    }
}

#[test]
fn a_database_role_without_grants_cannot_close_a_session_by_notice() {
    // Fails on the code before issue 26: the forged `revoked` notice closed the session
    // with CLOSE REVOKED (and `tally listen` exited for good), the forged `tally_close`
    // with TAKEN_OVER.
    let Some(f) = Fleet::start("fleet: forged notices", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "forge-1");
    let (_device, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as forge-1");
    f.await_sessions(1, &[("forge-1", 0)], 10);
    let node = node_name(&f, 0);
    let epoch = f
        .cluster
        .psql("SELECT epoch FROM sessions WHERE id = 'forge-1'");
    // A role with no grant on any table: PUBLIC may connect, LISTEN and NOTIFY.
    f.cluster.psql("CREATE ROLE intruder LOGIN");
    let denied = psql_as(&f, "intruder", "SELECT count(*) FROM identities");
    assert!(
        !denied.status.success(),
        "the intruder role can read identities"
    );
    let forged = format!(
        "NOTIFY tally_identity, 'revoked forge-1'; \
         NOTIFY tally_identity, 'removed forge-1'; \
         NOTIFY tally_close, '{node} 9000000000 forge-1'; \
         NOTIFY tally_close, '{node} {epoch} other 9000000000 {} forge-1'",
        "00".repeat(32)
    );
    let out = psql_as(&f, "intruder", &forged);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Node 0 has applied the forged notices once it serves an identity enrolled after.
    barrier(&f, 1, 0, "forge-barrier");
    f.nodes[0]
        .daemon
        .expect_log(&["ignored (forged or replayed"]);
    still_connected(&lines);
    f.await_sessions(0, &[("forge-1", 0)], 1);
    let out = f.nodes[1].admin(&["send", "forge-1", "--request", "still here?"]);
    assert_eq!(text(&out.stdout), "still here?", "{}", text(&out.stderr));
    still_connected(&lines);
}

#[test]
fn a_send_written_into_the_database_is_not_delivered() {
    // Fails on the code before issue 26: a `sends` row and a `tally_send` notice written
    // by any role that can write the database reached the device as an authenticated
    // server REQUEST, and its --exec handler ran the payload.
    let Some(f) = Fleet::start("fleet: injected sends", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "cmd-1");
    let ran = f.root.path().join("ran");
    let exec = format!("cat >> {0}; echo >> {0}; printf done", ran.display());
    let (_device, lines) = bin::listen(&["--exec", &exec], &f.at(&cred, 0));
    expect_line(&lines, "connected as cmd-1");
    f.await_sessions(1, &[("cmd-1", 0)], 10);
    // Every send row is captured as it is written, to be replayed later.
    f.cluster.psql(
        "CREATE TABLE captured (LIKE sends); \
         CREATE FUNCTION capture() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO captured SELECT NEW.*; RETURN NEW; END $$; \
         CREATE TRIGGER capture AFTER INSERT ON sends FOR EACH ROW EXECUTE FUNCTION capture()",
    );
    let out = f.nodes[1].admin(&["send", "cmd-1", "--request", "genuine"]);
    assert_eq!(text(&out.stdout), "done", "{}", text(&out.stderr));
    // A forged send (no valid tag, whatever the rest says), and the genuine one again.
    let node = node_name(&f, 0);
    f.cluster.psql(&format!(
        "INSERT INTO sends (call, node, origin, id, epoch, request, payload, timeout_ms, \
           stamp, tag) \
         SELECT 4242, '{node}', 'nobody', 'cmd-1', epoch, true, 'forged', 5000, \
           (extract(epoch FROM clock_timestamp()) * 1000)::bigint, \
           decode(repeat('ab', 32), 'hex') FROM sessions WHERE id = 'cmd-1'; \
         SELECT pg_notify('tally_send', '{node} 4242'); \
         DELETE FROM sends WHERE call IN (SELECT call FROM captured); \
         INSERT INTO sends SELECT * FROM captured; \
         SELECT pg_notify('tally_send', node || ' ' || call) FROM captured"
    ));
    // Both are refused, each logged (the order they are taken in is the node's).
    let first = f.nodes[0]
        .daemon
        .expect_log(&["ignored (forged or replayed"]);
    let other = if first.contains("served before") {
        "a send whose tag does not verify"
    } else {
        "a send served before (replayed)"
    };
    f.nodes[0].daemon.expect_log(&[other]);
    // A genuine send after them goes through (so node 0 has taken the ones before).
    let out = f.nodes[1].admin(&["send", "cmd-1", "--request", "after"]);
    assert_eq!(text(&out.stdout), "done", "{}", text(&out.stderr));
    let handled = std::fs::read_to_string(&ran).unwrap();
    assert_eq!(handled, "genuine\nafter\n", "the device ran: {handled:?}");
    still_connected(&lines);
}

#[test]
fn a_revocation_survives_a_rollback_of_its_row() {
    // Fails on the code before issue 26: a key row copied before `tallyd revoke` and
    // written back (revoked = NULL) with a `NOTIFY ... enrolled` was served again.
    let Some(mut f) = Fleet::start("fleet: rollback", 2, "replace") else {
        return;
    };
    let revoked = f.enroll(0, "roll-1");
    let removed = f.enroll(0, "roll-2");
    assert!(served_within(&f, &revoked, 1, 20));
    f.cluster
        .psql("CREATE TABLE saved AS SELECT * FROM identities WHERE id LIKE 'roll-%'");
    // Every node confirms it read the entry (its heartbeat's acknowledgement).
    let said = f.nodes[0].ok(&["revoke", "roll-1"]);
    assert!(
        said.contains("confirmed by every node of the fleet (2)"),
        "{said}"
    );
    f.nodes[0].ok(&["remove", "roll-2"]);
    // A writer puts the old rows back, and tells the nodes.
    f.cluster.psql(
        "UPDATE identities i SET key = s.key, revoked = NULL FROM saved s \
           WHERE i.id = s.id AND i.id = 'roll-1'; \
         INSERT INTO identities SELECT * FROM saved WHERE id = 'roll-2'; \
         NOTIFY tally_identity, 'enrolled roll-1'; NOTIFY tally_identity, 'enrolled roll-2'",
    );
    barrier(&f, 0, 1, "roll-barrier");
    for n in 0..2 {
        for cred in [&revoked, &removed] {
            let out = request(&f.at(cred, n), "back?");
            assert!(
                !out.status.success(),
                "node {n} served {} after its rollback",
                cred.display()
            );
        }
    }
    // A node that starts afresh reads the log too.
    f.nodes.pop();
    f.nodes.push(f.start_node(1));
    for cred in [&revoked, &removed] {
        assert!(!request(&f.at(cred, 1), "back?").status.success());
    }
    // Deleting from the log itself is noticed: node 1 has verified three entries (the
    // fleet's open enrollment setting, two revocations), the database now holds one,
    // and it refuses to start.
    f.nodes.pop();
    f.cluster
        .psql("DELETE FROM fleet_log WHERE kind <> 'setting'");
    let err = refused_start(&f.root.path().join("node1.toml"));
    assert!(
        err.contains("it holds 1 verified entries, fewer than this node verified")
            && err.contains("3 entries"),
        "{err}"
    );
}

/// Starts `tallyd --config CONFIG`, which must refuse to start: its stderr.
fn refused_start(config: &Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tallyd"))
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{} started", config.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success(), "{err}");
    err
}

/// `tally enroll` of `id` with the open token at node `n`: its output.
fn enroll_open(f: &Fleet, n: usize, id: &str) -> std::process::Output {
    let token = f.nodes[0].ok(&["token"]);
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .env("TALLY_TOKEN", token.trim())
        .args([
            "enroll",
            "--id",
            id,
            "--server",
            &f.nodes[n].daemon.addr,
            "--out",
        ])
        .arg(f.root.path().join(format!("{id}.cred")))
        .output()
        .unwrap()
}

#[test]
fn open_enrollment_is_decided_once_for_the_fleet() {
    // Before issue 26 `open_enrollment` was each node's: one node left at the default
    // accepted the open token for the whole fleet.
    let Some(mut f) = Fleet::start_with(
        "fleet: open enrollment",
        1,
        "replace",
        &[],
        "open_enrollment = false",
    ) else {
        return;
    };
    // A node whose configuration says otherwise (here the default: on) joins: the
    // fleet's setting applies (off: nobody turned it on), and it says so.
    let dir = keyed_dir(f.root.path(), "node1");
    let path = config(f.root.path(), &f.cluster, "node1", "replace", "", None);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.arg("--config").arg(&path);
    let (daemon, _) = bin::start_cmd(cmd, false);
    let log = daemon.startup_log.join("\n");
    assert!(
        log.contains("open_enrollment = true, but open enrollment is off for the whole fleet"),
        "{log}"
    );
    f.nodes.push(Node { daemon, dir });
    let out = enroll_open(&f, 1, "open-1");
    assert!(!out.status.success(), "node 1 accepted the open token");
    assert_eq!(
        f.nodes[1].ok(&["open-enrollment"]).trim(),
        "open enrollment is off for the whole fleet"
    );
    // Turned on once, through any node, for every node.
    f.open_enrollment(true);
    f.nodes[1]
        .daemon
        .expect_log(&["open enrollment is on for the whole fleet now"]);
    let out = enroll_open(&f, 1, "open-2");
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A setting a database writer adds without the fleet key changes nothing, and
    // stops the log there (nothing past it is applied; no setting can be made, and no
    // enrollment either: one sealed before removals this node cannot read would be
    // ended on the nodes that read them).
    f.cluster.psql(
        "INSERT INTO fleet_log (seq, id, value, kind, at, tag) \
         SELECT max(seq) + 1, 'open_enrollment', 0, 'setting', 0, decode(repeat('00', 32), 'hex') \
           FROM fleet_log; \
         NOTIFY tally_identity, 'setting open_enrollment'",
    );
    f.nodes[1]
        .daemon
        .expect_log(&["does not verify under the fleet key"]);
    let out = enroll_open(&f, 1, "open-3");
    assert!(!out.status.success(), "enrolled past a damaged log");
    f.nodes[1]
        .daemon
        .expect_log(&["the fleet's log is damaged"]);
    let refused = f.nodes[0].admin(&["open-enrollment", "off"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("the fleet's log is damaged"),
        "{}",
        text(&refused.stderr)
    );
}

#[test]
fn a_burst_of_sends_through_another_node_is_capped_at_the_device() {
    // Issue 26: 120 sends injected into the database ran 120 handlers at once under
    // `tally listen --exec`. Through the fleet (authenticated sends from node 1 to a
    // device on node 0), the session still holds at most
    // limits.server_requests_in_flight (here 8) unanswered, and the others are refused
    // at once, saying why, back through the database.
    let Some(f) = Fleet::start_with(
        "fleet: send burst",
        2,
        "replace",
        &[],
        "[limits]\nserver_requests_in_flight = 8\n",
    ) else {
        return;
    };
    let cred = f.enroll(0, "burst-1");
    let started = f.root.path().join("started");
    // The handler never answers while the test runs.
    let exec = format!("echo >> {}; sleep 600", started.display());
    let (_device, lines) = bin::listen(&["--exec", &exec, "--max-handlers", "64"], &f.at(&cred, 0));
    expect_line(&lines, "connected as burst-1");
    f.await_sessions(1, &[("burst-1", 0)], 10);
    const BURST: usize = 20;
    let sends: Vec<_> = (0..BURST)
        .map(|i| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_tallyd"));
            cmd.arg("--state-dir")
                .arg(&f.nodes[1].dir)
                .args(["send", "burst-1", "--request", "--timeout", "5"])
                .arg(format!("burst {i}"));
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = sends
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let refused = outs
        .iter()
        .filter(|o| text(&o.stderr).contains("limits.server_requests_in_flight"))
        .count();
    assert!(outs.iter().all(|o| !o.status.success()));
    assert_eq!(
        refused,
        BURST - 8,
        "{:?}",
        outs.iter().map(|o| text(&o.stderr)).collect::<Vec<_>>()
    );
    let handlers = std::fs::read_to_string(&started).unwrap_or_default();
    assert_eq!(
        handlers.lines().count(),
        8,
        "handlers started at the device"
    );
}

// The second review of issue 26 (a database writer against the fleet's log), each attack
// performed; each passed on 48bf6df (the revocation was undone, or open enrollment
// turned on) and fails there.

#[test]
fn a_revocation_is_logged_whatever_a_writer_made_the_row_say() {
    let Some(f) = Fleet::start("fleet: premarked row", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "premark-1");
    assert!(served_within(&f, &cred, 1, 20));
    let (_device, lines) = bin::listen(&["--echo"], &f.at(&cred, 1));
    expect_line(&lines, "connected as premark-1");
    // The writer marks the row revoked: the operator's revoke found nothing to do, and
    // wrote nothing the other nodes would act on.
    f.cluster
        .psql("UPDATE identities SET revoked = 0 WHERE id = 'premark-1'");
    let said = f.nodes[0].ok(&["revoke", "premark-1"]);
    assert!(said.contains("premark-1: revoked"), "{said}");
    let lost = expect_line(&lines, "closed by the server");
    assert!(lost.contains("revoked"), "{lost}");
    // Unmarked again: still refused everywhere.
    f.cluster.psql(
        "UPDATE identities SET revoked = NULL WHERE id = 'premark-1'; \
         NOTIFY tally_identity, 'enrolled premark-1'",
    );
    barrier(&f, 1, 0, "premark-barrier");
    for n in 0..2 {
        assert!(
            !request(&f.at(&cred, n), "back?").status.success(),
            "node {n} serves it"
        );
    }
}

#[test]
fn a_generation_changed_by_a_writer_does_not_escape_a_revocation() {
    let Some(f) = Fleet::start("fleet: generation swap", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "swap-1");
    assert!(served_within(&f, &cred, 1, 20));
    let (_device, lines) = bin::listen(&["--echo"], &f.at(&cred, 1));
    expect_line(&lines, "connected as swap-1");
    // The writer moves the row to another generation before the revocation (which
    // named the database's generation, and so missed the live one), and back after.
    f.cluster.psql(
        "CREATE TABLE saved AS SELECT * FROM identities WHERE id = 'swap-1'; \
         UPDATE identities SET generation = generation + 1000000 WHERE id = 'swap-1'",
    );
    f.nodes[0].ok(&["revoke", "swap-1"]);
    let lost = expect_line(&lines, "closed by the server");
    assert!(lost.contains("revoked"), "{lost}");
    let out = f.nodes[0].admin(&["send", "swap-1", "--request", "still here?"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    f.cluster.psql(
        "UPDATE identities i SET generation = s.generation, key = s.key, revoked = NULL \
           FROM saved s WHERE i.id = s.id; NOTIFY tally_identity, 'enrolled swap-1'",
    );
    barrier(&f, 1, 0, "swap-barrier");
    barrier(&f, 0, 1, "swap-barrier2");
    for n in 0..2 {
        assert!(
            !request(&f.at(&cred, n), "back?").status.success(),
            "node {n} serves it"
        );
    }
}

#[test]
fn a_log_entry_deleted_and_its_number_reused_hides_no_revocation() {
    let Some(mut f) = Fleet::start("fleet: reused number", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "reuse-1");
    assert!(served_within(&f, &cred, 1, 20));
    // The writer deletes the newest entry (the fleet's setting): the next revocation
    // would have taken its number, and no running node would have read it.
    f.cluster
        .psql("DELETE FROM fleet_log WHERE seq = (SELECT max(seq) FROM fleet_log)");
    let out = f.nodes[0].admin(&["revoke", "reuse-1"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("the fleet's log is damaged")
            && text(&out.stderr).contains("entry 1, which this node verified, is gone"),
        "{}",
        text(&out.stderr)
    );
    // A node that saw the deleted entry does not start on the database without it.
    f.nodes.pop();
    let err = refused_start(&f.root.path().join("node1.toml"));
    assert!(err.contains("fewer than this node verified"), "{err}");
}

#[test]
fn a_writer_and_a_fresh_node_cannot_turn_open_enrollment_on() {
    let Some(f) = Fleet::start("fleet: open enrollment flip", 1, "replace") else {
        return;
    };
    f.open_enrollment(false);
    assert!(!enroll_open(&f, 0, "flip-0").status.success());
    // The writer spoils the setting's entry; a node with an empty state directory and
    // the default configuration (open_enrollment = true) starts: it writes nothing, and
    // it does not start on a log that does not verify.
    f.cluster
        .psql("UPDATE fleet_log SET tag = decode(repeat('00', 32), 'hex') WHERE kind = 'setting'");
    keyed_dir(f.root.path(), "fresh");
    let path = config(f.root.path(), &f.cluster, "fresh", "replace", "", None);
    let err = refused_start(&path);
    assert!(err.contains("does not verify under the fleet key"), "{err}");
    assert!(!enroll_open(&f, 0, "flip-1").status.success());
}

#[test]
fn a_flood_of_notices_costs_the_node_reads_not_memory() {
    // The reviews of issue 26: every notice was queued without a bound, so a role that
    // may only connect could grow a node's memory at will; then a full queue made the
    // node deaf (BUSY to every handshake) while it caught up. Beyond 4096 identity
    // notices waiting, the node reads every key again, and goes on serving.
    let Some(f) = Fleet::start("fleet: notice flood", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "flood-1");
    let other = f.enroll(0, "flood-2");
    let (_device, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as flood-1");
    f.await_sessions(1, &[("flood-1", 0)], 10);
    f.cluster.psql("CREATE ROLE intruder LOGIN");
    let out = psql_as(
        &f,
        "intruder",
        "SELECT count(pg_notify('tally_identity', 'enrolled flood-' || g)) \
         FROM generate_series(1, 20000) g",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Read again, without refusing anyone meanwhile (the second review: each node
    // stopped registering sessions, BUSY, while it caught up).
    f.nodes[0]
        .daemon
        .expect_log(&["every key read again after a flood of identity notices"]);
    still_connected(&lines);
    assert!(request(&f.at(&other, 0), "a new session").status.success());
    let out = f.nodes[1].admin(&["send", "flood-1", "--request", "still here?"]);
    assert_eq!(text(&out.stdout), "still here?", "{}", text(&out.stderr));
}

#[test]
fn a_log_entry_a_writer_keeps_out_of_the_table_fails_the_revocation() {
    // The third review of issue 26: an append was never confirmed, so a rule that
    // swallowed the INSERT let `tallyd revoke` report "revoked" while no node would
    // ever hear of it. It is read back now, and refused when it is not there.
    let Some(f) = Fleet::start("fleet: swallowed entry", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "swallow-1");
    assert!(served_within(&f, &cred, 1, 20));
    f.cluster
        .psql("CREATE RULE hide AS ON INSERT TO fleet_log DO INSTEAD NOTHING");
    let out = f.nodes[0].admin(&["revoke", "swallow-1"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("did not take the entry"),
        "{}",
        text(&out.stderr)
    );
    let out = f.nodes[0].admin(&["open-enrollment", "off"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn a_revocation_by_a_node_that_never_held_the_key_holds_after_restarts() {
    // The third review of issue 26: a revocation ended the generations its node knew of,
    // and each reader's own, which a restart forgot. Each enrollment is sealed with its
    // place in the log now: a later revocation ends it on every node, restarted or not.
    let Some(mut f) = Fleet::start("fleet: revoked unseen", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "unseen-1");
    assert!(served_within(&f, &cred, 1, 20));
    f.cluster
        .psql("CREATE TABLE saved AS SELECT * FROM identities WHERE id = 'unseen-1'");
    // Node 0 restarts while a writer has taken the key out of the row: it never holds
    // it, and revokes the identity on the row's word.
    let n0 = f.nodes.remove(0);
    drop(n0);
    f.cluster
        .psql("UPDATE identities SET key = NULL WHERE id = 'unseen-1'");
    f.nodes.insert(0, f.start_node(0));
    f.nodes[0].ok(&["revoke", "unseen-1"]);
    // Node 1 restarts (whatever it held is gone from memory), and the writer puts the
    // key back, unrevoked.
    f.nodes.pop();
    f.nodes.push(f.start_node(1));
    f.cluster.psql(
        "UPDATE identities i SET key = s.key, revoked = NULL FROM saved s WHERE i.id = s.id; \
         NOTIFY tally_identity, 'enrolled unseen-1'",
    );
    barrier(&f, 0, 1, "unseen-barrier");
    for n in 0..2 {
        assert!(
            !request(&f.at(&cred, n), "back?").status.success(),
            "node {n} serves it"
        );
    }
}

#[test]
fn a_node_that_cannot_read_what_another_verified_fences_itself() {
    // The fourth review of issue 26: a database writer can show each node its own
    // fleet_log (row security, a view), hiding a revocation from all but the node that
    // wrote it. Each node acknowledges in its heartbeat (tagged) how far it verified the
    // log; one that sees another ahead of what it can read fences itself until it can.
    // Here a node of the fleet that verified three entries more is played with the fleet
    // key (the test holds store.key, as every node does).
    let Some(f) = Fleet::start("fleet: hidden entries", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "hidden-1");
    let (_device, lines) = bin::listen(&["--echo", "--no-reconnect"], &f.at(&cred, 1));
    expect_line(&lines, "connected as hidden-1");
    let store_key = std::fs::read_to_string(f.nodes[0].dir.join("store.key")).unwrap();
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(store_key.trim(), &mut bytes).unwrap();
    let key =
        tally::store::fleet_key::FleetKey::derive(&tally::proto::SecretKey::from_bytes(bytes));
    let seen: i64 = f
        .cluster
        .psql("SELECT coalesce(max(seq), 0) FROM fleet_log")
        .parse()
        .unwrap();
    let ahead = seen + 3;
    let head = [7u8; 32];
    let tag = key.tag(
        tally::store::fleet_key::Statement::LogAck,
        &[b"ghost", &ahead.to_be_bytes(), &head],
    );
    f.cluster.psql(&format!(
        "INSERT INTO nodes (node, addr, log_seen, log_head, log_tag) \
         VALUES ('ghost', '127.0.0.1:9', {ahead}, decode('{}', 'hex'), decode('{}', 'hex'))",
        hex::encode(head),
        hex::encode(tag)
    ));
    f.nodes[1]
        .daemon
        .expect_log(&["has verified entries of the fleet's log that this node cannot read"]);
    let lost = expect_line(&lines, "session");
    assert!(lost.contains("shut") || lost.contains("SHUTDOWN"), "{lost}");
    assert!(!request(&f.at(&cred, 0), "now?").status.success());
    // The same acknowledgement without the fleet key's tag changes nothing.
    f.cluster.psql(&format!(
        "DELETE FROM nodes WHERE node = 'ghost'; \
         INSERT INTO nodes (node, addr, log_seen, log_head, log_tag) \
         VALUES ('forged', '127.0.0.1:9', {ahead}, decode('{}', 'hex'), decode(repeat('00', 32), 'hex'))",
        hex::encode(head)
    ));
    f.nodes[0]
        .daemon
        .expect_log(&["reads every entry of the fleet's log the others verified again"]);
    assert!(served_within(&f, &cred, 0, 20));
}

#[test]
fn a_revoked_id_stays_taken_when_a_writer_deletes_its_row() {
    // The fourth review of issue 26: after `tallyd revoke X`, a writer deleting X's row
    // freed X for anyone holding the open token, who then received X's requests. A
    // revoked id stays taken, as its row keeps it with one daemon; a removal frees it.
    let Some(f) = Fleet::start("fleet: revoked id re-claimed", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "claimed-1");
    assert!(served_within(&f, &cred, 1, 20));
    f.nodes[0].ok(&["revoke", "claimed-1"]);
    f.cluster
        .psql("DELETE FROM identities WHERE id = 'claimed-1'");
    std::fs::remove_file(&cred).unwrap();
    for n in 0..2 {
        let out = enroll_open(&f, n, "claimed-1");
        assert!(
            !out.status.success(),
            "node {n} enrolled the revoked id again"
        );
        assert!(
            text(&out.stderr).contains("identity taken"),
            "{}",
            text(&out.stderr)
        );
    }
    // Removed, it is free again (a replaced device).
    f.nodes[0].ok(&["remove", "claimed-1"]);
    let out = enroll_open(&f, 1, "claimed-1");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Found in review of the batched claims: a release of every claim of an id (sent for
/// a claim whose answer never came) that reaches the database late, after the node
/// gave up on it and made a newer claim of the id, must not delete that newer claim:
/// it names the node's batch it was sent in, and deletes only claims of batches before.
#[test]
fn a_late_release_of_every_claim_of_an_id_spares_a_later_batch_s_claim() {
    let Some(f) = Fleet::start("fleet: late release_all", 1, "replace") else {
        return;
    };
    let claims = |batch: u64, all: &str, ids: &str| {
        f.cluster.psql(&format!(
            "SELECT count(*) FROM tally_claims('late-node', false, 5000, {batch}, '{{}}', '{{}}', \
             '{{{all}}}', '{{{ids}}}', '{{{ids}}}', '{{{live}}}', '{{}}')",
            live = if ids.is_empty() { "" } else { "false" }
        ))
    };
    let held = || {
        f.cluster
            .psql("SELECT count(*) FROM sessions WHERE id = 'late-1' AND node = 'late-node'")
            .trim()
            .to_owned()
    };
    f.cluster
        .psql("INSERT INTO nodes (node, addr) VALUES ('late-node', '127.0.0.1:1')");
    // Batch 5 claims late-1; the release of every claim of it sent in batch 3 runs
    // after (late): the claim stays.
    assert_eq!(claims(5, "", "late-1").trim(), "1");
    assert_eq!(held(), "1");
    claims(3, "late-1", "");
    assert_eq!(held(), "1", "a late release deleted a later batch's claim");
    // Sent in batch 6, after it: released.
    claims(6, "late-1", "");
    assert_eq!(
        held(),
        "0",
        "the release of a claim of an earlier batch did nothing"
    );
}

// Faults between machines (issue 29, item 4), on one machine: a node in a network
// namespace of its own (tests/common/netns.rs: nftables drops its packets to and from
// the database at random or all of them; a delay line holds its bytes), the database
// crashed and restarted, a node's wall clock stepped. Each checks the fleet's rules
// (docs/CLUSTER.md, "What is model-checked") from outside: through the devices, `tallyd
// sessions` and the database's claims.

/// Whether node `n` says (`tallyd status --json`) it is fenced.
fn fenced(f: &Fleet, n: usize) -> bool {
    let json = f.nodes[n].ok(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["fleet"]["fenced"].as_bool().expect("a node of a fleet")
}

/// The claims in the database: (id, the listening address of the node holding it).
fn claims(f: &Fleet) -> String {
    f.cluster.psql(
        "SELECT string_agg(s.id || '@' || n.addr, ' ' ORDER BY s.id) \
         FROM sessions s JOIN nodes n USING (node)",
    )
}

#[test]
fn latency_and_loss_between_a_node_and_the_database_break_no_rule() {
    let test = "fleet faults: latency and loss";
    let Some(f) = Fleet::start_with(test, 2, "reject", &[0], "") else {
        return;
    };
    let link = f.links[0].as_ref().unwrap();
    let cred = f.enroll(1, "lossy-1");
    // 40 ms each way between node 0 and the database, and 5% of its packets lost each
    // way (TCP retransmits them: a statement now and then takes 200 ms more, or 600).
    link.set_delay(Duration::from_millis(40));
    link.set_faults(5, false, false);
    for round in 0..3 {
        // A device at the slow node is served...
        let (dev, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
        expect_line(&lines, "connected as lossy-1");
        f.await_sessions(1, &[("lossy-1", 0)], 20);
        // ...the other node refuses it a second session while it lives (reject)...
        let out = request(&f.at(&cred, 1), "second");
        assert!(!out.status.success(), "round {round}: two live sessions");
        assert!(
            text(&out.stderr).contains("session takeover refused"),
            "round {round}: {}",
            text(&out.stderr)
        );
        // ...and once it is gone, its claim is released through the slow, lossy link
        // (no claim leaked): the other node serves it.
        drop(dev);
        let gone = Instant::now();
        assert!(
            served_within(&f, &cred, 1, 15),
            "round {round}: node 1 never served the device after it left node 0"
        );
        eprintln!(
            "round {round}: served by node 1 {:?} after it left node 0",
            gone.elapsed()
        );
    }
    // The heartbeat held on such a link: node 0 was neither fenced nor declared dead.
    assert!(!fenced(&f, 0));
    assert_eq!(f.cluster.psql("SELECT count(*) FROM nodes"), "2");
    assert_eq!(claims(&f), "", "a claim was leaked");
}

#[test]
fn a_node_partitioned_from_the_database_fences_before_another_serves_its_devices() {
    let test = "fleet faults: partition";
    let Some(f) = Fleet::start_with(test, 2, "reject", &[0], "") else {
        return;
    };
    let link = f.links[0].as_ref().unwrap();
    let cred = f.enroll(1, "part-1");
    let (a, a_lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&a_lines, "connected as part-1");
    f.await_sessions(1, &[("part-1", 0)], 10);
    // Node 0 is cut off from the database: its packets vanish (no reset: its
    // connections hang, as across a broken network). Its devices keep reconnecting
    // through node 1, which refuses them while node 0 may still serve (reject).
    link.set_faults(0, true, false);
    let cut = Instant::now();
    let mut lost = None;
    let served = loop {
        while let Ok(line) = a_lines.try_recv() {
            if line.contains("session lost") {
                lost.get_or_insert(Instant::now());
            }
        }
        if request(&f.at(&cred, 1), "through node 1").status.success() {
            break Instant::now();
        }
        assert!(
            cut.elapsed() < Duration::from_secs(20),
            "node 1 never served the device of a node cut off"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // Node 0 closed its session (fenced, FENCE_AFTER = 3 s) before node 1 served the
    // identity (node 0 dead by the database's clock, STALE = 5 s): never two serving.
    let lost = lost.expect("node 1 served the device while node 0 still served it");
    assert!(lost < served);
    eprintln!(
        "node 0's session closed {:?} after the cut; node 1 served {:?} after it",
        lost - cut,
        served - cut
    );
    f.nodes[0].daemon.expect_log(&["fencing this node"]);
    // The device settles on node 1 (its connection through node 0 stops trying).
    drop(a);
    let (_b, b_lines) = bin::listen(&["--echo"], &f.at(&cred, 1));
    expect_line(&b_lines, "connected as part-1");
    f.await_sessions(1, &[("part-1", 1)], 10);
    // The network heals: node 0 finds it was declared dead, joins again, and serves
    // again; the device's one session stays on node 1, which node 0 routes to.
    link.heal();
    f.nodes[0]
        .daemon
        .expect_log(&["this node was declared dead"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while fenced(&f, 0) {
        assert!(Instant::now() < deadline, "node 0 never served again");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = request(&f.at(&cred, 0), "second");
    assert!(!out.status.success(), "two live sessions after the heal");
    let out = f.nodes[0].admin(&["send", "part-1", "--request", "who?"]);
    assert_eq!(text(&out.stdout), "who?", "{}", text(&out.stderr));
    f.await_sessions(0, &[("part-1", 1)], 10);
    assert_eq!(claims(&f), format!("part-1@{}", f.nodes[1].daemon.addr));
}

#[test]
fn a_database_crash_and_restart_leaves_one_session_per_identity() {
    let Some(f) = Fleet::start("fleet faults: database crash", 2, "reject") else {
        return;
    };
    let (one, two) = (f.enroll(0, "crash-1"), f.enroll(1, "crash-2"));
    let (_a, a_lines) = bin::listen(&["--echo"], &f.at(&one, 0));
    let (_b, b_lines) = bin::listen(&["--echo"], &f.at(&two, 1));
    expect_line(&a_lines, "connected as crash-1");
    expect_line(&b_lines, "connected as crash-2");
    let both = [("crash-1", 0), ("crash-2", 1)];
    f.await_sessions(0, &both, 10);
    // The database crashes and comes back 2 s later: its connections are cut, and its
    // UNLOGGED tables (nodes, claims, sends) come back empty: every node was "declared
    // dead", every claim is gone.
    f.cluster.crash();
    std::thread::sleep(Duration::from_secs(2));
    f.cluster.restart();
    // The nodes find out, close their sessions, join again; the devices reconnect and
    // each identity is served by one node again, with its claim in the database.
    expect_line(&a_lines, "reconnected as crash-1");
    expect_line(&b_lines, "reconnected as crash-2");
    for n in 0..2 {
        f.await_sessions(n, &both, 30);
    }
    assert_eq!(
        claims(&f),
        format!(
            "crash-1@{} crash-2@{}",
            f.nodes[0].daemon.addr, f.nodes[1].daemon.addr
        )
    );
    // Each node listens for notices again: a revocation after the restart ends the
    // session on whichever node holds it, and the identity gets no new one.
    f.nodes[1].ok(&["revoke", "crash-1"]);
    expect_line(&a_lines, "revoked");
    f.await_sessions(1, &[("crash-2", 1)], 10);
    for n in 0..2 {
        assert!(
            !served_within(&f, &one, n, 0),
            "node {n} served a revoked identity"
        );
    }
}

/// libfaketime's multi-threaded library, if installed.
fn faketime_lib(test: &str) -> Option<PathBuf> {
    let found = std::fs::read_dir("/usr/lib")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: libfaketime is required under CI (.ci/run installs faketime)"
        );
        eprintln!("SKIPPED {test}: libfaketime not found (apt-get install faketime)");
    }
    found
}

/// Starts node `n` again under libfaketime (`lib`): its wall clock is offset by what
/// the returned file says (`+0` to start with; `+600s` ten minutes ahead), read at
/// every call; its monotonic clock is left alone.
fn with_a_clock_of_its_own(f: &mut Fleet, n: usize, lib: &Path) -> PathBuf {
    let clock = f.root.path().join(format!("node{n}-clock"));
    std::fs::write(&clock, "+0\n").unwrap();
    let _ = f.nodes[n].daemon.child.kill();
    let _ = f.nodes[n].daemon.child.wait();
    let env: [(&str, &std::ffi::OsStr); 4] = [
        ("LD_PRELOAD", lib.as_os_str()),
        ("FAKETIME_TIMESTAMP_FILE", clock.as_os_str()),
        ("FAKETIME_NO_CACHE", "1".as_ref()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".as_ref()),
    ];
    f.nodes[n] = f.start_node_env(n, &env);
    clock
}

#[test]
fn a_wall_clock_step_on_one_node_breaks_no_rule() {
    let test = "fleet faults: clock step";
    let Some(lib) = faketime_lib(test) else {
        return;
    };
    let Some(mut f) = Fleet::start(test, 2, "reject") else {
        return;
    };
    // Node 1 again, its wall clock under the test's hand (its monotonic clock is
    // untouched, as when an operator or a bad NTP server steps a machine's clock).
    let clock = with_a_clock_of_its_own(&mut f, 1, &lib);
    let cred = f.enroll(0, "clock-1");
    let (dev, lines) = bin::listen(&["--echo"], &f.at(&cred, 1));
    expect_line(&lines, "connected as clock-1");
    f.await_sessions(0, &[("clock-1", 1)], 10);
    // Node 1's clock jumps ten minutes ahead.
    std::fs::write(&clock, "+600s\n").unwrap();
    // Liveness is judged by the database's clock and each node's monotonic one: past
    // STALE, neither node is fenced nor declared dead, and the session lives on.
    std::thread::sleep(STALE_AND_A_BIT);
    assert_eq!(f.cluster.psql("SELECT count(*) FROM nodes"), "2");
    assert!(!fenced(&f, 0) && !fenced(&f, 1));
    still_connected(&lines);
    // One session per identity still: node 0 refuses a second (reject).
    let out = request(&f.at(&cred, 0), "second");
    assert!(!out.status.success(), "two live sessions");
    // A send through node 0 to the device on node 1 is stamped by node 0's clock: node
    // 1 refuses it (it could not tell it from a replay) and says why, at once.
    let asked = Instant::now();
    let out = f.nodes[0].admin(&["send", "clock-1", "--request", "hi", "--timeout", "10"]);
    assert!(
        !out.status.success(),
        "served across a ten-minute clock step"
    );
    assert!(
        text(&out.stderr).contains("clocks differ"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the origin waited out its timeout"
    );
    // The clock set right: sends go through again.
    std::fs::write(&clock, "+0\n").unwrap();
    let out = f.nodes[0].admin(&["send", "clock-1", "--request", "hi"]);
    assert_eq!(text(&out.stdout), "hi", "{}", text(&out.stderr));
    // The device leaves; its claim is released: node 0 serves it.
    drop(dev);
    assert!(served_within(&f, &cred, 0, 10));
}

/// Longer than a node takes to be declared dead (`STALE`, 5 s), with a heartbeat to
/// spare.
const STALE_AND_A_BIT: Duration = Duration::from_secs(7);

/// A takeover that is never announced (here: a database writer deletes the claim of a
/// live session, and the device's second connection claims the free identity on the
/// other node without a word to the first): the first node's audit of its claims finds
/// its session uncovered and closes it, within `AUDIT_EVERY` (30 s).
#[test]
fn a_session_whose_claim_is_gone_unannounced_is_closed_by_the_audit() {
    let Some(f) = Fleet::start("fleet: audit", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "audit-1");
    let (a, a_lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&a_lines, "connected as audit-1");
    f.await_sessions(1, &[("audit-1", 0)], 10);
    f.cluster.psql("DELETE FROM sessions WHERE id = 'audit-1'");
    let (_b, b_lines) = bin::listen(&["--echo"], &f.at(&cred, 1));
    expect_line(&b_lines, "connected as audit-1");
    let since = Instant::now();
    // Node 1 holds the only claim; node 0 still serves the device's first session,
    // unaware: its audit must close it.
    let deadline = Duration::from_secs(40);
    let closed = loop {
        match a_lines.recv_timeout(deadline.saturating_sub(since.elapsed())) {
            Ok(line) if line.contains("session lost") => break line,
            Ok(_) => {}
            Err(_) => panic!("node 0 kept a session whose claim was gone for {deadline:?}"),
        }
    };
    eprintln!("closed {:?} after the takeover: {closed}", since.elapsed());
    assert!(
        closed.contains("TAKEN_OVER") || closed.contains("taken over"),
        "{closed}"
    );
    // The first connection stops there (it would take the identity back on node 0).
    drop(a);
    f.nodes[0]
        .daemon
        .expect_log(&["a session whose claim is gone or another node's"]);
    f.await_sessions(0, &[("audit-1", 1)], 10);
}

/// A send that was served, replayed by the database once its stamp is too old for the
/// serving node's clock: never answered "refused" (its origin may still wait for the
/// device's answer; a verified "not delivered" would invite it to send a request that
/// ran already again). Fails on e567edb, which checked the stamp before the replay and
/// answered such a send "refused".
#[test]
fn a_replayed_send_is_not_answered_refused_by_a_node_whose_clock_moved_on() {
    let test = "fleet: replayed send past its stamp";
    let Some(lib) = faketime_lib(test) else {
        return;
    };
    let Some(mut f) = Fleet::start(test, 2, "replace") else {
        return;
    };
    // Node 0 serves the device; its wall clock is the test's (the attacker's patience:
    // stepping it stands in for waiting a minute).
    let clock = with_a_clock_of_its_own(&mut f, 0, &lib);
    let cred = f.enroll(1, "replay-1");
    let (_device, lines) = bin::listen(&["--echo"], &f.at(&cred, 0));
    expect_line(&lines, "connected as replay-1");
    f.await_sessions(1, &[("replay-1", 0)], 10);
    // The database keeps every send row as it is written, answer and all.
    f.cluster.psql(
        "CREATE TABLE captured (LIKE sends); \
         CREATE FUNCTION capture() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO captured SELECT NEW.*; RETURN NEW; END $$; \
         CREATE TRIGGER capture AFTER INSERT ON sends FOR EACH ROW EXECUTE FUNCTION capture()",
    );
    let out = f.nodes[1].admin(&["send", "replay-1", "--request", "once"]);
    assert_eq!(text(&out.stdout), "once", "{}", text(&out.stderr));
    // Node 0's clock moves on past the send's stamp window; the row is replayed.
    std::fs::write(&clock, "+120s\n").unwrap();
    f.cluster.psql(
        "DELETE FROM sends WHERE call IN (SELECT call FROM captured); \
         INSERT INTO sends SELECT * FROM captured; \
         SELECT pg_notify('tally_send', node || ' ' || call) FROM captured",
    );
    f.nodes[0].daemon.expect_log(&[
        "ignored (forged or replayed",
        "a send served before (replayed)",
    ]);
    // Nothing answered: the row is as the replay left it.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        f.cluster
            .psql("SELECT done FROM sends WHERE call IN (SELECT call FROM captured)"),
        "f",
        "the replayed send was answered"
    );
    still_connected(&lines);
}

// Queued delivery in a fleet (spec 8.8, docs/CLUSTER.md "Queued delivery"): the queue is
// the shared store's; a message queued on any node is delivered by the node holding the
// device's session, and its outcome reaches the node it was queued on.

/// A `tally listen --exec` handler that appends each payload to `log` and answers
/// `done PAYLOAD`; with `gate`, it first touches `gate.0` and waits for `gate.1`.
fn logging_handler(log: &Path, gate: Option<(&Path, &Path)>) -> String {
    let wait = match gate {
        Some((started, go)) => format!(
            "touch {}; while [ ! -f {} ]; do sleep 0.05; done; ",
            started.display(),
            go.display()
        ),
        None => String::new(),
    };
    format!(
        "p=$(cat); echo \"$p\" >> {}; {wait}printf 'done %s' \"$p\"",
        log.display()
    )
}

/// The payloads `logging_handler` handled, in order.
fn handled(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits (up to 20 s) until `tallyd queue ID --json` on node `n` lists `want` ids.
fn await_queue(f: &Fleet, n: usize, id: &str, want: &[u64]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let json = f.nodes[n].ok(&["queue", id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let ids: Vec<u64> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["msg_id"].as_u64().unwrap())
            .collect();
        if ids == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the queue of {id} is {ids:?}, not {want:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_message_queued_on_one_node_reaches_the_device_on_another_and_its_answer_comes_back() {
    let Some(f) = Fleet::start("fleet: queued delivery", 2, "replace") else {
        return;
    };
    // Enrolled on node 1 and queued there at once, while the device is offline: stored
    // in the fleet's store, which every node lists. (Node 0 may hear of the message
    // before it has indexed the new identity: its first session looks anyway.)
    let cred = f.enroll(1, "meter-7");
    let id = f.nodes[1].ok(&["send", "meter-7", "--queue", "--request", "offline?"]);
    assert_eq!(id.trim(), "1");
    await_queue(&f, 0, "meter-7", &[1]);
    let table = f.nodes[0].ok(&["identities"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("meter-7") && l.contains(" 1 ")),
        "QUEUED column: {table}"
    );
    // The device connects to node 0: the message is delivered there and acknowledged,
    // and leaves the queue.
    let log = f.root.path().join("meter-7.log");
    let (_dev, lines) = bin::listen(&["--exec", &logging_handler(&log, None)], &f.at(&cred, 0));
    expect_line(&lines, "connected as meter-7");
    await_queue(&f, 1, "meter-7", &[]);
    assert_eq!(handled(&log), ["offline?"]);
    // Queued on node 1 for the device online on node 0, waiting: node 0 hears of it
    // (tally_queued), delivers it, and the device's answer comes back to node 1.
    let sent = Instant::now();
    let out = f.nodes[1].admin(&[
        "send",
        "meter-7",
        "--queue",
        "--request",
        "--wait",
        "20s",
        "online?",
    ]);
    let took = sent.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "done online?");
    assert!(
        text(&out.stderr).contains("meter-7 acknowledged message 2"),
        "{}",
        text(&out.stderr)
    );
    eprintln!("queued on node 1, delivered on node 0, answered back on node 1 in {took:?}");
    // A one-way message queued on node 0, where the session is: told there.
    let out = f.nodes[0].admin(&["send", "meter-7", "--queue", "--wait", "20s", "note"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "3");
    // (`tally listen` acknowledges a message as it prints it: no handler runs.)
    assert_eq!(handled(&log), ["offline?", "online?"]);
    // Removing the identity (on node 1) withdraws what is still queued for it.
    drop(_dev);
    f.await_sessions(1, &[], 10);
    // Offline, a message that may wait a second: the sweep (of whichever node) expires
    // it, and its sender on node 1 is told.
    let out = f.nodes[1].admin(&[
        "send", "meter-7", "--queue", "--ttl", "1s", "--wait", "20s", "stale",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("message 4 for meter-7: expired"),
        "{}",
        text(&out.stderr)
    );
    f.nodes[0].ok(&["send", "meter-7", "--queue", "later"]);
    f.nodes[1].ok(&["remove", "meter-7"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.cluster.psql("SELECT count(*) FROM queue") != "0" {
        assert!(
            Instant::now() < deadline,
            "the removed identity's queue stays"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A device (`id`) behind a balancer over both nodes, its session on node 0, its
/// handler held at `go` (the `logging_handler` gate); a request `open` queued for it on
/// node 1, whose sender waits up to `wait`. Returned once the device handles it.
struct HeldDelivery {
    _lb: Proxy,
    _dev: bin::KillOnDrop,
    lines: std::sync::mpsc::Receiver<String>,
    log: PathBuf,
    go: PathBuf,
    sender: std::thread::JoinHandle<std::process::Output>,
}

impl HeldDelivery {
    fn start(f: &Fleet, id: &str, wait: &str) -> HeldDelivery {
        let a = f.nodes[0].daemon.addr.clone();
        let b = f.nodes[1].daemon.addr.clone();
        let lb = Proxy::start(&[&a, &b]);
        let cred = f.enroll(0, id);
        let cred = f.cred_for(&cred, &lb.addr.to_string(), &format!("{id}-lb.cred"));
        let root = f.root.path().to_owned();
        let (log, started, go) = (root.join("log"), root.join("started"), root.join("go"));
        let handler = logging_handler(&log, Some((&started, &go)));
        let (dev, lines) = bin::listen(&["--exec", &handler], &cred);
        expect_line(&lines, &format!("connected as {id}"));
        f.await_sessions(1, &[(id, 0)], 10);
        // Queued on node 1, whose sender waits; delivered by node 0, which holds the
        // session.
        let (dir, id2, wait) = (f.nodes[1].dir.clone(), id.to_owned(), wait.to_owned());
        let sender = std::thread::spawn(move || {
            bin::admin(
                &dir,
                &[
                    "send",
                    &id2,
                    "--queue",
                    "--request",
                    "--wait",
                    &wait,
                    "open",
                ],
            )
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !started.exists() {
            assert!(Instant::now() < deadline, "the message was never delivered");
            std::thread::sleep(Duration::from_millis(20));
        }
        HeldDelivery {
            _lb: lb,
            _dev: dev,
            lines,
            log,
            go,
            sender,
        }
    }

    /// Node 0 was killed: the device loses its session, its handler goes on, it
    /// reconnects through the balancer to node 1 (takeover = "replace"), which delivers
    /// the message again: handled twice (at least once, spec 8.8), and the sender is
    /// told the device's answer.
    fn redelivered(self, f: &Fleet, id: &str) {
        expect_line(&self.lines, &format!("reconnected as {id}"));
        let out = self.sender.join().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "done open");
        assert_eq!(handled(&self.log), ["open", "open"]);
        await_queue(f, 1, id, &[]);
    }
}

#[test]
fn a_node_killed_mid_delivery_loses_nothing_and_the_next_session_redelivers() {
    let Some(mut f) = Fleet::start("fleet: kill -9 mid-delivery", 2, "replace") else {
        return;
    };
    let held = HeldDelivery::start(&f, "valve-2", "90s");
    // kill -9 of node 0 while the device handles it: its ACK reaches nobody.
    f.nodes[0].daemon.child.kill().unwrap();
    f.nodes[0].daemon.child.wait().unwrap();
    expect_line(&held.lines, "session lost");
    std::fs::write(&held.go, "").unwrap();
    held.redelivered(&f, "valve-2");
}

/// The delivering node is killed (`kill -9`) after the device's ACK reached it but
/// before the deletion committed: another transaction holds the message's row, so the
/// node's DELETE waits on it when the node dies. Nothing is lost: the row stays, the
/// next session (on the other node) delivers the message again, and its sender, on that
/// node, learns the device's answer. (The deletion and the hand-over of the outcome to
/// the node the message was queued on are one transaction; when they were two, the
/// deletion committed as the lock went, and the outcome died with the node.)
#[test]
fn a_node_killed_between_the_devices_ack_and_the_delete_loses_nothing() {
    let Some(mut f) = Fleet::start("fleet: kill -9 after the ack", 2, "replace") else {
        return;
    };
    let held = HeldDelivery::start(&f, "valve-5", "60s");
    // The device handles it; meanwhile a transaction takes the row's lock.
    let mut holder = f.cluster.psql_session();
    let mut to_psql = holder.stdin.take().unwrap();
    let mut from_psql = std::io::BufReader::new(holder.stdout.take().unwrap());
    use std::io::{BufRead, Write};
    writeln!(
        to_psql,
        "BEGIN; SELECT msg_id FROM queue WHERE id = 'valve-5' FOR UPDATE;"
    )
    .unwrap();
    let mut line = String::new();
    while line.trim().is_empty() || line.trim() == "BEGIN" {
        line.clear();
        assert!(from_psql.read_line(&mut line).unwrap() > 0, "psql ended");
    }
    assert_eq!(line.trim(), "1", "the row locked");
    // The device answers; node 0's deletion (the ACK's statement, and no other) waits
    // on the lock.
    std::fs::write(&held.go, "").unwrap();
    let waiting = "SELECT pid FROM pg_stat_activity
          WHERE wait_event_type = 'Lock'
            AND query LIKE 'DELETE FROM queue WHERE generation = $1 AND msg_id = $2 RETURNING%'";
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        let pid = f.cluster.psql(waiting);
        if !pid.is_empty() {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "node 0 never tried to delete the message"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    f.nodes[0].daemon.child.kill().unwrap();
    f.nodes[0].daemon.child.wait().unwrap();
    // Still waiting when the lock goes (the node's statement_timeout did not end it
    // first: then the test would prove nothing). The dead node's transaction is then
    // rolled back, not committed.
    assert_eq!(
        f.cluster.psql(waiting),
        pid,
        "node 0's deletion stopped waiting before the lock went"
    );
    writeln!(to_psql, "ROLLBACK;").unwrap();
    drop(to_psql);
    holder.wait().unwrap();
    expect_line(&held.lines, "session lost");
    held.redelivered(&f, "valve-5");
}

/// A database writer (anyone with the database's password) inserts a queued message of
/// its own and an outcome of its own, and tells the nodes, and moves a genuine message's
/// expiry: none verifies under the fleet key, so the device receives nothing and no
/// sender is told anything.
#[test]
fn queue_rows_and_outcomes_forged_in_the_database_are_never_delivered_or_reported() {
    let Some(f) = Fleet::start("fleet: forged queue rows", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "lock-3");
    let log = f.root.path().join("lock-3.log");
    let (dev, lines) = bin::listen(&["--exec", &logging_handler(&log, None)], &f.at(&cred, 0));
    expect_line(&lines, "connected as lock-3");
    f.await_sessions(1, &[("lock-3", 0)], 10);
    let generation = f
        .cluster
        .psql("SELECT generation FROM identities WHERE id = 'lock-3'");
    let node = |n: usize| {
        let name = f.cluster.psql(&format!(
            "SELECT node FROM nodes WHERE addr = '{}'",
            f.nodes[n].daemon.addr
        ));
        assert!(!name.is_empty(), "node {n} has no row");
        name
    };
    let zeros = "decode(repeat('00', 32), 'hex')";
    f.cluster.psql(&format!(
        "INSERT INTO queue (generation, msg_id, id, kind, payload, digest, queued, expires,
                            origin, node, tag)
         VALUES ({generation}, 1, 'lock-3', 1, 'unlock'::bytea, sha256('unlock'::bytea), 0,
                 99999999999999, 0, '{}', {zeros});
         NOTIFY tally_queued, 'lock-3';",
        node(1)
    ));
    // Node 0 reads it, finds its tag wrong, and deletes it: nothing is delivered.
    f.nodes[0]
        .daemon
        .expect_log(&["tag does not verify", "deleted, not delivered"]);
    assert_eq!(f.cluster.psql("SELECT count(*) FROM queue"), "0");
    // A genuine message after it is delivered, and answered.
    let out = f.nodes[1].admin(&[
        "send",
        "lock-3",
        "--queue",
        "--request",
        "--wait",
        "20s",
        "status?",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "done status?");
    assert_eq!(handled(&log), ["status?"]);
    // The device goes offline; a message queued on node 1 waits for it, and so does its
    // sender. The writer forges the device's acknowledgement, addressed to node 1.
    drop(dev);
    f.await_sessions(1, &[], 10);
    let dir = f.nodes[1].dir.clone();
    let sender = std::thread::spawn(move || {
        bin::admin(
            &dir,
            &[
                "send",
                "lock-3",
                "--queue",
                "--request",
                "--wait",
                "12s",
                "later?",
            ],
        )
    });
    await_queue(&f, 1, "lock-3", &[2]);
    f.cluster.psql(&format!(
        "INSERT INTO queue_outcomes (node, generation, msg_id, id, origin, code, status, payload, tag)
         VALUES ('{n1}', {generation}, 2, 'lock-3', 0, 0, 0, 'forged answer'::bytea, {zeros});
         NOTIFY tally_outcome, '{n1}';",
        n1 = node(1)
    ));
    f.nodes[1].daemon.expect_log(&[
        "outcomes of queued messages whose tag does not verify",
        "dropped",
    ]);
    // The writer moves the genuine message's expiry into the past: the sweep deletes
    // it, but its tag no longer verifies, so nobody is told "expired" on the row's word.
    f.cluster
        .psql("UPDATE queue SET expires = 0 WHERE msg_id = 2; SELECT 1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.cluster.psql("SELECT count(*) FROM queue") != "0" {
        assert!(Instant::now() < deadline, "the tampered row was not swept");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = sender.join().unwrap();
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("forged"));
    assert!(
        text(&out.stderr).contains("message 2 is still queued for lock-3"),
        "{}",
        text(&out.stderr)
    );
}

/// The node a message was queued on is killed (`kill -9`) as soon as it printed the
/// message id: the message, committed, is delivered by the other node, and answered.
#[test]
fn a_message_queued_on_a_node_killed_at_once_is_delivered_by_another() {
    let Some(mut f) = Fleet::start("fleet: kill -9 after enqueue", 2, "replace") else {
        return;
    };
    let cred = f.enroll(0, "pump-4");
    let id = f.nodes[1].ok(&["send", "pump-4", "--queue", "--request", "start"]);
    assert_eq!(id.trim(), "1");
    f.nodes[1].daemon.child.kill().unwrap();
    f.nodes[1].daemon.child.wait().unwrap();
    let log = f.root.path().join("pump-4.log");
    let (_dev, lines) = bin::listen(&["--exec", &logging_handler(&log, None)], &f.at(&cred, 0));
    expect_line(&lines, "connected as pump-4");
    await_queue(&f, 0, "pump-4", &[]);
    assert_eq!(handled(&log), ["start"]);
}
