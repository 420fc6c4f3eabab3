//! Operator commands of `tallyd` that work whether or not the daemon runs: they use the
//! state directory's keys and store directly, and the control socket to reach a
//! running daemon.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

use zeroize::Zeroizing;

use crate::control::{self, ControlError, ControlRequest, ControlResponse};
use crate::proto::credential::EnrollmentToken;
use crate::proto::frame::EnrollMode;
use crate::proto::{schedule, CloseCode, Id};
use crate::secrets::ServerSecrets;
use crate::store::{Store, DB_FILE};

/// An admin command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Keys could not be loaded.
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The id is invalid.
    #[error("invalid identity: {0}")]
    Id(#[from] crate::proto::FrameError),
    /// The daemon could not be reached or answered an error.
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// Loads the keys of an initialised state directory.
fn secrets(state_dir: &Path, creds: Option<&Path>) -> Result<ServerSecrets, AdminError> {
    Ok(ServerSecrets::load(state_dir, creds, false)?)
}

/// Creates the state directory, keys and store if missing. Returns whether keys were created.
pub fn init(state_dir: &Path, creds: Option<&Path>) -> Result<bool, AdminError> {
    let s = ServerSecrets::load(state_dir, creds, true)?;
    Store::open(&state_dir.join(DB_FILE), s.store_key.clone())?;
    Ok(s.created)
}

/// The open enrollment token, or the per-identity token of `id`.
pub fn token(
    state_dir: &Path,
    creds: Option<&Path>,
    id: Option<&str>,
) -> Result<Zeroizing<String>, AdminError> {
    let s = secrets(state_dir, creds)?;
    let server_static = s.enroll_params(true).static_public();
    let token = match id {
        None => EnrollmentToken {
            mode: EnrollMode::Open,
            credential: s.enrollment_key.clone(),
            server_static,
        },
        Some(id) => {
            let id = Id::new(id)?;
            EnrollmentToken {
                mode: EnrollMode::Token,
                credential: schedule::token(&s.enrollment_key, &id),
                server_static,
            }
        }
    };
    Ok(token.encode())
}

fn time(t: Option<i64>) -> String {
    match t {
        None => "-".into(),
        Some(secs) => {
            let days = secs.div_euclid(86_400);
            let rem = secs.rem_euclid(86_400);
            let (y, m, d) = civil_from_days(days);
            format!(
                "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
                rem / 3600,
                rem % 3600 / 60,
                rem % 60
            )
        }
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The identity table: id, mode, created, last seen, revoked, online (UTC times).
pub fn identities(state_dir: &Path, creds: Option<&Path>) -> Result<String, AdminError> {
    let s = secrets(state_dir, creds)?;
    let rows = Store::open(&state_dir.join(DB_FILE), s.store_key.clone())?.list()?;
    let online: Option<HashMap<String, String>> =
        match control::call(state_dir, &ControlRequest::Sessions) {
            Ok(ControlResponse::Sessions { sessions }) => {
                Some(sessions.into_iter().map(|s| (s.id, s.peer)).collect())
            }
            _ => None,
        };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<6} {:<20} {:<20} {:<20} ONLINE",
        "ID", "MODE", "CREATED", "LAST SEEN", "REVOKED"
    );
    for r in &rows {
        let on = match &online {
            None => "?".to_owned(),
            Some(map) => map
                .get(&r.id)
                .map_or("no".to_owned(), |peer| format!("yes ({peer})")),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<6} {:<20} {:<20} {:<20} {on}",
            r.id,
            r.mode,
            time(Some(r.created)),
            time(r.last_seen),
            time(r.revoked)
        );
    }
    if online.is_none() {
        out.push_str("(ONLINE is ? because tallyd is not running)\n");
    }
    Ok(out)
}

/// The live sessions table: id, peer, since, frames in and out.
pub fn sessions(state_dir: &Path) -> Result<String, AdminError> {
    let sessions = match control::call(state_dir, &ControlRequest::Sessions)? {
        ControlResponse::Sessions { sessions } => sessions,
        other => return Err(unexpected(state_dir, other)),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<22} {:<20} {:>10} {:>10}",
        "ID", "PEER", "SINCE", "FRAMES IN", "FRAMES OUT"
    );
    for s in sessions {
        let since = time(Some(s.since as i64));
        let _ = writeln!(
            out,
            "{:<24} {:<22} {:<20} {:>10} {:>10}",
            s.id, s.peer, since, s.frames_in, s.frames_out
        );
    }
    Ok(out)
}

fn unexpected(state_dir: &Path, got: ControlResponse) -> AdminError {
    let message = match got {
        ControlResponse::Error { message } => message,
        other => format!("unexpected answer {other:?}"),
    };
    ControlError::Failed {
        path: state_dir.join(control::SOCKET),
        message,
    }
    .into()
}

/// Sends a REQUEST (returning the device's status and payload) or a MESSAGE to a
/// connected device through the running daemon.
pub fn send(
    state_dir: &Path,
    id: &str,
    request: bool,
    payload: &[u8],
    timeout: std::time::Duration,
) -> Result<Option<(crate::proto::Status, Vec<u8>)>, AdminError> {
    let id = Id::new(id)?;
    let req = ControlRequest::Send {
        id: id.to_string(),
        request,
        payload_hex: hex::encode(payload),
        timeout_secs: timeout.as_secs_f64(),
    };
    match control::call(state_dir, &req)? {
        ControlResponse::Answer {
            status,
            payload_hex,
        } => {
            let payload = hex::decode(payload_hex).map_err(|e| {
                unexpected(
                    state_dir,
                    ControlResponse::Error {
                        message: e.to_string(),
                    },
                )
            })?;
            Ok(Some((crate::proto::Status(status), payload)))
        }
        ControlResponse::Sent => Ok(None),
        other => Err(unexpected(state_dir, other)),
    }
}

/// What `revoke` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Revoked {
    /// False if the identity was already revoked.
    pub newly: bool,
    /// Whether a live session was closed; `None` if the daemon is not running.
    pub session_closed: Option<bool>,
}

/// Deletes `id` from the store (it can then be enrolled again), then closes its live
/// session through the daemon. Returns (whether it existed, whether a session was closed;
/// `None` if the daemon is not running).
pub fn remove(
    state_dir: &Path,
    creds: Option<&Path>,
    id: &str,
) -> Result<(bool, Option<bool>), AdminError> {
    let id = Id::new(id)?;
    let s = secrets(state_dir, creds)?;
    let existed =
        Store::open(&state_dir.join(DB_FILE), s.store_key.clone())?.remove(id.as_str())?;
    Ok((existed, close_live(state_dir, &id)?))
}

/// Asks the running daemon to close `id`'s session with CLOSE REVOKED.
fn close_live(state_dir: &Path, id: &Id) -> Result<Option<bool>, AdminError> {
    let req = ControlRequest::Close {
        id: id.to_string(),
        code: CloseCode::REVOKED.0,
    };
    match control::call(state_dir, &req) {
        Ok(ControlResponse::Closed { was_live }) => Ok(Some(was_live)),
        Ok(other) => Err(unexpected(state_dir, other)),
        Err(ControlError::NotRunning(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Revokes `id` in the store, then closes its live session through the daemon.
pub fn revoke(state_dir: &Path, creds: Option<&Path>, id: &str) -> Result<Revoked, AdminError> {
    let id = Id::new(id)?;
    let s = secrets(state_dir, creds)?;
    let newly = Store::open(&state_dir.join(DB_FILE), s.store_key.clone())?.revoke(id.as_str())?;
    let req = ControlRequest::Close {
        id: id.to_string(),
        code: CloseCode::REVOKED.0,
    };
    let session_closed = match control::call(state_dir, &req) {
        Ok(ControlResponse::Closed { was_live }) => Some(was_live),
        Ok(other) => {
            return Err(ControlError::Failed {
                path: state_dir.join(control::SOCKET),
                message: format!("{other:?}"),
            }
            .into())
        }
        Err(ControlError::NotRunning(_)) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(Revoked {
        newly,
        session_closed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_as_utc() {
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00");
        assert_eq!(time(Some(951_782_400)), "2000-02-29 00:00:00");
        assert_eq!(time(Some(1_795_000_000)), "2026-11-18 11:06:40");
        assert_eq!(time(None), "-");
    }

    #[test]
    fn tokens_from_the_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(init(dir.path(), None).unwrap());
        assert!(!init(dir.path(), None).unwrap());
        let open = EnrollmentToken::parse(&token(dir.path(), None, None).unwrap()).unwrap();
        let per = EnrollmentToken::parse(&token(dir.path(), None, Some("dev-1")).unwrap()).unwrap();
        assert_eq!(open.mode, EnrollMode::Open);
        assert_eq!(per.mode, EnrollMode::Token);
        assert_eq!(open.server_static, per.server_static);
        assert!(!open.credential.ct_eq(&per.credential));
        assert!(token(dir.path(), None, Some("bad id")).is_err());
    }
}
