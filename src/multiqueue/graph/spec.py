"""A graph as data: blocks, their placement and hosts, and the edges between their ports.

A :class:`GraphSpec` is validated as it is built (``add`` / ``connect``), so a spec is
always a graph that can run. Graph files produce one (``load_graph``), a
:class:`~multiqueue.graph.runtime.Runtime` runs one, and the multi-host split
(``multiqueue.net.hosts``) turns one into another: one host's part, with bridges.
"""

import re
from dataclasses import dataclass, field

from ..checks import check_capacity, check_int, show
from ..errors import GraphError
from ..shm import ShmConfig
from ..shm.segment import check_domain
from ..stream.queue import POLICIES
from . import registry as R
from .block import Block, Port

_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,23}")
_PORT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,5}")


@dataclass(frozen=True)
class PortRef:
    block: str
    port: str
    direction: str  # "in" or "out"
    spec: Port

    def __str__(self) -> str:
        return f"{self.block}.{self.port}"


class BlockHandle:
    """A block of a graph: ``handle["port"]`` names one of its ports."""

    def __init__(self, name: str, block: Block, placement: str, restart: str, max_restarts: int,
                 host: str | None = None):
        self.name, self.block = name, block
        self.placement, self.restart, self.max_restarts = placement, restart, max_restarts
        self.host = host  # the machine it runs on, in a graph with hosts
        self.inputs, self.outputs = block.input_ports(), block.output_ports()

    def __getitem__(self, port: str) -> PortRef:
        if port in self.inputs:
            return PortRef(self.name, port, "in", self.inputs[port])
        if port in self.outputs:
            return PortRef(self.name, port, "out", self.outputs[port])
        raise GraphError(f"block {self.name!r} ({type(self.block).__name__}) has no port {port!r}; "
                         f"inputs {list(self.inputs)}, outputs {list(self.outputs)}")

    @property
    def host_key(self) -> str:
        """Which worker runs it: its own (process, thread) or its named group's."""
        return self.name if self.placement in ("process", "thread") else f"group:{self.placement}"

    def __repr__(self) -> str:
        return f"<BlockHandle {self.name!r} {type(self.block).__name__} placement={self.placement}>"


@dataclass
class Edge:
    src: PortRef
    dst: PortRef
    policy: str
    capacity: int
    index: int
    remote_key: str | None = None  # between hosts: the Zenoh key its frames travel on
    origin: tuple[str, int] | None = None  # (file, line) it was written at, for errors


@dataclass
class HostSpec:
    """A machine of a multi-host graph: its domain and Zenoh settings (a mapping, read by
    multiqueue.net)."""

    name: str
    domain: str
    zenoh: dict | None = None
    origin: tuple[str, int] | None = None  # (file, line) of its zenoh settings, for errors


@dataclass
class GraphSpec:
    """A graph as data; ``add`` and ``connect`` check each step (GraphError, TypeError,
    ValueError), so a spec is always runnable.

    ``domain``: a domain name; ``pools``: None (the default pools) or a ShmConfig;
    ``capacity``: the default edge capacity, a power of two from 1 to 2**24;
    ``remote_control``: whether its hosts' control planes run control requests from other
    machines (multiqueue.net.control; stats and status are readable either way).
    """

    domain: str
    pools: ShmConfig | None = None
    capacity: int = 16
    blocks: dict[str, BlockHandle] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    hosts: dict[str, HostSpec] = field(default_factory=dict)
    remote_control: bool = False

    def __post_init__(self):
        check_domain(self.domain)  # first: the domain names files (segments, the log)
        if self.remote_control not in (True, False):
            raise TypeError(f"remote_control must be true or false, not {self.remote_control!r}")
        if self.pools is not None and not isinstance(self.pools, ShmConfig):
            raise TypeError(f"pools must be None or a ShmConfig, not {type(self.pools).__name__}")
        check_capacity(self.capacity)

    def add(self, block: Block, name: str | None = None, *, placement: str = "process",
            restart: str = "stop", max_restarts: int = 3, host: str | None = None) -> BlockHandle:
        """Add a block; returns its handle (``handle["out"]`` names a port)."""
        if not isinstance(block, Block):
            raise TypeError(f"add() takes a Block instance, not {type(block).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"block name must be None or a str, not {type(name).__name__}")
        name = name or self._default_name(block)
        if not _NAME_RE.fullmatch(name):
            raise GraphError(f"block name {name!r}: use 1-24 letters, digits and _ (not first a digit)")
        if name in self.blocks:
            raise GraphError(f"the graph already has a block named {name!r}")
        _check_placement(placement, restart, max_restarts)
        check_int(f"block {name!r}: batch", block.batch, 1)
        for port in (*block.input_ports(), *block.output_ports()):
            if not _PORT_RE.fullmatch(port):
                raise GraphError(f"block {name!r}: port name {port!r} must be 1-6 letters, digits or _")
        _check_counters(name, block.counters)
        _check_parameters(name, block)
        if host is not None and host not in self.hosts:
            raise GraphError(f"block {name!r}: no host {host!r}; hosts: {', '.join(self.hosts) or 'none'}")
        handle = BlockHandle(name, block, placement, restart, max_restarts, host)
        self.blocks[name] = handle
        return handle

    def connect(self, src: PortRef, dst: PortRef, *, policy: str = "block", capacity: int | None = None,
                remote_key: str | None = None) -> Edge:
        """Connect an output port to an input port (an output may feed many inputs)."""
        for ref in (src, dst):
            if not isinstance(ref, PortRef):
                raise TypeError(f"connect() takes ports such as rt['src']['out'], not {ref!r}")
            if ref.block not in self.blocks:
                raise GraphError(f"block {ref.block!r} is not in this graph; add() it first")
        if src.direction != "out":
            raise GraphError(f"{src} is an input port; connect(output, input)")
        if dst.direction != "in":
            raise GraphError(f"{dst} is an output port; connect(output, input)")
        if not isinstance(policy, str) or policy not in POLICIES:
            raise ValueError(f"policy must be 'block' or 'drop_oldest', not {show(policy)}")
        capacity = self.capacity if capacity is None else check_capacity(capacity)
        mismatch = src.spec.mismatch(dst.spec)
        if mismatch:
            raise GraphError(f"cannot connect {src} to {dst}: {mismatch}")
        for e in self.edges:
            if (e.dst.block, e.dst.port) == (dst.block, dst.port):
                raise GraphError(f"input {dst} already has a writer ({e.src}); an input takes one "
                                 "output; merge streams with a block")
        if src.block == dst.block or self._reaches(dst.block, src.block):
            raise GraphError(f"connecting {src} to {dst} would make a cycle; graphs must be acyclic "
                             "(there is no delay block)")
        self._check_hosts(src, dst, remote_key)
        edge = Edge(src, dst, policy, capacity, len(self.edges), remote_key)
        self.edges.append(edge)
        return edge

    def __getitem__(self, name: str) -> BlockHandle:
        try:
            return self.blocks[name]
        except KeyError:
            raise GraphError(f"no block named {name!r}; blocks: {', '.join(self.blocks) or 'none'}") from None

    def unconnected_inputs(self) -> list[PortRef]:
        """The input ports no edge feeds (a graph cannot start with one)."""
        fed = {(e.dst.block, e.dst.port) for e in self.edges}
        return [h[port] for h in self.blocks.values() for port in h.inputs if (h.name, port) not in fed]

    def _check_hosts(self, src: PortRef, dst: PortRef, remote_key: str | None) -> None:
        src_host, dst_host = self.blocks[src.block].host, self.blocks[dst.block].host
        if src_host != dst_host and remote_key is None:
            raise GraphError(f"{src} runs on host {src_host!r}, {dst} on {dst_host!r}: mark the edge "
                             "'remote: true' (its frames then cross over Zenoh)")
        if remote_key is not None and any(e.remote_key == remote_key for e in self.edges):
            raise GraphError(f"another remote edge already uses the key {remote_key!r}")

    def _default_name(self, block: Block) -> str:
        base = re.sub(r"\W", "_", type(block).__name__.lower())[:20] or "block"
        name, n = base, 2
        while name in self.blocks:
            name, n = f"{base}_{n}", n + 1
        return name

    def _reaches(self, start: str, goal: str) -> bool:
        """Is there a path of edges from block ``start`` to block ``goal``?"""
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(e.dst.block for e in self.edges if e.src.block == node)
        return False


def default_remote_key(domain: str, src: PortRef, dst: PortRef) -> str:
    """The Zenoh key of a remote edge that names none."""
    return f"mq/{domain}/data/{src.block}/{src.port}/{dst.block}/{dst.port}"


def _check_placement(placement, restart, max_restarts) -> None:
    if not isinstance(restart, str) or restart not in ("stop", "restart"):
        raise ValueError(f"restart must be 'stop' or 'restart', not {show(restart)}")
    if not isinstance(placement, str):
        raise TypeError(f"placement must be 'process', 'thread' or a process name, not "
                        f"{type(placement).__name__}")
    if not placement:
        raise ValueError("placement must be 'process', 'thread' or a process name, not ''")
    check_int("max_restarts", max_restarts, 0)


def _check_parameters(name: str, block: Block) -> None:
    """Its run-time parameters are declared as Params (or types) and hold values they
    allow, so that the first set_parameter() is not where a bad declaration shows."""
    try:
        block.check_parameters()
    except (TypeError, ValueError) as e:
        raise type(e)(f"block {name!r}: {e}") from None


def _check_counters(block: str, counters) -> None:
    """A block's own counters: a tuple of distinct names, as many as its graph row has room for."""
    if (not isinstance(counters, tuple) or len(counters) > R.MAX_COUNTERS
            or not all(isinstance(c, str) and c for c in counters) or len(set(counters)) != len(counters)):
        raise GraphError(f"block {block!r}: counters must be a tuple of at most {R.MAX_COUNTERS} distinct "
                         f"names, not {counters!r}")
