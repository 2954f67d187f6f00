"""Pipeline benchmark: a 4-block chain in 4 processes moving 1 MiB float32 frames, multiqueue vs mp.Queue.

    python benchmarks/pipeline.py [--quick] [--json [PATH]] [--runs 3] [--duration 2.5]
                                  [--rate 50] [--window 2] [--pool 64] [--depth 16]
                                  [--sides multiqueue,mp.Queue] [--profile DIR]

The chain is source -> stage1 -> stage2 -> sink, every block a process of its own:

* multiqueue: a Runtime (placement="process", i.e. a spawned worker per block) in a domain
  of its own per run, with one pool of 1 MiB blocks (--pool of them) and edges of --depth
  frames.  The source allocates a frame, writes a header (sequence number, phase, a hop
  counter, its send time) and the sequence number in the last word, and sends it stamped
  with the buffer timestamp; each stage reads the header and last word, bumps the hop
  counter in place, re-stamps the buffer timestamp and forwards the frame (zero-copy); the
  sink reads and checks the header and last word.
* mp.Queue: 4 spawned processes chained by 3 multiprocessing.Queue(maxsize=--depth); the
  source puts a fresh 1 MiB numpy array per frame (pickled by the queue, as a user would),
  the stages get() it, touch it the same way and put() it on; the send time of each hop is
  a word of the array (there is no buffer metadata).

Each run starts a new chain (multiqueue: a new domain, removed at the stop) and runs the
source's schedule (blocks in _pipeline_blocks.py):

  warm-up  --warmup s, as fast as the chain takes frames (discarded)
  load     --duration s, as fast as the chain takes frames (back-pressure): frames/s
  settle   --settle s at --rate frames/s, after the chain drained (discarded)
  paced    --paced s at --rate frames/s: sporadic frames
  window   --window s back to back with one frame in flight: the source sends a frame
           when the sink has received the previous one

* frames/s: the frames of the load phase received by the sink, over the time between the
  sink's first and last receipt of them (steady state).
* per-hop latency: from the moment a hop stamps the frame, just before handing it to its
  queue (after its allocation and, in the window phase, after waiting for its turn: the
  source's waits are not counted), to the moment the next hop's code sees it (multiqueue:
  entry to work(); mp.Queue: get() returned).  All processes use CLOCK_MONOTONIC
  (time.monotonic_ns).  Reported for three conditions: one frame in flight (transport +
  wake-up + each side's per-frame path, nothing queued; the target is judged on it),
  paced (the same, but every hop has slept ~1/rate s: wake-ups from idle, cold caches)
  and under load (mostly queueing: up to --depth frames ahead in each queue).
* CPU per frame: process CPU time (all threads: mp.Queue's feeder thread pickles) over the
  load phase, per frame; the machine's cores bound the throughput to cores / total.

Runs of the two sides alternate (multiqueue first in odd runs, mp.Queue first in even
ones), so both are measured in the same conditions; every figure is the median over
--runs runs (per-hop p50 / p99: the median of each run's p50 / p99).  --profile DIR writes a
cProfile of every block's thread / worker to DIR (it slows everything down: the figures
of a profiled run are not comparable).  Ctrl-C (or SIGTERM) stops the chain and removes
what the run left in /dev/shm.

Targets (issue "benchmarks/pipeline.py"): multiqueue frames/s >= 20x mp.Queue's; multiqueue
per-hop p50 < 50 us (every hop, one frame in flight).
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time

import _pipeline_blocks as B
import numpy as np
from _common import (
    Harness,
    Session,
    add_json_option,
    fmt_ratio,
    fmt_us,
    median,
    p50_p99_us,
    print_errors,
    print_verdicts,
    spread,
    target,
)

from multiqueue import PoolConfig, ShmConfig
from multiqueue.graph import Runtime

FRAME_BYTES = B.FRAME * 4
PROCESSES = ["source", "stage1", "stage2", "sink"]
RECEIVERS = PROCESSES[1:]
HOP_NAMES = [f"{a} -> {b}" for a, b in zip(PROCESSES[:-1], RECEIVERS, strict=True)]
SIDES = ["multiqueue", "mp.Queue"]
LATENCY_PHASES = {"window": B.WINDOW, "paced": B.PACED, "load": B.LOAD}
TARGET_VS_MP = 20.0
TARGET_HOP_P50_US = 50.0
START_TIMEOUT_S = 60.0  # spawning and importing in 4 processes, on a busy machine


# -- the two chains -----------------------------------------------------------------------


def run_multiqueue(schedule: B.Schedule, args, tag: str, workdir: str) -> dict:
    """One run of the multiqueue chain: the records of its 4 blocks, and runtime stats."""
    out_dir = os.path.join(workdir, f"mq-{tag}")
    os.mkdir(out_dir)
    domain = f"pl{os.getpid()}-{tag}"
    pools = ShmConfig(pools=[PoolConfig("frames", FRAME_BYTES, args.pool)], max_buffers=args.pool)
    with Runtime(domain, pools=pools, capacity=args.depth, start_timeout=START_TIMEOUT_S) as rt:
        source = rt.add(B.PipeSource(schedule, out_dir, args.pool, args.profile), name="source")
        stage1 = rt.add(B.PipeStage("stage1", out_dir, args.profile), name="stage1")
        stage2 = rt.add(B.PipeStage("stage2", out_dir, args.profile), name="stage2")
        sink = rt.add(B.PipeSink(out_dir, args.profile), name="sink")
        for a, b in ((source, stage1), (stage1, stage2), (stage2, sink)):
            rt.connect(a["out"], b["in"])
        rt.start()
        if not rt.wait(schedule.total_s + 60):
            raise RuntimeError("the multiqueue chain did not finish in time")
    records = {"source": _read_json(os.path.join(out_dir, "source.json"))}
    for name in RECEIVERS:
        with np.load(os.path.join(out_dir, f"{name}.npz")) as z:
            records[name] = {k: (json.loads(str(z[k])) if k == "cpu" else z[k]) for k in z.files}
            records[name]["bad"] = int(records[name]["bad"])
    stats = rt.final_stats
    records["runtime"] = {
        "blocks_in_use_at_end": rt.blocks_in_use_at_end,
        "work": {name: {"work_calls": b.work_calls, "items_in": b.items_in, "items_out": b.items_out,
                        "work_s": b.work_s} for name, b in stats.blocks.items()},
        "failures": [str(f) for f in rt.failures],
    }
    shutil.rmtree(out_dir, ignore_errors=True)
    return records


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def run_mp(schedule: B.Schedule, args, tag: str, workdir: str) -> dict:
    """One run of the mp.Queue chain: the records of its 4 processes."""
    ctx = multiprocessing.get_context("spawn")
    q1, q2, q3 = (ctx.Queue(maxsize=args.depth) for _ in range(3))
    window, received = ctx.Semaphore(1), ctx.RawValue("q", 0)  # the WINDOW phase's
    chain = {"sink": (B.mp_sink, q3, window, received),
             "stage2": (B.mp_stage, q2, q3, "stage2"),
             "stage1": (B.mp_stage, q1, q2, "stage1"),
             "source": (B.mp_source, q1, schedule, window, received)}
    with Session(ctx) as s:
        workers = {name: s.start(B.mp_worker, *target, args.profile, name=f"pipeline-mp-{name}")
                   for name, target in chain.items()}
        for w in workers.values():
            if w.expect(START_TIMEOUT_S) != "ready":
                raise RuntimeError(f"mp.Queue chain: {w.name} did not get ready")
        workers["source"].send("go")
        deadline = time.monotonic() + schedule.total_s + 60
        return {name: workers[name].expect(max(1.0, deadline - time.monotonic())) for name in PROCESSES}


# -- per-run figures ----------------------------------------------------------------------


def percentiles_us(ns: np.ndarray) -> dict | None:
    if not len(ns):
        return None
    p50, p99 = p50_p99_us(ns)
    return {"p50": p50, "p99": p99, "max": float(ns.max() / 1e3), "n": int(len(ns))}


def cpu_per_frame_us(cpu: dict, phase: int) -> float | None:
    """Process CPU time per frame over ``phase`` (from the snapshots taken on phase changes)."""
    start = cpu.get(str(phase))
    later = [int(k) for k in cpu if int(k) > phase]
    if start is None or not later:
        return None
    end = cpu[str(min(later))]
    frames = end[1] - start[1]
    return (end[0] - start[0]) * 1e6 / frames if frames > 0 else None


def analyze(records: dict) -> dict:
    """frames/s, per-hop latency (paced, load), end to end, CPU per frame, and checks."""
    sink = records["sink"]
    load = sink["phase"] == B.LOAD
    t = sink["t"][load]
    fps = float((len(t) - 1) * 1e9 / (t[-1] - t[0])) if len(t) > 1 and t[-1] > t[0] else 0.0
    out = {"frames_per_s": fps, "load_frames": int(load.sum()), "hops": {}, "e2e": {}, "cpu_us": {},
           "errors": []}
    for phase_name, phase in LATENCY_PHASES.items():
        out["hops"][phase_name] = [percentiles_us(records[r]["hop_ns"][records[r]["phase"] == phase])
                                   for r in RECEIVERS]
        out["e2e"][phase_name] = percentiles_us(sink["e2e_ns"][sink["phase"] == phase])
    for name in PROCESSES:
        out["cpu_us"][name] = cpu_per_frame_us(records[name]["cpu"], B.LOAD)
    sent = sum(records["source"]["sent"])
    out["sent"] = records["source"]["sent"]
    for name in RECEIVERS:
        got, bad = len(records[name]["seq"]), records[name]["bad"]
        if got != sent or bad:
            out["errors"].append(f"{name} received {got} of {sent} frames, {bad} out of order or damaged")
    for phase_name, phase in LATENCY_PHASES.items():
        if records["source"]["sent"][phase] < 10:
            out["errors"].append(f"only {records['source']['sent'][phase]} frames in the {phase_name} phase")
    runtime = records.get("runtime")
    if runtime is not None:
        out["runtime"] = runtime
        if runtime["blocks_in_use_at_end"]:
            out["errors"].append(f"{runtime['blocks_in_use_at_end']} pool blocks still held after the stop")
        out["errors"].extend(runtime["failures"])
    return out


# -- report -------------------------------------------------------------------------------


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return fmt_ratio(a, b, ".1f")


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians over runs of every figure, per side."""
    out = {}
    for side, side_runs in runs.items():
        if not side_runs:
            continue
        rates = [r["frames_per_s"] for r in side_runs]
        m = spread(rates)
        s = {"frames_per_s": m["median"], "frames_per_s_runs": rates, "min": m["min"], "max": m["max"],
             "hops": {}, "e2e": {}, "cpu_us": {}}
        for phase in LATENCY_PHASES:
            s["hops"][phase] = [
                {q: median([(r["hops"][phase][i] or {}).get(q) for r in side_runs]) for q in ("p50", "p99")}
                for i in range(len(RECEIVERS))]
            s["e2e"][phase] = {q: median([(r["e2e"][phase] or {}).get(q) for r in side_runs])
                               for q in ("p50", "p99")}
        for name in PROCESSES:
            s["cpu_us"][name] = median([r["cpu_us"][name] for r in side_runs])
        if side == "multiqueue":
            works = [r["runtime"]["work"] for r in side_runs]
            s["frames_per_work_call"] = {
                name: median([w[name]["items_in"] / w[name]["work_calls"]
                              for w in works if w[name]["work_calls"]])
                for name in RECEIVERS}
        out[side] = s
    return out


def targets(summary: dict) -> list[dict]:
    out = []

    def line(ok, text):
        out.append(target(ok, text))

    mq, mp = summary.get("multiqueue"), summary.get("mp.Queue")
    a, b = mq and mq["frames_per_s"], mp and mp["frames_per_s"]
    line(None if not a or not b else a >= TARGET_VS_MP * b,
         f"multiqueue frames/s >= {TARGET_VS_MP:.0f}x mp.Queue's: {fmt_rate(a)} vs {fmt_rate(b)} "
         f"({ratio(a, b)})")
    p50s = [h["p50"] for h in mq["hops"]["window"]] if mq else []
    ok = None if not p50s or None in p50s else max(p50s) < TARGET_HOP_P50_US
    line(ok, f"multiqueue per-hop p50 < {TARGET_HOP_P50_US:.0f} us (one frame in flight, every hop): "
             f"{', '.join(fmt_us(p) + ' us' for p in p50s) or '-'}")
    for phase, what in (("paced", "paced"), ("load", "under load")):
        p50s = [h["p50"] for h in mq["hops"][phase]] if mq else []
        line(None, f"(not judged) multiqueue per-hop p50 {what}: "
                   f"{', '.join(fmt_us(p) + ' us' for p in p50s) or '-'}")
    return out


def report(summary: dict, args, errors: list[str]) -> None:
    sides = [s for s in SIDES if s in summary]
    both = len(sides) == 2
    w = 24

    def row(label, cells, extra=""):
        print(f"{label:<26}" + "".join(f"{c:>{w}}" for c in cells) + (f"{extra:>12}" if both else ""))

    print(f"\nThroughput, load phase ({args.duration} s, back-pressure), 1 MiB frames; "
          f"median [min..max] of {args.runs} run(s):")
    row("", sides, "mq/mp" if both else "")
    print("-" * (26 + w * len(sides) + (12 if both else 0)))
    mq_fps = summary.get("multiqueue", {}).get("frames_per_s")
    mp_fps = summary.get("mp.Queue", {}).get("frames_per_s")
    row("frames/s", [f"{fmt_rate(summary[s]['frames_per_s'])} [{fmt_rate(summary[s]['min'])}.."
                     f"{fmt_rate(summary[s]['max'])}]" for s in sides], ratio(mq_fps, mp_fps))
    row("GB/s through each hop", [f"{summary[s]['frames_per_s'] * FRAME_BYTES / 1e9:.2f}" for s in sides])

    for phase, title in (("window", f"with one frame in flight ({args.window} s back to back: no "
                                    "queueing, no waiting for room)"),
                         ("paced", f"paced at {args.rate:g} frames/s ({args.paced} s; sporadic frames: "
                                   "every hop wakes from sleep, caches cold)"),
                         ("load", f"under load ({args.duration} s; includes waiting for queue room and "
                                  f"queueing behind up to {args.depth} frames)")):
        print(f"\nPer-hop latency {title}, us, p50 / p99 (median over runs):")
        row("hop", sides, "mp/mq p50" if both else "")
        print("-" * (26 + w * len(sides) + (12 if both else 0)))
        for i, hop in enumerate(HOP_NAMES):
            cells = [summary[s]["hops"][phase][i] for s in sides]
            row(hop, [f"{fmt_us(c['p50'])} / {fmt_us(c['p99'])}" for c in cells],
                ratio(cells[-1]["p50"], cells[0]["p50"]) if both else "")
        cells = [summary[s]["e2e"][phase] for s in sides]
        row("end to end (3 hops)", [f"{fmt_us(c['p50'])} / {fmt_us(c['p99'])}" for c in cells],
            ratio(cells[-1]["p50"], cells[0]["p50"]) if both else "")

    print("\nCPU time per frame, load phase, us (process CPU, all its threads):")
    row("process", sides)
    print("-" * (26 + w * len(sides)))
    for name in PROCESSES:
        row(name, [fmt_us(summary[s]["cpu_us"][name]) for s in sides])
    totals = {s: sum(v for v in summary[s]["cpu_us"].values() if v is not None) for s in sides}
    row("total", [fmt_us(totals[s]) for s in sides])
    cores = os.cpu_count() or 1
    row(f"=> at most, on {cores} cores", [f"{cores * 1e6 / totals[s]:,.0f} frames/s" if totals[s] else "-"
                                         for s in sides])
    if "multiqueue" in summary:
        fpc = summary["multiqueue"]["frames_per_work_call"]
        print("multiqueue frames per work() call (whole run): "
              + ", ".join(f"{n} {fmt_us(v)}" for n, v in fpc.items()))

    print_verdicts(targets(summary))
    print_errors(errors)


def brief(result: dict) -> str:
    hops = {phase: "/".join(fmt_us(h and h["p50"]) for h in result["hops"][phase])
            for phase in LATENCY_PHASES}
    return (f"{fmt_rate(result['frames_per_s'])} frames/s; per-hop p50 us: "
            + ", ".join(f"{phase} {v}" for phase, v in hops.items()))


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="runs per side (default 3); figures are medians")
    ap.add_argument("--duration", type=float, default=2.5, help="seconds of the load phase (default 2.5)")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up before it (default 0.5)")
    ap.add_argument("--settle", type=float, default=0.5,
                    help="seconds at --rate after the load phase, discarded: the queues empty (default 0.5)")
    ap.add_argument("--paced", type=float, default=2.5, help="seconds of the paced phase (default 2.5)")
    ap.add_argument("--rate", type=float, default=50.0,
                    help="frames/s of the settle and paced phases, the same for both sides (default 50)")
    ap.add_argument("--window", type=float, default=2.0,
                    help="seconds of the one-frame-in-flight phase (default 2)")
    ap.add_argument("--depth", type=int, default=16, help="queue capacity in frames, every edge (default 16)")
    ap.add_argument("--pool", type=int, default=64, help="1 MiB blocks in the multiqueue pool (default 64)")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated: multiqueue,mp.Queue")
    ap.add_argument("--profile", metavar="DIR", help="write a cProfile per block / process to DIR "
                    "(slows everything: not for figures)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run (< 30 s): 1 run, 0.2 s warm-up, 0.5 s load, 0.3 s settle, 1 s paced, "
                         "0.5 s window (overrides --runs, --warmup, --duration, --settle, --paced, --window)")
    add_json_option(ap, "pipeline")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.warmup, args.duration = 1, 0.2, 0.5
        args.settle, args.paced, args.window = 0.3, 1.0, 0.5
    sides = [s for s in SIDES if s in args.sides.split(",")]
    if not sides:
        ap.error(f"--sides: choose from {','.join(SIDES)}")
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)
    if args.pool < 2:
        ap.error("--pool: at least 2 blocks")
    schedule = B.Schedule(args.warmup, args.duration, args.settle, args.paced, args.window, args.rate)

    harness = Harness("pipeline", shm_prefixes=[f"mq.pl{os.getpid()}-"])
    print(f"4 processes: source -> stage1 -> stage2 -> sink, frames of {B.FRAME} float32 (1 MiB); "
          f"queues of {args.depth} frames; multiqueue pool of {args.pool} x 1 MiB.")
    print(f"{args.runs} run(s) per side, alternating; each: {args.warmup} s warm-up, {args.duration} s "
          f"load (frames/s), {args.settle} s settle + {args.paced} s paced at {args.rate:g} frames/s, "
          f"{args.window} s with one frame in flight.")
    if args.profile:
        print(f"NOTE: profiling into {args.profile}: these figures are not comparable with others")
    sys.stdout.flush()

    runs: dict[str, list[dict]] = {s: [] for s in sides}
    runners = {"multiqueue": run_multiqueue, "mp.Queue": run_mp}

    def one_run(run: int, side: str) -> dict:
        result = analyze(runners[side](schedule, args, f"{run}", harness.workdir))
        harness.errors.extend(f"run {run + 1} {side}: {e}" for e in result["errors"])
        runs[side].append(result)
        return result

    with harness:
        for run in range(args.runs):
            order = sides if run % 2 == 0 else sides[::-1]
            for side in order:
                shown = f"run {run + 1} {side:<11}"
                harness.measure(f"run {run + 1} {side}", one_run, run, side,
                                brief=lambda result, shown=shown: f"{shown} {brief(result)}")

    summary = summarize(runs)
    if summary:
        report(summary, args, harness.errors)
    harness.finish(args.json, lambda: {
        "params": {"runs": args.runs, "warmup_s": args.warmup, "load_s": args.duration,
                   "settle_s": args.settle, "paced_s": args.paced, "paced_rate": args.rate,
                   "window_s": args.window,
                   "depth": args.depth, "pool_blocks": args.pool, "frame_bytes": FRAME_BYTES,
                   "quick": args.quick, "profiled": bool(args.profile)},
        "hops": HOP_NAMES,
        "runs": {side: [{k: v for k, v in r.items() if k != "errors"} for r in side_runs]
                 for side, side_runs in runs.items()},
        "summary": summary,
        "targets": targets(summary) if summary else [],
    })


if __name__ == "__main__":
    main()
