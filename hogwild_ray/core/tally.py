"""The figures of a run of many problems: done, failed, retried, tokens/s, per replica. Pure;
the progress bar and the plain log lines (hogwild_ray.run_progress) show them."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ReplicaTally:
    done: int = 0
    tokens: int = 0


@dataclass
class Tally:
    """Counts of one run; `seconds` is the time it has run (the caller's clock)."""

    total: int
    skipped: int = 0
    done: int = 0
    failed: int = 0
    retried: int = 0
    tokens: int = 0
    replicas: dict[str, ReplicaTally] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Items accounted for: those already in the output and those finished now."""
        return self.skipped + self.done

    def add(self, failed: bool = False, tokens: int = 0, replica: str | None = None) -> None:
        self.done += 1
        self.failed += failed
        self.tokens += tokens
        if replica is not None:
            r = self.replicas.setdefault(replica, ReplicaTally())
            r.done += 1
            r.tokens += tokens

    def status(self, seconds: float, unit: str = "problems") -> str:
        """e.g. "40/100 problems, 1 failed, 3 retried, 812.0 tokens/s; replica ab12: 20 (410.2 tokens/s), ..."."""
        rate = lambda tokens: tokens / seconds if seconds > 0 else 0.0  # noqa: E731
        text = f"{self.count}/{self.total} {unit}, {self.failed} failed, {self.retried} retried"
        if self.tokens:
            text += f", {rate(self.tokens):.1f} tokens/s"
        if self.replicas:
            text += "; " + ", ".join(f"replica {name}: {r.done} ({rate(r.tokens):.1f} tokens/s)"
                                     for name, r in sorted(self.replicas.items()))
        return text
