"""The `mq` command: demo, stats and cleanup of domains."""

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mq", description="multiqueue command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="two processes sharing buffers through a domain", add_help=False)
    p = sub.add_parser("stats", help="pools, counters and processes of a domain")
    p.add_argument("domain")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_stats)
    p = sub.add_parser("cleanup", help="remove a stale domain (refused while it has live processes)")
    p.add_argument("domain")
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.set_defaults(func=_cleanup)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except MultiQueueError as e:
        print(f"mq {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
