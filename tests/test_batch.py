"""solve_many / `hogwild-ray batch`: one JSON line per problem, progress, resume after an interruption."""

from __future__ import annotations

import base64
import json
import os
import random
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
    assert "batch: 2 problems, 0 already in" in err and "[1/2] id=" in err and "[2/2] id=" in err
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


def test_a_rerun_tries_the_problems_recorded_with_an_error_again(tmp_path):
    """An error record (a cache another session held, a context too short then) does not end its
    problem: the rerun runs it, and its new line follows the old one (the last line of an id wins)."""
    out = tmp_path / "out.jsonl"

    def cache_held(problem: str) -> SolveResult:
        if "1" in problem:
            raise ContextLengthError("the prompt is 9000 tokens, the context holds 8192")
        return fake_solve([])(problem)

    first = run_batch(one_at_a_time(cache_held), PROBLEMS[:3], out, progress=False)
    assert "error" in first[1]
    calls: list[str] = []
    again = run_batch(one_at_a_time(fake_solve(calls)), PROBLEMS[:3], out, progress=False)
    assert calls == ["Compute 1 + 1."] and "answer" in again[1] and again[0] == first[0]
    assert [(r["id"], "error" in r) for r in lines(out)] == [("p0", False), ("p1", True), ("p2", False),
                                                            ("p1", False)]
    assert run_batch(one_at_a_time(fake_solve(calls)), PROBLEMS[:3], out, progress=False) == again
    assert len(calls) == 1  # nothing left to run


def test_a_rerun_with_other_problems_under_the_same_ids_is_refused(tmp_path):
    """Ids by position (plain strings) or the same ids in another input file: the old answers must not
    pass for the new problems' answers."""
    out = tmp_path / "out.jsonl"
    run_batch(one_at_a_time(fake_solve([])), ["What is 1+1?", "What is 2+2?"], out, progress=False)
    before = out.read_bytes()
    with pytest.raises(hw.InvalidRequestError, match=r"already has a record with id 0 for another problem "
                                                    r"\('What is 1\+1\?' there, 'What is 3\+3\?' now\)"):
        run_batch(one_at_a_time(fake_solve([])), ["What is 3+3?", "What is 2+2?"], out, progress=False)
    assert out.read_bytes() == before


def test_two_runs_never_write_one_output_at_once(tmp_path):
    from hogwild_ray import jsonl

    out = tmp_path / "out.jsonl"
    with jsonl.Appender(out, lock=True):  # another run, still writing
        assert jsonl.in_use(out)
        with pytest.raises(hw.InvalidRequestError, match="out.jsonl is being written by another run"):
            run_batch(one_at_a_time(fake_solve([])), PROBLEMS, out, progress=False)
    assert not jsonl.in_use(out) and out.read_bytes() == b""
    assert len(run_batch(one_at_a_time(fake_solve([])), PROBLEMS, out, progress=False)) == len(PROBLEMS)


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    """Another tool's file whose last record has no newline after it: a record, not a line cut short."""
    out = tmp_path / "out.jsonl"
    kept = {"id": "p1", "problem": "Compute 1 + 1.", "answer": "EXPENSIVE"}
    out.write_text(json.dumps({"id": "p0", "problem": "Compute 0 + 0.", "answer": "0"}) + "\n" + json.dumps(kept))
    calls: list[str] = []
    records = run_batch(one_at_a_time(fake_solve(calls)), PROBLEMS[:3], out, progress=False)
    assert calls == ["Compute 2 + 2."] and records[1] == kept
    assert [r["id"] for r in lines(out)] == ["p0", "p1", "p2"]


def test_the_input_file_may_hold_line_separators_inside_strings_and_a_byte_order_mark(tmp_path):
    """JSON writers leave U+2028 and U+2029 raw inside strings (ensure_ascii=False); Windows editors
    start a file with a byte-order mark."""
    from hogwild_ray.cli.batch import numbered_problems

    path = tmp_path / "in.jsonl"
    rows = [{"id": 1, "problem": "line one\u2028line two\u2029end\x85"}, {"id": 2, "problem": "plain"}]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode())
    assert numbered_problems(path) == [(1, rows[0]), (2, rows[1])]


def test_cli_batch_names_a_bad_problem_by_its_file_and_line(tmp_path, capsys):
    from hogwild_ray.cli import main

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "q1", "problem": "2 + 2?"}\n\n{"id": "q2", "question": "3 + 3?"}\n')
    assert main(["batch", "--input", str(path), "--output", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3 (id 'q2') has no text: give a non-empty 'problem' string (it has 'id', 'question')" in err
    assert not (tmp_path / "out.jsonl").exists()


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
    deadline = time.monotonic() + 600  # a cap, not a speed check: loaded, two results can take minutes
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    if not killed and proc.poll() is None:
        proc.kill()  # no two results by the cap: fail below, leaving no process behind
    proc.wait(timeout=30)
    assert killed and proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr.read()[-2000:])
    before = [r["id"] for r in lines(out)]
    assert 2 <= len(before) < 12
    rerun = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    after = [r["id"] for r in lines(out)]
    assert after[:len(before)] == before and sorted(after) == sorted(p["id"] for p in problems)
    assert f"{len(before)} already in {out}" in rerun.stderr  # finished problems were skipped
    rest = [pid for pid in after if pid not in before]  # run concurrently: they finish in any order
    assert all(f"/12] id={pid} " in rerun.stderr for pid in rest) and f"[{len(before) + 1}/12] id=" in rerun.stderr


# ---- a kill at any moment of a resume ------------------------------------------------------------

KILLED_RESUMES = """
import base64, json, os, resource, signal, sys
import rich.console  # imported once here, not again in every child (the progress reporter's)
from hogwild_ray.batch import one_at_a_time, run_batch
from hogwild_ray.core.results import SolveResult, Stats

out, problems = sys.argv[1], [{"id": f"p{i}", "problem": f"Compute {i} + {i}."} for i in range(int(sys.argv[2]))]
solve = lambda p: SolveResult(p[-3:], [p, p], p, Stats(forward_passes=1, seconds=0.5))

def resume(limit):
    pid = os.fork()
    if pid == 0:  # the process dies the moment a write would take the file past `limit` bytes
        try:
            if limit >= 0:
                signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            run_batch(one_at_a_time(solve), problems, out, progress=False)
        except BaseException:
            os._exit(1)
        os._exit(0)
    status = os.waitpid(pid, 0)[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

for step, arg in json.load(sys.stdin):
    if step == "write":
        with open(out, "wb") as f:
            f.write(base64.b64decode(arg))
    else:
        code = resume(arg)
        with open(out, "rb") as f:
            print(json.dumps([code, base64.b64encode(f.read()).decode()]), flush=True)
"""
KILL_PROBLEMS = 7
ALL_IDS = [f"p{i}" for i in range(KILL_PROBLEMS)]


def killed_resumes(out: Path, steps: list) -> list[tuple[int, bytes]]:
    """Steps ("write", bytes): set the file; ("resume", limit): resume the batch into `out` in a
    process of its own, killed (SIGXFSZ) when a write would take the file past `limit` bytes
    (-1: never). The exit status and the file after each resume. (One Python, forking: fast.)"""
    steps = [(s, base64.b64encode(a).decode() if s == "write" else a) for s, a in steps]
    run = subprocess.run([sys.executable, "-c", KILLED_RESUMES, str(out), str(KILL_PROBLEMS)], cwd=ROOT,
                         input=json.dumps(steps), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    answers = [json.loads(line) for line in run.stdout.splitlines()]
    assert all(code in (0, -signal.SIGXFSZ) for code, _ in answers), answers
    return [(code, base64.b64decode(data)) for code, data in answers]


def complete_part(data: bytes) -> bytes:
    return data[:data.rfind(b"\n") + 1]


def ids_of(data: bytes) -> list:
    return [json.loads(line)["id"] for line in complete_part(data).splitlines()]


@pytest.mark.reliability
def test_a_kill_at_any_byte_of_a_resume_loses_no_finished_record(tmp_path):
    """Four records finished and a fifth cut short by a kill. The resume is killed the moment a
    write would take the file past N bytes, for every N that matters (inside the finished lines,
    where rewriting them would die half-way; at, before and after every line end of the appends;
    inside each appended line) and random ones: the finished lines stay byte for byte, no id is
    there twice, and the next resume, past the line this kill cut, ends with every id once."""
    out = tmp_path / "out.jsonl"
    run_batch(one_at_a_time(fake_solve([])), [{"id": f"p{i}", "problem": f"Compute {i} + {i}."} for i in range(4)],
              out, progress=False)
    finished = out.read_bytes()
    start = finished + b'{"id": "p4", "problem": "Comp'
    [(code, full)] = killed_resumes(out, [("write", start), ("resume", -1)])
    assert code == 0 and full.startswith(finished) and ids_of(full) == ALL_IDS and full.endswith(b"\n")
    ends = [i + 1 for i, byte in enumerate(full) if byte == ord("\n")]
    limits = {0, 1, len(finished) - 1, len(finished), len(start) - 1, len(start), len(start) + 1}
    limits |= {e + d for e in ends for d in (-1, 1)} | {(a + b) // 2 for a, b in zip(ends, ends[1:])}
    limits = sorted(x for x in limits | set(random.Random(0).sample(range(len(full)), 8)) if 0 <= x < len(full))
    answers = killed_resumes(out, [step for limit in limits for step in (("write", start), ("resume", limit),
                                                                         ("resume", -1))])
    for limit, (code, after), (again, final) in zip(limits, answers[::2], answers[1::2]):
        assert code == -signal.SIGXFSZ, limit
        assert after.startswith(finished), (limit, after[:len(finished) + 40])  # no finished line touched
        assert len(set(ids_of(after))) == len(ids_of(after)), (limit, ids_of(after))
        assert again == 0 and final.startswith(complete_part(after))  # the next resume, past a line cut here
        assert sorted(ids_of(final)) == ALL_IDS and final.endswith(b"\n"), limit


@pytest.mark.reliability
def test_kills_one_after_another_lose_nothing(tmp_path):
    """A batch killed at a random byte again and again, each rerun resuming the last one's
    file: no line once complete is ever lost or changed, and the end has every id once."""
    [(_, full)] = killed_resumes(tmp_path / "whole.jsonl", [("resume", -1)])
    rng = random.Random(1)  # every kill before the end: some before any append can fit, most inside one
    answers = killed_resumes(tmp_path / "out.jsonl", [("resume", rng.randrange(len(full))) for _ in range(30)]
                             + [("resume", -1)])
    kept = b""
    for code, data in answers:
        assert data.startswith(kept)
        kept = complete_part(data)
    assert all(code != 0 for code, _ in answers[:-1]) and answers[-1][0] == 0
    assert sorted(ids_of(answers[-1][1])) == ALL_IDS


@pytest.mark.reliability
@pytest.mark.parametrize("middle", [
    b'{"id": "p1", "problem": "Comp{"id": "p2", "problem": "x"}\n',  # a cut line another write went on from
    b'{"id": "p1", "problem": "Caf\xc3{"id": "p2", "problem": "x"}\n',  # cut inside a UTF-8 character
    b'\xff\xfe\n',
    b'[1, 2]\n',
])
def test_a_bad_line_inside_the_output_is_an_error_naming_it(tmp_path, middle):
    out = tmp_path / "out.jsonl"
    good = b'{"id": "p0", "problem": "a"}\n'
    out.write_bytes(good + middle + b'{"id": "p3", "problem": "b"}\n')
    with pytest.raises(hw.InvalidRequestError, match=r"out\.jsonl:2 .*remove that line"):
        run_batch(one_at_a_time(fake_solve([])), PROBLEMS, out, progress=False)
    assert out.read_bytes() == good + middle + b'{"id": "p3", "problem": "b"}\n'  # left as it was


@pytest.mark.reliability
def test_an_output_that_is_a_directory_or_has_no_directory_is_refused(tmp_path):
    """(A FIFO or a device: tests/test_cli.py, in a process of its own that may block or run out of memory.)"""
    (tmp_path / "out").mkdir()
    for out, words in ((tmp_path / "out", "out is a directory, not a regular file"),
                       (tmp_path / "nowhere" / "out.jsonl", "nowhere does not exist; create it")):
        with pytest.raises(hw.InvalidRequestError, match=words):
            run_batch(one_at_a_time(fake_solve([])), PROBLEMS, out, progress=False)
