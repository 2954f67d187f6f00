"""Blocks for the graph tests, importable by name in worker processes."""

import os
import signal
import time

import numpy as np

from multiqueue.graph import DONE, INSUFFICIENT_INPUT, OK, Block, Param, Port, block


class Ramp(Block):
    """``count`` frames of ``n`` float32; frame k holds k, k+1, ... k+n-1."""

    outputs = {"out": Port(np.float32)}

    def __init__(self, count=100, n=1024, pace_s=0.0):
        super().__init__()
        self.count, self.n, self.pace_s = count, n, pace_s
        self.k = 0

    def work(self, inputs):
        if self.k >= self.count:
            return DONE
        if self.pace_s and not self.sleep(self.pace_s):
            return DONE
        out = self.allocate("out", (self.n,))
        out.array[:] = np.arange(self.k, self.k + self.n, dtype=np.float32)
        self.send("out", out, timestamp=1_000_000 + self.k)
        self.k += 1
        return OK


class Record(Block):
    """Writes (first value, sum, length, timestamp) of every frame to ``path`` (.npy)
    when it stops; ``delay_s`` per frame makes it slow."""

    inputs = {"in": Port(np.float32)}

    def __init__(self, path, delay_s=0.0):
        super().__init__()
        self.path, self.delay_s = str(path), delay_s
        self.rows = []

    def work(self, inputs):
        for frame in inputs["in"]:
            a = frame.array
            self.rows.append((float(a[0]), float(a.astype(np.float64).sum()), a.size, frame.timestamp))
            if self.delay_s:
                self.sleep(self.delay_s)

    def stop(self):
        np.save(self.path + ".tmp.npy", np.array(self.rows, dtype=np.float64).reshape(-1, 4))
        os.replace(self.path + ".tmp.npy", self.path)


class Crash(Block):
    """Forwards frames; at frame ``at`` raises (``how="raise"``) or SIGKILLs its process."""

    inputs = {"in": Port(np.float32)}
    outputs = {"out": Port(np.float32)}

    def __init__(self, at=10, how="raise", marker=None):
        super().__init__()
        self.at, self.how, self.marker = at, how, marker
        self.seen = 0

    def work(self, inputs):
        for frame in inputs["in"]:
            self.seen += 1
            if self.seen == self.at and (self.marker is None or not os.path.exists(self.marker)):
                if self.marker is not None:
                    open(self.marker, "w").close()  # crash once, not again after a restart
                if self.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                    time.sleep(10)
                raise RuntimeError(f"crash on purpose at frame {self.seen}")
            self.send("out", frame)


@block(inputs={"in": np.float32}, outputs={"out": np.float32})
def scale(frames, factor=2.0):
    return [f * np.float32(factor) for f in frames]


@block(outputs={"out": np.float32})
def ramp_gen(count=5, n=8):
    for k in range(count):
        yield np.full(n, k, np.float32)


class Stuck(Block):
    """Takes its first frame and never returns from work() until aborted (a hung block)."""

    inputs = {"in": Port(np.float32)}

    def work(self, inputs):
        while self.sleep(0.05):
            pass  # sleep() ends only when the runtime aborts the graph


class Pid(Block):
    """Forwards frames; its process id is in the stats, for placement tests."""

    inputs = {"in": Port(np.float32)}
    outputs = {"out": Port(np.float32)}

    def work(self, inputs):
        for frame in inputs["in"]:
            self.send("out", frame)


class Ints(Block):
    """A source of int16 frames (for dtype checks)."""

    outputs = {"out": Port(np.int16)}

    def work(self, inputs):
        return DONE


class Window3(Block):
    """Needs three frames per output: their concatenation (INSUFFICIENT_INPUT + consume)."""

    inputs = {"in": Port(np.float32)}
    outputs = {"out": Port(np.float32)}

    def work(self, inputs):
        frames = inputs["in"]
        if len(frames) < 3:
            return INSUFFICIENT_INPUT
        self.send("out", np.concatenate([f.array for f in frames[:3]]))
        self.consume("in", 3)
        return OK


@block(inputs={"in": np.float32}, outputs={"out": np.float32})
def stamp_as_values(frames, timestamps):
    """Frames whose values are their input timestamps (checks the timestamps= keyword)."""
    for ts in timestamps[0]:
        yield np.full(2, ts, np.float32)


class Exit0(Block):
    """Forwards frames; at frame ``at`` its process exits with status 0 mid-run."""

    inputs = {"in": Port(np.float32)}

    def __init__(self, at=5):
        super().__init__()
        self.at, self.seen = at, 0

    def work(self, inputs):
        self.seen += len(inputs["in"])
        if self.seen >= self.at:
            os._exit(0)


class FailInit(Block):
    """A source whose initialize() raises."""

    outputs = {"out": Port(np.float32)}

    def initialize(self):
        raise RuntimeError("cannot open the device")

    def work(self, inputs):
        return DONE


class Inbox(Block):
    """Consumes frames; answers every message sent to it (on_message) on the sender's inbox."""

    inputs = {"in": Port(np.float32)}

    def __init__(self, path):
        super().__init__()
        self.path = str(path)

    def work(self, inputs):
        pass

    def on_message(self, message):
        self.bus.send(message.data["reply"], {"got": message.data, "from": "box"})


def die_once(marker: str) -> None:
    """SIGKILL this process unless ``marker`` exists; it is made first, so the process's
    restarted successor lives on."""
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(10)  # the signal is asynchronous: never run on meanwhile


class CountingCrash(Block):
    """Counts frames in its counters ("frames", "lives"); SIGKILLs itself once at frame
    ``at`` (a marker file says it did), after counting that frame."""

    inputs = {"in": Port(np.float32)}
    counters = ("frames", "lives")

    def __init__(self, at, marker):
        super().__init__()
        self.at, self.marker = at, marker

    def start(self):
        self.count("lives")

    def work(self, inputs):
        for _ in inputs["in"]:
            if self.count("frames") == self.at:
                die_once(self.marker)


class SendThenCrash(Block):
    """Forwards its input; SIGKILLs itself once right after the ``at``-th send (a
    marker file says it did), before any Python code could note that send.  Counters:
    ``lives``, and ``pushed_at_start``: what Block.pushed("out") said at its last start."""

    inputs = {"in": Port(np.float32)}
    outputs = {"out": Port(np.float32)}
    counters = ("pushed_at_start", "lives")

    def __init__(self, at, marker):
        super().__init__()
        self.at, self.marker = at, marker

    def start(self):
        self.count("lives")
        self.set_counter("pushed_at_start", self.pushed("out"))

    def work(self, inputs):
        for frame in inputs["in"]:
            self.send("out", frame)
            if self.pushed("out") == self.at:
                die_once(self.marker)
        return OK


@block(inputs={"in": np.float32}, outputs={"out": np.float32})
def typed_gain(frames, gain: Param(float, min=0, max=10) = 1.0, label: str = "x", taps=4, on=True,
               limit: int | None = None):
    """Forwards its frames; its parameters are typed by annotation (gain, label, limit)
    and by default (taps, on)."""
    return frames
