"""Live terminal view of a running session: one pane per worker, fed by `on_step`.

The panes show the tail of each worker's text as it is written, so one can watch the
workers read each other and split the work. Refreshes are throttled (the model, not the
terminal, should use the CPU), and nothing is drawn when stdout is not a terminal.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .protocol import worker_name

if TYPE_CHECKING:
    from .session import Session

COLOURS = ("cyan", "magenta", "green", "yellow", "bright_blue", "red", "bright_cyan", "bright_magenta")
MAX_COLUMNS = 3  # panes per row; more workers wrap onto further rows


def worker_colour(w: int) -> str:
    return COLOURS[w % len(COLOURS)]


def tail_lines(text: str, width: int, lines: int, console: Console) -> list[Text]:
    """The last `lines` lines of `text` once wrapped to `width` columns."""
    return list(Text(text.replace("\t", "    ")).wrap(console, max(width, 8)))[-lines:]


class LiveView:
    """Context manager whose `on_step(session, new)` redraws the panes, ~`fps` times a second."""

    def __init__(self, console: Console | None = None, fps: float = 8.0, enabled: bool = True) -> None:
        self.console = console or Console()
        self.enabled = enabled and self.console.is_terminal
        self.interval = 1.0 / fps
        self.live: Live | None = None
        self.session: Session | None = None
        self.t0 = self.last = 0.0

    def __enter__(self) -> LiveView:
        self.t0 = time.perf_counter()
        if self.enabled:
            self.live = Live(console=self.console, auto_refresh=False, transient=False,
                             vertical_overflow="crop")
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            if self.session is not None:
                self.live.update(self.render(self.session), refresh=True)  # the final state
            self.live.stop()
            self.live = None

    def on_step(self, session: Session, new: dict[int, list[int]]) -> None:
        self.session = session
        now = time.perf_counter()
        if self.live is None or (now - self.last < self.interval and not session.done):
            return
        self.last = now
        self.live.update(self.render(session), refresh=True)

    def render(self, session: Session) -> RenderableType:
        n = len(session.workers)
        cols = 2 if n == 4 else min(n, MAX_COLUMNS)
        rows = -(-n // cols)
        width = max(self.console.width // cols - 4, 8)  # borders and padding
        limit = max(min((self.console.height - 2) // rows - 2, 16), 1)  # footer; panel borders
        tails = [tail_lines(session.text(w), width, limit, self.console) for w in range(n)]
        height = max(3, *map(len, tails))  # panes grow with the text, up to the limit
        grid = Table.grid(expand=True, padding=0)
        for _ in range(cols):
            grid.add_column(ratio=1)
        panes = [self.pane(session, w, tails[w], height) for w in range(n)]
        for r in range(rows):
            row = panes[r * cols:(r + 1) * cols]
            grid.add_row(*row, *[""] * (cols - len(row)))
        return Group(grid, self.footer(session))

    def pane(self, session: Session, w: int, lines: list[Text], height: int) -> Panel:
        st, colour = session.stats, worker_colour(w)
        status = session.workers[w].status
        steps = st.steps_per_worker[w]
        title = (f"[bold {colour}]{worker_name(w)}[/] · {steps} step{'' if steps == 1 else 's'} · "
                 f"{st.generated_per_worker[w]} tok" + ("" if status == "active" else f" · {status}"))
        body = Text("\n").join(lines)
        body.stylize(colour)
        return Panel(body, title=title, title_align="left", border_style=colour, height=height + 2)

    def footer(self, session: Session) -> Text:
        st = session.stats
        elapsed = time.perf_counter() - self.t0
        tps = sum(st.generated_per_worker) / elapsed if elapsed > 0 else 0.0
        state = f"done ({st.stop_reason})" if session.done else "running"
        return Text(f" {st.forward_passes} forward passes · {elapsed:.1f} s · {tps:.1f} tokens/s · {state}",
                    style="dim")
