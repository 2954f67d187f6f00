"""ShmManager: domains and their segments, the registry, pools, stats and lifecycle."""

import ctypes
import os
import signal
import struct
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest

from helpers import run_python, spawn_python
from multiqueue import (
    BufferPool,
    DomainFullError,
    DomainInUseError,
    InvalidBufferError,
    NotInitializedError,
    PoolConfig,
    PoolExhaustedError,
    PoolInUseError,
    PoolNotFoundError,
    PoolStats,
    SegmentError,
    SegmentVersionError,
    ShmConfig,
    ShmManager,
    ShmStats,
    _native,
)
from multiqueue.shm import layout as L
from multiqueue.shm.segment import domain_segments, process_start_time, segment_path

SHM = "/dev/shm"


def ctl_path(domain: str) -> str:
    return segment_path("mq.", domain, "ctl")


def pool_segments(domain: str, pool: str) -> list[str]:
    return [p for p in domain_segments("mq.", domain)
            if os.path.basename(p).startswith(f"mq.{domain}.pool.{pool}.")]


def read_header(path: str) -> L.SegmentHeader:
    with open(path, "rb") as f:
        return L.SegmentHeader.from_buffer_copy(f.read(ctypes.sizeof(L.SegmentHeader)))


def patch_file(path: str, offset: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def left_behind(domain: str, config: ShmConfig) -> None:
    """Create a domain and leave it with no process attached (segments kept)."""
    ShmManager(domain, config, reaper_interval=None).shutdown(unlink=False)
    assert ctl_path(domain) in domain_segments("mq.", domain)


@contextmanager
def spawned(code: str, *args):
    """A child interpreter, killed and reaped whatever happens."""
    proc = spawn_python(code, *args)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()


def read_line(proc) -> list[str]:
    line = proc.stdout.readline()
    assert line, f"child died: {proc.stderr.read()}"
    return line.split()


# A child that creates (or attaches to) a domain, takes a buffer, reports, then waits for a
# line on stdin (or exits without shutdown when argv[2] == "exit").
CHILD = r"""
import os, sys
from multiqueue import ShmManager, ShmConfig, PoolConfig
cfg = ShmConfig(pools=[PoolConfig("left", 512, 4)], max_buffers=32, max_processes=8)
m = ShmManager(sys.argv[1], cfg, name="child", reaper_interval=None)
b = m.allocate(100)
b.memoryview()[:5] = b"ghost"
print(b.id, os.getpid(), flush=True)
if sys.argv[2] == "exit":
    os._exit(0)            # no shutdown: the domain is left with a dead process
sys.stdin.readline()
m.shutdown()
print("done", flush=True)
"""


def make_stale_by_exit(domain: str) -> tuple[int, int]:
    """A domain whose only process exited without shutdown; returns (buffer id, pid)."""
    done = run_python(CHILD, domain, "exit")
    assert done.returncode == 0, done.stderr
    buffer_id, pid = map(int, done.stdout.split())
    return buffer_id, pid


# ================================================================ domain and segments


def test_segments_are_named_mq_domain_under_dev_shm(domain, manager):
    paths = domain_segments("mq.", domain)
    assert ctl_path(domain) in paths
    assert ctl_path(domain) == f"{SHM}/mq.{domain}.ctl"
    assert all(p.startswith(f"{SHM}/mq.{domain}.") for p in paths)
    assert len(pool_segments(domain, "tiny")) == 1
    assert len(pool_segments(domain, "small")) == 1


def test_segments_are_owner_only_even_with_a_permissive_umask(domain, small_config):
    old = os.umask(0)
    try:
        m = ShmManager(domain, small_config, reaper_interval=None)
    finally:
        os.umask(old)
    try:
        paths = domain_segments("mq.", domain)
        assert len(paths) == 3
        for path in paths:
            assert os.stat(path).st_mode & 0o777 == 0o600, path
    finally:
        m.shutdown()


def test_control_header_has_magic_version_creator_pid_and_start_time(domain, manager):
    hdr = read_header(ctl_path(domain))
    assert hdr.magic == L.MAGIC_CONTROL == int.from_bytes(b"MQDOMAIN", "little")
    assert hdr.version == L.LAYOUT_VERSION
    assert hdr.kind == L.KIND_CONTROL
    assert hdr.creator_pid == os.getpid()
    assert hdr.creator_start == process_start_time(os.getpid())
    assert hdr.total_size == os.path.getsize(ctl_path(domain))
    assert abs(hdr.created_ns - time.time_ns()) < 60 * 10**9


def test_pool_segment_header_has_magic_version_and_creator(domain, manager):
    path = pool_segments(domain, "tiny")[0]
    hdr = read_header(path)
    assert hdr.magic == L.MAGIC_POOL
    assert hdr.version == L.LAYOUT_VERSION
    assert hdr.kind == L.KIND_POOL
    assert hdr.creator_pid == os.getpid()
    assert hdr.creator_start == process_start_time(os.getpid())


def test_wrong_layout_version_raises_segment_version_error(domain, small_config):
    left_behind(domain, small_config)
    patch_file(ctl_path(domain), 8, "<I", 99)
    try:
        with pytest.raises(SegmentVersionError) as info:
            ShmManager(domain, small_config, reaper_interval=None)
        message = str(info.value)
        assert ctl_path(domain) in message
        assert "99" in message and str(L.LAYOUT_VERSION) in message
    finally:
        ShmManager.cleanup(domain)


def test_segment_version_error_is_a_segment_error():
    assert issubclass(SegmentVersionError, SegmentError)


def test_wrong_magic_raises_segment_error_naming_the_segment(domain, small_config):
    left_behind(domain, small_config)
    patch_file(ctl_path(domain), 0, "<Q", 0x0123456789ABCDEF)
    try:
        with pytest.raises(SegmentError) as info:
            ShmManager(domain, small_config, reaper_interval=None)
        assert ctl_path(domain) in str(info.value)
        assert "0x123456789abcdef" in str(info.value)
    finally:
        ShmManager.cleanup(domain)


def test_truncated_control_segment_raises_segment_error(domain, small_config):
    left_behind(domain, small_config)
    os.truncate(ctl_path(domain), 4096)
    try:
        with pytest.raises(SegmentError, match="truncated") as info:
            ShmManager(domain, small_config, reaper_interval=None)
        assert ctl_path(domain) in str(info.value)
    finally:
        ShmManager.cleanup(domain)


def test_control_segment_shorter_than_a_header_raises_segment_error(domain, small_config):
    left_behind(domain, small_config)
    os.truncate(ctl_path(domain), 10)
    try:
        with pytest.raises(SegmentError, match="truncated"):
            ShmManager(domain, small_config, reaper_interval=None)
    finally:
        ShmManager.cleanup(domain)


def test_truncated_pool_segment_raises_segment_error_when_mapped(domain, small_config):
    left_behind(domain, small_config)
    os.truncate(pool_segments(domain, "tiny")[0], 4096)
    with ShmManager(domain, small_config, reaper_interval=None) as m:
        with m.allocate_from_pool("tiny", 10) as b:
            with pytest.raises(SegmentError, match="truncated"):
                b.memoryview()


def test_wrong_layout_version_of_a_pool_segment_raises_segment_version_error(domain,
                                                                             small_config):
    left_behind(domain, small_config)
    path = pool_segments(domain, "tiny")[0]
    patch_file(path, 8, "<I", L.LAYOUT_VERSION + 1)
    with ShmManager(domain, small_config, reaper_interval=None) as m:
        with m.allocate_from_pool("tiny", 10) as b:
            with pytest.raises(SegmentVersionError, match=path):
                b.memoryview()


@pytest.mark.parametrize("bad", ["", "a/b", "a.b", "a b", "..", "x" * 65, "dom\0ain", "é",
                                 None, 7, b"bytes"])
def test_invalid_domain_name_raises_value_error(bad):
    with pytest.raises(ValueError):
        ShmManager(bad, reaper_interval=None)


def test_invalid_domain_name_is_refused_by_cleanup():
    with pytest.raises(ValueError):
        ShmManager.cleanup("../etc")


def test_config_of_wrong_type_raises_type_error(domain):
    with pytest.raises(TypeError):
        ShmManager(domain, {"pools": []}, reaper_interval=None)


def test_second_manager_in_the_same_process_attaches(domain, manager):
    b = manager.allocate(100)
    b.memoryview()[:5] = b"hello"
    other_config = ShmConfig(pools=[PoolConfig("other", 64, 4)], max_buffers=8)
    with ShmManager(domain, other_config, reaper_interval=None) as second:
        assert second.list_pools() == ["tiny", "small"]  # its config was ignored
        with second.get(b.id) as seen:
            assert bytes(seen.memoryview()[:5]) == b"hello"
            assert b.ref_count == 2
    assert bytes(b.memoryview()[:5]) == b"hello"  # still there
    assert ctl_path(domain) in domain_segments("mq.", domain)
    b.release()


def test_manager_in_another_process_attaches_and_sees_the_data(domain, manager):
    b = manager.allocate(100)
    b.memoryview()[:5] = b"hello"
    code = r"""
import sys
from multiqueue import ShmManager, ShmConfig, PoolConfig
cfg = ShmConfig(pools=[PoolConfig("other", 64, 4)], max_buffers=8, max_processes=4)
with ShmManager(sys.argv[1], cfg, reaper_interval=None) as m:
    with m.get(int(sys.argv[2])) as b:
        print(",".join(m.list_pools()), bytes(b.memoryview()[:5]).decode(), b.ref_count)
        b.memoryview()[5:7] = b"!!"
"""
    done = run_python(code, domain, b.id)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["tiny,small", "hello", "2"]
    assert bytes(b.memoryview()[:7]) == b"hello!!"
    assert b.ref_count == 1
    assert len(domain_segments("mq.", domain)) == 3  # its leaving removed nothing
    b.release()


def test_cleanup_removes_a_domain_whose_process_exited_without_shutdown(domain):
    make_stale_by_exit(domain)
    assert domain_segments("mq.", domain)
    removed = ShmManager.cleanup(domain)
    assert ctl_path(domain) in removed
    assert domain_segments("mq.", domain) == []


def test_cleanup_removes_a_domain_whose_process_was_sigkilled(domain):
    with spawned(CHILD, domain, "wait") as proc:
        read_line(proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    removed = ShmManager.cleanup(domain)
    assert len(removed) == 2  # control + pool "left"
    assert domain_segments("mq.", domain) == []


def test_cleanup_of_a_live_domain_raises_domain_in_use_error(domain, manager):
    before = domain_segments("mq.", domain)
    with pytest.raises(DomainInUseError) as info:
        ShmManager.cleanup(domain)
    assert str(os.getpid()) in str(info.value)
    assert domain_segments("mq.", domain) == before
    assert manager.allocate(10).ref_count == 1  # still usable


def test_cleanup_of_a_domain_with_a_live_child_raises_domain_in_use_error(domain):
    with spawned(CHILD, domain, "wait") as proc:
        _, pid = map(int, read_line(proc))
        with pytest.raises(DomainInUseError, match=str(pid)):
            ShmManager.cleanup(domain)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert read_line(proc) == ["done"]
    assert domain_segments("mq.", domain) == []


def test_cleanup_of_a_missing_domain_returns_nothing(domain):
    assert ShmManager.cleanup(domain) == []


def test_attaching_to_a_stale_domain_reuses_it(domain, small_config):
    make_stale_by_exit(domain)
    with ShmManager(domain, small_config, reaper_interval=None) as m:
        assert m.list_pools() == ["left"]  # the stale domain's pools, not small_config's


def test_attaching_to_a_stale_domain_reaps_the_dead_process(domain, small_config):
    buffer_id, pid = make_stale_by_exit(domain)
    with ShmManager(domain, small_config, name="heir", reaper_interval=None) as m:
        assert [p["pid"] for p in m.processes()] == [os.getpid()]
        stats = m.get_stats()
        assert stats.total_allocated == 0
        assert stats.allocation_count == stats.deallocation_count == 1
        with pytest.raises(InvalidBufferError):
            m.get(buffer_id)  # its only reference was the dead process's


def test_attaching_to_a_sigkilled_domain_reaps_its_references(domain, small_config):
    with spawned(CHILD, domain, "wait") as proc:
        buffer_id, _ = map(int, read_line(proc))
        proc.kill()
        proc.wait(timeout=30)
    with ShmManager(domain, small_config, reaper_interval=None) as m:
        assert m.get_pool("left").stats().blocks_used == 0
        with pytest.raises(InvalidBufferError):
            m.get(buffer_id)


def test_create_false_on_a_missing_domain_raises_segment_error(domain):
    with pytest.raises(SegmentError, match="does not exist"):
        ShmManager(domain, reaper_interval=None, create=False)
    assert domain_segments("mq.", domain) == []


# ================================================================ registry


def test_processes_lists_this_process(domain, small_config):
    with ShmManager(domain, small_config, name="tester", reaper_interval=None) as m:
        (me,) = m.processes()
        assert me["pid"] == os.getpid()
        assert me["name"] == "tester"
        assert me["alive"] is True
        assert me["self"] is True


def test_processes_lists_another_live_process(domain, manager):
    with spawned(CHILD, domain, "wait") as proc:
        _, pid = map(int, read_line(proc))
        rows = {p["pid"]: p for p in manager.processes()}
        assert set(rows) == {os.getpid(), pid}
        assert rows[pid]["name"] == "child" and rows[pid]["alive"] is True
        assert rows[pid]["self"] is False
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert read_line(proc) == ["done"]
    assert [p["pid"] for p in manager.processes()] == [os.getpid()]


def test_processes_marks_a_killed_process_dead(domain, manager):
    with spawned(CHILD, domain, "wait") as proc:
        _, pid = map(int, read_line(proc))
        proc.kill()
        proc.wait(timeout=30)
    rows = {p["pid"]: p for p in manager.processes()}
    assert rows[pid]["alive"] is False
    assert rows[os.getpid()]["alive"] is True


def test_processes_checks_the_start_time_not_just_the_pid(domain, manager):
    with ShmManager(domain, name="imposter", reaper_interval=None) as other:
        record = manager.process_table[other._proc_slot]
        real = record.start_time
        record.start_time = real + 1  # same (live) pid, another process's start time
        try:
            rows = {p["name"]: p for p in manager.processes()}
            assert rows["imposter"]["pid"] == os.getpid()
            assert rows["imposter"]["alive"] is False
        finally:
            record.start_time = real


def test_reap_releases_a_dead_processs_references(domain, manager):
    with spawned(CHILD, domain, "wait") as proc:
        buffer_id, pid = map(int, read_line(proc))
        with manager.get(buffer_id) as mine:
            proc.kill()
            proc.wait(timeout=30)
            report = manager.reap()
            assert report.processes == [(pid, "child")]
            assert report.references_released == 1
            assert report.blocks_freed == 0  # we still hold it
            assert mine.ref_count == 1
            assert bytes(mine.memoryview()[:5]) == b"ghost"
    assert manager.get_stats().total_allocated == 0
    assert [p["pid"] for p in manager.processes()] == [os.getpid()]
    assert manager.reap().processes == []


def test_process_table_full_raises_domain_full_error(domain):
    config = ShmConfig(pools=[PoolConfig("p", 64, 2)], max_buffers=4, max_processes=1)
    with ShmManager(domain, config, reaper_interval=None):
        with pytest.raises(DomainFullError, match="max_processes"):
            ShmManager(domain, config, reaper_interval=None)


# ================================================================ pools: choosing a pool


@pytest.mark.parametrize("size,pool", [(1, "tiny"), (255, "tiny"), (256, "tiny"), (257, "small"),
                                       (4096, "small")])
def test_allocate_picks_the_smallest_pool_that_fits(manager, size, pool):
    with manager.allocate(size) as b:
        assert b.pool == pool
        assert b.size == size


def test_allocate_uses_the_next_larger_pool_when_the_smallest_is_full(manager):
    held = [manager.allocate(100) for _ in range(16)]
    assert {b.pool for b in held} == {"tiny"}
    with manager.allocate(100) as spill:
        assert spill.pool == "small"
    for b in held:
        b.release()


def test_allocate_returns_to_the_smallest_pool_once_it_has_room(manager):
    held = [manager.allocate(100) for _ in range(16)]
    held.pop().release()
    with manager.allocate(100) as b:
        assert b.pool == "tiny"
    for b in held:
        b.release()


def test_allocate_larger_than_every_pool_raises_value_error(manager):
    with pytest.raises(ValueError, match="larger than every pool"):
        manager.allocate(4097)


@pytest.mark.parametrize("size", [0, -1, -4096])
def test_allocate_non_positive_size_raises_value_error(manager, size):
    with pytest.raises(ValueError):
        manager.allocate(size)


@pytest.mark.parametrize("size", [1.5, 10.0, "10", None, True, [10]])
def test_allocate_non_int_size_raises_type_error(manager, size):
    with pytest.raises(TypeError):
        manager.allocate(size)


# ================================================================ growth, exhaustion, waiting


@pytest.fixture
def growing(domain):
    config = ShmConfig(pools=[PoolConfig("grow", 128, 2, expandable=True, max_blocks=6)],
                       max_buffers=16, max_processes=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        yield m


def test_expandable_pool_grows_by_block_count_when_full(domain, growing):
    held = [growing.allocate(100) for _ in range(2)]
    assert growing.get_pool("grow").stats().block_count == 2
    held.append(growing.allocate(100, timeout=0))
    stats = growing.get_pool("grow").stats()
    assert (stats.block_count, stats.blocks_used) == (4, 3)
    assert len(pool_segments(domain, "grow")) == 2  # one new segment per expansion
    for b in held:
        b.release()


def test_expandable_pool_grows_up_to_max_blocks_then_raises(domain, growing):
    held = [growing.allocate(100, timeout=0) for _ in range(6)]
    assert growing.get_pool("grow").stats().block_count == 6
    assert len(pool_segments(domain, "grow")) == 3
    with pytest.raises(PoolExhaustedError, match="expandable to 6"):
        growing.allocate(100, timeout=0)
    assert growing.get_pool("grow").stats().block_count == 6
    for b in held:
        b.release()


def test_grown_blocks_are_usable_and_distinct(growing):
    held = [growing.allocate(128, timeout=0) for _ in range(6)]
    for i, b in enumerate(held):
        b.numpy()[:] = i
    assert [int(b.numpy()[0]) for b in held] == list(range(6))
    assert len({b.numpy().ctypes.data for b in held}) == 6
    for b in held:
        b.release()


def test_expandable_pool_without_max_blocks_grows_to_four_times(domain):
    config = ShmConfig(pools=[PoolConfig("grow", 64, 2, expandable=True)], max_buffers=8)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = [m.allocate(64, timeout=0) for _ in range(8)]
        with pytest.raises(PoolExhaustedError):
            m.allocate(64, timeout=0)
        assert m.get_pool("grow").stats().block_count == 8
        for b in held:
            b.release()


def test_next_larger_pool_is_tried_before_growing(domain):
    config = ShmConfig(pools=[PoolConfig("a", 256, 2, expandable=True, max_blocks=4),
                              PoolConfig("b", 1024, 2)], max_buffers=16)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = [m.allocate(100, timeout=0) for _ in range(6)]
        assert [b.pool for b in held] == ["a", "a", "b", "b", "a", "a"]
        assert m.get_pool("a").stats().block_count == 4
        for b in held:
            b.release()


def test_exhausted_pool_raises_pool_exhausted_error_naming_the_pool_and_its_stats(domain):
    config = ShmConfig(pools=[PoolConfig("only", 256, 2)], max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = [m.allocate(10) for _ in range(2)]
        with pytest.raises(PoolExhaustedError) as info:
            m.allocate(10, timeout=0)
        message = str(info.value)
        assert "'only'" in message and "2/2 blocks" in message and "256 B" in message
        assert domain in message
        for b in held:
            b.release()


def test_exhausted_message_lists_every_candidate_pool(manager):
    held = [manager.allocate(100) for _ in range(24)]
    with pytest.raises(PoolExhaustedError) as info:
        manager.allocate(100, timeout=0)
    assert "'tiny' (16/16" in str(info.value) and "'small' (8/8" in str(info.value)
    for b in held:
        b.release()


def test_timeout_zero_does_not_wait(domain):
    config = ShmConfig(pools=[PoolConfig("only", 256, 1)], max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = m.allocate(10)
        t0 = time.monotonic()
        with pytest.raises(PoolExhaustedError, match="without waiting"):
            m.allocate(10, timeout=0)
        assert time.monotonic() - t0 < 0.5
        assert _native.atomic_load_u32(m._control.mmap, L.Control.alloc_waiters.offset) == 0
        held.release()


def test_positive_timeout_waits_that_long_then_raises(domain):
    config = ShmConfig(pools=[PoolConfig("only", 256, 1)], max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = m.allocate(10)
        t0 = time.monotonic()
        with pytest.raises(PoolExhaustedError, match="within 0.1 s"):
            m.allocate(10, timeout=0.1)
        elapsed = time.monotonic() - t0
        assert 0.09 <= elapsed < 2.0
        # the waiter left its wake-up armed; the next free disarms it (one wake, then none)
        assert _native.atomic_load_u32(m._control.mmap, L.Control.alloc_waiters.offset) != 0
        held.release()
        assert _native.atomic_load_u32(m._control.mmap, L.Control.alloc_waiters.offset) == 0


def test_waiting_allocate_is_woken_when_another_thread_releases(domain):
    config = ShmConfig(pools=[PoolConfig("only", 256, 2)], max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = [m.allocate(10) for _ in range(2)]
        result = {}

        def waiter():
            try:
                result["buffer"] = m.allocate(10, timeout=20)
            except BaseException as e:  # reported below
                result["error"] = e

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        # spin (no sleeping) until the waiter has registered itself as waiting
        deadline = time.monotonic() + 10
        offset = L.Control.alloc_waiters.offset
        while _native.atomic_load_u32(m._control.mmap, offset) == 0:
            assert time.monotonic() < deadline, "the allocate never started waiting"
        t0 = time.monotonic()
        freed_slot = held[0].id & 0xFFFFFFFF
        held[0].release()
        thread.join(10)
        assert not thread.is_alive()
        assert "error" not in result, result.get("error")
        assert time.monotonic() - t0 < 5
        got = result["buffer"]
        assert got.id & 0xFFFFFFFF == freed_slot
        got.release()
        held[1].release()


def test_waiting_allocate_is_woken_when_another_process_releases(domain):
    config = ShmConfig(pools=[PoolConfig("left", 512, 1)], max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        with spawned(CHILD, domain, "wait") as proc:
            read_line(proc)
            assert m.get_pool("left").stats().blocks_free == 0
            proc.stdin.write("\n")  # it releases its block and leaves
            proc.stdin.flush()
            with m.allocate(10, timeout=20) as b:
                assert b.pool == "left"
            assert read_line(proc) == ["done"]


def test_allocate_without_timeout_waits_until_a_block_is_released(domain):
    config = ShmConfig(pools=[PoolConfig("only", 256, 1)], max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = m.allocate(10)
        result = {}
        thread = threading.Thread(target=lambda: result.update(buffer=m.allocate(10)),
                                  daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while _native.atomic_load_u32(m._control.mmap, L.Control.alloc_waiters.offset) == 0:
            assert time.monotonic() < deadline, "the allocate never started waiting"
        held.release()
        thread.join(10)
        assert not thread.is_alive()
        result["buffer"].release()


def test_waiting_allocate_is_woken_when_a_fitting_pool_is_added(domain):
    config = ShmConfig(pools=[PoolConfig("only", 256, 1)], max_buffers=8)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = m.allocate(10)
        result = {}

        def waiter():
            try:
                result["buffer"] = m.allocate(10, timeout=5)
            except BaseException as e:  # reported below
                result["error"] = e

        thread = threading.Thread(target=waiter, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while _native.atomic_load_u32(m._control.mmap, L.Control.alloc_waiters.offset) == 0:
            assert time.monotonic() < deadline, "the allocate never started waiting"
        t0 = time.monotonic()
        with ShmManager(domain, reaper_interval=None) as other:
            other.add_pool(PoolConfig("more", 512, 1))
            thread.join(10)
        assert "error" not in result, result.get("error")
        assert time.monotonic() - t0 < 4
        assert result["buffer"].pool == "more"
        result["buffer"].release()
        held.release()


def test_failed_allocation_is_counted(domain):
    config = ShmConfig(pools=[PoolConfig("only", 256, 1)], max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = m.allocate(10)
        for _ in range(2):
            with pytest.raises(PoolExhaustedError):
                m.allocate(10, timeout=0)
        assert m.get_stats().failed_allocations == 2
        held.release()


# ================================================================ pools: by name, add, remove


def test_allocate_from_pool_takes_a_whole_block_by_default(manager):
    with manager.allocate_from_pool("small") as b:
        assert b.pool == "small" and b.size == 4096


def test_allocate_from_pool_with_a_size(manager):
    with manager.allocate_from_pool("small", 10) as b:
        assert b.pool == "small" and b.size == 10


def test_allocate_from_pool_does_not_spill_into_other_pools(manager):
    held = [manager.allocate_from_pool("tiny") for _ in range(16)]
    with pytest.raises(PoolExhaustedError, match="'tiny'"):
        manager.allocate_from_pool("tiny", timeout=0)
    for b in held:
        b.release()


def test_allocate_from_pool_size_over_the_block_raises_value_error(manager):
    with pytest.raises(ValueError, match="exceeds"):
        manager.allocate_from_pool("tiny", 257)


@pytest.mark.parametrize("size,error", [(0, ValueError), (-5, ValueError), (1.0, TypeError),
                                        ("8", TypeError)])
def test_allocate_from_pool_bad_size(manager, size, error):
    with pytest.raises(error):
        manager.allocate_from_pool("tiny", size)


def test_allocate_from_unknown_pool_raises_pool_not_found_error(manager):
    with pytest.raises(PoolNotFoundError):
        manager.allocate_from_pool("nope")


def test_get_pool_returns_a_buffer_pool_view(manager):
    pool = manager.get_pool("small")
    assert isinstance(pool, BufferPool)
    assert (pool.name, pool.block_size) == ("small", 4096)
    with pool.allocate(10) as b:
        assert b.pool == "small"
        assert pool.stats().blocks_used == 1


def test_get_pool_unknown_raises_pool_not_found_error_listing_the_pools(manager):
    with pytest.raises(PoolNotFoundError) as info:
        manager.get_pool("nope")
    assert "'nope'" in str(info.value) and "tiny" in str(info.value)
    assert isinstance(info.value, KeyError)


def test_list_pools_in_configuration_order(manager):
    assert manager.list_pools() == ["tiny", "small"]


def test_add_pool_creates_a_usable_pool(domain, manager):
    pool = manager.add_pool(PoolConfig("mid", 1024, 3))
    assert isinstance(pool, BufferPool) and pool.name == "mid"
    assert manager.list_pools() == ["tiny", "small", "mid"]
    assert len(pool_segments(domain, "mid")) == 1
    with manager.allocate(1000) as b:
        assert b.pool == "mid"  # now the smallest pool that fits


def test_added_pool_is_visible_to_another_manager(domain, manager):
    with ShmManager(domain, reaper_interval=None) as other:
        manager.add_pool(PoolConfig("mid", 1024, 3))
        assert "mid" in other.list_pools()
        with other.allocate(1000) as b:
            assert b.capacity == 1024


def test_blocks_added_by_growth_are_readable_through_another_manager(domain, growing):
    held = [growing.allocate(128, timeout=0) for _ in range(3)]  # the third is a new chunk
    held[2].numpy()[:] = 9
    with ShmManager(domain, reaper_interval=None) as other:
        with other.get(held[2].id) as seen:
            assert seen.capacity == 128
            assert (seen.numpy() == 9).all()
    for b in held:
        b.release()


def test_add_pool_beyond_max_pools_raises_domain_full_error(domain):
    config = ShmConfig(pools=[PoolConfig("a", 64, 1)], max_buffers=8, max_pools=1)
    with ShmManager(domain, config, reaper_interval=None) as m:
        with pytest.raises(DomainFullError, match="max_pools"):
            m.add_pool(PoolConfig("b", 64, 1))
        assert m.list_pools() == ["a"]
        assert pool_segments(domain, "b") == []


def test_add_pool_beyond_max_buffers_raises_domain_full_error_and_leaves_nothing(domain):
    config = ShmConfig(pools=[PoolConfig("a", 64, 6)], max_buffers=8)
    with ShmManager(domain, config, reaper_interval=None) as m:
        with pytest.raises(DomainFullError, match="max_buffers"):
            m.add_pool(PoolConfig("b", 64, 3))
        assert m.list_pools() == ["a"]
        assert pool_segments(domain, "b") == []
        with m.add_pool(PoolConfig("c", 64, 2)).allocate() as b:  # the room left is usable
            assert b.pool == "c"


def test_add_pool_keeps_the_growth_reserve_of_expandable_pools(domain):
    config = ShmConfig(pools=[PoolConfig("grow", 64, 2, expandable=True, max_blocks=4)],
                       max_buffers=4)
    with ShmManager(domain, config, reaper_interval=None) as m:
        try:
            m.add_pool(PoolConfig("other", 32, 2))
        except DomainFullError:
            pass  # refusing is fine too
        held = []
        try:
            for _ in range(4):
                held.append(m.allocate_from_pool("grow", timeout=0))
        finally:
            for b in held:
                b.release()


def test_add_pool_with_a_duplicate_name_raises_value_error(manager):
    with pytest.raises(ValueError, match="already has a pool named 'tiny'"):
        manager.add_pool(PoolConfig("tiny", 64, 1))
    assert manager.list_pools() == ["tiny", "small"]


def test_add_pool_needs_a_pool_config(manager):
    with pytest.raises(TypeError):
        manager.add_pool({"name": "x", "block_size": 64, "block_count": 1})


def test_remove_pool_in_use_raises_pool_in_use_error(manager):
    b = manager.allocate(10)
    with pytest.raises(PoolInUseError, match="'tiny' has 1 blocks in use"):
        manager.remove_pool("tiny")
    assert "tiny" in manager.list_pools()
    with manager.allocate(10) as again:  # refusing left it usable
        assert again.pool == "tiny"
    b.release()


def test_remove_pool_after_release_removes_it_and_its_segments(domain, manager):
    manager.allocate(10).release()
    manager.remove_pool("tiny")
    assert manager.list_pools() == ["small"]
    assert pool_segments(domain, "tiny") == []
    with pytest.raises(PoolNotFoundError):
        manager.get_pool("tiny")
    with manager.allocate(10) as b:
        assert b.pool == "small"


def test_removed_pool_disappears_for_another_manager(domain, manager):
    with ShmManager(domain, reaper_interval=None) as other:
        other.allocate(10).release()  # its view of the pools is built
        manager.remove_pool("tiny")
        assert other.list_pools() == ["small"]
        with other.allocate(10) as b:
            assert b.pool == "small"


def test_remove_unknown_pool_raises_pool_not_found_error(manager):
    with pytest.raises(PoolNotFoundError):
        manager.remove_pool("nope")


def test_removed_pool_name_can_be_added_again(domain, manager):
    manager.remove_pool("tiny")
    manager.add_pool(PoolConfig("tiny", 128, 2))
    assert len(pool_segments(domain, "tiny")) == 1
    with manager.allocate_from_pool("tiny") as b:
        assert b.size == 128


def test_config_property_reflects_the_domains_pools(manager, small_config):
    assert manager.config == small_config
    manager.add_pool(PoolConfig("mid", 1024, 3, expandable=True, max_blocks=6))
    assert manager.config.pools[-1] == PoolConfig("mid", 1024, 3, True, 6)
    manager.remove_pool("tiny")
    assert [p.name for p in manager.config.pools] == ["small", "mid"]


def test_config_property_of_an_attached_manager_is_the_domains(domain, manager, small_config):
    other_config = ShmConfig(pools=[PoolConfig("other", 64, 4)], max_buffers=8)
    with ShmManager(domain, other_config, reaper_interval=None) as other:
        assert other.config == small_config


@pytest.mark.parametrize(
    "make",
    [
        lambda: PoolConfig("bad name", 64, 1),
        lambda: PoolConfig("", 64, 1),
        lambda: PoolConfig("p", 0, 1),
        lambda: PoolConfig("p", 64, 0),
        lambda: PoolConfig("p", 64, -1),
        lambda: PoolConfig("p", 64.0, 1),
        lambda: PoolConfig("p", 64, 4, expandable=True, max_blocks=3),
        lambda: ShmConfig(pools=[PoolConfig("p", 64, 1), PoolConfig("p", 128, 1)]),
        lambda: ShmConfig(pools=[PoolConfig("p", 64, 10)], max_buffers=9),
        lambda: ShmConfig(pools=[PoolConfig("p", 64, 2, expandable=True, max_blocks=8)],
                          max_buffers=4),
        lambda: ShmConfig(max_processes=0),
        lambda: ShmConfig(name_prefix="a/b"),
    ],
)
def test_invalid_configuration_raises_value_error(make):
    with pytest.raises(ValueError):
        make()


def test_default_config_pools():
    config = ShmConfig.default_config()
    assert config.pools == [PoolConfig("small", 4096, 1024), PoolConfig("medium", 65536, 512),
                            PoolConfig("large", 1 << 20, 128)]
    assert config.name_prefix == "mq."


def test_manager_without_config_uses_the_default(domain):
    with ShmManager(domain, reaper_interval=None) as m:
        assert m.config.pools == ShmConfig.default_config().pools
        stats = m.get_stats()
        assert [(p.name, p.block_size, p.block_count) for p in stats.pool_stats] == [
            ("small", 4096, 1024), ("medium", 65536, 512), ("large", 1 << 20, 128)]


def test_every_payload_is_64_byte_aligned(domain):
    config = ShmConfig(pools=[PoolConfig("odd", 100, 7), PoolConfig("odder", 1000, 5),
                              PoolConfig("grow", 72, 3, expandable=True, max_blocks=9)],
                       max_buffers=32)
    with ShmManager(domain, config, reaper_interval=None) as m:
        held = [m.allocate_from_pool(name, timeout=0)
                for name, n in (("odd", 7), ("odder", 5), ("grow", 9)) for _ in range(n)]
        for b in held:
            assert b.numpy().ctypes.data % 64 == 0, (b.pool, b.id)
            assert np.frombuffer(b.memoryview(), np.uint8).ctypes.data % 64 == 0
        for b in held:
            b.release()


def test_blocks_of_a_pool_do_not_overlap(manager):
    held = [manager.allocate_from_pool("tiny") for _ in range(16)]
    for i, b in enumerate(held):
        b.numpy()[:] = i
    assert all((b.numpy() == i).all() for i, b in enumerate(held))
    for b in held:
        b.release()


# ================================================================ stats


def test_get_stats_fields_after_some_allocations(manager):
    a, b, c = manager.allocate(100), manager.allocate(200), manager.allocate(3000)
    b.release()
    s = manager.get_stats()
    assert isinstance(s, ShmStats)
    assert s.total_pools == 2
    assert s.total_capacity == 24
    assert s.total_allocated == 2
    assert s.total_free == 22
    assert s.allocation_count == 3
    assert s.deallocation_count == 1
    assert s.failed_allocations == 0
    assert s.size_histogram == {128: 1, 256: 1, 4096: 1}
    assert s.alloc_latency_mean_ns > 0
    assert s.alloc_latency_max_ns >= s.alloc_latency_mean_ns
    assert s.processes == 1
    a.release()
    c.release()


def test_pool_stats_fields(manager):
    held = [manager.allocate(100) for _ in range(4)]
    held.pop().release()
    tiny, small = manager.get_stats().pool_stats
    assert isinstance(tiny, PoolStats)
    assert (tiny.name, tiny.pool_id, tiny.block_size, tiny.block_count) == ("tiny", 0, 256, 16)
    assert (tiny.blocks_used, tiny.blocks_free, tiny.high_water) == (3, 13, 4)
    assert tiny.utilization == pytest.approx(3 / 16)
    assert (small.name, small.pool_id, small.blocks_used, small.utilization) == (
        "small", 1, 0, 0.0)
    for b in held:
        b.release()


def test_stats_of_a_fresh_domain_are_zero(manager):
    s = manager.get_stats()
    assert (s.allocation_count, s.deallocation_count, s.failed_allocations) == (0, 0, 0)
    assert s.size_histogram == {}
    assert s.alloc_latency_mean_ns == 0.0 and s.alloc_latency_max_ns == 0


def test_stats_include_another_live_process(domain, manager):
    code = r"""
import sys
from multiqueue import ShmManager
m = ShmManager(sys.argv[1], name="holder", reaper_interval=None)
held = [m.allocate(n) for n in (100, 200, 3000)]
held.pop().release()
print("ready", flush=True)
sys.stdin.readline()
m.shutdown()
print("done", flush=True)
"""
    with spawned(code, domain) as proc:
        assert read_line(proc) == ["ready"]
        s = manager.get_stats()
        assert s.processes == 2
        assert (s.allocation_count, s.deallocation_count, s.total_allocated) == (3, 1, 2)
        assert s.size_histogram == {128: 1, 256: 1, 4096: 1}
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert read_line(proc) == ["done"]
    s = manager.get_stats()
    assert s.processes == 1
    assert (s.allocation_count, s.total_allocated) == (3, 0)
    assert s.size_histogram == {128: 1, 256: 1, 4096: 1}


def test_blocks_freed_by_shutdown_count_as_deallocations(domain, manager):
    with ShmManager(domain, reaper_interval=None) as other:
        held = [other.allocate(10) for _ in range(3)]
        held.pop().release()
        other.shutdown()
        for b in held:
            b._live = False
    s = manager.get_stats()
    assert (s.allocation_count, s.total_allocated) == (3, 0)
    assert s.deallocation_count == 3


def test_stats_keep_a_finished_processs_allocations(domain, manager):
    code = r"""
import sys
from multiqueue import ShmManager
with ShmManager(sys.argv[1], reaper_interval=None) as m:
    for _ in range(5):
        m.allocate(64).release()
"""
    done = run_python(code, domain)
    assert done.returncode == 0, done.stderr
    s = manager.get_stats()
    assert (s.allocation_count, s.deallocation_count) == (5, 5)
    assert s.size_histogram == {128: 5}
    assert s.pool_stats[0].high_water == 1


def test_print_stats_prints_a_table(domain, manager, capsys):
    held = manager.allocate(100)
    manager.print_stats()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert domain in lines[0]
    assert lines[1].split() == ["pool", "block", "blocks", "used", "free", "util", "high"]
    assert lines[2].split()[:4] == ["tiny", "256", "B", "16"]
    assert any(line.startswith("small") for line in lines)
    assert "allocations 1" in out
    held.release()


def test_print_stats_to_a_file(manager, tmp_path):
    with open(tmp_path / "stats.txt", "w") as f:
        manager.print_stats(file=f)
    assert "tiny" in (tmp_path / "stats.txt").read_text()


# ================================================================ lifecycle


def test_is_initialized_until_shutdown(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    assert m.is_initialized()
    m.shutdown()
    assert not m.is_initialized()


def test_initialize_when_initialized_is_a_no_op(manager):
    b = manager.allocate(10)
    assert manager.initialize() is True
    assert b.ref_count == 1
    b.release()


def test_shutdown_releases_every_reference_this_process_holds(domain, manager):
    kept = manager.allocate(10)
    with ShmManager(domain, reaper_interval=None) as m:
        mine = [m.allocate(10) for _ in range(3)]
        shared = m.get(kept.id)
        assert kept.ref_count == 2
        assert manager.get_stats().total_allocated == 4
        m.shutdown()
        assert manager.get_stats().total_allocated == 1
        assert kept.ref_count == 1
        for b in (*mine, shared):
            b._live = False  # released by the shutdown
    kept.release()


def test_last_shutdown_removes_the_segments(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    assert len(domain_segments("mq.", domain)) == 3
    m.shutdown()
    assert domain_segments("mq.", domain) == []


def test_shutdown_with_others_attached_keeps_the_segments(domain, manager):
    with ShmManager(domain, reaper_interval=None) as m:
        m.shutdown()
    assert len(domain_segments("mq.", domain)) == 3
    with manager.allocate(10) as b:
        assert b.ref_count == 1


def test_shutdown_unlink_false_keeps_the_segments(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    m.add_pool(PoolConfig("extra", 64, 2))
    m.shutdown(unlink=False)
    try:
        assert len(domain_segments("mq.", domain)) == 4
        with ShmManager(domain, reaper_interval=None, create=False) as again:
            assert again.list_pools() == ["tiny", "small", "extra"]
    finally:
        ShmManager.cleanup(domain)


def test_shutdown_unlink_true_removes_the_segments_even_if_others_are_attached(domain, manager):
    manager.allocate(10).release()
    b = manager.allocate(10)
    b.memoryview()[0] = 1  # this process has mapped the pool
    with ShmManager(domain, reaper_interval=None) as m:
        m.shutdown(unlink=True)
    assert domain_segments("mq.", domain) == []
    b.memoryview()[0] = 2  # existing mappings keep working
    assert b.numpy()[0] == 2
    b.release()
    with pytest.raises(SegmentError):
        ShmManager(domain, reaper_interval=None, create=False)  # nobody new can attach


def test_shutdown_twice_is_harmless(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    m.shutdown()
    m.shutdown()
    assert not m.is_initialized()


def test_shutdown_stops_the_reaper_thread(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=0.01)
    reaper = m._reaper
    assert reaper.is_alive()
    m.shutdown()
    assert not reaper.is_alive()


@pytest.mark.parametrize(
    "use",
    [
        pytest.param(lambda m: m.allocate(10), id="allocate"),
        pytest.param(lambda m: m.allocate(10**9), id="allocate_too_large"),
        pytest.param(lambda m: m.allocate_from_pool("tiny"), id="allocate_from_pool"),
        pytest.param(lambda m: m.get(1 << 32), id="get"),
        pytest.param(lambda m: m.get_pool("tiny"), id="get_pool"),
        pytest.param(lambda m: m.list_pools(), id="list_pools"),
        pytest.param(lambda m: m.add_pool(PoolConfig("x", 64, 1)), id="add_pool"),
        pytest.param(lambda m: m.remove_pool("tiny"), id="remove_pool"),
        pytest.param(lambda m: m.get_stats(), id="get_stats"),
        pytest.param(lambda m: m.print_stats(), id="print_stats"),
        pytest.param(lambda m: m.processes(), id="processes"),
        pytest.param(lambda m: m.reap(), id="reap"),
        pytest.param(lambda m: m.config, id="config"),
    ],
)
def test_using_a_shut_down_manager_raises_not_initialized_error(domain, small_config, use):
    m = ShmManager(domain, small_config, reaper_interval=None)
    m.shutdown()
    with pytest.raises(NotInitializedError, match="shut down"):
        use(m)


def test_initialize_again_after_shutdown_works(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    m.shutdown()
    assert m.initialize() is True
    try:
        assert m.is_initialized()
        assert domain_segments("mq.", domain)
        with m.allocate(10) as b:
            assert b.pool == "tiny"
        assert m.get_stats().allocation_count == 1
    finally:
        m.shutdown()


def test_initialize_again_rejoins_a_domain_kept_alive_by_another(domain, manager):
    b = manager.allocate(10)
    with ShmManager(domain, reaper_interval=None) as m:
        m.shutdown()
        m.initialize()
        with m.get(b.id) as seen:
            assert seen.ref_count == 2
    b.release()


def test_context_manager_shuts_down_and_removes_the_domain(domain, small_config):
    with ShmManager(domain, small_config, reaper_interval=None) as m:
        assert m.is_initialized()
        held = m.allocate(10)
    assert not m.is_initialized()
    assert held.id
    assert domain_segments("mq.", domain) == []


def test_context_manager_shuts_down_on_an_exception(domain, small_config):
    with pytest.raises(KeyError):
        with ShmManager(domain, small_config, reaper_interval=None) as m:
            m.allocate(10)
            raise KeyError("boom")
    assert not m.is_initialized()
    assert domain_segments("mq.", domain) == []


def test_repr_shows_domain_and_state(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    assert domain in repr(m) and "initialized" in repr(m)
    m.shutdown()
    assert "shut down" in repr(m)


def test_cleanup_refuses_a_domain_of_another_layout_version_that_a_process_maps(domain):
    """Its process table cannot be read, so whoever maps its files is taken as a user."""
    from helpers import spawn_python
    from multiqueue import DomainInUseError

    with ShmManager(domain, ShmConfig(pools=[PoolConfig("p", 64, 2)]), reaper_interval=None) as m:
        m.shutdown(unlink=False)
    control = segment_path("mq.", domain, "ctl")
    with open(control, "r+b") as f:  # as a multiqueue of another layout version wrote it
        f.seek(L.SegmentHeader.version.offset)
        f.write((99).to_bytes(4, "little"))
    user = spawn_python("import mmap, sys\nf = open(sys.argv[1], 'rb')\n"
                        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\nprint('mapped', flush=True)\n"
                        "sys.stdin.readline()\n", control)
    try:
        assert user.stdout.readline().strip() == "mapped"
        with pytest.raises(DomainInUseError, match=rf"layout version 99.*processes {user.pid} map"):
            ShmManager.cleanup(domain)
        assert os.path.exists(control)
    finally:
        user.communicate("\n", timeout=30)
    assert ShmManager.cleanup(domain) and not domain_segments("mq.", domain)
