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
from .sharing import shared_runs

FIELDS = ("unit_item", "unit_kstart", "unit_kend", "unit_pair", "unit_npairs",
          "pair_tok", "pair_delta", "pair_limit", "pair_part", "tok_start")


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
    pair_part: torch.Tensor  # int32 [pairs] the pair's partial row: rows grouped by token
    tok_start: torch.Tensor  # int32 [T + 1] each token's partial rows are [start, next start)
    num_tokens: int
    max_pairs: int  # the most pairs in one unit (sets the row-tile grid)
    max_parts: int  # the most partials of one token (sets the merge tile)
    pair_cos: torch.Tensor | None = None  # fp32 [pairs, head_dim / 2] set by the backend per pass
    pair_sin: torch.Tensor | None = None
    # (first unit, units, most pairs of one) per class of units read by about as many pairs, in
    # order; None: one class (a static plan, whose pair counts are unknown on the host)
    classes: list[tuple[int, int, int]] | None = None
    chunk: int = 0  # keys per unit (most units; 0: not known)


@dataclass(frozen=True)
class PlanCaps:
    """Fixed sizes of a plan's arrays: what one captured graph can serve."""

    tokens: int
    items: int
    pages: int  # pages of the longest block
    units: int
    # the most pairs of one unit (the readers of one block: a session's workers, or every
    # session sharing a prompt); None: tokens. Sizes the captured row tiles, so a batch of
    # many small sessions does not compute tiles as wide as all of its tokens
    unit_pairs: int | None = None

    @property
    def most_pairs(self) -> int:
        return min(self.tokens, self.unit_pairs or self.tokens)

    @property
    def pairs(self) -> int:
        return self.units * self.tokens  # a token reads each unit at most once

    def sizes(self) -> dict[str, int]:
        u, p = self.units, self.pairs
        return {"tables": self.items * self.pages, "unit_item": u, "unit_kstart": u, "unit_kend": u,
                "unit_pair": u, "unit_npairs": u, "pair_tok": p, "pair_delta": p, "pair_limit": p,
                "pair_part": p, "tok_start": self.tokens + 1}


def _pages(pages) -> np.ndarray:
    if isinstance(pages, torch.Tensor):
        pages = pages.cpu().numpy()
    return np.asarray(pages, dtype=np.int32)


# Merging pages that several sessions share into items of their own pays when it saves at least
# this share of the keys a pass reads and this many keys (an eager pass then runs the wider units
# in a launch of their own): measured on an H200 by benchmarks/shared_prompts.py, where the passes
# that met both ran 0.97-1.57x the speed of reading per session (1.14-1.57x from 16 sessions on)
# and the others would have run 0.72-0.97x.
WORTH_MERGING = (0.5, 8192)


def build_plan(groups: list[QueryGroup], num_tokens: int, chunk: int | Callable[[int, int, int], int],
               page_size: int | None = None, worth: tuple[float, int] = (0.0, 0),
               longest_first: bool = True) -> dict:
    """The plan's arrays (numpy int32), sizes, and whether the pass is batched (no block that
    every query token reads). chunk: the keys per unit, or a function that picks it from the
    total keys to read (each block counted once), the most query tokens that read one block
    and the pass's query tokens. page_size: the pool's; given, stretches where blocks of
    different ids hold the same pages (shared prompts, forks) are read once for all of them too
    (see `sharing`), where that saves at least `worth` (a share of the keys read and a number of
    keys). longest_first: the units ordered by their keys, most first (see `_longest_first`);
    False: item by item, each item's chunks in order."""
    segs = [seg for g in groups for seg in g.segments]
    keys = [seg.block if seg.block is not None else ("segment", id(seg)) for seg in segs]
    block_pages = dict(zip(keys, (seg.pages for seg in segs)))  # one page table per block
    index = {k: i for i, k in enumerate(block_pages)}
    seg_block = np.asarray([index[k] for k in keys], dtype=np.int64)
    # per segment: its group's position - its offset, its length, its group's first row and count
    fields = np.asarray([x for g in groups for s in g.segments for x in (g.position - s.offset, s.length, g.start,
                                                                          g.count)], dtype=np.int64).reshape(-1, 4)
    used = np.zeros(len(index), dtype=np.int64)  # the most keys any segment of a block shows
    np.maximum.at(used, seg_block, fields[:, 1])
    items = _items([_pages(p) for p in block_pages.values()], used, page_size, worth)
    # one row per (segment, piece of its block), then one per query token of the segment's group
    seg_rows = items.pieces[seg_block]
    row_seg = np.repeat(np.arange(len(segs)), seg_rows)
    piece = np.arange(len(row_seg)) - np.repeat(np.cumsum(seg_rows) - seg_rows, seg_rows)
    piece += items.first_piece[seg_block[row_seg]]
    rel, length, first_row, counts = fields[row_seg].T
    rep = lambda x: np.repeat(x, counts)  # noqa: E731
    # token i of a group is at position + i; a row of piece [base, end) sees keys [base, limit)
    i = np.arange(int(counts.sum())) - rep(np.cumsum(counts) - counts)
    delta = rep(rel) + i
    limit = np.minimum(np.minimum(rep(length), delta + 1), rep(items.piece_end[piece]))
    keep = limit > rep(items.piece_base[piece])
    tok = (rep(first_row) + i)[keep]
    item, delta, limit = rep(items.piece_item[piece])[keep], delta[keep], limit[keep]
    # items nobody reads (a block whose every visible page is in runs) are dropped
    kmax = items.base.copy()
    np.maximum.at(kmax, item, limit)
    read = kmax > items.base
    renumber = np.cumsum(read) - 1
    item, base, kmax = renumber[item], items.base[read], kmax[read]
    kept_tables = [t for t, r in zip(items.tables, read.tolist()) if r]
    n_items = max(1, len(kept_tables))
    if not kept_tables:
        base = kmax = np.zeros(1, dtype=np.int64)
    span = kmax - base
    readers, tokens = int(np.bincount(item, minlength=n_items).max(initial=0)), sum(g.count for g in groups)
    if callable(chunk):  # by the keys to read, the most query tokens reading one block, and the query tokens
        chunk = chunk(int(span.sum()), readers, tokens)
    chunks = -(-span // chunk)  # units per item
    first_unit = np.cumsum(chunks) - chunks
    units = int(chunks.sum())
    # every pair reads chunks 0..ceil((limit - base) / chunk) - 1 of its item: one expanded pair each
    reps = -(-(limit - base[item]) // chunk)
    src = np.repeat(np.arange(len(tok)), reps)
    j = np.arange(len(src)) - np.repeat(np.cumsum(reps) - reps, reps)
    unit = first_unit[item[src]] + j
    order = np.argsort(unit, kind="stable")  # grouped by unit, tokens in order inside
    src, unit = src[order], unit[order]
    npairs = np.bincount(unit, minlength=units)
    unit_item = np.repeat(np.arange(n_items), chunks)
    kstart = base[unit_item] + (np.arange(units) - first_unit[unit_item]) * chunk
    pair_tok = tok[src]
    # partial rows grouped by token, so that the merge reads each token's rows as one run
    pair_part = np.empty(len(pair_tok), dtype=np.int64)
    pair_part[np.argsort(pair_tok, kind="stable")] = np.arange(len(pair_tok))
    width = max(1, max((len(t) for t in kept_tables), default=1))
    table = np.zeros((n_items, width), dtype=np.int32)
    for row, pages in enumerate(kept_tables):
        table[row, : len(pages)] = pages
    per_tok = np.bincount(pair_tok, minlength=num_tokens)
    i32 = lambda x: np.asarray(x, dtype=np.int32)  # noqa: E731
    host = {
        "tables": table,
        "unit_item": i32(unit_item), "unit_kstart": i32(kstart),
        "unit_kend": i32(np.minimum(kstart + chunk, kmax[unit_item])),
        "unit_pair": i32(np.cumsum(npairs) - npairs), "unit_npairs": i32(npairs),
        "pair_tok": i32(pair_tok), "pair_delta": i32(delta[src]), "pair_limit": i32(limit[src]),
        "pair_part": i32(pair_part), "tok_start": i32(np.concatenate([[0], np.cumsum(per_tok)])),
        "num_tokens": num_tokens, "max_pairs": int(npairs.max(initial=0)), "max_parts": int(per_tok.max(initial=0)),
        "chunk": chunk,
        "batched": 0 < readers < tokens,  # no block that every query token reads: several sessions
    }
    if longest_first:
        _longest_first(host)
    return host


UNIT_FIELDS = ("unit_item", "unit_kstart", "unit_kend", "unit_pair", "unit_npairs")


def _reorder_units(host: dict, order: np.ndarray) -> None:
    """Move the units (their fields) into this order; the pairs keep their places, so each unit
    still reads its own run of pairs and every partial row, hence every output, is unchanged."""
    for f in UNIT_FIELDS:
        host[f] = host[f][order]


def _longest_first(host: dict) -> None:
    """Order the units by their keys, longest first (ties as they were). Where a pass has more
    programs than the SMs hold at once, the programs started last end the kernel; items come
    block by block, so in a pass of many sessions each session's prompt (its long unit) would
    start only after the short units (the workers' steps) of every session before it."""
    _reorder_units(host, np.argsort(host["unit_kstart"] - host["unit_kend"], kind="stable"))


@dataclass
class _Items:
    """The plan's items and how each block's keys split over them (pieces, in key indexes)."""

    tables: list[np.ndarray]  # each item's page table
    base: np.ndarray  # each item's first key
    pieces: np.ndarray  # pieces per block
    first_piece: np.ndarray  # each block's first piece
    piece_item: np.ndarray
    piece_base: np.ndarray  # the piece covers keys [base, end) of its block
    piece_end: np.ndarray


_NO_END = np.iinfo(np.int32).max


def _items(tables: list[np.ndarray], used: np.ndarray, page_size: int | None, worth: tuple[float, int]) -> _Items:
    """One item per block, or, where blocks share leading pages (the page size known) and merging
    them saves `worth`, one item per shared run plus each block's remaining keys."""
    n = len(tables)
    runs, own = shared_runs([(t, -(-k // page_size)) for t, k in zip(tables, used)]) if page_size else ([], [0] * n)
    saved = sum((len(r.readers) - 1) * (r.stop - r.first) for r in runs) * (page_size or 0)
    if runs and (saved < worth[1] or saved < worth[0] * int(used.sum())):
        runs, own = [], [0] * n
    if not runs:
        ones, zeros = np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        return _Items(tables, zeros, ones, np.arange(n), np.arange(n), zeros, np.full(n, _NO_END))
    # a piece for each (run, reader), then each block's own rest; grouped by block
    reader = np.concatenate([np.asarray(run.readers, dtype=np.int64) for run in runs])
    run_of = np.repeat(np.arange(len(runs)), [len(run.readers) for run in runs])
    first, stop = (np.asarray(col, dtype=np.int64) * page_size for col in zip(*((r.first, r.stop) for r in runs)))
    own_base = np.asarray(own, dtype=np.int64) * page_size
    block = np.concatenate([reader, np.arange(n)])
    order = np.argsort(block, kind="stable")
    pieces = np.bincount(block, minlength=n)
    return _Items(tables + [tables[run.readers[0]] for run in runs], np.concatenate([own_base, first]),
                  pieces, np.cumsum(pieces) - pieces, np.concatenate([n + run_of, np.arange(n)])[order],
                  np.concatenate([first[run_of], own_base])[order],
                  np.concatenate([stop[run_of], np.full(n, _NO_END)])[order])


ALIGN = 4  # int32s: every array of a packed plan starts on a 16-byte boundary


def aligned_offsets(lengths: list[int]) -> tuple[list[int], int]:
    """Where each of these int32 arrays starts in one packed buffer, each on a 16-byte boundary,
    and the buffer's length. Triton specialises a kernel on whether each pointer is 16-byte
    aligned: arrays packed back to back would start wherever the lengths before them end, so
    nearly every new pass shape would compile the kernels again (about a second on a GPU)."""
    offsets, total = [], 0
    for n in lengths:
        offsets.append(total)
        total += -(-n // ALIGN) * ALIGN
    return offsets, total


def plan_attention(groups: list[QueryGroup], num_tokens: int, chunk: int | Callable[[int, int, int], int],
                   device: torch.device, page_size: int | None = None,
                   worth: tuple[float, int] = WORTH_MERGING, longest_first: bool = True) -> AttentionPlan:
    """A plan of exactly the pass's size, on `device` (one host-to-device copy). Its units are
    sorted by how many pairs read them, so that each class gets a row tile of its size (see
    `_sort_by_readers`), longest first within a class; worth, longest_first: see `build_plan`."""
    host = build_plan(groups, num_tokens, chunk, page_size, worth, longest_first)
    classes = _sort_by_readers(host)
    flat = [host["tables"].reshape(-1)] + [host[f] for f in FIELDS]
    offsets, total = aligned_offsets([len(x) for x in flat])
    buf = np.zeros(total, dtype=np.int32)
    for off, x in zip(offsets, flat):
        buf[off : off + len(x)] = x
    packed = torch.from_numpy(buf)
    if device.type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    parts = [packed[off : off + len(x)] for off, x in zip(offsets, flat)]
    return AttentionPlan(parts[0].view(host["tables"].shape), *parts[1:], host["num_tokens"],
                         host["max_pairs"], host["max_parts"], classes=classes, chunk=int(host["chunk"]))


def _sort_by_readers(host: dict) -> list[tuple[int, int, int]]:
    """Order the units by their pairs (power-of-two classes, fewest first) and return each
    class's (first unit, units, most pairs): a unit of a prompt that 32 sessions share and a
    worker's own block read by 4 then each get a row tile of their size, instead of every unit
    the widest one's (pairs keep their places; only the units move)."""
    npairs = host["unit_npairs"].astype(np.int64)
    if len(npairs) == 0:
        return []
    width = np.left_shift(1, np.ceil(np.log2(np.maximum(npairs, 1))).astype(np.int64))
    order = np.argsort(width, kind="stable")
    _reorder_units(host, order)
    width, npairs = width[order], npairs[order]
    starts = np.flatnonzero(np.concatenate([[True], width[1:] != width[:-1]]))
    ends = np.concatenate([starts[1:], [len(width)]])
    return [(int(a), int(b - a), int(npairs[a:b].max())) for a, b in zip(starts, ends)]


class CopyFence:
    """When pinned host memory given to an asynchronous host-to-device copy may be written
    again: `wait` returns once the last copy marked from it has run. A pass may be launched
    before the previous one's samples are read, so its inputs' copy can still be queued when
    the host lays out the next pass in the same memory; usually it has run by then and
    `wait` returns at once. No-op off CUDA (copies there are synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.event = torch.cuda.Event() if device.type == "cuda" else None
        self.marked = False

    def wait(self) -> None:
        if self.marked:
            self.event.synchronize()

    def mark(self) -> None:
        """After queueing the copies that read the memory (on the current stream)."""
        if self.event is not None:
            self.event.record()
            self.marked = True


class StaticPlan:
    """Device buffers of fixed size (`PlanCaps`) refilled every pass: what a graph reads.

    `load` writes a pass's plan into a pinned host mirror and copies it over in one
    asynchronous copy; nothing waits for the device. Two mirrors take turns, so a plan
    staged for the next pass while the current one runs does not wait for an earlier copy
    that may still be reading the other; each mirror's fence makes sure of it."""

    def __init__(self, caps: PlanCaps, device: torch.device) -> None:
        self.caps = caps
        sizes = caps.sizes()
        offsets, total = aligned_offsets(list(sizes.values()))
        spans = [(name, off, off + n) for (name, n), off in zip(sizes.items(), offsets)]
        self.hosts = [torch.zeros(total, dtype=torch.int32, pin_memory=device.type == "cuda") for _ in range(2)]
        self.fences = [CopyFence(device) for _ in self.hosts]
        self.turn = 0
        self.device_buf = torch.zeros(total, dtype=torch.int32, device=device)
        self._host_views = [{name: h.numpy()[a:b] for name, a, b in spans} for h in self.hosts]
        views = {name: self.device_buf[a:b] for name, a, b in spans}
        self.plan = AttentionPlan(views["tables"].view(caps.items, caps.pages), *(views[f] for f in FIELDS),
                                  caps.tokens, caps.most_pairs, caps.units)

    def fits(self, host: dict) -> bool:
        t = host["tables"]
        return (host["num_tokens"] == self.caps.tokens and t.shape[0] <= self.caps.items
                and t.shape[1] <= self.caps.pages and len(host["unit_item"]) <= self.caps.units
                and host["max_pairs"] <= self.caps.most_pairs)

    def load(self, host: dict) -> None:
        """Copy a pass's plan (from `build_plan`) into the buffers; padding units get no pairs."""
        self.turn ^= 1
        self.fences[self.turn].wait()
        hv = self._host_views[self.turn]
        table = hv["tables"].reshape(self.caps.items, self.caps.pages)
        t = host["tables"]
        table[: t.shape[0], : t.shape[1]] = t
        for f in FIELDS:
            n = len(host[f])
            hv[f][:n] = host[f]
            hv[f][n:] = 0
        self.device_buf.copy_(self.hosts[self.turn], non_blocking=True)
        self.fences[self.turn].mark()
        self.plan.chunk = int(host["chunk"])  # what a capture picks its key tile by
