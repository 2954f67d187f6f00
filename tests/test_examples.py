"""Every example, the README's code and the `mq` command run, and leave /dev/shm clean."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import spawn_python
from multiqueue.shm.segment import domain_segments

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def mq(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "multiqueue.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_readme_example_is_the_file_that_runs():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Example\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert block == (ROOT / "examples" / "readme_example.py").read_text()


def test_readme_gives_the_ci_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


# The examples with a fixed domain name; the others name theirs "<kind>-<their pid>".
FIXED_DOMAINS = {"readme_example.py": "readme", "stage_pipeline.py": "stage-example"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    """Each example exits 0 and leaves nothing of its own domain in /dev/shm (other
    programs may create and remove segments meanwhile: only the example's are checked)."""
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    fixed = FIXED_DOMAINS.get(path.name)
    left = [name for name in os.listdir("/dev/shm") if name.startswith("mq.")
            and (f"-{proc.pid}." in name or (fixed and name.startswith(f"mq.{fixed}.")))]
    assert not left, f"{path.name} left {left}"


def test_readme_example_output():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "readme_example.py")],
                            capture_output=True, text=True, timeout=120)
    assert "reader sees [0. 1. 2.] refs: 2" in result.stdout
    assert "allocations 1, deallocations 1" in result.stdout


def test_mq_demo_shares_and_verifies_every_frame(domain):
    result = mq("stream-demo", "--domain", domain, "--frames", "300")
    assert result.returncode == 0, result.stderr
    assert "300 frames read in place, 300 verified" in result.stdout
    assert "allocations 300, deallocations 300" in result.stdout
    assert "2 process(es)" in result.stdout  # mid-stream both processes are attached
    assert not domain_segments("mq.", domain)


def test_mq_demo_runs_the_spectrum_monitor_and_stops_clean(domain, tmp_path):
    record = tmp_path / "spectra.npy"
    result = mq("demo", "--domain", domain, "--duration", "2", "--record", str(record),
                "--record-frames", "5")
    assert result.returncode == 0, result.stderr
    assert "pool blocks still in use after the stop: 0" in result.stdout
    assert re.search(r"spectra +\d+ \(\s*\d", result.stdout)  # live progress lines
    assert "peaks: bin" in result.stdout  # the probe saw detections
    assert np.load(record).shape == (5, 160_000)
    assert not domain_segments("mq.", domain)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_mq_demo_stops_in_order_on_ctrl_c_or_sigterm(domain, tmp_path, stop_signal):
    proc = subprocess.Popen([sys.executable, "-m", "multiqueue.cli", "demo", "--domain", domain,
                             "--duration", "0", "--record", str(tmp_path / "r.npy"), "--bins", "20000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for the first progress line: the graph runs
        if line.startswith("spectra"):
            break
    proc.send_signal(stop_signal)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopping..." in out and "pool blocks still in use after the stop: 0" in out
    assert not domain_segments("mq.", domain)


HOLDER = r"""
import sys
from multiqueue import ShmManager, ShmConfig, PoolConfig
m = ShmManager(sys.argv[1], ShmConfig(pools=[PoolConfig("p", 1024, 8)], max_buffers=64),
               name="holder", reaper_interval=None)
b = m.allocate(100)
print("ready", flush=True)
sys.stdin.readline()
"""


def test_mq_stats_shows_pools_and_processes(domain):
    holder = spawn_python(HOLDER, domain)
    try:
        assert holder.stdout.readline().strip() == "ready"
        text = mq("stats", domain)
        assert text.returncode == 0, text.stderr
        assert re.search(r"^p\s+1 KiB\s+8\s+1\s+7", text.stdout, re.M), text.stdout
        assert re.search(rf"process\s+{holder.pid}\s+holder\s+alive", text.stdout)
        data = json.loads(mq("stats", domain, "--json").stdout)
        assert data["total_allocated"] == 1
        assert data["pool_stats"][0]["name"] == "p"
        # a live domain cannot be cleaned up
        refused = mq("cleanup", domain)
        assert refused.returncode == 1 and "live processes" in refused.stderr
        assert domain_segments("mq.", domain)

        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        text = mq("stats", domain)  # stats reaps the dead holder on attach
        assert "allocated 0/8 blocks" in text.stdout
        done = mq("cleanup", domain)
        assert done.returncode == 0 and "removed" in done.stdout
        assert not domain_segments("mq.", domain)
    finally:
        holder.kill()
        holder.wait()
        for s in (holder.stdin, holder.stdout, holder.stderr):
            s.close()


def test_mq_stats_on_a_missing_domain_is_a_clear_error(domain):
    result = mq("stats", domain)
    assert result.returncode == 1
    assert f"domain {domain!r} does not exist" in result.stderr
    assert not domain_segments("mq.", domain)
