"""Engine step time against the number of workers, every pass eager (no CUDA graphs).

Loads a random-weight model of a named shape (`random:NAME`, no download), runs Hogwild! sessions with
1..N workers and reports the wall time of a step, split into host work (planning the
layout, building the batch, the attention plan) and the rest, so the cost of adding
workers and the room left for CUDA graphs are both visible.

    python benchmarks/engine_steps.py --shape qwen3-0.6b --workers 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import hogwild_ray as hw
from hogwild_ray.model.shapes import SHAPES

def time_steps(engine, workers: int, steps: int, warmup: int) -> dict:
    session = engine.start("Compute 12 * 7 and explain.", workers, max_tokens=steps + warmup + 64,
                           sampling=hw.SamplingParams(temperature=1.0, seed=0), finisher=False,
                           stop_on_answer=False)
    host = [0.0]
    attention = engine.decoder.attention

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            host[0] += time.perf_counter() - t0
            return out
        return wrapper

    for _ in range(warmup):
        session.step()
    engine._host_batch, engine._device_batch = timed(engine._host_batch), timed(engine._device_batch)
    attention.prepare = timed(attention.prepare)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    while n < steps and not session.done:
        session.step()
        n += 1
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    del engine._host_batch, engine._device_batch, attention.prepare  # back to the class methods
    view = max(session.layout.view_length(w) for w in range(workers))
    session.close()
    return {"workers": workers, "step_ms": wall * 1e3, "host_prep_ms": host[0] / n * 1e3,
            "tokens_per_s": workers / wall, "view_tokens": view}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-0.6b", choices=sorted(SHAPES))
    p.add_argument("--workers", default="1,2,4,8,16", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    engine = hw.HogwildEngine.from_pretrained(f"random:{args.shape}", "cuda", cache_tokens=65536, cuda_graphs=False)
    rows = [time_steps(engine, w, args.steps, args.warmup) for w in args.workers]
    base = rows[0]["step_ms"]
    print(f"{torch.cuda.get_device_name()}, {args.shape}, bf16, eager")
    for r in rows:
        r["step_vs_1_worker"] = r["step_ms"] / base
        print(f"{r['workers']:>3} workers  step {r['step_ms']:7.2f} ms  (host prep {r['host_prep_ms']:6.2f} ms)  "
              f"x{r['step_vs_1_worker']:.2f} of 1 worker  {r['tokens_per_s']:8.1f} tok/s  view {r['view_tokens']}")
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": args.shape,
                                        "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
