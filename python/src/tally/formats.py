"""The enrollment token (spec 9.1) and the credential file (spec 9.2)."""
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

from .errors import FormatError, InsecureCredential, ProtocolError
from .frames import check_id

__all__ = ["EnrollmentToken", "Credential", "parse_server_address", "format_server_address",
           "server_key_is_canonical"]

PathLike = Union[str, "os.PathLike[str]"]

_TOKEN = re.compile(r"tally1-(open|token)-([0-9a-fA-F]{64})-([0-9a-fA-F]{64})")
_MODES = {"open": 0, "token": 1}
#: What a token reader ignores around a token (spec 9.1): nothing else is whitespace.
_WHITESPACE = " \t\r\n"


def server_key_is_canonical(server_key: bytes) -> bool:
    """Spec 9.1: ``S`` is in the canonical form of RFC 7748, the top bit of its last byte
    clear. X25519 ignores that bit, but ``K_id``'s salt (5.6) does not: a copy with it set
    would make every sealed id fail to open at the server, silently. Readers of tokens and
    credential files refuse it."""
    return len(server_key) == 32 and server_key[31] < 0x80


_NOT_CANONICAL = ("is not in canonical form (spec 9.1: the top bit of its last byte must be "
                  "clear, its last two hex digits below 80); with that bit set every encrypted "
                  "session would fail: copy it again from the server")


@dataclass(frozen=True)
class EnrollmentToken:
    """An enrollment token (spec 9.1): ``tally1-<mode>-<c hex>-<S hex>``.

    ``mode`` is ``"open"`` (``c`` is the fleet-wide open key ``EK``) or ``"token"`` (``c``
    is a per-identity token ``T(id)``); ``server_key`` is the server's static X25519 public
    key ``S``, which the device pins. The token is a secret: its ``repr`` hides ``c``.
    """

    mode: str
    credential: bytes = field(repr=False)
    server_key: bytes

    def __post_init__(self):
        if self.mode not in _MODES:
            raise FormatError(f"token mode must be 'open' or 'token', not {self.mode!r}")
        if len(self.credential) != 32 or len(self.server_key) != 32:
            raise FormatError("a token holds two 32-byte values")

    @property
    def mode_byte(self) -> int:
        """The ENROLL_INIT ``mode`` byte: 0 open, 1 token."""
        return _MODES[self.mode]

    @classmethod
    def parse(cls, text: Union[str, bytes]) -> "EnrollmentToken":
        """Parse a token. Surrounding whitespace is ignored and upper-case hex accepted;
        anything else is refused with :class:`FormatError` (spec 9.1), and so is a server
        key ``S`` that is not in canonical form (its top bit set)."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("ascii")
            except UnicodeDecodeError:
                raise FormatError("an enrollment token is ASCII") from None
        m = _TOKEN.fullmatch(text.strip(_WHITESPACE))
        if not m:
            raise FormatError("not an enrollment token: expected "
                              "tally1-open-<64 hex>-<64 hex> or tally1-token-<64 hex>-<64 hex>")
        server_key = bytes.fromhex(m.group(3))
        if not server_key_is_canonical(server_key):
            raise FormatError("the enrollment token's server key S " + _NOT_CANONICAL)
        return cls(m.group(1), bytes.fromhex(m.group(2)), server_key)

    @classmethod
    def load(cls, path: PathLike) -> "EnrollmentToken":
        """Read a token from a file (the way to keep it off command lines, spec 9.1)."""
        with open(path, "rb") as fh:
            return cls.parse(fh.read())

    def format(self) -> str:
        """The token line, lower-case hex, no newline."""
        return f"tally1-{self.mode}-{self.credential.hex()}-{self.server_key.hex()}"

    def __str__(self) -> str:
        return f"<tally enrollment token, mode {self.mode}, server key {self.server_key.hex()[:16]}...>"


def parse_server_address(server: Union[str, tuple]):
    """``"host:port"``, ``"[v6addr]:port"`` or a ``(host, port)`` tuple -> ``(host, port)``.

    Without a port, 7420 (the daemon's default) is used.
    """
    if isinstance(server, tuple):
        host, port = server
        return str(host), int(port)
    s = server.strip()
    if s.startswith("["):
        end = s.find("]")
        if end < 0:
            raise FormatError(f"bad server address {server!r}")
        host, rest = s[1:end], s[end + 1:]
        if not rest:
            return host, 7420
        if not rest.startswith(":"):
            raise FormatError(f"bad server address {server!r}")
        port = rest[1:]
    elif s.count(":") == 1:
        host, port = s.split(":")
    elif ":" not in s:
        return s, 7420
    else:
        raise FormatError(f"bad server address {server!r}: write an IPv6 address as [addr]:port")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FormatError(f"bad server address {server!r}")
    return host, int(port)


def format_server_address(server: Union[str, tuple]) -> str:
    """The ``host:port`` form of a server address (IPv6 in brackets)."""
    host, port = parse_server_address(server)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- The credential file (9.2): a small TOML file --------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_INT = re.compile(r"[+-]?(0|[1-9](_?[0-9])*)")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def _toml_string(s: str, i: int, lineno: int):
    """Parse a TOML basic string starting at s[i] == '"'; return (value, next index)."""
    out = []
    i += 1
    while i < len(s):
        ch = s[i]
        if ch == '"':
            return "".join(out), i + 1
        if ch == "\\":
            esc = s[i + 1:i + 2]
            if esc in _ESCAPES:
                out.append(_ESCAPES[esc])
                i += 2
                continue
            if esc in ("u", "U"):
                n = 4 if esc == "u" else 8
                digits = s[i + 2:i + 2 + n]
                if len(digits) != n or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise FormatError(f"line {lineno}: bad \\{esc} escape")
                code = int(digits, 16)
                # TOML: a Unicode scalar value (chr() would raise ValueError past
                # 0x10FFFF, and a surrogate is no character the writer could encode).
                if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                    raise FormatError(f"line {lineno}: \\{esc}{digits} is not a Unicode scalar value")
                out.append(chr(code))
                i += 2 + n
                continue
            raise FormatError(f"line {lineno}: bad escape in a string")
        if ord(ch) < 0x20 and ch != "\t" or ch == "\x7f":
            raise FormatError(f"line {lineno}: control character in a string")
        out.append(ch)
        i += 1
    raise FormatError(f"line {lineno}: unterminated string")


def _parse_toml(text: str) -> Dict[str, object]:
    """The subset of TOML a credential uses: top-level ``key = value`` lines, comments,
    basic and literal strings, integers. Anything else is refused."""
    values: Dict[str, object] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("["):
            raise FormatError(f"line {lineno}: tables are not part of a credential file")
        if s.startswith('"'):
            key, i = _toml_string(s, 0, lineno)
        else:
            m = _BARE_KEY.match(s)
            if not m:
                raise FormatError(f"line {lineno}: expected key = value")
            key, i = m.group(0), m.end()
        rest = s[i:].lstrip()
        if not rest.startswith("="):
            raise FormatError(f"line {lineno}: expected key = value")
        rest = rest[1:].lstrip()
        if rest.startswith('"'):
            value, j = _toml_string(rest, 0, lineno)
        elif rest.startswith("'"):
            j = rest.find("'", 1)
            if j < 0:
                raise FormatError(f"line {lineno}: unterminated string")
            value, j = rest[1:j], j + 1
        else:
            m = _INT.match(rest)
            if not m:
                raise FormatError(f"line {lineno}: only strings and integers are understood")
            digits = m.group(0).replace("_", "")
            # TOML integers are 64-bit (and int() refuses over 4300 digits with ValueError).
            if len(digits.lstrip("+-")) > 19 or not -2**63 <= int(digits) < 2**63:
                raise FormatError(f"line {lineno}: integer out of range")
            value, j = int(digits), m.end()
        tail = rest[j:].strip()
        if tail and not tail.startswith("#"):
            raise FormatError(f"line {lineno}: unexpected text after the value")
        if key in values:
            raise FormatError(f"line {lineno}: duplicate key {key!r}")
        values[key] = value
    return values


def _toml_quote(s: str) -> str:
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


@dataclass(frozen=True)
class Credential:
    """What a device keeps after enrollment (spec 9.2): its ``id``, its identity ``key``
    ``k`` (32 bytes, secret: hidden from ``repr``), the ``server`` (``host:port``) it
    enrolled with, and ``server_key``, the server's static public key ``S`` from the
    enrollment token (the encrypted mode seals the id to it, 7.7).

    A credential file always holds ``server_key`` (9.2: all five entries are required);
    a ``Credential`` built in code may leave it ``None``, and then runs only the
    authenticated mode (``connect(..., encryption=False)``) and cannot be saved."""

    id: str
    key: bytes = field(repr=False)
    server: str
    server_key: Optional[bytes] = None

    def __post_init__(self):
        try:
            check_id(self.id)
        except ProtocolError:
            raise FormatError(f"credential id {self.id!r} breaks spec 4.1 "
                              "(1 to 64 of A-Z a-z 0-9 . _ - : @)") from None
        if len(self.key) != 32:
            raise FormatError("a credential key is 32 bytes")
        if not self.server:
            raise FormatError("a credential names its server")
        if self.server_key is not None and len(self.server_key) != 32:
            raise FormatError("a credential's server key is 32 bytes")

    @classmethod
    def parse(cls, text: Union[str, bytes]) -> "Credential":
        """Parse a credential file's text. Refuses a version other than 1, an id that breaks
        spec 4.1, a key or server key that is not 64 hex digits, a server key not in
        canonical form (9.1: its top bit set), and a missing id, key, server or server-key
        (9.2: all five entries are required). Unknown keys are ignored."""
        if isinstance(text, (bytes, bytearray)):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError:
                raise FormatError("a credential file is UTF-8") from None
        v = _parse_toml(text)
        version = v.get("tally-credential")
        if isinstance(version, bool) or version != 1:
            raise FormatError(f"tally-credential must be 1 (got {version!r}): not a version-1 "
                              "credential file")
        ident, key, server = v.get("id"), v.get("key"), v.get("server")
        server_key = v.get("server-key")
        if not isinstance(ident, str):
            raise FormatError("the credential has no id string")
        if not isinstance(key, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", key):
            raise FormatError("the credential key is not 64 hex digits")
        if not isinstance(server, str) or not server:
            raise FormatError("the credential has no server")
        if server_key is None:
            raise FormatError("the credential has no server-key (spec 9.2 requires it: the "
                              "server's static key S, from the enrollment token)")
        if not isinstance(server_key, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", server_key):
            raise FormatError("the credential's server-key is not 64 hex digits")
        if not server_key_is_canonical(bytes.fromhex(server_key)):
            raise FormatError("the credential's server-key " + _NOT_CANONICAL)
        return cls(ident, bytes.fromhex(key), server, bytes.fromhex(server_key))

    @classmethod
    def load(cls, path: PathLike) -> "Credential":
        """Read and parse a credential file. One that every user of the machine may read
        or write is refused (:class:`InsecureCredential`), as the ``tally`` CLI does."""
        with open(path, "rb") as fh:
            mode = os.fstat(fh.fileno()).st_mode & 0o7777
            if os.name == "posix" and mode & 0o006:
                raise InsecureCredential(
                    f"{os.fspath(path)} is accessible to every user of this machine "
                    f"(mode {mode:04o}), and its key lets anyone act as the device: "
                    f"`chmod 600 {os.fspath(path)}`, then try again")
            return cls.parse(fh.read())

    def format(self) -> str:
        """The file's text, exactly in the layout of spec 9.2. A credential without its
        server key cannot be written (the file requires it): :class:`FormatError`."""
        if self.server_key is None:
            raise FormatError("a credential file holds the server key S (spec 9.2), and this "
                              "credential has none")
        return ("# Tally device credential (spec/PROTOCOL.md section 9.2). Secret: keep it mode 0600.\n"
                "tally-credential = 1\n"
                f"id = {_toml_quote(self.id)}\n"
                f'key = "{self.key.hex()}"\n'
                f"server = {_toml_quote(self.server)}\n"
                f'server-key = "{self.server_key.hex()}"\n')

    def save(self, path: PathLike) -> None:
        """Write the file atomically with mode 0600: a new file in the same directory,
        flushed to disk, then renamed over ``path``."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        try:
            try:
                if hasattr(os, "fchmod"):
                    os.fchmod(fd, 0o600)  # whatever the umask
                data = self.format().encode("utf-8")
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if hasattr(os, "O_DIRECTORY"):
            try:
                dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                return
            try:
                os.fsync(dfd)
            except OSError:
                pass
            finally:
                os.close(dfd)

    def __str__(self) -> str:
        return f"<tally credential {self.id} at {self.server}>"
