"""The Ray Serve application: an HTTP front (one replica) and engine replicas (R, or autoscaled).

`build_app(...)` returns the application for `serve.run`; `app_builder(args)` is the same
for `serve run hogwild_ray.serve.app:app_builder model=... workers=4` and for Serve config
files (RayService). Ray Serve does the distributed part: placing replicas (one GPU each on
CUDA), health checks that replace a broken replica, autoscaling on ongoing requests, graceful
shutdown. The front mirrors Ray Serve LLM's ingress/server split, so that every request and
its metrics pass one place while the engines scale.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidRequestError, check_int
from .openai_protocol import ServeDefaults

API_KEY_ENV = "HOGWILD_API_KEY"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # the built-in default model, as /v1/models names it
FRONT = "OpenAIFront"  # the front deployment's name (the engine replicas report their counters to it)
ONGOING_PER_REPLICA = 256  # sessions one replica takes at once (its own scheduler queues them by pages)


@dataclass(frozen=True)
class ServeSettings:
    """Everything `hogwild-ray serve` and the Serve config take, checked before anything starts."""

    model: str | None = None
    served_model_name: str | None = None
    device: str | None = None
    dtype: str | None = None
    cache_tokens: int | None = None
    cuda_graphs: bool | None = None
    tp: int = 1
    workers: int = 2
    max_workers: int = 64
    max_tokens: int = 1024
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    api_key: str | None = None
    max_waiting: int = 256
    max_concurrent: int | None = None
    cpus_per_replica: float = 1.0
    # decode graphs captured at start for batches of up to this many sessions of `workers` (0: none)
    graph_warmup: int = 32

    def __post_init__(self) -> None:
        check_int("tp", self.tp, 1)
        check_int("workers", self.workers, 1)
        check_int("max_workers", self.max_workers, self.workers, hi_text=None)
        check_int("max_tokens", self.max_tokens, 1)
        check_int("replicas", self.replicas, 1)
        check_int("max_waiting", self.max_waiting, 0)
        check_int("max_concurrent", self.max_concurrent, 1, none="(as many as fit in the cache)")
        check_int("graph_warmup", self.graph_warmup, 0, hint="0 captures the graphs as requests come")
        if self.autoscale is not None:
            lo, hi = self.autoscale
            check_int("autoscale minimum", lo, 0)
            check_int("autoscale maximum", hi, max(lo, 1))
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidRequestError("--api-key is empty: give a key, or leave it out to serve without one")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model or DEFAULT_MODEL_NAME

    def engine_options(self) -> dict[str, Any]:
        options = {"path": self.model, "device": self.device, "dtype": self.dtype,
                   "cache_tokens": self.cache_tokens, "cuda_graphs": self.cuda_graphs}
        if self.tp > 1:  # the replica drives `tp` shard actors (one GPU each) through a coordinator
            options.update(backend="ray", tp=self.tp, device=self.device or ("cuda" if _cuda_nodes() else "cpu"))
        return {k: v for k, v in options.items() if v is not None or k == "path"}

    def replica_actor_options(self) -> dict[str, Any]:
        # device cuda: a GPU each, even before the GPU nodes joined (KubeRay deploys the app as soon as the
        # head is up); no device given: a GPU where the cluster has any
        gpus = 1 if self.device == "cuda" or (self.device is None and _cuda_nodes()) else 0
        if self.tp > 1:  # the shards hold the GPUs, in a placement group of their own
            gpus = 0
        return {"num_cpus": self.cpus_per_replica, "num_gpus": gpus}


def _cuda_nodes() -> bool:
    """Whether the cluster has GPUs (a replica then takes one)."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def build_app(settings: ServeSettings) -> Any:
    """The Serve application (front + engine replicas) for `serve.run`."""
    from ray import serve

    from .front import OpenAIIngress
    from .replica import EngineReplica

    scaling: dict[str, Any] = {"num_replicas": settings.replicas}
    if settings.autoscale is not None:
        lo, hi = settings.autoscale
        scaling = {"autoscaling_config": {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": 16}}
    engine = serve.deployment(EngineReplica, name="HogwildEngine").options(
        ray_actor_options=settings.replica_actor_options(), max_ongoing_requests=ONGOING_PER_REPLICA,
        health_check_period_s=10, health_check_timeout_s=60, graceful_shutdown_timeout_s=30, **scaling,
    ).bind(settings.engine_options(), settings.max_concurrent, FRONT, None,
           (settings.workers, settings.graph_warmup))
    defaults = ServeDefaults(model=settings.model_name, workers=settings.workers, max_workers=settings.max_workers,
                             max_tokens=settings.max_tokens)
    api_key = settings.api_key or os.environ.get(API_KEY_ENV) or None
    front = serve.deployment(OpenAIIngress, name=FRONT).options(
        num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=4096)
    return front.bind(engine, defaults, api_key, settings.max_waiting)


def app_builder(args: dict[str, Any]) -> Any:
    """`serve run hogwild_ray.serve.app:app_builder key=value ...` and Serve config files: the
    keys are ServeSettings' fields (autoscale as "MIN,MAX")."""
    known = set(ServeSettings.__dataclass_fields__)
    unknown = set(args) - known
    if unknown:
        raise InvalidRequestError(f"unknown argument(s) {', '.join(sorted(unknown))}; the arguments are "
                                  f"{', '.join(sorted(known))}")
    kw: dict[str, Any] = {}
    for name, value in args.items():
        kw[name] = _coerce(name, value)
    return build_app(ServeSettings(**kw))


INT_FIELDS = {"cache_tokens", "tp", "workers", "max_workers", "max_tokens", "replicas", "max_waiting",
              "max_concurrent", "graph_warmup"}


def _coerce(name: str, value: Any) -> Any:
    """Serve passes `key=value` arguments as strings: turn them into the field's type."""
    if not isinstance(value, str):
        return tuple(value) if name == "autoscale" and isinstance(value, list) else value
    if name == "autoscale":
        return parse_autoscale(value)
    try:
        if name in INT_FIELDS:
            return int(value)
        if name == "cpus_per_replica":
            return float(value)
        if name == "cuda_graphs":
            return {"true": True, "false": False, "auto": None}[value.lower()]
    except (ValueError, KeyError):
        wanted = {"cpus_per_replica": "a number", "cuda_graphs": "true, false or auto"}.get(name, "an integer")
        raise InvalidRequestError(f"{name}={value!r} is not a valid value for {name}: give {wanted}") from None
    return value


def parse_autoscale(text: str) -> tuple[int, int]:
    """"MIN,MAX" -> (MIN, MAX)."""
    parts = text.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise InvalidRequestError(f"--autoscale {text!r}: give MIN,MAX replicas, e.g. 1,4")
    return int(parts[0]), int(parts[1])


def serve_running() -> bool:
    """Whether a Serve controller runs on the connected cluster (a run that finds one leaves it, and
    its other applications, as it found them)."""
    import ray

    try:
        ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
        return True
    except ValueError:
        return False
