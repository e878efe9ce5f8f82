"""`hogwild-ray eval` killed (SIGKILL) at random moments again and again, each rerun resuming
the last one's output: no finished record is ever lost, changed or written twice, no line is
corrupt, and the end holds the records of a run nobody killed (runs are seeded per problem)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability

ROOT = Path(__file__).resolve().parents[1]
KILLS = 4


def eval_cmd(model: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "hogwild_ray", "eval", "--model", str(model), "--device", "cpu", "--out", str(out),
            "--generated", "8", "--modes", "single,hogwild", "--workers", "2", "--budgets", "4,12",
            "--finisher-tokens", "3", "--temperature", "1", "--quiet", "--concurrency", "2"]  # runs end one by one


def records(out: Path) -> list[bytes]:
    """Every complete line the run has written so far: the merged results and the part files."""
    files = [out / "results.jsonl", *sorted((out / "parts").glob("*.jsonl"))] if out.exists() else []
    lines = []
    for f in files:
        if f.exists():
            data = f.read_bytes()
            lines += data[:data.rfind(b"\n") + 1].splitlines()
    return lines


def without_seconds(line: bytes) -> dict:
    rec = json.loads(line)  # a corrupt line fails here
    rec.pop("seconds")
    return rec


def key(rec: dict) -> tuple:
    return rec["id"], rec["mode"], rec["workers"], rec["layout"], rec["budget"]


def test_eval_killed_again_and_again_loses_and_repeats_nothing(random_model, tmp_path):
    model = random_model("llama", "default")[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(eval_cmd(model, tmp_path / "whole"), cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    reference = [without_seconds(line) for line in (tmp_path / "whole" / "results.jsonl").read_bytes().splitlines()]
    assert len(reference) == 8 * 2 * 2

    out, rng, kept, killed_with = tmp_path / "killed", random.Random(20), set(), []
    for _ in range(KILLS):
        before = len(records(out))
        proc = subprocess.Popen(eval_cmd(model, out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300
        wanted = before + rng.randint(1, 3)  # some progress first: every kill lands in a run that wrote something
        while proc.poll() is None and len(records(out)) < wanted and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is not None:  # it finished before the kill: the sweep is over early
            assert proc.returncode == 0, proc.stderr.read()[-2000:]
            break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lines = records(out)
        killed_with.append(len(lines))
        recs = [without_seconds(line) for line in lines]
        keys = [key(r) for r in recs]
        assert len(set(keys)) == len(keys), "a record written twice"
        assert kept <= {json.dumps(r, sort_keys=True) for r in recs}, "a finished record lost or changed"
        kept = {json.dumps(r, sort_keys=True) for r in recs}
        assert all(r in reference for r in recs), "a record unlike the uninterrupted run's"
    assert killed_with and killed_with[0] < len(reference)  # the kills landed mid-run
    final = subprocess.run(eval_cmd(model, out), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-2000:]
    results = [without_seconds(line) for line in (out / "results.jsonl").read_bytes().splitlines()]
    assert results == reference  # every record once, in the run's order, as if never killed
    assert {json.dumps(r, sort_keys=True) for r in results} >= kept
    assert not (out / "parts").exists()
