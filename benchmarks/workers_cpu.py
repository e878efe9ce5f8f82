"""CPU benchmark: forward passes and generated tokens per second with 1, 2 and 4 workers.

One forward pass feeds one token per worker, so adding workers should raise tokens/s
while passes/s falls only slowly: that is the whole point of sharing one cache. Every
run does the same number of greedy passes after a warm-up (no finisher, no stop on an
answer), each setting is repeated and its best repeat kept (the CPU may be shared).

    python benchmarks/workers_cpu.py                 # writes benchmarks/results/<date>-cpu-workers.*
    python benchmarks/workers_cpu.py --passes 4 --workers 1,2 --repeats 1 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import hogwild_ray as hw  # noqa: E402
from hogwild_ray.cli import EXAMPLE_PROBLEM  # noqa: E402
from common import cpu_name, write_results  # noqa: E402

GREEDY = hw.SamplingParams(temperature=0.0)


def measure(engine: hw.HogwildEngine, workers: int, passes: int, warmup: int) -> tuple[float, int]:
    """(seconds, generated tokens) of `passes` timed passes; a session that ends is replaced."""

    def fresh() -> hw.Session:
        return engine.start(EXAMPLE_PROBLEM, workers=workers, sampling=GREEDY, max_tokens=None,
                            finisher=False, stop_on_answer=False)

    session, seconds, generated = fresh(), 0.0, 0
    for i in range(warmup + passes):
        if session.done:
            session = fresh()
        before = sum(session.stats.generated_per_worker)
        t = time.perf_counter()
        session.step()
        dt = time.perf_counter() - t
        if i >= warmup:
            seconds += dt
            generated += sum(session.stats.generated_per_worker) - before
    session.close()
    return seconds, generated


def run(engine: hw.HogwildEngine, counts: list[int], passes: int, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for n in counts:
        seconds, generated = min(measure(engine, n, passes, warmup) for _ in range(repeats))
        rows.append({"workers": n, "passes": passes, "seconds": round(seconds, 4),
                     "passes_per_s": passes / seconds, "tokens": generated,
                     "tokens_per_s": generated / seconds, "tokens_per_s_per_worker": generated / seconds / n})
    base = next((r for r in rows if r["workers"] == 1), rows[0])
    for r in rows:
        r["passes_per_s_vs_1"] = r["passes_per_s"] / base["passes_per_s"]
        r["tokens_per_s_vs_1"] = r["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
        for k in ("passes_per_s", "tokens_per_s", "tokens_per_s_per_worker", "passes_per_s_vs_1", "tokens_per_s_vs_1"):
            r[k] = round(r[k], 3)
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    x = [r["workers"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label, colour in ((axes[0], "tokens_per_s", "generated tokens / s (all workers)", "tab:blue"),
                                   (axes[1], "passes_per_s", "forward passes / s", "tab:orange")):
        y = [r[key] for r in rows]
        ax.plot(x, y, marker="o", color=colour)
        for xi, yi, r in zip(x, y, rows):
            ax.annotate(f"x{r[key + '_vs_1']:.2f}", (xi, yi), textcoords="offset points", xytext=(0, 7),
                        ha="center", fontsize=9)
        ax.set(xlabel="workers", ylabel=label, xticks=x, ylim=(0, max(y) * 1.25 or 1))
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4", help="comma-separated worker counts (default: 1,2,4)")
    p.add_argument("--passes", type=int, default=48, help="timed forward passes per run (default: 48)")
    p.add_argument("--warmup", type=int, default=8, help="untimed passes before them (default: 8)")
    p.add_argument("--repeats", type=int, default=3, help="runs per worker count; the best is kept (default: 3)")
    p.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="date in the file names")
    args = p.parse_args()
    counts = [int(c) for c in args.workers.split(",")]

    engine = hw.HogwildEngine.from_pretrained(args.model, device="cpu")
    load_before = os.getloadavg()[0]
    rows = run(engine, counts, args.passes, args.warmup, args.repeats)
    model = Path(engine.label).name
    meta = {"date": args.date, "device": "cpu", "cpu": cpu_name(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "hogwild_ray": hw.__version__, "model": model,
            "dtype": str(engine.cache.k.dtype).removeprefix("torch."),
            "sampling": "greedy", "protocol": True, "passes": args.passes, "warmup": args.warmup,
            "repeats": args.repeats, "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}

    stem = args.out / f"{args.date}-cpu-workers"
    write_results(stem, meta, rows)
    title = (f"hogwild-ray: {model}, greedy, {args.passes} passes\n"
             f"{meta['cpu']} ({meta['torch_threads']} threads), torch {meta['torch']}")
    plot(rows, title, Path(f"{stem}.png"))

    table = Table(title=f"{model} on {meta['cpu']}, torch {meta['torch']}")
    for col in ("workers", "passes/s", "tokens/s", "tokens/s per worker", "passes/s vs 1", "tokens/s vs 1"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["workers"]), f"{r['passes_per_s']:.2f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tokens_per_s_per_worker']:.1f}", f"x{r['passes_per_s_vs_1']:.2f}",
                      f"x{r['tokens_per_s_vs_1']:.2f}")
    Console().print(table)
    print(f"wrote {stem}.csv, .json, .png")


if __name__ == "__main__":
    main()
