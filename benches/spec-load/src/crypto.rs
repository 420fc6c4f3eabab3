//! The primitives of spec section 3.1, and the labels of 5.1.

use chacha20poly1305::{AeadInOut, ChaCha20Poly1305, KeyInit, Nonce, Tag};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub type Key = [u8; 32];

pub const L_ENROLL_INIT: &[u8] = b"tally/1 enroll init";
pub const L_ENROLL_SERVER: &[u8] = b"tally/1 enroll key server";
pub const L_ENROLL_CLIENT: &[u8] = b"tally/1 enroll key client";
pub const L_ENROLL_DONE: &[u8] = b"tally/1 enroll key done";
pub const L_ENROLL_IDENTITY: &[u8] = b"tally/1 enroll key identity";
pub const L_SESSION_C2S: &[u8] = b"tally/1 session key c2s";
pub const L_SESSION_S2C: &[u8] = b"tally/1 session key s2c";
pub const L_SESSION_SF: &[u8] = b"tally/1 session key server finish";
pub const L_SESSION_CF: &[u8] = b"tally/1 session key client finish";
pub const L_SEALED_ID: &[u8] = b"tally/1 sealed hello id";
pub const L_SEALED_C2S: &[u8] = b"tally/1 sealed key c2s";
pub const L_SEALED_S2C: &[u8] = b"tally/1 sealed key s2c";
pub const L_SEALED_SF: &[u8] = b"tally/1 sealed key server finish";
pub const L_SEALED_CF: &[u8] = b"tally/1 sealed key client finish";
pub const L_KEY_UPDATE: &[u8] = b"tally/1 key update";

/// `H(m)`: SHA-256.
pub fn h(m: &[u8]) -> Key {
    let d = Sha256::digest(m);
    let mut o = [0u8; 32];
    o.copy_from_slice(&d);
    o
}

/// A precomputed HMAC-SHA256 key state (8.2: "SHOULD precompute the HMAC key state").
#[derive(Clone)]
pub struct MacKey(Hmac<Sha256>);

impl MacKey {
    pub fn new(key: &[u8]) -> Self {
        MacKey(<Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length"))
    }
    pub fn tag_parts(&self, parts: &[&[u8]]) -> Key {
        let mut m = self.0.clone();
        for p in parts {
            m.update(p);
        }
        let t = m.finalize().into_bytes();
        let mut o = [0u8; 32];
        o.copy_from_slice(&t);
        o
    }
    pub fn tag(&self, m: &[u8]) -> Key {
        self.tag_parts(&[m])
    }
}

/// `HMAC(key, m)`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> Key {
    MacKey::new(key).tag_parts(parts)
}

/// Constant-time comparison of two tags.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// `HKDF(salt, ikm, info)` of 3.1: one extract, one expand block of 32 bytes. An empty salt
/// is 32 zero bytes (HMAC pads any short key with zeros, so `Some(&[])` is the same key).
pub fn hkdf(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Key {
    let salt: &[u8] = if salt.is_empty() { &[0u8; 32] } else { salt };
    let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut o = [0u8; 32];
    hk.expand_multi_info(info, &mut o).expect("32 bytes is a valid HKDF length");
    o
}

/// `X25519(a, B)` with the all-zero check of 3.1 (`weak_key`).
pub fn x25519(a: &Key, b: &Key) -> Option<Key> {
    let r = x25519_dalek::x25519(*a, *b);
    if r.iter().all(|&x| x == 0) {
        None
    } else {
        Some(r)
    }
}

/// `X25519(a, 9)`.
pub fn x25519_base(a: &Key) -> Key {
    x25519_dalek::x25519(*a, x25519_dalek::X25519_BASEPOINT_BYTES)
}

/// A ChaCha20-Poly1305 key (RFC 8439).
#[derive(Clone)]
pub struct AeadKey(ChaCha20Poly1305);

impl AeadKey {
    pub fn new(key: &Key) -> Self {
        AeadKey(ChaCha20Poly1305::new_from_slice(key).expect("32-byte key"))
    }
    /// Encrypts `buf` in place and returns the 16-byte tag.
    pub fn seal_in_place(&self, nonce: &[u8; 12], ad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        let n = Nonce::from(*nonce);
        let t = self
            .0
            .encrypt_inout_detached(&n, ad, buf.into())
            .expect("lengths are far below the AEAD's limits");
        let mut o = [0u8; 16];
        o.copy_from_slice(&t);
        o
    }
    /// Checks the tag (in constant time, before releasing anything) and decrypts in place.
    pub fn open_in_place(&self, nonce: &[u8; 12], ad: &[u8], buf: &mut [u8], tag: &[u8]) -> bool {
        let n = Nonce::from(*nonce);
        let mut t = Tag::default();
        t.copy_from_slice(tag);
        self.0.decrypt_inout_detached(&n, ad, buf.into(), &t).is_ok()
    }
}

/// `AEAD(K, n, ad, m)`: ciphertext followed by the tag.
pub fn aead_seal(key: &Key, nonce: &[u8; 12], ad: &[u8], m: &[u8]) -> Vec<u8> {
    let mut buf = m.to_vec();
    let tag = AeadKey::new(key).seal_in_place(nonce, ad, &mut buf);
    buf.extend_from_slice(&tag);
    buf
}

/// Fills `buf` from the operating system's secure generator (3.1).
pub fn random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random generator failed");
}

pub fn random32() -> Key {
    let mut k = [0u8; 32];
    random(&mut k);
    k
}

pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Parses hex (either case), `None` on anything else.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 {
        return None;
    }
    fn d(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    s.chunks(2).map(|p| Some(d(p[0])? << 4 | d(p[1])?)).collect()
}

pub fn unhex32(s: &str) -> Option<Key> {
    let v = unhex(s)?;
    v.try_into().ok()
}
