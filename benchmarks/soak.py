"""Soak: the demo streams for --minutes; memory of every process over time, drops, leaks.

    python benchmarks/soak.py [--minutes 10] [--interval S] [--warmup S] [--bins N] [--rate HZ]
                              [--json [PATH]]

It runs the main demo (`mq demo`, the spectrum monitor of multiqueue.demos.spectrum:
source, detector and recorder each in a worker process of its own, the probe a thread
of the runtime's process) as a user would, `python -m multiqueue.demos.spectrum` in a
domain of its own until stopped, and watches it from outside without joining the
domain (so the watcher changes nothing it measures):

* every --interval s, for every process of the run (the demo's process, which runs the
  runtime and the probe, and each worker: the demo's process tree plus the domain's
  process table): RSS, PSS, USS (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup)
  and Private_Dirty, anonymous and shared-memory RSS and threads (/proc/PID/status),
  open fds (/proc/PID/fd) and mappings (/proc/PID/maps lines); per block its frames in and
  out (the graph segment's rows), per edge its drops and fill, and the pool blocks in use
  (from multiqueue.tools.doctor.diagnose, which maps the domain read-only);
* at the end: `diagnose` once more while it streams (it must find nothing), then SIGTERM
  (which the demo takes as Ctrl-C: an orderly stop; SIGINT would be ignored when this
  script runs in the background of a shell), the demo's exit code (non-zero if pool blocks
  were still in use after its stop), the blocks' final rows, and /dev/shm (nothing of
  the domain may be left).

Shared-memory pages count in a process's RSS as it touches them, so RSS climbs while
the pools warm up and says little about leaks; private memory (pages no other process
maps) is the figure that must stay flat.  Of it, the dirty part is judged: the heap,
Python objects, numpy arrays, i.e. whatever a leak is made of.  The clean part (library
code and data read from files) moves with the machine's other processes: a page of
numpy's .so that only the source touched turns shared, and leaves USS, when any other
Python on the machine touches it too -- USS is reported, not judged.  The first
--warmup s (default 10 % of the run, at most 1 minute) are not judged.

Verdicts (exit code 1 if any fails), for every process, after the warm-up:
  private dirty memory: end <= start + 2 MiB, and the slope of a least-squares line
  through the samples <= 64 KiB/min (about 27 bytes per spectrum at 40/s), judged over
  >= 5 minutes (over less the first minutes' settling, a few 10 KiB, is a steep slope);
  open fds, threads and mappings: the lowest of the last 3 samples no higher than the
  highest of the first 3 (a large numpy temporary is a mapping while it lives: counts
  blip; a leaked fd, thread or mapping stays);
and for the run: no block failed or restarted; every frame a block sent reached each
block connected to it, and the lossless ("block" policy) edges dropped nothing (the
probe's edge is drop_oldest by design: its drops are reported, not judged); doctor
findings 0, pool blocks in use after the stop 0 (the demo's exit code), no ERROR in
the domain's log, nothing of the domain left in /dev/shm.
"""

import argparse
import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
from _common import Harness, add_json_option, print_header, print_verdicts, target

from multiqueue.demos import spectrum as demo
from multiqueue.graph import registry as R
from multiqueue.graph.stats import graph_stats
from multiqueue.shm.segment import DEFAULT_PREFIX
from multiqueue.tools import doctor

PRIVATE_GROWTH_LIMIT_KIB = 2048  # end - start, after the warm-up
PRIVATE_SLOPE_LIMIT_KIB_MIN = 64.0  # ~27 bytes per frame at 40 frames/s
SLOPE_MIN_WINDOW_MIN = 5.0  # the slope is judged over at least this many minutes
START_TIMEOUT_S = 120.0  # spawning 3 workers and importing numpy, on a busy machine
STOP_TIMEOUT_S = 60.0  # the runtime drains for up to 10 s, then aborts and kills
COUNTS = ("fds", "threads", "maps")  # must not grow
SETTLED = 3  # samples at each end of the judged window that a count is compared over
FIELDS = ("rss", "pss", "uss", "private_dirty", "anon", "shmem", *COUNTS)
JUDGED = "private_dirty"


# -- the demo -------------------------------------------------------------------------------


def start_demo(domain: str, args, workdir: str) -> subprocess.Popen:
    """`mq demo` in a domain of its own, until SIGTERM; its output and log in ``workdir``."""
    command = [sys.executable, "-m", "multiqueue.demos.spectrum", "--domain", domain, "--duration", "0",
               "--bins", str(args.bins), "--record", os.path.join(workdir, "spectra.npy")]
    env = {**os.environ, "MQ_LOG_DIR": workdir}
    with open(os.path.join(workdir, "demo.out"), "wb") as out:
        # a session of its own: a Ctrl-C on this script reaches the demo only through stop_demo
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def wait_running(domain: str, demo_process: subprocess.Popen) -> R.GraphSegment:
    """The demo's graph segment once every block runs (polled: nothing else says so)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    graph = None
    while time.monotonic() < deadline:
        if demo_process.poll() is not None:
            raise RuntimeError(f"the demo exited while starting (code {demo_process.returncode})")
        if graph is None:
            with contextlib.suppress(Exception):  # not created yet
                graph = R.GraphSegment.open(DEFAULT_PREFIX, domain)
        if graph is not None and all(row[R.STATE] == R.RUNNING for row in graph.block_rows):
            return graph
        time.sleep(0.2)
    raise RuntimeError(f"the demo's blocks were not all running after {START_TIMEOUT_S:.0f} s")


def set_rate(domain: str, rate: float) -> None:
    """The source's rate_hz, as `mq param` sets it (the demo has no option for it)."""
    subprocess.run([sys.executable, "-m", "multiqueue.cli", "param", domain, "source", "rate_hz",
                    repr(float(rate))], check=True, stdout=subprocess.DEVNULL, timeout=60)


def stop_demo(demo_process: subprocess.Popen) -> int | None:
    """SIGTERM (taken as Ctrl-C: an orderly stop) and its exit code; None if it had to be
    killed (its process group: the workers too)."""
    if demo_process.poll() is None:
        demo_process.send_signal(signal.SIGTERM)
        try:
            return demo_process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo_process.pid, signal.SIGKILL)
            demo_process.wait()
            return None
    return demo_process.returncode


# -- sampling -------------------------------------------------------------------------------


def _kib_fields(path: str) -> dict[str, int]:
    """``Key:   123 kB`` lines of a /proc file as {key: 123}."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            value = rest.split()
            if value and value[0].isdigit():
                out[key] = int(value[0])
    return out


def proc_sample(pid: int) -> dict | None:
    """Memory (KiB), fds, threads and mappings of ``pid``; None if it is gone."""
    try:
        rollup = _kib_fields(f"/proc/{pid}/smaps_rollup")
        status = _kib_fields(f"/proc/{pid}/status")
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/maps") as f:
            maps = sum(1 for _ in f)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return {"rss": rollup["Rss"], "pss": rollup["Pss"], "private_dirty": rollup["Private_Dirty"],
            "uss": rollup["Private_Clean"] + rollup["Private_Dirty"],
            "anon": status["RssAnon"], "shmem": status["RssShmem"], "threads": status["Threads"],
            "fds": fds, "maps": maps}


def descendants(root: int) -> list[int]:
    """``root`` and every process under it (the runtime's spawned workers, and any helper)."""
    children = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children[pid])
    return out


def label_processes(root: int, stats, report: doctor.DoctorReport) -> dict[int, str]:
    """Every process of the run, named by the blocks it runs (else its registered name)."""
    blocks = collections.defaultdict(list)
    for b in stats.blocks.values():
        blocks[b.pid].append(b.name)
    registered = {p.pid: p.name for p in report.processes if p.alive}
    labels = {}
    for pid in dict.fromkeys([*descendants(root), *registered, *blocks]):
        names = blocks.get(pid, [])
        if pid == root:
            labels[pid] = "+".join(["runtime", *names])
        else:
            labels[pid] = "+".join(names) or registered.get(pid) or _command(pid)
    return labels


def _command(pid: int) -> str:
    """A helper process's name: its multiprocessing module (resource_tracker), else its command."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            words = f.read().decode(errors="replace").split("\0")
    except OSError:
        return f"pid {pid}"
    modules = re.findall(r"multiprocessing\.(\w+)", " ".join(words))
    return modules[0] if modules else os.path.basename(words[0])


def graph_sample(graph: R.GraphSegment, report: doctor.DoctorReport | None):
    """Block and edge figures from the graph segment's rows (the fill from the doctor's
    view of the queues: the watcher opens no queue)."""
    stats = graph_stats(graph, {})
    unread = {} if report is None else {(q.name, r.index): r.unread for q in report.queues for r in q.readers}
    blocks = {b.name: {"state": b.state, "pid": b.pid, "in": b.items_in, "out": b.items_out,
                       "rate_out": b.rate_out,
                       "restarts": b.restarts, "failures": b.failures, "counters": b.counters}
              for b in stats.blocks.values()}
    edges = []
    for i, e in enumerate(graph.description["edges"]):
        lag = unread.get((e["queue"], int(graph.edge_rows[i, R.EDGE_READER])))
        edges.append({"edge": f"{e['src']} -> {e['dst']}", "policy": e["policy"], "capacity": e["capacity"],
                      "popped": int(graph.edge_rows[i, R.EDGE_POPPED]),
                      "drops": int(graph.edge_rows[i, R.EDGE_DROPS]), "lag": lag})
    return stats, blocks, edges


def take_sample(t: float, root: int, domain: str, graph: R.GraphSegment) -> dict:
    report = doctor.diagnose(domain)
    stats, blocks, edges = graph_sample(graph, report)
    labels = label_processes(root, stats, report)
    processes = {}
    for pid, label in labels.items():
        figures = proc_sample(pid)
        if figures is not None:
            processes[str(pid)] = {"label": label, **figures}
    return {"t": t, "processes": processes, "blocks": blocks, "edges": edges,
            "pool_blocks_in_use": dict(collections.Counter(b.pool for b in report.buffers)),
            "doctor_findings": [f"{f.kind}: {f.message}" for f in report.findings]}


def progress(sample: dict) -> str:
    private = "  ".join(f"{p['label']} {p[JUDGED] / 1024:.1f}" for p in sample["processes"].values())
    pools = " ".join(f"{k}={v}" for k, v in sorted(sample["pool_blocks_in_use"].items())) or "-"
    src = sample["blocks"]["source"]
    return (f"  t={sample['t']:6.0f} s  spectra {src['out']:>7}  private dirty MiB: {private}  "
            f"pool blocks in use: {pools}")


def soak(domain: str, demo_process: subprocess.Popen, graph: R.GraphSegment, args) -> list[dict]:
    """Sample at 0, interval, 2 interval, ... and at the end; RuntimeError if the demo ends."""
    duration = args.minutes * 60
    times = [k * args.interval for k in range(int(duration / args.interval) + 1)]
    if duration - times[-1] > args.interval / 10:
        times.append(duration)
    samples = []
    t0 = time.monotonic()
    for t in times:
        try:  # the wait: until the time of the sample, or the demo ends early
            code = demo_process.wait(max(0.0, t0 + t - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        else:
            raise RuntimeError(f"the demo exited while streaming (code {code})")
        samples.append(take_sample(time.monotonic() - t0, demo_process.pid, domain, graph))
        print(progress(samples[-1]), flush=True)
    return samples


# -- analysis -------------------------------------------------------------------------------


def process_series(samples: list[dict]) -> dict[str, dict]:
    """Per pid: its label and, per field, the (t, value) samples."""
    out = {}
    for s in samples:
        for pid, p in s["processes"].items():
            entry = out.setdefault(pid, {"label": p["label"], **{f: [] for f in FIELDS}})
            for f in FIELDS:
                entry[f].append((s["t"], p[f]))
    return out


def slope_per_min(points: list[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    t, v = np.array(points, dtype=float).T
    return float(np.polyfit(t / 60, v, 1)[0])


def summarize_process(series: dict, warmup: float, end_t: float) -> dict:
    post = {f: [(t, v) for t, v in series[f] if t >= warmup] for f in FIELDS}
    out = {"label": series["label"], "samples": len(post[JUDGED])}
    if not post[JUDGED]:
        return out
    for f in FIELDS:
        values = [v for _, v in post[f]]
        out[f] = {"start": values[0], "end": values[-1], "max": max(values), "min": min(values)}
    for f in ("uss", JUDGED):
        out[f]["slope_kib_min"] = slope_per_min(post[f])
    for f in COUNTS:
        values = [v for _, v in post[f]]
        out[f]["start_high"], out[f]["end_low"] = max(values[:SETTLED]), min(values[-SETTLED:])
    out["window_min"] = (post[JUDGED][-1][0] - post[JUDGED][0][0]) / 60
    out["lived_to_end"] = post[JUDGED][-1][0] >= end_t
    return out


def memory_verdicts(summary: dict) -> list[tuple[bool | None, str]]:
    out = []
    for pid, p in summary.items():
        who = f"{p['label']} (pid {pid})"
        if JUDGED not in p:
            out.append((False, f"{who}: no sample after the warm-up (it ended early)"))
            continue
        m = p[JUDGED]
        growth = m["end"] - m["start"]
        out.append((growth <= PRIVATE_GROWTH_LIMIT_KIB,
                    f"{who}: private dirty memory end - start = {growth:+,} KiB "
                    f"(limit +{PRIVATE_GROWTH_LIMIT_KIB:,})"))
        slope = m["slope_kib_min"]
        judged = slope is not None and p["window_min"] >= SLOPE_MIN_WINDOW_MIN
        text = "-" if slope is None else f"{slope:+.1f} KiB/min"
        out.append((slope <= PRIVATE_SLOPE_LIMIT_KIB_MIN if judged else None,
                    f"{who}: private dirty memory slope {text} (limit {PRIVATE_SLOPE_LIMIT_KIB_MIN:g}"
                    + ("" if judged else f"; judged over >= {SLOPE_MIN_WINDOW_MIN:g} min, "
                                          f"this window is {p['window_min']:.1f}") + ")"))
        # a count that blips (a large numpy temporary is a mapping of its own while it lives)
        # is no leak; a leak stays: its lowest of the last samples tops the first samples' highest
        grown = [f for f in COUNTS if p[f]["end_low"] > p[f]["start_high"]]
        out.append((not grown, f"{who}: fds / threads / mappings, highest of the first {SETTLED} samples "
                               f"-> lowest of the last {SETTLED}: "
                               + ", ".join(f"{p[f]['start_high']} -> {p[f]['end_low']}" for f in COUNTS)))
        if not p["lived_to_end"]:
            out.append((False, f"{who}: the process ended while the demo streamed"))
    return out


def flow_verdicts(final_blocks: dict, final_edges: list[dict]) -> list[tuple[bool | None, str]]:
    """From the rows after the stop: failures, and every frame sent reached its consumers."""
    out = []
    for name, b in final_blocks.items():
        ok = b["state"] in ("done", "stopped") and not b["restarts"] and not b["failures"]
        out.append((ok, f"block {name}: {b['state']}, {b['restarts']} restarts, {b['failures']} failures"))
    for e in final_edges:
        sent = final_blocks[e["edge"].split(".")[0]]["out"]
        accounted = e["popped"] + e["drops"]
        lossless = e["policy"] == "block"
        out.append((accounted == sent and (e["drops"] == 0 or not lossless),
                    f"edge {e['edge']} ({e['policy']}): {sent} sent, {e['popped']} delivered, "
                    f"{e['drops']} dropped" + ("" if lossless else " (drop_oldest: drops allowed)")))
    return out


NOTABLE_KEPT = 20  # WARNING / ERROR lines of the domain's log shown in the report


def log_levels(workdir: str, domain: str) -> tuple[collections.Counter, list[str]]:
    """Lines per level in the domain's log (``<time> LEVEL pid=...``), rotated files too,
    and the first NOTABLE_KEPT WARNING / ERROR lines (to be read, not only counted)."""
    levels, notable = collections.Counter(), []
    for name in sorted(os.listdir(workdir)):
        if name.startswith(f"{domain}.log"):
            with open(os.path.join(workdir, name), errors="replace") as f:
                for line in f:
                    parts = line.split(maxsplit=2)
                    if len(parts) > 1:
                        levels[parts[1]] += 1
                        if parts[1] in ("WARNING", "ERROR") and len(notable) < NOTABLE_KEPT:
                            notable.append(line.rstrip())
    return levels, notable


# -- report ---------------------------------------------------------------------------------


def print_process_table(summary: dict) -> None:
    header = (f"{'process':<22}{'pid':>8} |{'private dirty: start':>21}{'end':>8}{'max':>8}{'/min':>7} |"
              f"{'USS: start':>11}{'end':>8}{'/min':>7} |{'RSS end':>8}{'anon':>8} |"
              f"{'fds':>8}{'threads':>8}{'maps':>10}")
    print_header(header)
    for pid, p in summary.items():
        if JUDGED not in p:
            print(f"{p['label'][:21]:<22}{pid:>8} | (no sample after the warm-up)")
            continue
        d, u = p[JUDGED], p["uss"]

        def slope(m):
            return "-" if m["slope_kib_min"] is None else f"{m['slope_kib_min']:+.0f}"

        def span(f, p=p):
            return f"{p[f]['start']}->{p[f]['end']}"

        print(f"{p['label'][:21]:<22}{pid:>8} |{d['start']:>21,}{d['end']:>8,}{d['max']:>8,}{slope(d):>7} |"
              f"{u['start']:>11,}{u['end']:>8,}{slope(u):>7} |{p['rss']['end']:>8,}{p['anon']['end']:>8,} |"
              f"{span('fds'):>8}{span('threads'):>8}{span('maps'):>10}")


def print_flow_table(final_blocks: dict, final_edges: list[dict], samples: list[dict]) -> None:
    print(f"{'block':<12}{'state':<10}{'frames in':>11}{'frames out':>11}{'out/s':>8}  counters")
    for name, b in final_blocks.items():
        print(f"{name:<12}{b['state']:<10}{b['in']:>11,}{b['out']:>11,}{b['rate_out']:>8.1f}  "
              + " ".join(f"{k}={v}" for k, v in b["counters"].items()))
    print(f"{'edge':<32}{'policy':<13}{'delivered':>10}{'dropped':>9}{'max fill':>10}")
    for i, e in enumerate(final_edges):
        fills = [s["edges"][i]["lag"] for s in samples if s["edges"][i]["lag"] is not None]
        fill = f"{max(fills)}/{e['capacity']}" if fills else "-"
        print(f"{e['edge']:<32}{e['policy']:<13}{e['popped']:>10,}{e['drops']:>9,}{fill:>10}")
    pools = collections.defaultdict(list)
    for s in samples:
        for pool in set(pools) | set(s["pool_blocks_in_use"]):
            pools[pool].append(s["pool_blocks_in_use"].get(pool, 0))
    print("pool blocks in use (held buffers) over the samples: "
          + ", ".join(f"{k} max {max(v)}, last {v[-1]}" for k, v in sorted(pools.items())))


# -- main -----------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of streaming (default 10)")
    ap.add_argument("--interval", type=float, default=None,
                    help="seconds between samples (default 10, shorter for runs under 200 s: 20 samples)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds not judged at the start (default 10 %% of the run, at most 60)")
    ap.add_argument("--bins", type=int, default=demo.BINS,
                    help=f"float32 bins per spectrum: the demo's frame size (default {demo.BINS:,})")
    ap.add_argument("--rate", type=float, default=None,
                    help=f"spectra per second (default the demo's {demo.RATE_HZ:g}; set like `mq param`)")
    add_json_option(ap, "soak", "the results (every sample too)")
    args = ap.parse_args()
    if args.minutes <= 0:
        ap.error("--minutes must be > 0")
    duration = args.minutes * 60
    args.interval = args.interval or min(10.0, duration / 20)
    args.warmup = min(60.0, duration / 10) if args.warmup is None else args.warmup
    if args.interval <= 0 or not 0 <= args.warmup < duration:
        ap.error("--interval must be > 0 and --warmup shorter than the run")
    return args


def run(domain: str, args, workdir: str) -> dict:
    """Start the demo, soak, diagnose, stop it; everything the report needs."""
    demo_process = start_demo(domain, args, workdir)
    graph = None
    try:
        graph = wait_running(domain, demo_process)
        if args.rate is not None:
            set_rate(domain, args.rate)
        samples = soak(domain, demo_process, graph, args)
        report = doctor.diagnose(domain)  # while it streams: nothing may be unaccounted for
        exit_code = stop_demo(demo_process)
        # the runtime unlinked the graph segment; our mapping still shows its last rows
        _, final_blocks, final_edges = graph_sample(graph, None)
        return {"samples": samples, "doctor": report, "exit_code": exit_code,
                "final_blocks": final_blocks, "final_edges": final_edges}
    finally:
        stop_demo(demo_process)
        if graph is not None:
            graph.close()


def main() -> None:
    args = parse_args()
    domain = f"soak{os.getpid()}"
    harness = Harness("soak", shm_prefixes=[f"{DEFAULT_PREFIX}{domain}."])
    rate = args.rate or demo.RATE_HZ
    print(f"the demo (spectrum monitor, 3 worker processes + the runtime's): {args.bins:,} float32 bins "
          f"({args.bins * 4 / 1024:,.0f} KiB) at {rate:g} spectra/s for {args.minutes:g} min; "
          f"a sample every {args.interval:g} s, the first {args.warmup:g} s not judged", flush=True)

    result = error = None
    with harness:  # kill PID stops the demo like Ctrl-C; what the demo left in /dev/shm is a leak
        try:
            result = run(domain, args, harness.workdir)
        except KeyboardInterrupt:
            error = "interrupted"
        except RuntimeError as e:
            error = str(e)
        finally:
            log, demo_output = collect(domain, harness.workdir)
    if error:
        print(f"\nERROR: {error}; the demo was stopped. Its output:\n{demo_output}")
        sys.exit(130 if error == "interrupted" else 1)
    report(args, harness, result, log, demo_output)


def collect(domain: str, workdir: str) -> tuple[tuple, str]:
    """The stopped demo's log: lines per level and its warnings (log_levels); its output."""
    log = log_levels(workdir, domain)
    try:
        with open(os.path.join(workdir, "demo.out"), errors="replace") as f:
            demo_output = f.read()
    except OSError:
        demo_output = ""
    return log, demo_output


def report(args, harness: Harness, result, log, demo_output) -> None:
    levels, notable = log
    leftovers = harness.leftovers
    samples = result["samples"]
    seconds = samples[-1]["t"]
    summary = {pid: summarize_process(s, args.warmup, seconds) for pid, s in process_series(samples).items()}
    findings = [f"{f.kind}: {f.message}" for f in result["doctor"].findings]
    verdicts = memory_verdicts(summary) + flow_verdicts(result["final_blocks"], result["final_edges"])
    verdicts += [
        (not findings, f"doctor before the stop: {len(findings)} findings"
                       + "".join(f"; {f}" for f in findings)),
        (result["exit_code"] == 0, f"demo exit code {result['exit_code']} (0: no pool block in use after "
                                   "its stop; None: it had to be killed)"),
        (not leftovers, f"/dev/shm after the stop: {', '.join(leftovers) or 'nothing of the domain'}"),
        (not levels["ERROR"], f"domain log: {levels['ERROR']} ERROR, {levels['WARNING']} WARNING lines"),
    ]
    print(f"\nPer process, after the {args.warmup:g} s warm-up ({seconds - args.warmup:.0f} s, "
          f"{summary and max(p['samples'] for p in summary.values())} samples), memory in KiB, "
          "slopes in KiB/min (USS = Private_Clean + Private_Dirty, anon = RssAnon):")
    print_process_table(summary)
    print(f"\nFrames over {seconds:.0f} s of streaming (rows after the stop; fill from the samples):")
    print_flow_table(result["final_blocks"], result["final_edges"], samples)
    print("\nThe demo's final report:\n" + demo_output[demo_output.find("final:"):].rstrip())
    print_verdicts([target(ok, text) for ok, text in verdicts], "Verdicts:")
    if notable:
        print("\nThe domain log's WARNING / ERROR lines" + (f" (the first {NOTABLE_KEPT})" if
              len(notable) == NOTABLE_KEPT else "") + ":\n" + "\n".join(f"  {line}" for line in notable))
    failed = [text for ok, text in verdicts if ok is False]
    print(f"\n{'FAIL' if failed else 'PASS'}: {len(failed)} failed verdict(s); "
          f"elapsed {harness.elapsed:.0f} s")
    if args.json:
        harness.write_json(args.json, {
            "params": {"minutes": args.minutes, "interval_s": args.interval, "warmup_s": args.warmup,
                       "bins": args.bins, "rate_hz": args.rate or demo.RATE_HZ},
            "limits": {"private_growth_kib": PRIVATE_GROWTH_LIMIT_KIB,
                       "private_slope_kib_min": PRIVATE_SLOPE_LIMIT_KIB_MIN,
                       "slope_min_window_min": SLOPE_MIN_WINDOW_MIN},
            "processes": summary,
            "final_blocks": result["final_blocks"],
            "final_edges": result["final_edges"],
            "doctor_findings": findings,
            "demo_exit_code": result["exit_code"],
            "log_levels": dict(levels),
            "log_warnings": notable,
            "verdicts": [target(ok, text) for ok, text in verdicts],
            "passed": not failed,
            "samples": samples,
        })
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
