"""Decode step time against workers and view length, next to the memory-bandwidth roofline.

For a model path or a named random shape (bf16 on CUDA), for every (workers N, view L)
cell: step latency, tokens/s in total and per worker, and the bandwidth a step achieves,
(weight bytes + K/V bytes read per step) / step time, against the device's bandwidth
measured in the same run (bandwidth.py: plain copies and reads, no CUDA graph); the
roofline step time is those bytes over that bandwidth. A view of L tokens is a prompt of
about L tokens shared by all the workers.
Side by side, one section each (`--sections`):

* graphs: our engine, decode passes replayed from CUDA graphs (CUDA only);
* eager: our engine, every pass launched from Python;
* independent: N sequences with no shared cache, each worker fed its own L-token text
  (what a plain serving engine runs for N separate requests);
* naive: the engine's torch attention, which gathers every worker's whole view and
  rotates every key every step (skipped above --naive-max-view: it takes too long);
* transformers: `generate` with its static cache (SDPA; compiled on CUDA where it
  works) at batch 1 and batch N on an L-token context, random weights of the same shape;
  a decode step = (time with K new tokens - time with 1) / (K - 1).

Cells that do not fit in memory (weights + K/V + activations, estimated first) are
skipped with the reason. Writes DATE-DEVICE-scaling[-SUFFIX].{csv,json,png} under --out.

    python benchmarks/scaling.py                                 # qwen3-8b on CUDA, tiny on the CPU
    python benchmarks/scaling.py --shape qwen3-8b --workers 1,8 --views 4096 --sections transformers
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from bandwidth import measure as measure_bandwidth  # noqa: E402
import scaling_plot  # noqa: E402
import scaling_runs  # noqa: E402

SECTIONS = ("graphs", "eager", "independent", "naive", "transformers")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model path (default: the random shape of --shape)")
    p.add_argument("--shape", default=None, help="random shape (default: qwen3-8b on cuda, tiny on cpu)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--workers", type=common.ints, default=[1, 2, 4, 8, 16])
    p.add_argument("--views", type=common.ints, default=[1024, 4096, 16384, 32768])
    p.add_argument("--steps", type=int, default=32, help="timed steps per cell (the median is kept)")
    p.add_argument("--warmup", type=int, default=8, help="steps before timing (graphs are captured here)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    p.add_argument("--naive-max-view", type=int, default=4096, help="naive section: longest view run")
    p.add_argument("--hf-new-tokens", type=int, default=33, help="K of the transformers timing")
    p.add_argument("--hf-repeats", type=int, default=3, help="transformers timings per cell (the best is kept)")
    p.add_argument("--no-compile", action="store_true", help="transformers without torch.compile")
    p.add_argument("--cpu-memory-gib", type=float, default=8.0, help="memory budget on the CPU")
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="", help="added to the file names (for runs split by section or cell)")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    bad = set(args.sections) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    device = torch.device(args.device) if args.device else common.default_device()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    path = args.model or f"random:{args.shape or ('qwen3-8b' if device.type == 'cuda' else 'tiny')}"
    model = scaling_runs.Model(path, device, dtype)
    floor = measure_bandwidth(device)
    bandwidth = floor.value
    print(f"{path} ({dtype}) on {common.device_name(device)}: bandwidth {floor.gbs:.0f} GB/s, "
          f"weights read per step {model.weight_bytes / 1e9:.2f} GB", flush=True)
    rows: list[dict] = []
    skipped: list[dict] = []
    t0 = time.perf_counter()
    for section in args.sections:
        s = time.perf_counter()
        runner = scaling_runs.transformers_section if section == "transformers" else scaling_runs.engine_section
        got, miss = runner(section, model, args)
        rows += got
        skipped += miss
        common.free_memory(device)
        print(f"[{section}] {len(got)} cells, {len(miss)} skipped, {time.perf_counter() - s:.0f} s", flush=True)
    for r in rows:
        scaling_runs.add_rates(r, model, bandwidth)
    scaling_runs.add_ratios(rows)
    targets = scaling_runs.targets(rows)
    meta = {"benchmark": "scaling", "date": args.date, "device": device.type,
            "device_name": common.device_name(device), **common.versions(), "model": path,
            "dtype": str(dtype).removeprefix("torch."), **floor.meta(),
            "weight_bytes_read_per_step": model.weight_bytes, "kv_bytes_per_token": model.kv_per_token,
            "workers": args.workers, "views": args.views, "steps": args.steps, "warmup": args.warmup,
            "sections": args.sections, "seconds": round(time.perf_counter() - t0, 1),
            "notes": scaling_runs.NOTES}
    stem = args.out / f"{args.date}-{common.file_tag(device)}-scaling{'-' + args.suffix if args.suffix else ''}"
    common.write_results(stem, meta, rows, {"skipped": skipped, "targets": targets})
    scaling_plot.plot(meta, rows, Path(f"{stem}.png"))
    scaling_plot.table(meta, rows, skipped, targets)
    print(f"wrote {stem}.csv, .json, .png")
    return {"meta": meta, "rows": rows, "skipped": skipped, "targets": targets, "stem": stem}


if __name__ == "__main__":
    main()
