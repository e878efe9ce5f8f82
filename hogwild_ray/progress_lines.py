"""Plain progress lines for a run whose output is not a terminal (a log file, a Ray job's log).

The live panes draw nothing there, so without these a long run is silent until it ends.
One line every few seconds (and one at the end): forward passes, tokens, tokens/s and
each worker's finished steps. Fed with the session's events, like the live view.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .core.events import Done, Event, Progress
from .core.protocol import worker_name

INTERVAL_S = 5.0


class ProgressLines:
    """`feed(event)` prints a line at most every `interval_s` seconds, and one when the run ends."""

    def __init__(self, stream: TextIO | None = None, interval_s: float = INTERVAL_S, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.interval_s, self.enabled = interval_s, enabled
        self.last = time.perf_counter()
        self.latest: Progress | None = None

    def feed(self, event: Event) -> None:
        if not self.enabled:
            return
        if isinstance(event, Progress):
            self.latest = event
            if time.perf_counter() - self.last >= self.interval_s:
                self.emit("running")
        elif isinstance(event, Done):
            self.emit(f"done ({event.stats.stop_reason or '-'})")

    def emit(self, state: str) -> None:
        self.last = time.perf_counter()
        print(progress_line(self.latest, state), file=self.stream, flush=True)


def progress_line(p: Progress | None, state: str) -> str:
    if p is None:
        return f"run: {state}"
    steps = ", ".join(f"{worker_name(w)} {n}" for w, n in enumerate(p.steps_per_worker))
    return (f"run: pass {p.step}, {sum(p.generated_per_worker)} tokens, {p.tokens_per_second:.1f} tokens/s, "
            f"steps finished: {steps}; {state}")
