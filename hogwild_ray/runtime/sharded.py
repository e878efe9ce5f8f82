"""ShardedEngine: the engine the coordinator runs sessions on, its model in shard actors.

It holds the tokenizer, the model's spec (no weights) and a page allocator with the same
pages every shard has; sessions plan here and the shards replay each step. It lives in
the coordinator actor (see coordinator.py); users get it through `RayHogwildEngine`.
"""

from __future__ import annotations

import time
from typing import Any

from ..config import EngineConfig
from ..engine import HogwildEngine, read_model
from ..core.layout import PageAllocator
from ..model.parallel import shard_plan
from .ray_executor import RayExecutor


class ShardedEngine(HogwildEngine):
    """Runs Hogwild! sessions on `tp` shard actors of one model, placed in a given placement group."""

    group = None
    timings: dict[str, float]

    @classmethod
    def create(cls, config: EngineConfig, placement: Any, start_timeout_s: float = 120.0,
               load_timeout_s: float = 600.0) -> ShardedEngine:
        """Read the model here, start its shards in bundles 0..tp-1 of `placement`, load their weights."""
        from .shard import ModelShard
        from .supervisor import ShardGroup

        t0 = time.perf_counter()
        ckpt, _, spec, tokenizer = read_model(config.model)
        config = config.sized(spec.max_positions)
        spec.check_context(config.max_context)
        if config.tp > 1:
            shard_plan(spec, 0, config.tp)  # UnsupportedModelError naming the valid degrees, before any actor starts
        engine = cls(spec, tokenizer, None, PageAllocator(config.pages, config.page_size), config.torch_device,
                     config.max_context, ckpt.label)
        engine.executor = RayExecutor(engine)
        t1 = time.perf_counter()
        engine.group = ShardGroup(ModelShard, config.tp, args=(config,),
                                  use_gpu=config.torch_device.type == "cuda", placement=placement,
                                  start_timeout=start_timeout_s, step_timeout=config.step_timeout_s)
        t2 = time.perf_counter()
        try:
            store = engine.group.step(("store", ()))
            engine.group.step(("init", (store,)), timeout=load_timeout_s)
        except BaseException:
            engine.close()
            raise
        engine.tp = config.tp
        engine.timings = {"read_model_s": t1 - t0, "shard_start_s": t2 - t1, "weights_s": time.perf_counter() - t2}
        return engine

    def stall(self, rank: int, seconds: float) -> None:
        """Fault injection for tests: rank `rank` sleeps instead of running its next pass."""
        self.group.step(("stall", (rank, seconds)))

    def time_collectives(self, on: bool) -> None:
        """Time every rank's collectives from now on (or stop); see TensorParallel.timed."""
        self.group.step(("timing", (bool(on),)))

    def collective_time(self) -> tuple[float, int]:
        """Rank 0's (seconds in collectives, passes) since the last read; both reset."""
        return tuple(self.group.step(("collective_time", ())))

    def close(self) -> None:
        """Stop the shards and free their channel; idempotent (the placement group is the driver's)."""
        group, self.group = self.group, None
        if group is not None:
            group.close()
