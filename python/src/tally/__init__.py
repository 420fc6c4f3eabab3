"""Tally client: enroll a device, then run encrypted (or authenticated-only) sessions with a
Tally server.

A second, independent implementation of ``spec/PROTOCOL.md`` (protocol version 1),
written from the spec and its test vectors alone::

    import tally
    cred = tally.enroll("127.0.0.1:7420", open("enroll.token").read(), "sensor-42")
    cred.save("sensor-42.cred")                       # once; mode 0600
    with tally.connect("sensor-42.cred") as session:  # every time; encrypted mode
        print(session.request(b"temperature?"))
    # tally.connect(cred, encryption=False): the authenticated mode (HMAC, in the clear)

Modules: :mod:`tally.client` (TCP: :func:`enroll`, :func:`connect`, :class:`Session`),
:mod:`tally.proto` (the state machines, without I/O), :mod:`tally.frames` (framing and
frame layouts), :mod:`tally.formats` (token and credential), :mod:`tally.errors`,
:mod:`tally.codes`.
"""
from .client import (DEFAULT_RETRIES, DEFAULT_TIMEOUT, IncomingDelivery, IncomingMessage,
                     IncomingRequest,
                     Response, Session, connect, enroll)
from .codes import CloseCode, ErrorCode, FrameType, Status
from .errors import (AuthFailed, Closed, EnrollUncertain, FormatError, InsecureCredential,
                     PayloadTooLarge, ProtocolError, Refused, SequenceExhausted, StatusError,
                     TallyError, Timeout, Truncated, Unreachable)
from .formats import Credential, EnrollmentToken

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = [
    "enroll", "connect", "Session", "Response", "IncomingRequest", "IncomingMessage",
    "IncomingDelivery",
    "Credential", "EnrollmentToken", "CloseCode", "ErrorCode", "FrameType", "Status",
    "TallyError", "ProtocolError", "AuthFailed", "Refused", "Closed", "Truncated", "Timeout",
    "StatusError", "PayloadTooLarge", "EnrollUncertain", "Unreachable", "FormatError",
    "SequenceExhausted", "InsecureCredential", "DEFAULT_TIMEOUT", "DEFAULT_RETRIES", "PROTOCOL_VERSION",
]
