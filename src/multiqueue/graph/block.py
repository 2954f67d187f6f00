"""Blocks: units of processing with named, typed ports, run by the graph runtime.

``Block`` (ports declared as data, one ``work()`` over numpy frames, in the style of
a GNU Radio embedded block), ``Port``, ``Frame``, the ``WorkResult`` codes and the
``@block`` decorator for function-style blocks. See docs/graphs.md, "Blocks".
"""

import enum
import inspect
import logging
import typing
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..checks import check_int, check_shape, show
from ..errors import BufferReleasedError, MultiQueueError
from .params import Param, as_param, infer_param, json_value


class WorkResult(enum.Enum):
    """What ``work()`` reports (returning None means OK)."""

    OK = "ok"  # made progress: call again when there is input (sources: at once)
    DONE = "done"  # finished for good: its outputs are closed after this call
    INSUFFICIENT_INPUT = "insufficient_input"  # call again when more input arrived
    INSUFFICIENT_OUTPUT = "insufficient_output"  # no room for output yet: retry shortly
    ERROR = "error"  # failed: the runtime reports it, as it would an exception


OK = WorkResult.OK
DONE = WorkResult.DONE
INSUFFICIENT_INPUT = WorkResult.INSUFFICIENT_INPUT
INSUFFICIENT_OUTPUT = WorkResult.INSUFFICIENT_OUTPUT
ERROR = WorkResult.ERROR


@dataclass(frozen=True)
class Port:
    """A port's frame type: numpy ``dtype`` and frame ``shape`` (None = any; else an
    int or a tuple of ints >= 0, at most 32 dimensions).

    ``Port()`` accepts anything; ``Port(np.float32)`` float32 frames of any shape;
    ``Port(np.float32, (1024,))`` exactly 1024 float32 per frame.
    """

    dtype: object = None
    shape: tuple | None = None

    def __post_init__(self):
        if self.dtype is not None:
            object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if self.shape is not None:
            object.__setattr__(self, "shape", check_shape("port shape", self.shape))

    def mismatch(self, other: "Port") -> str | None:
        """Why frames of this (output) port cannot go into ``other`` (an input), or None."""
        if self.dtype is not None and other.dtype is not None and self.dtype != other.dtype:
            return f"dtype {self.dtype} does not match {other.dtype}"
        if self.shape is not None and other.shape is not None and self.shape != other.shape:
            return f"frame shape {self.shape} does not match {other.shape}"
        return None

    def describe(self) -> dict:
        return {"dtype": None if self.dtype is None else self.dtype.str,
                "shape": None if self.shape is None else list(self.shape)}


def as_port(value) -> Port:
    """A Port from a Port, a dtype-like, or None (any)."""
    if isinstance(value, Port):
        return value
    return Port(value)


class Frame:
    """One frame on a port: a pooled buffer seen as a numpy array, in place.

    Input frames are read-only (other readers see the same memory); frames from
    :meth:`Block.allocate` are yours to fill until you send them.  A frame that was
    sent or released is no longer yours: ``frame.array`` raises BufferReleasedError,
    and the array it gave out before can no longer be written.
    """

    # ``array`` is a slot that end() empties: reading it then falls back to __getattr__,
    # so the frame's state costs nothing on the per-frame path
    __slots__ = ("buffer", "array", "is_input", "ended")

    def __init__(self, buffer, array: np.ndarray, is_input: bool = False):
        self.buffer = buffer
        self.array = array
        self.is_input = is_input  # handed in by the runtime (send() forwards it, no copy)
        self.ended = None  # how the frame stopped being yours ("sent on 'out'", "released")

    def end(self, how: str) -> None:
        """The frame's buffer is no longer yours (``how`` it went): its array stops
        working.  Called by the runtime at send() and wherever it releases the frame."""
        if not self.is_input:  # an input's array is read-only already
            # write=False, positionally: numpy parses a keyword 5x slower, on the per-frame path
            self.array.setflags(False)  # the view handed out before: readable, not writable
        del self.array
        self.ended = how

    def release(self, how: str = "released") -> None:
        """Drop the frame's buffer reference now (else the runtime does: an input after
        work(), an allocated frame when it is garbage-collected); its array stops working."""
        self.end(how)
        self.buffer.release()

    def __getattr__(self, name: str):
        if name != "array" or self.ended is None:
            raise AttributeError(name)
        raise BufferReleasedError(
            f"this frame was {self.ended}: its buffer is no longer yours to read or write; "
            "allocate a new frame, or keep frame.array.copy() (or frame.buffer.share()) before")

    @property
    def timestamp(self) -> int:
        return self.buffer.timestamp

    @timestamp.setter
    def timestamp(self, ns: int) -> None:
        self.buffer.timestamp = ns

    @property
    def time_range(self) -> tuple[int, int] | None:
        return self.buffer.time_range

    @time_range.setter
    def time_range(self, value) -> None:
        self.buffer.time_range = value

    def __repr__(self) -> str:
        if self.ended is not None:
            return f"<Frame {self.ended}>"
        return f"<Frame {self.array.dtype}{list(self.array.shape)} t={self.timestamp}>"


class Block:
    """Base class of every block; see the module docstring for an example.

    Lifecycle, each called in the block's worker: ``initialize()`` (before any
    frame moves: open resources), ``start()``, ``work(inputs)`` repeatedly,
    ``stop()``, ``cleanup()`` (always, even after an error).
    """

    inputs: dict = {}
    outputs: dict = {}
    # settable at run time by set_parameter(): {name: Param(...) or a type}, or names
    # (typed by the constructor's annotation of the same name, else by their value)
    parameters: tuple | dict = ()
    counters: tuple = ()  # names of the block's own counters (at most 14): see count()
    batch: int = 16  # most frames handed to work() per input port per call

    def __init__(self):
        self._io = None  # the runtime's BlockIO while running: see bind()

    # -- description ------------------------------------------------------------------

    takes_readers: bool = False  # True: work() gets the input QueueReaders, pops itself

    def input_ports(self) -> dict[str, Port]:
        """The input ports (override for ports that depend on parameters)."""
        return {name: as_port(p) for name, p in self.inputs.items()}

    def output_ports(self) -> dict[str, Port]:
        return {name: as_port(p) for name, p in self.outputs.items()}

    @property
    def kind(self) -> str:
        """``"source"`` (no inputs), ``"sink"`` (no outputs) or ``"processing"``."""
        if not self.input_ports():
            return "source"
        return "sink" if not self.output_ports() else "processing"

    # -- lifecycle hooks (override what you need) -------------------------------------

    def initialize(self) -> None:
        pass

    def start(self) -> None:
        pass

    def work(self, inputs: dict[str, list[Frame]]):
        """Process the frames waiting on the inputs (sources get an empty dict).

        Return None or OK, DONE, INSUFFICIENT_INPUT, INSUFFICIENT_OUTPUT or ERROR.
        Frames handed in are consumed (released after the call) unless the result
        is INSUFFICIENT_INPUT / INSUFFICIENT_OUTPUT or :meth:`consume` said otherwise.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement work()")

    def stop(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    @property
    def log(self) -> logging.Logger:
        """A logger writing to the domain's log (``mq logs DOMAIN``), lines tagged with
        the block's name."""
        return logging.getLogger(f"mq.{type(self).__name__}")

    @property
    def bus(self):
        """The domain's message bus (multiqueue.control.Bus) while the block runs."""
        return self._running().bus

    @property
    def io(self):
        """The runtime's side of this block while it runs (a BlockIO: its ``name`` in the
        graph, ``manager``, ports); MultiQueueError when it does not run."""
        return self._running()

    def bind(self, io) -> None:
        """The runtime binds the block to its BlockIO before start() (None: after cleanup())."""
        self._io = io

    def on_message(self, message) -> None:
        """Hook: a message sent to this block (``bus.send(block_name, data)``, ``mq send``);
        called between two work() calls.  ``message.data`` is the bytes or JSON sent."""
        self.log.info("message from pid %d ignored: %s has no on_message()", message.sender_pid,
                      type(self).__name__)

    # -- parameters ---------------------------------------------------------------------

    def get_parameter(self, name: str):
        self.check_parameter(name)
        return getattr(self, name)

    def set_parameter(self, name: str, value) -> None:
        """Change a run-time parameter; calls :meth:`parameter_changed` to apply it.
        A value its declaration refuses raises (TypeError, ValueError): nothing changes."""
        self.parameter_changed(name, self.check_value(name, value))

    def parameter_changed(self, name: str, value) -> None:
        """Hook: apply a new parameter value (default: set the attribute)."""
        setattr(self, name, value)

    def check_parameter(self, name: str) -> None:
        """KeyError unless ``name`` is one of :attr:`parameters`."""
        if name not in self.parameters:
            raise KeyError(f"block {type(self).__name__} has no run-time parameter {name!r}; "
                           f"it has {list(self.parameters) or 'none'}")

    def check_value(self, name: str, value):
        """``value`` as the parameter ``name`` takes it (see :class:`Param`); KeyError for
        an unknown name, TypeError / ValueError for a value it does not allow."""
        self.check_parameter(name)
        return self.parameter_specs()[name].check(name, value)

    def parameter_specs(self) -> dict[str, Param]:
        """Each run-time parameter's declaration: :attr:`parameters` as declared, or for
        a parameter given by name only, its constructor annotation (``gain: float``),
        else the type of its current value (None: any value)."""
        declared = self.parameters
        if isinstance(declared, Mapping):
            return {name: as_param(name, p) for name, p in declared.items()}
        if isinstance(declared, str) or not all(isinstance(n, str) for n in declared):
            raise TypeError(f"{type(self).__name__}.parameters must be a tuple of names or a dict of "
                            f"name -> Param, not {declared!r}")
        hints = _annotations(type(self).__init__)
        return {name: infer_param(hints.get(name), getattr(self, name, None)) for name in declared}

    def check_parameters(self) -> None:
        """TypeError / ValueError unless every run-time parameter holds a value its
        declaration allows (a graph checks this when the block is added)."""
        for name, param in self.parameter_specs().items():
            try:
                value = self.get_parameter(name)
            except AttributeError:  # not set yet (a block may set it in initialize())
                continue
            param.check(name, value)

    def describe_parameters(self, values: bool = False) -> dict[str, dict]:
        """{name: its Param described (type, min, max, choices, allowed)}, with its
        current ``value`` if ``values`` (as JSON carries it)."""
        described = {name: param.describe() for name, param in self.parameter_specs().items()}
        if values:
            for name, about in described.items():
                try:
                    about["value"] = json_value(self.get_parameter(name))
                except AttributeError:
                    about["value"] = None
        return described

    # -- output and consumption, valid inside work() --------------------------------------

    def allocate(self, port: str, shape=None, dtype=None, timeout: float | None = None) -> Frame:
        """A writable frame for ``port`` from the domain's pools (dtype and shape
        default to the port's).  Waits for a free block up to ``timeout`` (None:
        while the graph runs)."""
        return self._running().allocate(port, shape, dtype, timeout)

    def send(self, port: str, frame, *, timestamp: int | None = None, time_range=None) -> None:
        """Send a frame on an output port: one from :meth:`allocate` (moved, no copy),
        an input frame (forwarded, no copy), or any array-like (copied into a pool
        block).  Without ``timestamp`` the k-th frame sent on a port in one work()
        call takes the timestamp (and time range) of the k-th input frame of the first
        input port; a source's frames are stamped when pushed."""
        self._running().send(port, frame, timestamp, time_range)

    def pushed(self, port: str) -> int:
        """Frames sent on the output ``port`` since the graph started, by this block and
        the ones it replaced: a block restarted after a SIGKILL learns exactly what its
        predecessor delivered, even a frame sent just before it died."""
        return self._running().pushed(port)

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early when the block should stop; returns
        False if it should stop (pacing sources and throttles use this)."""
        return self._running().sleep(seconds)

    def count(self, name: str, n: int = 1) -> int:
        """Add ``n`` to the counter ``name`` (one of :attr:`counters`); returns the new
        value.  Counters live in the graph segment: stats, ``mq stats`` and attach()
        show them, and a restarted block finds its predecessor's values there."""
        return self._running().count(name, n)

    def counter(self, name: str) -> int:
        """The value of the counter ``name`` (a restarted block: where the last one left it)."""
        return self._running().counter(name)

    def set_counter(self, name: str, value: int) -> None:
        self._running().set_counter(name, value)

    def consume(self, port: str, count: int) -> None:
        """Consume exactly ``count`` of the frames handed in on ``port`` this call
        (the rest stay for the next call)."""
        self._running().consume(port, count)

    def _running(self):
        if self._io is None:
            raise MultiQueueError(f"block {type(self).__name__} is not running: allocate(), send() "
                                  "and consume() work inside work() under a Runtime")
        return self._io

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_io"] = None
        return state


# -- function-style blocks -------------------------------------------------------------


def block(inputs=None, outputs=None, *, batch: int = 16, parameters=()):
    """Turn a function over numpy frames into a Block class.

    The function receives one list of arrays per input port, in declared order
    (plus ``timestamps=``, one list per input, if it accepts that keyword), and its
    keyword arguments are the block's parameters.  It returns or yields output
    frames: an array, a list of arrays, or for several outputs ``{port: array}`` /
    ``(port, array)`` pairs; None sends nothing.  A function without inputs is a
    source: called repeatedly, or if it is a generator, run to exhaustion (DONE)::

        @block(inputs={"in": np.float32}, outputs={"out": np.float32})
        def amplify(frames, gain=0.5):
            return [f * gain for f in frames]

        amplify(gain=2.0)   # a Block instance

    Each parameter's type (see :class:`Param`) is its annotation (``gain: float = 0.5``,
    or ``gain: Param(float, min=0) = 0.5``), else its default's type; a value of another
    type is refused where the block is made and by ``set_parameter``.

    ``inputs`` / ``outputs``: None or a dict of port name -> Port or dtype; ``batch``:
    an int >= 1; ``parameters``: a tuple of names (default: the keyword arguments) or a
    dict of name -> Param or type.
    """
    inputs, outputs = _check_ports("inputs", inputs), _check_ports("outputs", outputs)
    batch = check_int("batch", batch, 1)
    if isinstance(parameters, Mapping):
        _check_names("parameters", parameters)  # its keys
        parameters = {name: as_param(name, p) for name, p in parameters.items()}
    else:
        parameters = _check_names("parameters", parameters)

    def wrap(fn):
        if not callable(fn):
            raise TypeError(f"@block decorates a function, not {type(fn).__name__}")
        return _function_block(fn, inputs, outputs, batch, parameters)
    return wrap


def _check_names(name: str, names) -> tuple[str, ...]:
    """A tuple of names (str), from any iterable of them but a single str."""
    try:
        result = None if isinstance(names, str) else tuple(names)
    except TypeError:
        result = None
    if result is None or not all(isinstance(n, str) for n in result):
        raise TypeError(f"{name} must be a tuple of names (str), not {show(names)}")
    return result


def _check_ports(name: str, ports) -> dict:
    """``inputs=`` / ``outputs=`` of @block: None or {port name: Port or dtype-like}."""
    if ports is None:
        return {}
    if not isinstance(ports, Mapping):
        raise TypeError(f"{name} must be a dict of port name -> Port or dtype, not {type(ports).__name__}")
    for port, spec in ports.items():
        if not isinstance(port, str):
            raise TypeError(f"{name}: a port name must be a str, not {type(port).__name__}")
        try:
            as_port(spec)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}[{port!r}]: {e}") from None
    return dict(ports)


def _annotations(fn) -> dict:
    """The annotations of ``fn`` (strings resolved if they can be; else none)."""
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve types nothing
        return {}


def _function_block(fn, inputs, outputs, batch, parameters):
    """A FunctionBlock subclass named, pickled and documented as ``fn``."""
    signature = inspect.signature(fn)
    defaults = {n: p.default for n, p in signature.parameters.items()
                if p.default is not inspect.Parameter.empty and n != "timestamps"}
    if not isinstance(parameters, Mapping):  # typed by annotation, else by default
        hints = {n: p.annotation for n, p in signature.parameters.items()} | _annotations(fn)
        parameters = {n: infer_param(hints.get(n), defaults.get(n)) for n in parameters or defaults}
    namespace = {
        "inputs": dict(inputs), "outputs": dict(outputs), "batch": batch,
        "parameters": parameters, "defaults": defaults,
        "wants_timestamps": "timestamps" in signature.parameters,
        "generator_source": not inputs and inspect.isgeneratorfunction(fn),
        "__module__": fn.__module__, "__qualname__": fn.__qualname__, "__doc__": fn.__doc__,
        "function": staticmethod(fn),
    }
    return type(fn.__name__, (FunctionBlock,), namespace)


class FunctionBlock(Block):
    """The base of the classes @block makes: work() calls ``function`` over the input
    arrays and sends what it returns or yields; its keyword arguments are parameters."""

    function = None  # the decorated function (a staticmethod)
    defaults: dict = {}  # its keyword arguments' defaults
    wants_timestamps = False  # it takes timestamps=
    generator_source = False  # no inputs, a generator: run to exhaustion

    def __init__(self, **params):
        Block.__init__(self)
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise TypeError(f"{self.function.__name__}() has no parameter {sorted(unknown)[0]!r}; "
                            f"it takes {sorted(self.defaults) or 'none'}")
        declared = self.parameters  # {name: Param}: a value of the wrong type fails here, not in work()
        checked = {name: declared[name].check(name, value) if name in declared else value
                   for name, value in params.items()}
        self.params = {**self.defaults, **checked}
        self._generator = None

    def start(self):
        if self.generator_source:
            self._generator = self.function(**self.params)

    def work(self, inputs):
        if self.generator_source:
            try:
                produced = next(self._generator)
            except StopIteration:
                return DONE
            self._emit(produced)
            return OK
        args = [[f.array for f in inputs[name]] for name in self.inputs]
        kwargs = dict(self.params)
        if self.wants_timestamps:
            kwargs["timestamps"] = [[f.timestamp for f in inputs[name]] for name in self.inputs]
        result = self.function(*args, **kwargs)
        for produced in result if inspect.isgenerator(result) else (result,):
            self._emit(produced)
        return OK

    def _emit(self, produced):
        if produced is None:
            return
        if isinstance(produced, dict):
            for port, value in produced.items():
                self._emit_on(port, value)
        elif isinstance(produced, tuple) and len(produced) == 2 and produced[0] in self.outputs:
            self._emit_on(*produced)
        else:
            if len(self.outputs) != 1:
                raise MultiQueueError(
                    f"{self.function.__name__} has outputs {list(self.outputs)}: return {{port: array}} "
                    "or yield (port, array) pairs")
            self._emit_on(next(iter(self.outputs)), produced)

    def _emit_on(self, port, value):
        for item in value if isinstance(value, list) else (value,):
            self.send(port, item)

    def __getattr__(self, name):
        # parameters read as attributes (get_parameter / set_parameter use them)
        params = self.__dict__.get("params")
        if params is not None and name in params:
            return params[name]
        raise AttributeError(name)

    def get_parameter(self, name):
        self.check_parameter(name)
        return self.params.get(name)  # not getattr: a parameter may be named like a Block method

    def parameter_changed(self, name, value):
        self.params[name] = value
