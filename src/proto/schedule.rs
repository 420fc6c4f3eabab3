//! The key schedule (spec section 5): every label, every derived key, every tag.
//!
//! Notation as in the spec: `H` is SHA-256, `HMAC(k, m)` is HMAC-SHA256, and
//! `HKDF(salt, ikm, info)` is HKDF-SHA256 (RFC 5869) Extract-then-Expand to 32 bytes.
//! Every MAC input and every HKDF `info` starts with a label from [`labels`]; no
//! label is a prefix of another, and each is used in exactly one place.

use alloc::boxed::Box;
use core::fmt;
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

use super::mode::Mode;
use super::SESSION_HEADER_LEN;
use super::{KEY_LEN, TAG_LEN};
use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::ChaCha20Poly1305;

pub use super::Tag;

type HmacSha256 = Hmac<Sha256>;

/// The labels of spec 5.1, as bytes. All start with `tally/1 `.
pub mod labels {
    /// MAC prefix of the ENROLL_INIT tag.
    pub const ENROLL_INIT: &[u8] = b"tally/1 enroll init";
    /// Enrollment: key of the ENROLL_REPLY tag.
    pub const ENROLL_SERVER: &[u8] = b"tally/1 enroll key server";
    /// Enrollment: key of the ENROLL_CONFIRM tag.
    pub const ENROLL_CLIENT: &[u8] = b"tally/1 enroll key client";
    /// Enrollment: key of the ENROLL_DONE tag.
    pub const ENROLL_DONE: &[u8] = b"tally/1 enroll key done";
    /// Enrollment: the identity key `k`.
    pub const ENROLL_IDENTITY: &[u8] = b"tally/1 enroll key identity";
    /// Session: client-to-server frame key.
    pub const SESSION_C2S: &[u8] = b"tally/1 session key c2s";
    /// Session: server-to-client frame key.
    pub const SESSION_S2C: &[u8] = b"tally/1 session key s2c";
    /// Session: key of the SERVER_AUTH tag.
    pub const SESSION_SERVER_FINISH: &[u8] = b"tally/1 session key server finish";
    /// Session: key of the CLIENT_FINISH tag.
    pub const SESSION_CLIENT_FINISH: &[u8] = b"tally/1 session key client finish";
    /// Encrypted mode: the key that seals SEALED_HELLO's id (spec 5.6).
    pub const SEALED_HELLO_ID: &[u8] = b"tally/1 sealed hello id";
    /// Encrypted mode: client-to-server frame key.
    pub const SEALED_C2S: &[u8] = b"tally/1 sealed key c2s";
    /// Encrypted mode: server-to-client frame key.
    pub const SEALED_S2C: &[u8] = b"tally/1 sealed key s2c";
    /// Encrypted mode: key of the SEALED_AUTH tag.
    pub const SEALED_SERVER_FINISH: &[u8] = b"tally/1 sealed key server finish";
    /// Encrypted mode: key of the CLIENT_FINISH tag.
    pub const SEALED_CLIENT_FINISH: &[u8] = b"tally/1 sealed key client finish";
    /// Both modes: a direction's next frame key (spec 5.8).
    pub const KEY_UPDATE: &[u8] = b"tally/1 key update";

    /// Every label, for the test that none is a prefix of another.
    pub const ALL: &[&[u8]] = &[
        ENROLL_INIT,
        ENROLL_SERVER,
        ENROLL_CLIENT,
        ENROLL_DONE,
        ENROLL_IDENTITY,
        SESSION_C2S,
        SESSION_S2C,
        SESSION_SERVER_FINISH,
        SESSION_CLIENT_FINISH,
        SEALED_HELLO_ID,
        SEALED_C2S,
        SEALED_S2C,
        SEALED_SERVER_FINISH,
        SEALED_CLIENT_FINISH,
        KEY_UPDATE,
    ];
}

/// How many bytes of stack [`scrubbed`] overwrites after a computation on key material:
/// twice the deepest of them (X25519 and HKDF: about 2 KiB in release builds, 8 KiB
/// without optimisation, measured by painting the stack), a margin for other CPUs' code
/// paths.
const SCRUB_LEN: usize = if cfg!(debug_assertions) {
    16 << 10
} else {
    4 << 10
};

/// The same for one frame's HMAC (about 800 bytes in release builds, 5 KiB without
/// optimisation) or AEAD (the short-frame path's 256-byte keystream above the cipher's
/// own frame, which holds its state, key words included: about 1.2 KiB): it runs twice
/// per request, where every KiB costs some 12 ns, so the margin is half the depth
/// rather than twice.
const FRAME_SCRUB_LEN: usize = if cfg!(debug_assertions) {
    8 << 10
} else {
    2048
};

/// Runs `f`, which computes on key material, then overwrites the stack it used.
///
/// Zeroize-on-drop types wipe where a value ends, not the temporaries the crypto crates
/// leave in their stack frames (HMAC pad states, HKDF's PRK, keystream blocks) nor the
/// copies a move leaves behind. Those would outlive a session in a core dump (spec
/// 13.9). `f` runs in a frame of its own, and a zeroed array as deep as `SCRUB_LEN` is
/// written from the same stack position right after it returns.
#[inline(always)]
pub fn scrubbed<R>(f: impl FnOnce() -> R) -> R {
    scrubbed_by::<SCRUB_LEN, R>(f)
}

#[inline(always)]
fn scrubbed_by<const N: usize, R>(f: impl FnOnce() -> R) -> R {
    let r = run_apart(f);
    scrub_stack::<N>();
    r
}

#[inline(never)]
fn run_apart<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[inline(never)]
fn scrub_stack<const N: usize>() {
    let mut wipe = [0u8; N];
    // The optimiser must assume the zeros are read: they are written.
    core::hint::black_box(&mut wipe);
}

/// 32 bytes of secret key material: zeroed on drop, never printed.
///
/// The bytes live on the heap, in one place for the key's whole life: moving a
/// `SecretKey` (into a future, out of a function) moves a pointer, and leaves no copy
/// of the key behind.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecretKey(Box<[u8; KEY_LEN]>);

impl SecretKey {
    /// Wraps key bytes (the caller's copy should be zeroized by the caller).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let mut key = Self::zeroed();
        key.0.copy_from_slice(&bytes);
        key
    }

    /// A key whose bytes `fill` writes in place, so that they are never copied.
    pub fn fill<E>(fill: impl FnOnce(&mut [u8; KEY_LEN]) -> Result<(), E>) -> Result<Self, E> {
        let mut key = Self::zeroed();
        fill(&mut key.0)?;
        Ok(key)
    }

    fn zeroed() -> Self {
        SecretKey(Box::new([0; KEY_LEN]))
    }

    /// The key bytes. Keep the borrow short; never log them.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Constant-time equality.
    pub fn ct_eq(&self, other: &SecretKey) -> bool {
        use subtle::ConstantTimeEq;
        self.0.ct_eq(&other.0[..]).into()
    }
}

impl Clone for SecretKey {
    /// Copies heap to heap (a derived `Clone` would pass the bytes through the stack).
    fn clone(&self) -> Self {
        let mut key = Self::zeroed();
        key.0.copy_from_slice(&self.0[..]);
        key
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

/// `HMAC(key, parts[0] ‖ parts[1] ‖ ...)`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> Tag {
    scrubbed(|| {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    })
}

/// Verifies `tag == HMAC(key, parts...)` in constant time.
pub fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    scrubbed(|| {
        let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p);
        }
        mac.verify_slice(tag).is_ok()
    })
}

/// An HMAC key whose inner and outer pads are hashed once, then cloned per frame
/// (spec 8.2 keys are used for every frame of a session). The pad states are as good as
/// the key: they live on the heap in one place, are wiped on drop, and every per-frame
/// computation is [`scrubbed`].
#[derive(Clone)]
pub struct FrameMac(Box<HmacSha256>);

impl FrameMac {
    /// Prepares `key`.
    pub fn new(key: &SecretKey) -> Self {
        scrubbed(|| {
            FrameMac(Box::new(
                HmacSha256::new_from_slice(key.expose()).expect("any key length"),
            ))
        })
    }

    /// The tag of `data`.
    pub fn tag(&self, data: &[u8]) -> Tag {
        scrubbed_by::<FRAME_SCRUB_LEN, _>(|| {
            let mut mac = (*self.0).clone();
            mac.update(data);
            mac.finalize().into_bytes().into()
        })
    }

    /// Whether `tag` is the tag of `data`, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        scrubbed_by::<FRAME_SCRUB_LEN, _>(|| {
            let mut mac = (*self.0).clone();
            mac.update(data);
            mac.verify_slice(tag).is_ok()
        })
    }
}

impl fmt::Debug for FrameMac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FrameMac(..)")
    }
}

/// The running SHA-256 over the exact bytes of a handshake's frames (spec 5.2).
#[derive(Clone, Default)]
pub struct Transcript(Sha256);

impl Transcript {
    /// Adds bytes, in the order they were sent.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The hash of everything added so far; the transcript can keep growing.
    pub fn hash(&self) -> [u8; 32] {
        self.0.clone().finalize().into()
    }
}

/// `HKDF-Expand(prk, label ‖ th, 32)` for each label, from one `HKDF-Extract(salt, ikm)`.
fn expand_all<const N: usize>(
    salt: &[u8],
    ikm: &[u8],
    th: &[u8],
    labels: [&[u8]; N],
) -> [SecretKey; N] {
    scrubbed(|| {
        let (mut prk, hk) = Hkdf::<Sha256>::extract(Some(salt), ikm);
        prk.as_mut_slice().zeroize();
        labels.map(|label| {
            SecretKey::fill(|okm| hk.expand_multi_info(&[label, th], okm))
                .expect("32 bytes is a valid length")
        })
    })
}

/// The keys of an enrollment after ENROLL_REPLY (spec 5.4).
pub struct EnrollKeys {
    /// Keys the ENROLL_REPLY tag.
    pub server: SecretKey,
    /// Keys the ENROLL_CONFIRM tag.
    pub client: SecretKey,
    /// Keys the ENROLL_DONE tag.
    pub done: SecretKey,
    /// The identity key `k` both sides keep.
    pub identity: SecretKey,
}

impl EnrollKeys {
    /// `HKDF(salt = c, ikm = DH(x,Y) ‖ DH(x,S), info = label ‖ th2)` for each key.
    pub fn derive(
        credential: &SecretKey,
        dh_ephemeral: &SecretKey,
        dh_static: &SecretKey,
        th2: &[u8; 32],
    ) -> Self {
        let mut ikm = [0u8; 64];
        ikm[..32].copy_from_slice(dh_ephemeral.expose());
        ikm[32..].copy_from_slice(dh_static.expose());
        let [server, client, done, identity] = expand_all(
            credential.expose(),
            &ikm,
            th2,
            [
                labels::ENROLL_SERVER,
                labels::ENROLL_CLIENT,
                labels::ENROLL_DONE,
                labels::ENROLL_IDENTITY,
            ],
        );
        ikm.zeroize();
        EnrollKeys {
            server,
            client,
            done,
            identity,
        }
    }
}

/// The keys of a session after SERVER_AUTH (spec 5.5) or SEALED_AUTH (spec 5.7).
pub struct SessionKeys {
    /// Which mode they are for: how `c2s` and `s2c` protect frames.
    pub mode: Mode,
    /// Keys every client-to-server session frame.
    pub c2s: SecretKey,
    /// Keys every server-to-client session frame.
    pub s2c: SecretKey,
    /// Keys the SERVER_AUTH tag.
    pub server_finish: SecretKey,
    /// Keys the CLIENT_FINISH tag.
    pub client_finish: SecretKey,
}

impl SessionKeys {
    /// `HKDF(salt = nc ‖ ns, ikm = k, info = label ‖ th2)` for each key.
    pub fn derive(k: &SecretKey, nc: &[u8; 32], ns: &[u8; 32], th2: &[u8; 32]) -> Self {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(nc);
        salt[32..].copy_from_slice(ns);
        let [c2s, s2c, server_finish, client_finish] = expand_all(
            &salt,
            k.expose(),
            th2,
            [
                labels::SESSION_C2S,
                labels::SESSION_S2C,
                labels::SESSION_SERVER_FINISH,
                labels::SESSION_CLIENT_FINISH,
            ],
        );
        SessionKeys {
            mode: Mode::Authenticated,
            c2s,
            s2c,
            server_finish,
            client_finish,
        }
    }

    /// The encrypted mode's keys (spec 5.7): `HKDF(salt = E ‖ F,
    /// ikm = k ‖ dh_ee ‖ dh_es, info = label ‖ th2)` for each key.
    pub fn derive_sealed(
        k: &SecretKey,
        client_ephemeral: &[u8; 32],
        server_ephemeral: &[u8; 32],
        dh_ee: &SecretKey,
        dh_es: &SecretKey,
        th2: &[u8; 32],
    ) -> Self {
        let mut salt = [0u8; 64];
        salt[..32].copy_from_slice(client_ephemeral);
        salt[32..].copy_from_slice(server_ephemeral);
        let mut ikm = zeroize::Zeroizing::new([0u8; 96]);
        ikm[..32].copy_from_slice(k.expose());
        ikm[32..64].copy_from_slice(dh_ee.expose());
        ikm[64..].copy_from_slice(dh_es.expose());
        let [c2s, s2c, server_finish, client_finish] = expand_all(
            &salt,
            &ikm[..],
            th2,
            [
                labels::SEALED_C2S,
                labels::SEALED_S2C,
                labels::SEALED_SERVER_FINISH,
                labels::SEALED_CLIENT_FINISH,
            ],
        );
        SessionKeys {
            mode: Mode::Encrypted,
            c2s,
            s2c,
            server_finish,
            client_finish,
        }
    }
}

/// `K_id = HKDF(salt = E ‖ S, ikm = dh_es, info = "tally/1 sealed hello id")` (spec 5.6).
pub fn sealed_id_key(
    client_ephemeral: &[u8; 32],
    server_static: &[u8; 32],
    dh_es: &SecretKey,
) -> SecretKey {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(client_ephemeral);
    salt[32..].copy_from_slice(server_static);
    let [key] = expand_all(&salt, dh_es.expose(), &[], [labels::SEALED_HELLO_ID]);
    key
}

/// `K_next = HKDF(salt = empty, ikm = K_current, info = "tally/1 key update")` (spec 5.8).
pub fn next_key(current: &SecretKey) -> SecretKey {
    let [key] = expand_all(&[], current.expose(), &[], [labels::KEY_UPDATE]);
    key
}

/// The AEAD of the encrypted mode (spec 3.1): ChaCha20-Poly1305 (RFC 8439), its key on
/// the heap in one place, wiped on drop.
///
/// A frame whose payload is at most [`SHORT_FRAME`] bytes is sealed and opened with the
/// keystream of the Poly1305 key and of the payload made in one call of four ChaCha20
/// blocks: the cipher's SIMD backends make four blocks whatever they are asked for, and
/// the AEAD crate asks twice (the key's block, then the payload's), so a 64-byte frame
/// paid for eight (benches/README.md section 13). Longer frames go through the AEAD
/// crate. Both are RFC 8439 exactly: the unit tests hold them to each other at every
/// length, and the vectors (spec 12) to the spec.
pub struct Aead(Box<SecretKey>);

impl Clone for Aead {
    /// The key passes the stack on its way: scrubbed after.
    fn clone(&self) -> Self {
        scrubbed(|| Aead(self.0.clone()))
    }
}

/// ChaCha20-Poly1305's nonce: `u32 direction ‖ u64 seq` for session frames (spec 8.2),
/// zero for the sealed id (spec 5.6).
pub type AeadNonce = [u8; 12];

/// The longest payload sealed with one four-block keystream call: the first block keys
/// Poly1305, the other three cover the payload.
pub const SHORT_FRAME: usize = 3 * 64;

/// Writes into `ks` the keystream of (`key`, `nonce`) from block 0 on, for a payload of
/// `len` bytes (at most [`SHORT_FRAME`]): block 0 keys Poly1305, the next ones encrypt the
/// payload. On x86 all four blocks, which the SIMD backends make in one go whatever is
/// asked; elsewhere (a device's portable backend makes one block at a time) only those
/// needed.
fn keystream(key: &[u8; 32], nonce: &AeadNonce, len: usize, ks: &mut [u8; 256]) {
    use chacha20::cipher::{KeyIvInit, StreamCipher};
    let n = keystream_len(len, cfg!(any(target_arch = "x86", target_arch = "x86_64")));
    chacha20::ChaCha20::new(key.into(), nonce.into()).apply_keystream(&mut ks[..n]);
}

/// How much keystream a payload of `len` bytes takes: the Poly1305 key's block and the
/// payload's, or all four blocks where the cipher makes four at once anyway.
fn keystream_len(len: usize, four_at_once: bool) -> usize {
    if four_at_once {
        256
    } else {
        64 * (1 + len.div_ceil(64))
    }
}

/// Poly1305 over `ad` and `ct` as RFC 8439 section 2.8 lays them out, keyed with the
/// first 32 bytes of `ks`.
fn poly1305(ks: &[u8; 256], ad: &[u8], ct: &[u8]) -> poly1305::Poly1305 {
    use poly1305::universal_hash::{KeyInit, UniversalHash};
    let key: &[u8; 32] = ks[..32].try_into().expect("32 bytes");
    let mut mac = poly1305::Poly1305::new(key.into());
    mac.update_padded(ad);
    mac.update_padded(ct);
    let mut lengths = poly1305::Block::default();
    lengths[..8].copy_from_slice(&(ad.len() as u64).to_le_bytes());
    lengths[8..].copy_from_slice(&(ct.len() as u64).to_le_bytes());
    mac.update(&[lengths]);
    mac
}

impl Aead {
    /// Prepares `key`.
    pub fn new(key: &SecretKey) -> Self {
        scrubbed(|| Aead(Box::new(key.clone())))
    }

    fn full(&self) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(self.0.expose().into())
    }

    /// Encrypts `buf` in place and returns the 16-byte tag.
    pub fn seal(&self, nonce: &AeadNonce, ad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        use poly1305::universal_hash::UniversalHash;
        scrubbed_by::<FRAME_SCRUB_LEN, _>(|| {
            if buf.len() > SHORT_FRAME {
                return self
                    .full()
                    .encrypt_inout_detached(nonce.into(), ad, buf.into())
                    .expect("a session frame is within ChaCha20-Poly1305's limits")
                    .into();
            }
            let mut ks = [0u8; 256];
            keystream(self.0.expose(), nonce, buf.len(), &mut ks);
            for (b, k) in buf.iter_mut().zip(&ks[64..]) {
                *b ^= k;
            }
            let tag = poly1305(&ks, ad, buf).finalize().into();
            ks.zeroize();
            tag
        })
    }

    /// Checks `tag` (in constant time) and only then decrypts `buf` in place; on a bad
    /// tag `buf` is left as it was and `false` is returned.
    #[must_use]
    pub fn open(&self, nonce: &AeadNonce, ad: &[u8], buf: &mut [u8], tag: &[u8]) -> bool {
        use poly1305::universal_hash::UniversalHash;
        let Ok(tag) = chacha20poly1305::Tag::try_from(tag) else {
            return false;
        };
        scrubbed_by::<FRAME_SCRUB_LEN, _>(|| {
            if buf.len() > SHORT_FRAME {
                return self
                    .full()
                    .decrypt_inout_detached(nonce.into(), ad, buf.into(), &tag)
                    .is_ok();
            }
            let mut ks = [0u8; 256];
            keystream(self.0.expose(), nonce, buf.len(), &mut ks);
            // `verify` compares in constant time.
            let ok = poly1305(&ks, ad, buf).verify(&tag).is_ok();
            if ok {
                for (b, k) in buf.iter_mut().zip(&ks[64..]) {
                    *b ^= k;
                }
            }
            ks.zeroize();
            ok
        })
    }
}

impl fmt::Debug for Aead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Aead(..)")
    }
}

/// One direction's frame key in a session, in either mode, with what it needs to move
/// forward (spec 8.7): the key itself and its prepared form.
#[derive(Clone)]
pub struct FrameKey {
    key: SecretKey,
    protect: Protect,
}

#[derive(Clone)]
enum Protect {
    Mac(FrameMac),
    Aead(Aead),
}

impl FrameKey {
    /// Prepares `key` for `mode`.
    pub fn new(key: &SecretKey, mode: Mode) -> Self {
        FrameKey {
            protect: Self::prepare(key, mode),
            key: key.clone(),
        }
    }

    fn prepare(key: &SecretKey, mode: Mode) -> Protect {
        match mode {
            Mode::Authenticated => Protect::Mac(FrameMac::new(key)),
            Mode::Encrypted => Protect::Aead(Aead::new(key)),
        }
    }

    /// The mode this key protects frames in.
    pub fn mode(&self) -> Mode {
        match self.protect {
            Protect::Mac(_) => Mode::Authenticated,
            Protect::Aead(_) => Mode::Encrypted,
        }
    }

    /// Replaces the key with the next one (spec 5.8); the current one is wiped.
    pub fn update(&mut self) {
        let mode = self.mode();
        self.key = next_key(&self.key);
        self.protect = Self::prepare(&self.key, mode);
    }

    /// Protects the frame in `frame` (header and fields in the clear, nothing after):
    /// appends the HMAC tag, or encrypts the fields in place and appends the AEAD tag
    /// (spec 8.2).
    pub fn seal(&self, nonce: &AeadNonce, frame: &mut bytes::BytesMut) {
        self.seal_from(nonce, frame, 0)
    }

    /// [`FrameKey::seal`] for the frame that starts at `start` in `out` and runs to its
    /// end (what comes before is other frames, untouched).
    pub fn seal_from(&self, nonce: &AeadNonce, out: &mut bytes::BytesMut, start: usize) {
        let tag = match &self.protect {
            Protect::Mac(mac) => {
                let tag = mac.tag(&out[start..]);
                out.extend_from_slice(&tag);
                return;
            }
            Protect::Aead(aead) => {
                let (header, fields) = out[start..].split_at_mut(SESSION_HEADER_LEN);
                aead.seal(nonce, header, fields)
            }
        };
        out.extend_from_slice(&tag);
    }

    /// Checks a whole authenticated-mode frame's HMAC tag in constant time, without
    /// touching it (spec 8.3 step 4); `false` for an encrypted-mode key, which must
    /// [`FrameKey::open`].
    #[must_use]
    pub fn verify(&self, frame: &[u8]) -> bool {
        match &self.protect {
            Protect::Mac(mac) => {
                let (body, tag) = frame.split_at(frame.len() - TAG_LEN);
                mac.verify(body, tag)
            }
            Protect::Aead(_) => false,
        }
    }

    /// Checks a whole frame's tag in constant time (spec 8.3 step 4); in the encrypted
    /// mode decrypts its fields in place once the tag verified.
    #[must_use]
    pub fn open(&self, nonce: &AeadNonce, frame: &mut [u8]) -> bool {
        let split = frame.len() - self.mode().tag_len();
        let (body, tag) = frame.split_at_mut(split);
        match &self.protect {
            Protect::Mac(mac) => mac.verify(body, tag),
            Protect::Aead(aead) => {
                let (header, fields) = body.split_at_mut(SESSION_HEADER_LEN);
                aead.open(nonce, header, fields, tag)
            }
        }
    }
}

impl fmt::Debug for FrameKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FrameKey({}, ..)", self.mode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The short-frame path and the AEAD crate are one function: the same ciphertext
    /// and tag at every payload length across the boundary, with associated data of
    /// several lengths; each opens the other's output; a flipped bit anywhere is
    /// refused and leaves the buffer as it was.
    /// The keystream covers the key's block and the whole payload, within the buffer,
    /// on every target.
    #[test]
    fn the_keystream_covers_every_short_payload() {
        for len in 0..=SHORT_FRAME {
            for four in [false, true] {
                let n = keystream_len(len, four);
                assert!(
                    n >= 64 + len && n <= 256 && n.is_multiple_of(64),
                    "{len} {four}: {n}"
                );
            }
        }
    }

    /// RFC 8439 section 2.8.2's AEAD example (a 114-byte payload: the short path).
    #[test]
    fn the_short_frame_aead_gives_rfc_8439s_example() {
        let key = SecretKey::from_bytes(core::array::from_fn(|i| 0x80 + i as u8));
        let nonce: AeadNonce = [7, 0, 0, 0, 0x40, 0x41, 0x42, 0x43, 0x44, 0x45, 0x46, 0x47];
        let ad = [
            0x50, 0x51, 0x52, 0x53, 0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc5, 0xc6, 0xc7,
        ];
        let mut buf = *b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        assert!(buf.len() <= SHORT_FRAME);
        let tag = Aead::new(&key).seal(&nonce, &ad, &mut buf);
        assert_eq!(
            tag,
            [
                0x1a, 0xe1, 0x0b, 0x59, 0x4f, 0x09, 0xe2, 0x6a, 0x7e, 0x90, 0x2e, 0xcb, 0xd0, 0x60,
                0x06, 0x91
            ]
        );
        assert_eq!(buf[..8], [0xd3, 0x1a, 0x8d, 0x34, 0x64, 0x8e, 0x60, 0xdb]);
    }

    #[test]
    fn the_short_frame_aead_is_chacha20_poly1305_at_every_length() {
        let key = SecretKey::from_bytes(core::array::from_fn(|i| i as u8 * 7 + 1));
        let aead = Aead::new(&key);
        let reference = ChaCha20Poly1305::new(key.expose().into());
        for len in 0..=SHORT_FRAME + 70 {
            for ad_len in [0, 1, 16, 17, 32, 33, 38, SESSION_HEADER_LEN] {
                let nonce: AeadNonce = core::array::from_fn(|i| (i * 31 + len) as u8);
                let ad: alloc::vec::Vec<u8> = (0..ad_len).map(|i| (i * 3 + len) as u8).collect();
                let plain: alloc::vec::Vec<u8> =
                    (0..len).map(|i| (i * 13 + ad_len) as u8).collect();
                let mut ours = plain.clone();
                let tag = aead.seal(&nonce, &ad, &mut ours);
                let mut theirs = plain.clone();
                let their_tag: [u8; 16] = reference
                    .encrypt_inout_detached((&nonce).into(), &ad, theirs.as_mut_slice().into())
                    .unwrap()
                    .into();
                assert_eq!((&ours, tag), (&theirs, their_tag), "len {len}, ad {ad_len}");
                let mut opened = ours.clone();
                assert!(aead.open(&nonce, &ad, &mut opened, &tag));
                assert_eq!(opened, plain);
                // Tampered: the tag, the ciphertext, the associated data.
                let mut bad_tag = tag;
                bad_tag[len % 16] ^= 1;
                let mut buf = ours.clone();
                assert!(!aead.open(&nonce, &ad, &mut buf, &bad_tag));
                assert_eq!(buf, ours, "left as it was");
                if len > 0 {
                    let mut buf = ours.clone();
                    buf[len / 2] ^= 0x80;
                    let before = buf.clone();
                    assert!(!aead.open(&nonce, &ad, &mut buf, &tag));
                    assert_eq!(buf, before);
                }
                if ad_len > 0 {
                    let mut bad_ad = ad.clone();
                    bad_ad[0] ^= 1;
                    let mut buf = ours.clone();
                    assert!(!aead.open(&nonce, &bad_ad, &mut buf, &tag));
                    assert_eq!(buf, ours);
                }
            }
        }
    }

    #[test]
    fn labels_are_distinct_and_prefix_free() {
        for (i, a) in labels::ALL.iter().enumerate() {
            assert!(a.starts_with(b"tally/1 "));
            for (j, b) in labels::ALL.iter().enumerate() {
                if i != j {
                    assert!(!b.starts_with(a), "{:?} is a prefix of {:?}", a, b);
                }
            }
        }
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        let tag = hmac(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex::encode(tag),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert!(verify(b"Jefe", &[b"what do ya want for nothing?"], &tag));
        let mut bad = tag;
        bad[31] ^= 1;
        assert!(!verify(b"Jefe", &[b"what do ya want for nothing?"], &bad));
    }

    #[test]
    fn frame_mac_equals_plain_hmac() {
        let key = SecretKey::from_bytes([0x42; 32]);
        let mac = FrameMac::new(&key);
        assert_eq!(mac.tag(b"abc"), hmac(&[0x42; 32], &[b"abc"]));
        assert!(mac.verify(b"abc", &mac.tag(b"abc")));
        assert!(!mac.verify(b"abd", &mac.tag(b"abc")));
    }

    #[test]
    fn secret_key_debug_is_redacted() {
        let key = SecretKey::from_bytes([0xab; 32]);
        let shown = format!("{key:?}");
        assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
    }

    #[test]
    fn session_keys_are_pairwise_distinct() {
        let keys = SessionKeys::derive(
            &SecretKey::from_bytes([3; 32]),
            &[1; 32],
            &[2; 32],
            &[0; 32],
        );
        let all = [
            &keys.c2s,
            &keys.s2c,
            &keys.server_finish,
            &keys.client_finish,
        ];
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(!a.ct_eq(b));
            }
        }
    }
}
