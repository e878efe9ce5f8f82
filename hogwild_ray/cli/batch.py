"""`hogwild-ray batch`: a JSONL file of problems in, a JSONL file of results out, resumable."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from pathlib import Path

from ..errors import InvalidRequestError, check_int
from ..output_paths import file_problem
from ..utf8 import decode, input_lines
from .common import FORMATTER, add_model_flags, add_replica_flag, add_session_flags, load_engine, replicas_for
from .common import session_options

EXAMPLES = """\
input: one problem per line, {"id": "q1", "problem": "What is 17 * 23?"} (id optional: the line's
position among the problems) or just a JSON string. output: one line per result, appended as each
finishes: {"id", "problem", "answer", "worker_texts", "transcript", "stats"} ({"id", "problem",
"error"} for a problem too long for the model's context). Rerunning the same command resumes:
ids already in the output are skipped. Progress goes to stderr (plain lines when it is not a
terminal, e.g. in a Ray job's logs).

examples:
  hogwild-ray batch --input problems.jsonl --output results.jsonl --workers 2 --max-tokens 256
  hogwild-ray batch --input in.jsonl --output out.jsonl --model ./Qwen3-8B --device cuda --tp 2
  ray job submit --working-dir . -- hogwild-ray batch --input in.jsonl --output /shared/out.jsonl --backend ray
  hogwild-ray batch --input in.jsonl --output out.jsonl --address head:6379 --device cuda --replicas 8
"""


def register(sub) -> None:
    p = sub.add_parser(
        "batch", formatter_class=FORMATTER, epilog=EXAMPLES,
        help="solve every problem of a JSONL file, one JSON line per result (resumable)",
        description="Solve many problems on one loaded model, concurrently in shared forward passes.\n"
                    "Each result is appended to the output as one JSON line as it finishes; an\n"
                    "interrupted run resumes.",
    )
    g = p.add_argument_group("files")
    g.add_argument("--input", required=True, type=Path, metavar="IN.jsonl",
                   help="problems, one JSON object (or string) per line")
    g.add_argument("--output", required=True, type=Path, metavar="OUT.jsonl",
                   help="results, one JSON line per problem, appended; its ids are skipped on a rerun (a "
                        "regular file, made if missing, in a directory that exists)")
    g.add_argument("--json", action="store_true",
                   help="also print every problem's record (input order) as JSON lines on stdout at the end")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="problems in flight at once, sharing forward passes (default: as many as the K/V "
                        "cache holds; a finished problem's pages go to the next at once)")
    add_replica_flag(g)
    add_model_flags(p)
    add_session_flags(p, max_tokens=256)
    p.set_defaults(execute=execute)


def numbered_problems(path: Path) -> list[tuple[int, Any]]:
    """(line number, problem) of a JSONL file of problems (objects or strings; blank lines skipped)."""
    if not path.is_file():
        raise InvalidRequestError(f"--input {path} is not a file; give a JSONL file of problems")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"--input {path} cannot be read ({e.strerror}); give a file you can read") from None
    problems = []
    for n, line in enumerate(input_lines(decode(data, path)), 1):
        if not line.strip():
            continue
        try:
            problems.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path}:{n} is not JSON ({e.msg}); write one object like "
                                      '{"id": "q1", "problem": "..."} per line') from e
    if not problems:
        raise InvalidRequestError(f"--input {path} holds no problems")
    return problems


def check_output(output: Path, source: Path) -> None:
    """--output must be a regular file (or one that can be made) other than --input: it is read
    back on a rerun and appended to."""
    problem = file_problem(output)
    if problem:
        raise InvalidRequestError(f"--output {problem}")
    if output.exists() and source.exists() and output.samefile(source):
        raise InvalidRequestError(f"--output {output} is the --input file; write the results to another file")


def execute(args: argparse.Namespace, engine=None) -> int:
    from ..batch import check_same_problems, done, normalize, read_finished

    options = session_options(args)  # checked before the load
    check_int("--max-concurrent", args.max_concurrent, 1, none="(as many as fit)")
    check_output(args.output, args.input)
    numbered = numbered_problems(args.input)
    problems = [value for _, value in numbered]
    items = normalize(problems, lambda i: f"{args.input}:{numbered[i][0]}")  # bad lines fail before the model loads
    finished = read_finished(args.output)
    check_same_problems(items, finished, args.output)
    if all(done(finished.get(pid)) for pid, _ in items):  # nothing to run: no model to load
        if not args.quiet:
            print(f"batch: all {len(items)} problems are already in {args.output}; nothing to run",
                  file=sys.stderr)
        if args.json:
            for pid, _ in items:
                print(json.dumps(finished[pid]))
        return 0
    replicas = replicas_for(args) if engine is None else None
    if replicas is not None:
        from ..replicated import replica_settings, run_on_replicas

        settings = replica_settings(args.model, args.device, args.dtype, args.tp, None, args.cuda_graphs,
                                    args.max_concurrent)
        records = run_on_replicas(problems, args.output, settings, replicas, args.address, not args.quiet, options)
    else:
        own = engine is None
        engine = load_engine(args, quiet=args.quiet) if own else engine
        try:
            records = engine.solve_many(problems, out=args.output, progress=not args.quiet,
                                        max_concurrent=args.max_concurrent, **options)
        finally:
            if own:
                engine.close()
    if args.json:
        for rec in records:
            print(json.dumps(rec))
    return 0
