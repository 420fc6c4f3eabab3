"""Every value of spec/vectors/*.json reproduced by the package's own functions (spec 12).

Positive vectors: the key schedule, every frame of both enrollments and of the session,
byte for byte, with the fixed inputs in place of randomness. The client side runs the
package's state machines (ClientEnrollment, ClientHandshake, SessionState) and is fed the
server's frames from the vectors; the server's side of each value is recomputed with the
package's primitives and frame builders. Negative vectors: every case is fed to the
package's receiver for its state (the same FrameDecoder and SessionState the TCP client
uses; the parsers of HELLO and ENROLL_INIT for the server states), and both the error
and the reply (CLOSE code, ERROR frame, or nothing) are checked.

The encrypted mode (session-encrypted.json, spec 5.6, 5.7, 5.8, 7.7, 8.2): the client runs
ClientSealedHandshake with the fixed ephemeral secret, both sides' SessionStates seal and
open every frame (KEY_UPDATE included) byte for byte, and the server's side is recomputed
from the package's primitives (tests/scripted.py).
"""
import json
import os
import struct

import pytest

from tally import AuthFailed, ProtocolError, Refused, Truncated
from tally._primitives import (H, aead_open, aead_seal, hkdf, mac, tags_equal, x25519,
                               x25519_base)
from tally.codes import CloseCode, ErrorCode, FrameType
from tally.formats import EnrollmentToken
from tally.frames import (HANDSHAKE_LIMIT, FrameDecoder, error_frame, parse_enroll_init,
                          parse_hello, session_frame_unsigned, session_header)
from tally.proto import (ClientEnrollment, ClientHandshake, ClientSealedHandshake, SessionState,
                         enroll_init_tag, enroll_keys, next_key, sealed_session_keys,
                         session_keys, session_nonce)

from scripted import open_sealed_hello, sealed_auth

VECTORS = os.environ.get("TALLY_VECTORS") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "spec", "vectors")


def load(name):
    with open(os.path.join(VECTORS, name)) as fh:
        return json.load(fh)


HAVE_ENCRYPTED = os.path.exists(os.path.join(VECTORS, "session-encrypted.json"))
needs_encrypted = pytest.mark.skipif(not HAVE_ENCRYPTED,
                                     reason="spec/vectors/session-encrypted.json not generated yet")


def hx(s):
    return bytes.fromhex(s)


def before_tag(ty, fields):
    """A tagged frame up to its tag: the length counts the 32 tag bytes still to come."""
    return struct.pack(">IB", 1 + len(fields) + 32, ty) + fields


ENROLL_FILES = ["enroll-open.json", "enroll-token.json"]


def test_rfc7748_x25519():
    # RFC 7748 section 5.2, first vector: the X25519 in use is the real one.
    out = x25519(hx("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
                 hx("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c"))
    assert out.hex() == "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"


def test_rfc8439_chacha20_poly1305():
    # RFC 8439 section 2.8.2: the AEAD in use is ChaCha20-Poly1305 with 96-bit nonces.
    pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
          b"the future, sunscreen would be it.")
    key, nonce = bytes(range(0x80, 0xA0)), hx("070000004041424344454647")
    ad = hx("50515253c0c1c2c3c4c5c6c7")
    out = aead_seal(key, nonce, ad, pt)
    assert out[-16:].hex() == "1ae10b594f09e26a7e902ecbd0600691"
    assert out[:16].hex() == "d31a8d34648e60db7b86afbc53ef7ec2" and len(out) == len(pt) + 16
    assert aead_open(key, nonce, ad, out) == pt
    with pytest.raises(ProtocolError) as e:
        aead_open(key, nonce, ad + b"x", out)
    assert e.value.error == "bad_tag"


def test_hkdf_rfc5869_case1_first_block():
    # RFC 5869 test case 1, first 32 bytes of OKM (info || 0x01 is the first block).
    ikm = bytes([0x0B] * 22)
    salt = hx("000102030405060708090a0b0c")
    info = hx("f0f1f2f3f4f5f6f7f8f9")
    assert hkdf(salt, ikm, info).hex() == \
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"


# --- Enrollment (5.4, 6, 9.1) ---------------------------------------------------------------

@pytest.mark.parametrize("name", ENROLL_FILES)
def test_enrollment_vector(name):
    v = load(name)
    i, d = v["inputs"], v["derived"]
    frames = {f["name"]: f for f in v["frames"]}
    assert [f["name"] for f in v["frames"]] == ["ENROLL_INIT", "ENROLL_REPLY", "ENROLL_CONFIRM",
                                              "ENROLL_DONE"]
    assert [f["direction"] for f in v["frames"]] == ["c2s", "s2c", "c2s", "s2c"]
    c, s = hx(i["credential"]), hx(i["server_static_secret"])
    x, y = hx(i["client_ephemeral_secret"]), hx(i["server_ephemeral_secret"])
    S, Y = x25519_base(s), x25519_base(y)
    assert S.hex() == d["server_static_public"]
    assert Y.hex() == d["server_ephemeral_public"]

    # The token (9.1), formatted and parsed.
    token = EnrollmentToken(i["mode"], c, S)
    assert token.format() == d["token"]
    assert EnrollmentToken.parse(d["token"]) == token

    # The client, with x fixed, fed the server's frames of the vector.
    enr = ClientEnrollment(EnrollmentToken.parse(d["token"]), i["id"], ephemeral_secret=x)
    assert enr.ephemeral_public.hex() == d["client_ephemeral_public"]
    assert enr.th1.hex() == d["th1"]
    assert enr.init_frame[-32:].hex() == d["init_tag"]
    assert enr.init_frame.hex() == frames["ENROLL_INIT"]["hex"]
    confirm = enr.handle_reply(hx(frames["ENROLL_REPLY"]["hex"]))
    assert enr.dh_ee.hex() == d["dh_ee"] and enr.dh_es.hex() == d["dh_es"]
    assert enr.th2.hex() == d["th2"]
    assert enr.keys.server.hex() == d["key_server"]
    assert enr.keys.client.hex() == d["key_client"]
    assert enr.keys.done.hex() == d["key_done"]
    assert enr.th3.hex() == d["th3"]
    assert confirm.hex() == frames["ENROLL_CONFIRM"]["hex"]
    k = enr.handle_done(hx(frames["ENROLL_DONE"]["hex"]))
    assert enr.th4.hex() == d["th4"]
    assert k.hex() == d["identity_key"]
    assert enr.state == "enrolled"

    # The server's side of the same exchange, from the package's primitives and builders.
    init = hx(frames["ENROLL_INIT"]["hex"])
    parsed = parse_enroll_init(init)
    assert parsed.id == i["id"].encode() and parsed.mode == token.mode_byte
    assert tags_equal(enroll_init_tag(c, init[:-32]), parsed.tag)
    X = parsed.ephemeral
    assert x25519(y, X).hex() == d["dh_ee"]
    assert x25519(s, X).hex() == d["dh_es"]
    reply_u = before_tag(FrameType.ENROLL_REPLY, Y)
    th2 = H(init, reply_u)
    keys = enroll_keys(c, x25519(y, X), x25519(s, X), th2)
    reply = reply_u + mac(keys.server, th2)
    assert reply.hex() == frames["ENROLL_REPLY"]["hex"]
    done_u = struct.pack(">IB", 33, FrameType.ENROLL_DONE)
    th4 = H(init, reply, confirm, done_u)
    assert (done_u + mac(keys.done, th4)).hex() == frames["ENROLL_DONE"]["hex"]
    assert th4.hex() == d["th4"]
    assert tags_equal(mac(keys.client, H(init, reply, confirm[:5])), confirm[5:])


# --- Session (5.5, 7, 8) -------------------------------------------------------------------

def _client_handshake(v):
    i = v["inputs"]
    return ClientHandshake(i["id"], hx(i["identity_key"]), i["client_max_frame_len"],
                           nonce=hx(i["client_nonce"]))


def test_session_identity_key_is_the_enrolled_one():
    assert load("session.json")["inputs"]["identity_key"] == \
        load("enroll-open.json")["derived"]["identity_key"]


def test_session_handshake_vector():
    v = load("session.json")
    i, d = v["inputs"], v["derived"]
    hs_frames = {f["name"]: f for f in v["handshake"]}
    assert [f["name"] for f in v["handshake"]] == ["HELLO", "SERVER_AUTH", "CLIENT_FINISH"]
    hs = _client_handshake(v)
    assert hs.hello.hex() == hs_frames["HELLO"]["hex"]
    finish = hs.handle_server_auth(hx(hs_frames["SERVER_AUTH"]["hex"]))
    assert hs.th2.hex() == d["th2"]
    assert hs.th3.hex() == d["th3"]
    assert hs.keys.c2s.hex() == d["key_c2s"]
    assert hs.keys.s2c.hex() == d["key_s2c"]
    assert hs.keys.server_finish.hex() == d["key_server_finish"]
    assert hs.keys.client_finish.hex() == d["key_client_finish"]
    assert finish.hex() == hs_frames["CLIENT_FINISH"]["hex"]
    assert hs.server_max_frame_len == i["server_max_frame_len"]
    assert hs.keepalive_ms == i["server_keepalive_ms"]
    assert hs.session.send_limit == i["server_max_frame_len"]
    assert hs.session.recv_limit == i["client_max_frame_len"]

    # The server's side: HELLO parsed, SERVER_AUTH built from the package's functions.
    hello = parse_hello(hx(hs_frames["HELLO"]["hex"]))
    assert hello.id == i["id"].encode() and hello.max_frame_len == i["client_max_frame_len"]
    ns = hx(i["server_nonce"])
    auth_u = before_tag(FrameType.SERVER_AUTH, ns + struct.pack(
        ">II", i["server_max_frame_len"], i["server_keepalive_ms"]))
    th2 = H(hx(hs_frames["HELLO"]["hex"]), auth_u)
    keys = session_keys(hello.nonce, ns, hx(i["identity_key"]), th2)
    assert (auth_u + mac(keys.server_finish, th2)).hex() == hs_frames["SERVER_AUTH"]["hex"]
    th3 = H(hx(hs_frames["HELLO"]["hex"]), hx(hs_frames["SERVER_AUTH"]["hex"]), finish[:5])
    assert tags_equal(mac(keys.client_finish, th3), finish[5:])


def _session_pair(v):
    """The client's SessionState from the handshake, and the server's with the same keys."""
    i = v["inputs"]
    hs = _client_handshake(v)
    hs.handle_server_auth(hx(v["handshake"][1]["hex"]))
    client = hs.session
    server = SessionState(hs.keys.s2c, hs.keys.c2s, send_limit=i["client_max_frame_len"],
                          recv_limit=i["server_max_frame_len"], client=False)
    return client, server


def _send(side, f):
    """Build the vector frame ``f`` with the sender's own SessionState."""
    t = f["type"]
    if t == "REQUEST":
        seq, out = side.request(hx(f["payload"]))
    elif t == "RESPONSE":
        out = side.response(f["req_seq"], f["status"], hx(f["payload"]))
    elif t == "MESSAGE":
        out = side.message(hx(f["payload"]))
    elif t == "PING":
        seq, out = side.ping()
    elif t == "PONG":
        out = side.pong(f["ping_seq"])
    elif t == "CLOSE":
        out = side.close(f["code"], f["reason"])
    elif t == "KEY_UPDATE":
        out = side.key_update()
    elif t == "DELIVER":
        out = side.deliver(f["msg_id"], f["kind"], hx(f["payload"]))
    elif t == "ACK":
        out = side.ack(f["msg_id"], f["status"], hx(f["payload"]))
    else:
        raise AssertionError(t)
    return out


def _feed(side, data):
    """Receive bytes the way the TCP client does: the decoder, then SessionState.receive."""
    dec = FrameDecoder(side.recv_limit)
    return [side.receive(f) for f in dec.feed(data)]


def test_session_frames_vector():
    v = load("session.json")
    client, server = _session_pair(v)
    assert {f["type"] for f in v["frames"]} == {"REQUEST", "RESPONSE", "MESSAGE", "PING", "PONG",
                                               "CLOSE", "DELIVER", "ACK"}
    for n, f in enumerate(v["frames"], 1):
        sender, receiver = (client, server) if f["direction"] == "c2s" else (server, client)
        out = _send(sender, f)
        assert out.hex() == f["hex"], f"frame {n} ({f['direction']} {f['type']})"
        (got,) = _feed(receiver, out)
        assert got.seq == f["seq"]
        assert got.type == FrameType[f["type"]]
        if "payload" in f:
            assert got.payload.hex() == f["payload"]
        for field in ("req_seq", "status", "ping_seq", "code", "reason", "msg_id", "kind"):
            if field in f:
                assert getattr(got, field) == f[field], (n, field)
    assert client.close_sent and client.close_received
    assert server.close_sent and server.close_received
    assert not client.pending_requests and not server.pending_requests
    assert not client.pending_pings and not server.pending_pings
    assert not client.deliveries and not server.deliveries


def test_session_frames_vector_built_from_layout():
    # The same frames from the layout of 4.5 alone (length || type || seq || fields || tag).
    v = load("session.json")
    client, _ = _session_pair(v)
    keys = {"c2s": client._send_key, "s2c": client._recv_key}
    for f in v["frames"]:
        t = f["type"]
        fields = {
            "REQUEST": lambda: hx(f["payload"]), "MESSAGE": lambda: hx(f["payload"]),
            "RESPONSE": lambda: struct.pack(">QH", f["req_seq"], f["status"]) + hx(f["payload"]),
            "PING": lambda: b"", "PONG": lambda: struct.pack(">Q", f["ping_seq"]),
            "CLOSE": lambda: struct.pack(">H", f["code"]) + f["reason"].encode(),
            "DELIVER": lambda: struct.pack(">QB", f["msg_id"], f["kind"]) + hx(f["payload"]),
            "ACK": lambda: struct.pack(">QH", f["msg_id"], f["status"]) + hx(f["payload"]),
        }[t]()
        unsigned = session_frame_unsigned(FrameType[t], f["seq"], fields)
        assert (unsigned + mac(keys[f["direction"]], unsigned)).hex() == f["hex"]


# --- Session, encrypted mode (5.6, 5.7, 5.8, 7.7, 8.2, 8.7) ------------------------------------

def _sealed_client_handshake(v):
    i = v["inputs"]
    S = x25519_base(hx(i["server_static_secret"]))
    return ClientSealedHandshake(i["id"], hx(i["identity_key"]), S, i["client_max_frame_len"],
                                 ephemeral_secret=hx(i["client_ephemeral_secret"]))


def _sealed_session_pair(v):
    i = v["inputs"]
    hs = _sealed_client_handshake(v)
    hs.handle_server_auth(hx(v["handshake"][1]["hex"]))
    client = hs.session
    server = SessionState(hs.keys.s2c, hs.keys.c2s, send_limit=i["client_max_frame_len"],
                          recv_limit=i["server_max_frame_len"], client=False, encrypted=True)
    return client, server


@needs_encrypted
def test_encrypted_inputs_are_the_fixed_ones():
    v, plain = load("session-encrypted.json"), load("session.json")
    i = v["inputs"]
    # Spec 12: s = 20..3f, e = 90..af, f = b0..cf; identity key and limits as session.json.
    assert i["server_static_secret"] == bytes(range(0x20, 0x40)).hex()
    assert i["client_ephemeral_secret"] == bytes(range(0x90, 0xB0)).hex()
    assert i["server_ephemeral_secret"] == bytes(range(0xB0, 0xD0)).hex()
    for n in ("id", "identity_key", "client_max_frame_len", "server_max_frame_len",
              "server_keepalive_ms"):
        assert i[n] == plain["inputs"][n], n


@needs_encrypted
def test_encrypted_handshake_vector():
    v = load("session-encrypted.json")
    i, d = v["inputs"], v["derived"]
    assert [f["name"] for f in v["handshake"]] == ["SEALED_HELLO", "SEALED_AUTH", "CLIENT_FINISH"]
    assert [f["direction"] for f in v["handshake"]] == ["c2s", "s2c", "c2s"]
    hello_hex, auth_hex, finish_hex = (f["hex"] for f in v["handshake"])
    hs = _sealed_client_handshake(v)
    assert hs.server_key.hex() == d["server_static_public"]
    assert hs.ephemeral_public.hex() == d["client_ephemeral_public"]
    assert hs.dh_es.hex() == d["dh_es"]
    assert hs.key_id.hex() == d["key_id"]
    assert hs.sealed_plaintext.hex() == d["sealed_plaintext"]
    # 4.3: only E is in the clear after the version; the limit is sealed with the id.
    assert hs.hello[:38] == bytes.fromhex("0000007713" "01") + hs.ephemeral_public
    assert hs.sealed_plaintext[65:] == i["client_max_frame_len"].to_bytes(4, "big")
    assert len(hs.hello) == 123
    assert hs.hello.hex() == hello_hex
    finish = hs.handle_server_auth(hx(auth_hex))
    assert hs.dh_ee.hex() == d["dh_ee"]
    assert hs.th2.hex() == d["th2"] and hs.th3.hex() == d["th3"]
    assert hs.keys.c2s.hex() == d["key_c2s"]
    assert hs.keys.s2c.hex() == d["key_s2c"]
    assert hs.keys.server_finish.hex() == d["key_server_finish"]
    assert hs.keys.client_finish.hex() == d["key_client_finish"]
    assert next_key(hs.keys.c2s).hex() == d["key_c2s_updated"]
    assert next_key(hs.keys.s2c).hex() == d["key_s2c_updated"]
    assert finish.hex() == finish_hex
    assert hs._e is None  # e erased (7.7 step 3)
    assert hs.session.encrypted and hs.session.send_limit == i["server_max_frame_len"]

    # The server's side: the id opened with s, SEALED_AUTH rebuilt with f.
    s_secret = hx(i["server_static_secret"])
    hello, ident, limit, dh_es = open_sealed_hello(hx(hello_hex), s_secret)
    assert ident == i["id"].encode() and dh_es.hex() == d["dh_es"]
    assert limit == i["client_max_frame_len"]
    assert x25519_base(hx(i["server_ephemeral_secret"])).hex() == d["server_ephemeral_public"]
    auth, keys = sealed_auth(hx(hello_hex), hello.ephemeral, hx(i["identity_key"]), dh_es,
                             i["server_max_frame_len"], i["server_keepalive_ms"],
                             f_secret=hx(i["server_ephemeral_secret"]))
    assert auth.hex() == auth_hex
    assert keys == hs.keys
    assert tags_equal(mac(keys.client_finish, H(hx(hello_hex), auth, finish[:5])), finish[5:])


@needs_encrypted
def test_encrypted_session_frames_vector():
    v = load("session-encrypted.json")
    client, server = _sealed_session_pair(v)
    types = {f["type"] for f in v["frames"]}
    assert types == {"REQUEST", "RESPONSE", "MESSAGE", "PING", "PONG", "CLOSE", "KEY_UPDATE",
                     "DELIVER", "ACK"}
    updates = {"c2s": 0, "s2c": 0}
    for n, f in enumerate(v["frames"], 1):
        sender, receiver = (client, server) if f["direction"] == "c2s" else (server, client)
        out = _send(sender, f)
        assert out.hex() == f["hex"], f"frame {n} ({f['direction']} {f['type']})"
        assert session_nonce(f["direction"] == "c2s", f["seq"]).hex() == f["nonce"]
        (got,) = _feed(receiver, out)
        assert got.seq == f["seq"] and got.type == FrameType[f["type"]]
        if "payload" in f:
            assert got.payload.hex() == f["payload"]
        for field in ("req_seq", "status", "ping_seq", "code", "reason", "msg_id", "kind"):
            if field in f:
                assert getattr(got, field) == f[field], (n, field)
        if f["type"] == "KEY_UPDATE":
            updates[f["direction"]] += 1
    assert updates["c2s"] >= 1 and updates["s2c"] >= 1
    assert client.key_updates_sent == updates["c2s"] == server.key_updates_received
    assert server.key_updates_sent == updates["s2c"] == client.key_updates_received
    assert client.close_sent and client.close_received


@needs_encrypted
def test_encrypted_session_frames_built_from_layout():
    # 8.2 alone: header || AEAD(K, u32 direction || u64 seq, header, fields); 5.8 after
    # each KEY_UPDATE of that direction.
    v = load("session-encrypted.json")
    d = v["derived"]
    keys = {"c2s": hx(d["key_c2s"]), "s2c": hx(d["key_s2c"])}
    for f in v["frames"]:
        t = f["type"]
        fields = {
            "REQUEST": lambda: hx(f["payload"]), "MESSAGE": lambda: hx(f["payload"]),
            "RESPONSE": lambda: struct.pack(">QH", f["req_seq"], f["status"]) + hx(f["payload"]),
            "PING": lambda: b"", "KEY_UPDATE": lambda: b"",
            "PONG": lambda: struct.pack(">Q", f["ping_seq"]),
            "CLOSE": lambda: struct.pack(">H", f["code"]) + f["reason"].encode(),
            "DELIVER": lambda: struct.pack(">QB", f["msg_id"], f["kind"]) + hx(f["payload"]),
            "ACK": lambda: struct.pack(">QH", f["msg_id"], f["status"]) + hx(f["payload"]),
        }[t]()
        nonce = struct.pack(">IQ", 0 if f["direction"] == "c2s" else 1, f["seq"])
        assert nonce.hex() == f["nonce"]
        header = struct.pack(">IBQ", 9 + len(fields) + 16, FrameType[t], f["seq"])
        assert (header + aead_seal(keys[f["direction"]], nonce, header, fields)).hex() == f["hex"]
        if t == "KEY_UPDATE":
            keys[f["direction"]] = hkdf(b"", keys[f["direction"]], b"tally/1 key update")


def _sealed_hello_with(plain: bytes):
    """session-encrypted.json's SEALED_HELLO with its sealed part replaced by ``plain``,
    sealed under the same K_id (it opens: the plaintext checks of 7.2 row 5b apply)."""
    v = load("session-encrypted.json")
    i, d = v["inputs"], v["derived"]
    head = struct.pack(">IBB", 119, 0x13, 1) + hx(d["client_ephemeral_public"])
    return head + aead_seal(hx(d["key_id"]), bytes(12), head, plain), hx(i["server_static_secret"])


@needs_encrypted
@pytest.mark.parametrize("plain, error, detail", [
    # 4.3's order: n and the id (bad_id) before the padding, the padding before the limit.
    (b"\x00" + bytes(64) + struct.pack(">I", 100), "bad_id", "length 0"),
    (b"\x41" + bytes(64) + struct.pack(">I", 65536), "bad_id", "length 65"),
    (b"\x02a " + bytes(62) + struct.pack(">I", 65536), "bad_id", "identity"),
    (b"\x02a b" + bytes(61) + struct.pack(">I", 255), "bad_id", "identity"),
    (b"\x01a" + bytes(62) + b"\x01" + struct.pack(">I", 255), "malformed", "padding"),
    (b"\x01a" + bytes(63) + struct.pack(">I", 255), "malformed", "max_frame_len 255"),
    (b"\x01a" + bytes(63) + struct.pack(">I", 2**24 + 1), "malformed", "max_frame_len 16777217"),
])
def test_the_sealed_plaintext_is_checked_in_the_spec_order(plain, error, detail):
    f, s_secret = _sealed_hello_with(plain)
    assert len(f) == 123
    with pytest.raises(ProtocolError) as e:
        open_sealed_hello(f, s_secret)
    assert e.value.error == error and detail in e.value.detail, e.value


@needs_encrypted
@pytest.mark.parametrize("limit", [256, 65536, 2**24])
def test_the_sealed_limit_is_read_from_the_plaintext(limit):
    f, s_secret = _sealed_hello_with(b"\x40" + b"x" * 64 + struct.pack(">I", limit))
    _, ident, got, _ = open_sealed_hello(f, s_secret)
    assert ident == b"x" * 64 and got == limit


def test_sealed_hello_shows_nothing_of_the_device():
    """P11 (4.3): two SEALED_HELLOs of different ids and limits differ only in E and the
    sealed bytes; the head is the same 6 bytes before E."""
    a = ClientSealedHandshake("a", bytes(32), x25519_base(bytes(range(32))), 256)
    b = ClientSealedHandshake("b" * 64, bytes(32), x25519_base(bytes(range(32))), 2**24)
    assert len(a.hello) == len(b.hello) == 123
    assert a.hello[:6] == b.hello[:6] == bytes.fromhex("000000771301")
    assert a.hello[6:38] == a.ephemeral_public and b.hello[6:38] == b.ephemeral_public
    assert struct.pack(">I", 2**24) not in b.hello[:38]
    assert len(a.sealed_plaintext) == 69 and a.sealed_plaintext[-4:] == struct.pack(">I", 256)


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@needs_encrypted
def test_the_key_update_timer_of_the_encrypted_mode():
    """8.7: the timer fires 600 s after the sending key sealed its first frame (not after a
    key that sealed nothing), with a KEY_UPDATE of its own that the peer follows."""
    v = load("session-encrypted.json")
    client, server = _sealed_session_pair(v)
    clock = _Clock()
    client._clock = clock
    assert client.key_update_seconds == 600.0
    assert client.key_update_deadline() is None and client.timed_key_update() is None
    m = client.message(b"one")
    assert client.key_update_deadline() == 1600.0
    _feed(server, m)
    clock.t = 1599.9
    assert client.timed_key_update() is None and not client.key_update_due()
    clock.t = 1600.0  # "10 minutes ago": at that moment
    ku = client.timed_key_update()
    assert ku is not None and len(ku) == 4 + 25 and ku[4] == FrameType.KEY_UPDATE
    (got,) = _feed(server, ku)
    assert got.type == FrameType.KEY_UPDATE and server.key_updates_received == 1
    # The new key has sealed nothing: it does not age.
    assert client.key_update_deadline() is None
    clock.t = 5000.0
    assert client.timed_key_update() is None
    m = client.message(b"two")
    assert len(m) == 4 + 25 + 3  # no KEY_UPDATE before it: the new key was not due
    assert client.key_update_deadline() == 5600.0
    assert _feed(server, m)[0].payload == b"two"
    # Before a frame, a key found due is updated too (the timer came late).
    clock.t = 5600.0
    both = client.message(b"three")
    assert both[4] == FrameType.KEY_UPDATE and client.key_updates_sent == 2
    assert [f.type for f in _feed(server, both)] == [FrameType.KEY_UPDATE, FrameType.MESSAGE]


@needs_encrypted
def test_no_key_update_at_the_last_two_sequence_numbers():
    """8.7: a side whose next sequence number is 2^64 - 2 or more sends no KEY_UPDATE
    (those are the frame's own and CLOSE's); 2^64 - 3 may still take one."""
    from tally import SequenceExhausted
    v = load("session-encrypted.json")
    client, server = _sealed_session_pair(v)
    clock = _Clock()
    client._clock = clock
    client.message(b"x")
    client.next_seq = 2**64 - 3
    clock.t += 600
    assert client.key_update_deadline() is not None
    ku = client.timed_key_update()
    assert struct.unpack(">Q", ku[5:13])[0] == 2**64 - 3
    client.message(b"y")  # the new key's first frame, at 2^64 - 2
    clock.t += 600
    assert client.next_seq == 2**64 - 1
    assert client.key_update_deadline() is None and client.timed_key_update() is None
    with pytest.raises(SequenceExhausted):
        client.key_update()
    client.next_seq = 2**64 - 2
    assert client.key_update_deadline() is None and client.timed_key_update() is None
    with pytest.raises(SequenceExhausted):
        client.key_update()
    # Due before a frame, but no number for a KEY_UPDATE: the frame goes alone.
    f = client.message(b"z")
    assert f[4] == FrameType.MESSAGE and struct.unpack(">Q", f[5:13])[0] == 2**64 - 2


def test_no_key_update_timer_in_the_authenticated_mode():
    client, _ = _session_pair(load("session.json"))
    clock = _Clock()
    client._clock = clock
    client.message(b"x")
    clock.t += 10_000
    assert client.key_update_deadline() is None and client.timed_key_update() is None


def test_key_update_in_the_authenticated_mode():
    # 8.7: valid in both modes; in the authenticated mode it moves the HMAC key.
    v = load("session.json")
    client, server = _session_pair(v)
    k0 = client._send_key
    ku = client.key_update()
    assert len(ku) == 4 + 41 and ku[4] == FrameType.KEY_UPDATE
    assert client._send_key == next_key(k0)
    (got,) = _feed(server, ku)
    assert got.type == FrameType.KEY_UPDATE and server.key_updates_received == 1
    m = client.message(b"after")
    assert tags_equal(mac(next_key(k0), m[:-32]), m[-32:])
    assert _feed(server, m)[0].payload == b"after"
    # The next frame tagged with the old key is refused (8.3: a key left behind).
    old = session_frame_unsigned(FrameType.MESSAGE, server.last_received + 1, b"old")
    with pytest.raises(ProtocolError) as e:
        _feed(server, old + mac(k0, old))
    assert e.value.error == "bad_tag"
    # And a KEY_UPDATE with fields is malformed (4.5: it has none).
    ku = session_frame_unsigned(FrameType.KEY_UPDATE, server.last_received + 1, b"x")
    with pytest.raises(ProtocolError) as e:
        _feed(server, ku + mac(server._recv_key, ku))
    assert e.value.error == "malformed"


def test_an_error_of_any_length_is_a_refusal_before_the_session():
    """Spec 4.4: ERROR is recognised by its type byte alone; one that is not 4 bytes long
    reads as code MALFORMED and is `refused`, not `malformed` (9 bytes here)."""
    from tally import Refused
    odd = bytes.fromhex("000000051f00030100")
    hs = ClientHandshake("sensor-42", bytes(32))
    with pytest.raises(Refused) as e:
        hs.handle_server_auth(odd)
    assert e.value.code == ErrorCode.MALFORMED
    enr = ClientEnrollment(EnrollmentToken.parse(load("enroll-open.json")["derived"]["token"]),
                           "sensor-42")
    with pytest.raises(Refused) as e:
        enr.handle_reply(odd)
    assert e.value.code == ErrorCode.MALFORMED


# --- Tokens and credentials (9) --------------------------------------------------------------

def test_token_reader_rules():
    d = load("enroll-token.json")["derived"]["token"]
    tok = EnrollmentToken.parse(d)
    assert EnrollmentToken.parse("  \n" + d.upper().replace("TALLY1-TOKEN-", "tally1-token-") +
                                 "\r\n ") == tok
    from tally import FormatError
    for bad in [d.upper(), d[:-1], d + "0", d.replace("-token-", "-open2-"), d.replace("-", "_"),
                "x" + d, d[:-2] + "g0", d + " extra",
                # Whitespace is space, tab, LF and CR only (spec 9.1).
                "\u00a0" + d, d + "\u2003", "\x0b" + d, d + "\x0c"]:
        with pytest.raises(FormatError):
            EnrollmentToken.parse(bad)


def test_credential_round_trip_and_reader_rules(tmp_path):
    from tally import Credential, FormatError
    k = hx(load("enroll-open.json")["derived"]["identity_key"])
    S = hx(load("enroll-open.json")["derived"]["server_static_public"])
    cred = Credential("sensor-42", k, "127.0.0.1:7420", S)
    text = cred.format()
    assert text == (
        "# Tally device credential (spec/PROTOCOL.md section 9.2). Secret: keep it mode 0600.\n"
        "tally-credential = 1\n"
        'id = "sensor-42"\n'
        f'key = "{k.hex()}"\n'
        'server = "127.0.0.1:7420"\n'
        f'server-key = "{S.hex()}"\n')
    assert Credential.parse(text) == cred
    assert k.hex() not in repr(cred) and k.hex() not in str(cred)
    path = tmp_path / "c.cred"
    old = os.umask(0)
    try:
        cred.save(path)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Credential.load(path) == cred
    # One every user may read is refused, as the tally CLI refuses it (issue 27).
    from tally import InsecureCredential
    os.chmod(path, 0o644)
    with pytest.raises(InsecureCredential, match="chmod 600"):
        Credential.load(path)
    os.chmod(path, 0o640)
    assert Credential.load(path) == cred
    cred.save(path)  # replaced atomically
    assert sorted(os.listdir(tmp_path)) == ["c.cred"]
    # Upper-case hex, other TOML spellings, unknown keys.
    assert Credential.parse(text.replace(k.hex(), k.hex().upper())) == cred
    assert Credential.parse(text.replace(S.hex(), S.hex().upper())) == cred
    assert Credential.parse("tally-credential=1\nid='sensor-42'  # x\n"
                            f'key = "{k.hex()}"\nserver = "127.0.0.1:7420"\nextra = 5\n'
                            f'server-key = "{S.hex()}"\n') == cred
    # 9.2: all five entries are required; a credential without S cannot be written.
    no_s = "".join(l + "\n" for l in text.splitlines() if not l.startswith("server-key"))
    with pytest.raises(FormatError, match="server-key"):
        Credential.parse(no_s)
    with pytest.raises(FormatError):
        Credential("sensor-42", k, "127.0.0.1:7420").format()
    for bad in [text.replace("= 1", "= 2"), text.replace("= 1", '= "1"'),
                text.replace("sensor-42", "sensor 42"), text.replace("sensor-42", ""),
                text.replace("sensor-42", "s" * 65), text.replace(k.hex(), k.hex()[:-1]),
                text.replace(k.hex(), k.hex()[:-1] + "g"), text.replace("server", "#"),
                text.replace(S.hex(), S.hex()[:-1]), text.replace(S.hex(), S.hex()[:-1] + "g"),
                text.replace("server-key", "server_key"),
                text + "[table]\n", text + 'id = "again"\n', "garbage"]:
        with pytest.raises(FormatError):
            Credential.parse(bad)


def _with_last_byte(key: bytes, last: int) -> bytes:
    return key[:31] + bytes([last])


@pytest.mark.parametrize("last", [0x80, 0x81, 0xAB, 0xFF])
def test_a_server_key_with_its_top_bit_set_is_refused(last):
    """9.1, 9.2: S is canonical (the top bit of its last byte clear); a token or a credential
    file whose S has it set is refused, in either case of hex digits."""
    from tally import Credential, FormatError
    tok = load("enroll-token.json")["derived"]["token"]
    S = EnrollmentToken.parse(tok).server_key
    assert S[31] < 0x80  # the vectors' S is canonical (X25519 outputs are)
    bad_s = _with_last_byte(S, last)
    for bad in [tok.replace(S.hex(), bad_s.hex()), tok.replace(S.hex(), bad_s.hex().upper())]:
        with pytest.raises(FormatError, match="canonical"):
            EnrollmentToken.parse(bad)
    k = hx(load("enroll-open.json")["derived"]["identity_key"])
    text = Credential("sensor-42", k, "127.0.0.1:7420", S).format()
    for bad in [text.replace(S.hex(), bad_s.hex()), text.replace(S.hex(), bad_s.hex().upper())]:
        with pytest.raises(FormatError, match="canonical"):
            Credential.parse(bad)


@pytest.mark.parametrize("last", [0x00, 0x7F])
def test_a_server_key_with_its_top_bit_clear_is_read(last):
    from tally import Credential
    tok = load("enroll-token.json")["derived"]["token"]
    S = EnrollmentToken.parse(tok).server_key
    good_s = _with_last_byte(S, last)
    assert EnrollmentToken.parse(tok.replace(S.hex(), good_s.hex())).server_key == good_s
    k = hx(load("enroll-open.json")["derived"]["identity_key"])
    cred = Credential("sensor-42", k, "127.0.0.1:7420", good_s)
    assert Credential.parse(cred.format()) == cred


# --- Negative vectors (12.2) ------------------------------------------------------------------

NEGATIVE = load("negative.json")["cases"]


def _error_name(e):
    assert isinstance(e, (ProtocolError, AuthFailed, Refused, Truncated)), repr(e)
    return e.error


def _session_receiver(case):
    """A SessionState after the case's ``after_frames`` frames of session.json (or of
    session-encrypted.json for the ``*_encrypted`` states)."""
    state = case["receiver"]["state"]
    if state.endswith("_encrypted"):
        v = load("session-encrypted.json")
        client, server = _sealed_session_pair(v)
    else:
        v = load("session.json")
        client, server = _session_pair(v)
    side = client if state.startswith("client_") else server
    for f in v["frames"][:case["receiver"]["after_frames"]]:
        sender, receiver = (client, server) if f["direction"] == "c2s" else (server, client)
        out = _send(sender, f)
        assert out.hex() == f["hex"]
        _feed(receiver, out)
    if "last_received" in case["receiver"]:
        side.last_received = int(case["receiver"]["last_received"])
    return side


def _server_await_hello(case, data):
    """The server of both session files (12.2): rows 1 to 7 of 7.2, with its policy (7.8)."""
    policy = case["receiver"].get("policy", "allowed")
    assert policy in ("required", "allowed", "off")
    (f,) = list(FrameDecoder(HANDSHAKE_LIMIT).feed(data))
    ty = f[4]
    if ty not in (FrameType.HELLO, FrameType.SEALED_HELLO) or len(f) < 6:
        raise ProtocolError("malformed", "not a HELLO or SEALED_HELLO with a version byte")
    if f[5] != 1:
        raise ProtocolError("unsupported_version", f"version {f[5]}")
    sealed = ty == FrameType.SEALED_HELLO
    if (sealed and policy == "off") or (not sealed and policy == "required"):
        raise ProtocolError("mode_refused", f"policy {policy}")            # row 4a
    if not sealed:
        parse_hello(f)
        return
    s_secret = hx(load("session-encrypted.json")["inputs"]["server_static_secret"])
    open_sealed_hello(f, s_secret)   # rows 5, 5a, 5b; a sealed_id that does not open is row 7


def _server_enroll_init(case, data):
    """A server holding EK of enroll-open.json and T of enroll-token.json for sensor-42."""
    opn, tok = load("enroll-open.json")["inputs"], load("enroll-token.json")["inputs"]
    open_ok = case["receiver"].get("open_enrollment", True)
    dec = FrameDecoder(HANDSHAKE_LIMIT)
    (f,) = list(dec.feed(data))
    init = parse_enroll_init(f)
    if init.mode == 0 and not open_ok:
        raise ProtocolError("open_mode_disabled", "open mode refused")
    if init.mode == 0:
        c = hx(opn["credential"])
    elif init.id == tok["id"].encode():
        c = hx(tok["credential"])
    else:
        c = os.urandom(32)  # no token for this id: a random filler key (6.1)
    if not tags_equal(enroll_init_tag(c, f[:-32]), init.tag):
        raise ProtocolError("bad_tag", "ENROLL_INIT tag")


# The ERROR a server sends for each refusal before a session (6.3, 7.2, 10.1).
SERVER_ERROR_CODE = {"unsupported_version": ErrorCode.UNSUPPORTED_VERSION,
                     "bad_id": ErrorCode.MALFORMED, "malformed": ErrorCode.MALFORMED,
                     "empty_frame": ErrorCode.MALFORMED, "frame_too_large": ErrorCode.MALFORMED,
                     "weak_key": ErrorCode.MALFORMED,   # 7.2 row 5a
                     "mode_refused": ErrorCode.MODE_REFUSED,
                     "bad_tag": ErrorCode.ENROLL_REFUSED,
                     "open_mode_disabled": ErrorCode.ENROLL_REFUSED}

SESSION_STATES = ("server_session", "client_session", "server_session_encrypted",
                  "client_session_encrypted")


def run_case(case):
    """Returns (error name, reply) where reply is like the vector's ``reply``."""
    state = case["receiver"]["state"]
    data = hx(case["input"])
    try:
        if state in SESSION_STATES:
            side = _session_receiver(case)
            _feed(side, data)
        elif state == "client_await_server_auth":
            hs = _client_handshake(load("session.json"))
            (f,) = list(FrameDecoder(HANDSHAKE_LIMIT).feed(data))
            hs.handle_server_auth(f)
        elif state == "client_await_sealed_auth":
            hs = _sealed_client_handshake(load("session-encrypted.json"))
            assert hs.hello.hex() == load("session-encrypted.json")["handshake"][0]["hex"]
            (f,) = list(FrameDecoder(HANDSHAKE_LIMIT).feed(data))
            hs.handle_server_auth(f)
        elif state == "server_await_hello":
            _server_await_hello(case, data)
        elif state == "server_await_enroll_init":
            _server_enroll_init(case, data)
        elif state == "client_await_enroll_reply":
            enr_v = load("enroll-open.json")
            enr = ClientEnrollment(EnrollmentToken.parse(enr_v["derived"]["token"]),
                                   enr_v["inputs"]["id"],
                                   ephemeral_secret=hx(enr_v["inputs"]["client_ephemeral_secret"]))
            assert enr.init_frame.hex() == enr_v["frames"][0]["hex"]
            (f,) = list(FrameDecoder(HANDSHAKE_LIMIT).feed(data))
            enr.handle_reply(f)
        else:
            raise AssertionError(f"unknown receiver state {state}")
    except (ProtocolError, AuthFailed, Refused, Truncated) as e:
        name = _error_name(e)
        if state in SESSION_STATES:
            # 8.3: CLOSE after a failed check; nothing after an ERROR frame.
            reply = {"close": True} if isinstance(e, (Refused, AuthFailed, Truncated)) \
                else {"close_code": int(e.close_code)}
        elif state.startswith("server_"):
            reply = {"error_frame": error_frame(SERVER_ERROR_CODE[name]).hex()}
        else:
            reply = {"close": True}  # a client before a session just closes (7.4)
        return name, reply
    return "accepted", None


def test_every_error_name_has_a_case():
    names = {c["error"] for c in NEGATIVE}
    want = {"empty_frame", "frame_too_large", "malformed", "bad_id",
            "unsupported_version", "bad_tag", "bad_sequence", "unsolicited_answer",
            "delivery_order", "sequence_exhausted", "weak_key", "open_mode_disabled", "refused", "truncated"}
    if HAVE_ENCRYPTED:
        want.add("mode_refused")
    assert names == want


@needs_encrypted
def test_every_new_receiver_state_has_a_case():
    states = {c["receiver"]["state"] for c in NEGATIVE}
    assert {"client_await_sealed_auth", "server_session_encrypted",
            "client_session_encrypted"} <= states


@pytest.mark.parametrize("case", NEGATIVE, ids=[c["name"] for c in NEGATIVE])
def test_negative_vector(case):
    error, reply = run_case(case)
    assert error == case["error"], case["description"]
    assert reply == case["reply"], case["description"]


@pytest.mark.parametrize("case", [c for c in NEGATIVE if c["receiver"]["state"] in SESSION_STATES],
                         ids=[c["name"] for c in NEGATIVE if c["receiver"]["state"] in SESSION_STATES])
def test_negative_session_case_leaves_the_counter(case):
    # 8.3: the counter does not move on any failure.
    side = _session_receiver(case)
    before = side.last_received
    with pytest.raises((ProtocolError, Refused, AuthFailed, Truncated)):
        _feed(side, hx(case["input"]))
    assert side.last_received == before


def test_refused_finish_names_the_code():
    case = next(c for c in NEGATIVE if c["name"] == "finish_refused")
    side = _session_receiver(case)
    with pytest.raises(AuthFailed) as e:
        _feed(side, hx(case["input"]))
    assert e.value.code == ErrorCode.AUTH_FAILED


def test_lying_length_is_refused_from_the_prefix_alone():
    dec = FrameDecoder(65536)
    with pytest.raises(ProtocolError) as e:
        list(dec.feed(b"\xff\xff\xff\xff"))
    assert e.value.error == "frame_too_large" and dec.pending == 4


def test_sender_refuses_frames_above_the_peer_limit():
    from tally import PayloadTooLarge
    v = load("session.json")
    client, server = _session_pair(v)
    limit = v["inputs"]["client_max_frame_len"]
    _feed(client, server.message(b"x" * (limit - 41)))  # exactly at the client's limit
    with pytest.raises(PayloadTooLarge):
        server.message(b"x" * (limit - 40))
    # An answer that does not fit becomes BACKEND_ERROR (8.4), exactly once.
    seq, f = client.request(b"q")
    _feed(server, f)
    out = server.response(seq, 0, b"y" * limit)
    (got,) = _feed(client, out)
    assert got.status == 2 and got.req_seq == seq
    with pytest.raises(ValueError):
        server.response(seq, 0, b"again")


def test_only_close_at_the_last_sequence_number():
    from tally import SequenceExhausted
    v = load("session.json")
    client, _ = _session_pair(v)
    client.next_seq = 2**64 - 1
    with pytest.raises(SequenceExhausted):
        client.message(b"m")
    f = client.close(CloseCode.NORMAL, "")
    assert struct.unpack(">QH", f[5:15]) == (2**64 - 1, CloseCode.SEQUENCE_EXHAUSTED)
