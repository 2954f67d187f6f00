"""The peer transports of benchmarks/transport.py: multiprocessing.Queue, faster-fifo, pyzmq, iceoryx2.

Every transport has the same three parts, so the benchmark loops are shared:

* a *hub*, made in the parent process: it creates what the workers attach to (queues,
  ipc paths, services) and removes it in ``close()``;
* ``hub.channel(name, consumers, wait)``: a picklable *spec* of one producer -> N
  consumers link, handed to the worker processes;
* in a worker, ``spec.open_sender(fill)`` / ``spec.open_receiver(index, fill)`` give
  an endpoint whose ``send(seq)`` writes one message to every consumer and whose
  ``recv()`` returns the sequence number the message carries (or ``BAD`` when its
  payload does not check out).

Message contents: the sequence number (little-endian u64) in the first and the last
8 bytes ("head/tail"), or, with ``fill``, in every 8-byte word of the payload (the
consumer sums the words and compares with ``seq * words``).  ``wait`` is how a
consumer waits for data: ``"block"`` (the transport's blocking receive), ``"busy"``
(a non-blocking receive in a loop) or ``"stream"`` (throughput runs: ``"block"``,
except for iceoryx2 whose subscriber has no blocking receive; see IceoryxHub).

Peer imports are deferred to the processes that use them, so a worker imports only
its own transport, and a peer that is not installed is skipped with a note.
"""

import ctypes
import os
import queue
import shutil
from dataclasses import dataclass

import numpy as np

HELLO = 2**64 - 3  # sequence number of a message every consumer receives before the first run
END = 2**64 - 2  # ... of the end-of-run marker
QUIT = 2**64 - 1  # ... and of the marker that stops a consumer (all above any sequence)
BAD = -1  # recv() result for a payload that does not check out
MASK = 2**64 - 1


def expected_sum(seq: int, size: int) -> int:
    """Sum (mod 2**64) of a payload whose every u64 word holds ``seq``."""
    return (seq * (size // 8)) & MASK


class Endpoint:
    """One side of a channel in a worker: ``send(seq)`` or ``recv() -> seq``, and ``close()``."""

    def __init__(self, *, send=None, recv=None, close=None):
        self.send = send
        self.recv = recv
        self._close = close

    def close(self) -> None:
        if self._close is not None:
            self._close()
            self._close = None


# -- helpers for transports that carry Python bytes objects ------------------------------


def bytes_sender(size: int, fill: bool, puts: list, reuse: bool):
    """send(seq) for transports that take a bytes-like object and copy or pickle it.

    The producer writes into a bytearray: a fresh one per message, since mp.Queue
    pickles it later in a feeder thread and pyzmq sends large frames zero-copy, or,
    with ``reuse``, one kept buffer (faster-fifo copies it before ``put`` returns).
    """
    kept = bytearray(size)

    if fill:
        def send(seq):
            buf = kept if reuse else bytearray(size)
            np.frombuffer(buf, np.uint64).fill(seq)
            for put in puts:
                put(buf)
    else:
        def send(seq):
            buf = kept if reuse else bytearray(size)
            h = seq.to_bytes(8, "little")
            buf[:8] = h
            buf[-8:] = h
            for put in puts:
                put(buf)
    return send


def bytes_receiver(get, fill: bool):
    """recv() -> seq over ``get()`` returning a bytes-like message."""
    if fill:
        def recv():
            words = np.frombuffer(get(), np.uint64)
            seq = int(words[0])
            return seq if int(words.sum()) == expected_sum(seq, words.nbytes) else BAD
    else:
        def recv():
            data = get()
            head = int.from_bytes(data[:8], "little")
            return head if head == int.from_bytes(data[-8:], "little") else BAD
    return recv


def spin_get(get_nowait, empty=queue.Empty):
    """A busy-poll get(): call the non-blocking get until it returns."""
    def get():
        while True:
            try:
                return get_nowait()
            except empty:
                pass
    return get


# -- multiprocessing.Queue ---------------------------------------------------------------


class MpQueueHub:
    name = "mp.Queue"
    fanout_note = "one multiprocessing.Queue per consumer; the producer puts every message to each"
    access_note = "put(fresh bytearray) / get() -> bytearray (pickled through a pipe)"

    def __init__(self, ctx, tag: str, size: int, depth: int, channels: int, workdir: str):
        self.ctx, self.size, self.depth = ctx, size, depth

    def channel(self, name: str, consumers: int, wait: str) -> "QueueSpec":
        queues = [self.ctx.Queue(maxsize=self.depth) for _ in range(consumers)]
        return QueueSpec(queues, self.size, wait, reuse=False)

    def close(self) -> None:
        pass


@dataclass
class QueueSpec:
    """A channel of one Python queue per consumer (multiprocessing or faster-fifo)."""

    queues: list
    size: int
    wait: str
    reuse: bool

    def open_sender(self, fill: bool) -> Endpoint:
        return Endpoint(send=bytes_sender(self.size, fill, [q.put for q in self.queues], self.reuse))

    def open_receiver(self, index: int, fill: bool) -> Endpoint:
        q = self.queues[index]
        if self.wait == "busy":
            get = spin_get(q.get_nowait)
        elif hasattr(q, "get_many"):  # faster-fifo: get() waits 10 s by default, then raises Empty
            get = _faster_fifo_get(q)
        else:
            get = q.get
        return Endpoint(recv=bytes_receiver(get, fill))


def _faster_fifo_get(q):
    get = q.get

    def blocking_get():
        while True:
            try:
                return get(timeout=1.0)
            except queue.Empty:
                pass
    return blocking_get


# -- faster-fifo --------------------------------------------------------------------------


class FasterFifoHub(MpQueueHub):
    name = "faster-fifo"
    fanout_note = "one faster_fifo.Queue per consumer; the producer puts every message to each"
    access_note = "put(reused bytearray; copied in) / get() -> bytearray"

    def __init__(self, ctx, tag: str, size: int, depth: int, channels: int, workdir: str):
        import faster_fifo

        super().__init__(ctx, tag, size, depth, channels, workdir)
        self._queue = faster_fifo.Queue

    def channel(self, name: str, consumers: int, wait: str) -> QueueSpec:
        capacity = self.depth * (self.size + 256) + 65536  # depth pickled messages and headers
        queues = [self._queue(max_size_bytes=capacity, maxsize=self.depth) for _ in range(consumers)]
        return QueueSpec(queues, self.size, wait, reuse=True)


# -- pyzmq ---------------------------------------------------------------------------------


class ZmqHub:
    name = "pyzmq"
    fanout_note = ("one PUSH->PULL ipc:// socket pair per consumer (lossless, unlike PUB/SUB); "
                   "the producer sends every message on each")
    access_note = "send(fresh bytearray) (zero-copy above 64 KiB) / recv(copy=False) -> Frame.buffer"

    def __init__(self, ctx, tag: str, size: int, depth: int, channels: int, workdir: str):
        import zmq  # noqa: F401  (fail here, in the parent, if pyzmq is missing)

        self.size, self.depth = size, depth
        self.dir = os.path.join(workdir, f"zmq-{tag}")
        os.makedirs(self.dir)

    def channel(self, name: str, consumers: int, wait: str) -> "ZmqSpec":
        endpoints = [f"ipc://{self.dir}/{name}{i}" for i in range(consumers)]
        return ZmqSpec(endpoints, self.size, self.depth, wait)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class ZmqSpec:
    endpoints: list[str]
    size: int
    depth: int
    wait: str

    def open_sender(self, fill: bool) -> Endpoint:
        import zmq

        context = zmq.Context()
        sockets = []
        for endpoint in self.endpoints:
            s = context.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, self.depth)
            s.setsockopt(zmq.LINGER, 5000)  # deliver the last markers before closing
            s.connect(endpoint)
            sockets.append(s)

        def close():
            for s in sockets:
                s.close()
            context.term()
        return Endpoint(send=bytes_sender(self.size, fill, [s.send for s in sockets], reuse=False),
                        close=close)

    def open_receiver(self, index: int, fill: bool) -> Endpoint:
        import zmq

        context = zmq.Context()
        s = context.socket(zmq.PULL)
        s.setsockopt(zmq.RCVHWM, self.depth)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(self.endpoints[index])
        recv = s.recv
        if self.wait == "busy":
            poll = spin_get(lambda: recv(zmq.NOBLOCK, copy=False), zmq.Again)

            def get():
                return poll().buffer
        else:
            def get():
                return recv(copy=False).buffer

        def close():
            s.close()
            context.term()
        return Endpoint(recv=bytes_receiver(get, fill), close=close)


# -- iceoryx2 ------------------------------------------------------------------------------


class IceoryxHub:
    """iceoryx2 publish-subscribe with a dynamic ``Slice[c_uint8]`` payload (zero-copy).

    The producer loans a slice of the message size, writes the head/tail through
    ``payload_ptr`` (ctypes.memmove; the Slice's ``as_memory_view()`` costs ~1 us more per
    message), ``assume_init()`` and ``send()``; the subscriber ``receive()``s and reads
    through ``payload_ptr`` (ctypes.string_at).  Lossless: safe overflow is off and the
    publisher retries until delivered.  A subscriber has no blocking receive, so

    * ``"busy"``: spin on ``receive()`` until it returns a sample;
    * ``"block"``: the iceoryx2 event pattern: the publisher notifies an event service
      after each send and the subscriber waits on its Listener when it finds nothing;
    * ``"stream"`` (throughput runs): spin on ``receive()``, ``os.sched_yield()`` when
      empty (no notification cost on the producer).

    The HELLO message the benchmark sends before the first run matters here: without it
    iceoryx2 0.10 (in 3 of 10 fresh sets of processes, 1 -> 3, 64 B, buffer 256) loses up to
    a few hundred samples just after a subscriber's buffer first fills, although the service
    does not overflow and the publisher retries until delivered.
    """

    name = "iceoryx2"
    fanout_note = "one publisher, 3 subscribers on one publish-subscribe service (multicast)"
    access_note = ("loan_slice_uninit + payload_ptr/ctypes.memmove + send / receive + "
                   "payload_ptr/ctypes.string_at; events (Listener) for blocking waits, "
                   "receive()+sched_yield for throughput")

    def __init__(self, ctx, tag: str, size: int, depth: int, channels: int, workdir: str):
        self.size, self.depth = size, depth
        self.prefix, self.root = iceoryx_prefix(workdir), os.path.join(workdir, "iceoryx2")
        self.tag = tag
        self.node = iceoryx_node(self.prefix, self.root)
        self._services = []  # kept open until close()

    def channel(self, name: str, consumers: int, wait: str) -> "IceoryxSpec":
        spec = IceoryxSpec(self.prefix, self.root, f"transport-bench/{self.tag}/{name}", self.size,
                           self.depth, consumers, wait)
        self._services.append(spec.open_service(self.node))
        if wait == "block":
            self._services.append(spec.open_event(self.node))
        return spec

    def close(self) -> None:
        self._services.clear()
        self.node = None


def iceoryx_prefix(workdir: str) -> str:
    """The iceoryx2 file prefix of this benchmark run (its segments in /dev/shm start with it)."""
    return f"iox2tb{os.path.basename(workdir).split('-')[-1]}_"


_NODES: dict = {}


def iceoryx_node(prefix: str, root: str):
    """This process's iceoryx2 node for the run's private prefix and root directory."""
    node = _NODES.get(prefix)
    if node is None:
        import iceoryx2 as iox2

        iox2.set_log_level(iox2.LogLevel.Error)
        config = iox2.config.default()
        config.global_cfg.prefix = iox2.FileName.new(prefix)
        config.global_cfg.root_path = iox2.Path.new(root + "/")
        node = _NODES[prefix] = (iox2.NodeBuilder.new().config(config)
                                 .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
                                 .create(iox2.ServiceType.Ipc))
    return node


@dataclass
class IceoryxSpec:
    prefix: str
    root: str
    service: str
    size: int
    depth: int
    consumers: int
    wait: str

    def open_service(self, node):
        import iceoryx2 as iox2

        return (node.service_builder(iox2.ServiceName.new(self.service))
                .publish_subscribe(iox2.Slice[ctypes.c_uint8])
                .max_publishers(1)
                .max_subscribers(self.consumers)
                .subscriber_max_buffer_size(self.depth)
                .history_size(0)
                .enable_safe_overflow(False)
                .open_or_create())

    def open_event(self, node):
        import iceoryx2 as iox2

        return node.service_builder(iox2.ServiceName.new(self.service + "/event")).event().open_or_create()

    def open_sender(self, fill: bool) -> Endpoint:
        import iceoryx2 as iox2

        node = iceoryx_node(self.prefix, self.root)
        service = self.open_service(node)
        publisher = (service.publisher_builder()
                     .initial_max_slice_len(self.size)
                     .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
                     .create())
        notify = None
        if self.wait == "block":
            event = self.open_event(node)
            notify = event.notifier_builder().create().notify
        loan, size, memmove = publisher.loan_slice_uninit, self.size, ctypes.memmove

        def send(seq):
            sample = loan(size)
            if fill:
                np.frombuffer(sample.payload().as_memory_view(), np.uint64).fill(seq)
            else:
                h = seq.to_bytes(8, "little")
                p = sample.payload_ptr
                memmove(p, h, 8)
                memmove(p + size - 8, h, 8)
            sample.assume_init().send()
            if notify is not None:
                notify()

        keep = [service, publisher]
        return Endpoint(send=send, close=keep.clear)

    def open_receiver(self, index: int, fill: bool) -> Endpoint:
        node = iceoryx_node(self.prefix, self.root)
        service = self.open_service(node)
        subscriber = service.subscriber_builder().buffer_size(self.depth).create()
        receive, size, string_at = subscriber.receive, self.size, ctypes.string_at
        keep = [service, subscriber]
        if self.wait == "block":
            import iceoryx2 as iox2

            listener = self.open_event(node).listener_builder().create()
            keep.append(listener)
            wait, timeout = listener.timed_wait, iox2.Duration.from_millis(200)
        elif self.wait == "stream":
            wait, timeout = os.sched_yield, None
        else:
            wait = timeout = None

        def take():
            while True:
                sample = receive()
                if sample is not None:
                    return sample
                if wait is not None:
                    wait() if timeout is None else wait(timeout)

        if fill:
            def recv():
                sample = take()
                words = np.frombuffer(sample.payload().as_memory_view(), np.uint64)
                seq = int(words[0])
                ok = int(words.sum()) == expected_sum(seq, words.nbytes)
                del words
                sample.delete()
                return seq if ok else BAD
        else:
            def recv():
                sample = take()
                p = sample.payload_ptr
                head = int.from_bytes(string_at(p, 8), "little")
                tail = int.from_bytes(string_at(p + size - 8, 8), "little")
                sample.delete()
                return head if head == tail else BAD
        return Endpoint(recv=recv, close=keep.clear)


PEERS = [MpQueueHub, FasterFifoHub, ZmqHub, IceoryxHub]
PEER_PACKAGES = {"faster-fifo": "faster_fifo", "pyzmq": "zmq", "iceoryx2": "iceoryx2"}


def available_peers() -> tuple[list, list[str]]:
    """The peer hubs whose package imports, and a note for each one skipped."""
    import importlib

    hubs, notes = [], []
    for hub in PEERS:
        module = PEER_PACKAGES.get(hub.name)
        if module is not None:
            try:
                importlib.import_module(module)
            except ImportError as e:
                notes.append(f"{hub.name} skipped: cannot import {module} ({e}); "
                             f"pip install {hub.name}")
                continue
        hubs.append(hub)
    return hubs, notes
