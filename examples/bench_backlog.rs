//! Delivery of a backlog (issue 30, item 6): DEVICES identities, MESSAGES queued for
//! each while it is offline, then every device connects at once and takes its backlog
//! (each delivery acknowledged as it arrives). Prints the time to queue, the time until
//! every message is acknowledged and recorded, the rates, and the daemon's CPU for the
//! delivery phase (the daemon runs in this process: its CPU is what this process used
//! less what the devices' half used is not separated, so the figure is an upper bound;
//! the wall time is the headline).
//!
//!     cargo run --release --features cli --example bench_backlog -- 1000 100
//!
//! The state directory is a fresh temporary one (SQLite, default limits but
//! `queue_max_messages` raised to MESSAGES).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tally::client::{self, Client, ClientOptions, Incoming};
use tally::config::ServerConfig;
use tally::proto::{DeliveryKind, Id, Status};
use tally::server::{self, ServerState};
use tally::store::queue::Origin;

/// This process's user + system CPU, from /proc/self/stat (clock ticks of 1/100 s).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name in parentheses: fields 14 and 15 are utime and stime.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    f.get(11)
        .zip(f.get(12))
        .map_or(0.0, |(u, s)| (u + s) / 100.0)
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let devices: usize = args.next().map_or(1000, |a| a.parse().unwrap());
    let messages: usize = args.next().map_or(100, |a| a.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig {
        state_dir: dir.path().to_owned(),
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    cfg.limits.queue_max_messages = messages as u32;
    cfg.limits.enrollments_per_second = 100_000;
    cfg.limits.max_enrollments_in_progress = 1000;
    cfg.limits.max_unauthenticated_per_source = 100_000;
    cfg.limits.new_connections_per_source = 1_000_000;
    cfg.limits.max_unauthenticated = 100_000;
    let (state, _) = ServerState::open(&cfg, None, Arc::new(tally::backend::Echo)).unwrap();
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(server::run(listener, state.clone(), async move {
        let _ = stopped.await;
    }));
    let token = tally::proto::credential::EnrollmentToken::parse(
        &tally::tokens::open_token_in(&state.store, state.params.static_public(), false).unwrap(),
    )
    .unwrap();
    let mut creds = Vec::with_capacity(devices);
    for chunk in (0..devices).collect::<Vec<_>>().chunks(100) {
        let mut enrolling = tokio::task::JoinSet::new();
        for &i in chunk {
            let (addr, token) = (addr.clone(), token.clone());
            enrolling.spawn(async move {
                let id = Id::new(&format!("backlog-{i}")).unwrap();
                client::enroll(
                    &addr,
                    &token,
                    id,
                    &client::ClientOptions::default().with_connect_timeout(Duration::from_secs(30)),
                )
                .await
                .unwrap()
            });
        }
        creds.extend(enrolling.join_all().await);
    }
    let d = state.deliveries.clone();
    let limits = state.limits();
    let start = Instant::now();
    let mut queueing = tokio::task::JoinSet::new();
    for c in &creds {
        let (d, state, limits, id) = (d.clone(), state.clone(), limits.clone(), c.id.clone());
        queueing.spawn(async move {
            for n in 0..messages {
                let payload = Bytes::from(format!("{{\"set\":{n},\"pad\":\"0123456789abcdef\"}}"));
                d.enqueue(
                    &state.registry,
                    &limits,
                    id.clone(),
                    DeliveryKind::Message,
                    payload,
                    None,
                    Origin::Control,
                )
                .await
                .unwrap();
            }
        });
    }
    queueing.join_all().await;
    let queue_time = start.elapsed();
    let total = devices * messages;
    println!(
        "queued {total} messages for {devices} offline devices in {:.2} s: {:.0} messages/s",
        queue_time.as_secs_f64(),
        total as f64 / queue_time.as_secs_f64()
    );
    let cpu0 = cpu_secs();
    let start = Instant::now();
    let mut taking = tokio::task::JoinSet::new();
    for c in &creds {
        let c = c.clone();
        taking.spawn(async move {
            let (client, mut incoming) =
                Client::connect(&c, ClientOptions::default()).await.unwrap();
            let mut last = 0;
            for _ in 0..messages {
                match incoming.recv().await {
                    Some(Incoming::Delivery(d)) => {
                        assert!(d.msg_id > last);
                        last = d.msg_id;
                        d.ack(Status::OK, Bytes::new()).await.unwrap();
                    }
                    other => panic!("{other:?}"),
                }
            }
            client
        });
    }
    let sessions = taking.join_all().await;
    let delivered = start.elapsed();
    // Until every acknowledgement is recorded (the queue empty).
    loop {
        if d.queue().totals().await.unwrap().messages == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recorded = start.elapsed();
    let cpu = cpu_secs() - cpu0;
    println!(
        "{devices} devices connected and took {messages} each: all acknowledged in {:.2} s, all recorded in {:.2} s: {:.0} messages/s; process CPU {:.2} s ({:.1} µs per message, devices included)",
        delivered.as_secs_f64(),
        recorded.as_secs_f64(),
        total as f64 / recorded.as_secs_f64(),
        cpu,
        cpu * 1e6 / total as f64
    );
    for c in sessions {
        let _ = c.close().await;
    }
    let _ = stop.send(());
    let _ = daemon.await;
}
