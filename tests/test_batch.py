"""solve_many / `hogwild-ray batch`: one JSON line per problem, progress, resume after an interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hogwild_ray as hw
from hogwild_ray.batch import one_at_a_time, run_batch
from hogwild_ray.errors import ContextLengthError
from hogwild_ray.core.results import SolveResult, Stats

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [{"id": f"p{i}", "problem": f"Compute {i} + {i}."} for i in range(5)]


def fake_solve(calls: list[str], fail_after: int | None = None):
    """A solver that records its calls and raises KeyboardInterrupt (an interruption) after `fail_after`."""

    def solve(problem: str) -> SolveResult:
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt
        calls.append(problem)
        return SolveResult(problem[-3:], [problem, problem], problem, Stats(forward_passes=1, seconds=0.5))

    return solve


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_solve_many_writes_one_line_per_problem(random_model, tmp_path, capsys):
    engine = hw.HogwildEngine.from_pretrained(random_model("llama")[0], cache_tokens=2048, attention="torch")
    out = tmp_path / "out.jsonl"
    records = engine.solve_many(["Compute 1 + 1.", {"problem": "Compute 2 + 2.", "id": "two"}], out=out,
                                workers=2, max_tokens=4, sampling=hw.SamplingParams(temperature=0))
    assert [r["id"] for r in records] == [0, "two"] and lines(out) == records
    for r in records:
        assert {"id", "problem", "answer", "worker_texts", "transcript", "stats"} <= set(r)
        assert len(r["worker_texts"]) == 2 and r["stats"]["forward_passes"] > 0
    err = capsys.readouterr().err  # not a terminal: plain progress lines
    assert "batch: 2 problems, 0 done" in err and "[1/2] id=" in err and "[2/2] id=" in err
    assert "/2] id=0 " in err and "/2] id=two " in err  # in the order they finished
    again = engine.solve_many(["Compute 1 + 1.", {"problem": "Compute 2 + 2.", "id": "two"}], out=out)
    assert again == records and len(lines(out)) == 2  # everything was done: nothing rerun


def test_interrupted_run_resumes_without_redoing(tmp_path):
    out = tmp_path / "out.jsonl"
    first: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_batch(one_at_a_time(fake_solve(first, fail_after=2)), PROBLEMS, out, progress=False)
    assert [r["id"] for r in lines(out)] == ["p0", "p1"]
    with out.open("a") as f:
        f.write('{"id": "p2", "problem": "Comp')  # a line cut short by a kill
    second: list[str] = []
    records = run_batch(one_at_a_time(fake_solve(second)), PROBLEMS, out, progress=False)
    assert second == [p["problem"] for p in PROBLEMS[2:]]  # p0 and p1 were not redone
    assert [r["id"] for r in lines(out)] == [p["id"] for p in PROBLEMS]
    assert [r["id"] for r in records] == [p["id"] for p in PROBLEMS]


def test_problem_too_long_is_recorded_and_the_run_goes_on(tmp_path):
    def solve(problem: str) -> SolveResult:
        if "1" in problem:
            raise ContextLengthError("the prompt is 9000 tokens, the context holds 8192")
        return fake_solve([])(problem)

    records = run_batch(one_at_a_time(solve), PROBLEMS[:3], tmp_path / "out.jsonl", progress=False)
    assert "error" in records[1] and "9000 tokens" in records[1]["error"]
    assert "answer" in records[0] and "answer" in records[2]


@pytest.mark.parametrize("problems, words", [
    ([{"id": 1, "problem": "a"}, {"id": 1, "problem": "b"}], "appears twice"),
    (["a", "  "], "problem 1"),
    ([{"id": [1], "problem": "a"}], "ids must be strings or integers"),
    ([3], "give a string or a dict"),
])
def test_bad_problems(tmp_path, problems, words):
    with pytest.raises(hw.InvalidRequestError, match=words):
        run_batch(one_at_a_time(fake_solve([])), problems, tmp_path / "out.jsonl", progress=False)
    assert not (tmp_path / "out.jsonl").exists()


def test_unreadable_output_line_is_a_clear_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "p0"}\nnot json\n')
    with pytest.raises(hw.InvalidRequestError, match="out.jsonl:2 is not a JSON line"):
        run_batch(one_at_a_time(fake_solve([])), PROBLEMS, out, progress=False)


def test_cli_batch_killed_then_rerun(random_model, tmp_path):
    """`hogwild-ray batch` (its problems in shared passes) killed after two results; the rerun does
    the rest, each id once."""
    model = random_model("llama")[0]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    problems = [{"id": f"q{i}", "problem": f"Compute {i} * 3."} for i in range(12)]
    inp.write_text("".join(json.dumps(p) + "\n" for p in problems))
    cmd = [sys.executable, "-m", "hogwild_ray", "batch", "--input", str(inp), "--output", str(out),
           "--model", str(model), "--workers", "2", "--max-tokens", "40", "--temperature", "0", "--device", "cpu",
           "--max-concurrent", "3"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]
    before = [r["id"] for r in lines(out)]
    assert 2 <= len(before) < 12
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = [r["id"] for r in lines(out)]
    assert after[:len(before)] == before and sorted(after) == sorted(p["id"] for p in problems)
    assert f"{len(before)} done already in {out}" in rerun.stderr  # finished problems were skipped
    rest = [pid for pid in after if pid not in before]  # run concurrently: they finish in any order
    assert all(f"/12] id={pid} " in rerun.stderr for pid in rest) and f"[{len(before) + 1}/12] id=" in rerun.stderr
