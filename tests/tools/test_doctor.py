"""mq doctor: every held buffer explained by its holders, dead holders and leaks found.

Holders run in separate interpreters (subprocess, not fork) that attach by domain
name; "SIGKILLed" means a real SIGKILL of such a process while it holds buffers.
"""

import json
import os
import signal

import pytest

from helpers import spawn_python
from multiqueue import SegmentError, ShmManager
from multiqueue.shm.segment import domain_segments
from multiqueue.stream import PortQueue
from multiqueue.tools.doctor import DoctorReport, diagnose

HOLDER = r"""
import json, os, sys
from multiqueue import ShmManager
from multiqueue.stream import PortQueue

domain, mode = sys.argv[1], sys.argv[2]
m = ShmManager(domain, name="holder", reaper_interval=None, create=False)
held = []
if mode == "hold":  # a buffer with 2 references, one with 1, and a reference on the parent's
    a = m.allocate(100)
    b = m.allocate(3000)
    held = [a, a.share(), b, m.get(int(sys.argv[3]))]
    print(json.dumps({"pid": os.getpid(), "a": a.id, "b": b.id}), flush=True)
elif mode == "read":  # a reader of queue "frames" that pops one item when told to
    q = PortQueue(m, "frames", create=False)
    reader = q.reader()
    print(json.dumps({"pid": os.getpid(), "reader": reader.index}), flush=True)
    sys.stdin.readline()
    held = [reader.pop(timeout=30)]
    print(json.dumps({"popped": held[0].id}), flush=True)
sys.stdin.readline()
for h in held:
    h.release()
m.shutdown()
print("done", flush=True)
"""


class Holder:
    def __init__(self, domain, *args):
        self.proc = spawn_python(HOLDER, domain, *args)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"holder exited: {self.proc.stderr.read()}")
        return json.loads(line)

    def send(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        self.send()
        assert self.proc.stdout.readline().strip() == "done", self.proc.stderr.read()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            s.close()


@pytest.fixture
def holders():
    started = []

    def start(domain, *args):
        started.append(Holder(domain, *args))
        return started[-1]

    yield start
    for h in started:
        h.close()


def holders_of(report: DoctorReport, buffer_id: int) -> dict:
    """{(kind, pid, queue, reader): (alive, count)} of one buffer in the report."""
    (b,) = [b for b in report.buffers if b.id == buffer_id]
    return {(h.kind, h.pid, h.queue, h.reader): (h.alive, h.count) for h in b.holders}


def ledger_offset(manager, buffer_id: int) -> int:
    """Offset in the control mapping of `manager`'s ledger word for that buffer's slot."""
    c = manager._ctl
    return c.ledger_offset + (manager.process_slot * c.max_buffers + (buffer_id & 0xFFFFFFFF)) * 8


def test_a_healthy_domain_with_a_live_holder_has_every_buffer_attributed(domain, manager, holders):
    mine = manager.allocate(200)
    child = holders(domain, "hold", mine.id)
    ids = child.read()
    me, pid = os.getpid(), ids["pid"]
    report = diagnose(domain)
    assert report.ok, report.format()
    assert {b.id for b in report.buffers} == {mine.id, ids["a"], ids["b"]}
    assert holders_of(report, ids["a"]) == {("process", pid, None, None): (True, 2)}
    assert holders_of(report, ids["b"]) == {("process", pid, None, None): (True, 1)}
    assert holders_of(report, mine.id) == {("process", me, None, None): (True, 1),
                                           ("process", pid, None, None): (True, 1)}
    assert all(b.leftover == 0 and b.ref_count == b.accounted for b in report.buffers)
    pools = {b.id: (b.pool, b.size, b.capacity) for b in report.buffers}
    assert pools[ids["a"]] == ("tiny", 100, 256) and pools[ids["b"]] == ("small", 3000, 4096)
    assert {(p.pid, p.name, p.alive, p.references) for p in report.processes} == {
        (me, manager._name, True, 1), (pid, "holder", True, 4)}
    text = report.format()
    assert f"{ids['a']:#x}" in text and "no problems found" in text
    json.dumps(report.to_json())  # serializable as is
    child.finish()
    mine.release()
    assert diagnose(domain).buffers == []


def test_a_sigkilled_holder_is_named_with_exactly_its_references_until_reaped(domain, manager, holders):
    shared = manager.allocate(200)
    child = holders(domain, "hold", shared.id)
    ids = child.read()
    pid = ids["pid"]
    child.kill()

    report = diagnose(domain)
    assert not report.ok
    dead = ("process", pid, None, None)
    assert holders_of(report, ids["a"]) == {dead: (False, 2)}
    assert holders_of(report, ids["b"]) == {dead: (False, 1)}
    me = ("process", os.getpid(), None, None)
    assert holders_of(report, shared.id) == {me: (True, 1), dead: (False, 1)}
    assert all(b.leftover == 0 for b in report.buffers)
    (finding,) = report.findings
    assert finding.kind == "dead-process" and finding.pid == pid and finding.references == 4
    assert sorted(finding.buffers) == sorted([ids["a"], ids["b"], shared.id])
    assert "reap()" in finding.fix and f"4 references of dead process {pid}" in finding.fix
    assert f"process pid {pid} 'holder' (DEAD)" in report.format()
    assert pid in [p["pid"] for p in manager.processes()]  # the doctor reaped nobody

    reaped = manager.reap()
    assert reaped.processes == [(pid, "holder")] and reaped.references_released == 4
    after = diagnose(domain)
    assert after.ok, after.format()
    assert [b.id for b in after.buffers] == [shared.id]
    assert holders_of(after, shared.id) == {me: (True, 1)}
    shared.release()


def test_unread_items_of_a_sigkilled_reader_are_attributed_to_its_queue_reader(domain, manager, holders):
    with PortQueue(manager, "frames", capacity=8) as queue:
        child = holders(domain, "read")
        pid, index = child.read().values()
        pushed = []
        for _ in range(3):
            b = manager.allocate(100)
            pushed.append(b.id)
            queue.push(b)
        child.send()
        assert child.read() == {"popped": pushed[0]}
        child.kill()

        report = diagnose(domain)
        assert holders_of(report, pushed[0]) == {("process", pid, None, None): (False, 1)}
        for buffer_id in pushed[1:]:
            assert holders_of(report, buffer_id) == {("queue", pid, "frames", index): (False, 1)}
        (q,) = report.queues
        assert q.name == "frames" and [(r.pid, r.alive, r.unread) for r in q.readers] == [(pid, False, 2)]
        kinds = {f.kind: f for f in report.findings}
        assert set(kinds) == {"dead-process", "dead-reader"}
        assert kinds["dead-reader"].pid == pid and kinds["dead-reader"].references == 2
        assert sorted(kinds["dead-reader"].buffers) == sorted(pushed[1:])
        assert "reap_dead_readers()" in kinds["dead-reader"].fix
        assert kinds["dead-process"].references == 1
        assert f"queue 'frames' reader {index} (pid {pid} 'holder', DEAD)" in report.format()

        assert queue.reap_dead_readers() == 1
        manager.reap()
        after = diagnose(domain)
        assert after.ok and after.buffers == [], after.format()


def test_a_reference_lost_in_a_crash_window_is_reported_as_a_leak_of_one(domain, manager):
    kept = manager.allocate(100)
    # another process slot takes a reference, then "dies" between the count and the ledger
    # write: its ledger word for the slot is cleared, the reference count is not
    other = ShmManager(domain, name="victim", reaper_interval=None)
    assert other._ctx.acquire(kept.id) == 0
    mm, at = other._control.mmap, ledger_offset(other, kept.id)
    mm[at:at + 8] = bytes(8)
    report = diagnose(domain)
    (b,) = report.buffers
    assert (b.id, b.ref_count, b.accounted, b.leftover) == (kept.id, 2, 1, 1)
    (finding,) = report.findings
    assert finding.kind == "leak" and finding.references == 1 and finding.buffers == [kept.id]
    assert "UNACCOUNTED (leak)" in report.format()
    other.shutdown()
    kept.release()  # the leaked reference keeps the block
    (b,) = diagnose(domain).buffers
    assert (b.ref_count, b.holders, b.leftover) == (1, [], 1)


def test_a_ledger_claiming_more_than_the_count_is_reported_inconsistent(domain, manager):
    b = manager.allocate(100)
    mm, at = manager._control.mmap, ledger_offset(manager, b.id)
    word = int.from_bytes(mm[at:at + 8], "little")
    mm[at:at + 8] = (word + 1).to_bytes(8, "little")
    try:
        report = diagnose(domain)
        (finding,) = report.findings
        assert finding.kind == "inconsistent" and finding.buffers == [b.id]
        assert report.buffers[0].leftover == -1
    finally:
        mm[at:at + 8] = word.to_bytes(8, "little")
    b.release()
    assert diagnose(domain).ok


def test_a_block_a_dead_process_took_but_never_published_is_shown(domain, manager):
    freed = manager.allocate(100)
    buffer_id = freed.id
    freed.release()  # its slot is back at generation g with no references
    other = ShmManager(domain, name="victim", reaper_interval=None)
    record = other._procs[other._proc_slot]
    mm, at = other._control.mmap, ledger_offset(other, buffer_id)
    # "popped, ledger written at g + 1, killed before publishing"; a wrong start time makes it dead
    unpublished_id = buffer_id + (1 << 32)  # the same slot at generation g + 1
    mm[at:at + 8] = ((unpublished_id >> 32) << 32 | 1).to_bytes(8, "little")
    record.start_time += 1
    try:
        report = diagnose(domain)
    finally:
        record.start_time -= 1
        mm[at:at + 8] = bytes(8)  # undo before anyone reaps: the slot is really on its free list
    (b,) = report.buffers
    assert b.unpublished and b.ref_count == 0 and b.id == unpublished_id
    assert [(h.pid, h.alive, h.count) for h in b.holders] == [(os.getpid(), False, 1)]
    (finding,) = report.findings
    assert finding.kind == "dead-process" and "1 block it took but never published" in finding.message
    assert "returns the 1 unpublished block to its pool" in finding.fix
    other.shutdown()
    assert diagnose(domain).ok


def test_diagnose_changes_nothing_and_registers_no_process(domain, manager):
    b = manager.allocate(100)
    before = bytes(manager._control.mmap)
    report = diagnose(domain)
    assert [p.pid for p in report.processes] == [os.getpid()]
    assert bytes(manager._control.mmap) == before
    b.release()


def test_diagnose_of_a_missing_domain_raises_segment_error(domain):
    with pytest.raises(SegmentError, match="does not exist"):
        diagnose(domain)
    assert domain_segments("mq.", domain) == []


# ------------------------------------------------------------- pool accounting


def _pop_unrecorded(manager, pool: str) -> int:
    """Take the top block of a pool's free list the way alloc's first step does, and stop
    there: what a process killed between the pop and its ledger record leaves behind."""
    import ctypes

    from multiqueue import _native
    from multiqueue.shm import layout as L

    mm, ctl = manager._control.mmap, manager._ctl
    pool_id = next(i for i, p in enumerate(manager._pools) if p.name.decode() == pool)
    head_at = ctl.pools_offset + pool_id * ctypes.sizeof(L.Pool)
    head = _native.atomic_load_u64(mm, head_at)
    slot = (head & 0xFFFFFFFF) - 1
    next_free = manager._entries[slot].next_free
    assert _native.atomic_cas_u64(mm, head_at, head, (((head >> 32) + 1) << 32) | next_free)
    return slot


def test_doctor_accounts_for_every_block_of_every_pool(manager, domain):
    held = [manager.allocate(100), manager.allocate(100), manager.allocate(3000)]
    report = diagnose(domain)
    assert report.ok
    pools = {p.name: p for p in report.pools}
    tiny = pools["tiny"]
    assert (tiny.blocks, tiny.free, tiny.held, tiny.lost) == (16, 14, 2, 0)
    assert (pools["small"].free, pools["small"].held) == (7, 1)
    assert "tiny: 16 blocks = 14 free + 2 held" in report.format()
    for b in held:
        b.release()
    assert [(p.free, p.held) for p in diagnose(domain).pools] == [(16, 0), (8, 0)]


def test_doctor_finds_a_block_taken_from_the_free_list_and_never_recorded(manager, domain):
    slot = _pop_unrecorded(manager, "tiny")
    report = diagnose(domain)
    assert [f.kind for f in report.findings] == ["lost-block"]
    assert f"pool 'tiny' has 1 block (slot {slot})" in report.findings[0].message
    assert "mq cleanup" in report.findings[0].fix
    tiny = next(p for p in report.pools if p.name == "tiny")
    assert (tiny.free, tiny.held, tiny.lost) == (15, 0, 1)
    assert "+ 1 LOST" in report.format()


def test_doctor_reports_a_free_block_that_has_references_as_inconsistent(manager, domain):
    buffer = manager.allocate(100)
    slot = buffer.id & 0xFFFFFFFF
    buffer.release()  # back on top of the free list, generation 1, no references
    manager._entries[slot].state = (1 << 32) | 1  # a stray write: one reference on a free block
    report = diagnose(domain)
    kinds = sorted(f.kind for f in report.findings)
    assert kinds == ["inconsistent", "leak"]
    assert any(f"block slot {slot} of pool 'tiny' is in the free list" in f.message for f in report.findings)
    manager._entries[slot].state = 1 << 32  # repair, so shutdown finds a sane domain
