"""A bridge between two network namespaces joined by a veth pair: two runtimes, two
domains, the frames over a real (virtual) link rather than loopback.

Needs root and ``ip netns`` (skipped otherwise).  The receiving runtime runs in one
namespace (tests/netns_roles.py rx: BridgeSource listening on its veth address), the
sending one in the other (tx: BridgeSink dialling that address).  /dev/shm is shared
across network namespaces, so the two domains just have names of their own.  Every
wait is on a role's stdout line or on a process exit.
"""

import contextlib
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import netns_roles  # the roles' frame pattern (tests/ is on sys.path, as for helpers)
import numpy as np
import pytest

from helpers import ROLE_WAIT, RoleProcess
from multiqueue.shm.segment import domain_segments, unlink_quietly

pytest.importorskip("zenoh", reason="the bridge needs eclipse-zenoh")

ROLES = str(Path(__file__).with_name("netns_roles.py"))
WAIT = ROLE_WAIT
COUNT, N = 10_000, 256
STOP_WAIT = 15.0  # seconds an interrupted role has to stop in order before it is killed
PORT = 7447  # the namespaces are fresh: nothing else listens there


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_pids(ns: str) -> list[int]:
    result = ip("netns", "pids", ns, check=False)
    return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []


def link_bytes(ns: str, dev: str) -> tuple[int, int]:
    """(rx, tx) bytes of ``dev`` as the namespace ``ns`` counts them."""
    stats = json.loads(ip("-n", ns, "-j", "-s", "link", "show", "dev", dev).stdout)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


class NetnsPair:
    def __init__(self, tag: str, subnet: int):
        self.rx_ns, self.tx_ns = f"mqt-{tag}-rx", f"mqt-{tag}-tx"
        self.rx_dev, self.tx_dev = f"mqv{tag}r", f"mqv{tag}t"  # at most 15 characters
        self.rx_addr, self.tx_addr = f"10.213.{subnet}.1", f"10.213.{subnet}.2"


@pytest.fixture
def netns_pair():
    """Two fresh network namespaces joined by a veth pair, links (and lo) up; removed
    afterwards (any process still in them is killed first)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("no 'ip' command (iproute2)")
    pair = NetnsPair(uuid.uuid4().hex[:6], random.randrange(256))
    created = []
    try:
        for ns in (pair.rx_ns, pair.tx_ns):
            result = ip("netns", "add", ns, check=False)
            if result.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {result.stderr.strip()}")
            created.append(ns)
        # created inside the namespaces directly: nothing is left in ours if a step fails
        result = ip("link", "add", pair.rx_dev, "netns", pair.rx_ns, "type", "veth",
                    "peer", "name", pair.tx_dev, "netns", pair.tx_ns, check=False)
        if result.returncode != 0:
            pytest.skip(f"cannot create a veth pair: {result.stderr.strip()}")
        ends = ((pair.rx_ns, pair.rx_dev, pair.rx_addr), (pair.tx_ns, pair.tx_dev, pair.tx_addr))
        for ns, dev, addr in ends:
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in created:
            for pid in netns_pids(ns):  # ours: nothing else runs in this namespace
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            ip("netns", "delete", ns, check=False)  # takes the veth pair with it


@pytest.fixture
def two_domains():
    """Two fresh domain names; every segment of them is gone after the test (or removed)."""
    tag = uuid.uuid4().hex[:12]
    names = (f"test-{tag}-rx", f"test-{tag}-tx")
    yield names
    leftovers = [p for name in names for p in domain_segments("mq.", name)]
    for path in leftovers:
        unlink_quietly(path)
    assert not leftovers, f"test left segments behind: {leftovers}"


class Role(RoleProcess):
    """A tests/net/netns_roles.py runtime under ``ip netns exec``, in a process group of its
    own (its workers too)."""

    def __init__(self, ns: str, *args):
        command = ["ip", "netns", "exec", ns, sys.executable, ROLES, *map(str, args)]
        super().__init__(f"{args[0]}@{ns}", command, stdin=subprocess.DEVNULL, start_new_session=True)

    def kill(self) -> None:
        """A role still running is interrupted (its runtime stops in order and releases its
        domain); whatever is left of its process group (the runtime, its workers) is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=STOP_WAIT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=WAIT)


def group_members(pgid: int) -> list[int]:
    """Live processes of the group (a zombie is dead already: init reaps it when it gets to it)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
                if int(pgrp) == pgid and state != "Z":
                    members.append(int(entry))
    return members


def lingering(pids: list[int], timeout: float) -> list[int]:
    """Those of ``pids`` still alive after ``timeout`` s: a process that has closed its files
    may still be on its way out (pidfds say when it is gone; no polling)."""
    left = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], timeout)[0]:
                left.append(pid)
        finally:
            os.close(fd)
    return left


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


@pytest.fixture
def roles(netns_pair, two_domains):
    started: list[Role] = []

    def start(ns: str, *args) -> Role:
        started.append(Role(ns, *args))
        return started[-1]

    yield start
    for role in started:
        role.kill()


def test_bridge_between_network_namespaces_over_veth(netns_pair, two_domains, roles, tmp_path):
    pair, (rx_domain, tx_domain) = netns_pair, two_domains
    key = f"mqtest/netns/{uuid.uuid4().hex[:8]}"
    record = tmp_path / "received.bin"
    rx_before = link_bytes(pair.rx_ns, pair.rx_dev)[0]
    tx_before = link_bytes(pair.tx_ns, pair.tx_dev)[1]

    rx = roles(pair.rx_ns, "rx", rx_domain, key, f"tcp/{pair.rx_addr}:{PORT}", COUNT, N, record)
    rx.expect("ready")  # listening on its veth address
    tx = roles(pair.tx_ns, "tx", tx_domain, key, f"tcp/{pair.rx_addr}:{PORT}", COUNT, N)
    tx.expect("ready")
    tx_done, rx_done = tx.expect("done"), rx.expect("done")
    assert (tx.finish(), rx.finish()) == (0, 0), f"{tx.stderr}\n{rx.stderr}"

    # nothing left running: not the runtimes' workers, nothing in the namespaces
    ours = {*group_members(tx.proc.pid), *group_members(rx.proc.pid), *netns_pids(pair.rx_ns),
            *netns_pids(pair.tx_ns)}
    left = lingering(sorted(ours), timeout=10.0)
    assert not left, f"processes left behind: {[(p, command_line(p)) for p in left]}"

    for done in (tx_done, rx_done):
        assert done["finished"] and done["failures"] == [] and done["in_use"] == 0, done
    assert tx_done["counters"]["sent"] == COUNT and tx_done["counters"]["unmatched"] == 0, tx_done
    assert tx_done["items"]["tx"] == [COUNT, 0], tx_done
    rx_counters = rx_done["counters"]
    assert rx_counters["received"] == COUNT and rx_counters["next_seq"] == COUNT, rx_done
    assert rx_counters["lost"] == rx_counters["dropped"] == rx_counters["invalid"] == 0, rx_done
    assert rx_counters["stream"] == tx_done["counters"]["stream"] != 0
    assert rx_done["items"]["check"] == [COUNT, 0], rx_done

    rows = np.fromfile(record, dtype="<i8").reshape(-1, netns_roles.ROW)
    assert len(rows) == COUNT
    k = np.arange(COUNT, dtype=np.int64)
    ts = netns_roles.T0 + k * netns_roles.PERIOD
    assert np.array_equal(rows[:, 0], k), "frames out of order, missing or repeated"
    bad = np.flatnonzero(rows[:, 1] != 1)
    assert bad.size == 0, f"{bad.size} frames with a wrong payload, first {rows[bad[0]]}"
    assert np.array_equal(rows[:, 2], ts), "timestamps changed on the way"
    assert np.array_equal(rows[:, 3], ts) and np.array_equal(rows[:, 4], ts + netns_roles.PERIOD - 1)

    # the frames really crossed the veth pair
    payload = COUNT * N * 4
    rx_grew = link_bytes(pair.rx_ns, pair.rx_dev)[0] - rx_before
    tx_grew = link_bytes(pair.tx_ns, pair.tx_dev)[1] - tx_before
    assert rx_grew >= payload and tx_grew >= payload, (rx_grew, tx_grew, payload)
