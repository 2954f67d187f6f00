"""The shared-memory side of a running graph: its domain, bus, graph segment and queues."""

import dataclasses
import logging

from ..control.bus import Bus
from ..control.log import domain_logger, remove_domain_handlers
from ..errors import SegmentError
from ..shm import ShmConfig, ShmManager
from ..shm.segment import unlink_quietly
from ..stream.queue import PortQueue, reap_dead_readers_everywhere
from . import registry as R
from .plan import output_capacity, queue_name
from .spec import GraphSpec
from .stats import GraphStats, graph_stats

BUS_ROOM = 1024  # metadata slots added to a given ShmConfig for the message bus's pool
_log = logging.getLogger("mq.runtime")


class GraphResources:
    """What the runtime's process holds for a running graph: the domain (its
    ShmManager), the message bus, the graph segment and every output's queue.

    ``open()`` makes them, ``release()`` lets them go and keeps the last stats."""

    def __init__(self, spec: GraphSpec):
        self.spec = spec
        self.manager: ShmManager | None = None
        self.bus: Bus | None = None
        self.graph: R.GraphSegment | None = None
        self.queues: dict[tuple[str, str], PortQueue] = {}
        self.final_stats: GraphStats | None = None  # the stats as they were at release()
        self.blocks_in_use_at_end: int | None = None  # pool blocks still held after release()
        self._drops_seen: dict[int, int] = {}

    def open(self, description: dict) -> None:
        """Create the domain, its bus, the graph segment (``description`` in it) and the queues."""
        domain = self.spec.domain
        domain_logger(domain, process_name="runtime")
        self.manager = ShmManager(domain, with_bus_room(self.spec.pools), name="runtime")
        self.bus = Bus(self.manager)
        # the graph segment first: it is what refuses a second graph in the domain
        self.graph = R.GraphSegment.create(self.manager.prefix, domain, description, self.manager.access)
        left = []
        for h in self.spec.blocks.values():
            for port in h.outputs:
                name = queue_name(h.name, port)
                if remove_left_queue(self.manager, name):
                    left.append(name)
                self.queues[(h.name, port)] = PortQueue(self.manager, name,
                                                        output_capacity(self.spec, h.name, port))
        if left:
            self._took_over(left)

    def _took_over(self, queues: list[str]) -> None:
        """An earlier graph of the domain ended while other processes kept the domain
        (observers, say): say so; its queues were made anew (remove_left_queue)."""
        holders = [f"{p['name']} (pid {p['pid']})" for p in self.manager.processes()
                   if p["alive"] and not p["self"]]
        _log.warning("took over domain %r from a graph that had ended (kept by %s): its queues %s "
                     "are new", self.spec.domain, ", ".join(holders) or "nobody alive", ", ".join(queues))
        self.status({"event": "took-over", "queues": queues, "holders": holders})

    def block_row(self, name: str):
        """The row of block ``name`` in the graph segment (its state and counters)."""
        return self.graph.block_rows[list(self.spec.blocks).index(name)]

    def queue_stats(self) -> dict:
        return {q.name: q.stats() for q in self.queues.values()}

    def close_outputs(self, names: list[str]) -> None:
        """Close the outputs of these blocks: what is downstream drains and ends."""
        for name in names:
            for port in self.spec.blocks[name].outputs:
                self.queues[(name, port)].close()

    def close_queues(self) -> None:
        """Close every queue: wakes every push and pop (an abort)."""
        for q in self.queues.values():
            q.close()

    def reclaim(self) -> None:
        """Release what dead workers held: their buffer references and queue readers."""
        try:
            self.manager.reap()
            for q in self.queues.values():
                q.reap_dead_readers()
            # and the queues only the dead worker had open: its blocks' command topics
            reap_dead_readers_everywhere(self.manager, skip={q.name for q in self.queues.values()})
        except Exception:  # noqa: BLE001 - teardown may have started; reclaim is best effort
            _log.debug("reclaim failed", exc_info=True)

    def status(self, event: dict, topic: str = "status") -> None:
        """Publish a status event (topic "status"; failures go to "errors" as well)."""
        try:
            self.bus.publish("status", event, timeout=0)
            if topic != "status":
                self.bus.publish(topic, event, timeout=0)
        except Exception:  # noqa: BLE001 - events are best effort: a full bus must not stop supervision
            _log.warning("could not publish a status event %s", event.get("event"))

    def publish_drops(self) -> None:
        """A status event when an edge has dropped frames since the last look."""
        if self.graph is None:
            return
        for i, e in enumerate(self.graph.description["edges"]):
            drops = int(self.graph.edge_rows[i, R.EDGE_DROPS])
            if drops > self._drops_seen.get(i, 0):
                self.status({"event": "drops", "edge": f"{e['src']} -> {e['dst']}", "drops": drops,
                             "new": drops - self._drops_seen.get(i, 0)})
                self._drops_seen[i] = drops

    def release(self, failures: list) -> None:
        """The graph is over (``failures``: its BlockFailures): reclaim, keep the last
        stats, release the queues, the bus and the graph segment, leave the domain."""
        if self.manager is None:  # open() failed before the manager: its log handler goes all the same
            remove_domain_handlers(self.spec.domain)
            return
        self.reclaim()
        last_queue_stats = self.queue_stats()
        for q in self.queues.values():
            q.release()
        if self.bus is not None:
            self.status({"event": "stopped", "failed": [f.block for f in failures]})
            self.bus.close()
        _log.info("graph stopped%s", f"; failures: {failures}" if failures else "")
        remove_domain_handlers(self.spec.domain)
        self.blocks_in_use_at_end = sum(  # data blocks: bus messages others still read do not count
            p.blocks_used for p in self.manager.get_stats().pool_stats if not p.name.startswith("mq-"))
        if self.graph is not None:
            self.final_stats = graph_stats(self.graph, last_queue_stats)
            path = self.graph.path
            self.graph.close()
            self.graph = None
            unlink_quietly(path)  # the graph is over, even if a tap keeps the domain
        self.manager.shutdown()


def remove_left_queue(manager: ShmManager, name: str) -> bool:
    """Remove queue ``name`` if an earlier graph of the domain left it (True if so).

    Only the runtime that holds the graph segment calls this, so the queue is no live
    graph's: it is closed (or open, if its runtime was killed), and a graph started on
    it would end at once, silently.  Its dead readers' items are released, it is closed
    (its live readers, viewers of the old run, end) and unlinked; they keep their
    mapping until they let go."""
    try:
        old = PortQueue(manager, name, create=False)
    except SegmentError:
        return False  # none; or unreadable, which creating it again reports
    try:
        old.close()  # also detaches the readers of dead processes, releasing their items
    finally:
        old.remove()
    return True


def with_bus_room(pools: ShmConfig | None) -> ShmConfig | None:
    """The user's pools with room for the bus's own pool (commands, status events) on top."""
    if pools is None:
        return None  # the default config leaves plenty
    return dataclasses.replace(pools, max_buffers=pools.max_buffers + BUS_ROOM)
