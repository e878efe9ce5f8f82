"""The examples run on the default model, as functions sharing the test session's engine (one
model load; each script's `__main__` block only parses its flags and calls main)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the scripts act only under __main__
    return module


class Quick:
    """The shared engine with a short finisher: the examples' runs stay a few seconds each."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def __getattr__(self, name: str):
        method = getattr(self.engine, name)
        return functools.partial(method, finisher_tokens=4) if name in ("solve", "stream", "solve_many") else method


@pytest.fixture(scope="module")
def engine(default_engine):
    return Quick(default_engine)


def test_quickstart(engine, capsys):
    result = example("quickstart").main(engine, max_tokens=4)
    out = capsys.readouterr().out
    assert "--- Bob ---" in out and f"answer: {result.answer}" in out


def test_streaming(engine, capsys):
    result = example("streaming").main(engine, max_tokens=4)
    out = capsys.readouterr().out
    assert "[Alice] " in out and "[Bob] " in out and f"answer: {result.answer}" in out


def test_batch(engine, capsys, tmp_path):
    out = tmp_path / "results.jsonl"
    module = example("batch")
    records = module.main(engine, out=out, max_tokens=4)
    assert module.main(engine, out=out, max_tokens=4) == records  # a rerun resumes: nothing left to do
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["apples", "train", 2]  # input order; the file: as they finished
    assert sorted(map(str, (r["id"] for r in lines))) == ["2", "apples", "train"]
    assert "apples: " in capsys.readouterr().out
