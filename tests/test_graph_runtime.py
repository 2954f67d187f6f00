"""The graph runtime end to end: real worker processes, exact values, failures."""

import numpy as np
import pytest
from graph_blocks import Crash, Ramp, Record, ramp_gen, scale

from multiqueue import PoolConfig, ShmConfig
from multiqueue.graph import BlockError, GraphError, Multiply, NullSink, Runtime

POOLS = ShmConfig(pools=[PoolConfig("frames", 4096, 256)], max_processes=32)


def expected_ramp(count, n, factor):
    k = np.arange(count, dtype=np.float64)
    return k * factor, (k * n + n * (n - 1) / 2) * factor


def test_ramp_amplifier_two_sinks_across_processes(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=200, n=1024), name="src")
    amp = rt.add(Multiply(0.5), name="amp")
    a = rt.add(Record(tmp_path / "a.npy"), name="a")
    b = rt.add(Record(tmp_path / "b.npy"), name="b")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], a["in"])
    rt.connect(amp["out"], b["in"])
    rt.run(duration=120)
    first, total = expected_ramp(200, 1024, 0.5)
    for name in ("a", "b"):
        rows = np.load(tmp_path / f"{name}.npy")
        assert rows.shape == (200, 4)
        np.testing.assert_array_equal(rows[:, 0], first)
        np.testing.assert_array_equal(rows[:, 1], total)
        np.testing.assert_array_equal(rows[:, 3], 1_000_000 + np.arange(200))  # timestamps propagate
    assert rt.blocks_in_use_at_end == 0
    assert rt.failures == []


def test_function_blocks_and_thread_placement(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(ramp_gen(count=7, n=16), name="src", placement="thread")
    dbl = rt.add(scale(factor=3.0), name="dbl")
    out = rt.add(Record(tmp_path / "out.npy"), name="out", placement="thread")
    rt.connect(src["out"], dbl["in"])
    rt.connect(dbl["out"], out["in"])
    rt.run(duration=120)
    rows = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(rows[:, 0], np.arange(7) * 3.0)
    np.testing.assert_array_equal(rows[:, 1], np.arange(7) * 3.0 * 16)
    assert rt.blocks_in_use_at_end == 0


def test_block_exception_stops_the_graph_and_reports_the_traceback(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10_000, n=64), name="src")
    bad = rt.add(Crash(at=5, how="raise"), name="bad")
    sink = rt.add(NullSink(), name="sink")
    rt.connect(src["out"], bad["in"])
    rt.connect(bad["out"], sink["in"])
    with pytest.raises(BlockError, match="bad") as info:
        rt.run(duration=120)
    assert "crash on purpose at frame 5" in str(info.value)
    assert "Traceback" in str(info.value)
    assert [f.block for f in rt.failures] == ["bad"]
    assert rt.blocks_in_use_at_end == 0


def test_unconnected_input_is_refused_at_start(domain):
    rt = Runtime(domain, pools=POOLS)
    rt.add(Multiply(), name="amp")
    with pytest.raises(GraphError, match="input amp.in is not connected"):
        rt.start()



def test_sigkill_of_a_worker_is_reported_within_a_second_and_the_graph_stops_clean(domain, tmp_path):
    marker = tmp_path / "killed"
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=100_000, n=64), name="src")
    bad = rt.add(Crash(at=50, how="kill", marker=str(marker)), name="victim")
    sink = rt.add(Record(tmp_path / "sink.npy"), name="sink")
    rt.connect(src["out"], bad["in"])
    rt.connect(bad["out"], sink["in"])
    with pytest.raises(BlockError, match="victim.*killed by SIGKILL"):
        rt.run(duration=120)
    [failure] = rt.failures
    assert failure.action == "stopped the graph"
    assert failure.at - marker.stat().st_mtime < 1.0  # noticed within a second of the kill
    rows = np.load(tmp_path / "sink.npy")  # everything forwarded before the kill arrived, in order
    np.testing.assert_array_equal(rows[:, 0], np.arange(49))
    assert rt.blocks_in_use_at_end == 0  # the dead worker's references were reclaimed


def test_restart_policy_restarts_a_killed_block_and_the_graph_goes_on(domain, tmp_path):
    marker = tmp_path / "killed"
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=400, n=64, pace_s=0.002), name="src")
    bad = rt.add(Crash(at=20, how="kill", marker=str(marker)), name="victim", restart="restart")
    sink = rt.add(Record(tmp_path / "sink.npy"), name="sink")
    rt.connect(src["out"], bad["in"])
    rt.connect(bad["out"], sink["in"])
    rt.run(duration=120)  # no BlockError: the block came back
    [failure] = rt.failures
    assert failure.action == "restarted" and "SIGKILL" in failure.reason
    assert rt.final_stats.blocks["victim"].restarts == 1
    rows = np.load(tmp_path / "sink.npy")
    firsts = rows[:, 0]
    np.testing.assert_array_equal(firsts[:19], np.arange(19))  # before the kill
    assert firsts[-1] == 399  # after the restart, to the end
    assert np.all(np.diff(firsts) > 0)  # in order, frames lost only while it was down
    assert rt.blocks_in_use_at_end == 0


def test_slow_drop_oldest_branch_does_not_slow_the_other_branch(domain, tmp_path):
    count, delay = 300, 0.02
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=count, n=64), name="src")
    fast = rt.add(Record(tmp_path / "fast.npy"), name="fast")
    slow = rt.add(Record(tmp_path / "slow.npy", delay_s=delay), name="slow")
    rt.connect(src["out"], fast["in"])
    rt.connect(src["out"], slow["in"], policy="drop_oldest", capacity=8)
    rt.run(duration=120)
    fast_rows, slow_rows = np.load(tmp_path / "fast.npy"), np.load(tmp_path / "slow.npy")
    np.testing.assert_array_equal(fast_rows[:, 0], np.arange(count))
    [to_fast, to_slow] = rt.final_stats.edges
    assert to_fast.drops == 0
    assert len(slow_rows) + to_slow.drops == count
    assert len(slow_rows) < count / 2  # it could not keep up, and did not hold anyone back
