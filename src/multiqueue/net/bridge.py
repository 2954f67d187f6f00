"""Bridge blocks: a port's frames to a Zenoh key (BridgeSink), and from a key back into
a port of another domain (BridgeSource), on another or the same machine.

Each frame is one Zenoh put (its bytes, and its header as the attachment: ``wire``);
sequence numbers let the receiver count what it lost.  Back-pressure policies, the
counters and the end of a stream: docs/network.md, "Bridge blocks".
"""

import collections
import json
import logging
import secrets
import threading
import time

import numpy as np

from ..checks import check_int, check_number
from ..errors import BridgeError
from ..graph.block import DONE, OK, Block, Port
from . import wire
from .settings import ZenohSettings, close_session, import_zenoh, json_replies, open_session

POLICIES = ("block", "drop")
_WAIT_SLICE_S = 0.05  # how often a waiting sender looks at the stop flag
_log = logging.getLogger("mq.bridge")


def check_key(key: str) -> str:
    zenoh = import_zenoh()
    if not isinstance(key, str) or not key or "@" in key:
        raise BridgeError(f"bridge key {key!r}: a Zenoh key expression such as 'lab/radio/iq' "
                          "(no '@': multiqueue keeps '@mq' chunks for itself)")
    try:
        zenoh.KeyExpr(key)
    except Exception as e:  # noqa: BLE001 - zenoh says why the key is invalid
        raise BridgeError(f"bridge key {key!r} is not a valid Zenoh key expression: {e}") from None
    if any(c in key for c in "*$"):
        raise BridgeError(f"bridge key {key!r}: a bridge publishes/subscribes one key, no wildcards")
    return key


def _check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"bridge policy must be 'block' or 'drop', not {policy!r}")
    return policy


def receiver_key(key: str, receiver: str = "*") -> str:
    """Where a receiver of ``key`` answers progress queries."""
    return f"{key}/@mq/rx/{receiver}"


class BridgeSink(Block):
    """Publishes every frame of its input on the Zenoh key ``key`` (see the module doc).

    ``linger`` (seconds, a number >= 0): how long the end of the stream waits for the
    receivers to report every frame.  Counters: ``sent`` frames put on the wire,
    ``unmatched`` frames sent while no receiver listened (policy drop), ``wait_ms`` time
    spent waiting for a receiver, ``seq`` the next sequence number, ``stream`` this
    stream's id (a restarted sender goes on with the same stream and numbers).
    """

    inputs = {"in": Port()}
    counters = ("sent", "unmatched", "wait_ms", "seq", "stream")

    def __init__(self, key: str, *, policy: str = "block", zenoh=None, linger: float = 10.0,
                 express: bool = False):
        super().__init__()
        self.key, self.policy = check_key(key), _check_policy(policy)
        self.zenoh, self.express = ZenohSettings.of(zenoh), bool(express)
        self.linger = check_number("linger", linger, minimum=0)
        self._session = self._publisher = None

    def initialize(self) -> None:
        zenoh = import_zenoh()
        self._session = open_session(self.zenoh)
        congestion = zenoh.CongestionControl.BLOCK if self.policy == "block" else zenoh.CongestionControl.DROP
        self._publisher = self._session.declare_publisher(
            self.key, congestion_control=congestion, reliability=zenoh.Reliability.RELIABLE,
            express=self.express)

    def start(self) -> None:
        if self.counter("stream") == 0:  # a first start (a restart keeps its stream and numbers)
            self.set_counter("stream", secrets.randbits(62) + 1)
        self._stream = self.counter("stream")

    def work(self, inputs):
        for frame in inputs["in"]:
            if not self._receiver_ready():
                return OK  # stopping: the frames left are not sent
            array = frame.array
            seq = self.counter("seq")
            header = wire.encode(self._stream, seq, frame.timestamp, frame.time_range, array.dtype,
                                 array.shape)
            self._publisher.put(array.tobytes(), attachment=header)  # the one copy out of the pool block
            self.set_counter("seq", seq + 1)
            self.count("sent")
        return OK

    def _matched(self) -> bool:
        return self._publisher.matching_status.matching

    def _receiver_ready(self) -> bool:
        """Block policy: wait while no receiver listens.  Drop: count the frame if none does."""
        if self._matched():
            return True
        if self.policy == "drop":
            self.count("unmatched")
            return True
        t0 = time.monotonic()
        try:
            while not self._matched():
                if not self.sleep(_WAIT_SLICE_S):
                    return False
            return True
        finally:
            self.count("wait_ms", int((time.monotonic() - t0) * 1000))

    def stop(self) -> None:
        if self._publisher is None:
            return
        sent = self.counter("seq")
        zenoh = import_zenoh()  # the end marker is never dropped, whatever the policy
        self._session.put(self.key, b"", attachment=wire.end_marker(self._stream, sent),
                          congestion_control=zenoh.CongestionControl.BLOCK)
        self._await_receivers(sent)

    def _await_receivers(self, sent: int) -> None:
        """Until every receiver of this stream says it has all ``sent`` frames (or linger)."""
        deadline = time.monotonic() + self.linger
        while time.monotonic() < deadline and self._matched():
            behind = [p for p in self.receivers() if p.get("stream") == self._stream and p["next_seq"] < sent]
            if not behind and self._matched():
                return
            time.sleep(_WAIT_SLICE_S)
        if self._matched():
            _log.warning("%s: receivers still behind after %.1f s at the end of the stream", self.key,
                         self.linger)

    def receivers(self, timeout: float = 1.0) -> list[dict]:
        """Progress reports of the receivers of this key: ``{"stream", "next_seq", ...}``."""
        replies = self._session.get(receiver_key(self.key), timeout=timeout)
        return [report for _, report in json_replies(replies) if isinstance(report, dict)]

    def cleanup(self) -> None:
        if self._session is not None:
            close_session(self._session)
        self._session = self._publisher = None


class BridgeSource(Block):
    """Frames from the Zenoh key ``key`` into its output, as a BridgeSink sent them:
    same bytes, dtype, shape, timestamp and time range (see the module doc).

    ``dtype`` / ``shape`` declare the output port (checked when connecting; a
    frame that does not match fails the block with a clear error).  ``buffer`` (an
    int >= 1) frames wait between Zenoh and the block.  Counters: ``received`` frames,
    ``lost`` gaps in the sequence (the stream's frames this receiver never got,
    counted from its first frame on, over restarts of this block), ``dropped``
    (policy drop: no room), ``invalid`` samples that were not bridged frames (logged),
    ``next_seq`` and ``stream`` (where a restarted receiver goes on from), ``seq_base``.

    Exact over a SIGKILL: the frames delivered are the output queue's push count (kept
    in C with each push, see Block.pushed), and the next expected sequence number is
    ``seq_base + delivered + lost``, each term changed by one write.  So a receiver
    killed between delivering a frame and counting it neither counts it twice nor as
    lost: ``received + lost`` is the stream's length.
    """

    counters = ("received", "lost", "dropped", "invalid", "next_seq", "stream", "seq_base")

    def __init__(self, key: str, *, dtype=None, shape=None, policy: str = "block", zenoh=None,
                 buffer: int = 64, end: bool = True):
        super().__init__()
        self.key, self.policy = check_key(key), _check_policy(policy)
        self.port = Port(dtype, shape)
        self.zenoh, self.buffer, self.end = ZenohSettings.of(zenoh), check_int("buffer", buffer), bool(end)
        if self.buffer < 1:
            raise ValueError(f"buffer must be at least 1 frame, not {buffer}")
        self._session = None

    def output_ports(self):
        return {"out": self.port}

    def initialize(self) -> None:
        self._samples = collections.deque()
        self._ready = threading.Condition()
        self._closing = False
        self._dropped = 0  # written by Zenoh's thread, turned into the counter by work()
        self._first = None  # (stream, seq) of the first sample Zenoh handed us: where we joined
        self._progress = {"next_seq": 0, "stream": 0, "ended": False}
        self._session = open_session(self.zenoh)
        self._progress_key = receiver_key(self.key, secrets.token_hex(8))
        self._queryable = self._session.declare_queryable(self._progress_key, self._answer_progress)
        self._subscriber = self._session.declare_subscriber(self.key, self._on_sample)

    def start(self) -> None:
        self._dropped_before = self.counter("dropped")
        # a restarted block: the shown counters as of the last frame its predecessor delivered
        self.set_counter("received", self.pushed("out"))
        if self.counter("stream"):
            self.set_counter("next_seq", self._expected())
        self._progress.update(next_seq=self.counter("next_seq"), stream=self.counter("stream"))

    # -- Zenoh's threads ----------------------------------------------------------------

    def _on_sample(self, sample) -> None:
        attachment = sample.attachment
        item = (attachment.to_bytes() if attachment is not None else b"", sample.payload.to_bytes())
        if self._first is None:
            self._first = wire.peek_position(item[0])
        with self._ready:
            if self.policy == "block":  # hold Zenoh's thread: the wire backs up to the sender
                while len(self._samples) >= self.buffer and not self._closing:
                    self._ready.wait(_WAIT_SLICE_S)
                if self._closing:
                    return
            elif len(self._samples) >= self.buffer:
                self._samples.popleft()
                self._dropped += 1
            self._samples.append(item)
            self._ready.notify_all()

    def _answer_progress(self, query) -> None:
        query.reply(self._progress_key, json.dumps(self._progress))  # our own key, not the query's wildcard

    # -- the block's thread -------------------------------------------------------------

    def work(self, inputs):
        with self._ready:
            if not self._samples:
                self._ready.wait(_WAIT_SLICE_S)
            taken = [self._samples.popleft() for _ in range(min(self.batch, len(self._samples)))]
            self._ready.notify_all()
            dropped = self._dropped
        if dropped:
            self.set_counter("dropped", self._dropped_before + dropped)
        for attachment, payload in taken:
            if self._deliver(attachment, payload) is DONE:
                return DONE
        return OK

    def _deliver(self, attachment: bytes, payload: bytes):
        try:
            header = wire.decode(attachment)
            wire.check_payload(header, len(payload))
        except wire.WireError as e:
            if self.count("invalid") <= 10 or self.counter("invalid") % 1000 == 0:
                _log.warning("%s: a sample that is not a bridged frame: %s", self.key, e)
            return OK
        if not self._in_sequence(header):
            return OK
        if header.end:
            self._progress["ended"] = True
            _log.info("%s: the stream ended after %d frames", self.key, header.seq)
            return DONE if self.end else OK
        self._check_port(header)
        out = self.allocate("out", header.shape, header.dtype)
        out.array[...] = np.frombuffer(payload, header.dtype).reshape(header.shape)  # the copy in
        self.send("out", out, timestamp=header.timestamp, time_range=header.time_range)
        self.set_counter("received", self.pushed("out"))  # shown; the push count itself is the truth
        self.set_counter("next_seq", header.seq + 1)
        self._progress["next_seq"] = header.seq + 1
        return OK

    def _expected(self) -> int:
        """The next sequence number: one word per term (see the class doc)."""
        return self.counter("seq_base") + self.pushed("out") + self.counter("lost")

    def _in_sequence(self, header: wire.FrameHeader) -> bool:
        """Counts gaps; False for a frame already had (a duplicate or a reordering)."""
        if header.stream != self.counter("stream"):
            start = header.seq
            if self.counter("stream") != 0:
                _log.warning("%s: a new stream (the sender restarted) at frame %d", self.key, header.seq)
            else:  # where we joined: the first frame that reached us, even if dropped for want of room
                first = self._first
                start = first[1] if first is not None and first[0] == header.stream else header.seq
                _log.info("%s: joined the stream at frame %d", self.key, start)
            # the base first: a kill before the stream word is written redoes all of this
            self.set_counter("seq_base", start - self.pushed("out") - self.counter("lost"))
            self.set_counter("stream", header.stream)
            self.set_counter("next_seq", start)
            self._progress.update(stream=header.stream, next_seq=start, ended=False)
        expected = self._expected()
        if header.seq < expected:
            _log.warning("%s: frame %d came again or late (expected %d); ignored", self.key, header.seq,
                         expected)
            return False
        if header.seq > expected:
            self.count("lost", header.seq - expected)
            _log.warning("%s: lost frames %d..%d", self.key, expected, header.seq - 1)
            self.set_counter("next_seq", header.seq)
            self._progress["next_seq"] = header.seq
        return True

    def _check_port(self, header: wire.FrameHeader) -> None:
        port = self.port
        if port.dtype is not None and header.dtype != port.dtype:
            raise BridgeError(f"{self.key}: frame {header.seq} carries {header.dtype}, but this "
                              f"BridgeSource's port is declared {port.dtype}; fix dtype= or the sender")
        if port.shape is not None and tuple(header.shape) != tuple(port.shape):
            raise BridgeError(f"{self.key}: frame {header.seq} has shape {header.shape}, but this "
                              f"BridgeSource's port is declared {port.shape}")

    def stop(self) -> None:
        self._close_wire()

    def cleanup(self) -> None:
        self._close_wire()
        if self._session is not None:
            close_session(self._session)
        self._session = None

    def _close_wire(self) -> None:
        if self._session is None:
            return
        with self._ready:
            self._closing = True  # a Zenoh thread waiting for room gives up
            self._ready.notify_all()
