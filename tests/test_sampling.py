"""SamplingParams validation, per-worker params, and the sampler's rules and statistics."""

from __future__ import annotations

import pytest
import torch

from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.core.sampling_params import GREEDY, SamplingParams, per_worker
from hogwild_ray.sampling import Sampler, sample_one

CPU = torch.device("cpu")
LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0, -2.0])  # top: 6, 0, 1, 2, ...


def draws(params: SamplingParams, logits: torch.Tensor, n: int) -> list[int]:
    """n draws for worker 0 from fixed logits."""
    s = Sampler([params], CPU)
    return [int(s.sample(logits[None], [0])[0]) for _ in range(n)]


# ---- validation -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "1"}, "temperature"),
    ({"temperature": None}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": -0.5}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_p": "0.9"}, "top_p"),
    ({"top_p": True}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"top_k": 2.0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": None}, "top_k"),
    ({"top_k": 2**31}, r"top_k must be an integer in \[0, 2\*\*31\)"),
    ({"top_k": 10**400}, "top_k"),  # once took a server's engine down: the sampling table is float64
    ({"seed": -1}, "seed"),
    ({"seed": 1.0}, "seed"),
    ({"seed": "3"}, "seed"),
    ({"seed": False}, "seed"),
    ({"seed": 2**64}, "seed"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field) as err:
        SamplingParams(**kwargs)
    assert isinstance(err.value, ValueError)


def test_valid_params():
    assert GREEDY.greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams().greedy
    p = SamplingParams(temperature=1, top_k=0, top_p=1, seed=0)
    assert (p.temperature, p.top_k, p.top_p, p.seed) == (1, 0, 1, 0)
    SamplingParams(top_p=1e-6, top_k=1, seed=2**62)


def test_the_largest_top_k_keeps_every_token_as_none_does():
    """top_k up to 2**31 - 1 (past any vocabulary): every token kept, the same draws as no cut."""
    from hogwild_ray.sampling import sample_one

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for draw in range(8):
        widest = sample_one(logits, SamplingParams(temperature=1.0, top_k=2**31 - 1, top_p=0.999999, seed=3), draw)
        assert widest == sample_one(logits, SamplingParams(temperature=1.0, top_k=0, top_p=0.999999, seed=3), draw)


# ---- per worker -------------------------------------------------------------------------

def test_per_worker_offsets_the_seed():
    base = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=10)
    ps = per_worker(base, 4)
    assert [p.seed for p in ps] == [10, 11, 12, 13]
    assert all((p.temperature, p.top_k, p.top_p) == (0.7, 5, 0.9) for p in ps)


def test_per_worker_without_seed_or_params():
    ps = per_worker(SamplingParams(temperature=0.3), 3)
    assert len(ps) == 3 and all(p.seed is None and p.temperature == 0.3 for p in ps)
    ps = per_worker(None, 2)
    assert ps == [SamplingParams(), SamplingParams()]


def test_per_worker_list():
    given = [SamplingParams(seed=5), GREEDY, SamplingParams(temperature=1.5)]
    assert per_worker(given, 3) == given
    assert per_worker(tuple(given), 3) == given


@pytest.mark.parametrize("bad", [
    [SamplingParams()],
    [SamplingParams()] * 3,
    [],
    [SamplingParams(), {"temperature": 1.0}],
    5,
    "greedy",
])
def test_per_worker_wrong_input(bad):
    with pytest.raises(InvalidRequestError, match="sampling"):
        per_worker(bad, 2)


# ---- the sampler ------------------------------------------------------------------------

def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=g)
    s = Sampler([GREEDY] * 5, CPU)
    assert s.sample(logits, [0, 1, 2, 3, 4]).tolist() == logits.argmax(-1).tolist()
    # the greedy flag overrides sampling params (the finisher)
    s = Sampler([SamplingParams(temperature=5.0, seed=1)] * 5, CPU)
    for _ in range(5):
        assert s.sample(logits, [4, 3, 2, 1, 0], greedy=True).tolist() == logits.argmax(-1).tolist()


def test_rows_follow_the_worker_list():
    logits = torch.full((3, 10), -10.0)
    logits[0, 7], logits[1, 2], logits[2, 5] = 10.0, 10.0, 10.0
    s = Sampler([GREEDY, GREEDY, SamplingParams(temperature=1.0, top_k=1, seed=0)], CPU)
    out = s.sample(logits, [2, 0, 1])
    assert out.dtype == torch.int64 and out.tolist() == [7, 2, 5]
    # each row uses its worker's params: worker 0 greedy, worker 1 sampling
    s = Sampler([GREEDY, SamplingParams(temperature=1.0, seed=0)], CPU)
    rows = [s.sample(torch.zeros(2, 1000), [1, 0]).tolist() for _ in range(10)]
    assert all(r[1] == 0 for r in rows) and len({r[0] for r in rows}) > 5


def test_same_seed_same_draws_and_workers_differ():
    params = per_worker(SamplingParams(temperature=1.0, seed=123), 3)
    logits = torch.zeros(3, 50)  # uniform: every draw depends only on the RNG
    a, b = Sampler(params, CPU), Sampler(params, CPU)
    ra = [a.sample(logits, [0, 1, 2]).tolist() for _ in range(30)]
    rb = [b.sample(logits, [0, 1, 2]).tolist() for _ in range(30)]
    assert ra == rb
    cols = [[r[w] for r in ra] for w in range(3)]
    assert cols[0] != cols[1] and cols[1] != cols[2] and cols[0] != cols[2]
    # a worker's draws depend on its own seed, not on who else is sampled in the step
    c = Sampler(params, CPU)
    assert [int(c.sample(logits[:1], [1])[0]) for _ in range(30)] == cols[1]
    other = Sampler(per_worker(SamplingParams(temperature=1.0, seed=124), 3), CPU)
    assert [other.sample(logits, [0, 1, 2]).tolist()[0] for _ in range(30)] == cols[1]


def test_unseeded_sampler_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    want = torch.rand(4)
    torch.manual_seed(7)
    s = Sampler([SamplingParams(temperature=1.0), SamplingParams(temperature=1.0)], CPU)
    assert torch.equal(torch.rand(4), want)
    # and unseeded workers still draw independently
    logits = torch.zeros(2, 1000)
    rows = [s.sample(logits, [0, 1]).tolist() for _ in range(20)]
    assert [r[0] for r in rows] != [r[1] for r in rows]


@pytest.mark.parametrize("t", [0.01, 0.5, 1.0, 10.0, 1000.0])
def test_top_k_one_is_argmax(t):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 64, generator=g)
    s = Sampler([SamplingParams(temperature=t, top_k=1, seed=w) for w in range(4)], CPU)
    for _ in range(20):
        assert s.sample(logits, [0, 1, 2, 3]).tolist() == logits.argmax(-1).tolist()


@pytest.mark.parametrize("t", [0.5, 1.0, 5.0])
def test_small_top_p_keeps_only_the_top_token(t):
    assert set(draws(SamplingParams(temperature=t, top_p=1e-4, seed=3), LOGITS, 200)) == {6}


def test_top_k_restricts_the_support():
    got = draws(SamplingParams(temperature=5.0, top_k=3, seed=11), LOGITS, 600)
    assert set(got) == {6, 0, 1}


def test_top_p_restricts_the_support():
    p = torch.softmax(LOGITS, -1)
    order = torch.argsort(p, descending=True).tolist()  # [6, 0, 1, 2, 3, 4, 5, 7]
    mass = p[order].cumsum(0)
    # the smallest prefix whose mass reaches top_p: the top three tokens
    top_p = float(mass[1] + mass[2]) / 2
    got = draws(SamplingParams(temperature=1.0, top_p=top_p, seed=5), LOGITS, 1500)
    assert set(got) == set(order[:3])
    # just under a prefix's mass: that prefix, nothing more
    got = draws(SamplingParams(temperature=1.0, top_p=float(mass[1]) - 1e-6, seed=5), LOGITS, 800)
    assert set(got) == set(order[:2])


def test_top_k_then_top_p():
    # top_k=4 keeps {6, 0, 1, 2}; top_p over those renormalized probabilities keeps two
    kept = torch.softmax(LOGITS[[6, 0, 1, 2]], -1)
    top_p = float(kept[0] + kept[1] / 2)
    got = draws(SamplingParams(temperature=1.0, top_k=4, top_p=top_p, seed=9), LOGITS, 1000)
    assert set(got) == {6, 0}


def chi_square(counts: list[int], probs: list[float]) -> float:
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


@pytest.mark.parametrize("t", [0.7, 1.0, 2.0])
def test_temperature_follows_the_softmax(t):
    n = 6000
    probs = torch.softmax(LOGITS / t, -1).tolist()
    got = draws(SamplingParams(temperature=t, seed=2024), LOGITS, n)
    counts = [got.count(i) for i in range(len(probs))]
    # 7 degrees of freedom: P(chi2 > 24.3) = 0.001; the seed is fixed, so this is deterministic
    assert chi_square(counts, probs) < 24.3
    # and it is a test with power: the softmax at another temperature is far off
    wrong = torch.softmax(LOGITS / (t * 1.3), -1).tolist()
    assert chi_square(counts, wrong) > 50


def test_top_k_and_top_p_renormalize():
    n = 5000
    got = draws(SamplingParams(temperature=1.0, top_k=3, seed=77), LOGITS, n)
    probs = torch.softmax(LOGITS[[6, 0, 1]], -1).tolist()
    counts = [got.count(i) for i in (6, 0, 1)]
    assert sum(counts) == n and chi_square(counts, probs) < 13.8  # 2 dof, p = 0.001


def test_sample_one_is_stable_for_low_precision_logits():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(32000, generator=g) * 8).to(torch.bfloat16)
    tok = sample_one(logits, SamplingParams(temperature=0.01, top_p=0.95, seed=1))
    assert int(tok) == int(logits.float().argmax())


def test_a_temperature_too_small_to_divide_by_samples_greedily():
    """1e-40 is a valid temperature but float32 logits divided by it are all inf: greedy, as vLLM's rule."""
    from hogwild_ray.sampling import sample_one

    logits = torch.tensor([1.0, 5.0, 3.0, 2.0])
    for t in (1e-44, 1e-40, 1e-6):
        assert SamplingParams(temperature=t, seed=3).greedy
        assert [int(sample_one(logits, SamplingParams(temperature=t, seed=s))) for s in range(4)] == [1] * 4
    assert not SamplingParams(temperature=1e-4).greedy


def test_the_largest_shared_seed_serves_every_worker():
    from hogwild_ray.core.sampling_params import per_worker

    seeds = [p.seed for p in per_worker(SamplingParams(seed=2**63 - 1), 3)]
    assert seeds == [2**63 - 1, 0, 1]
