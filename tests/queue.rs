//! Durable delivery (spec 8.8; README "Queued delivery") against a running daemon:
//! messages queued for an offline device are delivered in order when it connects,
//! deleted only once acknowledged, expired, bounded, purged; kill -9 at every step loses
//! nothing a sender was told was queued; forged acknowledgements are refused.

mod attack;
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use attack::RawSession;
use bytes::Bytes;
use common::bin::{admin, start, text};
use common::TestServer;
use tally::client::{self, Client, ClientOptions, Incoming, IncomingDelivery};
use tally::proto::credential::{Credential, EnrollmentToken};
use tally::proto::{Body, CloseCode, DeliveryKind, Id, Status};
use tally::server::delivery::{EnqueueError, Enqueued, Outcome};
use tally::store::queue::{Origin, Refusal};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

async fn enqueue(
    s: &TestServer,
    id: &str,
    kind: DeliveryKind,
    payload: &str,
    ttl: Option<Duration>,
) -> Result<Enqueued, EnqueueError> {
    let d = &s.state.deliveries;
    d.enqueue(
        &s.state.registry,
        &s.state.limits(),
        Id::new(id).unwrap(),
        kind,
        Bytes::copy_from_slice(payload.as_bytes()),
        ttl,
        Origin::Control,
    )
    .await
}

async fn queued_ids(s: &TestServer, id: &str) -> Vec<u64> {
    let d = &s.state.deliveries;
    let list = d.queue().list(&Id::new(id).unwrap()).await.unwrap();
    list.into_iter().map(|m| m.msg_id).collect()
}

/// Waits (up to 10 s) until `id`'s queue holds exactly `want`.
async fn until_queued(s: &TestServer, id: &str, want: &[u64]) {
    for _ in 0..1000 {
        if queued_ids(s, id).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the queue of {id} is {:?}, not {want:?}",
        queued_ids(s, id).await
    );
}

/// The next delivery on `incoming` (within 10 s); other items are skipped.
async fn next_delivery(incoming: &mut mpsc::Receiver<Incoming>) -> IncomingDelivery {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), incoming.recv()).await {
            Ok(Some(Incoming::Delivery(d))) => return d,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the session ended"),
            Err(_) => panic!("no delivery within 10 s"),
        }
    }
}

/// Nothing more is delivered within `ms`.
async fn no_delivery(incoming: &mut mpsc::Receiver<Incoming>, ms: u64) {
    if let Ok(Some(Incoming::Delivery(d))) =
        tokio::time::timeout(Duration::from_millis(ms), incoming.recv()).await
    {
        panic!("unexpected delivery of message {}", d.msg_id);
    }
}

#[tokio::test]
async fn queued_while_offline_delivered_in_order_and_deleted_once_acknowledged() {
    let s = TestServer::start(|_| {}).await;
    let cred = s.enroll("sensor-1").await;
    // More than one window (limits.deliveries_in_flight = 16) of both kinds.
    let mut sent = Vec::new();
    for i in 0..40 {
        let kind = if i % 3 == 0 {
            DeliveryKind::Request
        } else {
            DeliveryKind::Message
        };
        let q = enqueue(&s, "sensor-1", kind, &format!("m{i}"), None)
            .await
            .unwrap();
        assert_eq!(q.msg_id, i + 1, "ids count up from 1 for this enrollment");
        sent.push((kind, q));
    }
    assert_eq!(queued_ids(&s, "sensor-1").await.len(), 40);
    let (client, mut incoming) = s.connect(&cred).await;
    let mut last = 0;
    for (i, (kind, _)) in sent.iter().enumerate() {
        let d = next_delivery(&mut incoming).await;
        assert!(d.msg_id > last, "in order: {} after {last}", d.msg_id);
        last = d.msg_id;
        assert_eq!((d.msg_id, d.kind), (i as u64 + 1, *kind));
        assert_eq!(d.payload, format!("m{i}"));
        let answer = Bytes::from(format!("re:m{i}"));
        d.ack(Status::OK, answer).await.unwrap();
    }
    // Each sender learns the outcome: a request's with the device's answer.
    for (i, (kind, q)) in sent.into_iter().enumerate() {
        let outcome = tokio::time::timeout(Duration::from_secs(10), q.outcome)
            .await
            .unwrap()
            .unwrap();
        match outcome {
            Outcome::Acknowledged { status, payload } => {
                assert_eq!(status, Status::OK);
                assert_eq!(payload, format!("re:m{i}"), "{kind:?}");
            }
            other => panic!("message {i}: {other:?}"),
        }
    }
    assert!(queued_ids(&s, "sensor-1").await.is_empty());
    // Queued while connected: delivered at once.
    let q = enqueue(&s, "sensor-1", DeliveryKind::Message, "live", None)
        .await
        .unwrap();
    let d = next_delivery(&mut incoming).await;
    assert_eq!((d.msg_id, &d.payload[..]), (41, &b"live"[..]));
    d.ack(Status::OK, Bytes::new()).await.unwrap();
    assert!(matches!(
        q.outcome.await.unwrap(),
        Outcome::Acknowledged { .. }
    ));
    let metrics = s.state.metrics.encode(&s.state);
    for line in [
        "tally_queue_messages_total{outcome=\"enqueued\"} 41",
        "tally_queue_messages_total{outcome=\"delivered\"} 41",
        "tally_queue_messages_total{outcome=\"acknowledged\"} 41",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    drop(client);
}

#[tokio::test]
async fn a_device_that_never_acknowledges_holds_up_only_itself_and_gets_it_all_again() {
    let s = TestServer::start(|c| c.limits.deliveries_in_flight = 4).await;
    let slow = s.enroll("slow").await;
    let fast = s.enroll("fast").await;
    for i in 0..10 {
        for id in ["slow", "fast"] {
            enqueue(&s, id, DeliveryKind::Message, &format!("{id}{i}"), None)
                .await
                .unwrap();
        }
    }
    let (slow_client, mut slow_in) = s.connect(&slow).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(next_delivery(&mut slow_in).await);
    }
    // Its window is full: nothing more until it acknowledges.
    no_delivery(&mut slow_in, 300).await;
    // Another device is not held up.
    let (_fast_client, mut fast_in) = s.connect(&fast).await;
    for i in 0..10 {
        let d = next_delivery(&mut fast_in).await;
        assert_eq!(d.payload, format!("fast{i}"));
        d.ack(Status::OK, Bytes::new()).await.unwrap();
    }
    until_queued(&s, "fast", &[]).await;
    // The slow device goes away with 4 unacknowledged: they come again, same ids.
    let held: Vec<u64> = held.into_iter().map(|d| d.msg_id).collect();
    assert_eq!(held, [1, 2, 3, 4]);
    slow_client.close().await.unwrap();
    drop(slow_in);
    let (_again, mut slow_in) = s.connect(&slow).await;
    for want in 1..=10u64 {
        let d = next_delivery(&mut slow_in).await;
        assert_eq!(d.msg_id, want, "redelivered from the oldest unacknowledged");
        d.ack(Status::OK, Bytes::new()).await.unwrap();
    }
}

#[tokio::test]
async fn expiry_bounds_and_sizes_are_enforced_and_the_sender_told() {
    let s = TestServer::start(|c| {
        c.limits.queue_max_messages = 3;
        c.limits.queue_max_bytes = 100;
    })
    .await;
    let cred = s.enroll("meter").await;
    let short = enqueue(
        &s,
        "meter",
        DeliveryKind::Message,
        "soon gone",
        Some(Duration::from_millis(300)),
    )
    .await
    .unwrap();
    for p in ["a", "b"] {
        enqueue(&s, "meter", DeliveryKind::Message, p, None)
            .await
            .unwrap();
    }
    // At the count: refused, nothing stored.
    match enqueue(&s, "meter", DeliveryKind::Message, "c", None).await {
        Err(EnqueueError::Refused(Refusal::Full { messages: 3, .. })) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(queued_ids(&s, "meter").await, [1, 2, 3]);
    // The offline device's message expires; its sender hears so.
    let outcome = tokio::time::timeout(Duration::from_secs(10), short.outcome)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Expired);
    assert_eq!(queued_ids(&s, "meter").await, [2, 3]);
    // At the bytes: refused.
    let big = "x".repeat(99);
    match enqueue(&s, "meter", DeliveryKind::Message, &big, None).await {
        Err(EnqueueError::Refused(Refusal::Full { bytes: 2, .. })) => {}
        other => panic!("{other:?}"),
    }
    // Not enrolled, or larger than any frame: refused.
    assert!(matches!(
        enqueue(&s, "nobody", DeliveryKind::Message, "x", None).await,
        Err(EnqueueError::Refused(Refusal::NotEnrolled(_)))
    ));
    let huge = "x".repeat(70_000);
    assert!(matches!(
        enqueue(&s, "meter", DeliveryKind::Message, &huge, None).await,
        Err(EnqueueError::TooLarge { .. })
    ));
    // What is left is delivered, ids skipping the expired one.
    let (_c, mut incoming) = s.connect(&cred).await;
    for want in [2, 3] {
        let d = next_delivery(&mut incoming).await;
        assert_eq!(d.msg_id, want);
        d.ack(Status::OK, Bytes::new()).await.unwrap();
    }
}

#[tokio::test]
async fn a_message_larger_than_the_device_takes_is_reported_undeliverable() {
    let s = TestServer::start(|_| {}).await;
    let cred = s.enroll("tiny").await;
    let big = enqueue(&s, "tiny", DeliveryKind::Message, &"x".repeat(2000), None)
        .await
        .unwrap();
    enqueue(&s, "tiny", DeliveryKind::Message, "small", None)
        .await
        .unwrap();
    // The device announces a 1,024-byte frame limit.
    let opts = ClientOptions::default().with_max_frame_len(1024);
    let (_c, mut incoming) = Client::connect(&cred, opts).await.unwrap();
    let d = next_delivery(&mut incoming).await;
    assert_eq!((d.msg_id, &d.payload[..]), (2, &b"small"[..]));
    d.ack(Status::OK, Bytes::new()).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(10), big.outcome).await {
        Ok(Ok(Outcome::Undeliverable(why))) => assert!(why.contains("frame limit"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removal_purges_the_queue_and_a_new_enrollment_starts_again_at_one() {
    let s = TestServer::start(|_| {}).await;
    s.enroll("valve").await;
    let a = enqueue(&s, "valve", DeliveryKind::Message, "a", None)
        .await
        .unwrap();
    let b = enqueue(&s, "valve", DeliveryKind::Request, "b", None)
        .await
        .unwrap();
    let dir = s.config.state_dir.clone();
    let out = tokio::task::spawn_blocking(move || admin(&dir, &["remove", "valve"]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(a.outcome.await.unwrap(), Outcome::Purged);
    assert_eq!(b.outcome.await.unwrap(), Outcome::Purged);
    // Enrolled again: a new queue, numbered from 1, with nothing of the old one.
    let cred = s.enroll("valve").await;
    let c = enqueue(&s, "valve", DeliveryKind::Message, "c", None)
        .await
        .unwrap();
    assert_eq!(c.msg_id, 1);
    let (_c, mut incoming) = s.connect(&cred).await;
    let d = next_delivery(&mut incoming).await;
    assert_eq!((d.msg_id, &d.payload[..]), (1, &b"c"[..]));
}

/// The code of the server's CLOSE, reading past what comes before it.
async fn close_code(raw: &mut RawSession) -> Option<CloseCode> {
    while let Some(f) = raw.recv().await {
        if let Body::Close { code, .. } = f.body {
            return Some(code);
        }
    }
    None
}

/// Attack (spec 8.8, P13): a device, or whoever holds its key, acknowledges a message it
/// was not delivered in this session, or one twice. Refused: CLOSE PROTOCOL_ERROR, and
/// nothing is deleted but what was really acknowledged.
#[tokio::test]
async fn forged_and_replayed_acknowledgements_are_refused_and_delete_nothing() {
    let s = TestServer::start(|_| {}).await;
    let cred = s.enroll("door").await;
    for p in ["open", "close"] {
        enqueue(&s, "door", DeliveryKind::Message, p, None)
            .await
            .unwrap();
    }
    for attack in ["never delivered", "twice"] {
        let mut raw = RawSession::open(s.addr, &cred).await;
        let first = raw.recv().await.expect("a DELIVER");
        let Body::Deliver { msg_id, .. } = first.body else {
            panic!("{first:?}")
        };
        let forged = match attack {
            // Message 2 is queued, and delivered in this session only with message 1's
            // window, but an id the server never delivered is refused whatever it is.
            "never delivered" => 99,
            _ => {
                let ack = raw.seal(&Body::Ack {
                    msg_id,
                    status: Status::OK,
                    payload: Bytes::new(),
                });
                raw.tcp.write_all(&ack).await.unwrap();
                msg_id
            }
        };
        let ack = raw.seal(&Body::Ack {
            msg_id: forged,
            status: Status::OK,
            payload: Bytes::new(),
        });
        raw.tcp.write_all(&ack).await.unwrap();
        assert_eq!(
            close_code(&mut raw).await,
            Some(CloseCode::PROTOCOL_ERROR),
            "{attack}"
        );
    }
    // Only the one real acknowledgement deleted anything.
    until_queued(&s, "door", &[2]).await;
    // A DELIVER sent to the server is refused too (it only goes to a device).
    let mut raw = RawSession::open(s.addr, &cred).await;
    let _ = raw.recv().await;
    let fake = raw.seal(&Body::Deliver {
        msg_id: 1,
        kind: DeliveryKind::Message,
        payload: Bytes::from_static(b"x"),
    });
    raw.tcp.write_all(&fake).await.unwrap();
    assert_eq!(close_code(&mut raw).await, Some(CloseCode::PROTOCOL_ERROR));
    assert_eq!(queued_ids(&s, "door").await, [2]);
}

// ---- kill -9 at every step, with the real daemon -------------------------------------

fn open_token(state: &std::path::Path) -> EnrollmentToken {
    EnrollmentToken::parse(&tally::admin::open_token(state, None, false).unwrap().token).unwrap()
}

async fn enroll_at(addr: &str, state: &std::path::Path, id: &str) -> Credential {
    let token = open_token(state);
    client::enroll(
        addr,
        &token,
        Id::new(id).unwrap(),
        &client::ClientOptions::default(),
    )
    .await
    .unwrap()
}

fn at(cred: &Credential, addr: &str) -> Credential {
    let mut c = cred.clone();
    c.server = addr.to_owned();
    c
}

/// `tallyd send --queue`: the message id it printed, if it says it was queued.
fn send_queued(state: &std::path::Path, id: &str, payload: &str) -> Option<u64> {
    let out = admin(state, &["send", "--queue", id, payload]);
    out.status
        .success()
        .then(|| text(&out.stdout).trim().parse().unwrap())
}

/// Kill -9 while senders are being told "queued": every message a sender was told was
/// queued is delivered after the restart, in id order, with its payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_queueing_loses_no_message_a_sender_was_told_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut daemon, _) = start(&state, true);
    let cred = enroll_at(&daemon.addr, &state, "crash-q").await;
    let confirmed = Arc::new(Mutex::new(BTreeMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..3)
        .map(|t| {
            let (state, confirmed, stop) = (state.clone(), confirmed.clone(), stop.clone());
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return;
                    }
                    let payload = format!("t{t}-{i}");
                    if let Some(msg_id) = send_queued(&state, "crash-q", &payload) {
                        confirmed.lock().unwrap().insert(msg_id, payload);
                    }
                }
            })
        })
        .collect();
    while confirmed.lock().unwrap().len() < 30 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    daemon.child.kill().unwrap(); // SIGKILL, with sends in flight
    daemon.child.wait().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
    let confirmed = confirmed.lock().unwrap().clone();
    let (daemon, _) = start(&state, false);
    let (_c, mut incoming) = Client::connect(&at(&cred, &daemon.addr), ClientOptions::default())
        .await
        .unwrap();
    let mut got = BTreeMap::new();
    let mut last = 0;
    while got.len() < confirmed.len() || last < *confirmed.keys().last().unwrap() {
        let d = next_delivery(&mut incoming).await;
        assert!(d.msg_id > last, "in order: {} after {last}", d.msg_id);
        last = d.msg_id;
        got.insert(d.msg_id, String::from_utf8(d.payload.to_vec()).unwrap());
        d.ack(Status::OK, Bytes::new()).await.unwrap();
    }
    for (msg_id, payload) in &confirmed {
        assert_eq!(got.get(msg_id), Some(payload), "message {msg_id} lost");
    }
}

/// Kill -9 mid-delivery (delivered, not acknowledged) and right after acknowledgements:
/// after the restart, what was not recorded as acknowledged comes again with its id, in
/// order, from the oldest not recorded; nothing is skipped or lost; the device's record
/// of the highest id it handled is enough to handle each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_delivery_and_after_acks_redelivers_what_was_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut daemon, _) = start(&state, true);
    let cred = enroll_at(&daemon.addr, &state, "crash-d").await;
    let total = 12u64;
    for i in 1..=total {
        assert_eq!(send_queued(&state, "crash-d", &format!("p{i}")), Some(i));
    }
    let mut handled = 0u64; // the device's record: the highest id it handled
    let mut handled_twice = 0;
    for round in 0.. {
        assert!(round < 20, "no progress: handled {handled}");
        if handled == total {
            break;
        }
        let (c, mut incoming) = Client::connect(&at(&cred, &daemon.addr), ClientOptions::default())
            .await
            .unwrap();
        // Handle and acknowledge two new messages, then take one more and keep it
        // unacknowledged (mid-delivery); the daemon dies right after the last ACK (odd
        // rounds) or a moment later (even rounds).
        let mut first = None;
        let mut new = 0;
        while handled < total && new < 3 {
            let d = next_delivery(&mut incoming).await;
            first.get_or_insert(d.msg_id);
            assert_eq!(d.payload, format!("p{}", d.msg_id));
            if d.msg_id <= handled {
                // A redelivery (its ACK was not recorded): acknowledged again, not
                // handled twice.
                handled_twice += 1;
                d.ack(Status::OK, Bytes::new()).await.unwrap();
                continue;
            }
            assert_eq!(d.msg_id, handled + 1, "in order, nothing skipped");
            new += 1;
            if new < 3 {
                handled = d.msg_id;
                d.ack(Status::OK, Bytes::new()).await.unwrap();
            }
        }
        // Each session starts from the oldest message not recorded as acknowledged:
        // never after the first one this device has not handled.
        assert!(first.is_none_or(|f| f <= handled + 1));
        if round % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        daemon.child.kill().unwrap(); // SIGKILL
        daemon.child.wait().unwrap();
        drop((c, incoming));
        daemon = start(&state, false).0;
    }
    // Redeliveries there were (the kills after ACKs), each dropped by the record.
    eprintln!("redelivered and dropped by the device: {handled_twice}");
    // What is left is at most redeliveries; once acknowledged, the queue is empty.
    let (_c, mut incoming) = Client::connect(&at(&cred, &daemon.addr), ClientOptions::default())
        .await
        .unwrap();
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(1), incoming.recv()).await {
        if let Incoming::Delivery(d) = item {
            assert!(d.msg_id <= handled, "only redeliveries are left");
            d.ack(Status::OK, Bytes::new()).await.unwrap();
        }
    }
    for _ in 0..100 {
        let out = admin(&state, &["queue", "crash-d", "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if v.as_array().is_some_and(Vec::is_empty) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the queue did not empty");
}

/// One length-prefixed message of the backend protocol (spec/BACKEND.md).
async fn app_read(s: &mut tokio::net::UnixStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).await.unwrap();
    body
}

/// The backend application queues for an offline device (QUEUE), is told the message
/// id (RESULT outcome 5), and later the device's answer (REPORT); a refused one gets
/// outcome 6 with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_application_queues_and_gets_delivery_reports() {
    let dir = Arc::new(tempfile::TempDir::new().unwrap());
    let sock = dir.path().join("app.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let spec: tally::config::BackendSpec = format!("unix:{}", sock.display()).parse().unwrap();
    let s = TestServer::start_with(
        dir.clone(),
        tally::backend::from_spec(&spec).unwrap(),
        |_| {},
    )
    .await;
    let cred = s.enroll("pump").await;
    let (mut app, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
        .await
        .unwrap()
        .unwrap();
    let queue = |call: u64, kind: u8, id: &str, payload: &[u8]| {
        let mut body = vec![0x83];
        body.extend_from_slice(&call.to_be_bytes());
        body.push(kind);
        body.extend_from_slice(&3600u32.to_be_bytes());
        body.push(id.len() as u8);
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(payload);
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        frame
    };
    app.write_all(&queue(7, 1, "pump", b"speed?"))
        .await
        .unwrap();
    let result = app_read(&mut app).await;
    // RESULT, call 7, outcome 5 (queued), status 0, the message id.
    assert_eq!(result[..12], [0x03, 0, 0, 0, 0, 0, 0, 0, 7, 5, 0, 0]);
    let msg_id = u64::from_be_bytes(result[12..20].try_into().unwrap());
    assert_eq!(msg_id, 1);
    app.write_all(&queue(8, 2, "nobody", b"x")).await.unwrap();
    let result = app_read(&mut app).await;
    assert_eq!(result[..10], [0x03, 0, 0, 0, 0, 0, 0, 0, 8, 6]);
    assert!(
        text(&result[12..]).contains("not enrolled"),
        "{}",
        text(&result[12..])
    );
    // The device comes online, answers; the application gets the REPORT.
    let (_c, mut incoming) = s.connect(&cred).await;
    let d = next_delivery(&mut incoming).await;
    assert_eq!((d.msg_id, &d.payload[..]), (1, &b"speed?"[..]));
    d.ack(Status(300), Bytes::from_static(b"1200 rpm"))
        .await
        .unwrap();
    let report = app_read(&mut app).await;
    let mut want = vec![0x04];
    want.extend_from_slice(&1u64.to_be_bytes());
    want.extend_from_slice(&[4, b'p', b'u', b'm', b'p', 0]);
    want.extend_from_slice(&300u16.to_be_bytes());
    want.extend_from_slice(b"1200 rpm");
    assert_eq!(
        report, want,
        "REPORT: msg_id, id, outcome 0, status, answer"
    );
}

/// What the property test does next.
#[derive(Debug, Clone)]
enum Op {
    /// Queue a request (true) or a message.
    Enqueue(bool),
    /// Connect, if not connected.
    Connect,
    /// End the session: orderly (true) or cut.
    Disconnect(bool),
    /// Acknowledge the i-th held delivery (modulo how many are held).
    Ack(usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => any::<bool>().prop_map(Op::Enqueue),
        2 => Just(Op::Connect),
        1 => any::<bool>().prop_map(Op::Disconnect),
        3 => (0..8usize).prop_map(Op::Ack),
    ]
}

/// A live session in the property test: its deliveries held (not acknowledged).
struct Live {
    _client: Client,
    incoming: mpsc::Receiver<Incoming>,
    held: Vec<IncomingDelivery>,
    last: u64,
}

/// Takes what the session delivers until it holds what the model says it must: the
/// oldest `WINDOW` messages not acknowledged, in order, each with its payload.
async fn settle(live: &mut Live, model: &BTreeMap<u64, String>, window: usize) {
    let want: Vec<u64> = model.keys().copied().take(window).collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut held: Vec<u64> = live.held.iter().map(|d| d.msg_id).collect();
        held.sort_unstable();
        if held == want {
            // And nothing beyond the window, nothing more.
            tokio::time::sleep(Duration::from_millis(5)).await;
            if let Ok(Incoming::Delivery(d)) = live.incoming.try_recv() {
                panic!(
                    "message {} delivered beyond the window: held {held:?}",
                    d.msg_id
                );
            }
            return;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(left, live.incoming.recv()).await {
            Ok(Some(Incoming::Delivery(d))) => {
                assert!(
                    d.msg_id > live.last,
                    "in order: {} after {}",
                    d.msg_id,
                    live.last
                );
                live.last = d.msg_id;
                let payload = model.get(&d.msg_id).unwrap_or_else(|| {
                    panic!("message {} delivered after its ACK was recorded", d.msg_id)
                });
                assert_eq!(d.payload, payload.as_bytes());
                live.held.push(d);
            }
            Ok(Some(_)) => {}
            _ => panic!("holding {held:?}, the model says {want:?}"),
        }
    }
}

/// Random interleavings of queueing, connecting, disconnecting (orderly or cut) and
/// acknowledging (in any order), against a model of the queue: each session holds
/// exactly the oldest unacknowledged messages its window allows, in id order, with their
/// payloads; nothing acknowledged (and recorded) comes again; at the end everything is
/// delivered and the queue is empty.
#[test]
fn random_interleavings_match_the_model() {
    use proptest::test_runner::{Config, TestRunner};
    const WINDOW: usize = 3;
    let mut runner = TestRunner::new(Config {
        cases: 12,
        failure_persistence: None,
        ..Config::default()
    });
    let ops = proptest::collection::vec(op(), 1..30);
    runner
        .run(&ops, |ops| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let s = TestServer::start(|c| c.limits.deliveries_in_flight = WINDOW).await;
                let cred = s.enroll("prop").await;
                let mut model = BTreeMap::new();
                let mut last_id = 0;
                let mut live: Option<Live> = None;
                let connect = || async {
                    let (client, incoming) = s.connect(&cred).await;
                    Live {
                        _client: client,
                        incoming,
                        held: Vec::new(),
                        last: 0,
                    }
                };
                for op in ops.into_iter().chain([Op::Connect]) {
                    match op {
                        Op::Enqueue(request) => {
                            let kind = if request {
                                DeliveryKind::Request
                            } else {
                                DeliveryKind::Message
                            };
                            let payload = format!("p{}", last_id + 1);
                            let q = enqueue(&s, "prop", kind, &payload, None).await.unwrap();
                            assert!(q.msg_id > last_id, "ids increase");
                            last_id = q.msg_id;
                            model.insert(q.msg_id, payload);
                        }
                        Op::Connect if live.is_none() => live = Some(connect().await),
                        Op::Connect => {}
                        Op::Disconnect(orderly) => {
                            if let Some(l) = live.take() {
                                if orderly {
                                    let _ = l._client.close().await;
                                }
                            }
                            // The daemon notices before the next connection (else it
                            // would be taken over, which is the same for the queue).
                            until_sessions(&s, 0).await;
                        }
                        Op::Ack(i) => {
                            let Some(l) = live.as_mut() else { continue };
                            settle(l, &model, WINDOW).await;
                            if l.held.is_empty() {
                                continue;
                            }
                            let d = l.held.remove(i % l.held.len());
                            let msg_id = d.msg_id;
                            d.ack(Status::OK, Bytes::new()).await.unwrap();
                            model.remove(&msg_id);
                            let left: Vec<u64> = model.keys().copied().collect();
                            until_queued(&s, "prop", &left).await;
                        }
                    }
                    if let Some(l) = live.as_mut() {
                        settle(l, &model, WINDOW).await;
                    }
                }
                // The end: everything is delivered, acknowledged, gone.
                let l = live.as_mut().unwrap();
                while !model.is_empty() {
                    settle(l, &model, WINDOW).await;
                    for d in std::mem::take(&mut l.held) {
                        model.remove(&d.msg_id);
                        d.ack(Status::OK, Bytes::new()).await.unwrap();
                    }
                }
                until_queued(&s, "prop", &[]).await;
            });
            Ok(())
        })
        .unwrap();
}

/// Waits (up to 10 s) until the daemon holds `n` sessions.
async fn until_sessions(s: &TestServer, n: usize) {
    for _ in 0..1000 {
        if s.state.registry.len() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{} sessions, not {n}", s.state.registry.len());
}

/// Security (found in review): the ACK of a removed enrollment's session, arriving while
/// that session closes, named a message by identity and id only, so it deleted (and
/// reported acknowledged, with the old device's answer) the message of the same id
/// queued for a new enrollment of the same identity, never delivered. An ACK now names
/// the enrollment its session's key belongs to: it touches nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_enrollments_late_ack_cannot_touch_a_new_enrollments_queue() {
    let s = TestServer::start(|_| {}).await;
    let old = s.enroll("meter-9").await;
    enqueue(
        &s,
        "meter-9",
        DeliveryKind::Message,
        "for the old device",
        None,
    )
    .await
    .unwrap();
    let mut raw = RawSession::open(s.addr, &old).await;
    let first = raw.recv().await.expect("a DELIVER");
    assert!(
        matches!(first.body, Body::Deliver { msg_id: 1, .. }),
        "{first:?}"
    );
    // Removed: its session is closing (CLOSE REMOVED), still reading answers for 2 s.
    let dir = s.config.state_dir.clone();
    let out = tokio::task::spawn_blocking(move || admin(&dir, &["remove", "meter-9"]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Enrolled again at once, with a message of its own: id 1 of the new enrollment.
    let new = s.enroll("meter-9").await;
    let q = enqueue(
        &s,
        "meter-9",
        DeliveryKind::Request,
        "for the new device",
        None,
    )
    .await
    .unwrap();
    assert_eq!(q.msg_id, 1);
    // The old session's late ACK of "its" message 1.
    let ack = raw.seal(&Body::Ack {
        msg_id: 1,
        status: Status::OK,
        payload: Bytes::from_static(b"forged answer"),
    });
    raw.tcp.write_all(&ack).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        queued_ids(&s, "meter-9").await,
        [1],
        "the new message is still queued"
    );
    // The new device gets it, and its answer is the one reported.
    let (_c, mut incoming) = s.connect(&new).await;
    let d = next_delivery(&mut incoming).await;
    assert_eq!(d.payload, "for the new device");
    d.ack(Status::OK, Bytes::from_static(b"real answer"))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), q.outcome).await {
        Ok(Ok(Outcome::Acknowledged { payload, .. })) => assert_eq!(payload, "real answer"),
        other => panic!("{other:?}"),
    }
}

/// A connected device that never acknowledges keeps its expired messages (the sweep
/// leaves a live session's queue to it): more of them than the sweep takes at once
/// must not stop another, offline device's messages from expiring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_acknowledging_devices_expired_backlog_does_not_stop_expiry_for_others() {
    let s = TestServer::start(|c| {
        c.limits.queue_max_messages = 5000;
        c.limits.deliveries_in_flight = 1;
    })
    .await;
    let stuck = s.enroll("stuck").await;
    s.enroll("asleep").await;
    let (_c, mut incoming) = s.connect(&stuck).await;
    // Its window full, never acknowledged: the rest waits, and expires unseen.
    let mut held = Vec::new();
    enqueue(&s, "stuck", DeliveryKind::Message, "0", None)
        .await
        .unwrap();
    held.push(next_delivery(&mut incoming).await);
    let ttl = Some(Duration::from_secs(1));
    for n in 0..1200 {
        enqueue(&s, "stuck", DeliveryKind::Message, &n.to_string(), ttl)
            .await
            .unwrap();
    }
    let asleep = enqueue(&s, "asleep", DeliveryKind::Message, "x", ttl)
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(10), asleep.outcome).await {
        Ok(Ok(Outcome::Expired)) => {}
        other => panic!("the offline device's message did not expire: {other:?}"),
    }
    drop(held);
}
