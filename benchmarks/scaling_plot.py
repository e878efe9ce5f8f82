"""The scaling benchmark's picture and table: tokens/s vs workers, step time vs view with the roofline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import common  # noqa: E402

STYLE = {"graphs": "tab:blue", "eager": "tab:cyan", "independent": "tab:orange", "naive": "tab:red",
         "transformers": "tab:gray"}


def plot(meta: dict, rows: list[dict], path: Path) -> None:
    views = sorted({r["view"] for r in rows}) or meta["views"]
    fig, axes = plt.subplots(1, len(views) + 1, figsize=(4.2 * (len(views) + 1), 4.2), squeeze=False)
    for ax, v in zip(axes[0], views):
        for section, colour in STYLE.items():
            pts = sorted((r["workers"], r["tokens_per_s"]) for r in rows if r["section"] == section and r["view"] == v)
            if pts:
                ax.plot(*zip(*pts), "o-", color=colour, label=section, ms=4)
        ax.set(xscale="log", yscale="log", xlabel="workers (transformers: batch)", ylabel="tokens/s (all workers)",
               title=f"{v}-token views")
        ticks = sorted({r["workers"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    ours = "graphs" if any(r["section"] == "graphs" for r in rows) else "eager"
    for i, n in enumerate(sorted({r["workers"] for r in rows if r["section"] == ours})):
        cells = sorted((r["view_tokens"], r["step_ms"], r["roofline_ms"]) for r in rows
                       if r["section"] == ours and r["workers"] == n)
        colour = f"C{i}"
        ax.plot([c[0] for c in cells], [c[1] for c in cells], "o-", color=colour, ms=4, label=f"{n} workers")
        ax.plot([c[0] for c in cells], [c[2] for c in cells], "--", color=colour, lw=1)
    ax.set(xscale="log", yscale="log", xlabel="view length (tokens)", ylabel="ms per step",
           title=f"{ours}: step time (dashed: roofline)")
    ax.legend(fontsize=7)
    common.save_figure(fig, path, f"hogwild-ray scaling: {meta['model']} ({meta['dtype']}) on {meta['device_name']}, "
                       f"bandwidth {meta['floor_bandwidth_gbs']:.0f} GB/s")


def table(meta: dict, rows: list[dict], skipped: list[dict], targets: list[dict]) -> None:
    cols = ["section", "workers", "view", "step ms", "tok/s", "tok/s/worker", "GB/s", "roofline ms", "x roofline",
            "x 1 worker"]
    body = [[r["section"], str(r["workers"]), str(r["view"]), f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:.1f}",
             f"{r['tokens_per_s_per_worker']:.1f}", f"{r['achieved_gbs']:.3g}", f"{r['roofline_ms']:.2f}",
             f"{r['vs_roofline']:.2f}", "-" if r["vs_1_worker"] is None else f"{r['vs_1_worker']:.2f}"]
            for r in rows]
    common.print_table(f"{meta['model']} ({meta['dtype']}) on {meta['device_name']}, bandwidth "
                       f"{meta['floor_bandwidth_gbs']:.0f} GB/s, torch {meta['torch']}", cols, body)
    for s in skipped:
        print(f"skipped {s['section']} workers={s['workers']} view={s['view']}: {s['reason']}")
    for t in targets:
        value = f" ({t['value']} vs {t['limit']})" if "value" in t else ""
        print(f"target {t['status']:>12}: {t['target']}{value}")
