"""Roles for the bridge tests: each a separate interpreter running a graph of its own domain.

    python tests/bridge_roles.py tx DOMAIN KEY (--listen EP | --connect EP) --count N [--n 256]
                                 [--pace S] [--hold-at K] [--policy block|drop] [--linger S]
                                 [--drain-timeout S]
    python tests/bridge_roles.py rx DOMAIN KEY (--listen EP | --connect EP) --record PATH [--n 256]
                                 [--delay S] [--policy block|drop] [--buffer B] [--restart]
                                 [--kill-after-send K]

``tx`` runs StampedRamp -> BridgeSink, ``rx`` runs BridgeSource -> Recorder (each block in a
worker process of its own; with ``--kill-after-send K`` the BridgeSource SIGKILLs itself
once, right after delivering its K-th frame).  A role reports on stdout, one JSON object per line with an
"event" key: {"event": "ready", "pid": ..., "pids": {block: worker pid}} once its graph has
started, then {"event": "done", "counters": {block: {...}}, "error": None or why, ...} when it
ends.
stdin takes "release" (tx: let a held ramp go on) and "stop" (stop the graph in order).

Frame k of a stream (``n`` float32) holds k*n, k*n+1, ... k*n+n-1; its timestamp and time
range are known functions of k (``stamp``), so a receiver can check every frame exactly.
The Recorder appends one line per frame to its file, one write per work() batch.
"""

import argparse
import json
import os
import queue
import sys
import threading
import time
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: graph_blocks
from graph_blocks import die_once  # noqa: E402

from multiqueue.errors import BlockError
from multiqueue.graph import DONE, OK, Block, Port, Runtime
from multiqueue.net import BridgeSink, BridgeSource

T0 = 1_700_000_000_000_000_000  # ns: the timestamp of frame 0


def stamp(k: int) -> tuple[int, tuple[int, int]]:
    """The timestamp and time range of frame k."""
    ts = T0 + k * 1_000_003
    return ts, (ts - 500 - k, ts + 999_999 + 7 * k)


def payload(k: int, n: int) -> np.ndarray:
    return np.arange(k * n, (k + 1) * n, dtype=np.float32)


def checksum(k: int, n: int) -> int:
    return zlib.crc32(payload(k, n).tobytes())


class DiesAfterSend(BridgeSource):
    """A BridgeSource that SIGKILLs itself once, right after delivering its ``at``-th
    frame and before its own code can count it: the window a random kill rarely hits.
    A marker file (``marker``) keeps its restarted successor alive."""

    def __init__(self, *args, at: int, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.marker = at, marker

    def send(self, port, frame, **kwargs):
        super().send(port, frame, **kwargs)
        if self.pushed(port) == self.at:
            die_once(self.marker)


class StampedRamp(Block):
    """``count`` frames (see the module doc); with ``hold_at`` >= 0 it waits before that
    frame until the parameter changes (``release``)."""

    outputs = {"out": Port(np.float32)}
    parameters = ("hold_at",)

    def __init__(self, count, n=256, pace_s=0.0, hold_at=-1):
        super().__init__()
        self.count, self.n, self.pace_s, self.hold_at = count, n, pace_s, hold_at
        self.k = 0

    def work(self, inputs):
        if self.k >= self.count:
            return DONE
        if self.k == self.hold_at:
            return OK if self.sleep(0.005) else DONE  # the parameter is applied between work() calls
        if self.pace_s and not self.sleep(self.pace_s):
            return DONE
        out = self.allocate("out", (self.n,))
        out.array[:] = payload(self.k, self.n)
        ts, time_range = stamp(self.k)
        self.send("out", out, timestamp=ts, time_range=time_range)
        self.k += 1
        return OK


class Recorder(Block):
    """One line per frame, appended to ``path``: index, checksum, size, timestamp, time range
    ("k crc size ts start end", "- -" without a range).  One os.write per work() batch: what
    a batch recorded survives a kill of any process."""

    inputs = {"in": Port(np.float32)}

    def __init__(self, path, n=256, delay_s=0.0):
        super().__init__()
        self.path, self.n, self.delay_s = str(path), n, delay_s
        self._fd = None

    def initialize(self):
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def work(self, inputs):
        lines = []
        for frame in inputs["in"]:
            if self.delay_s:
                self.sleep(self.delay_s)
            a = frame.array
            k = int(a[0]) // self.n if a.size else -1
            tr = frame.time_range
            lines.append(f"{k} {zlib.crc32(a.tobytes())} {a.size} {frame.timestamp} "
                         f"{'- -' if tr is None else f'{tr[0]} {tr[1]}'}\n")
        if lines:
            os.write(self._fd, "".join(lines).encode())

    def cleanup(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_record(path) -> list[tuple]:
    """A Recorder's file: [(k, crc, size, ts, time_range or None), ...]."""
    rows = []
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        k, crc, size, ts, start, end = line.split()
        rows.append((int(k), int(crc), int(size), int(ts), None if start == "-" else (int(start), int(end))))
    return rows


def report(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def zenoh_settings(args) -> dict:
    return {"listen": [args.listen]} if args.listen else {"connect": [args.connect]}


def build(args) -> Runtime:
    rt = Runtime(args.domain, drain_timeout=args.drain_timeout)
    z = zenoh_settings(args)
    if args.role == "tx":
        src = rt.add(StampedRamp(args.count, args.n, args.pace, args.hold_at), "src")
        tx = rt.add(BridgeSink(args.key, policy=args.policy, zenoh=z, linger=args.linger), "tx")
        rt.connect(src["out"], tx["in"])
    else:
        options = dict(dtype=np.float32, policy=args.policy, zenoh=z, buffer=args.buffer)
        source = (BridgeSource(args.key, **options) if args.kill_after_send is None else
                  DiesAfterSend(args.key, **options, at=args.kill_after_send, marker=f"{args.record}.killed"))
        rx = rt.add(source, "rx", restart="restart" if args.restart else "stop")
        rec = rt.add(Recorder(args.record, args.n, args.delay), "rec")
        rt.connect(rx["out"], rec["in"])
    return rt


def summary(stats) -> dict:
    return {name: {"counters": b.counters, "items_in": b.items_in, "items_out": b.items_out,
                   "restarts": b.restarts, "failures": b.failures, "state": b.state, "pid": b.pid,
                   "work_s": b.work_s}
            for name, b in stats.blocks.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("tx", "rx"))
    parser.add_argument("domain")
    parser.add_argument("key")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen")
    where.add_argument("--connect")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--hold-at", type=int, default=-1)
    parser.add_argument("--policy", default="block")
    parser.add_argument("--record")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--buffer", type=int, default=64)
    parser.add_argument("--restart", action="store_true")
    parser.add_argument("--kill-after-send", type=int, default=None)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--drain-timeout", type=float, default=3.0)
    parser.add_argument("--linger", type=float, default=10.0)
    args = parser.parse_args()

    commands: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [commands.put(line.strip()) for line in sys.stdin], daemon=True).start()
    rt = build(args)
    t0 = time.monotonic()
    rt.start()
    report("ready", pid=os.getpid(), pids={name: b.pid for name, b in rt.stats().blocks.items()})
    error = None
    try:
        while not rt.wait(0.05):
            while not commands.empty():
                command = commands.get()
                if command == "release":
                    rt.set_parameter("src", "hold_at", -1)
                elif command == "stop":
                    rt.stop()
            if time.monotonic() - t0 > args.duration:
                error = f"still running after {args.duration} s"
                rt.stop()
    except BlockError as e:
        error = str(e)
    blocks = summary(rt.final_stats) if rt.final_stats is not None else {}
    report("done", blocks=blocks, counters={name: b["counters"] for name, b in blocks.items()},
           error=error, failures=[str(f) for f in rt.failures], seconds=time.monotonic() - t0,
           blocks_in_use=rt.blocks_in_use_at_end)


if __name__ == "__main__":
    main()
