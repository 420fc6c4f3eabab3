//! The HTTP backend (`backend = "http://127.0.0.1:8080/tally"`): each REQUEST becomes a
//! POST of its payload, with the identity and sequence number in headers; the HTTP
//! status and body become the RESPONSE's status and payload. Connections are pooled
//! and kept alive by `reqwest`.
//!
//! | HTTP answer | RESPONSE status |
//! |---|---|
//! | 2xx | 0 (OK), the body as payload |
//! | any other status `s` (300-599) | `s` itself (in the application's range, spec 10.3), the body as payload |
//! | connection refused | 1 (UNAVAILABLE) |
//! | no answer in time | 3 (TIMEOUT) |
//! | anything else (bad answer, body too large) | 2 (BACKEND_ERROR) |

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tracing::warn;

use super::{Backend, BoxFuture, Reply, Request};
use crate::proto::{Id, Status};

/// Header carrying the authenticated identity.
pub const IDENTITY_HEADER: &str = "Tally-Identity";
/// Header carrying the request's sequence number.
pub const SEQUENCE_HEADER: &str = "Tally-Sequence";
/// Header saying `request` or `message`.
pub const KIND_HEADER: &str = "Tally-Kind";
/// Largest response body accepted (a RESPONSE cannot carry more anyway).
pub const MAX_BODY: usize = 16 << 20;

/// POSTs requests to a URL.
pub struct HttpBackend {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HttpBackend {
    /// A backend for `url` (`http://...`).
    pub fn new(url: reqwest::Url) -> Result<Self, super::BackendError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .timeout(Duration::from_secs(600))
            .build()
            .map_err(|e| super::BackendError::Http(e.to_string()))?;
        Ok(HttpBackend { client, url })
    }
}

async fn post(
    client: reqwest::Client,
    url: reqwest::Url,
    id: Id,
    seq: Option<u64>,
    payload: Bytes,
) -> Reply {
    let mut req = client
        .post(url)
        .header(IDENTITY_HEADER, id.as_str())
        .header(
            KIND_HEADER,
            if seq.is_some() { "request" } else { "message" },
        )
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(payload);
    if let Some(seq) = seq {
        req = req.header(SEQUENCE_HEADER, seq.to_string());
    }
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) if e.is_connect() => {
            return Reply::error(Status::UNAVAILABLE, "backend unavailable")
        }
        Err(e) if e.is_timeout() => return Reply::error(Status::TIMEOUT, "backend timed out"),
        Err(e) => {
            warn!(error = %e, "HTTP backend request failed");
            return Reply::error(Status::BACKEND_ERROR, "backend error");
        }
    };
    let code = resp.status();
    let mut body = BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) if body.len() + chunk.len() <= MAX_BODY => {
                body.extend_from_slice(&chunk)
            }
            Ok(Some(_)) => return Reply::error(Status::BACKEND_ERROR, "backend answer too large"),
            Ok(None) => break,
            Err(e) => {
                warn!(error = %e, "HTTP backend answer could not be read");
                return Reply::error(Status::BACKEND_ERROR, "backend error");
            }
        }
    }
    let status = if code.is_success() {
        Status::OK
    } else {
        Status(code.as_u16())
    };
    Reply {
        status,
        payload: body.freeze(),
    }
}

impl Backend for HttpBackend {
    fn name(&self) -> &str {
        "http"
    }

    fn request(&self, req: Request) -> BoxFuture<Reply> {
        Box::pin(post(
            self.client.clone(),
            self.url.clone(),
            req.id,
            Some(req.seq),
            req.payload,
        ))
    }

    fn message(&self, id: Id, payload: Bytes) -> BoxFuture<()> {
        let fut = post(self.client.clone(), self.url.clone(), id, None, payload);
        Box::pin(async move {
            let reply = fut.await;
            if reply.status != Status::OK {
                warn!(status = %reply.status, "HTTP backend refused a message");
            }
        })
    }
}
