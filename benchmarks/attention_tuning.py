"""Sweep the Triton attention's launch knobs on this GPU and report the best per case.

For each (workers, view) case of the combined layout (as in attention_kernels.py), every
combination of tile size (block_n), warps, pipeline stages and programs per SM is timed
under a CUDA graph; the table shows the best, the default, and the kernel split of the
default (partial attention vs the log-sum-exp merge) from the profiler. Use it to pick
defaults for a new GPU.

    python benchmarks/attention_tuning.py --cases 1x16384,16x32768 --out sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from attention_kernels import L2_BYTES, bench, build_case
from bandwidth import measure as measure_bandwidth
from hogwild_kernels import TritonAttention


def kernel_split(fn) -> dict[str, float]:
    """Microseconds per kernel name over one call (the profiler's CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA":
            out[e.key[:40]] = e.device_time_total / 10  # µs per call
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="1x4096,8x4096,1x16384,8x16384,16x16384,16x32768,1x65536,16x65536")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-n", default="32,64,128")
    p.add_argument("--warps", default="4,8")
    p.add_argument("--stages", default="2,3,4")
    p.add_argument("--pps", default="1,2,4")
    p.add_argument("--block-m", default="0", help="row tile sizes to try (0: sized to the readers)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    dev = torch.device("cuda")
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    floor_bw = measure_bandwidth(dev).value
    print(f"{torch.cuda.get_device_name()}: bandwidth {floor_bw / 1e9:.0f} GB/s (bandwidth.py)", flush=True)
    results = []
    for case in args.cases.split(","):
        w, view = (int(x) for x in case.split("x"))
        layers = max(1, min(8, -(-L2_BYTES // (view * hkv * d * 4))))
        q, pools, groups, unique = build_case(w, view, hq, hkv, d, torch.bfloat16, dev, layers=layers)

        def timed_attend(impl, meta, iters=30):
            return bench([lambda k=k, v=v: impl.attend(q, k, v, meta) for k, v in pools], iters=iters)

        slots = torch.zeros(w, dtype=torch.int64, device=dev)
        timed = []
        for bn, nw, ns, pps, bm in itertools.product(ints(args.block_n), ints(args.warps), ints(args.stages),
                                                     ints(args.pps), ints(args.block_m)):
            tri = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, q_per_kv=hq // hkv, block_n=bn, num_warps=nw,
                                  num_stages=ns, programs_per_sm=pps, short_programs_per_sm=pps,
                                  block_m=bm or None)
            meta = tri.prepare(groups, slots, slots)
            try:
                t = timed_attend(tri, meta, iters=20)
            except Exception as e:  # out of shared memory or registers for this combination
                print(f"  skip bn={bn} warps={nw} stages={ns}: {type(e).__name__}", flush=True)
                continue
            timed.append({"block_n": bn, "num_warps": nw, "num_stages": ns, "programs_per_sm": pps,
                          "block_m": bm, "us": t * 1e6})
        timed.sort(key=lambda r: r["us"])
        default = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, q_per_kv=hq // hkv)
        meta = default.prepare(groups, slots, slots)
        t_def = timed_attend(default, meta)
        fp32 = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, q_per_kv=hq // hkv, partial_dtype=torch.float32)
        meta32 = fp32.prepare(groups, slots, slots)
        t_fp32 = timed_attend(fp32, meta32)
        split = kernel_split(lambda: default.attend(q, *pools[0], meta))
        row = {"workers": w, "view": view, "default_us": t_def * 1e6, "default_fp32_partials_us": t_fp32 * 1e6,
               "default_frac_floor": unique / t_def / floor_bw, "best": timed[:5],
               "best_frac_floor": unique / (timed[0]["us"] / 1e6) / floor_bw, "kernels_us": split}
        results.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "floor_GBps": floor_bw / 1e9,
                                        "results": results}, indent=1))


if __name__ == "__main__":
    main()
