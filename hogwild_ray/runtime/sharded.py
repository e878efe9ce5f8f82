"""ShardedEngine: the engine the coordinator runs sessions on, its model in shard actors.

It holds the tokenizer, the model's spec (no weights) and a page allocator with the same
pages every shard has; sessions plan here and the shards replay each step. It lives in
the coordinator actor (see coordinator.py); users get it through `RayHogwildEngine`.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ray

from ..config import EngineConfig
from ..engine import HogwildEngine, read_model
from ..model.loader import plain_config
from ..core.layout import PageAllocator
from ..model.parallel import shard_plan
from .ray_executor import RayExecutor


def timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    """fn(*args) and the seconds it took."""
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


class ShardedEngine(HogwildEngine):
    """Runs Hogwild! sessions on `tp` shard actors of one model, placed in a given placement group."""

    group = None
    timings: dict[str, float]

    @classmethod
    def create(cls, config: EngineConfig, placement: Any, start_timeout_s: float = 120.0,
               load_timeout_s: float = 600.0) -> ShardedEngine:
        """Start the model's shards in bundles 0..tp-1 of `placement` while the model is read here
        (config, spec, tokenizer), then load their weights. read_model_s and shard_start_s overlap."""
        from .shard import ModelShard
        from .supervisor import ShardGroup

        t0 = time.perf_counter()
        with ThreadPoolExecutor(1) as pool:  # the model is read here while the shards start
            reading = pool.submit(timed, read_model, config.model)
            group = None
            try:
                group = ShardGroup(ModelShard, config.tp, args=(config,),
                                   use_gpu=config.torch_device.type == "cuda", placement=placement,
                                   start_timeout=start_timeout_s, step_timeout=config.step_timeout_s)
                shard_start = time.perf_counter() - t0
                (ckpt, model_config, spec, tokenizer), read_s = reading.result()
                config = config.sized(spec.max_positions)
                spec.check_context(config.max_context)
                if config.tp > 1:
                    shard_plan(spec, 0, config.tp)  # UnsupportedModelError naming the valid degrees
                model = (spec, plain_config(model_config))
                try:
                    ray.get([actor.configure.options(concurrency_group="health").remote(config, model)
                             for actor in group.actors], timeout=start_timeout_s)
                except Exception:
                    group.check()  # a shard that died meanwhile: ShardFailedError naming its rank
                    raise
            except BaseException:
                if group is not None:
                    group.close()
                reading.cancel()
                raise
        engine = cls(spec, tokenizer, None, PageAllocator(config.pages, config.page_size), config.torch_device,
                     config.max_context, ckpt.label)
        engine.executor = RayExecutor(engine)
        engine.group = group
        t2 = time.perf_counter()
        try:
            store = engine.group.step(("store", ()))
            engine.group.step(("init", (store,)), timeout=load_timeout_s)
        except BaseException:
            engine.close()
            raise
        engine.tp = config.tp
        engine.timings = {"read_model_s": read_s, "shard_start_s": shard_start, "weights_s": time.perf_counter() - t2}
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
