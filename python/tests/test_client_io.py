"""The TCP client against a scripted server in this process: retries and backoff (13.10),
no retry after ENROLL_CONFIRM (6.4), the CLOSE a failure sends (8.3), keepalive (8.5),
closing and truncation (8.6), the encrypted mode (7.7, 8.2), no downgrade (7.8) and key
update (8.7). The scripted server is built from the package's own frame functions and
SessionState, playing the server's role; it answers either mode (the client's default is
the encrypted one, so most tests here run it)."""
import os
import queue
import socket
import struct
import threading
import time

import pytest

import tally
import tally.client
from tally import CloseCode, ErrorCode, FrameType, Status
from tally._primitives import H, mac, tags_equal, x25519, x25519_base
from tally.frames import HANDSHAKE_LIMIT, FrameDecoder, error_frame, parse_enroll_init
from tally.proto import SessionState, enroll_init_tag, enroll_keys

from scripted import before_tag, finish_verifies, open_sealed_hello, sealed_auth, server_auth

#: The scripted server's static key pair (s, S): credentials here pin S.
SERVER_SECRET = bytes(range(0x20, 0x40))
SERVER_KEY = x25519_base(SERVER_SECRET)


class Conn:
    """The server's end of one accepted connection."""

    def __init__(self, sock):
        self.sock = sock
        sock.settimeout(5)
        self.dec = FrameDecoder(HANDSHAKE_LIMIT)
        self.buf = []
        self.st = None

    def read_frame(self):
        while not self.buf:
            data = self.sock.recv(65536)
            if not data:
                return None
            self.buf.extend(self.dec.feed(data))
        return self.buf.pop(0)

    def send(self, data):
        self.sock.sendall(data)

    def handshake(self, key, keepalive_ms=30000, max_frame_len=65536, finish=True,
                  expect_encrypted=None):
        """Answer HELLO (authenticated mode) or SEALED_HELLO (encrypted mode), whichever
        comes, as a server with both modes allowed; then check CLIENT_FINISH."""
        hello_f = self.read_frame()
        self.first_frame = hello_f
        encrypted = hello_f[4] == FrameType.SEALED_HELLO
        if expect_encrypted is not None:
            assert encrypted == expect_encrypted, hello_f[:5].hex()
        if encrypted:
            hello, ident, client_limit, dh_es = open_sealed_hello(hello_f, SERVER_SECRET)
            self.ident = ident
            self.client_max_frame_len = client_limit
            auth, keys = sealed_auth(hello_f, hello.ephemeral, key, dh_es, max_frame_len,
                                     keepalive_ms)
        else:
            from tally.frames import parse_hello
            hello = parse_hello(hello_f)
            self.ident = hello.id
            self.client_max_frame_len = hello.max_frame_len
            auth, keys = server_auth(hello_f, key, max_frame_len, keepalive_ms)
        self.send(auth)
        self.keys = keys
        if not finish:
            return
        fin = self.read_frame()
        assert finish_verifies(keys, hello_f, auth, fin)
        self.st = SessionState(keys.s2c, keys.c2s, send_limit=self.client_max_frame_len,
                               recv_limit=max_frame_len, client=False, encrypted=encrypted)
        self.dec.limit = max_frame_len

    def recv(self):
        """The next session frame, checked; None at EOF."""
        f = self.read_frame()
        return None if f is None else self.st.receive(f)

    def close(self):
        self.sock.close()


class Server:
    """Accepts connections and runs ``script(conn, n)`` for the n-th one, in a thread."""

    def __init__(self, script):
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(8)
        self.addr = "127.0.0.1:%d" % self.lsock.getsockname()[1]
        self.script = script
        self.accepted = 0
        self.errors = []
        self.results = {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            self.accepted += 1
            n = self.accepted
            threading.Thread(target=self._one, args=(sock, n), daemon=True).start()

    def _one(self, sock, n):
        conn = Conn(sock)
        try:
            self.results[n] = self.script(conn, n)
        except Exception as e:
            self.errors.append(e)
        finally:
            conn.close()
            self.done.set()

    def stop(self):
        self.lsock.close()
        assert not self.errors, self.errors


KEY = bytes(range(32))


def cred(server):
    return tally.Credential("dev-1", KEY, server.addr, SERVER_KEY)


def echo_one_request_then_close(conn):
    """Handshake, answer one REQUEST, then wait for the client's CLOSE and answer it."""
    conn.handshake(KEY)
    fr = conn.recv()
    assert fr.type == FrameType.REQUEST
    conn.send(conn.st.response(fr.seq, 0, fr.payload))
    fr = conn.recv()
    assert fr.type == FrameType.CLOSE
    conn.send(conn.st.close(0, ""))
    return fr.code


@pytest.fixture
def server():
    servers = []

    def make(script):
        s = Server(script)
        servers.append(s)
        return s
    yield make
    for s in servers:
        s.stop()


# --- Retries (13.10) ----------------------------------------------------------------------

def test_busy_is_retried_with_jittered_backoff(server):
    def script(conn, n):
        if n <= 2:
            conn.read_frame()
            conn.send(error_frame(ErrorCode.BUSY))
            return None
        return echo_one_request_then_close(conn)
    srv = server(script)
    t0 = time.monotonic()
    with tally.connect(cred(srv), retries=4) as s:
        elapsed = time.monotonic() - t0
        assert s.request(b"hi") == b"hi"
    assert srv.accepted == 3
    # Waits of U(0.1, 0.2) then U(0.2, 0.4) s.
    assert 0.3 <= elapsed < 1.5


def test_busy_gives_up_after_the_retries(server):
    def script(conn, n):
        conn.read_frame()
        conn.send(error_frame(ErrorCode.BUSY))
    srv = server(script)
    with pytest.raises(tally.Refused) as e:
        tally.connect(cred(srv), retries=1)
    assert e.value.busy and e.value.code == ErrorCode.BUSY
    assert srv.accepted == 2


def test_a_connection_ended_before_the_first_frame_is_retried(server):
    def script(conn, n):
        if n == 1:
            conn.read_frame()
            return None  # closed without a frame
        return echo_one_request_then_close(conn)
    srv = server(script)
    with tally.connect(cred(srv)) as s:
        assert s.request(b"x") == b"x"
    assert srv.accepted == 2


def test_other_refusals_are_not_retried(server):
    def script(conn, n):
        conn.read_frame()
        conn.send(error_frame(ErrorCode.MALFORMED))
    srv = server(script)
    with pytest.raises(tally.Refused) as e:
        tally.connect(cred(srv))
    assert e.value.code == ErrorCode.MALFORMED
    assert srv.accepted == 1


def test_unsupported_version_names_the_servers_version(server):
    def script(conn, n):
        conn.read_frame()
        conn.send(error_frame(ErrorCode.UNSUPPORTED_VERSION, 3))
    srv = server(script)
    with pytest.raises(tally.Refused) as e:
        tally.connect(cred(srv))
    assert e.value.server_version == 3 and "version 3" in str(e.value)


def test_connection_refused_is_unreachable():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(tally.Unreachable):
        tally.connect(tally.Credential("dev-1", KEY, f"127.0.0.1:{port}", SERVER_KEY), retries=0)


# --- Enrollment: nothing is retried after ENROLL_CONFIRM (6.4) -------------------------------

def enrollment_server(server, after_confirm):
    s_secret, c = os.urandom(32), os.urandom(32)
    token = tally.EnrollmentToken("open", c, x25519_base(s_secret))
    derived = {}

    def script(conn, n):
        init = conn.read_frame()
        p = parse_enroll_init(init)
        assert tags_equal(enroll_init_tag(c, init[:-32]), p.tag)
        y = os.urandom(32)
        reply_u = before_tag(FrameType.ENROLL_REPLY, x25519_base(y))
        th2 = H(init, reply_u)
        keys = enroll_keys(c, x25519(y, p.ephemeral), x25519(s_secret, p.ephemeral), th2)
        reply = reply_u + mac(keys.server, th2)
        conn.send(reply)
        confirm = conn.read_frame()
        assert tags_equal(mac(keys.client, H(init, reply, confirm[:5])), confirm[5:])
        derived["k"] = keys.identity
        after_confirm(conn, keys, H(init, reply, confirm, struct.pack(">IB", 33, 4)))
    return server(script), token, derived


def test_enrollment_against_a_scripted_server(server):
    def done(conn, keys, th4):
        conn.send(struct.pack(">IB", 33, 4) + mac(keys.done, th4))
    srv, token, derived = enrollment_server(server, done)
    c = tally.enroll(srv.addr, token, "dev-7")
    assert c.key == derived["k"] and c.id == "dev-7" and c.server == srv.addr


def test_eof_after_confirm_is_uncertain_and_not_retried(server):
    srv, token, derived = enrollment_server(server, lambda conn, keys, th4: None)
    with pytest.raises(tally.EnrollUncertain) as e:
        tally.enroll(srv.addr, token, "dev-8", retries=4)
    assert e.value.credential.key == derived["k"]
    time.sleep(0.3)
    assert srv.accepted == 1


def test_busy_after_confirm_is_not_retried(server):
    srv, token, _ = enrollment_server(
        server, lambda conn, keys, th4: conn.send(error_frame(ErrorCode.BUSY)))
    # Spec 6.4: after CONFIRM even an ERROR (it could be injected) leaves the enrollment
    # uncertain, not refused; and it is not retried.
    with pytest.raises(tally.EnrollUncertain):
        tally.enroll(srv.addr, token, "dev-9", retries=4)
    time.sleep(0.3)
    assert srv.accepted == 1


# --- Failures in a session (8.3) ----------------------------------------------------------

def test_a_bad_tag_is_answered_with_close_protocol_error(server):
    def script(conn, n):
        conn.handshake(KEY)
        fr = conn.recv()
        bad = bytearray(conn.st.response(fr.seq, 0, b"forged"))
        bad[-1] ^= 1
        conn.send(bytes(bad))
        return conn.recv()
    srv = server(script)
    s = tally.connect(cred(srv))
    with pytest.raises(tally.ProtocolError) as e:
        s.request(b"q")
    assert e.value.error == "bad_tag"
    srv.done.wait(5)
    close = srv.results[1]
    assert close.type == FrameType.CLOSE and close.code == CloseCode.PROTOCOL_ERROR
    assert isinstance(s.wait(5), tally.ProtocolError)


def test_a_lying_length_is_answered_with_close_frame_too_large(server):
    def script(conn, n):
        conn.handshake(KEY)
        conn.send(b"\x7f\xff\xff\xff")
        return conn.recv()
    srv = server(script)
    s = tally.connect(cred(srv))
    err = s.wait(5)
    assert isinstance(err, tally.ProtocolError) and err.error == "frame_too_large"
    srv.done.wait(5)
    assert srv.results[1].code == CloseCode.FRAME_TOO_LARGE


def test_error_after_finish_is_the_refusal_of_the_finish(server):
    def script(conn, n):
        conn.handshake(KEY)
        conn.send(error_frame(ErrorCode.AUTH_FAILED))
    srv = server(script)
    s = tally.connect(cred(srv))
    with pytest.raises(tally.AuthFailed) as e:
        s.request(b"q")
    assert e.value.code == ErrorCode.AUTH_FAILED


def test_error_after_a_session_frame_is_truncation(server):
    def script(conn, n):
        conn.handshake(KEY)
        conn.send(conn.st.message(b"hello"))
        conn.send(error_frame(ErrorCode.INTERNAL))
        return conn.read_frame()  # nothing: no CLOSE after an ERROR (8.3 step 2)
    srv = server(script)
    s = tally.connect(cred(srv))
    item = s.receive(5)
    assert isinstance(item, tally.IncomingMessage) and item.payload == b"hello"
    with pytest.raises(tally.Truncated):
        s.receive(5)
    srv.done.wait(5)
    assert srv.results[1] is None


def test_eof_without_close_fails_pending_requests_as_truncated(server):
    def script(conn, n):
        conn.handshake(KEY)
        conn.recv()  # the request, never answered
    srv = server(script)
    s = tally.connect(cred(srv))
    with pytest.raises(tally.Truncated):
        s.request(b"q")
    with pytest.raises(tally.Truncated):
        s.message(b"after")


# --- Keepalive (8.5) --------------------------------------------------------------------

def test_pings_are_answered_and_sent_when_idle(server):
    def script(conn, n):
        conn.handshake(KEY, keepalive_ms=200)
        seq, ping = conn.st.ping()
        conn.send(ping)
        got = []
        while True:
            fr = conn.recv()
            got.append(fr.type)
            if fr.type == FrameType.PING:
                conn.send(conn.st.pong(fr.seq))
            if fr.type == FrameType.CLOSE:
                conn.send(conn.st.close(0, ""))
                return got
    srv = server(script)
    s = tally.connect(cred(srv))
    assert s.server_keepalive == 0.2 and s.ping_interval == 0.1
    time.sleep(0.45)
    assert not s.closed
    s.close()
    srv.done.wait(5)
    got = srv.results[1]
    # Our PONG, then a PING every 0.1 s of silence (about 4 in 0.45 s), then CLOSE.
    assert got[0] == FrameType.PONG and got[-1] == FrameType.CLOSE
    assert set(got[1:-1]) == {FrameType.PING} and 2 <= len(got[1:-1]) <= 6, got


def test_a_client_that_only_sends_still_pings_a_live_server(server):
    """Spec 8.5: MESSAGEs bring nothing back; without a PING when nothing was received for
    an interval, the client would take a live server for gone after two intervals."""
    def script(conn, n):
        conn.handshake(KEY, keepalive_ms=200)
        pings = 0
        while True:
            fr = conn.recv()
            if fr is None:
                return pings
            if fr.type == FrameType.PING:
                pings += 1
                conn.send(conn.st.pong(fr.seq))
            if fr.type == FrameType.CLOSE:
                conn.send(conn.st.close(0, ""))
                return pings
    srv = server(script)
    s = tally.connect(cred(srv))
    assert s.ping_interval == 0.1
    end = time.monotonic() + 0.6
    while time.monotonic() < end:
        s.message(b"reading")
        time.sleep(0.02)
    assert not s.closed, s.wait(0)
    s.close()
    srv.done.wait(5)
    assert 2 <= srv.results[1] <= 9, srv.results[1]


def test_a_silent_server_is_given_up(server):
    def script(conn, n):
        conn.handshake(KEY, keepalive_ms=200)
        while True:
            fr = conn.recv()  # PINGs, never answered
            if fr is None or fr.type == FrameType.CLOSE:
                return fr
    srv = server(script)
    s = tally.connect(cred(srv))
    err = s.wait(3)
    assert isinstance(err, tally.Timeout), err
    srv.done.wait(5)
    assert srv.results[1].code == CloseCode.IDLE_TIMEOUT


# --- Closing (8.6) ---------------------------------------------------------------------

def test_the_servers_close_is_answered_and_fails_pending_requests(server):
    def script(conn, n):
        conn.handshake(KEY)
        conn.recv()  # a request, not answered
        conn.send(conn.st.close(CloseCode.SHUTDOWN, "maintenance"))
        return conn.recv()
    srv = server(script)
    s = tally.connect(cred(srv))
    with pytest.raises(tally.Closed) as e:
        s.request(b"q")
    assert e.value.code == CloseCode.SHUTDOWN and e.value.reason == "maintenance" and e.value.by_peer
    srv.done.wait(5)
    assert srv.results[1].type == FrameType.CLOSE and srv.results[1].code == CloseCode.NORMAL


def test_frames_after_our_close_are_checked_and_dropped(server):
    def script(conn, n):
        conn.handshake(KEY)
        fr = conn.recv()
        assert fr.type == FrameType.CLOSE
        conn.send(conn.st.request(b"too late")[1])
        conn.send(conn.st.close(0, ""))
        return conn.read_frame()  # EOF: the request is not answered
    srv = server(script)
    s = tally.connect(cred(srv))
    s.close()
    srv.done.wait(5)
    assert srv.results[1] is None
    assert isinstance(s.wait(1), tally.Closed)


def test_close_waits_only_briefly_for_a_server_that_does_not_answer(server, monkeypatch):
    monkeypatch.setattr(tally.client, "_LINGER", 0.3)
    release = threading.Event()

    def script(conn, n):
        conn.handshake(KEY)
        fr = conn.recv()
        release.wait(5)
        return fr
    srv = server(script)
    s = tally.connect(cred(srv))
    t0 = time.monotonic()
    s.close(CloseCode.NORMAL, "bye")
    assert time.monotonic() - t0 < 1.5
    release.set()
    srv.done.wait(5)
    assert srv.results[1].code == CloseCode.NORMAL and srv.results[1].reason == "bye"


def test_a_timed_out_request_leaves_the_session_usable(server):
    def script(conn, n):
        conn.handshake(KEY)
        first = conn.recv()
        second = conn.recv()
        conn.send(conn.st.response(first.seq, 0, b"late"))
        conn.send(conn.st.response(second.seq, Status.OK, b"second"))
        fr = conn.recv()
        conn.send(conn.st.close(0, ""))
        return fr
    srv = server(script)
    with tally.connect(cred(srv)) as s:
        with pytest.raises(tally.Timeout):
            s.request(b"first", timeout=0.1)
        assert s.request(b"second", timeout=5) == b"second"


def test_exhausted_sequence_numbers_end_with_close(server):
    def script(conn, n):
        conn.handshake(KEY)
        conn.st.last_received = 2**64 - 2   # the client's numbers are set forward below
        fr = conn.recv()
        conn.send(conn.st.close(0, ""))
        return fr
    srv = server(script)
    s = tally.connect(cred(srv))
    s._state.next_seq = 2**64 - 1  # as if 2^64 - 2 frames had been sent
    with pytest.raises(tally.Closed) as e:
        s.request(b"one too many")
    assert e.value.code == CloseCode.SEQUENCE_EXHAUSTED and not e.value.by_peer
    srv.done.wait(5)
    fr = srv.results[1]
    assert fr.type == FrameType.CLOSE
    assert (fr.seq, fr.code) == (2**64 - 1, CloseCode.SEQUENCE_EXHAUSTED)


# --- The encrypted mode (7.7), no downgrade (7.8), key update (8.7) ---------------------------

def test_the_default_is_the_encrypted_mode_and_the_id_is_sealed(server):
    def script(conn, n):
        r = echo_one_request_then_close(conn)
        return conn.first_frame, conn.ident, r
    srv = server(script)
    with tally.connect(cred(srv)) as s:
        assert s.encrypted
        assert s.request(b"secret payload") == b"secret payload"
    srv.done.wait(5)
    first, ident, _ = srv.results[1]
    assert first[4] == FrameType.SEALED_HELLO and len(first) == 123
    assert ident == b"dev-1" and b"dev-1" not in first


def test_the_authenticated_mode_on_request(server):
    def script(conn, n):
        conn.handshake(KEY, expect_encrypted=False)
        fr = conn.recv()
        conn.send(conn.st.response(fr.seq, 0, fr.payload))
        fr = conn.recv()
        conn.send(conn.st.close(0, ""))
        return conn.first_frame
    srv = server(script)
    # A credential without S runs the authenticated mode only (nothing to seal the id to).
    with tally.connect(tally.Credential("dev-1", KEY, srv.addr), encryption=False) as s:
        assert not s.encrypted
        assert s.request(b"clear") == b"clear"
    srv.done.wait(5)
    assert srv.results[1][4] == FrameType.HELLO


def test_the_encrypted_mode_needs_the_server_key():
    with pytest.raises(tally.FormatError, match="server-key"):
        tally.connect(tally.Credential("dev-1", KEY, "127.0.0.1:1"))


def test_server_auth_in_answer_to_sealed_hello_is_refused(server):
    """A downgrade: someone answers SEALED_HELLO with a SERVER_AUTH (7.2 client row 4,
    7.8). It is malformed; the client sends nothing more and does not retry."""
    def script(conn, n):
        first = conn.read_frame()
        assert first[4] == FrameType.SEALED_HELLO
        fake = before_tag(FrameType.SERVER_AUTH, os.urandom(32) + struct.pack(">II", 65536, 30000))
        conn.send(fake + os.urandom(32))
        return conn.read_frame()   # nothing: no CLIENT_FINISH, the client closes
    srv = server(script)
    with pytest.raises(tally.ProtocolError) as e:
        tally.connect(cred(srv), retries=4)
    assert e.value.error == "malformed"
    srv.done.wait(5)
    time.sleep(0.3)
    assert srv.accepted == 1 and srv.results[1] is None


def test_mode_refused_is_never_answered_with_hello(server):
    """7.8: ERROR MODE_REFUSED (unauthenticated: anyone can inject it) must not make the
    client retry with HELLO, nor retry at all."""
    firsts = []

    def script(conn, n):
        firsts.append(conn.read_frame())
        conn.send(error_frame(ErrorCode.MODE_REFUSED))
    srv = server(script)
    with pytest.raises(tally.Refused) as e:
        tally.connect(cred(srv), retries=4)
    assert e.value.code == ErrorCode.MODE_REFUSED and e.value.mode_refused
    assert e.value.error == "refused" and "MODE_REFUSED" in str(e.value)
    time.sleep(0.5)
    assert srv.accepted == 1
    assert [f[4] for f in firsts] == [FrameType.SEALED_HELLO]


def test_mode_refused_in_place_of_the_first_session_frame(server):
    """7.8: a server may refuse a mode per identity after CLIENT_FINISH verified; the ERROR
    comes in place of the first session frame (8.3 step 2.1): a refusal, no CLOSE."""
    def script(conn, n):
        conn.handshake(KEY)
        conn.send(error_frame(ErrorCode.MODE_REFUSED))
        return conn.read_frame()
    srv = server(script)
    s = tally.connect(cred(srv))
    with pytest.raises(tally.Refused) as e:
        s.request(b"q")
    assert e.value.code == ErrorCode.MODE_REFUSED
    srv.done.wait(5)
    time.sleep(0.2)
    assert srv.accepted == 1


def test_a_low_order_server_ephemeral_is_weak_key(server):
    def script(conn, n):
        first = conn.read_frame()
        hello, ident, _, dh_es = open_sealed_hello(first, SERVER_SECRET)
        # F = 0 (a low-order point): X25519(e, F) is all zero.
        auth_u = before_tag(FrameType.SEALED_AUTH, bytes(32) + struct.pack(">II", 65536, 30000))
        conn.send(auth_u + os.urandom(32))
        return conn.read_frame()
    srv = server(script)
    with pytest.raises(tally.ProtocolError) as e:
        tally.connect(cred(srv), retries=4)
    assert e.value.error == "weak_key"
    srv.done.wait(5)
    assert srv.accepted == 1 and srv.results[1] is None


def test_a_sealed_auth_for_another_server_key_fails(server):
    """The client pins S: a server whose static key is another one opens nothing, and
    answers as for an unknown id (7.5); its SEALED_AUTH does not verify."""
    def script(conn, n):
        first = conn.read_frame()
        other = os.urandom(32)
        hello, ident, _, dh_es = open_sealed_hello(first, other)
        assert ident is None  # sealed to another key: it does not open
        auth, _ = sealed_auth(first, hello.ephemeral, os.urandom(32), dh_es)
        conn.send(auth)
        return conn.read_frame()
    srv = server(script)
    with pytest.raises(tally.AuthFailed) as e:
        tally.connect(cred(srv))
    assert e.value.error == "bad_tag"


def _sealed_with(key, from_client, ty, seq, fields):
    from tally._primitives import aead_seal
    from tally.frames import session_header
    from tally.proto import session_nonce
    header = session_header(ty, seq, len(fields), 16)
    return header + aead_seal(key, session_nonce(from_client, seq), header, fields)


def test_a_frame_sealed_with_the_wrong_directions_nonce_is_refused(server):
    def script(conn, n):
        conn.handshake(KEY)
        fr = conn.recv()
        # The server's own key, but the client's direction (0) in the nonce: a reflection.
        bad = _sealed_with(conn.keys.s2c, True, FrameType.RESPONSE, 1,
                           struct.pack(">QH", fr.seq, 0) + b"x")
        conn.send(bad)
        return conn.recv()
    srv = server(script)
    s = tally.connect(cred(srv))
    with pytest.raises(tally.ProtocolError) as e:
        s.request(b"q")
    assert e.value.error == "bad_tag"
    srv.done.wait(5)
    close = srv.results[1]
    assert close.type == FrameType.CLOSE and close.code == CloseCode.PROTOCOL_ERROR


def test_a_frame_after_key_update_sealed_with_the_old_key_is_refused(server):
    def script(conn, n):
        conn.handshake(KEY)
        fr = conn.recv()
        old = conn.keys.s2c
        conn.send(conn.st.key_update())                      # seq 1, then the next key
        bad = _sealed_with(old, False, FrameType.RESPONSE, 2,  # the old key: refused
                           struct.pack(">QH", fr.seq, 0) + b"x")
        conn.send(bad)
        return conn.recv()
    srv = server(script)
    s = tally.connect(cred(srv))
    with pytest.raises(tally.ProtocolError) as e:
        s.request(b"q")
    assert e.value.error == "bad_tag"
    srv.done.wait(5)
    assert srv.results[1].code == CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("encryption", [True, False], ids=["encrypted", "authenticated"])
def test_the_servers_key_updates_are_followed_in_both_modes(server, encryption):
    def script(conn, n):
        conn.handshake(KEY, expect_encrypted=encryption)
        for _ in range(3):
            fr = conn.recv()
            conn.send(conn.st.key_update())
            conn.send(conn.st.response(fr.seq, 0, fr.payload))
        fr = conn.recv()
        conn.send(conn.st.close(0, ""))
        return conn.st.key_updates_sent
    srv = server(script)
    with tally.connect(cred(srv), encryption=encryption) as s:
        for p in (b"a", b"b", b"c"):
            assert s.request(p) == p
        assert s._state.key_updates_received == 3
        # 8.7: only the encrypted mode sends key updates by itself.
        assert s._state.auto_key_update == encryption
    srv.done.wait(5)
    assert srv.results[1] == 3


def test_the_client_updates_its_key_after_its_frame_budget(server):
    def script(conn, n):
        conn.handshake(KEY)
        types = []
        while True:
            fr = conn.recv()
            types.append(fr.type)
            if fr.type == FrameType.CLOSE:
                conn.send(conn.st.close(0, ""))
                return types
    srv = server(script)
    s = tally.connect(cred(srv))
    s._state.key_update_frames = 3     # 2^20 in the field (8.7)
    for n in range(7):
        s.message(b"m%d" % n)
    s.close()
    srv.done.wait(5)
    M, K, C = FrameType.MESSAGE, FrameType.KEY_UPDATE, FrameType.CLOSE
    # Each key seals 3 frames, then the KEY_UPDATE (sealed with it) before the next frame.
    assert srv.results[1] == [M, M, M, K, M, M, M, K, M, C]


def test_the_client_updates_its_key_after_its_time_budget(server):
    def script(conn, n):
        conn.handshake(KEY)
        types = []
        while True:
            fr = conn.recv()
            types.append(fr.type)
            if fr.type == FrameType.CLOSE:
                conn.send(conn.st.close(0, ""))
                return types
    srv = server(script)
    s = tally.connect(cred(srv))
    s._state.key_update_seconds = 0.2  # 10 minutes in the field (8.7)
    s.message(b"first")                # the key's first use starts its clock
    s.message(b"second")
    time.sleep(0.3)
    s.message(b"third")
    s.message(b"fourth")
    s.close()
    srv.done.wait(5)
    M, K, C = FrameType.MESSAGE, FrameType.KEY_UPDATE, FrameType.CLOSE
    assert srv.results[1] == [M, M, K, M, M, C]


def test_a_quiet_client_updates_its_key_on_the_timer(server):
    """8.7: KEY_UPDATE 10 minutes (0.3 s here) after the sending key sealed its first
    frame, at that moment and on its own: the client sends nothing else meanwhile. A key
    that has sealed nothing does not age: no second KEY_UPDATE until a frame is sealed
    with the new key."""
    got = queue.Queue()

    def script(conn, n):
        conn.handshake(KEY)
        while True:
            fr = conn.recv()
            if fr is None:
                return None
            got.put((time.monotonic(), fr.type))
            if fr.type == FrameType.CLOSE:
                conn.send(conn.st.close(0, ""))
                return conn.st.key_updates_received
    srv = server(script)
    s = tally.connect(cred(srv), keepalive=30.0)  # no PING in this test's time
    s._state.key_update_seconds = 0.3             # 10 minutes in the field
    assert s._state.key_update_deadline() is None  # nothing sealed yet: no timer
    start = time.monotonic()
    s.message(b"first")
    M, K, C = FrameType.MESSAGE, FrameType.KEY_UPDATE, FrameType.CLOSE
    assert got.get(timeout=5)[1] == M
    at, ty = got.get(timeout=5)
    assert ty == K and 0.25 <= at - start < 2.0, at - start
    # The new key sealed nothing: no timer, nothing more while the client is quiet.
    with pytest.raises(queue.Empty):
        got.get(timeout=0.8)
    assert s._state.key_update_deadline() is None
    # A frame starts the new key's timer; it fires 0.3 s after that frame.
    second = time.monotonic()
    s.message(b"second")
    assert got.get(timeout=5)[1] == M
    at, ty = got.get(timeout=5)
    assert ty == K and 0.25 <= at - second < 2.0, at - second
    s.close()
    assert got.get(timeout=5)[1] == C
    srv.done.wait(5)
    assert srv.results[1] == 2
    assert s._state.key_updates_sent == 2


def test_no_timed_key_update_in_the_authenticated_mode(server):
    """8.7's timer is the encrypted mode's (a MAY in the authenticated mode)."""
    got = queue.Queue()

    def script(conn, n):
        conn.handshake(KEY, expect_encrypted=False)
        while True:
            fr = conn.recv()
            if fr is None:
                return None
            got.put(fr.type)
            if fr.type == FrameType.CLOSE:
                conn.send(conn.st.close(0, ""))
                return conn.st.key_updates_received
    srv = server(script)
    s = tally.connect(cred(srv), keepalive=30.0, encryption=False)
    s._state.key_update_seconds = 0.1
    s.message(b"only")
    assert got.get(timeout=5) == FrameType.MESSAGE
    with pytest.raises(queue.Empty):
        got.get(timeout=0.5)
    s.close()
    srv.done.wait(5)
    assert srv.results[1] == 0


def test_the_cli_flag_chooses_the_authenticated_mode(server, tmp_path):
    from tally.__main__ import main

    def script(conn, n):
        r = echo_one_request_then_close(conn)
        return conn.first_frame[4]
    srv = server(script)
    path = tmp_path / "dev.cred"
    cred(srv).save(path)
    assert main(["request", "--cred", str(path), "--authenticated-only", "hi"]) == 0
    assert main(["request", "--cred", str(path), "hi"]) == 0
    srv.done.wait(5)
    time.sleep(0.2)
    assert [srv.results[1], srv.results[2]] == [FrameType.HELLO, FrameType.SEALED_HELLO]


def test_enrollment_keeps_the_server_key(server, tmp_path):
    def done(conn, keys, th4):
        conn.send(struct.pack(">IB", 33, 4) + mac(keys.done, th4))
    srv, token, derived = enrollment_server(server, done)
    c = tally.enroll(srv.addr, token, "dev-10")
    assert c.server_key == token.server_key
    c.save(tmp_path / "c.cred")
    assert f'server-key = "{token.server_key.hex()}"' in (tmp_path / "c.cred").read_text()
    assert tally.Credential.load(tmp_path / "c.cred") == c


@pytest.mark.parametrize("encryption", [True, False], ids=["encrypted", "authenticated"])
def test_update_key_on_demand(server, encryption):
    def script(conn, n):
        conn.handshake(KEY, expect_encrypted=encryption)
        types = []
        while True:
            fr = conn.recv()
            types.append(fr.type)
            if fr.type == FrameType.REQUEST:
                conn.send(conn.st.response(fr.seq, 0, fr.payload))
            if fr.type == FrameType.CLOSE:
                conn.send(conn.st.close(0, ""))
                return types, conn.st.key_updates_received
    srv = server(script)
    with tally.connect(cred(srv), encryption=encryption) as s:
        assert s.request(b"1") == b"1"
        s.update_key()
        assert s.request(b"2") == b"2"
    srv.done.wait(5)
    types, received = srv.results[1]
    assert types == [FrameType.REQUEST, FrameType.KEY_UPDATE, FrameType.REQUEST, FrameType.CLOSE]
    assert received == 1
