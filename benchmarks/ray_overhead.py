"""The Ray path's cost: per-step control overhead and start-up time to the first token.

Per step: the same model and session (greedy, N workers, no finisher) stepped in process,
then through the Ray engine at tp=1, two ways: the coordinator's own loop (one actor call
for many steps: what `solve()` does) and one `RemoteSession.step()` per step from the
driver (one actor call each). Overhead = Ray step time minus in-process step time. Two
floors are measured beside it: an echo round trip through the shared-memory step channel
(no model: what each step must pay coordinator -> shard -> coordinator) and a plain Ray
actor call (what a driver-side step adds). Start-up is split into Ray start, actor start
(placement group, coordinator, shard actors), weight loading (model files read by the
coordinator, process group and weights in the shard) and the first step (session start
with the prompt's prefill, and one step).

    python benchmarks/ray_overhead.py                                  # CPU, random:small
    python benchmarks/ray_overhead.py --device cuda --shape qwen3-8b   # random:qwen3-8b in bf16

Writes benchmarks/results/<date>-<device>-ray-overhead.{csv,json,png}. On CPU every process
runs torch on one thread (the shard does), so both sides compute alike.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import hogwild_ray as hw  # noqa: E402
from common import cpu_name  # noqa: E402
from hogwild_ray.cli import EXAMPLE_PROBLEM  # noqa: E402
from hogwild_ray.model.shapes import SHAPES  # noqa: E402

GREEDY = hw.SamplingParams(temperature=0.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def open_session(engine, workers: int):
    return engine.start(EXAMPLE_PROBLEM, workers=workers, sampling=GREEDY, max_tokens=None, finisher=False,
                        stop_on_answer=False)


def per_step(engine, workers: int, steps: int, warmup: int, device: torch.device, coordinator_loop: bool):
    """One run's mean step seconds: session.step() each step, or the coordinator's own loop."""

    def run() -> float:
        session = open_session(engine, workers)
        try:
            if coordinator_loop:
                session.run_steps(warmup)
                times = session.run_steps(steps)
                return sum(times) / len(times)
            for _ in range(warmup):
                session.step()
            sync(device)
            t = time.perf_counter()
            n = 0
            while n < steps and not session.done:
                session.step()
                n += 1
            sync(device)
            return (time.perf_counter() - t) / n
        finally:
            session.close()

    return run


def startup(path: str, device: torch.device, dtype: str, cache_tokens: int, workers: int,
            ray_start_s: float) -> tuple[object, dict]:
    """A tp=1 Ray engine and its start-up split (Ray itself was started by the caller, in ray_start_s)."""
    t0 = time.perf_counter()
    engine = hw.HogwildEngine.from_pretrained(path, str(device), dtype, backend="ray", tp=1,
                                              cache_tokens=cache_tokens)
    built = time.perf_counter() - t0
    t = time.perf_counter()
    session = open_session(engine, workers)
    session.step()
    first = time.perf_counter() - t
    session.close()
    s = engine.startup
    split = {"ray_start_s": ray_start_s,
             "actor_start_s": s["placement_s"] + s["coordinator_start_s"] + s["shard_start_s"],
             "weight_loading_s": s["read_model_s"] + s["weights_s"], "first_step_s": first}
    split["total_s"] = sum(split.values())
    return engine, {**{k: round(v, 4) for k, v in split.items()}, "detail": {k: round(v, 4) for k, v in s.items()},
                    "engine_build_s": round(built, 4)}


def floors(steps: int, shards: int) -> dict:
    """The channel's echo round trip and a plain actor call, in seconds (no model)."""
    from hogwild_ray.runtime.bench import actor_call_step_s, channel_step_s

    return {"channel_echo_s": channel_step_s(shards, "shm", steps), "actor_call_s": actor_call_step_s(1, steps)}


def plot(meta: dict, rows: list[dict], start: dict, path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = [r["path"] for r in rows]
    ms = [r["step_ms"] for r in rows]
    bars = a.bar(range(len(rows)), ms, color=["tab:gray", "tab:blue", "tab:orange"][: len(rows)])
    for bar, r in zip(bars, rows):
        label = f"{r['step_ms']:.2f} ms" + (f"\n+{r['overhead_pct']:.1f}%" if r["overhead_pct"] is not None else "")
        a.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), textcoords="offset points",
                   xytext=(0, 3), ha="center", fontsize=8)
    a.axhline(ms[0] + meta["floors_ms"]["channel_echo"], color="tab:green", ls="--", lw=1,
              label=f"in process + channel echo floor ({meta['floors_ms']['channel_echo']:.3f} ms)")
    a.set(xticks=range(len(rows)), ylabel="ms per step", ylim=(0, max(ms) * 1.3),
          title=f"step, {meta['workers']} workers, tp=1")
    a.set_xticklabels(names, fontsize=8)
    a.legend(fontsize=8, loc="lower right")
    parts = [("Ray start", "ray_start_s"), ("actor start", "actor_start_s"), ("weight loading", "weight_loading_s"),
             ("first step", "first_step_s")]
    left = 0.0
    for (label, key), colour in zip(parts, ["tab:purple", "tab:blue", "tab:orange", "tab:green"]):
        b.barh([0], [start[key]], left=left, color=colour, label=f"{label} {start[key]:.2f} s")
        left += start[key]
    b.barh([1], [meta["local_load_s"]], color="tab:gray", label=f"in process load {meta['local_load_s']:.2f} s")
    b.set(yticks=[0, 1], yticklabels=["Ray, tp=1", "in process"], xlabel="seconds", title="start-up to first token")
    b.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"hogwild-ray Ray overhead: {meta['model']} ({meta['dtype']}) on {meta['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES),
                   help="random-weight model shape (default: small on cpu, qwen3-8b on cuda)")
    p.add_argument("--model", default=None, help="a model directory instead of a random shape")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=100, help="timed steps per run (default: 100)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5, help="runs per path; the best is kept (default: 5)")
    p.add_argument("--floor-steps", type=int, default=2000, help="round trips for the floors (default: 2000)")
    p.add_argument("--cache-tokens", type=int, default=16384)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output directory")
    p.add_argument("--date", default=datetime.date.today().isoformat(), help="date in the file names")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    shape = args.shape or ("qwen3-8b" if device.type == "cuda" else "small")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as in the shard actor
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()

    path = args.model or f"random:{shape}"
    model = Path(args.model).name if args.model else f"random {shape}"
    t = time.perf_counter()
    ray.init(log_to_driver=False)  # on the GPU machine: every GPU and CPU of the node
    ray_start = time.perf_counter() - t
    t = time.perf_counter()
    local = hw.HogwildEngine.from_pretrained(path, device, dtype, cache_tokens=args.cache_tokens)
    local_load = time.perf_counter() - t
    engine, start = startup(path, device, dtype, args.cache_tokens, args.workers, ray_start)
    # The paths take turns, each run on a fresh session (the same steps), and each keeps its best
    # run: a shared machine's noise then hits all of them alike.
    runs = {name: per_step(eng, args.workers, args.steps, args.warmup, device, loop) for name, eng, loop in
            (("local", local, False), ("loop", engine, True), ("step", engine, False))}
    best = {name: float("inf") for name in runs}
    try:
        for _ in range(args.repeats):
            for name, run in runs.items():
                best[name] = min(best[name], run())
    finally:
        engine.close()
    local_s, loop_s, step_s = best["local"], best["loop"], best["step"]
    floor = floors(args.floor_steps, 1)

    def row(name: str, s: float) -> dict:
        over = None if name == "in process" else (s - local_s) * 1e3
        return {"path": name, "step_ms": round(s * 1e3, 4), "overhead_ms": None if over is None else round(over, 4),
                "overhead_pct": None if over is None else round(100 * over / (local_s * 1e3), 2)}

    rows = [row("in process", local_s), row("Ray: coordinator loop", loop_s), row("Ray: driver step()", step_s)]
    tag = "cpu" if device.type == "cpu" else device_name.replace(" ", "_")
    meta = {"date": args.date, "device": device.type, "device_name": device_name, "cores": os.cpu_count(),
            "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
            "hogwild_ray": hw.__version__, "model": model, "dtype": dtype, "tp": 1, "workers": args.workers,
            "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "channel": "shm",
            "floors_ms": {"channel_echo": round(floor["channel_echo_s"] * 1e3, 4),
                          "actor_call": round(floor["actor_call_s"] * 1e3, 4)},
            "local_load_s": round(local_load, 3), "startup": start,
            "notes": {"in_process": "session.step() on the in-process engine (same model, dtype, threads)",
                      "coordinator_loop": "steps timed inside the coordinator: the channel path alone",
                      "driver_step": "RemoteSession.step() from the driver: one actor call per step on top",
                      "weight_loading": "includes the fresh actor processes' first imports (torch, transformers)",
                      "local_load_s": "in-process from_pretrained, imports already done"}}

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.date}-{tag}-ray-overhead"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "name", "ms", "overhead_ms", "overhead_pct"])
        w.writeheader()
        for r in rows:
            w.writerow({"kind": "step", "name": r["path"], "ms": r["step_ms"], "overhead_ms": r["overhead_ms"],
                        "overhead_pct": r["overhead_pct"]})
        for k, v in meta["floors_ms"].items():
            w.writerow({"kind": "floor", "name": k, "ms": v})
        for k in ("ray_start_s", "actor_start_s", "weight_loading_s", "first_step_s", "total_s"):
            w.writerow({"kind": "startup", "name": k.removesuffix("_s"), "ms": round(start[k] * 1e3, 1)})
    Path(f"{stem}.json").write_text(json.dumps({**meta, "steps_ms": rows}, indent=2) + "\n")
    plot(meta, rows, start, Path(f"{stem}.png"))

    table = Table(title=f"{model} ({dtype}) on {device_name}, {args.workers} workers, tp=1, torch {torch.__version__}")
    for col in ("per step", "ms", "overhead ms", "overhead"):
        table.add_column(col, justify="right")
    for r in rows:
        over = "-" if r["overhead_ms"] is None else f"{r['overhead_ms']:+.3f}"
        pct = "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"
        table.add_row(r["path"], f"{r['step_ms']:.3f}", over, pct)
    table.add_row("floor: channel echo (shm)", f"{meta['floors_ms']['channel_echo']:.3f}", "", "")
    table.add_row("floor: Ray actor call", f"{meta['floors_ms']['actor_call']:.3f}", "", "")
    Console().print(table)
    st = Table(title="start-up to the first token (Ray, tp=1)")
    for col in ("Ray start", "actor start", "weight loading", "first step", "total", "in process load"):
        st.add_column(col, justify="right")
    st.add_row(*(f"{start[k]:.2f} s" for k in ("ray_start_s", "actor_start_s", "weight_loading_s", "first_step_s",
                                               "total_s")), f"{local_load:.2f} s")
    Console().print(st)
    print(f"wrote {stem}.csv, .json, .png")


if __name__ == "__main__":
    main()
