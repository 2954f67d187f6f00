"""Helpers for tests that run other interpreters (import as `from helpers import ...`)."""

import subprocess
import sys


def run_python(code: str, *args, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """Run `code` in a separate interpreter (attaching by domain name like any process)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def spawn_python(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)
