"""Producer and Consumer over named port queues, and the stage decorators.

For code that wants numpy arrays in and out and no buffer handling: ``Producer.push``
allocates, copies once and sends; ``Consumer`` yields numpy views of shared memory;
``@producer`` / ``@consumer`` make a processing stage. See docs/streams.md,
"Convenience layer".
"""

import importlib
import multiprocessing
from collections.abc import Iterator

import numpy as np

from ..checks import check_capacity, check_int, check_number, check_shape
from ..errors import InvalidBufferError
from ..shm import Buffer, ShmConfig, ShmManager
from ..shm.segment import check_domain
from .queue import POLICIES, PortQueue, check_queue_name

_STARTS = ("latest", "oldest")


def _check_queue_args(domain, queue, capacity, config, *, domain_used: bool = True) -> None:
    """The queue a Producer, Consumer or stage opens: checked before any domain is joined
    or created, and by @producer / @consumer when they decorate (not when the stage runs).
    ``domain_used``: False when a manager is given (the domain name is then not used)."""
    if domain_used:
        check_domain(domain)
    check_queue_name(queue)
    check_capacity(capacity)
    if config is not None and not isinstance(config, ShmConfig):
        raise TypeError(f"config must be None or a ShmConfig, not {type(config).__name__}")


def _check_reader_args(policy, start, dtype, shape) -> None:
    """A Consumer's (or @consumer's) reader and frame arguments."""
    if policy is not None and (not isinstance(policy, str) or policy not in POLICIES):
        raise ValueError(f"policy must be 'block' or 'drop_oldest' (None: the queue's default), "
                         f"not {policy!r}")
    if not isinstance(start, str) or start not in _STARTS:
        raise ValueError(f"start must be 'latest' or 'oldest', not {start!r}")
    if dtype is not None:
        np.dtype(dtype)  # TypeError naming the dtype it does not understand
    if shape is not None:
        check_shape("shape", shape)


def _check_producer_args(readers, readers_timeout) -> None:
    check_int("readers", readers, 0)
    check_number("readers_timeout", readers_timeout, minimum=0, none=True)


class _Endpoint:
    """A queue of a domain, with the manager made here (and owned) unless one is given."""

    def __init__(self, domain: str, queue: str, manager: ShmManager | None, config: ShmConfig | None,
                 capacity: int, name: str):
        _check_queue_args(domain, queue, capacity, config, domain_used=manager is None)
        self._owns_manager = manager is None
        self.manager = manager if manager is not None else ShmManager(domain, config, name=name)
        try:
            self.queue = PortQueue(self.manager, queue, capacity)
        except BaseException:
            self._close_manager()
            raise

    def _close_manager(self) -> None:
        if self._owns_manager:
            self.manager.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Producer(_Endpoint):
    """Pushes numpy arrays or bytes to a named queue, copying each once into a pool block.

    For zero copies, fill a block in place: ``buf = producer.loan(shape, dtype)``,
    write ``buf.numpy()``, then ``producer.push(buf)``.

    ``readers`` (an int >= 0): wait until that many readers are attached (up to
    ``readers_timeout`` seconds, None or a number >= 0; None: forever) before returning.
    """

    def __init__(self, domain: str, queue: str, *, capacity: int = 64, manager: ShmManager | None = None,
                 config: ShmConfig | None = None, close_on_exit: bool = True, readers: int = 0,
                 readers_timeout: float | None = None):
        _check_producer_args(readers, readers_timeout)
        super().__init__(domain, queue, manager, config, capacity, "producer")
        self._close_queue = close_on_exit
        if readers:  # readers see only what is pushed after they attach: wait for them
            try:
                self.queue.wait_for_readers(readers, readers_timeout)
            except BaseException:
                self.queue.release()
                self._close_manager()
                raise

    def loan(self, shape, dtype=np.float32, timeout: float | None = None) -> Buffer:
        """A buffer for one frame of ``shape`` and ``dtype``, to fill in place and push."""
        dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        buffer = self.manager.allocate(max(1, dtype.itemsize * int(np.prod(shape, dtype=np.int64))), timeout)
        buffer.set_frame(dtype, shape)
        return buffer

    def push(self, data, *, timestamp: int | None = None, time_range: tuple[int, int] | None = None,
             timeout: float | None = None) -> None:
        """Send one frame: a numpy array, bytes-like object, or a Buffer (sent as is)."""
        if isinstance(data, Buffer):
            buffer = data
        else:
            array = np.asarray(data) if not isinstance(data, (bytes, bytearray, memoryview)) else \
                np.frombuffer(data, np.uint8)
            buffer = self.loan(array.shape, array.dtype, timeout)
            try:
                buffer.numpy()[...] = array  # the one copy: into shared memory
            except BaseException:
                buffer.release()
                raise
        if timestamp is not None:
            buffer.timestamp = timestamp
        if time_range is not None:
            buffer.time_range = time_range
        try:
            self.queue.push(buffer, timeout)
        except BaseException:
            if not buffer.released and buffer is not data:
                buffer.release()
            raise

    def close(self) -> None:
        """Close the queue (readers drain, then stop) and leave the domain if we joined it."""
        if not self.queue.released:
            if self._close_queue:
                self.queue.close()
            self.queue.release()
        self._close_manager()


class Consumer(_Endpoint):
    """Reads a named queue as numpy views of the frames in shared memory.

    Iterating yields one array per item, each valid until the next one is requested
    (its buffer is then released): copy an array to keep it.  ``buffers()`` yields
    the Buffer handles instead, for timestamps and explicit release.

    ``policy``: None (the default) takes the queue's default: ``"block"`` (lossless:
    the producer waits for this reader), except on a graph's port, where it is
    ``"drop_oldest"`` (a viewer never slows the graph; its losses are counted).  Name
    ``policy="block"`` to read a graph's port losslessly, slowing it to your pace.
    """

    def __init__(self, domain: str, queue: str, *, policy: str | None = None, start: str = "latest",
                 capacity: int = 64, manager: ShmManager | None = None, config: ShmConfig | None = None,
                 dtype=None, shape=None, busy_poll: bool = False):
        _check_reader_args(policy, start, dtype, shape)
        super().__init__(domain, queue, manager, config, capacity, "consumer")
        try:
            self.reader = self.queue.reader(policy, start, busy_poll=busy_poll)
        except BaseException:
            self._close_manager()
            raise
        self._dtype, self._shape = dtype, shape
        self._current: Buffer | None = None

    def pop(self, timeout: float | None = None) -> Buffer:
        """The next item's Buffer (yours to release); TimeoutError / QueueClosedError."""
        return self.reader.pop(timeout)

    def buffers(self) -> Iterator[Buffer]:
        """Buffers until the queue is closed and drained."""
        return iter(self.reader)

    def __iter__(self) -> Iterator[np.ndarray]:
        try:
            for buffer in self.reader:
                self._drop_current()
                self._current = buffer
                yield buffer.numpy(self._dtype, self._shape)
        finally:
            self._drop_current()

    def _drop_current(self) -> None:
        if self._current is not None:
            current, self._current = self._current, None
            try:
                current.release()
            except InvalidBufferError:
                pass  # its manager shut down first, which released it already

    def close(self) -> None:
        self._drop_current()
        if not self.queue.released:
            self.reader.detach()
            self.queue.release()
        self._close_manager()


class Stage:
    """A plain function made a stage over named queues by @producer / @consumer.

    - source (only @producer): the function is called with no argument; it returns
      one frame per call (None ends) or is a generator of frames;
    - sink (only @consumer): called with each input frame;
    - processing (both): called with each input frame; what it returns (or yields)
      is pushed, with the input's timestamp and time range.
    ``run()`` runs it here until the input closes (or the source ends), then closes
    the output; ``start()`` runs it in a new process (spawn) and returns it.
    """

    def __init__(self, fn):
        self.fn = fn
        self.input: dict | None = None
        self.output: dict | None = None
        self.__name__ = getattr(fn, "__name__", "stage")
        self.__doc__ = getattr(fn, "__doc__", None)
        self.__module__ = getattr(fn, "__module__", __name__)
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        # pickled by reference (for start()): the decorated name now names this Stage
        return _load_stage, (self.__module__, self.__qualname__)

    def run(self, max_items: int | None = None) -> int:
        """Run until the input closes or the source ends (or ``max_items``); returns items done."""
        if self.input is None and self.output is None:
            raise ValueError(f"stage {self.__name__!r} has neither @producer nor @consumer")
        out = Producer(**self.output) if self.output else None
        try:
            if self.input is None:
                return self._run_source(out, max_items)
            with Consumer(**self.input) as source:
                return self._run_over(source, out, max_items)
        finally:
            if out is not None:
                out.close()

    def start(self) -> multiprocessing.Process:
        """Run in a new process (spawn context: the function must be importable)."""
        process = multiprocessing.get_context("spawn").Process(target=self.run, name=self.__name__)
        process.start()
        return process

    def _run_source(self, out: Producer, max_items: int | None) -> int:
        frames = self.fn()
        if not hasattr(frames, "__next__"):  # a function returning one frame per call
            frames = iter(self.fn, None) if frames is None else _chain_first(frames, self.fn)
        done = 0
        for frame in frames:
            out.push(frame)
            done += 1
            if done == max_items:
                break
        return done

    def _run_over(self, source: Consumer, out: Producer | None, max_items: int | None) -> int:
        done = 0
        for buffer in source.buffers():
            try:
                result = self.fn(buffer.numpy(source._dtype, source._shape))
                if out is not None and result is not None:
                    results = result if hasattr(result, "__next__") else (result,)
                    for frame in results:
                        out.push(frame, timestamp=buffer.timestamp, time_range=buffer.time_range)
            finally:
                buffer.release()
            done += 1
            if done == max_items:
                break
        return done


def _load_stage(module: str, qualname: str) -> Stage:
    target = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    return target


def _chain_first(first, fn):
    yield first
    while (frame := fn()) is not None:
        yield frame


def _stage(fn) -> Stage:
    return fn if isinstance(fn, Stage) else Stage(fn)


def producer(domain: str, queue: str, *, capacity: int = 64, config: ShmConfig | None = None,
             readers: int = 0):
    """Decorator: what the function returns or yields is pushed to ``queue`` (after
    ``readers`` readers attached, if given).  The arguments are checked here, as by
    Producer, not when the stage runs."""
    _check_queue_args(domain, queue, capacity, config)
    _check_producer_args(readers, None)

    def wrap(fn):
        stage = _stage(fn)
        stage.output = {"domain": domain, "queue": queue, "capacity": capacity, "config": config,
                        "readers": readers}
        return stage

    return wrap


def consumer(domain: str, queue: str, *, policy: str | None = None, start: str = "latest",
             capacity: int = 64, config: ShmConfig | None = None, dtype=None, shape=None):
    """Decorator: the function is called with each frame of ``queue`` (a numpy view).
    The arguments are checked here, as by Consumer (``policy`` too: None takes the
    queue's default), not when the stage runs."""
    _check_queue_args(domain, queue, capacity, config)
    _check_reader_args(policy, start, dtype, shape)

    def wrap(fn):
        stage = _stage(fn)
        stage.input = {"domain": domain, "queue": queue, "policy": policy, "start": start,
                       "capacity": capacity, "config": config, "dtype": dtype, "shape": shape}
        return stage

    return wrap
