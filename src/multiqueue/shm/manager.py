"""ShmManager: one process's entry point to a domain's pools and buffers."""

import atexit
import ctypes
import errno
import logging
import os
import secrets
import sys
import threading
import time
import traceback
import weakref
from bisect import bisect_left

import numpy as np

import multiqueue._native as _native  # the C extension (a module, not the package root)

from ..checks import bad_timeout, check_timeout
from ..errors import (
    DomainFullError,
    DomainInUseError,
    InvalidBufferError,
    NotInitializedError,
    PoolExhaustedError,
    PoolInUseError,
    PoolNotFoundError,
    SegmentError,
)
from . import layout as L
from .buffer import Buffer
from .config import PoolConfig, PoolStats, ReapReport, ShmConfig, ShmStats
from .resources import preflight
from .segment import (
    Access,
    DomainLock,
    check_domain,
    check_prefix,
    create_segment,
    domain_segments,
    is_alive,
    mapped_by,
    open_segment,
    process_start_time,
    segment_path,
    unlink_quietly,
)

_log = logging.getLogger("multiqueue.shm")
_POOL_DATA_OFFSET = L.PAGE  # payload of a pool segment starts on the second page
_live_managers: "weakref.WeakSet[ShmManager]" = weakref.WeakSet()


class BufferPool:
    """A named pool of fixed-size blocks in a domain (a view; the state is shared)."""

    def __init__(self, manager: "ShmManager", pool_id: int, name: str):
        self._manager = manager
        self.pool_id = pool_id
        self.name = name

    @property
    def block_size(self) -> int:
        return self._manager._pool_block_size(self.pool_id)

    def allocate(self, size: int | None = None, timeout: float | None = None) -> Buffer:
        """Take a block of this pool (``size`` defaults to the whole block)."""
        return self._manager.allocate_from_pool(self.name, size=size, timeout=timeout)

    def stats(self) -> PoolStats:
        return self._manager._pool_stats(self.pool_id)

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
    """

    def __init__(
        self,
        domain: str,
        config: ShmConfig | None = None,
        *,
        name: str | None = None,
        reaper_interval: float | None = 1.0,
        create: bool = True,
    ):
        self.domain = check_domain(domain)
        if config is not None and not isinstance(config, ShmConfig):
            raise TypeError(f"config must be a ShmConfig, not {type(config).__name__}")
        _check_manager_args(name, reaper_interval)
        self._requested = config if config is not None else ShmConfig.default_config()
        self._name = (name or os.path.basename(sys.argv[0] or "python"))[: L.MAX_NAME]
        self._reaper_interval = reaper_interval
        self._create = create
        self._initialized = False
        self._ctx = None
        self.initialize()

    # ------------------------------------------------------------------ lifecycle

    def initialize(self) -> bool:
        """Create or attach to the domain and register this process (idempotent)."""
        if self._initialized:
            return True
        self._forked_from = None
        prefix = self._requested.name_prefix
        self._prefix = prefix
        self._control = self._open_or_create_control(prefix)
        self._lock = DomainLock(self._control.fd)
        self._access = Access.of(self._control.fd)  # segments this process creates get the same
        mm = self._control.mmap
        problem = L.control_problem(L.Control.from_buffer_copy(mm), len(mm))
        if problem is not None:
            self._control.close()
            raise SegmentError(errno.EINVAL, f"control segment {self._control.path} of domain "
                               f"{self.domain!r} "
                               f"is corrupt: {problem}; stop its processes and remove it (`mq clean "
                               f"{self.domain}`)")
        self._ctl = L.Control.from_buffer(mm)
        c = self._ctl
        self._procs = (L.Process * c.max_processes).from_buffer(mm, c.procs_offset)
        self._pools = (L.Pool * c.max_pools).from_buffer(mm, c.pools_offset)
        self._entries = (L.Entry * c.max_buffers).from_buffer(mm, c.meta_offset)
        meta = memoryview(mm)[c.meta_offset : c.meta_offset + c.max_buffers * ctypes.sizeof(L.Entry)]
        self._meta_q = meta.cast("q")
        self._meta_Q = meta.cast("Q")
        self._pid = os.getpid()
        self._chunk_views: dict[tuple[int, int, int], memoryview] = {}
        self._chunk_segments: dict[tuple[int, int, int], object] = {}
        self._growth_failures: dict[int, str] = {}  # pool id -> why it last failed to grow
        # objects living on this domain (port queues...) told about reaps and shutdown
        self._attachments: weakref.WeakSet = weakref.WeakSet()
        with self._lock:
            self._reap_locked()
            self._proc_slot = self._register_locked()
        self._ctx = _native.Context(mm, self._proc_slot)
        self._alloc = self._ctx.alloc
        self._alloc_buffer = self._ctx.alloc_buffer
        self._refresh_pools()
        self._initialized = True
        _live_managers.add(self)
        self._stop_reaper = threading.Event()
        self._reaper = None
        if self._reaper_interval:
            self._reaper = threading.Thread(
                target=self._reaper_loop, name=f"mq-reaper-{self.domain}", daemon=True
            )
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
        self._initialized = False
        for attachment in list(self._attachments):
            attachment.on_manager_shutdown()
        self._ctx.disable()  # other threads' allocate/get/release now refuse, before the reclaim
        self._alloc = self._alloc_buffer = self._refuse_after_fork
        self._stop_reaper.set()
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join()
        others_alive = False
        with self._lock:
            _released, freed = self._ctx.reclaim(self._proc_slot)
            self._retire_locked(self._proc_slot, freed)
            self._reap_locked()
            others_alive = any(p.state != L.PROC_FREE for p in self._procs)
        self._ctx.close()
        if unlink or (unlink is None and not others_alive):
            self._unlink_segments()
        self._unmap()
        _live_managers.discard(self)

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

    def add_attachment(self, attachment) -> None:
        """Have ``attachment.on_manager_reap()`` called after every reap and
        ``attachment.on_manager_shutdown()`` at shutdown (a queue); held weakly."""
        self._attachments.add(attachment)

    def remove_attachment(self, attachment) -> None:
        self._attachments.discard(attachment)

    @property
    def config(self) -> ShmConfig:
        """The domain's configuration as it is now (pools added or removed included)."""
        self._check()
        c = self._ctl
        pools = []
        for p in self._active_pools():
            rec = self._pools[p]
            pools.append(
                PoolConfig(
                    rec.name.decode(), rec.block_size, rec.initial_count, bool(rec.expandable),
                    rec.max_blocks if rec.expandable else None,
                )
            )
        return ShmConfig(self._prefix, pools, c.max_processes, c.max_buffers, c.max_pools, self._access.gid)

    @classmethod
    def cleanup(cls, domain: str, name_prefix: str = ShmConfig.name_prefix) -> list[str]:
        """Remove a stale domain's segments; returns the paths removed.

        Raises DomainInUseError if any process registered in it is still alive.
        """
        check_domain(domain)
        check_prefix(name_prefix)
        paths = domain_segments(name_prefix, domain)
        control = segment_path(name_prefix, domain, "ctl")
        if control in paths:
            try:
                seg = open_segment(control, L.MAGIC_CONTROL, L.KIND_CONTROL)
            except SegmentError as e:  # another layout version, foreign or broken: its process
                users = mapped_by(paths)  # table cannot be read; whoever maps its files uses it
                if users:
                    raise DomainInUseError(
                        f"domain {domain!r} cannot be read by this multiqueue ({e}) and processes "
                        f"{', '.join(map(str, users))} map its segments; stop them first") from None
                seg = None
            if seg is not None:
                try:
                    with DomainLock(seg.fd):
                        live = _live_processes(seg)
                        if live:
                            raise DomainInUseError(
                                f"domain {domain!r} still has live processes "
                                f"{', '.join(f'{n} (pid {p})' for p, n in live)}; stop them first"
                            )
                        for path in paths:
                            unlink_quietly(path)
                finally:
                    seg.close()
                return paths
        for path in paths:
            unlink_quietly(path)
        return paths

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
            return self._allocate_slow(size, None, timeout)
        for pool_id in self._orders[i]:
            buffer = self._alloc_buffer(self, pool_id, size)
            if buffer.__class__ is Buffer:
                return buffer
        return self._allocate_slow(size, None, timeout)  # full, or the pools changed

    def allocate_from_pool(self, name: str, size: int | None = None, timeout: float | None = None) -> Buffer:
        """A buffer from the named pool only (``size`` defaults to its block size)."""
        pool = self.get_pool(name)
        block_size = self._pool_block_size(pool.pool_id)
        if size is None:
            size = block_size
        elif size.__class__ is not int or size <= 0:
            _bad_size(size)
        elif size > block_size:
            raise ValueError(f"size {size} exceeds pool {name!r} block size {block_size}")
        if timeout is not None and bad_timeout(timeout):  # no call for the usual None
            check_timeout(timeout)
        buffer = self._alloc_buffer(self, pool.pool_id, size)
        if buffer.__class__ is Buffer:
            return buffer
        return self._allocate_slow(size, pool.pool_id, timeout)

    def get(self, buffer_id: int) -> Buffer:
        """Take a new reference on a buffer by id (from any process of the domain)."""
        self._check()
        if isinstance(buffer_id, bool) or not isinstance(buffer_id, int):
            raise TypeError(f"buffer id must be an int, not {type(buffer_id).__name__}")
        if not 0 <= buffer_id < 2**64 or self._ctx.acquire(buffer_id) < 0:
            raise InvalidBufferError(
                f"buffer id {buffer_id:#x} is not valid in domain {self.domain!r}: its block "
                "was released and may be reused (stale id), or no such id was issued"
            )
        base = (buffer_id & 0xFFFFFFFF) * L.ENTRY_WORDS
        pool_id = (self._meta_Q[base + L.W_LINK] >> 32) & 0xFFFF
        return Buffer(self, self._ctx, buffer_id, self._meta_Q[base + L.W_SIZE], pool_id)

    # ------------------------------------------------------------------ pools

    def add_pool(self, config: PoolConfig) -> BufferPool:
        """Create a new pool in the domain (visible to every attached process)."""
        self._check()
        if not isinstance(config, PoolConfig):
            raise TypeError(f"add_pool takes a PoolConfig, not {type(config).__name__}")
        with self._lock:
            if config.name in self._pool_names_locked():
                raise ValueError(f"domain {self.domain!r} already has a pool named {config.name!r}")
            _create_pool(self._control, self._ctx, self._prefix, self.domain, config, self._access)
        self._notify_waiters()
        self._refresh_pools()
        return self.get_pool(config.name)

    def remove_pool(self, name: str) -> None:
        """Remove a pool; refused with PoolInUseError while any of its blocks is in use."""
        self._check()
        with self._lock:
            self._reap_locked()  # dead holders must not keep the pool "in use"
            pool_id = self._find_pool_locked(name)
            rec = self._pools[pool_id]
            state_offset = self._ctl.pools_offset + pool_id * ctypes.sizeof(L.Pool) + L.Pool.state.offset
            # Mark it first (a full barrier), then look at `used`: an allocator that
            # popped concurrently either sees the mark and undoes, or is counted here.
            _native.atomic_add_u32(self._control.mmap, state_offset, L.POOL_REMOVING - L.POOL_ACTIVE)
            if rec.used:
                _native.atomic_add_u32(self._control.mmap, state_offset, L.POOL_ACTIVE - L.POOL_REMOVING)
                raise PoolInUseError(
                    f"pool {name!r} has {rec.used} blocks in use; release those buffers "
                    "before removing it"
                )
            for chunk in range(rec.n_chunks):
                unlink_quietly(_pool_segment_path(self._prefix, self.domain, rec, chunk))
            # The record (and its metadata slots) stay retired for the domain's life: an
            # allocator stalled between reading the state and popping must find this
            # pool, not a new one in its place.
            rec.state = L.POOL_REMOVED
            self._ctl.pools_epoch += 1
        self._refresh_pools()

    def get_pool(self, name: str) -> BufferPool:
        self._check()
        for pool_id in self._active_pools():
            if self._pools[pool_id].name.decode() == name:
                return BufferPool(self, pool_id, name)
        raise PoolNotFoundError(
            f"domain {self.domain!r} has no pool {name!r}; it has {self.list_pools()}"
        )

    def list_pools(self) -> list[str]:
        self._check()
        return [self._pools[p].name.decode() for p in self._active_pools()]

    # ------------------------------------------------------------------ stats

    def get_stats(self) -> ShmStats:
        """Domain-wide statistics (every process's allocations, living or gone)."""
        self._check()
        with self._lock:
            rows = [self._ctl.retired] + [p.stats for p in self._procs if p.state != L.PROC_FREE]
            processes = len(rows) - 1
            totals = {f: sum(getattr(r, f) for r in rows) for f in
                      ("alloc_count", "dealloc_count", "failed_count", "latency_sum_ns")}
            latency_max = max(r.latency_max_ns for r in rows)
            hist = {}
            for bucket in range(L.SIZE_BUCKETS):
                n = sum(r.size_hist[bucket] for r in rows)
                if n:
                    hist[1 << bucket] = n
            pools = [self._pool_stats(p) for p in self._active_pools()]
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
            alloc_latency_max_ns=latency_max,
            processes=processes,
            pool_stats=pools,
        )

    def print_stats(self, file=None) -> None:
        """Print a table of the pools and the domain's counters."""
        s = self.get_stats()
        out = file or sys.stdout
        print(f"domain {self.domain!r}: {s.processes} process(es), {s.total_pools} pool(s)", file=out)
        print(f"{'pool':<12}{'block':>10}{'blocks':>8}{'used':>8}{'free':>8}{'util':>8}{'high':>8}",
              file=out)
        for p in s.pool_stats:
            print(f"{p.name:<12}{_human(p.block_size):>10}{p.block_count:>8}{p.blocks_used:>8}"
                  f"{p.blocks_free:>8}{p.utilization:>8.1%}{p.high_water:>8}", file=out)
        print(f"allocated {s.total_allocated}/{s.total_capacity} blocks "
              f"({_human(s.allocated_bytes)} of {_human(s.capacity_bytes)}); "
              f"allocations {s.allocation_count}, deallocations {s.deallocation_count}, "
              f"failed {s.failed_allocations}; latency mean {s.alloc_latency_mean_ns:.0f} ns, "
              f"max {s.alloc_latency_max_ns} ns", file=out)

    # ------------------------------------------------------------------ processes

    def reap(self) -> ReapReport:
        """Release the references of every dead process of the domain and free its slot."""
        self._check()
        with self._lock:
            report = self._reap_locked()
        for attachment in list(self._attachments):
            attachment.on_manager_reap()
        return report

    def processes(self) -> list[dict]:
        """The registered processes: slot, pid, name, alive, heartbeat age."""
        self._check()
        now = time.monotonic_ns()
        out = []
        for slot, p in enumerate(self._procs):
            if p.state == L.PROC_FREE:
                continue
            out.append({
                "slot": slot, "pid": p.pid, "name": p.name.decode(errors="replace"),
                "alive": is_alive(p.pid, p.start_time),
                "heartbeat_age_s": (now - p.heartbeat_ns) / 1e9,
                "self": slot == self._proc_slot,
            })
        return out

    # ------------------------------------------------------------------ internals

    def _unlink_segments(self) -> None:
        """Remove the domain's files; in a group-shared domain /dev/shm's sticky bit lets
        only each file's owner remove it, so other users' files are left (and named)."""
        kept = []
        for path in domain_segments(self._prefix, self.domain):
            try:
                unlink_quietly(path)
            except PermissionError:
                kept.append(path)
        if kept:
            _log.warning("left %d segment(s) of domain %r that belong to other users (only their owner "
                         "may remove them; run `mq cleanup %s` as that user): %s",
                         len(kept), self.domain, self.domain, ", ".join(kept))

    def _check(self) -> None:
        if not self._initialized and getattr(self, "_forked_from", None):
            raise NotInitializedError(
                f"this ShmManager for domain {self.domain!r} was inherited through fork from "
                f"process {self._forked_from}; call initialize() or create a new ShmManager "
                "in the child"
            )
        if not self._initialized:
            raise NotInitializedError(
                f"ShmManager for domain {self.domain!r} is shut down; call initialize()"
            )

    def _open_or_create_control(self, prefix: str):
        path = segment_path(prefix, self.domain, "ctl")
        for _ in range(100):
            try:
                return open_segment(path, L.MAGIC_CONTROL, L.KIND_CONTROL)
            except SegmentError as e:
                if not os.path.exists(path) and "does not exist" in str(e):
                    if not self._create:
                        raise SegmentError(
                            e.errno, f"domain {self.domain!r} does not exist (no {path})"
                        ) from None
                    self._preflight()
                    seg = _create_domain(path, prefix, self.domain, self._requested)
                    if seg is not None:
                        return seg
                    continue  # another process published it first: attach to theirs
                raise
        raise SegmentError(0, f"could not create or open {path}")

    def _preflight(self) -> None:
        """Refuse a configuration this machine cannot hold, before creating anything."""
        report = preflight(self._requested, self.domain)
        for warning in report.warnings:
            _log.warning("domain %r: %s", self.domain, warning)
        report.raise_errors()

    def _register_locked(self) -> int:
        for slot, p in enumerate(self._procs):  # noqa: B007 - the loop finds `slot`
            if p.state == L.PROC_FREE:
                break
        else:
            raise DomainFullError(
                f"domain {self.domain!r} has {len(self._procs)} processes attached, its "
                "max_processes; shut some down or create the domain with a larger ShmConfig"
            )
        p = self._procs[slot]
        ctypes.memset(ctypes.byref(p.stats), 0, ctypes.sizeof(L.Stats))
        c = self._ctl
        row = c.ledger_offset + slot * c.max_buffers * 8
        self._control.mmap[row : row + c.max_buffers * 8] = bytes(c.max_buffers * 8)
        p.pid = self._pid
        p.start_time = process_start_time(self._pid) or 0
        p.name = self._name.encode()[: L.MAX_NAME]
        p.registered_ns = p.heartbeat_ns = time.monotonic_ns()
        p.incarnation = (p.incarnation + 1) & 0xFFFFFFFF
        p.state = L.PROC_ALIVE
        return slot

    def _retire_locked(self, slot: int, blocks_freed: int = 0) -> None:
        """Fold a leaving process's counters into the domain's and free its slot.

        ``blocks_freed`` counts blocks the reclaim of its references returned.
        """
        p = self._procs[slot]
        r = self._ctl.retired
        r.dealloc_count += blocks_freed
        for f in ("alloc_count", "dealloc_count", "failed_count", "latency_sum_ns"):
            setattr(r, f, getattr(r, f) + getattr(p.stats, f))
        r.latency_max_ns = max(r.latency_max_ns, p.stats.latency_max_ns)
        for b in range(L.SIZE_BUCKETS):
            r.size_hist[b] += p.stats.size_hist[b]
        ctypes.memset(ctypes.byref(p.stats), 0, ctypes.sizeof(L.Stats))
        p.pid = 0
        p.state = L.PROC_FREE

    def _reap_locked(self) -> ReapReport:
        report = ReapReport([], 0, 0)
        for slot, p in enumerate(self._procs):
            if p.state == L.PROC_FREE or (self._initialized and slot == self._proc_slot):
                continue
            if is_alive(p.pid, p.start_time):
                continue
            # REAPING survives a reaper that dies mid-way; the next one redoes the rest
            p.state = L.PROC_REAPING
            released, freed = self._reclaim_locked(slot)
            report.processes.append((p.pid, p.name.decode(errors="replace")))
            report.references_released += released
            report.blocks_freed += freed
            self._retire_locked(slot, freed)
        return report

    def _reclaim_locked(self, slot: int) -> tuple[int, int]:
        if self._initialized:
            return self._ctx.reclaim(slot)
        ctx = _native.Context(self._control.mmap, slot)  # during initialize() or shutdown()
        try:
            return ctx.reclaim(slot)
        finally:
            ctx.close()

    def _reaper_loop(self) -> None:
        me = self._procs[self._proc_slot]
        while not self._stop_reaper.wait(self._reaper_interval):
            try:
                me.heartbeat_ns = time.monotonic_ns()
                self.reap()
            except Exception:
                if not self._initialized:
                    return
                # keep reaping: one failed round must not end crash reclaim for this process
                traceback.print_exc()

    def _active_pools(self) -> list[int]:
        return [i for i, p in enumerate(self._pools) if p.state == L.POOL_ACTIVE]

    def _pool_names_locked(self) -> set[str]:
        return {self._pools[i].name.decode() for i in self._active_pools()}

    def _find_pool_locked(self, name: str) -> int:
        for pool_id in self._active_pools():
            if self._pools[pool_id].name.decode() == name:
                return pool_id
        raise PoolNotFoundError(f"domain {self.domain!r} has no pool {name!r}")

    def _refresh_pools(self) -> None:
        """Rebuild this process's view of the pools: size order and names."""
        self._epoch = self._ctx.refresh_epoch()
        self._block_views = [None] * self._ctl.max_buffers  # blocks may have moved: map anew
        self._block_arrays = [None] * self._ctl.max_buffers
        self._ctx.block_views = self._block_views  # Buffer.memoryview() (C) reads it
        # pools named "mq-..." are the library's own (the message bus): allocate() by size
        # never picks them; allocate_from_pool() reaches them by name
        active = sorted((p for p in self._active_pools() if not self._pools[p].name.startswith(b"mq-")),
                        key=lambda p: (self._pools[p].block_size, p))
        self._block_sizes = [self._pools[p].block_size for p in active]
        self._orders = [tuple(active[i:]) for i in range(len(active))]
        self._active_ids = set(self._active_pools())  # the mq- pools too: allocate_from_pool
        live_tokens = {(p, self._pools[p].token) for p in active}
        for key in [k for k in self._chunk_views if (k[0], k[2]) not in live_tokens]:
            del self._chunk_views[key]
            self._chunk_segments.pop(key).close()

    def _pool_name(self, pool_id: int) -> str:
        return self._pools[pool_id].name.decode()  # records are never reused: always its own

    def _pool_block_size(self, pool_id: int) -> int:
        return self._pools[pool_id].block_size

    def _pool_stats(self, pool_id: int) -> PoolStats:
        rec = self._pools[pool_id]
        used = min(rec.used, rec.block_count)
        return PoolStats(
            name=rec.name.decode(), pool_id=pool_id, block_size=rec.block_size,
            block_count=rec.block_count, blocks_used=used, blocks_free=rec.block_count - used,
            utilization=used / rec.block_count if rec.block_count else 0.0,
            high_water=rec.high_water, expandable=bool(rec.expandable),
            max_blocks=rec.max_blocks,
        )

    def _block_view(self, slot: int) -> memoryview:
        """The memoryview of a slot's whole block, made once per process and kept:
        slots are never reused by another pool, so the view stays right."""
        base = slot * L.ENTRY_WORDS
        link = self._meta_Q[base + L.W_LINK]
        pool_id, chunk = (link >> 32) & 0xFFFF, link >> 48
        rec = self._pools[pool_id]
        key = (pool_id, chunk, rec.token)
        segment_view = self._chunk_views.get(key) or self._map_chunk(key)
        offset = self._meta_Q[base + L.W_OFFSET]
        self._block_views[slot] = view = segment_view[offset : offset + rec.block_size]
        return view

    def _block_array(self, slot: int):
        view = self._block_views[slot] or self._block_view(slot)
        self._block_arrays[slot] = array = np.frombuffer(view, np.uint8)
        return array

    def _map_chunk(self, key) -> memoryview:
        pool_id, chunk, _token = key
        rec = self._pools[pool_id]
        seg = open_segment(_pool_segment_path(self._prefix, self.domain, rec, chunk),
                           L.MAGIC_POOL, L.KIND_POOL)
        self._chunk_segments[key] = seg
        self._chunk_views[key] = view = memoryview(seg.mmap)
        return view

    def _allocate_slow(self, size: int, only_pool: int | None, timeout: float | None) -> Buffer:
        """Full pools, changed pools, growth and waiting: everything off the fast path."""
        self._check()
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        while True:
            if self._ctl.pools_epoch != self._epoch:
                self._refresh_pools()
            candidates = self._candidates(size, only_pool)
            buffer = self._try_pools(size, candidates)
            if buffer is _POOLS_CHANGED:
                continue
            if buffer is not None:
                return buffer
            if self._grow_one(candidates):
                continue
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self._procs[self._proc_slot].stats.failed_count += 1
                raise PoolExhaustedError(self._exhausted_message(size, candidates, timeout))
            buffer = self._wait_for_free_block(size, candidates, remaining)
            if buffer is not None and buffer is not _POOLS_CHANGED:
                return buffer

    def _candidates(self, size: int, only_pool: int | None) -> tuple[int, ...]:
        if only_pool is not None:
            if only_pool not in self._active_ids:
                raise PoolNotFoundError(f"pool {only_pool} was removed from domain {self.domain!r}")
            return (only_pool,)
        i = bisect_left(self._block_sizes, size)
        if i == len(self._block_sizes):
            largest = self._block_sizes[-1] if self._block_sizes else 0
            raise ValueError(
                f"size {size} is larger than every pool's block (largest {largest} bytes) "
                f"in domain {self.domain!r}; add a pool with add_pool(PoolConfig(...))"
            )
        return self._orders[i]

    def _try_pools(self, size: int, candidates):
        """A Buffer, None if every candidate is full, or _POOLS_CHANGED (refresh, retry)."""
        for pool_id in candidates:
            buffer_id = self._alloc(pool_id, size)
            if buffer_id >= 0:
                return Buffer(self, self._ctx, buffer_id, size, pool_id)
            if buffer_id < -1:  # pools added, grown or removed meanwhile
                return _POOLS_CHANGED
        return None

    def _grow_one(self, candidates) -> bool:
        """Grow the first expandable candidate that can; True if any block was added.

        A pool that cannot grow (/dev/shm full, out of maps or descriptors) is not an
        error by itself: the allocation waits for a freed block like for a full pool,
        and says why the pool did not grow if it times out."""
        for pool_id in candidates:
            rec = self._pools[pool_id]
            if rec.expandable and rec.block_count < rec.max_blocks:
                try:
                    with self._lock:
                        grown = _grow_pool(self._control, self._ctx, self._prefix, self.domain, pool_id,
                                           self._access)
                except SegmentError as e:
                    if pool_id not in self._growth_failures:
                        _log.warning("domain %r: pool %r could not grow: %s", self.domain,
                                     self._pool_name(pool_id), e)
                    self._growth_failures[pool_id] = e.strerror or str(e)
                    continue
                self._growth_failures.pop(pool_id, None)
                if grown:
                    self._notify_waiters()
                    return True
        return False

    def _notify_waiters(self) -> None:
        """Wake allocators sleeping for a block: capacity was added."""
        mm, c = self._control.mmap, L.Control
        if _native.atomic_load_u32(mm, c.alloc_waiters.offset):
            _native.atomic_add_u32(mm, c.free_event.offset, 1)
            _native.futex_wake(mm, c.free_event.offset, 2**31 - 1)

    def _wait_for_free_block(self, size, candidates, remaining) -> Buffer | None:
        """Sleep in the kernel until some process frees a block (or time runs out).

        Spins (yielding the core) for up to 50 us first: blocks of a busy stream come
        back sooner than a kernel wake-up takes."""
        spin_until = time.monotonic() + min(50e-6, remaining if remaining is not None else 50e-6)
        while time.monotonic() < spin_until:
            os.sched_yield()
            buffer = self._try_pools(size, candidates)
            if buffer is not None:
                return buffer
        mm, c = self._control.mmap, L.Control
        # event first, then arm, then look (see wait() in _native.c for why this order)
        seen = _native.atomic_load_u32(mm, c.free_event.offset)
        _native.atomic_add_u32(mm, c.alloc_waiters.offset, 1)  # arm: the next free wakes us
        buffer = self._try_pools(size, candidates)  # a block freed before we armed
        if buffer is None:  # (a Buffer or _POOLS_CHANGED: return at once)
            wait = -1.0 if remaining is None else remaining  # -1: no timeout
            _native.futex_wait(mm, c.free_event.offset, seen, wait)
        return buffer

    def _exhausted_message(self, size, candidates, timeout) -> str:
        parts = []
        for pool_id in candidates:
            s = self._pool_stats(pool_id)
            grow = f", expandable to {s.max_blocks}" if s.expandable else ""
            if pool_id in self._growth_failures:
                grow += f", could not grow: {self._growth_failures[pool_id]}"
            parts.append(f"{s.name!r} ({s.blocks_used}/{s.block_count} blocks of "
                         f"{_human(s.block_size)} used{grow})")
        waited = "without waiting" if not timeout else f"within {timeout} s"
        return (f"no free block for {size} bytes {waited} in domain {self.domain!r}: pools "
                f"{', '.join(parts)} are full; release buffers, raise block_count, make a pool "
                "expandable or pass a longer timeout")

    def _unmap(self) -> None:
        self._block_views = self._block_arrays = []
        self._ctx.block_views = None
        for seg in self._chunk_segments.values():
            seg.close()
        self._chunk_segments.clear()
        self._chunk_views.clear()
        for view in (self._meta_q, self._meta_Q):
            view.release()
        self._ctl = self._procs = self._pools = self._entries = None
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
        self._alloc = self._alloc_buffer = self._refuse_after_fork
        # the inherited descriptor shares the parent's flock: let it go with the parent
        os.close(self._control.fd)
        self._control.fd = -1

    def _refuse_after_fork(self, *args):
        """Stands in for the C alloc once shut down or forked: a clear error instead."""
        self._check()


_POOLS_CHANGED = object()  # _try_pools: the pool view is stale


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


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


def _live_processes(seg) -> list[tuple[int, str]]:
    c = L.Control.from_buffer(seg.mmap)
    procs = (L.Process * c.max_processes).from_buffer(seg.mmap, c.procs_offset)
    live = [(p.pid, p.name.decode(errors="replace")) for p in procs
            if p.state != L.PROC_FREE and is_alive(p.pid, p.start_time)]
    del c, procs
    return live


def _pool_segment_path(prefix: str, domain: str, rec, chunk: int) -> str:
    return segment_path(prefix, domain, f"pool.{rec.name.decode()}.{chunk}.{rec.token:016x}")


def _create_domain(path: str, prefix: str, domain: str, config: ShmConfig):
    """Build the control segment and the configured pools, then publish the control.

    Pool segments are created first (their names carry a random token, so a racing
    creator cannot collide); if another process publishes the domain first, ours
    are removed and the caller attaches to theirs.
    """
    lay = L.control_layout(config.max_processes, config.max_pools, config.max_buffers)
    access = Access.for_group(config.gid)
    created_pools: list[str] = []

    def init(mm):
        c = L.Control.from_buffer(mm)
        c.max_processes, c.max_pools, c.max_buffers = (
            config.max_processes, config.max_pools, config.max_buffers)
        c.procs_offset, c.pools_offset = lay["procs"], lay["pools"]
        c.meta_offset, c.ledger_offset = lay["meta"], lay["ledger"]
        c.name_prefix = prefix.encode()
        del c
        ctx = _native.Context(mm, 0)
        try:
            for pool in config.pools:
                _create_pool_in(mm, ctx, prefix, domain, pool, created_pools, access)
        finally:
            ctx.close()

    try:
        seg = create_segment(path, lay["total"], L.MAGIC_CONTROL, L.KIND_CONTROL, lay["procs"],
                             init, access)
    except BaseException:
        for p in created_pools:
            unlink_quietly(p)
        raise
    if seg is None:
        for p in created_pools:
            unlink_quietly(p)
    return seg


def _create_pool(control, ctx, prefix: str, domain: str, config: PoolConfig, access: Access) -> int:
    """Add a pool to a live domain (caller holds the domain lock)."""
    created: list[str] = []
    try:
        return _create_pool_in(control.mmap, ctx, prefix, domain, config, created, access)
    except BaseException:
        for p in created:
            unlink_quietly(p)
        raise


def _create_pool_in(mm, ctx, prefix, domain, config: PoolConfig, created: list[str], access: Access) -> int:
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
    _add_chunk(mm, ctx, prefix, domain, pool_id, config.block_count, created, access)
    rec.state = L.POOL_ACTIVE
    c.pools_epoch += 1
    del c, pools, rec
    return pool_id


def _grow_pool(control, ctx, prefix: str, domain: str, pool_id: int, access: Access) -> bool:
    """Add a chunk of blocks to an expandable pool (caller holds the domain lock).

    Returns True if the pool has free blocks afterwards (it grew, or another process
    freed or grew meanwhile), False if it is at its limit.
    """
    mm = control.mmap
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
        for p in created:
            unlink_quietly(p)
        raise
    L.Control.from_buffer(mm).pools_epoch += 1
    return True


def _add_chunk(mm, ctx, prefix, domain, pool_id: int, count: int, created: list[str], access: Access) -> None:
    """Create one segment of `count` blocks for a pool and link them into its free list."""
    c = L.Control.from_buffer(mm)
    rec = _pool_record(mm, pool_id)
    first = rec.chunks[0].first_slot + rec.block_count  # inside the pool's reserved range
    chunk = rec.n_chunks
    path = _pool_segment_path(prefix, domain, rec, chunk)
    size = _POOL_DATA_OFFSET + count * rec.stride
    seg = create_segment(path, size, L.MAGIC_POOL, L.KIND_POOL, _POOL_DATA_OFFSET, access=access)
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
        e.data_offset = _POOL_DATA_OFFSET + i * rec.stride
    rec.chunks[chunk].first_slot = first
    rec.chunks[chunk].count = count
    rec.n_chunks = chunk + 1
    rec.block_count += count
    ctx.push_free(pool_id, first, count)
    del c, rec, entries


def _pool_record(mm, pool_id: int) -> L.Pool:
    c = L.Control.from_buffer(mm)
    return L.Pool.from_buffer(mm, c.pools_offset + pool_id * ctypes.sizeof(L.Pool))


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
