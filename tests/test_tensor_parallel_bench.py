"""The tensor-parallel benchmark and check end to end on a local Ray cluster (gloo on the CPU),
the shards' NCCL environment, and the oracle at tp=2/4/8 on CUDA in bf16 where there are GPUs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import hogwild_ray as hw  # noqa: E402
from hogwild_ray.runtime.shard import NCCL_ENV, ModelShard, multicast_off  # noqa: E402
from hogwild_ray.runtime.supervisor import ShardGroup  # noqa: E402
from bench_files import saved_results  # noqa: E402
from ray_state import assert_clean  # noqa: E402

GPUS = torch.cuda.device_count()
BF16_TOL, BF16_KV_TOL = 5e-2, 2e-2  # bf16 weights, activations and K/V against the fp32 HF model
GPU_SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2)  # splits by 8


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=max(4, GPUS), include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_multicast_off_keeps_explicit_values(monkeypatch):
    env = {"NCCL_NVLS_ENABLE": "1"}  # set by the user: kept
    monkeypatch.setattr(os, "environ", env)
    assert multicast_off() == env == {**NCCL_ENV, "NCCL_NVLS_ENABLE": "1"}


def test_shards_start_with_multicast_off():
    from hogwild_ray.config import EngineConfig

    config = EngineConfig.create("random:tiny", "cpu", backend="ray", tp=2).sized(2048)
    with ShardGroup(ModelShard, 2, args=(config,)) as group:
        assert group.step(("env", ())) == NCCL_ENV
    assert_clean()


def test_benchmark_and_check(tmp_path):
    import tensor_parallel

    out = tensor_parallel.main(["--shape", "tiny", "--device", "cpu", "--tp", "1,2,3", "--workers", "1,2",
                                "--view", "16", "--steps", "3", "--warmup", "1", "--out", str(tmp_path),
                                "--date", "2000-01-01"])
    stem = tmp_path / "2000-01-01-cpu-tensor-parallel"
    saved = saved_results(stem, out)
    assert saved["torch"] and saved["ray"]
    cell = {(r["tp"], r["workers"]): r for r in saved["rows"]}
    assert set(cell) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    for n in (1, 2):
        assert cell[(1, n)]["allreduce_ms"] == 0 and cell[(2, n)]["allreduce_ms"] > 0
        assert 0 < cell[(2, n)]["allreduce_fraction"] < 1 and cell[(2, n)]["timed_steps"] == 3
        assert cell[(2, n)]["vs_tp1"] == pytest.approx(cell[(2, n)]["step_ms"] / cell[(1, n)]["step_ms"], rel=1e-3)
        assert cell[(1, n)]["tokens_per_s"] == pytest.approx(n / cell[(1, n)]["step_ms"] * 1e3, rel=1e-3)
    assert {s["tp"] for s in saved["skipped"]} == {3} and "cannot be split" in saved["skipped"][0]["reason"]
    status = {t["target"]: t["status"] for t in saved["targets"]}
    assert list(status.values())[1:] == ["not measured", "not measured"]
    assert saved["env"] == NCCL_ENV

    check = tensor_parallel.main(["--check", "--device", "cpu", "--tp", "2", "--steps", "6", "--check-workers", "3",
                                  "--out", str(tmp_path), "--date", "2000-01-01"])
    assert check["passed"], check["rows"]
    row = check["rows"][0]
    assert row["tp"] == 2 and row["first_split_step"] is None and row["steps_equal"] == 6
    assert row["max_rel_logit_diff"] <= 2e-4
    assert Path(tmp_path / "2000-01-01-cpu-tensor-parallel-check.json").is_file()
    assert_clean()


@pytest.mark.parametrize("tp", [pytest.param(n, marks=pytest.mark.skipif(GPUS < n, reason=f"needs {n} GPUs"))
                                for n in (2, 4, 8)])
def test_gpu_oracle(random_model, tp):
    """The oracle through the Ray engine on NCCL, bf16 (run on a machine with >= tp GPUs)."""
    from oracle import run_oracle

    path, hf_model = random_model("qwen3", "default", **GPU_SHAPE)
    with hw.HogwildEngine.from_pretrained(str(path), "cuda", "bfloat16", backend="ray", tp=tp,
                                          cache_tokens=2048) as engine:
        worst, finished, _ = run_oracle(engine, hf_model, 3, "combined", kv_tol=BF16_KV_TOL)
    assert worst <= BF16_TOL, f"max relative logit error {worst:.2e} at tp={tp}"
    assert finished >= 4
    assert_clean()
