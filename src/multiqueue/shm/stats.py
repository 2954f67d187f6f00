"""A domain's statistics: summed from the process table and the pool records, and printed."""

import sys

from . import layout as L
from .config import PoolStats, ShmStats

_SUMMED = ("alloc_count", "dealloc_count", "failed_count", "latency_sum_ns")


def domain_stats(rows: list, pools: list[PoolStats]) -> ShmStats:
    """The domain's statistics from its counter rows (layout.Stats: the retired
    processes' sum and each registered process's) and its pools' statistics."""
    totals = {f: sum(getattr(r, f) for r in rows) for f in _SUMMED}
    hist = {}
    for bucket in range(L.SIZE_BUCKETS):
        n = sum(r.size_hist[bucket] for r in rows)
        if n:
            hist[1 << bucket] = n
    capacity = sum(p.block_count for p in pools)
    used = sum(p.blocks_used for p in pools)
    allocs = totals["alloc_count"]
    return ShmStats(
        total_pools=len(pools),
        total_capacity=capacity,
        total_allocated=used,
        total_free=capacity - used,
        capacity_bytes=sum(p.block_count * p.block_size for p in pools),
        allocated_bytes=sum(p.blocks_used * p.block_size for p in pools),
        allocation_count=allocs,
        deallocation_count=totals["dealloc_count"],
        failed_allocations=totals["failed_count"],
        size_histogram=hist,
        alloc_latency_mean_ns=totals["latency_sum_ns"] / allocs if allocs else 0.0,
        alloc_latency_max_ns=max(r.latency_max_ns for r in rows),
        processes=len(rows) - 1,
        pool_stats=pools,
    )


def print_domain_stats(domain: str, s: ShmStats, file=None) -> None:
    """A table of the pools, then the domain's counters."""
    out = file or sys.stdout
    print(f"domain {domain!r}: {s.processes} process(es), {s.total_pools} pool(s)", file=out)
    print(f"{'pool':<12}{'block':>10}{'blocks':>8}{'used':>8}{'free':>8}{'util':>8}{'high':>8}",
          file=out)
    for p in s.pool_stats:
        print(f"{p.name:<12}{size_text(p.block_size):>10}{p.block_count:>8}{p.blocks_used:>8}"
              f"{p.blocks_free:>8}{p.utilization:>8.1%}{p.high_water:>8}", file=out)
    print(f"allocated {s.total_allocated}/{s.total_capacity} blocks "
          f"({size_text(s.allocated_bytes)} of {size_text(s.capacity_bytes)}); "
          f"allocations {s.allocation_count}, deallocations {s.deallocation_count}, "
          f"failed {s.failed_allocations}; latency mean {s.alloc_latency_mean_ns:.0f} ns, "
          f"max {s.alloc_latency_max_ns} ns", file=out)


def size_text(n: int) -> str:
    """A byte count as "256 B", "4 KiB", "1.5 MiB" (the block sizes of a table)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)
