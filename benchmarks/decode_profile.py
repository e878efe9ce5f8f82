"""Where a decode step's time goes: wall, GPU, the roofline, and the GPU's kernels one by one.

For a random-weight model shape (bf16, CUDA graphs) and each worker count, one session over
an L-token shared view: the step's wall time (median of --steps), its GPU time (the last
pass's graph replayed back to back, no host work), the roofline ((weight bytes + the K/V
the pass reads) / the device's bandwidth from bandwidth.py), and torch.profiler's kernels of
those replays grouped by name. With `--skinny on,off` the decode products run on what the
engine chose at start (per weight shape, the faster of cuBLAS and the skinny kernel) or on
cuBLAS alone, side by side in one run (one engine each). `--host-profile` adds the host's
hottest functions over more steps (cProfile, after the timed ones).

    python benchmarks/decode_profile.py --shape qwen3-8b --workers 1,16 --view 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import scaling_runs  # noqa: E402
from bandwidth import measure as measure_bandwidth  # noqa: E402

import hogwild_ray as hw  # noqa: E402


def kernel_times(graph, replays: int) -> dict[str, float]:
    """µs per replay of each kernel name in the graph (CUPTI's records of the replays)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            out[e.name[:70]] += (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)) / replays
    return dict(out)


def kernel_counts(graph) -> int:
    """Kernels in one replay: the graph's kernel nodes, from a profiled replay's launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return sum(getattr(e, "device_type", None) == DeviceType.CUDA for e in prof.events())


def measure(engine, model: scaling_runs.Model, workers: int, args, bw: float) -> dict:
    sampling = [hw.SamplingParams(temperature=1.0, seed=w) for w in range(workers)]
    session = engine.start(model.text(args.view), workers, layout="combined", sampling=sampling, protocol=False,
                           chat_template=False, stop_on_answer=False, finisher=False, redundancy_every=None,
                           max_tokens=None)
    try:
        walls = common.step_walls(session, args.warmup, args.steps)
        kv_tokens, _ = scaling_runs.read_per_step(session)
        host = host_profile(session, args.steps) if args.host_profile else None
        gpu = engine.graphs.replay_last(args.replays)
        graph = engine.graphs.last.graph
        kernels = kernel_times(graph, args.replays)
        count = kernel_counts(graph)
    finally:
        session.close()
    wall = statistics.median(walls)
    roofline = (model.weight_bytes + kv_tokens * model.kv_per_token) / bw
    return {"workers": workers, "view": args.view, "step_ms": wall * 1e3, "gpu_ms": gpu * 1e3,
            "host_pct": 100 * max(wall - gpu, 0) / wall, "roofline_ms": roofline * 1e3, "x_roofline": wall / roofline,
            "gpu_x_roofline": gpu / roofline, "kernels_per_pass": count, "kernel_us": kernels, "host_top": host}


def host_profile(session, steps: int, top: int = 16) -> list[str]:
    """The host functions that take the most time of `steps` steps (own time, cProfile)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        session.step()
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return [line for line in text.getvalue().splitlines() if line.strip()][-top - 1:]


def main(argv: list[str] | None = None) -> int:
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b")
    p.add_argument("--workers", type=ints, default=[1, 16])
    p.add_argument("--view", type=int, default=4096)
    p.add_argument("--skinny", default="on,off", help="on, off or both (the decode products' kernel)")
    p.add_argument("--host-profile", action="store_true", help="also profile the host's work (cProfile)")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark profiles CUDA graphs and torch sees no GPU")
    dev = torch.device("cuda")
    floor = measure_bandwidth(dev)
    model = scaling_runs.Model(f"random:{args.shape}", dev, torch.bfloat16)
    rows = []
    for setting in args.skinny.split(","):
        engine = hw.HogwildEngine.from_pretrained(model.path, dev, torch.bfloat16, cuda_graphs=True,
                                                  cache_tokens=max(args.workers) * 512 + args.view + 4096)
        engine.eos_ids = frozenset()
        chosen = {f"{n}x{k} rows<={r}": str(c) for (n, k, r), c in engine.decoder.products.items()}
        if setting != "on":
            engine.decoder.products = {}
        for w in args.workers:
            r = {"skinny": setting, **measure(engine, model, w, args, floor.value)}
            r["products"] = chosen if setting == "on" else "cuBLAS"
            rows.append(r)
            print(f"skinny {setting}, {w} workers: step {r['step_ms']:.2f} ms, GPU {r['gpu_ms']:.2f} ms, roofline "
                  f"{r['roofline_ms']:.2f} ms (x{r['x_roofline']:.2f}), host {r['host_pct']:.1f}%, "
                  f"{r['kernels_per_pass']} kernels", flush=True)
        del engine
        common.free_memory(dev)
    name = common.device_name(dev)
    common.print_table(f"Decode step, random:{args.shape} bf16, {args.view}-token view, {name}, bandwidth "
                       f"{floor.gbs:.0f} GB/s",
                       ["skinny", "workers", "step ms", "GPU ms", "roofline ms", "x roofline", "GPU x roofline",
                        "host %", "kernels"],
                       [[r["skinny"], str(r["workers"]), f"{r['step_ms']:.2f}", f"{r['gpu_ms']:.2f}",
                         f"{r['roofline_ms']:.2f}", f"{r['x_roofline']:.2f}", f"{r['gpu_x_roofline']:.2f}",
                         f"{r['host_pct']:.1f}", str(r["kernels_per_pass"])] for r in rows])
    for r in rows:
        top = sorted(r["kernel_us"].items(), key=lambda kv: -kv[1])[:14]
        common.print_table(f"kernels of one pass: skinny {r['skinny']}, {r['workers']} workers "
                           f"(sum {sum(r['kernel_us'].values()):.0f} µs)",
                           ["kernel", "µs per pass"], [[k, f"{v:.1f}"] for k, v in top])
        if r["host_top"]:
            print(f"host, skinny {r['skinny']}, {r['workers']} workers, {args.steps} steps:", *r["host_top"], sep="\n")
    stem = args.out / f"{args.date}-{common.file_tag(dev)}-decode_profile"
    meta = {"device": name, "date": args.date, "model": model.path, "view": args.view, **floor.meta(),
            "weight_bytes_read_per_step": model.weight_bytes, "versions": common.versions()}
    flat = [{k: v for k, v in r.items() if k not in ("kernel_us", "host_top")} for r in rows]
    common.write_results(stem, meta, flat, {"kernels": [{"skinny": r["skinny"], "workers": r["workers"],
                                                         "kernel_us": r["kernel_us"], "host_top": r["host_top"]}
                                                        for r in rows]})
    plot(rows, Path(f"{stem}.png"), f"Decode step vs roofline, random:{args.shape}, {args.view} view, {name}")
    print(f"wrote {stem}.csv, .json and .png")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['workers']}w skinny {r['skinny']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.27 for x in xs], [r["step_ms"] for r in rows], 0.27, label="step (wall)")
    ax.bar(list(xs), [r["gpu_ms"] for r in rows], 0.27, label="GPU (graph replay)")
    ax.bar([x + 0.27 for x in xs], [r["roofline_ms"] for r in rows], 0.27, label="roofline")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(ylabel="ms per step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    common.save_figure(fig, path, title)


if __name__ == "__main__":
    sys.exit(main())
