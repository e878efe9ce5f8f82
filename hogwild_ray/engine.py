"""HogwildEngine: a model, a tokenizer and a paged K/V pool on one device, in process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from hogwild_kernels import QueryGroup, make_attention

from .cache import KVPool
from .errors import InvalidRequestError
from .events import Event
from .executor import LocalExecutor
from .layout import LAYOUTS, CacheLayout, PageAllocator, WriteStep
from .model import Decoder, ForwardBatch, locate, spec_from_config
from .model.graphs import DecodeGraphs, Staged
from .model.loader import load_config, load_tokenizer, weight_reader
from .model.parallel import TensorParallel, shard_plan
from .model.weights import load_weights
from .protocol import ProtocolOptions
from .results import SolveResult
from .sampling import SampleTable, SamplingParams, sample_eagerly
from .session import Session
from .transfer import to_device
from .streaming import final_result, session_events

ATTENTION_CHOICES = ("auto", "triton", "torch")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InvalidRequestError(f"device {device!r} is not a torch device (try 'cpu' or 'cuda')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' asked for, but torch sees no CUDA GPU; use device='cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise InvalidRequestError(f"dtype must be one of {', '.join(DTYPES)} (or a torch dtype), got {dtype!r}")


def check_attention(attention: str, device: torch.device) -> None:
    """Triton needs a CUDA device, or its CPU interpreter (TRITON_INTERPRET=1)."""
    if attention != "triton" and not (attention == "auto" and device.type == "cuda"):
        return
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise InvalidRequestError("attention='triton' needs the triton package: pip install triton") from e
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InvalidRequestError(
            "attention='triton' on a CPU device runs only under the Triton interpreter: set TRITON_INTERPRET=1 "
            "before starting Python, or use attention='torch'"
        )


def check_graphs(cuda_graphs: bool | None, attention: str, device: torch.device,
                 parallel: TensorParallel | None) -> bool:
    """Whether to capture decode passes in CUDA graphs; an explicit True that cannot be met is an error."""
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        raise InvalidRequestError(f"cuda_graphs must be True, False or None (auto), got {cuda_graphs!r}")
    triton = attention == "triton" or (attention == "auto" and device.type == "cuda")
    possible = device.type == "cuda" and triton
    if cuda_graphs and not possible:
        raise InvalidRequestError(
            "cuda_graphs=True needs a CUDA device and Triton attention (attention='auto' or 'triton'); "
            f"got device {device} and attention {attention!r}: drop cuda_graphs or change them"
        )
    if cuda_graphs is None:
        return possible and (parallel is None or parallel.world == 1)
    return cuda_graphs


def check_options(attention: str, page_size: int, cache_tokens: int | None, max_context: int | None) -> None:
    if attention not in ATTENTION_CHOICES:
        raise InvalidRequestError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    for name, v in (("page_size", page_size), ("cache_tokens", cache_tokens), ("max_context", max_context)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise InvalidRequestError(f"{name} must be an integer >= 1, got {v!r}")


def read_model(path, max_context: int | None, cache_tokens: int | None, page_size: int):
    """Checkpoint, config, spec, served context, tokenizer and the pool's page count (no weights)."""
    ckpt = locate(path)
    config = load_config(ckpt)
    spec = spec_from_config(config)
    context = min(max_context or spec.max_positions, spec.max_positions)
    spec.check_context(context)
    tokenizer = load_tokenizer(ckpt)
    pages = -(-(cache_tokens or min(4 * context, 65536)) // page_size)
    return ckpt, config, spec, context, tokenizer, pages


class HogwildEngine:
    """Runs Hogwild! sessions of one model on one device."""

    def __init__(self, spec, tokenizer, decoder: Decoder, cache: KVPool, allocator: PageAllocator,
                 device: torch.device, max_context: int, label: str, cuda_graphs: bool = False) -> None:
        self.spec, self.tokenizer, self.decoder = spec, tokenizer, decoder
        self.cache, self.allocator, self.device = cache, allocator, device
        self.max_context, self.label = max_context, label
        self.graphs = DecodeGraphs(decoder, cache, max_context) if cuda_graphs else None
        eos = set(spec.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)

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
    ) -> HogwildEngine:
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
        if backend not in ("local", "ray"):
            raise InvalidRequestError(f"backend must be 'local' or 'ray', got {backend!r}")
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise InvalidRequestError(f"tp must be an integer >= 1, got {tp!r}")
        if backend == "local" and tp != 1:
            raise InvalidRequestError(f"tp={tp} needs backend='ray' (the local backend runs one rank)")
        if backend == "local" and (shard_resources or coordinator_resources):
            raise InvalidRequestError("shard_resources and coordinator_resources place Ray actors: they need "
                                      "backend='ray'")
        if backend == "ray":
            if parallel is not None:
                raise InvalidRequestError("parallel= is for one rank of your own process group; "
                                          "backend='ray' builds its ranks itself (use tp=)")
            from .runtime.engine import RayHogwildEngine

            return RayHogwildEngine.create(path, device, dtype, cache_tokens=cache_tokens, page_size=page_size,
                                           max_context=max_context, attention=attention, tp=tp,
                                           ray_address=ray_address, placement_timeout_s=placement_timeout_s,
                                           step_timeout_s=step_timeout_s, shard_resources=shard_resources,
                                           coordinator_resources=coordinator_resources, cuda_graphs=cuda_graphs)
        check_options(attention, page_size, cache_tokens, max_context)
        dev = resolve_device(device)
        graphs = check_graphs(cuda_graphs, attention, dev, parallel)
        dt = resolve_dtype(dtype, dev)
        ckpt, config, spec, context, tokenizer, pages = read_model(path, max_context, cache_tokens, page_size)
        plan = shard_plan(spec, parallel.rank, parallel.world) if parallel and parallel.world > 1 else None
        local = plan.local_spec(spec) if plan else spec  # this rank's head and MLP sizes
        weights = load_weights(spec, weight_reader(ckpt, config), dev, dt, tp=plan)
        cache = KVPool(spec.num_layers, pages, page_size, local.num_kv_heads, spec.head_dim, dt, dev)
        check_attention(attention, dev)
        backend = make_attention(attention, dev, spec.inv_freq, spec.rope_scale, spec.sm_scale,
                                 local.num_kv_heads)
        return cls(spec, tokenizer, Decoder(local, weights, backend, parallel), cache,
                   PageAllocator(pages, page_size), dev, context, ckpt.label, graphs)

    def close(self) -> None:
        """Release what the engine holds (the Ray engine stops its shards); idempotent."""

    def __enter__(self) -> HogwildEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        **protocol_options,
    ) -> Session:
        """Open a session; protocol_options are the fields of ProtocolOptions
        (protocol=False for a plain prompt, redundancy_every, finisher, ...).

        max_tokens: tokens each worker may generate. max_steps: a hard cap on the session's
        forward passes, the finisher's included (the workers stop `finisher_tokens` passes
        early while an answer is still missing, so that the finisher ends by pass max_steps;
        they always get at least one pass). None: no limit."""
        if layout not in LAYOUTS:
            raise InvalidRequestError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if "protocol" in protocol_options:
            protocol_options["enabled"] = protocol_options.pop("protocol")
        known = set(ProtocolOptions.__dataclass_fields__)
        unknown = set(protocol_options) - known
        if unknown:
            raise InvalidRequestError(
                f"unknown option(s) {', '.join(sorted(unknown))}; protocol options are protocol, "
                f"{', '.join(sorted(known - {'enabled'}))}"
            )
        return Session(self, problem, workers, sampling, layout, max_tokens, max_steps,
                       ProtocolOptions(**protocol_options))

    def stream(
        self,
        problem: str,
        workers: int = 2,
        *,
        max_tokens: int | None = 1024,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        layout: str = "combined",
        max_steps: int | None = None,
        on_step: Callable[[Session, dict[int, list[int]]], None] | None = None,
        **protocol_options,
    ) -> Iterator[Event]:
        """Run a session, yielding its events (hogwild_ray.events) as it goes; the last is Done.

        The arguments are those of `solve`. Nothing runs until the first event is asked for;
        leaving the loop early closes the session."""
        session = self.start(problem, workers, sampling=sampling, layout=layout, max_tokens=max_tokens,
                             max_steps=max_steps, **protocol_options)
        yield from session_events(session, on_step)

    def solve(
        self,
        problem: str,
        workers: int = 2,
        *,
        max_tokens: int | None = 1024,
        sampling: SamplingParams | list[SamplingParams] | None = None,
        layout: str = "combined",
        max_steps: int | None = None,
        on_step: Callable[[Session, dict[int, list[int]]], None] | None = None,
        **protocol_options,
    ) -> SolveResult:
        """Run a session to its end (by consuming `stream`); on_step(session, new_tokens) is
        called after each pass."""
        return final_result(self.stream(problem, workers, max_tokens=max_tokens, sampling=sampling,
                                        layout=layout, max_steps=max_steps, on_step=on_step, **protocol_options))

    def solve_many(self, problems: Iterable[str | dict], out: str | Path | None = None, *,
                   progress: bool = True, **options) -> list[dict]:
        """Solve each problem (a string, or a dict with `problem` and an optional `id`); one JSON
        line per result appended to `out`, whose finished ids are skipped (a rerun resumes).
        options: those of `solve`. Returns every problem's record, in input order."""
        from .batch import run_batch

        return run_batch(lambda problem: self.solve(problem, **options), problems, out, progress)

    # ---- the forward pass ------------------------------------------------------------------
    def executor(self, layout: CacheLayout, params: list[SamplingParams]) -> LocalExecutor:
        """Runs a session's passes (layout changes, forward, sampling) on this engine."""
        return LocalExecutor(self, layout, params)

    def run_forward(self, steps: list[WriteStep], table: SampleTable | None = None,
                    staged: Staged | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass over the given writes: logits [len(steps), vocab] and, given a
        sampling table, one sampled id per step (on the device). A decode pass replays a CUDA
        graph, the sampling inside it, when the engine has them; staged: what `stage_decode`
        returned for exactly this pass."""
        groups, tokens, key_pos, slots, last = self._host_batch(steps)
        if self.graphs is not None and self.graphs.serves(groups):
            out = self.graphs.run(groups, tokens, key_pos, slots, table, staged)
            if out is not None:
                return out
        logits = self.decoder.forward(self._device_batch(groups, tokens, key_pos, slots, last), self.cache)
        return logits, None if table is None else sample_eagerly(logits, table)

    def stage_decode(self, views: list[tuple[int, list]], mode: str | None) -> Staged | None:
        """Load the attention plan of a predicted decode pass (one token per view: its position
        and segments, from CacheLayout.preview) while the current pass runs; None without graphs."""
        if self.graphs is None:
            return None
        return self.graphs.stage([QueryGroup(i, 1, pos, segs) for i, (pos, segs) in enumerate(views)], mode)

    @staticmethod
    def _host_batch(steps: list[WriteStep]) -> tuple[list[QueryGroup], list[int], list[int], list[int], list[int]]:
        tokens, key_pos, slots, groups, last = [], [], [], [], []
        for s in steps:
            n = len(s.tokens)
            # the layout's segment views serve as the kernels' segments: one block, one key
            groups.append(QueryGroup(len(tokens), n, s.position, s.segments))
            tokens.extend(s.tokens)
            key_pos.extend(range(s.local_start, s.local_start + n))
            slots.extend(s.slots)
            last.append(len(tokens) - 1)
        return groups, tokens, key_pos, slots, last

    def _device_batch(self, groups: list[QueryGroup], tokens: list[int], key_pos: list[int], slots: list[int],
                      last: list[int]) -> ForwardBatch:
        """The pass's index tensors in one host-to-device copy (asynchronous on CUDA)."""
        t, g = len(tokens), len(last)
        tok, kpos, slot, rows = to_device(tokens + key_pos + slots + last, self.device).split([t, t, t, g])
        return ForwardBatch(tok, kpos, slot, groups, rows)
