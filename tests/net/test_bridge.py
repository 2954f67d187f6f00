"""Bridges over Zenoh: a port of one domain carried into another, between separate interpreters.

The stream tests run tests/bridge_roles.py in other interpreters (``tx``: a stamped ramp into a
BridgeSink, ``rx``: a BridgeSource into a Recorder that appends a line per frame to a file),
each in a domain of its own, on a free TCP port of 127.0.0.1 and a Zenoh key of its own.
Waits are on a role's stdout line, a process exit, or a condition with a deadline (records
written, a counter reached): never a sleep that makes things work.
"""

import contextlib
import json
import os
import queue
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from bridge_roles import checksum, read_record, stamp

from helpers import ROLE_WAIT, RoleProcess
from multiqueue import ShmManager, attach
from multiqueue.control import Bus
from multiqueue.errors import BlockError, BridgeError, WireError
from multiqueue.graph import NullSink, Runtime
from multiqueue.net import BridgeSink, BridgeSource, ZenohSettings, wire
from multiqueue.net.settings import close_session, open_session
from multiqueue.shm.segment import domain_segments, unlink_quietly

ROLES = str(Path(__file__).with_name("bridge_roles.py"))
WAIT = ROLE_WAIT
N = 256  # float32 per frame in the stream tests


# -- helpers -----------------------------------------------------------------------------


class Role(RoleProcess):
    """A tests/net/bridge_roles.py process."""

    def __init__(self, role: str, domain: str, key: str, *args):
        super().__init__(role, [sys.executable, ROLES, role, domain, key, *map(str, args)])
        self.role, self.domain = role, domain
        self.pid = None
        self.pids: dict[str, int] = {}  # block -> worker pid

    def ready(self) -> "Role":
        report = self.expect("ready")
        self.pid, self.pids = report["pid"], report["pids"]
        return self

    def done(self) -> dict:
        """The role's final report; it must have ended cleanly (no error, no block failure)."""
        report = self.expect("done")
        assert self.proc.wait(timeout=WAIT) == 0, self.stderr
        assert report["error"] is None, (report["error"], self.stderr)
        assert report["blocks_in_use"] == 0, report
        return report

    def reports(self) -> list[dict]:
        """The reports not read yet (of a role that ended)."""
        pending = []
        with contextlib.suppress(queue.Empty):
            while (report := self._lines.get(timeout=1.0)) is not None:
                pending.append(report)
        return pending

    def stop(self) -> None:
        """Leave: ask a running role to stop in order; kill it if it does not."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.send("stop")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        wait_for_exit(self.pids.values())  # a killed runtime's workers leave on their own


def wait_for_exit(pids, timeout: float = WAIT) -> None:
    """Wait until processes that are not our children have exited (pidfd: no polling)."""
    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # gone already
        try:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"process {pid} still runs after {timeout} s"
        finally:
            os.close(fd)


def wait_until(predicate, what: str, timeout: float = WAIT, watch: tuple = ()) -> None:
    """Wait for a condition another process brings about (checked every 10 ms); fail at once
    if one of the ``watch`` roles ends meanwhile."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for role in watch:
            if role.proc.poll() is not None:
                raise AssertionError(f"role {role.role} ended ({role.proc.returncode}) while waiting for "
                                     f"{what}: {summarize(role.reports())} {role.stderr[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def summarize(reports: list[dict]) -> list:
    """A role's reports, short: its counters and the last line of its error."""
    return [(r["event"], r.get("counters"), (r.get("error") or "").strip().splitlines()[-1:])
            for r in reports]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def endpoint(port: int) -> str:
    return f"tcp/127.0.0.1:{port}"


def record_lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def check_frames(rows, n: int = N) -> list[int]:
    """Every recorded frame is exactly what the sender sent (payload, timestamp, time range)
    and they came in strictly increasing order; returns their indices."""
    indices = [r[0] for r in rows]
    for k, crc, size, ts, time_range in rows:
        expected_ts, expected_range = stamp(k)
        assert (size, crc) == (n, checksum(k, n)), f"frame {k}: payload differs"
        assert ts == expected_ts, f"frame {k}: timestamp {ts}, sent {expected_ts}"
        assert time_range == expected_range, f"frame {k}: time range {time_range}, sent {expected_range}"
    assert all(a < b for a, b in zip(indices, indices[1:], strict=False)), "frames out of order or repeated"
    return indices


def block_command(domain: str, block: str, cmd: str) -> None:
    """A command to a block of a running graph, over its domain's bus (docs/control.md)."""
    with ShmManager(domain, create=False, name="test", reaper_interval=None) as m, Bus(m) as bus:
        answer = bus.request(f"ctl-{block}", {"cmd": cmd}, timeout=10).data
    assert answer["ok"], answer


def receiver_counters(domain: str) -> dict:
    with attach(domain, name="test") as graph:
        return graph.stats().blocks["rx"].counters


def sender_counters(domain: str) -> dict:
    with attach(domain, name="test") as graph:
        return graph.stats().blocks["tx"].counters


@pytest.fixture
def new_domain():
    """Fresh domain names; every segment of each is gone after the test (or removed)."""
    names = []

    def make() -> str:
        names.append(f"test-{uuid.uuid4().hex[:12]}")
        return names[-1]

    yield make
    leftovers = [path for name in names for path in domain_segments("mq.", name)]
    for path in leftovers:
        unlink_quietly(path)
    assert not leftovers, f"test left segments behind: {leftovers}"


@pytest.fixture
def roles(new_domain):
    """Start role processes, each in a new domain (call .ready()); any still running at the end
    is stopped (killed if need be) before the domains are checked."""
    started: list[Role] = []

    def start(role: str, key: str, *args, domain: str | None = None) -> Role:
        started.append(Role(role, domain or new_domain(), key, *args))
        return started[-1]

    yield start
    for role in started:
        role.stop()


@pytest.fixture
def key():
    return f"mqtest/{uuid.uuid4().hex}"


@pytest.fixture
def zenoh_session():
    """Open plain Zenoh sessions for the test (closed at the end)."""
    sessions = []

    def open_(**settings):
        sessions.append(open_session(ZenohSettings.of(settings)))
        return sessions[-1]

    yield open_
    for session in sessions:
        close_session(session)


# -- streams between two processes --------------------------------------------------------


def test_10000_frames_arrive_complete_exact_and_in_order(roles, key, tmp_path):
    port, rec = free_port(), tmp_path / "rec.txt"
    tx = roles("tx", key, "--listen", endpoint(port), "--count", 10_000, "--n", N).ready()
    rx = roles("rx", key, "--connect", endpoint(port), "--record", rec, "--n", N).ready()
    sent, got = tx.done(), rx.done()  # the receiver ends with the stream's end marker

    assert check_frames(read_record(rec)) == list(range(10_000))
    assert sent["counters"]["tx"]["sent"] == 10_000
    assert sent["counters"]["tx"]["unmatched"] == 0
    c = got["counters"]["rx"]
    assert (c["received"], c["lost"], c["dropped"], c["invalid"], c["next_seq"]) == (10_000, 0, 0, 0, 10_000)
    assert c["stream"] == sent["counters"]["tx"]["stream"] != 0


def test_a_killed_receiver_worker_restarts_and_the_stream_resumes(roles, key, tmp_path):
    port, rec = free_port(), tmp_path / "rec.txt"
    tx = roles("tx", key, "--listen", endpoint(port), "--count", 10_000, "--pace", 0.0001).ready()
    rx = roles("rx", key, "--connect", endpoint(port), "--record", rec, "--restart").ready()
    wait_until(lambda: record_lines(rec) >= 3000, "3000 frames recorded", watch=(tx, rx))
    os.kill(rx.pids["rx"], signal.SIGKILL)
    sent, got = tx.done(), rx.done()

    indices = check_frames(read_record(rec))
    assert indices[0] == 0 and indices[-1] == 9999, "the stream did not resume to its end"
    c = got["counters"]["rx"]
    missing = 10_000 - len(indices)
    assert c["received"] + c["lost"] == 10_000, c
    assert c["received"] == len(indices), c
    assert c["lost"] == missing, f"{missing} frames missing from the record, the receiver counted {c}"
    assert got["blocks"]["rx"]["restarts"] == 1
    assert len(got["failures"]) == 1 and "SIGKILL" in got["failures"][0] and "restarted" in got["failures"][0]
    assert sent["counters"]["tx"]["sent"] == 10_000


def test_a_receiver_killed_between_delivering_a_frame_and_counting_it_counts_exactly(roles, key, tmp_path):
    """The window a random kill rarely hits, hit on purpose: the frame delivered just
    before the kill is received (not lost, not counted twice)."""
    port, rec = free_port(), tmp_path / "rec.txt"
    tx = roles("tx", key, "--listen", endpoint(port), "--count", 10_000, "--pace", 0.0001).ready()
    rx = roles("rx", key, "--connect", endpoint(port), "--record", rec, "--restart",
               "--kill-after-send", 3000).ready()
    sent, got = tx.done(), rx.done()

    indices = check_frames(read_record(rec))
    assert 2999 in indices and indices[-1] == 9999  # the 3000th frame (number 2999) was delivered
    c = got["counters"]["rx"]
    assert (c["received"], c["lost"]) == (len(indices), 10_000 - len(indices)), c
    assert got["blocks"]["rx"]["restarts"] == 1
    assert sent["counters"]["tx"]["sent"] == 10_000


def test_a_killed_receiving_runtime_is_replaced_and_the_stream_resumes(roles, key, tmp_path):
    port, old_rec, new_rec = free_port(), tmp_path / "old.txt", tmp_path / "new.txt"
    tx = roles("tx", key, "--listen", endpoint(port), "--count", 10_000, "--pace", 0.0001).ready()
    old = roles("rx", key, "--connect", endpoint(port), "--record", old_rec).ready()
    wait_until(lambda: record_lines(old_rec) >= 3000, "3000 frames recorded", watch=(tx, old))
    os.kill(old.pid, signal.SIGKILL)
    old.proc.wait(timeout=WAIT)
    wait_for_exit(old.pids.values())  # its workers notice and leave on their own
    ShmManager.cleanup(old.domain)  # whatever the dead runtime left (DomainInUseError if anyone lives)
    assert not domain_segments("mq.", old.domain)

    new = roles("rx", key, "--connect", endpoint(port), "--record", new_rec, domain=old.domain).ready()
    sent, got = tx.done(), new.done()

    old_indices = check_frames(read_record(old_rec))
    new_indices = check_frames(read_record(new_rec))
    assert old_indices == list(range(len(old_indices))), "the first receiver lost frames while alive"
    assert new_indices and new_indices[0] > old_indices[-1] and new_indices[-1] == 9999
    gap = new_indices[0] - old_indices[-1] - 1  # in flight when it died, or sent while nobody listened
    c = got["counters"]["rx"]
    new_missing = (10_000 - new_indices[0]) - len(new_indices)
    assert c["received"] == len(new_indices) and c["lost"] == new_missing, c
    assert len(old_indices) + gap + c["received"] + c["lost"] == 10_000
    assert sent["counters"]["tx"]["sent"] == 10_000


# -- back-pressure --------------------------------------------------------------------------


def test_block_policy_with_a_slow_receiver_loses_nothing(roles, key, tmp_path):
    port, rec, n, count, delay = free_port(), tmp_path / "rec.txt", 16_384, 300, 0.003
    tx = roles("tx", key, "--listen", endpoint(port), "--count", count, "--n", n).ready()
    rx = roles("rx", key, "--connect", endpoint(port), "--record", rec, "--n", n, "--delay", delay,
               "--buffer", 4).ready()
    sent, got = tx.done(), rx.done()

    assert check_frames(read_record(rec), n) == list(range(count))
    c = got["counters"]["rx"]
    assert (c["received"], c["lost"], c["dropped"]) == (count, 0, 0)
    assert sent["counters"]["tx"]["sent"] == count
    # the sender was held back: its work() took a good part of the receiver's time
    assert sent["blocks"]["tx"]["work_s"] > 0.3 * count * delay, sent["blocks"]["tx"]


def test_drop_policy_with_a_slow_receiver_counts_every_loss(roles, key, tmp_path):
    port, rec, count = free_port(), tmp_path / "rec.txt", 1000
    tx = roles("tx", key, "--listen", endpoint(port), "--count", count, "--policy", "drop",
               "--hold-at", 0).ready()
    rx = roles("rx", key, "--connect", endpoint(port), "--record", rec, "--policy", "drop",
               "--buffer", 4, "--delay", 0.002).ready()
    tx.send("release")  # the receiver listens: every frame from the first on is its to count
    sent, got = tx.done(), rx.done()

    indices = check_frames(read_record(rec))
    c, s = got["counters"]["rx"], sent["counters"]["tx"]
    assert s["sent"] == count and s["unmatched"] == 0, s
    assert c["received"] == len(indices), c
    assert c["received"] + c["lost"] == count, (c, indices[:3])
    assert c["lost"] == count - len(indices), c
    assert c["dropped"] > 0 and c["lost"] >= c["dropped"], c
    assert c["next_seq"] == count  # the end marker accounted for losses at the end too


def test_drop_policy_counts_frames_dropped_before_the_first_delivery_as_lost(roles, key, tmp_path):
    """The whole stream reaches a receiver that is paused (its buffer keeps the newest 4 samples):
    the frames it dropped before it delivered one are lost too (received + lost == sent)."""
    port, rec, count = free_port(), tmp_path / "rec.txt", 200
    tx = roles("tx", key, "--listen", endpoint(port), "--count", count, "--policy", "drop",
               "--hold-at", 0, "--linger", 0.5).ready()
    rx = roles("rx", key, "--connect", endpoint(port), "--record", rec, "--policy", "drop",
               "--buffer", 4).ready()
    block_command(rx.domain, "rx", "pause")
    tx.send("release")
    sent = tx.done()  # every frame and the end marker are on their way (nobody read them: linger)
    block_command(rx.domain, "rx", "resume")
    got = rx.done()

    indices = check_frames(read_record(rec))
    c = got["counters"]["rx"]
    assert sent["counters"]["tx"]["sent"] == count and c["received"] == len(indices) < count, c
    assert c["dropped"] >= count - len(indices) - 1, c
    assert c["received"] + c["lost"] == count, (f"frames {indices[0]}.. delivered, {c['dropped']} dropped "
                                                f"from the buffer, but lost {c['lost']}: {c}")


def test_a_drop_sender_ahead_of_a_slow_receiver_still_ends_the_stream(roles, key, tmp_path):
    """A drop sender drops what the wire has no room for, but not its end marker: the receiver
    (block policy, slow) ends the stream, and counts the frames dropped at its end as lost."""
    port, rec, n, count = free_port(), tmp_path / "rec.txt", 16_384, 400
    tx = roles("tx", key, "--listen", endpoint(port), "--count", count, "--n", n, "--policy", "drop",
               "--hold-at", 0, "--linger", 1).ready()
    rx = roles("rx", key, "--connect", endpoint(port), "--record", rec, "--n", n, "--delay", 0.005,
               "--buffer", 4, "--duration", 10).ready()  # it needs about 2 s for the whole stream
    tx.send("release")
    sent, got = tx.done(), rx.expect("done")
    assert got["error"] is None, f"the receiver did not end: {got['counters']['rx']} ({got['error']})"
    indices = check_frames(read_record(rec), n)
    c = got["counters"]["rx"]
    assert sent["counters"]["tx"]["sent"] == count
    assert c["received"] == len(indices) and c["received"] + c["lost"] == count, c


class _FakePublisher:
    def __init__(self, session, congestion_control):
        self.session, self.congestion_control = session, congestion_control
        self.matching_status = type("Matching", (), {"matching": False})()

    def put(self, payload, *, attachment=None, **kwargs):
        self.session.puts.append((kwargs.get("congestion_control", self.congestion_control), attachment))


class _FakeSession:
    def __init__(self):
        self.puts = []

    def declare_publisher(self, key, *, congestion_control=None, **kwargs):
        return _FakePublisher(self, congestion_control)

    def put(self, key, payload, *, attachment=None, congestion_control=None, **kwargs):
        self.puts.append((congestion_control, attachment))

    def close(self):
        pass


class _FakeIO:
    """Counters of a block outside a runtime."""

    def __init__(self):
        self.values = {}

    def count(self, name, n=1):
        self.values[name] = self.values.get(name, 0) + n
        return self.values[name]

    def counter(self, name):
        return self.values.get(name, 0)

    def set_counter(self, name, value):
        self.values[name] = value


def test_the_end_marker_is_never_sent_droppable(monkeypatch):
    """Whatever the policy, the end marker is put with congestion control BLOCK: dropped, it
    would leave the receiving graph running for ever and the losses at the end uncounted."""
    import zenoh

    from multiqueue.net import bridge

    session = _FakeSession()
    monkeypatch.setattr(bridge, "open_session", lambda settings: session)
    sink = BridgeSink("a/b", policy="drop")
    sink.bind(_FakeIO())
    sink.initialize()
    sink.start()
    sink.stop()
    ends = [cc for cc, attachment in session.puts if attachment is not None and wire.decode(attachment).end]
    assert ends == [zenoh.CongestionControl.BLOCK], session.puts


# -- bad input --------------------------------------------------------------------------------


def _header(**change) -> bytes:
    """A valid header of a 256-float32 frame, with fields of the fixed part changed."""
    fields = dict(magic=wire.MAGIC, version=wire.VERSION, flags=0, stream=7, seq=0, ts=0, start=0, stop=0,
                  ndim=1, dtype=b"<f4", shape=(N,))
    fields.update(change)
    return (wire._FIXED.pack(fields["magic"], fields["version"], fields["flags"], fields["stream"],
                             fields["seq"], fields["ts"], fields["start"], fields["stop"], fields["ndim"],
                             len(fields["dtype"])) + fields["dtype"]
            + struct.pack(f"<{len(fields['shape'])}Q", *fields["shape"]))


GARBAGE = {  # name -> (payload, attachment or None)
    "no attachment": (b"hello", None),
    "empty attachment": (b"", b""),
    "wrong magic": (bytes(N * 4), _header(magic=b"XXXX")),
    "wrong version": (bytes(N * 4), _header(version=99)),
    "truncated header": (bytes(N * 4), _header()[:20]),
    "header cut in its shape": (bytes(N * 4), _header()[:-3]),
    "header with extra bytes": (bytes(N * 4), _header() + b"\0"),
    "payload too short": (bytes(N * 4 - 1), _header()),
    "payload too long": (bytes(N * 4 + 4), _header()),
    "unknown dtype": (bytes(N * 4), _header(dtype=b"<q9")),
    "object dtype": (bytes(N * 8), _header(dtype=b"|O")),
}
POISON = {  # headers wire.decode accepts (or chokes on) that describe no frame a sender can send
    "zero-size dtype S0": (b"", _header(dtype=b"|S0", shape=(3,))),
    "zero-size dtype V0, huge shape": (b"", _header(dtype=b"|V0", ndim=2, shape=(1 << 62, 1 << 62))),
    "deeply nested dtype JSON": (b"", _header(dtype=b"[" * 4000)),
}


def _put_garbage(publisher, samples) -> None:
    for payload, attachment in samples:
        publisher.put(payload, attachment=attachment)


@pytest.mark.parametrize("garbage", [GARBAGE, POISON], ids=["malformed", "poison"])
def test_garbage_on_the_key_is_counted_invalid_and_the_stream_goes_on(roles, key, tmp_path, zenoh_session,
                                                                      garbage):
    import zenoh

    port, rec, count, hold = free_port(), tmp_path / "rec.txt", 300, 150
    rx = roles("rx", key, "--listen", endpoint(port), "--record", rec).ready()
    session = zenoh_session(connect=[endpoint(port)])
    publisher = session.declare_publisher(key, congestion_control=zenoh.CongestionControl.BLOCK,
                                          reliability=zenoh.Reliability.RELIABLE)
    wait_until(lambda: publisher.matching_status.matching, "the receiver's subscriber")
    samples = list(garbage.values())
    _put_garbage(publisher, samples)  # before the stream
    tx = roles("tx", key, "--connect", endpoint(port), "--count", count, "--hold-at", hold).ready()
    wait_until(lambda: record_lines(rec) >= hold, f"{hold} frames recorded", watch=(tx, rx))
    _put_garbage(publisher, samples)  # between frames hold-1 and hold
    try:
        wait_until(lambda: receiver_counters(rx.domain)["invalid"] >= 2 * len(samples),
                   "the receiver to count the garbage", timeout=10, watch=(tx, rx))
    finally:
        tx.send("release")
    sent, got = tx.done(), rx.done()

    assert check_frames(read_record(rec)) == list(range(count))
    c = got["counters"]["rx"]
    assert (c["received"], c["lost"], c["invalid"]) == (count, 0, 2 * len(samples)), c
    assert sent["counters"]["tx"]["sent"] == count


def test_a_receiver_declared_int16_fails_on_float32_frames_naming_both(roles, key, new_domain):
    port = free_port()
    tx = roles("tx", key, "--listen", endpoint(port), "--count", 100_000, "--drain-timeout", 1).ready()
    rt = Runtime(new_domain())
    rx = rt.add(BridgeSource(key, dtype=np.int16, zenoh={"connect": [endpoint(port)]}), "rx")
    rt.connect(rx["out"], rt.add(NullSink(), "sink")["in"])
    rt.start()
    try:
        with pytest.raises(BlockError) as failure:
            assert not rt.wait(WAIT), "the receiver did not fail"
    finally:
        with contextlib.suppress(BlockError):  # raised again: the failure stopped the graph
            rt.stop()
    message = str(failure.value)
    assert "BridgeError" in message and "float32" in message and "int16" in message, message
    with contextlib.suppress(BrokenPipeError):
        tx.send("stop")  # the sender waits for a receiver that will not come back
    report = tx.expect("done")
    assert report["error"] is None and tx.proc.wait(timeout=WAIT) == 0
    assert report["counters"]["tx"]["sent"] < 100_000


# -- the wire format ------------------------------------------------------------------------------

STRUCTURED = np.dtype([("re", "<f4"), ("im", "<f4"), ("flags", "<u2", (3,)), ("name", "S5")])


@pytest.mark.parametrize("dtype", [np.float32, np.complex64, np.int16, ">i4", "<U3", "<M8[ns]", STRUCTURED],
                         ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (2, 3, 4), (1,) * wire.MAX_NDIM], ids=str)
@pytest.mark.parametrize("time_range", [None, (-5, 1 << 62)], ids=["no-range", "range"])
def test_wire_round_trip(dtype, shape, time_range):
    header = wire.encode(1 << 63, (1 << 64) - 1, -(1 << 63), time_range, dtype, shape)
    frame = wire.decode(header)
    assert frame == wire.FrameHeader(1 << 63, (1 << 64) - 1, -(1 << 63), time_range, np.dtype(dtype), shape)
    assert frame.nbytes == np.zeros(shape, dtype).nbytes
    wire.check_payload(frame, frame.nbytes)
    with pytest.raises(WireError, match="payload"):
        wire.check_payload(frame, frame.nbytes + 1)


@pytest.mark.parametrize("dtype", [
    np.dtype([("pos", [("x", "<f4"), ("y", "<f4")]), ("n", "<i8")]),  # nested fields
    np.dtype({"names": ["a", "b"], "formats": ["<i4", "<f8"], "offsets": [0, 8], "itemsize": 24}),  # padding
    np.dtype([("a", "<i1"), ("b", "<f8")], align=True),
], ids=["nested", "padded", "aligned"])
def test_wire_round_trip_of_structured_dtypes_a_sender_accepts(dtype):
    """Whatever encode() accepts, decode() gives back exactly (else a receiver counts real frames
    as invalid, or hands on a dtype with other field names)."""
    frame = wire.decode(wire.encode(1, 2, 3, None, dtype, (4,)))
    assert frame.dtype == dtype and frame.dtype.names == dtype.names and frame.nbytes == 4 * dtype.itemsize


def test_wire_end_marker():
    frame = wire.decode(wire.end_marker(42, 1234))
    assert frame.end and frame.stream == 42 and frame.seq == 1234 and frame.time_range is None
    wire.check_payload(frame, 0)
    with pytest.raises(WireError):
        wire.check_payload(frame, 1)
    assert not wire.decode(wire.encode(42, 0, 0, None, np.uint8, (0,))).end


def test_wire_refuses_what_cannot_cross():
    with pytest.raises(WireError, match="objects"):
        wire.encode(1, 0, 0, None, object, (2,))
    with pytest.raises(WireError, match="dimensions"):
        wire.encode(1, 0, 0, None, np.float32, (1,) * (wire.MAX_NDIM + 1))


def _decode_only_wire_errors(header: bytes, payload_size: int) -> None:
    """decode() and check_payload() raise WireError or nothing; what they accept is a frame a
    receiver can build."""
    try:
        frame = wire.decode(header)
        wire.check_payload(frame, payload_size)
    except WireError:
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"{type(e).__name__} (not WireError) decoding {header!r}: {e}") from e
    if frame.end or frame.nbytes > 1 << 20:
        return
    array = np.frombuffer(bytes(frame.nbytes), frame.dtype).reshape(frame.shape)  # what the receiver does
    assert array.shape == tuple(frame.shape)


def test_wire_random_and_mutated_headers_raise_only_wire_errors():
    rng = random.Random(20240611)
    valid = [wire.encode(3, 5, 7, (1, 2), np.float32, (N,)), wire.encode(3, 5, 7, None, STRUCTURED, (2, 3)),
             wire.encode(1, 0, 0, None, np.complex64, ()), wire.end_marker(9, 10)]
    for i in range(4000):
        base = bytearray(rng.choice(valid))
        mutation = i % 4
        if mutation == 0:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                base[rng.randrange(len(base))] = rng.randrange(256)
        elif mutation == 1:  # truncate
            del base[rng.randrange(len(base)):]
        elif mutation == 2:  # random bytes after a valid magic and version
            base = bytearray(wire.MAGIC + b"\x01\x00" + rng.randbytes(rng.randrange(80)))
        else:  # flip bytes of the fixed part, keep the magic: lengths, ndim, flags
            for _ in range(rng.randint(1, 3)):
                base[rng.randrange(4, wire._FIXED.size)] = rng.randrange(256)
        _decode_only_wire_errors(bytes(base), rng.choice([0, N * 4, rng.randrange(1 << 16)]))


@pytest.mark.parametrize("dtype_text", [b"[" * 4000, b"[" * 2000 + b"]" * 2000, b"|S0", b"|V0", b"[]"],
                         ids=["deep-json", "deep-json-closed", "S0", "V0", "no-fields"])
def test_wire_headers_describing_no_sendable_frame_raise_wire_errors(dtype_text):
    """A header a sender cannot have made must be a WireError (the receiver counts it invalid),
    not another exception and not a frame the receiver fails to build."""
    with pytest.raises(WireError):
        frame = wire.decode(_header(dtype=dtype_text, shape=(3,)))
        wire.check_payload(frame, 0)
        np.frombuffer(b"", frame.dtype).reshape(frame.shape)


# -- keys, policies, settings -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", "a/*", "a/**", "a/@x", "@mq", "a/$*", "/a", "a//b", "a/"])
@pytest.mark.parametrize("cls", [BridgeSink, BridgeSource])
def test_bad_keys_are_refused_clearly(cls, bad):
    with pytest.raises(BridgeError, match="bridge key"):
        cls(bad)


def test_non_string_key_is_refused():
    with pytest.raises(BridgeError, match="bridge key"):
        BridgeSink(None)


@pytest.mark.parametrize("cls", [BridgeSink, BridgeSource])
def test_bad_policy_is_refused(cls):
    with pytest.raises(ValueError, match="policy must be 'block' or 'drop', not 'drop_oldest'"):
        cls("a/b", policy="drop_oldest")


@pytest.mark.parametrize("buffer", [0, -1])
def test_bad_receive_buffer_is_refused(buffer):
    with pytest.raises(ValueError, match="buffer must be at least 1"):
        BridgeSource("a/b", buffer=buffer)


@pytest.mark.parametrize("settings, error, match", [
    ({"mode": "server"}, ValueError, "zenoh mode must be one of peer, client, router"),
    ({"connect": ["127.0.0.1:7447"]}, ValueError, "endpoints like 'tcp/127.0.0.1:7447'"),
    ({"listen": [7447]}, ValueError, "zenoh listen"),
    ({"scouting": "yes"}, ValueError, "scouting must be true or false"),
    ({"conect": ["tcp/1.2.3.4:7447"]}, ValueError, "unknown zenoh setting.*conect.*known: .*connect"),
    (["tcp/1.2.3.4:7447"], TypeError, "a mapping or ZenohSettings, not list"),
])
def test_bad_zenoh_settings_are_refused_clearly(settings, error, match):
    with pytest.raises(error, match=match):
        ZenohSettings.of(settings)
    with pytest.raises(error, match=match):
        BridgeSink("a/b", zenoh=settings)


def test_zenoh_settings_forms():
    assert ZenohSettings.of(None) == ZenohSettings()
    s = ZenohSettings.of({"connect": "tcp/127.0.0.1:7447"})
    assert s.connect == ("tcp/127.0.0.1:7447",) and ZenohSettings.of(s) is s
    config = s.to_config()
    assert json.loads(config.get_json("connect/endpoints")) == ["tcp/127.0.0.1:7447"]
    assert json.loads(config.get_json("scouting/multicast/enabled")) is False
    default = ZenohSettings().to_config()
    assert json.loads(default.get_json("listen/endpoints")) == ["tcp/127.0.0.1:0"]


def test_a_session_that_cannot_open_says_which_settings_failed():
    with pytest.raises(BridgeError, match="could not open a Zenoh session with"):
        open_session(ZenohSettings(listen=["tcp/256.0.0.1:1"]))
