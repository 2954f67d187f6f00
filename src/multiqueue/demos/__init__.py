"""Demos: the spectrum monitor (mq demo) and the stream demo (mq stream-demo)."""

import argparse
import math

from ..shm.segment import check_domain


def domain_argument(text: str) -> str:
    """A demo's --domain: a bad name is a usage error (exit 2) saying why, not a traceback."""
    try:
        return check_domain(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def int_argument(minimum: int):
    """An argparse type: an int >= ``minimum`` (else a usage error saying so)."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, not {text!r}")
        return value

    return convert


def seconds_argument(text: str) -> float:
    """An argparse type: a finite number of seconds >= 0 (else a usage error saying so)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {text!r}")
    return value
