"""`hogwild-ray eval`: accuracy against the budget of sequential forward passes, Hogwild! against
one worker and against independent workers; resumable; the runs go concurrently through one
engine's shared forward passes."""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from ..errors import InvalidRequestError
from ..core.layout import LAYOUTS
from ..output_paths import directory_problem
from ..core.sampling_params import SamplingParams
from .common import FORMATTER, add_model_flags, add_replica_flag, at_least, load_engine, replicas_for

EXAMPLES = """\
data: --data FILE.jsonl, one problem per line: {"id": "q1", "problem": "...", "answer": "42"}, or
GSM8K ({"question", "answer": "... #### 42"}), MATH/LIMO ({"problem", "solution": "... \\boxed{42}"}),
AIME ({"ID", "Problem", "Answer"}) rows; or --generated N: N offline arithmetic word problems.

modes: single (one worker, plain prompt), independent (N workers that never see each other,
majority answer), hogwild (N workers sharing the cache, each --layouts layout). At every budget
(sequential forward passes) the answer is forced out of a fork of the running session.

output in --out: results.jsonl (one line per problem, mode, workers, layout and budget),
summary.md (accuracy with a 95% Wilson interval), accuracy.png. Rerunning resumes.

concurrency: the runs (problem, mode, workers, layout) share one engine's forward passes, as
many at once as fit in the K/V cache (--concurrency N caps them); each problem has its own
seeds, so the records are the same at any concurrency and on any number of --replicas.

examples:
  hogwild-ray eval --generated 20 --workers 2 --budgets 64,128 --out runs/quick
  hogwild-ray eval --model ./Qwen3-8B --device cuda --data gsm8k_test.jsonl --limit 200 \\
      --workers 1,2,4 --budgets 256,512,1024,2048 --layouts combined,interleaved --out runs/gsm8k
  hogwild-ray eval --generated 100 --device cuda --concurrency 8 --out runs/arith   # 8 runs at a time
  hogwild-ray eval --data gsm8k_test.jsonl --model ./Qwen3-8B --address head:6379 --out runs/gsm8k  # a replica per GPU
"""


def int_list(lo: int, increasing: bool = False):
    """A comma-separated list of distinct integers >= lo (strictly increasing when asked)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be comma-separated integers like 1,2,4, got {text!r}") from None
        if any(v < lo for v in values):
            raise argparse.ArgumentTypeError(f"every value must be an integer >= {lo}, got {text!r}")
        if increasing and any(b <= a for a, b in zip(values, values[1:])):
            raise argparse.ArgumentTypeError(f"budgets must increase, like 256,512,1024, got {text!r}")
        if len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"a value appears twice in {text!r}")
        return values

    return parse


def name_list(choices: tuple[str, ...], what: str):
    def parse(text: str) -> list[str]:
        names = [v.strip() for v in text.split(",")]
        bad = [v for v in names if v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(map(repr, bad))}; choose from "
                                             f"{','.join(choices)}")
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a {what} appears twice in {text!r}")
        return names

    return parse


def register(sub) -> None:
    from ..eval.runner import MODES

    p = sub.add_parser(
        "eval", formatter_class=FORMATTER, epilog=EXAMPLES,
        help="accuracy against the budget of sequential forward passes: single, independent, hogwild",
        description="Evaluate a model on a dataset: accuracy at each budget of sequential forward passes,\n"
                    "for one worker, N independent workers (majority vote) and N Hogwild! workers in\n"
                    "each cache layout. Writes a JSONL of results, a Markdown summary and a plot.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, metavar="FILE.jsonl", default=None,
                   help="problems with reference answers, one JSON object per line (shapes: see below)")
    g.add_argument("--generated", type=at_least(1), metavar="N", default=None,
                   help="use N generated arithmetic word problems (offline, from --seed) instead of --data")
    g.add_argument("--limit", type=at_least(1), metavar="N", default=None, help="only the first N problems")
    g = p.add_argument_group("what to compare")
    g.add_argument("--modes", type=name_list(MODES, "mode"), default=list(MODES), metavar="LIST",
                   help=f"comma-separated modes among {','.join(MODES)} (default: all)")
    g.add_argument("--workers", type=int_list(1), default=[1, 2, 4], metavar="LIST",
                   help="worker counts for independent and hogwild, e.g. 1,2,4 (default: 1,2,4); "
                        "single is always one worker, independent needs 2 or more")
    g.add_argument("--budgets", type=int_list(1, increasing=True), default=[256, 512, 1024, 2048], metavar="LIST",
                   help="increasing budgets of sequential forward passes (default: 256,512,1024,2048)")
    g.add_argument("--layouts", type=name_list(LAYOUTS, "layout"), default=["combined"], metavar="LIST",
                   help=f"cache layouts for hogwild among {','.join(LAYOUTS)} (default: combined)")
    g.add_argument("--finisher-tokens", type=at_least(1), default=32, metavar="N",
                   help="most tokens of a forced final answer (default: %(default)s)")
    red = g.add_mutually_exclusive_group()
    red.add_argument("--redundancy-every", type=at_least(1), default=128, metavar="N",
                     help="hogwild: every N tokens a worker is asked whether it duplicates another "
                          "(default: %(default)s)")
    red.add_argument("--no-redundancy", action="store_true", help="hogwild: never ask the redundancy question")
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.6, metavar="T",
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="top-k; 0 turns it off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling, in (0, 1] "
                                                                        "(default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the generated problems and of sampling (each problem and worker gets its "
                        "own, the same in every mode) (default: %(default)s)")
    g = p.add_argument_group("output and concurrency")
    g.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output directory; a rerun with the same DIR skips the runs already there")
    g.add_argument("--concurrency", type=at_least(1), default=None, metavar="N",
                   help="the most runs at once, sharing forward passes in one engine (default: as many as "
                        "fit in the K/V cache; a finished run's pages go to the next at once)")
    g.add_argument("--processes", nargs="?", const="", default=None, help=argparse.SUPPRESS)  # gone: a clear error
    add_replica_flag(g)
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_model_flags(p)
    p.set_defaults(execute=execute)


def load_data(args: argparse.Namespace) -> tuple[list[dict], str]:
    """The problems the flags name, and a description for the summary."""
    from ..eval.dataset import arithmetic_problems
    from ..eval.loaders import load_problems

    if (args.data is None) == (args.generated is None):
        raise InvalidRequestError("give exactly one of --data FILE.jsonl and --generated N")
    if args.data is not None:
        problems, what = load_problems(args.data), str(args.data)
    else:
        problems, what = arithmetic_problems(args.generated, args.seed), f"generated arithmetic (seed {args.seed})"
    problems = problems[: args.limit] if args.limit else problems
    return problems, f"{what}, {len(problems)} problems"


def run_device(args: argparse.Namespace, engine=None) -> str:
    """The device the runs use: the given engine's, else the one `load_engine` picks from
    --device (cuda when a GPU is visible, else cpu)."""
    if engine is not None:
        return str(engine.device)
    if args.device:
        return str(args.device)
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_note(device: str, concurrency: int | None = None, peak: int = 0, replicas: int | None = None) -> str:
    """The summary's device line, e.g. "NVIDIA H200 (cuda:0); runs in shared forward passes of one
    engine, as many at once as fit in the K/V cache, 12 at the peak; wall s: each run's time,
    sharing passes with the others" or "cpu: Intel(R) Xeon(R) ..., 2 cores; one engine, one run
    at a time (--concurrency 1)".
    concurrency: the cap (None: the cache's); peak: the most runs that ran at once (0: none ran);
    replicas: the engine replicas on Ray (None: one engine in this process)."""
    if replicas is not None:
        return (f"{replicas} engine replica(s) placed by Ray ({device}), each running its share of the runs in "
                "shared forward passes; wall s: each run's time, sharing passes with the others")
    from ..devices import device_label

    try:
        label = device_label(device)
    except Exception as e:  # naming the device must never lose a finished evaluation
        label = f"{device} (name unknown: {type(e).__name__})"
    if device.startswith("cuda"):
        label = f"{label} ({device})"
    if concurrency == 1:
        return f"{label}; one engine, one run at a time (--concurrency 1)"
    cap = "as many at once as fit in the K/V cache" if concurrency is None else \
        f"up to {concurrency} at once (--concurrency {concurrency})"
    return (f"{label}; runs in shared forward passes of one engine, {cap}" + (f", {peak} at the peak" if peak else "")
            + "; wall s: each run's time, sharing passes with the others")


def execute(args: argparse.Namespace, engine=None) -> int:
    from ..eval.experiment import PLOT, SUMMARY, Experiment, run_experiment
    from ..eval.report import plot, summarise, summary_page
    from ..eval.runner import plan

    if args.processes is not None:
        raise InvalidRequestError("--processes is gone: eval runs its runs concurrently in one engine's shared "
                                  "forward passes; use --concurrency N to cap how many run at once (default: "
                                  "as many as fit in the K/V cache), and --replicas R for R engines")
    if args.tp > 1:
        raise InvalidRequestError("eval forks running sessions, which needs an engine in one process: drop --tp "
                                  "(for more devices, --replicas R runs R engines, one device each)")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)  # checked before any load
    specs = plan(args.modes, args.workers, args.layouts)
    if not specs:
        raise InvalidRequestError("nothing to run: independent needs --workers with a count of 2 or more")
    problems, data = load_data(args)
    problem = directory_problem(args.out)
    if problem:
        raise InvalidRequestError(f"--out {problem}")
    options = {"finisher_tokens": args.finisher_tokens,
               "redundancy_every": None if args.no_redundancy else args.redundancy_every}
    exp = Experiment(problems, specs, args.budgets, args.out, sampling, args.seed, options,
                     model=args.model or "SmolLM2-135M-Instruct (built-in)")
    load = functools.partial(load_engine, args, True)
    replicas = None if engine is not None else replicas_for(args) or (1 if args.address or args.backend == "ray"
                                                                      else None)
    execute = None
    if replicas is not None:
        from ..replicated import replica_settings
        from ..serve.replica_runs import eval_execute

        settings = replica_settings(args.model, args.device, args.dtype, 1, None, args.cuda_graphs, args.concurrency)
        execute = eval_execute(settings, replicas, args.address, args.concurrency, quiet=args.quiet)
    records, peak = run_experiment(exp, load, args.concurrency, engine, progress=not args.quiet, execute=execute)
    rows = summarise(records, specs)
    model = exp.model
    notes = [f"- model: {model}",
             f"- device: {device_note(run_device(args, engine), args.concurrency, peak, replicas)}",
             f"- data: {data}",
             f"- sampling: temperature {args.temperature}, top-p {args.top_p}, top-k {args.top_k}, seed {args.seed}; "
             f"forced answers: greedy, at most {args.finisher_tokens} tokens",
             "- budget: sequential forward passes; accuracy with a 95% Wilson interval; tokens/worker and "
             "passes used are means at that budget (fewer passes where runs ended early)"]
    (args.out / SUMMARY).write_text(summary_page(rows, "Accuracy against sequential forward passes", notes),
                                    encoding="utf-8")
    plot(rows, args.out / PLOT, title=f"{Path(model).name}: accuracy against sequential forward passes")
    print(summary_page(rows, "Accuracy against sequential forward passes", []).split("\n", 2)[2], end="")
    print(f"results in {args.out}: results.jsonl, {SUMMARY}, {PLOT}")
    return 0
