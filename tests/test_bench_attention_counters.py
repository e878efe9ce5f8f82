"""attention_counters on the CPU: its refusals, by name, before anything is built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_counters.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,message", [
    (("--workers", "0"), "--workers must be at least 1"),
    (("--workers", "4", "--view", "128"), "--view at least 64 keys a worker"),
    (("--shape", "llama"), "invalid choice"),
])
def test_bad_settings_are_refused_by_name(args, message):
    done = run(*args)
    assert done.returncode != 0 and message in done.stderr, done.stderr


def test_without_a_gpu_it_says_so():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    done = run("--workers", "1", "--view", "1024")
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr, done.stderr
