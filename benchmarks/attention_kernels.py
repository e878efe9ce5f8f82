"""Attention kernel benchmark: the Triton RoPE-shifted kernel against what others would run.

One decode step of one attention layer for N workers in the combined layout (a shared
`common` block, the two headers and every worker's current block), for the Qwen3-8B
(32 query heads, 8 KV heads, head dim 128) and QwQ-32B (40/8/128) shapes in bf16.
Side by side in the same run:

* triton: our kernel, each block's K/V read once for every worker that sees it;
* sdpa: PyTorch SDPA (its fastest backend) on one contiguous, already-rotated cache per
  worker of the same length: what N independent sequences cost;
* naive: re-rotating every block's keys for every worker each step, then SDPA (what a
  first Hogwild! engine does);
* torch: the engine's own torch path (the reference it is tested against, vectorized);
* `--variants`: the same kernel with other knobs or pages laid out another way, in the same
  run (before/after comparisons): each gets a `<name>_us` column and `<name>_x`, its time
  over the kernel's. With `--repeats N` the kernel, each variant and SDPA are timed in turn,
  N rounds, and each takes its median.

K/V pages are token-major in memory ([page, token, kv_head, dim]), as the engine's pool keeps
them, of `--page` tokens (the engine's default, 16, unless told); a variant with "page_layout":
"head" reads head-major pages ([page, kv_head, token, dim]).
A variant with "chained": true launches the kernels as a decoder that chains its layers does
(each a programmatic dependent of the one before; a partial program asks for its first keys
before its wait): here each layer's partials follow the previous layer's merge, where in a
decode pass they follow the K/V append. A variant with "page": N reads the same views over pages
of N tokens (other pools of random K/V of the same sizes).

The floor is the unique K/V bytes (each block once per KV head) over the device's bandwidth
measured in this run with plain copies and reads (bandwidth.py, no CUDA graph); `x_floor` is
the kernel's time over it and `fraction_of_floor` its inverse (above 1 would be a bug). Every
time is per layer, from CUDA graphs that run the call for several layers back to back,
each layer with its own K/V (more than the L2 cache in all), as in a real decode step.

    python benchmarks/attention_kernels.py --workers 1,2,4,8,16 --views 1024,4096,16384,65536
    python benchmarks/attention_kernels.py --variants \
        '{"no_pdl": {"pdl": false}, "head_major": {"page_layout": "head"}}'
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hogwild_kernels import QueryGroup, Segment, TorchAttention, TritonAttention, pdl
from hogwild_kernels.rope import apply_rope

from bandwidth import Bandwidth
from bandwidth import measure as measure_bandwidth
from bandwidth import over_floor
from common import ints

CUR = 256  # tokens in each worker's current block (fewer in short views)
HEADERS = (12, 14)
SHAPES = {"qwen3-8b": (32, 8, 128), "qwq-32b": (40, 8, 128)}
L2_BYTES = 256 << 20  # K/V per graph well above the L2 cache, so every layer reads from HBM


def bench(fns: list, calls: int = 8, iters: int = 30) -> float:
    """Median seconds per call: `calls` calls cycling over fns (one per layer), captured in
    one CUDA graph (no host launch cost, as in the engine's captured decode step) and timed
    with CUDA events."""
    seq = [fns[i % len(fns)] for i in range(max(calls, len(fns)))]

    def run_all():
        for fn in seq:
            fn()

    for _ in range(2):
        run_all()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(seq))
    del graph
    return sorted(times)[len(times) // 2]


PAGE_LAYOUTS = ("token", "head")


def laid_out(pool: torch.Tensor, layout: str) -> torch.Tensor:
    """The pool [pages, page_size, kv_heads, dim] with its pages head-major or token-major in memory."""
    if layout == "head":
        return pool.transpose(1, 2).contiguous().transpose(1, 2)
    return pool.contiguous()


def build_case(workers, view, hq, hkv, d, dtype, device, page=16, layers=1):
    """Pools (one per layer, pages token-major as the engine's), packed queries and every
    worker's segments for one decode step."""
    cur = min(CUR, max(1, (view - sum(HEADERS)) // (2 * workers)))  # short views: common keeps half
    common = view - sum(HEADERS) - workers * cur
    lengths = [common, *HEADERS] + [cur] * workers
    pages_needed = [-(-n // page) for n in lengths]
    total = sum(pages_needed)
    perm = list(range(total))
    random.Random(0).shuffle(perm)
    blocks, at = [], 0
    for n, p in zip(lengths, pages_needed):
        blocks.append((torch.tensor(perm[at:at + p], device=device), n))
        at += p
    pools = [(torch.randn(total, page, hkv, d, dtype=dtype, device=device),
              torch.randn(total, page, hkv, d, dtype=dtype, device=device)) for _ in range(layers)]
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
    unique_bytes = sum(lengths) * hkv * d * 2 * pools[0][0].element_size()
    return q, pools, groups, unique_bytes


class NaiveRerotate(TorchAttention):
    """Every worker gathers its view and re-rotates every key to its view position, then SDPA."""

    def attend(self, q, k_pool, v_pool, meta):
        page = k_pool.shape[1]
        if meta.extra["views"] is None:  # each worker's own view: its key slots and rotations
            meta.extra["views"] = [self._views([g], page, q.device)["decode"] for g in meta.groups]
        out = torch.empty_like(q)
        for g, (_, slot, kcos, ksin, qcos, qsin, _) in zip(meta.groups, meta.extra["views"]):
            k = apply_rope(k_pool[slot // page, slot % page], kcos, ksin).transpose(0, 1)[None]
            v = v_pool[slot // page, slot % page].transpose(0, 1)[None]
            qr = apply_rope(q[g.start:g.start + g.count], qcos, qsin).transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(qr, k, v, scale=self.sm_scale, enable_gqa=True)
            out[g.start:g.start + g.count] = o[0].transpose(0, 1)
        return out


# a variant's knobs besides TritonAttention's: how its pages are laid out, whether its kernels
# are chained, and how many tokens its pages hold
VARIANT_KNOBS = {"page_layout", "chained", "page"}


def measure(w, view, shape, args, dev, dtype) -> dict:
    hq, hkv, d = SHAPES[shape]
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev).float() / d))
    per_layer = (view * hkv * d * 2 * 2)
    layers = max(1, min(8, -(-L2_BYTES // per_layer)))
    q, pools, groups, unique = build_case(w, view, hq, hkv, d, dtype, dev, page=args.page, layers=layers)
    slots = torch.zeros(w, dtype=torch.int64, device=dev)
    tri = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, q_per_kv=hq // hkv, **args.kernel)
    t0 = time.perf_counter()
    meta = tri.prepare(groups, slots, slots)
    plan_ms = (time.perf_counter() - t0) * 1e3
    timed = {"triton": [lambda k=k, v=v: tri.attend(q, k, v, meta) for k, v in pools]}
    for name, spec in args.variants.items():
        knobs = {**args.kernel, **spec}
        layout = knobs.pop("page_layout", "token")
        chained = knobs.pop("chained", False)
        page = knobs.pop("page", args.page)  # the same views over pages of another size
        vq, vpools, vgroups, _ = (q, pools, groups, None) if page == args.page else \
            build_case(w, view, hq, hkv, d, dtype, dev, page=page, layers=layers)
        impl = TritonAttention(inv_freq, 1.0, d**-0.5, kv_heads=hkv, q_per_kv=hq // hkv, **knobs)
        impl.chained = chained
        m = impl.prepare(vgroups, slots, slots)
        other = [(laid_out(k, layout), laid_out(v, layout)) for k, v in vpools]
        timed[name] = [lambda q=vq, k=k, v=v, impl=impl, m=m: impl.attend(q, k, v, m) for k, v in other]
    # SDPA over one contiguous, already-rotated cache per worker (independent sequences)
    sd_layers = max(1, min(8, -(-L2_BYTES // (per_layer * w))))
    caches = [(torch.randn(w, hkv, view, d, dtype=dtype, device=dev),
               torch.randn(w, hkv, view, d, dtype=dtype, device=dev)) for _ in range(sd_layers)]
    qs = q.view(w, hq, 1, d)
    timed["sdpa"] = [lambda k=k, v=v: F.scaled_dot_product_attention(qs, k, v, enable_gqa=True) for k, v in caches]
    us = {name: t * 1e6 for name, t in interleaved(timed, args.repeats).items()}
    del timed, caches
    row = {"shape": shape, "workers": w, "view": view, "triton_us": us["triton"], "sdpa_us": us["sdpa"]}
    for name in args.variants:
        row[f"{name}_us"] = us[name]
        row[f"{name}_x"] = us[name] / us["triton"]
    if not args.no_baselines:
        for name, cls in (("naive", NaiveRerotate), ("torch", TorchAttention)):
            impl = cls(inv_freq, 1.0, d**-0.5)
            m = impl.prepare(groups, slots, slots)
            row[f"{name}_us"] = bench([lambda k=k, v=v: impl.attend(q, k, v, m) for k, v in pools],
                                      iters=10) * 1e6
            torch.cuda.empty_cache()
    row.update({"speedup_vs_sdpa": row["sdpa_us"] / row["triton_us"], "unique_kv_MB": unique / 1e6,
                "sdpa_kv_MB": w * per_layer / 1e6, "triton_GBps": unique / (us["triton"] / 1e6) / 1e9,
                "plan_ms": plan_ms})
    return row


def interleaved(timed: dict[str, list], repeats: int) -> dict[str, float]:
    """Median seconds per call of each entry's calls (bench), the entries timed in turn, round
    after round: a drift of the device's clocks or temperature reaches all of them alike
    rather than whichever came last."""
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(repeats):
        for name, fns in timed.items():
            times[name].append(bench(fns))
    return {name: statistics.median(t) for name, t in times.items()}


def add_floors(rows: list[dict], floor: Bandwidth) -> None:
    """Each row's floor from the run's bandwidth, which SDPA's own reads can raise (bandwidth.py)."""
    for r in rows:
        floor.note("sdpa decode", r["sdpa_kv_MB"] * 1e6, r["sdpa_us"] / 1e6)
    bw = floor.value
    for r in rows:
        floor_s = r["unique_kv_MB"] * 1e6 / bw
        r.update({"floor_GBps": bw / 1e9, "floor_us": floor_s * 1e6, "x_floor": r["triton_us"] / 1e6 / floor_s,
                  "fraction_of_floor": floor_s / (r["triton_us"] / 1e6),
                  "sdpa_fraction_of_floor": r["sdpa_kv_MB"] * 1e6 / bw / (r["sdpa_us"] / 1e6)})


def run(args) -> tuple[list[dict], Bandwidth]:
    dev = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    floor = measure_bandwidth(dev)
    rows = []
    for shape in args.shapes:
        for view in args.views:
            for w in args.workers:
                rows.append(measure(w, view, shape, args, dev, dtype))
                print({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
                torch.cuda.empty_cache()
    add_floors(rows, floor)
    return rows, floor


def targets(rows: list[dict]) -> list[str]:
    """The kernel targets, met or missed, per shape: 1 worker no slower than SDPA; at >= 16k keys
    within 1.3x of the unique-bytes floor up to 8 workers and 1.6x at 16; at 1k-4k no slower than
    SDPA at any worker count; and no figure above 100% of the floor (that would be a bug)."""
    lines = []
    mark = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    for shape in sorted({r["shape"] for r in rows}):
        rs = [r for r in rows if r["shape"] == shape]
        vs_sdpa = lambda r: r["triton_us"] / r["sdpa_us"]  # noqa: E731
        for what, cells, limit in (("1 worker no slower than SDPA", [r for r in rs if r["workers"] == 1], 1.0),
                                   ("1k-4k views no slower than SDPA", [r for r in rs if r["view"] <= 4096], 1.0)):
            if cells:
                worst = max(cells, key=vs_sdpa)
                lines.append(f"{shape}: {what}: {mark(vs_sdpa(worst) <= limit)}, worst {vs_sdpa(worst):.2f}x SDPA's "
                             f"time ({worst['workers']} workers, {worst['view']} view)")
        for what, cells, limit in (
                (">=16k keys, 1-8 workers, within 1.3x of the floor", [r for r in rs if r["view"] >= 16384
                                                                       and r["workers"] <= 8], 1.3),
                (">=16k keys, 16 workers, within 1.6x of the floor", [r for r in rs if r["view"] >= 16384
                                                                      and r["workers"] >= 16], 1.6)):
            if cells:
                worst = max(cells, key=lambda r: r["x_floor"])
                lines.append(f"{shape}: {what}: {mark(worst['x_floor'] <= limit)}, worst {worst['x_floor']:.2f}x "
                             f"({worst['workers']} workers, {worst['view']} view)")
        over = over_floor(rs, "fraction_of_floor") + over_floor(rs, "sdpa_fraction_of_floor")
        lines.append(f"{shape}: no figure above 100% of the floor: {mark(not over)}"
                     + (f" ({len(over)} rows over: a measurement bug)" if over else ""))
    return lines


def run_facts() -> dict:
    """The device and versions of this run (for the results' meta)."""
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


def save(rows, floor: Bandwidth, args, out: Path, facts: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    device = facts["device"]
    stem = out / f"{args.date}-{device.replace(' ', '_')}-attention"
    meta = {**facts, "dtype": args.dtype, "page_size": args.page, "shapes": {s: SHAPES[s] for s in args.shapes},
            **floor.meta(), "kernel_knobs": args.kernel, "variants": args.variants, "targets": targets(rows)}
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    with open(f"{stem}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    fig, axes = plt.subplots(len(args.shapes), 2, figsize=(12, 4.2 * len(args.shapes)), squeeze=False)
    for (ax_t, ax_f), shape in zip(axes, args.shapes):
        for i, view in enumerate(args.views):
            r = [x for x in rows if x["view"] == view and x["shape"] == shape]
            ws = [x["workers"] for x in r]
            c = f"C{i}"
            ax_t.plot(ws, [x["triton_us"] for x in r], "o-", color=c, label=f"Triton, {view} view")
            ax_t.plot(ws, [x["sdpa_us"] for x in r], "x--", color=c, label=f"SDPA per worker, {view}")
            if "naive_us" in r[0]:
                ax_t.plot(ws, [x["naive_us"] for x in r], ":", color=c, label=f"naive re-rotation, {view}")
            for j, name in enumerate(args.variants):
                ax_t.plot(ws, [x[f"{name}_us"] for x in r], "s" + ("-.", ":", "--")[j % 3], color=c, alpha=0.6,
                          label=f"{name}, {view}")
            ax_f.plot(ws, [x["x_floor"] for x in r], "o-", color=c, label=f"{view} view")
        ax_f.axhline(1.3, color="gray", lw=0.8, ls="--")
        ax_t.set(xlabel="workers", ylabel="µs per layer", xscale="log", yscale="log",
                 title=f"{shape}: attention time per layer")
        ax_f.set(xlabel="workers", ylabel="kernel time / floor time", xscale="log",
                 title=f"{shape}: x the unique-bytes floor (dashed: 1.3x)")
        for ax in (ax_t, ax_f):
            ax.legend(fontsize=6, ncol=2)
            ax.grid(alpha=0.3)
    fig.suptitle(f"{device}, {args.dtype}, combined layout, one decode step")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=120)
    print(f"wrote {stem}.json/.csv/.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2,4,8,16", type=ints)
    p.add_argument("--views", default="1024,4096,16384,32768,65536", type=ints)
    p.add_argument("--shapes", default="qwen3-8b,qwq-32b", type=lambda s: s.split(","))
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--kernel", default="{}", type=json.loads,
                   help='TritonAttention knobs as JSON, e.g. \'{"block_n": 128, "num_warps": 8}\'')
    p.add_argument("--variants", default="{}", type=json.loads,
                   help='other kernels to time side by side, as JSON {name: knobs}; knobs are TritonAttention\'s '
                        'plus "page_layout" ("token" or "head"), "chained" and "page" (tokens a page), e.g. '
                        '\'{"no_pdl": {"pdl": false}, "head_major": {"page_layout": "head"}}\'')
    p.add_argument("--page", type=int, default=16,
                   help="tokens a K/V page (the engine's page_size; 16 by default, as the engine's)")
    p.add_argument("--no-baselines", action="store_true", help="skip the naive and torch paths (slow)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds in which the kernel, each variant and SDPA are timed in turn; the median of "
                        "each (3 or more when comparing variants: one noisy measurement no longer decides)")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args()
    knobs = set(inspect.signature(TritonAttention).parameters) - {"inv_freq", "rope_scale", "sm_scale", "kv_heads"}
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1; got {args.repeats}")
    if args.page < 1:
        raise SystemExit(f"--page must be at least 1 token; got {args.page}")
    for name, spec in args.variants.items():
        if name in ("triton", "sdpa", "naive", "torch"):
            raise SystemExit(f"variant {name!r}: that name is a column of its own; name the variant otherwise")
        unknown_knobs = set(spec) - knobs - VARIANT_KNOBS
        if unknown_knobs:
            raise SystemExit(f"variant {name!r}: unknown knob(s) {sorted(unknown_knobs)}; choose from "
                             f"{sorted(knobs | VARIANT_KNOBS)}")
        page = spec.get("page", 1)
        if type(page) is not int or page < 1:  # (JSON's true is a bool, not a count)
            raise SystemExit(f"variant {name!r}: page is a whole number of tokens, at least 1; got {page!r}")
        if spec.get("page_layout", "token") not in PAGE_LAYOUTS:
            raise SystemExit(f"variant {name!r}: page_layout must be one of {', '.join(PAGE_LAYOUTS)}")
        if not isinstance(spec.get("chained", False), bool):
            raise SystemExit(f"variant {name!r}: chained is true or false, got {spec['chained']!r}")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    if any(spec.get("chained") for spec in args.variants.values()) and not pdl.supported(torch.device("cuda")):
        raise SystemExit("a chained variant needs programmatic dependent launches (compute capability 9 or more)")
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        raise SystemExit(f"unknown shape(s) {sorted(unknown)}; choose from {sorted(SHAPES)}")
    rows, floor = run(args)
    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, {args.page}-token pages; µs per layer; "
          f"bandwidth {floor.gbs:.0f} GB/s (copy {max(floor.copies) / 1e9:.0f}, read {max(floor.reads) / 1e9:.0f}, SDPA here "
          f"{floor.seen.get('sdpa decode', 0) / 1e9:.0f})")
    names = list(args.variants)  # each variant's time over the kernel's
    print(f"{'shape':>9} {'workers':>7} {'view':>6} {'triton':>8} {'sdpa':>8} {'naive':>8} "
          f"{'torch':>8} {'x sdpa':>7} {'floor':>7} {'x floor':>7}" + "".join(f" {n[:10]:>10}" for n in names))
    for r in rows:
        print(f"{r['shape']:>9} {r['workers']:>7} {r['view']:>6} {r['triton_us']:8.1f} "
              f"{r['sdpa_us']:8.1f} {r.get('naive_us', float('nan')):8.1f} {r.get('torch_us', float('nan')):8.1f} "
              f"{r['speedup_vs_sdpa']:7.2f} {r['floor_us']:7.1f} {r['x_floor']:7.2f}"
              + "".join(f" {r[n + '_x']:9.2f}x" for n in names))
    print("\n".join(["", "targets:", *targets(rows)]))
    if not args.no_save:
        save(rows, floor, args, args.out, run_facts())


if __name__ == "__main__":
    main()
