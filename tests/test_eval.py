"""Evaluation with models: forced answers from a fork never change the session, every page comes
back, the runs of each mode, `hogwild-ray eval` end to end on the default model (files, resume),
over worker processes, and its one-line errors."""

from __future__ import annotations

import json

import pytest

import hogwild_ray as hw
from hogwild_ray.cli import main
from hogwild_ray.devices import cpu_name, device_label
from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.eval import experiment, runner
from hogwild_ray.eval.runner import RunSpec, run_budgets
from hogwild_ray.core.protocol import FINISHER_PROMPT

HOT = hw.SamplingParams(temperature=1.0, seed=3)
PROBLEM = "Compute 12 * 7 and explain."


@pytest.fixture(scope="module")
def engine(random_model):
    path, _ = random_model("llama", "default")
    return hw.HogwildEngine.from_pretrained(path, cache_tokens=8192)


def pages_back(engine) -> bool:
    return engine.allocator.free_pages == engine.allocator.num_pages


def spy_forks(session) -> list:
    """Keep the forks `force_answers` makes, to look at them afterwards."""
    forks, fork = [], session.fork
    session.fork = lambda: forks.append(fork()) or forks[-1]
    return forks


@pytest.mark.parametrize("protocol", [True, False])
def test_forced_answers_leave_the_session_as_an_unforked_twin(engine, protocol):
    start = dict(workers=3, sampling=HOT, max_tokens=100, protocol=protocol, finisher_tokens=5, stop_on_answer=False)
    session, twin = engine.start(PROBLEM, **start), engine.start(PROBLEM, **start)
    forks = spy_forks(session)
    for i in range(12):
        if i in (4, 9):
            answers = session.force_answers() if i == 4 else session.force_answers([2, 0])
            assert len(answers) == (3 if i == 4 else 2)
            again = session.force_answers() if i == 4 else session.force_answers([2, 0])
            assert again == answers  # greedy from the same state: the same answers
        assert session.step() == twin.step()
    assert [ws.stream for ws in session.workers] == [ws.stream for ws in twin.workers]
    assert session.layout.common.tokens == twin.layout.common.tokens
    prompt = session.encode(FINISHER_PROMPT)
    fork = forks[0]
    assert fork.done and all(ws.status == "idle" for ws in fork.workers)
    for w in range(3):  # every worker was forced, in the same passes: at most finisher_tokens of them
        stream = fork.workers[w].stream
        at = next(i for i in range(len(stream)) if stream[i:i + len(prompt)] == prompt)
        assert 1 <= len(stream) - at - len(prompt) <= 5
    assert fork.stats.forward_passes - 4 <= 5
    assert [ws.status for ws in forks[2].workers] == ["idle", "idle", "idle"]
    assert forks[2].workers[1].stream == session.workers[1].stream[:len(forks[2].workers[1].stream)]  # not forced
    session.close(), twin.close()
    assert pages_back(engine)


def test_a_finished_run_that_kept_its_pages_can_still_be_forced(engine):
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=4, protocol=False)
    session.auto_close = False
    while not session.done:
        session.step()
    assert session.stats.stop_reason == "budget" and not pages_back(engine)
    assert len(session.force_answers()) == 2
    session.close()
    assert pages_back(engine)
    with pytest.raises(InvalidRequestError, match="closed"):
        session.force_answers()
    closed = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="distinct workers"):
        closed.force_answers([0, 0])
    with pytest.raises(InvalidRequestError, match="distinct workers"):
        closed.force_answers([2])
    closed.close()
    assert pages_back(engine)


def test_automatic_finisher_is_worker_zero_alone(engine):
    session = engine.start(PROBLEM, workers=3, sampling=HOT, max_tokens=6, finisher_tokens=4, redundancy_every=None)
    finisher_passes = 0
    while not session.done:
        finishing = session.finishing
        new = session.step()
        if finishing:
            finisher_passes += 1
            assert new[1] == [] and new[2] == [] and new[0]
    assert 1 <= finisher_passes <= 4
    assert session.stats.stop_reason == "budget+finisher" and session.answer
    assert pages_back(engine)


@pytest.mark.parametrize("spec", [RunSpec("single", 1), RunSpec("independent", 3),
                                  RunSpec("hogwild", 2, "combined"), RunSpec("hogwild", 2, "contiguous"),
                                  RunSpec("hogwild", 3, "interleaved")])
def test_run_budgets_per_mode(engine, spec, monkeypatch):
    problem = {"id": "p", "problem": PROBLEM, "answer": "84"}
    forced = []
    real = hw.Session.force_answers
    monkeypatch.setattr(hw.Session, "force_answers", lambda s, w=None: forced.append(list(w)) or real(s, w))
    recs = run_budgets(engine, problem, spec, [3, 7], HOT, finisher_tokens=3)
    assert [r["budget"] for r in recs] == [3, 7]
    for r in recs:
        assert (r["mode"], r["workers"], r["layout"], r["id"], r["reference"]) == (
            spec.mode, spec.workers, spec.layout, "p", "84")
        assert r["forward_passes"] == r["budget"] and not r["ended"]  # random weights: no early end
        assert len(r["tokens_per_worker"]) == spec.workers and r["correct"] in (True, False)
        assert len(r["worker_answers"]) == (1 if spec.mode == "hogwild" else spec.workers)
    assert recs[1]["tokens_per_worker"] > recs[0]["tokens_per_worker"]
    # hogwild forces worker 0 (the session's finisher); without the protocol every worker lacking a box
    assert forced == ([[0], [0]] if spec.mode == "hogwild" else [list(range(spec.workers))] * 2)
    if spec.mode == "independent":
        assert recs[0]["answer"] == runner.majority(recs[0]["worker_answers"])
    assert pages_back(engine)


def test_a_run_that_ends_early_answers_later_budgets_from_its_end(engine, monkeypatch):
    problem = {"id": "p", "problem": PROBLEM, "answer": "42"}
    step = hw.Session.step

    def answer_at_pass_2(session, inject=None):  # worker 0 writes a finished step with a boxed answer
        if session.stats.forward_passes == 2 and not session.finishing:  # not in the forced forks
            inject = {0: " so it is \\boxed{42}.\n\n"}
        return step(session, inject)

    monkeypatch.setattr(hw.Session, "step", answer_at_pass_2)
    recs = run_budgets(engine, problem, RunSpec("hogwild", 2, "combined"), [2, 5, 9], HOT)
    assert [r["ended"] for r in recs] == [False, True, True]
    assert [r["answer"] for r in recs][1:] == ["42", "42"] and recs[2]["correct"]
    assert recs[1]["forward_passes"] == recs[2]["forward_passes"] == 3
    assert pages_back(engine)


# ---- the command --------------------------------------------------------------------------------

def assert_one_line_error(capsys, words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and words in err, err


@pytest.mark.parametrize("argv, words", [
    (["--workers", "1,x"], "--workers"),
    (["--workers", "0,2"], ">= 1"),
    (["--workers", "2,2"], "appears twice"),
    (["--budgets", "512,256"], "budgets must increase"),
    (["--budgets", "64,64"], "budgets must increase"),
    (["--modes", "single,solo"], "unknown mode 'solo'"),
    (["--layouts", "diagonal"], "unknown layout 'diagonal'; choose from combined"),
    (["--processes", "0"], "--processes"),
    (["--modes", "independent", "--workers", "1"], "independent needs --workers with a count of 2"),
    (["--backend", "ray"], "drop --backend ray"),
    (["--tp", "2"], "drop --backend ray"),
    (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--data", "{missing}"], "missing.jsonl is not a file"),
    (["--data", "{bad}"], "bad.jsonl:2 fits no known shape"),
    (["--data", "{bad}", "--generated", "3"], "exactly one of --data"),
    (["--generated", "0"], "--generated"),
])
def test_eval_errors_are_one_line(tmp_path, capsys, argv, words):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "p", "answer": 1}\n{"prompt": "p"}\n')
    argv = [a.format(missing=tmp_path / "missing.jsonl", bad=bad) for a in argv]
    if "--data" not in argv and "--generated" not in argv:
        argv += ["--generated", "2"]
    assert main(["eval", *argv, "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, words)
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_eval_needs_data_and_out(capsys, tmp_path):
    assert main(["eval", "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "exactly one of --data")
    assert main(["eval", "--generated", "2"]) == 2
    assert_one_line_error(capsys, "--out")


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_end_to_end_on_the_default_model(default_engine, tmp_path, capsys, monkeypatch):
    out = tmp_path / "eval"
    argv = ["eval", "--generated", "8", "--workers", "2", "--budgets", "2,4", "--finisher-tokens", "3",
            "--out", str(out)]
    free = default_engine.allocator.free_pages
    assert main(argv, default_engine) == 0
    assert default_engine.allocator.free_pages == free
    recs = read(out / "results.jsonl")
    configs = [("single", 1, None), ("independent", 2, None), ("hogwild", 2, "combined")]
    assert [(r["id"], r["mode"], r["workers"], r["layout"], r["budget"]) for r in recs] == [
        (f"arith-0-{i}", *c, b) for i in range(8) for c in configs for b in (2, 4)]
    assert all(r["forward_passes"] <= r["budget"] or r["ended"] for r in recs)
    assert any(r["answer"] for r in recs)  # the real model states some answer when forced
    summary = (out / "summary.md").read_text()
    for mode, layout, workers in (("single", "-", 1), ("independent", "-", 2), ("hogwild", "combined", 2)):
        for budget in (2, 4):
            assert f"| {mode} | {layout} | {workers} | {budget} |" in summary
    assert "| 8 |" in summary and "95% CI" in summary
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert "results in" in capsys.readouterr().out
    assert f"- device: {device_label(default_engine.device)}" in summary  # the engine's, not "auto"
    if default_engine.device.type == "cpu":
        assert f"- device: cpu: {cpu_name()}, " in summary
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.jsonl", "summary.md"]  # no parts/

    # resume: drop the last run's lines, as if interrupted; only that run runs again
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-2]) + lines[-2][:20])  # and a half-written line
    calls = []
    real = experiment.run_budgets
    monkeypatch.setattr(experiment, "run_budgets", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert main(argv, default_engine) == 0
    assert calls == [RunSpec("hogwild", 2, "combined")]
    again = read(out / "results.jsonl")
    assert len(again) == len(recs) and again[:-2] == recs[:-2]
    assert [dict(r, seconds=0) for r in again[-2:]] == [dict(r, seconds=0) for r in recs[-2:]]  # seeded per problem
    assert main(argv, default_engine) == 0 and len(calls) == 1  # all done: nothing runs
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.jsonl", "summary.md"]


def test_eval_processes_merge_to_the_same_results(random_model, engine, tmp_path, capsys):
    path, _ = random_model("llama", "default")
    common = ["eval", "--model", str(path), "--generated", "4", "--modes", "single,hogwild", "--workers", "2",
              "--budgets", "2,4", "--finisher-tokens", "3", "--temperature", "1", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "one")], engine) == 0
    assert main([*common, "--out", str(tmp_path / "two"), "--processes", "2"]) == 0
    one, two = read(tmp_path / "one" / "results.jsonl"), read(tmp_path / "two" / "results.jsonl")
    assert len(one) == 4 * 2 * 2

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rs]

    assert strip(two) == strip(one)  # same seeds per problem, whichever process ran it
    for out in ("one", "two"):
        assert sorted(p.name for p in (tmp_path / out).iterdir()) == ["accuracy.png", "results.jsonl", "summary.md"]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # what the worker processes load on
    assert f"- device: {device_label(device)}" in (tmp_path / "two" / "summary.md").read_text()
    assert "2 processes" in (tmp_path / "two" / "summary.md").read_text()
