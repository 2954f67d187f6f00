"""What the graph's exact edge counts stand on (docs/streams.md, "Counting every item"):
a queue's default reader policy, the process a reader belongs to, the items pushed
while nobody listened, and a departed reader's last counts, after a SIGKILL too."""

import signal

from helpers import run_python, spawn_python
from multiqueue import ShmManager
from multiqueue.stream import PortQueue

READER = """
import sys
from multiqueue import ShmManager
from multiqueue.stream import PortQueue
m = ShmManager(sys.argv[1], create=False, name="slow-viewer", reaper_interval=None)
reader = PortQueue(m, "q", create=False).reader("block")
print(reader.index, reader.joined_seq, flush=True)
sys.stdin.readline()  # the items are pushed
for _ in range(3):
    reader.pop(timeout=10)  # held: the ledger of this process has them
print("popped", flush=True)
sys.stdin.readline()  # killed here
"""


def push(manager: ShmManager, queue: PortQueue, n: int) -> None:
    for _ in range(n):
        queue.push(manager.allocate(8))


def test_a_reader_that_names_no_policy_gets_the_queues_default(domain, manager):
    """A plain queue's readers default to block; a graph's port (default_policy set by
    its runtime) gives a Consumer in another process drop_oldest, named by its process."""
    queue = PortQueue(manager, "q", capacity=4)
    assert queue.default_policy == "block"
    with queue.reader() as reader:
        assert reader.policy == "block"
    queue.default_policy = "drop_oldest"
    code = """
import sys
from multiqueue import Consumer, ShmManager
from multiqueue.stream import PortQueue
with Consumer(sys.argv[1], "q") as consumer:
    stats = PortQueue(consumer.manager, "q", create=False).stats()
    print(consumer.reader.policy, [(r.name, r.policy) for r in stats.readers])
"""
    result = run_python(code, domain)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 1) == ["drop_oldest", "[('consumer', 'drop_oldest')]\n"]
    queue.release()


def test_pushes_with_no_reader_are_unheard_and_only_those(manager):
    queue = PortQueue(manager, "q", capacity=4)
    push(manager, queue, 3)
    assert (queue.pushed, queue.unheard) == (3, 3)
    with queue.reader() as reader:
        assert reader.joined_seq == 0  # the unheard items took no sequence number
        push(manager, queue, 2)
        assert (queue.pushed, queue.unheard) == (5, 3)
        for _ in range(2):
            reader.pop(timeout=1).release()
    push(manager, queue, 1)
    assert (queue.pushed, queue.unheard) == (6, 4)
    queue.release()


def test_a_sigkilled_readers_last_counts_cover_every_item_it_was_sent(domain, manager):
    """Killed with 3 items popped (held) and 5 unread: its departed totals say so, and the
    detach they make releases the unread ones."""
    queue = PortQueue(manager, "q", capacity=16)
    push(manager, queue, 2)  # before it joins: not its items
    proc = spawn_python(READER, domain)
    try:
        index, joined = map(int, proc.stdout.readline().split())
        push(manager, queue, 8)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "popped\n", proc.stderr.read()
        assert queue.stats().readers[0].name == "slow-viewer"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    totals = queue.departed(index, proc.pid, joined)
    assert (totals.popped, totals.drops, totals.end - joined) == (3, 0, 8)
    assert queue.reader_count == 0
    assert queue.departed(index, proc.pid + 1, joined) is None  # another process's reader: not this one
    manager.reap()  # the 3 it held, from its ledger
    assert sum(p.blocks_used for p in manager.get_stats().pool_stats) == 0
    queue.release()
