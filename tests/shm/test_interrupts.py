"""Ctrl-C or SIGTERM while a process leaves its domain: it leaves whole, then stops."""

import signal

import pytest

from helpers import run_python
from multiqueue.shm.segment import domain_segments

# The signal comes just before the segments are unlinked: the worst moment (the process's
# references are released, so without the deferral nobody would remove the segments).
LEAVE_WITH_A_SIGNAL = """
import os, signal, sys
from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.shm import manager as manager_module

signum = int(sys.argv[2])
def interrupt(*_):
    raise KeyboardInterrupt
if signum == signal.SIGTERM:  # as `mq tap` and the other long-running commands do
    signal.signal(signal.SIGTERM, interrupt)
unlink = manager_module.unlink_domain
def signal_then_unlink(*args):
    os.kill(os.getpid(), signum)
    print("still leaving after the signal", flush=True)
    unlink(*args)
manager_module.unlink_domain = signal_then_unlink
m = ShmManager(sys.argv[1], ShmConfig(pools=[PoolConfig("p", 256, 4)]))
m.allocate(100)
try:
    m.shutdown()
except KeyboardInterrupt:
    print("interrupted after leaving", flush=True)
    sys.exit(130)
print("the signal was lost", flush=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_leaving_the_domain_waits_until_its_segments_are_gone(domain, signum):
    result = run_python(LEAVE_WITH_A_SIGNAL, domain, int(signum))
    assert result.returncode == 130, result.stdout + result.stderr
    assert result.stdout.split("\n")[:2] == ["still leaving after the signal", "interrupted after leaving"]
    assert not domain_segments("mq.", domain)


def test_a_default_sigterm_while_leaving_still_ends_the_process_once_the_domain_is_gone(domain):
    code = LEAVE_WITH_A_SIGNAL.replace("if signum == signal.SIGTERM", "if False")
    result = run_python(code, domain, int(signal.SIGTERM))
    assert result.returncode == -signal.SIGTERM, result.stdout + result.stderr
    assert result.stdout == "still leaving after the signal\n"
    assert not domain_segments("mq.", domain)
