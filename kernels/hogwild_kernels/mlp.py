"""A decode pass's MLP block in one launch: gate/up, SiLU(gate) * up and down, with a barrier
across the grid between the two products.

Between two kernels the device drains one grid and ramps up the next: on an H100 a boundary
between two chained skinny products costs ~5 µs (benchmarks/product_chain.py), where the
weights' bytes alone take 63 µs (gate/up) and 31 µs (down) for Qwen3-8B. Here every program
is resident at once (no more programs than the GPU holds together), computes its share of the
activation, asks the L2 cache for the first lines of its share of the down weight (no kernel
writes weights, so this needs no wait), meets the others at a barrier, then multiplies the
whole activation by its strips of the down weight. The memory keeps reading across what was
the boundary.

The rounding is the unfused pass's: the gate and up products rounded to the input's dtype,
SiLU(gate) rounded, times up rounded once (fused.silu_mul), and the down product summed in
fp32 over K steps as skinny's kernel sums it and rounded once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import chain_start, launch, prefetch_l2
from .skinny import prefetch_lines

MAX_ROWS = 16  # one tensor-core tile of rows
# (BLOCK_F features of the activation a tile, BLOCK_K, BLOCK_N down rows a tile, BLOCK_KD,
#  num_warps, num_stages)
CONFIG = (32, 256, 32, 512, 4, 3)
PREFETCH_DOWN = 2048  # bytes of each of its down rows a program asks for before the barrier
# programs an SM that one launch may have: CONFIG's 96 KB of shared memory lets two share an SM, so
# that every program is resident at once (more, and the barrier waits for programs never started)
PER_SM = 2
BOTH, GATE_UP, DOWN = 3, 1, 2  # the phases a launch runs (both: with the barrier between)


@triton.jit
def _grid_barrier(sync_ptr, programs):
    """No program leaves before every one of the grid's `programs` has arrived; the writes each
    made before it are visible to all after it. sync_ptr: [arrivals, generation] (int32),
    arrivals left at 0, so that the next launch (a CUDA graph's replay) finds it as this one
    did."""
    _fence()  # each thread's stores of the program's share ordered before its arrival
    tl.debug_barrier()
    generation = tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu")
    arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == programs - 1:
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_add(sync_ptr + 1, 1, sem="release", scope="gpu")
    else:
        while tl.atomic_add(sync_ptr + 1, 0, sem="acquire", scope="gpu") == generation:
            pass
    tl.debug_barrier()
    _fence()  # and every thread's loads after it


@triton.jit
def _fence():
    """A memory fence of the GPU's scope, on every thread (the atomics above run on one)."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_down(wd_ptr, pid, H: tl.constexpr, INTER: tl.constexpr, BLOCK_N: tl.constexpr, LINES: tl.constexpr):
    """The first LINES lines of each row of the program's first down tile, asked of the L2 cache."""
    rn = tl.minimum(pid * BLOCK_N + tl.arange(0, BLOCK_N), H - 1)
    line = tl.arange(0, LINES) * (1024 // wd_ptr.dtype.element_ty.primitive_bitwidth)
    prefetch_l2(wd_ptr + rn[:, None] * INTER + line[None, :])


@triton.jit
def _glu_down_kernel(x_ptr, wgu_ptr, wd_ptr, act_ptr, out_ptr, sync_ptr, M, stride_xm, stride_am, stride_om,
                     programs,
                     H: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KD: tl.constexpr, PHASES: tl.constexpr,
                     CHAINED: tl.constexpr, PREFETCH: tl.constexpr, PREFETCH_GU: tl.constexpr):
    """x [M, H] times [gate; up] ([2 INTER, H]) -> act = SiLU(gate) * up [M, INTER] (stored at
    act_ptr), then act times down ([H, INTER]) -> out [M, H]. Tiles of BLOCK_F features and of
    BLOCK_N output columns are dealt to the grid's `programs` in turn. PHASES: BOTH (the
    barrier between), or GATE_UP or DOWN alone (two launches: the interpreter, which runs
    programs one at a time, and the unfused comparison). PREFETCH: lines of each of its first
    down tile's rows a program asks the L2 cache for before the barrier (BOTH) or before its
    wait for the previous kernel (DOWN); PREFETCH_GU: lines of each of its first gate and up
    rows, before that wait (as a chained skinny product does: no kernel writes weights)."""
    pid = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    if PHASES % 2 == 1 and PREFETCH_GU > 0:
        rf = tl.minimum(pid * BLOCK_F + tl.arange(0, BLOCK_F), INTER - 1)
        line = tl.arange(0, PREFETCH_GU) * (1024 // wgu_ptr.dtype.element_ty.primitive_bitwidth)
        prefetch_l2(wgu_ptr + rf[:, None] * H + line[None, :])
        prefetch_l2(wgu_ptr + (INTER + rf)[:, None] * H + line[None, :])
    if PHASES == 2 and PREFETCH > 0:  # DOWN alone
        _prefetch_down(wd_ptr, pid, H, INTER, BLOCK_N, PREFETCH)
    chain_start(CHAINED)
    ty = out_ptr.dtype.element_ty
    if PHASES % 2 == 1:
        rk = tl.arange(0, BLOCK_K)
        t = pid
        while t < INTER // BLOCK_F:
            rf = t * BLOCK_F + tl.arange(0, BLOCK_F)
            w_ptrs = wgu_ptr + rf[:, None] * H + rk[None, :]
            x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
            gate = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
            up = tl.zeros((BLOCK_M, BLOCK_F), dtype=tl.float32)
            for k0 in range(0, H, BLOCK_K):
                x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
                gate += tl.dot(x, tl.trans(tl.load(w_ptrs)))
                up += tl.dot(x, tl.trans(tl.load(w_ptrs + INTER * H)))
                w_ptrs += BLOCK_K
                x_ptrs += BLOCK_K
            g = gate.to(ty).to(tl.float32)  # rounded where the product's output and fused.silu_mul round
            act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32) * up.to(ty).to(tl.float32)
            tl.store(act_ptr + rm[:, None] * stride_am + rf[None, :], act.to(ty), mask=m_ok[:, None])
            t += programs
    if PHASES == 3:
        if PREFETCH > 0:
            _prefetch_down(wd_ptr, pid, H, INTER, BLOCK_N, PREFETCH)
        _grid_barrier(sync_ptr, programs)
    if PHASES >= 2:
        rkd = tl.arange(0, BLOCK_KD)
        t = pid
        while t < H // BLOCK_N:
            rn = t * BLOCK_N + tl.arange(0, BLOCK_N)
            w_ptrs = wd_ptr + rn[:, None] * INTER + rkd[None, :]
            a_ptrs = act_ptr + rm[:, None] * stride_am + rkd[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, INTER, BLOCK_KD):
                a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0, cache_modifier=".cg")  # other programs' writes
                acc += tl.dot(a, tl.trans(tl.load(w_ptrs)))
                w_ptrs += BLOCK_KD
                a_ptrs += BLOCK_KD
            tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(ty), mask=m_ok[:, None])
            t += programs


_SYNC: dict[torch.device, torch.Tensor] = {}


def _sync(device: torch.device) -> torch.Tensor:
    """The device's barrier words ([arrivals, generation]): one pair, each launch leaves the
    arrivals at 0 (launches on one stream, one after another, as a pass's are)."""
    if device not in _SYNC:
        _SYNC[device] = torch.zeros(2, dtype=torch.int32, device=device)
    return _SYNC[device]


def resident_programs(device: torch.device) -> int:
    """Programs of one launch that the GPU holds at once for sure: one an SM."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def fits(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
         config: tuple[int, int, int, int, int, int] | None = None) -> bool:
    """Whether glu_down takes these: 1 to MAX_ROWS half-precision rows of contiguous
    elements, contiguous weights of their dtype, shapes the launch shape's tiles divide."""
    block_f, block_k, block_n, block_kd = (config or CONFIG)[:4]
    h, inter = w_down.shape
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.shape[1] == h and x.stride(1) == 1
            and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == w_gate_up.dtype == w_down.dtype
            and tuple(w_gate_up.shape) == (2 * inter, h) and w_gate_up.is_contiguous() and w_down.is_contiguous()
            and not (inter % block_f or h % block_k or h % block_n or inter % block_kd))


def glu_down(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, chained: bool = False,
             one_launch: bool = True, programs: int | None = None,
             config: tuple[int, int, int, int, int, int] | None = None, prefetch: int = PREFETCH_DOWN
             ) -> torch.Tensor:
    """down(SiLU(gate) * up) of x's rows ([M, H], M <= MAX_ROWS) for w_gate_up [gate; up]
    ([2 I, H]) and w_down [H, I], in one launch (BOTH phases, the barrier between; a GPU only)
    or two (GATE_UP, then DOWN). programs: of each launch (default: resident_programs for one
    launch, which takes at most PER_SM an SM; a tile each for two); chained: a programmatic
    dependent (pdl.py), whose programs ask the L2 cache for their first weight rows' first bytes
    (skinny's PREFETCH_BYTES) before they wait; prefetch: bytes of each down row a program asks for
    before the barrier."""
    m, h = x.shape
    inter = w_down.shape[1]
    block_f, block_k, block_n, block_kd, warps, stages = config or CONFIG
    if not fits(x, w_gate_up, w_down, (block_f, block_k, block_n, block_kd, warps, stages)):
        raise ValueError(f"glu_down takes 1 to {MAX_ROWS} half-precision rows [M, H], a contiguous [2 I, H] gate/up "
                         f"weight and a contiguous [H, I] down weight of their dtype, whose sizes its tiles "
                         f"({block_f} features, {block_k}-wide steps; {block_n} columns, {block_kd}-wide steps) must "
                         f"divide; got {tuple(x.shape)} {x.dtype}, {tuple(w_gate_up.shape)}, {tuple(w_down.shape)}")
    if prefetch < 0:
        raise ValueError(f"prefetch takes a count of bytes, 0 or more; got {prefetch}")
    if one_launch and os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("glu_down's one launch needs a GPU (its barrier waits for every program at once; the "
                         "interpreter runs them one at a time): pass one_launch=False")
    if one_launch and x.is_cuda and programs is not None:
        most = PER_SM * resident_programs(x.device)
        if not 0 < programs <= most:
            raise ValueError(f"glu_down's one launch takes 1 to {PER_SM} programs an SM ({most} here), all resident "
                             f"at once; got {programs}")
    act = torch.empty(m, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(m, h, dtype=x.dtype, device=x.device)
    lines = prefetch_lines(inter, x.element_size(), prefetch) if prefetch else 0
    # before a chained launch's wait, as a chained skinny product: its first rows' first bytes
    ahead_gu, ahead_down = (prefetch_lines(h, x.element_size()), prefetch_lines(inter, x.element_size())) \
        if chained else (0, 0)
    common = dict(H=h, INTER=inter, BLOCK_M=MAX_ROWS, BLOCK_F=block_f, BLOCK_K=block_k, BLOCK_N=block_n,
                  BLOCK_KD=block_kd, CHAINED=chained, num_warps=warps, num_stages=stages, **launch(chained))
    args = (x, w_gate_up, w_down, act, out)
    strides = (m, x.stride(0), act.stride(0), out.stride(0))
    if one_launch:
        grid = programs or resident_programs(x.device)
        _glu_down_kernel[(grid,)](*args, _sync(x.device), *strides, grid, PHASES=BOTH, PREFETCH=lines,
                                  PREFETCH_GU=ahead_gu, **common)
    else:
        grid = programs or triton.cdiv(inter, block_f)
        _glu_down_kernel[(grid,)](*args, act, *strides, grid, PHASES=GATE_UP, PREFETCH=0, PREFETCH_GU=ahead_gu,
                                  **common)
        grid = programs or triton.cdiv(h, block_n)
        _glu_down_kernel[(grid,)](*args, act, *strides, grid, PHASES=DOWN, PREFETCH=ahead_down, PREFETCH_GU=0,
                                  **common)
    return out
