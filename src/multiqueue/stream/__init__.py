"""Streams: multicast port queues of buffer ids, and timestamp sync across them."""

from .endpoints import Consumer, Producer, Stage, consumer, producer
from .queue import PortQueue, QueueReader, QueueStats, ReaderStats
from .sync import POLICIES, PortSyncStats, SyncReader, SyncStats, SyncTuple

__all__ = ["POLICIES", "Consumer", "PortQueue",
           "PortSyncStats", "Producer", "QueueReader", "QueueStats", "ReaderStats", "Stage",
           "SyncReader", "SyncStats", "SyncTuple", "consumer", "producer"]
