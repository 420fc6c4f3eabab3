"""Tally over TCP: :func:`enroll`, :func:`connect` and the :class:`Session`.

Threading model
---------------
:func:`connect` returns a :class:`Session` that owns one background thread, the
*reader*. The reader is the only code that reads the socket: it checks every frame
(spec 8.3), hands RESPONSEs to the threads waiting in :meth:`Session.request`, answers
the server's PINGs with PONGs, sends a PING whenever this side has sent nothing for the
keepalive interval (spec 8.5), sends KEY_UPDATE when the sending key's timer fires in the
encrypted mode (spec 8.7), and queues the server's REQUESTs and MESSAGEs. It never
runs application code. The application takes what the server sends with
:meth:`Session.receive` or :meth:`Session.serve`, in a thread of its own choosing.

All public methods of a session are thread-safe: several threads may have requests in
flight at once (responses may come back in any order, spec 8.4).
"""
import logging
import queue
import random
import select
import socket
import threading
import time
from typing import Callable, NamedTuple, Optional, Union

from .codes import DELIVER_REQUEST, CloseCode, ErrorCode, FrameType, Status
from .errors import (AuthFailed, Closed, EnrollUncertain, FormatError, ProtocolError, Refused,
                     SequenceExhausted, StatusError, TallyError, Timeout, Truncated, Unreachable)
from .formats import Credential, EnrollmentToken, format_server_address, parse_server_address
from .frames import DEFAULT_FRAME_LIMIT, HANDSHAKE_LIMIT, MAX_SEQ, FrameDecoder, check_length
from .proto import ClientEnrollment, ClientHandshake, ClientSealedHandshake, SessionState

__all__ = ["enroll", "connect", "Session", "Response", "IncomingRequest", "IncomingMessage",
           "DEFAULT_TIMEOUT", "DEFAULT_RETRIES"]

log = logging.getLogger("tally")
log.addHandler(logging.NullHandler())

#: Seconds allowed for each answer of the server during an enrollment or a handshake.
#: The spec (13.10) requires at least 10 s: a refusal may come up to 7.5 s late.
DEFAULT_TIMEOUT = 10.0
#: Retries after ERROR ``BUSY`` or a connection that ends before the server's first frame.
DEFAULT_RETRIES = 4

_RECV_CHUNK = 65536
_LINGER = 2.0  # seconds to wait for the peer's CLOSE after ours (8.6: "a short timeout")

Payload = Union[bytes, bytearray, memoryview, str]


def _as_bytes(payload: Payload) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    raise TypeError(f"a payload is bytes or str, not {type(payload).__name__}")


# --- Connecting, retrying, blocking reads before the session ----------------------------------

class _Retry(Exception):
    """Wraps a failure that spec 13.10 says to retry later (BUSY, or an early end)."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _backoff(attempt: int) -> float:
    """Spec 13.10 / the reference client: d = 0.2 s doubling to at most 5 s; wait U(d/2, d)."""
    d = min(0.2 * (2 ** attempt), 5.0)
    return random.uniform(d / 2, d)


def _with_retries(attempt: Callable, retries: int, what: str):
    n = 0
    while True:
        try:
            return attempt()
        except _Retry as r:
            if n >= retries:
                raise r.error from None
            delay = _backoff(n)
            log.warning("tally: %s: %s; retrying in %.2f s (%d of %d)", what, r.error, delay,
                        n + 1, retries)
            time.sleep(delay)
            n += 1


def _open(address: str, timeout: float) -> socket.socket:
    host, port = parse_server_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise Timeout(f"connecting to {address}: no answer within {timeout} s") from None
    except (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError) as e:
        raise _Retry(Unreachable(f"connecting to {address}: {e.strerror or e}")) from None
    except OSError as e:
        raise Unreachable(f"connecting to {address}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    return sock


class _EOF(Exception):
    def __init__(self, got_bytes: bool):
        super().__init__("the connection ended")
        self.got_bytes = got_bytes


def _recv_exact(sock: socket.socket, n: int, deadline: float, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout(f"{what}: no answer from the server in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except socket.timeout:
            raise Timeout(f"{what}: no answer from the server in time") from None
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            chunk = b""
        if not chunk:
            raise _EOF(bool(buf))
        buf += chunk
    return bytes(buf)


def _read_handshake_frame(sock: socket.socket, timeout: float, what: str) -> bytes:
    """One whole frame under the pre-session limit of 256 (3.2), the prefix checked first."""
    deadline = time.monotonic() + timeout
    prefix = _recv_exact(sock, 4, deadline, what)
    length = int.from_bytes(prefix, "big")
    check_length(length, HANDSHAKE_LIMIT)
    try:
        return prefix + _recv_exact(sock, length, deadline, what)
    except _EOF:
        raise _EOF(True) from None


def _read_first_frame(sock: socket.socket, timeout: float, what: str) -> bytes:
    """The server's first frame; an end before it is retryable (13.10), so is ERROR BUSY."""
    try:
        f = _read_handshake_frame(sock, timeout, what)
    except _EOF:
        raise _Retry(Truncated(f"{what}: the connection ended before the server's first frame")) from None
    if len(f) == 8 and f[4] == FrameType.ERROR and int.from_bytes(f[5:7], "big") == ErrorCode.BUSY:
        raise _Retry(Refused(ErrorCode.BUSY, f[7], what))
    return f


def _sendall(sock: socket.socket, data: bytes, timeout: float, what: str) -> None:
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
    except socket.timeout:
        raise Timeout(f"{what}: the server does not read") from None
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
        raise Truncated(f"{what}: the connection ended ({e.strerror or e})") from None


# --- Enrollment (6) ---------------------------------------------------------------------------

def enroll(server: Union[str, tuple], token: Union[str, bytes, EnrollmentToken], id: str, *,
           timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES) -> Credential:
    """Enroll identity ``id`` at ``server`` (``"host:port"``) with an enrollment ``token``
    (the text of spec 9.1, or an :class:`EnrollmentToken`); return its :class:`Credential`.

    The server must prove it holds the static key pinned in the token, or
    :class:`AuthFailed` is raised. ``timeout`` bounds the wait for each server frame (keep
    it at 10 s or more: a refusal may come 7.5 s late). ERROR ``BUSY`` and connections that
    end before the server's first frame are retried ``retries`` times with jittered
    exponential backoff; nothing is retried once ENROLL_CONFIRM was sent. If anything fails
    after it (a break, a timeout, a bad ENROLL_DONE), :class:`EnrollUncertain` carries the
    unconfirmed credential (spec 6.4).
    Refusals raise :class:`Refused` (``e.code``: ``ErrorCode.ENROLL_REFUSED`` for a wrong
    or used token, ``ID_TAKEN`` for an enrolled id, ...).

    The credential is not written anywhere: call :meth:`Credential.save`.
    """
    tok = token if isinstance(token, EnrollmentToken) else EnrollmentToken.parse(token)
    if isinstance(id, (bytes, bytearray)):
        id = bytes(id).decode("ascii", "replace")
    address = format_server_address(server)
    what = f"enrolling {id} at {address}"

    def attempt() -> Credential:
        enr = ClientEnrollment(tok, id)
        sock = _open(address, timeout)
        try:
            _sendall(sock, enr.init_frame, timeout, what)
            confirm = enr.handle_reply(_read_first_frame(sock, timeout, what))
            unconfirmed = Credential(id, enr.keys.identity, address, tok.server_key)
            uncertain = (f"{what}: ENROLL_CONFIRM was sent but no valid ENROLL_DONE came back; "
                         "the server may have stored the identity (try a session with "
                         "e.credential; else `tallyd remove` the id and enroll again)")
            # Spec 6.4: any failure after CONFIRM (a bad, malformed or injected ENROLL_DONE
            # too) leaves the enrollment uncertain, never refused.
            try:
                _sendall(sock, confirm, timeout, what)
                done = _read_handshake_frame(sock, timeout, what)
                enr.handle_done(done)
            except (_EOF, OSError, TallyError):
                raise EnrollUncertain(uncertain, unconfirmed) from None
            return unconfirmed
        finally:
            sock.close()

    return _with_retries(attempt, retries, what)


# --- Session (7, 8) ------------------------------------------------------------------------

class Response(NamedTuple):
    """A RESPONSE: its ``status`` (:class:`tally.Status`, or an application code >= 256)
    and ``payload``."""

    status: int
    payload: bytes

    @property
    def ok(self) -> bool:
        return self.status == Status.OK


class IncomingRequest:
    """A REQUEST from the server. Answer it exactly once with :meth:`respond`."""

    __slots__ = ("_session", "seq", "payload")

    def __init__(self, session: "Session", seq: int, payload: bytes):
        self._session = session
        self.seq = seq
        self.payload = payload

    def respond(self, payload: Payload = b"", status: int = Status.OK) -> None:
        """Send the one RESPONSE to this request. A payload too large for the server's frame
        limit is replaced by status BACKEND_ERROR and a short payload (spec 8.4). Raises
        ``ValueError`` if already answered, or the session's end error if it ended."""
        self._session._respond(self.seq, status, _as_bytes(payload))

    def __repr__(self) -> str:
        return f"IncomingRequest(seq={self.seq}, payload={self.payload!r})"


class IncomingMessage:
    """A one-way MESSAGE from the server."""

    __slots__ = ("seq", "payload")

    def __init__(self, seq: int, payload: bytes):
        self.seq = seq
        self.payload = payload

    def __repr__(self) -> str:
        return f"IncomingMessage(seq={self.seq}, payload={self.payload!r})"


class IncomingDelivery:
    """A message or request the server queued for this device while it was away (spec
    8.8). Handle it, then :meth:`ack` it once; until then it stays queued, and comes again
    (same ``msg_id``) in the next session if this one ends first. ``is_request``: the
    acknowledgement carries the answer. To handle each message once, record the highest
    ``msg_id`` handled (durably) and ack, without handling again, one at or below it."""

    __slots__ = ("_session", "msg_id", "kind", "payload")

    def __init__(self, session: "Session", msg_id: int, kind: int, payload: bytes):
        self._session = session
        self.msg_id = msg_id
        self.kind = kind
        self.payload = payload

    @property
    def is_request(self) -> bool:
        return self.kind == DELIVER_REQUEST

    def ack(self, payload: Payload = b"", status: int = Status.OK) -> None:
        """Send the one ACK of this delivery (for a queued request, with the answer).
        Raises ``ValueError`` if already acknowledged, or the session's end error."""
        self._session._ack(self.msg_id, status, _as_bytes(payload))

    def __repr__(self) -> str:
        kind = "request" if self.is_request else "message"
        return f"IncomingDelivery(msg_id={self.msg_id}, {kind}, payload={self.payload!r})"


class _Waiter:
    __slots__ = ("event", "response", "error")

    def __init__(self):
        self.event = threading.Event()
        self.response: Optional[Response] = None
        self.error: Optional[BaseException] = None


_END = object()
_DEFAULT = object()


def connect(credential: Union[Credential, str], *, server: Optional[str] = None,
            max_frame_len: int = DEFAULT_FRAME_LIMIT, timeout: float = DEFAULT_TIMEOUT,
            keepalive: Optional[float] = None, request_timeout: Optional[float] = 60.0,
            retries: int = DEFAULT_RETRIES, encryption: bool = True) -> "Session":
    """Run the handshake (spec 7) and return an established :class:`Session`.

    ``encryption`` chooses the mode (spec 7.7, 7.8): ``True`` (the default) runs the
    encrypted mode (SEALED_HELLO: the id sealed to the credential's server key, frames
    sealed with ChaCha20-Poly1305, forward secrecy); ``False`` runs the authenticated mode
    (HELLO: everything in the clear, each frame with an HMAC tag). The session never
    switches modes on its own: a server whose policy refuses the mode answers ERROR
    ``MODE_REFUSED``, raised as :class:`Refused` (``e.mode_refused``), and nothing is
    retried in the other mode (7.8, 13.12).

    ``credential`` is a :class:`Credential` or the path of a credential file; ``server``
    overrides its address. ``max_frame_len`` is the largest session frame this side accepts
    (256 to 16,777,216), announced to the server. ``timeout`` bounds the wait for
    SERVER_AUTH (keep it at 10 s or more) and each send. ``keepalive`` is the PING interval
    in seconds (default: half the server's announced interval; never more than it).
    ``request_timeout`` is the default wait of :meth:`Session.request` (``None``: until the
    answer or the end of the session).

    Raises :class:`AuthFailed` if SERVER_AUTH does not verify (unknown or revoked id, wrong
    key, wrong server), :class:`Refused` for an ERROR. ERROR ``BUSY`` and connections that
    end before SERVER_AUTH are retried ``retries`` times with jittered exponential backoff.
    The server checks CLIENT_FINISH after this returns: if it refuses it (a revocation in
    between, ``TAKEOVER_REFUSED``), the first operation on the session raises that refusal.
    """
    cred = credential if isinstance(credential, Credential) else Credential.load(credential)
    address = server or cred.server
    if encryption and cred.server_key is None:
        raise FormatError(f"{cred.id}: the encrypted mode needs the server's key S (the "
                          "credential's server-key, from the enrollment token); this "
                          "credential has none (connect with encryption=False only if the "
                          "authenticated mode is what you want)")
    mode = "encrypted" if encryption else "authenticated"
    what = f"session with {address} as {cred.id} ({mode} mode)"

    def attempt() -> Session:
        if encryption:
            hs = ClientSealedHandshake(cred.id, cred.key, cred.server_key, max_frame_len)
        else:
            hs = ClientHandshake(cred.id, cred.key, max_frame_len)
        sock = _open(address, timeout)
        try:
            _sendall(sock, hs.hello, timeout, what)
            finish = hs.handle_server_auth(_read_first_frame(sock, timeout, what))
            _sendall(sock, finish, timeout, what)
        except BaseException:
            sock.close()
            raise
        return Session(sock, hs, cred, address, keepalive=keepalive, timeout=timeout,
                       request_timeout=request_timeout)

    return _with_retries(attempt, retries, what)


class Session:
    """An established session (spec 8). Create it with :func:`connect`.

    * :meth:`request` / :meth:`request_status`: send a REQUEST, wait for its RESPONSE;
    * :meth:`message`: a one-way MESSAGE;
    * :meth:`receive` / :meth:`serve`: what the server sends (REQUESTs to answer, MESSAGEs);
    * :meth:`close`: an orderly end (CLOSE, then the server's CLOSE); also on leaving a
      ``with`` block;
    * :meth:`wait`: block until the session ends, and learn why.

    When the session ends every operation raises the reason: :class:`Closed` (a CLOSE:
    ``code`` is e.g. ``CloseCode.REVOKED`` or ``TAKEN_OVER``; ``by_peer`` False after
    :meth:`close`), :class:`Truncated` (EOF or reset without CLOSE, or an injected ERROR),
    :class:`ProtocolError` (a frame failed spec 8.3; the server was sent CLOSE
    ``PROTOCOL_ERROR``), :class:`Timeout` (the server went silent), or the server's
    refusal of CLIENT_FINISH (:class:`AuthFailed`, :class:`Refused`).

    Attributes: ``id``, ``server``, ``encrypted`` (the mode), ``frame_overhead`` (41 or 25
    bytes of a frame's ``length`` besides its fields, spec 4.5), ``max_frame_len`` (ours),
    ``server_max_frame_len`` and ``server_keepalive`` (seconds) as the server announced
    them, ``ping_interval``. In the encrypted mode the session updates its sending key
    (KEY_UPDATE, spec 8.7) before the frame after 2^20 frames, and on its own 10 minutes
    after the key sealed its first frame (the reader thread's timer, as the keepalive's);
    it follows the server's key updates in either mode.
    """

    def __init__(self, sock: socket.socket, hs: ClientHandshake, credential: Credential,
                 address: str, *, keepalive: Optional[float], timeout: float,
                 request_timeout: Optional[float]):
        self.id = credential.id
        self.server = address
        self.encrypted = hs.encrypted
        self.max_frame_len = hs.max_frame_len
        self.server_max_frame_len = hs.server_max_frame_len
        #: Bytes of a frame's `length` besides its fields: 41 (authenticated), 25 (encrypted).
        self.frame_overhead = hs.session.overhead
        self.server_keepalive = hs.keepalive_ms / 1000.0
        interval = self.server_keepalive / 2 if keepalive is None else keepalive
        self.ping_interval = max(0.05, min(interval, self.server_keepalive))
        self.timeout = timeout
        self.request_timeout = request_timeout
        self._sock = sock
        sock.settimeout(None)
        sock.setblocking(False)
        self._state: SessionState = hs.session
        self._decoder = FrameDecoder(self._state.recv_limit)
        self._send_lock = threading.RLock()    # wire order: numbering and sending together
        self._state_lock = threading.Lock()    # SessionState and the waiters, briefly
        self._end_lock = threading.Lock()
        self._pending = {}                     # our REQUEST seq -> _Waiter
        self._incoming: "queue.Queue" = queue.Queue()
        self._error: Optional[BaseException] = None   # why the session ended
        self._closing = False                  # we sent CLOSE first: linger for the answer
        self._linger_deadline = 0.0
        self._ended = threading.Event()        # the reader finished and the socket is closed
        now = time.monotonic()
        self._last_send = now
        self._last_recv = now
        self._last_ping = now                  # one PING per interval while nothing comes back
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=f"tally-session-{self.id}",
                                        daemon=True)
        self._thread.start()

    # --- Public API -------------------------------------------------------------------

    def request(self, payload: Payload, timeout=_DEFAULT) -> bytes:
        """Send a REQUEST and return the payload of its RESPONSE if the status is OK;
        otherwise raise :class:`StatusError` (``e.status``, ``e.payload``).

        ``timeout`` (seconds, ``None`` for no limit) defaults to the session's
        ``request_timeout``; on :class:`Timeout` the session goes on and a late answer is
        dropped. A payload too large for the server's limit raises
        :class:`PayloadTooLarge` (the session goes on).
        """
        r = self.request_status(payload, timeout)
        if r.status != Status.OK:
            raise StatusError(r.status, r.payload)
        return r.payload

    def request_status(self, payload: Payload, timeout=_DEFAULT) -> Response:
        """Like :meth:`request`, but return the :class:`Response` whatever its status."""
        data = _as_bytes(payload)
        waiter = _Waiter()

        def build(st: SessionState) -> bytes:
            seq, f = st.request(data)
            self._pending[seq] = waiter
            return f

        self._send(build)
        wait = self.request_timeout if timeout is _DEFAULT else timeout
        if not waiter.event.wait(wait):
            raise Timeout(f"no RESPONSE within {wait} s")
        if waiter.error is not None:
            raise waiter.error
        return waiter.response

    def message(self, payload: Payload) -> None:
        """Send a one-way MESSAGE (no answer comes)."""
        data = _as_bytes(payload)
        self._send(lambda st: st.message(data))

    def update_key(self) -> None:
        """Send KEY_UPDATE now and seal every later frame with the next key (spec 8.7).
        The encrypted mode does this by itself every 10 minutes or 2^20 frames; this is
        for doing it more often (MAY), in either mode. Nothing is sent once the next
        sequence number is 2^64 - 2 or more (8.7: no KEY_UPDATE there)."""
        self._send(lambda st: st.key_update() if st.next_seq < MAX_SEQ - 1 else b"")

    def receive(self, timeout: Optional[float] = None):
        """The next thing the server sent: an :class:`IncomingRequest` (answer it with
        ``respond``), an :class:`IncomingMessage`, or an :class:`IncomingDelivery` (a
        queued one: ``ack`` it once handled). Raises :class:`Timeout` if nothing came
        within ``timeout`` seconds, and the session's end error once it ended and
        everything received before was taken."""
        try:
            item = self._incoming.get(timeout=timeout)
        except queue.Empty:
            raise Timeout(f"nothing from the server within {timeout} s") from None
        if item is _END:
            self._incoming.put(_END)
            raise self._error
        return item

    def serve(self, handler: Optional[Callable] = None,
              on_message: Optional[Callable[[bytes], None]] = None) -> None:
        """Answer the server's requests and take its messages until the session ends.

        ``handler(payload: bytes)`` returns the answer: ``bytes``/``str`` (status OK),
        ``None`` (OK, empty), or a ``(status, payload)`` tuple. If it raises, the request is
        answered with status BACKEND_ERROR and serving goes on. Without a handler requests
        are answered UNAVAILABLE. ``on_message(payload)`` gets each MESSAGE.

        Returns when the session was closed from this side (:meth:`close`, possibly from
        another thread or from the handler); raises the end error otherwise (e.g.
        :class:`Closed` with ``code == CloseCode.REVOKED``, :class:`Truncated`).
        """
        while True:
            try:
                item = self.receive()
                if isinstance(item, IncomingDelivery):
                    self._serve_delivery(item, handler, on_message)
                    continue
                if isinstance(item, IncomingMessage):
                    if on_message is not None:
                        on_message(item.payload)
                    continue
                status, answer = _handled(handler, item.payload)
                item.respond(answer, status)
            except Closed as e:
                if not e.by_peer:
                    return
                raise

    @staticmethod
    def _serve_delivery(item: "IncomingDelivery", handler, on_message) -> None:
        """A queued message goes to ``on_message``, a queued request to ``handler``, like
        live ones; then it is acknowledged (a request with the handler's answer)."""
        if not item.is_request:
            if on_message is not None:
                on_message(item.payload)
            item.ack()
            return
        status, answer = _handled(handler, item.payload)
        item.ack(answer, status)

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session: send CLOSE, wait briefly (2 s) for the server's CLOSE, close the
        connection. Requests still waiting fail with :class:`Closed` (``by_peer`` False).
        Idempotent; does nothing more if the session already ended."""
        with self._end_lock:
            first = self._error is None
            if first:
                self._error = Closed(code, reason, by_peer=False)
                self._closing = True
                self._linger_deadline = time.monotonic() + _LINGER
        if first:
            self._abort_waiters(self._error)
            try:
                with self._send_lock:
                    self._send_raw(self._state_close(code, reason), time.monotonic() + _LINGER)
            except (TallyError, OSError, RuntimeError):
                self._linger_deadline = 0.0
            self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(_LINGER + 1.0)
            if self._thread.is_alive():
                self._shutdown()
                self._thread.join()

    def wait(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Block until the session ended (or ``timeout``); return why it ended (the error
        every operation now raises), or ``None`` if it is still running."""
        self._ended.wait(timeout)
        return self._error if self._ended.is_set() else None

    @property
    def closed(self) -> bool:
        """True once the session ended (either side, any reason)."""
        return self._error is not None

    @property
    def error(self) -> Optional[BaseException]:
        """Why the session ended, or ``None`` while it runs."""
        return self._error

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "open" if self._error is None else f"ended: {self._error}"
        return f"<tally.Session {self.id} at {self.server}, {state}>"

    # --- Sending ----------------------------------------------------------------------

    def _state_close(self, code: int, reason: str) -> bytes:
        with self._state_lock:
            return self._state.close(code, reason)

    def _send(self, build: Callable[[SessionState], bytes]) -> None:
        with self._send_lock:
            with self._state_lock:
                if self._error is not None:
                    raise self._error
                timer_was = self._state.key_update_deadline()
                try:
                    f = build(self._state)
                except SequenceExhausted:
                    f = None
                # A key that sealed its first frame starts its timer (8.7): the reader,
                # asleep until its keepalive deadline, must learn the earlier one.
                rearm = timer_was is None and self._state.key_update_deadline() is not None
            if rearm:
                self._wake()
            if f == b"":
                return  # nothing to send after all (a timer that another frame beat)
            if f is not None:
                try:
                    self._send_raw(f, time.monotonic() + self.timeout)
                except Timeout:
                    self._fail(Timeout(f"the server read nothing for {self.timeout} s"), None)
                    raise self._error from None
                except OSError as e:
                    self._fail(Truncated(f"the connection ended ({e.strerror or e})"), None)
                    raise self._error from None
                return
        # Only CLOSE may use the last sequence number (8.1). Outside the send lock: close()
        # waits for the reader, which takes that lock to close the socket.
        self.close(CloseCode.SEQUENCE_EXHAUSTED, "sequence numbers exhausted")
        raise self._error

    def _send_raw(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self._sock.send(view)
            except (BlockingIOError, InterruptedError):
                n = 0
            if n:
                view = view[n:]
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout("the server is not reading")
            select.select([], [self._sock], [], remaining)
        self._last_send = time.monotonic()

    def _respond(self, seq: int, status: int, payload: bytes) -> None:
        self._send(lambda st: st.response(seq, status, payload))

    def _ack(self, msg_id: int, status: int, payload: bytes) -> None:
        self._send(lambda st: st.ack(msg_id, status, payload))

    # --- Ending -----------------------------------------------------------------------

    def _abort_waiters(self, err: BaseException) -> None:
        with self._state_lock:
            waiters = list(self._pending.values())
            self._pending.clear()
        for w in waiters:
            w.error = err
            w.event.set()
        self._incoming.put(_END)

    def _fail(self, err: BaseException, close_code: Optional[int]) -> None:
        """End the session because of ``err``; send CLOSE ``close_code`` unless None."""
        with self._end_lock:
            if self._error is not None:
                return
            self._error = err
        if close_code is not None:
            try:
                with self._send_lock:
                    reason = getattr(err, "error", None) or ""
                    self._send_raw(self._state_close(close_code, reason), time.monotonic() + 1.0)
            except (TallyError, OSError, RuntimeError):
                pass
        self._abort_waiters(err)
        if threading.current_thread() is not self._thread:
            self._shutdown()

    def _shutdown(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    # --- The reader thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug here must not leave callers waiting forever
            log.exception("tally: session reader failed")
            self._fail(Truncated(f"internal error in the session reader: {e!r}"), None)
        finally:
            with self._send_lock:
                self._sock.close()
            self._wake_r.close()
            self._wake_w.close()
            self._ended.set()

    def _loop(self) -> None:
        while True:
            now = time.monotonic()
            if self._error is not None and not self._closing:
                return  # ended by another thread (a send failed)
            if self._closing:
                if now >= self._linger_deadline:
                    return
                wait = self._linger_deadline - now
            else:
                idle_deadline = self._last_recv + 2 * self.ping_interval
                if now >= idle_deadline:
                    self._fail(Timeout(f"nothing from the server for "
                                       f"{2 * self.ping_interval:.1f} s: it is gone"),
                               CloseCode.IDLE_TIMEOUT)
                    return
                # Spec 8.5: a PING after an interval without sending (the server's idle
                # deadline), or without receiving and without a PING (a session that only
                # sends MESSAGEs gets nothing back otherwise, and would take a live server
                # for gone).
                ping_due = min(self._last_send,
                               max(self._last_recv, self._last_ping)) + self.ping_interval
                if now >= ping_due:
                    self._last_ping = now
                    try:
                        self._send(lambda st: st.ping()[1])
                    except TallyError:
                        return
                    continue
                # Spec 8.7 (encrypted mode): KEY_UPDATE 10 minutes after the sending key
                # sealed its first frame, at that moment, even with nothing else to send.
                # The state checks again under its lock: a frame sent meanwhile may have
                # updated the key already (then nothing is sent).
                key_due = self._key_update_deadline()
                if key_due is not None and now >= key_due:
                    sent = []

                    def timed(st: SessionState) -> bytes:
                        f = st.timed_key_update()
                        sent.append(f is not None)
                        return f or b""
                    try:
                        self._send(timed)
                    except TallyError:
                        return
                    if sent and sent[0]:
                        continue
                    key_due = None  # not due on the state's own clock yet
                wait = min(ping_due, idle_deadline,
                           key_due if key_due is not None else idle_deadline) - now
            try:
                readable, _, _ = select.select([self._sock, self._wake_r], [], [], wait)
            except (OSError, ValueError):
                readable = [self._sock]
            if self._wake_r in readable:
                try:
                    self._wake_r.recv(512)
                except OSError:
                    pass
            if self._sock not in readable:
                continue
            try:
                data = self._sock.recv(_RECV_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                data = None
                cause = e.strerror or str(e)
            else:
                cause = "EOF"
            if not data:
                if self._error is None:
                    self._fail(Truncated(f"the connection ended without CLOSE ({cause}): the "
                                         "session is truncated"), None)
                return
            self._last_recv = time.monotonic()
            try:
                for f in self._decoder.feed(data):
                    if self._handle(f):
                        return
            except ProtocolError as e:
                self._fail(e, e.close_code)
                return
            except (Refused, AuthFailed, Truncated) as e:  # an ERROR frame: no CLOSE (8.3)
                self._fail(e, None)
                return

    def _key_update_deadline(self) -> Optional[float]:
        """When the sending key's timer fires (8.7), on ``time.monotonic`` (the state's
        clock); None when none runs (authenticated mode, a key that sealed nothing)."""
        with self._state_lock:
            return self._state.key_update_deadline()

    def _handle(self, f: bytes) -> bool:
        """One whole frame; True when the session is over."""
        with self._state_lock:
            fr = self._state.receive(f)
            waiter = self._pending.pop(fr.req_seq, None) if fr.type == FrameType.RESPONSE else None
        ending = self._error is not None  # we sent CLOSE: check, then drop (8.6)
        ty = fr.type
        if ty == FrameType.CLOSE:
            if not ending:
                self._fail(Closed(fr.code, fr.reason, by_peer=True), CloseCode.NORMAL)
            return True
        if ending:
            return False
        if ty == FrameType.RESPONSE:
            if waiter is not None:
                waiter.response = Response(fr.status, fr.payload)
                waiter.event.set()
        elif ty == FrameType.REQUEST:
            self._incoming.put(IncomingRequest(self, fr.seq, fr.payload))
        elif ty == FrameType.MESSAGE:
            self._incoming.put(IncomingMessage(fr.seq, fr.payload))
        elif ty == FrameType.DELIVER:
            self._incoming.put(IncomingDelivery(self, fr.msg_id, fr.kind, fr.payload))
        elif ty == FrameType.PING:
            try:
                self._send(lambda st: st.pong(fr.seq))
            except TallyError:
                return True
        return False


def _handled(handler, payload: bytes):
    """``(status, answer)`` of a server request (live or queued) by ``handler``: none
    answers UNAVAILABLE; one that raises answers BACKEND_ERROR, and serving goes on."""
    if handler is None:
        return Status.UNAVAILABLE, b"this device serves no requests"
    try:
        return _answer_of(handler(payload))
    except Exception as e:  # the handler failed: answer, and go on (8.4)
        log.exception("tally: request handler failed")
        return Status.BACKEND_ERROR, f"handler failed: {type(e).__name__}".encode()


def _answer_of(result):
    if result is None:
        return Status.OK, b""
    if isinstance(result, Response):
        return result.status, result.payload
    if isinstance(result, tuple) and len(result) == 2:
        return int(result[0]), _as_bytes(result[1])
    return Status.OK, _as_bytes(result)
