"""One graph, several machines: the part of a graph that runs on one host.

A graph file's ``hosts:`` names the machines (each with its Zenoh settings and,
optionally, its domain); blocks say ``host:``; edges between hosts are marked
``remote: true``.  Run whole (no host chosen), the graph is one runtime and remote
edges are ordinary edges.  Run for a host, it is that host's blocks, a BridgeSink
for every remote edge leaving them, a BridgeSource for every remote edge
arriving, and a ControlPlane, all Zenoh users in one worker process ("zenoh") so
that the host holds one Zenoh session.
"""

from dataclasses import dataclass, field

from ..graph.block import GraphError
from ..graph.runtime import Runtime
from .settings import ZenohSettings

ZENOH_PROCESS = "zenoh"  # the placement of a host's bridge and control blocks


@dataclass
class HostSpec:
    name: str
    domain: str
    zenoh: ZenohSettings = field(default_factory=ZenohSettings)


@dataclass
class RemoteEdge:
    index: int  # the edge's index in the whole graph
    key: str  # the Zenoh key its frames travel on


def data_key(graph: str, src, dst) -> str:
    return f"mq/{graph}/data/{src.block}/{src.port}/{dst.block}/{dst.port}"


def runtime_for_host(whole: Runtime, graph: str, hosts: dict[str, HostSpec], block_hosts: dict[str, str],
                     remote: dict[int, RemoteEdge], host: str) -> Runtime:
    """The runtime of ``host``'s part of ``whole`` (built, not started)."""
    from .bridge import BridgeSink, BridgeSource
    from .control import ControlPlane, graph_prefix

    if host not in hosts:
        raise GraphError(f"no host {host!r} in the graph; its hosts: {', '.join(hosts)}")
    spec = hosts[host]
    rt = Runtime(spec.domain, pools=whole.pools, capacity=whole.capacity, drain_timeout=whole.drain_timeout,
                 start_timeout=whole.start_timeout)
    here = {name for name, h in block_hosts.items() if h == host}
    for name, handle in whole.blocks.items():
        if name in here:
            rt.add(handle.block, name, placement=handle.placement, restart=handle.restart,
                   max_restarts=handle.max_restarts)
    for edge in whole.edges:
        src_here, dst_here = edge.src.block in here, edge.dst.block in here
        if edge.index not in remote:
            if src_here and dst_here:
                rt.connect(rt[edge.src.block][edge.src.port], rt[edge.dst.block][edge.dst.port],
                           policy=edge.policy, capacity=edge.capacity)
            continue
        key, policy = remote[edge.index].key, "block" if edge.policy == "block" else "drop"
        queueing = {"policy": edge.policy, "capacity": edge.capacity}
        if src_here:
            tx = rt.add(BridgeSink(key, policy=policy, zenoh=spec.zenoh), _free_name(rt, f"tx{edge.index}"),
                        placement=ZENOH_PROCESS, restart="restart")
            rt.connect(rt[edge.src.block][edge.src.port], tx["in"], **queueing)
        if dst_here:
            port = edge.src.spec
            receiver = BridgeSource(key, dtype=port.dtype, shape=port.shape, policy=policy, zenoh=spec.zenoh)
            rx = rt.add(receiver, _free_name(rt, f"rx{edge.index}"), placement=ZENOH_PROCESS,
                        restart="restart")
            rt.connect(rx["out"], rt[edge.dst.block][edge.dst.port], **queueing)
    rt.add(ControlPlane(graph_prefix(graph), host, zenoh=spec.zenoh), _free_name(rt, "control"),
           placement=ZENOH_PROCESS, restart="restart")
    return rt


def _free_name(rt: Runtime, name: str) -> str:
    candidate, k = name, 1
    while candidate in rt.blocks:
        candidate, k = f"{name}_{k}", k + 1
    return candidate
