"""The exceptions of the Tally client.

Every exception derives from :class:`TallyError` and has an ``error`` attribute: the
error name of spec section 12.2 (``"bad_tag"``, ``"bad_sequence"``, ``"refused"``,
``"truncated"``, ...) where one applies, else ``None``.

==========================  ===============================================================
exception                   raised when
==========================  ===============================================================
:class:`AuthFailed`         the peer did not authenticate: SERVER_AUTH did not verify (wrong
                            key, unknown or revoked id, or not our server), the server
                            answered CLIENT_FINISH with ERROR ``AUTH_FAILED``, or, in an
                            enrollment, ENROLL_REPLY / ENROLL_DONE did not verify under the
                            pinned server key
:class:`Refused`            the server sent an ERROR frame (``code``), before a session;
                            e.g. ``ENROLL_REFUSED``, ``ID_TAKEN``, ``BUSY`` (after the
                            retries), ``TAKEOVER_REFUSED``
:class:`Closed`             the session ended with a CLOSE (``code``, ``reason``; ``by_peer``
                            says who sent it first)
:class:`Truncated`          the connection ended without CLOSE (EOF, reset), or an ERROR frame
                            arrived in a session (it can only have been injected: spec 8.3)
:class:`ProtocolError`      a frame broke a rule of the spec (``error`` names which)
:class:`Timeout`            no answer in time (also a :class:`TimeoutError`)
:class:`StatusError`        ``Session.request`` got a RESPONSE whose status is not OK
:class:`PayloadTooLarge`    a frame would exceed the peer's announced limit (the session goes
                            on; also a :class:`ValueError`)
:class:`EnrollUncertain`    the connection broke after ENROLL_CONFIRM was sent: the server may
                            or may not have stored the identity (spec 6.4)
:class:`Unreachable`        the TCP connection could not be made (also a
                            :class:`ConnectionError`)
:class:`FormatError`        an enrollment token or credential file is invalid (also a
                            :class:`ValueError`)
==========================  ===============================================================
"""
from .codes import CloseCode, ErrorCode, close_name, error_name, status_name

__all__ = ["TallyError", "ProtocolError", "AuthFailed", "Refused", "Closed", "Truncated",
           "Timeout", "StatusError", "PayloadTooLarge", "EnrollUncertain", "Unreachable",
           "FormatError", "SequenceExhausted"]


class TallyError(Exception):
    """Base class of every Tally error."""

    error = None


class ProtocolError(TallyError):
    """A received frame broke the protocol (spec 3.2, 4, 8.3).

    ``error`` is the spec 12.2 name: ``empty_frame``, ``frame_too_large``, ``malformed``,
    ``bad_id``, ``unsupported_version``, ``bad_tag``, ``bad_sequence``,
    ``unsolicited_answer``, ``delivery_order``, ``sequence_exhausted``, ``weak_key``. In a
    session the client answers it with CLOSE :attr:`close_code` and disconnects.
    """

    def __init__(self, error: str, detail: str = ""):
        super().__init__(f"{error}: {detail}" if detail else error)
        self.error = error
        self.detail = detail

    @property
    def close_code(self) -> int:
        """The CLOSE code a session receiver sends for this failure (spec 8.3)."""
        if self.error == "frame_too_large":
            return CloseCode.FRAME_TOO_LARGE
        return CloseCode.PROTOCOL_ERROR


class AuthFailed(TallyError):
    """The peer did not authenticate (see the module documentation).

    ``code`` is ``ErrorCode.AUTH_FAILED`` when the server said so with an ERROR frame,
    ``None`` when a tag from the server did not verify (``error == "bad_tag"``).
    """

    def __init__(self, message: str, code=None):
        super().__init__(message)
        self.code = code
        self.error = "refused" if code is not None else "bad_tag"


class Refused(TallyError):
    """The server refused with an (unauthenticated) ERROR frame.

    ``code`` is the raw code (compare with :class:`tally.ErrorCode`), ``name`` its name
    (unknown codes are treated like MALFORMED, spec 10.1), ``server_version`` the highest
    protocol version the server speaks (the ERROR frame's last byte).
    """

    error = "refused"

    def __init__(self, code: int, server_version=None, context: str = ""):
        self.code = code
        self.name = error_name(code)
        self.server_version = server_version
        msg = f"refused by the server: {self.name}"
        if code == ErrorCode.UNSUPPORTED_VERSION and server_version is not None:
            msg += f" (it speaks version {server_version} at most)"
        if code == ErrorCode.MODE_REFUSED:
            msg += (" (its policy does not accept this mode; the client does not switch modes "
                    "on its own, spec 7.8: choose the other mode only if you trust the path)")
        super().__init__(f"{context}: {msg}" if context else msg)

    @property
    def mode_refused(self) -> bool:
        """True for ``MODE_REFUSED``: the server's policy does not accept the mode of the
        first frame (spec 7.8). Never retried, and never answered by switching modes."""
        return self.code == ErrorCode.MODE_REFUSED

    @property
    def busy(self) -> bool:
        """True for ``BUSY``: try again later (with backoff; the client already did)."""
        return self.code == ErrorCode.BUSY


class Closed(TallyError):
    """The session ended with an authenticated CLOSE.

    ``code`` (compare with :class:`tally.CloseCode`; unknown codes are valid), ``reason``
    (for logs only), and ``by_peer``: True if the server closed first, False if this side
    did (``Session.close``, or a failure this side detected).
    """

    error = "closed"

    def __init__(self, code: int, reason: str = "", by_peer: bool = True):
        self.code = code
        self.name = close_name(code)
        self.reason = reason
        self.by_peer = by_peer
        who = "the server closed the session" if by_peer else "the session was closed"
        msg = f"{who}: {self.name}"
        if reason:
            msg += f" ({reason})"
        super().__init__(msg)


class Truncated(TallyError):
    """The connection ended without an authenticated CLOSE (spec 8.6): report it as cut."""

    error = "truncated"


class Timeout(TallyError, TimeoutError):
    """No answer in time (a handshake or enrollment frame, a request, a send, keepalive)."""


class StatusError(TallyError):
    """``Session.request`` got a RESPONSE with a status other than OK.

    ``status`` (compare with :class:`tally.Status`) and the response ``payload``.
    """

    def __init__(self, status: int, payload: bytes):
        self.status = status
        self.payload = payload
        text = payload[:200].decode("utf-8", "replace")
        super().__init__(f"request failed with status {status} ({status_name(status)})"
                         + (f": {text}" if text else ""))


class PayloadTooLarge(TallyError, ValueError):
    """The frame would exceed the limit the peer announced (spec 3.2). The session goes on."""


class EnrollUncertain(TallyError):
    """The connection broke after ENROLL_CONFIRM was sent and before ENROLL_DONE arrived.

    The server may have stored the identity (spec 6.4). ``credential`` holds the
    unconfirmed credential: a successful ``tally.connect(e.credential)`` proves it was
    stored; otherwise the operator removes the id (``tallyd remove ID``) and the device
    enrolls again. The client never retries an enrollment after ENROLL_CONFIRM.
    """

    def __init__(self, message: str, credential):
        super().__init__(message)
        self.credential = credential


class Unreachable(TallyError, ConnectionError):
    """The TCP connection to the server could not be made."""


class FormatError(TallyError, ValueError):
    """An enrollment token (spec 9.1) or a credential file (spec 9.2) is invalid."""


class InsecureCredential(TallyError, PermissionError):
    """A credential file that every user of the machine may read or write: its key lets
    anyone act as the device (``chmod 600`` it), as the ``tally`` CLI refuses it."""


class SequenceExhausted(TallyError):
    """This side's sequence numbers ran out (spec 8.1): only CLOSE may still be sent."""
