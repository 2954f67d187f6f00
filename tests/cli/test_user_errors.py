"""No `mq` command prints a traceback for a user mistake: each says what to do in one line
and exits non-zero (issue 15, part of scenario 7).  Every command is driven as a user
runs it, with wrong input: a missing domain, bad names, bad numbers, an unknown block,
port or topic, a domain already running a graph, a domain of another layout version,
one of another user.  An unexpected internal error still shows its traceback, and says
it is a bug.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from graph_blocks import Ramp

from helpers import run_python
from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.control.log import domain_logger, remove_domain_handlers
from multiqueue.graph import Multiply, NullSink, Runtime
from multiqueue.shm import layout as L
from multiqueue.shm.segment import domain_segments, segment_path

MQ = [sys.executable, "-m", "multiqueue.cli"]
SINE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "graphs", "sine.yaml")
NOBODY = 65534


def run_all(table, as_user=(), **popen) -> list[tuple[tuple, int, str, str]]:
    """Run every command of ``table`` at once: (command, exit code, stdout, stderr)."""
    procs = [(c, subprocess.Popen([*as_user, *MQ, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, **popen)) for c, *_ in table]
    results = []
    for command, proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append((command, proc.returncode, out, err))
    return results


def check_all(table, results) -> None:
    """Each command: the exit code it should have, no traceback, and the words of the fix."""
    for (command, code, fixes), (_, returncode, out, err) in zip(table, results, strict=True):
        assert returncode == code, (command, returncode, out, err)
        assert "Traceback" not in err and "Traceback" not in out, (command, err)
        message = err.strip().splitlines()[-1]  # argparse puts its usage lines first
        assert message.startswith(f"mq {command[0]}"), (command, err)
        for fix in fixes:
            assert fix in message, (command, fix, err)


@pytest.fixture
def running(domain):
    """A graph running in ``domain``: src (paced Ramp) -> amp (Multiply) -> sink."""
    rt = Runtime(domain, pools=ShmConfig(pools=[PoolConfig("frames", 4096, 32)], max_processes=32))
    src = rt.add(Ramp(count=10**9, n=64, pace_s=0.01), name="src")
    amp = rt.add(Multiply(2.0), name="amp")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], rt.add(NullSink(), name="sink")["in"])
    rt.start()
    try:
        yield domain
    finally:
        rt.stop()


def test_wrong_input_to_a_running_graph_is_one_line_naming_the_fix(running):
    d = running
    table = [
        (("tap", d, "nosuch.out", "--count", "1"), 1, ["no output port 'nosuch.out'", "it has", "src.out"]),
        (("tap", d, "amp", "--count", "1"), 1, ["no output port 'amp'", "amp.out"]),
        (("param", d, "nosuch", "gain", "3"), 1, ["no block 'nosuch'", "it has", "amp"]),
        (("param", d, "amp", "nosuchparam", "3"), 1, ["'nosuchparam'"]),
        (("block", d, "nosuch", "pause"), 1, ["no block 'nosuch'"]),
        (("block", d, "bad block!", "pause"), 1, ["invalid topic"]),
        (("send", d, "nosuch", "1"), 1, ["nobody reads the inbox of 'nosuch'"]),
        (("pub", d, "bad topic!", "1"), 1, ["invalid topic 'bad topic!'", "letters, digits"]),
        (("sub", d, "bad topic!"), 1, ["invalid topic 'bad topic!'"]),
        (("top", d, "--interval", "0"), 1, ["--interval must be > 0"]),
        (("clean", d), 1, ["live processes", "stop them first"]),
        (("run", SINE, "--domain", d), 1, ["already runs a graph", "--domain NAME"]),
    ]
    check_all(table, run_all(table))


def test_bad_names_and_numbers_are_one_line_naming_the_fix(domain):
    missing = f"{domain}-none"  # never created
    table = [
        (("stats", "bad name"), 2, ["invalid domain name 'bad name'", "letters, digits"]),
        (("cleanup", "a/b"), 2, ["invalid domain name 'a/b'"]),
        (("doctor", missing), 1, [f"domain {missing!r} does not exist"]),
        (("logs", missing), 1, [f"no domain {missing!r}"]),
        (("dashboard", missing, "--port", "99999"), 2, ["a port from 0 to 65535"]),
        (("run", "/nonexistent/graph.yaml"), 2, ["cannot read /nonexistent/graph.yaml"]),
        (("run", SINE, "--dashboard", "70000"), 2, ["a port from 0 to 65535"]),
        (("demo", "--bins", "0"), 2, ["--bins", "an int >= 1"]),
        (("demo", "--record-frames", "-1"), 2, ["--record-frames", "an int >= 0"]),
        (("demo", "--duration", "-1"), 2, ["--duration", "a number of seconds >= 0"]),
        (("demo", "--domain", "a.b"), 2, ["invalid domain name 'a.b'"]),
        (("stream-demo", "--domain", "a.b"), 2, ["invalid domain name 'a.b'"]),
        (("remote", "g", "stats", "--timeout", "-1"), 2, ["a number of seconds >= 0"]),
        (("remote", "g", "status", "--count", "0"), 1, ["--count must be at least 1"]),
        (("remote", "g", "param", "amp"), 1, ["BLOCK NAME [VALUE]"]),
        (("remote", "g", "stats", "--connect", "bogus", "--timeout", "0.1"), 1, ["endpoints like 'tcp/"]),
        (("clean", "--force"), 1, ["mq clean DOMAIN --force"]),
        (("nosuchcommand",), 2, ["invalid choice: 'nosuchcommand'"]),
    ]
    results = run_all(table)
    for (command, *_), (_, code, _out, err) in zip(table, results, strict=True):
        if command[0] == "nosuchcommand":  # argparse names the program alone: "mq: error: ..."
            assert code == 2 and "Traceback" not in err and "invalid choice" in err, err
    check_all([t for t in table if t[0][0] != "nosuchcommand"],
              [r for r in results if r[0][0] != "nosuchcommand"])
    assert not domain_segments("mq.", missing)


def test_a_domain_of_another_layout_version_names_mq_clean_and_mq_clean_removes_it(domain):
    config = ShmConfig(pools=[PoolConfig("p", 256, 4)])
    ShmManager(domain, config, reaper_interval=None).shutdown(unlink=False)
    with open(segment_path("mq.", domain, "ctl"), "r+b") as f:  # as another multiqueue version wrote it
        f.seek(L.SegmentHeader.version.offset)
        f.write((99).to_bytes(4, "little"))
    fix = ["layout version 99", f"`mq clean {domain}`"]
    table = [
        (("stats", domain), 1, fix),
        (("top", domain, "--iterations", "1"), 1, fix),
        (("tap", domain, "src.out", "--count", "1"), 1, fix),
        (("param", domain, "amp", "gain", "3"), 1, fix),
        (("pub", domain, "news", "1"), 1, fix),
        (("run", SINE, "--domain", domain), 1, fix),
        (("demo", "--domain", domain, "--bins", "1024", "--duration", "1"), 1, fix),
        (("stream-demo", "--domain", domain, "--frames", "1"), 1, fix),
    ]
    check_all(table, run_all(table))
    done = subprocess.run([*MQ, "clean", domain], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not domain_segments("mq.", domain)


def test_a_second_demo_in_the_same_domain_says_to_pick_another_domain(domain):
    first = subprocess.Popen([*MQ, "demo", "--domain", domain, "--bins", "1024", "--duration", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().startswith(f"spectrum monitor in domain {domain!r}")
        assert first.stdout.readline(), first.communicate()  # a progress line: its graph runs
        second = subprocess.run([*MQ, "demo", "--domain", domain, "--bins", "1024", "--duration", "1"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert "Traceback" not in second.stderr, second.stderr
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("mq demo: ") and "already runs a graph" in last and "--domain NAME" in last
        first.send_signal(signal.SIGINT)  # Ctrl-C: the first demo is unharmed and stops in order
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert "Traceback" not in err
    finally:
        first.kill()
        first.communicate()


def _can_switch_users() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a process as another user"
    if not shutil.which("setpriv"):
        return "needs setpriv (util-linux) to run a process as another user"
    return None


@pytest.mark.skipif(bool(_can_switch_users()), reason=str(_can_switch_users()))
def test_a_domain_and_log_of_another_user_say_to_run_as_that_user(domain):
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    probe = subprocess.run([*as_nobody, sys.executable, "-c", "import multiqueue"], capture_output=True,
                           text=True, timeout=60, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot import multiqueue from this checkout: {probe.stderr[-200:]}")
    theirs = tempfile.mkdtemp(prefix="mq-nobody-logs-")  # a log directory user nobody may write
    os.chown(theirs, NOBODY, NOBODY)
    try:
        _as_nobody(domain, as_nobody, theirs)
    finally:
        shutil.rmtree(theirs)


def _as_nobody(domain: str, as_nobody: list[str], theirs: str) -> None:
    env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    with ShmManager(domain, ShmConfig(pools=[PoolConfig("p", 256, 4)]), reaper_interval=None):
        domain_logger(domain, "mq.test").info("a line only the owner may read")
        remove_domain_handlers(domain, "mq.test")
        table = [  # root's domain, root's log (MQ_LOG_DIR: this test run's, root's only)
            (("logs", domain), 1, ["permission denied reading the log", "run as that user"]),
            (("logs", domain, "-f"), 1, ["permission denied reading the log", "run as that user"]),
            (("clean", domain), 1, ["belong to another user"]),
        ]
        check_all(table, run_all(table, as_nobody, env=env, cwd="/"))
        table = [  # root's domain, nobody's own log directory
            (("stats", domain), 1, ["permission denied", "run as that user"]),
            (("sub", domain, "news"), 1, ["permission denied", "run as that user"]),
            (("run", SINE, "--domain", domain), 1, ["permission denied", "run as that user"]),
            (("demo", "--domain", domain, "--bins", "1024"), 1, ["permission denied", "run as that user"]),
        ]
        check_all(table, run_all(table, as_nobody, env={**env, "MQ_LOG_DIR": str(theirs)}, cwd="/"))
    other = f"{domain}-nobody"  # a free domain, but a log directory nobody cannot write
    table = [(("run", SINE, "--domain", other, "--duration", "1"), 1, ["permission denied", "MQ_LOG_DIR"])]
    check_all(table, run_all(table, as_nobody, env=env, cwd="/"))
    assert not domain_segments("mq.", other)


def test_an_internal_error_shows_its_traceback_and_says_it_is_a_bug():
    code = r"""
import sys
import multiqueue.cli.domains as domains
from multiqueue.cli import main

def broken(args):
    raise RuntimeError("a bug in the listing")

domains.list_domains = broken  # `mq ls` meets a bug
sys.exit(main(["ls"]))
"""
    done = run_python(code)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "RuntimeError: a bug in the listing" in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("mq ls: internal error: this is a bug in multiqueue")
