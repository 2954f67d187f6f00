"""Streams: multicast port queues of buffer ids, and timestamp sync across them."""

from .queue import PortQueue, QueueReader, QueueStats, ReaderStats

__all__ = ["PortQueue", "QueueReader", "QueueStats", "ReaderStats"]
