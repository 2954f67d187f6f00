"""What a graph reports: per-block and per-edge stats, read from the graph segment."""

import time
from dataclasses import dataclass, field

from . import registry as R


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
    """One block's numbers.  ``state`` is its phase (created, initializing, ready,
    running, paused, restarting, done, failed, stopped); ``status`` says what it does
    right now: "running", "waiting for input 'in'", "waiting for pool 'frames'",
    "blocked by reader 1 (pid 42) of edge src.out -> sink.in", "paused", or its state."""

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
    status: str = ""
    rate_in_now: float = 0.0  # items per second over about the last second (0 once it ended)
    rate_out_now: float = 0.0


@dataclass
class EdgeStats:
    src: str
    dst: str
    policy: str
    capacity: int
    lag: int  # frames waiting for the consumer (fill = lag / capacity)
    drops: int  # frames sent on it its consumer lost (drop_oldest, or in its restarts and failures)
    popped: int  # frames its consumer received; once drained, sent = popped + drops exactly
    outside: bool = False  # a reader of another process (Consumer, tap, bridge), not a graph block's


@dataclass
class GraphStats:
    blocks: dict[str, BlockStats]
    edges: list[EdgeStats]

    def format(self) -> str:
        lines = [f"{'block':<16}{'state':<11}{'in':>10}{'out':>10}{'in/s':>10}{'out/s':>10}{'work s':>9}"
                 "  now"]
        for b in self.blocks.values():
            lines.append(f"{b.name:<16}{b.state:<11}{b.items_in:>10}{b.items_out:>10}{b.rate_in:>10.1f}"
                         f"{b.rate_out:>10.1f}{b.work_s:>9.2f}  {b.status}")
            if b.counters:
                lines.append(" " * 16 + "  ".join(f"{k}={v}" for k, v in b.counters.items()))
        width = max([32] + [len(e.src) + len(e.dst) + 6 for e in self.edges])  # an outside reader's is long
        lines.append(f"{'edge':<{width}}{'policy':<12}{'fill':>9}{'drops':>8}")
        for e in self.edges:
            fill = f"{e.lag}/{e.capacity}"
            lines.append(f"{e.src + ' -> ' + e.dst:<{width}}{e.policy:<12}{fill:>9}{e.drops:>8}")
        return "\n".join(lines)


def graph_stats(graph: R.GraphSegment, queue_stats: dict) -> GraphStats:
    """Stats from the graph segment's rows and the queues' reader records
    (``queue_stats``: {queue name: QueueStats}; without one an edge's lag reads 0)."""
    now = time.monotonic_ns()
    blocks = {}
    for i, b in enumerate(graph.description["blocks"]):
        row = graph.block_rows[i]
        blocks[b["name"]] = stats = block_stats(b, row, now)
        if stats.state == "running" and row[R.WAIT] == R.WAIT_READER:
            stats.status = blocked_status(graph.description, b, int(row[R.WAIT_ARG]), graph.edge_rows,
                                          queue_stats)
    edges = [edge_stats(e, graph.edge_rows[i], queue_stats.get(e["queue"]))
             for i, e in enumerate(graph.description["edges"])]
    return GraphStats(blocks, edges + outside_edges(graph, queue_stats))


def outside_edges(graph: R.GraphSegment, queue_stats: dict) -> list[EdgeStats]:
    """Every reader of the graph's ports that no block of it owns (a Consumer, a tap, a
    bridge in another process) as an edge of its own, to "its process name (pid N)"."""
    owned = {(e["queue"], int(graph.edge_rows[i][R.EDGE_READER]))
             for i, e in enumerate(graph.description["edges"])}
    workers = {int(row[R.PID]) for row in graph.block_rows}  # and a block's reader joining now
    edges = []
    for block in graph.description["blocks"]:
        for port, info in block["outputs"].items():
            stats = queue_stats.get(info["queue"])
            for r in stats.readers if stats else ():
                if (info["queue"], r.index) not in owned and r.pid not in workers:
                    reader = f"{r.name or 'a process'} (pid {r.pid}{'' if r.alive else ', dead'})"
                    edges.append(EdgeStats(f"{block['name']}.{port}", reader, r.policy, stats.capacity,
                                           r.lag, r.drops, r.popped, outside=True))
    return edges


def block_stats(block: dict, row, now_ns: int) -> BlockStats:
    """One block's stats from its description and its row of the graph segment."""
    ended = row[R.STATE] in (R.DONE, R.FAILED, R.STOPPED) and row[R.UPDATED_NS] > row[R.START_NS]
    end = row[R.UPDATED_NS] if ended else now_ns  # a finished block's rate is over its run
    elapsed = max(1e-9, (end - row[R.START_NS]) / 1e9) if row[R.START_NS] else 0.0
    state, status = block_status(block, row)
    rate_in_now, rate_out_now = recent_rates(row, now_ns)
    return BlockStats(
        block["name"], state, int(row[R.PID]), int(row[R.ITEMS_IN]), int(row[R.ITEMS_OUT]),
        row[R.ITEMS_IN] / elapsed if elapsed else 0.0, row[R.ITEMS_OUT] / elapsed if elapsed else 0.0,
        int(row[R.WORK_CALLS]), row[R.WORK_NS] / 1e9, int(row[R.RESTARTS]), int(row[R.FAILURES]),
        {name: int(row[R.COUNTERS + k]) for k, name in enumerate(block.get("counters", ()))},
        status, rate_in_now, rate_out_now)


def block_status(block: dict, row) -> tuple[str, str]:
    """(state, status) of a block from its row: a running block's wait word says what
    it waits for (a blocked one's reader is found by graph_stats, from the queues)."""
    code = int(row[R.STATE])
    state = R.STATES[code] if 0 <= code < len(R.STATES) else f"state {code}"
    if code != R.RUNNING:
        return state, state
    wait, arg = int(row[R.WAIT]), int(row[R.WAIT_ARG])
    if wait == R.WAIT_PAUSED:
        return "paused", "paused"
    if wait == R.WAIT_INPUT:
        return state, f"waiting for input {_port_name(block.get('inputs', {}), arg)}"
    if wait == R.WAIT_POOL:
        return state, f"waiting for pool {R.pool_name_of(row)!r} (every block of it is in use)"
    if wait == R.WAIT_READER:
        return state, f"blocked by a reader of output {_port_name(block.get('outputs', {}), arg)}"
    return state, state


def _port_name(ports: dict, index: int) -> str:
    names = list(ports)
    return repr(names[index]) if 0 <= index < len(names) else f"#{index}"


def blocked_status(description: dict, block: dict, output: int, edge_rows, queue_stats: dict) -> str:
    """"blocked by reader R (pid P) of edge A -> B": the slowest live blocking reader of
    the block's full output, named by the graph edge it serves (else by its queue)."""
    outputs = list(block.get("outputs", {}).items())
    if not 0 <= output < len(outputs):
        return "blocked by a reader of a full output"
    port, info = outputs[output]
    stats = queue_stats.get(info.get("queue"))
    readers = [r for r in stats.readers if r.policy == "block" and r.alive] if stats else []
    if not readers:
        return f"blocked by a reader of output {port!r}"
    slowest = max(readers, key=lambda r: r.lag)
    edge = next((e for i, e in enumerate(description["edges"])
                 if e["queue"] == info["queue"] and edge_rows[i][R.EDGE_READER] == slowest.index), None)
    if edge is not None:
        return f"blocked by reader {slowest.index} (pid {slowest.pid}) of edge {edge['src']} -> {edge['dst']}"
    who = f"{slowest.name!r}, " if slowest.name else ""  # a reader of another process (a Consumer, a tap)
    return f"blocked by outside reader {slowest.index} ({who}pid {slowest.pid}) of {block['name']}.{port}"


def recent_rates(row, now_ns: int) -> tuple[float, float]:
    """Items in and out per second over about the last second (from one to two seconds:
    since the newest window start at least a second old); 0 if the block ended or did
    not finish a work() call in the last second (so nothing came or went since)."""
    if row[R.STATE] != R.RUNNING or not row[R.WINDOW_NS] or now_ns - row[R.UPDATED_NS] >= 1_000_000_000:
        return 0.0, 0.0
    if now_ns - row[R.WINDOW_NS] >= 1_000_000_000:
        since, items_in, items_out = row[R.WINDOW_NS], row[R.WINDOW_IN], row[R.WINDOW_OUT]
    else:
        since, items_in, items_out = row[R.PREVIOUS_NS], row[R.PREVIOUS_IN], row[R.PREVIOUS_OUT]
    seconds = (now_ns - int(since)) / 1e9
    if seconds <= 0:
        return 0.0, 0.0
    # the words are read without a lock while the block may roll its window: never below 0
    return (max(0, int(row[R.ITEMS_IN] - items_in)) / seconds,
            max(0, int(row[R.ITEMS_OUT] - items_out)) / seconds)


def edge_stats(edge: dict, row, queue_stats) -> EdgeStats:
    """One edge's stats from its description, its row and its queue's stats (or None)."""
    reader = next((r for r in queue_stats.readers if r.index == row[R.EDGE_READER]), None) \
        if queue_stats else None
    return EdgeStats(edge["src"], edge["dst"], edge["policy"], edge["capacity"], reader.lag if reader else 0,
                     int(row[R.EDGE_DROPS]), int(row[R.EDGE_POPPED]))
