"""`mq top`: a live view of a domain (tools.top samples it; this module prints it)."""

import json
import sys
import time

from ..graph.attach import wait_for_graph
from ..shm.resources import human_bytes
from ..tools.top import TopSampler
from .common import AttachedTool, CommandError, count, domain_name, seconds

_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("top", help="a live view of a domain: rates, fill, drops, CPU per process, "
                              "pools")
    p.add_argument("domain", type=domain_name)
    p.add_argument("--interval", type=seconds, default=1.0, help="seconds between two views (default 1)")
    p.add_argument("--iterations", type=count, default=None, help="stop after this many views")
    p.add_argument("--json", action="store_true", help="one JSON object per view, one a line")
    p.set_defaults(func=top, long_running=True)


def top(args) -> int:
    if not args.interval > 0:
        raise CommandError(f"--interval must be > 0 seconds, not {args.interval:g}")
    if args.iterations is not None and args.iterations < 1:
        raise CommandError(f"--iterations must be at least 1, not {args.iterations}")
    tty = sys.stdout.isatty() and not args.json
    shown = 0
    try:
        while True:
            shown, graph_seen = _watch(args, tty, shown)
            if not graph_seen or (args.iterations is not None and shown >= args.iterations):
                break
            # a graph's domain: its next run (`mq run` again) is the same thing to watch
            print(f"domain {args.domain!r}: its graph ended; waiting for its next run (Ctrl-C quits)",
                  file=sys.stderr, flush=True)
            wait_for_graph(args.domain)
    except KeyboardInterrupt:
        pass
    return 0


def _watch(args, tty: bool, shown: int) -> tuple[int, bool]:
    """Views of the domain until --iterations, or until it has no live process but `mq`
    tools left (then this one lets go of it, the last out removing it); returns the
    views shown in all and whether a graph ran in it."""
    graph_seen = False
    with AttachedTool(args.domain, "top", reaper_interval=1.0) as tool, TopSampler(tool.manager) as sampler:
        next_at = time.monotonic()
        while True:
            sample = sampler.sample()
            graph_seen |= sample["graph"] is not None
            _show(sample, args, tty, first=not shown)
            shown += 1
            if args.iterations is not None and shown >= args.iterations:
                return shown, graph_seen
            if not tool.others_alive():
                print(f"domain {args.domain!r} has no live process left", file=sys.stderr)
                return shown, graph_seen
            next_at += args.interval
            time.sleep(max(0.0, next_at - time.monotonic()))


def _show(sample: dict, args, tty: bool, first: bool) -> None:
    if args.json:
        print(json.dumps(sample), flush=True)
    elif tty:  # redraw in place
        sys.stdout.write(_CLEAR_SCREEN + format_top(sample, args.interval) + "\n")
        sys.stdout.flush()
    else:
        print(("" if first else "\n") + format_top(sample, args.interval), flush=True)


def format_top(sample: dict, interval: float) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(sample["time"]))
    graph = "no graph" if sample["graph"] is None else f"graph {sample['graph']}"
    lines = [f"mq top {sample['domain']}  {clock}  {graph}  (every {interval:g} s; Ctrl-C quits)", ""]
    if sample["blocks"]:
        lines += _format_blocks(sample) + [""]
    elif sample["queues"]:
        lines += _format_queues(sample) + [""]
    lines += _format_processes(sample) + [""] + _format_pools(sample)
    return "\n".join(lines)


def _format_blocks(sample: dict) -> list[str]:
    lines = [f"{'block':<16}{'state':<13}{'pid':>8}{'in/s':>10}{'out/s':>10}{'avg out/s':>10}{'in':>11}"
             f"{'out':>11}  now"]
    for b in sample["blocks"]:
        lines.append(f"{b['name']:<16}{b['state']:<13}{b['pid']:>8}{b['rate_in']:>10.1f}{b['rate_out']:>10.1f}"
                     f"{b['avg_rate_out']:>10.1f}{b['items_in']:>11}{b['items_out']:>11}  {b['status']}")
    lines.append("")
    lines.append(f"{'edge':<36}{'policy':<13}{'fill':>9}{'%':>6}{'drops':>9}")
    for e in sample["edges"]:
        fill = f"{e['lag']}/{e['capacity']}"
        lines.append(f"{e['src'] + ' -> ' + e['dst']:<36}{e['policy']:<13}{fill:>9}{e['fill']:>6.0%}"
                     f"{e['drops']:>9}")
    return lines


def _format_queues(sample: dict) -> list[str]:
    lines = [f"{'queue':<24}{'state':<11}{'pushed':>11}{'/s':>10}{'readers':>9}{'max lag':>11}{'drops':>9}"]
    for q in sample["queues"]:
        rate = "-" if q["rate"] is None else f"{q['rate']:.1f}"
        lag = f"{q['max_lag']}/{q['capacity']}"
        lines.append(f"{q['name']:<24}{q['state']:<11}{q['pushed']:>11}{rate:>10}{q['readers']:>9}{lag:>11}"
                     f"{q['drops']:>9}")
    return lines


def _format_processes(sample: dict) -> list[str]:
    lines = [f"{'pid':>8}  {'process':<24}{'cpu %':>7}{'rss':>12}"]
    for p in sample["processes"]:
        cpu = "DEAD" if not p["alive"] else "-" if p["cpu_percent"] is None else f"{p['cpu_percent']:.1f}"
        rss = "" if p["rss_bytes"] is None else human_bytes(p["rss_bytes"])
        lines.append(f"{p['pid']:>8}  {p['name']:<24}{cpu:>7}{rss:>12}")
    return lines


def _format_pools(sample: dict) -> list[str]:
    lines = [f"{'pool':<16}{'used':>14}{'util':>8}{'high':>8}"]
    for p in sample["pools"]:
        used = f"{p['used']}/{p['blocks']}"
        lines.append(f"{p['name']:<16}{used:>14}{p['utilization']:>8.1%}{p['high_water']:>8}")
    return lines
