"""PortQueue: a multicast ring of buffer ids in shared memory, named inside a domain.

One producer, up to ``max_readers`` readers (each ``block`` or ``drop_oldest``, each
with its own cursor); only buffer ids travel, and the queue holds one reference per
unread item per reader. The ring itself is ``_native.Queue``. See docs/streams.md.
"""

import errno
import os
import time
import weakref

import multiqueue._native as _native  # the C extension (a module, not the package root)

from ..checks import bad_timeout, check_capacity, check_int, check_number, check_timeout
from ..errors import MultiQueueError, QueueClosedError, ReadersFullError, SegmentError
from ..shm.buffer import Buffer
from ..shm.manager import ShmManager
from ..shm.segment import is_alive, unlink_quietly
from .ring import (
    FLAG_OUTSIDE_DROP,
    KIND_QUEUE,
    LOCK_SLOT_MASK,
    MAGIC_QUEUE,
    Item,
    QueueHeader,
    QueueStats,
    ReaderRecord,
    ReaderStats,
    ReaderTotals,
    check_queue_name,
    departed_totals,
    live_lock_holder,
    open_or_create_ring,
    own_start_time,
    queue_names,
    queue_stats,
    reader_records,
    unheard_items,
)

# the ring's layout and names, for the modules that read them from here
__all__ = ["CLOCKS", "KIND_QUEUE", "LOCK_SLOT_MASK", "MAGIC_QUEUE", "POLICIES", "Item", "PortQueue",
           "QueueHeader", "QueueReader", "QueueStats", "ReaderRecord", "ReaderStats", "ReaderTotals",
           "check_queue_name", "queue_names", "reap_dead_readers_everywhere"]

POLICIES = {"block": 0, "drop_oldest": 1}
CLOCKS = {"monotonic": 0, "wall": 1}
_LOCK_STUCK_S = 5.0  # a live process holding a queue lock this long is stopped or corrupt
_SPIN_S = 50e-6  # spin this long before sleeping: a kernel wake-up costs ~40 us here
_LIVENESS_S = 0.2  # while waiting, look at the other side's liveness this often


class PortQueue:
    """A named multicast queue of buffers in a domain (create or open by name).

    ``capacity`` (a power of two) bounds the unread items per reader.  ``clock``
    stamps items pushed with no timestamp: ``"monotonic"`` (default) or ``"wall"``.
    With no reader attached, ``push`` never blocks and the item is released at once.
    One process is the producer (the first to push), unless ``multi_producer=True``.
    """

    def __init__(self, manager: ShmManager, name: str, capacity: int = 64, *, max_readers: int = 64,
                 clock: str = "monotonic", create: bool = True, multi_producer: bool = False):
        if not isinstance(manager, ShmManager):
            raise TypeError(f"manager must be a ShmManager, not {type(manager).__name__}")
        check_capacity(capacity)
        if isinstance(max_readers, bool) or not isinstance(max_readers, int) or not 1 <= max_readers <= 1024:
            raise ValueError(f"max_readers must be an int 1..1024, not {max_readers!r}")
        if not isinstance(clock, str) or clock not in CLOCKS:
            raise ValueError(f"clock must be one of {sorted(CLOCKS)}, not {clock!r}")
        check_queue_name(name)
        manager.check_usable()
        self.manager = manager
        self.name = name
        self._segment = open_or_create_ring(manager, name, capacity, max_readers, CLOCKS[clock], create)
        self._path = self._segment.path
        try:
            self._native = _native.Queue(manager.context, self._segment.mmap)
        except ValueError as e:  # the C checks of the header's sizes
            self._segment.close()
            raise SegmentError(errno.EINVAL, f"queue segment {self._path} is corrupt ({e}); remove it "
                               "if no process uses it any more") from None
        self._lock_stuck = (0, 0.0, 0.0)  # (holder, since, last seen): see _break_dead_lock
        self._header = QueueHeader.from_buffer(self._segment.mmap)
        self._readers = reader_records(self._segment)
        self._push_buffer = self._native.push_buffer
        # multi_producer: any process may push (the C push takes the queue lock); no
        # producer is recorded, so readers must not judge the queue abandoned by one
        self._producer_checked = multi_producer
        self._my_readers: weakref.WeakSet[QueueReader] = weakref.WeakSet()
        manager.add_attachment(self)  # reaped and detached along with the manager

    # -------------------------------------------------------------- producer side

    @property
    def capacity(self) -> int:
        return self._header.capacity

    @property
    def closed(self) -> bool:
        return bool(self._header.closed)

    @property
    def released(self) -> bool:
        """True once this handle was released in this process (the queue lives on)."""
        return self._native is None

    @property
    def reader_count(self) -> int:
        """Readers attached now, in any process (dead ones until reaped); 0 once released."""
        try:
            return len(self._active_readers())
        except (AttributeError, TypeError):  # released, by another thread meanwhile say
            return 0

    @property
    def pushed(self) -> int:
        """Items pushed since the queue was made, by every producer.  Counted in the C
        call of the push, so a producer killed after a push returned is never off by
        one (only a kill inside those instructions can split them, as docs/shm.md says
        of the other windows)."""
        return self._header.pushed

    @property
    def unheard(self) -> int:
        """Items pushed while no reader at all was attached: they went to nobody.  It
        cannot change while a reader is attached (every push then has a sequence number)."""
        return unheard_items(self._header)

    @property
    def default_policy(self) -> str:
        """The policy of a reader that names none: "block", or "drop_oldest" on a
        graph's port (its runtime sets that: a viewer never slows the graph)."""
        return "drop_oldest" if self._header.flags & FLAG_OUTSIDE_DROP else "block"

    @default_policy.setter
    def default_policy(self, policy: str) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'block' or 'drop_oldest', not {policy!r}")
        self._header.flags = (self._header.flags & ~FLAG_OUTSIDE_DROP) | (policy == "drop_oldest")

    @property
    def size(self) -> int:
        """Unread items of the slowest reader (0 with no reader)."""
        head = self._header.head
        lags = [head - r.cursor for r in self._active_readers()]
        return max(lags, default=0)

    def push(self, buffer: Buffer, timeout: float | None = None) -> None:
        """Send a buffer to every reader; its handle's reference moves into the queue.

        The handle is released by the push (like iceoryx2's ``send``): share() it first
        to keep writing or to push it elsewhere too.  A blocking reader without room
        makes this wait: forever for ``timeout=None``, else up to ``timeout`` seconds,
        then TimeoutError.  The lock another pusher holds for a moment is waited out
        whatever the timeout (a dead holder's is taken back, a stuck live one's raises
        MultiQueueError).  Raises QueueClosedError once the queue is closed.
        """
        if not self._producer_checked:
            self._check_pushable(buffer)  # before claiming: a wrong push claims nothing
            self._claim_producer()
        if timeout is not None and bad_timeout(timeout):  # no call for the usual None
            check_timeout(timeout)
        result = self._push_buffer(buffer)  # checks the handle again, in C
        if result != 1:
            self._push_slow(buffer, result, timeout)

    def try_push(self, buffer: Buffer) -> bool:
        """push() without waiting: False (and the handle still yours) if a reader is full."""
        try:
            self.push(buffer, timeout=0)
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Close the queue: later pushes raise QueueClosedError, readers drain then get it.

        Wakes every waiter.  Readers of dead processes are detached (their items released).
        """
        self._native.close(1)
        self.reap_dead_readers()

    def reader(self, policy: str | None = None, start: str = "latest", *, busy_poll: bool = False,
               spin: float = _SPIN_S, watch_producer: bool = True) -> "QueueReader":
        """Attach a reader.  ``policy``: ``"block"`` (lossless: the producer waits for
        it) or ``"drop_oldest"`` (it loses its oldest unread items, counted, and never
        delays anyone); None: the queue's ``default_policy`` ("block", except on a
        graph's port).  ``start``: ``"latest"`` (only new items) or ``"oldest"``
        (everything still held).  ``busy_poll`` spins instead of sleeping.
        ``watch_producer=False`` keeps waiting when the producer dies instead of
        marking the queue abandoned (for a supervisor that restarts producers)."""
        if policy is None:
            policy = self.default_policy
        if policy not in POLICIES:
            raise ValueError(f"policy must be 'block' or 'drop_oldest', not {policy!r}")
        if start not in ("latest", "oldest"):
            raise ValueError(f"start must be 'latest' or 'oldest', not {start!r}")
        check_number("spin", spin, minimum=0)
        pid = os.getpid()
        while True:
            index = self._native.join(POLICIES[policy], start == "oldest", pid, own_start_time())
            if index >= 0:
                reader = QueueReader(self, index, policy, busy_poll, spin, watch_producer)
                self._my_readers.add(reader)
                return reader
            if index == -1:
                raise ReadersFullError(
                    f"queue {self.name!r} already has {self._header.max_readers} readers; "
                    "detach some or create it with a larger max_readers")
            self._break_dead_lock()

    def wait_for_readers(self, count: int, timeout: float | None = None) -> None:
        """Wait until ``count`` readers are attached (items pushed before a reader joins
        are not delivered to it).  TimeoutError after ``timeout`` seconds."""
        check_int("count", count, 0)
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = self._native.wait(2, count, _LIVENESS_S if left is None else min(left, _LIVENESS_S), 0.0)
            if ready == 1:
                return
            if ready == -1:
                raise QueueClosedError(f"queue {self.name!r} is closed")
            if left is not None and deadline - time.monotonic() <= 0:
                raise TimeoutError(f"queue {self.name!r}: {count} readers did not attach within {timeout} s")
            self.reap_dead_readers()

    def reap_dead_readers(self) -> int:
        """Detach every reader whose process died; returns how many were detached."""
        reaped = 0
        for index, r in enumerate(self._readers[: self._header.readers_hw]):
            if r.state == 1 and not is_alive(r.pid, r.start_time):
                self._detach(index)
                reaped += 1
        return reaped

    def stats(self) -> QueueStats:
        return queue_stats(self.name, self._header, self._readers, self.manager.process_table)

    def departed(self, index: int, pid: int, joined_seq: int) -> ReaderTotals | None:
        """The last counts of reader ``index``, joined at ``joined_seq`` by process
        ``pid``, which died or left: detached here first if it is still attached (its
        unread items released).  None if its slot is another reader's by now."""
        record = self._readers[index]
        if (record.state == 1 and record.pid == pid and record.joined_seq == joined_seq
                and not is_alive(record.pid, record.start_time)):
            self._detach(index)
        return departed_totals(record, pid, joined_seq)

    def on_manager_reap(self) -> None:
        """From the manager's reaper thread: best effort, the queue may be released meanwhile."""
        try:
            if self._native is not None:
                self.reap_dead_readers()
        except (AttributeError, TypeError):
            pass  # released by another thread while we looked: nothing left to reap here

    def on_manager_shutdown(self) -> None:
        """The manager is leaving: detach this process's readers, then unmap."""
        self.release()

    def remove(self) -> None:
        """Release this handle and delete the queue from the domain (processes that
        still have it mapped keep their mapping; nobody can open it by name again)."""
        self.release()
        unlink_quietly(self._path)  # even if the manager's shutdown released the handle first

    def release(self) -> None:
        """Detach the readers made through this object and unmap the queue in this
        process (the queue itself lives on in the domain)."""
        if self._native is not None:
            for reader in list(self._my_readers):
                reader.detach()
            self.manager.remove_attachment(self)
            self._header = self._readers = None
            self._native.release_view()
            self._native = None
            self._segment.close()

    def __enter__(self) -> "PortQueue":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<PortQueue {self.name!r} capacity={self.capacity} in domain {self.manager.domain!r}>"

    # -------------------------------------------------------------- internals

    def _check_pushable(self, buffer) -> None:
        """Raise the error push_buffer's codes -5, -6 and -7 stand for."""
        if buffer.__class__ is not Buffer:
            raise TypeError(f"push takes a Buffer, not {type(buffer).__name__}")
        buffer.check_usable()  # so its manager's context is the current one: compare managers
        if buffer.manager is not self.manager:
            raise MultiQueueError(
                f"buffer {buffer.id:#x} belongs to domain {buffer.manager.domain!r} (or another "
                f"manager); queue {self.name!r} carries buffers of its own manager only")

    def _push_slow(self, buffer: Buffer, result: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        while True:
            if result == 1:
                return
            if result <= -5:
                self._check_pushable(buffer)
                raise MultiQueueError(f"queue {self.name!r} refused buffer {buffer!r} (code {result})")
            if result == -1:
                raise QueueClosedError(f"queue {self.name!r} is closed; nothing more can be pushed")
            if result == -3:
                raise MultiQueueError(
                    f"buffer {buffer.id:#x} is not held by this process; cannot push it to "
                    f"queue {self.name!r}")
            if result == -2:  # another pusher holds the lock (preempted, say): not "full", so
                self._break_dead_lock()  # the timeout does not apply; a dead or stuck holder is handled
            else:  # full: wait for room, looking after dead blocking readers meanwhile
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"queue {self.name!r}: a blocking reader has {self.capacity} unread items "
                        f"and made no room within {timeout} s")
                wait = _LIVENESS_S if left is None else min(left, _LIVENESS_S)
                if self._native.wait(1, 0, wait, _SPIN_S) == 0:
                    self.reap_dead_readers()  # no room for a whole slice: is a reader dead?
            result = self._push_buffer(buffer)

    def _claim_producer(self) -> None:
        """One producer per queue: record this process (or refuse a second live one)."""
        me = (os.getpid() << 32) | (self.manager.process_slot + 1)
        h = self._header
        current = h.producer
        if current and current != me and is_alive(current >> 32, h.producer_start):
            raise MultiQueueError(
                f"queue {self.name!r} already has a producer (pid {current >> 32}); a port "
                "queue has one producer side")
        offset = QueueHeader.producer.offset
        h.producer_start = 0  # "claim in progress": readers must not judge the new pid by the old start
        swapped, seen = _native.atomic_cas_u64(self._segment.mmap, offset, current, me)
        if not swapped and seen != me:
            raise MultiQueueError(f"queue {self.name!r}: another process became its producer")
        h.producer_start = own_start_time()
        self._producer_checked = True

    def _producer_alive(self) -> bool:
        """False only for a producer known dead (none yet, or one claiming, counts as alive)."""
        producer, start = self._header.producer, self._header.producer_start
        return producer == 0 or start == 0 or is_alive(producer >> 32, start)

    def _break_dead_lock(self) -> None:
        """The queue lock is held for long (milliseconds): if its holder died, or the
        lock word names no process at all (a stray write), take it away; if one live
        holder keeps it for _LOCK_STUCK_S while we keep asking, raise instead of
        spinning forever (a stopped process, or a corrupt queue)."""
        holder = self._header.lock
        if holder == 0:
            return
        proc = live_lock_holder(holder, self.manager.process_table, self.manager.process_slot)
        if proc is None:
            self._native.steal_lock(holder)
            return
        now = time.monotonic()
        last_holder, since, last_seen = self._lock_stuck
        if holder != last_holder or now - last_seen > 1.0:  # not the same continuous wait
            since = now
        self._lock_stuck = (holder, since, now)
        if now - since > _LOCK_STUCK_S:
            raise MultiQueueError(
                f"queue {self.name!r}: its lock has been held by live process {proc.pid} for over "
                f"{_LOCK_STUCK_S:.0f} s (a stopped process, or a corrupt queue); resume or stop that "
                "process, or remove the queue")

    def _detach(self, index: int) -> int:
        while True:
            released = self._native.detach(index)
            if released != -2:
                return released
            self._break_dead_lock()

    def _active_readers(self):
        return [r for r in self._readers[: self._header.readers_hw] if r.state == 1]


class QueueReader:
    """One reader's side of a PortQueue: pops buffers in order, each a reference of its own.

    ``for buffer in reader:`` yields until the queue is closed and drained.  The
    reader holds one reference per unread item; ``detach()`` (or the death of its
    process) releases them.
    """

    def __init__(self, queue: PortQueue, index: int, policy: str, busy_poll: bool, spin: float,
                 watch_producer: bool = True):
        self.queue = queue
        self.index = index
        self.policy = policy
        self._manager = queue.manager
        self._native = queue._native
        self._pop_buffer = queue._native.pop_buffer
        self._spin = -1.0 if busy_poll else spin
        self._watch_producer = watch_producer
        self._attached = True

    def pop(self, timeout: float | None = None) -> Buffer:
        """The next buffer; waits forever for ``timeout=None``, else raises TimeoutError.
        Raises QueueClosedError when the queue is closed and this reader drained it."""
        if not self._attached:  # its slot may be someone else's now: never pop from it
            raise self._gone()
        if timeout is not None and bad_timeout(timeout):  # no call for the usual None
            check_timeout(timeout)
        try:
            buffer = self._pop_buffer(self.index, self._manager)
            if buffer.__class__ is Buffer:
                return buffer
            return self._pop_slow(buffer, timeout)
        except RuntimeError as e:  # the queue was released in this process meanwhile
            raise self._gone(e) from None

    def try_pop(self) -> Buffer | None:
        """The next buffer, or None if there is none yet (QueueClosedError once drained)."""
        if not self._attached:
            raise self._gone()
        try:
            buffer = self._pop_buffer(self.index, self._manager)
            if buffer.__class__ is Buffer:
                return buffer
            if buffer == -1:
                return None
            return self._pop_slow(buffer, 0)
        except RuntimeError as e:
            raise self._gone(e) from None

    def _gone(self, error: RuntimeError | None = None) -> Exception:
        """The error for a pop on a detached reader or a released queue (else ``error``)."""
        if not self._attached or self.queue._native is None:
            return QueueClosedError(f"reader {self.index} of queue {self.queue.name!r} was detached "
                                    "(or the queue released) in this process")
        return error

    def pop_many(self, max_n: int, timeout: float | None = None) -> list[Buffer]:
        """Up to ``max_n`` buffers: waits (as pop) for the first, takes the rest if ready.
        Returns fewer, possibly none, when the timeout passes first."""
        if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 0:
            raise ValueError(f"max_n must be an int >= 0, not {max_n!r}")
        out = []
        if max_n == 0:
            return out
        try:
            out.append(self.pop(timeout))
            pop_buffer, index, manager = self._pop_buffer, self.index, self._manager
            while len(out) < max_n and self._attached:  # detached meanwhile: its slot is not ours
                buffer = pop_buffer(index, manager)
                if buffer.__class__ is not Buffer:
                    break
                out.append(buffer)
        except TimeoutError:
            pass
        except QueueClosedError:
            if not out:
                raise
        except RuntimeError as e:  # released in this process after the first pop
            if not out:
                raise self._gone(e) from None
        return out

    def peek(self) -> Buffer | None:
        """A new reference to the next buffer without consuming it, or None."""
        if not self._attached:
            raise self._gone()
        while True:
            try:
                buffer_id = self._native.peek(self.index)
            except RuntimeError as e:  # released by another thread meanwhile
                raise self._gone(e) from None
            if buffer_id < 0:
                return None
            try:
                return self._manager.get(buffer_id)
            except MultiQueueError:
                continue  # dropped or consumed meanwhile: look again

    @property
    def attached(self) -> bool:
        """False once detached (by detach(), or by the release of its queue here)."""
        return self._attached

    @property
    def lag(self) -> int:
        """Items pushed and not yet read by this reader."""
        record = self.queue._readers[self.index]
        return self.queue._header.head - record.cursor

    @property
    def drops(self) -> int:
        return self.queue._readers[self.index].drops

    @property
    def joined_seq(self) -> int:
        """The sequence number of the first item this reader could read (every item is
        numbered by its push, counting from the queue's creation)."""
        return self.queue._readers[self.index].joined_seq

    def leave(self) -> ReaderTotals | None:
        """detach(), then its last counts (None if the slot was taken again at once)."""
        joined = self.joined_seq
        self.detach()
        records = self.queue._readers  # None once the queue was released here
        return None if records is None else departed_totals(records[self.index], os.getpid(), joined)

    @property
    def popped(self) -> int:
        return self.queue._readers[self.index].popped

    def detach(self) -> int:
        """Leave the queue, releasing every unread item; returns how many."""
        if not self._attached:
            return 0
        self._attached = False
        if self.queue._native is None:
            return 0  # the queue object was released, which detached us first
        return self.queue._detach(self.index)

    close = detach

    def __iter__(self):
        while True:
            try:
                yield self.pop()
            except QueueClosedError:
                return

    def __enter__(self) -> "QueueReader":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"<QueueReader {self.index} of {self.queue.name!r} policy={self.policy}>"

    def __del__(self):
        # a reader dropped without detach() must not hold items (or the producer) forever
        if self._attached and self.queue._native is not None:
            try:
                self.detach()
            except Exception:
                pass

    def _pop_slow(self, code: int, timeout: float | None) -> Buffer:
        deadline = None if timeout is None else time.monotonic() + check_timeout(timeout)
        while True:
            if code.__class__ is Buffer:
                return code
            if code == -2:
                raise QueueClosedError(self._closed_message())
            if code == -4:
                raise QueueClosedError(f"reader {self.index} of queue {self.queue.name!r} was detached")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"nothing arrived on queue {self.queue.name!r} within {timeout} s")
            wait = _LIVENESS_S if left is None else min(left, _LIVENESS_S)
            if (self._native.wait(0, self.index, wait, self._spin) == 0 and self._watch_producer
                    and not self.queue._producer_alive()):
                self._native.close(2)  # the producer died: drain, then report it
            if not self._attached:  # detached by another thread while we waited
                raise self._gone()
            code = self._pop_buffer(self.index, self._manager)

    def _closed_message(self) -> str:
        if self.queue._header.closed == 2:
            return f"queue {self.queue.name!r} was abandoned: its producer died; every item was read"
        return f"queue {self.queue.name!r} is closed and every item was read"


def reap_dead_readers_everywhere(manager, skip=()) -> int:
    """Detach the readers of dead processes from every queue of the domain but ``skip``
    (names of queues the caller reaps itself); returns how many were detached.

    A killed process may have been reading queues nobody else in this process has open
    (a block's command topics, say): without this their readers would pin references
    and hold back producers until someone happened to open them."""
    reaped = 0
    for name in queue_names(manager):
        if name in skip:
            continue
        try:
            queue = PortQueue(manager, name, create=False)
        except SegmentError:
            continue  # removed meanwhile, or not ours to read
        try:
            reaped += queue.reap_dead_readers()
        finally:
            queue.release()
    return reaped
