"""A benchmark's saved rows as a Markdown table, so README tables come from the results files.

Every benchmark writes `<date>-<device>-<name>.json` (its settings, the device, the floor's
bandwidth, and one dict per row). This prints the rows that match `--where` with the columns
named by `--columns`, each `name` or `name:format` (a Python format spec such as `.2f`, or a
template such as `{:.2f}x`; numbers otherwise to four significant figures), under a line naming
the file, the device and the floor:

    python benchmarks/results_table.py benchmarks/results/2026-12-04-NVIDIA_H200-attention.json \\
        --columns 'shape,view,workers,triton_us:.1f,sdpa_us:.1f,x_floor:{:.2f}x' --where workers=1,16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class TableError(ValueError):
    """A request the results file cannot answer; the message says what is there instead."""


def parse_columns(text: str) -> list[tuple[str, str]]:
    """`a,b:.2f` as [("a", ""), ("b", ".2f")]."""
    columns = [(name, spec) for name, _, spec in (part.partition(":") for part in text.split(",") if part)]
    if not columns:
        raise TableError("--columns: name at least one column, e.g. --columns view,workers,step_ms:.2f")
    return columns


def parse_where(items: list[str]) -> dict[str, list[str]]:
    """["workers=1,16", "shape=qwen3-8b"] as {"workers": ["1", "16"], "shape": ["qwen3-8b"]}."""
    where: dict[str, list[str]] = {}
    for item in items:
        key, eq, values = item.partition("=")
        if not eq or not key or not values:
            raise TableError(f"--where {item!r}: write key=value or key=value1,value2")
        where.setdefault(key, []).extend(values.split(","))
    return where


def matches(value: object, wanted: list[str]) -> bool:
    """A row's value against --where's text: numbers compare as numbers (16 matches 16.0)."""
    for text in wanted:
        if str(value) == text:
            return True
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                if float(text) == value:
                    return True
            except ValueError:
                pass
    return False


def require_columns(rows: list[dict], names: list[str], option: str) -> None:
    """Refuse names no row has, listing those the rows do have."""
    known = {k for r in rows for k in r}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise TableError(f"{option}: no column {', '.join(unknown)} in these rows; "
                         f"they have: {', '.join(sorted(known))}")


def select(rows: list[dict], where: dict[str, list[str]]) -> list[dict]:
    """The rows whose every --where key holds one of its values."""
    require_columns(rows, list(where), "--where")
    chosen = [r for r in rows if all(matches(r.get(k), values) for k, values in where.items())]
    if not chosen:
        raise TableError(f"no row matches --where {where}; the file has {len(rows)} rows")
    return chosen


def cell(value: object, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if "{" in spec:
        return spec.format(value)
    if spec:
        return format(value, spec)
    return str(value) if isinstance(value, int) else f"{value:.4g}"


def render(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """The rows as a Markdown table of the named columns."""
    require_columns(rows, [name for name, _ in columns], "--columns")
    lines = ["| " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        try:
            lines.append("| " + " | ".join(cell(r.get(name), spec) for name, spec in columns) + " |")
        except (ValueError, IndexError, KeyError) as e:
            raise TableError(f"--columns: a format does not suit the values ({e})") from None
    return "\n".join(lines)


def caption(name: str, meta: dict) -> str:
    """The file, the device, the date and the floor's bandwidth, as far as the file gives them."""
    shown = (("device", "{}"), ("date", "{}"), ("floor_bandwidth_gbs", "floor bandwidth {} GB/s"))
    return ", ".join([f"`{name}`"] + [text.format(meta[key]) for key, text in shown if meta.get(key) not in (None, "")])


def load(path: Path) -> tuple[dict, list[dict]]:
    """A results file's settings and rows (the settings nested under "meta" or beside the rows)."""
    if path.suffix != ".json":
        raise TableError(f"{path}: give the results' .json file (the .csv has the rows but not the device)")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TableError(f"{path}: no such file; results are under benchmarks/results/") from None
    except json.JSONDecodeError as e:
        raise TableError(f"{path}: not a results file ({e})") from None
    key = next((k for k in ("rows", "results") if isinstance(data, dict) and k in data), None)  # older: results
    rows = data[key] if key else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows) or not rows:
        raise TableError(f"{path}: no rows (a benchmark's results file has a list of them under \"rows\")")
    meta = data.get("meta") if isinstance(data.get("meta"), dict) else data
    return {k: v for k, v in meta.items() if k != key}, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="a results .json file (benchmarks/results/...)")
    p.add_argument("--columns", required=True, help="name or name:format, comma-separated, in order")
    p.add_argument("--where", action="append", default=[], help="key=value[,value...]: keep those rows (repeatable)")
    args = p.parse_args(argv)
    try:
        meta, rows = load(args.results)
        table = render(select(rows, parse_where(args.where)), parse_columns(args.columns))
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(caption(args.results.name, meta) + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
