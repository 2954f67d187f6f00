"""Block counters: declared names, kept in the graph segment, over restarts."""

import numpy as np
import pytest
from graph_blocks import CountingCrash, Ramp, SendThenCrash

from helpers import wait_until
from multiqueue.errors import GraphError
from multiqueue.graph import Block, NullSink, Port, Runtime


def test_counters_survive_a_sigkill_and_restart_and_show_in_stats(domain, tmp_path):
    rt = Runtime(domain)
    # a source that never ends: one with a count could finish while the block restarts
    src = rt.add(Ramp(count=10**9, n=16, pace_s=0.002), "src")
    victim = rt.add(CountingCrash(at=50, marker=str(tmp_path / "killed")), "victim", restart="restart")
    rt.connect(src["out"], victim["in"])
    rt.start()
    try:
        wait_until(lambda: rt.stats().blocks["victim"].counters["frames"] > 55, "the second life counts")
    finally:
        rt.stop(timeout=60)
    stats = rt.final_stats.blocks["victim"]
    assert stats.restarts == 1
    # the second life counted on from the first's 50 (frames pushed while it was down are
    # not its own to count)
    assert stats.counters["lives"] == 2
    assert 55 < stats.counters["frames"] <= rt.final_stats.blocks["src"].items_out
    assert "frames=" in rt.final_stats.format()


def test_a_restarted_block_knows_exactly_what_its_predecessor_sent(domain, tmp_path):
    """Block.pushed: the predecessor was killed right after its 50th send, before any
    counter of its own could record it; the push count (kept in C with the push) did."""
    rt = Runtime(domain)
    src = rt.add(Ramp(count=200, n=16, pace_s=0.002), "src")
    victim = rt.add(SendThenCrash(at=50, marker=str(tmp_path / "killed")), "victim", restart="restart")
    sink = rt.add(NullSink(), "sink")
    rt.connect(src["out"], victim["in"])
    rt.connect(victim["out"], sink["in"])
    rt.run(duration=60)
    stats = rt.final_stats.blocks["victim"]
    assert stats.restarts == 1 and stats.counters["lives"] == 2
    assert stats.counters["pushed_at_start"] == 50


class Unknown(Block):
    inputs = {"in": Port(np.float32)}
    counters = ("seen",)

    def work(self, inputs):
        self.count("sen")


def test_an_undeclared_counter_fails_the_block_with_the_names_it_has(domain):
    rt = Runtime(domain)
    src = rt.add(Ramp(count=5, n=4), "src")
    bad = rt.add(Unknown(), "bad")
    rt.connect(src["out"], bad["in"])
    with pytest.raises(Exception, match=r"has no counter 'sen'; its counters: \['seen'\]"):
        rt.run(duration=30)


@pytest.mark.parametrize("counters", [("a",) * 2, tuple("abcdefghijklmno"), ["a"], ("",)])
def test_bad_counter_declarations_are_refused_at_add(domain, counters):
    class Bad(NullSink):
        pass

    Bad.counters = counters
    with pytest.raises(GraphError, match="counters must be a tuple of at most 14 distinct names"):
        Runtime(domain).add(Bad(), "bad")


def test_counters_need_a_running_block():
    with pytest.raises(Exception, match="is not running"):
        Unknown().count("seen")
