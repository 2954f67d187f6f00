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


class ReadersFullError(MultiQueueError):
    """A queue's reader table is full: no slot for another reader (a full queue is a TimeoutError)."""


class ResourceLimitError(SegmentError):
    """The machine cannot hold what was asked: /dev/shm space, memory maps, descriptors."""


class GraphError(MultiQueueError):
    """An invalid graph: unknown block or port, type mismatch, cycle, two writers."""


class BlockError(MultiQueueError):
    """A block failed (raised, returned ERROR, or its process died)."""


class MessageTooLargeError(MultiQueueError, ValueError):
    """A bus message above MAX_MESSAGE bytes."""


class BridgeError(MultiQueueError):
    """A bridge could not start (no Zenoh, bad settings) or met a peer it cannot serve."""


class WireError(MultiQueueError, ValueError):
    """A bridged frame that is not one: wrong magic, version, header or payload size."""


class GraphFileError(GraphError):
    """An invalid graph file: ``str(e)`` is ``<file>:<line>: <key path>: <reason>``."""

    def __init__(self, source: str, line: int, key: str | None, reason: str):
        self.source, self.line, self.key, self.reason = source, line, key, reason
        super().__init__(f"{source}:{line}: {key}: {reason}" if key else f"{source}:{line}: {reason}")

    def __reduce__(self):
        return type(self), (self.source, self.line, self.key, self.reason)
