"""Matrix products with few rows (a decode pass: one row per worker), at memory speed.

A decode pass multiplies a handful of rows by every weight matrix once, so each product
is bound by reading the weight. cuBLAS picks kernels tuned for large products and reads
the smaller projections (attention's QKV and output) well below the bandwidth. Here each
program streams a strip of BLOCK_N weight rows through shared memory (several loads in
flight) and multiplies all the pass's rows against it with the tensor cores, accumulating in
fp32 and rounding once, as cuBLAS does; the weights are read exactly once. Passes of several
sessions (17 to WIDE_ROWS rows) take a row tile of 32, 64 or 128 and wider strips; at those rows
cuBLAS is often as fast (benchmarks/skinny_gemm.py), so the engine times both at start.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .fused import inv_rms, rms_scaled
from .pdl import chain_start, launch, prefetch_l2

MAX_ROWS = 16  # one tensor-core tile of rows: a pass of up to this many workers
# passes of several sessions (17 to WIDE_ROWS rows) take a row tile of 32, 64 or 128 (row_tile); the
# engine puts them on this kernel only where a launch shape of WIDE_CANDIDATES beat cuBLAS at start
WIDE_ROWS = 128
# (BLOCK_N, BLOCK_K, num_warps, num_stages): few strips per SM, each with ~64 KB in flight. The
# engine times CANDIDATES at start; benchmarks/skinny_gemm.py sweeps all of CONFIGS.
CANDIDATES = [(32, 256, 4, 4), (32, 512, 4, 3), (64, 256, 4, 3)]
CONFIGS = CANDIDATES + [(16, 512, 4, 4), (16, 256, 4, 6)]
# wide row tiles: shorter K steps, so that the stages fit in shared memory, and strips up to 64 wide
# (every strip re-reads the rows from the L2 cache): the fastest at 32-128 rows on an H100 (skinny_gemm)
WIDE_CANDIDATES = [(32, 128, 4, 4), (64, 128, 8, 3), (64, 64, 4, 3)]
WIDE_CONFIGS = WIDE_CANDIDATES + [(64, 64, 4, 4), (128, 64, 8, 2), (32, 64, 4, 4)]
LONG_K = 8192  # rows longer than this take 512-wide K steps when no launch shape was timed (pick)


@triton.jit
def _normed_rows(x_ptrs, d_ptrs, nw_ptrs, inv, mask, HAS_DELTA: tl.constexpr):
    """A tile of (x + delta)'s RMSNorm times the norm's weight, as fused.add_rms_norm rounds it."""
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_DELTA:
        x = (x.to(tl.float32) + tl.load(d_ptrs, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
    return rms_scaled(x, inv[:, None], nw_ptrs, mask).to(x.dtype)


@triton.jit
def _skinny_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_om, K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, CHAINED: tl.constexpr, PREFETCH: tl.constexpr,
                   d_ptr=None, nw_ptr=None, sum_ptr=None, eps=0.0, NORM_ROWS: tl.constexpr = 0,
                   KP: tl.constexpr = 1, HAS_DELTA: tl.constexpr = False, GLU: tl.constexpr = False,
                   WIDE_OFFSETS: tl.constexpr = False, next_ptr=None, next_n=0, next_stride=0, next_per=0,
                   NEXT_LINES: tl.constexpr = 0, NEXT_ROWS: tl.constexpr = 1):
    """CHAINED: a programmatic dependent (pdl.py); while the kernel before it runs, the strip's
    first PREFETCH 128-byte lines of each row are requested into the L2 cache (weights: no
    kernel writes them). NORM_ROWS > 0 (M <= NORM_ROWS): the input is the RMSNorm of x
    (+ delta, the residual stream's new sum, which the first program stores at sum_ptr) times
    the norm's weight, each row's statistic taken over the whole row (KP wide) as
    fused.add_rms_norm takes it. GLU: the weight is [gate; up] (2N rows), each program
    multiplies a strip of both and stores SiLU(gate) * up, N wide (the MLP's activation in
    the gate/up product's epilogue). WIDE_OFFSETS: weights of 2**31 elements or more, whose row
    offsets take 64 bits. NEXT_LINES > 0: once its loads are done, each program asks the L2
    cache for the first NEXT_LINES 128-byte lines of each row of its share (next_per rows,
    NEXT_ROWS at a time) of the next product's weight (next_n rows), so that the memory stays
    busy across the boundary between the two products."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    wn = rn.to(tl.int64) if WIDE_OFFSETS else rn  # a weight row's index, for its offset
    if PREFETCH > 0:
        line = tl.arange(0, PREFETCH) * (1024 // w_ptr.dtype.element_ty.primitive_bitwidth)  # elements a line
        prefetch_l2(w_ptr + tl.minimum(wn, N - 1)[:, None] * stride_wn + line[None, :])
        if GLU:
            prefetch_l2(w_ptr + (N + tl.minimum(wn, N - 1))[:, None] * stride_wn + line[None, :])
    chain_start(CHAINED)
    rm = tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_K)
    n_ok = rn < N
    m_ok = rm < M
    w_ptrs = w_ptr + wn[:, None] * stride_wn + rk[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
    inv = tl.zeros([BLOCK_M], dtype=tl.float32)
    if NORM_ROWS > 0:
        d_ptrs = d_ptr + rm[:, None] * stride_xm + rk[None, :]
        nw_ptrs = nw_ptr + rk[None, :]
        row = tl.arange(0, KP)
        for r in tl.static_range(NORM_ROWS):
            ok = (row < K) & (r < M)
            xr = tl.load(x_ptr + r * stride_xm + row, mask=ok, other=0.0)
            if HAS_DELTA:
                xr = (xr.to(tl.float32) + tl.load(d_ptr + r * stride_xm + row, mask=ok, other=0.0).to(tl.float32)
                      ).to(xr.dtype)
                if pid == 0:
                    tl.store(sum_ptr + r * stride_xm + row, xr, mask=ok)
            inv = tl.where(rm == r, inv_rms(xr, K, eps), inv)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, mask=n_ok[:, None], other=0.0)
            if GLU:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=n_ok[:, None], other=0.0)
            if NORM_ROWS > 0:
                x = _normed_rows(x_ptrs, d_ptrs, nw_ptrs, inv, m_ok[:, None], HAS_DELTA)
            else:
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
        else:
            k_ok = (k0 + rk) < K
            w = tl.load(w_ptrs, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if GLU:
                w_up = tl.load(w_ptrs + N * stride_wn, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM_ROWS > 0:
                x = _normed_rows(x_ptrs, d_ptrs, nw_ptrs, inv, m_ok[:, None] & k_ok[None, :], HAS_DELTA)
            else:
                x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w))
        if GLU:
            up += tl.dot(x, tl.trans(w_up))
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
        if NORM_ROWS > 0:
            d_ptrs += BLOCK_K
            nw_ptrs += BLOCK_K
    if NEXT_LINES > 0:
        end = tl.minimum((pid + 1) * next_per, next_n)
        line = tl.arange(0, NEXT_LINES) * (1024 // next_ptr.dtype.element_ty.primitive_bitwidth)
        for r0 in range(pid * next_per, end, NEXT_ROWS):
            rows = tl.minimum(r0 + tl.arange(0, NEXT_ROWS), end - 1).to(tl.int64)
            prefetch_l2(next_ptr + rows[:, None] * next_stride + line[None, :])
    ty = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GLU:
            up += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GLU:  # rounded where the product's output and fused.silu_mul round
        g = acc.to(ty).to(tl.float32)
        acc = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32) * up.to(ty).to(tl.float32)
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(ty), mask=m_ok[:, None] & n_ok[None, :])


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Half-precision rows (the tensor cores' inputs) of at most WIDE_ROWS, contiguous weights."""
    return (x.dim() == 2 and 0 < x.shape[0] <= WIDE_ROWS and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.is_contiguous() and x.stride(-1) == 1
            and x.shape[1] == weight.shape[-1])


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: tuple[int, int, int, int] | None = None, chained: bool = False,
                  glu: bool = False, prefetch: int = 0, next_weight: torch.Tensor | None = None,
                  next_bytes: int = 0) -> torch.Tensor:
    """F.linear(x, weight, bias) for x of at most WIDE_ROWS rows: [M, K] @ [N, K]^T -> [M, N].
    chained: launched as a programmatic dependent of the kernel before it (pdl.py). glu: the
    weight is [gate; up] (N even) and the result fused.silu_mul of the product, [M, N / 2].
    prefetch: bytes of each weight row a chained launch asks the L2 cache for before its wait
    (0: PREFETCH_BYTES; under 128: none). next_weight, next_bytes: the weight of the chain's
    next product, of whose rows a chained launch asks the L2 cache for the first next_bytes
    (rounded down to a power of two of 128-byte lines; 0: none) as its programs end."""
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"rows of width {x.shape[1]} for a weight of width {weight.shape[1]}")
    if not 0 < x.shape[0] <= WIDE_ROWS:
        raise ValueError(f"skinny_linear multiplies 1 to {WIDE_ROWS} rows, got {x.shape[0]}: "
                         f"use torch.nn.functional.linear for more")
    return _product(x, weight, bias, config, chained, glu, prefetch, next_weight, next_bytes)


NORM_ROWS = 4  # a product takes the norm before it in its loads for passes of up to this many rows


def normed_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Rows for skinny_norm_linear: at most NORM_ROWS, contiguous (x and delta alike)."""
    return supported(x, weight) and x.shape[0] <= NORM_ROWS and x.is_contiguous()


def skinny_norm_linear(x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                       weight: torch.Tensor, bias: torch.Tensor | None = None,
                       config: tuple[int, int, int, int] | None = None, chained: bool = False, glu: bool = False,
                       prefetch: int = 0, next_weight: torch.Tensor | None = None, next_bytes: int = 0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(h, weight, bias), total) for (total, h) = fused.add_rms_norm(x, delta,
    norm_weight, eps), in one launch (the residual stream's norm taken by the
    product that reads it; passes of at most NORM_ROWS rows). glu, prefetch, next_weight,
    next_bytes: as skinny_linear's."""
    k = x.shape[-1]
    if not normed_supported(x, weight) or (delta is not None and (delta.shape != x.shape or not delta.is_contiguous())):
        raise ValueError(f"skinny_norm_linear takes at most {NORM_ROWS} contiguous half-precision rows of the "
                         f"weight's width, and a delta of their shape; got x {tuple(x.shape)}")
    total = x if delta is None else torch.empty_like(x)
    out = _product(x, weight, bias, config, chained, glu, prefetch, next_weight, next_bytes,
                   d_ptr=x if delta is None else delta,
                   nw_ptr=norm_weight, sum_ptr=total, eps=eps, NORM_ROWS=NORM_ROWS, KP=triton.next_power_of_2(k),
                   HAS_DELTA=delta is not None)
    return out, total


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             config: tuple[int, int, int, int] | None, chained: bool, glu: bool, prefetch: int,
             next_weight: torch.Tensor | None = None, next_bytes: int = 0, **prologue) -> torch.Tensor:
    """Launches _skinny_kernel over the output's strips; prologue: the input's own arguments."""
    m, k, n = x.shape[0], weight.shape[1], weight.shape[0]
    if prefetch < 0 or next_bytes < 0:
        raise ValueError(f"prefetch and next_bytes take a count of bytes, 0 or more; got {prefetch}, {next_bytes}")
    if glu and n % 2:
        raise ValueError(f"glu takes a [gate; up] weight of an even row count; got {n} rows")
    block_n, block_k, warps, stages = config or pick(n, k, glu, m)
    out_n = n // 2 if glu else n
    out = torch.empty(m, out_n, dtype=x.dtype, device=x.device)
    programs = triton.cdiv(out_n, block_n)
    ahead = next_prefetch(next_weight, next_bytes, programs) if chained and next_weight is not None else {}
    _skinny_kernel[(programs,)](
        x, weight, bias if bias is not None else weight, out, m, out_n, x.stride(0), weight.stride(0), out.stride(0),
        K=k, BLOCK_M=row_tile(m), BLOCK_N=block_n, BLOCK_K=block_k, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        CHAINED=chained, PREFETCH=prefetch_lines(k, weight.element_size(), prefetch) if chained else 0, GLU=glu,
        WIDE_OFFSETS=n * weight.stride(0) >= 2**31, num_warps=warps, num_stages=stages, **prologue, **ahead,
        **launch(chained))
    return out


NEXT_POINTERS = 1024  # lines a program asks for at once of the next weight (a tile of pointers it holds)


def next_prefetch(weight: torch.Tensor, nbytes: int, programs: int) -> dict:
    """_skinny_kernel's arguments for asking the L2 cache, over `programs` programs, for the
    first nbytes (lines, as prefetch_lines rounds them) of each of weight's rows; {} for none."""
    if weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"next_weight takes a 2-d weight of contiguous rows; got shape {tuple(weight.shape)}")
    lines = prefetch_lines(weight.shape[1], weight.element_size(), nbytes) if nbytes else 0
    if not lines:
        return {}
    per, rows = next_split(weight.shape[0], programs, lines)
    return {"next_ptr": weight, "next_n": weight.shape[0], "next_stride": weight.stride(0), "next_per": per,
            "NEXT_LINES": lines, "NEXT_ROWS": rows}


def next_split(rows: int, programs: int, lines: int) -> tuple[int, int]:
    """(rows each program takes, rows it asks for at once): shares as even as the count allows,
    taken NEXT_POINTERS lines (at least one row) at a time."""
    per = -(-rows // programs)
    at_once = 1 << (max(1, min(per, NEXT_POINTERS // lines)).bit_length() - 1)
    return per, at_once


# of each weight row, requested while the kernel before runs (chained). On an H200 a decode pass
# of Qwen3-8B took 0.97-0.98x the GPU time with 512 bytes as with 2048 at 1 and 16 workers, the
# same at 32 sessions x 4 (decode_profile --prefetch default,all=512, twice); 256 and 1024 were
# faster than 2048 too (128 at one worker only), and whole rows (8 KB for the output projection) slower
PREFETCH_BYTES = 512


def prefetch_lines(k: int, element_size: int, nbytes: int = 0) -> int:
    """128-byte lines of a row to prefetch (nbytes, or PREFETCH_BYTES): a power of two, within
    the row."""
    lines = min(nbytes or PREFETCH_BYTES, k * element_size) // 128
    return 1 << (lines.bit_length() - 1) if lines else 0


def row_tile(rows: int) -> int:
    """The rows a program multiplies at once: MAX_ROWS, or the power of two above `rows`."""
    return max(MAX_ROWS, triton.next_power_of_2(rows))


def pick(n: int, k: int, glu: bool = False, rows: int = 1) -> tuple[int, int, int, int]:
    """A launch shape for an [n, k] weight when none was measured: strips of 32 rows (64 for
    the LM head's long vocab), 256-wide K steps, four loads in flight (best or near it for
    every Qwen3-8B weight on an H200, benchmarks/skinny_gemm.py); rows longer than LONG_K
    (the MLP's down projection) in 512-wide steps, three in flight: the fastest of
    skinny.CONFIGS for it in a chained pass (benchmarks/product_chain.py --sweep, H100). glu
    (two strips a step): three loads in flight, within 2% of four alone (skinny_gemm's
    gate_up+act rows, H100) with a quarter less shared memory a program. Wide row tiles (more
    than MAX_ROWS rows): the first of WIDE_CANDIDATES; for glu (two accumulators) 64-row strips
    with eight warps (four spill registers on an A100), the fastest of skinny_gemm's gate_up+act
    at 128 rows on an H100."""
    if rows > MAX_ROWS:
        return (64, 64, 8, 3) if glu else WIDE_CANDIDATES[0]
    if glu:
        return (32, 256, 4, 3)
    if n > 65536:
        return (64, 256, 4, 3)
    return (32, 512, 4, 3) if k > LONG_K else (32, 256, 4, 4)


FEW_ROWS = 4  # passes of up to this many rows are timed as one row, larger ones as their row tile
BUCKETS = (1, MAX_ROWS, 32, 64, WIDE_ROWS)  # the row counts choose times


def bucket(rows: int) -> int:
    """The row count a pass of `rows` is timed as (one of BUCKETS)."""
    return 1 if rows <= FEW_ROWS else row_tile(rows)


def by_shape(layers, extra: tuple[torch.Tensor, ...] = (), copies: int = 4
             ) -> dict[tuple[int, int], list[torch.Tensor]]:
    """Each weight shape of `layers` (each an iterable of a layer's product weights), with up to
    `copies` layers' weights of it, then `extra`'s shapes (the LM head) where new: what choose
    times (several copies, so that they are read from memory rather than the L2 cache)."""
    out: dict[tuple[int, int], list[torch.Tensor]] = {}
    for weights in layers:
        for w in weights:
            same = out.setdefault(tuple(w.shape), [])
            if len(same) < copies:
                same.append(w)
    for w in extra:
        out.setdefault(tuple(w.shape), [w])
    return out


def choose(weights: dict[tuple[int, int], list[torch.Tensor]], repeats: int = 3
           ) -> dict[tuple[int, int, int], tuple[int, int, int, int] | None]:
    """For each weight shape [n, k] and row bucket (BUCKETS): the fastest of
    cuBLAS (None) and each launch shape in CANDIDATES (WIDE_CANDIDATES for wide row tiles), timed
    on this GPU with CUDA events over that shape's weights in turn (several layers' copies: read
    from memory, not the L2 cache). Once per engine, before any graph is captured; cuBLAS wins
    where it is as fast, so nothing gets slower; a launch shape the GPU cannot hold (its shared
    memory) is left out."""
    import torch.nn.functional as F

    out: dict[tuple[int, int, int], tuple[int, int, int, int] | None] = {}
    for (n, k), ws in weights.items():
        for rows in BUCKETS:
            x = torch.randn(rows, k, dtype=ws[0].dtype, device=ws[0].device)
            runs = {None: lambda w: F.linear(x, w)}
            runs.update({c: (lambda w, c=c: skinny_linear(x, w, config=c))
                         for c in (CANDIDATES if rows <= MAX_ROWS else WIDE_CANDIDATES)})
            best = {c: t for c, fn in runs.items() if (t := _seconds(fn, ws, repeats)) is not None}
            fastest = min(best, key=lambda c: best[c])
            out[(n, k, rows)] = fastest if best[fastest] < 0.97 * best[None] else None
    return out


def _seconds(fn, ws: list[torch.Tensor], repeats: int) -> float | None:
    """fn's time over ws, best of repeats; None where its kernel does not fit this GPU."""
    try:
        for w in ws:
            fn(w)  # compiles on first use
    except OutOfResources:
        return None
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(2):
            for w in ws:
                fn(w)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return min(times)
