//! Lying length prefixes cost the daemon nothing: its peak heap stays flat while frames
//! that announce up to 4 GiB arrive before and after the handshake (spec 3.2, P8).
//! A counting allocator measures the in-process daemon; this file holds a single test so
//! that nothing else allocates in the meantime.

mod attack;
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use attack::{read_to_eof, RawSession};
use common::TestServer;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new > l.size() {
                let now = CURRENT.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                CURRENT.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lying_lengths_do_not_allocate() {
    // Refusals at once: 30 of them are awaited one after the other.
    let srv = TestServer::start(|c| c.limits.refusal_delay = Duration::ZERO).await;
    let cred = srv.enroll("liar").await;
    let (c, _) = srv.connect(&srv.enroll("bystander").await).await;
    // Warm up every path once, so first-use allocations are not counted.
    RawSession::open(srv.addr, &cred).await;
    c.request("warm").await.unwrap();
    let mut warm = TcpStream::connect(srv.addr).await.unwrap();
    warm.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    read_to_eof(&mut warm, 5).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let base = CURRENT.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let lies: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff, 0xff],
        &[0x00, 0xff, 0xff, 0xff],
        &[0x7f, 0, 0, 0],
    ];
    for lie in lies {
        for _ in 0..10 {
            let mut raw = TcpStream::connect(srv.addr).await.unwrap();
            raw.write_all(lie).await.unwrap();
            assert_eq!(read_to_eof(&mut raw, 5).await, [0, 0, 0, 4, 0x1f, 0, 2, 1]);
            let mut s = RawSession::open(srv.addr, &cred).await;
            s.tcp.write_all(lie).await.unwrap();
            assert!(matches!(
                s.recv().await.unwrap().body,
                tally::proto::Body::Close { .. }
            ));
        }
    }
    let grew = PEAK.load(Ordering::SeqCst) - base;
    // 60 connections' ordinary buffers and tasks; a single honoured lie would be >= 16 MiB.
    assert!(grew < 4 << 20, "peak heap grew by {grew} bytes");
    eprintln!("peak heap growth during 60 lying frames: {grew} bytes");
    c.request("still fine").await.unwrap();
}
