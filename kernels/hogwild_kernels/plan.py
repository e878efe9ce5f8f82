"""The plan of one forward pass for the Triton attention: who reads what, once.

Segments of different workers that name the same block become one *item*; an item is
cut into chunks of keys (*units*), and each unit lists the (query token, rotation delta,
visible limit) *pairs* that read it. One program per (unit, KV head) then loads each K/V
tile once for all of them. The plan is built once per forward and shared by all layers.

It is built on the host with a handful of vectorised numpy operations, whatever the
number of workers, and reaches the device in one copy. With `PlanCaps` every array has a
fixed size (padding units have no pairs), so a CUDA graph captured once can replay any
later pass of the same shape after its buffers are refilled (see `StaticPlan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .reference import QueryGroup

FIELDS = ("unit_item", "unit_kstart", "unit_kend", "unit_pair", "unit_npairs",
          "pair_tok", "pair_delta", "pair_limit", "tok_start", "tok_parts")


@dataclass
class AttentionPlan:
    tables: torch.Tensor  # int32 [items, max_pages] page table of each item
    unit_item: torch.Tensor  # int32 [units]
    unit_kstart: torch.Tensor  # int32 [units] first key of the chunk
    unit_kend: torch.Tensor  # int32 [units] end of the chunk (<= the largest limit)
    unit_pair: torch.Tensor  # int32 [units] first pair of the unit
    unit_npairs: torch.Tensor  # int32 [units] (0 for padding units)
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


@dataclass(frozen=True)
class PlanCaps:
    """Fixed sizes of a plan's arrays: what one captured graph can serve."""

    tokens: int
    items: int
    pages: int  # pages of the longest block
    units: int

    @property
    def pairs(self) -> int:
        return self.units * self.tokens  # a token reads each unit at most once

    def sizes(self) -> dict[str, int]:
        u, p = self.units, self.pairs
        return {"tables": self.items * self.pages, "unit_item": u, "unit_kstart": u, "unit_kend": u,
                "unit_pair": u, "unit_npairs": u, "pair_tok": p, "pair_delta": p, "pair_limit": p,
                "tok_start": self.tokens + 1, "tok_parts": p}


def _pages(pages) -> np.ndarray:
    if isinstance(pages, torch.Tensor):
        pages = pages.cpu().numpy()
    return np.asarray(pages, dtype=np.int32)


def build_plan(groups: list[QueryGroup], num_tokens: int, chunk: int | Callable[[int], int]) -> dict:
    """The plan's arrays (numpy int32) and sizes. chunk: the keys per unit, or a function of the
    total keys to read (each block counted once) that picks it."""
    segs = [seg for g in groups for seg in g.segments]
    keys = [seg.block if seg.block is not None else ("segment", id(seg)) for seg in segs]
    index: dict = {}
    seg_item = [index.setdefault(k, len(index)) for k in keys]
    tables: list = [()] * len(index)  # each item's page table: its longest segment's pages
    for item, seg in zip(seg_item, segs):
        pages = seg.pages
        if len(pages) > len(tables[item]):
            tables[item] = pages
    seg_off = [seg.offset for seg in segs]
    seg_len = [seg.length for seg in segs]
    seg_pos = [g.position for g in groups for _ in g.segments]
    seg_start = [g.start for g in groups for _ in g.segments]
    seg_count = [g.count for g in groups for _ in g.segments]
    counts = np.asarray(seg_count, dtype=np.int64)
    # one row per (query token, segment): token i of a group is at position + i
    rep = lambda x: np.repeat(np.asarray(x, dtype=np.int64), counts)  # noqa: E731
    i = np.arange(int(counts.sum())) - rep(np.cumsum(counts) - counts)
    delta = rep(seg_pos) + i - rep(seg_off)
    limit = np.minimum(rep(seg_len), delta + 1)
    keep = limit > 0
    tok, item, delta, limit = (rep(seg_start) + i)[keep], rep(seg_item)[keep], delta[keep], limit[keep]
    n_items = max(1, len(tables))
    kmax = np.zeros(n_items, dtype=np.int64)
    np.maximum.at(kmax, item, limit)
    if callable(chunk):
        chunk = chunk(int(kmax.sum()))
    chunks = -(-kmax // chunk)  # units per item
    first_unit = np.cumsum(chunks) - chunks
    units = int(chunks.sum())
    # every pair reads chunks 0..ceil(limit / chunk) - 1 of its item: one expanded pair each
    reps = -(-limit // chunk)
    src = np.repeat(np.arange(len(tok)), reps)
    j = np.arange(len(src)) - np.repeat(np.cumsum(reps) - reps, reps)
    unit = first_unit[item[src]] + j
    order = np.argsort(unit, kind="stable")  # grouped by unit, tokens in order inside
    src, unit = src[order], unit[order]
    npairs = np.bincount(unit, minlength=units)
    unit_item = np.repeat(np.arange(n_items), chunks)
    kstart = (np.arange(units) - first_unit[unit_item]) * chunk
    pair_tok = tok[src]
    by_tok = np.argsort(pair_tok, kind="stable")
    width = max(1, max((len(t) for t in tables), default=1))
    table = np.zeros((n_items, width), dtype=np.int32)
    for row, pages in enumerate(tables):
        table[row, : len(pages)] = _pages(pages)
    per_tok = np.bincount(pair_tok, minlength=num_tokens)
    i32 = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
    return {
        "tables": table,
        "unit_item": i32(unit_item), "unit_kstart": i32(kstart),
        "unit_kend": i32(np.minimum(kstart + chunk, kmax[unit_item])),
        "unit_pair": i32(np.cumsum(npairs) - npairs), "unit_npairs": i32(npairs),
        "pair_tok": i32(pair_tok), "pair_delta": i32(delta[src]), "pair_limit": i32(limit[src]),
        "tok_start": i32(np.concatenate([[0], np.cumsum(per_tok)])), "tok_parts": i32(by_tok),
        "num_tokens": num_tokens, "max_pairs": int(npairs.max(initial=0)), "max_parts": int(per_tok.max(initial=0)),
        "chunk": chunk,
    }


def plan_attention(groups: list[QueryGroup], num_tokens: int, chunk: int | Callable[[int], int],
                   device: torch.device) -> AttentionPlan:
    """A plan of exactly the pass's size, on `device` (one host-to-device copy)."""
    host = build_plan(groups, num_tokens, chunk)
    flat = [host["tables"].reshape(-1)] + [host[f] for f in FIELDS]
    packed = torch.from_numpy(np.concatenate(flat))
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    parts = packed.split([len(x) for x in flat])
    return AttentionPlan(parts[0].view(host["tables"].shape), *parts[1:], host["num_tokens"],
                         host["max_pairs"], host["max_parts"])


class StaticPlan:
    """Device buffers of fixed size (`PlanCaps`) refilled every pass: what a graph reads.

    `load` writes a pass's plan into a pinned host mirror and copies it over in one
    asynchronous copy; nothing waits for the device. Two mirrors take turns, so a plan
    staged for the next pass while the current one runs never overwrites host memory an
    earlier copy may still be reading (each step's sync retires all copies before it)."""

    def __init__(self, caps: PlanCaps, device: torch.device) -> None:
        self.caps = caps
        sizes = caps.sizes()
        total = sum(sizes.values())
        self.hosts = [torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda") for _ in range(2)]
        self.turn = 0
        self.device_buf = torch.zeros(total, dtype=torch.int32, device=device)
        cuts = np.cumsum(list(sizes.values()))[:-1]
        self._host_views = [dict(zip(sizes, np.split(h.numpy(), cuts))) for h in self.hosts]
        views = dict(zip(sizes, self.device_buf.split(list(sizes.values()))))
        self.plan = AttentionPlan(views["tables"].view(caps.items, caps.pages), *(views[f] for f in FIELDS),
                                  caps.tokens, caps.tokens, caps.units)

    def fits(self, host: dict) -> bool:
        t = host["tables"]
        return (host["num_tokens"] == self.caps.tokens and t.shape[0] <= self.caps.items
                and t.shape[1] <= self.caps.pages and len(host["unit_item"]) <= self.caps.units)

    def load(self, host: dict) -> None:
        """Copy a pass's plan (from `build_plan`) into the buffers; padding units get no pairs."""
        self.turn ^= 1
        hv = self._host_views[self.turn]
        table = hv["tables"].reshape(self.caps.items, self.caps.pages)
        t = host["tables"]
        table[: t.shape[0], : t.shape[1]] = t
        for f in FIELDS:
            n = len(host[f])
            hv[f][:n] = host[f]
            hv[f][n:] = 0
        self.device_buf.copy_(self.hosts[self.turn], non_blocking=True)
