"""Sizes are checked before anything is allocated: errors name the parameter and the memory."""

from __future__ import annotations

import time

import pytest
import torch

import hogwild_ray as hw
from hogwild_ray.errors import CacheFullError, InvalidRequestError
from hogwild_ray.runner.memory import device_memory

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def tiny(random_model):
    path, _ = random_model("llama")
    return path


def no_pool(monkeypatch):
    """Fail the test if a K/V pool is allocated."""
    import hogwild_ray.runner.model_runner as runner

    def refuse(*args, **kwargs):
        raise AssertionError("a K/V pool was allocated before the sizes were checked")

    monkeypatch.setattr(runner, "KVPool", refuse)
    monkeypatch.setattr(runner, "load_weights", refuse)


@pytest.mark.parametrize("options,match", [
    (dict(page_size=10**9), "page_size must be at most 1024"),
    (dict(cache_tokens=2**31), "cache_tokens must be below 2,147,483,648"),
    (dict(cache_tokens=10**12), "cache_tokens must be below"),
])
def test_pool_sizes_beyond_any_pool_are_refused_before_the_model_is_read(tiny, monkeypatch, options, match):
    import hogwild_ray.engine as engine

    monkeypatch.setattr(engine, "read_model", lambda *a: pytest.fail("the model was read"), raising=False)
    no_pool(monkeypatch)
    with pytest.raises(InvalidRequestError, match=match):
        hw.HogwildEngine.from_pretrained(tiny, "cpu", **options)


def test_a_pool_larger_than_the_machine_is_refused_with_its_memory(tiny, monkeypatch):
    from hogwild_ray.model.loader import load_config, locate
    from hogwild_ray.model.spec import spec_from_config

    spec = spec_from_config(load_config(locate(str(tiny))))
    per_token = spec.kv_bytes_per_token(torch.float32)
    tokens = device_memory(torch.device("cpu")) // per_token + 1024
    if tokens >= 2**31:
        pytest.skip("this machine holds any pool the slots can address")
    no_pool(monkeypatch)
    with pytest.raises(InvalidRequestError, match=r"cache_tokens=[\d,]+ .* needs [\d,.]+ GiB of K/V memory "
                                                  rf"\({per_token:,} bytes per token\).* lower cache_tokens"):
        hw.HogwildEngine.from_pretrained(tiny, "cpu", "float32", cache_tokens=tokens)


def test_more_workers_than_pages_are_refused_at_once_and_the_engine_still_serves(tiny):
    engine = hw.HogwildEngine.from_pretrained(tiny, "cpu", "float32", cache_tokens=512)
    t0 = time.perf_counter()
    for workers in (10**6, 33):
        with pytest.raises(CacheFullError, match=rf"workers={workers:,} cannot fit: .* the cache holds 32 pages"):
            engine.start("What is 2 + 2?", workers=workers, max_tokens=4)
    assert time.perf_counter() - t0 < 5
    assert engine.allocator.free_pages == 32
    result = engine.solve("What is 2 + 2?", workers=2, max_tokens=4)
    assert result.stats.forward_passes > 0 and engine.allocator.free_pages == 32
