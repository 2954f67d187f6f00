"""Typed run-time parameters: what values a block's parameter takes.

A block declares each run-time parameter as a :class:`Param` (type, optional range or
choices); ``set_parameter``, ``mq param``, graph files and the dashboard check a new
value against it before it reaches the block, and the worker checks it again before
applying it.  A declaration travels as data (``describe()`` / ``from_description()``)
in the graph's description, so a process without the block's class checks the same.
See docs/graphs.md, "Parameters".
"""

import math
import numbers
import typing

import numpy as np

from ..checks import show

# type -> its name in descriptions and messages; float takes ints (made floats), list takes tuples
TYPE_NAMES = {float: "float", int: "int", bool: "bool", str: "str", list: "list", dict: "dict", object: "any"}
NAMED_TYPES = {name: t for t, name in TYPE_NAMES.items()}
_WHAT = {"float": "a number", "int": "an int", "bool": "true or false", "str": "a string",
         "list": "a list", "dict": "a mapping", "any": "any value"}


class Param:
    """A run-time parameter's type and allowed values.

    ``Param(float, min=0.0, max=10.0)``, ``Param(int, min=1)``, ``Param(str, choices=("hann",
    "none"))``, ``Param(bool)``, ``Param(float, positive=True)`` (> 0), ``Param(float,
    none=True)`` (None allowed too); ``Param()`` takes any value.  ``type`` is one of
    float (a finite number; an int becomes a float), int, bool, str, list, dict or object
    (any); ``min`` / ``max`` are inclusive bounds of a number; ``choices`` the only values
    allowed (str, numbers, bools or None).
    """

    __slots__ = ("type", "min", "max", "choices", "positive", "none")

    def __init__(self, type=object, *, min=None, max=None, choices=None, positive: bool = False,
                 none: bool = False):
        if type not in TYPE_NAMES:
            raise TypeError(f"Param type must be one of float, int, bool, str, list, dict or object, "
                            f"not {show(type)}")
        numeric = type in (float, int)
        min, max = (v.item() if isinstance(v, np.generic) else v for v in (min, max))  # JSON-able
        for bound, value in (("min", min), ("max", max)):
            if value is not None and (not numeric or isinstance(value, bool)
                                      or not isinstance(value, numbers.Real) or not math.isfinite(value)):
                raise TypeError(f"Param {bound} is a finite number, for a float or int parameter; "
                                f"not {show(value)}")
        if min is not None and max is not None and min > max:
            raise ValueError(f"Param min {min} is above max {max}")
        if positive and not numeric:
            raise TypeError("Param positive=True is for a float or int parameter")
        self.type, self.min, self.max, self.positive, self.none = type, min, max, bool(positive), bool(none)
        self.choices = None  # first: checking the choices' types reads it
        self.choices = None if choices is None else self._check_choices(choices)

    def _check_choices(self, choices) -> tuple:
        if isinstance(choices, (str, bytes)) or not isinstance(choices, typing.Iterable):
            raise TypeError(f"Param choices must be a tuple of values, not {show(choices)}")
        choices = tuple(choices)
        if not choices:
            raise ValueError("Param choices must not be empty")
        for c in choices:
            if c is not None and not isinstance(c, (str, int, float)):  # JSON scalars for descriptions
                raise TypeError(f"Param choices are str, numbers, bools or None, not {show(c)}")
            try:
                self._typed("choice", c)
            except (TypeError, ValueError):
                raise TypeError(f"Param choices must be of its type ({TYPE_NAMES[self.type]}), not "
                                f"{show(c)}") from None
        return choices

    # -- checking ------------------------------------------------------------------------

    def check(self, name: str, value):
        """``value`` as the parameter takes it (an int for a float parameter becomes a
        float); TypeError for a wrong type, ValueError outside the range or the
        choices, each message naming the parameter, the value and what is allowed."""
        typed = self._typed(name, value)
        if typed is None:
            return None
        if ((self.choices is not None and typed not in self.choices)
                or (self.type in (float, int) and not self._in_range(typed))):
            raise ValueError(f"parameter {name!r} must be {self.allowed()}, not {show(value)}")
        return typed

    def _typed(self, name: str, value):
        if value is None and self.none:
            return None
        t = self.type
        if t is object:
            return value
        if t is float and isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            try:
                number = float(value)
            except OverflowError:  # an int beyond float range
                number = math.inf
            if math.isfinite(number):
                return number
            raise ValueError(f"parameter {name!r} must be a finite number, not {show(value)}")
        if t is int and isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        if t is bool and isinstance(value, (bool, np.bool_)):
            return bool(value)
        if t is str and isinstance(value, str):
            return value
        if t is list and isinstance(value, (list, tuple)):
            return list(value)
        if t is dict and isinstance(value, dict):
            return value
        raise TypeError(f"parameter {name!r} must be {self.allowed()}, not {show(value)} "
                        f"({'None' if value is None else type(value).__name__})")

    def _in_range(self, value) -> bool:
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (not self.positive or value > 0))

    def allowed(self) -> str:
        """What values it takes, in words: "a number from 0 to 10", "one of 'a', 'b'"."""
        if self.choices is not None:
            what = "one of " + ", ".join(map(repr, self.choices))
        else:
            what = _WHAT[TYPE_NAMES[self.type]]
            if self.type in (float, int):
                what += _range_words(self.min, self.max, self.positive)
        return f"None or {what}" if self.none else what

    # -- as data -------------------------------------------------------------------------

    def describe(self) -> dict:
        """The declaration as JSON-able data (what the graph's description carries)."""
        return {"type": TYPE_NAMES[self.type], "min": self.min, "max": self.max,
                "choices": None if self.choices is None else list(self.choices),
                "positive": self.positive, "none": self.none, "allowed": self.allowed()}

    @classmethod
    def from_description(cls, data: dict) -> "Param":
        """The Param that :meth:`describe` described (ValueError for anything else)."""
        try:
            return cls(NAMED_TYPES[data["type"]], min=data.get("min"), max=data.get("max"),
                       choices=data.get("choices"), positive=data.get("positive", False),
                       none=data.get("none", False))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a parameter description: {show(data)} ({e})") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, Param) and self.describe() == other.describe()

    def __hash__(self) -> int:
        return hash((self.type, self.min, self.max, self.choices, self.positive, self.none))

    def __repr__(self) -> str:
        options = [f"{k}={getattr(self, k)!r}" for k in ("min", "max", "choices")
                   if getattr(self, k) is not None]
        options += [f"{k}=True" for k in ("positive", "none") if getattr(self, k)]
        return f"Param({', '.join([TYPE_NAMES[self.type], *options])})"


def _range_words(low, high, positive: bool) -> str:
    if low is not None and high is not None:
        return f" from {low:g} to {high:g}"
    words = []
    if positive and not (low is not None and low > 0):
        words.append("> 0")
    if low is not None:
        words.append(f">= {low:g}")
    if high is not None:
        words.append(f"<= {high:g}")
    return (" " + " and ".join(words)) if words else ""


def as_param(name: str, declared) -> Param:
    """A Param from a declaration: a Param, or a type (``float`` = ``Param(float)``)."""
    if isinstance(declared, Param):
        return declared
    if declared in TYPE_NAMES:
        return Param(declared)
    raise TypeError(f"parameter {name!r} is declared as {show(declared)}; declare a Param(...) or one of "
                    "float, int, bool, str, list, dict, object")


def infer_param(annotation, default) -> Param:
    """The Param of a parameter declared only by name: from its annotation (a Param, a
    type, or ``X | None``), else the type of its default (None: any value)."""
    if isinstance(annotation, Param):
        return annotation
    none = default is None
    args = typing.get_args(annotation)
    if args and type(None) in args:  # Optional[X] / X | None
        rest = [a for a in args if a is not type(None)]
        annotation, none = (rest[0] if len(rest) == 1 else object), True
    if annotation in TYPE_NAMES and annotation is not object:
        return Param(annotation, none=none)
    if isinstance(default, (bool, np.bool_)):
        return Param(bool)
    if isinstance(default, numbers.Integral):
        return Param(int)
    if isinstance(default, numbers.Real):
        return Param(float)
    if isinstance(default, str):
        return Param(str)
    return Param()


def json_value(value):
    """A parameter's value as JSON can carry it (a numpy scalar as a Python number,
    anything else JSON cannot hold as its repr)."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: json_value(v) for k, v in value.items()}
    return repr(value)


def declared_param(description: dict | None, block: str, name: str) -> Param | None:
    """The Param that a graph's description (``Runtime.describe()``, ``attach().description``)
    declares for parameter ``name`` of ``block``; None if it declares none (no graph,
    no such block or parameter, a description it cannot read: the block itself answers)."""
    for described in (description or {}).get("blocks", ()):
        if described.get("name") == block:
            declared = (described.get("parameters") or {}).get(name)
            try:
                return None if declared is None else Param.from_description(declared)
            except ValueError:
                return None
    return None
