"""A decode pass's products and small kernels chained back to back, without the attention, at the floor.

The decode pass is two halves: the products (with the norms and the SiLU between them) and
the attention. `decode_profile` times the whole pass, and in a chained pass the profiler's
per-kernel times overlap; here the first half runs alone, as the engine launches it (every
layer's add-and-norm, QKV, output, add-and-norm, gate/up, SiLU, down, then the LM head; skinny
products, programmatic dependents of one another), in one CUDA graph over the shape's layers
with their own weights (cold, as in a pass). What the pass takes beyond it is the attention's
share. Side by side in one run:

* `chained`: the chain as the engine launches it, the products in `skinny.pick`'s launch shapes
  (the engine's where it timed none faster at start), twice (the first and the last row: the
  run's noise);
* `the engine's shapes`: the chain with the launch shapes an engine takes where it timed one
  faster than cuBLAS alone at its start (`skinny.choose`), if any differs from pick's;
* `unchained`: the same kernels, each waiting for the one before to end;
* `activation in gate/up`: the SiLU in the gate/up product's epilogue (`Decoder.folds`'s
  "activation") rather than its own kernel;
* `products alone, chained`: the products only (each reading the one before's output), no norm or
  SiLU; `one product over every weight`: all the weights' bytes (one buffer) read by a single skinny
  product, no boundary at all. From these the report gives what a boundary between two products
  and a small kernel between them cost (µs each), the same bytes read either way;
* `chained, N B of the next weight's rows ahead`: each product asks the L2 cache for the first N
  bytes of each row of the next product's weight as its programs end (Decoder.next_bytes);
* `MLP in one launch`: gate/up, SiLU and down in one launch of hogwild_kernels.mlp's kernel, a
  barrier across the grid between the two products (one or two programs an SM); `MLP in two
  launches`: the same code, the barrier a kernel boundary;
* with `--sweep`: each product in every launch shape of `skinny.CONFIGS`, the others as the
  chained row has them, in the chain; and the SiLU in gate/up's epilogue in each of
  `GLU_CONFIGS` (two strips a step, so shapes of less shared memory too).

The floor is the weights' bytes over the device's bandwidth (bandwidth.py, raised to the
fastest chain timed here); `µs a layer over` is the time beyond it, per layer.

    python benchmarks/product_chain.py                      # qwen3-8b, one row, all its layers
    python benchmarks/product_chain.py --rows 16 --sweep
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
from attention_kernels import bench  # noqa: E402
from bandwidth import measure as measure_bandwidth  # noqa: E402
from bandwidth import over_floor  # noqa: E402

from hogwild_ray.cli.common import at_least  # noqa: E402
from hogwild_ray.model.shapes import SHAPES, build_config  # noqa: E402
from hogwild_ray.model.spec import spec_from_config  # noqa: E402

PRODUCTS = ("qkv", "o", "gate_up", "down", "lm_head")
# the same weights' bytes with fewer kernel boundaries: what the chain's boundaries cost (report)
PRODUCTS_ALONE, ONE_PRODUCT = "products alone, chained", "one product over every weight"
# bytes of each row of the next product's weight asked for as a product ends (Decoder.next_bytes)
NEXT_BYTES = (512, 2048, 8192)
# the MLP block on hogwild_kernels.mlp's kernel: one launch with a barrier across the grid (one or two
# programs an SM), or the same code in two launches
MLP_LAUNCHES = {"MLP in one launch": "one", "MLP in one launch, 2 programs an SM": "one2",
                "MLP in two launches": "two"}
# gate/up with the SiLU in its epilogue reads two strips a K step: shapes of half the shared memory
# of CONFIGS' too (a program's stages, and whether the next kernel's programs fit beside it)
GLU_CONFIGS = [(32, 256, 4, 2), (32, 256, 4, 3), (16, 256, 4, 4), (16, 512, 4, 2), (32, 128, 4, 4)]


class Chain:
    """One layer's weights per layer of the shape (random, cold) and the pass's products over them."""

    def __init__(self, shape: str, layers: int | None, rows: int, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        s = spec_from_config(build_config(shape))
        self.layers = layers or s.num_layers
        self.eps = s.rms_eps
        qkv = (s.num_heads + 2 * s.num_kv_heads) * s.head_dim
        self.attn_width = s.num_heads * s.head_dim
        shapes = {"qkv": (qkv, s.hidden_size), "o": (s.hidden_size, self.attn_width),
                  "gate_up": (2 * s.intermediate_size, s.hidden_size), "down": (s.hidden_size, s.intermediate_size)}
        self.shapes = {**shapes, "lm_head": (s.vocab_size, s.hidden_size)}
        # every weight a view of one buffer, so that all of them can also be read as one product
        # ([every weight's elements / hidden, hidden]: each weight's size is a multiple of it)
        sizes = [n * k for _ in range(self.layers) for n, k in shapes.values()] + [s.vocab_size * s.hidden_size]
        self.flat = torch.empty(sum(sizes), device=device, dtype=dtype)
        views = iter(self.flat.split(sizes))

        def make(n: int, k: int) -> torch.Tensor:
            w = next(views).view(n, k)
            w.copy_(torch.randn(n, k, device=device) / k**0.5)
            return w

        self.weights = [{name: make(*nk) for name, nk in shapes.items()} for _ in range(self.layers)]
        self.lm_head = make(*self.shapes["lm_head"])
        self.every_weight = self.flat.view(-1, s.hidden_size)
        self.norm = torch.ones(s.hidden_size, device=device, dtype=dtype)
        self.nbytes = self.flat.numel() * self.flat.element_size()
        self.x = torch.randn(rows, s.hidden_size, device=device).to(dtype)
        self.inter = s.intermediate_size

    def run(self, chained: bool = True, glu: bool = False, configs: dict | None = None,
            products_alone: bool = False, one_product: bool = False, next_bytes: int = 0,
            mlp: str = "") -> torch.Tensor:
        """The pass without its attention: the output projection reads the QKV product's first columns.
        products_alone: the products only, each reading the one before's output (no norm, no SiLU);
        one_product: every weight's bytes read by one product (no kernel boundary at all);
        next_bytes: of each row of the next product's weight, what each product asks the L2 cache
        for as it ends (Decoder.next_bytes); mlp: the MLP block (gate/up, SiLU, down) on
        hogwild_kernels.mlp's kernel, in one launch of a program an SM ("one") or two ("one2"),
        or in two launches ("two")."""
        from hogwild_kernels.fused import add_rms_norm, silu_mul
        from hogwild_kernels.skinny import skinny_linear

        configs = configs or {}

        order = [w for lw in self.weights for w in lw.values()] + [self.lm_head]
        following = {id(w): nxt for w, nxt in zip(order, order[1:])}

        def product(x: torch.Tensor, name: str, w: torch.Tensor, **kw) -> torch.Tensor:
            return skinny_linear(x, w, config=configs.get(name), chained=chained, next_weight=following.get(id(w)),
                                 next_bytes=next_bytes, **kw)

        if one_product:
            return skinny_linear(self.x, self.every_weight, chained=chained)
        if products_alone:
            x = self.x
            for lw in self.weights:
                o = product(product(x, "qkv", lw["qkv"])[:, : self.attn_width], "o", lw["o"])
                x = product(product(o, "gate_up", lw["gate_up"])[:, : self.inter], "down", lw["down"])
            return product(x, "lm_head", self.lm_head)
        x, delta = self.x, None
        for lw in self.weights:
            x, h = add_rms_norm(x, delta, self.norm, self.eps, chained=chained)
            attention = product(h, "qkv", lw["qkv"])[:, : self.attn_width]
            x, h = add_rms_norm(x, product(attention, "o", lw["o"]), self.norm, self.eps, chained=chained)
            if mlp:
                delta = self._mlp(h, lw, chained, mlp)
            else:
                act = (product(h, "gate_up", lw["gate_up"], glu=True) if glu
                       else silu_mul(product(h, "gate_up", lw["gate_up"]), chained=chained))
                delta = product(act, "down", lw["down"])
        x, h = add_rms_norm(x, delta, self.norm, self.eps, chained=chained)
        return product(h, "lm_head", self.lm_head)

    @staticmethod
    def _mlp(h: torch.Tensor, lw: dict, chained: bool, how: str) -> torch.Tensor:
        """The MLP block on hogwild_kernels.mlp's kernel (Chain.run's mlp)."""
        from hogwild_kernels.mlp import glu_down, resident_programs

        if how == "two":
            return glu_down(h, lw["gate_up"], lw["down"], chained=chained, one_launch=False)
        per_sm = 2 if how == "one2" else 1
        return glu_down(h, lw["gate_up"], lw["down"], chained=chained, programs=per_sm * resident_programs(h.device))

    def engine_configs(self, chosen: dict) -> dict[str, tuple[int, int, int, int]]:
        """The products whose launch shape in a chained engine is not pick's, and that shape: an
        engine takes the one skinny.choose timed fastest alone at its start ({(n, k, rows
        bucket): shape, or None where cuBLAS won}), pick's where cuBLAS won."""
        from hogwild_kernels.skinny import bucket, pick

        rows = bucket(self.x.shape[0])
        timed = {name: chosen.get((*nk, rows)) for name, nk in self.shapes.items()}
        return {name: c for name, c in timed.items() if c is not None and tuple(c) != pick(*self.shapes[name])}

    def timed_alone(self) -> dict:
        """skinny.choose over this chain's weights, as an engine runs it at start (a GPU's timings)."""
        from hogwild_kernels.skinny import by_shape, choose

        return choose(by_shape((lw.values() for lw in self.weights), (self.lm_head,)))


def settings(sweep: bool, engine: dict | None = None) -> list[tuple[str, dict]]:
    """(name, Chain.run's arguments) in the order they run; the plain chain first and last.
    engine: Chain.engine_configs, the shapes an engine would take (a row of its own where any
    differs from pick's)."""
    from hogwild_kernels.skinny import CONFIGS

    out = [("chained", {}), ("unchained", {"chained": False}), ("activation in gate/up", {"glu": True}),
           (PRODUCTS_ALONE, {"products_alone": True}), (ONE_PRODUCT, {"one_product": True})]
    out += [(f"chained, {b} B of the next weight's rows ahead", {"next_bytes": b}) for b in NEXT_BYTES]
    out += [(f"{PRODUCTS_ALONE}, {b} B ahead", {"products_alone": True, "next_bytes": b}) for b in NEXT_BYTES[1:2]]
    out += [(name, {"mlp": how}) for name, how in MLP_LAUNCHES.items()]
    if engine:
        out.append((f"chained, the engine's shapes {engine}", {"configs": engine}))
    if sweep:
        out += [(f"{name} {c}", {"configs": {name: c}}) for name in PRODUCTS for c in CONFIGS]
        out += [(f"activation in gate/up {c}", {"glu": True, "configs": {"gate_up": c}}) for c in GLU_CONFIGS]
    return out + [("chained", {})]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=at_least(1), default=None, help="layers to chain (default: the shape's)")
    p.add_argument("--rows", type=int, default=1, help="rows of the pass (workers fed), 1 to 16")
    p.add_argument("--sweep", action="store_true", help="each product in every launch shape of skinny.CONFIGS")
    p.add_argument("--replays", type=at_least(1), default=40)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="")
    args = p.parse_args(argv)
    if not 1 <= args.rows <= 16:
        p.error(f"--rows {args.rows}: the skinny products take 1 to 16 rows")
    if not torch.cuda.is_available():
        p.error("this benchmark times CUDA kernels and torch sees no GPU")
    dev = torch.device("cuda")
    floor = measure_bandwidth(dev)
    chain = Chain(args.shape, args.layers, args.rows, dev)
    engine = chain.engine_configs(chain.timed_alone())
    rows = []
    for name, kw in settings(args.sweep, engine):
        us = bench([lambda kw=kw: chain.run(**kw)], calls=1, iters=args.replays) * 1e6  # one pass a graph
        floor.note("the chain", chain.nbytes, us / 1e6)
        rows.append({"setting": name, "us": us})
    report(rows, chain, floor, args)
    return 0


def report(rows: list[dict], chain: Chain, floor, args) -> None:
    """Floor, table, result files and plot."""
    name = common.device_name(torch.device("cuda"))
    floor_us = chain.nbytes / floor.value * 1e6
    chained = statistics.median(r["us"] for r in rows if r["setting"] == "chained")
    for r in rows:
        r.update({"floor_us": floor_us, "x_floor": r["us"] / floor_us, "fraction_of_floor": floor_us / r["us"],
                  "us_a_layer_over": (r["us"] - floor_us) / chain.layers, "x_chained": r["us"] / chained})
    common.print_table(
        f"{args.shape} products, norms and SiLU chained, {args.rows} row(s), {chain.layers} layers, "
        f"{chain.nbytes / 1e9:.2f} GB of weights; {name}, bandwidth {floor.gbs:.0f} GB/s",
        ["setting", "µs", "floor µs", "x floor", "µs a layer over", "x chained"],
        [[r["setting"], f"{r['us']:.1f}", f"{floor_us:.1f}", f"{r['x_floor']:.3f}", f"{r['us_a_layer_over']:.2f}",
          f"{r['x_chained']:.3f}"] for r in rows])
    if over := over_floor(rows, "fraction_of_floor"):
        print(f"warning: {len(over)} rows above 100% of the floor: the measurement is wrong")
    costs = boundary_costs(rows, chain.layers)
    if costs:
        print(f"a boundary between two products costs {costs['product_boundary_us']:.2f} µs (products alone "
              f"against one product over the same bytes), a small kernel between them {costs['small_kernel_us']:.2f} "
              f"µs (the chain against the products alone)")
    stem = args.out / f"{args.date}-{name.replace(' ', '_')}-product_chain{'-' + args.suffix if args.suffix else ''}"
    meta = {"benchmark": "product_chain", "device": name, "date": args.date, "shape": args.shape,
            "rows_fed": args.rows, "layers": chain.layers, "weight_bytes": chain.nbytes, **costs,
            "products": {k: list(v) for k, v in chain.shapes.items()}, **floor.meta(), "versions": common.versions()}
    common.write_results(stem, meta, rows)
    plot(rows, Path(f"{stem}.png"), f"Products chained without attention ({args.shape}, {args.rows} row(s), {name})")
    print(f"wrote {stem}.csv, .json and .png")


def boundary_costs(rows: list[dict], layers: int) -> dict[str, float]:
    """µs a kernel boundary adds over the same bytes read in fewer kernels: between two products
    ((products alone - one product) / the 4 x layers boundaries of 4 x layers + 1 products), and
    each small kernel (norms, SiLU) in the chain ((chained - products alone) / their 3 x layers + 1);
    {} where a run lacks those rows."""
    us = {r["setting"]: r["us"] for r in rows}
    chained = [r["us"] for r in rows if r["setting"] == "chained"]
    if PRODUCTS_ALONE not in us or ONE_PRODUCT not in us or not chained:
        return {}
    return {"product_boundary_us": (us[PRODUCTS_ALONE] - us[ONE_PRODUCT]) / (4 * layers),
            "small_kernel_us": (statistics.median(chained) - us[PRODUCTS_ALONE]) / (3 * layers + 1)}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
    labels = [f"{i}. {r['setting']}" for i, r in enumerate(rows, 1)]
    ax.barh(labels, [r["x_floor"] for r in rows], color=["C0" if r["setting"] == "chained" else "C1" for r in rows])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlim(left=min(0.9, min(r["x_floor"] for r in rows) - 0.05))
    ax.invert_yaxis()
    ax.set_xlabel("time over the floor (weights' bytes / bandwidth)")
    common.save_figure(fig, path, title)


if __name__ == "__main__":
    sys.exit(main())
