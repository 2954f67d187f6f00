"""Streams: multicast port queues of buffer ids, and timestamp sync across them."""

from .bus import MAX_MESSAGE, Bus, Message, MessageTooLargeError, Subscription
from .endpoints import Consumer, Producer, Stage, consumer, producer
from .queue import PortQueue, QueueReader, QueueStats, ReaderStats
from .sync import POLICIES, PortSyncStats, SyncReader, SyncStats, SyncTuple

__all__ = ["MAX_MESSAGE", "POLICIES", "Bus", "Consumer", "Message", "MessageTooLargeError", "PortQueue",
           "PortSyncStats", "Producer", "QueueReader", "QueueStats", "ReaderStats", "Stage", "Subscription",
           "SyncReader", "SyncStats", "SyncTuple", "consumer", "producer"]
