"""Blocks of the chaos graph (imported by name in the worker processes).

Every frame carries its sequence number: frame ``seq`` holds ``seq * FRAME + 0 ..
FRAME - 1`` (int64), so a reader can tell its number, its order and whether its
memory is intact.  A sink keeps its tally in one counter word of the graph segment
(``state``: received, lost and the next expected number packed together), written
with one 8-byte store per frame: a SIGKILL between two frames leaves a consistent
tally for the restarted sink to go on from.
"""

import numpy as np

from multiqueue.graph import DONE, OK, Block, Port

FRAME = 64  # int64 values per frame
FIELD_BITS = 21  # received, lost and next expected, each in 21 bits of the sink's state word
FIELD_MAX = (1 << FIELD_BITS) - 1
_RAMP = np.arange(FRAME, dtype=np.int64)


def payload(seq: int) -> np.ndarray:
    return seq * FRAME + _RAMP


def frame_seq(array: np.ndarray) -> int | None:
    """The sequence number of a frame, or None if its contents are not a chaos frame."""
    if array.shape != (FRAME,) or array[0] % FRAME:
        return None
    seq = int(array[0]) // FRAME
    return seq if np.array_equal(array, seq * FRAME + _RAMP) else None


def pack(received: int, lost: int, expected: int) -> int:
    return received | lost << FIELD_BITS | expected << 2 * FIELD_BITS


def unpack(word: int) -> tuple[int, int, int]:
    """(received, lost, next expected sequence number) of a sink's state word."""
    return word & FIELD_MAX, word >> FIELD_BITS & FIELD_MAX, word >> 2 * FIELD_BITS & FIELD_MAX


class SeqSource(Block):
    """Numbered frames, one every ``pace_s`` seconds, until the graph stops.  The
    counter ``sent`` is the number of frames pushed."""

    outputs = {"out": Port(np.int64, (FRAME,))}
    counters = ("sent",)

    def __init__(self, pace_s=0.002):
        super().__init__()
        self.pace_s = pace_s

    def work(self, inputs):
        if not self.sleep(self.pace_s):
            return DONE
        seq = self.counter("sent")
        if seq >= FIELD_MAX:
            raise OverflowError("the chaos source ran out of sequence numbers (FIELD_BITS)")
        out = self.allocate("out")
        out.array[:] = payload(seq)
        self.send("out", out)
        self.set_counter("sent", seq + 1)
        return OK


class Forward(Block):
    """Forwards its input frames (no copy: the same pool blocks go on)."""

    inputs = {"in": Port(np.int64, (FRAME,))}
    outputs = {"out": Port(np.int64, (FRAME,))}

    def work(self, inputs):
        for frame in inputs["in"]:
            self.send("out", frame)


class Copy(Block):
    """Copies each input frame into a block of its own (it allocates while it may be killed)."""

    inputs = {"in": Port(np.int64, (FRAME,))}
    outputs = {"out": Port(np.int64, (FRAME,))}

    def work(self, inputs):
        for frame in inputs["in"]:
            out = self.allocate("out")
            np.copyto(out.array, frame.array)
            self.send("out", out)


class SeqSink(Block):
    """Checks and counts numbered frames: ``state`` (see unpack), ``dups`` (frames at
    or behind the last one: out of order or twice) and ``corrupt`` (not a chaos frame)."""

    inputs = {"in": Port(np.int64, (FRAME,))}
    counters = ("state", "dups", "corrupt")

    def work(self, inputs):
        received, lost, expected = unpack(self.counter("state"))
        for frame in inputs["in"]:
            seq = frame_seq(frame.array)
            if seq is None:
                self.count("corrupt")
            elif seq < expected:
                self.count("dups")
            else:
                received, lost, expected = received + 1, lost + seq - expected, seq + 1
                self.set_counter("state", pack(received, lost, expected))  # one store: kill-safe
