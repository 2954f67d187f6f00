"""The one serialisation across the wire: a frame's header, sent as the Zenoh
attachment of a put whose payload is the frame's bytes (``prod(shape) * itemsize``).

The header's fields, little-endian, from magic ``MQF1`` to the shape's extents:
docs/network.md, "Bridge blocks".
"""

import json
import struct
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy_format

from ..errors import WireError

MAGIC = b"MQF1"
VERSION = 1
HAS_RANGE = 1  # the time range fields are set
END = 2  # end of stream: no payload; seq is the number of frames sent
_FIXED = struct.Struct("<4sHHQQqqqBH")
MAX_NDIM = 32
MAX_DTYPE = 4096


@dataclass(frozen=True)
class FrameHeader:
    stream: int
    seq: int
    timestamp: int
    time_range: tuple[int, int] | None
    dtype: np.dtype
    shape: tuple[int, ...]
    end: bool = False

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for extent in self.shape:
            n *= extent
        return n


def _fields(descr) -> list:
    """A structured dtype's descr back from JSON: [name, format(, shape)] lists to tuples."""
    if not isinstance(descr, list):
        raise WireError(f"a structured dtype's description is a list of fields, not {descr!r}")
    fields = []
    for field in descr:
        if not isinstance(field, list) or len(field) not in (2, 3) or not isinstance(field[0], str):
            raise WireError(f"a structured dtype field is [name, format(, shape)], not {field!r}")
        fmt = field[1] if isinstance(field[1], str) else _fields(field[1])
        fields.append((field[0], fmt) if len(field) == 2 else (field[0], fmt, tuple(field[2])))
    return fields


def _describe(dtype: np.dtype) -> str:
    return json.dumps(npy_format.dtype_to_descr(dtype)) if dtype.fields is not None else dtype.str


def _dtype_of(text: str) -> np.dtype:
    try:
        if text.startswith("["):
            return npy_format.descr_to_dtype(_fields(json.loads(text)))
        return np.dtype(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise WireError(f"a frame header with an unknown dtype {text[:200]!r}: {e}") from None


def encode(stream: int, seq: int, timestamp: int, time_range, dtype, shape, end: bool = False) -> bytes:
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise WireError(f"dtype {dtype} holds Python objects: it cannot cross the wire")
    if dtype.itemsize == 0:
        raise WireError(f"dtype {dtype} has no size: a frame of it holds nothing")
    text = _describe(dtype).encode()
    flags = (HAS_RANGE if time_range is not None else 0) | (END if end else 0)
    start, stop = time_range if time_range is not None else (0, 0)
    shape = tuple(int(x) for x in shape)
    if len(shape) > MAX_NDIM:
        raise WireError(f"a frame of {len(shape)} dimensions; at most {MAX_NDIM} cross the wire")
    return (_FIXED.pack(MAGIC, VERSION, flags, stream, seq, timestamp, start, stop, len(shape), len(text))
            + text + struct.pack(f"<{len(shape)}Q", *shape))


def end_marker(stream: int, frames_sent: int) -> bytes:
    return encode(stream, frames_sent, 0, None, np.uint8, (0,), end=True)


def decode(header: bytes) -> FrameHeader:
    """The header of a bridged frame; WireError says what is wrong with a bad one."""
    if len(header) < _FIXED.size:
        raise WireError(f"a frame header of {len(header)} bytes; a bridged frame's has at least "
                        f"{_FIXED.size} (is the sender a multiqueue bridge?)")
    magic, version, flags, stream, seq, timestamp, start, stop, ndim, dtype_len = _FIXED.unpack_from(header)
    if magic != MAGIC:
        raise WireError(f"not a multiqueue frame (magic {magic!r}, expected {MAGIC!r}): another "
                        "program publishes on this key")
    if version != VERSION:
        raise WireError(f"frame format version {version}; this multiqueue speaks version {VERSION}: "
                        "run the same multiqueue version on both ends")
    if ndim > MAX_NDIM or dtype_len > MAX_DTYPE:
        raise WireError(f"a frame header claiming {ndim} dimensions and a {dtype_len}-byte dtype")
    expected = _FIXED.size + dtype_len + 8 * ndim
    if len(header) != expected:
        raise WireError(f"a frame header of {len(header)} bytes, its fields say {expected}")
    text = header[_FIXED.size:_FIXED.size + dtype_len].decode("ascii", "replace")
    dtype = _dtype_of(text)
    if dtype.hasobject or dtype.itemsize == 0:
        raise WireError(f"a frame header with a dtype no frame can have: {text[:200]!r}")
    shape = struct.unpack_from(f"<{ndim}Q", header, _FIXED.size + dtype_len)
    frame = FrameHeader(stream, seq, timestamp, (start, stop) if flags & HAS_RANGE else None, dtype,
                        shape, bool(flags & END))
    if frame.nbytes > 1 << 40:
        raise WireError(f"a frame header claiming {frame.nbytes} bytes ({dtype} {shape})")
    return frame


def peek_position(header: bytes) -> tuple[int, int] | None:
    """(stream, seq) of a header, without checking the rest; None if it is not one."""
    if len(header) < _FIXED.size or header[:4] != MAGIC:
        return None
    _, _, _, stream, seq = struct.unpack_from("<4sHHQQ", header)
    return stream, seq


def check_payload(frame: FrameHeader, payload_size: int) -> None:
    expected = 0 if frame.end else frame.nbytes
    if payload_size != expected:
        raise WireError(f"frame {frame.seq}: {payload_size} bytes of payload, its header ({frame.dtype} "
                        f"{frame.shape}) says {expected}")
