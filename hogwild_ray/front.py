"""EngineFront: what every engine offers its users, whichever backend runs the sessions.

`start` is the backend's (a Session in this process, or a proxy of one in a Ray
coordinator); streaming, solving and batches are built on it here, once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .batch import normalize
from .core.events import Done, Error, Event
from .errors import CacheFullError, ContextLengthError, InvalidRequestError, check_int
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
        if on_step is not None and not callable(on_step):
            raise InvalidRequestError(f"on_step must be a function on_step(session, new_tokens) or None, got "
                                      f"{type(on_step).__name__}")
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

    def stream_many(
        self,
        problems: Iterable[str | dict],
        workers: int = 2,
        *,
        max_concurrent: int | None = None,
        max_tokens: int | None = 1024,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        layout: str = "combined",
        max_steps: int | None = None,
        **protocol_options,
    ) -> Iterator[tuple[str | int, Event]]:
        """Run many problems (strings, or dicts with `problem` and an optional `id`), yielding
        (id, event) as the events happen; each problem's events are those of `stream`, its last
        Done, or one Error event for a problem that cannot run (too long for the context, more
        than the cache could ever hold) while the others go on. A string's id is its position.

        The engine runs them concurrently when it can (an in-process engine: up to
        max_concurrent at once, default as many as the K/V cache holds, in shared forward
        passes); leaving the loop early closes every session."""
        items = normalize(problems)
        options = dict(max_tokens=max_tokens, sampling=sampling, layout=layout, max_steps=max_steps, **protocol_options)
        yield from self._stream_many(items, workers, max_concurrent, options)

    def _stream_many(self, items: list[tuple[str | int, str]], workers: int, max_concurrent: int | None,
                     options: dict) -> Iterator[tuple[str | int, Event]]:
        """One problem after another (engines that cannot batch sessions)."""
        check_int("max_concurrent", max_concurrent, 1, none="(no limit but the cache)")
        for pid, text in items:
            try:
                events = self.stream(text, workers, **options)
                for event in events:
                    yield pid, event
            except (ContextLengthError, CacheFullError) as e:
                yield pid, Error.of(e)

    def solve_many(self, problems: Iterable[str | dict], out: str | Path | None = None, *,
                   max_concurrent: int | None = None, progress: bool = True, **options) -> list[dict]:
        """Solve each problem (a string, or a dict with `problem` and an optional `id`),
        concurrently where the engine can (see `stream_many`); one JSON line per result appended
        to `out` as each finishes, whose finished ids are skipped (a rerun resumes).
        options: those of `solve`. Returns every problem's record, in input order."""
        from .batch import run_batch

        def solve_all(todo):
            for pid, event in self.stream_many([{"id": pid, "problem": text} for pid, text in todo],
                                               max_concurrent=max_concurrent, **options):
                if isinstance(event, Done):
                    yield pid, event.result()
                elif isinstance(event, Error):
                    yield pid, error_of(event)

        return run_batch(solve_all, problems, out, progress)


def error_of(event: Error) -> Exception:
    """The exception an Error event stands for (ContextLengthError or CacheFullError)."""
    cls = {"ContextLengthError": ContextLengthError, "CacheFullError": CacheFullError}.get(event.error,
                                                                                          RuntimeError)
    return cls(event.message)
