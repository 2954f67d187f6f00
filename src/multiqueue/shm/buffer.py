"""Buffer: a process-local handle on one reference to a pooled shared-memory block."""

import array

import numpy as np

import multiqueue._native as _native  # the C extension (a module, not the package root)

from ..checks import check_shape
from ..errors import BufferReleasedError, InvalidBufferError
from . import layout as L

# Word indexes into a metadata entry (layout.Entry seen as uint64 / int64 words)
_W_LINK, _W_FLAGS, _W_SIZE, _W_OFFSET = L.W_LINK, L.W_FLAGS, L.W_SIZE, L.W_OFFSET
_W_TIMESTAMP, _W_RANGE_START, _W_RANGE_END, _W_ALLOC_TIME = (
    L.W_TIMESTAMP, L.W_RANGE_START, L.W_RANGE_END, L.W_ALLOC_TIME)
_W_FRAME_DTYPE = L.W_RESERVED  # frame descriptor, in the entry's reserved words: dtype.str (8 bytes)
_W_FRAME_NDIM = L.W_RESERVED + 1
_W_FRAME_DIMS = L.W_RESERVED + 2  # up to MAX_FRAME_DIMS words
MAX_FRAME_DIMS = 4
_HAS_RANGE = L.ENTRY_HAS_RANGE << 32  # in the flags half of the _W_FLAGS word
_HAS_FRAME = 2 << 32  # a frame descriptor (dtype, shape) is recorded; cleared at allocation
_ENTRY_WORDS = L.ENTRY_WORDS


class Buffer(_native.BufferBase):
    """One reference to a block of a pool, taken by this process.

    The payload is read and written in place through :meth:`memoryview` and
    :meth:`numpy`; neither copies.  ``share()`` (or ``manager.get(id)`` in any
    process) takes another reference; ``release()`` drops this one, and the last
    release returns the block to its pool.  A handle that is garbage-collected
    without ``release()`` releases itself.  Views obtained from a handle must not be
    used after it is released: the block may then be reused.

    The per-message half (construction, ``memoryview()``, ``release()``, the
    release on garbage collection, ``_check()``) is ``_native.BufferBase`` in C:
    every stream pays it per item.  Its fields are ``_manager``, ``_ctx`` (the
    manager's context when the reference was taken), ``_id``, ``_size``,
    ``_pool_id`` (-1 until read) and ``_live``.
    """

    __slots__ = ()

    # -- identity and geometry ---------------------------------------------------------

    @property
    def id(self) -> int:
        """The buffer id (generation << 32 | slot): pass it to another process."""
        return self._id

    @property
    def size(self) -> int:
        """The size requested at allocation, in bytes."""
        return self._size

    @property
    def capacity(self) -> int:
        """The block size of its pool: the most bytes the payload can hold."""
        return self._manager.pool_block_size(self._pool())

    @property
    def pool(self) -> str:
        """Name of the pool the block belongs to."""
        return self._manager.pool_name(self._pool())

    @property
    def ref_count(self) -> int:
        """References held on the block by every process and queue of the domain."""
        self._check()
        count = self._ctx.ref_count(self._id)
        if count < 0:
            raise InvalidBufferError(f"buffer {self._id:#x} is no longer valid")
        return count

    @property
    def released(self) -> bool:
        return not self._live

    @property
    def manager(self):
        """The ShmManager this reference was taken through."""
        return self._manager

    def check_usable(self) -> None:
        """Raise BufferReleasedError or InvalidBufferError unless this handle can be used
        (not released; its manager neither shut down nor inherited through fork)."""
        self._check()

    # -- timestamps ---------------------------------------------------------------------

    @property
    def timestamp(self) -> int:
        """Timestamp in integer nanoseconds (0 until set)."""
        return self._word(_W_TIMESTAMP)

    @timestamp.setter
    def timestamp(self, ns: int) -> None:
        self._set_word(_W_TIMESTAMP, _as_ns(ns, "timestamp"))

    @property
    def time_range(self) -> tuple[int, int] | None:
        """Optional half-open time range ``(start_ns, end_ns)`` the payload covers."""
        meta = self._meta()
        base = (self._id & 0xFFFFFFFF) * _ENTRY_WORDS
        if not meta[base + _W_FLAGS] & _HAS_RANGE:
            return None
        return meta[base + _W_RANGE_START], meta[base + _W_RANGE_END]

    @time_range.setter
    def time_range(self, value: tuple[int, int] | None) -> None:
        meta = self._meta()
        base = (self._id & 0xFFFFFFFF) * _ENTRY_WORDS
        if value is None:
            meta[base + _W_FLAGS] &= ~_HAS_RANGE
            return
        try:
            start, end = value
        except (TypeError, ValueError):
            raise TypeError(f"time_range must be (start_ns, end_ns) or None, not {value!r}") from None
        start, end = _as_ns(start, "time_range start"), _as_ns(end, "time_range end")
        if end < start:
            raise ValueError(f"time_range end {end} is before its start {start}")
        meta[base + _W_RANGE_START] = start
        meta[base + _W_RANGE_END] = end
        meta[base + _W_FLAGS] |= _HAS_RANGE

    @property
    def alloc_time(self) -> int:
        """CLOCK_MONOTONIC nanoseconds at which the block was allocated."""
        return self._word(_W_ALLOC_TIME)

    # -- payload views (no copies) -------------------------------------------------------

    # memoryview(): in BufferBase (C): a writable memoryview of the payload's ``size``
    # bytes, in place, from the manager's per-slot view cache.

    @property
    def frame(self) -> tuple[np.dtype, tuple[int, ...]] | None:
        """The (dtype, shape) recorded with :meth:`set_frame`, or None."""
        info = self._frame_info()
        return None if info is None else info[:2]

    def _frame_info(self) -> tuple[np.dtype, tuple[int, ...], int] | None:
        """(dtype, shape, bytes) of the recorded frame, or None."""
        meta = self._meta()
        base = (self._id & 0xFFFFFFFF) * _ENTRY_WORDS
        if not meta[base + _W_FLAGS] & _HAS_FRAME:
            return None
        key = tuple(meta[base + _W_FRAME_DTYPE : base + _W_FRAME_DIMS + meta[base + _W_FRAME_NDIM]])
        frame = _decoded_frames.get(key)
        if frame is None:  # first time this process meets this dtype and shape
            code = int(key[0]).to_bytes(8, "little", signed=True).rstrip(b"\0")
            dtype, shape = np.dtype(code.decode()), tuple(int(n) for n in key[2:])
            nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            frame = _decoded_frames[key] = (dtype, shape, nbytes)
            _bound(_decoded_frames)
        return frame

    def set_frame(self, dtype, shape) -> None:
        """Record the payload's dtype and shape with the buffer, for every reader.

        ``numpy()`` without arguments then returns an array of that dtype and shape,
        in any process.  Plain dtypes and up to four dimensions can be recorded.
        """
        try:
            words = _encoded_frames.get((dtype, shape)) if shape.__class__ is tuple else None
        except TypeError:  # an unhashable dtype (a structured one as a list): _encode_frame says no
            words = None
        if words is None:
            words = _encode_frame(dtype, shape)
        nbytes = words[-1]
        if nbytes > self._size:
            raise ValueError(
                f"frame {shape} of {np.dtype(dtype)} needs {nbytes} bytes but the buffer holds {self._size}")
        meta = self._meta()
        base = (self._id & 0xFFFFFFFF) * _ENTRY_WORDS
        meta[base + _W_FRAME_DTYPE : base + _W_FRAME_DTYPE + len(words) - 1] = words[:-1]
        meta[base + _W_FLAGS] |= _HAS_FRAME

    def numpy(self, dtype=None, shape=None) -> np.ndarray:
        """A numpy array over the payload, in place (no copy).

        With neither argument, the frame recorded by :meth:`set_frame` if any, else
        uint8 bytes.  Without ``shape`` the array is 1-D over all ``size`` bytes, which
        must be a multiple of the dtype's item size; with ``shape`` it may cover fewer.
        """
        # _frame_info() checks the handle too; _check() is in C: cheap to repeat
        recorded = self._frame_info() if dtype is None and shape is None else self._check()
        slot = self._id & 0xFFFFFFFF
        block = self._manager.block_arrays[slot]  # a uint8 array of the block, made once
        if block is None:
            block = self._manager.block_array(slot)
        if recorded is not None:  # the common case of a stream: checked when it was recorded
            dtype, shape, nbytes = recorded
            if nbytes > self._size:
                raise ValueError(f"recorded frame {shape} of {dtype} exceeds the buffer's {self._size} bytes")
            return block[:nbytes].view(dtype).reshape(shape)
        dtype = np.dtype(np.uint8 if dtype is None else dtype)
        if shape is None:
            if self._size % dtype.itemsize:
                raise ValueError(
                    f"buffer size {self._size} is not a multiple of {dtype} item size "
                    f"{dtype.itemsize}; pass shape= or allocate a multiple"
                )
            return block[: self._size].view(dtype)
        shape = check_shape("shape", shape)
        count = 1
        for n in shape:
            count *= n
        if count * dtype.itemsize > self._size or any(n < 0 for n in shape):
            raise ValueError(
                f"shape {shape} of {dtype} needs {count * dtype.itemsize} bytes but the "
                f"buffer holds {self._size}"
            )
        return block[: count * dtype.itemsize].view(dtype).reshape(shape)

    # -- references ----------------------------------------------------------------------

    def share(self) -> "Buffer":
        """Take another reference on the same block (a new handle)."""
        self._check()
        return self._manager.get(self._id)

    # release(): in BufferBase (C); its failures come back to _release_failed().

    def _release_failed(self, was_live: bool) -> None:
        if not was_live:
            raise BufferReleasedError(f"buffer {self._id:#x} was already released")
        raise InvalidBufferError(
            f"buffer {self._id:#x}: this process no longer holds its reference "
            "(the manager was shut down or the process was reaped)"
        )

    def __enter__(self) -> "Buffer":
        self._check()
        return self

    def __exit__(self, *exc) -> None:
        if self._live:
            self.release()

    def __repr__(self) -> str:
        state = "live" if self._live else "released"
        return f"<Buffer id={self._id:#x} size={self._size} pool={self._pool_id} {state}>"

    def _pool(self) -> int:
        """The pool id, read from the metadata the first time it is needed."""
        if self._pool_id < 0:
            self._check()
            link = self._manager.metadata_u64[(self._id & 0xFFFFFFFF) * _ENTRY_WORDS + _W_LINK]
            self._pool_id = (link >> 32) & 0xFFFF
        return self._pool_id

    # -- internals -----------------------------------------------------------------------

    # _check(): in BufferBase (C); raises through _raise_unusable() when the handle
    # is released or its manager's context was shut down (or inherited through fork).

    def _raise_unusable(self) -> None:
        if not self._live:
            raise BufferReleasedError(
                f"buffer {self._id:#x} was released; take a new reference with "
                "manager.get(id) before using it again"
            )
        if self._ctx is not self._manager.context or not self._manager.is_initialized():
            # shutdown() released every reference of the process, this one included
            raise InvalidBufferError(
                f"buffer {self._id:#x} belongs to a ShmManager of domain "
                f"{self._manager.domain!r} that was shut down; its reference is gone"
            )
        raise InvalidBufferError(
            f"buffer {self._id:#x}: its domain {self._manager.domain!r} is no longer usable "
            "in this process (shut down, or inherited through fork)"
        )

    def _meta(self):
        self._check()
        return self._manager.metadata_i64

    def _word(self, index: int) -> int:
        return self._meta()[(self._id & 0xFFFFFFFF) * _ENTRY_WORDS + index]

    def _set_word(self, index: int, value: int) -> None:
        self._meta()[(self._id & 0xFFFFFFFF) * _ENTRY_WORDS + index] = value


# Frame descriptors seen by this process, both ways: (dtype, shape) <-> metadata words.
_encoded_frames: dict = {}
_decoded_frames: dict = {}
_FRAME_CACHE_MAX = 1024


def _bound(cache: dict) -> None:
    if len(cache) > _FRAME_CACHE_MAX:  # a stream of ever-new shapes: start over
        cache.clear()


def frame_nbytes(dtype, shape) -> int:
    """Bytes of a frame of ``shape`` and ``dtype`` (cached, like set_frame's encoding);
    ValueError for what set_frame would refuse."""
    words = _encoded_frames.get((dtype, shape)) if shape.__class__ is tuple else None
    if words is None:
        words = _encode_frame(dtype, shape)
    return words[-1]


def _encode_frame(dtype, shape) -> array.array:
    """The metadata words of a frame (dtype code, ndim, dims), then its byte size."""
    key = (dtype, shape) if shape.__class__ is tuple else None
    dtype = np.dtype(dtype)
    shape = check_shape("shape", shape)
    code = dtype.str.encode()
    if dtype.fields is not None or len(code) > 8 or len(shape) > MAX_FRAME_DIMS:
        raise ValueError(f"cannot record frame {dtype} {shape}: plain dtypes, up to "
                         f"{MAX_FRAME_DIMS} dimensions")
    if any(n < 0 for n in shape):
        raise ValueError(f"frame shape {shape} has a negative dimension")
    nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    words = array.array("q", [int.from_bytes(code.ljust(8, b"\0"), "little", signed=True), len(shape),
                              *shape, nbytes])
    if key is not None:
        try:
            _encoded_frames[key] = words
            _bound(_encoded_frames)
        except TypeError:
            pass  # an unhashable dtype argument: fine, just not cached
    return words


def _as_ns(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an int of nanoseconds, not {type(value).__name__}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{what} {value} does not fit in 64 bits")
    return value


_native.set_buffer_class(Buffer)
