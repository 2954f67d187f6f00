"""A damaged domain (a segment this multiqueue cannot read) that no live process maps is
removed by `mq clean DOMAIN` and `ShmManager.cleanup`; one a live process still maps is
refused, naming the process, unless forced (issue 15, scenario 8).

Each domain is made by a child interpreter that dies without leaving it, then damaged
on disk as a crash, a bad disk write or another program would.
"""

import ctypes
import os
import subprocess
import sys

import pytest

from helpers import run_python, spawn_python
from multiqueue import DomainInUseError, SegmentError, ShmManager
from multiqueue.shm import layout as L
from multiqueue.shm.segment import domain_segments, segment_path

MQ = [sys.executable, "-m", "multiqueue.cli"]
HEADER = ctypes.sizeof(L.SegmentHeader)

CRASHED = r"""
import os, sys
from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.graph import registry as R
from multiqueue.stream import PortQueue
m = ShmManager(sys.argv[1], ShmConfig(pools=[PoolConfig("p", 256, 4)], max_buffers=64, max_processes=8),
               name="crashed", reaper_interval=None)
PortQueue(m, "out", capacity=8)
R.GraphSegment.create(m.prefix, m.domain, {"blocks": [{"name": "src"}], "edges": []}, m.access)
os._exit(0)  # dies without leaving: its segments stay, its process row says it is dead
"""

# a process that maps a file and keeps it mapped until told to go (then reads it once more)
MAPPER = r"""
import mmap, sys
f = open(sys.argv[1], "rb")
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
print("mapped", flush=True)
sys.stdin.readline()
print("still readable", m[:8] is not None, flush=True)
"""


def mq(*args) -> subprocess.CompletedProcess:
    return subprocess.run([*MQ, *map(str, args)], capture_output=True, text=True, timeout=60)


def crashed_domain(domain: str) -> list[str]:
    done = run_python(CRASHED, domain)
    assert done.returncode == 0, done.stderr
    paths = domain_segments("mq.", domain)
    assert len(paths) == 4, paths  # control, pool, queue, graph
    return paths


def path_of(domain: str, obj: str) -> str:
    if obj == "pool":
        return next(p for p in domain_segments("mq.", domain) if ".pool." in p)
    return segment_path("mq.", domain, obj)


def overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# what goes wrong: (segment, how)
DAMAGE = {
    "control tables garbage": ("ctl", lambda p: overwrite(p, HEADER, b"\xab" * 64)),  # the header is valid
    "control truncated": ("ctl", lambda p: os.truncate(p, 4096)),
    "control shorter than a header": ("ctl", lambda p: os.truncate(p, 10)),
    "control wrong magic": ("ctl", lambda p: overwrite(p, 0, b"NOTMQ!!!")),
    "control another layout version": ("ctl", lambda p: overwrite(p, 8, (99).to_bytes(4, "little"))),
    "queue wrong magic": ("q.out", lambda p: overwrite(p, 0, b"NOTMQ!!!")),
    "queue truncated": ("q.out", lambda p: os.truncate(p, 100)),
    "graph wrong magic": ("graph", lambda p: overwrite(p, 0, b"NOTMQ!!!")),
    "graph tables garbage": ("graph", lambda p: overwrite(p, HEADER, b"\xab" * 32)),
    "pool truncated": ("pool", lambda p: os.truncate(p, 0)),
}


def damaged_domain(domain: str, damage: str) -> list[str]:
    paths = crashed_domain(domain)
    obj, spoil = DAMAGE[damage]
    spoil(path_of(domain, obj))
    return paths


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_cleanup_removes_a_damaged_domain_no_process_maps(domain, damage):
    paths = damaged_domain(domain, damage)
    assert sorted(ShmManager.cleanup(domain)) == paths
    assert not domain_segments("mq.", domain)


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_mq_clean_removes_a_damaged_domain_no_process_maps(domain, damage):
    paths = damaged_domain(domain, damage)
    done = mq("clean", domain)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert f"removed {len(paths)} segment(s) of domain {domain!r}" in done.stdout
    assert not domain_segments("mq.", domain)


def test_the_corrupt_control_error_names_mq_clean_and_that_command_removes_it(domain):
    """Scenario 8 as the user met it: a valid header over garbage tables."""
    damaged_domain(domain, "control tables garbage")
    looked = mq("stats", domain)
    assert looked.returncode == 1 and "Traceback" not in looked.stderr
    assert "is corrupt" in looked.stderr and f"`mq clean {domain}`" in looked.stderr
    with pytest.raises(SegmentError, match=f"`mq clean {domain}`"):
        ShmManager(domain, create=False, reaper_interval=None)

    done = mq("clean", domain)  # what the message says to run
    assert done.returncode == 0, done.stderr
    assert not domain_segments("mq.", domain)
    with ShmManager(domain, reaper_interval=None) as fresh:  # the name works again
        fresh.allocate(10).release()


def test_a_damaged_domain_a_live_process_maps_is_refused_naming_it_and_force_removes_it(domain):
    paths = damaged_domain(domain, "control tables garbage")
    user = spawn_python(MAPPER, path_of(domain, "ctl"))
    try:
        assert user.stdout.readline().strip() == "mapped"
        refused = mq("clean", domain)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"pid {user.pid}: " in refused.stderr and "python" in refused.stderr  # who maps it
        assert f"mq clean {domain} --force" in refused.stderr and "nothing removed" in refused.stderr
        with pytest.raises(DomainInUseError, match=rf"processes {user.pid} map its segments.*force=True"):
            ShmManager.cleanup(domain)
        assert domain_segments("mq.", domain) == paths

        forced = mq("clean", domain, "--force")
        assert forced.returncode == 0, forced.stderr
        assert not domain_segments("mq.", domain)
        out, err = user.communicate("\n", timeout=30)  # the mapper was left alone
        assert user.returncode == 0 and out.strip() == "still readable True", err
    finally:
        user.kill()
        user.communicate()


def test_cleanup_force_removes_a_mapped_damaged_domain(domain):
    damaged_domain(domain, "control another layout version")
    user = spawn_python(MAPPER, path_of(domain, "pool"))
    try:
        assert user.stdout.readline().strip() == "mapped"
        with pytest.raises(DomainInUseError, match=str(user.pid)):
            ShmManager.cleanup(domain)
        assert len(ShmManager.cleanup(domain, force=True)) == 4
        assert not domain_segments("mq.", domain)
    finally:
        user.kill()
        user.communicate()


HOLDER = r"""
import sys
from multiqueue import PoolConfig, ShmConfig, ShmManager
m = ShmManager(sys.argv[1], ShmConfig(pools=[PoolConfig("p", 256, 4)], max_buffers=64), name="holder",
               reaper_interval=None)
print("ready", flush=True)
sys.stdin.readline()
m.shutdown()
"""


def test_force_never_removes_a_readable_domain_whose_processes_live(domain):
    holder = spawn_python(HOLDER, domain)
    try:
        assert holder.stdout.readline().strip() == "ready"
        before = domain_segments("mq.", domain)
        with pytest.raises(DomainInUseError, match=f"holder \\(pid {holder.pid}\\)"):
            ShmManager.cleanup(domain, force=True)
        refused = mq("clean", domain, "--force")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert f"holder (pid {holder.pid})" in refused.stderr
        assert domain_segments("mq.", domain) == before
        holder.communicate("\n", timeout=30)
        assert holder.returncode == 0
    finally:
        holder.kill()
        holder.communicate()
    assert not domain_segments("mq.", domain)


def test_mq_clean_force_needs_a_domain(domain):
    damaged_domain(domain, "control tables garbage")
    refused = mq("clean", "--force")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "mq clean DOMAIN --force" in refused.stderr
    assert len(domain_segments("mq.", domain)) == 4  # a sweep is never forced
    ShmManager.cleanup(domain)
