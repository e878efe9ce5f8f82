"""Many problems on one in-process engine: each a job of the scheduler, all in shared passes."""

from __future__ import annotations

from functools import partial
from typing import Any, Iterator

from .core.events import Error, Event
from .core.sampling_params import per_worker
from .errors import CacheFullError, ContextLengthError, check_int
from .jobs import Job
from .scheduler import Failed, Finished, Scheduler
from .streaming import event_job

SKIPPABLE = (ContextLengthError, CacheFullError)  # a problem that cannot run; the others go on


def start_events(engine: Any, problem: str, workers: int, options: dict) -> Job:
    """Open a session whose passes write its prompt; the job that streams its events."""
    return event_job(engine.start(problem, workers, write_prompt=False, **options))


def scheduled_events(engine: Any, items: list[tuple[str | int, str]], workers: int, max_concurrent: int | None,
                     options: dict) -> Iterator[tuple[str | int, Event]]:
    """(id, event) of every problem, run by one scheduler on `engine` (see EngineFront.stream_many)."""
    check_int("workers", workers, 1)
    check_int("max_tokens", options.get("max_tokens"), 1, none="")
    check_int("max_steps", options.get("max_steps"), 1, none="")
    per_worker(options.get("sampling"), workers)  # bad sampling fails before anything runs
    fit = {k: v for k, v in options.items() if k not in ("sampling", "max_steps")}
    scheduler = Scheduler(engine, max_concurrent)
    engine.schedulers.append(scheduler)
    try:
        for pid, text in items:
            try:
                scheduler.submit(pid, partial(start_events, engine, text, workers, options),
                                 engine.request_pages(text, workers, **fit))
            except SKIPPABLE as e:
                yield pid, Error.of(e)
        for pid, item in scheduler:
            if isinstance(item, Failed):
                if not isinstance(item.error, SKIPPABLE):
                    raise item.error
                yield pid, Error.of(item.error)
            elif not isinstance(item, Finished):
                yield pid, item
    finally:
        scheduler.close()
        engine.schedulers.remove(scheduler)
