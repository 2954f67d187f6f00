"""A domain's process table: registering a process, retiring it, and reaping dead ones
(releasing their references), by hand or from a background thread."""

import ctypes
import threading
import time
import traceback

from ..errors import DomainFullError
from . import layout as L
from .config import ReapReport
from .segment import is_alive, process_start_time

_STAT_SUMS = ("alloc_count", "dealloc_count", "failed_count", "latency_sum_ns")


class ProcessRegistry:
    """The rows of a domain's process table (layout.Process) and their reclaim.

    Methods ending in ``_locked`` expect the caller to hold the domain lock.
    ``new_context(mm, slot)`` is the C extension's Context class: handed in because only
    the modules pyproject.toml lists import the extension (see its import-linter notes).
    """

    def __init__(self, control, domain: str, new_context):
        mm = control.mmap
        self.mm = mm
        self.ctl = L.Control.from_buffer(mm)
        self.rows = (L.Process * self.ctl.max_processes).from_buffer(mm, self.ctl.procs_offset)
        self.domain = domain
        self.new_context = new_context

    def register_locked(self, pid: int, name: str) -> int:
        """Take a free row for process ``pid``; returns its slot."""
        slot = next((i for i, p in enumerate(self.rows) if p.state == L.PROC_FREE), None)
        if slot is None:
            raise DomainFullError(
                f"domain {self.domain!r} has {len(self.rows)} processes attached, its "
                "max_processes; shut some down or create the domain with a larger ShmConfig"
            )
        p = self.rows[slot]
        ctypes.memset(ctypes.byref(p.stats), 0, ctypes.sizeof(L.Stats))
        c = self.ctl
        ledger_row = c.ledger_offset + slot * c.max_buffers * 8
        self.mm[ledger_row : ledger_row + c.max_buffers * 8] = bytes(c.max_buffers * 8)
        p.pid = pid
        p.start_time = process_start_time(pid) or 0
        p.name = name.encode()[: L.MAX_NAME]
        p.registered_ns = p.heartbeat_ns = time.monotonic_ns()
        p.incarnation = (p.incarnation + 1) & 0xFFFFFFFF
        p.state = L.PROC_ALIVE
        return slot

    def retire_locked(self, slot: int, blocks_freed: int = 0) -> None:
        """Fold a leaving process's counters into the domain's and free its slot.

        ``blocks_freed`` counts blocks the reclaim of its references returned.
        """
        p = self.rows[slot]
        r = self.ctl.retired
        r.dealloc_count += blocks_freed
        for f in _STAT_SUMS:
            setattr(r, f, getattr(r, f) + getattr(p.stats, f))
        r.latency_max_ns = max(r.latency_max_ns, p.stats.latency_max_ns)
        for b in range(L.SIZE_BUCKETS):
            r.size_hist[b] += p.stats.size_hist[b]
        ctypes.memset(ctypes.byref(p.stats), 0, ctypes.sizeof(L.Stats))
        p.pid = 0
        p.state = L.PROC_FREE

    def reap_locked(self, ctx, own_slot: int | None) -> ReapReport:
        """Reclaim and retire every registered process that died (but ``own_slot``).

        ``ctx``: this process's _native.Context, or None while it has none usable
        (attaching, leaving): a context of the dead slot's own then reclaims it.
        """
        report = ReapReport([], 0, 0)
        for slot, p in enumerate(self.rows):
            if p.state == L.PROC_FREE or slot == own_slot or is_alive(p.pid, p.start_time):
                continue
            # REAPING survives a reaper that dies mid-way; the next one redoes the rest
            p.state = L.PROC_REAPING
            released, freed = self._reclaim(ctx, slot)
            report.processes.append((p.pid, p.name.decode(errors="replace")))
            report.references_released += released
            report.blocks_freed += freed
            self.retire_locked(slot, freed)
        return report

    def _reclaim(self, ctx, slot: int) -> tuple[int, int]:
        """Release a slot's references: (references released, blocks freed)."""
        if ctx is not None:
            return ctx.reclaim(slot)
        ctx = self.new_context(self.mm, slot)
        try:
            return ctx.reclaim(slot)
        finally:
            ctx.close()

    def heartbeat(self, slot: int) -> None:
        """Stamp a live process's row (its age tells a stuck process from a busy one)."""
        self.rows[slot].heartbeat_ns = time.monotonic_ns()

    def count_failed_allocation(self, slot: int) -> None:
        self.rows[slot].stats.failed_count += 1

    def any_registered(self) -> bool:
        return any(p.state != L.PROC_FREE for p in self.rows)

    def stats_rows(self) -> list:
        """The counters of the domain: the retired processes' sum, then each registered one's."""
        return [self.ctl.retired] + [p.stats for p in self.rows if p.state != L.PROC_FREE]

    def describe(self, own_slot: int) -> list[dict]:
        """The registered processes: slot, pid, name, alive, heartbeat age, self."""
        now = time.monotonic_ns()
        out = []
        for slot, p in enumerate(self.rows):
            if p.state == L.PROC_FREE:
                continue
            out.append({
                "slot": slot, "pid": p.pid, "name": p.name.decode(errors="replace"),
                "alive": is_alive(p.pid, p.start_time),
                "heartbeat_age_s": (now - p.heartbeat_ns) / 1e9,
                "self": slot == own_slot,
            })
        return out

    def release(self) -> None:
        """Drop the views of the mapping (before it is unmapped)."""
        self.ctl = self.rows = None


class Reaper(threading.Thread):
    """Every ``interval`` seconds: ``heartbeat()`` (stamp this process's row), then ``reap()``.

    A failed round is printed and the next one goes on (one failure must not end crash
    reclaim for this process), unless ``attached()`` says the manager has left.
    """

    def __init__(self, domain: str, interval: float, heartbeat, reap, attached):
        super().__init__(name=f"mq-reaper-{domain}", daemon=True)
        self.interval = interval
        self.heartbeat = heartbeat
        self.reap = reap
        self.attached = attached
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.interval):
                try:
                    self.heartbeat()
                    self.reap()
                except Exception:
                    if not self.attached():
                        return
                    traceback.print_exc()
        finally:
            self.heartbeat = self.reap = self.attached = None  # the manager need not outlive us

    def stop(self) -> None:
        """Stop the thread and wait for it (unless called from it)."""
        self.stopping.set()
        if self is not threading.current_thread():
            self.join()
