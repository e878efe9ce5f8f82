"""One evaluation run: one problem in one configuration, answered at every budget.

A budget is a number of sequential forward passes (`session.stats.forward_passes`). A run
steps ONE session up to its largest budget. At each budget the answer comes from a fork
(`session.forced_answers_job`): the fork is told "final answer now" and finishes greedily,
while the session itself goes on untouched. A session that ended before a budget (it found
its answer, or every worker stopped) answers the later budgets from its final state. A run is
a job (hogwild_ray.jobs: `budgets_job`), so that a scheduler runs many runs, their forks
included, in shared forward passes; `run_budgets` runs one by itself.

Modes:
* `single`: one worker, a plain prompt (protocol off).
* `independent`: N workers that never see each other (protocol off, interleaved layout:
  with no finished steps ever shared, each view is [prompt, own text]); the answer is
  the majority of theirs, the first given on a tie.
* `hogwild`: N workers with the collaboration protocol, in the given cache layout; the
  session's own answer, or at a budget worker 0's forced one (the session's finisher).

Without the protocol a worker's answer is the last `\\boxed{}` of its text so far; only
the workers with none are forced (all in one fork, decoding in the same passes).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

from ..core.protocol import ProtocolOptions, extract_boxed
from ..core.sampling_params import SamplingParams
from ..jobs import Job, NeedPass, result_of
from .answers import answers_match
from .stats import majority

if TYPE_CHECKING:
    from ..engine import HogwildEngine
    from ..session import Session

MODES = ("single", "independent", "hogwild")


@dataclass(frozen=True)
class RunSpec:
    """A configuration: mode, workers, layout (None where the layout plays no part)."""

    mode: str
    workers: int
    layout: str | None = None

    @property
    def label(self) -> str:
        if self.mode == "single":
            return "single"
        return f"{self.mode} {self.layout} x{self.workers}" if self.layout else f"{self.mode} x{self.workers}"


def plan(modes: list[str], workers: list[int], layouts: list[str]) -> list[RunSpec]:
    """The configurations the flags ask for. `single` is one worker whatever --workers says;
    `independent` with one worker would be `single` again, so it needs N >= 2."""
    specs = []
    if "single" in modes:
        specs.append(RunSpec("single", 1))
    if "independent" in modes:
        specs += [RunSpec("independent", n) for n in workers if n >= 2]
    if "hogwild" in modes:
        specs += [RunSpec("hogwild", n, layout) for n in workers for layout in layouts]
    return specs


def worker_sampling(base: SamplingParams, seed: int | None, index: int) -> SamplingParams:
    """Sampling for problem `index`: its own seed (worker w adds w), the same in every mode."""
    run_seed = None if seed is None else seed * 1_000_003 + 64 * index
    return SamplingParams(base.temperature, base.top_k, base.top_p, run_seed)


def answers_job(session: Session, protocol: bool) -> Job:
    """Each answering worker's answer at this point (see the module docstring), as a job: the
    forced fork's passes are NeedPass(fork), so a scheduler runs them beside other sessions."""
    if protocol:
        if session.done:
            return [session.answer]
        return (yield from session.forced_answers_job([0]))
    own = [extract_boxed(session.text(w)) for w in range(len(session.workers))]
    missing = [w for w, a in enumerate(own) if a is None]
    if missing:
        forced = yield from session.forced_answers_job(missing)
        for w, a in zip(missing, forced):
            own[w] = a
    return own


def start_options(spec: RunSpec, budgets: list[int], options: dict) -> dict:
    """The keyword options of `engine.start` (and `engine.request_pages`) for a run of `spec`.

    options: protocol options (redundancy_every, finisher_tokens, ...)."""
    protocol = spec.mode == "hogwild"
    if not protocol:
        options = {k: v for k, v in options.items() if k != "redundancy_every"}
    return {"layout": spec.layout if protocol else "interleaved",
            "max_tokens": budgets[-1] + 1,  # never binds first: the budgets (passes) end a run
            "protocol": protocol, **options}


def forced_tokens(options: dict) -> int:
    """What a forced-answer fork may add per worker: the finisher prompt and the answer."""
    return options.get("finisher_tokens", ProtocolOptions().finisher_tokens) + 64


def budgets_job(engine: HogwildEngine, problem: dict, spec: RunSpec, budgets: list[int],
                sampling: SamplingParams, write_prompt: bool = True, **options) -> Job:
    """One run as a job (hogwild_ray.jobs): it opens its session when first advanced, asks for
    its passes and its forced forks' passes, and returns one record per budget for one problem
    ({"id", "problem", "answer"}) in one configuration. A scheduler runs many of them in shared
    passes (write_prompt=False: the session's first passes write its prompt, as a scheduled
    session's do; budgets count forward passes, which such passes are not).

    options: protocol options of `engine.start` (redundancy_every, finisher_tokens, ...)."""
    protocol = spec.mode == "hogwild"
    t0 = time.perf_counter()
    session = engine.start(problem["problem"], spec.workers, sampling=sampling, write_prompt=write_prompt,
                           **start_options(spec, budgets, options))
    session.auto_close = False  # a run that ends early still answers later budgets from its pages
    records = []
    try:
        for budget in budgets:
            while not session.done and (session.stats.forward_passes < budget or session.finishing):
                yield NeedPass(session)
            given = yield from answers_job(session, protocol)
            answer = given[0] if protocol else majority(given)
            records.append({
                "id": problem["id"], "mode": spec.mode, "workers": spec.workers, "layout": spec.layout,
                "budget": budget, "answer": answer, "reference": problem["answer"],
                "correct": answers_match(answer, problem["answer"]), "worker_answers": given,
                "tokens_per_worker": [len(ws.stream) for ws in session.workers],
                "forward_passes": session.stats.forward_passes, "ended": session.done,
                "seconds": round(time.perf_counter() - t0, 3),
            })
    finally:
        session.close()
    return records


def run_request(engine: HogwildEngine, problem: dict, spec: RunSpec, budgets: list[int], sampling: SamplingParams,
                options: dict) -> tuple[int, Callable[[], Job]]:
    """What a scheduler needs to run one run: the K/V pages it may hold at once (its forks'
    included) and what starts its job (see `budgets_job`). Raises ContextLengthError for a
    prompt longer than the context."""
    pages = engine.request_pages(problem["problem"], spec.workers, forced_tokens=forced_tokens(options),
                                 **start_options(spec, budgets, options))
    return pages, partial(budgets_job, engine, problem, spec, budgets, sampling, False, **options)


def run_budgets(engine: HogwildEngine, problem: dict, spec: RunSpec, budgets: list[int],
                sampling: SamplingParams, **options) -> list[dict]:
    """`budgets_job` alone, its session stepped by itself: one record per budget.

    options: protocol options of `engine.start` (redundancy_every, finisher_tokens, ...)."""
    return result_of(budgets_job(engine, problem, spec, budgets, sampling, **options))


def error_records(problem: dict, spec: RunSpec, budgets: list[int], error: BaseException) -> list[dict]:
    """The records of a run that could not run (its prompt is too long, it cannot fit the cache)."""
    return [{"id": problem["id"], "mode": spec.mode, "workers": spec.workers, "layout": spec.layout,
             "budget": b, "answer": None, "reference": problem["answer"], "correct": False, "error": str(error)}
            for b in budgets]
