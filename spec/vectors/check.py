#!/usr/bin/env python3
"""An independent implementation of spec/PROTOCOL.md, written from the spec alone.

It recomputes every value of the test vectors in this folder from their inputs and
runs every negative case through its own receiver, using only the Python standard
library (X25519 is RFC 7748 section 5 and ChaCha20-Poly1305 is RFC 8439 section 2.8,
both written out below, each checked against its RFC's test vector at start). It shares
no code with the Rust implementation, nor with the Python package in python/.
Run: python3 spec/vectors/check.py [DIR]  (DIR defaults to this folder; exit 0 = all
vectors hold).
"""
import hashlib
import hmac
import json
import os
import struct
import sys

HERE = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__))

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


# ChaCha20 (RFC 8439 section 2.3, 2.4) and Poly1305 (2.5), combined as the AEAD of 2.8.

M32 = 0xFFFFFFFF


def _rotl(v: int, c: int) -> int:
    return ((v << c) & M32) | (v >> (32 - c))


def _quarter(w: list, a: int, b: int, c: int, d: int) -> None:
    w[a] = (w[a] + w[b]) & M32
    w[d] = _rotl(w[d] ^ w[a], 16)
    w[c] = (w[c] + w[d]) & M32
    w[b] = _rotl(w[b] ^ w[c], 12)
    w[a] = (w[a] + w[b]) & M32
    w[d] = _rotl(w[d] ^ w[a], 8)
    w[c] = (w[c] + w[d]) & M32
    w[b] = _rotl(w[b] ^ w[c], 7)


def chacha20_block(key: bytes, counter: int, nonce: bytes) -> bytes:
    state = ([0x61707865, 0x3320646E, 0x79622D32, 0x6B206574] + list(struct.unpack("<8I", key))
             + [counter & M32] + list(struct.unpack("<3I", nonce)))
    w = list(state)
    for _ in range(10):
        _quarter(w, 0, 4, 8, 12)
        _quarter(w, 1, 5, 9, 13)
        _quarter(w, 2, 6, 10, 14)
        _quarter(w, 3, 7, 11, 15)
        _quarter(w, 0, 5, 10, 15)
        _quarter(w, 1, 6, 11, 12)
        _quarter(w, 2, 7, 8, 13)
        _quarter(w, 3, 4, 9, 14)
    return struct.pack("<16I", *((w[i] + state[i]) & M32 for i in range(16)))


def chacha20_xor(key: bytes, counter: int, nonce: bytes, data: bytes) -> bytes:
    out = bytearray()
    for j in range(0, len(data), 64):
        block = chacha20_block(key, counter + j // 64, nonce)
        out += bytes(a ^ b for a, b in zip(data[j:j + 64], block))
    return bytes(out)


def poly1305(key: bytes, msg: bytes) -> bytes:
    r = int.from_bytes(key[:16], "little") & 0x0FFFFFFC0FFFFFFC0FFFFFFC0FFFFFFF
    s = int.from_bytes(key[16:32], "little")
    p, acc = (1 << 130) - 5, 0
    for i in range(0, len(msg), 16):
        acc = (acc + int.from_bytes(msg[i:i + 16] + b"\x01", "little")) * r % p
    return ((acc + s) & ((1 << 128) - 1)).to_bytes(16, "little")


def _pad16(b: bytes) -> bytes:
    return bytes(-len(b) % 16)


def _aead_tag(key: bytes, nonce: bytes, ad: bytes, ct: bytes) -> bytes:
    otk = chacha20_block(key, 0, nonce)[:32]
    return poly1305(otk, ad + _pad16(ad) + ct + _pad16(ct) + struct.pack("<QQ", len(ad), len(ct)))


def aead_seal(key: bytes, nonce: bytes, ad: bytes, m: bytes) -> bytes:
    """Spec 3.1 AEAD: ChaCha20-Poly1305 of RFC 8439 section 2.8; ciphertext || 16-byte tag."""
    ct = chacha20_xor(key, 1, nonce, m)
    return ct + _aead_tag(key, nonce, ad, ct)


def aead_open(key: bytes, nonce: bytes, ad: bytes, sealed: bytes):
    """The plaintext, or None if the tag does not verify (checked before decrypting)."""
    if len(sealed) < 16:
        return None
    ct, tag = sealed[:-16], sealed[-16:]
    if not hmac.compare_digest(_aead_tag(key, nonce, ad, ct), tag):
        return None
    return chacha20_xor(key, 1, nonce, ct)


# --- Frames (spec 3.2, 4) -------------------------------------------------------------

def frame(ty: int, body: bytes) -> bytes:
    return struct.pack(">IB", 1 + len(body), ty) + body


def session_frame(key: bytes, ty: int, seq: int, fields: bytes) -> bytes:
    unsigned = struct.pack(">IBQ", 1 + 8 + len(fields) + 32, ty, seq) + fields
    return unsigned + mac(key, unsigned)


TYPES = {"REQUEST": 0x20, "RESPONSE": 0x21, "MESSAGE": 0x22, "PING": 0x23, "PONG": 0x24, "CLOSE": 0x25,
         "KEY_UPDATE": 0x26, "DELIVER": 0x27, "ACK": 0x28}


def sealed_frame(key: bytes, direction: int, ty: int, seq: int, fields: bytes) -> bytes:
    """Spec 8.2, encrypted mode: header || AEAD(K, u32 direction || u64 seq, header, fields)."""
    header = struct.pack(">IBQ", 1 + 8 + len(fields) + 16, ty, seq)
    return header + aead_seal(key, struct.pack(">IQ", direction, seq), header, fields)


def next_key(key: bytes) -> bytes:
    """Spec 5.8."""
    return hkdf(b"", key, b"tally/1 key update")


def fields_of(f: dict) -> bytes:
    t = f["type"]
    if t in ("REQUEST", "MESSAGE"):
        return bytes.fromhex(f["payload"])
    if t == "RESPONSE":
        return struct.pack(">QH", f["req_seq"], f["status"]) + bytes.fromhex(f["payload"])
    if t in ("PING", "KEY_UPDATE"):
        return b""
    if t == "PONG":
        return struct.pack(">Q", f["ping_seq"])
    if t == "CLOSE":
        return struct.pack(">H", f["code"]) + f["reason"].encode()
    if t == "DELIVER":
        return struct.pack(">QB", f["msg_id"], f["kind"]) + bytes.fromhex(f["payload"])
    if t == "ACK":
        return struct.pack(">QH", f["msg_id"], f["status"]) + bytes.fromhex(f["payload"])
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


# --- Session, encrypted mode (spec 4.3, 5.6, 5.7, 5.8, 7.7, 8.2, 8.7) -------------------

ID_BYTES = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:@"


def sealed_handshake(v: dict) -> dict:
    """Every value of the encrypted handshake, from the inputs of session-encrypted.json."""
    i = v["inputs"]
    ident, k = i["id"].encode(), bytes.fromhex(i["identity_key"])
    s, e, f = (bytes.fromhex(i[n]) for n in ("server_static_secret", "client_ephemeral_secret",
                                              "server_ephemeral_secret"))
    S, E, F = x25519(s, BASE), x25519(e, BASE), x25519(f, BASE)
    dh_es = x25519(e, S)
    key_id = hkdf(E + S, dh_es, b"tally/1 sealed hello id")
    # 4.3, 5.6: u8 n ‖ id ‖ zeros to 64 bytes ‖ u32 max_frame_len, sealed after the
    # 38-byte head (length, type, version, E): the limit is not in the clear.
    plain = (bytes([len(ident)]) + ident + bytes(64 - len(ident))
             + struct.pack(">I", i["client_max_frame_len"]))
    head = struct.pack(">IBB", 119, 0x13, 1) + E
    hello = head + aead_seal(key_id, bytes(12), head, plain)
    auth_u = frame(0x14, F + struct.pack(">II", i["server_max_frame_len"], i["server_keepalive_ms"])
                   + bytes(32))[:-32]
    dh_ee = x25519(e, F)
    th2 = H(hello, auth_u)
    salt, ikm = E + F, k + dh_ee + dh_es
    keys = {n: hkdf(salt, ikm, b"tally/1 sealed key " + n.encode() + th2)
            for n in ("c2s", "s2c", "server finish", "client finish")}
    auth = auth_u + mac(keys["server finish"], th2)
    fin_u = struct.pack(">IB", 33, 0x12)
    th3 = H(hello, auth, fin_u)
    fin = fin_u + mac(keys["client finish"], th3)
    return {"S": S, "E": E, "F": F, "s": s, "e": e, "k": k, "dh_es": dh_es, "key_id": key_id,
            "plain": plain, "dh_ee": dh_ee, "th2": th2, "th3": th3, "keys": keys,
            "frames": [hello, auth, fin]}


def check_session_encrypted(k_enrolled: bytes, plain: dict) -> None:
    name = "session-encrypted"
    try:
        v = load("session-encrypted.json")
    except FileNotFoundError:
        FAILURES.append(f"{name}.json: missing")
        return
    i, d = v["inputs"], v["derived"]
    same(f"{name} identity_key = enroll-open identity_key", k_enrolled, i["identity_key"])
    # 12.1: "identity key, limits and frames as session.json".
    for n in ("id", "identity_key", "client_max_frame_len", "server_max_frame_len",
              "server_keepalive_ms"):
        same(f"{name} input {n} = session.json's", i[n], plain["inputs"][n])
    # 12: the fixed inputs s = 20..3f, e = 90..af, f = b0..cf.
    same(f"{name} server_static_secret", i["server_static_secret"], bytes(range(0x20, 0x40)).hex())
    same(f"{name} client_ephemeral_secret", i["client_ephemeral_secret"], bytes(range(0x90, 0xb0)).hex())
    same(f"{name} server_ephemeral_secret", i["server_ephemeral_secret"], bytes(range(0xb0, 0xd0)).hex())
    h = sealed_handshake(v)
    # The server's side of each exchange gives the same values.
    same(f"{name} dh_es (server side)", x25519(h["s"], h["E"]), d["dh_es"])
    same(f"{name} dh_ee (server side)",
         x25519(bytes.fromhex(i["server_ephemeral_secret"]), h["E"]), d["dh_ee"])
    same(f"{name} SEALED_HELLO head", h["frames"][0][:38],
         (struct.pack(">IBB", 119, 0x13, 1) + h["E"]).hex())
    opened = aead_open(h["key_id"], bytes(12), h["frames"][0][:38], h["frames"][0][38:])
    same(f"{name} sealed part opens", opened, d.get("sealed_plaintext"))
    same(f"{name} sealed plaintext length", len(h["plain"]), 69)
    same(f"{name} sealed max_frame_len", struct.unpack(">I", h["plain"][65:])[0],
         i["client_max_frame_len"])
    k2 = h["keys"]
    for key, val in [("server_static_public", h["S"]), ("client_ephemeral_public", h["E"]),
                     ("server_ephemeral_public", h["F"]), ("dh_es", h["dh_es"]),
                     ("key_id", h["key_id"]), ("sealed_plaintext", h["plain"]),
                     ("dh_ee", h["dh_ee"]), ("th2", h["th2"]), ("key_c2s", k2["c2s"]),
                     ("key_s2c", k2["s2c"]), ("key_server_finish", k2["server finish"]),
                     ("key_client_finish", k2["client finish"]), ("th3", h["th3"]),
                     ("key_c2s_updated", next_key(k2["c2s"])),
                     ("key_s2c_updated", next_key(k2["s2c"]))]:
        same(f"{name} {key}", val, d.get(key))
    same(f"{name} handshake names", [f["name"] for f in v["handshake"]],
         ["SEALED_HELLO", "SEALED_AUTH", "CLIENT_FINISH"])
    same(f"{name} handshake directions", [f["direction"] for f in v["handshake"]], ["c2s", "s2c", "c2s"])
    same(f"{name} SEALED_HELLO length", len(h["frames"][0]), 123)
    for f, mine in zip(v["handshake"], h["frames"]):
        same(f"{name} {f['name']}", mine, f["hex"])
    keys = {"c2s": k2["c2s"], "s2c": k2["s2c"]}
    seqs = {"c2s": 0, "s2c": 0}
    updates = {"c2s": 0, "s2c": 0}
    for n, f in enumerate(v["frames"]):
        dr = f["direction"]
        direction = 0 if dr == "c2s" else 1
        seqs[dr] += 1
        same(f"{name} frame {n + 1} seq", f["seq"], seqs[dr])
        nonce = struct.pack(">IQ", direction, f["seq"])
        same(f"{name} frame {n + 1} nonce", nonce, f.get("nonce"))
        mine = sealed_frame(keys[dr], direction, TYPES[f["type"]], f["seq"], fields_of(f))
        same(f"{name} frame {n + 1} ({dr} {f['type']})", mine, f["hex"])
        if f["type"] == "KEY_UPDATE":
            keys[dr] = next_key(keys[dr])
            updates[dr] += 1
    for dr in ("c2s", "s2c"):
        if updates[dr] < 1:
            FAILURES.append(f"{name}: no KEY_UPDATE {dr} (12.1: one in each direction)")
    # Every session type, KEY_UPDATE included, appears (12.1: frames as session.json plus
    # a KEY_UPDATE in each direction and frames after it).
    same(f"{name} frame types", sorted({f["type"] for f in v["frames"]}), sorted(TYPES))
    for dr in ("c2s", "s2c"):
        mine = [j for j, f in enumerate(v["frames"]) if f["direction"] == dr]
        kus = [j for j in mine if v["frames"][j]["type"] == "KEY_UPDATE"]
        if kus and kus[-1] == mine[-1]:
            FAILURES.append(f"{name}: no {dr} frame after its KEY_UPDATE")


# --- A receiver, for the negative cases (spec 3.2, 8.3) ---------------------------------

class Refused(Exception):
    pass


class Receiver:
    """One side of a session, receiving (spec 8.3), either mode."""

    def __init__(self, key: bytes, client: bool, encrypted: bool = False):
        self.key, self.last, self.client, self.encrypted = key, 0, client, encrypted
        self.pending = {0x20: set(), 0x23: set()}   # this side's REQUESTs and PINGs unanswered
        self.outstanding = set()   # a server's DELIVERs not acknowledged (8.8)
        self.last_delivery = 0     # a client's last accepted DELIVER's msg_id (8.8)

    def sent(self, f: dict) -> None:
        """A frame this side sent (from the vector): REQUEST and PING become pending,
        a DELIVER outstanding."""
        if f["type"] == "REQUEST":
            self.pending[0x20].add(f["seq"])
        elif f["type"] == "PING":
            self.pending[0x23].add(f["seq"])
        elif f["type"] == "DELIVER":
            self.outstanding.add(f["msg_id"])

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
        tag_len = 16 if self.encrypted else 32
        if ty not in TYPES.values() or len(f) < 13 + tag_len:
            raise Refused("malformed")
        # DELIVER travels only to a client, ACK only to a server (4.1, 8.3 step 2.2).
        if ty == 0x27 and not self.client or ty == 0x28 and self.client:
            raise Refused("malformed")
        (seq,) = struct.unpack(">Q", f[5:13])
        if seq != self.last + 1:
            raise Refused("bad_sequence")
        if seq == 2**64 - 1 and ty != 0x25:
            raise Refused("sequence_exhausted")
        if self.encrypted:
            # The peer's direction: 1 (server to client) for a client receiver.
            nonce = struct.pack(">IQ", 1 if self.client else 0, seq)
            fields = aead_open(self.key, nonce, f[:13], f[13:])
            if fields is None:
                raise Refused("bad_tag")
        else:
            if not hmac.compare_digest(mac(self.key, f[:-32]), f[-32:]):
                raise Refused("bad_tag")
            fields = f[13:-32]
        # Step 5: the fields parse exactly (4.5), answers name a pending REQUEST or PING.
        if ty in (0x23, 0x26) and fields:
            raise Refused("malformed")
        if ty == 0x24 and len(fields) != 8 or ty in (0x21, 0x28) and len(fields) < 10:
            raise Refused("malformed")
        if ty == 0x27:
            if len(fields) < 9:
                raise Refused("malformed")
            msg_id, kind = struct.unpack(">QB", fields[:9])
            if msg_id == 0 or kind not in (1, 2):
                raise Refused("malformed")
            if msg_id <= self.last_delivery:
                raise Refused("delivery_order")
            self.last_delivery = msg_id
        if ty == 0x28:
            (msg_id,) = struct.unpack(">Q", fields[:8])
            if msg_id not in self.outstanding:
                raise Refused("unsolicited_answer")
            self.outstanding.discard(msg_id)
        if ty == 0x25:
            if len(fields) < 2 or len(fields) - 2 > 255:
                raise Refused("malformed")
            try:
                fields[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise Refused("malformed") from None
        if ty in (0x21, 0x24):
            (answered,) = struct.unpack(">Q", fields[:8])
            asked = self.pending[0x20 if ty == 0x21 else 0x23]
            if answered not in asked:
                raise Refused("unsolicited_answer")
            asked.discard(answered)
        self.last = seq
        if ty == 0x26:
            self.key = next_key(self.key)


# The ERROR code a server sends for each refusal before a session (6.3, 7.2, 10.1).
SERVER_ERROR_CODES = {"unsupported_version": 0x0001, "malformed": 0x0002, "bad_id": 0x0002,
                      "empty_frame": 0x0002, "frame_too_large": 0x0002, "weak_key": 0x0002,
                      "bad_tag": 0x0004, "open_mode_disabled": 0x0004, "mode_refused": 0x000A}


def expected_reply(state: str, error: str):
    """What the receiver sends before closing (8.3, 6.3, 7.2, 7.4)."""
    if state.endswith("_session") or state.endswith("_session_encrypted"):
        if error in ("refused", "truncated"):
            return {"close": True}          # after an ERROR: no CLOSE (8.3 step 2.1)
        return {"close_code": 7 if error == "frame_too_large" else 6}
    if state.startswith("server_"):
        code = SERVER_ERROR_CODES.get(error)
        return None if code is None else {"error_frame": frame(0x1F, struct.pack(">HB", code, 1)).hex()}
    return {"close": True}                  # a client before a session sends nothing (7.4)


def session_receiver(case: dict, encrypted: bool) -> tuple:
    """The receiver of a session state after its first `after_frames` frames (12.2)."""
    state = case["receiver"]["state"]
    client = state.startswith("client_")
    if encrypted:
        v = load("session-encrypted.json")
        keys = sealed_handshake(v)["keys"]
    else:
        v = load("session.json")
        keys = session_keys(v)[0]
    side = "s2c" if client else "c2s"            # the direction this receiver receives
    rx = Receiver(keys[side], client=client, encrypted=encrypted)
    for f in v["frames"][:case["receiver"]["after_frames"]]:
        if f["direction"] == side:
            rx.receive(bytes.fromhex(f["hex"]))
        else:
            rx.sent(f)
    if "last_received" in case["receiver"]:
        rx.last = int(case["receiver"]["last_received"])
    # Each side's limit is the one it announced in the handshake (spec 3.2).
    limit = v["inputs"]["client_max_frame_len" if client else "server_max_frame_len"]
    return rx, limit


def check_pre_session_length(data: bytes) -> None:
    """3.2 on a handshake frame: the limit is 256; then exactly one whole frame."""
    if len(data) < 4:
        raise Refused("malformed")
    (length,) = struct.unpack(">I", data[:4])
    if length == 0:
        raise Refused("empty_frame")
    if length > 256:
        raise Refused("frame_too_large")
    if len(data) != 4 + length:
        raise Refused("malformed")


def server_await_hello(case: dict, data: bytes) -> None:
    """Spec 7.2, server rows 1 to 7, in order, for HELLO and SEALED_HELLO."""
    policy = case["receiver"].get("policy", "allowed")
    if policy not in ("required", "allowed", "off"):
        raise Refused(f"unknown policy {policy}")
    check_pre_session_length(data)                                   # row 1
    if data[4] not in (0x10, 0x13):                                   # row 2
        raise Refused("malformed")
    if len(data) < 6:                                                 # row 3
        raise Refused("malformed")
    if data[5] != 1:                                                  # row 4
        raise Refused("unsupported_version")
    sealed = data[4] == 0x13
    if (sealed and policy == "off") or (not sealed and policy == "required"):
        raise Refused("mode_refused")                                 # row 4a
    if not sealed:                                                    # row 5, HELLO
        if len(data) < 7 or len(data) < 7 + data[6]:
            raise Refused("malformed")
        n = data[6]
        ident = data[7:7 + n]
        if not 1 <= n <= 64 or any(c not in ID_BYTES for c in ident):
            raise Refused("bad_id")
        if len(data) != 4 + 39 + n:
            raise Refused("malformed")
        (max_frame_len,) = struct.unpack(">I", data[-4:])
        if not 256 <= max_frame_len <= 2**24:
            raise Refused("malformed")
        return
    if len(data) != 4 + 119:                                          # row 5, SEALED_HELLO
        raise Refused("malformed")
    i = load("session-encrypted.json")["inputs"]
    s_secret = bytes.fromhex(i["server_static_secret"])
    E = data[6:38]
    dh_es = x25519(s_secret, E)
    if dh_es == bytes(32):                                            # row 5a
        raise Refused("weak_key")
    key_id = hkdf(E + x25519(s_secret, BASE), dh_es, b"tally/1 sealed hello id")
    plain = aead_open(key_id, bytes(12), data[:38], data[38:])
    if plain is None:
        return  # 7.5: answered like an unknown id, with SEALED_AUTH (row 7)
    # Row 5b (4.3), in this order: n and the id (bad_id, treated as malformed), the
    # padding to 64 bytes, the limit's range.
    n = plain[0]
    if not 1 <= n <= 64 or any(c not in ID_BYTES for c in plain[1:1 + n]):
        raise Refused("bad_id")
    if any(plain[1 + n:65]):
        raise Refused("malformed")
    (max_frame_len,) = struct.unpack(">I", plain[65:69])
    if not 256 <= max_frame_len <= 2**24:
        raise Refused("malformed")


def run_negative(case: dict) -> str:
    data = bytes.fromhex(case["input"])
    state = case["receiver"]["state"]
    sess = load("session.json")
    keys, th2, _, _, hello = session_keys(sess)
    try:
        if state in ("server_session", "client_session", "server_session_encrypted",
                     "client_session_encrypted"):
            rx, limit = session_receiver(case, state.endswith("_encrypted"))
            rx.receive(data, limit)
        elif state == "client_await_server_auth":
            check_pre_session_length(data)
            if data[4] == 0x1F:
                raise Refused("refused")
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
        elif state == "client_await_sealed_auth":
            # Spec 7.2 client rows 2 to 5 (7.7): ERROR, type and length (a SERVER_AUTH is
            # the wrong type here), limits, dh_ee, tag.
            v = load("session-encrypted.json")
            h = sealed_handshake(v)
            if len(data) >= 5 and data[4] == 0x1F:
                raise Refused("refused")
            check_pre_session_length(data)
            if len(data) != 77 or data[4] != 0x14:
                raise Refused("malformed")
            max_frame_len, keepalive_ms = struct.unpack(">II", data[37:45])
            if not (256 <= max_frame_len <= 2**24 and 100 <= keepalive_ms <= 86_400_000):
                raise Refused("malformed")
            F = data[5:37]
            dh_ee = x25519(h["e"], F)
            if dh_ee == bytes(32):
                raise Refused("weak_key")
            th = H(h["frames"][0], data[:45])
            ksf = hkdf(h["E"] + F, h["k"] + dh_ee + h["dh_es"], b"tally/1 sealed key server finish" + th)
            if not hmac.compare_digest(mac(ksf, th), data[45:]):
                raise Refused("bad_tag")
        elif state == "server_await_hello":
            server_await_hello(case, data)
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
    # RFC 8439 section 2.8.2: the ChaCha20-Poly1305 here is the real one.
    rfc_pt = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip "
              b"for the future, sunscreen would be it.")
    rfc_key, rfc_nonce = bytes(range(0x80, 0xA0)), bytes.fromhex("070000004041424344454647")
    rfc_ad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    rfc_out = aead_seal(rfc_key, rfc_nonce, rfc_ad, rfc_pt)
    same("RFC 8439 2.8.2 ciphertext", rfc_out[:-16],
         "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca967"
         "1282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee32809"
         "1b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d26586cec64b6116")
    same("RFC 8439 2.8.2 tag", rfc_out[-16:], "1ae10b594f09e26a7e902ecbd0600691")
    same("RFC 8439 2.8.2 opens", aead_open(rfc_key, rfc_nonce, rfc_ad, rfc_out), rfc_pt.hex())
    same("RFC 8439 2.8.2 refuses a flipped bit",
         aead_open(rfc_key, rfc_nonce, rfc_ad, rfc_out[:-1] + bytes([rfc_out[-1] ^ 1])), None)
    k = check_enrollment("enroll-open.json")
    check_enrollment("enroll-token.json")
    check_session(k)
    check_session_encrypted(k, load("session.json"))
    cases = load("negative.json")["cases"]
    names = set()
    for case in cases:
        names.add(case["error"])
        got = run_negative(case)
        if got != case["error"]:
            FAILURES.append(f"negative {case['name']}: got {got}, vector says {case['error']}")
        want = expected_reply(case["receiver"]["state"], case["error"])
        if want != case["reply"]:
            FAILURES.append(f"negative {case['name']}: reply {case['reply']}, the spec says {want}")
    # 12.2: every error name has at least one case; and the new states each have one.
    for n in ["empty_frame", "frame_too_large", "malformed", "bad_id", "unsupported_version",
              "bad_tag", "bad_sequence", "unsolicited_answer", "sequence_exhausted", "weak_key",
              "open_mode_disabled", "mode_refused", "refused", "truncated"]:
        if n not in names:
            FAILURES.append(f"negative.json: no case for the error name {n} (12.2)")
    states = {c["receiver"]["state"] for c in cases}
    for st in ["client_await_sealed_auth", "server_session_encrypted", "client_session_encrypted"]:
        if st not in states:
            FAILURES.append(f"negative.json: no case for the receiver state {st} (12.2)")
    for f in FAILURES:
        print("FAIL", f)
    verdict = "MISMATCH" if FAILURES else "all values reproduced"
    print(f"spec vectors: {verdict} ({len(cases)} negative cases, {len(FAILURES)} mismatches)")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
