#!/usr/bin/env python3
"""A tallyd backend application in standard-library Python (protocol: spec/BACKEND.md).

    python3 examples/backend.py /tmp/app.sock
    tallyd --config tallyd.toml      # with backend = "unix:/tmp/app.sock"

It answers each device request with a greeting. A device that sends the request
"push-config ID" has a configuration pushed to device ID ("push-config" alone: to
itself) as a server-initiated REQUEST, and the answer to its own request says what that
device replied. Device MESSAGEs are
printed. Requests are handled on worker threads, so answers may go out in any order.
"""
import os
import socket
import struct
import sys
import threading

REQUEST, MESSAGE, RESULT = 0x01, 0x02, 0x03
RESPONSE, SEND = 0x81, 0x82
KIND_REQUEST, KIND_MESSAGE = 1, 2
OUTCOMES = {0: "delivered", 1: "not connected", 2: "failed", 3: "timed out", 4: "invalid"}


class Tallyd:
    """One connection from tallyd: reads its messages, writes ours."""

    def __init__(self, conn):
        self.conn = conn
        self.write_lock = threading.Lock()
        self.calls = {}            # our SEND calls waiting for a RESULT: call -> [event, result]
        self.next_call = 1
        self.calls_lock = threading.Lock()

    def write(self, ty, body):
        with self.write_lock:
            self.conn.sendall(struct.pack(">IB", 1 + len(body), ty) + body)

    def read_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def read(self):
        (length,) = struct.unpack(">I", self.read_exact(4))
        if length == 0 or length > (1 << 24) + 1024:
            raise ValueError(f"bad length {length}")
        msg = self.read_exact(length)
        return msg[0], msg[1:]

    def respond(self, call, status, payload):
        self.write(RESPONSE, struct.pack(">QH", call, status) + payload)

    def send(self, device, kind, payload):
        """Sends to a device; returns (outcome, status, payload). Blocks until tallyd answers."""
        with self.calls_lock:
            call = self.next_call
            self.next_call += 1
            waiter = self.calls[call] = [threading.Event(), None]
        ident = device.encode()
        self.write(SEND, struct.pack(">QB", call, kind) + bytes([len(ident)]) + ident + payload)
        waiter[0].wait()
        return waiter[1]


def parse_id(body, at):
    n = body[at]
    return body[at + 1:at + 1 + n].decode(), at + 1 + n


def handle_request(t, call, device, seq, payload):
    # "push-config" pushes to the asking device itself, "push-config ID" to device ID.
    if payload == b"push-config" or payload.startswith(b"push-config "):
        target = payload[len(b"push-config "):].decode(errors="replace") or device
        outcome, status, answer = t.send(target, KIND_REQUEST, b'{"interval":60}')
        if outcome != 0:
            t.respond(call, 1, f"could not reach {target}: {OUTCOMES.get(outcome)}".encode())
        elif status != 0:
            t.respond(call, 0, f"{target} answered with status {status}: ".encode() + answer)
        else:
            t.respond(call, 0, f"{target} answered: ".encode() + answer)
        return
    t.respond(call, 0, f"hello {device}, you said: ".encode() + payload)


def serve(t):
    while True:
        ty, body = t.read()
        if ty == REQUEST:
            (call,) = struct.unpack(">Q", body[:8])
            device, at = parse_id(body, 8)
            (seq,) = struct.unpack(">Q", body[at:at + 8])
            threading.Thread(target=handle_request, args=(t, call, device, seq, body[at + 8:]), daemon=True).start()
        elif ty == MESSAGE:
            device, at = parse_id(body, 0)
            print(f"message from {device}: {body[at:]!r}", file=sys.stderr, flush=True)
        elif ty == RESULT:
            call, outcome, status = struct.unpack(">QBH", body[:11])
            with t.calls_lock:
                waiter = t.calls.pop(call, None)
            if waiter:
                waiter[1] = (outcome, status, body[11:])
                waiter[0].set()
        else:
            raise ValueError(f"unknown message type {ty}")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "app.sock"
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(4)
    print(f"backend listening on {path}", file=sys.stderr, flush=True)
    while True:
        conn, _ = server.accept()
        print("tallyd connected", file=sys.stderr, flush=True)
        try:
            serve(Tallyd(conn))
        except (EOFError, ConnectionError, ValueError) as e:
            print(f"tallyd connection ended: {e!r}", file=sys.stderr, flush=True)
        finally:
            conn.close()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
