"""Domain inspection: the one reader of the raw layouts of this machine's domains.

Segments are mapped read-only (``PROT_READ``): looking registers, reaps and changes
nothing.  ``mq ls / stats / top / clean / param`` and the doctor read through here.
"""

import ctypes
import errno
import mmap
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import MultiQueueError, SegmentError, SegmentVersionError
from ..graph import registry as R
from ..graph.stats import graph_stats
from ..shm import ShmManager
from ..shm import layout as L
from ..shm.segment import (
    SHM_DIR,
    DomainLock,
    check_domain,
    domain_segments,
    is_alive,
    mapped_by,
    segment_path,
)
from ..stream.queue import Item, PortQueue, QueueHeader, QueueStats, ReaderRecord

STARTING_S = 10.0  # a domain with no process yet whose creator lives is being created for this long
MASK32 = 0xFFFFFFFF  # a state or ledger word is generation << 32 | count
_ITEM_WORDS = ctypes.sizeof(Item) // 8  # an item is (id, timestamp)
_READER_ACTIVE = 1
_WALK_TRIES = 5  # attempts at reading a busy pool's free list while it stands still
_HEAD_WORD = ctypes.sizeof(L.Pool) // 8  # u64 words per pool record; the head is the first
_NEXT_FREE = L.Entry.next_free.offset // 4  # u32 index of next_free inside an entry


def error_text(e: BaseException) -> str:
    """An error's text without the "[Errno N]" an OSError-based error puts in front."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


# -- segments, mapped read-only ------------------------------------------------------------


class ReadOnlySegment:
    """A segment mapped ``PROT_READ`` after the checks ``open_segment`` makes (magic,
    kind, layout version, size).  ``lock()`` takes the domain lock on it (flock works on
    a read-only descriptor), for a consistent read of a table that registrations change."""

    def __init__(self, path: str, magic: int, kind: int):
        self.path = path
        self.fd = _open_readonly(path)
        try:
            size = os.fstat(self.fd).st_size
            if size < ctypes.sizeof(L.SegmentHeader):
                raise SegmentError(errno.EINVAL, f"segment {path} is truncated ({size} bytes)")
            self.mmap = mmap.mmap(self.fd, size, prot=mmap.PROT_READ)
            self.header = L.SegmentHeader.from_buffer_copy(self.mmap, 0)
            _check_header(path, self.header, size, magic, kind)
        except BaseException:
            self.close()
            raise

    def lock(self) -> DomainLock:
        return DomainLock(self.fd)

    def close(self) -> None:
        if getattr(self, "mmap", None) is not None:
            try:
                self.mmap.close()
            except BufferError:
                pass  # numpy views of it are still alive: it is unmapped when they go
            self.mmap = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "ReadOnlySegment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_readonly(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(errno.ENOENT, f"segment {path} does not exist") from None
    except PermissionError:
        raise SegmentError(errno.EACCES, f"permission denied reading segment {path}: it belongs to "
                           "another user (segments are created owner-only); run as that user") from None


def _check_header(path: str, header: L.SegmentHeader, size: int, magic: int, kind: int) -> None:
    """The checks (and words) of shm.segment.open_segment, for a read-only mapping."""
    if header.magic != magic or header.kind != kind:
        raise SegmentError(errno.EINVAL, f"segment {path} is not a multiqueue segment of the expected "
                           f"kind: it has magic {header.magic:#x} kind {header.kind}, expected magic "
                           f"{magic:#x} kind {kind}; remove it if it is stale")
    if header.version != L.LAYOUT_VERSION:
        raise SegmentVersionError(errno.EINVAL, f"segment {path} has layout version {header.version} but "
                                  f"this multiqueue uses version {L.LAYOUT_VERSION}; stop the processes of "
                                  "the other version and remove the domain (ShmManager.cleanup) before "
                                  "reusing its name")
    if header.total_size != size:
        raise SegmentError(errno.EINVAL, f"segment {path} is truncated: header says {header.total_size} "
                           f"bytes, file has {size}")


def segment_header(path: str) -> L.SegmentHeader | None:
    """The segment header of a file, read without checking it (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            data = f.read(ctypes.sizeof(L.SegmentHeader))
    except OSError:
        return None
    return L.SegmentHeader.from_buffer_copy(data) if len(data) == ctypes.sizeof(L.SegmentHeader) else None


# -- what is under /dev/shm ---------------------------------------------------------------


def domain_names(prefix: str) -> list[str]:
    """Every domain with a segment under /dev/shm."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    found = set()
    for name in names:
        if name.startswith(prefix) and "." in name[len(prefix):]:
            domain = name[len(prefix):].split(".", 1)[0]
            try:
                found.add(check_domain(domain))
            except ValueError:
                pass
    return sorted(found)


def queue_segments(prefix: str, domain: str) -> dict[str, str]:
    """The port queues of a domain under /dev/shm: name -> path.  A queue name has no
    ".", so a name with one is a segment being built (``<name>.tmp-<pid>-<random>``)."""
    start = segment_path(prefix, domain, "q.")
    return {path[len(start):]: path for path in domain_segments(prefix, domain)
            if path.startswith(start) and path[len(start):] and "." not in path[len(start):]}


def live_creators(paths: list[str]) -> list[int]:
    """Pids of live processes that created (or are creating) some of these segments."""
    pids = set()
    for path in paths:
        base = os.path.basename(path)
        if ".tmp-" in base:  # a segment being built: <name>.tmp-<pid>-<random>
            pid = base.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
                pids.add(int(pid))
            continue
        header = segment_header(path)
        if header is not None and is_alive(header.creator_pid, header.creator_start):
            pids.add(header.creator_pid)
    return sorted(pids)


def _total_size(paths: list[str]) -> int:
    size = 0
    for path in paths:
        try:
            size += os.stat(path).st_size
        except FileNotFoundError:
            pass
    return size


def _owners(paths: list[str]) -> set[int]:
    owners = set()
    for path in paths:
        try:
            owners.add(os.stat(path).st_uid)
        except FileNotFoundError:
            pass
    return owners


# -- the control segment's tables ---------------------------------------------------------


@dataclass
class ControlTables:
    """Copies of a control segment's header, registered processes and pool records."""

    control: L.Control
    processes: list[tuple[int, L.Process]]  # (slot, record) of the registered ones
    pools: ctypes.Array  # every pool record, by pool id


def read_control_tables(buffer, path: str) -> ControlTables:
    """Copy the tables of a control segment (mapped at ``buffer``); SegmentError if its
    header is corrupt (a table would lie outside the segment)."""
    control = L.Control.from_buffer_copy(buffer, 0)
    problem = L.control_problem(control, len(buffer))
    if problem is not None:
        raise SegmentError(errno.EINVAL, f"the control segment {path} is corrupt: {problem}")
    processes = (L.Process * control.max_processes).from_buffer_copy(buffer, control.procs_offset)
    pools = (L.Pool * control.max_pools).from_buffer_copy(buffer, control.pools_offset)
    registered = [(slot, p) for slot, p in enumerate(processes) if p.state != L.PROC_FREE]
    return ControlTables(control, registered, pools)


def split_words(words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """State or ledger words -> (generations, counts), as int64 arrays."""
    return (words >> np.uint64(32)).astype(np.int64), (words & np.uint64(MASK32)).astype(np.int64)


# -- a domain at a glance (mq ls, mq clean) -----------------------------------------------


@dataclass
class DomainInfo:
    """What a domain is, read from its segments without attaching to it.

    state: "live" (a registered process is alive), "dead" (none is: removable),
    "starting" (being created), "stale" (segments without a control segment, their
    creators dead: removable), "unreadable" (segments of another user, or a control
    segment this version cannot read whose segments are in use)."""

    domain: str
    state: str = ""
    reason: str = ""
    processes: list[dict] = field(default_factory=list)  # slot, pid, name, alive
    pools: list[dict] = field(default_factory=list)  # name, block_size, blocks, used
    graph: dict | None = None  # state, pid, blocks
    segments: list[str] = field(default_factory=list)
    bytes: int = 0  # the size of its segments

    def to_json(self) -> dict:
        return asdict(self)


def inspect_domain(prefix: str, domain: str) -> DomainInfo:
    """What ``domain`` is; a domain that changes under our feet (or anything odd) is
    reported "unreadable" with the reason, never raised."""
    try:
        return _inspect(prefix, domain)
    except (OSError, ValueError, MultiQueueError) as e:
        return DomainInfo(domain, "unreadable", error_text(e), segments=domain_segments(prefix, domain))


def _inspect(prefix: str, domain: str) -> DomainInfo:
    paths = domain_segments(prefix, domain)
    info = DomainInfo(domain, segments=paths, bytes=_total_size(paths))
    owners = _owners(paths)
    if os.getuid() != 0 and owners - {os.getuid()}:
        info.state = "unreadable"
        info.reason = f"its segments belong to another user (uid {', '.join(map(str, sorted(owners)))})"
        return info
    control_path = segment_path(prefix, domain, "ctl")
    if control_path not in paths:
        return _judge_without_control(info, paths)
    try:
        with ReadOnlySegment(control_path, L.MAGIC_CONTROL, L.KIND_CONTROL) as control:
            _read_registry(info, control)
            _judge_by_processes(info, control.header)
    except SegmentError as e:  # another layout version, not ours, or corrupt tables: its process table
        users = mapped_by(paths)  # cannot be read, so the processes that map its segments tell whether
        info.state = "unreadable" if users else "stale"  # it is in use
        info.reason = error_text(e) + (f" (mapped by pid {', '.join(map(str, users))})" if users
                                       else " (no process maps its segments)")
        return info
    info.graph = _graph_summary(prefix, domain, paths)
    return info


def _judge_without_control(info: DomainInfo, paths: list[str]) -> DomainInfo:
    creators = live_creators(paths) or mapped_by(paths)
    if creators:
        info.state = "starting"
        info.reason = f"no control segment (yet); used by pid {', '.join(map(str, creators))}"
    else:
        info.state = "stale"
        info.reason = "segments without a control segment, left by dead processes"
    return info


def _read_registry(info: DomainInfo, control: ReadOnlySegment) -> None:
    with control.lock():  # nobody registers or leaves while the tables are copied
        tables = read_control_tables(control.mmap, control.path)
    info.processes = [{"slot": slot, "pid": p.pid, "name": p.name.decode(errors="replace"),
                       "alive": is_alive(p.pid, p.start_time)} for slot, p in tables.processes]
    info.pools = [{"name": p.name.decode(errors="replace"), "block_size": p.block_size,
                   "blocks": p.block_count, "used": p.used} for p in tables.pools if p.state == L.POOL_ACTIVE]


def _judge_by_processes(info: DomainInfo, header: L.SegmentHeader) -> None:
    live = [p for p in info.processes if p["alive"]]
    age_s = (time.time_ns() - header.created_ns) / 1e9
    if live:
        info.state = "live"
        names = ", ".join(f"{p['name']} (pid {p['pid']})" for p in live)
        info.reason = f"still has live processes {names}; stop them first"
    elif not info.processes and is_alive(header.creator_pid, header.creator_start) and age_s < STARTING_S:
        info.state = "starting"
        info.reason = f"created {age_s:.1f} s ago by pid {header.creator_pid}, which has not registered yet"
    else:
        info.state = "dead"
        n = len(info.processes)
        info.reason = f"all {n} registered process(es) are dead" if n else "no process is registered"


def _graph_summary(prefix: str, domain: str, paths: list[str]) -> dict | None:
    path = segment_path(prefix, domain, "graph")
    if path not in paths:
        return None
    try:
        segment = ReadOnlySegment(path, R.MAGIC_GRAPH, R.KIND_GRAPH)
    except SegmentError:
        return None
    running = is_alive(segment.header.creator_pid, segment.header.creator_start)
    pid = segment.header.creator_pid
    try:
        graph = R.GraphSegment(segment)
    except (ValueError, OverflowError):  # garbage tables or description: no summary of a damaged graph
        segment.close()
        return None
    try:
        return {"state": "running" if running else "stale", "pid": pid,
                "blocks": [b["name"] for b in graph.description["blocks"]]}
    except (KeyError, TypeError):
        return None
    finally:
        graph.close()


# -- a domain we are attached to (mq stats, top, param, pub...) ---------------------------


class QueueWatcher:
    """Every port queue of a domain, opened for its stats and kept in step with /dev/shm."""

    def __init__(self, manager: ShmManager):
        self.manager = manager
        self.open: dict[str, tuple[int, PortQueue]] = {}  # name -> (inode, queue)

    def stats(self) -> dict[str, QueueStats]:
        """name -> QueueStats of every queue that exists now."""
        inodes = {}
        for name, path in queue_segments(self.manager.prefix, self.manager.domain).items():
            try:
                inodes[name] = os.stat(path).st_ino
            except FileNotFoundError:
                pass
        for name, (ino, queue) in list(self.open.items()):
            if inodes.get(name) != ino:  # removed, or replaced by a new queue of that name
                del self.open[name]
                queue.release()
        for name in sorted(set(inodes) - set(self.open)):
            try:
                self.open[name] = (inodes[name], PortQueue(self.manager, name, create=False))
            except (MultiQueueError, ValueError):
                pass  # removed meanwhile, or not a queue this version can read
        return {name: queue.stats() for name, (_ino, queue) in self.open.items()}

    def close(self) -> None:
        for _ino, queue in self.open.values():
            queue.release()
        self.open.clear()

    def __enter__(self) -> "QueueWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GraphWatcher:
    """The graph segment of a domain (if a graph runs), reopened when a new graph starts."""

    def __init__(self, prefix: str, domain: str):
        self.path = segment_path(prefix, domain, "graph")
        self.segment: R.GraphSegment | None = None
        self.ino: int | None = None
        self.running = False  # is the runtime that made it alive (when it was opened)?

    def get(self) -> R.GraphSegment | None:
        """The GraphSegment now, or None if the domain runs no graph."""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = None
        if ino != self.ino:
            self.close()
            if ino is not None:
                try:
                    segment = ReadOnlySegment(self.path, R.MAGIC_GRAPH, R.KIND_GRAPH)
                except SegmentError:
                    return None
                self.running = is_alive(segment.header.creator_pid, segment.header.creator_start)
                self.segment, self.ino = R.GraphSegment(segment), ino
        return self.segment

    def stats(self, queue_stats: dict[str, QueueStats]) -> dict | None:
        """The graph's blocks and edges as data (None if no graph runs)."""
        graph = self.get()
        if graph is None:
            return None
        stats = graph_stats(graph, queue_stats)
        return {"state": "running" if self.running else "stale",
                "blocks": {name: asdict(b) for name, b in stats.blocks.items()},
                "edges": [asdict(e) for e in stats.edges]}

    def block_names(self) -> list[str]:
        graph = self.get()
        return [] if graph is None else [b["name"] for b in graph.description["blocks"]]

    def block_state(self, name: str) -> str:
        """The state of a block of the graph (KeyError: no such block, or no graph)."""
        graph = self.get()
        if graph is None:
            raise KeyError(name)
        return R.STATES[graph.block_rows[graph.block_index(name)][R.STATE]]

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
        self.segment = self.ino = None

    def __enter__(self) -> "GraphWatcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bus_queue_name(topic: str) -> str:
    """The port queue of a bus topic: control.bus names it so (it has no public name for it)."""
    return f"b-{topic}"


def topic_has_queue(manager: ShmManager, topic: str) -> bool:
    """Did anyone ever subscribe to ``topic`` in the domain (does its queue exist)?"""
    return os.path.exists(segment_path(manager.prefix, manager.domain, "q." + bus_queue_name(topic)))


def topic_subscribers(manager: ShmManager, topic: str) -> int:
    """Live subscribers of a bus topic now (0 if nobody ever subscribed to it)."""
    try:
        queue = PortQueue(manager, bus_queue_name(topic), create=False)
    except (MultiQueueError, ValueError):
        return 0
    try:
        return sum(r.alive for r in queue.stats().readers)
    finally:
        queue.release()


# -- a lock-free snapshot of the holdings of every buffer (the doctor) --------------------


@dataclass
class QueueSnapshot:
    name: str
    path: str
    header: QueueHeader
    readers: list[tuple[int, ReaderRecord]]  # (index, record) of the active ones
    ring: np.ndarray  # item ids


@dataclass
class DomainSnapshot:
    """Copies of the words that say who holds what, taken without locks."""

    tables: ControlTables
    states: np.ndarray  # state word per used metadata slot
    ledger_rows: dict[int, np.ndarray]  # process slot -> its ledger row (used slots)
    queues: list[QueueSnapshot]
    free_lists: dict[int, list[int] | None]  # active pool id -> slots in its free list (None: busy)
    taken_ns: int  # time.monotonic_ns() when it was taken
    control: mmap.mmap  # the mapping itself, to read the entries of held slots

    def entry(self, slot: int) -> L.Entry:
        offset = self.tables.control.meta_offset + slot * ctypes.sizeof(L.Entry)
        return L.Entry.from_buffer_copy(self.control, offset)


def snapshot_domain(control: ReadOnlySegment, queues: dict[str, ReadOnlySegment]) -> DomainSnapshot:
    """Copy the states, ledgers, queue rings and free lists of a domain (``queues``:
    name -> its mapped segment).  A queue whose header is corrupt is left out."""
    tables = read_control_tables(control.mmap, control.path)
    ctl, mm = tables.control, control.mmap
    used = ctl.slots_used
    states = np.frombuffer(mm, np.uint64, used * L.ENTRY_WORDS, ctl.meta_offset)[::L.ENTRY_WORDS].copy()
    rows = {slot: np.frombuffer(mm, np.uint64, used, ctl.ledger_offset + slot * ctl.max_buffers * 8).copy()
            for slot, _p in tables.processes}
    snaps = [s for s in (_snapshot_queue(name, q) for name, q in queues.items()) if s is not None]
    active = [i for i, p in enumerate(tables.pools) if p.state in (L.POOL_ACTIVE, L.POOL_REMOVING)]
    return DomainSnapshot(tables, states, rows, snaps, _free_lists(mm, ctl, active), time.monotonic_ns(), mm)


def _snapshot_queue(name: str, segment: ReadOnlySegment) -> QueueSnapshot | None:
    mm = segment.mmap
    h = QueueHeader.from_buffer_copy(mm, 0)
    readers_at = ctypes.sizeof(QueueHeader)
    ring_at = readers_at + h.max_readers * ctypes.sizeof(ReaderRecord)
    if (h.capacity == 0 or h.capacity & (h.capacity - 1) or h.mask != h.capacity - 1
            or not 0 < h.max_readers <= 1024 or h.readers_hw > h.max_readers
            or ring_at + h.capacity * ctypes.sizeof(Item) > len(mm)):
        return None  # corrupt: nothing more to say than the checks of the mapping did
    records = (ReaderRecord * h.readers_hw).from_buffer_copy(mm, readers_at)
    ring = np.frombuffer(mm, np.uint64, h.capacity * _ITEM_WORDS, ring_at)[::_ITEM_WORDS].copy()
    active = [(i, r) for i, r in enumerate(records) if r.state == _READER_ACTIVE]
    return QueueSnapshot(name, segment.path, h, active, ring)


def _free_lists(control: mmap.mmap, ctl: L.Control, pool_ids: list[int]) -> dict[int, list[int] | None]:
    """The slots in each pool's free list, read without locks.

    The head word carries a tag that changes on every push and pop, so a list whose
    head reads the same before and after the links were copied did not change in
    between: the walk is of one consistent list.  A pool that never stands still for
    _WALK_TRIES attempts is reported as busy (None).  A walk that leaves the table or
    loops returns what it saw plus -1, which the doctor reports as corrupt.
    """
    heads = np.frombuffer(control, np.uint64, ctl.max_pools * _HEAD_WORD, ctl.pools_offset)[::_HEAD_WORD]
    result: dict[int, list[int] | None] = {p: None for p in pool_ids}
    for _ in range(_WALK_TRIES):
        pending = [p for p in pool_ids if result[p] is None]
        if not pending:
            break
        before = heads[pending].copy()
        links = np.frombuffer(control, np.uint32, ctl.slots_used * L.ENTRY_WORDS * 2, ctl.meta_offset)
        links = links[_NEXT_FREE::L.ENTRY_WORDS * 2].copy()
        after = heads[pending].copy()
        for pool_id, head, again in zip(pending, before.tolist(), after.tolist(), strict=True):
            if head == again:
                result[pool_id] = _walk(head & MASK32, links)
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
