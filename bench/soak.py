"""Soak the backend server: many mixed requests against one ``serve`` process, started the way
the add-on starts it (isolated, ``blender_occnet.client.serve_command``). Not a test: it prints
numbers, and exits 1 if a request got an unexpected reply.

    python bench/soak.py [--requests 500] [--resolution 32] [--seed 0]

The mix: valid point-cloud and image requests (shipped default models, tiny grids), requests
cancelled right after they start, malformed frames (garbage, bad JSON, a 200,000-deep header,
an over-long header), readable frames with bad content, bodies over the request size limit, and
requests that reuse an id still in flight. Every request waits for its reply before the next.

Reported: the server's resident memory (now and peak) at 100 / 250 / all requests, its open file
descriptors at start and end, its child processes, and whether it is gone after shutdown.
Linux only (reads /proc).
"""

import argparse
import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backend import wire  # noqa: E402
from blender_occnet import client  # noqa: E402

REPLY_TIMEOUT_S = 60.0
CHECKPOINTS = (100, 250)


class Server:
    """The backend child process and a thread that queues its frames."""

    def __init__(self):
        self.proc = subprocess.Popen(client.serve_command(sys.executable, ["--device", "cpu"]),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=client.child_env(), cwd=ROOT)
        self.frames = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.next_id = 0

    def _read(self):
        reader = wire.FrameReader(self.proc.stdout)
        while True:
            frame = reader.read()
            self.frames.put(frame)
            if frame is None:
                return

    def new_id(self):
        self.next_id += 1
        return self.next_id

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def reply(self, skip=("progress",)):
        """The next frame that is not a progress report: (header, arrays)."""
        while True:
            frame = self.frames.get(timeout=REPLY_TIMEOUT_S)
            if frame is None:
                raise RuntimeError("the server closed its output")
            if frame[0]["type"] not in skip:
                return frame


def proc_status(pid, key):
    """A field of /proc/PID/status in bytes (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def child_pids(pid):
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            found += [int(p) for p in f.read().split()]
    return found


def points(rng):
    directions = rng.normal(size=(rng.integers(200, 2000), 3))
    return (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)


def image(rng):
    pixels = np.zeros((64, 64, 4), np.uint8)
    lo, hi = sorted(rng.integers(8, 56, 2))
    pixels[lo:hi + 1, lo:hi + 1] = 200
    return pixels


def reconstruct_frame(req_id, kind, array, resolution):
    arrays = {"points": array} if kind == "points" else {"pixels": array}
    return wire.frame_bytes({"type": "reconstruct", "id": req_id, "input": kind,
                             "options": {"resolution": resolution}}, arrays)


def raw(header_bytes, body_len=0):
    return struct.pack("<4sIQ", wire.MAGIC, len(header_bytes), body_len) + header_bytes


# Each case sends its frames and returns what it got, as a short outcome name; "unexpected: ..."
# marks a reply that the protocol does not allow.

def case_valid(server, rng, resolution):
    rid = server.new_id()
    kind = "image" if rng.random() < 0.25 else "points"
    server.send(reconstruct_frame(rid, kind, image(rng) if kind == "image" else points(rng), resolution))
    header, arrays = server.reply()
    if header["type"] == "result" and header["id"] == rid and len(arrays["faces"]):
        return f"result ({kind})"
    return f"unexpected: {header}"


def case_cancelled(server, rng, resolution):
    rid = server.new_id()
    server.send(reconstruct_frame(rid, "points", points(rng), resolution)
                + wire.frame_bytes({"type": "cancel", "id": server.new_id(), "target": rid}))
    header, _ = server.reply()
    if header["id"] == rid and (header["type"] == "result" or header.get("code") == "cancelled"):
        return "cancelled" if header["type"] == "error" else "finished before the cancel"
    return f"unexpected: {header}"


MALFORMED = {
    "garbage": b"this is not a frame, just bytes.",
    "bad json": raw(b"{not json at all"),
    "nested header": raw(b'{"type": "ping", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    "header over 1 MiB": struct.pack("<4sIQ", wire.MAGIC, wire.MAX_HEADER_BYTES + 1, 0) + b"x" * 64,
    "array past the body": raw(json.dumps({"type": "ping", "id": 1, "arrays": [
        {"name": "a", "dtype": "<f4", "shape": [1 << 30], "offset": 0}]}).encode()),
}


def answered_then_in_sync(server):
    """After a frame that lost the stream position the reader skips everything up to the next
    frame (garbage sent then gets no reply of its own): a ping ends the skip, and its pong shows
    that the server serves again."""
    pid = server.new_id()
    server.send(wire.frame_bytes({"type": "ping", "id": pid}))
    pong, _ = server.reply()
    return pong["type"] == "pong" and pong["id"] == pid


def case_malformed(server, rng, resolution):
    name = list(MALFORMED)[rng.integers(len(MALFORMED))]
    server.send(MALFORMED[name])
    header, _ = server.reply()
    if (header["type"] == "error" and header["code"] == "protocol_error"
            and answered_then_in_sync(server)):
        return f"protocol_error ({name})"
    return f"unexpected: {header}"


def case_bad_request(server, rng, resolution):
    rid = server.new_id()
    bad = rng.integers(3)
    if bad == 0:
        data = wire.frame_bytes({"type": "reconstruct", "id": rid, "input": "points"},
                                {"points": np.full((10, 3), np.nan, np.float32)})
    elif bad == 1:
        data = wire.frame_bytes({"type": "reconstruct", "id": rid, "input": "voxels"})
    else:
        data = wire.frame_bytes({"type": "launch", "id": rid})
    server.send(data)
    header, _ = server.reply()
    if header["type"] == "error" and header["code"] == "bad_request" and header["id"] == rid:
        return "bad_request"
    return f"unexpected: {header}"


def case_oversized(server, rng, resolution):
    """A body announced over the request limit, then 1 MiB of it: refused by id, skipped."""
    rid = server.new_id()
    header = json.dumps({"type": "reconstruct", "id": rid, "input": "points"}).encode()
    server.send(raw(header, wire.MAX_REQUEST_BODY_BYTES + 8) + b"\x01" * (1 << 20))
    reply, _ = server.reply()
    if (reply["type"] == "error" and reply["code"] == "protocol_error" and reply["id"] == rid
            and answered_then_in_sync(server)):
        return "refused (oversized)"
    return f"unexpected: {reply}"


def case_duplicate(server, rng, resolution):
    rid = server.new_id()
    server.send(reconstruct_frame(rid, "points", points(rng), resolution)
                + wire.frame_bytes({"type": "ping", "id": rid}))
    replies = [server.reply()[0], server.reply()[0]]
    kinds = sorted((h["type"], h.get("code"), h["id"]) for h in replies)
    if kinds == [("error", "duplicate_id", None), ("result", None, rid)]:
        return "duplicate_id"
    return f"unexpected: {replies}"


CASES = ((case_valid, 0.40), (case_cancelled, 0.15), (case_malformed, 0.20),
         (case_bad_request, 0.10), (case_oversized, 0.10), (case_duplicate, 0.05))


def memory_row(pid, done, started):
    return {"requests": done, "rss_mb": proc_status(pid, "VmRSS") / 2**20,
            "peak_rss_mb": proc_status(pid, "VmHWM") / 2**20, "seconds": time.monotonic() - started}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=500)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    functions, weights = zip(*CASES)

    own_fds_start = open_fds(os.getpid())
    server = Server()
    pid = server.proc.pid
    hello, _ = server.reply()
    assert hello["type"] == "hello", hello
    case_valid(server, rng, args.resolution)  # warm: torch and both models loaded
    fds_start = open_fds(pid)
    rows = [memory_row(pid, 0, time.monotonic())]
    started = time.monotonic()
    outcomes = Counter()
    for done in range(1, args.requests + 1):
        case = functions[rng.choice(len(functions), p=weights)]
        outcomes[case(server, rng, args.resolution)] += 1
        if done in CHECKPOINTS or done == args.requests:
            rows.append(memory_row(pid, done, started))
            print(f"{done} requests, {rows[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    fds_end = open_fds(pid)
    children = child_pids(pid)
    server.send(wire.frame_bytes({"type": "shutdown", "id": server.new_id()}))
    server.proc.stdin.close()
    code = server.proc.wait(timeout=30)
    server.proc.stdout.close()
    gone = not os.path.exists(f"/proc/{pid}")

    print(f"{args.requests} requests at {args.resolution}^3 against one server (pid {pid})")
    print("\n| requests | RSS MB | peak RSS MB | seconds |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['requests']} | {r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |")
    print(f"\nserver open fds: {fds_start} at start, {fds_end} at end; child processes at end: "
          f"{len(children)}; exit code after shutdown {code}; process gone: {gone}")
    print(f"soak process open fds: {own_fds_start} before the server, {open_fds(os.getpid())} after")
    print("\noutcomes:")
    for name, n in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  {name}")
    bad = sum(n for name, n in outcomes.items() if name.startswith("unexpected"))
    leaked = fds_end != fds_start or children or not gone or code != 0
    return 1 if bad or leaked else 0


if __name__ == "__main__":
    sys.exit(main())
