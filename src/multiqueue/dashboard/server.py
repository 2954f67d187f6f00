"""The live dashboard: one local web page per domain, fed over a WebSocket.

``mq dashboard DOMAIN`` or ``Dashboard(domain).serve_forever()``. It attaches like any
other process (``multiqueue.attach``): stats from the graph segment, frames from a
``drop_oldest`` tap (downsampled here to MAX_POINTS), parameter changes over the bus.
It follows the domain's runs: it waits for a graph to start, lets go of the domain as
soon as the graph ends (a viewer must not keep a finished graph's domain alive) and
attaches to the next run.  What the page shows: docs/control.md, "Dashboard".
"""

import asyncio
import collections
import contextlib
import importlib.resources
import json
import logging
import threading
import time
from http import HTTPStatus
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from ..control.bus import Bus
from ..control.topics import STATUS, control_topic
from ..errors import MultiQueueError, QueueClosedError
from ..graph.attach import AttachedGraph, attach, graph_running
from ..graph.params import declared_param
from ..shm.segment import check_domain
from . import access

MAX_POINTS = 1024
UPDATE_S = 0.1  # stats and frames 10 times a second
FOLLOW_S = 0.2  # how often the dashboard looks for its graph's end, or for a new run
CLOSE_S = 0.1  # at stop, connections get this long to close (ms on localhost); then they are cut
REQUEST_S = 5.0  # the longest a block may take to answer a parameter command
EVENTS_KEPT = 200  # the timeline: the newest events a page that opens now is shown
_log = logging.getLogger("mq.dashboard")


def downsample(frame: np.ndarray, points: int = MAX_POINTS) -> np.ndarray:
    """At most ``points`` values, each the max of its group (peaks stay visible)."""
    x = np.asarray(frame, dtype=np.float32).ravel()
    if x.size <= points:
        return x.copy()  # the caller's to change (the frame itself may be read-only)
    groups = -(-x.size // points)
    padded = np.full(groups * points, -np.inf, np.float32)
    padded[: x.size] = x
    return padded.reshape(points, groups).max(axis=1)


class Dashboard:
    """Serve the dashboard of ``domain``'s graph on ``host``:``port`` (0: any free port).

    The graph need not run yet: the page says it waits, and shows the graph once it
    runs.  ``run`` counts the graphs followed and their ends (the sessions compare it)."""

    def __init__(self, domain: str, host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None,
                 read_only: bool = False):
        self.domain, self.host, self.port = check_domain(domain), host, port
        self.read_only = bool(read_only)
        self._token = access.control_token(host, token, self.read_only)  # AccessError if unusable
        self._hostnames = access.allowed_hostnames(host)
        self.graph: AttachedGraph | None = None  # while a graph runs
        self.bus: Bus | None = None
        self.status = None  # the graph's "status" topic: failures, restarts, drops, its end
        self.events: collections.deque[dict] = collections.deque(maxlen=EVENTS_KEPT)
        self._events_seen = 0  # events of all runs so far (each event's "seq")
        self.run = 0
        self.final: dict | None = None  # the last stats of the graph that ended
        self.clients = 0
        self.lock = threading.RLock()  # the attachment: following, stats, taps
        self._requests = threading.Condition()  # parameter commands in flight (they hold the bus)
        self._in_flight = 0
        self._page = (importlib.resources.files(__package__) / "index.html").read_bytes()
        self._loop = None
        self._stop = None
        self._thread = None
        self._error: BaseException | None = None
        self.follow()  # a graph that runs now is on the first page at once

    # -- following the domain's runs -----------------------------------------------------

    def follow(self) -> bool:
        """Let go of a graph that ended; attach to one that runs.  True if attached."""
        with self.lock:
            self._take_events_locked()
            if self.graph is not None and self.graph.ended:
                self.final = self._stats_or_none()
                self._let_go_locked()
            if self.graph is None and graph_running(self.domain):
                self._attach_locked()
            return self.graph is not None

    def _attach_locked(self) -> None:
        try:
            graph = attach(self.domain, name="dashboard")
        except MultiQueueError:  # it ended meanwhile: wait for the next one
            return
        try:
            bus = None if graph.ended else Bus(graph.manager)
            status = None if bus is None else bus.subscribe(STATUS)
        except BaseException:
            graph.close()
            raise
        if bus is None:
            graph.close()
            return
        self.graph, self.bus, self.status = graph, bus, status
        self.final = None
        self.run += 1
        self._add_event({"event": "following", "message": f"graph running: blocks {', '.join(graph.blocks)}"})
        _log.info("dashboard of domain %r: following a new run", self.domain)

    def _let_go_locked(self) -> None:
        """Leave the domain: the bus first (a parameter command waiting returns), then
        the taps and the domain itself; the last process out removes its segments."""
        graph, bus = self.graph, self.bus
        self.graph = self.bus = self.status = None
        self.run += 1
        self._add_event({"event": "ended", "message": "the graph ended; waiting for its next run"})
        with contextlib.suppress(Exception):
            bus.close()
        with self._requests:
            self._requests.wait_for(lambda: self._in_flight == 0, timeout=1.0)
        with contextlib.suppress(Exception):
            graph.close()

    def _take_events_locked(self) -> None:
        """Move the events the graph published since the last look into the timeline."""
        while self.status is not None and (message := self.status.get(timeout=0)) is not None:
            if isinstance(message.data, dict):
                self._add_event(message.data)

    def _add_event(self, event: dict) -> None:
        self._events_seen += 1
        self.events.append({"type": "event", "seq": self._events_seen, "t": time.time(),
                            "event": str(event.get("event")), "message": describe_event(event)})

    async def _follow_forever(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.follow)
            except Exception:  # noqa: BLE001 - a bad moment must not end the following
                _log.warning("dashboard of domain %r: following failed", self.domain, exc_info=True)
            await asyncio.sleep(FOLLOW_S)

    # -- running ------------------------------------------------------------------------

    async def serve(self, ready: threading.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        server = await serve(self._client, self.host, self.port, process_request=self._http,
                             close_timeout=CLOSE_S)
        follower = asyncio.create_task(self._follow_forever())
        try:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self._stop
        finally:
            follower.cancel()
            # the domain is left meanwhile, and before the loop ends (which waits for its
            # threads: a parameter command returns once the bus is closed)
            await asyncio.gather(close_server(server), asyncio.to_thread(self.close))

    def serve_forever(self) -> None:
        """Run in this thread until Ctrl-C (or stop() from another thread)."""
        try:
            asyncio.run(self.serve())
        finally:
            self.close()

    def start(self) -> "Dashboard":
        """Run on a thread of its own; returns once the port is listening (OSError if it
        cannot listen there)."""
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_thread, args=(ready,), name="mq-dashboard",
                                        daemon=True)
        self._thread.start()
        while not ready.wait(0.05):
            if not self._thread.is_alive():
                self.close()
                error = self._error
                if isinstance(error, OSError):
                    raise OSError(error.errno, f"the dashboard cannot listen on {self.host}:{self.port}: "
                                  f"{error.strerror or error}; pick another port (0: any free port)")
                raise RuntimeError(f"the dashboard did not start: {error!r}")
        return self

    def _run_thread(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self.serve(ready))
        except BaseException as e:  # noqa: BLE001 - start() reports it
            self._error = e

    def stop(self) -> None:
        """Stop serving (within about CLOSE_S whatever the clients do) and leave the domain."""
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has ended already
                self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        if self._thread is not None:
            self._thread.join(10)
        self.close()

    def close(self) -> None:
        with self.lock:
            if self.graph is not None:
                self._let_go_locked()

    @property
    def url(self) -> str:
        """The page's address, with the token that grants control (the user's to keep)."""
        return self._address("http", "/")

    @property
    def ws_url(self) -> str:
        """The WebSocket's address, with the token (for clients that are not the page)."""
        return self._address("ws", "/ws")

    def _address(self, scheme: str, path: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{path}" + (f"?token={self._token}" if self._token else "")

    # -- HTTP and WebSocket -------------------------------------------------------------

    def _http(self, connection, request):
        host = _single(request.headers, "Host")
        if not access.host_allowed(host, self.port, self._hostnames):  # DNS rebinding: a name not ours
            _log.warning("dashboard of domain %r: refused a request for host %r", self.domain, host)
            return connection.respond(HTTPStatus.FORBIDDEN, "this dashboard does not serve that host name\n")
        path = urlsplit(request.path).path
        if path == "/ws":
            origins = request.headers.get_all("Origin")
            if len(origins) > 1 or not access.origin_allowed(origins[0] if origins else None, host):
                _log.warning("dashboard of domain %r: refused a WebSocket from origin %r", self.domain,
                             ", ".join(origins))  # another site's page
                return connection.respond(HTTPStatus.FORBIDDEN, "only this dashboard's page may connect\n")
            return None  # the WebSocket handshake goes on
        if path not in ("/", "/index.html"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        response = connection.respond(HTTPStatus.OK, "")
        response.body = self._page
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        response.headers["Content-Length"] = str(len(self._page))
        # the token is in the page's URL: no other site may frame the page or see its address
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _client(self, websocket) -> None:
        self.clients += 1
        given = access.request_token(websocket.request.path)
        session = _Session(self, websocket, control=access.token_matches(self._token, given))
        try:
            await session.run()
        except ConnectionClosed:
            pass
        finally:
            session.close()
            self.clients -= 1

    # -- what the page gets -------------------------------------------------------------

    def updates(self, session: "_Session") -> list[dict]:
        """What a session sends now: the graph (or that it waits for one) when the run
        changed since its last look, the events it has not seen, then stats and the
        watched port's newest frame."""
        with self.lock:
            messages = []
            if session.seen_run != self.run:
                session.seen_run = self.run
                session.drop_tap()
                messages.append(self.graph_message() if self.graph is not None else self.waiting_message())
            self._take_events_locked()
            messages += [e for e in self.events if e["seq"] > session.event_seq]
            session.event_seq = self._events_seen
            if self.graph is not None:
                stats = self._stats_or_none()
                if stats is not None:
                    messages.append(stats)
                frame = session.latest_frame()
                if frame is not None:
                    messages.append(frame)
            return messages

    def graph_message(self) -> dict:
        return {"type": "graph", "domain": self.domain, "graph": self.graph.description,
                "ports": self.graph.ports}

    def waiting_message(self) -> dict:
        """No graph runs: the page waits for one (``final``: the last stats of the one that ended)."""
        return {"type": "waiting", "domain": self.domain, "final": self.final}

    def stats_message(self) -> dict:
        with self.lock:
            return self._stats_locked() if self.graph is not None else self.final

    def _stats_or_none(self) -> dict | None:
        """The stats now; None when they cannot be read at this moment (the graph starting
        or ending under us): the next look will do."""
        try:
            return self._stats_locked()
        except MultiQueueError:
            _log.debug("dashboard of domain %r: no stats this time", self.domain, exc_info=True)
            return None

    def _stats_locked(self) -> dict:
        s = self.graph.stats()
        pools = [{"name": p.name, "used": p.blocks_used, "count": p.block_count}
                 for p in self.graph.manager.get_stats().pool_stats]
        return {
            "type": "stats", "t": time.time(),
            # rates over the last second; the averages since start beside; status: what it does now
            "blocks": {n: {"state": b.state, "status": b.status, "in": b.items_in, "out": b.items_out,
                           "rate_in": b.rate_in_now, "rate_out": b.rate_out_now, "avg_in": b.rate_in,
                           "avg_out": b.rate_out, "pid": b.pid, "restarts": b.restarts}
                       for n, b in s.blocks.items()},
            "edges": [{"src": e.src, "dst": e.dst, "policy": e.policy, "lag": e.lag, "capacity": e.capacity,
                       "drops": e.drops} for e in s.edges],
            "pools": pools,
        }

    def set_parameter(self, block: str, name: str, value) -> dict:
        with self._request() as (graph, bus):
            declared = declared_param(graph.description, block, name)
            if declared is not None:  # refused here (TypeError, ValueError: the page shows it), never sent
                value = declared.check(name, value)
            answer = bus.request(control_topic(block), {"cmd": "set", "name": name, "value": value},
                                 timeout=REQUEST_S).data
        return {"type": "ack", "block": block, "name": name, "value": value, "ok": bool(answer.get("ok")),
                "error": answer.get("error")}

    def parameters(self, block: str) -> dict:
        """The block's parameters with their types, ranges and current values (the page's editor)."""
        with self._request() as (_graph, bus):
            answer = bus.request(control_topic(block), {"cmd": "params"}, timeout=REQUEST_S).data
        return {"type": "params", "block": block, "ok": bool(answer.get("ok")),
                "parameters": answer.get("value") or {}, "error": answer.get("error")}

    @contextlib.contextmanager
    def _request(self):
        """The graph and bus for one command (counted: letting go waits for it to return)."""
        with self.lock:
            graph, bus = self.graph, self.bus
            if graph is None:
                raise MultiQueueError(f"no graph runs in domain {self.domain!r} now")
            with self._requests:
                self._in_flight += 1
        try:
            yield graph, bus
        finally:
            with self._requests:
                self._in_flight -= 1
                self._requests.notify_all()


def _single(headers, name: str) -> str | None:
    """The one value of header ``name``; None if missing or given twice (never guess which)."""
    values = headers.get_all(name)
    return values[0] if len(values) == 1 else None


def describe_event(event: dict) -> str:
    """One line for the timeline (the runtime's own message where it wrote one)."""
    if event.get("message"):
        return str(event["message"])
    kind = event.get("event")
    if kind == "drops":
        return f"edge {event.get('edge')}: {event.get('new')} frames dropped ({event.get('drops')} in all)"
    if kind == "took-over":
        return (f"this run took the domain over from a graph that had ended (kept by "
                f"{', '.join(event.get('holders') or []) or 'nobody alive'})")
    if kind == "stopped":
        failed = event.get("failed") or []
        return "the graph stopped" + (f"; failed: {', '.join(failed)}" if failed else "")
    if kind == "started":
        return "the graph started"
    if event.get("block"):  # a block's own: block-started, block-done, block-stopped, block-failed
        return f"block {event['block']}: {str(kind).removeprefix('block-')} (pid {event.get('pid')})"
    return str(kind)


async def close_server(server) -> None:
    """Close the server and its connections; those that do not close within CLOSE_S (a
    client that reads nothing, a browser's idle pre-connection) are cut."""
    server.close()
    try:
        await asyncio.wait_for(server.wait_closed(), CLOSE_S)
    except TimeoutError:
        for connection in list(server.connections):
            connection.transport.abort()
        tasks = list(server.handler_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_S)


class _Session:
    """One browser tab: stats and the watched port's frames every UPDATE_S, commands in."""

    def __init__(self, dashboard: Dashboard, websocket, control: bool):
        self.dashboard, self.websocket = dashboard, websocket
        self.control = control  # it gave the token: it may change the graph
        self.tap = None
        self.port = None
        self.seen_run = None  # the dashboard's run this tab was last told about
        self.event_seq = 0  # the last event this tab was sent

    async def run(self) -> None:
        d = self.dashboard
        receiver = asyncio.create_task(self._receive())
        loop = asyncio.get_running_loop()
        next_update = loop.time()
        try:
            await self.websocket.send(json.dumps(self.hello()))
            while not receiver.done():
                for message in await asyncio.to_thread(d.updates, self):
                    await self.websocket.send(json.dumps(message))
                # on a fixed beat (10 a second), not UPDATE_S after the work of an update
                next_update = max(next_update + UPDATE_S, loop.time() - UPDATE_S)
                await asyncio.sleep(max(0.0, next_update - loop.time()))
            receiver.result()  # a closed connection ends the session
        finally:
            receiver.cancel()

    async def _receive(self) -> None:
        async for text in self.websocket:
            message = json.loads(text)
            if message.get("type") == "watch":
                await asyncio.to_thread(self.watch, message.get("port"))
            elif message.get("type") == "set":
                try:
                    self.check_control()
                    ack = await asyncio.to_thread(self.dashboard.set_parameter, message["block"],
                                                  message["name"], message.get("value"))
                except Exception as e:  # noqa: BLE001 - the page shows the error
                    ack = {"type": "ack", "ok": False, "error": f"{type(e).__name__}: {e}",
                           "block": message.get("block"), "name": message.get("name")}
                await self.websocket.send(json.dumps(ack))
            elif message.get("type") == "params":
                try:
                    answer = await asyncio.to_thread(self.dashboard.parameters, message["block"])
                except Exception as e:  # noqa: BLE001 - the page shows the error
                    answer = {"type": "params", "ok": False, "error": f"{type(e).__name__}: {e}",
                              "block": message.get("block"), "parameters": {}}
                await self.websocket.send(json.dumps(answer))

    def hello(self) -> dict:
        """The first message: may this tab change the graph, and if not, why."""
        return {"type": "session", "control": self.control, "read_only": self.dashboard.read_only,
                "why": None if self.control else self.refusal()}

    def refusal(self) -> str:
        if self.dashboard.read_only:
            return "this dashboard was started with --read-only: it shows the graph, it changes nothing"
        return ("this page has no control token, so it can only watch: open the URL `mq dashboard` printed "
                "(it ends in ?token=...)")

    def check_control(self) -> None:
        if not self.control:
            raise PermissionError(self.refusal())

    def watch(self, port: str | None) -> None:
        """Show ``port``'s frames from now on (a port the graph running now does not have,
        one of an earlier run say, shows nothing)."""
        with self.dashboard.lock:
            self.drop_tap()
            self.port = port
            graph = self.dashboard.graph
            if port and graph is not None and port in graph.ports:
                self.tap = graph.subscribe(port, policy="drop_oldest")

    def drop_tap(self) -> None:
        if self.tap is not None:
            with contextlib.suppress(Exception):
                self.tap.close()
            self.tap = None

    def latest_frame(self) -> dict | None:
        """The newest frame waiting on the tap (older ones are skipped), downsampled
        (under the dashboard's lock)."""
        if self.tap is None:
            return None
        newest = None
        while True:
            try:
                frame = self.tap.read(timeout=0)
            except QueueClosedError:  # the graph has stopped: nothing more to show
                break
            if frame is None:
                break
            if newest is not None:
                newest.buffer.release()
            newest = frame
        if newest is None:
            return None
        with newest.buffer:
            a = newest.array
            if a.dtype.kind not in "fiu" or a.ndim != 1:
                return {"type": "frame", "port": self.port, "t": newest.timestamp, "shape": list(a.shape),
                        "data": None}
            data = downsample(a)
            data[~np.isfinite(data)] = 0.0
            return {"type": "frame", "port": self.port, "t": newest.timestamp, "size": int(a.size),
                    "data": np.round(data, 3).tolist()}

    def close(self) -> None:
        with self.dashboard.lock:
            self.drop_tap()
