"""Model-based tests of the real lock-free protocols (hypothesis stateful testing).

The real ShmManager / Buffer / PortQueue run against a small reference model; after every step
the real domain must equal the model: doctor's accounting of every reference (who holds what,
ref counts, no finding), each pool's stats, each queue reader's lag and drops, each handle's
ref_count and payload tag.

- ``BuffersAndQueues``: one process, one domain per example (2 pools of 4 and 6 blocks):
  allocate by size and by pool, share, get by id, release, misuse (released handles, stale and
  forged ids: the documented error and nothing changed), push to a PortQueue with 1-2 readers
  (``block`` and ``drop_oldest``, joining at the latest or the oldest item), pop, peek, detach.
- ``TwoProcesses``: the same with a second real process, a worker attached by domain name and
  driven over stdin/stdout (one JSON line per command) that takes, allocates, releases references
  and reads a queue; it is SIGKILLed at random moments, sometimes right after a command was sent
  (it may die mid-operation); the survivor reaps it (``reap()``, or a push blocked by its dead
  reader) and a new worker starts.  A command in flight may end done or not done; the model
  accepts both and, besides, only the kill windows of docs/shm.md ("Known windows") and their like
  inside pop, detach and push: one reference to nobody that doctor reports as a leak, or a pool
  counting one block more than the model (a kill inside an allocation or a free).  Those are
  noted with a warning (and in ``NOTED``) when they happen.

Also here: every kind of worker command killed at least once (the machine driven by hand), and a
kill inside PortQueue.push's locked section followed by a new process taking the dead one's slot
(``test_queue_lock_of_a_dead_pusher_is_taken_back_after_its_slot_is_reused``: the lock word
names the holder's slot and its incarnation, so a new process in that slot is not taken for it).
"""

import json
import os
import select
import signal
import sys
import time
import uuid
import warnings
from collections import Counter, deque

import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from helpers import spawn_python
from multiqueue import (
    BufferReleasedError,
    InvalidBufferError,
    PoolConfig,
    PoolExhaustedError,
    ShmConfig,
    ShmManager,
)
from multiqueue.errors import QueueClosedError
from multiqueue.shm.segment import domain_segments, unlink_quietly
from multiqueue.stream import PortQueue
from multiqueue.stream.queue import LOCK_SLOT_MASK
from multiqueue.tools.doctor import diagnose

POOLS = {"a": (256, 4), "b": (4096, 6)}  # name: (block size, blocks), in size order
PID = os.getpid()
REPLY_TIMEOUT = 60.0  # generous: a worker's answer, a blocked push noticing a dead reader
NOTED: list[str] = []  # documented kill windows seen (a leak, a pool's counter one too high)
picks = st.integers(0, 1000)  # an index into a list of the model, modulo its length
pools = st.sampled_from(sorted(POOLS))


def new_domain() -> tuple[str, ShmManager]:
    name = f"test-st-{uuid.uuid4().hex[:12]}"
    config = ShmConfig(pools=[PoolConfig(n, s, c) for n, (s, c) in POOLS.items()],
                       max_buffers=32, max_processes=8)
    return name, ShmManager(name, config, reaper_interval=None)


def tell(what: str, *, count: bool = False) -> None:
    """note() (shown with a failing example), or event() (counted in the statistics), when
    running under hypothesis; machines are also driven by hand."""
    if currently_in_test_context():
        (event if count else note)(what)


def a_step_failed() -> bool:
    """In teardown(): is a failure of a step on its way out?  Then only clean up, so that it
    stays the error reported (the end-of-example checks would fail too, and say less)."""
    return sys.exc_info()[0] is not None


def close_domain(m: ShmManager, domain: str, clean: bool) -> None:
    """Shut the manager down; once ``clean``, its segments must be gone by themselves (the last
    process leaving removes them), else they are removed regardless."""
    try:
        if m.is_initialized():
            m.shutdown(unlink=None if clean else True)
    finally:
        leftovers = domain_segments("mq.", domain)
        for path in leftovers:
            unlink_quietly(path)
    assert not (clean and leftovers), f"segments left behind: {leftovers}"


def candidates(size: int) -> list[str]:
    return [name for name, (block, _count) in POOLS.items() if block >= size]


def allowed_outcomes(order: list[str], live: Counter, surplus: Counter) -> set:
    """Pools an allocation trying ``order`` may come from, None for PoolExhaustedError.

    A pool with fewer live blocks than it has surely has a free one; ``surplus`` blocks (a
    documented kill window left the pool's counter high, or the block out of its free list)
    make a pool maybe-full."""
    allowed = set()
    for name in order:
        count = POOLS[name][1]
        if live[name] < count:
            allowed.add(name)
        if live[name] < count - surplus[name]:
            return allowed  # it has a free block: no later pool is tried
    return allowed | {None}


def tag(buffer) -> None:
    """Write the buffer's id into its first 8 bytes: a block handed out twice shows."""
    buffer.memoryview()[:8] = buffer.id.to_bytes(8, "little")


def tagged(buffer) -> bool:
    return bytes(buffer.memoryview()[:8]) == buffer.id.to_bytes(8, "little")


class Reader:
    """The model of one queue reader: the ids it has still to read (one reference each)."""

    def __init__(self, real, queue: str, pid: int, index: int, policy: str, items=()):
        self.real, self.queue, self.pid, self.index, self.policy = real, queue, pid, index, policy
        self.items = deque(items)
        self.drops = 0

    def key(self) -> tuple:
        return ("queue", self.pid, self.queue, self.index)


def model_push(readers: list[Reader], capacity: int, buffer_id: int) -> bool:
    """A push as the model sees it: False if a blocking reader is full (nothing changes), else
    each full drop_oldest reader drops its oldest item and every reader gets the new one."""
    if any(r.policy == "block" and len(r.items) >= capacity for r in readers):
        return False
    for r in readers:
        if len(r.items) >= capacity:
            r.items.popleft()
            r.drops += 1
        r.items.append(buffer_id)
    return True


def check_domain(m: ShmManager, domain: str, holders: dict, leaked: Counter, pool_of: dict,
                 surplus: Counter):
    """The real domain equals the model.

    ``holders``: id -> Counter of (kind, pid, queue, reader) -> references, as doctor names
    them; ``leaked``: references nobody holds (doctor must report them as leaks)."""
    report = diagnose(domain)
    expected = Counter()
    for buffer_id, held in holders.items():
        expected[buffer_id] += sum(held.values())
    expected.update(leaked)
    expected = {i: n for i, n in expected.items() if n}
    actual = {b.id: b.ref_count for b in report.buffers}
    assert actual == expected, f"ref counts differ from the model\n{report.format()}"
    for b in report.buffers:
        got = Counter()
        for h in b.holders:
            got[(h.kind, h.pid, h.queue, h.reader)] += h.count
        assert got == +holders.get(b.id, Counter()), f"holders of {b.id:#x}\n{report.format()}"
        assert b.leftover == leaked[b.id] and b.pool == pool_of[b.id], report.format()
    leaks = {(f.buffers[0], f.references) for f in report.findings if f.kind == "leak"}
    assert leaks == {(i, n) for i, n in leaked.items() if n}, report.format()
    # a pool the model filled is reported full (a fact to show, not a fault of the domain)
    assert all(f.kind in ("leak", "pool-full") for f in report.findings), report.format()
    live = Counter(pool_of[i] for i in expected)
    for name, (_size, count) in POOLS.items():
        s = m.get_pool(name).stats()
        used = min(live[name] + surplus[name], count)
        assert (s.block_count, s.blocks_used, s.blocks_free) == (count, used, count - used), (name, s)
    return report


def check_queue(queue: PortQueue, readers: list[Reader]) -> None:
    got = sorted((r.index, r.pid, r.policy, r.lag, r.drops) for r in queue.stats().readers)
    assert got == sorted((r.index, r.pid, r.policy, len(r.items), r.drops) for r in readers)


# ---------------------------------------------------------------------- machine 1: one process


class BuffersAndQueues(RuleBasedStateMachine):
    """Buffers, references and a multicast queue in one process, against the model."""

    def __init__(self):
        super().__init__()
        self.domain, self.m = new_domain()
        self.q = None
        self.handles = []  # live handles (one reference each)
        self.released = deque(maxlen=16)  # released handles, to misuse
        self.readers: list[Reader] = []
        self.detached = deque(maxlen=4)  # detached QueueReader objects
        self.ring = deque()  # ids in the queue's ring (pushes that had a reader), newest last
        self.pool_of: dict[int, str] = {}
        self.known: set[int] = set()  # every id ever handed out

    @initialize(capacity=st.sampled_from([1, 2, 4]))
    def open_queue(self, capacity):
        self.q = PortQueue(self.m, "q", capacity=capacity)
        self.ring = deque(maxlen=capacity)

    # -- model views

    def holders(self) -> dict:
        out = {}
        for b in self.handles:
            out.setdefault(b.id, Counter())[("process", PID, None, None)] += 1
        for r in self.readers:
            for i in r.items:
                out.setdefault(i, Counter())[r.key()] += 1
        return out

    def live_pools(self) -> Counter:
        return Counter(self.pool_of[i] for i in self.holders())

    def stale(self) -> list[int]:
        return sorted(self.known - set(self.holders()))

    def took(self, buffer, order: list[str]) -> None:
        """A new allocation: from an allowed pool, a never-seen id, tagged."""
        assert buffer.pool in allowed_outcomes(order, self.live_pools(), Counter())
        assert buffer.id not in self.known  # a reused slot comes back with a new generation
        assert buffer.ref_count == 1
        tag(buffer)
        self.known.add(buffer.id)
        self.pool_of[buffer.id] = buffer.pool
        self.handles.append(buffer)

    # -- buffers

    @rule(size=st.integers(8, 4096))
    def allocate(self, size):
        order = candidates(size)
        try:
            buffer = self.m.allocate(size, timeout=0)
        except PoolExhaustedError:
            assert None in allowed_outcomes(order, self.live_pools(), Counter())
            tell("allocate: every fitting pool full", count=True)
            return
        assert buffer.size == size
        if buffer.pool != order[0]:
            tell("allocate: the smallest fitting pool was full, a larger one served", count=True)
        self.took(buffer, order)

    @rule(pool=pools)
    def allocate_from_pool(self, pool):
        self._allocate_from(pool)

    def _allocate_from(self, pool) -> bool:
        """True if it got a block; a full pool must be one the model says may be full."""
        try:
            buffer = self.m.allocate_from_pool(pool, timeout=0)
        except PoolExhaustedError:
            assert None in allowed_outcomes([pool], self.live_pools(), Counter())
            return False
        self.took(buffer, [pool])
        return True

    @rule(pool=pools)
    def push_a_new_buffer(self, pool):
        """Allocate and push at once (queues see more traffic than single steps would give)."""
        if self._allocate_from(pool):
            self.push(len(self.handles) - 1)

    @precondition(lambda self: self.handles)
    @rule(pick=picks)
    def share(self, pick):
        b = self.handles[pick % len(self.handles)]
        other = b.share()
        assert other.id == b.id and other is not b
        self.handles.append(other)

    @precondition(lambda self: self.holders())
    @rule(pick=picks)
    def get_by_id(self, pick):  # also ids only the queue still holds
        ids = sorted(self.holders())
        b = self.m.get(ids[pick % len(ids)])
        assert b.id == ids[pick % len(ids)] and b.pool == self.pool_of[b.id]
        self.handles.append(b)

    @precondition(lambda self: self.handles)
    @rule(pick=picks)
    def release(self, pick):
        b = self.handles.pop(pick % len(self.handles))
        b.release()
        assert b.released
        self.released.append(b)

    @precondition(lambda self: self.released)
    @rule(pick=picks, use=st.sampled_from(["release", "share", "ref_count", "numpy", "push"]))
    def use_a_released_handle(self, pick, use):
        b = self.released[pick % len(self.released)]
        with pytest.raises(BufferReleasedError):
            if use == "push":
                self.q.push(b, timeout=0)
            elif use == "ref_count":
                b.ref_count  # noqa: B018 - the property raises
            else:
                getattr(b, use)()

    @precondition(lambda self: self.stale())
    @rule(pick=picks)
    def get_a_stale_id(self, pick):
        stale = self.stale()
        with pytest.raises(InvalidBufferError):
            self.m.get(stale[pick % len(stale)])

    @rule(kind=st.sampled_from(["generation 0", "slot out of range", "wrong generation", "negative",
                                "over 64 bits"]),
          slot=st.integers(0, 31), generation=st.integers(1, 2**32 - 1))
    def get_a_forged_id(self, kind, slot, generation):
        forged = {"generation 0": slot, "slot out of range": generation << 32 | (2**32 - 1 - slot),
                  "wrong generation": generation << 32 | slot, "negative": -1 - slot,
                  "over 64 bits": 2**64 + slot}[kind]
        if forged in self.holders():
            return  # a real id: not forged
        with pytest.raises(InvalidBufferError):
            self.m.get(forged)

    # -- the queue

    @precondition(lambda self: self.handles)
    @rule(pick=picks)
    def push(self, pick):
        b = self.handles[pick % len(self.handles)]
        drops = sum(r.drops for r in self.readers)
        expected = model_push(self.readers, self.q.capacity, b.id)
        if not expected:
            tell("push: refused, a blocking reader is full", count=True)
        elif sum(r.drops for r in self.readers) > drops:
            tell("push: a full drop_oldest reader dropped its oldest item", count=True)
        else:
            tell(f"push: to {len(self.readers)} reader(s)", count=True)
        assert self.q.try_push(b) is expected
        assert b.released is expected  # pushed: the reference moved into the queue
        if expected:
            self.handles.remove(b)
            self.released.append(b)
            if self.readers:
                self.ring.append(b.id)

    @precondition(lambda self: len(self.readers) < 2)
    @rule(policy=st.sampled_from(["block", "drop_oldest"]), start=st.sampled_from(["latest", "oldest"]))
    def attach(self, policy, start):
        items = []
        if start == "oldest":  # everything still alive in the ring, newest backwards
            live = set(self.holders())
            for i in reversed(self.ring):
                if i not in live:
                    break
                items.insert(0, i)
            tell(f"attach at the oldest: {'some' if items else 'no'} items still alive", count=True)
        real = self.q.reader(policy=policy, start=start)
        assert real.index not in [r.index for r in self.readers]
        self.readers.append(Reader(real, "q", PID, real.index, policy, items))

    @precondition(lambda self: self.readers)
    @rule(pick=picks)
    def pop(self, pick):
        r = self.readers[pick % len(self.readers)]
        b = r.real.try_pop()
        if not r.items:
            assert b is None
            return
        assert b is not None and b.id == r.items.popleft()
        self.handles.append(b)

    @precondition(lambda self: self.readers)
    @rule(pick=picks)
    def peek(self, pick):
        r = self.readers[pick % len(self.readers)]
        b = r.real.peek()
        if not r.items:
            assert b is None
            return
        assert b is not None and b.id == r.items[0]
        self.handles.append(b)

    @precondition(lambda self: self.readers)
    @rule(pick=picks)
    def detach(self, pick):
        r = self.readers.pop(pick % len(self.readers))
        assert r.real.detach() == len(r.items)  # its unread items are released
        self.detached.append(r.real)

    @precondition(lambda self: self.detached)
    @rule(pick=picks)
    def pop_a_detached_reader(self, pick):
        with pytest.raises(QueueClosedError):
            self.detached[pick % len(self.detached)].try_pop()

    # -- invariants

    @invariant()
    def domain_matches_the_model(self):
        check_domain(self.m, self.domain, self.holders(), Counter(), self.pool_of, Counter())
        for b in self.handles:
            assert b.ref_count == sum(self.holders()[b.id].values())
            assert tagged(b), f"block of {b.id:#x} was overwritten"
        if self.q is not None:
            check_queue(self.q, self.readers)

    def teardown(self):
        clean = False
        try:
            if not a_step_failed():
                for b in self.handles:
                    b.release()
                for r in self.readers:
                    assert r.real.detach() == len(r.items)
                self.handles, self.readers = [], []
                report = check_domain(self.m, self.domain, {}, Counter(), self.pool_of, Counter())
                assert report.ok and report.buffers == [], report.format()
                if self.q is not None:
                    self.q.remove()
                clean = True
        finally:
            close_domain(self.m, self.domain, clean)


TestBuffersAndQueues = BuffersAndQueues.TestCase
TestBuffersAndQueues.settings = settings(max_examples=200, stateful_step_count=40,
                                         suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- machine 2: two processes

WORKER = r"""
import json, os, sys
from multiqueue import ShmManager
from multiqueue.errors import MultiQueueError
from multiqueue.stream import PortQueue

m = ShmManager(sys.argv[1], name="worker", reaper_interval=None, create=False)
down = PortQueue(m, "down", create=False)  # the test process pushes, this worker may read
up = PortQueue(m, "up", create=False)  # this worker pushes, the test process reads
held = {}  # id -> handles (one reference each)
reader = None
print(json.dumps({"pid": os.getpid()}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op, reply = cmd["op"], {}
    try:
        if op == "get":
            b = m.get(cmd["id"])
            held.setdefault(b.id, []).append(b)
        elif op in ("alloc", "send"):
            b = m.allocate_from_pool(cmd["pool"], timeout=0)
            b.memoryview()[:8] = b.id.to_bytes(8, "little")
            reply["id"] = b.id
            reply["pushed"] = op == "send" and up.try_push(b)
            if not reply["pushed"]:
                held.setdefault(b.id, []).append(b)
        elif op == "release":
            handles = held[cmd["id"]]
            handles.pop().release()
            if not handles:
                del held[cmd["id"]]
        elif op == "join":
            reader = down.reader(policy=cmd["policy"])
            reply["index"] = reader.index
        elif op == "pop":
            b = reader.try_pop()
            reply["id"] = None if b is None else b.id
            if b is not None:
                reply["tagged"] = bytes(b.memoryview()[:8]) == b.id.to_bytes(8, "little")
                held.setdefault(b.id, []).append(b)
        elif op == "detach":
            reply["released"] = reader.detach()
            reader = None
    except MultiQueueError as e:
        reply["error"] = type(e).__name__
    print(json.dumps(reply), flush=True)
m.shutdown()
"""

CAPACITY = 2  # of both queues
MAX_KILLS = 3  # per example: starting a worker is the slow part
kills = st.sampled_from(["no"] * 4 + ["idle", "in"])  # a worker command may kill the worker instead
LEAKY = {"get", "release", "pop", "detach", "send"}  # a kill inside may leak one reference
BLOCK_WINDOWS = {"alloc", "send", "release", "detach"}  # ... or leave a pool's counter one high


class Worker:
    """A second interpreter attached by domain name, one JSON line per command and answer."""

    def __init__(self, domain: str):
        self.proc = spawn_python(WORKER, domain)
        self.pid = self.read()["pid"]

    def send(self, **cmd) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], REPLY_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise AssertionError(f"the worker did not answer: {self.proc.stderr.read()}")
        return json.loads(line)

    def ask(self, **cmd) -> dict:
        self.send(**cmd)
        return self.read()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL  # waited for: not a zombie any more
        self.close()

    def stop(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=REPLY_TIMEOUT) == 0, self.proc.stderr.read()
        self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                stream.close()
            except BrokenPipeError:  # stdin with a command the killed worker never read
                pass


class TwoProcesses(RuleBasedStateMachine):
    """References held by two real processes, one of which is SIGKILLed at random moments.

    No rule has a precondition: how a kill in the middle of a command ended (a send done or not,
    a leak) changes the model, and hypothesis needs the choice of rules to replay the same; a
    rule that does not apply in the current state returns at once."""

    def __init__(self):
        super().__init__()
        self.domain, self.m = new_domain()
        self.down = PortQueue(self.m, "down", capacity=CAPACITY)
        self.up = PortQueue(self.m, "up", capacity=CAPACITY)
        self.worker = None
        self.worker_reads = None
        self.kills = 0
        self.max_kills = MAX_KILLS
        self.handles = []  # this process's live handles
        self.w_held = Counter()  # id -> references the worker holds
        self.w_reader: Reader | None = None  # the worker's reader of "down"
        self.down_reader: Reader | None = None  # this process's reader of "down" (drop_oldest)
        real = self.up.reader(policy="block")
        self.up_reader = Reader(real, "up", PID, real.index, "block")  # what the worker sends
        self.pool_of: dict[int, str] = {}
        self.known: set[int] = set()
        self.leaked = Counter()  # references a kill inside an operation left to nobody
        self.surplus = Counter()  # pool -> blocks a kill inside an operation left counted

    @initialize(read_down=st.booleans(), worker_reads=st.sampled_from([None, "block", "drop_oldest"]))
    def start(self, read_down, worker_reads):
        """This process may read "down" too; each worker may start by joining it (as a stage would)."""
        if read_down:
            real = self.down.reader(policy="drop_oldest")
            self.down_reader = Reader(real, "down", PID, real.index, "drop_oldest")
        self.worker_reads = worker_reads
        self.start_worker()

    def start_worker(self) -> None:
        self.worker = Worker(self.domain)
        if self.worker_reads is not None:
            self.worker_join(self.worker_reads, "no")

    # -- model views

    def down_readers(self) -> list[Reader]:
        return [r for r in (self.w_reader, self.down_reader) if r is not None]

    def holders(self) -> dict:
        out = {}
        for b in self.handles:
            out.setdefault(b.id, Counter())[("process", PID, None, None)] += 1
        for i, n in self.w_held.items():
            out.setdefault(i, Counter())[("process", self.worker.pid, None, None)] += n
        for r in [*self.down_readers(), self.up_reader]:
            for i in r.items:
                out.setdefault(i, Counter())[r.key()] += 1
        return out

    def live(self) -> set[int]:
        return set(self.holders()) | {i for i, n in self.leaked.items() if n}

    def live_pools(self) -> Counter:
        return Counter(self.pool_of[i] for i in self.live())

    def stale(self) -> list[int]:
        return sorted(self.known - self.live())

    def learn(self, buffer_id: int, pool: str) -> None:
        assert buffer_id not in self.known  # a new allocation has a new id
        self.known.add(buffer_id)
        self.pool_of[buffer_id] = pool

    # -- this process

    @rule(pool=pools)
    def allocate(self, pool):
        self.take(pool)

    def take(self, pool: str) -> bool:
        allowed = allowed_outcomes([pool], self.live_pools(), self.surplus)
        try:
            b = self.m.allocate_from_pool(pool, timeout=0)
        except PoolExhaustedError:
            assert None in allowed
            return False
        assert pool in allowed
        self.learn(b.id, pool)
        tag(b)
        self.handles.append(b)
        return True

    @rule(pick=picks)
    def release(self, pick):
        if not self.handles:
            return
        self.handles.pop(pick % len(self.handles)).release()

    @rule(pick=picks)
    def get_by_id(self, pick):  # ids the worker or a queue holds too
        ids = sorted(self.holders())
        if ids:
            self.handles.append(self.m.get(ids[pick % len(ids)]))

    @rule(pick=picks)
    def push_down(self, pick):
        if not self.handles:
            return
        b = self.handles[pick % len(self.handles)]
        expected = model_push(self.down_readers(), CAPACITY, b.id)
        assert self.down.try_push(b) is expected  # False: the worker's blocking reader is full
        if expected:
            self.handles.remove(b)

    @rule(pool=pools)
    def push_down_a_new_buffer(self, pool):
        if self.take(pool):
            self.push_down(len(self.handles) - 1)

    @rule(queue=st.sampled_from(["down", "up"]))
    def pop_here(self, queue):
        r = self.down_reader if queue == "down" else self.up_reader
        if r is not None:
            self.pop(r)

    def pop(self, r: Reader) -> None:
        b = r.real.try_pop()
        if not r.items:
            assert b is None
            return
        assert b is not None and b.id == r.items.popleft()
        self.handles.append(b)

    # -- the worker (each command may instead kill it: idle, or right after sending the command)

    def ask(self, kill: str, **cmd) -> dict | None:
        """The worker's answer to ``cmd``; or, with ``kill`` (and kills left for this example),
        SIGKILL it while it waits ("idle") or right after sending ``cmd`` ("in": it may die before,
        inside or after it), reap it, start a new one, and None."""
        if kill == "no" or self.kills >= self.max_kills:
            return self.worker.ask(**cmd)
        self.kill_worker(cmd if kill == "in" else None, blocked_push=None)
        return None

    @rule(pick=picks, kill=kills)
    def worker_get(self, pick, kill):
        ids = sorted(self.holders())
        if not ids:
            return
        i = ids[pick % len(ids)]
        reply = self.ask(kill, op="get", id=i)
        if reply is not None:
            assert reply == {}
            self.w_held[i] += 1

    @rule(pick=picks, kill=kills)
    def worker_get_a_stale_id(self, pick, kill):
        stale = self.stale()
        if not stale:
            return
        reply = self.ask(kill, op="get", id=stale[pick % len(stale)])
        assert reply in (None, {"error": "InvalidBufferError"})

    @rule(pool=pools, send=st.booleans(), kill=kills)
    def worker_allocate(self, pool, send, kill):
        """Allocate a block in the worker; with ``send`` push it to this process over "up"."""
        allowed = allowed_outcomes([pool], self.live_pools(), self.surplus)
        reply = self.ask(kill, op="send" if send else "alloc", pool=pool)
        if reply is None:
            return
        if reply.get("error") == "PoolExhaustedError":
            assert None in allowed
            return
        assert pool in allowed, reply
        self.learn(reply["id"], pool)
        pushed = send and model_push([self.up_reader], CAPACITY, reply["id"])
        assert reply["pushed"] is pushed
        if not pushed:
            self.w_held[reply["id"]] += 1

    @rule(pick=picks, kill=kills)
    def worker_release(self, pick, kill):
        if not self.w_held:
            return
        ids = sorted(self.w_held)
        i = ids[pick % len(ids)]
        reply = self.ask(kill, op="release", id=i)
        if reply is not None:
            assert reply == {}
            self.w_held[i] -= 1
            self.w_held = +self.w_held

    @rule(policy=st.sampled_from(["block", "drop_oldest"]), kill=kills)
    def worker_join(self, policy, kill):
        if self.w_reader is not None:
            return
        reply = self.ask(kill, op="join", policy=policy)
        if reply is not None:
            self.w_reader = Reader(None, "down", self.worker.pid, reply["index"], policy)

    @rule(action=st.sampled_from(["pop", "pop", "detach"]), kill=kills)
    def worker_read(self, action, kill):
        if self.w_reader is None:
            return
        reply = self.ask(kill, op=action)
        if reply is None:
            return
        if action == "detach":
            assert reply == {"released": len(self.w_reader.items)}
            self.w_reader = None
        elif not self.w_reader.items:
            assert reply == {"id": None}
        else:
            assert reply == {"id": self.w_reader.items.popleft(), "tagged": True}
            self.w_held[reply["id"]] += 1

    # -- the kill

    @rule(choice=st.sampled_from([None, "pop", "detach"]), pick=picks)
    def kill_worker_whose_reader_blocks_the_producer(self, choice, pick):
        """The worker's full blocking reader holds up the producer: SIGKILL it (idle, or popping
        or detaching), and a push waiting for room must go through once the reader is seen dead."""
        if self.kills >= self.max_kills:
            return
        if self.w_reader is None:
            self.worker_join("block", "no")
        w = self.w_reader
        while w.policy == "block" and len(w.items) < CAPACITY and (self.take("a") or self.take("b")):
            self.push_down(len(self.handles) - 1)  # fill its reader
        if w.policy != "block" or len(w.items) < CAPACITY or not self.handles:
            return  # a drop_oldest reader never blocks, or the pools are full
        self.kill_worker(choice and {"op": choice}, blocked_push=pick)

    def kill_worker(self, cmd: dict | None, blocked_push: int | None) -> None:
        tell(f"kill: {cmd['op'] if cmd else 'idle'}"
             f"{', then a push blocked by its reader' if blocked_push is not None else ''}", count=True)
        tell(f"kill worker {self.worker.pid} after {cmd}")
        w = self.w_reader
        if cmd is not None:
            self.worker.send(**cmd)  # and do not wait for the answer: it may die in the middle
        self.worker.kill()
        self.kills += 1
        dead, self.worker = self.worker.pid, None
        old_reader_items = list(w.items) if w is not None else []
        self.w_held, self.w_reader = Counter(), None  # everything it held is released...

        if blocked_push is not None:  # ... and its full reader no longer blocks the producer
            b = self.handles.pop(blocked_push % len(self.handles))
            self.down.push(b, timeout=REPLY_TIMEOUT)  # notices the dead reader by itself
            assert model_push(self.down_readers(), CAPACITY, b.id)
        report = self.m.reap()
        assert [pid for pid, _name in report.processes] == [dead]
        assert dead not in [r.pid for r in self.down.stats().readers]
        self.settle_in_flight(cmd, old_reader_items)
        self.start_worker()

    def settle_in_flight(self, cmd: dict | None, old_reader_items: list[int]) -> None:
        """Accept the outcomes a command cut by the kill may have had, and nothing else."""
        report = diagnose(self.domain)
        if cmd is not None and cmd["op"] == "send":  # done (this process reads it) or not
            lag = [r.lag for r in self.up.stats().readers if r.index == self.up_reader.index]
            if lag == [len(self.up_reader.items) + 1]:
                key = ("queue", PID, "up", self.up_reader.index)
                (new,) = [b for b in report.buffers if b.id not in self.known
                          and any((h.kind, h.pid, h.queue, h.reader) == key for h in b.holders)]
                self.learn(new.id, new.pool)
                self.up_reader.items.append(new.id)
                tell("kill: a send was done", count=True)
            else:
                assert lag == [len(self.up_reader.items)], lag
        expected = Counter()
        for i, held in self.holders().items():
            expected[i] = sum(held.values())
        expected.update(self.leaked)
        extra = [(b.id, b.ref_count - expected[b.id]) for b in report.buffers
                 if b.ref_count != expected[b.id]]
        assert not [i for i, n in expected.items() if n and i not in {b.id for b in report.buffers}]
        if extra:  # a kill inside get, release, pop, detach or a push: one reference to nobody
            assert cmd is not None and cmd["op"] in LEAKY and len(extra) == 1 and extra[0][1] == 1, (
                cmd, extra, report.format())
            leak_id = extra[0][0]
            ok = {"get": [cmd.get("id")], "release": [cmd.get("id")], "pop": old_reader_items[:1],
                  "detach": old_reader_items}.get(cmd["op"])
            (b,) = [b for b in report.buffers if b.id == leak_id]
            if cmd["op"] == "send":
                assert leak_id not in self.known and b.pool == cmd["pool"], report.format()
                self.learn(leak_id, b.pool)
            else:
                assert leak_id in ok, (cmd, report.format())
            assert any(f.kind == "leak" and f.buffers == [leak_id] and f.references == 1
                       for f in report.findings), report.format()
            self.leaked[leak_id] += 1
            self.noted(f"a kill inside {cmd} leaked a reference of {leak_id:#x} (doctor reports it)")
        live = self.live_pools()
        for name, (_size, count) in POOLS.items():
            used = self.m.get_pool(name).stats().blocks_used
            model = min(live[name] + self.surplus[name], count)
            if used == model + 1 and cmd is not None and cmd["op"] in BLOCK_WINDOWS:
                pools = {"alloc": [cmd.get("pool")], "send": [cmd.get("pool")],
                         "release": [self.pool_of.get(cmd.get("id"))],
                         "detach": [self.pool_of[i] for i in old_reader_items]}[cmd["op"]]
                assert name in pools, (cmd, name)
                self.surplus[name] += 1
                self.noted(f"a kill inside {cmd} left pool {name!r} counting one block too many")
            else:
                assert used == model, (name, used, model, cmd)

    @staticmethod
    def noted(message: str) -> None:
        NOTED.append(message)
        warnings.warn(message, stacklevel=2)

    # -- invariants

    @invariant()
    def domain_matches_the_model(self):
        check_domain(self.m, self.domain, self.holders(), self.leaked, self.pool_of, self.surplus)
        holders = self.holders()
        for b in self.handles:
            assert b.ref_count == sum(holders[b.id].values()) + self.leaked[b.id]
            assert tagged(b), f"block of {b.id:#x} was overwritten"
        check_queue(self.down, self.down_readers())
        check_queue(self.up, [self.up_reader])

    def teardown(self):
        clean = False
        try:
            if not a_step_failed():
                if self.worker is not None:
                    self.worker.stop()  # its shutdown releases what it held
                    self.w_held, self.w_reader = Counter(), None
                for b in self.handles:
                    b.release()
                for r in (self.down_reader, self.up_reader):
                    if r is not None:
                        assert r.real.detach() == len(r.items)
                self.handles, self.down_reader = [], None
                self.up_reader.items.clear()
                check_domain(self.m, self.domain, {}, self.leaked, self.pool_of, self.surplus)
                self.down.remove()
                self.up.remove()
                clean = True
        finally:
            if self.worker is not None:
                self.worker.close()
            close_domain(self.m, self.domain, clean)


TestTwoProcesses = TwoProcesses.TestCase
# No shrinking: a kill may end either way, so a shrunk example need not fail again, and each
# try costs worker processes; the failing example is printed as it ran (with its notes).
TestTwoProcesses.settings = settings(max_examples=30, stateful_step_count=30,
                                     phases=[Phase.explicit, Phase.reuse, Phase.generate],
                                     suppress_health_check=[HealthCheck.too_slow])


def test_a_kill_inside_every_kind_of_worker_command_is_reaped_to_the_model():
    """TwoProcesses driven by hand: the worker SIGKILLed right after each kind of command (and
    idle with its full blocking reader holding up a push), whatever hypothesis happens to draw."""
    machine = TwoProcesses()
    machine.max_kills = 100
    try:
        machine.start(read_down=True, worker_reads="block")
        for op in ["get", "alloc", "send", "release", "pop", "detach", "join", None]:
            while machine.handles:  # room in the pools
                machine.release(0)
            machine.worker_read("detach", "no")
            if op != "join":
                machine.worker_join("block", "no")
                machine.push_down_a_new_buffer("a")  # an item for its reader
            machine.allocate("a")
            machine.worker_get(0, "no")  # the worker holds this process's buffer...
            machine.worker_allocate("b", False, "no")  # ... and one of its own
            machine.domain_matches_the_model()
            kills = machine.kills
            cmd = {"get": {"op": "get", "id": machine.handles[0].id}, "alloc": {"op": "alloc", "pool": "a"},
                   "send": {"op": "send", "pool": "b"}, "join": {"op": "join", "policy": "block"},
                   "release": {"op": "release", "id": min(machine.w_held)}}.get(op, {"op": op})
            if op is None:
                machine.kill_worker_whose_reader_blocks_the_producer(None, 0)
            else:
                machine.kill_worker(cmd, blocked_push=None)
            assert machine.kills == kills + 1 and not machine.w_held
            machine.domain_matches_the_model()
            machine.pop_here("up")
    finally:
        machine.teardown()


# ---------------------------------------------------------------------- a kill inside push's lock

PUSHER = r"""
import sys
from multiqueue import ShmManager
from multiqueue.stream import PortQueue

m = ShmManager(sys.argv[1], name="pusher", reaper_interval=None, create=False)
q = PortQueue(m, "locked", create=False)
print("ready", flush=True)
while True:
    q.push(m.allocate(64))
"""

REUSER = r"""
import sys
from multiqueue import ShmManager
from multiqueue.stream import PortQueue

m = ShmManager(sys.argv[1], name="reuser", reaper_interval=None, create=False)
print([p["slot"] for p in m.processes() if p["self"]][0], flush=True)
if sys.argv[2] == "push":
    q = PortQueue(m, "locked", create=False, multi_producer=True)
    try:
        q.push(m.allocate(64), timeout=1.0)
        print("pushed", flush=True)
    except TimeoutError:
        print("timed out", flush=True)
sys.stdin.readline()
m.shutdown()
"""


@pytest.mark.parametrize("pusher_after", [
    "the process reusing the slot",
    "another process",
])
def test_queue_lock_of_a_dead_pusher_is_taken_back_after_its_slot_is_reused(domain, pusher_after):
    m = ShmManager(domain, ShmConfig(pools=[PoolConfig("p", 64, 32)], max_buffers=32),
                   reaper_interval=None)
    q = PortQueue(m, "locked", capacity=4, multi_producer=True)
    reader = q.reader(policy="drop_oldest")  # the pusher never waits for room
    pusher = spawn_python(PUSHER, domain)
    reuser = None
    try:
        assert pusher.stdout.readline().strip() == "ready", pusher.stderr.read()
        (slot,) = [p["slot"] for p in m.processes() if p["pid"] == pusher.pid]
        # stop the pusher at random moments until it is stopped holding the queue lock, then kill it
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "never caught the pusher inside the queue lock"
            os.kill(pusher.pid, signal.SIGSTOP)
            os.waitpid(pusher.pid, os.WUNTRACED)
            if q._header.lock & LOCK_SLOT_MASK == slot + 1:  # the lock word: incarnation, slot + 1
                break
            os.kill(pusher.pid, signal.SIGCONT)
        pusher.kill()
        assert pusher.wait(timeout=30) == -signal.SIGKILL
        assert [pid for pid, _ in m.reap().processes] == [pusher.pid]
        # a new process registers in the dead pusher's slot
        pushes = pusher_after == "the process reusing the slot"
        reuser = spawn_python(REUSER, domain, "push" if pushes else "idle")
        assert reuser.stdout.readline().strip() == str(slot), reuser.stderr.read()
        if pushes:
            ready, _, _ = select.select([reuser.stdout], [], [], 30)  # generous: a 1 s timeout
            assert ready, "the reusing process's push(timeout=1.0) did not return"
            assert reuser.stdout.readline().strip() == "pushed"
        else:
            m_buffer = m.allocate(64)
            q.push(m_buffer, timeout=1.0)  # the lock's holder died: taken back, pushed
        assert reader.lag >= 1
    finally:
        for p in (pusher, reuser):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait(timeout=30)
                for stream in (p.stdin, p.stdout, p.stderr):
                    stream.close()
        m.reap()  # the slot named by the lock is free again: the detach below can take the lock
        reader.detach()
        q.remove()
        m.shutdown()
