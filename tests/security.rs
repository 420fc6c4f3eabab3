//! Regression tests for the security review of the enrollment credentials, the identity
//! store, the probing oracles and local secrets. Each performs its attack against a
//! running daemon (in-process over TCP on 127.0.0.1, or the real `tallyd` binary where
//! the attack is on the process) and asserts that it is refused.
//!
//! All of them fail on 8b77d4e, the code the review attacked, each because its attack
//! succeeds there. Checked by building this file against that commit with the APIs it
//! lacked substituted: `admin::open_token` by its `admin::token(dir, None, None)` (there
//! was no rotation, so the "rotated" token is the same one), `revoke_token` by nothing,
//! the expired token by a fresh per-identity one, `sha2::compress256` for the 0.11 path.

mod attack;
mod common;

use std::sync::Arc;
use std::time::Duration;

use attack::*;
use bytes::{Bytes, BytesMut};
use common::TestServer;
use hkdf::Hkdf;
use sha2::Sha256;
use tally::client::{self, Client, ClientError, ClientOptions};
use tally::proto::credential::{Credential, EnrollmentToken};
use tally::proto::enroll::ClientAwaitReply;
use tally::proto::frame::{EnrollMode, ErrorFrame};
use tally::proto::{ErrorCode, Id, Mode, SecretKey};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

async fn start() -> TestServer {
    capture_logs();
    TestServer::start(|c| c.limits.handshake_timeout = Duration::from_secs(5)).await
}

async fn enroll(
    srv: &TestServer,
    token: &EnrollmentToken,
    id: &str,
) -> Result<Credential, ClientError> {
    client::enroll(
        &srv.addr.to_string(),
        token,
        Id::new(id).unwrap(),
        &client::ClientOptions::default().with_connect_timeout(Duration::from_secs(5)),
    )
    .await
}

/// Enrolls `id` with `token` and asserts the server refuses with `code`.
async fn assert_refused(srv: &TestServer, token: &EnrollmentToken, id: &str, code: ErrorCode) {
    match enroll(srv, token, id).await {
        Err(ClientError::Refused(got)) => assert_eq!(got, code, "enrolling {id}"),
        other => panic!("enrolling {id}: expected a refusal, got {other:?}"),
    }
}

/// Runs an admin command (blocking: it may call the daemon's control socket) on the
/// server's state directory.
async fn admin<T: Send + 'static>(
    srv: &TestServer,
    f: impl FnOnce(&std::path::Path) -> T + Send + 'static,
) -> T {
    let dir = srv.dir.path().to_owned();
    tokio::task::spawn_blocking(move || f(&dir)).await.unwrap()
}

async fn echo_works(cred: &Credential) {
    let (c, _) = Client::connect(cred, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(
        c.request("ping").await.unwrap(),
        Bytes::from_static(b"ping")
    );
    let _ = c.close().await;
}

/// Item 1: the open token carried EK, and `token(id) = HKDF(EK, ...)` let its holder
/// mint a per-identity token for any id, even with open enrollment off.
#[tokio::test]
async fn the_open_token_mints_no_per_identity_tokens() {
    let srv = start().await;
    let open = srv.open_token();
    // The derivation of the old v1 draft, computed from the open token.
    let id = "victim-1";
    let mut minted = [0u8; 32];
    Hkdf::<Sha256>::new(None, open.credential.expose())
        .expand_multi_info(
            &[b"tally/1 token", &[id.len() as u8], id.as_bytes()],
            &mut minted,
        )
        .unwrap();
    let forged = EnrollmentToken {
        mode: EnrollMode::Token,
        credential: SecretKey::from_bytes(minted),
        server_static: open.server_static,
    };
    assert_refused(&srv, &forged, id, ErrorCode::ENROLL_REFUSED).await;
    // Even with a token issued for the id, the minted one does not work.
    let real = srv.id_token(id);
    assert_refused(&srv, &forged, id, ErrorCode::ENROLL_REFUSED).await;
    assert_eq!(srv.state.store.count().unwrap(), 0);
    enroll(&srv, &real, id).await.unwrap();
}

/// Item 1: with open enrollment off the open token is useless; rotating the open
/// credential invalidates the old open token.
#[tokio::test]
async fn open_mode_off_and_rotation_make_the_open_token_useless() {
    capture_logs();
    let off = TestServer::start(|c| c.open_enrollment = false).await;
    assert_refused(
        &off,
        &off.open_token(),
        "dev-off",
        ErrorCode::ENROLL_REFUSED,
    )
    .await;
    assert_eq!(off.state.store.count().unwrap(), 0);

    let srv = start().await;
    let old = srv.open_token();
    let new = admin(&srv, |dir| {
        EnrollmentToken::parse(&tally::admin::open_token(dir, None, true).unwrap().token).unwrap()
    })
    .await;
    assert_refused(&srv, &old, "dev-a", ErrorCode::ENROLL_REFUSED).await;
    log_line(&["enrollment of dev-a (open mode) refused: wrong open token"]).await;
    enroll(&srv, &new, "dev-a").await.unwrap();
}

/// Item 2: a per-identity token is single-use, expires, can be revoked, is replaced by
/// a newer one, and does not survive `tallyd remove`.
#[tokio::test]
async fn tokens_are_single_use_expiring_revocable_and_replaced() {
    let srv = start().await;
    // Single use, and not revived by `remove`: before the fix the old token re-enrolled
    // the id after `remove`, and the operator's fresh token then got ID_TAKEN.
    let t = srv.id_token("meter-1");
    let first = enroll(&srv, &t, "meter-1").await.unwrap();
    echo_works(&first).await;
    // Consumed: the server holds no token for the id any more (refused before the
    // enrolled-id check, like any unknown credential).
    assert_refused(&srv, &t, "meter-1", ErrorCode::ENROLL_REFUSED).await;
    admin(&srv, |dir| {
        tally::admin::remove(dir, None, "meter-1").unwrap()
    })
    .await;
    assert_refused(&srv, &t, "meter-1", ErrorCode::ENROLL_REFUSED).await;
    log_line(&["enrollment of meter-1 (token mode) refused: no token is outstanding"]).await;
    let fresh = srv.id_token("meter-1");
    echo_works(&enroll(&srv, &fresh, "meter-1").await.unwrap()).await;

    // A newer token replaces the older one.
    let older = srv.id_token("meter-2");
    let newer = srv.id_token("meter-2");
    assert_refused(&srv, &older, "meter-2", ErrorCode::ENROLL_REFUSED).await;
    enroll(&srv, &newer, "meter-2").await.unwrap();

    // Revoked.
    let t3 = srv.id_token("meter-3");
    assert!(
        admin(&srv, |dir| tally::admin::revoke_token(dir, None, "meter-3")
            .unwrap())
        .await
    );
    assert_refused(&srv, &t3, "meter-3", ErrorCode::ENROLL_REFUSED).await;

    // Expired (issued with an expiry in the past, as the clock would make it).
    let id4 = Id::new("meter-4").unwrap();
    let secret = srv
        .state
        .store
        .issue_token(&id4, tally::store::now() - 1)
        .unwrap();
    let t4 = EnrollmentToken {
        credential: secret,
        ..t3.clone()
    };
    assert_refused(&srv, &t4, "meter-4", ErrorCode::ENROLL_REFUSED).await;
    log_line(&["enrollment of meter-4 (token mode) refused: its token expired"]).await;
    let ids: Vec<String> = srv
        .state
        .store
        .list()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(ids, ["meter-1", "meter-2"]);
}

/// Runs an enrollment on a raw socket; returns the ENROLL_INIT it sent.
async fn enroll_raw(srv: &TestServer, token: &EnrollmentToken, id: &str) -> Vec<u8> {
    let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
    let mut out = BytesMut::new();
    let wait = ClientAwaitReply::start(
        token.client_params(Id::new(id).unwrap()),
        tally::secrets::random_bytes(),
        &mut out,
    );
    let init = out.to_vec();
    tcp.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = read_one(&mut tcp, &mut buf).await.unwrap();
    out.clear();
    let wait = wait.handle_reply(&reply, &mut out).unwrap();
    tcp.write_all(&out).await.unwrap();
    let done = read_one(&mut tcp, &mut buf).await.unwrap();
    wait.handle_done(&done).unwrap();
    init
}

/// Sends `frame` on a new connection; returns the first frame of the answer.
async fn first_answer(srv: &TestServer, frame: &[u8]) -> Bytes {
    let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
    tcp.write_all(frame).await.unwrap();
    read_one(&mut tcp, &mut BytesMut::new()).await.unwrap()
}

/// Item 3: a captured ENROLL_INIT replayed on a new connection was answered with
/// ENROLL_REPLY (two X25519 operations) forever. An enrolled id, or a consumed token,
/// is now refused before any DH.
#[tokio::test]
async fn a_replayed_enroll_init_is_refused_before_any_dh() {
    let srv = start().await;
    let open_init = enroll_raw(&srv, &srv.open_token(), "replay-open").await;
    let token_init = enroll_raw(&srv, &srv.id_token("replay-token"), "replay-token").await;
    for _ in 0..3 {
        let a = first_answer(&srv, &open_init).await;
        assert_eq!(
            ErrorFrame::code_if_error(&a),
            Some(ErrorCode::ID_TAKEN),
            "{a:x?}"
        );
        let b = first_answer(&srv, &token_init).await;
        assert_eq!(
            ErrorFrame::code_if_error(&b),
            Some(ErrorCode::ENROLL_REFUSED),
            "{b:x?}"
        );
    }
    assert_eq!(srv.state.store.count().unwrap(), 2);
}

/// Sends HELLO for `cred` on a raw socket and reads SERVER_AUTH; returns the socket, the
/// read buffer and the CLIENT_FINISH to send (valid for `cred`'s key).
async fn hello(addr: std::net::SocketAddr, cred: &Credential) -> (TcpStream, BytesMut, BytesMut) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    let wait = attack::hello(
        cred,
        Mode::Encrypted,
        tally::secrets::random_bytes(),
        &mut out,
    );
    tcp.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let auth = read_one(&mut tcp, &mut buf).await.unwrap();
    let mut finish = BytesMut::new();
    wait.handle_server_auth(&auth, &mut finish).unwrap();
    (tcp, buf, finish)
}

/// Item 4: a removed device whose HELLO was answered before `tallyd remove` finished its
/// handshake with its old key after the id was re-enrolled, and took the new device's
/// session over. Now the session is refused: the key it used is no longer the id's.
#[tokio::test]
async fn a_removed_device_cannot_come_back_with_its_old_key() {
    let srv = start().await;
    let old = srv.enroll("pump-1").await;
    let (mut tcp, _buf, finish) = hello(srv.addr, &old).await;
    admin(&srv, |dir| {
        tally::admin::remove(dir, None, "pump-1").unwrap()
    })
    .await;
    let new = srv.enroll("pump-1").await;
    let (replacement, _) = Client::connect(&new, ClientOptions::default())
        .await
        .unwrap();
    // The old device finishes its handshake with the old key.
    tcp.write_all(&finish).await.unwrap();
    let answer = read_to_eof(&mut tcp, 5).await;
    assert_eq!(
        ErrorFrame::code_if_error(&answer),
        Some(ErrorCode::AUTH_FAILED),
        "{answer:x?}"
    );
    log_line(&["pump-1", "revoked or removed during the handshake"]).await;
    // The new device's session was not taken over.
    assert_eq!(
        replacement.request("still mine").await.unwrap(),
        Bytes::from_static(b"still mine")
    );
    assert_eq!(srv.state.registry.list().len(), 1);

    // Revocation during a handshake, likewise.
    let dev = srv.enroll("pump-2").await;
    let (mut tcp, _buf, finish) = hello(srv.addr, &dev).await;
    admin(&srv, |dir| {
        tally::admin::revoke(dir, None, "pump-2").unwrap()
    })
    .await;
    tcp.write_all(&finish).await.unwrap();
    let answer = read_to_eof(&mut tcp, 5).await;
    assert_eq!(
        ErrorFrame::code_if_error(&answer),
        Some(ErrorCode::AUTH_FAILED)
    );
    assert!(srv.state.registry.list().iter().all(|s| s.id != "pump-2"));
}

fn file_bytes(dir: &std::path::Path) -> Vec<u8> {
    let db = tally::store::DB_FILE;
    let mut all = Vec::new();
    for name in [db.to_owned(), format!("{db}-wal")] {
        if let Ok(b) = std::fs::read(dir.join(name)) {
            all.extend_from_slice(&b);
        }
    }
    all
}

/// Item 5: keys were stored as `k XOR HKDF(store_key, id)`, the same pad for every
/// enrollment of an id, so the old key plus the database (whose stale rows stayed in the
/// file and the WAL) gave the new key. Now each row is sealed with its own nonce, and a
/// removed row's bytes are gone from the database file and its WAL.
#[tokio::test]
async fn a_removed_key_leaves_nothing_that_unlocks_the_next_one() {
    let srv = start().await;
    let dir = srv.dir.path().to_owned();
    let old = srv.enroll("cam-1").await;
    // The sealed key of cam-1 as the database file holds it.
    let sealed = || -> Vec<u8> {
        rusqlite::Connection::open(dir.join(tally::store::DB_FILE))
            .unwrap()
            .query_row("SELECT key FROM identities WHERE id = 'cam-1'", [], |r| {
                r.get(0)
            })
            .unwrap()
    };
    let sealed_old = sealed();
    admin(&srv, |dir| {
        tally::admin::remove(dir, None, "cam-1").unwrap()
    })
    .await;
    let new = srv.enroll("cam-1").await;
    let sealed_new = sealed();
    let bytes = file_bytes(&dir);
    assert!(
        !bytes.windows(sealed_old.len()).any(|w| w == sealed_old),
        "the removed row's sealed key is still in the database file or its WAL"
    );
    for k in [old.key.expose(), new.key.expose()] {
        assert!(
            !bytes.windows(32).any(|w| w == k),
            "a key is stored in the clear"
        );
    }
    // The pad-reuse attack: old key XOR old stored XOR new stored, for every alignment.
    for a in 0..=sealed_old.len() - 32 {
        for b in 0..=sealed_new.len() - 32 {
            let guess: Vec<u8> = (0..32)
                .map(|i| old.key.expose()[i] ^ sealed_old[a + i] ^ sealed_new[b + i])
                .collect();
            assert_ne!(&guess[..], new.key.expose());
        }
    }
    echo_works(&new).await;
}

/// Item 7: HELLO, SERVER_AUTH, then EOF: an unknown id got ERROR AUTH_FAILED and an
/// enrolled one got nothing. Now both get nothing.
#[tokio::test]
async fn hello_then_eof_does_not_tell_enrolled_ids_from_unknown_ones() {
    let srv = start().await;
    let known = srv.enroll("known-1").await;
    let unknown = Credential {
        id: Id::new("unknown-1").unwrap(),
        key: SecretKey::from_bytes([7; 32]),
        server: known.server.clone(),
        server_key: known.server_key,
    };
    let mut answers = Vec::new();
    for cred in [&known, &unknown] {
        let mut tcp = TcpStream::connect(srv.addr).await.unwrap();
        let mut out = BytesMut::new();
        attack::hello(cred, Mode::Encrypted, [9; 32], &mut out);
        tcp.write_all(&out).await.unwrap();
        let auth = read_one(&mut tcp, &mut BytesMut::new()).await.unwrap();
        assert_eq!(auth.len(), 77);
        tcp.shutdown().await.unwrap();
        answers.push(read_to_eof(&mut tcp, 5).await);
    }
    assert_eq!(
        answers[0], answers[1],
        "the reply depends on whether the id exists"
    );
    assert!(answers[0].is_empty(), "{:x?}", answers[0]);
    log_line(&["peer closed after SERVER_AUTH for unknown or revoked identity unknown-1"]).await;
}

/// Item 13: an ERROR injected into an established session was reported as "refused by
/// the server: authentication failed". It is a cut connection.
#[tokio::test]
async fn an_error_frame_injected_mid_session_is_a_truncation() {
    let srv = start().await;
    let cred = srv.enroll("inj-1").await;
    let inject = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = inject.clone();
    let policy: Policy = Arc::new(move |dir, _n, frame| {
        if matches!(dir, Dir::S2c) && flag.load(std::sync::atomic::Ordering::SeqCst) {
            let mut err = BytesMut::new();
            ErrorFrame::new(ErrorCode::AUTH_FAILED).encode(&mut err);
            return Verdict::pass(err.freeze());
        }
        Verdict::pass(frame)
    });
    let via = proxy(srv.addr, policy).await;
    let cred = Credential {
        server: via.to_string(),
        ..cred
    };
    let (c, _) = Client::connect(&cred, ClientOptions::default())
        .await
        .unwrap();
    assert_eq!(c.request("one").await.unwrap(), Bytes::from_static(b"one"));
    inject.store(true, std::sync::atomic::Ordering::SeqCst);
    let e = c.request("two").await.unwrap_err();
    assert!(matches!(e, ClientError::Truncated), "{e:?}");
}

// ---- the daemon process: start-up refusals and the control socket ------------------

const TALLYD: &str = env!("CARGO_BIN_EXE_tallyd");

/// Runs `tallyd serve` and expects it to refuse to start: returns its stderr. A daemon
/// that starts anyway (the bug) is killed after 10 s and the test fails.
fn refuses_to_start(args: &[&str], state: &std::path::Path) -> String {
    let mut child = std::process::Command::new(TALLYD)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("tallyd started: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn init(state: &std::path::Path) {
    let ok = std::process::Command::new(TALLYD)
        .args(["init", "--state-dir"])
        .arg(state)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

/// Item 10: a state directory other users can write lets them replace the control
/// socket (or the database) with their own.
#[test]
fn a_state_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    init(&state);
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = refuses_to_start(&[], &state);
    assert!(
        err.contains("lets other users write to the state directory"),
        "{err}"
    );
}

/// Item 6: a database of another schema was accepted, and every enrollment then failed
/// with INTERNAL.
#[test]
fn a_database_of_an_unknown_schema_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    init(&state);
    let db = state.join(tally::store::DB_FILE);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch(
            "CREATE TABLE identities (id TEXT PRIMARY KEY NOT NULL, key BLOB NOT NULL,
             created INTEGER NOT NULL, last_seen INTEGER, revoked INTEGER, mode TEXT NOT NULL) STRICT;",
        )
        .unwrap();
    let err = refuses_to_start(&[], &state);
    assert!(err.contains("predates schema versioning"), "{err}");
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = refuses_to_start(&[], &state);
    assert!(err.contains("schema version 99 is newer"), "{err}");
}

/// Item 12: `keepalive = 7e18` passed validation and then panicked every session.
#[test]
fn huge_durations_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("tallyd.toml");
    for bad in [
        "keepalive = 7e18",
        "handshake_timeout = 1e9",
        "backend_timeout = 1e12",
    ] {
        std::fs::write(&config, format!("[limits]\n{bad}\n")).unwrap();
        let err = refuses_to_start(&["--config", config.to_str().unwrap()], &state);
        assert!(err.contains("limits."), "{bad}: {err}");
    }
}

/// Item 10: the control socket answered any local user who could reach it. Even with
/// the directory and socket opened up by mistake, another user gets no answer.
#[test]
fn the_control_socket_refuses_other_users() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("SKIPPED the_control_socket_refuses_other_users: needs root to run a client as another user");
        return;
    }
    if !common::python3_or_skip("the_control_socket_refuses_other_users") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_daemon, _) = common::bin::start(&state, true);
    let socket = state.join(tally::control::SOCKET);
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let ask = |uid: u32| {
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import socket,sys\n\
                 s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(5)\n\
                 s.sendall(b'{\"op\":\"sessions\"}\\n'); print(s.recv(4096).decode())",
            )
            .arg(&socket)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(ask(0).contains("sessions"), "tallyd's own user is answered");
    let other = ask(65534);
    assert!(
        !other.contains("sessions"),
        "another user was answered: {other}"
    );
}

// ---- item 11: key material in the daemon's memory ----------------------------------

/// Byte strings whose presence in the daemon's memory would let a reader of that memory
/// (a core dump, a swap image, `/proc/PID/mem`) forge this session's frames or derive
/// its keys: the identity key `k`, the HKDF PRK, each session key, and the HMAC-SHA256
/// inner and outer states of each key used with HMAC (what `hmac`'s precomputed keys
/// hold: SHA-256's state after one block of `key ⊕ ipad` or `key ⊕ opad`, as eight
/// native-endian words).
fn secret_patterns(
    k: &SecretKey,
    nc: &[u8; 32],
    ns: &[u8; 32],
    th2: &[u8; 32],
) -> Vec<(String, Vec<u8>)> {
    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let hmac_states = |name: &str, key: &[u8; 32], out: &mut Vec<(String, Vec<u8>)>| {
        for (pad, which) in [(0x36u8, "inner"), (0x5c, "outer")] {
            let mut block = [pad; 64];
            block.iter_mut().zip(key).for_each(|(b, k)| *b ^= k);
            let mut state = IV;
            sha2::block_api::compress256(&mut state, &[block]);
            let bytes = state.iter().flat_map(|w| w.to_ne_bytes()).collect();
            out.push((format!("{name} HMAC {which} state"), bytes));
        }
    };
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(nc);
    salt[32..].copy_from_slice(ns);
    let (prk, _) = Hkdf::<Sha256>::extract(Some(&salt), k.expose());
    let prk: [u8; 32] = prk.as_slice().try_into().unwrap();
    let keys = tally::proto::schedule::SessionKeys::derive(k, nc, ns, th2);
    let mut out = vec![("k".to_owned(), k.expose().to_vec())];
    for (name, key) in [
        ("HKDF PRK", &prk),
        ("c2s", keys.c2s.expose()),
        ("s2c", keys.s2c.expose()),
        ("server_finish", keys.server_finish.expose()),
        ("client_finish", keys.client_finish.expose()),
    ] {
        out.push((name.to_owned(), key.to_vec()));
        hmac_states(name, key, &mut out);
    }
    out
}

/// The secrets of an encrypted session (spec 5.6, 5.7) whose client ephemeral secret is
/// `e`, to the server `s_pub`, answered with `f_pub`: `k`, both X25519 results, the
/// sealed id's key, the HKDF PRKs, the four session keys (and the HMAC states of the
/// finish keys).
fn sealed_secret_patterns(
    k: &SecretKey,
    e: &[u8; 32],
    s_pub: &[u8; 32],
    f_pub: &[u8; 32],
    th2: &[u8; 32],
) -> Vec<(String, Vec<u8>)> {
    use x25519_dalek::{PublicKey, StaticSecret};
    let secret = StaticSecret::from(*e);
    let e_pub = PublicKey::from(&secret).to_bytes();
    let dh_es = secret.diffie_hellman(&PublicKey::from(*s_pub)).to_bytes();
    let dh_ee = secret.diffie_hellman(&PublicKey::from(*f_pub)).to_bytes();
    let (dh_ee_key, dh_es_key) = (SecretKey::from_bytes(dh_ee), SecretKey::from_bytes(dh_es));
    let keys = tally::proto::schedule::SessionKeys::derive_sealed(
        k, &e_pub, f_pub, &dh_ee_key, &dh_es_key, th2,
    );
    let id_key = tally::proto::schedule::sealed_id_key(&e_pub, s_pub, &dh_es_key);
    let ikm = [&k.expose()[..], &dh_ee, &dh_es].concat();
    let (prk, _) = Hkdf::<Sha256>::extract(Some(&[e_pub, *f_pub].concat()), &ikm);
    let prk: [u8; 32] = prk.as_slice().try_into().unwrap();
    let mut out = vec![("k".to_owned(), k.expose().to_vec())];
    for (name, key) in [
        ("dh_ee", &dh_ee),
        ("dh_es", &dh_es),
        ("sealed id key", id_key.expose()),
        ("HKDF PRK", &prk),
        ("c2s", keys.c2s.expose()),
        ("s2c", keys.s2c.expose()),
        ("server_finish", keys.server_finish.expose()),
        ("client_finish", keys.client_finish.expose()),
    ] {
        out.push((name.to_owned(), key.to_vec()));
    }
    out
}

/// Which of `patterns` occur in `pid`'s writable memory, and in which mapping.
fn find_in_memory(pid: u32, patterns: &[(String, Vec<u8>)]) -> Vec<String> {
    use std::os::unix::fs::FileExt;
    // A first filter on two bytes, so one pass over the memory checks all patterns.
    let mut first = vec![false; 1 << 16];
    for (_, p) in patterns {
        first[u16::from_le_bytes([p[0], p[1]]) as usize] = true;
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut found = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if !fields[1].starts_with("rw") {
            continue; // key material is only ever in writable memory
        }
        let (start, end) = fields[0].split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        let mut hay = vec![0u8; (end - start) as usize];
        if mem.read_exact_at(&mut hay, start).is_err() {
            continue; // e.g. [vvar]
        }
        let region = fields.get(5).copied().unwrap_or("[anonymous]");
        for i in 0..hay.len().saturating_sub(32) {
            if !first[u16::from_le_bytes([hay[i], hay[i + 1]]) as usize] {
                continue;
            }
            for (name, p) in patterns {
                if hay[i..].starts_with(p) {
                    found.push(format!("{name} at {:#x} in {region}", start + i as u64));
                }
            }
        }
    }
    found
}

/// Item 11: after a session ended, a core dump of tallyd still held its HMAC states, the
/// HKDF PRK and `k`. The test is tallyd's parent, so it may read `/proc/PID/mem`. While
/// the session is live, the frame keys' HMAC states must be found (the scan works);
/// once it has ended, nothing of it may be.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn no_key_material_of_an_ended_session_stays_in_the_daemons_memory() {
    memory_scan(Mode::Encrypted).await;
}

/// The same in the authenticated mode (a daemon whose policy allows it).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn no_key_material_of_an_ended_authenticated_session_stays_in_memory() {
    memory_scan(Mode::Authenticated).await;
}

#[cfg(target_os = "linux")]
async fn memory_scan(mode: Mode) {
    use tally::proto::frame::signed_part;
    use tally::proto::{Body, CloseCode};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tallyd"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--encryption",
        "allowed",
        "--state-dir",
    ])
    .arg(&state);
    let (daemon, _) = common::bin::start_cmd(cmd, true);
    let pid = daemon.child.id();
    let addr: std::net::SocketAddr = daemon.addr.parse().unwrap();
    let token =
        EnrollmentToken::parse(&tally::admin::open_token(&state, None, false).unwrap().token)
            .unwrap();
    let cred = client::enroll(
        &daemon.addr,
        &token,
        Id::new("meter-7").unwrap(),
        &client::ClientOptions::default().with_connect_timeout(Duration::from_secs(5)),
    )
    .await
    .unwrap();

    // A session driven by hand, so that the test knows every input of its key schedule.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let nc: [u8; 32] = tally::secrets::random_bytes();
    let mut hello = BytesMut::new();
    let wait = attack::hello(&cred, mode, nc, &mut hello);
    tcp.write_all(&hello).await.unwrap();
    let mut buf = BytesMut::new();
    let auth = read_one(&mut tcp, &mut buf).await.unwrap();
    let ns: [u8; 32] = auth[5..37].try_into().unwrap();
    let th2: [u8; 32] = {
        use sha2::Digest;
        Sha256::new()
            .chain_update(&hello)
            .chain_update(signed_part(&auth))
            .finalize()
            .into()
    };
    let mut out = BytesMut::new();
    let (mut session, _) = wait.handle_server_auth(&auth, &mut out).unwrap();
    session
        .seal(
            &Body::Request {
                payload: Bytes::from_static(b"reading 42"),
            },
            &mut out,
        )
        .unwrap();
    tcp.write_all(&out).await.unwrap();
    out.clear();
    let response = session
        .open(read_one(&mut tcp, &mut buf).await.unwrap())
        .unwrap();
    assert!(
        format!("{response:?}").contains("reading 42"),
        "{response:?}"
    );

    let patterns = match mode {
        Mode::Authenticated => secret_patterns(&cred.key, &nc, &ns, &th2),
        // `nc` is the ephemeral secret `e`, `ns` the server's `F`.
        Mode::Encrypted => sealed_secret_patterns(&cred.key, &nc, &cred.server_key, &ns, &th2),
    };
    let live = tokio::task::spawn_blocking({
        let patterns = patterns.clone();
        move || find_in_memory(pid, &patterns)
    })
    .await
    .unwrap();
    for key in ["c2s", "s2c"] {
        let live_form = match mode {
            Mode::Authenticated => format!("{key} HMAC inner state"),
            // The AEAD's key schedule is the key itself.
            Mode::Encrypted => format!("{key} at"),
        };
        assert!(
            live.iter().any(|f| f.starts_with(&live_form)),
            "the scan does not see the live session's {key} key: {live:#?}"
        );
    }

    // The device ends the session; the daemon answers CLOSE and forgets it.
    session
        .seal(
            &Body::Close {
                code: CloseCode::NORMAL,
                reason: String::new(),
            },
            &mut out,
        )
        .unwrap();
    tcp.write_all(&out).await.unwrap();
    read_to_eof(&mut tcp, 5).await;
    let sessions =
        || tally::control::call(&state, &tally::control::ControlRequest::Sessions).unwrap();
    common::eventually(5, "the session to be gone", || {
        matches!(sessions(), tally::control::ControlResponse::Sessions { sessions } if sessions.is_empty())
    })
    .await;
    // The session leaves the registry as soon as it is over, before its task has
    // finished writing and dropped (and wiped) its state: scan until that happened too.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let left = loop {
        let patterns = patterns.clone();
        let left = tokio::task::spawn_blocking(move || find_in_memory(pid, &patterns))
            .await
            .unwrap();
        if left.is_empty() || std::time::Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        left.is_empty(),
        "key material left in tallyd's memory 5 s after the session ended: {left:#?}"
    );
    drop(daemon);
}
