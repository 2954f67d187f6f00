"""Exact counts of every edge: each frame sent on it was received by its consumer or
is counted as dropped, through the consumer's restarts and failures.

A queue numbers its items: a push while any reader is attached takes the next sequence
number; one with no reader at all gets none and only counts as *unheard*
(``PortQueue.unheard``).  Each life of a consumer (its first worker, then each one
that replaced it) joins the queue at a sequence number J and leaves it at another,
END (its reader's cursor once detached: by itself, or by a reaper after its death).
Every frame in [J, END) it *received* (popped and finished) or lost: dropped by its
drop_oldest reader, popped but not finished, or unread when it left.  The frames
numbered from one life's END to the next one's J, and the unheard pushes meanwhile,
were sent while it was away: lost too.  So, once the queue is drained,
``sent = received + dropped`` exactly; only a kill inside the few instructions of a
C call (a push or a pop) can be off by one, as docs/shm.md says of such windows.

What a life finished is its edge's *work word*, stored after each ``work()`` call
(one word: a kill never splits it): the frames its calls finished, and its output
count then.  Of the call a kill or an exception interrupted, a frame counts as
received for each output frame that call had already sent (exact for blocks that
send one frame per input frame, the usual 1:1 block; a decimating block's
interrupted call counts fewer).  Blocks that pop their inputs themselves
(``takes_readers``) finish what they pop.
"""

import logging
import os

from ..stream.queue import PortQueue, QueueReader, ReaderTotals
from . import registry as R

OUT_BITS = 24  # the work word: frames finished << OUT_BITS | output count mod 2**OUT_BITS
OUT_MASK = (1 << OUT_BITS) - 1
_WORK = R.EDGE_WORK
_log = logging.getLogger("mq.runner")


class EdgeCount:
    """One input edge of a running block, in the block's process: copies its reader's
    counts into the edge row, stores the work word after each work() call, and
    counts the end of this life.  Made once its reader joined (``restarted``: this
    life replaces one that ended: the frames sent meanwhile are dropped)."""

    __slots__ = ("row", "words", "reader", "pops_itself", "offset", "done", "base_popped", "base_drops",
                 "joined")

    def __init__(self, row, reader: QueueReader, outputs_pushed: int, items_out: int, *,
                 restarted: bool, pops_itself: bool):
        self.row, self.reader, self.pops_itself = row, reader, pops_itself
        self.words = memoryview(row)  # a store through it costs half a numpy one: commit() is per call
        # the block's output count (items_out) and its queues' pushes differ by this:
        # the work word holds the latter, which a supervisor can read after a kill
        self.offset = outputs_pushed - items_out
        self.done = 0
        self.joined, unheard = reader.joined_seq, reader.queue.unheard
        if restarted and row[R.EDGE_END] >= 0:  # the frames sent while no life of it listened
            away = self.joined - int(row[R.EDGE_END]) + unheard - int(row[R.EDGE_UNHEARD])
            row[R.EDGE_DROPS] += max(0, away)
        self.base_popped, self.base_drops = int(row[R.EDGE_POPPED]), int(row[R.EDGE_DROPS])
        row[R.EDGE_BASE_POPPED], row[R.EDGE_BASE_DROPS] = self.base_popped, self.base_drops
        row[R.EDGE_JOINED], row[R.EDGE_UNHEARD] = self.joined, unheard
        row[R.EDGE_WORK] = outputs_pushed & OUT_MASK
        row[R.EDGE_READER] = reader.index
        row[R.EDGE_END] = -1  # last: from now on a supervisor finding this life dead counts it

    def commit(self, finished: int, items_out: int) -> None:
        """After a work() call that finished ``finished`` frames of this input: one
        store of the work word (per call, not per frame)."""
        self.done = done = self.done + finished
        self.words[_WORK] = done << OUT_BITS | ((items_out + self.offset) & OUT_MASK)

    def update(self) -> None:
        """Copy the reader's counts to the row (now and then while the block runs)."""
        if self.reader.attached:  # a block that pops itself (takes_readers) may have detached it
            self.row[R.EDGE_POPPED] = self.base_popped + self.reader.popped
            self.row[R.EDGE_DROPS] = self.base_drops + self.reader.drops

    def finish(self, items_out: int, interrupted: bool) -> int:
        """The life ends: leave the queue (unread frames are released: dropped) and
        count the end; returns the frames of an ``interrupted`` work() call (one
        that raised) counted as received, which the block's items_in lacks."""
        popped, drops = self.reader.popped, self.reader.drops
        self.reader.detach()
        self.words.release()
        queue: PortQueue = self.reader.queue
        totals = queue.departed(self.reader.index, os.getpid(), self.joined) or \
            ReaderTotals(popped, drops, self.joined + popped + drops)  # the slot was taken at once
        sent = sent_since(self.row, items_out + self.offset) if interrupted else 0
        return end_life(self.row, totals, sent, self.pops_itself)


def end_life(row, totals: ReaderTotals, sent_since: int, pops_itself: bool) -> int:
    """Count the end of a consumer's life into its edge row: the received and dropped
    totals, where it ended, and what its end lost.  ``totals``: its reader's last
    counts; ``sent_since``: output frames it pushed after its last work word (by a call
    that did not finish).  Returns the frames of that call counted as received."""
    word = int(row[R.EDGE_WORK])
    done = word >> OUT_BITS
    credited = 0 if pops_itself else min(sent_since, max(0, totals.popped - done))
    finished = totals.popped if pops_itself else done + credited
    life = totals.end - int(row[R.EDGE_JOINED])  # every frame numbered for this life
    row[R.EDGE_POPPED] = int(row[R.EDGE_BASE_POPPED]) + finished
    row[R.EDGE_DROPS] = int(row[R.EDGE_BASE_DROPS]) + max(0, life - finished)
    row[R.EDGE_LAST_LOSS] = max(0, life - finished - totals.drops)  # held or unread at the end
    row[R.EDGE_END] = totals.end
    return credited


def end_dead_life(row, queue: PortQueue, pid: int, outputs_pushed: int, pops_itself: bool) -> int | None:
    """Count the end of a consumer's life whose process died (``pid``; the supervisor
    calls this before a restart, once the dead process's reader was reaped or here);
    ``queue``: the edge's queue, ``outputs_pushed``: what the block's output queues
    were pushed in all.  Returns the frames credited as received by the call the
    death interrupted, or None if this life was counted already (it ended by itself)
    or never joined."""
    if row[R.EDGE_END] != -1:
        return None
    joined = int(row[R.EDGE_JOINED])
    totals = queue.departed(int(row[R.EDGE_READER]), pid, joined)
    if totals is None:  # its slot was taken before we looked: its last copied counts
        popped = int(row[R.EDGE_POPPED] - row[R.EDGE_BASE_POPPED])
        drops = int(row[R.EDGE_DROPS] - row[R.EDGE_BASE_DROPS])
        totals = ReaderTotals(popped, drops, joined + popped + drops)
    return end_life(row, totals, sent_since(row, outputs_pushed), pops_itself)


def sent_since(row, outputs_pushed: int) -> int:
    """Output frames pushed since the edge's work word was stored (``outputs_pushed``:
    the block's output pushes in all, in the same count as the word's)."""
    return (outputs_pushed - (int(row[R.EDGE_WORK]) & OUT_MASK)) & OUT_MASK


def count_inputs(rows: dict, readers: dict, outputs: dict, items_out: int, *, restarted: bool,
                 pops_itself: bool) -> dict[str, EdgeCount]:
    """{input port: EdgeCount} of a block whose readers just joined (``rows``: each
    input's edge row; ``outputs``: its output PortQueues; ``items_out``: its output
    count so far, a restarted block's predecessors' included)."""
    pushed = sum(q.pushed for q in outputs.values())
    return {port: EdgeCount(rows[port], reader, pushed, items_out, restarted=restarted,
                            pops_itself=pops_itself) for port, reader in readers.items()}


def finish_inputs(counts: dict[str, EdgeCount], items_out: int, interrupted: bool) -> int:
    """End every input's life (see EdgeCount.finish); the frames credited in all."""
    credited = 0
    for port, count in counts.items():
        try:
            credited += count.finish(items_out, interrupted)
        except Exception:  # noqa: BLE001 - counting must not keep the block from its cleanup()
            _log.exception("could not count what input %r received and lost", port)
            count.reader.detach()
    return credited


def end_dead_block(spec, name: str, block_row, edge_rows, queues: dict) -> None:
    """A block's worker died (SIGKILL, say): count the end of its life on each input
    edge it had not counted itself, and set its items in and out to what it did (out:
    its output queues' pushes, counted in C with each push, so a frame sent just before
    the kill counts).  ``spec``: the GraphSpec; ``edge_rows``: the graph segment's;
    ``queues``: the runtime's {(block, port): PortQueue}."""
    handle = spec.blocks[name]
    pushed = sum(queues[(name, port)].pushed for port in handle.outputs)
    pid, pops_itself = int(block_row[R.PID]), handle.block.takes_readers
    inputs = [e for e in spec.edges if e.dst.block == name]
    counted = [end_dead_life(edge_rows[e.index], queues[(e.src.block, e.src.port)], pid, pushed, pops_itself)
               for e in inputs]
    if any(c is not None for c in counted):  # its items in are what its inputs received
        block_row[R.ITEMS_IN] = sum(int(edge_rows[e.index][R.EDGE_POPPED]) for e in inputs)
    block_row[R.ITEMS_OUT] = pushed


def last_losses(spec, names, edge_rows) -> dict[str, int]:
    """{edge: frames lost when its consumer's last life ended} for the inputs of these
    blocks (those it held, popped but unfinished, or had unread), where any were lost."""
    lost = {f"{e.src} -> {e.dst}": int(edge_rows[e.index][R.EDGE_LAST_LOSS])
            for e in spec.edges if e.dst.block in names}
    return {edge: n for edge, n in lost.items() if n}


def close_books(spec, edge_rows, queues: dict) -> None:
    """The graph is over: frames pushed on an edge after its consumer's last life ended
    (a consumer that failed and was not restarted, or finished early) were sent and
    never received: dropped.  While a life was attached, its queue's unheard count did
    not change, so the pushes up to its end were END + UNHEARD."""
    for e in spec.edges:
        row, queue = edge_rows[e.index], queues.get((e.src.block, e.src.port))
        if queue is None or row[R.EDGE_END] < 0:  # not made; or a consumer still running (a
            continue  # thread that would not stop)
        after = queue.pushed - int(row[R.EDGE_END]) - int(row[R.EDGE_UNHEARD])
        if after > 0:
            row[R.EDGE_DROPS] += after
            row[R.EDGE_END] += after  # counted: never twice
