"""Progress of a run of many problems (batch) or runs (eval) on stderr: a live rich bar on a
terminal, plain lines otherwise (a log file, a Ray job's log), with what it retried and, over
replicas, each replica's share and tokens/s (hogwild_ray.core.tally)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .core.tally import Tally

STATUS_EVERY_S = 10.0  # plain lines: a whole-run status line at most this often (over replicas)


class RunProgress:
    """`advance(...)` per finished item, `retry(...)` per item run again, `close()` at the end."""

    def __init__(self, name: str, total: int, skipped: int, out: Path | None, enabled: bool = True,
                 unit: str = "problems", status_every_s: float = STATUS_EVERY_S) -> None:
        from rich.console import Console

        self.name, self.unit, self.out, self.enabled = name, unit, out, enabled
        self.tally = Tally(total, skipped)
        self.t0 = self.last_status = time.perf_counter()
        self.status_every_s = status_every_s
        self.bar = None
        console = Console(stderr=True)
        if not enabled:
            return
        if console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.progress import TimeRemainingColumn

            self.bar = Progress(TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), TextColumn("{task.description}"), console=console)
            self.task = self.bar.add_task("", total=total, completed=skipped)
            self.bar.start()
        else:
            where = f" already in {out}" if out else " done"
            self.line(f"{name}: {total} {unit}, {skipped}{where}, {total - skipped} to run")

    @property
    def count(self) -> int:
        return self.tally.count

    @staticmethod
    def line(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def advance(self, text: str, failed: bool = False, tokens: int = 0, replica: str | None = None) -> None:
        """One item finished; `text` says which and how (id, answer or error)."""
        self.tally.add(failed, tokens, replica)
        if not self.enabled:
            return
        t = self.tally
        if self.bar is not None:
            from rich.markup import escape

            extra = f" | {t.retried} retried, {len(t.replicas)} replicas" if t.replicas or t.retried else ""
            self.bar.update(self.task, completed=t.count, description=escape(text + extra))
            return
        self.line(f"[{t.count}/{t.total}] {text}" + (f" (replica {replica})" if replica else ""))
        now = time.perf_counter()
        if t.replicas and now - self.last_status >= self.status_every_s:
            self.last_status = now
            self.line(f"{self.name}: {t.status(self.seconds(), self.unit)}")

    def retry(self, what: str) -> None:
        """An item lost with its replica runs again elsewhere."""
        self.tally.retried += 1
        if self.enabled:
            (self.bar.console.print if self.bar is not None else self.line)(f"{self.name}: {what}; running it again")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.enabled:
            t = self.tally
            where = f", results in {self.out}" if self.out else ""
            self.line(f"{self.name}: {t.count}/{t.total} {self.unit} done in {self.seconds():.1f} s, "
                      f"{t.failed} failed, {t.retried} retried{where}")
            if t.replicas:
                self.line(f"{self.name}: {t.status(self.seconds(), self.unit)}")
