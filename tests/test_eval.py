"""Evaluation with models: forced answers from a fork never change the session, every page comes
back, the runs of each mode, `hogwild-ray eval` end to end on the default model (files, resume),
its runs concurrent in shared passes with the records of one run at a time (an interruption
resumes, runs that cannot run are recorded), and its one-line errors."""

from __future__ import annotations

import json
from dataclasses import astuple

import pytest
from dictation import dictate

import hogwild_ray as hw
from hogwild_ray import scheduler
from hogwild_ray.cli import main
from hogwild_ray.devices import cpu_name, device_label
from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.eval import arithmetic_problems, experiment, runner
from hogwild_ray.eval.runner import RunSpec, run_budgets
from hogwild_ray.core.protocol import FINISHER_PROMPT
from hogwild_ray.prompt_text import encode_text

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
    real = hw.Session.forced_answers_job
    monkeypatch.setattr(hw.Session, "forced_answers_job", lambda s, w=None: forced.append(list(w)) or real(s, w))
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
    text = " so it is \\boxed{42}.\n\n"
    # After pass 2 worker 0 writes a finished step with a boxed answer: it samples the text's n
    # tokens in passes 3 .. n + 2, each fed the pass after; its last one, the paragraph break, is
    # fed in pass n + 3, which finishes the step with the answer and ends the run. The budgets
    # are placed around that end as [2, 5, 9] were around pass 3 (one before it, two after).
    end = len(encode_text(engine.tokenizer, text)) + 3
    step, dictated = hw.Session.step, []

    def answer_from_pass_3(session, inject=None):  # the run's session, not its forced forks
        if session.stats.forward_passes == 2 and not session.finishing and not dictated:
            dictated.append(session)
            dictate(monkeypatch, session, 0, text)
        return step(session, inject)

    monkeypatch.setattr(hw.Session, "step", answer_from_pass_3)
    recs = run_budgets(engine, problem, RunSpec("hogwild", 2, "combined"), [2, end + 2, end + 6], HOT)
    assert len(dictated) == 1
    assert [r["ended"] for r in recs] == [False, True, True]
    assert [r["answer"] for r in recs][1:] == ["42", "42"] and recs[2]["correct"]
    assert recs[1]["forward_passes"] == recs[2]["forward_passes"] == end
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
    (["--processes", "8"], "--processes is gone: eval runs its runs concurrently in one engine's shared "
                           "forward passes; use --concurrency N"),
    (["--processes"], "use --concurrency N"),
    (["--concurrency", "0"], "--concurrency"),
    (["--concurrency", "x"], "--concurrency"),
    (["--modes", "independent", "--workers", "1"], "independent needs --workers with a count of 2"),
    (["--tp", "2"], "drop --tp (for more devices, --replicas R runs R engines"),
    (["--replicas", "0"], "--replicas"),
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
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.jsonl", "settings.json",
                                                     "summary.md"]  # no parts/

    # resume: drop the last run's lines, as if interrupted; only that run runs again
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(lines[:-2]) + lines[-2][:20])  # and a half-written line
    calls = []
    real = runner.budgets_job
    monkeypatch.setattr(runner, "budgets_job", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    assert main(argv, default_engine) == 0
    assert calls == [RunSpec("hogwild", 2, "combined")]
    again = read(out / "results.jsonl")
    assert len(again) == len(recs) and again[:-2] == recs[:-2]
    assert [dict(r, seconds=0) for r in again[-2:]] == [dict(r, seconds=0) for r in recs[-2:]]  # seeded per problem
    assert main(argv, default_engine) == 0 and len(calls) == 1  # all done: nothing runs
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.jsonl", "settings.json", "summary.md"]

    # a rerun made otherwise is refused before anything runs: its records would be mixed with these
    before = (out / "results.jsonl").read_bytes()
    assert main([*argv, "--temperature", "0"], default_engine) == 2
    err = capsys.readouterr().err
    assert f"--out {out} holds an evaluation made otherwise (sampling " in err and "'temperature': 0.0" in err
    assert (out / "results.jsonl").read_bytes() == before and len(calls) == 1


# ---- concurrent runs -----------------------------------------------------------------------------

def strip(recs: list[dict]) -> list[dict]:
    """Records without their wall-clock seconds."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in recs]


def sharing(engine, run) -> float:
    """Mean sessions per forward pass while run() runs (forks count as sessions)."""
    c = engine.counters
    passes, sessions = c.passes, c.sessions_in_passes
    run()
    return (c.sessions_in_passes - sessions) / max(c.passes - passes, 1)


CONCURRENT = ["eval", "--generated", "4", "--modes", "single,independent,hogwild", "--workers", "2",
              "--layouts", "combined,interleaved", "--budgets", "2,5,9", "--finisher-tokens", "3",
              "--temperature", "1", "--quiet"]  # 4 problems x 4 configurations, sampled and seeded


@pytest.fixture(scope="module")
def one_at_a_time(engine, random_model, tmp_path_factory):
    """The reference: CONCURRENT with --concurrency 1 (every pass holds one session, run or fork)."""
    out = tmp_path_factory.mktemp("one") / "eval"
    argv = [*CONCURRENT, "--model", str(random_model("llama", "default")[0]), "--out", str(out),
            "--concurrency", "1"]
    per_pass = sharing(engine, lambda: main(argv, engine))
    assert per_pass == 1
    return out, read(out / "results.jsonl")


def test_concurrent_runs_share_passes_and_match_one_at_a_time(engine, random_model, one_at_a_time, tmp_path):
    ref_out, ref = one_at_a_time
    assert len(ref) == 4 * 4 * 3 and any(r["forward_passes"] == 9 for r in ref)
    free = engine.allocator.free_pages
    argv = [*CONCURRENT, "--model", str(random_model("llama", "default")[0]), "--out", str(tmp_path)]
    per_pass = sharing(engine, lambda: main(argv, engine))
    assert per_pass > 4  # 16 runs (and their forks) together in a pass, not one after another
    assert engine.allocator.free_pages == free and engine.schedulers == []
    recs = read(tmp_path / "results.jsonl")
    fields = ("id", "mode", "workers", "layout", "budget", "answer", "worker_answers", "tokens_per_worker",
              "forward_passes", "ended", "correct")
    assert [[r[k] for k in fields] for r in recs] == [[r[k] for k in fields] for r in ref]
    assert strip(recs) == strip(ref)  # sampled at temperature 1: per-problem seeds, not the run's company
    assert len({tuple(r["tokens_per_worker"]) for r in recs}) > 4  # the runs really differ
    problem, spec = arithmetic_problems(4, 0)[1], RunSpec("hogwild", 2, "interleaved")  # and as a run alone
    sampling = runner.worker_sampling(hw.SamplingParams(1.0, 0, 0.95), 0, 1)
    alone = run_budgets(engine, problem, spec, [2, 5, 9], sampling, finisher_tokens=3, redundancy_every=128)
    assert strip(alone) == strip([r for r in ref if experiment.run_key(r) == (problem["id"], *astuple(spec))])
    ref_summary, summary = (ref_out / "summary.md").read_text(), (tmp_path / "summary.md").read_text()
    assert "; one engine, one run at a time (--concurrency 1)" in ref_summary
    note = next(line for line in summary.splitlines() if line.startswith("- device: "))
    assert "; runs in shared forward passes of one engine, as many at once as fit in the K/V cache, " in note
    assert int(note.split("K/V cache, ")[1].split()[0]) > 4 and note.endswith(
        " at the peak; wall s: each run's time, sharing passes with the others")
    def drop(text: str) -> list[str]:  # all but the device line and the table's wall seconds
        return [line.rsplit("|", 2)[0] for line in text.splitlines() if not line.startswith("- device: ")]

    assert drop(summary) == drop(ref_summary)


def test_concurrency_caps_the_runs_at_once(engine, random_model, one_at_a_time, tmp_path):
    argv = [*CONCURRENT, "--model", str(random_model("llama", "default")[0]), "--out", str(tmp_path),
            "--concurrency", "3", "--modes", "hogwild", "--layouts", "combined"]
    most, real = [], scheduler.run_pass
    with pytest.MonkeyPatch.context() as m:  # every running run asks for one session's pass (its own or a fork's)
        m.setattr(scheduler, "run_pass", lambda sessions, **k: most.append(len(sessions)) or real(sessions, **k))
        assert main(argv, engine) == 0
    assert max(most) == 3
    assert "engine, up to 3 at once (--concurrency 3), 3 at the peak; wall s" in (tmp_path / "summary.md").read_text()
    ref = [r for r in strip(one_at_a_time[1]) if r["mode"] == "hogwild" and r["layout"] == "combined"]
    assert strip(read(tmp_path / "results.jsonl")) == ref


def test_interrupted_concurrent_eval_resumes(engine, random_model, one_at_a_time, tmp_path, capsys, monkeypatch):
    """Killed after three runs finished (others were mid-way): their records are kept, the rerun
    runs the rest only, and the results are those of an uninterrupted run."""
    argv = [*CONCURRENT, "--model", str(random_model("llama", "default")[0]), "--out", str(tmp_path),
            "--modes", "single,hogwild", "--layouts", "interleaved"]  # 8 of the 16 runs
    argv.remove("--quiet")
    free = engine.allocator.free_pages
    describe, done = experiment.describe, []

    def interrupt_after_three(recs):  # each finished run is written, then described for its progress line
        done.append(experiment.run_key(recs[0]))
        if len(done) == 3:
            raise KeyboardInterrupt
        return describe(recs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(experiment, "describe", interrupt_after_three)
        assert main(argv, engine) == 130
    assert engine.allocator.free_pages == free and engine.schedulers == []  # the running runs closed
    assert "[2/8] id=" in capsys.readouterr().err  # progress lines: one per finished run
    part = tmp_path / "parts" / "part-0.jsonl"
    assert [experiment.run_key(r) for r in read(part)[::3]] == done  # one write per run, 3 budgets each
    with part.open("a") as f:
        f.write('{"id": "arith-0-3", "mode": "hog')  # a line cut short by a kill
    calls = []
    real = runner.budgets_job
    monkeypatch.setattr(runner, "budgets_job", lambda *a, **k: calls.append((a[2].mode, a[2].layout)) or real(
        *a, **k))
    assert main(argv, engine) == 0
    assert len(calls) == 8 - 3
    err = capsys.readouterr().err
    assert "eval: 8 runs, 3 already in" in err and "5 to run" in err and "[8/8] id=" in err
    ref = [r for r in strip(one_at_a_time[1]) if r["mode"] == "single" or r["layout"] == "interleaved"]
    assert strip(read(tmp_path / "results.jsonl")) == ref
    assert not (tmp_path / "parts").exists()  # part-0 and the rerun's own part-1 are merged


def test_runs_that_cannot_run_are_recorded_and_the_others_go_on(engine, random_model, tmp_path):
    data = tmp_path / "data.jsonl"
    problems = [{"id": "short", "problem": "Compute 1 + 1.", "answer": "2"},
                {"id": "long", "problem": "Compute 1 + 1. " * 400, "answer": "2"},
                {"id": "short2", "problem": "Compute 2 + 2.", "answer": "4"}]
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    argv = ["eval", "--model", str(random_model("llama", "default")[0]), "--data", str(data), "--modes",
            "single,hogwild", "--workers", "2", "--budgets", "2,3", "--finisher-tokens", "3", "--quiet",
            "--out", str(tmp_path / "out")]
    assert main(argv, engine) == 0
    recs = read(tmp_path / "out" / "results.jsonl")
    assert [(r["id"], r["mode"], r["budget"]) for r in recs] == [
        (p, m, b) for p in ("short", "long", "short2") for m in ("single", "hogwild") for b in (2, 3)]
    for r in recs:
        assert ("error" in r) == (r["id"] == "long")
    assert "tokens" in recs[4]["error"] and recs[4]["answer"] is None and not recs[4]["correct"]
    # too big for the whole cache (8192 tokens): recorded as well, before anything runs
    big = [*argv[:-1], str(tmp_path / "big"), "--workers", "8", "--modes", "hogwild", "--layouts", "interleaved",
           "--budgets", "2,4000"]
    assert main(big, engine) == 0
    recs = read(tmp_path / "big" / "results.jsonl")
    assert len(recs) == 6 and all("error" in r for r in recs)
    assert all(("pages" in r["error"]) == (r["id"] != "long") for r in recs), recs[0]["error"]


# ---- damaged output files, bad data: one-line errors before any load -----------------------------

@pytest.fixture
def no_load(monkeypatch):
    """A model load fails the test: the error must come before it."""
    def loaded(*a, **k):
        raise AssertionError("the model began to load before the error")

    monkeypatch.setattr(hw.HogwildEngine, "from_pretrained", loaded)


def eval_record(pid: str, budget: int) -> bytes:
    return json.dumps({"id": pid, "mode": "single", "workers": 1, "layout": None, "budget": budget,
                       "answer": "1", "reference": "1", "correct": True}).encode() + b"\n"


@pytest.mark.reliability
@pytest.mark.parametrize("middle", [
    b'{"id": "arith-0-1", "mode": "sin' + eval_record("arith-0-1", 4),  # a cut line another write went on from
    b'{"id": "arith-0-1", "answer": "Caf\xc3' + eval_record("arith-0-1", 4),  # cut inside a UTF-8 character
    b'{"id": "arith-0-1"}\n',  # JSON, but no evaluation record
])
def test_a_bad_line_inside_a_part_file_is_a_one_line_error(tmp_path, capsys, no_load, middle):
    out = tmp_path / "out"
    (out / "parts").mkdir(parents=True)
    part = out / "parts" / "part-0.jsonl"
    part.write_bytes(eval_record("arith-0-0", 2) + middle + eval_record("arith-0-0", 4) + b'{"id": "arith-0-1", "mo')
    assert main(["eval", "--generated", "2", "--modes", "single", "--budgets", "2,4", "--out", str(out)]) == 2
    assert_one_line_error(capsys, "part-0.jsonl:2 ")
    assert part.read_bytes().endswith(b'{"id": "arith-0-1", "mo')  # read only, never rewritten


@pytest.mark.reliability
def test_a_part_file_another_run_took_is_never_shared(tmp_path, monkeypatch):
    """Two runs into one directory: each appends to a part file of its own, even when both
    looked for a free name before either made its file."""
    with experiment.new_part(tmp_path) as first:
        monkeypatch.setattr(experiment, "part_files", lambda out: [])
        with experiment.new_part(tmp_path) as second:
            assert first.path != second.path


@pytest.mark.reliability
@pytest.mark.parametrize("data, words", [
    (b'{"problem": "p", "answer": 1}\n{"problem": "Caf\xe9?", "answer": 2}\n',
     "data.jsonl:2 is not UTF-8 text (byte 0xe9); save it as UTF-8"),
    (b'{"problem": "p", "answer": 1}\n{"problem": "\\ud800?", "answer": 2}\n',
     "data.jsonl:2's problem is not valid UTF-8 text (lone surrogate \\ud800 at character 0)"),
    (b'[{"problem": "p", "answer": 1},\n {"problem": "\xff", "answer": 2}]',
     "data.jsonl:2 is not UTF-8 text (byte 0xff)"),
])
def test_data_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys, no_load, data, words):
    (tmp_path / "data.jsonl").write_bytes(data)
    assert main(["eval", "--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys, words)
