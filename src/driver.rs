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
    // The clock is read once per wake-up (after the select), not per use.
    let mut t = origin;
    let mut conn = Connection::new(session, config, Duration::ZERO);
    conn.handle_input(leftover, Duration::ZERO);
    // Swapped with the session's send buffer: two allocations for the whole session.
    let mut out = BytesMut::new();
    let mut read_open = true;
    let mut last_progress = origin;
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
        if out.is_empty() && conn.transmit_into(&mut out) {
            last_progress = t;
        }
        if out.is_empty() {
            if let Some(end) = ended.take() {
                finish(&mut rd, &mut wr, read_open).await;
                return Outcome::Ended(end);
            }
        }
        let writing = !out.is_empty();
        let reading = read_open && !conn.is_closed() && role.may_read(&conn);
        if let Some(at) = conn.poll_timeout().map(|t| origin + t) {
            if timer_at.is_none_or(|armed| at < armed) {
                timer.as_mut().reset(at);
                timer_at = Some(at);
            }
        }
        if writing && stall_at.is_none() {
            let at = last_progress + write_stall;
            stall.as_mut().reset(at);
            stall_at = Some(at);
        }
        let woke = tokio::select! {
            r = wr.write(&out), if writing => match r {
                Ok(n) => {
                    t = Instant::now();
                    out.advance(n);
                    last_progress = t;
                    continue;
                }
                Err(e) if crate::wire::is_cut(&e) => {
                    out.clear();
                    Woke::Eof
                }
                Err(e) => return Outcome::Io(e),
            },
            // Straight into the session's buffer: an idle session holds no read buffer
            // beyond it (256 bytes to start).
            r = rd.read_buf(conn.input_buffer()), if reading => match r {
                Ok(0) => {
                    read_open = false;
                    Woke::Eof
                }
                Ok(n) => Woke::Read(n),
                Err(e) if crate::wire::is_cut(&e) => {
                    read_open = false;
                    Woke::Eof
                }
                Err(e) => return Outcome::Io(e),
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
            Woke::Timer => conn.handle_timeout(now),
            Woke::Stall => {
                if t - last_progress >= write_stall {
                    return Outcome::Io(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the peer read nothing for {write_stall:?}"),
                    ));
                }
            }
        }
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
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while matches!(rd.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}
