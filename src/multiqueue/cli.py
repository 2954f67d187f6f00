"""The `mq` command: demos, graph files, stats, taps and cleanup of domains."""

import argparse
import dataclasses
import json
import sys

from .errors import MultiQueueError
from .shm import ShmManager
from .shm.segment import DEFAULT_PREFIX, check_domain


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


def _run(args) -> int:
    """Load a graph file, run it with a progress line a second, print the summary.
    Exit 0: done; 1: a block failed (or pool blocks leaked); 2: a bad graph file."""
    import time

    from .graph import BlockError, GraphError
    from .graph.graphfile import load_graph

    try:
        rt = load_graph(args.graph, domain=args.domain)
    except OSError as e:
        print(f"mq run: cannot read {args.graph}: {e.strerror or e}", file=sys.stderr)
        return 2
    except GraphError as e:  # GraphFileError: file:line: key: reason
        print(e, file=sys.stderr)
        return 2
    print(f"running {args.graph} in domain {rt.domain!r}: {len(rt.blocks)} blocks, {len(rt.edges)} "
          f"connections; Ctrl-C stops it. Watch a port with: mq tap {rt.domain} BLOCK.PORT", flush=True)
    failure, how = None, "the sources are done"
    try:
        rt.start()
    except GraphError as e:  # what only start() checks (e.g. a block that cannot be pickled)
        print(f"mq run: {args.graph}: {e}", file=sys.stderr)
        return 2
    except BlockError as e:  # a block failed in initialize()
        failure = e
    except KeyboardInterrupt:  # start() stopped what it had started
        print("interrupted while starting", file=sys.stderr)
        return 130
    t0 = time.monotonic()
    deadline = None if args.duration is None else t0 + args.duration
    next_line = t0 + 1.0
    try:
        while failure is None:
            wake = next_line if deadline is None else min(next_line, deadline)
            if rt.wait(timeout=max(0.0, wake - time.monotonic())):
                break
            now = time.monotonic()
            if now >= next_line:
                next_line += 1.0
                if not args.quiet:
                    print(_progress(rt, now - t0), flush=True)
            if deadline is not None and now >= deadline:
                how = f"{args.duration:g} s passed"
                _stop(rt)
                break
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        how = "interrupted"
        try:
            _stop(rt)
        except BlockError as e:
            failure = e
    except BlockError as e:  # raised by wait() or stop() once the graph has ended
        failure = e
    if failure is not None:
        how = "a block failed"
    print(f"\nstopped after {time.monotonic() - t0:.1f} s ({how})")
    if rt.final_stats is not None:
        print(rt.final_stats.format())
    print(f"pool blocks still in use after the stop: {rt.blocks_in_use_at_end}")
    if failure is not None:
        print(f"mq run: {failure}", file=sys.stderr)
        return 1
    if rt.blocks_in_use_at_end:
        print(f"mq run: {rt.blocks_in_use_at_end} pool blocks were not released", file=sys.stderr)
        return 1
    return 0


def _stop(rt) -> None:
    """Stop the graph in order; a second Ctrl-C must not cut the teardown short (the
    runtime's drain timeout and SIGKILL escalation bound how long it takes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        rt.stop()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rt.stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(rt, elapsed: float) -> str:
    """Two lines: items and rate per block (out; in for sinks), fill and drops per edge."""
    s = rt.stats()
    blocks = []
    for name, b in s.blocks.items():
        if rt.blocks[name].block.kind == "sink":
            blocks.append(f"{name} {b.items_in} in ({b.rate_in:.1f}/s)")
        else:
            blocks.append(f"{name} {b.items_out} ({b.rate_out:.1f}/s)")
    edges = [f"{e.dst} {e.lag}/{e.capacity}" + (f" ({e.drops} dropped)" if e.policy == "drop_oldest" else "")
             for e in s.edges]
    return f"[{elapsed:5.1f} s] {'  '.join(blocks)}\n          fill: {'  '.join(edges)}"


def _domain_name(text: str) -> str:
    try:
        return check_domain(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mq", description="multiqueue command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the spectrum monitor: a graph of blocks in several processes",
                   add_help=False)
    sub.add_parser("stream-demo", help="two processes sharing buffers through a port queue", add_help=False)
    p = sub.add_parser("run", help="run a graph file (YAML): live progress, then a summary")
    p.add_argument("graph", help="the graph file, e.g. examples/graphs/sine.yaml")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: when the sources are done, or Ctrl-C)")
    p.add_argument("--domain", type=_domain_name, default=None,
                   help="the domain to run in (default: the file's 'domain:', else its name)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    p.set_defaults(func=_run)
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
