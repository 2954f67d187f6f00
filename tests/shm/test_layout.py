"""The ctypes mirror of the shared structures agrees with the C definitions."""

import ctypes

from multiqueue import _native
from multiqueue.shm import layout as L


def test_every_exported_size_and_offset_matches_the_mirror():
    exported = _native.layout()
    checked = 0
    for key, value in exported.items():
        if key.startswith("MQ_"):
            continue
        struct, _, field = key.partition(".")
        mirror = L.C_NAMES[struct]
        if field:
            assert getattr(mirror, field).offset == value, key
        else:
            assert ctypes.sizeof(mirror) == value, key
        checked += 1
    assert checked > 30


def test_constants_match():
    exported = _native.layout()
    assert exported["MQ_SIZE_BUCKETS"] == L.SIZE_BUCKETS
    assert exported["MQ_MAX_CHUNKS"] == L.MAX_CHUNKS


def test_hot_words_sit_on_their_own_cache_lines():
    assert ctypes.sizeof(L.Pool) % 64 == 0
    assert L.Pool.used.offset == 64
    assert L.Control.free_event.offset % 64 == 0
    assert ctypes.sizeof(L.Entry) == 128
