"""The graph segment: what a running graph looks like, readable by any process.

``/dev/shm/mq.<domain>.graph`` holds the graph's description (blocks, ports,
edges and the queue behind each output, as JSON, written once by the runtime) and
a table of live counters: one row per block, written only by the process running
that block, and one row per edge (the reader slot its consumer holds).  Workers,
the runtime, ``multiqueue.attach()`` and ``mq`` read the same table, so stats need
no messages.  Rows are int64 words: single writer each, read without locks.
"""

import ctypes
import json

import numpy as np

from ..errors import SegmentError
from ..shm import layout as L
from ..shm.segment import (
    OWNER_ONLY,
    Access,
    create_segment,
    is_alive,
    open_segment,
    segment_path,
    unlink_quietly,
)

MAGIC_GRAPH = int.from_bytes(b"MQGRAPH1", "little")
KIND_GRAPH = 4
ROW_WORDS = 24

# block row words
STATE, PID, ITEMS_IN, ITEMS_OUT, WORK_CALLS, WORK_NS, START_NS, UPDATED_NS, RESTARTS, FAILURES = range(10)
COUNTERS = 10  # words 10..23: the block's own counters (Block.counters), kept over restarts
MAX_COUNTERS = ROW_WORDS - COUNTERS
# edge row words
EDGE_READER = 0  # reader index of the edge's consumer in the producer's queue, -1 none
EDGE_POPPED = 1  # frames the consumer took (over restarts), written by the consumer
EDGE_DROPS = 2  # frames its drop_oldest reader lost

STATES = ("created", "initializing", "ready", "running", "done", "failed", "stopped")
CREATED, INITIALIZING, READY, RUNNING, DONE, FAILED, STOPPED = range(7)


def _stale(path: str) -> bool:
    """Is the graph segment at ``path`` left by a runtime that is no longer alive?"""
    try:
        segment = open_segment(path, MAGIC_GRAPH, KIND_GRAPH)
    except SegmentError:
        return False  # not ours to remove (foreign, or another version): say it exists
    try:
        return not is_alive(segment.header.creator_pid, segment.header.creator_start)
    finally:
        segment.close()


class GraphHeader(ctypes.Structure):
    _fields_ = [
        ("seg", L.SegmentHeader),
        ("blocks", ctypes.c_uint64),
        ("edges", ctypes.c_uint64),
        ("description_offset", ctypes.c_uint64),
        ("description_size", ctypes.c_uint64),
    ]


class GraphSegment:
    """The graph segment of a domain, created by the runtime or opened by anyone."""

    def __init__(self, segment):
        self._segment = segment
        header = GraphHeader.from_buffer_copy(segment.mmap[: ctypes.sizeof(GraphHeader)])
        n_blocks, n_edges = header.blocks, header.edges
        table = np.frombuffer(segment.mmap, np.int64, (n_blocks + n_edges) * ROW_WORDS, L.PAGE)
        self.block_rows = table[: n_blocks * ROW_WORDS].reshape(n_blocks, ROW_WORDS)
        self.edge_rows = table[n_blocks * ROW_WORDS:].reshape(n_edges, ROW_WORDS)
        start = header.description_offset
        self.description = json.loads(bytes(segment.mmap[start : start + header.description_size]))

    @classmethod
    def create(cls, prefix: str, domain: str, description: dict,
               access: Access = OWNER_ONLY) -> "GraphSegment":
        text = json.dumps(description).encode()
        n_blocks, n_edges = len(description["blocks"]), len(description["edges"])
        table_end = L.PAGE + (n_blocks + n_edges) * ROW_WORDS * 8
        size = L.align(table_end + len(text), L.PAGE)

        def init(mm):
            h = GraphHeader.from_buffer(mm)
            h.blocks, h.edges = n_blocks, n_edges
            h.description_offset, h.description_size = table_end, len(text)
            del h
            mm[table_end : table_end + len(text)] = text
            rows = np.frombuffer(mm, np.int64, (n_blocks + n_edges) * ROW_WORDS, L.PAGE)
            rows[:] = 0
            rows.reshape(-1, ROW_WORDS)[n_blocks:, EDGE_READER] = -1
            del rows

        path = segment_path(prefix, domain, "graph")
        header_size = ctypes.sizeof(GraphHeader)
        segment = create_segment(path, size, MAGIC_GRAPH, KIND_GRAPH, header_size, init, access)
        if segment is None and _stale(path):  # its runtime died before anyone removed it
            unlink_quietly(path)
            segment = create_segment(path, size, MAGIC_GRAPH, KIND_GRAPH, header_size, init, access)
        if segment is None:
            raise SegmentError(17, f"domain {domain!r} already runs a graph ({path} exists); stop it "
                                   "first, or give this graph another domain")
        return cls(segment)

    @classmethod
    def open(cls, prefix: str, domain: str) -> "GraphSegment":
        path = segment_path(prefix, domain, "graph")
        try:
            segment = open_segment(path, MAGIC_GRAPH, KIND_GRAPH)
        except SegmentError as e:
            if e.errno == 2:
                raise SegmentError(2, f"domain {domain!r} runs no graph (no {path})") from None
            raise
        return cls(segment)

    @property
    def path(self) -> str:
        return self._segment.path

    def block_index(self, name: str) -> int:
        for i, b in enumerate(self.description["blocks"]):
            if b["name"] == name:
                return i
        raise KeyError(name)

    def close(self) -> None:
        self.block_rows = self.edge_rows = None
        self._segment.close()
