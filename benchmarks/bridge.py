"""Bridge benchmark: frames over Zenoh between two processes, raw Zenoh pub/sub vs the bridge blocks.

    python benchmarks/bridge.py [--quick] [--json [PATH]] [--runs 3] [--load 1.5] [--rate 200]
                                [--paced 300] [--sizes 4096,1048576] [--transports tcp,shm]
                                [--sides raw,bridged] [--express] [--placement process|shared]
                                [--threads] [--profile DIR]

Two sides, each a sender and a receiver on this machine, the receiver listening on a free
port of 127.0.0.1 and the sender connecting to it (Zenoh peers, multicast scouting off):

* raw: a Zenoh Python publisher process (CongestionControl.BLOCK, Reliability.RELIABLE)
  putting a constant payload of the frame size with a small attachment of the size of the
  bridge's frame header (62 B for these frames: sequence number, run, phase and send time
  in it), and a subscriber process whose callback takes the attachment and the payload's
  bytes (``to_bytes()``, what a Python user needs to read the frame).
* bridged: a sender process hosting a multiqueue Runtime, StampSource -> BridgeSink (each
  block a worker process of its own, the Runtime's default placement): the source
  allocates a frame from the pool, writes sequence number, run and phase in its first
  words and sends it stamped with the send time; a receiver process hosting a Runtime,
  BridgeSource -> CountSink: the sink reads the words and the frame's timestamp.  Domains
  of their own, removed at the end (/dev/shm is checked).

Both sides send the same schedule (``_bridge_blocks.Plan``) in one stream per side, size
and transport, --runs runs one after the other; per run: warm-up frames as fast as the
receiver takes them (discarded), the load phase (--load s as fast as the receiver takes
them: back-pressure through Zenoh's BLOCK congestion control), a 0.5 s gap (the receiver
drains), then --paced frames at --rate frames/s (after 20 discarded): one frame in flight.

* frames/s: the load phase's frames over the time between their first and last receipt
  at the receiver; MB/s = frames/s x frame size / 1e6.
* latency: receipt time (raw: entry to the callback; bridged: the sink's work()) minus
  the send time stamped by the sender just before handing the frame over (raw: put();
  bridged: send() at the source), CLOCK_MONOTONIC in every process; p50 and p99 of each
  run's paced frames.
* CPU us/frame: CPU time of all the side's processes (raw: publisher + subscriber;
  bridged: both Runtime processes and their 4 block workers) over the load phase, per
  frame, from a sampler reading /proc every 20 ms; on 2 cores it bounds the throughput.

Transports: ``tcp``: Zenoh's shared memory off, every byte through the loopback TCP
connection (what crosses a network between two machines); ``shm``: Zenoh's defaults, which
on one host put payloads of 3 KiB or more in Zenoh's own shared memory and send only a
reference over TCP (does not happen between machines).

Every figure is the median over the runs (latency: of each run's p50 / p99).  Every frame
is checked: in order, none lost.  Ctrl-C (or SIGTERM) stops the workers and removes what
the run left in /dev/shm; Zenoh's own shared-memory files (``/dev/shm/<n>.zenoh``, which a
process leaves when it exits through os._exit as multiprocessing's children do) are
removed by a last Zenoh session opened in a process that exits normally.

Variants (not in the default run): --express (Zenoh express puts, no batching, on both
sides), --placement shared (the bridged side's two blocks in one worker process per side),
--threads (CPU per thread: where the CPU goes), --profile DIR (cProfile files of the bridge
blocks' threads and Zenoh's callback threads; slower: figures not comparable).
"""

import argparse
import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys

import _bridge_blocks as B
import numpy as np
from _common import (
    Harness,
    Session,
    add_json_option,
    fmt_ratio,
    fmt_size,
    fmt_us,
    median,
    p50_p99_us,
    print_errors,
    print_header,
)

from multiqueue.net import ZenohSettings

SIZES = [4096, 1 << 20]
SIDES = ["raw", "bridged"]
TRANSPORTS = {
    "tcp": "Zenoh shared memory off: every byte through the loopback TCP connection (as between machines)",
    "shm": "Zenoh defaults: payloads >= 3 KiB through Zenoh's shared memory on one host, a reference "
           "over TCP",
}
NO_SHM_CONFIG = "{transport: {shared_memory: {enabled: false}}}\n"
SHM_CONFIG = "{transport: {shared_memory: {enabled: true}}}\n"  # the bridge's settings turn it off
GAP_S = 0.5
PACED_WARMUP = 20
STREAM_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def schedule_for(size: int, args) -> B.Schedule:
    return B.Schedule(
        runs=args.runs,
        warmup_frames=max(20, int(args.warmup * 4e9 / size)) if size >= 65536 else int(args.warmup * 1e5),
        load_s=args.load,
        max_load_frames=int(args.load * min(400_000, 8e9 / size)),
        gap_s=GAP_S, paced_warmup=PACED_WARMUP, paced_frames=args.paced, rate=args.rate)


def _expect(worker, what: str, timeout: float):
    message = worker.expect(timeout)
    if isinstance(message, tuple) and message[0] == "error":
        raise RuntimeError(f"{worker.name}: {message[1]}")
    if (message if isinstance(message, str) else message[0]) != what:
        raise RuntimeError(f"{worker.name}: expected {what!r}, got {message!r:.200}")
    return message


def run_stream(ctx, side: str, transport: str, size: int, args, tag: str, workdir: str) -> dict:
    """One stream (all the runs) of one side: the receiver's records and the senders' counts."""
    port = free_port()
    config = os.path.join(workdir, f"{transport}.json5")  # a config file: the settings add nothing
    with open(config, "w") as f:
        f.write(NO_SHM_CONFIG if transport == "tcp" else SHM_CONFIG)
    rx_settings = ZenohSettings(listen=[f"tcp/127.0.0.1:{port}"], scouting=False, config_file=config)
    tx_settings = ZenohSettings(connect=[f"tcp/127.0.0.1:{port}"], scouting=False, config_file=config)
    key = f"bench/bridge/{os.getpid()}/{tag}"
    schedule = schedule_for(size, args)
    opts = B.Options(express=args.express, placement=args.placement, threads=args.threads,
                     profile_dir=args.profile)
    timeout = schedule.seconds + STREAM_TIMEOUT_S
    prefix = f"zb{os.getpid()}-{tag}"
    with Session(ctx, domains=(f"{prefix}-rx", f"{prefix}-tx")) as s:
        if side == "raw":
            rx = s.start(B.raw_receiver, rx_settings, key, schedule, opts)
            _expect(rx, "ready", B.START_TIMEOUT_S)
            tx = s.start(B.raw_sender, tx_settings, key, size, schedule, opts)
            _, sent, tx_cpu = _expect(tx, "sent", timeout)
            _, records, rx_cpu = _expect(rx, "records", timeout)
            counters = stats = None
        else:
            # not daemons: daemonic processes cannot start the Runtime's block workers
            rx = s.start(B.bridged_receiver, f"{prefix}-rx", rx_settings, key, size, schedule, workdir, opts,
                         daemon=False)
            _expect(rx, "ready", B.START_TIMEOUT_S + 10)
            tx = s.start(B.bridged_sender, f"{prefix}-tx", tx_settings, key, size, schedule, workdir, opts,
                         daemon=False)
            _, sent, tx_cpu, tx_counters, tx_stats = _expect(tx, "sent", timeout)
            _, records, rx_cpu, rx_counters, rx_stats = _expect(rx, "records", timeout)
            counters = {"BridgeSink": tx_counters, "BridgeSource": rx_counters}
            stats = {"tx": tx_stats, "rx": rx_stats}
        for w in (tx, rx):
            w.send("bye")
    return {"sent": sent, "records": records, "cpu": [tx_cpu, rx_cpu], "counters": counters,
            "stats": stats}


# -- per-run figures ------------------------------------------------------------------------------


def cpu_in_window(cpus: list[dict], t0: int, t1: int, what: str = "cpu") -> dict[str, float]:
    """CPU seconds (what="faults": minor page faults) each process used between t0 and t1
    (interpolated between samples)."""
    out = {}
    for sampled in cpus:
        t = np.array(sampled["t"], np.float64)
        if len(t) < 2 or t[0] > t0 or t[-1] < t1:
            continue
        for name, values in sampled[what].items():
            a, b = np.interp([t0, t1], t, np.array(values, np.float64))
            out[name] = float(b - a)
    return out


def thread_cpu_in_window(cpus: list[dict], t0: int, t1: int) -> dict[str, float]:
    """--threads: CPU seconds per "process/thread name" (threads of one name summed) between t0 and t1."""
    out: dict[str, float] = {}
    for sampled in cpus:
        t = np.array(sampled["t"], np.float64)
        if "threads" not in sampled or len(t) < 2 or t[0] > t0 or t[-1] < t1:
            continue
        for key, values in sampled["threads"].items():
            a, b = np.interp([t0, t1], t, np.array(values, np.float64))
            name = key.rsplit("#", 1)[0]
            out[name] = out.get(name, 0.0) + float(b - a)
    return out


def analyze(stream: dict, size: int, runs: int) -> tuple[list[dict], list[str]]:
    rows = stream["records"]
    sent = stream["sent"]
    errors = []
    seq = rows[:, 3]
    total = int(sum(sum(r) for r in sent))
    if len(rows) != total or not np.array_equal(seq, np.arange(len(rows))):
        bad = int(np.count_nonzero(np.diff(seq) != 1)) if len(rows) > 1 else 0
        errors.append(f"received {len(rows)} of {total} frames, {bad} gaps or reorderings")
    counters = stream["counters"] or {}
    for name, key in (("BridgeSource", "lost"), ("BridgeSource", "dropped"), ("BridgeSource", "invalid")):
        if counters.get(name, {}).get(key):
            errors.append(f"{name} {key}={counters[name][key]}")
    out = []
    for run in range(runs):
        load = rows[(rows[:, 1] == run) & (rows[:, 2] == B.LOAD)]
        paced = rows[(rows[:, 1] == run) & (rows[:, 2] == B.PACED)]
        r = {"run": run, "load_frames": int(len(load)), "paced_frames": int(len(paced))}
        if len(load) > 1 and load[-1, 0] > load[0, 0]:
            t0, t1 = int(load[0, 0]), int(load[-1, 0])
            fps = (len(load) - 1) * 1e9 / (t1 - t0)
            cpu = cpu_in_window(stream["cpu"], t0, t1)
            faults = cpu_in_window(stream["cpu"], t0, t1, "faults")
            r["faults_per_frame"] = {k: v / (len(load) - 1) for k, v in faults.items()}
            threads = thread_cpu_in_window(stream["cpu"], t0, t1)
            if threads:
                r["thread_cpu_us_per_frame"] = {k: v * 1e6 / (len(load) - 1) for k, v in threads.items()}
            r.update(frames_per_s=fps, mb_per_s=fps * size / 1e6, load_s=(t1 - t0) / 1e9,
                     cpu_s=cpu, cpu_us_per_frame=sum(cpu.values()) * 1e6 / (len(load) - 1) if cpu else None,
                     cores=sum(cpu.values()) * 1e9 / (t1 - t0) if cpu else None)
        else:
            errors.append(f"run {run}: {len(load)} frames in the load phase")
        if len(paced):
            p50, p99 = p50_p99_us(paced[:, 4])
            r.update(p50_us=p50, p99_us=p99, max_us=float(paced[:, 4].max() / 1e3))
        else:
            errors.append(f"run {run}: no paced frames")
        out.append(r)
    return out, errors


# -- report -----------------------------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    fps = [r.get("frames_per_s") for r in runs if r.get("frames_per_s")]
    s = {key: median([r.get(key) for r in runs])
         for key in ("frames_per_s", "mb_per_s", "cpu_us_per_frame", "cores", "p50_us", "p99_us")}
    s["min"], s["max"] = (min(fps), max(fps)) if fps else (None, None)
    names = sorted({n for r in runs for n in r.get("thread_cpu_us_per_frame", {})})
    if names:
        s["cpu_us_per_frame_by_thread"] = {
            n: median([r.get("thread_cpu_us_per_frame", {}).get(n) for r in runs]) for n in names}
    names = sorted({n for r in runs for n in r.get("cpu_s", {})})
    s["cpu_us_per_frame_by_process"] = {
        n: median([r["cpu_s"][n] * 1e6 / (r["load_frames"] - 1) for r in runs
                   if n in r.get("cpu_s", {}) and r["load_frames"] > 1]) for n in names}
    s["faults_per_frame_by_process"] = {
        n: median([r.get("faults_per_frame", {}).get(n) for r in runs]) for n in names}
    return s


def fmt(x, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def report(summary: dict, transports, sizes, sides, args, errors) -> None:
    print(f"\nLoad phase: {args.load} s as fast as the receiver takes frames (back-pressure), frames/s "
          f"median [min..max] of {args.runs} run(s); latency: one-way, sender's stamp to receipt, "
          f"{args.paced} frames paced at {args.rate:g}/s (one in flight), median of the runs' p50 / p99:")
    print_header(f"{'transport':<10}{'size':<8}{'side':<13}{'frames/s':>24}{'MB/s':>9}{'CPU us/fr':>11}"
                 f"{'cores':>7}{'p50 us':>9}{'p99 us':>9}")
    for transport in transports:
        for size in sizes:
            got = {side: summary.get((transport, size, side)) for side in sides}
            for side in sides:
                x = got[side]
                if x is None:
                    continue
                rate = f"{fmt(x['frames_per_s'])} [{fmt(x['min'])}..{fmt(x['max'])}]"
                print(f"{transport:<10}{fmt_size(size):<8}{side:<13}{rate:>24}{fmt(x['mb_per_s']):>9}"
                      f"{fmt(x['cpu_us_per_frame'], '.1f'):>11}{fmt(x['cores'], '.2f'):>7}"
                      f"{fmt_us(x['p50_us']):>9}{fmt_us(x['p99_us']):>9}")
            raw, bridged = got.get("raw"), got.get("bridged")
            if raw and bridged:
                print(f"{transport:<10}{fmt_size(size):<8}{'bridged/raw':<13}"
                      f"{fmt_ratio(bridged['frames_per_s'], raw['frames_per_s']):>24}"
                      f"{fmt_ratio(bridged['mb_per_s'], raw['mb_per_s']):>9}"
                      f"{fmt_ratio(bridged['cpu_us_per_frame'], raw['cpu_us_per_frame'], '.1f'):>11}{'':>7}"
                      f"{fmt_ratio(bridged['p50_us'], raw['p50_us'], '.1f'):>9}"
                      f"{fmt_ratio(bridged['p99_us'], raw['p99_us'], '.1f'):>9}")
    print("\nCPU us per frame in the load phase, by process, and (in brackets) minor page faults per "
          "frame (median of the runs):")
    for key, x in summary.items():
        faults = x["faults_per_frame_by_process"]
        by = ", ".join(f"{n} {v:.1f} [{fmt(faults.get(n), '.1f')}]"
                       for n, v in x["cpu_us_per_frame_by_process"].items() if v is not None)
        print(f"  {key[0]:<4} {fmt_size(key[1]):<7} {key[2]:<8} {by}")
    if any("cpu_us_per_frame_by_thread" in x for x in summary.values()):
        print("\nCPU us per frame in the load phase, by thread (--threads; >= 0.5 us; threads of one name "
              "summed):")
        for key, x in summary.items():
            by = x.get("cpu_us_per_frame_by_thread", {})
            print(f"  {key[0]:<4} {fmt_size(key[1]):<7} {key[2]:<8} "
                  + ", ".join(f"{n} {v:.1f}" for n, v in sorted(by.items(), key=lambda kv: -(kv[1] or 0))
                              if v is not None and v >= 0.5))
    print_errors(errors)


# -- Zenoh's own files in /dev/shm ----------------------------------------------------------------


def zenoh_files() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.endswith(".zenoh")}


def zenoh_gc() -> None:
    """A Zenoh session opened and closed in a process that exits normally: Zenoh removes the
    shared-memory files of dead processes (ours exit through os._exit, as multiprocessing's
    children do, and leave theirs) and its own at exit."""
    with contextlib.suppress(subprocess.SubprocessError):
        subprocess.run([sys.executable, "-c", "import zenoh; zenoh.open(zenoh.Config()).close()"],
                       timeout=30, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    ap.add_argument("--load", type=float, default=1.5, help="seconds of the load phase per run (default 1.5)")
    ap.add_argument("--warmup", type=float, default=0.2,
                    help="warm-up frames per run: about this many seconds of raw throughput (default 0.2)")
    ap.add_argument("--rate", type=float, default=200.0, help="paced frames per second (default 200)")
    ap.add_argument("--paced", type=int, default=300, help="paced frames measured per run (default 300)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="frame sizes in bytes")
    ap.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated: tcp,shm")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated: raw,bridged")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 run, 0.5 s load, 100 paced frames (overrides those options)")
    ap.add_argument("--profile", metavar="DIR", help="write cProfile files of the bridge blocks to DIR")
    ap.add_argument("--express", action="store_true",
                    help="Zenoh express puts (no batching) on both sides: BridgeSink(express=True)")
    ap.add_argument("--placement", choices=["process", "shared"], default="process",
                    help="bridged blocks: a worker process each (default, the Runtime's default) or one "
                         "worker per side (source + BridgeSink, BridgeSource + sink: threads of one process)")
    ap.add_argument("--threads", action="store_true",
                    help="also sample the CPU time of every thread (where the CPU goes; costs some CPU)")
    add_json_option(ap, "bridge")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.load, args.paced = 1, 0.5, 100
    sizes = [int(x) for x in args.sizes.split(",")]
    transports = args.transports.split(",")
    sides = args.sides.split(",")
    if any(t not in TRANSPORTS for t in transports) or any(s not in SIDES for s in sides):
        ap.error(f"transports: {', '.join(TRANSPORTS)}; sides: {', '.join(SIDES)}")
    if any(size % 8 or size < 64 for size in sizes):
        ap.error("frame sizes: multiples of 8, at least 64 bytes")
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
        args.profile = os.path.abspath(args.profile)

    import zenoh

    harness = Harness("bridge", shm_prefixes=[f"mq.zb{os.getpid()}-"],
                      zenoh=getattr(zenoh, "__version__", None) or _zenoh_version())
    print(f"eclipse-zenoh {harness.info['zenoh']}; {args.runs} run(s) per figure (median), loopback "
          "127.0.0.1, peers, multicast scouting off")
    for name in transports:
        print(f"  {name:<4} {TRANSPORTS[name]}")
    sys.stdout.flush()

    ctx = multiprocessing.get_context("spawn")
    zenoh_before = zenoh_files()
    streams: dict = {}
    summary: dict = {}

    def measure(transport: str, size: int, side: str) -> list[dict]:
        stream = run_stream(ctx, side, transport, size, args, harness.tag(), harness.workdir)
        runs, errs = analyze(stream, size, args.runs)
        harness.errors.extend(f"{transport} {fmt_size(size)} {side}: {e}" for e in errs)
        key = (transport, size, side)
        streams[key] = {"runs": runs, "sent": stream["sent"], "counters": stream["counters"],
                        "received": int(len(stream["records"]))}
        summary[key] = summarize(runs)
        return runs

    with harness:
        for transport in transports:
            for i, size in enumerate(sizes):
                order = sides if i % 2 == 0 else sides[::-1]  # which side goes first alternates
                for side in order:
                    shown = f"{transport:<4} {fmt_size(size):<7} {side:<8}"
                    harness.measure(f"{transport} {fmt_size(size)} {side}", measure, transport, size, side,
                                    brief=lambda runs, shown=shown: f"{shown} {brief(runs)}")
    zenoh_left = sorted(zenoh_files() - zenoh_before)
    if zenoh_left:  # Zenoh's shared memory of our dead processes: Zenoh removes them itself
        zenoh_gc()
        zenoh_left = sorted(zenoh_files() - zenoh_before)

    report(summary, transports, sizes, sides, args, harness.errors)
    harness.finish(args.json, lambda: {
        "params": {"runs": args.runs, "load_s": args.load, "warmup_s": args.warmup, "gap_s": GAP_S,
                   "paced_warmup": PACED_WARMUP, "paced_frames": args.paced, "rate": args.rate,
                   "sizes": sizes, "transports": {t: TRANSPORTS[t] for t in transports},
                   "attachment_bytes": {str(s): B.header_size(s) for s in sizes}, "quick": args.quick},
        "results": [{"transport": k[0], "size": k[1], "side": k[2], **summary[k], **streams[k]}
                    for k in summary],
        "ratios": [{"transport": t, "size": size,
                    **{f"bridged_over_raw_{q}": (summary[(t, size, "bridged")][q]
                                                 / summary[(t, size, "raw")][q])
                       for q in ("frames_per_s", "p50_us", "p99_us", "cpu_us_per_frame")
                       if summary[(t, size, "bridged")][q] and summary[(t, size, "raw")][q]}}
                   for t in transports for size in sizes
                   if (t, size, "raw") in summary and (t, size, "bridged") in summary],
        "zenoh_files_left": zenoh_left,
    }, extra=f"; Zenoh files left: {', '.join(zenoh_left) or 'none'}")


def brief(runs: list[dict]) -> str:
    return ", ".join(f"{fmt(r.get('frames_per_s'))}/s p50 {fmt_us(r.get('p50_us'))} us" for r in runs)


def _zenoh_version() -> str | None:
    from importlib import metadata

    with contextlib.suppress(metadata.PackageNotFoundError):
        return metadata.version("eclipse-zenoh")
    return None


if __name__ == "__main__":
    main()
