"""Preflight: will a domain's configuration fit this machine's limits?

Checked before a domain is created (``/dev/shm`` space, ``vm.max_map_count``,
RLIMIT_NOFILE), so a configuration that cannot work fails at once, with what to
change, as ResourceLimitError.  See docs/shm.md, "Resource limits".
"""

import errno
import os
import resource
from dataclasses import dataclass, field

from ..errors import ResourceLimitError
from . import layout as L
from .config import PoolConfig, ShmConfig
from .segment import SHM_DIR, count_maps, max_map_count, open_fds

POOL_HEADER = L.PAGE  # a pool segment's payload starts on its second page
MAP_HEADROOM = 256  # maps the interpreter, numpy and queues need besides the pools
FDS_PER_SEGMENT = 2  # ours plus the duplicate Python's mmap keeps


@dataclass
class Preflight:
    """What was found: ``errors`` stop a domain from being created, ``warnings`` do not."""

    needed_bytes: int  # control segment + every pool's first segment
    free_bytes: int  # available in /dev/shm
    errors: list[tuple[int, str]] = field(default_factory=list)  # (errno, message)
    warnings: list[str] = field(default_factory=list)

    def raise_errors(self) -> None:
        if self.errors:
            code = self.errors[0][0]
            raise ResourceLimitError(code, "; and ".join(message for _, message in self.errors))


def pool_bytes(pool: PoolConfig, blocks: int) -> int:
    """Bytes of one pool segment of ``blocks`` blocks."""
    return POOL_HEADER + blocks * L.align(pool.block_size, L.CACHE_LINE)


def pool_segments(pool: PoolConfig) -> int:
    """How many segments a pool may ever have (its first plus every growth)."""
    return -(-pool.block_limit // pool.block_count)


def preflight(config: ShmConfig, domain: str, shm_dir: str = SHM_DIR) -> Preflight:
    lay = L.control_layout(config.max_processes, config.max_pools, config.max_buffers)
    needed = L.align(lay["total"], L.PAGE) + sum(pool_bytes(p, p.block_count) for p in config.pools)
    fs = os.statvfs(shm_dir)
    free, size = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    report = Preflight(needed, free)
    if needed > free:
        parts = ", ".join(f"{p.name} {human_bytes(pool_bytes(p, p.block_count))}" for p in config.pools)
        report.errors.append((errno.ENOSPC, (
            f"domain {domain!r} needs {human_bytes(needed)} in {shm_dir} "
            f"(control {human_bytes(lay['total'])}{', pools ' + parts if parts else ''}) "
            f"but only {human_bytes(free)} of {human_bytes(size)} is free; "
            f"free space there (`df -h {shm_dir}`; `mq ls` and `mq clean` find stale domains), configure "
            f"smaller pools, or enlarge it (`mount -o remount,size=8G {shm_dir}`; Docker: --shm-size)")))
    spare = free - needed
    for p in config.pools:
        growth = pool_bytes(p, p.block_limit) - pool_bytes(p, p.block_count)
        if p.expandable and growth > spare:
            report.warnings.append(
                f"pool {p.name!r} may grow to {p.block_limit} blocks ({human_bytes(growth)} more) but "
                f"{shm_dir} would have {human_bytes(max(spare, 0))} left: growth stops early (allocations "
                "then wait for free blocks and time out with PoolExhaustedError saying why)")
    _check_maps_and_fds(config, domain, report)
    return report


def _check_maps_and_fds(config: ShmConfig, domain: str, report: Preflight) -> None:
    segments = 1 + sum(pool_segments(p) for p in config.pools)
    maps, limit = count_maps(), max_map_count()
    if maps + segments + MAP_HEADROOM > limit:
        report.errors.append((errno.ENOMEM, (
            f"domain {domain!r} may map {segments} segments but this process already has {maps} memory "
            f"maps of vm.max_map_count={limit}; raise the limit (sysctl -w vm.max_map_count={2 * limit}) "
            "or use fewer pools with more blocks each")))
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed_fds, in_use = segments * FDS_PER_SEGMENT, open_fds()
    if soft != resource.RLIM_INFINITY and in_use + needed_fds > soft:
        report.errors.append((errno.EMFILE, (
            f"domain {domain!r} may need {needed_fds} file descriptors ({segments} segments) but this "
            f"process has {in_use} open of its limit {soft}; raise it (`ulimit -n {max(4 * soft, 4096)}`, "
            "resource.setrlimit) or use fewer pools with more blocks each")))


def human_bytes(n: float) -> str:
    """``n`` bytes as B / KiB / MiB / GiB for a message (one decimal above bytes)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached: GiB takes any size
