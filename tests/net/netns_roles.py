"""Roles for the network-namespace bridge test: each a multiqueue runtime of its own
domain, run by the test under ``ip netns exec NS``::

    python tests/netns_roles.py rx DOMAIN KEY ENDPOINT COUNT N RECORD   (BridgeSource listening)
    python tests/netns_roles.py tx DOMAIN KEY ENDPOINT COUNT N          (BridgeSink connecting)

Frame k holds the float32 values k*N .. k*N+N-1, timestamp ``T0 + k*PERIOD`` and time
range ``(ts, ts + PERIOD - 1)``.  The receiver's Check block verifies each frame as it
arrives and appends one row per frame to RECORD (int64: k, ok, timestamp, range start,
range end), flushed every work() call.

Each role reports on stdout, one JSON object per line with an "event" key: "ready" once
its graph runs (every block initialised: the receiver listens), then "done" with its
bridge block's counters, or "error".
"""

import contextlib
import json
import os
import sys
import traceback

import numpy as np

from multiqueue.graph import DONE, OK, Block, Port, Runtime
from multiqueue.net import BridgeSink, BridgeSource

T0 = 1_700_000_000_123_456_789  # ns; large, so a 32-bit or float round trip would show
PERIOD = 1_000_000
ROW = 5  # int64 fields per recorded frame
RUN_LIMIT_S = 60.0  # a role gives up (and says so) after this long


def expected(k: int, n: int) -> np.ndarray:
    return np.arange(k * n, k * n + n, dtype=np.float32)  # exact: below 2**24 for the test's sizes


class Frames(Block):
    """``count`` frames of ``n`` float32 encoding their index (see the module doc)."""

    outputs = {"out": Port(np.float32)}

    def __init__(self, count: int, n: int):
        super().__init__()
        self.total, self.n, self.k = count, n, 0

    def work(self, inputs):
        if self.k >= self.total:
            return DONE
        out = self.allocate("out", (self.n,))
        out.array[:] = expected(self.k, self.n)
        ts = T0 + self.k * PERIOD
        self.send("out", out, timestamp=ts, time_range=(ts, ts + PERIOD - 1))
        self.k += 1
        return OK


class Check(Block):
    """Verifies every frame against the pattern its first value names; appends a row each."""

    inputs = {"in": Port(np.float32)}

    def __init__(self, path: str, n: int):
        super().__init__()
        self.path, self.n = path, n
        self._file = None

    def initialize(self):
        self._file = open(self.path, "ab")

    def work(self, inputs):
        rows = []
        for frame in inputs["in"]:
            a = frame.array
            k = int(a[0]) // self.n if a.size else -1
            ok = a.dtype == np.float32 and a.shape == (self.n,) and np.array_equal(a, expected(k, self.n))
            start, end = frame.time_range if frame.time_range is not None else (-1, -1)
            rows.append((k, int(ok), frame.timestamp, start, end))
        if rows:
            self._file.write(np.array(rows, dtype="<i8").tobytes())
            self._file.flush()
        return OK

    def cleanup(self):
        if self._file is not None:
            self._file.close()
            self._file = None


def report(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> int:
    # the blocks' classes by this module's name (not __main__), for the spawned workers
    from netns_roles import Check, Frames

    role, domain, key, endpoint, count, n = sys.argv[1:7]
    count, n = int(count), int(n)
    rt = Runtime(domain)
    if role == "rx":
        bridge = rt.add(BridgeSource(key, dtype=np.float32, shape=(n,), zenoh={"listen": [endpoint]}), "rx")
        check = rt.add(Check(sys.argv[7], n), "check")
        rt.connect(bridge["out"], check["in"])
    else:
        src = rt.add(Frames(count, n), "src")
        bridge = rt.add(BridgeSink(key, zenoh={"connect": [endpoint]}), "tx")
        rt.connect(src["out"], bridge["in"])
    try:
        rt.start()
        report("ready", pid=os.getpid())
        finished = rt.wait(RUN_LIMIT_S)
        if not finished:
            rt.stop()
        stats = rt.final_stats
        report("done", finished=finished, counters=stats.blocks[bridge.name].counters,
               items={b.name: [b.items_in, b.items_out] for b in stats.blocks.values()},
               failures=[str(f) for f in rt.failures], in_use=rt.blocks_in_use_at_end)
    except KeyboardInterrupt:  # the test gives up on this run: stop in order, release the domain
        with contextlib.suppress(Exception):
            rt.stop(timeout=5)
        report("interrupted")
        return 1
    except Exception as e:  # the test shows why the role failed
        with contextlib.suppress(Exception):  # stopped already, or it raises the same failure again
            rt.stop(timeout=5)
        report("error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
