"""Attach to a running graph from any process: list it, read its stats, tap ports.

``multiqueue.attach(domain)`` gives an ``AttachedGraph``; a tap is an extra reader of
a port's queue, ``drop_oldest`` by default, so a viewer never slows the graph down.
An attached process keeps the domain until it closes: a viewer that outlives the graph
closes once ``ended`` turns true (the dashboard, ``mq top`` and ``mq tap`` do), and
``attach(domain, timeout=None)`` waits for the next run.
See docs/graphs.md, "Attaching from another process".
"""

import time

from ..checks import check_timeout
from ..errors import GraphError, MultiQueueError, QueueClosedError
from ..shm import ShmManager
from ..shm.interrupts import deferred_interrupts
from ..shm.segment import DEFAULT_PREFIX, check_domain
from ..stream.queue import PortQueue
from . import registry as R
from .block import Frame
from .stats import GraphStats, graph_stats

WAIT_POLL_S = 0.1  # how often attach(timeout=...) looks for a graph (no event announces one)
QUEUES_WAIT_S = 10.0  # the longest attach waits for a starting graph's queues


class Tap:
    """Frames of one output port as they come (an iterator; see :meth:`read`).

    A frame yielded by the iterator stays valid until the next one is requested;
    ``frame.array.copy()`` keeps it longer.
    """

    def __init__(self, port: str, queue: PortQueue, policy: str, start: str):
        self.port = port
        self._queue = queue
        # the runtime alone decides that a graph queue has ended (it may restart a
        # producer): a viewer must not mark the queue abandoned for everyone
        self._reader = queue.reader(policy, start, watch_producer=False)
        self._current = None

    def read(self, timeout: float | None = None) -> Frame | None:
        """The next frame (its buffer is yours: release it, or use ``with``), or None
        if ``timeout`` passed.  Raises QueueClosedError when the graph stopped."""
        try:
            buffer = self._reader.pop(timeout)
        except TimeoutError:
            return None
        array = buffer.numpy()
        array.setflags(False)  # write=False: other readers see the same memory
        return Frame(buffer, array, True)

    def __iter__(self):
        try:
            while True:
                self._release_current()
                try:
                    self._current = self.read()
                except QueueClosedError:
                    return
                yield self._current
        finally:
            self._release_current()

    @property
    def drops(self) -> int:
        """Frames this tap lost because it read too slowly (drop_oldest)."""
        return self._reader.drops

    def close(self) -> None:
        self._release_current()
        self._reader.detach()

    def _release_current(self) -> None:
        frame = self._current
        if frame is not None and frame.ended is None and not frame.buffer.released:
            frame.release("released when the tap moved on to the next frame")
        self._current = None

    def __enter__(self) -> "Tap":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AttachedGraph:
    """A running graph seen from another process (see :func:`attach`)."""

    def __init__(self, domain: str, name: str = "attach"):
        if not isinstance(name, str):
            raise TypeError(f"name must be a str (this process's name in the domain), not "
                            f"{type(name).__name__}")
        self.domain = domain
        self.manager = ShmManager(domain, create=False, name=name)
        self._queues: dict[str, PortQueue] = {}
        self._taps: list[Tap] = []
        self._graph: R.GraphSegment | None = None
        try:
            self._graph = R.GraphSegment.open(self.manager.prefix, domain)
            self._open_queues()
        except BaseException:
            self.close()
            raise

    def _open_queues(self) -> None:
        """Open every output's queue.  The runtime makes them just after the graph
        segment: a graph caught starting has them within moments (one that ended
        meanwhile may never have them: its ports are then missing, and it has ended)."""
        names = [info["queue"] for b in self.description["blocks"] for info in b["outputs"].values()]
        deadline = time.monotonic() + QUEUES_WAIT_S
        for name in names:
            while True:
                try:
                    self._queue(name)
                    break
                except MultiQueueError:
                    if self._graph.ended or time.monotonic() > deadline:
                        break
                    time.sleep(WAIT_POLL_S / 10)

    @property
    def description(self) -> dict:
        return self._graph.description

    @property
    def blocks(self) -> list[str]:
        return [b["name"] for b in self.description["blocks"]]

    @property
    def ports(self) -> list[str]:
        """Every output port, as "block.port" (what subscribe() takes)."""
        return [f"{b['name']}.{p}" for b in self.description["blocks"] for p in b["outputs"]]

    @property
    def ended(self) -> bool:
        """Is the graph over (its runtime released it or died; a new run of the domain is
        another graph), or this closed?  Time to close: the domain is the next run's."""
        return self._graph is None or self._graph.ended

    def stats(self) -> GraphStats:
        if self._graph is None:
            raise GraphError(f"this AttachedGraph of domain {self.domain!r} is closed")
        for b in self.description["blocks"]:
            for info in b["outputs"].values():
                try:
                    self._queue(info["queue"])
                except MultiQueueError:
                    pass  # not made yet (the graph is starting) or gone: its edges show no fill
        return graph_stats(self._graph, {name: q.stats() for name, q in self._queues.items()})

    def subscribe(self, port: str, *, policy: str = "drop_oldest", start: str = "latest") -> Tap:
        """A tap on an output port ("block.port")."""
        if not isinstance(port, str):
            raise TypeError(f"port must be a str such as 'block.out', not {type(port).__name__}")
        block, _, name = port.partition(".")
        for b in self.description["blocks"]:
            if b["name"] == block and name in b["outputs"]:
                tap = Tap(port, self._queue(b["outputs"][name]["queue"]), policy, start)
                self._taps.append(tap)
                return tap
        raise GraphError(f"graph {self.domain!r} has no output port {port!r}; it has {self.ports}")

    def close(self) -> None:
        with deferred_interrupts():  # a Ctrl-C half-way would leave the domain for nobody
            self._close()

    def _close(self) -> None:
        for tap in self._taps:
            tap.close()
        self._taps.clear()
        for q in self._queues.values():
            q.release()
        self._queues.clear()
        if self._graph is not None:
            self._graph.close()
            self._graph = None
        self.manager.shutdown()

    def _queue(self, name: str) -> PortQueue:
        if name not in self._queues:
            self._queues[name] = PortQueue(self.manager, name, create=False)
        return self._queues[name]

    def __enter__(self) -> "AttachedGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<AttachedGraph {self.domain!r} blocks={self.blocks}>"




def attach(domain: str, *, name: str = "attach", timeout: float | None = 0) -> AttachedGraph:
    """Attach to the graph running in ``domain``; ``name``: this process's name in the
    domain (a str).  ``timeout``: seconds to wait for a graph to run (None: no limit;
    0, the default: none runs now is a SegmentError); TimeoutError when none came.
    ValueError for a bad domain name."""
    check_domain(domain)
    if timeout != 0 and not wait_for_graph(domain, timeout):
        raise TimeoutError(f"no graph ran in domain {domain!r} within {timeout} s")
    return AttachedGraph(domain, name)


def graph_running(domain: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """Does a live runtime run a graph in ``domain`` now?  (Cheap: one segment opened.)"""
    return R.graph_owner(prefix, domain) is not None


def wait_for_graph(domain: str, timeout: float | None = None, prefix: str = DEFAULT_PREFIX) -> bool:
    """Wait until a graph runs in ``domain`` (True) or ``timeout`` seconds pass (False;
    None: no limit).  Holds nothing meanwhile: the domain need not exist yet."""
    deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
    while not graph_running(domain, prefix):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        time.sleep(WAIT_POLL_S if left is None else min(WAIT_POLL_S, left))
    return True
