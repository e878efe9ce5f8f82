"""What each kind of kernel costs a decode pass as the chain runs it: the pass with that kind left out.

A chained pass (hogwild_kernels/pdl.py) overlaps each kernel with the one before, so the
profiler's per-kernel times add up to more than the pass and do not say what a kernel costs
it. This runs the same decode pass (random weights, CUDA graphs, one session over an L-token
view) with one kind of kernel not launched at all and reports the GPU time it leaves, side by
side with the whole pass: the most that folding that kind into its neighbours, or making it
free, could win. With a kind left out its outputs hold whatever their buffers held, so the
tokens are garbage: the timing is all such a pass is for. `none` (the whole pass) runs first
and last, so the run's drift shows beside the differences.

    python benchmarks/leave_out.py --workers 1,16 --leave-out none,merge,attention,norms,silu,none
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402

# each kind: the Triton kernels (module, name) whose launches it leaves out; every launch site looks
# its kernel up in its module when it runs, so replacing the module's name reaches all of them. (Not the
# sampling: its garbage scores would still pick a token in range, but left unwritten they could not.)
KINDS: dict[str, tuple[tuple[str, str], ...]] = {
    "merge": (("hogwild_kernels.triton_attention", "_merge_partials_kernel"),),
    "partials": (("hogwild_kernels.triton_attention", "_rope_shift_partial_kernel"),),
    "append": (("hogwild_kernels.triton_attention", "_kv_append_kernel"),
               ("hogwild_kernels.triton_attention", "_qk_norm_kv_append_kernel")),
    "norms": (("hogwild_kernels.fused", "_add_rms_norm_kernel"),),
    "silu": (("hogwild_kernels.fused", "_silu_mul_kernel"),),
}
# kernels that only some decoders launch (Qwen3's q/k norms folded into the K/V append)
OPTIONAL = ("_qk_norm_kv_append_kernel",)
# kinds named together
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("append", "partials", "merge"),
    "small": ("append", "merge", "norms", "silu"),
}
DEFAULT = "none,merge,partials,append,attention,norms,silu,small,none"


def leave_out_setting(text: str) -> tuple[str, ...]:
    """'none' -> (); 'merge' -> ('merge',); 'attention' or 'norms+silu' -> their kinds, in KINDS' order."""
    if text == "none":
        return ()
    kinds: set[str] = set()
    for part in text.split("+"):
        if part in KINDS:
            kinds.add(part)
        elif part in GROUPS:
            kinds.update(GROUPS[part])
        else:
            raise ValueError(f"--leave-out: {part!r} is no kind of kernel; choose none, or kinds joined by +: "
                             f"{', '.join([*KINDS, *GROUPS])}")
    return tuple(k for k in KINDS if k in kinds)


class NotLaunched:
    """Stands for a Triton kernel: `kernel[grid](...)` launches nothing and counts the launch."""

    def __init__(self, name: str) -> None:
        self.name, self.launches = name, 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.launches += 1

        return launch


@contextlib.contextmanager
def left_out(kinds: tuple[str, ...]) -> Iterator[dict[str, NotLaunched]]:
    """Within it, the kernels of `kinds` are not launched (yields their stand-ins by name); every one
    is put back after, whatever happens."""
    import importlib

    saved, stand_ins = [], {}
    try:
        for kind in kinds:
            for module_name, name in KINDS[kind]:
                module = importlib.import_module(module_name)
                saved.append((module, name, getattr(module, name)))
                stand_ins[name] = NotLaunched(name)
                setattr(module, name, stand_ins[name])
        yield stand_ins
    finally:
        for module, name, kernel in reversed(saved):
            setattr(module, name, kernel)


def unreached(stand_ins: dict[str, NotLaunched], optional: tuple[str, ...] = OPTIONAL) -> list[str]:
    """The left-out kernels that no launch reached (but those only some decoders launch): a leave-out
    that measured nothing, such as a launch site that holds its kernel rather than looking it up."""
    return [name for name, s in stand_ins.items() if s.launches == 0 and name not in optional]


def main(argv: list[str] | None = None) -> int:
    import torch

    import scaling_runs
    from bandwidth import measure as measure_bandwidth
    from decode_profile import measure

    import hogwild_ray as hw
    from hogwild_ray.cli.common import at_least

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-8b")
    p.add_argument("--workers", type=common.ints, default=[1, 16])
    p.add_argument("--view", type=at_least(1), default=4096)
    p.add_argument("--leave-out", default=DEFAULT,
                   help=f"settings to compare, comma-separated: none, or kinds joined by + "
                        f"({', '.join([*KINDS, *GROUPS])}); default {DEFAULT}")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--out", type=Path, default=common.RESULTS)
    p.add_argument("--date", default=common.today())
    p.add_argument("--suffix", default="")
    args = p.parse_args(argv)
    try:
        settings = [(text, leave_out_setting(text)) for text in args.leave_out.split(",")]
    except ValueError as e:
        p.error(str(e))
    if not torch.cuda.is_available():
        p.error("this benchmark times CUDA graphs and torch sees no GPU")
    dev = torch.device("cuda")
    floor = measure_bandwidth(dev)
    model = scaling_runs.Model(f"random:{args.shape}", dev, torch.bfloat16)
    layers = model.spec.num_layers
    measure_args = argparse.Namespace(sessions=1, protocol=False, view=args.view, warmup=args.warmup,
                                      steps=args.steps, replays=args.replays, host_profile=False)
    rows = []
    for text, kinds in settings:
        with left_out(kinds) as stand_ins:  # from the engine's start: its graphs are captured without them
            engine = hw.HogwildEngine.from_pretrained(model.path, dev, torch.bfloat16, cuda_graphs=True,
                                                      cache_tokens=max(args.workers) * 512 + args.view + 4096)
            engine.eos_ids = frozenset()
            try:
                for w in args.workers:
                    r = measure(engine, model, w, measure_args, floor.value)
                    rows.append({"left_out": text, "kinds": "+".join(kinds) or "none", "workers": w,
                                 "gpu_ms": r["gpu_ms"], "step_ms": r["step_ms"], "roofline_ms": r["roofline_ms"],
                                 "kernels_per_pass": r["kernels_per_pass"], "chained": engine.decoder.chained})
                    print(f"left out {text}: {w} workers, GPU {r['gpu_ms']:.3f} ms, {r['kernels_per_pass']} kernels",
                          flush=True)
                if missed := unreached(stand_ins):
                    raise SystemExit(f"left out {text}: no launch reached {', '.join(missed)}, so its figures "
                                     f"measure nothing; each launch site must look its kernel up in its module")
            finally:
                del engine
                common.free_memory(dev)
    for w in args.workers:
        whole = statistics.mean(r["gpu_ms"] for r in rows if r["workers"] == w and r["kinds"] == "none")
        for r in rows:
            if r["workers"] == w:
                r["saved_ms"] = whole - r["gpu_ms"]
                r["saved_us_a_layer"] = 1e3 * r["saved_ms"] / layers
                r["saved_pct"] = 100 * r["saved_ms"] / whole
    name = common.device_name(dev)
    common.print_table(
        f"Decode pass with kernels left out, random:{args.shape} bf16, {args.view}-token view, {name}, "
        f"bandwidth {floor.gbs:.0f} GB/s",
        ["left out", "workers", "GPU ms", "saved ms", "µs a layer", "% of the pass", "x roofline", "kernels"],
        [[r["left_out"], str(r["workers"]), f"{r['gpu_ms']:.3f}", f"{r['saved_ms']:.3f}",
          f"{r['saved_us_a_layer']:.2f}", f"{r['saved_pct']:.1f}", f"{r['gpu_ms'] / r['roofline_ms']:.3f}",
          str(r["kernels_per_pass"])] for r in rows])
    stem = args.out / f"{args.date}-{common.file_tag(dev)}-leave_out{args.suffix}"
    meta = {"device": name, "date": args.date, "model": model.path, "view": args.view, "layers": layers,
            **floor.meta(), "weight_bytes_read_per_step": model.weight_bytes, "versions": common.versions()}
    common.write_results(stem, meta, rows)
    plot(rows, Path(f"{stem}.png"), f"Decode pass with kernels left out, random:{args.shape}, {args.view} view, "
                                    f"{name}")
    print(f"wrote {stem}.csv, .json and .png")
    return 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    workers = sorted({r["workers"] for r in rows})
    width = 0.8 / len(workers)
    for i, w in enumerate(workers):
        mine = [r for r in rows if r["workers"] == w]
        xs = [x + (i - (len(workers) - 1) / 2) * width for x in range(len(mine))]
        ax.bar(xs, [r["saved_us_a_layer"] for r in mine], width, label=f"{w} workers")
    labels = [r["left_out"] for r in rows if r["workers"] == workers[0]]
    ax.set_xticks(range(len(labels)), labels, fontsize=8, rotation=20)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="µs a layer saved (GPU, graph replay)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    common.save_figure(fig, path, title)


if __name__ == "__main__":
    sys.exit(main())
