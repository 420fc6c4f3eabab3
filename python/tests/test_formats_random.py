"""Randomized property test of the credential-file and enrollment-token readers (spec 9.2
and 9.1), in place of a fuzzer: thousands of mutations of valid files and tokens (a fixed
seed, so every run reads the same inputs). Each input is either read as valid values,
which the writer writes back and the reader reads again unchanged, or refused with
:class:`tally.FormatError`, the readers' documented error; any other exception fails.
"""
import random

import pytest

from tally.errors import FormatError
from tally.formats import Credential, EnrollmentToken
from tally.frames import check_id

ROUNDS = 4000

KEY = "07" * 32
# Spec 9.2 is gaining the entry `server-key`; a reader that does not know it ignores it.
SERVER_KEY = "5e" * 32
CREDENTIALS = [
    "# Tally device credential (spec/PROTOCOL.md section 9.2). Secret: keep it mode 0600.\n"
    f'tally-credential = 1\nid = "sensor-42"\nkey = "{KEY}"\nserver = "127.0.0.1:7420"\n'
    f'server-key = "{SERVER_KEY}"\n',
    f'tally-credential = 1\r\nid = "dev.1:a@b_c-d"\r\n\r\n# a comment\r\nkey = "{KEY.upper()}"  # hex\r\n'
    'server = "[2001:db8::1]:7420"\r\nnote = "a later version may add entries"\r\n'
    f'server-key = "{SERVER_KEY.upper()}"\r\n',
    f"tally-credential = 1\nid = 'x'\nkey = \"{'ab' * 32}\"\n\"server\" = \"host.example:7420\"\n"
    f"server-key = '{SERVER_KEY}'\n",
]
TOKENS = [
    "tally1-open-" + "00" * 32 + "-" + "11" * 32 + "\n",
    # S in canonical form (9.1: its last byte below 0x80).
    " \ttally1-token-" + "AB" * 32 + "-" + "cd" * 31 + "4D" + "\r\n",
]
# Pieces that reach the readers' corners: escapes (valid, invalid, out of Unicode's
# range, surrogates), quotes, comments, line ends TOML has and those it has not, long
# numbers, tables, other value types.
PIECES = [
    '"', "'", "\\", "\\n", "\\t", '\\"', "\\\\", "\\u0041", "\\U0001F600", "\\uD800",
    "\\uDFFF", "\\U00110000", "\\UFFFFFFFF", "\\x41", "\\u12", "#", "=", " = ", "\n", "\r\n",
    "\r", "\x00", "\x7f", "\x85", "\u2028", "\x0b", "\x0c", "\x1c", "\ufeff", "\u00e9", "\U0001F600",
    "[", "[table]\n", "[[a]]\n", '"""', "'''", "1" * 5000, "9" * 19, "+1", "-1", "0x1", "1_0",
    "01", "1.0", "true", "1e0", "tally-credential = 1\n", "tally-credential = 2\n",
    'id = "x"\n', f'key = "{KEY}"\n', 'server = "h:1"\n', f'server-key = "{SERVER_KEY}"\n', 'id = ""\n', "A" * 65, "a" * 300,
    "tally1-", "-open-", "-token-", "0" * 64, "G",
]


def mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        n = len(text)
        i, j = sorted((rng.randint(0, n), rng.randint(0, n)))
        op = rng.randrange(8)
        if op == 0:
            text = text[:i] + rng.choice(PIECES) + text[i:]
        elif op == 1:
            text = text[:i] + text[j:]
        elif op == 2:
            text = text[:i] + chr(rng.choice([rng.randrange(0x80), rng.randrange(0x110000)])) + text[i + 1:]
        elif op == 3:
            lines = text.splitlines(keepends=True)
            rng.shuffle(lines)
            text = "".join(lines)
        elif op == 4:
            lines = text.splitlines(keepends=True)
            if lines:
                k = rng.randrange(len(lines))
                lines.insert(rng.randrange(len(lines) + 1), lines[k])
            text = "".join(lines)
        elif op == 5:
            text = text[:i] + text[i:j].swapcase() + text[j:]
        elif op == 6:
            text = text[:i] + rng.choice(PIECES) + text[j:]
        else:
            text = text[:j] + text[i:j] + text[j:]
    return text


def as_input(rng: random.Random, text: str):
    """The text as str, or as bytes (UTF-8, or mangled into invalid UTF-8)."""
    kind = rng.randrange(3)
    if kind == 0:
        return text
    data = text.encode("utf-8", "surrogatepass")
    if kind == 2 and data:
        k = rng.randrange(len(data))
        data = data[:k] + bytes([rng.randrange(256)]) + data[k + 1:]
    return data


def read_or_refuse(parse, data):
    try:
        return parse(data)
    except FormatError:
        return None
    except Exception as e:  # anything else breaks the documented contract
        pytest.fail(f"{parse.__qualname__}({data!r}) raised {type(e).__name__}: {e}")


def test_mutated_credential_files_are_read_or_refused_with_format_error():
    rng = random.Random(92)
    accepted = 0
    for _ in range(ROUNDS):
        data = as_input(rng, mutate(rng, rng.choice(CREDENTIALS)))
        c = read_or_refuse(Credential.parse, data)
        if c is None:
            continue
        accepted += 1
        # Valid values: an id of spec 4.1, a 32-byte key, a server.
        assert check_id(c.id) == c.id.encode("ascii")
        assert isinstance(c.key, bytes) and len(c.key) == 32
        assert isinstance(c.server, str) and c.server
        # The writer writes it back (a UTF-8 file) and the reader reads the same.
        written = read_or_refuse(lambda t: t.format().encode("utf-8"), c)
        assert read_or_refuse(Credential.parse, written) == c, (data, written)
    # The mutations leave a fair share readable (else the test tests little).
    assert accepted > ROUNDS // 20, accepted


def test_mutated_tokens_are_read_or_refused_with_format_error():
    rng = random.Random(91)
    accepted = 0
    for _ in range(ROUNDS):
        data = as_input(rng, mutate(rng, rng.choice(TOKENS)))
        t = read_or_refuse(EnrollmentToken.parse, data)
        if t is None:
            continue
        accepted += 1
        assert t.mode in ("open", "token")
        assert len(t.credential) == 32 and len(t.server_key) == 32
        text = data.decode("ascii") if isinstance(data, bytes) else data
        # The line the writer gives is the input without its whitespace, lower case.
        assert t.format() == text.strip(" \t\r\n").lower()
        assert EnrollmentToken.parse(t.format()) == t
    assert accepted > ROUNDS // 50, accepted


# What the random inputs found, kept as regression tests.

@pytest.mark.parametrize("escape", ["\\U00110000", "\\UFFFFFFFF", "\\uD800", "\\uDFFF"])
def test_an_escape_that_is_no_unicode_scalar_value_is_a_format_error(escape):
    # chr() raised ValueError past 0x10FFFF; a surrogate was read, and the writer could
    # not encode what the reader had accepted (UnicodeEncodeError).
    text = CREDENTIALS[0].replace('server = "127.0.0.1', f'server = "{escape}127.0.0.1')
    with pytest.raises(FormatError, match="scalar value"):
        Credential.parse(text)


@pytest.mark.parametrize("number", ["1" * 5000, "9223372036854775808", "-9223372036854775809"])
def test_an_integer_beyond_64_bits_is_a_format_error(number):
    # int() raised ValueError over 4300 digits (Python 3.11's limit).
    text = CREDENTIALS[0].replace("tally-credential = 1", f"tally-credential = {number}")
    with pytest.raises(FormatError, match="out of range"):
        Credential.parse(text)
