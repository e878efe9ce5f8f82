"""Count the Triton kernels compiled while a benchmark times something, and the seconds they took.

A kernel compiles the first time it meets a new specialisation: a new constexpr value (a tile
size picked from the pass's shape) or an integer argument that newly equals 1 or becomes
divisible by 16. Inside a timed run that shows up as a pass hundreds of times slower than
its neighbours. Triton calls `knobs.runtime.jit_cache_hook` before each compile and
`jit_post_compile_hook` after it; where this Triton has neither, nothing is counted.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Compiles:
    """Compiles seen inside the watch: how many, their seconds, and which kernels."""

    supported: bool = True
    count: int = 0
    seconds: float = 0.0
    kernels: Counter = field(default_factory=Counter)
    signatures: list[str] = field(default_factory=list)  # each compile's kernel and argument types
    _started: list[float] = field(default_factory=list)

    def summary(self) -> str:
        if not self.supported:
            return "not counted (this Triton has no compile hooks)"
        names = ", ".join(f"{k} x{n}" for k, n in self.kernels.most_common())
        return f"{self.count} compiles, {self.seconds:.2f} s" + (f" ({names})" if names else "")


@contextlib.contextmanager
def watch():
    """Yields a `Compiles` that fills while the block runs; the hooks before it come back after."""
    seen = Compiles()
    try:
        from triton import knobs

        runtime = knobs.runtime
        before = (runtime.jit_cache_hook, runtime.jit_post_compile_hook)
    except (ImportError, AttributeError):
        seen.supported = False
        yield seen
        return

    def starting(*, fn, **_):
        seen._started.append(time.perf_counter())
        return before[0](fn=fn, **_) if before[0] else False

    def finished(*, fn, repr, **_):
        if seen._started:
            seen.seconds += time.perf_counter() - seen._started.pop()
        seen.count += 1
        seen.kernels[fn.name.split(".")[-1]] += 1
        seen.signatures.append(repr)
        return before[1](fn=fn, repr=repr, **_) if before[1] else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = starting, finished
    try:
        yield seen
    finally:
        runtime.jit_cache_hook, runtime.jit_post_compile_hook = before
