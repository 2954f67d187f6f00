"""Producer / Consumer convenience layer and the @producer / @consumer stage decorators."""

import threading

import numpy as np
import pytest

from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.stream import Consumer, Producer, Stage, consumer, producer


@pytest.fixture
def owner(domain):
    config = ShmConfig(pools=[PoolConfig("p", 65536, 256)], max_buffers=512)
    with ShmManager(domain, config, reaper_interval=None) as m:
        yield m


def collect(source, out, started):
    """Read every frame of a Consumer into `out` (copies), in a thread."""
    started.set()
    for frame in source:
        out.append(frame.copy())


def test_arrays_and_bytes_arrive_with_their_dtype_and_shape(owner, domain):
    source = Consumer(domain, "q", manager=owner)
    got, started = [], threading.Event()
    reader = threading.Thread(target=collect, args=(source, got, started))
    reader.start()
    started.wait()
    with Producer(domain, "q", manager=owner) as out:
        out.push(np.arange(12, dtype=np.int16).reshape(3, 4))
        out.push(b"hello")
        out.push(np.linspace(0, 1, 5, dtype=np.complex64))
    reader.join()
    source.close()
    assert [a.dtype for a in got] == [np.int16, np.uint8, np.complex64]
    assert got[0].shape == (3, 4) and np.array_equal(got[0], np.arange(12).reshape(3, 4))
    assert bytes(got[1]) == b"hello"
    assert np.allclose(got[2], np.linspace(0, 1, 5))
    assert owner.get_stats().total_allocated == 0


def test_consumer_views_are_shared_memory_released_on_next(owner, domain):
    source = Consumer(domain, "q", manager=owner)
    out = Producer(domain, "q", manager=owner)
    out.push(np.ones(8, np.float64))
    out.push(np.zeros(8, np.float64))
    frames = iter(source)
    first = next(frames)
    assert not first.flags.owndata and first.sum() == 8  # a view, not a copy
    assert owner.get_stats().total_allocated == 2  # the frame we look at, the one queued
    second = next(frames)  # the first frame's buffer goes back to its pool
    assert second.sum() == 0
    assert owner.get_stats().total_allocated == 1
    out.close()
    assert list(frames) == []  # the queue closed: iteration ends, last buffer released
    assert owner.get_stats().total_allocated == 0
    source.close()


def test_loaned_buffer_is_sent_without_a_copy(owner, domain):
    source = Consumer(domain, "q", manager=owner)
    with Producer(domain, "q", manager=owner) as out:
        buffer = out.loan((2, 3), np.float32)
        buffer.numpy()[:] = 7
        buffer_id = buffer.id
        out.push(buffer, timestamp=123, time_range=(100, 200))
    received = source.pop()
    assert received.id == buffer_id  # the same block, not a copy
    assert received.timestamp == 123 and received.time_range == (100, 200)
    assert received.numpy().shape == (2, 3) and (received.numpy() == 7).all()
    received.release()
    source.close()


def test_stacked_decorators_make_a_stage_that_keeps_timestamps(owner, domain):
    @consumer(domain, "in")
    @producer(domain, "out")
    def double(frame):
        return frame * 2

    assert isinstance(double, Stage) and double(np.int32(3)) == 6  # still callable
    sink = Consumer(domain, "out", manager=owner)
    source = Producer(domain, "in", manager=owner)
    stage = threading.Thread(target=double.run)
    stage.start()
    source.queue.wait_for_readers(1, timeout=30)
    for i in range(5):
        source.push(np.full(4, i, np.int32), timestamp=1000 + i, time_range=(i, i + 1))
    source.close()
    stage.join()
    got = [(int(b.numpy()[0]), b.timestamp, b.time_range) for b in sink.buffers()]
    assert got == [(2 * i, 1000 + i, (i, i + 1)) for i in range(5)]
    sink.close()
    assert owner.get_stats().total_allocated == 0


def test_source_function_returning_one_frame_per_call_until_none(owner, domain):
    frames = iter([np.zeros(3), np.ones(3), None])

    @producer(domain, "q", readers=1)
    def source():
        return next(frames)

    sink = Consumer(domain, "q", manager=owner)
    assert source.run() == 2
    assert [float(b.numpy("float64").sum()) for b in sink.buffers()] == [0.0, 3.0]
    sink.close()


def test_sink_stage_stops_after_max_items(owner, domain):
    seen = []

    @consumer(domain, "q")
    def sink(frame):
        seen.append(int(frame[0]))

    out = Producer(domain, "q", manager=owner)
    runner = threading.Thread(target=sink.run, kwargs={"max_items": 3})
    runner.start()
    out.queue.wait_for_readers(1, timeout=30)
    for i in range(3):
        out.push(np.array([i], np.int64))
    runner.join()
    assert seen == [0, 1, 2]
    out.close()


def test_stage_without_queues_is_an_error():
    with pytest.raises(ValueError, match="neither"):
        Stage(lambda: None).run()


def test_wait_for_readers_times_out(owner, domain):
    with pytest.raises(TimeoutError):
        Producer(domain, "q", manager=owner, readers=1, readers_timeout=0.05)
