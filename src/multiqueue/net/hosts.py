"""One graph, several machines: the part of a graph spec that runs on one host.

Run whole, a graph with hosts is one runtime whose remote edges are ordinary edges.
Run for a host (``host_graph``), it is that host's blocks, a BridgeSink for every
remote edge leaving them, a BridgeSource for every remote edge arriving, and a
ControlPlane, all Zenoh users in one worker process ("zenoh") so that the host holds
one Zenoh session.  See docs/network.md, "One graph, several machines".
"""

from ..errors import BridgeError, GraphError, GraphFileError
from ..graph.spec import GraphSpec
from .bridge import BridgeSink, BridgeSource, check_key
from .control import ControlPlane, graph_prefix
from .settings import ZenohSettings

ZENOH_PROCESS = "zenoh"  # the placement of a host's bridge and control blocks


def check_hosts(spec: GraphSpec) -> dict[str, ZenohSettings]:
    """Every host's Zenoh settings and every remote edge's key, checked (GraphFileError at
    the line they were written at, GraphError for a spec built in Python)."""
    settings = {}
    for host in spec.hosts.values():
        try:
            settings[host.name] = ZenohSettings.of(host.zenoh)
        except (TypeError, ValueError) as e:
            _fail(host.origin, f"hosts.{host.name}.zenoh", str(e))
    for edge in spec.edges:
        if edge.remote_key is not None:
            try:
                check_key(edge.remote_key)
            except BridgeError as e:
                _fail(edge.origin, f"connections[{edge.index}].key", str(e))
    return settings


def host_graph(spec: GraphSpec, host: str) -> GraphSpec:
    """The spec of ``host``'s part of ``spec``: its blocks, its edges, bridges for the
    remote edges that touch it and a ControlPlane."""
    if not spec.hosts:
        raise GraphError(f"host {host!r}: this graph names no hosts (add 'hosts:')")
    if host not in spec.hosts:
        raise GraphError(f"no host {host!r}; hosts: {', '.join(spec.hosts)}")
    zenoh = check_hosts(spec)[host]
    part = GraphSpec(spec.hosts[host].domain, pools=spec.pools, capacity=spec.capacity)
    for name, handle in spec.blocks.items():
        if handle.host == host:
            part.add(handle.block, name, placement=handle.placement, restart=handle.restart,
                     max_restarts=handle.max_restarts)
    for edge in spec.edges:
        _place_edge(part, edge, host, zenoh)
    control = ControlPlane(graph_prefix(spec.domain), host, zenoh=zenoh, remote_control=spec.remote_control)
    part.add(control, _free_name(part, "control"), placement=ZENOH_PROCESS, restart="restart")
    return part


def _place_edge(part: GraphSpec, edge, host: str, zenoh: ZenohSettings) -> None:
    """``edge`` in ``host``'s part: as it is, as a bridge out or in, or not at all."""
    src_here, dst_here = edge.src.block in part.blocks, edge.dst.block in part.blocks
    queueing = {"policy": edge.policy, "capacity": edge.capacity}
    if edge.remote_key is None:
        if src_here and dst_here:
            part.connect(part[edge.src.block][edge.src.port], part[edge.dst.block][edge.dst.port], **queueing)
        return
    policy = "block" if edge.policy == "block" else "drop"
    if src_here:
        tx = part.add(BridgeSink(edge.remote_key, policy=policy, zenoh=zenoh),
                      _free_name(part, f"tx{edge.index}"), placement=ZENOH_PROCESS, restart="restart")
        part.connect(part[edge.src.block][edge.src.port], tx["in"], **queueing)
    if dst_here:
        port = edge.src.spec
        receiver = BridgeSource(edge.remote_key, dtype=port.dtype, shape=port.shape, policy=policy,
                                zenoh=zenoh)
        rx = part.add(receiver, _free_name(part, f"rx{edge.index}"), placement=ZENOH_PROCESS,
                      restart="restart")
        part.connect(rx["out"], part[edge.dst.block][edge.dst.port], **queueing)


def _free_name(spec: GraphSpec, name: str) -> str:
    candidate, k = name, 1
    while candidate in spec.blocks:
        candidate, k = f"{name}_{k}", k + 1
    return candidate


def _fail(origin: tuple[str, int] | None, key: str, reason: str):
    if origin is None:
        raise GraphError(f"{key}: {reason}")
    raise GraphFileError(origin[0], origin[1], key, reason)
