"""Built-in blocks: sources, transforms and sinks for the common cases.

Sources: NullSource, SignalSource (sine / noise / chirp), FileSource (raw, .npy).
Transforms: Multiply (alias Amplifier), Add, Spectrum, Decimate, Throttle, Tee,
SyncMerge.  Sinks: NullSink, FileSink, Probe.  Every one is an ordinary Block: read
them as examples; their parameters are in docs/graphs.md, "Built-in blocks".
"""

import os
import threading
import time

import numpy as np

from ..checks import check_int, check_number, check_path, check_shape, show
from ..errors import QueueClosedError
from ..stream.sync import POLICIES as SYNC_POLICIES
from ..stream.sync import SyncReader
from .block import DONE, INSUFFICIENT_INPUT, OK, Block, Frame, Port
from .params import Param

F32 = Port(np.float32)
MAX_BRANCHES = 64  # the most outputs of a Tee, or streams of a SyncMerge


# -- sources ---------------------------------------------------------------------------


class NullSource(Block):
    """Frames of zeros, ``count`` of them (None: until stopped)."""

    outputs = {"out": Port()}

    def __init__(self, frame=(1024,), dtype=np.float32, count: int | None = None):
        super().__init__()
        check_shape("frame", frame)
        self.frame, self.dtype, self.count = frame, np.dtype(dtype), check_int("count", count, 0, none=True)
        self.sent = 0

    def work(self, inputs):
        if self.count is not None and self.sent >= self.count:
            return DONE
        out = self.allocate("out", self.frame, self.dtype)
        out.array[...] = 0
        self.send("out", out)
        self.sent += 1
        return OK


class SignalSource(Block):
    """float32 frames of a sine, white noise or linear chirp sampled at ``rate``.

    Frame k covers samples [k * frame, (k + 1) * frame): its time range is that
    span on the monotonic clock from the start, and its timestamp the first sample's
    time.  ``realtime=True`` paces frames at the sample rate (else as fast as the
    graph takes them).  ``count`` frames, or until stopped.  ``align_ns`` starts the
    clock at a multiple of that many nanoseconds, so that sources in different
    processes share a time grid (for timestamp sync).

    ``rate``, ``frame`` and ``chirp_period`` are positive, ``frame`` an int; ``count``
    None or an int >= 0; ``align_ns`` an int >= 0; the others finite numbers.
    """

    outputs = {"out": F32}
    parameters = {"frequency": Param(float), "amplitude": Param(float)}

    def __init__(self, waveform: str = "sine", rate: float = 48_000.0, frame: int = 1024,
                 frequency: float = 1_000.0, amplitude: float = 1.0, chirp_to: float | None = None,
                 chirp_period: float = 1.0, count: int | None = None, realtime: bool = False,
                 seed: int | None = None, align_ns: int = 0):
        super().__init__()
        if not isinstance(waveform, str) or waveform not in ("sine", "noise", "chirp"):
            raise ValueError(f"waveform must be 'sine', 'noise' or 'chirp', not {show(waveform)}")
        rate, frame = check_number("rate", rate), check_int("frame", frame)
        if rate <= 0 or frame <= 0:
            raise ValueError("rate and frame must be positive")
        self.waveform, self.rate, self.frame = waveform, rate, frame
        self.frequency = check_number("frequency", frequency)
        self.amplitude = check_number("amplitude", amplitude)
        self.chirp_to = check_number("chirp_to", chirp_to if chirp_to is not None else rate / 4)
        self.chirp_period = check_number("chirp_period", chirp_period, positive=True)
        self.count = check_int("count", count, 0, none=True)
        self.realtime, self.seed = realtime, seed
        self.align_ns = check_int("align_ns", align_ns, 0)
        self.sent = 0

    def start(self):
        self._rng = np.random.default_rng(self.seed)
        self._t0 = time.monotonic_ns()
        if self.align_ns > 0:
            self._t0 = -(-self._t0 // self.align_ns) * self.align_ns  # the next multiple
        self._phase = 0.0
        self._n = np.arange(self.frame, dtype=np.float64)

    def work(self, inputs):
        if self.count is not None and self.sent >= self.count:
            return DONE
        first = self.sent * self.frame
        start_ns = self._t0 + round(first * 1e9 / self.rate)
        end_ns = self._t0 + round((first + self.frame) * 1e9 / self.rate)
        if self.realtime and not self.sleep((start_ns - time.monotonic_ns()) / 1e9):
            return DONE
        out = self.allocate("out", (self.frame,))
        out.array[:] = self._samples(first)
        self.send("out", out, timestamp=start_ns, time_range=(start_ns, end_ns))
        self.sent += 1
        return OK

    def _samples(self, first: int) -> np.ndarray:
        if self.waveform == "noise":
            return self.amplitude * self._rng.standard_normal(self.frame)
        if self.waveform == "sine":
            phase = self._phase + 2 * np.pi * self.frequency / self.rate * self._n
            self._phase = float((phase[-1] + 2 * np.pi * self.frequency / self.rate) % (2 * np.pi))
            return self.amplitude * np.sin(phase)
        t = ((first + self._n) / self.rate) % self.chirp_period  # sweep frequency -> chirp_to
        slope = (self.chirp_to - self.frequency) / self.chirp_period
        return self.amplitude * np.sin(2 * np.pi * (self.frequency * t + 0.5 * slope * t * t))


class FileSource(Block):
    """Frames read from a file: ``.npy`` (frames along the first axis) or raw
    samples of ``dtype`` cut into frames of ``frame`` items (a short last frame is
    sent as is).  ``loop=True`` starts over at the end; else DONE."""

    outputs = {"out": Port()}

    def __init__(self, path: str, dtype=np.float32, frame: int = 1024, loop: bool = False):
        super().__init__()
        self.path, self.dtype = check_path("path", path), np.dtype(dtype)
        self.frame, self.loop = check_int("frame", frame, 1), loop

    def initialize(self):
        if self.path.endswith(".npy"):
            data = np.load(self.path, mmap_mode="r")
        elif os.path.getsize(self.path):
            data = np.memmap(self.path, self.dtype, "r")
        else:
            data = np.zeros(0, self.dtype)
        if data.ndim > 1:
            self._frames = data  # frames along the first axis
        else:
            self._frames = [data[i : i + self.frame] for i in range(0, data.size, self.frame)]
        self._next = 0

    def work(self, inputs):
        if self._next >= len(self._frames):
            if not self.loop or len(self._frames) == 0:
                return DONE
            self._next = 0
        self.send("out", np.asarray(self._frames[self._next]))
        self._next += 1
        return OK

    def cleanup(self):
        self._frames = None


# -- transforms -------------------------------------------------------------------------


class Multiply(Block):
    """out = in * factor (a run-time parameter), computed into the output frame."""

    inputs = {"in": F32}
    outputs = {"out": F32}
    parameters = {"factor": Param(float)}  # checked by set_parameter, not in the worker's next work()

    def __init__(self, factor: float = 1.0):
        super().__init__()
        check_number("factor", factor)
        self.factor = factor

    def work(self, inputs):
        for frame in inputs["in"]:
            out = self.allocate("out", frame.array.shape)
            np.multiply(frame.array, np.float32(self.factor), out=out.array)
            self.send("out", out)


class Amplifier(Multiply):
    """Multiply by ``gain`` (the same block, the radio engineer's name)."""

    parameters = {"gain": Param(float)}

    def __init__(self, gain: float = 1.0):
        check_number("gain", gain)
        super().__init__(gain)

    @property
    def gain(self) -> float:
        return self.factor

    @gain.setter
    def gain(self, value: float) -> None:
        self.factor = value


class Add(Block):
    """out = a + b, frames paired in order (the k-th of a with the k-th of b); the sum
    takes a's timestamp and time range."""

    inputs = {"a": F32, "b": F32}
    outputs = {"out": F32}

    def work(self, inputs):
        pairs = min(len(inputs["a"]), len(inputs["b"]))
        if pairs == 0:
            return INSUFFICIENT_INPUT
        for a, b in zip(inputs["a"][:pairs], inputs["b"][:pairs], strict=True):
            if a.array.shape != b.array.shape:
                raise ValueError(f"Add: frame shapes differ: {a.array.shape} and {b.array.shape}")
            out = self.allocate("out", a.array.shape)
            np.add(a.array, b.array, out=out.array)
            # explicit, though the default (the first declared input) says the same
            self.send("out", out, timestamp=a.timestamp, time_range=a.time_range)
        self.consume("a", pairs)
        self.consume("b", pairs)


class Spectrum(Block):
    """Power spectrum of each frame in dB: 10 log10(|rfft(x * window)|^2 / n) (+1e-20),
    ``n // 2 + 1`` float32 bins (``fft_size`` pads or cuts the frame)."""

    inputs = {"in": F32}
    outputs = {"out": F32}

    def __init__(self, fft_size: int | None = None, window: str = "hann"):
        super().__init__()
        if not isinstance(window, str) or window not in ("hann", "none"):
            raise ValueError(f"window must be 'hann' or 'none', not {show(window)}")
        self.fft_size, self.window = check_int("fft_size", fft_size, 1, none=True), window
        self._windows = {}

    def work(self, inputs):
        for frame in inputs["in"]:
            x = frame.array
            n = self.fft_size or x.shape[-1]
            x = x[..., :n]
            if self.window == "hann":
                w = self._windows.get(x.shape[-1])
                if w is None:
                    w = self._windows[x.shape[-1]] = np.hanning(x.shape[-1]).astype(np.float32)
                x = x * w
            power = np.abs(np.fft.rfft(x, n)) ** 2 / n
            out = self.allocate("out", power.shape)
            np.log10(power + 1e-20, out=out.array, casting="same_kind")
            out.array *= 10
            self.send("out", out)


class Decimate(Block):
    """Keep every ``factor``-th sample of each frame (``average=True``: the mean of
    each group of ``factor`` instead).  Frames must hold a multiple of ``factor``."""

    inputs = {"in": F32}
    outputs = {"out": F32}

    def __init__(self, factor: int = 2, average: bool = False):
        super().__init__()
        self.factor, self.average = check_int("factor", factor, 1), average

    def work(self, inputs):
        for frame in inputs["in"]:
            x = frame.array
            if x.shape[-1] % self.factor:
                raise ValueError(f"Decimate: a frame of {x.shape[-1]} samples is not a multiple "
                                 f"of {self.factor}")
            shape = (*x.shape[:-1], x.shape[-1] // self.factor)
            out = self.allocate("out", shape)
            if self.average:
                np.mean(x.reshape(*shape, self.factor), axis=-1, out=out.array)
            else:
                out.array[...] = x[..., :: self.factor]
            self.send("out", out)


class Throttle(Block):
    """Forward frames (no copy) at most ``rate`` frames per second, paced on the
    monotonic clock: for replaying files or synthetic sources in real time."""

    inputs = {"in": Port()}
    outputs = {"out": Port()}
    parameters = {"rate": Param(float, positive=True)}
    batch = 1

    def __init__(self, rate: float = 10.0):
        super().__init__()
        self.rate = check_number("rate", rate, positive=True)
        self._next_ns = None

    def work(self, inputs):
        now = time.monotonic_ns()
        if self._next_ns is None:
            self._next_ns = now
        if self._next_ns > now and not self.sleep((self._next_ns - now) / 1e9):
            return INSUFFICIENT_INPUT  # stopping: keep the frame, the runtime releases it
        for frame in inputs["in"]:
            self.send("out", frame)
        self._next_ns = max(self._next_ns, now - int(1e9 / self.rate)) + int(1e9 / self.rate)


class Tee(Block):
    """Forward each frame (no copy) to ``out0`` ... ``out<n-1>`` (1 <= n <=
    MAX_BRANCHES).  Connecting one output to several inputs does the same; a Tee
    names the branches."""

    inputs = {"in": Port()}

    def __init__(self, n: int = 2):
        super().__init__()
        self.n = check_int("n", n, 1, MAX_BRANCHES)

    def output_ports(self) -> dict:
        return {f"out{i}": Port() for i in range(self.n)}

    def work(self, inputs):
        for frame in inputs["in"]:
            for i in range(self.n):
                self.send(f"out{i}", frame)


class SyncMerge(Block):
    """Align ``n`` streams by timestamp (``multiqueue.stream.SyncReader``) and send
    the k-th stream's frame of each aligned tuple on ``out<k>``: downstream blocks
    see the same number of frames on every branch, in step (1 <= n <= MAX_BRANCHES).
    Policies ``exact``, ``nearest`` (to stream 0) and ``overlap``, within
    ``tolerance_ns`` (an int >= 0)."""

    takes_readers = True

    def __init__(self, n: int = 2, policy: str = "exact", tolerance_ns: int = 0):
        super().__init__()
        if not isinstance(policy, str) or policy not in SYNC_POLICIES:
            choices = ", ".join(map(repr, SYNC_POLICIES[:-1])) + f" or {SYNC_POLICIES[-1]!r}"
            raise ValueError(f"policy must be {choices}, not {show(policy)}")
        self.n, self.policy = check_int("n", n, 1, MAX_BRANCHES), policy
        self.tolerance_ns = check_int("tolerance_ns", tolerance_ns, 0)
        self.tuples = 0

    def input_ports(self) -> dict:
        return {f"in{i}": Port() for i in range(self.n)}

    def output_ports(self) -> dict:
        return {f"out{i}": Port() for i in range(self.n)}

    def work(self, readers):
        if getattr(self, "_sync", None) is None:
            self._sync = SyncReader([readers[f"in{i}"] for i in range(self.n)], policy=self.policy,
                                    tolerance_ns=self.tolerance_ns)
        try:
            matched = self._sync.read(timeout=0.25)
        except TimeoutError:
            return OK
        except QueueClosedError:
            return DONE
        for i, buffer in enumerate(matched):
            if buffer is not None:
                self.send(f"out{i}", Frame(buffer, buffer.numpy()))
        self.tuples += 1
        return OK

    def stop(self):
        if getattr(self, "_sync", None) is not None:
            self._sync.close()
            self._sync = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_sync", None)
        return state


# -- sinks ------------------------------------------------------------------------------


class NullSink(Block):
    """Consumes every frame; counts them (``received``)."""

    inputs = {"in": Port()}
    batch = 64

    def __init__(self):
        super().__init__()
        self.received = 0

    def work(self, inputs):
        self.received += len(inputs["in"])


class FileSink(Block):
    """Writes frames to ``path``: ``.npy`` (one array of all frames, header written
    at stop) or raw bytes.  At most ``max_frames`` are written (None: all); later
    frames are consumed and counted in ``skipped``, so a bounded recorder never
    stalls the graph (``max_frames``: None or an int >= 0)."""

    inputs = {"in": Port()}

    def __init__(self, path: str, max_frames: int | None = None):
        super().__init__()
        self.path = check_path("path", path)
        self.max_frames = check_int("max_frames", max_frames, 0, none=True)
        self.written = self.skipped = 0

    def initialize(self):
        self._npy = self.path.endswith(".npy")
        self._file = open(self.path + (".part" if self._npy else ""), "wb")
        self._frame_dtype = self._frame_shape = None

    def work(self, inputs):
        for frame in inputs["in"]:
            if self.max_frames is not None and self.written >= self.max_frames:
                self.skipped += 1
                continue
            a = frame.array
            if self._npy:
                if self._frame_dtype is None:
                    self._frame_dtype, self._frame_shape = a.dtype, a.shape
                elif (a.dtype, a.shape) != (self._frame_dtype, self._frame_shape):
                    raise ValueError(f"FileSink {self.path}: frame {a.dtype}{a.shape} differs from the first "
                                     f"{self._frame_dtype}{self._frame_shape}; use a raw file")
            self._file.write(memoryview(np.ascontiguousarray(a)).cast("B"))
            self.written += 1

    def stop(self):
        self._finish()

    def cleanup(self):
        self._finish()

    def _finish(self):
        if getattr(self, "_file", None) is None:
            return
        self._file.close()
        self._file = None
        if self._npy:
            dtype = self._frame_dtype if self._frame_dtype is not None else np.dtype(np.float32)
            shape = (self.written, *(self._frame_shape or ()))
            with open(self.path, "wb") as out, open(self.path + ".part", "rb") as part:
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(out, header)
                while chunk := part.read(1 << 20):
                    out.write(chunk)
            os.unlink(self.path + ".part")


class Probe(Block):
    """Keeps the latest frame (a reference, no copy) for viewers in its process:
    ``latest()`` returns a copy of it and its timestamp.  Place it in a thread
    (``placement="thread"``) to read it from the runtime's process; other
    processes subscribe to the port it taps with ``multiqueue.attach``."""

    inputs = {"in": Port()}
    batch = 64

    def __init__(self):
        super().__init__()
        self.received = 0
        self._latest = None
        self._lock = threading.Lock()

    def work(self, inputs):
        frames = inputs["in"]
        newest = frames[-1].buffer.share()
        with self._lock:
            previous, self._latest = self._latest, newest
        if previous is not None:
            previous.release()
        self.received += len(frames)

    def latest(self) -> tuple[np.ndarray, int] | None:
        """(a copy of the latest frame, its timestamp), or None before the first."""
        with self._lock:
            if self._latest is None:
                return None
            return self._latest.numpy().copy(), self._latest.timestamp

    def cleanup(self):
        with self._lock:
            if self._latest is not None:
                self._latest.release()
                self._latest = None

    def __getstate__(self):
        state = super().__getstate__()
        state["_latest"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
