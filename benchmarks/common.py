"""What the benchmarks share: device names, versions, model bytes, result files (the bandwidth: bandwidth.py)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from hogwild_ray import heap
from hogwild_ray.devices import cpu_name  # noqa: F401  (the benchmarks' CPU name)

RESULTS = Path(__file__).parent / "results"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def file_tag(device: torch.device) -> str:
    """The device part of result file names: `cpu`, or the GPU's name with underscores."""
    return "cpu" if device.type == "cpu" else device_name(device).replace(" ", "_")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def today() -> str:
    return datetime.date.today().isoformat()


def versions() -> dict:
    import transformers

    import hogwild_ray as hw

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "hogwild_ray": hw.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def ints(text: str) -> list[int]:
    """An argparse type: integers joined by commas ("1,4,16")."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers joined by commas (e.g. 1,4,16), got {text!r}") from None


def on_off_list(text: str) -> list[bool]:
    """An argparse type: "on", "off" or both joined by commas, one value per row ("off,on")."""
    settings = {"on": True, "off": False}
    unknown = sorted({x for x in text.split(",") if x not in settings})
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown setting(s) {unknown}; choose from on, off (e.g. off,on)")
    return [settings[x] for x in text.split(",")]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_walls(step: Callable[[], object], warmup: int, steps: int, settled: bool = True) -> list[float]:
    """Wall seconds of each of `steps` calls of step (a session's, or a batched pass's), after
    `warmup` untimed ones; settled: with the heap settled, as the engine's own loops (solve,
    stream, the scheduler, the server) run their passes (hogwild_ray.heap), else the garbage
    collector left alone."""
    for _ in range(warmup):
        step()
    walls = []
    with heap.settled() if settled else contextlib.nullcontext():
        for _ in range(steps):
            t = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t)
    return walls


def replayed_seconds(graphs, times: int) -> tuple[float, float | None]:
    """GPU seconds of a step of those timed since `graphs.uses` was cleared, without host work:
    each graph they replayed, replayed back to back `times` times, weighted by its share of
    the steps' passes (passes that feed headers are longer); and of a plain decode pass (every
    group feeding one token), None if they ran none. Measured right after the steps, so the
    graphs' plans are the steps' own."""
    each = graphs.replay_each(times)
    mix = sum(n * s for n, _, s in each) / sum(n for n, _, _ in each)
    decode = max(((n, s) for n, plain, s in each if plain), default=(0, None))[1]
    return mix, decode


def free_memory(device: torch.device) -> None:
    """Give back what deleted engines and models held, before the next section allocates."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weight_bytes_read(config, dtype: torch.dtype) -> int:
    """Bytes of weights a decode step reads: every matrix once; of an untied embedding table
    only the fed rows (nothing, next to the rest)."""
    from hogwild_ray.model.shapes import tensor_shapes

    shapes = tensor_shapes(config)
    n = sum(torch.Size(s).numel() for s in shapes.values())
    if "lm_head.weight" in shapes:
        n -= torch.Size(shapes["model.embed_tokens.weight"]).numel()
    return n * torch.finfo(dtype).bits // 8


def model_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of every weight, held in memory."""
    from hogwild_ray.model.shapes import tensor_shapes

    return sum(torch.Size(s).numel() for s in tensor_shapes(config).values()) * torch.finfo(dtype).bits // 8


def memory_budget(device: torch.device, cpu_gib: float = 8.0) -> int:
    """Bytes free now on the GPU (what weights, K/V and activations must fit in); a fixed budget on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return int(cpu_gib * (1 << 30))


def significant(x: float, digits: int = 4) -> float:
    """x to `digits` significant figures: a rate or ratio keeps its precision however small (3
    decimals made a replica's 0.0385x of the engine 0.038)."""
    return float(f"{x:.{digits}g}")


def write_results(stem: Path, meta: dict, rows: list[dict], extra: dict | None = None) -> None:
    """stem.csv (one line per row, every key as a column) and stem.json (meta, rows, extra)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    Path(f"{stem}.json").write_text(json.dumps({**meta, "rows": rows, **(extra or {})}, indent=2, default=str) + "\n")


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in rows:
        table.add_row(*r)
    Console(width=max(120, 12 * len(columns))).print(table)


def save_figure(fig, path: Path, title: str, dpi: int = 110) -> None:
    """Title, lay out, write and close a benchmark's figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def host_profile(step, steps: int, top: int = 24) -> list[str]:
    """The host functions that take the most time of `steps` steps (own, then cumulative; cProfile)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    text = io.StringIO()
    out = []
    for order in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(prof, stream=text).strip_dirs().sort_stats(order).print_stats(top)  # no machine's paths
        out += [f"by {order}:"] + [line for line in text.getvalue().splitlines() if line.strip()][-top - 1:]
    return out
