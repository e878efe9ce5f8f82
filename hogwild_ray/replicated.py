"""Many problems on several engine replicas placed by Ray: `hogwild_ray.solve_many`, and the
choice `hogwild-ray batch` and `eval` make between one engine and replicas.

One engine in this process is the default on a machine of its own; on a Ray cluster with GPUs
the default is a replica per `tp` GPUs (hogwild_ray.core.replica_plan). Replicas run as a Ray
Serve application (hogwild_ray.serve.pool): Serve places them, routes each problem to the
least-loaded one, and replaces one that dies; a problem lost with its replica runs again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from .errors import check_int


def default_replicas(address: str | None, device: str | None, tp: int) -> int | None:
    """The replicas a run gets when none are asked for: None (one engine, no replicas) unless a Ray
    cluster is named and has GPUs for two or more replicas (then that many)."""
    if not address or (device or "cuda").startswith("cpu"):
        return None
    from .core.replica_plan import plan_replicas
    from .serve.pool import cluster_resources

    resources = cluster_resources(address)
    if resources.get("GPU", 0) < 2 * tp:
        return None
    return plan_replicas(None, "cuda", tp, resources["GPU"], resources.get("CPU", 0))


def solve_many(problems: Iterable[str | dict], out: str | Path | None = None, *, replicas: int | None = None,
               model: str | Path | None = None, device: str | None = None, dtype: str | None = None, tp: int = 1,
               address: str | None = None, cache_tokens: int | None = None, cuda_graphs: bool | None = None,
               max_concurrent: int | None = None, progress: bool = True, workers: int = 2, **options: Any) -> list[dict]:
    """Solve each problem (a string, or a dict with `problem` and an optional `id`) on `replicas`
    engine replicas placed by Ray (the cluster at `address`, or a local one; None: what the
    cluster holds, see `default_replicas`, else one engine in this process). Each replica
    batches its share in shared passes; one JSON line per result is appended to `out` as it
    finishes, and a rerun skips the ids already there. A problem whose replica dies runs again
    on another. options: those of `solve` (max_tokens, sampling, layout, max_steps, protocol
    options). Returns every problem's record, in input order."""
    check_int("replicas", replicas, 1, none="(what the cluster holds)")
    if replicas is None:
        replicas = default_replicas(address, device, tp)
    if replicas is None:
        from .api import from_pretrained

        engine = from_pretrained(model, device or _local_device(), dtype, tp=tp, cache_tokens=cache_tokens,
                                 cuda_graphs=cuda_graphs, **({"backend": "ray", "ray_address": address}
                                                             if tp > 1 or address else {}))
        try:
            return engine.solve_many(problems, out, max_concurrent=max_concurrent, progress=progress,
                                     workers=workers, **options)
        finally:
            engine.close()
    return run_on_replicas(problems, out, replica_settings(model, device, dtype, tp, cache_tokens, cuda_graphs,
                                                           max_concurrent), replicas, address, progress,
                           dict(workers=workers, **options))


def replica_settings(model: Any, device: str | None, dtype: str | None, tp: int, cache_tokens: int | None,
                     cuda_graphs: bool | None, max_concurrent: int | None):
    """The replicas' engine, checked here (the model's files and shape, the options) before Ray starts."""
    from .config import EngineConfig
    from .model.loader import quick_spec
    from .model.parallel import shard_plan
    from .serve.app import ServeSettings

    EngineConfig.create(model, device or "cpu", dtype, check_device=False, backend="ray" if tp > 1 else "local",
                        tp=tp, cache_tokens=cache_tokens, cuda_graphs=cuda_graphs)
    spec = quick_spec(None if model is None else str(model))
    if tp > 1:
        shard_plan(spec, 0, tp)
    return ServeSettings(model=None if model is None else str(model), device=device, dtype=dtype, tp=tp,
                         cache_tokens=cache_tokens, cuda_graphs=cuda_graphs, max_concurrent=max_concurrent)


def run_on_replicas(problems: Iterable[str | dict], out: str | Path | None, settings: Any, replicas: int | None,
                    address: str | None, progress: bool, options: dict) -> list[dict]:
    """`batch.run_batch` over a pool of engine replicas."""
    from .batch import check_same_problems, done, normalize, read_finished, run_batch
    from .core.sampling_params import per_worker
    from .serve.pool import ReplicaPool
    from .serve.replica_runs import batch_on_replicas

    from .engine import protocol_from

    options = dict(options)
    workers = options.pop("workers", 2)
    check_int("workers", workers, 1)
    check_int("max_tokens", options.get("max_tokens", 1024), 1, none="")
    check_int("max_steps", options.get("max_steps"), 1, none="")
    per_worker(options.get("sampling"), workers)  # bad options fail before anything starts
    protocol_from(options.get("layout", "combined"),
                  {k: v for k, v in options.items() if k not in ("max_tokens", "sampling", "layout", "max_steps")})
    problems = list(problems)
    items = normalize(problems)
    finished = read_finished(Path(out)) if out is not None else {}
    check_same_problems(items, finished, out)  # before any replica starts
    if out is not None and all(done(finished.get(pid)) for pid, _ in items):
        return run_batch(lambda todo: iter(()), problems, out, progress)  # nothing to run: no replica starts
    with ReplicaPool(settings, replicas, address, quiet=not progress) as pool:
        return run_batch(batch_on_replicas(pool, workers, options, settings.max_concurrent), problems, out, progress)


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
