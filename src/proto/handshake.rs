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

use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use super::codec::put_header;
use super::enroll::{dh, secret_taken};
use super::error::{ProtocolError, TagKind};
use super::frame::{
    signed_part, ErrorFrame, FrameType, Hello, Id, Mode, SealedHello, ServerAuth, TagOnly,
};
use super::schedule::{hmac, sealed_id_key, verify, Aead, SecretKey, SessionKeys, Transcript};
use super::session::{Role, Session};
use super::{KEY_LEN, LEN_PREFIX, NONCE_LEN, TAG_LEN};

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

/// Client: HELLO or SEALED_HELLO was sent; waiting for SERVER_AUTH or SEALED_AUTH.
pub struct ClientAwaitAuth {
    key: SecretKey,
    sent: ClientHello,
    transcript: Transcript,
}

/// What the client's first frame committed it to.
enum ClientHello {
    /// HELLO, with the client nonce `nc`.
    Plain { nonce: [u8; NONCE_LEN] },
    /// SEALED_HELLO: the ephemeral pair `e, E` and `dh_es` (spec 5.6, 5.7).
    Sealed {
        ephemeral: alloc::boxed::Box<StaticSecret>,
        ephemeral_public: [u8; KEY_LEN],
        dh_es: SecretKey,
    },
}

impl ClientAwaitAuth {
    /// Writes HELLO for `id` with the client nonce `nc` (32 random bytes) to `out`: the
    /// authenticated mode (spec 7.1).
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
            sent: ClientHello::Plain { nonce: nc },
            transcript,
        }
    }

    /// Writes SEALED_HELLO for `id` to `out`: the encrypted mode (spec 7.7). `server` is
    /// the server's static key `S` (from the credential), `ephemeral` 32 random bytes,
    /// new for every connection (the secret `e`): they are taken, and wiped where they
    /// were. Fails only if `S` is of low order.
    pub fn start_sealed(
        id: &Id,
        key: SecretKey,
        server: &[u8; KEY_LEN],
        ephemeral: &mut [u8; KEY_LEN],
        max_frame_len: u32,
        out: &mut BytesMut,
    ) -> Result<Self, ProtocolError> {
        let ephemeral = secret_taken(ephemeral);
        let ephemeral_public = PublicKey::from(&*ephemeral).to_bytes();
        let dh_es = dh(&ephemeral, server)?;
        let id_key = sealed_id_key(&ephemeral_public, server, &dh_es);
        let mut frame = BytesMut::with_capacity(LEN_PREFIX + SealedHello::LEN);
        SealedHello::encode_head(&ephemeral_public, &mut frame);
        let mut sealed = SealedHello::plaintext(id, announceable(max_frame_len));
        let tag = Aead::new(&id_key).seal(&[0; 12], &frame, &mut sealed);
        frame.extend_from_slice(&sealed);
        frame.extend_from_slice(&tag);
        let mut transcript = Transcript::default();
        transcript.update(&frame);
        out.extend_from_slice(&frame);
        Ok(ClientAwaitAuth {
            key,
            sent: ClientHello::Sealed {
                ephemeral,
                ephemeral_public,
                dh_es,
            },
            transcript,
        })
    }

    /// A SEALED_HELLO for `id` announcing `max_frame_len` as given, even out of range:
    /// what a client that breaks 4.3 sends (the conformance tool's check). `None` for a
    /// low-order `server`.
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn sealed_hello_for_testing(
        id: &Id,
        server: &[u8; KEY_LEN],
        ephemeral: &mut [u8; KEY_LEN],
        max_frame_len: u32,
    ) -> Option<BytesMut> {
        let ephemeral = secret_taken(ephemeral);
        let ephemeral_public = PublicKey::from(&*ephemeral).to_bytes();
        let dh_es = dh(&ephemeral, server).ok()?;
        let id_key = sealed_id_key(&ephemeral_public, server, &dh_es);
        let mut frame = BytesMut::new();
        SealedHello::encode_head(&ephemeral_public, &mut frame);
        let mut sealed = SealedHello::plaintext(id, max_frame_len);
        let tag = Aead::new(&id_key).seal(&[0; 12], &frame, &mut sealed);
        frame.extend_from_slice(&sealed);
        frame.extend_from_slice(&tag);
        Some(frame)
    }

    /// The mode the first frame chose.
    pub fn mode(&self) -> Mode {
        match self.sent {
            ClientHello::Plain { .. } => Mode::Authenticated,
            ClientHello::Sealed { .. } => Mode::Encrypted,
        }
    }

    /// Checks SERVER_AUTH (or SEALED_AUTH), writes CLIENT_FINISH to `out` and returns
    /// the session with the limits the server announced. The session sends no frame
    /// longer than the server's limit; the caller adopts the server's keepalive (spec
    /// 8.5).
    pub fn handle_server_auth(
        mut self,
        frame: &[u8],
        out: &mut BytesMut,
    ) -> Result<(Session, ServerLimits), ProtocolError> {
        if let Some(code) = ErrorFrame::code_if_error(frame) {
            return Err(ProtocolError::Refused(code));
        }
        // Spec 7.2 client row 4: the answer of the other mode is malformed (a downgrade).
        let auth = ServerAuth::decode_as(self.mode(), frame)?;
        self.transcript.update(signed_part(frame));
        let th2 = self.transcript.hash();
        let keys = match &self.sent {
            ClientHello::Plain { nonce } => {
                SessionKeys::derive(&self.key, nonce, &auth.nonce, &th2)
            }
            ClientHello::Sealed {
                ephemeral,
                ephemeral_public,
                dh_es,
            } => {
                let dh_ee = dh(ephemeral, &auth.nonce)?;
                SessionKeys::derive_sealed(
                    &self.key,
                    ephemeral_public,
                    &auth.nonce,
                    &dh_ee,
                    dh_es,
                    &th2,
                )
            }
        };
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
        // `self` (the ephemeral secret `e` with it) is dropped, and wiped, here.
        Ok((
            Session::new(Role::Client, &keys, auth.max_frame_len),
            limits,
        ))
    }
}

/// The server's static key pair `s, S` (spec 5.6): what opens a SEALED_HELLO's id, its
/// public half computed once.
pub struct ServerKey {
    secret: StaticSecret,
    public: [u8; KEY_LEN],
}

impl ServerKey {
    /// The pair of `secret`.
    pub fn new(secret: StaticSecret) -> Self {
        let public = PublicKey::from(&secret).to_bytes();
        ServerKey { secret, public }
    }

    /// `S`, which devices pin.
    pub fn public(&self) -> &[u8; KEY_LEN] {
        &self.public
    }
}

impl From<&StaticSecret> for ServerKey {
    fn from(secret: &StaticSecret) -> Self {
        ServerKey::new(secret.clone())
    }
}

impl core::fmt::Debug for ServerKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "ServerKey(public {:02x?}..)", &self.public[..4])
    }
}

/// Server: a parsed HELLO or SEALED_HELLO, waiting for the caller to look up the
/// identity's key.
pub struct HelloReceived {
    id: Option<Id>,
    client_max_frame_len: u32,
    received: ServerHello,
    transcript: Transcript,
}

enum ServerHello {
    Plain {
        nonce: [u8; NONCE_LEN],
    },
    Sealed {
        ephemeral_public: [u8; KEY_LEN],
        dh_es: SecretKey,
    },
}

impl HelloReceived {
    /// Spec 7.2 rows 2 to 4a: the mode a first frame starts (its type and version
    /// checked), refused with [`ProtocolError::ModeRefused`] unless `accepts` it: the
    /// server's policy (7.8), decided before any other work.
    pub fn check_mode(frame: &[u8], accepts: impl Fn(Mode) -> bool) -> Result<Mode, ProtocolError> {
        let mode = Mode::of_hello(frame)?;
        if accepts(mode) {
            Ok(mode)
        } else {
            Err(ProtocolError::ModeRefused(mode))
        }
    }

    /// Parses HELLO or SEALED_HELLO, the first frame of a session handshake, in the
    /// order of spec 7.2 (rows 3 to 5b). `server` is the static secret `s`, which opens
    /// a SEALED_HELLO's id (spec 5.6); a sealed id that does not open is no error: it is
    /// answered as an unknown id (spec 7.5, [`HelloReceived::id`] is `None`).
    ///
    /// The caller checks its mode policy first, on [`Mode::of_hello`] (row 4a), so that
    /// a refused mode costs no X25519.
    pub fn parse(frame: &[u8], server: &ServerKey) -> Result<Self, ProtocolError> {
        let mut transcript = Transcript::default();
        transcript.update(frame);
        if Mode::of_hello(frame)? == Mode::Authenticated {
            let hello = Hello::decode(frame)?;
            return Ok(HelloReceived {
                id: Some(hello.id),
                client_max_frame_len: hello.max_frame_len,
                received: ServerHello::Plain { nonce: hello.nonce },
                transcript,
            });
        }
        let hello = SealedHello::decode(frame)?;
        let dh_es =
            dh(&server.secret, &hello.ephemeral).map_err(|_| ProtocolError::WeakHelloKey)?;
        let id_key = sealed_id_key(&hello.ephemeral, &server.public, &dh_es);
        let mut plain = Zeroizing::new([0u8; SealedHello::PLAINTEXT_LEN]);
        plain.copy_from_slice(&hello.sealed[..SealedHello::PLAINTEXT_LEN]);
        let opened = Aead::new(&id_key).open(
            &[0; 12],
            &frame[..SealedHello::AD_LEN],
            &mut plain[..],
            &hello.sealed[SealedHello::PLAINTEXT_LEN..],
        );
        // Spec 7.5: a sealed part that does not open is answered as an unknown id (its
        // limit unknown: nothing is ever sent with it); one that opens but breaks 4.3 was
        // made by the holder of `e`: malformed (row 5b).
        let (id, client_max_frame_len) = if opened {
            let (id, limit) = SealedHello::from_plaintext(&plain)?;
            (Some(id), limit)
        } else {
            (None, super::MIN_SESSION_FRAME_LEN)
        };
        Ok(HelloReceived {
            id,
            client_max_frame_len,
            received: ServerHello::Sealed {
                ephemeral_public: hello.ephemeral,
                dh_es,
            },
            transcript,
        })
    }

    /// The identity the client claims (not yet authenticated), or `None` for a sealed id
    /// that did not open: the caller answers it as an unknown id.
    pub fn id(&self) -> Option<&Id> {
        self.id.as_ref()
    }

    /// The mode of this handshake.
    pub fn mode(&self) -> Mode {
        match self.received {
            ServerHello::Plain { .. } => Mode::Authenticated,
            ServerHello::Sealed { .. } => Mode::Encrypted,
        }
    }

    /// The largest session frame the client accepts (not yet authenticated: it is
    /// covered by both tags, so it is known to be the client's only after
    /// CLIENT_FINISH verified).
    pub fn client_max_frame_len(&self) -> u32 {
        self.client_max_frame_len
    }

    /// Writes SERVER_AUTH (or SEALED_AUTH) with the server's `limits`. `random` is 32
    /// random bytes, new for every connection: the server nonce `ns` in the
    /// authenticated mode, the ephemeral secret `f` in the encrypted mode (taken, and
    /// wiped where it was).
    ///
    /// `key` is the identity's key, or `None` if the identity is unknown or revoked (or
    /// its sealed id did not open). In that case `filler` (a random key from the caller)
    /// takes its place, so the reply and the work are the same as for a known identity,
    /// and the handshake fails at CLIENT_FINISH exactly as it does for a wrong key (spec
    /// 7.5).
    pub fn respond(
        self,
        key: Option<SecretKey>,
        filler: SecretKey,
        random: &mut [u8; NONCE_LEN],
        limits: ServerLimits,
        out: &mut BytesMut,
    ) -> ServerAwaitFinish {
        self.respond_as(key, filler, random, limits, None, out)
    }

    /// [`HelloReceived::respond`] with the answer's type byte replaced by `ty` before its
    /// tag is computed: a server that answers SEALED_HELLO with a validly tagged
    /// SERVER_AUTH, what a client that does not check the answer's type accepts (the
    /// conformance tool's downgrade check).
    #[cfg(any(test, feature = "testing"))]
    #[doc(hidden)]
    pub fn respond_with_type_for_testing(
        self,
        key: Option<SecretKey>,
        filler: SecretKey,
        random: &mut [u8; NONCE_LEN],
        limits: ServerLimits,
        ty: FrameType,
        out: &mut BytesMut,
    ) -> ServerAwaitFinish {
        self.respond_as(key, filler, random, limits, Some(ty), out)
    }

    fn respond_as(
        self,
        key: Option<SecretKey>,
        filler: SecretKey,
        random: &mut [u8; NONCE_LEN],
        limits: ServerLimits,
        ty: Option<FrameType>,
        out: &mut BytesMut,
    ) -> ServerAwaitFinish {
        let mut known = key.is_some() && self.id.is_some();
        let key = key.unwrap_or(filler);
        let HelloReceived {
            id,
            client_max_frame_len,
            received,
            mut transcript,
        } = self;
        let mode = match received {
            ServerHello::Plain { .. } => Mode::Authenticated,
            ServerHello::Sealed { .. } => Mode::Encrypted,
        };
        let start = out.len();
        // `random` is the nonce `ns` (public), or the secret `f`, taken and wiped.
        let (nonce, ephemeral) = match mode {
            Mode::Authenticated => (*random, None),
            Mode::Encrypted => {
                let f = secret_taken(random);
                (PublicKey::from(&*f).to_bytes(), Some(f))
            }
        };
        let mut auth = ServerAuth {
            nonce,
            max_frame_len: limits.frame_len(),
            keepalive_ms: limits.keepalive_ms(),
            tag: [0; TAG_LEN],
        };
        auth.encode_unsigned_as(mode, out);
        if let Some(ty) = ty {
            out[start + LEN_PREFIX] = ty as u8;
        }
        transcript.update(&out[start..]);
        let th2 = transcript.hash();
        let keys = match (&received, ephemeral) {
            (ServerHello::Plain { nonce: nc }, _) => SessionKeys::derive(&key, nc, &nonce, &th2),
            (
                ServerHello::Sealed {
                    ephemeral_public,
                    dh_es,
                },
                Some(f),
            ) => {
                // `E` gave a non-zero `dh_es`, so it is not of low order and neither is
                // `dh_ee`; should it be, the handshake fails like a wrong key.
                let dh_ee = dh(&f, ephemeral_public).unwrap_or_else(|_| {
                    known = false;
                    filler_dh()
                });
                SessionKeys::derive_sealed(&key, ephemeral_public, &auth.nonce, &dh_ee, dh_es, &th2)
            }
            (ServerHello::Sealed { .. }, None) => unreachable!("the encrypted mode made `f`"),
        };
        auth.tag = hmac(keys.server_finish.expose(), &[&th2]);
        out.extend_from_slice(&auth.tag);
        transcript.update(&auth.tag);
        ServerAwaitFinish {
            id,
            client_max_frame_len,
            known,
            keys,
            transcript,
        }
    }
}

/// A stand-in for a `dh_ee` that cannot occur (see [`HelloReceived::respond`]).
fn filler_dh() -> SecretKey {
    SecretKey::from_bytes([0; KEY_LEN])
}

/// Server: SERVER_AUTH was sent; waiting for CLIENT_FINISH.
pub struct ServerAwaitFinish {
    id: Option<Id>,
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
    /// The identity the client claims (not yet authenticated), `None` for a sealed id
    /// that did not open.
    pub fn id(&self) -> Option<&Id> {
        self.id.as_ref()
    }

    /// The mode of this handshake.
    pub fn mode(&self) -> Mode {
        self.keys.mode
    }

    /// Verifies CLIENT_FINISH. Unknown identity, revoked identity, a sealed id that did
    /// not open and a wrong key all fail here, with the same error, after the same work.
    pub fn handle_finish(mut self, frame: &[u8]) -> Result<Established, ProtocolError> {
        let finish = TagOnly::decode(frame, FrameType::ClientFinish, "CLIENT_FINISH")?;
        self.transcript.update(signed_part(frame));
        let ok = verify(
            self.keys.client_finish.expose(),
            &[&self.transcript.hash()],
            &finish.0,
        );
        match self.id {
            Some(id) if ok & self.known => Ok(Established {
                id,
                session: Session::new(Role::Server, &self.keys, self.client_max_frame_len),
                verified: FinishVerified(()),
            }),
            _ => Err(ProtocolError::BadTag(TagKind::ClientFinish)),
        }
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

    fn server_static() -> StaticSecret {
        StaticSecret::from([0x20; 32])
    }

    fn server_public() -> [u8; 32] {
        PublicKey::from(&server_static()).to_bytes()
    }

    /// The client's first frame in `mode`.
    fn start(mode: Mode, client_key: u8, out: &mut BytesMut) -> ClientAwaitAuth {
        match mode {
            Mode::Authenticated => {
                ClientAwaitAuth::start(&id(), key(client_key), [1; 32], 4096, out)
            }
            Mode::Encrypted => ClientAwaitAuth::start_sealed(
                &id(),
                key(client_key),
                &server_public(),
                &mut [1; 32],
                4096,
                out,
            )
            .unwrap(),
        }
    }

    /// Runs a handshake; returns the outcome at the server and the client's session.
    fn run(
        mode: Mode,
        client_key: u8,
        server_key: Option<u8>,
    ) -> (
        Result<Established, ProtocolError>,
        Result<Session, ProtocolError>,
    ) {
        let mut hello = BytesMut::new();
        let client = start(mode, client_key, &mut hello);
        let received = HelloReceived::parse(&hello, &ServerKey::from(&server_static())).unwrap();
        assert_eq!(received.id(), Some(&id()));
        assert_eq!(received.mode(), mode);
        let mut auth = BytesMut::new();
        let server = received.respond(
            server_key.map(key),
            key(0xee),
            &mut [2; 32],
            LIMITS,
            &mut auth,
        );
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

    fn both_sides_agree_and_exchange_frames(mode: Mode) {
        let (server, client) = run(mode, 7, Some(7));
        let mut server = server.unwrap().session;
        let mut client = client.unwrap();
        assert_eq!((client.mode(), server.mode()), (mode, mode));
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

    fn wrong_key_fails_at_client_and_server(mode: Mode) {
        let (server, client) = run(mode, 7, Some(8));
        assert_eq!(
            client.err(),
            Some(ProtocolError::BadTag(TagKind::ServerAuth))
        );
        assert_eq!(
            server.err(),
            Some(ProtocolError::BadTag(TagKind::ClientFinish))
        );
    }

    fn unknown_identity_fails_like_a_wrong_key(mode: Mode) {
        let (server, client) = run(mode, 7, None);
        assert_eq!(
            client.err(),
            Some(ProtocolError::BadTag(TagKind::ServerAuth))
        );
        assert_eq!(server.err().unwrap().error_code(), ErrorCode::AUTH_FAILED);
    }

    #[test]
    fn each_test_in_both_modes() {
        for mode in [Mode::Authenticated, Mode::Encrypted] {
            both_sides_agree_and_exchange_frames(mode);
            wrong_key_fails_at_client_and_server(mode);
            unknown_identity_fails_like_a_wrong_key(mode);
        }
    }

    #[test]
    fn sealed_hello_hides_the_id_and_has_one_length() {
        let mut short = BytesMut::new();
        ClientAwaitAuth::start_sealed(
            &Id::new("a").unwrap(),
            key(7),
            &server_public(),
            &mut [1; 32],
            4096,
            &mut short,
        )
        .unwrap();
        let mut long = BytesMut::new();
        ClientAwaitAuth::start_sealed(
            &Id::new(&"b".repeat(64)).unwrap(),
            key(7),
            &server_public(),
            &mut [1; 32],
            4096,
            &mut long,
        )
        .unwrap();
        assert_eq!(short.len(), 4 + SealedHello::LEN);
        assert_eq!(long.len(), short.len());
        assert!(!long.windows(64).any(|w| w == "b".repeat(64).as_bytes()));
    }

    #[test]
    fn sealed_id_for_another_server_is_answered_like_an_unknown_id() {
        // Sealed to another key: the server cannot open it, answers SEALED_AUTH all the
        // same (spec 7.5), and refuses the finish like a wrong key.
        let other = PublicKey::from(&StaticSecret::from([0x33; 32])).to_bytes();
        let mut hello = BytesMut::new();
        let client =
            ClientAwaitAuth::start_sealed(&id(), key(7), &other, &mut [1; 32], 4096, &mut hello)
                .unwrap();
        let received = HelloReceived::parse(&hello, &ServerKey::from(&server_static())).unwrap();
        assert_eq!(received.id(), None);
        let mut auth = BytesMut::new();
        let server = received.respond(Some(key(7)), key(0xee), &mut [2; 32], LIMITS, &mut auth);
        assert_eq!(auth.len(), 4 + ServerAuth::LEN);
        let mut finish = BytesMut::new();
        assert_eq!(
            client.handle_server_auth(&auth, &mut finish).err(),
            Some(ProtocolError::BadTag(TagKind::ServerAuth))
        );
        let mut forged = BytesMut::from(&[0, 0, 0, 33, 0x12][..]);
        forged.extend_from_slice(&[0; 32]);
        assert_eq!(
            server.handle_finish(&forged).err(),
            Some(ProtocolError::BadTag(TagKind::ClientFinish))
        );
    }

    #[test]
    fn downgraded_answer_is_refused() {
        // SEALED_HELLO answered with SERVER_AUTH (a man in the middle that replaced the
        // client's frame with a HELLO): malformed, nothing sent (spec 7.2 client row 4).
        let mut hello = BytesMut::new();
        let client = start(Mode::Encrypted, 7, &mut hello);
        let mut plain = BytesMut::new();
        ClientAwaitAuth::start(&id(), key(7), [1; 32], 4096, &mut plain);
        let mut auth = BytesMut::new();
        HelloReceived::parse(&plain, &ServerKey::from(&server_static()))
            .unwrap()
            .respond(Some(key(7)), key(0), &mut [2; 32], LIMITS, &mut auth);
        let mut out = BytesMut::new();
        assert!(matches!(
            client.handle_server_auth(&auth, &mut out),
            Err(ProtocolError::Frame(FrameError::UnexpectedType {
                got: 0x11,
                ..
            }))
        ));
        assert!(out.is_empty());
        // And the reverse: a SEALED_AUTH for a client that sent HELLO.
        let client = start(Mode::Authenticated, 7, &mut BytesMut::new());
        let mut sealed = BytesMut::new();
        HelloReceived::parse(&hello, &ServerKey::from(&server_static()))
            .unwrap()
            .respond(Some(key(7)), key(0), &mut [2; 32], LIMITS, &mut sealed);
        assert!(client
            .handle_server_auth(&sealed, &mut BytesMut::new())
            .is_err());
    }

    #[test]
    fn low_order_ephemeral_keys_are_refused() {
        let mut hello = BytesMut::new();
        let client = start(Mode::Encrypted, 7, &mut hello);
        // E = 0 (a low-order point) in SEALED_HELLO: weak_key, before any AEAD.
        let mut weak = hello.clone();
        weak[6..38].fill(0);
        assert_eq!(
            HelloReceived::parse(&weak, &ServerKey::from(&server_static())).err(),
            Some(ProtocolError::WeakHelloKey)
        );
        assert_eq!(
            ProtocolError::WeakHelloKey.error_code(),
            ErrorCode::MALFORMED
        );
        // F = 0 in SEALED_AUTH: the client refuses before checking the tag.
        let mut auth = BytesMut::new();
        HelloReceived::parse(&hello, &ServerKey::from(&server_static()))
            .unwrap()
            .respond(Some(key(7)), key(0), &mut [2; 32], LIMITS, &mut auth);
        auth[5..37].fill(0);
        assert_eq!(
            client.handle_server_auth(&auth, &mut BytesMut::new()).err(),
            Some(ProtocolError::WeakKey)
        );
        // A server key of low order in the credential: nothing is sent.
        assert_eq!(
            ClientAwaitAuth::start_sealed(
                &id(),
                key(7),
                &[0; 32],
                &mut [1; 32],
                4096,
                &mut BytesMut::new()
            )
            .err(),
            Some(ProtocolError::WeakKey)
        );
    }

    #[test]
    fn replayed_sealed_hello_gets_new_keys() {
        // A recorded SEALED_HELLO and CLIENT_FINISH replayed: the server's fresh `F`
        // makes new keys, and the old finish does not verify.
        let mut hello = BytesMut::new();
        let client = start(Mode::Encrypted, 7, &mut hello);
        let mut auth = BytesMut::new();
        let first = HelloReceived::parse(&hello, &ServerKey::from(&server_static()))
            .unwrap()
            .respond(Some(key(7)), key(0), &mut [2; 32], LIMITS, &mut auth);
        let mut finish = BytesMut::new();
        client.handle_server_auth(&auth, &mut finish).unwrap();
        first.handle_finish(&finish).unwrap();
        let replay = HelloReceived::parse(&hello, &ServerKey::from(&server_static()))
            .unwrap()
            .respond(
                Some(key(7)),
                key(0),
                &mut [3; 32],
                LIMITS,
                &mut BytesMut::new(),
            );
        assert_eq!(
            replay.handle_finish(&finish).err(),
            Some(ProtocolError::BadTag(TagKind::ClientFinish))
        );
    }

    #[test]
    fn sealed_id_plaintext_rules() {
        let mut p = SealedHello::plaintext(&id(), 4096);
        assert_eq!(SealedHello::from_plaintext(&p).unwrap(), (id(), 4096));
        p[40] = 1;
        assert_eq!(
            SealedHello::from_plaintext(&p).err(),
            Some(FrameError::BadPadding)
        );
        let mut p = SealedHello::plaintext(&id(), 4096);
        p[0] = 0;
        assert!(matches!(
            SealedHello::from_plaintext(&p),
            Err(FrameError::BadId(_))
        ));
        p[0] = 65;
        assert!(matches!(
            SealedHello::from_plaintext(&p),
            Err(FrameError::BadId(_))
        ));
        // The id is checked before the padding (spec 4.3): both broken is bad_id.
        let mut p = SealedHello::plaintext(&id(), 4096);
        p[1] = b' ';
        p[40] = 1;
        assert!(matches!(
            SealedHello::from_plaintext(&p),
            Err(FrameError::BadId(_))
        ));
        // The limit is sealed too, and checked last.
        let p = SealedHello::plaintext(&id(), 255);
        assert!(matches!(
            SealedHello::from_plaintext(&p),
            Err(FrameError::BadLimit { .. })
        ));
    }

    #[test]
    fn unknown_identity_fails_even_if_filler_equals_the_key() {
        // The filler is random in practice; even a filler equal to the client's key
        // must not authenticate an identity the server does not know.
        let mut hello = BytesMut::new();
        let client = ClientAwaitAuth::start(&id(), key(0xee), [1; 32], 4096, &mut hello);
        let mut auth = BytesMut::new();
        let server = HelloReceived::parse(&hello, &ServerKey::from(&server_static()))
            .unwrap()
            .respond(None, key(0xee), &mut [2; 32], LIMITS, &mut auth);
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
        let server = HelloReceived::parse(&hello, &ServerKey::from(&server_static()))
            .unwrap()
            .respond(Some(key(7)), key(0), &mut [2; 32], LIMITS, &mut auth);
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
        let err = HelloReceived::parse(&hello, &ServerKey::from(&server_static()))
            .err()
            .unwrap();
        assert_eq!(err, ProtocolError::Frame(FrameError::UnsupportedVersion(2)));
        assert_eq!(err.error_code(), ErrorCode::UNSUPPORTED_VERSION);
    }
}
