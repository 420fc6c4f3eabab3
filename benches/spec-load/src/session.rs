//! Session frames (spec 4.5, 8.1 to 8.4, 8.7), for either role: the client is what the
//! load generator runs; the server role exists so the vectors can be replayed both ways.

use std::collections::HashSet;
use std::time::Instant;

use crate::crypto::*;
use crate::handshake::{Mode, SessionKeys};
use crate::wire::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

enum FrameKey {
    Mac(MacKey),
    Aead(AeadKey),
}

impl FrameKey {
    fn new(mode: Mode, k: &Key) -> Self {
        match mode {
            Mode::Authenticated => FrameKey::Mac(MacKey::new(k)),
            Mode::Encrypted => FrameKey::Aead(AeadKey::new(k)),
        }
    }
}

#[derive(Debug, PartialEq)]
pub enum Received<'a> {
    Request { seq: u64, payload: &'a [u8] },
    Response { req_seq: u64, status: u16, payload: &'a [u8] },
    Message { payload: &'a [u8] },
    Ping { seq: u64 },
    Pong { ping_seq: u64 },
    Close { code: u16, reason: &'a str },
    KeyUpdate,
    Deliver { msg_id: u64, kind: u8, payload: &'a [u8] },
    Ack { msg_id: u64, status: u16, payload: &'a [u8] },
}

pub struct Session {
    pub role: Role,
    pub mode: Mode,
    send_raw: Key,
    recv_raw: Key,
    send: FrameKey,
    recv: FrameKey,
    /// The sequence number of the next frame sent (8.1: the first is 1).
    pub next_send: u64,
    /// `last` of 8.3.
    pub last_recv: u64,
    /// The limit this side announced (what it receives) and the peer's (what it may send).
    pub recv_limit: u32,
    pub send_limit: u32,
    pending_requests: HashSet<u64>,
    pending_pings: HashSet<u64>,
    outstanding_delivers: HashSet<u64>,
    last_deliver: u64,
    accepted_any: bool,
    failed: bool,
    pub sent_close: bool,
    pub received_close: bool,
    /// Frames sealed with the current sending key, and when it sealed its first (8.7).
    pub sealed_with_key: u64,
    pub key_first_use: Option<Instant>,
    /// Update the sending key after this many frames (8.7: at most 2^20; more often MAY),
    /// and whether to do so in the authenticated mode too (MAY).
    pub key_update_frames: u64,
    pub key_update_always: bool,
}

impl Session {
    pub fn new(role: Role, mode: Mode, keys: &SessionKeys, recv_limit: u32, send_limit: u32) -> Self {
        let (s, r) = match role {
            Role::Client => (keys.c2s, keys.s2c),
            Role::Server => (keys.s2c, keys.c2s),
        };
        Session {
            role,
            mode,
            send_raw: s,
            recv_raw: r,
            send: FrameKey::new(mode, &s),
            recv: FrameKey::new(mode, &r),
            next_send: 1,
            last_recv: 0,
            recv_limit,
            send_limit,
            pending_requests: HashSet::new(),
            pending_pings: HashSet::new(),
            outstanding_delivers: HashSet::new(),
            last_deliver: 0,
            accepted_any: false,
            failed: false,
            sent_close: false,
            received_close: false,
            sealed_with_key: 0,
            key_first_use: None,
            key_update_frames: 1 << 20,
            key_update_always: false,
        }
    }

    fn tag_len(&self) -> usize {
        match self.mode {
            Mode::Authenticated => 32,
            Mode::Encrypted => 16,
        }
    }

    /// The `length` of a frame with `fields` bytes of fields.
    pub fn frame_length(&self, fields: usize) -> usize {
        9 + fields + self.tag_len()
    }

    fn direction(role: Role) -> u32 {
        match role {
            Role::Client => 0,
            Role::Server => 1,
        }
    }

    /// 8.2: `u32 direction ‖ u64 seq`.
    pub fn nonce(role_of_sender: Role, seq: u64) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&Self::direction(role_of_sender).to_be_bytes());
        n[4..].copy_from_slice(&seq.to_be_bytes());
        n
    }

    pub fn send_key(&self) -> &Key {
        &self.send_raw
    }
    pub fn recv_key(&self) -> &Key {
        &self.recv_raw
    }
    pub fn pending_pings(&self) -> usize {
        self.pending_pings.len()
    }

    /// Seals one frame (8.2) and appends it to `out`; returns its `seq`.
    pub fn seal(&mut self, ty: u8, fields: &[&[u8]], out: &mut Vec<u8>) -> Result<u64, Fail> {
        if self.sent_close {
            return Err(Fail::Local("no frame may follow CLOSE (8.6)".into()));
        }
        let seq = self.next_send;
        if seq == u64::MAX && ty != CLOSE {
            return Err(Fail::Local("sequence numbers exhausted: only CLOSE may be sent (8.1)".into()));
        }
        let flen: usize = fields.iter().map(|f| f.len()).sum();
        let length = self.frame_length(flen);
        if length > self.send_limit as usize {
            return Err(Fail::Local(format!(
                "a {} of length {length} is above the peer's limit {} (3.2)",
                type_name(ty),
                self.send_limit
            )));
        }
        let start = out.len();
        out.extend_from_slice(&(length as u32).to_be_bytes());
        out.push(ty);
        out.extend_from_slice(&seq.to_be_bytes());
        for f in fields {
            out.extend_from_slice(f);
        }
        if ty == DELIVER {
            self.outstanding_delivers.insert(u64_at(out, start + 13));
        }
        match &self.send {
            FrameKey::Mac(m) => {
                let t = m.tag(&out[start..]);
                out.extend_from_slice(&t);
            }
            FrameKey::Aead(a) => {
                let nonce = Self::nonce(self.role, seq);
                let (head, body) = out[start..].split_at_mut(13);
                let t = a.seal_in_place(&nonce, head, body);
                out.extend_from_slice(&t);
            }
        }
        self.next_send += 1;
        self.sealed_with_key += 1;
        if self.key_first_use.is_none() {
            self.key_first_use = Some(Instant::now());
        }
        match ty {
            REQUEST => {
                self.pending_requests.insert(seq);
            }
            PING => {
                self.pending_pings.insert(seq);
            }
            KEY_UPDATE => {
                // 8.7: right after sealing it, move to the next key (5.8).
                self.send_raw = hkdf(&[], &self.send_raw, &[L_KEY_UPDATE]);
                self.send = FrameKey::new(self.mode, &self.send_raw);
                self.sealed_with_key = 0;
                self.key_first_use = None;
            }
            CLOSE => self.sent_close = true,
            _ => {}
        }
        Ok(seq)
    }

    /// 8.7: must a KEY_UPDATE go out before the next frame (other than CLOSE)? In the
    /// encrypted mode (MUST); in the authenticated mode only if asked (MAY).
    pub fn key_update_due(&self, now: Instant) -> bool {
        (self.mode == Mode::Encrypted || self.key_update_always)
            && self.next_send < u64::MAX - 1
            && (self.sealed_with_key >= self.key_update_frames
                || self
                    .key_first_use
                    .is_some_and(|t| now.duration_since(t).as_secs() >= 600))
    }

    /// Receives one whole frame (8.3 steps 2 to 6; step 1 is the reader's). Any failure
    /// leaves the counter alone and the session refuses everything after it.
    pub fn open<'a>(&mut self, frame: &'a mut [u8]) -> Result<Received<'a>, Fail> {
        if self.failed {
            return Err(Fail::Local("the session already failed".into()));
        }
        let r = self.open_inner(frame);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn open_inner<'a>(&mut self, frame: &'a mut [u8]) -> Result<Received<'a>, Fail> {
        let ty = frame[4];
        // Step 2.1.
        if ty == ERROR {
            return Err(if self.role == Role::Client && !self.accepted_any {
                Fail::Refused(error_code(frame))
            } else {
                Fail::Truncated("an ERROR frame inside the session (unauthenticated: a cut)".into())
            });
        }
        // Step 2.2.
        let allowed = match ty {
            REQUEST | RESPONSE | MESSAGE | PING | PONG | CLOSE | KEY_UPDATE => true,
            DELIVER => self.role == Role::Client,
            ACK => self.role == Role::Server,
            _ => false,
        };
        if !allowed {
            return Err(Fail::Malformed(format!(
                "type {} ({ty:#04x}) is not a session frame this side receives",
                type_name(ty)
            )));
        }
        let tl = self.tag_len();
        if frame.len() < 13 + tl {
            return Err(Fail::Malformed(format!("session frame of length {}", frame.len() - 4)));
        }
        // Step 3.
        let seq = u64_at(frame, 5);
        match self.last_recv.checked_add(1) {
            Some(e) if e == seq => {}
            e => return Err(Fail::BadSequence { expected: e.unwrap_or(0), got: seq }),
        }
        if seq == u64::MAX && ty != CLOSE {
            return Err(Fail::SequenceExhausted);
        }
        // Step 4.
        let n = frame.len();
        match &self.recv {
            FrameKey::Mac(m) => {
                let t = m.tag(&frame[..n - tl]);
                if !ct_eq(&t, &frame[n - tl..]) {
                    return Err(Fail::BadTag);
                }
            }
            FrameKey::Aead(a) => {
                let peer = match self.role {
                    Role::Client => Role::Server,
                    Role::Server => Role::Client,
                };
                let nonce = Self::nonce(peer, seq);
                let (head, rest) = frame.split_at_mut(13);
                let (body, tag) = rest.split_at_mut(rest.len() - tl);
                if !a.open_in_place(&nonce, head, body, tag) {
                    return Err(Fail::BadTag);
                }
            }
        }
        let frame: &'a [u8] = frame;
        let f = &frame[13..n - tl];
        // Step 5.
        let need = |min: usize, exact: bool| -> Result<(), Fail> {
            if f.len() < min || (exact && f.len() != min) {
                Err(Fail::Malformed(format!("{} with {} bytes of fields", type_name(ty), f.len())))
            } else {
                Ok(())
            }
        };
        let got = match ty {
            REQUEST => Received::Request { seq, payload: f },
            RESPONSE => {
                need(10, false)?;
                let req_seq = u64_at(f, 0);
                if !self.pending_requests.contains(&req_seq) {
                    return Err(Fail::UnsolicitedAnswer(req_seq));
                }
                self.pending_requests.remove(&req_seq);
                Received::Response { req_seq, status: u16_at(f, 8), payload: &f[10..] }
            }
            MESSAGE => Received::Message { payload: f },
            PING => {
                need(0, true)?;
                Received::Ping { seq }
            }
            PONG => {
                need(8, true)?;
                let ping_seq = u64_at(f, 0);
                if !self.pending_pings.remove(&ping_seq) {
                    return Err(Fail::UnsolicitedAnswer(ping_seq));
                }
                Received::Pong { ping_seq }
            }
            CLOSE => {
                need(2, false)?;
                let reason = &f[2..];
                if reason.len() > 255 {
                    return Err(Fail::Malformed("CLOSE reason above 255 bytes".into()));
                }
                let reason = std::str::from_utf8(reason)
                    .map_err(|_| Fail::Malformed("CLOSE reason is not UTF-8".into()))?;
                Received::Close { code: u16_at(f, 0), reason }
            }
            KEY_UPDATE => {
                need(0, true)?;
                Received::KeyUpdate
            }
            DELIVER => {
                need(9, false)?;
                let msg_id = u64_at(f, 0);
                let kind = f[8];
                if msg_id == 0 {
                    return Err(Fail::Malformed("DELIVER with msg_id 0".into()));
                }
                if kind != 1 && kind != 2 {
                    return Err(Fail::Malformed(format!("DELIVER of kind {kind}")));
                }
                if msg_id <= self.last_deliver {
                    return Err(Fail::DeliveryOrder(msg_id));
                }
                self.last_deliver = msg_id;
                Received::Deliver { msg_id, kind, payload: &f[9..] }
            }
            ACK => {
                need(10, false)?;
                let msg_id = u64_at(f, 0);
                if !self.outstanding_delivers.remove(&msg_id) {
                    return Err(Fail::UnsolicitedAnswer(msg_id));
                }
                Received::Ack { msg_id, status: u16_at(f, 8), payload: &f[10..] }
            }
            _ => unreachable!(),
        };
        // Step 6.
        self.last_recv = seq;
        self.accepted_any = true;
        match got {
            Received::KeyUpdate => {
                self.recv_raw = hkdf(&[], &self.recv_raw, &[L_KEY_UPDATE]);
                self.recv = FrameKey::new(self.mode, &self.recv_raw);
            }
            Received::Close { .. } => self.received_close = true,
            _ => {}
        }
        Ok(got)
    }
}
