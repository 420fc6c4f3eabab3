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

use bytes::BytesMut;

use super::codec::put_header;
use super::error::{ProtocolError, TagKind};
use super::frame::{signed_part, ErrorFrame, FrameType, Hello, Id, TagOnly, ValueAndTag};
use super::schedule::{hmac, verify, SecretKey, SessionKeys, Transcript};
use super::session::{Role, Session};
use super::{NONCE_LEN, TAG_LEN};

/// Client: HELLO was sent; waiting for SERVER_AUTH.
pub struct ClientAwaitAuth {
    key: SecretKey,
    nonce: [u8; NONCE_LEN],
    transcript: Transcript,
}

impl ClientAwaitAuth {
    /// Writes HELLO for `id` with the client nonce `nc` (32 random bytes) to `out`.
    pub fn start(id: &Id, key: SecretKey, nc: [u8; NONCE_LEN], out: &mut BytesMut) -> Self {
        let start = out.len();
        Hello {
            id: id.clone(),
            nonce: nc,
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

    /// Checks SERVER_AUTH, writes CLIENT_FINISH to `out` and returns the session.
    ///
    /// `max_frame_len` is the largest length field the session will send.
    pub fn handle_server_auth(
        mut self,
        frame: &[u8],
        out: &mut BytesMut,
        max_frame_len: u32,
    ) -> Result<Session, ProtocolError> {
        if let Some(code) = ErrorFrame::code_if_error(frame) {
            return Err(ProtocolError::Refused(code));
        }
        let auth = ValueAndTag::decode(frame, FrameType::ServerAuth, "SERVER_AUTH")?;
        self.transcript.update(signed_part(frame));
        let th2 = self.transcript.hash();
        let keys = SessionKeys::derive(&self.key, &self.nonce, &auth.value, &th2);
        // Spec 7.3: the server proves it holds k.
        if !verify(keys.server_finish.expose(), &[&th2], &auth.tag) {
            return Err(ProtocolError::BadTag(TagKind::ServerAuth));
        }
        self.transcript.update(&auth.tag);
        let start = out.len();
        put_header(out, 1 + TAG_LEN, FrameType::ClientFinish as u8);
        self.transcript.update(&out[start..]);
        let tag = hmac(keys.client_finish.expose(), &[&self.transcript.hash()]);
        out.extend_from_slice(&tag);
        Ok(Session::new(Role::Client, &keys, max_frame_len))
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

    /// Writes SERVER_AUTH with the server nonce `ns`.
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
        out: &mut BytesMut,
    ) -> ServerAwaitFinish {
        let known = key.is_some();
        let key = key.unwrap_or(filler);
        let HelloReceived {
            hello,
            mut transcript,
        } = self;
        let start = out.len();
        put_header(out, 1 + NONCE_LEN + TAG_LEN, FrameType::ServerAuth as u8);
        out.extend_from_slice(&ns);
        transcript.update(&out[start..]);
        let th2 = transcript.hash();
        let keys = SessionKeys::derive(&key, &hello.nonce, &ns, &th2);
        let tag = hmac(keys.server_finish.expose(), &[&th2]);
        out.extend_from_slice(&tag);
        transcript.update(&tag);
        ServerAwaitFinish {
            id: hello.id,
            known,
            keys,
            transcript,
        }
    }
}

/// Server: SERVER_AUTH was sent; waiting for CLIENT_FINISH.
pub struct ServerAwaitFinish {
    id: Id,
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
    /// The session, ready for frames (the client may already have sent some).
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
    pub fn handle_finish(
        mut self,
        frame: &[u8],
        max_frame_len: u32,
    ) -> Result<Established, ProtocolError> {
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
            session: Session::new(Role::Server, &self.keys, max_frame_len),
            verified: FinishVerified(()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Body, ErrorCode, FrameError};
    use bytes::Bytes;

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
        let client = ClientAwaitAuth::start(&id(), key(client_key), [1; 32], &mut hello);
        let received = HelloReceived::parse(&hello).unwrap();
        assert_eq!(received.id(), &id());
        let mut auth = BytesMut::new();
        let server = received.respond(server_key.map(key), key(0xee), [2; 32], &mut auth);
        let mut finish = BytesMut::new();
        let session = client.handle_server_auth(&auth, &mut finish, 4096);
        if session.is_err() {
            // A client that refuses SERVER_AUTH sends nothing; forge a finish to see the server's side.
            finish = BytesMut::from(&[0, 0, 0, 33, 0x12][..]);
            finish.extend_from_slice(&[0; 32]);
        }
        (server.handle_finish(&finish, 4096), session)
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
        let client = ClientAwaitAuth::start(&id(), key(0xee), [1; 32], &mut hello);
        let mut auth = BytesMut::new();
        let server =
            HelloReceived::parse(&hello)
                .unwrap()
                .respond(None, key(0xee), [2; 32], &mut auth);
        let mut finish = BytesMut::new();
        client.handle_server_auth(&auth, &mut finish, 4096).unwrap();
        assert_eq!(
            server.handle_finish(&finish, 4096).err(),
            Some(ProtocolError::BadTag(TagKind::ClientFinish))
        );
    }

    #[test]
    fn client_finish_replayed_as_server_auth_is_refused() {
        // Reflection: the client's finish tag does not verify as a server tag, and
        // a server's tag does not verify as a finish (different keys, spec 5.5).
        let mut hello = BytesMut::new();
        let client = ClientAwaitAuth::start(&id(), key(7), [1; 32], &mut hello);
        let mut auth = BytesMut::new();
        let server =
            HelloReceived::parse(&hello)
                .unwrap()
                .respond(Some(key(7)), key(0), [2; 32], &mut auth);
        let mut forged = BytesMut::from(&[0, 0, 0, 33, 0x12][..]);
        forged.extend_from_slice(&auth[auth.len() - 32..]);
        assert!(server.handle_finish(&forged, 4096).is_err());
        drop(client);
    }

    #[test]
    fn error_reply_is_reported() {
        let mut hello = BytesMut::new();
        let client = ClientAwaitAuth::start(&id(), key(7), [1; 32], &mut hello);
        let mut err = BytesMut::new();
        ErrorFrame::new(ErrorCode::BUSY).encode(&mut err);
        assert_eq!(
            client
                .handle_server_auth(&err, &mut BytesMut::new(), 4096)
                .err(),
            Some(ProtocolError::Refused(ErrorCode::BUSY))
        );
    }

    #[test]
    fn hello_with_other_version_is_refused_with_that_code() {
        let mut hello = BytesMut::new();
        ClientAwaitAuth::start(&id(), key(7), [1; 32], &mut hello);
        hello[5] = 2;
        let err = HelloReceived::parse(&hello).err().unwrap();
        assert_eq!(err, ProtocolError::Frame(FrameError::UnsupportedVersion(2)));
        assert_eq!(err.error_code(), ErrorCode::UNSUPPORTED_VERSION);
    }
}
