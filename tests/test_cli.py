"""The command line, the live view, the quickstart example and the CPU benchmark."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

import hogwild_ray as hw
from hogwild_ray.cli import main
from hogwild_ray.ui import LiveView

ROOT = Path(__file__).resolve().parents[1]
RUN_FLAGS = ["--model", "--workers", "--max-tokens", "--max-steps", "--layout", "--temperature", "--top-k",
             "--top-p", "--seed", "--device", "--dtype", "--redundancy-every", "--no-redundancy", "--no-live",
             "--json"]


def test_help_mentions_every_flag(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert "run" in top and "--version" in top and "example" in top
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in RUN_FLAGS:
        assert flag in out, flag
    for layout in hw.LAYOUTS:
        assert layout in out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert hw.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--workers", "0"], "--workers"),
    (["--max-tokens", "-3"], "--max-tokens"),
    (["--layout", "diagonal"], "--layout"),
    (["--top-p", "2"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--model", "/nonexistent"], "/nonexistent"),
])
def test_bad_values_are_one_line_errors(capsys, argv, words):
    assert main(["run", "What is 2+3?", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err
    assert "Traceback" not in err


def test_engine_errors_are_one_line(capsys, default_engine):
    assert main(["run", "   ", "--json"], engine=default_engine) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "problem" in err and "\n" not in err


def test_run_json(capsys, default_engine):
    argv = ["run", "What is 2+3?", "--max-tokens", "8", "--workers", "2", "--json", "--temperature", "0"]
    assert main(argv, engine=default_engine) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"answer", "worker_texts", "transcript", "stats"} <= set(out)
    assert len(out["worker_texts"]) == 2 and all(out["worker_texts"])
    stats = out["stats"]
    assert stats["forward_passes"] > 0 and len(stats["generated_per_worker"]) == 2
    assert max(stats["generated_per_worker"]) <= 8 and "tokens_per_second" in stats


def test_run_plain_output(capsys, default_engine):
    argv = ["run", "What is 2+3?", "--max-tokens", "6", "--workers", "3", "--temperature", "0", "--no-redundancy"]
    assert main(argv, engine=default_engine) == 0
    out = capsys.readouterr().out
    for name in ("Alice", "Bob", "Carol"):
        assert name in out  # not a terminal: each worker's text is printed once, at the end
    assert "answer:" in out and "forward passes" in out


def test_live_view_renders_every_worker(default_engine):
    buf = io.StringIO()
    view = LiveView(Console(file=buf, force_terminal=True, width=120, height=40), fps=1000)
    assert view.enabled
    with view:
        default_engine.solve("What is 2+3?", workers=3, max_tokens=6, on_step=view.on_step,
                             sampling=hw.SamplingParams(temperature=0))
    text = Console(file=io.StringIO(), width=120, height=40, record=True)
    text.print(view.render(view.session))
    shown = text.export_text()
    for name in ("Alice", "Bob", "Carol"):
        assert name in shown
    assert "forward passes" in shown and "tokens/s" in shown and buf.getvalue()
    assert not LiveView(Console(file=io.StringIO())).enabled  # not a terminal: nothing live


def test_quickstart_example():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--max-tokens", "8"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert any(line.startswith("answer:") for line in out.stdout.splitlines())


def test_benchmark_writes_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "workers_cpu.py"), "--passes", "4", "--warmup", "1",
           "--repeats", "1", "--workers", "1,2", "--out", str(tmp_path), "--date", "2000-01-01"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    stem = tmp_path / "2000-01-01-cpu-workers"
    data = json.loads(stem.with_suffix(".json").read_text())
    assert data["torch"] and data["cpu"] and [r["workers"] for r in data["results"]] == [1, 2]
    assert data["results"][0]["tokens_per_s_vs_1"] == 1.0
    assert stem.with_suffix(".csv").read_text().startswith("workers,")
    assert stem.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
