//! The session handshake (spec 7, key schedule 5.5 to 5.7), client side; plus the few
//! server-side computations the vectors need to rebuild SERVER_AUTH and SEALED_AUTH.

use crate::crypto::*;
use crate::wire::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Authenticated,
    Encrypted,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Authenticated => "authenticated",
            Mode::Encrypted => "encrypted",
        }
    }
}

#[derive(Clone, Debug)]
pub struct SessionKeys {
    pub c2s: Key,
    pub s2c: Key,
    pub sf: Key,
    pub cf: Key,
}

/// 5.5: the authenticated mode's keys.
pub fn keys_authenticated(nc: &Key, ns: &Key, k: &Key, th2: &Key) -> SessionKeys {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(nc);
    salt[32..].copy_from_slice(ns);
    SessionKeys {
        c2s: hkdf(&salt, k, &[L_SESSION_C2S, th2]),
        s2c: hkdf(&salt, k, &[L_SESSION_S2C, th2]),
        sf: hkdf(&salt, k, &[L_SESSION_SF, th2]),
        cf: hkdf(&salt, k, &[L_SESSION_CF, th2]),
    }
}

/// 5.7: the encrypted mode's keys.
pub fn keys_encrypted(e_pub: &Key, f_pub: &Key, k: &Key, dh_ee: &Key, dh_es: &Key, th2: &Key) -> SessionKeys {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(e_pub);
    salt[32..].copy_from_slice(f_pub);
    let mut ikm = [0u8; 96];
    ikm[..32].copy_from_slice(k);
    ikm[32..64].copy_from_slice(dh_ee);
    ikm[64..].copy_from_slice(dh_es);
    SessionKeys {
        c2s: hkdf(&salt, &ikm, &[L_SEALED_C2S, th2]),
        s2c: hkdf(&salt, &ikm, &[L_SEALED_S2C, th2]),
        sf: hkdf(&salt, &ikm, &[L_SEALED_SF, th2]),
        cf: hkdf(&salt, &ikm, &[L_SEALED_CF, th2]),
    }
}

/// 5.6: `K_id = HKDF(E ‖ S, dh_es, "tally/1 sealed hello id")`.
pub fn key_id(e_pub: &Key, s_pub: &Key, dh_es: &Key) -> Key {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(e_pub);
    salt[32..].copy_from_slice(s_pub);
    hkdf(&salt, dh_es, &[L_SEALED_ID])
}

/// 4.3: the 69 bytes sealed into SEALED_HELLO.
pub fn sealed_plaintext(id: &[u8], limit: u32) -> [u8; 69] {
    let mut p = [0u8; 69];
    p[0] = id.len() as u8;
    p[1..1 + id.len()].copy_from_slice(id);
    p[65..].copy_from_slice(&limit.to_be_bytes());
    p
}

/// What the client holds once SERVER_AUTH (or SEALED_AUTH) verified.
#[derive(Clone, Debug)]
pub struct Established {
    pub keys: SessionKeys,
    /// The server's session frame limit (`Ls`) and keepalive (`K`, ms).
    pub server_limit: u32,
    pub keepalive_ms: u32,
    pub client_finish: Vec<u8>,
    pub th2: Key,
    pub th3: Key,
    pub dh_ee: Option<Key>,
}

enum Flavor {
    Plain { nc: Key },
    Sealed { e: Key, e_pub: Key, dh_es: Key },
}

/// A client after sending HELLO or SEALED_HELLO (state AwaitAuth of 7.2).
pub struct ClientHello {
    k: Key,
    hello: Vec<u8>,
    flavor: Flavor,
    /// Derived values, for the vectors.
    pub key_id: Option<Key>,
    pub sealed_plaintext: Option<[u8; 69]>,
}

impl ClientHello {
    /// 7.1 step 1: `u32(39 + n) | 10 | 01 | u8(n) | id | nc | u32(L)`.
    pub fn authenticated(id: &[u8], k: Key, nc: Key, limit: u32) -> Self {
        let n = id.len();
        let mut f = Vec::with_capacity(43 + n);
        f.extend_from_slice(&(39 + n as u32).to_be_bytes());
        f.push(HELLO);
        f.push(1);
        f.push(n as u8);
        f.extend_from_slice(id);
        f.extend_from_slice(&nc);
        f.extend_from_slice(&limit.to_be_bytes());
        ClientHello { k, hello: f, flavor: Flavor::Plain { nc }, key_id: None, sealed_plaintext: None }
    }

    /// 7.7 step 1 (5.6): SEALED_HELLO, with the ephemeral secret `e` given.
    pub fn encrypted(id: &[u8], k: Key, s_pub: Key, e: Key, limit: u32) -> Result<Self, Fail> {
        let e_pub = x25519_base(&e);
        let dh_es = x25519(&e, &s_pub).ok_or(Fail::WeakKey)?;
        let kid = key_id(&e_pub, &s_pub, &dh_es);
        let mut f = Vec::with_capacity(123);
        f.extend_from_slice(&119u32.to_be_bytes());
        f.push(SEALED_HELLO);
        f.push(1);
        f.extend_from_slice(&e_pub);
        let pt = sealed_plaintext(id, limit);
        let sealed = aead_seal(&kid, &[0u8; 12], &f[..38], &pt);
        f.extend_from_slice(&sealed);
        debug_assert_eq!(f.len(), 123);
        Ok(ClientHello {
            k,
            hello: f,
            flavor: Flavor::Sealed { e, e_pub, dh_es },
            key_id: Some(kid),
            sealed_plaintext: Some(pt),
        })
    }

    pub fn hello(&self) -> &[u8] {
        &self.hello
    }

    pub fn dh_es(&self) -> Option<Key> {
        match &self.flavor {
            Flavor::Sealed { dh_es, .. } => Some(*dh_es),
            _ => None,
        }
    }

    /// 7.2 client rows 2 to 6: checks the server's answer and makes CLIENT_FINISH.
    /// `frame` passed the length checks of 3.2 with the limit 256.
    pub fn on_auth(self, frame: &[u8]) -> Result<Established, Fail> {
        if frame.len() >= 5 && frame[4] == ERROR {
            return Err(Fail::Refused(error_code(frame)));
        }
        let want = match self.flavor {
            Flavor::Plain { .. } => SERVER_AUTH,
            Flavor::Sealed { .. } => SEALED_AUTH,
        };
        if frame.len() < 5 || frame[4] != want {
            let got = frame.get(4).copied().unwrap_or(0);
            return Err(Fail::Malformed(format!(
                "expected {} in answer to {}, got {} ({got:#04x})",
                type_name(want),
                type_name(self.hello[4]),
                type_name(got)
            )));
        }
        if frame.len() != 77 {
            return Err(Fail::Malformed(format!("{} of length {}, not 73", type_name(want), frame.len() - 4)));
        }
        let ls = u32_at(frame, 37);
        let ka = u32_at(frame, 41);
        if !(MIN_FRAME_LIMIT..=MAX_FRAME_LIMIT).contains(&ls) {
            return Err(Fail::Malformed(format!("server max_frame_len {ls} out of range")));
        }
        if !(MIN_KEEPALIVE..=MAX_KEEPALIVE).contains(&ka) {
            return Err(Fail::Malformed(format!("server keepalive {ka} ms out of range")));
        }
        let mut transcript = Vec::with_capacity(123 + 77 + 37);
        transcript.extend_from_slice(&self.hello);
        transcript.extend_from_slice(&frame[..45]);
        let th2 = h(&transcript);
        let r: Key = frame[5..37].try_into().unwrap();
        let (keys, dh_ee) = match self.flavor {
            Flavor::Plain { nc } => (keys_authenticated(&nc, &r, &self.k, &th2), None),
            Flavor::Sealed { e, e_pub, dh_es } => {
                let dh_ee = x25519(&e, &r).ok_or(Fail::WeakKey)?;
                (keys_encrypted(&e_pub, &r, &self.k, &dh_ee, &dh_es, &th2), Some(dh_ee))
            }
        };
        let expect = hmac(&keys.sf, &[&th2]);
        if !ct_eq(&expect, &frame[45..77]) {
            return Err(Fail::BadTag);
        }
        transcript.extend_from_slice(&frame[45..77]);
        let header = [0, 0, 0, 0x21, CLIENT_FINISH];
        transcript.extend_from_slice(&header);
        let th3 = h(&transcript);
        let tag = hmac(&keys.cf, &[&th3]);
        let mut cf = header.to_vec();
        cf.extend_from_slice(&tag);
        Ok(Established {
            keys,
            server_limit: ls,
            keepalive_ms: ka,
            client_finish: cf,
            th2,
            th3,
            dh_ee,
        })
    }
}

/// Server side, for the vectors only: SERVER_AUTH in answer to `hello` (7.1 step 2).
pub fn server_auth(hello: &[u8], k: &Key, ns: &Key, limit: u32, keepalive: u32) -> Vec<u8> {
    let nc: Key = hello[hello.len() - 36..hello.len() - 4].try_into().unwrap();
    let mut f = Vec::with_capacity(77);
    f.extend_from_slice(&73u32.to_be_bytes());
    f.push(SERVER_AUTH);
    f.extend_from_slice(ns);
    f.extend_from_slice(&limit.to_be_bytes());
    f.extend_from_slice(&keepalive.to_be_bytes());
    let th2 = h(&[hello, &f[..]].concat());
    let keys = keys_authenticated(&nc, ns, k, &th2);
    f.extend_from_slice(&hmac(&keys.sf, &[&th2]));
    f
}

/// Server side, for the vectors only: opens a SEALED_HELLO's `sealed_id` with `s` (7.7
/// step 2) and returns the plaintext, `dh_es` and the SEALED_AUTH made with `f`.
pub fn sealed_auth(
    hello: &[u8],
    s: &Key,
    k: &Key,
    f: &Key,
    limit: u32,
    keepalive: u32,
) -> Option<(Vec<u8>, Key, Vec<u8>)> {
    let e_pub: Key = hello[6..38].try_into().unwrap();
    let s_pub = x25519_base(s);
    let dh_es = x25519(s, &e_pub)?;
    let kid = key_id(&e_pub, &s_pub, &dh_es);
    let mut pt = hello[38..38 + 69].to_vec();
    if !AeadKey::new(&kid).open_in_place(&[0; 12], &hello[..38], &mut pt, &hello[38 + 69..]) {
        return None;
    }
    let f_pub = x25519_base(f);
    let dh_ee = x25519(f, &e_pub)?;
    let mut out = Vec::with_capacity(77);
    out.extend_from_slice(&73u32.to_be_bytes());
    out.push(SEALED_AUTH);
    out.extend_from_slice(&f_pub);
    out.extend_from_slice(&limit.to_be_bytes());
    out.extend_from_slice(&keepalive.to_be_bytes());
    let th2 = h(&[hello, &out[..]].concat());
    let keys = keys_encrypted(&e_pub, &f_pub, k, &dh_ee, &dh_es, &th2);
    out.extend_from_slice(&hmac(&keys.sf, &[&th2]));
    Some((pt, dh_es, out))
}

/// Server side, for the vectors: does CLIENT_FINISH verify under `K_cf` and `th3`?
pub fn verify_client_finish(transcript_before: &[u8], cf: &[u8], k_cf: &Key) -> bool {
    cf.len() == 37 && cf[..5] == [0, 0, 0, 0x21, CLIENT_FINISH] && {
        let th3 = h(&[transcript_before, &cf[..5]].concat());
        ct_eq(&hmac(k_cf, &[&th3]), &cf[5..])
    }
}
