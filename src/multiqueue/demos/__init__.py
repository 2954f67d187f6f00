"""Demos: the spectrum monitor (mq demo) and the stream demo (mq stream-demo)."""

import argparse

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
