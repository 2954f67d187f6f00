"""The `mq` command: demos, graph files, and tools to look into and control the domains
of this machine.  One module per command group; ``main()`` assembles their parsers."""

import argparse
import os
import signal
import sys
import threading

from ..errors import MultiQueueError
from . import demos, domains, graphs, logs, messages, remote, top
from .common import CommandError, error_text

COMMAND_GROUPS = (demos, graphs, remote, domains, top, messages, logs)  # the order of `mq --help`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mq", description="multiqueue command line: demos, graph files, and tools to look into and "
        "control the domains of this machine (human-readable tables; --json for scripts)")
    # a command group sets these for its commands: a demo parses its own options; a command
    # that runs until stopped ends on SIGTERM as on Ctrl-C
    parser.set_defaults(own_options=False, long_running=False)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.add_parser(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.own_options:  # a demo parses the rest of the line itself
        return args.func(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.long_running and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # they run until stopped: SIGTERM ends them as Ctrl-C
    try:
        return args.func(args)
    except (MultiQueueError, CommandError) as e:
        print(f"mq {args.command}: {error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C where a command does not end on it by itself (tap...)
        return 130
    except BrokenPipeError:  # `mq ... | head`: the reader left; no traceback, none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
