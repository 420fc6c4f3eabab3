"""Cryptographic primitives of spec section 3.1: SHA-256, HMAC-SHA256, HKDF-SHA256, X25519,
ChaCha20-Poly1305.

Everything but X25519 and the AEAD is the standard library; those two are the
``cryptography`` package.
"""
import hashlib
import hmac
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .errors import ProtocolError

__all__ = ["H", "mac", "hkdf", "x25519", "x25519_base", "random_bytes", "tags_equal",
           "aead_seal", "aead_open", "AEAD_TAG_LEN"]

#: The Poly1305 tag that ends every AEAD output (spec 3.1).
AEAD_TAG_LEN = 16


def H(*parts: bytes) -> bytes:
    """SHA-256 of the concatenation of ``parts`` (spec 3.1 ``H``)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 of the concatenation of ``parts`` under ``key`` (32 bytes, never truncated)."""
    m = hmac.new(key, digestmod=hashlib.sha256)
    for p in parts:
        m.update(p)
    return m.digest()


def hkdf(salt: bytes, ikm: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 with one output block (spec 3.1): ``HMAC(HMAC(salt, ikm), info || 0x01)``.

    An empty salt is 32 zero bytes, as RFC 5869 says.
    """
    prk = mac(salt if salt else bytes(32), ikm)
    return mac(prk, info, b"\x01")


def tags_equal(a: bytes, b: bytes) -> bool:
    """Compare two tags in constant time (``hmac.compare_digest``)."""
    return hmac.compare_digest(bytes(a), bytes(b))


def x25519(secret: bytes, public: bytes) -> bytes:
    """``X25519(secret, public)`` of RFC 7748 section 5 (the secret is clamped).

    Raises ``ProtocolError("weak_key")`` if the result is 32 zero bytes (a low-order point),
    as spec 3.1 requires.
    """
    if len(secret) != 32 or len(public) != 32:
        raise ValueError("X25519 keys are 32 bytes")
    try:
        out = X25519PrivateKey.from_private_bytes(bytes(secret)).exchange(
            X25519PublicKey.from_public_bytes(bytes(public)))
    except ValueError:
        # OpenSSL refuses an all-zero shared secret itself.
        raise ProtocolError("weak_key", "the peer sent a low-order X25519 point") from None
    if hmac.compare_digest(out, bytes(32)):
        raise ProtocolError("weak_key", "the peer sent a low-order X25519 point")
    return out


def x25519_base(secret: bytes) -> bytes:
    """The public key ``X25519(secret, 9)`` of a 32-byte secret."""
    if len(secret) != 32:
        raise ValueError("X25519 keys are 32 bytes")
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return X25519PrivateKey.from_private_bytes(bytes(secret)).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def random_bytes(n: int = 32) -> bytes:
    """``n`` bytes from the operating system's secure generator (``secrets``)."""
    return secrets.token_bytes(n)


def aead_seal(key: bytes, nonce: bytes, ad: bytes, plaintext: bytes) -> bytes:
    """``AEAD(K, n, ad, m)`` of spec 3.1: ChaCha20-Poly1305 (RFC 8439 section 2.8); the
    ciphertext (as long as ``m``) followed by the 16-byte tag."""
    if len(key) != 32 or len(nonce) != 12:
        raise ValueError("ChaCha20-Poly1305 takes a 32-byte key and a 12-byte nonce")
    return ChaCha20Poly1305(bytes(key)).encrypt(bytes(nonce), bytes(plaintext), bytes(ad))


def aead_open(key: bytes, nonce: bytes, ad: bytes, sealed: bytes) -> bytes:
    """Open ``ciphertext || tag``; the tag is checked (in constant time) before any plaintext
    is released. Raises ``ProtocolError("bad_tag")`` if it does not verify."""
    if len(key) != 32 or len(nonce) != 12:
        raise ValueError("ChaCha20-Poly1305 takes a 32-byte key and a 12-byte nonce")
    if len(sealed) < AEAD_TAG_LEN:
        raise ProtocolError("bad_tag", "shorter than a Poly1305 tag")
    try:
        return ChaCha20Poly1305(bytes(key)).decrypt(bytes(nonce), bytes(sealed), bytes(ad))
    except InvalidTag:
        raise ProtocolError("bad_tag", "the AEAD tag does not verify") from None
