"""The live dashboard: one local web page per running graph, fed over a WebSocket.

``mq dashboard DOMAIN`` or ``Dashboard(domain).serve_forever()``. It attaches like any
other process (``multiqueue.attach``): stats from the graph segment, frames from a
``drop_oldest`` tap (downsampled here to MAX_POINTS), parameter changes over the bus.
What the page shows: docs/control.md, "Dashboard".
"""

import asyncio
import contextlib
import importlib.resources
import json
import threading
import time
from http import HTTPStatus

import numpy as np
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from ..control.bus import Bus
from ..control.topics import control_topic
from ..errors import QueueClosedError
from ..graph.attach import attach

MAX_POINTS = 1024
UPDATE_S = 0.1  # stats and frames 10 times a second


def downsample(frame: np.ndarray, points: int = MAX_POINTS) -> np.ndarray:
    """At most ``points`` values, each the max of its group (peaks stay visible)."""
    x = np.asarray(frame, dtype=np.float32).ravel()
    if x.size <= points:
        return x
    groups = -(-x.size // points)
    padded = np.full(groups * points, -np.inf, np.float32)
    padded[: x.size] = x
    return padded.reshape(points, groups).max(axis=1)


class Dashboard:
    """Serve the dashboard of ``domain``'s graph on ``host``:``port`` (0: any free port)."""

    def __init__(self, domain: str, host: str = "127.0.0.1", port: int = 8765):
        self.domain, self.host, self.port = domain, host, port
        self.graph = attach(domain, name="dashboard")
        self.bus = Bus(self.graph.manager)
        self._page = (importlib.resources.files(__package__) / "index.html").read_bytes()
        self._loop = None
        self._stop = None
        self._thread = None
        self.clients = 0

    # -- running ------------------------------------------------------------------------

    async def serve(self, ready: threading.Event | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(self._client, self.host, self.port, process_request=self._http) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self._stop

    def serve_forever(self) -> None:
        """Run in this thread until Ctrl-C (or stop() from another thread)."""
        try:
            asyncio.run(self.serve())
        finally:
            self.close()

    def start(self) -> "Dashboard":
        """Run on a thread of its own; returns once the port is listening."""
        ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self.serve(ready)), name="mq-dashboard",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the dashboard did not start listening on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        if self._thread is not None:
            self._thread.join(10)
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.bus.close()
        with contextlib.suppress(Exception):
            self.graph.close()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    # -- HTTP and WebSocket -------------------------------------------------------------

    def _http(self, connection, request):
        if request.path == "/ws":
            return None  # the WebSocket handshake goes on
        if request.path not in ("/", "/index.html"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        response = connection.respond(HTTPStatus.OK, "")
        response.body = self._page
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers["Content-Type"] = "text/html; charset=utf-8"
        response.headers["Content-Length"] = str(len(self._page))
        return response

    async def _client(self, websocket) -> None:
        self.clients += 1
        session = _Session(self, websocket)
        try:
            await session.run()
        except ConnectionClosed:
            pass
        finally:
            session.close()
            self.clients -= 1

    # -- what the page gets -------------------------------------------------------------

    def stats_message(self) -> dict:
        s = self.graph.stats()
        pools = [{"name": p.name, "used": p.blocks_used, "count": p.block_count}
                 for p in self.graph.manager.get_stats().pool_stats]
        return {
            "type": "stats", "t": time.time(),
            "blocks": {n: {"state": b.state, "in": b.items_in, "out": b.items_out, "rate_in": b.rate_in,
                           "rate_out": b.rate_out, "pid": b.pid, "restarts": b.restarts}
                       for n, b in s.blocks.items()},
            "edges": [{"src": e.src, "dst": e.dst, "policy": e.policy, "lag": e.lag, "capacity": e.capacity,
                       "drops": e.drops} for e in s.edges],
            "pools": pools,
        }

    def set_parameter(self, block: str, name: str, value) -> dict:
        answer = self.bus.request(control_topic(block), {"cmd": "set", "name": name, "value": value},
                                  timeout=5.0).data
        return {"type": "ack", "block": block, "name": name, "value": value, "ok": bool(answer.get("ok")),
                "error": answer.get("error")}


class _Session:
    """One browser tab: stats and the watched port's frames every UPDATE_S, commands in."""

    def __init__(self, dashboard: Dashboard, websocket):
        self.dashboard, self.websocket = dashboard, websocket
        self.tap = None
        self.port = None
        self._tap_lock = threading.Lock()  # _watch and _latest_frame run on worker threads

    async def run(self) -> None:
        d = self.dashboard
        await self.websocket.send(json.dumps({"type": "graph", "domain": d.domain,
                                              "graph": d.graph.description, "ports": d.graph.ports}))
        receiver = asyncio.create_task(self._receive())
        loop = asyncio.get_running_loop()
        next_update = loop.time()
        try:
            while not receiver.done():
                await self.websocket.send(json.dumps(d.stats_message()))
                frame = await asyncio.to_thread(self._latest_frame)
                if frame is not None:
                    await self.websocket.send(json.dumps(frame))
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
                await asyncio.to_thread(self._watch, message.get("port"))
            elif message.get("type") == "set":
                try:
                    ack = await asyncio.to_thread(self.dashboard.set_parameter, message["block"],
                                                  message["name"], message.get("value"))
                except Exception as e:  # noqa: BLE001 - the page shows the error
                    ack = {"type": "ack", "ok": False, "error": f"{type(e).__name__}: {e}",
                           "block": message.get("block"), "name": message.get("name")}
                await self.websocket.send(json.dumps(ack))

    def _watch(self, port: str | None) -> None:
        with self._tap_lock:
            self._watch_locked(port)

    def _watch_locked(self, port: str | None) -> None:
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        self.port = port
        if port:
            self.tap = self.dashboard.graph.subscribe(port, policy="drop_oldest")

    def _latest_frame(self) -> dict | None:
        with self._tap_lock:
            return self._latest_frame_locked()

    def _latest_frame_locked(self) -> dict | None:
        """The newest frame waiting on the tap (older ones are skipped), downsampled."""
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
        with self._tap_lock:
            if self.tap is not None:
                with contextlib.suppress(Exception):
                    self.tap.close()
                self.tap = None
