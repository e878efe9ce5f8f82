"""RemoteSession: the driver's handle on a session that runs in the coordinator actor.

It has a Session's surface (step, last_views, last_steps, last_logits, text, stats,
workers, done, answer, result, close). Each `step()` is one actor call whose reply carries
the new tokens and what changed (stats, statuses, the workers' new stream tokens), so
progress displays read a local mirror; views and logits are fetched once per step, on demand.
A session dropped without close() is closed in the coordinator by a finalizer (which holds
the engine and the id, never the session): its pages do not stay taken.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..cache import KVPool
from ..core.layout import WriteStep
from ..core.results import SolveResult
from ..prompt_text import encode_text

if TYPE_CHECKING:
    from .coordinator import SessionState
    from .engine import RayHogwildEngine


@dataclass
class WorkerView:
    """A worker as the driver sees it: its status and everything it wrote."""

    status: str = "active"
    stream: list[int] = field(default_factory=list)


class RemoteSession:
    """Use `RayHogwildEngine.start`; forwards to the coordinator's Session with id `sid`."""

    def __init__(self, engine: RayHogwildEngine, sid: int, prompt_ids: list[int], state: SessionState) -> None:
        self.engine, self.sid, self.prompt_ids = engine, sid, prompt_ids
        self.workers = [WorkerView() for _ in state.statuses]
        self._views: tuple[list[list[int]], dict[int, WriteStep]] | None = None
        self._logits: torch.Tensor | None = None
        self._finalizer = weakref.finalize(self, _abandoned, engine, sid)
        self._finalizer.atexit = False  # at exit the engine's own close() frees everything
        self._apply(state)

    def _apply(self, state: SessionState) -> None:
        self.done, self.answer, self.stats = state.done, state.answer, state.stats
        if self.done:  # the coordinator closed it: nothing left to give back
            self._finalizer.detach()
        for ws, status, tail in zip(self.workers, state.statuses, state.stream_tails):
            ws.status = status
            ws.stream.extend(tail)

    def _call(self, method: str, *args: Any) -> Any:
        return self.engine._call(method, self.sid, *args)

    # ---- the step ----------------------------------------------------------------------
    def step(self, inject: dict[int, str] | None = None) -> dict[int, list[int]]:
        """One forward pass of all active workers (in the coordinator); each worker's new tokens."""
        self._views = self._logits = None
        try:
            new, state = self._call("step", inject)
        except BaseException:
            try:
                self._refresh()
            except Exception:  # the step's error is the one to report
                pass
            raise
        self._apply(state)
        return new

    def run_steps(self, steps: int) -> list[float]:
        """Up to `steps` steps in the coordinator with one call (no driver round trip per step);
        each step's seconds there. For batch use and for timing the coordinator's own loop."""
        self._views = self._logits = None
        times, state = self._call("run_steps", steps)
        self._apply(state)
        return times

    def _refresh(self) -> None:
        """After a failed step: mirror what the coordinator's session became (it may have closed)."""
        if self.engine.coordinator is None:
            self.done = True
            return
        self._apply(self._call("state"))

    # ---- views -------------------------------------------------------------------------
    def _fetch_views(self) -> tuple[list[list[int]], dict[int, WriteStep]]:
        if self._views is None:
            self._views = self._call("views")
        return self._views

    @property
    def last_views(self) -> list[list[int]]:
        """Flat token ids each worker's last logits were computed from (own fed tokens included)."""
        return self._fetch_views()[0]

    @property
    def last_steps(self) -> dict[int, WriteStep]:
        """The layout's record of each worker's last pass (a copy from the coordinator)."""
        return dict(self._fetch_views()[1])

    @property
    def last_logits(self) -> torch.Tensor:
        """[workers, vocab]: each worker's logits from the last pass it was fed in."""
        if self._logits is None:
            self._logits = self._call("logits")
        return self._logits

    def stored_kv(self) -> KVPool:
        """A float32 CPU copy of the K/V pool, all KV heads, holding the pages the last pass read."""
        pages, kv = self._call("stored_kv")
        spec, pool = self.engine.spec, self.engine.allocator
        cache = KVPool(spec.num_layers, pool.num_pages, pool.page_size, spec.num_kv_heads, spec.head_dim,
                       torch.float32, torch.device("cpu"))
        kv = torch.tensor(kv)  # a copy: arrays from the object store are read-only
        cache.k[:, pages], cache.v[:, pages] = kv[0], kv[1]
        return cache

    @property
    def tok(self) -> Any:
        return self.engine.tokenizer

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tok, text)  # special-token strings stay text, as in-process

    def text(self, w: int) -> str:
        return self.tok.decode(self.workers[w].stream)

    # ---- the end -----------------------------------------------------------------------
    def result(self) -> SolveResult:
        return self._call("result")

    def close(self) -> None:
        """Give the session's cache pages back (idempotent; a no-op once the engine is closed)."""
        self._finalizer.detach()
        if self.engine.coordinator is not None:
            state = self._call("close_session")
            if state is not None:
                self._apply(state)
        self.done = True


def _abandoned(engine: RayHogwildEngine, sid: int) -> None:
    """A RemoteSession's finalizer: the coordinator closes session `sid` (a newer one is left alone)."""
    try:
        engine._abandon(sid)
    except Exception:  # a finalizer must not raise; at worst the next start() frees the pages
        pass
