"""skinny_gemm's report on the CPU: the floor, the table's picked launch shapes for few and wide
rows, the result files; its timings are a device's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("triton")


def _row(weight: str, rows: int, kernel: str, config, us: float, n: int = 4096, k: int = 4096) -> dict:
    moved = n * k * 2 + rows * (n + k) * 2
    return {"weight": weight, "n": n, "k": k, "rows": rows, "kernel": kernel, "config": str(config), "us": us,
            "bytes": moved, "GBps": moved / us / 1e3, "rel_err": 1e-3}


def test_the_report_takes_wide_rows_picked_shape_and_raises_the_floor_to_the_fastest_product(tmp_path, capsys):
    """Rows past MAX_ROWS are reported against the wide launch shape pick gives them; the fastest
    product timed raises the floor, so no row reads above 100% of it."""
    from bandwidth import Bandwidth
    from skinny_gemm import report

    from hogwild_kernels.skinny import WIDE_CONFIGS, pick

    wide, few = pick(4096, 4096, rows=128), pick(4096, 4096, rows=16)
    assert wide in WIDE_CONFIGS and wide != few
    rows = [_row("o", 16, "cublas", None, 15.7), _row("o", 16, "skinny", "picked " + str(few), 14.3),
            _row("o", 128, "cublas", None, 15.0), _row("o", 128, "skinny", "picked " + str(wide), 18.2),
            _row("o", 128, "skinny", (64, 64, 4, 3), 9.0)]  # faster than the probes' bandwidth
    floor = Bandwidth("cpu", 1 << 20, copies=[3.0e12])
    report(rows, floor, "qwen3-8b", "test device", "2026-01-01", tmp_path, {})
    fastest = max(r["bytes"] / r["us"] * 1e6 for r in rows)
    assert floor.value == pytest.approx(fastest)
    assert all(0 < r["fraction_of_floor"] <= 1 + 1e-9 for r in rows)
    out = capsys.readouterr().out
    assert "above 100%" not in out and "18.2" in out and "14.3" in out
    stem = tmp_path / "2026-01-01-test_device-skinny_gemm"
    written = json.loads(Path(f"{stem}.json").read_text())
    assert written["device"] == "test device" and len(written["rows"]) == len(rows)
    assert written["floor_bandwidth_gbs"] == pytest.approx(fastest / 1e9, abs=0.1)
    assert Path(f"{stem}.csv").read_text().count("\n") == len(rows) + 1 and Path(f"{stem}.png").stat().st_size
