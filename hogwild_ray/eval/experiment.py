"""An evaluation on disk: which runs are left, running them (in this process or in P worker
processes), merging their lines and writing the summary, resumably.

Every run (problem id, mode, workers, layout) appends its records (one per budget) to a
part file of the output directory (`parts/`) in one write; `results.jsonl` is the merge of
them all, in problem and configuration order, after which `parts/` is removed. A rerun
into the same directory skips the runs whose every budget is already there, in
results.jsonl or in a part file left by an interrupted run. With P processes, process k
takes the problems i with i % P == k and loads its own engine on the same device.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import ContextLengthError, HogwildError, InvalidRequestError
from ..core.sampling_params import SamplingParams
from .runner import RunSpec, run_budgets, worker_sampling

RESULTS, SUMMARY, PLOT = "results.jsonl", "summary.md", "accuracy.png"


@dataclass
class Experiment:
    """What to evaluate and where; plain data (it travels to worker processes)."""

    problems: list[dict]
    specs: list[RunSpec]
    budgets: list[int]
    out: Path
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = 0
    options: dict[str, Any] = field(default_factory=dict)  # protocol options for engine.start

    def runs(self) -> list[tuple[int, dict, RunSpec]]:
        return [(i, p, s) for i, p in enumerate(self.problems) for s in self.specs]


def run_key(rec: dict) -> tuple:
    return rec["id"], rec["mode"], rec["workers"], rec["layout"]


def read_lines(path: Path) -> list[dict]:
    """The JSON records of a file; a last line cut short by an interruption is ignored."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    out = []
    for n, line in enumerate(lines[:-1], 1):  # the text after the last newline is unfinished
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{n} is not a JSON line ({e.msg}); remove that line or use "
                                      "another --out") from e
    return out


def part_files(out: Path) -> list[Path]:
    return sorted((out / "parts").glob("part-*.jsonl"))


def existing(out: Path) -> dict[tuple, dict]:
    """Every record already written, by (id, mode, workers, layout, budget); part files last (newer)."""
    recs = {}
    for path in [out / RESULTS, *part_files(out)]:
        for rec in read_lines(path):
            recs[(*run_key(rec), rec["budget"])] = rec
    return recs


def todo(exp: Experiment, done: dict[tuple, dict]) -> list[tuple[int, dict, RunSpec]]:
    """The runs of `exp` that lack a record for some budget."""
    return [(i, p, s) for i, p, s in exp.runs()
            if any((p["id"], s.mode, s.workers, s.layout, b) not in done for b in exp.budgets)]


def run_part(engine, exp: Experiment, runs: list[tuple[int, dict, RunSpec]], part: int,
             report: Callable[[list[dict]], None]) -> None:
    """Run these runs, appending each one's records to part file `part` and reporting them."""
    path = exp.out / "parts" / f"part-{part}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as sink:
        for i, problem, spec in runs:
            sampling = worker_sampling(exp.sampling, exp.seed, i)
            try:
                recs = run_budgets(engine, problem, spec, exp.budgets, sampling, **exp.options)
            except ContextLengthError as e:  # a problem too long for the model: recorded, the run goes on
                recs = [{"id": problem["id"], "mode": spec.mode, "workers": spec.workers, "layout": spec.layout,
                         "budget": b, "answer": None, "reference": problem["answer"], "correct": False,
                         "error": str(e)} for b in exp.budgets]
            sink.write("".join(json.dumps(r) + "\n" for r in recs))
            sink.flush()
            report(recs)


def merge(exp: Experiment) -> list[dict]:
    """Write results.jsonl: every record, in problem, configuration and budget order; the part
    files are removed once they are in it, and then the parts directory if nothing else is in it.
    Returns the records of this experiment."""
    recs = existing(exp.out)
    order = {p["id"]: i for i, p in enumerate(exp.problems)}
    spec_order = {(s.mode, s.workers, s.layout): i for i, s in enumerate(exp.specs)}

    def rank(key: tuple) -> tuple:
        pid, mode, workers, layout, budget = key
        return (order.get(pid, len(order)), str(pid), spec_order.get((mode, workers, layout), len(spec_order)),
                mode, workers, str(layout), budget)

    keys = sorted(recs, key=rank)
    tmp = exp.out / (RESULTS + ".tmp")
    tmp.write_text("".join(json.dumps(recs[k]) + "\n" for k in keys), encoding="utf-8")
    tmp.replace(exp.out / RESULTS)
    for path in part_files(exp.out):
        path.unlink()
    try:  # the output holds results.jsonl, summary.md and accuracy.png only; a rerun makes parts/ again
        (exp.out / "parts").rmdir()
    except OSError:  # not there, or holding something else: left alone
        pass
    wanted = {(p["id"], s.mode, s.workers, s.layout, b) for _, p, s in exp.runs() for b in exp.budgets}
    return [recs[k] for k in keys if k in wanted]


class Progress:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise (a job's log)."""

    def __init__(self, total: int, skipped: int, out: Path, enabled: bool = True) -> None:
        from rich.console import Console

        self.total, self.count, self.t0, self.enabled, self.bar = total, skipped, time.perf_counter(), enabled, None
        console = Console(stderr=True)
        if not enabled:
            return
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar
            from rich.progress import TimeRemainingColumn

            self.bar = Bar(TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                           TimeRemainingColumn(), TextColumn("{task.description}"), console=console)
            self.task = self.bar.add_task("", total=total, completed=skipped)
            self.bar.start()
        else:
            self.line(f"eval: {total} runs, {skipped} already in {out}, {total - skipped} to run")

    @staticmethod
    def line(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def advance(self, recs: list[dict]) -> None:
        self.count += 1
        if not self.enabled:
            return
        r = recs[-1]
        spec = RunSpec(r["mode"], r["workers"], r["layout"]).label
        marks = "".join("+" if x["correct"] else "-" for x in recs)
        what = f"error: {r['error']}" if "error" in r else f"answer={r['answer']!r} ref={r['reference']!r} {marks}"
        if self.bar is not None:
            from rich.markup import escape

            self.bar.update(self.task, completed=self.count, description=escape(f"id={r['id']} {spec} {what}"))
        else:
            self.line(f"[{self.count}/{self.total}] id={r['id']} {spec}: {what} ({r.get('seconds', 0):.1f} s)")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.enabled:
            self.line(f"eval: {self.count}/{self.total} runs done in {time.perf_counter() - self.t0:.1f} s")


def run_experiment(exp: Experiment, load: Callable[[], Any], processes: int = 1, engine=None,
                   progress: bool = True) -> list[dict]:
    """Run what is left of `exp` and merge; `load()` makes an engine (in each worker process when
    processes > 1, so it must pickle); `engine`: one already loaded, for processes == 1."""
    exp.out.mkdir(parents=True, exist_ok=True)
    left = todo(exp, existing(exp.out))
    bar = Progress(len(exp.runs()), len(exp.runs()) - len(left), exp.out, progress)
    try:
        if left and processes == 1:
            own = engine is None
            engine = load() if own else engine
            try:
                run_part(engine, exp, left, 0, bar.advance)
            finally:
                if own:
                    engine.close()
        elif left:
            run_processes(exp, left, load, processes, bar.advance)
    finally:
        bar.close()
    return merge(exp)


def _child(exp: Experiment, runs: list, load: Callable[[], Any], part: int, events) -> None:
    """A worker process: its own engine, its share of the runs, its own part file."""
    try:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        engine = load()
        try:
            run_part(engine, exp, runs, part, lambda recs: events.put(("run", recs)))
        finally:
            engine.close()
        events.put(("done", part))
    except BaseException as e:  # reported by the parent as one line
        events.put(("error", f"process {part}: {type(e).__name__}: {e}"))
        raise SystemExit(1) from None


def run_processes(exp: Experiment, left: list, load: Callable[[], Any], processes: int,
                  report: Callable[[list[dict]], None]) -> None:
    """Spread the runs over worker processes by problem index (i % processes) and wait for them."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    shares = {k: [r for r in left if r[0] % processes == k] for k in range(processes)}
    procs = [ctx.Process(target=_child, args=(exp, runs, load, k, events), daemon=True)
             for k, runs in shares.items() if runs]
    for p in procs:
        p.start()
    errors = []
    try:
        while any(p.is_alive() for p in procs) or not events.empty():
            try:
                kind, payload = events.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "run":
                report(payload)
            elif kind == "error":
                errors.append(payload)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    failed = [p for p in procs if p.exitcode not in (0, None)]
    if errors or failed:
        first = errors[0] if errors else f"a worker process exited with code {failed[0].exitcode}"
        raise HogwildError(f"{first}; finished runs are kept, run the same command again to resume")
