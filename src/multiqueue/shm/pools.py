"""A domain's pools: their records read (PoolTable), created, grown, and their segments."""

import ctypes
import secrets
from bisect import bisect_left

from ..errors import DomainFullError, PoolNotFoundError, SegmentError
from . import layout as L
from .config import PoolConfig, PoolStats
from .segment import Access, create_segment, segment_path, unlink_quietly

POOL_DATA_OFFSET = L.PAGE  # payload of a pool segment starts on the second page
LIBRARY_POOL_PREFIX = b"mq-"  # the library's own pools (the message bus): by name only


class PoolTable:
    """This process's reading of a domain's pool records (rows of layout.Pool).

    A record is never reused for another pool (a removed one stays retired), so a pool
    id names one pool for the domain's life.  ``refresh()`` rebuilds the allocation
    order after pools were added, grown or removed.
    """

    def __init__(self, records, domain: str):
        self.records = records
        self.domain = domain
        self.block_sizes: list[int] = []  # of the pools allocate() picks by size, ascending
        self.orders: list[tuple[int, ...]] = []  # orders[i]: pool ids to try for block_sizes[i]
        self.active_ids: set[int] = set()  # every active pool, the library's own included

    def refresh(self) -> None:
        """Rebuild the size order: allocate() by size never picks the library's own pools
        ("mq-..."); allocate_from_pool() reaches them by name."""
        records = self.records
        by_size = sorted((p for p in self.active() if not records[p].name.startswith(LIBRARY_POOL_PREFIX)),
                         key=lambda p: (records[p].block_size, p))
        self.block_sizes = [records[p].block_size for p in by_size]
        self.orders = [tuple(by_size[i:]) for i in range(len(by_size))]
        self.active_ids = set(self.active())

    def active(self) -> list[int]:
        return [i for i, p in enumerate(self.records) if p.state == L.POOL_ACTIVE]

    def names(self) -> list[str]:
        return [self.records[p].name.decode() for p in self.active()]

    def find(self, name: str) -> int | None:
        """The id of the active pool named ``name``, or None."""
        for pool_id in self.active():
            if self.records[pool_id].name.decode() == name:
                return pool_id
        return None

    def name(self, pool_id: int) -> str:
        return self.records[pool_id].name.decode()

    def block_size(self, pool_id: int) -> int:
        return self.records[pool_id].block_size

    def live_tokens(self) -> set[tuple[int, int]]:
        """(pool id, token) of every active pool: the segments that may stay mapped."""
        return {(p, self.records[p].token) for p in self.active()}

    def stats(self, pool_id: int) -> PoolStats:
        rec = self.records[pool_id]
        used = min(rec.used, rec.block_count)
        return PoolStats(
            name=rec.name.decode(), pool_id=pool_id, block_size=rec.block_size,
            block_count=rec.block_count, blocks_used=used, blocks_free=rec.block_count - used,
            utilization=used / rec.block_count if rec.block_count else 0.0,
            high_water=rec.high_water, expandable=bool(rec.expandable),
            max_blocks=rec.max_blocks,
        )

    def configs(self) -> list[PoolConfig]:
        """Each active pool's configuration, as a PoolConfig."""
        out = []
        for pool_id in self.active():
            rec = self.records[pool_id]
            out.append(PoolConfig(rec.name.decode(), rec.block_size, rec.initial_count, bool(rec.expandable),
                                  rec.max_blocks if rec.expandable else None))
        return out

    def candidates(self, size: int, only_pool: int | None) -> tuple[int, ...]:
        """The pools an allocation of ``size`` bytes tries, in order."""
        if only_pool is not None:
            if only_pool not in self.active_ids:
                raise PoolNotFoundError(f"pool {only_pool} was removed from domain {self.domain!r}")
            return (only_pool,)
        i = bisect_left(self.block_sizes, size)
        if i < len(self.block_sizes):
            return self.orders[i]
        largest = self.block_sizes[-1] if self.block_sizes else 0
        raise ValueError(
            f"size {size} is larger than every pool's block (largest {largest} bytes) "
            f"in domain {self.domain!r}; add a pool with add_pool(PoolConfig(...))"
        )


def pool_segment_path(prefix: str, domain: str, rec, chunk: int) -> str:
    """The file of one chunk of a pool; the record's random token tells apart the
    segments of two pools that had the same name."""
    return segment_path(prefix, domain, f"pool.{rec.name.decode()}.{chunk}.{rec.token:016x}")


def create_pool(mm, ctx, prefix: str, domain: str, config: PoolConfig, access: Access,
                created: list[str]) -> int:
    """Add a pool to a domain's control segment ``mm`` and make its first chunk (the
    caller holds the domain lock, or is creating the domain); returns its id.

    ``ctx`` (a _native.Context on ``mm``) links the blocks into the free list.  The
    paths of the segments made are appended to ``created``; on failure they are removed.
    """
    made: list[str] = []
    try:
        pool_id = _new_pool_record(mm, domain, config)
        _add_chunk(mm, ctx, prefix, domain, pool_id, config.block_count, made, access)
    except BaseException:
        for path in made:
            unlink_quietly(path)
        raise
    finally:
        created.extend(made)
    rec = _pool_record(mm, pool_id)
    rec.state = L.POOL_ACTIVE
    L.Control.from_buffer(mm).pools_epoch += 1
    del rec
    return pool_id


def grow_pool(mm, ctx, prefix: str, domain: str, pool_id: int, access: Access) -> bool:
    """Add a chunk of blocks to an expandable pool (caller holds the domain lock).

    Returns True if the pool has free blocks afterwards (it grew, or another process
    freed or grew meanwhile), False if it is at its limit.
    """
    rec = _pool_record(mm, pool_id)
    if rec.head & 0xFFFFFFFF:
        return True
    room = min(rec.initial_count, rec.max_blocks - rec.block_count)
    if room <= 0 or rec.n_chunks >= L.MAX_CHUNKS or rec.state != L.POOL_ACTIVE:
        return False
    created: list[str] = []
    try:
        _add_chunk(mm, ctx, prefix, domain, pool_id, room, created, access)
    except BaseException:
        for path in created:
            unlink_quietly(path)
        raise
    L.Control.from_buffer(mm).pools_epoch += 1
    return True


def _new_pool_record(mm, domain: str, config: PoolConfig) -> int:
    """Fill a free pool record and reserve its metadata slots; returns its id."""
    c = L.Control.from_buffer(mm)
    pools = (L.Pool * c.max_pools).from_buffer(mm, c.pools_offset)
    free_ids = [i for i, p in enumerate(pools) if p.state == L.POOL_FREE]
    if not free_ids:
        raise DomainFullError(f"domain {domain!r} already has max_pools={c.max_pools} pools")
    pool_id = free_ids[0]
    rec = pools[pool_id]
    ctypes.memset(ctypes.addressof(rec), 0, ctypes.sizeof(L.Pool))
    rec.name = config.name.encode()
    rec.block_size = config.block_size
    rec.stride = L.align(config.block_size, L.CACHE_LINE)
    rec.initial_count = config.block_count
    rec.max_blocks = config.block_limit
    rec.expandable = int(config.expandable)
    rec.token = secrets.randbits(64)
    # Reserve metadata slots for every block the pool may ever have, so growth never
    # competes with pools added later.
    first = c.slots_used
    if first + config.block_limit > c.max_buffers:
        raise DomainFullError(
            f"domain {domain!r} has room for {c.max_buffers - first} more blocks "
            f"(max_buffers={c.max_buffers}) but pool {config.name!r} may hold "
            f"{config.block_limit}; create the domain with a larger ShmConfig.max_buffers"
        )
    rec.chunks[0].first_slot = first
    c.slots_used = first + config.block_limit  # reserved slots stay at generation 0: invalid ids
    del c, pools, rec
    return pool_id


def _add_chunk(mm, ctx, prefix, domain, pool_id: int, count: int, created: list[str], access: Access) -> None:
    """Create one segment of `count` blocks for a pool and link them into its free list."""
    c = L.Control.from_buffer(mm)
    rec = _pool_record(mm, pool_id)
    first = rec.chunks[0].first_slot + rec.block_count  # inside the pool's reserved range
    chunk = rec.n_chunks
    path = pool_segment_path(prefix, domain, rec, chunk)
    size = POOL_DATA_OFFSET + count * rec.stride
    seg = create_segment(path, size, L.MAGIC_POOL, L.KIND_POOL, POOL_DATA_OFFSET, access=access)
    if seg is None:
        raise SegmentError(17, f"segment {path} already exists; remove the stale domain first")
    created.append(path)
    seg.close()
    entries = (L.Entry * c.max_buffers).from_buffer(mm, c.meta_offset)
    for i in range(count):
        e = entries[first + i]
        e.state = 0
        e.pool_id = pool_id
        e.chunk = chunk
        e.block_index = rec.block_count + i
        e.data_offset = POOL_DATA_OFFSET + i * rec.stride
    rec.chunks[chunk].first_slot = first
    rec.chunks[chunk].count = count
    rec.n_chunks = chunk + 1
    rec.block_count += count
    ctx.push_free(pool_id, first, count)
    del c, rec, entries


def _pool_record(mm, pool_id: int) -> L.Pool:
    c = L.Control.from_buffer(mm)
    return L.Pool.from_buffer(mm, c.pools_offset + pool_id * ctypes.sizeof(L.Pool))
