"""Many problems, one JSON line each, resumable: the logic behind `solve_many` and `hogwild-ray batch`.

Pure logic apart from the output file: the caller passes what solves the problems (one at a
time, or many at once, each result handed over as it finishes). Results are appended one line
at a time, straight to the file, so an interrupted run leaves every finished result in it; a
rerun reads the ids already there and skips them. A line cut short by the interruption is
truncated away before anything is appended; finished lines are never rewritten (hogwild_ray.jsonl).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Union

from . import jsonl
from .errors import ContextLengthError, InvalidRequestError
from .core.results import SolveResult
from .output_paths import file_problem
from .utf8 import check_text

FIX = "remove that line, or write to another output file"


def normalize(problems: Iterable[str | dict]) -> list[tuple[str | int, str]]:
    """(id, problem) pairs: a string's id is its position; a dict has `problem` and maybe `id`."""
    items, seen = [], set()
    for i, p in enumerate(problems):
        if isinstance(p, str):
            pid, text = i, p
        elif isinstance(p, dict):
            pid, text = p.get("id", i), p.get("problem")
        else:
            raise InvalidRequestError(f"problem {i} is a {type(p).__name__}; give a string or a dict "
                                      "with 'problem' (and optionally 'id')")
        if not isinstance(text, str) or not text.strip():
            raise InvalidRequestError(f"problem {i} (id {pid!r}) has no text: give a non-empty 'problem' string")
        check_text(text, f"problem {i} (id {pid!r})")
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise InvalidRequestError(f"problem {i} has id {pid!r}; ids must be strings or integers")
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


class Reporter:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise (a Ray job's log)."""

    def __init__(self, total: int, skipped: int, out: Path | None, enabled: bool = True) -> None:
        from rich.console import Console

        self.total, self.count, self.out, self.t0 = total, skipped, out, time.perf_counter()
        self.console = Console(stderr=True)
        self.enabled, self.bar = enabled, None
        if not enabled:
            return
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.progress import TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console)
            self.task = self.bar.add_task("", total=total, completed=skipped)
            self.bar.start()
        else:
            where = f" already in {out}" if out else ""
            self._line(f"batch: {total} problems, {skipped} done{where}, {total - skipped} to run")

    def _line(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def advance(self, rec: dict) -> None:
        self.count += 1
        if not self.enabled:
            return
        if "error" in rec:
            what = f"error: {rec['error']}"
        else:
            st = rec["stats"]
            what = f"answer={rec['answer']!r} ({st['seconds']:.1f} s, {st['tokens_per_second']:.1f} tokens/s)"
        if self.bar is not None:
            self.bar.update(self.task, completed=self.count, description=f"id={rec['id']} {what}")
        else:
            self._line(f"[{self.count}/{self.total}] id={rec['id']} {what}")

    def close(self, failed: int) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.enabled:
            where = f", results in {self.out}" if self.out else ""
            self._line(f"batch: {self.count}/{self.total} done in {time.perf_counter() - self.t0:.1f} s, "
                       f"{failed} failed{where}")


Outcome = Union[SolveResult, Exception]
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
    they finish, or (id, error) for a problem that cannot run (too long for the context, or more
    than the cache could ever hold): recorded with an `error`, and the run goes on. An exception
    it raises stops the run (the records written so far stay, and a rerun resumes after them)."""
    items = normalize(problems)
    path = Path(out) if out is not None else None
    if path is not None and (problem := file_problem(path)):
        raise InvalidRequestError(f"out: {problem}")
    finished = read_finished(path, repair=True) if path is not None else {}
    todo = [(pid, text) for pid, text in items if pid not in finished]
    texts = dict(todo)
    reporter = Reporter(len(items), len(items) - len(todo), path, progress)
    failed = 0
    sink = jsonl.Appender(path) if path is not None else None
    try:
        for pid, outcome in solve_all(todo):
            if isinstance(outcome, Exception):
                rec, failed = {"id": pid, "problem": texts[pid], "error": str(outcome)}, failed + 1
            else:
                rec = record(texts[pid], outcome, pid)
            finished[pid] = rec
            if sink is not None:
                sink.write([rec])
            reporter.advance(rec)
    finally:
        if sink is not None:
            sink.close()
        reporter.close(failed)
    return [finished[pid] for pid, _ in items]
