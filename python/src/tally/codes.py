"""Numbers of spec sections 4.1 and 10: frame types, ERROR codes, CLOSE codes, statuses."""
import enum

__all__ = ["FrameType", "ErrorCode", "CloseCode", "Status", "error_name", "close_name",
           "status_name"]


class FrameType(enum.IntEnum):
    """Frame type bytes (spec 4.1)."""

    ENROLL_INIT = 0x01
    ENROLL_REPLY = 0x02
    ENROLL_CONFIRM = 0x03
    ENROLL_DONE = 0x04
    HELLO = 0x10
    SERVER_AUTH = 0x11
    CLIENT_FINISH = 0x12
    SEALED_HELLO = 0x13
    SEALED_AUTH = 0x14
    ERROR = 0x1F
    REQUEST = 0x20
    RESPONSE = 0x21
    MESSAGE = 0x22
    PING = 0x23
    PONG = 0x24
    CLOSE = 0x25
    KEY_UPDATE = 0x26
    DELIVER = 0x27
    ACK = 0x28


SESSION_TYPES = frozenset(range(0x20, 0x29))

# DELIVER's kind byte (spec 4.5, 8.8).
DELIVER_REQUEST = 1
DELIVER_MESSAGE = 2


class ErrorCode(enum.IntEnum):
    """ERROR codes (spec 10.1): unauthenticated, sent by the server before a session."""

    UNSUPPORTED_VERSION = 0x0001
    MALFORMED = 0x0002
    AUTH_FAILED = 0x0003
    ENROLL_REFUSED = 0x0004
    ID_TAKEN = 0x0005
    BUSY = 0x0006
    TAKEOVER_REFUSED = 0x0007
    TIMEOUT = 0x0008
    INTERNAL = 0x0009
    MODE_REFUSED = 0x000A


class CloseCode(enum.IntEnum):
    """CLOSE codes (spec 10.2): authenticated, in a session. Unknown codes are valid."""

    NORMAL = 0x0000
    SHUTDOWN = 0x0001
    TAKEN_OVER = 0x0002
    REVOKED = 0x0003
    IDLE_TIMEOUT = 0x0004
    SEQUENCE_EXHAUSTED = 0x0005
    PROTOCOL_ERROR = 0x0006
    FRAME_TOO_LARGE = 0x0007
    REMOVED = 0x0008


class Status(enum.IntEnum):
    """RESPONSE statuses (spec 10.3); 256-65535 belong to the application."""

    OK = 0
    UNAVAILABLE = 1
    BACKEND_ERROR = 2
    TIMEOUT = 3
    REFUSED = 4


def error_name(code: int) -> str:
    """The name of an ERROR code; unknown codes are treated like MALFORMED (spec 10.1)."""
    try:
        return ErrorCode(code).name
    except ValueError:
        return f"MALFORMED (unknown code {code:#06x})"


def close_name(code: int) -> str:
    """The name of a CLOSE code; unknown codes are valid and mean "closed" (spec 10.2)."""
    try:
        return CloseCode(code).name
    except ValueError:
        return f"closed (code {code})"


def status_name(status: int) -> str:
    """The name of a RESPONSE status (spec 10.3)."""
    try:
        return Status(status).name
    except ValueError:
        return "application status" if status >= 256 else "reserved status"
