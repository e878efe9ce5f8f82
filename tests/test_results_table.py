"""benchmarks/results_table.py: a results file's rows as the README's Markdown tables, and its
errors, each naming the problem and what the file has instead."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results_table  # noqa: E402

H200_ATTENTION = ROOT / "benchmarks" / "results" / "2026-12-04-NVIDIA_H200-attention.json"


def test_a_committed_result_gives_the_readme_table_rows(capsys):
    """The README's H200 attention table, 4k views, its numbers as the README prints them."""
    columns = ("shape,view,workers,triton_us:.1f,three_stages_us:.1f,three_stages_x:{:.2f}x,eight_warps_x:{:.2f}x,"
               "sdpa_us:.1f,speedup_vs_sdpa:{:.2f}x,floor_us:.1f,x_floor:{:.2f}x")
    assert results_table.main([str(H200_ATTENTION), "--columns", columns, "--where", "view=4096",
                               "--where", "workers=1,16", "--where", "shape=qwen3-8b"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "`2026-12-04-NVIDIA_H200-attention.json`, NVIDIA H200, floor bandwidth 4507.1 GB/s"
    assert out[2].startswith("| shape | view | workers | triton_us |") and out[3] == "|" + "---|" * 11
    assert out[4:] == ["| qwen3-8b | 4096 | 1 | 12.4 | 12.8 | 1.03x | 1.06x | 12.2 | 0.98x | 3.7 | 3.33x |",
                       "| qwen3-8b | 4096 | 16 | 21.3 | 21.3 | 1.00x | 1.02x | 64.8 | 3.04x | 3.7 | 5.73x |"]
    readme = (ROOT / "README.md").read_text()  # the same figures as the README's row for 16 workers
    assert "| Qwen3-8B 32/8 | 4k | 16 | 21.3 | 21.3 | 1.00x | 1.02x | 64.8 | 3.04x | 3.7 | 5.73x |" in readme


def test_rows_match_numbers_as_numbers_and_cells_keep_their_precision():
    rows = [{"workers": 16, "ms": 6.123456, "name": "a", "gpu": None, "ok": True},
            {"workers": 4.0, "ms": 0.0003851, "name": "b", "gpu": 1.5, "ok": False}]
    assert results_table.select(rows, {"workers": ["16.0"]}) == rows[:1]
    assert results_table.select(rows, {"workers": ["4"], "name": ["a", "b"]}) == rows[1:]
    table = results_table.render(rows, results_table.parse_columns("name,ms,gpu,ok,workers"))
    assert table.splitlines()[2:] == ["| a | 6.123 | - | True | 16 |", "| b | 0.0003851 | 1.5 | False | 4 |"]


@pytest.mark.parametrize("argv, words", [
    (["--columns", "nope"], ["no column nope", "they have:", "triton_us"]),
    (["--columns", "view", "--where", "workers=3"], ["no row matches", "50 rows"]),
    (["--columns", "view", "--where", "colour=red"], ["no column colour", "they have:"]),
    (["--columns", "view", "--where", "view"], ["--where 'view'", "key=value"]),
    (["--columns", "view:{1}"], ["format does not suit"]),
    (["--columns", "view:q"], ["format does not suit"]),
    (["--columns", ","], ["name at least one column"]),
])
def test_a_request_the_file_cannot_answer_is_one_clear_line(capsys, argv, words):
    assert results_table.main([str(H200_ATTENTION), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert all(w in captured.err for w in words), captured.err


def test_files_that_are_not_results_are_refused_clearly(capsys, tmp_path):
    cases = {"missing.json": None, "rows.csv": "a,b\n1,2\n", "broken.json": "{", "empty.json": '{"rows": []}',
             "list.json": "[1, 2]"}
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        assert results_table.main([str(path), "--columns", "a"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}") and ("no such file" in err or ".json" in err or "not a results"
                                                     in err or "no rows" in err), err


@pytest.mark.parametrize("key", ["rows", "results"])  # the CPU workers benchmark's files name them results
def test_settings_beside_the_rows_give_the_caption(capsys, tmp_path, key):
    path = tmp_path / "2000-01-01-cpu-x.json"
    path.write_text(json.dumps({"device": "cpu", "date": "2000-01-01", key: [{"a": 1}]}))
    assert results_table.main([str(path), "--columns", "a"]) == 0
    assert capsys.readouterr().out.splitlines()[0:4] == ["`2000-01-01-cpu-x.json`, cpu, 2000-01-01", "", "| a |",
                                                         "|---|"]
