#!/usr/bin/env python3
"""Writes the seed corpus of the protocol fuzz targets from spec/vectors/ (run by run.sh).

Only its own files (`vector-NNN` in the directories of the four protocol targets) are
written and removed: the hand-written seeds of the other targets (credential,
c_credential, c_api, config, control) are left alone, and .ci/run compares only the
directories this script writes."""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
VEC = os.path.join(HERE, "..", "spec", "vectors")


def load(name):
    with open(os.path.join(VEC, name)) as f:
        return json.load(f)


def frames(v, key="frames"):
    return [bytes.fromhex(f["hex"]) for f in v[key]]


def main(out):
    seeds = {"frame_decoder": [], "enroll": [], "handshake": [], "session": []}
    for name in ("enroll-open.json", "enroll-token.json"):
        fs = frames(load(name))
        seeds["frame_decoder"] += fs + [b"".join(fs)]
        seeds["enroll"] += [fs[0] + fs[2], fs[1] + fs[3]]
    # The session target's input: a mask byte (which frames get a valid seal), a mode
    # byte (bit 0: the encrypted mode), then frames.
    for name, mode in (("session.json", b"\x00"), ("session-encrypted.json", b"\x01")):
        s = load(name)
        hs = frames(s, "handshake")
        seeds["frame_decoder"] += hs
        seeds["handshake"] += [hs[0] + hs[2], hs[1]]
        c2s = [bytes.fromhex(f["hex"]) for f in s["frames"] if f["direction"] == "c2s"]
        seeds["session"] += [b"\x00" + mode + b"".join(c2s), b"\xff" + mode + b"".join(c2s)]
        seeds["session"] += [b"\x01" + mode + f for f in c2s]
    for case in load("negative.json")["cases"]:
        seeds["frame_decoder"].append(bytes.fromhex(case["input"]))
    for target, items in seeds.items():
        d = os.path.join(out, target)
        os.makedirs(d, exist_ok=True)
        for i, item in enumerate(items):
            with open(os.path.join(d, f"vector-{i:03}"), "wb") as f:
                f.write(item)
        # Seeds of vectors that are gone.
        for name in os.listdir(d):
            if name.startswith("vector-") and int(name[7:]) >= len(items):
                os.remove(os.path.join(d, name))
        print(f"{target}: {len(items)} seeds")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "seeds"))
