"""allocate()'s slow path: pools that changed, are full, can grow, or must be waited for."""

import logging
import os
import time

import numpy as np

from ..checks import check_timeout
from ..errors import PoolExhaustedError, SegmentError
from . import layout as L
from .buffer import Buffer
from .pools import PoolTable
from .segment import is_alive
from .stats import size_text

_log = logging.getLogger("multiqueue.shm")
_SPIN_S = 50e-6  # blocks of a busy stream come back sooner than a kernel wake-up takes


class SlowAllocator:
    """What ShmManager.allocate() does when the fast path found no block.

    Tries the candidate pools again (after a refresh if the pools changed), grows an
    expandable one, then sleeps until some process frees a block or the timeout
    passes.  Its collaborators are the manager's, handed in:

    - ``pools``: the manager's PoolTable (the candidates, the records to grow);
    - ``refresh_if_changed()``: rebuild the manager's view of the pools if stale;
    - ``grow(pool_id)``: add a chunk under the domain lock and wake the waiters (True
      if blocks are free afterwards; SegmentError when the system refuses the memory);
    - ``free_blocks``: the domain's freed-block event (``arm``, ``sleep``);
    - ``count_failure()``: add one to this process's failed allocations;
    - ``registry``: the domain's ProcessRegistry (its rows and the ledger in its mapping),
      to name who holds the blocks of a full pool in the error.

    The PoolExhaustedError it raises has ``pools``: the names of the pools it found full.
    """

    def __init__(self, manager, pools: PoolTable, refresh_if_changed, grow, free_blocks, count_failure,
                 registry=None):
        self.manager = manager
        self.alloc_buffer = manager.context.alloc_buffer  # a Buffer, or -1 empty, < -1 pools changed
        self.pools = pools
        self.refresh_if_changed = refresh_if_changed
        self.grow = grow
        self.free_blocks = free_blocks
        self.count_failure = count_failure
        self.registry = registry
        self.growth_failures: dict[int, str] = {}  # pool id -> why it last failed to grow

    def allocate(self, size: int, only_pool: int | None, timeout: float | None) -> Buffer:
        """A block of ``size`` bytes from ``only_pool``, or from the pools by size;
        PoolExhaustedError when none came within ``timeout`` (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        while True:
            self.manager.check_usable()  # not shut down, by another thread while we waited say
            self.refresh_if_changed()
            candidates = self.pools.candidates(size, only_pool)
            buffer = self._try_pools(size, candidates)
            if buffer is _POOLS_CHANGED:
                continue
            if buffer is not None:
                return buffer
            if self._grow_one(candidates):
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.count_failure()
                error = PoolExhaustedError(self._exhausted_message(size, candidates, timeout))
                error.pools = [self.pools.name(p) for p in candidates]
                raise error
            buffer = self._wait_for_free_block(size, candidates, remaining)
            if buffer is not None and buffer is not _POOLS_CHANGED:
                return buffer

    def _try_pools(self, size: int, candidates):
        """A Buffer, None if every candidate is full, or _POOLS_CHANGED (refresh, retry)."""
        for pool_id in candidates:
            try:
                buffer = self.alloc_buffer(self.manager, pool_id, size)
            except RuntimeError:  # the context was disabled: say why, as the fast path does
                self.manager.check_usable()
                raise
            if buffer.__class__ is not int:
                return buffer
            if buffer < -1:  # pools added, grown or removed meanwhile
                return _POOLS_CHANGED
        return None

    def _grow_one(self, candidates) -> bool:
        """Grow the first expandable candidate that can; True if any block was added.

        A pool that cannot grow (/dev/shm full, out of maps or descriptors) is not an
        error by itself: the allocation waits for a freed block like for a full pool,
        and says why the pool did not grow if it times out."""
        for pool_id in candidates:
            rec = self.pools.records[pool_id]
            if not (rec.expandable and rec.block_count < rec.max_blocks):
                continue
            try:
                grown = self.grow(pool_id)
            except SegmentError as e:
                if pool_id not in self.growth_failures:
                    _log.warning("domain %r: pool %r could not grow: %s", self.manager.domain,
                                 self.pools.name(pool_id), e)
                self.growth_failures[pool_id] = e.strerror or str(e)
                continue
            self.growth_failures.pop(pool_id, None)
            if grown:
                return True
        return False

    def _wait_for_free_block(self, size, candidates, remaining):
        """Sleep in the kernel until some process frees a block (or time runs out);
        a Buffer if one came before sleeping, else None or _POOLS_CHANGED.

        Spins (yielding the core) for up to _SPIN_S first."""
        spin_until = time.monotonic() + min(_SPIN_S, remaining if remaining is not None else _SPIN_S)
        while time.monotonic() < spin_until:
            os.sched_yield()
            buffer = self._try_pools(size, candidates)
            if buffer is not None:
                return buffer
        # event first, then arm, then look (see wait() in _native.c for why this order)
        seen = self.free_blocks.arm()
        buffer = self._try_pools(size, candidates)  # a block freed before we armed
        if buffer is None:  # (a Buffer or _POOLS_CHANGED: return at once)
            self.free_blocks.sleep(seen, remaining)
        return buffer

    def _exhausted_message(self, size, candidates, timeout) -> str:
        parts = []
        for pool_id in candidates:
            s = self.pools.stats(pool_id)
            grow = f", expandable to {s.max_blocks}" if s.expandable else ""
            if pool_id in self.growth_failures:
                grow += f", could not grow: {self.growth_failures[pool_id]}"
            parts.append(f"{s.name!r} ({s.blocks_used}/{s.block_count} blocks of "
                         f"{size_text(s.block_size)} used{grow})")
        waited = "without waiting" if not timeout else f"within {timeout} s"
        # who holds them, after a real wait only: a try without waiting (timeout 0) is cheap
        held = f"; {self._holders_text(candidates)}" if timeout and self.registry is not None else ""
        return (f"no free block for {size} bytes {waited} in domain {self.manager.domain!r}: pools "
                f"{', '.join(parts)} are full{held}; release buffers, raise block_count, make a pool "
                "expandable or pass a longer timeout")

    def _holders_text(self, candidates) -> str:
        """"held by pid 42 'mq-hold' (120 blocks), ...; 8 unread in queues or in flight"."""
        holders = pool_holders(self.registry, self.pools.records, candidates)
        used = sum(int(self.pools.records[p].used) for p in candidates)
        parts = [f"pid {pid} {name!r}{'' if alive else ' (dead)'} ({n} block{'s' if n != 1 else ''})"
                 for pid, name, alive, n in holders]
        rest = used - sum(n for *_, n in holders)
        if rest > 0:
            parts.append(f"{rest} unread in port queues or in flight")
        where = f"`mq doctor {self.manager.domain}` names every holder"
        return f"their blocks are held by {', '.join(parts)} ({where})" if parts else where


_POOLS_CHANGED = object()  # _try_pools: the pool view is stale


def pool_holders(registry, records, pool_ids) -> list[tuple[int, str, bool, int]]:
    """(pid, name, alive, blocks) of each registered process whose ledger row holds
    blocks of these pools, most blocks first.  Read without the lock (a snapshot that
    may be a moment old): for an error message, not for accounting."""
    ranges = []
    for pool_id in pool_ids:
        rec = records[pool_id]
        ranges += [(c.first_slot, c.count) for c in rec.chunks[: min(rec.n_chunks, L.MAX_CHUNKS)]]
    ctl, mm = registry.ctl, registry.mm
    holders = []
    for proc_slot, p in enumerate(registry.rows):
        if p.state == L.PROC_FREE:
            continue
        row = ctl.ledger_offset + proc_slot * ctl.max_buffers * 8
        held = 0
        for first, count in ranges:  # a ledger word is generation << 32 | references held
            words = np.frombuffer(mm[row + first * 8 : row + (first + count) * 8], np.uint64)
            held += int(np.count_nonzero(words & np.uint64(0xFFFFFFFF)))
        if held:
            holders.append((p.pid, p.name.decode(errors="replace"), is_alive(p.pid, p.start_time), held))
    return sorted(holders, key=lambda h: -h[3])
