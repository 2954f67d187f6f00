"""ShmManager: one process's entry point to a domain's pools and buffers."""

import atexit
import ctypes
import os
import sys
import weakref
from bisect import bisect_left
from functools import partial

import multiqueue._native as _native  # the C extension (a module, not the package root)

from ..checks import bad_timeout, check_timeout
from ..errors import InvalidBufferError, NotInitializedError, PoolInUseError, PoolNotFoundError
from . import layout as L
from .allocation import SlowAllocator
from .blocks import BlockMaps
from .buffer import Buffer
from .config import PoolConfig, PoolStats, ReapReport, ShmConfig, ShmStats
from .domain import check_control, open_or_create_control, remove_stale_domain, unlink_domain
from .interrupts import deferred_interrupts
from .pools import PoolTable, create_pool, grow_pool, pool_segment_path
from .processes import ProcessRegistry, Reaper
from .segment import Access, DomainLock, check_domain, check_prefix, unlink_quietly
from .stats import domain_stats, print_domain_stats

_live_managers: "weakref.WeakSet[ShmManager]" = weakref.WeakSet()


class BufferPool:
    """A named pool of fixed-size blocks in a domain (a view; the state is shared)."""

    def __init__(self, manager: "ShmManager", pool_id: int, name: str):
        self._manager = manager
        self.pool_id = pool_id
        self.name = name
        self._block_size = manager.pool_block_size(pool_id)  # a pool's record is never reused

    @property
    def block_size(self) -> int:
        return self._block_size

    def allocate(self, size: int | None = None, timeout: float | None = None) -> Buffer:
        """Take a block of this pool (``size`` defaults to the whole block)."""
        if size is None:
            size = self._block_size
        elif size.__class__ is not int or not 0 < size <= self._block_size:
            _check_pool_size(size, self.name, self._block_size)
        if timeout is not None and bad_timeout(timeout):  # no call for the usual None
            check_timeout(timeout)
        manager = self._manager
        buffer = manager._alloc_buffer(manager, self.pool_id, size)
        if buffer.__class__ is Buffer:
            return buffer
        return manager._slow.allocate(size, self.pool_id, timeout)

    def stats(self) -> PoolStats:
        return self._manager._pool_table.stats(self.pool_id)

    def __repr__(self) -> str:
        return f"<BufferPool {self.name!r} id={self.pool_id} block_size={self.block_size}>"


class ShmManager:
    """A process's handle on a domain: its pools, buffers, registry and stats.

    The first process to name a domain creates it with ``config`` (default:
    :meth:`ShmConfig.default_config`); later ones attach to the pools that exist and
    ignore ``config``.  Creating never destroys a domain; processes of a domain that
    died are reaped (their references released) on attach, periodically by a
    background thread every ``reaper_interval`` seconds (``None`` turns it off) and
    by :meth:`reap`.  The last process to shut down removes the domain's segments.
    With ``create=False`` a missing domain raises SegmentError instead of being made.

    Buffer's per-item path reads plain attributes (no property call): ``metadata_i64`` /
    ``metadata_u64`` (the metadata table's words), ``block_arrays`` (per slot, a uint8 array
    of its block, None until made) and ``block_array(slot)`` (makes the slot's).
    """

    def __init__(self, domain: str, config: ShmConfig | None = None, *, name: str | None = None,
                 reaper_interval: float | None = 1.0, create: bool = True):
        self.domain = check_domain(domain)
        if config is not None and not isinstance(config, ShmConfig):
            raise TypeError(f"config must be a ShmConfig, not {type(config).__name__}")
        _check_manager_args(name, reaper_interval)
        self._requested = config if config is not None else ShmConfig.default_config()
        self._name = (name or os.path.basename(sys.argv[0] or "python"))[: L.MAX_NAME]
        self._reaper_interval = reaper_interval
        self._create = create
        self._initialized, self._forked_from, self._ctx = False, None, None
        self.initialize()

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> bool:
        """Create or attach to the domain and register this process (idempotent)."""
        if self._initialized:
            return True
        self._forked_from = None
        self._prefix = self._requested.name_prefix
        self._control = open_or_create_control(self._prefix, self.domain, self._requested, self._create,
                                               _native.Context)
        check_control(self._control, self.domain)
        self._lock = DomainLock(self._control.fd)
        self._access = Access.of(self._control.fd)  # segments this process creates get the same
        self._map_tables()
        self._pid = os.getpid()
        self._attachments: weakref.WeakSet = weakref.WeakSet()  # told about reaps and shutdown
        with self._lock:
            self._reap_locked()
            self._proc_slot = self._registry.register_locked(self._pid, self._name)
        self._ctx = _native.Context(self._control.mmap, self._proc_slot)
        self._alloc_buffer = self._ctx.alloc_buffer
        free_blocks = FreeBlockEvent(self._control.mmap)
        self._pool_changes = PoolChanges(self, self._control, self._lock, self._pool_table, free_blocks)
        count_failure = partial(self._registry.count_failed_allocation, self._proc_slot)
        self._slow = SlowAllocator(self, self._pool_table, self._refresh_if_changed, self._pool_changes.grow,
                                   free_blocks, count_failure, self._registry)
        self._refresh_pools()
        self._initialized = True
        _live_managers.add(self)
        self._reaper = None
        if self._reaper_interval:
            heartbeat = partial(self._registry.heartbeat, self._proc_slot)
            self._reaper = Reaper(self.domain, self._reaper_interval, heartbeat, self.reap,
                                  self.is_initialized)
            self._reaper.start()
        return True

    def is_initialized(self) -> bool:
        return self._initialized

    def shutdown(self, unlink: bool | None = None) -> None:
        """Release every reference this process holds and leave the domain.

        ``unlink=None`` removes the domain's segments if no other live process is
        attached; ``True`` removes them regardless (other processes keep their
        mappings but nobody new can attach); ``False`` leaves them.
        """
        if not self._initialized:
            return
        with deferred_interrupts():  # a Ctrl-C half-way would leave the segments for nobody
            self._initialized = False
            for attachment in list(self._attachments):
                attachment.on_manager_shutdown()
            self._ctx.disable()  # other threads' allocate/get/release now refuse, before the reclaim
            self._alloc_buffer = self._refuse
            if self._reaper is not None:
                self._reaper.stop()
            with self._lock:
                freed = self._ctx.reclaim(self._proc_slot)[1]
                self._registry.retire_locked(self._proc_slot, freed)
                self._reap_locked()
                others_registered = self._registry.any_registered()
            self._ctx.close()
            if unlink or (unlink is None and not others_registered):
                unlink_domain(self._prefix, self.domain)
            self._unmap()
            _live_managers.discard(self)

    def check_usable(self) -> None:
        """Raise NotInitializedError if this manager was shut down or inherited through fork."""
        if self._initialized:
            return
        if self._forked_from:
            raise NotInitializedError(
                f"this ShmManager for domain {self.domain!r} was inherited through fork from "
                f"process {self._forked_from}; call initialize() or create a new ShmManager in the child")
        raise NotInitializedError(f"ShmManager for domain {self.domain!r} is shut down; call initialize()")

    def __enter__(self) -> "ShmManager":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        state = "initialized" if self._initialized else "shut down"
        return f"<ShmManager domain={self.domain!r} {state}>"

    # -- facts other layers need (queues, the bus, the runtime, the tools) ----------------

    @property
    def prefix(self) -> str:
        """The segment name prefix: the domain's files are /dev/shm/<prefix><domain>.*"""
        return self._prefix

    @property
    def access(self) -> Access:
        """The mode and group the domain's segments are created with."""
        return self._access

    @property
    def process_slot(self) -> int:
        """This process's row in the domain's process table."""
        return self._proc_slot

    @property
    def process_table(self):
        """The domain's process table (ctypes rows of layout.Process), read-only by convention."""
        return self._procs

    @property
    def context(self):
        """The C extension's handle on the domain (_native.Context) for the fast paths."""
        return self._ctx

    @property
    def free_buffer_slots(self) -> int:
        """Metadata slots no pool has reserved: how many blocks pools added now can hold."""
        self.check_usable()
        return self._ctl.max_buffers - self._ctl.slots_used

    def add_attachment(self, attachment) -> None:
        """Have ``attachment.on_manager_reap()`` called after every reap and
        ``attachment.on_manager_shutdown()`` at shutdown (a queue); held weakly."""
        self._attachments.add(attachment)

    def remove_attachment(self, attachment) -> None:
        self._attachments.discard(attachment)

    @property
    def config(self) -> ShmConfig:
        """The domain's configuration as it is now (pools added or removed included)."""
        self.check_usable()
        c = self._ctl
        return ShmConfig(self._prefix, self._pool_table.configs(), c.max_processes, c.max_buffers,
                         c.max_pools, self._access.gid)

    @classmethod
    def cleanup(cls, domain: str, name_prefix: str = ShmConfig.name_prefix, *,
                force: bool = False) -> list[str]:
        """Remove a stale or damaged domain's segments; returns the paths removed.

        Raises DomainInUseError if any process registered in it is still alive.  A
        damaged domain (a control segment this version cannot read) is removed when no
        live process maps its files; else refused, naming them, unless ``force``: they
        keep their mappings, but nothing new can reach them.
        """
        return remove_stale_domain(check_domain(domain), check_prefix(name_prefix), force=bool(force))

    # ------------------------------------------------------------------ buffers

    def allocate(self, size: int, timeout: float | None = None) -> Buffer:
        """A buffer of at least ``size`` bytes from the smallest pool whose block fits.

        When that pool is full the next larger pools are tried, then an expandable
        pool grows, then the call waits for a free block: forever if ``timeout`` is
        None, not at all if 0, else up to ``timeout`` seconds; then it raises
        PoolExhaustedError.  A size larger than every pool raises ValueError.
        """
        if size.__class__ is not int or size <= 0:
            _bad_size(size)
        if timeout is not None and bad_timeout(timeout):  # no call for the usual None
            check_timeout(timeout)
        i = bisect_left(self._block_sizes, size)
        if i == len(self._block_sizes):
            return self._slow.allocate(size, None, timeout)
        for pool_id in self._orders[i]:
            buffer = self._alloc_buffer(self, pool_id, size)
            if buffer.__class__ is Buffer:
                return buffer
        return self._slow.allocate(size, None, timeout)  # full, or the pools changed

    def allocate_from_pool(self, name: str, size: int | None = None, timeout: float | None = None) -> Buffer:
        """A buffer from the named pool only (``size`` defaults to its block size)."""
        return self.get_pool(name).allocate(size, timeout)

    def get(self, buffer_id: int) -> Buffer:
        """Take a new reference on a buffer by id (from any process of the domain)."""
        self.check_usable()
        if isinstance(buffer_id, bool) or not isinstance(buffer_id, int):
            raise TypeError(f"buffer id must be an int, not {type(buffer_id).__name__}")
        if not 0 <= buffer_id < 2**64 or self._ctx.acquire(buffer_id) < 0:
            raise InvalidBufferError(
                f"buffer id {buffer_id:#x} is not valid in domain {self.domain!r}: its block "
                "was released and may be reused (stale id), or no such id was issued"
            )
        base = (buffer_id & 0xFFFFFFFF) * L.ENTRY_WORDS
        pool_id = (self.metadata_u64[base + L.W_LINK] >> 32) & 0xFFFF
        return Buffer(self, self._ctx, buffer_id, self.metadata_u64[base + L.W_SIZE], pool_id)

    # ------------------------------------------------------------------ pools

    def add_pool(self, config: PoolConfig) -> BufferPool:
        """Create a new pool in the domain (visible to every attached process)."""
        self.check_usable()
        if not isinstance(config, PoolConfig):
            raise TypeError(f"add_pool takes a PoolConfig, not {type(config).__name__}")
        self._pool_changes.add(config)
        self._refresh_pools()
        return self.get_pool(config.name)

    def remove_pool(self, name: str) -> None:
        """Remove a pool; refused with PoolInUseError while any of its blocks is in use."""
        self.check_usable()
        with self._lock:
            self._reap_locked()  # dead holders must not keep the pool "in use"
            self._pool_changes.remove_locked(name)
        self._refresh_pools()

    def get_pool(self, name: str) -> BufferPool:
        self.check_usable()
        pool_id = self._pool_table.find(name)
        if pool_id is None:
            raise PoolNotFoundError(f"domain {self.domain!r} has no pool {name!r}; it has "
                                    f"{self.list_pools()}")
        return BufferPool(self, pool_id, name)

    def list_pools(self) -> list[str]:
        self.check_usable()
        return self._pool_table.names()

    def pool_name(self, pool_id: int) -> str:
        """The name of pool ``pool_id`` (a Buffer's ``pool``)."""
        return self._pool_table.name(pool_id)  # records are never reused: always its own

    def pool_block_size(self, pool_id: int) -> int:
        """The block size of pool ``pool_id`` (a Buffer's ``capacity``)."""
        return self._pool_table.block_size(pool_id)

    # ------------------------------------------------------------------ stats, processes

    def get_stats(self) -> ShmStats:
        """Domain-wide statistics (every process's allocations, living or gone)."""
        self.check_usable()
        with self._lock:
            pools = [self._pool_table.stats(p) for p in self._pool_table.active()]
            return domain_stats(self._registry.stats_rows(), pools)

    def print_stats(self, file=None) -> None:
        """Print a table of the pools and the domain's counters."""
        print_domain_stats(self.domain, self.get_stats(), file)

    def reap(self) -> ReapReport:
        """Release the references of every dead process of the domain and free its slot."""
        self.check_usable()
        with self._lock:
            report = self._reap_locked()
        for attachment in list(self._attachments):
            attachment.on_manager_reap()
        return report

    def processes(self) -> list[dict]:
        """The registered processes: slot, pid, name, alive, heartbeat age, self."""
        self.check_usable()
        return self._registry.describe(self._proc_slot)

    # ------------------------------------------------------------------ internals

    def _map_tables(self) -> None:
        """Views of the control segment's tables, kept until _unmap()."""
        mm = self._control.mmap
        self._ctl = c = L.Control.from_buffer(mm)
        self._registry = ProcessRegistry(self._control, self.domain, _native.Context)
        self._procs = self._registry.rows
        self._pools = (L.Pool * c.max_pools).from_buffer(mm, c.pools_offset)
        self._pool_table = PoolTable(self._pools, self.domain)
        self._entries = (L.Entry * c.max_buffers).from_buffer(mm, c.meta_offset)
        meta = memoryview(mm)[c.meta_offset : c.meta_offset + c.max_buffers * ctypes.sizeof(L.Entry)]
        self.metadata_i64 = meta.cast("q")
        self.metadata_u64 = meta.cast("Q")
        self._blocks = BlockMaps(self._prefix, self.domain, self._pools, self.metadata_u64)
        self.block_array = self._blocks.block_array  # block_array(slot): makes block_arrays[slot]
        self._block_view = self._blocks.block_view  # the C Buffer.memoryview() calls it on a new slot

    def _reap_locked(self) -> ReapReport:
        if self._initialized:
            return self._registry.reap_locked(self._ctx, self._proc_slot)
        return self._registry.reap_locked(None, None)  # initialize() or shutdown(): no own context

    def _refresh_if_changed(self) -> None:
        if self._ctl.pools_epoch != self._epoch:
            self._refresh_pools()

    def _refresh_pools(self) -> None:
        """Rebuild this process's view of the pools: size order, and block views."""
        self._epoch = self._ctx.refresh_epoch()
        self._pool_table.refresh()
        self._block_sizes, self._orders = self._pool_table.block_sizes, self._pool_table.orders
        self._blocks.reset(self._ctl.max_buffers, self._pool_table.live_tokens())
        self.block_arrays = self._blocks.arrays
        self._ctx.block_views = self._blocks.views  # Buffer.memoryview() (C) reads it

    def _unmap(self) -> None:
        self._ctx.block_views = None
        self._blocks.close()
        self.block_arrays = []
        for view in (self.metadata_i64, self.metadata_u64):
            view.release()
        self._registry.release()
        self._ctl = self._procs = self._pools = self._entries = self._pool_table.records = None
        self._control.close()

    def _after_fork_in_child(self) -> None:
        """The child inherits the mapping but not the registration: refuse to act.

        Its references are the parent's; the child may call initialize() to attach
        as a process of its own.
        """
        if self._ctx is not None:
            self._ctx.disable()
        self._initialized = False
        self._forked_from = self._pid
        self._alloc_buffer = self._refuse
        # the inherited descriptor shares the parent's flock: let it go with the parent
        os.close(self._control.fd)
        self._control.fd = -1

    def _refuse(self, *args):
        """Stands in for the C alloc once shut down or forked: a clear error instead."""
        self.check_usable()


class PoolChanges:
    """Pools added, grown and removed in the domain (under its lock); allocators
    sleeping for a block are woken when blocks were added."""

    def __init__(self, manager: ShmManager, control, lock: DomainLock, table: PoolTable,
                 free_blocks: "FreeBlockEvent"):
        self.manager = manager  # for its domain, prefix, access and context
        self.control = control
        self.lock = lock
        self.table = table
        self.free_blocks = free_blocks

    def add(self, config: PoolConfig) -> None:
        m = self.manager
        with self.lock:
            if self.table.find(config.name) is not None:
                raise ValueError(f"domain {m.domain!r} already has a pool named {config.name!r}")
            create_pool(self.control.mmap, m.context, m.prefix, m.domain, config, m.access, [])
        self.free_blocks.notify()

    def grow(self, pool_id: int) -> bool:
        """Add a chunk to an expandable pool: True if it has free blocks afterwards."""
        m = self.manager
        with self.lock:
            grown = grow_pool(self.control.mmap, m.context, m.prefix, m.domain, pool_id, m.access)
        if grown:
            self.free_blocks.notify()
        return grown

    def remove_locked(self, name: str) -> None:
        """Retire a pool and remove its segments; PoolInUseError while a block is in use."""
        pool_id = self.table.find(name)
        if pool_id is None:
            raise PoolNotFoundError(f"domain {self.manager.domain!r} has no pool {name!r}")
        mm, rec = self.control.mmap, self.table.records[pool_id]
        ctl = L.Control.from_buffer(mm)
        state_offset = ctl.pools_offset + pool_id * ctypes.sizeof(L.Pool) + L.Pool.state.offset
        # Mark it first (a full barrier), then look at `used`: an allocator that
        # popped concurrently either sees the mark and undoes, or is counted here.
        _native.atomic_add_u32(mm, state_offset, L.POOL_REMOVING - L.POOL_ACTIVE)
        if rec.used:
            _native.atomic_add_u32(mm, state_offset, L.POOL_ACTIVE - L.POOL_REMOVING)
            raise PoolInUseError(f"pool {name!r} has {rec.used} blocks in use; release those buffers "
                                 "before removing it")
        for chunk in range(rec.n_chunks):
            unlink_quietly(pool_segment_path(self.manager.prefix, self.manager.domain, rec, chunk))
        # The record (and its metadata slots) stay retired for the domain's life: an
        # allocator stalled between reading the state and popping must find this
        # pool, not a new one in its place.
        rec.state = L.POOL_REMOVED
        ctl.pools_epoch += 1
        del ctl, rec


class FreeBlockEvent:
    """The domain's "a block was freed" futex word (Control.free_event) and the count of
    allocators sleeping on it (Control.alloc_waiters); C frees wake them too."""

    def __init__(self, mm):
        self.mm = mm

    def notify(self) -> None:
        """Wake the allocators sleeping for a block: capacity was added."""
        if _native.atomic_load_u32(self.mm, L.Control.alloc_waiters.offset):
            _native.atomic_add_u32(self.mm, L.Control.free_event.offset, 1)
            _native.futex_wake(self.mm, L.Control.free_event.offset, 2**31 - 1)

    def arm(self) -> int:
        """Read the event, then count this allocator as waiting: the next free wakes it.
        Returns the event seen, for sleep()."""
        seen = _native.atomic_load_u32(self.mm, L.Control.free_event.offset)
        _native.atomic_add_u32(self.mm, L.Control.alloc_waiters.offset, 1)
        return seen

    def sleep(self, seen: int, timeout: float | None) -> None:
        """Sleep until the event moves past ``seen`` or ``timeout`` seconds (None: no limit)."""
        _native.futex_wait(self.mm, L.Control.free_event.offset, seen, -1.0 if timeout is None else timeout)


def _check_manager_args(name, reaper_interval) -> None:
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str (this process's name in the domain), not {type(name).__name__}")
    if reaper_interval is None:
        return
    if isinstance(reaper_interval, bool) or not isinstance(reaper_interval, (int, float)):
        raise TypeError(f"reaper_interval must be None or seconds, not {type(reaper_interval).__name__}")
    if not reaper_interval > 0:
        raise ValueError(f"reaper_interval must be None (no reaper thread) or > 0 s, not {reaper_interval}")


def _bad_size(size) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int number of bytes, not {type(size).__name__}")
    raise ValueError(f"size must be positive, got {size}")


def _check_pool_size(size, pool: str, block_size: int) -> None:
    if size.__class__ is not int or size <= 0:
        _bad_size(size)
    if size > block_size:
        raise ValueError(f"size {size} exceeds pool {pool!r} block size {block_size}")


def _after_fork_in_child() -> None:
    for manager in list(_live_managers):
        manager._after_fork_in_child()
    _live_managers.clear()


def _shutdown_all_at_exit() -> None:
    for manager in list(_live_managers):
        try:
            manager.shutdown()
        except Exception:
            pass


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_shutdown_all_at_exit)
