"""multiqueue._native from Python: atomics, futexes, layout() and the Context operations.

The primitives are exercised on plain bytearrays and anonymous mmaps; the Context on a
manager's control segment (``manager.context``) and on a hand-built control area.
"""

import ctypes
import mmap
import struct
import threading
import time

import pytest

from multiqueue import InvalidBufferError, PoolConfig, ShmManager, _native
from multiqueue.shm import layout as L


@pytest.fixture
def page():
    """One anonymous, page-aligned shared page (so every offset's alignment is known)."""
    mm = mmap.mmap(-1, mmap.PAGESIZE)
    yield mm
    mm.close()


def aligned_offset(buf: bytearray, to: int) -> int:
    """The first offset of `buf` whose address is a multiple of `to`."""
    address = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    return (-address) % to


# ---------------------------------------------------------------- 64-bit atomics


def test_atomic_load_u64_reads_a_little_endian_word(page):
    struct.pack_into("<Q", page, 8, 0x1122334455667788)
    assert _native.atomic_load_u64(page, 8) == 0x1122334455667788


def test_atomic_store_u64_writes_the_word(page):
    assert _native.atomic_store_u64(page, 16, 2**64 - 2) is None
    assert struct.unpack_from("<Q", page, 16)[0] == 2**64 - 2
    assert page[8:16] == bytes(8) and page[24:32] == bytes(8)  # neighbours untouched


def test_atomic_add_u64_returns_the_new_value(page):
    _native.atomic_store_u64(page, 0, 40)
    assert _native.atomic_add_u64(page, 0, 2) == 42
    assert _native.atomic_load_u64(page, 0) == 42


def test_atomic_add_u64_negative_delta_wraps_around(page):
    assert _native.atomic_add_u64(page, 0, -1) == 2**64 - 1
    assert _native.atomic_add_u64(page, 0, 1) == 0


def test_atomic_cas_u64_swaps_when_expected_matches(page):
    _native.atomic_store_u64(page, 0, 5)
    assert _native.atomic_cas_u64(page, 0, 5, 9) == (True, 5)
    assert _native.atomic_load_u64(page, 0) == 9


def test_atomic_cas_u64_reports_the_value_seen_when_it_fails(page):
    _native.atomic_store_u64(page, 0, 7)
    assert _native.atomic_cas_u64(page, 0, 5, 9) == (False, 7)
    assert _native.atomic_load_u64(page, 0) == 7


def test_atomics_work_on_a_plain_bytearray():
    buf = bytearray(64)
    off = aligned_offset(buf, 8)
    _native.atomic_store_u64(buf, off, 3)
    assert _native.atomic_add_u64(buf, off, 4) == 7
    assert _native.atomic_cas_u64(buf, off, 7, 8) == (True, 7)
    assert struct.unpack_from("<Q", buf, off)[0] == 8
    assert _native.atomic_add_u32(buf, off, 1) == 9
    assert _native.atomic_load_u32(buf, off) == 9


def test_atomic_add_u64_is_atomic_across_threads(page):
    def bump():
        for _ in range(20_000):
            _native.atomic_add_u64(page, 0, 1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _native.atomic_load_u64(page, 0) == 80_000


# ---------------------------------------------------------------- 32-bit atomics


def test_atomic_load_u32_reads_a_32_bit_word(page):
    struct.pack_into("<II", page, 0, 0xDEADBEEF, 0x12345678)
    assert _native.atomic_load_u32(page, 0) == 0xDEADBEEF
    assert _native.atomic_load_u32(page, 4) == 0x12345678


def test_atomic_add_u32_returns_the_new_value_and_leaves_the_next_word(page):
    struct.pack_into("<II", page, 0, 10, 77)
    assert _native.atomic_add_u32(page, 0, 5) == 15
    assert struct.unpack_from("<II", page, 0) == (15, 77)


def test_atomic_add_u32_wraps_in_32_bits(page):
    assert _native.atomic_add_u32(page, 4, -1) == 2**32 - 1
    assert struct.unpack_from("<I", page, 0)[0] == 0  # no borrow into the lower word
    assert _native.atomic_add_u32(page, 4, 1) == 0


# ---------------------------------------------------------------- bounds and alignment


@pytest.mark.parametrize(
    "call",
    [
        lambda b: _native.atomic_load_u64(b, 4),
        lambda b: _native.atomic_store_u64(b, 12, 1),
        lambda b: _native.atomic_add_u64(b, 1, 1),
        lambda b: _native.atomic_cas_u64(b, 2, 0, 1),
        lambda b: _native.atomic_load_u32(b, 2),
        lambda b: _native.atomic_add_u32(b, 1, 1),
        lambda b: _native.futex_wait(b, 2, 0, 0.0),
        lambda b: _native.futex_wake(b, 6, 1),
    ],
    ids=["load_u64", "store_u64", "add_u64", "cas_u64", "load_u32", "add_u32", "futex_wait",
         "futex_wake"],
)
def test_misaligned_offset_raises_value_error(page, call):
    with pytest.raises(ValueError, match="aligned"):
        call(page)


@pytest.mark.parametrize("offset", [-8, mmap.PAGESIZE, mmap.PAGESIZE - 4, 2**40])
def test_u64_offset_out_of_range_raises_value_error(page, offset):
    with pytest.raises(ValueError, match="out of range"):
        _native.atomic_load_u64(page, offset)
    with pytest.raises(ValueError):
        _native.atomic_store_u64(page, offset, 1)
    with pytest.raises(ValueError):
        _native.atomic_add_u64(page, offset, 1)
    with pytest.raises(ValueError):
        _native.atomic_cas_u64(page, offset, 0, 1)


@pytest.mark.parametrize("offset", [-4, mmap.PAGESIZE, mmap.PAGESIZE + 4])
def test_u32_offset_out_of_range_raises_value_error(page, offset):
    for call in (lambda: _native.atomic_load_u32(page, offset),
                 lambda: _native.atomic_add_u32(page, offset, 1),
                 lambda: _native.futex_wait(page, offset, 0, 0.0),
                 lambda: _native.futex_wake(page, offset, 1)):
        with pytest.raises(ValueError):
            call()


def test_last_word_of_the_buffer_is_in_range(page):
    _native.atomic_store_u64(page, mmap.PAGESIZE - 8, 1)
    assert _native.atomic_add_u32(page, mmap.PAGESIZE - 4, 1) == 1


def test_read_only_buffer_is_refused():
    with pytest.raises((BufferError, TypeError)):
        _native.atomic_load_u64(bytes(16), 0)


def test_failed_call_does_not_keep_the_buffer_exported():
    buf = bytearray(16)
    with pytest.raises(ValueError):
        _native.atomic_load_u64(buf, 3)
    buf.extend(b"x")  # a leaked buffer export would make resizing raise BufferError
    assert len(buf) == 17


# ---------------------------------------------------------------- futexes


def test_futex_wait_returns_false_on_timeout_quickly(page):
    t0 = time.monotonic()
    assert _native.futex_wait(page, 0, 0, 0.05) is False
    elapsed = time.monotonic() - t0
    assert 0.04 <= elapsed < 1.0


def test_futex_wait_returns_true_at_once_when_the_word_differs(page):
    struct.pack_into("<I", page, 0, 5)
    t0 = time.monotonic()
    assert _native.futex_wait(page, 0, 4, 10.0) is True
    assert time.monotonic() - t0 < 1.0


def test_futex_wait_with_negative_timeout_returns_when_the_word_differs(page):
    struct.pack_into("<I", page, 0, 1)
    assert _native.futex_wait(page, 0, 0, -1.0) is True


def test_futex_wake_without_waiters_wakes_nobody(page):
    assert _native.futex_wake(page, 0, 1) == 0


def test_futex_wake_from_another_thread_wakes_a_waiter(page):
    result = {}

    def waiter():
        t0 = time.monotonic()
        result["woken"] = _native.futex_wait(page, 0, 0, 10.0)  # the word stays 0
        result["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    woken, deadline = 0, time.monotonic() + 10
    while woken == 0 and time.monotonic() < deadline:  # until the waiter is in the kernel
        woken = _native.futex_wake(page, 0, 1)
    thread.join(10)
    assert woken == 1
    assert not thread.is_alive()
    assert result["woken"] is True
    assert result["elapsed"] < 5


# ---------------------------------------------------------------- layout


def test_layout_returns_a_dict_of_sizes_and_offsets():
    layout = _native.layout()
    assert isinstance(layout, dict)
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in layout.items())
    assert layout["mq_segment_header"] == 64
    assert layout["mq_entry"] == 128
    assert layout["mq_pool"] == 512
    assert layout["mq_segment_header.version"] == 8
    assert layout["mq_control.free_event"] % 64 == 0
    assert layout["MQ_MAX_CHUNKS"] == L.MAX_CHUNKS


# ---------------------------------------------------------------- Context via a manager


def entry_state_offset(manager, slot: int) -> int:
    return manager._ctl.meta_offset + slot * ctypes.sizeof(L.Entry) + L.Entry.state.offset


def test_context_alloc_returns_an_id_with_one_reference(manager):
    ctx = manager.context
    buffer_id = ctx.alloc(0, 10)
    assert buffer_id >= 0
    assert buffer_id >> 32 >= 1  # generation 0 is never issued
    assert ctx.ref_count(buffer_id) == 1
    assert ctx.release(buffer_id) == 1


def test_context_acquire_and_release_count_references(manager):
    ctx = manager.context
    buffer_id = ctx.alloc(0, 10)
    assert ctx.acquire(buffer_id) == 0
    assert ctx.ref_count(buffer_id) == 2
    assert ctx.release(buffer_id) == 0  # still held
    assert ctx.ref_count(buffer_id) == 1
    assert ctx.release(buffer_id) == 1  # freed
    assert ctx.ref_count(buffer_id) == -1
    assert ctx.release(buffer_id) == -1  # not held any more
    assert ctx.acquire(buffer_id) == -1  # freed: stale


def test_context_alloc_returns_minus_one_when_the_pool_is_empty(manager):
    ctx = manager.context
    ids = [ctx.alloc(0, 1) for _ in range(16)]  # pool "tiny" has 16 blocks
    assert all(i >= 0 for i in ids)
    assert ctx.alloc(0, 1) == -1
    assert [ctx.release(i) for i in ids] == [1] * 16


def pool_state_offset(manager, pool_id: int) -> int:
    return manager._ctl.pools_offset + pool_id * ctypes.sizeof(L.Pool) + L.Pool.state.offset


def test_context_alloc_on_a_pool_being_removed_returns_minus_two(manager):
    mm, offset = manager._control.mmap, pool_state_offset(manager, 0)
    _native.atomic_add_u32(mm, offset, L.POOL_REMOVING - L.POOL_ACTIVE)
    try:
        assert manager.context.alloc(0, 10) == -2
    finally:
        _native.atomic_add_u32(mm, offset, L.POOL_ACTIVE - L.POOL_REMOVING)
    assert manager.get_pool("tiny").stats().blocks_used == 0  # nothing was taken


def test_context_alloc_pool_id_out_of_range_raises_value_error(manager):
    with pytest.raises(ValueError):
        manager.context.alloc(manager._ctl.max_pools, 10)


def test_context_alloc_needs_two_arguments(manager):
    with pytest.raises(TypeError):
        manager.context.alloc(0)


def test_context_alloc_returns_minus_three_until_the_epoch_is_refreshed(domain, manager):
    ctx = manager.context
    with ShmManager(domain, reaper_interval=None) as other:
        other.add_pool(PoolConfig("extra", 512, 2))
        assert ctx.alloc(0, 10) == -3
        epoch = ctx.refresh_epoch()
        assert epoch == manager._ctl.pools_epoch
        buffer_id = ctx.alloc(0, 10)
        assert buffer_id >= 0
        assert ctx.release(buffer_id) == 1


def test_context_refresh_epoch_returns_the_current_epoch(manager):
    assert manager.context.refresh_epoch() == manager._ctl.pools_epoch
    manager.add_pool(PoolConfig("extra", 512, 2))
    assert manager.context.refresh_epoch() == manager._ctl.pools_epoch


@pytest.mark.parametrize("forged", [0, 5, (1 << 32) | 10_000, (0xFFFFFFFF << 32) | 0,
                                    2**64 - 1])
def test_context_rejects_forged_ids(manager, forged):
    ctx = manager.context
    assert ctx.acquire(forged) == -1
    assert ctx.ref_count(forged) == -1
    assert ctx.release(forged) == -1


def test_context_rejects_negative_or_non_int_ids(manager):
    with pytest.raises(OverflowError):
        manager.context.acquire(-1)
    with pytest.raises(TypeError):
        manager.context.ref_count("1")


def test_context_push_free_out_of_bounds_raises_value_error(manager):
    ctx = manager.context
    with pytest.raises(ValueError):
        ctx.push_free(manager._ctl.max_pools, 0, 1)
    with pytest.raises(ValueError):
        ctx.push_free(0, manager._ctl.max_buffers, 1)


def test_context_reclaim_releases_a_slots_ledger_references(domain, manager):
    with ShmManager(domain, reaper_interval=None) as other:
        shared = other.allocate(10)
        mine = manager.get(shared.id)  # 2 references: one each
        only_other = other.allocate(10)
        used = manager.get_stats().total_allocated
        assert manager.context.reclaim(other._proc_slot) == (2, 1)
        assert mine.ref_count == 1  # the other process's reference is gone
        assert manager.get_stats().total_allocated == used - 1  # its own block was freed
        with pytest.raises(InvalidBufferError):
            manager.get(only_other.id)
        assert manager.context.reclaim(other._proc_slot) == (0, 0)  # the row was cleared
        mine.release()
        for stale in (shared, only_other):
            stale._live = False  # their references were reclaimed above


def test_context_reclaim_frees_a_block_popped_but_never_published(domain, manager):
    with ShmManager(domain, reaper_interval=None) as other:
        buffer_id = other._ctx.alloc(0, 10)
        slot, gen = buffer_id & 0xFFFFFFFF, buffer_id >> 32
        # as if it died between recording the ledger and publishing the state
        _native.atomic_store_u64(manager._control.mmap, entry_state_offset(manager, slot),
                                 (gen - 1) << 32)
        assert manager.get_pool("tiny").stats().blocks_used == 1
        assert manager.context.reclaim(other._proc_slot) == (0, 1)
        assert manager.get_pool("tiny").stats().blocks_used == 0
        again = manager.allocate_from_pool("tiny", 10)  # the block is back on the free list
        assert again.id & 0xFFFFFFFF == slot
        again.release()


def test_context_reclaim_slot_out_of_range_raises_value_error(manager):
    with pytest.raises(ValueError):
        manager.context.reclaim(manager._ctl.max_processes)


def test_disabled_context_raises_runtime_error(manager):
    ctx = _native.Context(manager._control.mmap, manager.process_slot)
    try:
        buffer = manager.allocate(10)
        assert ctx.disable() is None
        for call in (lambda: ctx.alloc(0, 10), lambda: ctx.acquire(buffer.id),
                     lambda: ctx.release(buffer.id), lambda: ctx.ref_count(buffer.id)):
            with pytest.raises(RuntimeError):
                call()
        assert buffer.ref_count == 1  # the manager's own context still works
        buffer.release()
    finally:
        ctx.close()


def test_closed_context_raises_runtime_error(manager):
    ctx = _native.Context(manager._control.mmap, manager.process_slot)
    ctx.close()
    ctx.close()  # idempotent
    for call in (lambda: ctx.alloc(0, 10), lambda: ctx.acquire(1 << 32),
                 lambda: ctx.release(1 << 32), lambda: ctx.ref_count(1 << 32),
                 lambda: ctx.reclaim(0), ctx.refresh_epoch):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_context_rejects_a_too_small_buffer_or_bad_slot(manager):
    with pytest.raises(ValueError):
        _native.Context(bytearray(64), 0)
    with pytest.raises(ValueError):
        _native.Context(manager._control.mmap, manager._ctl.max_processes)


# ---------------------------------------------------------------- Context on a bare control area


@pytest.fixture
def bare_control():
    """A control area in an anonymous mmap with one active pool of four unlinked slots."""
    lay = L.control_layout(max_processes=2, max_pools=2, max_buffers=8)
    mm = mmap.mmap(-1, lay["total"])
    c = L.Control.from_buffer(mm)
    c.max_processes, c.max_pools, c.max_buffers = 2, 2, 8
    c.procs_offset, c.pools_offset = lay["procs"], lay["pools"]
    c.meta_offset, c.ledger_offset = lay["meta"], lay["ledger"]
    c.slots_used = 4
    pools = (L.Pool * 2).from_buffer(mm, lay["pools"])
    pools[0].state = L.POOL_ACTIVE
    pools[0].block_count = 4
    pools[0].block_size = pools[0].stride = 128
    entries = (L.Entry * 8).from_buffer(mm, lay["meta"])
    for slot in range(4):
        entries[slot].pool_id = 0
    del c, pools, entries
    ctx = _native.Context(mm, 0)
    yield mm, ctx, lay
    ctx.close()
    mm.close()


def test_push_free_links_slots_so_the_first_is_handed_out_first(bare_control):
    mm, ctx, lay = bare_control
    assert ctx.alloc(0, 8) == -1  # nothing linked yet
    assert ctx.push_free(0, 0, 4) is None
    ids = [ctx.alloc(0, 8) for _ in range(4)]
    assert [i & 0xFFFFFFFF for i in ids] == [0, 1, 2, 3]
    assert all(i >> 32 == 1 for i in ids)
    assert ctx.alloc(0, 8) == -1
    pool = L.Pool.from_buffer_copy(mm[lay["pools"]:lay["pools"] + ctypes.sizeof(L.Pool)])
    assert pool.used == 4 and pool.high_water == 4
    for i in ids:
        assert ctx.release(i) == 1


def test_released_slot_is_reused_with_the_next_generation(bare_control):
    _mm, ctx, _lay = bare_control
    ctx.push_free(0, 0, 4)
    first = ctx.alloc(0, 8)
    assert ctx.release(first) == 1
    second = ctx.alloc(0, 8)
    assert second & 0xFFFFFFFF == first & 0xFFFFFFFF
    assert second >> 32 == (first >> 32) + 1
    assert ctx.acquire(first) == -1  # the stale id does not touch the new owner
    assert ctx.ref_count(second) == 1
    assert ctx.release(second) == 1


def test_alloc_records_size_and_stats_in_shared_memory(bare_control):
    mm, ctx, lay = bare_control
    ctx.push_free(0, 0, 4)
    buffer_id = ctx.alloc(0, 100)
    slot = buffer_id & 0xFFFFFFFF
    entry = L.Entry.from_buffer_copy(mm, lay["meta"] + slot * ctypes.sizeof(L.Entry))
    assert entry.size == 100 and entry.state == buffer_id & ~0xFFFFFFFF | 1
    proc = L.Process.from_buffer_copy(mm, lay["procs"])
    assert proc.stats.alloc_count == 1
    assert proc.stats.size_hist[(100).bit_length()] == 1
    ledger = struct.unpack_from("<Q", mm, lay["ledger"] + slot * 8)[0]
    assert ledger == buffer_id & ~0xFFFFFFFF | 1
    assert ctx.release(buffer_id) == 1
    assert struct.unpack_from("<Q", mm, lay["ledger"] + slot * 8)[0] & 0xFFFFFFFF == 0
