//! Enrollment, client side (spec 6.2, 6.4, 14 "Enroll"); the server's two frames are
//! rebuilt only for the vectors.

use crate::cred::{EnrollMode, Token};
use crate::crypto::*;
use crate::wire::*;

#[derive(Clone, Debug)]
pub struct EnrollKeys {
    pub dh_ee: Key,
    pub dh_es: Key,
    pub th2: Key,
    pub server: Key,
    pub client: Key,
    pub done: Key,
    pub identity: Key,
}

/// 5.4.
pub fn enroll_keys(c: &Key, dh_ee: Key, dh_es: Key, th2: Key) -> EnrollKeys {
    let mut ikm = [0u8; 64];
    ikm[..32].copy_from_slice(&dh_ee);
    ikm[32..].copy_from_slice(&dh_es);
    EnrollKeys {
        dh_ee,
        dh_es,
        th2,
        server: hkdf(c, &ikm, &[L_ENROLL_SERVER, &th2]),
        client: hkdf(c, &ikm, &[L_ENROLL_CLIENT, &th2]),
        done: hkdf(c, &ikm, &[L_ENROLL_DONE, &th2]),
        identity: hkdf(c, &ikm, &[L_ENROLL_IDENTITY, &th2]),
    }
}

/// A client after sending ENROLL_INIT (AwaitReply).
pub struct EnrollClient {
    c: Key,
    s_pub: Key,
    x: Key,
    pub x_pub: Key,
    pub init: Vec<u8>,
    pub th1: Key,
    pub init_tag: Key,
}

/// A client after sending ENROLL_CONFIRM (AwaitDone).
pub struct EnrollConfirmed {
    pub keys: EnrollKeys,
    pub confirm: Vec<u8>,
    pub th3: Key,
    transcript: Vec<u8>,
}

impl EnrollClient {
    /// 14 "Enroll" steps 2 and 3.
    pub fn new(id: &[u8], token: &Token, x: Key) -> Self {
        let x_pub = x25519_base(&x);
        let n = id.len();
        let mut f = Vec::with_capacity(104 + n);
        f.extend_from_slice(&(68 + n as u32).to_be_bytes());
        f.push(ENROLL_INIT);
        f.push(1);
        f.push(token.mode as u8);
        f.push(n as u8);
        f.extend_from_slice(id);
        f.extend_from_slice(&x_pub);
        let th1 = h(&f);
        let tag = hmac(&token.c, &[L_ENROLL_INIT, &th1]);
        f.extend_from_slice(&tag);
        EnrollClient { c: token.c, s_pub: token.s_pub, x, x_pub, init: f, th1, init_tag: tag }
    }

    /// 6.4 rows 2 and 4 to 7 (the frame passed the reader's checks with the limit 256).
    pub fn on_reply(&self, frame: &[u8]) -> Result<EnrollConfirmed, Fail> {
        if frame[4] == ERROR {
            return Err(Fail::Refused(error_code(frame)));
        }
        if frame[4] != ENROLL_REPLY || frame.len() != 69 {
            return Err(Fail::Malformed(format!(
                "expected ENROLL_REPLY of length 65, got {} of length {}",
                type_name(frame[4]),
                frame.len() - 4
            )));
        }
        let y_pub: Key = frame[5..37].try_into().unwrap();
        let dh_ee = x25519(&self.x, &y_pub).ok_or(Fail::WeakKey)?;
        let dh_es = x25519(&self.x, &self.s_pub).ok_or(Fail::WeakKey)?;
        let mut transcript = self.init.clone();
        transcript.extend_from_slice(&frame[..37]);
        let th2 = h(&transcript);
        let keys = enroll_keys(&self.c, dh_ee, dh_es, th2);
        if !ct_eq(&hmac(&keys.server, &[&th2]), &frame[37..]) {
            return Err(Fail::BadTag);
        }
        transcript.extend_from_slice(&frame[37..]);
        let header = [0, 0, 0, 0x21, ENROLL_CONFIRM];
        transcript.extend_from_slice(&header);
        let th3 = h(&transcript);
        let tag = hmac(&keys.client, &[&th3]);
        transcript.extend_from_slice(&tag);
        let mut confirm = header.to_vec();
        confirm.extend_from_slice(&tag);
        Ok(EnrollConfirmed { keys, confirm, th3, transcript })
    }
}

impl EnrollConfirmed {
    /// 6.4 rows 8 and 9: returns `k` and `th4`, or why the enrollment is uncertain.
    pub fn on_done(&self, frame: &[u8]) -> Result<(Key, Key), Fail> {
        if frame[4] == ERROR {
            return Err(Fail::Refused(error_code(frame)));
        }
        if frame[4] != ENROLL_DONE || frame.len() != 37 {
            return Err(Fail::Malformed(format!("expected ENROLL_DONE, got {}", type_name(frame[4]))));
        }
        let th4 = h(&[&self.transcript[..], &frame[..5]].concat());
        if !ct_eq(&hmac(&self.keys.done, &[&th4]), &frame[5..]) {
            return Err(Fail::BadTag);
        }
        Ok((self.keys.identity, th4))
    }
}

/// Server side, for the vectors: ENROLL_REPLY with `y`, and its keys.
pub fn server_reply(init: &[u8], c: &Key, s: &Key, y: &Key) -> Option<(Vec<u8>, EnrollKeys)> {
    let n = init[7] as usize;
    let x_pub: Key = init[8 + n..40 + n].try_into().unwrap();
    let dh_ee = x25519(y, &x_pub)?;
    let dh_es = x25519(s, &x_pub)?;
    let mut f = Vec::with_capacity(69);
    f.extend_from_slice(&65u32.to_be_bytes());
    f.push(ENROLL_REPLY);
    f.extend_from_slice(&x25519_base(y));
    let th2 = h(&[init, &f[..]].concat());
    let keys = enroll_keys(c, dh_ee, dh_es, th2);
    f.extend_from_slice(&hmac(&keys.server, &[&th2]));
    Some((f, keys))
}

/// Server side, for the vectors: ENROLL_DONE after `transcript` (INIT, REPLY, CONFIRM).
pub fn server_done(transcript: &[u8], k_done: &Key) -> (Vec<u8>, Key) {
    let header = [0, 0, 0, 0x21, ENROLL_DONE];
    let th4 = h(&[transcript, &header[..]].concat());
    let mut f = header.to_vec();
    f.extend_from_slice(&hmac(k_done, &[&th4]));
    (f, th4)
}

pub fn mode_name(m: EnrollMode) -> &'static str {
    match m {
        EnrollMode::Open => "open",
        EnrollMode::Token => "token",
    }
}
