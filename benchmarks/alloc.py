"""Allocate+release pairs per second: one process, and two processes at once on one pool.

    python benchmarks/alloc.py [--runs 5] [--pairs 1000000] [--json [PATH]] [--quick]

The original C++ manager reported 265,000 allocations/s.  Target: >= 1,000,000
allocate+release pairs/s (<= 1 us per pair) in one process, and >= 1,000,000/s in
aggregate for two processes allocating from the same pool at the same time.  Every
figure is the median (and min, max) over --runs runs of --pairs pairs per process.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import time
from itertools import repeat

from _common import Harness, add_json_option, clock, exit_on_sigterm, print_header, spread, verdict

from multiqueue import PoolConfig, ShmConfig, ShmManager

TARGET = 1_000_000
CPP_REFERENCE = 265_000
POOL = PoolConfig("bench", 4096, 1024)
BLOCK = POOL.block_size
WARMUP = 20_000  # untimed pairs before measuring (first-touch, caches, branch predictors)
START_DELAY_NS = 50_000_000  # workers are told to start this far in the future


def loop_plain(m: ShmManager, size: int, pairs: int) -> None:
    allocate = m.allocate
    for _ in repeat(None, pairs):
        b = allocate(size)
        b.release()


def loop_with(m: ShmManager, size: int, pairs: int) -> None:
    allocate = m.allocate
    for _ in repeat(None, pairs):
        with allocate(size):
            pass


def timed(loop, m: ShmManager, size: int, pairs: int) -> float:
    """Pairs per second of one run of `loop`."""
    t0 = clock()
    loop(m, size, pairs)
    return pairs * 1e9 / (clock() - t0)


# -- two processes ------------------------------------------------------------------------


def worker(domain: str) -> None:
    """Attach to `domain`; for each "start_ns pairs size" line on stdin wait for start_ns,
    run the pairs and answer "begin_ns end_ns".  EOF, SIGINT or SIGTERM: leave the domain."""
    exit_on_sigterm(1)
    m = ShmManager(domain, create=False, reaper_interval=None, name=f"alloc-worker-{os.getpid()}")
    try:
        loop_plain(m, BLOCK, WARMUP)
        print("ready", flush=True)
        for line in sys.stdin:
            start_ns, pairs, size = map(int, line.split())
            time.sleep(max(0, start_ns - clock() - 2_000_000) / 1e9)
            while clock() < start_ns:  # spin the last 2 ms so both begin together
                pass
            begin = clock()
            loop_plain(m, size, pairs)
            print(begin, clock(), flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        m.shutdown()


def read_reply(p: subprocess.Popen) -> str:
    line = p.stdout.readline()
    if not line:
        raise RuntimeError(f"worker pid {p.pid} exited (status {p.wait()})")
    return line


def two_processes(domain: str, pairs: int, runs: int) -> dict:
    """Aggregate rate (2 * pairs / time from the common start to the last finish) per run,
    each worker's own rate per run, and how late the later worker began (us)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", domain]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    out = {"aggregate": [], "workers": [[] for _ in procs], "start_skew_us": []}
    try:
        for p in procs:
            read_reply(p)  # "ready": attached and warmed up
        for _ in range(runs):
            start = clock() + START_DELAY_NS
            for p in procs:
                p.stdin.write(f"{start} {pairs} {BLOCK}\n")
                p.stdin.flush()
            spans = [tuple(map(int, read_reply(p).split())) for p in procs]
            out["aggregate"].append(len(procs) * pairs * 1e9 / (max(e for _, e in spans) - start))
            for rates, (begin, end) in zip(out["workers"], spans, strict=True):
                rates.append(pairs * 1e9 / (end - begin))
            out["start_skew_us"].append((max(b for b, _ in spans) - start) / 1e3)
    finally:
        for p in procs:
            with contextlib.suppress(OSError):
                p.stdin.close()  # EOF: the worker shuts its manager down and exits
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.terminate()  # SIGTERM -> SystemExit -> shutdown in the worker
                p.wait()
    return out


# -- report -------------------------------------------------------------------------------


def summarize(name: str, rates: list[float], target: float | None, reference: float) -> dict:
    """One result row: per-run rates (operations/s) -> median/min/max, ns per operation."""
    s = spread(rates)
    return {"name": name, "runs": rates, **s, "ns_per_op": 1e9 / s["median"], "target": target,
            "target_met": None if target is None else s["median"] >= target,
            "vs_reference": s["median"] / reference}


def print_table(rows: list[dict], reference_label: str) -> None:
    print_header(f"{'scenario':<40} {'median/s':>11} {'min/s':>11} {'max/s':>11} "
                 f"{'ns/pair':>8} {reference_label:>8} {'target':>6}")
    for r in rows:
        print(f"{r['name']:<40} {r['median']:>11,.0f} {r['min']:>11,.0f} {r['max']:>11,.0f} "
              f"{r['ns_per_op']:>8.0f} {r['vs_reference']:>7.2f}x {verdict(r['target_met']):>6}")


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    ap.add_argument("--pairs", type=int, default=1_000_000,
                    help="allocate+release pairs per run per process (default 1,000,000)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 20,000 pairs, 2 runs (overrides --pairs/--runs)")
    add_json_option(ap, "alloc")
    ap.add_argument("--worker", metavar="DOMAIN", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.pairs, args.runs = 20_000, 2

    domain = f"bench-{os.getpid()}"
    h = Harness("alloc", shm_prefixes=[f"mq.{domain}."])
    print(f"pool {POOL.name!r}: {POOL.block_count} x {BLOCK} B; {args.runs} runs x "
          f"{args.pairs:,} pairs per process\n")

    single = [
        (f"1 proc: allocate({BLOCK}) + release", loop_plain, BLOCK),
        ("1 proc: allocate(64) + release", loop_plain, 64),
        (f"1 proc: with allocate({BLOCK})", loop_with, BLOCK),
    ]
    with h:
        m = ShmManager(domain, ShmConfig(pools=[POOL]), reaper_interval=None, name="alloc-bench")
        try:
            for _, loop, size in single:
                loop(m, size, WARMUP)
            rates = {name: [] for name, _, _ in single}
            for _ in range(args.runs):  # interleaved, so drift affects every scenario alike
                for name, loop, size in single:
                    rates[name].append(timed(loop, m, size, args.pairs))
            two = two_processes(domain, args.pairs, args.runs)
        finally:
            m.shutdown()
    if h.interrupted:  # nothing to report: every scenario needs all its runs
        h.finish(None)

    rows = [summarize(name, r, TARGET, CPP_REFERENCE) for name, r in rates.items()]
    rows.append(summarize(f"2 procs: aggregate, allocate({BLOCK})+rel", two["aggregate"],
                          TARGET, CPP_REFERENCE))
    for i, r in enumerate(two["workers"], 1):
        rows.append(summarize(f"2 procs: worker {i} own rate", r, None, CPP_REFERENCE))
    print_table(rows, "vs C++")
    print(f"\n2 procs: later worker began {max(two['start_skew_us']):.1f} us after the common "
          "start at most")
    print(f"target: >= {TARGET:,} pairs/s (<= {1e9 / TARGET:,.0f} ns/pair); "
          f"C++ manager: {CPP_REFERENCE:,} allocations/s")
    for label, row in (("one process", rows[0]), ("two processes, aggregate", rows[len(single)])):
        print(f"  {label:<25} {row['median']:>11,.0f}/s  {verdict(row['target_met'])}  "
              f"({row['vs_reference']:.2f}x C++)")

    h.finish(args.json, {
        "unit": "allocate+release pairs/s",
        "params": {"runs": args.runs, "pairs": args.pairs, "quick": args.quick,
                   "pool": {"name": POOL.name, "block_size": BLOCK, "block_count": POOL.block_count}},
        "target_pairs_per_s": TARGET,
        "cpp_reference_per_s": CPP_REFERENCE,
        "results": rows,
        "two_process_start_skew_us": two["start_skew_us"],
    })


if __name__ == "__main__":
    main()
