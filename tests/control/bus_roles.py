"""Roles for the message bus tests, each a separate interpreter attaching to the domain by name.

    python tests/bus_roles.py publisher  DOMAIN TOPIC             (stdin: "go N" ..., "quit")
    python tests/bus_roles.py subscriber DOMAIN TOPIC --capacity C --until N [--publishers P] (then "quit")
    python tests/bus_roles.py stuck      DOMAIN TOPIC --capacity C (stdin: "report")
    python tests/bus_roles.py victim     DOMAIN TOPIC --capacity C --read K
    python tests/bus_roles.py server     DOMAIN TOPIC
    python tests/bus_roles.py inbox      DOMAIN NAME

Messages are JSON objects ``{"n": k}``, k counting from 0 per publisher.  Each role
reports on stdout, one JSON object per line with an "event" key, for the test to follow;
the first is {"event": "ready", "pid": ...} once it is subscribed (or ready to publish).
"""

import argparse
import json
import os
import sys
import threading
import time

from multiqueue import ShmManager
from multiqueue.control.bus import BUS_POOL, Bus


def report(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def attach(args) -> tuple[ShmManager, Bus]:
    m = ShmManager(args.domain, name=args.role, create=False, reaper_interval=None)
    return m, Bus(m)


def leave(m: ShmManager, bus: Bus) -> None:
    bus.close()
    m.shutdown()
    report("done")


def publisher(args) -> None:
    """For each "go N" line publish the next N numbered messages in one go (no waits)."""
    m, bus = attach(args)
    report("ready", pid=os.getpid())
    n = 0
    for line in sys.stdin:
        words = line.split()
        if words[0] == "quit":
            break
        count = int(words[1])
        longest = 0.0
        t0 = time.monotonic()
        try:
            for _ in range(count):
                t = time.monotonic()
                bus.publish(args.topic, {"n": n})
                longest = max(longest, time.monotonic() - t)
                n += 1
        except Exception as e:  # report it: the test shows what stopped the publisher
            report("error", error=f"{type(e).__name__}: {e}", published=n)
            continue
        report("published", count=count, longest=longest, total=time.monotonic() - t0)
    leave(m, bus)


def subscriber(args) -> None:
    """Read until every one of --publishers senders delivered message --until - 1; check
    each sender's messages arrive in its order, none missing."""
    m, bus = attach(args)
    sub = bus.subscribe(args.topic, capacity=args.capacity)
    report("ready", pid=os.getpid())
    last_n: dict[int, int] = {}
    last_seq: dict[int, int] = {}
    counts: dict[int, int] = {}
    problems: list[str] = []
    finished = set()
    while len(finished) < args.publishers:
        msg = sub.get(timeout=30.0)
        if msg is None:
            problems.append(f"nothing for 30 s after {counts}")
            break
        pid, n = msg.sender_pid, msg.data["n"]
        # in order, none missing (--lossy: in order; what is missing is counted in drops)
        gap = n <= last_n.get(pid, -1) if args.lossy else n != last_n.get(pid, -1) + 1
        if gap or msg.seq <= last_seq.get(pid, -1):
            if len(problems) < 10:
                problems.append(f"sender {pid}: n {n} seq {msg.seq} after n {last_n.get(pid)} "
                                f"seq {last_seq.get(pid)}")
        last_n[pid], last_seq[pid] = n, msg.seq
        counts[pid] = counts.get(pid, 0) + 1
        if n == args.until - 1:
            finished.add(pid)
    report("received", counts={str(p): c for p, c in counts.items()}, problems=problems,
           drops=sub.drops, pending=sub.pending)
    sys.stdin.readline()  # stay subscribed until told ("quit")
    leave(m, bus)


def stuck(args) -> None:
    """Subscribe and read nothing until told; then report, read what is there, report."""
    m, bus = attach(args)
    sub = bus.subscribe(args.topic, capacity=args.capacity)
    report("ready", pid=os.getpid())
    sys.stdin.readline()
    report("stuck", drops=sub.drops, pending=sub.pending)
    read = []
    while (msg := sub.get(timeout=0)) is not None:
        read.append(msg.data["n"])
    report("read", ns=read, drops=sub.drops, pending=sub.pending)
    leave(m, bus)


def victim(args) -> None:
    """Hold a bus block (as if killed mid-publish), read --read messages, then hang."""
    m, bus = attach(args)
    sub = bus.subscribe(args.topic, capacity=args.capacity)
    held = m.allocate_from_pool(BUS_POOL)  # noqa: F841  (held until the process dies)
    report("ready", pid=os.getpid())
    last = None
    for _ in range(args.read):
        last = sub.get(timeout=30.0).data["n"]
    report("holding", last=last, pending=sub.pending)
    sys.stdin.readline()  # until killed


def server(args) -> None:
    """Answer requests on TOPIC from a callback subscription (as a block serves ctl-<name>)."""
    m, bus = attach(args)
    stop = threading.Event()

    def handle(msg):
        cmd = msg.data["cmd"]
        if cmd == "add":
            bus.reply(msg, {"sum": msg.data["a"] + msg.data["b"], "pid": os.getpid()})
        elif cmd == "echo":
            bus.reply(msg, msg.data["data"])
        elif cmd == "bytes":
            bus.reply(msg, bytes(i % 251 for i in range(msg.data["size"])))
        elif cmd == "boom":
            raise RuntimeError("boom: a failing request handler")
        elif cmd == "stop":
            bus.reply(msg, {"stopped": True})
            stop.set()

    bus.subscribe(args.topic, callback=handle)
    report("ready", pid=os.getpid())
    stop.wait()
    leave(m, bus)


def inbox(args) -> None:
    """Acknowledge each {"from": X, "n": k} with {"ack": k, "by": NAME} to X's inbox, until "stop"."""
    m, bus = attach(args)
    box = bus.inbox(args.topic)
    report("ready", pid=os.getpid())
    count = 0
    while (msg := box.get(timeout=30.0)) is not None and msg.data != "stop":
        bus.send(msg.data["from"], {"ack": msg.data["n"], "by": args.topic})
        count += 1
    report("acked", count=count)
    leave(m, bus)


def main() -> None:
    roles = {f.__name__: f for f in (publisher, subscriber, stuck, victim, server, inbox)}
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=sorted(roles))
    parser.add_argument("domain")
    parser.add_argument("topic", help="the topic (inbox: the inbox name)")
    parser.add_argument("--capacity", type=int, default=None)
    parser.add_argument("--lossy", action="store_true", help="subscriber: messages may be dropped")
    parser.add_argument("--until", type=int, default=0, help="subscriber: the count each publisher sends")
    parser.add_argument("--publishers", type=int, default=1)
    parser.add_argument("--read", type=int, default=0)
    args = parser.parse_args()
    roles[args.role](args)


if __name__ == "__main__":
    main()
