//! Enrollment tokens made from the store: what the daemon does when asked on its control
//! socket and what the admin commands do on a stopped daemon's directory (one
//! implementation for both; `crate::admin` and `crate::control` each use it).

use std::time::Duration;

use zeroize::Zeroizing;

use crate::proto::credential::EnrollmentToken;
use crate::proto::frame::EnrollMode;
use crate::proto::Id;
use crate::store::Store;

/// Making a token failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The id is invalid (the message says so: "invalid identity: ...").
    #[error(transparent)]
    Id(#[from] crate::proto::FrameError),
    /// An argument is out of range, or the id is taken.
    #[error("{0}")]
    Invalid(String),
}

/// The open token (`tallyd token --open`) of an open store, with the server's public key (what the daemon does
/// when asked on its control socket; in-process tests use it too).
pub fn open_token_in(
    store: &Store,
    server_static: [u8; 32],
    rotate: bool,
) -> Result<Zeroizing<String>, TokenError> {
    let credential = if rotate {
        store.rotate_open_key()?
    } else {
        store.open_key()?
    };
    Ok(EnrollmentToken {
        mode: EnrollMode::Open,
        credential,
        server_static,
    }
    .encode())
}

/// Default lifetime of a per-identity token.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(3 * 86_400);
/// Longest lifetime of a per-identity token.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 86_400);

/// A per-identity token just issued.
pub struct IssuedToken {
    /// The token text (a secret).
    pub token: Zeroizing<String>,
    /// When it expires (seconds since the Unix epoch).
    pub expires: i64,
    /// It replaced a token issued for the id before (which no longer works).
    pub replaced: bool,
}

pub fn check_lifetime(lifetime: Duration) -> Result<(), TokenError> {
    if lifetime.as_secs() == 0 || lifetime > MAX_TOKEN_LIFETIME {
        return Err(TokenError::Invalid(format!(
            "a token's lifetime must be at least 1 s and at most {} days",
            MAX_TOKEN_LIFETIME.as_secs() / 86_400
        )));
    }
    Ok(())
}

/// A per-identity token (`tallyd token ID`) from an open store, with the server's public key.
pub fn issue_token_in(
    store: &Store,
    server_static: [u8; 32],
    id: &str,
    lifetime: Duration,
) -> Result<IssuedToken, TokenError> {
    let id = Id::new(id)?;
    check_lifetime(lifetime)?;
    let expires = crate::store::now() + lifetime.as_secs() as i64;
    let replaced = store.tokens()?.iter().any(|t| t.id == id.as_str());
    let credential = match store.issue_token(&id, expires) {
        Err(crate::store::StoreError::Taken(_)) => {
            return Err(TokenError::Invalid(format!(
                "{id} is enrolled; a token can only enroll a free id (`tallyd remove {id}` first, to replace the device)"
            )))
        }
        r => r?,
    };
    Ok(IssuedToken {
        token: EnrollmentToken {
            mode: EnrollMode::Token,
            credential,
            server_static,
        }
        .encode(),
        expires,
        replaced,
    })
}
