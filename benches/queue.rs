//! The durable queue's enqueue rate (spec 8.8; README "Queued delivery"), beside the
//! limit it is measured against in the same run: the disk's own fsync rate.
//!
//! - `queue/fsync`: one 64-byte write and `fdatasync` on a file beside the database:
//!   what one durable commit costs at least, so the rate of one message per commit;
//! - `queue/enqueue-one-at-a-time`: one message queued, its commit awaited, then the
//!   next (no group commit possible);
//! - `queue/enqueue-concurrent/N`: N senders queueing at once (a backend or many
//!   `tallyd send --queue`), for 4,000 messages in all: the writer takes whatever waits
//!   and commits it with one fsync (group commit).
//!
//! With `TALLY_BENCH_PG` set to a PostgreSQL URL (a throwaway database: the bench
//! creates its tables and identities there), the same two enqueue benches run on a
//! fleet's queue in it too (`queue-pg/...`: the node's enqueue writer takes whatever
//! waits and commits it as one transaction, as the SQLite writer does).
//!
//! Each is a throughput in messages (or fsyncs) per second. Figures and the command:
//! benches/README.md.

use std::io::Write;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tally::proto::frame::EnrollMode;
use tally::proto::{DeliveryKind, Id, SecretKey};
use tally::store::queue::sqlite::SqliteQueue;
use tally::store::queue::{now_ms, Bounds, NewMessage, Origin, Queue};
use tally::store::{Location, Store, DB_FILE};

const MESSAGES: u64 = 4000;
const IDENTITIES: usize = 100;

/// `IDENTITIES` ids enrolled in `store`.
fn enroll(store: &Store) -> Vec<Id> {
    let ids: Vec<Id> = (0..IDENTITIES)
        .map(|i| Id::new(&format!("bench-{i}")).unwrap())
        .collect();
    for id in &ids {
        store
            .insert(id, &SecretKey::from_bytes([4; 32]), EnrollMode::Open, None)
            .unwrap();
    }
    ids
}

/// A store with `IDENTITIES` enrolled ids, and its queue.
fn setup(dir: &std::path::Path) -> (Queue, Vec<Id>) {
    let path = dir.join(DB_FILE);
    let store = Store::open(&path, SecretKey::from_bytes([3; 32])).unwrap();
    let ids = enroll(&store);
    (Queue::Sqlite(SqliteQueue::open(&path).unwrap()), ids)
}

/// The same in the PostgreSQL database at `url`: a fleet's queue, as node `bench`.
fn setup_pg(url: &str) -> (Queue, Vec<Id>) {
    let key = SecretKey::from_bytes([3; 32]);
    let (store, pg) = Store::open_shared(
        &Location::Postgres(url.to_owned()),
        key.clone(),
        Default::default(),
    )
    .unwrap();
    let ids = enroll(&store);
    let fleet_key = tally::store::fleet_key::FleetKey::derive(&key);
    let pg = pg.expect("a PostgreSQL store");
    let q = tally::store::queue::postgres::PgQueue::new(pg, fleet_key, "bench".into());
    (Queue::Postgres(q), ids)
}

fn message(id: &Id, n: u64) -> NewMessage {
    NewMessage {
        id: id.clone(),
        kind: DeliveryKind::Message,
        payload: Bytes::from(format!(
            "{{\"set\":{n},\"pad\":\"0123456789abcdef0123456789abcdef\"}}"
        )),
        expires_ms: now_ms() + 3_600_000,
        origin: Origin::Control,
    }
}

const BOUNDS: Bounds = Bounds {
    max_messages: 1_000_000,
    max_bytes: 1 << 34,
};

fn queue(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("queue");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();

    // The floor: fdatasync on this file system.
    g.throughput(Throughput::Elements(1));
    let mut f = std::fs::File::create(dir.path().join("fsync")).unwrap();
    g.bench_function("fsync", |b| {
        b.iter(|| {
            f.write_all(&[7; 64]).unwrap();
            f.sync_data().unwrap();
        })
    });

    let (q, ids) = setup(dir.path());
    enqueues(&mut g, &rt, &q, &ids);
    g.finish();
    if let Ok(url) = std::env::var("TALLY_BENCH_PG") {
        let mut g = c.benchmark_group("queue-pg");
        g.sample_size(10);
        g.measurement_time(Duration::from_secs(5));
        let (q, ids) = setup_pg(&url);
        enqueues(&mut g, &rt, &q, &ids);
        g.finish();
    }
}

/// One message at a time, then 16 and 200 senders at once.
fn enqueues(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &tokio::runtime::Runtime,
    q: &Queue,
    ids: &[Id],
) {
    let mut n = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("enqueue-one-at-a-time", |b| {
        b.iter(|| {
            n += 1;
            let msg = message(&ids[n as usize % ids.len()], n);
            rt.block_on(q.enqueue(msg, BOUNDS)).unwrap().unwrap();
        })
    });

    g.throughput(Throughput::Elements(MESSAGES));
    for senders in [16usize, 200] {
        g.bench_with_input(
            BenchmarkId::new("enqueue-concurrent", senders),
            &senders,
            |b, &senders| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let start = Instant::now();
                        rt.block_on(async {
                            let tasks: Vec<_> = (0..senders)
                                .map(|s| {
                                    let (q, ids) = (q.clone(), ids.to_vec());
                                    tokio::spawn(async move {
                                        let mine = MESSAGES / senders as u64;
                                        for k in 0..mine {
                                            let id = &ids[(s + k as usize) % ids.len()];
                                            q.enqueue(message(id, k), BOUNDS)
                                                .await
                                                .unwrap()
                                                .unwrap();
                                        }
                                    })
                                })
                                .collect();
                            for t in tasks {
                                t.await.unwrap();
                            }
                        });
                        total += start.elapsed();
                    }
                    total
                })
            },
        );
    }
}

criterion_group!(benches, queue);
criterion_main!(benches);
