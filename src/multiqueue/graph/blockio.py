"""BlockIO: a running block's inputs and outputs (what Block.allocate / send / consume reach)."""

import threading
import time

import numpy as np

from ..checks import check_timeout
from ..errors import BlockError, BufferReleasedError, PoolExhaustedError, QueueClosedError
from ..shm import ShmManager
from ..shm.buffer import frame_nbytes
from ..stream.queue import PortQueue
from . import registry as R
from .block import ERROR, INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT, OK, Block, Frame, WorkResult

SLICE_S = 0.25  # waits are cut into slices this long, to notice an abort
INPUT_RELEASED = ("released after the work() call it was handed to (input frames are valid "
                  "during that call only)")


class Aborted(Exception):
    """The graph is being torn down: leave the loop without draining."""


class SourceStopped(Exception):
    """A source told to stop while it waited for room (a full output or pool): it ends
    normally, and the frame it could not send is released (it never entered the graph)."""


class BlockIO:
    """A running block's ports: pending input frames, allocation and sending.

    ``readers``: {input port: QueueReader}; ``queues``: {output port: PortQueue};
    ``stop`` / ``abort``: the runner's events; ``row``: the block's row of the graph
    segment (its counters)."""

    def __init__(self, name: str, block: Block, manager: ShmManager, readers: dict, queues: dict,
                 stop: threading.Event, abort: threading.Event, row):
        self.name, self.block, self.manager = name, block, manager
        self.readers, self.queues = readers, queues
        self.in_ports, self.out_ports = block.input_ports(), block.output_ports()
        self.pending = {port: [] for port in readers}
        self.closed = dict.fromkeys(readers, False)
        self.stop, self.abort = stop, abort
        self.row = row
        # the first *declared* input with a reader (readers come in connection order)
        self.first_input = next((p for p in self.in_ports if p in readers), None)
        self.items_in = self.items_out = 0
        self._handed: dict[str, int] = {}
        self._consumed: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._sent_on = {port: f"sent on {port!r}" for port in self.out_ports}  # made once, not per frame
        self._current: list[Frame] = []
        self.timed: list[tuple[int, str, object]] = []  # (at_ns, name, value), sorted; under the lock
        self.bus = None  # the host's message bus, once it is up
        self.counter_words = {name: R.COUNTERS + i for i, name in enumerate(block.counters)}
        self.edge_counts: dict = {}  # {input port: losses.EdgeCount}, set by the runner
        self.input_index = {port: i for i, port in enumerate(self.in_ports)}  # the WAIT_ARG of each
        self.output_index = {port: i for i, port in enumerate(self.out_ports)}
        self.wait_kind = self.wait_arg = R.WAIT_NONE  # what the row says the block waits for

    # -- the wait state in the block's row: one store per transition -----------------------

    def set_wait(self, kind: int, arg: int = 0) -> None:
        """Say in the row what the block waits for from now on (R.WAIT_*, which one)."""
        if kind != self.wait_kind or arg != self.wait_arg:
            self.row[R.WAIT_ARG] = arg  # before the kind: a reader never pairs a new kind with an old arg
            self.row[R.WAIT] = kind
            self.wait_kind, self.wait_arg = kind, arg

    def clear_wait(self) -> None:
        """The block works again."""
        self.row[R.WAIT] = R.WAIT_NONE
        self.wait_kind = R.WAIT_NONE

    def _wait_for_pool(self, error: PoolExhaustedError) -> None:
        pools = getattr(error, "pools", ())  # set by the allocator: the pools it found full
        self.row[R.POOL_NAME : R.POOL_NAME + R.POOL_NAME_WORDS] = R.pool_name_words(pools[0] if pools else "")
        self.set_wait(R.WAIT_POOL)

    # -- input ---------------------------------------------------------------------------

    def fill(self, port: str) -> None:
        """Take what is waiting on ``port`` without blocking, up to the block's batch."""
        pending, reader, batch = self.pending[port], self.readers[port], self.block.batch
        while len(pending) < batch and not self.closed[port]:
            try:
                buffer = reader.try_pop()
            except QueueClosedError:
                self.closed[port] = True
                return
            if buffer is None:
                return
            pending.append(self._frame(buffer, port))

    def wait_input(self) -> bool:
        """Sleep until a frame arrives on an open input (the emptiest); False if every
        input is closed.  Returns after SLICE_S without one, to look at abort."""
        open_ports = [p for p in self.pending if not self.closed[p]]
        if not open_ports:
            return False
        port = min(open_ports, key=lambda p: len(self.pending[p]))
        self.set_wait(R.WAIT_INPUT, self.input_index[port])  # the runner clears it before work()
        try:
            buffer = self.readers[port].pop(timeout=SLICE_S)
        except TimeoutError:
            return True
        except QueueClosedError:
            self.closed[port] = True
            return True
        self.pending[port].append(self._frame(buffer, port))
        return True

    def ready(self) -> bool:
        """Every input has a frame, or some have and the empty ones are closed."""
        empty = [p for p, frames in self.pending.items() if not frames]
        if not empty:
            return True
        return len(empty) < len(self.pending) and all(self.closed[p] for p in empty)

    def exhausted(self) -> bool:
        return all(self.closed.values()) and not any(self.pending.values())

    def _frame(self, buffer, port: str) -> Frame:
        spec = self.in_ports[port]
        try:
            array = buffer.numpy()  # the recorded dtype and shape, else bytes
            if spec.dtype is not None and array.dtype != spec.dtype and buffer.frame is None:
                array = buffer.numpy(spec.dtype)  # an unrecorded payload: the port says what it is
        except ValueError as e:
            buffer.release()
            raise BlockError(f"block {self.name!r} input {port!r}: {e}") from None
        array.setflags(False)  # write=False (positional: cheaper); other readers see the same memory
        return Frame(buffer, array, True)

    # -- one work() call -----------------------------------------------------------------

    def call_work(self) -> WorkResult:
        """Hand the pending frames to work(), then release the ones it consumed."""
        batch = self.block.batch
        handed = {port: frames[:batch] for port, frames in self.pending.items()}
        if self.timed:
            self._apply_due(handed)
        self._handed = {port: len(frames) for port, frames in handed.items()}
        self._consumed, self._sent = {}, {}
        self._current = handed[self.first_input] if self.first_input is not None else []
        result = self._checked(self.block.work(handed))
        keep_all = result in (INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT)
        for port, frames in self.pending.items():
            n = self._consumed.get(port, 0 if keep_all else self._handed[port])
            for frame in frames[:n]:
                if frame.ended is None:  # else the block released it itself
                    frame.release(INPUT_RELEASED)
            del frames[:n]
            self.items_in += n
            self.edge_counts[port].commit(n, self.items_out)  # one word per call: exact losses
        self._current = []
        return result

    def _checked(self, result) -> WorkResult:
        if result is None:
            return OK
        if not isinstance(result, WorkResult):
            raise BlockError(f"block {self.name!r}: work() returned {result!r}; return None or a "
                             "WorkResult (OK, DONE, INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT, ERROR)")
        if result is ERROR:
            raise BlockError(f"block {self.name!r}: work() returned ERROR")
        return result

    def add_timed(self, at_ns: int, name: str, value) -> None:
        """A parameter change due at the first input frame stamped ``at_ns`` or later."""
        self.timed.append((int(at_ns), name, value))
        self.timed.sort(key=lambda change: change[0])

    def _apply_due(self, handed: dict) -> None:
        """Apply the timed parameter changes due at the first frame handed in (of the
        first input; a source: at the clock), and hand in only the frames before the
        next one, so that it lands exactly on the first frame that reaches its time."""
        first = handed.get(self.first_input) if self.first_input is not None else None
        now = first[0].timestamp if first else time.monotonic_ns()
        while self.timed and self.timed[0][0] <= now:
            _, name, value = self.timed.pop(0)
            self.block.set_parameter(name, value)
        if first and self.timed:
            cut = next((i for i, f in enumerate(first) if f.timestamp >= self.timed[0][0]), len(first))
            del first[cut:]

    def consume(self, port: str, count: int) -> None:
        if port not in self._handed:
            raise KeyError(f"block {self.name!r} has no input {port!r}; it has {list(self.pending)}")
        if not 0 <= count <= self._handed[port]:
            raise ValueError(f"consume({port!r}, {count}): {self._handed[port]} frames were handed in")
        self._consumed[port] = count

    def release_pending(self) -> None:
        for frames in self.pending.values():
            for frame in frames:
                if frame.ended is None and not frame.buffer.released:
                    frame.release("released as the block ended")
            frames.clear()

    # -- output --------------------------------------------------------------------------

    def allocate(self, port: str, shape, dtype, timeout) -> Frame:
        spec = self._out_port(port)
        dtype = np.dtype(dtype if dtype is not None else (spec.dtype if spec.dtype is not None else np.uint8))
        if shape is None:
            shape = spec.shape
            if shape is None:
                raise ValueError(f"block {self.name!r} output {port!r} has no fixed frame shape: "
                                 "pass allocate(port, shape)")
        if shape.__class__ is not tuple:
            shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(int(n) for n in shape)
        buffer = self._allocate_bytes(max(1, frame_nbytes(dtype, shape)), timeout)
        buffer.set_frame(dtype, shape)
        return Frame(buffer, buffer.numpy())  # the frame just recorded

    def _allocate_bytes(self, nbytes: int, timeout):
        if timeout is not None:
            check_timeout(timeout)  # a wrong one is wrong even when a block is free
        try:
            return self.manager.allocate(nbytes, 0)  # a full pool: say so in the row before waiting
        except PoolExhaustedError as e:
            if timeout == 0:
                raise
            self._wait_for_pool(e)
        if timeout is not None:  # the block's own limit: it handles the error
            try:
                return self.manager.allocate(nbytes, timeout)
            finally:
                self.clear_wait()
        while True:
            try:
                buffer = self.manager.allocate(nbytes, SLICE_S)
                self.clear_wait()
                return buffer
            except PoolExhaustedError:
                self._check_waiting()

    def send(self, port: str, item, timestamp, time_range) -> None:
        """Push an allocated frame (moved: the frame ends), an input frame (forwarded:
        a new reference) or an array-like (copied into a new frame)."""
        queue = self._out_queue(port)
        k = self._sent.get(port, 0)
        self._sent[port] = k + 1
        if isinstance(item, Frame) and item.is_input:
            if timestamp is not None or time_range is not None:
                raise ValueError(f"block {self.name!r}: a forwarded input frame keeps its timestamp "
                                 "(other readers share it); send frame.array to send a stamped copy")
            buffer = item.buffer.share()  # zero-copy forward
        elif isinstance(item, Frame):
            if item.ended is not None:
                raise BufferReleasedError(f"block {self.name!r}: this frame was already {item.ended}")
            buffer = item.buffer
            self._stamp(buffer, k, timestamp, time_range)
            item.end(self._sent_on[port])  # no longer the block's to write: the readers' now
        else:
            buffer = self._copy_in(port, item)
            self._stamp(buffer, k, timestamp, time_range)
        self._push(port, queue, buffer)
        self.items_out += 1

    def _copy_in(self, port: str, item):
        array = np.asarray(item)
        want = self.out_ports[port].dtype
        if want is not None and array.dtype != want:
            if not np.can_cast(array.dtype, want, "same_kind"):
                raise TypeError(f"block {self.name!r} output {port!r} carries {want}, not {array.dtype}")
            array = array.astype(want)
        frame = self.allocate(port, array.shape, array.dtype, None)
        frame.array[...] = array  # the one copy, into shared memory
        return frame.buffer

    def _stamp(self, buffer, k: int, timestamp, time_range) -> None:
        """Set the timestamp and range asked for; with neither, take the k-th input
        frame's (the first input port's) unless the buffer has one already."""
        if timestamp is not None:
            buffer.timestamp = timestamp
        if time_range is not None:
            buffer.time_range = time_range
        if timestamp is None and time_range is None and self._current and buffer.timestamp == 0:
            source = self._current[min(k, len(self._current) - 1)].buffer
            buffer.timestamp = source.timestamp
            span = source.time_range
            if span is not None:
                buffer.time_range = span

    def _push(self, port: str, queue: PortQueue, buffer) -> None:
        timeout = 0  # a full blocking reader: say so before waiting
        while True:
            try:
                queue.push(buffer, timeout)
                if timeout:
                    self.clear_wait()
                return
            except TimeoutError:
                if not timeout:
                    self.set_wait(R.WAIT_READER, self.output_index[port])
                    timeout = SLICE_S
                    continue
                try:
                    self._check_waiting()
                except (Aborted, SourceStopped):
                    buffer.release()
                    raise
            except QueueClosedError:
                buffer.release()
                raise Aborted() from None  # the runtime closed it: the graph is going down

    def _check_waiting(self) -> None:
        """Between two slices of a wait for room: should this block give up waiting?"""
        if self.abort.is_set():
            raise Aborted()
        if self.stop.is_set() and not self.readers:
            raise SourceStopped()

    def _out_port(self, port: str):
        try:
            return self.out_ports[port]
        except KeyError:
            raise KeyError(f"block {self.name!r} has no output {port!r}; it has "
                           f"{list(self.out_ports)}") from None

    def pushed(self, port: str) -> int:
        return self._out_queue(port).pushed

    def _out_queue(self, port: str) -> PortQueue:
        self._out_port(port)
        return self.queues[port]

    # -- counters, pacing, the end ---------------------------------------------------------

    def _counter_word(self, name: str) -> int:
        try:
            return self.counter_words[name]
        except KeyError:
            raise KeyError(f"block {self.name!r} has no counter {name!r}; its counters: "
                           f"{list(self.counter_words) or 'none'} (declare them in 'counters')") from None

    def count(self, name: str, n: int) -> int:
        word = self._counter_word(name)
        self.row[word] += n  # one writer: the block's own thread
        return int(self.row[word])

    def counter(self, name: str) -> int:
        return int(self.row[self._counter_word(name)])

    def set_counter(self, name: str, value: int) -> None:
        self.row[self._counter_word(name)] = value

    def sleep(self, seconds: float) -> bool:
        event = self.stop if not self.readers else self.abort
        if seconds > 0:
            event.wait(seconds)
        return not (event.is_set() or self.abort.is_set())

    def close_outputs(self) -> None:
        for queue in self.queues.values():
            queue.close()
