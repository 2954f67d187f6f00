"""Graph files across hosts: placement, remote edges, the same graph on one machine,
`mq run --host` per host bridged over Zenoh, and control across the bridge."""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from helpers import wait_until
from multiqueue.errors import GraphError, GraphFileError
from multiqueue.graph import Runtime, load_graph_text
from multiqueue.net import BridgeSink, BridgeSource
from multiqueue.net.control import ControlPlane, RemoteGraph
from multiqueue.net.hosts import check_hosts, host_graph
from multiqueue.shm.segment import domain_segments, unlink_quietly

TESTS = Path(__file__).resolve().parents[1]  # tests/, where graph_blocks.py lives
ROOT = TESTS.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_host_graph(graph: str, port: int, record: Path, count: int = 600, pace_s: float = 0.0) -> str:
    return f"""
domain: {graph}
remote_control: true
hosts:
  a: {{zenoh: {{listen: ["tcp/127.0.0.1:{port}"]}}}}
  b: {{zenoh: {{connect: ["tcp/127.0.0.1:{port}"]}}}}
blocks:
  src: {{class: "graph_blocks:Ramp", params: {{count: {count}, n: 64, pace_s: {pace_s}}}, host: a}}
  amp: {{class: Amplifier, params: {{gain: 1.0}}, host: b}}
  rec: {{class: "graph_blocks:Record", params: {{path: "{record}"}}, host: b}}
connections:
  - {{from: src.out, to: amp.in, remote: true}}
  - amp.out -> rec.in
"""


# -- loading --------------------------------------------------------------------------


def test_the_whole_graph_runs_on_one_machine_with_remote_edges_short_circuited(graph_name, tmp_path):
    sys.path.insert(0, str(TESTS))
    try:
        spec = load_graph_text(two_host_graph(graph_name, 1, tmp_path / "rec.npy", count=300))
        rt = Runtime.from_spec(spec)
    finally:
        sys.path.remove(str(TESTS))
    assert set(rt.blocks) == {"src", "amp", "rec"}  # no bridge, no control plane
    assert not any(isinstance(h.block, (BridgeSink, BridgeSource, ControlPlane)) for h in rt.blocks.values())
    rt.run(duration=60)
    rows = np.load(tmp_path / "rec.npy")
    assert rows[:, 0].tolist() == list(range(300))


def test_a_host_gets_its_blocks_bridges_and_control_plane(graph_name, tmp_path):
    text = two_host_graph(graph_name, 7447, tmp_path / "rec.npy")
    sys.path.insert(0, str(TESTS))
    try:
        spec = load_graph_text(text)
        a, b = host_graph(spec, "a"), host_graph(spec, "b")
    finally:
        sys.path.remove(str(TESTS))
    key = f"mq/{graph_name}/data/src/out/amp/in"
    assert a.domain == f"{graph_name}-a" and b.domain == f"{graph_name}-b"
    kinds_a = {n: type(h.block).__name__ for n, h in a.blocks.items()}
    kinds_b = {n: type(h.block).__name__ for n, h in b.blocks.items()}
    assert kinds_a == {"src": "Ramp", "tx0": "BridgeSink", "control": "ControlPlane"}
    assert kinds_b == {"amp": "Amplifier", "rec": "Record", "rx0": "BridgeSource", "control": "ControlPlane"}
    assert a.blocks["tx0"].block.key == key == b.blocks["rx0"].block.key
    assert b.blocks["rx0"].block.port.dtype == np.float32  # the sending port's type, checked on arrival
    assert {h.placement for n, h in b.blocks.items() if n in ("rx0", "control")} == {"zenoh"}
    assert b.blocks["rx0"].restart == "restart"
    assert a.blocks["tx0"].block.zenoh.listen == (f"tcp/127.0.0.1:{7447}",)


HOSTS = "hosts:\n  a: {}\n  b: {}\n"
BAD = {
    "edge between hosts not marked": (
        HOSTS + "blocks:\n  src: {class: NullSource, host: a}\n  sink: {class: NullSink, host: b}\n"
        "connections:\n  - src.out -> sink.in\n", 8, "connections[0]", "mark the edge 'remote: true'"),
    "unknown host": (HOSTS + "blocks:\n  src: {class: NullSource, host: c}\n", 5, "blocks.src.host",
                     "expected 'a' or 'b', not 'c'"),
    "host without hosts": ("blocks:\n  src: {class: NullSource, host: a}\n", 2, "blocks.src.host",
                           "no 'hosts:' section"),
    "key on a local edge": (
        "blocks:\n  src: {class: NullSource}\n  sink: {class: NullSink}\n"
        "connections:\n  - {from: src.out, to: sink.in, key: x/y}\n", 5, "connections[0].key",
        "add 'remote: true'"),
    "wildcard key": (
        "blocks:\n  src: {class: NullSource}\n  sink: {class: NullSink}\n"
        "connections:\n  - {from: src.out, to: sink.in, remote: true, key: 'x/*'}\n", 5, "connections[0].key",
        "no wildcards"),
    "remote not a boolean": (
        "blocks:\n  src: {class: NullSource}\n  sink: {class: NullSink}\n"
        "connections:\n  - {from: src.out, to: sink.in, remote: yes please}\n", 5, "connections[0].remote",
        "expected true or false"),
    "bad zenoh settings": ("hosts:\n  a: {zenoh: {conect: [x]}}\nblocks:\n  src: {class: NullSource}\n", 2,
                           "hosts.a.zenoh", "unknown zenoh setting(s) conect"),
    "bad endpoint": ("hosts:\n  a: {zenoh: {connect: [localhost]}}\nblocks:\n  src: {class: NullSource}\n", 2,
                     "hosts.a.zenoh", "a list of endpoints like 'tcp/127.0.0.1:7447'"),
    "bad host name": ("hosts:\n  a b: {}\nblocks:\n  src: {class: NullSource}\n", 2, "hosts.a b",
                      "a host name is"),
    "bad host domain": ("hosts:\n  a: {domain: 'x y'}\nblocks:\n  src: {class: NullSource}\n", 2,
                        "hosts.a.domain", "x y"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_host_layout_names_its_line(case):
    text, line, key, reason = BAD[case]
    with pytest.raises(GraphFileError) as info:
        check_hosts(load_graph_text(text, source="g.yaml"))  # zenoh settings and keys: checked by net
    assert (info.value.line, info.value.key) == (line, key), str(info.value)
    assert reason in info.value.reason


def test_choosing_a_host_the_graph_does_not_have_is_an_error():
    with pytest.raises(GraphError, match="no host 'c'; hosts: a, b"):
        host_graph(load_graph_text(HOSTS + "blocks:\n  src: {class: NullSource, host: a}\n"), "c")
    with pytest.raises(GraphError, match="names no hosts"):
        host_graph(load_graph_text("blocks:\n  src: {class: NullSource}\n"), "a")


# -- two hosts, two processes -----------------------------------------------------------


def mq(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "multiqueue.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env, **kwargs)


def mq_remote(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multiqueue.cli", "remote", *args], capture_output=True,
                          text=True, timeout=60)


def wait_for_hosts(remote: RemoteGraph, hosts: set, procs, deadline_s: float = 30.0) -> dict:
    """Until every host's control plane answers (its graph is up), or a host process ended."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        stats = remote.stats()
        if set(stats) >= hosts and all(b["state"] == "running" for s in stats.values()
                                       for b in s["blocks"].values() if b["name"] == "control"):
            return stats
        for p in procs:
            assert p.poll() is None, p.communicate()
    raise AssertionError(f"hosts did not come up: {sorted(remote.stats())}")


def test_two_hosts_stream_with_control_and_status_across_the_bridge(graph_name, tmp_path):
    port, record = free_port(), tmp_path / "rec.npy"
    path = tmp_path / "two.yaml"
    path.write_text(two_host_graph(graph_name, port, record, count=1500, pace_s=0.002))
    remote = RemoteGraph(f"mq/{graph_name}", zenoh={"connect": [f"tcp/127.0.0.1:{port}"]})
    events = []
    subscriber = remote.subscribe_status(events.append)
    procs = [mq("run", path, "--host", "b", "--quiet")]
    procs.append(mq("run", path, "--host", "a", "--quiet"))
    try:
        stats = wait_for_hosts(remote, {"a", "b"}, procs)
        assert {"src", "tx0", "control"} <= set(stats["a"]["blocks"])
        assert {"amp", "rec", "rx0", "control"} <= set(stats["b"]["blocks"])
        # the hosts' control planes answer before their Zenoh link carries frames: change the
        # gain once frames flow, so that some frames see the old gain and the rest the new
        wait_until(lambda: remote.stats().get("b", {}).get("blocks", {}).get("amp", {}).get("items_out"),
                   "frames reach amp on host b")
        remote.set_parameter("amp", "gain", 3.0)  # amp runs on host b; we dialled host a's listener
        assert remote.get_parameter("amp", "gain") == 3.0
        with pytest.raises(Exception, match="has no run-time parameter 'nope'"):
            remote.set_parameter("amp", "nope", 1)
        with pytest.raises(Exception, match="no host answered for block 'ghost'"):
            remote.get_parameter("ghost", "gain")
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        subscriber.undeclare()
        remote.close()
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = np.load(record)
    index = rows[:, 3] - 1_000_000  # Ramp stamps frame k with 1e6 + k: timestamps crossed the wire
    assert index.tolist() == list(range(1500))
    gains = rows[:, 1] / (64 * index + 64 * 63 / 2)  # a frame's sum over its ramp's sum
    k = int(np.argmax(np.isclose(gains, 3.0)))  # the first frame the new gain reached
    assert 0 < k < 1500 and np.allclose(gains[:k], 1.0) and np.allclose(gains[k:], 3.0), (k, set(gains))
    hosts_seen = {(e.get("host"), e.get("event"), e.get("block")) for e in events}
    assert ("b", "block-done", "rx0") in hosts_seen and ("a", "block-done", "src") in hosts_seen
    assert "received=1500  lost=0" in outs[0][0] and "sent=1500  unmatched=0" in outs[1][0]


def test_mq_remote_reports_stats_and_stops_every_host(graph_name, tmp_path):
    port = free_port()
    path = tmp_path / "two.yaml"
    path.write_text(two_host_graph(graph_name, port, tmp_path / "rec.npy", count=1_000_000, pace_s=0.001))
    procs = [mq("run", path, "--host", "b", "--quiet"), mq("run", path, "--host", "a", "--quiet")]
    connect = ["--connect", f"tcp/127.0.0.1:{port}"]
    try:
        with RemoteGraph(f"mq/{graph_name}", zenoh={"connect": [f"tcp/127.0.0.1:{port}"]}) as remote:
            wait_for_hosts(remote, {"a", "b"}, procs)
        stats = mq_remote(graph_name, "stats", "--json", *connect)
        assert stats.returncode == 0, stats.stderr
        data = json.loads(stats.stdout)
        assert set(data) == {"a", "b"} and "received" in data["b"]["blocks"]["rx0"]["counters"]
        stop = mq_remote(graph_name, "stop", *connect)
        assert stop.returncode == 0, stop.stderr
        assert "a: stopping" in stop.stdout and "b: stopping" in stop.stdout
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0, 0], outs
    rows = np.load(tmp_path / "rec.npy")
    assert len(rows) > 0 and rows[:, 0].tolist() == list(range(len(rows)))  # in order, none lost


def test_mq_remote_without_an_answer_says_so(tmp_path):
    result = mq_remote(f"nobody-{uuid.uuid4().hex[:6]}", "stats", "--timeout", "0.5",
                       "--connect", f"tcp/127.0.0.1:{free_port()}")
    assert result.returncode == 1 and "answered within 0.5 s" in result.stderr


EXAMPLE = ROOT / "examples" / "graphs" / "two_hosts.yaml"


@pytest.fixture
def example_domains():
    yield
    domains = ("two_hosts", "two_hosts-radio", "two_hosts-desk")
    leftovers = [p for d in domains for p in domain_segments("mq.", d)]
    for path in leftovers:
        unlink_quietly(path)
    assert not leftovers, f"test left segments behind: {leftovers}"


def test_the_two_host_example_runs_whole_and_split(example_domains):
    whole = subprocess.run([sys.executable, "-m", "multiqueue.cli", "run", EXAMPLE, "--quiet"],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert whole.returncode == 0, whole.stderr
    assert "rx" not in whole.stdout and "spectra" in whole.stdout
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 7450)) == 0:
            pytest.skip("port 7450 (the example's) is in use on this machine")
    procs = [mq("run", EXAMPLE, "--host", host, "--quiet") for host in ("desk", "radio")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "received=96  lost=0" in outs[0][0] and "sent=96  unmatched=0" in outs[1][0]
