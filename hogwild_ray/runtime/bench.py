"""Per-step control overhead: one small message to N shards and their acks back.

    python -m hogwild_ray.runtime.bench --shards 1 2 4 8 --steps 2000

Compares the shared-memory and socket channels of a `ShardGroup` (each loop started
once) with the per-step actor call (`.remote()` + `ray.get`) they replace. Shards are
`EchoShard`s, so only the control path is timed.
"""

from __future__ import annotations

import argparse
import time

import ray

from .echo import EchoShard
from .ray_init import init_ray
from .supervisor import ShardGroup


def message(i: int) -> dict:
    return {"step": i, "finishing": [], "fed": {w: [1000 + i] for w in range(4)}, "greedy": True}


def channel_step_s(shards: int, kind: str, steps: int) -> float:
    with ShardGroup(EchoShard, shards, channel=kind) as group:
        for i in range(100):
            group.step(message(i))
        start = time.perf_counter()
        for i in range(steps):
            group.step(message(i))
        return (time.perf_counter() - start) / steps


@ray.remote(num_cpus=0)
class CallShard:
    def step(self, msg: dict) -> dict:
        return {"step": msg["step"], "sum": sum(sum(ids) for ids in msg["fed"].values())}


def actor_call_step_s(shards: int, steps: int) -> float:
    actors = [CallShard.remote() for _ in range(shards)]
    try:
        for i in range(100):
            ray.get([a.step.remote(message(i)) for a in actors])
        start = time.perf_counter()
        for i in range(steps):
            ray.get([a.step.remote(message(i)) for a in actors])
        return (time.perf_counter() - start) / steps
    finally:
        for a in actors:
            ray.kill(a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    init_ray(None, num_cpus=max(args.shards) + 1, include_dashboard=False, log_to_driver=False)
    print(f"{'shards':>6} {'shm ms':>8} {'socket ms':>10} {'actor call ms':>14}")
    for n in args.shards:
        shm, sock = channel_step_s(n, "shm", args.steps), channel_step_s(n, "socket", args.steps)
        call = actor_call_step_s(n, min(args.steps, 1000))
        print(f"{n:>6} {shm * 1e3:>8.3f} {sock * 1e3:>10.3f} {call * 1e3:>14.3f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
