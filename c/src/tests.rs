//! The C API driven as a C caller would, against the core's server side in memory.

// The tests call the C API as a C program does, with pointers they own and keep alive
// for each call: the reasons are tally.h's contract, not repeated at each of the many
// calls. The unsafe operations of the library itself (lib.rs) each carry theirs.
#![allow(
    clippy::undocumented_unsafe_blocks,
    clippy::multiple_unsafe_ops_per_block
)]

use super::*;
use core::mem::{offset_of, size_of, MaybeUninit};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use tally::proto::connection::{Config, Connection};
use tally::proto::enroll::{ServerAwaitConfirm, ServerParams};
use tally::proto::frame::EnrollMode;
use tally::proto::handshake::{HelloReceived, ServerLimits};
use tally::proto::DeliveryKind;

/// Counts the bytes live on the heap, to measure what a session costs.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// One test at a time: the heap figures count every thread's allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// SAFETY: every call goes to `System`, which keeps `GlobalAlloc`'s rules; the count
// beside it allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: the caller keeps `alloc`'s contract, which is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with `layout`, so from `System.alloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KEY: [u8; 32] = [7; 32];

/// What fills the memory handed to the library as an out-parameter: memory the caller
/// never initialised, made recognisable. Whatever the library leaves unwritten still
/// reads as this afterwards.
const POISON: u8 = 0xA5;

/// A `T` that is not one: every byte [`POISON`].
fn poisoned<T>() -> MaybeUninit<T> {
    let mut m = MaybeUninit::<T>::uninit();
    // SAFETY: `m` is a `T`'s worth of writable bytes; bytes are all it gets.
    unsafe { m.as_mut_ptr().write_bytes(POISON, 1) };
    m
}

/// A poisoned buffer after the library wrote (or did not write) into it.
fn bytes_of<const N: usize>(m: &MaybeUninit<[u8; N]>) -> &[u8; N] {
    // SAFETY: every byte was written by `poisoned`, and then maybe copied over.
    unsafe { m.assume_init_ref() }
}

/// Everything a `transmit` function has to give, taken into poisoned buffers of 100
/// bytes (small on purpose: it hands out what fits); what follows the bytes it says it
/// wrote must be untouched.
fn take_with(transmit: impl Fn(*mut u8, usize) -> usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut buf = poisoned::<[u8; 100]>();
        let n = transmit(buf.as_mut_ptr().cast(), 100);
        assert!(n <= 100);
        // The buffer was all poison: what the library wrote over it, and no more.
        let bytes = bytes_of(&buf);
        assert!(
            bytes[n..].iter().all(|&b| b == POISON),
            "written beyond {n}"
        );
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&bytes[..n]);
    }
}

/// Everything the client has to send.
fn take(c: *mut TallyClient) -> Vec<u8> {
    take_with(|buf, cap| unsafe { tally_client_transmit(c, buf, cap) })
}

/// Everything the enrollment has to send.
fn take_enrollment(e: *mut TallyEnrollment) -> Vec<u8> {
    take_with(|buf, cap| unsafe { tally_enroll_transmit(e, buf, cap) })
}

/// A `TallyEvent`'s fields, the enums as plain numbers, read from memory that was
/// poisoned before `tally_client_poll_event` wrote there. Read as a `TallyEvent`, a
/// field it forgot (an enum holding 0xa5a5a5a5) would be undefined behaviour; read so,
/// it is a number that compares unequal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawEvent {
    kind: u32,
    seq: u64,
    status: u16,
    code: u16,
    result: i32,
    payload: *const u8,
    payload_len: usize,
    reserved: [u64; 4],
}

impl RawEvent {
    fn read(e: &MaybeUninit<TallyEvent>) -> RawEvent {
        /// The field of type `F` at `offset` (an `offset_of!`).
        fn field<F: Copy>(e: &MaybeUninit<TallyEvent>, offset: usize) -> F {
            // SAFETY: `offset` is that of a field of `F`'s size and alignment (or of an
            // element of one), inside the event; its bytes are initialised: poison, or
            // the library's. (Padding, which a typed write may leave uninitialised, is
            // never read.)
            unsafe { e.as_ptr().byte_add(offset).cast::<F>().read() }
        }
        assert_eq!(size_of::<TallyEventKind>(), 4);
        assert_eq!(size_of::<TallyResult>(), 4);
        let reserved = offset_of!(TallyEvent, reserved);
        RawEvent {
            kind: field(e, offset_of!(TallyEvent, kind)),
            seq: field(e, offset_of!(TallyEvent, seq)),
            status: field(e, offset_of!(TallyEvent, status)),
            code: field(e, offset_of!(TallyEvent, code)),
            result: field(e, offset_of!(TallyEvent, result)),
            payload: field(e, offset_of!(TallyEvent, payload)),
            payload_len: field(e, offset_of!(TallyEvent, payload_len)),
            reserved: core::array::from_fn(|i| field(e, reserved + 8 * i)),
        }
    }

    /// The payload it points to (NULL exactly when it is empty).
    fn payload(&self) -> Vec<u8> {
        // Not poison (then it would point nowhere), nor over any frame limit.
        assert_ne!(self.payload, POISONED.payload, "{self:x?}");
        assert!(self.payload_len <= 16 << 20, "{self:x?}");
        assert_eq!(self.payload.is_null(), self.payload_len == 0, "{self:x?}");
        if self.payload_len == 0 {
            return Vec::new();
        }
        // SAFETY: the library's pointer and length, valid until the next call on the
        // client; copied now.
        unsafe { core::slice::from_raw_parts(self.payload, self.payload_len) }.to_vec()
    }
}

/// The next event, polled into poisoned memory: what `tally_client_poll_event` returned
/// and what it wrote.
fn poll_raw(c: *mut TallyClient) -> (i32, RawEvent) {
    let mut e = poisoned::<TallyEvent>();
    let polled = unsafe { tally_client_poll_event(c, e.as_mut_ptr()) };
    (polled, RawEvent::read(&e))
}

const KINDS: [TallyEventKind; 7] = [
    TallyEventKind::TALLY_EVENT_NONE,
    TallyEventKind::TALLY_EVENT_ESTABLISHED,
    TallyEventKind::TALLY_EVENT_RESPONSE,
    TallyEventKind::TALLY_EVENT_REQUEST,
    TallyEventKind::TALLY_EVENT_MESSAGE,
    TallyEventKind::TALLY_EVENT_CLOSED,
    TallyEventKind::TALLY_EVENT_DELIVERY,
];

const RESULTS: [TallyResult; 15] = [
    TALLY_OK,
    TALLY_ERR_INVALID_ARGUMENT,
    TALLY_ERR_NOT_OPEN,
    TALLY_ERR_TOO_LARGE,
    TALLY_ERR_AUTH_FAILED,
    TALLY_ERR_REFUSED,
    TALLY_ERR_PROTOCOL,
    TALLY_ERR_TRUNCATED,
    TALLY_ERR_TIMEOUT,
    TALLY_ERR_CLOSED_BY_SERVER,
    TALLY_ERR_SERVER_NOT_AUTHENTIC,
    TALLY_ERR_UNCONFIRMED,
    TALLY_ERR_NOT_PENDING,
    TALLY_ERR_OVERLOADED,
    TALLY_ERR_MODE_REFUSED,
];

/// Every event waiting, each polled into poisoned memory and checked to be whole: a
/// kind and a result that exist, the reserved room zeroed, NONE all zeros.
fn events(c: *mut TallyClient) -> Vec<(TallyEventKind, u64, u16, u16, TallyResult, Vec<u8>)> {
    let mut all = Vec::new();
    loop {
        let (polled, e) = poll_raw(c);
        let kind = *KINDS
            .iter()
            .find(|k| **k as u32 == e.kind)
            .unwrap_or_else(|| panic!("no such kind: {e:x?}"));
        let result = *RESULTS
            .iter()
            .find(|r| **r as i32 == e.result)
            .unwrap_or_else(|| panic!("no such result: {e:x?}"));
        assert_eq!(e.reserved, [0; 4], "{e:x?}");
        if polled == 0 {
            assert_eq!(e, NONE, "no event: all zeros");
            return all;
        }
        assert_eq!(polled, 1);
        assert_ne!(kind, TallyEventKind::TALLY_EVENT_NONE);
        all.push((kind, e.seq, e.status, e.code, result, e.payload()));
    }
}

/// A `TallyEvent` nothing wrote to.
const POISONED: RawEvent = RawEvent {
    kind: u32::from_ne_bytes([POISON; 4]),
    seq: u64::from_ne_bytes([POISON; 8]),
    status: u16::from_ne_bytes([POISON; 2]),
    code: u16::from_ne_bytes([POISON; 2]),
    result: i32::from_ne_bytes([POISON; 4]),
    payload: usize::from_ne_bytes([POISON; size_of::<usize>()]) as *const u8,
    payload_len: usize::from_ne_bytes([POISON; size_of::<usize>()]),
    reserved: [u64::from_ne_bytes([POISON; 8]); 4],
};

/// Whether the library left a poisoned integer or byte array alone (a type without
/// padding).
fn untouched<T: Copy>(m: &MaybeUninit<T>) -> bool {
    // SAFETY: `poisoned` wrote every byte, and a `T` without padding keeps them all
    // initialised whatever the library wrote over it.
    let bytes = unsafe { core::slice::from_raw_parts(m.as_ptr().cast::<u8>(), size_of::<T>()) };
    bytes.iter().all(|&b| b == POISON)
}

/// What `tally_client_poll_event` writes when there is no event.
const NONE: RawEvent = RawEvent {
    kind: 0,
    seq: 0,
    status: 0,
    code: 0,
    result: 0,
    payload: core::ptr::null(),
    payload_len: 0,
    reserved: [0; 4],
};

fn feed(c: *mut TallyClient, bytes: &[u8], now: u64) {
    // Byte by byte: a socket may hand over any split.
    for b in bytes {
        assert_eq!(unsafe { tally_client_receive(c, b, 1, now) }, TALLY_OK);
    }
}

/// The server's static secret `s` in these tests, and its public key `S` (what the
/// credential's `server-key` holds).
fn server_static() -> x25519_dalek::StaticSecret {
    x25519_dalek::StaticSecret::from([0x20; 32])
}

fn server_public() -> [u8; 32] {
    x25519_dalek::PublicKey::from(&server_static()).to_bytes()
}

/// A new client of `sensor-1` in `mode`, pinned to `server_key`.
fn client_to(mode: TallyMode, server_key: &[u8; 32]) -> *mut TallyClient {
    let c = unsafe {
        tally_client_new(
            c"sensor-1".as_ptr(),
            &KEY,
            server_key,
            &[1; 32],
            mode,
            4096,
            1_000,
        )
    };
    assert!(!c.is_null());
    c
}

/// The core's server side answering a client's first frame: parses it with the
/// server's static secret (a sealed id opens only with it), answers with the identity
/// key `identity_key` if the id opened, and returns its wait for CLIENT_FINISH.
fn answer_hello(
    hello: &[u8],
    identity_key: [u8; 32],
    auth: &mut BytesMut,
) -> tally::proto::handshake::ServerAwaitFinish {
    let limits = ServerLimits {
        max_frame_len: 65536,
        keepalive: Duration::from_secs(30),
    };
    let received = HelloReceived::parse(
        hello,
        &tally::proto::handshake::ServerKey::from(&server_static()),
    )
    .unwrap();
    let key = received.id().map(|_| SecretKey::from_bytes(identity_key));
    received.respond(
        key,
        SecretKey::from_bytes([9; 32]),
        &mut [2; 32],
        limits,
        auth,
    )
}

/// A client through the handshake in `mode` with the core's server side, which holds
/// `server_key` as the identity's key; returns both ends.
fn established_in(mode: TallyMode, server_key: [u8; 32]) -> (*mut TallyClient, Option<Connection>) {
    let c = client_to(mode, &server_public());
    let hello = take(c);
    let mut auth = BytesMut::new();
    let wait = answer_hello(&hello, server_key, &mut auth);
    feed(c, &auth, 1_001);
    let finish = take(c);
    let server = wait
        .handle_finish(&finish)
        .ok()
        .map(|e| Connection::new(e.session, Config::server(), Duration::from_millis(1_002)));
    (c, server)
}

/// A client through the handshake in the default (encrypted) mode.
fn established(server_key: [u8; 32]) -> (*mut TallyClient, Option<Connection>) {
    established_in(TALLY_MODE_ENCRYPTED, server_key)
}

fn server_out(server: &mut Connection) -> Vec<u8> {
    let mut out = BytesMut::new();
    server.transmit_into(&mut out);
    out.to_vec()
}

#[test]
fn a_session_through_the_c_api() {
    let _serial = serial();
    let (c, server) = established(KEY);
    let mut server = server.unwrap();
    let ev = events(c);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].0, TallyEventKind::TALLY_EVENT_ESTABLISHED);

    // A request and its answer.
    let mut seq = 0;
    let r = unsafe { tally_client_request(c, b"temp?".as_ptr(), 5, 1_010, &mut seq) };
    assert_eq!((r, seq), (TALLY_OK, 1));
    server.handle_input(&take(c), Duration::from_millis(1_011));
    let Some(Event::Request { seq: got, payload }) = server.poll_event() else {
        panic!("the server got no request")
    };
    assert_eq!((got, &payload[..]), (1, &b"temp?"[..]));
    server
        .respond(
            got,
            Status::OK,
            Bytes::from_static(b"21.5"),
            Duration::from_millis(1_012),
        )
        .unwrap();
    feed(c, &server_out(&mut server), 1_013);
    let ev = events(c);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].0, ev[0].1, ev[0].2, &ev[0].5[..]),
        (TallyEventKind::TALLY_EVENT_RESPONSE, 1, 0, &b"21.5"[..])
    );

    // The server's request, answered; its message.
    let sseq = server
        .request(Bytes::from_static(b"reboot?"), Duration::from_millis(1_020))
        .unwrap();
    server
        .message(Bytes::from_static(b"hi"), Duration::from_millis(1_020))
        .unwrap();
    feed(c, &server_out(&mut server), 1_021);
    let ev = events(c);
    assert_eq!(ev[0].0, TallyEventKind::TALLY_EVENT_REQUEST);
    assert_eq!((ev[0].1, &ev[0].5[..]), (sseq, &b"reboot?"[..]));
    assert_eq!(
        (ev[1].0, &ev[1].5[..]),
        (TallyEventKind::TALLY_EVENT_MESSAGE, &b"hi"[..])
    );
    assert_eq!(
        unsafe { tally_client_respond(c, sseq, 4, b"no".as_ptr(), 2, 1_022) },
        TALLY_OK
    );
    assert_eq!(
        unsafe { tally_client_respond(c, sseq, 0, core::ptr::null(), 0, 1_022) },
        TALLY_ERR_NOT_PENDING,
        "exactly one answer"
    );
    server.handle_input(&take(c), Duration::from_millis(1_023));
    assert!(matches!(
        server.poll_event(),
        Some(Event::Response {
            status: Status(4),
            ..
        })
    ));

    // Keepalive: a PING after 30 s of silence, the deadline given by next_timeout. Spec
    // 8.5: 30 s without receiving counts too (the last frame came at 1_021, the last one
    // sent left at 1_022).
    let next = unsafe { tally_client_next_timeout(c) };
    assert_eq!(next, 1_021 + 30_000);
    unsafe { tally_client_handle_timeout(c, next as u64) };
    server.handle_input(&take(c), Duration::from_millis(next as u64));
    assert!(
        server.pending_transmit() > 0,
        "the server answers the PING with a PONG"
    );

    // CLOSE from the client, answered by the server.
    unsafe { tally_client_close(c, 0, 40_000) };
    server.handle_input(&take(c), Duration::from_millis(40_001));
    feed(c, &server_out(&mut server), 40_002);
    let ev = events(c);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].0, ev[0].4),
        (TallyEventKind::TALLY_EVENT_CLOSED, TALLY_OK)
    );
    assert_eq!(unsafe { tally_client_is_finished(c) }, 1);
    assert_eq!(
        unsafe { tally_client_message(c, b"x".as_ptr(), 1, 40_003) },
        TALLY_ERR_NOT_OPEN
    );
    unsafe { tally_client_free(c) };
}

#[test]
fn a_wrong_key_and_a_forged_frame_are_reported() {
    let _serial = serial();
    let (c, _) = established([8; 32]);
    let ev = events(c);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        (ev[0].0, ev[0].4),
        (TallyEventKind::TALLY_EVENT_CLOSED, TALLY_ERR_AUTH_FAILED)
    );
    assert!(
        take(c).is_empty(),
        "no CLIENT_FINISH to a server that did not authenticate"
    );
    assert_eq!(unsafe { tally_client_is_finished(c) }, 1);
    unsafe { tally_client_free(c) };

    // A bit flipped in a server frame: the session ends with PROTOCOL_ERROR.
    let (c, server) = established(KEY);
    let mut server = server.unwrap();
    events(c);
    server
        .message(Bytes::from_static(b"hello"), Duration::from_millis(1_010))
        .unwrap();
    let mut frame = server_out(&mut server);
    assert!(!frame.is_empty());
    let last = frame.len() - 1;
    frame[last] ^= 1;
    feed(c, &frame, 1_011);
    assert!(events(c).is_empty(), "the message is not delivered");
    // The client sent CLOSE PROTOCOL_ERROR; the session ends with the server's answer.
    server.handle_input(&take(c), Duration::from_millis(1_012));
    assert!(matches!(
        server.poll_event(),
        Some(Event::Closed(End::PeerClosed {
            code: CloseCode::PROTOCOL_ERROR,
            ..
        }))
    ));
    // After a receive failure nothing more is read: the end comes with the server's EOF
    // (it closes after answering CLOSE), or the close deadline.
    feed(c, &server_out(&mut server), 1_013);
    unsafe { tally_client_receive_eof(c, 1_014) };
    let ev = events(c);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].0, ev[0].4),
        (TallyEventKind::TALLY_EVENT_CLOSED, TALLY_ERR_PROTOCOL)
    );
    assert_eq!(ev[0].3, CloseCode::PROTOCOL_ERROR.0);
    unsafe { tally_client_free(c) };

    // EOF mid-session: truncation, never a clean end.
    let (c, _server) = established(KEY);
    events(c);
    unsafe { tally_client_receive_eof(c, 1_020) };
    let ev = events(c);
    assert_eq!(
        (ev[0].0, ev[0].4),
        (TallyEventKind::TALLY_EVENT_CLOSED, TALLY_ERR_TRUNCATED)
    );
    unsafe { tally_client_free(c) };
}

#[test]
fn invalid_arguments_are_refused_not_crashed_on() {
    let _serial = serial();
    unsafe {
        let s = &server_public();
        let enc = TALLY_MODE_ENCRYPTED;
        let new = |id: &core::ffi::CStr, key, server, nonce, mode, len| {
            tally_client_new(id.as_ptr(), key, server, nonce, mode, len, 0)
        };
        assert!(tally_client_new(core::ptr::null(), &KEY, s, &[1; 32], enc, 4096, 0).is_null());
        assert!(new(c"bad id!", &KEY, s, &[1; 32], enc, 4096).is_null());
        assert!(new(c"ok", &KEY, s, &[1; 32], enc, 100).is_null());
        assert!(new(c"ok", core::ptr::null(), s, &[1; 32], enc, 4096).is_null());
        assert!(new(c"ok", &KEY, core::ptr::null(), &[1; 32], enc, 4096).is_null());
        assert!(new(c"ok", &KEY, s, core::ptr::null(), enc, 4096).is_null());
        // A mode this library does not know: refused, not guessed.
        assert!(new(c"ok", &KEY, s, &[1; 32], TallyMode(2), 4096).is_null());
        // A server key of low order (spec 3: X25519 gives zeros): nothing to talk to.
        assert!(new(c"ok", &KEY, &[0; 32], &[1; 32], enc, 4096).is_null());
        let authenticated = new(
            c"ok",
            &KEY,
            &[0; 32],
            &[1; 32],
            TALLY_MODE_AUTHENTICATED,
            4096,
        );
        assert!(
            !authenticated.is_null(),
            "the authenticated mode does not use the server key"
        );
        tally_client_free(authenticated);
        assert_eq!(
            tally_client_receive(core::ptr::null_mut(), core::ptr::null(), 0, 0),
            TALLY_ERR_INVALID_ARGUMENT
        );
        let c = new(c"ok", &KEY, s, &[1; 32], enc, 4096);
        assert_eq!(
            tally_client_request(c, b"x".as_ptr(), 1, 0, core::ptr::null_mut()),
            TALLY_ERR_NOT_OPEN,
            "before the handshake"
        );
        // The handshake deadline.
        assert_eq!(tally_client_next_timeout(c), 10_000);
        tally_client_handle_timeout(c, 10_000);
        let ev = events(c);
        assert_eq!(ev[0].4, TALLY_ERR_TIMEOUT);
        tally_client_free(c);
        assert!(tally_enroll_new(c"tally1-nope".as_ptr(), c"x".as_ptr(), &[3; 32]).is_null());
        tally_client_free(core::ptr::null_mut());
        tally_enroll_free(core::ptr::null_mut());
    }
}

#[test]
fn enrollment_through_the_c_api() {
    let _serial = serial();
    let server = Enroller::new();
    let (e, wait) = server.reply_to(&server.token());
    assert_eq!(unsafe { tally_enroll_result(e, core::ptr::null_mut()) }, 1);
    let pending = wait.handle_confirm(&take_enrollment(e)).unwrap();
    let expected = pending.identity_key().clone();
    let mut done = BytesMut::new();
    pending.committed(&mut done);
    let mut key = [0u8; 32];
    let mut server_key = [0u8; 32];
    assert_eq!(
        unsafe { tally_enroll_key(e, &mut key) },
        TALLY_ERR_NOT_OPEN,
        "no key before ENROLL_DONE"
    );
    assert_eq!(
        unsafe { tally_enroll_server_key(e, &mut server_key) },
        TALLY_ERR_NOT_OPEN,
        "no server key before the server proved it holds it"
    );
    assert_eq!(
        unsafe { tally_enroll_receive(e, done.as_ptr(), done.len()) },
        TALLY_OK
    );
    assert_eq!(unsafe { tally_enroll_result(e, core::ptr::null_mut()) }, 0);
    assert_eq!(unsafe { tally_enroll_key(e, &mut key) }, TALLY_OK);
    assert_eq!(&key, expected.expose());
    // The credential's `server-key` (spec 9.2): the token's S.
    assert_eq!(
        unsafe { tally_enroll_server_key(e, &mut server_key) },
        TALLY_OK
    );
    assert_eq!(server_key, server.params.static_public());
    assert_eq!(
        unsafe { tally_enroll_server_key(e, core::ptr::null_mut()) },
        TALLY_ERR_INVALID_ARGUMENT
    );
    unsafe { tally_enroll_free(e) };

    // A token pinned to another server's key: the reply does not verify.
    let other = EnrollmentToken {
        server_static: [0x55; 32],
        ..server.token()
    };
    let (e, _) = server.reply_to(&other);
    assert_eq!(
        unsafe { tally_enroll_result(e, core::ptr::null_mut()) },
        TALLY_ERR_SERVER_NOT_AUTHENTIC as i32
    );
    assert!(take_enrollment(e).is_empty(), "no CONFIRM");
    unsafe { tally_enroll_free(e) };
}

/// The core's enrollment server, in memory, in open mode.
struct Enroller {
    params: ServerParams,
    ek: SecretKey,
}

impl Enroller {
    fn new() -> Self {
        Enroller {
            params: ServerParams {
                static_secret: x25519_dalek::StaticSecret::from([3; 32]),
                allow_open: true,
            },
            ek: SecretKey::from_bytes([4; 32]),
        }
    }

    /// The open token for this server.
    fn token(&self) -> EnrollmentToken {
        EnrollmentToken {
            mode: EnrollMode::Open,
            credential: self.ek.clone(),
            server_static: self.params.static_public(),
        }
    }

    /// A C enrollment of `dev-9` with `token`, its ENROLL_INIT answered and the reply
    /// handed to it.
    fn reply_to(&self, token: &EnrollmentToken) -> (*mut TallyEnrollment, ServerAwaitConfirm) {
        let text = std::ffi::CString::new(token.encode().as_str()).unwrap();
        let e = unsafe { tally_enroll_new(text.as_ptr(), c"dev-9".as_ptr(), &[5; 32]) };
        assert!(!e.is_null());
        let init = take_enrollment(e);
        let mut reply = BytesMut::new();
        let ek = self.ek.clone();
        let wait =
            ServerAwaitConfirm::handle_init(&self.params, &init, |_, _| ek, [6; 32], &mut reply)
                .unwrap();
        assert_eq!(
            unsafe { tally_enroll_receive(e, reply.as_ptr(), reply.len()) },
            TALLY_OK
        );
        (e, wait)
    }
}

/// The heap a session holds between calls, in each mode, as `c/README.md` states it
/// (`cargo test -p tally-c heap -- --nocapture` prints the figures).
#[test]
fn heap_use_of_one_session() {
    let _serial = serial();
    for (name, mode) in [
        ("encrypted", TALLY_MODE_ENCRYPTED),
        ("authenticated", TALLY_MODE_AUTHENTICATED),
    ] {
        let mut idle = isize::MAX;
        let mut after_request = isize::MAX;
        for _ in 0..5 {
            let before = LIVE.load(Ordering::SeqCst);
            let (c, server) = established_in(mode, KEY);
            let mut server = server.unwrap();
            events(c);
            let with_both = LIVE.load(Ordering::SeqCst) - before;
            let mut seq = 0;
            unsafe { tally_client_request(c, [0u8; 64].as_ptr(), 64, 1_010, &mut seq) };
            server.handle_input(&take(c), Duration::from_millis(1_011));
            let Some(Event::Request { seq: s, payload }) = server.poll_event() else {
                panic!()
            };
            server
                .respond(s, Status::OK, payload, Duration::from_millis(1_012))
                .unwrap();
            feed(c, &server_out(&mut server), 1_013);
            events(c);
            let with_both_after = LIVE.load(Ordering::SeqCst) - before;
            let before_drop = LIVE.load(Ordering::SeqCst);
            drop(server);
            let server_alone = before_drop - LIVE.load(Ordering::SeqCst);
            idle = idle.min(with_both - server_alone);
            after_request = after_request.min(with_both_after - server_alone);
            unsafe { tally_client_free(c) };
        }
        eprintln!(
            "heap per client session, {name} mode: {idle} bytes established, \
             {after_request} after a 64-byte request"
        );
        assert!(idle > 0 && idle < 4096, "{name}: {idle}");
        assert!(after_request < 8192, "{name}: {after_request}");
    }
}

/// Review findings: an ERROR after CLIENT_FINISH is the server's refusal (with its
/// code), not a protocol error; a payload over the server's limit is TOO_LARGE, and the
/// session goes on.
#[test]
fn a_refused_finish_and_an_oversized_payload_are_reported_as_such() {
    let _serial = serial();
    let (c, _server) = established(KEY);
    events(c);
    let error = tally::proto::frame::ErrorFrame::new(tally::proto::ErrorCode::TAKEOVER_REFUSED);
    feed(c, &error.encoded(), 1_010);
    let ev = events(c);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].0, ev[0].4, ev[0].3),
        (TallyEventKind::TALLY_EVENT_CLOSED, TALLY_ERR_REFUSED, 7)
    );
    unsafe { tally_client_free(c) };

    let (c, server) = established(KEY);
    let mut server = server.unwrap();
    events(c);
    let big = vec![0u8; 70_000]; // the server announced 65536
    let mut seq = 0;
    assert_eq!(
        unsafe { tally_client_request(c, big.as_ptr(), big.len(), 1_010, &mut seq) },
        TALLY_ERR_TOO_LARGE
    );
    assert!(take(c).is_empty(), "nothing sent");
    assert_eq!(
        unsafe { tally_client_request(c, b"small".as_ptr(), 5, 1_011, &mut seq) },
        TALLY_OK,
        "the session goes on"
    );
    assert_eq!(seq, 1);
    // An answer too large is replaced by BACKEND_ERROR (spec 8.4) and reported.
    let sseq = server
        .request(Bytes::from_static(b"q"), Duration::from_millis(1_012))
        .unwrap();
    feed(c, &server_out(&mut server), 1_013);
    events(c);
    assert_eq!(
        unsafe { tally_client_respond(c, sseq, 0, big.as_ptr(), big.len(), 1_014) },
        TALLY_ERR_TOO_LARGE
    );
    server.handle_input(&take(c), Duration::from_millis(1_015));
    let answers: Vec<_> = std::iter::from_fn(|| server.poll_event()).collect();
    assert!(
        answers.iter().any(|e| matches!(
            e,
            Event::Response {
                status: Status(2),
                ..
            }
        )),
        "{answers:?}"
    );
    unsafe { tally_client_free(c) };
}

/// Review finding: bytes after the enrollment ended (four zero bytes injected after
/// ENROLL_DONE) turned a success into a failure and wiped the key.
#[test]
fn nothing_after_the_end_of_an_enrollment_changes_its_result() {
    let _serial = serial();
    let server = Enroller::new();
    let start = || {
        let (e, wait) = server.reply_to(&server.token());
        (e, wait.handle_confirm(&take_enrollment(e)).unwrap())
    };
    let (e, pending) = start();
    assert_eq!(unsafe { tally_enroll_confirmed(e) }, 1);
    let mut done = BytesMut::new();
    pending.committed(&mut done);
    done.extend_from_slice(&[0, 0, 0, 0]);
    unsafe { tally_enroll_receive(e, done.as_ptr(), done.len()) };
    unsafe { tally_enroll_receive(e, [0u8; 4].as_ptr(), 4) };
    unsafe { tally_enroll_receive_eof(e) };
    unsafe { tally_enroll_timeout(e) };
    assert_eq!(unsafe { tally_enroll_result(e, core::ptr::null_mut()) }, 0);
    let mut key = [0u8; 32];
    assert_eq!(unsafe { tally_enroll_key(e, &mut key) }, TALLY_OK);
    unsafe { tally_enroll_free(e) };

    // A deadline after CONFIRM: uncertain, not a plain timeout (spec 6.4).
    let (e, _pending) = start();
    unsafe { tally_enroll_timeout(e) };
    assert_eq!(
        unsafe { tally_enroll_result(e, core::ptr::null_mut()) },
        TALLY_ERR_UNCONFIRMED as i32
    );
    unsafe { tally_enroll_free(e) };
}

/// Issue 26: a hostile (authenticated) server sent any number of REQUESTs and the client
/// kept every one unanswered. Beyond `TALLY_MAX_UNANSWERED_REQUESTS` the library answers
/// them itself with UNAVAILABLE, at once, whether or not the caller polls in between;
/// the session goes on, and an answer makes room again.
#[test]
fn server_requests_beyond_the_unanswered_bound_are_answered_busy() {
    let _serial = serial();
    let (c, server) = established(KEY);
    let mut server = server.unwrap();
    events(c);
    const SENT: usize = 200;
    let mut now = 1_010;
    for batch in 0..4 {
        for _ in 0..SENT / 4 {
            server
                .request(Bytes::from_static(b"run"), Duration::from_millis(now))
                .unwrap();
        }
        // Not polled in between: what waits counts too.
        let out = server_out(&mut server);
        if batch % 2 == 0 {
            assert_eq!(
                unsafe { tally_client_receive(c, out.as_ptr(), out.len(), now) },
                TALLY_OK
            );
        } else {
            feed(c, &out, now);
        }
        now += 1;
    }
    let ev = events(c);
    assert_eq!(ev.len(), TALLY_MAX_UNANSWERED_REQUESTS, "{}", ev.len());
    assert!(ev
        .iter()
        .all(|e| e.0 == TallyEventKind::TALLY_EVENT_REQUEST));
    let firsts: Vec<u64> = ev.iter().map(|e| e.1).collect();
    assert_eq!(
        firsts,
        (1..=TALLY_MAX_UNANSWERED_REQUESTS as u64).collect::<Vec<_>>()
    );
    // The others were answered UNAVAILABLE, with the reason.
    server.handle_input(&take(c), Duration::from_millis(now));
    let mut busy = 0;
    while let Some(e) = server.poll_event() {
        let Event::Response {
            req_seq,
            status,
            payload,
        } = e
        else {
            panic!("{e:?}")
        };
        assert!(req_seq > TALLY_MAX_UNANSWERED_REQUESTS as u64);
        assert_eq!(status, Status::UNAVAILABLE);
        assert_eq!(&payload[..], BUSY_UNANSWERED);
        busy += 1;
    }
    assert_eq!(busy, SENT - TALLY_MAX_UNANSWERED_REQUESTS);
    assert_eq!(server.unanswered_requests(), 0);
    assert_eq!(
        server.pending_requests().count(),
        TALLY_MAX_UNANSWERED_REQUESTS
    );
    // Still the bound: one more is refused...
    let more = server
        .request(Bytes::from_static(b"more"), Duration::from_millis(now))
        .unwrap();
    feed(c, &server_out(&mut server), now);
    assert!(events(c).is_empty());
    server.handle_input(&take(c), Duration::from_millis(now));
    assert!(matches!(
        server.poll_event(),
        Some(Event::Response { req_seq, status: Status::UNAVAILABLE, .. }) if req_seq == more
    ));
    // ...until the device answers one: then the next is its.
    assert_eq!(
        unsafe { tally_client_respond(c, firsts[0], 0, b"ok".as_ptr(), 2, now) },
        TALLY_OK
    );
    let next = server
        .request(Bytes::from_static(b"next"), Duration::from_millis(now))
        .unwrap();
    server.handle_input(&take(c), Duration::from_millis(now));
    assert!(matches!(
        server.poll_event(),
        Some(Event::Response {
            status: Status::OK,
            ..
        })
    ));
    feed(c, &server_out(&mut server), now);
    let ev = events(c);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(
        (ev[0].0, ev[0].1),
        (TallyEventKind::TALLY_EVENT_REQUEST, next)
    );
    assert_eq!(
        unsafe { tally_client_is_finished(c) },
        0,
        "the session goes on"
    );
    unsafe { tally_client_free(c) };
}

/// Issue 26: a server that sends MESSAGEs faster than the caller polls grew the event
/// queue without bound. At `TALLY_MAX_EVENTS` waiting, a REQUEST is answered UNAVAILABLE
/// and a MESSAGE (which cannot be refused, and is not dropped silently) ends the
/// session: CLOSE to the server, `TALLY_ERR_OVERLOADED` to the caller. RESPONSEs to the
/// caller's own requests still get in.
#[test]
fn a_flood_of_events_not_polled_ends_the_session_as_overloaded() {
    let _serial = serial();
    let (c, server) = established(KEY);
    let mut server = server.unwrap();
    events(c);
    let now = 1_010;
    let at = Duration::from_millis(now);
    // One request of the caller's, answered after the queue is full.
    let mut own = 0;
    assert_eq!(
        unsafe { tally_client_request(c, b"mine".as_ptr(), 4, now, &mut own) },
        TALLY_OK
    );
    server.handle_input(&take(c), at);
    let Some(Event::Request { seq: theirs, .. }) = server.poll_event() else {
        panic!()
    };
    for _ in 0..TALLY_MAX_EVENTS {
        server.message(Bytes::from_static(b"m"), at).unwrap();
    }
    let refused = server.request(Bytes::from_static(b"r"), at).unwrap();
    server
        .respond(theirs, Status::OK, Bytes::from_static(b"yours"), at)
        .unwrap();
    feed(c, &server_out(&mut server), now);
    server.handle_input(&take(c), at);
    assert!(matches!(
        server.poll_event(),
        Some(Event::Response { req_seq, status: Status::UNAVAILABLE, ref payload })
            if req_seq == refused && &payload[..] == BUSY_EVENTS
    ));
    assert_eq!(unsafe { tally_client_is_finished(c) }, 0);
    // One more message: over.
    server.message(Bytes::from_static(b"last"), at).unwrap();
    server.message(Bytes::from_static(b"after"), at).unwrap();
    feed(c, &server_out(&mut server), now);
    server.handle_input(&take(c), at);
    let Some(Event::Closed(tally::proto::connection::End::PeerClosed { code, reason })) =
        server.poll_event()
    else {
        panic!("the client closed the session")
    };
    assert_eq!((code, reason.as_str()), (CloseCode::NORMAL, OVERLOADED));
    feed(c, &server_out(&mut server), now);
    let ev = events(c);
    assert_eq!(
        ev.len(),
        TALLY_MAX_EVENTS + 2,
        "the messages, the response, the end"
    );
    assert!(ev[..TALLY_MAX_EVENTS]
        .iter()
        .all(|e| e.0 == TallyEventKind::TALLY_EVENT_MESSAGE && e.5 == b"m"));
    assert_eq!(
        (
            ev[TALLY_MAX_EVENTS].0,
            ev[TALLY_MAX_EVENTS].1,
            &ev[TALLY_MAX_EVENTS].5[..]
        ),
        (TallyEventKind::TALLY_EVENT_RESPONSE, own, &b"yours"[..])
    );
    let end = &ev[TALLY_MAX_EVENTS + 1];
    assert_eq!(
        (end.0, end.4),
        (TallyEventKind::TALLY_EVENT_CLOSED, TALLY_ERR_OVERLOADED)
    );
    assert_eq!(unsafe { tally_client_is_finished(c) }, 1);
    let text =
        unsafe { core::ffi::CStr::from_ptr(tally_result_string(TALLY_ERR_OVERLOADED as i32)) };
    assert!(text.to_str().unwrap().contains("TALLY_MAX_EVENTS"));
    unsafe { tally_client_free(c) };
}

/// The encrypted mode end to end (spec 7.7, 8.2): SEALED_HELLO with the id sealed to
/// the server's key, opened by the core's server with its static secret; the session's
/// frames sealed in both directions.
#[test]
fn an_encrypted_session_end_to_end() {
    let _serial = serial();
    let c = client_to(TALLY_MODE_ENCRYPTED, &server_public());
    let hello = take(c);
    // SEALED_HELLO: type 0x13, always 123 bytes, the id nowhere in the clear.
    assert_eq!((hello.len(), hello[4]), (123, 0x13));
    assert!(!hello.windows(8).any(|w| w == b"sensor-1"));
    let received = HelloReceived::parse(
        &hello,
        &tally::proto::handshake::ServerKey::from(&server_static()),
    )
    .unwrap();
    assert_eq!(received.mode(), Mode::Encrypted);
    assert_eq!(received.id().map(Id::as_str), Some("sensor-1"));
    let mut auth = BytesMut::new();
    let wait = answer_hello(&hello, KEY, &mut auth);
    assert_eq!(auth[4], 0x14, "SEALED_AUTH");
    assert!(events(c).is_empty());
    feed(c, &auth, 1_001);
    let ev = events(c);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].0, TallyEventKind::TALLY_EVENT_ESTABLISHED);
    let finish = take(c);
    assert_eq!((finish.len(), finish[4]), (37, 0x12), "CLIENT_FINISH");
    let established = wait.handle_finish(&finish).unwrap();
    let mut server = Connection::new(
        established.session,
        Config::server(),
        Duration::from_millis(1_002),
    );

    // A request and its answer, neither readable on the wire.
    let mut seq = 0;
    let secret = b"the door code is 4711";
    let r = unsafe { tally_client_request(c, secret.as_ptr(), secret.len(), 1_010, &mut seq) };
    assert_eq!((r, seq), (TALLY_OK, 1));
    let wire = take(c);
    assert!(!wire.windows(4).any(|w| w == b"door"), "sealed");
    // Header (13 bytes), payload's fields sealed, a 16-byte Poly1305 tag (spec 4.5).
    server.handle_input(&wire, Duration::from_millis(1_011));
    let Some(Event::Request { seq: got, payload }) = server.poll_event() else {
        panic!("the server got no request")
    };
    assert_eq!((got, &payload[..]), (1, &secret[..]));
    server
        .respond(
            got,
            Status::OK,
            Bytes::from_static(b"opened the door"),
            Duration::from_millis(1_012),
        )
        .unwrap();
    let wire = server_out(&mut server);
    assert!(!wire.windows(4).any(|w| w == b"door"), "sealed");
    feed(c, &wire, 1_013);
    let ev = events(c);
    assert_eq!(
        (ev[0].0, ev[0].1, &ev[0].5[..]),
        (
            TallyEventKind::TALLY_EVENT_RESPONSE,
            1,
            &b"opened the door"[..]
        )
    );

    // A bit flipped in a sealed frame: the AEAD does not open, CLOSE PROTOCOL_ERROR.
    server
        .message(Bytes::from_static(b"hello"), Duration::from_millis(1_020))
        .unwrap();
    let mut frame = server_out(&mut server);
    frame[14] ^= 1;
    feed(c, &frame, 1_021);
    assert!(events(c).is_empty(), "the message is not delivered");
    server.handle_input(&take(c), Duration::from_millis(1_022));
    assert!(matches!(
        server.poll_event(),
        Some(Event::Closed(End::PeerClosed {
            code: CloseCode::PROTOCOL_ERROR,
            ..
        }))
    ));
    unsafe { tally_client_free(c) };

    // A credential pinned to another server's key: the id does not open, the server
    // answers as for an unknown id, and the client sees the handshake fail (spec 7.5).
    let other = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([0x21; 32]));
    let c = client_to(TALLY_MODE_ENCRYPTED, other.as_bytes());
    let hello = take(c);
    assert!(HelloReceived::parse(
        &hello,
        &tally::proto::handshake::ServerKey::from(&server_static())
    )
    .unwrap()
    .id()
    .is_none());
    let mut auth = BytesMut::new();
    answer_hello(&hello, KEY, &mut auth);
    feed(c, &auth, 1_001);
    let ev = events(c);
    assert_eq!(
        (ev[0].0, ev[0].4),
        (TallyEventKind::TALLY_EVENT_CLOSED, TALLY_ERR_AUTH_FAILED)
    );
    assert!(take(c).is_empty(), "no CLIENT_FINISH");
    unsafe { tally_client_free(c) };
}

/// The authenticated mode, chosen explicitly, still works (HELLO, frames in the clear
/// with their HMAC tags).
#[test]
fn the_authenticated_mode_still_works() {
    let _serial = serial();
    let c = client_to(TALLY_MODE_AUTHENTICATED, &server_public());
    let hello = take(c);
    assert_eq!(hello[4], 0x10, "HELLO");
    assert!(
        hello.windows(8).any(|w| w == b"sensor-1"),
        "the id in the clear"
    );
    unsafe { tally_client_free(c) };

    let (c, server) = established_in(TALLY_MODE_AUTHENTICATED, KEY);
    let mut server = server.unwrap();
    assert_eq!(events(c)[0].0, TallyEventKind::TALLY_EVENT_ESTABLISHED);
    let mut seq = 0;
    assert_eq!(
        unsafe { tally_client_request(c, b"temp?".as_ptr(), 5, 1_010, &mut seq) },
        TALLY_OK
    );
    let wire = take(c);
    assert!(wire.windows(5).any(|w| w == b"temp?"), "in the clear");
    assert_eq!(wire.len(), 13 + 5 + 32, "an HMAC-SHA256 tag");
    server.handle_input(&wire, Duration::from_millis(1_011));
    let Some(Event::Request { seq: got, .. }) = server.poll_event() else {
        panic!("the server got no request")
    };
    server
        .respond(
            got,
            Status::OK,
            Bytes::from_static(b"21.5"),
            Duration::from_millis(1_012),
        )
        .unwrap();
    feed(c, &server_out(&mut server), 1_013);
    let ev = events(c);
    assert_eq!(
        (ev[0].0, ev[0].1, &ev[0].5[..]),
        (TallyEventKind::TALLY_EVENT_RESPONSE, 1, &b"21.5"[..])
    );
    unsafe { tally_client_close(c, 0, 1_020) };
    server.handle_input(&take(c), Duration::from_millis(1_021));
    feed(c, &server_out(&mut server), 1_022);
    assert_eq!(events(c)[0].4, TALLY_OK);
    assert_eq!(unsafe { tally_client_is_finished(c) }, 1);
    unsafe { tally_client_free(c) };
}

/// Spec 7.8, 13.12: a server whose policy refuses the mode answers ERROR MODE_REFUSED;
/// the client reports it as such and sends nothing more: no HELLO in the other mode,
/// now or later.
#[test]
fn a_refused_mode_is_reported_and_never_retried_in_the_other() {
    let _serial = serial();
    for (mode, server_accepts) in [
        // tallyd's `encryption = "off"` refusing SEALED_HELLO...
        (TALLY_MODE_ENCRYPTED, Mode::Authenticated),
        // ...and its default "required" refusing HELLO.
        (TALLY_MODE_AUTHENTICATED, Mode::Encrypted),
    ] {
        let c = client_to(mode, &server_public());
        let hello = take(c);
        let refused = HelloReceived::check_mode(&hello, |m| m == server_accepts).unwrap_err();
        assert!(matches!(refused, ProtocolError::ModeRefused(_)));
        let error = tally::proto::frame::ErrorFrame::new(refused.error_code());
        feed(c, &error.encoded(), 1_001);
        let ev = events(c);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].0, ev[0].4, ev[0].3),
            (
                TallyEventKind::TALLY_EVENT_CLOSED,
                TALLY_ERR_MODE_REFUSED,
                TALLY_ERROR_MODE_REFUSED
            )
        );
        assert_eq!(ev[0].3, 0x000a);
        // Nothing more to send, no deadline to wake up for, nothing after a while.
        assert!(take(c).is_empty(), "no second attempt");
        assert_eq!(unsafe { tally_client_is_finished(c) }, 1);
        assert_eq!(unsafe { tally_client_next_timeout(c) }, -1);
        unsafe { tally_client_handle_timeout(c, 60_000) };
        unsafe { tally_client_receive_eof(c, 60_001) };
        assert!(take(c).is_empty(), "no second attempt, ever");
        assert!(events(c).is_empty());
        assert_eq!(
            unsafe { tally_client_request(c, b"x".as_ptr(), 1, 60_002, core::ptr::null_mut()) },
            TALLY_ERR_NOT_OPEN
        );
        unsafe { tally_client_free(c) };
    }
    let text =
        unsafe { core::ffi::CStr::from_ptr(tally_result_string(TALLY_ERR_MODE_REFUSED as i32)) };
    assert!(text.to_str().unwrap().contains("do not fall back"));
}

#[test]
fn queued_deliveries_are_events_and_acknowledged_once() {
    let _serial = serial();
    let (c, server) = established(KEY);
    let mut server = server.unwrap();
    events(c);
    let at = Duration::from_millis(1_100);
    server
        .deliver(7, DeliveryKind::Request, Bytes::from_static(b"fw?"), at)
        .unwrap();
    server
        .deliver(9, DeliveryKind::Message, Bytes::from_static(b"reboot"), at)
        .unwrap();
    feed(c, &server_out(&mut server), 1_101);
    let ev = events(c);
    assert_eq!(
        ev.iter()
            .map(|e| (e.0, e.1, e.2, &e.5[..]))
            .collect::<Vec<_>>(),
        [
            (TallyEventKind::TALLY_EVENT_DELIVERY, 7, 1, &b"fw?"[..]),
            (TallyEventKind::TALLY_EVENT_DELIVERY, 9, 2, &b"reboot"[..]),
        ]
    );
    // Out of order, each once; an id not delivered is refused.
    assert_eq!(
        unsafe { tally_client_ack(c, 9, 0, core::ptr::null(), 0, 1_102) },
        TALLY_OK
    );
    assert_eq!(
        unsafe { tally_client_ack(c, 7, 0, b"1.4.2".as_ptr(), 5, 1_102) },
        TALLY_OK
    );
    for msg_id in [7, 8] {
        assert_eq!(
            unsafe { tally_client_ack(c, msg_id, 0, core::ptr::null(), 0, 1_102) },
            TALLY_ERR_NOT_PENDING
        );
    }
    server.handle_input(&take(c), Duration::from_millis(1_103));
    let acks: Vec<Event> = core::iter::from_fn(|| server.poll_event()).collect();
    assert_eq!(
        acks,
        [
            Event::Ack {
                msg_id: 9,
                status: Status::OK,
                payload: Bytes::new()
            },
            Event::Ack {
                msg_id: 7,
                status: Status::OK,
                payload: Bytes::from_static(b"1.4.2")
            },
        ]
    );
    unsafe { tally_client_free(c) };
}

/// `TALLY_ABI_VERSION` and the layout it stands for: a failure here is a change of the
/// binary interface, which must come with a new `TALLY_ABI_VERSION` (and this test).
#[test]
fn the_abi_version_and_the_event_layout() {
    let _serial = serial();
    assert_eq!(tally_abi_version(), TALLY_ABI_VERSION);
    assert_eq!(TALLY_ABI_VERSION, 1);
    #[cfg(target_pointer_width = "64")]
    {
        assert_eq!(size_of::<TallyEvent>(), 72);
        assert_eq!(
            [
                offset_of!(TallyEvent, kind),
                offset_of!(TallyEvent, seq),
                offset_of!(TallyEvent, status),
                offset_of!(TallyEvent, code),
                offset_of!(TallyEvent, result),
                offset_of!(TallyEvent, payload),
                offset_of!(TallyEvent, payload_len),
                offset_of!(TallyEvent, reserved),
            ],
            [0, 8, 16, 18, 20, 24, 32, 40]
        );
    }
    // Objects may pass from one thread to another between calls (tally.h).
    fn movable<T: Send>() {}
    movable::<TallyClient>();
    movable::<TallyEnrollment>();
}

/// Issue 31: every out-parameter may point to uninitialised memory. Each is handed over
/// poisoned (every byte 0xA5) and must come back with everything the function promises
/// written, with the right values (the reserved room zeroed), and untouched where it
/// promises to write nothing. (The `transmit` buffers are poisoned in every test:
/// `take`, `take_enrollment`.)
#[test]
fn every_out_parameter_may_be_uninitialised() {
    let _serial = serial();
    let (c, server) = established(KEY);
    let mut server = server.unwrap();
    let event = |kind: TallyEventKind, seq, status, code, result: TallyResult, payload: &[u8]| {
        let (polled, e) = poll_raw(c);
        assert_eq!((polled, e.payload()), (1, payload.to_vec()), "{e:x?}");
        let expected = RawEvent {
            kind: kind as u32,
            seq,
            status,
            code,
            result: result as i32,
            payload: e.payload,
            payload_len: payload.len(),
            reserved: [0; 4],
        };
        assert_eq!(e, expected);
    };
    event(
        TallyEventKind::TALLY_EVENT_ESTABLISHED,
        0,
        0,
        0,
        TALLY_OK,
        b"",
    );
    // Nothing waiting: NONE, every field zero.
    assert_eq!(poll_raw(c), (0, NONE));
    // A NULL client or event: nothing written, nothing taken.
    let mut e = poisoned::<TallyEvent>();
    assert_eq!(
        unsafe { tally_client_poll_event(core::ptr::null_mut(), e.as_mut_ptr()) },
        0
    );
    assert_eq!(RawEvent::read(&e), POISONED);

    // `seq`, written on success.
    let mut seq = poisoned::<u64>();
    assert_eq!(
        unsafe { tally_client_request(c, b"temp?".as_ptr(), 5, 1_010, seq.as_mut_ptr()) },
        TALLY_OK
    );
    // SAFETY: a u64's bytes, all initialised (poison, or the library's).
    assert_eq!(unsafe { seq.assume_init() }, 1);

    // One event of each kind, each field different from its NONE value where it can be.
    server.handle_input(&take(c), Duration::from_millis(1_011));
    let Some(Event::Request { seq: got, .. }) = server.poll_event() else {
        panic!("the server got no request")
    };
    let at = Duration::from_millis(1_012);
    server
        .respond(got, Status(300), Bytes::from_static(b"21.5"), at)
        .unwrap();
    let sseq = server.request(Bytes::from_static(b"reboot?"), at).unwrap();
    server.message(Bytes::from_static(b"hi"), at).unwrap();
    server
        .deliver(7, DeliveryKind::Request, Bytes::from_static(b"fw?"), at)
        .unwrap();
    server.close(CloseCode::TAKEN_OVER, "moved", at);
    feed(c, &server_out(&mut server), 1_013);
    event(
        TallyEventKind::TALLY_EVENT_RESPONSE,
        1,
        300,
        0,
        TALLY_OK,
        b"21.5",
    );
    event(
        TallyEventKind::TALLY_EVENT_REQUEST,
        sseq,
        0,
        0,
        TALLY_OK,
        b"reboot?",
    );
    event(
        TallyEventKind::TALLY_EVENT_MESSAGE,
        0,
        0,
        0,
        TALLY_OK,
        b"hi",
    );
    event(
        TallyEventKind::TALLY_EVENT_DELIVERY,
        7,
        1,
        0,
        TALLY_OK,
        b"fw?",
    );
    event(
        TallyEventKind::TALLY_EVENT_CLOSED,
        0,
        0,
        CloseCode::TAKEN_OVER.0,
        TALLY_ERR_CLOSED_BY_SERVER,
        b"moved",
    );
    assert_eq!(poll_raw(c), (0, NONE));
    // `seq` is left alone when nothing was sent.
    let mut seq = poisoned::<u64>();
    assert_eq!(
        unsafe { tally_client_request(c, b"x".as_ptr(), 1, 1_014, seq.as_mut_ptr()) },
        TALLY_ERR_NOT_OPEN
    );
    assert!(untouched(&seq));
    unsafe { tally_client_free(c) };

    // The enrollment's `code`, `key` and `server_key`.
    let enroller = Enroller::new();
    let (e, wait) = enroller.reply_to(&enroller.token());
    let mut code = poisoned::<u16>();
    let mut key = poisoned::<[u8; 32]>();
    let mut server_key = poisoned::<[u8; 32]>();
    // Running: `code` untouched; no key yet, and both buffers untouched.
    assert_eq!(unsafe { tally_enroll_result(e, code.as_mut_ptr()) }, 1);
    assert_eq!(
        unsafe { tally_enroll_key(e, key.as_mut_ptr()) },
        TALLY_ERR_NOT_OPEN
    );
    assert_eq!(
        unsafe { tally_enroll_server_key(e, server_key.as_mut_ptr()) },
        TALLY_ERR_NOT_OPEN
    );
    assert!(untouched(&code) && untouched(&key) && untouched(&server_key));
    let pending = wait.handle_confirm(&take_enrollment(e)).unwrap();
    let expected = pending.identity_key().clone();
    let mut done = BytesMut::new();
    pending.committed(&mut done);
    assert_eq!(
        unsafe { tally_enroll_receive(e, done.as_ptr(), done.len()) },
        TALLY_OK
    );
    assert_eq!(unsafe { tally_enroll_result(e, code.as_mut_ptr()) }, 0);
    assert_eq!(unsafe { tally_enroll_key(e, key.as_mut_ptr()) }, TALLY_OK);
    assert_eq!(
        unsafe { tally_enroll_server_key(e, server_key.as_mut_ptr()) },
        TALLY_OK
    );
    // SAFETY: integers and bytes, all initialised (poison, or the library's).
    let (code, key, server_key) = unsafe {
        (
            code.assume_init(),
            key.assume_init(),
            server_key.assume_init(),
        )
    };
    assert_eq!(code, 0);
    assert_eq!(&key, expected.expose());
    assert_eq!(server_key, enroller.params.static_public());
    unsafe { tally_enroll_free(e) };

    // A final result: `code` is the server's ERROR code for a refusal, 0 for another
    // failure.
    let token = std::ffi::CString::new(enroller.token().encode().as_str()).unwrap();
    for (refusal, result, expected) in [
        (
            Some(tally::proto::ErrorCode::ID_TAKEN),
            TALLY_ERR_REFUSED,
            tally::proto::ErrorCode::ID_TAKEN.0,
        ),
        (None, TALLY_ERR_TRUNCATED, 0),
    ] {
        let e = unsafe { tally_enroll_new(token.as_ptr(), c"dev-9".as_ptr(), &[5; 32]) };
        assert!(!take_enrollment(e).is_empty(), "ENROLL_INIT");
        match refusal {
            Some(refusal) => {
                let error = tally::proto::frame::ErrorFrame::new(refusal).encoded();
                assert_eq!(
                    unsafe { tally_enroll_receive(e, error.as_ptr(), error.len()) },
                    TALLY_OK
                );
            }
            None => unsafe { tally_enroll_receive_eof(e) },
        }
        let mut code = poisoned::<u16>();
        assert_eq!(
            unsafe { tally_enroll_result(e, code.as_mut_ptr()) },
            result as i32
        );
        // SAFETY: a u16's bytes, all initialised (poison, or the library's).
        assert_eq!(unsafe { code.assume_init() }, expected);
        unsafe { tally_enroll_free(e) };
    }
}
