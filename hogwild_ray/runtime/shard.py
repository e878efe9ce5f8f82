"""A shard with a model: one tensor-parallel rank of the engine, fed through a step channel.

Every rank replays the same messages on its own copy of the cache layout with its slice of
the model, in lockstep; rank 0's replies carry the data (sampled tokens, logits, K/V).

Messages are `(method, args)` pairs, dispatched in one place (`_handle`) to the `op_`
methods below; every rank runs them, only rank 0's reply carries data. A shard holds a
ModelRunner (its slice of the model and of every K/V page) and the same LocalExecutor the
in-process engine uses, which replays each session's layout operations on this rank's copy
of the layout: sessions are opened, prefilled, stepped (any number of them per pass) and
closed by id, in the order the coordinator did them, so every copy of the page allocator
hands out the same pages.

A pass is two messages (see ray_executor): "run" launches it, and this rank acks as soon as
it is under way; "meanwhile", read while the pass computes, brings the steps the coordinator's
sessions moved meanwhile and each session's next pass foreseen; the reply to it carries the
samples. From that foresight the executor may launch the next pass before "run" asks for it.

NVLink multicast (NVLS, symmetric-memory multicast, NVSHMEM's NVLS) stays off in every
shard: `NCCL_ENV` is set in the actor's environment before the process group starts, unless
the variable is set already (a value the worker inherits from its raylet or gets from the job's
runtime_env wins: that is how to turn multicast back on).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from ..config import EngineConfig
from .channel import ShmSpec, SocketSpec, connect, listen_on
from .errors import ChannelClosedError, ChannelTimeoutError

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def multicast_off() -> dict[str, str]:
    """Set each of NCCL_ENV in os.environ unless it is set; the values now in effect."""
    import os

    return {k: os.environ.setdefault(k, v) for k, v in NCCL_ENV.items()}


def listening_store(host: str, world: int, timeout_s: float) -> Any:
    """A master TCPStore that listens on `host` alone: given no socket, torch binds every interface."""
    import torch.distributed as dist

    sock = listen_on(host)
    try:
        store = dist.TCPStore(host, sock.getsockname()[1], world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.fileno())
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store's server owns the descriptor now, and closes it
    return store


class ModelShard:
    """Rank `rank` of `world`: loads its slice of the model on "init", then serves sessions."""

    def __init__(self, config: EngineConfig, rendezvous_timeout_s: float = 120.0,
                 collective_timeout_s: float = 600.0) -> None:
        self.config, self.world = config, config.tp  # configure() hands over the sized one
        self.model: tuple[Any, Any] = (None, None)  # (spec, plain_config); read here on "init" unless configured
        self.rendezvous_timeout_s, self.collective_timeout_s = rendezvous_timeout_s, collective_timeout_s
        self.runner = self.allocator = self.executor = self.store = self.parallel = self.channel = None
        self.stall_s = 0.0
        self.timed, self.passes = False, 0  # passes run while the collectives are timed
        multicast_off()  # before anything can start NCCL

    def configure(self, config: EngineConfig, model: tuple[Any, Any]) -> None:
        """The sized config and the model's (spec, plain_config) as the coordinator read them, while
        this actor started (called on its health thread, before "init"): this process then never
        imports transformers, and the coordinator's reading of the model overlaps the shards' start."""
        self.config, self.model = config, model

    def _open_store(self) -> str:
        """Rank 0's TCPStore on this node's address, at a port the OS picks and keeps bound: no free-port race."""
        import ray

        ip = ray.util.get_node_ip_address()
        self.store = listening_store(ip, self.world, self.rendezvous_timeout_s)
        return f"{ip}:{self.store.port}"

    def _init(self, rank: int, store: str | None) -> None:
        import torch.distributed as dist

        from ..config import check_attention, check_graphs
        from ..executor import LocalExecutor
        from ..core.layout import PageAllocator
        from ..model.parallel import TensorParallel
        from ..runner import ModelRunner

        config, device = self.config, self.config.torch_device
        if device.type == "cpu":
            from ..threads import set_threads

            set_threads(1)  # ranks share the node's cores: one each, fixed
        if self.world > 1:
            if rank != 0:
                host, port = store.rsplit(":", 1)
                self.store = dist.TCPStore(host, int(port), self.world, is_master=False,
                                           timeout=datetime.timedelta(seconds=self.rendezvous_timeout_s))
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=self.store, rank=rank, world_size=self.world,
                                    timeout=datetime.timedelta(seconds=self.collective_timeout_s))
        self.parallel = TensorParallel(rank, self.world, None) if self.world > 1 else None
        check_attention(config.attention, device)
        graphs = check_graphs(config.cuda_graphs, config.attention, device, self.parallel)
        spec, model_config = self.model
        self.runner = ModelRunner.load(config, graphs, self.parallel, spec=spec, model_config=model_config)
        self.allocator = PageAllocator(config.pages, config.page_size)
        self.executor = LocalExecutor(self.runner)

    def _kv(self, rank: int, pages: list[int]) -> Any:
        """Every KV head's K/V of `pages`, gathered on rank 0 (replicated heads written once per copy)."""
        import torch

        from ..model.parallel import shard_plan

        cache, spec = self.runner.cache, self.runner.spec
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

    OPS = ("store", "init", "open", "prefill", "run", "logits", "kv", "close", "stall", "timing",
           "collective_time", "env", "launch_ahead")

    def _handle(self, rank: int, msg: tuple[str, tuple]) -> Any:
        """Run one `(method, args)` message on this rank; rank 0's return value is the reply."""
        method, args = msg
        if method not in self.OPS:
            raise ValueError(f"unknown shard method {method!r}")
        out = getattr(self, "op_" + method)(rank, *args)
        return out if rank == 0 else None

    def op_store(self, rank: int) -> str | None:
        return self._open_store() if rank == 0 and self.world > 1 else None

    def op_init(self, rank: int, store: str | None) -> None:
        self._init(rank, store)

    def _finish(self, finishing: list[tuple[int, list[int]]]) -> None:
        """Finished steps the coordinator moved since its last message, in its order."""
        for sid, workers in finishing:
            self.executor.finish_steps(sid, workers)

    def op_open(self, rank: int, finishing: list, sid: int, kind: str, workers: int, params: list) -> None:
        from ..core.layout import CacheLayout

        self._finish(finishing)
        self.executor.open(CacheLayout(kind, workers, self.allocator), params, session=sid)

    def op_prefill(self, rank: int, finishing: list, sid: int, block: str, ids: list[int]) -> None:
        self._finish(finishing)
        layout = self.executor.sessions[sid].layout
        self.executor.prefill(sid, getattr(layout, block), ids)

    def op_run(self, rank: int, finishing: list, passes: list[tuple]) -> tuple[dict[int, list[int]], list[int]]:
        """The finished steps first (in the coordinator's order), then one pass of every session:
        each session's samples, and the passes launched ahead so far (used, dropped) and whether
        one is launched now."""
        from ..executor import SessionPass

        if self.stall_s:
            stall, self.stall_s = self.stall_s, 0.0
            time.sleep(stall)  # the other ranks wait for this one in their first collective
        self._finish(finishing)
        done = self.executor.run([SessionPass(sid, fed, greedy, tuple((b, tuple(ids)) for b, ids in prefill))
                                  for sid, fed, greedy, prefill in passes], lambda _: self._meanwhile())
        if self.timed:
            self.passes += 1
            if self.parallel is not None:
                self.parallel.fold_finished()
        ex = self.executor
        return ({sid: out[1] for sid, out in done.items() if not isinstance(out, Exception)},
                [ex.prelaunched, ex.prelaunch_dropped, ex.holds_launched])

    def _meanwhile(self) -> dict:
        """While this rank's pass runs: ack "run" (the pass is under way), then read "meanwhile":
        the steps moved while the pass runs (moved here now, in the pass), and per session its next
        pass foreseen (a Foresight) or None."""
        from ..executor.base import Foresight

        self.channel.reply(None)
        while True:
            try:
                method, args = self.channel.recv(timeout=1.0)
                break
            except ChannelTimeoutError:
                continue
        if method != "meanwhile":
            raise ValueError(f"expected the pass's 'meanwhile' message, got {method!r}")
        moves, sights = args
        self._finish(moves)
        return {sid: None if plain is None else Foresight.from_plain(plain) for sid, plain in sights}

    def op_launch_ahead(self, rank: int, on: bool | None) -> tuple[bool, int, int] | None:
        ex = self.executor
        if on is not None:
            ex.prelaunch = bool(on)
        return (ex.prelaunch, ex.prelaunched, ex.prelaunch_dropped) if rank == 0 else None

    def op_logits(self, rank: int, sid: int, worker: int) -> Any:
        return self.executor.last_logits(sid)[worker].float().cpu().numpy() if rank == 0 else None

    def op_kv(self, rank: int, pages: list[int]) -> Any:
        return self._kv(rank, pages)

    def op_close(self, rank: int, finishing: list, sid: int) -> None:
        self._finish(finishing)
        self.executor.close(sid)

    def op_stall(self, rank: int, target: int, seconds: float) -> None:
        if rank == target:
            self.stall_s = float(seconds)

    def op_timing(self, rank: int, on: bool) -> None:
        self.timed = bool(on)
        if self.parallel is not None:
            self.parallel.timed = self.timed

    def op_collective_time(self, rank: int) -> tuple[float, int] | None:
        seconds = self.parallel.collective_seconds() if self.parallel is not None else 0.0
        passes, self.passes = self.passes, 0
        return (seconds, passes) if rank == 0 else None

    def op_env(self, rank: int) -> dict[str, str | None] | None:
        import os

        return {k: os.environ.get(k) for k in NCCL_ENV} if rank == 0 else None

    def run_loop(self, spec: ShmSpec | SocketSpec, rank: int) -> int:
        """Serve messages until the channel closes; the number served."""
        ch = self.channel = connect(spec, rank)
        served = 0
        try:
            while True:
                try:
                    msg = ch.recv(timeout=1.0)
                except ChannelTimeoutError:
                    continue
                ch.reply(self._handle(rank, msg))  # a pass reads its "meanwhile" message too
                served += 1
        except ChannelClosedError:  # between messages, or while a pass waited for its "meanwhile"
            self._shutdown()
            return served
        finally:
            ch.close()

    def _shutdown(self) -> None:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            pass
