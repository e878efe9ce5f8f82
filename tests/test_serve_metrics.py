"""The front's sums of its engine replicas' counters: a replica that stops reporting (replaced after
failed health checks, or scaled down) leaves the gauges, while the counters never fall."""

from __future__ import annotations

import pytest

pytest.importorskip("prometheus_client")

from hogwild_ray.serve.metrics import STALE_S, EngineSnapshots, ServerMetrics  # noqa: E402


def snapshot(passes: int, rows_per_pass: float, used: int, total: int = 2048, max_rows: int = 8) -> dict:
    return {"passes": passes, "rows_per_pass": rows_per_pass, "sessions_per_pass": 1.0, "max_rows_per_pass": max_rows,
            "pages_used": used, "pages_total": total, "pages_shared": 0, "prompt_pages_reused": passes // 10,
            "passes_launched_ahead": passes // 2, "launched_ahead_dropped": 1, "graph_captures": 3,
            "graph_capture_seconds": 0.5}


def test_a_silent_replica_leaves_the_gauges_and_its_counters_stay():
    snaps = EngineSnapshots()
    snaps.update("a", snapshot(100, 4.0, used=10, max_rows=32), now=0.0)
    snaps.update("b", snapshot(50, 2.0, used=20), now=0.0)
    both = snaps.totals(now=1.0)
    assert both["replicas"] == 2 and both["pages_total"] == 4096 and both["pages_used"] == 30
    assert both["passes"] == 150 and both["rows"] == 500 and both["graph_captures"] == 6
    # "a" was replaced: its successor "c" reports, "b" keeps reporting, "a" is never heard again
    snaps.update("b", snapshot(60, 2.0, used=22), now=STALE_S)
    snaps.update("c", snapshot(5, 1.0, used=1), now=STALE_S)
    later = snaps.totals(now=STALE_S + 1.0)
    assert later["replicas"] == 2 and later["pages_total"] == 4096 and later["pages_used"] == 23
    assert later["kv_cache_usage"] == pytest.approx(23 / 4096)
    assert later["passes"] == 100 + 60 + 5 and later["rows"] == 400 + 120 + 5  # "a"'s passes still counted
    assert later["rows_per_pass"] == pytest.approx(525 / 165)
    assert later["graph_captures"] == 9 and later["launched_ahead"] == 50 + 30 + 2
    assert later["max_rows_per_pass"] == 32  # the high-water mark of a gone replica too
    assert snaps.totals(now=STALE_S + 2.0)["passes"] == later["passes"]  # retired once, not again


def test_the_rendered_series_count_the_live_replicas():
    metrics = ServerMetrics()
    metrics.engines.update("a", snapshot(10, 1.0, used=5))
    text = metrics.render().decode()
    assert "hogwild:engine_replicas 1.0" in text and "hogwild:kv_cache_pages_total 2048.0" in text
    assert "hogwild:forward_passes_total 10.0" in text
