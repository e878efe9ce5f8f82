"""Counters of an engine's forward passes: what `engine.metrics()` reports. Pure logic."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class PassCounters:
    """Totals since the engine started, and the recent passes' times for percentiles."""

    passes: int = 0
    rows: int = 0  # query tokens, all passes
    max_rows: int = 0
    sessions_in_passes: int = 0  # sessions summed over passes (mean sessions per pass)
    tokens_generated: int = 0  # tokens the workers sampled and kept
    prompt_tokens: int = 0  # prompt and header tokens written
    pass_seconds: float = 0.0
    recent: deque = field(default_factory=lambda: deque(maxlen=1024))  # seconds of the last passes

    def record(self, rows: int, sessions: int, generated: int, prompt: int, seconds: float) -> None:
        self.passes += 1
        self.rows += rows
        self.max_rows = max(self.max_rows, rows)
        self.sessions_in_passes += sessions
        self.tokens_generated += generated
        self.prompt_tokens += prompt
        self.pass_seconds += seconds
        self.recent.append(seconds)

    def snapshot(self) -> dict:
        """Plain numbers: totals, means, and percentiles of the recent pass times (ms)."""
        times = sorted(self.recent)

        def pct(q: float) -> float:
            return 1000 * times[min(len(times) - 1, int(q * len(times)))] if times else 0.0

        n = max(self.passes, 1)
        return {
            "passes": self.passes, "rows_per_pass": self.rows / n, "max_rows_per_pass": self.max_rows,
            "sessions_per_pass": self.sessions_in_passes / n, "tokens_generated": self.tokens_generated,
            "prompt_tokens": self.prompt_tokens, "pass_ms_mean": 1000 * self.pass_seconds / n,
            "pass_ms_p50": pct(0.5), "pass_ms_p90": pct(0.9), "pass_ms_p99": pct(0.99),
            "pass_ms_max": 1000 * times[-1] if times else 0.0,
        }
