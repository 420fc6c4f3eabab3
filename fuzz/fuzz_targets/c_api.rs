//! The C library's API (c/src/lib.rs, `tally-c`) called as a C program calls it, with
//! the caller's bytes from the fuzzer: the token and id strings of `tally_enroll_new`
//! and `tally_client_new`, the mode and the frame limit, the server's bytes through
//! `tally_enroll_receive` and `tally_client_receive` in any split, and a script of API
//! calls (requests, messages, answers, timeouts, close) against a real server session
//! (the core's server side, in memory), whose frames are sealed with valid tags.
#![no_main]

use std::collections::BTreeSet;
use std::ffi::CString;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tally::proto::credential::EnrollmentToken;
use tally::proto::handshake::{HelloReceived, ServerLimits};
use tally::proto::{decode_frame, Body, CloseCode, Id, SecretKey, Session, Status};
use tally_c::TallyEventKind::*;
use tally_c::TallyResult::*;
use tally_c::*;
use x25519_dalek::{PublicKey, StaticSecret};

/// A little reader of the fuzzer's bytes.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    /// Up to the next NUL (dropped), as a C string.
    fn cstr(&mut self) -> (CString, &'a [u8]) {
        let n = self.0.iter().position(|&b| b == 0).unwrap_or(self.0.len());
        let s = self.take(n);
        self.take(1);
        (CString::new(s).expect("no NUL"), s)
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
}

const RESULTS: std::ops::RangeInclusive<i32> = -14..=0;

fn enroll(mut inp: Input) {
    let (token, token_bytes) = inp.cstr();
    let (id, id_bytes) = inp.cstr();
    let e = unsafe { tally_enroll_new(token.as_ptr(), id.as_ptr(), &[5; 32]) };
    // NULL exactly for an invalid token or id.
    let valid = std::str::from_utf8(token_bytes).is_ok_and(|t| EnrollmentToken::parse(t).is_ok())
        && std::str::from_utf8(id_bytes).is_ok_and(|i| Id::new(i).is_ok());
    assert_eq!(!e.is_null(), valid, "{token:?} {id:?}");
    if e.is_null() {
        return;
    }
    let mut buf = [0u8; 64];
    let mut sent = 0;
    while unsafe { tally_enroll_transmit(e, buf.as_mut_ptr(), buf.len()) } > 0 {
        sent += 1;
    }
    assert!(sent > 0, "ENROLL_INIT waits");
    let mut last = 1;
    let mut confirmed = 0;
    while !inp.0.is_empty() {
        let chunk = inp.take(usize::from(inp.0[0] % 32) + 1);
        assert_eq!(
            unsafe { tally_enroll_receive(e, chunk.as_ptr(), chunk.len()) },
            TALLY_OK
        );
        let mut code = 0u16;
        let r = unsafe { tally_enroll_result(e, &mut code) };
        assert!(r == 1 || RESULTS.contains(&r), "{r}");
        // A final result stays.
        if last != 1 {
            assert_eq!(r, last);
        }
        last = r;
        let c = unsafe { tally_enroll_confirmed(e) };
        assert!(c >= confirmed && c <= 1);
        confirmed = c;
        while unsafe { tally_enroll_transmit(e, buf.as_mut_ptr(), buf.len()) } > 0 {}
    }
    unsafe { tally_enroll_receive_eof(e) };
    let r = unsafe { tally_enroll_result(e, std::ptr::null_mut()) };
    assert!(RESULTS.contains(&r), "final after EOF: {r}");
    let mut key = [0u8; 32];
    let k = unsafe { tally_enroll_key(e, &mut key) };
    assert_eq!(k == TALLY_OK, r == 0);
    unsafe { tally_enroll_free(e) };
}

/// Everything the client has to send, in pieces of `cap` bytes.
fn take(c: *mut TallyClient, cap: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; cap.max(1)];
    let pending = unsafe { tally_client_pending_transmit(c) };
    loop {
        let n = unsafe { tally_client_transmit(c, buf.as_mut_ptr(), buf.len()) };
        if n == 0 {
            break;
        }
        assert!(n <= buf.len());
        out.extend_from_slice(&buf[..n]);
    }
    assert_eq!(out.len(), pending);
    out
}

struct Run {
    c: *mut TallyClient,
    max_frame_len: u32,
    server: Option<Session>,
    server_in: BytesMut,
    /// The client's REQUESTs the server has not answered.
    client_requests: BTreeSet<u64>,
    /// The client's REQUESTs the server saw (it may answer them).
    seen_requests: Vec<u64>,
    /// The server's REQUESTs the client was told of and did not answer.
    server_requests: BTreeSet<u64>,
    answered: BTreeSet<u64>,
    closed: bool,
    now: u64,
}

impl Run {
    /// The client's bytes to the server; the client's events, checked.
    fn settle(&mut self, cap: usize) {
        let out = take(self.c, cap);
        if let Some(s) = &mut self.server {
            self.server_in.extend_from_slice(&out);
            while let Ok(Some(f)) = decode_frame(&mut self.server_in, self.max_frame_len) {
                match s.open(f) {
                    Ok(fr) => {
                        if let Body::Request { .. } = fr.body {
                            self.seen_requests.push(fr.seq);
                        }
                    }
                    Err(_) => {
                        self.server = None;
                        break;
                    }
                }
            }
        }
        let mut n = 0;
        loop {
            let mut e = TallyEvent {
                kind: TALLY_EVENT_NONE,
                seq: 0,
                status: 0,
                code: 0,
                result: TALLY_OK,
                payload: std::ptr::null(),
                payload_len: 0,
                reserved: [0; 4],
            };
            if unsafe { tally_client_poll_event(self.c, &mut e) } == 0 {
                assert_eq!(e.kind, TALLY_EVENT_NONE);
                break;
            }
            n += 1;
            assert!(!self.closed, "an event after CLOSED: {e:?}");
            assert_eq!(e.payload.is_null(), e.payload_len == 0);
            if e.payload_len > 0 {
                let p = unsafe { std::slice::from_raw_parts(e.payload, e.payload_len) };
                assert!(p.len() <= self.max_frame_len as usize);
                std::hint::black_box(p.iter().map(|&b| b as u32).sum::<u32>());
            }
            match e.kind {
                TALLY_EVENT_RESPONSE => {
                    assert!(
                        self.client_requests.remove(&e.seq),
                        "RESPONSE to {} not pending",
                        e.seq
                    )
                }
                TALLY_EVENT_REQUEST => {
                    assert!(!self.answered.contains(&e.seq));
                    assert!(
                        self.server_requests.insert(e.seq),
                        "REQUEST {} twice",
                        e.seq
                    );
                    assert!(self.server_requests.len() <= TALLY_MAX_UNANSWERED_REQUESTS);
                }
                TALLY_EVENT_CLOSED => {
                    assert!(RESULTS.contains(&(e.result as i32)));
                    self.closed = true;
                }
                // A queued delivery (spec 8.8): its message id is never 0.
                TALLY_EVENT_DELIVERY => assert!(e.seq > 0, "DELIVERY with message id 0"),
                TALLY_EVENT_ESTABLISHED | TALLY_EVENT_MESSAGE => {}
                TALLY_EVENT_NONE => panic!("NONE returned as an event"),
            }
        }
        // Bounded: the events beyond TALLY_MAX_EVENTS are the answers to our own
        // requests, ESTABLISHED and CLOSED.
        assert!(
            n <= TALLY_MAX_EVENTS + 2 + self.client_requests.len() + 64,
            "{n} events"
        );
        let t = unsafe { tally_client_next_timeout(self.c) };
        assert!(t >= -1);
    }

    fn seal(&mut self, body: Body) {
        let Some(s) = &mut self.server else { return };
        let mut out = BytesMut::new();
        if s.seal(&body, &mut out).is_ok() {
            self.feed(&out.freeze());
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        let mut i = 0;
        while !rest.is_empty() {
            // Any split: pieces of 1 to 64 bytes.
            let n = ((rest[0] as usize + i) % 64 + 1).min(rest.len());
            let (a, b) = rest.split_at(n);
            assert_eq!(
                unsafe { tally_client_receive(self.c, a.as_ptr(), a.len(), self.now) },
                TALLY_OK
            );
            rest = b;
            i += 1;
        }
    }
}

fn client(mut inp: Input) {
    let (id, id_bytes) = inp.cstr();
    let max_frame_len = match inp.byte() % 4 {
        0 => inp.u32(),
        1 => 256,
        _ => 4096,
    };
    let key = [7u8; 32];
    // The mode: encrypted, authenticated, or (rarely) a value that is neither.
    let mode = match inp.byte() {
        0xff => TallyMode(u32::from(inp.byte()) + 2),
        b => TallyMode(u32::from(b & 1)),
    };
    let server_static = StaticSecret::from([2; 32]);
    let server_key = PublicKey::from(&server_static).to_bytes();
    let c = unsafe {
        tally_client_new(
            id.as_ptr(),
            &key,
            &server_key,
            &[1; 32],
            mode,
            max_frame_len,
            1_000,
        )
    };
    let valid = std::str::from_utf8(id_bytes).is_ok_and(|i| Id::new(i).is_ok())
        && (256..=16_777_216).contains(&max_frame_len)
        && mode.0 <= 1;
    assert_eq!(!c.is_null(), valid, "{id:?} {max_frame_len} {}", mode.0);
    if c.is_null() {
        return;
    }
    let mut run = Run {
        c,
        max_frame_len,
        server: None,
        server_in: BytesMut::new(),
        client_requests: BTreeSet::new(),
        seen_requests: Vec::new(),
        server_requests: BTreeSet::new(),
        answered: BTreeSet::new(),
        closed: false,
        now: 1_000,
    };
    // The server's side of the handshake, or the fuzzer's bytes instead.
    let hello = take(c, 7);
    if inp.byte() & 1 == 0 {
        if let Ok(h) = HelloReceived::parse(
            &hello,
            &tally::proto::handshake::ServerKey::from(&server_static),
        ) {
            let limits = ServerLimits {
                max_frame_len: 256 + u32::from(inp.byte()) * 64,
                keepalive: std::time::Duration::from_millis(100 + u64::from(inp.byte()) * 100),
            };
            let right_key = inp.byte() != 0xff;
            let key = SecretKey::from_bytes(if right_key { key } else { [8; 32] });
            let mut auth = BytesMut::new();
            let wait = h.respond(
                Some(key),
                SecretKey::from_bytes([0; 32]),
                &mut [2; 32],
                limits,
                &mut auth,
            );
            run.feed(&auth);
            let finish = take(c, 13);
            run.server = wait.handle_finish(&finish).ok().map(|e| e.session);
            assert_eq!(run.server.is_some(), right_key);
            run.settle(100);
        }
    }
    let mut ops = 0;
    while !inp.0.is_empty() && ops < 256 {
        ops += 1;
        let op = inp.byte();
        let len = usize::from(inp.byte());
        let payload = Bytes::copy_from_slice(inp.take(len));
        match op % 10 {
            0 => run.seal(Body::Request { payload }),
            1 => {
                let req_seq = match run.seen_requests.pop() {
                    Some(s) if op & 0x80 == 0 => s,
                    _ => u64::from(op),
                };
                run.seal(Body::Response {
                    req_seq,
                    status: Status(u16::from(op) << 4),
                    payload,
                })
            }
            2 => run.seal(Body::Message { payload }),
            3 => run.seal(Body::Ping),
            4 => run.seal(Body::Close {
                code: CloseCode(u16::from(op >> 4)),
                reason: String::from_utf8_lossy(&payload[..payload.len().min(200)]).into_owned(),
            }),
            5 => run.feed(&payload),
            6 => {
                let mut seq = 0u64;
                let r = if op & 0x80 == 0 {
                    unsafe {
                        tally_client_request(c, payload.as_ptr(), payload.len(), run.now, &mut seq)
                    }
                } else {
                    unsafe { tally_client_message(c, payload.as_ptr(), payload.len(), run.now) }
                };
                assert!(
                    matches!(r, TALLY_OK | TALLY_ERR_NOT_OPEN | TALLY_ERR_TOO_LARGE),
                    "{r:?}"
                );
                if r == TALLY_OK && op & 0x80 == 0 {
                    assert!(run.client_requests.insert(seq), "seq {seq} twice");
                }
            }
            7 => {
                let pending = run.server_requests.iter().next().copied();
                let seq = match pending {
                    Some(s) if op & 0x80 == 0 => s,
                    _ => u64::from(op),
                };
                let status = u16::from(op & 0x0f);
                let r = unsafe {
                    tally_client_respond(c, seq, status, payload.as_ptr(), payload.len(), run.now)
                };
                if run.server_requests.remove(&seq) {
                    // Every server request is answered exactly once.
                    assert!(
                        matches!(r, TALLY_OK | TALLY_ERR_TOO_LARGE | TALLY_ERR_NOT_OPEN),
                        "{r:?}"
                    );
                    if r != TALLY_ERR_NOT_OPEN {
                        run.answered.insert(seq);
                    }
                } else if run.answered.contains(&seq) {
                    assert!(
                        matches!(r, TALLY_ERR_NOT_PENDING | TALLY_ERR_NOT_OPEN),
                        "answered twice: {r:?}"
                    );
                }
            }
            8 => {
                run.now += u64::from(op) * len as u64 * 10;
                unsafe { tally_client_handle_timeout(c, run.now) };
            }
            _ => match op >> 6 {
                0 => unsafe { tally_client_close(c, u16::from(op), run.now) },
                1 => unsafe { tally_client_receive_eof(c, run.now) },
                _ => {}
            },
        }
        run.settle(usize::from(op) + 1);
    }
    let finished = unsafe { tally_client_is_finished(c) };
    assert!(finished == 0 || finished == 1);
    unsafe { tally_client_free(c) };
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    match inp.byte() & 1 {
        0 => enroll(inp),
        _ => client(inp),
    }
});
