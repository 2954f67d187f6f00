"""BlockRunner: one block's life in its host (initialize, its thread's loop, stop, cleanup)."""

import logging
import os
import pickle
import threading
import time
import traceback
from dataclasses import dataclass, field

from ..control.log import set_block
from ..shm import ShmManager
from ..stream.queue import PortQueue
from . import registry as R
from .block import DONE, INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT, Block
from .blockio import SLICE_S, Aborted, BlockIO, SourceStopped
from .losses import count_inputs, finish_inputs

_log = logging.getLogger("mq.runner")
_BACKOFF_S = 0.002  # INSUFFICIENT_OUTPUT: nothing to sleep on, retry after this
_EDGE_STATS_NS = 20_000_000  # copy reader counters to the edge rows at most this often
_RATE_WINDOW_NS = 1_000_000_000  # the instantaneous rates are over the last window this long
_INPUT_SPIN_S = 200e-6
_END_EVENTS = {R.DONE: "block-done", R.STOPPED: "block-stopped"}  # else "block-failed"


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


class BlockRunner:
    """One block's thread: start, the work loop, stop, cleanup; stats in its row.

    ``report``: sends a message to the runtime; ``on_end``: called when the block's
    thread is about to end."""

    def __init__(self, spec: WorkerBlock, manager: ShmManager, graph: R.GraphSegment, report, on_end=None):
        self.spec, self.name = spec, spec.name
        self.block: Block = spec.block_object or pickle.loads(spec.block_bytes)
        self.row = graph.block_rows[spec.index]
        self.graph = graph
        self.report, self.on_end = report, on_end
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
        self._edge_counts = {}  # {input port: losses.EdgeCount}, once its readers joined
        self._edges_updated_ns = 0
        self._window_ns = 0  # when the current rate window started (its WINDOW_NS word)
        self._stopped = False  # block.stop() was called

    def prepare(self) -> dict:
        """initialize() the block and join its input readers; {port: reader index}."""
        self.row[R.STATE] = R.INITIALIZING
        self.row[R.WAIT] = R.WAIT_NONE  # a restarted block's predecessor may have died waiting
        self.row[R.PID] = os.getpid()
        self.block.initialize()
        joined, edge_rows = {}, {}
        for edge in self.spec.inputs:
            queue = PortQueue(self.manager, edge.queue, create=False)
            reader = queue.reader(edge.policy, self.spec.start, watch_producer=False, spin=_INPUT_SPIN_S)
            self.readers[edge.port] = reader
            edge_rows[edge.port] = self.graph.edge_rows[edge.edge]
            joined[edge.port] = reader.index
        self.io = BlockIO(self.name, self.block, self.manager, self.readers, self.queues,
                          self.stop, self.abort, self.row)
        # a restarted block goes on counting where its predecessor's row stopped
        self.io.items_in, self.io.items_out = int(self.row[R.ITEMS_IN]), int(self.row[R.ITEMS_OUT])
        self._edge_counts = self.io.edge_counts = count_inputs(  # exact losses: graph/losses.py
            edge_rows, self.readers, self.queues, self.io.items_out, restarted=self.spec.start == "latest",
            pops_itself=self.block.takes_readers)
        self.block.bind(self.io)
        self.row[R.STATE] = R.READY
        return joined

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name=f"mq-block-{self.name}", daemon=True)
        self.thread.start()

    def abandon(self) -> None:
        """Told to stop before it started: end it, and close its outputs so that the
        blocks downstream end instead of waiting for it."""
        self.row[R.STATE] = R.STOPPED
        self._finish()
        try:
            self.io.close_outputs()
        except Exception:  # noqa: BLE001 - the host is going down; the runtime closes them too
            _log.debug("could not close the outputs of %s", self.name, exc_info=True)

    # -- commands (from the control thread or the bus) ----------------------------------

    def set_parameter(self, name: str, value, at_ns: int | None = None) -> None:
        """Now (between two work() calls), or at the first input frame stamped at_ns or later."""
        with self.lock:
            if at_ns is None:
                self.block.set_parameter(name, value)
                return
            value = self.block.check_value(name, value)  # refused now, not when it is due
            self.io.add_timed(at_ns, name, value)

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

    # -- the block's thread ---------------------------------------------------------------

    def _run(self) -> None:
        row = self.row
        now = time.monotonic_ns()
        if not row[R.START_NS]:  # a restarted block's average rates run from its first start
            row[R.START_NS] = now
        self._start_rate_windows(now)
        row[R.STATE] = R.RUNNING
        set_block(self.name)  # the "block=" field of this thread's log lines
        _log.info("started (pid %d)", os.getpid())
        self.publish_status("block-started")
        try:
            self._lifetime()
        except Aborted:
            row[R.STATE] = R.STOPPED
            _log.warning("aborted: %d frames in, %d out", self.io.items_in, self.io.items_out)
        except BaseException:
            self._failed()
        finally:
            self._finish()
            self.publish_status(_END_EVENTS.get(int(row[R.STATE]), "block-failed"))
            if self.on_end is not None:
                self.on_end()

    def _lifetime(self) -> None:
        """start(), the loop that fits the block, stop(), closing its outputs."""
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
            self._stopped = True
            self.block.stop()  # may still send (flush)
        self.io.close_outputs()
        self.row[R.STATE] = R.DONE
        _log.info("done: %d frames in, %d out", self.io.items_in, self.io.items_out)

    def _failed(self) -> None:
        self.row[R.STATE] = R.FAILED
        self.row[R.FAILURES] += 1
        _log.exception("failed")
        self.report(("failed", self.name, traceback.format_exc()))

    def _finish(self) -> None:
        """Release the pending inputs, leave the input queues, stop() if it was not
        (and it did not fail), cleanup() always."""
        self.io.release_pending()
        # leave the inputs, counting what this life received and lost (a failed work()
        # call's frames too: its counts were not copied to the row)
        credited = finish_inputs(self._edge_counts, self.io.items_out, self.row[R.STATE] != R.DONE)
        self.row[R.ITEMS_IN], self.row[R.ITEMS_OUT] = self.io.items_in + credited, self.io.items_out
        self.row[R.UPDATED_NS] = time.monotonic_ns()  # its rates are over its run, not up to now
        for reader in self.readers.values():
            reader.detach()  # (finish_inputs did; a reader without a count must not stay)
        try:
            if not self._stopped and self.row[R.STATE] != R.FAILED:
                self.block.stop()
            self.block.cleanup()
        except BaseException:
            if self.row[R.STATE] != R.FAILED:
                self.row[R.STATE] = R.FAILED
                self.row[R.FAILURES] += 1
                self.report(("failed", self.name, traceback.format_exc()))
        self.block.bind(None)

    def _update_edges(self) -> None:
        for count in self._edge_counts.values():
            count.update()

    def _start_rate_windows(self, now: int) -> None:
        """Both rate windows start now, from the counts the row has (a restarted block's)."""
        row = self.row
        row[R.PREVIOUS_IN] = row[R.WINDOW_IN] = row[R.ITEMS_IN]
        row[R.PREVIOUS_OUT] = row[R.WINDOW_OUT] = row[R.ITEMS_OUT]
        row[R.PREVIOUS_NS] = row[R.WINDOW_NS] = self._window_ns = now

    def _roll_rate_window(self, now: int) -> None:
        """The current window (a second old) becomes the previous one; a new one starts
        now.  Counts before times: a reader never pairs a new start with old counts."""
        row = self.row
        row[R.PREVIOUS_IN], row[R.PREVIOUS_OUT] = row[R.WINDOW_IN], row[R.WINDOW_OUT]
        row[R.PREVIOUS_NS] = row[R.WINDOW_NS]
        row[R.WINDOW_IN], row[R.WINDOW_OUT] = row[R.ITEMS_IN], row[R.ITEMS_OUT]
        row[R.WINDOW_NS] = self._window_ns = now

    def _work(self, call=None):
        """One work() call under the lock, timed, its counts copied to the block's row."""
        if self.io.wait_kind:
            self.io.clear_wait()  # what it waited for (an input) came
        t0 = time.perf_counter_ns()
        with self.lock:
            result = (call or self.io.call_work)()
        row = self.row
        row[R.WORK_NS] += time.perf_counter_ns() - t0
        row[R.WORK_CALLS] += 1
        row[R.ITEMS_IN] = self.io.items_in
        row[R.ITEMS_OUT] = self.io.items_out
        now = row[R.UPDATED_NS] = time.monotonic_ns()
        if now - self._window_ns >= _RATE_WINDOW_NS:
            self._roll_rate_window(now)
        if self._edge_counts and now - self._edges_updated_ns > _EDGE_STATS_NS:
            self._edges_updated_ns = now
            self._update_edges()
        return result

    def _go_on(self) -> bool:
        """Between two work() calls: False to leave the loop (stop), Aborted to abort;
        waits here while paused."""
        while True:
            if self.stop.is_set():
                return False
            if self.abort.is_set():
                raise Aborted()
            if self.running.is_set():
                return True
            self.io.set_wait(R.WAIT_PAUSED)  # cleared by the next work() call
            self.running.wait(SLICE_S)

    def _source_loop(self) -> None:
        while self._go_on():
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

        while self._go_on():
            if self._work(call) is DONE:
                return

    def _consume_loop(self) -> None:
        io = self.io
        while self._go_on():  # stop: a command for this block (sources: the graph's)
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
