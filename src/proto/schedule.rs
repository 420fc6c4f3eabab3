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

use super::KEY_LEN;

/// A 32-byte tag: HMAC-SHA256, never truncated.
pub type Tag = [u8; 32];

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
/// optimisation): it runs twice per request, where every KiB costs some 12 ns, so the
/// margin is half the depth rather than twice.
const FRAME_SCRUB_LEN: usize = if cfg!(debug_assertions) {
    8 << 10
} else {
    1280
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
    th: &[u8; 32],
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

/// The keys of a session after SERVER_AUTH (spec 5.5).
pub struct SessionKeys {
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
            c2s,
            s2c,
            server_finish,
            client_finish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
