"""Running blocks: a block's ports (BlockIO), its loop (BlockRunner), and the host
that runs a group of blocks in one process or thread (Host).

A host attaches to the domain by name like any unrelated process, joins a reader
on each input edge's queue, reports "ready", and on "start" runs each block in a
thread of its own.  A block with inputs sleeps on them (futex waits in the queue)
and ends when they are closed and drained; a source runs until it returns DONE or
the host is told to stop.  A block that ends closes its outputs, so the end of a
graph flows downstream.  Waits are cut into slices of SLICE_S seconds to notice an
abort.  Messages to the runtime: ("ready", {block: {port: reader}}), ("failed",
block, traceback), ("exit",).  From the runtime: ("start",), ("stop",) (sources
stop), ("abort",) (everyone stops now).  Commands to a block from any process
(parameters, pause, resume, stop) come over the domain's message bus, topic
``ctl-<block>`` (see Host._serve_bus).
"""

import contextlib
import logging
import multiprocessing.connection
import os
import pickle
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from ..control.bus import Bus
from ..control.log import domain_logger, set_block
from ..control.topics import control_topic
from ..errors import BlockError, BufferReleasedError, PoolExhaustedError, QueueClosedError
from ..shm import ShmManager
from ..shm.buffer import frame_nbytes
from ..stream.queue import PortQueue
from . import registry as R
from .block import DONE, ERROR, INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT, OK, Block, Frame, WorkResult

SLICE_S = 0.25
_log = logging.getLogger("mq.runner")
_BACKOFF_S = 0.002  # INSUFFICIENT_OUTPUT: nothing to sleep on, retry after this
_EDGE_STATS_NS = 20_000_000  # copy reader counters to the edge rows at most this often
_INPUT_SPIN_S = 200e-6


class Aborted(Exception):
    """The graph is being torn down: leave the loop without draining."""


class SourceStopped(Exception):
    """A source told to stop while it waited for room (a full output or pool): it ends
    normally, and the frame it could not send is released (it never entered the graph)."""


@dataclass
class InputEdge:
    port: str
    queue: str
    policy: str
    edge: int  # row in the graph segment's edge table


@dataclass
class WorkerBlock:
    """Everything a host needs to run one block (sent to its process pickled)."""

    name: str
    index: int  # row in the graph segment's block table
    block_bytes: bytes  # the pickled Block instance
    inputs: list[InputEdge] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)  # port -> queue name
    start: str = "oldest"  # where input readers join ("latest" after a restart)
    block_object: object = None  # thread placement: the Block itself, not a pickled copy


class BlockIO:
    """A running block's ports: pending input frames, allocation and sending."""

    def __init__(self, name: str, block: Block, manager: ShmManager, readers: dict, queues: dict,
                 stop: threading.Event, abort: threading.Event):
        self.name, self.block, self.manager = name, block, manager
        self.readers, self.queues = readers, queues
        self.in_ports, self.out_ports = block.input_ports(), block.output_ports()
        self.pending = {port: [] for port in readers}
        self.closed = dict.fromkeys(readers, False)
        self.stop, self.abort = stop, abort
        # the first *declared* input with a reader (readers come in connection order)
        self.first_input = next((p for p in self.in_ports if p in readers), None)
        self.items_in = self.items_out = 0
        self._handed: dict[str, int] = {}
        self._consumed: dict[str, int] = {}
        self._sent: dict[str, int] = {}
        self._current: list[Frame] = []
        self.timed: list[tuple[int, str, object]] = []  # (at_ns, name, value), sorted; under the lock
        self.bus = None  # the host's message bus, once it is up
        self.row = None  # the block's row in the graph segment (its counters), set by the runner
        self.counter_words = {name: R.COUNTERS + i for i, name in enumerate(block.counters)}

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
            if spec.dtype is not None and array.dtype != spec.dtype and buffer._frame_info() is None:
                array = buffer.numpy(spec.dtype)  # an unrecorded payload: the port says what it is
        except ValueError as e:
            buffer.release()
            raise BlockError(f"block {self.name!r} input {port!r}: {e}") from None
        array.flags.writeable = False  # other readers see the same memory
        return Frame(buffer, array, True)

    # -- one work() call -----------------------------------------------------------------

    def call_work(self):
        batch = self.block.batch
        handed = {port: frames[:batch] for port, frames in self.pending.items()}
        if self.timed:
            self._apply_due(handed)
        self._handed = {port: len(frames) for port, frames in handed.items()}
        self._consumed, self._sent = {}, {}
        self._current = handed[self.first_input] if self.first_input is not None else []
        result = self.block.work(handed)
        if result is None:
            result = OK
        elif not isinstance(result, WorkResult):
            raise BlockError(f"block {self.name!r}: work() returned {result!r}; return None or a "
                             "WorkResult (OK, DONE, INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT, ERROR)")
        if result is ERROR:
            raise BlockError(f"block {self.name!r}: work() returned ERROR")
        keep_all = result in (INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT)
        for port, frames in self.pending.items():
            n = self._consumed.get(port, 0 if keep_all else self._handed[port])
            for frame in frames[:n]:
                frame.buffer.release()
            del frames[:n]
            self.items_in += n
        self._current = []
        return result

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
                if not frame.buffer.released:
                    frame.buffer.release()
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
            return self.manager.allocate(nbytes, timeout)
        while True:
            try:
                return self.manager.allocate(nbytes, SLICE_S)
            except PoolExhaustedError:
                self._check_waiting()

    def send(self, port: str, item, timestamp, time_range) -> None:
        queue = self._out_queue(port)
        k = self._sent.get(port, 0)
        self._sent[port] = k + 1
        if isinstance(item, Frame) and item.is_input:
            if timestamp is not None or time_range is not None:
                raise ValueError(f"block {self.name!r}: a forwarded input frame keeps its timestamp "
                                 "(other readers share it); send frame.array to send a stamped copy")
            buffer = item.buffer.share()  # zero-copy forward
        elif isinstance(item, Frame):
            buffer = item.buffer
            if buffer.released:
                raise BufferReleasedError(f"block {self.name!r}: this frame was already sent")
            self._stamp(buffer, k, timestamp, time_range)
        else:
            buffer = self._copy_in(port, item)
            self._stamp(buffer, k, timestamp, time_range)
        self._push(queue, buffer)
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

    def _push(self, queue: PortQueue, buffer) -> None:
        while True:
            try:
                queue.push(buffer, SLICE_S)
                return
            except TimeoutError:
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


class BlockRunner:
    """One block's thread: start, the work loop, stop, cleanup; stats in its row."""

    def __init__(self, spec: WorkerBlock, manager: ShmManager, graph: R.GraphSegment, report, on_end=None):
        self.spec, self.name = spec, spec.name
        self.block: Block = spec.block_object or pickle.loads(spec.block_bytes)
        self.row = graph.block_rows[spec.index]
        self.graph = graph
        self.report = report  # send a message to the runtime
        self.on_end = on_end  # called when the block's thread is about to end
        self.lock = threading.Lock()  # held around work(): set_parameter from the control thread waits
        self.stop = threading.Event()
        self.abort = threading.Event()
        self.running = threading.Event()  # cleared while paused
        self.running.set()
        self.publish_status = lambda event: None  # set by the host once its bus is up
        self.manager = manager
        self.queues = {port: PortQueue(manager, q, create=False) for port, q in spec.outputs.items()}
        self.readers = {}
        self.thread = None
        self.io = None

    def prepare(self) -> dict:
        """initialize() the block and join its input readers; {port: reader index}."""
        self.row[R.STATE] = R.INITIALIZING
        self.row[R.PID] = os.getpid()
        self.block.initialize()
        joined = {}
        self._edge_counts = []  # (edge row, reader, popped and drops before this reader)
        self._edges_updated_ns = 0
        for edge in self.spec.inputs:
            queue = PortQueue(self.manager, edge.queue, create=False)
            reader = queue.reader(edge.policy, self.spec.start, watch_producer=False, spin=_INPUT_SPIN_S)
            self.readers[edge.port] = reader
            row = self.graph.edge_rows[edge.edge]
            row[R.EDGE_READER] = reader.index
            self._edge_counts.append((row, reader, int(row[R.EDGE_POPPED]), int(row[R.EDGE_DROPS])))
            joined[edge.port] = reader.index
        self.io = BlockIO(self.name, self.block, self.manager, self.readers, self.queues,
                          self.stop, self.abort)
        # a restarted block goes on counting where its predecessor's row stopped
        self.io.items_in, self.io.items_out = int(self.row[R.ITEMS_IN]), int(self.row[R.ITEMS_OUT])
        self.io.row = self.row
        self.block._io = self.io
        self.row[R.STATE] = R.READY
        return joined

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"mq-block-{self.name}", daemon=True)
        self.thread.start()

    # -- commands (from the control thread or the bus) ----------------------------------

    def set_parameter(self, name: str, value, at_ns: int | None = None) -> None:
        """Now (between two work() calls), or at the first input frame stamped at_ns or later."""
        with self.lock:
            if at_ns is None:
                self.block.set_parameter(name, value)
                return
            self.block._check_parameter(name)
            self.io.timed.append((int(at_ns), name, value))
            self.io.timed.sort(key=lambda change: change[0])

    def get_parameter(self, name: str):
        with self.lock:
            return self.block.get_parameter(name)

    def pause(self) -> None:
        self.running.clear()

    def resume(self) -> None:
        self.running.set()

    def request_stop(self) -> None:
        """This block ends as if its inputs ended: it closes its outputs."""
        self.stop.set()
        self.running.set()

    def deliver(self, message) -> None:
        """A message sent to this block's inbox: handed to Block.on_message between two
        work() calls (under the block's lock)."""
        with self.lock:
            self.block.on_message(message)

    def _wait_while_paused(self) -> None:
        while not self.running.wait(SLICE_S):
            if self.abort.is_set():
                raise Aborted()

    def _run(self) -> None:
        row, io = self.row, self.io
        row[R.START_NS] = time.monotonic_ns()
        row[R.STATE] = R.RUNNING
        set_block(self.name)  # the "block=" field of this thread's log lines
        _log.info("started (pid %d)", os.getpid())
        self.publish_status("block-started")
        finished = False
        try:
            self.block.start()
            try:
                if self.block.takes_readers:
                    self._reader_loop()
                elif self.readers:
                    self._consume_loop()
                else:
                    self._source_loop()
            except SourceStopped:
                pass
            if self.abort.is_set():
                raise Aborted()  # the loop ended because of the abort: not a normal end
            with self.lock:
                self.block.stop()  # may still send (flush)
            finished = True
            io.close_outputs()
            row[R.STATE] = R.DONE
            _log.info("done: %d frames in, %d out", io.items_in, io.items_out)
        except Aborted:
            row[R.STATE] = R.STOPPED
            _log.warning("aborted: %d frames in, %d out", io.items_in, io.items_out)
        except BaseException:
            row[R.STATE] = R.FAILED
            row[R.FAILURES] += 1
            _log.exception("failed")
            self.report(("failed", self.name, traceback.format_exc()))
        finally:
            self._finish(finished)
            self.publish_status({R.DONE: "block-done", R.STOPPED: "block-stopped"}.get(
                int(row[R.STATE]), "block-failed"))
            if self.on_end is not None:
                self.on_end()

    def _update_edges(self) -> None:
        for row, reader, popped, drops in self._edge_counts:
            if reader._attached:
                row[R.EDGE_POPPED] = popped + reader.popped
                row[R.EDGE_DROPS] = drops + reader.drops

    def _finish(self, stopped: bool) -> None:
        self.io.release_pending()
        self._update_edges()  # the reader records go with the detach: keep their counts
        for reader in self.readers.values():
            reader.detach()
        try:
            if not stopped and self.row[R.STATE] != R.FAILED:
                self.block.stop()
            self.block.cleanup()
        except BaseException:
            if self.row[R.STATE] != R.FAILED:
                self.row[R.STATE] = R.FAILED
                self.row[R.FAILURES] += 1
                self.report(("failed", self.name, traceback.format_exc()))
        self.block._io = None

    def _work(self, call=None):
        t0 = time.perf_counter_ns()
        with self.lock:
            result = (call or self.io.call_work)()
        row = self.row
        row[R.WORK_NS] += time.perf_counter_ns() - t0
        row[R.WORK_CALLS] += 1
        row[R.ITEMS_IN] = self.io.items_in
        row[R.ITEMS_OUT] = self.io.items_out
        now = row[R.UPDATED_NS] = time.monotonic_ns()
        if self._edge_counts and now - self._edges_updated_ns > _EDGE_STATS_NS:
            self._edges_updated_ns = now
            self._update_edges()
        return result

    def _source_loop(self) -> None:
        while not self.stop.is_set():
            if self.abort.is_set():
                raise Aborted()
            if not self.running.is_set():
                self._wait_while_paused()
                continue
            result = self._work()
            if result is DONE:
                return
            if result is INSUFFICIENT_OUTPUT:
                self.abort.wait(_BACKOFF_S)

    def _reader_loop(self) -> None:
        """A block that pops its inputs itself (takes_readers): work(readers) until DONE;
        it must not wait longer than about SLICE_S per call, so aborts are seen."""
        io, readers = self.io, self.readers

        def call():
            result = self.block.work(readers)
            io.items_in = sum(r.popped for r in readers.values())
            return result

        while not self.stop.is_set():
            if self.abort.is_set():
                raise Aborted()
            if not self.running.is_set():
                self._wait_while_paused()
                continue
            if self._work(call) is DONE:
                return

    def _consume_loop(self) -> None:
        io = self.io
        while not self.stop.is_set():  # stop: a command for this block (sources: the graph's)
            if self.abort.is_set():
                raise Aborted()
            if not self.running.is_set():
                self._wait_while_paused()
                continue
            for port in io.pending:
                io.fill(port)
            if io.exhausted():
                return
            if not io.ready():
                io.wait_input()
                continue
            result = self._work()
            if result is DONE:
                return
            if result is INSUFFICIENT_INPUT and not io.wait_input():
                return  # it wants more, and no more will come
            if result is INSUFFICIENT_OUTPUT:
                self.abort.wait(_BACKOFF_S)


class Host:
    """Runs a group of blocks (one process, or one thread of the runtime's process)."""

    def __init__(self, domain: str, prefix: str, specs: list[WorkerBlock], conn, process_name: str):
        self.domain, self.prefix, self.specs = domain, prefix, specs
        self.conn = conn
        self.process_name = process_name
        self._send_lock = threading.Lock()
        self._ended_r, self._ended_w = os.pipe()  # a block's thread ended: wakes the control loop
        self._runtime_gone = False

    def report(self, message) -> None:
        with self._send_lock:
            try:
                self.conn.send(message)
            except (OSError, EOFError):
                pass  # the runtime is gone; our work ends with the queues

    def serve(self) -> None:
        domain_logger(self.domain, process_name=self.process_name)
        manager = ShmManager(self.domain, create=False, name=self.process_name[:31], reaper_interval=None)
        graph = bus = None
        runners: list[BlockRunner] = []
        try:
            graph = R.GraphSegment.open(self.prefix, self.domain)
            bus = Bus(manager)
            for spec in self.specs:
                runner = BlockRunner(spec, manager, graph, self.report, self._block_ended)
                runners.append(runner)
                joined = runner.prepare()
                self._serve_bus(bus, runner)  # before "ready": commands work once start() returns
                self.report(("ready", spec.name, joined))
            if self._wait_for_start(runners):
                for runner in runners:
                    runner.start()
                self._control(runners)
        except BaseException:
            self.report(("failed", self.specs[0].name if not runners else runners[-1].name,
                         traceback.format_exc()))
        finally:
            for runner in runners:
                if runner.thread is None and runner.io is not None:  # told to stop before it started
                    runner.row[R.STATE] = R.STOPPED
                    runner._finish(False)
                    with contextlib.suppress(Exception):
                        runner.io.close_outputs()  # downstream blocks end instead of waiting for it
            if bus is not None:
                bus.close()
            if graph is not None:
                graph.close()
            manager.shutdown()
            os.close(self._ended_r)
            os.close(self._ended_w)
            self.report(("exit",))

    def _wait_for_start(self, runners) -> bool:
        while True:
            message = self._recv(None)
            if message is None or message[0] in ("stop", "abort"):
                return False
            if message[0] == "start":
                return True
            self._handle(message, runners)

    def _block_ended(self) -> None:
        os.write(self._ended_w, b"x")

    def _control(self, runners) -> None:
        """Serve commands until every block's thread has ended."""
        ended = 0
        while ended < len(runners):
            waitables = [self._ended_r] if self._runtime_gone else [self.conn, self._ended_r]
            ready = multiprocessing.connection.wait(waitables, timeout=SLICE_S)
            if self._ended_r in ready:
                ended += len(os.read(self._ended_r, 64))
            if self.conn in ready:
                self._handle(self._recv(None), runners)
        for runner in runners:
            runner.thread.join()

    def _recv(self, timeout):
        try:
            if timeout is not None and not self.conn.poll(timeout):
                return None
            return self.conn.recv()
        except (EOFError, OSError):
            self._runtime_gone = True  # its end of the pipe stays readable: stop watching it
            return ("abort",)  # the runtime died: stop everything

    def _handle(self, message, runners) -> None:
        kind = message[0]
        if kind == "stop":  # the graph stops: its sources end, the rest drains after them
            for r in runners:
                if not r.readers:
                    r.stop.set()
        elif kind == "abort":
            for r in runners:
                r.stop.set()
                r.abort.set()

    def _serve_bus(self, bus: Bus, runner: "BlockRunner") -> None:
        """A block answers commands on its topic ``ctl-<block>``: set / get a parameter
        (``at_ns``: at the first input frame stamped at or after it), pause, resume (or
        start), stop.  Answers: ``{"ok": true, "value": ...}`` or ``{"ok": false,
        "error": "..."}``."""
        bus.subscribe(control_topic(runner.name), callback=lambda m: self._command(bus, runner, m))
        bus.inbox(runner.name, callback=runner.deliver)  # bus.send(block, ...): Block.on_message
        runner.io.bus = bus  # Block.bus: the block's own publishing and sending
        runner.publish_status = lambda event: self._publish_status(bus, runner.name, event)

    @staticmethod
    def _publish_status(bus: Bus, block: str, event: str) -> None:
        try:
            bus.publish("status", {"event": event, "block": block, "pid": os.getpid()}, timeout=0)
        except Exception:  # noqa: BLE001 - events are best effort
            _log.warning("could not publish the status event %s", event)

    @staticmethod
    def _command(bus: Bus, runner: "BlockRunner", message) -> None:
        data = message.data if isinstance(message.data, dict) else {}
        try:
            command = data.get("cmd")
            value = None
            if command == "set":
                runner.set_parameter(data["name"], data.get("value"), data.get("at_ns"))
            elif command == "get":
                value = runner.get_parameter(data["name"])
            elif command == "pause":
                runner.pause()
            elif command in ("resume", "start"):
                runner.resume()
            elif command == "stop":
                runner.request_stop()
            else:
                raise ValueError(f"unknown command {command!r}: set, get, pause, resume, start, stop")
            bus.reply(message, {"ok": True, "value": value})
        except Exception as e:  # noqa: BLE001 - the requester gets the error text
            bus.reply(message, {"ok": False, "error": f"{type(e).__name__}: {e}"})


def host_main(domain: str, prefix: str, specs: list[WorkerBlock], conn, process_name: str) -> None:
    """Entry point of a worker process (started with spawn)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the runtime, which stops us in order
    Host(domain, prefix, specs, conn, process_name).serve()
