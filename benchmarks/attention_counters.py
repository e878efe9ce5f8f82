"""One attention layer, ours and SDPA's, in a profiler's window: for reading hardware counters.

Builds attention_kernels.py's combined layout (one shape, worker count and view), warms both
up, then runs two layers of each between cudaProfilerStart and Stop, so that a profiler told to
start there sees only those kernels:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        --csv --page details python benchmarks/attention_counters.py --workers 1 --view 65536

(`--clock-control none` leaves the clocks as a decode pass sees them.) Timings belong to
attention_kernels.py, which replays CUDA graphs; this only places the kernels for a profiler.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from hogwild_kernels import TritonAttention

from attention_kernels import SHAPES, build_case

LAYERS = 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--view", type=int, default=65536, help="keys each worker sees")
    p.add_argument("--kernel", default="{}", type=json.loads, help="TritonAttention knobs as JSON")
    args = p.parse_args()
    if args.workers < 1 or args.view < 64 * args.workers:
        raise SystemExit(f"--workers must be at least 1 and --view at least 64 keys a worker; got "
                         f"{args.workers} and {args.view}")
    if not torch.cuda.is_available():
        raise SystemExit("this needs a CUDA GPU")
    hq, hkv, d = SHAPES[args.shape]
    dev, dtype = torch.device("cuda"), torch.bfloat16
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    q, pools, groups, unique = build_case(args.workers, args.view, hq, hkv, d, dtype, dev, layers=LAYERS)
    slots = torch.zeros(args.workers, dtype=torch.int64, device=dev)
    ours = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, q_per_kv=hq // hkv, **args.kernel)
    meta = ours.prepare(groups, slots, slots)
    caches = [(torch.randn(args.workers, hkv, args.view, d, dtype=dtype, device=dev),
               torch.randn(args.workers, hkv, args.view, d, dtype=dtype, device=dev)) for _ in range(LAYERS)]
    qs = q.view(args.workers, hq, 1, d)

    def layer(i: int) -> None:
        ours.attend(q, *pools[i], meta)
        F.scaled_dot_product_attention(qs, *caches[i], enable_gqa=True)

    for _ in range(3):  # compiled and warm before the window
        for i in range(LAYERS):
            layer(i)
    torch.cuda.synchronize()
    print(f"{torch.cuda.get_device_name()}: {args.shape}, {args.workers} workers, {args.view}-key view; unique "
          f"K/V {unique / 1e6:.1f} MB a layer; ours then SDPA, {LAYERS} layers in the window", flush=True)
    torch.cuda.profiler.start()
    for i in range(LAYERS):
        layer(i)
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
