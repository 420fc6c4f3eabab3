//! The Unix socket backend (`backend = "unix:/path"`): forwards device traffic to a
//! local application and lets it send to devices. The framing is `spec/BACKEND.md`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{Attachment, Backend, BoxFuture, DeliveryReport, Reply, Request, SendError, SendKind};
use crate::proto::codec::Reader;
use crate::proto::{DeliveryKind, FrameError, Id, Status};
use crate::wire::read_frame;

/// Largest message on the backend socket (length field).
pub const MAX_MESSAGE: u32 = (1 << 24) + 1024;
/// How long a SEND from the application waits for the device.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

const REQUEST: u8 = 0x01;
const MESSAGE: u8 = 0x02;
const RESULT: u8 = 0x03;
const REPORT: u8 = 0x04;
const RESPONSE: u8 = 0x81;
const SEND: u8 = 0x82;
const QUEUE: u8 = 0x83;

/// RESULT outcome of a QUEUE that was stored (its payload: the message id).
const QUEUED: u8 = 5;
/// RESULT outcome of a QUEUE that was refused (its payload: why).
const NOT_QUEUED: u8 = 6;

/// Forwards to an application listening on a Unix socket.
pub struct UnixBackend {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Writer of the current connection, if connected.
    conn: Mutex<Option<mpsc::Sender<Bytes>>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next_call: AtomicU64,
    daemon: OnceLock<Attachment>,
}

impl UnixBackend {
    /// A backend for the application at `path`. It connects once attached to a daemon.
    pub fn new(path: PathBuf) -> Self {
        UnixBackend {
            inner: Arc::new(Inner {
                path,
                conn: Mutex::new(None),
                pending: Mutex::new(HashMap::new()),
                next_call: AtomicU64::new(1),
                daemon: OnceLock::new(),
            }),
        }
    }
}

fn put_frame(ty: u8, fill: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::with_capacity(64);
    out.put_u32(0);
    out.put_u8(ty);
    fill(&mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

fn put_id(out: &mut BytesMut, id: &Id) {
    out.put_u8(id.as_str().len() as u8);
    out.put_slice(id.as_str().as_bytes());
}

impl Inner {
    fn sender(&self) -> Option<mpsc::Sender<Bytes>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fail_pending(&self, why: &str) {
        let drained: Vec<_> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for (_, tx) in drained {
            let _ = tx.send(Reply::error(Status::UNAVAILABLE, why));
        }
    }

    /// Connects, serves, reconnects, until `stop`.
    async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = self.clone().reconnect() => {}
        }
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.fail_pending("the daemon is stopping");
    }

    async fn reconnect(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut logged_down = false;
        loop {
            match UnixStream::connect(&self.path).await {
                Ok(stream) => {
                    info!(path = %self.path.display(), "connected to the backend application");
                    backoff = Duration::from_millis(100);
                    logged_down = false;
                    let why = self.clone().serve(stream).await;
                    *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.fail_pending("backend connection lost");
                    warn!(path = %self.path.display(), reason = %why, "backend connection lost; requests get status UNAVAILABLE until it is back");
                }
                Err(e) if !logged_down => {
                    warn!(path = %self.path.display(), error = %e, "cannot connect to the backend application; retrying");
                    logged_down = true;
                }
                Err(_) => {}
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Serves one connection; returns why it ended.
    async fn serve(self: Arc<Self>, stream: UnixStream) -> String {
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Bytes>(256);
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx.clone());
        let writer = tokio::spawn(async move {
            while let Some(frame) = rx.recv().await {
                if wr.write_all(&frame).await.is_err() {
                    break;
                }
            }
        });
        let mut buf = BytesMut::new();
        let why = loop {
            let frame = match read_frame(&mut rd, &mut buf, MAX_MESSAGE).await {
                Ok(f) => f,
                Err(e) => break e.to_string(),
            };
            if let Err(e) = self.handle(&frame, &tx) {
                break format!("malformed message from the application: {e}");
            }
        };
        writer.abort();
        why
    }

    fn handle(&self, frame: &Bytes, tx: &mpsc::Sender<Bytes>) -> Result<(), FrameError> {
        let mut r = Reader::new(frame)?;
        match r.ty() {
            RESPONSE => {
                let call = r.u64()?;
                let status = Status(r.u16()?);
                let payload = frame.slice(frame.len() - r.remaining()..);
                match self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&call)
                {
                    Some(waiter) => {
                        let _ = waiter.send(Reply { status, payload });
                    }
                    None => debug!(
                        call,
                        "answer to a call that is no longer waiting (timed out?)"
                    ),
                }
            }
            SEND => {
                let call = r.u64()?;
                let kind = r.u8()?;
                let (id, payload) = id_and_rest(&mut r, frame)?;
                let tx = tx.clone();
                let Some(daemon) = self.daemon.get() else {
                    let _ = tx.try_send(result_frame(call, Err((2, "daemon not ready".into()))));
                    return Ok(());
                };
                let devices = daemon.devices.clone();
                let stop = daemon.stop.clone();
                daemon.tasks.spawn(async move {
                    tokio::select! {
                        result = send(&*devices, id, kind, payload) => {
                            let _ = tx.send(result_frame(call, result)).await;
                        }
                        _ = stop.cancelled() => {}
                    }
                });
            }
            QUEUE => {
                let call = r.u64()?;
                let kind = r.u8()?;
                let ttl_secs = r.u32()?;
                let (id, payload) = id_and_rest(&mut r, frame)?;
                let tx = tx.clone();
                let Some(daemon) = self.daemon.get() else {
                    let why = "daemon not ready".into();
                    let _ = tx.try_send(queued_frame(call, Err((NOT_QUEUED, why))));
                    return Ok(());
                };
                let devices = daemon.devices.clone();
                daemon.tasks.spawn(async move {
                    let result = enqueue(&*devices, id, kind, ttl_secs, payload).await;
                    let _ = tx.send(queued_frame(call, result)).await;
                });
            }
            other => return Err(FrameError::UnknownType(other)),
        }
        Ok(())
    }
}

/// The `id` and the payload (the rest) of an application's SEND or QUEUE; an id that
/// is not one is `None` (answered as invalid, outcome 4).
fn id_and_rest(r: &mut Reader<'_>, frame: &Bytes) -> Result<(Option<Id>, Bytes), FrameError> {
    let n = r.u8()? as usize;
    let id = std::str::from_utf8(r.take(n)?)
        .ok()
        .and_then(|s| Id::new(s).ok());
    Ok((id, frame.slice(frame.len() - r.remaining()..)))
}

/// A QUEUE: stored (its message id) or why not.
async fn enqueue(
    devices: &dyn super::Devices,
    id: Option<Id>,
    kind: u8,
    ttl_secs: u32,
    payload: Bytes,
) -> Result<u64, (u8, String)> {
    let kind = DeliveryKind::from_u8(kind).ok_or((4, format!("unknown kind {kind}")))?;
    let id = id.ok_or((4, "invalid identity".to_owned()))?;
    let ttl = (ttl_secs > 0).then(|| Duration::from_secs(u64::from(ttl_secs)));
    devices
        .enqueue(id, kind, payload, ttl)
        .await
        .map_err(|why| (NOT_QUEUED, why))
}

fn queued_frame(call: u64, result: Result<u64, (u8, String)>) -> Bytes {
    put_frame(RESULT, |out| {
        out.put_u64(call);
        match result {
            Ok(msg_id) => {
                out.put_u8(QUEUED);
                out.put_u16(0);
                out.put_u64(msg_id);
            }
            Err((outcome, why)) => {
                out.put_u8(outcome);
                out.put_u16(0);
                out.put_slice(why.as_bytes());
            }
        }
    })
}

async fn send(
    devices: &dyn super::Devices,
    id: Option<Id>,
    kind: u8,
    payload: Bytes,
) -> Result<Option<Reply>, (u8, String)> {
    let kind = match kind {
        1 => SendKind::Request,
        2 => SendKind::Message,
        k => return Err((4, format!("unknown kind {k}"))),
    };
    let id = id.ok_or((4, "invalid identity".to_owned()))?;
    devices
        .send(id, kind, payload, SEND_TIMEOUT)
        .await
        .map_err(|e| {
            let outcome = match e {
                SendError::Offline(_) => 1,
                SendError::Timeout(_) => 3,
                _ => 2,
            };
            (outcome, e.to_string())
        })
}

fn result_frame(call: u64, result: Result<Option<Reply>, (u8, String)>) -> Bytes {
    put_frame(RESULT, |out| {
        out.put_u64(call);
        match result {
            Ok(reply) => {
                let reply = reply.unwrap_or(Reply::ok(Bytes::new()));
                out.put_u8(0);
                out.put_u16(reply.status.0);
                out.put_slice(&reply.payload);
            }
            Err((outcome, why)) => {
                out.put_u8(outcome);
                out.put_u16(0);
                out.put_slice(why.as_bytes());
            }
        }
    })
}

/// Removes a pending call when its request future is dropped (timeout, session end).
struct PendingGuard {
    inner: Arc<Inner>,
    call: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.call);
    }
}

impl Backend for UnixBackend {
    fn name(&self) -> &str {
        "unix"
    }

    fn attach(&self, daemon: Attachment) {
        if tokio::runtime::Handle::try_current().is_err() {
            warn!("unix backend attached outside a tokio runtime; it will not connect");
            return;
        }
        daemon
            .tasks
            .spawn(self.inner.clone().run(daemon.stop.clone()));
        let _ = self.inner.daemon.set(daemon);
    }

    fn request(&self, req: Request) -> BoxFuture<Reply> {
        let inner = self.inner.clone();
        Box::pin(async move {
            let Some(tx) = inner.sender() else {
                return Reply::error(Status::UNAVAILABLE, "backend application not connected");
            };
            let call = inner.next_call.fetch_add(1, Ordering::Relaxed);
            let (waiter, answer) = oneshot::channel();
            inner
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(call, waiter);
            let _guard = PendingGuard {
                inner: inner.clone(),
                call,
            };
            let frame = put_frame(REQUEST, |out| {
                out.put_u64(call);
                put_id(out, &req.id);
                out.put_u64(req.seq);
                out.put_slice(&req.payload);
            });
            if tx.send(frame).await.is_err() {
                return Reply::error(Status::UNAVAILABLE, "backend connection lost");
            }
            answer
                .await
                .unwrap_or_else(|_| Reply::error(Status::UNAVAILABLE, "backend connection lost"))
        })
    }

    fn report(&self, report: DeliveryReport) {
        let frame = put_frame(REPORT, |out| {
            out.put_u64(report.msg_id);
            put_id(out, &report.id);
            out.put_u8(report.outcome);
            out.put_u16(report.status.0);
            out.put_slice(&report.payload);
        });
        // Never waits (it is called under no lock, but from the session's task): a
        // report that finds no connection, or a full one, is logged; the application can
        // list what is still queued (control op `queue`).
        let sent = self.inner.sender().map(|tx| tx.try_send(frame));
        if !matches!(sent, Some(Ok(()))) {
            warn!(id = %report.id, msg_id = report.msg_id, outcome = report.outcome, "delivery report not sent: the backend application is not connected (or not reading)");
        }
    }

    fn message(&self, id: Id, payload: Bytes) -> BoxFuture<()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            match inner.sender() {
                Some(tx) => {
                    let frame = put_frame(MESSAGE, |out| {
                        put_id(out, &id);
                        out.put_slice(&payload);
                    });
                    let _ = tx.send(frame).await;
                }
                None => debug!(id = %id, "message dropped: backend application not connected"),
            }
        })
    }
}
