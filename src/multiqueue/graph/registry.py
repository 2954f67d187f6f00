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
import os

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

# The layout of the rows is versioned by the magic's last byte: a graph segment of another
# layout is refused as not ours.  2: a block row has its wait state and rate windows.
GRAPH_LAYOUT = 2
MAGIC_GRAPH = int.from_bytes(b"MQGRAPH" + str(GRAPH_LAYOUT).encode(), "little")
KIND_GRAPH = 4
ROW_WORDS = 46

# block row words
STATE, PID, ITEMS_IN, ITEMS_OUT, WORK_CALLS, WORK_NS, START_NS, UPDATED_NS, RESTARTS, FAILURES = range(10)
# What a running block waits for (WAIT_*, 0 while it works) and which: WAIT_ARG is the
# input's index in the block's inputs, or the full output's index in its outputs (readers
# of the rows find its slowest blocking reader in the queue's stats); the pool's name is in
# the POOL_NAME words.  Stored once per transition, by the block's own thread.
WAIT, WAIT_ARG = 10, 11
POOL_NAME, POOL_NAME_WORDS = 12, 4  # words 12..15: the pool it waits for (bytes, NUL-padded)
# The instantaneous rates: items in and out at the start of the current window (at least
# a second long once it rolls) and of the one before, rolled by the block's own thread.
WINDOW_NS, WINDOW_IN, WINDOW_OUT = 16, 17, 18
PREVIOUS_NS, PREVIOUS_IN, PREVIOUS_OUT = 19, 20, 21
# words 22..31 are free for later block words
COUNTERS = 32  # words 32..45: the block's own counters (Block.counters), kept over restarts
MAX_COUNTERS = ROW_WORDS - COUNTERS  # 14
WAIT_NONE, WAIT_INPUT, WAIT_POOL, WAIT_READER, WAIT_PAUSED = range(5)
# edge row words
EDGE_READER = 0  # reader index of the edge's consumer in the producer's queue, -1 none
EDGE_POPPED = 1  # frames the consumer took (over restarts), written by the consumer
EDGE_DROPS = 2  # frames it lost: its drop_oldest reader's, and those of its restarts and failures
# The exact count of an edge across the consumer's lives (graph/losses.py): where its
# current reader joined the queue's sequence and the queue's unheard pushes then, the
# received and dropped totals then, where its last life ended (-1: the current one runs),
# and its work word (frames it finished << 24 | its output count, mod 2**24, then).
EDGE_JOINED, EDGE_UNHEARD, EDGE_BASE_POPPED, EDGE_BASE_DROPS, EDGE_END, EDGE_WORK = range(3, 9)
EDGE_LAST_LOSS = 9  # frames lost when its consumer's last life ended early (failed, killed)

STATES = ("created", "initializing", "ready", "running", "done", "failed", "stopped", "restarting")
CREATED, INITIALIZING, READY, RUNNING, DONE, FAILED, STOPPED, RESTARTING = range(8)


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


def graph_owner(prefix: str, domain: str) -> int | None:
    """The pid of the live runtime running a graph in ``domain``, or None (no graph,
    one this multiqueue cannot read, or one whose runtime died)."""
    try:
        segment = open_segment(segment_path(prefix, domain, "graph"), MAGIC_GRAPH, KIND_GRAPH)
    except SegmentError:
        return None
    pid, start = segment.header.creator_pid, segment.header.creator_start
    segment.close()
    return pid if is_alive(pid, start) else None


def command_line(pid: int) -> str:
    """How process ``pid`` was started (its /proc cmdline), to name it in a message."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in args)[:200]


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
            owner = graph_owner(prefix, domain)
            runtime = "" if owner is None else f" (its runtime is pid {owner}: {command_line(owner)})"
            raise SegmentError(17, f"domain {domain!r} already runs a graph{runtime}; stop that graph "
                                   "first, or run this one in another domain (mq run and mq demo: "
                                   "--domain NAME)")
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

    @property
    def ended(self) -> bool:
        """Is this graph over: its runtime released the segment (unlinked it: a new run
        makes a new one) or died?  One fstat: for observers, not per frame."""
        segment = self._segment
        if segment.fd < 0 or os.fstat(segment.fd).st_nlink == 0:
            return True
        return not is_alive(segment.header.creator_pid, segment.header.creator_start)

    def block_index(self, name: str) -> int:
        for i, b in enumerate(self.description["blocks"]):
            if b["name"] == name:
                return i
        raise KeyError(name)

    def close(self) -> None:
        self.block_rows = self.edge_rows = None
        self._segment.close()


def pool_name_words(name: str) -> np.ndarray:
    """A pool's name as the POOL_NAME words of a block row."""
    raw = name.encode()[: POOL_NAME_WORDS * 8].ljust(POOL_NAME_WORDS * 8, b"\0")
    return np.frombuffer(raw, np.int64)


def pool_name_of(row) -> str:
    """The pool name a block row's POOL_NAME words hold."""
    raw = np.ascontiguousarray(row[POOL_NAME : POOL_NAME + POOL_NAME_WORDS]).tobytes()
    return raw.rstrip(b"\0").decode(errors="replace")
