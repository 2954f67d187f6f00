"""This process's mappings of a domain's pool segments, and its views of their blocks."""

import numpy as np

from . import layout as L
from .pools import pool_segment_path
from .segment import open_segment


class BlockMaps:
    """The pool chunks this process mapped, and per metadata slot a memoryview and a
    uint8 array of its block, each made on first use and kept: a slot is never reused
    by another pool, so they stay right until the pools change (``reset``).

    ``views`` is the list the C Buffer.memoryview() reads (Context.block_views);
    ``arrays`` the one Buffer.numpy() reads.
    """

    def __init__(self, prefix: str, domain: str, records, metadata_u64):
        self.prefix = prefix
        self.domain = domain
        self.records = records  # the pool records (layout.Pool rows)
        self.metadata_u64 = metadata_u64
        self.segments: dict[tuple[int, int, int], object] = {}  # (pool, chunk, token) -> Segment
        self.chunk_views: dict[tuple[int, int, int], memoryview] = {}
        self.views: list = []
        self.arrays: list = []

    def reset(self, slots: int, live_tokens: set[tuple[int, int]]) -> None:
        """New per-slot lists (blocks may have moved: map anew), and unmap the chunks of
        pools not in ``live_tokens`` ((pool id, token) pairs: removed pools)."""
        self.views = [None] * slots
        self.arrays = [None] * slots
        for key in [k for k in self.chunk_views if (k[0], k[2]) not in live_tokens]:
            del self.chunk_views[key]
            self.segments.pop(key).close()

    def block_view(self, slot: int) -> memoryview:
        """The memoryview of a slot's whole block."""
        base = slot * L.ENTRY_WORDS
        link = self.metadata_u64[base + L.W_LINK]
        pool_id, chunk = (link >> 32) & 0xFFFF, link >> 48
        rec = self.records[pool_id]
        key = (pool_id, chunk, rec.token)
        segment_view = self.chunk_views.get(key) or self._map_chunk(key)
        offset = self.metadata_u64[base + L.W_OFFSET]
        self.views[slot] = view = segment_view[offset : offset + rec.block_size]
        return view

    def block_array(self, slot: int) -> np.ndarray:
        """A uint8 array over a slot's whole block."""
        view = self.views[slot] or self.block_view(slot)
        self.arrays[slot] = array = np.frombuffer(view, np.uint8)
        return array

    def close(self) -> None:
        """Unmap every chunk (arrays and views still held keep theirs until freed)."""
        self.views, self.arrays = [], []
        for seg in self.segments.values():
            seg.close()
        self.segments.clear()
        self.chunk_views.clear()
        self.records = self.metadata_u64 = None

    def _map_chunk(self, key) -> memoryview:
        pool_id, chunk, _token = key
        seg = open_segment(pool_segment_path(self.prefix, self.domain, self.records[pool_id], chunk),
                           L.MAGIC_POOL, L.KIND_POOL)
        self.segments[key] = seg
        self.chunk_views[key] = view = memoryview(seg.mmap)
        return view
