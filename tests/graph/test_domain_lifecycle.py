"""A domain's life across runs, as a user drives it: a graph run again while another
process keeps the domain, a run that does nothing, a script without its main guard and
a demo started twice (real processes, the `mq` command where the user used it)."""

import os
import re
import signal
import subprocess
import sys
import textwrap

from helpers import Lines, RoleProcess
from multiqueue.graph import attach
from multiqueue.shm.segment import domain_segments

MQ = [sys.executable, "-m", "multiqueue.cli"]
GRAPH = """\
pools:
  - {{name: frames, block_size: 4096, count: 64}}
blocks:
  src:
    class: SignalSource
    params: {{waveform: sine, rate: 25600, frame: 256, count: {count}, realtime: true}}
  sink: {{class: NullSink}}
connections:
  - src.out -> sink.in
"""

# Keeps a domain as an outside process would (a viewer, a Consumer): attached to it from
# while the first graph runs until told to leave.
HOLDER = textwrap.dedent("""
    import json, sys, time
    import multiqueue
    while True:  # until the first graph runs
        try:
            graph = multiqueue.attach(sys.argv[1], name="holder")
            break
        except multiqueue.SegmentError:
            time.sleep(0.02)
    print(json.dumps({"event": "attached"}), flush=True)
    sys.stdin.readline()
    graph.close()
""")


def graph_file(tmp_path, count: int) -> str:
    path = tmp_path / f"graph-{count}.yaml"
    path.write_text(GRAPH.format(count=count))
    return str(path)


def mq(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*MQ, *map(str, args)], capture_output=True, text=True, timeout=timeout)


def received(summary: str) -> int:
    """The sink's frames in `mq run`'s summary table."""
    return int(re.search(r"^sink\s+\S+\s+(\d+)", summary, re.M).group(1))


def test_a_graph_run_again_while_another_process_keeps_the_domain_streams_every_frame(domain, tmp_path):
    """The first run's queues stay in the domain, closed, while a process holds it: the
    second run of the same file used to find them and end at once with 0 frames and
    exit 0.  It takes the domain over: new queues, every frame."""
    path = graph_file(tmp_path, 200)  # 2 s: the holder attaches meanwhile
    holder = RoleProcess("holder", [sys.executable, "-c", HOLDER, domain])
    try:
        first = subprocess.Popen([*MQ, "run", path, "--domain", domain, "--quiet"], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        holder.expect("attached")  # the first graph runs, the holder is in its domain
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0 and received(out) == 200, out + err
        assert domain_segments("mq.", domain)  # the holder keeps the domain
        second = mq("run", path, "--domain", domain, "--quiet")
        assert second.returncode == 0, second.stdout + second.stderr
        assert received(second.stdout) == 200, second.stdout
        holder.send("")
        assert holder.finish() == 0, holder.stderr
    finally:
        holder.proc.kill()
        holder.proc.wait()
    assert not domain_segments("mq.", domain)  # the holder left last and removed it


def test_a_run_whose_sources_produce_nothing_exits_non_zero_with_the_reason(domain, tmp_path):
    result = mq("run", graph_file(tmp_path, 0), "--domain", domain, "--quiet")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["mq run: the sources (src) produced no frames"], result.stderr
    assert "Traceback" not in result.stderr


NO_GUARD = """\
from multiqueue.graph import NullSink, Runtime, SignalSource

rt = Runtime({domain!r})
src = rt.add(SignalSource("sine", rate=2560, frame=256, count=5), name="src")
rt.connect(src["out"], rt.add(NullSink(), name="sink")["in"])
rt.run(duration=30)
print("sink received", rt.final_stats.blocks["sink"].items_in)
"""


def test_a_script_without_the_main_guard_gets_one_error_that_names_the_cause(domain, tmp_path):
    """Each spawned worker re-runs the script: it used to start the graph again and fail
    with "domain already runs a graph", one traceback per worker and one more for the
    script.  Now the workers exit quietly and the script's error names the guard."""
    script = tmp_path / "no_guard.py"
    script.write_text(NO_GUARD.format(domain=domain))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 1
    assert "already runs a graph" not in result.stderr
    assert result.stderr.count("Traceback") == 1, result.stderr  # the script's own error, once
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("multiqueue.errors.GraphError: ") and str(script) in last, last
    assert 'under `if __name__ == "__main__":`' in last, last


def test_mq_demo_twice_says_to_pick_another_domain_in_one_line(domain):
    first = subprocess.Popen([*MQ, "demo", "--domain", domain, "--duration", "0", "--bins", "2000"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = first.stdout.readline()
        assert line.startswith(f"spectrum monitor in domain {domain!r}"), line + first.stderr.read()
        assert first.stdout.readline().startswith("spectra"), "the first demo shows no progress"  # it runs
        second = mq("demo", "--domain", domain, "--duration", "1", "--bins", "2000")
        assert second.returncode == 1, second.stdout + second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert lines[0].startswith(f"mq demo: domain {domain!r} already runs a graph"), lines[0]
        assert f"pid {first.pid}" in lines[0] and "--domain NAME" in lines[0], lines[0]
    finally:
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err


def start_run(path: str, domain: str) -> subprocess.Popen:
    """`mq run` in the background, returned once its graph has started: its source has
    sent three frames (10 a second: `mq run` is past its start by then)."""
    run = subprocess.Popen([*MQ, "run", path, "--domain", domain, "--quiet"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    with attach(domain, name="test", timeout=60) as graph, graph.subscribe("src.out", start="oldest") as tap:
        for _ in range(3):
            frame = tap.read(timeout=60)
            assert frame is not None, "the graph sent no frame"
            frame.buffer.release()
    return run


def finish(run: subprocess.Popen, frames: int) -> None:
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0 and received(out) == frames, out + err


def test_mq_tap_lets_go_when_the_graph_ends_and_follows_its_next_run(domain, tmp_path):
    """`mq tap` used to end with the graph; now it lets go of the domain (nothing of the
    finished graph is kept) and prints the frames of the next run, until Ctrl-C."""
    first = start_run(graph_file(tmp_path, 10**6), domain)  # until stopped
    tap = subprocess.Popen([*MQ, "tap", domain, "src.out"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        lines = Lines(tap.stdout)
        lines.wait_for("src.out t=")
        first.send_signal(signal.SIGINT)  # the user stops the graph
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0 and received(out) > 0, out + err
        lines.wait_for("waiting for its next run")
        assert not domain_segments("mq.", domain)  # the tap keeps nothing of the finished graph
        second = start_run(graph_file(tmp_path, 20), domain)
        lines.wait_for("src.out t=")  # a frame of the second run
        finish(second, 20)
        tap.send_signal(signal.SIGTERM)
        assert tap.wait(timeout=5) == 130  # stopped as by Ctrl-C
        assert "Traceback" not in tap.stderr.read()
    finally:
        for process in (tap, first):
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_mq_top_lets_go_when_the_graph_ends_follows_its_next_run_and_stops_on_sigterm(domain, tmp_path):
    """`mq top` used to end with the graph's domain; now it lets go of it and shows the
    next run of the same domain."""
    first = start_run(graph_file(tmp_path, 10**6), domain)  # until stopped
    top = subprocess.Popen([*MQ, "top", domain, "--interval", "0.2", "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        views, errors = Lines(top.stdout), Lines(top.stderr)
        views.wait_for('"graph": "running"')
        first.send_signal(signal.SIGINT)  # the user stops the graph
        out, err = first.communicate(timeout=60)
        assert first.returncode == 0 and received(out) > 0, out + err
        errors.wait_for("its graph ended; waiting for its next run")
        assert not domain_segments("mq.", domain)  # top keeps nothing of the finished graph
        second = start_run(graph_file(tmp_path, 20), domain)
        views.wait_for('"graph": "running"')  # a view of the second run
        finish(second, 20)
        top.send_signal(signal.SIGTERM)
        assert top.wait(timeout=5) == 0
    finally:
        for process in (top, first):
            if process.poll() is None:
                process.kill()
                process.communicate()


def test_sigterm_to_the_whole_process_group_stops_the_graph_in_order(domain, tmp_path):
    """systemd, `timeout` and job control signal every process of the group: the workers
    used to die of it at once, and every block ended `failed`.  Now the runtime alone
    takes it and stops the graph in order: every block done, exit 0."""
    path = tmp_path / "chain.yaml"
    sink = "  sink: {{class: NullSink}}"
    chain = GRAPH.replace(sink, "  mid: {{class: Amplifier}}\n" + sink)
    path.write_text(chain.replace("  - src.out -> sink.in", "  - src.out -> mid.in\n  - mid.out -> sink.in")
                    .format(count=10**6))
    run = subprocess.Popen([*MQ, "run", str(path), "--domain", domain, "--quiet"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        with attach(domain, name="test", timeout=60) as graph, graph.subscribe("mid.out") as tap:
            assert tap.read(timeout=60) is not None, "the graph sent no frame"  # it runs, workers and all
        os.killpg(run.pid, signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
    assert run.returncode == 0, out + err
    states = dict(re.findall(r"^(src|mid|sink) +(\w+)", out, re.M))
    assert states == {"src": "done", "mid": "done", "sink": "done"}, out
    assert received(out) > 0
