"""CPU benchmark: torch's threads on a quiet machine and on one shared with busy processes.

A run beside other jobs is the common case for batch work, and the default thread setting
must not collapse there. For each OpenMP wait policy (unset: libgomp spins a while, then
sleeps, what plain torch gets; ACTIVE: idle threads spin; PASSIVE: they sleep) a child
process loads the default model once and measures forward passes per second of a 2-worker
greedy session with 1 thread, with one per core (torch's default) and with hogwild-ray's
default, the thread governor (`auto`: the cores other processes leave free, re-decided
every second), first on the machine as it is ("quiet") and then with BUSY processes
spinning beside it ("busy"). All in one run, side by side; ratios are against 1 thread in
the same condition.

    python benchmarks/threads_cpu.py                      # writes benchmarks/results/<date>-cpu-threads.*
    python benchmarks/threads_cpu.py --seconds 3 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("unset", "ACTIVE", "PASSIVE")  # unset: libgomp spins a while, then sleeps (plain torch)
SPIN = "while True: pass"


def measure(engine, threads: int | str, seconds: float, warmup: int) -> float:
    """Forward passes per second of a 2-worker greedy session with `threads` threads ("auto": the governor)."""
    import torch

    import hogwild_ray as hw
    from hogwild_ray.cli import EXAMPLE_PROBLEM

    if threads == "auto":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        hw.set_threads(None)
        warmup += 40  # the governor's first decisions take two intervals of a second
    else:
        hw.set_threads(threads)
    greedy = hw.SamplingParams(temperature=0.0)
    session = engine.start(EXAMPLE_PROBLEM, workers=2, sampling=greedy, max_tokens=None, finisher=False,
                           stop_on_answer=False)
    for _ in range(warmup):
        session.step()
    passes, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds and not session.done:
        session.step()
        passes += 1
    rate = passes / (time.perf_counter() - t0)
    session.close()
    return rate


def child(args: argparse.Namespace) -> None:
    """One wait policy (already in the environment): every (load, threads) cell as JSON lines."""
    import torch

    import hogwild_ray as hw

    engine = hw.HogwildEngine.from_pretrained(args.model, device="cpu")
    default = len(os.sched_getaffinity(0))
    for busy in (0, args.busy):
        spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
        try:
            time.sleep(0.5 if busy else 0)
            for threads in [*sorted({1, default}), "auto"]:
                rate = max(measure(engine, threads, args.seconds, args.warmup) for _ in range(args.repeats))
                print(json.dumps({"policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "busy_processes": busy,
                                  "threads": threads, "threads_at_end": torch.get_num_threads(),
                                  "passes_per_s": rate}), flush=True)
        finally:
            for s in spinners:
                s.kill()
                s.wait()


def table_rows(cells: list[dict]) -> list[dict]:
    """Each cell with its ratio to 1 thread under the same policy and load."""
    one = {(c["policy"], c["busy_processes"]): c["passes_per_s"] for c in cells if c["threads"] == 1}
    rows = []
    for c in cells:
        base = one.get((c["policy"], c["busy_processes"]))
        rows.append({**c, "condition": "busy" if c["busy_processes"] else "quiet",
                     "passes_per_s": round(c["passes_per_s"], 3),
                     "vs_1_thread": round(c["passes_per_s"] / base, 3) if base else None})
    return rows


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common import save_figure

    labels = [f"{r['policy'].lower()}\n{r['threads']} thr" for r in rows if r["condition"] == "quiet"]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.38
    for k, (cond, colour) in enumerate((("quiet", "tab:blue"), ("busy", "tab:red"))):
        ys = [r["passes_per_s"] for r in rows if r["condition"] == cond]
        xs = [i + (k - 0.5) * width for i in range(len(ys))]
        bars = ax.bar(xs, ys, width, color=colour, label=f"{cond} machine")
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("forward passes / s (2 workers)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path, title)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per cell (default: 8)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes first (default: 3)")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell, the best kept (default: 2)")
    p.add_argument("--busy", type=int, default=2, help="spinning processes beside the busy runs (default: 2)")
    p.add_argument("--model", default=None, help="model path (default: the built-in SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    p.add_argument("--date", default=None, help="date in the file names (default: today)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)

    sys.path.insert(0, str(Path(__file__).parent))
    import common

    cells = []
    for policy in POLICIES:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), env.get("PYTHONPATH")]))
        if policy != "unset":
            env["OMP_WAIT_POLICY"] = policy
        cmd = [sys.executable, __file__, "--child", "--seconds", str(args.seconds), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats), "--busy", str(args.busy)]
        if args.model:
            cmd += ["--model", args.model]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"the {policy} run failed:\n{out.stderr[-3000:]}")
        cells += [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    rows = table_rows(cells)
    date = args.date or common.today()
    meta = {"benchmark": "threads_cpu", "date": date, "device": "cpu", "cpu": common.cpu_name(),
            "cores": os.cpu_count(), **common.versions(), "model": args.model or "built-in SmolLM2-135M-Instruct",
            "workers": 2, "sampling": "greedy", "seconds_per_cell": args.seconds, "repeats": args.repeats,
            "busy": f"{args.busy} processes spinning in pure Python"}
    stem = args.out / f"{date}-cpu-threads"
    common.write_results(stem, meta, rows)
    title = f"threads on {meta['cpu']} ({meta['cores']} cores): quiet vs {args.busy} busy processes beside"
    plot(rows, title, Path(f"{stem}.png"))
    common.print_table(title, ["policy", "condition", "threads", "in use at the end", "passes/s", "vs 1 thread"],
                       [[r["policy"], r["condition"], str(r["threads"]), str(r["threads_at_end"]),
                         f"{r['passes_per_s']:.2f}", f"x{r['vs_1_thread']:.2f}"] for r in rows])
    print(f"wrote {stem}.csv, .json, .png")


if __name__ == "__main__":
    main()
