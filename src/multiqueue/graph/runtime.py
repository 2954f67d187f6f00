"""Runtime: build a graph of blocks, run it across processes, supervise, report.

::

    rt = Runtime("sine")
    src = rt.add(SignalSource(rate=48_000, frame=1024), name="src")
    amp = rt.add(Multiply(0.5), name="amp")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rt.add(NullSink(), name="sink")["in"])
    rt.run(duration=2.0)          # or: with rt: rt.start(); ...; rt.stop()
    print(rt.stats().format())

Each output port is a PortQueue named ``<block>-<port>`` in the domain; each
connection is a reader of it with its own overflow policy (fan-out = several
readers).  Placement: ``"process"`` (default: a worker process of its own, started
with spawn, attaching to the domain by name), ``"thread"`` (a thread of this
process) or any other name (blocks with the same name share one process).

Supervision: a worker that dies (exception, exit, SIGKILL) is noticed at once
through its process sentinel; its references are reclaimed and, per block,
``restart="stop"`` (default) stops the graph in order and ``wait()`` / ``run()``
raise BlockError with the worker's traceback, while ``restart="restart"`` starts
the block again (up to ``max_restarts`` times).  Stopping is orderly: sources
stop, every block drains its inputs and closes its outputs, workers exit; after
``drain_timeout`` the rest is aborted, and killed if it still does not exit.
"""

import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass, field

from ..checks import check_number, show
from ..control.bus import Bus
from ..control.log import domain_logger, remove_domain_handlers
from ..control.topics import control_topic
from ..errors import BlockError, GraphError
from ..shm import ShmConfig, ShmManager
from ..shm.segment import check_domain
from ..stream.queue import PortQueue, reap_dead_readers_everywhere
from . import registry as R
from .block import Block
from .runner import Host, InputEdge, WorkerBlock, host_main
from .spec import BlockHandle, Edge, GraphSpec, PortRef

_ABORT_GRACE_S = 2.0  # after an abort, processes get this long before SIGKILL
_log = logging.getLogger("mq.runtime")
MAX_SECONDS = 10**9  # the longest drain_timeout / start_timeout (threading's waits have a limit)


@dataclass
class BlockFailure:
    """A block's worker failed: which, why, and what the runtime did about it."""

    block: str
    reason: str
    traceback: str | None
    action: str  # "stopped the graph" or "restarted"
    at: float = field(default_factory=time.time)

    def __str__(self) -> str:
        text = f"block {self.block!r} failed ({self.reason}); {self.action}"
        return f"{text}\n{self.traceback}" if self.traceback else text


@dataclass
class BlockStats:
    name: str
    state: str
    pid: int
    items_in: int
    items_out: int
    rate_in: float  # items per second since the block started
    rate_out: float
    work_calls: int
    work_s: float
    restarts: int
    failures: int
    counters: dict = field(default_factory=dict)  # the block's own counters (Block.counters)


@dataclass
class EdgeStats:
    src: str
    dst: str
    policy: str
    capacity: int
    lag: int  # frames waiting for the consumer (fill = lag / capacity)
    drops: int
    popped: int


@dataclass
class GraphStats:
    blocks: dict[str, BlockStats]
    edges: list[EdgeStats]

    def format(self) -> str:
        lines = [f"{'block':<16}{'state':<9}{'in':>10}{'out':>10}{'in/s':>10}{'out/s':>10}{'work s':>9}"]
        for b in self.blocks.values():
            lines.append(f"{b.name:<16}{b.state:<9}{b.items_in:>10}{b.items_out:>10}{b.rate_in:>10.1f}"
                         f"{b.rate_out:>10.1f}{b.work_s:>9.2f}")
            if b.counters:
                lines.append(" " * 16 + "  ".join(f"{k}={v}" for k, v in b.counters.items()))
        lines.append(f"{'edge':<32}{'policy':<12}{'fill':>9}{'drops':>8}")
        for e in self.edges:
            fill = f"{e.lag}/{e.capacity}"
            lines.append(f"{e.src + ' -> ' + e.dst:<32}{e.policy:<12}{fill:>9}{e.drops:>8}")
        return "\n".join(lines)


class _HostHandle:
    """The runtime's side of one host: its process or thread, pipe and state."""

    def __init__(self, key: str, names: list[str], kind: str):
        self.key, self.names, self.kind = key, names, kind
        self.conn = None
        self.process = None
        self.thread = None
        self.ready: set[str] = set()
        self.failures: list[tuple[str, str]] = []  # (block, traceback)
        self.exit_message = False
        self.done = False
        self.handled = False  # a failure of this host was acted on (restart or stop)

    def send(self, message) -> None:
        try:
            self.conn.send(message)
        except (OSError, BrokenPipeError):
            pass  # it is exiting; the sentinel tells the rest

    @property
    def waitables(self) -> list:
        objects = [] if self.conn is None or self.conn.closed else [self.conn]
        if self.process is not None:
            objects.append(self.process.sentinel)
        return objects


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
        self.manager: ShmManager | None = None
        self._graph: R.GraphSegment | None = None
        self._queues: dict[tuple[str, str], PortQueue] = {}
        self._hosts: dict[str, _HostHandle] = {}
        self._state = "building"
        self._lock = threading.RLock()
        self._all_ready = threading.Event()
        self._all_exited = threading.Event()
        self._stop_at: float | None = None
        self._abort_at: float | None = None
        self._fatal: BlockFailure | None = None
        self._supervisor: threading.Thread | None = None
        self._bus: Bus | None = None
        self._drops_seen: dict[int, int] = {}
        self._next_drops_check = 0.0
        self.blocks_in_use_at_end: int | None = None  # pool blocks still held after the stop
        self.final_stats: GraphStats | None = None  # stats() as they were when the graph ended

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

    # -- running ----------------------------------------------------------------------------

    def start(self) -> None:
        """Validate, create the queues, start every worker and let the sources go."""
        self._check_building("start")
        check_domain(self.domain)  # before its log file is opened
        specs = self._validate_and_pickle()
        self._state = "starting"
        try:
            domain_logger(self.domain, process_name="runtime")
            self.manager = ShmManager(self.domain, _with_bus_room(self.pools), name="runtime")
            self._bus = Bus(self.manager)
            # the graph segment first: it is what refuses a second graph in the domain
            self._graph = R.GraphSegment.create(self.manager.prefix, self.domain, self.describe(),
                                                 self.manager.access)
            self._create_queues()
            self._start_hosts(specs)
            self._supervisor = threading.Thread(target=self._supervise, name="mq-supervisor", daemon=True)
            self._supervisor.start()
            if not self._all_ready.wait(self.start_timeout) or self._fatal is not None:
                raise BlockError(str(self._fatal) if self._fatal else
                                 f"blocks did not get ready within {self.start_timeout} s: "
                                 f"{sorted(self._not_ready())}")
        except BaseException:
            self._begin_stop(abort=True)
            self._all_exited.wait(self.drain_timeout + _ABORT_GRACE_S + 1)
            self._teardown()
            raise
        with self._lock:
            if self._stop_at is not None:  # a failure began a stop meanwhile
                raise BlockError(str(self._fatal) if self._fatal else "the graph stopped while starting")
            self._state = "running"
            for host in list(self._hosts.values()):
                host.send(("start",))
        _log.info("graph started: %s", ", ".join(f"{h.name} ({h.placement})" for h in self.blocks.values()))
        self._status({"event": "started", "blocks": list(self.blocks)})
        self._bus.subscribe("ctl", callback=self._graph_command)

    def stop(self, timeout: float | None = None) -> None:
        """Stop in order (sources first, then drain), wait, release everything.
        After ``timeout`` seconds whatever still runs is aborted, then killed.

        Raises BlockError if a block failed and stopped the graph."""
        if self._state == "building":
            return
        if self._state != "stopped":
            self._begin_stop()
            if not self._all_exited.wait(timeout):
                self._kill_all()
            self._teardown()
        self._raise_fatal()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every block has finished (True) or ``timeout`` passes (False).
        Raises BlockError if a block failed and stopped the graph."""
        if self._state == "building":
            raise GraphError("the graph was not started")
        if not self._all_exited.wait(timeout):
            return False
        self._teardown()
        self._raise_fatal()
        return True

    def run(self, duration: float | None = None) -> None:
        """Start (if needed), run until the sources are done or ``duration`` seconds
        pass, then stop.  Ctrl-C stops in order too."""
        if self._state == "building":
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
        clock does).  Any process can do the same over the bus (``mq param``)."""
        self._parameter({"cmd": "set", "block": block, "name": name, "value": value, "at_ns": at_ns})

    def get_parameter(self, block: str, name: str):
        return self._parameter({"cmd": "get", "block": block, "name": name})

    def stats(self) -> GraphStats:
        """Per block: state, items, rates, work time; per edge: fill, drops."""
        if self._graph is None or self._state == "stopped":
            raise GraphError("the graph is not running (final_stats has its last stats)")
        return graph_stats(self._graph, self._queue_stats())

    def describe(self) -> dict:
        """The graph as data (what the graph segment and attach() see)."""
        return {
            "domain": self.domain,
            "blocks": [
                {"name": h.name, "class": f"{type(h.block).__module__}.{type(h.block).__qualname__}",
                 "kind": h.block.kind, "placement": h.placement, "restart": h.restart,
                 "counters": list(h.block.counters),
                 "inputs": {p: s.describe() for p, s in h.inputs.items()},
                 "outputs": {p: {**s.describe(), "queue": queue_name(h.name, p)}
                             for p, s in h.outputs.items()}}
                for h in self.blocks.values()
            ],
            # an output's connections share its queue, sized to the largest capacity asked
            "edges": [{"src": str(e.src), "dst": str(e.dst), "policy": e.policy,
                       "capacity": self._output_capacity(e.src.block, e.src.port),
                       "queue": queue_name(e.src.block, e.src.port)} for e in self.edges],
        }

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if self._state in ("starting", "running", "stopping"):
            try:
                self.stop()
            except BlockError:
                if exc_type is None:
                    raise

    def __repr__(self) -> str:
        return f"<Runtime {self.domain!r} {self._state}, {len(self.blocks)} blocks>"

    # -- internals: building --------------------------------------------------------------

    def _check_building(self, what: str) -> None:
        if self._state != "building":
            raise GraphError(f"cannot {what}: the graph was already started")

    def _validate_and_pickle(self) -> dict[str, WorkerBlock]:
        if not self.blocks:
            raise GraphError("the graph has no blocks")
        connected = {(e.dst.block, e.dst.port) for e in self.edges}
        specs = {}
        for index, h in enumerate(self.blocks.values()):
            for port in h.inputs:
                if (h.name, port) not in connected:
                    raise GraphError(f"input {h.name}.{port} is not connected; connect an output to it")
            in_thread = h.placement == "thread"  # runs the very object: no pickling
            try:
                data = b"" if in_thread else pickle.dumps(h.block)
            except Exception as e:
                raise GraphError(f"block {h.name!r} cannot be sent to its worker ({e}); define its class "
                                 "at module level and keep open resources for initialize(), or "
                                 "use placement='thread'") from None
            inputs = [InputEdge(e.dst.port, queue_name(e.src.block, e.src.port), e.policy, e.index)
                      for e in self.edges if e.dst.block == h.name]
            specs[h.name] = WorkerBlock(h.name, index, data, inputs,
                                      {p: queue_name(h.name, p) for p in h.outputs},
                                      block_object=h.block if in_thread else None)
        return specs

    def _output_capacity(self, block: str, port: str) -> int:
        """An output's queue capacity: the largest its connections ask for (they share
        one ring, so a drop_oldest branch may lag that far, not only its own capacity)."""
        return max([e.capacity for e in self.edges if (e.src.block, e.src.port) == (block, port)],
                   default=self.capacity)

    def _create_queues(self) -> None:
        for h in self.blocks.values():
            for port in h.outputs:
                self._queues[(h.name, port)] = PortQueue(self.manager, queue_name(h.name, port),
                                                         self._output_capacity(h.name, port))

    # -- internals: hosts and supervision ---------------------------------------------------

    def _start_hosts(self, specs: dict[str, WorkerBlock]) -> None:
        groups: dict[str, list[str]] = {}
        for h in self.blocks.values():
            groups.setdefault(h.host_key, []).append(h.name)
        for key, names in groups.items():
            kind = "thread" if self.blocks[names[0]].placement == "thread" else "process"
            self._launch(key, names, kind, [specs[n] for n in names])

    def _launch(self, key: str, names: list[str], kind: str, specs: list[WorkerBlock]) -> None:
        host = _HostHandle(key, names, kind)
        ours, theirs = multiprocessing.Pipe()
        host.conn = ours
        process_name = f"mq-{key.removeprefix('group:')}"
        prefix = self.manager.prefix
        if kind == "process":
            ctx = multiprocessing.get_context("spawn")
            host.process = ctx.Process(target=host_main, name=process_name, daemon=True,
                                       args=(self.domain, prefix, specs, theirs, process_name))
            host.process.start()
            theirs.close()
        else:
            serve = Host(self.domain, prefix, specs, theirs, process_name).serve
            host.thread = threading.Thread(target=serve, name=process_name, daemon=True)
            host.thread.start()
        with self._lock:
            self._hosts[key] = host

    def _supervise(self) -> None:
        try:
            while not self._all_exited.is_set():
                self._supervise_once()
        except BaseException as e:  # a supervisor that dies would leave wait() and stop() hanging
            _log.exception("the supervisor failed; aborting the graph")
            if self._fatal is None:
                self._fatal = BlockFailure("(runtime)", f"the supervisor failed: {e!r}", None,
                                           "stopped the graph")
            self._kill_all()
            self._all_ready.set()
            self._all_exited.set()

    def _supervise_once(self) -> None:
        with self._lock:
            hosts = [h for h in self._hosts.values() if not h.done]
        waitables = [w for h in hosts for w in h.waitables]
        ready = multiprocessing.connection.wait(waitables, timeout=0.1) if waitables else []
        for host in hosts:
            if host.conn in ready:
                self._receive(host)
            if host.process is not None and host.process.sentinel in ready:
                self._drain_messages(host)
                self._host_ended(host)
            elif host.kind == "thread" and host.exit_message and not host.done:
                host.thread.join()
                self._host_ended(host)
        self._escalate()
        if time.monotonic() >= self._next_drops_check:
            self._next_drops_check = time.monotonic() + 1.0
            with contextlib.suppress(Exception):  # best effort: the graph may be ending meanwhile
                self._publish_drops()
        with self._lock:
            if self._hosts and all(h.done for h in self._hosts.values()):
                self._all_exited.set()

    def _receive(self, host: _HostHandle) -> None:
        try:
            message = host.conn.recv()
        except (EOFError, OSError):
            host.conn.close()
            if host.kind == "thread":
                host.exit_message = True
            return
        kind = message[0]
        if kind == "ready":
            host.ready.add(message[1])
            if not self._not_ready():
                self._all_ready.set()
        elif kind == "failed":
            host.failures.append((message[1], message[2]))
            if len(host.names) > 1 and not host.done:
                self._group_block_failed(host, message[1])
        elif kind == "exit":
            host.exit_message = True

    def _drain_messages(self, host: _HostHandle) -> None:
        while host.conn is not None and not host.conn.closed and host.conn.poll(0):
            self._receive(host)

    def _not_ready(self) -> set[str]:
        with self._lock:
            ready = {n for h in self._hosts.values() for n in h.ready}
        return set(self.blocks) - ready

    def _group_block_failed(self, host: _HostHandle, block: str) -> None:
        """A block of a shared process failed while the others run on: act now, not
        when the process ends (it might not): restart the group, or stop the graph."""
        if self._restartable(host):
            host.process.kill()  # the group restarts when its sentinel fires
            return
        self._fail(host, "raised an exception", False)

    def _host_ended(self, host: _HostHandle) -> None:
        exitcode = 0
        with self._lock:  # _kill_all reads done and the pid under it
            host.done = True
            if host.process is not None:
                host.process.join(5.0)  # its sentinel fired: it is exiting, collect its status
                exitcode = host.process.exitcode
                host.process.close()  # its pipes and sentinel: no descriptor kept per run
        unfinished = host.process is not None and not host.exit_message  # died, or left early
        if not host.failures and not unfinished and exitcode == 0:
            return
        self._reclaim()
        self._mark_failed_rows(host)
        if host.handled:
            return  # a failure of this group was already acted on
        if self._stop_at is not None and not host.failures and exitcode is not None and exitcode < 0:
            return  # killed by our own escalation while stopping
        if host.failures:
            reason = "raised an exception"
        elif exitcode == 0:
            reason = "its process exited without finishing its blocks"
        else:
            reason = _exit_reason(exitcode)
        self._fail(host, reason, True)

    def _restartable(self, host: _HostHandle) -> bool:
        blocks = [self.blocks[n] for n in host.names]
        with self._lock:
            return (self._state == "running" and self._stop_at is None
                    and all(b.restart == "restart" for b in blocks)
                    and all(self._graph.block_rows[self._index(b.name), R.RESTARTS] < b.max_restarts
                            for b in blocks))

    def _mark_failed_rows(self, host: _HostHandle) -> None:
        """A dead worker could not write its rows: whatever it left running failed."""
        for name in host.names:
            row = self._graph.block_rows[self._index(name)]
            if row[R.STATE] in (R.CREATED, R.INITIALIZING, R.READY, R.RUNNING):
                row[R.STATE] = R.FAILED
                row[R.FAILURES] += 1

    def _fail(self, host: _HostHandle, reason: str, ended: bool) -> None:
        """Record a failure of ``host`` and restart it (if it ended) or stop the graph."""
        host.handled = True
        tb = "\n".join(tb for _, tb in host.failures) or None
        restartable = ended and self._restartable(host)
        failed = [b for b, _ in host.failures] or host.names
        failure = BlockFailure(", ".join(dict.fromkeys(failed)), reason, tb,
                               "restarted" if restartable else "stopped the graph")
        self.failures.append(failure)
        _log.error("%s", failure)
        self._status({"event": "failed", "blocks": host.names, "reason": reason, "action": failure.action,
                      "traceback": tb}, topic="errors")
        if restartable:
            self._restart(host)
            return
        if self._fatal is None:
            self._fatal = failure
            self._all_ready.set()  # a start() waiting for this host: stop waiting
        for name in failed:  # let everything downstream drain and end
            for port in self.blocks[name].outputs:
                self._queues[(name, port)].close()
        self._begin_stop()

    def _graph_command(self, message) -> None:
        """Commands to the whole graph on topic ``ctl``: stop (in order), pause, resume
        (or start) every block.  Answers like a block's: ``{"ok": ..., "error": ...}``."""
        command = message.data.get("cmd") if isinstance(message.data, dict) else None
        try:
            if command == "stop":
                self._begin_stop()
            elif command in ("pause", "resume", "start"):
                verb = "resume" if command == "start" else command
                for name in self.blocks:
                    if not self._hosts[self.blocks[name].host_key].done:
                        self._bus.publish(control_topic(name), {"cmd": verb})
            else:
                raise ValueError(f"unknown graph command {command!r}: stop, pause, resume, start")
            self._bus.reply(message, {"ok": True})
        except Exception as e:  # noqa: BLE001 - the requester gets the error text
            self._bus.reply(message, {"ok": False, "error": f"{type(e).__name__}: {e}"})

    def _publish_drops(self) -> None:
        """A status event when an edge has dropped frames since the last look."""
        if self._graph is None or self._state != "running":
            return
        for i, e in enumerate(self._graph.description["edges"]):
            drops = int(self._graph.edge_rows[i, R.EDGE_DROPS])
            if drops > self._drops_seen.get(i, 0):
                self._status({"event": "drops", "edge": f"{e['src']} -> {e['dst']}", "drops": drops,
                              "new": drops - self._drops_seen.get(i, 0)})
                self._drops_seen[i] = drops

    def _status(self, event: dict, topic: str = "status") -> None:
        """Publish a status event (topic "status"; failures go to "errors" as well)."""
        try:
            self._bus.publish("status", event, timeout=0)
            if topic != "status":
                self._bus.publish(topic, event, timeout=0)
        except Exception:  # noqa: BLE001 - events are best effort: a full bus must not stop supervision
            _log.warning("could not publish a status event %s", event.get("event"))

    def _restart(self, host: _HostHandle) -> None:
        specs = self._validate_and_pickle()
        for name in host.names:
            self._graph.block_rows[self._index(name), R.RESTARTS] += 1
            specs[name].start = "latest"
        self._launch(host.key, host.names, host.kind, [specs[n] for n in host.names])
        with self._lock:  # a stop() meanwhile did not know this host: tell it now
            self._hosts[host.key].send(("start",) if self._stop_at is None else ("stop",))
        self._status({"event": "restarted", "blocks": host.names})

    def _reclaim(self) -> None:
        """Release what dead workers held: their buffer references and queue readers."""
        try:
            self.manager.reap()
            for q in self._queues.values():
                q.reap_dead_readers()
            # and the queues only the dead worker had open: its blocks' command topics
            reap_dead_readers_everywhere(self.manager, skip={q.name for q in self._queues.values()})
        except Exception:  # noqa: BLE001 - teardown may have started; reclaim is best effort
            pass

    def _begin_stop(self, abort: bool = False) -> None:
        with self._lock:
            if self._state == "stopped":
                return
            if self._stop_at is None:
                self._stop_at = time.monotonic()
                self._state = "stopping"
                for host in self._hosts.values():
                    host.send(("stop",))
            if abort and self._abort_at is None:
                self._abort_at = time.monotonic()
                self._abort_all()
        if not self._hosts:
            self._all_exited.set()

    def _escalate(self) -> None:
        """Drain timeout passed: abort; abort grace passed: kill."""
        now = time.monotonic()
        if self._stop_at is not None and self._abort_at is None and now - self._stop_at > self.drain_timeout:
            self._abort_at = now
            self._abort_all()
        if self._abort_at is not None and now - self._abort_at > _ABORT_GRACE_S:
            for host in self._hosts.values():
                if host.done:
                    continue
                if host.process is not None and host.process.is_alive():
                    host.process.kill()
                elif host.thread is not None:
                    # a thread cannot be killed: give up on it (a daemon) so stop() returns
                    host.done = True
                    self.failures.append(BlockFailure(", ".join(host.names), "did not stop when aborted",
                                                      None, "left running in a daemon thread"))

    def _kill_all(self) -> None:
        """Abort, then SIGKILL, every worker still running.  Signals only: the supervisor
        alone waits for processes (two threads reaping one child race), so from another
        thread this waits for the supervisor to see them end."""
        self._abort_all()
        in_supervisor = threading.current_thread() is self._supervisor
        if not in_supervisor and self._all_exited.wait(_ABORT_GRACE_S):
            return
        with self._lock:  # the supervisor marks hosts done (and closes them) under it too
            pids = []
            for host in self._hosts.values():
                if host.process is not None and not host.done:
                    with contextlib.suppress(ValueError):  # closed meanwhile
                        pids.append(host.process.pid)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not in_supervisor:
            self._all_exited.wait(5.0)

    def _abort_all(self) -> None:
        for host in self._hosts.values():
            host.send(("abort",))
        for q in self._queues.values():
            q.close()  # wakes every push and pop

    def _teardown(self) -> None:
        with self._lock:
            if self._state == "stopped":
                return
            self._state = "stopped"
        self._all_exited.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        for host in self._hosts.values():
            if host.conn is not None:
                host.conn.close()
            if host.process is not None and not host.done:
                with contextlib.suppress(ValueError):
                    host.process.join(5.0)
                    host.process.close()
        if self.manager is not None:
            self._reclaim()
            self._last_queue_stats = self._queue_stats()
            for q in self._queues.values():
                q.release()
            if self._bus is not None:
                self._status({"event": "stopped", "failed": [f.block for f in self.failures]})
                self._bus.close()
            _log.info("graph stopped%s", f"; failures: {self.failures}" if self.failures else "")
            remove_domain_handlers(self.domain)
            self.blocks_in_use_at_end = sum(  # data blocks: bus messages others still read do not count
                p.blocks_used for p in self.manager.get_stats().pool_stats if not p.name.startswith("mq-"))
            if self._graph is not None:
                self.final_stats = graph_stats(self._graph, self._last_queue_stats)
                path = self._graph.path
                self._graph.close()
                self._graph = None
                from ..shm.segment import unlink_quietly
                unlink_quietly(path)  # the graph is over, even if a tap keeps the domain
            self.manager.shutdown()
        else:  # start() failed before the manager: its log handler goes all the same
            remove_domain_handlers(self.domain)

    def _raise_fatal(self) -> None:
        if self._fatal is not None:
            raise BlockError(str(self._fatal))

    def _index(self, name: str) -> int:
        return list(self.blocks).index(name)

    def _queue_stats(self) -> dict:
        return {q.name: q.stats() for q in self._queues.values()}

    def _parameter(self, command: dict):
        handle = self[command["block"]]
        if self._state != "running":
            if command["cmd"] == "set" and command.get("at_ns") is None:
                handle.block.set_parameter(command["name"], command["value"])
                return None
            if command["cmd"] == "get":
                return handle.block.get_parameter(command["name"])
            raise GraphError("a timed parameter change needs a running graph")
        if self._hosts[handle.host_key].done:
            raise BlockError(f"block {handle.name!r} has ended; its parameters cannot change any more")
        answer = self._bus.request(control_topic(handle.name), command, timeout=10.0).data
        if not answer.get("ok"):
            raise BlockError(f"block {handle.name!r}: {answer.get('error')}")
        return answer.get("value")


BUS_ROOM = 1024  # metadata slots added to a given ShmConfig for the message bus's pool


def _with_bus_room(pools: ShmConfig | None) -> ShmConfig | None:
    """The user's pools with room for the bus's own pool (commands, status events) on top."""
    if pools is None:
        return None  # the default config leaves plenty
    return dataclasses.replace(pools, max_buffers=pools.max_buffers + BUS_ROOM)


def check_seconds(name: str, seconds, *, none: bool = False) -> float | None:
    """A timeout: a number of seconds from 0 to MAX_SECONDS (or None if ``none``)."""
    value = check_number(name, seconds, minimum=0, none=none)
    if value is not None and value > MAX_SECONDS:
        raise ValueError(f"{name} must be at most {MAX_SECONDS} seconds, not {show(seconds)}")
    return value


def queue_name(block: str, port: str) -> str:
    return f"{block}-{port}"


def graph_stats(graph: R.GraphSegment, queue_stats: dict) -> GraphStats:
    """Stats from the graph segment's rows and the queues' reader records."""
    now = time.monotonic_ns()
    blocks = {}
    for i, b in enumerate(graph.description["blocks"]):
        row = graph.block_rows[i]
        ended = row[R.STATE] in (R.DONE, R.FAILED, R.STOPPED) and row[R.UPDATED_NS] > row[R.START_NS]
        end = row[R.UPDATED_NS] if ended else now  # a finished block's rate is over its run
        elapsed = max(1e-9, (end - row[R.START_NS]) / 1e9) if row[R.START_NS] else 0.0
        blocks[b["name"]] = BlockStats(
            b["name"], R.STATES[row[R.STATE]], int(row[R.PID]), int(row[R.ITEMS_IN]), int(row[R.ITEMS_OUT]),
            row[R.ITEMS_IN] / elapsed if elapsed else 0.0, row[R.ITEMS_OUT] / elapsed if elapsed else 0.0,
            int(row[R.WORK_CALLS]), row[R.WORK_NS] / 1e9, int(row[R.RESTARTS]), int(row[R.FAILURES]),
            {name: int(row[R.COUNTERS + k]) for k, name in enumerate(b.get("counters", ()))})
    edges = []
    for i, e in enumerate(graph.description["edges"]):
        qs = queue_stats.get(e["queue"])
        row = graph.edge_rows[i]
        reader = next((r for r in qs.readers if r.index == row[R.EDGE_READER]), None) if qs else None
        edges.append(EdgeStats(e["src"], e["dst"], e["policy"], e["capacity"], reader.lag if reader else 0,
                               int(row[R.EDGE_DROPS]), int(row[R.EDGE_POPPED])))
    return GraphStats(blocks, edges)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            return f"its process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"its process was killed by signal {-exitcode}"
    return f"its process exited with code {exitcode}"
