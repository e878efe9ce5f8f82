"""The counter-based Gumbel draws: torch Philox equals Triton's bit for bit, the Triton kernel
equals the torch path, draws depend only on (seed, draw number), and forks go on alike.

On CPU the Triton kernels run under TRITON_INTERPRET=1 (set in conftest.py)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hogwild_kernels.gumbel import gumbel_scores, philox_uniform, philox_words, philox_words_numpy

from hogwild_ray.core.sampling_params import SamplingParams
from hogwild_ray.sampling import Sampler, sample_tokens
from hogwild_ray.transfer import to_device

SEEDS = torch.tensor([0, 1, 2**62 + 12345, 2**40 - 7, 2**63 - 1], dtype=torch.int64)
DRAWS = torch.tensor([0, 5, 70000, 2**31 - 1, 3], dtype=torch.int64)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@triton.jit
def _randint_kernel(seed_ptr, draw_ptr, out_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    r = tl.randint(tl.load(seed_ptr + row), (tl.load(draw_ptr + row) << 32) + cols.to(tl.int64))
    tl.store(out_ptr + row * n + cols, r.to(tl.int64) & 0xFFFFFFFF, mask=cols < n)


def test_torch_philox_equals_tritons():
    n = 300
    seeds, draws = SEEDS.to(DEVICE), DRAWS.to(DEVICE)
    out = torch.zeros(len(SEEDS), n, dtype=torch.int64, device=DEVICE)
    _randint_kernel[(len(SEEDS),)](seeds, draws, out, n, BLOCK=512)
    assert torch.equal(philox_words(seeds, draws, n), out)
    # and it is Philox4x32-10: the published known-answer vector (Random123, kat_vectors)
    key = torch.tensor([0], dtype=torch.int64)
    assert philox_words(key, torch.tensor([0]), 1).item() == 0x6627E8D5


def test_numpy_philox_equals_torchs():
    """The CPU's fast path (one 64-bit multiply per round) gives the same words bit for bit."""
    seeds = torch.cat([SEEDS, torch.tensor([0, 2**63 - 1, 2**32 - 1, 2**32])])
    draws = torch.cat([DRAWS, torch.tensor([0, 2**40 + 5, 2**32 - 1, 7])])
    assert torch.equal(philox_words_numpy(seeds, draws, 777), philox_words(seeds, draws, 777))
    assert philox_words_numpy(torch.tensor([0]), torch.tensor([0]), 1).item() == 0x6627E8D5


def test_uniforms_are_uniform_and_distinct_per_draw():
    u = philox_uniform(torch.tensor([7, 7, 8]), torch.tensor([0, 1, 0]), 20000)
    assert u.dtype == torch.float32 and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    # the counter is (column, draw): a column's value does not depend on how wide the row is
    assert torch.equal(philox_uniform(torch.tensor([7]), torch.tensor([1]), 100)[0], u[1, :100])


def test_triton_scores_equal_torch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3000, generator=g) * 4
    temp = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0])
    want = gumbel_scores(x, temp, SEEDS, DRAWS)
    if DEVICE.type == "cuda":
        got = gumbel_scores(x.to(DEVICE), temp.to(DEVICE), SEEDS.to(DEVICE), DRAWS.to(DEVICE)).cpu()
    else:
        got = gumbel_scores(x, temp, SEEDS, DRAWS, interpret=True)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.equal(got[1], x[1])  # temperature 0: no noise (greedy)


@pytest.mark.parametrize("mode_params", [
    SamplingParams(temperature=0.8, seed=3),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3),
])
def test_device_and_cpu_sample_alike(mode_params):
    """The same table on the CPU (torch Philox) and on the device (Triton) draws the same ids."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 500, generator=g) * 3
    a, b = Sampler([mode_params] * 6, torch.device("cpu")), Sampler([mode_params] * 6, DEVICE)
    for _ in range(10):
        ta, tb = a.table(list(range(6))), b.table(list(range(6)))
        assert ta.mode == tb.mode == ("filter" if mode_params.top_k else "sample")
        cpu = sample_tokens(logits, to_device(ta.values, torch.device("cpu"), torch.float64), ta.mode)
        if DEVICE.type == "cuda":
            dev = sample_tokens(logits.to(DEVICE), to_device(tb.values, DEVICE, torch.float64), tb.mode).cpu()
        else:
            dev = _interpreted(logits, tb)
        assert torch.equal(cpu, dev)


def _interpreted(logits, table):
    """sample_tokens with the Triton kernel under the interpreter."""
    import hogwild_ray.sampling as sampling

    real = sampling.gumbel_scores
    sampling.gumbel_scores = lambda *a: real(*a, interpret=True)
    try:
        return sample_tokens(logits, to_device(table.values, torch.device("cpu"), torch.float64), table.mode)
    finally:
        sampling.gumbel_scores = real


def test_table_counts_draws_and_skips_greedy_rows():
    s = Sampler([SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=2**40 + 5),
                 SamplingParams(temperature=1.0, top_p=0.5, seed=9)], torch.device("cpu"))
    t = s.table([2, 1, 0])
    assert t.mode == "filter" and s.draws == [0, 1, 1]
    seed_lo, seed_hi, draw, top_k, temp, top_p = t.values
    assert list(seed_lo[:2]) == [9, 5] and list(seed_hi[:2]) == [0, 256] and list(temp) == [1.0, 0.7, 0.0]
    assert list(top_p[:2]) == [0.5, 1.0] and list(draw) == [0, 0, 0]
    assert list(s.table([1]).values[2]) == [1] and s.draws == [0, 2, 1]
    assert s.table([0]).mode == "greedy" and s.table([1, 2], greedy=True).mode == "greedy"
    assert s.draws == [0, 2, 1]  # greedy passes draw nothing


def test_a_copy_draws_what_the_original_would():
    s = Sampler([SamplingParams(temperature=1.0), SamplingParams(temperature=1.0)], torch.device("cpu"))
    logits = torch.zeros(2, 1000)
    for _ in range(3):
        s.sample(logits, [0, 1])
    twin = s.copy()
    assert [s.sample(logits, [0, 1]).tolist() for _ in range(5)] == \
        [twin.sample(logits, [0, 1]).tolist() for _ in range(5)]
