"""hogwild-ray: Hogwild! Inference, several workers sharing one KV cache."""

from .engine import HogwildEngine
from .errors import (
    CacheFullError, ContextLengthError, HogwildError, InvalidRequestError, ModelNotFoundError,
    UnsupportedModelError,
)
from .layout import LAYOUTS
from .protocol import ProtocolOptions
from .results import SolveResult, Stats
from .sampling import SamplingParams
from .session import Session
from .threads import set_threads

__version__ = "0.1.0"

__all__ = [
    "LAYOUTS", "CacheFullError", "ContextLengthError", "HogwildEngine", "HogwildError",
    "InvalidRequestError", "ModelNotFoundError", "ProtocolOptions", "SamplingParams", "Session",
    "SolveResult", "Stats", "UnsupportedModelError", "__version__", "set_threads",
]
