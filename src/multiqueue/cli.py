"""The `mq` command: demos, stats, taps and cleanup of domains."""

import argparse
import dataclasses
import json
import sys

from .errors import MultiQueueError
from .shm import ShmManager
from .shm.segment import DEFAULT_PREFIX


def _stats(args) -> int:
    m = ShmManager(args.domain, name="mq-stats", create=False, reaper_interval=None)
    try:
        if args.json:
            stats = dataclasses.asdict(m.get_stats())
            stats["processes"] = m.processes()
            print(json.dumps(stats, indent=2))
        else:
            m.print_stats()
            for p in m.processes():
                if not p["self"]:
                    state = "alive" if p["alive"] else "DEAD"
                    print(f"  process {p['pid']:>7} {p['name']:<24} {state}")
    finally:
        m.shutdown(unlink=False)
    return 0


def _cleanup(args) -> int:
    removed = ShmManager.cleanup(args.domain, args.prefix)
    print(f"removed {len(removed)} segment(s) of domain {args.domain!r}")
    for path in removed:
        print(f"  {path}")
    return 0


def _tap(args) -> int:
    """Print frames of an output port of a running graph, and their rate."""
    import time

    from .errors import QueueClosedError
    from .graph import attach

    with attach(args.domain, name="mq-tap") as graph:
        tap = graph.subscribe(args.port, policy="drop_oldest")
        seen, t0, last = 0, time.monotonic(), time.monotonic()
        deadline = None if args.duration is None else t0 + args.duration
        while args.count is None or seen < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                frame = tap.read(timeout=1.0 if left is None else min(1.0, left))
            except QueueClosedError:
                print("the graph stopped")
                break
            if frame is None:
                continue
            with frame.buffer:
                a = frame.array
                summary = f"min {a.min():.4g} max {a.max():.4g} mean {a.mean():.4g}" if a.size else "empty"
                print(f"{args.port} t={frame.timestamp} {a.dtype}{list(a.shape)} {summary}", flush=True)
            seen += 1
            now = time.monotonic()
            if now - last >= 1.0:
                print(f"-- {seen / (now - t0):.1f} frames/s, {tap.drops} dropped by this tap", flush=True)
                last = now
        print(f"{seen} frames in {time.monotonic() - t0:.1f} s, {tap.drops} dropped by this tap")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mq", description="multiqueue command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the spectrum monitor: a graph of blocks in several processes",
                   add_help=False)
    sub.add_parser("stream-demo", help="two processes sharing buffers through a port queue", add_help=False)
    p = sub.add_parser("stats", help="pools, counters and processes of a domain")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_stats)
    p = sub.add_parser("tap", help="print the frames of a running graph's output port")
    p.add_argument("domain")
    p.add_argument("port", help="BLOCK.PORT, e.g. source.out")
    p.add_argument("--count", type=int, default=None, help="stop after this many frames")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.set_defaults(func=_tap)
    p = sub.add_parser("cleanup", help="remove a stale domain (refused while it has live processes)")
    p.add_argument("domain")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.set_defaults(func=_cleanup)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .spectrum_demo import main as demo_main

        return demo_main(rest)
    if args.command == "stream-demo":
        from .demo import main as stream_demo_main

        return stream_demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except MultiQueueError as e:
        print(f"mq {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
