"""RayHogwildEngine: the driver's client of one coordinator actor and its shards.

Use `HogwildEngine.from_pretrained(path, ..., backend="ray", tp=N)`. The driver reserves the
placement group and starts the coordinator in its bundle 0 (see coordinator.py); the
coordinator reads the model, starts the shards and runs the sessions. This object keeps the
local engine's API: `start` gives a RemoteSession, `solve` runs a whole session in the
coordinator in one call. The driver owns the placement group and the coordinator, so
`close()` (also on a failure, at `with` exit and at interpreter exit) always frees both;
the shards die with either.

Hangs: no driver wait is unbounded, yet a long healthy call (a whole `solve`, a batch) is
never cut. While a call runs, the driver asks the coordinator's "health" thread for a
heartbeat every `heartbeat_s` (its count of shard steps answered). The coordinator bounds
each shard step itself (`step_timeout_s`) and names a silent rank, so a healthy one either
moves its count or fails within that; a call whose count stands still for `hang_timeout_s`
(default step_timeout_s + CALL_GRACE_S), with or without heartbeat answers, is a hung
coordinator: the engine kills it, removes the placement group and raises
CoordinatorFailedError naming it. Both are attributes, set them on the engine.

Sessions dropped without close() give their pages back: a RemoteSession's finalizer sends
the coordinator a close (one fire-and-forget call, never awaited).

Placement across nodes: `shard_resources` (custom resources added to every shard's bundle)
pins the shards to the nodes that advertise them; `coordinator_resources` schedules the
coordinator by its own resources instead of into rank 0's bundle (e.g. on the head node),
and the step channel is then the socket one whenever the two land on different nodes.
"""

from __future__ import annotations

import atexit
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from ..config import EngineConfig
from ..front import EngineFront
from ..core.events import Event
from ..model.loader import quick_spec
from ..model.parallel import shard_plan
from ..ray_address import check_reachable
from ..core.results import SolveResult
from .coordinator import Coordinator
from .errors import ChannelTimeoutError, ClusterResourceError, CoordinatorFailedError, ShardFailedError
from .placement import cluster_summary, release, reserve
from .ray_init import init_ray
from .remote_session import RemoteSession

CALL_GRACE_S = 10.0  # beyond the coordinator's own step timeout, before a call without progress counts as a hang
HEARTBEAT_S = 1.0  # how often the driver asks a running call's coordinator for its progress
SHUTDOWN_GRACE_S = 5.0  # for a clean stop of the shards (channel closed, shared memory unlinked)
ADVANCE_S = 0.2  # how long one coordinator call of a stream_many run goes on before handing over its events
FATAL = (ShardFailedError, ChannelTimeoutError)  # the shard group is gone: nothing of the engine is reusable


@dataclass
class PoolPages:
    """The K/V pool's page counts, as the coordinator's allocator has them now."""

    free_pages: int
    num_pages: int
    page_size: int


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


class RayHogwildEngine(EngineFront):
    """Runs Hogwild! sessions on `tp` shard actors of one model (one placement group, one node)."""

    def __init__(self, coordinator: Any, pg: Any, info: Any, device: torch.device, tp: int, page_size: int,
                 step_timeout_s: float, startup: dict[str, float]) -> None:
        # No model, tokenizer or pool in this process: the coordinator and the shards hold them.
        self.coordinator, self.pg = coordinator, pg
        self.spec, self.label, self.max_context, self.eos_ids = info.spec, info.label, info.max_context, info.eos_ids
        self.device, self.tp, self.page_size, self.step_timeout_s = device, tp, page_size, step_timeout_s
        self.startup = startup  # seconds: ray_start, placement, coordinator_start, read_model, shard_start, weights
        self.placement = info.placement  # coordinator_node, shard_nodes (node ids), channel ("shm" or "socket")
        self._tokenizer = None
        self.hang_timeout_s = step_timeout_s + CALL_GRACE_S  # a call without progress this long is a hang
        self.heartbeat_s = HEARTBEAT_S
        self._calling = False  # a coordinator call is being awaited: abandoned sessions' closes wait for its end
        self._abandoned: list[int] = []
        atexit.register(self.close)

    @classmethod
    def create(cls, config: EngineConfig, load_timeout_s: float = 600.0) -> RayHogwildEngine:
        """Reserve the shards' placement group, start the coordinator in it and let it load the model."""
        import ray

        if config.tp > 1:  # the model's config says whether it splits, before Ray or any actor starts
            shard_plan(quick_spec(config.model), 0, config.tp)
        check_reachable(config.ray_address)

        t0 = time.perf_counter()
        if not ray.is_initialized():
            init_ray(config.ray_address, log_to_driver=False)
        t1 = time.perf_counter()
        pg = reserve(config.tp, config.torch_device.type == "cuda", config.placement_timeout_s,
                     resources=config.shard_resources)
        t2 = time.perf_counter()
        coordinator = None
        try:
            coordinator = start_coordinator(pg, config.coordinator_resources, config.placement_timeout_s,
                                            load_timeout_s)
            t3 = time.perf_counter()
            info = ray.get(coordinator.load.remote(config, pg), timeout=load_timeout_s)
        except BaseException as e:
            if coordinator is not None:
                ray.kill(coordinator)
            release(pg)
            raise _unwrap(e, "load", load_timeout_s) from e
        startup = {"ray_start_s": t1 - t0, "placement_s": t2 - t1, "coordinator_start_s": t3 - t2, **info.timings}
        return cls(coordinator, pg, info, config.torch_device, config.tp, config.page_size, config.step_timeout_s,
                   startup)

    # ---- calls to the coordinator ------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> Any:
        """One coordinator call, awaited under the heartbeat watch (see the module docstring);
        errors arrive as themselves, and a fatal one closes the engine."""
        if self.coordinator is None:
            raise CoordinatorFailedError("this engine is closed (close() was called, or its coordinator or a shard "
                                         "failed); open a new engine with HogwildEngine.from_pretrained")
        calling, self._calling = self._calling, True
        try:
            return self._await(getattr(self.coordinator, method).remote(*args), method)
        except BaseException as e:
            err = _unwrap(e, method, self.hang_timeout_s)
            if isinstance(err, (*FATAL, CoordinatorFailedError)):
                self._release(grace_s=0.0)
            if err is e:
                raise
            raise err from e
        finally:
            self._calling = calling
            if not calling:
                self._close_abandoned()

    def _await(self, ref: Any, method: str) -> Any:
        """ray.get of a coordinator call's ref, bounded by progress: CoordinatorFailedError once the
        coordinator's heartbeat count stood still (or went unanswered) for hang_timeout_s."""
        import ray
        from ray.exceptions import GetTimeoutError

        hang = max(float(self.hang_timeout_s), 1e-3)
        every = min(max(float(self.heartbeat_s), 1e-3), hang)
        start = last_move = time.monotonic()
        beat, beat_sent, count = None, start, None
        while True:
            try:
                return ray.get(ref, timeout=every)  # a short call costs this one wait, no heartbeat
            except GetTimeoutError:
                pass
            now = time.monotonic()
            if beat is not None and ray.wait([beat], timeout=0)[0]:
                try:
                    seen = ray.get(beat, timeout=0)
                except Exception:  # the actor died: the call's own ref says how, next round
                    seen = count
                if count is not None and seen != count:
                    last_move = now
                count, beat = seen, None
            if now - last_move > hang:
                silent = now - beat_sent if beat is not None else 0.0
                raise self._hung(method, hang, silent)
            if beat is None:
                beat, beat_sent = self.coordinator.heartbeat.options(concurrency_group="health").remote(), now

    def _hung(self, method: str, hang: float, silent: float) -> CoordinatorFailedError:
        """The error for a coordinator call that made no progress for `hang` seconds (fatal: `_call`
        then lets go of the coordinator, its shards and the placement group)."""
        from .supervisor import actor_where

        where = actor_where(self.coordinator)
        if silent > 0:
            what = f"did not answer a heartbeat for {silent:.0f} s (its process is stopped or wedged)"
        else:
            what = f"answered heartbeats but finished no shard step for {hang:g} s (the call is stuck inside it)"
        return CoordinatorFailedError(
            f"the coordinator ({where}) {what} during {method}(); the engine killed it and released its shards and "
            "placement group: find why in its log (ray logs actor --id ...) and open a new engine (raise "
            "engine.hang_timeout_s if it is only overloaded)")

    # ---- sessions dropped without close() -----------------------------------------------------
    def _abandon(self, sid: int) -> None:
        """A RemoteSession was collected open: have the coordinator close it (fire and forget; while a
        call is awaited, after it, so the finalizer never re-enters Ray mid-call)."""
        if self.coordinator is None:
            return
        self._abandoned.append(sid)
        if not self._calling:
            self._close_abandoned()

    def _close_abandoned(self) -> None:
        while self._abandoned:
            sid = self._abandoned.pop()
            if self.coordinator is None:
                continue
            try:
                self.coordinator.close_session.remote(sid)  # not awaited: a finalizer must not block
            except Exception:  # Ray is going away: the coordinator and its pages go with it
                pass

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (a copy of the coordinator's, fetched once)."""
        if self._tokenizer is None:
            self._tokenizer = self._call("tokenizer")
        return self._tokenizer

    @property
    def allocator(self) -> PoolPages:
        free, total = self._call("pages")
        return PoolPages(free, total, self.page_size)

    def shard_actors(self) -> list[Any]:
        """The shard actors' handles, rank order (for inspection and fault tests)."""
        return self._call("shards")

    def stall_rank(self, rank: int, seconds: float) -> None:
        """Fault injection for tests: shard `rank` sleeps `seconds` instead of running its next pass."""
        self._call("stall", rank, seconds)

    def time_collectives(self, on: bool = True) -> None:
        """Time the shards' collectives (all-reduce, all-gather) from now on, or stop. Off by
        default: timing adds CUDA events around each collective (read without waiting for the GPU
        until collective_time asks)."""
        self._call("time_collectives", on)

    def collective_time(self) -> tuple[float, int]:
        """(seconds rank 0 spent in collectives, passes run) while timed since the last call; reset
        on read. Divide the one by the other for the collective time per step (0.0 at tp=1)."""
        return self._call("collective_time")

    def launch_ahead(self, on: bool | None = None) -> tuple[bool, int, int]:
        """Whether the shards launch each pass right behind the last one (fed its samples on the
        device), before the coordinator's sessions ask for it (set to `on` first unless None; on
        by default with CUDA; see LocalExecutor.run), and the passes launched ahead so far: (on,
        used, dropped). A pass launched ahead is used only if the sessions ask for exactly it."""
        return tuple(self._call("launch_ahead", on))

    # ---- sessions ----------------------------------------------------------------------------
    def start(self, problem: str, workers: int = 2, **options: Any) -> RemoteSession:
        """Open a session in the coordinator; the arguments of HogwildEngine.start. One session at a
        time: starting another closes the previous one (and a stream_many run); use stream_many or
        solve_many to run many sessions in shared passes."""
        sid, prompt_ids, state = self._call("start", problem, workers, options)
        return RemoteSession(self, sid, prompt_ids, state)

    def stream(self, problem: str, workers: int = 2, **options: Any) -> Iterator[Event]:
        """The events of a session (see HogwildEngine.stream): one actor call per step, the events
        derived here from the session proxy's mirror of the coordinator's session."""
        return super().stream(problem, workers, **options)

    def solve(self, problem: str, workers: int = 2, *, on_step: Callable | None = None,
              **options: Any) -> SolveResult:
        """Run a session to its end. Without on_step nobody watches the steps, so the whole loop runs
        in the coordinator in one call (it consumes the same stream there); with on_step, `stream`
        steps the proxy from here."""
        if on_step is not None:
            return super().solve(problem, workers, on_step=on_step, **options)
        return self._call("solve", problem, workers, options)

    def _stream_many(self, items: list[tuple[str | int, str]], workers: int, max_concurrent: int | None,
                     options: dict[str, Any]) -> Iterator[tuple[str | int, Event]]:
        """The coordinator's scheduler runs the problems in shared passes on the shards; this
        fetches their events about every ADVANCE_S seconds (one actor call each). Ends what the
        coordinator ran before (one session or one run at a time)."""
        self._call("start_many", items, workers, max_concurrent, options)
        done = False
        try:
            while not done:
                events, done = self._call("advance_many", ADVANCE_S)
                yield from events
        finally:
            if not done and self.coordinator is not None:
                self._call("close_many")

    def serving_loop(self, max_concurrent: int | None = None) -> Any:
        """A serving loop (hogwild_ray.serving_loop's interface) run by the coordinator beside the
        shards: requests come and go while passes run (hogwild_ray.serve's engine replicas)."""
        from .remote_serving import RemoteServingLoop

        return RemoteServingLoop(self, max_concurrent)

    def metrics(self) -> dict[str, Any]:
        """The coordinator's engine metrics (see HogwildEngine.metrics)."""
        return self._call("metrics")

    # ---- the end -----------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the shards, then kill the coordinator and remove the placement group; idempotent."""
        self._release(grace_s=SHUTDOWN_GRACE_S)

    def _release(self, grace_s: float) -> None:
        import ray

        coordinator, pg = self.coordinator, self.pg
        self.coordinator = self.pg = None
        if coordinator is None and pg is None:
            return
        atexit.unregister(self.close)
        if not ray.is_initialized():
            return
        try:
            if coordinator is not None and grace_s > 0:
                ray.get(coordinator.shutdown.remote(), timeout=grace_s)
        except Exception:  # dead or stuck: the kill below and the group's removal stop everything
            pass
        finally:
            if coordinator is not None:
                ray.kill(coordinator)
            if pg is not None:
                release(pg)


def start_coordinator(pg: Any, resources: dict[str, float] | None, placement_timeout_s: float,
                      load_timeout_s: float) -> Any:
    """A ready coordinator actor: in rank 0's bundle (num_cpus=0), or, with `resources`, wherever
    those custom resources are (ClusterResourceError if no node offers them within the wait)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .supervisor import HEALTH  # a thread for heartbeats beside the one that runs the calls

    if resources is None:
        options = dict(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0))
    else:
        options = dict(resources=resources)
    coordinator = ray.remote(concurrency_groups=HEALTH)(Coordinator).options(num_cpus=0, **options).remote()
    ready = coordinator.ready.remote()
    if resources is not None and not ray.wait([ready], timeout=placement_timeout_s)[0]:
        ray.kill(coordinator)
        raise ClusterResourceError(
            f"could not place the coordinator with coordinator_resources={resources} within "
            f"{placement_timeout_s:g} s; " + cluster_summary(list(resources))
            + ". Fix: start a node with those resources (ray start --resources=...), "
            "or leave coordinator_resources out to run it beside shard rank 0")
    ray.get(ready, timeout=load_timeout_s)
    return coordinator


def _unwrap(e: BaseException, method: str, timeout: float | None = None) -> BaseException:
    """The error to raise for a failed coordinator call: the remote exception itself, or one naming the coordinator."""
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    if isinstance(e, RayTaskError) and isinstance(e.cause, BaseException):
        return e.cause
    if isinstance(e, RayActorError):
        from .supervisor import actor_where

        where = f" ({actor_where(e.actor_id)})" if getattr(e, "actor_id", None) else ""
        return CoordinatorFailedError(
            f"the coordinator actor{where} died during {method}() ({_first_line(e)}); the engine released its shards "
            "and placement group: find why in its log (ray logs actor --id ...) and open a new engine")
    if isinstance(e, GetTimeoutError):
        return CoordinatorFailedError(
            f"the coordinator did not answer {method}() within {timeout or 0:g} s (it is hung or overloaded); the "
            "engine released its shards and placement group: open a new engine")
    return e
