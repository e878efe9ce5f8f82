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


def plot(rows: list[Row], path: str | Path, title: str = "Accuracy against sequential forward passes") -> None:
    """accuracy.png: accuracy against budget per configuration, Wilson 95% error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    specs = list(dict.fromkeys(r.spec for r in rows))
    styles = {"single": ("k", "o"), "independent": (None, "s"), "hogwild": (None, "^")}
    for spec in specs:
        rs = [r for r in rows if r.spec == spec]
        x = [r.budget for r in rs]
        y = [r.accuracy for r in rs]
        err = [[r.accuracy - r.interval[0] for r in rs], [r.interval[1] - r.accuracy for r in rs]]
        color, marker = styles.get(spec.mode, (None, "o"))
        ax.errorbar(x, y, yerr=err, label=spec.label, color=color, marker=marker, capsize=3,
                    linestyle="--" if spec.mode == "independent" else "-")
    budgets = sorted({r.budget for r in rows})
    if budgets:
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("budget (sequential forward passes)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
