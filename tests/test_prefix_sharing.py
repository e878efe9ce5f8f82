"""Shared prompt pages: sessions whose prompts begin alike share those full pages, exactly."""

from __future__ import annotations

import pytest

import hogwild_ray as hw
from hogwild_ray.core.layout import CacheLayout, PageAllocator


def test_layouts_share_full_prompt_pages_until_the_last_owner_closes():
    pool = PageAllocator(64, 4)
    prompt = list(range(100, 114))  # 3 full pages and 2 tokens
    a = CacheLayout("combined", 2, pool)
    assert a.write_shared(a.common, prompt) is not None
    b = CacheLayout("combined", 2, pool)
    step = b.write_shared(b.common, prompt[:12] + [7, 8])  # the same 3 full pages, then its own tokens
    assert b.common.pages[:3] == a.common.pages[:3] and b.common.pages[3] != a.common.pages[3]
    assert step.tokens == [7, 8] and step.local_start == 12 and step.position == 12  # only the rest is computed
    assert pool.shared_pages == 3 and pool.prefix_reused == 3
    c = CacheLayout("combined", 2, pool)
    assert c.write_shared(c.common, prompt[:8]) is None  # two whole pages held by others: nothing to compute
    assert c.common.pages == a.common.pages[:2]
    for lay in (a, b, c):
        lay.close()
    assert pool.free_pages == 64 and pool.shared_pages == 0
    d = CacheLayout("combined", 2, pool)
    d.write_shared(d.common, prompt)  # the pages are gone with their owners: computed again
    assert pool.prefix_reused == 5 and pool.shared_pages == 0
    d.close()


def test_only_the_same_leading_tokens_share():
    pool = PageAllocator(32, 4)
    a, b = CacheLayout("combined", 1, pool), CacheLayout("combined", 1, pool)
    a.write_shared(a.common, [1, 2, 3, 4, 5, 6, 7, 8])
    b.write_shared(b.common, [9, 2, 3, 4, 5, 6, 7, 8])  # page 2 is alike but follows another page
    assert not set(a.common.pages) & set(b.common.pages) and pool.prefix_reused == 0
    a.close()
    b.close()


def test_finished_steps_are_never_offered():
    """Only prompt pages are shared: a finished step moved into the history is not a prompt."""
    pool = PageAllocator(32, 4)
    a = CacheLayout("combined", 1, pool)
    a.write_shared(a.common, [1, 2, 3, 4])
    a.plan({0: [5, 6, 7, 8]})
    a.release(a.finish_step(0))
    b = CacheLayout("combined", 1, pool)
    b.write_shared(b.common, [1, 2, 3, 4, 5, 6, 7, 8])
    assert b.common.pages[0] == a.common.pages[0] and b.common.pages[1] != a.common.pages[1]
    a.close()
    b.close()


@pytest.fixture(scope="module")
def llama(random_model):
    return random_model("llama")


def test_sessions_with_one_prompt_share_its_pages_and_stay_exact(llama):
    """Two sessions of one problem: the second computes none of the first's full prompt pages, the
    oracle holds for both, the metrics count the sharing, and everything is free after closing."""
    from oracle import TOL, oracle_check

    path, hf_model = llama
    engine = hw.HogwildEngine.from_pretrained(path, "cpu", "float32", cache_tokens=4096, attention="torch")
    first = engine.start("Compute 12 + 30.", workers=2, max_tokens=16, sampling=hw.SamplingParams(temperature=0))
    full = len(first.prompt_ids) // engine.allocator.page_size
    calls = []
    real = engine.runner.forward
    engine.runner.forward = lambda steps, *rest: (calls.append(sum(len(s.tokens) for s in steps)), real(steps, *rest))[1]
    second = engine.start("Compute 12 + 30.", workers=2, max_tokens=16, sampling=hw.SamplingParams(seed=3))
    assert full >= 2 and second.prompt_ids == first.prompt_ids
    assert second.layout.common.pages[:full] == first.layout.common.pages[:full]
    page = engine.allocator.page_size
    lay = second.layout  # computed: the prompt's tail after the shared pages, and the two headers
    assert sum(calls) == len(second.prompt_ids) - full * page + len(lay.hdr_others) + len(lay.hdr_own)
    m = engine.metrics()
    assert m["pages_shared"] >= full and m["prompt_pages_reused"] >= full
    for _ in range(4):
        engine.step([first, second])
        assert oracle_check(first, hf_model) <= TOL and oracle_check(second, hf_model) <= TOL
    first.close()
    assert all(engine.allocator._refs[p] == 1 for p in second.layout.common.pages[: full])
    second.close()
    assert engine.allocator.free_pages == engine.allocator.num_pages and engine.metrics()["pages_shared"] == 0
