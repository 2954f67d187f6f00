"""The message bus: publish/subscribe, request/reply and inboxes, across separate interpreters.

The cross-process tests run tests/bus_roles.py in other interpreters that attach to the
domain by name (no fork); every wait is on a role's stdout line or on an event.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import ROLE_WAIT, RoleProcess, run_python
from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.control import MAX_MESSAGE, Bus, Message
from multiqueue.control.bus import BUS_POOL
from multiqueue.errors import MessageTooLargeError, PoolExhaustedError, SegmentError
from multiqueue.shm.segment import domain_segments
from multiqueue.stream import PortQueue

ROLES = str(Path(__file__).with_name("bus_roles.py"))
WAIT = ROLE_WAIT


class Role(RoleProcess):
    """A tests/control/bus_roles.py process."""

    def __init__(self, *args):
        super().__init__(str(args[0]), [sys.executable, ROLES, *map(str, args)])
        self.pid = None

    def ready(self) -> "Role":
        """Wait until the role is subscribed (or ready to publish)."""
        self.pid = self.expect("ready")["pid"]
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        self.proc.stdin.close()


@pytest.fixture
def owner(domain):
    """The test process owns the domain (default pools) and has a bus on it."""
    m = ShmManager(domain, reaper_interval=None)
    bus = Bus(m)
    yield m, bus
    bus.close()
    m.shutdown()


@pytest.fixture
def roles(domain, owner):
    """Start role processes (call .ready() on each); any still running at the end is killed,
    before the owner leaves."""
    started: list[Role] = []

    def start(role: str, *args) -> Role:
        started.append(Role(role, domain, *args))
        return started[-1]

    yield start
    for role in started:
        role.stop()


def bus_used(m: ShmManager) -> int:
    return m.get_pool(BUS_POOL).stats().blocks_used


def reply_topics(domain: str) -> list[str]:
    return [p for p in domain_segments("mq.", domain) if ".q.b-re-" in p]


# -- (a) ordering per publisher -------------------------------------------------------------


def test_two_publishers_two_subscribers_every_message_in_each_publishers_order(owner, roles):
    m, _ = owner
    count = 2000  # 2 x 2000 fit the topic's ring (4096): nothing can be dropped
    subscribers = [roles("subscriber", "events", "--capacity", 4096, "--until", count,
                         "--publishers", 2) for _ in range(2)]
    publishers = [roles("publisher", "events") for _ in range(2)]
    for role in subscribers + publishers:  # started together, subscribed before anyone publishes
        role.ready()
    for p in publishers:
        p.send(f"go {count}")  # both publish at once, interleaving on the topic
    for p in publishers:
        assert p.expect("published")["count"] == count
        p.send("quit")
    for s in subscribers:
        result = s.expect("received")
        assert result["problems"] == []
        assert result["counts"] == {str(p.pid): count for p in publishers}
        assert result["drops"] == 0
        s.send("quit")
    for role in publishers + subscribers:
        role.expect("done")
        assert role.finish() == 0
    assert bus_used(m) == 0


# -- (b) a stuck subscriber -----------------------------------------------------------------


def test_stuck_subscriber_blocks_neither_publisher_nor_live_subscriber(owner, roles):
    m, _ = owner
    count, capacity = 10_000, 1024
    publisher = roles("publisher", "events")
    live = roles("subscriber", "events", "--capacity", capacity, "--until", count, "--lossy").ready()
    stuck = roles("stuck", "events").ready()  # the topic's capacity: 1024
    publisher.ready().send(f"go {count}")  # 10,000 in one go, no waits
    result = publisher.expect("published")  # an "error" report fails here, with its message
    assert result["longest"] < 0.5  # no publish waited for the stuck subscriber (or for blocks)
    stuck.send("report")
    seen = stuck.expect("stuck")
    assert seen["drops"] + seen["pending"] == count
    assert seen["pending"] == capacity
    read = stuck.expect("read")
    assert read["ns"] == list(range(count - capacity, count))  # drop_oldest keeps the newest
    assert read["drops"] == count - capacity and read["pending"] == 0
    got = live.expect("received")  # in order; whatever it could not keep up with is counted
    assert got["problems"] == [] and got["counts"][str(publisher.pid)] + got["drops"] == count
    live.send("quit")
    publisher.send("quit")
    for role in (publisher, stuck, live):
        role.expect("done")
    assert bus_used(m) == 0


def test_a_topic_has_one_capacity_for_all_its_subscribers(owner):
    _, bus = owner
    small = bus.subscribe("cap", capacity=8)
    same = bus.subscribe("cap")  # None: the topic's
    with pytest.raises(ValueError, match="topic 'cap' exists with capacity 8"):
        bus.subscribe("cap", capacity=64)
    for n in range(100):
        bus.publish("cap", {"n": n})
    assert (small.pending, small.drops) == (8, 92) == (same.pending, same.drops)
    with pytest.raises(ValueError, match="power of two from 1 to 4096"):
        bus.subscribe("other", capacity=100_000)


# -- (c) payloads ---------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    b"\x00\x01binary\xff", b"", bytes(range(256)) * 3, {"block": "amp", "gain": 1.5, "on": True},
    [1, "two", None, [3.25]], "text é ü", "", 0, -7, 2**62, None, False, {}, [],
], ids=lambda p: type(p).__name__ + str(len(p) if isinstance(p, (bytes, str, list, dict)) else p))
def test_payload_round_trip(owner, payload):
    _, bus = owner
    with bus.subscribe("rt") as sub:
        t0 = time.monotonic_ns()
        bus.publish("rt", payload)
        t1 = time.monotonic_ns()
        msg = sub.get(timeout=5)
    assert isinstance(msg, Message)
    assert msg.data == payload and type(msg.data) is type(payload)
    assert msg.topic == "rt" and msg.sender_pid == os.getpid()
    assert t0 <= msg.timestamp <= t1  # stamped (monotonic) at publish


def test_bytes_like_payloads_arrive_as_bytes(owner):
    _, bus = owner
    with bus.subscribe("rt") as sub:
        bus.publish("rt", bytearray(b"abc"))
        bus.publish("rt", memoryview(b"defg")[1:])
        assert [sub.get(timeout=5).data for _ in range(2)] == [b"abc", b"efg"]


def test_message_of_exactly_max_message_bytes(owner):
    m, bus = owner
    raw = bytes(i % 253 for i in range(MAX_MESSAGE))
    text = "x" * (MAX_MESSAGE - 2)  # its JSON form, '"xxx..."', is MAX_MESSAGE bytes
    with bus.subscribe("big", capacity=8) as sub:
        bus.publish("big", raw)
        bus.publish("big", text)
        assert sub.get(timeout=5).data == raw
        assert sub.get(timeout=5).data == text
    assert bus_used(m) == 0


@pytest.mark.parametrize("payload", [b"x" * (MAX_MESSAGE + 1), "y" * (MAX_MESSAGE - 1),
                                     {"samples": list(range(2000))}], ids=["bytes", "json-str", "json-dict"])
def test_message_above_max_message_is_refused_with_a_helpful_error(owner, payload):
    m, bus = owner
    allocations = m.get_stats().allocation_count
    with bus.subscribe("big") as sub:
        with pytest.raises(MessageTooLargeError) as info:
            bus.publish("big", payload)
        assert sub.get(timeout=0) is None
    text = str(info.value)
    assert str(MAX_MESSAGE) in text and "exceeds" in text and "pool buffer" in text
    assert isinstance(info.value, ValueError)
    assert m.get_stats().allocation_count == allocations  # refused before taking a block


@pytest.mark.parametrize("payload", [object(), {1, 2}, {"f": print}, {(1, 2): "tuple key"}, 1j],
                         ids=["object", "set", "function", "tuple-key", "complex"])
def test_non_json_payload_raises_type_error(owner, payload):
    m, bus = owner
    allocations = m.get_stats().allocation_count
    with pytest.raises(TypeError, match="bytes or a JSON-able object"):
        bus.publish("t", payload)
    assert m.get_stats().allocation_count == allocations


def test_circular_payload_raises_type_error(owner):
    _, bus = owner
    loop: list = []
    loop.append(loop)
    with pytest.raises(TypeError, match="JSON-able"):
        bus.publish("t", loop)


# -- (d) topic names ------------------------------------------------------------------------


BAD_TOPICS = ["", "a" * 30, "has space", "a/b", "a.b", "é", "tab\t", None, 5, b"bytes"]


@pytest.mark.parametrize("topic", BAD_TOPICS, ids=repr)
def test_invalid_topic_names_raise_value_error(owner, topic):
    m, bus = owner
    for call in (lambda: bus.publish(topic, {"x": 1}), lambda: bus.subscribe(topic),
                 lambda: bus.subscribe(topic, callback=print), lambda: bus.request(topic, {}, timeout=0.1)):
        with pytest.raises(ValueError, match="invalid topic"):
            call()
    assert bus_used(m) == 0  # publish released the block it had taken


def test_topic_name_limits(owner):
    _, bus = owner
    longest = "T_-9" + "z" * 25  # 29 characters: the queue name "b-" + topic has 31
    with bus.subscribe(longest) as sub:
        bus.publish(longest, "ok")
        assert sub.get(timeout=5).data == "ok"
    with bus.inbox("n" * 26) as box:  # "to-" + 26 = 29
        bus.send("n" * 26, "ok")
        assert box.get(timeout=5).data == "ok"
    for call in (lambda: bus.inbox("n" * 27), lambda: bus.send("n" * 27, "x"), lambda: bus.send("a b", "x")):
        with pytest.raises(ValueError, match="invalid topic"):
            call()


# -- (e) callbacks --------------------------------------------------------------------------


def test_callback_runs_on_a_thread_and_survives_a_raising_callback(owner, capsys):
    _, bus = owner
    seen, done = [], threading.Event()

    def callback(msg):
        seen.append((msg.data, threading.current_thread().name))
        if msg.data == "boom":
            raise RuntimeError("callback failed on purpose")
        if msg.data == "last":
            done.set()

    sub = bus.subscribe("cb", callback=callback)
    for data in ("first", "boom", "after", "last"):
        bus.publish("cb", data)
    assert done.wait(WAIT)
    assert [d for d, _ in seen] == ["first", "boom", "after", "last"]
    assert {name for _, name in seen} == {"mq-bus-cb"}  # one thread of its own, not ours
    thread = next(t for t in threading.enumerate() if t.name == "mq-bus-cb")
    assert thread is not threading.current_thread()
    assert "callback failed on purpose" in capsys.readouterr().err  # reported, not swallowed
    sub.close()
    assert not thread.is_alive()
    bus.publish("cb", "after close")  # nobody listens any more
    assert len(seen) == 4


def test_subscriber_sees_only_messages_published_after_subscribing(owner):
    _, bus = owner
    bus.publish("late", "before")
    with bus.subscribe("late") as sub:
        bus.publish("late", "after")
        assert sub.get(timeout=5).data == "after"
        assert sub.get(timeout=0) is None


# -- (f) request/reply ----------------------------------------------------------------------


def test_request_reply_across_processes(owner, roles, domain):
    m, bus = owner
    server = roles("server", "svc").ready()
    answer = bus.request("svc", {"cmd": "add", "a": 2, "b": 40}, timeout=WAIT)
    assert answer.data == {"sum": 42, "pid": server.pid}
    assert answer.sender_pid == server.pid and answer.topic.startswith("re-")
    nested = {"list": [1, 2.5, "three", None], "map": {"deep": [True, False]}}
    assert bus.request("svc", {"cmd": "echo", "data": nested}, timeout=WAIT).data == nested
    big = bus.request("svc", {"cmd": "bytes", "size": MAX_MESSAGE}, timeout=WAIT).data
    assert big == bytes(i % 251 for i in range(MAX_MESSAGE))
    # a handler that raises answers nothing, and the server's subscription goes on
    with pytest.raises(TimeoutError):
        bus.request("svc", {"cmd": "boom"}, timeout=0.3)
    assert bus.request("svc", {"cmd": "add", "a": 1, "b": 1}, timeout=WAIT).data["sum"] == 2

    # requests from several threads at once: each gets its own answer
    errors, answers = [], {}

    def client(k):
        try:
            for i in range(10):
                answers[(k, i)] = bus.request("svc", {"cmd": "add", "a": k, "b": i}, timeout=WAIT).data["sum"]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert answers == {(k * 100, i): k * 100 + i for k in range(4) for i in range(10)}

    assert bus.request("svc", {"cmd": "stop"}, timeout=WAIT).data == {"stopped": True}
    server.expect("done")
    assert server.finish() == 0
    assert "boom: a failing request handler" in server.stderr
    assert len(reply_topics(domain)) == 1  # this Bus's own, kept for its next requests
    assert bus_used(m) == 0


def test_request_with_nobody_serving_times_out_and_leaves_no_reply_topic(owner, domain):
    m, bus = owner
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="'nobody'.*serving"):
        bus.request("nobody", {"cmd": "ping"}, timeout=0.2)
    assert 0.2 <= time.monotonic() - t0 < 5
    assert len(reply_topics(domain)) == 1  # this Bus's own reply topic
    bus.close()
    assert reply_topics(domain) == []  # gone with its Bus
    assert [p for p in domain_segments("mq.", domain) if ".q.b-nobody" in p]  # the request topic stays
    assert bus_used(m) == 0


@pytest.mark.parametrize("topic, data, error", [
    ("bad topic", {}, ValueError), ("svc", {"blob": "z" * MAX_MESSAGE}, MessageTooLargeError),
    ("svc", {"f": print}, TypeError)], ids=["bad-topic", "too-large", "not-json"])
def test_failed_request_leaves_no_reply_topic(owner, domain, topic, data, error):
    _, bus = owner
    with pytest.raises(error):
        bus.request(topic, data, timeout=0.1)
    assert len(reply_topics(domain)) <= 1  # at most this Bus's own, kept for its next requests


def test_reply_to_a_request_nobody_waits_for_is_a_no_op(owner):
    m, bus = owner
    gone = Message("svc", {"cmd": "x", "reply_to": "re-1-1"}, 1, 0, 0)
    bus.reply(gone, {"late": True})  # its reply topic does not exist (any more)
    bus.reply(Message("svc", {"cmd": "x"}, 1, 0, 0), "no reply_to")
    bus.reply(Message("svc", b"raw", 1, 0, 0), "bytes request")
    with pytest.raises(SegmentError):
        bus.publish("never-made", "x", keep=False)
    assert bus_used(m) == 0


# -- (g) point to point ---------------------------------------------------------------------


def test_send_and_inbox_across_processes(owner, roles):
    m, bus = owner
    mine, other = bus.inbox("tester"), bus.inbox("bystander")
    worker = roles("inbox", "worker").ready()
    count = 50  # below an inbox's 64 slots: all may be in flight at once
    for n in range(count):
        bus.send("worker", {"from": "tester", "n": n})
    acks = [mine.get(timeout=WAIT) for _ in range(count)]
    assert [a.data for a in acks] == [{"ack": n, "by": "worker"} for n in range(count)]
    assert {a.sender_pid for a in acks} == {worker.pid} and {a.topic for a in acks} == {"to-tester"}
    assert other.get(timeout=0) is None  # nothing for anyone else
    bus.send("worker", "stop")
    assert worker.expect("acked")["count"] == count
    worker.expect("done")
    assert mine.drops == 0
    assert bus_used(m) == 0


# -- (h) the bus pool is not a data pool ------------------------------------------------------


def test_allocate_by_size_never_picks_the_bus_pool(domain):
    config = ShmConfig(pools=[PoolConfig("tiny", 256, 4)], max_buffers=8200)
    with ShmManager(domain, config, reaper_interval=None) as m:
        # another process adds the bus (its pool) after we attached
        code = ("import sys\nfrom multiqueue import ShmManager\nfrom multiqueue.control import Bus\n"
                "m = ShmManager(sys.argv[1], create=False, reaper_interval=None)\n"
                "bus = Bus(m)\n"
                "try:\n    m.allocate(1000)\nexcept ValueError as e:\n    print('refused', e)\n"
                "b = m.allocate(100)\nprint('from', b.pool)\nb.release()\nbus.close()\nm.shutdown()\n")
        result = run_python(code, domain)
        assert result.returncode == 0, result.stderr
        assert "refused size 1000 is larger than every pool" in result.stdout
        assert "from tiny" in result.stdout
        assert m.list_pools() == ["tiny", BUS_POOL]
        with pytest.raises(ValueError, match="larger than every pool"):
            m.allocate(1000)  # the 4 KiB bus blocks would fit; they are not for data
        held = [m.allocate(100) for _ in range(4)]
        assert {b.pool for b in held} == {"tiny"}
        with pytest.raises(PoolExhaustedError, match="'tiny'") as info:
            m.allocate(100, timeout=0)
        assert BUS_POOL not in str(info.value)
        assert bus_used(m) == 0
        bus = Bus(m)  # the bus itself still reaches its pool by name
        with bus.subscribe("t") as sub:
            bus.publish("t", "works")
            assert sub.get(timeout=5).data == "works"
        bus.close()
        for b in held:
            b.release()


# -- (i) no subscriber, nothing kept ----------------------------------------------------------


def test_nothing_published_without_subscribers_stays_allocated(owner):
    m, bus = owner
    before = m.get_stats()
    for n in range(1000):
        bus.publish("void", {"n": n})
    after = m.get_stats()
    assert bus_used(m) == 0
    assert after.allocation_count - before.allocation_count == 1000  # each took a block...
    assert after.deallocation_count - before.deallocation_count == 1000  # ...and gave it back
    sub = bus.subscribe("void")  # 64 slots
    for n in range(100):
        bus.publish("void", {"n": n})
    assert bus_used(m) == 64  # only what the subscriber has yet to read
    sub.close()
    assert bus_used(m) == 0  # a subscriber leaving releases what it did not read


# -- (j) a subscriber killed ------------------------------------------------------------------


def test_sigkilled_subscriber_holds_nothing_after_reap(owner, roles):
    m, bus = owner
    capacity, first, later, read = 4096, 500, 2000, 100
    live = roles("subscriber", "events", "--capacity", capacity, "--until", first + later)
    victim = roles("victim", "events", "--capacity", capacity, "--read", read)
    live.ready()  # subscribed (the topic's queue made, 4096 slots) before we publish
    victim.ready()
    for n in range(first):
        bus.publish("events", {"n": n})
    assert victim.expect("holding")["last"] == read - 1
    os.kill(victim.pid, signal.SIGKILL)
    victim.proc.wait(timeout=WAIT)
    longest = 0.0
    for n in range(first, first + later):  # the publisher goes on
        t = time.monotonic()
        bus.publish("events", {"n": n})
        longest = max(longest, time.monotonic() - t)
    assert longest < 0.5
    got = live.expect("received")
    assert got["counts"] == {str(os.getpid()): first + later} and got["problems"] == []
    # the dead subscriber's unread messages and the block it held, until reaped
    assert bus_used(m) == first + later - read + 1
    report = m.reap()
    assert victim.pid in [pid for pid, _ in report.processes]
    assert bus_used(m) == 0
    assert victim.pid not in [p["pid"] for p in m.processes()]
    with PortQueue(m, "b-events", create=False) as q:
        assert victim.pid not in [r.pid for r in q.stats().readers]
    bus.publish("events", {"n": -1})  # still fine afterwards
    live.send("quit")
    live.expect("done")


# -- bugs found along the way -----------------------------------------------------------------


def test_closed_subscription_does_not_steal_from_a_new_one(owner):
    _, bus = owner
    old = bus.subscribe("t")
    old.close()
    new = bus.subscribe("t")  # takes the reader slot the old one left
    bus.publish("t", "for the new one")
    assert old.get(timeout=0) is None
    assert new.get(timeout=0).data == "for the new one"


def _wait_armed(sub_name: str) -> str:
    """Code waiting until the subscription's reader sleeps on the queue's futex again."""
    return (f"while not {sub_name}._queue._header.data_waiters:\n"
            "    time.sleep(0.001)\n")


CRASH_SHUTDOWN = """
import sys, threading, time
from multiqueue import ShmManager
from multiqueue.control import Bus
m = ShmManager(sys.argv[1], reaper_interval=None)
bus = Bus(m)
got = threading.Event()
sub = bus.subscribe("t", callback=lambda msg: got.set())
bus.publish("t", "hello")
assert got.wait(30)
""" + _wait_armed("sub") + """
m.shutdown()  # as at the interpreter's exit, with the bus still open
sub._thread.join(30)
bus.close()
print("left", flush=True)
"""

CRASH_ITER = """
import sys, threading, time
from multiqueue import ShmManager
from multiqueue.control import Bus
m = ShmManager(sys.argv[1], reaper_interval=None)
bus = Bus(m)
sub = bus.subscribe("t")
got = threading.Event()
def loop():
    for msg in sub:
        got.set()
t = threading.Thread(target=loop)
t.start()
bus.publish("t", "hello")
assert got.wait(30)
""" + _wait_armed("sub") + """
bus.close()  # while the thread waits in sub.get()
t.join(30)
m.shutdown()
print("left", flush=True)
"""


@pytest.mark.parametrize("code", [CRASH_SHUTDOWN, CRASH_ITER],
                         ids=["shutdown-under-callback", "close-while-iterating"])
def test_closing_under_a_waiting_subscriber_does_not_crash(domain, code):
    try:
        result = run_python(code, domain)
    finally:
        ShmManager.cleanup(domain)  # a crashed process leaves its domain behind
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr and result.stdout == "left\n"


def test_a_reply_reaches_a_new_requester_whose_reply_topic_reuses_an_old_name(owner):
    """A server keeps requesters' reply topics mapped; a topic whose requester left and
    whose name came back (a reused pid) must be opened anew, not answered into the old one."""
    m, bus = owner
    with Bus(m) as server:
        def answer(msg, payload):
            server.reply(Message(msg.topic, {"reply_to": "re-reused", "rid": 7}, 0, 0, 0), payload)

        first = bus.subscribe("re-reused")
        answer(Message("x", {}, 0, 0, 0), "one")
        assert first.get(timeout=5).data == "one"
        first.close()
        bus._forget("re-reused")  # its requester left: the segment is gone
        second = bus.subscribe("re-reused")  # the same name again, a new segment
        answer(Message("x", {}, 0, 0, 0), "two")
        assert second.get(timeout=5).data == "two"
        second.close()
