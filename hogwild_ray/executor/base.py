"""The executor seam: a forward pass carries the inputs of any number of sessions.

Sessions decide what every worker feeds; an executor makes it happen. Each session's part
of a pass is layout operations first (pure logic, replayed identically wherever a copy of
the layout lives) and device work second. The order of those operations is fixed so that
every copy of the page allocator hands out the same pages: a session's finished steps are
moved when it reports them (`finish_steps`), and a pass then plans each session's writes
in the order the pass lists them. `LocalExecutor` does it all in this process; the Ray
executor sends the same operations to every shard, which replays them on its copies.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable


@dataclass(frozen=True)
class Foresight:
    """A session's next pass as the tokens fed in the current one foresee it (found while the
    device runs that pass): the workers that will feed the token they sample now, and those
    whose finished step moved, with the header each feeds instead. It comes true unless one of
    those samples is in `stop_ids` (it ends its worker's text) or something the session cannot
    foresee comes first: an injection, a session joining the pass, a fork or a close."""

    samples: tuple[int, ...]
    headers: dict[int, tuple[int, ...]]
    stop_ids: frozenset[int]

    def counts(self) -> dict[int, int]:
        """Tokens each worker feeds next: one, or its header's."""
        return {**{w: 1 for w in self.samples}, **{w: len(h) for w, h in self.headers.items()}}

    def fed(self, sampled: dict[int, int]) -> dict[int, list[int]] | None:
        """The next pass's `SessionPass.fed` given this pass's samples; None if one ends its worker."""
        if any(sampled[w] in self.stop_ids for w in self.samples):
            return None
        return {**{w: [sampled[w]] for w in self.samples}, **{w: list(h) for w, h in self.headers.items()}}

    def plain(self) -> list:
        """As plain lists, for a step message (the Ray shards launch ahead from it too)."""
        return [list(self.samples), [[w, list(h)] for w, h in self.headers.items()], sorted(self.stop_ids)]

    @classmethod
    def from_plain(cls, plain: list) -> Foresight:
        samples, headers, stop_ids = plain
        return cls(tuple(int(w) for w in samples), {int(w): tuple(int(t) for t in h) for w, h in headers},
                   frozenset(int(t) for t in stop_ids))


WhileRunning = Callable[[set[int]], dict[int, Foresight | None] | None]  # see Executor.run

if TYPE_CHECKING:
    import torch

    from ..core.layout import Block, CacheLayout, WriteStep
    from ..core.sampling_params import SamplingParams


@dataclass(frozen=True)
class SessionPass:
    """One session's part of a forward pass: chunks of its shared prompt blocks still to write
    (block name, ids; written first, in order), each fed worker's tokens, and whether every
    worker of it decodes greedily this pass (the finisher)."""

    session: int
    fed: dict[int, list[int]] = field(default_factory=dict)
    greedy: bool = False
    prefill: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def rows(self) -> int:
        """Query tokens this part adds to the pass."""
        return sum(len(ids) for _, ids in self.prefill) + sum(len(t) for t in self.fed.values())


def plan_session(layout: CacheLayout, p: SessionPass) -> tuple[list[WriteStep], list[WriteStep]]:
    """A session's writes of a pass, planned on its layout: the prompt chunks, then the workers'."""
    shared = [layout.write_shared(getattr(layout, block), list(ids)) for block, ids in p.prefill]
    return [s for s in shared if s is not None], layout.plan(p.fed) if p.fed else []


class Executor(ABC):
    """Runs the passes of every session of one engine."""

    @abstractmethod
    def open(self, layout: CacheLayout, params: list[SamplingParams]) -> int:
        """Register a session's layout and per-worker sampling; its id."""

    @abstractmethod
    def prefill(self, session: int, block: Block, ids: list[int]) -> None:
        """Write a shared constant block (the prompt, a header) once for all of a session's workers."""

    @abstractmethod
    def finish_steps(self, session: int, workers: list[int]) -> None:
        """Move these workers' finished steps to the end of the session's shared history."""

    @abstractmethod
    def run(self, passes: list[SessionPass], while_running: WhileRunning | None = None
            ) -> dict[int, tuple[list[WriteStep], list[int]] | Exception]:
        """One forward pass for all the given sessions; per session, its planned worker writes
        and the sampled token of each fed worker, in plan order; or the error that kept it out
        of the pass (a full cache while planning its writes: the others run, it must close).
        while_running(sessions in the pass): called once the pass is under way and before its
        tokens are read, so that host work which needs only the pass's inputs overlaps the
        device; it must not raise. It may return, per session, its next pass as foreseen
        (`Foresight`, or None where it cannot be foreseen): the executor may stage that pass's
        plan, and launch the pass itself right behind this one, fed its samples on the device,
        before the sessions ask for it (it is dropped, unused, when they ask for anything else)."""

    @abstractmethod
    def last_logits(self, session: int) -> torch.Tensor:
        """[workers, vocab]: each of the session's workers' logits from the last pass it was fed in."""

    @abstractmethod
    def close(self, session: int) -> torch.Tensor | None:
        """Forget the session and give its pages back; its last logits where they are at hand."""

    can_fork = False  # whether `fork` copies a session (the in-process executor)
    prelaunched = prelaunch_dropped = 0  # passes launched ahead of the sessions' asking: used, dropped
    holds_launched = False  # whether a pass launched ahead waits for the sessions to ask for it

    def fork(self, session: int, layout: CacheLayout) -> int:
        """Register a copy of a session over a forked layout (sharing its pages); the copy's id."""
        from ..errors import InvalidRequestError

        raise InvalidRequestError("fork() needs the in-process engine (backend='local')")

    def read_kv(self, pages: list[int]):
        """Every KV head's stored K and V of `pages` (float32 numpy), for inspection and the oracle."""
        raise NotImplementedError

    def handle(self, layout: CacheLayout, params: list[SamplingParams]) -> SessionHandle:
        """Open a session and return the handle it runs its passes through."""
        return SessionHandle(self, self.open(layout, params))


class SessionHandle:
    """One session's view of its engine's executor (its passes go through `session.run_pass`)."""

    def __init__(self, executor: Executor, session: int) -> None:
        self.executor, self.session = executor, session
        self.closed, self.final_logits = False, None  # what last_logits reads once closed

    def prefill(self, block: Block, ids: list[int]) -> None:
        self.executor.prefill(self.session, block, ids)

    def finish_steps(self, workers: list[int]) -> None:
        self.executor.finish_steps(self.session, workers)

    def last_logits(self) -> torch.Tensor:
        if self.closed:
            if self.final_logits is None:
                from ..errors import InvalidRequestError

                raise InvalidRequestError("this session is closed; read last_logits before it ends")
            return self.final_logits
        return self.executor.last_logits(self.session)

    @property
    def can_fork(self) -> bool:
        return self.executor.can_fork

    def fork(self, layout: CacheLayout) -> SessionHandle:
        """A handle for a forked layout: the same seeds, draw counts and last logits, then apart."""
        return SessionHandle(self.executor, self.executor.fork(self.session, layout))

    def read_kv(self, pages: list[int]):
        return self.executor.read_kv(pages)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.final_logits = self.executor.close(self.session)
