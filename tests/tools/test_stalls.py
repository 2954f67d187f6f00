"""A graph that stalls says so: a block keeping every block of a pool leaves its source
`waiting for pool ...` in `mq run`'s progress and `mq stats`, `mq doctor` names the
holder block and exits 1, and the pool timeout error names the holders.

The graph runs under `mq run` in another process, as a user runs it; the tools are the
`mq` commands; the holder of the last test is another interpreter."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading

import pytest

from helpers import spawn_python
from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.errors import PoolExhaustedError

MQ = [sys.executable, "-m", "multiqueue.cli"]

# The user's bug of scenario 4: a block keeps a share of every frame it gets.
HOLD_MODULE = """\
import numpy as np
from multiqueue.graph import Block, Port


class Hold(Block):
    inputs = {"in": Port(np.float32)}

    def __init__(self):
        super().__init__()
        self.kept = []

    def work(self, inputs):
        for frame in inputs["in"]:
            self.kept.append(frame.buffer.share())
"""

# 16 KiB frames: only the "frames" pool fits them (the bus's pool has 4 KiB blocks).
HOLD_GRAPH = """\
pools: [{name: frames, block_size: 16384, count: 16}]
blocks:
  src: {class: NullSource, params: {frame: [4096], count: 300}}
  hold: {class: "mq_stall_hold:Hold"}
connections: [src.out -> hold.in]
"""


def mq(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MQ, *map(str, args)], capture_output=True, text=True, timeout=60)


class MqRun:
    """`mq run FILE --domain DOMAIN` in the background, its stdout read line by line."""

    def __init__(self, path, domain: str):
        self.proc = subprocess.Popen([*MQ, "run", str(path), "--domain", domain], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=path.parent)
        self.lines: queue.Queue = queue.Queue()
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def progress(self, timeout: float = 60.0) -> str:
        """The next progress report (its lines up to the next one's start)."""
        line = self._next(timeout)
        while not line.startswith("["):
            line = self._next(timeout)
        report = [line]
        while (line := self._next(timeout)).startswith(" "):
            report.append(line)
        return "".join(report)

    def _next(self, timeout: float) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"mq run ended: {''.join(self.out)}{self.proc.stderr.read()}"
        return line

    def interrupt(self) -> tuple[int, str, str]:
        """Ctrl-C; its exit code, stdout and stderr once it has stopped."""
        self.proc.send_signal(signal.SIGINT)
        err = self.proc.stderr.read()
        code = self.proc.wait(timeout=60)
        while self.lines.get(timeout=60) is not None:
            pass
        return code, "".join(self.out), err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def hold_graph(tmp_path):
    (tmp_path / "mq_stall_hold.py").write_text(HOLD_MODULE)
    path = tmp_path / "hold.yaml"
    path.write_text(HOLD_GRAPH)
    return path


def test_a_block_keeping_every_pool_block_stalls_its_source_visibly_and_doctor_names_it(domain, hold_graph):
    run = MqRun(hold_graph, domain)
    try:
        first = run.progress()  # [  1.0 s]: the source stalled on its 17th frame long before
        assert "src 16 (" in first, first
        assert re.search(r"^ +now: src waiting for pool 'frames'", first, re.M), first

        stats = mq("stats", domain)
        assert stats.returncode == 0, stats.stderr
        assert re.search(r"^src +running .* waiting for pool 'frames'", stats.stdout, re.M), stats.stdout
        data = json.loads(mq("stats", domain, "--json").stdout)
        src = data["graph"]["blocks"]["src"]
        assert src["status"].startswith("waiting for pool 'frames'") and src["rate_out_now"] == 0.0, src

        doctor = mq("doctor", domain)
        assert doctor.returncode == 1, doctor.stdout + doctor.stderr
        assert "POOL-FULL: pool 'frames' is full: 16 of its 16 blocks are held" in doctor.stdout
        hold_pid = data["graph"]["blocks"]["hold"]["pid"]
        assert f"held by process pid {hold_pid} 'mq-hold' (alive, block hold): 16 blocks" in doctor.stdout
        report = json.loads(mq("doctor", domain, "--json").stdout)
        [finding] = [f for f in report["findings"] if f["kind"] == "pool-full"]
        assert "block hold" in finding["message"] and not report["ok"]

        code, out, err = run.interrupt()
        assert code == 0, out + err
        assert "pool blocks still in use after the stop: 0" in out, out
    finally:
        run.kill()


HOLDER = r"""
import sys
from multiqueue import ShmManager
m = ShmManager(sys.argv[1], name="keeper", reaper_interval=None, create=False)
kept = [m.allocate(1000) for _ in range(8)]
print("holding", flush=True)
sys.stdin.readline()
"""


def test_the_pool_timeout_error_names_the_processes_holding_the_pool(domain):
    manager = ShmManager(domain, ShmConfig(pools=[PoolConfig("small", 4096, 8)], max_buffers=64),
                         reaper_interval=None)
    holder = spawn_python(HOLDER, domain)
    try:
        assert holder.stdout.readline().strip() == "holding", holder.stderr.read()
        with pytest.raises(PoolExhaustedError) as error:
            manager.allocate(1000, timeout=0.05)
        message = str(error.value)
        assert f"held by pid {holder.pid} 'keeper' (8 blocks)" in message, message
        assert f"`mq doctor {domain}`" in message and error.value.pools == ["small"]
        with pytest.raises(PoolExhaustedError) as at_once:  # a try without waiting stays cheap
            manager.allocate(1000, timeout=0)
        assert "held by" not in str(at_once.value)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
        holder.stderr.close()
        manager.shutdown()


def test_doctor_is_quiet_about_a_pool_with_room(domain):
    manager = ShmManager(domain, ShmConfig(pools=[PoolConfig("small", 4096, 10)], max_buffers=64),
                         reaper_interval=None)
    try:
        kept = [manager.allocate(1000) for _ in range(8)]  # 80 %: not nearly full
        doctor = mq("doctor", domain)
        assert doctor.returncode == 0 and "no problems found" in doctor.stdout, doctor.stdout
        kept.append(manager.allocate(1000))  # 90 %: nearly full
        doctor = mq("doctor", domain)
        assert doctor.returncode == 1, doctor.stdout
        assert "pool 'small' is nearly full: 9 of its 10 blocks are held" in doctor.stdout, doctor.stdout
        assert f"process pid {os.getpid()}" in doctor.stdout
        for buffer in kept:
            buffer.release()
    finally:
        manager.shutdown()
