"""Host: the worker (a process, or a thread of the runtime's) running a group of blocks.

The protocol with the runtime and the bus commands are in docs/graphs.md ("Workers").
"""

import logging
import multiprocessing.connection
import os
import signal
import threading
import traceback

from ..control.bus import Bus
from ..control.log import domain_logger
from ..control.topics import control_topic
from ..shm import ShmManager
from . import registry as R
from .blockio import SLICE_S
from .params import json_value
from .runner import BlockRunner, WorkerBlock

_log = logging.getLogger("mq.runner")


class Host:
    """Runs a group of blocks (one process, or one thread of the runtime's process)."""

    def __init__(self, domain: str, prefix: str, specs: list[WorkerBlock], conn, process_name: str):
        self.domain, self.prefix, self.specs = domain, prefix, specs
        self.conn = conn
        self.process_name = process_name
        self._send_lock = threading.Lock()
        self._ended_r, self._ended_w = os.pipe()  # a block's thread ended: wakes the control loop
        self._runtime_gone = False

    def report(self, message) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):
                pass  # the runtime is gone; our work ends with the queues

    def serve(self) -> None:
        """Attach, prepare every block, report ready, run them once told to start,
        serve commands until they end; then leave the domain and report "exit"."""
        domain_logger(self.domain, process_name=self.process_name)
        manager = ShmManager(self.domain, create=False, name=self.process_name[:31], reaper_interval=None)
        graph = bus = None
        runners: list[BlockRunner] = []
        try:
            graph = R.GraphSegment.open(self.prefix, self.domain)
            bus = Bus(manager)
            for spec in self.specs:
                runners.append(BlockRunner(spec, manager, graph, self.report, self._block_ended))
                joined = runners[-1].prepare()
                self._serve_bus(bus, runners[-1])  # before "ready": commands work once start() returns
                self.report(("ready", spec.name, joined))
            if self._wait_for_start(runners):
                for runner in runners:
                    runner.start()
                self._control(runners)
        except BaseException:
            self.report(("failed", self.specs[0].name if not runners else runners[-1].name,
                         traceback.format_exc()))
        finally:
            self._leave(manager, graph, bus, runners)

    def _leave(self, manager: ShmManager, graph, bus, runners: list[BlockRunner]) -> None:
        for runner in runners:
            if runner.thread is None and runner.io is not None:
                runner.abandon()
        if bus is not None:
            bus.close()
        if graph is not None:
            graph.close()
        manager.shutdown()
        os.close(self._ended_r)
        os.close(self._ended_w)
        self.report(("exit",))

    def _wait_for_start(self, runners) -> bool:
        while True:
            message = self._recv()
            if message[0] in ("stop", "abort"):
                return False
            if message[0] == "start":
                return True
            self._handle(message, runners)

    def _block_ended(self) -> None:
        os.write(self._ended_w, b"x")

    def _control(self, runners) -> None:
        """Serve commands until every block's thread has ended."""
        ended = 0
        while ended < len(runners):
            waitables = [self._ended_r] if self._runtime_gone else [self.conn, self._ended_r]
            ready = multiprocessing.connection.wait(waitables, timeout=SLICE_S)
            if self._ended_r in ready:
                ended += len(os.read(self._ended_r, 64))
            if self.conn in ready:
                self._handle(self._recv(), runners)
        for runner in runners:
            runner.thread.join()

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self._runtime_gone = True  # its end of the pipe stays readable: stop watching it
            return ("abort",)  # the runtime died: stop everything

    @staticmethod
    def _handle(message, runners) -> None:
        kind = message[0]
        if kind == "stop":  # the graph stops: its sources end, the rest drains after them
            for r in runners:
                if not r.readers:
                    r.stop.set()
        elif kind == "abort":
            for r in runners:
                r.stop.set()
                r.abort.set()

    def _serve_bus(self, bus: Bus, runner: BlockRunner) -> None:
        """A block answers commands on its topic ``ctl-<block>`` (see docs/graphs.md)."""
        bus.subscribe(control_topic(runner.name), callback=lambda m: _command(bus, runner, m))
        bus.inbox(runner.name, callback=runner.deliver)  # bus.send(block, ...): Block.on_message
        runner.io.bus = bus  # Block.bus: the block's own publishing and sending
        runner.publish_status = lambda event: _publish_status(bus, runner.name, event)


def _publish_status(bus: Bus, block: str, event: str) -> None:
    try:
        bus.publish("status", {"event": event, "block": block, "pid": os.getpid()}, timeout=0)
    except Exception:  # noqa: BLE001 - events are best effort
        _log.warning("could not publish the status event %s", event)


def _command(bus: Bus, runner: BlockRunner, message) -> None:
    """Run one command from the block's topic; the requester gets {"ok", "value"/"error"}."""
    data = message.data if isinstance(message.data, dict) else {}
    try:
        bus.reply(message, {"ok": True, "value": _run_command(runner, data)})
    except Exception as e:  # noqa: BLE001 - the requester gets the error text
        bus.reply(message, {"ok": False, "error": f"{type(e).__name__}: {e}"})


def _run_command(runner: BlockRunner, data: dict):
    command = data.get("cmd")
    if command == "set":
        runner.set_parameter(data["name"], data.get("value"), data.get("at_ns"))
    elif command == "get":
        return json_value(runner.get_parameter(data["name"]))
    elif command == "params":  # each parameter's type, range and current value (mq param DOMAIN BLOCK)
        with runner.lock:
            return runner.block.describe_parameters(values=True)
    elif command == "pause":
        runner.pause()
    elif command in ("resume", "start"):
        runner.resume()
    elif command == "stop":
        runner.request_stop()
    else:
        raise ValueError(f"unknown command {command!r}: set, get, params, pause, resume, start, stop")
    return None


def host_main(domain: str, prefix: str, specs: list[WorkerBlock], conn, process_name: str) -> None:
    """Entry point of a worker process (started with spawn)."""
    # Ctrl-C, and SIGTERM to the whole process group (systemd, `timeout`, a closing
    # terminal's job control), are the runtime's: it stops us in order; we stop on our own
    # only when it is gone (our pipe to it ends)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Host(domain, prefix, specs, conn, process_name).serve()
