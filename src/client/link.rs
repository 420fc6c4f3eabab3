//! A session that comes back: [`Link`] keeps one identity connected across daemon
//! restarts, network cuts and takeovers, with jittered backoff, and tells the
//! application when the session goes up and down.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{jitter, Backoff, Client, ClientError, ClientOptions, Incoming};
use crate::proto::credential::Credential;
use crate::proto::{CloseCode, ErrorCode};

/// What a session's end (or a failed attempt) means for the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Try again soon: the server restarted, the network, `BUSY`.
    Transient,
    /// Try again later, and slower each time: a takeover, or a refusal that will not pass
    /// by itself.
    Refused,
    /// Do not try again: the server said so in an authenticated CLOSE (revoked, removed),
    /// the credential is unusable, or the application closed the link.
    Final,
}

fn kind(error: &ClientError) -> Kind {
    match error {
        ClientError::Closed { code, .. }
            if *code == CloseCode::REVOKED || *code == CloseCode::REMOVED =>
        {
            Kind::Final
        }
        ClientError::Credential(_) | ClientError::SessionClosed => Kind::Final,
        ClientError::Closed { code, .. } if *code == CloseCode::TAKEN_OVER => Kind::Refused,
        ClientError::Refused(code)
            if [
                ErrorCode::TAKEOVER_REFUSED,
                ErrorCode::AUTH_FAILED,
                ErrorCode::UNSUPPORTED_VERSION,
                ErrorCode::MALFORMED,
            ]
            .contains(code) =>
        {
            Kind::Refused
        }
        ClientError::AuthFailed | ClientError::NotTally(_) | ClientError::ServerNotAuthentic => {
            Kind::Refused
        }
        _ => Kind::Transient,
    }
}

/// The link's backoff: failures in a row of each kind. No clock and no randomness of
/// its own (the caller gives how long the session lasted, and the jitter).
#[derive(Debug, Default)]
struct Failures {
    failures: u32,
    refusals: u32,
}

impl Failures {
    /// How long to wait after `error`, or `None` to stop. `lasted` is how long the
    /// session was up (`None`: it never came up); `jitter` is uniform in [0, 1).
    fn after(
        &mut self,
        r: &Backoff,
        error: &ClientError,
        lasted: Option<Duration>,
        jitter: f64,
    ) -> Option<Duration> {
        // A session that stayed up starts the delays over, but a takeover after it
        // does not forget the takeovers before (two devices sharing an identity take
        // turns in sessions that may last long: their delays must keep growing).
        if lasted.is_some_and(|d| d >= r.stable_after) {
            self.failures = 0;
            if kind(error) != Kind::Refused {
                self.refusals = 0;
            }
        }
        let jitter = jitter.clamp(0.0, 1.0);
        let doubled = |base: Duration, n: &mut u32, max: Duration| {
            let d = base.saturating_mul(1u32 << (*n).min(20)).min(max);
            *n = n.saturating_add(1);
            d
        };
        match kind(error) {
            Kind::Final => None,
            Kind::Transient => {
                let d = doubled(r.initial_delay, &mut self.failures, r.max_delay);
                Some(d.mul_f64(0.5 + jitter / 2.0))
            }
            Kind::Refused => {
                let d = doubled(r.refused_delay, &mut self.refusals, r.max_refused_delay);
                Some(
                    d.mul_f64(1.0 + jitter / 2.0)
                        .min(r.max_refused_delay.max(d)),
                )
            }
        }
    }
}

/// What happens on a [`Link`], in order.
#[derive(Debug)]
#[non_exhaustive]
pub enum LinkEvent {
    /// A session is established (the first, or again after a loss): requests go through
    /// this [`Client`] (or [`Link::request`]).
    Up(Client),
    /// The session ended, or an attempt failed, with `error`; the next attempt starts in
    /// `retry_in`. Requests that were waiting for an answer failed with the same error
    /// (the link never sends a request twice: it may have been carried out).
    Down {
        /// Why.
        error: ClientError,
        /// When the link tries again.
        retry_in: Duration,
        /// Whether the session was up (false: an attempt failed).
        was_up: bool,
    },
    /// A server REQUEST or MESSAGE on the current session.
    Incoming(Incoming),
    /// The link stopped for good: the identity was revoked or removed (authenticated
    /// CLOSE `REVOKED` or `REMOVED`), or the link was closed. No event follows.
    Stopped(ClientError),
}

/// Where the link is.
#[derive(Debug, Clone)]
pub(super) enum State {
    Connecting,
    Up(Client),
    Stopped(ClientError),
}

/// A session with the server that reconnects: whenever it ends for a reason that may
/// pass (the server restarted, the network, a takeover), a new one is made after a
/// jittered, growing delay ([`Backoff::link`]). What happens arrives as [`LinkEvent`]s,
/// server requests and messages among them. This is what a device on a persistent
/// connection runs.
///
/// ```no_run
/// # async fn demo(cred: tally::proto::credential::Credential) {
/// use tally::client::{Backoff, ClientOptions, Incoming, Link, LinkEvent};
/// use tally::proto::Status;
/// let (link, mut events) = Link::start(cred, ClientOptions::default(), Backoff::link());
/// while let Some(event) = events.recv().await {
///     match event {
///         LinkEvent::Up(_) => println!("online"),
///         LinkEvent::Down { error, retry_in, .. } => println!("offline ({error}), again in {retry_in:?}"),
///         LinkEvent::Incoming(Incoming::Request(req)) => {
///             let answer = req.payload.clone();
///             let _ = req.respond(Status::OK, answer).await;
///         }
///         LinkEvent::Incoming(_) => {}
///         LinkEvent::Stopped(error) => { println!("stopped: {error}"); break }
///         _ => {}
///     }
/// }
/// # drop(link); }
/// ```
///
/// Dropping the `Link` closes the session and stops reconnecting, as [`Link::close`]
/// does without waiting; so does closing the [`Client`] of an [`LinkEvent::Up`]
/// (`Client::close`). The link backs off as its `backoff` says (not as
/// `ClientOptions::retry`: one connection's retries). Events wait in a queue of `ClientOptions::incoming_capacity`; while it is full,
/// server requests are answered `UNAVAILABLE`.
#[derive(Debug)]
pub struct Link {
    state: watch::Receiver<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Link {
    /// Starts connecting `cred` in a new task (on the current tokio runtime).
    pub fn start(
        cred: Credential,
        opts: ClientOptions,
        backoff: Backoff,
    ) -> (Link, mpsc::Receiver<LinkEvent>) {
        let (events_tx, events) = mpsc::channel(opts.incoming_capacity.max(1));
        let (state_tx, state) = watch::channel(State::Connecting);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(run(cred, opts, backoff, events_tx, state_tx, stop_rx));
        let link = Link {
            state,
            stop: Some(stop),
            task: Some(task),
        };
        (link, events)
    }

    /// The current session, if one is up.
    pub fn client(&self) -> Option<Client> {
        match &*self.state.borrow() {
            State::Up(c) => Some(c.clone()),
            _ => None,
        }
    }

    /// Where the link is, as it changes (for [`super::share`]).
    pub(super) fn watch_state(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Waits for a session to be up and returns it; fails once the link stopped. Bound
    /// the wait with a timeout of your own if the server may stay away.
    pub async fn session(&self) -> Result<Client, ClientError> {
        let mut state = self.state.clone();
        let s = state
            .wait_for(|s| !matches!(s, State::Connecting))
            .await
            .map_err(|_| ClientError::SessionClosed)?;
        match &*s {
            State::Up(c) => Ok(c.clone()),
            State::Stopped(e) => Err(e.clone()),
            State::Connecting => unreachable!("waited for another state"),
        }
    }

    /// Sends a REQUEST on the current session (waiting for one to be up) and waits for
    /// its RESPONSE, as [`Client::request`]. A session lost before the answer fails the
    /// request; it is not sent again.
    pub async fn request(&self, payload: impl Into<Bytes>) -> Result<Bytes, ClientError> {
        self.session().await?.request(payload).await
    }

    /// Sends a one-way MESSAGE on the current session (waiting for one to be up).
    pub async fn message(&self, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        self.session().await?.message(payload).await
    }

    /// Ends the current session with CLOSE NORMAL, stops reconnecting, and waits until
    /// the link's task ended.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Dropping the sender stops the task, which closes its session politely.
        self.stop.take();
    }
}

/// Hands `event` to the application unless the link is told to stop first. Returns
/// false if it was (an application that dropped its receiver just misses the events).
async fn deliver(
    events: &mpsc::Sender<LinkEvent>,
    event: LinkEvent,
    stop: &mut oneshot::Receiver<()>,
) -> bool {
    tokio::select! {
        _ = events.send(event) => true,
        _ = stop => false,
    }
}

async fn run(
    cred: Credential,
    opts: ClientOptions,
    backoff: Backoff,
    events: mpsc::Sender<LinkEvent>,
    state: watch::Sender<State>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut failures = Failures::default();
    let end = loop {
        let attempt = tokio::select! {
            r = Client::connect_once(&cred, opts.clone()) => r,
            _ = &mut stop => break ClientError::SessionClosed,
        };
        let (error, lasted) = match attempt {
            Ok((client, mut incoming)) => {
                let up = Instant::now();
                tracing::info!(id = %cred.id, server = %cred.server, "session up");
                state.send_replace(State::Up(client.clone()));
                if !deliver(&events, LinkEvent::Up(client.clone()), &mut stop).await {
                    let _ = client.close().await;
                    break ClientError::SessionClosed;
                }
                let stopped = loop {
                    tokio::select! {
                        item = incoming.recv() => match item {
                            Some(item) => {
                                if !deliver(&events, LinkEvent::Incoming(item), &mut stop).await {
                                    break true;
                                }
                            }
                            None => break false,
                        },
                        _ = &mut stop => break true,
                    }
                };
                if stopped {
                    let _ = client.close().await;
                    break ClientError::SessionClosed;
                }
                (client.closed().await, Some(up.elapsed()))
            }
            Err(e) => (e, None),
        };
        state.send_replace(State::Connecting);
        let Some(retry_in) = failures.after(&backoff, &error, lasted, jitter()) else {
            break error;
        };
        // Reported to the application in the Down event (spec 7.3: "report it"); the
        // log has it for those that do not look.
        if kind(&error) == Kind::Refused {
            tracing::info!(id = %cred.id, "{error}; trying again in {:.1} s", retry_in.as_secs_f64());
        } else {
            tracing::info!(id = %cred.id, "session down: {error}; trying again in {} ms", retry_in.as_millis());
        }
        let down = LinkEvent::Down {
            error,
            retry_in,
            was_up: lasted.is_some(),
        };
        if !deliver(&events, down, &mut stop).await {
            break ClientError::SessionClosed;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry_in) => {}
            _ = &mut stop => break ClientError::SessionClosed,
        }
    };
    state.send_replace(State::Stopped(end.clone()));
    // The last word, without waiting for a full queue.
    let _ = events.try_send(LinkEvent::Stopped(end));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(code: CloseCode) -> ClientError {
        ClientError::Closed {
            code,
            reason: String::new(),
        }
    }

    fn reconnect() -> Backoff {
        Backoff::link()
            .with_delays(Duration::from_millis(100), Duration::from_millis(800))
            .with_refused_delays(Duration::from_secs(10), Duration::from_secs(60))
            .with_stable_after(Duration::from_secs(30))
    }

    #[test]
    fn transient_failures_back_off_doubling_with_equal_jitter() {
        let r = reconnect();
        let mut b = Failures::default();
        let busy = ClientError::Refused(ErrorCode::BUSY);
        assert_eq!(
            b.after(&r, &busy, None, 0.0),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            b.after(&r, &ClientError::Truncated, None, 0.5),
            Some(Duration::from_millis(150))
        );
        let shutdown = closed(CloseCode::SHUTDOWN);
        assert_eq!(
            b.after(&r, &shutdown, Some(Duration::from_secs(1)), 1.0),
            Some(Duration::from_millis(400))
        );
        for _ in 0..30 {
            b.after(&r, &busy, None, 1.0);
        }
        assert_eq!(
            b.after(&r, &busy, None, 1.0),
            Some(r.max_delay),
            "capped, and no overflow after many failures"
        );
        // A session that stayed up long enough starts over.
        assert_eq!(
            b.after(&r, &shutdown, Some(Duration::from_secs(30)), 1.0),
            Some(Duration::from_millis(100))
        );
    }

    /// Spec 7.3: after TAKEN_OVER a client does not reconnect at once; it backs off, at
    /// least several seconds and growing.
    #[test]
    fn takeovers_back_off_never_below_the_delay_and_growing() {
        let r = reconnect();
        let mut b = Failures::default();
        let taken = closed(CloseCode::TAKEN_OVER);
        let first = b
            .after(&r, &taken, Some(Duration::from_secs(1)), 0.0)
            .unwrap();
        assert_eq!(first, Duration::from_secs(10));
        let second = b
            .after(&r, &taken, Some(Duration::from_secs(1)), 1.0)
            .unwrap();
        assert_eq!(second, Duration::from_secs(30), "20 s, up to 1.5x");
        let refused = ClientError::Refused(ErrorCode::TAKEOVER_REFUSED);
        assert_eq!(
            b.after(&r, &refused, None, 0.0),
            Some(Duration::from_secs(40))
        );
        assert_eq!(
            b.after(&r, &ClientError::AuthFailed, None, 1.0),
            Some(Duration::from_secs(60)),
            "capped at the maximum, jitter included"
        );
        // Refusals and transient failures count apart.
        assert_eq!(
            b.after(&r, &ClientError::Truncated, None, 0.0),
            Some(Duration::from_millis(50))
        );
    }

    /// Review finding: two devices sharing an identity whose sessions last long (past
    /// `stable_after`) came back at the first takeover delay every time.
    #[test]
    fn a_long_session_that_is_taken_over_does_not_reset_the_takeover_delays() {
        let r = reconnect();
        let mut b = Failures::default();
        let taken = closed(CloseCode::TAKEN_OVER);
        let long = Some(Duration::from_secs(300));
        let delays: Vec<_> = (0..3)
            .map(|_| b.after(&r, &taken, long, 0.0).unwrap())
            .collect();
        assert_eq!(delays, [10, 20, 40].map(Duration::from_secs));
        // Another kind of end after a long session does start over.
        assert_eq!(
            b.after(&r, &closed(CloseCode::SHUTDOWN), long, 0.0),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            b.after(&r, &taken, Some(Duration::ZERO), 0.0),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn only_an_authenticated_revocation_or_removal_stops_the_link() {
        let r = reconnect();
        let mut b = Failures::default();
        for e in [closed(CloseCode::REVOKED), closed(CloseCode::REMOVED)] {
            assert_eq!(b.after(&r, &e, Some(Duration::ZERO), 0.5), None, "{e}");
        }
        assert_eq!(b.after(&r, &ClientError::SessionClosed, None, 0.5), None);
        // Unauthenticated ERRORs and failed server tags could be forged: slower, not stop.
        for e in [
            ClientError::AuthFailed,
            ClientError::Refused(ErrorCode::AUTH_FAILED),
            ClientError::NotTally("HTTP".into()),
        ] {
            assert!(
                b.after(&r, &e, None, 0.5).unwrap() >= r.refused_delay,
                "{e}"
            );
        }
        for e in [
            closed(CloseCode::NORMAL),
            closed(CloseCode::IDLE_TIMEOUT),
            closed(CloseCode::PROTOCOL_ERROR),
            ClientError::Refused(ErrorCode::INTERNAL),
            ClientError::Timeout("handshake"),
        ] {
            assert!(b.after(&r, &e, None, 0.5).unwrap() <= r.max_delay, "{e}");
        }
    }
}
