"""Pure logic of the step channels: message encoding, slot layout, polling.

Messages are small trees of plain data (None, bool, int, float, str, bytes, list, tuple,
dict, numpy arrays, SamplingParams) in a fixed tagged binary format: decoding builds only
those types, so bytes from a peer can never name a class or run code (unlike pickle).
Lists of int64s (token ids) and arrays travel as raw little-endian bytes.

A slot is a header (sequence number, then payload length and a flag) followed by its
payload bytes. The writer stores payload, length, then the number, each separately; the
reader loads the number first and the rest only once it matches. Stores and loads stay
in program order on x86 (TSO), so a reader that sees the number it waits for sees the
whole message. Readers wait for one exact number (lockstep), which makes a torn read of
the number harmless too: a half-written number never equals the expected one.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import sys
import time
from array import array
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..core.sampling_params import SamplingParams
from .errors import PayloadTooLargeError

HEADER = struct.Struct("<QII")  # sequence number, payload length, flag (frames on a socket)
SEQ, META = struct.Struct("<Q"), struct.Struct("<II")  # the same header, as the two parts written apart


def publish(buf: memoryview, off: int, seq: int, length: int, flag: int) -> None:
    """Write a slot's header: length and flag first, the sequence number last."""
    META.pack_into(buf, off + SEQ.size, length, flag)
    SEQ.pack_into(buf, off, seq)


def read_seq(buf: memoryview, off: int) -> int:
    return SEQ.unpack_from(buf, off)[0]


def read_meta(buf: memoryview, off: int) -> tuple[int, int]:
    """(length, flag) of a slot; read only after its sequence number matched."""
    return META.unpack_from(buf, off + SEQ.size)


ALIGN = 64  # one cache line per header: readers of one slot do not share a line with another's writer


# ----------------------------------------------------------------------------- message format

class WireFormatError(ValueError):
    """Bytes that are not a well-formed message: refused whole, nothing of them is used."""


# one tag byte per kind of value; _INTS: a list of int64s as raw bytes, _RECORD: one of _RECORDS
(_NONE, _TRUE, _FALSE, _INT, _BIGINT, _FLOAT, _STR, _BYTES, _LIST, _TUPLE, _DICT, _INTS, _ARRAY,
 _RECORD) = b"NTFiIfsbltdqar"
_U8, _U32, _U64, _I64, _F64 = (struct.Struct(f) for f in ("<B", "<I", "<Q", "<q", "<d"))
MAX_DEPTH = 32  # nesting of containers: real messages use a handful
_RECORDS: dict[str, type] = {"SamplingParams": SamplingParams}  # the only classes a message may hold
_DTYPES = frozenset(np.dtype(t).str for t in (  # plain numbers only: no object, void or datetime arrays
    "b1", "i1", "u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16"))
_LITTLE = sys.byteorder == "little"


def encode(obj: Any, limit: int) -> bytes:
    """`obj` in the message format; PayloadTooLargeError past `limit` bytes, TypeError for what it cannot hold."""
    out = bytearray()
    _put(obj, out, 0)
    if len(out) > limit:
        raise PayloadTooLargeError(
            f"a step message of {len(out)} bytes does not fit the channel's {limit}-byte slot; "
            "create the channel with a larger capacity, or send fewer tokens per message"
        )
    return bytes(out)


def decode(data: bytes | memoryview) -> Any:
    """The message in `data` (copied out: a slot may be overwritten later); WireFormatError if malformed."""
    buf = bytes(data)
    try:
        obj, pos = _get(buf, 0, 0)
    except WireFormatError:
        raise
    except Exception as e:  # truncated, unhashable key, bad UTF-8, a record's own check...
        raise WireFormatError(f"malformed step message ({type(e).__name__}: {e})") from None
    if pos != len(buf):
        raise WireFormatError(f"malformed step message: {len(buf) - pos} bytes after its end")
    return obj


# -- encoding: one function per exact type (subclasses are refused: they would not come back as themselves)

_TAG_I64, _TAG_F64, _TAG_U32 = struct.Struct("<Bq"), struct.Struct("<Bd"), struct.Struct("<BI")


def _put(obj: Any, out: bytearray, depth: int) -> None:
    put = _PUT.get(type(obj))
    if put is not None:
        put(obj, out, depth)
    elif isinstance(obj, np.ndarray):
        _put_array(obj, out)
    elif isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        _put(obj.item(), out, depth)
    elif _RECORDS.get(type(obj).__name__) is type(obj):
        out.append(_RECORD)
        _put(type(obj).__name__, out, depth)
        _put({f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, out, depth + 1)
    else:
        t = type(obj)
        raise TypeError(f"a step message cannot carry a {t.__module__}.{t.__qualname__}; send plain data "
                        "(None, bool, int, float, str, bytes, list, tuple, dict, numpy arrays) instead")


def _put_int(v: int, out: bytearray, depth: int) -> None:
    if -(1 << 63) <= v < 1 << 63:
        out += _TAG_I64.pack(_INT, v)
    else:
        b = v.to_bytes(v.bit_length() // 8 + 1, "little", signed=True)
        out += _TAG_U32.pack(_BIGINT, len(b))
        out += b


def _put_str(v: str, out: bytearray, depth: int) -> None:
    b = v.encode("utf-8")
    out += _TAG_U32.pack(_STR, len(b))
    out += b


def _put_bytes(v: bytes | bytearray, out: bytearray, depth: int) -> None:
    out += _TAG_U32.pack(_BYTES, len(v))
    out += v


def _deeper(depth: int) -> int:
    if depth >= MAX_DEPTH:
        raise TypeError(f"a step message nests deeper than {MAX_DEPTH} levels; flatten it")
    return depth + 1


_JUST_INT = {int}  # not bool, not numpy ints: those would come back as plain ints


def _put_list(items: list, out: bytearray, depth: int) -> None:
    if len(items) > 1 and set(map(type, items)) == _JUST_INT:  # token ids: the bulk of every message
        try:
            packed = array("q", items)
        except OverflowError:
            pass
        else:
            if not _LITTLE:
                packed.byteswap()
            out += _TAG_U32.pack(_INTS, len(items))
            out += packed.tobytes()
            return
    _put_items(_LIST, items, out, depth)


def _put_items(tag: int, items: list | tuple, out: bytearray, depth: int) -> None:
    depth = _deeper(depth)
    out += _TAG_U32.pack(tag, len(items))
    get = _PUT.get
    for x in items:
        put = get(type(x))
        put(x, out, depth) if put is not None else _put(x, out, depth)


def _put_dict(d: dict, out: bytearray, depth: int) -> None:
    depth = _deeper(depth)
    out += _TAG_U32.pack(_DICT, len(d))
    get = _PUT.get
    for k, v in d.items():
        put = get(type(k))
        put(k, out, depth) if put is not None else _put(k, out, depth)
        put = get(type(v))
        put(v, out, depth) if put is not None else _put(v, out, depth)


def _put_array(a: np.ndarray, out: bytearray) -> None:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not _LITTLE):
        a = a.astype(a.dtype.newbyteorder("<"))
    if a.dtype.str not in _DTYPES:
        raise TypeError(f"a step message cannot carry a numpy array of dtype {a.dtype}; "
                        "convert it to a numeric dtype (e.g. float32) first")
    if a.ndim > MAX_DEPTH:
        raise TypeError(f"a step message cannot carry an array of {a.ndim} dimensions; reshape it")
    out.append(_ARRAY)
    _put_str(a.dtype.str, out, 0)
    out += _U8.pack(a.ndim)
    out += struct.pack(f"<{a.ndim}Q", *a.shape)
    out += _U64.pack(a.nbytes)
    out += a.tobytes()


_PUT: dict[type, Callable[[Any, bytearray, int], None]] = {
    type(None): lambda v, out, d: out.append(_NONE),
    bool: lambda v, out, d: out.append(_TRUE if v else _FALSE),
    int: _put_int,
    float: lambda v, out, d: out.extend(_TAG_F64.pack(_FLOAT, v)),
    str: _put_str,
    bytes: _put_bytes,
    bytearray: _put_bytes,
    list: _put_list,
    tuple: lambda v, out, d: _put_items(_TUPLE, v, out, d),
    dict: _put_dict,
}


# -- decoding: every length is checked against the bytes left before it is used

def _take(buf: bytes, pos: int, n: int) -> int:
    """The end of `n` bytes at `pos`, if the message holds them."""
    end = pos + n
    if end > len(buf):
        raise WireFormatError(f"malformed step message: {n} bytes announced, {len(buf) - pos} left")
    return end


def _count(buf: bytes, pos: int, least: int) -> int:
    """An item count at `pos`, each item at least `least` bytes: a count the data cannot hold is refused now."""
    n = _U32.unpack_from(buf, pos)[0]
    if n * least > len(buf) - pos - 4:
        raise WireFormatError(f"malformed step message: {n} items announced, too few bytes left")
    return n


def _get(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """The value at `pos` and the position after it."""
    tag = buf[pos]
    pos += 1
    if tag == _INT:
        return _I64.unpack_from(buf, pos)[0], pos + 8
    if tag == _LIST or tag == _TUPLE:
        n, depth = _count(buf, pos, 1), _nest(depth)
        pos += 4
        items = []
        for _ in range(n):
            x, pos = _get(buf, pos, depth)
            items.append(x)
        return (items if tag == _LIST else tuple(items)), pos
    if tag == _INTS:
        n = _count(buf, pos, 8)
        end = _take(buf, pos + 4, 8 * n)
        packed = array("q", buf[pos + 4: end])
        if not _LITTLE:
            packed.byteswap()
        return packed.tolist(), end
    if tag == _DICT:
        n, depth = _count(buf, pos, 2), _nest(depth)
        pos += 4
        out = {}
        for _ in range(n):
            k, pos = _get(buf, pos, depth)
            out[k], pos = _get(buf, pos, depth)
        return out, pos
    if tag == _STR or tag == _BYTES or tag == _BIGINT:
        end = _take(buf, pos + 4, _U32.unpack_from(buf, pos)[0])
        raw = buf[pos + 4: end]
        if tag == _STR:
            return raw.decode("utf-8"), end
        return (raw if tag == _BYTES else int.from_bytes(raw, "little", signed=True)), end
    if tag in _CONSTANTS:
        return _CONSTANTS[tag], pos
    if tag == _FLOAT:
        return _F64.unpack_from(buf, pos)[0], pos + 8
    if tag == _ARRAY:
        return _get_array(buf, pos)
    if tag == _RECORD:
        return _get_record(buf, pos, _nest(depth))
    raise WireFormatError(f"malformed step message: unknown tag {tag}")


_CONSTANTS = {_NONE: None, _TRUE: True, _FALSE: False}


def _nest(depth: int) -> int:
    if depth >= MAX_DEPTH:
        raise WireFormatError(f"malformed step message: nested deeper than {MAX_DEPTH} levels")
    return depth + 1


def _get_str(buf: bytes, pos: int) -> tuple[str, int]:
    if buf[pos] != _STR:
        raise WireFormatError("malformed step message: a name is not a string")
    name, pos = _get(buf, pos, MAX_DEPTH)
    return name, pos


def _get_array(buf: bytes, pos: int) -> tuple[np.ndarray, int]:
    dtype, pos = _get_str(buf, pos)
    if dtype not in _DTYPES:
        raise WireFormatError(f"malformed step message: array dtype {dtype!r} is not a plain number type")
    ndim = buf[pos]
    end = _take(buf, pos + 1, 8 * ndim)
    shape = struct.unpack_from(f"<{ndim}Q", buf, pos + 1)
    nbytes = _U64.unpack_from(buf, end)[0]
    if nbytes != math.prod(shape) * np.dtype(dtype).itemsize:
        raise WireFormatError(f"malformed step message: {nbytes} bytes for an array of shape {shape}")
    stop = _take(buf, end + 8, nbytes)
    return np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=end + 8).reshape(shape).copy(), stop


def _get_record(buf: bytes, pos: int, depth: int) -> tuple[Any, int]:
    name, pos = _get_str(buf, pos)
    cls = _RECORDS.get(name)
    if cls is None:
        raise WireFormatError(f"malformed step message: a record of unknown kind {name[:40]!r}")
    fields, pos = _get(buf, pos, depth)
    if type(fields) is not dict or not set(fields) <= {f.name for f in dataclasses.fields(cls)}:
        raise WireFormatError(f"malformed step message: bad fields for {cls.__name__}")
    return cls(**fields), pos


def _round_up(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class SlotLayout:
    """Offsets in one shared-memory segment: a control line, the broadcast slot, one reply slot per rank."""

    shards: int
    capacity: int  # payload bytes of the broadcast slot
    reply_capacity: int  # payload bytes of each reply slot (only rank 0's carries data)

    CLOSED = 0  # offset of the closed flag (one byte) in the control line

    @property
    def broadcast(self) -> int:
        return ALIGN

    def reply(self, rank: int) -> int:
        return ALIGN + _round_up(HEADER.size + self.capacity) + rank * _round_up(HEADER.size + self.reply_capacity)

    @property
    def size(self) -> int:
        return self.reply(self.shards)


def wait_until(ready: Callable[[], bool], timeout: float, *, watch: Callable[[], None] | None = None,
               spin_s: float = 50e-6, max_sleep_s: float = 200e-6, watch_every_s: float = 0.5) -> bool:
    """Poll `ready` until it holds (True) or `timeout` passes (False).

    Spins for a few µs (a reply that is about to land costs no sleep), then sleeps in
    growing steps up to `max_sleep_s`, so idle pollers leave the cores to the work.
    `watch` runs every `watch_every_s` while waiting, to raise if a peer died (it may be a
    Ray call: often enough for a prompt error, rarely enough to cost nothing per step).
    """
    start = now = time.perf_counter()
    while now - start < spin_s:
        if ready():
            return True
        now = time.perf_counter()
    deadline, next_watch, sleep = start + timeout, start + watch_every_s, 10e-6
    while True:
        if ready():
            return True
        now = time.perf_counter()
        if now >= deadline:
            return False
        if watch is not None and now >= next_watch:
            watch()
            next_watch = now + watch_every_s
        time.sleep(sleep)
        sleep = min(sleep * 2, max_sleep_s)
