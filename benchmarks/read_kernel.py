"""Kernels that read a buffer once and write one word per program: the read bandwidth probe.

Tried in a few launch shapes, one program per block or a persistent grid that walks the
buffer with several loads in flight; the fastest is the device's read bandwidth, since no
shape can read faster than the memory."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# one program per block: (int32 words per program, warps)
BLOCKS = [(8192, 4), (16384, 8), (32768, 16)]
# persistent: (programs per SM, int32 words per step, warps, steps in flight)
PERSISTENT = [(4, 4096, 8, 4), (8, 2048, 4, 4), (2, 8192, 8, 3)]


@triton.jit
def _read_block_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.max(x, 0))


@triton.jit
def _read_persistent_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, STAGES: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in tl.range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK)
        acc = tl.maximum(acc, tl.load(x_ptr + offs, mask=offs < n, other=0))
    tl.store(out_ptr + tl.program_id(0), tl.max(acc, 0))


def readers(words: torch.Tensor) -> list:
    """One function per launch shape, each reading every word of `words` once."""
    out = []
    n = words.numel()
    for block, warps in BLOCKS:
        partial = torch.empty(triton.cdiv(n, block), dtype=torch.int32, device=words.device)
        out.append(lambda block=block, warps=warps, partial=partial: _read_block_kernel[(partial.numel(),)](
            words, partial, n, BLOCK=block, num_warps=warps))
    if words.is_cuda and n < 2**31:
        sms = torch.cuda.get_device_properties(words.device).multi_processor_count
        for per_sm, block, warps, stages in PERSISTENT:
            partial = torch.empty(per_sm * sms, dtype=torch.int32, device=words.device)
            out.append(lambda block=block, warps=warps, stages=stages, partial=partial: _read_persistent_kernel[
                (partial.numel(),)](words, partial, n, BLOCK=block, STAGES=stages, num_warps=warps))
    return out
