"""RayExecutor: a session's passes run by the shard actors of a ShardedEngine.

It has LocalExecutor's interface. The coordinator keeps its own copy of the layout and
does the bookkeeping (plans, relocations, page releases) here; every shard replays the same
messages on its copy with its slice of the model, and rank 0 replies the sampled tokens.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..layout import Block, CacheLayout, WriteStep
from ..sampling import SamplingParams
from .errors import ChannelTimeoutError, ShardFailedError

if TYPE_CHECKING:
    from .sharded import ShardedEngine


def concrete(params: list[SamplingParams]) -> list[SamplingParams]:
    """Every worker with an explicit seed, so that all ranks sample identically."""
    return [p if p.seed is not None else dataclasses.replace(p, seed=random.randrange(2**63)) for p in params]


def _first_death(group, err: ShardFailedError) -> ShardFailedError:
    """When several ranks failed, name one whose actor died: the others' collectives broke because of it."""
    import ray
    from ray.exceptions import RayActorError

    if len(err.ranks) < 2:
        return err
    dead = []
    for ref, rank in group.loops.items():
        if rank in err.ranks:
            try:
                ray.get(ref, timeout=0)
            except RayActorError:
                dead.append(rank)
            except Exception:
                pass
    if not dead or min(dead) == min(err.ranks):
        return err
    return ShardFailedError(f"shard rank {min(dead)} failed: its actor died (the other ranks' errors follow "
                            f"from it; the first reported was: {err})", err.ranks)


class RayExecutor:
    """Runs passes on the engine's shard group; the layout bookkeeping stays in this process."""

    def __init__(self, engine: ShardedEngine, layout: CacheLayout, params: list[SamplingParams]) -> None:
        self.engine, self.layout = engine, layout
        self.params = concrete(params)
        self.logits: torch.Tensor | None = None
        self._finishing: list[int] = []
        self._closed = False
        self._call({"op": "start", "layout": layout.kind, "workers": layout.workers, "params": self.params})

    def _call(self, msg: dict[str, Any], meanwhile: Callable[[], None] | None = None) -> Any:
        """Send one message to every shard and gather rank 0's reply; a failed shard ends the group.

        `meanwhile` runs here after the send, while the shards work."""
        group = self.engine.group
        if group is None:
            raise ShardFailedError("the engine's shard group is closed (a shard failed earlier, or close() "
                                   "was called); open a new engine", [])
        try:
            group.send(msg)
            if meanwhile is not None:
                meanwhile()
            return group.gather()
        except ShardFailedError as e:
            cause = _first_death(group, e)
            self._closed = True
            self.engine.close()  # nothing of a broken group is reusable
            if cause is e:
                raise
            raise cause from e
        except ChannelTimeoutError:
            self._closed = True
            self.engine.close()
            raise

    def prefill(self, block: Block, ids: list[int]) -> None:
        """Write a shared constant block (the prompt, a header) once for everyone."""
        self.layout.write_shared(block, ids)
        self._call({"op": "prefill", "block": block.name, "ids": list(ids)})

    def finish_steps(self, workers: list[int]) -> None:
        """Bookkeeping here; the shards move the K/V with the next run message."""
        for w in workers:
            reloc = self.layout.finish_step(w)
            if reloc is not None:
                self.layout.release(reloc)
        self._finishing.extend(workers)

    def run(self, fed: dict[int, list[int]], greedy: bool) -> tuple[list[WriteStep], list[int]]:
        """One forward pass on every shard; the sampled token of each fed worker, in plan order.

        When the free pages surely cover this pass, this process plans its copy of the layout
        while the shards run it; otherwise it plans first, so that a full cache raises
        CacheFullError here before any shard has seen the step."""
        finishing, self._finishing = self._finishing, []
        msg = {"op": "run", "finishing": finishing, "fed": {w: list(t) for w, t in fed.items()}, "greedy": greedy}
        page = self.layout.allocator.page_size
        worst_pages = sum(len(t) // page + 2 for t in fed.values())
        planned: list[list[WriteStep]] = []
        if worst_pages > self.layout.allocator.free_pages:
            planned.append(self.layout.plan(fed))
            tokens = self._call(msg)
        else:
            tokens = self._call(msg, meanwhile=lambda: planned.append(self.layout.plan(fed)))
        self.logits = None
        return planned[0], list(tokens)

    def last_logits(self) -> torch.Tensor:
        """[workers, vocab] from rank 0 (one message per worker); NaN rows for workers never fed."""
        if self.logits is None:
            rows = [torch.from_numpy(np.asarray(self._call({"op": "logits", "worker": w})))
                    for w in range(self.layout.workers)]
            self.logits = torch.stack(rows)
        return self.logits

    def read_kv(self, pages: list[int]) -> np.ndarray:
        """Every KV head's stored K and V of `pages`: [2, layers, len(pages), page_size, kv heads, head_dim]
        (float32, gathered from the ranks on rank 0; for inspection and the oracle, not the hot path)."""
        return np.asarray(self._call({"op": "kv", "pages": list(pages)}))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.engine.group is not None:
                self._call({"op": "end"})
        self.layout.close()
