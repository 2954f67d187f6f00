"""Demo: two processes stream frames through a domain's port queue; pool stats at the end.

The main process allocates 64 KiB frames from the domain's pools and writes a sine
wave into them in place; a second, unrelated interpreter attaches to the domain by
name, reads every frame where it lies (only buffer ids cross the queue), verifies
it and releases it, and the block returns to its pool.  Run with ``mq demo``.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from ..errors import QueueClosedError
from ..shm import PoolConfig, ShmConfig, ShmManager
from ..stream import PortQueue
from . import domain_argument, int_argument

FRAME = 16384  # float32 samples per frame (64 KiB)
PHASE = np.arange(FRAME - 1, dtype=np.float32)


def expected(n: int) -> np.ndarray:
    return np.sin(PHASE * np.float32(0.001 * (n % 1000 + 1)))


def reader(domain: str) -> None:
    """The second process: read frames in place, verify them, report."""
    with ShmManager(domain, name="demo-reader", create=False, reaper_interval=None) as m:
        reader = PortQueue(m, "frames", create=False).reader()
        frames = verified = 0
        while True:
            try:
                frame = reader.pop()
            except QueueClosedError:
                break
            with frame:
                samples = frame.numpy()  # float32 view of the shared block: no copy
                n = int(samples[0])
                verified += int(np.array_equal(samples[1:], expected(n)))
                frames += 1
        print(f"reader (pid {os.getpid()}): {frames} frames read in place, {verified} verified",
              flush=True)


def writer(domain: str, frames: int) -> int:
    config = ShmConfig(pools=[PoolConfig("frames", FRAME * 4, 32), PoolConfig("small", 4096, 64)],
                       max_buffers=1024)
    with ShmManager(domain, config, name="demo-writer") as m:
        queue = PortQueue(m, "frames", capacity=16)
        child = subprocess.Popen([sys.executable, "-m", "multiqueue.demos.stream", "--reader", domain])
        queue.wait_for_readers(1, timeout=60)
        start = time.perf_counter()
        for n in range(frames):
            frame = m.allocate(FRAME * 4)
            frame.set_frame(np.float32, FRAME)
            samples = frame.numpy()
            samples[0] = n
            samples[1:] = expected(n)  # written once, in place
            queue.push(frame)  # only the id crosses; the reference moves into the queue
            if n == frames // 2:
                print(f"mid-stream: {queue.size} frames queued for the reader")
                m.print_stats()
        queue.close()
        code = child.wait()
        elapsed = time.perf_counter() - start
        print(f"writer (pid {os.getpid()}): {frames} frames of {FRAME * 4 // 1024} KiB in "
              f"{elapsed:.2f} s ({frames / elapsed:,.0f} frames/s)")
        m.print_stats()
        return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mq stream-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--domain", type=domain_argument, default=f"demo-{os.getpid()}")
    parser.add_argument("--frames", type=int_argument(0), default=5000)
    parser.add_argument("--reader", metavar="DOMAIN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reader:
        reader(args.reader)
        return 0
    return writer(args.domain, args.frames)


if __name__ == "__main__":
    sys.exit(main())
