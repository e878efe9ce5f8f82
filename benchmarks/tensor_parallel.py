"""Tensor-parallel scaling through the Ray engine: step time, tokens/s and all-reduce time vs tp.

For every tp of `--tp`, one Ray engine (`backend="ray"`, one shard actor per GPU, NCCL on
CUDA, gloo on the CPU); for every workers count of `--workers`, one session on a shared
view of `--view` tokens (greedy, protocol off, no finisher), stepped `--steps` times in the
coordinator's own loop (`RemoteSession.run_steps`: no driver round trip per step). Per cell:
step time (median), tokens/s, all-reduce time per step (rank 0's collectives, timed with
CUDA events: `RayHogwildEngine.time_collectives`) and its fraction of the step, and the step
time against tp=1 for the same workers. A tp that the model does not split into, that needs
more GPUs than are visible, or whose weights and K/V do not fit on one GPU (estimated) is
skipped with the reason. The targets: tp=2 <= 0.6x and tp=4 <= 0.35x of tp=1's step
time, all-reduce < 15% of the step at tp=8; each is reported met, missed or not measured.

NVLink multicast stays off: the shards set NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1
and NVSHMEM_DISABLE_NVLS=1 unless set already (hogwild_ray/runtime/shard.py), and so does
this driver before it starts Ray. At tp > 1 decode passes run eager: the engine captures no
CUDA graphs around NCCL collectives yet, so tp=1 runs eager too (`--graphs` to let it capture).

    python benchmarks/tensor_parallel.py --tp 1,2,4 --workers 1,2,4,8,16          # qwen2.5-32b on CUDA
    python benchmarks/tensor_parallel.py --shape llama3-70b --tp 4,8 --suffix 70b
    python benchmarks/tensor_parallel.py --check --tp 1,2,4,8                       # see tensor_parallel_check.py

Writes DATE-DEVICE-tensor-parallel[-SUFFIX].{csv,json,png} under --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import hogwild_ray as hw  # noqa: E402
from hogwild_ray.errors import UnsupportedModelError  # noqa: E402
from hogwild_ray.model import locate, spec_from_config  # noqa: E402
from hogwild_ray.model.loader import load_config  # noqa: E402
from hogwild_ray.model.parallel import shard_plan  # noqa: E402
from hogwild_ray.runtime.shard import multicast_off  # noqa: E402

GIB = 1 << 30
TEXT = ("The committee met on a grey Tuesday morning to review the harbour accounts. Seven ships had "
        "arrived since spring, each carrying timber, salt, copper wire and crates of dried figs. ")
TARGETS = [  # (name, tp, column, upper bound)
    ("tp=2 step time <= 0.6x tp=1", 2, "vs_tp1", 0.6),
    ("tp=4 step time <= 0.35x tp=1", 4, "vs_tp1", 0.35),
    ("all-reduce < 15% of the step at tp=8", 8, "allreduce_fraction", 0.15),
]
NOTES = {
    "step_ms": "median seconds of a step in the coordinator's loop (channel round trip and sampling sync included)",
    "allreduce_ms": "rank 0's time in all-reduce and all-gather per step (CUDA events / perf_counter), "
                    "waits for slower ranks included",
    "allreduce_fraction": "all-reduce seconds / step seconds over the timed steps",
    "vs_tp1": "step_ms / step_ms at tp=1 with the same workers",
    "graphs": "CUDA graphs are captured only at tp=1 with --graphs; tp > 1 runs eager",
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None,
                   help="random:NAME shape (default: qwen2.5-32b on cuda, tiny on cpu; --check: qwen3-8b / tiny-qwen3)")
    p.add_argument("--model", default=None, help="a model path instead of a random shape")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--tp", type=common.ints, default=[1, 2, 4], help="tensor-parallel degrees (default: 1,2,4)")
    p.add_argument("--workers", type=common.ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--view", type=int, default=1024, help="tokens of the prompt all workers share")
    p.add_argument("--steps", type=int, default=32, help="timed steps per cell (--check: steps compared)")
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--graphs", action="store_true", help="let tp=1 capture CUDA graphs (tp > 1 cannot)")
    p.add_argument("--check", action="store_true", help="greedy tokens and logits of tp=N against tp=1 instead")
    p.add_argument("--check-workers", type=int, default=4, help="--check: workers per session")
    p.add_argument("--reference", choices=("local", "ray"), default="local",
                   help="--check: run tp=1 in this process (default) or through Ray")
    p.add_argument("--cpu-memory-gib", type=float, default=8.0, help="memory budget per shard on the CPU")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="", help="added to the file names")
    return p.parse_args(argv)


def setup(args: argparse.Namespace, check: bool = False) -> tuple[torch.device, str, str]:
    """(device, dtype name, model path); Ray started (if it is not) with multicast off in its environment."""
    import ray

    device = torch.device(args.device) if args.device else common.default_device()
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    default = ("qwen3-8b" if check else "qwen2.5-32b") if device.type == "cuda" else ("tiny-qwen3" if check else "tiny")
    path = args.model or f"random:{args.shape or default}"
    multicast_off()  # the raylet and every worker it starts inherit this process's environment
    if device.type == "cpu":
        torch.set_num_threads(1)  # as in the shard actors
    if not ray.is_initialized():
        cpus = max(os.cpu_count() or 1, max(args.tp)) if device.type == "cpu" else None
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return device, dtype, path


def visible(device: torch.device) -> int:
    """Shards the cluster can hold at once: its GPUs on CUDA, its CPUs on the CPU."""
    import ray

    return int(ray.cluster_resources().get("GPU" if device.type == "cuda" else "CPU", 0))


def why_not(spec, tp: int, device: torch.device, dtype: torch.dtype, cache_tokens: int, weights: int,
            cpu_gib: float) -> str | None:
    """Why tp cannot run here (None if it can): the split, the device count, the memory estimate."""
    try:
        plan = shard_plan(spec, 0, tp)
    except UnsupportedModelError as e:
        return str(e).split(". ")[0]
    if tp > visible(device):
        return f"needs {tp} {'GPUs' if device.type == 'cuda' else 'CPUs'}, the cluster has {visible(device)}"
    per_gpu = (torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" and
               torch.cuda.is_available() else int(cpu_gib * GIB))
    need = weights / tp + cache_tokens * plan.local_spec(spec).kv_bytes_per_token(dtype) + 2 * GIB
    if need > 0.92 * per_gpu:
        return (f"needs about {need / GIB:.1f} GiB per device (weights / tp, K/V, 2 GiB working), "
                f"has {per_gpu / GIB:.0f}")
    return None


def view_text(engine, tokens: int) -> str:
    tok = engine.tokenizer
    return tok.decode(tok(TEXT * (tokens // 30 + 2), add_special_tokens=False)["input_ids"][:tokens])


def time_cell(engine, text: str, workers: int, args: argparse.Namespace) -> dict:
    """One session: warm up, then `steps` steps in the coordinator with the collectives timed."""
    session = engine.start(text, workers, sampling=hw.SamplingParams(temperature=0.0), max_tokens=None,
                           protocol=False, chat_template=False, stop_on_answer=False, finisher=False,
                           redundancy_every=None)
    try:
        session.run_steps(args.warmup)
        engine.collective_time()  # reset: the prefill and the warm-up are not counted
        times = session.run_steps(args.steps)
        seconds, passes = engine.collective_time()
    finally:
        session.close()
    step = statistics.median(times)
    return {"step_ms": step * 1e3, "step_ms_mean": statistics.fmean(times) * 1e3, "tokens_per_s": workers / step,
            "allreduce_ms": seconds / max(passes, 1) * 1e3, "allreduce_fraction": seconds / sum(times),
            "timed_steps": len(times)}


def run_tp(path: str, device: torch.device, dtype: str, tp: int, cache_tokens: int,
           args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Every workers cell at one tp, on one engine (closed at the end)."""
    rows, skipped = [], []
    engine = hw.HogwildEngine.from_pretrained(path, str(device), dtype, backend="ray", tp=tp,
                                              cache_tokens=cache_tokens,
                                              cuda_graphs=None if tp == 1 and args.graphs else False)
    try:
        engine.time_collectives(True)
        text = view_text(engine, args.view)
        for n in args.workers:
            try:
                rows.append({"tp": tp, "workers": n, "view": args.view, **time_cell(engine, text, n, args)})
                r = rows[-1]
                print(f"  tp={tp} workers={n}: {r['step_ms']:.2f} ms, all-reduce {r['allreduce_ms']:.2f} ms "
                      f"({100 * r['allreduce_fraction']:.0f}%)", flush=True)
            except Exception as e:  # out of memory, a full cache: the other cells still run
                skipped.append({"tp": tp, "workers": n, "reason": f"{type(e).__name__}: {str(e)[:200]}"})
                print(f"  tp={tp} workers={n}: skipped ({type(e).__name__})", flush=True)
    finally:
        engine.close()
        common.free_memory(device)
    return rows, skipped


def add_ratios(rows: list[dict]) -> None:
    base = {r["workers"]: r["step_ms"] for r in rows if r["tp"] == 1}
    for r in rows:
        r["vs_tp1"] = r["step_ms"] / base[r["workers"]] if r["workers"] in base else None


def targets(rows: list[dict]) -> list[dict]:
    """Each target over every workers count at its tp: met only if every measured cell meets it."""
    out = []
    for name, tp, column, bound in TARGETS:
        values = {r["workers"]: r[column] for r in rows if r["tp"] == tp and r.get(column) is not None}
        if not values:
            out.append({"target": name, "status": "not measured", "worst": None, "by_workers": {}})
            continue
        worst = max(values.values())
        out.append({"target": name, "status": "met" if worst <= bound else "missed", "worst": round(worst, 4),
                    "by_workers": {n: round(v, 4) for n, v in values.items()}})
    return out


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    tps = sorted({r["tp"] for r in rows})
    for n in meta["workers"]:
        cells = sorted((r for r in rows if r["workers"] == n), key=lambda r: r["tp"])
        label = f"{n} worker{'s' if n > 1 else ''}"
        if cells:
            a.plot([r["tp"] for r in cells], [r["step_ms"] for r in cells], marker="o", label=label)
            b.plot([r["tp"] for r in cells], [100 * r["allreduce_fraction"] for r in cells], marker="o", label=label)
    a.set(xlabel="tp", ylabel="ms per step", title="step time", xticks=tps, ylim=(0, None))
    b.axhline(15, color="tab:red", ls="--", lw=1, label="target at tp=8: 15%")
    b.set(xlabel="tp", ylabel="% of the step", title="all-reduce share of the step", xticks=tps, ylim=(0, None))
    for ax in (a, b):
        ax.legend(fontsize=8)
    common.save_figure(fig, path, f"hogwild-ray tensor parallel: {meta['model']} ({meta['dtype']}), view "
                       f"{meta['view']}, on {meta['device_name']}", dpi=120)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.check:
        import tensor_parallel_check

        return tensor_parallel_check.run(args)
    device, dtype, path = setup(args)
    config = load_config(locate(path))
    spec, torch_dtype = spec_from_config(config), getattr(torch, dtype)
    weights = common.model_bytes(config, torch_dtype)
    cache_tokens = args.view + max(args.workers) * (args.warmup + args.steps + 64) + 256
    rows, skipped, t0 = [], [], time.perf_counter()
    for tp in args.tp:
        why = why_not(spec, tp, device, torch_dtype, cache_tokens, weights, args.cpu_memory_gib)
        if why is not None:
            skipped += [{"tp": tp, "workers": n, "reason": why} for n in args.workers]
            print(f"tp={tp}: skipped ({why})", flush=True)
            continue
        got, miss = run_tp(path, device, dtype, tp, cache_tokens, args)
        rows, skipped = rows + got, skipped + miss
    add_ratios(rows)
    met = targets(rows)
    meta = {"benchmark": "tensor_parallel", "date": args.date, "device": device.type,
            "device_name": common.device_name(device), "devices_visible": visible(device), **common.versions(),
            "ray": __import__("ray").__version__, "model": path, "dtype": dtype, "tp": args.tp,
            "workers": args.workers, "view": args.view, "steps": args.steps, "warmup": args.warmup,
            "graphs_at_tp1": args.graphs, "seconds": round(time.perf_counter() - t0, 1),
            "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                   "NVSHMEM_DISABLE_NVLS")}, "notes": NOTES}
    rows = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    stem = args.out / f"{args.date}-{common.file_tag(device)}-tensor-parallel{'-' + args.suffix if args.suffix else ''}"
    common.write_results(stem, meta, rows, {"skipped": skipped, "targets": met})
    plot(meta, rows, Path(f"{stem}.png"))
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    common.print_table(f"{path} ({dtype}) on {meta['device_name']}, view {args.view}",
                       ["tp", "workers", "step ms", "tokens/s", "all-reduce ms", "all-reduce %", "vs tp=1"],
                       [[str(r["tp"]), str(r["workers"]), f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:.1f}",
                         f"{r['allreduce_ms']:.3f}", f"{100 * r['allreduce_fraction']:.1f}", fmt(r["vs_tp1"], ".3f")]
                        for r in rows])
    for s in sorted({(s["tp"], s["reason"]) for s in skipped}):
        print(f"skipped tp={s[0]}: {s[1]}")
    for t in met:
        print(f"target {t['target']}: {t['status']}" + (f" (worst {t['worst']})" if t["worst"] is not None else ""))
    print(f"wrote {stem}.csv, .json, .png")
    return {"meta": meta, "rows": rows, "skipped": skipped, "targets": met, "stem": stem}


if __name__ == "__main__":
    sys.exit(0 if main().get("passed", True) else 1)
