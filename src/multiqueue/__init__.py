"""multiqueue: multi-process, zero-copy, shared-memory stream processing."""

from .errors import (
    BufferReleasedError,
    DomainFullError,
    DomainInUseError,
    InvalidBufferError,
    MultiQueueError,
    NotInitializedError,
    PoolExhaustedError,
    PoolInUseError,
    PoolNotFoundError,
    ResourceLimitError,
    SegmentError,
    SegmentVersionError,
)
from .graph import Runtime, attach
from .shm import (
    Buffer,
    BufferPool,
    PoolConfig,
    PoolStats,
    ReapReport,
    ShmConfig,
    ShmManager,
    ShmStats,
)

__version__ = "0.1.0"

__all__ = [
    "Buffer", "BufferPool", "BufferReleasedError", "DomainFullError", "DomainInUseError",
    "InvalidBufferError", "MultiQueueError", "NotInitializedError", "PoolConfig",
    "PoolExhaustedError", "PoolInUseError", "PoolNotFoundError",
    "ResourceLimitError", "PoolStats", "ReapReport", "Runtime",
    "SegmentError", "SegmentVersionError", "ShmConfig", "ShmManager", "ShmStats", "attach",
]
