"""Streams: multicast port queues of buffer ids, and timestamp sync across them."""

from .endpoints import Consumer, Producer, Stage, consumer, producer
from .queue import PortQueue, QueueReader, QueueStats, ReaderStats

__all__ = ["Consumer", "PortQueue", "Producer", "QueueReader", "QueueStats", "ReaderStats", "Stage",
           "consumer", "producer"]
