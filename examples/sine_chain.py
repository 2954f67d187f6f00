"""Sine chain: a signal source -> amplifier x0.5 -> two consumers, each block in its
own process.  One consumer records to .npy, the other only counts; both receive
every frame (the amplifier's output is written once and read by both in place)."""

import os
import sys
import tempfile

import numpy as np

from multiqueue.graph import Amplifier, FileSink, NullSink, Runtime, SignalSource

if __name__ == "__main__":
    domain = f"sine-{os.getpid()}"
    path = os.path.join(tempfile.mkdtemp(), "sine.npy")
    rt = Runtime(domain)
    src = rt.add(SignalSource("sine", rate=48_000, frame=1024, frequency=1_000, count=200), name="src")
    amp = rt.add(Amplifier(gain=0.5), name="amp")
    rec = rt.add(FileSink(path), name="rec")
    count = rt.add(NullSink(), name="count")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rec["in"])
    rt.connect(amp["out"], count["in"])
    rt.run(duration=60)
    print(rt.final_stats.format())
    samples = np.load(path)
    print(f"recorded {samples.shape[0]} frames of {samples.shape[1]} samples, peak {samples.max():.3f}")
    ok = samples.shape == (200, 1024) and abs(samples.max() - 0.5) < 1e-3 and rt.blocks_in_use_at_end == 0
    sys.exit(0 if ok else 1)
