"""Pure logic of the step channels: message encoding, slot layout, polling.

Messages are pickles of small dicts exchanged between our own processes. A slot is a
header (sequence number, then payload length and a flag) followed by its payload bytes.
The writer stores payload, length, then the number, each separately; the reader loads
the number first and the rest only once it matches. Stores and loads stay in program
order on x86 (TSO), so a reader that sees the number it waits for sees the whole
message. Readers wait for one exact number (lockstep), which makes a torn read of the
number harmless too: a half-written number never equals the expected one.
"""

from __future__ import annotations

import pickle
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

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


def encode(obj: Any, limit: int) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > limit:
        raise PayloadTooLargeError(
            f"a step message of {len(data)} bytes does not fit the channel's {limit}-byte slot; "
            "create the channel with a larger capacity, or send fewer tokens per message"
        )
    return data


def decode(data: bytes | memoryview) -> Any:
    return pickle.loads(data)


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
