"""CPU threads for torch: how idle ones wait, and how many there are.

On a machine that other jobs share, torch's OpenMP threads collapse a CPU run: a waiting
thread spins (OMP_WAIT_POLICY=ACTIVE behaviour), taking the core from the thread that holds
the work, so every one of the hundreds of parallel regions in a forward pass waits for a
descheduled thread. Measured on 2 shared cores with two busy processes beside the run,
2 spinning threads ran 4-10x slower than 1 thread; with idle threads asleep (PASSIVE) 2
threads were as fast as 1 under contention and still used both cores when the machine
was quiet (`benchmarks/threads_cpu.py` measures both). So the package asks OpenMP for
passive waiting before torch loads, unless the user chose a policy.

This module must not import torch at import time: the policy is read when torch loads.
"""

from __future__ import annotations

import os

WAIT_POLICY = "OMP_WAIT_POLICY"


def prefer_passive_waiting() -> None:
    """Idle OpenMP threads sleep instead of spinning (kept as the user set it, if set)."""
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (None: OMP_NUM_THREADS when set, else torch's default of
    one per core); returns the number in use."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
