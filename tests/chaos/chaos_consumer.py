"""An external consumer of the chaos graph: ``python chaos_consumer.py DOMAIN PORT POLICY``.

Attaches to the running graph by its domain name (like any unrelated process), taps
PORT with POLICY ("block" or "drop_oldest"), checks each frame's number and contents,
and reports on stdout, one JSON object a line: ``{"ready": pid}`` once its reader has
joined, ``{"n": received, "last": seq}`` every PROGRESS_EVERY frames, and when the
graph stops ``{"end": true, ...}`` with its totals (received, lost = gaps in the
numbers, dups, corrupt, first, last, drops = what the queue dropped for it).
"""

import json
import os
import sys

from chaos_blocks import frame_seq

import multiqueue

PROGRESS_EVERY = 8


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main(domain: str, port: str, policy: str) -> None:
    received = lost = dups = corrupt = 0
    first = last = None
    with multiqueue.attach(domain, name=f"chaos-{policy}"[:31]) as graph:
        tap = graph.subscribe(port, policy=policy)
        say(ready=os.getpid())
        for frame in tap:  # until the graph stops (the port's queue closes)
            seq = frame_seq(frame.array)
            if seq is None:
                corrupt += 1
                continue
            if last is not None and seq <= last:
                dups += 1
                continue
            if last is not None:
                lost += seq - last - 1
            first = seq if first is None else first
            last = seq
            received += 1
            if received % PROGRESS_EVERY == 0:
                say(n=received, last=last)
        say(end=True, received=received, lost=lost, dups=dups, corrupt=corrupt, first=first, last=last,
            drops=tap.drops)


if __name__ == "__main__":
    main(*sys.argv[1:4])
