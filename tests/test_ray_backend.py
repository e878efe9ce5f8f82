"""The Ray backend end to end on a real local Ray cluster (gloo): tensor-parallel shard actors
must give the in-process engine's tokens and logits, and leave nothing behind."""

from __future__ import annotations

import time

import pytest
import torch
from oracle import TOL

ray = pytest.importorskip("ray")

import hogwild_ray as hw  # noqa: E402
from hogwild_ray.errors import InvalidRequestError  # noqa: E402
from hogwild_ray.runtime import ShardFailedError  # noqa: E402
from hogwild_ray.runtime.engine import RayHogwildEngine  # noqa: E402

STEPS = 24
FORCED = {4: {0: "First part done.\n\n"}, 9: {1: "Let me check that.\n\n"}, 14: {2: "So far so good.\n\n"}}
KW = dict(cache_tokens=2048, attention="torch")


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def live_groups() -> list[dict]:
    return [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def live_actors() -> list[str]:
    return [k for k, a in ray._private.state.actors().items() if a["State"] == "ALIVE"]


def assert_clean() -> None:
    deadline = time.monotonic() + 10  # removal is asynchronous in the GCS
    while (live_actors() or live_groups()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_actors() == [] and live_groups() == []


def run_session(engine, steps: int = STEPS) -> tuple[list, torch.Tensor]:
    session = engine.start("Compute 12 * 7 and explain.", workers=3, max_tokens=200,
                           sampling=hw.SamplingParams(temperature=0), redundancy_every=8)
    tokens, logits = [], []
    try:
        for i in range(steps):
            tokens.append(session.step(inject=FORCED.get(i)))
            logits.append(session.last_logits.clone())
    finally:
        session.close()
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def model_dir(random_model):
    return str(random_model("llama", "default")[0])


def test_tp2_matches_the_local_engine_and_cleans_up(model_dir):
    local_tokens, local_logits = run_session(hw.HogwildEngine.from_pretrained(model_dir, **KW))
    with hw.HogwildEngine.from_pretrained(model_dir, backend="ray", tp=2, **KW) as engine:
        assert isinstance(engine, RayHogwildEngine)
        tokens, logits = run_session(engine)
        again, _ = run_session(engine, steps=3)  # a second session on the same shards
    assert tokens == local_tokens
    assert again == local_tokens[:3]
    scale = local_logits.nan_to_num().abs().max().item()
    assert torch.equal(logits.isnan(), local_logits.isnan())
    assert (logits - local_logits).nan_to_num().abs().max().item() <= TOL * scale
    assert_clean()


def test_killed_shard_is_a_clear_error_and_releases_everything(model_dir):
    engine = hw.HogwildEngine.from_pretrained(model_dir, backend="ray", tp=2, step_timeout_s=20, **KW)
    session = engine.start("Compute 12 * 7.", workers=2, max_tokens=100, sampling=hw.SamplingParams(temperature=0))
    session.step()
    ray.kill(engine.group.actors[1])
    with pytest.raises(ShardFailedError, match="shard rank 1 failed") as err:
        for _ in range(5):
            session.step()
    assert 1 in err.value.ranks
    session.close()
    engine.close()
    assert_clean()


def test_bad_backend_arguments():
    with pytest.raises(InvalidRequestError, match="backend must be"):
        hw.HogwildEngine.from_pretrained(None, backend="mpi")
    with pytest.raises(InvalidRequestError, match="tp must be an integer >= 1"):
        hw.HogwildEngine.from_pretrained(None, backend="ray", tp=0)
    with pytest.raises(InvalidRequestError, match="needs backend='ray'"):
        hw.HogwildEngine.from_pretrained(None, tp=2)
