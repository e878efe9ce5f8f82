"""Host-side plan of one forward pass for the Triton attention: who reads what, once.

Segments of different workers that name the same block become one *item*; an item is
cut into chunks of keys (*units*), and each unit lists the (query token, rotation delta,
visible limit) *pairs* that read it. One program per (unit, KV head) then loads each K/V
tile once for all of them. The plan is built once per forward and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import QueryGroup


@dataclass
class AttentionPlan:
    tables: torch.Tensor  # int32 [items, max_pages] page table of each item
    unit_item: torch.Tensor  # int32 [units]
    unit_kstart: torch.Tensor  # int32 [units] first key of the chunk
    unit_kend: torch.Tensor  # int32 [units] end of the chunk (<= the largest limit)
    unit_pair: torch.Tensor  # int32 [units] first pair of the unit
    unit_npairs: torch.Tensor  # int32 [units]
    pair_tok: torch.Tensor  # int32 [pairs] query row in q
    pair_delta: torch.Tensor  # int32 [pairs] query position - block offset
    pair_limit: torch.Tensor  # int32 [pairs] keys [0, limit) are visible
    tok_start: torch.Tensor  # int32 [T + 1] CSR of each token's partials
    tok_parts: torch.Tensor  # int32 [pairs] partial rows, grouped by token
    num_tokens: int
    max_pairs: int  # the most pairs in one unit (sets the row-tile grid)
    max_parts: int  # the most partials of one token (sets the merge tile)
    pair_cos: torch.Tensor | None = None  # fp32 [pairs, head_dim / 2] set by the backend per pass
    pair_sin: torch.Tensor | None = None


def plan_attention(groups: list[QueryGroup], num_tokens: int, chunk: int, device: torch.device) -> AttentionPlan:
    items: dict = {}
    for g in groups:
        for seg in g.segments:
            key = seg.block if seg.block is not None else ("segment", id(seg))
            item = items.setdefault(key, {"pages": seg.pages, "rows": []})
            if seg.pages.numel() > item["pages"].numel():
                item["pages"] = seg.pages
            for i in range(g.count):
                delta = g.position + i - seg.offset
                limit = min(seg.length, delta + 1)
                if limit > 0:
                    item["rows"].append((g.start + i, delta, limit))
    max_pages = max([1] + [it["pages"].numel() for it in items.values()])
    tables = torch.zeros((max(1, len(items)), max_pages), dtype=torch.int32)
    u_item, u_ks, u_ke, u_pair, u_np = [], [], [], [], []
    p_tok, p_delta, p_limit = [], [], []
    per_tok: list[list[int]] = [[] for _ in range(num_tokens)]
    for idx, it in enumerate(items.values()):
        tables[idx, : it["pages"].numel()] = it["pages"].to(torch.int32).cpu()
        kmax = max((r[2] for r in it["rows"]), default=0)
        for c0 in range(0, kmax, chunk):
            rows = [r for r in it["rows"] if r[2] > c0]
            u_item.append(idx)
            u_ks.append(c0)
            u_ke.append(min(c0 + chunk, kmax))
            u_pair.append(len(p_tok))
            u_np.append(len(rows))
            for tok, delta, limit in rows:
                per_tok[tok].append(len(p_tok))
                p_tok.append(tok)
                p_delta.append(delta)
                p_limit.append(limit)
    starts = [0]
    for parts in per_tok:
        starts.append(starts[-1] + len(parts))

    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device=device)

    return AttentionPlan(
        tables.to(device), t(u_item), t(u_ks), t(u_ke), t(u_pair), t(u_np), t(p_tok), t(p_delta), t(p_limit),
        t(starts), t([p for parts in per_tok for p in parts]), num_tokens, max(u_np, default=0),
        max((len(parts) for parts in per_tok), default=0),
    )
