"""What every benchmark test checks first: the CSV, JSON and PNG were written."""

from __future__ import annotations

import json
from pathlib import Path


def saved_results(stem: Path, out: dict | None = None) -> dict:
    """The JSON a benchmark wrote at `stem` (its CSV and PNG must be there too, non-empty);
    with `out`, its rows must be the ones main() returned."""
    for ext in ("csv", "json", "png"):
        assert Path(f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext} is missing or empty"
    saved = json.loads(Path(f"{stem}.json").read_text())
    if out is not None:
        assert saved["rows"] == json.loads(json.dumps(out["rows"]))
    return saved
