"""``python -m tally``: enroll, request, message, listen.

    python -m tally enroll --token-file enroll.token --id sensor-42 --out sensor-42.cred
    python -m tally request --cred sensor-42.cred hello
    python -m tally message --cred sensor-42.cred 'boot ok'
    python -m tally listen --cred sensor-42.cred --echo
    python -m tally request --cred sensor-42.cred --authenticated-only hello

Sessions run the encrypted mode (spec 7.7) unless ``--authenticated-only`` is given; the
client never switches modes by itself (a server that refuses the mode answers
MODE_REFUSED, and the command fails).

The token is read from ``--token-file`` (``-`` for stdin), else ``$TALLY_TOKEN``, else
stdin: never from the command line, where other local users could read it (spec 9.1).
Exit status 0 on success, 1 on any failure (the reason on stderr), 2 on bad usage.
"""
import argparse
import logging
import os
import sys

from . import (DEFAULT_RETRIES, DEFAULT_TIMEOUT, EnrollmentToken, Status, TallyError, connect,
               enroll)


def _read_token(args) -> EnrollmentToken:
    if args.token_file == "-" or (args.token_file is None and "TALLY_TOKEN" not in os.environ):
        return EnrollmentToken.parse(sys.stdin.read())
    if args.token_file is not None:
        return EnrollmentToken.load(args.token_file)
    return EnrollmentToken.parse(os.environ["TALLY_TOKEN"])


def _payload(args) -> bytes:
    if args.data is not None:
        return args.data.encode("utf-8")
    return sys.stdin.buffer.read()


def _connect(args):
    return connect(args.cred, timeout=args.timeout, retries=args.retries,
                   max_frame_len=args.max_frame_len, encryption=not args.authenticated_only)


def cmd_enroll(args) -> int:
    if os.path.exists(args.out) and not args.force:
        print(f"tally: {args.out} exists; --force replaces it", file=sys.stderr)
        return 1
    cred = enroll(args.server, _read_token(args), args.id, timeout=args.timeout,
                  retries=args.retries)
    cred.save(args.out)
    print(f"enrolled {cred.id} at {cred.server}; credential written to {args.out}")
    return 0


def cmd_request(args) -> int:
    payload = _payload(args)
    with _connect(args) as s:
        r = s.request_status(payload)
    if r.status != Status.OK:
        text = r.payload.decode("utf-8", "replace")
        print(f"tally: the server answered with status {r.status}" + (f": {text}" if text else ""),
              file=sys.stderr)
        return 1
    sys.stdout.buffer.write(r.payload)
    if sys.stdout.isatty() and not r.payload.endswith(b"\n"):
        sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0


def cmd_message(args) -> int:
    payload = _payload(args)
    with _connect(args) as s:
        s.message(payload)
    return 0


def cmd_listen(args) -> int:
    def show(kind: str, payload: bytes) -> None:
        print(f"{kind}: {payload.decode('utf-8', 'replace')}", flush=True)

    def on_request(payload: bytes):
        show("request", payload)
        if args.echo:
            return payload
        return Status.UNAVAILABLE, b"this device does not answer requests (listen without --echo)"

    with _connect(args) as s:
        print(f"listening as {s.id} at {s.server}", file=sys.stderr, flush=True)
        try:
            s.serve(on_request, lambda p: show("message", p))
        except KeyboardInterrupt:
            return 0
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tally",
                                description="Tally client (Python): enroll, request, message, listen")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds for each server answer before the session (default 10)")
        sp.add_argument("--retries", type=int, default=DEFAULT_RETRIES,
                        help="retries when the server is busy (default 4)")

    e = sub.add_parser("enroll", help="enroll this device and write its credential file (0600)")
    e.add_argument("--token-file", help="the enrollment token's file ('-': stdin); "
                   "default: $TALLY_TOKEN, else stdin")
    e.add_argument("--id", required=True, help="this device's identity")
    e.add_argument("--server", default="127.0.0.1:7420", help="host:port (default 127.0.0.1:7420)")
    e.add_argument("--out", default="tally.cred", help="credential file (default tally.cred)")
    e.add_argument("--force", action="store_true", help="replace an existing credential file")
    common(e)
    e.set_defaults(func=cmd_enroll)

    for name, func, text in [("request", cmd_request, "send one REQUEST, print the answer"),
                             ("message", cmd_message, "send one MESSAGE"),
                             ("listen", cmd_listen, "print what the server sends; answer requests")]:
        sp = sub.add_parser(name, help=text)
        sp.add_argument("--cred", default="tally.cred", help="credential file (default tally.cred)")
        sp.add_argument("--max-frame-len", type=int, default=65536,
                        help="largest session frame accepted (default 65536)")
        sp.add_argument("--authenticated-only", "--no-encryption", dest="authenticated_only",
                        action="store_true",
                        help="run the authenticated mode (HELLO: payloads and id in the clear, "
                             "HMAC per frame) instead of the default encrypted mode (spec 7.7)")
        if name == "listen":
            sp.add_argument("--echo", action="store_true", help="answer requests with their payload")
        else:
            sp.add_argument("data", nargs="?", help="the payload (default: stdin)")
        common(sp)
        sp.set_defaults(func=func)

    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)  # retries, handler failures
    try:
        return args.func(args)
    except (TallyError, OSError, ValueError) as err:
        print(f"tally: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
