"""The throughput benchmark end to end on random:tiny on the CPU: batched, sequential and transformers rows."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

from bench_files import saved_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_throughput_writes_consistent_results(tmp_path):
    import throughput

    out = throughput.main(["--device", "cpu", "--model", "random:tiny", "--sessions", "1,8", "--workers", "2",
                           "--prompts", "24", "--tokens", "4", "--warmup-tokens", "2", "--probe-warmup", "1",
                           "--probe-steps", "2", "--hf-new-tokens", "8", "--hf-repeats", "2", "--out", str(tmp_path),
                           "--date", "2000-01-01"])
    stem = tmp_path / "2000-01-01-cpu-throughput"
    saved = saved_results(stem, out)
    assert saved["benchmark"] == "throughput" and saved["device_name"] and saved["floor_bandwidth_gbs"] > 0
    assert len(saved["copy_samples_gbs"]) == len(saved["read_samples_gbs"]) == 3  # start, after each section
    assert saved["floor_bandwidth_gbs"] == pytest.approx(max(saved["copy_samples_gbs"] + saved["read_samples_gbs"]),
                                                            abs=0.06)
    assert saved["sequential"] == "all" and saved["temperature"] == 0.0 and not saved["skipped"]
    with open(f"{stem}.csv") as f:
        assert len(list(csv.DictReader(f))) == len(saved["rows"])
    cell = {(r["section"], r["sessions"]): r for r in saved["rows"]}
    assert set(cell) == {(s, n) for s in ("batched", "sequential", "transformers") for n in (1, 8)}
    for (section, s), r in cell.items():
        assert r["workers"] == 2 and r["prompt"] == 24
        assert 0 < r["pct_roofline"] <= 100, (section, s, r["pct_roofline"])
        nbytes = saved["weight_bytes_read_per_pass"] + r["kv_tokens_read"] * saved["kv_bytes_per_token"]
        assert r["roofline_ms"] == pytest.approx(nbytes / saved["floor_bandwidth_gbs"] / 1e6, rel=0.01)
        if section == "transformers":
            assert r["batch"] == 2 * s and r["compiled"] is False
            continue
        # every worker generated exactly its budget, in shared passes for the batched rows
        assert r["generated"] == r["generated_expected"] == s * 2 * 4 and not r["count_issue"]
        assert r["prefix_pages_reused"] == r["probe_prefix_pages_reused"] == 0  # distinct problems: nothing shared
        assert r["tokens_per_s"] == pytest.approx(r["generated"] / r["wall_s"])
        probed = s if section == "batched" else 1  # the sequential probe: one session alone
        assert r["probe_active_workers"] == probed * 2 and r["passes"] > 0 and r["ms_per_pass"] > 0
        assert r["decode_tokens_per_s"] == pytest.approx(probed * 2e3 / r["decode_ms"])
    big = cell[("batched", 8)]
    assert big["rows_per_pass"] > 2 and big["sessions_per_pass"] > 1  # several sessions per pass
    assert cell[("sequential", 8)]["rows_per_pass"] == 2 and cell[("sequential", 8)]["sessions_per_pass"] == 1
    # unique K/V: 8 sessions read about 8 times one session's blocks (prompt shared by its workers)
    one = cell[("batched", 1)]["kv_tokens_read"]
    assert 6 * one < big["kv_tokens_read"] < 10 * one
    for s in (1, 8):
        b = cell[("batched", s)]
        assert b["x_sequential"] == pytest.approx(b["tokens_per_s"] / cell[("sequential", s)]["tokens_per_s"])
        assert b["x_sequential_decode"] == pytest.approx(
            b["decode_tokens_per_s"] / cell[("sequential", s)]["decode_tokens_per_s"])
        assert b["x_transformers"] == pytest.approx(
            b["decode_tokens_per_s"] / cell[("transformers", s)]["decode_tokens_per_s"])
    assert saved["max_pct_roofline"] <= 100
    [target] = saved["targets"]
    assert target["status"] in ("met", "missed") and target["value"] == pytest.approx(big["x_sequential"], abs=1e-3)


def test_cli_lists_the_throughput_benchmark():
    from hogwild_ray.cli.bench import BENCHMARKS, GPU_ONLY

    assert "throughput" in BENCHMARKS and "throughput" not in GPU_ONLY
    assert (Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py").is_file()


def test_quick_defaults_per_device():
    import throughput

    gpu = throughput.parse(["--device", "cuda", "--quick"]) if _cuda() else None
    cpu = throughput.parse(["--device", "cpu", "--quick", "--tokens", "7"])
    assert cpu.sessions == [1, 8] and cpu.workers == [2] and cpu.tokens == 7 and cpu.model is None
    assert cpu.sequential == "all" and cpu.warmup_tokens == 4
    full = throughput.parse(["--device", "cpu", "--model", "builtin", "--sections", "batched"])
    assert full.model is None and full.sections == ["batched"] and full.sessions == [1, 4, 8]
    if gpu is not None:
        assert gpu.sessions == [1, 32] and gpu.workers == [4] and gpu.prompts == [4096] and gpu.hf_batches == [128]
    with pytest.raises(SystemExit):
        throughput.parse(["--device", "cpu", "--sections", "nope"])


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
