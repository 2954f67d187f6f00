"""Timestamp sync: align the buffers of several port readers into tuples.

``SyncReader(readers, policy=...)`` yields one tuple per alignment (a ``Buffer`` per
port, or ``None`` for an optional port); policies ``exact``, ``nearest`` and
``overlap``. The policies, the per-port counters and how it waits: docs/streams.md,
"Timestamp sync".
"""

import bisect
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from operator import attrgetter

from ..errors import QueueClosedError

__all__ = ["POLICIES", "PortSyncStats", "SyncReader", "SyncStats", "SyncTuple"]

POLICIES = ("exact", "nearest", "overlap")

# what one attempt to take a buffer from a port gave
_GOT, _EMPTY, _CLOSED, _EXPIRED = "got", "empty", "closed", "expired"
# while idle, a port timeout below this would turn waiting into busy polling
_IDLE_POLL_S = 0.01


@dataclass
class PortSyncStats:
    """Counters of one port; see the module docstring for their exact meaning."""

    taken: int = 0
    matched: int = 0
    dropped: int = 0
    late: int = 0
    unmatched: int = 0
    pending: int = 0
    missing: int = 0


@dataclass
class SyncStats:
    """A snapshot: tuples emitted, and the counters of every port by name."""

    tuples: int = 0
    ports: dict[str, PortSyncStats] = field(default_factory=dict)

    def __getitem__(self, name: str) -> PortSyncStats:
        return self.ports[name]


class SyncTuple(tuple):
    """An aligned tuple (a Buffer or None per port) whose buffers the caller owns.

    ``release()`` releases every buffer in it; ``with sync.read() as tup:`` does so on exit.
    """

    __slots__ = ()

    def release(self) -> None:
        for buf in self:
            if buf is not None:
                buf.release()

    def __enter__(self) -> "SyncTuple":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Item:
    """A held buffer with its sort key cached (reading timestamps is not free)."""

    __slots__ = ("buf", "start", "end", "matched")

    def __init__(self, buf, start: int, end: int):
        self.buf = buf
        self.start = start  # timestamp, or range start for overlap
        self.end = end  # exclusive end of the matching interval (exact/overlap)
        self.matched = False  # already in an emitted tuple (nearest keeps such buffers)


_start = attrgetter("start")


class SyncReader:
    """Align the buffers of several readers (a list, or a dict name -> reader) into tuples.

    ``policy``: "exact", "nearest" or "overlap" (module docstring).  ``reference``: the
    reference port of "nearest" (index or name).  ``optional``: ports a tuple may lack
    (index or name each).  ``timeout``: per-port wait in seconds: None, one number for
    all ports, a sequence (one per port) or a mapping (index or name -> seconds; absent
    ports wait forever).  ``names``: port names for ``stats`` (default: the dict keys,
    else "port0", "port1", ...).  ``max_pending``: buffers held per port at most.
    ``clock``: monotonic seconds (for tests).

    The readers need ``pop(timeout)`` raising TimeoutError or QueueClosedError; the
    SyncReader neither closes nor detaches them.  Not thread-safe: one reading thread.
    """

    def __init__(self, readers, policy: str = "exact", tolerance_ns: int = 0, reference=0,
                 optional=(), timeout=None, names=None, max_pending: int = 64,
                 clock: Callable[[], float] = time.monotonic):
        readers, names = _readers_and_names(readers, names)
        n = len(readers)
        _check_sync_args(policy, tolerance_ns, max_pending)
        self._readers = readers
        self.names = tuple(names)
        self.policy = policy
        self.tolerance_ns = int(tolerance_ns)
        self.max_pending = int(max_pending)
        self._clock = clock
        self.reference = self._port(reference)
        if isinstance(optional, (str, int)):
            optional = (optional,)
        optional_set = {self._port(p) for p in optional}
        self.optional = tuple(sorted(optional_set))
        self._required = [p for p in range(n) if p not in optional_set]
        if policy == "nearest" and self.reference in optional_set:
            raise ValueError(f"the reference port {names[self.reference]!r} cannot be optional")
        if not self._required:
            raise ValueError("at least one port must be required (not optional)")
        self._timeouts = _per_port_timeouts(self.names, timeout)

        self._pending: list[list[_Item]] = [[] for _ in range(n)]  # sorted by start
        self._closed = [False] * n  # the reader raised QueueClosedError
        self._horizon = [float("-inf")] * n  # arrivals starting before this are late
        self._wait_start: list[float | None] = [None] * n  # port timeout clock
        self._stalled = [False] * n  # port timeout passed, nothing delivered since
        self._counts = [PortSyncStats() for _ in range(n)]
        self._tuples = 0
        self._done: str | None = None  # why read() raises QueueClosedError now

    # -- public ------------------------------------------------------------------------

    def read(self, timeout: float | None = None) -> SyncTuple:
        """The next aligned tuple.  Raises TimeoutError if none is complete within
        ``timeout`` seconds (None: wait), and QueueClosedError once a required port is
        closed and drained (or ``close()`` was called): nothing more can match."""
        if self._done:
            raise QueueClosedError(self._done)
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"timeout must be None or >= 0 seconds, not {timeout!r}")
        deadline = None if timeout is None else self._clock() + timeout
        if self.policy == "nearest":
            return self._read_nearest(deadline)
        return self._read_greedy(deadline)

    def __iter__(self) -> Iterator[SyncTuple]:
        """Yield tuples until nothing more can match (waits as ``read()``)."""
        while True:
            try:
                yield self.read()
            except QueueClosedError:
                return

    def close(self) -> None:
        """Release every held buffer (counted unmatched); read() then raises QueueClosedError.
        The readers themselves are left alone."""
        if not self._done:
            self._release_all(f"SyncReader over {', '.join(self.names)} was closed")

    def __enter__(self) -> "SyncReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def stats(self) -> SyncStats:
        """A snapshot of the counters."""
        ports = {}
        for p, c in enumerate(self._counts):
            ports[self.names[p]] = PortSyncStats(
                taken=c.taken, matched=c.matched, dropped=c.dropped, late=c.late,
                unmatched=c.unmatched, missing=c.missing,
                pending=sum(not it.matched for it in self._pending[p]))
        return SyncStats(tuples=self._tuples, ports=ports)

    def __repr__(self) -> str:
        return (f"<SyncReader {self.policy} tolerance={self.tolerance_ns} ns "
                f"ports={list(self.names)} tuples={self._tuples}>")

    # -- exact and overlap -------------------------------------------------------------

    def _read_greedy(self, deadline) -> SyncTuple:
        pending, required = self._pending, self._required
        while True:
            for p in required:  # look (without waiting) wherever a head is missing
                if not pending[p]:
                    self._take(p, 0.0)
            self._check_required()
            empty = [p for p in required if not pending[p]]
            if len(empty) == len(required):
                self._wait_idle(empty[0], deadline)
                continue
            if empty:
                if self._wait(empty[0], deadline) == _EXPIRED:
                    # stalled required port: the oldest head waiting for it gives up
                    p = min((q for q in required if pending[q]), key=lambda q: pending[q][0].end)
                    self._retire(p, 0, "unmatched")
                continue
            # all required ports have a head: they match iff their intervals share a point
            start = max(pending[p][0].start for p in required)
            end = min(pending[p][0].end for p in required)
            if start >= end:
                # a head ending before another head starts can never match: the other port's
                # later buffers start later still
                for p in required:
                    if pending[p][0].end <= start:
                        self._retire(p, 0, "dropped")
                continue
            picks: list[_Item | None] = [None] * len(pending)
            for p in required:
                picks[p] = pending[p][0]
            for p in self.optional:
                picks[p] = self._optional_pick(p, start, end, deadline)
            return self._emit(picks, anchor=start, keep=())

    def _optional_pick(self, p, start, end, deadline) -> "_Item | None":
        """The optional port's head if it overlaps [start, end), None once certain it can't."""
        items = self._pending[p]
        while True:
            while items and items[0].end <= start:  # too old for this tuple and all later ones
                self._retire(p, 0, "dropped")
            if items:
                return items[0] if items[0].start < end else None
            if self._closed[p] or self._wait(p, deadline) == _EXPIRED:
                return None

    # -- nearest -----------------------------------------------------------------------

    def _read_nearest(self, deadline) -> SyncTuple:
        pending, ref_port = self._pending, self.reference
        # required ports first: if one has no partner, the optional ones need no waiting
        others = [p for p in self._required if p != ref_port] + list(self.optional)
        while True:
            self._check_required()
            if not pending[ref_port]:
                self._wait_idle(ref_port, deadline)
                continue
            t = pending[ref_port][0].start
            picks: list[_Item | None] = [None] * len(pending)
            picks[ref_port] = pending[ref_port][0]
            failed = None  # why the reference buffer has no tuple: "dropped" or "unmatched"
            for p in others:
                index, certain = self._nearest(p, t, deadline)
                if index is not None:
                    picks[p] = pending[p][index]
                elif p not in self.optional:
                    failed = "dropped" if certain else "unmatched"
                    break  # no need to wait for the other ports
            # whatever happens to t, nothing can be nearest to a later reference if it is
            # older than t - tolerance, or before the buffer nearest to t (that one is nearer)
            for p in others:
                items = pending[p]
                if picks[p] is not None:
                    cut = items.index(picks[p])  # at or after t - tolerance
                else:
                    cut = bisect.bisect_left(items, t - self.tolerance_ns, key=_start)
                for _ in range(cut):
                    self._retire(p, 0, "dropped")
            if failed:
                self._retire(ref_port, 0, failed)
                continue
            return self._emit(picks, anchor=t, keep=others)

    def _nearest(self, p, t, deadline) -> tuple[int | None, bool]:
        """Index of p's pending buffer nearest to t within tolerance (None: none), and
        whether data proved it (else the port is closed or stalled)."""
        items = self._pending[p]
        while True:
            i = bisect.bisect_left(items, t, key=_start)  # first at or after t
            if i < len(items):
                return self._nearer(items, i, t), True
            if self._closed[p] or self._wait(p, deadline) == _EXPIRED:
                return self._nearer(items, i, t), False

    def _nearer(self, items, i, t) -> int | None:
        before = t - items[i - 1].start if i > 0 else None
        after = items[i].start - t if i < len(items) else None
        if before is not None and (after is None or before <= after):  # ties: the earlier
            return i - 1 if before <= self.tolerance_ns else None
        return i if after is not None and after <= self.tolerance_ns else None

    # -- shared machinery --------------------------------------------------------------

    def _emit(self, picks, anchor: int, keep) -> SyncTuple:
        """Hand out the picked buffers; ports in ``keep`` keep theirs (the caller gets a share)."""
        out = []
        for p, item in enumerate(picks):
            counts = self._counts[p]
            if item is None:
                counts.missing += 1
                self._horizon[p] = max(self._horizon[p], anchor)
                out.append(None)
                continue
            self._horizon[p] = max(self._horizon[p], item.start)
            if not item.matched:
                item.matched = True
                counts.matched += 1
            if p in keep:
                out.append(item.buf.share())
            else:
                self._pending[p].remove(item)
                out.append(item.buf)
        self._tuples += 1
        return SyncTuple(out)

    def _take(self, p, wait: float | None) -> str:
        """Pop one buffer from port p into its pending list, waiting up to ``wait`` s."""
        if self._closed[p]:
            return _CLOSED
        try:
            buf = self._readers[p].pop(timeout=wait)
        except TimeoutError:
            return _EMPTY
        except QueueClosedError:
            self._closed[p] = True
            return _CLOSED
        counts = self._counts[p]
        counts.taken += 1
        self._wait_start[p], self._stalled[p] = None, False  # the port is alive
        start, end = self._interval(buf)
        if start < self._horizon[p]:
            counts.late += 1
            buf.release()
            return _GOT  # the port is alive all the same
        items = self._pending[p]
        bisect.insort(items, _Item(buf, start, end), key=_start)
        if len(items) > self.max_pending:
            self._retire(p, 0, "dropped")  # the oldest is the least likely to be needed
        return _GOT

    def _interval(self, buf) -> tuple[int, int]:
        ts = buf.timestamp
        if self.policy == "overlap" and (rng := buf.time_range) is not None:
            start, end = rng
            return start, max(end, start + 1) + self.tolerance_ns
        return ts, ts + 1 + self.tolerance_ns  # an instant, widened: |t1 - t2| <= tolerance

    def _wait(self, p, deadline) -> str:
        """Wait for port p while an alignment needs it: its timeout applies.  Returns _GOT,
        _CLOSED or _EXPIRED; raises TimeoutError when the read() deadline comes first."""
        now = self._clock()
        port_wait = None
        if self._stalled[p]:
            port_wait = 0.0  # only look: it has not delivered since its timeout passed
        elif self._timeouts[p] is not None:
            if self._wait_start[p] is None:
                self._wait_start[p] = now
            port_wait = max(0.0, self._wait_start[p] + self._timeouts[p] - now)
        read_wait = None if deadline is None else max(0.0, deadline - now)
        if read_wait is not None and (port_wait is None or read_wait < port_wait):
            status = self._take(p, read_wait)
            if status == _EMPTY:
                raise TimeoutError(f"no aligned tuple in time: port {self.names[p]!r} has nothing yet")
            return status
        status = self._take(p, port_wait)
        if status == _EMPTY:
            self._stalled[p] = True
            return _EXPIRED
        return status

    def _wait_idle(self, p, deadline) -> None:
        """No alignment in progress: wait for port p, but only for its timeout (or a short
        poll) so that the caller looks at the other ports again; no port is stalled by it."""
        self._wait_start = [None] * len(self._readers)  # a new alignment starts the clocks afresh
        wait = self._timeouts[p]
        if wait is not None:
            wait = max(wait, _IDLE_POLL_S)
        if deadline is not None:
            read_wait = max(0.0, deadline - self._clock())
            if wait is None or read_wait < wait:
                if self._take(p, read_wait) == _EMPTY:
                    raise TimeoutError(f"no aligned tuple in time: port {self.names[p]!r} has nothing yet")
                return
        self._take(p, wait)

    def _check_required(self) -> None:
        for p in self._required:
            if self._closed[p] and not self._pending[p]:
                self._release_all(f"port {self.names[p]!r} is closed and drained: nothing more can match")
                raise QueueClosedError(self._done)

    def _retire(self, p, index: int, reason: str) -> None:
        """Release a held buffer; count it under ``reason`` unless it was already matched."""
        item = self._pending[p].pop(index)
        if not item.matched:
            setattr(self._counts[p], reason, getattr(self._counts[p], reason) + 1)
        item.buf.release()

    def _release_all(self, why: str) -> None:
        self._done = why
        error = None
        for p, items in enumerate(self._pending):
            while items:
                try:
                    self._retire(p, 0, "unmatched")
                except Exception as exc:  # release the others anyway, report the first
                    error = error or exc
        if error is not None:
            raise error

    def _port(self, key) -> int:
        return _port_index(self.names, key)


def _readers_and_names(readers, names) -> tuple[list, list[str]]:
    """The readers as a list and their port names (a dict's keys, ``names``, or portN)."""
    if isinstance(readers, Mapping):
        if names is not None:
            raise ValueError("names come from the keys when readers is a dict; don't pass names")
        names, readers = list(readers), list(readers.values())
    elif isinstance(readers, (str, bytes)) or not isinstance(readers, Iterable):
        raise TypeError(f"readers must be a list or a dict (name -> reader) of readers, not "
                        f"{type(readers).__name__}")
    readers = list(readers)
    if not readers:
        raise ValueError("SyncReader needs at least one reader")
    for i, reader in enumerate(readers):
        if not callable(getattr(reader, "pop", None)):
            raise TypeError(f"readers[{i}] is a {type(reader).__name__}: a reader needs pop(timeout)")
    n = len(readers)
    names = [f"port{i}" for i in range(n)] if names is None else [str(x) for x in names]
    if len(names) != n or len(set(names)) != n:
        raise ValueError(f"names must be {n} distinct names, got {names!r}")
    return readers, names


def _check_sync_args(policy, tolerance_ns, max_pending) -> None:
    if policy not in POLICIES:
        raise ValueError(f"unknown sync policy {policy!r}; use one of {', '.join(POLICIES)}")
    if isinstance(tolerance_ns, bool) or not isinstance(tolerance_ns, Integral) or tolerance_ns < 0:
        raise ValueError(f"tolerance_ns must be an int >= 0 (nanoseconds), not {tolerance_ns!r}")
    if isinstance(max_pending, bool) or not isinstance(max_pending, Integral) or max_pending < 1:
        raise ValueError(f"max_pending must be an int >= 1, not {max_pending!r}")


def _port_index(names, key) -> int:
    """The index of a port given by name or index (negative ones count from the end)."""
    if isinstance(key, str):
        if key not in names:
            raise ValueError(f"no port named {key!r}; ports are {list(names)}")
        return names.index(key)
    if isinstance(key, bool) or not isinstance(key, int) or not -len(names) <= key < len(names):
        raise ValueError(f"no port {key!r}: use a name or an index below {len(names)}")
    return key % len(names)


def _per_port_timeouts(names, timeout) -> list[float | None]:
    """One timeout per port from None, a number, a sequence or a mapping (name or index)."""
    n = len(names)
    if timeout is None or isinstance(timeout, Real):
        values = [timeout] * n
    elif isinstance(timeout, Mapping):
        values = [None] * n
        for key, value in timeout.items():
            values[_port_index(names, key)] = value
    else:
        values = list(timeout)
        if len(values) != n:
            raise ValueError(f"timeout has {len(values)} entries for {n} ports")
    for value in values:
        if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or not value >= 0):
            raise ValueError(f"a port timeout must be None or >= 0 seconds, not {value!r}")
    return [None if value is None else float(value) for value in values]
