"""A serving loop whose engine is on Ray (tensor-parallel shards behind a coordinator actor).

The coordinator runs the real ServingLoop (hogwild_ray.serving_loop) beside its shards; this
object, in the server's replica, has the same methods (size, submit, cancel, alive, close), so
the replica does not care where the engine is. Requests go to the coordinator as actor calls;
a poller thread fetches every request's new items in one call per round (waiting up to
POLL_WAIT_S for one) and hands each to its request's sink.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Hashable

from ..errors import HogwildError
from ..scheduler import Failed, Finished
from ..serving_loop import RequestSize

POLL_WAIT_S = 0.02  # a poll holds the coordinator's call thread this long at most when nothing is new


class RemoteServingLoop:
    """ServingLoop's interface over a RayHogwildEngine's coordinator."""

    def __init__(self, engine: Any, max_concurrent: int | None = None) -> None:
        self.engine = engine
        self.error: BaseException | None = None
        self._sinks: dict[Hashable, Callable[[Any], None]] = {}
        self._lock = threading.Lock()  # one coordinator call at a time from this process
        self._closed = threading.Event()
        self._call("serve_open", max_concurrent)
        self._thread = threading.Thread(target=self._poll, name="hogwild-remote-serving", daemon=True)
        self._thread.start()

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            return self.engine._call(method, *args)

    def size(self, problem: str, workers: int, options: dict) -> RequestSize:
        prompt, pages = self._call("serve_size", problem, workers, options)
        return RequestSize(prompt, pages)

    def submit(self, key: Hashable, problem: str, workers: int, options: dict, pages: int,
               sink: Callable[[Any], None]) -> None:
        if not self.alive:
            raise HogwildError(f"the engine stopped serving: {self.error!r}")
        self._sinks[key] = sink
        try:
            self._call("serve_submit", key, problem, workers, options, pages)
        except BaseException:
            self._sinks.pop(key, None)
            raise

    def cancel(self, key: Hashable) -> None:
        self._sinks.pop(key, None)
        if self.alive:
            self._call("serve_cancel", key)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None and not self._closed.is_set()

    def close(self, timeout: float = 30.0) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._thread.join(timeout)
        try:
            if self.engine.coordinator is not None:
                self._call("serve_close")
        except HogwildError:  # the engine is gone already
            pass

    def _poll(self) -> None:
        try:
            while not self._closed.is_set():
                items, running = self._call("serve_poll", POLL_WAIT_S)
                for key, item in items:
                    sink = self._sinks.get(key)
                    if sink is None:
                        continue
                    if isinstance(item, (Finished, Failed)):
                        self._sinks.pop(key, None)
                    try:
                        sink(item)
                    except RuntimeError:  # the request's event loop is gone
                        self._sinks.pop(key, None)
                if not running:
                    raise HogwildError("the coordinator's serving loop stopped")
        except BaseException as e:  # the coordinator or a shard failed: every waiting request hears it
            self.error = e
            for key, sink in list(self._sinks.items()):
                try:
                    sink(Failed(e))
                except RuntimeError:
                    pass
            self._sinks.clear()
