"""The processes of benchmarks/bridge.py: raw Zenoh publisher / subscriber, and the two
multiqueue Runtimes of the bridged path (with their blocks, importable by name in the
block worker processes).

Both paths send the same stream, driven by the same :class:`Plan`: per run, WARMUP
frames as fast as the receiver takes them (discarded), LOAD frames as fast as the
receiver takes them for ``load_s`` (throughput), a gap of ``gap_s`` (nothing sent: the
receiver drains), then PACED_WARMUP and PACED frames at ``rate`` frames/s (one frame in
flight: one-way latency).  Every frame carries its sequence number, run and phase, and
the CLOCK_MONOTONIC time at which it was handed over:

* raw: the attachment (``HEAD``: seq, run, phase, send time; padded to the size of the
  bridge's frame header); the payload is a constant bytes object of the frame size.
* bridged: the first three int64 words of the frame (seq, run, phase); the send time is
  the frame's timestamp (``send(timestamp=)`` at the source, carried by the bridge's
  header, handed out by BridgeSource as ``frame.timestamp``).

Receivers record, per frame: receipt time (CLOCK_MONOTONIC, shared by every process of
the machine), run, phase, seq and latency (receipt - send time).  A sampler thread in
each process that hosts a side reads the CPU time of the side's processes every
``CPU_PERIOD_S`` (raw: itself; bridged: the Runtime's process and its block workers).
"""

import contextlib
import cProfile
import os
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np
from _common import clock, exit_on_sigterm, ignore_ctrl_c

from multiqueue import PoolConfig, ShmConfig
from multiqueue.graph import DONE, Block, Port, Runtime
from multiqueue.net import BridgeSink, BridgeSource, ZenohSettings, wire

WARMUP, LOAD, PACED_WARMUP, PACED = range(4)
PHASE_NAMES = ("warmup", "load", "paced-warmup", "paced")
END = 99  # raw only: the phase of the end-of-stream marker
HEAD = struct.Struct("<qqqq")  # raw attachment: seq, run, phase, send time
SEQ, RUN, PHASE = range(3)  # bridged: int64 words at the start of the frame
CPU_PERIOD_S = 0.02
START_TIMEOUT_S = 60.0


def header_size(size: int) -> int:
    """The size of the bridge's header for a frame of ``size`` uint8: the raw attachment's."""
    return len(wire.encode(1, 0, 0, None, np.uint8, (size,)))


@dataclass(frozen=True)
class Options:
    """How the sides run: --express, --placement, --threads, --profile DIR."""

    express: bool = False  # Zenoh express puts (no batching) on both sides
    placement: str = "process"  # "process": a worker per block; "shared": one worker per side
    threads: bool = False  # sample every thread's CPU time too
    profile_dir: str | None = None  # cProfile the bridge blocks' threads

    def where(self, side: str) -> str:
        """The Runtime placement of a side's blocks."""
        return "process" if self.placement == "process" else f"{side}_blocks"


# -- the schedule ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    runs: int
    warmup_frames: int  # per run, as fast as possible, discarded
    load_s: float  # as fast as possible: throughput
    max_load_frames: int
    gap_s: float  # nothing sent: the receiver drains its backlog
    paced_warmup: int  # paced frames discarded
    paced_frames: int  # paced frames measured
    rate: float  # paced frames per second

    @property
    def seconds(self) -> float:
        """About how long the stream lasts (the warm-up frames not counted)."""
        return self.runs * (self.load_s + self.gap_s + (self.paced_warmup + self.paced_frames) / self.rate)


class Plan:
    """Which frame comes next (run, phase) and how long to wait before sending it."""

    def __init__(self, schedule: Schedule):
        self.s = schedule
        self.period = int(1e9 / schedule.rate)
        self.run, self.phase, self.n = 0, WARMUP, 0  # n: frames sent in this phase
        self.t_phase = 0
        self.due = 0
        self.sent = [[0] * len(PHASE_NAMES) for _ in range(schedule.runs)]

    def next(self, now: int) -> tuple[int, int, int] | None:
        """(run, phase, ns to wait before sending), or None: the stream is over."""
        s = self.s
        while self.run < s.runs:
            if self.phase == WARMUP:
                if self.n < s.warmup_frames:
                    return self.run, WARMUP, 0
                self._enter(LOAD, now)
            elif self.phase == LOAD:
                if now - self.t_phase < s.load_s * 1e9 and self.n < s.max_load_frames:
                    return self.run, LOAD, 0
                self._enter(PACED_WARMUP, now)
                self.due = now + int(s.gap_s * 1e9)
            else:
                limit = s.paced_warmup if self.phase == PACED_WARMUP else s.paced_frames
                if self.n < limit:
                    return self.run, self.phase, max(0, self.due - now)
                if self.phase == PACED_WARMUP:
                    self._enter(PACED, now)
                else:
                    self.run += 1
                    self._enter(WARMUP, now)
        return None

    def _enter(self, phase: int, now: int) -> None:
        self.phase, self.n, self.t_phase = phase, 0, now

    def sent_one(self, t: int) -> None:
        self.n += 1
        self.sent[self.run][self.phase] += 1
        if self.phase in (PACED_WARMUP, PACED):  # the next one a period later, no bursts to catch up
            self.due = max(self.due + self.period, t)


class Records:
    """A receiver's records, one row per frame: receipt time, run, phase, seq, latency."""

    def __init__(self, expected: int):
        self.rows = np.zeros((expected + 1024, 5), np.int64)
        self.n = 0

    def add(self, t: int, run: int, phase: int, seq: int, t_sent: int) -> None:
        if self.n == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
        self.rows[self.n] = (t, run, phase, seq, t - t_sent)
        self.n += 1

    def result(self) -> np.ndarray:
        return self.rows[:self.n].copy()


def expected_frames(schedule: Schedule) -> int:
    return schedule.runs * (schedule.warmup_frames + schedule.max_load_frames + schedule.paced_warmup
                            + schedule.paced_frames)


# -- CPU sampling -----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, int] | None:
    """utime + stime of a process (all its threads), and its minor page faults, from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, int(fields[7])


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """utime + stime of each thread of a process, keyed "name#tid" (name: the thread's comm)."""
    out = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                head, tail = f.read().rsplit(b")", 1)
                name = head.split(b"(", 1)[1].decode(errors="replace")
                fields = tail.split()
                out[f"{name}#{tid}"] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


class CpuSampler:
    """A thread sampling the CPU time of some processes every CPU_PERIOD_S (and, with
    ``threads``, of each of their threads: --threads; the /proc reads cost some CPU)."""

    def __init__(self, pids: dict[str, int], threads: bool = False):
        self.pids, self.threads = pids, threads
        self.samples: list[tuple[int, list[tuple[float, int] | None]]] = []
        self.thread_samples: list[tuple[int, dict[str, float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(CPU_PERIOD_S):
            t = clock()
            self.samples.append((t, [cpu_seconds(p) for p in self.pids.values()]))
            if self.threads:
                by_thread = {}
                for name, pid in self.pids.items():
                    by_thread.update({f"{name}/{k}": v for k, v in thread_cpu_seconds(pid).items()})
                self.thread_samples.append((t, by_thread))

    def result(self) -> dict:
        """{"t": [ns...], "cpu": {name: [s...]}, "faults": {name: [minor faults...]}} (a
        process gone: its last values); with threads, also "threads": {"process/thread#tid":
        [s...]} on the same times."""
        self._stop.set()
        self._thread.join()
        names = list(self.pids)
        cpu = {name: [] for name in names}
        faults = {name: [] for name in names}
        for _, values in self.samples:
            for name, v in zip(names, values, strict=True):
                if v is None:
                    v = (cpu[name][-1], faults[name][-1]) if cpu[name] else (0.0, 0)
                cpu[name].append(v[0])
                faults[name].append(v[1])
        out = {"t": [t for t, _ in self.samples], "cpu": cpu, "faults": faults}
        if self.threads:
            keys = sorted({k for _, d in self.thread_samples for k in d})
            series = {k: [] for k in keys}
            for _, d in self.thread_samples:
                for k in keys:
                    series[k].append(d.get(k, series[k][-1] if series[k] else 0.0))
            out["threads"] = series
        return out


# -- profiling (--profile DIR) ----------------------------------------------------------------


class Profiles:
    """cProfile per thread (cProfile only sees the thread that enables it)."""

    def __init__(self, directory: str | None, name: str):
        self.directory, self.name = directory, name
        self.by_thread: dict[int, cProfile.Profile] = {}
        self.lock = threading.Lock()

    def enable_here(self) -> None:
        """Profile the calling thread from now on (once per thread)."""
        if self.directory is None:
            return
        ident = threading.get_ident()
        if ident in self.by_thread:
            return
        with self.lock:
            profile = self.by_thread[ident] = cProfile.Profile()
        profile.enable()

    def dump(self) -> None:
        with self.lock:
            for i, profile in enumerate(self.by_thread.values()):
                profile.disable()  # (only stops the calling thread's; the others' stats are kept)
                profile.dump_stats(os.path.join(self.directory, f"{self.name}-{i}.prof"))
            self.by_thread.clear()


# -- raw Zenoh ------------------------------------------------------------------------------------


def _quiet_worker() -> None:
    """A worker process: Ctrl-C is the parent's business; the first SIGTERM runs the finally
    clauses (a Runtime's orderly stop), which a second one does not interrupt."""
    ignore_ctrl_c()
    exit_on_sigterm()


def raw_receiver(settings: ZenohSettings, key: str, schedule: Schedule, opts: Options, conn) -> None:
    """A subscriber (callback) recording every frame until the END marker."""
    import zenoh

    _quiet_worker()
    records = Records(expected_frames(schedule))
    done = threading.Event()
    profiles = Profiles(opts.profile_dir, "raw-rx-callback")
    unpack = HEAD.unpack_from

    def on_sample(sample) -> None:
        profiles.enable_here()
        t = clock()
        seq, run, phase, t_sent = unpack(sample.attachment.to_bytes())
        sample.payload.to_bytes()  # the frame's bytes in Python, as a user gets them
        if phase == END:
            done.set()
            return
        records.add(t, run, phase, seq, t_sent)

    session = zenoh.open(settings.to_config())
    try:
        subscriber = session.declare_subscriber(key, on_sample)
        sampler = CpuSampler({"subscriber": os.getpid()}, opts.threads)
        conn.send("ready")
        if not done.wait(schedule.seconds + START_TIMEOUT_S):
            conn.send(("error", "the END marker never came"))
            return
        subscriber.undeclare()
        profiles.dump()
        conn.send(("records", records.result(), sampler.result()))
        conn.recv()  # "bye"
    finally:
        session.close()


def raw_sender(settings: ZenohSettings, key: str, size: int, schedule: Schedule, opts: Options,
               conn) -> None:
    """A publisher (BLOCK, reliable) sending the schedule, then the END marker."""
    import zenoh

    _quiet_worker()
    session = zenoh.open(settings.to_config())
    try:
        publisher = session.declare_publisher(key, congestion_control=zenoh.CongestionControl.BLOCK,
                                              reliability=zenoh.Reliability.RELIABLE,
                                              express=opts.express)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not publisher.matching_status.matching:
            if time.monotonic() > deadline:
                conn.send(("error", "no subscriber matched"))
                return
            time.sleep(0.005)
        sampler = CpuSampler({"publisher": os.getpid()}, opts.threads)
        payload = bytes(size)
        pad = bytes(header_size(size) - HEAD.size)
        put, pack = publisher.put, HEAD.pack
        plan = Plan(schedule)
        seq = 0
        while (step := plan.next(clock())) is not None:
            run, phase, wait = step
            if wait:
                time.sleep(wait / 1e9)
            t = clock()
            put(payload, attachment=pack(seq, run, phase, t) + pad)
            plan.sent_one(t)
            seq += 1
        put(b"", attachment=pack(seq, 0, END, clock()) + pad)
        conn.send(("sent", plan.sent, sampler.result()))
        conn.recv()  # "bye": the receiver has the END marker
        publisher.undeclare()
    finally:
        session.close()


# -- the bridged path: blocks ---------------------------------------------------------------------


class _StreamBlock(Block):
    """A block at one end of the bridged stream: frames of ``size`` uint8, the stream
    ``schedule``, and where its records go when it stops."""

    def __init__(self, size: int, schedule: Schedule, out_path: str):
        super().__init__()
        self.size, self.schedule, self.out_path = size, schedule, out_path


class StampSource(_StreamBlock):
    """Frames of ``size`` uint8 from the pool as fast as the graph takes them (and paced
    ones), seq/run/phase in the first words, stamped with the send time."""

    def output_ports(self):
        return {"out": Port(np.uint8, (self.size,))}

    def start(self) -> None:
        self.plan = Plan(self.schedule)
        self.seq = 0

    def work(self, inputs):
        step = self.plan.next(clock())
        if step is None:
            return DONE
        run, phase, wait = step
        if wait and not self.sleep(wait / 1e9):
            return DONE
        frame = self.allocate("out")
        words = frame.array.view(np.int64)
        words[SEQ], words[RUN], words[PHASE] = self.seq, run, phase
        t = clock()
        self.send("out", frame, timestamp=t)
        self.plan.sent_one(t)
        self.seq += 1

    def stop(self) -> None:
        np.save(self.out_path, np.array(self.plan.sent, np.int64))


class CountSink(_StreamBlock):
    """Records every frame: receipt time, run, phase, seq, latency (now - frame.timestamp)."""

    def input_ports(self):
        return {"in": Port(np.uint8, (self.size,))}

    def start(self) -> None:
        self.records = Records(expected_frames(self.schedule))

    def work(self, inputs):
        add = self.records.add
        for frame in inputs["in"]:
            t = clock()
            words = frame.array[:24].view(np.int64)
            add(t, int(words[RUN]), int(words[PHASE]), int(words[SEQ]), frame.timestamp)

    def stop(self) -> None:
        np.save(self.out_path, self.records.result())


class _ProfiledWork:
    """A bridge block with a cProfile of its block thread, from start() to stop() (--profile)."""

    profile_name = ""

    def __init__(self, key, profile_dir, **kw):
        super().__init__(key, **kw)
        self.profile_dir = profile_dir

    def start(self) -> None:
        super().start()
        self.profiles = Profiles(self.profile_dir, self.profile_name)
        self.profiles.enable_here()

    def stop(self) -> None:
        super().stop()
        self.profiles.dump()


class ProfiledBridgeSink(_ProfiledWork, BridgeSink):
    profile_name = "bridge-sink-work"


class ProfiledBridgeSource(_ProfiledWork, BridgeSource):
    """Its block thread and Zenoh's callback thread(s) profiled."""

    profile_name = "bridge-source-work"

    def initialize(self) -> None:
        self.cb_profiles = Profiles(self.profile_dir, "bridge-source-callback")
        super().initialize()

    def _on_sample(self, sample) -> None:
        self.cb_profiles.enable_here()
        super()._on_sample(sample)

    def cleanup(self) -> None:
        super().cleanup()
        self.cb_profiles.dump()


# -- the bridged path: the two Runtimes -------------------------------------------------------------


def _pools(size: int) -> ShmConfig:
    blocks = 256 if size <= 65536 else 64
    return ShmConfig(pools=[PoolConfig("frames", size, blocks)], max_buffers=blocks)


def _sample_runtime(rt: Runtime, side: str, threads: bool) -> CpuSampler:
    pids = {f"runtime-{side}": os.getpid()}
    for name, b in rt.stats().blocks.items():  # (blocks sharing a process: sampled once)
        if b.pid not in pids.values():
            pids[name] = b.pid
    return CpuSampler(pids, threads)


@contextlib.contextmanager
def _side(domain: str, size: int, out: str):
    """This worker's Runtime for one side (SIGTERM stops it in order); stopped, and the
    records file ``out`` its blocks write removed, whatever happens."""
    _quiet_worker()
    rt = Runtime(domain, pools=_pools(size), start_timeout=START_TIMEOUT_S)
    try:
        yield rt
    finally:
        with contextlib.suppress(Exception):
            rt.stop(3)
        with contextlib.suppress(OSError):
            os.unlink(out)


def _ended(rt: Runtime, schedule: Schedule, conn, side: str) -> bool:
    """Wait for the side's graph to end; False (and an error to the parent) if it does not."""
    if rt.wait(schedule.seconds + START_TIMEOUT_S):
        return True
    rt.stop(10)
    conn.send(("error", f"the {side} graph did not end"))
    return False


def bridged_receiver(domain: str, settings: ZenohSettings, key: str, size: int, schedule: Schedule,
                     workdir: str, opts: Options, conn) -> None:
    """Runtime: BridgeSource -> CountSink; "ready" once the subscriber listens."""
    out = os.path.join(workdir, f"{domain}-records.npy")
    with _side(domain, size, out) as rt:
        if opts.profile_dir:
            rx = ProfiledBridgeSource(key, opts.profile_dir, dtype=np.uint8, shape=(size,), zenoh=settings)
        else:
            rx = BridgeSource(key, dtype=np.uint8, shape=(size,), zenoh=settings)
        rt.add(rx, "rx", placement=opts.where("rx"))
        rt.add(CountSink(size, schedule, out), "sink", placement=opts.where("rx"))
        rt.connect(rt["rx"]["out"], rt["sink"]["in"])
        rt.start()
        sampler = _sample_runtime(rt, "rx", opts.threads)
        conn.send("ready")
        if not _ended(rt, schedule, conn, "receiving"):
            return
        cpu = sampler.result()
        records = np.load(out)
        counters = rt.final_stats.blocks["rx"].counters
        conn.send(("records", records, cpu, counters, rt.final_stats.format()))
        conn.recv()  # "bye"


def bridged_sender(domain: str, settings: ZenohSettings, key: str, size: int, schedule: Schedule,
                   workdir: str, opts: Options, conn) -> None:
    """Runtime: StampSource -> BridgeSink; runs the schedule to its end."""
    out = os.path.join(workdir, f"{domain}-sent.npy")
    with _side(domain, size, out) as rt:
        rt.add(StampSource(size, schedule, out), "src", placement=opts.where("tx"))
        if opts.profile_dir:
            tx = ProfiledBridgeSink(key, opts.profile_dir, zenoh=settings, express=opts.express)
        else:
            tx = BridgeSink(key, zenoh=settings, express=opts.express)
        rt.add(tx, "tx", placement=opts.where("tx"))
        rt.connect(rt["src"]["out"], rt["tx"]["in"])
        rt.start()
        sampler = _sample_runtime(rt, "tx", opts.threads)
        if not _ended(rt, schedule, conn, "sending"):
            return
        cpu = sampler.result()
        conn.send(("sent", np.load(out).tolist(), cpu, rt.final_stats.blocks["tx"].counters,
                   rt.final_stats.format()))
        conn.recv()  # "bye"
