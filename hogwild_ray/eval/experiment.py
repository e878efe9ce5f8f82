"""An evaluation on disk: which runs are left, running them concurrently in one engine's shared
forward passes, merging their lines and writing the summary, resumably.

Every run (problem id, mode, workers, layout) is a job (runner.budgets_job) of one scheduler
(hogwild_ray.scheduler): up to `concurrency` runs at once (default: as many as their page
reservations let into the K/V cache), their sessions and forced-answer forks stepped together,
one pass at a time. Each run gets its problem's own seeds (runner.worker_sampling), so its
records do not depend on what ran beside it. A run that finishes appends its records (one per
budget) to this invocation's own part file of the output directory (`parts/`, made new and
never appended to again) in one write; `results.jsonl` is the merge of them all, in problem
and configuration order, replaced in one rename, after which `parts/` is removed. A rerun into
the same directory skips the runs whose every budget is already there, in results.jsonl or in
a part file left by an interrupted run (its last line, if a kill cut it short, is left out:
hogwild_ray.jsonl reads them all).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .. import jsonl
from ..core.sampling_params import SamplingParams
from ..errors import CacheFullError, ContextLengthError, InvalidRequestError, check_int
from ..scheduler import Failed, Finished, Scheduler
from ..run_progress import RunProgress
from .runner import RunSpec, error_records, run_request, worker_sampling
from .settings_file import check_and_keep, problem_digest

SKIPPABLE = (ContextLengthError, CacheFullError)  # a run that cannot run: recorded, the others go on
RESULTS, SUMMARY, PLOT = "results.jsonl", "summary.md", "accuracy.png"
KEY_FIELDS = ("id", "mode", "workers", "layout", "budget")
FIX = "remove that line (or that file), or use another --out"


@dataclass
class Experiment:
    """What to evaluate and where; plain data."""

    problems: list[dict]
    specs: list[RunSpec]
    budgets: list[int]
    out: Path
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)  # protocol options for engine.start
    model: str = ""  # what the engine loads (its path, or the built-in model's name)

    def runs(self) -> list[tuple[int, dict, RunSpec]]:
        return [(i, p, s) for i, p in enumerate(self.problems) for s in self.specs]

    def settings(self) -> dict[str, Any]:
        """What its records depend on beyond their keys (see settings_file)."""
        s = self.sampling
        return {"model": self.model, "sampling": {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p},
                "seed": self.seed, "options": dict(self.options),
                "problems": {str(p["id"]): problem_digest(p) for p in self.problems}}


def run_key(rec: dict) -> tuple:
    return rec["id"], rec["mode"], rec["workers"], rec["layout"]


def read_lines(path: Path) -> list[dict]:
    """The records of a results or part file; a last line cut short by an interruption is left
    out, any other line that is not an evaluation record is an error naming it."""
    out = []
    for n, rec in jsonl.scan(path, FIX).records:
        if not all(isinstance(rec.get(k, ()), (str, int, type(None))) for k in KEY_FIELDS):
            raise InvalidRequestError(f"{path}:{n} is not an evaluation record (it needs {', '.join(KEY_FIELDS)}); "
                                      f"{FIX}")
        out.append(rec)
    return out


def part_files(out: Path) -> list[Path]:
    """The part files, oldest first (part-N.jsonl by N)."""
    def number(path: Path) -> tuple:
        m = re.fullmatch(r"part-(\d+)\.jsonl", path.name)
        return (0, int(m.group(1))) if m else (1, path.name)

    return sorted((out / "parts").glob("part-*.jsonl"), key=number)


def new_part(out: Path) -> jsonl.Appender:
    """A part file of this invocation's own, made new (never one that an interrupted run left,
    perhaps with a line cut short, nor one that another run into the same directory took)."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in part_files(out) if (m := re.fullmatch(r"part-(\d+)\.jsonl", p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            return jsonl.Appender(out / "parts" / f"part-{n}.jsonl", exclusive=True, lock=True)
        except FileExistsError:
            n += 1


def existing(out: Path) -> dict[tuple, dict]:
    """Every record already written, by (id, mode, workers, layout, budget); part files last (newer)."""
    recs = {}
    for path in [out / RESULTS, *part_files(out)]:
        for rec in read_lines(path):
            recs[(*run_key(rec), rec["budget"])] = rec
    return recs


def todo(exp: Experiment, done: dict[tuple, dict]) -> list[tuple[int, dict, RunSpec]]:
    """The runs of `exp` that lack a record for some budget, or have an error record (a run that could
    not run then, e.g. with a cache too small, is tried again: its new records replace the error's)."""
    return [(i, p, s) for i, p, s in exp.runs()
            if any("error" in done.get((p["id"], s.mode, s.workers, s.layout, b), {"error": None})
                   for b in exp.budgets)]


Record = Callable[..., None]  # record(records of one run, replica=None): the output and the progress hear them


def run_all(engine, exp: Experiment, runs: list[tuple[int, dict, RunSpec]], concurrency: int | None,
            record: Record) -> int:
    """Run these runs concurrently on `engine`, at most `concurrency` at once (None: as many as
    fit the K/V cache), handing each finished run's records to `record`. A run that cannot run
    (its prompt is longer than the context, it could never fit the cache) gets error records
    instead. Returns the most runs that ran at once."""
    scheduler = Scheduler(engine, concurrency)
    running, peak = [0], [0]
    by_key = {}

    def start(job: Callable):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        return job()

    engine.schedulers.append(scheduler)
    try:
        for i, problem, spec in runs:
            key = (i, spec)
            by_key[key] = problem, spec
            sampling = worker_sampling(exp.sampling, exp.seed, i)
            try:
                pages, job = run_request(engine, problem, spec, exp.budgets, sampling, exp.options)
                scheduler.submit(key, partial(start, job), pages)
            except SKIPPABLE as e:  # a problem too long for the model, a run too big for the cache
                record(error_records(problem, spec, exp.budgets, e))
        for key, item in scheduler:
            if isinstance(item, Finished):
                running[0] -= 1
                record(item.value)
            elif isinstance(item, Failed):
                running[0] -= 1
                if not isinstance(item.error, SKIPPABLE):
                    raise item.error
                record(error_records(*by_key[key], exp.budgets, item.error))
    finally:
        scheduler.close()  # an interruption: the running runs' sessions give their pages back
        engine.schedulers.remove(scheduler)
    return peak[0]


def merge(exp: Experiment) -> list[dict]:
    """Write results.jsonl: every record, in problem, configuration and budget order; the part
    files are removed once they are in it, and then the parts directory if nothing else is in it.
    Returns the records of this experiment. Runs into one directory merge one at a time (each
    reads what the one before wrote); a part another run still writes is read and left in place."""
    with jsonl.directory_lock(exp.out):
        return _merge(exp)


def _merge(exp: Experiment) -> list[dict]:
    recs = existing(exp.out)
    order = {p["id"]: i for i, p in enumerate(exp.problems)}
    spec_order = {(s.mode, s.workers, s.layout): i for i, s in enumerate(exp.specs)}

    def rank(key: tuple) -> tuple:
        pid, mode, workers, layout, budget = key
        return (order.get(pid, len(order)), str(pid), spec_order.get((mode, workers, layout), len(spec_order)),
                mode, workers, str(layout), budget)

    keys = sorted(recs, key=rank)
    jsonl.replace_atomically(exp.out / RESULTS, (recs[k] for k in keys))
    for path in part_files(exp.out):
        if not jsonl.in_use(path):  # another run still writing into the same directory keeps its part
            path.unlink()
    try:  # the output holds results.jsonl, summary.md, accuracy.png, settings.json; a rerun makes parts/ again
        (exp.out / "parts").rmdir()
    except OSError:  # not there, or holding something else: left alone
        pass
    wanted = {(p["id"], s.mode, s.workers, s.layout, b) for _, p, s in exp.runs() for b in exp.budgets}
    return [recs[k] for k in keys if k in wanted]


def describe(recs: list[dict]) -> str:
    """A finished run in one progress line: its id, configuration and answers (or error)."""
    r = recs[-1]
    spec = RunSpec(r["mode"], r["workers"], r["layout"]).label
    marks = "".join("+" if x["correct"] else "-" for x in recs)
    what = f"error: {r['error']}" if "error" in r else f"answer={r['answer']!r} ref={r['reference']!r} {marks}"
    return f"id={r['id']} {spec}: {what} ({r.get('seconds', 0):.1f} s)"


Execute = Callable[[Experiment, list, Record, RunProgress], int]


def run_experiment(exp: Experiment, load: Callable[[], Any], concurrency: int | None = None, engine=None,
                   progress: bool = True, execute: Execute | None = None) -> tuple[list[dict], int]:
    """Run what is left of `exp` concurrently in one engine and merge; `load()` makes the engine
    when none is given (and only if a run is left). concurrency: the most runs at once (None:
    as many as fit the K/V cache). execute(exp, runs, record, progress), when given, runs them
    instead (e.g. over engine replicas on a Ray cluster) and returns the most at once. Returns
    this experiment's records and the most runs that ran at once (0 when none was left)."""
    check_int("concurrency", concurrency, 1, none="(as many as fit)")
    try:
        exp.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidRequestError(f"--out {exp.out} cannot be made ({e.strerror}); give a directory you can "
                                  "write") from None
    with jsonl.directory_lock(exp.out):  # (runs into one directory at once write it one after another)
        done = existing(exp.out)
        check_and_keep(exp.out, exp.settings(), has_records=bool(done))
    left = todo(exp, done)
    bar = RunProgress("eval", len(exp.runs()), len(exp.runs()) - len(left), exp.out, progress, unit="runs")
    peak, part = 0, []
    try:
        if left:
            def record(recs: list[dict], replica: str | None = None) -> None:
                if not part:  # made at the first finished run: an engine that fails to load leaves no file
                    part.append(new_part(exp.out))
                part[0].write(recs)  # one write per run: a kill never leaves half a run
                tokens = sum(recs[-1].get("tokens_per_worker") or [])
                bar.advance(describe(recs), "error" in recs[-1], tokens, replica)

            if execute is not None:
                peak = execute(exp, left, record, bar)
            else:
                own = engine is None
                engine = load() if own else engine
                try:
                    peak = run_all(engine, exp, left, concurrency, record)
                finally:
                    if own:
                        engine.close()
    finally:
        if part:
            part[0].close()
        bar.close()
    return merge(exp), peak
