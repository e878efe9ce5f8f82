"""Many problems, one JSON line each, resumable: the logic behind `solve_many` and `hogwild-ray batch`.

Pure logic apart from the output file: the caller passes what solves the problems (one at a
time, or many at once, each result handed over as it finishes). Results are appended one line
at a time, straight to the file, so an interrupted run leaves every finished result in it; a
rerun reads the ids already there and skips them (those of the same problem text; another
problem under a known id is an error), but runs again the ones recorded with an error. One run
at a time writes a file. A line cut short by the interruption is
truncated away before anything is appended; finished lines are never rewritten (hogwild_ray.jsonl).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

from . import jsonl
from .errors import ContextLengthError, InvalidRequestError
from .core.results import SolveResult
from .output_paths import file_problem
from .run_progress import RunProgress
from .utf8 import check_text

FIX = "remove that line, or write to another output file"


def normalize(problems: Iterable[str | dict], where: Callable[[int], str] | None = None
              ) -> list[tuple[str | int, str]]:
    """(id, problem) pairs: a string's id is its position; a dict has `problem` and maybe `id`.
    where(i): how errors name problem i (default "problem i"; a file's reader gives "file:line")."""
    if isinstance(problems, (str, bytes, dict)):  # iterating one would run its characters, or keys, as problems
        raise InvalidRequestError(f"problems must be a list of problems (strings or dicts), got one "
                                  f"{type(problems).__name__}: wrap it in a list")
    items, seen = [], set()
    name = where or (lambda i: f"problem {i}")
    for i, p in enumerate(problems):
        if isinstance(p, str):
            pid, text = i, p
        elif isinstance(p, dict):
            pid, text = p.get("id", i), p.get("problem")
        else:
            raise InvalidRequestError(f"{name(i)} is a {type(p).__name__}; give a string or a dict "
                                      "with 'problem' (and optionally 'id')")
        if not isinstance(text, str) or not text.strip():
            keys = f" (it has {', '.join(map(repr, p))})" if isinstance(p, dict) and "problem" not in p else ""
            raise InvalidRequestError(f"{name(i)} (id {pid!r}) has no text: give a non-empty 'problem' "
                                      f"string{keys}")
        check_text(text, f"{name(i)} (id {pid!r})")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise InvalidRequestError(f"{name(i)} has id {pid!r}; ids must be strings or integers")
        if pid in seen:
            raise InvalidRequestError(f"id {pid!r} appears twice in the problems; ids must be unique "
                                      "(a rerun skips the ids already in the output)")
        seen.add(pid)
        items.append((pid, text))
    return items


def record(problem: str, result: SolveResult, pid: str | int | None = None) -> dict[str, Any]:
    """One output line: the id (when given), the problem, its answer, every worker's text, the
    transcript and the stats."""
    rec = {} if pid is None else {"id": pid}
    return {**rec, "problem": problem, "answer": result.answer, "worker_texts": result.worker_texts,
            "transcript": result.transcript, "stats": result.stats.to_dict()}


def read_finished(out: Path, repair: bool = False) -> dict[str | int, dict]:
    """The records already in `out`, by id; a last line cut short by a kill is left out, and
    with `repair` truncated away so that appending starts on a fresh line."""
    lines = jsonl.resume(out, FIX) if repair else jsonl.scan(out, FIX).records
    return {rec["id"]: rec for _, rec in lines
            if isinstance(rec.get("id"), (str, int)) and not isinstance(rec["id"], bool)}


def done(rec: dict | None) -> bool:
    """Whether a problem's record in the output ends it: a result. An error record (a problem that
    could not run then: a cache another session held, a context since made longer) runs again, and
    its new record is appended after it: the last line of an id is its record."""
    return rec is not None and "error" not in rec


def check_same_problems(items: list[tuple[str | int, str]], finished: dict[str | int, dict],
                        path: Path | None) -> None:
    """A rerun resumes the same problems: an id whose record in the output is of another problem
    (another input file, edited problems, ids by position that moved) is an error naming both."""
    for pid, text in items:
        rec = finished.get(pid)
        if rec is not None and rec.get("problem") != text:
            theirs = rec.get("problem")
            raise InvalidRequestError(
                f"{path} already has a record with id {pid!r} for another problem "
                f"({_short(theirs) if isinstance(theirs, str) else 'none'} there, {_short(text)} now): a rerun "
                "resumes the same problems only; write to another output file, or give each problem an id of "
                "its own")


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


def describe(rec: dict) -> str:
    """A finished record in one progress line: its id and answer (or error)."""
    if "error" in rec:
        return f"id={rec['id']} error: {rec['error']}"
    st = rec["stats"]
    return f"id={rec['id']} answer={rec['answer']!r} ({st['seconds']:.1f} s, {st['tokens_per_second']:.1f} tokens/s)"


@dataclass(frozen=True)
class OnReplica:
    """An outcome and the replica that produced it (a run over several engine replicas)."""

    outcome: SolveResult | Exception
    replica: str


@dataclass(frozen=True)
class Retried:
    """The problem was lost with its replica (the process or its node died) and runs again."""

    why: str


Outcome = Union[SolveResult, Exception, OnReplica, Retried]
SolveAll = Callable[[list[tuple[Union[str, int], str]]], Iterator[tuple[Union[str, int], Outcome]]]


def one_at_a_time(solve: Callable[[str], SolveResult]) -> SolveAll:
    """A SolveAll that solves the problems one after another with `solve(problem)`."""

    def solve_all(todo: list[tuple[str | int, str]]) -> Iterator[tuple[str | int, Outcome]]:
        for pid, text in todo:
            try:
                yield pid, solve(text)
            except ContextLengthError as e:
                yield pid, e

    return solve_all


def run_batch(solve_all: SolveAll, problems: Iterable[str | dict], out: str | Path | None = None,
              progress: bool = True) -> list[dict]:
    """Solve every problem whose id is not in `out` yet, appending its record as it finishes;
    every record, input order. solve_all([(id, problem), ...]) yields (id, result) in the order
    they finish (an OnReplica result names its replica; Retried says a problem runs again
    elsewhere), or (id, error) for a problem that cannot run (too long for the context, or more
    than the cache could ever hold): recorded with an `error`, and the run goes on. An exception
    it raises stops the run (the records written so far stay, and a rerun resumes after them)."""
    items = normalize(problems)
    path = Path(out) if out is not None else None
    if path is not None and (problem := file_problem(path)):
        raise InvalidRequestError(f"out: {problem}")
    sink = jsonl.Appender(path, lock=True) if path is not None else None  # this run's alone from here
    try:
        finished = read_finished(path, repair=True) if path is not None else {}
        check_same_problems(items, finished, path)
    except BaseException:
        if sink is not None:
            sink.close()
        raise
    todo = [(pid, text) for pid, text in items if not done(finished.get(pid))]
    texts, answered = dict(todo), set()
    reporter = RunProgress("batch", len(items), len(items) - len(todo), path, progress)
    try:
        for pid, outcome in solve_all(todo):
            if isinstance(outcome, Retried):
                reporter.retry(f"id={pid} {outcome.why}")
                continue
            replica = outcome.replica if isinstance(outcome, OnReplica) else None
            outcome = outcome.outcome if isinstance(outcome, OnReplica) else outcome
            if pid not in texts or pid in answered:
                raise RuntimeError(f"problem id {pid!r} was answered twice")  # never written twice
            answered.add(pid)
            if isinstance(outcome, Exception):
                rec = {"id": pid, "problem": texts[pid], "error": str(outcome)}
            else:
                rec = record(texts[pid], outcome, pid)
            finished[pid] = rec
            if sink is not None:
                sink.write([rec])
            tokens = 0 if isinstance(outcome, Exception) else sum(outcome.stats.generated_per_worker)
            reporter.advance(describe(rec), "error" in rec, tokens, replica)
    finally:
        if sink is not None:
            sink.close()
        reporter.close()
    return [finished[pid] for pid, _ in items]
