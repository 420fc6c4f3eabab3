//! The session handshake (spec section 7): one round trip before the first request.
//!
//! ```text
//! client                                  server
//! HELLO(version, id, nc)         ─────▶   looks up k for id (or a filler key)
//!                                ◀─────   SERVER_AUTH(ns, HMAC(K_sf, th2))
//! CLIENT_FINISH(HMAC(K_cf, th3)) ─────▶   verifies; only now may it take over
//! REQUEST ...                    ─────▶   the identity's previous session
//! ```
//!
//! Each state is its own type and each transition consumes it. The server's
//! [`Established`] carries a [`FinishVerified`] that only
//! [`ServerAwaitFinish::handle_finish`] can make, so code that replaces an identity's
//! live session can demand proof that the newcomer's finish tag verified.

use core::time::Duration;

use bytes::BytesMut;

use super::codec::put_header;
use super::error::{ProtocolError, TagKind};
use super::frame::{signed_part, ErrorFrame, FrameType, Hello, Id, ServerAuth, TagOnly};
use super::schedule::{hmac, verify, SecretKey, SessionKeys, Transcript};
use super::session::{Role, Session};
use super::{NONCE_LEN, TAG_LEN};

/// What the server announces in SERVER_AUTH (spec 4.3, 8.5): the client sends no
/// session frame longer than `max_frame_len` and sends something at least every
/// `keepalive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// The largest session frame `length` the server accepts.
    pub max_frame_len: u32,
    /// The server closes a session it heard nothing from for 1.5 times this.
    pub keepalive: Duration,
}

impl ServerLimits {
    fn keepalive_ms(&self) -> u32 {
        let ms = u32::try_from(self.keepalive.as_millis()).unwrap_or(u32::MAX);
        ms.clamp(super::MIN_KEEPALIVE_MS, super::MAX_KEEPALIVE_MS)
    }

    fn frame_len(&self) -> u32 {
        announceable(self.max_frame_len)
    }
}

/// A session frame limit brought into the range HELLO and SERVER_AUTH may announce
/// (spec 4.3): a peer refuses anything outside it as `malformed`.
fn announceable(max_frame_len: u32) -> u32 {
    max_frame_len.clamp(super::MIN_SESSION_FRAME_LEN, super::MAX_FRAME_LEN_CEILING)
}

/// Client: HELLO was sent; waiting for SERVER_AUTH.
pub struct ClientAwaitAuth {
    key: SecretKey,
    nonce: [u8; NONCE_LEN],
    transcript: Transcript,
}

impl ClientAwaitAuth {
    /// Writes HELLO for `id` with the client nonce `nc` (32 random bytes) to `out`.
    ///
    /// `max_frame_len` is the largest session frame `length` this client accepts; HELLO
    /// announces it (clamped to 256..=16 MiB) and the server sends nothing longer.
    pub fn start(
        id: &Id,
        key: SecretKey,
        nc: [u8; NONCE_LEN],
        max_frame_len: u32,
        out: &mut BytesMut,
    ) -> Self {
        let start = out.len();
        Hello {
            id: id.clone(),
            nonce: nc,
            max_frame_len: announceable(max_frame_len),
        }
        .encode(out);
        let mut transcript = Transcript::default();
        transcript.update(&out[start..]);
        ClientAwaitAuth {
            key,
            nonce: nc,
            transcript,
        }
    }

    /// Checks SERVER_AUTH, writes CLIENT_FINISH to `out` and returns the session with
    /// the limits the server announced. The session sends no frame longer than the
    /// server's limit; the caller adopts the server's keepalive (spec 8.5).
    pub fn handle_server_auth(
        mut self,
        frame: &[u8],
        out: &mut BytesMut,
    ) -> Result<(Session, ServerLimits), ProtocolError> {
        if let Some(code) = ErrorFrame::code_if_error(frame) {
            return Err(ProtocolError::Refused(code));
        }
        let auth = ServerAuth::decode(frame)?;
        self.transcript.update(signed_part(frame));
        let th2 = self.transcript.hash();
        let keys = SessionKeys::derive(&self.key, &self.nonce, &auth.nonce, &th2);
        // Spec 7.1: the server proves it holds k; the tag covers the limits too.
        if !verify(keys.server_finish.expose(), &[&th2], &auth.tag) {
            return Err(ProtocolError::BadTag(TagKind::ServerAuth));
        }
        self.transcript.update(&auth.tag);
        let start = out.len();
        put_header(out, 1 + TAG_LEN, FrameType::ClientFinish as u8);
        self.transcript.update(&out[start..]);
        let tag = hmac(keys.client_finish.expose(), &[&self.transcript.hash()]);
        out.extend_from_slice(&tag);
        let limits = ServerLimits {
            max_frame_len: auth.max_frame_len,
            keepalive: Duration::from_millis(auth.keepalive_ms.into()),
        };
        Ok((
            Session::new(Role::Client, &keys, auth.max_frame_len),
            limits,
        ))
    }
}

/// Server: a parsed HELLO, waiting for the caller to look up the identity's key.
pub struct HelloReceived {
    hello: Hello,
    transcript: Transcript,
}

impl HelloReceived {
    /// Parses HELLO, the first frame of a session handshake.
    pub fn parse(frame: &[u8]) -> Result<Self, ProtocolError> {
        let hello = Hello::decode(frame)?;
        let mut transcript = Transcript::default();
        transcript.update(frame);
        Ok(HelloReceived { hello, transcript })
    }

    /// The identity the client claims (not yet authenticated).
    pub fn id(&self) -> &Id {
        &self.hello.id
    }

    /// The largest session frame the client accepts (not yet authenticated: it is
    /// covered by both tags, so it is known to be the client's only after
    /// CLIENT_FINISH verified).
    pub fn client_max_frame_len(&self) -> u32 {
        self.hello.max_frame_len
    }

    /// Writes SERVER_AUTH with the server nonce `ns` and the server's `limits`.
    ///
    /// `key` is the identity's key, or `None` if the identity is unknown or revoked. In
    /// that case `filler` (a random key from the caller) takes its place, so the reply
    /// and the work are the same as for a known identity, and the handshake fails at
    /// CLIENT_FINISH exactly as it does for a wrong key (spec 7.5).
    pub fn respond(
        self,
        key: Option<SecretKey>,
        filler: SecretKey,
        ns: [u8; NONCE_LEN],
        limits: ServerLimits,
        out: &mut BytesMut,
    ) -> ServerAwaitFinish {
        let known = key.is_some();
        let key = key.unwrap_or(filler);
        let HelloReceived {
            hello,
            mut transcript,
        } = self;
        let start = out.len();
        let mut auth = ServerAuth {
            nonce: ns,
            max_frame_len: limits.frame_len(),
            keepalive_ms: limits.keepalive_ms(),
            tag: [0; TAG_LEN],
        };
        auth.encode_unsigned(out);
        transcript.update(&out[start..]);
        let th2 = transcript.hash();
        let keys = SessionKeys::derive(&key, &hello.nonce, &ns, &th2);
        auth.tag = hmac(keys.server_finish.expose(), &[&th2]);
        out.extend_from_slice(&auth.tag);
        transcript.update(&auth.tag);
        ServerAwaitFinish {
            id: hello.id,
            client_max_frame_len: hello.max_frame_len,
            known,
            keys,
            transcript,
        }
    }
}

/// Server: SERVER_AUTH was sent; waiting for CLIENT_FINISH.
pub struct ServerAwaitFinish {
    id: Id,
    client_max_frame_len: u32,
    known: bool,
    keys: SessionKeys,
    transcript: Transcript,
}

/// Proof that a CLIENT_FINISH tag verified. Only [`ServerAwaitFinish::handle_finish`]
/// can make one.
#[derive(Debug)]
pub struct FinishVerified(());

/// A server-side session whose client proved it holds the identity's key.
#[derive(Debug)]
pub struct Established {
    /// The authenticated identity.
    pub id: Id,
    /// The session, ready for frames (the client may already have sent some). It sends
    /// no frame longer than the limit the client announced in HELLO.
    pub session: Session,
    /// Proof the finish tag verified: required to take over a previous session.
    pub verified: FinishVerified,
}

impl ServerAwaitFinish {
    /// The identity the client claims (not yet authenticated).
    pub fn id(&self) -> &Id {
        &self.id
    }

    /// Verifies CLIENT_FINISH. Unknown identity, revoked identity and wrong key all
    /// fail here, with the same error, after the same work.
    pub fn handle_finish(mut self, frame: &[u8]) -> Result<Established, ProtocolError> {
        let finish = TagOnly::decode(frame, FrameType::ClientFinish, "CLIENT_FINISH")?;
        self.transcript.update(signed_part(frame));
        let ok = verify(
            self.keys.client_finish.expose(),
            &[&self.transcript.hash()],
            &finish.0,
        );
        if !(ok & self.known) {
            return Err(ProtocolError::BadTag(TagKind::ClientFinish));
        }
        Ok(Established {
            id: self.id,
            session: Session::new(Role::Server, &self.keys, self.client_max_frame_len),
            verified: FinishVerified(()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Body, ErrorCode, FrameError};
    use bytes::Bytes;

    const LIMITS: ServerLimits = ServerLimits {
        max_frame_len: 65536,
        keepalive: Duration::from_secs(30),
    };

    fn id() -> Id {
        Id::new("dev-1").unwrap()
    }

    fn key(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    /// Runs a handshake; returns the outcome at the server and the client's session.
    fn run(
        client_key: u8,
        server_key: Option<u8>,
    ) -> (
        Result<Established, ProtocolError>,
        Result<Session, ProtocolError>,
    ) {
        let mut hello = BytesMut::new();
        let client = ClientAwaitAuth::start(&id(), key(client_key), [1; 32], 4096, &mut hello);
        let received = HelloReceived::parse(&hello).unwrap();
        assert_eq!(received.id(), &id());
        let mut auth = BytesMut::new();
        let server = received.respond(server_key.map(key), key(0xee), [2; 32], LIMITS, &mut auth);
        let mut finish = BytesMut::new();
        let session = client
            .handle_server_auth(&auth, &mut finish)
            .map(|(session, limits)| {
                assert_eq!(limits, LIMITS);
                session
            });
        if session.is_err() {
            // A client that refuses SERVER_AUTH sends nothing; forge a finish to see the server's side.
            finish = BytesMut::from(&[0, 0, 0, 33, 0x12][..]);
            finish.extend_from_slice(&[0; 32]);
        }
        (server.handle_finish(&finish), session)
    }

    #[test]
    fn both_sides_agree_and_exchange_frames() {
        let (server, client) = run(7, Some(7));
        let mut server = server.unwrap().session;
        let mut client = client.unwrap();
        let mut out = BytesMut::new();
        client
            .seal(
                &Body::Message {
                    payload: Bytes::from_static(b"m"),
                },
                &mut out,
            )
            .unwrap();
        assert_eq!(server.open(out.split().freeze()).unwrap().seq, 1);
        server.seal(&Body::Ping, &mut out).unwrap();
        assert_eq!(client.open(out.split().freeze()).unwrap().body, Body::Ping);
    }

    #[test]
    fn wrong_key_fails_at_client_and_server() {
        let (server, client) = run(7, Some(8));
        assert_eq!(
            client.err(),
            Some(ProtocolError::BadTag(TagKind::ServerAuth))
        );
        assert_eq!(
            server.err(),
            Some(ProtocolError::BadTag(TagKind::ClientFinish))
        );
    }

    #[test]
    fn unknown_identity_fails_like_a_wrong_key() {
        let (server, client) = run(7, None);
        assert_eq!(
            client.err(),
            Some(ProtocolError::BadTag(TagKind::ServerAuth))
        );
        assert_eq!(server.err().unwrap().error_code(), ErrorCode::AUTH_FAILED);
    }

    #[test]
    fn unknown_identity_fails_even_if_filler_equals_the_key() {
        // The filler is random in practice; even a filler equal to the client's key
        // must not authenticate an identity the server does not know.
        let mut hello = BytesMut::new();
        let client = ClientAwaitAuth::start(&id(), key(0xee), [1; 32], 4096, &mut hello);
        let mut auth = BytesMut::new();
        let server = HelloReceived::parse(&hello).unwrap().respond(
            None,
            key(0xee),
            [2; 32],
            LIMITS,
            &mut auth,
        );
        let mut finish = BytesMut::new();
        client.handle_server_auth(&auth, &mut finish).unwrap();
        assert_eq!(
            server.handle_finish(&finish).err(),
            Some(ProtocolError::BadTag(TagKind::ClientFinish))
        );
    }

    #[test]
    fn client_finish_replayed_as_server_auth_is_refused() {
        // Reflection: the client's finish tag does not verify as a server tag, and
        // a server's tag does not verify as a finish (different keys, spec 5.5).
        let mut hello = BytesMut::new();
        let client = ClientAwaitAuth::start(&id(), key(7), [1; 32], 4096, &mut hello);
        let mut auth = BytesMut::new();
        let server = HelloReceived::parse(&hello).unwrap().respond(
            Some(key(7)),
            key(0),
            [2; 32],
            LIMITS,
            &mut auth,
        );
        let mut forged = BytesMut::from(&[0, 0, 0, 33, 0x12][..]);
        forged.extend_from_slice(&auth[auth.len() - 32..]);
        assert!(server.handle_finish(&forged).is_err());
        drop(client);
    }

    #[test]
    fn error_reply_is_reported() {
        let mut hello = BytesMut::new();
        let client = ClientAwaitAuth::start(&id(), key(7), [1; 32], 4096, &mut hello);
        let mut err = BytesMut::new();
        ErrorFrame::new(ErrorCode::BUSY).encode(&mut err);
        assert_eq!(
            client.handle_server_auth(&err, &mut BytesMut::new()).err(),
            Some(ProtocolError::Refused(ErrorCode::BUSY))
        );
    }

    #[test]
    fn hello_with_other_version_is_refused_with_that_code() {
        let mut hello = BytesMut::new();
        ClientAwaitAuth::start(&id(), key(7), [1; 32], 4096, &mut hello);
        hello[5] = 2;
        let err = HelloReceived::parse(&hello).err().unwrap();
        assert_eq!(err, ProtocolError::Frame(FrameError::UnsupportedVersion(2)));
        assert_eq!(err.error_code(), ErrorCode::UNSUPPORTED_VERSION);
    }
}
