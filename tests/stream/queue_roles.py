"""Roles for the multi-process queue tests, each a separate interpreter attaching by name.

    python tests/queue_roles.py producer DOMAIN QUEUE COUNT [--wait-go] [--hold]
    python tests/queue_roles.py consumer DOMAIN QUEUE [--policy P] [--delay S] [--stop-after N]

Items carry (sequence number, checksum) in their first 16 bytes and a pattern
derived from the sequence number after that, so a reader verifies every payload.
Each role reports on stdout, one line per event, for the test to follow.
"""

import argparse
import sys
import time

import numpy as np

from multiqueue import ShmManager
from multiqueue.errors import QueueClosedError
from multiqueue.stream import PortQueue

ITEM = 256  # bytes per item: 32 uint64 words


def payload(seq: int) -> np.ndarray:
    words = np.arange(32, dtype=np.uint64) * np.uint64(2654435761) + np.uint64(seq)
    words[0] = seq
    words[1] = 0
    words[1] = int(words[2:].sum(dtype=np.uint64))
    return words


def check(words: np.ndarray, seq: int) -> bool:
    return int(words[0]) == seq and int(words[1]) == int(words[2:].sum(dtype=np.uint64)) and \
        int(words[2]) == (2 * 2654435761 + seq) % 2**64


def producer(args) -> None:
    m = ShmManager(args.domain, name="producer", create=False, reaper_interval=None)
    q = PortQueue(m, args.queue, create=False)
    print("ready", flush=True)
    if args.wait_go:
        sys.stdin.readline()
    longest = 0.0
    for seq in range(args.count):
        b = m.allocate(ITEM)
        b.numpy(np.uint64)[:] = payload(seq)
        t0 = time.monotonic()
        q.push(b)
        longest = max(longest, time.monotonic() - t0)
    print(f"pushed {args.count} longest_push {longest:.3f}", flush=True)
    if args.hold:  # keep the queue open until told (or killed)
        sys.stdin.readline()
    q.close()
    m.shutdown(unlink=False)
    print("done", flush=True)


def consumer(args) -> None:
    m = ShmManager(args.domain, name="consumer", create=False, reaper_interval=None)
    q = PortQueue(m, args.queue, create=False)
    reader = q.reader(policy=args.policy)
    print("ready", flush=True)
    received = bad = 0
    last = -1
    while True:
        if received == args.stop_after:
            print(f"stopped {received}", flush=True)
            sys.stdin.readline()  # stop reading until told to resume
        try:
            b = reader.pop()
        except QueueClosedError:
            break
        words = b.numpy(np.uint64)
        seq = int(words[0])
        if not check(words, seq) or seq <= last or (args.policy == "block" and seq != last + 1):
            bad += 1
        last = seq
        received += 1
        b.release()
        if args.delay:
            time.sleep(args.delay)  # a deliberately slow consumer
    outcome = q.stats().closed
    print(f"received {received} bad {bad} drops {reader.drops} last {last} {outcome}", flush=True)
    reader.detach()
    m.shutdown(unlink=False)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["producer", "consumer"])
    parser.add_argument("domain")
    parser.add_argument("queue")
    parser.add_argument("count", type=int, nargs="?", default=0)
    parser.add_argument("--wait-go", action="store_true")
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--policy", default="block")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--stop-after", type=int, default=-1)
    args = parser.parse_args()
    producer(args) if args.role == "producer" else consumer(args)


if __name__ == "__main__":
    main()
