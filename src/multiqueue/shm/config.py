"""Pool and domain configuration, and the statistics dataclasses."""

import re
from dataclasses import dataclass, field

from .layout import MAX_CHUNKS, MAX_NAME
from .segment import DEFAULT_PREFIX, check_prefix, resolve_group

_POOL_NAME_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_NAME}}}$")


@dataclass(frozen=True)
class PoolConfig:
    """A pool of ``block_count`` blocks of ``block_size`` bytes.

    An ``expandable`` pool that runs out grows by ``block_count`` blocks at a time (a
    new segment each time) up to ``max_blocks`` in all.  Names starting with ``mq-``
    are the library's own pools (the message bus's): ``allocate()`` by size never picks
    them.
    """

    name: str
    block_size: int
    block_count: int
    expandable: bool = False
    max_blocks: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _POOL_NAME_RE.fullmatch(self.name):
            raise ValueError(
                f"invalid pool name {self.name!r}: 1-{MAX_NAME} letters, digits, '_' or '-'"
            )
        for what in ("block_size", "block_count"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"pool {self.name!r}: {what} must be a positive int, not {value!r}")
        if self.block_size > 2**40:
            raise ValueError(f"pool {self.name!r}: block_size {self.block_size} is too large")
        if self.max_blocks is not None:
            if (isinstance(self.max_blocks, bool) or not isinstance(self.max_blocks, int)
                    or self.max_blocks < self.block_count):
                raise ValueError(
                    f"pool {self.name!r}: max_blocks {self.max_blocks!r} must be an int "
                    f">= block_count {self.block_count}"
                )
            if self.max_blocks > self.block_count * MAX_CHUNKS:
                raise ValueError(
                    f"pool {self.name!r}: max_blocks {self.max_blocks} needs more than "
                    f"{MAX_CHUNKS} expansions of {self.block_count} blocks; raise block_count"
                )

    @property
    def block_limit(self) -> int:
        """The most blocks this pool can ever have."""
        if not self.expandable:
            return self.block_count
        return self.max_blocks if self.max_blocks is not None else self.block_count * 4


@dataclass
class ShmConfig:
    """A domain's configuration: segment name prefix, pools and table sizes.

    ``max_buffers`` bounds the blocks of all pools together (each block has one
    metadata slot); ``max_processes`` bounds the processes attached at once.
    Segments are owner-only (mode 0600); ``group`` (a group name or id) shares the
    domain with that group's members instead (mode 0660, every segment of the domain).
    """

    name_prefix: str = DEFAULT_PREFIX
    pools: list[PoolConfig] = field(default_factory=list)
    max_processes: int = 64
    max_buffers: int = 16384
    max_pools: int = 32
    group: str | int | None = None

    def __post_init__(self):
        check_prefix(self.name_prefix)
        self.gid = None if self.group is None else resolve_group(self.group)
        if not isinstance(self.pools, (list, tuple)) or not all(isinstance(p, PoolConfig)
                                                                 for p in self.pools):
            raise TypeError(f"pools must be a list of PoolConfig, not {self.pools!r:.80}")
        for what in ("max_processes", "max_buffers", "max_pools"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{what} must be an int, not {type(value).__name__}")
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError(f"pool names must be unique, got {names}")
        if not 1 <= self.max_processes <= 4096:
            raise ValueError(f"max_processes must be 1..4096, not {self.max_processes}")
        if not 1 <= self.max_pools <= 1024:
            raise ValueError(f"max_pools must be 1..1024, not {self.max_pools}")
        if len(self.pools) > self.max_pools:
            raise ValueError(f"{len(self.pools)} pools exceed max_pools {self.max_pools}")
        needed = sum(p.block_limit for p in self.pools)
        if not 1 <= self.max_buffers < 2**31 or needed > self.max_buffers:
            raise ValueError(
                f"max_buffers {self.max_buffers} must cover every block the pools can have "
                f"({needed}); raise max_buffers"
            )

    @classmethod
    def default_config(cls) -> "ShmConfig":
        """small 4 KiB x 1024, medium 64 KiB x 512, large 1 MiB x 128 (the seed's pools)."""
        return cls(
            pools=[
                PoolConfig("small", 4096, 1024),
                PoolConfig("medium", 65536, 512),
                PoolConfig("large", 1 << 20, 128),
            ]
        )


@dataclass
class PoolStats:
    name: str
    pool_id: int
    block_size: int
    block_count: int
    blocks_used: int
    blocks_free: int
    utilization: float
    high_water: int
    expandable: bool
    max_blocks: int


@dataclass
class ShmStats:
    """Domain-wide statistics: every process's allocations, living or gone."""

    total_pools: int
    total_capacity: int  # blocks in all pools
    total_allocated: int  # blocks in use now
    total_free: int
    capacity_bytes: int
    allocated_bytes: int  # block bytes in use (block size x blocks used)
    allocation_count: int
    deallocation_count: int
    failed_allocations: int
    size_histogram: dict[int, int]  # upper bound (bytes, exclusive) -> allocations
    alloc_latency_mean_ns: float
    alloc_latency_max_ns: int
    processes: int  # registered processes now
    pool_stats: list[PoolStats]

    @property
    def utilization(self) -> float:
        return self.total_allocated / self.total_capacity if self.total_capacity else 0.0


@dataclass
class ReapReport:
    """What one reap() found and released."""

    processes: list[tuple[int, str]]  # (pid, name) of each dead process reaped
    references_released: int
    blocks_freed: int
