"""Live terminal view of a running session: one pane per worker, fed with the session's events.

The panes show the tail of each worker's text as it is written, so one can watch the
workers read each other and split the work. Being fed events (not a session), the view
works the same for the local engine, the Ray engine, or events read back from JSON.
Refreshes are throttled (the model, not the terminal, should use the CPU), and nothing
is drawn when the console is not a terminal.

Model text may hold terminal control sequences (a title change, a cleared screen, a
hyperlink): the panes, and everything printed as text on the view's console afterwards (the
plain output), show it with them removed (`terminal_safe`). JSON output is not printed there.
"""

from __future__ import annotations

import re
import time
import weakref

from rich.console import Console, ConsoleRenderable, Group, RenderableType, RenderHook
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .core.events import Done, Event, Progress, StepFinished, WorkerText
from .core.protocol import step_header, worker_name

COLOURS = ("cyan", "magenta", "green", "yellow", "bright_blue", "red", "bright_cyan", "bright_magenta")
MAX_COLUMNS = 3  # panes per row; more workers wrap onto further rows
KEEP_CHARS = 20_000  # of each worker's text: more than any pane shows


# ESC or 8-bit CSI sequences, string sequences (OSC, DCS, SOS, PM, APC) up to their terminator
# (BEL or ST; else the line's end), any other escape, then every C0/C1 control but \n and \t, and
# the bidirectional embeddings, overrides and isolates (shown text reordered: "Trojan Source").
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c\n]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE = re.compile(f"{_SEQUENCE.pattern}|{_CONTROL.pattern}")


def terminal_safe(text: str) -> str:
    """`text` without terminal control sequences, control characters (newline and tab kept) or
    bidirectional overrides: model text must not move the cursor, retitle the window, clear the
    screen or show its characters in another order than the one they have."""
    return _UNSAFE.sub("", text)


def safe_text(text: Text) -> Text:
    """A rich Text with `terminal_safe` applied, its styles kept on the characters that stay."""
    cuts = [m.span() for m in _UNSAFE.finditer(text.plain)]
    if not cuts:
        return text
    out, pos = text.blank_copy(), 0
    for start, end in [*cuts, (len(text), len(text))]:
        out.append_text(text[pos:start])
        pos = end
    return out


class StripControls(RenderHook):
    """Applies `safe_text` to every Text printed on a console (strings print as Text)."""

    def process_renderables(self, renderables: list[ConsoleRenderable]) -> list[ConsoleRenderable]:
        return [safe_text(r) if isinstance(r, Text) else r for r in renderables]


_GUARDED: weakref.WeakSet[Console] = weakref.WeakSet()


def guard(console: Console) -> Console:
    """Make `console` strip control sequences from the text printed on it from now on (see
    `StripControls`); idempotent. Call it before a Live starts on the console: a Live pops the
    last render hook when it stops."""
    if console not in _GUARDED:
        console.push_render_hook(StripControls())
        _GUARDED.add(console)
    return console


def worker_colour(w: int) -> str:
    return COLOURS[w % len(COLOURS)]


def tail_lines(text: str, width: int, lines: int, console: Console) -> list[Text]:
    """The last `lines` lines of `text` once wrapped to `width` columns, control sequences removed."""
    return list(Text(terminal_safe(text).replace("\t", "    ")).wrap(console, max(width, 8)))[-lines:]


class LiveView:
    """Context manager whose `feed(event)` keeps each worker's pane, redrawn ~`fps` times a second.

    It guards its console (see `guard`): what is printed there after the view, such as the
    workers' texts and the answer, shows no control sequences either."""

    def __init__(self, workers: int, console: Console | None = None, fps: float = 8.0, enabled: bool = True) -> None:
        self.console = guard(console or Console())
        self.enabled = enabled and self.console.is_terminal
        self.interval = 1.0 / fps
        self.live: Live | None = None
        self.texts = [""] * workers
        self.finished, self.generated = [0] * workers, [0] * workers  # finished steps, tokens
        self.current = [0] * workers  # k of the last step header `**Name [k]:**` the text showed; 0: none
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
            self._follow_headers(event.worker, len(event.text))
        elif isinstance(event, StepFinished):
            self.finished[event.worker] = max(self.finished[event.worker], event.step_index)
        elif isinstance(event, Progress):
            self.finished = [max(a, b) for a, b in zip(self.finished, event.steps_per_worker)]
            self.passes, self.tokens_per_second = event.step, event.tokens_per_second
            self.generated, self.statuses = event.generated_per_worker, event.statuses
            self.redraw()
        elif isinstance(event, Done):
            self.stop_reason = event.stats.stop_reason or "-"
            self.redraw(force=True)

    def _follow_headers(self, w: int, new_chars: int) -> None:
        """Number the step in progress as the text does: the forced header `**Name [k+1]:** `
        opens step k+1 once step k has finished (a header a worker imitates inside its step,
        before that step finished, does not count)."""
        while self.finished[w] >= self.current[w]:
            header = step_header(w, self.current[w] + 1)
            if header not in self.texts[w][-(new_chars + len(header)):]:
                return
            self.current[w] += 1

    def title(self, w: int) -> str:
        """The pane's title: name, the step in progress as its header numbers it (`step 3 (2 done)`
        while `**Bob [3]:**` is written; `step 3 (3 done)` once it finished, until the header of
        step 4 shows), tokens generated, the status. Without headers (no protocol): no steps."""
        colour, current, finished, status = worker_colour(w), self.current[w], self.finished[w], self.statuses[w]
        parts = [f"[bold {colour}]{worker_name(w)}[/]"]
        if current:
            parts.append(f"step {current} ({finished} done)")
        elif finished:
            parts.append(f"{finished} done")
        parts.append(f"{self.generated[w]} tok")
        if status != "active":
            parts.append(status)
        return " · ".join(parts)

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
        colour = worker_colour(w)
        body = Text("\n").join(lines)
        body.stylize(colour)
        return Panel(body, title=self.title(w), title_align="left", border_style=colour, height=height + 2)

    def footer(self) -> Text:
        state = f"done ({self.stop_reason})" if self.stop_reason else "running"
        return Text(f" {self.passes} forward passes · {self.tokens_per_second:.1f} tokens/s · {state}", style="dim")
