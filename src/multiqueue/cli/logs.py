"""`mq logs`: the domain's log (control.log reads and follows it; this module prints it)."""

import json
import os
import sys

from ..control.log import follow, log_path, parse_line, read_lines
from ..shm.segment import DEFAULT_PREFIX, segment_path
from .common import CommandError, count, domain_name


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("logs", help="the domain's log (every process's lines)")
    p.add_argument("domain", type=domain_name)
    p.add_argument("-n", "--lines", type=count, default=10, help="the last N lines (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="then print lines as they are appended")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=logs, long_running=True)


def logs(args) -> int:
    path = log_path(args.domain)
    if not os.path.exists(path) and not os.path.exists(segment_path(DEFAULT_PREFIX, args.domain, "ctl")):
        raise CommandError(f"no domain {args.domain!r} and no log of it ({path})")
    try:
        return _follow_log(args, path) if args.follow else _print_log(args, path)
    except PermissionError:
        raise CommandError(f"permission denied reading the log {path}: it (or its directory) belongs to "
                           "another user (logs are created owner-only); run as that user") from None


def _print_log(args, path: str) -> int:
    lines = read_lines(args.domain, args.lines)
    if not lines and not os.path.exists(path):
        print(f"domain {args.domain!r} has no log yet ({path})", file=sys.stderr)
    for line in lines:
        _print_line(line, args.json)
    return 0


def _follow_log(args, path: str) -> int:
    lines = follow(args.domain, last=args.lines)  # opened now: nothing written from here on is missed
    try:  # a Ctrl-C right after the line below stops it as well as one later
        waiting = "" if os.path.exists(path) else " (no log yet)"
        print(f"following {path}{waiting}; Ctrl-C stops", file=sys.stderr, flush=True)
        for line in lines:
            _print_line(line, args.json)
    except KeyboardInterrupt:
        pass
    return 0


def _print_line(line: str, as_json: bool) -> None:
    print(json.dumps(parse_line(line)) if as_json else line, flush=True)
