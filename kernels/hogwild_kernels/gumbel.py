"""Gumbel-max scores from a counter-based RNG: sampling that a CUDA graph can hold.

argmax(x + g), g = -log(-log(u)) with u uniform, is a draw from softmax(x). The uniforms
come from Philox4x32-10 keyed by the row's seed with the counter (column, draw number):
no generator state lives on the device, so a captured graph replays correct draws from
whatever seeds and draw numbers its input buffers hold, a fork copies two integers, and
every tensor-parallel rank given the same seeds draws the same tokens.

`gumbel_scores` runs the Triton kernel on CUDA (Triton's own Philox) and the same
arithmetic in torch elsewhere; the two give the same uniforms bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_SCALE = 4.6566127342e-10  # 2**-31, as Triton's uint_to_uniform_float


def gumbel_scores(x: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                  draws: torch.Tensor, interpret: bool = False) -> torch.Tensor:
    """x [rows, vocab] fp32 (already divided by the temperature) plus Gumbel noise where the
    row's temperature is > 0 (rows at 0 are returned as they are: greedy).

    seeds, draws: int64 [rows]; draw d of a row uses the counter (column, d)."""
    if x.device.type == "cuda" or interpret:
        return _gumbel_triton(x, temperature, seeds, draws)
    u = philox_uniform(seeds, draws, x.shape[-1])
    noisy = x - torch.log(-torch.log(u))
    return torch.where(temperature[:, None] > 0, noisy, x)


def philox_uniform(seeds: torch.Tensor, draws: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms [rows, n] in [0, 1) from `philox_words`, mapped to floats as Triton's tl.rand maps them."""
    word = philox_words_numpy(seeds, draws, n) if seeds.device.type == "cpu" else philox_words(seeds, draws, n)
    signed = torch.where(word >= 2**31, word - 2**32, word)  # the word read as an int32
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * torch.tensor(_SCALE, dtype=torch.float32)


def philox_words(seeds: torch.Tensor, draws: torch.Tensor, n: int) -> torch.Tensor:
    """Philox4x32-10 with key = seed and counter = (column, draw, 0, 0): the first output word
    [rows, n] (as tl.randint gives it for the 64-bit offset draw * 2**32 + column). In int64
    arithmetic on 16-bit halves, so no product overflows."""
    rows = seeds.shape[0]
    c0 = torch.arange(n, dtype=torch.int64, device=seeds.device).expand(rows, n)
    c1 = (draws & _M32)[:, None].expand(rows, n)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0 = (seeds & _M32)[:, None]
    k1 = ((seeds >> 32) & _M32)[:, None]
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def philox_words_numpy(seeds: torch.Tensor, draws: torch.Tensor, n: int) -> torch.Tensor:
    """`philox_words` in numpy's unsigned 64-bit arithmetic (a 32 x 32-bit product fits, so each
    round is one multiply): the same words bit for bit, several times faster on the CPU."""
    m32 = np.uint64(_M32)
    s = seeds.numpy().astype(np.uint64)
    rows = s.shape[0]
    c0 = np.broadcast_to(np.arange(n, dtype=np.uint64), (rows, n))
    c1 = np.broadcast_to((draws.numpy().astype(np.uint64) & m32)[:, None], (rows, n))
    c2 = c3 = np.zeros((rows, n), dtype=np.uint64)
    k0, k1 = (s & m32)[:, None], ((s >> np.uint64(32)) & m32)[:, None]
    round_a, round_b, key_a, key_b, shift = (np.uint64(v) for v in (_ROUND_A, _ROUND_B, _KEY_A, _KEY_B, 32))
    for _ in range(10):
        pb, pa = round_b * c2, round_a * c0
        c0, c2, c1, c3 = (pb >> shift) ^ c1 ^ k0, (pa >> shift) ^ c3 ^ k1, pb & m32, pa & m32
        k0, k1 = (k0 + key_a) & m32, (k1 + key_b) & m32
    return torch.from_numpy(c0.astype(np.int64))


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of the constant a and b (both < 2**32)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    high_part, low_part = a_hi * b, a_lo * b  # < 2**48 each
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & _M32
    return hi, lo


@triton.jit
def _gumbel_kernel(x_ptr, out_ptr, temp_ptr, seed_ptr, draw_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    x = tl.load(x_ptr + row.to(tl.int64) * vocab + cols, mask=mask, other=0.0)
    seed = tl.load(seed_ptr + row)
    draw = tl.load(draw_ptr + row)
    u = tl.rand(seed, (draw << 32) + cols.to(tl.int64))  # counter (column, draw)
    y = tl.where(tl.load(temp_ptr + row) > 0, x - tl.log(-tl.log(u)), x)
    tl.store(out_ptr + row.to(tl.int64) * vocab + cols, y, mask=mask)


def _gumbel_triton(x: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                   draws: torch.Tensor) -> torch.Tensor:
    rows, vocab = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    block = 2048
    _gumbel_kernel[(rows, triton.cdiv(vocab, block))](
        x, out, temperature.contiguous(), seeds.contiguous(), draws.contiguous(), vocab, BLOCK=block)
    return out
