"""The shared-memory layout of a domain, mirrored from ``_native.c`` with ctypes.

The C structs are the source of truth; ``tests/shm/test_layout.py`` checks these
mirrors against ``_native.layout()`` field by field.  Python uses them on slow paths
only.  The control segment's layout: docs/shm.md, "The C extension".
"""

import ctypes as C

MAGIC_CONTROL = int.from_bytes(b"MQDOMAIN", "little")
MAGIC_POOL = int.from_bytes(b"MQPOOLSG", "little")
LAYOUT_VERSION = 3  # 2: Process.incarnation; 3: graph rows of 24 words (14 block counters)

KIND_CONTROL = 1
KIND_POOL = 2

SIZE_BUCKETS = 48
MAX_CHUNKS = 32
MAX_NAME = 31  # bytes of a process or pool name (NUL-terminated in 32)

# process slot states
PROC_FREE = 0
PROC_ALIVE = 1
PROC_REAPING = 2

# pool states
POOL_FREE = 0
POOL_ACTIVE = 1
POOL_REMOVING = 2
POOL_REMOVED = 3  # never reused: an allocator stalled in the old pool must not see a new one

PAGE = 4096
CACHE_LINE = 64


def align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


class SegmentHeader(C.Structure):
    _fields_ = [
        ("magic", C.c_uint64),
        ("version", C.c_uint32),
        ("kind", C.c_uint32),
        ("creator_pid", C.c_uint32),
        ("header_size", C.c_uint32),
        ("creator_start", C.c_uint64),
        ("created_ns", C.c_int64),
        ("total_size", C.c_uint64),
        ("reserved", C.c_uint64 * 2),
    ]


class Stats(C.Structure):
    _fields_ = [
        ("alloc_count", C.c_uint64),
        ("dealloc_count", C.c_uint64),
        ("failed_count", C.c_uint64),
        ("latency_sum_ns", C.c_uint64),
        ("latency_max_ns", C.c_uint64),
        ("reserved", C.c_uint64 * 3),
        ("size_hist", C.c_uint64 * SIZE_BUCKETS),
    ]


class Control(C.Structure):
    _fields_ = [
        ("seg", SegmentHeader),
        ("max_processes", C.c_uint32),
        ("max_pools", C.c_uint32),
        ("max_buffers", C.c_uint32),
        ("slots_used", C.c_uint32),
        ("pools_epoch", C.c_uint64),
        ("procs_offset", C.c_uint64),
        ("pools_offset", C.c_uint64),
        ("meta_offset", C.c_uint64),
        ("ledger_offset", C.c_uint64),
        ("name_prefix", C.c_char * 32),
        ("reserved", C.c_uint64 * 5),
        ("free_event", C.c_uint32),
        ("alloc_waiters", C.c_uint32),
        ("reserved2", C.c_uint64 * 7),
        ("retired", Stats),
    ]


class Process(C.Structure):
    _fields_ = [
        ("pid", C.c_uint32),
        ("state", C.c_uint32),
        ("start_time", C.c_uint64),
        ("heartbeat_ns", C.c_int64),
        ("registered_ns", C.c_int64),
        ("name", C.c_char * 32),
        ("stats", Stats),
        ("incarnation", C.c_uint32),  # bumped per registration of the slot (queue lock ids)
        ("reserved32", C.c_uint32),
        ("reserved", C.c_uint64 * 7),
    ]


class Chunk(C.Structure):
    _fields_ = [("first_slot", C.c_uint32), ("count", C.c_uint32)]


class Pool(C.Structure):
    _fields_ = [
        ("head", C.c_uint64),
        ("pad0", C.c_uint64 * 7),
        ("used", C.c_uint64),
        ("high_water", C.c_uint64),
        ("token", C.c_uint64),
        ("pad1", C.c_uint64 * 5),
        ("state", C.c_uint32),
        ("n_chunks", C.c_uint32),
        ("block_size", C.c_uint64),
        ("stride", C.c_uint64),
        ("block_count", C.c_uint32),
        ("initial_count", C.c_uint32),
        ("max_blocks", C.c_uint32),
        ("expandable", C.c_uint32),
        ("name", C.c_char * 32),
        ("chunks", Chunk * MAX_CHUNKS),
        ("pad2", C.c_uint8 * 56),
    ]


class Entry(C.Structure):
    _fields_ = [
        ("state", C.c_uint64),
        ("next_free", C.c_uint32),
        ("pool_id", C.c_uint16),
        ("chunk", C.c_uint16),
        ("block_index", C.c_uint32),
        ("flags", C.c_uint32),
        ("size", C.c_uint64),
        ("data_offset", C.c_uint64),
        ("timestamp_ns", C.c_int64),
        ("range_start_ns", C.c_int64),
        ("range_end_ns", C.c_int64),
        ("alloc_time_ns", C.c_int64),
        ("creator_proc", C.c_uint32),
        ("creator_pid", C.c_uint32),
        ("reserved", C.c_uint64 * 6),
    ]


ENTRY_HAS_RANGE = 1
ENTRY_WORDS = C.sizeof(Entry) // 8  # an entry seen as uint64 / int64 words (the Python fast paths)
# Word indexes into an entry seen as words
W_LINK = Entry.next_free.offset // 8  # next_free:32 | pool_id:16 | chunk:16
W_FLAGS = Entry.block_index.offset // 8  # block_index:32 | flags:32
W_SIZE = Entry.size.offset // 8
W_OFFSET = Entry.data_offset.offset // 8
W_TIMESTAMP = Entry.timestamp_ns.offset // 8
W_RANGE_START = Entry.range_start_ns.offset // 8
W_RANGE_END = Entry.range_end_ns.offset // 8
W_ALLOC_TIME = Entry.alloc_time_ns.offset // 8
W_RESERVED = Entry.reserved.offset // 8

# The C names of the mirrored structs, for the layout test.
C_NAMES = {
    "mq_segment_header": SegmentHeader,
    "mq_stats": Stats,
    "mq_control": Control,
    "mq_process": Process,
    "mq_chunk": Chunk,
    "mq_pool": Pool,
    "mq_entry": Entry,
}


def control_layout(max_processes: int, max_pools: int, max_buffers: int) -> dict[str, int]:
    """Offsets of the control segment's tables and its total size."""
    procs = align(C.sizeof(Control), CACHE_LINE)
    pools = procs + max_processes * C.sizeof(Process)
    meta = align(pools + max_pools * C.sizeof(Pool), PAGE)
    ledger = meta + max_buffers * C.sizeof(Entry)
    total = align(ledger + max_processes * max_buffers * 8, PAGE)
    return {"procs": procs, "pools": pools, "meta": meta, "ledger": ledger, "total": total}


def control_problem(ctl: "Control", size: int) -> str | None:
    """What is wrong with a control segment's header, or None.

    Its table sizes must be in range and its offsets exactly those control_layout()
    gives for them (every creator uses it): a corrupt header must never send anyone
    reading or writing outside a table, or one table over another."""
    counts = (ctl.max_processes, ctl.max_pools, ctl.max_buffers)
    if not (1 <= counts[0] <= 4096 and 1 <= counts[1] <= 1024 and 1 <= counts[2] < 2**31):
        return f"table sizes out of range (processes, pools, buffers = {counts})"
    lay = control_layout(*counts)
    offsets = (ctl.procs_offset, ctl.pools_offset, ctl.meta_offset, ctl.ledger_offset)
    if offsets != (lay["procs"], lay["pools"], lay["meta"], lay["ledger"]):
        return f"table offsets {offsets} are not those of its table sizes"
    if lay["total"] > size:
        return f"its tables need {lay['total']} bytes, the segment has {size}"
    if ctl.slots_used > ctl.max_buffers:
        return f"{ctl.slots_used} metadata slots used of {ctl.max_buffers}"
    return None
