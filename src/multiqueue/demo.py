"""Demo: two processes share buffers through a domain; pool stats at the end.

The main process allocates frames from the domain's pools and writes a sine wave
into them in place; a second, unrelated interpreter attaches to the domain by name,
takes a reference to each frame by its id (only the id crosses the pipe), checks
the samples where they lie, releases its reference and says so; the writer then
drops its own and the block returns to the pool.  Run with ``mq demo``.
"""

import argparse
import os
import subprocess
import sys
import time

import numpy as np

from .shm import PoolConfig, ShmConfig, ShmManager

FRAME = 16384  # float32 samples per frame (64 KiB)


def reader(domain: str) -> None:
    """The second process: read frames in place by id, then report."""
    with ShmManager(domain, name="demo-reader", create=False, reaper_interval=None) as m:
        frames = checked = 0
        for line in sys.stdin:
            buffer_id, expected = line.split()
            with m.get(int(buffer_id)) as frame:  # a reference of our own
                samples = frame.numpy(np.float32)  # a view of the shared block: no copy
                checked += int(abs(float(samples.sum()) - float(expected)) < 1e-2 * FRAME)
                frames += 1
            print(buffer_id, flush=True)  # done with it
        print(f"reader (pid {os.getpid()}): {frames} frames read in place, {checked} verified",
              flush=True)


def writer(domain: str, frames: int) -> int:
    config = ShmConfig(pools=[PoolConfig("frames", FRAME * 4, 32), PoolConfig("small", 4096, 64)],
                       max_buffers=1024)
    with ShmManager(domain, config, name="demo-writer") as m:
        child = subprocess.Popen([sys.executable, "-m", "multiqueue.demo", "--reader", domain],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        t = np.arange(FRAME, dtype=np.float32)
        start = time.perf_counter()
        in_flight = {}
        for n in range(frames):
            frame = m.allocate(FRAME * 4)
            samples = frame.numpy(np.float32)
            np.sin(t * (0.001 * (n + 1)), out=samples)  # written once, in place
            frame.timestamp = time.monotonic_ns()
            child.stdin.write(f"{frame.id} {float(samples.sum())}\n")
            child.stdin.flush()
            in_flight[frame.id] = frame
            if n == frames // 2:
                print(f"mid-stream: {len(in_flight)} frames in flight, shared by both processes")
                m.print_stats()
            if len(in_flight) >= 16:  # a window of frames ahead of the reader
                in_flight.pop(int(child.stdout.readline())).release()
        child.stdin.close()
        for line in child.stdout:
            if line.split()[0] == "reader":
                print(line, end="")
            else:
                in_flight.pop(int(line)).release()
        code = child.wait()
        elapsed = time.perf_counter() - start
        print(f"writer (pid {os.getpid()}): {frames} frames of {FRAME * 4 // 1024} KiB in "
              f"{elapsed:.2f} s")
        m.print_stats()
        return code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mq demo", description=__doc__.splitlines()[0])
    parser.add_argument("--domain", default=f"demo-{os.getpid()}")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--reader", metavar="DOMAIN", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reader:
        reader(args.reader)
        return 0
    return writer(args.domain, args.frames)


if __name__ == "__main__":
    sys.exit(main())
