"""Tensor parallelism of the decoder: which slice of every weight a rank holds, and the
two collectives it needs (Megatron-style: column-parallel QKV and gate/up, row-parallel
o_proj and down_proj, vocab-parallel embedding and LM head).

When a model has fewer KV heads than ranks, each rank holds one KV head, replicated across
the ranks whose query heads read it (vLLM's rule), so attention never crosses ranks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModelError
from .spec import ModelSpec


@dataclass
class TensorParallel:
    """One rank of a tensor-parallel group; group=None is the default process group.

    timed=True adds up the time spent in the collectives (see `collective_seconds`): CUDA
    event pairs on a GPU, read only when the total is asked for, perf_counter on the CPU.
    Off (the default) the collectives run with nothing around them.
    """

    rank: int = 0
    world: int = 1
    group: object | None = None
    timed: bool = False
    _events: list = field(default_factory=list, repr=False)  # (start, end) CUDA event pairs not read yet
    _seconds: float = field(default=0.0, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks."""
        if self.world > 1:
            import torch.distributed as dist

            start = self._start(x) if self.timed else None
            dist.all_reduce(x, group=self.group)
            if start is not None:
                self._stop(x, start)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated along the last dimension in rank order."""
        if self.world == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        start = self._start(x) if self.timed else None
        dist.all_gather(parts, x, group=self.group)
        if start is not None:
            self._stop(x, start)
        return torch.cat(parts, dim=-1)

    def collective_seconds(self, reset: bool = True) -> float:
        """Seconds spent in collectives since the last reset (waits for the GPU's recorded ones)."""
        if self._events:
            self._events[-1][1].synchronize()
            self.fold_finished()  # all of them, now
        total = self._seconds
        if reset:
            self._seconds = 0.0
        return total

    def fold_finished(self) -> None:
        """Add the recorded collectives the GPU has finished to the total, without waiting for the
        rest (a pass launched ahead keeps running): recorded events do not pile up."""
        done = 0
        for _, end in self._events:
            if not end.query():
                break
            done += 1
        if done:
            self._seconds += sum(a.elapsed_time(b) for a, b in self._events[:done]) / 1e3
            del self._events[:done]

    def _start(self, x: torch.Tensor) -> object:
        if x.device.type != "cuda":
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():  # a graph replays its collectives untimed
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _stop(self, x: torch.Tensor, start: object) -> None:
        if x.device.type != "cuda":
            self._seconds += time.perf_counter() - start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._events.append((start, end))


@dataclass(frozen=True)
class ShardPlan:
    """This rank's slices: query heads, KV heads, MLP intermediate and vocab rows.

    The vocab is cut into `world` equal slices of `vocab_per_rank` rows; the last one is
    padded with zero rows, so logits gather to `world * vocab_per_rank` and are cut back.
    """

    rank: int
    world: int
    q_heads: range
    kv_heads: range
    intermediate: range
    vocab: range  # rows of the padded vocab this rank holds
    vocab_size: int  # the model's real vocab

    @property
    def vocab_per_rank(self) -> int:
        return len(self.vocab)

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The spec with this rank's head and MLP sizes (what the decoder and K/V pool see)."""
        from dataclasses import replace

        return replace(spec, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads),
                       intermediate_size=len(self.intermediate))


def _fits(spec: ModelSpec, world: int) -> bool:
    kv = spec.num_kv_heads
    return (spec.num_heads % world == 0 and spec.intermediate_size % world == 0
            and (kv % world == 0 if kv >= world else world % kv == 0))


def valid_tp_sizes(spec: ModelSpec) -> list[int]:
    """Every tensor-parallel degree this model can be split into."""
    return [w for w in range(1, spec.num_heads + 1) if _fits(spec, w)]


def shard_plan(spec: ModelSpec, rank: int, world: int) -> ShardPlan:
    """This rank's slices; UnsupportedModelError (naming the valid degrees) if the model does not split."""
    if not isinstance(world, int) or world < 1 or not isinstance(rank, int) or not 0 <= rank < world:
        raise UnsupportedModelError(f"tensor-parallel rank {rank!r} of world size {world!r}: need 0 <= rank < world")
    hq, hkv, inter = spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    if not _fits(spec, world):
        why = []
        if hq % world:
            why.append(f"{hq} query heads are not divisible by {world}")
        if hkv >= world and hkv % world:
            why.append(f"{hkv} KV heads are not divisible by {world}")
        if hkv < world and world % hkv:
            why.append(f"{world} is not a multiple of the {hkv} KV heads (to replicate them)")
        if inter % world:
            why.append(f"the MLP intermediate size {inter} is not divisible by {world}")
        raise UnsupportedModelError(
            f"this {spec.family} model cannot be split over tp={world}: {'; '.join(why)}. "
            f"Valid tp values: {', '.join(map(str, valid_tp_sizes(spec)))}"
        )
    nq = hq // world
    if hkv >= world:
        nkv = hkv // world
        kv = range(rank * nkv, (rank + 1) * nkv)
    else:
        first = rank * hkv // world
        kv = range(first, first + 1)
    ni = inter // world
    nv = -(-spec.vocab_size // world)
    return ShardPlan(rank, world, range(rank * nq, (rank + 1) * nq), kv, range(rank * ni, (rank + 1) * ni),
                     range(rank * nv, (rank + 1) * nv), spec.vocab_size)
