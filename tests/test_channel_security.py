"""The socket step channel against strangers: only peers that prove the engine's secret get in,
every frame is authenticated and numbered, nothing from the wire is unpickled, and nothing
listens on all interfaces. Pure channel logic in one process: no Ray, fast."""

from __future__ import annotations

import dataclasses
import logging
import pickle
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from hogwild_ray.runtime import ShardFailedError, SocketChannel, connect
from hogwild_ray.runtime.channel import (
    CHALLENGE, FRAME, HELLO, MAGIC, TAG, ChannelAuthError, listen_on,
)
from hogwild_ray.runtime.wire import WireFormatError, decode

pytestmark = pytest.mark.reliability
HOST = "127.0.0.1"
LOGGER = "hogwild_ray.runtime.channel"


class Bomb:
    """Unpickling it creates `path`: proof that code from the wire ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def attach_in_thread(spec, rank: int) -> tuple[threading.Thread, list]:
    """connect() blocks until the coordinator's open() answers it; the shard end, or the error, lands in the box."""
    box: list = []

    def run() -> None:
        try:
            box.append(connect(spec, rank))
        except Exception as e:  # noqa: BLE001
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def opened(shards: int = 1) -> tuple[SocketChannel, list[SocketChannel]]:
    """A coordinator end and its shards' ends, all connected."""
    ch = SocketChannel.create(shards, host=HOST)
    started = [attach_in_thread(ch.spec, r) for r in range(shards)]
    ch.open(5)
    for t, _ in started:
        t.join(5)
    return ch, [box[0] for _, box in started]


def raw_frame(sock: socket.socket) -> bytes:
    """One whole frame's bytes as they travel, read past the channel."""
    sock.settimeout(2)
    head = sock.recv(FRAME.size, socket.MSG_WAITALL)
    n = FRAME.unpack(head)[2]
    return head + sock.recv(n + TAG, socket.MSG_WAITALL)


def refusals(caplog, peer: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and peer in r.getMessage()]


def close_all(ch: SocketChannel, shards: list[SocketChannel]) -> None:
    ch.close()
    for s in shards:
        s.close()


# ----------------------------------------------------------------------------- strangers

def test_a_stranger_without_the_secret_is_refused_and_cannot_inject(tmp_path, caplog):
    """Two strangers connect before the shard: one speaks the old unauthenticated protocol (a hello
    claiming rank 0, then a pickled 'reply'), one says nothing. Both are refused and logged once; the
    shard still gets in, its reply is the one gathered, and the pickle never runs."""
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(Bomb(marker))
    ch = SocketChannel.create(1, host=HOST)
    talker = socket.create_connection((HOST, ch.spec.port))
    talker.sendall(struct.pack("<QII", 0, 0, 1) + struct.pack("<QII", 1, len(bomb), 0) + bomb)
    silent = socket.create_connection((HOST, ch.spec.port))
    t, box = attach_in_thread(ch.spec, 0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        start = time.monotonic()
        ch.open(5)
        assert time.monotonic() - start < 3  # a silent stranger does not hold the shard up
        t.join(5)
        shard = box[0]
        assert isinstance(shard, SocketChannel)
        server = threading.Thread(target=lambda: shard.reply({"ok": shard.recv(2) == {"step": 1}}), daemon=True)
        server.start()
        ch.send({"step": 1})
        reply = ch.gather(2)
        assert not marker.exists()
        assert reply == {"ok": True}
        server.join(5)
        close_all(ch, [shard])
    for stranger in (talker, silent):
        assert len(refusals(caplog, "%s:%d" % stranger.getsockname())) == 1
        stranger.settimeout(2)
        try:
            assert stranger.recv(1024).startswith(MAGIC)  # the challenge, then nothing more: closed
            assert stranger.recv(1024) == b""
        except ConnectionResetError:
            pass
        stranger.close()


def test_a_shard_with_the_wrong_secret_is_refused(caplog):
    ch = SocketChannel.create(1, host=HOST)
    opener = threading.Thread(target=ch.open, args=(10,), daemon=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        opener.start()
        with pytest.raises(ChannelAuthError, match="refused rank 0's handshake"):
            connect(dataclasses.replace(ch.spec, secret=b"\0" * 32), 0)
        good = connect(ch.spec, 0)
        opener.join(5)
    assert any("did not prove this engine's secret" in m for m in refusals(caplog, HOST))
    ch.send({"step": 1})
    assert good.recv(2) == {"step": 1}
    close_all(ch, [good])


def test_wrong_and_duplicate_ranks_are_refused(caplog):
    """A rank comes from the authenticated handshake; out of range, or already connected, is refused."""
    ch = SocketChannel.create(2, host=HOST)
    opener = threading.Thread(target=ch.open, args=(10,), daemon=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        opener.start()
        first = connect(ch.spec, 0)
        for rank in (0, 7):
            with pytest.raises(ChannelAuthError, match=f"refused rank {rank}'s handshake"):
                connect(ch.spec, rank)
        second = connect(ch.spec, 1)
        opener.join(5)
    messages = " | ".join(refusals(caplog, HOST))
    assert "claims rank 0, which is connected already" in messages and "claims rank 7" in messages
    assert sorted(ch.conns) == [0, 1]
    ch.send({"step": 1})
    assert [first.recv(2), second.recv(2)] == [{"step": 1}] * 2
    close_all(ch, [first, second])


def test_the_channel_stops_listening_once_every_rank_is_in():
    ch, shards = opened(1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, ch.spec.port), timeout=2)
    close_all(ch, shards)


def test_a_shard_refuses_a_coordinator_that_does_not_prove_the_secret():
    ch = SocketChannel.create(1, host=HOST)  # only for a spec with a secret
    with listen_on(HOST) as impostor:
        spec = dataclasses.replace(ch.spec, port=impostor.getsockname()[1])

        def pretend() -> None:
            conn, _ = impostor.accept()
            with conn:
                conn.sendall(CHALLENGE.pack(MAGIC, b"\1" * 32))
                conn.recv(HELLO.size, socket.MSG_WAITALL)
                conn.sendall(b"\2" * 32)  # a made-up proof
                conn.recv(1)

        t = threading.Thread(target=pretend, daemon=True)
        t.start()
        with pytest.raises(ChannelAuthError, match="did not prove this engine's secret"):
            connect(spec, 0)
        t.join(5)
    ch.close()


# ----------------------------------------------------------------------------- frames

def test_a_frame_with_a_bad_hmac_is_refused(caplog):
    ch, (shard,) = opened(1)
    ch.send({"step": 1})
    shard.recv(2)
    shard.reply({"tokens": [1, 2, 3]})
    frame = bytearray(raw_frame(ch.conns[0].sock))
    frame[FRAME.size + 10] ^= 1  # one payload bit: the HMAC no longer matches
    shard.link.sock.sendall(frame)
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(ShardFailedError, match="HMAC") as err:
        ch.gather(2)
    assert err.value.ranks == [0]
    assert len(refusals(caplog, "%s:%d" % shard.link.sock.getsockname())) == 1
    close_all(ch, [shard])


def test_a_replayed_frame_is_refused_both_ways():
    ch, (shard,) = opened(1)
    # coordinator -> shard: the same step message twice
    ch.send({"step": 1})
    message = raw_frame(shard.link.sock)
    ch.conns[0].sock.sendall(message + message)
    assert shard.recv(2) == {"step": 1}
    with pytest.raises(ChannelAuthError, match="replayed or reordered"):
        shard.recv(2)
    shard.close()

    ch2, (shard2,) = opened(1)
    # shard -> coordinator: step 1's ack again, as the ack of step 2
    ch2.send({"step": 1})
    shard2.recv(2)
    shard2.reply({"tokens": [4]})
    ack = raw_frame(ch2.conns[0].sock)
    shard2.link.sock.sendall(ack)
    assert ch2.gather(2) == {"tokens": [4]}
    ch2.send({"step": 2})
    shard2.recv(2)
    shard2.link.sock.sendall(ack)
    with pytest.raises(ShardFailedError, match="replayed or reordered"):
        ch2.gather(2)
    close_all(ch, [])
    close_all(ch2, [shard2])


def test_an_oversize_length_prefix_is_refused_without_waiting_for_it():
    ch, (shard,) = opened(1)
    ch.send({"step": 1})
    shard.recv(2)
    shard.link.sock.sendall(FRAME.pack(1, 1, 2**32 - 1, 0))
    start = time.monotonic()
    with pytest.raises(ShardFailedError, match="over this channel's"):
        ch.gather(5)
    assert time.monotonic() - start < 1
    close_all(ch, [shard])


def test_a_pickle_on_the_wire_is_never_unpickled(tmp_path):
    """Not by the message format, and not even inside a frame that passed its HMAC."""
    marker = tmp_path / "pwned"
    bomb = pickle.dumps(Bomb(marker))
    with pytest.raises(WireFormatError):
        decode(bomb)
    ch, (shard,) = opened(1)
    ch.send({"step": 1})
    shard.recv(2)
    shard.link.send(1, 0, bomb)  # an authentic frame whose payload is a pickle
    with pytest.raises(ShardFailedError, match="malformed"):
        ch.gather(2)
    assert not marker.exists()
    close_all(ch, [shard])


# ----------------------------------------------------------------------------- listening sockets

def _listeners(port: int) -> set[str]:
    """Local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, p = local.split(":")
            if state == "0A" and int(p, 16) == port:
                raw = bytes.fromhex(addr)
                found.add(socket.inet_ntoa(raw[::-1]) if len(raw) == 4 else socket.inet_ntop(
                    socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))
    return found


def test_nothing_listens_on_all_interfaces():
    ch = SocketChannel.create(1, host=HOST)
    assert ch.server.getsockname()[0] == HOST
    ch.close()
    for everywhere in ("", "0.0.0.0", "::"):
        with pytest.raises(ValueError, match="all interfaces"):
            listen_on(everywhere)
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read the store's listening address from")
    from hogwild_ray.runtime.shard import listening_store

    store = listening_store(HOST, 1, 5.0)
    assert _listeners(store.port) == {HOST}
    del store


# ----------------------------------------------------------------------------- message format

def engine_messages() -> list:
    """The shapes of what coordinator and shards exchange (see shard.py and ray_executor.py)."""
    import numpy as np

    from hogwild_ray.core.sampling_params import SamplingParams

    return [
        ("open", ([(0, [1, 2])], 3, "combined", 2, [SamplingParams(seed=5), SamplingParams(temperature=0.0)])),
        ("run", ([], [(3, {0: [11], 1: [12, 13]}, False, [("common", [1, 2, 3])])])),
        {3: [7, 8], 4: [9]},
        ("init", ("10.0.0.1:29500",)),
        (0.25, 3),
        {"NCCL_NVLS_ENABLE": "0", "X": None},
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        {"step": 1, "fed": {0: [1, 2**40], 1: [-3]}, "big": 2**80, "raw": b"\0\1", "ok": True},
    ]


def test_the_message_format_round_trips_and_refuses_whatever_else_comes(tmp_path):
    """What the engine sends comes back equal (types included); random corruptions of it and pickles
    are refused with WireFormatError and nothing else: no other exception, no code run."""
    import random

    import numpy as np

    from hogwild_ray.runtime.wire import encode

    for msg in engine_messages():
        back = decode(encode(msg, 1 << 20))
        if isinstance(msg, np.ndarray):
            assert back.dtype == msg.dtype and np.array_equal(back, msg)
        else:
            assert back == msg and repr(back) == repr(msg)
    marker = tmp_path / "pwned"
    rng = random.Random(0)
    samples = [encode(m, 1 << 20) for m in engine_messages()] + [pickle.dumps(Bomb(marker))]
    for _ in range(10000):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            if rng.random() < 0.3:
                del data[at:]
                if not data:
                    break
            else:
                data[at] = rng.randrange(256)
        try:
            decode(bytes(data))
        except WireFormatError:
            pass
    assert not marker.exists()
