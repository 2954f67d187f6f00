"""Control across the bridge: commands, stats and status events of blocks on other
machines, over Zenoh.

:class:`ControlPlane` (a block; ``hosts.host_graph`` adds one to every host's part)
answers under the graph's key prefix, ``mq/<graph>``; :class:`RemoteGraph` is the
other end.  The keys and their payloads: docs/network.md, "Control across the bridge".
Control requests (anything but reading a parameter) run only where the graph enables
remote control; every one is logged with what Zenoh tells of its sender (docs/network.md,
"Security").
"""

import dataclasses
import itertools
import json
import logging
import time

from ..control.topics import control_topic
from ..errors import BridgeError
from ..graph import registry as R
from ..graph.block import DONE, OK, Block
from ..graph.runtime import graph_stats
from .settings import ZenohSettings, close_session, import_zenoh, json_replies, open_session

_log = logging.getLogger("mq.control")
_ENDED = (R.DONE, R.FAILED, R.STOPPED)
READ_ONLY = ("get",)  # block commands that change nothing: allowed without remote control


def graph_prefix(graph: str) -> str:
    return f"mq/{graph}"


class ControlPlane(Block):
    """Serves this domain's blocks, stats and status events under ``prefix`` (see the
    module doc).  Ends when every other block of the graph has ended.  ``remote_control``:
    run control requests (set, pause, resume, stop; graph commands); refused by default."""

    def __init__(self, prefix: str, host: str, *, zenoh=None, timeout: float = 5.0,
                 remote_control: bool = False):
        super().__init__()
        self.prefix, self.host, self.timeout = prefix.rstrip("/"), host, float(timeout)
        if remote_control not in (True, False):
            raise TypeError(f"remote_control must be true or false, not {remote_control!r}")
        self.remote_control = remote_control
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
        self._answer(query, control_topic(block), f"{self.prefix}/block/{block}/ctl", f"block {block}")

    def _graph_command(self, query) -> None:
        self._answer(query, "ctl", f"{self.prefix}/host/{self.host}/ctl", f"host {self.host}")

    def _answer(self, query, topic: str, key: str, target: str) -> None:
        peer = self._peer(query)
        try:
            command = json.loads(query.payload.to_bytes()) if query.payload is not None else {}
            if not isinstance(command, dict):
                raise ValueError(f"a command is a JSON object, not {type(command).__name__}")
            if not self._allowed(command, topic):
                reply = {"ok": False, "error": f"remote control is off on host {self.host!r}: its graph "
                         "file does not say 'remote_control: true' (stats and status stay readable)"}
            else:
                reply = self.bus.request(topic, command, timeout=self.timeout).data
        except Exception as e:  # noqa: BLE001 - the remote caller gets the error text
            command, reply = None, {"ok": False, "error": f"{type(e).__name__}: {e}"}
        ok = isinstance(reply, dict) and reply.get("ok")
        # who asked for what, and what came of it: the audit trail of remote control
        (_log.info if ok else _log.warning)(
            "remote control from %s: %s %s -> %s", peer, target, _short(command),
            "ok" if ok else (reply or {}).get("error") if isinstance(reply, dict) else reply)
        query.reply(key, json.dumps(reply))

    def _allowed(self, command: dict, topic: str) -> bool:
        return self.remote_control or (topic != "ctl" and command.get("cmd") in READ_ONLY)

    def _peer(self, query) -> str:
        """Who sent ``query``, as far as Zenoh tells: the querier's session id (the query's
        source info, which RemoteGraph sets), the certificate name on our link to that
        session (mutual TLS) and the user the request says it logged in as (Zenoh keeps
        a link's login to itself; the access rules are what holds a user to its rights)."""
        zid = cert = user = None
        try:
            info = query.source_info
            zid = str(info.source_id.zid) if info is not None else None
            links = self._session.info.links() if zid else []
            cert = next((link.auth_identifier for link in links if str(link.zid) == zid), None)
            if query.attachment is not None:
                user = json.loads(query.attachment.to_bytes()).get("user")
        except Exception:  # noqa: BLE001 - identity is best effort: an odd query is still logged
            _log.debug("could not read a query's source", exc_info=True)
        return f"zid={zid or '?'} cert={cert or '-'} user={user or '-'}"

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
        self.zenoh = ZenohSettings.of(zenoh)
        self._session = open_session(self.zenoh)
        self._sent = itertools.count()
        self._source = self._source_id()
        self._settle()

    def _source_id(self):
        """An id of this session for the queries' source info (what a control plane logs);
        None where this Zenoh has no source info (it is marked unstable)."""
        try:
            self._querier = self._session.declare_querier(f"{self.prefix}/**")
            return self._querier.id
        except Exception:  # noqa: BLE001 - the log then says zid=?
            self._querier = None
            return None

    @property
    def zid(self) -> str:
        """This session's Zenoh id (what the hosts' logs name it by)."""
        return str(self._session.info.zid())

    def peers(self) -> list[str]:
        """The Zenoh ids of the peers and routers this session is connected to (none: the
        endpoints did not answer, or refused our certificate or login)."""
        return [str(z) for z in (*self._session.info.peers_zid(), *self._session.info.routers_zid())]

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
        options = {"attachment": json.dumps({"user": self.zenoh.user})}
        if self._source is not None:
            options["source_info"] = import_zenoh().SourceInfo(self._source, next(self._sent))
        replies = self._session.get(key, payload=json.dumps(payload) if payload is not None else None,
                                    timeout=self.timeout, **options)
        return [(k, data) for k, data in json_replies(replies) if isinstance(data, dict)]

    def close(self) -> None:
        if self._querier is not None:
            self._querier.undeclare()
            self._querier = None
        if self._session is not None:
            close_session(self._session)
            self._session = None

    def __enter__(self) -> "RemoteGraph":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _short(command, limit: int = 200) -> str:
    """A command for the log, cut to ``limit`` characters (a value may be large)."""
    text = json.dumps(command) if command is not None else "(unreadable)"
    return text if len(text) <= limit else text[:limit] + "..."
