"""Whether a rank's K/V pool and weights can fit its device, checked before anything is allocated.

A pool that cannot fit fails late and badly otherwise: after the weights have loaded, with
a raw allocator error (or, on the CPU, after the machine starts swapping). On a GPU the
check is against the memory free now (CUDA commits what it allocates); on the CPU against
the machine's physical memory (untouched pages of a zeroed pool cost nothing until written,
so what is free at this moment would refuse pools that run well).
"""

from __future__ import annotations

import os

import torch

from ..config import MAX_SLOTS
from ..errors import InvalidRequestError


def device_memory(device: torch.device) -> int | None:
    """Bytes a new allocation may take on `device`, or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_pool_fits(pages: int, page_size: int, per_token: int, weight_bytes: int, device: torch.device) -> None:
    """InvalidRequestError naming cache_tokens and the memory it would take, when the pool (with
    this rank's weights) could not fit the device. per_token: K/V bytes of one token on this rank."""
    tokens = pages * page_size
    if tokens >= MAX_SLOTS:
        raise InvalidRequestError(
            f"cache_tokens={tokens:,} ({pages:,} pages of {page_size}) exceeds the {MAX_SLOTS:,} slots a pool can "
            "address; lower cache_tokens (unset: 4 x the context, at most 65536 tokens)")
    need = (tokens + page_size) * per_token  # and the pool's scratch page (cache.KVPool)
    have = device_memory(device)
    if have is not None and need + weight_bytes > have:
        where = "free" if device.type == "cuda" else "in all"
        raise InvalidRequestError(
            f"cache_tokens={tokens:,} (pages of {page_size} tokens) needs {gib(need)} of K/V memory "
            f"({per_token:,} bytes per token) besides {gib(weight_bytes)} of weights, and {device} has "
            f"{gib(have)} {where}; lower cache_tokens (unset: 4 x the context, at most 65536 tokens) "
            "or max_context")
