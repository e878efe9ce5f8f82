"""Step channels between one coordinator and N shard loops.

Each step the coordinator `send`s one small message to every shard and `gather`s one
acknowledgement from each (only rank 0's carries data, the sampled token ids; every
rank acks, so a hung rank is noticed). `ShmChannel` does this through shared memory on
one node (µs per step, no syscalls on the hot path); `SocketChannel` through TCP for
shards on other nodes. A channel is created by the coordinator; its `spec` (picklable)
goes to each shard once, which opens its end with `connect(spec, rank)`.
"""

from __future__ import annotations

import os
import secrets
import select
import selectors
import socket
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable

from .errors import ChannelClosedError, ChannelTimeoutError, ShardFailedError
from .wire import HEADER, SlotLayout, decode, encode, publish, read_meta, read_seq, wait_until

Watch = Callable[[], None] | None
SHM_PREFIX = "hogwild-"
_created: set[str] = set()  # segments this process created (and owns)


class StepChannel(ABC):
    """The coordinator uses send/gather, a shard recv/reply; close ends both sides' loops."""

    spec: Any

    @abstractmethod
    def open(self, timeout: float, watch: Watch = None) -> None:
        """Coordinator: wait until every shard has connected."""

    @abstractmethod
    def send(self, msg: Any) -> None:
        """Coordinator: broadcast one step's message to every shard."""

    @abstractmethod
    def gather(self, timeout: float, watch: Watch = None) -> Any:
        """Coordinator: wait for every rank's ack of the last message; rank 0's reply."""

    @abstractmethod
    def recv(self, timeout: float) -> Any:
        """Shard: the next message; ChannelTimeoutError if none came, ChannelClosedError at the end."""

    @abstractmethod
    def reply(self, obj: Any) -> None:
        """Shard: acknowledge the message just received (rank 0's `obj` goes back)."""

    @abstractmethod
    def close(self) -> None:
        """Tell shards to stop (coordinator) and free this end; idempotent."""


def _silent(ranks: list[int], timeout: float) -> ChannelTimeoutError:
    return ChannelTimeoutError(
        f"shard rank(s) {ranks} did not answer within {timeout:g} s; a rank is hung or overloaded "
        "(raise step_timeout if its steps are legitimately slow)", ranks)


# ----------------------------------------------------------------------------- shared memory

@dataclass(frozen=True)
class ShmSpec:
    name: str
    layout: SlotLayout
    spin_s: float  # busy-wait before sleeping: only when every poller has a core of its own


def _default_spin(shards: int) -> float:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 50e-6 if cores > shards + 1 else 0.0  # spinning on shared cores only delays the process that would answer


class ShmChannel(StepChannel):
    """One segment: a broadcast slot written by the coordinator, one reply slot per rank."""

    def __init__(self, spec: ShmSpec, rank: int | None, shm: shared_memory.SharedMemory) -> None:
        self.spec, self.rank, self.shm, self.buf = spec, rank, shm, shm.buf
        self.seq = 0  # coordinator: last sent; shard: last received
        self._closed = False

    @classmethod
    def create(cls, shards: int, capacity: int = 4 << 20, reply_capacity: int = 1 << 20,
               spin_s: float | None = None) -> ShmChannel:
        layout = SlotLayout(shards, capacity, reply_capacity)
        name = SHM_PREFIX + secrets.token_hex(6)
        shm = shared_memory.SharedMemory(name=name, create=True, size=layout.size)
        shm.buf[: layout.size] = bytes(layout.size)
        _created.add(name)
        return cls(ShmSpec(name, layout, _default_spin(shards) if spin_s is None else spin_s), None, shm)

    @classmethod
    def attach(cls, spec: ShmSpec, rank: int) -> ShmChannel:
        shm = shared_memory.SharedMemory(name=spec.name)
        # Python < 3.13 tracks attached segments too and unlinks them when this process
        # exits: a killed shard would delete the coordinator's segment. Only the creator owns it.
        if spec.name not in _created:
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        ch = cls(spec, rank, shm)
        publish(ch.buf, spec.layout.reply(rank), 0, 0, 1)  # flag 1: attached
        return ch

    def _acked(self) -> list[bool]:
        lay = self.spec.layout
        return [read_seq(self.buf, lay.reply(r)) == self.seq for r in range(lay.shards)]

    # -- coordinator
    def open(self, timeout: float, watch: Watch = None) -> None:
        lay = self.spec.layout
        attached = lambda: [read_meta(self.buf, lay.reply(r))[1] == 1 for r in range(lay.shards)]  # noqa: E731
        if not wait_until(lambda: all(attached()), timeout, watch=watch, spin_s=self.spec.spin_s):
            raise _silent([r for r, ok in enumerate(attached()) if not ok], timeout)
        self._unlink()  # every end is mapped: the name can go now, so no crash later can leak the segment

    def send(self, msg: Any) -> None:
        lay = self.spec.layout
        if not all(self._acked()):
            raise RuntimeError("send() before the previous message was gathered: "
                               "a slot is overwritten only once every rank acked it")
        data = encode(msg, lay.capacity)
        off = lay.broadcast + HEADER.size
        self.buf[off: off + len(data)] = data
        self.seq += 1
        publish(self.buf, lay.broadcast, self.seq, len(data), 0)

    def gather(self, timeout: float, watch: Watch = None) -> Any:
        lay = self.spec.layout
        if not wait_until(lambda: all(self._acked()), timeout, watch=watch, spin_s=self.spec.spin_s):
            raise _silent([r for r, ok in enumerate(self._acked()) if not ok], timeout)
        n, _ = read_meta(self.buf, lay.reply(0))
        off = lay.reply(0) + HEADER.size
        return decode(self.buf[off: off + n]) if n else None

    def _unlink(self) -> None:
        """Remove the segment's name (the creator's job); mapped ends keep their memory until they exit."""
        if self.spec.name in _created:
            _created.discard(self.spec.name)
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    # -- shard
    def recv(self, timeout: float) -> Any:
        lay, want = self.spec.layout, self.seq + 1
        closed = lambda: self.buf[lay.CLOSED] != 0  # noqa: E731
        if not wait_until(lambda: read_seq(self.buf, lay.broadcast) == want or closed(), timeout,
                          spin_s=self.spec.spin_s):
            raise ChannelTimeoutError(f"rank {self.rank}: no step message within {timeout:g} s")
        if closed():
            raise ChannelClosedError("the coordinator closed the channel")
        n, _ = read_meta(self.buf, lay.broadcast)
        off = lay.broadcast + HEADER.size
        msg = decode(self.buf[off: off + n])
        self.seq = want
        return msg

    def reply(self, obj: Any) -> None:
        lay = self.spec.layout
        off, n = lay.reply(self.rank), 0
        if self.rank == 0:
            data = encode(obj, lay.reply_capacity)
            n = len(data)
            self.buf[off + HEADER.size: off + HEADER.size + n] = data
        publish(self.buf, off, self.seq, n, 1)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.buf = None  # type: ignore[assignment]  # drop our view, or close() refuses
        if self.rank is None:
            self.shm.buf[self.spec.layout.CLOSED] = 1
            self._unlink()
        try:
            self.shm.close()
        except BufferError:  # a view still exported (e.g. held by a traceback): freed with the process
            pass


# ----------------------------------------------------------------------------- TCP socket

FRAME = HEADER  # sequence number, payload length, flag (1: hello, 2: close)
HELLO, CLOSE = 1, 2
FRAME_TIMEOUT_S = 30.0  # the rest of a frame whose first bytes arrived


@dataclass(frozen=True)
class SocketSpec:
    host: str
    port: int
    shards: int
    capacity: int
    reply_capacity: int


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _read_frame(sock: socket.socket) -> tuple[int, int, bytes]:
    seq, n, flag = FRAME.unpack(_recv_exact(sock, FRAME.size))
    return seq, flag, _recv_exact(sock, n) if n else b""


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class SocketChannel(StepChannel):
    """Length-prefixed frames over one TCP connection per shard; the coordinator listens on port 0."""

    def __init__(self, spec: SocketSpec, rank: int | None) -> None:
        self.spec, self.rank, self.seq = spec, rank, 0
        self.server: socket.socket | None = None
        self.conns: dict[int, socket.socket] = {}  # coordinator: rank -> connection
        self.sock: socket.socket | None = None  # shard: its connection
        self._closed = False

    @classmethod
    def create(cls, shards: int, host: str = "127.0.0.1", capacity: int = 4 << 20,
               reply_capacity: int = 1 << 20) -> SocketChannel:
        server = socket.create_server(("", 0))
        ch = cls(SocketSpec(host, server.getsockname()[1], shards, capacity, reply_capacity), None)
        ch.server = server
        return ch

    @classmethod
    def attach(cls, spec: SocketSpec, rank: int, timeout: float = 30.0) -> SocketChannel:
        ch = cls(spec, rank)
        ch.sock = _nodelay(socket.create_connection((spec.host, spec.port), timeout=timeout))
        ch.sock.sendall(FRAME.pack(rank, 0, HELLO))
        return ch

    # -- coordinator
    def open(self, timeout: float, watch: Watch = None) -> None:
        assert self.server is not None
        self.server.settimeout(0.05)
        deadline, next_watch = time.monotonic() + timeout, 0.0
        while len(self.conns) < self.spec.shards:
            now = time.monotonic()
            if now > deadline:
                raise _silent(sorted(set(range(self.spec.shards)) - set(self.conns)), timeout)
            if watch is not None and now >= next_watch:
                watch()
                next_watch = now + 0.05
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            conn.settimeout(timeout)
            rank, _, flag = FRAME.unpack(_recv_exact(conn, FRAME.size))
            self.conns[rank] = _nodelay(conn)

    def send(self, msg: Any) -> None:
        data = encode(msg, self.spec.capacity)
        self.seq += 1
        frame = FRAME.pack(self.seq, len(data), 0) + data
        for rank, conn in self.conns.items():
            try:
                conn.sendall(frame)
            except OSError as e:
                raise ShardFailedError(f"shard rank {rank} dropped its connection ({e})", [rank]) from e

    def gather(self, timeout: float, watch: Watch = None) -> Any:
        pending, result = set(self.conns), None
        sel = selectors.DefaultSelector()
        for rank in pending:
            sel.register(self.conns[rank], selectors.EVENT_READ, rank)
        try:
            deadline = time.monotonic() + timeout
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _silent(sorted(pending), timeout)
                events = sel.select(min(left, 0.05))
                if not events and watch is not None:
                    watch()
                for key, _ in events:
                    rank = key.data
                    key.fileobj.settimeout(max(left, 0.001))  # type: ignore[union-attr]
                    try:
                        seq, _, data = _read_frame(key.fileobj)  # type: ignore[arg-type]
                    except (OSError, ConnectionError) as e:
                        raise ShardFailedError(f"shard rank {rank} dropped its connection ({e})", [rank]) from e
                    if seq != self.seq:
                        raise RuntimeError(f"rank {rank} acked step {seq}, expected {self.seq}")
                    if rank == 0 and data:
                        result = decode(data)
                    pending.discard(rank)
                    sel.unregister(key.fileobj)
        finally:
            sel.close()
        return result

    # -- shard
    def recv(self, timeout: float) -> Any:
        assert self.sock is not None
        if not select.select([self.sock], [], [], timeout)[0]:  # wait between frames, never inside one
            raise ChannelTimeoutError(f"rank {self.rank}: no step message within {timeout:g} s")
        self.sock.settimeout(FRAME_TIMEOUT_S)
        try:
            seq, flag, data = _read_frame(self.sock)
        except (ConnectionError, TimeoutError) as e:
            raise ChannelClosedError("the coordinator closed the connection") from e
        if flag == CLOSE:
            raise ChannelClosedError("the coordinator closed the channel")
        self.seq = seq
        return decode(data)

    def reply(self, obj: Any) -> None:
        assert self.sock is not None
        data = encode(obj, self.spec.reply_capacity) if self.rank == 0 else b""
        self.sock.sendall(FRAME.pack(self.seq, len(data), 0) + data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for conn in self.conns.values():
            try:
                conn.sendall(FRAME.pack(0, 0, CLOSE))
            except OSError:
                pass
            conn.close()
        for s in (self.server, self.sock):
            if s is not None:
                s.close()


def connect(spec: ShmSpec | SocketSpec, rank: int) -> StepChannel:
    """A shard's end of the channel the coordinator created."""
    return ShmChannel.attach(spec, rank) if isinstance(spec, ShmSpec) else SocketChannel.attach(spec, rank)
