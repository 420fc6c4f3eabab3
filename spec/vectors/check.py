#!/usr/bin/env python3
"""An independent implementation of spec/PROTOCOL.md, written from the spec alone.

It recomputes every value of the test vectors in this folder from their inputs and
runs every negative case through its own receiver, using only the Python standard
library (X25519 is RFC 7748 section 5, written out below). It shares no code with the
Rust implementation. Run: python3 spec/vectors/check.py  (exit 0 = all vectors hold).
"""
import hashlib
import hmac
import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# --- Primitives (spec 3.1) ----------------------------------------------------------

P = 2**255 - 19
A24 = 121665


def x25519(k: bytes, u: bytes) -> bytes:
    """RFC 7748 section 5: the Montgomery ladder with clamping."""
    k = bytearray(k)
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    k = int.from_bytes(k, "little")
    u = int.from_bytes(u, "little") & ((1 << 255) - 1)
    x1, x2, z2, x3, z3, swap = u, 1, 0, u, 1, 0
    for t in reversed(range(255)):
        kt = (k >> t) & 1
        swap ^= kt
        if swap:
            x2, x3, z2, z3 = x3, x2, z3, z2
        swap = kt
        a, b = (x2 + z2) % P, (x2 - z2) % P
        aa, bb = a * a % P, b * b % P
        e = (aa - bb) % P
        c, d = (x3 + z3) % P, (x3 - z3) % P
        da, cb = d * a % P, c * b % P
        x3, z3 = (da + cb) ** 2 % P, x1 * (da - cb) ** 2 % P
        x2, z2 = aa * bb % P, e * (aa + A24 * e) % P
    if swap:
        x2, x3, z2, z3 = x3, x2, z3, z2
    return (x2 * pow(z2, P - 2, P) % P).to_bytes(32, "little")


BASE = (9).to_bytes(32, "little")


def H(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()


def hkdf(salt: bytes, ikm: bytes, info: bytes) -> bytes:
    prk = mac(salt if salt else bytes(32), ikm)
    return mac(prk, info, b"\x01")


# --- Frames (spec 3.2, 4) -------------------------------------------------------------

def frame(ty: int, body: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(body), ty) + body


def session_frame(key: bytes, ty: int, seq: int, fields: bytes) -> bytes:
    unsigned = struct.pack(">IBQ", 1 + 8 + len(fields) + 32, ty, seq) + fields
    return unsigned + mac(key, unsigned)


TYPES = {"REQUEST": 0x20, "RESPONSE": 0x21, "MESSAGE": 0x22, "PING": 0x23, "PONG": 0x24, "CLOSE": 0x25}


def fields_of(f: dict) -> bytes:
    t = f["type"]
    if t in ("REQUEST", "MESSAGE"):
        return bytes.fromhex(f["payload"])
    if t == "RESPONSE":
        return struct.pack(">QH", f["req_seq"], f["status"]) + bytes.fromhex(f["payload"])
    if t == "PING":
        return b""
    if t == "PONG":
        return struct.pack(">Q", f["ping_seq"])
    if t == "CLOSE":
        return struct.pack(">H", f["code"]) + f["reason"].encode()
    raise ValueError(t)


def load(name: str) -> dict:
    with open(os.path.join(HERE, name)) as fh:
        return json.load(fh)


FAILURES = []


def same(what: str, got, want) -> None:
    if isinstance(got, bytes):
        got = got.hex()
    if got != want:
        FAILURES.append(f"{what}: computed {got}, vector says {want}")


# --- Enrollment (spec 5.4, 6) ----------------------------------------------------

def check_enrollment(name: str) -> bytes:
    v = load(name)
    i, d = v["inputs"], v["derived"]
    c, s = bytes.fromhex(i["credential"]), bytes.fromhex(i["server_static_secret"])
    x, y = bytes.fromhex(i["client_ephemeral_secret"]), bytes.fromhex(i["server_ephemeral_secret"])
    ident = i["id"].encode()
    mode = {"open": 0, "token": 1}[i["mode"]]
    S, X, Y = x25519(s, BASE), x25519(x, BASE), x25519(y, BASE)
    same(f"{name} S", S, d["server_static_public"])
    same(f"{name} token", f"tally1-{i['mode']}-{c.hex()}-{S.hex()}", d["token"])

    init_u = frame(0x01, bytes([1, mode, len(ident)]) + ident + X + bytes(32))[:-32]
    th1 = H(init_u)
    init = init_u + mac(c, b"tally/1 enroll init", th1)
    dh_ee, dh_es = x25519(x, Y), x25519(x, S)
    same(f"{name} dh_ee (server side)", x25519(y, X), d["dh_ee"])
    same(f"{name} dh_es (server side)", x25519(s, X), d["dh_es"])
    reply_u = frame(0x02, Y + bytes(32))[:-32]
    th2 = H(init, reply_u)
    ikm = dh_ee + dh_es
    k_server = hkdf(c, ikm, b"tally/1 enroll key server" + th2)
    k_client = hkdf(c, ikm, b"tally/1 enroll key client" + th2)
    k_done = hkdf(c, ikm, b"tally/1 enroll key done" + th2)
    k = hkdf(c, ikm, b"tally/1 enroll key identity" + th2)
    reply = reply_u + mac(k_server, th2)
    confirm_u = struct.pack(">IB", 33, 0x03)
    th3 = H(init, reply, confirm_u)
    confirm = confirm_u + mac(k_client, th3)
    done_u = struct.pack(">IB", 33, 0x04)
    th4 = H(init, reply, confirm, done_u)
    done = done_u + mac(k_done, th4)
    for key, val in [("client_ephemeral_public", X), ("server_ephemeral_public", Y), ("th1", th1),
                     ("init_tag", init[-32:]), ("dh_ee", dh_ee), ("dh_es", dh_es), ("th2", th2),
                     ("key_server", k_server), ("key_client", k_client), ("key_done", k_done),
                     ("identity_key", k), ("th3", th3), ("th4", th4)]:
        same(f"{name} {key}", val, d[key])
    for f, mine in zip(v["frames"], [init, reply, confirm, done]):
        same(f"{name} {f['name']}", mine, f["hex"])
    return k


# --- Session (spec 5.5, 7, 8) ---------------------------------------------------------

def session_keys(v: dict):
    i = v["inputs"]
    ident, k = i["id"].encode(), bytes.fromhex(i["identity_key"])
    nc, ns = bytes.fromhex(i["client_nonce"]), bytes.fromhex(i["server_nonce"])
    limits = struct.pack(">II", i["server_max_frame_len"], i["server_keepalive_ms"])
    hello = frame(0x10, bytes([1, len(ident)]) + ident + nc + struct.pack(">I", i["client_max_frame_len"]))
    auth_u = frame(0x11, ns + limits + bytes(32))[:-32]
    th2 = H(hello, auth_u)
    salt = nc + ns
    keys = {n: hkdf(salt, k, b"tally/1 session key " + n.encode() + th2)
            for n in ("c2s", "s2c", "server finish", "client finish")}
    auth = auth_u + mac(keys["server finish"], th2)
    fin_u = struct.pack(">IB", 33, 0x12)
    th3 = H(hello, auth, fin_u)
    fin = fin_u + mac(keys["client finish"], th3)
    return keys, th2, th3, [hello, auth, fin], hello


def check_session(k_enrolled: bytes) -> None:
    v = load("session.json")
    same("session identity_key = enroll-open identity_key", k_enrolled, v["inputs"]["identity_key"])
    keys, th2, th3, hs, _ = session_keys(v)
    d = v["derived"]
    same("session th2", th2, d["th2"])
    same("session th3", th3, d["th3"])
    for n, j in [("c2s", "key_c2s"), ("s2c", "key_s2c"), ("server finish", "key_server_finish"),
                 ("client finish", "key_client_finish")]:
        same(f"session {j}", keys[n], d[j])
    for f, mine in zip(v["handshake"], hs):
        same(f"session {f['name']}", mine, f["hex"])
    for n, f in enumerate(v["frames"]):
        mine = session_frame(keys[f["direction"]], TYPES[f["type"]], f["seq"], fields_of(f))
        same(f"session frame {n + 1} ({f['direction']} {f['type']})", mine, f["hex"])


# --- A receiver, for the negative cases (spec 3.2, 8.3) ---------------------------------

class Refused(Exception):
    pass


class Receiver:
    def __init__(self, key: bytes, client: bool):
        self.key, self.last, self.last_sent, self.client = key, 0, 0, client

    def receive(self, data: bytes, limit: int = 65536) -> None:
        if len(data) < 4:
            raise Refused("malformed")
        (length,) = struct.unpack(">I", data[:4])
        if length == 0:
            raise Refused("empty_frame")
        if length > limit:
            raise Refused("frame_too_large")
        f = data[:4 + length]
        if len(f) < 4 + length:
            raise Refused("malformed")
        ty = f[4]
        if ty == 0x1F:
            # Spec 8.3 step 2: only the finish refusal, before any session frame, is
            # reported as a refusal; any other ERROR in a session was injected.
            raise Refused("refused" if self.client and self.last == 0 else "truncated")
        if ty not in TYPES.values() or len(f) < 13 + 32:
            raise Refused("malformed")
        (seq,) = struct.unpack(">Q", f[5:13])
        if seq != self.last + 1:
            raise Refused("bad_sequence")
        if seq == 2**64 - 1 and ty != 0x25:
            raise Refused("sequence_exhausted")
        if not hmac.compare_digest(mac(self.key, f[:-32]), f[-32:]):
            raise Refused("bad_tag")
        if ty in (0x21, 0x24):
            if len(f) < 13 + 8 + 32:
                raise Refused("malformed")
            (answered,) = struct.unpack(">Q", f[13:21])
            if not 1 <= answered <= self.last_sent:
                raise Refused("unsolicited_answer")
        self.last = seq


def run_negative(case: dict) -> str:
    data = bytes.fromhex(case["input"])
    state = case["receiver"]["state"]
    sess = load("session.json")
    keys, th2, _, _, hello = session_keys(sess)
    try:
        if state in ("server_session", "client_session"):
            side = "c2s" if state == "server_session" else "s2c"
            client = state == "client_session"
            rx = Receiver(keys[side], client=client)
            # Each side's limit is the one it announced in the handshake (spec 3.2).
            limit = sess["inputs"]["client_max_frame_len" if client else "server_max_frame_len"]
            rx.last = int(case["receiver"].get("last_received", 0))
            for f in sess["frames"][:case["receiver"]["after_frames"]]:
                if f["direction"] == side:
                    rx.receive(bytes.fromhex(f["hex"]))
                else:
                    rx.last_sent = f["seq"]
            rx.receive(data, limit)
        elif state == "client_await_server_auth":
            if len(data) != 77 or data[4] != 0x11:
                raise Refused("malformed")
            nc, ns = bytes.fromhex(sess["inputs"]["client_nonce"]), data[5:37]
            max_frame_len, keepalive_ms = struct.unpack(">II", data[37:45])
            if not (256 <= max_frame_len <= 2**24 and 100 <= keepalive_ms <= 86_400_000):
                raise Refused("malformed")
            k = bytes.fromhex(sess["inputs"]["identity_key"])
            th = H(hello, data[:45])
            ksf = hkdf(nc + ns, k, b"tally/1 session key server finish" + th)
            if not hmac.compare_digest(mac(ksf, th), data[45:]):
                raise Refused("bad_tag")
        elif state == "server_await_hello":
            # Spec 7.2, rows 1 to 5, in order: length, type, version, then each field
            # read whole before it is checked.
            (length,) = struct.unpack(">I", data[:4])
            if length == 0 or length > 256 or len(data) != 4 + length:
                raise Refused("malformed")
            if data[4] != 0x10 or len(data) < 6:
                raise Refused("malformed")
            if data[5] != 1:
                raise Refused("unsupported_version")
            if len(data) < 7 or len(data) < 7 + data[6]:
                raise Refused("malformed")
            n = data[6]
            ident = data[7:7 + n]
            allowed = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:@"
            if not 1 <= n <= 64 or any(c not in allowed for c in ident):
                raise Refused("bad_id")
            if len(data) != 4 + 39 + n:
                raise Refused("malformed")
            (max_frame_len,) = struct.unpack(">I", data[-4:])
            if not 256 <= max_frame_len <= 2**24:
                raise Refused("malformed")
        elif state == "server_await_enroll_init":
            # The server holds EK (enroll-open.json) and one token, for the id of
            # enroll-token.json; for any other id in token mode it has no credential.
            opn, tok = load("enroll-open.json")["inputs"], load("enroll-token.json")["inputs"]
            if data[5] != 1:
                raise Refused("unsupported_version")
            mode, n = data[6], data[7]
            ident = data[8:8 + n]
            if mode == 0 and case["receiver"].get("open_enrollment") is False:
                raise Refused("open_mode_disabled")
            if mode == 0:
                c = bytes.fromhex(opn["credential"])
            elif ident == tok["id"].encode():
                c = bytes.fromhex(tok["credential"])
            else:
                raise Refused("bad_tag")
            if not hmac.compare_digest(mac(c, b"tally/1 enroll init", H(data[:-32])), data[-32:]):
                raise Refused("bad_tag")
        elif state == "client_await_enroll_reply":
            enr = load("enroll-open.json")
            i = enr["inputs"]
            x, s = bytes.fromhex(i["client_ephemeral_secret"]), bytes.fromhex(i["server_static_secret"])
            init = bytes.fromhex(enr["frames"][0]["hex"])
            Y = data[5:37]
            if x25519(x, Y) == bytes(32):
                raise Refused("weak_key")
            ikm = x25519(x, Y) + x25519(x, x25519(s, BASE))
            th = H(init, data[:37])
            ks = hkdf(bytes.fromhex(i["credential"]), ikm, b"tally/1 enroll key server" + th)
            if not hmac.compare_digest(mac(ks, th), data[37:]):
                raise Refused("bad_tag")
        else:
            return f"unknown state {state}"
    except Refused as e:
        return str(e)
    return "accepted"


def main() -> int:
    # RFC 7748 section 5.2, first test vector: the X25519 here is the real one.
    same("RFC 7748 vector", x25519(
        bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
        bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")),
        "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")
    k = check_enrollment("enroll-open.json")
    check_enrollment("enroll-token.json")
    check_session(k)
    cases = load("negative.json")["cases"]
    for case in cases:
        got = run_negative(case)
        if got != case["error"]:
            FAILURES.append(f"negative {case['name']}: got {got}, vector says {case['error']}")
    for f in FAILURES:
        print("FAIL", f)
    verdict = "MISMATCH" if FAILURES else "all values reproduced"
    print(f"spec vectors: {verdict} ({len(cases)} negative cases, {len(FAILURES)} mismatches)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
