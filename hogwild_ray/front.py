"""EngineFront: what every engine offers its users, whichever backend runs the sessions.

`start` is the backend's (a Session in this process, or a proxy of one in a Ray
coordinator); streaming, solving and batches are built on it here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .core.events import Event
from .core.results import SolveResult
from .core.sampling_params import SamplingParams
from .streaming import final_result, session_events


class EngineFront(ABC):
    """The user's API of an engine: start, stream, solve, solve_many, close."""

    @abstractmethod
    def start(self, problem: str, workers: int = 2, **options: Any) -> Any:
        """Open a session (see HogwildEngine.start for the options)."""

    def close(self) -> None:
        """Release what the engine holds (the Ray engine stops its shards); idempotent."""

    def __enter__(self) -> EngineFront:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(
        self,
        problem: str,
        workers: int = 2,
        *,
        max_tokens: int | None = 1024,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        layout: str = "combined",
        max_steps: int | None = None,
        on_step: Callable[[Any, dict[int, list[int]]], None] | None = None,
        **protocol_options,
    ) -> Iterator[Event]:
        """Run a session, yielding its events (hogwild_ray.core.events) as it goes; the last is Done.

        The arguments are those of `solve`. Nothing runs until the first event is asked for;
        leaving the loop early closes the session."""
        session = self.start(problem, workers, sampling=sampling, layout=layout, max_tokens=max_tokens,
                             max_steps=max_steps, **protocol_options)
        yield from session_events(session, on_step)

    def solve(
        self,
        problem: str,
        workers: int = 2,
        *,
        max_tokens: int | None = 1024,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        layout: str = "combined",
        max_steps: int | None = None,
        on_step: Callable[[Any, dict[int, list[int]]], None] | None = None,
        **protocol_options,
    ) -> SolveResult:
        """Run a session to its end (by consuming `stream`); on_step(session, new_tokens) is
        called after each pass."""
        return final_result(self.stream(problem, workers, max_tokens=max_tokens, sampling=sampling,
                                        layout=layout, max_steps=max_steps, on_step=on_step, **protocol_options))

    def solve_many(self, problems: Iterable[str | dict], out: str | Path | None = None, *,
                   progress: bool = True, **options) -> list[dict]:
        """Solve each problem (a string, or a dict with `problem` and an optional `id`); one JSON
        line per result appended to `out`, whose finished ids are skipped (a rerun resumes).
        options: those of `solve`. Returns every problem's record, in input order."""
        from .batch import run_batch

        return run_batch(lambda problem: self.solve(problem, **options), problems, out, progress)
