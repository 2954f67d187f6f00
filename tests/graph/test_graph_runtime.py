"""The graph runtime end to end: real worker processes, exact values, failures."""

import subprocess
import sys

import numpy as np
import pytest
from graph_blocks import Crash, Ints, Pid, Ramp, Record, Stuck, Window3, ramp_gen, scale, stamp_as_values

from multiqueue import PoolConfig, ShmConfig
from multiqueue.errors import BlockError, GraphError
from multiqueue.graph import Multiply, NullSink, Runtime, attach

POOLS = ShmConfig(pools=[PoolConfig("frames", 4096, 256)], max_processes=32)


def wait_for_a_frame(domain, port):
    """Until ``port`` has sent a frame (read through a tap that starts at the oldest one)."""
    with attach(domain) as graph, graph.subscribe(port, start="oldest") as tap:
        frame = tap.read(timeout=30)
        assert frame is not None
        frame.buffer.release()


def read_past(tap, value):
    """Frames of ``tap`` until one starts past ``value``: that one's first value."""
    while True:
        frame = tap.read(timeout=30)
        assert frame is not None, f"{tap.port} sent nothing past {value} within 30 s"
        with frame.buffer:
            if frame.array[0] > value:
                return float(frame.array[0])


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
    # a source that never ends: one with a count could finish while the block restarts
    # (a spawn takes a second on a loaded machine), and the new one would start at the end
    src = rt.add(Ramp(count=10**9, n=64, pace_s=0.002), name="src")
    bad = rt.add(Crash(at=20, how="kill", marker=str(marker)), name="victim", restart="restart")
    sink = rt.add(Record(tmp_path / "sink.npy"), name="sink")
    rt.connect(src["out"], bad["in"])
    rt.connect(bad["out"], sink["in"])
    rt.start()
    try:
        with attach(domain) as graph, graph.subscribe("victim.out", start="oldest") as tap:
            after_restart = read_past(tap, 20)  # the restarted block forwards again
    finally:
        rt.stop(timeout=60)  # no BlockError: the block came back
    [failure] = rt.failures
    assert failure.action == "restarted" and "SIGKILL" in failure.reason
    assert rt.final_stats.blocks["victim"].restarts == 1
    rows = np.load(tmp_path / "sink.npy")
    firsts = rows[:, 0]
    np.testing.assert_array_equal(firsts[:19], np.arange(19))  # before the kill
    assert after_restart in firsts[19:]  # after the restart, until the stop
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


# -- connect-time validation ------------------------------------------------------------


@pytest.fixture
def graph(domain):
    rt = Runtime(domain, pools=POOLS)
    rt.add(Ramp(), name="src")
    rt.add(Multiply(), name="amp")
    rt.add(NullSink(), name="rec")
    return rt


def test_unknown_port_names_the_block_and_its_ports(graph):
    with pytest.raises(GraphError, match=r"block 'amp' \(Multiply\) has no port 'output'.*inputs \['in'\]"):
        graph["amp"]["output"]


def test_unknown_block_is_refused(graph):
    with pytest.raises(GraphError, match="no block named 'nope'"):
        graph["nope"]


def test_output_to_output_and_input_to_input_are_refused(graph):
    with pytest.raises(GraphError, match="amp.out is an output port"):
        graph.connect(graph["src"]["out"], graph["amp"]["out"])
    with pytest.raises(GraphError, match="amp.in is an input port"):
        graph.connect(graph["amp"]["in"], graph["rec"]["in"])


def test_dtype_mismatch_is_refused_at_connect(graph):
    graph.add(Ints(), name="ints")
    with pytest.raises(GraphError, match="cannot connect ints.out to amp.in: dtype int16 does not match"):
        graph.connect(graph["ints"]["out"], graph["amp"]["in"])


def test_second_writer_into_an_input_is_refused(graph):
    graph.connect(graph["src"]["out"], graph["rec"]["in"])
    with pytest.raises(GraphError, match="input rec.in already has a writer \\(src.out\\)"):
        graph.connect(graph["amp"]["out"], graph["rec"]["in"])


def test_cycle_is_refused(graph):
    graph.add(Multiply(), name="amp2")
    graph.connect(graph["amp"]["out"], graph["amp2"]["in"])
    with pytest.raises(GraphError, match="would make a cycle"):
        graph.connect(graph["amp2"]["out"], graph["amp"]["in"])


def test_bad_names_policies_and_capacities_are_refused(graph):
    with pytest.raises(GraphError, match="already has a block named 'amp'"):
        graph.add(Multiply(), name="amp")
    with pytest.raises(GraphError, match="block name 'a b'"):
        graph.add(Multiply(), name="a b")
    with pytest.raises(ValueError, match="policy must be"):
        graph.connect(graph["src"]["out"], graph["amp"]["in"], policy="newest")
    with pytest.raises(ValueError, match="capacity must be a power of two"):
        graph.connect(graph["src"]["out"], graph["amp"]["in"], capacity=10)
    with pytest.raises(ValueError, match="restart must be"):
        graph.add(Multiply(), name="m3", restart="always")


def test_a_block_that_cannot_be_pickled_is_refused_unless_in_a_thread(domain):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=3, n=8), name="src")
    sink = rt.add(NullSink(), name="sink")
    sink.block.unpicklable = lambda: None  # a lambda cannot cross to a process
    rt.connect(src["out"], sink["in"])
    with pytest.raises(GraphError, match="block 'sink' cannot be sent to its worker.*placement='thread'"):
        rt.start()


# -- placement, parameters, stop ------------------------------------------------------------


def test_named_placement_groups_blocks_in_one_process_and_threads_run_here(domain, tmp_path):
    import os

    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=20, n=8), name="src", placement="work")
    p1 = rt.add(Pid(), name="p1", placement="work")
    p2 = rt.add(Pid(), name="p2", placement="thread")
    out = rt.add(Record(tmp_path / "out.npy"), name="out")
    rt.connect(src["out"], p1["in"])
    rt.connect(p1["out"], p2["in"])
    rt.connect(p2["out"], out["in"])
    rt.run(duration=120)
    pids = {name: b.pid for name, b in rt.final_stats.blocks.items()}
    assert pids["src"] == pids["p1"] != os.getpid()
    assert pids["p2"] == os.getpid()
    assert pids["out"] not in (pids["src"], os.getpid())
    assert len(np.load(tmp_path / "out.npy")) == 20


def test_set_and_get_parameter_reach_the_worker(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=1_000_000, n=8, pace_s=0.001), name="src")
    amp = rt.add(Multiply(1.0), name="amp")
    sink = rt.add(Record(tmp_path / "out.npy"), name="sink")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], sink["in"])
    rt.start()
    with attach(domain) as graph, graph.subscribe("amp.out", policy="block") as tap:
        assert rt.get_parameter("amp", "factor") == 1.0
        rt.set_parameter("amp", "factor", 3.0)
        assert rt.get_parameter("amp", "factor") == 3.0
        with pytest.raises(BlockError, match="no run-time parameter 'gain'"):
            rt.set_parameter("amp", "gain", 2.0)
        for frame in tap:  # wait for the first frame made with 3.0
            if frame.array[1] - frame.array[0] == 3.0:  # consecutive values differ by the factor
                break
    rt.stop()
    rows = np.load(tmp_path / "out.npy")  # the sink drained everything: it has the tap's frame too
    factors = rows[:, 1] / (8 * np.arange(len(rows)) + 28)  # frame k sums to factor * (8k + 28)
    assert set(np.round(factors, 6)) <= {1.0, 3.0} and factors[-1] == 3.0
    switch = np.argmax(factors == 3.0)
    assert np.all(factors[switch:] == 3.0)  # applied between two frames, for good
    assert rt.blocks_in_use_at_end == 0


def test_stop_aborts_a_hung_block_after_the_drain_timeout(domain):
    rt = Runtime(domain, pools=POOLS, drain_timeout=0.5)
    src = rt.add(Ramp(count=1_000_000, n=8), name="src")
    hung = rt.add(Stuck(), name="hung")
    rt.connect(src["out"], hung["in"])
    rt.start()
    wait_for_a_frame(domain, "src.out")  # on its way to the hung block, which will never finish it
    rt.stop()  # the source stops; the hung block never drains: aborted, then all released
    states = {n: b.state for n, b in rt.final_stats.blocks.items()}
    assert states == {"src": "done", "hung": "stopped"}
    assert rt.blocks_in_use_at_end == 0


def test_stats_while_running_and_from_an_unrelated_process(domain, tmp_path):
    from helpers import run_python

    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=1_000_000, n=8, pace_s=0.001), name="src")
    sink = rt.add(Record(tmp_path / "out.npy"), name="sink")
    rt.connect(src["out"], sink["in"])
    rt.start()
    try:
        outside = run_python(
            "import sys, multiqueue\n"
            "with multiqueue.attach(sys.argv[1]) as g:\n"
            "    s = g.stats()\n"
            "    tap = g.subscribe('src.out')\n"
            "    f = tap.read(timeout=30)\n"
            "    print(g.blocks, g.ports, s.blocks['src'].state, f.array.dtype, f.array.shape)\n"
            "    f.buffer.release()\n", domain)
        assert outside.returncode == 0, outside.stderr
        assert outside.stdout.split() == ["['src',", "'sink']", "['src.out']", "running", "float32", "(8,)"]
        s = rt.stats()
        assert s.blocks["src"].state == "running" and s.edges[0].src == "src.out"
    finally:
        rt.stop()
    assert rt.blocks_in_use_at_end == 0


RUNTIME_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[2])
from graph_blocks import Ramp
from multiqueue import PoolConfig, ShmConfig
from multiqueue.graph import NullSink, Runtime

if __name__ == "__main__":
    rt = Runtime(sys.argv[1], pools=ShmConfig(pools=[PoolConfig("frames", 4096, 64)]))
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src")
    sink = rt.add(NullSink(), name="sink")
    rt.connect(src["out"], sink["in"])
    rt.start()
    print(*(b.pid for b in rt.stats().blocks.values()), flush=True)
    sys.stdin.readline()
"""


def test_workers_exit_and_the_domain_is_removed_when_the_runtime_is_killed(domain, tmp_path):
    import os
    import select
    import signal
    from pathlib import Path

    from multiqueue.shm.segment import domain_segments

    script = tmp_path / "graph_main.py"
    script.write_text(RUNTIME_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), domain, str(Path(__file__).resolve().parents[1])],
                            text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker_pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(worker_pids) == 2, proc.stderr.read()
    pidfds = [os.pidfd_open(pid) for pid in worker_pids]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        for fd in pidfds:  # a pidfd becomes readable when its process exits
            assert select.select([fd], [], [], 30)[0], "a worker outlived its runtime"
    finally:
        for fd in pidfds:
            os.close(fd)
    assert not domain_segments("mq.", domain)  # the last worker out removed the domain


def test_insufficient_input_and_consume_take_frames_three_at_a_time(domain, tmp_path):
    with Runtime(domain, pools=POOLS) as rt:
        src = rt.add(Ramp(count=10, n=4), name="src", placement="thread")
        win = rt.add(Window3(), name="win", placement="thread")
        out = rt.add(Record(tmp_path / "out.npy"), name="out", placement="thread")
        rt.connect(src["out"], win["in"])
        rt.connect(win["out"], out["in"])
        rt.start()
        assert rt.wait(timeout=60)
    rows = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(rows[:, 0], [0, 3, 6])  # frames 0-2, 3-5, 6-8; frame 9 waits in vain
    np.testing.assert_array_equal(rows[:, 2], [12, 12, 12])
    assert rt.final_stats.blocks["win"].items_in == 9
    assert rt.blocks_in_use_at_end == 0  # the leftover frame was released at the end


def test_function_block_gets_the_input_timestamps(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=5, n=4), name="src", placement="thread")
    fn = rt.add(stamp_as_values(), name="fn", placement="thread")
    out = rt.add(Record(tmp_path / "out.npy"), name="out", placement="thread")
    rt.connect(src["out"], fn["in"])
    rt.connect(fn["out"], out["in"])
    rt.run(duration=60)
    rows = np.load(tmp_path / "out.npy")
    np.testing.assert_array_equal(rows[:, 0], 1_000_000 + np.arange(5))  # value == its input's timestamp
    np.testing.assert_array_equal(rows[:, 3], 1_000_000 + np.arange(5))  # and the timestamp propagated


def test_mq_tap_prints_frames_of_a_running_graph(domain):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src")
    rt.connect(src["out"], rt.add(NullSink(), name="sink")["in"])
    rt.start()
    try:
        command = [sys.executable, "-m", "multiqueue.cli", "tap", domain, "src.out", "--count", "3"]
        tap = subprocess.run(command, capture_output=True, text=True, timeout=60)
    finally:
        rt.stop()
    assert tap.returncode == 0, tap.stderr
    lines = [line for line in tap.stdout.splitlines() if line.startswith("src.out t=")]
    assert len(lines) == 3 and all("float32[8]" in line for line in lines)
    assert "3 frames in" in tap.stdout


def test_a_graph_segment_left_by_a_dead_runtime_is_replaced(domain, tmp_path):
    from helpers import run_python
    from multiqueue.graph.registry import GraphSegment
    from multiqueue.shm.segment import segment_path

    left = run_python("import os, sys\nfrom multiqueue.graph.registry import GraphSegment\n"
                      "GraphSegment.create('mq.', sys.argv[1], {'blocks': [], 'edges': []})\n"
                      "os._exit(0)  # dies without removing it\n", domain)
    assert left.returncode == 0, left.stderr
    assert GraphSegment.open("mq.", domain).description == {"blocks": [], "edges": []}
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=3, n=4), name="src", placement="thread")
    out = rt.add(Record(tmp_path / "out.npy"), name="out", placement="thread")
    rt.connect(src["out"], out["in"])
    rt.run(duration=60)
    assert len(np.load(tmp_path / "out.npy")) == 3
    import os

    assert not os.path.exists(segment_path("mq.", domain, "graph"))


def test_a_second_runtime_on_a_running_domain_is_refused(domain):
    first = Runtime(domain, pools=POOLS)
    first.connect(first.add(Ramp(count=10**9, n=4, pace_s=0.01), name="src", placement="thread")["out"],
                  first.add(NullSink(), name="out", placement="thread")["in"])
    first.start()
    try:
        second = Runtime(domain, pools=POOLS)
        second.add(Ramp(count=1), name="src", placement="thread")
        with pytest.raises(Exception, match="already runs a graph"):
            second.start()
    finally:
        first.stop()


def test_stop_returns_even_when_a_thread_block_ignores_the_abort(domain):
    import threading

    release = threading.Event()

    class Deaf(NullSink):  # ignores stop and abort until the test lets it go
        def work(self, inputs):
            release.wait(60)

    rt = Runtime(domain, pools=POOLS, drain_timeout=0.2)
    src = rt.add(Ramp(count=10**9, n=4), name="src", placement="thread")
    rt.connect(src["out"], rt.add(Deaf(), name="deaf", placement="thread")["in"])
    rt.start()
    try:
        wait_for_a_frame(domain, "src.out")  # the deaf block gets it, and never returns
        rt.stop()
        assert [(f.block, f.action) for f in rt.failures] == [("deaf", "left running in a daemon thread")]
    finally:
        release.set()
        rt.supervisor.hosts["deaf"].thread.join(30)  # it sees the abort now, leaves, and removes the domain


# -- failure paths found in review --------------------------------------------------------


def test_a_tap_does_not_end_a_graph_whose_source_restarts(domain, tmp_path):
    marker = tmp_path / "killed"
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src")  # never ends: see the test above
    bad = rt.add(Crash(at=20, how="kill", marker=str(marker)), name="bad", restart="restart")
    sink = rt.add(Record(tmp_path / "sink.npy"), name="sink")
    rt.connect(src["out"], bad["in"])
    rt.connect(bad["out"], sink["in"])
    rt.start()
    try:
        with attach(domain) as graph, graph.subscribe("bad.out") as tap:  # a viewer of the restarting port
            after_restart = read_past(tap, 20)  # it saw the producer die, and did not end the queue
    finally:
        rt.stop(timeout=60)
    assert [f.action for f in rt.failures] == ["restarted"]
    assert after_restart in np.load(tmp_path / "sink.npy")[:, 0]  # the sink got it too


def test_a_failing_block_in_a_shared_process_stops_the_graph_at_once(domain):
    from graph_blocks import Crash as Raiser

    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src", placement="grp")
    bad = rt.add(Raiser(at=3), name="bad", placement="grp")
    rt.connect(src["out"], bad["in"])
    rt.connect(bad["out"], rt.add(NullSink(), name="sink")["in"])
    rt.start()
    with pytest.raises(BlockError, match="block 'bad' failed \\(raised an exception\\)"):
        rt.wait(timeout=60)  # the source shares its process and runs on: the failure alone ends it
    assert rt.final_stats.blocks["bad"].state == "failed"


def test_a_worker_exiting_0_mid_run_is_a_failure_not_a_clean_end(domain):
    from graph_blocks import Exit0

    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src")
    rt.connect(src["out"], rt.add(Exit0(at=5), name="quits")["in"])
    with pytest.raises(BlockError, match="quits.*exited without finishing"):
        rt.run(duration=60)
    assert rt.final_stats.blocks["quits"].state == "failed"


def test_start_fails_at_once_when_a_block_cannot_initialize(domain):
    from graph_blocks import FailInit

    rt = Runtime(domain, pools=POOLS, start_timeout=60)
    src = rt.add(FailInit(), name="dev")
    rt.connect(src["out"], rt.add(NullSink(), name="sink")["in"])
    with pytest.raises(BlockError, match="(?s)block 'dev' failed.*cannot open the device"):
        rt.start()  # not after start_timeout: the failure ends the wait for readiness


def test_stop_and_stats_after_the_end_are_harmless(domain, tmp_path):
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=5, n=4), name="src", placement="thread")
    rt.connect(src["out"], rt.add(Record(tmp_path / "o.npy"), name="sink", placement="thread")["in"])
    rt.run(duration=60)
    rt.stop()  # again: nothing to do
    with pytest.raises(GraphError, match="not running"):
        rt.stats()
    assert rt.final_stats.blocks["src"].items_out == 5


def test_stop_with_a_timeout_kills_what_does_not_stop(domain):
    rt = Runtime(domain, pools=POOLS, drain_timeout=60)
    src = rt.add(Ramp(count=10**9, n=8), name="src")
    hung = rt.add(Stuck(), name="hung")
    rt.connect(src["out"], hung["in"])
    rt.start()
    pid = rt.stats().blocks["hung"].pid  # written before the worker reported ready
    assert pid > 0
    rt.stop(timeout=0.5)  # the drain timeout is far away: stop's own timeout aborts, then kills
    import os

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert rt.blocks_in_use_at_end == 0
