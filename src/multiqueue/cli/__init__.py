"""The `mq` command: demos, graph files, and tools to look into and control the domains
of this machine.  One module per command group; ``main()`` assembles their parsers."""

import argparse
import os
import signal
import sys
import threading
import traceback

from ..control.log import log_dir
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
    if rest and not args.own_options:  # a demo parses the rest of the line itself
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.long_running and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # they run until stopped: SIGTERM ends them as Ctrl-C
    try:
        return args.func(rest) if args.own_options else args.func(args)
    except (MultiQueueError, CommandError) as e:  # what the user can fix: one line, no traceback
        print(f"mq {args.command}: {error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C where a command does not end on it by itself (tap...)
        return 130
    except BrokenPipeError:  # `mq ... | head`: the reader left; no traceback, none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except PermissionError as e:  # a file or directory of another user: the machine's setup, not a bug
        print(f"mq {args.command}: {_permission_text(e)}", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - anything else is a bug: the traceback, and say so
        traceback.print_exc()
        print(f"mq {args.command}: internal error: this is a bug in multiqueue, not a mistake of yours; "
              "please report it with the traceback above", file=sys.stderr)
        return 1


def _permission_text(e: PermissionError) -> str:
    where = e.filename if isinstance(e.filename, str) else "a file"
    path, logs = os.path.abspath(where), os.path.abspath(log_dir())
    if path == logs or logs.startswith(path + os.sep) or path.startswith(logs + os.sep):  # the log dir's way
        return (f"permission denied on {where}: the domain logs go to {logs}, which this user cannot "
                "write; set MQ_LOG_DIR to a directory of yours")
    return f"permission denied on {where}: it belongs to another user; run as that user, or use another path"


def _interrupt(signum, frame):
    raise KeyboardInterrupt
