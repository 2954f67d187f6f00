"""Flow graphs: blocks with typed ports, run across processes by a supervising runtime."""

from .attach import AttachedGraph, Tap, attach
from .block import (
    DONE,
    ERROR,
    INSUFFICIENT_INPUT,
    INSUFFICIENT_OUTPUT,
    OK,
    Block,
    Frame,
    Port,
    WorkResult,
    block,
)
from .blocks import (
    Add,
    Amplifier,
    Decimate,
    FileSink,
    FileSource,
    Multiply,
    NullSink,
    NullSource,
    Probe,
    SignalSource,
    Spectrum,
    SyncMerge,
    Tee,
    Throttle,
)
from .graphfile import load_graph, load_graph_text
from .params import Param
from .runtime import Runtime
from .spec import GraphSpec
from .stats import BlockFailure, BlockStats, EdgeStats, GraphStats

__all__ = [
    "DONE", "ERROR", "INSUFFICIENT_INPUT", "INSUFFICIENT_OUTPUT", "OK", "Add", "Amplifier", "AttachedGraph",
    "Block", "BlockFailure", "BlockStats", "Decimate", "EdgeStats", "FileSink", "FileSource",
    "Frame", "GraphSpec", "GraphStats", "Multiply", "NullSink", "NullSource", "Param", "Port",
    "Probe", "Runtime", "SignalSource", "Spectrum", "SyncMerge", "Tap", "Tee", "Throttle", "WorkResult",
    "attach", "block", "load_graph", "load_graph_text",
]
