"""The `hogwild-ray` command: parse flags, hand them to one command module, show errors as one line.

Kept thin on purpose: every check that matters lives in the library and raises a
HogwildError, which is shown here as one `error: ...` line (exit code 2), like a usage error.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import HogwildError
from . import batch, bench, eval, info, run, serve
from .common import FORMATTER, Parser, as_flags
from .run import EXAMPLE_PROBLEM  # the benchmarks' problem too

COMMANDS = (run, batch, eval, serve, bench, info)

EPILOG = """\
examples:
  hogwild-ray run                                   # 2 workers on a built-in example problem, live
  hogwild-ray run "What is 17 * 23?" --workers 3 --max-tokens 256
  hogwild-ray run "What is 2 + 3?" --temperature 0 --json > result.json
  hogwild-ray batch --input problems.jsonl --output results.jsonl --workers 2
  hogwild-ray eval --generated 20 --workers 1,2 --budgets 64,128 --out runs/quick
  hogwild-ray serve --replicas 2 --api-key "$KEY"        # OpenAI-compatible, http://127.0.0.1:8000/v1
  hogwild-ray bench workers_cpu
  hogwild-ray info --json

`hogwild-ray COMMAND --help` lists every flag of a command.
"""


def build_parser() -> Parser:
    parser = Parser(prog="hogwild-ray", formatter_class=FORMATTER, epilog=EPILOG,
                    description="Hogwild! Inference: several workers of one LLM solve a problem together,\n"
                                "sharing one KV cache; in this process or on a Ray cluster.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None, engine=None) -> int:
    """Entry point of `hogwild-ray` and `python -m hogwild_ray`; `engine`: a preloaded one (tests)."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
    except SystemExit as e:  # --help, --version and usage errors
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if extras:  # named against the subcommand's own flags, with its help to read
        print(subcommand(parser, args.command).unknown_flags(extras), file=sys.stderr)
        return 2
    try:
        return args.execute(args, engine)
    except HogwildError as e:
        print(f"error: {as_flags(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def subcommand(parser: Parser, name: str) -> Parser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


__all__ = ["EXAMPLE_PROBLEM", "build_parser", "main"]
