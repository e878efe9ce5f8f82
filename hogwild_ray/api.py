"""The one place that picks an engine's backend: this process, or shard actors on Ray.

Both engines share EngineFront's API; `HogwildEngine.from_pretrained` comes here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import EngineConfig
from .engine import HogwildEngine
from .errors import InvalidRequestError
from .front import EngineFront
from .model.parallel import TensorParallel


def from_pretrained(path: str | Path | None = None, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype | None = None, *, parallel: TensorParallel | None = None,
                    backend: str = "local", **options) -> EngineFront:
    """An engine for a checked EngineConfig (see HogwildEngine.from_pretrained for the options)."""
    config = EngineConfig.create(path, device, dtype, check_device=backend != "ray", backend=backend, **options)
    return load(config, parallel)


def load(config: EngineConfig, parallel: TensorParallel | None = None) -> EngineFront:
    """The engine of the config's backend (`parallel`: one rank of your own process group, local only)."""
    if config.backend == "ray":
        if parallel is not None:
            raise InvalidRequestError("parallel= is for one rank of your own process group; "
                                      "backend='ray' builds its ranks itself (use tp=)")
        from .runtime.engine import RayHogwildEngine

        return RayHogwildEngine.create(config)
    return HogwildEngine.load(config, parallel)
