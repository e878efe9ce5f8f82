"""Engine options: resolved and checked once, with errors that name the fix.

`EngineConfig.create` settles device, dtype, attention, CUDA graphs, the pool, the context,
the backend and the placement before anything loads; the local engine, the coordinator and
every shard receive that one frozen object (`sized` adds what the model decides).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from .core.dtypes import DTYPE_NAMES
from .errors import InvalidRequestError, check_int
from .model.parallel import TensorParallel

ATTENTION_CHOICES = ("auto", "triton", "torch")
BACKENDS = ("local", "ray")
DTYPES = {name: getattr(torch, torch_name) for name, torch_name in DTYPE_NAMES.items()}


def resolve_device(device: str | torch.device) -> torch.device:
    """A device that exists here (parse_device: one that parses)."""
    dev = parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' asked for, but torch sees no CUDA GPU; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)} (or a torch dtype), got {dtype!r}")


def check_attention(attention: str, device: torch.device) -> None:
    """Triton needs a CUDA device, or its CPU interpreter (TRITON_INTERPRET=1)."""
    if attention != "triton" and not (attention == "auto" and device.type == "cuda"):
        return
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise InvalidRequestError("attention='triton' needs the triton package: pip install triton") from e
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidRequestError(
            "attention='triton' on a CPU device runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before starting Python, or use attention='torch'"
        )


def check_graphs(cuda_graphs: bool | None, attention: str, device: torch.device,
                 parallel: TensorParallel | None) -> bool:
    """Whether to capture decode passes in CUDA graphs; an explicit True that cannot be met is an error."""
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise InvalidRequestError(f"cuda_graphs must be True, False or None (auto), got {cuda_graphs!r}")
    triton = attention == "triton" or (attention == "auto" and device.type == "cuda")
    possible = device.type == "cuda" and triton
    if cuda_graphs and not possible:
        raise InvalidRequestError(
            "cuda_graphs=True needs a CUDA device and Triton attention (attention='auto' or 'triton'); "
            f"got device {device} and attention {attention!r}: drop cuda_graphs or change them"
        )
    if cuda_graphs is None:
        return possible and (parallel is None or parallel.world == 1)
    return cuda_graphs


def check_options(attention: str, page_size: int, cache_tokens: int | None, max_context: int | None) -> None:
    if attention not in ATTENTION_CHOICES:
        raise InvalidRequestError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    check_int("page_size", page_size, 1)
    if page_size > MAX_PAGE_SIZE:
        raise InvalidRequestError(f"page_size must be at most {MAX_PAGE_SIZE} tokens, got {page_size} "
                                  "(16, the default, suits every model)")
    check_int("cache_tokens", cache_tokens, 1, none="")
    if cache_tokens is not None and cache_tokens >= MAX_SLOTS:
        raise InvalidRequestError(f"cache_tokens must be below {MAX_SLOTS:,} (the slots a pool can address), got "
                                  f"{cache_tokens:,}; unset it for 4 x the context, at most 65536 tokens")
    check_int("max_context", max_context, 1, none="")


MAX_SLOTS = 2**31  # pool slots are 32-bit indices in the kernels and the plans
MAX_PAGE_SIZE = 1024  # a page is the unit of sharing and of the kernels' tables: larger only wastes memory

RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_resources(name: str, resources: Mapping[str, float] | None) -> dict[str, float]:
    """A copy of `resources` ({custom resource: amount > 0}), or InvalidRequestError naming what is wrong."""
    if resources is None:
        return {}
    if not isinstance(resources, Mapping):
        raise InvalidRequestError(f"{name} must be a dict of custom resource -> amount, got {resources!r}")
    out = {}
    for key, amount in resources.items():
        if key in RESERVED_RESOURCES:
            raise InvalidRequestError(
                f"{name} names {key!r}, which the engine sets itself (1 CPU, and 1 GPU on CUDA, per shard); "
                "give only custom resources, e.g. {'gpu_node': 1} for a node started with "
                "ray start --resources='{\"gpu_node\": 8}'")
        if not isinstance(key, str) or isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount <= 0:
            raise InvalidRequestError(f"{name} must map resource names to amounts > 0, got {key!r}: {amount!r}")
        out[key] = float(amount)
    return out


def check_seconds(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
        raise InvalidRequestError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EngineConfig:
    """Every option of an engine, resolved and checked once (`create`), then handed as it is to
    the local runner, or to the coordinator and every shard of the Ray backend. `sized` fills
    in what the model decides (the served context and the pool's size) before any shard loads."""

    model: str | None = None  # a path or random:NAME; None: the built-in model
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "auto"
    cuda_graphs: bool | None = None  # None: on where possible (decided per rank)
    page_size: int = 16
    cache_tokens: int | None = None  # None: 4 x the context, at most 65536 (see `sized`)
    max_context: int | None = None  # None: the model's
    backend: str = "local"
    tp: int = 1
    ray_address: str | None = None
    placement_timeout_s: float = 30.0
    step_timeout_s: float = 30.0
    shard_resources: dict[str, float] = field(default_factory=dict)
    coordinator_resources: dict[str, float] | None = None

    @classmethod
    def create(cls, model: str | Path | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, *, check_device: bool = True, **options) -> EngineConfig:
        """Check every option; clear errors name the option and the fix. check_device: the device
        must exist here (False where it only has to exist on the shards' nodes)."""
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidRequestError(f"unknown engine option(s) {', '.join(sorted(unknown))}")
        backend = options.get("backend", "local")
        if backend not in BACKENDS:
            raise InvalidRequestError(f"backend must be 'local' or 'ray', got {backend!r}")
        tp = options.get("tp", 1)
        check_int("tp", tp, 1)
        if backend == "local" and tp != 1:
            raise InvalidRequestError(f"tp={tp} needs backend='ray' (the local backend runs one rank)")
        if backend == "local" and (options.get("shard_resources") or options.get("coordinator_resources")):
            raise InvalidRequestError("shard_resources and coordinator_resources place Ray actors: they need "
                                      "backend='ray'")
        attention = options.get("attention", "auto")
        check_options(attention, options.get("page_size", 16), options.get("cache_tokens"),
                      options.get("max_context"))
        dev = resolve_device(device) if check_device or backend == "local" else parse_device(device)
        graphs = options.get("cuda_graphs")
        if graphs is not None:
            check_graphs(graphs, attention, dev, None)
        for name in ("placement_timeout_s", "step_timeout_s"):
            if name in options:
                options[name] = check_seconds(name, options[name])
        options["shard_resources"] = check_resources("shard_resources", options.get("shard_resources"))
        options["coordinator_resources"] = check_resources("coordinator_resources",
                                                           options.get("coordinator_resources")) or None
        name = dtype_name(resolve_dtype(dtype, dev))
        return cls(None if model is None else str(model), str(dev), name, **options)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def pages(self) -> int:
        """The pool's pages (after `sized`)."""
        return -(-self.cache_tokens // self.page_size)

    def sized(self, model_context: int) -> EngineConfig:
        """The served context (the model's, or less when asked) and the pool (default: 4 x the
        context, at most 65536 tokens), in whole pages."""
        context = min(self.max_context or model_context, model_context)
        pages = -(-(self.cache_tokens or min(4 * context, 65536)) // self.page_size)
        return replace(self, max_context=context, cache_tokens=pages * self.page_size)


def parse_device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequestError(f"device {device!r} is not a torch device (try 'cpu' or 'cuda')") from e


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
