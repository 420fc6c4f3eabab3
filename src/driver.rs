//! The one async driver of an established session, for both ends.
//!
//! [`run`] moves bytes and instants between a TCP connection and a
//! [`proto::connection::Connection`](crate::proto::connection::Connection), which holds
//! every rule of spec section 8. What differs between the server and the client — where
//! requests come from and where their answers go — is a [`Role`]. The loop reads and
//! writes at the same time (a peer pushing as hard as this side never stalls both), and
//! every write is bounded: a send backlog that has not drained within `write_stall` ends
//! the session, and (for the server) while the backlog is over two frames' worth the
//! driver stops reading (a peer that sends PINGs and reads nothing cannot grow its
//! memory; the other end always reads, so this cannot stall both).

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::Instant;

use crate::proto::connection::{Config, Connection, End, Event};
use crate::proto::Session;

/// What one end does with the session: the application side of the driver.
pub(crate) trait Role: Send {
    /// Work from the application (commands, answers ready to send).
    type Work: Send;

    /// Waits for the next piece of work. Must be cancel-safe (it is raced against the
    /// socket); a role with nothing more to give returns a future that never completes.
    fn work(&mut self) -> impl Future<Output = Self::Work> + Send;

    /// Applies `work` to the session (sends a request, a response, closes...).
    fn apply(&mut self, work: Self::Work, conn: &mut Connection, now: Duration);

    /// Handles what the session reports (the last event is always [`Event::Closed`]).
    fn event(&mut self, event: Event, conn: &mut Connection, now: Duration);

    /// Whether to read now; `false` holds the peer back (TCP flow control).
    fn may_read(&self, _conn: &Connection) -> bool {
        true
    }

    /// Called after every input the session handled (bytes, a deadline, work): for
    /// counters that follow the session (frames in and out).
    fn after(&mut self, _conn: &Connection) {}

    /// Whether to stop reading while the send backlog is over two frames' worth (a peer
    /// that sends PINGs or requests and reads nothing cannot grow this side's memory).
    /// Not for a side whose backlog is mostly its own requests: if both ends stopped
    /// reading while each has a backlog, neither would ever drain.
    const HOLD_WHEN_BACKLOGGED: bool = true;
}

/// How a driven session ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// As the session reports it (the client keeps its own, finer account in its role).
    Ended(#[cfg_attr(not(feature = "server"), allow(dead_code))] End),
    /// The socket failed (other than by the peer cutting it, which is truncation), or
    /// the peer read nothing for `write_stall`.
    Io(io::Error),
}

/// Drives `session` over the connection until it ends. `leftover` holds bytes read with
/// the handshake's last frame that belong to the session.
pub(crate) async fn run<R: Role>(
    session: Session,
    config: Config,
    (mut rd, mut wr): (OwnedReadHalf, OwnedWriteHalf),
    leftover: BytesMut,
    role: &mut R,
    write_stall: Duration,
) -> Outcome {
    let origin = Instant::now();
    // The clock is read once per wake-up (after the select), not per use.
    let mut t = origin;
    let mut conn = Connection::new(session, config, Duration::ZERO);
    if !leftover.is_empty() {
        conn.handle_input(&leftover, Duration::ZERO);
    }
    drop(leftover);
    // Swapped with the session's send buffer: two allocations for the whole session.
    let mut out = BytesMut::new();
    let mut read_open = true;
    // Since when the send backlog has been non-empty.
    let mut backlog_since = origin;
    // Room for two of the largest frames either side may send.
    let largest = config.max_frame_len.max(conn.session().max_frame_len()) as usize;
    let backlog_cap = 2 * largest + 64 * 1024;
    let mut ended: Option<End> = None;
    // Two timers made once and moved only when they must fire sooner: making or moving
    // a timer on every loop iteration (every frame) costs a timer-wheel update each.
    // When one fires early (its deadline moved later meanwhile), the session ignores it
    // and it is armed again for the new deadline.
    let far = origin + Duration::from_secs(86_400 * 365);
    let timer = tokio::time::sleep_until(far);
    let stall = tokio::time::sleep_until(far);
    tokio::pin!(timer, stall);
    let mut timer_at: Option<Instant> = None;
    let mut stall_at: Option<Instant> = None;
    loop {
        let now = t - origin;
        while let Some(event) = conn.poll_event() {
            if let Event::Closed(end) = &event {
                ended = Some(end.clone());
            }
            role.event(event, &mut conn, now);
        }
        if out.is_empty() {
            if conn.transmit_into(&mut out) {
                // Read now: writes do not refresh `t`, and a backlog that follows a
                // written one is measured from when it was handed over.
                backlog_since = Instant::now();
            } else if let Some(end) = ended.take() {
                finish(&mut rd, &mut wr, read_open).await;
                return Outcome::Ended(end);
            }
        }
        // Write at once what the socket takes (no wake-up and no select round for the
        // common case: the answer fits in the socket's buffer).
        // Once all is written, back to the top: more may be due, or the session over.
        if !out.is_empty() {
            match wr.try_write(&out) {
                Ok(n) => {
                    out.advance(n);
                    if out.is_empty() {
                        // What was sealed on the way (answers ready at once) is counted.
                        role.after(&conn);
                        continue;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if crate::wire::is_cut(&e) => {
                    out.clear();
                    conn.handle_eof(t - origin);
                    continue;
                }
                Err(e) => return io_end(e, ended),
            }
        }
        let writing = !out.is_empty();
        let held = !role.may_read(&conn);
        let reading = read_open
            && !conn.is_closed()
            && !held
            && (!R::HOLD_WHEN_BACKLOGGED || out.len() + conn.pending_transmit() < backlog_cap);
        if let Some(at) = conn.poll_timeout().map(|t| origin + t) {
            if timer_at.is_none_or(|armed| at < armed) {
                timer.as_mut().reset(at);
                timer_at = Some(at);
            }
        }
        if writing && stall_at.is_none() {
            let at = backlog_since + write_stall;
            stall.as_mut().reset(at);
            stall_at = Some(at);
        }
        let woke = tokio::select! {
            r = wr.write(&out), if writing => match r {
                Ok(n) => {
                    out.advance(n);
                    continue;
                }
                Err(e) if crate::wire::is_cut(&e) => {
                    out.clear();
                    Woke::Eof
                }
                Err(e) => return io_end(e, ended),
            },
            // Straight into the session's buffer, given room only once the socket is
            // readable: an idle session holds no read buffer.
            r = read_some(&mut rd, conn.input_buffer()), if reading => match r {
                Ok(0) => {
                    read_open = false;
                    Woke::Eof
                }
                Ok(n) => Woke::Read(n),
                Err(e) if crate::wire::is_cut(&e) => {
                    read_open = false;
                    Woke::Eof
                }
                Err(e) => return io_end(e, ended),
            },
            work = role.work(), if !conn.is_closed() => Woke::Work(work),
            _ = &mut timer, if timer_at.is_some() => {
                timer_at = None;
                Woke::Timer
            }
            _ = &mut stall, if writing && stall_at.is_some() => {
                stall_at = None;
                Woke::Stall
            }
        };
        t = Instant::now();
        let now = t - origin;
        match woke {
            Woke::Eof => conn.handle_eof(now),
            Woke::Read(n) => conn.handle_read(n, now),
            Woke::Work(work) => role.apply(work, &mut conn, now),
            Woke::Timer => {
                // Time this side held the peer back is not the peer's silence.
                if held {
                    conn.hold_idle(now);
                }
                conn.handle_timeout(now);
                // Quiet for a keepalive interval or more: give the buffers back (a
                // session that goes idle costs what a new one does).
                if out.is_empty() {
                    out = BytesMut::new();
                    conn.release_buffers();
                }
            }
            Woke::Stall => {
                if !out.is_empty() && t - backlog_since >= write_stall {
                    let e = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the peer did not take what was sent within {write_stall:?}"),
                    );
                    return io_end(e, ended);
                }
            }
        }
        role.after(&conn);
    }
}

/// Room made in the read buffer when it has less than half of this spare: several
/// frames of a busy session per read (one `recv` per burst), and no more than a read
/// into a fresh buffer needs.
const READ_CHUNK: usize = 4096;

/// Reads what arrived into `buf`, making room in it only once the socket is readable.
/// Cancel-safe (nothing is read unless it completes).
async fn read_some(rd: &mut OwnedReadHalf, buf: &mut BytesMut) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        std::task::ready!(rd.as_ref().poll_read_ready(cx))?;
        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
            buf.reserve(READ_CHUNK);
        }
        let read = rd.read_buf(buf);
        tokio::pin!(read);
        read.poll(cx)
    })
    .await
}

/// The socket failed: the session's own end if it had one already (the failure was
/// only in delivering its last bytes).
fn io_end(e: io::Error, ended: Option<End>) -> Outcome {
    match ended {
        Some(end) => Outcome::Ended(end),
        None => Outcome::Io(e),
    }
}

/// What woke the driver.
enum Woke<W> {
    Read(usize),
    Eof,
    Work(W),
    Timer,
    Stall,
}

/// After the session: FIN, then read (and drop) until the peer closes or 2 s pass, so
/// that unread bytes do not turn the close into a reset that destroys the last CLOSE.
async fn finish(rd: &mut OwnedReadHalf, wr: &mut OwnedWriteHalf, read_open: bool) {
    let _ = wr.shutdown().await;
    if !read_open {
        return;
    }
    // On the heap: an array here would sit in every session's future for its whole life.
    let mut sink = vec![0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::session::tests::pair as sessions;
    use crate::proto::Body;
    use tokio::net::{TcpListener, TcpStream};

    /// A role with no work of its own, that never holds the peer back.
    struct Quiet;

    impl Role for Quiet {
        type Work = ();
        async fn work(&mut self) {
            std::future::pending().await
        }
        fn apply(&mut self, _: (), _: &mut Connection, _: Duration) {}
        fn event(&mut self, _: Event, _: &mut Connection, _: Duration) {}
    }

    /// A connected pair with 64 KiB socket buffers on both ends (autotuning off), so that
    /// what piles up is the driver's, not the kernel's. (Much smaller buffers make the
    /// kernel's own windows stall on loopback.)
    async fn small_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        for s in [&a, &b] {
            rustix::net::sockopt::set_socket_recv_buffer_size(s, 65536).unwrap();
            rustix::net::sockopt::set_socket_send_buffer_size(s, 65536).unwrap();
        }
        (a, b)
    }

    /// Review of issue 12: the driver reads while it writes; a peer that sends PINGs and
    /// reads nothing made it answer into a send buffer that grew without bound. Now it
    /// stops reading once the backlog passes two frames' worth, so the peer's writes
    /// block after a bounded amount (before the fix: all 4 MB went through).
    #[tokio::test]
    async fn a_peer_that_never_reads_cannot_grow_the_send_backlog() {
        let (mut client, server) = sessions();
        let (mine, mut peer) = small_pair().await;
        let config = Config::server(); // 64 KiB frames: backlog cap 192 KiB
        let driver = tokio::spawn(async move {
            run(
                server,
                config,
                mine.into_split(),
                BytesMut::new(),
                &mut Quiet,
                Duration::from_secs(30),
            )
            .await
        });
        let mut written = 0usize;
        let blocked = loop {
            let mut batch = BytesMut::new();
            for _ in 0..500 {
                client.seal(&Body::Ping, &mut batch).unwrap();
            }
            match tokio::time::timeout(Duration::from_secs(2), peer.write_all(&batch)).await {
                Ok(Ok(())) => written += batch.len(),
                Ok(Err(e)) => panic!("the driver gave up instead of holding back: {e}"),
                Err(_) => break true,
            }
            if written > 4 << 20 {
                break false;
            }
        };
        assert!(
            blocked,
            "{written} bytes of PINGs taken without reading a PONG"
        );
        assert!(
            written < 1 << 20,
            "{written} bytes before the driver stopped reading"
        );
        assert!(!driver.is_finished(), "the session is held, not ended");
        driver.abort();
    }
}
