"""Many problems over engine replicas: problems/s and tokens/s with 1, 2, ... replicas placed
by Ray Serve, against one engine in this process, in one run.

Every row solves the same problems (generated arithmetic, greedy, W workers each, every worker
generating up to --tokens tokens: no finisher, no stop on an answer, only the end-of-text token
ends a worker early), so the rows do the same work and their answers must be the same
(`same_as_engine` checks every worker's text against the in-process engine). Each replica count is started once on a local Ray (`start_s`: deploying
the replicas, loading the model in each), then timed over the problems (`run_s`: from the
first call to the last answer, each replica batching its share in shared passes).

On the CPU a replica is one process with one CPU (Ray gives its actors one thread each), so
the in-process engine is measured with one thread too: `x_engine` of 1 replica is the cost of
going through Ray Serve, and `x_1_replica` of R replicas is how the run scales with processes.
On GPUs a replica takes --tp GPUs.

    python benchmarks/replicas.py                      # the built-in model on the CPU, 1 and 2 replicas
    python benchmarks/replicas.py --model random:tiny --problems 8 --tokens 4 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hogwild_ray as hw  # noqa: E402
from common import (RESULTS, device_name, print_table, save_figure, significant, today, versions,  # noqa: E402
                    write_results)
from hogwild_ray.batch import run_batch  # noqa: E402
from hogwild_ray.eval import arithmetic_problems  # noqa: E402
from hogwild_ray.replicated import replica_settings  # noqa: E402
from hogwild_ray.serve.pool import ReplicaPool  # noqa: E402
from hogwild_ray.serve.replica_runs import batch_on_replicas  # noqa: E402

GREEDY = hw.SamplingParams(temperature=0.0)


def options(tokens: int) -> dict:
    """Every worker runs to `tokens` tokens (or its end-of-text token): the rows do the same work."""
    return {"max_tokens": tokens, "sampling": GREEDY, "finisher": False, "stop_on_answer": False}


def summary(label: str, replicas: int, records: list[dict], start_s: float, run_s: float) -> dict:
    tokens = sum(sum(r["stats"]["generated_per_worker"]) for r in records)
    return {"row": label, "replicas": replicas, "problems": len(records), "start_s": round(start_s, 2),
            "run_s": round(run_s, 3), "problems_per_s": significant(len(records) / run_s),
            "tokens": tokens, "tokens_per_s": round(tokens / run_s, 2)}


def in_process(model: str | None, device: str, cache_tokens: int | None, problems: list[dict], workers: int,
               tokens: int) -> tuple[dict, list[dict]]:
    t = time.perf_counter()
    engine = hw.HogwildEngine.from_pretrained(model, device=device, cache_tokens=cache_tokens)
    start_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        records = engine.solve_many(problems, None, progress=False, workers=workers, **options(tokens))
        run_s = time.perf_counter() - t
    finally:
        engine.close()
    return summary("one engine, in process", 0, records, start_s, run_s), records


def on_replicas(settings, replicas: int, problems: list[dict], workers: int, tokens: int) -> tuple[dict, list[dict]]:
    t = time.perf_counter()
    with ReplicaPool(settings, replicas, quiet=True) as pool:
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        records = run_batch(batch_on_replicas(pool, workers, options(tokens), None), problems, None, progress=False)
        run_s = time.perf_counter() - t
    return summary(f"{replicas} replica(s)", replicas, records, start_s, run_s), records


def plot(rows: list[dict], title: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [r["row"].replace(", ", ",\n") for r in rows]
    for ax, key, label, colour in ((axes[0], "problems_per_s", "problems / s", "tab:blue"),
                                   (axes[1], "tokens_per_s", "generated tokens / s", "tab:orange")):
        values = [r[key] for r in rows]
        bars = ax.bar(range(len(rows)), values, color=colour)
        for bar, r in zip(bars, rows):
            note = f"x{r['x_engine']:.2f} engine" + (f"\nx{r['x_1_replica']:.2f} 1 replica" if r["replicas"] else "")
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), textcoords="offset points",
                        xytext=(0, 4), ha="center", fontsize=8)
        ax.set(ylabel=label, xticks=range(len(rows)), ylim=(0, max(values) * 1.35 or 1))
        ax.set_xticklabels(labels, fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default: 1,2)")
    p.add_argument("--problems", type=int, default=16, help="problems per row (default: 16)")
    p.add_argument("--workers", type=int, default=2, help="workers per problem (default: 2)")
    p.add_argument("--tokens", type=int, default=32, help="tokens each worker generates (default: 32)")
    p.add_argument("--model", default=None, help="model path or random:NAME (a named shape, random weights; default: the built-in model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--tp", type=int, default=1, help="GPUs per replica (default: 1)")
    p.add_argument("--cache-tokens", type=int, default=8192, help="K/V cache tokens per engine (default: 8192)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output directory")
    p.add_argument("--date", default=today(), help="date in the file names")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.replicas.split(",")]
    model = args.model
    problems = arithmetic_problems(args.problems, seed=0)
    cpu = args.device == "cpu"
    import ray

    own_ray = not ray.is_initialized()
    if own_ray:  # one CPU a replica (Serve's controller and the pool's lease take none), one for this driver
        ray.init(num_cpus=max(counts) + 1 if cpu else None, log_to_driver=False)
    try:
        threads = torch.get_num_threads()
        if cpu:
            torch.set_num_threads(1)  # what each replica gets
        try:
            base, reference = in_process(model, args.device, args.cache_tokens, problems, args.workers, args.tokens)
        finally:
            torch.set_num_threads(threads)
        rows = [base]
        settings = replica_settings(model, args.device, None, args.tp, args.cache_tokens, None, None)
        for r in counts:
            row, records = on_replicas(settings, r, problems, args.workers, args.tokens)
            row["same_as_engine"] = [x["worker_texts"] for x in records] == [x["worker_texts"] for x in reference]
            rows.append(row)
    finally:
        if own_ray:
            ray.shutdown()
    base["same_as_engine"] = True
    one = next((r for r in rows if r["replicas"] == 1), None)
    for r in rows:
        r["x_engine"] = significant(r["problems_per_s"] / base["problems_per_s"])
        r["x_1_replica"] = (significant(r["problems_per_s"] / one["problems_per_s"]) if one and r["replicas"]
                            else None)

    dev = torch.device(args.device)
    tag = "cpu" if cpu else device_name(dev).replace(" ", "_")
    label = Path(model).name if model else "SmolLM2-135M-Instruct (built-in)"
    meta = {"benchmark": "replicas", "date": args.date, "device": args.device, "device_name": device_name(dev),
            "cores": os.cpu_count(), "model": label, "problems": args.problems, "workers": args.workers,
            "tokens_per_worker": args.tokens, "tp": args.tp, "cache_tokens": args.cache_tokens,
            "threads_per_engine": 1 if cpu else None, "load_average": os.getloadavg()[0], **versions()}
    stem = args.out / f"{args.date}-{tag}-replicas"
    write_results(stem, meta, rows)
    title = (f"hogwild-ray: {args.problems} problems x {args.workers} workers x {args.tokens} tokens, {label}\n"
             f"{meta['device_name']}, one engine in process vs replicas on Ray Serve")
    plot(rows, title, Path(f"{stem}.png"))
    print_table(f"{label} on {meta['device_name']}",
                ["row", "start s", "run s", "problems/s", "tokens/s", "x engine", "x 1 replica", "same answers"],
                [[r["row"], f"{r['start_s']:.1f}", f"{r['run_s']:.2f}", f"{r['problems_per_s']:.2f}",
                  f"{r['tokens_per_s']:.1f}", f"x{r['x_engine']:.2f}",
                  "" if r["x_1_replica"] is None else f"x{r['x_1_replica']:.2f}", str(r["same_as_engine"])]
                 for r in rows])
    print(f"wrote {stem}.csv, .json, .png")
    return {**meta, "rows": rows}


if __name__ == "__main__":
    main()
