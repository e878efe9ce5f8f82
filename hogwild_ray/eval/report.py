"""The evaluation's summary: accuracy per configuration and budget as a Markdown table and a
plot of accuracy against budget (one line per mode, layout and worker count, Wilson error
bars), like the figure of the Hogwild! paper."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .runner import RunSpec
from .stats import wilson


@dataclass
class Row:
    spec: RunSpec
    budget: int
    n: int
    correct: int
    tokens_per_worker: float  # mean over problems of the mean over workers
    forward_passes: float  # mean passes used (fewer than the budget where runs ended early)
    seconds: float  # mean wall time of a run up to this budget, forced answers included

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.correct, self.n)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def summarise(records: list[dict], specs: list[RunSpec] | None = None) -> list[Row]:
    """One row per configuration and budget, in `specs` order (else first seen), budgets ascending."""
    groups: dict[tuple[RunSpec, int], list[dict]] = {}
    for r in records:
        groups.setdefault((RunSpec(r["mode"], r["workers"], r["layout"]), r["budget"]), []).append(r)
    order = {s: i for i, s in enumerate(specs or [])}
    seen = {s: i for i, (s, _) in enumerate(groups)}
    rows = []
    for (spec, budget), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], len(order)),
                                                                      seen[kv[0][0]], kv[0][1])):
        ok = [r for r in rs if "error" not in r]
        rows.append(Row(spec, budget, len(rs), sum(bool(r["correct"]) for r in rs),
                        _mean([_mean(r["tokens_per_worker"]) for r in ok]),
                        _mean([r["forward_passes"] for r in ok]), _mean([r["seconds"] for r in ok])))
    return rows


def markdown(rows: list[Row]) -> str:
    """The summary table (accuracy with its 95% Wilson interval)."""
    lines = ["| mode | layout | workers | budget | accuracy | 95% CI | n | tokens/worker | passes used | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r.interval
        lines.append(f"| {r.spec.mode} | {r.spec.layout or '-'} | {r.spec.workers} | {r.budget} | "
                     f"{r.accuracy:.1%} | {lo:.1%} - {hi:.1%} | {r.n} | {r.tokens_per_worker:.0f} | "
                     f"{r.forward_passes:.0f} | {r.seconds:.1f} |")
    return "\n".join(lines) + "\n"


def summary_page(rows: list[Row], title: str, notes: list[str]) -> str:
    text = f"# {title}\n\n" + "".join(f"{n}\n" for n in notes)
    return text + ("\n" if notes else "") + markdown(rows)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "p", "h", "*")
LINESTYLES = {"single": "-", "independent": "--", "hogwild": "-"}
LAYOUT_STYLES = {"combined": "-", "contiguous": "-.", "interleaved": (0, (1, 1))}


@dataclass
class Series:
    """One line of the plot: a configuration's accuracy at each budget, drawn at `x` (its budgets
    moved a little sideways, so that lines that coincide, say every mode at 0%, all stay visible)."""

    label: str
    budgets: list[int]
    x: list[float]
    y: list[float]
    yerr: tuple[list[float], list[float]]  # below, above: the Wilson interval
    color: str
    marker: str
    linestyle: str | tuple


def series(rows: list[Row], spread: float = 0.3) -> list[Series]:
    """The plot's lines, in `rows` order. Line k of n is drawn at budget * 2**offset_k (the x axis is
    log2), the offsets evenly spaced and centred on 0, all within `spread` of the closest gap between
    two budgets (in log2), and each line has its own marker: lines that coincide never hide each other."""
    import math

    specs = list(dict.fromkeys(r.spec for r in rows))
    budgets = sorted({r.budget for r in rows})
    gaps = [math.log2(b / a) for a, b in zip(budgets, budgets[1:])]
    step = min(0.05, spread * min(gaps, default=1.0) / max(len(specs) - 1, 1))
    palette = [f"C{i}" for i in range(10)]
    colors = iter(palette)
    out = []
    for k, spec in enumerate(specs):
        rs = [r for r in rows if r.spec == spec]
        shift = 2 ** ((k - (len(specs) - 1) / 2) * step)
        style = LAYOUT_STYLES.get(spec.layout or "", "-") if spec.mode == "hogwild" else LINESTYLES.get(spec.mode, "-")
        out.append(Series(
            spec.label, [r.budget for r in rs], [r.budget * shift for r in rs], [r.accuracy for r in rs],
            ([r.accuracy - r.interval[0] for r in rs], [r.interval[1] - r.accuracy for r in rs]),
            "k" if spec.mode == "single" else next(colors, palette[k % 10]), MARKERS[k % len(MARKERS)], style))
    return out


def wrap_title(title: str, width_in: float, fontsize: float) -> str:
    """The title in lines that fit `width_in` inches (a character is about 0.6 em wide)."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.wrap(title, chars, break_long_words=True, break_on_hyphens=False)) or title


def figure(rows: list[Row], title: str = "Accuracy against sequential forward passes"):
    """The figure of accuracy.png (see `plot`), for the caller to save and close."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = series(rows)
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    n = len(lines)
    widen = min(0.6, 2.4 / max(n - 1, 1))
    for k, s in enumerate(lines):  # each line drawn over the previous ones, a little thinner: where lines
        # coincide (every mode at 0%, say) the earlier ones show as bands around the later ones
        ax.errorbar(s.x, s.y, yerr=[s.yerr[0], s.yerr[1]], label=s.label, color=s.color, marker=s.marker,
                    markersize=6, markerfacecolor="white" if k % 2 else s.color, capsize=3, linestyle=s.linestyle,
                    linewidth=1.3 + widen * (n - 1 - k), elinewidth=1, zorder=2 + k)
    budgets = sorted({b for s in lines for b in s.budgets})
    if budgets:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        lo, hi = min(x for s in lines for x in s.x), max(x for s in lines for x in s.x)
        ax.set_xlim(lo / 2 ** 0.25, hi * 2 ** 0.25)
    ax.set_ylim(-0.04, 1.04)
    ax.set_xlabel("budget (sequential forward passes)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    if lines:
        fig.legend(loc="outside lower center", ncols=min(n, 3), fontsize=8, handlelength=3)
    size = 12
    fig.suptitle(wrap_title(title, fig.get_figwidth() * 0.9, size), fontsize=size)
    return fig


def plot(rows: list[Row], path: str | Path, title: str = "Accuracy against sequential forward passes") -> None:
    """accuracy.png: accuracy against budget per configuration, Wilson 95% error bars; the lines
    moved a little apart around each budget so that equal ones stay visible, the legend below."""
    import matplotlib.pyplot as plt

    fig = figure(rows, title)
    try:
        fig.savefig(path, dpi=120, bbox_inches="tight", pad_inches=0.1)
    finally:
        plt.close(fig)
