"""session.fork(): shares every page (copy on write), the oracle holds for both sides, and a
fork never changes its parent."""

from __future__ import annotations

import pytest
import torch
from oracle import TOL, oracle_check

import hogwild_ray as hw
from hogwild_ray.errors import InvalidRequestError

PROBLEM = "Compute 12 * 7 and explain."
BEFORE, AFTER = 12, 10
INJECT = {4: {0: "First part done.\n\n"}, 9: {1: "Let me check that.\n\n"}}


def start(engine):
    return engine.start(PROBLEM, workers=3, max_tokens=200, sampling=hw.SamplingParams(temperature=1.0, seed=5),
                        redundancy_every=None)


def test_fork_oracle_and_parent_unchanged(random_model):
    path, hf_model = random_model("qwen3", "default")
    engine = hw.HogwildEngine.from_pretrained(path, cache_tokens=4096)
    reference, parent = start(engine), start(engine)
    for i in range(BEFORE):
        reference.step(inject=INJECT.get(i))
        parent.step(inject=INJECT.get(i))
    used = engine.allocator.num_pages - engine.allocator.free_pages
    child = parent.fork()
    assert engine.allocator.num_pages - engine.allocator.free_pages == used  # nothing copied yet
    for i in range(AFTER):
        want = reference.step()
        assert parent.step() == want  # the parent goes on exactly as an unforked twin
        torch.testing.assert_close(parent.last_logits, reference.last_logits, rtol=1e-5, atol=1e-5)
        assert oracle_check(parent, hf_model) <= TOL
        # the fork goes its own way, writing after the parent (so a write into a shared page shows)
        child.step(inject={2: "Final answer now:"} if i == 0 else None)
        assert oracle_check(child, hf_model) <= TOL
    assert child.text(2) != parent.text(2)
    assert parent.text(0) == reference.text(0)
    for s in (child, parent, reference):
        s.close()
    assert engine.allocator.free_pages == engine.allocator.num_pages


def test_fork_needs_an_open_local_session(random_model):
    path, _ = random_model("llama", "default")
    engine = hw.HogwildEngine.from_pretrained(path, cache_tokens=2048)
    s = start(engine)
    s.step()
    s.close()
    with pytest.raises(InvalidRequestError, match="closed"):
        s.fork()
