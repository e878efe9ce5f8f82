"""Correctness of tensor parallelism through the Ray engine: greedy tokens of tp=N against tp=1.

One greedy session (protocol off, `--check-workers` workers, `--steps` steps) per tp on a
Qwen3-8B-shaped random model (random:qwen3-8b in bf16 on CUDA; random:tiny-qwen3 in fp32 on
the CPU), each worker's logits of every step read back (`last_logits`). The tp=1 reference
runs in this process (`--reference local`, the default: the engine every other test pins,
loaded in a second and freed before the shards start) or through Ray (`--reference ray`).
For each tp=N:

* fp32 (CPU, gloo): every token equal to tp=1's and max |logit difference| / max |logit|
  <= 2e-4 (the oracle's fp32 tolerance), at every step;
* bf16 (CUDA, NCCL): the relative logit difference <= 5e-2 up to the first step where a
  worker's token differs, and that split (if any) is a near tie: tp=1's logits for the two
  tokens differ by no more than the same tolerance. The sums run in another order at each
  tp, so bf16 rounding may break a tie the other way; after a split the texts differ.

The oracle against Hugging Face at tp=N on GPUs: `pytest tests/test_tensor_parallel_bench.py
-k gpu_oracle` runs tests/oracle.py's check through the Ray engine on CUDA in bf16 at tp=2, 4
and 8 (skipped without that many GPUs); tests/test_ray_backend.py runs it at tp=2 and 3 on the CPU.

    python benchmarks/tensor_parallel.py --check --tp 1,2,4,8
    python benchmarks/tensor_parallel_check.py --tp 1,2 --device cpu

Writes DATE-DEVICE-tensor-parallel-check[-SUFFIX].{csv,json} under --out; exits 1 if a tp fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import hogwild_ray as hw  # noqa: E402
import tensor_parallel as tpb  # noqa: E402
from hogwild_ray.model import locate, spec_from_config  # noqa: E402
from hogwild_ray.model.loader import load_config  # noqa: E402

TOL = {"float32": 2e-4, "bfloat16": 5e-2, "float16": 2e-2}
PROMPT = "Compute 12 * 7 and explain."


def trace(path: str, device: torch.device, dtype: str, tp: int, workers: int, steps: int, ray: bool = True) -> dict:
    """Each step's new tokens per worker and the workers' logits, on a fresh engine (closed here):
    tp shard actors, or (ray=False) this process."""
    backend = dict(backend="ray", tp=tp) if ray else {}
    engine = hw.HogwildEngine.from_pretrained(path, str(device), dtype, cache_tokens=256 + workers * (steps + 64),
                                              cuda_graphs=False, **backend)
    tokens, logits = [], []
    try:
        session = engine.start(PROMPT, workers, sampling=hw.SamplingParams(temperature=0.0), max_tokens=None,
                               protocol=False, stop_on_answer=False, finisher=False, redundancy_every=None)
        for _ in range(steps):
            new = session.step()
            tokens.append([new.get(w, []) for w in range(workers)])
            logits.append(session.last_logits.float().cpu().clone())
        session.close()
    finally:
        engine.close()
    return {"tokens": tokens, "logits": torch.stack(logits)}


def compare(ref: dict, got: dict, tol: float, exact: bool) -> dict:
    """First split, worst relative logit difference up to it, and whether tp=N passes."""
    split = next((i for i, (a, b) in enumerate(zip(ref["tokens"], got["tokens"])) if a != b), None)
    last = len(ref["tokens"]) if split is None else split + 1
    a, b = ref["logits"][:last].nan_to_num(), got["logits"][:last].nan_to_num()
    scale = a.abs().amax(dim=-1).clamp_min(1e-12)  # [steps, workers]
    worst = ((a - b).abs().amax(dim=-1) / scale).max().item()
    margin = None
    if split is not None:  # tp=1's logit of its token minus that of tp=N's, over its largest |logit|
        w = next(w for w, (x, y) in enumerate(zip(ref["tokens"][split], got["tokens"][split])) if x != y)
        mine, theirs = ref["tokens"][split][w], got["tokens"][split][w]
        if mine and theirs:
            row = ref["logits"][split, w]
            margin = ((row[mine[0]] - row[theirs[0]]) / row.abs().max()).item()
    near_tie = margin is not None and margin <= tol
    passed = worst <= tol and (split is None or (not exact and near_tie))
    return {"first_split_step": split, "max_rel_logit_diff": worst, "split_margin": margin,
            "steps_equal": len(ref["tokens"]) if split is None else split, "passed": passed}


def run(args: argparse.Namespace) -> dict:
    device, dtype, path = tpb.setup(args, check=True)
    config = load_config(locate(path))
    spec, tol, exact = spec_from_config(config), TOL[dtype], dtype == "float32"
    weights = common.model_bytes(config, getattr(torch, dtype))
    cache = 256 + args.check_workers * (args.steps + 64)
    t0 = time.perf_counter()
    ref = trace(path, device, dtype, 1, args.check_workers, args.steps, ray=args.reference == "ray")
    common.free_memory(device)  # the in-process reference's weights, before the shards need the GPUs
    rows, skipped = [], []
    for tp in sorted(set(args.tp) - {1}):
        why = tpb.why_not(spec, tp, device, getattr(torch, dtype), cache, weights, args.cpu_memory_gib)
        if why is not None:
            skipped.append({"tp": tp, "reason": why})
            print(f"tp={tp}: skipped ({why})", flush=True)
            continue
        got = trace(path, device, dtype, tp, args.check_workers, args.steps)
        common.free_memory(device)
        rows.append({"tp": tp, "workers": args.check_workers, "steps": args.steps, "tolerance": tol,
                     **compare(ref, got, tol, exact)})
        print(f"  tp={tp}: {'pass' if rows[-1]['passed'] else 'FAIL'}", flush=True)
    passed = bool(rows) and all(r["passed"] for r in rows)
    rule = ("fp32: tokens equal at every step and relative logit difference <= tol" if exact else
            "relative logit difference <= tol up to the first split; a split must be a near tie "
            "(tp=1's logit margin between the two tokens <= tol)")
    meta = {"benchmark": "tensor_parallel_check", "date": args.date, "device": device.type,
            "device_name": common.device_name(device), "devices_visible": tpb.visible(device), **common.versions(),
            "model": path, "dtype": dtype, "reference": f"tp=1, {args.reference}", "tolerance": tol, "rule": rule,
            "workers": args.check_workers, "steps": args.steps, "passed": passed, "seconds": round(time.perf_counter() - t0, 1)}
    stem = args.out / (f"{args.date}-{common.file_tag(device)}-tensor-parallel-check"
                       f"{'-' + args.suffix if args.suffix else ''}")
    common.write_results(stem, meta, rows, {"skipped": skipped})
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    common.print_table(f"tp=N against tp=1: {path} ({dtype}) on {meta['device_name']}, tolerance {tol:g}",
                       ["tp", "steps equal", "first split", "max rel logit diff", "split margin", "result"],
                       [[str(r["tp"]), f"{r['steps_equal']}/{r['steps']}", fmt(r["first_split_step"], "d"),
                         f"{r['max_rel_logit_diff']:.2e}", fmt(r["split_margin"], ".2e"),
                         "pass" if r["passed"] else "FAIL"] for r in rows])
    print(f"rule ({dtype}): {rule}; tolerance {tol:g}")
    for s in skipped:
        print(f"skipped tp={s['tp']}: {s['reason']}")
    print(f"{'PASSED' if passed else 'FAILED'}; wrote {stem}.csv, .json")
    return {"meta": meta, "rows": rows, "skipped": skipped, "passed": passed, "stem": stem}


if __name__ == "__main__":
    sys.exit(0 if tpb.main(["--check", *sys.argv[1:]])["passed"] else 1)
