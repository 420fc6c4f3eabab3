//! Every attack of the threat model (spec section 2), performed against a running tallyd
//! over TCP and refused. Each test asserts the refusal (error or close code, and the log
//! line with its reason), that a concurrent legitimate session keeps working, and that
//! the identity store is unchanged.

mod attack;
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use attack::*;
use bytes::{Bytes, BytesMut};
use common::TestServer;
use tally::client::{self, Client, ClientError, ClientOptions};
use tally::proto::credential::{Credential, EnrollmentToken};
use tally::proto::enroll::{ClientAwaitReply, ClientParams};
use tally::proto::frame::{EnrollMode, ErrorFrame};
use tally::proto::{Body, CloseCode, ErrorCode, Id, Mode, ProtocolError, SecretKey};
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A daemon with a recording echo backend, short deadlines, an enrolled bystander with
/// a live session, and the log capture on.
struct Arena {
    srv: TestServer,
    rec: Arc<Recorder>,
    bystander: Client,
    before: Vec<(String, i64, Option<i64>, String)>,
}

impl Arena {
    async fn new() -> Arena {
        Self::with(|_| {}).await
    }

    async fn with(tune: impl FnOnce(&mut tally::config::ServerConfig)) -> Arena {
        capture_logs();
        let rec = Arc::new(Recorder::default());
        let srv = TestServer::start_with(
            Arc::new(TempDir::new().unwrap()),
            Arc::new(RecordingEcho(rec.clone())),
            |c| {
                c.limits.first_frame_timeout = Duration::from_millis(500);
                c.limits.handshake_timeout = Duration::from_millis(800);
                c.limits.keepalive = Duration::from_millis(600);
                tune(c);
            },
        )
        .await;
        let cred = srv.enroll("bystander").await;
        // The bystander adopts the server's 600 ms keepalive from the handshake, in a mode
        // the daemon accepts.
        let mut opts = ClientOptions::default();
        if srv.state.encryption == tally::config::EncryptionPolicy::Off {
            opts.mode = Mode::Authenticated;
        }
        let (bystander, _) = Client::connect(&cred, opts).await.unwrap();
        let before = snapshot(srv.state.store.list().unwrap());
        Arena {
            srv,
            rec,
            bystander,
            before,
        }
    }

    /// Enrolls one of the test's own devices (listed in `check`).
    async fn device(&self, id: &str) -> Credential {
        self.srv.enroll(id).await
    }

    /// The bystander still works, and the store holds exactly `expected` ids (no more, no
    /// changes to the ones that were there).
    async fn check(&self, extra_ids: &[&str]) {
        let n = self.rec.count.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            self.bystander.request("still here").await.unwrap(),
            Bytes::from_static(b"still here")
        );
        assert!(self.rec.count.load(std::sync::atomic::Ordering::SeqCst) > n);
        let now = snapshot(self.srv.state.store.list().unwrap());
        let old: Vec<_> = now
            .iter()
            .filter(|r| !extra_ids.contains(&r.0.as_str()))
            .cloned()
            .collect();
        assert_eq!(
            old, self.before,
            "identities present before the attack are unchanged"
        );
        let ids: Vec<&str> = now
            .iter()
            .map(|r| r.0.as_str())
            .filter(|i| extra_ids.contains(i))
            .collect();
        assert_eq!(
            ids.len(),
            extra_ids.len(),
            "exactly the test's own identities were added: {ids:?}"
        );
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.srv.addr
    }
}

fn via(cred: &Credential, addr: std::net::SocketAddr) -> Credential {
    Credential {
        id: cred.id.clone(),
        key: cred.key.clone(),
        server: addr.to_string(),
        server_key: cred.server_key,
    }
}

fn fast() -> ClientOptions {
    ClientOptions::default().with_keepalive(Duration::from_millis(200))
}

/// The end of a client session, waiting at most 5 s.
async fn end_of(c: &Client) -> ClientError {
    tokio::time::timeout(Duration::from_secs(5), c.closed())
        .await
        .expect("session ends")
}

fn is_protocol_close(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Closed {
            code: CloseCode::PROTOCOL_ERROR,
            ..
        }
    )
}

// ---- replay, reorder, drop, duplicate -----------------------------------------------

/// Index of the first session frame device→server: HELLO is 0, CLIENT_FINISH is 1.
const FIRST_C2S: usize = 2;
/// Index of the first session frame server→device: SERVER_AUTH is 0.
const FIRST_S2C: usize = 1;

#[tokio::test]
async fn duplicated_frame_is_refused() {
    let a = Arena::new().await;
    let cred = a.device("dup").await;
    let p = proxy(
        a.addr(),
        Arc::new(|d, i, f: Bytes| match (d, i) {
            (Dir::C2s, FIRST_C2S) => Verdict {
                forward: vec![f.clone(), f],
                ..Verdict::default()
            },
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    let _ = c.request("once").await;
    assert!(is_protocol_close(&end_of(&c).await));
    log_line(&[
        "id=dup",
        "refused frame",
        "sequence number 1 where 2 was expected",
    ])
    .await;
    // The original may or may not have reached the backend (if it arrived in the same
    // read as the duplicate, the session was over before it could be answered, and it
    // was not handed on: spec 8.4); the duplicate never does.
    let seen = a.rec.of("dup");
    assert!(
        seen.is_empty() || seen == vec![Bytes::from_static(b"once")],
        "the duplicate never reached the backend: {seen:?}"
    );
    a.check(&["dup"]).await;
}

#[tokio::test]
async fn frame_replayed_later_in_its_session_is_refused() {
    let a = Arena::new().await;
    let cred = a.device("replay").await;
    let first = Arc::new(Mutex::new(None::<Bytes>));
    let keep = first.clone();
    let p = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| match (d, i) {
            (Dir::C2s, FIRST_C2S) => {
                *keep.lock().unwrap() = Some(f.clone());
                Verdict::pass(f)
            }
            // After the second request, the first one again.
            (Dir::C2s, 3) => Verdict {
                forward: vec![f, keep.lock().unwrap().clone().unwrap()],
                ..Verdict::default()
            },
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    assert_eq!(c.request("one").await.unwrap(), Bytes::from_static(b"one"));
    let _ = c.request("two").await;
    assert!(is_protocol_close(&end_of(&c).await));
    log_line(&[
        "id=replay",
        "refused frame",
        "sequence number 1 where 3 was expected",
    ])
    .await;
    assert_eq!(
        a.rec.of("replay"),
        vec![Bytes::from_static(b"one"), Bytes::from_static(b"two")]
    );
    a.check(&["replay"]).await;
}

#[tokio::test]
async fn reordered_frames_are_refused() {
    let a = Arena::new().await;
    let cred = a.device("reorder").await;
    let held = Arc::new(Mutex::new(None::<Bytes>));
    let p = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| match (d, i) {
            (Dir::C2s, FIRST_C2S) => {
                *held.lock().unwrap() = Some(f);
                Verdict::default()
            }
            (Dir::C2s, 3) => Verdict {
                forward: vec![f, held.lock().unwrap().take().unwrap()],
                ..Verdict::default()
            },
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    let (r1, r2) = tokio::join!(c.request("first"), c.request("second"));
    assert!(r1.is_err() && r2.is_err());
    assert!(is_protocol_close(&end_of(&c).await));
    log_line(&[
        "id=reorder",
        "refused frame",
        "sequence number 2 where 1 was expected",
    ])
    .await;
    assert!(a.rec.of("reorder").is_empty());
    a.check(&["reorder"]).await;
}

#[tokio::test]
async fn dropped_frame_is_refused() {
    let a = Arena::new().await;
    let cred = a.device("gap").await;
    let p = proxy(
        a.addr(),
        Arc::new(|d, i, f: Bytes| match (d, i) {
            (Dir::C2s, FIRST_C2S) => Verdict::default(),
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    let (r1, r2) = tokio::join!(c.request("lost"), c.request("after the gap"));
    assert!(r1.is_err() && r2.is_err());
    assert!(is_protocol_close(&end_of(&c).await));
    log_line(&[
        "id=gap",
        "refused frame",
        "sequence number 2 where 1 was expected",
    ])
    .await;
    assert!(a.rec.of("gap").is_empty());
    a.check(&["gap"]).await;
}

#[tokio::test]
async fn whole_session_replayed_on_a_new_connection_is_refused() {
    let a = Arena::new().await;
    let cred = a.device("recorded").await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let p = proxy(a.addr(), recorder(log.clone())).await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    assert_eq!(
        c.request("pay me").await.unwrap(),
        Bytes::from_static(b"pay me")
    );
    c.close().await.unwrap();
    let sent: Vec<u8> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, _, _)| *d == Dir::C2s)
        .flat_map(|(_, _, f)| f.to_vec())
        .collect();
    let mut raw = TcpStream::connect(a.addr()).await.unwrap();
    raw.write_all(&sent).await.unwrap();
    let got = read_to_eof(&mut raw, 5).await;
    assert_eq!(&got[..5], &[0, 0, 0, 0x49, 0x14], "a fresh SEALED_AUTH");
    assert_eq!(
        &got[77..],
        &[0, 0, 0, 4, 0x1f, 0, 3, 1],
        "then ERROR AUTH_FAILED and close"
    );
    log_line(&[
        "refused",
        "CLIENT_FINISH for identity recorded did not verify",
    ])
    .await;
    assert_eq!(
        a.rec.of("recorded"),
        vec![Bytes::from_static(b"pay me")],
        "the replay did not reach the backend"
    );
    a.check(&["recorded"]).await;
}

// ---- modification ----------------------------------------------------------------

/// Flips one bit in each byte of the `index`-th frame in `dir`, one connection per byte,
/// in a session of `mode` (`frame_len` is that frame's length in that mode).
async fn flip_every_byte(
    a: &Arena,
    id: &str,
    dir: Dir,
    index: usize,
    frame_len: usize,
    mode: Mode,
) {
    let cred = a.device(id).await;
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for pos in 0..frame_len {
        let seen_here = seen.clone();
        let p = proxy(
            a.addr(),
            Arc::new(move |d, i, f: Bytes| {
                if d == dir && i == index {
                    seen_here.store(f.len(), std::sync::atomic::Ordering::SeqCst);
                    let mut v = f.to_vec();
                    v[pos] ^= 1 << (pos % 8);
                    return Verdict::pass(Bytes::from(v));
                }
                Verdict::pass(f)
            }),
        )
        .await;
        let mut opts = fast();
        opts.mode = mode;
        let (c, _) = Client::connect(&via(&cred, p), opts).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(3), c.request("flip-me")).await;
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            frame_len,
            "the frame flipped is the one meant"
        );
        assert!(
            !matches!(r, Ok(Ok(_))),
            "{dir:?} frame with byte {pos} flipped was accepted"
        );
        if dir == Dir::S2c {
            // The device refused the server's frame: it reports a protocol violation.
            let end = end_of(&c).await;
            let reported =
                matches!(end, ClientError::Protocol(_)) || matches!(end, ClientError::Timeout(_));
            assert!(reported, "byte {pos}: {end:?}");
        }
    }
}

#[tokio::test]
async fn a_bit_flipped_in_any_byte_of_a_request_is_refused() {
    let a = Arena::new().await;
    // REQUEST with payload "flip-me": 4 + 1 + 8 + 7 + 16 bytes encrypted, + 32
    // authenticated.
    flip_every_byte(&a, "flip-req", Dir::C2s, FIRST_C2S, 36, Mode::Encrypted).await;
    assert!(
        a.rec.of("flip-req").is_empty(),
        "no modified request reached the backend"
    );
    log_line(&[
        "id=flip-req",
        "refused frame",
        "session frame tag did not verify",
    ])
    .await;
    a.check(&["flip-req"]).await;
}

#[tokio::test]
async fn a_bit_flipped_in_any_byte_of_a_response_is_refused() {
    let a = Arena::new().await;
    // RESPONSE echoing "flip-me": 4 + 1 + 8 + 8 + 2 + 7 + 16 bytes.
    flip_every_byte(&a, "flip-resp", Dir::S2c, FIRST_S2C, 46, Mode::Encrypted).await;
    a.check(&["flip-resp"]).await;
}

#[tokio::test]
async fn a_bit_flipped_in_any_byte_of_an_authenticated_frame_is_refused() {
    let a = Arena::with(|c| c.encryption = tally::config::EncryptionPolicy::Allowed).await;
    flip_every_byte(
        &a,
        "flip-auth-req",
        Dir::C2s,
        FIRST_C2S,
        52,
        Mode::Authenticated,
    )
    .await;
    flip_every_byte(
        &a,
        "flip-auth-resp",
        Dir::S2c,
        FIRST_S2C,
        62,
        Mode::Authenticated,
    )
    .await;
    assert!(a.rec.of("flip-auth-req").is_empty());
    a.check(&["flip-auth-req", "flip-auth-resp"]).await;
}

#[tokio::test]
async fn request_reflected_back_as_a_response_is_refused() {
    let a = Arena::new().await;
    let cred = a.device("mirror").await;
    let p = proxy(
        a.addr(),
        Arc::new(|d, i, f: Bytes| match (d, i) {
            (Dir::C2s, FIRST_C2S) => Verdict {
                back: vec![f],
                ..Verdict::default()
            },
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    let err = c.request("echo of myself").await.unwrap_err();
    assert!(
        matches!(err, ClientError::Protocol(ProtocolError::BadTag(_))),
        "{err:?}"
    );
    a.check(&["mirror"]).await;
}

#[tokio::test]
async fn client_finish_replayed_as_a_server_tag_is_refused() {
    let a = Arena::new().await;
    let cred = a.device("finisher").await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let p = proxy(a.addr(), recorder(log.clone())).await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    c.request("x").await.unwrap();
    let frames = log.lock().unwrap().clone();
    let finish = frames
        .iter()
        .find(|(d, i, _)| *d == Dir::C2s && *i == 1)
        .unwrap()
        .2
        .clone();
    let auth = frames
        .iter()
        .find(|(d, i, _)| *d == Dir::S2c && *i == 0)
        .unwrap()
        .2
        .clone();
    // A fake server answers HELLO with the recorded ns and the client's finish tag.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = fake.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = fake.accept().await.unwrap();
        let mut buf = BytesMut::new();
        read_one(&mut s, &mut buf).await.unwrap();
        let mut forged = auth[..45].to_vec();
        forged.extend_from_slice(&finish[5..]);
        s.write_all(&forged).await.unwrap();
        let _ = read_to_eof(&mut s, 2).await;
    });
    let err = Client::connect(&via(&cred, fake_addr), fast())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::AuthFailed), "{err:?}");
    a.check(&["finisher"]).await;
}

#[tokio::test]
async fn frame_moved_from_one_identity_session_into_another_is_refused() {
    let a = Arena::new().await;
    let alice = a.device("alice").await;
    let mallory = a.device("mallory").await;
    let stolen = Arc::new(Mutex::new(None::<Bytes>));
    let keep = stolen.clone();
    let pa = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| {
            if (d, i) == (Dir::C2s, FIRST_C2S) {
                *keep.lock().unwrap() = Some(f.clone());
            }
            Verdict::pass(f)
        }),
    )
    .await;
    let (ca, _) = Client::connect(&via(&alice, pa), fast()).await.unwrap();
    ca.request("alice's order").await.unwrap();
    let inject = stolen.clone();
    let pm = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| match (d, i) {
            (Dir::C2s, FIRST_C2S) => Verdict::pass(inject.lock().unwrap().clone().unwrap()),
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let (cm, _) = Client::connect(&via(&mallory, pm), fast()).await.unwrap();
    let _ = cm.request("mallory's own").await;
    assert!(is_protocol_close(&end_of(&cm).await));
    log_line(&[
        "id=mallory",
        "refused frame",
        "session frame tag did not verify",
    ])
    .await;
    assert!(a.rec.of("mallory").is_empty());
    assert_eq!(
        a.rec.of("alice"),
        vec![Bytes::from_static(b"alice's order")]
    );
    a.check(&["alice", "mallory"]).await;
}

// ---- enrollment --------------------------------------------------------------------

async fn enroll_with(
    addr: std::net::SocketAddr,
    token: &EnrollmentToken,
    id: &str,
) -> Result<Credential, ClientError> {
    client::enroll(
        &addr.to_string(),
        token,
        Id::new(id).unwrap(),
        &client::ClientOptions::default().with_connect_timeout(Duration::from_secs(5)),
    )
    .await
}

#[tokio::test]
async fn enrollment_without_or_with_a_wrong_credential_is_refused() {
    let a = Arena::new().await;
    let real = a.srv.open_token();
    let none = EnrollmentToken {
        credential: SecretKey::from_bytes([0; 32]),
        ..real.clone()
    };
    let wrong = EnrollmentToken {
        credential: SecretKey::from_bytes(tally::secrets::random_bytes()),
        ..real.clone()
    };
    for t in [&none, &wrong] {
        let e = enroll_with(a.addr(), t, "intruder").await.unwrap_err();
        assert!(
            matches!(e, ClientError::Refused(ErrorCode::ENROLL_REFUSED)),
            "{e:?}"
        );
    }
    log_line(&["enrollment of intruder (open mode) refused: wrong open token"]).await;
    a.check(&[]).await;
}

#[tokio::test]
async fn per_identity_token_used_for_another_id_is_refused() {
    let a = Arena::new().await;
    let t = a.srv.id_token("meter-7");
    let e = enroll_with(a.addr(), &t, "meter-8").await.unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::ENROLL_REFUSED)),
        "{e:?}"
    );
    log_line(&["enrollment of meter-8 (token mode) refused: no token is outstanding"]).await;
    a.check(&[]).await;
}

#[tokio::test]
async fn enrolling_a_taken_id_is_refused_and_changes_nothing() {
    let a = Arena::new().await;
    let owner = a.device("owned").await;
    let e = enroll_with(a.addr(), &a.srv.open_token(), "owned")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::ID_TAKEN)),
        "{e:?}"
    );
    log_line(&["reason=identity owned is already enrolled"]).await;
    let (c, _) = Client::connect(&owner, fast()).await.unwrap();
    assert_eq!(
        c.request("mine").await.unwrap(),
        Bytes::from_static(b"mine"),
        "the owner's key is unchanged"
    );
    a.check(&["owned"]).await;
}

#[tokio::test]
async fn replayed_enrollment_messages_enroll_nothing() {
    let a = Arena::new().await;
    // Record an enrollment whose ENROLL_CONFIRM never reaches the server.
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = recorder(log.clone());
    let p = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| {
            let v = rec(d, i, f);
            if (d, i) == (Dir::C2s, 1) {
                return Verdict {
                    cut: true,
                    ..Verdict::default()
                };
            }
            v
        }),
    )
    .await;
    assert!(enroll_with(p, &a.srv.open_token(), "replayed")
        .await
        .is_err());
    let frames = log.lock().unwrap().clone();
    let c2s: Vec<Bytes> = frames
        .iter()
        .filter(|(d, _, _)| *d == Dir::C2s)
        .map(|(_, _, f)| f.clone())
        .collect();
    assert_eq!(c2s.len(), 2, "ENROLL_INIT and ENROLL_CONFIRM were captured");
    // Replay ENROLL_INIT, then the captured ENROLL_CONFIRM: the server's new Y makes it stale.
    let mut raw = TcpStream::connect(a.addr()).await.unwrap();
    raw.write_all(&c2s[0]).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = read_one(&mut raw, &mut buf).await.unwrap();
    assert_eq!(
        reply[4], 0x02,
        "the server answers the replayed ENROLL_INIT"
    );
    raw.write_all(&c2s[1]).await.unwrap();
    assert_eq!(
        read_to_eof(&mut raw, 5).await,
        [0, 0, 0, 4, 0x1f, 0, 4, 1],
        "ERROR ENROLL_REFUSED"
    );
    log_line(&["reason=ENROLL_CONFIRM tag did not verify"]).await;
    a.check(&[]).await;
}

/// A man in the middle who replaces the server's ephemeral key with its own.
async fn mitm_replacing_y(a: &Arena, token: EnrollmentToken, id: &str) {
    let p = proxy(
        a.addr(),
        Arc::new(|d, i, f: Bytes| match (d, i) {
            (Dir::S2c, 0) => {
                let mut v = f.to_vec();
                let y =
                    x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([0x66; 32]));
                v[5..37].copy_from_slice(y.as_bytes());
                Verdict::pass(Bytes::from(v))
            }
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let e = enroll_with(p, &token, id).await.unwrap_err();
    assert!(matches!(e, ClientError::ServerNotAuthentic), "{id}: {e:?}");
}

#[tokio::test]
async fn device_refuses_to_finish_when_a_mitm_substitutes_its_key_in_both_modes() {
    let a = Arena::new().await;
    mitm_replacing_y(&a, a.srv.open_token(), "mitm-open").await;
    mitm_replacing_y(&a, a.srv.id_token("mitm-token"), "mitm-token").await;
    // Replacing X instead breaks the ENROLL_INIT tag at the server.
    let p = proxy(
        a.addr(),
        Arc::new(|d, i, f: Bytes| match (d, i) {
            (Dir::C2s, 0) => {
                let mut v = f.to_vec();
                let n = v.len();
                v[n - 64..n - 32].copy_from_slice(&[9; 32]);
                Verdict::pass(Bytes::from(v))
            }
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let e = enroll_with(p, &a.srv.open_token(), "mitm-x")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::ENROLL_REFUSED)),
        "{e:?}"
    );
    a.check(&[]).await;
}

#[tokio::test]
async fn mitm_with_another_identity_token_cannot_bind_the_victims_id() {
    let a = Arena::new().await;
    let mallory_token = a.srv.id_token("mallory-device");
    // Mallory intercepts the victim's ENROLL_INIT and sends her own for the victim's id,
    // with her own ephemeral key, tagged with the only token she has.
    let forged = Arc::new(Mutex::new(BytesMut::new()));
    let params = ClientParams {
        id: Id::new("victim").unwrap(),
        mode: EnrollMode::Token,
        credential: mallory_token.credential.clone(),
        server_static: mallory_token.server_static,
    };
    ClientAwaitReply::start(params, [0x77; 32], &mut forged.lock().unwrap());
    let swap = forged.clone();
    let p = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| match (d, i) {
            (Dir::C2s, 0) => Verdict::pass(swap.lock().unwrap().clone().freeze()),
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let e = enroll_with(p, &a.srv.id_token("victim"), "victim")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::ENROLL_REFUSED)),
        "{e:?}"
    );
    // The victim can still enroll directly afterwards: the id was never bound.
    enroll_with(a.addr(), &a.srv.id_token("victim"), "victim")
        .await
        .unwrap();
    a.check(&["victim"]).await;
}

#[tokio::test]
async fn open_mode_lets_a_key_holder_claim_a_free_id_and_nothing_more() {
    // The stated limit of a group key (spec 2.3, 6.1): the holder of EK enrolls a free
    // id first, and the legitimate device then finds it taken. It learns no other key.
    let a = Arena::new().await;
    let squatter = enroll_with(a.addr(), &a.srv.open_token(), "pump-3")
        .await
        .unwrap();
    let e = enroll_with(a.addr(), &a.srv.open_token(), "pump-3")
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::ID_TAKEN)),
        "{e:?}"
    );
    // Holding EK does not authenticate as an enrolled identity.
    let guess = Credential {
        id: Id::new("bystander").unwrap(),
        key: a.srv.open_token().credential,
        server: a.addr().to_string(),
        server_key: a.srv.open_token().server_static,
    };
    assert!(matches!(
        Client::connect(&guess, fast()).await,
        Err(ClientError::AuthFailed)
    ));
    drop(squatter);
    a.check(&["pump-3"]).await;
}

#[tokio::test]
async fn device_pinned_to_another_server_key_refuses_to_finish() {
    let a = Arena::new().await;
    // Server B shares A's open enrollment key (a copy of A's store and store key) but
    // has its own static key.
    let dir_b = Arc::new(TempDir::new().unwrap());
    let db = tally::store::DB_FILE;
    for name in [
        tally::secrets::STORE_KEY.to_owned(),
        db.to_owned(),
        format!("{db}-wal"),
    ] {
        if let Ok(bytes) = std::fs::read(a.srv.dir.path().join(&name)) {
            tally::secrets::write_secret_file(&dir_b.path().join(&name), &bytes).unwrap();
        }
    }
    let b = TestServer::start_with(dir_b, Arc::new(tally::backend::Echo), |_| {}).await;
    let before = b.state.store.count().unwrap();
    let e = enroll_with(b.addr, &a.srv.open_token(), "pinned")
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::ServerNotAuthentic), "{e:?}");
    assert_eq!(b.state.store.count().unwrap(), before);
    a.check(&[]).await;
}

// ---- identity probing --------------------------------------------------------------

/// Runs a handshake for `id` with `key` on a raw socket, sending a CLIENT_FINISH even if
/// SERVER_AUTH does not verify: a SEALED_HELLO sealed to `server_key` (or a HELLO, with
/// `None`). Returns (SERVER_AUTH header, everything after SERVER_AUTH).
async fn probe(
    addr: std::net::SocketAddr,
    id: &str,
    key: [u8; 32],
    server_key: Option<[u8; 32]>,
) -> (Vec<u8>, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut out = BytesMut::new();
    let cred = Credential {
        id: Id::new(id).unwrap(),
        key: SecretKey::from_bytes(key),
        server: addr.to_string(),
        server_key: server_key.unwrap_or([9; 32]),
    };
    let mode = if server_key.is_some() {
        Mode::Encrypted
    } else {
        Mode::Authenticated
    };
    let wait = attack::hello(&cred, mode, [3; 32], &mut out);
    tcp.write_all(&out).await.unwrap();
    let mut buf = BytesMut::new();
    let auth = read_one(&mut tcp, &mut buf).await.unwrap();
    let mut fin = BytesMut::new();
    if wait.handle_server_auth(&auth, &mut fin).is_err() {
        fin = BytesMut::from(&[0, 0, 0, 33, 0x12][..]);
        fin.extend_from_slice(&[0x5a; 32]);
    }
    tcp.write_all(&fin).await.unwrap();
    let mut rest = buf.to_vec();
    rest.extend(read_to_eof(&mut tcp, 5).await);
    (auth[..5].to_vec(), rest)
}

#[tokio::test]
async fn unknown_revoked_and_wrong_key_look_the_same_on_the_wire() {
    let a = Arena::new().await;
    a.device("revoked-one").await;
    a.device("real-one").await;
    let dir = a.srv.dir.path().to_owned();
    tokio::task::spawn_blocking(move || tally::admin::revoke(&dir, None, "revoked-one"))
        .await
        .unwrap()
        .unwrap();
    let s = Some(a.srv.open_token().server_static);
    let unknown = probe(a.addr(), "never-enrolled", [1; 32], s).await;
    let revoked = probe(a.addr(), "revoked-one", [1; 32], s).await;
    let wrong = probe(a.addr(), "real-one", [1; 32], s).await;
    // Hidden ids (spec 7.5): a SEALED_HELLO that does not open, sealed to another
    // server's key, gets the same answer.
    let other_server = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([0x42; 32]));
    let unopened = probe(a.addr(), "real-one", [1; 32], Some(other_server.to_bytes())).await;
    assert_eq!(
        unknown.0,
        vec![0, 0, 0, 0x49, 0x14],
        "a full SEALED_AUTH even for an unknown id"
    );
    assert_eq!(unknown.1, ErrorFrame::new(ErrorCode::AUTH_FAILED).encoded());
    assert_eq!(unknown, revoked);
    assert_eq!(unknown, wrong);
    assert_eq!(unknown, unopened);
    log_line(&[
        "refused",
        "a sealed id that does not open with this daemon's key",
    ])
    .await;
    log_line(&["refused", "unknown or revoked identity never-enrolled"]).await;
    log_line(&[
        "refused",
        "CLIENT_FINISH for identity real-one did not verify",
    ])
    .await;
    // Revoking changed the store on purpose: check the rest.
    let now = snapshot(a.srv.state.store.list().unwrap());
    assert!(now.iter().any(|r| r.0 == "revoked-one" && r.2.is_some()));
    assert_eq!(
        a.bystander.request("ok").await.unwrap(),
        Bytes::from_static(b"ok")
    );
}

// ---- malformed input, deadlines, floods ------------------------------------------------

#[tokio::test]
async fn lying_oversized_and_empty_frames_before_the_handshake() {
    let a = Arena::new().await;
    for (what, bytes) in [
        ("4 GiB length", vec![0xff, 0xff, 0xff, 0xff]),
        ("257-byte handshake frame", vec![0, 0, 1, 1]),
        ("zero length", vec![0, 0, 0, 0]),
        ("garbage type", vec![0, 0, 0, 1, 0x99]),
        ("session frame first", vec![0, 0, 0, 1, 0x20]),
    ] {
        let mut raw = TcpStream::connect(a.addr()).await.unwrap();
        raw.write_all(&bytes).await.unwrap();
        assert_eq!(
            read_to_eof(&mut raw, 5).await,
            [0, 0, 0, 4, 0x1f, 0, 2, 1],
            "{what}: ERROR MALFORMED"
        );
    }
    log_line(&[
        "refused",
        "frame length 4294967295 exceeds the limit of 256 bytes",
    ])
    .await;
    log_line(&["refused", "frame length is zero"]).await;
    a.check(&[]).await;
}

#[tokio::test]
async fn lying_oversized_and_empty_frames_in_a_session() {
    let a = Arena::new().await;
    let cred = a.device("liar").await;
    for (bytes, code, reason) in [
        (
            vec![0xff, 0xff, 0xff, 0xff],
            CloseCode::FRAME_TOO_LARGE,
            "frame length 4294967295 exceeds the limit of 65536 bytes",
        ),
        (
            vec![0, 1, 0, 1],
            CloseCode::FRAME_TOO_LARGE,
            "frame length 65537 exceeds",
        ),
        (
            vec![0, 0, 0, 0],
            CloseCode::PROTOCOL_ERROR,
            "frame length is zero",
        ),
    ] {
        let mut s = RawSession::open(a.addr(), &cred).await;
        s.tcp.write_all(&bytes).await.unwrap();
        match s.recv().await.unwrap().body {
            Body::Close { code: got, .. } => assert_eq!(got, code),
            other => panic!("expected CLOSE, got {other:?}"),
        }
        log_line(&["id=liar", "refused frame", reason]).await;
    }
    a.check(&["liar"]).await;
}

#[tokio::test]
async fn truncated_frames_and_eof_at_every_handshake_step_leave_nothing_behind() {
    let a = Arena::new().await;
    let cred = a.device("cutter").await;
    let token = a.srv.open_token();
    // Enrollment: EOF before anything, after ENROLL_INIT, after reading ENROLL_REPLY.
    for stop_after in 0..3 {
        let mut raw = TcpStream::connect(a.addr()).await.unwrap();
        let mut out = BytesMut::new();
        let params = token.client_params(Id::new("half-enrolled").unwrap());
        let _wait = ClientAwaitReply::start(params, [5; 32], &mut out);
        if stop_after >= 1 {
            raw.write_all(&out).await.unwrap();
        }
        if stop_after >= 2 {
            read_one(&mut raw, &mut BytesMut::new()).await.unwrap();
        }
        drop(raw);
    }
    // Half a HELLO, then EOF.
    let mut raw = TcpStream::connect(a.addr()).await.unwrap();
    raw.write_all(&[0, 0, 0, 40, 0x10, 1]).await.unwrap();
    drop(raw);
    // HELLO, SERVER_AUTH read, then EOF instead of CLIENT_FINISH.
    let mut raw = TcpStream::connect(a.addr()).await.unwrap();
    let mut out = BytesMut::new();
    attack::hello(&cred, Mode::Encrypted, [1; 32], &mut out);
    raw.write_all(&out).await.unwrap();
    read_one(&mut raw, &mut BytesMut::new()).await.unwrap();
    drop(raw);
    // A session: half a REQUEST, then EOF.
    let mut s = RawSession::open(a.addr(), &cred).await;
    let f = s.seal(&Body::Request {
        payload: Bytes::from_static(b"never finished"),
    });
    s.tcp.write_all(&f[..20]).await.unwrap();
    s.tcp.shutdown().await.unwrap();
    log_line(&["id=cutter", "session ended", "truncated"]).await;
    log_line(&["abandoned the handshake after SERVER_AUTH"]).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(a.rec.of("cutter").is_empty());
    assert!(a.srv.state.registry.list().iter().all(|s| s.id != "cutter"));
    a.check(&["cutter"]).await;
}

#[tokio::test]
async fn slow_drip_is_closed_by_the_deadlines() {
    let a = Arena::new().await;
    let cred = a.device("drip").await;
    // Before a session: one byte every 100 ms of a HELLO; the 500 ms first-frame
    // deadline wins, although bytes keep coming.
    let timeout_frame = [0u8, 0, 0, 4, 0x1f, 0, 8, 1];
    let mut raw = TcpStream::connect(a.addr()).await.unwrap();
    let started = std::time::Instant::now();
    let mut hello = BytesMut::new();
    let _ = attack::hello(&cred, Mode::Encrypted, [1; 32], &mut hello);
    for b in hello.iter() {
        if raw.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        read_to_eof(&mut raw, 5).await,
        timeout_frame,
        "ERROR TIMEOUT"
    );
    assert!(started.elapsed() >= Duration::from_millis(500));
    log_line(&["refused", "no complete first frame within 500ms"]).await;
    // A whole HELLO, then nothing: the rest of the handshake has 800 ms.
    let mut raw = TcpStream::connect(a.addr()).await.unwrap();
    raw.write_all(&hello).await.unwrap();
    let started = std::time::Instant::now();
    let got = read_to_eof(&mut raw, 5).await;
    assert!(
        got.ends_with(&timeout_frame),
        "SERVER_AUTH, then ERROR TIMEOUT: {got:x?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(800));
    log_line(&["refused", "handshake deadline of 800ms passed"]).await;
    // In a session the peer is authenticated, and any byte is activity (spec 8.5): a
    // frame dripping in keeps the session, the idle deadline closes it once the bytes
    // stop.
    let mut s = RawSession::open(a.addr(), &cred).await;
    let f = s.seal(&Body::Request {
        payload: Bytes::from(vec![b'x'; 64]),
    });
    let drip = async {
        for b in f.iter() {
            if s.tcp.write_all(&[*b]).await.is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    };
    let dripping = tokio::time::timeout(Duration::from_secs(3), drip).await;
    assert!(dripping.is_err(), "still dripping after 3 s");
    // Three idle deadlines (0.9 s each) passed while the bytes came: not closed.
    assert!(!has_log_line(&["id=drip", "closed idle session"]));
    assert!(a.srv.state.registry.list().iter().any(|s| s.id == "drip"));
    let stopped = std::time::Instant::now();
    log_line(&["id=drip", "closed idle session"]).await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(500),
        "closed for the silence after"
    );
    assert!(a.rec.of("drip").is_empty());
    a.check(&["drip"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_junk_and_half_open_connections_do_not_stop_a_live_session() {
    let a = Arena::with(|c| {
        c.limits.handshake_timeout = Duration::from_secs(3);
        // Bursts of 400: the 2,000 connections below outrun it.
        c.limits.new_connections_per_source = 200;
    })
    .await;
    let mut junk = Vec::new();
    for i in 0..2000u32 {
        let Ok(mut s) = TcpStream::connect(a.addr()).await else {
            continue;
        };
        let _ = match i % 4 {
            0 => s.write_all(&i.to_be_bytes().repeat(8)).await, // garbage
            1 => s.write_all(&[0, 0, 0, 40, 0x10, 1, 9]).await, // half a HELLO
            2 => s.write_all(&[0xff, 0xff, 0xff, 0xff]).await,  // lying length
            _ => Ok(()),                                        // silent
        };
        junk.push(s);
        if i % 100 == 0 {
            assert_eq!(
                a.bystander.request(format!("during {i}")).await.unwrap(),
                Bytes::from(format!("during {i}"))
            );
        }
    }
    for i in 0..50 {
        assert_eq!(
            a.bystander.request(format!("r{i}")).await.unwrap(),
            Bytes::from(format!("r{i}"))
        );
    }
    // One source's junk made room for its own newer junk, or was refused over its rate.
    log_line(&["closed an unauthenticated connection to make room"]).await;
    log_line(&["refused", "connection rate of its source"]).await;
    drop(junk);
    a.check(&[]).await;
}

#[tokio::test]
async fn connection_cut_mid_session_is_reported_as_truncation() {
    let a = Arena::new().await;
    let cred = a.device("cut").await;
    let p = proxy(
        a.addr(),
        Arc::new(|d, i, f: Bytes| match (d, i) {
            (Dir::C2s, 3) => Verdict {
                cut: true,
                ..Verdict::default()
            },
            _ => Verdict::pass(f),
        }),
    )
    .await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    c.request("first").await.unwrap();
    let e = c.request("second").await.unwrap_err();
    assert!(matches!(e, ClientError::Truncated), "{e:?}");
    log_line(&["id=cut", "session ended", "truncated"]).await;
    a.check(&["cut"]).await;
}

#[tokio::test]
async fn frame_at_the_last_sequence_number_is_refused_out_of_order() {
    // A device cannot jump to 2^64-1: the server expects 1. (Reaching 2^64-1 in order,
    // and the CLOSE-only rule there, are unit-tested in src/proto/session.rs.)
    let a = Arena::new().await;
    let cred = a.device("maxseq").await;
    let mut s = RawSession::open(a.addr(), &cred).await;
    s.session.set_counters_for_testing(u64::MAX - 1, 0);
    let f = s.seal(&Body::Request {
        payload: Bytes::from_static(b"late"),
    });
    s.tcp.write_all(&f).await.unwrap();
    match s.recv().await.unwrap().body {
        Body::Close { code, .. } => assert_eq!(code, CloseCode::PROTOCOL_ERROR),
        other => panic!("{other:?}"),
    }
    log_line(&[
        "id=maxseq",
        "sequence number 18446744073709551614 where 1 was expected",
    ])
    .await;
    a.check(&["maxseq"]).await;
}

#[tokio::test]
async fn unknown_protocol_version_is_answered_with_the_version_spoken() {
    let a = Arena::new().await;
    for first in [&[0u8, 0, 0, 3, 0x10, 2, 0][..], &[0, 0, 0, 3, 0x01, 9, 0]] {
        let mut raw = TcpStream::connect(a.addr()).await.unwrap();
        raw.write_all(first).await.unwrap();
        // ERROR UNSUPPORTED_VERSION, whose last byte is the version this server speaks.
        assert_eq!(read_to_eof(&mut raw, 5).await, [0, 0, 0, 4, 0x1f, 0, 1, 1]);
    }
    log_line(&["refused", "unsupported protocol version 2"]).await;
    a.check(&[]).await;
}

#[tokio::test]
async fn two_devices_sharing_an_identity_are_detected() {
    // Takeover ping-pong (spec 7.3): the operator is told, by identity.
    let a = Arena::new().await;
    let cred = a.device("shared").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (c, _) = Client::connect(&cred, fast()).await.unwrap();
        c.request("x").await.unwrap();
        clients.push(c);
    }
    let line = log_line(&["identity taken over repeatedly", "id=shared"]).await;
    assert!(
        line.contains("takeover = \\\"reject\\\"") || line.contains("consider takeover"),
        "{line}"
    );
    for c in &clients[..3] {
        assert!(matches!(
            end_of(c).await,
            ClientError::Closed {
                code: CloseCode::TAKEN_OVER,
                ..
            }
        ));
    }
    a.check(&["shared"]).await;
}

// ---- downgrade (spec 7.8, 13.12) -------------------------------------------------------

/// A man in the middle who knows the device's id replaces its SEALED_HELLO with a HELLO
/// (the authenticated mode) at a daemon that allows both: the daemon answers SERVER_AUTH,
/// the device refuses it as the other mode's answer and sends nothing more. No session,
/// no request, no plaintext frame from the device.
#[tokio::test]
async fn a_sealed_hello_rewritten_to_hello_is_refused_by_the_device() {
    let a = Arena::with(|c| c.encryption = tally::config::EncryptionPolicy::Allowed).await;
    let cred = a.device("downgraded").await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let (attacker_cred, seen) = (cred.clone(), log.clone());
    let p = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| {
            seen.lock().unwrap().push((d, i, f.clone()));
            if d == Dir::C2s && i == 0 && f[4] == 0x13 {
                let mut hello = BytesMut::new();
                attack::hello(&attacker_cred, Mode::Authenticated, [5; 32], &mut hello);
                return Verdict::pass(hello.freeze());
            }
            Verdict::pass(f)
        }),
    )
    .await;
    let once = fast().with_retry(client::Backoff::never());
    let e = Client::connect(&via(&cred, p), once).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Protocol(ProtocolError::Frame(_))),
        "the device refused the downgraded answer: {e:?}"
    );
    let frames = log.lock().unwrap().clone();
    let from_device: Vec<u8> = frames
        .iter()
        .filter(|(d, _, _)| *d == Dir::C2s)
        .map(|(_, _, f)| f[4])
        .collect();
    assert_eq!(
        from_device,
        [0x13],
        "the device sent its SEALED_HELLO and nothing else"
    );
    assert!(frames
        .iter()
        .any(|(d, _, f)| *d == Dir::S2c && f[4] == 0x11));
    assert!(a.rec.of("downgraded").is_empty());
    a.check(&["downgraded"]).await;
}

/// A man in the middle answers the device's SEALED_HELLO with a forged ERROR
/// MODE_REFUSED: the device reports it and never tries the authenticated mode on its own,
/// not on the connection's retries and not on a reconnecting link.
#[tokio::test]
async fn a_forged_mode_refused_never_makes_the_device_fall_back() {
    let a = Arena::new().await;
    let cred = a.device("no-fallback").await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = log.clone();
    let p = proxy(
        a.addr(),
        Arc::new(move |d, i, f: Bytes| {
            seen.lock().unwrap().push((d, i, f.clone()));
            if d == Dir::C2s && i == 0 {
                return Verdict {
                    back: vec![Bytes::from(
                        ErrorFrame::new(ErrorCode::MODE_REFUSED).encoded(),
                    )],
                    cut: true,
                    ..Verdict::default()
                };
            }
            Verdict::pass(f)
        }),
    )
    .await;
    let e = Client::connect(&via(&cred, p), fast()).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::MODE_REFUSED)),
        "{e:?}"
    );
    let firsts: Vec<u8> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(d, i, _)| *d == Dir::C2s && *i == 0)
        .map(|(_, _, f)| f[4])
        .collect();
    assert!(!firsts.is_empty());
    assert!(
        firsts.iter().all(|&t| t == 0x13),
        "only SEALED_HELLOs, never a HELLO: {firsts:x?}"
    );
    a.check(&["no-fallback"]).await;
}

/// The daemon's default policy refuses a device that asks for the authenticated mode,
/// before any key work, with MODE_REFUSED and a log line that names the setting.
#[tokio::test]
async fn the_default_policy_refuses_the_authenticated_mode() {
    let a = Arena::new().await;
    let cred = a.device("plain-device").await;
    let mut opts = fast().with_retry(client::Backoff::never());
    opts.mode = Mode::Authenticated;
    let e = Client::connect(&cred, opts).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::MODE_REFUSED)),
        "{e:?}"
    );
    log_line(&[
        "refused",
        "authenticated mode refused",
        "encryption = \"required\"",
    ])
    .await;
    // And a policy "off" refuses the encrypted mode the same way.
    let b = Arena::with(|c| c.encryption = tally::config::EncryptionPolicy::Off).await;
    let cred = b.device("sealed-device").await;
    let e = Client::connect(&cred, fast().with_retry(client::Backoff::never()))
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::Refused(ErrorCode::MODE_REFUSED)),
        "{e:?}"
    );
    a.check(&["plain-device"]).await;
}

/// A device's frames are not readable on the wire in the encrypted mode (P9): a payload
/// and the device's id appear in no byte the proxy sees, in either direction.
#[tokio::test]
async fn payloads_and_ids_do_not_cross_the_wire_in_the_clear() {
    let a = Arena::new().await;
    let cred = a.device("secret-keeper-7").await;
    let log = Arc::new(Mutex::new(Vec::new()));
    let p = proxy(a.addr(), recorder(log.clone())).await;
    let (c, _) = Client::connect(&via(&cred, p), fast()).await.unwrap();
    let secret = "wifi-psk=correct-horse-battery-staple";
    assert_eq!(c.request(secret).await.unwrap(), Bytes::from(secret));
    c.close().await.unwrap();
    let wire: Vec<u8> = log
        .lock()
        .unwrap()
        .iter()
        .flat_map(|(_, _, f)| f.to_vec())
        .collect();
    assert!(wire.len() > 200, "the session went through the proxy");
    for needle in [secret.as_bytes(), b"secret-keeper-7"] {
        assert!(
            !wire.windows(needle.len()).any(|w| w == needle),
            "{} found on the wire",
            String::from_utf8_lossy(needle)
        );
    }
    a.check(&["secret-keeper-7"]).await;
}
