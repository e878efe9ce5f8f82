"""The runtime's Ray pieces on a real local Ray cluster: placement, step channels, shard lifecycle."""

from __future__ import annotations

import os
import time

import pytest

ray = pytest.importorskip("ray")

from hogwild_ray.errors import HogwildError  # noqa: E402
from hogwild_ray.runtime import (  # noqa: E402
    ChannelTimeoutError, ClusterResourceError, PayloadTooLargeError, ShardFailedError, ShardGroup, ShmChannel,
    SocketChannel, release, reserve,
)
from ray_state import assert_clean, our_segments  # noqa: E402
from hogwild_ray.runtime.echo import EchoShard  # noqa: E402

CPUS = 4


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# ----------------------------------------------------------------------------- placement

def test_reserve_and_release():
    pg = reserve(3, use_gpu=False, timeout_s=10)
    assert [b for b in pg.bundle_specs] == [{"CPU": 1}] * 3
    release(pg)
    release(pg)  # twice is fine
    assert_clean()


def test_too_few_resources_is_a_clear_error_within_the_wait():
    start = time.monotonic()
    with pytest.raises(ClusterResourceError) as err:
        reserve(CPUS + 2, use_gpu=False, timeout_s=2)
    assert time.monotonic() - start < 5
    msg = str(err.value)
    assert isinstance(err.value, HogwildError)
    assert f"{CPUS + 2} shard(s)" in msg and "'CPU': 4" in msg and "lower the tensor-parallel degree" in msg
    assert_clean()


# ----------------------------------------------------------------------------- channels

def test_channel_without_ray_round_trips_and_bounds_payloads():
    """The same protocol in one process: pure channel logic, no actors."""
    ch = ShmChannel.create(2, capacity=256)
    shards = [ShmChannel.attach(ch.spec, r) for r in range(2)]
    ch.open(1)
    ch.send({"step": 1})
    assert [s.recv(1) for s in shards] == [{"step": 1}] * 2
    with pytest.raises(RuntimeError, match="gathered"):
        ch.send({"step": 2})  # not every rank acked yet: the slot is not overwritten
    shards[0].reply({"ids": [7]})
    with pytest.raises(ChannelTimeoutError) as err:
        ch.gather(0.05)
    assert err.value.ranks == [1]
    shards[1].reply(None)
    assert ch.gather(1) == {"ids": [7]}
    with pytest.raises(PayloadTooLargeError, match="256-byte slot"):
        ch.send({"fed": list(range(1000))})
    ch.close()
    for s in shards:
        s.close()
    assert our_segments() == []


def test_segments_carry_the_prefix_the_environment_names(monkeypatch):
    """HOGWILD_SHM_PREFIX names a process's segments (engines sharing a host tell theirs apart);
    a prefix that is no file name is refused with the fix, before any segment exists."""
    monkeypatch.setenv("HOGWILD_SHM_PREFIX", "hogwild-blue.team_1-")
    ch = ShmChannel.create(1, capacity=256)
    try:
        assert ch.spec.name.startswith("hogwild-blue.team_1-") and ch.spec.name in os.listdir("/dev/shm")
    finally:
        ch.close()
    for bad in ("../etc/x", "", "a b", "x" * 65):
        monkeypatch.setenv("HOGWILD_SHM_PREFIX", bad)
        with pytest.raises(HogwildError, match="HOGWILD_SHM_PREFIX=.*letters, digits"):
            ShmChannel.create(1, capacity=256)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("hogwild-blue")]  # closed, none half made


def run_steps(group: ShardGroup, steps: int) -> float:
    """Mean seconds per step round trip; checks rank 0's reply is computed from each message."""
    for i in range(10):  # warm-up
        group.step({"step": -1, "fed": {0: [i]}})
    start = time.perf_counter()
    for i in range(steps):
        fed = {0: [i, 1], 1: [2 * i], 2: [5]}
        assert group.step({"step": i, "fed": fed}) == {"step": i, "sum": 3 * i + 6}
    return (time.perf_counter() - start) / steps


@pytest.mark.parametrize("kind, bound_ms", [("shm", 5.0), ("socket", 20.0)])
def test_shards_exchange_steps(kind, bound_ms):
    with ShardGroup(EchoShard, 3, channel=kind, step_timeout=10) as group:
        assert type(group.channel) is (ShmChannel if kind == "shm" else SocketChannel)
        mean = run_steps(group, 200)
        group.check()  # all alive
    print(f"\n{kind}: 3 shards, mean step round trip {mean * 1e3:.3f} ms")
    assert mean * 1e3 < bound_ms  # a sanity bound, not a target
    assert_clean()


# ----------------------------------------------------------------------------- failures

@pytest.mark.parametrize("kind", ["shm", "socket"])
def test_killed_shard_is_named_and_close_leaves_nothing(kind):
    group = ShardGroup(EchoShard, 3, channel=kind, step_timeout=10)
    try:
        run_steps(group, 20)
        ray.kill(group.actors[1])
        start = time.monotonic()
        with pytest.raises(ShardFailedError) as err:
            for i in range(1000):
                group.step({"step": i, "fed": {}})
        assert time.monotonic() - start < 10
        assert err.value.ranks == [1] and "rank 1" in str(err.value)
    finally:
        group.close()
    group.close()  # idempotent
    assert_clean()


def test_failing_loop_is_reported_with_its_exception():
    with ShardGroup(EchoShard, 2, kwargs={"fail_at": (1, 3)}, channel="shm", step_timeout=10) as group:
        with pytest.raises(ShardFailedError, match=r"rank 1 failed: its loop raised RuntimeError.*on purpose"):
            for i in range(10):
                group.step({"step": i, "fed": {}})
    assert_clean()


def test_hung_shard_times_out_naming_it():
    with ShardGroup(EchoShard, 3, kwargs={"hang_at": (2, 5)}, channel="shm", step_timeout=1.0) as group:
        for i in range(5):
            group.step({"step": i, "fed": {}})
        start = time.monotonic()
        with pytest.raises(ChannelTimeoutError) as err:
            group.step({"step": 5, "fed": {}})
        assert 1.0 <= time.monotonic() - start < 2.0
        assert err.value.ranks == [2] and "did not answer within 1 s" in str(err.value)
    assert_clean()
