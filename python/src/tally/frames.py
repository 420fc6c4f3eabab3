"""Framing (spec 3.2) and the frames of spec section 4, as pure functions on bytes.

Every frame here is the whole frame as on the wire, its 4-byte length prefix included
(transcripts and tags need it).
"""
import struct
from typing import Iterator, NamedTuple, Optional

from .codes import SESSION_TYPES, FrameType
from .errors import ProtocolError

__all__ = [
    "PROTOCOL_VERSION", "HANDSHAKE_LIMIT", "MIN_FRAME_LIMIT", "MAX_FRAME_LIMIT",
    "DEFAULT_FRAME_LIMIT", "MIN_KEEPALIVE_MS", "MAX_KEEPALIVE_MS", "MAX_SEQ", "TAG_LEN",
    "AEAD_TAG_LEN", "SEALED_HELLO_LEN", "SEALED_HELLO_HEAD_LEN", "SEALED_PLAINTEXT_LEN",
    "sealed_hello_head", "parse_sealed_hello", "SealedHello", "parse_sealed_auth",
    "sealed_plaintext", "parse_sealed_plaintext", "SealedPlaintext", "session_header",
    "check_id", "check_length", "FrameDecoder", "frame", "error_frame", "parse_error",
    "ErrorFrame", "hello_frame", "parse_hello", "Hello", "parse_server_auth", "ServerAuth",
    "enroll_init_unsigned", "parse_enroll_init", "EnrollInit", "SessionFrame",
    "session_frame_unsigned", "parse_session_fields",
]

PROTOCOL_VERSION = 1
HANDSHAKE_LIMIT = 256            # the limit on `length` before a session (3.2)
MIN_FRAME_LIMIT = 256            # announced session limits (4.3)
MAX_FRAME_LIMIT = 16_777_216
DEFAULT_FRAME_LIMIT = 65_536
MIN_KEEPALIVE_MS = 100
MAX_KEEPALIVE_MS = 86_400_000
MAX_SEQ = 2**64 - 1
TAG_LEN = 32                     # HMAC tags (handshake, authenticated-mode session frames)
AEAD_TAG_LEN = 16                # the Poly1305 tag of encrypted-mode session frames (4.5)
SEALED_HELLO_LEN = 119           # SEALED_HELLO's `length`, whatever the id (4.3)
SEALED_HELLO_HEAD_LEN = 38      # length, type, version, E: the associated data of the sealed part
SEALED_PLAINTEXT_LEN = 69        # u8 n || id || zeros to 64 bytes || u32 max_frame_len

_ID_BYTES = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:@")


def check_id(ident) -> bytes:
    """Check an identity against spec 4.1 (1 to 64 bytes of ``A-Za-z0-9._-:@``).

    Takes ``str`` or ``bytes``; returns the bytes. Raises ``ProtocolError("bad_id")``.
    """
    if isinstance(ident, str):
        try:
            raw = ident.encode("ascii")
        except UnicodeEncodeError:
            raise ProtocolError("bad_id", f"identity {ident!r} is not ASCII") from None
    else:
        raw = bytes(ident)
    if not 1 <= len(raw) <= 64 or any(b not in _ID_BYTES for b in raw):
        raise ProtocolError("bad_id", f"identity {raw!r}: 1 to 64 of A-Z a-z 0-9 . _ - : @")
    return raw


def check_length(length: int, limit: int) -> None:
    """The receiver's length checks of spec 3.2 rules 1 and 2, on the prefix alone."""
    if length == 0:
        raise ProtocolError("empty_frame", "a frame length of 0")
    if length > limit:
        raise ProtocolError("frame_too_large", f"frame length {length} is above the limit {limit}")


class FrameDecoder:
    """Splits a byte stream into whole frames (spec 3.2).

    The length prefix is checked against ``limit`` as soon as its 4 bytes are in, before
    any byte of the body is kept, so a lying length costs nothing. ``limit`` may be changed
    between calls.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._buf = bytearray()
        self._need: Optional[int] = None

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Add received bytes; iterate over the frames now complete (prefix included), in
        order. Each length prefix is checked when the iteration reaches it, so the frames
        before a bad prefix are still delivered; then ``ProtocolError`` (``empty_frame``,
        ``frame_too_large``) is raised and the decoder is unusable."""
        self._buf += data
        return self._frames()

    def _frames(self) -> Iterator[bytes]:
        while True:
            if self._need is None:
                if len(self._buf) < 4:
                    return
                (length,) = struct.unpack_from(">I", self._buf)
                check_length(length, self.limit)
                self._need = 4 + length
            if len(self._buf) < self._need:
                return
            f = bytes(self._buf[:self._need])
            del self._buf[:self._need]
            self._need = None
            yield f

    @property
    def pending(self) -> int:
        """Bytes received that are not yet part of a whole frame."""
        return len(self._buf)


def frame(ty: int, body: bytes) -> bytes:
    """``u32(1 + len(body)) || ty || body``."""
    return struct.pack(">IB", 1 + len(body), ty) + body


# --- ERROR (4.4) ----------------------------------------------------------------------

class ErrorFrame(NamedTuple):
    code: int
    version: int


def error_frame(code: int, version: int = PROTOCOL_VERSION) -> bytes:
    """An ERROR frame: ``00000004 1f || u16 code || u8 version``."""
    return frame(FrameType.ERROR, struct.pack(">HB", code, version))


def parse_error(f: bytes) -> ErrorFrame:
    """Parse an ERROR frame (length exactly 4), else ``malformed``."""
    if len(f) != 8 or f[4] != FrameType.ERROR:
        raise ProtocolError("malformed", "an ERROR frame has length 4")
    code, version = struct.unpack_from(">HB", f, 5)
    return ErrorFrame(code, version)


# --- Handshake frames (4.3) -------------------------------------------------------------

class Hello(NamedTuple):
    version: int
    id: bytes
    nonce: bytes
    max_frame_len: int


def hello_frame(ident: bytes, nonce: bytes, max_frame_len: int) -> bytes:
    """HELLO: ``u32(39+n) 10 01 u8(n) id nc u32(max_frame_len)``."""
    ident = check_id(ident)
    if len(nonce) != 32:
        raise ValueError("the client nonce is 32 bytes")
    if not MIN_FRAME_LIMIT <= max_frame_len <= MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame_len must be {MIN_FRAME_LIMIT} to {MAX_FRAME_LIMIT}")
    return frame(FrameType.HELLO, bytes([PROTOCOL_VERSION, len(ident)]) + ident + nonce
                 + struct.pack(">I", max_frame_len))


def parse_hello(f: bytes) -> Hello:
    """Parse HELLO as a server would: type, then the version before anything else (4.1),
    then the id (``bad_id``), the exact length and the announced limit (``malformed``)."""
    if len(f) < 5 or f[4] != FrameType.HELLO:
        raise ProtocolError("malformed", "expected HELLO")
    if len(f) < 6:
        raise ProtocolError("malformed", "HELLO too short")
    if f[5] != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"HELLO version {f[5]}")
    if len(f) < 7:
        raise ProtocolError("malformed", "HELLO too short")
    n = f[6]
    if len(f) < 7 + n:
        raise ProtocolError("malformed", "HELLO too short for its id")
    ident = check_id(f[7:7 + n])
    if len(f) != 4 + 39 + n:
        raise ProtocolError("malformed", f"HELLO length must be {39 + n}")
    (limit,) = struct.unpack_from(">I", f, 7 + n + 32)
    if not MIN_FRAME_LIMIT <= limit <= MAX_FRAME_LIMIT:
        raise ProtocolError("malformed", f"HELLO max_frame_len {limit} out of range")
    return Hello(f[5], ident, f[7 + n:7 + n + 32], limit)


class ServerAuth(NamedTuple):
    nonce: bytes
    max_frame_len: int
    keepalive_ms: int
    tag: bytes


def parse_server_auth(f: bytes, ty: int = FrameType.SERVER_AUTH) -> ServerAuth:
    """Parse SERVER_AUTH (length 73); the announced limits are range-checked here, before
    any tag (4.3). ERROR frames are the caller's business. With ``ty`` SEALED_AUTH, the
    same layout with ``F`` in place of ``ns`` (``nonce`` holds ``F``); the other type is
    ``malformed`` (7.2, client row 4)."""
    name = FrameType(ty).name
    if len(f) != 77 or f[4] != ty:
        raise ProtocolError("malformed", f"expected {name} (length 73)")
    limit, keepalive = struct.unpack_from(">II", f, 37)
    if not MIN_FRAME_LIMIT <= limit <= MAX_FRAME_LIMIT:
        raise ProtocolError("malformed", f"{name} max_frame_len {limit} out of range")
    if not MIN_KEEPALIVE_MS <= keepalive <= MAX_KEEPALIVE_MS:
        raise ProtocolError("malformed", f"{name} keepalive {keepalive} ms out of range")
    return ServerAuth(f[5:37], limit, keepalive, f[45:77])


def parse_sealed_auth(f: bytes) -> ServerAuth:
    """Parse SEALED_AUTH (length 73): ``F`` (as ``nonce``), the limits (range-checked), tag.
    A SERVER_AUTH here is ``malformed``: it answers HELLO, never SEALED_HELLO (7.2, 7.8)."""
    return parse_server_auth(f, FrameType.SEALED_AUTH)


# --- The encrypted mode's first frame (4.3, 5.6) ------------------------------------------

def sealed_hello_head(ephemeral: bytes) -> bytes:
    """SEALED_HELLO's first 38 bytes, the associated data of its sealed part:
    ``00000077 13 01 E``. Nothing else of the client is in the clear (4.3): the id, its
    length and the frame limit are sealed (:func:`sealed_plaintext`)."""
    if len(ephemeral) != 32:
        raise ValueError("E is 32 bytes")
    return struct.pack(">IBB", SEALED_HELLO_LEN, FrameType.SEALED_HELLO,
                       PROTOCOL_VERSION) + ephemeral


def sealed_plaintext(ident, max_frame_len: int) -> bytes:
    """``u8 n || id || 0^(64-n) || u32 max_frame_len``: 69 bytes whatever the id and the
    limit (4.3, 5.6)."""
    ident = check_id(ident)
    if not MIN_FRAME_LIMIT <= max_frame_len <= MAX_FRAME_LIMIT:
        raise ValueError(f"max_frame_len must be {MIN_FRAME_LIMIT} to {MAX_FRAME_LIMIT}")
    return (bytes([len(ident)]) + ident + bytes(64 - len(ident))
            + struct.pack(">I", max_frame_len))


class SealedPlaintext(NamedTuple):
    id: bytes
    max_frame_len: int


def parse_sealed_plaintext(pt: bytes) -> SealedPlaintext:
    """The id and the frame limit of an opened SEALED_HELLO, checked in the order of 4.3:
    ``1 <= n <= 64`` and an id that keeps 4.1 (``bad_id``, treated as ``malformed``), only
    zeros after the id (``malformed``), ``max_frame_len`` in its range (``malformed``)."""
    if len(pt) != SEALED_PLAINTEXT_LEN:
        raise ProtocolError("malformed", f"the sealed plaintext is {SEALED_PLAINTEXT_LEN} bytes")
    n = pt[0]
    if not 1 <= n <= 64:
        raise ProtocolError("bad_id", f"sealed id length {n}")
    ident = check_id(pt[1:1 + n])
    if any(pt[1 + n:65]):
        raise ProtocolError("malformed", "the sealed id's padding is not zero")
    (limit,) = struct.unpack_from(">I", pt, 65)
    if not MIN_FRAME_LIMIT <= limit <= MAX_FRAME_LIMIT:
        raise ProtocolError("malformed", f"SEALED_HELLO max_frame_len {limit} out of range")
    return SealedPlaintext(ident, limit)


class SealedHello(NamedTuple):
    version: int
    ephemeral: bytes      # E
    sealed: bytes         # 85 bytes: AEAD(K_id, 0^12, the first 38 bytes, sealed_plaintext)


def parse_sealed_hello(f: bytes) -> SealedHello:
    """Parse SEALED_HELLO as a server would (7.2 rows 3 to 5): version first, then
    ``length`` 119. Opening the sealed part (and checking the id and the limit in it,
    row 5b) is the caller's: :func:`parse_sealed_plaintext`."""
    if len(f) < 5 or f[4] != FrameType.SEALED_HELLO:
        raise ProtocolError("malformed", "expected SEALED_HELLO")
    if len(f) < 6:
        raise ProtocolError("malformed", "SEALED_HELLO too short")
    if f[5] != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"SEALED_HELLO version {f[5]}")
    if len(f) != 4 + SEALED_HELLO_LEN:
        raise ProtocolError("malformed", f"SEALED_HELLO length must be {SEALED_HELLO_LEN}")
    return SealedHello(f[5], f[6:SEALED_HELLO_HEAD_LEN], f[SEALED_HELLO_HEAD_LEN:])


# --- Enrollment frames (4.2) --------------------------------------------------------------

class EnrollInit(NamedTuple):
    version: int
    mode: int
    id: bytes
    ephemeral: bytes
    tag: bytes


def enroll_init_unsigned(mode: int, ident: bytes, ephemeral: bytes) -> bytes:
    """ENROLL_INIT without its tag: ``u32(68+n) 01 01 mode u8(n) id X``."""
    ident = check_id(ident)
    if mode not in (0, 1):
        raise ValueError("mode is 0 (open) or 1 (token)")
    if len(ephemeral) != 32:
        raise ValueError("X is 32 bytes")
    return struct.pack(">IBBBB", 68 + len(ident), FrameType.ENROLL_INIT, PROTOCOL_VERSION,
                       mode, len(ident)) + ident + ephemeral


def parse_enroll_init(f: bytes) -> EnrollInit:
    """Parse ENROLL_INIT as a server would: type, version first (4.1), mode, id, length."""
    if len(f) < 5 or f[4] != FrameType.ENROLL_INIT:
        raise ProtocolError("malformed", "expected ENROLL_INIT")
    if len(f) < 6:
        raise ProtocolError("malformed", "ENROLL_INIT too short")
    if f[5] != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"ENROLL_INIT version {f[5]}")
    if len(f) < 8:
        raise ProtocolError("malformed", "ENROLL_INIT too short")
    mode, n = f[6], f[7]
    if mode not in (0, 1):
        raise ProtocolError("malformed", f"ENROLL_INIT mode {mode}")
    if len(f) < 8 + n:
        raise ProtocolError("malformed", "ENROLL_INIT too short for its id")
    ident = check_id(f[8:8 + n])
    if len(f) != 4 + 68 + n:
        raise ProtocolError("malformed", f"ENROLL_INIT length must be {68 + n}")
    return EnrollInit(f[5], mode, ident, f[8 + n:40 + n], f[40 + n:72 + n])


# --- Session frames (4.5) ------------------------------------------------------------------

class SessionFrame(NamedTuple):
    """A session frame that passed every check of spec 8.3 (KEY_UPDATE included).

    ``payload`` for REQUEST, RESPONSE, MESSAGE, DELIVER and ACK; ``req_seq`` and
    ``status`` for RESPONSE; ``ping_seq`` for PONG; ``code`` and ``reason`` for CLOSE;
    ``msg_id`` for DELIVER and ACK, ``kind`` for DELIVER (1 request, 2 message), ``status``
    for ACK (8.8).
    """

    type: int
    seq: int
    payload: bytes = b""
    req_seq: Optional[int] = None
    status: Optional[int] = None
    ping_seq: Optional[int] = None
    code: Optional[int] = None
    reason: Optional[str] = None
    msg_id: Optional[int] = None
    kind: Optional[int] = None


def session_header(ty: int, seq: int, fields_len: int, tag_len: int = TAG_LEN) -> bytes:
    """The 13-byte header ``length || type || seq`` (4.5); ``length`` counts the tag
    (32 bytes in the authenticated mode, 16 in the encrypted mode)."""
    return struct.pack(">IBQ", 1 + 8 + fields_len + tag_len, ty, seq)


def session_frame_unsigned(ty: int, seq: int, fields: bytes) -> bytes:
    """``length || type || seq || fields`` (the bytes the HMAC tag covers, 8.2)."""
    return session_header(ty, seq, len(fields)) + fields


def parse_session_fields(ty: int, seq: int, fields: bytes) -> SessionFrame:
    """Parse the type-specific fields (between ``seq`` and the tag) exactly (8.3 step 5)."""
    if ty in (FrameType.REQUEST, FrameType.MESSAGE):
        return SessionFrame(ty, seq, payload=fields)
    if ty == FrameType.RESPONSE:
        if len(fields) < 10:
            raise ProtocolError("malformed", "RESPONSE shorter than req_seq and status")
        req_seq, status = struct.unpack_from(">QH", fields)
        return SessionFrame(ty, seq, payload=fields[10:], req_seq=req_seq, status=status)
    if ty in (FrameType.PING, FrameType.KEY_UPDATE):
        if fields:
            raise ProtocolError("malformed", f"{FrameType(ty).name} has no fields")
        return SessionFrame(ty, seq)
    if ty == FrameType.PONG:
        if len(fields) != 8:
            raise ProtocolError("malformed", "PONG has exactly ping_seq")
        return SessionFrame(ty, seq, ping_seq=struct.unpack(">Q", fields)[0])
    if ty == FrameType.CLOSE:
        if len(fields) < 2:
            raise ProtocolError("malformed", "CLOSE shorter than its code")
        (code,) = struct.unpack_from(">H", fields)
        raw = fields[2:]
        if len(raw) > 255:
            raise ProtocolError("malformed", "CLOSE reason above 255 bytes")
        try:
            reason = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("malformed", "CLOSE reason is not UTF-8") from None
        return SessionFrame(ty, seq, code=code, reason=reason)
    if ty == FrameType.DELIVER:
        if len(fields) < 9:
            raise ProtocolError("malformed", "DELIVER shorter than msg_id and kind")
        msg_id, kind = struct.unpack_from(">QB", fields)
        if msg_id == 0 or kind not in (1, 2):
            raise ProtocolError("malformed", f"DELIVER of message {msg_id}, kind {kind}")
        return SessionFrame(ty, seq, payload=fields[9:], msg_id=msg_id, kind=kind)
    if ty == FrameType.ACK:
        if len(fields) < 10:
            raise ProtocolError("malformed", "ACK shorter than msg_id and status")
        msg_id, status = struct.unpack_from(">QH", fields)
        return SessionFrame(ty, seq, payload=fields[10:], msg_id=msg_id, status=status)
    raise ProtocolError("malformed", f"type {ty:#04x} is not a session frame")


def is_session_type(ty: int) -> bool:
    return ty in SESSION_TYPES
