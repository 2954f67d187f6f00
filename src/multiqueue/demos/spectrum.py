"""The main demo: a spectrum monitor, a graph of blocks in separate processes.

    source (process)  : synthesises an RF power spectrum, 160,000 float32 dB bins,
                        40 frames/s: a noise floor plus emitters that drift and fade
    detector (process): threshold + peak detection -> (bin, dB) rows per frame,
                        stamped with the spectrum's timestamp
    recorder (process): the first N spectra to a .npy file (bounded)
    probe (thread)    : keeps the latest detections for the live display

Every spectrum is written once, in place, into a pool block; the detector, the
recorder and any viewer read the same memory.  Run with ``mq demo``; Ctrl-C stops
it in order.  While it runs, ``mq tap spectrum source.out`` (or
``multiqueue.attach("spectrum")``) watches from another terminal.
"""

import argparse
import os
import signal
import sys
import tempfile
import time

import numpy as np

from ..graph import DONE, OK, Block, FileSink, Param, Port, Probe, Runtime
from ..shm import PoolConfig, ShmConfig
from . import domain_argument, int_argument, seconds_argument

BINS = 160_000
RATE_HZ = 40.0
FLOOR_DB = -100.0


class SpectrumSource(Block):
    """A synthetic RF spectrum in dB: noise floor, drifting emitters, 40 frames/s."""

    parameters = {"rate_hz": Param(float, positive=True, max=10_000.0)}  # frames a second

    def __init__(self, bins: int = BINS, rate_hz: float = RATE_HZ, emitters: int = 6,
                 count: int | None = None, seed: int = 1):
        super().__init__()
        self.bins, self.rate_hz, self.emitters, self.count, self.seed = bins, rate_hz, emitters, count, seed
        self.sent = 0

    def output_ports(self):
        return {"out": Port(np.float32, (self.bins,))}

    def start(self):
        rng = self._rng = np.random.default_rng(self.seed)
        self._centre = rng.uniform(0.05, 0.95, self.emitters) * self.bins
        self._drift = rng.uniform(-30, 30, self.emitters)  # bins per frame
        self._width = rng.uniform(40, 400, self.emitters)
        self._power = rng.uniform(25, 55, self.emitters)  # dB above the floor
        self._next_ns = time.monotonic_ns()
        self._x = np.arange(self.bins, dtype=np.float32)

    def work(self, inputs):
        if self.count is not None and self.sent >= self.count:
            return DONE
        if not self.sleep((self._next_ns - time.monotonic_ns()) / 1e9):
            return DONE
        self._next_ns += int(1e9 / self.rate_hz)
        frame = self.allocate("out")
        spectrum = frame.array
        spectrum[:] = self._rng.standard_normal(self.bins, dtype=np.float32)
        spectrum *= 2.0
        spectrum += FLOOR_DB
        self._centre = (self._centre + self._drift) % self.bins
        fade = 0.5 + 0.5 * np.sin(self.sent / self.rate_hz * (1 + np.arange(self.emitters)))
        for centre, width, power, f in zip(self._centre, self._width, self._power, fade, strict=True):
            lo, hi = int(max(0, centre - 4 * width)), int(min(self.bins, centre + 4 * width))
            bump = power * f * np.exp(-0.5 * ((self._x[lo:hi] - centre) / width) ** 2)
            np.maximum(spectrum[lo:hi], FLOOR_DB + bump, out=spectrum[lo:hi])
        self.send("out", frame, timestamp=time.monotonic_ns())
        self.sent += 1
        return OK


class Detector(Block):
    """Peaks above ``threshold_db`` over the floor: one (bin, dB) row per region."""

    inputs = {"in": Port(np.float32)}
    outputs = {"out": Port(np.float32)}
    parameters = {"threshold_db": Param(float, min=0.0, max=200.0)}  # dB over the noise floor

    def __init__(self, threshold_db: float = 15.0):
        super().__init__()
        self.threshold_db = threshold_db
        self.detections = 0

    def work(self, inputs):
        for frame in inputs["in"]:
            peaks = detect_peaks(frame.array, FLOOR_DB + self.threshold_db)
            out = self.allocate("out", peaks.shape)
            out.array[...] = peaks
            self.send("out", out)  # stamped with the spectrum's timestamp
            self.detections += len(peaks)


def detect_peaks(spectrum: np.ndarray, threshold: float) -> np.ndarray:
    """(bin, dB) of the maximum of every run of bins above ``threshold``."""
    above = np.concatenate(([False], spectrum > threshold, [False]))
    edges = np.flatnonzero(above[1:] != above[:-1])
    starts, ends = edges[0::2], edges[1::2]
    rows = np.empty((len(starts), 2), np.float32)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        peak = s + int(np.argmax(spectrum[s:e]))
        rows[i] = peak, spectrum[peak]
    return rows


def build(domain: str, record_path: str, record_frames: int, count: int | None = None,
          bins: int = BINS) -> tuple[Runtime, Probe]:
    pools = ShmConfig(pools=[PoolConfig("spectra", bins * 4, 64), PoolConfig("small", 4096, 256)],
                      max_processes=16)
    rt = Runtime(domain, pools=pools, capacity=8)
    source = rt.add(SpectrumSource(bins=bins, count=count), name="source")
    detector = rt.add(Detector(), name="detector")
    recorder = rt.add(FileSink(record_path, max_frames=record_frames), name="recorder")
    probe = Probe()
    viewer = rt.add(probe, name="probe", placement="thread")
    rt.connect(source["out"], detector["in"])
    rt.connect(source["out"], recorder["in"])
    rt.connect(detector["out"], viewer["in"], policy="drop_oldest")
    return rt, probe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mq demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--domain", type=domain_argument, default="spectrum")
    parser.add_argument("--duration", type=seconds_argument, default=10.0,
                        help="seconds (default 10; 0 = until Ctrl-C)")
    parser.add_argument("--record", default=None, help=".npy path for the recorder (default: a temp file)")
    parser.add_argument("--record-frames", type=int_argument(0), default=40,
                        help="spectra recorded at most (default 40)")
    parser.add_argument("--bins", type=int_argument(1), default=BINS)
    args = parser.parse_args(argv)
    record = args.record or os.path.join(tempfile.mkdtemp(prefix="mq-demo-"), "spectra.npy")
    rt, probe = build(args.domain, record, args.record_frames, bins=args.bins)
    print(f"spectrum monitor in domain {args.domain!r}: {args.bins:,} bins at {RATE_HZ:g} frames/s; "
          f"Ctrl-C stops it. Watch it with: mq tap {args.domain} source.out")
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)  # `kill PID` (service managers): the same orderly stop
    rt.start()
    deadline = None if not args.duration else time.monotonic() + args.duration
    try:
        while not rt.wait(timeout=1.0):
            _print_progress(rt, probe)
            if deadline is not None and time.monotonic() >= deadline:
                break
        rt.stop()
    except KeyboardInterrupt:
        print("\nstopping...")
        rt.stop()
    stats = rt.final_stats
    print("\nfinal:")
    print(stats.format())
    print(f"recorded {min(args.record_frames, stats.blocks['recorder'].items_in)} spectra to {record}; "
          f"pool blocks still in use after the stop: {rt.blocks_in_use_at_end}")
    return 0 if rt.blocks_in_use_at_end == 0 else 1


def _stop_like_ctrl_c(signum, frame):
    raise KeyboardInterrupt


def _print_progress(rt: Runtime, probe: Probe) -> None:
    s = rt.stats()
    src, det = s.blocks["source"], s.blocks["detector"]
    latest = probe.latest()
    peaks = "" if latest is None else ", ".join(f"bin {int(b)}: {p:.0f} dB" for b, p in latest[0][:3])
    fills = " ".join(f"{e.dst}={e.lag}/{e.capacity}" for e in s.edges)
    print(f"spectra {src.items_out:>6} ({src.rate_out:5.1f}/s)  analysed {det.items_out:>6}  "
          f"fill {fills}  peaks: {peaks}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
