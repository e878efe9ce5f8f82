"""A server's decode graphs captured before its first request.

Each new shape of decode pass is captured in a CUDA graph inside the first pass that meets
it: tens of milliseconds of that request's time, at a moment no client chose (the server
benchmark's tails). As vLLM does at start, a server runs batches of a short throwaway
problem first, one batch per size in core.graph_sizes.warmup_sessions, so the decode passes
its requests make find most of their graphs captured. Their passes and tokens count in the
engine's metrics like any other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .core.graph_sizes import warmup_sessions
from .core.sampling_params import SamplingParams

WARMUP_PROBLEM = "Count from one to twenty, one number a line."
WARMUP_TOKENS = 16  # per worker: every session of a batch decodes together for a few passes


@dataclass(frozen=True)
class GraphWarmUp:
    """What a warm-up did: the batch sizes it ran, the graphs it captured, its wall seconds."""

    sessions: tuple[int, ...]
    captures: int
    seconds: float


def warm_up_graphs(engine: Any, workers: int, max_sessions: int, tokens: int = WARMUP_TOKENS) -> GraphWarmUp:
    """Run WARMUP_PROBLEM in batches of every warmup_sessions(workers, max_sessions) size,
    `tokens` per worker, sampling at the default temperature (the server's default) and, as
    every session ends, greedily (its finisher). Nothing to do without CUDA graphs (a CPU
    engine, or one whose passes run in Ray shards) or with max_sessions 0."""
    graphs = getattr(engine, "graphs", None)  # a Ray-sharded engine's graphs live in its shards
    sizes = warmup_sessions(workers, max_sessions)
    if graphs is None or not sizes:
        return GraphWarmUp((), 0, 0.0)
    before, start = graphs.captures, time.perf_counter()
    for n in sizes:
        engine.solve_many([WARMUP_PROBLEM] * n, max_concurrent=n, workers=workers, max_tokens=tokens,
                          sampling=SamplingParams(seed=n), progress=False)
    return GraphWarmUp(tuple(sizes), graphs.captures - before, time.perf_counter() - start)
