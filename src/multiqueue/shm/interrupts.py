"""Ctrl-C and SIGTERM wait until a process has left its domain whole.

A KeyboardInterrupt raised half-way through leaving a domain (references released, the
segments not yet unlinked) leaves the segments in /dev/shm for nobody.  Inside
``deferred_interrupts()`` SIGINT and SIGTERM are recorded, and handled as they would
have been once the block is done.
"""

import os
import signal
import threading
from contextlib import contextmanager

DEFERRED = (signal.SIGINT, signal.SIGTERM)
_active = False  # a deferral is in force (the main thread's; nested blocks join it)


@contextmanager
def deferred_interrupts():
    """Hold SIGINT and SIGTERM until the block ends, then handle them as before.

    Only the main thread can change signal handlers (and only it runs Python's handlers);
    elsewhere, or inside another deferral, the block runs as is.
    """
    global _active
    if _active or threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, _frame: caught.append(signum))
                for signum in DEFERRED}
    _active = True
    try:
        yield
    finally:
        _active = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):  # each signal once, in the order they came
            _handle(signum, previous[signum])


def _handle(signum: int, handler) -> None:
    """What ``handler`` (as signal.signal returned it) would have done with ``signum``."""
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)  # the default action (the process ends), now it is safe
    # SIG_IGN, or None (a handler not set from Python): nothing Python can replay
