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
_MAX_GAP = 1 << 32  # frames a real gap may span (a receiver's restart, a drop sender); beyond: forged
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
    stream whose first frame does not match fails the block with a clear error).
    ``buffer`` (an int >= 1) frames wait between Zenoh and the block.  Counters:
    ``received`` frames, ``lost`` gaps in the sequence (the stream's frames this
    receiver never got, counted from its first frame on, over restarts of this block),
    ``dropped`` (policy drop: no room), ``invalid`` samples not taken as frames of the
    followed stream (logged), ``next_seq`` and ``stream`` (where a restarted receiver
    goes on from), ``seq_base``.

    One stream at a time: samples of another stream id are invalid until the followed
    one ended or sent nothing for ``switch_after`` seconds (a number >= 0; a new run of
    the sender that could not send its end marker).  Within the stream a number
    already had, one beyond any real gap, an end marker below the next number, or a
    misfit of a stream whose frames fitted so far is invalid, and a frame ahead of the
    next number (a gap) is held until a later frame of the stream confirms it.  Zenoh
    names no sample's publisher, so this stops a second publisher that does not race
    the stream's own next numbers; only access control stops one that does.

    Exact over a SIGKILL: the frames delivered are the output queue's push count (kept
    in C with each push, see Block.pushed), and the next expected sequence number is
    ``seq_base + delivered + lost``, each term changed by one write.  So a receiver
    killed between delivering a frame and counting it neither counts it twice nor as
    lost: ``received + lost`` is the stream's length.
    """

    counters = ("received", "lost", "dropped", "invalid", "next_seq", "stream", "seq_base")

    def __init__(self, key: str, *, dtype=None, shape=None, policy: str = "block", zenoh=None,
                 buffer: int = 64, end: bool = True, switch_after: float = 5.0):
        super().__init__()
        self.key, self.policy = check_key(key), _check_policy(policy)
        self.port = Port(dtype, shape)
        self.zenoh, self.buffer, self.end = ZenohSettings.of(zenoh), check_int("buffer", buffer), bool(end)
        if self.buffer < 1:
            raise ValueError(f"buffer must be at least 1 frame, not {buffer}")
        self.switch_after = check_number("switch_after", switch_after, minimum=0)
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
        self._held = None  # (header, payload) of a frame ahead of the sequence, until a later one comes
        self._heard = time.monotonic()  # the followed stream's last frame (a restart gives it switch_after)
        self._fitted = self.counter("stream") if self.pushed("out") else 0  # a stream whose frames fit
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
        """One sample: delivered, held (ahead of the sequence), or counted invalid."""
        try:
            header = wire.decode(attachment)
            wire.check_payload(header, len(payload))
        except wire.WireError as e:
            return self._invalid("a sample that is not a bridged frame: %s", e)
        if header.stream != self.counter("stream") and not self._switch(header):
            return self._invalid("frame %d of stream %x while stream %x is followed", header.seq,
                                 header.stream, self.counter("stream"))
        expected = self._expected()
        if not expected <= header.seq <= expected + _MAX_GAP:
            return self._invalid("frame %d (end %s) is no frame to come (expected %d)", header.seq,
                                 header.end, expected)
        if not header.end and not self._fits(header):
            return self._invalid("frame %d (%s %s) does not fit the port", header.seq, header.dtype,
                                 header.shape)
        if self._held is not None:
            self._settle_held(header.seq)
        if header.end:
            return self._end(header)
        if header.seq > self._expected():  # a gap: a lone frame ahead is a forger's until a later one follows
            self._held = (header, payload)
            return OK
        self._push(header, payload)
        return OK

    def _invalid(self, why: str, *args):
        if self.count("invalid") <= 10 or self.counter("invalid") % 1000 == 0:
            _log.warning("%s: " + why + "; ignored", self.key, *args)
        return OK

    def _settle_held(self, seq: int) -> None:
        """The held frame is the stream's if the next sample of the stream comes after it."""
        held, self._held = self._held, None
        if seq > held[0].seq:
            self._push(*held)
        else:
            self._invalid("frame %d, ahead of the sequence, was followed by frame %d", held[0].seq, seq)

    def _push(self, header: wire.FrameHeader, payload: bytes) -> None:
        expected = self._expected()
        if header.seq > expected:
            self.count("lost", header.seq - expected)
            _log.warning("%s: lost frames %d..%d", self.key, expected, header.seq - 1)
        out = self.allocate("out", header.shape, header.dtype)
        out.array[...] = np.frombuffer(payload, header.dtype).reshape(header.shape)  # the copy in
        self.send("out", out, timestamp=header.timestamp, time_range=header.time_range)
        self.set_counter("received", self.pushed("out"))  # shown; the push count itself is the truth
        self.set_counter("next_seq", header.seq + 1)
        self._progress["next_seq"] = header.seq + 1
        self._fitted, self._heard = header.stream, time.monotonic()

    def _end(self, header: wire.FrameHeader):
        expected = self._expected()
        if header.seq > expected:
            self.count("lost", header.seq - expected)
            _log.warning("%s: lost frames %d..%d at the end", self.key, expected, header.seq - 1)
            self.set_counter("next_seq", header.seq)
        self._progress.update(next_seq=header.seq, ended=True)
        self._heard = time.monotonic()
        _log.info("%s: the stream ended after %d frames", self.key, header.seq)
        return DONE if self.end else OK

    def _expected(self) -> int:
        """The next sequence number: one word per term (see the class doc)."""
        return self.counter("seq_base") + self.pushed("out") + self.counter("lost")

    def _switch(self, header: wire.FrameHeader) -> bool:
        """Follow the stream of ``header`` if none is followed, or the followed one ended or
        has been silent for ``switch_after`` seconds (a new run of the sender)."""
        followed = self.counter("stream")
        if followed and not self._progress["ended"] and time.monotonic() - self._heard < self.switch_after:
            return False
        start = header.seq
        if followed:
            _log.warning("%s: a new stream (a new run of the sender) at frame %d", self.key, header.seq)
        else:  # where we joined: the first frame that reached us, even if dropped for want of room
            first = self._first
            if first is not None and first[0] == header.stream and 0 <= header.seq - first[1] <= _MAX_GAP:
                start = first[1]
            _log.info("%s: joined the stream at frame %d", self.key, start)
        if self._held is not None:  # never confirmed: the stream left is not followed any more
            self._invalid("frame %d of the stream left was held", self._held[0].seq)
            self._held = None
        # the base first: a kill before the stream word is written redoes all of this
        self.set_counter("seq_base", start - self.pushed("out") - self.counter("lost"))
        self.set_counter("stream", header.stream)
        self.set_counter("next_seq", start)
        self._progress.update(stream=header.stream, next_seq=start, ended=False)
        self._heard = time.monotonic()
        return True

    def _fits(self, header: wire.FrameHeader) -> bool:
        """Whether a frame fits the port.  A misfit of a stream whose frames fitted so far is
        a forger's (False); else the sender is misconfigured (BridgeError fails the block)."""
        port = self.port
        if port.dtype is not None and header.dtype != port.dtype:
            problem = (f"carries {header.dtype}, but this BridgeSource's port is declared {port.dtype}; "
                       "fix dtype= or the sender")
        elif port.shape is not None and tuple(header.shape) != tuple(port.shape):
            problem = f"has shape {header.shape}, but this BridgeSource's port is declared {port.shape}"
        else:
            return True
        if self._fitted == header.stream:
            return False
        raise BridgeError(f"{self.key}: frame {header.seq} {problem}")

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
