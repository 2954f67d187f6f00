"""Message bus benchmark: messages/s and round trips between two processes, side by side with pyzmq.

    python benchmarks/bus.py [--quick] [--json [PATH]] [--runs 3] [--duration 1.0]
                             [--round-trips 20000] [--transports bus,zmq-pubsub,...]

Every publisher, subscriber and echo side is a separate process (multiprocessing "spawn")
attaching by name: to a domain of its own for the bus (a fresh one per set of processes),
to an ipc:// socket in a temporary directory for pyzmq.  Every figure is the median of
--runs runs; the transports are measured one after the other for each payload, so that the
figures compared are close in time.  Ctrl-C (or SIGTERM) stops the workers and removes what
the run left in /dev/shm.

* Throughput: small messages as a user sends them, 1 publisher process -> 1 subscriber
  process: JSON objects ``{"r": run, "s": seq, "p": "x..."}`` of 64 B and 1 KiB once
  encoded (bus: ``publish(topic, obj)`` / ``sub.get().data``; pyzmq: ``send(json.dumps(obj)
  .encode())`` / ``json.loads(recv())``), and bytes payloads of the same sizes (run and
  seq packed in the first 12 bytes).  The publisher sends for --duration seconds, then
  an end marker; messages/s = messages the subscriber received / (first send to its last
  receipt).  Bus subscribers and pyzmq PUB/SUB are lossy when the subscriber falls behind
  (bus: drop_oldest, capacity DEPTH; PUB/SUB: SNDHWM = RCVHWM = DEPTH): what was lost is
  shown; PUSH/PULL (same HWM) is lossless, the pusher waits.
* Round trip: 64 B JSON ping-pong, A sends, B receives and sends it back, A receives;
  p50/p99 over --round-trips after a tenth as many for warm-up, blocking receives.  Bus:
  two topics (A publishes on "ping" and reads "pong", B the reverse) and, separately,
  ``bus.request()`` against a server answering with ``bus.reply()`` from a callback
  subscription (answers on the client Bus's own reply topic, matched by request id; a tenth
  of the round trips);
  pyzmq: REQ/REP and PAIR over ipc://.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import statistics
import struct
import sys
import threading
from dataclasses import dataclass

from _common import (
    Harness,
    Session,
    add_json_option,
    add_message_options,
    attach,
    clock,
    fmt_rate,
    fmt_ratio,
    print_errors,
    print_header,
    remove_domains,
    spread,
    time_round_trips,
    worker,
)

from multiqueue import ShmManager
from multiqueue.control import Bus

KINDS = ["json", "bytes"]
SIZES = [64, 1024]
DEPTH = 1024  # bus subscriber capacity; pyzmq high-water marks
RT_SIZE = 64
HELLO, END, QUIT = 2**63 - 3, 2**63 - 2, 2**63 - 1  # marker sequence numbers (above any seq)
HEAD = struct.Struct("<IQ")  # bytes payloads: run, seq
JSON_SEPARATORS = (",", ":")  # the bus's own encoding; pyzmq messages are encoded the same way


# -- payloads -------------------------------------------------------------------------------


def make_payload(kind: str, size: int):
    """make(run, seq) -> the message a user would send, ``size`` bytes once encoded (JSON:
    for a six-digit seq)."""
    if kind == "json":
        pad = "x" * (size - len(json.dumps({"r": 1, "s": 100000, "p": ""}, separators=JSON_SEPARATORS)))
        return lambda run, seq: {"r": run, "s": seq, "p": pad}
    pad_bytes = b"x" * (size - HEAD.size)
    return lambda run, seq: HEAD.pack(run, seq) + pad_bytes


def parse_payload(kind: str):
    """parse(message) -> (run, seq)."""
    if kind == "json":
        return lambda value: (value["r"], value["s"])
    return lambda value: HEAD.unpack_from(value)


# -- transports: a picklable link, opened in the worker processes -----------------------------


@dataclass
class BusLink:
    """Two processes on a topic (round trip: two topics) of a domain made for them."""

    domain: str

    def _bus(self) -> Bus:
        return Bus(attach(self.domain, f"bus-bench-{os.getpid()}", reuse=False))

    def open_sender(self, kind: str, topic: str = "tp"):
        bus = self._bus()
        publish = bus.publish
        return (lambda value: publish(topic, value)), (lambda value: publish(topic, value)), bus.close

    def open_receiver(self, kind: str, topic: str = "tp"):
        bus = self._bus()
        get = bus.subscribe(topic, capacity=DEPTH).get
        return (lambda: get().data), bus.close

    def open_server(self, kind: str):
        """bus.request() server: answer every request with its own data (from a callback)."""
        bus = self._bus()
        done = threading.Event()

        def answer(msg):
            bus.reply(msg, msg.data)
            if msg.data["s"] == QUIT:
                done.set()

        bus.subscribe("svc", callback=answer)
        return done, bus.close

    def open_client(self, kind: str):
        bus = self._bus()
        request = bus.request
        return (lambda value: request("svc", value, timeout=30.0).data), bus.close


@dataclass
class ZmqLink:
    """A pyzmq socket pair over ipc://: ``pattern`` pubsub, pushpull, reqrep or pair."""

    address: str
    pattern: str

    def _socket(self, side: str):
        import zmq

        kinds = {"pubsub": (zmq.PUB, zmq.SUB), "pushpull": (zmq.PUSH, zmq.PULL),
                 "reqrep": (zmq.REQ, zmq.REP), "pair": (zmq.PAIR, zmq.PAIR)}[self.pattern]
        context = zmq.Context()
        s = context.socket(kinds[0] if side == "a" else kinds[1])
        s.setsockopt(zmq.SNDHWM, DEPTH)
        s.setsockopt(zmq.RCVHWM, DEPTH)
        s.setsockopt(zmq.LINGER, 0)
        if side == "b":
            if self.pattern == "pubsub":
                s.setsockopt(zmq.SUBSCRIBE, b"")
            s.bind(self.address)
        else:
            s.connect(self.address)

        def close():
            s.close()
            context.term()
        return s, close

    def _codec(self, kind: str, s):
        import zmq

        send, recv = s.send, s.recv
        if kind == "json":
            dumps, loads = json.dumps, json.loads

            def encode_send(value, flags=0):
                send(dumps(value, separators=JSON_SEPARATORS).encode(), flags)

            def recv_decode():
                return loads(recv())
        else:
            encode_send, recv_decode = send, recv

        def marker(value):  # never wait on a marker: PUSH may be full of messages nobody reads now
            with contextlib.suppress(zmq.Again):
                encode_send(value, zmq.NOBLOCK)
        return encode_send, recv_decode, marker

    def open_sender(self, kind: str, side: str = "a"):
        s, close = self._socket(side)
        send, _, marker = self._codec(kind, s)
        return send, marker, close

    def open_receiver(self, kind: str, side: str = "b"):
        s, close = self._socket(side)
        _, recv, _ = self._codec(kind, s)
        return recv, close

    def open_pair(self, kind: str, side: str):
        s, close = self._socket(side)
        send, recv, _ = self._codec(kind, s)
        return send, recv, close


class BusTransport:
    name = "bus"
    note = (f"Bus.publish(topic, obj|bytes) / Subscription.get().data; subscriber capacity {DEPTH} "
            "(drop_oldest)")

    def __init__(self, tag: str, workdir: str):
        self.domain = f"bb{os.getpid()}-{tag}"
        self.manager = ShmManager(self.domain, reaper_interval=None, name="bus-bench")
        self.bus = Bus(self.manager)  # the domain's mq-bus pool, made before the workers come

    def link(self, name: str) -> BusLink:
        return BusLink(self.domain)

    def close(self) -> None:
        self.bus.close()
        self.manager.shutdown()
        remove_domains(self.domain)  # in case a worker was killed


class ZmqTransport:
    pattern = ""

    def __init__(self, tag: str, workdir: str):
        import zmq  # noqa: F401  (fail here, in the parent, if pyzmq is missing)

        self.dir = os.path.join(workdir, f"zmq-{tag}")
        os.makedirs(self.dir)

    def link(self, name: str) -> ZmqLink:
        return ZmqLink(f"ipc://{self.dir}/{name}", self.pattern)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class ZmqPubSub(ZmqTransport):
    name, pattern = "zmq-pubsub", "pubsub"
    note = f"PUB -> SUB over ipc://, send(json.dumps(obj).encode()|bytes) / recv(); HWM {DEPTH} (drops)"


class ZmqPushPull(ZmqTransport):
    name, pattern = "zmq-pushpull", "pushpull"
    note = f"PUSH -> PULL over ipc://, same payloads; HWM {DEPTH} (lossless: the pusher waits)"


class ZmqReqRep(ZmqTransport):
    name, pattern = "zmq-reqrep", "reqrep"
    note = "REQ <-> REP over ipc://"


class ZmqPair(ZmqTransport):
    name, pattern = "zmq-pair", "pair"
    note = "PAIR <-> PAIR over ipc://"


class BusRequest(BusTransport):
    name = "bus-request"
    note = "bus.request(topic, obj) -> server's bus.reply(msg, msg.data) from a callback subscription"


THROUGHPUT = [BusTransport, ZmqPubSub, ZmqPushPull]
ROUND_TRIP = [BusTransport, BusRequest, ZmqReqRep, ZmqPair]


# -- worker processes -------------------------------------------------------------------------


def repeat_until_told(send_marker, marker, conn) -> None:
    """Send a marker, again every 50 ms until the parent says it arrived (PUB/SUB may drop it)."""
    send_marker(marker)
    while not conn.poll(0.05):
        send_marker(marker)
    conn.recv()


@worker
def subscriber_main(link, kind: str, conn) -> None:
    """Count each run's messages until its END; report (count, out-of-order, last receipt)."""
    recv, close = link.open_receiver(kind)
    parse = parse_payload(kind)
    conn.send("ready")
    run, count, bad, last, t_last, greeted = 0, 0, 0, -1, 0, False
    while True:
        run_of, seq = parse(recv())
        if seq >= HELLO:
            if seq == QUIT:
                break
            if seq == HELLO and not greeted:
                greeted = True
                conn.send("hello")
            elif seq == END and run_of == run:
                conn.send((count, bad, t_last))
                run, count, bad, last = run + 1, 0, 0, -1
            continue  # (a repeated marker of a run that is over)
        if run_of != run:
            continue
        t_last = clock()
        count += 1
        if seq <= last:
            bad += 1
        last = seq
    conn.send("bye")
    close()


@worker
def publisher_main(link, kind: str, size: int, conn) -> None:
    """For each ("run", seconds, max): send 0, 1, 2... for the seconds (at most max), then END."""
    send, marker, close = link.open_sender(kind)
    make = make_payload(kind, size)
    conn.send("ready")
    repeat_until_told(marker, make(0, HELLO), conn)
    run = 0
    while (command := conn.recv())[0] == "run":
        _, seconds, max_messages = command
        seq = 0
        t0 = clock()
        deadline = t0 + int(seconds * 1e9)
        while seq < max_messages:
            send(make(run, seq))
            seq += 1
            if not seq & 63 and clock() >= deadline:
                break
        conn.send((seq, t0))
        repeat_until_told(marker, make(run, END), conn)
        run += 1
    repeat_until_told(marker, make(run, QUIT), conn)
    close()


@worker
def echo_main(link, conn) -> None:
    """Round trip, side B: send back every message received, until QUIT (sent back too)."""
    bus = isinstance(link, BusLink)
    if bus:
        recv, close_rx = link.open_receiver("json", "ping")
    else:
        send, recv, close_tx = link.open_pair("json", "b")
        close_rx = None
    conn.send("ready")
    conn.recv()  # "connect": side A is ready to receive
    if bus:
        send, _, close_tx = link.open_sender("json", "pong")
    conn.send("ready")
    while True:
        value = recv()
        send(value)
        if value["s"] == QUIT:
            break
    conn.send("bye")
    close_tx()
    if close_rx is not None:
        close_rx()


@worker
def server_main(link, conn) -> None:
    """bus.request() round trip, side B: a callback subscription answering until QUIT."""
    done, close = link.open_server("json")
    conn.send("ready")
    conn.recv()
    conn.send("ready")
    done.wait()
    conn.send("bye")
    close()


@worker
def ping_main(link, mode: str, conn) -> None:
    """Round trip, side A: for ("run", warm-up, count): time count round trips -> p50, p99 (us)."""
    if mode == "request":
        request, close = link.open_client("json")
        replies: list = []

        def send(value):
            replies.append(request(value))
        recv = replies.pop
        conn.send("ready")
        conn.recv()
    elif isinstance(link, BusLink):
        recv, close_rx = link.open_receiver("json", "pong")
        conn.send("ready")
        conn.recv()  # "connect": side B reads "ping" now
        send, _, close_tx = link.open_sender("json", "ping")

        def close():
            close_tx()
            close_rx()
    else:
        send, recv, close = link.open_pair("json", "a")
        conn.send("ready")
        conn.recv()
    conn.send("ready")
    make = make_payload("json", RT_SIZE)
    _, warmup, count = conn.recv()
    result = time_round_trips(send, recv, warmup, count, make=lambda i: make(0, i),
                              seq_of=lambda got: got["s"])
    send(make(0, QUIT))
    recv()
    conn.send(result)
    close()


# -- measurements -------------------------------------------------------------------------------


def throughput(ctx, transport_class, kind, size, args, tag, workdir) -> list[dict]:
    """One set of processes: a warm-up run, then args.runs measured runs."""
    with Session(ctx, transport_class(tag, workdir)) as s:
        link = s.resource.link("tp")
        sub = s.start(subscriber_main, link, kind)
        sub.expect()  # subscribed (bus) / bound (pyzmq)
        pub = s.start(publisher_main, link, kind, size)
        pub.expect()
        sub.expect()  # "hello": messages flow from end to end
        pub.send("ok")
        runs = []
        for run in range(1 + args.runs):
            pub.send(("run", args.warmup if run == 0 else args.duration, args.max_messages))
            sent, t0 = pub.expect()
            count, bad, t_last = sub.expect()
            pub.send("ok")
            if bad:
                raise RuntimeError(f"{bad} messages arrived out of order")
            if run and count:
                runs.append({"rate": count * 1e9 / (t_last - t0), "sent": sent, "received": count,
                             "lost": (sent - count) / sent})
        pub.send(("quit",))
        sub.expect()  # "bye"
        pub.send("ok")
        return runs


def round_trip(ctx, transport_class, args, tag, workdir) -> list[dict]:
    """One run in a new pair of processes: (p50, p99) in microseconds."""
    request = transport_class is BusRequest
    count = max(200, args.round_trips // 10) if request else args.round_trips
    with Session(ctx, transport_class(tag, workdir)) as s:
        link = s.resource.link("rt")
        b = s.start(server_main if request else echo_main, link)
        b.expect()
        a = s.start(ping_main, link, "request" if request else "exchange")
        a.expect()
        for side in (b, a):
            side.send("connect")
            side.expect()
        a.send(("run", count // 10, count))
        p50, p99, bad = a.expect()
        b.expect()  # "bye"
        if bad:
            raise RuntimeError(f"{bad} replies carried the wrong sequence number")
        return [{"p50": p50, "p99": p99, "round_trips": count}]


# -- report ---------------------------------------------------------------------------------------


def tp_summary(runs: list[dict] | None) -> dict | None:
    if not runs:
        return None
    return {**spread([r["rate"] for r in runs]), "lost": statistics.median(r["lost"] for r in runs)}


def rt_summary(runs: list[dict] | None) -> dict | None:
    if not runs:
        return None
    return {key: statistics.median(r[key] for r in runs) for key in ("p50", "p99")}


def report(results: dict, tp_names: list[str], rt_names: list[str], kinds, sizes, errors) -> None:
    tp, rt = results["tp"], results["rt"]
    if tp:
        peers = [n for n in tp_names if n != "bus"]
        print("\nThroughput, 1 publisher process -> 1 subscriber process, messages/s received (median "
              "of the runs; lost: median share of the messages sent that never arrived):")
        header = f"{'payload':<12}" + "".join(f"{n:>14}{'lost':>7}" for n in tp_names)
        header += "  |" + "".join(f"{'bus/' + n:>18}" for n in peers)
        print_header(header)
        for kind in kinds:
            for size in sizes:
                summary = {n: tp_summary(tp.get((n, kind, size))) for n in tp_names}
                median = {n: summary[n] and summary[n]["median"] for n in tp_names}
                row = f"{kind + ' ' + str(size) + ' B':<12}"
                for n in tp_names:
                    lost = "-" if summary[n] is None else f"{summary[n]['lost']:.1%}"
                    row += f"{fmt_rate(median[n]):>14}{lost:>7}"
                row += "  |" + "".join(f"{fmt_ratio(median.get('bus'), median[n]):>18}" for n in peers)
                print(row)
    if rt:
        print(f"\nRound trip, {RT_SIZE} B JSON ping-pong between two processes, microseconds (median over "
              "runs of each run's p50 / p99; peer/bus: the peer's p50 over the bus's two-topic p50):")
        print_header(f"{'transport':<14}{'p50':>10}{'p99':>10}{'peer/bus':>10}")
        bus = rt_summary(rt.get("bus"))
        for n in rt_names:
            x = rt_summary(rt.get(n))
            cells = "".join(f"{'-' if x is None else f'{x[k]:.1f}':>10}" for k in ("p50", "p99"))
            ratio = "-" if n == "bus" else fmt_ratio(x and x["p50"], bus and bus["p50"])
            print(f"{n:<14}{cells}{ratio:>10}")
    print_errors(errors)


def to_json(results, args, kinds, sizes, transports) -> dict:
    return {
        "params": {"runs": args.runs, "duration_s": args.duration, "warmup_s": args.warmup,
                   "max_messages": args.max_messages, "round_trips": args.round_trips,
                   "round_trip_size": RT_SIZE, "depth": DEPTH, "quick": args.quick,
                   "kinds": kinds, "sizes": sizes},
        "transports": {t.name: t.note for t in transports},
        "throughput": [{"transport": n, "kind": kind, "size": size, "runs": runs, **tp_summary(runs)}
                       for (n, kind, size), runs in results["tp"].items()],
        "round_trip_us": [{"transport": n, "runs": runs, **rt_summary(runs)}
                          for n, runs in results["rt"].items()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_message_options(ap)
    ap.add_argument("--transports", help="comma-separated subset of: "
                    + ", ".join(t.name for t in dict.fromkeys(THROUGHPUT + ROUND_TRIP)))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: tp,rt")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 1 min): JSON only, 1 run of 0.2 s, 2,000 round trips "
                         "(overrides --runs, --duration, --warmup, --round-trips)")
    add_json_option(ap, "bus")
    args = ap.parse_args()
    kinds, sizes = KINDS, SIZES
    if args.quick:
        args.runs, args.duration, args.warmup, args.round_trips = 1, 0.2, 0.05, 2_000
        kinds = ["json"]
    skip = set(filter(None, args.skip.split(",")))
    wanted = set(args.transports.split(",")) if args.transports else None
    tp_transports = [t for t in THROUGHPUT if wanted is None or t.name in wanted]
    rt_transports = [t for t in ROUND_TRIP if wanted is None or t.name in wanted]

    import zmq

    harness = Harness("bus", shm_prefixes=[f"mq.bb{os.getpid()}-"], pyzmq=zmq.__version__,
                      libzmq=zmq.zmq_version())
    info = harness.info
    print(f"pyzmq {info['pyzmq']} (libzmq {info['libzmq']}); {args.runs} run(s) per figure (median); "
          f"throughput runs of {args.duration} s (<= {args.max_messages:,} messages) after a "
          f"{args.warmup} s warm-up run; round trips: {args.round_trips:,} per run after "
          f"{args.round_trips // 10:,} (bus-request: a tenth of that)")
    print("How each transport is used:")
    for t in dict.fromkeys(tp_transports + rt_transports):
        print(f"  {t.name:<13} {t.note}")
    sys.stdout.flush()

    ctx = multiprocessing.get_context("spawn")
    results: dict = {"tp": {}, "rt": {}}

    def measure(part, label, key, fn, *fn_args):
        runs = harness.measure(f"{part} {label}", fn, ctx, *fn_args, args, harness.tag(), harness.workdir,
                               brief=lambda runs: f"{part:<3} {label:<30} {brief(part, runs)}")
        if runs is not None:
            results[part].setdefault(key, []).extend(runs)

    with harness:
        if "tp" not in skip:
            for kind in kinds:
                for size in sizes:
                    for t in tp_transports:
                        measure("tp", f"{kind} {size} B {t.name}", (t.name, kind, size),
                                throughput, t, kind, size)
        if "rt" not in skip:
            for run in range(args.runs):  # the transports' runs interleaved
                for t in rt_transports:
                    measure("rt", f"run {run + 1} {t.name}", t.name, round_trip, t)

    report(results, [t.name for t in tp_transports], [t.name for t in rt_transports], kinds, sizes,
           harness.errors)
    harness.finish(args.json, lambda: to_json(results, args, kinds, sizes,
                                              list(dict.fromkeys(tp_transports + rt_transports))))


def brief(part: str, runs: list[dict]) -> str:
    if part == "tp":
        return ", ".join(f"{fmt_rate(r['rate'])} ({r['lost']:.1%} lost)" for r in runs)
    return ", ".join(f"p50 {r['p50']:.1f} / p99 {r['p99']:.1f} us" for r in runs)


if __name__ == "__main__":
    main()
