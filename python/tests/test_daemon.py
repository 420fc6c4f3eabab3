"""The Python client against a real tallyd (see conftest.py for the daemon fixture)."""
import json
import os
import shlex
import subprocess
import threading
import time

import pytest

import tally
from tally import CloseCode, ErrorCode, Status

from conftest import KEEPALIVE, TALLYD_BIN, python_cli


def wait_until(cond, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# --- Enrollment -------------------------------------------------------------------------

def test_enroll_open_then_connect_and_request(daemon, new_id, tmp_path):
    ident = new_id()
    # The five-line script of python/README.md.
    cred = tally.enroll(daemon.addr, daemon.token(), ident)
    cred.save(tmp_path / "dev.cred")
    with daemon.connect(str(tmp_path / "dev.cred")) as session:
        assert session.request(b"hello") == b"hello"
    assert os.stat(tmp_path / "dev.cred").st_mode & 0o777 == 0o600
    assert cred.id == ident and cred.server == daemon.addr and len(cred.key) == 32
    assert daemon.identities()[ident]["mode"] == "open"


def test_enroll_with_a_per_identity_token(daemon, new_id):
    ident = new_id()
    token = daemon.token(ident)
    assert token.startswith("tally1-token-")
    cred = tally.enroll(daemon.addr, token, ident)
    assert daemon.identities()[ident]["mode"] == "token"
    with daemon.connect(cred) as s:
        assert s.request("per-identity") == b"per-identity"
    # The token was consumed by the enrollment: it enrolls nothing again.
    with pytest.raises(tally.Refused) as e:
        tally.enroll(daemon.addr, token, ident)
    assert e.value.code == ErrorCode.ENROLL_REFUSED


def test_refused_enrollments(daemon, new_id):
    good = tally.EnrollmentToken.parse(daemon.token())
    wrong = tally.EnrollmentToken("open", os.urandom(32), good.server_key)
    ident = new_id()
    with pytest.raises(tally.Refused) as e:
        tally.enroll(daemon.addr, wrong, ident)
    assert e.value.code == ErrorCode.ENROLL_REFUSED and e.value.error == "refused"
    # A per-identity token works only for its own id.
    other = daemon.token(new_id())
    with pytest.raises(tally.Refused) as e:
        tally.enroll(daemon.addr, other, ident)
    assert e.value.code == ErrorCode.ENROLL_REFUSED
    assert ident not in daemon.identities()
    # An enrolled id is taken.
    tally.enroll(daemon.addr, good, ident)
    with pytest.raises(tally.Refused) as e:
        tally.enroll(daemon.addr, good, ident)
    assert e.value.code == ErrorCode.ID_TAKEN


def test_enrollment_refuses_a_server_without_the_pinned_key(daemon, new_id):
    good = tally.EnrollmentToken.parse(daemon.token())
    pinned_elsewhere = tally.EnrollmentToken("open", good.credential, os.urandom(32))
    ident = new_id()
    with pytest.raises(tally.AuthFailed) as e:
        tally.enroll(daemon.addr, pinned_elsewhere, ident)
    assert e.value.error == "bad_tag"
    # The client never confirmed: nothing was stored, and the id is still free.
    assert ident not in daemon.identities()
    tally.enroll(daemon.addr, good, ident)


# --- Sessions ---------------------------------------------------------------------------

def test_requests_and_messages(daemon, enrolled):
    cred = enrolled()
    with daemon.connect(cred) as s:
        assert s.server_max_frame_len == 65536 and s.server_keepalive == KEEPALIVE
        assert s.request(b"") == b""
        binary = bytes(range(256)) * 4
        assert s.request(binary) == binary
        # Each frame's overhead: 41 bytes of `length` besides its fields in the
        # authenticated mode, 25 in the encrypted mode (4.5).
        o = s.frame_overhead
        assert o == (25 if s.encrypted else 41)
        # The largest echo that fits both ways (a RESPONSE has 10 more bytes than a REQUEST).
        big = os.urandom(min(s.server_max_frame_len - o, s.max_frame_len - o - 10))
        assert s.request(big) == big
        # A REQUEST at the server's limit is taken; its echo cannot fit our limit, so the
        # server answers BACKEND_ERROR instead (spec 8.4).
        r = s.request_status(os.urandom(s.server_max_frame_len - o))
        assert r.status == Status.BACKEND_ERROR
        r = s.request_status(b"status")
        assert r == (Status.OK, b"status") and r.ok
        s.message(b"one-way")
        # Too large for the server's announced limit: refused here, the session goes on.
        with pytest.raises(tally.PayloadTooLarge):
            s.request(b"x" * (s.server_max_frame_len - o + 1))
        assert s.request("still here") == b"still here"


def test_concurrent_requests_from_threads(daemon, enrolled):
    cred = enrolled()
    results, errors = {}, []
    with daemon.connect(cred) as s:
        def worker(n):
            try:
                for j in range(20):
                    p = f"{n}-{j}".encode()
                    results[p] = s.request(p)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(results) == 160 and all(k == v for k, v in results.items())


def test_an_answer_above_our_limit_is_replaced_by_backend_error(daemon, enrolled):
    # We accept 256-byte frames; the echo of a 300-byte payload cannot fit, so the server
    # must answer BACKEND_ERROR with a short payload instead (spec 8.4).
    cred = enrolled()
    with daemon.connect(cred, max_frame_len=256) as s:
        r = s.request_status(b"y" * 300)
        assert r.status == Status.BACKEND_ERROR
        assert len(r.payload) <= 256 - s.frame_overhead - 10
        with pytest.raises(tally.StatusError) as e:
            s.request(b"y" * 300)
        assert e.value.status == Status.BACKEND_ERROR
        assert s.request(b"small") == b"small"


def test_keepalive_keeps_an_idle_session(daemon, enrolled):
    cred = enrolled()
    with daemon.connect(cred) as s:
        assert s.ping_interval <= s.server_keepalive
        # The server closes a session silent for 1.5 x its keepalive: our PINGs prevent it.
        time.sleep(1.6 * s.server_keepalive)
        assert not s.closed
        assert s.request(b"after idle") == b"after idle"


def test_unknown_identity_and_wrong_key_fail_authentication(daemon, enrolled, new_id):
    cred = enrolled()
    for bad in [tally.Credential(cred.id, os.urandom(32), cred.server, cred.server_key),
                tally.Credential(new_id("unknown"), os.urandom(32), cred.server, cred.server_key)]:
        with pytest.raises(tally.AuthFailed) as e:
            daemon.connect(bad)
        assert e.value.error == "bad_tag"
    with daemon.connect(cred) as s:
        assert s.request(b"ok") == b"ok"


def test_server_request_answered_and_server_message_taken(daemon, enrolled):
    cred = enrolled()
    messages = []
    with daemon.connect(cred) as s:
        def handler(payload):
            return b"answer to " + payload
        t = threading.Thread(target=s.serve, args=(handler, messages.append), daemon=True)
        t.start()
        wait_until(lambda: cred.id in daemon.sessions(), what="the session to be listed")
        out = daemon.admin("send", cred.id, "--request", "status?")
        assert out.rstrip("\n") == "answer to status?"
        daemon.admin("send", cred.id, "config changed")
        wait_until(lambda: messages == [b"config changed"], what="the message")
        # Several server requests, answered while our own requests go on.
        for n in range(3):
            assert daemon.admin("send", cred.id, "--request", f"r{n}").rstrip("\n") == f"answer to r{n}"
            assert s.request(f"mine {n}") == f"mine {n}".encode()
    t.join(5)
    assert not t.is_alive()  # serve() returns after our close()


def test_server_request_with_status_and_handler_failure(daemon, enrolled):
    cred = enrolled()
    with daemon.connect(cred) as s:
        def handler(payload):
            if payload == b"fail":
                raise RuntimeError("boom")
            return Status.REFUSED, b"no"
        t = threading.Thread(target=s.serve, args=(handler,), daemon=True)
        t.start()
        wait_until(lambda: cred.id in daemon.sessions(), what="the session to be listed")
        for payload, status in [("fail", "backend error"), ("other", "refused")]:
            p = subprocess.run([daemon.binary, "--state-dir", daemon.state_dir, "send", cred.id,
                                "--request", payload], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=20)
            # A non-OK answer is a failure of `tallyd send`, which names the status.
            assert p.returncode != 0
            assert status in p.stderr.decode().lower(), p.stderr
        assert s.request(b"alive") == b"alive"
    t.join(5)


def test_receive_loop(daemon, enrolled):
    cred = enrolled()
    with daemon.connect(cred) as s:
        wait_until(lambda: cred.id in daemon.sessions(), what="the session to be listed")
        with pytest.raises(tally.Timeout):
            s.receive(timeout=0.05)
        sender = threading.Thread(target=lambda: daemon.admin("send", cred.id, "--request", "q"))
        sender.start()
        item = s.receive(timeout=10)
        assert isinstance(item, tally.IncomingRequest) and item.payload == b"q"
        item.respond(b"a")
        with pytest.raises(ValueError):
            item.respond(b"twice")
        sender.join(10)


def test_queued_while_offline_delivered_in_order_and_acknowledged(daemon, enrolled):
    # Spec 8.8: queued while the device is away, delivered in id order when it connects,
    # deleted only once acknowledged; an unacknowledged one comes again, same id.
    cred = enrolled()
    ids = [int(daemon.admin("send", "--queue", cred.id, f"m{n}").strip()) for n in range(3)]
    ids.append(int(daemon.admin("send", "--queue", "--request", cred.id, "q").strip()))
    assert ids == sorted(ids) and len(set(ids)) == 4
    with daemon.connect(cred) as s:
        got = [s.receive(timeout=10) for _ in range(4)]
        assert all(isinstance(d, tally.IncomingDelivery) for d in got)
        assert [d.msg_id for d in got] == ids
        assert [d.payload for d in got] == [b"m0", b"m1", b"m2", b"q"]
        assert [d.is_request for d in got] == [False, False, False, True]
        got[0].ack()
        with pytest.raises(ValueError):
            got[0].ack()
        got[3].ack(b"answer")
        wait_until(lambda: len(json.loads(daemon.admin("queue", cred.id, "--json"))) == 2,
                   what="two acknowledged messages deleted")
    # m1 and m2 were never acknowledged: delivered again, with their ids; serve() acks.
    messages = []
    with daemon.connect(cred) as s:
        t = threading.Thread(target=s.serve, args=(None, messages.append), daemon=True)
        t.start()
        wait_until(lambda: messages == [b"m1", b"m2"], what="the redeliveries")
        wait_until(lambda: json.loads(daemon.admin("queue", cred.id, "--json")) == [],
                   what="the queue to empty")


def test_revocation_closes_the_session_and_refuses_reconnection(daemon, enrolled):
    cred = enrolled()
    s = daemon.connect(cred)
    assert s.request(b"before") == b"before"
    out = daemon.admin("revoke", cred.id)
    assert "revoked" in out
    err = s.wait(5)
    assert isinstance(err, tally.Closed), err
    assert err.code == CloseCode.REVOKED and err.by_peer
    with pytest.raises(tally.Closed) as e:
        s.request(b"after")
    assert e.value.code == CloseCode.REVOKED
    with pytest.raises(tally.AuthFailed):
        daemon.connect(cred)
    s.close()  # idempotent after the end


def test_revocation_ends_serve_with_the_reason(daemon, enrolled):
    cred = enrolled()
    with daemon.connect(cred) as s:
        assert s.request(b"x") == b"x"
        ended = []

        def run():
            try:
                s.serve(lambda p: p)
            except tally.Closed as e:
                ended.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        daemon.admin("revoke", cred.id)
        t.join(5)
        assert ended and ended[0].code == CloseCode.REVOKED


def test_takeover(daemon, enrolled):
    cred = enrolled()
    first = daemon.connect(cred)
    assert first.request(b"1") == b"1"
    with daemon.connect(cred) as second:
        assert second.request(b"2") == b"2"
        err = first.wait(5)
        assert isinstance(err, tally.Closed) and err.code == CloseCode.TAKEN_OVER, err
        with pytest.raises(tally.Closed):
            first.request(b"late")
        assert second.request(b"3") == b"3"
    first.close()


def test_close(daemon, enrolled):
    cred = enrolled()
    s = daemon.connect(cred)
    assert s.request(b"x") == b"x"
    wait_until(lambda: cred.id in daemon.sessions(), what="the session to be listed")
    t0 = time.monotonic()
    s.close(CloseCode.NORMAL, "bye")
    assert time.monotonic() - t0 < 1.5, "the server answers CLOSE with CLOSE at once"
    err = s.wait(0)
    assert isinstance(err, tally.Closed) and not err.by_peer
    with pytest.raises(tally.Closed):
        s.request(b"after close")
    s.close()
    wait_until(lambda: cred.id not in daemon.sessions(), what="the session to end")
    # The identity is still good.
    with daemon.connect(cred) as again:
        assert again.request(b"again") == b"again"


# --- The CLI, and interoperation with the Rust client's files -------------------------------

def test_python_cli(daemon, new_id, tmp_path):
    ident = new_id()
    token_file = tmp_path / "enroll.token"
    token_file.write_text(daemon.token() + "\n")
    out = tmp_path / "dev.cred"
    run = lambda *a, **kw: subprocess.run(python_cli() + list(a), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, timeout=30, **kw)
    p = run("enroll", "--token-file", str(token_file), "--id", ident, "--server", daemon.addr,
            "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.decode() == f"enrolled {ident} at {daemon.addr}; credential written to {out}\n"
    mode = daemon.cli_mode()
    p = run("request", "--cred", str(out), *mode, "hello")
    assert (p.returncode, p.stdout) == (0, b"hello"), p.stderr
    p = run("request", "--cred", str(out), *mode, input=b"from stdin")
    assert (p.returncode, p.stdout) == (0, b"from stdin"), p.stderr
    p = run("message", "--cred", str(out), *mode, "note")
    assert p.returncode == 0, p.stderr
    p = run("request", "--cred", str(tmp_path / "missing.cred"), "x")
    assert p.returncode == 1 and p.stderr.startswith(b"tally: ")


RUST_TALLY = os.path.join(os.path.dirname(TALLYD_BIN), "tally")
needs_rust_cli = pytest.mark.skipif(not os.access(RUST_TALLY, os.X_OK),
                                    reason=f"no Rust client at {RUST_TALLY}")


@needs_rust_cli
def test_credential_files_interoperate_with_the_rust_client(daemon, new_id, tmp_path):
    token_file = tmp_path / "enroll.token"
    token_file.write_text(daemon.token())
    # Written by this package (server-key included, 9.2), read by the Rust client.
    cred = tally.enroll(daemon.addr, token_file.read_text(), new_id())
    cred.save(tmp_path / "py.cred")
    p = subprocess.run([RUST_TALLY, "request", "--cred", str(tmp_path / "py.cred"), "rust on a py cred"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert (p.returncode, p.stdout) == (0, b"rust on a py cred"), p.stderr
    # Written by the Rust client, read by this package.
    rust_id = new_id("rust")
    p = subprocess.run([RUST_TALLY, "enroll", "--token-file", str(token_file), "--id", rust_id,
                        "--server", daemon.addr, "--out", str(tmp_path / "rust.cred")],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 0, p.stderr
    if "server-key" not in (tmp_path / "rust.cred").read_text() and not daemon.encryption:
        pytest.skip("this Rust client predates the encrypted mode: its credential has no "
                    "server-key, which spec 9.2 now requires")
    rust_cred = tally.Credential.load(tmp_path / "rust.cred")
    assert rust_cred.server_key == tally.EnrollmentToken.parse(token_file.read_text()).server_key
    with daemon.connect(rust_cred) as s:
        assert s.request(b"py on a rust cred") == b"py on a rust cred"


@needs_rust_cli
def test_rust_conformance_suite_for_clients(daemon, tmp_path):
    """`tally conformance client` plays a misbehaving server against our CLI, case by case.
    (A build whose tallyd predates the encrypted mode has a conformance tool that speaks
    the authenticated mode only: the CLI is then run with --authenticated-only.)"""
    py = shlex.join(python_cli())
    mode = " ".join(daemon.cli_mode())
    p = subprocess.run(
        [RUST_TALLY, "conformance", "client",
         "--exec", f"{py} request --retries 0 {mode} --cred {{cred}} {{payload}}",
         "--enroll-exec", f"{py} enroll --token-file - --server {{server}} --id {{id}} --out {{out}}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, cwd=tmp_path)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out
    assert " 0 failed" in out, out


# --- The encrypted mode (7.7, 7.8, 8.7) -----------------------------------------------------

needs_encryption = pytest.mark.usefixtures("_needs_encryption")


@pytest.fixture
def _needs_encryption(daemon):
    if not daemon.encryption:
        pytest.skip("this tallyd refuses the `encryption` configuration key (no encrypted mode)")


@needs_encryption
def test_encrypted_session(daemon, enrolled):
    cred = enrolled()
    assert cred.server_key == tally.EnrollmentToken.parse(daemon.token()).server_key
    with tally.connect(cred) as s:               # the default: encrypted
        assert s.encrypted
        assert s.request(b"sealed") == b"sealed"
        # 25 bytes of overhead per frame in this mode (4.5): the largest REQUEST that fits.
        big = os.urandom(s.server_max_frame_len - 25)
        r = s.request_status(big)
        assert r.status in (Status.OK, Status.BACKEND_ERROR)   # its echo may not fit ours
        with pytest.raises(tally.PayloadTooLarge):
            s.request(b"x" * (s.server_max_frame_len - 24))
        s.message(b"one-way")
        # The server's requests, answered in this mode too.
        t = threading.Thread(target=s.serve, args=(lambda p: b"sealed " + p,), daemon=True)
        t.start()
        wait_until(lambda: cred.id in daemon.sessions(), what="the session to be listed")
        assert daemon.admin("send", cred.id, "--request", "q").rstrip("\n") == "sealed q"
        assert s.request(b"still") == b"still"
    t.join(5)


@needs_encryption
def test_encrypted_key_updates_both_ways(daemon, enrolled):
    cred = enrolled()
    with tally.connect(cred) as s:
        s._state.key_update_frames = 2   # 2^20 in the field: a KEY_UPDATE every 2 frames
        for n in range(7):
            assert s.request(b"r%d" % n) == b"r%d" % n
        assert s._state.key_updates_sent >= 3
        assert not s.closed
    assert isinstance(s.wait(1), tally.Closed)


@needs_encryption
def test_both_modes_under_the_allowed_policy(daemon, enrolled):
    cred = enrolled()
    with tally.connect(cred, encryption=False) as s:
        assert not s.encrypted and s.request(b"clear") == b"clear"
    with tally.connect(cred, encryption=True) as s:
        assert s.encrypted and s.request(b"sealed") == b"sealed"


@needs_encryption
def test_encrypted_unknown_id_wrong_key_and_wrong_server_key_fail_alike(daemon, enrolled, new_id):
    cred = enrolled()
    for bad in [tally.Credential(cred.id, os.urandom(32), cred.server, cred.server_key),
                tally.Credential(new_id("unknown"), os.urandom(32), cred.server, cred.server_key),
                # Sealed to another key: the server cannot open the id (7.5).
                tally.Credential(cred.id, cred.key, cred.server, os.urandom(32))]:
        with pytest.raises(tally.AuthFailed) as e:
            tally.connect(bad)
        assert e.value.error == "bad_tag"


def test_policy_off_refuses_sealed_hello_and_the_client_does_not_fall_back(policy_daemon):
    d = policy_daemon("off")
    cred = tally.enroll(d.addr, d.token(), "py-policy-off")
    with pytest.raises(tally.Refused) as e:
        tally.connect(cred, retries=4)
    assert e.value.code == ErrorCode.MODE_REFUSED and e.value.mode_refused
    # No session was made behind our back in the other mode.
    assert "py-policy-off" not in d.sessions()
    with tally.connect(cred, encryption=False) as s:   # the user's choice, explicitly
        assert s.request(b"clear") == b"clear"


def test_policy_required_refuses_hello(policy_daemon):
    d = policy_daemon("required")
    cred = tally.enroll(d.addr, d.token(), "py-policy-required")
    with pytest.raises(tally.Refused) as e:
        tally.connect(cred, encryption=False, retries=4)
    assert e.value.code == ErrorCode.MODE_REFUSED
    with tally.connect(cred) as s:
        assert s.encrypted and s.request(b"sealed") == b"sealed"


def test_cli_reports_mode_refused(policy_daemon, tmp_path):
    d = policy_daemon("required")
    cred = tally.enroll(d.addr, d.token(), "py-policy-cli")
    cred.save(tmp_path / "c.cred")
    p = subprocess.run(python_cli() + ["request", "--cred", str(tmp_path / "c.cred"),
                                       "--authenticated-only", "x"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert p.returncode == 1 and b"MODE_REFUSED" in p.stderr, p.stderr
    p = subprocess.run(python_cli() + ["request", "--cred", str(tmp_path / "c.cred"), "x"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert (p.returncode, p.stdout) == (0, b"x"), p.stderr
