"""PortQueue and QueueReader in one process (threads at most; a subprocess for the producer rule).

Multi-process streaming, crashes and back pressure across interpreters are in
test_queue_multiprocess.py; the C-level ``_native.Queue`` methods in test_native_queue.py.
Items are 8-byte buffers carrying a uint64 value, so a reader can tell them apart.
"""

import gc
import os
import threading
import time
import uuid

import pytest

from helpers import run_python
from multiqueue import (
    BufferReleasedError,
    MultiQueueError,
    NotInitializedError,
    PoolConfig,
    SegmentError,
    ShmConfig,
    ShmManager,
)
from multiqueue.errors import QueueClosedError, ReadersFullError
from multiqueue.shm import layout as L
from multiqueue.shm.segment import domain_segments, segment_path, unlink_quietly
from multiqueue.stream import PortQueue, QueueReader


@pytest.fixture
def small_config():
    """One pool of small blocks (overrides conftest's, so its `manager` fixture uses it)."""
    return ShmConfig(pools=[PoolConfig("p", 256, 256)], max_buffers=512)


@pytest.fixture
def other_manager(small_config):
    """A manager of a second, unrelated domain (removed afterwards, like `domain`)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    m = ShmManager(name, small_config, reaper_interval=None)
    yield m
    m.shutdown()
    leftovers = domain_segments("mq.", name)
    for path in leftovers:
        unlink_quietly(path)
    assert not leftovers, f"test left segments behind: {leftovers}"


@pytest.fixture
def observer(domain, manager):
    """A second manager of the same domain in this process: sees the queue from outside."""
    m = ShmManager(domain, create=False, reaper_interval=None)
    yield m
    m.shutdown()


def item(manager, value=0):
    b = manager.allocate(8)
    b.numpy("uint64")[0] = value
    return b


def value_of(buffer) -> int:
    return int(buffer.numpy("uint64")[0])


def push_values(queue, manager, values) -> None:
    for v in values:
        queue.push(item(manager, v))


def take(buffer) -> int:
    """The value of a popped buffer, released."""
    v = value_of(buffer)
    buffer.release()
    return v


def drain(reader) -> list[int]:
    """Every value ready for `reader` (queue still open), each buffer released."""
    out = []
    while (b := reader.try_pop()) is not None:
        out.append(take(b))
    return out


def wait_until(predicate, timeout=5.0) -> None:
    """Spin (yielding) until predicate() holds: used to know another thread is asleep."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        os.sched_yield()


def run_in_thread(target):
    """Start target() in a thread; returns (thread, outcome) where outcome gets its result or error."""
    outcome = {}

    def main():
        try:
            outcome["result"] = target()
        except BaseException as e:  # reported to the test thread
            outcome["error"] = e

    t = threading.Thread(target=main, daemon=True)
    t.start()
    return t, outcome


def finish(thread, timeout=10.0) -> None:
    thread.join(timeout)
    assert not thread.is_alive(), "thread did not finish"


# ---------------------------------------------------------------- create and open


def test_create_then_open_by_name_shares_the_ring(manager):
    q = PortQueue(manager, "q", capacity=8)
    same = PortQueue(manager, "q", create=False)
    r = same.reader()
    push_values(q, manager, [1, 2])
    assert same.capacity == 8
    assert drain(r) == [1, 2]


def test_pushed_counts_every_push_seen_by_every_handle(manager):
    q = PortQueue(manager, "q", capacity=8)
    same = PortQueue(manager, "q", create=False)
    assert q.pushed == 0
    push_values(q, manager, [1, 2])  # nobody reads: released at once, but pushed
    r = same.reader()
    push_values(same, manager, [3])
    assert q.pushed == same.pushed == 3
    assert drain(r) == [3]


def test_queue_is_a_segment_of_its_domain(domain, manager):
    PortQueue(manager, "frames")
    assert os.path.exists(segment_path("mq.", domain, "q.frames"))


def test_opening_an_existing_queue_keeps_its_capacity(manager):
    PortQueue(manager, "q", capacity=8)
    assert PortQueue(manager, "q", capacity=32).capacity == 8


def test_open_missing_queue_with_create_false_raises_segment_error(domain, manager):
    with pytest.raises(SegmentError, match="does not exist"):
        PortQueue(manager, "missing", create=False)
    assert not os.path.exists(segment_path("mq.", domain, "q.missing"))


@pytest.mark.parametrize("capacity", [1, 2, 64, 2**24])
def test_power_of_two_capacities_are_accepted(manager, capacity):
    assert PortQueue(manager, "q", capacity=capacity, max_readers=1).capacity == capacity


@pytest.mark.parametrize("capacity", [0, 3, 6, 100, -4, 2**25, 2.0, "8", None])
def test_capacity_that_is_not_a_power_of_two_raises_value_error(manager, capacity):
    with pytest.raises(ValueError, match="power of two"):
        PortQueue(manager, "q", capacity=capacity)


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "a b", "../q", "x" * 32, None, 5])
def test_invalid_queue_names_raise_value_error(manager, name):
    with pytest.raises(ValueError, match="invalid queue name"):
        PortQueue(manager, name)


def test_name_of_31_characters_is_accepted(manager):
    q = PortQueue(manager, "n" * 31, capacity=2)
    assert q.name == "n" * 31
    assert q._header.name == b"n" * 31


@pytest.mark.parametrize("kwargs", [{"max_readers": 0}, {"max_readers": 1025}, {"clock": "tai"}])
def test_bad_max_readers_or_clock_raise_value_error(manager, kwargs):
    with pytest.raises(ValueError):
        PortQueue(manager, "q", **kwargs)


def test_manager_argument_must_be_a_shm_manager():
    with pytest.raises(TypeError, match="ShmManager"):
        PortQueue("domain", "q")


def test_queue_on_a_shut_down_manager_raises_not_initialized(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    m.shutdown()
    with pytest.raises(NotInitializedError):
        PortQueue(m, "q")


def test_release_unmaps_the_queue_but_it_lives_on_in_the_domain(manager):
    view = PortQueue(manager, "q")
    r = view.reader()
    with PortQueue(manager, "q") as q:
        q.push(item(manager, 7))
    assert q._native is None
    q.release()  # twice is fine
    assert take(r.pop(timeout=0)) == 7


def test_reprs_name_the_queue_and_the_reader(manager):
    q = PortQueue(manager, "q", capacity=4)
    r = q.reader("drop_oldest")
    assert "'q'" in repr(q) and "capacity=4" in repr(q)
    assert "QueueReader 0" in repr(r) and "drop_oldest" in repr(r)


# ---------------------------------------------------------------- ids, never copies


def test_popped_buffer_is_the_pushed_block_not_a_copy(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    b = manager.allocate(64)
    kept = b.share()  # push releases b: keep a handle of our own
    q.push(b)
    kept.memoryview()[:5] = b"after"  # written after the push
    popped = r.pop(timeout=0)
    assert popped.id == kept.id
    assert bytes(popped.memoryview()[:5]) == b"after"
    assert popped.numpy().ctypes.data == kept.numpy().ctypes.data  # the same memory
    popped.memoryview()[0:1] = b"A"
    assert bytes(kept.memoryview()[:1]) == b"A"


def test_push_releases_the_producer_handle(manager):
    q = PortQueue(manager, "q")
    _held = q.reader()
    b = item(manager)
    q.push(b)
    assert b.released
    with pytest.raises(BufferReleasedError):
        b.memoryview()


# ---------------------------------------------------------------- multicast


def test_forty_readers_each_receive_every_item_in_order(manager):
    q = PortQueue(manager, "q", capacity=16)
    readers = [q.reader() for _ in range(40)]
    ids = []
    for v in range(16):
        b = item(manager, v)
        ids.append(b.id)
        q.push(b)
    for r in readers:
        batch = r.pop_many(16, timeout=0)
        assert [b.id for b in batch] == ids
        assert [take(b) for b in batch] == list(range(16))
    assert manager.get_stats().total_allocated == 0


def test_each_reader_has_its_own_cursor(manager):
    q = PortQueue(manager, "q")
    fast, slow = q.reader(), q.reader()
    push_values(q, manager, [1, 2, 3])
    assert drain(fast) == [1, 2, 3]
    assert (fast.lag, slow.lag) == (0, 3)
    push_values(q, manager, [4])
    assert drain(slow) == [1, 2, 3, 4]
    assert drain(fast) == [4]


# ---------------------------------------------------------------- start


def test_latest_reader_sees_only_items_pushed_after_it_joined(manager):
    q = PortQueue(manager, "q")
    _held = q.reader()  # keeps earlier items held
    push_values(q, manager, [1, 2])
    r = q.reader()  # start="latest" is the default
    assert r.try_pop() is None
    push_values(q, manager, [3])
    assert drain(r) == [3]


def test_oldest_reader_gets_every_item_still_held(manager):
    q = PortQueue(manager, "q")
    _held = q.reader()
    push_values(q, manager, [1, 2, 3])
    r = q.reader(start="oldest")
    assert r.lag == 3
    assert drain(r) == [1, 2, 3]


def test_oldest_reader_skips_items_already_freed(manager):
    q = PortQueue(manager, "q")
    first = q.reader()
    push_values(q, manager, [1, 2, 3])
    assert take(first.pop(timeout=0)) == 1  # item 1 freed: no one holds it any more
    r = q.reader(start="oldest")
    assert drain(r) == [2, 3]


def test_oldest_reader_gets_nothing_pushed_while_no_reader_was_attached(manager):
    q = PortQueue(manager, "q")
    push_values(q, manager, [1, 2])
    r = q.reader(start="oldest")
    assert r.try_pop() is None


# ---------------------------------------------------------------- references


def test_each_unread_item_holds_one_reference_per_reader(manager):
    q = PortQueue(manager, "q")
    r1, r2, r3 = q.reader(), q.reader(), q.reader()
    b = item(manager)
    kept = b.share()
    q.push(b)
    assert kept.ref_count == 1 + 3
    popped = r1.pop(timeout=0)  # the queue's reference moves to the handle
    assert kept.ref_count == 4
    popped.release()
    assert kept.ref_count == 3
    assert r2.detach() == 1
    assert kept.ref_count == 2
    peeked = r3.peek()  # a new reference
    assert kept.ref_count == 3
    peeked.release()
    r3.pop(timeout=0).release()
    assert kept.ref_count == 1
    kept.release()
    assert manager.get_stats().total_allocated == 0


def test_reading_and_releasing_everything_frees_every_block(manager):
    q = PortQueue(manager, "q", capacity=32)
    readers = [q.reader() for _ in range(3)]
    push_values(q, manager, range(30))
    assert manager.get_stats().total_allocated == 30
    for r in readers:
        assert drain(r) == list(range(30))
    assert manager.get_stats().total_allocated == 0


def test_detach_releases_unread_items_and_returns_their_count(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    push_values(q, manager, range(5))
    assert r.detach() == 5
    assert r.detach() == 0  # twice is fine
    assert q.stats().readers == []
    assert manager.get_stats().total_allocated == 0


def test_reader_as_context_manager_detaches_on_exit(manager):
    q = PortQueue(manager, "q")
    with q.reader() as r:
        push_values(q, manager, [1])
        assert isinstance(r, QueueReader)
    assert q.stats().readers == []
    assert manager.get_stats().total_allocated == 0


def test_detached_reader_pop_raises_queue_closed_error(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    r.close()  # alias of detach
    for look in (lambda: r.pop(timeout=0), r.try_pop, lambda: r.pop_many(4), r.peek):
        with pytest.raises(QueueClosedError, match="detached"):  # its slot may be another reader's now
            look()


def test_push_without_readers_never_blocks_and_releases_at_once(manager):
    q = PortQueue(manager, "q", capacity=2)
    b = item(manager)
    kept = b.share()
    q.push(b, timeout=0)
    assert kept.ref_count == 1  # only ours: the queue kept nothing
    kept.release()
    push_values(q, manager, range(10))  # far beyond the capacity, never blocks
    assert q.size == 0
    assert q.stats().pushed == 11
    assert manager.get_stats().total_allocated == 0


def test_blocks_the_queue_frees_are_counted_as_deallocations(manager):
    q = PortQueue(manager, "q")
    push_values(q, manager, range(3))  # no reader: each freed by the push
    stats = manager.get_stats()
    assert stats.total_allocated == 0
    assert stats.deallocation_count == stats.allocation_count == 3


# ---------------------------------------------------------------- policies


def test_full_block_reader_makes_push_time_out(manager):
    q = PortQueue(manager, "q", capacity=4)
    r = q.reader("block")
    push_values(q, manager, range(4))
    extra = item(manager, 4)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="'q'"):
        q.push(extra, timeout=0.02)
    assert time.monotonic() - t0 >= 0.02
    assert not extra.released and extra.ref_count == 1  # still ours
    assert r.lag == 4 and r.drops == 0
    assert drain(r) == [0, 1, 2, 3]


def test_try_push_returns_false_and_keeps_the_handle(manager):
    q = PortQueue(manager, "q", capacity=2)
    r = q.reader()
    push_values(q, manager, [0, 1])
    extra = item(manager, 2)
    assert q.try_push(extra) is False
    assert value_of(extra) == 2 and extra.ref_count == 1
    assert take(r.pop(timeout=0)) == 0
    assert q.try_push(extra) is True
    assert extra.released
    assert drain(r) == [1, 2]


def test_a_push_without_waiting_waits_out_another_live_process_holding_the_lock(manager, observer):
    """timeout=0 means "do not wait for room", not "fail if another pusher holds the lock
    for a moment" (a holder preempted on a busy machine holds it for a time slice)."""
    q = PortQueue(manager, "q", capacity=4)
    r = q.reader()
    slot = observer._proc_slot
    q._header.lock = (observer._procs[slot].incarnation & 0x7FFFF) << 13 | (slot + 1)  # live holder
    saw_it_busy = threading.Event()
    ask = q._break_dead_lock

    def break_dead_lock():
        saw_it_busy.set()
        return ask()

    q._break_dead_lock = break_dead_lock
    result = []
    pusher = threading.Thread(target=lambda: result.append(q.try_push(item(manager, 7))))
    pusher.start()
    try:
        assert saw_it_busy.wait(5)
        assert not result  # still waiting for the lock, not failed
    finally:
        q._header.lock = 0  # the holder lets go
        pusher.join()
    assert result == [True] and drain(r) == [7]


def test_pop_makes_room_for_a_producer_blocked_in_push(manager):
    q = PortQueue(manager, "q", capacity=2)
    r = q.reader()
    push_values(q, manager, [0, 1])
    extra = item(manager, 2)
    thread, outcome = run_in_thread(lambda: q.push(extra, timeout=10))
    wait_until(lambda: q._header.space_waiters > 0)  # the producer sleeps
    assert take(r.pop(timeout=0)) == 0
    finish(thread)
    assert outcome == {"result": None}
    assert drain(r) == [1, 2]


def test_detaching_a_full_block_reader_lets_the_producer_go_on(manager):
    q = PortQueue(manager, "q", capacity=2)
    r = q.reader()
    push_values(q, manager, [0, 1])
    extra = item(manager)
    assert not q.try_push(extra)
    r.detach()
    assert q.try_push(extra)
    assert manager.get_stats().total_allocated == 0


def test_drop_oldest_reader_never_blocks_and_keeps_the_newest(manager):
    q = PortQueue(manager, "q", capacity=4)
    r = q.reader("drop_oldest")
    for v in range(10):
        assert q.try_push(item(manager, v))
    assert r.drops == 6
    received = drain(r)
    assert received == [6, 7, 8, 9]
    assert r.drops + len(received) == q.stats().pushed == 10
    assert manager.get_stats().total_allocated == 0  # the dropped items were released


def test_full_drop_oldest_reader_does_not_hold_back_block_readers(manager):
    q = PortQueue(manager, "q", capacity=2)
    dropper = q.reader("drop_oldest")
    blocker = q.reader("block")
    for v in range(5):
        assert q.try_push(item(manager, v))
        assert take(blocker.pop(timeout=0)) == v
    assert dropper.drops == 3
    assert drain(dropper) == [3, 4]


def test_refused_push_does_not_drop_items_of_drop_oldest_readers(manager):
    q = PortQueue(manager, "q", capacity=4)
    dropper = q.reader("drop_oldest")  # index 0: scanned before the block reader
    _held = q.reader("block")
    push_values(q, manager, range(4))  # both readers full, nothing dropped yet
    extra = item(manager, 4)
    assert q.try_push(extra) is False  # nothing was pushed...
    assert dropper.drops == 0  # ...so nothing should have been dropped
    assert drain(dropper) == [0, 1, 2, 3]


# ---------------------------------------------------------------- pop, pop_many, peek


def test_pop_timeout_raises_timeout_error(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="'q'"):
        r.pop(timeout=0.02)
    assert time.monotonic() - t0 >= 0.02


def test_pop_timeout_zero_raises_at_once_when_empty(manager):
    r = PortQueue(manager, "q").reader()
    with pytest.raises(TimeoutError):
        r.pop(timeout=0)


def test_try_pop_returns_none_when_empty(manager):
    r = PortQueue(manager, "q").reader()
    assert r.try_pop() is None


def test_pop_many_returns_a_batch_in_order_up_to_max_n(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    push_values(q, manager, range(5))
    assert [take(b) for b in r.pop_many(3, timeout=0)] == [0, 1, 2]
    assert [take(b) for b in r.pop_many(10, timeout=0)] == [3, 4]


def test_pop_many_returns_an_empty_list_when_the_timeout_passes(manager):
    r = PortQueue(manager, "q").reader()
    assert r.pop_many(4, timeout=0.01) == []


def test_pop_many_waits_for_the_first_item(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    go = threading.Event()

    def produce():
        go.wait(10)
        push_values(q, manager, [1])

    thread, _ = run_in_thread(produce)
    go.set()
    batch = r.pop_many(4, timeout=10)
    finish(thread)
    assert [take(b) for b in batch] == [1]


def test_pop_many_of_zero_takes_nothing(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    push_values(q, manager, [1])
    assert r.pop_many(0, timeout=0) == []
    assert r.lag == 1


def test_peek_returns_a_new_reference_without_consuming(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    push_values(q, manager, [5, 6])
    peeked = r.peek()
    assert value_of(peeked) == 5
    assert peeked.ref_count == 2  # the queue's and the peeked handle's
    assert r.lag == 2 and r.popped == 0
    popped = r.pop(timeout=0)
    assert popped.id == peeked.id
    peeked.release()
    assert take(popped) == 5
    assert value_of(r.peek()) == 6


def test_peek_returns_none_when_empty(manager):
    r = PortQueue(manager, "q").reader()
    assert r.peek() is None


# ---------------------------------------------------------------- close


def test_close_wakes_a_reader_blocked_in_pop(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    thread, outcome = run_in_thread(r.pop)  # no timeout: waits until something happens
    wait_until(lambda: q._header.data_waiters > 0)  # the reader sleeps in the kernel
    q.close()
    finish(thread)
    assert isinstance(outcome.get("error"), QueueClosedError)


def test_close_wakes_a_producer_blocked_in_push(manager):
    q = PortQueue(manager, "q", capacity=1)
    _held = q.reader()
    push_values(q, manager, [0])
    extra = item(manager)
    thread, outcome = run_in_thread(lambda: q.push(extra))
    wait_until(lambda: q._header.space_waiters > 0)
    q.close()
    finish(thread)
    assert isinstance(outcome.get("error"), QueueClosedError)
    assert not extra.released


def test_push_after_close_raises_and_keeps_the_handle(manager):
    q = PortQueue(manager, "q")
    _held = q.reader()
    q.close()
    b = item(manager)
    with pytest.raises(QueueClosedError, match="closed"):
        q.push(b)
    with pytest.raises(QueueClosedError):
        q.try_push(b)
    assert not b.released and b.ref_count == 1


def test_readers_drain_remaining_items_after_close_then_get_closed_error(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    push_values(q, manager, [1, 2])
    q.close()
    assert take(r.pop()) == 1
    assert take(r.try_pop()) == 2
    with pytest.raises(QueueClosedError, match="every item was read"):
        r.pop()
    with pytest.raises(QueueClosedError):
        r.try_pop()
    with pytest.raises(QueueClosedError):
        r.pop_many(3)


def test_iteration_over_a_reader_ends_at_close(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    thread, outcome = run_in_thread(lambda: [take(b) for b in r])
    push_values(q, manager, range(5))
    q.close()
    finish(thread)
    assert outcome == {"result": [0, 1, 2, 3, 4]}


def test_closed_property_and_stats_state(manager):
    q = PortQueue(manager, "q")
    assert not q.closed and q.stats().closed == "open"
    q.close()
    q.close()  # twice is fine
    assert q.closed and q.stats().closed == "closed"
    assert PortQueue(manager, "q", create=False).closed


def test_reader_joining_a_closed_queue_gets_closed_error(manager):
    q = PortQueue(manager, "q")
    q.close()
    r = q.reader()
    with pytest.raises(QueueClosedError):
        r.try_pop()


# ---------------------------------------------------------------- stats, size, capacity


def test_stats_count_pushed_popped_drops_and_lag(manager):
    q = PortQueue(manager, "q", capacity=4)
    blocker = q.reader("block")
    dropper = q.reader("drop_oldest")
    push_values(q, manager, range(3))
    drain(blocker)
    push_values(q, manager, range(3, 6))
    s = q.stats()
    assert (s.name, s.capacity, s.pushed, s.closed) == ("q", 4, 6, "open")
    b, d = s.readers
    assert (b.index, b.pid, b.policy, b.popped, b.drops, b.lag, b.alive) == \
        (0, os.getpid(), "block", 3, 0, 3, True)
    assert (d.index, d.policy, d.popped, d.drops, d.lag) == (1, "drop_oldest", 0, 2, 4)
    assert (dropper.popped, dropper.drops, dropper.lag) == (0, 2, 4)


def test_producer_blocked_s_grows_when_the_producer_waited(manager):
    q = PortQueue(manager, "q", capacity=1)
    _held = q.reader()
    push_values(q, manager, [0])
    assert q.stats().producer_blocked_s == 0
    with pytest.raises(TimeoutError):
        q.push(item(manager), timeout=0.05)
    assert q.stats().producer_blocked_s >= 0.03


def test_size_is_the_lag_of_the_slowest_reader_and_capacity_the_ring(manager):
    q = PortQueue(manager, "q", capacity=8)
    assert (q.size, q.capacity) == (0, 8)
    fast, slow = q.reader(), q.reader()
    push_values(q, manager, range(5))
    drain(fast)
    take(slow.pop(timeout=0))
    assert q.size == 4
    drain(slow)
    assert q.size == 0


# ---------------------------------------------------------------- timestamps


def test_item_without_timestamp_is_stamped_with_monotonic_time_at_push(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    b = item(manager)
    assert b.timestamp == 0
    before = time.monotonic_ns()
    q.push(b)
    after = time.monotonic_ns()
    assert before <= r.pop(timeout=0).timestamp <= after


def test_wall_clock_queue_stamps_wall_time(manager):
    q = PortQueue(manager, "q", clock="wall")
    r = q.reader()
    before = time.time_ns()
    q.push(item(manager))
    after = time.time_ns()
    assert before <= r.pop(timeout=0).timestamp <= after


def test_item_is_stamped_even_with_no_reader(manager):
    q = PortQueue(manager, "q")
    b = item(manager)
    kept = b.share()
    q.push(b)
    assert kept.timestamp > 0


def test_timestamp_set_by_the_producer_is_kept(manager):
    q = PortQueue(manager, "q", clock="wall")
    r = q.reader()
    b = item(manager)
    b.timestamp = 12345
    q.push(b)
    assert r.pop(timeout=0).timestamp == 12345


def test_time_range_passes_through(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    b = item(manager)
    b.time_range = (1_000, 26_000)
    q.push(b)
    assert r.pop(timeout=0).time_range == (1_000, 26_000)


# ---------------------------------------------------------------- reader and queue lifetime


def test_reader_garbage_collected_without_detach_releases_its_items(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    b = item(manager)
    kept = b.share()
    q.push(b)
    assert kept.ref_count == 2
    del r
    gc.collect()
    assert q.stats().readers == []
    assert kept.ref_count == 1


def test_manager_shutdown_detaches_this_process_readers(manager, observer):
    q = PortQueue(manager, "q")
    _held = q.reader()
    _held2 = q.reader("drop_oldest")
    push_values(q, manager, range(3))
    manager.shutdown()
    seen = PortQueue(observer, "q", create=False)
    assert seen.stats().readers == []
    assert observer.get_stats().total_allocated == 0


def test_manager_shutdown_leaves_readers_of_other_managers_attached(manager, observer):
    _producer_side = PortQueue(manager, "q")  # this manager has the queue mapped
    mine = PortQueue(observer, "q", create=False).reader()
    manager.shutdown()
    assert len(mine.queue.stats().readers) == 1
    assert mine.try_pop() is None


def test_detach_after_manager_shutdown_is_a_no_op(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    try:
        r = PortQueue(m, "q").reader()
    finally:
        m.shutdown()
    assert r.detach() == 0


def test_dropped_port_queue_closes_its_file_descriptor(manager):
    PortQueue(manager, "q")
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        PortQueue(manager, "q").stats()
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) - before <= 2


def test_reader_of_a_released_queue_object_can_still_detach(manager):
    view = PortQueue(manager, "q")
    q = PortQueue(manager, "q")
    r = q.reader()
    q.release()
    r.detach()
    assert view.stats().readers == []


# ---------------------------------------------------------------- one producer


PUSH_FROM_ANOTHER_PROCESS = """
import sys
from multiqueue import ShmManager
from multiqueue.errors import MultiQueueError
from multiqueue.stream import PortQueue
m = ShmManager(sys.argv[1], create=False, reaper_interval=None)
try:
    q = PortQueue(m, "q", create=False)
    b = m.allocate(8)
    try:
        q.push(b)
        print("pushed")
    except MultiQueueError as e:
        print("refused", b.released, e)
finally:
    m.shutdown()
"""


def test_second_live_process_cannot_push_to_the_queue(domain, manager):
    q = PortQueue(manager, "q")
    _held = q.reader()
    push_values(q, manager, [1])  # this process is the producer now
    result = run_python(PUSH_FROM_ANOTHER_PROCESS, domain)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused False"), result.stdout
    assert "already has a producer" in result.stdout
    assert q.stats().pushed == 1


def test_producer_that_exited_is_replaced(domain, manager):
    q = PortQueue(manager, "q")
    result = run_python(PUSH_FROM_ANOTHER_PROCESS, domain)
    assert result.stdout.strip() == "pushed", result.stderr
    push_values(q, manager, [1])  # the first producer is gone: this process may take over
    assert q.stats().pushed == 2


def test_one_process_may_push_through_two_queue_objects(manager):
    q1 = PortQueue(manager, "q")
    q2 = PortQueue(manager, "q")
    r = q1.reader()
    push_values(q1, manager, [1])
    push_values(q2, manager, [2])
    assert drain(r) == [1, 2]


# ---------------------------------------------------------------- busy_poll


def test_busy_poll_reader_receives_items_pushed_from_another_thread(manager):
    q = PortQueue(manager, "q")
    r = q.reader(busy_poll=True)
    go = threading.Event()

    def produce():
        go.wait(10)
        push_values(q, manager, [42])

    thread, _ = run_in_thread(produce)
    go.set()
    assert take(r.pop(timeout=10)) == 42
    finish(thread)


def test_busy_poll_pop_times_out(manager):
    r = PortQueue(manager, "q").reader(busy_poll=True)
    with pytest.raises(TimeoutError):
        r.pop(timeout=0.01)


# ---------------------------------------------------------------- wait_for_readers


def test_wait_for_readers_returns_once_enough_readers_are_attached(manager):
    q = PortQueue(manager, "q")
    _held = [q.reader(), q.reader()]
    assert q.wait_for_readers(2, timeout=5) is None
    assert q.wait_for_readers(1) is None


def test_wait_for_readers_with_timeout_zero_succeeds_when_readers_are_there(manager):
    q = PortQueue(manager, "q")
    _held = q.reader()
    assert q.wait_for_readers(1, timeout=0) is None


def test_wait_for_readers_times_out(manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    r.detach()  # a detached reader does not count
    with pytest.raises(TimeoutError, match="1 readers"):
        q.wait_for_readers(1, timeout=0.01)


def test_wait_for_readers_is_woken_by_a_join(manager):
    q = PortQueue(manager, "q")
    thread, outcome = run_in_thread(lambda: q.wait_for_readers(1, timeout=10))
    wait_until(lambda: q._header.space_waiters > 0)  # the producer sleeps
    r = q.reader()
    finish(thread)
    assert outcome == {"result": None}
    r.detach()


def test_wait_for_readers_on_a_closed_queue_raises_queue_closed_error(manager):
    q = PortQueue(manager, "q")
    q.close()
    with pytest.raises(QueueClosedError):
        q.wait_for_readers(1, timeout=1)


def test_wait_for_readers_with_a_negative_timeout_raises_value_error(manager):
    with pytest.raises(ValueError, match="timeout"):
        PortQueue(manager, "q").wait_for_readers(1, timeout=-1)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("thing", [5, None, b"bytes", bytearray(8)])
def test_push_of_a_non_buffer_raises_type_error(manager, thing):
    q = PortQueue(manager, "q")
    with pytest.raises(TypeError, match="Buffer"):
        q.push(thing)


def test_push_of_a_released_handle_raises_buffer_released_error(manager):
    q = PortQueue(manager, "q")
    _held = q.reader()
    b = item(manager)
    b.release()
    with pytest.raises(BufferReleasedError):
        q.push(b)
    assert q.stats().pushed == 0


def test_push_of_a_buffer_held_by_another_manager_raises(manager, observer):
    q = PortQueue(manager, "q")
    r = q.reader()
    foreign = item(observer)  # same domain, but this manager's process slot holds no reference
    with pytest.raises(MultiQueueError, match="its own manager"):
        q.push(foreign)
    assert not foreign.released
    assert r.try_pop() is None


def test_push_of_a_buffer_of_another_domain_is_refused(manager, other_manager):
    q = PortQueue(manager, "q")
    r = q.reader()
    mine = item(manager, 1)
    foreign = item(other_manager, 2)
    assert foreign.id == mine.id  # two fresh domains hand out the same first id
    with pytest.raises((MultiQueueError, ValueError)):
        q.push(foreign)  # today: pushes `mine` (this domain's block 0) and drops foreign's handle
    assert r.try_pop() is None


@pytest.mark.parametrize("kwargs", [{"policy": "x"}, {"policy": "BLOCK"}, {"start": "x"},
                                    {"start": "newest"}])
def test_reader_with_bad_policy_or_start_raises_value_error(manager, kwargs):
    q = PortQueue(manager, "q")
    with pytest.raises(ValueError):
        q.reader(**kwargs)
    assert q.stats().readers == []


@pytest.mark.parametrize("timeout", [-1, -0.5, float("nan")])
def test_negative_or_nan_pop_timeout_raises_value_error(manager, timeout):
    r = PortQueue(manager, "q").reader()
    with pytest.raises(ValueError, match="timeout"):
        r.pop(timeout=timeout)
    with pytest.raises(ValueError, match="timeout"):
        r.pop_many(2, timeout=timeout)


def test_negative_push_timeout_raises_value_error_when_it_must_wait(manager):
    q = PortQueue(manager, "q", capacity=1)
    _held = q.reader()
    push_values(q, manager, [0])
    b = item(manager)
    with pytest.raises(ValueError, match="timeout"):
        q.push(b, timeout=-1)
    assert not b.released


@pytest.mark.parametrize("timeout", ["1", True, [1]])
def test_non_number_timeout_raises_type_error(manager, timeout):
    r = PortQueue(manager, "q").reader()
    with pytest.raises(TypeError, match="timeout"):
        r.pop(timeout=timeout)


def test_more_readers_than_max_readers_raises_queue_full_error(manager):
    q = PortQueue(manager, "q", max_readers=2)
    first, _ = q.reader(), q.reader()
    with pytest.raises(ReadersFullError, match="2 readers"):
        q.reader()
    first.detach()
    assert q.reader().index == 0  # a freed slot is reused


def test_lock_left_by_a_dead_holder_is_taken_over(manager):
    q = PortQueue(manager, "q")
    free_slot = next(i for i, p in enumerate(manager.process_table) if p.state == L.PROC_FREE)
    q._header.lock = free_slot + 1  # as if a process that left had died holding it
    r = q.reader()
    q._header.lock = free_slot + 1
    push_values(q, manager, [3])
    q._header.lock = free_slot + 1
    assert r.detach() == 1
    assert q._header.lock == 0
