//! Does the server's work for a HELLO tell an enrolled id from an unknown or revoked
//! one? (Spec 7.5; security issue item 8.) Measured two ways, each case side by side in
//! the same run (see benches/README.md for the figures):
//!
//! - `store_key/{known,unknown,revoked}`: `Store::key` from SQLite (admin commands), and
//!   `store_key/indexed_{known,unknown,revoked}`: `Store::cached_key`, the in-memory
//!   lookup a HELLO triggers in the daemon, on a store of 1,000 identities;
//! - `hello`: the time from writing a SEALED_HELLO to having read the whole SEALED_AUTH, over
//!   loopback against an in-process daemon, the three cases alternating sample by sample
//!   (10,000 samples each; `ORACLE_SAMPLES` to change), p10/p50/p90 printed. A fresh
//!   connection per sample, opened outside the timed part and closed with RST so that
//!   no TIME_WAIT piles up.
//!
//! An unknown or revoked id must cost what a known one does: the same statement, which
//! always yields one row (the identity's or the decoy's), or one map lookup, and one
//! AEAD unseal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{criterion_group, Criterion};
use tally::backend::Echo;
use tally::client;
use tally::config::ServerConfig;
use tally::proto::credential::EnrollmentToken;
use tally::proto::frame::EnrollMode;
use tally::proto::handshake::ClientAwaitAuth;
use tally::proto::{Id, SecretKey};
use tally::server::{self, ServerState};
use tally::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CASES: [(&str, &str); 3] = [
    ("known", "device-0500"),
    ("unknown", "device-never-enrolled"),
    ("revoked", "device-revoked"),
];

fn store_key(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("tally.db"), SecretKey::from_bytes([3; 32])).unwrap();
    for i in 0..1000 {
        let id = Id::new(&format!("device-{i:04}")).unwrap();
        store
            .insert(
                &id,
                &SecretKey::from_bytes([i as u8; 32]),
                EnrollMode::Open,
                None,
            )
            .unwrap();
    }
    let revoked = Id::new("device-revoked").unwrap();
    store
        .insert(
            &revoked,
            &SecretKey::from_bytes([9; 32]),
            EnrollMode::Open,
            None,
        )
        .unwrap();
    assert!(store.revoke("device-revoked").unwrap());

    let mut g = c.benchmark_group("store_key");
    for (case, id) in CASES {
        let id = Id::new(id).unwrap();
        assert_eq!(store.key(&id).unwrap().is_some(), case == "known");
        g.bench_function(case, |b| b.iter(|| store.key(&id).unwrap()));
    }
    store.load_key_index().unwrap();
    for (case, id) in CASES {
        let id = Id::new(id).unwrap();
        let found = store.cached_key(&id).expect("index loaded").unwrap();
        assert_eq!(found.is_some(), case == "known");
        g.bench_function(format!("indexed_{case}"), |b| {
            b.iter(|| store.cached_key(&id).unwrap().unwrap())
        });
    }
    g.finish();
}

fn hello() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig {
        state_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    // One source opens thousands of connections per second here: lift the per-source
    // admission limits, which are not what is measured.
    cfg.limits.max_unauthenticated = 1024;
    let (state, _) = ServerState::open(&cfg, None, Arc::new(Echo)).unwrap();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(server::run(listener, state.clone(), std::future::pending()));
        addr
    });
    // On the store: this in-process daemon holds the state directory but serves no
    // control socket for `admin::open_token` to ask.
    let open = tally::tokens::open_token_in(&state.store, state.params.static_public(), false);
    let token = EnrollmentToken::parse(&open.unwrap()).unwrap();
    let enroll = |id: &str| {
        rt.block_on(client::enroll(
            &addr.to_string(),
            &token,
            Id::new(id).unwrap(),
            &client::ClientOptions::default().with_connect_timeout(Duration::from_secs(5)),
        ))
        .unwrap()
    };
    let known = enroll("device-0500");
    enroll("device-revoked");
    assert!(state.store.revoke("device-revoked").unwrap());

    let cases: Vec<(&str, Id, SecretKey)> = CASES
        .iter()
        .map(|&(case, id)| {
            // The client's key does not matter: the server answers SERVER_AUTH before it
            // could tell (spec 7.3). The known case uses the right one anyway.
            let key = if case == "known" {
                known.key.clone()
            } else {
                SecretKey::from_bytes([1; 32])
            };
            (case, Id::new(id).unwrap(), key)
        })
        .collect();
    // The cases alternate sample by sample, so that drift on a shared machine (other
    // load, caches, TIME_WAIT) falls on all three alike; each gets the same samples.
    let samples = if std::env::args().any(|a| a == "--bench") {
        std::env::var("ORACLE_SAMPLES").map_or(10_000, |s| s.parse().unwrap())
    } else {
        20 // criterion's test mode (`cargo test`): check that it works
    };
    let mut times: Vec<Vec<Duration>> = vec![Vec::with_capacity(samples); cases.len()];
    rt.block_on(async {
        let mut buf = [0u8; 256];
        for i in 0..samples {
            for (n, (case, id, key)) in cases.iter().enumerate() {
                let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                tcp.set_zero_linger().unwrap();
                let mut out = BytesMut::new();
                let mut nc = [0u8; 32];
                nc[..8].copy_from_slice(&(i as u64).to_le_bytes());
                nc[8] = n as u8;
                // The default mode: SEALED_HELLO (the id sealed to the server's key).
                let _wait = ClientAwaitAuth::start_sealed(
                    id,
                    key.clone(),
                    state.server_key.public(),
                    &mut nc,
                    65536,
                    &mut out,
                )
                .unwrap();
                let start = Instant::now();
                tcp.write_all(&out).await.unwrap();
                tcp.read_exact(&mut buf[..4]).await.unwrap();
                let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                tcp.read_exact(&mut buf[4..4 + len]).await.unwrap();
                times[n].push(start.elapsed());
                // SEALED_AUTH, not ERROR, whatever the id (spec 7.5).
                assert_eq!(
                    (len, buf[4]),
                    (tally::proto::frame::ServerAuth::LEN, 0x14),
                    "{case}: not a SEALED_AUTH"
                );
            }
        }
    });
    let pct = |t: &mut Vec<Duration>, p: usize| {
        t.sort_unstable();
        t[(t.len() - 1) * p / 100].as_secs_f64() * 1e6
    };
    println!("hello: SEALED_HELLO written -> SEALED_AUTH read, loopback, {samples} samples per case, interleaved");
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>12}",
        "case", "p10 µs", "p50 µs", "p90 µs", "p50 - known"
    );
    let known_p50 = pct(&mut times[0], 50);
    for ((case, _, _), t) in cases.iter().zip(times.iter_mut()) {
        let (p10, p50, p90) = (pct(t, 10), pct(t, 50), pct(t, 90));
        println!(
            "{case:<8} {p10:>9.2} {p50:>9.2} {p90:>9.2} {:>+12.2}",
            p50 - known_p50
        );
    }
}

criterion_group!(benches, store_key);

fn main() {
    benches();
    // `hello` is not a criterion benchmark (criterion cannot interleave cases); it runs
    // unless a filter that does not name it was given.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if filters.is_empty() || filters.iter().any(|f| "hello".contains(f.as_str())) {
        hello();
    }
    Criterion::default().configure_from_args().final_summary();
}
