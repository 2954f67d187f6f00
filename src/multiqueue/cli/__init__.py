"""The `mq` command: demos, graph files, and tools to look into and control the domains
of this machine: ls, stats, top, param, pub / send / sub, logs, tap and clean."""

import argparse
import ctypes
import dataclasses
import json
import os
import re
import signal
import sys
import threading
import time

from ..checks import check_int, check_number
from ..errors import DomainInUseError, MultiQueueError, SegmentError
from ..shm import ShmManager
from ..shm import layout as L
from ..shm.resources import human_bytes
from ..shm.segment import (
    DEFAULT_PREFIX,
    SHM_DIR,
    DomainLock,
    check_domain,
    domain_segments,
    is_alive,
    mapped_by,
    open_segment,
    segment_path,
)

_STARTING_S = 10.0  # a domain with no process yet whose creator lives is being created for this long


class _Fail(Exception):
    """A command cannot go on: its message is printed as one line, exit status 1."""


def _message(e: BaseException) -> str:
    """An error's text without the "[Errno N]" an OSError-based error puts in front."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str), flush=True)


# -- attaching as a tool ------------------------------------------------------------------


_TOOL = "mq:"  # the process name of an `mq` tool attached to a domain starts with this


class _Tool:
    """A tool process attached to an existing domain (never creates one), named "mq:<command>".

    It leaves a domain as it found it: if the domain had no other live process when
    the tool came (a crashed domain looked at), its segments stay for `mq clean`; if
    it had, and they all left while the tool was attached, the tool was the last
    process of the domain and removes its segments, as the last process always does.
    Other tools do not count as the domain's processes here: two `mq top` must not
    keep a finished domain alive for each other.
    """

    def __init__(self, domain: str, command: str, reaper_interval: float | None = None):
        self.manager = ShmManager(domain, name=_TOOL + command, create=False, reaper_interval=reaper_interval)
        self.others_seen = False
        self.others_alive()

    def others_alive(self) -> bool:
        """Is a process of the domain other than `mq` tools alive now?"""
        alive = any(p["alive"] and not p["self"] and not p["name"].startswith(_TOOL)
                    for p in self.manager.processes())
        self.others_seen |= alive
        return alive

    def close(self) -> None:
        self.manager.shutdown(unlink=None if self.others_seen else False)

    def __enter__(self) -> "_Tool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _queue_files(manager: ShmManager) -> dict[str, int]:
    """The port queues of a domain under /dev/shm: name -> inode."""
    start = os.path.basename(segment_path(manager.prefix, manager.domain, "q."))
    out = {}
    for path in domain_segments(manager.prefix, manager.domain):
        base = os.path.basename(path)
        if base.startswith(start) and ".tmp-" not in base:
            try:
                out[base[len(start):]] = os.stat(path).st_ino
            except FileNotFoundError:
                pass
    return out


class _Queues:
    """Every port queue of a domain, opened for its stats and kept in step with /dev/shm."""

    def __init__(self, manager: ShmManager):
        self.manager = manager
        self.open: dict[str, tuple[int, object]] = {}

    def stats(self) -> dict:
        """name -> QueueStats of every queue that exists now."""
        from ..stream.queue import PortQueue

        files = _queue_files(self.manager)
        for name, (ino, q) in list(self.open.items()):
            if files.get(name) != ino:  # removed, or replaced by a new queue of that name
                del self.open[name]
                q.release()
        for name in sorted(set(files) - set(self.open)):
            try:
                self.open[name] = (files[name], PortQueue(self.manager, name, create=False))
            except (MultiQueueError, ValueError):
                pass  # removed meanwhile, or not a queue this version can read
        return {name: q.stats() for name, (_ino, q) in self.open.items()}

    def close(self) -> None:
        for _ino, q in self.open.values():
            q.release()
        self.open.clear()


class _Graph:
    """The graph segment of a domain (if a graph runs), reopened when a new graph starts."""

    def __init__(self, prefix: str, domain: str):
        self.path = segment_path(prefix, domain, "graph")
        self.segment = None
        self.ino = None
        self.running = False

    def get(self):
        """The GraphSegment now, or None if the domain runs no graph."""
        from ..graph import registry as R

        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            ino = None
        if ino != self.ino:
            self.close()
            if ino is not None:
                try:
                    segment = open_segment(self.path, R.MAGIC_GRAPH, R.KIND_GRAPH)
                except SegmentError:
                    return None
                self.running = is_alive(segment.header.creator_pid, segment.header.creator_start)
                self.segment, self.ino = R.GraphSegment(segment), ino
        return self.segment

    def stats(self, queue_stats: dict) -> dict | None:
        """The graph's blocks and edges as data (None if no graph runs)."""
        from ..graph.runtime import graph_stats

        graph = self.get()
        if graph is None:
            return None
        s = graph_stats(graph, queue_stats)
        return {"state": "running" if self.running else "stale",
                "blocks": {name: dataclasses.asdict(b) for name, b in s.blocks.items()},
                "edges": [dataclasses.asdict(e) for e in s.edges]}

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
        self.segment = self.ino = None


def _queue_row(q) -> dict:
    return dataclasses.asdict(q)


# -- mq stats -----------------------------------------------------------------------------


def _stats(args) -> int:
    with _Tool(args.domain, "stats") as tool:
        m = tool.manager
        queues, graph = _Queues(m), _Graph(m.prefix, m.domain)
        try:
            queue_stats = queues.stats()
            graph_data = graph.stats(queue_stats)
            if args.json:
                stats = dataclasses.asdict(m.get_stats())
                stats["processes"] = m.processes()
                stats["queues"] = [_queue_row(q) for q in queue_stats.values()]
                stats["graph"] = graph_data
                _print_json(stats)
                return 0
            m.print_stats()
            for p in m.processes():
                if not p["self"]:
                    state = "alive" if p["alive"] else "DEAD"
                    print(f"  process {p['pid']:>7} {p['name']:<24} {state}")
            print(_format_queues(queue_stats.values()))
            if graph_data is not None:
                print(f"graph ({graph_data['state']}):")
                print(_format_graph(graph_data))
        finally:
            queues.close()
            graph.close()
    return 0


def _format_queues(queues) -> str:
    queues = list(queues)
    if not queues:
        return "queues: none"
    lines = [f"{'queue':<24}{'capacity':>9}{'pushed':>11}  {'state':<10}readers (pid policy lag drops)"]
    for q in queues:
        readers = ", ".join(f"{r.pid} {r.policy} {r.lag}/{q.capacity} {r.drops}"
                            + ("" if r.alive else " DEAD") for r in q.readers) or "none"
        lines.append(f"{q.name:<24}{q.capacity:>9}{q.pushed:>11}  {q.closed:<10}{readers}")
    return "\n".join(lines)


def _format_graph(g: dict) -> str:
    lines = [f"{'block':<16}{'state':<13}{'pid':>8}{'in':>10}{'out':>10}{'in/s':>10}{'out/s':>10}"
             f"{'work s':>9}{'restarts':>9}"]
    for b in g["blocks"].values():
        lines.append(f"{b['name']:<16}{b['state']:<13}{b['pid']:>8}{b['items_in']:>10}{b['items_out']:>10}"
                     f"{b['rate_in']:>10.1f}{b['rate_out']:>10.1f}{b['work_s']:>9.2f}{b['restarts']:>9}")
        if b.get("counters"):
            lines.append(" " * 16 + "  ".join(f"{k}={v}" for k, v in b["counters"].items()))
    lines.append(f"{'edge':<36}{'policy':<13}{'fill':>9}{'drops':>8}")
    for e in g["edges"]:
        fill = f"{e['lag']}/{e['capacity']}"
        lines.append(f"{e['src'] + ' -> ' + e['dst']:<36}{e['policy']:<13}{fill:>9}{e['drops']:>8}")
    return "\n".join(lines)


# -- mq ls and mq clean: looking at domains without attaching to them ----------------------


def _domain_names(prefix: str) -> list[str]:
    """Every domain with a segment under /dev/shm."""
    try:
        names = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    found = set()
    for name in names:
        if name.startswith(prefix) and "." in name[len(prefix):]:
            domain = name[len(prefix):].split(".", 1)[0]
            try:
                found.add(check_domain(domain))
            except ValueError:
                pass
    return sorted(found)


def _raw_header(path: str):
    """The segment header of a file, read without checking it (None if unreadable)."""
    try:
        with open(path, "rb") as f:
            data = f.read(ctypes.sizeof(L.SegmentHeader))
    except OSError:
        return None
    return L.SegmentHeader.from_buffer_copy(data) if len(data) == ctypes.sizeof(L.SegmentHeader) else None


def _live_creators(paths: list[str]) -> list[int]:
    """Pids of live processes that created (or are creating) some of these segments."""
    pids = set()
    for path in paths:
        base = os.path.basename(path)
        if ".tmp-" in base:  # a segment being built: <name>.tmp-<pid>-<random>
            pid = base.rsplit(".tmp-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
                pids.add(int(pid))
            continue
        header = _raw_header(path)
        if header is not None and is_alive(header.creator_pid, header.creator_start):
            pids.add(header.creator_pid)
    return sorted(pids)


def _inspect(prefix: str, domain: str) -> dict:
    """What a domain is, read from its segments without attaching to it (no side effect).

    state: "live" (a registered process is alive), "dead" (none is: removable),
    "starting" (being created), "stale" (segments without a control segment, their
    creators dead: removable), "unreadable" (a control segment this version cannot
    read, whose creator is alive)."""
    from ..graph import registry as R

    paths = domain_segments(prefix, domain)
    size = 0
    for path in paths:
        try:
            size += os.stat(path).st_size
        except FileNotFoundError:
            pass
    info = {"domain": domain, "state": "", "reason": "", "processes": [], "pools": [], "graph": None,
            "segments": paths, "bytes": size}
    control = segment_path(prefix, domain, "ctl")
    owners = set()
    for path in paths:
        try:
            owners.add(os.stat(path).st_uid)
        except FileNotFoundError:
            pass
    if os.getuid() != 0 and owners - {os.getuid()}:
        info["state"] = "unreadable"
        info["reason"] = f"its segments belong to another user (uid {', '.join(map(str, sorted(owners)))})"
        return info
    if control not in paths:
        creators = _live_creators(paths) or mapped_by(paths)
        if creators:
            info["state"] = "starting"
            info["reason"] = f"no control segment (yet); used by pid {', '.join(map(str, creators))}"
        else:
            info["state"] = "stale"
            info["reason"] = "segments without a control segment, left by dead processes"
        return info
    try:
        seg = open_segment(control, L.MAGIC_CONTROL, L.KIND_CONTROL)
    except SegmentError as e:  # another layout version, or not ours: its process table cannot be read,
        users = mapped_by(paths)  # so the processes that map its segments tell whether it is in use
        info["state"] = "unreadable" if users else "stale"
        info["reason"] = _message(e) + (f" (mapped by pid {', '.join(map(str, users))})" if users
                                        else " (no process maps its segments)")
        return info
    try:
        creator_alive = is_alive(seg.header.creator_pid, seg.header.creator_start)
        age_s = (time.time_ns() - seg.header.created_ns) / 1e9
        with DomainLock(seg.fd):
            c = L.Control.from_buffer(seg.mmap)
            procs = (L.Process * c.max_processes).from_buffer(seg.mmap, c.procs_offset)
            pools = (L.Pool * c.max_pools).from_buffer(seg.mmap, c.pools_offset)
            info["processes"] = [
                {"slot": slot, "pid": p.pid, "name": p.name.decode(errors="replace"),
                 "alive": is_alive(p.pid, p.start_time)}
                for slot, p in enumerate(procs) if p.state != L.PROC_FREE]
            info["pools"] = [
                {"name": p.name.decode(errors="replace"), "block_size": p.block_size,
                 "blocks": p.block_count, "used": p.used}
                for p in pools if p.state == L.POOL_ACTIVE]
            del c, procs, pools
    finally:
        seg.close()
    live = [p for p in info["processes"] if p["alive"]]
    if live:
        info["state"] = "live"
        names = ", ".join(f"{p['name']} (pid {p['pid']})" for p in live)
        info["reason"] = f"still has live processes {names}; stop them first"
    elif not info["processes"] and creator_alive and age_s < _STARTING_S:
        info["state"] = "starting"
        info["reason"] = (f"created {age_s:.1f} s ago by pid {seg.header.creator_pid}, "
                          "which has not registered yet")
    else:
        info["state"] = "dead"
        n = len(info["processes"])
        info["reason"] = f"all {n} registered process(es) are dead" if n else "no process is registered"
    graph_path = segment_path(prefix, domain, "graph")
    if graph_path in paths:
        try:
            gseg = open_segment(graph_path, R.MAGIC_GRAPH, R.KIND_GRAPH)
        except SegmentError:
            gseg = None
        if gseg is not None:
            running = is_alive(gseg.header.creator_pid, gseg.header.creator_start)
            pid = gseg.header.creator_pid
            graph = R.GraphSegment(gseg)
            info["graph"] = {"state": "running" if running else "stale", "pid": pid,
                             "blocks": [b["name"] for b in graph.description["blocks"]]}
            graph.close()
    return info


def _inspect_safely(prefix: str, domain: str) -> dict:
    """_inspect, but a domain that changes under our feet (or anything odd) is reported, not fatal."""
    try:
        return _inspect(prefix, domain)
    except (OSError, ValueError, MultiQueueError) as e:
        return {"domain": domain, "state": "unreadable", "reason": _message(e), "processes": [], "pools": [],
                "graph": None, "segments": domain_segments(prefix, domain), "bytes": 0}


def _ls(args) -> int:
    domains = [_inspect_safely(args.prefix, d) for d in _domain_names(args.prefix)]
    if args.json:
        _print_json({"domains": domains})
        return 0
    if not domains:
        print(f"no multiqueue domains under {SHM_DIR} (prefix {args.prefix!r})")
        return 0
    for i, d in enumerate(domains):
        if i:
            print()
        alive = sum(p["alive"] for p in d["processes"])
        graph = "no graph"
        if d["graph"] is not None:
            g = d["graph"]
            graph = f"graph {g['state']} ({', '.join(g['blocks'])})"
        print(f"{d['domain']}: {d['state']}, {alive}/{len(d['processes'])} process(es) alive, {graph}, "
              f"{len(d['segments'])} segment(s), {human_bytes(d['bytes'])}")
        if d["state"] not in ("live", "dead"):
            print(f"  {d['reason']}")
        if d["pools"]:
            print("  pools: " + ", ".join(f"{p['name']} {p['used']}/{p['blocks']}" for p in d["pools"]))
        for p in d["processes"]:
            print(f"  pid {p['pid']:>7}  {p['name']:<24} {'alive' if p['alive'] else 'DEAD'}")
    return 0


def _clean(args) -> int:
    """Remove the segments of dead domains (every one, or the one named); never a live one."""
    if args.domain is not None:
        if not domain_segments(args.prefix, args.domain):
            if args.command == "cleanup" and not args.json:  # what `mq cleanup` always said
                print(f"removed 0 segment(s) of domain {args.domain!r}")
                return 0
            raise _Fail(f"no domain {args.domain!r}: nothing under {SHM_DIR} starts with "
                        f"{args.prefix}{args.domain}.")
        names = [args.domain]
    else:
        names = _domain_names(args.prefix)
    results, refused = [], None
    for domain in names:
        info = _inspect_safely(args.prefix, domain)
        entry = {"domain": domain, "state": info["state"], "reason": info["reason"],
                 "segments": info["segments"]}
        if info["state"] in ("dead", "stale"):
            if args.dry_run:
                entry["action"] = "would remove"
            else:
                try:
                    entry["segments"] = ShmManager.cleanup(domain, args.prefix)
                    entry["action"] = "removed"
                except DomainInUseError as e:  # a process attached since we looked
                    entry.update(action="kept", state="live", reason=_message(e))
                except (MultiQueueError, OSError) as e:  # e.g. a segment we may not remove
                    entry.update(action="kept", reason=f"cannot remove it: {_message(e)}")
        else:
            entry["action"] = "kept"
        if entry["action"] == "kept" and args.domain is not None:
            refused = entry
        results.append(entry)
    if args.json:
        _print_json({"dry_run": args.dry_run, "domains": results})
    else:
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
    if refused is not None:
        print(f"mq {args.command}: domain {refused['domain']!r} is {refused['state']}: {refused['reason']}; "
              "nothing removed", file=sys.stderr)
        return 1
    return 0


# -- mq top ---------------------------------------------------------------------------------


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _proc_times(pid: int) -> tuple[int, int, int] | None:
    """(utime + stime, start time, rss pages) of a process from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[11]) + int(fields[12]), int(fields[19]), int(fields[21])


def _uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class _Top:
    """Snapshots of a domain; rates and CPU are differences between two of them."""

    def __init__(self, tool: _Tool):
        self.tool = tool
        m = tool.manager
        self.queues, self.graph = _Queues(m), _Graph(m.prefix, m.domain)
        self.previous: dict | None = None

    def snapshot(self) -> dict:
        m = self.tool.manager
        now, uptime = time.monotonic(), _uptime()
        prev = self.previous
        dt = now - prev["_t"] if prev else 0.0
        queue_stats = self.queues.stats()
        graph = self.graph.stats(queue_stats)
        snap = {"domain": m.domain, "time": time.time(), "_t": now, "_cpu": {}, "_items": {}, "_pushed": {},
                "graph": None if graph is None else graph["state"], "blocks": [], "edges": [],
                "processes": [], "pools": [], "queues": []}
        if graph is not None:
            for b in graph["blocks"].values():
                key = (b["name"], b["pid"])
                snap["_items"][key] = (b["items_in"], b["items_out"])
                rate_in, rate_out = b["rate_in"], b["rate_out"]  # since it started, the first time
                if prev and key in prev["_items"] and dt > 0:
                    before = prev["_items"][key]
                    rate_in = max(0, b["items_in"] - before[0]) / dt
                    rate_out = max(0, b["items_out"] - before[1]) / dt
                snap["blocks"].append({"name": b["name"], "state": b["state"], "pid": b["pid"],
                                       "items_in": b["items_in"], "items_out": b["items_out"],
                                       "rate_in": rate_in, "rate_out": rate_out, "restarts": b["restarts"]})
            for e in graph["edges"]:
                snap["edges"].append({**e, "fill": e["lag"] / e["capacity"] if e["capacity"] else 0.0})
        for p in m.processes():
            if p["self"]:
                continue
            times = _proc_times(p["pid"]) if p["alive"] else None
            cpu = rss = None
            if times is not None:
                ticks, start, pages = times
                snap["_cpu"][p["pid"]] = (ticks, start)
                rss = pages * _PAGE_SIZE
                before = prev["_cpu"].get(p["pid"]) if prev else None
                if before is not None and before[1] == start and dt > 0:
                    cpu = 100.0 * (ticks - before[0]) / _CLOCK_TICKS / dt
                else:  # the first look: its average since it started
                    lived = uptime - start / _CLOCK_TICKS
                    cpu = 100.0 * ticks / _CLOCK_TICKS / lived if lived > 0 else 0.0
            snap["processes"].append({"pid": p["pid"], "name": p["name"], "alive": p["alive"],
                                      "cpu_percent": cpu, "rss_bytes": rss})
        for s in m.get_stats().pool_stats:
            snap["pools"].append({"name": s.name, "used": s.blocks_used, "blocks": s.block_count,
                                  "utilization": s.utilization, "high_water": s.high_water})
        for name, q in queue_stats.items():
            snap["_pushed"][name] = q.pushed
            before = prev["_pushed"].get(name) if prev else None
            rate = max(0, q.pushed - before) / dt if before is not None and dt > 0 else None
            snap["queues"].append({"name": name, "capacity": q.capacity, "pushed": q.pushed, "rate": rate,
                                   "state": q.closed, "readers": len(q.readers),
                                   "max_lag": max((r.lag for r in q.readers), default=0),
                                   "drops": sum(r.drops for r in q.readers)})
        self.previous = snap
        return snap

    def close(self) -> None:
        self.queues.close()
        self.graph.close()


def _public(snap: dict) -> dict:
    return {k: v for k, v in snap.items() if not k.startswith("_")}


def _format_top(snap: dict, interval: float) -> str:
    clock = time.strftime("%H:%M:%S", time.localtime(snap["time"]))
    graph = "no graph" if snap["graph"] is None else f"graph {snap['graph']}"
    lines = [f"mq top {snap['domain']}  {clock}  {graph}  (every {interval:g} s; Ctrl-C quits)", ""]
    if snap["blocks"]:
        lines.append(f"{'block':<16}{'state':<13}{'pid':>8}{'in/s':>10}{'out/s':>10}{'in':>11}{'out':>11}")
        for b in snap["blocks"]:
            lines.append(f"{b['name']:<16}{b['state']:<13}{b['pid']:>8}{b['rate_in']:>10.1f}{b['rate_out']:>10.1f}"
                         f"{b['items_in']:>11}{b['items_out']:>11}")
        lines.append("")
        lines.append(f"{'edge':<36}{'policy':<13}{'fill':>9}{'%':>6}{'drops':>9}")
        for e in snap["edges"]:
            fill = f"{e['lag']}/{e['capacity']}"
            lines.append(f"{e['src'] + ' -> ' + e['dst']:<36}{e['policy']:<13}{fill:>9}{e['fill']:>6.0%}"
                         f"{e['drops']:>9}")
        lines.append("")
    elif snap["queues"]:
        lines.append(f"{'queue':<24}{'state':<11}{'pushed':>11}{'/s':>10}{'readers':>9}{'max lag':>11}"
                     f"{'drops':>9}")
        for q in snap["queues"]:
            rate = "-" if q["rate"] is None else f"{q['rate']:.1f}"
            lag = f"{q['max_lag']}/{q['capacity']}"
            lines.append(f"{q['name']:<24}{q['state']:<11}{q['pushed']:>11}{rate:>10}{q['readers']:>9}{lag:>11}"
                         f"{q['drops']:>9}")
        lines.append("")
    lines.append(f"{'pid':>8}  {'process':<24}{'cpu %':>7}{'rss':>12}")
    for p in snap["processes"]:
        cpu = "DEAD" if not p["alive"] else "-" if p["cpu_percent"] is None else f"{p['cpu_percent']:.1f}"
        rss = "" if p["rss_bytes"] is None else human_bytes(p["rss_bytes"])
        lines.append(f"{p['pid']:>8}  {p['name']:<24}{cpu:>7}{rss:>12}")
    lines.append("")
    lines.append(f"{'pool':<16}{'used':>14}{'util':>8}{'high':>8}")
    for p in snap["pools"]:
        used = f"{p['used']}/{p['blocks']}"
        lines.append(f"{p['name']:<16}{used:>14}{p['utilization']:>8.1%}{p['high_water']:>8}")
    return "\n".join(lines)


def _top(args) -> int:
    if not args.interval > 0:
        raise _Fail(f"--interval must be > 0 seconds, not {args.interval:g}")
    if args.iterations is not None and args.iterations < 1:
        raise _Fail(f"--iterations must be at least 1, not {args.iterations}")
    tty = sys.stdout.isatty() and not args.json
    with _Tool(args.domain, "top", reaper_interval=1.0) as tool:
        top = _Top(tool)
        shown = 0
        try:
            next_at = time.monotonic()
            while True:
                snap = top.snapshot()
                if args.json:
                    print(json.dumps(_public(snap)), flush=True)
                elif tty:
                    sys.stdout.write("\x1b[H\x1b[2J" + _format_top(snap, args.interval) + "\n")
                    sys.stdout.flush()
                else:
                    print(("\n" if shown else "") + _format_top(snap, args.interval), flush=True)
                shown += 1
                if args.iterations is not None and shown >= args.iterations:
                    break
                if not tool.others_alive():
                    print(f"domain {args.domain!r} has no live process left", file=sys.stderr)
                    break
                next_at += args.interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        except KeyboardInterrupt:
            pass
        finally:
            top.close()
    return 0


# -- mq param, pub, send, sub: the message bus -------------------------------------------


def _parse_value(text: str, as_text: bool = False):
    """JSON if it parses (numbers, true, lists, objects...), else the string itself."""
    if as_text:
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _topic_queue(manager: ShmManager, topic: str) -> str:
    return segment_path(manager.prefix, manager.domain, f"q.b-{topic}")


def _subscribers(manager: ShmManager, topic: str) -> int:
    """Live subscribers of a bus topic now (0 if nobody ever subscribed to it)."""
    from ..stream.queue import PortQueue

    try:
        q = PortQueue(manager, f"b-{topic}", create=False)
    except (MultiQueueError, ValueError):
        return 0
    try:
        return sum(r.alive for r in q.stats().readers)
    finally:
        q.release()


def _check_topic(topic: str) -> str:
    from ..control.topics import check_topic as _check_topic

    try:
        _check_topic(topic)
    except ValueError as e:
        raise _Fail(str(e)) from None
    return topic


def _param(args) -> int:
    from ..control.bus import Bus
    from ..control.topics import control_topic

    topic = _check_topic(control_topic(args.block))
    what = f"{args.block}.{args.name}"
    with _Tool(args.domain, "param") as tool:
        m = tool.manager
        graph = _Graph(m.prefix, m.domain)
        try:
            g = graph.get()
            if g is not None:
                from ..graph import registry as R

                blocks = [b["name"] for b in g.description["blocks"]]
                if args.block not in blocks:
                    raise _Fail(f"the graph of domain {args.domain!r} has no block {args.block!r}; "
                                f"it has {blocks}")
                state = R.STATES[g.block_rows[g.block_index(args.block)][R.STATE]]
                if state in ("done", "failed", "stopped"):
                    raise _Fail(f"block {args.block!r} has {state}: it takes no commands any more")
        finally:
            graph.close()
        if not os.path.exists(_topic_queue(m, topic)):
            raise _Fail(f"no block {args.block!r} takes commands in domain {args.domain!r} "
                        f"(nobody subscribes to topic {topic!r})")
        if args.value is None:
            command = {"cmd": "get", "name": args.name}
        else:
            command = {"cmd": "set", "name": args.name, "value": _parse_value(args.value, args.text),
                       "at_ns": args.at_ns}
        with Bus(m) as bus:
            try:
                answer = bus.request(topic, command, timeout=args.timeout).data
            except TimeoutError:
                raise _Fail(f"block {args.block!r} did not answer on topic {topic!r} within "
                            f"{args.timeout:g} s; is it running?") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        error = answer.get("error") if isinstance(answer, dict) else repr(answer)
        if args.json:
            _print_json({"block": args.block, "name": args.name, "ok": False, "error": error})
        raise _Fail(f"block {args.block!r} refused: {error}")
    value = answer.get("value") if command["cmd"] == "get" else command["value"]
    if args.json:
        _print_json({"block": args.block, "name": args.name, "ok": True, "cmd": command["cmd"],
                     "value": value, "at_ns": args.at_ns if command["cmd"] == "set" else None})
    elif command["cmd"] == "get":
        print(f"{what} = {json.dumps(value)}")
    else:
        when = f" at t >= {args.at_ns} ns" if args.at_ns is not None else ""
        print(f"{what} set to {json.dumps(value)}{when} (acknowledged)")
    return 0


def _publish(args, topic: str, point_to_point: bool) -> int:
    from ..control.bus import Bus

    data = _parse_value(args.message, args.text)
    with _Tool(args.domain, args.command) as tool:
        m = tool.manager
        n = _subscribers(m, topic)
        if n:
            with Bus(m) as bus:
                try:
                    bus.publish(topic, data, keep=False)
                except TypeError as e:
                    raise _Fail(str(e)) from None
    if args.json:
        _print_json({"topic": topic, "subscribers": n, "sent": bool(n), "sender_pid": os.getpid()})
    if not n:
        if point_to_point:
            raise _Fail(f"nobody reads the inbox of {args.target!r} (topic {topic!r}) in domain "
                        f"{args.domain!r}; nothing sent")
        if not args.json:
            print(f"nobody subscribes to topic {topic!r} in domain {args.domain!r}; nothing sent")
        return 0
    if not args.json:
        print(f"sent to {topic!r} in domain {args.domain!r}: {n} subscriber(s)")
    return 0


def _pub(args) -> int:
    return _publish(args, _check_topic(args.topic), point_to_point=False)


def _send(args) -> int:
    from ..control.bus import inbox_topic

    return _publish(args, _check_topic(inbox_topic(args.target)), point_to_point=True)


def _message_row(message) -> dict:
    row = {"topic": message.topic, "sender_pid": message.sender_pid, "seq": message.seq,
           "timestamp": message.timestamp}
    if isinstance(message.data, bytes):
        row["data_hex"] = message.data.hex()
    else:
        row["data"] = message.data
    return row


def _sub(args) -> int:
    from ..control.bus import Bus, inbox_topic

    topic = _check_topic(inbox_topic(args.topic) if args.inbox else args.topic)
    if args.count is not None and args.count < 1:
        raise _Fail(f"--count must be at least 1, not {args.count}")
    seen = 0
    with _Tool(args.domain, "sub", reaper_interval=1.0) as tool:
        bus = Bus(tool.manager)
        sub = bus.subscribe(topic)
        print(f"subscribed to {topic!r} in domain {args.domain!r}; Ctrl-C stops", file=sys.stderr, flush=True)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        try:
            while args.count is None or seen < args.count:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                message = sub.get(timeout=0.5 if left is None else min(0.5, left))
                if message is None:
                    if tool.others_seen and not tool.others_alive():
                        print(f"domain {args.domain!r} has no live process left", file=sys.stderr)
                        break
                    continue
                seen += 1
                if args.json:
                    print(json.dumps(_message_row(message)), flush=True)
                else:
                    data = repr(message.data) if isinstance(message.data, bytes) else json.dumps(message.data)
                    print(f"{message.topic} pid={message.sender_pid} seq={message.seq} {data}", flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            drops = sub.drops
            bus.close()
        if drops:
            print(f"{drops} message(s) lost: this subscriber read too slowly", file=sys.stderr)
    if args.count is not None and seen < args.count and args.timeout is not None:
        raise _Fail(f"{seen} of {args.count} message(s) on topic {topic!r} within {args.timeout:g} s")
    return 0


# -- mq logs --------------------------------------------------------------------------------


_LOG_LINE = re.compile(r"^(\S+) (\S+) +pid=(\d+) process=(.*?) block=(\S+) ([^ :]+): (.*)$")


def _log_row(line: str) -> dict:
    """A log line as data (multiqueue.control.log); a line of another shape as {"text": ...}."""
    match = _LOG_LINE.match(line)
    if match is None:
        return {"text": line}
    when, level, pid, process, block, logger, text = match.groups()
    return {"time": when, "level": level, "pid": int(pid), "process": process, "block": block,
            "logger": logger, "message": text}


def _logs(args) -> int:
    from ..control.log import log_path, read_lines

    path = log_path(args.domain)
    if args.lines < 0:
        raise _Fail(f"-n must be >= 0, not {args.lines}")

    def emit(line: str) -> None:
        print(json.dumps(_log_row(line)) if args.json else line, flush=True)

    if not os.path.exists(path) and not os.path.exists(segment_path(DEFAULT_PREFIX, args.domain, "ctl")):
        raise _Fail(f"no domain {args.domain!r} and no log of it ({path})")
    if not args.follow:
        if not os.path.exists(path):
            print(f"domain {args.domain!r} has no log yet ({path})", file=sys.stderr)
        for line in read_lines(args.domain, args.lines):
            emit(line)
        return 0
    try:
        _follow(path, args.lines, emit)
    except KeyboardInterrupt:
        pass
    return 0


def _follow(path: str, lines: int, emit) -> None:
    """The last ``lines`` lines, then every line appended, across rotations (tail -n N -F)."""
    f, ino, pending, first = None, None, "", True
    try:
        while True:
            if f is None:
                try:
                    f = open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115 - kept open
                except FileNotFoundError:
                    if first:
                        print(f"following {path} (no log yet); Ctrl-C stops", file=sys.stderr, flush=True)
                    first = False  # a log that appears later is new from its first line
                    time.sleep(0.2)
                    continue
                ino = os.fstat(f.fileno()).st_ino
                if first:
                    *old, pending = f.read().split("\n")
                    for line in old[len(old) - lines:] if lines else []:
                        emit(line)
                    print(f"following {path}; Ctrl-C stops", file=sys.stderr, flush=True)
                    first = False
            chunk = f.read()
            if chunk:
                *complete, pending = (pending + chunk).split("\n")
                for line in complete:
                    emit(line)
                continue
            try:
                replaced = os.stat(path).st_ino != ino
            except FileNotFoundError:
                replaced = False  # being rotated: the new file comes next
            if replaced:  # rotated: what is left of the old file was read above; go on in the new
                if pending:
                    emit(pending)
                f.close()
                f, pending = None, ""
                continue
            time.sleep(0.2)  # a file has no wake-up to wait on without inotify: poll, as tail -F does
    finally:
        if f is not None:
            f.close()


def _tap(args) -> int:
    """Print frames of an output port of a running graph, and their rate."""
    import time

    from ..errors import QueueClosedError
    from ..graph import attach

    with attach(args.domain, name=_TOOL + "tap") as graph:
        tap = graph.subscribe(args.port, policy="drop_oldest")
        seen, t0, last = 0, time.monotonic(), time.monotonic()
        deadline = None if args.duration is None else t0 + args.duration
        while args.count is None or seen < args.count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                frame = tap.read(timeout=1.0 if left is None else min(1.0, left))
            except QueueClosedError:
                print("the graph stopped")
                break
            if frame is None:
                continue
            with frame.buffer:
                a = frame.array
                summary = f"min {a.min():.4g} max {a.max():.4g} mean {a.mean():.4g}" if a.size else "empty"
                print(f"{args.port} t={frame.timestamp} {a.dtype}{list(a.shape)} {summary}", flush=True)
            seen += 1
            now = time.monotonic()
            if now - last >= 1.0:
                print(f"-- {seen / (now - t0):.1f} frames/s, {tap.drops} dropped by this tap", flush=True)
                last = now
        print(f"{seen} frames in {time.monotonic() - t0:.1f} s, {tap.drops} dropped by this tap")
    return 0


def _doctor(args) -> int:
    """Explain every held buffer of a domain; exit 1 when something needs fixing."""
    from ..tools.doctor import diagnose

    report = diagnose(args.domain)
    if args.json:
        _print_json(report.to_json())
    else:
        print(report.format())
    return 0 if report.ok else 1


def _dashboard(args) -> int:
    """Serve the live dashboard of a running graph until Ctrl-C."""
    from ..dashboard import Dashboard

    dash = Dashboard(args.domain, host=args.host, port=args.port).start()
    print(f"dashboard of domain {args.domain!r}: {dash.url}  (Ctrl-C stops it)", flush=True)
    try:
        threading.Event().wait()  # the server runs on its thread; Ctrl-C ends this wait
    except KeyboardInterrupt:
        pass
    finally:
        dash.stop()
    return 0


def _block(args) -> int:
    """pause / resume / stop a running block (its answer is printed; exit 1 if it refused)."""
    from ..control.bus import Bus
    from ..control.topics import control_topic

    topic = _check_topic(control_topic(args.block))
    with _Tool(args.domain, "block") as tool:
        if not os.path.exists(_topic_queue(tool.manager, topic)):
            raise _Fail(f"no block {args.block!r} takes commands in domain {args.domain!r}")
        with Bus(tool.manager) as bus:
            try:
                answer = bus.request(topic, {"cmd": args.action}, timeout=args.timeout).data
            except TimeoutError:
                raise _Fail(f"block {args.block!r} did not answer within {args.timeout:g} s") from None
    if not answer.get("ok"):
        raise _Fail(f"block {args.block!r}: {answer.get('error')}")
    print(f"{args.block}: {args.action}: done")
    return 0


def _run(args) -> int:
    """Load a graph file, run it with a progress line a second, print the summary.
    Exit 0: done; 1: a block failed (or pool blocks leaked); 2: a bad graph file."""
    import time

    from ..errors import BlockError, GraphError
    from ..graph import Runtime, load_graph
    from ..net.hosts import check_hosts, host_graph

    try:
        spec = load_graph(args.graph, domain=args.domain)
        if args.host is not None:
            spec = host_graph(spec, args.host)
        elif spec.hosts:
            check_hosts(spec)  # the whole graph here: remote edges are ordinary edges
        rt = Runtime.from_spec(spec)
    except OSError as e:
        print(f"mq run: cannot read {args.graph}: {e.strerror or e}", file=sys.stderr)
        return 2
    except GraphError as e:  # GraphFileError: file:line: key: reason
        print(e, file=sys.stderr)
        return 2
    except MultiQueueError as e:  # a bridge that cannot be made (no Zenoh)
        print(f"mq run: {args.graph}: {e}", file=sys.stderr)
        return 2
    print(f"running {args.graph} in domain {rt.domain!r}: {len(rt.blocks)} blocks, {len(rt.edges)} "
          f"connections; Ctrl-C stops it. Watch a port with: mq tap {rt.domain} BLOCK.PORT", flush=True)
    failure, how = None, "the sources are done"
    try:
        rt.start()
    except GraphError as e:  # what only start() checks (e.g. a block that cannot be pickled)
        print(f"mq run: {args.graph}: {e}", file=sys.stderr)
        return 2
    except BlockError as e:  # a block failed in initialize()
        failure = e
    except KeyboardInterrupt:  # start() stopped what it had started
        print("interrupted while starting", file=sys.stderr)
        return 130
    dash = None
    if args.dashboard is not None and failure is None:
        from ..dashboard import Dashboard

        dash = Dashboard(rt.domain, port=args.dashboard).start()
        print(f"dashboard: {dash.url}", flush=True)
    t0 = time.monotonic()
    deadline = None if args.duration is None else t0 + args.duration
    next_line = t0 + 1.0
    try:
        while failure is None:
            wake = next_line if deadline is None else min(next_line, deadline)
            if rt.wait(timeout=max(0.0, wake - time.monotonic())):
                break
            now = time.monotonic()
            if now >= next_line:
                next_line += 1.0
                if not args.quiet:
                    print(_progress(rt, now - t0), flush=True)
            if deadline is not None and now >= deadline:
                how = f"{args.duration:g} s passed"
                _stop(rt)
                break
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        how = "interrupted"
        try:
            _stop(rt)
        except BlockError as e:
            failure = e
    except BlockError as e:  # raised by wait() or stop() once the graph has ended
        failure = e
    if failure is not None:
        how = "a block failed"
    if dash is not None:
        dash.stop()
    print(f"\nstopped after {time.monotonic() - t0:.1f} s ({how})")
    if rt.final_stats is not None:
        print(rt.final_stats.format())
    print(f"pool blocks still in use after the stop: {rt.blocks_in_use_at_end}")
    if failure is not None:
        print(f"mq run: {failure}", file=sys.stderr)
        return 1
    if rt.blocks_in_use_at_end:
        print(f"mq run: {rt.blocks_in_use_at_end} pool blocks were not released", file=sys.stderr)
        return 1
    return 0


def _stop(rt) -> None:
    """Stop the graph in order; a second Ctrl-C must not cut the teardown short (the
    runtime's drain timeout and SIGKILL escalation bound how long it takes)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        rt.stop()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rt.stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(rt, elapsed: float) -> str:
    """Two lines: items and rate per block (out; in for sinks), fill and drops per edge."""
    s = rt.stats()
    blocks = []
    for name, b in s.blocks.items():
        if rt.blocks[name].block.kind == "sink":
            blocks.append(f"{name} {b.items_in} in ({b.rate_in:.1f}/s)")
        else:
            blocks.append(f"{name} {b.items_out} ({b.rate_out:.1f}/s)")
    edges = [f"{e.dst} {e.lag}/{e.capacity}" + (f" ({e.drops} dropped)" if e.policy == "drop_oldest" else "")
             for e in s.edges]
    return f"[{elapsed:5.1f} s] {'  '.join(blocks)}\n          fill: {'  '.join(edges)}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _domain_name(text: str) -> str:
    try:
        return check_domain(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    """A --timeout / --duration / --interval: a finite number of seconds >= 0."""
    try:
        return check_number("seconds", float(text), minimum=0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, not {text!r}") from None


def _count(text: str) -> int:
    """A --count / --iterations / --lines: an int >= 0."""
    try:
        return check_int("count", int(text), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, not {text!r}") from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mq", description="multiqueue command line: demos, graph files, and tools to look into and "
        "control the domains of this machine (human-readable tables; --json for scripts)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("demo", help="the spectrum monitor: a graph of blocks in several processes",
                   add_help=False)
    sub.add_parser("stream-demo", help="two processes sharing buffers through a port queue", add_help=False)
    p = sub.add_parser("run", help="run a graph file (YAML): live progress, then a summary")
    p.add_argument("graph", help="the graph file, e.g. examples/graphs/sine.yaml")
    p.add_argument("--duration", type=_seconds, default=None,
                   help="stop after this many seconds (default: when the sources are done, or Ctrl-C)")
    p.add_argument("--domain", type=_domain_name, default=None,
                   help="the domain to run in (default: the file's 'domain:', else its name)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    p.add_argument("--dashboard", type=int, nargs="?", const=8765, default=None, metavar="PORT",
                   help="serve the live dashboard on localhost:PORT while it runs (default port 8765)")
    p.add_argument("--host", default=None,
                   help="run only this host's part of a graph with 'hosts:', bridged over Zenoh")
    p.set_defaults(func=_run)
    from .remote import add_parser as add_remote_parser

    add_remote_parser(sub)
    p = sub.add_parser("doctor", help="explain every held buffer: holders, dead processes, leaks, fixes")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("dashboard", help="serve the live web dashboard of a running graph")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.set_defaults(func=_dashboard)
    p = sub.add_parser("block", help="pause, resume or stop a block of a running graph")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("block")
    p.add_argument("action", choices=("pause", "resume", "stop"))
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for the block's answer")
    p.set_defaults(func=_block)

    p = sub.add_parser("ls", help="the domains on this machine: processes (alive or dead), graph, pools")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
    p.set_defaults(func=_ls)
    p = sub.add_parser("stats", help="pools, counters, processes, queues and the graph's blocks of a domain")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_stats)
    p = sub.add_parser("top", help="a live view of a domain: rates, fill, drops, CPU per process, pools")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("--interval", type=_seconds, default=1.0, help="seconds between two views (default 1)")
    p.add_argument("--iterations", type=_count, default=None, help="stop after this many views")
    p.add_argument("--json", action="store_true", help="one JSON object per view, one a line")
    p.set_defaults(func=_top)
    p = sub.add_parser("param", help="get (no VALUE) or set a run-time parameter of a running block")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("block")
    p.add_argument("name")
    p.add_argument("value", nargs="?", default=None,
                   help="the new value: JSON if it parses (3, 0.5, true, [1, 2], {...}), else a string")
    p.add_argument("--at-ns", type=int, default=None,
                   help="apply at the first input frame stamped at or after this time (ns)")
    p.add_argument("--text", action="store_true", help="VALUE is a string, even if it parses as JSON")
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for the block's answer")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_param)
    for name, target, what in (("pub", "topic", "publish a message on a bus topic"),
                               ("send", "target", "send a message to the inbox of a block or process")):
        p = sub.add_parser(name, help=what)
        p.add_argument("domain", type=_domain_name)
        p.add_argument(target)
        p.add_argument("message", help="JSON if it parses, else a string")
        p.add_argument("--text", action="store_true", help="MESSAGE is a string, even if it parses as JSON")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=_pub if name == "pub" else _send)
    p = sub.add_parser("sub", help="print the messages of a bus topic (topic, sender pid, data)")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("topic", help="the topic (with --inbox: the name whose inbox to read)")
    p.add_argument("--inbox", action="store_true", help="read the inbox of TOPIC (what `mq send` delivers)")
    p.add_argument("--count", type=_count, default=None, help="stop after this many messages")
    p.add_argument("--timeout", type=_seconds, default=None,
                   help="stop after this many seconds (exit 1 if --count messages did not come)")
    p.add_argument("--json", action="store_true", help="one JSON object per message, one a line")
    p.set_defaults(func=_sub)
    p = sub.add_parser("logs", help="the domain's log (every process's lines)")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("-n", "--lines", type=_count, default=10, help="the last N lines (default 10)")
    p.add_argument("-f", "--follow", action="store_true", help="then print lines as they are appended")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_logs)
    p = sub.add_parser("tap", help="print the frames of a running graph's output port")
    p.add_argument("domain", type=_domain_name)
    p.add_argument("port", help="BLOCK.PORT, e.g. source.out")
    p.add_argument("--count", type=_count, default=None, help="stop after this many frames")
    p.add_argument("--duration", type=_seconds, default=None, help="stop after this many seconds")
    p.set_defaults(func=_tap)
    for name, what in (("clean", "remove the segments of dead domains (all, or DOMAIN); never a live one"),
                       ("cleanup", "remove a stale domain (refused while it has live processes)")):
        p = sub.add_parser(name, help=what)
        if name == "clean":
            p.add_argument("domain", nargs="?", type=_domain_name, default=None,
                           help="only this domain (refused, exit 1, if it is live)")
        else:
            p.add_argument("domain", type=_domain_name)
        p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--prefix", default=DEFAULT_PREFIX, help=argparse.SUPPRESS)
        p.set_defaults(func=_clean)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from ..demos.spectrum import main as demo_main

        return demo_main(rest)
    if args.command == "stream-demo":
        from ..demos.stream import main as stream_demo_main

        return stream_demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    long_running = args.command in ("run", "top", "sub", "logs", "tap")
    if long_running and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # they run until stopped: SIGTERM ends them as Ctrl-C
    try:
        return args.func(args)
    except (MultiQueueError, _Fail) as e:
        print(f"mq {args.command}: {_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C where a command does not end on it by itself (tap...)
        return 130
    except BrokenPipeError:  # `mq ... | head`: the reader left; no traceback, none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
