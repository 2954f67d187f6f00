"""Runtime: build a graph of blocks, run it across processes, report.

::

    rt = Runtime("sine")
    src = rt.add(SignalSource(rate=48_000, frame=1024), name="src")
    amp = rt.add(Multiply(0.5), name="amp")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rt.add(NullSink(), name="sink")["in"])
    rt.run(duration=2.0)          # or: with rt: rt.start(); ...; rt.stop()
    print(rt.stats().format())

How it runs, placement and supervision: docs/graphs.md ("Runtime", "Supervision").
"""

import inspect
import logging
import sys

from ..checks import check_number, show
from ..control.topics import control_topic
from ..errors import BlockError, GraphError
from ..shm import ShmConfig, ShmManager
from ..shm.segment import check_domain
from .block import Block
from .plan import output_capacity, queue_name, worker_blocks
from .spec import BlockHandle, Edge, GraphSpec, PortRef
from .stats import BlockFailure, GraphStats, graph_stats
from .supervise import Supervisor, exit_reason

_log = logging.getLogger("mq.runtime")
MAX_SECONDS = 10**9  # the longest drain_timeout / start_timeout (threading's waits have a limit)
MAIN_GUARD_EXIT = 78  # a worker that re-ran an unguarded main script exits so (EX_CONFIG)


class Runtime:
    """A graph of blocks in a domain; see the module docstring.

    ``domain``: a domain name (checked here: ValueError); ``pools``: None (the default
    pools) or a ShmConfig; ``capacity``: the default edge capacity, a power of two from
    1 to 2**24; ``drain_timeout``: seconds (>= 0) a stop waits for the blocks to drain
    before aborting them; ``start_timeout``: seconds (>= 0, None: no limit) start()
    waits for every block to get ready.
    """

    def __init__(self, domain: str, *, pools: ShmConfig | None = None, capacity: int = 16,
                 drain_timeout: float = 10.0, start_timeout: float | None = 60.0):
        self._init(GraphSpec(domain, pools=pools, capacity=capacity), drain_timeout, start_timeout)

    @classmethod
    def from_spec(cls, spec: GraphSpec, *, drain_timeout: float = 10.0,
                  start_timeout: float | None = 60.0) -> "Runtime":
        """A runtime of ``spec`` (from load_graph, or built in Python); blocks and edges
        added to the runtime are added to the spec."""
        if not isinstance(spec, GraphSpec):
            raise TypeError(f"from_spec() takes a GraphSpec (load_graph() makes one), not "
                            f"{type(spec).__name__}")
        runtime = cls.__new__(cls)
        runtime._init(spec, drain_timeout, start_timeout)
        return runtime

    def _init(self, spec: GraphSpec, drain_timeout, start_timeout) -> None:
        check_seconds("drain_timeout", drain_timeout)
        check_seconds("start_timeout", start_timeout, none=True)
        self.spec = spec
        self.drain_timeout = drain_timeout
        self.start_timeout = start_timeout
        self.failures: list[BlockFailure] = []
        self.supervisor: Supervisor | None = None  # from start() on: the running graph

    # -- building -------------------------------------------------------------------------

    def add(self, block: Block, name: str | None = None, *, placement: str = "process",
            restart: str = "stop", max_restarts: int = 3) -> BlockHandle:
        """Add a block; returns its handle (``handle["out"]`` names a port)."""
        self._check_building("add blocks")
        return self.spec.add(block, name, placement=placement, restart=restart, max_restarts=max_restarts)

    def connect(self, src: PortRef, dst: PortRef, *, policy: str = "block",
                capacity: int | None = None) -> Edge:
        """Connect an output port to an input port (an output may feed many inputs)."""
        self._check_building("connect ports")
        return self.spec.connect(src, dst, policy=policy, capacity=capacity)

    def __getitem__(self, name: str) -> BlockHandle:
        return self.spec[name]

    @property
    def domain(self) -> str:
        return self.spec.domain

    @property
    def pools(self) -> ShmConfig | None:
        return self.spec.pools

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    @property
    def blocks(self) -> dict[str, BlockHandle]:
        return self.spec.blocks

    @property
    def edges(self) -> list[Edge]:
        return self.spec.edges

    @property
    def state(self) -> str:
        """"building", then "starting", "running", "stopping", "stopped"."""
        return "building" if self.supervisor is None else self.supervisor.state

    @property
    def manager(self) -> ShmManager | None:
        """The runtime's ShmManager of the domain while the graph runs (None before)."""
        return None if self.supervisor is None else self.supervisor.shared.manager

    @property
    def final_stats(self) -> GraphStats | None:
        """stats() as they were when the graph ended (None before)."""
        return None if self.supervisor is None else self.supervisor.shared.final_stats

    @property
    def blocks_in_use_at_end(self) -> int | None:
        """Pool blocks still held after the stop (0: nothing leaked; None before)."""
        return None if self.supervisor is None else self.supervisor.shared.blocks_in_use_at_end

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Validate, create the queues, start every worker and let the sources go."""
        self._check_building("start")
        exit_if_main_script_rerun()
        check_domain(self.domain)  # before its log file is opened
        workers = worker_blocks(self.spec)
        self.supervisor = Supervisor(self.spec, self.drain_timeout, self.failures)
        try:
            self.supervisor.start(self.describe(), workers, self.start_timeout)
        except BlockError:
            if any(f.reason == exit_reason(MAIN_GUARD_EXIT) for f in self.failures):
                raise GraphError(missing_main_guard()) from None
            raise
        _log.info("graph started: %s", ", ".join(f"{h.name} ({h.placement})" for h in self.blocks.values()))
        self.supervisor.shared.bus.subscribe("ctl", callback=self._graph_command)

    def stop(self, timeout: float | None = None) -> None:
        """Stop in order (sources first, then drain), wait, release everything.
        After ``timeout`` seconds whatever still runs is aborted, then killed.

        Raises BlockError if a block failed and stopped the graph."""
        if self.supervisor is None:
            return
        self.supervisor.stop(timeout)
        self.supervisor.raise_fatal()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every block has finished (True) or ``timeout`` passes (False).
        Raises BlockError if a block failed and stopped the graph."""
        if self.supervisor is None:
            raise GraphError("the graph was not started")
        if not self.supervisor.all_exited.wait(timeout):
            return False
        self.supervisor.teardown()
        self.supervisor.raise_fatal()
        return True

    def run(self, duration: float | None = None) -> None:
        """Start (if needed), run until the sources are done or ``duration`` seconds
        pass, then stop.  Ctrl-C stops in order too."""
        if self.supervisor is None:
            self.start()
        try:
            if not self.wait(duration):
                self.stop()
        except KeyboardInterrupt:
            self.stop()

    def set_parameter(self, block: str, name: str, value, *, at_ns: int | None = None) -> None:
        """Change a block's run-time parameter, in its worker if it runs (acknowledged:
        the block's error is raised here).  With ``at_ns`` the block applies it exactly
        at the first input frame whose timestamp reaches ``at_ns`` (a source: when its
        clock does).  Any process can do the same over the bus (``mq param``).  A value
        the parameter's declaration (a Param) refuses raises TypeError / ValueError here,
        before it reaches the worker; nothing changes."""
        self._parameter({"cmd": "set", "block": block, "name": name, "value": value, "at_ns": at_ns})

    def get_parameter(self, block: str, name: str):
        return self._parameter({"cmd": "get", "block": block, "name": name})

    def stats(self) -> GraphStats:
        """Per block: state, items, rates, work time; per edge: fill, drops."""
        if self.state in ("building", "stopped") or self.supervisor.shared.graph is None:
            raise GraphError("the graph is not running (final_stats has its last stats)")
        return graph_stats(self.supervisor.shared.graph, self.supervisor.shared.queue_stats())

    def describe(self) -> dict:
        """The graph as data (what the graph segment and attach() see)."""
        return {
            "domain": self.domain,
            "blocks": [
                {"name": h.name, "class": f"{type(h.block).__module__}.{type(h.block).__qualname__}",
                 "kind": h.block.kind, "placement": h.placement, "restart": h.restart,
                 "counters": list(h.block.counters), "parameters": h.block.describe_parameters(),
                 "inputs": {p: s.describe() for p, s in h.inputs.items()},
                 "outputs": {p: {**s.describe(), "queue": queue_name(h.name, p)}
                             for p, s in h.outputs.items()}}
                for h in self.blocks.values()
            ],
            # an output's connections share its queue, sized to the largest capacity asked
            "edges": [{"src": str(e.src), "dst": str(e.dst), "policy": e.policy,
                       "capacity": output_capacity(self.spec, e.src.block, e.src.port),
                       "queue": queue_name(e.src.block, e.src.port)} for e in self.edges],
        }

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self.state in ("starting", "running", "stopping"):
            try:
                self.stop()
            except BlockError:
                if exc_type is None:
                    raise

    def __repr__(self) -> str:
        return f"<Runtime {self.domain!r} {self.state}, {len(self.blocks)} blocks>"

    # -- internals ------------------------------------------------------------------------------

    def _check_building(self, what: str) -> None:
        if self.supervisor is not None:
            raise GraphError(f"cannot {what}: the graph was already started")

    def _graph_command(self, message) -> None:
        """Commands to the whole graph on topic ``ctl``: stop (in order), pause, resume
        (or start) every block.  Answers like a block's: ``{"ok": ..., "error": ...}``."""
        command = message.data.get("cmd") if isinstance(message.data, dict) else None
        bus = self.supervisor.shared.bus
        try:
            if command == "stop":
                self.supervisor.begin_stop()
            elif command in ("pause", "resume", "start"):
                verb = "resume" if command == "start" else command
                for name in self.blocks:
                    if not self.supervisor.host_done(name):
                        bus.publish(control_topic(name), {"cmd": verb})
            else:
                raise ValueError(f"unknown graph command {command!r}: stop, pause, resume, start")
            bus.reply(message, {"ok": True})
        except Exception as e:  # noqa: BLE001 - the requester gets the error text
            bus.reply(message, {"ok": False, "error": f"{type(e).__name__}: {e}"})

    def _parameter(self, command: dict):
        """A parameter command: to the block's worker over the bus while it runs, else
        to the Block object here (a timed change needs the worker)."""
        handle = self[command["block"]]
        if self.state != "running":
            if command["cmd"] == "set" and command.get("at_ns") is None:
                handle.block.set_parameter(command["name"], command["value"])
                return None
            if command["cmd"] == "get":
                return handle.block.get_parameter(command["name"])
            raise GraphError("a timed parameter change needs a running graph")
        if self.supervisor.host_done(handle.name):
            raise BlockError(f"block {handle.name!r} has ended; its parameters cannot change any more")
        if command["cmd"] == "set" and command["name"] in handle.block.parameters:  # refused here, not there
            command["value"] = handle.block.check_value(command["name"], command["value"])
        answer = self.supervisor.shared.bus.request(control_topic(handle.name), command, timeout=10.0).data
        if not answer.get("ok"):
            raise BlockError(f"block {handle.name!r}: {answer.get('error')}")
        return answer.get("value")


def exit_if_main_script_rerun() -> None:
    """End this process quietly (exit status MAIN_GUARD_EXIT) if it is a worker that
    multiprocessing started by importing the main script as ``__mp_main__`` (spawn and
    forkserver do) and that script starts a graph at its top level: it has no
    ``if __name__ == "__main__":`` guard.  Without this every worker would start a
    graph of its own and fail with "domain already runs a graph", one traceback each;
    the runtime that started the worker names the cause once (missing_main_guard)."""
    if "__mp_main__" not in sys.modules:  # only multiprocessing's workers have one
        return
    frame = inspect.currentframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            raise SystemExit(MAIN_GUARD_EXIT)
        frame = frame.f_back


def missing_main_guard() -> str:
    script = getattr(sys.modules.get("__main__"), "__file__", None) or "the main script"
    return (f"{script} starts a graph when it is imported: every worker process imports the main "
            "script (multiprocessing's spawn), so each tried to start the graph again. Put the code "
            'that builds and runs the graph under `if __name__ == "__main__":`')


def check_seconds(name: str, seconds, *, none: bool = False) -> float | None:
    """A timeout: a number of seconds from 0 to MAX_SECONDS (or None if ``none``)."""
    value = check_number(name, seconds, minimum=0, none=none)
    if value is not None and value > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS} seconds, not {show(seconds)}")
    return value
