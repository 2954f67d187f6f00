"""Transport benchmark: multiqueue side by side with multiprocessing.Queue, faster-fifo, pyzmq, iceoryx2.

    python benchmarks/transport.py [--quick] [--json [PATH]] [--runs 3] [--duration 1.0]
                                   [--round-trips 20000] [--transports multiqueue,pyzmq,...]

Every producer and consumer is a separate process (multiprocessing "spawn") attaching
to the transport by name: a new set of processes per (transport, size, fan-out), whose
runs follow one another, and per round-trip run.  Every figure is the median of --runs
runs; figures compared with each other are measured close in time.  Ctrl-C (or SIGTERM)
stops the workers and removes what the run left in /dev/shm.

* Throughput, "head/tail": payloads of 64 B, 4 KiB, 64 KiB, 1 MiB, 8 MiB; 1 producer ->
  1 consumer and 1 -> 3 consumers.  The producer writes the message's sequence number in
  its first and last 8 bytes, every consumer reads both and checks them.  A run lasts
  --duration seconds (or --max-messages); messages/s = messages sent / (first send to
  the last consumer's receipt of the end marker); every consumer must have received
  every message, in order.
* Throughput, "fill": the producer fills the whole payload (numpy, u64 words = sequence
  number), each consumer sums it and checks the sum: GB/s per consumer, 64 KiB..8 MiB.
* Round trip: 64 B ping-pong between two processes (A sends on one channel, B receives
  it and sends a reply on another, A receives it), p50/p99 over --round-trips after a
  warm-up, with blocking receives and with busy-poll receives.

Targets (issue "transport benchmark"): multiqueue messages/s >= iceoryx2's at every
size, 1->1 and 1->3; busy-poll round trip p50 <= iceoryx2's; blocking round trip p50
<= 25 us; >= 10x multiprocessing.Queue messages/s from 64 KiB up.
"""

import argparse
import math
import multiprocessing
import os
import statistics
import sys
from dataclasses import dataclass

import numpy as np
from _common import (
    Harness,
    KiB,
    MiB,
    Session,
    add_json_option,
    add_message_options,
    attach,
    clock,
    fmt_rate,
    fmt_ratio,
    fmt_size,
    median,
    print_errors,
    print_header,
    print_verdicts,
    remove_domains,
    target,
    time_round_trips,
    worker,
)
from _transport_peers import BAD, END, HELLO, QUIT, Endpoint, available_peers, expected_sum, iceoryx_prefix

from multiqueue import PoolConfig, ShmConfig, ShmManager
from multiqueue.stream import PortQueue
from multiqueue.stream.queue import _SPIN_S

SIZES = [64, 4 * KiB, 64 * KiB, 1 * MiB, 8 * MiB]
FILL_SIZES = [64 * KiB, 1 * MiB, 8 * MiB]
FANOUTS = [1, 3]
RT_SIZE = 64
RT_DEPTH = 16
TARGET_BLOCKING_RT_US = 25.0
TARGET_VS_MP = 10.0


def depth_for(size: int) -> int:
    """Messages a consumer may have outstanding (queue capacity, HWM, subscriber buffer):
    256, fewer for large payloads so a queue stays <= 64 MiB (a power of two, >= 8)."""
    return max(8, min(256, 1 << int(math.log2(64 * MiB // size))))


# -- multiqueue ---------------------------------------------------------------------------


class MultiQueueHub:
    """A domain per set of processes with one pool of blocks of the message size; a
    PortQueue per channel, every consumer a reader of it (multicast: one buffer per message
    whatever the number of consumers)."""

    name = "multiqueue"
    fanout_note = "one PortQueue, 3 readers (multicast: one buffer per message, no copies)"
    access_note = ("allocate + memoryview() slices + push / pop + memoryview() slices + release; "
                   "fill: buffer.numpy(np.uint64)")

    def __init__(self, ctx, tag: str, size: int, depth: int, channels: int, workdir: str):
        self.size, self.depth = size, depth
        self.domain = f"tb{os.getpid()}-{tag}"
        # per channel: the ring, one buffer held by each side, and some slack
        pool = PoolConfig("msg", size, channels * (depth + 8))
        self.manager = ShmManager(self.domain, ShmConfig(pools=[pool], max_buffers=2 * pool.block_count),
                                  reaper_interval=None, name="transport-bench")
        self._queues = []

    def channel(self, name: str, consumers: int, wait: str) -> "MultiQueueSpec":
        self._queues.append(PortQueue(self.manager, name, capacity=self.depth))
        return MultiQueueSpec(self.domain, name, self.size, wait)

    def close(self) -> None:
        self._queues.clear()
        self.manager.shutdown()
        remove_domains(self.domain)  # in case a worker was killed


@dataclass
class MultiQueueSpec:
    domain: str
    queue: str
    size: int
    wait: str

    def open_sender(self, fill: bool) -> Endpoint:
        m = attach(self.domain, f"transport-{os.getpid()}")
        q = PortQueue(m, self.queue, create=False)
        allocate, push, size = m.allocate, q.push, self.size
        if fill:
            def send(seq):
                b = allocate(size)
                b.numpy(np.uint64).fill(seq)
                push(b)
        else:
            def send(seq):
                b = allocate(size)
                v = b.memoryview()
                h = seq.to_bytes(8, "little")
                v[:8] = h
                v[-8:] = h
                push(b)
        return Endpoint(send=send)

    def open_receiver(self, index: int, fill: bool) -> Endpoint:
        m = attach(self.domain, f"transport-{os.getpid()}")
        q = PortQueue(m, self.queue, create=False)
        reader = q.reader(policy="block", busy_poll=self.wait == "busy")
        pop = reader.pop
        if fill:
            def recv():
                b = pop()
                words = b.numpy(np.uint64)
                seq = int(words[0])
                ok = int(words.sum()) == expected_sum(seq, words.nbytes)
                b.release()
                return seq if ok else BAD
        else:
            def recv():
                b = pop()
                v = b.memoryview()
                head = int.from_bytes(v[:8], "little")
                tail = int.from_bytes(v[-8:], "little")
                b.release()
                return head if head == tail else BAD
        return Endpoint(recv=recv, close=reader.detach)


# -- worker processes ---------------------------------------------------------------------


@worker
def consumer_main(spec, index: int, fill: bool, conn) -> None:
    """Receive runs until QUIT; after each run's END report (count, bad, end time)."""
    endpoint = spec.open_receiver(index, fill)
    recv = endpoint.recv
    conn.send("ready")
    while recv() != HELLO:
        pass
    conn.send("hello")
    while True:
        n = bad = 0
        while (seq := recv()) < END:
            if seq != n:  # every message, in order: the n-th carries n
                bad += 1
            n += 1
        if seq == QUIT:
            break
        conn.send((n, bad, clock()))
    conn.send("bye")  # got QUIT: the producer may close now
    endpoint.close()


@worker
def producer_main(spec, size: int, fill: bool, conn) -> None:
    """For each ("run", seconds, min, max): send 0, 1, 2... for the seconds (at least min
    messages, at most max), then END."""
    endpoint = spec.open_sender(fill)
    send = endpoint.send
    check = 0 if size >= 64 * KiB else 15  # look at the clock every message, or every 16
    send(HELLO)  # every consumer receives one message before the first run (see HELLO)
    conn.send("ready")
    while (command := conn.recv())[0] == "run":
        _, seconds, min_messages, max_messages = command
        seq = 0
        t0 = clock()
        deadline = t0 + int(seconds * 1e9)
        while seq < max_messages:
            send(seq)
            seq += 1
            if not seq & check and clock() >= deadline and seq >= min_messages:
                break
        send(END)
        conn.send((seq, t0))
    send(QUIT)
    conn.recv()  # "close": every consumer has received QUIT (some transports drop
    endpoint.close()  # what is in flight when the sender closes)


@worker
def pong_main(ping, pong, conn) -> None:
    """Round trip, side B: receive on ``ping``, reply with the same sequence on ``pong``."""
    rx = ping.open_receiver(0, False)
    conn.send("ready")
    conn.recv()  # "connect": side A's receiver exists now
    tx = pong.open_sender(False)
    conn.send("ready")
    recv, send = rx.recv, tx.send
    while (seq := recv()) != QUIT:
        send(seq)
    conn.send("bye")
    tx.close()
    rx.close()


@worker
def ping_main(ping, pong, conn) -> None:
    """Round trip, side A: for each ("run", warm-up, count) time count round trips."""
    rx = pong.open_receiver(0, False)
    conn.send("ready")
    conn.recv()
    tx = ping.open_sender(False)
    conn.send("ready")
    while (command := conn.recv())[0] == "run":
        _, warmup, count = command
        conn.send(time_round_trips(tx.send, rx.recv, warmup, count))
    tx.send(QUIT)
    conn.recv()  # "close": side B has received QUIT
    tx.close()
    rx.close()


# -- measurements -------------------------------------------------------------------------


def throughput(ctx, hub_class, size, fanout, fill, args, tag, workdir) -> list[float]:
    """Messages/s of each of args.runs runs, after a warm-up run that goes at least twice
    through the buffers a transport may cycle through (first touches of shared memory)."""
    depth = depth_for(size)
    with Session(ctx, hub_class(ctx, tag, size, depth, 1, workdir)) as s:
        spec = s.resource.channel("tp", fanout, "stream")
        consumers = [s.start(consumer_main, spec, i, fill) for i in range(fanout)]
        for c in consumers:
            c.expect()
        producer = s.start(producer_main, spec, size, fill)
        producer.expect()
        for c in consumers:
            c.expect()  # "hello": connected from both ends
        rates = []
        for run in range(1 + args.runs):
            if run == 0:
                producer.send(("run", args.warmup, 2 * (depth + 8), args.max_messages))
            else:
                producer.send(("run", args.duration, 0, args.max_messages))
            sent, t0 = producer.expect()
            reports = [c.expect() for c in consumers]
            for i, (n, bad, _) in enumerate(reports):
                if n != sent or bad:
                    raise RuntimeError(f"consumer {i} received {n} of {sent} messages, {bad} bad")
            if run:
                rates.append(sent * 1e9 / (max(end for _, _, end in reports) - t0))
        producer.send(("quit",))
        for c in consumers:
            c.expect()  # "bye"
        producer.send("close")
        return rates


def round_trip(ctx, hub_class, wait, args, tag, workdir) -> list[tuple[float, float]]:
    """[(p50, p99)] in microseconds of one run (a new pair of processes per run, so that the
    runs of the transports can be interleaved)."""
    with Session(ctx, hub_class(ctx, tag, RT_SIZE, RT_DEPTH, 2, workdir)) as s:
        ping, pong = s.resource.channel("ping", 1, wait), s.resource.channel("pong", 1, wait)
        b = s.start(pong_main, ping, pong)
        b.expect()
        a = s.start(ping_main, ping, pong)
        a.expect()
        for side in (b, a):
            side.send("connect")
            side.expect()
        a.send(("run", args.round_trips // 10, args.round_trips))
        p50, p99, bad = a.expect()
        if bad:
            raise RuntimeError(f"{bad} replies carried the wrong sequence number")
        a.send(("quit",))
        b.expect()  # "bye"
        a.send("close")
        return [(p50, p99)]


# -- report -------------------------------------------------------------------------------


def fmt_p50(p50_p99: tuple[float, float] | None) -> str:
    return "-" if p50_p99 is None else f"{p50_p99[0]:.2f} us"


def print_rate_table(title: str, results: dict, names: list[str], sizes, unit: str, scale) -> None:
    """Rows of (size, fan-out): each transport's median, then multiqueue / each peer."""
    peers = [n for n in names if n != "multiqueue"]
    print(f"\n{title}")
    header = f"{'size':>7} {'fan':>4}" + "".join(f"{n:>12}" for n in names)
    header += "  |" + "".join(f"{'mq/' + n:>15}" for n in peers)
    print_header(header)
    for size in sizes:
        for fanout in FANOUTS:
            med = {n: median(results.get((n, size, fanout))) for n in names}
            shown = {n: None if med[n] is None else scale(med[n], size) for n in names}
            row = f"{fmt_size(size):>7} {f'1->{fanout}':>4}"
            row += "".join(f"{'-' if shown[n] is None else unit.format(shown[n]):>12}" for n in names)
            row += "  |" + "".join(f"{fmt_ratio(med.get('multiqueue'), med[n]):>15}" for n in peers)
            print(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_message_options(ap)
    ap.add_argument("--transports", help="comma-separated subset of the transports")
    ap.add_argument("--sizes", help="comma-separated payload sizes in bytes (default 64 B..8 MiB)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: headtail,fill,rt")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 1 min): 64 B and 1 MiB, 1 run of 0.1 s, 2,000 round trips "
                         "(overrides --sizes, --runs, --duration, --warmup, --round-trips)")
    add_json_option(ap, "transport")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else SIZES
    fill_sizes = [s for s in sizes if s in FILL_SIZES] if args.sizes else FILL_SIZES
    if args.quick:
        args.runs, args.duration, args.warmup, args.round_trips = 1, 0.1, 0.05, 2_000
        sizes, fill_sizes = [64, 1 * MiB], [1 * MiB]
    skip = set(filter(None, args.skip.split(",")))

    peers, notes = available_peers()
    hubs = [MultiQueueHub, *peers]
    if args.transports:
        wanted = args.transports.split(",")
        hubs = [h for h in hubs if h.name in wanted]
    names = [h.name for h in hubs]

    harness = Harness("transport", shm_prefixes=[f"mq.tb{os.getpid()}-"])
    print(f"{args.runs} run(s) per figure (median); throughput runs of {args.duration} s "
          f"(<= {args.max_messages:,} messages) after a {args.warmup} s warm-up run; "
          f"round trips: {args.round_trips:,} per run after {args.round_trips // 10:,}")
    for note in notes:
        print(f"NOTE: {note}")
    print("How each transport is used:")
    for h in hubs:
        print(f"  {h.name:<12} 1->3: {h.fanout_note}")
        print(f"  {'':<12} access: {h.access_note}")
    print(f"Queue depth per consumer (messages): "
          f"{', '.join(f'{fmt_size(s)}: {depth_for(s)}' for s in sizes)}; round trips: {RT_DEPTH}.")
    print(f"Throughput consumers use blocking receives (multiqueue: reader spins {_SPIN_S * 1e6:.0f} us, "
          "then sleeps on a futex), except iceoryx2's, which poll receive() and sched_yield() when "
          "empty (its subscriber has no blocking receive; event-driven waits cost a notification "
          "per message). 1->3 messages/s: messages per second received by each of the 3 consumers.")
    sys.stdout.flush()

    ctx = multiprocessing.get_context("spawn")
    results: dict = {"headtail": {}, "fill": {}, "rt": {}}

    def measure(kind, label, key, fn, *fn_args):
        values = harness.measure(f"{kind} {label}", fn, ctx, *fn_args, args, harness.tag(), harness.workdir,
                                 brief=lambda values: f"{kind:<8} {label:<30} {_brief(kind, values)}")
        if values is not None:
            results[kind].setdefault(key, []).extend(values)

    # Figures compared with each other are measured close in time (the machine drifts):
    # throughput: every transport for one size and fan-out in turn, iceoryx2 (the target's
    # reference) right after multiqueue; round trips: the runs of all transports interleaved.
    measure_order = sorted(hubs, key=lambda h: (h.name != "multiqueue", h.name != "iceoryx2"))
    with harness:
        # its iceoryx2 segments are expected (nodes do not remove their global management file)
        harness.also_remove.append(iceoryx_prefix(harness.workdir))
        for kind, kind_sizes in (("headtail", sizes), ("fill", fill_sizes)):
            if kind in skip:
                continue
            for size in kind_sizes:
                for fanout in FANOUTS:
                    for h in measure_order:
                        measure(kind, f"{fmt_size(size)} 1->{fanout} {h.name}", (h.name, size, fanout),
                                throughput, h, size, fanout, kind == "fill")
        if "rt" not in skip:
            for run in range(args.runs):
                for wait in ("block", "busy"):
                    for h in measure_order:
                        measure("rt", f"run {run + 1} {wait} {h.name}", (h.name, wait), round_trip, h, wait)

    report(results, names, sizes, fill_sizes, harness.errors)
    harness.finish(args.json, lambda: to_json(results, args, notes, hubs))


def _brief(kind: str, values) -> str:
    if kind == "rt":
        return "p50/p99 us: " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in values)
    return "msgs/s: " + ", ".join(fmt_rate(v) for v in values)


def report(results: dict, names: list[str], sizes, fill_sizes, errors: list[str]) -> None:
    headtail, fill, rt = results["headtail"], results["fill"], results["rt"]
    if headtail:
        print_rate_table("Throughput, head/tail (first and last 8 bytes written and read), messages/s:",
                         headtail, names, sizes, "{}", lambda m, s: fmt_rate(m))
    if fill:
        print_rate_table("Throughput, whole payload filled (numpy) and summed, GB/s per consumer:",
                         fill, names, fill_sizes, "{:.2f}", lambda m, s: m * s / 1e9)
    if rt:
        print(f"\nRound trip, {RT_SIZE} B ping-pong, microseconds (median over runs of each run's "
              "p50 / p99):")
        print_header(f"{'transport':<12}{'block p50':>11}{'block p99':>11}{'busy p50':>11}{'busy p99':>11}"
                     f"{'block peer/mq':>14}{'busy peer/mq':>13}")
        mq = {w: rt_median(rt, "multiqueue", w) for w in ("block", "busy")}
        for n in names:
            cells, ratios = "", ""
            for w in ("block", "busy"):
                p = rt_median(rt, n, w)
                cells += "".join(f"{'-' if p is None else f'{x:.1f}':>11}" for x in (p or (None, None)))
                ratios += f"{fmt_ratio(p and p[0], mq[w] and mq[w][0]):>{14 if w == 'block' else 13}}"
            print(f"{n:<12}{cells}{ratios}")
    print_verdicts(targets(results, sizes))
    print_errors(errors)


def rt_median(rt: dict, name: str, wait: str) -> tuple[float, float] | None:
    runs = rt.get((name, wait))
    if not runs:
        return None
    return statistics.median(p for p, _ in runs), statistics.median(q for _, q in runs)


def targets(results: dict, sizes) -> list[dict]:
    headtail, rt = results["headtail"], results["rt"]
    out = []

    def line(ok: bool | None, text: str):
        out.append(target(ok, text))

    for size in sizes:
        for fanout in FANOUTS:
            mq, iox = median(headtail.get(("multiqueue", size, fanout))), \
                median(headtail.get(("iceoryx2", size, fanout)))
            ok = None if mq is None or iox is None else mq >= iox
            line(ok, f"msgs/s >= iceoryx2, {fmt_size(size)} 1->{fanout}: {fmt_rate(mq)} vs "
                     f"{fmt_rate(iox)} ({fmt_ratio(mq, iox)})")
    mq, iox = rt_median(rt, "multiqueue", "busy"), rt_median(rt, "iceoryx2", "busy")
    line(None if not mq or not iox else mq[0] <= iox[0],
         f"busy-poll round trip p50 <= iceoryx2's: {fmt_p50(mq)} vs {fmt_p50(iox)} "
         f"({fmt_ratio(mq and mq[0], iox and iox[0])})")
    mq = rt_median(rt, "multiqueue", "block")
    line(None if not mq else mq[0] <= TARGET_BLOCKING_RT_US,
         f"blocking round trip p50 <= {TARGET_BLOCKING_RT_US:.0f} us: {fmt_p50(mq)}")
    for size in sizes:
        if size < 64 * KiB:
            continue
        for fanout in FANOUTS:
            mq, mp = median(headtail.get(("multiqueue", size, fanout))), \
                median(headtail.get(("mp.Queue", size, fanout)))
            ok = None if mq is None or mp is None else mq >= TARGET_VS_MP * mp
            line(ok, f">= {TARGET_VS_MP:.0f}x mp.Queue, {fmt_size(size)} 1->{fanout}: {fmt_ratio(mq, mp)}")
    return out


def to_json(results, args, notes, hubs) -> dict:
    def rows(kind):
        out = []
        for (name, size, fanout), runs in results[kind].items():
            m = statistics.median(runs)
            out.append({"transport": name, "size": size, "fanout": fanout, "runs_msgs_per_s": runs,
                        "median_msgs_per_s": m, "min": min(runs), "max": max(runs),
                        "median_gb_per_s_per_consumer": m * size / 1e9})
        return out

    return {
        "params": {"runs": args.runs, "duration_s": args.duration, "warmup_s": args.warmup,
                   "max_messages": args.max_messages, "round_trips": args.round_trips,
                   "round_trip_size": RT_SIZE, "round_trip_depth": RT_DEPTH, "quick": args.quick,
                   "depth_per_size": {size: depth_for(size) for size in SIZES}},
        "notes": notes,
        "transports": {h.name: {"fanout": h.fanout_note, "access": h.access_note} for h in hubs},
        "headtail": rows("headtail"),
        "fill": rows("fill"),
        "round_trip_us": [{"transport": n, "wait": w, "runs_p50_p99": runs,
                           "median_p50": statistics.median(p for p, _ in runs),
                           "median_p99": statistics.median(q for _, q in runs)}
                          for (n, w), runs in results["rt"].items()],
        "targets": targets(results, sorted({s for _, s, _ in results["headtail"]})),
    }


if __name__ == "__main__":
    main()
