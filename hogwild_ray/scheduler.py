"""The scheduler: many jobs' sessions advance together, one shared forward pass at a time.

Requests queue with the pages they may need (hogwild_ray.core.scheduling.Admission: first
come, first served, reservations; a session that outgrows its reservation, e.g. by many
short steps and their headers, has it raised, and a newcomer must also fit the pool's free
pages beyond what the running sessions may still take); an admitted request's job starts
at once, and its
session writes its prompt in chunks that share a per-pass budget with the other newcomers,
so a long prompt stalls the running sessions for at most one chunk per pass. Every pass
holds one part of every running job that asked for one (its decode rows, or a prompt
chunk); a job that ends hands its reservation to the next request in the same breath.
Where the executor launched the next pass ahead (on a GPU), a newcomer joins one pass
later: the running sessions take the launched pass, and the one after is not launched
ahead, so that no pass is computed for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator

from . import heap
from .core.scheduling import PREFILL_CHUNK, Admission
from .errors import CacheFullError, check_int
from .jobs import Job, NeedPass
from .session import run_pass


def pages_held(session: Any) -> int:
    """The pages a session's layout holds now (those it shares counted too)."""
    return sum(len(b.pages) for b in session.layout.blocks())


@dataclass(frozen=True)
class Finished:
    """A job's end: its return value."""

    value: Any


@dataclass(frozen=True)
class Failed:
    """A job's end by an error (its sessions are closed)."""

    error: BaseException


class Scheduler:
    """Runs jobs (hogwild_ray.jobs) of one engine in shared passes. Iterate it to run them:
    it yields (key, item) for every event a job yields, then (key, Finished | Failed)."""

    def __init__(self, engine: Any, max_concurrent: int | None = None, prefill_chunk: int = PREFILL_CHUNK) -> None:
        check_int("max_concurrent", max_concurrent, 1, none="(no limit but the cache)")
        check_int("prefill_chunk", prefill_chunk, 1)
        pool = engine.allocator
        self.engine, self.prefill_chunk = engine, prefill_chunk
        self.admission: Admission[Hashable] = Admission(pool.free_pages, pool.page_size, max_concurrent)
        self.starts: dict[Hashable, Callable[[], Job]] = {}
        self.running: dict[Hashable, tuple[Job, NeedPass]] = {}

    @property
    def waiting(self) -> int:
        return len(self.admission.queue)

    def submit(self, key: Hashable, start: Callable[[], Job], pages: int) -> None:
        """Queue a request: `start()` opens its sessions and returns its job once it is admitted;
        `pages`: the most it may hold at once (CacheFullError now when that could never fit)."""
        if key in self.starts or key in self.running:
            raise ValueError(f"request {key!r} is already queued")
        self.admission.submit(key, pages)
        self.starts[key] = start

    def cancel(self, key: Hashable) -> None:
        """Drop a request: a waiting one leaves the queue, a running one's job is closed (its
        sessions give their pages back before the next pass)."""
        self.starts.pop(key, None)
        entry = self.running.pop(key, None)
        if entry is not None:
            entry[0].close()
        self.admission.drop(key)

    def _free_beyond_reservations(self) -> int:
        """The pool's free pages less what the running sessions may still take."""
        held = sum(pages_held(entry[1].session) for entry in self.running.values())
        return self.engine.allocator.free_pages - max(0, self.admission.reserved - held)

    def __iter__(self) -> Iterator[tuple[Hashable, Any]]:
        try:
            with heap.settled():
                yield from self._run()
        finally:
            self.close()

    def _run(self) -> Iterator[tuple[Hashable, Any]]:
        while self.running or self.admission.queue:
            yield from self.round()

    def round(self) -> Iterator[tuple[Hashable, Any]]:
        """Admit what fits, then run one shared pass of every running job (nothing when idle).
        A server calls it again and again, submitting and cancelling between rounds."""
        free = self._free_beyond_reservations()
        # a pass launched ahead holds only the running sessions, and a newcomer's prompt would drop
        # it unused: they take it, and the newcomers join the next pass (launched when asked)
        defer = bool(self.running) and self.admission.head_fits(free) and self._holds_launched()
        for key in [] if defer else self.admission.admit(free):
            yield from self._advance(key, None, first=True)
        if not self.running:
            if self.admission.queue:  # nothing runs and the head does not fit: pages held elsewhere
                head = self.admission.queue[0]
                free = self.engine.allocator.free_pages
                self.starts.pop(head.key, None)
                self.admission.drop(head.key)
                yield head.key, Failed(CacheFullError(
                    f"this request may need {head.pages} pages and the cache has {free} free beside the "
                    "engine's other sessions; close them, or lower workers or max_tokens"))
            return
        keys = list(self.running)
        sessions = [self.running[k][1].session for k in keys]
        results = run_pass(sessions, prefill_budget=self.prefill_chunk, launch_ahead=not defer)
        for key, session in zip(keys, sessions):
            self.admission.grow(key, pages_held(session) + len(session.workers) + 3)
            if key in self.running:  # still there (no earlier job of this pass cancelled it)
                yield from self._advance(key, results[session])

    def _holds_launched(self) -> bool:
        """Whether the engine's executor holds a pass launched ahead of the sessions' asking."""
        return bool(getattr(getattr(self.engine, "executor", None), "holds_launched", False))

    def _advance(self, key: Hashable, value: Any, first: bool = False) -> Iterator[tuple[Hashable, Any]]:
        """Resume a job with its pass's result (or start it) until it asks for the next pass or ends."""
        try:
            if first:
                job = self.starts.pop(key)()
                item = next(job)
            else:
                job = self.running[key][0]
                item = job.throw(value) if isinstance(value, BaseException) else job.send(value)
            while not isinstance(item, NeedPass):
                yield key, item
                item = next(job)
            self.running[key] = (job, item)
        except StopIteration as stop:
            self._end(key)
            yield key, Finished(stop.value)
        except Exception as e:
            self._end(key)
            yield key, Failed(e)

    def _end(self, key: Hashable) -> None:
        self.running.pop(key, None)
        self.admission.finish(key)

    def close(self) -> None:
        """Close every job (their sessions give their pages back) and forget the queue."""
        for key in list(self.running):
            self.cancel(key)
        for key in list(self.starts):
            self.cancel(key)
