"""The server's side of the handshakes, for the tests: built from the package's primitives
and frame functions (the package itself is a client). Spec 7.1, 7.2 rows 5 to 7, 7.7."""
import os
import struct

from tally import ProtocolError
from tally._primitives import H, aead_open, mac, x25519, x25519_base
from tally.codes import FrameType
from tally.frames import (SEALED_HELLO_HEAD_LEN, parse_hello, parse_sealed_hello,
                          parse_sealed_plaintext)
from tally.proto import SessionKeys, sealed_id_key, sealed_session_keys, session_keys


def before_tag(ty, fields):
    """A tagged frame up to its tag: the length counts the 32 tag bytes still to come."""
    return struct.pack(">IB", 1 + len(fields) + 32, ty) + fields


def open_sealed_hello(f, s_secret):
    """7.2 rows 5 to 5b and 7.7 step 2 on a SEALED_HELLO: returns
    ``(hello, id, max_frame_len, dh_es)``; ``id`` and ``max_frame_len`` are None when the
    sealed part does not open (7.5: answered like an unknown id). The plaintext is checked
    in 4.3's order: ``n`` and the id, the padding, the limit. Raises ``ProtocolError``
    (``malformed``, ``bad_id``, ``unsupported_version``, ``weak_key``)."""
    hello = parse_sealed_hello(f)
    dh_es = x25519(s_secret, hello.ephemeral)
    key_id = sealed_id_key(hello.ephemeral, x25519_base(s_secret), dh_es)
    try:
        plain = aead_open(key_id, bytes(12), f[:SEALED_HELLO_HEAD_LEN], hello.sealed)
    except ProtocolError:
        return hello, None, None, dh_es
    opened = parse_sealed_plaintext(plain)
    return hello, opened.id, opened.max_frame_len, dh_es


def sealed_auth(hello_frame, ephemeral, k, dh_es, max_frame_len=65536, keepalive_ms=30000,
                f_secret=None):
    """SEALED_AUTH for a SEALED_HELLO whose ``E`` is ``ephemeral``: ``(frame, keys)``."""
    f_secret = f_secret if f_secret is not None else os.urandom(32)
    F = x25519_base(f_secret)
    auth_u = before_tag(FrameType.SEALED_AUTH, F + struct.pack(">II", max_frame_len, keepalive_ms))
    th2 = H(hello_frame, auth_u)
    keys = sealed_session_keys(ephemeral, F, k, x25519(f_secret, ephemeral), dh_es, th2)
    return auth_u + mac(keys.server_finish, th2), keys


def server_auth(hello_frame, k, max_frame_len=65536, keepalive_ms=30000, ns=None):
    """SERVER_AUTH for a HELLO: ``(frame, keys)``."""
    hello = parse_hello(hello_frame)
    ns = ns if ns is not None else os.urandom(32)
    auth_u = before_tag(FrameType.SERVER_AUTH, ns + struct.pack(">II", max_frame_len, keepalive_ms))
    th2 = H(hello_frame, auth_u)
    keys = session_keys(hello.nonce, ns, k, th2)
    return auth_u + mac(keys.server_finish, th2), keys


def finish_verifies(keys: SessionKeys, hello_frame, auth_frame, finish) -> bool:
    from tally._primitives import tags_equal
    return (len(finish) == 37 and finish[4] == FrameType.CLIENT_FINISH
            and tags_equal(mac(keys.client_finish, H(hello_frame, auth_frame, finish[:5])),
                           finish[5:]))
