"""Control over the bus: parameters (now and timed), pause / resume / stop, status events, logs."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from graph_blocks import Ramp, Record

from helpers import run_python
from multiqueue import PoolConfig, ShmConfig
from multiqueue.control import Bus
from multiqueue.control.log import DomainLogHandler, follow, log_path, read_lines
from multiqueue.errors import BlockError
from multiqueue.graph import Multiply, NullSink, Runtime

POOLS = ShmConfig(pools=[PoolConfig("frames", 4096, 256)], max_processes=32)


def chain(domain, tmp_path, count=10**9, pace_s=0.001, **add):
    """Ramp -> Multiply(1.0) -> Record, started."""
    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=count, n=8, pace_s=pace_s), name="src")
    amp = rt.add(Multiply(1.0), name="amp", **add)
    out = rt.add(Record(tmp_path / "out.npy"), name="out")
    rt.connect(src["out"], amp["in"])
    rt.connect(amp["out"], out["in"])
    rt.start()
    return rt


def factors(tmp_path):
    rows = np.load(tmp_path / "out.npy")  # frame k sums to factor * (8k + 28), stamped 1e6 + k
    return rows[:, 3] - 1_000_000, rows[:, 1] / (8 * np.arange(len(rows)) + 28)


def test_a_timed_parameter_change_lands_on_the_exact_frame(domain, tmp_path):
    rt = chain(domain, tmp_path, count=400, pace_s=0.0005)
    rt.set_parameter("amp", "factor", 5.0, at_ns=1_000_000 + 250)  # the frame stamped 1e6 + 250
    rt.wait(timeout=120)
    k, f = factors(tmp_path)
    np.testing.assert_array_equal(k, np.arange(400))
    np.testing.assert_array_equal(f[:250], 1.0)
    np.testing.assert_array_equal(f[250:], 5.0)


def test_a_parameter_change_from_an_unrelated_process_is_applied_and_acknowledged(domain, tmp_path):
    rt = chain(domain, tmp_path)
    try:
        code = ("import sys, multiqueue\nfrom multiqueue.control import Bus\n"
                "m = multiqueue.ShmManager(sys.argv[1], create=False, reaper_interval=None)\n"
                "with Bus(m) as bus:\n"
                "    ok = bus.request('ctl-amp', {'cmd': 'set', 'name': 'factor', 'value': 2.5}).data\n"
                "    bad = bus.request('ctl-amp', {'cmd': 'set', 'name': 'gain', 'value': 1}).data\n"
                "    got = bus.request('ctl-amp', {'cmd': 'get', 'name': 'factor'}).data\n"
                "import json\nprint(json.dumps([ok, bad, got]))\nm.shutdown()\n")
        result = run_python(code, domain)
        assert result.returncode == 0, result.stderr
        ok, bad, got = json.loads(result.stdout)
        assert ok == {"ok": True, "value": None}
        assert not bad["ok"] and "no run-time parameter 'gain'" in bad["error"]
        assert got == {"ok": True, "value": 2.5}
        assert rt.get_parameter("amp", "factor") == 2.5
    finally:
        rt.stop()


def test_pause_resume_and_stop_commands(domain, tmp_path):
    rt = chain(domain, tmp_path)
    with Bus(rt.manager) as bus:
        assert bus.request("ctl-src", {"cmd": "pause"}).data["ok"]
        paused_at = rt.stats().blocks["src"].items_out
        # while paused nothing new is made: a command that needs the block's lock goes through
        # after any work() in progress, so one more frame at most
        assert bus.request("ctl-src", {"cmd": "get", "name": "nonexistent"}).data["ok"] is False
        assert rt.stats().blocks["src"].items_out <= paused_at + 1
        assert bus.request("ctl-src", {"cmd": "resume"}).data["ok"]
        assert bus.request("ctl-amp", {"cmd": "stop"}).data["ok"]  # amp ends: closes its output
        assert bus.request("ctl-amp", {"cmd": "jump"}).data["error"].startswith("ValueError: unknown command")
    rt.stop()
    assert rt.final_stats.blocks["amp"].state == "done" and rt.final_stats.blocks["out"].state == "done"


def test_status_events_tell_starts_failures_and_stops(domain, tmp_path):
    from graph_blocks import Crash

    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src")
    bad = rt.add(Crash(at=5), name="bad")
    rt.connect(src["out"], bad["in"])
    rt.connect(bad["out"], rt.add(NullSink(), name="out")["in"])
    watcher = subprocess.Popen(  # a process subscribed before the start
        [sys.executable, "-c",
         "import sys, json, multiqueue\nfrom multiqueue.control import Bus\n"
         "m = multiqueue.ShmManager(sys.argv[1], reaper_interval=None)\n"
         "bus = Bus(m); sub = bus.subscribe('status'); print('ready', flush=True)\n"
         "while True:\n"
         "    msg = sub.get(60)\n"
         "    if not msg.data['event'].startswith('block-'):\n"
         "        print(json.dumps(msg.data), flush=True)\n"
         "    if msg.data['event'] == 'stopped': break\n"
         "bus.close(); m.shutdown()\n", domain],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert watcher.stdout.readline().strip() == "ready"
    with pytest.raises(BlockError):
        rt.run(duration=60)
    out, err = watcher.communicate(timeout=60)
    # the frames the failure lost are counted, so "drops" events may come between these
    events = [e for e in map(json.loads, out.splitlines()) if e["event"] != "drops"]
    assert [e["event"] for e in events] == ["started", "failed", "stopped"], err
    assert events[1]["blocks"] == ["bad"] and "crash on purpose" in events[1]["traceback"]
    assert events[2]["failed"] == ["bad"]


def test_one_log_for_the_domain_with_pid_process_and_block(domain, tmp_path):
    rt = chain(domain, tmp_path, count=20)
    rt.wait(timeout=60)
    lines = read_lines(domain)
    started = [line for line in lines if ": started (pid " in line]
    assert {line.split("block=")[1].split()[0] for line in started} == {"src", "amp", "out"}
    assert len({line.split("pid=")[1].split()[0] for line in started}) == 3  # three processes, one file
    assert any("graph started" in line and "process=runtime" in line for line in lines)
    assert any("block=out" in line and "done: 20 frames in" in line for line in lines)
    os.unlink(log_path(domain))


def test_log_lines_of_many_processes_never_interleave_and_rotation_keeps_them(domain):
    code = ("import logging, sys\nfrom multiqueue.control.log import DomainLogHandler\n"
            "log = logging.getLogger('t'); log.setLevel(logging.INFO)\n"
            "log.addHandler(DomainLogHandler(sys.argv[1], max_bytes=20_000, backups=50))\n"
            "for i in range(500): log.info('%s line %d ' + 'x' * 60, sys.argv[2], i)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, domain, f"w{n}"]) for n in range(3)]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    files = [log_path(domain)] + [f"{log_path(domain)}.{i}" for i in range(1, 51)]
    lines = [line for f in files if os.path.exists(f) for line in open(f).read().splitlines()]
    assert len(lines) == 1500 and all(line.endswith("x" * 60) for line in lines)  # whole lines only
    for writer in ("w0", "w1", "w2"):
        mine = [line for line in lines if f" {writer} " in line]
        numbers = sorted(int(line.split(f"{writer} line ")[1].split()[0]) for line in mine)
        assert numbers == list(range(500))
    assert os.path.getsize(log_path(domain)) <= 20_000 and os.path.exists(log_path(domain) + ".1")
    for f in files:
        if os.path.exists(f):
            os.unlink(f)


def test_follow_yields_appended_lines(domain):
    import threading

    handler = DomainLogHandler(domain)
    log = logging.getLogger("mq.test.follow")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    stop = threading.Event()
    lines = follow(domain, stop)
    log.info("before following")  # the file exists now; follow() starts at its end
    seen = []

    def reader():
        for line in lines:
            seen.append(line)
            if "third" in line:
                stop.set()

    thread = threading.Thread(target=reader)
    thread.start()
    for word in ("first", "second", "third"):
        log.info(word)
    thread.join(30)
    log.removeHandler(handler)
    handler.close()
    assert [line.rsplit(": ", 1)[1] for line in seen][-3:] == ["first", "second", "third"]
    os.unlink(log_path(domain))


def test_block_events_graph_commands_and_drop_events(domain, tmp_path):
    from multiqueue import ShmManager

    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src")
    sink = rt.add(Record(tmp_path / "slow.npy", delay_s=0.02), name="slow")
    rt.connect(src["out"], sink["in"], policy="drop_oldest", capacity=4)
    with ShmManager(domain, POOLS, reaper_interval=None) as manager, Bus(manager) as bus:
        status = bus.subscribe("status", capacity=256)
        rt.start()
        assert bus.request("ctl", {"cmd": "pause"}).data == {"ok": True}
        assert bus.request("ctl", {"cmd": "resume"}).data == {"ok": True}
        assert bus.request("ctl", {"cmd": "jump"}).data["ok"] is False
        events = []
        while not any(e["event"] == "drops" for e in events):  # the slow branch drops frames
            events.append(status.get(timeout=30).data)
        assert any(e["event"] == "block-started" and e["block"] == "slow" for e in events)
        assert bus.request("ctl", {"cmd": "stop"}).data == {"ok": True}  # the graph stops in order
        assert rt.wait(timeout=60)
        ends = []
        while len(ends) < 2:
            e = status.get(timeout=30).data
            if e["event"] in ("block-done", "block-stopped", "block-failed"):
                ends.append((e["block"], e["event"]))
        assert sorted(ends) == [("slow", "block-done"), ("src", "block-done")]


def test_a_message_sent_to_a_block_reaches_its_on_message(domain, tmp_path):
    from graph_blocks import Inbox

    rt = Runtime(domain, pools=POOLS)
    src = rt.add(Ramp(count=10**9, n=8, pace_s=0.001), name="src")
    box = rt.add(Inbox(tmp_path / "got.json"), name="box")
    rt.connect(src["out"], box["in"])
    rt.start()
    try:
        with Bus(rt.manager) as bus:
            replies = bus.inbox("tester")
            bus.send("box", {"hello": 1, "reply": "tester"})
            answer = replies.get(timeout=30)
    finally:
        rt.stop()
    assert answer.data == {"got": {"hello": 1, "reply": "tester"}, "from": "box"}


def test_a_runtime_with_a_tight_metadata_table_still_has_its_bus(domain, tmp_path):
    tight = ShmConfig(pools=[PoolConfig("frames", 4096, 64)], max_buffers=64)  # no room of its own
    rt = Runtime(domain, pools=tight)
    src = rt.add(Ramp(count=5, n=8), name="src", placement="thread")
    rt.connect(src["out"], rt.add(Record(tmp_path / "o.npy"), name="out", placement="thread")["in"])
    rt.run(duration=60)
    assert len(np.load(tmp_path / "o.npy")) == 5


def test_a_bus_on_a_domain_without_room_says_how_to_make_some(domain):
    from multiqueue import DomainFullError, ShmManager

    full = ShmConfig(pools=[PoolConfig("frames", 4096, 64)], max_buffers=64)
    with ShmManager(domain, full, reaper_interval=None) as m:
        with pytest.raises(DomainFullError, match="bus of domain .* needs 64 blocks but .* room for 0"):
            Bus(m)
