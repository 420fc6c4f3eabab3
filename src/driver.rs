//! The one async driver of an established session, for both ends.
//!
//! [`run`] moves bytes and instants between a TCP connection and a
//! [`proto::connection::Connection`](crate::proto::connection::Connection), which holds
//! every rule of spec section 8. What differs between the server and the client — where
//! requests come from and where their answers go — is a [`Role`]. The loop reads and
//! writes at the same time (a peer pushing as hard as this side never stalls both), and
//! every write is bounded: a peer that reads nothing for `write_stall` ends the session.

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::{Buf, Bytes};
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
}

/// How a driven session ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// As the session reports it.
    Ended(End),
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
    leftover: &[u8],
    role: &mut R,
    write_stall: Duration,
) -> Outcome {
    let origin = Instant::now();
    let now = || origin.elapsed();
    let mut conn = Connection::new(session, config, Duration::ZERO);
    conn.handle_input(leftover, now());
    let mut out = Bytes::new();
    let mut read_open = true;
    let mut last_progress = Instant::now();
    let mut ended: Option<End> = None;
    loop {
        while let Some(event) = conn.poll_event() {
            if let Event::Closed(end) = &event {
                ended = Some(end.clone());
            }
            role.event(event, &mut conn, now());
        }
        if out.is_empty() {
            if let Some(bytes) = conn.poll_transmit() {
                out = bytes;
                last_progress = Instant::now();
            }
        }
        if out.is_empty() {
            if let Some(end) = ended.take() {
                finish(&mut rd, &mut wr, read_open).await;
                return Outcome::Ended(end);
            }
        }
        let writing = !out.is_empty();
        let reading = read_open && !conn.is_closed() && role.may_read(&conn);
        let timer = conn.poll_timeout().map(|t| origin + t);
        tokio::select! {
            r = wr.write(&out), if writing => match r {
                Ok(n) => {
                    out.advance(n);
                    last_progress = Instant::now();
                }
                Err(e) if crate::wire::is_cut(&e) => {
                    out.clear();
                    conn.handle_eof(now());
                }
                Err(e) => return Outcome::Io(e),
            },
            // Straight into the session's buffer: an idle session holds no read buffer
            // beyond it (256 bytes to start).
            r = rd.read_buf(conn.input_buffer()), if reading => match r {
                Ok(0) => {
                    read_open = false;
                    conn.handle_eof(now());
                }
                Ok(n) => conn.handle_read(n, now()),
                Err(e) if crate::wire::is_cut(&e) => {
                    read_open = false;
                    conn.handle_eof(now());
                }
                Err(e) => return Outcome::Io(e),
            },
            work = role.work(), if !conn.is_closed() => role.apply(work, &mut conn, now()),
            _ = sleep_until(timer) => conn.handle_timeout(now()),
            _ = tokio::time::sleep_until(last_progress + write_stall), if writing => {
                return Outcome::Io(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the peer read nothing for {write_stall:?}"),
                ));
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// After the session: FIN, then read (and drop) until the peer closes or 2 s pass, so
/// that unread bytes do not turn the close into a reset that destroys the last CLOSE.
async fn finish(rd: &mut OwnedReadHalf, wr: &mut OwnedWriteHalf, read_open: bool) {
    let _ = wr.shutdown().await;
    if !read_open {
        return;
    }
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
