"""Rotary embeddings as rotations by arbitrary (also negative) position deltas.

The whole cache design rests on R(a) R(b) = R(a + b): keys are stored rotated at
block-local positions and queries are rotated by (query position - block offset).
"""

from __future__ import annotations

import torch


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [n, head_dim] for integer positions (fp32, like Hugging Face).

    `scale` is the rope attention factor (YaRN's mscale); it multiplies cos and sin,
    so a rotation that carries it must be applied once per side, never when a stored
    key is only moved (see `rotate_keys_by`).
    """
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [n, heads, head_dim] by per-row cos/sin [n, head_dim] (rotate-half form)."""
    half = x.shape[-1] // 2
    xf = x.to(torch.float32)
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    out = xf * cos[:, None, :] + rotated * sin[:, None, :]
    return out.to(x.dtype)


def rotate_keys_by(keys: torch.Tensor, delta: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move stored keys [..., n, heads, head_dim] forward by `delta` positions (pure rotation)."""
    flat = keys.reshape(-1, keys.shape[-2], keys.shape[-1])
    pos = torch.full((flat.shape[0],), delta, dtype=torch.int64, device=keys.device)
    cos, sin = rope_cos_sin(pos, inv_freq.to(keys.device))
    return apply_rope(flat, cos, sin).reshape(keys.shape)
