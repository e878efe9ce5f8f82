"""Live terminal view of a running session: one pane per worker, fed with the session's events.

The panes show the tail of each worker's text as it is written, so one can watch the
workers read each other and split the work. Being fed events (not a session), the view
works the same for the local engine, the Ray engine, or events read back from JSON.
Refreshes are throttled (the model, not the terminal, should use the CPU), and nothing
is drawn when the console is not a terminal.
"""

from __future__ import annotations

import time

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .events import Done, Event, Progress, StepFinished, WorkerText
from .protocol import worker_name

COLOURS = ("cyan", "magenta", "green", "yellow", "bright_blue", "red", "bright_cyan", "bright_magenta")
MAX_COLUMNS = 3  # panes per row; more workers wrap onto further rows
KEEP_CHARS = 20_000  # of each worker's text: more than any pane shows


def worker_colour(w: int) -> str:
    return COLOURS[w % len(COLOURS)]


def tail_lines(text: str, width: int, lines: int, console: Console) -> list[Text]:
    """The last `lines` lines of `text` once wrapped to `width` columns."""
    return list(Text(text.replace("\t", "    ")).wrap(console, max(width, 8)))[-lines:]


class LiveView:
    """Context manager whose `feed(event)` keeps each worker's pane, redrawn ~`fps` times a second."""

    def __init__(self, workers: int, console: Console | None = None, fps: float = 8.0, enabled: bool = True) -> None:
        self.console = console or Console()
        self.enabled = enabled and self.console.is_terminal
        self.interval = 1.0 / fps
        self.live: Live | None = None
        self.texts = [""] * workers
        self.steps, self.generated = [0] * workers, [0] * workers
        self.statuses = ["active"] * workers
        self.passes, self.tokens_per_second, self.stop_reason = 0, 0.0, None
        self.last = 0.0

    def __enter__(self) -> LiveView:
        if self.enabled:
            self.live = Live(console=self.console, auto_refresh=False, transient=False, vertical_overflow="crop")
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.update(self.render(), refresh=True)  # the final state
            self.live.stop()
            self.live = None

    def feed(self, event: Event) -> None:
        if isinstance(event, WorkerText):
            self.texts[event.worker] = (self.texts[event.worker] + event.text)[-KEEP_CHARS:]
        elif isinstance(event, StepFinished):
            self.steps[event.worker] = event.step_index
        elif isinstance(event, Progress):
            self.passes, self.tokens_per_second = event.step, event.tokens_per_second
            self.generated, self.statuses = event.generated_per_worker, event.statuses
            self.redraw()
        elif isinstance(event, Done):
            self.stop_reason = event.stats.stop_reason or "-"
            self.redraw(force=True)

    def redraw(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.live is None or (now - self.last < self.interval and not force):
            return
        self.last = now
        self.live.update(self.render(), refresh=True)

    def render(self) -> RenderableType:
        n = len(self.texts)
        cols = 2 if n == 4 else min(n, MAX_COLUMNS)
        rows = -(-n // cols)
        width = max(self.console.width // cols - 4, 8)  # borders and padding
        limit = max(min((self.console.height - 2) // rows - 2, 16), 1)  # footer; panel borders
        tails = [tail_lines(t, width, limit, self.console) for t in self.texts]
        height = max(3, *map(len, tails))  # panes grow with the text, up to the limit
        grid = Table.grid(expand=True, padding=0)
        for _ in range(cols):
            grid.add_column(ratio=1)
        panes = [self.pane(w, tails[w], height) for w in range(n)]
        for r in range(rows):
            row = panes[r * cols:(r + 1) * cols]
            grid.add_row(*row, *[""] * (cols - len(row)))
        return Group(grid, self.footer())

    def pane(self, w: int, lines: list[Text], height: int) -> Panel:
        colour, steps, status = worker_colour(w), self.steps[w], self.statuses[w]
        title = (f"[bold {colour}]{worker_name(w)}[/] · {steps} step{'' if steps == 1 else 's'} · "
                 f"{self.generated[w]} tok" + ("" if status == "active" else f" · {status}"))
        body = Text("\n").join(lines)
        body.stylize(colour)
        return Panel(body, title=title, title_align="left", border_style=colour, height=height + 2)

    def footer(self) -> Text:
        state = f"done ({self.stop_reason})" if self.stop_reason else "running"
        return Text(f" {self.passes} forward passes · {self.tokens_per_second:.1f} tokens/s · {state}", style="dim")
