"""Every error multiqueue raises, in one place.

Each message says what happened, to what (names, sizes, ids) and what to do.
"""


class MultiQueueError(Exception):
    """Base class of all multiqueue errors."""


class InvalidBufferError(MultiQueueError, ValueError):
    """A buffer id is stale (its block was freed or reused), forged, or not held."""


class BufferReleasedError(InvalidBufferError):
    """A Buffer handle was used after release()."""


class PoolExhaustedError(MultiQueueError):
    """No block could be had within the timeout: every fitting pool is full."""


class PoolNotFoundError(MultiQueueError, KeyError):
    """No pool of that name exists in the domain."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class PoolInUseError(MultiQueueError):
    """A pool cannot be removed while some of its blocks are allocated."""


class SegmentError(MultiQueueError, OSError):
    """A shared-memory segment is missing, truncated, foreign, or not accessible."""


class SegmentVersionError(SegmentError):
    """A segment was written by an incompatible layout version of multiqueue."""


class DomainInUseError(MultiQueueError):
    """The domain still has live processes, so it cannot be removed."""


class DomainFullError(MultiQueueError):
    """The domain's process table or metadata table has no room left."""


class NotInitializedError(MultiQueueError, RuntimeError):
    """The ShmManager was shut down (or never initialized)."""


class QueueClosedError(MultiQueueError):
    """The queue was closed (or its producer died) and, for a reader, is drained."""


class QueueFullError(MultiQueueError):
    """A queue has no free consumer slot, or a reader cannot attach."""


class ResourceLimitError(SegmentError):
    """The machine cannot hold what was asked: /dev/shm space, memory maps, descriptors."""
