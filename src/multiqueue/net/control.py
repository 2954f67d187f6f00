"""Control across the bridge: commands, stats and status events of blocks on other
machines, over Zenoh.

:class:`ControlPlane` (a block; ``hosts.host_graph`` adds one to every host's part)
answers under the graph's key prefix, ``mq/<graph>``; :class:`RemoteGraph` is the
other end.  The keys and their payloads: docs/network.md, "Control across the bridge".
"""

import dataclasses
import json
import logging
import time

from ..control.topics import control_topic
from ..errors import BridgeError
from ..graph import registry as R
from ..graph.block import DONE, OK, Block
from ..graph.runtime import graph_stats
from .settings import ZenohSettings, close_session, json_replies, open_session

_log = logging.getLogger("mq.control")
_ENDED = (R.DONE, R.FAILED, R.STOPPED)


def graph_prefix(graph: str) -> str:
    return f"mq/{graph}"


class ControlPlane(Block):
    """Serves this domain's blocks, stats and status events under ``prefix`` (see the
    module doc).  Ends when every other block of the graph has ended."""

    def __init__(self, prefix: str, host: str, *, zenoh=None, timeout: float = 5.0):
        super().__init__()
        self.prefix, self.host, self.timeout = prefix.rstrip("/"), host, float(timeout)
        self.zenoh = ZenohSettings.of(zenoh)
        self._session = None

    def initialize(self) -> None:
        self._session = open_session(self.zenoh)
        self._declared = [
            self._session.declare_queryable(f"{self.prefix}/block/*/ctl", self._block_command),
            self._session.declare_queryable(f"{self.prefix}/host/{self.host}/ctl", self._graph_command),
            self._session.declare_queryable(f"{self.prefix}/host/{self.host}/stats", self._stats),
        ]
        self._events = self._session.declare_publisher(f"{self.prefix}/host/{self.host}/status")

    def start(self) -> None:
        io = self._running()
        self._graph = R.GraphSegment.open(io.manager.prefix, io.manager.domain)
        self._me = self._graph.block_index(io.name)
        self._local = {b["name"] for b in self._graph.description["blocks"]}
        self._subscription = self.bus.subscribe("status", callback=self._forward_event)

    def work(self, inputs):
        states = self._graph.block_rows[:, R.STATE]
        if all(states[i] in _ENDED for i in range(len(states)) if i != self._me):
            return DONE
        self.sleep(0.1)
        return OK

    # -- Zenoh's threads ----------------------------------------------------------------

    def _block_command(self, query) -> None:
        block = str(query.key_expr).split("/")[-2]
        if block not in self._local:
            return  # another host's block: its own control plane answers
        self._answer(query, control_topic(block), f"{self.prefix}/block/{block}/ctl")

    def _graph_command(self, query) -> None:
        self._answer(query, "ctl", f"{self.prefix}/host/{self.host}/ctl")

    def _answer(self, query, topic: str, key: str) -> None:
        try:
            command = json.loads(query.payload.to_bytes()) if query.payload is not None else {}
            reply = self.bus.request(topic, command, timeout=self.timeout).data
        except Exception as e:  # noqa: BLE001 - the remote caller gets the error text
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        query.reply(key, json.dumps(reply))

    def _stats(self, query) -> None:
        stats = graph_stats(self._graph, {})
        query.reply(f"{self.prefix}/host/{self.host}/stats",
                    json.dumps({"host": self.host, **dataclasses.asdict(stats)}))

    def _forward_event(self, message) -> None:
        if not isinstance(message.data, dict):
            return
        try:
            self._events.put(json.dumps({**message.data, "host": self.host}))
        except Exception:  # noqa: BLE001 - events are best effort (e.g. while closing)
            _log.debug("could not forward a status event", exc_info=True)

    def cleanup(self) -> None:
        if getattr(self, "_subscription", None) is not None:
            self._subscription.close()  # before the publisher it forwards to goes
            self._subscription = None
        if getattr(self, "_graph", None) is not None:
            self._graph.close()
            self._graph = None
        if self._session is None:
            return
        for declared in self._declared:
            declared.undeclare()
        self._events.undeclare()
        close_session(self._session)
        self._session = None


class RemoteGraph:
    """A graph's blocks on any machine of the Zenoh network, by name."""

    def __init__(self, prefix: str, *, zenoh=None, timeout: float = 5.0):
        self.prefix, self.timeout = prefix.rstrip("/"), timeout
        self._session = open_session(ZenohSettings.of(zenoh))
        self._settle()

    def _settle(self, quiet_s: float = 0.5, limit_s: float = 3.0) -> None:
        """Wait until the peers we know stop changing (up to ``limit_s``): a peer we
        dial tells us of the others (gossip) and we connect to them in the next
        milliseconds; a query sent before would miss their hosts."""
        deadline = time.monotonic() + limit_s
        known, quiet_since = None, time.monotonic()
        while time.monotonic() < deadline:
            peers = {str(z) for z in self._session.info.peers_zid()} | {
                str(z) for z in self._session.info.routers_zid()}
            if peers != known:
                known, quiet_since = peers, time.monotonic()
            elif peers and time.monotonic() - quiet_since >= quiet_s:
                return
            time.sleep(0.02)

    def command(self, block: str, command: dict) -> dict:
        """Run a block command; returns the reply ``{"ok": True, "value": ...}`` or raises."""
        replies = self._query(f"{self.prefix}/block/{block}/ctl", command)
        if not replies:
            raise BridgeError(f"no host answered for block {block!r} under {self.prefix!r}: is its "
                              "graph running with a control plane (mq run --host) and reachable?")
        reply = replies[0]
        if not reply.get("ok"):
            raise BridgeError(f"block {block!r}: {reply.get('error')}")
        return reply

    def set_parameter(self, block: str, name: str, value, *, at_ns: int | None = None) -> None:
        command = {"cmd": "set", "name": name, "value": value}
        if at_ns is not None:
            command["at_ns"] = int(at_ns)
        self.command(block, command)

    def get_parameter(self, block: str, name: str):
        return self.command(block, {"cmd": "get", "name": name}).get("value")

    def stats(self) -> dict[str, dict]:
        """{host: its graph stats (blocks, edges)} of every host that answers."""
        return {r["host"]: r for r in self._query(f"{self.prefix}/host/*/stats")}

    def graph_command(self, cmd: str) -> dict[str, dict]:
        """A graph command (stop, pause, resume) to every host; {host: reply}."""
        replies = {}
        for reply in self._query_keys(f"{self.prefix}/host/*/ctl", {"cmd": cmd}):
            key, data = reply
            replies[key.split("/")[-2]] = data
        return replies

    def subscribe_status(self, callback):
        """Status events of every host (dicts with a "host" field) to ``callback``;
        returns the subscriber (``undeclare()`` it to stop)."""
        def deliver(sample):
            try:
                callback(json.loads(sample.payload.to_bytes()))
            except ValueError:
                _log.warning("a status event that is not JSON on %s", sample.key_expr)
        return self._session.declare_subscriber(f"{self.prefix}/host/*/status", deliver)

    def _query(self, key: str, payload: dict | None = None) -> list[dict]:
        return [data for _, data in self._query_keys(key, payload)]

    def _query_keys(self, key: str, payload: dict | None = None) -> list[tuple[str, dict]]:
        replies = self._session.get(key, payload=json.dumps(payload) if payload is not None else None,
                                    timeout=self.timeout)
        return [(k, data) for k, data in json_replies(replies) if isinstance(data, dict)]

    def close(self) -> None:
        if self._session is not None:
            close_session(self._session)
            self._session = None

    def __enter__(self) -> "RemoteGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
