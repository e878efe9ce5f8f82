"""A shard with a model: one tensor-parallel rank of the engine, fed through a step channel.

Every rank replays the same messages on its own copy of the cache layout with its slice of
the model, in lockstep; rank 0's replies carry the data (sampled tokens, logits).

Messages (dicts, field "op"):
  addr      rank 0 picks a free port on its node; reply "tcp://<ip>:<port>"
  init      join the process group at "address", load the model; reply None
  start     open a session: "layout" kind, "workers", "params" (SamplingParams, concrete seeds)
  prefill   write shared block "block" (a layout attribute name) with "ids"
  run       finish the steps of "finishing", then one pass over "fed" (greedy flag); reply tokens
  logits    reply row "worker" of the last logits (a float32 numpy array)
  end       close the session
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

from .channel import ShmSpec, SocketSpec, connect
from .errors import ChannelClosedError, ChannelTimeoutError


def free_address() -> str:
    """tcp://<this node's ip>:<a port free now> (the port is closed again; rank 0 reopens it)."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((ip, 0))
        return f"tcp://{ip}:{s.getsockname()[1]}"


class ModelShard:
    """Rank `rank` of `world`: loads its slice of the model on "init", then serves sessions."""

    def __init__(self, path: str, device: str, dtype: str | None, engine_kwargs: dict[str, Any],
                 world: int, rendezvous_timeout_s: float = 120.0) -> None:
        self.path, self.device, self.dtype = path, device, dtype
        self.engine_kwargs, self.world = dict(engine_kwargs), world
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.engine = self.layout = self.executor = None

    def _init(self, rank: int, address: str) -> None:
        import torch
        import torch.distributed as dist

        from ..engine import HogwildEngine
        from ..model.parallel import TensorParallel

        if torch.device(self.device).type == "cpu":
            torch.set_num_threads(1)
        backend = "nccl" if torch.device(self.device).type == "cuda" else "gloo"
        if self.world > 1:
            dist.init_process_group(backend, init_method=address, rank=rank, world_size=self.world,
                                    timeout=datetime.timedelta(seconds=self.rendezvous_timeout_s))
        parallel = TensorParallel(rank, self.world, None) if self.world > 1 else None
        self.engine = HogwildEngine.from_pretrained(self.path, self.device, self.dtype, parallel=parallel,
                                                    **self.engine_kwargs)

    def _handle(self, rank: int, msg: dict[str, Any]) -> Any:
        from ..executor import LocalExecutor
        from ..layout import CacheLayout

        op = msg["op"]
        if op == "addr":
            return free_address() if rank == 0 else None
        if op == "init":
            self._init(rank, msg["address"])
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
            self.executor.finish_steps(msg["finishing"])
            _, tokens = self.executor.run(msg["fed"], msg["greedy"])
            return tokens if rank == 0 else None
        if op == "logits":
            if rank != 0:
                return None
            return self.executor.last_logits()[msg["worker"]].float().cpu().numpy()
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
