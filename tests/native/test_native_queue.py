"""multiqueue._native.Queue from Python: each method, its return codes and its errors.

The methods are called on a real port queue's native object (``queue._native``), with
buffer ids taken straight from the manager's Context (``ctx.alloc``), so no Buffer
handle gets in the way of the reference accounting.  Construction is also checked on
hand-built queue headers in plain bytearrays.
"""

import ctypes
import os
import threading

import pytest

from helpers import run_python
from multiqueue import PoolConfig, ShmConfig, _native
from multiqueue.errors import QueueClosedError
from multiqueue.shm.segment import process_start_time
from multiqueue.stream import PortQueue
from multiqueue.stream.queue import Item, QueueHeader, ReaderRecord

BLOCK, DROP = 0, 1


@pytest.fixture
def small_config():
    return ShmConfig(pools=[PoolConfig("p", 256, 256)], max_buffers=512)


@pytest.fixture
def q(manager):
    """A port queue of capacity 4 and at most 3 readers."""
    queue = PortQueue(manager, "nq", capacity=4, max_readers=3)
    yield queue
    queue.release()


@pytest.fixture
def ctx(manager):
    return manager.context


def alloc(ctx) -> int:
    buffer_id = ctx.alloc(0, 8)
    assert buffer_id > 0
    return buffer_id


PID, START = os.getpid(), process_start_time(os.getpid())


def join(q, policy=BLOCK, oldest=False) -> int:
    return q._native.join(policy, oldest, PID, START)


def valid_header(buf, capacity=4, max_readers=2) -> None:
    h = QueueHeader.from_buffer(buf)
    h.capacity, h.mask, h.max_readers = capacity, capacity - 1, max_readers
    del h


def queue_bytes(capacity=4, max_readers=2) -> int:
    return ctypes.sizeof(QueueHeader) + max_readers * ctypes.sizeof(ReaderRecord) + \
        capacity * ctypes.sizeof(Item)


# ---------------------------------------------------------------- join


def test_join_returns_a_reader_index_and_fills_its_record(q):
    assert join(q, DROP) == 0
    assert join(q) == 1
    r = q._readers[0]
    assert (r.state, r.policy, r.pid, r.start_time, r.cursor) == (1, DROP, PID, START, 0)
    assert q._readers[1].policy == BLOCK
    assert q._header.readers_hw == 2


def test_join_returns_minus_one_when_every_reader_slot_is_taken(q):
    assert [join(q) for _ in range(3)] == [0, 1, 2]
    assert join(q) == -1


def test_join_returns_minus_two_while_the_lock_is_held(q):
    q._header.lock = 77
    try:
        assert join(q) == -2
    finally:
        q._header.lock = 0


def test_join_oldest_starts_at_the_oldest_live_item_and_takes_a_reference(q, ctx):
    join(q)
    ids = [alloc(ctx) for _ in range(2)]
    for i in ids:
        assert q._native.push(i) == 1
    index = join(q, oldest=True)
    assert q._readers[index].cursor == 0
    assert [ctx.ref_count(i) for i in ids] == [2, 2]
    assert join(q) == 2 and q._readers[2].cursor == 2  # latest: at the head


# ---------------------------------------------------------------- push


def test_push_moves_the_reference_into_the_queue(q, ctx):
    join(q)
    join(q)
    buffer_id = alloc(ctx)
    assert q._native.push(buffer_id) == 1
    assert ctx.ref_count(buffer_id) == 2  # one per reader
    assert ctx.release(buffer_id) == -1  # this process no longer holds it
    assert (q._header.head, q._header.pushed) == (1, 1)


def test_push_with_no_reader_frees_the_block(q, ctx, manager):
    buffer_id = alloc(ctx)
    assert q._native.push(buffer_id) == 1
    assert ctx.ref_count(buffer_id) == -1
    assert q._header.head == 0 and q._header.pushed == 1
    assert manager.get_stats().total_allocated == 0


def test_push_returns_zero_when_a_block_reader_is_full(q, ctx):
    join(q)
    for _ in range(4):
        assert q._native.push(alloc(ctx)) == 1
    extra = alloc(ctx)
    assert q._native.push(extra) == 0
    assert ctx.ref_count(extra) == 1  # still ours
    assert ctx.release(extra) == 1


def test_push_drops_the_oldest_item_of_a_full_drop_reader(q, ctx):
    index = join(q, DROP)
    ids = [alloc(ctx) for _ in range(5)]
    for i in ids:
        assert q._native.push(i) == 1
    assert q._readers[index].drops == 1
    assert ctx.ref_count(ids[0]) == -1  # the dropped item was freed
    assert q._native.pop(index) == ids[1]


def test_push_returns_minus_one_when_closed(q, ctx):
    q._native.close(1)
    buffer_id = alloc(ctx)
    assert q._native.push(buffer_id) == -1
    assert ctx.release(buffer_id) == 1


def test_push_returns_minus_two_while_the_lock_is_held(q, ctx):
    buffer_id = alloc(ctx)
    q._header.lock = 77
    try:
        assert q._native.push(buffer_id) == -2
    finally:
        q._header.lock = 0
    assert ctx.ref_count(buffer_id) == 1


@pytest.mark.parametrize("bad", ["zero", "stale", "slot_out_of_range", "not_held"])
def test_push_returns_minus_three_for_an_id_this_process_does_not_hold(q, ctx, manager, bad):
    join(q)
    if bad == "zero":
        buffer_id = 0
    elif bad == "stale":
        buffer_id = alloc(ctx)
        ctx.release(buffer_id)
    elif bad == "slot_out_of_range":
        buffer_id = (1 << 32) | 100_000
    else:  # valid, but its reference already moved into the queue
        buffer_id = alloc(ctx)
        assert q._native.push(buffer_id) == 1
    assert q._native.push(buffer_id) == -3
    assert q._header.pushed == (1 if bad == "not_held" else 0)


def test_push_of_a_non_integer_raises_type_error(q):
    with pytest.raises(TypeError):
        q._native.push("1")


def test_push_stamps_an_unstamped_item_in_the_ring(q, ctx):
    join(q)
    buffer_id = alloc(ctx)
    q._native.push(buffer_id)
    ring_offset = ctypes.sizeof(QueueHeader) + 3 * ctypes.sizeof(ReaderRecord)
    ring = (Item * 4).from_buffer(q._segment.mmap, ring_offset)
    assert ring[0].id == buffer_id and ring[0].timestamp_ns > 0
    assert manager_timestamp(q, buffer_id) == ring[0].timestamp_ns
    del ring


def manager_timestamp(q, buffer_id) -> int:
    return q.manager._entries[buffer_id & 0xFFFFFFFF].timestamp_ns


# ---------------------------------------------------------------- pop and peek


def test_pop_returns_the_id_and_moves_the_reference_to_this_process(q, ctx):
    index = join(q)
    buffer_id = alloc(ctx)
    q._native.push(buffer_id)
    assert q._native.pop(index) == buffer_id
    assert q._readers[index].popped == 1
    assert ctx.release(buffer_id) == 1  # ours now: the last reference


def test_pop_returns_minus_one_when_empty(q):
    assert q._native.pop(join(q)) == -1


def test_pop_returns_minus_two_when_closed_and_drained(q, ctx):
    index = join(q)
    buffer_id = alloc(ctx)
    q._native.push(buffer_id)
    q._native.close(1)
    assert q._native.pop(index) == buffer_id  # what was pushed before the close
    assert q._native.pop(index) == -2
    ctx.release(buffer_id)


def test_pop_returns_minus_four_for_a_detached_reader(q):
    index = join(q)
    q._native.detach(index)
    assert q._native.pop(index) == -4


@pytest.mark.parametrize("method", ["pop", "peek", "detach"])
def test_reader_index_out_of_range_raises_value_error(q, method):
    with pytest.raises(ValueError, match="out of range"):
        getattr(q._native, method)(3)
    with pytest.raises(OverflowError):
        getattr(q._native, method)(-1)


def test_peek_returns_the_next_id_without_taking_it(q, ctx):
    index = join(q)
    buffer_id = alloc(ctx)
    q._native.push(buffer_id)
    assert q._native.peek(index) == buffer_id
    assert q._native.peek(index) == buffer_id
    assert q._readers[index].cursor == 0 and ctx.ref_count(buffer_id) == 1


def test_peek_returns_minus_one_when_empty_or_detached(q, ctx):
    index = join(q)
    assert q._native.peek(index) == -1
    q._native.push(alloc(ctx))
    q._native.detach(index)
    assert q._native.peek(index) == -1


# ---------------------------------------------------------------- detach


def test_detach_releases_unread_items_and_frees_the_slot(q, ctx, manager):
    index = join(q)
    for _ in range(3):
        q._native.push(alloc(ctx))
    assert q._native.detach(index) == 3
    assert q._readers[index].state == 0
    assert manager.get_stats().total_allocated == 0
    assert join(q) == index  # the slot is free again


def test_detach_of_a_free_slot_returns_zero(q):
    assert q._native.detach(2) == 0


def test_detach_returns_minus_two_while_the_lock_is_held(q):
    index = join(q)
    q._header.lock = 77
    try:
        assert q._native.detach(index) == -2
    finally:
        q._header.lock = 0
    assert q._readers[index].state == 1


# ---------------------------------------------------------------- wait


def test_wait_returns_one_when_an_item_is_ready(q, ctx):
    index = join(q)
    q._native.push(alloc(ctx))
    assert q._native.wait(0, index, 1.0, 0.0) == 1


def test_wait_returns_zero_on_timeout(q):
    index = join(q)
    assert q._native.wait(0, index, 0.01, 0.0) == 0
    assert q._native.wait(0, index, 0.0, 0.0) == 0


def test_wait_for_space_returns_zero_on_timeout_and_counts_blocked_time(q, ctx):
    join(q)
    for _ in range(4):
        q._native.push(alloc(ctx))
    assert q._native.wait(1, 0, 0.02, 0.0) == 0
    assert q._header.blocked_ns >= 15_000_000


def test_wait_for_space_returns_one_when_every_block_reader_has_room(q, ctx):
    join(q, DROP)
    for _ in range(4):
        q._native.push(alloc(ctx))
    assert q._native.wait(1, 0, 1.0, 0.0) == 1  # a full drop reader needs no room


def test_wait_returns_minus_one_when_closed(q):
    index = join(q)
    q._native.close(1)
    assert q._native.wait(0, index, 1.0, 0.0) == -1
    assert q._native.wait(1, 0, 1.0, 0.0) == -1


def test_wait_returns_minus_one_for_a_detached_reader(q):
    index = join(q)
    q._native.detach(index)
    assert q._native.wait(0, index, 1.0, 0.0) == -1


def test_wait_is_woken_by_a_push_from_another_thread(q, ctx):
    index = join(q)
    result = []
    thread = threading.Thread(target=lambda: result.append(q._native.wait(0, index, 30.0, 0.0)))
    thread.start()
    while q._header.data_waiters == 0:  # until it arms its wake-up, about to sleep
        assert thread.is_alive()
    q._native.push(alloc(ctx))
    thread.join(10)
    assert result == [1]


def test_busy_poll_wait_spins_and_sees_a_push(q, ctx):
    index = join(q)
    go = threading.Event()
    result = []
    thread = threading.Thread(target=lambda: (go.set(), result.append(q._native.wait(0, index, 30.0, -1.0))))
    thread.start()
    go.wait(10)
    q._native.push(alloc(ctx))
    thread.join(10)
    assert result == [1]


def test_wait_for_readers_counts_active_readers(q):
    assert q._native.wait(2, 0, 0.0, 0.0) == 1
    assert q._native.wait(2, 1, 0.01, 0.0) == 0
    index = join(q)
    assert q._native.wait(2, 1, 0.0, 0.0) == 1
    q._native.detach(index)
    assert q._native.wait(2, 1, 0.0, 0.0) == 0
    q._native.close(1)
    assert q._native.wait(2, 1, 1.0, 0.0) == -1


def test_join_wakes_a_producer_waiting_for_readers(q):
    result = []
    thread = threading.Thread(target=lambda: result.append(q._native.wait(2, 1, 30.0, 0.0)))
    thread.start()
    while q._header.space_waiters == 0:
        assert thread.is_alive()
    join(q)
    thread.join(10)
    assert result == [1]


@pytest.mark.parametrize("args", [(3, 0, 0.0, 0.0), (-1, 0, 0.0, 0.0), (0, 3, 0.0, 0.0),
                                  (0, 0, float("nan"), 0.0), (0, 0, 0.0, float("nan"))])
def test_wait_with_bad_arguments_raises_value_error(q, args):
    join(q)
    with pytest.raises(ValueError):
        q._native.wait(*args)


# ---------------------------------------------------------------- close and steal_lock


def test_close_returns_the_previous_state_and_keeps_the_first(q):
    assert q._native.close(1) == 0
    assert q._native.close(2) == 1
    assert q._header.closed == 1


def test_close_wakes_a_waiting_reader(q):
    index = join(q)
    result = []
    thread = threading.Thread(target=lambda: result.append(q._native.wait(0, index, 30.0, 0.0)))
    thread.start()
    while q._header.data_waiters == 0:
        assert thread.is_alive()
    q._native.close(2)
    thread.join(10)
    assert result == [-1]


def test_steal_lock_with_the_wrong_holder_returns_false(q):
    q._header.lock = 77
    assert q._native.steal_lock(76) is False
    assert q._header.lock == 77
    assert q._native.steal_lock(77) is True
    assert q._header.lock == 0


# ---------------------------------------------------------------- release_view


@pytest.fixture
def released(manager, q):
    """A second native Queue on the same segment, its view released."""
    native = _native.Queue(manager.context, q._segment.mmap)
    native.release_view()
    return native


@pytest.mark.parametrize("call", [
    lambda n: n.push(1), lambda n: n.pop(0), lambda n: n.peek(0), lambda n: n.join(0, False, 1, 1),
    lambda n: n.wait(0, 0, 0.0, 0.0), lambda n: n.close(1), lambda n: n.steal_lock(1),
])
def test_methods_after_release_view_raise_runtime_error(released, call):
    with pytest.raises(RuntimeError, match="closed in this process"):
        call(released)


def test_release_view_twice_is_fine(released):
    assert released.release_view() is None


def test_detach_after_release_view_raises_runtime_error(released):
    with pytest.raises(RuntimeError):
        released.detach(0)


# ---------------------------------------------------------------- construction


def test_queue_on_a_valid_hand_built_header(ctx):
    buf = bytearray(queue_bytes())
    valid_header(buf)
    native = _native.Queue(ctx, buf)
    assert native.pop(0) == -4  # no reader there
    native.release_view()


def test_queue_needs_a_context(ctx):
    buf = bytearray(queue_bytes())
    valid_header(buf)
    with pytest.raises(TypeError):
        _native.Queue(object(), buf)


def test_queue_needs_a_writable_buffer(ctx):
    buf = bytearray(queue_bytes())
    valid_header(buf)
    with pytest.raises((TypeError, BufferError)):
        _native.Queue(ctx, bytes(buf))


def test_queue_cannot_be_initialized_twice(ctx):
    buf = bytearray(queue_bytes())
    valid_header(buf)
    native = _native.Queue(ctx, buf)
    with pytest.raises(RuntimeError, match="already initialized"):
        native.__init__(ctx, buf)
    native.release_view()


@pytest.mark.parametrize("size", [80, 128, 255])
def test_queue_on_a_buffer_smaller_than_the_header_raises_value_error(ctx, size):
    buf = bytearray(size)
    with pytest.raises(ValueError, match="too small or corrupt"):
        _native.Queue(ctx, buf)


@pytest.mark.parametrize("corrupt", [
    {"capacity": 0}, {"capacity": 3, "mask": 2}, {"mask": 7}, {"max_readers": 0},
    {"max_readers": 1025}, {"readers_hw": 3}, {"capacity": 1 << 20, "mask": (1 << 20) - 1},
    {"max_readers": 1000},
])
def test_queue_on_a_corrupt_header_raises_value_error(ctx, corrupt):
    buf = bytearray(queue_bytes())
    valid_header(buf)
    h = QueueHeader.from_buffer(buf)
    for field, value in corrupt.items():
        setattr(h, field, value)
    del h
    with pytest.raises(ValueError, match="too small or corrupt"):
        _native.Queue(ctx, buf)


TINY_BUFFER_AT_A_PAGE_END = """
import ctypes, mmap
from multiqueue import _native
from multiqueue.shm import layout as L

lay = L.control_layout(max_processes=1, max_pools=1, max_buffers=1)
control = mmap.mmap(-1, lay["total"])
c = L.Control.from_buffer(control)
c.max_processes, c.max_pools, c.max_buffers = 1, 1, 1
c.procs_offset, c.pools_offset = lay["procs"], lay["pools"]
c.meta_offset, c.ledger_offset = lay["meta"], lay["ledger"]
del c
ctx = _native.Context(control, 0)

libc = ctypes.CDLL(None)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                      ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
page = mmap.PAGESIZE
base = libc.mmap(None, 2 * page, mmap.PROT_READ | mmap.PROT_WRITE,
                 mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
assert libc.mprotect(base + page, page, 0) == 0  # PROT_NONE: a guard page right after
for size in (16, 64):
    tiny = (ctypes.c_char * size).from_address(base + page - size)
    try:
        _native.Queue(ctx, tiny)
        print("accepted", size)
    except ValueError:
        print("refused", size)
"""


def test_queue_on_a_tiny_buffer_at_a_page_end_raises_value_error_not_a_crash():
    result = run_python(TINY_BUFFER_AT_A_PAGE_END, timeout=30)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert result.stdout.split() == ["refused", "16", "refused", "64"]


@pytest.mark.parametrize("kind", [0, 1])
def test_release_view_wakes_threads_waiting_in_wait_and_unmaps_after_they_left(manager, q, kind):
    native = _native.Queue(manager.context, q._segment.mmap)
    index = q._native.join(0, False, os.getpid(), process_start_time(os.getpid()))
    if kind == 1:  # make the space wait block: fill the blocking reader
        for _ in range(q.capacity):
            assert q._native.push(manager.context.alloc(0, 8)) == 1
    results, entered = [], threading.Event()

    def waiter():
        entered.set()
        results.append(native.wait(kind, index, 30.0, 0.0))

    thread = threading.Thread(target=waiter)
    thread.start()
    entered.wait()
    armed = QueueHeader.space_waiters if kind else QueueHeader.data_waiters
    while not _native.atomic_load_u32(q._segment.mmap, armed.offset):
        pass  # the waiter arms its wake-up just before it sleeps in the kernel
    native.release_view()  # returns only once the waiter has left the mapping
    thread.join(30)
    assert results == [-1] and not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed in this process"):
        native.wait(kind, index, 0.0, 0.0)
    q._native.detach(index)


def test_a_reader_waiting_in_pop_gets_queue_closed_error_when_the_queue_is_released(manager):
    queue = PortQueue(manager, "rel", capacity=4)
    reader = queue.reader()
    errors, entered = [], threading.Event()

    def waiter():
        entered.set()
        try:
            reader.pop(timeout=30)
        except Exception as e:  # noqa: BLE001 - the test looks at which
            errors.append(e)

    thread = threading.Thread(target=waiter)
    thread.start()
    entered.wait()
    while not queue._header.data_waiters:
        pass  # asleep in the kernel, or about to be
    queue.release()
    thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], QueueClosedError), errors


def test_a_forked_child_releases_a_queue_a_parent_thread_waits_on_without_hanging(manager, q):
    """The child inherits the count of waiting threads, not the threads: it must not wait for them."""
    native = _native.Queue(manager.context, q._segment.mmap)
    index = q._native.join(0, False, os.getpid(), process_start_time(os.getpid()))
    entered = threading.Event()
    thread = threading.Thread(target=lambda: (entered.set(), native.wait(0, index, 30.0, 0.0)))
    thread.start()
    entered.wait()
    while not _native.atomic_load_u32(q._segment.mmap, QueueHeader.data_waiters.offset):
        pass  # the thread is about to sleep in the kernel
    pid = os.fork()
    if pid == 0:  # the child: release at once, then leave without running the parent's cleanup
        native.release_view()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    native.release_view()  # the parent's thread leaves the wait, then the mapping goes
    thread.join(30)
    assert not thread.is_alive()
    q._native.detach(index)
