"""The `hogwild-ray` command: parse flags, build the request, call `engine.solve`.

Kept thin on purpose: every check that matters lives in the library and raises a
HogwildError, which is shown here as one `error: ...` line (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .engine import DTYPES
from .errors import HogwildError
from .layout import LAYOUTS
from .protocol import worker_name
from .sampling import SamplingParams
from .ui import LiveView, worker_colour

EXAMPLE_PROBLEM = (
    "A bakery sells muffins for $3 each and cookies for $2 each. On Monday it sold 14 muffins "
    "and twice as many cookies. On Tuesday it sold 5 more muffins than on Monday and half as many "
    "cookies as on Monday. How much money did the bakery make over the two days?"
)

EPILOG = """\
examples:
  hogwild-ray run                                   # 2 workers on a built-in example problem
  hogwild-ray run "What is 17 * 23?" --workers 3 --max-tokens 256
  hogwild-ray run "What is 2 + 3?" --temperature 0 --json > result.json
  hogwild-ray run --model ./Qwen3-0.6B --device cuda --dtype bf16 "..."
"""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one `error: ...` line, like HogwildError's."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {s!r}")
        return v

    return parse


def build_parser() -> Parser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = Parser(prog="hogwild-ray", formatter_class=fmt, epilog=EPILOG,
                    description="Hogwild! Inference: several workers of one LLM solve a problem together,\n"
                                "sharing one KV cache.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    run = sub.add_parser(
        "run", formatter_class=fmt, epilog=EPILOG,
        help="solve one problem with several workers, streaming every worker live",
        description="Solve one problem with several workers that share one KV cache. Each worker's\n"
                    "text is streamed live in its own pane; then the answer and the run's statistics\n"
                    "are printed.",
    )
    a = run.add_argument
    a("problem", nargs="?", default=EXAMPLE_PROBLEM,
      help="the problem to solve, in quotes (default: a built-in multi-step arithmetic word problem)")
    g = run.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", default=None,
                   help="a local Hugging Face model directory or .gguf file "
                        "(default: the built-in SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None,
                   help="torch device to run on: cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None, metavar="DTYPE",
                   help=f"weight and cache dtype: {', '.join(sorted(DTYPES))} "
                        "(default: float32 on cpu, bfloat16 on cuda)")
    g = run.add_argument_group("the run")
    g.add_argument("--workers", type=at_least(1), default=2, metavar="N",
                   help="number of workers sharing the cache (default: %(default)s)")
    g.add_argument("--max-tokens", type=at_least(1), default=256, metavar="N",
                   help="tokens each worker may generate before it stops (default: %(default)s)")
    g.add_argument("--max-steps", type=at_least(1), default=None, metavar="N",
                   help="stop after N forward passes of all workers (default: no limit)")
    g.add_argument("--layout", choices=LAYOUTS, default="combined",
                   help="how workers see each other: combined (shared history + everyone's step in "
                        "progress), contiguous (each worker's whole trace is one block), interleaved "
                        "(only finished steps are shared) (default: %(default)s)")
    red = g.add_mutually_exclusive_group()
    red.add_argument("--redundancy-every", type=at_least(1), default=128, metavar="N",
                     help="every N tokens a worker's next step opens with a forced question: is "
                          "another worker already doing this? (default: %(default)s)")
    red.add_argument("--no-redundancy", action="store_true",
                     help="never ask the redundancy question")
    g = run.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.6, metavar="T",
                   help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="sample among the K most likely tokens only; 0 turns it off (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=0.95, metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability >= P, in (0, 1]; "
                        "1 turns it off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed (worker w uses S + w) for a reproducible run (default: random)")
    g = run.add_argument_group("output")
    g.add_argument("--no-live", action="store_true",
                   help="do not stream the workers live; print their texts at the end instead")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (answer, worker_texts, transcript, stats) and nothing else "
                        "on stdout; implies --no-live")
    return parser


def main(argv: list[str] | None = None, engine=None) -> int:
    """Entry point of `hogwild-ray` and `python -m hogwild_ray`; `engine`: a preloaded one (tests)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return run(args, engine)
    except HogwildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, engine=None) -> int:
    from .engine import HogwildEngine

    sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)  # checked before the load
    console, err = Console(), Console(stderr=True)
    if engine is None:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if err.is_terminal:
            err.print(f"[dim]loading {args.model or 'the built-in SmolLM2-135M-Instruct'} on {device} ...")
        engine = HogwildEngine.from_pretrained(args.model, device, args.dtype)
    view = LiveView(console, enabled=not (args.json or args.no_live))
    with view:
        result = engine.solve(
            args.problem, workers=args.workers, max_tokens=args.max_tokens, sampling=sampling,
            layout=args.layout, max_steps=args.max_steps, on_step=view.on_step,
            redundancy_every=None if args.no_redundancy else args.redundancy_every,
        )
    if args.json:
        print(json.dumps({"problem": args.problem, "answer": result.answer, "worker_texts": result.worker_texts,
                          "transcript": result.transcript, "stats": result.stats.to_dict()}, indent=2))
        return 0
    if not view.enabled:
        for w, text in enumerate(result.worker_texts):
            console.rule(f"[bold {worker_colour(w)}]{worker_name(w)}", align="left")
            console.print(text, style=worker_colour(w), markup=False, highlight=False)
        console.rule()
    answer = result.answer if result.answer is not None else "(none found)"
    console.print(Text.assemble(("answer: ", "bold"), answer), highlight=False)
    console.print(stats_table(result.stats))
    return 0


def stats_table(st) -> Table:
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_column(style="dim")
    t.add_column()
    rows = [
        ("forward passes", f"{st.forward_passes}"),
        ("seconds", f"{st.seconds:.2f}"),
        ("tokens/s (all workers)", f"{st.tokens_per_second:.1f}"),
        ("forward passes/s", f"{st.forward_passes_per_second:.2f}"),
        ("tokens per worker", ", ".join(map(str, st.generated_per_worker))),
        ("finished steps per worker", ", ".join(map(str, st.steps_per_worker))),
        ("redundancy checks", f"{st.redundancy_checks}"),
        ("stop reason", st.stop_reason or "-"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t
