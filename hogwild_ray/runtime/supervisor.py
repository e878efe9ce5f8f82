"""The lifecycle of one group of shard actors: start, feed, watch, close.

Each actor's `run_loop(spec, rank)` is called once and runs until the channel closes;
steps then cost no Ray calls at all. Those loop refs are the group's health signal:
a ref that resolves early means the actor died or its loop raised, and `check()` turns
that into an error naming the rank. A rank that stops answering (a stopped or wedged
process) leaves the others waiting on it in a collective, so all of them miss the step's
deadline; each actor therefore has a "health" thread that answers a cheap ping, and a step
that times out names only the ranks whose process does not answer it. `close()` leaves
nothing behind (actors, placement group, shared memory), however the group ended.
"""

from __future__ import annotations

import atexit
from typing import Any, Literal

import ray
from ray.actor import ActorClass, ActorHandle
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .channel import ShmChannel, SocketChannel, StepChannel
from .errors import ChannelTimeoutError, ShardFailedError
from .placement import release, reserve

HEALTH = {"health": 1}  # a concurrency group of its own: pings are answered while run_loop runs
PING_TIMEOUT_S = 2.0  # a live process answers a ping in milliseconds, whatever its loop is doing


def actor_where(actor: ActorHandle | str) -> str:
    """'actor <id>, pid <pid>' for error messages (the pid where the GCS table has it); `actor`: a
    handle or an actor id in hex."""
    actor_id = actor if isinstance(actor, str) else actor._actor_id.hex()
    try:
        pid = ray._private.state.actors(actor_id=actor_id).get("Pid")
    except Exception:  # a private table: the id alone still finds the log (ray logs actor --id)
        pid = None
    return f"actor {actor_id}" + (f", pid {pid}" if pid else "")


def unresponsive(actors: dict[int, ActorHandle], timeout: float = PING_TIMEOUT_S) -> list[int]:
    """The keys of `actors` whose process does not answer a ping on its health thread within `timeout`."""
    pings = {actor.__ray_ready__.options(concurrency_group="health").remote(): key for key, actor in actors.items()}
    done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout)
    answered = set()
    for ref in done:
        try:
            ray.get(ref, timeout=0)
            answered.add(pings[ref])
        except Exception:  # died meanwhile: it does not answer either
            pass
    return sorted(set(actors) - answered)


class ShardGroup:
    """`shards` actors of `actor_cls`, one per placement-group bundle, fed through one step channel.

    `actor_cls` is a class (or `ray.remote` class) with `run_loop(spec, rank)`;
    `channel` is "shm" (shards on this node), "socket", or "auto" (shm when they are).
    `placement`: a ready placement group with one bundle per shard (bundle i holds rank i),
    owned by the caller; None reserves one here, with `resources` added to each bundle
    (and close() removes it). `channel_kind` says which channel "auto" picked.
    """

    def __init__(self, actor_cls: type | ActorClass, shards: int, *, args: tuple = (), kwargs: dict | None = None,
                 use_gpu: bool = False, channel: Literal["auto", "shm", "socket"] = "auto",
                 reserve_timeout: float = 60.0, start_timeout: float = 120.0, step_timeout: float = 30.0,
                 capacity: int = 4 << 20, placement: PlacementGroup | None = None,
                 resources: dict[str, float] | None = None) -> None:
        self.shards, self.step_timeout = shards, step_timeout
        self.actors: list[ActorHandle] = []
        self.loops: dict[ray.ObjectRef, int] = {}  # loop ref -> rank
        self.channel: StepChannel | None = None
        self.gathered = 0  # steps every rank answered: the progress a coordinator's heartbeat reports
        self._closed = False
        self._owns_pg = placement is None
        self._pingable = not isinstance(actor_cls, ActorClass)  # a caller's remote class has no health thread
        self.pg = reserve(shards, use_gpu, reserve_timeout, resources=resources) if placement is None else placement
        atexit.register(self.close)
        try:
            self.channel = self._make_channel(channel, capacity)
            remote = ray.remote(concurrency_groups=HEALTH)(actor_cls) if self._pingable else actor_cls
            for rank in range(shards):
                actor = remote.options(
                    num_cpus=1, num_gpus=1 if use_gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank),
                ).remote(*args, **(kwargs or {}))
                self.actors.append(actor)
                self.loops[actor.run_loop.remote(self.channel.spec, rank)] = rank
            self.channel.open(start_timeout, watch=self.check)
        except BaseException:
            self.close()
            raise

    def shard_nodes(self) -> list[str]:
        """The node id of each rank's bundle, rank order."""
        table = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        return [table[rank] for rank in range(self.shards)]

    def _make_channel(self, kind: str, capacity: int) -> StepChannel:
        # Shared memory only when every shard shares this process's node (raylet), e.g. the
        # coordinator in rank 0's bundle; a coordinator placed elsewhere talks over TCP.
        if kind == "auto":
            kind = "shm" if set(self.shard_nodes()) == {ray.get_runtime_context().get_node_id()} else "socket"
        self.channel_kind = kind
        if kind == "shm":
            return ShmChannel.create(self.shards, capacity=capacity)
        return SocketChannel.create(self.shards, host=ray.util.get_node_ip_address(), capacity=capacity)

    def step(self, msg: Any, timeout: float | None = None) -> Any:
        """Send one step's message to every shard; rank 0's reply."""
        self.send(msg)
        return self.gather(timeout)

    def send(self, msg: Any) -> None:
        self._open_channel().send(msg)

    def gather(self, timeout: float | None = None) -> Any:
        timeout = self.step_timeout if timeout is None else timeout
        try:
            out = self._open_channel().gather(timeout, watch=self.check)
        except ChannelTimeoutError as e:
            narrowed = self._hung(e, timeout)
            if narrowed is e:
                raise
            raise narrowed from e
        self.gathered += 1
        return out

    def _hung(self, err: ChannelTimeoutError, timeout: float) -> ChannelTimeoutError:
        """The silent ranks narrowed to those whose process does not answer a ping (the others
        are alive, waiting on them in a collective); `err` itself when that tells nothing more."""
        silent = [r for r in err.ranks if 0 <= r < len(self.actors)]
        if not self._pingable or not silent:
            return err
        dead = unresponsive({r: self.actors[r] for r in silent})
        if not dead:  # every silent rank is alive: slow or stuck in its step, not stopped
            return err
        waiting = sorted(set(silent) - set(dead))
        where = "; ".join(f"rank {r}: {actor_where(self.actors[r])}" for r in dead)
        others = f"; rank(s) {waiting} are alive and wait on it" if waiting else ""
        return ChannelTimeoutError(
            f"shard rank(s) {dead} did not answer within {timeout:g} s and do not answer a ping either: the "
            f"process is stopped or wedged ({where}){others}. Find why in its log (ray logs actor --id ...), "
            "then open a new engine", dead)

    def _open_channel(self) -> StepChannel:
        if self._closed or self.channel is None:
            raise RuntimeError("the shard group is closed")
        return self.channel

    def check(self) -> None:
        """Raise ShardFailedError if any shard's actor died or its loop ended (one non-blocking ray.wait)."""
        done, _ = ray.wait(list(self.loops), num_returns=len(self.loops), timeout=0)
        if not done:
            return
        ref = min(done, key=self.loops.__getitem__)
        rank = self.loops[ref]
        try:
            ray.get(ref, timeout=0)
            why = "its loop returned before the channel closed"
        except RayActorError as e:
            why = f"its actor died ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        except RayTaskError as e:
            why = f"its loop raised {type(e.cause).__name__}: {e.cause}"
        ranks = sorted(self.loops[r] for r in done)
        more = f" (failed ranks: {ranks})" if len(ranks) > 1 else ""
        raise ShardFailedError(f"shard rank {rank} failed: {why}{more}", ranks)

    def close(self, grace_s: float = 1.0) -> None:
        """Stop the loops, kill the actors, free the placement group and the channel; idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            if self.channel is not None:
                self.channel.close()  # sets the closed flag / sends the close frame; unlinks shared memory
            if self.loops and ray.is_initialized():
                ray.wait(list(self.loops), num_returns=len(self.loops), timeout=grace_s)
        finally:
            if ray.is_initialized():
                for actor in self.actors:
                    ray.kill(actor)
                if self._owns_pg:
                    release(self.pg)

    def __enter__(self) -> ShardGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
