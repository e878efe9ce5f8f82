"""Where a decode step's time goes: wall, GPU, the roofline, and the GPU's kernels one by one.

For a random-weight model shape (bf16, CUDA graphs) and each worker count, one session over
an L-token shared view: the step's wall time (median of --steps), its GPU time (each graph
the timed steps replayed, replayed back to back right after them, weighted by its share of
their passes: no host work), the roofline ((weight bytes + the K/V
the pass reads) / the device's bandwidth from bandwidth.py), and torch.profiler's kernels of
the last pass's graph replayed, grouped by name. With `--skinny on,off` the decode products run on what the
engine chose at start (per weight shape, the faster of cuBLAS and the skinny kernel) or on
cuBLAS alone, side by side in one run (one engine each); `narrow` keeps passes of more than 16
rows (several sessions) on cuBLAS; `unchained` is `on` with every
kernel waiting for the one before to end (no programmatic dependent launches; on Hopper the
engine chains a layer's kernels and runs every decode product on the skinny kernel).
`--folds default,none,all,norm,activation,qk_norm+norm` runs each setting with the small
kernels the decoder folds into their neighbours (hogwild_ray.model.decoder.FOLDS) as named,
side by side (one engine each).
`--prefetch default,all=2048,o=8192+qkv=1024` runs the chained products with their weight
rows prefetched that far into the L2 cache before their wait (hogwild_ray.model.decoder.PRODUCTS,
or `all`; `keys=N`: the keys of its unit each attention program asks for before its wait;
`ahead=N`: the tiles ahead a wide row tile's program asks for; `next=N`: the bytes of each row of the next
product's weight a chained product asks for as it ends, Decoder.next_bytes), side by side (one engine each).
`--attention default,short_programs_per_sm=2` runs the attention with its unit counts as named
(ATTENTION_KNOBS: programs an SM per KV head, where units are short, and in passes of several sessions),
side by side;
`--attention default,pages_ahead=0` with its tiles read so (TILE_KNOBS; pages_ahead=0/1 every
launch's pages looked up with its tile or a tile ahead, where the default decides by tile;
heads_first=0 its programs started a KV head's units before the next head's; split_rows=0 one row
tile where rows just pass a power of two; longest_first=0 the plan's units item by item, not longest first;
long_unit=N the keys from which units take the longer key tile).
`--pages default,64,64+tma` runs the engine with K/V pages of that many tokens (default: the
engine's 16), `+tma` reading the tiles every row sees whole a page at a time through tensor
descriptors (TritonAttention's tma_pages), side by side.
`--host-profile` adds the host's
hottest functions over more steps (cProfile, after the timed ones).

    python benchmarks/decode_profile.py --shape qwen3-8b --workers 1,16 --view 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import scaling_runs  # noqa: E402
from bandwidth import measure as measure_bandwidth  # noqa: E402

from hogwild_kernels.skinny import FEW_ROWS, MAX_ROWS, PREFETCH_BYTES  # noqa: E402

import hogwild_ray as hw  # noqa: E402
from hogwild_ray.cli.common import at_least  # noqa: E402
from hogwild_ray.executor import local  # noqa: E402
from hogwild_ray.model.decoder import FOLDS, PRODUCTS  # noqa: E402


def kernel_times(graph, replays: int) -> dict[str, float]:
    """µs per replay of each kernel name in the graph (CUPTI's records of the replays)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if getattr(e, "device_type", None) == DeviceType.CUDA:
            out[e.name[:70]] += (getattr(e, "device_time", None) or getattr(e, "cuda_time", 0)) / replays
    return dict(out)


def kernel_counts(graph) -> int:
    """Kernels in one replay: the graph's kernel nodes, from a profiled replay's launches."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    return sum(getattr(e, "device_type", None) == DeviceType.CUDA for e in prof.events())


def measure(engine, model: scaling_runs.Model, workers: int, args, bw: float) -> dict:
    """One step of --sessions sessions of `workers` workers each, in one batched pass."""
    from hogwild_ray.session import step_sessions

    sessions = []
    try:
        for i in range(args.sessions):
            sampling = [hw.SamplingParams(temperature=1.0, seed=1000 * i + w) for w in range(workers)]
            text = f"Problem {i}.\n{model.text(args.view)}" if args.sessions > 1 else model.text(args.view)
            sessions.append(engine.start(text, workers, layout="combined", sampling=sampling,
                                         protocol=args.protocol, chat_template=False, stop_on_answer=False,
                                         finisher=False, redundancy_every=None, max_tokens=None))

        def step() -> None:
            step_sessions(sessions)

        common.step_walls(step, args.warmup, 0)
        engine.graphs.uses.clear()  # the graphs the timed steps replay
        walls = common.step_walls(step, 0, args.steps)
        gpu = common.replayed_seconds(engine.graphs, args.replays)[0]
        split = host_split(engine, step, args.steps)
        kv_tokens = sum(scaling_runs.read_per_step(s)[0] for s in sessions)
        host = common.host_profile(step, args.steps) if args.host_profile else None
        graph = engine.graphs.last.graph
        kernels = kernel_times(graph, args.replays)
        count = kernel_counts(graph)
    finally:
        for s in sessions:
            s.close()
    wall = statistics.median(walls)
    roofline = (model.weight_bytes + kv_tokens * model.kv_per_token) / bw
    return {"sessions": args.sessions, "protocol": args.protocol, "workers": workers, "view": args.view,
            "step_ms": wall * 1e3, "gpu_ms": gpu * 1e3, "host_pct": 100 * max(wall - gpu, 0) / wall,
            "roofline_ms": roofline * 1e3, "x_roofline": wall / roofline, "gpu_x_roofline": gpu / roofline,
            "kernels_per_pass": count, **split,
            "kernel_us": kernels, "host_top": host}


def host_split(engine, step, steps: int) -> dict[str, float]:
    """Median ms per step of the host's work while the device waits for it: from one pass's
    sampled tokens reaching the host to the next pass's executor call (the sessions' protocol,
    detokenization, the next pass's plan of writes), from there to the forward (the layouts'
    plan, the sampling table), and the forward call itself (inputs and the graph's launch);
    and what the device waits for however the passes are launched: from a pass's tokens
    reaching the host to the next forward's call, unless a pass was already queued behind it
    (launched ahead: then none, so long as the host's work between launches is shorter than
    a pass, which the step's wall against its GPU time tells). Timed by wrapping the
    executor's and the runner's entry points on this engine, and the reading of each pass's
    tokens."""
    stamps: list[tuple[str, float]] = []
    executor, runner = engine.executor, engine.runner

    class Stamped(local.HostCopy):  # a pass's sampled ids: the stamp marks when they reach the host
        def tolist(self) -> list[int]:
            out = super().tolist()
            stamps.append(("synced" if executor.launched is None else "synced, one queued", time.perf_counter()))
            return out

    def timed(obj, name: str):
        inner = getattr(obj, name)

        def wrapper(*a, **k):
            stamps.append((f"{name}>", time.perf_counter()))
            try:
                return inner(*a, **k)
            finally:
                stamps.append((f"{name}<", time.perf_counter()))
        setattr(obj, name, wrapper)

    local.HostCopy = Stamped
    timed(executor, "run")
    timed(runner, "forward")
    try:
        for _ in range(steps):
            step()
    finally:
        del executor.run, runner.forward  # the class's methods again
        local.HostCopy = Stamped.__base__
    ends = [t for n, t in stamps if n == "run<"]
    starts = [t for n, t in stamps if n == "run>"]
    f_in = [t for n, t in stamps if n == "forward>"]
    f_out = [t for n, t in stamps if n == "forward<"]
    synced = [(t, n == "synced") for n, t in stamps if n.startswith("synced")]
    nexts = [min((f for f in f_in if f > t), default=None) if idle else t for t, idle in synced]
    waits = [None if f is None else f - t for (t, _), f in zip(synced, nexts)]
    med = lambda xs: 1e3 * statistics.median(xs) if xs else float("nan")  # noqa: E731
    return {"host_between_passes_ms": med([b - a for a, b in zip(ends, starts[1:])]),
            "host_plan_ms": med([b - a for a, b in zip(starts, f_in)]),
            "host_forward_call_ms": med([b - a for a, b in zip(f_in, f_out)]),
            "host_exposed_ms": med([w for w in waits if w is not None])}


def prefetch_setting(text: str) -> dict[str, int]:
    """'default' -> {}; 'o=8192+qkv=4096' -> bytes per weight row by product ('all': every one);
    'keys=N': the keys of its unit each attention program prefetches (a power of two); 'ahead=N': the
    tiles ahead of the one it reads that an attention program of a wide row tile prefetches; 'next=N':
    the bytes of each row of the next product's weight a product asks for as it ends."""
    if text == "default":
        return {}
    out: dict[str, int] = {}
    for part in text.split("+"):
        name, _, value = part.partition("=")
        if name not in (*PRODUCTS, "all", "keys", "ahead", "next") or not value.isdigit():
            raise ValueError(f"--prefetch: {part!r} is not PRODUCT=BYTES; products: {', '.join(PRODUCTS)}, all, "
                             "keys, ahead or next")
        if name == "keys" and (int(value) < 1 or int(value) & (int(value) - 1)):
            raise ValueError(f"--prefetch: keys={value}: the keys a program prefetches are a power of two")
        out.update({p: int(value) for p in (PRODUCTS if name == "all" else (name,))})
    return out


# the attention's unit counts `--attention` sets (programs an SM per KV head, where units are short, and in
# passes of several sessions)
ATTENTION_KNOBS = ("programs_per_sm", "short_programs_per_sm", "batched_programs_per_sm")
# and how its partial kernel reads tiles: pages looked up a tile ahead in every launch (1) or none (0;
# unset: TritonAttention.pipelined decides by tile), software pipeline stages, and the order its
# programs start in (heads_first=1: a unit's KV heads one after another; 0: a head's units), and
# whether rows just past a power of two take two row tiles (split_rows=1, the default) or one (0),
# and whether the plan orders its units longest first (longest_first=1, the default) or item by item;
# long_unit: the keys from which a unit is read in the longer key tile (TritonAttention.long_keys)
TILE_KNOBS = ("pages_ahead", "num_stages", "heads_first", "split_rows", "longest_first", "long_unit")
SWITCHES = ("pages_ahead", "heads_first", "split_rows", "longest_first")  # knobs that are 0 or 1


def attention_setting(text: str) -> dict[str, int]:
    """'default' -> {}; 'programs_per_sm=3+short_programs_per_sm=3' -> the attention's knobs
    (ATTENTION_KNOBS, TILE_KNOBS), each a whole number, at least 1 (SWITCHES: 0 or 1)."""
    if text == "default":
        return {}
    out: dict[str, int] = {}
    knobs = ATTENTION_KNOBS + TILE_KNOBS
    for part in text.split("+"):
        name, _, value = part.partition("=")
        ok = value.isdigit() and (int(value) <= 1 if name in SWITCHES else int(value) >= 1)
        if name not in knobs or not ok:
            raise ValueError(f"--attention: {part!r} is not KNOB=N (N >= 1; {' and '.join(SWITCHES)} 0 or 1); knobs: "
                             f"{', '.join(knobs)}")
        out[name] = int(value)
    return out


def apply_attention_setting(attention, knobs: dict[str, int]) -> None:
    """Set the knobs on the engine's TritonAttention, before any graph is captured (graphs allot
    units by the counts and keep the kernels they were captured with)."""
    for knob, value in knobs.items():
        if knob == "num_stages":
            attention.launch["num_stages"] = value
        else:
            setattr(attention, knob, bool(value) if knob in SWITCHES else value)


def page_setting(text: str) -> tuple[int | None, bool]:
    """'default' -> (None, False): the engine's pages; '64' -> (64, False); '64+tma' -> (64, True),
    the tiles read a page at a time by tensor descriptors. Those serve pages of 16, 32 or 64
    tokens (a power of two of at least 16 that divides the kernel's 64-key tiles); other pages
    would quietly be read by address, so they are refused."""
    size, _, tma = text.partition("+")
    if not (size == "default" or size.isdigit() and int(size) >= 1) or tma not in ("", "tma"):
        raise ValueError(f"--pages: {text!r} is not default, TOKENS or TOKENS+tma (TOKENS >= 1)")
    tokens = None if size == "default" else int(size)
    if tma and (tokens or 16) not in (16, 32, 64):
        raise ValueError(f"--pages: {text!r}: tensor-descriptor tiles need pages of 16, 32 or 64 tokens")
    return tokens, bool(tma)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b")
    p.add_argument("--workers", type=common.ints, default=[1, 16])
    p.add_argument("--view", type=int, default=4096)
    p.add_argument("--sessions", type=at_least(1), default=1,
                   help="sessions of --workers workers each, in one batched pass")
    p.add_argument("--protocol", action="store_true",
                   help="the workers' protocol on (steps end at paragraphs: relocations, changing views)")
    p.add_argument("--skinny", default="on,off",
                   help="on, off, unchained (on, without the PDL chain), narrow (on up to 16 rows: wider passes "
                        "on cuBLAS) or several (the decode products' kernel)")
    p.add_argument("--folds", default="default",
                   help="default (the engine's), none, all, or FOLDS joined by '+'; several, comma-separated")
    p.add_argument("--prefetch", default="default",
                   help="default, or PRODUCT=BYTES joined by '+' (products: qkv, o, gate_up, down, lm_head, all): "
                        "weight bytes a row a chained product prefetches (keys=N: keys a partial program "
                        "prefetches; ahead=N: tiles ahead a wide row tile's program prefetches; next=N: bytes a "
                        "row of the next product's weight a product asks for as it ends); several, comma-separated")
    p.add_argument("--attention", default="default",
                   help="default, or KNOB=N joined by '+' (knobs: programs_per_sm, short_programs_per_sm, "
                        "batched_programs_per_sm: the attention's programs an SM per KV head, where units are "
                        "short, and in passes of several sessions; pages_ahead=0/1, num_stages, heads_first=0/1, "
                        "split_rows=0/1, longest_first=0/1 and long_unit: how its partial kernel reads tiles "
                        "and the order its programs start in); several, comma-separated")
    p.add_argument("--pages", default="default",
                   help="default (the engine's 16-token pages), TOKENS, or TOKENS+tma (the tiles read a page at a "
                        "time by tensor descriptors); several, comma-separated")
    p.add_argument("--host-profile", action="store_true", help="also profile the host's work (cProfile)")
    p.add_argument("--launch-ahead", default="on",
                   help="on: each pass launched right behind the last one, fed its samples on the device "
                        "(the engine's default); off: when the sessions ask for it; on,off: a row of each")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="", help="added to the file names (e.g. -repeat)")
    args = p.parse_args(argv)
    settings = args.skinny.split(",")
    if unknown := set(settings) - {"on", "off", "unchained", "narrow"}:
        p.error(f"--skinny: unknown setting(s) {sorted(unknown)}; choose from on, off, unchained, narrow")
    folds = args.folds.split(",")
    if unknown := {f for fold in folds if fold not in ("default", "none", "all") for f in fold.split("+")} - set(FOLDS):
        p.error(f"--folds: unknown fold(s) {sorted(unknown)}; choose from default, none, all or {', '.join(FOLDS)}")
    try:
        prefetches = [(text, prefetch_setting(text)) for text in args.prefetch.split(",")]
        attentions = [(text, attention_setting(text)) for text in args.attention.split(",")]
        pages = [(text, page_setting(text)) for text in args.pages.split(",")]
    except ValueError as e:
        p.error(str(e))
    aheads = args.launch_ahead.split(",")
    if unknown := set(aheads) - {"on", "off"}:
        p.error(f"--launch-ahead: unknown setting(s) {sorted(unknown)}; choose from on, off")
    if not torch.cuda.is_available():
        p.error("this benchmark profiles CUDA graphs and torch sees no GPU")
    dev = torch.device("cuda")
    floor = measure_bandwidth(dev)
    model = scaling_runs.Model(f"random:{args.shape}", dev, torch.bfloat16)
    rows = []
    runs = [(s, f, pf, at, pg) for s in settings for f in folds for pf in prefetches for at in attentions
            for pg in pages]
    for setting, fold, (prefetch, prefetch_bytes), (attention, knobs), (page_text, (page_size, tma)) in runs:
        engine = hw.HogwildEngine.from_pretrained(model.path, dev, torch.bfloat16, cuda_graphs=True,
                                                  cache_tokens=args.sessions * (max(args.workers) * 512
                                                                                + args.view + 4096),
                                                  **({"page_size": page_size} if page_size else {}))
        engine.decoder.attention.tma_pages = tma
        engine.eos_ids = frozenset()
        if setting == "unchained":  # each kernel waits for the one before to end (no PDL chain)
            engine.decoder.set_chained(False)
        engine.decoder.prefetch = {k: v for k, v in prefetch_bytes.items() if k in PRODUCTS}
        if "keys" in prefetch_bytes:
            engine.decoder.attention.prefetch_keys = prefetch_bytes["keys"]
        if "ahead" in prefetch_bytes:
            engine.decoder.attention.prefetch_ahead = prefetch_bytes["ahead"]
        engine.decoder.next_bytes = prefetch_bytes.get("next", engine.decoder.next_bytes)
        apply_attention_setting(engine.decoder.attention, knobs)
        if setting == "narrow":  # passes of more than MAX_ROWS rows on cuBLAS, as before wide row tiles
            engine.decoder.products = {key: c for key, c in engine.decoder.products.items() if key[2] <= MAX_ROWS}
        elif setting not in ("on", "unchained"):
            engine.decoder.products = {}
        if fold != "default":
            engine.decoder.folds = {"none": set(), "all": set(FOLDS)}.get(fold) or set(fold.split("+"))
        fold = "+".join(sorted(engine.decoder.folds)) or "none"
        for w in args.workers:
            for ahead in aheads:
                engine.executor.prelaunch = ahead == "on"
                r = {"skinny": setting, "folds": fold, "prefetch": prefetch, "attention": attention,
                     "pages": page_text, "launch_ahead": ahead, **measure(engine, model, w, args, floor.value)}
                r["products"] = {f"{n}x{k} rows<={FEW_ROWS if bucket == 1 else bucket}": str(c)
                                 for (n, k, bucket), c in engine.decoder.products.items()} or "cuBLAS"
                r["chained"] = engine.decoder.chained
                rows.append(r)
                print(f"skinny {setting}, folds {fold}, prefetch {prefetch}, attention {attention}, "
                      f"pages {page_text}, launch ahead {ahead}, "
                      f"{args.sessions} x {w} workers: step "
                      f"{r['step_ms']:.2f} ms, GPU {r['gpu_ms']:.2f} ms, roofline {r['roofline_ms']:.2f} ms "
                      f"(x{r['x_roofline']:.2f}), host {r['host_pct']:.1f}%, {r['kernels_per_pass']} kernels; "
                      f"the device waits {r['host_exposed_ms']:.3f} ms a pass for the host; between passes "
                      f"{r['host_between_passes_ms']:.3f} ms, plan {r['host_plan_ms']:.3f} ms, forward call "
                      f"{r['host_forward_call_ms']:.3f} ms", flush=True)
        del engine
        common.free_memory(dev)
    name = common.device_name(dev)
    common.print_table(f"Decode step, random:{args.shape} bf16, {args.view}-token view, {name}, bandwidth "
                       f"{floor.gbs:.0f} GB/s",
                       ["skinny", "folds", "prefetch", "attention", "pages", "launch ahead", "workers", "step ms",
                        "GPU ms", "roofline ms", "x roofline", "GPU x roofline", "host %", "device waits ms",
                        "kernels"],
                       [[r["skinny"], r["folds"], r["prefetch"], r["attention"], r["pages"], r["launch_ahead"],
                         str(r["workers"]),
                         f"{r['step_ms']:.2f}",
                         f"{r['gpu_ms']:.2f}", f"{r['roofline_ms']:.2f}", f"{r['x_roofline']:.2f}",
                         f"{r['gpu_x_roofline']:.2f}", f"{r['host_pct']:.1f}", f"{r['host_exposed_ms']:.3f}",
                         str(r["kernels_per_pass"])] for r in rows])
    for r in rows:
        top = sorted(r["kernel_us"].items(), key=lambda kv: -kv[1])[:14]
        common.print_table(f"kernels of one pass: skinny {r['skinny']}, folds {r['folds']}, "
                           f"prefetch {r['prefetch']}, attention {r['attention']}, pages {r['pages']}, launch ahead "
                           f"{r['launch_ahead']}, "
                           f"{r['workers']} workers "
                           f"(sum {sum(r['kernel_us'].values()):.0f} µs)",
                           ["kernel", "µs per pass"], [[k, f"{v:.1f}"] for k, v in top])
        if r["host_top"]:
            print(f"host, skinny {r['skinny']}, {r['workers']} workers, {args.steps} steps:", *r["host_top"], sep="\n")
    stem = args.out / f"{args.date}-{common.file_tag(dev)}-{result_name(args.sessions, args.workers)}{args.suffix}"
    meta = {"device": name, "date": args.date, "model": model.path, "view": args.view, **floor.meta(),
            "weight_bytes_read_per_step": model.weight_bytes, "prefetch_default_bytes": PREFETCH_BYTES,
            "versions": common.versions()}
    flat = [{k: v for k, v in r.items() if k not in ("kernel_us", "host_top")} for r in rows]
    common.write_results(stem, meta, flat, {"kernels": [
        {k: r[k] for k in ("skinny", "folds", "prefetch", "attention", "pages", "launch_ahead", "workers", "kernel_us",
                           "host_top")}
        for r in rows]})
    plot(rows, Path(f"{stem}.png"), f"Decode step vs roofline, random:{args.shape}, {args.view} view, {name}")
    print(f"wrote {stem}.csv, .json and .png")
    return 0


def result_name(sessions: int, workers: list[int]) -> str:
    """decode_profile, or decode_profile_32x4 for batched passes: two runs of a day keep their own files."""
    return "decode_profile" if sessions == 1 else f"decode_profile_{sessions}x{'-'.join(map(str, workers))}"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['workers']}w {r['skinny']}, folds {r['folds']}, prefetch {r['prefetch']}, "
              f"attention {r.get('attention', 'default')}, pages {r.get('pages', 'default')}, "
              f"ahead {r['launch_ahead']}" for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.27 for x in xs], [r["step_ms"] for r in rows], 0.27, label="step (wall)")
    ax.bar(list(xs), [r["gpu_ms"] for r in rows], 0.27, label="GPU (graph replay)")
    ax.bar([x + 0.27 for x in xs], [r["roofline_ms"] for r in rows], 0.27, label="roofline")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set(ylabel="ms per step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    common.save_figure(fig, path, title)


if __name__ == "__main__":
    sys.exit(main())
