"""Step channels between one coordinator and N shard loops.

Each step the coordinator `send`s one small message to every shard and `gather`s one
acknowledgement from each (only rank 0's carries data, the sampled token ids; every
rank acks, so a hung rank is noticed). `ShmChannel` does this through shared memory on
one node (µs per step, no syscalls on the hot path); `SocketChannel` through TCP for
shards on other nodes. A channel is created by the coordinator; its `spec` (picklable)
goes to each shard once, as a Ray call argument, which opens its end with `connect(spec, rank)`.

The socket channel listens only on the node's own address and trusts nobody for being able
to connect: a shard proves the per-engine secret in its spec (HMAC challenge-response, both
ways), and every frame after that carries a number and an HMAC. Payloads on either channel
are never unpickled (see `wire`), so even a peer that got through could not run code here.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import select
import selectors
import socket
import struct
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Callable

from ..errors import HogwildError
from .errors import ChannelClosedError, ChannelTimeoutError, ShardFailedError
from .wire import HEADER, SlotLayout, WireFormatError, decode, encode, publish, read_meta, read_seq, wait_until

Watch = Callable[[], None] | None
SHM_PREFIX = "hogwild-"  # the default start of a segment's name; HOGWILD_SHM_PREFIX sets another
_PREFIX_CHARS = re.compile(r"[A-Za-z0-9._-]{1,64}")
_created: set[str] = set()  # segments this process created (and owns)


def shm_prefix() -> str:
    """How this process's segments are named: HOGWILD_SHM_PREFIX, else "hogwild-". Engines that
    share a host (several clusters, several test runs) set their own to tell their segments apart;
    Ray's workers inherit it from the process that started their node."""
    prefix = os.environ.get("HOGWILD_SHM_PREFIX", SHM_PREFIX)
    if not _PREFIX_CHARS.fullmatch(prefix):
        raise HogwildError(f"HOGWILD_SHM_PREFIX={prefix!r} is not a shared-memory name prefix: use 1-64 "
                           "letters, digits, '.', '_' or '-' (or unset it for the default 'hogwild-')")
    return prefix


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
        name = shm_prefix() + secrets.token_hex(6)
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

log = logging.getLogger(__name__)

MAGIC = b"HWRAYSC1"  # protocol and version: the first bytes a coordinator sends
NONCE = TAG = 32  # bytes of each side's fresh nonce, and of an HMAC-SHA256
CHALLENGE = struct.Struct(f"<8s{NONCE}s")  # coordinator -> shard: magic, coordinator nonce
HELLO = struct.Struct(f"<I{NONCE}s{TAG}s")  # shard -> coordinator: rank, shard nonce, proof of the secret
WELCOME = struct.Struct(f"<{TAG}s")  # coordinator -> shard: its proof of the secret
FRAME = struct.Struct("<QQIB")  # frame number (per direction), step sequence number, payload length, flag
CLOSE = 2  # flag of the coordinator's last frame
FRAME_TIMEOUT_S = 30.0  # the rest of a frame whose first bytes arrived
HANDSHAKE_TIMEOUT_S = 10.0  # a connection that has not proved the secret by then is dropped
MAX_PENDING = 32  # unfinished handshakes at once; the oldest goes first, so strangers cannot crowd ranks out


class ChannelAuthError(HogwildError, RuntimeError):
    """A peer of the socket channel did not prove the engine's secret, or sent a forged, replayed or bad frame."""


@dataclass(frozen=True)
class SocketSpec:
    """Where a shard connects and the secret it proves; it reaches the shards only as a Ray call argument."""

    host: str
    port: int
    shards: int
    capacity: int
    reply_capacity: int
    secret: bytes = field(repr=False)


def listen_on(host: str, backlog: int = 128) -> socket.socket:
    """A TCP socket listening on `host`, this node's own address, at a port the OS picks (and keeps bound).

    Never all interfaces: only peers that can reach the address the engine hands out need to connect."""
    if not host or host == "*":
        raise ValueError(_ALL_INTERFACES.format(host=host))
    family, _, _, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    if ipaddress.ip_address(addr[0].split("%")[0]).is_unspecified:
        raise ValueError(_ALL_INTERFACES.format(host=host))
    return socket.create_server(addr, family=family, backlog=backlog)


_ALL_INTERFACES = ("refusing to listen on all interfaces ({host!r}): pass this node's own address "
                   "(ray.util.get_node_ip_address(), the one its peers connect to)")


def _address(addr: Any) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _mac(key: bytes, label: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, label + transcript, hashlib.sha256).digest()


def _transcript(coordinator_nonce: bytes, shard_nonce: bytes, rank: int) -> bytes:
    """What both proofs and both frame keys are bound to: this connection alone, and its rank."""
    return MAGIC + coordinator_nonce + shard_nonce + rank.to_bytes(4, "little")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise ConnectionError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Link:
    """One authenticated connection: numbered frames, each closed by an HMAC under this connection's key
    for its direction, so a frame cannot be forged, replayed, reordered or reflected back."""

    def __init__(self, sock: socket.socket, peer: str, secret: bytes, transcript: bytes, coordinator: bool,
                 recv_limit: int) -> None:
        down = _mac(secret, b"key coordinator->shard", transcript)
        up = _mac(secret, b"key shard->coordinator", transcript)
        send_key, recv_key = (down, up) if coordinator else (up, down)
        self.sock, self.peer, self.recv_limit = _nodelay(sock), peer, recv_limit
        self._send_mac = hmac.new(send_key, digestmod=hashlib.sha256)
        self._recv_mac = hmac.new(recv_key, digestmod=hashlib.sha256)
        self.sent = self.received = 0  # frame numbers, per direction

    def send(self, seq: int, flag: int, data: bytes = b"") -> None:
        self.sent += 1
        head = FRAME.pack(self.sent, seq, len(data), flag)
        mac = self._send_mac.copy()
        mac.update(head)
        mac.update(data)
        self.sock.sendall(head + data + mac.digest())

    def read(self) -> tuple[int, int, bytes]:
        """(step seq, flag, payload) of the next frame; ChannelAuthError unless it is authentic and next in line."""
        head = _recv_exact(self.sock, FRAME.size)
        number, seq, n, flag = FRAME.unpack(head)
        if n > self.recv_limit:
            raise ChannelAuthError(f"{self.peer} announced a {n}-byte frame, over this channel's "
                                   f"{self.recv_limit}-byte limit: refused before reading it")
        body = _recv_exact(self.sock, n + TAG)
        data = body[:n]
        mac = self._recv_mac.copy()
        mac.update(head)
        mac.update(data)
        if not hmac.compare_digest(mac.digest(), body[n:]):
            raise ChannelAuthError(f"a frame from {self.peer} failed its HMAC check: forged or corrupted")
        if number != self.received + 1:
            raise ChannelAuthError(f"{self.peer} sent frame number {number}, expected {self.received + 1}: "
                                   "a replayed or reordered frame")
        self.received = number
        return seq, flag, data

    def close(self) -> None:
        self.sock.close()


@dataclass
class _Pending:
    """A connection the coordinator accepted that has not proved the secret yet."""

    sock: socket.socket
    peer: str
    nonce: bytes
    deadline: float
    hello: bytearray = field(default_factory=bytearray)


def _shake_as_shard(sock: socket.socket, spec: SocketSpec, rank: int) -> _Link:
    """The shard's side of the handshake: answer the coordinator's challenge, check its proof."""
    peer = _address(sock.getpeername())
    try:
        magic, theirs = CHALLENGE.unpack(_recv_exact(sock, CHALLENGE.size))
        if magic != MAGIC:
            raise ChannelAuthError(f"{peer} is not a hogwild-ray step channel of this version; check the "
                                   "coordinator's address and that both ends run the same hogwild-ray")
        ours = secrets.token_bytes(NONCE)
        transcript = _transcript(theirs, ours, rank)
        sock.sendall(HELLO.pack(rank, ours, _mac(spec.secret, b"shard proof", transcript)))
        (proof,) = WELCOME.unpack(_recv_exact(sock, WELCOME.size))
    except OSError as e:
        raise ChannelAuthError(
            f"the coordinator at {peer} refused rank {rank}'s handshake or went away ({e}); a shard connects "
            "once per rank, with the spec (and secret) of this engine's channel") from e
    if not hmac.compare_digest(proof, _mac(spec.secret, b"coordinator proof", transcript)):
        log.warning("step channel: %s did not prove this engine's secret; rank %d refused to talk to it", peer, rank)
        raise ChannelAuthError(f"{peer} did not prove this engine's secret: it is not this engine's coordinator; "
                               "check that the shard was handed the spec of the channel its coordinator created")
    return _Link(sock, peer, spec.secret, transcript, coordinator=False, recv_limit=spec.capacity)


class SocketChannel(StepChannel):
    """Authenticated, length-prefixed frames over one TCP connection per shard; the coordinator listens on
    its node's own address at a port the OS picks, and stops listening once every rank is in.

    Handshake: the coordinator sends MAGIC and a fresh nonce; the shard answers with its rank, its own
    nonce and HMAC(secret, both nonces and the rank); the coordinator checks it (and that the rank is
    free) and answers with its own HMAC. Every later frame carries a per-direction number and an HMAC
    under a key derived from that transcript. Payloads are the fixed message format of `wire`."""

    def __init__(self, spec: SocketSpec, rank: int | None) -> None:
        self.spec, self.rank, self.seq = spec, rank, 0
        self.server: socket.socket | None = None
        self.conns: dict[int, _Link] = {}  # coordinator: rank -> its authenticated connection
        self.link: _Link | None = None  # shard: its connection
        self._io_timeout = FRAME_TIMEOUT_S
        self._closed = False

    @classmethod
    def create(cls, shards: int, host: str = "127.0.0.1", capacity: int = 4 << 20,
               reply_capacity: int = 1 << 20) -> SocketChannel:
        """Listen on `host` (this node's address, as the shards reach it), with a fresh secret for this engine."""
        server = listen_on(host)
        server.setblocking(False)
        spec = SocketSpec(host, server.getsockname()[1], shards, capacity, reply_capacity, secrets.token_bytes(32))
        ch = cls(spec, None)
        ch.server = server
        return ch

    @classmethod
    def attach(cls, spec: SocketSpec, rank: int, timeout: float = 30.0) -> SocketChannel:
        ch = cls(spec, rank)
        sock = socket.create_connection((spec.host, spec.port), timeout=timeout)
        try:
            ch.link = _shake_as_shard(sock, spec, rank)
        except BaseException:
            sock.close()
            raise
        return ch

    # -- coordinator
    def open(self, timeout: float, watch: Watch = None) -> None:
        """Accept connections until every rank has proved the secret; refuse (and log) every other one."""
        assert self.server is not None
        self._io_timeout = max(timeout, FRAME_TIMEOUT_S)
        sel = selectors.DefaultSelector()
        sel.register(self.server, selectors.EVENT_READ, None)
        deadline, next_watch = time.monotonic() + timeout, 0.0
        try:
            while len(self.conns) < self.spec.shards:
                now = time.monotonic()
                if now > deadline:
                    raise _silent(sorted(set(range(self.spec.shards)) - set(self.conns)), timeout)
                if watch is not None and now >= next_watch:
                    watch()
                    next_watch = now + 0.05
                for key, _ in sel.select(0.05):
                    if key.data is None:
                        self._accept(sel)
                    else:
                        self._advance(sel, key.data)
                self._expire(sel, time.monotonic())
        finally:
            for key in list(sel.get_map().values()):
                if key.data is not None:
                    self._refuse(sel, key.data, "the channel stopped accepting connections before it proved "
                                                "the secret")
            sel.close()
        self.server.close()  # every rank is in: nobody else may connect
        self.server = None

    def _accept(self, sel: selectors.BaseSelector) -> None:
        """Take one connection and challenge it; the oldest unfinished handshake goes if too many wait."""
        try:
            sock, addr = self.server.accept()  # type: ignore[union-attr]
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        waiting = [k.data for k in sel.get_map().values() if k.data is not None]
        if len(waiting) >= MAX_PENDING:
            self._refuse(sel, min(waiting, key=lambda p: p.deadline), "too many unfinished handshakes at once")
        pending = _Pending(sock, _address(addr), secrets.token_bytes(NONCE), time.monotonic() + HANDSHAKE_TIMEOUT_S)
        sock.setblocking(False)
        try:
            if sock.send(CHALLENGE.pack(MAGIC, pending.nonce)) != CHALLENGE.size:
                raise ConnectionError("the challenge did not fit the socket's buffer")
        except OSError as e:
            log.warning("step channel: refused the connection from %s: %s", pending.peer, e)
            sock.close()
            return
        sel.register(sock, selectors.EVENT_READ, pending)

    def _advance(self, sel: selectors.BaseSelector, p: _Pending) -> None:
        """Read what arrived of a connection's hello; check it once complete."""
        try:
            chunk = p.sock.recv(HELLO.size - len(p.hello))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._refuse(sel, p, f"its connection failed ({e})")
        if not chunk:
            return self._refuse(sel, p, "it closed the connection before completing the handshake")
        p.hello += chunk
        if len(p.hello) < HELLO.size:
            return
        rank, nonce, proof = HELLO.unpack(p.hello)
        transcript = _transcript(p.nonce, nonce, rank)
        if not hmac.compare_digest(proof, _mac(self.spec.secret, b"shard proof", transcript)):
            return self._refuse(sel, p, "it did not prove this engine's secret (a stranger, or a shard of "
                                        "another engine)")
        if not 0 <= rank < self.spec.shards:
            return self._refuse(sel, p, f"it claims rank {rank}; this channel has ranks 0..{self.spec.shards - 1}")
        if rank in self.conns:
            return self._refuse(sel, p, f"it claims rank {rank}, which is connected already")
        sel.unregister(p.sock)
        try:
            p.sock.setblocking(True)
            p.sock.settimeout(self._io_timeout)
            p.sock.sendall(WELCOME.pack(_mac(self.spec.secret, b"coordinator proof", transcript)))
        except OSError as e:
            log.warning("step channel: rank %d at %s went away during its handshake (%s)", rank, p.peer, e)
            p.sock.close()
            return
        self.conns[rank] = _Link(p.sock, p.peer, self.spec.secret, transcript, coordinator=True,
                                 recv_limit=self.spec.reply_capacity)

    def _expire(self, sel: selectors.BaseSelector, now: float) -> None:
        for key in list(sel.get_map().values()):
            if key.data is not None and now > key.data.deadline:
                self._refuse(sel, key.data, f"it did not complete the handshake within {HANDSHAKE_TIMEOUT_S:g} s")

    @staticmethod
    def _refuse(sel: selectors.BaseSelector, p: _Pending, why: str) -> None:
        """Drop a connection that has not proved the secret: nothing it sent is used; logged once."""
        log.warning("step channel: refused the connection from %s: %s", p.peer, why)
        sel.unregister(p.sock)
        p.sock.close()

    def send(self, msg: Any) -> None:
        data = encode(msg, self.spec.capacity)
        self.seq += 1
        for rank, link in self.conns.items():
            try:
                link.send(self.seq, 0, data)
            except OSError as e:
                raise ShardFailedError(f"shard rank {rank} dropped its connection ({e})", [rank]) from e

    def gather(self, timeout: float, watch: Watch = None) -> Any:
        pending, result = set(self.conns), None
        sel = selectors.DefaultSelector()
        for rank in pending:
            sel.register(self.conns[rank].sock, selectors.EVENT_READ, rank)
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
                    data = self._ack(rank, max(left, 0.001))
                    if rank == 0 and data:
                        result = self._decode_reply(data)
                    pending.discard(rank)
                    sel.unregister(key.fileobj)
        finally:
            sel.close()
        return result

    def _ack(self, rank: int, timeout: float) -> bytes:
        """Rank `rank`'s authentic ack of the last message (its payload); ShardFailedError otherwise."""
        link = self.conns[rank]
        link.sock.settimeout(timeout)
        try:
            seq, _, data = link.read()
        except ChannelAuthError as e:
            log.warning("step channel: refused a frame from rank %d at %s: %s", rank, link.peer, e)
            link.close()
            raise ShardFailedError(f"shard rank {rank}'s connection failed authentication ({e}); the channel "
                                   "cannot be trusted any more, so the shard group stops", [rank]) from e
        except OSError as e:
            raise ShardFailedError(f"shard rank {rank} dropped its connection ({e})", [rank]) from e
        if seq != self.seq:
            raise RuntimeError(f"rank {rank} acked step {seq}, expected {self.seq}")
        return data

    @staticmethod
    def _decode_reply(data: bytes) -> Any:
        try:
            return decode(data)
        except WireFormatError as e:
            raise ShardFailedError(f"shard rank 0 replied with a malformed message ({e})", [0]) from e

    # -- shard
    def recv(self, timeout: float) -> Any:
        link = self.link
        assert link is not None
        if not select.select([link.sock], [], [], timeout)[0]:  # wait between frames, never inside one
            raise ChannelTimeoutError(f"rank {self.rank}: no step message within {timeout:g} s")
        link.sock.settimeout(FRAME_TIMEOUT_S)
        try:
            seq, flag, data = link.read()
        except (ConnectionError, TimeoutError) as e:
            raise ChannelClosedError("the coordinator closed the connection") from e
        except ChannelAuthError as e:
            log.warning("step channel: rank %d refused a frame from %s: %s", self.rank, link.peer, e)
            link.close()
            raise
        if flag == CLOSE:
            raise ChannelClosedError("the coordinator closed the channel")
        self.seq = seq
        return decode(data)

    def reply(self, obj: Any) -> None:
        assert self.link is not None
        self.link.send(self.seq, 0, encode(obj, self.spec.reply_capacity) if self.rank == 0 else b"")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for link in self.conns.values():
            try:
                link.send(0, CLOSE)
            except OSError:
                pass
            link.close()
        if self.link is not None:
            self.link.close()
        if self.server is not None:
            self.server.close()


def connect(spec: ShmSpec | SocketSpec, rank: int) -> StepChannel:
    """A shard's end of the channel the coordinator created."""
    return ShmChannel.attach(spec, rank) if isinstance(spec, ShmSpec) else SocketChannel.attach(spec, rank)
