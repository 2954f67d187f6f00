"""multiqueue._native.BufferBase and the calls that make and consume handles, from Python.

Context.alloc_buffer and Queue.pop_buffer make handles of the class registered with
set_buffer_class (multiqueue's Buffer); Queue.push_buffer moves a handle's reference
into a queue.  References are counted straight from the Context (``ctx.ref_count``).
"""

import ctypes
import os

import pytest

from multiqueue import InvalidBufferError, PoolConfig, ShmManager, _native
from multiqueue.shm import layout as L
from multiqueue.shm.buffer import Buffer
from multiqueue.shm.segment import process_start_time
from multiqueue.stream import PortQueue

TINY, SMALL = 0, 1  # conftest's pools: 16 blocks of 256 bytes, 8 of 4096
PID, START = os.getpid(), process_start_time(os.getpid())


@pytest.fixture
def ctx(manager):
    return manager.context


@pytest.fixture
def q(manager):
    """A port queue of capacity 4 and at most 3 readers."""
    queue = PortQueue(manager, "nb", capacity=4, max_readers=3)
    yield queue
    queue.release()


@pytest.fixture
def other(domain, manager):
    """A second manager of the same domain in this process: its own Context and ledger row."""
    m = ShmManager(domain, reaper_interval=None)
    yield m
    m.shutdown()


def join(q) -> int:
    return q._native.join(0, False, PID, START)  # a blocking reader, from the head


def slot(b) -> int:
    return b._id & 0xFFFFFFFF


def blocks_used(manager) -> int:
    return manager.get_stats().total_allocated


class Recorder(Buffer):
    """Records the C half's calls into the Python half instead of raising."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = []

    def _release_failed(self, was_live):
        self.calls.append(("release_failed", was_live))

    def _raise_unusable(self):
        self.calls.append("raise_unusable")


class Bare(_native.BufferBase):
    """A BufferBase subclass without the Python half (no _raise_unusable, _release_failed)."""


# ---------------------------------------------------------------- set_buffer_class


@pytest.mark.parametrize("cls", [int, object, None, "Buffer", Buffer.__new__(Buffer)])
def test_set_buffer_class_refuses_anything_but_a_buffer_base_subclass(cls):
    with pytest.raises(TypeError, match="subclass of BufferBase"):
        _native.set_buffer_class(cls)


def test_set_buffer_class_changes_what_alloc_buffer_and_pop_buffer_make(manager, ctx, q):
    class Tagged(Buffer):
        __slots__ = ()

    _native.set_buffer_class(Tagged)
    try:
        index = join(q)
        made = ctx.alloc_buffer(manager, TINY, 8)
        assert type(made) is Tagged and q._native.push_buffer(made) == 1
        popped = q._native.pop_buffer(index, manager)
        assert type(popped) is Tagged
        popped.release()
    finally:
        _native.set_buffer_class(Buffer)


# ---------------------------------------------------------------- alloc_buffer


@pytest.mark.parametrize(("pool_id", "size", "name"), [(TINY, 100, "tiny"), (SMALL, 4096, "small")])
def test_alloc_buffer_returns_a_live_buffer_holding_one_reference(manager, ctx, pool_id, size, name):
    b = ctx.alloc_buffer(manager, pool_id, size)
    assert type(b) is Buffer and isinstance(b, _native.BufferBase)
    assert (b._manager, b._ctx, b._size, b._pool_id, b._live) == (manager, ctx, size, pool_id, True)
    assert b.pool == name and ctx.ref_count(b._id) == 1 and blocks_used(manager) == 1
    b.release()
    assert ctx.ref_count(b._id) == -1 and blocks_used(manager) == 0


@pytest.mark.parametrize("code", [-1, -2, -3], ids=["pool_empty", "pool_being_removed", "pools_changed"])
def test_alloc_buffer_returns_the_codes_of_alloc(manager, ctx, request, code):
    held = [ctx.alloc_buffer(manager, TINY, 1) for _ in range(16)] if code == -1 else []
    state = manager._ctl.pools_offset + TINY * ctypes.sizeof(L.Pool) + L.Pool.state.offset
    removing = L.POOL_REMOVING - L.POOL_ACTIVE if code == -2 else 0
    _native.atomic_add_u32(manager._control.mmap, state, removing)
    if code == -3:
        request.getfixturevalue("other").add_pool(PoolConfig("extra", 512, 2))
    try:
        assert ctx.alloc_buffer(manager, TINY, 1) == code
    finally:
        _native.atomic_add_u32(manager._control.mmap, state, -removing)
    for b in held:
        b.release()
    assert blocks_used(manager) == 0


@pytest.mark.parametrize(("args", "error"), [
    ((), TypeError), ((TINY, 8), TypeError), ((None, TINY, 8, 1), TypeError),
    ((None, 1000, 8), ValueError), ((None, TINY, 0), ValueError), ((None, TINY, 257), ValueError),
])
def test_alloc_buffer_with_bad_arguments_raises(manager, ctx, args, error):
    with pytest.raises(error):
        ctx.alloc_buffer(*args)
    assert blocks_used(manager) == 0


# ---------------------------------------------------------------- construction and fields


def test_init_wraps_a_reference_already_taken_without_taking_another(manager, ctx):
    buffer_id = ctx.alloc(TINY, 8)
    b = Buffer(manager, ctx, buffer_id, 8, TINY)
    assert (b._id, b._size, b._pool_id, b._live, ctx.ref_count(buffer_id)) == (buffer_id, 8, TINY, True, 1)
    b.release()
    assert ctx.ref_count(buffer_id) == -1


def test_init_refuses_a_second_call(manager, ctx):
    b = ctx.alloc_buffer(manager, TINY, 8)
    with pytest.raises(RuntimeError, match="already initialized"):
        b.__init__(manager, ctx, 123, 1, SMALL)
    assert (b._size, b._pool_id, ctx.ref_count(b._id)) == (8, TINY, 1)
    b.release()


def test_init_without_a_context_raises_type_error_and_the_husk_releases_nothing(manager, ctx):
    buffer_id = ctx.alloc(TINY, 8)
    with pytest.raises(TypeError):
        Buffer(manager, object(), buffer_id, 8, TINY)
    husk = _native.BufferBase.__new__(_native.BufferBase)
    assert (husk._manager, husk._ctx, husk._live) == (None, None, False)
    del husk
    assert ctx.release(buffer_id) == 1  # still held once, by this process


@pytest.mark.parametrize("bad_id, size, error", [(-1, 8, OverflowError), (2**64, 8, OverflowError),
                                                 ("1", 8, TypeError), (None, -5, ValueError)])
def test_init_refuses_a_negative_or_oversized_id_and_a_negative_size(manager, ctx, bad_id, size, error):
    buffer_id = ctx.alloc(TINY, 8)
    with pytest.raises(error):
        Buffer(manager, ctx, buffer_id if bad_id is None else bad_id, size, TINY)
    assert ctx.release(buffer_id) == 1  # the failed handle released nothing


def test_live_can_only_be_set_to_a_bool(manager, ctx):
    b = ctx.alloc_buffer(manager, TINY, 8)
    for value in (1, 0, None, "yes"):
        with pytest.raises(TypeError):
            b._live = value
    with pytest.raises(TypeError):
        del b._live
    b.release()
    b._live = True
    b._live = False
    assert b.released


def test_identity_fields_are_read_only_and_pool_id_is_writable(manager, ctx):
    b = ctx.alloc_buffer(manager, SMALL, 8)
    for field in ("_manager", "_ctx", "_id", "_size"):
        with pytest.raises(AttributeError):
            setattr(b, field, getattr(b, field))
    b._pool_id = -1  # "not read yet": the Python half reads it from the metadata
    assert b.pool == "small" and b._pool_id == SMALL
    with pytest.raises(TypeError):
        b._pool_id = "1"
    b.release()


# ---------------------------------------------------------------- memoryview


@pytest.mark.parametrize("size", [10, 255, 256])
def test_memoryview_has_the_buffers_size_and_writes_land_in_the_block(manager, ctx, size):
    b = ctx.alloc_buffer(manager, TINY, size)
    view = b.memoryview()
    assert len(view) == size and not view.readonly
    view[:] = bytes(i % 251 + 1 for i in range(size))
    with manager.get(b._id) as second:
        assert bytes(second.memoryview()) == bytes(view)
    assert bytes(ctx.block_views[slot(b)][:size]) == bytes(view)
    assert len(ctx.block_views[slot(b)]) == 256  # the cache holds whole blocks
    b.release()


def test_memoryview_reads_the_contexts_block_views_cache(manager, ctx, monkeypatch):
    b = ctx.alloc_buffer(manager, TINY, 10)
    fake = bytearray(256)
    cache = [None] * (slot(b) + 1)
    cache[slot(b)] = memoryview(fake)
    monkeypatch.setattr(ctx, "block_views", cache)
    b.memoryview()[:] = b"x" * 10
    assert fake == b"x" * 10 + bytes(246)
    b.release()


@pytest.mark.parametrize("cache", [None, [], (), "no_list", "none_in_it"])
def test_memoryview_falls_back_to_the_managers_block_view(manager, ctx, monkeypatch, cache):
    b = ctx.alloc_buffer(manager, TINY, 10)
    if cache == "none_in_it":
        cache = [None] * manager._ctl.max_buffers
    monkeypatch.setattr(ctx, "block_views", cache)
    calls, real = [], manager._block_view
    monkeypatch.setattr(manager, "_block_view", lambda s: calls.append(s) or real(s))
    b.memoryview()[:] = b"y" * 10
    assert calls == [slot(b)]
    monkeypatch.undo()
    with manager.get(b._id) as second:
        assert bytes(second.memoryview()) == b"y" * 10
    b.release()


@pytest.mark.parametrize("returned", [b"x" * 256, bytearray(256), None])
def test_memoryview_raises_type_error_when_block_view_returns_no_memoryview(
        manager, ctx, monkeypatch, returned):
    b = ctx.alloc_buffer(manager, TINY, 10)
    monkeypatch.setattr(ctx, "block_views", None)
    monkeypatch.setattr(manager, "_block_view", lambda s: returned)
    with pytest.raises(TypeError, match="must return a memoryview"):
        b.memoryview()
    b.release()


# ---------------------------------------------------------------- release and _check


def test_release_drops_one_reference_once_and_the_last_frees_the_block(manager, ctx):
    b = ctx.alloc_buffer(manager, TINY, 8)
    second = manager.get(b._id)  # one ledger row holds both references
    assert ctx.ref_count(b._id) == 2
    assert second.release() is None
    assert second.released and not b.released
    del second  # a released handle releases nothing more when dropped
    assert ctx.ref_count(b._id) == 1
    b.release()
    assert ctx.ref_count(b._id) == -1 and blocks_used(manager) == 0


@pytest.mark.parametrize("was_live", [False, True])
def test_release_that_fails_calls_release_failed_with_was_live(manager, ctx, was_live):
    r = Recorder(manager, ctx, ctx.alloc(TINY, 8), 8, TINY)
    if was_live:
        assert ctx.release(r._id) == 1  # behind the handle's back
    else:
        r.release()
    assert r.release() is None
    assert r.calls == [("release_failed", was_live)] and r.released


def test_check_of_an_unusable_buffer_calls_raise_unusable_then_raises_runtime_error(manager, ctx):
    r = Recorder(manager, ctx, ctx.alloc(TINY, 8), 8, TINY)
    assert r._check() is None
    r.release()
    for call in (r._check, r.memoryview):
        with pytest.raises(RuntimeError, match="not usable"):
            call()
    assert r.calls == ["raise_unusable", "raise_unusable"]


@pytest.mark.parametrize("cls", [_native.BufferBase, Bare])
def test_buffer_base_without_its_python_half_raises_attribute_error_not_a_crash(manager, ctx, cls):
    b = cls(manager, ctx, ctx.alloc(TINY, 8), 8, TINY)
    assert len(b.memoryview()) == 8 and b._check() is None
    assert b.release() is None and ctx.ref_count(b._id) == -1
    for call in (b._check, b.memoryview, b.release):
        with pytest.raises(AttributeError, match="_raise_unusable|_release_failed"):
            call()


# ---------------------------------------------------------------- release on garbage collection


@pytest.mark.parametrize("make", [lambda m: m.context.alloc_buffer(m, TINY, 8),
                                  lambda m: Bare(m, m.context, m.context.alloc(TINY, 8), 8, TINY)])
def test_buffer_dropped_without_release_frees_its_block(manager, ctx, make):
    b = make(manager)
    buffer_id = b._id
    assert blocks_used(manager) == 1
    del b
    assert ctx.ref_count(buffer_id) == -1 and blocks_used(manager) == 0


def test_buffer_of_a_shut_down_manager_is_dropped_without_a_crash_or_a_second_release(manager, other):
    kept = manager.allocate(8)
    theirs = other.get(kept.id)
    other.shutdown()
    assert kept.ref_count == 1  # the shutdown released theirs
    with pytest.raises(InvalidBufferError):
        theirs._check()
    del theirs
    assert kept.ref_count == 1
    kept.release()


# ---------------------------------------------------------------- pop_buffer


@pytest.mark.parametrize("readers", [1, 2])
def test_pop_buffer_returns_a_buffer_holding_one_popped_reference(manager, ctx, q, readers):
    index = [join(q) for _ in range(readers)][0]
    buffer_id = ctx.alloc(SMALL, 1000)
    assert q._native.push(buffer_id) == 1
    b = q._native.pop_buffer(index, manager)
    assert (type(b), b._id, b._size, b._pool_id, b._manager, b._ctx, b._live) == (
        Buffer, buffer_id, 1000, SMALL, manager, ctx, True)
    assert ctx.ref_count(buffer_id) == readers  # ours, and the other reader's unread one
    b.release()
    assert ctx.ref_count(buffer_id) == (readers - 1 or -1)


@pytest.mark.parametrize(("state", "code"), [("empty", -1), ("closed", -2), ("detached", -4)])
def test_pop_buffer_returns_pops_negative_codes(manager, ctx, q, state, code):
    index = join(q)
    if state == "closed":
        q._native.push_buffer(ctx.alloc_buffer(manager, TINY, 8))
        q._native.close(1)
        q._native.pop_buffer(index, manager).release()  # what was pushed before the close
    elif state == "detached":
        q._native.detach(index)
    assert q._native.pop_buffer(index, manager) == code


@pytest.mark.parametrize(("args", "error"), [
    ((), TypeError), ((0,), TypeError), ((0, None, None), TypeError), ((3, None), ValueError),
])
def test_pop_buffer_with_bad_arguments_raises(q, args, error):
    with pytest.raises(error, match="pop_buffer|out of range"):
        q._native.pop_buffer(*args)


# ---------------------------------------------------------------- push_buffer


@pytest.mark.parametrize("readers", [1, 0])
def test_push_buffer_moves_the_reference_into_the_queue_and_releases_the_buffer(manager, ctx, q, readers):
    if readers:
        join(q)
    b = ctx.alloc_buffer(manager, TINY, 8)
    assert q._native.push_buffer(b) == 1
    assert b.released and ctx.ref_count(b._id) == (1 if readers else -1)  # the queue's, or freed
    assert ctx.release(b._id) == -1  # this process holds none
    del b  # so dropping the handle releases nothing
    assert q._native.detach(0) == readers and blocks_used(manager) == 0


@pytest.mark.parametrize(("state", "code"), [("full", 0), ("closed", -1), ("locked", -2)])
def test_push_buffer_refused_by_the_queue_keeps_the_buffer_and_its_reference(manager, ctx, q, state, code):
    if state == "full":
        join(q)
        for _ in range(4):
            assert q._native.push_buffer(ctx.alloc_buffer(manager, TINY, 8)) == 1
    elif state == "closed":
        q._native.close(1)
    b = ctx.alloc_buffer(manager, TINY, 8)
    q._header.lock = 77 if state == "locked" else 0
    try:
        assert q._native.push_buffer(b) == code
    finally:
        q._header.lock = 0
    assert not b.released and ctx.ref_count(b._id) == 1
    b.release()


def test_push_buffer_returns_minus_three_for_a_reference_not_held(manager, ctx, q):
    b = ctx.alloc_buffer(manager, TINY, 8)
    assert ctx.release(b._id) == 1  # behind the handle's back
    assert q._native.push_buffer(b) == -3
    assert not b.released and q._header.pushed == 0
    b._live = False


@pytest.mark.parametrize("thing", [1 << 32, None, memoryview(b"x"), Buffer])
def test_push_buffer_returns_minus_five_for_a_non_buffer(q, thing):
    assert q._native.push_buffer(thing) == -5


@pytest.mark.parametrize("spoil", ["release", "not_live", "never_initialized", "shut_down"])
def test_push_buffer_returns_minus_six_for_an_unusable_buffer(manager, ctx, q, request, spoil):
    if spoil == "shut_down":  # another manager's: the queue's own context would refuse
        other = request.getfixturevalue("other")
        b = other.allocate(8)
        other.shutdown()
    else:
        b = Buffer.__new__(Buffer) if spoil == "never_initialized" else ctx.alloc_buffer(manager, TINY, 8)
    if spoil == "release":
        b.release()
    elif spoil == "not_live":
        b._live = False
    assert q._native.push_buffer(b) == -6
    assert q._header.pushed == 0
    if spoil == "not_live":
        assert ctx.release(b._id) == 1
    assert blocks_used(manager) == 0


def test_push_buffer_returns_minus_seven_for_a_buffer_of_another_context(manager, q, other):
    join(q)
    theirs = other.allocate(8)
    assert q._native.push_buffer(theirs) == -7
    assert not theirs.released and theirs.ref_count == 1 and q._header.pushed == 0
    theirs.release()


def test_releasing_a_full_size_memoryview_leaves_the_slot_usable(manager):
    """memoryview() hands out a new view each time, never the per-slot cached one."""
    with manager.allocate_from_pool("tiny") as b:  # size = the block size: no slice
        with b.memoryview() as v:
            v[:3] = b"abc"
        slot_id = b._id
    with manager.allocate_from_pool("tiny") as again:
        assert again._id & 0xFFFFFFFF == slot_id & 0xFFFFFFFF  # LIFO free list: same block
        assert bytes(again.memoryview()[:3]) == b"abc"
        assert again.numpy()[:3].tobytes() == b"abc"
