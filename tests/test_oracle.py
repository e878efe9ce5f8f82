"""The oracle on every family and rope scaling, several worker counts and layouts."""

from __future__ import annotations

import pytest
import torch
from oracle import TOL, oracle_check

import hogwild_ray as hw

CASES = [
    ("llama", "default", 3, "combined"),
    ("llama", "linear", 5, "combined"),
    ("llama", "llama3", 3, "combined"),
    ("llama", "yarn", 5, "combined"),
    ("mistral", "default", 3, "combined"),
    ("qwen2", "default", 5, "combined"),
    ("qwen2", "yarn", 3, "combined"),
    ("qwen3", "default", 3, "combined"),
    ("qwen3", "linear", 5, "combined"),
    ("llama", "default", 5, "contiguous"),
    ("qwen3", "default", 3, "interleaved"),
]

STEPS = 40
# Forced boundaries and an interjection: (pass index, worker) -> text fed before its next token.
FORCED = {5: {1: "Let me check that.\n\n"}, 12: {0: "First part done.\n\n", 2: "Another idea:"},
          20: {2: "We should split the work.\n\n"}, 27: {0: "So far so good.\n\n"},
          33: {1: "Checking the other case.\n\n"}}


def run_oracle(engine, hf_model, workers, layout, plain=False, steps=STEPS):
    session = engine.start("Compute 12 * 7 and explain.", workers=workers, layout=layout, max_tokens=200,
                           sampling=hw.SamplingParams(temperature=1.0, seed=3), redundancy_every=15)
    worst, finished_before = 0.0, 0
    for i in range(steps):
        inject = {w: t for w, t in FORCED.get(i, {}).items() if w < workers}
        session.step(inject=inject)
        worst = max(worst, oracle_check(session, hf_model, plain=plain))
    finished = sum(session.stats.steps_per_worker)
    session.close()
    return worst, finished, session


@pytest.mark.parametrize("family,rope,workers,layout", CASES)
def test_oracle_random_models(random_model, family, rope, workers, layout):
    path, hf_model = random_model(family, rope)
    engine = hw.HogwildEngine.from_pretrained(path, cache_tokens=4096)
    worst, finished, session = run_oracle(engine, hf_model, workers, layout)
    assert worst <= TOL, f"max relative logit error {worst:.2e}"
    assert finished >= 4, "the forced boundaries must finish steps"
    assert session.stats.redundancy_checks >= 1
    assert engine.allocator.free_pages == engine.allocator.num_pages


@pytest.mark.parametrize("family,rope", [("llama", "default"), ("qwen3", "yarn"), ("qwen2", "llama3")])
def test_plain_model_one_layer(random_model, family, rope):
    """With one layer, K/V depend on nothing but the token: plain HF on the flat view must agree."""
    path, hf_model = random_model(family, rope, num_hidden_layers=1)
    engine = hw.HogwildEngine.from_pretrained(path, cache_tokens=4096)
    worst, _, _ = run_oracle(engine, hf_model, 3, "combined", plain=True, steps=25)
    assert worst <= TOL


def test_oracle_detects_a_block_one_position_off(random_model):
    """Mutation test: moving any one block of a view by one position must fail the check."""
    path, hf_model = random_model("llama", "default")
    engine = hw.HogwildEngine.from_pretrained(path, cache_tokens=4096)
    session = engine.start("Compute 12 * 7.", workers=3, max_tokens=100,
                           sampling=hw.SamplingParams(temperature=1.0, seed=1))
    for _ in range(25):
        session.step()
    assert oracle_check(session, hf_model) <= TOL
    segments = session.last_steps[0].segments
    assert [s.block.name for s in segments] == ["common", "hdr_others", "cur1", "cur2", "hdr_own", "cur0"]
    errors = [oracle_check(session, hf_model, shift=(0, i)) for i in range(len(segments))]
    assert min(errors) > 10 * TOL, errors


def test_oracle_real_weights(default_engine, default_hf_model):
    worst, _, _ = run_oracle(default_engine, default_hf_model, 3, "combined", steps=8)
    assert worst <= TOL


def test_oracle_triton_attention(random_model):
    """The engine oracle with the Triton kernels (interpreted on CPU, so kept short)."""
    pytest.importorskip("triton")
    path, hf_model = random_model("qwen3", "yarn")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = hw.HogwildEngine.from_pretrained(path, device, "float32", cache_tokens=4096, attention="triton")
    worst, finished, _ = run_oracle(engine, hf_model, 3, "combined", steps=40 if device == "cuda" else 14)
    assert worst <= TOL, f"max relative logit error {worst:.2e}"
    assert finished >= 2
