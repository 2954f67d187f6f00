"""Shared fixtures: a unique domain per test, removed afterwards, and a leak check."""

import os
import subprocess
import sys
import uuid

import pytest

from multiqueue import ShmConfig, PoolConfig, ShmManager
from multiqueue.shm.segment import domain_segments, unlink_quietly

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


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


def run_python(code: str, *args, timeout=60, **kwargs) -> subprocess.CompletedProcess:
    """Run `code` in a separate interpreter (attaching by domain name like any process)."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kwargs)


def spawn_python(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)
