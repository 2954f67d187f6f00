"""Two-stream timestamp sync: a 100 Hz and a 50 Hz sensor stream are aligned by a
SyncMerge block ("nearest" to the 50 Hz stream, within 3 ms); the two outputs carry
matched pairs in step, which an Add block then combines frame by frame."""

import os
import sys
import tempfile

import numpy as np

from multiqueue.graph import Add, FileSink, Runtime, SignalSource, SyncMerge

if __name__ == "__main__":
    domain = f"sync-{os.getpid()}"
    path = os.path.join(tempfile.mkdtemp(), "sum.npy")
    rt = Runtime(domain)
    grid = 20_000_000  # both clocks start on a 20 ms grid: the 50 Hz frames meet 100 Hz ones
    slow = rt.add(SignalSource("sine", rate=50 * 64, frame=64, count=50, realtime=True, align_ns=grid),
                  name="slow")
    fast = rt.add(SignalSource("noise", rate=100 * 64, frame=64, count=100, realtime=True, seed=1,
                               align_ns=grid), name="fast")
    sync = rt.add(SyncMerge(2, policy="nearest", tolerance_ns=3_000_000), name="sync")
    add = rt.add(Add(), name="add")
    out = rt.add(FileSink(path), name="out")
    rt.connect(slow["out"], sync["in0"])
    rt.connect(fast["out"], sync["in1"])
    rt.connect(sync["out0"], add["a"])
    rt.connect(sync["out1"], add["b"])
    rt.connect(add["out"], out["in"])
    rt.run(duration=60)
    pairs = np.load(path)
    print(rt.final_stats.format())
    print(f"{len(pairs)} aligned pairs summed (of 50 slow frames)")
    sys.exit(0 if 40 <= len(pairs) <= 50 and rt.blocks_in_use_at_end == 0 else 1)
