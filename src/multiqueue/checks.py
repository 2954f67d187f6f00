"""Argument checks shared by the whole library.

TypeError for a wrong type, ValueError for a value out of range; every message names
the argument and says what is allowed.  Constructors and slow paths call these; hot
paths test with bad_timeout() first (two class checks) and call them only then.
"""

import itertools
import math
import numbers
import os
import reprlib
from collections.abc import Mapping

MAX_DIMS = 32  # dimensions of a port or frame shape


def show(value) -> str:
    """A short repr of ``value`` for an error message: never the whole of a huge or
    deeply nested value, never an error itself (an int of 5000 digits cannot be printed)."""
    try:
        return reprlib.repr(value)
    except Exception:  # noqa: BLE001 - whatever repr() raises, say what it is
        if isinstance(value, int):
            return f"an int of {value.bit_length()} bits"
        return f"a {type(value).__name__}"


def check_int(name: str, value, low: int | None = None, high: int | None = None, *,
              none: bool = False) -> int | None:
    """``value`` as an int (None if ``none`` allows it), within ``low`` .. ``high``.
    A bool or a float is not an int (TypeError)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {'None or ' if none else ''}an int, not {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name} must be {'None or ' if none else ''}{bound}, not {show(value)}")
    return value


MAX_CAPACITY = 2**24  # the largest PortQueue ring


def check_capacity(value, maximum: int = MAX_CAPACITY, name: str = "capacity") -> int:
    """A ring capacity: a power of two from 1 to ``maximum``.  ValueError for anything
    else, a wrong type included (a capacity is one of a list of allowed values)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= maximum \
            or value & (value - 1):
        top = str(maximum) if maximum <= 4096 else f"2**{maximum.bit_length() - 1}"
        raise ValueError(f"{name} must be a power of two from 1 to {top}, not {show(value)}")
    return int(value)


def check_number(name: str, value, *, positive: bool = False, minimum: float | None = None,
                 none: bool = False) -> float | None:
    """``value`` as a finite float (None if ``none`` allows it); ``positive``: > 0;
    ``minimum``: >= minimum.  A bool, a string or a complex is not a number (TypeError)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {'None or ' if none else ''}a number, not {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, not {show(value)}")
    if positive and not number > 0:
        raise ValueError(f"{name} must be positive, not {show(value)}")
    if minimum is not None and not number >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, not {show(value)}")
    return number


def check_shape(name: str, value) -> tuple[int, ...]:
    """A frame shape: an int or a sequence of ints >= 0 (at most MAX_DIMS of them)."""
    bad_type = TypeError(f"{name} must be an int or a tuple of ints, not {type(value).__name__}")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        dims = [value]
    elif isinstance(value, (str, bytes, Mapping)):
        raise bad_type
    else:
        try:
            dims = list(itertools.islice(value, MAX_DIMS + 1))  # never a huge iterable
        except TypeError:
            raise bad_type from None
    if len(dims) > MAX_DIMS:
        raise ValueError(f"{name} must have at most {MAX_DIMS} dimensions")
    for n in dims:
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise TypeError(f"{name} must be an int or a tuple of ints; it holds a {type(n).__name__}")
    shape = tuple(int(n) for n in dims)
    if any(n < 0 for n in shape):
        raise ValueError(f"{name} {shape} has a negative dimension")
    return shape


def check_path(name: str, value) -> str:
    """A file path: a non-empty str or os.PathLike of one."""
    path = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(path, str):
        raise TypeError(f"{name} must be a str or a path, not {type(value).__name__}")
    if not path:
        raise ValueError(f"{name} must not be empty")
    return path


def bad_timeout(timeout) -> bool:
    """Cheap test for the hot paths: is ``timeout`` not None nor a number >= 0?  (Then
    check_timeout says what is wrong.)  Two class checks, no call, for good values."""
    return timeout is not None and ((timeout.__class__ is not float and timeout.__class__ is not int)
                                    or not timeout >= 0)


def check_timeout(timeout) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
    if not timeout >= 0:  # also catches NaN
        raise ValueError(f"timeout must be None or >= 0 seconds, not {timeout}")
    return float(timeout)
