"""`mq top`'s sampler: snapshots of a domain, with rates and CPU as differences between
two of them (CPU and memory of each process from /proc)."""

import os
import time
from dataclasses import dataclass

from ..shm import ShmManager
from .inspect import GraphWatcher, QueueWatcher

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class ProcTimes:
    cpu_ticks: int  # user + system time, in clock ticks
    start_ticks: int  # start time after boot, in clock ticks (tells a reused pid apart)
    rss_pages: int


def proc_times(pid: int) -> ProcTimes | None:
    """CPU time, start time and resident size of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()  # the command name in () may hold spaces
    return ProcTimes(int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[21]))


def uptime() -> float:
    """Seconds since boot."""
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class TopSampler:
    """Snapshots of a domain (as data, for a table or JSON); each one's rates and CPU
    percentages are over the time since the one before (the first's: over the last
    second, and CPU since start); blocks have their averages since start beside."""

    def __init__(self, manager: ShmManager):
        self.manager = manager
        self.queues, self.graph = QueueWatcher(manager), GraphWatcher(manager.prefix, manager.domain)
        self.taken_at: float | None = None  # time.monotonic() of the previous sample
        self.items: dict[tuple[str, int], tuple[int, int]] = {}  # (block, pid) -> items in, out
        self.cpu: dict[int, ProcTimes] = {}  # pid -> its times at the previous sample
        self.pushed: dict[str, int] = {}  # queue -> items pushed at the previous sample

    def sample(self) -> dict:
        now = time.monotonic()
        dt = now - self.taken_at if self.taken_at is not None else 0.0
        queue_stats = self.queues.stats()
        graph = self.graph.stats(queue_stats)
        sample = {"domain": self.manager.domain, "time": time.time(),
                  "graph": None if graph is None else graph["state"],
                  "blocks": self._blocks(graph, dt), "edges": _edges(graph), "processes": self._processes(dt),
                  "pools": self._pools(), "queues": self._queues(queue_stats, dt)}
        self.taken_at = now
        return sample

    def _blocks(self, graph: dict | None, dt: float) -> list[dict]:
        items, rows = {}, []
        for b in graph["blocks"].values() if graph is not None else ():
            key = (b["name"], b["pid"])
            items[key] = (b["items_in"], b["items_out"])
            rate_in, rate_out = b["rate_in_now"], b["rate_out_now"]  # the last second, the first time
            if key in self.items and dt > 0:
                before = self.items[key]
                rate_in = max(0, b["items_in"] - before[0]) / dt
                rate_out = max(0, b["items_out"] - before[1]) / dt
            rows.append({"name": b["name"], "state": b["state"], "status": b["status"], "pid": b["pid"],
                         "items_in": b["items_in"], "items_out": b["items_out"], "rate_in": rate_in,
                         "rate_out": rate_out, "avg_rate_in": b["rate_in"], "avg_rate_out": b["rate_out"],
                         "restarts": b["restarts"]})
        self.items = items
        return rows

    def _processes(self, dt: float) -> list[dict]:
        cpu, rows, up = {}, [], uptime()
        for p in self.manager.processes():
            if p["self"]:
                continue
            times = proc_times(p["pid"]) if p["alive"] else None
            percent = rss = None
            if times is not None:
                cpu[p["pid"]] = times
                rss = times.rss_pages * PAGE_SIZE
                percent = _cpu_percent(times, self.cpu.get(p["pid"]), dt, up)
            rows.append({"pid": p["pid"], "name": p["name"], "alive": p["alive"], "cpu_percent": percent,
                         "rss_bytes": rss})
        self.cpu = cpu
        return rows

    def _pools(self) -> list[dict]:
        return [{"name": s.name, "used": s.blocks_used, "blocks": s.block_count, "utilization": s.utilization,
                 "high_water": s.high_water} for s in self.manager.get_stats().pool_stats]

    def _queues(self, queue_stats: dict, dt: float) -> list[dict]:
        pushed, rows = {}, []
        for name, q in queue_stats.items():
            pushed[name] = q.pushed
            before = self.pushed.get(name)
            rate = max(0, q.pushed - before) / dt if before is not None and dt > 0 else None
            rows.append({"name": name, "capacity": q.capacity, "pushed": q.pushed, "rate": rate,
                         "state": q.closed, "readers": len(q.readers),
                         "max_lag": max((r.lag for r in q.readers), default=0),
                         "drops": sum(r.drops for r in q.readers)})
        self.pushed = pushed
        return rows

    def close(self) -> None:
        self.queues.close()
        self.graph.close()

    def __enter__(self) -> "TopSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _edges(graph: dict | None) -> list[dict]:
    if graph is None:
        return []
    return [{**e, "fill": e["lag"] / e["capacity"] if e["capacity"] else 0.0} for e in graph["edges"]]


def _cpu_percent(now: ProcTimes, before: ProcTimes | None, dt: float, up: float) -> float:
    """Over the time since ``before`` if it is of the same process, else its average since it started."""
    if before is not None and before.start_ticks == now.start_ticks and dt > 0:
        return 100.0 * (now.cpu_ticks - before.cpu_ticks) / CLOCK_TICKS / dt
    lived = up - now.start_ticks / CLOCK_TICKS
    return 100.0 * now.cpu_ticks / CLOCK_TICKS / lived if lived > 0 else 0.0
