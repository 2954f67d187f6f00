"""From a graph spec to what runs it: queue names and sizes, and what each worker gets."""

import pickle

from ..errors import GraphError
from .runner import InputEdge, WorkerBlock
from .spec import GraphSpec


def queue_name(block: str, port: str) -> str:
    """The PortQueue behind an output port."""
    return f"{block}-{port}"


def output_capacity(spec: GraphSpec, block: str, port: str) -> int:
    """An output's queue capacity: the largest its connections ask for (they share
    one ring, so a drop_oldest branch may lag that far, not only its own capacity)."""
    return max([e.capacity for e in spec.edges if (e.src.block, e.src.port) == (block, port)],
               default=spec.capacity)


def worker_blocks(spec: GraphSpec) -> dict[str, WorkerBlock]:
    """What each block's worker gets, by block name; GraphError for a graph that cannot
    start (no blocks, an unconnected input, a block that cannot be pickled)."""
    if not spec.blocks:
        raise GraphError("the graph has no blocks")
    connected = {(e.dst.block, e.dst.port) for e in spec.edges}
    workers = {}
    for index, h in enumerate(spec.blocks.values()):
        for port in h.inputs:
            if (h.name, port) not in connected:
                raise GraphError(f"input {h.name}.{port} is not connected; connect an output to it")
        in_thread = h.placement == "thread"  # runs the very object: no pickling
        inputs = [InputEdge(e.dst.port, queue_name(e.src.block, e.src.port), e.policy, e.index)
                  for e in spec.edges if e.dst.block == h.name]
        workers[h.name] = WorkerBlock(h.name, index, b"" if in_thread else _pickled(h), inputs,
                                      {p: queue_name(h.name, p) for p in h.outputs},
                                      block_object=h.block if in_thread else None)
    return workers


def _pickled(handle) -> bytes:
    try:
        return pickle.dumps(handle.block)
    except Exception as e:
        raise GraphError(f"block {handle.name!r} cannot be sent to its worker ({e}); define its class "
                         "at module level and keep open resources for initialize(), or "
                         "use placement='thread'") from None


def host_groups(spec: GraphSpec) -> dict[str, list[str]]:
    """The workers to start: {host key: the names of the blocks it runs}."""
    groups: dict[str, list[str]] = {}
    for h in spec.blocks.values():
        groups.setdefault(h.host_key, []).append(h.name)
    return groups
