"""Attention backends: the torch reference and Triton, behind one small interface.

`prepare` runs once per forward pass (shared by all layers); `append` stores a layer's
new K/V (keys rotated at block-local positions); `attend` runs the RoPE-shifted
attention of every worker over its view of that layer's pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .reference import QueryGroup
from .rope import apply_rope, rope_cos_sin


@dataclass
class PassMeta:
    groups: list[QueryGroup]
    slots: torch.Tensor  # [T] pool slots of the new tokens
    key_positions: torch.Tensor  # [T] their block-local positions
    extra: Any = None  # backend-specific: cos/sin tables or the Triton plan


def _at(pool: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of slots (page * page_size + token) into a pool [pages, page_size, heads, dim],
    whichever way its pages are laid out in memory."""
    return slots // pool.shape[1], slots % pool.shape[1]


def _pool_strides(k_pool: torch.Tensor, v_pool: torch.Tensor) -> tuple[int, int, int]:
    """(page, token, head) strides of K and V pools laid out alike, head dim contiguous."""
    if k_pool.stride(3) != 1:
        raise ValueError(f"the K/V pool's head dim must be contiguous, got strides {k_pool.stride()}")
    if v_pool.stride() != k_pool.stride():
        raise ValueError("the K and V pools must share one memory layout")
    return k_pool.stride(0), k_pool.stride(1), k_pool.stride(2)


class TorchAttention:
    """The engine's path without a GPU: exact, vectorized per worker (the one-query workers
    of a pass, the common decode step of many sessions, all in one attention per layer).

    Equivalent to `concurrent_attention_reference` (the query rotated per block) by
    R(a) R(b) = R(a + b): here each gathered key is moved by its block's offset and the
    query by its view position, so one attention per worker replaces one per block.
    """

    name = "torch"

    def __init__(self, inv_freq: torch.Tensor, rope_scale: float, sm_scale: float) -> None:
        self.inv_freq, self.rope_scale, self.sm_scale = inv_freq, rope_scale, sm_scale

    def prepare(self, groups: list[QueryGroup], slots: torch.Tensor, key_positions: torch.Tensor,
                plan=None, page_size: int | None = None) -> PassMeta:
        extra = {"append": rope_cos_sin(key_positions, self.inv_freq, self.rope_scale), "views": None}
        return PassMeta(groups, slots, key_positions, extra)

    def append(self, k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: PassMeta) -> None:
        cos, sin = meta.extra["append"]
        k_pool[_at(k_pool, meta.slots)] = apply_rope(k, cos, sin).to(k_pool.dtype)
        v_pool[_at(v_pool, meta.slots)] = v.to(v_pool.dtype)

    def _views(self, groups: list[QueryGroup], page_size: int, device: torch.device) -> dict:
        """Once per pass: the decode groups (one query each) side by side, padded to the longest
        view, and per other group its key slots, key and query rotations and causal mask."""
        steps = torch.arange(page_size, device=device)

        def keys(g: QueryGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """The view's key slots, each key's block offset, and its view position."""
            slots, offsets, local = [], [], []
            for seg in g.segments:
                if seg.length:
                    pages = torch.as_tensor(seg.pages, dtype=torch.int64, device=device)
                    slots.append((pages[:, None] * page_size + steps).flatten()[: seg.length])
                    offsets.append(torch.full((seg.length,), seg.offset, dtype=torch.int64, device=device))
                    local.append(torch.arange(seg.length, device=device))
            offset = torch.cat(offsets)
            return torch.cat(slots), offset, offset + torch.cat(local)

        decode = [g for g in groups if g.count == 1]
        out: dict = {"decode": None, "others": []}
        if decode:
            per = [keys(g) for g in decode]
            width = max(len(slot) for slot, _, _ in per)
            slot = torch.zeros(len(decode), width, dtype=torch.int64, device=device)
            offset = torch.zeros(len(decode), width, dtype=torch.int64, device=device)
            valid = torch.zeros(len(decode), width, dtype=torch.bool, device=device)
            for i, (sl, off, _) in enumerate(per):
                slot[i, : len(sl)], offset[i, : len(sl)], valid[i, : len(sl)] = sl, off, True
            rows = torch.as_tensor([g.start for g in decode], dtype=torch.int64, device=device)
            qpos = torch.as_tensor([g.position for g in decode], dtype=torch.int64, device=device)
            out["decode"] = (rows, slot.flatten(), *rope_cos_sin(offset.flatten(), self.inv_freq),
                             *rope_cos_sin(qpos, self.inv_freq, self.rope_scale), valid)
        for g in groups:
            if g.count == 1:
                continue
            slot, offset, kpos = keys(g)
            qpos = g.position + torch.arange(g.count, device=device)
            out["others"].append((g, slot, *rope_cos_sin(offset, self.inv_freq),
                                  *rope_cos_sin(qpos, self.inv_freq, self.rope_scale), kpos[None, :] > qpos[:, None]))
        return out

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: PassMeta) -> torch.Tensor:
        if meta.extra["views"] is None:
            meta.extra["views"] = self._views(meta.groups, k_pool.shape[1], q.device)
        views = meta.extra["views"]
        out = torch.zeros_like(q)
        t, hq, d = q.shape
        hkv = k_pool.shape[2]
        if views["decode"] is not None:  # every one-query worker at once: no causal mask, only padding
            rows, slot, kcos, ksin, qcos, qsin, valid = views["decode"]
            n, width = valid.shape
            k = apply_rope(k_pool[_at(k_pool, slot)].to(torch.float32), kcos, ksin).view(n, width, hkv, d)
            v = v_pool[_at(v_pool, slot)].to(torch.float32).view(n, width, hkv, d)
            qr = apply_rope(q[rows].to(torch.float32), qcos, qsin).view(n, hkv, hq // hkv, d)
            s = torch.einsum("gkrd,glkd->gkrl", qr, k) * self.sm_scale
            p = torch.softmax(s.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
            out[rows] = torch.einsum("gkrl,glkd->gkrd", p, v).reshape(n, hq, d).to(q.dtype)
        for g, slot, kcos, ksin, qcos, qsin, hidden in views["others"]:
            k = apply_rope(k_pool[_at(k_pool, slot)].to(torch.float32), kcos, ksin)  # keys moved by block offset
            v = v_pool[_at(v_pool, slot)].to(torch.float32)
            qr = apply_rope(q[g.start : g.start + g.count].to(torch.float32), qcos, qsin)
            qr = qr.view(g.count, hkv, hq // hkv, d)
            s = torch.einsum("nkrd,lkd->krnl", qr, k) * self.sm_scale
            p = torch.softmax(s.masked_fill(hidden, float("-inf")), dim=-1)
            o = torch.einsum("krnl,lkd->nkrd", p, v).reshape(g.count, hq, d)
            out[g.start : g.start + g.count] = o.to(q.dtype)
        return out


SHARED_READS = ("auto", "always", "never")  # TritonAttention.shared_reads
# the merge as a programmatic dependent pays for passes of a few query tokens: on an H200,
# 1-4 workers 1.02-1.12x; 8 workers 0.95-1.07x, 16 workers over a 1k view 0.92x (wide merge grids)
PDL_MAX_TOKENS = 4
# the partial kernel's software pipeline: with Triton 3.6 two and three stages both keep one K/V
# tile in flight per program (three stage the page ids through shared memory), and two took
# 0.89-1.04x three's time on an H200 (attention_kernels --variants); five (two tiles in flight,
# 72 KB of shared memory a program) took 0.93-1.38x, slower at short views. Four warps for every
# row tile: eight (for 128 rows) took 1.03-1.15x their time with 16 workers of 5 query heads each
PARTIAL_STAGES = 2
# tiles of at most PIPELINED_ROWS rows, in kernels chained as a decode pass chains them, look their
# pages up a tile ahead with PIPELINED_STAGES stages (TritonAttention.pipelined): on an H100, chained,
# 1-4 workers of Qwen3-8B took 0.91-0.94x the time at 4k, 0.95-0.97x at 16k, 0.99-1.00x at 64k (long
# tiles, which keep their loop) and 1.04-1.07x at 1k (one tile a unit); wider tiles 0.98-1.01x, and
# unchained, 20-32-row tiles up to 1.32x. One stream's decode step 0.983x at 4k, 0.977x at 16k
PIPELINED_ROWS, PIPELINED_STAGES = 16, 3
# keys of its unit whose K and V a chained partial program asks the L2 cache for while the kernel
# before it (the K/V append) still runs: its first tile
PREFETCH_KEYS = 64
# row tiles of this many rows or more are bound by their matrix and softmax work more than by
# memory: their programs ask the L2 cache for the K/V tile PREFETCH_AHEAD tiles ahead of the one
# they read (on an H100, 16 workers over 16k-64k views 0.91-0.99x the time, over 4k 1.01-1.02x;
# narrower tiles gained nothing, one worker over 16k 1.07x slower, two tiles ahead slower everywhere)
AHEAD_ROWS, PREFETCH_AHEAD = 64, 1
# a pass whose units would be at most SHORT_KEYS keys long with `programs_per_sm` programs an SM
# per KV head (views up to 16k) is cut for SHORT_PROGRAMS_PER_SM instead, unless its units are
# read by WIDE_ROWS rows or more: on an H100 three rather than two took 0.89-1.00x the kernel's
# time at 8k-16k (1-16 workers), 1.02-1.05x at 32k-64k, where units are 1024-2048 keys; in the
# decode pass 0.99x at 16k with 8 workers, but 1.02x with 16 workers at 4k (wide rows: 192-key
# units rather than 256) and 1.00x at 16k
SHORT_KEYS, SHORT_PROGRAMS_PER_SM = 512, 3
# a pass of several sessions (each block read by only some of its query tokens) whose units would be
# longer than SHORT_KEYS is cut for BATCHED_PROGRAMS_PER_SM: on an H100, 32 sessions x 4 workers over
# 4k views took 0.983x the GPU time with four rather than two (two rounds, 14.83-14.84 against
# 15.07-15.11 ms; 4k-key units become 2k) and 8 x 4 over 8k 0.981x (2k-key units become 1k): a
# third 128-key-tile program fits an SM's shared memory, and the sessions' many units fill the waves
BATCHED_PROGRAMS_PER_SM = 4
# units read by this many query rows (readers x query heads per KV head) or more are made up to
# WIDE_KEYS keys long (see TritonAttention.chunk_rule)
WIDE_ROWS, WIDE_KEYS = 40, 256


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def row_tiles(rows: int, block_m: int) -> tuple[int, int]:
    """See TritonAttention.row_tiles: (block_m, 0), or (block_m / 2, a power of two >= 16) that
    hold `rows` in fewer rows than block_m, for tiles of 128 rows or more (a first tile of fewer
    than 64 rows multiplies from registers, which the two tiles' products then overflow)."""
    half = block_m // 2
    if half < 64 or not half < rows <= block_m:
        return block_m, 0
    second = max(16, _next_pow2(rows - half))
    return (half, second) if half + second < block_m else (block_m, 0)


class TritonAttention:
    """Triton kernels: each block's K/V read once per step for every worker that sees it."""

    name = "triton"

    def __init__(self, inv_freq: torch.Tensor, rope_scale: float, sm_scale: float, chunk: int | None = None,
                 block_n: int | None = None, block_m: int | None = None, kv_heads: int = 8,
                 num_warps: int | None = None, num_stages: int | None = None, programs_per_sm: int = 2,
                 short_programs_per_sm: int = SHORT_PROGRAMS_PER_SM,
                 batched_programs_per_sm: int = BATCHED_PROGRAMS_PER_SM,
                 partial_dtype: torch.dtype | None = None, pdl: bool | None = None, q_per_kv: int = 1,
                 wide_units: bool = True, long_unit: int = 512, prefetch_ahead: int = PREFETCH_AHEAD,
                 tma_pages: bool = False, pages_ahead: bool | None = None, heads_first: bool = True,
                 split_rows: bool = True, longest_first: bool = True) -> None:
        self.inv_freq = inv_freq.to(torch.float32).contiguous()
        self.rope_scale, self.sm_scale, self.kv_heads = rope_scale, sm_scale, kv_heads
        interpret = self.interpret = os.environ.get("TRITON_INTERPRET") == "1"
        self.chunk = chunk  # None: sized per pass so that every SM gets work
        self.programs_per_sm, self.partial_dtype = programs_per_sm, partial_dtype
        self.short_programs_per_sm = short_programs_per_sm  # where units are short (see SHORT_KEYS)
        self.batched_programs_per_sm = batched_programs_per_sm  # passes of several sessions (see chunk_rule)
        # query heads per KV head: a unit's rows are its readers times this (see chunk_rule)
        self.q_per_kv, self.wide_units = q_per_kv, wide_units
        self._sms: int | None = None
        # the merge launched as a programmatic dependent of the partials (Hopper and later):
        # wherever the device supports it (pdl.py), unless False
        self.pdl = pdl
        # every kernel launched as a programmatic dependent of the one before (pdl.py): set by a
        # decoder that chains its layers' kernels
        self.chained = False
        # keys of its unit a chained partial program asks the L2 cache for before its wait (a power of two)
        self.prefetch_keys = PREFETCH_KEYS
        knobs = {"num_warps": num_warps, "num_stages": num_stages}
        # knobs given override the per-launch defaults (attend) one by one
        self.launch = {} if interpret else {k: v for k, v in knobs.items() if v is not None}
        self.block_n = block_n or (16 if interpret else 64)
        # long units (a long view over few readers) stream faster in tiles twice as long: on an
        # H200, 1-8 workers over a 64k view 1.12-1.16x, and units of 512 keys (16k views) of 1-4
        # workers 0.92-0.94x the time with them (attention_kernels --variants); shorter units
        # (256 keys: 0.98-1.22x) and wide row tiles are slower with them, so only those
        self.long_block_n, self.long_unit = (None if block_n or interpret else 128), long_unit
        self.block_m = block_m or (16 if interpret else None)  # None: sized to the readers per pass
        # pages several sessions share, read once per pass: "auto" where it pays (plan.WORTH_MERGING),
        # "always", or "never" (once per session)
        self.shared_reads = "auto"
        # programs of row tiles of AHEAD_ROWS rows or more ask the L2 cache for the tile this many
        # tiles ahead of the one they read (0: none)
        self.prefetch_ahead = prefetch_ahead
        # the tiles every row sees whole read a page at a time through tensor descriptors (TMA),
        # where the pools allow it (see page_descriptors)
        self.tma_pages = tma_pages
        # the tiles every row sees whole look their pages up one tile ahead (not with tma_pages):
        # compiled for sm_90, the kernel's K/V loads otherwise wait on the page lookup of their own
        # tile, so the compiler keeps no copy in flight across tiles whatever num_stages says
        # (one K/V tile of shared memory, every cp.async wait a wait for all); with this and
        # three stages the next tile's copies stay in flight (tests/gpu_compile.py). True or False
        # for every launch; None: where it paid (see pipelined)
        self.pages_ahead = pages_ahead
        # the order the GPU starts the partial programs in: every unit's KV heads one after
        # another (the plan's first units start first for every head; see longest_first), or
        # each head's units before the next head's (False). Where a pass has more programs than
        # the SMs hold at once, the programs started last end the kernel: on an H100 the old order
        # took 1.10-1.19x the time with 16 workers at 16k, 1.08-1.15x at 64k, 1.00-1.09x with 8
        self.heads_first = heads_first
        # the plan's units ordered longest first (plan._longest_first), or item by item (False)
        self.longest_first = longest_first
        # rows just past a power of two in two row tiles over each K/V tile (row_tiles), or in one
        self.split_rows = split_rows

    @property
    def prefetch_keys(self) -> int:
        return self._prefetch_keys

    @prefetch_keys.setter
    def prefetch_keys(self, keys: int) -> None:
        """0 (none) or a power of two: the prefetch is one block of the program's key range."""
        if not isinstance(keys, int) or keys < 0 or keys & (keys - 1):
            raise ValueError(f"prefetch_keys takes 0 or a power of two (the keys a partial program asks the L2 "
                             f"cache for before its wait), got {keys!r}")
        self._prefetch_keys = keys

    def prepare(self, groups: list[QueryGroup], slots: torch.Tensor, key_positions: torch.Tensor,
                plan=None, page_size: int | None = None) -> PassMeta:
        """plan: a prebuilt (static) plan, as a captured CUDA graph reads; None: built here.
        page_size: the pool's, so that blocks sharing pages (prompts, forks) are read once."""
        from .plan import WORTH_MERGING, plan_attention

        if plan is None:
            if self.shared_reads not in SHARED_READS:
                raise ValueError(f"shared_reads must be one of {', '.join(SHARED_READS)}, got {self.shared_reads!r}")
            worth = {"auto": WORTH_MERGING, "always": (0.0, 0)}.get(self.shared_reads)
            plan = plan_attention(groups, int(slots.numel()), self.chunk_rule(slots.device), slots.device,
                                  page_size if worth else None, worth or (0.0, 0), self.longest_first)
        # every rotation of this pass, once for all layers: readers by (position - block offset),
        # new keys by their block-local position (fp32, as the reference computes them)
        plan.pair_cos, plan.pair_sin = self._cos_sin(plan.pair_delta)
        key_cos, key_sin = self._cos_sin(key_positions.to(slots.device))
        return PassMeta(groups, slots.contiguous(), key_positions, (plan, key_cos, key_sin))

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, head_dim / 2] fp32 cos/sin with the rope attention factor."""
        ang = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return (ang.cos() * self.rope_scale).contiguous(), (ang.sin() * self.rope_scale).contiguous()

    def units_for(self, device: torch.device, per_sm: int) -> int:
        """Units per pass that give every SM `per_sm` programs over the KV heads (8 SMs off CUDA)."""
        if device.type != "cuda":
            return max(1, -(-per_sm * 8 // self.kv_heads))
        if self._sms is None:
            self._sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, -(-per_sm * self._sms // self.kv_heads))

    def target_units(self, device: torch.device, batched: bool = True) -> int:
        """The most units the chunk rule cuts a pass into, but for one more per block: what a
        captured graph allots. batched False: a pass with a block that every query token reads
        (one session), which the rule for several sessions leaves alone (build_plan's "batched")."""
        per_sm = max(self.programs_per_sm, self.short_programs_per_sm)
        return self.units_for(device, max(per_sm, self.batched_programs_per_sm) if batched else per_sm)

    def chunk_rule(self, device: torch.device, capped: bool = True):
        """Keys per unit as a function of the pass's total keys and the most readers (query
        tokens) of one block: long blocks are split so that every SM gets work. Units read by
        WIDE_ROWS query rows or more are made up to WIDE_KEYS keys long, half as many as the
        SMs would take (a wide row tile over a short unit spends more on its partial rows and
        their merge than on keys; on an H200 at 4k views, 40-80 rows a unit, 256 keys rather
        than 128 took 0.88-0.89x the time, while with 32 rows or fewer, or at 32k views where
        units are long anyway, longer units were slower). Passes whose units would be at most
        SHORT_KEYS keys long are cut for `short_programs_per_sm` programs an SM rather than
        `programs_per_sm`, unless wide rows read them; longer ones of a pass of several sessions
        (`tokens`, the pass's query tokens, more than `readers`: no block is read by all of them)
        for `batched_programs_per_sm`, unless wide rows read them. Uncapped, a pass never has more
        than target_units + blocks units (what a captured graph allots)."""
        if self.chunk is not None:
            return self.chunk
        base = self.units_for(device, self.programs_per_sm)
        short = self.target_units(device, batched=False)
        batched = self.units_for(device, self.batched_programs_per_sm)

        def chunk(total: int, readers: int = 0, tokens: int = 0) -> int:
            wide = self.wide_units and readers * self.q_per_kv >= WIDE_ROWS
            if wide:
                target = base
            elif -(-total // base) <= SHORT_KEYS:
                target = short
            else:
                target = batched if 0 < readers < tokens else base
            half = max(1, -(-target // 2))
            per_unit = -(-total // target)
            if wide:
                per_unit = max(per_unit, min(WIDE_KEYS, -(-total // half)))
            size = max(self.block_n, -(-per_unit // self.block_n) * self.block_n)
            return min(2048, size) if capped else size

        return chunk

    def append(self, k_pool: torch.Tensor, v_pool: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: PassMeta) -> None:
        from .pdl import launch as pdl_launch
        from .triton_attention import _kv_append_kernel

        t, h, d = k.shape
        strides = _pool_strides(k_pool, v_pool)
        _, key_cos, key_sin = meta.extra
        _kv_append_kernel[(t, h)](
            k, v, key_cos, key_sin, meta.slots, k_pool, v_pool,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1), *strides,
            PAGE=k_pool.shape[1], HALF=d // 2, HALFP=max(16, _next_pow2(d // 2)), CHAINED=self.chained,
            **pdl_launch(self.chained),
        )

    def append_normed(self, k_pool: torch.Tensor, v_pool: torch.Tensor, qkv: torch.Tensor, q_weight: torch.Tensor,
                      k_weight: torch.Tensor, eps: float, q_heads: int, meta: PassMeta) -> torch.Tensor:
        """Qwen3's per-head q and k RMSNorms folded into `append`, one launch for what takes two
        (fused.qk_rms_norm, then append; q bit for bit, the keys within an ulp): from a fused QKV
        output [T, (Hq + 2 Hkv) * D], the keys normed, rotated and stored with the values;
        returns q normed [T, Hq, D]."""
        from .pdl import launch as pdl_launch
        from .triton_attention import _qk_norm_kv_append_kernel

        t = qkv.shape[0]
        d = q_weight.shape[0]
        kv_heads = (qkv.shape[1] // d - q_heads) // 2
        if qkv.stride(1) != 1 or kv_heads < 1 or qkv.shape[1] != (q_heads + 2 * kv_heads) * d or q_heads % kv_heads:
            raise ValueError(f"expected contiguous QKV rows of ({q_heads} + 2 x KV heads) x {d}, "
                             f"got {tuple(qkv.shape)}")
        q = torch.empty(t, q_heads, d, dtype=qkv.dtype, device=qkv.device)
        _, key_cos, key_sin = meta.extra
        _qk_norm_kv_append_kernel[(t, kv_heads)](
            qkv, q, q_weight, k_weight, key_cos, key_sin, meta.slots, k_pool, v_pool,
            qkv.stride(0), q.stride(0), q.stride(1), *_pool_strides(k_pool, v_pool), eps,
            Q_HEADS=q_heads, KV_HEADS=kv_heads, REP=q_heads // kv_heads, D=d, DP=_next_pow2(d),
            PAGE=k_pool.shape[1], HALF=d // 2, HALFP=max(16, _next_pow2(d // 2)), CHAINED=self.chained,
            **pdl_launch(self.chained),
        )
        return q

    def attend(self, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: PassMeta) -> torch.Tensor:
        from .pdl import launch as pdl_launch
        from .triton_attention import LOG2E, _merge_partials_kernel, _rope_shift_partial_kernel

        plan = meta.extra[0]
        t, hq, d = q.shape
        hkv = k_pool.shape[2]
        rep = hq // hkv
        out = torch.empty_like(q)  # the merge writes every row (zeros where a token sees nothing)
        npairs = int(plan.pair_tok.numel())
        if npairs == 0:
            return out.zero_()
        strides = _pool_strides(k_pool, v_pool)
        pdl = self._pdl(q.device) and t <= PDL_MAX_TOKENS
        # whole pages by descriptors: only where every unit starts on a page (its keys a multiple of the tile's)
        page = k_pool.shape[1]
        aligned = self.block_n % page == 0 and (self.chunk is None or self.chunk % page == 0)
        descs = self.page_descriptors(k_pool, v_pool) if self.tma_pages and aligned else None
        # partials in the input's precision (as vLLM's paged attention v2); fp32 inputs stay exact
        o_part = torch.empty((npairs, hq, d), dtype=self.partial_dtype or q.dtype, device=q.device)
        lse_part = torch.empty((npairs, hq), dtype=torch.float32, device=q.device)
        for unit0, units, max_pairs, block_m in self._launches(plan, rep):
            # pack every reader of a unit into one row tile when it fits, so K/V is read once;
            # rows just past a power of two in two tiles that read it once (row_tiles)
            first, second = (block_m, 0) if descs is not None else self.row_tiles(max_pairs * rep, block_m)
            block_r = max(1, (first + second) // rep)
            long = self.long_keys(plan.chunk) and block_m <= 32
            # (a descriptor tile's loop prefetches nothing into the L2 cache, nor looks pages up ahead)
            pages_ahead = descs is None and self.pipelined(block_m, long)
            stages = PIPELINED_STAGES if pages_ahead else PARTIAL_STAGES
            launch = {"num_warps": 4, "num_stages": stages, **self.launch}
            block_n = self.long_block_n if long else self.block_n
            grid = (units * hkv, 1) if self.heads_first else (units, hkv)
            _rope_shift_partial_kernel[(*grid, -(-max_pairs // block_r))](
                q, k_pool, v_pool, *(descs or (k_pool, v_pool)),
                plan.unit_item, plan.unit_kstart, plan.unit_kend, plan.unit_pair, plan.unit_npairs,
                plan.pair_tok, plan.pair_cos, plan.pair_sin, plan.pair_limit, plan.pair_part, plan.tables,
                o_part, lse_part, unit0,
                q.stride(0), q.stride(1), *strides, plan.tables.stride(0),
                o_part.stride(0), o_part.stride(1), lse_part.stride(0),
                float(self.sm_scale * LOG2E),
                PAGE=k_pool.shape[1], REP=rep, BLOCK_R=block_r, BLOCK_M=first, BLOCK_M2=second,
                HALF=d // 2, HALFP=max(16, _next_pow2(d // 2)), BLOCK_N=page if descs else block_n,
                IEEE=q.dtype == torch.float32, LOOP_WHILE=self.interpret, PDL=pdl, CHAINED=self.chained,
                PREFETCH_KEYS=self.prefetch_keys if self.chained else 0,
                KV_LINES=_next_pow2(-(-d * k_pool.element_size() // 128)),
                AHEAD=0 if pages_ahead else self.tiles_ahead(block_m), TMA=descs is not None, PAGES_AHEAD=pages_ahead,
                KV_HEADS=hkv, HEADS_FIRST=self.heads_first,
                **launch, **pdl_launch(self.chained),
            )
        _merge_partials_kernel[(t, hq)](
            o_part, lse_part, plan.tok_start, out,
            o_part.stride(0), o_part.stride(1), lse_part.stride(0), out.stride(0), out.stride(1),
            D=d, DP=_next_pow2(d), P_BLOCK=min(64, max(2, _next_pow2(plan.max_parts))), PDL=pdl or self.chained,
            CHAINED=self.chained, **pdl_launch(pdl or self.chained),
        )
        return out

    @staticmethod
    def page_descriptors(k_pool: torch.Tensor, v_pool: torch.Tensor):
        """Tensor descriptors of a page's run of one KV head's half head dim in each pool (rows
        [slot, kv_head x head dim]), or None where they cannot serve: pages not token-major and
        contiguous, fewer than 16 tokens a page, or a half head dim that is not a power of two
        of at least 16 elements."""
        from triton.tools.tensor_descriptor import TensorDescriptor

        pages, page, hkv, d = k_pool.shape
        half = d // 2
        fits = page >= 16 and not page & (page - 1) and half >= 16 and not half & (half - 1) and d == 2 * half
        if not (fits and k_pool.is_contiguous() and v_pool.is_contiguous() and v_pool.shape == k_pool.shape):
            return None
        return tuple(TensorDescriptor.from_tensor(pool.view(pages * page, hkv * d), [page, half])
                     for pool in (k_pool, v_pool))

    def pipelined(self, block_m: int, long: bool) -> bool:
        """Whether a launch of block_m-row tiles looks its pages up a tile ahead (with
        PIPELINED_STAGES stages unless num_stages is given): as pages_ahead says, or where it
        paid: narrow tiles (PIPELINED_ROWS) of 64 keys in chained kernels, as a decode pass on
        Hopper launches them. Either way the output is the same, bit for bit."""
        if self.pages_ahead is not None:
            return bool(self.pages_ahead)
        return self.chained and block_m <= PIPELINED_ROWS and not long

    def row_tiles(self, rows: int, block_m: int) -> tuple[int, int]:
        """(rows of the first tile, rows of a second, 0 for none) for units read by `rows` query
        rows in tiles of block_m: where the rows overflow half a tile of 128 or more by little,
        that half and the next power of two of the rest (at least 16), which read each K/V tile
        once as the whole tile would (80 rows: 64 + 16 rather than 128; 96: 64 + 32); otherwise
        the one tile. split_rows False: always the one tile."""
        return row_tiles(rows, block_m) if self.split_rows else (block_m, 0)

    def tiles_ahead(self, block_m: int) -> int:
        """Tiles ahead of the one it reads that a program of row tiles of block_m rows asks the
        L2 cache for: wide tiles only (AHEAD_ROWS), and none under the interpreter (no prefetch there)."""
        return self.prefetch_ahead if block_m >= AHEAD_ROWS and not self.interpret else 0

    def long_keys(self, chunk: int) -> bool:
        """Whether units of `chunk` keys are read in the longer key tile. A captured graph keeps
        the tile it was captured with, so the graphs are keyed by this too."""
        return self.long_block_n is not None and chunk >= self.long_unit

    def _pdl(self, device: torch.device) -> bool:
        """Programmatic dependent launch of the merge: where the device supports it (pdl.py),
        unless turned off."""
        from . import pdl

        return pdl.supported(device) and self.pdl is not False


    def _block_m(self, pairs: int, rep: int) -> int:
        """Rows of a tile: every reader of a unit (x its query heads) when that fits in 128."""
        return max(self.block_m or min(128, max(16, _next_pow2(pairs * rep))), _next_pow2(rep))

    def _launches(self, plan, rep: int) -> list[tuple[int, int, int, int]]:
        """(first unit, units, most pairs of one, tile rows) per kernel launch: one per class of
        units that gets its own tile size, neighbouring classes of one size in one launch."""
        classes = plan.classes if plan.classes is not None else [(0, int(plan.unit_item.numel()), plan.max_pairs)]
        out: list[list[int]] = []
        for unit0, units, max_pairs in classes:
            block_m = self._block_m(max_pairs, rep)
            if out and out[-1][3] == block_m:
                out[-1][1] += units
                out[-1][2] = max(out[-1][2], max_pairs)
            else:
                out.append([unit0, units, max_pairs, block_m])
        return [tuple(x) for x in out if x[1]]


def make_attention(kind: str, device: torch.device, inv_freq: torch.Tensor, rope_scale: float, sm_scale: float,
                   kv_heads: int = 8, q_per_kv: int = 1):
    """'auto' picks Triton on CUDA devices and the torch reference elsewhere."""
    if kind == "auto":
        kind = "triton" if device.type == "cuda" else "torch"
    if kind == "triton":
        return TritonAttention(inv_freq.to(device), rope_scale, sm_scale, kv_heads=kv_heads, q_per_kv=q_per_kv)
    return TorchAttention(inv_freq.to(device), rope_scale, sm_scale)
