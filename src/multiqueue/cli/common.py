"""What every `mq` command group shares: the error that ends a command, JSON output,
argument types, and attaching to a domain as a tool."""

import argparse
import json

from ..checks import check_int, check_number
from ..control.topics import check_topic
from ..shm import ShmManager
from ..shm.segment import check_domain
from ..tools.inspect import error_text

TOOL_PREFIX = "mq:"  # the process name of an `mq` tool attached to a domain starts with this

__all__ = ["TOOL_PREFIX", "AttachedTool", "CommandError", "checked_topic", "count", "domain_name",
           "error_text", "parse_value", "port_number", "print_json", "seconds", "start_dashboard"]


class CommandError(Exception):
    """A command cannot go on: main() prints ``mq COMMAND: <message>`` on stderr, exit status 1."""


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str), flush=True)


def parse_value(text: str, as_text: bool = False):
    """JSON if it parses (numbers, true, lists, objects...), else the string itself."""
    if as_text:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def start_dashboard(domain: str, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                    read_only: bool = False):
    """The live dashboard of ``domain``, serving on its own thread (``.url``, ``.stop()``);
    CommandError if its access settings cannot be used (a token missing or too short)."""
    # imported here: the dashboard's web server (asyncio, websockets) costs ~200 ms of
    # import (python -X importtime), which no other `mq` command should pay
    from ..dashboard import AccessError, Dashboard

    try:
        dashboard = Dashboard(domain, host=host, port=port, token=token, read_only=read_only)
    except AccessError as e:
        raise CommandError(str(e)) from None
    return dashboard.start()


def checked_topic(topic: str) -> str:
    """``topic`` if it is a valid bus topic, else CommandError saying why."""
    try:
        check_topic(topic)
    except ValueError as e:
        raise CommandError(str(e)) from None
    return topic


# -- argument types -------------------------------------------------------------------------


def domain_name(text: str) -> str:
    try:
        return check_domain(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def seconds(text: str) -> float:
    """A --timeout / --duration / --interval: a finite number of seconds >= 0."""
    try:
        return check_number("seconds", float(text), minimum=0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {text!r}") from None


def port_number(text: str) -> int:
    """A --port: a TCP port, 0 (any free one) to 65535."""
    try:
        return check_int("port", int(text), 0, 65535)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535 (0: any free port), "
                                         f"not {text!r}") from None


def count(text: str) -> int:
    """A --count / --iterations / --lines: an int >= 0."""
    try:
        return check_int("count", int(text), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, not {text!r}") from None


# -- attaching as a tool --------------------------------------------------------------------


class AttachedTool:
    """A tool process attached to an existing domain (never creates one), named "mq:<command>".

    It leaves a domain as it found it: if the domain had no other live process when
    the tool came (a crashed domain looked at), its segments stay for `mq clean`; if
    it had, and they all left while the tool was attached, the tool was the last
    process of the domain and removes its segments, as the last process always does.
    Other tools do not count as the domain's processes here: two `mq top` must not
    keep a finished domain alive for each other.
    """

    def __init__(self, domain: str, command: str, reaper_interval: float | None = None):
        self.manager = ShmManager(domain, name=TOOL_PREFIX + command, create=False,
                                  reaper_interval=reaper_interval)
        self.others_seen = False
        self.others_alive()

    def others_alive(self) -> bool:
        """Is a process of the domain other than `mq` tools alive now?"""
        alive = any(p["alive"] and not p["self"] and not p["name"].startswith(TOOL_PREFIX)
                    for p in self.manager.processes())
        self.others_seen |= alive
        return alive

    def close(self) -> None:
        self.manager.shutdown(unlink=None if self.others_seen else False)

    def __enter__(self) -> "AttachedTool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
