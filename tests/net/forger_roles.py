"""Roles for tests/net/test_bridge_forged.py, each a separate interpreter.

    python tests/net/forger_roles.py forger DOMAIN KEY --connect EP --ahead A [--n 256]
    python tests/net/forger_roles.py tx DOMAIN KEY --connect EP --count N [--pace S] [--hold-at H]
                                     [--die-at K --marker PATH]
    python tests/net/forger_roles.py rx DOMAIN KEY --listen EP --record PATH [--switch-after S] [--no-end]

``forger`` publishes on KEY what a second publisher could: it learns the followed stream's id
and next number from the receivers' progress answers (what any Zenoh peer can ask), and each
time the receiver moved on it puts one round of forged samples (``forge``).  It reports
{"event": "ready"} once its publisher reaches a receiver, {"event": "forging", ...} at its
first round, and on "stop" (stdin) {"event": "done", "sent": samples put, "rounds": ...}.
``tx`` / ``rx`` are tests/net/bridge_roles.py's (stdin: "release" a held ramp, "stop"), with a
sender restarted after a SIGKILL (``--die-at K``: its BridgeSink kills itself once, before
sending frame K) and a receiver that follows streams after their end (``--no-end``) or takes
another after ``--switch-after``.
DOMAIN is unused by the forger (it makes no shared memory).
"""

import argparse
import os
import queue
import secrets
import sys
import threading
import time

import numpy as np
from bridge_roles import Recorder, StampedRamp, payload, report, summary

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: graph_blocks
from graph_blocks import die_once  # noqa: E402

from multiqueue.errors import BlockError
from multiqueue.graph import Runtime
from multiqueue.net import BridgeSink, BridgeSource, ZenohSettings, wire
from multiqueue.net.bridge import receiver_key
from multiqueue.net.settings import close_session, json_replies, open_session

FAR = 1 << 40  # beyond any real gap


class DiesBeforeFrame(BridgeSink):
    """A BridgeSink that SIGKILLs itself once, before sending frame ``at`` (a marker file
    keeps its restarted successor alive): a restarted sender, new process and Zenoh session."""

    def __init__(self, *args, at: int, marker: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.marker = at, marker

    def work(self, inputs):
        if self.counter("seq") >= self.at:
            die_once(self.marker)
        return super().work(inputs)


def forge(stream: int, seq: int, ahead: int, n: int) -> list[tuple[bytes, bytes | None]]:
    """One round of forged samples (payload, attachment) against a receiver whose next
    frame of ``stream`` is ``seq`` or later; none may reach its output."""
    good, other = payload(seq, n).tobytes(), secrets.randbits(62) + 1
    fake = np.zeros(n, np.float32).tobytes()  # a frame the sender never sent

    def frame(stream_, seq_, dtype=np.float32, end=False):
        return wire.encode(stream_, seq_, 0, None, dtype, (0,) if end else (n,), end=end)

    return [
        (good, frame(other, seq)),  # a made-up stream, in step with the real one
        (b"", frame(other, seq, end=True)),  # its end marker
        (fake, frame(stream, seq - 1)),  # the real stream's id, a number already had
        (b"", frame(stream, seq - 1, end=True)),  # an end marker below the count delivered
        (fake, frame(stream, seq + FAR)),  # out of range
        (b"", frame(stream, seq + FAR, end=True)),
        (fake[:-4], frame(stream, seq)),  # a wrong size
        (fake, frame(stream, ahead, np.int16)[:-1]),  # a cut header
        (b"\x00" * 8, frame(stream, ahead, np.int16)[:40] + b"garbage"),
        (fake, None),  # no attachment
        (fake, frame(stream, ahead, np.int32)),  # a dtype the stream never had, ahead
        (fake, frame(stream, ahead)),  # a lone frame ahead (held, then refuted by the next one)
    ]


def progress(session, key: str) -> tuple[int, int] | None:
    """(stream, next_seq) of the receiver of ``key`` that is furthest on, or None."""
    answers = [a for _, a in json_replies(session.get(receiver_key(key), timeout=2.0)) if isinstance(a, dict)]
    answers = [a for a in answers if a.get("stream") and a.get("next_seq", 0) > 0]
    return max(((a["stream"], a["next_seq"]) for a in answers), key=lambda a: a[1], default=None)


def run_forger(args, commands: queue.Queue) -> None:
    import zenoh

    session = open_session(ZenohSettings.of({"connect": [args.connect]}))
    publisher = session.declare_publisher(args.key, congestion_control=zenoh.CongestionControl.BLOCK,
                                          reliability=zenoh.Reliability.RELIABLE)
    while not publisher.matching_status.matching:
        time.sleep(0.01)  # Zenoh announces no match to a poller of matching_status
    report("ready", pid=os.getpid())
    sent = rounds = last = 0
    while commands.empty():
        seen = progress(session, args.key)
        if seen is None or seen[1] <= last:  # the stream did not move on: forge only while it flows
            time.sleep(0.002)
            continue
        (stream, last), rounds = seen, rounds + 1
        if rounds == 1:
            report("forging", stream=stream, next_seq=last)
        for data, attachment in forge(stream, last, args.ahead, args.n):
            publisher.put(data, attachment=attachment)
            sent += 1
    close_session(session)
    report("done", sent=sent, rounds=rounds)


def build(args) -> Runtime:
    rt = Runtime(args.domain, drain_timeout=3.0)
    z = {"listen": [args.listen]} if args.listen else {"connect": [args.connect]}
    if args.role == "tx":
        src = rt.add(StampedRamp(args.count, args.n, args.pace, args.hold_at), "src")
        sink = (BridgeSink(args.key, zenoh=z) if args.die_at is None else
                DiesBeforeFrame(args.key, zenoh=z, at=args.die_at, marker=args.marker))
        tx = rt.add(sink, "tx", restart="restart")
        rt.connect(src["out"], tx["in"])
    else:
        source = BridgeSource(args.key, dtype=np.float32, zenoh=z, end=not args.no_end,
                              switch_after=args.switch_after)
        rx = rt.add(source, "rx")
        rt.connect(rx["out"], rt.add(Recorder(args.record, args.n), "rec")["in"])
    return rt


def run_graph(args, commands: queue.Queue) -> None:
    rt = build(args)
    rt.start()
    report("ready", pid=os.getpid(), pids={name: b.pid for name, b in rt.stats().blocks.items()})
    error = None
    try:
        while not rt.wait(0.05):
            command = None if commands.empty() else commands.get()
            if command == "release":
                rt.set_parameter("src", "hold_at", -1)
            elif command == "stop":
                rt.stop()
    except BlockError as e:
        error = str(e)
    blocks = summary(rt.final_stats) if rt.final_stats is not None else {}
    report("done", blocks=blocks, counters={name: b["counters"] for name, b in blocks.items()},
           error=error, failures=[str(f) for f in rt.failures], blocks_in_use=rt.blocks_in_use_at_end)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("forger", "tx", "rx"))
    parser.add_argument("domain")
    parser.add_argument("key")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen")
    where.add_argument("--connect")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--ahead", type=int, default=1 << 30)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--pace", type=float, default=0.0)
    parser.add_argument("--hold-at", type=int, default=-1)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--marker")
    parser.add_argument("--record")
    parser.add_argument("--switch-after", type=float, default=5.0)
    parser.add_argument("--no-end", action="store_true")
    args = parser.parse_args()

    commands: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [commands.put(line.strip()) for line in sys.stdin], daemon=True).start()
    (run_forger if args.role == "forger" else run_graph)(args, commands)


if __name__ == "__main__":
    main()
