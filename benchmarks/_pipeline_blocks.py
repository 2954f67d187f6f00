"""The worker side of benchmarks/pipeline.py: the chain's blocks (multiqueue) and processes (mp.Queue).

Both chains are source -> stage1 -> stage2 -> sink, one process each, moving frames of
FRAME float32 (1 MiB).  A frame's first HEADER int64 words are its header, written by the
source and read (and one word written) by every hop; its last int64 word repeats the
sequence number (the sink checks head == tail):

    SEQ    sequence number, 0, 1, 2... (every receiver checks it is the next one)
    PHASE  the source's phase when it sent the frame (WARMUP, LOAD, SETTLE, PACED, WINDOW)
    HOPS   incremented in place by each stage (the sink checks it is 2)
    T_SRC  CLOCK_MONOTONIC ns when the source sent it (end-to-end latency)
    T_HOP  mp.Queue only: when the current hop sent it (multiqueue: the buffer's timestamp)

Per-hop latency = (time the receiving hop's code first sees the frame) - (time the
sending hop stamped it, just before handing it to its queue).  With multiqueue the stamp
is the buffer timestamp (``send(timestamp=)`` at the source, ``frame.timestamp =`` at
the stages, which then forward the input frame zero-copy); the receive time is taken on
entry to ``work()``.  With mp.Queue the stamp is word T_HOP of the array, written just
before ``put()``; the receive time is taken when ``get()`` returns.

A source runs a schedule of phases: WARMUP and LOAD as fast as the chain takes frames
(back-pressure), SETTLE and PACED at ``rate`` frames/s, then WINDOW: back to back with
one frame in flight (the source sends the next frame when the sink has received the
previous one; multiqueue: the source holds all the pool's blocks but one, so its
allocate() waits for the sink to release the frame; mp.Queue: a semaphore the sink
releases).  The source stamps a frame after that wait.  On entering SETTLE and WINDOW
the source first waits until the chain has drained (multiqueue: it allocates every block
of the pool; mp.Queue: until the sink's shared counter of frames received catches up).
Every receiver records,
per frame: receive time, sequence number, phase, hop latency (and at the sink the
end-to-end latency), plus process CPU time when the phase changes; at the end it hands
the records over (multiqueue: an .npz file written in ``stop()``; mp: its result pipe).
"""

import cProfile
import json
import os
import time
from dataclasses import dataclass

import numpy as np
from _common import clock, ignore_ctrl_c

from multiqueue.graph import DONE, Block, Port

FRAME = 262144  # float32 samples per frame: 1 MiB
HEADER = 5
SEQ, PHASE, HOPS, T_SRC, T_HOP = range(HEADER)
WARMUP, LOAD, SETTLE, PACED, WINDOW = range(5)
PHASE_NAMES = ("warmup", "load", "settle", "paced", "window")


@dataclass(frozen=True)
class Schedule:
    """The source's phases, in seconds, and the frame rate of the paced ones."""

    warmup_s: float
    load_s: float
    settle_s: float
    paced_s: float
    window_s: float
    rate: float

    @property
    def durations(self) -> tuple[float, ...]:
        return self.warmup_s, self.load_s, self.settle_s, self.paced_s, self.window_s

    def ends_ns(self) -> list[int]:
        """Ends of the phases, in ns since the source started."""
        ends, t = [], 0.0
        for s in self.durations:
            t += s
            ends.append(int(t * 1e9))
        return ends

    @property
    def total_s(self) -> float:
        return sum(self.durations)


class Pacer:
    """The source's clock: which phase it is, and when the next paced frame is due."""

    def __init__(self, schedule: Schedule):
        self.ends = schedule.ends_ns()
        self.period = int(1e9 / schedule.rate)
        self.t0 = clock()
        self.due = 0  # the next paced frame's time (0: not paced yet)
        self.cpu: dict[int, tuple[float, int]] = {}  # phase -> (process CPU s, frames sent) on entry
        self.sent = [0] * len(PHASE_NAMES)

    def phase(self, now: int) -> int | None:
        elapsed = now - self.t0
        for phase, end in enumerate(self.ends):
            if elapsed < end:
                if phase not in self.cpu:
                    self.cpu[phase] = (time.process_time(), sum(self.sent))
                return phase
        return None

    def wait_ns(self, now: int) -> int:
        """How long to wait before the next paced frame (0: now)."""
        if self.due == 0:
            self.due = now
        return max(0, self.due - now)

    def sent_one(self, phase: int, now: int) -> None:
        self.sent[phase] += 1
        if phase in (SETTLE, PACED):  # the next one a period later, without bursts to catch up
            self.due = max(self.due + self.period, now)

    def result(self) -> dict:
        cpu = dict(self.cpu)
        cpu[len(self.ends)] = (time.process_time(), sum(self.sent))
        return {"sent": self.sent, "cpu": {str(k): v for k, v in cpu.items()}}


class Recorder:
    """A receiver's records: one entry per frame, and CPU time at each phase change."""

    def __init__(self, hops_expected: int | None = None):
        self.t: list[int] = []
        self.seq: list[int] = []
        self.phase: list[int] = []
        self.hop_ns: list[int] = []
        self.e2e_ns: list[int] = []
        self.cpu: dict[int, tuple[float, int]] = {}
        self.last_phase = -1
        self.bad = 0  # out of order, or a damaged header / tail
        self.hops_expected = hops_expected

    def add(self, t: int, header, tail: int | None, hop_ns: int) -> None:
        seq, phase = int(header[SEQ]), int(header[PHASE])
        if phase != self.last_phase:
            self.cpu[phase] = (time.process_time(), len(self.seq))
            self.last_phase = phase
        if seq != len(self.seq) or (tail is not None and tail != seq):
            self.bad += 1
        if self.hops_expected is not None:
            if int(header[HOPS]) != self.hops_expected:
                self.bad += 1
            self.e2e_ns.append(t - int(header[T_SRC]))
        self.t.append(t)
        self.seq.append(seq)
        self.phase.append(phase)
        self.hop_ns.append(hop_ns)

    def result(self) -> dict:
        cpu = dict(self.cpu)
        cpu[len(PHASE_NAMES)] = (time.process_time(), len(self.seq))  # the end
        return {
            "t": np.array(self.t, np.int64), "seq": np.array(self.seq, np.int64),
            "phase": np.array(self.phase, np.int8), "hop_ns": np.array(self.hop_ns, np.int64),
            "e2e_ns": np.array(self.e2e_ns, np.int64), "bad": self.bad,
            "cpu": {str(k): v for k, v in cpu.items()},
        }


class _Profiled:
    """Optional cProfile of a block's thread (from start() to stop()) or a worker."""

    def __init__(self, directory: str | None, name: str):
        self.path = None if directory is None else os.path.join(directory, f"{name}.prof")
        self.profile = None
        if self.path:
            self.profile = cProfile.Profile()
            self.profile.enable()

    def dump(self) -> None:
        if self.profile is not None:
            self.profile.disable()
            self.profile.dump_stats(self.path)
            self.profile = None


# -- multiqueue blocks -------------------------------------------------------------------

FRAME_PORT = Port(np.float32, (FRAME,))


def _save_npz(directory: str, name: str, result: dict) -> None:
    cpu = json.dumps(result.pop("cpu"))
    np.savez(os.path.join(directory, f"{name}.npz"), cpu=np.array(cpu), **result)


class PipeSource(Block):
    """Allocates a frame from the pool, writes its header and tail word, sends it stamped.

    ``pool_blocks``: the pool's size (to drain the chain, and to hold all its blocks but
    one during the WINDOW phase: one frame in flight)."""

    outputs = {"out": FRAME_PORT}

    def __init__(self, schedule: Schedule, out_dir: str, pool_blocks: int, profile_dir: str | None = None):
        super().__init__()
        self.schedule, self.out_dir, self.profile_dir = schedule, out_dir, profile_dir
        self.pool_blocks = pool_blocks

    def start(self) -> None:
        self.profiled = _Profiled(self.profile_dir, "mq-source")
        self.pacer = Pacer(self.schedule)
        self.seq = 0
        self.phase = WARMUP
        self.held: list = []

    def work(self, inputs):
        pacer = self.pacer
        now = clock()
        phase = pacer.phase(now)
        if phase is None:
            return self._done()
        if phase != self.phase:
            self.phase = phase
            if phase in (SETTLE, WINDOW):
                # every block of the pool: waits until the frames in flight came back
                self.held = [self.allocate("out") for _ in range(self.pool_blocks)]
                keep = self.pool_blocks - 1 if phase == WINDOW else 0  # WINDOW: one block to use
                for frame in self.held[keep:]:
                    frame.buffer.release()
                del self.held[keep:]
                now = clock()
        if phase in (SETTLE, PACED):
            wait = pacer.wait_ns(now)
            if wait:
                if not self.sleep(wait / 1e9):
                    return self._done()
                phase = pacer.phase(clock())
                if phase is None:
                    return self._done()
        # may wait for a free block (WINDOW: for the sink to release the last frame):
        # before the stamp, so not part of any hop
        frame = self.allocate("out")
        words = frame.array.view(np.int64)
        words[SEQ], words[PHASE], words[HOPS] = self.seq, phase, 0
        words[-1] = self.seq
        t = clock()
        words[T_SRC] = t
        self.send("out", frame, timestamp=t)
        self.seq += 1
        pacer.sent_one(phase, t)

    def _done(self):
        for frame in self.held:
            frame.buffer.release()
        self.held = []
        return DONE

    def stop(self) -> None:
        self._done()
        self.profiled.dump()
        with open(os.path.join(self.out_dir, "source.json"), "w") as f:
            json.dump(self.pacer.result(), f)


class PipeStage(Block):
    """Reads the header and tail word, bumps HOPS in place, forwards the frame zero-copy."""

    inputs = {"in": FRAME_PORT}
    outputs = {"out": FRAME_PORT}

    def __init__(self, label: str, out_dir: str, profile_dir: str | None = None):
        super().__init__()
        self.label, self.out_dir, self.profile_dir = label, out_dir, profile_dir

    def start(self) -> None:
        self.profiled = _Profiled(self.profile_dir, f"mq-{self.label}")
        self.recorder = Recorder()

    def work(self, inputs):
        t = clock()  # this hop sees the frames now
        add, send = self.recorder.add, self.send
        for frame in inputs["in"]:
            # A writable view of the header: input frames are read-only by convention
            # because other readers may share them; in this chain each hop is its frame's
            # only reader, and the previous hop no longer touches it.
            header = frame.buffer.numpy(np.int64, (HEADER,))
            header[HOPS] += 1
            add(t, header, int(frame.array.view(np.int64)[-1]), t - frame.timestamp)
            frame.timestamp = clock()  # this hop sends it now
            send("out", frame)  # forwarded: no copy

    def stop(self) -> None:
        self.profiled.dump()
        _save_npz(self.out_dir, self.label, self.recorder.result())


class PipeSink(Block):
    """Reads the header and tail word, checks them, records."""

    inputs = {"in": FRAME_PORT}

    def __init__(self, out_dir: str, profile_dir: str | None = None):
        super().__init__()
        self.out_dir, self.profile_dir = out_dir, profile_dir

    def start(self) -> None:
        self.profiled = _Profiled(self.profile_dir, "mq-sink")
        self.recorder = Recorder(hops_expected=2)

    def work(self, inputs):
        t = clock()
        add = self.recorder.add
        for frame in inputs["in"]:
            words = frame.array.view(np.int64)
            add(t, words[:HEADER], int(words[-1]), t - frame.timestamp)

    def stop(self) -> None:
        self.profiled.dump()
        _save_npz(self.out_dir, "sink", self.recorder.result())


# -- multiprocessing.Queue processes -------------------------------------------------------


def mp_source(q_out, schedule: Schedule, window, received, profile_dir: str | None, conn) -> None:
    """A fresh 1 MiB array per frame (as a user would), header and tail word, put().

    Entering SETTLE and WINDOW: wait until the sink has received every frame sent
    (``received``, a shared counter); WINDOW: acquire ``window`` (a semaphore the sink
    releases) before each frame."""
    conn.send("ready")
    conn.recv()  # "go": every process of the chain is up
    profiled = _Profiled(profile_dir, "mp-source")
    pacer = Pacer(schedule)
    seq = 0
    put = q_out.put
    current = WARMUP
    while True:
        now = clock()
        phase = pacer.phase(now)
        if phase is None:
            break
        if phase != current:
            current = phase
            if phase in (SETTLE, WINDOW):
                while received.value < seq:  # until the chain has drained
                    time.sleep(0.0005)
                now = clock()
        if phase in (SETTLE, PACED):
            wait = pacer.wait_ns(now)
            if wait:
                time.sleep(wait / 1e9)
                phase = pacer.phase(clock())
                if phase is None:
                    break
        elif phase == WINDOW:
            window.acquire()  # waits for the sink to have received the previous frame
        array = np.empty(FRAME, np.float32)
        words = array.view(np.int64)
        words[SEQ], words[PHASE], words[HOPS] = seq, phase, 0
        words[-1] = seq
        t = clock()
        words[T_SRC] = words[T_HOP] = t
        put(array)  # pickled by the queue's feeder thread, written to its pipe
        seq += 1
        pacer.sent_one(phase, t)
    put(None)
    profiled.dump()
    result = pacer.result()
    q_out.close()
    q_out.join_thread()
    conn.send(result)


def mp_stage(q_in, q_out, name: str, profile_dir: str | None, conn) -> None:
    conn.send("ready")
    profiled = _Profiled(profile_dir, f"mp-{name}")
    recorder = Recorder()
    get, put, add = q_in.get, q_out.put, recorder.add
    while True:
        array = get()
        t = clock()
        if array is None:
            break
        words = array.view(np.int64)
        words[HOPS] += 1
        add(t, words, int(words[-1]), t - int(words[T_HOP]))
        words[T_HOP] = clock()
        put(array)
    put(None)
    profiled.dump()
    q_out.close()
    q_out.join_thread()
    conn.send(recorder.result())


def mp_sink(q_in, window, received, profile_dir: str | None, conn) -> None:
    conn.send("ready")
    profiled = _Profiled(profile_dir, "mp-sink")
    recorder = Recorder(hops_expected=2)
    get, add = q_in.get, recorder.add
    n = 0
    while True:
        array = get()
        t = clock()
        if array is None:
            break
        words = array.view(np.int64)
        add(t, words, int(words[-1]), t - int(words[T_HOP]))
        n += 1
        received.value = n
        if words[PHASE] == WINDOW:
            window.release()
    profiled.dump()
    conn.send(recorder.result())


def mp_worker(target, *args) -> None:
    """Entry point of an mp.Queue chain process: Ctrl-C is the parent's business (it
    terminates the chain); then ``target(*args)``."""
    ignore_ctrl_c()
    target(*args)
