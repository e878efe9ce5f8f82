"""A shard with a model: one tensor-parallel rank of the engine, fed through a step channel.

Every rank replays the same messages on its own copy of the cache layout with its slice of
the model, in lockstep; rank 0's replies carry the data (sampled tokens, logits, K/V).

Messages (dicts, field "op"):
  store     rank 0 opens the rendezvous TCPStore on port 0; reply "<ip>:<port>"
  init      join the process group through the store at "store", load the model; reply None
  start     open a session: "layout" kind, "workers", "params" (SamplingParams, concrete seeds)
  prefill   write shared block "block" (a layout attribute name) with "ids"
  run       finish the steps of "finishing", then one pass over "fed" (greedy flag); reply tokens
  logits    reply row "worker" of the last logits (a float32 numpy array)
  kv        reply every KV head's K and V of "pages" (float32 numpy, [2, layers, pages, page, heads, dim])
  stall     rank "rank" sleeps "seconds" instead of running its next pass (fault injection for tests)
  timing    "on": time the collectives from now on (or stop); reply None
  collective_time  reply rank 0's (seconds in collectives, passes) since the last read, and reset both
  env       reply rank 0's values of the NCCL_ENV variables (what the process group started with)
  end       close the session

NVLink multicast (NVLS, symmetric-memory multicast, NVSHMEM's NVLS) stays off in every
shard: `NCCL_ENV` is set in the actor's environment before the process group starts, unless
the variable is set already (a value the worker inherits from its raylet or gets from the job's
runtime_env wins: that is how to turn multicast back on).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from .channel import ShmSpec, SocketSpec, connect
from .errors import ChannelClosedError, ChannelTimeoutError

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off() -> dict[str, str]:
    """Set each of NCCL_ENV in os.environ unless it is set; the values now in effect."""
    import os

    return {k: os.environ.setdefault(k, v) for k, v in NCCL_ENV.items()}


class ModelShard:
    """Rank `rank` of `world`: loads its slice of the model on "init", then serves sessions."""

    def __init__(self, path: str, device: str, dtype: str | None, engine_kwargs: dict[str, Any],
                 world: int, rendezvous_timeout_s: float = 120.0, collective_timeout_s: float = 600.0) -> None:
        self.path, self.device, self.dtype = path, device, dtype
        self.engine_kwargs, self.world = dict(engine_kwargs), world
        self.rendezvous_timeout_s, self.collective_timeout_s = rendezvous_timeout_s, collective_timeout_s
        self.engine = self.layout = self.executor = self.store = self.parallel = None
        self.stall_s = 0.0
        self.timed, self.passes = False, 0  # passes run while the collectives are timed
        multicast_off()  # before anything can start NCCL

    def _open_store(self) -> str:
        """Rank 0's TCPStore on a port the OS picks and keeps bound: no free-port race."""
        import ray
        import torch.distributed as dist

        ip = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(ip, 0, self.world, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=self.rendezvous_timeout_s))
        return f"{ip}:{self.store.port}"

    def _init(self, rank: int, store: str | None) -> None:
        import torch
        import torch.distributed as dist

        from ..engine import HogwildEngine
        from ..model.parallel import TensorParallel

        if torch.device(self.device).type == "cpu":
            torch.set_num_threads(1)
        if self.world > 1:
            if rank != 0:
                host, port = store.rsplit(":", 1)
                self.store = dist.TCPStore(host, int(port), self.world, is_master=False,
                                           timeout=datetime.timedelta(seconds=self.rendezvous_timeout_s))
            backend = "nccl" if torch.device(self.device).type == "cuda" else "gloo"
            dist.init_process_group(backend, store=self.store, rank=rank, world_size=self.world,
                                    timeout=datetime.timedelta(seconds=self.collective_timeout_s))
        self.parallel = TensorParallel(rank, self.world, None) if self.world > 1 else None
        self.engine = HogwildEngine.from_pretrained(self.path, self.device, self.dtype, parallel=self.parallel,
                                                    **self.engine_kwargs)

    def _kv(self, rank: int, pages: list[int]) -> Any:
        """Every KV head's K/V of `pages`, gathered on rank 0 (replicated heads written once per copy)."""
        import torch

        from ..model.parallel import shard_plan

        cache, spec = self.engine.cache, self.engine.spec
        idx = torch.tensor(pages, dtype=torch.int64, device=cache.k.device)
        mine = torch.stack([cache.k[:, idx], cache.v[:, idx]]).float()  # [2, L, P, page, local heads, dim]
        if self.world == 1:
            return mine.cpu().numpy() if rank == 0 else None
        import torch.distributed as dist

        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine.contiguous())
        if rank != 0:
            return None
        full = torch.zeros(*mine.shape[:4], spec.num_kv_heads, mine.shape[5], device=mine.device)
        for r, part in enumerate(parts):
            heads = shard_plan(spec, r, self.world).kv_heads
            full[..., heads.start:heads.stop, :] = part
        return full.cpu().numpy()

    def _handle(self, rank: int, msg: dict[str, Any]) -> Any:
        from ..executor import LocalExecutor
        from ..layout import CacheLayout

        op = msg["op"]
        if op == "store":
            return self._open_store() if rank == 0 and self.world > 1 else None
        if op == "init":
            self._init(rank, msg["store"])
            return None
        if op == "start":
            self._end()
            self.layout = CacheLayout(msg["layout"], msg["workers"], self.engine.allocator)
            self.executor = LocalExecutor(self.engine, self.layout, msg["params"])
            return None
        if op == "prefill":
            self.executor.prefill(getattr(self.layout, msg["block"]), msg["ids"])
            return None
        if op == "run":
            if self.stall_s:
                stall, self.stall_s = self.stall_s, 0.0
                time.sleep(stall)  # the other ranks wait for this one in their first collective
            self.executor.finish_steps(msg["finishing"])
            _, tokens = self.executor.run(msg["fed"], msg["greedy"])
            if self.timed:
                self.passes += 1
                if self.parallel is not None:  # fold this pass's events in: none pile up
                    self.parallel.collective_seconds(reset=False)
            return tokens if rank == 0 else None
        if op == "logits":
            if rank != 0:
                return None
            return self.executor.last_logits()[msg["worker"]].float().cpu().numpy()
        if op == "kv":
            return self._kv(rank, msg["pages"])
        if op == "stall":
            if rank == msg["rank"]:
                self.stall_s = float(msg["seconds"])
            return None
        if op == "timing":
            self.timed = bool(msg["on"])
            if self.parallel is not None:
                self.parallel.timed = self.timed
            return None
        if op == "collective_time":
            seconds = self.parallel.collective_seconds() if self.parallel is not None else 0.0
            passes, self.passes = self.passes, 0
            return (seconds, passes) if rank == 0 else None
        if op == "env":
            import os

            return {k: os.environ.get(k) for k in NCCL_ENV} if rank == 0 else None
        if op == "end":
            self._end()
            return None
        raise ValueError(f"unknown op {op!r}")

    def _end(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.executor = self.layout = None

    def run_loop(self, spec: ShmSpec | SocketSpec, rank: int) -> int:
        """Serve messages until the channel closes; the number served."""
        ch, served = connect(spec, rank), 0
        try:
            while True:
                try:
                    msg = ch.recv(timeout=1.0)
                except ChannelTimeoutError:
                    continue
                except ChannelClosedError:
                    self._shutdown()
                    return served
                ch.reply(self._handle(rank, msg))
                served += 1
        finally:
            ch.close()

    def _shutdown(self) -> None:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
