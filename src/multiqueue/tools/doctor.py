"""`mq doctor`: who holds every buffer of a domain, and what is wrong with that.

:func:`diagnose` maps the domain's control segment and its port queues read-only
(``PROT_READ``: it cannot change anything, registers no process and reaps nobody, so
dead holders are shown before anyone reclaims them) and accounts for every
reference of every buffer::

    ref_count = sum of the ledger rows naming the slot at its generation   (processes)
              + unread items of the active readers of every port queue     (queues)
              + leftover

A positive leftover is a *leak*: references nobody accounts for, e.g. from a process
killed inside one of the one-instruction windows of docs/shm.md; they can never be
released.  A negative one is an *inconsistency*.  Dead processes still registered and
queue readers of dead processes are reported with the references they pin.  Every
finding carries a sentence saying how to fix it.

The snapshot is taken without locks.  On a busy domain a reference moving between a
ledger and a queue, or a count being changed, can show as a one-off difference; such
differences are only reported when they are the same in several snapshots in a row.
"""

import ctypes as C
import errno
import mmap
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import SegmentError, SegmentVersionError
from ..shm import layout as L
from ..shm.segment import DEFAULT_PREFIX, check_domain, check_prefix, domain_segments, is_alive, segment_path
from ..stream.queue import KIND_QUEUE, MAGIC_QUEUE, Item, QueueHeader, ReaderRecord

_ITEM_WORDS = C.sizeof(Item) // 8  # an item is (id, timestamp)
_READER_ACTIVE = 1
_SNAPSHOTS = 3  # a difference must show in this many snapshots in a row to be reported
_WALK_TRIES = 5  # attempts at reading a busy pool's free list while it stands still
_HEAD_WORD = C.sizeof(L.Pool) // 8  # u64 words per pool record; the head is the first
_NEXT_FREE = L.Entry.next_free.offset // 4  # u32 index of next_free inside an entry
_MASK32 = 0xFFFFFFFF


# ---------------------------------------------------------------------- report


@dataclass
class Holder:
    """Who holds references of one buffer: a process (its ledger row) or a queue reader."""

    kind: str  # "process" or "queue"
    pid: int
    alive: bool
    count: int  # references held
    name: str = ""  # the process's registered name ("" if unknown)
    proc_slot: int | None = None  # the process's slot in the domain's registry
    queue: str | None = None  # kind "queue": the queue's name and reader index
    reader: int | None = None

    def describe(self) -> str:
        who = f"pid {self.pid}" + (f" {self.name!r}" if self.name else "")
        state = "alive" if self.alive else "DEAD"
        if self.kind == "queue":
            return f"queue {self.queue!r} reader {self.reader} ({who}, {state})"
        return f"process {who} ({state})"


@dataclass
class BufferInfo:
    """One buffer with a non-zero reference count (or a block a dead process took unpublished)."""

    id: int  # generation << 32 | slot
    slot: int
    generation: int
    pool: str
    pool_id: int
    size: int | None  # requested size (None for an unpublished block)
    capacity: int  # the pool's block size
    ref_count: int
    creator_pid: int
    age_s: float | None  # since allocation
    holders: list[Holder] = field(default_factory=list)
    leftover: int = 0  # ref_count - references held by the holders: > 0 leak, < 0 inconsistent
    unpublished: bool = False  # popped by a process that died before publishing it

    @property
    def accounted(self) -> int:
        return sum(h.count for h in self.holders)


@dataclass
class ProcessInfo:
    slot: int
    pid: int
    name: str
    state: str  # "registered" or "reaping" (a reaper is releasing its references)
    alive: bool
    references: int  # references its ledger records on live buffers
    buffers: int  # how many buffers those are
    unpublished: int  # blocks it took and never published (only matters once it is dead)
    heartbeat_age_s: float


@dataclass
class ReaderInfo:
    index: int
    pid: int
    name: str
    alive: bool
    policy: str
    unread: int  # items (references) it holds


@dataclass
class QueueInfo:
    name: str
    path: str
    capacity: int
    pushed: int
    closed: str  # "open", "closed" or "abandoned"
    readers: list[ReaderInfo] = field(default_factory=list)


@dataclass
class PoolInfo:
    """Where every block of one pool is: free, held, taken by a dead process, or lost."""

    name: str
    pool_id: int
    blocks: int
    free: int | None  # None: the free list kept changing while it was walked (a busy pool)
    held: int  # blocks with references
    unpublished: int  # taken by a process that died before publishing them (reaping returns them)
    lost: int  # none of the above in every snapshot: leaked blocks

    def describe(self) -> str:
        free = "busy" if self.free is None else str(self.free)
        return (f"{self.name}: {self.blocks} blocks = {free} free + {self.held} held"
                + (f" + {self.unpublished} unpublished" if self.unpublished else "")
                + (f" + {self.lost} LOST" if self.lost else ""))


@dataclass
class Finding:
    kind: str  # dead-process, dead-reader, leak, lost-block, inconsistent, unreadable-segment
    message: str
    fix: str
    pid: int | None = None
    references: int = 0  # the references involved
    buffers: list[int] = field(default_factory=list)  # ids of the buffers involved


@dataclass
class DoctorReport:
    domain: str
    prefix: str
    control_path: str
    processes: list[ProcessInfo]
    queues: list[QueueInfo]
    buffers: list[BufferInfo]
    findings: list[Finding]
    pools: list[PoolInfo] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        for b in out["buffers"]:
            b["id_hex"] = f"{b['id']:#x}"
        return out

    def format(self) -> str:
        lines = [f"mq doctor: domain {self.domain!r} ({self.control_path})"]
        lines.append(f"processes ({len(self.processes)} registered):")
        if self.processes:
            lines.append(f"  {'slot':>4}  {'pid':>8}  {'name':<20} {'state':<9} {'refs':>6} {'buffers':>8}")
        for p in self.processes:
            state = ("alive" if p.alive else "DEAD") + (" (reaping)" if p.state == "reaping" else "")
            lines.append(f"  {p.slot:>4}  {p.pid:>8}  {p.name[:20]:<20} {state:<9} {p.references:>6} "
                         f"{p.buffers:>8}" + (f"  +{p.unpublished} unpublished" if p.unpublished else ""))
        lines.append(f"queues ({len(self.queues)}):")
        for q in self.queues:
            lines.append(f"  {q.name}: capacity {q.capacity}, {q.pushed} pushed, {q.closed}, "
                         f"{len(q.readers)} reader(s)")
            for r in q.readers:
                who = f"pid {r.pid}" + (f" {r.name!r}" if r.name else "")
                lines.append(f"    reader {r.index}: {who}, {'alive' if r.alive else 'DEAD'}, {r.policy}, "
                             f"{r.unread} unread")
        lines.append(f"pools ({len(self.pools)}):")
        lines.extend(f"  {p.describe()}" for p in self.pools)
        lines.append(f"held buffers ({len(self.buffers)}):")
        if self.buffers:
            lines.append(f"  {'id':<20}{'pool':<12}{'size/capacity':>16}{'refs':>6}  "
                         f"{'holder':<52}{'count':>6}")
        for b in self.buffers:
            size = f"{'-' if b.size is None else b.size}/{b.capacity}"
            rows = [(h.describe(), h.count) for h in b.holders]
            if b.unpublished:
                rows = [(f"{d} took it, never published", c) for d, c in rows]
            if b.leftover > 0:
                rows.append(("UNACCOUNTED (leak)", b.leftover))
            elif b.leftover < 0:
                rows.append(("OVERCOUNTED (inconsistent)", b.leftover))
            rows = rows or [("-", 0)]
            head = f"  {b.id:<#20x}{b.pool[:11]:<12}{size:>16}{b.ref_count:>6}  "
            for i, (desc, count) in enumerate(rows):
                lines.append((head if i == 0 else " " * len(head)) + f"{desc:<52}{count:>6}")
        if self.ok:
            lines.append("no problems found: every reference and every block is accounted for and every "
                         "holder is alive")
        else:
            lines.append(f"findings ({len(self.findings)}):")
            for f in self.findings:
                lines.append(f"  {f.kind.upper()}: {f.message}")
                lines.append(f"    fix: {f.fix}")
        return "\n".join(lines)


# ---------------------------------------------------------------------- diagnose


def diagnose(domain: str, name_prefix: str = DEFAULT_PREFIX) -> DoctorReport:
    """Explain every held buffer of ``domain``: its holders, whether they live, leaks.

    Reads the shared memory only (nothing is registered, reaped or changed).  Raises
    SegmentError if the domain does not exist or its control segment is unusable.
    """
    check_domain(domain)
    check_prefix(name_prefix)
    control_path = segment_path(name_prefix, domain, "ctl")
    control = _open_readonly(control_path, L.MAGIC_CONTROL, L.KIND_CONTROL, domain, name_prefix)
    queue_maps: list[tuple[str, str, mmap.mmap]] = []
    unreadable: list[Finding] = []
    try:
        queue_start = segment_path(name_prefix, domain, "q.")
        for path in domain_segments(name_prefix, domain):
            name = path[len(queue_start):]
            if not path.startswith(queue_start) or not name or "." in name:  # "." : a temporary
                continue
            try:
                queue_maps.append((name, path, _open_readonly(path, MAGIC_QUEUE, KIND_QUEUE, domain,
                                                              name_prefix)))
            except SegmentError as e:
                if os.path.exists(path):  # else removed meanwhile: nothing to say
                    unreadable.append(Finding(
                        "unreadable-segment", f"queue segment {path} cannot be read: {e}",
                        f"if no process uses queue {name!r} any more, remove {path}"))
        analysis = _analyze(_snapshot(control, queue_maps, control_path))
        persistent = set(analysis.anomalies)
        for _ in range(_SNAPSHOTS - 1):
            if not persistent:
                break
            analysis = _analyze(_snapshot(control, queue_maps, control_path))
            persistent &= set(analysis.anomalies)
        return _report(domain, name_prefix, control_path, analysis, persistent, unreadable)
    finally:
        for _name, _path, mm in queue_maps:
            mm.close()
        control.close()


# ---------------------------------------------------------------------- internals


def _open_readonly(path: str, magic: int, kind: int, domain: str, prefix: str) -> mmap.mmap:
    """Map a segment read-only after the checks open_segment makes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if kind == L.KIND_CONTROL:
            others = domain_segments(prefix, domain)
            hint = (f"; its other segments are left over ({', '.join(others)}): remove them with "
                    f"`mq cleanup {domain}`" if others else "")
            raise SegmentError(errno.ENOENT, f"domain {domain!r} does not exist (no {path}){hint}") from None
        raise SegmentError(errno.ENOENT, f"segment {path} does not exist") from None
    except PermissionError:
        raise SegmentError(errno.EACCES, f"permission denied reading segment {path}: it belongs to "
                           "another user (segments are created owner-only); run as that user") from None
    try:
        size = os.fstat(fd).st_size
        if size < C.sizeof(L.SegmentHeader):
            raise SegmentError(errno.EINVAL, f"segment {path} is truncated ({size} bytes)")
        mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    finally:
        os.close(fd)  # the mapping keeps its own reference
    hdr = L.SegmentHeader.from_buffer_copy(mm, 0)
    problem = None
    if hdr.magic != magic or hdr.kind != kind:
        problem = SegmentError(errno.EINVAL, f"segment {path} is not a multiqueue segment of the "
                               f"expected kind (magic {hdr.magic:#x} kind {hdr.kind})")
    elif hdr.version != L.LAYOUT_VERSION:
        problem = SegmentVersionError(errno.EINVAL, f"segment {path} has layout version {hdr.version}, "
                                      f"this multiqueue reads version {L.LAYOUT_VERSION}")
    elif hdr.total_size != size:
        problem = SegmentError(errno.EINVAL, f"segment {path} is truncated: header says "
                               f"{hdr.total_size} bytes, file has {size}")
    if problem is not None:
        mm.close()
        raise problem
    return mm


@dataclass
class _QueueSnap:
    name: str
    path: str
    header: QueueHeader
    readers: list[tuple[int, ReaderRecord]]  # the active ones
    ring: np.ndarray  # item ids


@dataclass
class _Snap:
    ctl: L.Control
    procs: list[tuple[int, L.Process]]  # the registered ones
    pools: C.Array
    states: np.ndarray  # state word per used slot
    rows: dict[int, np.ndarray]  # process slot -> its ledger row (used slots)
    queues: list[_QueueSnap]
    control: mmap.mmap  # the mapping, to read the entries of held slots
    taken_ns: int
    free: dict[int, list[int] | None]  # active pool id -> slots in its free list (None: busy)


def _snapshot(control: mmap.mmap, queues: list[tuple[str, str, mmap.mmap]], control_path: str) -> _Snap:
    ctl = L.Control.from_buffer_copy(control, 0)
    n_procs, n_pools, n_bufs, used = ctl.max_processes, ctl.max_pools, ctl.max_buffers, ctl.slots_used
    problem = L.control_problem(ctl, len(control))
    if problem is not None:
        raise SegmentError(errno.EINVAL, f"the control segment {control_path} is corrupt: {problem}")
    procs = (L.Process * n_procs).from_buffer_copy(control, ctl.procs_offset)
    pools = (L.Pool * n_pools).from_buffer_copy(control, ctl.pools_offset)
    states = np.frombuffer(control, np.uint64, used * L.ENTRY_WORDS, ctl.meta_offset)[::L.ENTRY_WORDS].copy()
    registered = [(s, p) for s, p in enumerate(procs) if p.state != L.PROC_FREE]
    rows = {s: np.frombuffer(control, np.uint64, used, ctl.ledger_offset + s * n_bufs * 8).copy()
            for s, _p in registered}
    snaps = []
    for name, path, mm in queues:
        h = QueueHeader.from_buffer_copy(mm, 0)
        readers_at = C.sizeof(QueueHeader)
        ring_at = readers_at + h.max_readers * C.sizeof(ReaderRecord)
        if (h.capacity == 0 or h.capacity & (h.capacity - 1) or h.mask != h.capacity - 1
                or not 0 < h.max_readers <= 1024 or h.readers_hw > h.max_readers
                or ring_at + h.capacity * C.sizeof(Item) > len(mm)):
            continue  # corrupt: _report cannot say more than open_segment would
        records = (ReaderRecord * h.readers_hw).from_buffer_copy(mm, readers_at)
        ring = np.frombuffer(mm, np.uint64, h.capacity * _ITEM_WORDS, ring_at)[::_ITEM_WORDS].copy()
        active = [(i, r) for i, r in enumerate(records) if r.state == _READER_ACTIVE]
        snaps.append(_QueueSnap(name, path, h, active, ring))
    active = [i for i, p in enumerate(pools) if p.state in (L.POOL_ACTIVE, L.POOL_REMOVING)]
    return _Snap(ctl, registered, pools, states, rows, snaps, control, time.monotonic_ns(),
                 _free_lists(control, ctl, active))


def _free_lists(control: mmap.mmap, ctl: L.Control, pool_ids: list[int]) -> dict[int, list[int] | None]:
    """The slots in each pool's free list, read without locks.

    The head word carries a tag that changes on every push and pop, so a list whose
    head reads the same before and after the links were copied did not change in
    between: the walk is of one consistent list.  A pool that never stands still for
    _WALK_TRIES attempts is reported as busy (None).  A walk that leaves the table or
    loops returns what it saw plus -1, which the analysis reports as corrupt.
    """
    heads = np.frombuffer(control, np.uint64, ctl.max_pools * _HEAD_WORD, ctl.pools_offset)[::_HEAD_WORD]
    used = ctl.slots_used
    result: dict[int, list[int] | None] = {p: None for p in pool_ids}
    for _ in range(_WALK_TRIES):
        pending = [p for p in pool_ids if result[p] is None]
        if not pending:
            break
        before = heads[pending].copy()
        links = np.frombuffer(control, np.uint32, used * L.ENTRY_WORDS * 2, ctl.meta_offset)
        links = links[_NEXT_FREE::L.ENTRY_WORDS * 2].copy()
        after = heads[pending].copy()
        for pool_id, head, again in zip(pending, before.tolist(), after.tolist(), strict=True):
            if head == again:
                result[pool_id] = _walk(head & _MASK32, links)
    return result


def _walk(top: int, links: np.ndarray) -> list[int]:
    slots: list[int] = []
    seen: set[int] = set()
    while top:
        slot = top - 1
        if slot >= len(links) or slot in seen:
            return slots + [-1]
        seen.add(slot)
        slots.append(slot)
        top = int(links[slot])
    return slots


@dataclass
class _Analysis:
    snap: _Snap
    processes: list[ProcessInfo]
    queues: list[QueueInfo]
    buffers: dict[int, BufferInfo]  # slot -> buffer
    # anomalies, keyed so that one persisting across snapshots has the same key:
    # ("leftover", slot, state word, leftover), ("stale-ledger", proc slot, slot, word, state word),
    # ("stale-item", queue, reader, id, state word)
    anomalies: dict[tuple, str]
    pools: list[PoolInfo]


def _analyze(snap: _Snap) -> _Analysis:
    used = len(snap.states)
    gens = (snap.states >> np.uint64(32)).astype(np.int64)
    refs = (snap.states & np.uint64(_MASK32)).astype(np.int64)
    buffers: dict[int, BufferInfo] = {}
    anomalies: dict[tuple, str] = {}
    names = {s: p.name.decode(errors="replace") for s, p in snap.procs}
    pids = {s: p.pid for s, p in snap.procs}
    alive = {s: is_alive(p.pid, p.start_time) for s, p in snap.procs}

    def buffer(slot: int, gen: int, unpublished: bool = False) -> BufferInfo:
        if slot not in buffers:
            e = L.Entry.from_buffer_copy(snap.control, snap.ctl.meta_offset + slot * C.sizeof(L.Entry))
            pool = snap.pools[e.pool_id] if e.pool_id < len(snap.pools) else None
            buffers[slot] = BufferInfo(
                id=(gen << 32) | slot, slot=slot, generation=gen,
                pool=pool.name.decode(errors="replace") if pool is not None else f"#{e.pool_id}",
                pool_id=e.pool_id, size=None if unpublished else e.size,
                capacity=pool.block_size if pool is not None else 0,
                ref_count=0 if unpublished else int(refs[slot]),
                creator_pid=0 if unpublished else e.creator_pid,
                age_s=None if unpublished or not e.alloc_time_ns else (snap.taken_ns - e.alloc_time_ns) / 1e9,
                unpublished=unpublished)
        return buffers[slot]

    for slot in np.flatnonzero(refs > 0).tolist():
        buffer(slot, int(gens[slot]))

    processes = []
    allocating: set[int] = set()  # slots live processes are publishing right now
    for s, p in snap.procs:
        row = snap.rows[s]
        counts = (row & np.uint64(_MASK32)).astype(np.int64)
        row_gens = (row >> np.uint64(32)).astype(np.int64)
        total = n_buffers = n_unpublished = 0
        for slot in np.flatnonzero(counts > 0).tolist():
            gen, count = int(row_gens[slot]), int(counts[slot])
            holder = Holder("process", p.pid, alive[s], count, names[s], proc_slot=s)
            if gen == gens[slot] and refs[slot] > 0:
                buffer(slot, gen).holders.append(holder)
                total += count
                n_buffers += 1
            elif refs[slot] == 0 and int(gens[slot]) in ((gen - 1,) if gen > 1 else (_MASK32, 0)):
                # popped but not published: a live process is allocating it right now
                if not alive[s]:
                    buffer(slot, gen, unpublished=True).holders.append(holder)
                    n_unpublished += 1
                else:
                    allocating.add(slot)
            elif alive[s]:  # a dead process's stale words are dropped harmlessly when it is reaped
                anomalies[("stale-ledger", s, slot, int(row[slot]), int(snap.states[slot]))] = (
                    f"process {p.pid} {names[s]!r} records {count} reference(s) of buffer "
                    f"{(gen << 32) | slot:#x}, but slot {slot} is at generation {int(gens[slot])} "
                    f"with {int(refs[slot])} reference(s)")
        processes.append(ProcessInfo(
            s, p.pid, names[s], "reaping" if p.state == L.PROC_REAPING else "registered", alive[s], total,
            n_buffers, n_unpublished, (snap.taken_ns - p.heartbeat_ns) / 1e9 if p.heartbeat_ns else 0.0))

    queues = []
    for q in snap.queues:
        h = q.header
        closed = ("open", "closed", "abandoned")[min(h.closed, 2)]
        info = QueueInfo(q.name, q.path, h.capacity, h.pushed, closed)
        for index, r in q.readers:
            low = max(r.cursor, h.head - h.capacity)
            held: dict[int, int] = {}
            for seq in range(low, max(low, h.head)):
                buffer_id = int(q.ring[seq & h.mask])
                held[buffer_id] = held.get(buffer_id, 0) + 1
            owner = r.proc if pids.get(r.proc) == r.pid else None  # else its slot was reused
            name = names.get(owner, "")
            reader_alive = is_alive(r.pid, r.start_time)
            info.readers.append(ReaderInfo(index, r.pid, name, reader_alive,
                                           "drop_oldest" if r.policy else "block", sum(held.values())))
            for buffer_id, count in held.items():
                slot, gen = buffer_id & _MASK32, buffer_id >> 32
                if slot < used and gen == gens[slot] and refs[slot] > 0:
                    buffer(slot, gen).holders.append(Holder("queue", r.pid, reader_alive, count, name,
                                                            proc_slot=owner, queue=q.name, reader=index))
                else:
                    state = int(snap.states[slot]) if slot < used else -1
                    anomalies[("stale-item", q.name, index, buffer_id, state)] = (
                        f"reader {index} of queue {q.name!r} has {count} unread item(s) of buffer "
                        f"{buffer_id:#x}, which is no longer valid (freed or reused)")
        queues.append(info)

    for slot, b in buffers.items():
        if b.unpublished:
            continue
        b.leftover = b.ref_count - b.accounted
        if b.leftover:
            anomalies[("leftover", slot, int(snap.states[slot]), b.leftover)] = ""
    pools = [_account_pool(snap, pool_id, refs, buffers, allocating, anomalies) for pool_id in snap.free]
    return _Analysis(snap, processes, queues, dict(sorted(buffers.items())), anomalies, pools)


def _account_pool(snap: _Snap, pool_id: int, refs: np.ndarray, buffers: dict[int, BufferInfo],
                  allocating: set[int], anomalies: dict[tuple, str]) -> PoolInfo:
    """Put every block of a pool in one place: free, held, unpublished or (else) lost.

    Lost blocks and blocks both free and held become anomalies (reported when they
    persist): a lost block is one a process took from the free list and was killed
    before recording it in its ledger (docs/shm.md), or a sign of corruption."""
    rec = snap.pools[pool_id]
    name = rec.name.decode(errors="replace")
    slots = [first for c in rec.chunks[: min(rec.n_chunks, L.MAX_CHUNKS)]
             for first in range(c.first_slot, min(c.first_slot + c.count, len(refs)))]
    info = PoolInfo(name, pool_id, len(slots), None, 0, 0, 0)
    free_list = snap.free[pool_id]
    for slot in slots:
        if refs[slot] > 0:
            info.held += 1
        elif slot in buffers and buffers[slot].unpublished:
            info.unpublished += 1
    if free_list is None:
        return info
    free = set(free_list)
    info.free = len(free - {-1})
    if -1 in free or not free <= set(slots):
        anomalies[("free-list", pool_id, tuple(free_list))] = (
            f"the free list of pool {name!r} loops or leaves the pool's slots")
    for slot in free & set(slots):
        if refs[slot] > 0:
            anomalies[("free-and-held", slot, int(snap.states[slot]))] = (
                f"block slot {slot} of pool {name!r} is in the free list but has {int(refs[slot])} "
                "reference(s)")
    for slot in slots:
        if slot not in free and refs[slot] == 0 and slot not in buffers and slot not in allocating:
            anomalies[("lost-block", pool_id, slot, int(snap.states[slot]))] = ""
    return info


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _report(domain: str, prefix: str, control_path: str, a: _Analysis, persistent: set,
            unreadable: list[Finding]) -> DoctorReport:
    findings: list[Finding] = []
    any_alive = any(p.alive for p in a.processes)
    cleanup = f"`mq cleanup {domain}`"
    if any_alive:
        reap_how = (f"call ShmManager.reap() in any process attached to {domain!r} (every manager with a "
                    "reaper_interval does it on its own within that interval) or attach a new "
                    "ShmManager to it (attaching reaps)")
    else:
        reap_how = (f"no process of {domain!r} is alive: run {cleanup} to remove the stale domain, or "
                    "attach a ShmManager to it (attaching reaps the dead and reuses the domain)")

    for p in a.processes:
        if p.alive:
            continue
        ids = [b.id for b in a.buffers.values() if any(h.kind == "process" and h.proc_slot == p.slot
                                                        for h in b.holders)]
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
            f"{reap_how}: that {', '.join(releases[:-1]) + ' and ' if releases[:-1] else ''}{releases[-1]}",
            pid=p.pid, references=p.references, buffers=ids))

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
                fix = f"no process of {domain!r} is alive: run {cleanup} to remove the stale domain"
            findings.append(Finding(
                "dead-reader",
                f"reader {r.index} ({r.policy}) of queue {q.name!r} belongs to dead process {r.pid}; it "
                f"holds {_plural(r.unread, 'unread item')} (one reference each)"
                + ("; its full ring blocks the producer" if blocking else ""),
                fix, pid=r.pid, references=r.unread, buffers=ids))

    for b in a.buffers.values():
        key = ("leftover", b.slot, (b.generation << 32) | b.ref_count, b.leftover)
        if not b.leftover or key not in persistent:
            continue
        held = f"{b.accounted} held by {_plural(len(b.holders), 'holder')}" if b.holders else "no holder"
        if b.leftover > 0:
            findings.append(Finding(
                "leak",
                f"buffer {b.id:#x} (pool {b.pool!r}, slot {b.slot}) has {b.ref_count} reference(s), "
                f"{held}: {_plural(b.leftover, 'reference')} nobody accounts for (a process was "
                "probably killed inside the one-instruction window of a get/share or release, "
                "see docs/shm.md)",
                f"a leaked reference cannot be released while the domain lives: the block stays in use "
                f"(pool {b.pool!r} has one block less) until every process of {domain!r} stops and "
                f"{cleanup} removes the domain; harmless unless it recurs",
                references=b.leftover, buffers=[b.id]))
        else:
            findings.append(Finding(
                "inconsistent",
                f"buffer {b.id:#x} (pool {b.pool!r}, slot {b.slot}) has {b.ref_count} reference(s) but "
                f"its holders account for {b.accounted}: {_plural(-b.leftover, 'reference')} too many",
                f"the shared state is inconsistent (a bug, or the memory was written by something else): "
                f"the last release will fail with InvalidBufferError; stop the processes of {domain!r}, "
                f"run {cleanup} and report it",
                references=-b.leftover, buffers=[b.id]))

    findings.extend(_lost_blocks(domain, a, persistent))
    for key, message in a.anomalies.items():
        if key[0] in ("leftover", "lost-block") or key not in persistent:
            continue
        findings.append(Finding(
            "inconsistent", message,
            f"the shared state is inconsistent (a bug, or the memory was written by something else): stop "
            f"the processes of {domain!r}, run {cleanup} and report it"))

    findings.extend(unreadable)
    return DoctorReport(domain, prefix, control_path, a.processes, a.queues, list(a.buffers.values()),
                        findings, a.pools)


def _lost_blocks(domain: str, a: _Analysis, persistent: set) -> list[Finding]:
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
