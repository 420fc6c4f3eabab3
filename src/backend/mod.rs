//! What the daemon does with an authenticated REQUEST or MESSAGE.
//!
//! A [`Backend`] gets each request with the authenticated identity and its sequence
//! number, and returns the RESPONSE's status and payload. The daemon applies the
//! `backend_timeout` limit around it and turns a timeout into status TIMEOUT.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BackendSpec;
use crate::proto::{Id, ProtocolError, Status};

pub mod http;
pub mod unix;

/// A boxed future, as backends return.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An authenticated request from a device.
#[derive(Debug, Clone)]
pub struct Request {
    /// The authenticated identity.
    pub id: Id,
    /// The request's sequence number in its session.
    pub seq: u64,
    /// The payload.
    pub payload: Bytes,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// RESPONSE status (spec 10.3).
    pub status: Status,
    /// RESPONSE payload.
    pub payload: Bytes,
}

impl Reply {
    /// A successful reply.
    pub fn ok(payload: Bytes) -> Reply {
        Reply {
            status: Status::OK,
            payload,
        }
    }

    /// An error reply with a short explanation as payload.
    pub fn error(status: Status, why: &str) -> Reply {
        Reply {
            status,
            payload: Bytes::copy_from_slice(why.as_bytes()),
        }
    }
}

/// Something that answers device requests.
pub trait Backend: Send + Sync + 'static {
    /// A short name for logs.
    fn name(&self) -> &str;

    /// Answers one request.
    fn request(&self, req: Request) -> BoxFuture<Reply>;

    /// Called once when the daemon starts, with what the backend may use of it: the
    /// devices' live sessions (to send them requests and messages) and where to run
    /// its tasks. The default ignores it.
    fn attach(&self, daemon: Attachment) {
        let _ = daemon;
    }

    /// Takes a one-way MESSAGE. The default drops it.
    fn message(&self, id: Id, payload: Bytes) -> BoxFuture<()> {
        let _ = (id, payload);
        Box::pin(async {})
    }

    /// The outcome of a message this backend queued ([`Devices::enqueue`]). The default
    /// drops it.
    fn report(&self, report: DeliveryReport) {
        let _ = report;
    }
}

/// How a message a backend queued for a device ended (spec/BACKEND.md REPORT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// For whom it was.
    pub id: Id,
    /// Its message id.
    pub msg_id: u64,
    /// 0 acknowledged, 1 expired, 2 purged, 3 undeliverable.
    pub outcome: u8,
    /// The device's ACK status (acknowledged), else 0.
    pub status: Status,
    /// The device's answer (acknowledged), or why (undeliverable), else empty.
    pub payload: Bytes,
}

/// What to send to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendKind {
    /// A REQUEST: wait for the device's RESPONSE.
    Request,
    /// A one-way MESSAGE.
    Message,
}

/// Why something could not be sent to a device, or got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The identity has no live session.
    #[error("identity {0} is not connected")]
    Offline(String),
    /// The session would not send it: the payload is above the device's frame limit
    /// (announced in its HELLO), or the session is closing.
    #[error("the session refused it: {0}")]
    Refused(#[source] ProtocolError),
    /// The session ended before the device answered.
    #[error("the session ended before the device answered")]
    SessionEnded,
    /// The device did not answer in time.
    #[error("the device did not answer within {0:?}")]
    Timeout(Duration),
    /// The device has as many server REQUESTs in flight (sent, not answered) as
    /// `limits.server_requests_in_flight` allows: this one was not sent.
    #[error("identity {id} has {limit} server requests in flight (limits.server_requests_in_flight); nothing was sent: try again when it answers them")]
    Busy {
        /// The identity.
        id: String,
        /// The limit in force for its session.
        limit: usize,
    },
    /// In a fleet: the node holding the session could not send it, or could not be
    /// reached.
    #[error("the node holding the session: {0}")]
    Elsewhere(String),
}

/// Server-initiated traffic: the daemon's live sessions, as a backend sees them.
pub trait Devices: Send + Sync + 'static {
    /// Sends a REQUEST (resolving to the device's answer) or a MESSAGE (resolving to
    /// `None` once it is written) to `id`'s live session, waiting at most `timeout`.
    fn send(
        &self,
        id: Id,
        kind: SendKind,
        payload: Bytes,
        timeout: Duration,
    ) -> BoxFuture<Result<Option<Reply>, SendError>>;

    /// Queues a request or message for `id` durably (spec 8.8): resolves to its message
    /// id once it is stored, or why it was not (nothing stored). Its outcome comes later
    /// as a [`Backend::report`]. `ttl`: `limits.queue_ttl` if `None`.
    fn enqueue(
        &self,
        id: Id,
        kind: crate::proto::DeliveryKind,
        payload: Bytes,
        ttl: Option<Duration>,
    ) -> BoxFuture<Result<u64, String>> {
        let _ = (id, kind, payload, ttl);
        Box::pin(async { Err("this daemon has no queued delivery".to_owned()) })
    }
}

/// What a backend gets of the daemon when it starts ([`Backend::attach`]).
#[derive(Clone)]
pub struct Attachment {
    /// The live sessions, to send to devices.
    pub devices: Arc<dyn Devices>,
    /// Where the backend runs its tasks: the daemon waits for them when it stops.
    pub tasks: TaskTracker,
    /// Cancelled when the daemon stops, after the sessions drained (their last requests
    /// still reach the backend); the backend's tasks end then.
    pub stop: CancellationToken,
}

/// A `backend` setting the daemon could not set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP backend: {0}")]
    Http(String),
}

/// Answers every request with its own payload, status OK.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Backend for Echo {
    fn name(&self) -> &str {
        "echo"
    }

    fn request(&self, req: Request) -> BoxFuture<Reply> {
        Box::pin(async move { Reply::ok(req.payload) })
    }
}

/// Builds the backend a `backend = "..."` setting names (checked when the
/// configuration was read).
pub fn from_spec(spec: &BackendSpec) -> Result<Arc<dyn Backend>, BackendError> {
    Ok(match spec {
        BackendSpec::Echo => Arc::new(Echo),
        BackendSpec::Unix(path) => Arc::new(unix::UnixBackend::new(path.clone())),
        BackendSpec::Http(url) => Arc::new(http::HttpBackend::new(url.clone())?),
    })
}
