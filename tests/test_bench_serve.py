"""The server load benchmark end to end: `benchmarks/serve.py --quick` starts a real local Ray Serve
with a small random model on the CPU, loads it at C=1 and C=4 with the openai client, and writes
its CSV, JSON and PNG; with two --graph-warmup settings, an app each in turn on the one Ray Serve
(on the CPU, which has no graphs, the warm-up does nothing and captures nothing)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.serve
def test_serve_benchmark_quick(tmp_path, random_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    model = str(random_model("llama")[0])  # a small random model: the benchmark's machinery, in seconds
    run = subprocess.run([sys.executable, "benchmarks/serve.py", "--quick", "--model", model, "--out", str(tmp_path),
                          "--graph-warmup", "0,2"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [csv_path] = tmp_path.glob("*-serve.csv")
    stem = str(csv_path)[: -len(".csv")]
    with open(csv_path) as f:
        both = {(int(r["graph_warmup"]), int(r["concurrency"])): r for r in csv.DictReader(f)}
    assert set(both) == {(0, 1), (0, 4), (2, 1), (2, 4)}
    rows = {c: r for (w, c), r in both.items() if w == 2}
    for r in both.values():
        assert int(r["requests"]) == 4 and int(r["failed"]) == 0, r
        assert float(r["requests_per_s"]) > 0 and float(r["ttft_p50_ms"]) > 0, r
        assert float(r["tokens_per_s"]) > 0 and int(r["completion_tokens"]) > 0
        assert float(r["itl_p50_ms"]) > 0 and float(r["sessions_per_pass"]) > 0.99
        assert int(r["graph_captures"]) == 0 and float(r["graph_capture_s"]) == 0  # the CPU has no graphs
    assert all(float(both[(w, 1)]["x_requests_per_s"]) == 1.0 == float(both[(w, 1)]["x_tokens_per_s"]) for w in (0, 2))
    saved = json.loads(Path(f"{stem}.json").read_text())
    assert saved["graph_warmup"] == [0, 2] and set(saved["startup_s"]) == {"0", "2"} and saved["serve_start_s"] > 0
    assert run.stdout.count("Ray Serve up at") == 1 and run.stdout.count("app up in") == 2
    assert saved["benchmark"] == "serve" and saved["device_name"] and saved["device"] in ("cpu", "cuda")
    assert Path(f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
