"""Engine options: resolved and checked once, with errors that name the fix.

Device, dtype, attention backend and CUDA graphs are settled here before anything loads;
the engine, the coordinator and every shard receive what these functions return.
"""

from __future__ import annotations

import os

import torch

from .errors import InvalidRequestError
from .model.parallel import TensorParallel

ATTENTION_CHOICES = ("auto", "triton", "torch")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequestError(f"device {device!r} is not a torch device (try 'cpu' or 'cuda')") from e
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
    for name, v in (("page_size", page_size), ("cache_tokens", cache_tokens), ("max_context", max_context)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")
