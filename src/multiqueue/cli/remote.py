"""``mq remote``: the blocks of a graph on other machines, over Zenoh.

    mq remote GRAPH stats [--json]                 every host's blocks and edges
    mq remote GRAPH param BLOCK NAME [VALUE]       get / set a block's parameter
    mq remote GRAPH status                         follow every host's status events
    mq remote GRAPH stop                           stop every host's part in order

GRAPH is the graph file's ``domain:``; ``--connect tcp/HOST:PORT`` (repeatable),
``--listen``, ``--mode`` reach the Zenoh network as the hosts' settings do; ``--tls-ca``
(``--tls-cert``, ``--tls-key``, ``--mtls``) and ``--user`` with ``--password-file`` or
``--password-env`` reach a secured one (docs/network.md, "Security").  param (setting),
stop: only where the graph file says ``remote_control: true``.
"""

import json
import threading

from ..errors import BridgeError
from ..net.control import RemoteGraph, graph_prefix
from ..net.settings import ZenohSettings
from .common import CommandError, count, seconds


def add_parser(sub) -> None:
    p = sub.add_parser("remote", help="stats, parameters, status and stop of a graph's hosts over Zenoh")
    p.add_argument("graph", help="the graph's name (its file's 'domain:')")
    p.add_argument("action", choices=("stats", "param", "status", "stop"))
    p.add_argument("args", nargs="*", help="param: BLOCK NAME [VALUE] (VALUE as JSON, else text)")
    p.add_argument("--connect", action="append", default=[], metavar="ENDPOINT",
                   help="a Zenoh endpoint to dial, e.g. tcp/10.0.0.5:7447 (repeatable)")
    p.add_argument("--listen", action="append", default=[], metavar="ENDPOINT")
    p.add_argument("--mode", default="peer", choices=("peer", "client"))
    p.add_argument("--timeout", type=seconds, default=5.0, help="seconds to wait for answers (default 5)")
    p.add_argument("--count", type=count, default=None, help="status: stop after this many events")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    secure = p.add_argument_group("a secured Zenoh network (docs/network.md, Security)")
    secure.add_argument("--tls-ca", metavar="PEM", help="the authority of the hosts' certificates")
    secure.add_argument("--tls-cert", metavar="PEM", help="our certificate (mutual TLS)")
    secure.add_argument("--tls-key", metavar="PEM", help="our certificate's private key (mutual TLS)")
    secure.add_argument("--mtls", action="store_true", help="show our certificate (the hosts use mutual TLS)")
    secure.add_argument("--user", help="the user name to log in with")
    secure.add_argument("--password-file", metavar="PATH", help="a file holding the password")
    secure.add_argument("--password-env", metavar="NAME", help="an environment variable holding the password")
    p.set_defaults(func=run)


def settings_of(args) -> ZenohSettings:
    """The Zenoh settings the options give; CommandError naming what is wrong."""
    tls = None
    if args.tls_ca or args.tls_cert or args.tls_key or args.mtls:
        if not args.tls_ca:
            raise CommandError("--tls-cert, --tls-key and --mtls need --tls-ca (the hosts' authority)")
        tls = {"ca": args.tls_ca, "certificate": args.tls_cert, "private_key": args.tls_key,
               "mutual": args.mtls}
    try:
        return ZenohSettings(mode=args.mode, connect=tuple(args.connect), listen=tuple(args.listen), tls=tls,
                             user=args.user, password_file=args.password_file, password_env=args.password_env)
    except (TypeError, ValueError) as e:  # an endpoint that is not one: say which, no traceback
        raise CommandError(str(e)) from None


def no_answer(remote, args, what: str, block: str | None = None) -> BridgeError:
    """Why nothing answered, as far as we can tell: no peer reached (nothing listens, or
    it refused our certificate or login), no such ``block``, or the hosts answer stats but
    not ``what`` (their access rules refuse it to us)."""
    text = f"no host of graph {args.graph!r} answered within {args.timeout:g} s"
    if not remote.peers():
        where = ", ".join(args.connect) or "any endpoint"
        return BridgeError(f"{text}: no peer reached at {where}: nothing listens there, or it refused our "
                           "TLS certificate or login (user/password)")
    stats = remote.stats() if what != "stats" else {}
    blocks = {b for s in stats.values() for b in s.get("blocks", {})}
    if block is not None and stats and block not in blocks:
        return BridgeError(f"graph {args.graph!r} has no block {block!r}; its blocks: "
                           f"{', '.join(sorted(blocks))}")
    if stats:
        who = f"user {args.user!r}" if args.user else "a peer without login"
        return BridgeError(f"{what} refused: the hosts answer stats but not control requests: their access "
                           f"rules do not let {who} send them")
    return BridgeError(text)


def run(args) -> int:
    if args.count is not None and args.count < 1:
        raise CommandError(f"--count must be at least 1, not {args.count}")
    settings = settings_of(args)
    with RemoteGraph(graph_prefix(args.graph), zenoh=settings, timeout=args.timeout) as remote:
        if args.action == "stats":
            stats = remote.stats()
            if not stats:
                raise no_answer(remote, args, "stats")
            if args.json:
                print(json.dumps(stats, indent=2))
            else:
                for host, s in sorted(stats.items()):
                    print(f"host {host}:")
                    for b in s["blocks"].values():
                        counters = "  ".join(f"{k}={v}" for k, v in b.get("counters", {}).items())
                        print(f"  {b['name']:<16}{b['state']:<9}{b['items_in']:>10} in"
                              f"{b['items_out']:>10} out  {counters}")
            return 0
        if args.action == "param":
            return _param(remote, args)
        if args.action == "stop":
            replies = remote.graph_command("stop")
            if not replies:
                raise no_answer(remote, args, "stop")
            errors = {r.get("error") for r in replies.values() if not r.get("ok")}
            if len(errors) == 1 and not any(r.get("ok") for r in replies.values()):
                raise BridgeError(f"stop refused: {errors.pop()}")  # one line, not one per host
            for host, reply in sorted(replies.items()):
                print(f"{host}: {'stopping' if reply.get('ok') else reply.get('error')}")
            return 0 if all(r.get("ok") for r in replies.values()) else 1
        return _follow(remote, args)


def _param(remote, args) -> int:
    if len(args.args) not in (2, 3):
        raise CommandError(f"param takes BLOCK NAME [VALUE], not {len(args.args)} argument(s): "
                           f"mq remote {args.graph} param BLOCK NAME [VALUE]")
    block, name = args.args[:2]
    try:
        if len(args.args) == 2:
            value = remote.get_parameter(block, name)
            print(json.dumps(value) if args.json else value)
        else:
            try:
                value = json.loads(args.args[2])
            except ValueError:
                value = args.args[2]
            remote.set_parameter(block, name, value)
            print(f"{block}.{name} = {value!r}")
    except BridgeError as e:
        if not str(e).startswith("no host answered"):  # an answer: it says what went wrong
            raise
        raise no_answer(remote, args, "param", block) from None
    return 0


def _follow(remote, args) -> int:
    seen, done = [0], threading.Event()

    def show(event: dict) -> None:
        print(json.dumps(event) if args.json else
              " ".join(f"{k}={v}" for k, v in event.items()), flush=True)
        seen[0] += 1
        if args.count is not None and seen[0] >= args.count:
            done.set()

    subscriber = remote.subscribe_status(show)
    try:
        done.wait()
    finally:
        subscriber.undeclare()
    return 0
