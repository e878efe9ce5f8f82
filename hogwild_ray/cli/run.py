"""`hogwild-ray run`: one problem, every worker streamed live, then the answer and the statistics."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..batch import record
from ..errors import InvalidRequestError
from ..core.events import Done
from ..progress_lines import ProgressLines
from ..core.protocol import worker_name
from ..core.results import Stats
from ..ui import LiveView, worker_colour
from ..utf8 import check_text
from .common import FORMATTER, add_model_flags, add_session_flags, load_engine, session_options

EXAMPLE_PROBLEM = (
    "A bakery sells muffins for $3 each and cookies for $2 each. On Monday it sold 14 muffins "
    "and twice as many cookies. On Tuesday it sold 5 more muffins than on Monday and half as many "
    "cookies as on Monday. How much money did the bakery make over the two days?"
)

EXAMPLES = """\
examples:
  hogwild-ray run                                   # 2 workers on a built-in example problem
  hogwild-ray run "What is 17 * 23?" --workers 3 --max-tokens 256
  hogwild-ray run "What is 2 + 3?" --temperature 0 --json > result.json
  hogwild-ray run "What is 2 + 3?" --events | jq .kind  # every event as a JSON line
  hogwild-ray run --model ./Qwen3-0.6B --device cuda --dtype bf16 "..."
  hogwild-ray run --model ./Qwen3-8B --device cuda --tp 2 --address ray://head:10001 "..."
"""


def register(sub) -> None:
    p = sub.add_parser(
        "run", formatter_class=FORMATTER, epilog=EXAMPLES,
        help="solve one problem with several workers, streaming every worker live",
        description="Solve one problem with several workers that share one KV cache. Each worker's\n"
                    "text is streamed live in its own pane (step counters, tokens/s); then the answer\n"
                    "and the run's statistics are printed.",
    )
    p.add_argument("problem", nargs="?", default=EXAMPLE_PROBLEM,
                   help="the problem to solve, in quotes (default: a built-in multi-step arithmetic word problem)")
    add_model_flags(p)
    add_session_flags(p, max_tokens=256)
    g = p.add_argument_group("output")
    out = g.add_mutually_exclusive_group()
    out.add_argument("--no-live", action="store_true",
                     help="do not stream the workers live; print their texts at the end instead")
    out.add_argument("--json", action="store_true",
                     help="print one JSON object (problem, answer, worker_texts, transcript, stats) and nothing "
                          "else on stdout; implies --no-live")
    out.add_argument("--events", action="store_true",
                     help="print every event of the run (worker_text, step_finished, redundancy_check, answer, "
                          "progress, done) as one JSON line each on stdout, as it happens")
    p.set_defaults(execute=execute)


def execute(args: argparse.Namespace, engine=None) -> int:
    if not args.problem.strip():
        raise InvalidRequestError('the problem is empty: give its text in quotes, e.g. hogwild-ray run '
                                  '"What is 17 * 23?" (or no problem at all for the built-in example)')
    check_text(args.problem, "the problem")
    options = session_options(args)  # checked before the load
    own = engine is None
    engine = load_engine(args, quiet=args.json or args.events) if own else engine
    try:
        return show(args, engine, options)
    finally:
        if own:
            engine.close()


def show(args: argparse.Namespace, engine, options: dict) -> int:
    console = Console()
    view = LiveView(args.workers, console, enabled=not (args.json or args.no_live or args.events))
    lines = ProgressLines(enabled=not view.enabled)  # a log file or pipe gets plain lines instead
    done = None
    with view:
        for event in engine.stream(args.problem, **options):
            view.feed(event)
            lines.feed(event)
            if args.events:
                print(json.dumps(event.to_json()), flush=True)
            if isinstance(event, Done):
                done = event
    result = done.result()
    if args.events:
        return 0
    if args.json:
        print(json.dumps(record(args.problem, result), indent=2))
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


def stats_table(st: Stats) -> Table:
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
