"""The sizes CUDA graphs are captured at, and the batches a server warms them up with.

Pure arithmetic: the decode graphs (hogwild_ray.model.graphs) pad every pass to
`captured_size` tokens and groups, and a server captures ahead the graphs that batches of
`warmup_sessions` sessions run into (hogwild_ray.graph_warmup).
"""

from __future__ import annotations


def pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1)."""
    return 1 << max(0, (x - 1).bit_length())


def captured_size(n: int) -> int:
    """The tokens (or groups) of the graph that serves a pass of n: a power of two up to 8,
    then a multiple of 16 (the skinny products' row tile: padding within it costs nothing),
    then of 64 past 256."""
    if n <= 8:
        return pow2(n)
    step = 16 if n <= 256 else 64
    return -(-n // step) * step


def warmup_sessions(workers: int, max_sessions: int) -> list[int]:
    """Batch sizes (sessions of `workers` workers decoding together) that meet every padded
    size of a decode pass up to max_sessions sessions: for each captured_size of
    sessions x workers, the fewest and the most sessions that pad to it (the blocks a pass
    reads grow with its sessions, and a graph is kept per power of two of them, so both ends
    of a size's range are worth a capture)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if max_sessions < 0:
        raise ValueError(f"max_sessions must be >= 0 (0: no warm-up), got {max_sessions}")
    ends: dict[int, list[int]] = {}
    for n in range(1, max_sessions + 1):
        span = ends.setdefault(captured_size(n * workers), [n, n])
        span[1] = n
    return sorted({n for span in ends.values() for n in span})
