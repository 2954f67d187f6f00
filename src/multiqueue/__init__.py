"""multiqueue: multi-process, zero-copy, shared-memory stream processing."""

from .control import Bus
from .errors import (
    BlockError,
    BridgeError,
    BufferReleasedError,
    DomainFullError,
    DomainInUseError,
    GraphError,
    GraphFileError,
    InvalidBufferError,
    MessageTooLargeError,
    MultiQueueError,
    NotInitializedError,
    PoolExhaustedError,
    PoolInUseError,
    PoolNotFoundError,
    QueueClosedError,
    ReadersFullError,
    ResourceLimitError,
    SegmentError,
    SegmentVersionError,
    WireError,
)
from .graph import Block, Frame, Param, Port, Runtime, attach, block, load_graph
from .shm import Buffer, BufferPool, PoolConfig, PoolStats, ReapReport, ShmConfig, ShmManager, ShmStats
from .stream import Consumer, PortQueue, Producer, SyncReader

__version__ = "0.1.0"

__all__ = [
    "Block", "BlockError", "BridgeError", "Buffer", "BufferPool", "BufferReleasedError", "Bus", "Consumer",
    "DomainFullError", "DomainInUseError", "Frame", "GraphError", "GraphFileError", "InvalidBufferError",
    "MessageTooLargeError", "MultiQueueError", "NotInitializedError", "Param", "PoolConfig",
    "PoolExhaustedError", "PoolInUseError", "PoolNotFoundError", "PoolStats", "Port", "PortQueue", "Producer",
    "QueueClosedError",
    "ReadersFullError", "ReapReport", "ResourceLimitError", "Runtime", "SegmentError", "SegmentVersionError",
    "ShmConfig", "ShmManager", "ShmStats", "SyncReader", "WireError", "attach", "block", "load_graph",
]
