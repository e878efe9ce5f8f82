"""One engine's scheduler, run for ever in a thread of its own: a server's requests join the
next shared forward pass whenever they arrive.

The scheduler (hogwild_ray.scheduler) runs one pass at a time and is not thread-safe, while
requests come and go on the server's event loop at any moment. So submissions and
cancellations go through a queue that the loop's thread drains between passes, and each
request's events go back through the callback it gave (which hands them to its own event
loop). A cancelled request's sessions close before the next pass: a client that goes away
frees its pages within one pass.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Hashable

from . import heap
from .errors import CacheFullError, HogwildError
from .jobs import Job
from .many import start_events
from .scheduler import Failed, Finished, Scheduler

Sink = Callable[[Any], None]


@dataclass(frozen=True)
class Admitted:
    """A request's sessions opened: it runs from the next pass on (it waited until now)."""


@dataclass(frozen=True)
class RequestSize:
    prompt_tokens: int
    pages: int


class ServingLoop:
    """Runs `engine`'s requests in shared passes on a thread of its own until `close()`."""

    def __init__(self, engine: Any, max_concurrent: int | None = None, idle_wait_s: float = 0.05) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine, max_concurrent)
        self.idle_wait_s = idle_wait_s
        self.error: BaseException | None = None  # what stopped the loop, if anything did
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[Hashable, Sink] = {}
        self._closed = threading.Event()
        self._closing = threading.Lock()  # a submission is queued before the loop ends, or refused
        engine.schedulers.append(self.scheduler)
        self._thread = threading.Thread(target=self._loop, name="hogwild-serving-loop", daemon=True)
        self._thread.start()

    # ---- any thread ------------------------------------------------------------------------
    def size(self, problem: str, workers: int, options: dict) -> RequestSize:
        """The request's prompt tokens and the pages it may hold; raises what makes it impossible
        (a prompt longer than the context, more pages than the whole cache, bad options)."""
        fit = {k: v for k, v in options.items() if k not in ("sampling", "max_steps")}
        prompt, pages = self.engine.request_size(problem, workers, **fit)
        total = self.engine.allocator.num_pages
        if pages > total:
            raise CacheFullError(f"this request may need {pages} K/V pages and the whole cache has {total}; "
                                 "lower workers or max_tokens (or serve with a larger cache)")
        return RequestSize(prompt, pages)

    def submit(self, key: Hashable, problem: str, workers: int, options: dict, pages: int, sink: Sink) -> None:
        """Queue one session's request (options: those of engine.start). From the loop's thread,
        `sink` gets Admitted, then every event of the session (hogwild_ray.core.events), then
        Finished or Failed (hogwild_ray.scheduler), and nothing after that."""
        self.submit_job(key, partial(start_events, self.engine, problem, workers, options), pages, sink)

    def submit_job(self, key: Hashable, start: Callable[[], Job], pages: int, sink: Sink) -> None:
        """Queue any job of the scheduler (hogwild_ray.jobs), e.g. an evaluation run with its
        forks: `start()` makes it in the loop's thread when its `pages` fit; `sink` hears as in
        `submit` (Finished carries the job's result)."""
        with self._closing:
            if self._closed.is_set():
                raise HogwildError(self._refusal())
            self._commands.put(("submit", key, partial(self._start, sink, start), pages, sink))

    def cancel(self, key: Hashable) -> None:
        """End a request: it leaves the queue, or its sessions close before the next pass."""
        self._commands.put(("cancel", key))

    def _refusal(self) -> str:
        if self.error is None:
            return "the serving loop is closed"
        return f"the engine stopped serving after an error: {type(self.error).__name__}: {self.error}".splitlines()[0]

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop after its pass (every running request ends with a Failed)."""
        self._closed.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)

    # ---- the loop's thread -----------------------------------------------------------------
    @staticmethod
    def _start(sink: Sink, start: Callable[[], Job]) -> Job:
        sink(Admitted())
        return start()

    def _loop(self) -> None:
        try:
            with heap.settled():
                while not self._closed.is_set():
                    self._drain(block=not (self.scheduler.running or self.scheduler.waiting))
                    for key, item in self.scheduler.round():
                        self._deliver(key, item)
        except BaseException as e:  # the engine broke: every request hears it, health checks too
            self.error = e
        finally:
            reason = self.error or HogwildError("the server is shutting down")
            with self._closing:  # from here every submission is refused; those queued hear why
                self._closed.set()
            for key in list(self._sinks):
                self._deliver(key, Failed(reason))
            self._refuse_queued(reason)
            self.scheduler.close()
            if self.scheduler in self.engine.schedulers:
                self.engine.schedulers.remove(self.scheduler)

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self.idle_wait_s) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _refuse_queued(self, reason: BaseException) -> None:
        """Submissions queued when the loop ended: each hears Failed (none waits for ever)."""
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "submit":
                _call(command[4], Failed(reason))

    def _apply(self, command: tuple) -> None:
        if command[0] == "submit":
            _, key, start, pages, sink = command
            try:
                self.scheduler.submit(key, start, pages)
            except (HogwildError, ValueError) as e:
                _call(sink, Failed(e))
                return
            self._sinks[key] = sink
        elif command[0] == "cancel":
            key = command[1]
            self._sinks.pop(key, None)
            self.scheduler.cancel(key)

    def _deliver(self, key: Hashable, item: Any) -> None:
        sink = self._sinks.get(key)
        if sink is None:
            return
        if isinstance(item, (Finished, Failed)):
            del self._sinks[key]
        if not _call(sink, item):  # the request's event loop is gone: nobody waits for it
            self._sinks.pop(key, None)
            self.scheduler.cancel(key)


def _call(sink: Sink, item: Any) -> bool:
    try:
        sink(item)
        return True
    except RuntimeError:  # call_soon_threadsafe on a closed event loop
        return False
