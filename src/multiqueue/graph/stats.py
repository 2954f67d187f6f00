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


def graph_stats(graph: R.GraphSegment, queue_stats: dict) -> GraphStats:
    """Stats from the graph segment's rows and the queues' reader records
    (``queue_stats``: {queue name: QueueStats}; without one an edge's lag reads 0)."""
    now = time.monotonic_ns()
    blocks = {b["name"]: block_stats(b, graph.block_rows[i], now)
              for i, b in enumerate(graph.description["blocks"])}
    edges = [edge_stats(e, graph.edge_rows[i], queue_stats.get(e["queue"]))
             for i, e in enumerate(graph.description["edges"])]
    return GraphStats(blocks, edges)


def block_stats(block: dict, row, now_ns: int) -> BlockStats:
    """One block's stats from its description and its row of the graph segment."""
    ended = row[R.STATE] in (R.DONE, R.FAILED, R.STOPPED) and row[R.UPDATED_NS] > row[R.START_NS]
    end = row[R.UPDATED_NS] if ended else now_ns  # a finished block's rate is over its run
    elapsed = max(1e-9, (end - row[R.START_NS]) / 1e9) if row[R.START_NS] else 0.0
    return BlockStats(
        block["name"], R.STATES[row[R.STATE]], int(row[R.PID]), int(row[R.ITEMS_IN]), int(row[R.ITEMS_OUT]),
        row[R.ITEMS_IN] / elapsed if elapsed else 0.0, row[R.ITEMS_OUT] / elapsed if elapsed else 0.0,
        int(row[R.WORK_CALLS]), row[R.WORK_NS] / 1e9, int(row[R.RESTARTS]), int(row[R.FAILURES]),
        {name: int(row[R.COUNTERS + k]) for k, name in enumerate(block.get("counters", ()))})


def edge_stats(edge: dict, row, queue_stats) -> EdgeStats:
    """One edge's stats from its description, its row and its queue's stats (or None)."""
    reader = next((r for r in queue_stats.readers if r.index == row[R.EDGE_READER]), None) \
        if queue_stats else None
    return EdgeStats(edge["src"], edge["dst"], edge["policy"], edge["capacity"], reader.lag if reader else 0,
                     int(row[R.EDGE_DROPS]), int(row[R.EDGE_POPPED]))
