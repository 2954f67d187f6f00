"""Shared-memory core: segments, registry, pools, buffer metadata, ShmManager."""

from .buffer import Buffer
from .config import PoolConfig, PoolStats, ReapReport, ShmConfig, ShmStats
from .manager import BufferPool, ShmManager

__all__ = ["Buffer", "BufferPool", "PoolConfig", "PoolStats", "ReapReport", "ShmConfig",
           "ShmManager", "ShmStats"]
