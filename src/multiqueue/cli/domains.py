"""`mq ls`, `mq stats`, `mq clean` / `mq cleanup` and `mq doctor`: the domains of this
machine, one domain's numbers, removing dead ones, and who holds every buffer."""

import argparse
import dataclasses
import sys
from collections.abc import Iterable

from ..errors import DomainInUseError, MultiQueueError
from ..shm import ShmManager
from ..shm.resources import human_bytes
from ..shm.segment import DEFAULT_PREFIX, SHM_DIR, describe_processes, domain_segments, mapped_by
from ..stream.queue import QueueStats
from ..tools.doctor import diagnose
from ..tools.inspect import DomainInfo, GraphWatcher, QueueWatcher, domain_names, error_text, inspect_domain
from .common import AttachedTool, CommandError, domain_name, print_json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ls", help="the domains on this machine: processes (alive or dead), graph, "
                              "pools")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
    p.set_defaults(func=list_domains)
    p = subparsers.add_parser("stats", help="pools, counters, processes, queues and the graph's blocks of a "
                              "domain")
    p.add_argument("domain", type=domain_name)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=show_stats)
    for name, what in (("clean", "remove the segments of dead domains (all, or DOMAIN); never a live one"),
                       ("cleanup", "remove a stale domain (refused while it has live processes)")):
        p = subparsers.add_parser(name, help=what)
        if name == "clean":
            p.add_argument("domain", nargs="?", type=domain_name, default=None,
                           help="only this domain (refused, exit 1, if it is live)")
        else:
            p.add_argument("domain", type=domain_name)
        p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
        p.add_argument("--force", action="store_true",
                       help="with DOMAIN: also remove a damaged domain that live processes still map "
                       "(they keep their mappings, but nothing new can reach them); never one whose "
                       "registered processes live")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
        p.set_defaults(func=clean)
    p = subparsers.add_parser("doctor", help="explain every held buffer: holders, dead processes, leaks, "
                              "fixes")
    p.add_argument("domain", type=domain_name)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=doctor)


# -- mq ls ----------------------------------------------------------------------------------


def list_domains(args) -> int:
    domains = [inspect_domain(args.prefix, d) for d in domain_names(args.prefix)]
    if args.json:
        print_json({"domains": [d.to_json() for d in domains]})
    elif not domains:
        print(f"no multiqueue domains under {SHM_DIR} (prefix {args.prefix!r})")
    else:
        print("\n\n".join(_format_domain(d) for d in domains))
    return 0


def _format_domain(d: DomainInfo) -> str:
    alive = sum(p["alive"] for p in d.processes)
    graph = "no graph" if d.graph is None else f"graph {d.graph['state']} ({', '.join(d.graph['blocks'])})"
    lines = [f"{d.domain}: {d.state}, {alive}/{len(d.processes)} process(es) alive, {graph}, "
             f"{len(d.segments)} segment(s), {human_bytes(d.bytes)}"]
    if d.state not in ("live", "dead"):
        lines.append(f"  {d.reason}")
    if d.pools:
        lines.append("  pools: " + ", ".join(f"{p['name']} {p['used']}/{p['blocks']}" for p in d.pools))
    lines.extend(f"  pid {p['pid']:>7}  {p['name']:<24} {'alive' if p['alive'] else 'DEAD'}"
                 for p in d.processes)
    return "\n".join(lines)


# -- mq stats -------------------------------------------------------------------------------


def show_stats(args) -> int:
    with (AttachedTool(args.domain, "stats") as tool, QueueWatcher(tool.manager) as queues,
          GraphWatcher(tool.manager.prefix, tool.manager.domain) as graph):
        m = tool.manager
        queue_stats = queues.stats()
        graph_data = graph.stats(queue_stats)
        if args.json:
            stats = dataclasses.asdict(m.get_stats())
            stats["processes"] = m.processes()
            stats["queues"] = [dataclasses.asdict(q) for q in queue_stats.values()]
            stats["graph"] = graph_data
            print_json(stats)
            return 0
        m.print_stats()
        for p in m.processes():
            if not p["self"]:
                print(f"  process {p['pid']:>7} {p['name']:<24} {'alive' if p['alive'] else 'DEAD'}")
        print(format_queues(queue_stats.values()))
        if graph_data is not None:
            print(f"graph ({graph_data['state']}):")
            print(format_graph(graph_data))
    return 0


def format_queues(queues: Iterable[QueueStats]) -> str:
    queues = list(queues)
    if not queues:
        return "queues: none"
    lines = [f"{'queue':<24}{'capacity':>9}{'pushed':>11}  {'state':<10}readers (pid policy lag drops)"]
    for q in queues:
        readers = ", ".join(f"{r.pid} {r.policy} {r.lag}/{q.capacity} {r.drops}"
                            + ("" if r.alive else " DEAD") for r in q.readers) or "none"
        lines.append(f"{q.name:<24}{q.capacity:>9}{q.pushed:>11}  {q.closed:<10}{readers}")
    return "\n".join(lines)


def format_graph(g: dict) -> str:
    """The blocks (rates over the last second, then averages since each started; "now":
    what each does, e.g. waiting for pool 'frames') and the edges of graph stats as data."""
    lines = [f"{'block':<16}{'state':<13}{'pid':>8}{'in':>10}{'out':>10}{'in/s':>9}{'out/s':>9}"
             f"{'avg in/s':>10}{'avg out/s':>10}{'work s':>9}{'restarts':>9}  now"]
    for b in g["blocks"].values():
        lines.append(f"{b['name']:<16}{b['state']:<13}{b['pid']:>8}{b['items_in']:>10}{b['items_out']:>10}"
                     f"{b['rate_in_now']:>9.1f}{b['rate_out_now']:>9.1f}{b['rate_in']:>10.1f}"
                     f"{b['rate_out']:>10.1f}{b['work_s']:>9.2f}{b['restarts']:>9}  {b['status']}")
        if b.get("counters"):
            lines.append(" " * 16 + "  ".join(f"{k}={v}" for k, v in b["counters"].items()))
    lines.append(f"{'edge':<36}{'policy':<13}{'fill':>9}{'drops':>8}")
    for e in g["edges"]:
        fill = f"{e['lag']}/{e['capacity']}"
        lines.append(f"{e['src'] + ' -> ' + e['dst']:<36}{e['policy']:<13}{fill:>9}{e['drops']:>8}")
    return "\n".join(lines)


# -- mq clean / mq cleanup ------------------------------------------------------------------


def clean(args) -> int:
    """Remove the segments of dead domains (every one, or the one named); never a live one."""
    if args.force and args.domain is None:
        raise CommandError("--force removes one damaged domain: name it (mq clean DOMAIN --force)")
    if args.domain is not None and not domain_segments(args.prefix, args.domain):
        if args.command == "cleanup" and not args.json:  # what `mq cleanup` always said
            print(f"removed 0 segment(s) of domain {args.domain!r}")
            return 0
        raise CommandError(f"no domain {args.domain!r}: nothing under {SHM_DIR} starts with "
                           f"{args.prefix}{args.domain}.")
    names = [args.domain] if args.domain is not None else domain_names(args.prefix)
    results = [_clean_domain(args.prefix, domain, args.dry_run, args.force) for domain in names]
    refused = next((e for e in results if e["action"] == "kept"), None) if args.domain is not None else None
    if args.json:
        print_json({"dry_run": args.dry_run, "domains": results})
    else:
        _print_cleaned(results, args, refused)
    if refused is not None:
        print(f"mq {args.command}: domain {refused['domain']!r} is {refused['state']}: {refused['reason']}; "
              f"nothing removed{_force_hint(refused)}", file=sys.stderr)
        return 1
    return 0


def _clean_domain(prefix: str, domain: str, dry_run: bool, force: bool = False) -> dict:
    """Remove one domain if it is dead or stale (or, forced, unreadable); what was done, as data."""
    info = inspect_domain(prefix, domain)
    entry = {"domain": domain, "state": info.state, "reason": info.reason, "segments": info.segments}
    if info.state not in ("dead", "stale") and not (force and info.state == "unreadable"):
        entry["action"] = "kept"
    elif dry_run:
        entry["action"] = "would remove"
    else:
        try:
            entry["segments"] = ShmManager.cleanup(domain, prefix, force=force)
            entry["action"] = "removed"
        except DomainInUseError as e:  # a process attached since we looked
            entry.update(action="kept", state="live", reason=error_text(e))
        except (MultiQueueError, OSError) as e:  # e.g. a segment we may not remove
            entry.update(action="kept", reason=f"cannot remove it: {error_text(e)}")
    return entry


def _force_hint(refused: dict) -> str:
    """For a damaged domain that live processes map: who they are, and what --force does."""
    users = mapped_by(refused["segments"]) if refused["state"] == "unreadable" else []
    if not users:
        return ""
    domain = refused["domain"]
    return (f"; it is mapped by {describe_processes(users)}: stop them, or `mq clean {domain} --force` "
            "removes its files anyway (those processes keep their mappings, but nothing new can reach them)")


def _print_cleaned(results: list[dict], args, refused: dict | None) -> None:
    for e in results:
        if e["action"] == "kept":
            if refused is None:
                print(f"kept domain {e['domain']!r} ({e['state']}): {e['reason']}")
            continue
        print(f"{e['action']} {len(e['segments'])} segment(s) of domain {e['domain']!r} ({e['reason']})")
        for path in e["segments"]:
            print(f"  {path}")
    if args.domain is None:
        removed = sum(e["action"] != "kept" for e in results)
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {removed} dead domain(s), kept {len(results) - removed}")


# -- mq doctor ------------------------------------------------------------------------------


def doctor(args) -> int:
    """Explain every held buffer of a domain; exit 1 when something needs fixing."""
    report = diagnose(args.domain)
    if args.json:
        print_json(report.to_json())
    else:
        print(report.format())
    return 0 if report.ok else 1
