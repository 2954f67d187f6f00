"""The `mq` tools run as commands against real domains: ls, stats, top, param, pub / send /
sub, logs and clean (a running graph, or a holder process killed with SIGKILL)."""

import json
import os
import pty
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
from graph_blocks import Ramp

from helpers import Lines, spawn_python
from multiqueue import ShmManager
from multiqueue.control.bus import Bus
from multiqueue.control.log import domain_logger, remove_domain_handlers
from multiqueue.graph import Multiply, NullSink, Runtime, attach
from multiqueue.shm import PoolConfig, ShmConfig
from multiqueue.shm.segment import domain_segments, unlink_quietly

MQ = [sys.executable, "-m", "multiqueue.cli"]
POOLS = ShmConfig(pools=[PoolConfig("frames", 4096, 64)], max_processes=32)


def mq(*args, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([*MQ, *map(str, args)], capture_output=True, text=True, timeout=timeout)


class Command:
    """An `mq` command running in the background, its output read as it comes."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([*MQ, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.out, self.err = Lines(self.proc.stdout), Lines(self.proc.stderr)

    def finish(self, timeout: float = 30.0) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout)
        finally:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.out.text(), self.err.text()


@pytest.fixture(scope="module")
def graph():
    """A graph running for the whole module: src (paced Ramp) -> amp (Multiply 2) -> sink."""
    name = f"test-cli-{uuid.uuid4().hex[:10]}"
    rt = Runtime(name, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=64, pace_s=0.005), name="src")
    amp = rt.add(Multiply(2.0), name="amp")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rt.add(NullSink(), name="sink")["in"])
    rt.start()
    try:
        yield rt
    finally:
        rt.stop()
        leftovers = domain_segments("mq.", name)
        for path in leftovers:
            unlink_quietly(path)
        assert not leftovers, f"the graph left segments behind: {leftovers}"
        assert rt.blocks_in_use_at_end == 0


HOLDER = r"""
import sys
from multiqueue import ShmManager, ShmConfig, PoolConfig
m = ShmManager(sys.argv[1], ShmConfig(pools=[PoolConfig("p", 1024, 8)], max_buffers=64),
               name="holder", reaper_interval=None)
b = m.allocate(100)
print("ready", flush=True)
sys.stdin.readline()
"""


BUS_HOLDER = HOLDER.replace(", max_buffers=64", "")  # room for the bus pool


def entry(listing: dict, domain: str) -> dict | None:
    return next((d for d in listing["domains"] if d["domain"] == domain), None)


# -- ls and clean ---------------------------------------------------------------------------


def test_ls_and_clean_keep_a_live_domain_and_remove_it_once_its_holder_is_sigkilled(domain):
    holder = spawn_python(HOLDER, domain)
    try:
        assert holder.stdout.readline().strip() == "ready"
        live = entry(json.loads(mq("ls", "--json").stdout), domain)
        assert live["state"] == "live"
        processes = [(p["pid"], p["name"], p["alive"]) for p in live["processes"]]
        assert processes == [(holder.pid, "holder", True)]
        assert {"name": "p", "block_size": 1024, "blocks": 8, "used": 1} in live["pools"]
        assert live["graph"] is None

        for args in (("--dry-run",), ()):  # named and live: refused, with or without --dry-run
            refused = mq("clean", domain, *args)
            assert refused.returncode == 1
            assert f"live processes holder (pid {holder.pid})" in refused.stderr
            assert "nothing removed" in refused.stderr and "Traceback" not in refused.stderr
        sweep = entry(json.loads(mq("clean", "--dry-run", "--json").stdout), domain)
        assert sweep["action"] == "kept" and sweep["state"] == "live"
        assert domain_segments("mq.", domain)

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        dead = entry(json.loads(mq("ls", "--json").stdout), domain)
        assert dead["state"] == "dead"
        assert [(p["pid"], p["alive"]) for p in dead["processes"]] == [(holder.pid, False)]
        text = mq("ls").stdout
        assert f"{domain}: dead, 0/1 process(es) alive, no graph" in text
        assert re.search(rf"pid\s+{holder.pid}\s+holder\s+DEAD", text), text

        segments = domain_segments("mq.", domain)
        sweep = entry(json.loads(mq("clean", "--dry-run", "--json").stdout), domain)
        assert sweep["action"] == "would remove" and sweep["segments"] == segments
        assert domain_segments("mq.", domain) == segments  # a dry run removes nothing
        dry = mq("clean", domain, "--dry-run")
        assert dry.returncode == 0
        assert f"would remove {len(segments)} segment(s) of domain {domain!r}" in dry.stdout

        done = mq("clean", domain, "--json")
        assert done.returncode == 0, done.stderr
        [removed] = json.loads(done.stdout)["domains"]
        assert removed["action"] == "removed" and removed["segments"] == segments
        assert not domain_segments("mq.", domain)
        assert entry(json.loads(mq("ls", "--json").stdout), domain) is None
    finally:
        holder.kill()
        holder.wait()
        for s in (holder.stdin, holder.stdout, holder.stderr):
            s.close()


def test_clean_keeps_a_domain_of_another_layout_version_while_a_process_maps_it(domain):
    holder = spawn_python(HOLDER, domain)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with open(f"/dev/shm/mq.{domain}.ctl", "r+b") as f:  # as another multiqueue version writes it
            f.seek(8)  # SegmentHeader.version
            f.write((99).to_bytes(4, "little"))
        refused = mq("clean", domain)
        assert refused.returncode == 1 and "layout version 99" in refused.stderr
        assert f"(mapped by pid {holder.pid})" in refused.stderr
        assert entry(json.loads(mq("ls", "--json").stdout), domain)["state"] == "unreadable"
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        done = mq("clean", domain)
        assert done.returncode == 0 and "no process maps its segments" in done.stdout, done.stderr
        assert not domain_segments("mq.", domain)
    finally:
        holder.kill()
        holder.wait()
        for s in (holder.stdin, holder.stdout, holder.stderr):
            s.close()


# -- stats and top ----------------------------------------------------------------------------


def test_stats_shows_the_queues_and_the_blocks_of_a_running_graph(graph):
    data = json.loads(mq("stats", graph.domain, "--json").stdout)
    queues = {q["name"]: q for q in data["queues"]}
    for name in ("src-out", "amp-out"):
        q = queues[name]
        assert q["capacity"] == 16 and q["closed"] == "open" and q["pushed"] > 0
        [reader] = q["readers"]
        assert reader["policy"] == "block" and reader["alive"] and reader["drops"] == 0
    assert "b-ctl-amp" in queues  # the blocks' command topics are queues of the domain too
    g = data["graph"]
    assert g["state"] == "running"
    assert {n: b["state"] for n, b in g["blocks"].items()} == {"src": "running", "amp": "running",
                                                               "sink": "running"}
    assert [(e["src"], e["dst"]) for e in g["edges"]] == [("src.out", "amp.in"), ("amp.out", "sink.in")]
    assert {"runtime", "mq-src", "mq-amp", "mq-sink"} <= {p["name"] for p in data["processes"]}
    assert data["pool_stats"][0]["name"] == "frames"

    text = mq("stats", graph.domain)
    assert text.returncode == 0, text.stderr
    assert re.search(r"^src-out\s+16\s+\d+\s+open\s+\d+ block", text.stdout, re.M), text.stdout
    assert "graph (running):" in text.stdout
    assert re.search(r"^amp\s+running\s+\d+", text.stdout, re.M), text.stdout


def test_top_shows_two_views_with_rates_fill_and_cpu(graph):
    result = mq("top", graph.domain, "--interval", "0.2", "--iterations", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count(f"mq top {graph.domain}") == 2 and "\x1b[" not in out  # not a terminal: plain text
    pids = {b.name: b.pid for b in graph.stats().blocks.values()}
    for name in ("src", "amp", "sink"):
        process = rf"^\s*{pids[name]}\s+mq-{name}\s+\d+\.\d\s+\S+ [KMG]?i?B$"  # pid, name, cpu %, rss
        assert len(re.findall(process, out, re.M)) == 2, out
        assert len(re.findall(rf"^{name}\s+running\s+{pids[name]}\s", out, re.M)) == 2
    assert len(re.findall(r"^src\.out -> amp\.in\s+block\s+\d+/16\s+\d+%\s+0$", out, re.M)) == 2

    views = [json.loads(line) for line in
             mq("top", graph.domain, "--interval", "0.3", "--iterations", "2", "--json").stdout.splitlines()]
    assert len(views) == 2
    last = views[1]
    blocks = {b["name"]: b for b in last["blocks"]}
    assert blocks["src"]["rate_out"] > 0 and blocks["sink"]["rate_in"] > 0  # paced at 200 frames/s
    assert {p["name"] for p in last["processes"]} >= {"runtime", "mq-src", "mq-amp", "mq-sink"}
    assert all(isinstance(p["cpu_percent"], float) for p in last["processes"])
    assert [e["dst"] for e in last["edges"]] == ["amp.in", "sink.in"]
    assert last["pools"][0]["name"] == "frames" and last["pools"][0]["blocks"] == 64


def test_top_redraws_the_screen_on_a_terminal(graph):
    master, slave = pty.openpty()
    proc = subprocess.Popen([*MQ, "top", graph.domain, "--interval", "0.1", "--iterations", "2"],
                            stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the command ended and closed the terminal
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    proc.stderr.close()
    assert data.count(b"\x1b[H\x1b[2J") == 2 and data.startswith(b"\x1b[H\x1b[2J")


# -- param ------------------------------------------------------------------------------------


def test_param_changes_a_running_block_and_reads_it_back(graph):
    d = graph.domain
    got = mq("param", d, "amp", "factor")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "amp.factor = 2.0"
    try:
        done = mq("param", d, "amp", "factor", "3.5")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "amp.factor set to 3.5 (acknowledged)"
        answer = json.loads(mq("param", d, "amp", "factor", "--json").stdout)
        assert answer == {"block": "amp", "name": "factor", "ok": True, "cmd": "get", "value": 3.5,
                          "at_ns": None}
        with attach(d, name="test-tap") as g, g.subscribe("amp.out") as tap:  # the frames show it too
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                frame = tap.read(timeout=1.0)
                if frame is not None:
                    with frame.buffer:
                        step = float(frame.array[1] - frame.array[0])
                    if step == 3.5:
                        break
            else:
                raise AssertionError("amp's frames never showed the factor 3.5")
    finally:
        assert mq("param", d, "amp", "factor", "2.0").returncode == 0

    refused = mq("param", d, "amp", "gain", "1")
    assert refused.returncode == 1
    assert "block 'amp' refused: KeyError" in refused.stderr
    assert "no run-time parameter 'gain'" in refused.stderr
    unknown = mq("param", d, "ghost", "factor")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == (f"mq param: the graph of domain {d!r} has no block 'ghost'; "
                                      "it has ['src', 'amp', 'sink']")


def test_param_with_nobody_answering_is_a_clear_error(domain):
    config = ShmConfig(pools=[PoolConfig("p", 1024, 8)])
    with (ShmManager(domain, config, name="owner", reaper_interval=None) as m, Bus(m) as bus,
          bus.subscribe("ctl-mute")):
        silent = mq("param", domain, "mute", "gain", "1", "--timeout", "0.5")
        assert silent.returncode == 1
        assert silent.stderr.strip() == ("mq param: block 'mute' did not answer on topic 'ctl-mute' within "
                                         "0.5 s; is it running?")
        nobody = mq("param", domain, "ghost", "gain")
        assert nobody.returncode == 1
        assert "no block 'ghost' takes commands" in nobody.stderr and "Traceback" not in nobody.stderr


# -- pub, send, sub -------------------------------------------------------------------------


def test_pub_and_sub_across_processes(graph):
    d = graph.domain
    sub = Command("sub", d, "news", "--count", "2", "--timeout", "30", "--json")
    sub.err.wait_for("subscribed to 'news'")
    first = mq("pub", d, "news", '{"x": [1, 2]}', "--json")
    assert first.returncode == 0, first.stderr
    sent = json.loads(first.stdout)
    assert sent["subscribers"] == 1 and sent["sent"]
    second = mq("pub", d, "news", "hello")
    assert second.stdout.strip() == f"sent to 'news' in domain {d!r}: 1 subscriber(s)"
    code, out, err = sub.finish()
    assert code == 0, err
    messages = [json.loads(line) for line in out.splitlines()]
    assert [m["data"] for m in messages] == [{"x": [1, 2]}, "hello"]
    assert messages[0]["topic"] == "news" and messages[0]["sender_pid"] == sent["sender_pid"]
    assert messages[1]["sender_pid"] not in (sent["sender_pid"], sub.proc.pid)

    nobody = mq("pub", d, "nobody-listens", "1")
    assert nobody.returncode == 0 and "nothing sent" in nobody.stdout
    quiet = mq("sub", d, "quiet", "--count", "1", "--timeout", "0.3")
    assert quiet.returncode == 1 and "0 of 1 message(s) on topic 'quiet' within 0.3 s" in quiet.stderr


def test_send_reaches_an_inbox_in_another_process(graph):
    d = graph.domain
    sub = Command("sub", d, "worker", "--inbox", "--count", "1", "--timeout", "30")
    sub.err.wait_for("subscribed to 'to-worker'")
    sent = mq("send", d, "worker", "[1, 2]")
    assert sent.returncode == 0, sent.stderr
    code, out, err = sub.finish()
    assert code == 0, err
    assert re.fullmatch(r"to-worker pid=\d+ seq=1 \[1, 2\]\n", out), out  # a Bus numbers from 1
    lost = mq("send", d, "nobody", "1")
    assert lost.returncode == 1
    assert lost.stderr.strip() == (f"mq send: nobody reads the inbox of 'nobody' (topic 'to-nobody') in "
                                   f"domain {d!r}; nothing sent")


# -- logs ---------------------------------------------------------------------------------------


def test_logs_prints_the_last_lines_and_follows_new_ones(graph):
    d = graph.domain
    last = mq("logs", d, "-n", "3")
    assert last.returncode == 0, last.stderr
    lines = last.stdout.splitlines()
    assert 1 <= len(lines) <= 3 and all(" pid=" in line for line in lines), lines
    rows = [json.loads(line) for line in mq("logs", d, "-n", "50", "--json").stdout.splitlines()]
    started = [r for r in rows if r.get("message", "").startswith("started")]
    assert {r["block"] for r in started} == {"src", "amp", "sink"}
    assert all(r["process"] == f"mq-{r['block']}" and isinstance(r["pid"], int) for r in started)

    follower = Command("logs", d, "--follow", "-n", "0")
    follower.err.wait_for("following")
    token = uuid.uuid4().hex
    log = domain_logger(d, name="mq.clitest", process_name="pytest")
    try:
        log.info("marker %s", token)
        line = follower.out.wait_for(token)
    finally:
        remove_domain_handlers(d, name="mq.clitest")
    assert f"process=pytest block=- mq.clitest: marker {token}" in line
    follower.proc.send_signal(signal.SIGINT)
    code, _, err = follower.finish()
    assert code == 0 and "Traceback" not in err, err


def test_top_and_sub_end_with_the_domain_and_the_last_one_out_removes_it(domain):
    holder = spawn_python(BUS_HOLDER, domain)
    try:
        assert holder.stdout.readline().strip() == "ready"
        sub = Command("sub", domain, "news")
        sub.err.wait_for("subscribed to 'news'")
        top = Command("top", domain, "--interval", "0.2")
        top.out.wait_for(f"mq top {domain}")
        holder.communicate("\n", timeout=30)  # it leaves; the tools attached keep the segments
        for tool in (sub, top):
            code, _, err = tool.finish()
            assert code == 0 and f"domain {domain!r} has no live process left" in err, err
        assert not domain_segments("mq.", domain)  # the tool that left last removed them
    finally:
        holder.kill()
        holder.wait()


# -- errors -----------------------------------------------------------------------------------


def test_an_unknown_domain_is_one_clear_line_and_exit_1(domain):
    commands = [("stats",), ("stats", "--json"), ("top", "--iterations", "1"), ("param", "amp", "gain"),
                ("pub", "news", "1"), ("send", "worker", "1"), ("sub", "news"), ("logs",), ("logs", "-f"),
                ("clean",), ("clean", "--dry-run"), ("tap", "src.out")]
    procs = [(c, subprocess.Popen([*MQ, c[0], domain, *c[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)) for c in commands]  # all at once: quicker
    for command, proc in procs:
        out, err = proc.communicate(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == 1, (command, out, err)
        assert out == "" and len(err.splitlines()) == 1, (command, out, err)
        assert err.startswith(f"mq {command[0]}: ") and repr(domain) in err, (command, err)
    old = mq("cleanup", domain)  # the old command still says what it always said
    assert old.returncode == 0 and old.stdout.strip() == f"removed 0 segment(s) of domain {domain!r}"
    assert not domain_segments("mq.", domain)


def test_a_negative_or_non_finite_number_option_is_a_usage_error(domain):
    commands = [("param", "amp", "gain", "--timeout", "-1"), ("block", "amp", "stop", "--timeout", "nan"),
                ("sub", "news", "--timeout", "-0.5"), ("sub", "news", "--count", "-3"),
                ("top", "--interval", "inf"), ("top", "--iterations", "-1"), ("logs", "-n", "-2"),
                ("tap", "src.out", "--duration", "-1")]
    procs = [(c, subprocess.Popen([*MQ, c[0], domain, *c[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)) for c in commands]
    for command, proc in procs:
        out, err = proc.communicate(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
        assert proc.returncode == 2, (command, out, err)  # argparse's usage error, no traceback
        assert "Traceback" not in err and "expected" in err and command[-1] in err, (command, err)


def test_doctor_names_a_sigkilled_holder_and_is_clean_after_a_reap(domain):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, domain], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "ready"
    with ShmManager(domain, create=False, reaper_interval=None) as m:
        holder.kill()
        holder.wait()
        result = mq("doctor", domain)
        assert result.returncode == 1, result.stderr
        assert f"process {holder.pid}" in result.stdout and "DEAD" in result.stdout
        assert "reap()" in result.stdout
        as_json = json.loads(mq("doctor", domain, "--json").stdout)
        assert not as_json["ok"]
        m.reap()
        clean = mq("doctor", domain)
        assert clean.returncode == 0 and "no problems found" in clean.stdout


def test_block_pause_resume_and_stop_commands(graph):
    for action in ("pause", "resume"):
        result = mq("block", graph.domain, "src", action)
        assert result.returncode == 0 and f"src: {action}: done" in result.stdout, result.stderr
    refused = mq("block", graph.domain, "nosuch", "pause")
    assert refused.returncode == 1 and "no block 'nosuch'" in refused.stderr


def test_dashboard_command_serves_the_page_until_ctrl_c(graph):
    import urllib.request

    command = Command("dashboard", graph.domain, "--port", 0)
    line = command.out.wait_for("dashboard of domain")
    url = line.split(": ", 1)[1].split()[0]
    page = urllib.request.urlopen(url, timeout=10).read()
    assert b"multiqueue" in page
    command.proc.send_signal(signal.SIGINT)
    code, _out, err = command.finish()
    assert code == 0, err


def test_run_with_a_dashboard(domain):
    import urllib.request

    graph_file = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "graphs", "sine.yaml")
    command = Command("run", graph_file, "--domain", domain, "--dashboard", 0, "--duration", 30)
    line = command.out.wait_for("dashboard: http")
    page = urllib.request.urlopen(line.split(": ", 1)[1], timeout=10).read()
    assert b"multiqueue" in page
    code, out, err = command.finish(timeout=60)
    assert code == 0, err
    assert "pool blocks still in use after the stop: 0" in out


STOP_WITHIN_S = 1.0
# Each long-running tool on the running graph: its command line, the line that says it
# runs (stream, text), and its exit status when stopped as by Ctrl-C.
RUNNING_TOOLS = {
    "tap": (("tap", "{domain}", "src.out"), "out", "src.out t=", 130),
    "top": (("top", "{domain}", "--interval", "0.2", "--json"), "out", '"graph"', 0),
    "sub": (("sub", "{domain}", "status"), "err", "subscribed to 'status'", 0),
    "logs -f": (("logs", "{domain}", "--follow", "-n", "1"), "err", "following", 0),
    "dashboard": (("dashboard", "{domain}", "--port", "0"), "out", "dashboard of domain", 0),
}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("tool", list(RUNNING_TOOLS))
def test_every_long_running_tool_stops_within_a_second_and_leaves_the_domain(graph, tool, signum):
    """Issue 15: every tool stops within 1 s of Ctrl-C or SIGTERM, in order (no traceback,
    nothing of it left in the domain's process table)."""
    args, stream, ready, status = RUNNING_TOOLS[tool]
    command = Command(*(a.format(domain=graph.domain) for a in args))
    try:
        (command.out if stream == "out" else command.err).wait_for(ready)
        sent = time.monotonic()
        command.proc.send_signal(signum)
        command.proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        code, out, err = command.finish()
    assert code == status and "Traceback" not in err, (code, err)
    assert took < STOP_WITHIN_S, f"mq {tool} took {took:.2f} s to stop"
    registered = [p["pid"] for p in graph.manager.processes()]  # alive or not: it left, not died
    assert command.proc.pid not in registered, f"mq {tool} is still registered in the domain"
