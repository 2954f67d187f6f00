"""`mq doctor`: who holds every buffer of a domain, and what is wrong with that.

:func:`diagnose` reads the domain read-only (tools.inspect: it registers, reaps and
changes nothing, so dead holders are shown before anyone reclaims them), accounts for
every reference of every buffer and every block of every pool, and says how to fix
each problem it finds.
"""

import errno
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import SegmentError
from ..graph import registry as R
from ..shm import layout as L
from ..shm.segment import DEFAULT_PREFIX, check_domain, check_prefix, domain_segments, is_alive, segment_path
from ..stream.queue import KIND_QUEUE, MAGIC_QUEUE, ReaderRecord
from .doctor_report import (
    BufferInfo,
    DoctorReport,
    Finding,
    Holder,
    PoolInfo,
    ProcessInfo,
    QueueInfo,
    ReaderInfo,
)
from .inspect import (
    MASK32,
    DomainSnapshot,
    QueueSnapshot,
    ReadOnlySegment,
    queue_segments,
    snapshot_domain,
    split_words,
)

_SNAPSHOTS = 3  # a difference must show in this many snapshots in a row to be reported
_NEARLY_FULL = 0.9  # a pool with this share of its blocks held makes allocations wait soon


# ---------------------------------------------------------------------- diagnose


def diagnose(domain: str, name_prefix: str = DEFAULT_PREFIX) -> DoctorReport:
    """Explain every held buffer of ``domain``: its holders, whether they live, leaks::

        ref_count = sum of the ledger rows naming the slot at its generation   (processes)
                  + unread items of the active readers of every port queue     (queues)
                  + leftover

    A positive leftover is a *leak* (references nobody accounts for, e.g. from a process
    killed inside one of the one-instruction windows of docs/shm.md), a negative one an
    *inconsistency*.  The snapshot is taken without locks, so on a busy domain a reference
    moving between a ledger and a queue can show as a one-off difference: differences are
    only reported when they are the same in several snapshots in a row.

    Reads the shared memory only.  Raises SegmentError if the domain does not exist or
    its control segment is unusable.
    """
    check_domain(domain)
    check_prefix(name_prefix)
    control = _open_control(name_prefix, domain)
    queues: dict[str, ReadOnlySegment] = {}
    try:
        unreadable = _open_queues(name_prefix, domain, queues)
        roles = graph_roles(name_prefix, domain)
        accounting = _Accounting(snapshot_domain(control, queues), roles)
        persistent = set(accounting.anomalies)
        for _ in range(_SNAPSHOTS - 1):
            if not persistent:
                break
            accounting = _Accounting(snapshot_domain(control, queues), roles)
            persistent &= set(accounting.anomalies)
        return _report(domain, name_prefix, control.path, accounting, persistent, unreadable)
    finally:
        for segment in queues.values():
            segment.close()
        control.close()


def _open_control(prefix: str, domain: str) -> ReadOnlySegment:
    path = segment_path(prefix, domain, "ctl")
    try:
        return ReadOnlySegment(path, L.MAGIC_CONTROL, L.KIND_CONTROL)
    except SegmentError as e:
        if e.errno != errno.ENOENT:
            raise
    others = domain_segments(prefix, domain)
    hint = (f"; its other segments are left over ({', '.join(others)}): remove them with "
            f"`mq cleanup {domain}`" if others else "")
    raise SegmentError(errno.ENOENT, f"domain {domain!r} does not exist (no {path}){hint}")


def _open_queues(prefix: str, domain: str, queues: dict[str, ReadOnlySegment]) -> list[Finding]:
    """Map every queue segment of the domain into ``queues`` (name -> segment; the
    caller closes them, also after an error); a finding for each that cannot be."""
    unreadable = []
    for name, path in queue_segments(prefix, domain).items():
        try:
            queues[name] = ReadOnlySegment(path, MAGIC_QUEUE, KIND_QUEUE)
        except SegmentError as e:
            if os.path.exists(path):  # else removed meanwhile: nothing to say
                unreadable.append(Finding(
                    "unreadable-segment", f"queue segment {path} cannot be read: {e}",
                    f"if no process uses queue {name!r} any more, remove {path}"))
    return unreadable


# ---------------------------------------------------------------------- accounting


@dataclass
class GraphRoles:
    """What a domain's graph says about its processes and queue readers (the doctor's
    names for holders): ``blocks``: pid -> the blocks that process runs; ``edges``:
    (queue, reader index) -> the edge that reader serves, as "a.out -> b.in"."""

    blocks: dict[int, list[str]] = field(default_factory=dict)
    edges: dict[tuple[str, int], str] = field(default_factory=dict)


def graph_roles(prefix: str, domain: str) -> GraphRoles:
    """The graph's roles in ``domain`` (empty if it runs no graph, or one we cannot read)."""
    try:
        segment = ReadOnlySegment(segment_path(prefix, domain, "graph"), R.MAGIC_GRAPH, R.KIND_GRAPH)
    except SegmentError:
        return GraphRoles()
    try:
        graph = R.GraphSegment(segment)
    except (ValueError, OverflowError):  # a damaged graph segment names nobody (mq clean removes it)
        segment.close()
        return GraphRoles()
    roles = GraphRoles()
    try:
        for i, b in enumerate(graph.description["blocks"]):
            if graph.block_rows[i][R.PID]:
                roles.blocks.setdefault(int(graph.block_rows[i][R.PID]), []).append(b["name"])
        for i, e in enumerate(graph.description["edges"]):
            reader = int(graph.edge_rows[i][R.EDGE_READER])
            if reader >= 0:
                roles.edges[(e["queue"], reader)] = f"{e['src']} -> {e['dst']}"
    except (KeyError, TypeError, IndexError):
        pass  # a description we cannot follow: the names found so far
    finally:
        graph.close()
    return roles


class _Accounting:
    """One snapshot accounted for: every reference of every buffer put with its holder,
    every block of every pool put in one place.  ``anomalies`` are keyed so that one
    persisting across snapshots has the same key: ("leftover", slot, state word,
    leftover), ("stale-ledger", proc slot, slot, word, state word), ("stale-item",
    queue, reader, id, state word), ("lost-block", pool, slot, state word)..."""

    def __init__(self, snap: DomainSnapshot, roles: GraphRoles):
        self.snap = snap
        self.roles = roles
        self.gens, self.refs = split_words(snap.states)
        self.buffers: dict[int, BufferInfo] = {}  # slot -> buffer
        self.anomalies: dict[tuple, str] = {}
        self.allocating: set[int] = set()  # slots live processes are publishing right now
        registered = snap.tables.processes
        self.names = {s: p.name.decode(errors="replace") for s, p in registered}
        self.pids = {s: p.pid for s, p in registered}
        self.alive = {s: is_alive(p.pid, p.start_time) for s, p in registered}
        for slot in np.flatnonzero(self.refs > 0).tolist():
            self.buffer(slot, int(self.gens[slot]))
        self.processes = [self._account_process(s, p) for s, p in registered]
        self.queues = [self._account_queue(q) for q in snap.queues]
        self._account_leftovers()
        self.pools = [self._account_pool(pool_id) for pool_id in snap.free_lists]
        self.buffers = dict(sorted(self.buffers.items()))

    def buffer(self, slot: int, gen: int, unpublished: bool = False) -> BufferInfo:
        """The buffer at ``slot`` (described from its metadata entry the first time)."""
        if slot not in self.buffers:
            e = self.snap.entry(slot)
            pools = self.snap.tables.pools
            pool = pools[e.pool_id] if e.pool_id < len(pools) else None
            self.buffers[slot] = BufferInfo(
                id=(gen << 32) | slot, slot=slot, generation=gen,
                pool=pool.name.decode(errors="replace") if pool is not None else f"#{e.pool_id}",
                pool_id=e.pool_id, size=None if unpublished else e.size,
                capacity=pool.block_size if pool is not None else 0,
                ref_count=0 if unpublished else int(self.refs[slot]),
                creator_pid=0 if unpublished else e.creator_pid,
                age_s=(None if unpublished or not e.alloc_time_ns
                       else (self.snap.taken_ns - e.alloc_time_ns) / 1e9),
                unpublished=unpublished)
        return self.buffers[slot]

    def _account_process(self, s: int, p: L.Process) -> ProcessInfo:
        age = (self.snap.taken_ns - p.heartbeat_ns) / 1e9 if p.heartbeat_ns else 0.0
        info = ProcessInfo(s, p.pid, self.names[s], "reaping" if p.state == L.PROC_REAPING else "registered",
                           self.alive[s], 0, 0, 0, age)
        row = self.snap.ledger_rows[s]
        row_gens, counts = split_words(row)
        for slot in np.flatnonzero(counts > 0).tolist():
            self._account_ledger_word(info, slot, int(row_gens[slot]), int(counts[slot]), int(row[slot]))
        return info

    def _account_ledger_word(self, info: ProcessInfo, slot: int, gen: int, count: int, word: int) -> None:
        """One word of a process's ledger: references it holds, a block it is taking, or stale."""
        holder = Holder("process", info.pid, info.alive, count, info.name, proc_slot=info.slot,
                        blocks=self.roles.blocks.get(info.pid, []))
        current, refs = int(self.gens[slot]), int(self.refs[slot])
        if gen == current and refs > 0:
            self.buffer(slot, gen).holders.append(holder)
            info.references += count
            info.buffers += 1
        elif refs == 0 and current in ((gen - 1,) if gen > 1 else (MASK32, 0)):
            # popped but not published: a live process is allocating it right now
            if not info.alive:
                self.buffer(slot, gen, unpublished=True).holders.append(holder)
                info.unpublished += 1
            else:
                self.allocating.add(slot)
        elif info.alive:  # a dead process's stale words are dropped harmlessly when it is reaped
            self.anomalies[("stale-ledger", info.slot, slot, word, int(self.snap.states[slot]))] = (
                f"process {info.pid} {info.name!r} records {count} reference(s) of buffer "
                f"{(gen << 32) | slot:#x}, but slot {slot} is at generation {current} with "
                f"{refs} reference(s)")

    def _account_queue(self, q: QueueSnapshot) -> QueueInfo:
        h = q.header
        closed = ("open", "closed", "abandoned")[min(h.closed, 2)]
        info = QueueInfo(q.name, q.path, h.capacity, h.pushed, closed)
        for index, r in q.readers:
            held = _unread_items(q, r)
            owner = r.proc if self.pids.get(r.proc) == r.pid else None  # else its slot was reused
            name = self.names.get(owner, "")
            alive = is_alive(r.pid, r.start_time)
            info.readers.append(ReaderInfo(index, r.pid, name, alive, "drop_oldest" if r.policy else "block",
                                           sum(held.values())))
            for buffer_id, count in held.items():
                self._account_queue_item(Holder("queue", r.pid, alive, count, name, proc_slot=owner,
                                                 queue=q.name, reader=index,
                                                 edge=self.roles.edges.get((q.name, index))), buffer_id)
        return info

    def _account_queue_item(self, holder: Holder, buffer_id: int) -> None:
        slot, gen = buffer_id & MASK32, buffer_id >> 32
        used = len(self.snap.states)
        if slot < used and gen == self.gens[slot] and self.refs[slot] > 0:
            self.buffer(slot, gen).holders.append(holder)
            return
        state = int(self.snap.states[slot]) if slot < used else -1
        self.anomalies[("stale-item", holder.queue, holder.reader, buffer_id, state)] = (
            f"reader {holder.reader} of queue {holder.queue!r} has {holder.count} unread item(s) of buffer "
            f"{buffer_id:#x}, which is no longer valid (freed or reused)")

    def _account_leftovers(self) -> None:
        for slot, b in self.buffers.items():
            if b.unpublished:
                continue
            b.leftover = b.ref_count - b.accounted
            if b.leftover:
                self.anomalies[("leftover", slot, int(self.snap.states[slot]), b.leftover)] = ""

    def _account_pool(self, pool_id: int) -> PoolInfo:
        """Put every block of a pool in one place: free, held, unpublished or (else) lost.

        Lost blocks and blocks both free and held become anomalies (reported when they
        persist): a lost block is one a process took from the free list and was killed
        before recording it in its ledger (docs/shm.md), or a sign of corruption."""
        rec = self.snap.tables.pools[pool_id]
        slots = [first for c in rec.chunks[: min(rec.n_chunks, L.MAX_CHUNKS)]
                 for first in range(c.first_slot, min(c.first_slot + c.count, len(self.refs)))]
        info = PoolInfo(rec.name.decode(errors="replace"), pool_id, len(slots), None, 0, 0, 0,
                        limit=rec.max_blocks if rec.expandable else rec.block_count)
        for slot in slots:
            if self.refs[slot] > 0:
                info.held += 1
                for h in self.buffers[slot].holders if slot in self.buffers else ():
                    info.holders[h.describe()] = info.holders.get(h.describe(), 0) + 1
            elif slot in self.buffers and self.buffers[slot].unpublished:
                info.unpublished += 1
        free_list = self.snap.free_lists[pool_id]
        if free_list is not None:
            self._check_free_list(info, slots, free_list)
        return info

    def _check_free_list(self, info: PoolInfo, slots: list[int], free_list: list[int]) -> None:
        free = set(free_list)
        info.free = len(free - {-1})
        if -1 in free or not free <= set(slots):
            self.anomalies[("free-list", info.pool_id, tuple(free_list))] = (
                f"the free list of pool {info.name!r} loops or leaves the pool's slots")
        for slot in free & set(slots):
            if self.refs[slot] > 0:
                self.anomalies[("free-and-held", slot, int(self.snap.states[slot]))] = (
                    f"block slot {slot} of pool {info.name!r} is in the free list but has "
                    f"{int(self.refs[slot])} reference(s)")
        for slot in slots:
            if slot not in free and self.refs[slot] == 0 and slot not in self.buffers \
                    and slot not in self.allocating:
                self.anomalies[("lost-block", info.pool_id, slot, int(self.snap.states[slot]))] = ""


def _unread_items(q: QueueSnapshot, r: ReaderRecord) -> dict[int, int]:
    """buffer id -> items of it a reader has not read (one reference each)."""
    h = q.header
    low = max(r.cursor, h.head - h.capacity)
    held: dict[int, int] = {}
    for seq in range(low, max(low, h.head)):
        buffer_id = int(q.ring[seq & h.mask])
        held[buffer_id] = held.get(buffer_id, 0) + 1
    return held


# ---------------------------------------------------------------------- findings


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _report(domain: str, prefix: str, control_path: str, a: _Accounting, persistent: set,
            unreadable: list[Finding]) -> DoctorReport:
    any_alive = any(p.alive for p in a.processes)
    findings = _dead_process_findings(domain, a, any_alive) + _dead_reader_findings(domain, a, any_alive)
    findings += _reference_findings(domain, a, persistent) + _lost_block_findings(domain, a, persistent)
    findings += _other_inconsistencies(domain, a, persistent) + _full_pool_findings(domain, a) + unreadable
    return DoctorReport(domain, prefix, control_path, a.processes, a.queues, list(a.buffers.values()),
                        findings, a.pools)


def _reap_how(domain: str, any_alive: bool) -> str:
    if any_alive:
        return (f"call ShmManager.reap() in any process attached to {domain!r} (every manager with a "
                "reaper_interval does it on its own within that interval) or attach a new "
                "ShmManager to it (attaching reaps)")
    return (f"no process of {domain!r} is alive: run `mq cleanup {domain}` to remove the stale domain, or "
            "attach a ShmManager to it (attaching reaps the dead and reuses the domain)")


def _dead_process_findings(domain: str, a: _Accounting, any_alive: bool) -> list[Finding]:
    findings = []
    for p in a.processes:
        if p.alive:
            continue
        ids = [b.id for b in a.buffers.values()
               if any(h.kind == "process" and h.proc_slot == p.slot for h in b.holders)]
        what = (f"it holds {_plural(p.references, 'reference')} on {_plural(p.buffers, 'buffer')}"
                if p.references else "it holds no references")
        if p.unpublished:
            what += f" and {_plural(p.unpublished, 'block')} it took but never published"
        state = "being reaped" if p.state == "reaping" else "still registered"
        releases = []
        if p.references:
            releases.append(f"releases the {_plural(p.references, 'reference')} of dead process {p.pid}")
        if p.unpublished:
            to = "its pool" if p.unpublished == 1 else "their pools"
            releases.append(f"returns the {_plural(p.unpublished, 'unpublished block')} to {to}")
        releases.append(f"frees its slot {p.slot}")
        findings.append(Finding(
            "dead-process", f"process {p.pid} {p.name!r} (slot {p.slot}) is dead but {state}; {what}",
            f"{_reap_how(domain, any_alive)}: that "
            f"{', '.join(releases[:-1]) + ' and ' if releases[:-1] else ''}{releases[-1]}",
            pid=p.pid, references=p.references, buffers=ids))
    return findings


def _dead_reader_findings(domain: str, a: _Accounting, any_alive: bool) -> list[Finding]:
    findings = []
    for q in a.queues:
        for r in q.readers:
            if r.alive:
                continue
            ids = [b.id for b in a.buffers.values()
                   if any(h.kind == "queue" and h.queue == q.name and h.reader == r.index for h in b.holders)]
            blocking = r.policy == "block" and r.unread >= q.capacity
            fix = (f"in any process of {domain!r}, open the queue (PortQueue(manager, {q.name!r}, "
                   f"create=False)) and call reap_dead_readers() (or close() it): that detaches reader "
                   f"{r.index} and releases its {_plural(r.unread, 'reference')}")
            if not any_alive:
                fix = f"no process of {domain!r} is alive: run `mq cleanup {domain}` to remove the stale " \
                      "domain"
            findings.append(Finding(
                "dead-reader",
                f"reader {r.index} ({r.policy}) of queue {q.name!r} belongs to dead process {r.pid}; it "
                f"holds {_plural(r.unread, 'unread item')} (one reference each)"
                + ("; its full ring blocks the producer" if blocking else ""),
                fix, pid=r.pid, references=r.unread, buffers=ids))
    return findings


def _reference_findings(domain: str, a: _Accounting, persistent: set) -> list[Finding]:
    """A leak or an inconsistency for each buffer whose leftover persisted."""
    findings = []
    cleanup = f"`mq cleanup {domain}`"
    for b in a.buffers.values():
        key = ("leftover", b.slot, (b.generation << 32) | b.ref_count, b.leftover)
        if not b.leftover or key not in persistent:
            continue
        held = f"{b.accounted} held by {_plural(len(b.holders), 'holder')}" if b.holders else "no holder"
        where = f"buffer {b.id:#x} (pool {b.pool!r}, slot {b.slot}) has {b.ref_count} reference(s)"
        if b.leftover > 0:
            findings.append(Finding(
                "leak",
                f"{where}, {held}: {_plural(b.leftover, 'reference')} nobody accounts for (a process was "
                "probably killed inside the one-instruction window of a get/share or release, "
                "see docs/shm.md)",
                f"a leaked reference cannot be released while the domain lives: the block stays in use "
                f"(pool {b.pool!r} has one block less) until every process of {domain!r} stops and "
                f"{cleanup} removes the domain; harmless unless it recurs",
                references=b.leftover, buffers=[b.id]))
        else:
            findings.append(Finding(
                "inconsistent",
                f"{where} but its holders account for {b.accounted}: {_plural(-b.leftover, 'reference')} "
                "too many",
                f"the shared state is inconsistent (a bug, or the memory was written by something else): "
                f"the last release will fail with InvalidBufferError; stop the processes of {domain!r}, "
                f"run {cleanup} and report it",
                references=-b.leftover, buffers=[b.id]))
    return findings


def _lost_block_findings(domain: str, a: _Accounting, persistent: set) -> list[Finding]:
    """One finding per pool with blocks that are neither free nor held in every snapshot."""
    lost: dict[int, list[int]] = {}
    for key in persistent:
        if key[0] == "lost-block":
            lost.setdefault(key[1], []).append(key[2])
    findings = []
    for pool in a.pools:
        slots = sorted(lost.get(pool.pool_id, ()))
        if not slots:
            continue
        pool.lost = len(slots)
        shown = ", ".join(map(str, slots[:10])) + (" ..." if len(slots) > 10 else "")
        findings.append(Finding(
            "lost-block",
            f"pool {pool.name!r} has {_plural(len(slots), 'block')} (slot {shown}) that are neither free "
            "nor held: a process was probably killed between taking a block from the free list and "
            "recording it (see docs/shm.md)",
            f"a lost block cannot be used again while the domain lives (pool {pool.name!r} has "
            f"{_plural(len(slots), 'block')} less) until every process of {domain!r} stops and "
            f"`mq cleanup {domain}` removes the domain; harmless unless it recurs"))
    return findings


def _other_inconsistencies(domain: str, a: _Accounting, persistent: set) -> list[Finding]:
    return [Finding("inconsistent", message,
                    f"the shared state is inconsistent (a bug, or the memory was written by something else): "
                    f"stop the processes of {domain!r}, run `mq cleanup {domain}` and report it")
            for key, message in a.anomalies.items()
            if key[0] not in ("leftover", "lost-block") and key in persistent]


def _full_pool_findings(domain: str, a: _Accounting) -> list[Finding]:
    """A pool (nearly) all held makes every allocation from it wait: say who holds it."""
    findings = []
    for pool in a.pools:
        if not pool.limit or pool.held < _NEARLY_FULL * pool.limit:
            continue
        holders = sorted(pool.holders.items(), key=lambda h: -h[1])
        named = "; ".join(f"{who}: {_plural(n, 'block')}" for who, n in holders[:8])
        more = f"; and {len(holders) - 8} more" if len(holders) > 8 else ""
        full = "full" if pool.held >= pool.limit else "nearly full"
        findings.append(Finding(
            "pool-full",
            f"pool {pool.name!r} is {full}: {pool.held} of its {pool.limit} blocks are held, so "
            f"allocations from it wait (a source stalls, `waiting for pool {pool.name!r}`); held by "
            f"{named or 'nobody known'}{more}",
            "release what the holders keep: a block or process that keeps frames (a "
            "frame.buffer.share() kept, frames not released) or a slow or paused blocking reader "
            "holds them; fix or restart it, or give the pool more blocks (block_count, expandable)"))
    return findings
