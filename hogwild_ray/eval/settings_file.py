"""What an evaluation directory's records were made with, kept beside them (`settings.json`), so
that a rerun into it adds to the same evaluation or is refused: records of another model, other
sampling or other problems under the same ids must not be mixed into one report.

A rerun may add problems, budgets, modes or worker counts (the records are keyed by them); the
model, the sampling, the seed and the protocol options must be the same, and so must the text and
answer of every problem both runs have. A directory written before this file existed is taken as
it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError

SETTINGS = "settings.json"


def problem_digest(problem: dict) -> str:
    """A problem's text and answer, as one short hash."""
    text = json.dumps([problem["problem"], str(problem["answer"])], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def differences(theirs: dict[str, Any], mine: dict[str, Any]) -> list[str]:
    """What differs between the settings found and this run's, in words (none: the same evaluation)."""
    out = [f"{key} {theirs.get(key)!r} there, {value!r} now" for key, value in mine.items()
           if key != "problems" and theirs.get(key) != value]
    old, new = theirs.get("problems", {}), mine.get("problems", {})
    changed = sorted((pid for pid in old.keys() & new.keys() if old[pid] != new[pid]), key=str)
    if changed:
        shown = ", ".join(map(repr, changed[:3])) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        out.append(f"another problem text or answer under id {shown}")
    return out


def check_and_keep(out: Path, mine: dict[str, Any], has_records: bool = True) -> None:
    """Refuse a rerun that `differences` finds; else write this run's settings (the problems of
    both runs), replaced in one rename. has_records False: the directory holds no record yet (a
    run that stopped before its first, say a model path mistyped), so nothing is compared."""
    path = out / SETTINGS
    theirs: dict[str, Any] = {}
    if path.exists() and has_records:
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidRequestError(f"{path} cannot be read ({e}); remove it to take the records as they are, "
                                      "or use another --out") from None
        if not isinstance(theirs, dict):
            raise InvalidRequestError(f"{path} is not a settings object; remove it, or use another --out")
        if found := differences(theirs, mine):
            raise InvalidRequestError(f"--out {out} holds an evaluation made otherwise ({'; '.join(found)}): its "
                                      "records would be mixed with these; use another --out, or the same settings")
    kept = {**mine, "problems": {**theirs.get("problems", {}), **mine.get("problems", {})}}
    tmp = path.with_name(SETTINGS + ".tmp")
    tmp.write_text(json.dumps(kept, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
