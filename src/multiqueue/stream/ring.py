"""A port queue's segment: its layout (header, reader records, items), mirrored from
``_native.c`` with ctypes, and the segment opened or created by name in a domain."""

import ctypes as C
import os
import re
from dataclasses import dataclass

from ..errors import SegmentError
from ..shm import layout as L
from ..shm.segment import (
    create_segment,
    domain_segments,
    is_alive,
    open_segment,
    process_start_time,
    segment_path,
)

MAGIC_QUEUE = int.from_bytes(b"MQQUEUE1", "little")
KIND_QUEUE = 3
LOCK_SLOT_MASK = 0x1FFF  # a lock word is incarnation << 13 | process slot + 1 (_native.c lock_id)
# bits of QueueHeader.flags (reserved0 in _native.c, which never reads it)
FLAG_OUTSIDE_DROP = 1  # a graph's port: a reader that names no policy gets drop_oldest


class QueueHeader(C.Structure):
    _fields_ = [
        ("seg", L.SegmentHeader),
        ("capacity", C.c_uint32),
        ("mask", C.c_uint32),
        ("max_readers", C.c_uint32),
        ("readers_hw", C.c_uint32),
        ("name", C.c_char * 32),
        ("clock", C.c_uint32),
        ("flags", C.c_uint32),  # FLAG_*: Python's; reserved0 in _native.c
        ("reserved", C.c_uint64 * 1),
        ("head", C.c_uint64),
        ("lock", C.c_uint32),
        ("closed", C.c_uint32),
        ("producer", C.c_uint64),
        ("producer_start", C.c_uint64),
        ("pushed", C.c_uint64),
        ("blocked_ns", C.c_uint64),
        ("pad0", C.c_uint64 * 2),
        ("data_event", C.c_uint32),
        ("data_waiters", C.c_uint32),
        ("space_event", C.c_uint32),
        ("space_waiters", C.c_uint32),
        ("pad1", C.c_uint64 * 6),
    ]


class ReaderRecord(C.Structure):
    _fields_ = [
        ("cursor", C.c_uint64),
        ("state", C.c_uint32),
        ("policy", C.c_uint32),
        ("proc", C.c_uint32),
        ("pid", C.c_uint32),
        ("start_time", C.c_uint64),
        ("popped", C.c_uint64),
        ("drops", C.c_uint64),
        ("joined_seq", C.c_uint64),
        ("pad", C.c_uint64 * 1),
    ]


class Item(C.Structure):
    _fields_ = [("id", C.c_uint64), ("timestamp_ns", C.c_int64)]


@dataclass
class ReaderStats:
    index: int
    pid: int
    policy: str
    popped: int
    drops: int
    lag: int  # items pushed but not yet read by this reader
    alive: bool
    name: str = ""  # its process's name in the domain ("" if that process left)


@dataclass
class QueueStats:
    name: str
    capacity: int
    pushed: int
    producer_blocked_s: float
    closed: str  # "open", "closed" or "abandoned"
    readers: list[ReaderStats]


@dataclass
class ReaderTotals:
    """A reader's last counts, read from its record once it was detached: every item
    before ``end`` (a sequence number) it popped, lost (``drops``) or had unread and
    released at the detach (``end - joined - popped - drops`` of them)."""

    popped: int
    drops: int
    end: int


def departed_totals(record: ReaderRecord, pid: int, joined_seq: int) -> ReaderTotals | None:
    """The totals of a detached reader that process ``pid`` joined at ``joined_seq``,
    or None if its record is not that reader's any more (a later join took the slot)."""
    totals = ReaderTotals(record.popped, record.drops, record.cursor)
    if record.state != 0 or record.pid != pid or record.joined_seq != joined_seq:
        return None
    return totals


def unheard_items(header: QueueHeader) -> int:
    """Items pushed while no reader was attached (pushed minus the sequence)."""
    while True:
        head = header.head
        pushed = header.pushed
        if header.head == head:  # else a push came between the two reads: read again
            return max(0, pushed - head)  # a push counts itself just after its item


def live_lock_holder(holder: int, procs, own_slot: int):
    """The process row of the live process that lock word ``holder`` names, or None
    if the lock must be taken away: it names nobody (a stray write; our own slot: our C
    calls never return holding it), or a process that died (its slot perhaps reused)."""
    slot = (holder & LOCK_SLOT_MASK) - 1
    if slot < 0 or slot >= len(procs) or slot == own_slot:
        return None
    proc = procs[slot]
    reused = proc.incarnation & 0x7FFFF != holder >> 13  # the holder died, its slot was reused
    if reused or proc.state == L.PROC_FREE or not is_alive(proc.pid, proc.start_time):
        return None
    return proc


def queue_stats(name: str, h: QueueHeader, records, procs) -> QueueStats:
    """A queue's stats from its header, reader records and the domain's process table."""
    readers = [
        ReaderStats(i, r.pid, "drop_oldest" if r.policy else "block", r.popped, r.drops,
                    h.head - r.cursor, is_alive(r.pid, r.start_time), reader_process_name(procs, r))
        for i, r in enumerate(records[: h.readers_hw]) if r.state == 1
    ]
    return QueueStats(name, h.capacity, h.pushed, h.blocked_ns / 1e9,
                      ("open", "closed", "abandoned")[min(h.closed, 2)], readers)


def reader_process_name(procs, record: ReaderRecord) -> str:
    """The name a reader's process registered in the domain with ("" if it left);
    ``procs``: the domain's process table."""
    if record.proc >= len(procs) or procs[record.proc].pid != record.pid:
        return ""
    return procs[record.proc].name.decode(errors="replace")


L.C_NAMES.update({"mq_queue": QueueHeader, "mq_reader": ReaderRecord, "mq_item": Item})


def reader_records(segment):
    """The reader records of a mapped queue segment (ctypes rows of ReaderRecord)."""
    header = QueueHeader.from_buffer(segment.mmap)
    return (ReaderRecord * header.max_readers).from_buffer(segment.mmap, C.sizeof(QueueHeader))


def open_or_create_ring(manager, name: str, capacity: int, max_readers: int, clock: int, create: bool):
    """The segment of queue ``name`` in the manager's domain, created with this geometry
    if it does not exist and ``create`` is true (else SegmentError)."""
    path = segment_path(manager.prefix, manager.domain, f"q.{name}")
    for _ in range(100):
        try:
            return open_segment(path, MAGIC_QUEUE, KIND_QUEUE)
        except SegmentError:
            if os.path.exists(path):
                raise
            if not create:
                raise SegmentError(2, f"queue {name!r} does not exist in domain {manager.domain!r}") from None

        def init(mm):
            h = QueueHeader.from_buffer(mm)
            h.capacity, h.mask, h.max_readers = capacity, capacity - 1, max_readers
            h.name = name.encode()
            h.clock = clock
            del h

        size = C.sizeof(QueueHeader) + max_readers * C.sizeof(ReaderRecord) + capacity * C.sizeof(Item)
        segment = create_segment(path, L.align(size, L.PAGE), MAGIC_QUEUE, KIND_QUEUE,
                                 C.sizeof(QueueHeader), init, manager.access)
        if segment is not None:
            return segment
    raise SegmentError(0, f"could not create or open queue {name!r}")


def queue_names(manager) -> list[str]:
    """Names of every queue of the manager's domain (port queues and bus topics)."""
    start = segment_path(manager.prefix, manager.domain, "q.")
    return [path[len(start):] for path in domain_segments(manager.prefix, manager.domain)
            if path.startswith(start) and "." not in path[len(start):]]  # "." : a temporary


_NAME_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{L.MAX_NAME}}}$")


def check_queue_name(name) -> None:
    """ValueError unless ``name`` can name a queue."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid queue name {name!r}: 1-{L.MAX_NAME} letters, digits, '_' or '-'")


_START_TIME: list = []


def own_start_time() -> int:
    """This process's start time (cached; a forked child sees its own through the pid)."""
    pid = os.getpid()
    if not _START_TIME or _START_TIME[0] != pid:
        _START_TIME[:] = [pid, process_start_time(pid) or 0]
    return _START_TIME[1]
