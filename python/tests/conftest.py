"""Fixtures: a real tallyd, started once for the test session.

The daemon binary is ``$TALLYD_BIN``, default ``<repo>/target/debug/tallyd`` (built by
``cargo build --features cli --bins`` or ``cargo test``). It listens on 127.0.0.1:0 with a
fresh state directory; its address is read from its log (the line with `` addr=``; a
`` metrics_addr=`` line may exist too). A small configuration file makes it quick to test
against: refused strangers are answered at once (``refusal_delay = 0``) and the keepalive
interval is 1 s, so that keepalive is exercised in seconds.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TALLYD_BIN = os.environ.get("TALLYD_BIN") or os.path.join(REPO, "target", "debug", "tallyd")
KEEPALIVE = 1.0

CONFIG = f"""\
log_level = "info"
[limits]
refusal_delay = 0
keepalive = {KEEPALIVE}
"""


class Daemon:
    def __init__(self, binary, state_dir, log_path):
        self.binary = binary
        self.state_dir = state_dir
        self.log_path = log_path
        self.proc = None
        self.addr = None

    def log(self) -> str:
        with open(self.log_path, "r", errors="replace") as fh:
            return fh.read()

    def admin(self, *args, check=True, timeout=20) -> str:
        """Run ``tallyd --state-dir STATE ARGS...``; return its stdout."""
        p = subprocess.run([self.binary, "--state-dir", self.state_dir, *args],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           env=_env())
        if check and p.returncode != 0:
            raise AssertionError(f"tallyd {' '.join(args)} exited {p.returncode}:\n"
                                 f"{p.stderr.decode(errors='replace')}")
        return p.stdout.decode()

    def token(self, ident=None) -> str:
        return self.admin("token", *(["--id", ident] if ident else [])).strip()

    def identities(self):
        return {i["id"]: i for i in json.loads(self.admin("identities", "--json"))}

    def sessions(self):
        return {s["id"]: s for s in json.loads(self.admin("sessions", "--json"))}


def _env():
    env = dict(os.environ)
    env.pop("RUST_LOG", None)
    env.pop("TALLYD_CONFIG", None)
    return env


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    if not os.path.isfile(TALLYD_BIN) or not os.access(TALLYD_BIN, os.X_OK):
        pytest.fail(f"no tallyd binary at {TALLYD_BIN}: build it with "
                    "`cargo build --features cli --bins` (or set TALLYD_BIN)", pytrace=False)
    base = tmp_path_factory.mktemp("tallyd")
    state = str(base / "state")
    config = base / "tallyd.toml"
    config.write_text(CONFIG)
    d = Daemon(TALLYD_BIN, state, str(base / "tallyd.log"))
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(
            [TALLYD_BIN, "--config", str(config), "--listen", "127.0.0.1:0", "--state-dir", state,
             "--log-format", "text"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=_env())
    try:
        deadline = time.monotonic() + 30
        while d.addr is None:
            m = re.search(r" addr=(\S+)", d.log())
            if m:
                d.addr = m.group(1)
                break
            if d.proc.poll() is not None:
                pytest.fail(f"tallyd exited {d.proc.returncode} at start:\n{d.log()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"tallyd logged no ' addr=' line within 30 s:\n{d.log()}", pytrace=False)
            time.sleep(0.02)
        yield d
    finally:
        d.proc.terminate()
        try:
            d.proc.wait(3)
        except subprocess.TimeoutExpired:
            d.proc.kill()
            d.proc.wait()


_counter = [0]


@pytest.fixture
def new_id(request):
    """A fresh identity name per call, unique in the test session."""
    def make(prefix="py"):
        _counter[0] += 1
        name = re.sub(r"[^A-Za-z0-9]", "-", request.node.name)[:40]
        return f"{prefix}-{name}-{_counter[0]}"
    return make


@pytest.fixture
def enrolled(daemon, new_id):
    """Enroll a fresh identity with the open token; return its Credential."""
    import tally

    def make(prefix="py"):
        return tally.enroll(daemon.addr, daemon.token(), new_id(prefix))
    return make


def python_cli():
    """The command that runs this package's CLI with the interpreter running the tests."""
    return [sys.executable, "-m", "tally"]
