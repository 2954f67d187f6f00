"""Fixtures of the network tests."""

import uuid

import pytest

from multiqueue.shm.segment import domain_segments, unlink_quietly


@pytest.fixture
def graph_name():
    """A graph name whose host domains (<name>-a, <name>-b) are removed after the test."""
    name = f"tg-{uuid.uuid4().hex[:10]}"
    yield name
    leftovers = [p for d in (name, f"{name}-a", f"{name}-b") for p in domain_segments("mq.", d)]
    for path in leftovers:
        unlink_quietly(path)
    assert not leftovers, f"test left segments behind: {leftovers}"
