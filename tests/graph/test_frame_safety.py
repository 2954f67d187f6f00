"""A sent or released frame cannot be written through any more (iceoryx2's lesson): its
``frame.array`` raises BufferReleasedError, and the array it gave out before is read-only."""

import numpy as np
import pytest

from multiqueue.errors import BufferReleasedError
from multiqueue.graph import DONE, Block, Frame, Port, Runtime

N = 20
F32x8 = Port(np.float32, (8,))


class SendThenWrite(Block):
    """Sends frame k filled with k, then tries to write through the frame and through the
    array it had: counts what stopped each attempt."""

    outputs = {"out": F32x8}
    counters = ("array_raised", "view_read_only", "wrote")

    def __init__(self):
        super().__init__()
        self.sent = 0

    def work(self, inputs):
        if self.sent == N:
            return DONE
        frame = self.allocate("out")
        array = frame.array
        array[:] = self.sent
        self.send("out", frame)
        self.sent += 1
        try:
            frame.array[:] = -1
            self.count("wrote")
        except BufferReleasedError as e:
            if "frame was sent on 'out'" in str(e):
                self.count("array_raised")
        try:
            array[:] = -1
            self.count("wrote")
        except ValueError as e:
            if "read-only" in str(e):
                self.count("view_read_only")
        return None


class CheckSink(Block):
    """Counts frames whose payload is not their sequence number (a write that got through)."""

    inputs = {"in": F32x8}
    counters = ("frames", "corrupt")

    def work(self, inputs):
        for frame in inputs["in"]:
            if not np.all(frame.array == self.counter("frames")):
                self.count("corrupt")
            self.count("frames")


def test_a_sent_frame_cannot_be_written_in_a_worker_process(domain):
    rt = Runtime(domain)
    src = rt.add(SendThenWrite(), "src")
    rt.connect(src["out"], rt.add(CheckSink(), "sink")["in"])
    rt.run(duration=60)
    assert rt.final_stats.blocks["src"].counters == {"array_raised": N, "view_read_only": N, "wrote": 0}
    assert rt.final_stats.blocks["sink"].counters == {"frames": N, "corrupt": 0}
    assert rt.blocks_in_use_at_end == 0


class KeepsInputs(Block):
    """Keeps the frame of the previous work() call and tries to read it in the next one."""

    inputs = {"in": F32x8}
    counters = ("kept_raised",)
    batch = 1

    def __init__(self):
        super().__init__()
        self.kept = None

    def work(self, inputs):
        if self.kept is not None:
            try:
                self.kept.array.sum()
            except BufferReleasedError as e:
                if "released after the work() call" in str(e):
                    self.count("kept_raised")
        self.kept = inputs["in"][0]


def test_an_input_frame_kept_past_its_work_call_raises(domain):
    rt = Runtime(domain)
    src = rt.add(SendThenWrite(), "src", placement="thread")
    rt.connect(src["out"], rt.add(KeepsInputs(), "keeper", placement="thread")["in"])
    rt.run(duration=60)
    assert rt.final_stats.blocks["keeper"].counters == {"kept_raised": N - 1}


def test_a_released_frame_stops_working_in_process(manager):
    buffer = manager.allocate(32)
    frame = Frame(buffer, buffer.numpy(np.float32))
    array = frame.array
    array[:] = 1.0
    frame.release()
    assert buffer.released
    with pytest.raises(BufferReleasedError, match="this frame was released"):
        frame.array  # noqa: B018 - the read is the test
    with pytest.raises(ValueError, match="read-only"):
        array[0] = 2.0
    with pytest.raises(BufferReleasedError):
        frame.release()
    assert repr(frame) == "<Frame released>"
