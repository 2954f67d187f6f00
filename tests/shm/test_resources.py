"""Resource limits: a configuration the machine cannot hold fails up front with what to
change, and a /dev/shm that fills up during a run gives errors, never a SIGBUS.

The full-/dev/shm tests run an interpreter in a private mount namespace with a small
tmpfs mounted on /dev/shm (root and unshare needed; skipped, saying why, otherwise):
the real filesystem fills, nothing is simulated.
"""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest

from helpers import run_python
from multiqueue import PoolConfig, ResourceLimitError, SegmentError, ShmConfig, ShmManager
from multiqueue.shm import resources
from multiqueue.shm.segment import domain_segments


def _small_shm_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs on /dev/shm in a private mount namespace"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a namespace: {probe.stderr.strip()}"


needs_small_shm = pytest.mark.skipif(bool(_small_shm_reason()), reason=str(_small_shm_reason()))


def run_with_small_shm(code: str, size_mib: int) -> dict:
    """Run `code` with a fresh /dev/shm of `size_mib` MiB; returns what it printed as JSON.

    The process must end normally: a SIGBUS shows as returncode -7 and fails the test."""
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size={size_mib}m tmpfs /dev/shm && exec "$0" -c "$1"', sys.executable, code],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@needs_small_shm
def test_pools_larger_than_dev_shm_are_refused_before_anything_is_created():
    out = run_with_small_shm(r"""
import json, os
from multiqueue import ShmManager, ShmConfig, PoolConfig, ResourceLimitError
try:
    ShmManager("big", ShmConfig(pools=[PoolConfig("frames", 1 << 20, 16)]))
    print(json.dumps({"created": True}))
except ResourceLimitError as e:
    print(json.dumps({"error": str(e), "errno": e.errno, "left": os.listdir("/dev/shm")}))
""", size_mib=8)
    assert out["errno"] == 28 and out["left"] == []
    assert "domain 'big' needs 26.1 MiB in /dev/shm (control 10.1 MiB, pools frames 16.0 MiB)" in out["error"]
    assert "only 8.0 MiB of 8.0 MiB is free" in out["error"] and "--shm-size" in out["error"]


@needs_small_shm
def test_a_full_dev_shm_makes_growth_and_new_queues_fail_with_errors_not_sigbus():
    out = run_with_small_shm(r"""
import errno, json, logging, os
from multiqueue import ShmManager, ShmConfig, PoolConfig, PoolExhaustedError, SegmentError
from multiqueue.stream import PortQueue
warnings = []
logging.getLogger("multiqueue.shm").addHandler(type("H", (logging.Handler,), {
    "emit": lambda self, r: warnings.append(r.getMessage())})())
m = ShmManager("run", ShmConfig(pools=[PoolConfig("frames", 256 << 10, 4, expandable=True,
                                                   max_blocks=64)], max_buffers=64, max_processes=8),
               reaper_interval=None)
out = {"preflight_warning": [w for w in warnings if "may grow to 64 blocks" in w]}
# fill what is left of /dev/shm, the way another program would
filler = os.open("/dev/shm/filler", os.O_RDWR | os.O_CREAT, 0o600)
step = 1 << 20
while step >= 4096:
    try:
        os.posix_fallocate(filler, os.fstat(filler).st_size, step)
    except OSError as e:
        assert e.errno == errno.ENOSPC
        step //= 2
held = [m.allocate(200_000) for _ in range(4)]
for b in held:
    b.memoryview()[:] = b"x" * len(b.memoryview())  # every byte of every block is backed
try:
    m.allocate(200_000, timeout=0.2)
except PoolExhaustedError as e:
    out["exhausted"] = str(e)
out["growth_warning"] = [w for w in warnings if "could not grow" in w]
try:
    PortQueue(m, "late", capacity=1 << 16)
except SegmentError as e:
    out["queue_error"] = str(e)
os.close(filler)
os.unlink("/dev/shm/filler")
grown = m.allocate(200_000, timeout=5)  # room again: the pool grows
out["grown_pool"] = grown.pool
out["blocks"] = m.get_stats().pool_stats[0].block_count
grown.release()
for b in held:
    b.release()
m.shutdown()
out["left"] = os.listdir("/dev/shm")
print(json.dumps(out))
""", size_mib=4)
    assert len(out["preflight_warning"]) == 1
    assert "could not grow: cannot reserve" in out["exhausted"] and "/dev/shm is full" in out["exhausted"]
    assert len(out["growth_warning"]) == 1  # logged once, not once per retry
    assert "/dev/shm is full" in out["queue_error"] and ".q.late" in out["queue_error"]
    assert out["grown_pool"] == "frames" and out["blocks"] == 8
    assert out["left"] == []


def test_preflight_sums_the_control_segment_and_every_first_pool_segment(domain):
    config = ShmConfig(pools=[PoolConfig("a", 1000, 10), PoolConfig("b", 64, 3, expandable=True)])
    report = resources.preflight(config, domain)
    control = resources.L.control_layout(64, 32, 16384)["total"]
    assert report.needed_bytes == control + (4096 + 10 * 1024) + (4096 + 3 * 64)
    assert not report.errors


def test_too_few_memory_maps_is_refused_with_the_sysctl_to_raise(domain, monkeypatch):
    monkeypatch.setattr(resources, "max_map_count", lambda: resources.count_maps() + 100)
    config = ShmConfig(pools=[PoolConfig("p", 4096, 1, expandable=True, max_blocks=32)])
    with pytest.raises(ResourceLimitError, match=r"may map 33 segments .*sysctl -w vm.max_map_count="):
        ShmManager(domain, config)
    assert domain_segments("mq.", domain) == []


def test_too_few_file_descriptors_is_refused_with_the_ulimit_to_raise(domain):
    done = run_python(r"""
import resource, sys
from multiqueue import ShmManager, ShmConfig, PoolConfig, ResourceLimitError
resource.setrlimit(resource.RLIMIT_NOFILE, (40, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    ShmManager(sys.argv[1], ShmConfig(pools=[PoolConfig("p", 4096, 1, expandable=True, max_blocks=32)]))
except ResourceLimitError as e:
    print(e)
""", domain)
    assert done.returncode == 0, done.stderr
    assert "may need 66 file descriptors (33 segments)" in done.stdout and "ulimit -n" in done.stdout


def test_running_out_of_descriptors_while_attaching_names_the_limit(domain):
    with ShmManager(domain, ShmConfig(pools=[PoolConfig("p", 4096, 4)]), reaper_interval=None):
        done = run_python(r"""
import os, resource, sys
from multiqueue import ShmManager, SegmentError
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    ShmManager(sys.argv[1], create=False)
except SegmentError as e:
    print(e)
""", domain)
    assert done.returncode == 0, done.stderr
    assert "no file descriptor left (the process limit is 64" in done.stdout


def test_resource_limit_errors_are_segment_errors():
    assert issubclass(ResourceLimitError, SegmentError)
    assert resource.RLIMIT_NOFILE  # the check reads the soft limit of this resource
