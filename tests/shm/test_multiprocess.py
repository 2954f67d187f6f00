"""Buffers shared between separate interpreters that attach to a domain by name.

Every other process here is a fresh `python -c` started with subprocess: nothing is
inherited through fork, exactly as an unrelated program would attach.  The
processes talk over stdin/stdout lines only to sequence the steps; the data itself
travels through shared memory.
"""

import os
import signal

import numpy as np
import pytest

from helpers import spawn_python
from multiqueue import InvalidBufferError, PoolConfig, ShmConfig, ShmManager

# A process that runs commands read line by line from stdin against one domain.
STEPPER = r"""
import sys, numpy as np
from multiqueue import ShmManager
m = ShmManager(sys.argv[1], name=sys.argv[2], reaper_interval=None)
held = {}
def say(*words):
    print(*words, flush=True)
say("attached", m._proc_slot)
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "alloc":                      # alloc NBYTES VALUE -> id
        b = m.allocate(int(args[0]))
        b.numpy(np.uint32)[:] = int(args[1])
        held[b.id] = b
        say("id", b.id, b.ref_count)
    elif cmd == "get":                      # get ID -> first value, refcount
        b = m.get(int(args[0]))
        held[b.id] = b
        view = b.numpy(np.uint32)
        say("value", int(view[0]), int(view[-1]), b.ref_count)
    elif cmd == "fill":                     # fill ID VALUE: write through the held handle
        held[int(args[0])].numpy(np.uint32)[:] = int(args[1])
        say("filled")
    elif cmd == "reread":                   # reread ID: read the SAME view again
        view = held[int(args[0])].numpy(np.uint32)
        say("value", int(view[0]), int(view[-1]), held[int(args[0])].ref_count)
    elif cmd == "refcount":
        say("refcount", held[int(args[0])].ref_count)
    elif cmd == "release":
        b = held.pop(int(args[0]))
        b.release()
        say("released")
    elif cmd == "take":                     # take N: hold N buffers, report their ids
        ids = []
        for i in range(int(args[0])):
            b = m.allocate(64)
            b.numpy(np.uint8)[:] = i % 251
            held[b.id] = b
            ids.append(b.id)
        say("took", *ids)
    elif cmd == "exit":
        m.shutdown()
        say("bye")
        break
"""


class Peer:
    """A separate interpreter driven line by line."""

    def __init__(self, domain: str, name: str):
        self.proc = spawn_python(STEPPER, domain, name)
        self.name = name
        assert self.expect("attached")

    def send(self, line: str) -> list[str]:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> list[str]:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"{self.name} died: {self.proc.stderr.read()}")
        return line.split()

    def expect(self, word: str) -> list[str]:
        reply = self.read()
        assert reply[0] == word, reply
        return reply[1:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.send("exit")
        self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def peers(domain):
    started = []

    def start(name):
        started.append(Peer(domain, name))
        return started[-1]

    yield start
    for peer in started:
        if peer.proc.poll() is None:
            peer.proc.kill()
        peer.proc.wait(timeout=30)
        for stream in (peer.proc.stdin, peer.proc.stdout, peer.proc.stderr):
            stream.close()


@pytest.fixture
def config():
    return ShmConfig(pools=[PoolConfig("small", 4096, 200), PoolConfig("big", 1 << 20, 4)],
                     max_buffers=512, max_processes=16)


def test_buffer_written_in_one_process_is_read_in_place_by_another(domain, config, peers):
    with ShmManager(domain, config, reaper_interval=None) as observer:
        a, b = peers("writer"), peers("reader")
        buffer_id, refs = map(int, a.send("alloc 65536 7")[1:])
        assert refs == 1
        assert observer.get_stats().total_allocated == 1

        # B takes a reference by id: it sees A's data, the count is 2
        assert b.send(f"get {buffer_id}") == ["value", "7", "7", "2"]
        # A writes again; B reads the same view it made before: no copy was taken
        assert a.send(f"fill {buffer_id} 123456") == ["filled"]
        assert b.send(f"reread {buffer_id}") == ["value", "123456", "123456", "2"]

        assert a.send(f"release {buffer_id}") == ["released"]
        assert b.send(f"refcount {buffer_id}") == ["refcount", "1"]
        assert b.send(f"reread {buffer_id}") == ["value", "123456", "123456", "1"]
        assert b.send(f"release {buffer_id}") == ["released"]

        stats = observer.get_stats()
        assert stats.total_allocated == 0
        assert {p.name: p.blocks_used for p in stats.pool_stats} == {"small": 0, "big": 0}
        assert stats.allocation_count == stats.deallocation_count == 1
        with pytest.raises(InvalidBufferError):
            observer.get(buffer_id)  # freed: the id is stale everywhere
        a.close()
        b.close()


CHURN = r"""
import struct, sys, threading
from multiqueue import ShmManager
domain, proc, threads, cycles = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = ShmManager(domain, name=f"churn{proc}", reaper_interval=None)
token = struct.Struct("<QQ")  # (busy flag, owner token)
errors = []
def work(thread):
    for i in range(cycles):
        b = m.allocate(64)
        view = b.memoryview()
        busy, _ = token.unpack_from(view)
        mine = (proc << 48) | (thread << 40) | i
        token.pack_into(view, 0, 1, mine)
        if busy:
            errors.append(f"block {b.id:#x} was handed out while busy")
        if token.unpack_from(view) != (1, mine):
            errors.append(f"block {b.id:#x} written by another holder")
        token.pack_into(view, 0, 0, mine)
        b.release()
print("ready", flush=True)
sys.stdin.readline()
ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
print("errors", len(errors), *errors[:3], flush=True)
m.shutdown()
"""


def test_two_processes_by_four_threads_never_share_a_block(domain):
    threads, cycles = 4, 200_000
    config = ShmConfig(pools=[PoolConfig("churn", 64, 6)], max_buffers=64, max_processes=8)
    with ShmManager(domain, config, reaper_interval=None) as observer:
        workers = [spawn_python(CHURN, domain, p, threads, cycles) for p in (1, 2)]
        try:
            for w in workers:
                assert w.stdout.readline().split() == ["ready"], w.stderr.read()
            for w in workers:  # start both at once
                w.stdin.write("go\n")
                w.stdin.flush()
            for w in workers:
                assert w.stdout.readline().split() == ["errors", "0"], w.stderr.read()
                assert w.wait(timeout=600) == 0
        finally:
            for w in workers:
                w.kill()
                w.wait()
                for s in (w.stdin, w.stdout, w.stderr):
                    s.close()
        stats = observer.get_stats()
        total = 2 * threads * cycles
        assert stats.total_allocated == 0
        assert stats.allocation_count == stats.deallocation_count == total
        assert stats.failed_allocations == 0
        assert stats.pool_stats[0].high_water <= 6


def test_sigkilled_process_references_are_reclaimed(domain, config, peers):
    with ShmManager(domain, config, reaper_interval=None) as survivor:
        victim = peers("victim")
        ids = [int(i) for i in victim.send("take 100")[1:]]
        assert len(ids) == 100 and survivor.get_stats().total_allocated == 100
        shared = survivor.get(ids[42])  # a living process shares one of them
        assert shared.ref_count == 2

        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=30)
        report = survivor.reap()

        assert report.processes == [(victim.proc.pid, "victim")]
        assert report.references_released == 100
        assert report.blocks_freed == 99
        stats = survivor.get_stats()
        assert stats.total_allocated == 1
        assert stats.allocation_count - stats.deallocation_count == 1
        # the shared buffer is still valid and holds what the dead process wrote
        assert shared.ref_count == 1
        assert np.all(shared.numpy() == 42)
        for dead_only in ids[:42] + ids[43:]:
            with pytest.raises(InvalidBufferError):
                survivor.get(dead_only)
        shared.release()
        assert survivor.get_stats().total_allocated == 0
        assert [p["pid"] for p in survivor.processes()] == [os.getpid()]
        assert survivor.reap().processes == []  # nothing left to reap: idempotent


def test_background_reaper_reclaims_without_being_asked(domain, config, peers):
    import threading

    with ShmManager(domain, config, reaper_interval=0.05) as survivor:
        victim = peers("victim")
        victim.send("take 10")
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=30)
        reclaimed = threading.Event()
        for _ in range(200):  # the reaper runs every 50 ms; allow it 10 s on a loaded machine
            if survivor.get_stats().total_allocated == 0:
                reclaimed.set()
                break
            reclaimed.wait(0.05)
        assert reclaimed.is_set()


def test_attaching_to_a_stale_domain_reaps_its_dead_processes(domain, config, peers):
    victim = peers("victim")
    victim.send("take 5")
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=30)
    # every process of the domain is dead: the next one to attach reuses it
    with ShmManager(domain, config, reaper_interval=None) as fresh:
        stats = fresh.get_stats()
        assert stats.total_allocated == 0
        assert stats.allocation_count == stats.deallocation_count == 5
        assert [p["pid"] for p in fresh.processes()] == [os.getpid()]


def test_forked_child_cannot_use_the_parents_manager(domain, config):
    with ShmManager(domain, config, reaper_interval=None) as m:
        b = m.allocate(100)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: every use must refuse, nothing may touch the parent's ledger
            try:
                m.allocate(10)
                os.write(write_end, b"allowed")
            except Exception as e:  # noqa: BLE001 - reported to the parent
                os.write(write_end, type(e).__name__.encode())
            os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end, "rb") as r:
            assert r.read() == b"NotInitializedError"
        assert b.ref_count == 1
        b.release()
