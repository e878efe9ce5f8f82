"""hogwild-ray: Hogwild! Inference, several workers sharing one KV cache.

The pure names (options, results, errors) import nothing heavy; the engine and its
sessions (torch, Triton) load the first time they are asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core.layout import LAYOUTS
from .core.protocol import ProtocolOptions
from .core.results import SolveResult, Stats
from .core.sampling_params import SamplingParams
from .errors import (
    CacheFullError, ContextLengthError, HogwildError, InvalidRequestError, ModelNotFoundError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from .engine import HogwildEngine
    from .session import Session
    from .replicated import solve_many
    from .threads import set_threads

__version__ = "0.1.0"

_LAZY = {"HogwildEngine": "engine", "Session": "session", "set_threads": "threads", "solve_many": "replicated"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hogwild_ray' has no attribute {name!r}")


__all__ = [
    "LAYOUTS", "CacheFullError", "ContextLengthError", "HogwildEngine", "HogwildError",
    "InvalidRequestError", "ModelNotFoundError", "ProtocolOptions", "SamplingParams", "Session",
    "SolveResult", "Stats", "UnsupportedModelError", "__version__", "set_threads", "solve_many",
]
