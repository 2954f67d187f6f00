"""SyncReader: timestamp alignment of several readers, checked against brute-force oracles.

The readers and buffers are in-process fakes: a buffer records its releases (and fails
on a second one), ``share()`` makes a new handle with its own record, and a reader pops
from a list.  Every test ends with the ledger check: each handle that left a reader or
was shared was released exactly once, by the test (emitted tuples) or by the SyncReader.
"""

from collections import deque

import numpy as np
import pytest

from multiqueue.errors import QueueClosedError
from multiqueue.stream.sync import SyncReader, SyncStats, SyncTuple

MS = 1_000_000
BASE = 1_000 * MS  # streams start at t = 1 s
END = BASE + 3_000 * MS  # a sentinel every stream has: it settles the tail by data


class Ledger:
    def __init__(self):
        self.handles = []
        self.released = []  # ids, in release order

    def check(self):
        for h in self.handles:
            expected = 1 if h.handed else 0
            assert h.releases == expected, f"{h!r} released {h.releases} times, expected {expected}"


class FakeBuffer:
    def __init__(self, ledger, id, timestamp, time_range=None, handed=False):
        self.ledger, self.id, self.timestamp, self.time_range = ledger, id, timestamp, time_range
        self.releases = 0
        self.handed = handed  # left a reader, or made by share(): must be released once
        ledger.handles.append(self)

    def release(self):
        assert self.releases == 0, f"{self!r} released twice"
        self.releases += 1
        self.ledger.released.append(self.id)

    def share(self):
        assert self.releases == 0, f"share() of released {self!r}"
        return FakeBuffer(self.ledger, self.id, self.timestamp, self.time_range, handed=True)

    def __repr__(self):
        return f"<FakeBuffer {self.id} t={self.timestamp}>"


class FakeReader:
    """Pops from a list; when empty: QueueClosedError if closed, else TimeoutError at once
    (as if the timeout had passed: no sleeping), and an error for a wait without timeout."""

    def __init__(self, buffers=(), closed=True):
        self.items = deque(buffers)
        self.closed = closed
        self.waits = []  # the timeout of each pop() that found nothing

    def feed(self, *buffers):
        self.items.extend(buffers)

    def pop(self, timeout=None):
        if self.items:
            b = self.items.popleft()
            b.handed = True
            return b
        if self.closed:
            raise QueueClosedError("fake reader closed")
        assert timeout is not None, "pop() without timeout on an open, empty fake would block forever"
        self.waits.append(timeout)
        raise TimeoutError("nothing")

    def try_pop(self):
        return self.pop(0.0) if self.items or self.closed else None


def bufs(ledger, name, times_ms, ranges_ms=None):
    """Buffers named name0, name1, ... at the given times (ms; floats allowed)."""
    out = []
    for k, t in enumerate(times_ms):
        rng = None if ranges_ms is None else tuple(int(x * MS) for x in ranges_ms[k])
        out.append(FakeBuffer(ledger, f"{name}{k}", int(t * MS), rng))
    return out


def ids(tup):
    return tuple(None if b is None else b.id for b in tup)


def drain(sync, **kw):
    """All tuples until the end, as ids; each tuple released as a user would."""
    out = []
    while True:
        try:
            tup = sync.read(**kw)
        except QueueClosedError:
            return out
        with tup:
            out.append(ids(tup))


def check_invariant(stats):
    for name, c in stats.ports.items():
        assert c.taken == c.matched + c.dropped + c.late + c.unmatched + c.pending, (name, c)


def counters(stats, name):
    c = stats.ports[name]
    return dict(taken=c.taken, matched=c.matched, dropped=c.dropped, late=c.late,
                unmatched=c.unmatched, missing=c.missing, pending=c.pending)


# -- synthetic streams ------------------------------------------------------------------

def synthetic(ledger, seed=7):
    """100 Hz stream "a" and 50 Hz stream "b" over 2 s: +/-2 ms uniform jitter, 5% drops,
    then the END sentinel.  Ranges: a covers [ts, ts + 4 ms) (an exposure), b [ts - 1 ms, ts + 1 ms)."""
    rng = np.random.default_rng(seed)
    streams = {}
    for name, hz, before, after in (("a", 100, 0, 4 * MS), ("b", 50, MS, MS)):
        n = 2 * hz
        ts = BASE + np.arange(n) * (1_000_000_000 // hz) + rng.integers(-2 * MS, 2 * MS + 1, size=n)
        keep = rng.random(n) >= 0.05
        out = [FakeBuffer(ledger, f"{name}{k}", int(ts[k]), (int(ts[k]) - before, int(ts[k]) + after))
               for k in range(n) if keep[k]]
        out.append(FakeBuffer(ledger, f"{name}_end", END, (END - MS, END + MS)))
        streams[name] = out
    return streams["a"], streams["b"]


def span(b):  # the oracle's own reading of "a buffer's range"
    return b.time_range if b.time_range is not None else (b.timestamp, b.timestamp + 1)


def oracle(policy, a, b, tol, b_optional):
    """Tuples by brute force over all pairs.  exact/overlap: the streams are built so that
    a buffer has at most one partner (asserted), so the matching is just "every pair that
    matches".  nearest: per a, the b nearest within tol, the earlier one on a tie."""
    if policy == "exact":
        def partners(x):
            return [y for y in b if abs(x.timestamp - y.timestamp) <= tol]
    elif policy == "overlap":
        def partners(x):
            s1, e1 = span(x)
            return [y for y in b if s1 < span(y)[1] + tol and span(y)[0] < e1 + tol]
    else:
        def partners(x):
            near = [y for y in b if abs(x.timestamp - y.timestamp) <= tol]
            return sorted(near, key=lambda y: (abs(x.timestamp - y.timestamp), y.timestamp))[:1]
    tuples = []
    for x in a:
        found = partners(x)
        assert len(found) <= 1, f"test streams must give unique partners: {x} ~ {found}"
        if found or b_optional:
            tuples.append((x.id, found[0].id if found else None))
    if policy != "nearest":
        used = [y for _, y in tuples if y is not None]
        assert len(used) == len(set(used)), "a b buffer with two partners"
    return tuples


TOLERANCE = {"exact": 3 * MS, "nearest": 7 * MS, "overlap": 0}

# literal (tuples, {port: (taken, matched, dropped, missing)}) for seed 7: the oracle derives the
# same, these pin them down (late, unmatched and pending are 0: the sentinel settles the tail)
EXPECTED = {
    ("exact", False): (83, dict(a=(192, 83, 109, 0), b=(97, 83, 14, 0))),
    ("exact", True): (192, dict(a=(192, 192, 0, 0), b=(97, 83, 14, 109))),
    ("nearest", False): (100, dict(a=(192, 100, 92, 0), b=(97, 93, 4, 0))),
    ("nearest", True): (192, dict(a=(192, 192, 0, 0), b=(97, 93, 4, 92))),
    ("overlap", False): (56, dict(a=(192, 56, 136, 0), b=(97, 56, 41, 0))),
    ("overlap", True): (192, dict(a=(192, 192, 0, 0), b=(97, 56, 41, 136))),
}


@pytest.mark.parametrize("b_optional", [False, True], ids=["both-required", "b-optional"])
@pytest.mark.parametrize("policy", ["exact", "nearest", "overlap"])
def test_synthetic_streams_match_the_oracle(policy, b_optional):
    ledger = Ledger()
    a, b = synthetic(ledger)
    tol = TOLERANCE[policy]
    expected = oracle(policy, a, b, tol, b_optional)
    sync = SyncReader({"a": FakeReader(a), "b": FakeReader(b)}, policy=policy, tolerance_ns=tol,
                      optional=["b"] if b_optional else ())
    got = drain(sync)
    assert got == expected

    stats = sync.stats
    check_invariant(stats)
    assert stats.tuples == len(expected)
    matched_b = len({y for _, y in expected if y is not None})
    missing_b = sum(y is None for _, y in expected)
    assert counters(stats, "a") == dict(taken=len(a), matched=len(expected), dropped=len(a) - len(expected),
                                        late=0, unmatched=0, missing=0, pending=0)
    assert counters(stats, "b") == dict(taken=len(b), matched=matched_b, dropped=len(b) - matched_b,
                                        late=0, unmatched=0, missing=missing_b, pending=0)
    tuples, per_port = EXPECTED[policy, b_optional]
    assert stats.tuples == tuples
    for name, (taken, matched, dropped, missing) in per_port.items():
        c = stats[name]
        assert (c.taken, c.matched, c.dropped, c.missing) == (taken, matched, dropped, missing), name
    if policy == "nearest":  # 7 of the 50 Hz buffers serve two 100 Hz ones (shared handles)
        assert sum(y is not None for _, y in expected) - matched_b == 7
    ledger.check()


def test_synthetic_streams_are_what_the_test_claims():
    a, b = synthetic(Ledger())
    for stream, period in ((a, 10 * MS), (b, 20 * MS)):
        ts = np.array([x.timestamp for x in stream[:-1]]) - BASE
        assert np.all(np.diff(ts) > 0) and ts[-1] < 2_000 * MS
        assert np.all(np.abs(ts - np.round(ts / period) * period) <= 2 * MS)  # jitter
    assert (len(a) - 1, len(b) - 1) == (191, 96)  # 9 of 200 and 4 of 100 dropped


# -- exact / overlap details ------------------------------------------------------------

def test_exact_three_ports_drops_what_cannot_match():
    ledger = Ledger()
    a = bufs(ledger, "a", [10, 20, 30, 40])
    b = bufs(ledger, "b", [10.5, 25, 30.5, 40])
    c = bufs(ledger, "c", [9.9, 30, 35, 41])
    sync = SyncReader([FakeReader(a), FakeReader(b), FakeReader(c)], tolerance_ns=MS, names="abc")
    assert drain(sync) == [("a0", "b0", "c0"), ("a2", "b2", "c1"), ("a3", "b3", "c3")]
    stats = sync.stats
    check_invariant(stats)
    assert counters(stats, "a") == dict(taken=4, matched=3, dropped=1, late=0, unmatched=0, missing=0,
                                        pending=0)
    assert (stats["b"].dropped, stats["c"].dropped) == (1, 1)  # b 25 (c moved to 30), c 35 (a, b at 40)
    ledger.check()


def test_overlap_uses_ranges_and_instants():
    ledger = Ledger()
    # a: exposures; b: instants (no time_range) and one empty range (treated as an instant)
    a = bufs(ledger, "a", [0, 10, 20], ranges_ms=[(0, 5), (10, 15), (20, 25)])
    b = bufs(ledger, "b", [4.9, 15, 20], ranges_ms=None)
    b[2].time_range = (20 * MS, 20 * MS)
    sync = SyncReader([FakeReader(a), FakeReader(b)], policy="overlap")
    # b 15 is the instant [15, 15+1ns): a1's range [10, 15) ends just before it
    assert drain(sync) == [("a0", "b0"), ("a2", "b2")]
    assert (sync.stats["port0"].dropped, sync.stats["port1"].dropped) == (1, 1)
    ledger.check()


def test_overlap_tolerance_widens_ranges():
    ledger = Ledger()
    a = bufs(ledger, "a", [0], ranges_ms=[(0, 5)])
    b = bufs(ledger, "b", [6], ranges_ms=[(6, 8)])
    assert drain(SyncReader([FakeReader(a), FakeReader(b)], policy="overlap", tolerance_ns=MS)) == []
    ledger.check()
    ledger = Ledger()
    a = bufs(ledger, "a", [0], ranges_ms=[(0, 5)])
    b = bufs(ledger, "b", [6], ranges_ms=[(6, 8)])
    assert drain(SyncReader([FakeReader(a), FakeReader(b)], policy="overlap",
                            tolerance_ns=MS + 1)) == [("a0", "b0")]
    ledger.check()


# -- nearest details --------------------------------------------------------------------

def test_nearest_shares_a_buffer_between_reference_items_and_breaks_ties_early():
    ledger = Ledger()
    ref = bufs(ledger, "r", [10, 20, 30, 40])
    other = bufs(ledger, "o", [15, 25, 50])
    sync = SyncReader([FakeReader(ref), FakeReader(other)], policy="nearest", tolerance_ns=5 * MS)
    tuples = []
    while True:
        try:
            tuples.append(sync.read())
        except QueueClosedError:
            break
    # r10 and r20 both have o15 nearest (r20 ties 15/25: the earlier), r30 -> o25, r40 none
    assert [ids(t) for t in tuples] == [("r0", "o0"), ("r1", "o0"), ("r2", "o1")]
    assert tuples[0][1] is not tuples[1][1]  # each tuple its own handle
    stats = sync.stats
    check_invariant(stats)
    assert counters(stats, "port0") == dict(taken=4, matched=3, dropped=1, late=0, unmatched=0, missing=0,
                                            pending=0)
    # o50 ended in the pending list when the reference closed: unmatched
    assert counters(stats, "port1") == dict(taken=3, matched=2, dropped=0, late=0, unmatched=1, missing=0,
                                            pending=0)
    for t in tuples:
        t.release()
    ledger.check()


def test_nearest_does_not_wait_past_the_first_buffer_after_the_reference():
    ledger = Ledger()
    ref = FakeReader(bufs(ledger, "r", [10]), closed=False)
    other = FakeReader(bufs(ledger, "o", [9, 11]), closed=False)  # then nothing: it must not wait
    sync = SyncReader([ref, other], policy="nearest", tolerance_ns=5 * MS)
    with sync.read(timeout=0) as tup:
        assert ids(tup) == ("r0", "o0")  # 9 and 11 tie: the earlier
    assert other.waits == []
    sync.close()
    assert counters(sync.stats, "port1")["unmatched"] == 1  # o1, never matched
    ledger.check()


def test_nearest_stalled_port_gives_the_best_pending_or_unmatched():
    ledger = Ledger()
    ref = FakeReader(bufs(ledger, "r", [100, 200]), closed=False)
    other = FakeReader(bufs(ledger, "o", [95]), closed=False)
    sync = SyncReader([ref, other], policy="nearest", tolerance_ns=10 * MS, timeout={1: 0})
    with sync.read(timeout=0) as tup:  # nothing at/after 100 yet, and o won't wait: 95 is the best
        assert ids(tup) == ("r0", "o0")
    with pytest.raises(TimeoutError):  # r1: o95 too far, o stalled: r1 unmatched, then r is empty
        sync.read(timeout=0)
    assert counters(sync.stats, "port0") == dict(taken=2, matched=1, dropped=0, late=0, unmatched=1,
                                                 missing=0, pending=0)
    assert counters(sync.stats, "port1") == dict(taken=1, matched=1, dropped=0, late=0, unmatched=0,
                                                 missing=0, pending=0)
    sync.close()
    ledger.check()


def test_max_pending_overflow_counts_dropped():
    ledger = Ledger()
    ref = bufs(ledger, "r", [100])
    other = bufs(ledger, "o", [90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 105])
    sync = SyncReader([FakeReader(ref), FakeReader(other)], policy="nearest", tolerance_ns=20 * MS,
                      max_pending=4)
    assert drain(sync) == [("r0", "o9")]
    # o0..o6 released as the pending list overflowed, o7 o8 farther than o9; o10 left at the end
    assert counters(sync.stats, "port1") == dict(taken=11, matched=1, dropped=9, late=0, unmatched=1,
                                                 missing=0, pending=0)
    assert ledger.released[:9] == [f"o{k}" for k in range(9)]
    ledger.check()


# -- optional ports, timeouts, late, close ---------------------------------------------

@pytest.mark.parametrize("policy", ["exact", "nearest"])
def test_optional_port_gives_none_once_certain(policy):
    ledger = Ledger()
    a = bufs(ledger, "a", [100, 200, 300])
    b = bufs(ledger, "b", [101, 299])
    sync = SyncReader({"a": FakeReader(a), "b": FakeReader(b)}, policy=policy, tolerance_ns=2 * MS,
                      optional=["b"])
    assert drain(sync) == [("a0", "b0"), ("a1", None), ("a2", "b1")]
    assert counters(sync.stats, "b") == dict(taken=2, matched=2, dropped=0, late=0, unmatched=0, missing=1,
                                             pending=0)
    ledger.check()


def test_required_port_timeout_gives_up_and_stalls_the_port():
    ledger = Ledger()
    a = FakeReader(bufs(ledger, "a", [100, 200, 300]), closed=False)
    b = FakeReader([], closed=False)
    sync = SyncReader({"a": a, "b": b}, tolerance_ns=MS, timeout={"b": 0.05}, clock=lambda: 0.0)
    with pytest.raises(TimeoutError):
        sync.read(timeout=1.0)
    # waited once for b (its whole timeout), then only looked: a's buffers all gave up
    assert [w for w in b.waits if w > 0] == [0.05] and len(b.waits) > 3
    assert counters(sync.stats, "a") == dict(taken=3, matched=0, dropped=0, late=0, unmatched=3,
                                             missing=0, pending=0)
    # b comes back: it delivered, so it is waited for again
    b.feed(*bufs(ledger, "b", [400]))
    a.feed(*bufs(ledger, "c", [400, 500]))
    with sync.read(timeout=1.0) as tup:
        assert ids(tup) == ("c0", "b0")
    b.waits.clear()
    with pytest.raises(TimeoutError):
        sync.read(timeout=1.0)
    assert [w for w in b.waits if w > 0] == [0.05]
    assert sync.stats["a"].unmatched == 4
    check_invariant(sync.stats)
    sync.close()
    ledger.check()


def test_optional_port_timeout_gives_none_and_its_late_buffer_counts_late():
    ledger = Ledger()
    a = FakeReader(bufs(ledger, "a", [100, 200]), closed=False)
    b = FakeReader([], closed=False)
    sync = SyncReader([a, b], tolerance_ns=2 * MS, optional=[1], timeout=[None, 0.01], clock=lambda: 0.0)
    with sync.read(timeout=1.0) as tup:
        assert ids(tup) == ("a0", None)
    with sync.read(timeout=1.0) as tup:  # b is stalled: no wait at all this time
        assert ids(tup) == ("a1", None)
    assert b.waits == [0.01, 0.0]
    b.feed(*bufs(ledger, "b", [199, 250]))  # 199 belonged to the tuple at 200: late
    a.feed(*bufs(ledger, "c", [250]))
    with sync.read(timeout=1.0) as tup:
        assert ids(tup) == ("c0", "b1")
    assert counters(sync.stats, "port1") == dict(taken=2, matched=1, dropped=0, late=1, unmatched=0,
                                                 missing=2, pending=0)
    sync.close()
    ledger.check()


def test_out_of_order_buffer_on_a_required_port_is_late():
    ledger = Ledger()
    a = bufs(ledger, "a", [100, 200, 150, 300])
    b = bufs(ledger, "b", [100, 200, 300])
    sync = SyncReader([FakeReader(a), FakeReader(b)])
    assert drain(sync) == [("a0", "b0"), ("a1", "b1"), ("a3", "b2")]
    assert counters(sync.stats, "port0") == dict(taken=4, matched=3, dropped=0, late=1, unmatched=0,
                                                 missing=0, pending=0)
    ledger.check()


def test_read_timeout_keeps_the_partial_alignment():
    ledger = Ledger()
    a = FakeReader(bufs(ledger, "a", [100]), closed=False)
    b = FakeReader([], closed=False)
    sync = SyncReader([a, b], policy="nearest", tolerance_ns=MS)
    with pytest.raises(TimeoutError):
        sync.read(timeout=0)
    assert sync.stats["port0"].pending == 1
    b.feed(*bufs(ledger, "b", [100.5]))
    with sync.read(timeout=0) as tup:
        assert ids(tup) == ("a0", "b0")
    sync.close()
    ledger.check()


def test_closed_stream_ends_iteration_and_leftovers_are_unmatched():
    ledger = Ledger()
    a = bufs(ledger, "a", [100, 200, 300])
    b = bufs(ledger, "b", [100, 200])
    sync = SyncReader([FakeReader(a), FakeReader(b)])
    seen = []
    for tup in sync:
        seen.append(ids(tup))
        tup.release()
    assert seen == [("a0", "b0"), ("a1", "b1")]
    assert counters(sync.stats, "port0")["unmatched"] == 1  # a 300: its partner's stream ended
    with pytest.raises(QueueClosedError, match="port1"):
        sync.read()
    ledger.check()


def test_close_releases_everything_held():
    ledger = Ledger()
    ref = FakeReader(bufs(ledger, "r", [10, 20, 30]), closed=False)
    other = FakeReader(bufs(ledger, "o", [12, 40]), closed=False)
    with SyncReader([ref, other], policy="nearest", tolerance_ns=5 * MS) as sync:
        with sync.read(timeout=0) as tup:
            assert ids(tup) == ("r0", "o0")
        # o0 is kept (it could be nearest to r1 too), but it is matched, not pending
        assert counters(sync.stats, "port1") == dict(taken=1, matched=1, dropped=0, late=0, unmatched=0,
                                                     missing=0, pending=0)
        with pytest.raises(TimeoutError):  # r1 and r2: o40 proves nothing is near them
            sync.read(timeout=0)
        assert sync.stats["port0"].dropped == 2 and sync.stats["port1"].pending == 1
    assert counters(sync.stats, "port1") == dict(taken=2, matched=1, dropped=0, late=0, unmatched=1,
                                                 missing=0, pending=0)
    with pytest.raises(QueueClosedError, match="closed"):
        sync.read()
    sync.close()  # twice is fine
    assert list(sync) == []
    ledger.check()


def test_tuple_helpers_and_stats_types():
    ledger = Ledger()
    sync = SyncReader([FakeReader(bufs(ledger, "a", [1])), FakeReader(bufs(ledger, "b", [1]))],
                      names=["left", "right"])
    tup = sync.read()
    assert isinstance(tup, SyncTuple) and isinstance(tup, tuple) and len(tup) == 2
    tup.release()
    assert isinstance(sync.stats, SyncStats) and list(sync.stats.ports) == ["left", "right"]
    ledger.check()


def test_bad_arguments():
    readers = [FakeReader(), FakeReader()]
    with pytest.raises(ValueError, match="policy"):
        SyncReader(readers, policy="closest")
    with pytest.raises(ValueError, match="reference"):
        SyncReader(readers, policy="nearest", optional=[0])
    with pytest.raises(ValueError, match="required"):
        SyncReader(readers, optional=[0, 1])
    with pytest.raises(ValueError, match="no port"):
        SyncReader(readers, optional=["x"])
    with pytest.raises(ValueError, match="tolerance"):
        SyncReader(readers, tolerance_ns=-1)
    with pytest.raises(ValueError, match="entries"):
        SyncReader(readers, timeout=[1.0])
    with pytest.raises(ValueError, match="timeout"):
        SyncReader(readers, timeout=-1)
    with pytest.raises(ValueError, match="names"):
        SyncReader({"a": FakeReader()}, names=["b"])
