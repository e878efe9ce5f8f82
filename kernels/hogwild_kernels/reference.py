"""Torch reference of RoPE-shifted concurrent attention over a paged K/V pool.

Every faster path (the Triton kernels) is tested against this function; it is written
for clarity, not speed. Semantics, per worker ("query group"):

* the worker's view is a list of segments; a segment is a block of the shared cache:
  its pages, how many of its tokens are visible, and the view position of its first
  token (its offset);
* keys in the pool are rotated at block-local positions 0..len-1, so a query at view
  position p is rotated by (p - offset) for each segment, and one softmax runs over the
  union of all segments;
* a key at view position offset + j is visible to a query at view position p only if
  offset + j <= p (causal inside the worker's own block; other blocks come earlier in
  the view, and their visible length encodes the one-step lag).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .rope import apply_rope, rope_cos_sin


@dataclass
class Segment:
    """One block as a worker sees it this step."""

    pages: torch.Tensor | list[int]  # page ids in the pool, in block order
    length: int  # visible tokens (a prefix of the block)
    offset: int  # view position of the block's first token
    block: int | None = None  # segments of several workers with one id are one block: read once


@dataclass
class QueryGroup:
    """The queries one worker feeds in this forward pass, and the view they attend."""

    start: int  # first row of this worker's queries in the packed q tensor
    count: int  # number of queries (1 for decode, more for a forced chunk)
    position: int  # view position of the first query; the rest follow contiguously
    segments: list[Segment]


def gather_segment(pool: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The first `seg.length` tokens of a block: [length, kv_heads, head_dim]."""
    page_size = pool.shape[1]
    need = -(-seg.length // page_size)
    pages = torch.as_tensor(seg.pages, dtype=torch.int64, device=pool.device)
    rows = pool[pages[:need]].reshape(-1, pool.shape[2], pool.shape[3])
    return rows[: seg.length]


def concurrent_attention_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    groups: list[QueryGroup],
    inv_freq: torch.Tensor,
    rope_scale: float,
    sm_scale: float,
) -> torch.Tensor:
    """Attention output [T, q_heads, head_dim] for unrotated queries q [T, q_heads, head_dim].

    k_pool, v_pool: [num_pages, page_size, kv_heads, head_dim]. Rows of q that belong to
    no group are left zero.
    """
    out = torch.zeros_like(q)
    q_heads, kv_heads = q.shape[1], k_pool.shape[2]
    rep = q_heads // kv_heads
    for g in groups:
        qg = q[g.start : g.start + g.count]
        qpos = g.position + torch.arange(g.count, device=q.device)
        scores, values = [], []
        for seg in g.segments:
            if seg.length == 0:
                continue
            k = gather_segment(k_pool, seg).to(torch.float32)
            v = gather_segment(v_pool, seg).to(torch.float32)
            cos, sin = rope_cos_sin(qpos - seg.offset, inv_freq.to(q.device), rope_scale)
            qr = apply_rope(qg.to(torch.float32), cos, sin)  # [n, Hq, D]
            k = k.repeat_interleave(rep, dim=1)  # [len, Hq, D]
            s = torch.einsum("nhd,lhd->hnl", qr, k) * sm_scale
            kpos = seg.offset + torch.arange(seg.length, device=q.device)
            s = s.masked_fill(kpos[None, None, :] > qpos[None, :, None], float("-inf"))
            scores.append(s)
            values.append(v.repeat_interleave(rep, dim=1))
        if not scores:
            continue
        p = torch.softmax(torch.cat(scores, dim=-1), dim=-1)
        o = torch.einsum("hnl,lhd->nhd", p, torch.cat(values, dim=0))
        out[g.start : g.start + g.count] = o.to(q.dtype)
    return out
