"""Who may use a domain: segments are owner-only unless the domain is shared with a group.

Other users are real: the test runs interpreters as `nobody` with setpriv (root only;
skipped, saying why, where the machine cannot switch users).
"""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest

from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.shm.segment import domain_segments
from multiqueue.stream import PortQueue

NOBODY = 65534
OTHER_GROUP = 1  # `daemon` on Debian: a group nobody is not in

VISITOR = r"""
import json, sys
from multiqueue import ShmManager, SegmentError
domain, path, buffer_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
out = {}
try:
    with open(path, "rb") as f:
        out["read"] = f.read(64).hex()
except PermissionError as e:
    out["read_error"] = str(e)
try:
    m = ShmManager(domain, name="visitor", reaper_interval=None, create=False)
except SegmentError as e:
    out["attach_error"] = str(e)
else:
    with m.get(buffer_id) as b:
        out["data"] = bytes(b.memoryview()[:5]).decode()
    with m.allocate(100) as mine:
        mine.memoryview()[:3] = b"abc"
        out["allocated"] = True
    from multiqueue.stream import PortQueue
    PortQueue(m, "visitors", capacity=8)  # a segment this user creates in the shared domain
    m.shutdown()
print(json.dumps(out))
"""


def _can_switch_users() -> str | None:
    if os.geteuid() != 0:
        return "needs root to run a process as another user"
    if not shutil.which("setpriv"):
        return "needs setpriv (util-linux) to run a process as another user"
    probe = _as_user(["-c", "import multiqueue"], NOBODY, NOBODY)
    if probe.returncode != 0:
        return f"user nobody cannot import multiqueue from this checkout: {probe.stderr.strip()[-200:]}"
    return None


def _as_user(args, uid: int, gid: int, groups=()) -> subprocess.CompletedProcess:
    who = [f"--reuid={uid}", f"--regid={gid}"]
    who += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    env = {**os.environ, "HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("MQ_LOG_DIR", None)
    return subprocess.run(["setpriv", *who, sys.executable, *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd="/")


needs_users = pytest.mark.skipif(bool(_can_switch_users()), reason=str(_can_switch_users()))


def _visit(domain, manager, uid, gid):
    buffer = manager.allocate(100)
    buffer.memoryview()[:5] = b"hello"
    control = [p for p in domain_segments("mq.", domain) if p.endswith(".ctl")][0]
    pool = [p for p in domain_segments("mq.", domain) if ".pool." in p][0]
    results = []
    for path in (control, pool):
        done = _as_user(["-c", VISITOR, domain, path, str(buffer.id)], uid, gid)
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    buffer.release()
    return results


def _modes(domain):
    return {p: (stat.S_IMODE(os.stat(p).st_mode), os.stat(p).st_gid) for p in domain_segments("mq.", domain)}


def test_every_segment_of_a_domain_is_owner_only(domain):
    with ShmManager(domain, ShmConfig(pools=[PoolConfig("p", 256, 4, expandable=True)]),
                    reaper_interval=None) as m:
        PortQueue(m, "frames", capacity=8)
        held = [m.allocate(100) for _ in range(5)]  # the fifth grows the pool: a second segment
        modes = _modes(domain)
        assert len(modes) == 4  # control, two pool chunks, the queue
        assert {mode for mode, _gid in modes.values()} == {0o600}
        for b in held:
            b.release()


@needs_users
def test_another_user_can_neither_attach_nor_read(domain):
    with ShmManager(domain, ShmConfig(pools=[PoolConfig("p", 256, 4)]), reaper_interval=None) as m:
        for result in _visit(domain, m, NOBODY, NOBODY):
            assert "read" not in result and "Permission denied" in result["read_error"]
            assert "data" not in result
            assert "permission denied opening segment" in result["attach_error"]
            assert "belongs to another user" in result["attach_error"]
        assert len(m.processes()) == 1  # the visitor never registered


@needs_users
def test_a_domain_shared_with_a_group_admits_its_members_only(domain):
    config = ShmConfig(pools=[PoolConfig("p", 256, 4)], group=NOBODY)  # nogroup
    with ShmManager(domain, config, reaper_interval=None) as m:
        assert m.config.group == NOBODY
        assert {v for v in _modes(domain).values()} == {(0o660, NOBODY)}
        member, _ = _visit(domain, m, NOBODY, NOBODY)
        assert member["data"] == "hello" and member["allocated"] and "read" in member
        queue = [p for p in domain_segments("mq.", domain) if p.endswith(".q.visitors")]
        assert [(stat.S_IMODE(os.stat(p).st_mode), os.stat(p).st_gid) for p in queue] == [(0o660, NOBODY)]
        for outsider in _visit(domain, m, NOBODY, OTHER_GROUP):
            assert "read" not in outsider and "data" not in outsider
            assert "permission denied opening segment" in outsider["attach_error"]
    assert domain_segments("mq.", domain) == []  # the owner, last to leave, removed every file


@needs_users
def test_sharing_with_a_group_the_user_is_not_in_is_refused(domain):
    code = ("import sys\nfrom multiqueue import ShmConfig, ShmManager, PoolConfig, SegmentError\n"
            "try:\n    ShmManager(sys.argv[1], ShmConfig(pools=[PoolConfig('p', 256, 4)], group=1))\n"
            "except SegmentError as e:\n    print(e)\n")
    done = _as_user(["-c", code, domain], NOBODY, NOBODY)
    assert done.returncode == 0, done.stderr
    assert "cannot share segment" in done.stdout and "not a member" in done.stdout
    assert domain_segments("mq.", domain) == []


def test_an_unknown_group_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown group 'no-such-group-xyz'"):
        ShmConfig(group="no-such-group-xyz")
    with pytest.raises(TypeError, match="group must be a group name or id"):
        ShmConfig(group=1.5)
