"""`mq run`, `mq tap`, `mq param` and `mq block`: run a graph file, watch a port of a
running graph, list, get or set a block's parameters, pause / resume / stop a block."""

import json
import signal
import sys
import threading
import time

from ..control.bus import Bus
from ..control.topics import control_topic
from ..errors import BlockError, GraphError, MultiQueueError, QueueClosedError
from ..graph import Runtime, attach, load_graph
from ..graph.params import declared_param
from ..net.hosts import check_hosts, host_graph
from ..tools.inspect import GraphWatcher, topic_has_queue
from .common import (
    TOOL_PREFIX,
    AttachedTool,
    CommandError,
    checked_topic,
    count,
    domain_name,
    parse_value,
    port_number,
    print_json,
    seconds,
    start_dashboard,
)

_ENDED = ("done", "failed", "stopped")  # block states that take no commands any more


def add_parser(subparsers) -> None:
    _add_run(subparsers)
    p = subparsers.add_parser("tap", help="print the frames of a running graph's output port")
    p.add_argument("domain", type=domain_name)
    p.add_argument("port", help="BLOCK.PORT, e.g. source.out")
    p.add_argument("--count", type=count, default=None, help="stop after this many frames")
    p.add_argument("--duration", type=seconds, default=None, help="stop after this many seconds")
    p.set_defaults(func=tap, long_running=True)
    _add_param(subparsers)
    p = subparsers.add_parser("block", help="pause, resume or stop a block of a running graph")
    p.add_argument("domain", type=domain_name)
    p.add_argument("block")
    p.add_argument("action", choices=("pause", "resume", "stop"))
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for the block's answer")
    p.set_defaults(func=block_command)


def _add_run(subparsers) -> None:
    p = subparsers.add_parser("run", help="run a graph file (YAML): live progress, then a summary")
    p.add_argument("graph", help="the graph file, e.g. examples/graphs/sine.yaml")
    p.add_argument("--duration", type=seconds, default=None,
                   help="stop after this many seconds (default: when the sources are done, or Ctrl-C)")
    p.add_argument("--domain", type=domain_name, default=None,
                   help="the domain to run in (default: the file's 'domain:', else its name)")
    p.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    p.add_argument("--dashboard", type=port_number, nargs="?", const=8765, default=None, metavar="PORT",
                   help="serve the live dashboard on localhost:PORT while it runs (default port 8765)")
    p.add_argument("--host", default=None,
                   help="run only this host's part of a graph with 'hosts:', bridged over Zenoh")
    p.set_defaults(func=run, long_running=True)


def _add_param(subparsers) -> None:
    p = subparsers.add_parser("param", help="list (no NAME), get (no VALUE) or set the run-time parameters "
                                            "of a running block")
    p.add_argument("domain", type=domain_name)
    p.add_argument("block")
    p.add_argument("name", nargs="?", default=None, help="the parameter (none: list them with their types)")
    p.add_argument("value", nargs="?", default=None,
                   help="the new value: JSON if it parses (3, 0.5, true, [1, 2], {...}), else a string")
    p.add_argument("--at-ns", type=int, default=None,
                   help="apply at the first input frame stamped at or after this time (ns)")
    p.add_argument("--text", action="store_true", help="VALUE is a string, even if it parses as JSON")
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for the block's answer")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=param)


# -- mq run ---------------------------------------------------------------------------------


def run(args) -> int:
    """Load a graph file, run it with a progress line a second, print the summary.
    Exit 0: done; 1: a block failed (or pool blocks leaked); 2: a bad graph file."""
    try:
        rt = _load(args)
    except (OSError, MultiQueueError) as e:
        print(_bad_graph_file(args.graph, e), file=sys.stderr)
        return 2
    print(f"running {args.graph} in domain {rt.domain!r}: {len(rt.blocks)} blocks, {len(rt.edges)} "
          f"connections; Ctrl-C stops it. Watch a port with: mq tap {rt.domain} BLOCK.PORT", flush=True)
    try:
        rt.start()
        failure = None
    except GraphError as e:  # what only start() checks (e.g. a block that cannot be pickled)
        print(f"mq run: {args.graph}: {e}", file=sys.stderr)
        return 2
    except BlockError as e:  # a block failed in initialize()
        failure = e
    except KeyboardInterrupt:  # start() stopped what it had started
        print("interrupted while starting", file=sys.stderr)
        return 130
    t0 = time.monotonic()
    if failure is not None:
        return _summary(rt, t0, "a block failed", failure)
    rt.supervisor.listeners.append(_print_event)  # failures and restarts, one line each, as they happen
    dashboard = None
    if args.dashboard is not None:
        dashboard = start_dashboard(rt.domain, port=args.dashboard)
        print(f"dashboard: {dashboard.url}", flush=True)
    failure, how = _supervise(rt, args, t0)
    if dashboard is not None:
        dashboard.stop()
    return _summary(rt, t0, "a block failed" if failure is not None else how, failure)


def _print_event(event: dict) -> None:
    if event.get("event") == "failed":  # its message says what the runtime did: restart or stop
        print(f"mq run: {event['message']}", flush=True)


def _load(args) -> Runtime:
    spec = load_graph(args.graph, domain=args.domain)
    if args.host is not None:
        spec = host_graph(spec, args.host)
    elif spec.hosts:
        check_hosts(spec)  # the whole graph here: remote edges are ordinary edges
    return Runtime.from_spec(spec)


def _bad_graph_file(path: str, e: Exception) -> str:
    if isinstance(e, OSError):
        return f"mq run: cannot read {path}: {e.strerror or e}"
    if isinstance(e, GraphError):  # GraphFileError: file:line: key: reason
        return str(e)
    return f"mq run: {path}: {e}"  # a bridge that cannot be made (no Zenoh)


def _supervise(rt: Runtime, args, t0: float) -> tuple[BlockError | None, str]:
    """Wait for the graph to end, a progress line a second; (the failure, how it ended)."""
    deadline = None if args.duration is None else t0 + args.duration
    next_line = t0 + 1.0
    try:
        while True:
            wake = next_line if deadline is None else min(next_line, deadline)
            if rt.wait(timeout=max(0.0, wake - time.monotonic())):
                return None, "the sources are done"
            now = time.monotonic()
            if now >= next_line:
                next_line += 1.0
                if not args.quiet:
                    print(_progress(rt, now - t0), flush=True)
            if deadline is not None and now >= deadline:
                _stop(rt)
                return None, f"{args.duration:g} s passed"
    except KeyboardInterrupt:
        print("stopping...", flush=True)
        try:
            _stop(rt)
        except BlockError as e:
            return e, "interrupted"
        return None, "interrupted"
    except BlockError as e:  # raised by wait() or stop() once the graph has ended
        return e, ""


def _summary(rt: Runtime, t0: float, how: str, failure: BlockError | None) -> int:
    print(f"\nstopped after {time.monotonic() - t0:.1f} s ({how})")
    if rt.final_stats is not None:
        print(rt.final_stats.format())
    # readers outside the graph (a Consumer, a tap) may still hold its last frames: not a leak
    outside = [e.dst for e in rt.final_stats.edges if e.outside] if rt.final_stats is not None else []
    held_by = f" (frames readers outside the graph still hold: {', '.join(outside)})" \
        if outside and rt.blocks_in_use_at_end else ""
    print(f"pool blocks still in use after the stop: {rt.blocks_in_use_at_end}{held_by}")
    if failure is not None:
        print(f"mq run: {failure}", file=sys.stderr)
        return 1
    if rt.blocks_in_use_at_end and not held_by:
        print(f"mq run: {rt.blocks_in_use_at_end} pool blocks were not released", file=sys.stderr)
        return 1
    empty = _empty_run(rt)
    if empty is not None:
        print(f"mq run: {empty}", file=sys.stderr)
        return 1
    return 0


def _empty_run(rt: Runtime) -> str | None:
    """Why a run that no block failed still did not do its work (None: it did): a block
    aborted (it did not finish), or the sources produced nothing.  Such a run must not
    look like a success (exit 0)."""
    stats = rt.final_stats
    if stats is None:
        return None
    aborted = [name for name, b in stats.blocks.items() if b.state == "stopped"]
    if aborted:
        return (f"block{'s' if len(aborted) > 1 else ''} {', '.join(aborted)} aborted before finishing "
                f"(their log lines say why: mq logs {rt.domain})")
    sources = [name for name, h in rt.blocks.items() if h.block.kind == "source"]
    if sources and not sum(stats.blocks[name].items_out for name in sources):
        return f"the sources ({', '.join(sources)}) produced no frames"
    return None


def _stop(rt: Runtime) -> None:
    """Stop the graph in order; a second Ctrl-C must not cut the teardown short (the
    runtime's drain timeout and SIGKILL escalation bound how long it takes)."""
    if threading.current_thread() is not threading.main_thread():
        rt.stop()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rt.stop()
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress(rt: Runtime, elapsed: float) -> str:
    """Items and rate over the last second per block (out; in for sinks), fill and drops
    per edge; then what the blocks that do not flow do (waiting for pool ..., paused)."""
    s = rt.stats()
    blocks, stalled = [], []
    for name, b in s.blocks.items():
        sink = rt.blocks[name].block.kind == "sink"
        count, now = (b.items_in, b.rate_in_now) if sink else (b.items_out, b.rate_out_now)
        blocks.append(f"{name} {count}{' in' if sink else ''} ({now:.1f}/s)")
        flowing = now > 0 and b.status.startswith(("waiting for input", "blocked by"))  # a moment's wait
        if b.status != "running" and not flowing:
            stalled.append(f"{name} {b.status}")
    edges = [f"{e.dst} {e.lag}/{e.capacity}" + (f" ({e.drops} dropped)" if e.policy == "drop_oldest" else "")
             for e in s.edges]
    lines = f"[{elapsed:5.1f} s] {'  '.join(blocks)}\n          fill: {'  '.join(edges)}"
    return lines + (f"\n          now: {'; '.join(stalled)}" if stalled else "")


# -- mq tap ---------------------------------------------------------------------------------


def tap(args) -> int:
    """Print frames of an output port of a running graph, and their rate; when the graph
    stops, let go of its domain and go on with its next run (until --count, --duration
    or Ctrl-C)."""
    seen, drops, t0 = 0, 0, time.monotonic()
    deadline = None if args.duration is None else t0 + args.duration
    wait = 0  # the first time a graph must run already; then its next run is waited for
    while True:
        try:
            graph = attach(args.domain, name=TOOL_PREFIX + "tap", timeout=wait)
        except TimeoutError:  # --duration passed while no graph ran
            break
        with graph:
            port = graph.subscribe(args.port, policy="drop_oldest")
            seen, stopped = _print_frames(port, args, seen, t0, deadline)
            drops += port.drops
            if stopped:  # its queue closed: let go once the graph is over, not before
                while not graph.ended and (deadline is None or time.monotonic() < deadline):
                    time.sleep(0.05)
        if not stopped or (deadline is not None and time.monotonic() >= deadline):
            break
        print(f"the graph stopped; waiting for its next run in domain {args.domain!r} (Ctrl-C stops)",
              flush=True)
        wait = None if deadline is None else max(1e-3, deadline - time.monotonic())
    print(f"{seen} frames in {time.monotonic() - t0:.1f} s, {drops} dropped by this tap")
    return 0


def _print_frames(port, args, seen: int, t0: float, deadline: float | None) -> tuple[int, bool]:
    """Print the tap's frames until --count or the deadline (False) or the graph stops
    (True); returns the frames seen in all and whether it stopped."""
    last_rate = time.monotonic()
    while args.count is None or seen < args.count:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        try:
            frame = port.read(timeout=1.0 if left is None else min(1.0, left))
        except QueueClosedError:  # its block ended (the graph stops, or ends that branch)
            print(f"{args.port}: no more frames (its block ended)", flush=True)
            return seen, True
        if frame is None:
            continue
        with frame.buffer:
            print(f"{args.port} t={frame.timestamp} {_describe(frame.array)}", flush=True)
        seen += 1
        now = time.monotonic()
        if now - last_rate >= 1.0:
            print(f"-- {seen / (now - t0):.1f} frames/s, {port.drops} dropped by this tap", flush=True)
            last_rate = now
    return seen, False


def _describe(a) -> str:
    summary = f"min {a.min():.4g} max {a.max():.4g} mean {a.mean():.4g}" if a.size else "empty"
    return f"{a.dtype}{list(a.shape)} {summary}"


# -- mq param, mq block ---------------------------------------------------------------------


def param(args) -> int:
    """List, get or set; a value the parameter's declared type or range refuses is
    refused here, before it reaches the block (which checks it again)."""
    topic = checked_topic(control_topic(args.block))
    command = _param_command(args)
    with AttachedTool(args.domain, "param") as tool:
        description = _check_takes_commands(tool, args.domain, args.block, topic)
        if command["cmd"] == "set":
            command["value"] = _checked_value(args, description, command["value"])
        with Bus(tool.manager) as bus:
            try:
                answer = bus.request(topic, command, timeout=args.timeout).data
            except TimeoutError:
                raise CommandError(f"block {args.block!r} did not answer on topic {topic!r} within "
                                   f"{args.timeout:g} s; is it running?") from None
    if not isinstance(answer, dict) or not answer.get("ok"):
        _refuse(args, answer.get("error") if isinstance(answer, dict) else repr(answer))
    if command["cmd"] == "params":
        _print_params(args, description, answer.get("value") or {})
    else:
        _print_param(args, command, answer.get("value") if command["cmd"] == "get" else command["value"])
    return 0


def _param_command(args) -> dict:
    if args.name is None:
        if args.at_ns is not None:
            raise CommandError("--at-ns sets a parameter: give its NAME and VALUE")
        return {"cmd": "params"}
    if args.value is None:
        return {"cmd": "get", "name": args.name}
    return {"cmd": "set", "name": args.name, "value": parse_value(args.value, args.text), "at_ns": args.at_ns}


def _checked_value(args, description: dict | None, value):
    """``value`` as the parameter's declaration (in the graph's description) takes it;
    refused here if it does not.  No graph, or a name it does not declare: the block answers."""
    declared = declared_param(description, args.block, args.name)
    if declared is None:
        return value
    try:
        return declared.check(args.name, value)
    except (TypeError, ValueError) as e:
        _refuse(args, f"{type(e).__name__}: {e}")


def _refuse(args, error: str):
    if args.json:
        print_json({"block": args.block, "name": args.name, "ok": False, "error": error})
    raise CommandError(f"block {args.block!r} refused: {error}")


def _check_takes_commands(tool: AttachedTool, domain: str, block: str, topic: str) -> dict | None:
    """CommandError unless ``block`` is a block of the domain's graph (if one runs) that
    has not ended, and someone reads its command topic; the graph's description (None:
    no graph runs)."""
    m = tool.manager
    description = None
    with GraphWatcher(m.prefix, m.domain) as graph:
        if graph.get() is not None:
            blocks = graph.block_names()
            if block not in blocks:
                raise CommandError(f"the graph of domain {domain!r} has no block {block!r}; it has {blocks}")
            state = graph.block_state(block)
            if state in _ENDED:
                raise CommandError(f"block {block!r} has {state}: it takes no commands any more")
            description = graph.get().description
    if not topic_has_queue(m, topic):
        raise CommandError(f"no block {block!r} takes commands in domain {domain!r} "
                           f"(nobody subscribes to topic {topic!r})")
    return description


def _print_param(args, command: dict, value) -> None:
    if args.json:
        print_json({"block": args.block, "name": args.name, "ok": True, "cmd": command["cmd"],
                    "value": value, "at_ns": args.at_ns if command["cmd"] == "set" else None})
    elif command["cmd"] == "get":
        print(f"{args.block}.{args.name} = {json.dumps(value)}")
    else:
        when = f" at t >= {args.at_ns} ns" if args.at_ns is not None else ""
        print(f"{args.block}.{args.name} set to {json.dumps(value)}{when} (acknowledged)")


def _print_params(args, description: dict | None, params: dict) -> None:
    """The block's parameters: name, type, current value and what it allows."""
    if args.json:
        print_json({"block": args.block, "ok": True, "cmd": "params", "parameters": params})
        return
    classes = {b["name"]: b["class"].rpartition(".")[2] for b in (description or {}).get("blocks", ())}
    kind = f" ({classes[args.block]})" if args.block in classes else ""
    if not params:
        print(f"{args.block}{kind} has no run-time parameters")
        return
    rows = [("name", "type", "value", "allowed")]
    rows += [(name, p.get("type", "?"), json.dumps(p.get("value")), p.get("allowed", ""))
             for name, p in params.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"{args.block}{kind}: {len(params)} run-time parameter{'s' if len(params) != 1 else ''}; "
          f"set one with: mq param {args.domain} {args.block} NAME VALUE")
    for name, type_name, value, allowed in rows:
        print(f"  {name:<{widths[0]}}  {type_name:<{widths[1]}}  {value:<{widths[2]}}  {allowed}")


def block_command(args) -> int:
    """pause / resume / stop a running block (its answer is printed; exit 1 if it refused)."""
    topic = checked_topic(control_topic(args.block))
    with AttachedTool(args.domain, "block") as tool:
        if not topic_has_queue(tool.manager, topic):
            raise CommandError(f"no block {args.block!r} takes commands in domain {args.domain!r}")
        with Bus(tool.manager) as bus:
            try:
                answer = bus.request(topic, {"cmd": args.action}, timeout=args.timeout).data
            except TimeoutError:
                raise CommandError(f"block {args.block!r} did not answer within {args.timeout:g} s") from None
    if not answer.get("ok"):
        raise CommandError(f"block {args.block!r}: {answer.get('error')}")
    print(f"{args.block}: {args.action}: done")
    return 0
