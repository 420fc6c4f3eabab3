//! The daemon's side of the control socket: it binds it, checks each peer, and answers
//! each request on the daemon's state.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::proto::{CloseCode, DeliveryKind, Id};
use crate::server::delivery::Outcome;
use crate::server::registry::SendKind;
use crate::server::ServerState;
use crate::store::queue::Origin;
use crate::tokens::{self, TokenError};

use super::wire::{
    parse_request, ControlRequest, ControlResponse, FleetConfirmation, MAX_LINE, SOCKET,
};

/// Binds the control socket, refusing to steal it from a running daemon.
///
/// The socket is created under umask 077, so it is never reachable by other users,
/// not even between bind and chmod; the state directory was checked not to be
/// writable by others ([`crate::secrets::check_state_dir`]), so nobody else can put
/// a socket of their own in its place. Peers are checked with `SO_PEERCRED` too.
pub fn bind(state_dir: &Path) -> std::io::Result<UnixListener> {
    let path = state_dir.join(SOCKET);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "another tallyd is running with state directory {}",
                    state_dir.display()
                ),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let listener = UnixListener::bind(&path);
    rustix::process::umask(old);
    let listener = listener?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Whether a control-socket peer may talk to the daemon: root, or tallyd's own user.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let me = rustix::process::geteuid().as_raw();
    if cred.uid() == 0 || cred.uid() == me {
        Ok(())
    } else {
        Err(format!(
            "uid {} (pid {:?}) is neither root nor tallyd's user (uid {me})",
            cred.uid(),
            cred.pid()
        ))
    }
}

/// Serves control requests until `shutdown`, then removes the socket file.
pub async fn serve(listener: UnixListener, state: Arc<ServerState>, shutdown: CancellationToken) {
    let path = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_pathname().map(Path::to_owned));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => match peer_allowed(&stream) {
                    Ok(()) => { state.tasks.spawn(handle(stream, state.clone())); }
                    Err(who) => warn!("control socket: refused a connection from {who}"),
                },
                Err(e) => { warn!(error = %e, "control socket accept failed"); tokio::time::sleep(Duration::from_millis(100)).await; }
            }
        }
    }
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

async fn handle(stream: UnixStream, state: Arc<ServerState>) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = tokio::io::BufReader::new(rd.take(MAX_LINE));
    let read = tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line)).await;
    let response = match read {
        Ok(Ok(_)) => match parse_request(&line) {
            Ok(req) => answer(req, &state).await,
            Err(refusal) => refusal,
        },
        _ => return,
    };
    let mut text = serde_json::to_string(&response).expect("serializable");
    text.push('\n');
    let _ = wr.write_all(text.as_bytes()).await;
}

async fn answer(req: ControlRequest, state: &ServerState) -> ControlResponse {
    match req {
        ControlRequest::Send {
            id,
            request,
            payload_hex,
            timeout_secs,
        } => {
            let (Ok(id), Ok(payload), Ok(timeout)) = (
                Id::new(&id),
                hex::decode(&payload_hex),
                Duration::try_from_secs_f64(timeout_secs),
            ) else {
                return ControlResponse::Error {
                    message: "invalid id, payload or timeout".into(),
                };
            };
            let kind = if request {
                SendKind::Request
            } else {
                SendKind::Message
            };
            match state
                .registry
                .send(&id, kind, payload.into(), timeout)
                .await
            {
                Ok(Some(reply)) => ControlResponse::Answer {
                    status: reply.status.0,
                    payload_hex: hex::encode(&reply.payload),
                },
                Ok(None) => ControlResponse::Sent,
                Err(e) => ControlResponse::Error {
                    message: e.to_string(),
                },
            }
        }
        ControlRequest::Enqueue {
            id,
            request,
            payload_hex,
            ttl_secs,
            wait_secs,
        } => enqueue(state, &id, request, &payload_hex, ttl_secs, wait_secs).await,
        ControlRequest::Queue { id } => match Id::new(&id) {
            Ok(id) => match state.deliveries.queue().list(&id).await {
                Ok(messages) => ControlResponse::QueueList { messages },
                Err(e) => error(e),
            },
            Err(e) => error(e),
        },
        ControlRequest::Purge { id, msg_id } => match Id::new(&id) {
            Ok(id) => match state.deliveries.purge(&id, msg_id).await {
                Ok(count) => {
                    info!(id = %id, count, "queued messages purged on the control socket");
                    ControlResponse::Purged { count }
                }
                Err(e) => error(e),
            },
            Err(e) => error(e),
        },
        ControlRequest::OpenToken { .. }
        | ControlRequest::IssueToken { .. }
        | ControlRequest::RevokeToken { .. }
        | ControlRequest::Tokens
        | ControlRequest::Identities => {
            let store = state.store.clone();
            let server_static = state.params.static_public();
            let registry = state.registry.clone();
            let done = tokio::task::spawn_blocking(move || {
                store_request(req, &store, server_static, &registry)
            })
            .await;
            match done {
                // In a fleet, who is online is the fleet's: a session on another node too.
                Ok(Ok(ControlResponse::Identities { identities, .. })) if state.fleet.is_some() => {
                    let fleet = state.fleet.as_ref().expect("a fleet");
                    match fleet.sessions().await {
                        Ok(sessions) => ControlResponse::Identities {
                            identities,
                            sessions,
                        },
                        Err(e) => ControlResponse::Error {
                            message: e.to_string(),
                        },
                    }
                }
                // The open token: and whether it enrolls here now.
                Ok(Ok(ControlResponse::Token {
                    token,
                    expires: None,
                    ..
                })) => ControlResponse::Token {
                    token,
                    expires: None,
                    replaced: false,
                    open: Some(state.open_enrollment()),
                },
                Ok(Ok(response)) => response,
                Ok(Err(e)) => ControlResponse::Error {
                    message: e.to_string(),
                },
                Err(e) => ControlResponse::Error {
                    message: format!("failed: {e}"),
                },
            }
        }
        ControlRequest::OpenEnrollment { set } => open_enrollment(state, set).await,
        ControlRequest::Revoke { id } => invalidate(state, &id, true).await,
        ControlRequest::Remove { id } => invalidate(state, &id, false).await,
        ControlRequest::Status => ControlResponse::Status {
            status: Box::new(crate::server::status::status(state).await),
        },
        ControlRequest::Sessions => match &state.fleet {
            None => ControlResponse::Sessions {
                sessions: state.registry.list(),
            },
            Some(fleet) => match fleet.sessions().await {
                Ok(sessions) => ControlResponse::Sessions { sessions },
                Err(e) => ControlResponse::Error {
                    message: e.to_string(),
                },
            },
        },
        ControlRequest::Close { id, code } => match Id::new(&id) {
            Ok(id) => {
                let code = CloseCode(code);
                let reason = if code == CloseCode::REVOKED {
                    "identity revoked"
                } else {
                    "closed by the operator"
                };
                let was_live = state.registry.close(&id, code, reason);
                info!(id = %id, code = %code, was_live, "close requested on the control socket");
                ControlResponse::Closed { was_live }
            }
            Err(e) => ControlResponse::Error {
                message: e.to_string(),
            },
        },
    }
}

/// `tallyd open-enrollment`: a fleet-wide setting, in the fleet's log.
async fn open_enrollment(state: &ServerState, set: Option<bool>) -> ControlResponse {
    let fleet = state.fleet.is_some();
    if let Some(open) = set {
        if !fleet {
            return ControlResponse::Error {
                message: "this tallyd is not one of a fleet: its open enrollment is `open_enrollment` in its configuration file (restart it to apply a change)".into(),
            };
        }
        let store = state.store.clone();
        let done = tokio::task::spawn_blocking(move || {
            store.set_fleet_setting(crate::server::OPEN_ENROLLMENT, i64::from(open))
        })
        .await;
        match done {
            Ok(Ok(())) => {
                info!(
                    open,
                    "open enrollment set for the whole fleet on the control socket"
                );
                // This node's record of the log includes the entry before it answers.
                if let Some(fleet) = &state.fleet {
                    if let Err(e) = fleet.record_log().await {
                        return ControlResponse::Error {
                            message: format!("set in the fleet's log, but {e}"),
                        };
                    }
                }
            }
            Ok(Err(e)) => {
                return ControlResponse::Error {
                    message: e.to_string(),
                }
            }
            Err(e) => {
                return ControlResponse::Error {
                    message: format!("failed: {e}"),
                }
            }
        }
    }
    ControlResponse::OpenEnrollment {
        open: state.open_enrollment(),
        fleet,
    }
}

/// The requests that read or change the store's tokens and identities, with the same
/// rules as an admin command on a stopped daemon's directory (`crate::admin`).
fn store_request(
    req: ControlRequest,
    store: &crate::store::Store,
    server_static: [u8; 32],
    registry: &crate::server::registry::Registry,
) -> Result<ControlResponse, TokenError> {
    Ok(match req {
        ControlRequest::OpenToken { rotate } => {
            let token = tokens::open_token_in(store, server_static, rotate)?;
            if rotate {
                info!("open enrollment key rotated on the control socket: earlier open tokens no longer enroll");
            }
            ControlResponse::Token {
                token: token.to_string(),
                expires: None,
                replaced: false,
                open: None,
            }
        }
        ControlRequest::IssueToken { id, lifetime_secs } => {
            let lifetime = Duration::from_secs(lifetime_secs);
            let issued = tokens::issue_token_in(store, server_static, &id, lifetime)?;
            info!(id = %id, expires = issued.expires, "token issued on the control socket");
            ControlResponse::Token {
                token: issued.token.to_string(),
                expires: Some(issued.expires),
                replaced: issued.replaced,
                open: None,
            }
        }
        ControlRequest::RevokeToken { id } => {
            let id = Id::new(&id)?;
            let existed = store.revoke_token(id.as_str())?;
            info!(id = %id, existed, "token revoked on the control socket");
            ControlResponse::TokenRevoked { existed }
        }
        ControlRequest::Tokens => ControlResponse::Tokens {
            tokens: store.tokens()?,
        },
        ControlRequest::Identities => ControlResponse::Identities {
            identities: store.list()?,
            sessions: registry.list(),
        },
        other => unreachable!("not a store request: {other:?}"),
    })
}

fn error(e: impl std::fmt::Display) -> ControlResponse {
    ControlResponse::Error {
        message: e.to_string(),
    }
}

/// `Enqueue`: stores the message, then answers its id, or (with a wait) its outcome.
async fn enqueue(
    state: &ServerState,
    id: &str,
    request: bool,
    payload_hex: &str,
    ttl_secs: Option<f64>,
    wait_secs: Option<f64>,
) -> ControlResponse {
    let d = &state.deliveries;
    // A TTL of 0 is the default, as in the backend's QUEUE.
    let ttl_secs = ttl_secs.filter(|t| *t > 0.0);
    let secs = |s: Option<f64>| s.map(Duration::try_from_secs_f64).transpose();
    let (Ok(id), Ok(payload), Ok(ttl), Ok(wait)) = (
        Id::new(id),
        hex::decode(payload_hex),
        secs(ttl_secs),
        secs(wait_secs),
    ) else {
        return error("invalid id, payload, TTL or wait");
    };
    let kind = if request {
        DeliveryKind::Request
    } else {
        DeliveryKind::Message
    };
    let limits = state.limits();
    let queued = match d
        .enqueue(
            &state.registry,
            &limits,
            id.clone(),
            kind,
            payload.into(),
            ttl,
            Origin::Control,
        )
        .await
    {
        Ok(q) => q,
        Err(e) => return error(e),
    };
    let msg_id = queued.msg_id;
    let Some(wait) = wait else {
        return ControlResponse::Queued { msg_id };
    };
    match tokio::time::timeout(wait, queued.outcome).await {
        Ok(Ok(outcome)) => delivered(msg_id, outcome),
        // No outcome yet: it stays queued.
        _ => ControlResponse::Queued { msg_id },
    }
}

fn delivered(msg_id: u64, outcome: Outcome) -> ControlResponse {
    let word = outcome.as_str().to_owned();
    let (status, payload_hex, reason) = match outcome {
        Outcome::Acknowledged { status, payload } => {
            (Some(status.0), Some(hex::encode(&payload)), None)
        }
        Outcome::Undeliverable(why) => (None, None, Some(why)),
        Outcome::Expired | Outcome::Unconfirmed | Outcome::Purged => (None, None, None),
    };
    ControlResponse::Delivered {
        msg_id,
        outcome: word,
        status,
        payload_hex,
        reason,
    }
}

/// Revokes (`revoke`) or removes an identity: the store first, then the registry, so
/// that a handshake whose key lookup raced with the store change is refused at
/// registration (spec 7.3), and the live session gets CLOSE `REVOKED` or `REMOVED`.
async fn invalidate(state: &ServerState, id: &str, revoke: bool) -> ControlResponse {
    let id = match Id::new(id) {
        Ok(id) => id,
        Err(e) => {
            return ControlResponse::Error {
                message: e.to_string(),
            }
        }
    };
    // In a fleet the session may be on another node: it is closed there when that node
    // hears of the change (`tally_identity`), within a second.
    let live_elsewhere = match &state.fleet {
        Some(fleet) => fleet.is_live(&id).await.unwrap_or(false),
        None => false,
    };
    // The enrollment whose queue is withdrawn once the store changed (a message queued
    // until then is its too; after, none is accepted).
    let generation = state
        .deliveries
        .queue()
        .generation(&id)
        .await
        .unwrap_or(None);
    let store = state.store.clone();
    let name = id.to_string();
    let done = tokio::task::spawn_blocking(move || {
        if revoke {
            store.revoke(&name)
        } else {
            store.remove(&name)
        }
    })
    .await;
    let changed = match done
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    {
        Ok(changed) => changed,
        Err(message) => return ControlResponse::Error { message },
    };
    // In a fleet, this node's record of the log (its state directory) includes the
    // entry before the operator hears "revoked": a restart cannot forget it.
    if let Some(fleet) = &state.fleet {
        if let Err(e) = fleet.record_log().await {
            return ControlResponse::Error {
                message: format!(
                    "{reason_word} in the fleet's log, but {e}",
                    reason_word = if revoke { "revoked" } else { "removed" }
                ),
            };
        }
    }
    let reason = if revoke {
        "identity revoked"
    } else {
        "identity removed"
    };
    let code = if revoke {
        CloseCode::REVOKED
    } else {
        CloseCode::REMOVED
    };
    let was_live = state.registry.invalidate(&id, code, reason) || live_elsewhere;
    // Its queued messages are withdrawn, their senders told (a crash before this leaves
    // them to the sweep, which does the same).
    if let Some(generation) = generation {
        if let Err(e) = state
            .deliveries
            .purge_generation(&id, generation, None)
            .await
        {
            warn!(id = %id, "withdrawing the queue of a revoked or removed identity (the sweep will): {e}");
        }
    }
    info!(id = %id, was_live, "{reason} on the control socket");
    // In a fleet, every node must have read the entry: they say so in their heartbeats
    // (within a second or two). One that cannot read it fences itself.
    let fleet = match &state.fleet {
        Some(fleet) => {
            let seq = state.store.fleet_log_seen().0;
            let (nodes, missing) = fleet.confirmations(seq, Duration::from_secs(4)).await;
            if !missing.is_empty() {
                warn!(id = %id, missing = %missing.join(", "), "{reason}: not confirmed by every node of the fleet yet");
            }
            Some(FleetConfirmation { nodes, missing })
        }
        None => None,
    };
    if revoke {
        ControlResponse::Revoked {
            newly: changed,
            was_live,
            fleet,
        }
    } else {
        ControlResponse::Removed {
            existed: changed,
            was_live,
            fleet,
        }
    }
}
