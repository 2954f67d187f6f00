"""The message bus: small messages between the processes of a domain, by topic.

A topic is a PortQueue of the domain (``b-<topic>``), a message a block of its
``mq-bus`` pool (a 24-byte header and the payload: bytes or a JSON-able object);
every subscriber is a ``drop_oldest`` reader, so a stuck one never blocks a
publisher. Publish/subscribe, inboxes, request/reply and what happens to messages
that cannot be decoded: docs/control.md, "Message bus".
"""

import itertools
import json
import logging
import os
import struct
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass

from ..checks import bad_timeout, check_capacity, check_int, check_timeout
from ..errors import DomainFullError, MessageTooLargeError, MultiQueueError, QueueClosedError
from ..shm import BufferPool, PoolConfig, ShmManager
from ..shm.layout import MAX_CHUNKS
from ..stream.queue import PortQueue
from .topics import check_topic, inbox_topic

BUS_POOL = "mq-bus"
BLOCK = 4096
HEADER = struct.Struct("<BBHIQQ")  # kind, reserved, payload length, sender pid, sequence, request id
MAX_MESSAGE = BLOCK - HEADER.size
_BODY = HEADER.size
KIND_BYTES, KIND_JSON = 0, 1
_CLOSE_TICK_S = 0.05
_REPLY_TOPICS_KEPT = 32
MIN_POOL_BLOCKS = 64
_bus_ids = itertools.count()  # tells apart the reply topics of two Bus objects of a process
DEFAULT_CAPACITY = 64
MAX_CAPACITY = 4096  # so that a few stuck subscribers cannot drain the bus pool
_log = logging.getLogger("mq.bus")


@dataclass(frozen=True)
class Message:
    topic: str
    data: object  # bytes, or the JSON object that was published
    sender_pid: int
    seq: int  # the sender's sequence number (per Bus object)
    timestamp: int  # monotonic ns at publish
    rid: int = 0  # a request's id, echoed by its answer (0: neither)

    def reply_to(self) -> str | None:
        """The topic a request asks its answer on (see Bus.request)."""
        return self.data.get("reply_to") if isinstance(self.data, dict) else None


class _InvalidMessage(Exception):
    """A bus block that is not a message Bus.publish wrote (skipped by subscribers)."""


class Subscription:
    """A subscriber's bounded queue on one topic (see Bus.subscribe)."""

    def __init__(self, bus: "Bus", topic: str, capacity: int | None, callback=None):
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be None or a callable taking a Message, not "
                            f"{type(callback).__name__}")
        self.bus, self.topic = bus, topic
        self._invalid = 0
        self._queue = bus._topic(topic, DEFAULT_CAPACITY if capacity is None else capacity)
        if capacity is not None and capacity != self._queue.capacity:
            self._queue = None
            raise ValueError(
                f"topic {topic!r} exists with capacity {bus._topic(topic).capacity}: every subscriber "
                "of a topic has the capacity of its first user; subscribe with capacity=None")
        self._reader = self._queue.reader("drop_oldest", "latest", watch_producer=False)
        self._thread = None
        self._closed = threading.Event()
        if callback is not None:
            self._thread = threading.Thread(target=self._deliver, args=(callback,),
                                            name=f"mq-bus-{topic}", daemon=True)
            self._thread.start()

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or None after ``timeout`` seconds (None: wait forever), or
        None at once once the subscription is closed.  Invalid messages on the way are
        skipped (counted in ``invalid``; see the module docstring)."""
        if self._closed.is_set():
            return None
        deadline = None  # for what is left of a waiting timeout after a skip (pop checks the timeout)
        if timeout:
            if bad_timeout(timeout):
                check_timeout(timeout)
            deadline = time.monotonic() + timeout
        while True:
            try:
                buffer = self._reader.pop(timeout)
            except TimeoutError:
                return None
            except QueueClosedError:  # its queue was released (manager shut down) or closed: over
                self._closed.set()
                return None
            try:
                with buffer:
                    return _decode(self.topic, buffer)
            except _InvalidMessage as e:
                self._skipped(str(e))
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())

    def __iter__(self):
        while not self._closed.is_set():
            message = self.get(timeout=0.25)
            if message is not None:
                yield message

    @property
    def drops(self) -> int:
        """Messages this subscriber lost because it read too slowly."""
        return self._reader.drops

    @property
    def invalid(self) -> int:
        """Messages this subscriber skipped because they could not be read (not written
        by Bus.publish; see the module docstring)."""
        return self._invalid

    @property
    def pending(self) -> int:
        return self._reader.lag

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._reader.detach()
        self.bus._forget_subscription(self)

    def _deliver(self, callback) -> None:
        # the timeout bounds how long close() waits for this thread (a detach from another
        # thread could free the reader slot for someone else while we still pop from it)
        while not self._closed.is_set():
            try:
                message = self.get(timeout=_CLOSE_TICK_S)
            except MultiQueueError as e:  # an item of the ring that is no buffer (InvalidBufferError)
                self._skipped(f"{type(e).__name__}: {e}")
                continue
            if message is None:
                continue
            try:
                callback(message)
            except Exception:  # noqa: BLE001 - a failing callback must not end the subscription
                traceback.print_exc()

    def _skipped(self, reason: str) -> None:
        self._invalid += 1
        n = self._invalid
        if not n & (n - 1):  # the 1st, 2nd, 4th, ...: a flood of garbage cannot flood the log
            _log.warning("bus topic %r: skipped an invalid message (%s); %d skipped by this subscriber",
                         self.topic, reason, n)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Subscription {self.topic!r} pending={self.pending} drops={self.drops} "
                f"invalid={self.invalid}>")


class Bus:
    """A process's access to the message bus of a domain (thread-safe).

    ``pool_blocks`` (>= 1) and ``max_pool_blocks`` (>= MIN_POOL_BLOCKS) size the
    domain's ``mq-bus`` pool when this Bus is the first to need it: its first and
    its largest number of 4 KiB blocks (fewer if the domain has no room for them).
    """

    def __init__(self, manager: ShmManager, *, pool_blocks: int = 256, max_pool_blocks: int = 8192):
        if not isinstance(manager, ShmManager):
            raise TypeError(f"manager must be a ShmManager of the domain, not {type(manager).__name__}")
        self.manager = manager
        self._pool_blocks = check_int("pool_blocks", pool_blocks, 1)
        self._max_pool_blocks = check_int("max_pool_blocks", max_pool_blocks, MIN_POOL_BLOCKS)
        self._topics: dict[str, PortQueue] = {}
        self._subscriptions: list[Subscription] = []
        self._lock = threading.Lock()
        self._seq = itertools.count(1)  # 0 stands for "no request id" in the header
        self._closed = False
        self._request_lock = threading.Lock()
        self._replies: Subscription | None = None  # this Bus's reply topic, made at its first request
        self._reply_topics: dict[str, PortQueue] = {}  # requesters' reply topics this Bus answered
        self._pool = self._bus_pool()

    def publish(self, topic: str, data, *, timeout: float | None = 1.0, keep: bool = True) -> None:
        """Send ``data`` (bytes-like or JSON-able) to every subscriber of ``topic``;
        nobody listening costs nothing.  Waits up to ``timeout`` seconds (None or a
        number >= 0; None: forever) for a free bus block.
        ``keep=False`` unmaps the topic afterwards (for one-off topics)."""
        self._check_open()
        if bad_timeout(timeout):  # checked here: only a full pool waits, and says nothing before
            check_timeout(timeout)
        queue = self._topic(topic) if keep else self._one_off(topic)
        try:
            self._publish_to(queue, data, timeout)
        finally:
            if not keep:
                queue.release()

    def _publish_to(self, queue: PortQueue, data, timeout, rid: int = 0) -> None:
        kind, body = _encode(data)
        buffer = self._pool.allocate(HEADER.size + max(1, len(body)), timeout)  # by id: no name lookup
        try:
            view = buffer.memoryview()
            HEADER.pack_into(view, 0, kind, 0, len(body), os.getpid(), next(self._seq), rid)
            view[HEADER.size : HEADER.size + len(body)] = body
            queue.push(buffer, timeout=0)  # drop_oldest readers only: never full
        except BaseException:
            if not buffer.released:
                buffer.release()
            raise

    def subscribe(self, topic: str, callback=None, *, capacity: int | None = None) -> Subscription:
        """A subscription to ``topic``: ``get()`` / iterate it, or pass ``callback`` (a
        callable taking a Message) to have each message handed to it on a thread of its
        own.  Only messages published after this call are seen.  ``capacity`` (None, or
        a power of two from 1 to MAX_CAPACITY) is the topic's, set by its first user
        (None: DEFAULT_CAPACITY for a new topic, any for an existing one): each
        subscriber holds at most that many unread messages, then loses its oldest."""
        self._check_open()
        sub = Subscription(self, topic, capacity, callback)
        with self._lock:
            self._subscriptions.append(sub)
        return sub

    def send(self, target: str, data) -> None:
        """A point-to-point message to a block or process's inbox (``inbox(target)``;
        ``target``: 1-26 letters, digits, '_' or '-')."""
        self.publish(inbox_topic(target), data)

    def inbox(self, name: str, callback=None) -> Subscription:
        """This process's (or block's) inbox: what ``send(name, ...)`` delivers."""
        return self.subscribe(inbox_topic(name), callback)

    def request(self, topic: str, data: dict, timeout: float | None = 5.0) -> Message:
        """Publish ``data`` (a dict; it gets the keys ``reply_to`` and ``rid``) with a
        ``reply_to`` topic and wait up to ``timeout`` seconds (None or a number >= 0;
        None: forever) for the one answer.  TimeoutError if none comes (nobody serves
        ``topic``).  The answers come back on this Bus's own reply topic, matched by a
        request id (one request at a time)."""
        check_topic(topic)
        if not isinstance(data, Mapping):
            raise TypeError(f"request data must be a dict (it gets 'reply_to' and 'rid' keys), not "
                            f"{type(data).__name__}")
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        with self._request_lock:
            replies = self._reply_subscription()
            rid = next(self._seq)
            self.publish(topic, {**data, "reply_to": replies.topic, "rid": rid})
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                answer = replies.get(left)
                if answer is None:
                    break
                if answer.rid == rid:
                    return answer
                # a late answer to an earlier request that timed out: not ours
        raise TimeoutError(f"no answer on topic {topic!r} within {timeout} s: is anyone serving it?")

    def reply(self, request: Message, data) -> None:
        """Answer a request (no-op if it asked for no answer or no longer waits)."""
        if not isinstance(request, Message):
            raise TypeError(f"reply() answers a request Message, not {type(request).__name__}")
        topic = request.reply_to()
        if not topic:
            return
        try:
            rid = request.data.get("rid")
            self._publish_to(self._reply_queue(topic), data, 1.0, rid if isinstance(rid, int) else 0)
        except MultiQueueError:
            pass  # the requester has gone and removed its reply topic

    def _reply_subscription(self) -> Subscription:
        if self._replies is None:
            self._replies = self.subscribe(f"re-{os.getpid()}-{next(_bus_ids)}", capacity=64)
        return self._replies

    def _reply_queue(self, topic: str) -> PortQueue:
        """The reply topic of a requester, kept mapped for its next requests (a few)."""
        check_topic(topic)
        with self._lock:
            q = self._reply_topics.pop(topic, None)
        if q is not None and not q.reader_count:  # its requester left (a new one may reuse the name)
            q.release()
            q = None
        if q is None:
            q = PortQueue(self.manager, f"b-{topic}", create=False, multi_producer=True)
        with self._lock:
            self._reply_topics[topic] = q  # most recent last
            while len(self._reply_topics) > _REPLY_TOPICS_KEPT:
                self._reply_topics.pop(next(iter(self._reply_topics))).release()
        return q

    def _check_open(self) -> None:
        if self._closed:
            raise MultiQueueError("this Bus is closed; make a new one")

    def close(self) -> None:
        self._closed = True
        with self._lock:
            subscriptions = list(self._subscriptions)
        for sub in subscriptions:  # all marked first: a thread in get() returns None from now on
            sub._closed.set()
        for sub in subscriptions:
            sub.close()
        if self._replies is not None:
            self._forget(self._replies.topic)  # nobody will ask it again: remove its segment
            self._replies = None
        for q in [*self._topics.values(), *self._reply_topics.values()]:
            q.release()
        self._topics.clear()
        self._reply_topics.clear()

    def __enter__(self) -> "Bus":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _topic(self, topic: str, capacity: int = 64) -> PortQueue:
        check_topic(topic)
        check_capacity(capacity, MAX_CAPACITY)
        with self._lock:
            q = self._topics.get(topic)
            if q is None:
                q = self._topics[topic] = PortQueue(self.manager, f"b-{topic}", capacity, multi_producer=True)
            return q

    def _forget_subscription(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subscriptions:
                self._subscriptions.remove(sub)

    def _one_off(self, topic: str) -> PortQueue:
        """An existing topic's queue, not kept (SegmentError if it is gone)."""
        check_topic(topic)
        return PortQueue(self.manager, f"b-{topic}", create=False, multi_producer=True)

    def _forget(self, topic: str) -> None:
        """Unmap a one-off topic (a request's reply topic) and remove its segment."""
        with self._lock:
            q = self._topics.pop(topic, None)
        if q is not None:
            q.remove()

    def _bus_pool(self) -> BufferPool:
        """The domain's bus pool, added by the first Bus that needs it."""
        if BUS_POOL in self.manager.list_pools():
            return self.manager.get_pool(BUS_POOL)
        # as many blocks as the domain's metadata table has room for, up to max_pool_blocks
        limit = min(self._max_pool_blocks, self.manager.free_buffer_slots)
        if limit < MIN_POOL_BLOCKS:
            raise DomainFullError(
                f"the message bus of domain {self.manager.domain!r} needs {MIN_POOL_BLOCKS} blocks but "
                f"the domain has room for {max(0, limit)} (max_buffers={self.manager.config.max_buffers}); "
                "create it with a larger ShmConfig.max_buffers")
        first = min(self._pool_blocks, limit)
        try:
            return self.manager.add_pool(PoolConfig(BUS_POOL, BLOCK, first, expandable=True,
                                                    max_blocks=min(limit, first * MAX_CHUNKS)))
        except ValueError:
            if BUS_POOL not in self.manager.list_pools():  # not just another process being first
                raise
            return self.manager.get_pool(BUS_POOL)


def _encode(data) -> tuple[int, bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        kind, body = KIND_BYTES, bytes(data)
    else:
        try:
            kind, body = KIND_JSON, json.dumps(data, separators=(",", ":")).encode()
        except (TypeError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
            raise TypeError(f"a bus message is bytes or a JSON-able object: {e}") from None
    if len(body) > MAX_MESSAGE:
        raise MessageTooLargeError(
            f"a bus message of {len(body)} bytes exceeds the limit of {MAX_MESSAGE}; put bulk "
            "data in a pool buffer and send its id")
    return kind, body


def _decode(topic: str, buffer) -> Message:
    """The message in a bus block; _InvalidMessage if it is not one Bus.publish wrote."""
    view = buffer.memoryview()
    try:
        kind, _, length, pid, seq, rid = HEADER.unpack_from(view, 0)
    except struct.error:
        raise _InvalidMessage(f"a block of {len(view)} bytes, shorter than the {HEADER.size}-byte header") \
            from None
    body = bytes(view[_BODY : _BODY + length])
    if len(body) != length:
        raise _InvalidMessage(f"a payload of {length} bytes claimed in a block of {len(view)}")
    if kind == KIND_JSON:
        try:
            data = json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
            raise _InvalidMessage(f"a JSON message whose body is not JSON: {e}") from None
    elif kind == KIND_BYTES:
        data = body
    else:
        raise _InvalidMessage(f"unknown kind {kind}")
    return Message(topic, data, pid, seq, buffer.timestamp, rid)
