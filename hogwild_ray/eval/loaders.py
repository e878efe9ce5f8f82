"""Evaluation data files: one problem per line, in the shapes people already have.

Every row becomes `{"id", "problem", "answer"}`. Field names are matched in any case
(`Problem`, `ANSWER`, ...); the first that fits wins:

| shape            | problem from          | answer from                                           | id from           |
|------------------|-----------------------|-------------------------------------------------------|-------------------|
| plain            | `problem`             | `answer`                                              | `id`              |
| GSM8K            | `question`            | `answer`: the text after its last `####`              | `id`              |
| MATH, LIMO       | `problem`/`question`  | `answer`, else the last `\\boxed{...}` of `solution`  | `id`/`unique_id`  |
| AIME             | `Problem`/`problem`   | `Answer`/`answer`                                     | `ID`/`id`         |

An `answer` that holds a whole solution is cut the same way (after `####`, or its last
`\\boxed{}`). Without an id a row's id is its position among the problems (0, 1, ...).
A file may also be one JSON array of such objects. A row that fits no shape is an error
naming the file, the line and the fields it has.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InvalidRequestError
from ..core.protocol import extract_boxed
from ..utf8 import check_text, decode, input_lines

PROBLEM_FIELDS = ("problem", "question")
ANSWER_FIELDS = ("answer", "solution")
ID_FIELDS = ("id", "unique_id")
SHAPES = ("'problem' and 'answer' (plain, AIME), GSM8K's 'question' and 'answer' ending in '#### N', "
          "or MATH/LIMO's 'problem' and 'solution' with \\boxed{...}")


def final_answer(text: str) -> str | None:
    """The short answer inside a reference text: after GSM8K's `####`, else its last \\boxed{}, else all of it."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip() or None
    boxed = extract_boxed(text)
    return boxed if boxed is not None else (text.strip() or None)


def parse_row(row: object, index: int, where: str) -> dict:
    """One row as {"id", "problem", "answer"}; `where` (file:line) names it in errors."""
    if not isinstance(row, dict):
        raise InvalidRequestError(f"{where} is a JSON {type(row).__name__}, not an object; give {SHAPES}")
    fields = {}
    for key, value in row.items():
        fields.setdefault(str(key).lower(), value)
    problem = next((fields[k] for k in PROBLEM_FIELDS if isinstance(fields.get(k), str) and fields[k].strip()), None)
    answer = None
    if fields.get("answer") is not None and not isinstance(fields["answer"], (dict, list, bool)):
        answer = final_answer(str(fields["answer"]))
    if answer is None and isinstance(fields.get("solution"), str):
        answer = extract_boxed(fields["solution"]) or (final_answer(fields["solution"])
                                                       if "####" in fields["solution"] else None)
    if problem is None or answer is None:
        have = ", ".join(map(str, row)) or "none"
        lacks = "a problem" if problem is None else "an answer"
        raise InvalidRequestError(f"{where} fits no known shape: it lacks {lacks} (its fields: {have}); give {SHAPES}")
    check_text(problem, f"{where}'s problem")
    pid = next((fields[k] for k in ID_FIELDS if fields.get(k) is not None), index)
    if isinstance(pid, bool) or not isinstance(pid, (str, int)):
        raise InvalidRequestError(f"{where} has id {pid!r}; ids must be strings or integers")
    return {"id": pid, "problem": problem, "answer": answer}


def load_problems(path: str | Path) -> list[dict]:
    """Every problem of a JSONL file (or a JSON array), as {"id", "problem", "answer"} dicts."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequestError(f"--data {path} is not a file; give a JSONL file with one problem per line")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"--data {path} cannot be read ({e.strerror}); give a file you can read") from None
    text = decode(data, path).removeprefix("\ufeff")  # (a byte-order mark, as Windows editors write)
    if text.lstrip().startswith("["):
        try:
            rows = [(f"{path} item {i}", row) for i, row in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise InvalidRequestError(f"{path} starts like a JSON array but is not one ({e.msg}, line {e.lineno})") from e
    else:
        rows = []
        for n, line in enumerate(input_lines(text), 1):
            if not line.strip():
                continue
            try:
                rows.append((f"{path}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise InvalidRequestError(f"{path}:{n} is not JSON ({e.msg}); write one object per line, "
                                          'e.g. {"problem": "...", "answer": "42"}') from e
    problems, seen = [], set()
    for i, (where, row) in enumerate(rows):
        p = parse_row(row, i, where)
        if p["id"] in seen:
            raise InvalidRequestError(f"{where}: id {p['id']!r} appears twice; ids must be unique")
        seen.add(p["id"])
        problems.append(p)
    if not problems:
        raise InvalidRequestError(f"--data {path} holds no problems")
    return problems
