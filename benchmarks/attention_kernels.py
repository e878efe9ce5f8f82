"""Attention kernel benchmark: the Triton RoPE-shifted kernel against per-worker SDPA.

One decode step of one attention layer (Qwen3-8B shape by default: 32 query heads,
8 KV heads, head dim 128, bf16) for N workers in the combined layout: a shared `common`
block, the two headers and every worker's current block. The Triton kernel reads each
block once for all workers; SDPA (the usual engine, one sequence per worker) reads every
worker's whole view. Achieved bandwidth counts the unique K/V bytes (each block once)
over the kernel time, against the device-to-device copy bandwidth measured in this run.

    python benchmarks/attention_kernels.py --workers 1,2,4,8,16 --views 4096,32768
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hogwild_kernels import QueryGroup, Segment, TritonAttention

CUR = 256  # tokens in each worker's current block
HEADERS = (12, 14)


def copy_bandwidth(device) -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() / bench(lambda: y.copy_(x))


def bench(fn, iters: int = 50) -> float:
    """Median seconds of one fn(), captured in a CUDA graph (so host launch cost is not
    counted, as in the engine's graph-captured decode step) and timed with CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    fn = graph.replay
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def build_case(workers, view, hq, hkv, d, dtype, device, page=16):
    """Pool, packed queries and every worker's segments for one decode step."""
    common = view - sum(HEADERS) - workers * CUR
    lengths = [common, *HEADERS] + [CUR] * workers
    pages_needed = [-(-n // page) for n in lengths]
    total = sum(pages_needed)
    perm = list(range(total))
    random.Random(0).shuffle(perm)
    blocks, at = [], 0
    for n, p in zip(lengths, pages_needed):
        blocks.append((torch.tensor(perm[at:at + p], device=device), n))
        at += p
    k_pool = torch.randn(total, page, hkv, d, dtype=dtype, device=device)
    v_pool = torch.randn(total, page, hkv, d, dtype=dtype, device=device)
    groups = []
    for w in range(workers):
        order = [0, 1] + [3 + o for o in range(workers) if o != w] + [2, 3 + w]
        segs, off = [], 0
        for b in order:
            pages, n = blocks[b]
            segs.append(Segment(pages, n, off, block=b))
            off += n
        groups.append(QueryGroup(w, 1, off - 1, segs))
    q = torch.randn(workers, hq, d, dtype=dtype, device=device)
    unique_bytes = sum(lengths) * hkv * d * 2 * k_pool.element_size()
    return q, k_pool, v_pool, groups, unique_bytes


def run(args) -> list[dict]:
    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    tri = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, **args.kernel)
    copy_bw = copy_bandwidth(dev)
    rows = []
    for view in args.views:
        for w in args.workers:
            q, k_pool, v_pool, groups, unique = build_case(w, view, hq, hkv, d, dtype, dev)
            slots = torch.zeros(w, dtype=torch.int64, device=dev)
            t0 = time.perf_counter()
            meta = tri.prepare(groups, slots, slots)
            plan_ms = (time.perf_counter() - t0) * 1e3
            t_tri = bench(lambda: tri.attend(q, k_pool, v_pool, meta))
            # per-worker SDPA over each worker's contiguous view (keys already in place)
            kc = torch.randn(w, hkv, view, d, dtype=dtype, device=dev)
            vc = torch.randn_like(kc)
            qs = q.view(w, hq, 1, d)
            t_sdpa = bench(lambda: F.scaled_dot_product_attention(qs, kc, vc, enable_gqa=True))
            del kc, vc
            rows.append({
                "workers": w, "view": view, "triton_us": t_tri * 1e6, "sdpa_us": t_sdpa * 1e6,
                "speedup_vs_sdpa": t_sdpa / t_tri, "unique_kv_MB": unique / 1e6,
                "triton_GBps": unique / t_tri / 1e9, "copy_GBps": copy_bw / 1e9,
                "fraction_of_copy_bw": unique / t_tri / copy_bw, "plan_ms": plan_ms,
            })
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    return rows


def save(rows, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name()
    stem = out / f"{args.date}-{device.replace(' ', '_')}-attention"
    meta = {"device": device, "torch": torch.__version__, "dtype": args.dtype,
            "shape": {"q_heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim}}
    import triton

    meta["triton"] = triton.__version__
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(f"{stem}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for view in args.views:
        r = [x for x in rows if x["view"] == view]
        ws = [x["workers"] for x in r]
        axes[0].plot(ws, [x["triton_us"] for x in r], "o-", label=f"Triton, {view} view")
        axes[0].plot(ws, [x["sdpa_us"] for x in r], "x--", label=f"SDPA per worker, {view} view")
        axes[1].plot(ws, [x["fraction_of_copy_bw"] for x in r], "o-", label=f"{view} view")
    axes[0].set(xlabel="workers", ylabel="µs per layer", xscale="log", yscale="log", title="attention time")
    axes[1].set(xlabel="workers", ylabel="unique K/V bytes / time / copy bandwidth", xscale="log",
                title="fraction of copy bandwidth")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{device}, {args.dtype}, {args.heads}/{args.kv_heads} heads, d={args.head_dim}")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=120)
    print(f"wrote {stem}.json/.csv/.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--views", default="4096,32768", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--kernel", default="{}", type=json.loads,
                   help='TritonAttention knobs as JSON, e.g. \'{"block_n": 128, "num_warps": 8}\'')
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    rows = run(args)
    for r in rows:
        print(f"{r['workers']:>3} workers {r['view']:>6} view: triton {r['triton_us']:8.1f} µs  "
              f"sdpa {r['sdpa_us']:8.1f} µs  x{r['speedup_vs_sdpa']:.2f}  {r['triton_GBps']:7.0f} GB/s "
              f"({100 * r['fraction_of_copy_bw']:.0f}% of copy)")
    if not args.no_save:
        save(rows, args, args.out)


if __name__ == "__main__":
    main()
