"""Where a session's passes run: layout changes, the forward pass and sampling.

The session decides what every worker feeds; an executor makes it happen. Both steps of
a pass are layout operations first (pure logic, replayed identically wherever a copy of
the layout lives) and device work second. `LocalExecutor` does both in this process; a
distributed executor sends the same (finishing, fed) message to every shard, and each
shard replays it on its own copy of the layout with its slice of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .layout import Block, CacheLayout, WriteStep
from .sampling import Sampler, SamplingParams
from .transfer import to_device

if TYPE_CHECKING:
    from .engine import HogwildEngine
    from .model.graphs import Staged


PREFILL_CHUNK = 2048


class LocalExecutor:
    """Runs passes on the engine's model and K/V pool, in process."""

    def __init__(self, engine: HogwildEngine, layout: CacheLayout, params: list[SamplingParams]) -> None:
        self.engine, self.layout = engine, layout
        self.sampler = Sampler(params, engine.device)
        self.logits: torch.Tensor | None = None  # [fed workers, vocab] of the last pass
        self._last = torch.full((layout.workers, engine.spec.vocab_size), float("nan"), device=engine.device)
        self._ahead: Ahead | None = None  # the next pass's plan, staged on a guess

    def prefill(self, block: Block, ids: list[int]) -> None:
        """Write a shared constant block (the prompt, a header) once for everyone, in passes of
        at most PREFILL_CHUNK tokens (a long prompt's activations and attention partials stay small)."""
        self._ahead = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            step = self.layout.write_shared(block, ids[start : start + PREFILL_CHUNK])
            self.engine.cache.copy_pages(self.layout.take_copies())
            self.engine.run_forward([step])

    def finish_steps(self, workers: list[int]) -> None:
        """Move finished steps to the end of the shared history, re-rotating keys once."""
        if workers:
            self._ahead = None
        for w in workers:
            reloc = self.layout.finish_step(w)
            self.engine.cache.copy_pages(self.layout.take_copies())
            if reloc is not None:
                self.engine.cache.relocate(reloc, self.engine.decoder.inv_freq)
                self.layout.release(reloc)

    def run(self, fed: dict[int, list[int]], greedy: bool) -> tuple[list[WriteStep], list[int]]:
        """One forward pass; the sampled token of each fed worker, in plan order.

        While the device runs it, the next pass's attention plan is staged on the guess that
        every worker fed now feeds one token next and nothing else changes (the common decode
        step); the next run uses it only if that came true."""
        ahead, self._ahead = self._ahead, None
        steps = self.layout.plan(fed)
        copies = self.layout.take_copies()
        self.engine.cache.copy_pages(copies)
        order = [s.worker for s in steps]
        staged = ahead.ticket if ahead is not None and not copies and ahead.came_true(steps) else None
        table = self.sampler.table(order, greedy)
        self.logits, tokens = self.engine.run_forward(steps, table, staged)
        self._last.index_copy_(0, to_device(order, self.engine.device), self.logits)  # on the device, no sync
        self._ahead = self._stage_next(steps, table.mode)
        return steps, tokens.tolist()  # the one host sync

    def _stage_next(self, steps: list[WriteStep], mode: str) -> Ahead | None:
        if self.engine.graphs is None or any(len(s.tokens) != 1 for s in steps):
            return None
        views = self.layout.preview([s.worker for s in steps])
        if views is None:
            return None
        ticket = self.engine.stage_decode(views, mode)
        if ticket is None:
            return None
        return Ahead([s.worker for s in steps], [pos for pos, _ in views], ticket)

    def last_logits(self) -> torch.Tensor:
        """[workers, vocab]: each worker's logits from the last pass it was fed in."""
        return self._last

    def fork(self, layout: CacheLayout) -> LocalExecutor:
        """An executor for a forked layout: the same seeds, draw counts and last logits, then apart."""
        self._ahead = None  # shared pages: this layout's next writes copy on write
        twin = LocalExecutor(self.engine, layout, self.sampler.params)
        twin.sampler = self.sampler.copy()
        twin.logits, twin._last = self.logits, self._last.clone()
        return twin

    def close(self) -> None:
        self._ahead = None
        self.layout.close()


@dataclass
class Ahead:
    """A staged guess: the workers of the next pass (one token each) and their view positions."""

    workers: list[int]
    positions: list[int]
    ticket: Staged

    def came_true(self, steps: list[WriteStep]) -> bool:
        return ([s.worker for s in steps] == self.workers and all(len(s.tokens) == 1 for s in steps)
                and [s.position for s in steps] == self.positions)
