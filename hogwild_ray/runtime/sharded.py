"""RayHogwildEngine: the model's tensor-parallel shards in Ray actors, the sessions here.

This process holds the tokenizer, the model's spec (no weights) and a page allocator with
the same pages every shard has; sessions plan here and the shards replay each step.
Use `HogwildEngine.from_pretrained(path, ..., backend="ray", tp=N)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..engine import HogwildEngine, check_options, read_model
from ..errors import InvalidRequestError
from ..layout import CacheLayout, PageAllocator
from ..sampling import SamplingParams
from .ray_executor import RayExecutor


class RayHogwildEngine(HogwildEngine):
    """Runs Hogwild! sessions on `tp` shard actors of one model (one placement group, one node)."""

    group = None

    @classmethod
    def create(
        cls, path: str | Path | None, device: str | torch.device, dtype: str | torch.dtype | None, *,
        cache_tokens: int | None, page_size: int, max_context: int | None, attention: str, tp: int,
        ray_address: str | None, placement_timeout_s: float, step_timeout_s: float, load_timeout_s: float = 600.0,
    ) -> RayHogwildEngine:
        import ray

        from .shard import ModelShard
        from .supervisor import ShardGroup

        check_options(attention, page_size, cache_tokens, max_context)
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InvalidRequestError(f"device {device!r} is not a torch device (try 'cpu' or 'cuda')") from e
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        ckpt, _, spec, context, tokenizer, pages = read_model(path, max_context, cache_tokens, page_size)
        kwargs = dict(cache_tokens=pages * page_size, page_size=page_size, max_context=context, attention=attention)

        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False)
        engine = cls(spec, tokenizer, None, None, PageAllocator(pages, page_size), dev, context, ckpt.label)
        shard_path = str(path) if path is not None else None
        engine.group = ShardGroup(ModelShard, tp, args=(shard_path, str(dev), dtype, kwargs, tp),
                                  use_gpu=dev.type == "cuda", reserve_timeout=placement_timeout_s,
                                  step_timeout=step_timeout_s)
        try:
            address = engine.group.step({"op": "addr"})
            engine.group.step({"op": "init", "address": address}, timeout=load_timeout_s)
        except BaseException:
            engine.close()
            raise
        engine.tp = tp
        return engine

    def executor(self, layout: CacheLayout, params: list[SamplingParams]) -> RayExecutor:
        """Runs a session's passes on the shard actors."""
        return RayExecutor(self, layout, params)

    def run_forward(self, steps: Any) -> torch.Tensor:
        raise NotImplementedError("the Ray engine runs forward passes in its shards; use sessions")

    def close(self) -> None:
        """Stop the shards, free their placement group and channel; idempotent."""
        group, self.group = self.group, None
        if group is not None:
            group.close()
