"""Shared fixtures: a unique domain per test, removed afterwards, and a leak check."""

import os
import signal
import uuid

import pytest
from hypothesis import settings

from helpers import run_python, spawn_python  # noqa: F401  (re-exported for tests)
from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.shm.segment import domain_segments, unlink_quietly


def pytest_configure(config):
    """Tests stop child processes with SIGINT (Ctrl-C); a child inherits an ignored SIGINT
    (a suite started in the background of a non-interactive shell): undo that first."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    """The chaos suite's long form (tests/chaos/test_chaos.py): more rounds, another seed."""
    group = parser.getgroup("chaos", "chaos suite (tests/chaos)")
    group.addoption("--chaos-rounds", type=int, default=None, metavar="N",
                    help="rounds of kills in tests/chaos (default 10, the short form)")
    group.addoption("--chaos-seed", type=int, default=None, metavar="S",
                    help="seed of the chaos schedule (default: the fixed one in tests/chaos/test_chaos.py)")


@pytest.fixture
def domain():
    """A fresh domain name; every segment of it is gone after the test (or removed)."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    yield name
    leftovers = domain_segments("mq.", name)
    for path in leftovers:
        unlink_quietly(path)
    assert not leftovers, f"test left segments behind: {leftovers}"


@pytest.fixture
def small_config():
    """Two small pools: quick to create, easy to fill."""
    return ShmConfig(pools=[PoolConfig("tiny", 256, 16), PoolConfig("small", 4096, 8)],
                     max_buffers=256, max_processes=16)


@pytest.fixture
def manager(domain, small_config):
    m = ShmManager(domain, small_config, reaper_interval=None)
    yield m
    m.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _logs_in_a_temp_dir(tmp_path_factory):
    """Domain logs of the test run go to a temporary directory (workers inherit it)."""
    os.environ["MQ_LOG_DIR"] = str(tmp_path_factory.mktemp("mq-logs"))


# Property-based tests run the same examples on every run (a failure is a bug to fix, not
# luck); deadline off because this 2-core machine runs several processes per example.
settings.register_profile("mq", derandomize=True, deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "mq"))
