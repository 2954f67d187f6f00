"""Buffer handles: identity, timestamps, zero-copy views, references and invalid ids."""

import gc

import numpy as np
import pytest

from multiqueue import (
    Buffer,
    BufferReleasedError,
    InvalidBufferError,
    NotInitializedError,
    PoolConfig,
    ShmManager,
)


@pytest.fixture
def buf(manager):
    b = manager.allocate(100)
    yield b
    if not b.released:
        b.release()


# ---------------------------------------------------------------- identity and geometry


def test_allocate_returns_a_buffer(buf):
    assert isinstance(buf, Buffer)
    assert not buf.released


def test_id_is_generation_and_slot(buf):
    assert isinstance(buf.id, int)
    assert buf.id >> 32 >= 1  # generation 0 is never issued
    assert buf.id & 0xFFFFFFFF < 256


def test_ids_of_live_buffers_are_distinct(manager):
    held = [manager.allocate(10) for _ in range(10)]
    assert len({b.id for b in held}) == 10
    for b in held:
        b.release()


def test_size_is_the_requested_size(buf):
    assert buf.size == 100


def test_capacity_is_the_pools_block_size(buf):
    assert buf.capacity == 256


def test_pool_is_the_pools_name(manager):
    with manager.allocate(1000) as b:
        assert b.pool == "small"


def test_handle_from_get_knows_size_capacity_and_pool(manager, buf):
    other = manager.get(buf.id)
    assert (other.id, other.size, other.capacity, other.pool) == (buf.id, 100, 256, "tiny")
    other.release()


def test_pool_name_of_a_buffer_from_a_pool_added_by_another_manager(domain, manager):
    with ShmManager(domain, reaper_interval=None) as other:
        other.add_pool(PoolConfig("extra", 512, 2))
        with other.allocate_from_pool("extra") as b, manager.get(b.id) as seen:
            assert seen.capacity == 512
            assert seen.pool == "extra"


def test_alloc_time_is_set_at_allocation(buf):
    assert buf.alloc_time > 0


def test_repr_shows_id_and_state(buf):
    assert f"{buf.id:#x}" in repr(buf) and "live" in repr(buf)
    buf.release()
    assert "released" in repr(buf)


# ---------------------------------------------------------------- timestamp


def test_timestamp_is_zero_until_set(buf):
    assert buf.timestamp == 0


def test_timestamp_is_settable_in_int_nanoseconds(buf):
    buf.timestamp = 1_700_000_000_123_456_789
    assert buf.timestamp == 1_700_000_000_123_456_789


def test_timestamp_is_shared_by_every_handle(manager, buf):
    buf.timestamp = 42
    with manager.get(buf.id) as other:
        assert other.timestamp == 42
        other.timestamp = 43
    assert buf.timestamp == 43


def test_timestamp_accepts_numpy_integers(buf):
    buf.timestamp = np.int64(7)
    assert buf.timestamp == 7


@pytest.mark.parametrize("value", [1.5, "1", None, True])
def test_timestamp_of_wrong_type_raises_type_error(buf, value):
    with pytest.raises(TypeError):
        buf.timestamp = value


def test_timestamp_out_of_64_bits_raises_value_error(buf):
    with pytest.raises(ValueError):
        buf.timestamp = 2**63


# ---------------------------------------------------------------- time_range


def test_time_range_is_none_until_set(buf):
    assert buf.time_range is None


def test_time_range_is_settable(buf):
    buf.time_range = (100, 200)
    assert buf.time_range == (100, 200)


def test_time_range_may_be_empty(buf):
    buf.time_range = (5, 5)
    assert buf.time_range == (5, 5)


def test_time_range_is_shared_by_every_handle(manager, buf):
    buf.time_range = (1, 2)
    with manager.get(buf.id) as other:
        assert other.time_range == (1, 2)


def test_time_range_can_be_cleared_with_none(buf):
    buf.time_range = (1, 2)
    buf.time_range = None
    assert buf.time_range is None


def test_time_range_does_not_disturb_the_timestamp(buf):
    buf.timestamp = 9
    buf.time_range = (1, 2)
    buf.time_range = None
    assert buf.timestamp == 9


def test_time_range_end_before_start_raises_value_error(buf):
    with pytest.raises(ValueError, match="before"):
        buf.time_range = (200, 100)
    assert buf.time_range is None


@pytest.mark.parametrize("value", [5, "ab", (1,), (1, 2, 3), (1.0, 2.0), ("a", 2), (1, None)])
def test_time_range_of_wrong_type_raises_type_error(buf, value):
    with pytest.raises(TypeError):
        buf.time_range = value


def test_reallocated_block_starts_without_timestamp_or_time_range(manager):
    first = manager.allocate(10)
    first.timestamp = 5
    first.time_range = (1, 2)
    slot = first.id & 0xFFFFFFFF
    first.release()
    with manager.allocate(10) as again:
        assert again.id & 0xFFFFFFFF == slot
        assert again.timestamp == 0
        assert again.time_range is None


# ---------------------------------------------------------------- zero-copy views


def test_memoryview_is_writable_and_covers_size_bytes(buf):
    view = buf.memoryview()
    assert len(view) == 100 and not view.readonly
    view[:5] = b"hello"
    assert bytes(buf.memoryview()[:5]) == b"hello"


def test_numpy_defaults_to_uint8_over_size_bytes(buf):
    arr = buf.numpy()
    assert arr.dtype == np.uint8 and arr.shape == (100,)
    assert arr.flags.writeable


def test_numpy_and_memoryview_share_memory(buf):
    arr = buf.numpy()
    buf.memoryview()[3] = 77
    assert arr[3] == 77
    arr[4] = 99
    assert buf.memoryview()[4] == 99


def test_numpy_view_is_not_a_copy(buf):
    a, b = buf.numpy(), buf.numpy(np.uint32, shape=(5,))
    assert a.ctypes.data == b.ctypes.data
    assert np.shares_memory(a, b)


def test_write_through_one_handle_is_read_through_another(manager, buf):
    buf.numpy(np.uint32, shape=(25,))[:] = np.arange(25)
    with manager.get(buf.id) as other:
        assert other.numpy(np.uint32, shape=(25,)).tolist() == list(range(25))
        assert other.numpy().ctypes.data == buf.numpy().ctypes.data  # the same bytes
        other.memoryview()[0:4] = (123).to_bytes(4, "little")
    assert buf.numpy(np.uint32, shape=(1,))[0] == 123


def test_numpy_with_dtype_and_shape(manager):
    with manager.allocate(4096) as b:
        arr = b.numpy(np.float32, shape=(32, 32))
        assert arr.shape == (32, 32) and arr.dtype == np.float32
        arr[1, 2] = 1.5
        assert b.numpy(np.float32)[34] == 1.5


def test_numpy_shape_may_cover_fewer_bytes(buf):
    assert buf.numpy(np.uint64, shape=3).shape == (3,)


def test_numpy_size_not_a_multiple_of_itemsize_raises_value_error(buf):
    with pytest.raises(ValueError, match="multiple"):
        buf.numpy(np.uint64)  # 100 bytes


def test_numpy_shape_too_big_raises_value_error(buf):
    with pytest.raises(ValueError, match="needs"):
        buf.numpy(np.uint32, shape=(26,))  # 104 bytes > 100


def test_numpy_negative_shape_raises_value_error(buf):
    with pytest.raises(ValueError):
        buf.numpy(np.uint8, shape=(-1, -2))


# ---------------------------------------------------------------- references


def test_new_buffer_has_one_reference(buf):
    assert buf.ref_count == 1


def test_share_adds_a_reference(buf):
    other = buf.share()
    assert other is not buf and other.id == buf.id
    assert buf.ref_count == 2
    other.release()
    assert buf.ref_count == 1


def test_get_adds_a_reference(manager, buf):
    other = manager.get(buf.id)
    assert buf.ref_count == other.ref_count == 2
    other.release()
    assert buf.ref_count == 1


def test_block_stays_allocated_until_the_last_reference_goes(manager, buf):
    other = buf.share()
    buf.release()
    assert other.ref_count == 1
    assert manager.get_stats().total_allocated == 1
    other.release()
    assert manager.get_stats().total_allocated == 0


def test_release_returns_the_block_to_its_pool(manager, buf):
    assert manager.get_pool("tiny").stats().blocks_used == 1
    buf.release()
    assert buf.released
    assert manager.get_pool("tiny").stats().blocks_used == 0


def test_context_manager_releases(manager):
    with manager.allocate(10) as b:
        assert b.ref_count == 1
    assert b.released
    assert manager.get_stats().total_allocated == 0


def test_context_manager_after_explicit_release_does_not_fail(manager):
    with manager.allocate(10) as b:
        b.release()
    assert manager.get_stats().total_allocated == 0


def test_handle_dropped_without_release_releases_itself(manager):
    b = manager.allocate(10)
    buffer_id = b.id
    del b
    gc.collect()
    assert manager.get_stats().total_allocated == 0
    with pytest.raises(InvalidBufferError):
        manager.get(buffer_id)


def test_handle_in_a_reference_cycle_releases_itself_when_collected(manager):
    holder = {"buffer": manager.allocate(10)}
    holder["self"] = holder
    del holder
    gc.collect()
    assert manager.get_stats().total_allocated == 0


def test_dropping_one_of_two_handles_keeps_the_other(manager, buf):
    other = buf.share()
    del other
    gc.collect()
    assert buf.ref_count == 1


# ---------------------------------------------------------------- released handles


@pytest.mark.parametrize(
    "use",
    [
        lambda b: b.memoryview(),
        lambda b: b.numpy(),
        lambda b: b.timestamp,
        lambda b: setattr(b, "timestamp", 1),
        lambda b: b.time_range,
        lambda b: setattr(b, "time_range", (1, 2)),
        lambda b: b.ref_count,
        lambda b: b.share(),
        lambda b: b.release(),
        lambda b: b.alloc_time,
        lambda b: b.__enter__(),
    ],
    ids=["memoryview", "numpy", "timestamp", "set_timestamp", "time_range", "set_time_range",
         "ref_count", "share", "release_twice", "alloc_time", "enter"],
)
def test_using_a_released_handle_raises_buffer_released_error(manager, use):
    b = manager.allocate(10)
    b.release()
    with pytest.raises(BufferReleasedError):
        use(b)


def test_buffer_released_error_is_an_invalid_buffer_error():
    assert issubclass(BufferReleasedError, InvalidBufferError)


def test_released_handle_keeps_its_id_size_and_pool(manager):
    b = manager.allocate(10)
    buffer_id = b.id
    b.release()
    assert (b.id, b.size, b.pool) == (buffer_id, 10, "tiny")


# ---------------------------------------------------------------- stale and forged ids


def test_stale_id_raises_invalid_buffer_error(manager):
    b = manager.allocate(10)
    old_id = b.id
    b.release()
    with pytest.raises(InvalidBufferError, match="stale"):
        manager.get(old_id)


def test_stale_id_of_a_reused_slot_does_not_touch_the_new_owner(manager):
    old = manager.allocate(10)
    old_id = old.id
    old.release()
    new = manager.allocate(10)
    assert new.id & 0xFFFFFFFF == old_id & 0xFFFFFFFF  # same slot, next generation
    assert new.id != old_id
    with pytest.raises(InvalidBufferError):
        manager.get(old_id)
    assert new.ref_count == 1
    assert manager.context.release(old_id) == -1
    assert new.ref_count == 1
    new.release()


@pytest.mark.parametrize(
    "forged",
    [
        0,
        1,
        0xFFFFFFFF,  # generation 0, largest slot
        (1 << 32) | 200_000,  # slot out of range
        (1 << 32) | 255,  # slot in the table but never handed to a pool
        (0xABCDEF << 32) | 3,
        2**64 - 1,
        0x7A3F_91C4_0000_0007,
    ],
)
def test_forged_id_raises_invalid_buffer_error(manager, forged):
    with pytest.raises(InvalidBufferError):
        manager.get(forged)


def test_generation_zero_of_a_live_slot_raises_invalid_buffer_error(manager, buf):
    with pytest.raises(InvalidBufferError):
        manager.get(buf.id & 0xFFFFFFFF)
    assert buf.ref_count == 1


def test_wrong_generation_of_a_live_slot_raises_invalid_buffer_error(manager, buf):
    with pytest.raises(InvalidBufferError):
        manager.get(buf.id + (1 << 32))
    assert buf.ref_count == 1


def test_free_slot_raises_invalid_buffer_error(manager, buf):
    slot = buf.id & 0xFFFFFFFF
    with pytest.raises(InvalidBufferError):
        manager.get((1 << 32) | (slot + 1))  # a block of the same pool, never allocated


@pytest.mark.parametrize("bad", [-1, -(1 << 32), 2**64, 2**100])
def test_negative_or_too_large_id_raises_invalid_buffer_error(manager, bad):
    with pytest.raises(InvalidBufferError):
        manager.get(bad)


@pytest.mark.parametrize("bad", ["1", 1.0, None, True, b"\x01"])
def test_non_int_id_raises_type_error(manager, bad):
    with pytest.raises(TypeError):
        manager.get(bad)


def test_invalid_buffer_error_message_names_the_id_and_domain(domain, manager):
    with pytest.raises(InvalidBufferError) as info:
        manager.get(0x1234)
    assert "0x1234" in str(info.value) and domain in str(info.value)


# ---------------------------------------------------------------- handles of a shut-down manager


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(lambda b: b.release(), id="release"),
        pytest.param(lambda b: b.ref_count, id="ref_count"),
        pytest.param(lambda b: b.memoryview(), id="memoryview"),
        pytest.param(lambda b: b.timestamp, id="timestamp"),
        pytest.param(lambda b: b.share(), id="share"),
    ],
)
def test_handle_of_a_shut_down_manager_raises_a_clear_error(domain, small_config, use):
    m = ShmManager(domain, small_config, reaper_interval=None)
    b = m.allocate(10)
    m.shutdown()
    try:
        with pytest.raises((NotInitializedError, InvalidBufferError)):
            use(b)
    finally:
        b._live = False  # its reference went with the shutdown


def test_handle_from_before_shutdown_does_not_release_a_buffer_after_initialize(
        domain, small_config):
    with ShmManager(domain, small_config, reaper_interval=None) as m:
        old = m.allocate(10)
        m.shutdown()
        m.initialize()
        new = m.allocate(10)
        try:
            del old
            gc.collect()
            assert new.ref_count == 1
            assert m.get_stats().total_allocated == 1
        finally:
            new._live = False
