"""Every reader is an edge, and every loss is counted (issue 15, scenarios 2, 3 and
the counters of 5), driven as a user drives them: `mq run` of a graph file, a worker
SIGKILLed, an outside `Consumer` in another process, `mq stats`."""

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass

import multiqueue
from helpers import RoleProcess, wait_until
from multiqueue.errors import SegmentError

# The graphs' own blocks, written next to each graph file (its workers import them from there).
BLOCKS = '''
import time

import numpy as np

from multiqueue.graph import DONE, Block, Port


class Numbered(Block):
    """Frames 0, 1, 2, ... (each 4 float32 copies of its number), ``rate`` a second."""

    outputs = {"out": Port(np.float32, (4,))}

    def __init__(self, count=10_000, rate=2000.0):
        super().__init__()
        self.count, self.rate = count, rate

    def start(self):
        self.k, self.t0 = 0, time.monotonic()

    def work(self, inputs):
        if self.k >= self.count:
            return DONE
        due = min(self.count, int((time.monotonic() - self.t0) * self.rate) + 1)
        while self.k < due:
            frame = self.allocate("out")
            frame.array[:] = self.k
            self.send("out", frame)
            self.k += 1
        self.sleep(0.002)


class Copy(Block):
    """Copies each frame into a new one, with 0.3 ms of work after each send, so that a
    kill often lands inside work() between two sends."""

    inputs = {"in": Port(np.float32, (4,))}
    outputs = {"out": Port(np.float32, (4,))}

    def work(self, inputs):
        for frame in inputs["in"]:
            out = self.allocate("out")
            out.array[:] = frame.array
            self.send("out", out)
            busy_until = time.perf_counter() + 0.0003
            while time.perf_counter() < busy_until:
                pass


class FailsAt(Block):
    """Forwards frames; raises on frame number ``at`` (1 = the first)."""

    inputs = {"in": Port(np.float32, (4,))}
    outputs = {"out": Port(np.float32, (4,))}

    def __init__(self, at=5):
        super().__init__()
        self.at, self.seen = at, 0

    def work(self, inputs):
        for frame in inputs["in"]:
            self.seen += 1
            if self.seen == self.at:
                raise ValueError(f"frame {self.seen} is bad")
            self.send("out", frame)


class Check(Block):
    """Counts what arrives, and frames out of order or seen twice (disorder)."""

    inputs = {"in": Port(np.float32, (4,))}
    counters = ("received", "disorder")
    batch = 64

    def start(self):
        self.last = -1

    def work(self, inputs):
        for frame in inputs["in"]:
            k = int(frame.array[0])
            if k <= self.last:
                self.count("disorder")
            self.last = k
            self.count("received")
'''

# A slow reader of the source's port from outside the graph (its queue is "src-out").
CONSUMER = '''
import json, sys, time
from multiqueue import Consumer

domain, policy = sys.argv[1], sys.argv[2]
with Consumer(domain, "src-out", **({} if policy == "default" else {"policy": policy})) as consumer:
    print(json.dumps({"event": "reading", "policy": consumer.reader.policy}), flush=True)
    frames = 0
    for array in consumer:
        frames += 1
        time.sleep(0.2)
print(json.dumps({"event": "done", "frames": frames}), flush=True)
'''

RESTART_GRAPH = """
capacity: 16
pools: [{name: frames, block_size: 64, count: 256}]
blocks:
  src: {class: "lossblocks:Numbered", params: {count: 10000, rate: 2000}}
  mid: {class: "lossblocks:Copy", restart: restart}
  sink: {class: "lossblocks:Check"}
connections: [src.out -> mid.in, mid.out -> sink.in]
"""


@dataclass
class BlockLine:
    state: str
    items_in: int
    items_out: int
    rate_in: float
    rate_out: float


@dataclass
class EdgeLine:
    policy: str
    lag: int
    capacity: int
    drops: int


def graph_file(tmp_path, text: str):
    (tmp_path / "lossblocks.py").write_text(BLOCKS)
    path = tmp_path / "graph.yaml"
    path.write_text(text)
    return path


def mq(*args) -> list[str]:
    return [sys.executable, "-m", "multiqueue.cli", *map(str, args)]


def start_run(path, domain: str) -> subprocess.Popen:
    return subprocess.Popen(mq("run", path, "--domain", domain, "--quiet"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(run: subprocess.Popen) -> tuple[str, str]:
    try:
        return run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()


def attached(domain: str):
    """The running graph of ``domain``, once it runs (the test's view from outside)."""

    def attach():
        try:
            return multiqueue.attach(domain, name="test")
        except SegmentError:
            return None  # not started yet

    return wait_until(attach, f"graph {domain} runs", interval=0.05)


def summary(out: str) -> tuple[dict[str, BlockLine], dict[str, EdgeLine]]:
    """The final stats `mq run` printed: blocks and edges by name."""
    blocks = {m[1]: BlockLine(m[2], int(m[3]), int(m[4]), float(m[5]), float(m[6]))
              for m in re.finditer(r"^(\w+) +(\w+) +(\d+) +(\d+) +([\d.]+) +([\d.]+)", out, re.M)}
    edges = {f"{m[1]} -> {m[2]}": EdgeLine(m[3], int(m[4]), int(m[5]), int(m[6]))
             for m in re.finditer(r"^(\S+) -> (.+?) {2,}(block|drop_oldest) +(\d+)/(\d+) +(\d+)", out, re.M)}
    return blocks, edges


def test_frames_lost_in_a_sigkilled_blocks_restart_are_counted_exactly(domain, tmp_path):
    """Scenario 3 and the restart test: a middle block with restart: restart is SIGKILLed
    while a source streams 10,000 numbered frames: the sink's frames and the edges'
    drops add up to 10,000 exactly, `mq run` prints the restart and exits 0, and the
    restarted block's counters and rates go on from its predecessor's."""
    run = start_run(graph_file(tmp_path, RESTART_GRAPH), domain)
    try:
        with attached(domain) as graph:
            mid = wait_until(lambda: (b := graph.stats().blocks["mid"]).items_in >= 2000 and b,
                             "mid processed 2000 frames", interval=0.02)
        os.kill(mid.pid, signal.SIGKILL)
    finally:
        out, err = finish(run)
    assert run.returncode == 0, out + err
    assert ("mq run: block 'mid' failed (its process was killed by SIGKILL); restarted it "
            "(restart 1 of 3)") in out
    blocks, edges = summary(out)
    assert blocks["src"].items_out == 10_000
    into_mid, into_sink = edges["src.out -> mid.in"], edges["mid.out -> sink.in"]
    assert into_mid.drops > 0, "frames were lost with the killed block and while it restarted"
    assert blocks["sink"].items_in + into_mid.drops + into_sink.drops == 10_000, out
    assert f"received={blocks['sink'].items_in}  disorder=0" in out  # each frame once, in order
    # the restarted block went on counting: what it took in is what it sent, and the sink got
    assert blocks["mid"].items_in == blocks["mid"].items_out == blocks["sink"].items_in, out
    # its average rate is over its whole run, not its items over the time since the restart
    assert blocks["mid"].rate_in <= blocks["src"].rate_out * 1.05, out


def test_a_failed_block_shows_the_frames_it_processed(domain, tmp_path):
    """Scenario 5: a block raising in work() on its 5th frame (handed 16 at once) shows
    the 4 frames it forwarded, not `0 0`, and the frames it never finished are drops."""
    run = start_run(graph_file(tmp_path, """
capacity: 16
blocks:
  src: {class: "lossblocks:Numbered", params: {count: 20, rate: 1000000}}
  b: {class: "lossblocks:FailsAt", params: {at: 5}}
  sink: {class: "lossblocks:Check"}
connections: [src.out -> b.in, b.out -> sink.in]
"""), domain)
    out, err = finish(run)
    assert run.returncode == 1 and "ValueError: frame 5 is bad" in err, out + err
    assert "mq run: block 'b' failed (raised an exception); stopped the graph" in out
    blocks, edges = summary(out)
    assert (blocks["b"].state, blocks["b"].items_in, blocks["b"].items_out) == ("failed", 4, 4), out
    assert blocks["sink"].items_in == 4
    assert blocks["src"].items_out == 20
    assert edges["src.out -> b.in"].drops == 20 - 4, out  # sent = received + dropped


def consumer_edge(edges: list, policy: str):
    """The edge of the outside consumer in a list of edges as data, or None."""
    return next((e for e in edges if e["outside"] and e["src"] == "src.out"
                 and e["dst"].startswith("consumer (pid ") and e["policy"] == policy), None)


def test_a_slow_outside_consumer_does_not_slow_the_graph_and_is_an_edge(domain, tmp_path):
    """Scenario 2: a slow `Consumer(domain, "src-out")` with the default policy reads
    drop_oldest: the source keeps its pace, and the reader is an edge of the graph
    with its policy and drops (stats(), the final summary of `mq run`)."""
    run = start_run(graph_file(tmp_path, """
blocks:
  src: {class: "lossblocks:Numbered", params: {count: 1500, rate: 500}}
  sink: {class: "lossblocks:Check"}
connections: [src.out -> sink.in]
"""), domain)
    consumer = None
    try:
        with attached(domain) as graph:
            consumer = RoleProcess("consumer", [sys.executable, "-c", CONSUMER, domain, "default"])
            assert consumer.expect("reading")["policy"] == "drop_oldest"
            wait_until(lambda: (e := consumer_edge([vars(e) for e in graph.stats().edges], "drop_oldest"))
                       and e["drops"] > 0, "the consumer is an edge that dropped frames", timeout=30)
        out, err = finish(run)
        assert consumer.expect("done")["frames"] < 1500
        assert consumer.finish() == 0, consumer.stderr
    finally:
        if consumer is not None and consumer.proc.poll() is None:
            consumer.proc.kill()
    assert run.returncode == 0, out + err
    blocks, edges = summary(out)
    assert blocks["src"].items_out == 1500
    assert blocks["src"].rate_out > 250, out  # its pace (500/s), not the consumer's (5/s)
    outside = [e for name, e in edges.items() if name.startswith("src.out -> consumer (pid ")]
    assert len(outside) == 1 and outside[0].policy == "drop_oldest" and outside[0].drops > 0, out


def test_an_outside_consumer_that_asks_for_block_is_a_blocking_edge(domain, tmp_path):
    """Scenario 2, lossless by choice: `Consumer(..., policy="block")` is a blocking edge,
    shown as such by `mq stats` while it holds the source back; once it is killed the
    graph goes on and ends well."""
    run = start_run(graph_file(tmp_path, """
capacity: 16
blocks:
  src: {class: "lossblocks:Numbered", params: {count: 1000, rate: 500}}
  sink: {class: "lossblocks:Check"}
connections: [src.out -> sink.in]
"""), domain)
    consumer = None
    try:
        attached(domain).close()
        consumer = RoleProcess("consumer", [sys.executable, "-c", CONSUMER, domain, "block"])
        assert consumer.expect("reading")["policy"] == "block"

        def full_blocking_edge():
            stats = subprocess.run(mq("stats", domain, "--json"), capture_output=True, text=True, timeout=60)
            assert stats.returncode == 0, stats.stderr
            edge = consumer_edge(json.loads(stats.stdout)["graph"]["edges"], "block")
            return edge if edge and edge["lag"] == edge["capacity"] == 16 else None

        wait_until(full_blocking_edge, "mq stats shows the consumer's full blocking edge", timeout=30)
        consumer.proc.kill()
        out, err = finish(run)
    finally:
        if consumer is not None and consumer.proc.poll() is None:
            consumer.proc.kill()
    assert run.returncode == 0, out + err
    assert summary(out)[0]["sink"].items_in == 1000
