"""HogwildEngine: sessions of one model in this process, over an executor (its own runner or,
inside the Ray coordinator, the shard actors)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from . import threads
from .cache import KVPool
from .config import EngineConfig, check_attention, check_graphs
from .core.layout import LAYOUTS, PageAllocator
from .core.protocol import ProtocolOptions
from .core.sampling_params import SamplingParams
from .errors import InvalidRequestError
from .executor import Executor, LocalExecutor
from .front import EngineFront
from .model import Decoder, locate, spec_from_config
from .model.graphs import DecodeGraphs
from .model.loader import load_config, load_tokenizer
from .model.parallel import TensorParallel
from .runner import ModelRunner
from .core.metrics import PassCounters
from .core.scheduling import check_workers, session_pages
from .errors import check_int
from .scheduler import Scheduler
from .prompt_text import check_prompt, prompt_ids
from .session import Session, step_sessions


def read_model(path):
    """Checkpoint, config, spec and tokenizer of a model (no weights)."""
    ckpt = locate(path)
    config = load_config(ckpt)
    return ckpt, config, spec_from_config(config), load_tokenizer(ckpt)


class HogwildEngine(EngineFront):
    """Runs Hogwild! sessions of one model in this process, over an executor: its own model
    runner (the local backend), or the shard actors of a Ray cluster (inside the coordinator).
    A session collected without close() gives its pages back (its finalizer calls `_orphaned`)."""

    def __init__(self, spec, tokenizer, runner: ModelRunner | None, allocator: PageAllocator,
                 device: torch.device, max_context: int, label: str, executor: Executor | None = None) -> None:
        self.spec, self.tokenizer, self.runner = spec, tokenizer, runner
        self.allocator, self.device = allocator, device
        self.max_context, self.label = max_context, label
        self.executor = executor if executor is not None or runner is None else LocalExecutor(runner)
        eos = set(spec.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        self.counters = PassCounters()
        self.schedulers: list[Scheduler] = []  # those running now (what metrics() counts as running and waiting)
        self._orphans: deque = deque()  # executor handles of sessions collected without close()
        self._executor_lock = threading.RLock()  # held by an executor operation that must not be interleaved
        self._busy = 0  # executor operations in progress (on the thread holding the lock)

    # the runner's parts, for inspection and benchmarks (in-process engines)
    @property
    def decoder(self) -> Decoder | None:
        return self.runner.decoder if self.runner is not None else None

    @property
    def cache(self) -> KVPool | None:
        return self.runner.cache if self.runner is not None else None

    @property
    def graphs(self) -> DecodeGraphs | None:
        return self.runner.graphs if self.runner is not None else None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        cache_tokens: int | None = None,
        page_size: int = 16,
        max_context: int | None = None,
        attention: str = "auto",
        parallel: TensorParallel | None = None,
        backend: str = "local",
        tp: int = 1,
        ray_address: str | None = None,
        placement_timeout_s: float = 30.0,
        step_timeout_s: float = 30.0,
        shard_resources: dict[str, float] | None = None,
        coordinator_resources: dict[str, float] | None = None,
        cuda_graphs: bool | None = None,
    ) -> EngineFront:
        """Load a local HF directory or GGUF file (None: the built-in SmolLM2-135M-Instruct).

        cache_tokens: size of the preallocated K/V pool in tokens (all workers together);
        default: 4 x the context, at most 65536. max_context: the longest view served.
        attention: "auto" (Triton on CUDA, the torch reference elsewhere), "triton" or "torch".
        parallel: one rank of a tensor-parallel group (torch.distributed already initialised):
        the engine holds that rank's slice of the weights and of every K/V, and every rank must
        run the same sessions in lockstep (each gets the full logits and samples identically).
        backend: "local" (this process) or "ray" (tp tensor-parallel shard actors on a Ray cluster,
        ray_address or the running/new local one; placement_timeout_s bounds the wait for the
        shards' resources, step_timeout_s a step; close() the engine to free them).
        shard_resources / coordinator_resources (backend="ray"): Ray custom resources that pin the
        shards (added to each shard's bundle) and the coordinator (then scheduled by them instead of
        beside rank 0) to the nodes that advertise them, e.g. {"gpu_node": 1} and {"hw_head": 1}.
        cuda_graphs: replay decode passes from CUDA graphs (None: on for CUDA with Triton attention
        in one process; True needs both; False: every pass eager).
        """
        from .api import from_pretrained  # the one place that picks the backend

        return from_pretrained(
            path, device, dtype, cache_tokens=cache_tokens, page_size=page_size, max_context=max_context,
            attention=attention, parallel=parallel, backend=backend, tp=tp, ray_address=ray_address,
            placement_timeout_s=placement_timeout_s, step_timeout_s=step_timeout_s, shard_resources=shard_resources,
            coordinator_resources=coordinator_resources, cuda_graphs=cuda_graphs)

    @classmethod
    def load(cls, config: EngineConfig, parallel: TensorParallel | None = None) -> HogwildEngine:
        """An in-process engine for a checked config (one rank's slice with `parallel`)."""
        dev = config.torch_device
        graphs = check_graphs(config.cuda_graphs, config.attention, dev, parallel)
        ckpt, model_config, spec, tokenizer = read_model(config.model)
        config = config.sized(spec.max_positions)
        spec.check_context(config.max_context)
        check_attention(config.attention, dev)
        if dev.type == "cpu":
            threads.govern()  # unless the user fixed the count
        runner = ModelRunner.load(config, graphs, parallel, ckpt=ckpt, model_config=model_config, spec=spec)
        return cls(spec, tokenizer, runner, PageAllocator(config.pages, config.page_size), dev, config.max_context,
                   ckpt.label)

    # ---- sessions dropped without close() ------------------------------------------------------
    def _orphaned(self, handle) -> None:
        """A session was collected open (its finalizer calls this): close its executor handle, now
        if no executor operation is under way, else when the operation ends."""
        self._orphans.append(handle)
        self._reap()

    @contextmanager
    def executor_operation(self) -> Iterator[None]:
        """Marks an executor operation that a page release must not interleave with (the Ray
        executor: every shard replays the coordinator's allocator operations in its order), nor
        another thread's: opening a session, a pass, a fork and a close each plan their pages
        and write them as one operation, so threads sharing an engine take turns (a prompt's
        pages are offered for sharing when planned, and must not be taken before they are
        written)."""
        try:
            with self._executor_lock:
                self._busy += 1
                try:
                    yield
                finally:
                    self._busy -= 1
        finally:
            self._reap()

    def _reap(self) -> None:
        """Close the handles of collected sessions, unless an executor operation is under way."""
        if not self._orphans or not self._executor_lock.acquire(blocking=False):
            return  # another thread is inside an operation: its end reaps
        try:
            if self._busy:  # collected during an operation on this thread: its end reaps
                return
            self._busy += 1  # a close's own operation does not reap again
            try:
                while self._orphans:
                    handle = self._orphans.popleft()
                    try:
                        handle.close()
                    except Exception:  # a broken engine: its close() frees everything
                        pass
            finally:
                self._busy -= 1
        finally:
            self._executor_lock.release()

    # ---- sessions --------------------------------------------------------------------------
    def start(
        self,
        problem: str,
        workers: int = 2,
        *,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        layout: str = "combined",
        max_tokens: int | None = 1024,
        max_steps: int | None = None,
        write_prompt: bool = True,
        **protocol_options,
    ) -> Session:
        """Open a session; protocol_options are the fields of ProtocolOptions
        (protocol=False for a plain prompt, redundancy_every, finisher, ...).

        max_tokens: tokens each worker may generate. max_steps: a hard cap on the session's
        forward passes, the finisher's included (the workers stop `finisher_tokens` passes
        early while an answer is still missing, so that the finisher ends by pass max_steps;
        they always get at least one pass). None: no limit. write_prompt=False: the prompt is
        written by the session's first passes, a chunk at a time (how the scheduler starts a
        session; the cache's free pages are then not checked here)."""
        options = protocol_from(layout, protocol_options)
        check_workers(workers, self.allocator)
        with self.executor_operation():  # its prompt's pages are planned and written with no other thread between
            return Session(self, problem, workers, sampling, layout, max_tokens, max_steps, options, write_prompt)

    def step(self, sessions: Sequence[Session], inject: dict[Session, dict[int, str]] | None = None
             ) -> dict[Session, dict[int, list[int]]]:
        """One forward pass for all the given sessions of this engine; each one's new tokens per
        worker (as `session.step()` returns them). inject: {session: {worker: text}}. A session
        whose writes do not fit the cache is closed and its error raised after the pass (the
        others advanced)."""
        return step_sessions(list(sessions), inject)

    def request_pages(self, problem: str, workers: int = 2, *, layout: str = "combined",
                      max_tokens: int | None = 1024, forced_tokens: int = 0, **protocol_options) -> int:
        """The most K/V pages a session of this problem may hold at once (what the scheduler
        reserves for it); ContextLengthError when its prompt does not fit the context."""
        return self.request_size(problem, workers, layout=layout, max_tokens=max_tokens, forced_tokens=forced_tokens,
                                 **protocol_options)[1]

    def request_size(self, problem: str, workers: int = 2, *, layout: str = "combined",
                     max_tokens: int | None = 1024, forced_tokens: int = 0, **protocol_options) -> tuple[int, int]:
        """(prompt tokens, the most K/V pages it may hold at once) of a session of this problem."""
        options = protocol_from(layout, protocol_options)
        check_int("workers", workers, 1)
        ids = prompt_ids(self.tokenizer, problem, workers, options)
        check_prompt(len(ids), self.max_context)
        return len(ids), session_pages(layout, workers, len(ids), max_tokens, self.max_context,
                                       self.allocator.page_size, forced_tokens)

    def _stream_many(self, items, workers, max_concurrent, options):
        """The scheduler runs every problem in shared passes, admitting as pages free up."""
        from .many import scheduled_events

        yield from scheduled_events(self, items, workers, max_concurrent, options)

    def serving_loop(self, max_concurrent: int | None = None):
        """A ServingLoop (hogwild_ray.serving_loop) running this engine's requests on a thread of its own."""
        from .serving_loop import ServingLoop

        return ServingLoop(self, max_concurrent)

    def metrics(self) -> dict:
        """A snapshot: sessions running and waiting (in the engine's schedulers), the passes (count,
        rows and sessions per pass, tokens generated, prompt tokens written, pass times) and the
        K/V pages (used, free, shared by more than one session or fork, prompt pages taken from
        other prompts instead of computed), the passes launched before the sessions asked for
        them: used, and dropped unused (the sessions asked for another pass), and the CUDA graphs
        captured and the host's seconds in those captures (a new pass shape's one-time cost, paid
        by a server's warm-up or inside the pass that meets it; 0 without graphs, and where the
        passes run in Ray shards)."""
        pool = self.allocator
        graphs = self.graphs
        return {
            "sessions_running": sum(len(s.running) for s in self.schedulers),
            "sessions_waiting": sum(s.waiting for s in self.schedulers),
            **self.counters.snapshot(),
            "passes_launched_ahead": self.executor.prelaunched,
            "launched_ahead_dropped": self.executor.prelaunch_dropped,
            "graph_captures": graphs.captures if graphs is not None else 0,
            "graph_capture_seconds": graphs.capture_seconds if graphs is not None else 0.0,
            "pages_total": pool.num_pages, "pages_free": pool.free_pages,
            "pages_used": pool.num_pages - pool.free_pages, "pages_shared": pool.shared_pages,
            "prompt_pages_reused": pool.prefix_reused,
            "page_size": pool.page_size,
        }


def protocol_from(layout: str, protocol_options: dict) -> ProtocolOptions:
    """Checked ProtocolOptions from a start() call's keyword options."""
    if layout not in LAYOUTS:
        raise InvalidRequestError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    protocol_options = dict(protocol_options)
    if "protocol" in protocol_options:
        protocol_options["enabled"] = protocol_options.pop("protocol")
    known = set(ProtocolOptions.__dataclass_fields__)
    unknown = set(protocol_options) - known
    if unknown:
        raise InvalidRequestError(
            f"unknown option(s) {', '.join(sorted(unknown))}; protocol options are protocol, "
            f"{', '.join(sorted(known - {'enabled'}))}"
        )
    return ProtocolOptions(**protocol_options)
