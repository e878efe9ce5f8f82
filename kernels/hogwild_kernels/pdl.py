"""Programmatic dependent launch (Hopper and later): a decode layer's kernels as one chain.

A decode pass is a few dozen small kernels per layer, each reading little; between two of
them the device drains one grid and ramps up the next, several microseconds that no
kernel's speed can win back. Launched as a programmatic dependent, a kernel's programs
start while its predecessor still runs, do what does not depend on it (the skinny
products start pulling their weights into the L2 cache) and wait at `chain_start` until
the predecessor's writes are visible; they then let their own successor launch.

The rule that keeps this exact: a chained kernel reads no activation and writes nothing
before `chain_start`. Every chained kernel calls it, so each one's wait also covers
everything before its predecessor: what a kernel may read before its wait is what no kernel
of the chain writes (weights, the pass's plan, the rotations computed at the pass's start),
and the kernels load it then (norm weights, a unit's pairs and their rotations, a new key's
slot), so that their first loads after the wait are the activations'.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_SUPPORTED: dict[int, bool] = {}


def supported(device: torch.device) -> bool:
    """A CUDA device of compute capability 9 or more, and not the Triton interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SUPPORTED:
        _SUPPORTED[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _SUPPORTED[index]


def launch(chained: bool) -> dict:
    """The launch options of a kernel that is (or is not) a programmatic dependent."""
    return {"launch_pdl": True} if chained else {}


@triton.jit
def chain_start(CHAINED: tl.constexpr):
    """Wait for the predecessor's writes, then let the successor launch."""
    if CHAINED:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask the L2 cache for these addresses' lines; no registers wait for them (what a chained
    kernel may do before `chain_start` with memory no kernel of the chain writes)."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
