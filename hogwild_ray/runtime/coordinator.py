"""The coordinator actor: sessions (layout, tokenizer, protocol, stopping) beside rank 0.

It runs the engine's own `Session` unchanged on a `ShardedEngine`, so the logic that
decides what every worker feeds exists once. It creates the shard group and writes the
step channel itself: the per-step path (coordinator -> shards -> coordinator) makes no
Ray call, and the driver pays one actor call per user-visible step (or one per `solve`).

Placement: the driver reserves the placement group (so it can always remove it, whatever
happened to this actor) and schedules the coordinator into bundle 0 with num_cpus=0.
Bundle 0 is rank 0's, so the coordinator is on rank 0's node by construction and the
shared-memory channel always connects processes of one node, even when the driver runs
elsewhere (a remote driver, `ray job submit`). It asks for no CPU of its own, because
it works only between steps while the shards wait for it: tp=N still needs exactly N
devices (N CPUs in CI), and an extra bundle would make a cluster that fits the shards
refuse the group.

With `coordinator_resources` (see RayHogwildEngine.create) the driver schedules it by those
resources instead, outside the group: then it may sit on another node than the shards, and
the shard group's "auto" channel finds that out and uses the socket channel.

Heartbeats: the actor has a second thread (the "health" concurrency group) that answers
`heartbeat()` while a call runs on the first, so the driver can tell a long call that makes
progress from a stuck or stopped coordinator (see RayHogwildEngine).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..config import EngineConfig
from ..errors import InvalidRequestError
from ..core.results import SolveResult, Stats
from ..session import Session
from .sharded import ShardedEngine


@dataclass
class EngineInfo:
    """What the driver's engine shows about the model (no weights, no tokenizer)."""

    spec: Any
    label: str
    max_context: int
    eos_ids: frozenset[int]
    timings: dict[str, float]
    placement: dict[str, Any]  # see Coordinator.placement


@dataclass
class SessionState:
    """What changed in a session since the last report: enough to mirror it in the driver."""

    done: bool
    answer: str | None
    stats: Stats
    statuses: list[str]
    stream_tails: list[list[int]]  # each worker's stream tokens since the last report


class Coordinator:
    """One engine's sessions and shard group: one session the driver steps, or one run of many
    problems (stream_many, solve_many) that the engine's scheduler batches in shared passes;
    starting either ends what ran before."""

    def __init__(self) -> None:
        self.engine: ShardedEngine | None = None
        self.session: Session | None = None
        self.sid = 0
        self._reported: list[int] = []
        self.many: Any = None  # a run of many problems (stream_many), while one goes on
        self.serving: Any = None  # a ServingLoop, while this engine serves requests (hogwild_ray.serve)
        self._served: deque = deque()  # (key, item) the serving loop gave, until serve_poll takes them
        self._served_ready = threading.Condition()

    def ready(self) -> bool:
        return True

    def heartbeat(self) -> int:
        """Shard steps answered so far. The driver asks on the actor's "health" thread while a long
        call runs on the main one: a count that moves is a slow call, one that stands still a stuck
        one, and no answer a stopped or wedged process."""
        engine = self.engine
        group = engine.group if engine is not None else None
        return group.gathered if group is not None else -1

    def load(self, config: EngineConfig, placement: Any) -> EngineInfo:
        """Read the model, start the shards in `placement` (bundles 0..tp-1), load their weights."""
        self.engine = ShardedEngine.create(config, placement)
        e = self.engine
        return EngineInfo(e.spec, e.label, e.max_context, e.eos_ids, e.timings, self.placement())

    def placement(self) -> dict[str, Any]:
        """Where things run: this actor's node id, each rank's node id, the step channel ("shm" or "socket")."""
        import ray

        group = self._engine().group
        return {"coordinator_node": ray.get_runtime_context().get_node_id(),
                "shard_nodes": group.shard_nodes() if group is not None else [],
                "channel": group.channel_kind if group is not None else None}

    def tokenizer(self) -> Any:
        return self._engine().tokenizer

    def shards(self) -> list[Any]:
        """The shard actors' handles, rank order."""
        group = self._engine().group
        return list(group.actors) if group is not None else []

    def metrics(self) -> dict[str, Any]:
        return self._engine().metrics()

    def pages(self) -> tuple[int, int]:
        """(free pages, all pages) of the K/V pool."""
        a = self._engine().allocator
        return a.free_pages, a.num_pages

    # ---- sessions ----------------------------------------------------------------------------
    def start(self, problem: str, workers: int, kwargs: dict[str, Any]) -> tuple[int, list[int], SessionState]:
        """Open a session (closing the previous one); its id, prompt ids and first state."""
        self._close_session()
        self._close_many()
        self._close_serving()
        self.session = self._engine().start(problem, workers, **kwargs)
        self.sid += 1
        self._reported = [0] * workers
        return self.sid, list(self.session.prompt_ids), self._state()

    def step(self, sid: int, inject: dict[int, str] | None) -> tuple[dict[int, list[int]], SessionState]:
        new = self._session(sid).step(inject)
        return new, self._state()

    def run_steps(self, sid: int, steps: int) -> tuple[list[float], SessionState]:
        """Up to `steps` steps here (fewer if the session ends), in one call; each step's seconds."""
        s, times = self._session(sid), []
        while len(times) < steps and not s.done:
            t = time.perf_counter()
            s.step()
            times.append(time.perf_counter() - t)
        return times, self._state()

    def state(self, sid: int) -> SessionState:
        self._session(sid)
        return self._state()

    def views(self, sid: int) -> tuple[list[list[int]], dict[int, Any]]:
        """last_views and last_steps (pickled together, so blocks shared by steps stay shared)."""
        s = self._session(sid)
        return s.last_views, s.last_steps

    def logits(self, sid: int) -> Any:
        return self._session(sid).last_logits

    def stored_kv(self, sid: int) -> tuple[list[int], Any]:
        """The pages the last pass read and every KV head's K/V in them (see RayExecutor.read_kv)."""
        s = self._session(sid)
        pages = sorted({p for step in s.last_steps.values() for seg in step.segments for p in seg.block.pages})
        return pages, s.executor.read_kv(pages)

    def result(self, sid: int) -> SolveResult:
        return self._session(sid).result()

    def close_session(self, sid: int) -> SessionState | None:
        if sid != self.sid or self.session is None:
            return None
        self._close_session()
        return self._state()

    # ---- many problems in shared passes ------------------------------------------------------
    def start_many(self, items: list[tuple[str | int, str]], workers: int, max_concurrent: int | None,
                   options: dict[str, Any]) -> None:
        """Begin running many problems through the engine's scheduler (closing what ran before);
        `advance_many` moves them on and hands over their events."""
        self._close_session()
        self._close_many()
        self._close_serving()
        self.many = self._engine()._stream_many(items, workers, max_concurrent, options)

    def advance_many(self, seconds: float) -> tuple[list[tuple[str | int, Any]], bool]:
        """Run passes for about `seconds` (at least until one event); the (id, event) pairs they
        gave, and whether every problem has ended."""
        if self.many is None:
            raise InvalidRequestError("no run of many problems is going on; start one with stream_many")
        events: list[tuple[str | int, Any]] = []
        end = time.perf_counter() + seconds
        for pair in self.many:
            events.append(pair)
            if time.perf_counter() >= end:
                return events, False
        self.many = None
        return events, True

    def close_many(self) -> None:
        """Stop a run of many problems (its sessions give their pages back)."""
        self._close_many()

    def _close_many(self) -> None:
        many, self.many = self.many, None
        if many is not None:
            many.close()

    # ---- serving: requests that come and go (hogwild_ray.runtime.remote_serving) -----------------
    def serve_open(self, max_concurrent: int | None) -> None:
        """Start serving: a ServingLoop on this engine (ending what ran before); its events queue
        here until serve_poll takes them."""
        self._close_session()
        self._close_many()
        self._close_serving()
        self.serving = self._engine().serving_loop(max_concurrent)

    def serve_size(self, problem: str, workers: int, options: dict[str, Any]) -> tuple[int, int]:
        size = self._serving().size(problem, workers, options)
        return size.prompt_tokens, size.pages

    def serve_submit(self, key: str, problem: str, workers: int, options: dict[str, Any], pages: int) -> None:
        self._serving().submit(key, problem, workers, options, pages, lambda item: self._queue_served(key, item))

    def serve_cancel(self, key: str) -> None:
        self._serving().cancel(key)

    def serve_poll(self, wait_s: float) -> tuple[list[tuple[str, Any]], bool]:
        """The served requests' items since the last poll (waiting up to `wait_s` for one), and
        whether the loop still runs."""
        loop = self._serving()
        with self._served_ready:
            if not self._served:
                self._served_ready.wait(wait_s)
            items = list(self._served)
            self._served.clear()
        return items, loop.alive

    def serve_close(self) -> None:
        self._close_serving()

    def _queue_served(self, key: str, item: Any) -> None:
        with self._served_ready:
            self._served.append((key, item))
            self._served_ready.notify()

    def _serving(self) -> Any:
        if self.serving is None:
            raise InvalidRequestError("this engine is not serving; call serve_open first")
        return self.serving

    def _close_serving(self) -> None:
        serving, self.serving = self.serving, None
        if serving is not None:
            serving.close()

    def solve(self, problem: str, workers: int, kwargs: dict[str, Any]) -> SolveResult:
        """A whole session in this actor: one driver call, the steps through the channel only."""
        self._close_session()
        self._close_many()
        self._close_serving()
        return self._engine().solve(problem, workers, **kwargs)

    def stall(self, rank: int, seconds: float) -> None:
        """Fault injection for tests: shard `rank` sleeps instead of running its next pass."""
        self._engine().stall(rank, seconds)

    def time_collectives(self, on: bool) -> None:
        self._engine().time_collectives(on)

    def collective_time(self) -> tuple[float, int]:
        """Rank 0's (seconds in all-reduce/all-gather, passes) since the last read; reset on read."""
        return self._engine().collective_time()

    def launch_ahead(self, on: bool | None) -> tuple[bool, int, int]:
        return self._engine().executor.launch_ahead(on)

    def shutdown(self) -> None:
        """Close the session and stop the shards cleanly (channel closed, shared memory unlinked)."""
        try:
            self._close_session()
            self._close_many()
            self._close_serving()
        finally:
            if self.engine is not None:
                self.engine.close()

    # ---- internals ---------------------------------------------------------------------------
    def _engine(self) -> ShardedEngine:
        if self.engine is None:
            raise InvalidRequestError("the coordinator has no model loaded")
        return self.engine

    def _session(self, sid: int) -> Session:
        if sid != self.sid or self.session is None:
            raise InvalidRequestError(
                f"session {sid} is closed: the Ray engine serves one session at a time and a newer one was "
                "started; keep one session open per engine (or open another engine)")
        return self.session

    def _close_session(self) -> None:
        s = self.session
        if s is not None and not s.done:
            s.close()

    def _state(self) -> SessionState:
        s = self.session
        tails = [ws.stream[n:] for ws, n in zip(s.workers, self._reported)]
        self._reported = [len(ws.stream) for ws in s.workers]
        return SessionState(s.done, s.answer, s.stats, [ws.status for ws in s.workers], tails)
