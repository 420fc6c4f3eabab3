//! What the daemon does with an authenticated REQUEST or MESSAGE.
//!
//! A [`Backend`] gets each request with the authenticated identity and its sequence
//! number, and returns the RESPONSE's status and payload. The daemon applies the
//! `backend_timeout` limit around it and turns a timeout into status TIMEOUT.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::ConfigError;

pub mod http;
pub mod unix;
use crate::proto::{Id, Status};

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

    /// Called once when the daemon starts, with the registry of live sessions, through
    /// which the backend can send requests and messages to devices. The default ignores it.
    fn attach(&self, registry: Arc<crate::server::Registry>) {
        let _ = registry;
    }

    /// Takes a one-way MESSAGE. The default drops it.
    fn message(&self, id: Id, payload: Bytes) -> BoxFuture<()> {
        let _ = (id, payload);
        Box::pin(async {})
    }
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

/// Checks a `backend = "..."` setting.
pub fn check_spec(spec: &str) -> Result<(), ConfigError> {
    from_spec(spec).map(drop)
}

/// Builds the backend a `backend = "..."` setting names: `echo`,
/// `unix:/path/to/app.sock` or `http://host:port/path`.
pub fn from_spec(spec: &str) -> Result<Arc<dyn Backend>, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        field: "backend",
        reason,
    };
    if spec == "echo" {
        Ok(Arc::new(Echo))
    } else if let Some(path) = spec.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(invalid(
                "unix: needs a socket path, e.g. unix:/run/app.sock".into(),
            ));
        }
        Ok(Arc::new(unix::UnixBackend::new(path.into())))
    } else if spec.starts_with("http://") {
        Ok(Arc::new(http::HttpBackend::new(spec).map_err(invalid)?))
    } else {
        Err(invalid(format!(
            "unknown backend {spec:?} (use echo, unix:/path/to/socket, or http://host:port/path)"
        )))
    }
}
