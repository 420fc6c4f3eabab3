"""Fixtures: a real tallyd, started once for the test session.

The daemon binary is ``$TALLYD_BIN``, default ``<repo>/target/debug/tallyd`` (built by
``cargo build --features cli --bins`` or ``cargo test``). It listens on 127.0.0.1:0 with a
fresh state directory; its address is read from its log (the line with `` addr=``; a
`` metrics_addr=`` line may exist too). A small configuration file makes it quick to test
against: refused strangers are answered at once (``refusal_delay = 0``) and the keepalive
interval is 1 s, so that keepalive is exercised in seconds.

The encrypted mode (spec 7.7, 7.8): the daemon is started with ``encryption = "allowed"``
so that both modes run against it. A daemon that refuses that configuration key (it
predates the encrypted mode) is restarted without it: ``daemon.encryption`` is then False,
every test runs the authenticated mode (``daemon.connect``, ``daemon.cli_mode``), and the
encrypted-mode tests are skipped.
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

# Subprocesses (the CLI, and the commands `tally conformance client` runs) import the same
# copy of the package as the tests, whatever their working directory.
import tally as _tally  # noqa: E402

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(_tally.__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_PKG_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])

CONFIG = f"""\
log_level = "info"
{{encryption}}[limits]
refusal_delay = 0
keepalive = {KEEPALIVE}
"""


def config_text(policy=None) -> str:
    """The test configuration, with ``encryption = POLICY`` unless ``policy`` is None."""
    return CONFIG.replace("{encryption}", f'encryption = "{policy}"\n' if policy else "")


class Daemon:
    def __init__(self, binary, state_dir, log_path):
        self.binary = binary
        self.state_dir = state_dir
        self.log_path = log_path
        self.proc = None
        self.addr = None
        self.encryption = False   # started with `encryption = "allowed"` (both modes)

    def connect(self, credential, **kw):
        """``tally.connect`` in the mode this daemon runs: encrypted (the client's default)
        if it accepts the encrypted mode, else authenticated."""
        import tally
        kw.setdefault("encryption", self.encryption)
        return tally.connect(credential, **kw)

    def cli_mode(self):
        """The CLI arguments that choose the same mode as :meth:`connect`."""
        return [] if self.encryption else ["--authenticated-only"]

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


class ConfigRefused(Exception):
    pass


def start_daemon(base, config: str) -> Daemon:
    """Start tallyd in ``base`` with ``config``; return it once it logged its address.
    Raises :class:`ConfigRefused` if it exits at start naming an unknown field."""
    if not os.path.isfile(TALLYD_BIN) or not os.access(TALLYD_BIN, os.X_OK):
        pytest.fail(f"no tallyd binary at {TALLYD_BIN}: build it with "
                    "`cargo build --features cli --bins` (or set TALLYD_BIN)", pytrace=False)
    base.mkdir(parents=True, exist_ok=True)
    state = str(base / "state")
    path = base / "tallyd.toml"
    path.write_text(config)
    d = Daemon(TALLYD_BIN, state, str(base / "tallyd.log"))
    with open(d.log_path, "wb") as log:
        d.proc = subprocess.Popen(
            [TALLYD_BIN, "--config", str(path), "--listen", "127.0.0.1:0", "--state-dir", state,
             "--log-format", "text"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, env=_env())
    deadline = time.monotonic() + 30
    try:
        while d.addr is None:
            m = re.search(r" addr=(\S+)", d.log())
            if m:
                d.addr = m.group(1)
                break
            if d.proc.poll() is not None:
                if "unknown field" in d.log() and "encryption" in d.log():
                    raise ConfigRefused(d.log())
                pytest.fail(f"tallyd exited {d.proc.returncode} at start:\n{d.log()}", pytrace=False)
            if time.monotonic() > deadline:
                pytest.fail(f"tallyd logged no ' addr=' line within 30 s:\n{d.log()}", pytrace=False)
            time.sleep(0.02)
    except BaseException:
        stop_daemon(d)
        raise
    return d


def stop_daemon(d: Daemon) -> None:
    if d.proc is None or d.proc.poll() is not None:
        return
    d.proc.terminate()
    try:
        d.proc.wait(3)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        d.proc.wait()


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("tallyd")
    try:
        d = start_daemon(base / "allowed", config_text("allowed"))
        d.encryption = True
    except ConfigRefused:
        # A tallyd without the encrypted mode: the authenticated mode only.
        d = start_daemon(base / "plain", config_text(None))
    try:
        yield d
    finally:
        stop_daemon(d)


@pytest.fixture
def policy_daemon(daemon, tmp_path):
    """``policy_daemon(policy)``: a second tallyd with ``encryption = POLICY`` (7.8)."""
    if not daemon.encryption:
        pytest.skip("this tallyd refuses the `encryption` configuration key (no encrypted mode)")
    started = []

    def make(policy):
        d = start_daemon(tmp_path / f"tallyd-{policy}", config_text(policy))
        d.encryption = policy != "off"
        started.append(d)
        return d
    yield make
    for d in started:
        stop_daemon(d)


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
    """The command that runs this package's CLI with the interpreter running the tests
    (and the same copy of the package: see PYTHONPATH above)."""
    return [sys.executable, "-m", "tally"]
