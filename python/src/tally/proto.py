"""The protocol's state machines without any I/O (spec sections 5 to 8).

These classes take and return frames as bytes; :mod:`tally.client` moves them over TCP.
Every random value can be passed in, so that the test vectors of spec section 12 can be
reproduced byte for byte.
"""
import struct
import time
from typing import Callable, NamedTuple, Optional, Set, Tuple

from ._primitives import (AEAD_TAG_LEN, H, aead_open, aead_seal, hkdf, mac, random_bytes,
                          tags_equal, x25519, x25519_base)
from .codes import CloseCode, ErrorCode, FrameType, Status
from .errors import (AuthFailed, PayloadTooLarge, ProtocolError, Refused, SequenceExhausted,
                     Truncated)
from .formats import EnrollmentToken
from .frames import (MAX_FRAME_LIMIT, MAX_SEQ, MIN_FRAME_LIMIT, TAG_LEN, SessionFrame, check_id,
                     check_length, enroll_init_unsigned, hello_frame, is_session_type,
                     parse_error, parse_sealed_auth, parse_server_auth, parse_session_fields,
                     sealed_hello_head, sealed_plaintext, session_header)

__all__ = ["LABELS", "EnrollKeys", "SessionKeys", "enroll_keys", "session_keys",
           "sealed_id_key", "sealed_session_keys", "next_key", "session_nonce",
           "enroll_init_tag", "ClientEnrollment", "ClientHandshake", "ClientSealedHandshake",
           "SessionState", "refusal_from_error", "KEY_UPDATE_FRAMES", "KEY_UPDATE_SECONDS"]

#: Spec 8.7: a side in the encrypted mode MUST update its sending key right before its next
#: frame once the key sealed this many frames, and on a timer KEY_UPDATE_SECONDS after the
#: key sealed its first frame (on its own, with nothing else to send).
KEY_UPDATE_FRAMES = 2**20
KEY_UPDATE_SECONDS = 600.0

LABELS = {
    "enroll init": b"tally/1 enroll init",
    "enroll key server": b"tally/1 enroll key server",
    "enroll key client": b"tally/1 enroll key client",
    "enroll key done": b"tally/1 enroll key done",
    "enroll key identity": b"tally/1 enroll key identity",
    "session key c2s": b"tally/1 session key c2s",
    "session key s2c": b"tally/1 session key s2c",
    "session key server finish": b"tally/1 session key server finish",
    "session key client finish": b"tally/1 session key client finish",
    "sealed hello id": b"tally/1 sealed hello id",
    "sealed key c2s": b"tally/1 sealed key c2s",
    "sealed key s2c": b"tally/1 sealed key s2c",
    "sealed key server finish": b"tally/1 sealed key server finish",
    "sealed key client finish": b"tally/1 sealed key client finish",
    "key update": b"tally/1 key update",
}


# --- Key schedule (5.4, 5.5) -----------------------------------------------------------------

class EnrollKeys(NamedTuple):
    server: bytes    # K_server: ENROLL_REPLY tag
    client: bytes    # K_client: ENROLL_CONFIRM tag
    done: bytes      # K_done: ENROLL_DONE tag
    identity: bytes  # k


def enroll_keys(c: bytes, dh_ee: bytes, dh_es: bytes, th2: bytes) -> EnrollKeys:
    """Spec 5.4: the four HKDFs with salt ``c`` and ikm ``dh_ee || dh_es``."""
    ikm = dh_ee + dh_es
    return EnrollKeys(*(hkdf(c, ikm, LABELS["enroll key " + n] + th2)
                        for n in ("server", "client", "done", "identity")))


class SessionKeys(NamedTuple):
    c2s: bytes
    s2c: bytes
    server_finish: bytes
    client_finish: bytes


def session_keys(nc: bytes, ns: bytes, k: bytes, th2: bytes) -> SessionKeys:
    """Spec 5.5: the four HKDFs with salt ``nc || ns`` and ikm ``k``."""
    salt = nc + ns
    return SessionKeys(*(hkdf(salt, k, LABELS["session key " + n] + th2)
                         for n in ("c2s", "s2c", "server finish", "client finish")))


def sealed_id_key(E: bytes, S: bytes, dh_es: bytes) -> bytes:
    """Spec 5.6: ``K_id = HKDF(E || S, dh_es, "tally/1 sealed hello id")``."""
    return hkdf(E + S, dh_es, LABELS["sealed hello id"])


def sealed_session_keys(E: bytes, F: bytes, k: bytes, dh_ee: bytes, dh_es: bytes,
                        th2: bytes) -> SessionKeys:
    """Spec 5.7: the four HKDFs with salt ``E || F`` and ikm ``k || dh_ee || dh_es``."""
    salt, ikm = E + F, k + dh_ee + dh_es
    return SessionKeys(*(hkdf(salt, ikm, LABELS["sealed key " + n] + th2)
                         for n in ("c2s", "s2c", "server finish", "client finish")))


def next_key(key: bytes) -> bytes:
    """Spec 5.8: ``HKDF(empty, K_current, "tally/1 key update")``, either mode."""
    return hkdf(b"", key, LABELS["key update"])


def session_nonce(from_client: bool, seq: int) -> bytes:
    """Spec 8.2: ``u32 direction || u64 seq``; direction 0 client to server, 1 back."""
    return struct.pack(">IQ", 0 if from_client else 1, seq)


def enroll_init_tag(c: bytes, unsigned: bytes) -> bytes:
    """Spec 6.2 step 1: ``HMAC(c, "tally/1 enroll init" || H(ENROLL_INIT without tag))``."""
    return mac(c, LABELS["enroll init"], H(unsigned))


def refusal_from_error(f: bytes, context: str = "") -> Exception:
    """The exception for an ERROR frame received before a session: :class:`AuthFailed` for
    ``AUTH_FAILED``, else :class:`Refused`. (ERROR is unauthenticated: it only means the
    connection ended, spec 4.4.) An ERROR is recognised by its type byte alone: one whose
    length is not 4 reads as code ``MALFORMED`` and is a refusal all the same (4.4)."""
    if len(f) != 8:
        return Refused(ErrorCode.MALFORMED, None, context)
    err = parse_error(f)
    if err.code == ErrorCode.AUTH_FAILED:
        return AuthFailed((context + ": " if context else "")
                          + "the server refused the handshake (AUTH_FAILED): the identity is "
                          "unknown or revoked, or the key is wrong", code=err.code)
    return Refused(err.code, err.version, context)


# --- Enrollment, client side (6.2, 6.4) ----------------------------------------------------------

class ClientEnrollment:
    """The client of an enrollment (spec 6.4), one per attempt.

    ``init_frame`` is the ENROLL_INIT to send; :meth:`handle_reply` takes ENROLL_REPLY and
    returns ENROLL_CONFIRM; :meth:`handle_done` takes ENROLL_DONE and returns ``k``. Any
    failure raises, and the object is then finished. The derived values (``th1``, ``th2``,
    ``th3``, ``th4``, ``keys``, ``dh_ee``, ``dh_es``) are kept for the test vectors.
    """

    def __init__(self, token: EnrollmentToken, ident, *, ephemeral_secret: Optional[bytes] = None):
        self.token = token
        self.id = check_id(ident)
        self._x = ephemeral_secret if ephemeral_secret is not None else random_bytes(32)
        self.ephemeral_public = x25519_base(self._x)
        unsigned = enroll_init_unsigned(token.mode_byte, self.id, self.ephemeral_public)
        self.th1 = H(unsigned)
        self.init_frame = unsigned + mac(token.credential, LABELS["enroll init"], self.th1)
        self._transcript = self.init_frame
        self.state = "await_reply"
        self.keys: Optional[EnrollKeys] = None
        self.identity_key: Optional[bytes] = None

    def handle_reply(self, f: bytes) -> bytes:
        """ENROLL_REPLY in, ENROLL_CONFIRM out (6.2 step 3)."""
        self._expect("await_reply")
        self.state = "failed"
        if len(f) >= 5 and f[4] == FrameType.ERROR:
            raise refusal_from_error(f, "enrollment")
        if len(f) != 69 or f[4] != FrameType.ENROLL_REPLY:
            raise ProtocolError("malformed", "expected ENROLL_REPLY (length 65)")
        y_pub = f[5:37]
        self.dh_ee = x25519(self._x, y_pub)
        self.dh_es = x25519(self._x, self.token.server_key)
        self.th2 = H(self._transcript, f[:37])
        self.keys = enroll_keys(self.token.credential, self.dh_ee, self.dh_es, self.th2)
        if not tags_equal(mac(self.keys.server, self.th2), f[37:]):
            raise AuthFailed("the enrollment server did not prove it holds the server key "
                             "pinned in the token (wrong server, wrong token, or a man in the "
                             "middle)")
        self._transcript += f
        confirm_u = struct.pack(">IB", 33, FrameType.ENROLL_CONFIRM)
        self.th3 = H(self._transcript, confirm_u)
        confirm = confirm_u + mac(self.keys.client, self.th3)
        self._transcript += confirm
        self.state = "await_done"
        return confirm

    def handle_done(self, f: bytes) -> bytes:
        """ENROLL_DONE in; returns the identity key ``k`` (6.2 step 5)."""
        self._expect("await_done")
        self.state = "failed"
        if len(f) >= 5 and f[4] == FrameType.ERROR:
            raise refusal_from_error(f, "enrollment")
        if len(f) != 37 or f[4] != FrameType.ENROLL_DONE:
            raise ProtocolError("malformed", "expected ENROLL_DONE (length 33)")
        self.th4 = H(self._transcript, f[:5])
        if not tags_equal(mac(self.keys.done, self.th4), f[5:]):
            raise AuthFailed("the ENROLL_DONE tag did not verify")
        self.identity_key = self.keys.identity
        self.state = "enrolled"
        return self.identity_key

    def _expect(self, state: str) -> None:
        if self.state != state:
            raise RuntimeError(f"enrollment is {self.state}, not {state}")


# --- Handshake, client side (7) ----------------------------------------------------------------

class ClientHandshake:
    """The client of a session handshake (spec 7), one per connection.

    ``hello`` is the HELLO to send; :meth:`handle_server_auth` takes SERVER_AUTH (or an
    ERROR) and returns CLIENT_FINISH, after which :attr:`session` is the established
    :class:`SessionState`.
    """

    def __init__(self, ident, key: bytes, max_frame_len: int = 65536, *,
                 nonce: Optional[bytes] = None):
        if len(key) != 32:
            raise ValueError("the identity key is 32 bytes")
        if not MIN_FRAME_LIMIT <= max_frame_len <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_len must be {MIN_FRAME_LIMIT} to {MAX_FRAME_LIMIT}")
        self.id = check_id(ident)
        self._k = key
        self.max_frame_len = max_frame_len
        self.nonce = nonce if nonce is not None else random_bytes(32)
        self.hello = hello_frame(self.id, self.nonce, max_frame_len)
        self.session: Optional[SessionState] = None
        self.keys: Optional[SessionKeys] = None
        self.state = "await_auth"

    encrypted = False

    def handle_server_auth(self, f: bytes) -> bytes:
        """SERVER_AUTH in, CLIENT_FINISH out (7.1 step 3)."""
        if self.state != "await_auth":
            raise RuntimeError(f"handshake is {self.state}")
        self.state = "failed"
        if len(f) >= 5 and f[4] == FrameType.ERROR:
            raise refusal_from_error(f, "handshake")
        auth = parse_server_auth(f)
        self.th2 = H(self.hello, f[:45])
        self.keys = session_keys(self.nonce, auth.nonce, self._k, self.th2)
        if not tags_equal(mac(self.keys.server_finish, self.th2), auth.tag):
            raise AuthFailed("the server did not authenticate: the identity is unknown or "
                             "revoked, the key is wrong, or this is not the right server")
        finish_u = struct.pack(">IB", 33, FrameType.CLIENT_FINISH)
        self.th3 = H(self.hello, f, finish_u)
        finish = finish_u + mac(self.keys.client_finish, self.th3)
        self.server_max_frame_len = auth.max_frame_len
        self.keepalive_ms = auth.keepalive_ms
        self.session = SessionState(self.keys.c2s, self.keys.s2c,
                                    send_limit=auth.max_frame_len,
                                    recv_limit=self.max_frame_len, client=True)
        self.state = "established"
        return finish


class ClientSealedHandshake:
    """The client of an encrypted-mode handshake (spec 7.7, 5.6, 5.7), one per connection.

    ``hello`` is the SEALED_HELLO to send (the id sealed to the server's static key
    ``server_key``, S); :meth:`handle_server_auth` takes SEALED_AUTH (or an ERROR) and
    returns CLIENT_FINISH, after which :attr:`session` is the established, encrypted
    :class:`SessionState`. A SERVER_AUTH in answer is ``malformed`` (no downgrade, 7.8).
    """

    encrypted = True

    def __init__(self, ident, key: bytes, server_key: bytes, max_frame_len: int = 65536, *,
                 ephemeral_secret: Optional[bytes] = None):
        if len(key) != 32:
            raise ValueError("the identity key is 32 bytes")
        if server_key is None or len(server_key) != 32:
            raise ValueError("the encrypted mode needs the server's 32-byte static key S "
                             "(the credential's server-key)")
        if not MIN_FRAME_LIMIT <= max_frame_len <= MAX_FRAME_LIMIT:
            raise ValueError(f"max_frame_len must be {MIN_FRAME_LIMIT} to {MAX_FRAME_LIMIT}")
        self.id = check_id(ident)
        self._k = key
        self.server_key = bytes(server_key)
        self.max_frame_len = max_frame_len
        self._e = ephemeral_secret if ephemeral_secret is not None else random_bytes(32)
        self.ephemeral_public = x25519_base(self._e)
        # 5.6: a low-order S (a bad credential) is weak_key before anything is sent.
        self.dh_es = x25519(self._e, self.server_key)
        self.key_id = sealed_id_key(self.ephemeral_public, self.server_key, self.dh_es)
        # 4.3: E in the clear; the id, its length and the frame limit sealed (P11).
        head = sealed_hello_head(self.ephemeral_public)
        self.sealed_plaintext = sealed_plaintext(self.id, max_frame_len)
        self.hello = head + aead_seal(self.key_id, bytes(12), head, self.sealed_plaintext)
        self.session: Optional[SessionState] = None
        self.keys: Optional[SessionKeys] = None
        self.state = "await_auth"

    def handle_server_auth(self, f: bytes) -> bytes:
        """SEALED_AUTH in, CLIENT_FINISH out (7.7 step 3). Checks in the order of 7.2's
        client table: ERROR, type and length, limits, ``dh_ee`` (weak_key), tag."""
        if self.state != "await_auth":
            raise RuntimeError(f"handshake is {self.state}")
        self.state = "failed"
        try:
            if len(f) >= 5 and f[4] == FrameType.ERROR:
                raise refusal_from_error(f, "handshake")
            auth = parse_sealed_auth(f)
            F = auth.nonce
            self.dh_ee = x25519(self._e, F)
            self.th2 = H(self.hello, f[:45])
            self.keys = sealed_session_keys(self.ephemeral_public, F, self._k, self.dh_ee,
                                            self.dh_es, self.th2)
        finally:
            self._e = None  # erase e (7.7 step 3); this object is finished either way
        if not tags_equal(mac(self.keys.server_finish, self.th2), auth.tag):
            raise AuthFailed("the server did not authenticate: the identity is unknown or "
                             "revoked, the key is wrong, the server key S is not this "
                             "server's, or this is not the right server")
        finish_u = struct.pack(">IB", 33, FrameType.CLIENT_FINISH)
        self.th3 = H(self.hello, f, finish_u)
        finish = finish_u + mac(self.keys.client_finish, self.th3)
        self.server_max_frame_len = auth.max_frame_len
        self.keepalive_ms = auth.keepalive_ms
        self.session = SessionState(self.keys.c2s, self.keys.s2c,
                                    send_limit=auth.max_frame_len,
                                    recv_limit=self.max_frame_len, client=True, encrypted=True)
        self.state = "established"
        return finish


# --- Session (8) ---------------------------------------------------------------------------------

class SessionState:
    """One side of an established session (spec 8): counters, keys, pending answers.

    Sending methods return whole frames (tagged, numbered); :meth:`receive` applies every
    check of spec 8.3 in order and only then moves the counter. ``client`` selects the
    ERROR rule of 8.3 step 2 and, in the encrypted mode, the ``direction`` of the nonces
    (8.2). ``encrypted`` selects the encrypted mode (ChaCha20-Poly1305 frames) over the
    authenticated mode (HMAC tags). Not thread-safe: the caller serialises.

    Key update (8.7): :meth:`key_update` sends KEY_UPDATE in either mode; a received one
    moves the receiving key. In the encrypted mode, with ``auto_key_update`` (the
    default), any sending method whose frame finds the sending key due (it sealed
    ``key_update_frames`` frames, or sealed its first frame ``key_update_seconds`` ago or
    more, on ``clock``) returns KEY_UPDATE followed by its own frame, as one byte string.
    The timer must also fire when nothing else is sent: whoever drives the session asks
    :meth:`key_update_deadline` when, and calls :meth:`timed_key_update` then (the client's
    session does it in its reader thread, with the keepalive timer).
    """

    def __init__(self, send_key: bytes, recv_key: bytes, *, send_limit: int, recv_limit: int,
                 client: bool = True, encrypted: bool = False,
                 auto_key_update: Optional[bool] = None,
                 key_update_frames: int = KEY_UPDATE_FRAMES,
                 key_update_seconds: float = KEY_UPDATE_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        self._send_key = send_key
        self._recv_key = recv_key
        self.encrypted = encrypted
        self.tag_len = AEAD_TAG_LEN if encrypted else TAG_LEN
        self.auto_key_update = encrypted if auto_key_update is None else auto_key_update
        self.key_update_frames = key_update_frames
        self.key_update_seconds = key_update_seconds
        self._clock = clock
        self._sealed_with_key = 0        # frames sealed with the current sending key
        self._key_first_used = None      # when the current sending key sealed its first frame
        self.key_updates_sent = 0
        self.key_updates_received = 0
        self.send_limit = send_limit
        self.recv_limit = recv_limit
        self.client = client
        self.next_seq = 1          # the next sequence number this side sends
        self.last_received = 0     # `last` of 8.3
        self.pending_requests: Set[int] = set()   # our REQUESTs not answered yet
        self.pending_pings: Set[int] = set()      # our PINGs not answered yet
        self.unanswered: Set[int] = set()         # peer REQUESTs we accepted and owe a RESPONSE
        # Spec 8.8: a client's accepted DELIVERs it owes an ACK; a server's DELIVERs not
        # acknowledged yet; and the last msg_id delivered in this session.
        self.deliveries: Set[int] = set()
        self.last_delivery = 0
        self.close_sent = False
        self.close_received = False

    # Sending (8.1, 8.2) ---------------------------------------------------------------

    @property
    def last_sent(self) -> int:
        return self.next_seq - 1

    def _seal_one(self, ty: int, seq: int, fields: bytes) -> bytes:
        """One frame with the current sending key (8.2), counted against it (8.7)."""
        header = session_header(ty, seq, len(fields), self.tag_len)
        if self.encrypted:
            out = header + aead_seal(self._send_key, session_nonce(self.client, seq), header,
                                     fields)
        else:
            out = header + fields + mac(self._send_key, header + fields)
        if self._key_first_used is None:
            self._key_first_used = self._clock()
        self._sealed_with_key += 1
        return out

    def _advance_send_key(self) -> None:
        self._send_key = next_key(self._send_key)   # the old one is dropped (5.8, 8.7)
        self._sealed_with_key = 0
        self._key_first_used = None
        self.key_updates_sent += 1

    def key_update_due(self) -> bool:
        """8.7: the sending key sealed ``key_update_frames`` frames, or sealed its first frame
        ``key_update_seconds`` ago or more (on this side's own clock)."""
        if self._sealed_with_key >= self.key_update_frames:
            return True
        return (self._key_first_used is not None
                and self._clock() - self._key_first_used >= self.key_update_seconds)

    def key_update_deadline(self) -> Optional[float]:
        """8.7: when (on ``clock``) the timer of the sending key fires: ``key_update_seconds``
        after it sealed its first frame. ``None`` when no timer runs: automatic key updates
        off (the authenticated mode), a key that has sealed nothing (it does not age), CLOSE
        sent, or a next sequence number of ``2^64 - 2`` or more (no KEY_UPDATE then)."""
        if (not self.auto_key_update or self._key_first_used is None or self.close_sent
                or self.next_seq >= MAX_SEQ - 1):
            return None
        return self._key_first_used + self.key_update_seconds

    def timed_key_update(self) -> Optional[bytes]:
        """The KEY_UPDATE the timer of 8.7 sends, on its own, once :meth:`key_update_deadline`
        has come; ``None`` if it has not (or no timer runs: the key was updated meanwhile,
        before another frame)."""
        deadline = self.key_update_deadline()
        if deadline is None or self._clock() < deadline:
            return None
        return self.key_update()

    def _seal(self, ty: int, fields: bytes) -> Tuple[int, bytes]:
        if self.close_sent:
            raise RuntimeError("this side sent CLOSE: it sends nothing more (8.6)")
        length = 1 + 8 + len(fields) + self.tag_len
        if length > self.send_limit:
            raise PayloadTooLarge(f"a frame of length {length} is above the peer's limit "
                                  f"{self.send_limit}")
        seq = self.next_seq
        if seq > MAX_SEQ or (seq == MAX_SEQ and ty != FrameType.CLOSE):
            raise SequenceExhausted("sequence numbers exhausted: only CLOSE may be sent")
        prefix = b""
        # 8.7: KEY_UPDATE right before the next frame once the key is due. Not when it would
        # take the last number a non-CLOSE frame may use (8.1: 2^64-1 is CLOSE's only).
        if (self.auto_key_update and ty != FrameType.KEY_UPDATE and seq < MAX_SEQ - 1
                and self.key_update_due()):
            prefix = self._seal_one(FrameType.KEY_UPDATE, seq, b"")
            self._advance_send_key()
            seq += 1
        out = self._seal_one(ty, seq, fields)
        self.next_seq = seq + 1
        if ty == FrameType.KEY_UPDATE:
            self._advance_send_key()
        return seq, prefix + out

    def key_update(self) -> bytes:
        """A KEY_UPDATE (8.7), sealed with the current sending key; every later frame is
        sealed with the next key (5.8). Valid in both modes. Not at a next sequence number
        of ``2^64 - 2`` or more (8.7: those are a last frame's and CLOSE's)."""
        if self.next_seq >= MAX_SEQ - 1:
            raise SequenceExhausted("sequence numbers nearly exhausted: no KEY_UPDATE at "
                                    "2^64 - 2 or later (8.7)")
        return self._seal(FrameType.KEY_UPDATE, b"")[1]

    @property
    def overhead(self) -> int:
        """Bytes of ``length`` besides the fields: 9 + the tag (41 or 25, 4.5)."""
        return 1 + 8 + self.tag_len

    def max_payload(self, ty: int = FrameType.REQUEST) -> int:
        """The largest payload a REQUEST/MESSAGE (or RESPONSE) may carry to this peer."""
        fixed = self.overhead + (10 if ty == FrameType.RESPONSE else 0)
        return self.send_limit - fixed

    def request(self, payload: bytes) -> Tuple[int, bytes]:
        """A REQUEST; returns ``(seq, frame)``. ``seq`` is now pending."""
        seq, f = self._seal(FrameType.REQUEST, bytes(payload))
        self.pending_requests.add(seq)
        return seq, f

    def response(self, req_seq: int, status: int, payload: bytes) -> bytes:
        """The one RESPONSE to the peer's REQUEST ``req_seq``. An answer that does not fit
        the peer's limit is replaced by status BACKEND_ERROR and a short payload (8.4)."""
        if req_seq not in self.unanswered:
            raise ValueError(f"request {req_seq} is not waiting for an answer (answered already, "
                             "or never received)")
        f = self._answer(FrameType.RESPONSE, req_seq, status, payload,
                         b"response too large for the peer's frame limit")
        self.unanswered.discard(req_seq)
        return f

    def _answer(self, ty: int, ref: int, status: int, payload: bytes, too_large: bytes) -> bytes:
        """A RESPONSE or an ACK (``ref || status || payload``, 4.5): one that does not fit the
        peer's limit is replaced by status BACKEND_ERROR and ``too_large`` (8.4, 8.8)."""
        if not 0 <= status <= 0xFFFF:
            raise ValueError("a status is a u16")
        payload = bytes(payload)
        if self.overhead + 10 + len(payload) > self.send_limit:
            status, payload = Status.BACKEND_ERROR, too_large
        return self._seal(ty, struct.pack(">QH", ref, status) + payload)[1]

    def ack(self, msg_id: int, status: int = 0, payload: bytes = b"") -> bytes:
        """The one ACK of DELIVER ``msg_id`` (8.8): for a queued request, the answer; for a
        queued message, status 0 and no payload. An answer that does not fit the server's
        limit is replaced by status BACKEND_ERROR and a short payload."""
        if not self.client:
            raise ValueError("only a client sends ACK")
        if msg_id not in self.deliveries:
            raise ValueError(f"delivery {msg_id} is not waiting for an acknowledgement "
                             "(acknowledged already, or never received)")
        f = self._answer(FrameType.ACK, msg_id, status, payload, b"answer too large for one frame")
        self.deliveries.discard(msg_id)
        return f

    def deliver(self, msg_id: int, kind: int, payload: bytes) -> bytes:
        """A DELIVER of queued message ``msg_id`` (server side, 8.8; ids increase)."""
        if self.client:
            raise ValueError("only a server sends DELIVER")
        if msg_id <= self.last_delivery or kind not in (1, 2):
            raise ValueError(f"DELIVER {msg_id} (kind {kind}) after {self.last_delivery}")
        _, f = self._seal(FrameType.DELIVER, struct.pack(">QB", msg_id, kind) + bytes(payload))
        self.last_delivery = msg_id
        self.deliveries.add(msg_id)
        return f

    def message(self, payload: bytes) -> bytes:
        """A one-way MESSAGE."""
        return self._seal(FrameType.MESSAGE, bytes(payload))[1]

    def ping(self) -> Tuple[int, bytes]:
        """A PING; returns ``(seq, frame)``; ``seq`` is pending until its PONG."""
        seq, f = self._seal(FrameType.PING, b"")
        self.pending_pings.add(seq)
        return seq, f

    def pong(self, ping_seq: int) -> bytes:
        """The PONG to the peer's PING ``ping_seq``."""
        return self._seal(FrameType.PONG, struct.pack(">Q", ping_seq))[1]

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
        """A CLOSE; after it this side sends nothing more. The reason is cut to 255 bytes.
        At the last sequence number the code is SEQUENCE_EXHAUSTED (8.1)."""
        raw = reason.encode("utf-8")[:255]
        raw = raw.decode("utf-8", "ignore").encode("utf-8")
        if self.next_seq == MAX_SEQ:
            code = CloseCode.SEQUENCE_EXHAUSTED
        _, f = self._seal(FrameType.CLOSE, struct.pack(">H", code) + raw)
        self.close_sent = True
        # Requests and PINGs stay pending: their answers may still arrive before the peer's
        # CLOSE and are checked (8.6). What the peer asked can no longer be answered.
        self.unanswered.clear()
        return f

    # Receiving (8.3) --------------------------------------------------------------------

    def check_length(self, length: int) -> None:
        """8.3 step 1 on the length prefix alone (``empty_frame``, ``frame_too_large``)."""
        check_length(length, self.recv_limit)

    def receive(self, f: bytes) -> SessionFrame:
        """Check one whole frame (prefix included) against every rule of spec 8.3, in order.

        Raises :class:`ProtocolError` (send CLOSE ``e.close_code``, then disconnect);
        for an ERROR frame, :class:`Refused`/:class:`AuthFailed` (a client that has accepted
        no session frame yet: the server refused CLIENT_FINISH) or :class:`Truncated`
        (anything else: it was injected); then send no CLOSE. The counter moves only when
        every check passed.
        """
        if len(f) < 4:
            raise ProtocolError("malformed", "shorter than a length prefix")
        (length,) = struct.unpack_from(">I", f)
        self.check_length(length)                                     # step 1
        if len(f) != 4 + length:
            raise ProtocolError("malformed", "not one whole frame")
        ty = f[4]
        if ty == FrameType.ERROR:                                      # step 2
            if self.client and self.last_received == 0:
                if len(f) == 8:
                    raise refusal_from_error(f, "session")
                raise Refused(ErrorCode.MALFORMED, None, "session")
            raise Truncated("an ERROR frame arrived in the session: it is not authenticated "
                            "and can only have been injected; the connection is treated as cut")
        if not is_session_type(ty) or length < self.overhead:
            raise ProtocolError("malformed", f"type {ty:#04x}, length {length}: not a session frame")
        if ty == FrameType.DELIVER and not self.client or ty == FrameType.ACK and self.client:
            raise ProtocolError("malformed", f"{FrameType(ty).name} in the wrong direction")
        (seq,) = struct.unpack_from(">Q", f, 5)
        if seq != self.last_received + 1:                             # step 3
            raise ProtocolError("bad_sequence", f"seq {seq}, expected {self.last_received + 1}")
        if seq == MAX_SEQ and ty != FrameType.CLOSE:
            raise ProtocolError("sequence_exhausted", "only CLOSE may use seq 2^64-1")
        if self.encrypted:                                            # step 4
            try:
                fields = aead_open(self._recv_key, session_nonce(not self.client, seq), f[:13],
                                   f[13:])
            except ProtocolError:
                raise ProtocolError("bad_tag", f"frame {seq}") from None
        else:
            if not tags_equal(mac(self._recv_key, f[:-TAG_LEN]), f[-TAG_LEN:]):
                raise ProtocolError("bad_tag", f"frame {seq}")
            fields = f[13:-TAG_LEN]
        parsed = parse_session_fields(ty, seq, fields)                # step 5
        if ty == FrameType.RESPONSE:
            if parsed.req_seq not in self.pending_requests:
                raise ProtocolError("unsolicited_answer",
                                    f"RESPONSE to {parsed.req_seq}, which is not pending")
            self.pending_requests.discard(parsed.req_seq)
        elif ty == FrameType.PONG:
            if parsed.ping_seq not in self.pending_pings:
                raise ProtocolError("unsolicited_answer",
                                    f"PONG to {parsed.ping_seq}, which is not a pending PING")
            self.pending_pings.discard(parsed.ping_seq)
        elif ty == FrameType.ACK:
            if parsed.msg_id not in self.deliveries:
                raise ProtocolError("unsolicited_answer",
                                    f"ACK of message {parsed.msg_id}, which is not outstanding")
            self.deliveries.discard(parsed.msg_id)
        elif ty == FrameType.DELIVER:
            if parsed.msg_id <= self.last_delivery:
                raise ProtocolError("delivery_order", f"DELIVER of message {parsed.msg_id} "
                                    f"after {self.last_delivery}")
            self.last_delivery = parsed.msg_id
            if not self.close_sent:
                self.deliveries.add(parsed.msg_id)
        elif ty == FrameType.REQUEST and not self.close_sent:
            self.unanswered.add(seq)
        elif ty == FrameType.CLOSE:
            self.close_received = True
        self.last_received = seq                                      # step 6
        if ty == FrameType.KEY_UPDATE:                                # 8.7, 5.8
            self._recv_key = next_key(self._recv_key)
            self.key_updates_received += 1
        return parsed
