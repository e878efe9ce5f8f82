"""Jobs: what runs one request over its sessions, written once for a session alone and for the
scheduler that batches many.

A job is a generator. It yields `NeedPass(session)` when it wants one forward pass of that
session (it gets the session's new tokens back, or the pass's error thrown in), and yields
anything else (events) to whoever runs it; its return value is its result. `run_alone`
runs a job by stepping its sessions one at a time (`session.step()`); the scheduler steps
the sessions of all its jobs together, one shared pass at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generator, Iterator

from . import heap

Job = Generator[Any, Any, Any]


@dataclass(frozen=True)
class NeedPass:
    """A job's request: one forward pass of `session`."""

    session: Any


def run_alone(job: Job) -> Iterator[Any]:
    """Run a job by stepping each session it names by itself; yields the job's other items.
    The job's return value is the StopIteration value of this generator too."""
    try:
        with heap.settled():
            item = next(job)
            while True:
                if isinstance(item, NeedPass):
                    try:
                        new = item.session.step()
                    except BaseException as e:
                        item = job.throw(e)
                        continue
                    item = job.send(new)
                else:
                    yield item
                    item = next(job)
    except StopIteration as stop:
        return stop.value
    finally:
        job.close()  # a consumer that stopped early: the job's own clean-up runs (its sessions close)


def result_of(job: Job) -> Any:
    """Run a job alone to its end, dropping its events; its return value."""
    items = run_alone(job)
    while True:
        try:
            next(items)
        except StopIteration as stop:
            return stop.value
