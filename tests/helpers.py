"""Helpers for tests that run other interpreters (import as `from helpers import ...`)."""

import subprocess
import sys
import time


def run_python(code: str, *args, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """Run `code` in a separate interpreter (attaching by domain name like any process)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def spawn_python(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def wait_until(condition, what: str, timeout: float = 60.0, interval: float = 0.005):
    """Poll ``condition`` until it returns something true, and return that (for states
    of other processes that no event announces, such as a block's counters)."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting until {what}"
        time.sleep(interval)
    return value
