"""An engine replica of the server: one engine, its serving loop, and one method that streams
a session's progress as plain dicts.

Ray Serve places, health-checks, scales and shuts down these replicas; the HTTP front
(hogwild_ray.serve.front) calls `generate` through a deployment handle, one call per session,
and cancels the call when its client goes away, which ends the session before the next pass.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any, AsyncIterator

from ..core.events import Done, StepFinished, WorkerText
from ..errors import CacheFullError, ContextLengthError, HogwildError, InvalidRequestError
from ..scheduler import Failed, Finished
from ..serving_loop import Admitted

CLIENT_ERRORS = (InvalidRequestError, ContextLengthError, CacheFullError)  # the request's fault: HTTP 400
logger = logging.getLogger("ray.serve")
REPORT_EVERY_S = 0.5  # how fresh the front's view of this engine's counters is (pages freed, passes)
HEARTBEAT_S = 5.0  # reported at least this often, changed or not (the front drops a replica silent for 30 s)


class EngineReplica:
    """One engine of the server (wrapped by serve.deployment in hogwild_ray.serve.app)."""

    def __init__(self, engine_options: dict, max_concurrent: int | None = None, front: str | None = None,
                 lease: Any = None, graph_warmup: tuple[int, int] = (2, 0)) -> None:
        """graph_warmup: (workers, sessions): capture the decode graphs of batches of up to that
        many sessions of that many workers before serving (hogwild_ray.graph_warmup; 0: none)."""
        import torch

        from .. import HogwildEngine
        from ..graph_warmup import warm_up_graphs

        options = dict(engine_options)
        if options.get("device") is None:  # the replica's own device: the GPU Ray gave it, if any
            options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = HogwildEngine.from_pretrained(**options)
        workers, sessions = graph_warmup
        if max_concurrent is not None:
            sessions = min(sessions, max_concurrent)
        self.warmup = warm_up_graphs(self.engine, workers, sessions)  # before the serving loop drives the engine
        if self.warmup.captures:
            logger.info("captured %d decode graphs for batches of %s sessions in %.1f s", self.warmup.captures,
                        ",".join(map(str, self.warmup.sessions)), self.warmup.seconds)
        self.loop = self.engine.serving_loop(max_concurrent)  # in this process, or in the Ray coordinator
        self.replica = _replica_id()
        self.node = _node_id()
        self._stop = threading.Event()
        if lease is not None:  # a batch's replicas end with the driver that started them (hogwild_ray.serve.pool)
            threading.Thread(target=watch_lease, args=(lease, self._stop), name="hogwild-lease", daemon=True).start()
        if front is not None:  # the front's /metrics sees this engine's counters within REPORT_EVERY_S
            threading.Thread(target=self._report, args=(front,), name="hogwild-metrics-report", daemon=True).start()

    def _report(self, front: str) -> None:
        from ray import serve

        handle = serve.get_deployment_handle(front, serve.get_replica_context().app_name)
        last, sent = None, 0.0
        while not self._stop.wait(REPORT_EVERY_S):
            now = self.metrics()
            # changed, or HEARTBEAT_S since the last: the front counts a replica silent for longer as gone
            if now != last or time.monotonic() - sent >= HEARTBEAT_S:
                try:
                    handle.report.remote(now)
                    last, sent = now, time.monotonic()
                except Exception:  # the front is restarting: the next round tries again
                    pass

    async def generate(self, problem: str, workers: int, options: dict) -> AsyncIterator[dict]:
        """One session, streamed: {"type": "queued", prompt_tokens, replica} first (or "error"),
        then "admitted", "text" (worker, text), "step" (worker), "done" (the Done event), and
        "end" with the engine's counters; "error" (status, message) if it fails."""
        events: asyncio.Queue = asyncio.Queue()
        aio = asyncio.get_running_loop()
        key = uuid.uuid4().hex
        try:
            size = await asyncio.to_thread(self.loop.size, problem, workers, options)
        except HogwildError as e:
            yield _error(e)
            return
        ended = False
        try:
            try:  # (a queue's put, not awaited: a cancel in `finally` can never be queued ahead of it)
                self.loop.submit(key, problem, workers, options, size.pages,
                                 lambda item: aio.call_soon_threadsafe(events.put_nowait, item))
            except HogwildError as e:
                ended = True
                yield _error(e)
                return
            yield {"type": "queued", "prompt_tokens": size.prompt_tokens, "replica": self.replica}
            while True:
                item = await events.get()
                if isinstance(item, Admitted):
                    yield {"type": "admitted", "metrics": self.metrics()}
                elif isinstance(item, WorkerText):
                    yield {"type": "text", "worker": item.worker, "text": item.text}
                elif isinstance(item, StepFinished):
                    yield {"type": "step", "worker": item.worker}
                elif isinstance(item, Done):
                    yield {"type": "done", "event": item.to_json()}
                elif isinstance(item, Finished):
                    ended = True
                    yield {"type": "end", "metrics": self.metrics()}
                    return
                elif isinstance(item, Failed):
                    ended = True
                    yield _error(item.error)
                    return
        finally:
            if not ended:  # cancelled (the client went away) or closed early: end the session now
                self.loop.cancel(key)

    async def solve(self, problem: str, workers: int, options: dict) -> dict:
        """One session to its end, unstreamed (a batch's problem): {"type": "done", "event": the Done
        event, "replica", "node"}, or {"type": "error", ...} for one that cannot run."""
        last: dict = {"type": "error", "status": 500, "message": "the session ended without a result",
                      "error": "HogwildError"}
        async for message in self.generate(problem, workers, options):
            if message["type"] in ("done", "error"):
                last = message
        return {**last, "replica": self.replica, "node": self.node}

    async def evaluate(self, problem: dict, spec: dict, budgets: list[int], sampling: dict, options: dict) -> dict:
        """One evaluation run (hogwild_ray.eval.runner) in this engine's shared passes: {"records":
        one per budget, "replica", "node"}; a run that cannot run gets error records."""
        from ..core.sampling_params import SamplingParams
        from ..eval.runner import RunSpec, error_records, run_request

        run = RunSpec(**spec)
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        aio = asyncio.get_running_loop()
        key = uuid.uuid4().hex

        def sink(item: Any) -> None:
            if isinstance(item, (Finished, Failed)):
                aio.call_soon_threadsafe(lambda: done.done() or done.set_result(item))

        ended = False
        try:
            try:
                pages, job = await asyncio.to_thread(run_request, self.engine, problem, run, budgets,
                                                     SamplingParams(**sampling), options)
                self.loop.submit_job(key, job, pages, sink)  # queued at once: see generate
                item = await done
            except (ContextLengthError, CacheFullError) as e:
                item = Failed(e)
            ended = True
            if isinstance(item, Failed):
                if not isinstance(item.error, (ContextLengthError, CacheFullError)):
                    raise item.error
                records = error_records(problem, run, budgets, item.error)
            else:
                records = item.value
            return {"records": records, "replica": self.replica, "node": self.node}
        finally:
            if not ended:  # the driver went away: the run's sessions end now
                self.loop.cancel(key)

    async def capacity(self, problems: list[str], workers: int, options: dict, forced_tokens: int = 0) -> int:
        """How many sessions like the longest of `problems` that fits fit in the cache at once (at least 1)."""
        fit = {k: v for k, v in options.items() if k not in ("sampling", "max_steps")}
        for problem in sorted(problems, key=len, reverse=True):
            try:
                pages = await asyncio.to_thread(self.engine.request_pages, problem, workers,
                                                forced_tokens=forced_tokens, **fit)
            except (ContextLengthError, CacheFullError):
                continue
            return max(1, self.engine.allocator.num_pages // max(pages, 1))
        return 1

    def metrics(self) -> dict:
        return {"replica": self.replica, **self.engine.metrics()}

    async def ping(self) -> dict:
        """The /health probe and the front's first look at this replica."""
        self.check_health()
        return self.metrics()

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose loop stopped is replaced."""
        if not self.loop.alive:
            raise RuntimeError(f"the serving loop stopped: {self.loop.error!r}")

    def __del__(self) -> None:  # Ray Serve's graceful shutdown
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _error(e: BaseException) -> dict:
    status = 400 if isinstance(e, CLIENT_ERRORS) else 500
    return {"type": "error", "status": status, "message": str(e).splitlines()[0] if str(e) else type(e).__name__,
            "error": type(e).__name__}


LEASE_EVERY_S = 2.0


def watch_lease(lease: Any, stop: threading.Event) -> None:
    """Ping the driver's lease actor; when it is gone (the driver exited or was killed), delete
    this replica's application, so that no replica outlives its batch."""
    import ray
    from ray import serve

    while not stop.wait(LEASE_EVERY_S):
        try:
            ray.get(lease.ping.remote(), timeout=30)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            continue  # slow or briefly unreachable: the lease only ends when its actor is dead
        except ray.exceptions.RayError:
            serve.delete(serve.get_replica_context().app_name, _blocking=False)
            return


def _node_id() -> str:
    try:
        import ray

        if not ray.is_initialized():  # (asking a runtime context would start a local Ray)
            return "local"
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        return "local"


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests of the class itself)
        return uuid.uuid4().hex[:8]
