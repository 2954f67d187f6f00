"""`mq dashboard` over a domain's life, as a user drives it: opened before the graph,
following the graph's runs, not keeping a finished graph's domain, and stopping within
a second on SIGTERM or SIGINT whatever its clients do (real processes, the CLI)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from graph_blocks import Ramp
from websockets.sync.client import connect

from multiqueue.graph import NullSink, Runtime
from multiqueue.shm import PoolConfig, ShmConfig
from multiqueue.shm.segment import domain_segments

MQ = [sys.executable, "-m", "multiqueue.cli"]
GRAPH = """\
pools:
  - {{name: frames, block_size: 4096, count: 64}}
blocks:
  src:
    class: SignalSource
    params: {{waveform: sine, rate: 2560, frame: 256, count: {count}, realtime: true}}
  sink: {{class: NullSink}}
connections:
  - src.out -> sink.in
"""
STOP_WITHIN_S = 1.0


class Dashboard:
    """`mq dashboard DOMAIN --port 0` in the background: its URL, its lines as they come."""

    def __init__(self, domain: str):
        self.proc = subprocess.Popen([*MQ, "dashboard", domain, "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.first_line = self.proc.stdout.readline()
        match = re.search(r"http://([\d.]+):(\d+)/", self.first_line)
        assert match, self.first_line + self.proc.stderr.read()
        self.host, self.port = match.group(1), int(match.group(2))

    def websocket(self, **options):
        return connect(f"ws://{self.host}:{self.port}/ws", open_timeout=30, **options)

    def stop(self, signum: int) -> tuple[float, int, str]:
        """Send ``signum``; (seconds until it exited, exit status, stderr)."""
        sent = time.monotonic()
        self.proc.send_signal(signum)
        self.proc.wait(timeout=60)
        took = time.monotonic() - sent
        _, err = self.proc.communicate(timeout=60)
        return took, self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=60)


def next_message(ws, kind: str, timeout: float = 60.0, where=lambda m: True) -> dict:
    """The next message of type ``kind`` (and ``where``), skipping the others."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(ws.recv(timeout=max(0.0, deadline - time.monotonic())))
        if message["type"] == kind and where(message):
            return message


def graph_file(tmp_path, count: int) -> str:
    path = tmp_path / f"graph-{count}.yaml"
    path.write_text(GRAPH.format(count=count))
    return str(path)


def run_graph(domain: str, path: str, *options) -> subprocess.CompletedProcess:
    return subprocess.run([*MQ, "run", path, "--domain", domain, "--quiet", *options], capture_output=True,
                          text=True, timeout=120)


def sink_received(summary: str) -> int:
    """The sink's frames in `mq run`'s summary table."""
    return int(re.search(r"^sink\s+\S+\s+(\d+)", summary, re.M).group(1))


def test_scenario_1_a_graph_file_run_again_under_a_dashboard_streams_and_sigterm_leaves_nothing(
        domain, tmp_path):
    """Issue 15, scenario 1: a dashboard on a running graph, the graph stopped (Ctrl-C),
    the same file run again: that run used to do 0 frames and exit 0 (the dashboard kept
    the old domain, its queues closed); `kill -TERM` of the dashboard left its segments,
    and the next run again did 0 frames."""
    path = graph_file(tmp_path, 10**6)  # until stopped: 10 frames a second
    first = subprocess.Popen([*MQ, "run", path, "--domain", domain, "--quiet"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    dashboard = None
    try:
        assert first.stdout.readline().startswith("running"), first.stderr.read()
        dashboard = Dashboard(domain)
        with dashboard.websocket() as ws:  # the dashboard shows the running graph
            next_message(ws, "graph")
            next_message(ws, "stats", where=lambda m: m["blocks"]["sink"]["in"] > 0)
        first.send_signal(signal.SIGINT)  # the user stops the graph
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0, out + err
        again = run_graph(domain, path, "--duration", "2")
        assert again.returncode == 0 and sink_received(again.stdout) > 0, again.stdout + again.stderr
        took, code, err = dashboard.stop(signal.SIGTERM)
        assert code == 0 and "Traceback" not in err, err
        assert not domain_segments("mq.", domain)  # the dashboard left nothing of the domain
        last = run_graph(domain, path, "--duration", "2")
        assert last.returncode == 0 and sink_received(last.stdout) > 0, last.stdout + last.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
        if dashboard is not None:
            dashboard.kill()


def test_a_dashboard_opened_before_the_graph_waits_for_it_and_follows_each_run(domain, tmp_path):
    path = graph_file(tmp_path, 20)  # 2 s
    dashboard = Dashboard(domain)
    try:
        assert "waiting for its graph to start" in dashboard.first_line, dashboard.first_line
        with dashboard.websocket() as ws:
            assert next_message(ws, "waiting")["final"] is None
            for run in range(2):
                graph = subprocess.Popen([*MQ, "run", path, "--domain", domain, "--quiet"],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                try:
                    shown = next_message(ws, "graph")
                    assert [b["name"] for b in shown["graph"]["blocks"]] == ["src", "sink"]
                    next_message(ws, "stats", where=lambda m: m["blocks"]["sink"]["in"] > 0)
                    final = next_message(ws, "waiting")["final"]  # it ended: the dashboard let go
                    assert final["blocks"]["sink"]["state"] == "done", final
                    out, err = graph.communicate(timeout=60)
                    assert graph.returncode == 0 and sink_received(out) == 20, (run, out + err)
                finally:
                    if graph.poll() is None:
                        graph.kill()
                        graph.communicate()
        took, code, err = dashboard.stop(signal.SIGINT)
        assert code == 0 and "Traceback" not in err, err
    finally:
        dashboard.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_dashboard_stops_within_a_second_with_idle_clients_and_leaves_the_domain(domain, signum):
    """An open WebSocket that reads nothing and a connection that never sent a request
    (a browser's idle pre-connection) used to hold `mq dashboard` about 10 s on Ctrl-C;
    SIGTERM killed it on the spot, leaving the segments of a domain it kept."""
    rt = Runtime(domain, pools=ShmConfig(pools=[PoolConfig("frames", 4096, 64)], max_processes=16))
    src = rt.add(Ramp(count=10**9, n=64, pace_s=0.01), name="src", placement="thread")
    rt.connect(src["out"], rt.add(NullSink(), name="sink", placement="thread")["in"])
    rt.start()
    dashboard = Dashboard(domain)
    idle = socket.create_connection((dashboard.host, dashboard.port), timeout=30)
    try:
        with dashboard.websocket(max_queue=1) as ws:
            next_message(ws, "stats")  # then it reads no more: the server's messages pile up
            rt.stop()  # the graph is over; the dashboard holds its domain until it lets go
            took, code, err = dashboard.stop(signum)
        assert code == 0 and "Traceback" not in err, err
        assert took < STOP_WITHIN_S, f"the dashboard took {took:.2f} s to stop"
        assert not domain_segments("mq.", domain)
    finally:
        idle.close()
        rt.stop()
        dashboard.kill()


RESTART_GRAPH = """\
pools:
  - {name: frames, block_size: 4096, count: 64}
blocks:
  src:
    class: SignalSource
    params: {waveform: sine, rate: 2560, frame: 256, count: 40, realtime: true}
  mid: {class: Amplifier, params: {gain: 2.0}, restart: restart}
  sink: {class: NullSink}
connections:
  - src.out -> mid.in
  - mid.out -> sink.in
"""


def test_the_dashboard_shows_a_blocks_failure_and_restart_as_events_and_its_short_frames(domain, tmp_path):
    """Issue 15: restarts and failures are events the dashboard shows (they were only on the
    bus); and frames of at most 1,024 points (drawn as they are) used to end the page's
    session (the dashboard wrote into the read-only frame)."""
    path = tmp_path / "restart.yaml"
    path.write_text(RESTART_GRAPH)
    dashboard = Dashboard(domain)
    graph = None
    try:
        with dashboard.websocket() as ws:
            next_message(ws, "waiting")
            graph = subprocess.Popen([*MQ, "run", str(path), "--domain", domain, "--quiet"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            next_message(ws, "graph")
            ws.send(json.dumps({"type": "watch", "port": "src.out"}))
            frame = next_message(ws, "frame")
            assert frame["size"] == 256 and len(frame["data"]) == 256
            stats = next_message(ws, "stats", where=lambda m: m["blocks"]["sink"]["in"] > 0)
            os.kill(stats["blocks"]["mid"]["pid"], signal.SIGKILL)
            failed = next_message(ws, "event", where=lambda m: m["event"] == "failed")
            assert "mid" in failed["message"] and "restart" in failed["message"], failed
            restarted = next_message(ws, "event", where=lambda m: m["event"] == "restarted")
            assert "'mid' restarted" in restarted["message"], restarted
            next_message(ws, "frame")  # the session lives on
            ended = next_message(ws, "event", where=lambda m: m["event"] == "ended")
            assert "waiting for its next run" in ended["message"]
        out, err = graph.communicate(timeout=60)
        assert graph.returncode == 0, out + err
        took, code, err = dashboard.stop(signal.SIGTERM)
        assert code == 0 and "Traceback" not in err, err
    finally:
        if graph is not None and graph.poll() is None:
            graph.kill()
            graph.communicate()
        dashboard.kill()
