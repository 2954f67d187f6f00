"""A bridge receiver takes frames only from the stream it follows (issue 20).

A forger (tests/net/forger_roles.py, another interpreter with its own Zenoh session) publishes
on the bridged key what a second publisher can: made-up streams, the real stream's id with
numbers already had or out of range, wrong sizes and dtypes, cut or garbage headers, end
markers.  None of it reaches the receiver's output, each sample counts as invalid, the real
stream arrives complete.  A restarted sender (same stream, new process and session) and a new
run of the sender (a new stream after an end marker, or after the old one went silent) are
still followed.  Waits are on role reports, exits, or counters with a deadline.
"""

import sys
from pathlib import Path

import pytest
import test_bridge
from bridge_roles import read_record
from test_bridge import (
    WAIT,
    Role,
    check_frames,
    endpoint,
    free_port,
    receiver_counters,
    record_lines,
    wait_for_exit,
    wait_until,
)

from helpers import RoleProcess
from multiqueue import ShmManager, attach

FORGER_ROLES = str(Path(__file__).with_name("forger_roles.py"))
key, new_domain, roles = test_bridge.key, test_bridge.new_domain, test_bridge.roles  # its fixtures


class ForgerRole(Role):
    """A tests/net/forger_roles.py process (the same reports as bridge_roles' roles)."""

    def __init__(self, role: str, domain: str, key: str, *args):
        RoleProcess.__init__(self, role, [sys.executable, FORGER_ROLES, role, domain, key, *map(str, args)])
        self.role, self.domain = role, domain
        self.pid, self.pids = None, {}


@pytest.fixture
def forged_roles(new_domain):
    """Start forger_roles.py processes (each in a new domain); stopped at the end."""
    started: list[ForgerRole] = []

    def start(role: str, key: str, *args) -> ForgerRole:
        started.append(ForgerRole(role, new_domain(), key, *args))
        return started[-1]

    yield start
    for role in started:
        role.stop()


def test_a_forger_on_the_key_gets_nothing_delivered_and_the_stream_arrives_complete(
        roles, forged_roles, key, tmp_path):
    port, rec, count, hold = free_port(), tmp_path / "rec.txt", 3000, 2000
    rx = roles("rx", key, "--listen", endpoint(port), "--record", rec).ready()
    forger = forged_roles("forger", key, "--connect", endpoint(port), "--ahead", 1_000_000)
    forger.expect("ready")
    tx = roles("tx", key, "--connect", endpoint(port), "--count", count, "--pace", 0.001,
               "--hold-at", hold).ready()
    forger.expect("forging")  # it forges each time the receiver moved on, until told to stop
    wait_until(lambda: record_lines(rec) >= hold, f"{hold} frames recorded", watch=(tx, rx))
    forger.send("stop")
    forged = forger.expect("done")
    assert forged["rounds"] > 10, forged  # the forging went on with the stream, not at its edge
    # every forged sample is counted, but a lone frame ahead only once a later one refutes it
    wait_until(lambda: receiver_counters(rx.domain)["invalid"] >= forged["sent"] - 1,
               "the receiver to count the forged samples", watch=(tx, rx))
    tx.send("release")
    sent, got = tx.done(), rx.done()

    assert check_frames(read_record(rec)) == list(range(count))  # nothing forged, nothing lost
    c = got["counters"]["rx"]
    assert (c["received"], c["lost"], c["invalid"]) == (count, 0, forged["sent"]), c
    assert c["stream"] == sent["counters"]["tx"]["stream"] and c["next_seq"] == count
    assert got["failures"] == []


def test_a_restarted_sender_goes_on_with_its_stream(forged_roles, key, tmp_path):
    """A sender SIGKILLed and restarted: a new process and Zenoh session, the same stream
    and numbers.  The receiver follows it to the end of the stream."""
    port, rec, count = free_port(), tmp_path / "rec.txt", 2000
    rx = forged_roles("rx", key, "--listen", endpoint(port), "--record", rec).ready()
    tx = forged_roles("tx", key, "--connect", endpoint(port), "--count", count, "--hold-at", 1000,
                      "--die-at", 700, "--marker", tmp_path / "killed").ready()
    # a restarted block starts at its input's latest frame: hold the ramp until it runs again
    wait_until(lambda: block_stats(tx.domain, "tx").restarts == 1 and block_stats(tx.domain, "tx").state
               == "running", "the sender to run again", watch=(tx, rx))
    tx.send("release")
    sent, got = tx.done(), rx.done()

    indices = check_frames(read_record(rec))
    assert indices[0] == 0 and indices[-1] == count - 1, indices
    c, s = got["counters"]["rx"], sent["counters"]["tx"]
    assert c["stream"] == s["stream"] and s["seq"] > 1000, (c, s)
    assert (c["received"], c["invalid"], c["next_seq"]) == (len(indices), 0, s["seq"]), (c, s)
    # frames lost are counted (received + lost == frames numbered): the ones the killed sender had
    # put and Zenoh not yet sent, and at times the first few the restarted one put
    assert [k for k in indices if k >= 1000] == list(range(1000, count)), "frames lost after the restart"


def block_stats(domain: str, block: str):
    with attach(domain, name="test") as graph:
        return graph.stats().blocks[block]


def test_a_new_run_after_the_end_marker_is_followed_at_once(forged_roles, key, tmp_path):
    port, rec = free_port(), tmp_path / "rec.txt"
    rx = forged_roles("rx", key, "--listen", endpoint(port), "--record", rec, "--no-end").ready()
    first = forged_roles("tx", key, "--connect", endpoint(port), "--count", 300).ready().done()
    second = forged_roles("tx", key, "--connect", endpoint(port), "--count", 200).ready().done()
    wait_until(lambda: record_lines(rec) >= 500, "both runs recorded", watch=(rx,))
    rx.send("stop")
    got = rx.done()

    assert [r[0] for r in read_record(rec)] == list(range(300)) + list(range(200))
    c = got["counters"]["rx"]
    assert first["counters"]["tx"]["stream"] != second["counters"]["tx"]["stream"] == c["stream"]
    assert (c["received"], c["lost"], c["invalid"]) == (500, 0, 0), c


def test_a_new_run_after_a_killed_sender_is_followed_once_the_old_stream_went_silent(
        forged_roles, key, tmp_path):
    """No end marker from a SIGKILLed sending runtime: the new run's frames are invalid
    until the old stream was silent for switch_after seconds, then followed to its end."""
    port, rec, count = free_port(), tmp_path / "rec.txt", 3000
    rx = forged_roles("rx", key, "--listen", endpoint(port), "--record", rec, "--no-end",
                      "--switch-after", 2).ready()
    old = forged_roles("tx", key, "--connect", endpoint(port), "--count", 1_000_000, "--pace", 0.001).ready()
    wait_until(lambda: record_lines(rec) >= 100, "100 frames recorded", watch=(old, rx))
    old.proc.kill()  # the runtime: its workers see it gone and leave
    old.proc.wait(timeout=WAIT)
    wait_for_exit(old.pids.values())
    ShmManager.cleanup(old.domain)  # what the dead runtime left
    new = forged_roles("tx", key, "--connect", endpoint(port), "--count", count, "--pace", 0.001).ready()
    sent = new.done()  # its linger: until the receiver reported every frame
    rx.send("stop")
    got = rx.done()

    c = got["counters"]["rx"]
    assert c["stream"] == sent["counters"]["tx"]["stream"] and c["next_seq"] == count, c
    # the new run's frames before the switch are invalid (not lost: frames of no followed stream)
    switched_at, indices = c["invalid"], check_frames_of_runs(read_record(rec))
    assert indices[1] == list(range(switched_at, count)), (switched_at, indices[1][:3])
    assert indices[0] == list(range(len(indices[0]))) and len(indices[0]) >= 100
    assert c["lost"] == 0 and c["received"] == len(indices[0]) + len(indices[1]), c


def check_frames_of_runs(rows) -> list[list[int]]:
    """The frame indices of each run in a record (a run starts where an index does not grow)."""
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][0] <= rows[i - 1][0]:
            runs.append(check_frames(rows[start:i]))
            start = i
    return runs
