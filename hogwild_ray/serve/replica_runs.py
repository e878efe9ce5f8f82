"""A batch's problems and an evaluation's runs over engine replicas (hogwild_ray.serve.pool):
each replica batches its share in shared passes; results come back as they finish, in the
shapes the single-engine paths produce, so the output files and their resume are the same."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Iterator

from ..batch import OnReplica, Retried, SolveAll
from ..core.events import from_json
from ..errors import CacheFullError, ContextLengthError, HogwildError
from ..eval.experiment import Experiment, Record
from ..eval.runner import forced_tokens, start_options, worker_sampling
from ..run_progress import RunProgress
from .pool import Lost, ReplicaPool

SLACK = 0.25  # calls queued on a replica beyond what it runs at once, so its next pass never waits on the driver


def window(pool: ReplicaPool, capacity: int, max_concurrent: int | None) -> int:
    """Calls in flight for the whole pool: each replica's share of sessions that fit at once, plus slack."""
    per_replica = capacity if max_concurrent is None else min(capacity, max_concurrent)
    return pool.replicas * (per_replica + max(1, int(per_replica * SLACK)))


def longest(texts: Any, count: int = 16) -> list[str]:
    """The longest few texts: the replica sizes the run's sessions by the longest that fits."""
    return sorted(set(texts), key=len, reverse=True)[:count]


def short(replica: str) -> str:
    return replica[:8]


def batch_on_replicas(pool: ReplicaPool, workers: int, options: dict, max_concurrent: int | None) -> SolveAll:
    """A SolveAll (hogwild_ray.batch) whose problems run on the pool's replicas."""

    def solve_all(todo: list[tuple[str | int, str]]) -> Iterator[tuple[str | int, Any]]:
        if not todo:
            return
        texts = dict(todo)
        fit = {k: v for k, v in options.items() if k not in ("sampling", "max_steps")}
        capacity = pool.call_one("capacity", longest(texts.values()), workers, fit)

        def call(handle: Any, pid: str | int) -> Any:
            return handle.solve.remote(texts[pid], workers, options)

        for pid, value in pool.run(list(texts), call, window(pool, capacity, max_concurrent)):
            if isinstance(value, Lost):
                yield pid, Retried(value.why)
            elif value["type"] == "done":
                yield pid, OnReplica(from_json(value["event"]).result(), short(value["replica"]))
            elif value.get("error") in ("ContextLengthError", "CacheFullError"):
                cls = ContextLengthError if value["error"] == "ContextLengthError" else CacheFullError
                yield pid, OnReplica(cls(value["message"]), short(value["replica"]))
            else:
                raise HogwildError(f"problem {pid!r} failed on replica {short(value['replica'])}: {value['message']}")

    return solve_all


def eval_on_replicas(pool: ReplicaPool, max_concurrent: int | None) -> Callable[..., int]:
    """An `execute` for hogwild_ray.eval.experiment.run_experiment whose runs go to the pool's
    replicas, each run with its problem's own seeds (the records equal one engine's)."""

    def execute(exp: Experiment, runs: list, record: Record, progress: RunProgress) -> int:
        by_key = {(i, spec): (i, problem, spec) for i, problem, spec in runs}
        spec = max((r[2] for r in runs), key=lambda s: s.workers)
        capacity = pool.call_one("capacity", longest(r[1]["problem"] for r in runs), spec.workers,
                                 start_options(spec, exp.budgets, exp.options), forced_tokens(exp.options))

        def call(handle: Any, key: tuple) -> Any:
            i, problem, spec = by_key[key]
            sampling = asdict(worker_sampling(exp.sampling, exp.seed, i))
            return handle.evaluate.remote(problem, asdict(spec), exp.budgets, sampling, exp.options)

        most = window(pool, capacity, max_concurrent)
        for key, value in pool.run(list(by_key), call, most):
            if isinstance(value, Lost):
                _, problem, spec = by_key[key]
                progress.retry(f"id={problem['id']} {spec.label} {value.why}")
            else:
                record(value["records"], short(value["replica"]))
        return min(most, len(runs))

    return execute


def eval_execute(settings: Any, replicas: int, address: str | None, max_concurrent: int | None,
                 quiet: bool = False) -> Callable[..., int]:
    """An `execute` that starts the pool only when runs are left, and deletes it at the end."""

    def execute(exp: Experiment, runs: list, record: Record, progress: RunProgress) -> int:
        with ReplicaPool(settings, replicas, address, quiet=quiet) as pool:
            return eval_on_replicas(pool, max_concurrent)(exp, runs, record, progress)

    return execute
