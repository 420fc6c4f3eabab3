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
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{Instant, Sleep};

use crate::proto::connection::{Config, Connection, End, Event};
use crate::proto::Session;

/// What one end does with the session: the application side of the driver.
pub(crate) trait Role: Send {
    /// Work from the application (commands, answers ready to send).
    type Work: Send;

    /// Polls for the next piece of work, registering `cx`'s waker when there is none. A
    /// role with nothing more to give returns `Pending` (the socket and the timer are
    /// polled beside it).
    fn poll_work(&mut self, cx: &mut Context<'_>) -> Poll<Self::Work>;

    /// Applies `work` to the session (sends a request, a response, closes...).
    fn apply(&mut self, work: Self::Work, conn: &mut Connection, now: Duration);

    /// Handles what the session reports (the last event is always [`Event::Closed`]).
    fn event(&mut self, event: Event, conn: &mut Connection, now: Duration);

    /// Whether to read now; `false` holds the peer back (TCP flow control).
    fn may_read(&self, _conn: &Connection) -> bool {
        true
    }

    /// Called after every input the session handled (bytes, a deadline, work) and every
    /// backlog written out: for counters that follow the session (frames in and out).
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
#[cfg_attr(not(feature = "server"), allow(dead_code))]
pub(crate) fn run<R: Role>(
    session: Session,
    config: Config,
    (rd, wr): (OwnedReadHalf, OwnedWriteHalf),
    leftover: BytesMut,
    role: &mut R,
    write_stall: Duration,
) -> Driver<'_, R> {
    let mut conn = Connection::new(session, config, Duration::ZERO);
    if !leftover.is_empty() {
        conn.handle_input(&leftover, Duration::ZERO);
    }
    run_connection(conn, Instant::now(), (rd, wr), role, write_stall)
}

/// Drives a session already under way (a device's, after its handshake: spec 7 and the
/// session's first frames ran in [`crate::proto::device::Device`]) until it ends. Its
/// times are counted from `origin`.
pub(crate) fn run_connection<R: Role>(
    conn: Connection,
    origin: Instant,
    (rd, wr): (OwnedReadHalf, OwnedWriteHalf),
    role: &mut R,
    write_stall: Duration,
) -> Driver<'_, R> {
    // Room for two of the largest frames either side may send.
    let largest = conn
        .config()
        .max_frame_len
        .max(conn.session().max_frame_len()) as usize;
    Driver {
        conn,
        role,
        rd,
        wr,
        out: BytesMut::new(),
        origin,
        read_open: true,
        backlog_since: origin,
        backlog_cap: 2 * largest + 64 * 1024,
        write_stall,
        ended: None,
        sink: None,
        timer: tokio::time::sleep_until(origin),
        armed: None,
        timer_at: None,
        stall_at: None,
    }
}

pin_project_lite::pin_project! {
    #[project = DriverProj]
    /// The future [`run`] returns: the session loop, written out as a state machine of
    /// its own (struct and `poll`) rather than nested `select!`s, so that an idle
    /// session costs exactly these fields (one timer, no futures kept for branches that
    /// are not waiting) and every source is polled once per pass (none can starve
    /// another).
    pub(crate) struct Driver<'a, R> {
        conn: Connection,
        role: &'a mut R,
        rd: OwnedReadHalf,
        wr: OwnedWriteHalf,
        // Swapped with the session's send buffer: two allocations for a busy session,
        // none for an idle one.
        out: BytesMut,
        origin: Instant,
        read_open: bool,
        // Since when the send backlog has been non-empty.
        backlog_since: Instant,
        backlog_cap: usize,
        write_stall: Duration,
        // The session's end, kept until its last bytes are written.
        ended: Option<End>,
        // After the end: where what the peer still sends is read and dropped.
        sink: Option<Vec<u8>>,
        // One timer for the session's deadline, the write stall and the last read.
        // It is moved only when it must fire sooner: moving a timer on every frame costs
        // a timer-wheel update each. When it fires early (the deadline moved later
        // meanwhile), the session ignores it and it is armed again.
        #[pin]
        timer: Sleep,
        // The timer's deadline, while it is to be polled.
        armed: Option<Instant>,
        // The session's next deadline, as last armed.
        timer_at: Option<Instant>,
        // When the current backlog stalls.
        stall_at: Option<Instant>,
    }
}

impl<R: Role> Future for Driver<'_, R> {
    type Output = Outcome;

    /// Passes over the sources until none has anything, the session is over, or
    /// `MAX_PASSES` were made (then it yields, waking itself).
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut me = self.project();
        if me.sink.is_some() {
            return me.linger(cx);
        }
        // The clock is read once per wake-up (and after the timer fired), not per use.
        let mut t = Instant::now();
        for _ in 0..MAX_PASSES {
            if let ControlFlow::Break(done) = me.pass(cx, &mut t) {
                return done;
            }
        }
        // Busy for this many passes: yield (woken again at once), so that one session
        // that always has something to do cannot hold its worker thread.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<R: Role> DriverProj<'_, '_, R> {
    /// One pass: the session's events, its output, then each source once (the socket's
    /// input, the role's work, the timer); `Continue` for another pass when one had
    /// something, `Break` with what `poll` returns.
    fn pass(&mut self, cx: &mut Context<'_>, t: &mut Instant) -> ControlFlow<Poll<Outcome>> {
        let now = *t - *self.origin;
        self.handle_events(now);
        if self.out.is_empty() {
            if self.conn.transmit_into(self.out) {
                *self.backlog_since = *t;
            } else if self.ended.is_some() {
                return ControlFlow::Break(self.finish(cx, *t));
            }
        }
        // Write at once what the socket takes (the common case: the answer fits in its
        // buffer); once something was written, back to the top: more may be due, or the
        // session over.
        match self.drive_write(cx, now) {
            Ok(true) => return ControlFlow::Continue(()),
            Ok(false) => {}
            Err(end) => return ControlFlow::Break(Poll::Ready(end)),
        }
        let writing = !self.out.is_empty();
        if !writing {
            *self.stall_at = None;
        }
        let held = !self.role.may_read(self.conn);
        let read = match self.drive_read(cx, now, held) {
            Ok(read) => read,
            Err(end) => return ControlFlow::Break(Poll::Ready(end)),
        };
        let worked = self.drive_work(cx, now);
        self.arm_timer(writing);
        let fired = match self.drive_timer(cx, held, t) {
            Ok(fired) => fired,
            Err(end) => return ControlFlow::Break(Poll::Ready(end)),
        };
        if !(read || worked || fired) {
            return ControlFlow::Break(Poll::Pending);
        }
        self.role.after(self.conn);
        ControlFlow::Continue(())
    }

    /// What the session reports, to the role (its end kept until the last bytes are
    /// written).
    fn handle_events(&mut self, now: Duration) {
        while let Some(event) = self.conn.poll_event() {
            if let Event::Closed(end) = &event {
                *self.ended = Some(end.clone());
            }
            self.role.event(event, self.conn, now);
        }
    }

    /// Writes the backlog: `Ok(true)` when something was written (or the peer cut the
    /// connection, which the session was told), `Ok(false)` when there is nothing to
    /// write or the socket takes nothing now; `Err` ends the session.
    fn drive_write(&mut self, cx: &mut Context<'_>, now: Duration) -> Result<bool, Outcome> {
        if self.out.is_empty() {
            return Ok(false);
        }
        match Pin::new(&mut *self.wr).poll_write(cx, self.out) {
            Poll::Ready(Ok(0)) => {
                let e = io::Error::from(io::ErrorKind::WriteZero);
                Err(io_end(e, self.ended))
            }
            Poll::Ready(Ok(n)) => {
                self.out.advance(n);
                if self.out.is_empty() {
                    // What was sealed on the way (answers ready at once) is counted.
                    self.role.after(self.conn);
                }
                Ok(true)
            }
            Poll::Ready(Err(e)) if crate::wire::is_cut(&e) => {
                self.out.clear();
                self.conn.handle_eof(now);
                Ok(true)
            }
            Poll::Ready(Err(e)) => Err(io_end(e, self.ended)),
            Poll::Pending => Ok(false),
        }
    }

    /// Reads what arrived into the session, unless the role holds the peer back
    /// (`held`) or the send backlog is over its cap (`Role::HOLD_WHEN_BACKLOGGED`):
    /// whether anything happened (bytes, or the end of the input).
    fn drive_read(
        &mut self,
        cx: &mut Context<'_>,
        now: Duration,
        held: bool,
    ) -> Result<bool, Outcome> {
        let reading = *self.read_open
            && !self.conn.is_closed()
            && !held
            && (!R::HOLD_WHEN_BACKLOGGED
                || self.out.len() + self.conn.pending_transmit() < *self.backlog_cap);
        if !reading {
            return Ok(false);
        }
        // Straight into the session's buffer, given room only once the socket is
        // readable: an idle session holds no read buffer.
        let Poll::Ready(r) = poll_read_some(self.rd, self.conn.input_buffer(), cx) else {
            return Ok(false);
        };
        match r {
            Ok(n) if n > 0 => self.conn.handle_read(n, now),
            Err(e) if !crate::wire::is_cut(&e) => return Err(io_end(e, self.ended)),
            // EOF, or cut by the peer.
            _ => {
                *self.read_open = false;
                self.conn.handle_eof(now);
            }
        }
        Ok(true)
    }

    /// One piece of the role's work, applied to the session: whether there was one.
    fn drive_work(&mut self, cx: &mut Context<'_>, now: Duration) -> bool {
        if self.conn.is_closed() {
            return false;
        }
        match self.role.poll_work(cx) {
            Poll::Ready(work) => {
                self.role.apply(work, self.conn, now);
                true
            }
            Poll::Pending => false,
        }
    }

    /// Arms the one timer for the earliest of the session's deadline and the write
    /// stall (`writing`: a backlog waits), moving it only when it must fire sooner.
    fn arm_timer(&mut self, writing: bool) {
        if let Some(at) = self.conn.poll_timeout().map(|d| *self.origin + d) {
            if self.timer_at.is_none_or(|armed| at < armed) {
                *self.timer_at = Some(at);
            }
        }
        if writing && self.stall_at.is_none() {
            *self.stall_at = Some(*self.backlog_since + *self.write_stall);
        }
        let due = match (*self.timer_at, *self.stall_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(due) = due {
            if self.armed.is_none_or(|armed| due < armed) {
                self.timer.as_mut().reset(due);
                *self.armed = Some(due);
            }
        }
    }

    /// The timer: whether it fired (the session's deadline handled, `t` read again);
    /// `Err` when the backlog stalled for `write_stall`.
    fn drive_timer(
        &mut self,
        cx: &mut Context<'_>,
        held: bool,
        t: &mut Instant,
    ) -> Result<bool, Outcome> {
        if self.armed.is_none() || self.timer.as_mut().poll(cx).is_pending() {
            return Ok(false);
        }
        // Armed again on the next pass, for whatever is still ahead.
        *self.armed = None;
        *t = Instant::now();
        let now = *t - *self.origin;
        if self.timer_at.is_some_and(|at| at <= *t) {
            *self.timer_at = None;
            // Time this side held the peer back is not the peer's silence.
            if held {
                self.conn.hold_idle(now);
            }
            self.conn.handle_timeout(now);
            // Quiet for a keepalive interval or more: give the buffers back (a session
            // that goes idle costs what a new one does).
            if self.out.is_empty() {
                *self.out = BytesMut::new();
                self.conn.release_buffers();
            }
        }
        if self.stall_at.is_some_and(|at| at <= *t) {
            *self.stall_at = None;
            if !self.out.is_empty() && *t - *self.backlog_since >= *self.write_stall {
                let e = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the peer did not take what was sent within {:?}",
                        self.write_stall
                    ),
                );
                return Err(io_end(e, self.ended));
            }
        }
        Ok(true)
    }

    /// The session is over and all it had to send is written: FIN, then read (and
    /// drop) until the peer closes or 2 s pass, so that unread bytes do not turn the
    /// close into a reset that destroys the last CLOSE.
    fn finish(&mut self, cx: &mut Context<'_>, t: Instant) -> Poll<Outcome> {
        let _ = Pin::new(&mut *self.wr).poll_shutdown(cx);
        if !*self.read_open {
            return Poll::Ready(Outcome::Ended(self.ended.take().expect("ended")));
        }
        // On the heap, and only now: an array in the struct would sit in every session
        // for its whole life.
        *self.sink = Some(vec![0u8; 1024]);
        self.timer.as_mut().reset(t + Duration::from_secs(2));
        self.linger(cx)
    }

    /// After the session's end: reads and drops until the peer closes, the socket fails
    /// or the timer (2 s) fires; then the session's end.
    fn linger(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let buf = self.sink.as_mut().expect("lingering");
        // The deadline first, while this poll still has tokio's budget: reads that use
        // it all up (a peer that keeps sending) must not keep the timer from ever being
        // seen. Polled here, it is registered for a wake-up too, whatever the reads
        // below find.
        let mut done = self.timer.as_mut().poll(cx).is_ready();
        while !done {
            let mut rb = ReadBuf::new(buf);
            match Pin::new(&mut *self.rd).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if !rb.filled().is_empty() => {}
                // EOF or an error: the peer is done.
                Poll::Ready(_) => done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        *self.sink = None;
        Poll::Ready(Outcome::Ended(self.ended.take().expect("ended")))
    }
}

/// Passes of the session loop in one `poll` before the driver yields to other tasks. Each
/// pass handles a read, a write, a piece of work and the timer; tokio's budget usually
/// makes the socket yield sooner, this bounds what does not take that budget.
const MAX_PASSES: usize = 64;

/// Room made in the read buffer when it has less than half of this spare: several
/// frames of a busy session per read (one `recv` per burst), and no more than a read
/// into a fresh buffer needs.
const READ_CHUNK: usize = 4096;

/// Reads what arrived into `buf`, making room in it only once the socket is readable.
fn poll_read_some(
    rd: &mut OwnedReadHalf,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    ready!(rd.as_ref().poll_read_ready(cx))?;
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    let read = rd.read_buf(buf);
    std::pin::pin!(read).poll(cx)
}

/// The socket failed: the session's own end if it had one already (the failure was
/// only in delivering its last bytes).
fn io_end(e: io::Error, ended: &mut Option<End>) -> Outcome {
    match ended.take() {
        Some(end) => Outcome::Ended(end),
        None => Outcome::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::session::tests::pair as sessions;
    use crate::proto::Body;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    /// A role with no work of its own, that never holds the peer back.
    struct Quiet;

    impl Role for Quiet {
        type Work = ();
        fn poll_work(&mut self, _: &mut Context<'_>) -> Poll<()> {
            Poll::Pending
        }
        fn apply(&mut self, _: (), _: &mut Connection, _: Duration) {}
        fn event(&mut self, _: Event, _: &mut Connection, _: Duration) {}
    }

    /// Drives `session` over `tcp` with the [`Quiet`] role, on a task of its own.
    fn spawn_quiet(
        session: Session,
        config: Config,
        tcp: TcpStream,
    ) -> tokio::task::JoinHandle<Outcome> {
        tokio::spawn(async move {
            let (io, stall) = (tcp.into_split(), Duration::from_secs(30));
            run(session, config, io, BytesMut::new(), &mut Quiet, stall).await
        })
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

    /// `drive_read` (the backlog cap). Review of issue 12: the driver reads while it
    /// writes; a peer that sends PINGs and reads nothing made it answer into a send
    /// buffer that grew without bound. Now it stops reading once the backlog passes two
    /// frames' worth, so the peer's writes block after a bounded amount (before the fix:
    /// all 4 MB went through).
    #[tokio::test]
    async fn a_peer_that_never_reads_cannot_grow_the_send_backlog() {
        let (mut client, server) = sessions();
        let (mine, mut peer) = small_pair().await;
        let config = Config::server(); // 64 KiB frames: backlog cap 192 KiB
        let driver = spawn_quiet(server, config, mine);
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

    /// `linger`. Review of 444780b: after the session's end the driver lingers (reads and
    /// drops) for 2 s at most. Its timer was polled only when a read found nothing, and
    /// reads that use up tokio's budget make the timer's poll return Pending too: a peer
    /// that kept the socket readable kept the session (its task, socket and permit) for
    /// as long as it liked. Here 1 MiB waits to be drained when the deadline passes: the
    /// driver must end at its next poll, not after draining it all (before the fix: 8
    /// more polls).
    #[tokio::test(start_paused = true)]
    async fn the_linger_after_close_ends_at_its_deadline_while_the_peer_keeps_sending() {
        let (mut client, server) = sessions();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mine, _) = l.accept().await.unwrap();
        rustix::net::sockopt::set_socket_recv_buffer_size(&mine, 4 << 20).unwrap();
        let driver = spawn_quiet(server, Config::server(), mine);
        let (mut prd, mut pwr) = peer.into_split();
        let mut close = BytesMut::new();
        let bye = Body::Close {
            code: crate::proto::CloseCode::NORMAL,
            reason: "bye".into(),
        };
        client.seal(&bye, &mut close).unwrap();
        pwr.write_all(&close).await.unwrap();
        // The driver's CLOSE: it has answered and is lingering.
        let mut answer = [0u8; 256];
        assert!(prd.read(&mut answer).await.unwrap() > 0);
        pwr.write_all(&vec![0u8; 1 << 20]).await.unwrap();
        tokio::time::advance(Duration::from_secs(3)).await;
        for _ in 0..3 {
            if driver.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(driver.is_finished(), "still lingering after its deadline");
        assert!(matches!(
            driver.await.unwrap(),
            Outcome::Ended(End::PeerClosed { .. })
        ));
    }

    /// `poll` (its `MAX_PASSES`). Review of 444780b: the driver loops while any source
    /// makes progress, and work from the role does not always take tokio's budget: a role
    /// that always has work kept `poll` from ever returning (its worker thread held, its
    /// writes and timer never polled with budget). Now a `poll` makes at most
    /// `MAX_PASSES` passes, then yields, waking itself.
    #[tokio::test]
    async fn a_session_with_endless_work_still_yields() {
        struct Endless(usize);
        impl Role for Endless {
            type Work = ();
            fn poll_work(&mut self, _: &mut Context<'_>) -> Poll<()> {
                self.0 += 1;
                Poll::Ready(())
            }
            fn apply(&mut self, _: (), _: &mut Connection, _: Duration) {}
            fn event(&mut self, _: Event, _: &mut Connection, _: Duration) {}
        }
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let (_client, server) = sessions();
        let (mine, _peer) = small_pair().await;
        let mut role = Endless(0);
        let flag = std::sync::Arc::new(Flag(false.into()));
        let waker = std::task::Waker::from(flag.clone());
        {
            let config = Config::server();
            let io = mine.into_split();
            let stall = Duration::from_secs(30);
            let mut d = std::pin::pin!(run(server, config, io, BytesMut::new(), &mut role, stall));
            assert!(d
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
        }
        assert!(
            flag.0.load(std::sync::atomic::Ordering::SeqCst),
            "yielded without asking to be polled again"
        );
        assert!(
            role.0 <= MAX_PASSES,
            "{} pieces of work in one poll",
            role.0
        );
    }
}
