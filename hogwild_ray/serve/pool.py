"""Engine replicas for a run of many problems: Ray Serve deploys them across the cluster, and
`run` keeps every one of them busy until each problem has finished exactly once.

Ray Serve does the distributed part: it places the replicas (a GPU each, or a tensor-parallel
group each), routes each call to the least-loaded replica, notices a replica that died (its
process killed, its node gone) and starts a new one where there is room. The pool adds what a
batch needs on top: a window of calls in flight large enough for every replica's scheduler to
fill its shared passes (hogwild_ray.core.dispatch; no fixed split), a problem lost with its
replica sent again to whichever replica is alive, a clear error when no replica can run at all,
and no replica outliving its driver: the replicas watch a lease actor that this process owns,
and delete their application when it is gone (the driver exited or was killed).

No HTTP: the application has no route and Serve starts no proxy for it (an existing Serve with
one is joined, its applications left alone).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

from ..core.dispatch import Dispatch
from ..core.replica_plan import plan_replicas
from ..errors import HogwildError
from .app import ServeSettings, serve_running

DEPLOYMENT = "HogwildEngine"
CHECK_EVERY_S = 2.0  # how often the pool looks at its replicas while nothing finishes


class NoReplicaError(HogwildError):
    """No engine replica is running, and none came back in time."""


class ReplicaFailedError(HogwildError, RuntimeError):
    """A call failed on its replica (not lost with it): one line naming the replica's error."""


@dataclass(frozen=True)
class Lost:
    """A call's replica died before it answered; the call runs again elsewhere."""

    why: str


def _lease_class():
    import ray

    @ray.remote(num_cpus=0)
    class PoolLease:
        """Owned by the driver and placed on its node: it dies with the driver (and with no other
        node), and the replicas that ping it then delete their application
        (hogwild_ray.serve.replica.watch_lease)."""

        def ping(self) -> bool:
            return True

    return PoolLease


class ReplicaPool:
    """`with ReplicaPool(settings) as pool: for key, value in pool.run(...)`; leaving the block
    deletes the replicas (and Serve and Ray, when the pool started them)."""

    def __init__(self, settings: ServeSettings, replicas: int | None, address: str | None = None,
                 no_replica_timeout_s: float = 180.0, max_attempts: int = 4, quiet: bool = False) -> None:
        self.settings, self.asked, self.address = settings, replicas, address
        self.no_replica_timeout_s, self.max_attempts, self.quiet = no_replica_timeout_s, max_attempts, quiet
        self.app = f"hogwild-batch-{uuid.uuid4().hex[:8]}"
        self.replicas = 0
        self.handle: Any = None
        self._own_ray = self._own_serve = self._deployed = False
        self._lease: Any = None
        self._serve_log = logging.getLogger("ray.serve")
        self._serve_level = self._serve_log.level

    # ---- setting up and tearing down ----------------------------------------------------
    def __enter__(self) -> ReplicaPool:
        import ray
        from ray import serve

        from ..ray_address import check_reachable
        from ..runtime.ray_init import init_ray

        self._serve_log.setLevel(logging.WARNING)  # Serve's own start and stop lines, on the run's stderr
        if not ray.is_initialized():
            check_reachable(self.address)
            init_ray(self.address, log_to_driver=False)
            self._own_ray = True
        try:
            resources = ray.cluster_resources()
            device = self.settings.device or ("cuda" if resources.get("GPU", 0) > 0 else "cpu")
            self.replicas = plan_replicas(self.asked, device, self.settings.tp, resources.get("GPU", 0),
                                          resources.get("CPU", 0), self.settings.cpus_per_replica)
            settings = ServeSettings(**{**self.settings.__dict__, "device": device, "replicas": self.replicas})
            self._own_serve = not serve_running()
            serve.start(proxy_location="Disabled")
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._lease = _lease_class().options(scheduling_strategy=here).remote()  # dies with this driver only
            if not self.quiet:
                print(f"starting {self.replicas} engine replica(s) on the Ray cluster ({device}"
                      f"{f', tp={settings.tp} each' if settings.tp > 1 else ''}) ...", file=sys.stderr, flush=True)
            from .replica import EngineReplica

            engine = serve.deployment(EngineReplica, name=DEPLOYMENT).options(
                num_replicas=self.replicas, ray_actor_options=settings.replica_actor_options(),
                max_ongoing_requests=1_000_000, health_check_period_s=10, health_check_timeout_s=60,
                graceful_shutdown_timeout_s=5, max_constructor_retry_count=self.replicas)  # one failed start each
            self._deployed = True
            # not serve.run: it waits for ever when no replica can be placed (CPUs or GPUs held by other actors)
            self.handle = serve._run(engine.bind(settings.engine_options(), settings.max_concurrent, None,
                                                 self._lease), name=self.app, route_prefix=None, _blocking=False)
            self._wait_running(settings.replica_actor_options())
        except BaseException:
            self.close()
            raise
        return self

    def _wait_running(self, asks: dict[str, Any]) -> None:
        """Wait until a replica runs (serve.run would wait for ever when none can be placed): NoReplicaError
        when the replicas fail to start, or when none runs within no_replica_timeout_s and Serve does not
        say that one is placed and initializing (a model that loads for minutes)."""
        from ray import serve

        deadline = time.monotonic() + self.no_replica_timeout_s
        while True:
            app = serve.status().applications.get(self.app)
            deployment = app.deployments.get(DEPLOYMENT) if app else None
            if app is not None and (app.status == "RUNNING" or deployment and deployment.replica_states.get("RUNNING")):
                return
            if app is not None and app.status in ("DEPLOY_FAILED", "UNHEALTHY"):  # Serve gave up on the constructor
                raise NoReplicaError(f"the engine replicas failed to start: {failure_line(self._deployment_message())}")
            if time.monotonic() >= deadline:
                if "to initialize" not in self._deployment_message():
                    raise NoReplicaError(self._no_room(asks))
                # placed, and still loading the model (Serve says so after 30 s): a slow start is no lack of room
                deadline = time.monotonic() + self.no_replica_timeout_s
            time.sleep(0.2)

    def _no_room(self, asks: dict[str, Any]) -> str:
        """Why no replica ran in time, in one line: what one replica asks against what the cluster has free."""
        import ray

        free = ray.available_resources()
        names = ("CPU", "GPU") if asks.get("num_gpus") else ("CPU",)
        want = " and ".join(f"{asks.get(f'num_{n.lower()}s', 0):g} {n}" for n in names)
        have = " and ".join(f"{free.get(n, 0):g} {n}" for n in names)
        return (f"no engine replica ran within {self.no_replica_timeout_s:g} s: a replica asks {want}, and the Ray "
                f"cluster has {have} free (other actors or jobs hold the rest); free them, add nodes, or ask fewer "
                "--replicas (`ray status` shows what holds them)")

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Delete the replicas, the lease, and Serve and Ray where this pool started them."""
        import ray
        from ray import serve

        try:
            if self._deployed:
                self._deployed = False
                serve.delete(self.app)
            if self._own_serve and not serve.status().applications:
                serve.shutdown()
            if self._lease is not None:
                ray.kill(self._lease)
                self._lease = None
        finally:
            self._serve_log.setLevel(self._serve_level)
            if self._own_ray:
                self._own_ray = False
                ray.shutdown()

    # ---- running calls ------------------------------------------------------------------
    def run(self, keys: list[Hashable], call: Callable[[Any, Hashable], Any], window: int) -> Iterator[tuple]:
        """(key, value) for every key as its call answers, and (key, Lost) for a call whose replica
        died (it is sent again). call(handle, key) makes one call (a DeploymentResponse); at most
        `window` are in flight. NoReplicaError when no replica has run for no_replica_timeout_s."""
        from ray.exceptions import RayTaskError

        dispatch: Dispatch = Dispatch(keys, window, self.max_attempts)
        loop = asyncio.new_event_loop()
        calls: dict[asyncio.Task, tuple[Hashable, Any]] = {}
        none_since: float | None = None
        try:
            while not dispatch.done:
                for key in dispatch.next_items():
                    response = call(self.handle, key)
                    calls[loop.create_task(_answer(response))] = (key, response)
                finished, _ = loop.run_until_complete(
                    asyncio.wait(list(calls), timeout=CHECK_EVERY_S, return_when=asyncio.FIRST_COMPLETED))
                for task in finished:
                    key, _ = calls.pop(task)
                    error = task.exception()
                    if error is not None and (isinstance(error, RayTaskError) or not _is_lost(error)):
                        raise replica_failure(key, error) from error
                    if error is not None:
                        why = f"lost with its replica ({type(error).__name__})"
                        dispatch.lose(key, why)
                        yield key, Lost(why)
                    elif dispatch.finish(key):
                        yield key, task.result()
                if not finished:
                    none_since = self._check_replicas(none_since)
        finally:
            for task, (_, response) in calls.items():
                task.cancel()
                try:
                    response.cancel()  # the replica ends the call's sessions
                except Exception:
                    pass
            if calls:
                loop.run_until_complete(asyncio.gather(*calls, return_exceptions=True))
            loop.close()

    def _deployment_message(self) -> str:
        """What Serve says about the deployment (a failed replica's traceback), or ''."""
        from ray import serve

        app = serve.status().applications.get(self.app)
        deployment = app.deployments.get(DEPLOYMENT) if app else None
        return (deployment.message if deployment else "") or (app.message if app else "")

    def _check_replicas(self, none_since: float | None) -> float | None:
        """When no replica has been running for no_replica_timeout_s, NoReplicaError; returns since when none has."""
        from ray import serve

        app = serve.status().applications.get(self.app)
        if app is None or app.status == "DELETING":
            raise NoReplicaError("the engine replicas' application was deleted (`serve delete`, `serve shutdown`, "
                                 "or its replicas lost this driver's lease); run the command again to resume")
        deployment = app.deployments.get(DEPLOYMENT)
        running = deployment.replica_states.get("RUNNING", 0) if deployment else 0
        if running:
            return None
        now = time.monotonic()
        if none_since is None:
            return now
        if now - none_since >= self.no_replica_timeout_s:
            message = (deployment.message if deployment else "") or app.message or "no reason given"
            raise NoReplicaError(f"no engine replica has run for {now - none_since:.0f} s ({message}); the cluster "
                                 "has no room for one (add nodes, or lower --tp), or every start fails (see the "
                                 "replicas' logs: `ray logs`)")
        return none_since

    def call_one(self, method: str, *args: Any) -> Any:
        """One call on any replica, waited for (e.g. asking how many sessions fit)."""
        return getattr(self.handle, method).remote(*args).result()


def cluster_resources(address: str) -> dict[str, float]:
    """What the Ray cluster at `address` holds (CPU, GPU, ...); a connection made for asking is closed."""
    import ray

    from ..ray_address import check_reachable
    from ..runtime.ray_init import init_ray

    if ray.is_initialized():
        return ray.cluster_resources()
    check_reachable(address)
    init_ray(address, log_to_driver=False)
    try:
        return ray.cluster_resources()
    finally:
        ray.shutdown()


def failure_line(text: str) -> str:
    """The line of a replica's traceback that says what went wrong ("InvalidRequestError: ...")."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        name, _, message = line.partition(": ")
        if message and name.rsplit(".", 1)[-1].endswith(("Error", "Exception")):
            return f"{name.rsplit('.', 1)[-1]}: {message}"
    return lines[-1] if lines else "no reason given (see the replicas' logs: `ray logs`)"


def replica_failure(key: Hashable, error: BaseException) -> ReplicaFailedError:
    """One line for a call that failed on its replica (a RayTaskError's text is the replica's whole traceback)."""
    line = failure_line(str(error))
    if not line.partition(": ")[0].endswith(("Error", "Exception")):
        line = f"{type(error).__name__}: {line}"
    return ReplicaFailedError(f"item {key!r} failed on a replica: {line}; see the replicas' logs (`ray logs`) "
                              "for the whole traceback")


async def _answer(response: Any) -> Any:
    return await response


def _is_lost(error: BaseException) -> bool:
    """Whether an error says the call's replica (or its node) died, rather than the call failing."""
    from ray import exceptions as rx

    lost = (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.ObjectLostError, rx.RaySystemError)
    return isinstance(error, lost)

