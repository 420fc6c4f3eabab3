//! Refused strangers are answered late (spec 13.10).
//!
//! An attacker who holds N connections and opens a new one whenever the daemon drops
//! one makes the daemon accept, admit and close N / (lifetime of a connection) times a
//! second: the sooner a stranger is refused, the faster the loop turns. With 10,000
//! connections refused at once, that loop ran at the daemon's full speed (25,000 a
//! second on two cores) and devices waited behind it. So a stranger the daemon drops —
//! evicted from the pool, over its source's limits, or failed before authenticating —
//! is not closed at once but parked here: no task, no read, no slot, only its socket,
//! until `limits.refusal_delay` (plus up to half of it again, at random, so that a
//! flood that arrived at once does not come back at once) has passed. Then it gets its
//! ERROR, if it has one, and is closed. The loop now turns at N / delay.
//!
//! Parked sockets are bounded by `limits.max_delayed_refusals` (the daemon fits it into
//! the open-file limit beside `max_connections`): when full, the one due first is closed
//! at once to make room, so parking never takes a descriptor a device needs. A parked
//! socket is taken out of the reactor (a stranger's drip wakes nothing) and its receive
//! buffer is shrunk to the kernel's minimum, so that 10,000 of them cannot pin a
//! gigabyte of kernel memory with unread bytes.
//!
//! Which refusals are parked: all of those before authentication, except after a valid
//! ENROLL_CONFIRM (only the device that made the key exchange can send one; its answer
//! is not delayed).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::proto::frame::ErrorFrame;
use crate::proto::ErrorCode;

/// How a parked connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Farewell {
    /// A reset, without a word (no FIN handshake, no TIME_WAIT on the daemon's side).
    Reset,
    /// This ERROR, if the socket takes it at once, then an orderly close: what the peer
    /// sent meanwhile is read and dropped first, since closing a socket with unread
    /// bytes sends a reset, which can destroy the ERROR before the peer reads it.
    Error(ErrorCode),
}

struct Parked {
    until: Instant,
    seq: u64,
    stream: TcpStream,
    farewell: Farewell,
}

impl PartialEq for Parked {
    fn eq(&self, other: &Self) -> bool {
        (self.until, self.seq) == (other.until, other.seq)
    }
}

impl Eq for Parked {}

impl PartialOrd for Parked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Parked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.until, self.seq).cmp(&(other.until, other.seq))
    }
}

struct Inner {
    /// Due first on top.
    parked: BinaryHeap<Reverse<Parked>>,
    capacity: usize,
    delay: Duration,
    seq: u64,
    /// Set at shutdown: whatever comes later is ended at once.
    closed: bool,
    /// xorshift64 state, for the jitter (not a secret: knowing it gains nothing).
    rng: u64,
}

/// The parked connections.
pub struct Tarpit {
    inner: Mutex<Inner>,
    /// Tells [`Tarpit::run`] that a socket is due sooner than it planned for.
    wake: tokio::sync::Notify,
}

impl Tarpit {
    /// An empty tarpit holding at most `capacity` sockets for `delay` (to 1.5 × `delay`).
    pub fn new(capacity: usize, delay: Duration) -> Self {
        let seed = crate::secrets::random_bytes();
        let seed = u64::from_le_bytes(seed[..8].try_into().expect("8 bytes")) | 1;
        Tarpit {
            inner: Mutex::new(Inner {
                parked: BinaryHeap::new(),
                capacity,
                delay,
                seq: 0,
                closed: false,
                rng: seed,
            }),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Ends parked sockets as they come due, until `stop`; then ends the rest.
    pub async fn run(&self, stop: tokio_util::sync::CancellationToken) {
        loop {
            let (_, next) = self.release_due(Instant::now());
            let due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = due => {}
                _ = self.wake.notified() => {}
            }
        }
        self.release_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New limits (configuration reload). Sockets over a smaller capacity are ended at
    /// once (the descriptors they free may already be counted for connections).
    pub fn set_limits(&self, capacity: usize, delay: Duration) {
        let mut inner = self.lock();
        inner.capacity = capacity;
        inner.delay = delay;
        drop(inner);
        self.wake.notify_one();
    }

    /// Sockets parked now.
    pub fn len(&self) -> usize {
        self.lock().parked.len()
    }

    /// Parks `stream` until its delay has passed, to end it with `farewell` then. When
    /// the tarpit is full, the socket due first is ended now; with no capacity or no
    /// delay, or after shutdown, `stream` itself is.
    pub fn park(&self, stream: tokio::net::TcpStream, farewell: Farewell, now: Instant) {
        // Out of the reactor: a parked socket is never polled.
        let Ok(stream) = stream.into_std() else {
            return;
        };
        let mut inner = self.lock();
        if inner.capacity == 0 || inner.delay.is_zero() || inner.closed {
            drop(inner);
            return end(stream, farewell);
        }
        let mut full = Vec::new();
        while inner.parked.len() >= inner.capacity {
            full.extend(inner.parked.pop().map(|Reverse(p)| p));
        }
        inner.rng ^= inner.rng << 13;
        inner.rng ^= inner.rng >> 7;
        inner.rng ^= inner.rng << 17;
        // Uniform in [delay, 1.5 × delay), to the microsecond.
        let spread = (inner.delay.as_micros() as u64 / 2).max(1);
        let until = now + inner.delay + Duration::from_micros(inner.rng % spread);
        inner.seq += 1;
        let seq = inner.seq;
        let sooner = inner.parked.peek().is_none_or(|Reverse(p)| until < p.until);
        // The window it advertises from now on: the kernel's minimum.
        let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&stream, 1);
        inner.parked.push(Reverse(Parked {
            until,
            seq,
            stream,
            farewell,
        }));
        drop(inner);
        if sooner {
            self.wake.notify_one();
        }
        for p in full {
            end(p.stream, p.farewell);
        }
    }

    /// Ends every socket due at `now`; returns how many, and when the next is due.
    pub fn release_due(&self, now: Instant) -> (usize, Option<Instant>) {
        let mut due = Vec::new();
        let next = {
            let mut inner = self.lock();
            while inner.parked.peek().is_some_and(|Reverse(p)| p.until <= now) {
                due.push(inner.parked.pop().expect("peeked").0);
            }
            // Over a lowered capacity: the due-first go now.
            while inner.parked.len() > inner.capacity {
                due.push(inner.parked.pop().expect("longer than capacity").0);
            }
            inner.parked.peek().map(|Reverse(p)| p.until)
        };
        let n = due.len();
        for p in due {
            end(p.stream, p.farewell);
        }
        (n, next)
    }

    /// Ends every parked socket now, and any parked later at once (shutdown).
    pub fn release_all(&self) {
        let parked = {
            let mut inner = self.lock();
            inner.closed = true;
            std::mem::take(&mut inner.parked)
        };
        for Reverse(p) in parked {
            end(p.stream, p.farewell);
        }
    }
}

fn end(stream: TcpStream, farewell: Farewell) {
    match farewell {
        Farewell::Reset => {
            let _ = rustix::net::sockopt::set_socket_linger(&stream, Some(Duration::ZERO));
        }
        Farewell::Error(code) => {
            // The socket is non-blocking (it came from tokio): read what is there, at most
            // what a minimal receive buffer holds and then some.
            let mut sink = [0u8; 4096];
            for _ in 0..16 {
                match rustix::io::read(&stream, &mut sink) {
                    Ok(n) if n > 0 => continue,
                    _ => break,
                }
            }
            let mut out = BytesMut::new();
            ErrorFrame::new(code).encode(&mut out);
            // MSG_NOSIGNAL: a peer that reset must not raise SIGPIPE in a host process
            // that did not ignore it. A peer whose window is closed gets no ERROR.
            let _ = rustix::net::send(&stream, &out, rustix::net::SendFlags::NOSIGNAL);
            let _ = stream.shutdown(Shutdown::Write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// A connected pair: (the daemon's side, the peer's side, blocking).
    fn pair() -> (tokio::net::TcpStream, std::net::TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (ours(&l), peer)
    }

    fn ours(l: &TcpListener) -> tokio::net::TcpStream {
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        tokio::net::TcpStream::from_std(s).unwrap()
    }

    /// What the peer reads until the connection ends, and how it ends.
    fn outcome(mut peer: std::net::TcpStream) -> (Vec<u8>, std::io::ErrorKind) {
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match peer.read(&mut buf) {
                Ok(0) => return (got, std::io::ErrorKind::UnexpectedEof),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => return (got, e.kind()),
            }
        }
    }

    fn still_open(peer: &std::net::TcpStream) -> bool {
        peer.set_nonblocking(true).unwrap();
        let open = matches!(
            (&*peer).read(&mut [0u8; 1]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        );
        peer.set_nonblocking(false).unwrap();
        open
    }

    #[tokio::test]
    async fn parked_sockets_end_when_due_with_their_farewell() {
        let pit = Tarpit::new(10, Duration::from_secs(2));
        let t = Instant::now();
        let (a, pa) = pair();
        let (b, pb) = pair();
        pit.park(a, Farewell::Reset, t);
        pit.park(b, Farewell::Error(ErrorCode::MALFORMED), t);
        let (n, next) = pit.release_due(t + Duration::from_millis(1999));
        assert_eq!(n, 0, "nothing is due before the delay");
        let next = next.unwrap();
        assert!(next >= t + Duration::from_secs(2) && next < t + Duration::from_secs(3));
        assert!(still_open(&pa) && still_open(&pb));
        assert_eq!(pit.release_due(t + Duration::from_secs(3)).0, 2);
        assert_eq!(pit.len(), 0);
        assert_eq!(
            outcome(pa),
            (vec![], std::io::ErrorKind::ConnectionReset),
            "a reset, without a word"
        );
        let mut error = BytesMut::new();
        ErrorFrame::new(ErrorCode::MALFORMED).encode(&mut error);
        assert_eq!(
            outcome(pb),
            (error.to_vec(), std::io::ErrorKind::UnexpectedEof),
            "the ERROR, then an orderly close"
        );
    }

    #[tokio::test]
    async fn the_error_survives_bytes_the_peer_sent_meanwhile() {
        use std::io::Write;
        let pit = Tarpit::new(10, Duration::from_secs(1));
        let t = Instant::now();
        let (a, mut pa) = pair();
        pa.write_all(&[0x55; 3000]).unwrap();
        pit.park(a, Farewell::Error(ErrorCode::TIMEOUT), t);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pit.release_due(t + Duration::from_secs(2)).0, 1);
        let mut error = BytesMut::new();
        ErrorFrame::new(ErrorCode::TIMEOUT).encode(&mut error);
        assert_eq!(
            outcome(pa),
            (error.to_vec(), std::io::ErrorKind::UnexpectedEof),
            "unread bytes would have turned the close into a reset"
        );
    }

    #[tokio::test]
    async fn after_shutdown_and_over_a_lowered_capacity_sockets_end_at_once() {
        let pit = Tarpit::new(3, Duration::from_secs(5));
        let t = Instant::now();
        let (a, pa) = pair();
        let (b, pb) = pair();
        let (c, pc) = pair();
        pit.park(a, Farewell::Reset, t);
        pit.park(b, Farewell::Reset, t + Duration::from_secs(3));
        // Lowered to one: the next park makes room for itself and for the new limit.
        pit.set_limits(1, Duration::from_secs(5));
        pit.park(c, Farewell::Reset, t + Duration::from_secs(6));
        assert_eq!(pit.len(), 1);
        assert_eq!(outcome(pa).1, std::io::ErrorKind::ConnectionReset);
        assert_eq!(outcome(pb).1, std::io::ErrorKind::ConnectionReset);
        pit.release_all();
        assert_eq!(outcome(pc).1, std::io::ErrorKind::ConnectionReset);
        let (d, pd) = pair();
        pit.park(d, Farewell::Reset, t);
        assert_eq!(pit.len(), 0, "after shutdown, nothing is parked");
        assert_eq!(outcome(pd).1, std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_full_tarpit_ends_the_socket_due_first() {
        let pit = Tarpit::new(2, Duration::from_secs(2));
        let t = Instant::now();
        let (a, pa) = pair();
        let (b, pb) = pair();
        let (c, pc) = pair();
        pit.park(a, Farewell::Reset, t);
        // Later by more than the jitter: due after a.
        pit.park(b, Farewell::Reset, t + Duration::from_secs(1));
        pit.park(c, Farewell::Reset, t + Duration::from_secs(2));
        assert_eq!(pit.len(), 2);
        assert_eq!(outcome(pa).1, std::io::ErrorKind::ConnectionReset);
        assert!(still_open(&pb) && still_open(&pc));
        // A lowered capacity is applied at the next release.
        pit.set_limits(1, Duration::from_secs(2));
        assert_eq!(pit.release_due(t).0, 1);
        assert_eq!(outcome(pb).1, std::io::ErrorKind::ConnectionReset);
        assert!(still_open(&pc));
        pit.release_all();
        assert_eq!(outcome(pc).1, std::io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn without_a_delay_or_a_capacity_sockets_end_at_once() {
        for (capacity, delay) in [(0, Duration::from_secs(1)), (5, Duration::ZERO)] {
            let pit = Tarpit::new(capacity, delay);
            let (a, pa) = pair();
            pit.park(a, Farewell::Reset, Instant::now());
            assert_eq!(pit.len(), 0);
            assert_eq!(outcome(pa).1, std::io::ErrorKind::ConnectionReset);
        }
    }

    #[tokio::test]
    async fn the_delay_is_spread_over_half_of_it_again() {
        let pit = Tarpit::new(1000, Duration::from_secs(2));
        let t = Instant::now();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peers = Vec::new();
        for _ in 0..200 {
            peers.push(std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap());
            pit.park(ours(&l), Farewell::Reset, t);
        }
        let due: Vec<Instant> = pit.lock().parked.iter().map(|Reverse(p)| p.until).collect();
        assert!(due
            .iter()
            .all(|&u| u >= t + Duration::from_secs(2) && u < t + Duration::from_secs(3)));
        let early = due
            .iter()
            .filter(|&&u| u < t + Duration::from_millis(2500))
            .count();
        assert!(
            (60..=140).contains(&early),
            "{early} of 200 in the first half"
        );
        pit.release_all();
    }
}
