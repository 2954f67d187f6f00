"""Port queues across separate interpreters that attach to the domain by name."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.stream import PortQueue

ROLES = str(Path(__file__).with_name("queue_roles.py"))


class Role:
    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, ROLES, *map(str, args)], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)

    def line(self) -> list[str]:
        text = self.proc.stdout.readline()
        if not text:
            raise AssertionError(f"role exited: {self.proc.stderr.read()}")
        return text.split()

    def expect(self, word: str) -> list[str]:
        words = self.line()
        assert words[0] == word, words
        return words[1:]

    def send(self, text: str = "go") -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        words = self.expect("received")
        return {"received": int(words[0]), "bad": int(words[2]), "drops": int(words[4]),
                "last": int(words[6]), "outcome": words[7]}

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=60)
        for s in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            s.close()


@pytest.fixture
def roles():
    started = []

    def start(*args):
        started.append(Role(*args))
        return started[-1]

    yield start
    for role in started:
        role.finish()


@pytest.fixture
def owner(domain):
    """The test process owns the domain and the queue, like a runtime would."""
    config = ShmConfig(pools=[PoolConfig("items", 256, 512)], max_buffers=1024)
    with ShmManager(domain, config, reaper_interval=None) as m:
        yield m


def test_one_producer_three_consumers_every_item_in_order(domain, owner, roles):
    count = 100_000
    PortQueue(owner, "q", capacity=256)
    consumers = [roles("consumer", domain, "q") for _ in range(3)]
    for c in consumers:
        c.expect("ready")
    producer = roles("producer", domain, "q", count)
    producer.expect("ready")
    assert producer.expect("pushed")[0] == str(count)
    producer.expect("done")
    for c in consumers:
        assert c.result() == {"received": count, "bad": 0, "drops": 0, "last": count - 1,
                              "outcome": "closed"}
    stats = owner.get_stats()
    assert stats.total_allocated == 0
    assert stats.allocation_count == stats.deallocation_count == count


def test_slow_drop_oldest_consumer_delays_neither_producer_nor_fast_consumer(domain, owner, roles):
    count = 3000
    PortQueue(owner, "q", capacity=64)
    fast = roles("consumer", domain, "q", "--policy", "block")
    slow = roles("consumer", domain, "q", "--policy", "drop_oldest", "--delay", "0.01")
    fast.expect("ready")
    slow.expect("ready")
    producer = roles("producer", domain, "q", count, "--hold")
    producer.expect("ready")
    producer.expect("pushed")
    # Every item is out while the slow reader (10 ms per item) has seen only a few of
    # them: had it held the producer back, pushing would have taken 30 s.
    stats = PortQueue(owner, "q").stats()
    slow_reader = next(r for r in stats.readers if r.policy == "drop_oldest")
    assert stats.pushed == count
    assert slow_reader.popped < count // 4
    assert slow_reader.drops > 0
    producer.send()
    producer.expect("done")
    assert fast.result() == {"received": count, "bad": 0, "drops": 0, "last": count - 1,
                             "outcome": "closed"}
    slow_result = slow.result()
    assert slow_result["bad"] == 0
    assert slow_result["received"] + slow_result["drops"] == count
    assert slow_result["last"] == count - 1  # drop_oldest keeps the newest
    assert owner.get_stats().total_allocated == 0


def test_back_pressure_times_out_and_loses_nothing(domain, owner, roles):
    q = PortQueue(owner, "q", capacity=8)
    consumer = roles("consumer", domain, "q", "--stop-after", "0")
    consumer.expect("ready")
    consumer.expect("stopped")
    for seq in range(8):
        b = owner.allocate(256)
        _fill(b, seq)
        q.push(b)
    extra = owner.allocate(256)
    _fill(extra, 8)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        q.push(extra, timeout=0.1)
    waited = time.monotonic() - t0
    assert 0.1 <= waited < 2.0  # about 0.1 s; generous above for a loaded CI machine
    assert not q.try_push(extra)
    assert extra.ref_count == 1  # still ours after the failed pushes
    assert q.stats().producer_blocked_s >= 0.1
    consumer.send()  # resume reading
    q.push(extra, timeout=10)
    q.close()
    assert consumer.result() == {"received": 9, "bad": 0, "drops": 0, "last": 8, "outcome": "closed"}
    assert owner.get_stats().total_allocated == 0


def _fill(buffer, seq):
    from queue_roles import payload

    buffer.numpy("uint64")[:] = payload(seq)


def test_sigkilled_consumer_does_not_stall_the_producer(domain, owner, roles):
    count = 20_000
    PortQueue(owner, "q", capacity=64)
    survivor = roles("consumer", domain, "q")
    victim = roles("consumer", domain, "q", "--stop-after", "1000")
    survivor.expect("ready")
    victim.expect("ready")
    producer = roles("producer", domain, "q", count)
    producer.expect("ready")
    victim.expect("stopped")  # mid-stream, holding unread items: the producer is blocked on it
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=30)
    words = producer.expect("pushed")
    assert words[0] == str(count)
    assert float(words[2]) < 1.0  # the longest single push: the producer went on within 1 s
    producer.expect("done")
    assert survivor.result()["received"] == count
    owner.reap()  # the dead consumer's own held buffers (if the producer did not reap it first)
    assert victim.proc.pid not in [p["pid"] for p in owner.processes()]
    assert owner.get_stats().total_allocated == 0


def test_sigkilled_producer_lets_consumers_drain_then_report_abandoned(domain, owner, roles):
    PortQueue(owner, "q", capacity=1024)
    consumers = [roles("consumer", domain, "q") for _ in range(2)]
    for c in consumers:
        c.expect("ready")
    producer = roles("producer", domain, "q", 500, "--hold")
    producer.expect("ready")
    producer.expect("pushed")
    os.kill(producer.proc.pid, signal.SIGKILL)
    producer.proc.wait(timeout=30)
    for c in consumers:
        assert c.result() == {"received": 500, "bad": 0, "drops": 0, "last": 499,
                              "outcome": "abandoned"}
    owner.reap()
    assert owner.get_stats().total_allocated == 0
