//! Enrollment (spec section 6): a device and the server end with a fresh identity key.
//!
//! ```text
//! client (c = EK or its token, pins S)      server (s; EK and tokens in its store)
//! ENROLL_INIT(mode, id, X, HMAC(c, ...))  ─▶ checks the tag before any DH
//!                                         ◀─ ENROLL_REPLY(Y, HMAC(K_server, th2))
//! ENROLL_CONFIRM(HMAC(K_client, th3))     ─▶ verifies; the caller commits (id, k)
//!                                         ◀─ ENROLL_DONE(HMAC(K_done, th4)), after the commit
//! ```
//!
//! Keys come from `HKDF(salt = c, ikm = DH(x,Y) ‖ DH(x,S), info = label ‖ th2)`:
//! the server proves it holds `s` (only it can compute `DH(s,X)`), and the credential
//! is mixed in, so breaking X25519 later is not enough to recover `k` (spec 6.4).

use bytes::BytesMut;
use x25519_dalek::{PublicKey, StaticSecret};

use super::codec::put_header;
use super::error::{ProtocolError, TagKind};
use super::frame::{
    signed_part, EnrollInit, EnrollMode, ErrorFrame, FrameType, Id, TagOnly, ValueAndTag,
};
use super::schedule::{hmac, labels, scrubbed, verify, EnrollKeys, SecretKey, Transcript};
use super::{KEY_LEN, TAG_LEN};
use zeroize::Zeroize;

/// X25519, refusing a non-contributory (all-zero) result: the peer sent a low-order point.
pub(crate) fn dh(
    secret: &StaticSecret,
    public: &[u8; KEY_LEN],
) -> Result<SecretKey, ProtocolError> {
    scrubbed(|| {
        let shared = secret.diffie_hellman(&PublicKey::from(*public));
        if !shared.was_contributory() {
            return Err(ProtocolError::WeakKey);
        }
        SecretKey::fill(|out| {
            out.copy_from_slice(shared.as_bytes());
            Ok(())
        })
    })
}

/// The X25519 secret of 32 random bytes `bytes`, on the heap (moving it moves a
/// pointer), the caller's bytes wiped: no copy of an ephemeral secret outlives its use.
pub(crate) fn secret_taken(bytes: &mut [u8; KEY_LEN]) -> alloc::boxed::Box<StaticSecret> {
    let secret = scrubbed(|| alloc::boxed::Box::new(StaticSecret::from(*bytes)));
    bytes.zeroize();
    secret
}

/// The X25519 secret of 32 random bytes; the copy passed in is wiped (the caller's own,
/// if it kept one, is not).
pub(crate) fn secret_from(mut bytes: [u8; KEY_LEN]) -> StaticSecret {
    let secret = scrubbed(|| StaticSecret::from(bytes));
    bytes.zeroize();
    secret
}

/// The ENROLL_INIT tag: `HMAC(c, "tally/1 enroll init" ‖ H(ENROLL_INIT without its tag))`.
fn init_tag(credential: &SecretKey, init_signed: &[u8]) -> [u8; 32] {
    let mut th = Transcript::default();
    th.update(init_signed);
    hmac(credential.expose(), &[labels::ENROLL_INIT, &th.hash()])
}

/// Appends a tag-only frame of type `ty` whose tag is `HMAC(key, H(transcript ‖ header))`.
fn put_tag_frame(ty: FrameType, key: &SecretKey, transcript: &mut Transcript, out: &mut BytesMut) {
    let start = out.len();
    put_header(out, 1 + TAG_LEN, ty as u8);
    transcript.update(&out[start..]);
    let tag = hmac(key.expose(), &[&transcript.hash()]);
    transcript.update(&tag);
    out.extend_from_slice(&tag);
}

/// Checks a tag-only frame of type `ty` against `key` over the transcript.
fn check_tag_frame(
    frame: &[u8],
    ty: FrameType,
    what: &'static str,
    kind: TagKind,
    key: &SecretKey,
    transcript: &mut Transcript,
) -> Result<(), ProtocolError> {
    if let Some(code) = ErrorFrame::code_if_error(frame) {
        return Err(ProtocolError::Refused(code));
    }
    let msg = TagOnly::decode(frame, ty, what)?;
    transcript.update(signed_part(frame));
    if !verify(key.expose(), &[&transcript.hash()], &msg.0) {
        return Err(ProtocolError::BadTag(kind));
    }
    transcript.update(&msg.0);
    Ok(())
}

/// What a device needs to enroll: everything in an enrollment token, plus its id.
#[derive(Debug, Clone)]
pub struct ClientParams {
    /// The identity to enroll.
    pub id: Id,
    /// Open (credential is EK) or token (credential is the token T(id) issued for the id).
    pub mode: EnrollMode,
    /// The enrollment credential `c`.
    pub credential: SecretKey,
    /// The server's static public key `S`, pinned.
    pub server_static: [u8; KEY_LEN],
}

/// Client: ENROLL_INIT was sent; waiting for ENROLL_REPLY.
pub struct ClientAwaitReply {
    params: ClientParams,
    ephemeral: StaticSecret,
    transcript: Transcript,
}

impl ClientAwaitReply {
    /// Writes ENROLL_INIT to `out`. `ephemeral` is 32 random bytes, the secret `x`.
    pub fn start(params: ClientParams, ephemeral: [u8; KEY_LEN], out: &mut BytesMut) -> Self {
        let ephemeral = secret_from(ephemeral);
        let mut init = EnrollInit {
            mode: params.mode,
            id: params.id.clone(),
            ephemeral: PublicKey::from(&ephemeral).to_bytes(),
            tag: [0; 32],
        };
        let mut unsigned = BytesMut::new();
        init.encode(&mut unsigned);
        init.tag = init_tag(&params.credential, signed_part(&unsigned));
        let start = out.len();
        init.encode(out);
        let mut transcript = Transcript::default();
        transcript.update(&out[start..]);
        ClientAwaitReply {
            params,
            ephemeral,
            transcript,
        }
    }

    /// Checks ENROLL_REPLY (proof that the server holds `s`), writes ENROLL_CONFIRM.
    pub fn handle_reply(
        mut self,
        frame: &[u8],
        out: &mut BytesMut,
    ) -> Result<ClientAwaitDone, ProtocolError> {
        if let Some(code) = ErrorFrame::code_if_error(frame) {
            return Err(ProtocolError::Refused(code));
        }
        let reply = ValueAndTag::decode(frame, FrameType::EnrollReply, "ENROLL_REPLY")?;
        let dh_e = dh(&self.ephemeral, &reply.value)?;
        let dh_s = dh(&self.ephemeral, &self.params.server_static)?;
        self.transcript.update(signed_part(frame));
        let th2 = self.transcript.hash();
        let keys = EnrollKeys::derive(&self.params.credential, &dh_e, &dh_s, &th2);
        if !verify(keys.server.expose(), &[&th2], &reply.tag) {
            return Err(ProtocolError::BadTag(TagKind::EnrollReply));
        }
        self.transcript.update(&reply.tag);
        put_tag_frame(
            FrameType::EnrollConfirm,
            &keys.client,
            &mut self.transcript,
            out,
        );
        Ok(ClientAwaitDone {
            id: self.params.id,
            keys,
            transcript: self.transcript,
        })
    }
}

/// Client: ENROLL_CONFIRM was sent; waiting for ENROLL_DONE.
pub struct ClientAwaitDone {
    id: Id,
    keys: EnrollKeys,
    transcript: Transcript,
}

impl ClientAwaitDone {
    /// Checks ENROLL_DONE: the server has durably stored the identity. Returns the
    /// identity key `k` to keep in the device's credential.
    pub fn handle_done(mut self, frame: &[u8]) -> Result<(Id, SecretKey), ProtocolError> {
        let done = &self.keys.done;
        check_tag_frame(
            frame,
            FrameType::EnrollDone,
            "ENROLL_DONE",
            TagKind::EnrollDone,
            done,
            &mut self.transcript,
        )?;
        Ok((self.id, self.keys.identity.clone()))
    }
}

/// The server's enrollment secret and policy. The credentials themselves (the open
/// enrollment key, per-identity tokens) live in the server's store: the caller looks
/// one up between [`InitReceived::parse`] and [`InitReceived::verify`].
pub struct ServerParams {
    /// The static secret `s`.
    pub static_secret: StaticSecret,
    /// Whether ENROLL_INIT in open mode is accepted at all.
    pub allow_open: bool,
}

impl ServerParams {
    /// The static public key `S` that devices pin.
    pub fn static_public(&self) -> [u8; KEY_LEN] {
        PublicKey::from(&self.static_secret).to_bytes()
    }
}

impl core::fmt::Debug for ServerParams {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ServerParams")
            .field("allow_open", &self.allow_open)
            .finish_non_exhaustive()
    }
}

/// Server: a parsed ENROLL_INIT whose tag is not checked yet.
pub struct InitReceived {
    init: EnrollInit,
    /// `H(ENROLL_INIT without its tag)`, what the tag covers.
    init_th: [u8; 32],
    transcript: Transcript,
}

impl InitReceived {
    /// Parses ENROLL_INIT (version first, spec 11) and applies the open-mode policy.
    pub fn parse(params: &ServerParams, frame: &[u8]) -> Result<Self, ProtocolError> {
        let init = EnrollInit::decode(frame)?;
        if init.mode == EnrollMode::Open && !params.allow_open {
            return Err(ProtocolError::OpenModeDisabled);
        }
        let mut transcript = Transcript::default();
        transcript.update(frame);
        Ok(InitReceived {
            init,
            init_th: init_th(frame),
            transcript,
        })
    }

    /// The identity the client asks for (not yet authenticated).
    pub fn id(&self) -> &Id {
        &self.init.id
    }

    /// The mode the client asks for.
    pub fn mode(&self) -> EnrollMode {
        self.init.mode
    }

    /// Checks the tag against the credential for this mode and id (spec 6.2 step 2),
    /// before any X25519. `credential` is `None` when the server holds none (no token
    /// issued, or it expired); `filler` (random, from the caller) then takes its place,
    /// so that the refusal costs the same HMAC as a wrong credential.
    pub fn verify(
        self,
        credential: Option<SecretKey>,
        filler: SecretKey,
    ) -> Result<InitVerified, ProtocolError> {
        let known = credential.is_some();
        let credential = credential.unwrap_or(filler);
        let ok = verify(
            credential.expose(),
            &[labels::ENROLL_INIT, &self.init_th],
            &self.init.tag,
        );
        if !(ok && known) {
            return Err(ProtocolError::BadTag(TagKind::EnrollInit));
        }
        Ok(InitVerified {
            init: self.init,
            credential,
            transcript: self.transcript,
        })
    }
}

/// Server: ENROLL_INIT carries a valid credential tag; no X25519 was done yet.
pub struct InitVerified {
    init: EnrollInit,
    credential: SecretKey,
    transcript: Transcript,
}

impl InitVerified {
    /// The identity being enrolled.
    pub fn id(&self) -> &Id {
        &self.init.id
    }

    /// The mode it is enrolled in.
    pub fn mode(&self) -> EnrollMode {
        self.init.mode
    }

    /// Does the two X25519 operations and writes ENROLL_REPLY with the server
    /// ephemeral `y` (32 random bytes).
    pub fn reply(
        self,
        params: &ServerParams,
        ephemeral: [u8; KEY_LEN],
        out: &mut BytesMut,
    ) -> Result<ServerAwaitConfirm, ProtocolError> {
        let InitVerified {
            init,
            credential,
            mut transcript,
        } = self;
        let y = secret_from(ephemeral);
        let dh_e = dh(&y, &init.ephemeral)?;
        let dh_s = dh(&params.static_secret, &init.ephemeral)?;
        let start = out.len();
        put_header(out, 1 + KEY_LEN + TAG_LEN, FrameType::EnrollReply as u8);
        out.extend_from_slice(PublicKey::from(&y).as_bytes());
        transcript.update(&out[start..]);
        let th2 = transcript.hash();
        let keys = EnrollKeys::derive(&credential, &dh_e, &dh_s, &th2);
        let tag = hmac(keys.server.expose(), &[&th2]);
        out.extend_from_slice(&tag);
        transcript.update(&tag);
        Ok(ServerAwaitConfirm {
            id: init.id,
            mode: init.mode,
            keys,
            transcript,
        })
    }
}

/// Server: ENROLL_REPLY was sent; waiting for ENROLL_CONFIRM.
pub struct ServerAwaitConfirm {
    id: Id,
    mode: EnrollMode,
    keys: EnrollKeys,
    transcript: Transcript,
}

impl ServerAwaitConfirm {
    /// Parse, verify and reply in one call, for callers whose credentials are at hand
    /// (tests, vectors, fuzzing): `credential(mode, id)` returns `c`, or a filler when
    /// there is none. The daemon runs the three steps itself, with a store lookup and
    /// the enrolled-id check between them.
    pub fn handle_init(
        params: &ServerParams,
        frame: &[u8],
        credential: impl FnOnce(EnrollMode, &Id) -> SecretKey,
        ephemeral: [u8; KEY_LEN],
        out: &mut BytesMut,
    ) -> Result<Self, ProtocolError> {
        let init = InitReceived::parse(params, frame)?;
        let c = credential(init.mode(), init.id());
        init.verify(Some(c.clone()), c)?
            .reply(params, ephemeral, out)
    }

    /// The identity being enrolled (its credential tag verified).
    pub fn id(&self) -> &Id {
        &self.id
    }

    /// Checks ENROLL_CONFIRM. The caller then stores the identity and, once the commit
    /// is durable, calls [`PendingIdentity::committed`].
    pub fn handle_confirm(mut self, frame: &[u8]) -> Result<PendingIdentity, ProtocolError> {
        let client = &self.keys.client;
        check_tag_frame(
            frame,
            FrameType::EnrollConfirm,
            "ENROLL_CONFIRM",
            TagKind::EnrollConfirm,
            client,
            &mut self.transcript,
        )?;
        Ok(PendingIdentity {
            id: self.id,
            mode: self.mode,
            keys: self.keys,
            transcript: self.transcript,
        })
    }
}

fn init_th(frame: &[u8]) -> [u8; 32] {
    let mut th = Transcript::default();
    th.update(signed_part(frame));
    th.hash()
}

/// Server: both sides proved themselves; the identity must now be stored.
pub struct PendingIdentity {
    /// The identity to store.
    pub id: Id,
    /// How it was enrolled.
    pub mode: EnrollMode,
    keys: EnrollKeys,
    transcript: Transcript,
}

impl PendingIdentity {
    /// The identity key `k` to store.
    pub fn identity_key(&self) -> &SecretKey {
        &self.keys.identity
    }

    /// Writes ENROLL_DONE. Call only after the identity is durably stored (spec 6.3).
    pub fn committed(mut self, out: &mut BytesMut) {
        put_tag_frame(
            FrameType::EnrollDone,
            &self.keys.done,
            &mut self.transcript,
            out,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ErrorCode;

    fn server(allow_open: bool) -> ServerParams {
        ServerParams {
            static_secret: StaticSecret::from([0x22; 32]),
            allow_open,
        }
    }

    /// The server's credentials: an open key, and one token per id (independent keys).
    fn credential(mode: EnrollMode, id: &Id) -> SecretKey {
        match mode {
            EnrollMode::Open => SecretKey::from_bytes([0x11; 32]),
            EnrollMode::Token => SecretKey::from_bytes([id.as_str().len() as u8; 32]),
        }
    }

    fn client(srv: &ServerParams, mode: EnrollMode, id: &str) -> ClientParams {
        let id = Id::new(id).unwrap();
        ClientParams {
            credential: credential(mode, &id),
            id,
            mode,
            server_static: srv.static_public(),
        }
    }

    /// Runs an enrollment to the end; returns both sides' keys.
    fn run(
        srv: &ServerParams,
        params: ClientParams,
    ) -> Result<(SecretKey, SecretKey), ProtocolError> {
        let mut init = BytesMut::new();
        let c = ClientAwaitReply::start(params, [0x33; 32], &mut init);
        let mut reply = BytesMut::new();
        let s = ServerAwaitConfirm::handle_init(srv, &init, credential, [0x44; 32], &mut reply)?;
        let mut confirm = BytesMut::new();
        let c = c.handle_reply(&reply, &mut confirm)?;
        let pending = s.handle_confirm(&confirm)?;
        let server_k = pending.identity_key().clone();
        let mut done = BytesMut::new();
        pending.committed(&mut done);
        let (_, client_k) = c.handle_done(&done)?;
        Ok((client_k, server_k))
    }

    #[test]
    fn both_modes_agree_on_the_identity_key() {
        let srv = server(true);
        for mode in [EnrollMode::Open, EnrollMode::Token] {
            let (a, b) = run(&srv, client(&srv, mode, "dev")).unwrap();
            assert!(a.ct_eq(&b));
        }
    }

    #[test]
    fn wrong_credential_is_refused_before_dh() {
        let srv = server(true);
        let mut p = client(&srv, EnrollMode::Open, "dev");
        p.credential = SecretKey::from_bytes([0; 32]);
        let err = run(&srv, p).err().unwrap();
        assert_eq!(err, ProtocolError::BadTag(TagKind::EnrollInit));
        assert_eq!(err.error_code(), ErrorCode::ENROLL_REFUSED);
    }

    #[test]
    fn token_for_another_id_is_refused() {
        let srv = server(true);
        let mut p = client(&srv, EnrollMode::Token, "victim");
        p.credential = credential(EnrollMode::Token, &Id::new("attacker-1").unwrap());
        assert_eq!(
            run(&srv, p).err(),
            Some(ProtocolError::BadTag(TagKind::EnrollInit))
        );
    }

    #[test]
    fn missing_credential_is_refused_like_a_wrong_one() {
        let srv = server(true);
        let mut init = BytesMut::new();
        ClientAwaitReply::start(client(&srv, EnrollMode::Token, "dev"), [3; 32], &mut init);
        let parsed = InitReceived::parse(&srv, &init).unwrap();
        // The filler happens to be the right key: still refused, the server has no token.
        let c = credential(EnrollMode::Token, parsed.id());
        assert_eq!(
            parsed.verify(None, c).err(),
            Some(ProtocolError::BadTag(TagKind::EnrollInit))
        );
    }

    #[test]
    fn open_mode_can_be_disabled() {
        let srv = server(false);
        assert_eq!(
            run(&srv, client(&srv, EnrollMode::Open, "d")).err(),
            Some(ProtocolError::OpenModeDisabled)
        );
        assert!(run(&srv, client(&srv, EnrollMode::Token, "d")).is_ok());
    }

    #[test]
    fn client_pinned_to_another_server_refuses_to_finish() {
        let srv = server(true);
        let mut p = client(&srv, EnrollMode::Open, "dev");
        p.server_static = PublicKey::from(&StaticSecret::from([0x99; 32])).to_bytes();
        assert_eq!(
            run(&srv, p).err(),
            Some(ProtocolError::BadTag(TagKind::EnrollReply))
        );
    }

    #[test]
    fn low_order_ephemeral_is_refused() {
        let srv = server(true);
        let mut init = BytesMut::new();
        let p = client(&srv, EnrollMode::Open, "dev");
        let c = ClientAwaitReply::start(p, [0x33; 32], &mut init);
        // The server replies with the all-zero point: a non-contributory DH.
        let mut reply = BytesMut::new();
        ValueAndTag {
            value: [0; 32],
            tag: [0; 32],
        }
        .encode(FrameType::EnrollReply, &mut reply);
        assert_eq!(
            c.handle_reply(&reply, &mut BytesMut::new()).err(),
            Some(ProtocolError::WeakKey)
        );
    }

    #[test]
    fn server_error_reply_is_reported() {
        let srv = server(true);
        let mut init = BytesMut::new();
        let c = ClientAwaitReply::start(client(&srv, EnrollMode::Open, "d"), [3; 32], &mut init);
        let mut err = BytesMut::new();
        ErrorFrame::new(ErrorCode::ID_TAKEN).encode(&mut err);
        assert_eq!(
            c.handle_reply(&err, &mut BytesMut::new()).err(),
            Some(ProtocolError::Refused(ErrorCode::ID_TAKEN))
        );
    }
}
