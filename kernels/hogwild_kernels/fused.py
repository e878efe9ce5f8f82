"""Fused elementwise kernels of the decoder: residual add + RMSNorm, and SiLU(gate) * up.

At decode sizes (one token per worker) the dense layers' matrix products run near the
memory bandwidth, and what is left is the count of small kernels: a plain RMSNorm is
seven of them. These do each job in one launch, rounding exactly where the torch
reference rounds (the sum and the normalised value in the input dtype, the weight
multiply in fp32), so the fused and unfused paths agree to the last bit or nearly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pdl import chain_start, launch


@triton.jit
def inv_rms(x, N: tl.constexpr, eps):
    """1 / RMS of one row (fp32; the sum over the row's block in one reduction)."""
    xf = x.to(tl.float32)
    return 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)


@triton.jit
def rms_scaled(x, inv, w_ptr, mask):
    """x's RMSNorm times the weight (fp32), rounded where the torch reference rounds: the
    normalised value in x's dtype. Elementwise, so a row may be done in pieces with one inv."""
    return rms_times(x, inv, tl.load(w_ptr, mask=mask, other=0.0))


@triton.jit
def rms_times(x, inv, w):
    """rms_scaled with the weight already loaded."""
    normed = (x.to(tl.float32) * inv).to(x.dtype).to(tl.float32)
    return normed * w.to(tl.float32)


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, w2_ptr, sum_ptr, out_ptr, heads, split, eps,
                         stride_xt, stride_xh, stride_dt, stride_dh, stride_st, stride_ot, stride_oh,
                         N: tl.constexpr, BLOCK: tl.constexpr, HAS_DELTA: tl.constexpr, CHAINED: tl.constexpr):
    """One row (token t, head h): sum = x + delta (stored), out = w * norm(sum); heads from
    `split` on take their weight from w2 (the key heads of a q/k norm in the same launch).
    Chained, the weight is loaded before the wait (no kernel writes it)."""
    row = tl.program_id(0)
    t = row // heads
    h = row % heads
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    if h < split:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:
        w = tl.load(w2_ptr + offs, mask=mask, other=0.0)
    chain_start(CHAINED)
    x = tl.load(x_ptr + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(delta_ptr + t * stride_dt + h * stride_dh + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + t * stride_st + offs, x, mask=mask)
    y = rms_times(x, inv_rms(x, N, eps), w)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gt, stride_ot, inter, BLOCK: tl.constexpr, CHAINED: tl.constexpr):
    chain_start(CHAINED)
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(gu_ptr + t * stride_gt + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + t * stride_gt + inter + offs, mask=mask, other=0.0)
    ty = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs, (act * u.to(tl.float32)).to(ty), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, chained: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, rms_norm(x + delta) * weight) over the last dim, in one launch.

    x: [T, N] or [T, H, N] (rows may be strided, e.g. q or k sliced from a fused QKV).
    chained: launched as a programmatic dependent of the kernel before it (pdl.py)."""
    x3 = x if x.dim() == 3 else x[:, None, :]
    t, heads, n = x3.shape
    out = torch.empty(t, heads, n, dtype=x.dtype, device=x.device)
    total = x3 if delta is None else torch.empty(t, n, dtype=x.dtype, device=x.device)
    d3 = x3 if delta is None else (delta if delta.dim() == 3 else delta[:, None, :])
    if delta is not None and heads != 1:
        raise ValueError("a residual delta is added to [T, N] rows only")
    _add_rms_norm_kernel[(t * heads,)](
        x3, d3, weight, weight, total, out, heads, heads, eps,
        x3.stride(0), x3.stride(1), d3.stride(0), d3.stride(1), total.stride(0), out.stride(0), out.stride(1),
        N=n, BLOCK=triton.next_power_of_2(n), HAS_DELTA=delta is not None, CHAINED=chained, **launch(chained),
    )
    total = total if delta is not None else x
    return total, out.view(x.shape)


def qk_rms_norm(qkv: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, q_heads: int, kv_heads: int,
                head_dim: int, eps: float, chained: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-head RMSNorms of q and k (Qwen3's q_norm and k_norm) read from a fused QKV
    output [T, (Hq + 2 Hkv) * D], in one launch: (q [T, Hq, D], k [T, Hkv, D])."""
    t = qkv.shape[0]
    heads = q_heads + kv_heads
    qk = qkv[:, :heads * head_dim].view(t, heads, head_dim)  # the q heads, then the k heads
    out = torch.empty(t, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _add_rms_norm_kernel[(t * heads,)](
        qk, qk, q_weight, k_weight, qk, out, heads, q_heads, eps,
        qk.stride(0), qk.stride(1), qk.stride(0), qk.stride(1), qk.stride(0), out.stride(0), out.stride(1),
        N=head_dim, BLOCK=triton.next_power_of_2(head_dim), HAS_DELTA=False, CHAINED=chained, **launch(chained),
    )
    return out[:, :q_heads], out[:, q_heads:]


def silu_mul(gate_up: torch.Tensor, chained: bool = False) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] along the last dim: [T, 2I] -> [T, I]."""
    t, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                      BLOCK=block, CHAINED=chained, **launch(chained))
    return out
