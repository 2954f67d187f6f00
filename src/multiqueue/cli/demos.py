"""`mq demo`, `mq stream-demo` and `mq dashboard`: the demos (each parses its own
options) and the live web dashboard of a running graph."""

import threading

from ..demos import spectrum, stream
from ..shm.interrupts import deferred_interrupts
from .common import CommandError, domain_name, port_number, start_dashboard


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the spectrum monitor: a graph of blocks in several processes",
                              add_help=False)
    p.set_defaults(func=spectrum.main, own_options=True)
    p = subparsers.add_parser("stream-demo", help="two processes sharing buffers through a port queue",
                              add_help=False)
    p.set_defaults(func=stream.main, own_options=True)
    p = subparsers.add_parser("dashboard", help="serve the live web dashboard of a domain's graph (it "
                              "waits for the graph to start, and follows its next runs)")
    p.add_argument("domain", type=domain_name)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: localhost only)")
    p.add_argument("--port", type=port_number, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--token", default=None, help="the secret that grants control (default: "
                   "$MQ_DASHBOARD_TOKEN, else a new one on localhost; required beyond it); prefer the "
                   "variable: a command line is visible to every user of the machine")
    p.add_argument("--read-only", action="store_true", help="show the graph, change nothing (no token)")
    p.set_defaults(func=dashboard, long_running=True)


def dashboard(args) -> int:
    """Serve the live dashboard of a domain until Ctrl-C or SIGTERM (then it stops in
    order: connections closed, the domain left)."""
    dash = None
    try:
        with deferred_interrupts():  # a Ctrl-C while it starts is handled once it runs: it stops below
            try:
                dash = start_dashboard(args.domain, args.host, args.port, args.token, args.read_only)
            except OSError as e:
                raise CommandError(e.strerror or str(e)) from None
            waiting = "" if dash.graph is not None else "; waiting for its graph to start"
            control = "read-only" if args.read_only else "its token grants control: keep the URL to yourself"
            print(f"dashboard of domain {args.domain!r}: {dash.url}  ({control}; Ctrl-C stops it{waiting})",
                  flush=True)
        threading.Event().wait()  # the server runs on its thread; Ctrl-C (SIGTERM too) ends this wait
    except KeyboardInterrupt:
        pass
    finally:
        if dash is not None:
            dash.stop()
    return 0
