"""Where a session's passes run: layout changes, the forward pass and sampling.

The session decides what every worker feeds; an executor makes it happen. Both steps of
a pass are layout operations first (pure logic, replayed identically wherever a copy of
the layout lives) and device work second. `LocalExecutor` does both in this process; a
distributed executor sends the same (finishing, fed) message to every shard, and each
shard replays it on its own copy of the layout with its slice of the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .layout import Block, CacheLayout, WriteStep
from .sampling import Sampler, SamplingParams
from .transfer import to_device

if TYPE_CHECKING:
    from .engine import HogwildEngine


PREFILL_CHUNK = 2048


class LocalExecutor:
    """Runs passes on the engine's model and K/V pool, in process."""

    def __init__(self, engine: HogwildEngine, layout: CacheLayout, params: list[SamplingParams]) -> None:
        self.engine, self.layout = engine, layout
        self.sampler = Sampler(params, engine.device)
        self.logits: torch.Tensor | None = None  # [fed workers, vocab] of the last pass
        self._last = torch.full((layout.workers, engine.spec.vocab_size), float("nan"), device=engine.device)

    def prefill(self, block: Block, ids: list[int]) -> None:
        """Write a shared constant block (the prompt, a header) once for everyone, in passes of
        at most PREFILL_CHUNK tokens (a long prompt's activations and attention partials stay small)."""
        for start in range(0, len(ids), PREFILL_CHUNK):
            step = self.layout.write_shared(block, ids[start : start + PREFILL_CHUNK])
            self.engine.cache.copy_pages(self.layout.take_copies())
            self.engine.run_forward([step])

    def finish_steps(self, workers: list[int]) -> None:
        """Move finished steps to the end of the shared history, re-rotating keys once."""
        for w in workers:
            reloc = self.layout.finish_step(w)
            self.engine.cache.copy_pages(self.layout.take_copies())
            if reloc is not None:
                self.engine.cache.relocate(reloc, self.engine.decoder.inv_freq)
                self.layout.release(reloc)

    def run(self, fed: dict[int, list[int]], greedy: bool) -> tuple[list[WriteStep], list[int]]:
        """One forward pass; the sampled token of each fed worker, in plan order."""
        steps = self.layout.plan(fed)
        self.engine.cache.copy_pages(self.layout.take_copies())
        order = [s.worker for s in steps]
        self.logits, tokens = self.engine.run_forward(steps, self.sampler.table(order, greedy))
        self._last.index_copy_(0, to_device(order, self.engine.device), self.logits)  # on the device, no sync
        return steps, tokens.tolist()  # the one host sync

    def last_logits(self) -> torch.Tensor:
        """[workers, vocab]: each worker's logits from the last pass it was fed in."""
        return self._last

    def fork(self, layout: CacheLayout) -> LocalExecutor:
        """An executor for a forked layout: the same seeds, draw counts and last logits, then apart."""
        twin = LocalExecutor(self.engine, layout, self.sampler.params)
        twin.sampler = self.sampler.copy()
        twin.logits, twin._last = self.logits, self._last.clone()
        return twin

    def close(self) -> None:
        self.layout.close()
