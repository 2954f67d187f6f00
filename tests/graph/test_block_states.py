"""Each block's live state, written by its own worker and read by any process: paused,
blocked by a reader of an edge, and rates over the last second beside the averages.

The graph runs in the test's Runtime (its blocks in worker processes); the commands and
readings are the `mq` commands a user types, in other processes."""

import json
import re
import subprocess
import sys

from graph_blocks import Ramp

from helpers import wait_until
from multiqueue.graph import NullSink, NullSource, Runtime, Throttle

MQ = [sys.executable, "-m", "multiqueue.cli"]
PACE = 50.0  # frames per second of the paced source


def mq(*args) -> subprocess.CompletedProcess:
    result = subprocess.run([*MQ, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def graph_blocks(domain: str) -> dict:
    """The graph's blocks as `mq stats --json` shows them."""
    return json.loads(mq("stats", domain, "--json").stdout)["graph"]["blocks"]


def test_a_paused_block_shows_paused_until_it_resumes(domain):
    with Runtime(domain) as rt:
        rt.connect(rt.add(Ramp(count=10**9, n=8, pace_s=0.01), name="src")["out"],
                   rt.add(NullSink(), name="sink")["in"])
        rt.start()
        mq("block", domain, "sink", "pause")
        sink = wait_until(lambda: (b := graph_blocks(domain)["sink"])["state"] == "paused" and b,
                          "mq stats shows the sink paused")
        assert sink["status"] == "paused", sink
        assert re.search(r"^sink +paused +\d+ .* paused$", mq("stats", domain).stdout, re.M)
        assert rt.stats().blocks["sink"].state == "paused"  # the runtime's stats() say the same

        mq("block", domain, "sink", "resume")
        wait_until(lambda: graph_blocks(domain)["sink"]["state"] == "running", "the sink runs again")
        rt.stop()


def test_a_source_behind_a_slow_blocking_reader_shows_which_reader_of_which_edge(domain):
    with Runtime(domain, capacity=2) as rt:
        rt.connect(rt.add(NullSource(frame=(16,)), name="src")["out"],
                   rt.add(Throttle(rate=5.0), name="slow")["in"])
        rt.connect(rt["slow"]["out"], rt.add(NullSink(), name="sink")["in"])
        rt.start()
        src = wait_until(lambda: (b := graph_blocks(domain)["src"])["status"].startswith("blocked") and b,
                         "mq stats shows the source blocked")
        slow_pid = rt.stats().blocks["slow"].pid
        assert re.fullmatch(rf"blocked by reader \d+ \(pid {slow_pid}\) of edge src\.out -> slow\.in",
                            src["status"]), src
        assert src["state"] == "running"
        rt.stop()


def test_the_rate_of_the_last_second_follows_the_pace_while_the_average_still_counts_a_pause(domain):
    with Runtime(domain) as rt:
        rt.connect(rt.add(Ramp(count=10**9, n=8, pace_s=1 / PACE), name="src")["out"],
                   rt.add(NullSink(), name="sink")["in"])
        rt.start()
        wait_until(lambda: rt.stats().blocks["src"].items_out >= 10, "the source runs")
        mq("block", domain, "src", "pause")
        # paused for more than a second: nothing went out in the last one, and the
        # average since start has fallen well below the pace
        wait_until(lambda: (b := rt.stats().blocks["src"]).rate_out_now == 0 and b.rate_out < 0.3 * PACE,
                   "the paused source's rates fall", timeout=30)
        mq("block", domain, "src", "resume")
        src = wait_until(lambda: (b := rt.stats().blocks["src"]).rate_out_now >= 0.6 * PACE and b,
                         "the rate of the last second is back near the pace", timeout=30, interval=0.05)
        assert src.rate_out_now <= 1.3 * PACE, src
        assert src.rate_out < 0.85 * src.rate_out_now, src  # the average still counts the pause
        rt.stop()
