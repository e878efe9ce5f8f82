"""A decode pass's matrix products: cuBLAS (F.linear) against the skinny kernel, at the floor.

For every weight of a model shape (QKV, output, gate/up, down, the LM head) and a few row
counts (workers fed in a pass), side by side in one run: F.linear and the skinny kernel with
its picked launch shape and every candidate in `skinny.CONFIGS`; and for gate/up with the
MLP's activation (`gate_up+act`): F.linear then silu_mul, the skinny product then silu_mul,
and the skinny product with the activation in its epilogue (glu), each launch shape. Times are per product, from
CUDA graphs cycling over several copies of each weight (more than the L2 cache: cold, as
in a decode step), CUDA events, median. The floor is the weight's bytes (and the rows')
over the device's bandwidth (bandwidth.py, raised to the fastest product timed here);
`x_floor` is time over floor. Each kernel's
output is checked against an fp32 product first.

    python benchmarks/skinny_gemm.py --shape qwen3-8b --rows 1,4,8,16,32,64,128

Passes of more than 16 rows (several sessions) run wide row tiles (skinny.WIDE_CONFIGS).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from attention_kernels import L2_BYTES, bench  # noqa: E402
from bandwidth import Bandwidth  # noqa: E402
from bandwidth import measure as measure_bandwidth  # noqa: E402
from bandwidth import over_floor  # noqa: E402

from hogwild_ray.model.shapes import SHAPES, build_config  # noqa: E402
from hogwild_ray.model.spec import spec_from_config  # noqa: E402


def weights_of(shape: str) -> dict[str, tuple[int, int]]:
    s = spec_from_config(build_config(shape))
    qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
    return {"qkv": (qkv, s.hidden_size), "o": (s.hidden_size, s.num_heads * s.head_dim),
            "gate_up": (2 * s.intermediate_size, s.hidden_size), "down": (s.hidden_size, s.intermediate_size),
            "lm_head": (s.vocab_size, s.hidden_size)}


def measure(name: str, n: int, k: int, rows: int, dev) -> list[dict]:
    from hogwild_kernels.skinny import CONFIGS, MAX_ROWS, WIDE_CONFIGS, pick, skinny_linear

    nbytes = n * k * 2
    copies = max(2, min(8, -(-2 * L2_BYTES // nbytes)))
    ws = [torch.randn(n, k, dtype=torch.bfloat16, device=dev) / k**0.5 for _ in range(copies)]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device=dev)
    ref = x.float() @ ws[0].float().T
    moved = nbytes + rows * (k + n) * 2
    variants = [("cublas", None, lambda w, c: F.linear(x, w))]
    configs = CONFIGS if rows <= MAX_ROWS else WIDE_CONFIGS
    picked = pick(n, k, rows=rows)
    variants += [("skinny", picked, lambda w, c: skinny_linear(x, w))]
    variants += [("skinny", c, lambda w, c=c: skinny_linear(x, w, config=c)) for c in configs if c != picked]
    out = timed(name, n, k, rows, variants, ws, ref, moved, picked)
    if name == "gate_up":  # the MLP's activation too: after the product, or in its epilogue (glu)
        from hogwild_kernels.fused import silu_mul

        gate, up = ref.chunk(2, dim=-1)
        act = torch.nn.functional.silu(gate) * up
        variants = [("cublas", None, lambda w, c: silu_mul(F.linear(x, w))),
                    ("skinny", "product, then silu_mul", lambda w, c: silu_mul(skinny_linear(x, w)))]
        variants += [("skinny", c, lambda w, c=c: skinny_linear(x, w, config=c, glu=True))
                     for c in dict.fromkeys([pick(n, k, glu=True, rows=rows), *configs])]
        out += timed(f"{name}+act", n, k, rows, variants, ws, act, nbytes + rows * (k + n // 2) * 2,
                     pick(n, k, glu=True, rows=rows))
    del ws
    torch.cuda.empty_cache()
    return out


def timed(name: str, n: int, k: int, rows: int, variants: list, ws: list[torch.Tensor], ref: torch.Tensor,
          moved: int, picked: tuple[int, int, int, int]) -> list[dict]:
    """Each variant checked against the fp32 reference, then timed over the weights' copies; a
    launch shape the GPU cannot hold (shared memory) is left out."""
    from triton.runtime.errors import OutOfResources

    out = []
    for kind, config, fn in variants:
        try:
            got = fn(ws[0], config).float()
        except OutOfResources:
            print(f"{name} rows={rows}: {config} does not fit this GPU, left out")
            continue
        err = ((got - ref).norm() / ref.norm()).item()
        t = bench([lambda w=w, fn=fn, c=config: fn(w, c) for w in ws], calls=2 * len(ws))
        out.append({"weight": name, "n": n, "k": k, "rows": rows, "kernel": kind,
                    "config": "picked " + str(config) if config == picked and kind == "skinny" else str(config),
                    "us": t * 1e6, "bytes": moved, "GBps": moved / t / 1e9, "rel_err": err})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--rows", type=common.ints, default=[1, 4, 8, 16])
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("this benchmark times CUDA kernels and torch sees no GPU")
    dev = torch.device("cuda")
    floor = measure_bandwidth(dev)
    rows = []
    for name, (n, k) in weights_of(args.shape).items():
        for m in args.rows:
            rows += measure(name, n, k, m, dev)
    report(rows, floor, args.shape, common.device_name(dev), args.date, args.out, common.versions())
    return 0


def report(rows: list[dict], floor: Bandwidth, shape: str, name: str, date: str, out: Path, versions: dict) -> None:
    """Floors (the fastest product raises the bandwidth), the table, the result files and the plot."""
    for r in rows:  # the products only stream their weights: the fastest raises the floor (bandwidth.py)
        floor.note(f"{r['kernel']} products", r["bytes"], r["us"] / 1e6)
    for r in rows:
        floor_s = r["bytes"] / floor.value
        r.update({"floor_us": floor_s * 1e6, "x_floor": r["us"] / 1e6 / floor_s,
                  "fraction_of_floor": floor_s * 1e6 / r["us"]})
    best = {}
    for r in rows:
        key = (r["weight"], r["rows"])
        if r["kernel"] == "skinny" and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    table = []
    for r in rows:
        if r["kernel"] == "cublas":
            key = (r["weight"], r["rows"])
            picked = next(x for x in rows if x["kernel"] == "skinny" and x["config"].startswith("picked")
                          and (x["weight"], x["rows"]) == key)
            table.append([r["weight"], f"{r['n']}x{r['k']}", str(r["rows"]), f"{r['us']:.1f}", f"{picked['us']:.1f}",
                          f"{best[key]['us']:.1f} {best[key]['config']}", f"{r['floor_us']:.1f}",
                          f"{r['x_floor']:.2f}", f"{picked['x_floor']:.2f}", f"{r['us'] / picked['us']:.2f}x",
                          f"{picked['rel_err']:.1e}"])
    common.print_table(f"Decode matrix products, {shape} bf16, {name}, bandwidth {floor.gbs:.0f} GB/s",
                       ["weight", "n x k", "rows", "cuBLAS µs", "skinny µs", "best skinny µs", "floor µs",
                        "cuBLAS x floor", "skinny x floor", "speedup", "skinny rel err"], table)
    if over := over_floor(rows, "fraction_of_floor"):
        print(f"warning: {len(over)} rows above 100% of the floor: the measurement is wrong")
    stem = out / f"{date}-{name.replace(' ', '_')}-skinny_gemm"
    meta = {"device": name, "date": date, "shape": shape, **floor.meta(), "versions": versions}
    common.write_results(stem, meta, rows)
    plot(rows, Path(f"{stem}.png"), f"Decode matrix products ({shape}, bf16, {name})")
    print(f"wrote {stem}.csv, .json and .png")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = list(dict.fromkeys(r["weight"] for r in rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, w in enumerate(weights):
        for kind, style in (("cublas", "x--"), ("skinny", "o-")):
            pts = sorted((r["rows"], r["x_floor"]) for r in rows if r["weight"] == w and r["kernel"] == kind
                         and (kind == "cublas" or r["config"].startswith("picked")))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{i}", label=f"{w} {kind}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xlabel="rows (workers fed)", ylabel="time / floor", xscale="log")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    common.save_figure(fig, path, title)


if __name__ == "__main__":
    sys.exit(main())
