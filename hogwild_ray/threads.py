"""CPU threads for torch: as many as the machine has free, re-decided while a run goes on.

torch's default of one intra-op thread per core is the fastest on a quiet machine and
collapses on one shared with other jobs: every one of the hundreds of parallel regions in a
forward pass waits for a thread the OS has descheduled. No fixed setting is good in both
(`benchmarks/threads_cpu.py` measures them side by side), so unless the user fixed the
count (`--threads`, `OMP_NUM_THREADS`, or `set_threads`) a governor looks every second at
how much CPU the rest of the machine is using (the kernel's counters in /proc/stat against
this process's own CPU time) and gives torch the cores that are left, at least one.

No torch import at module level; the kernel counters are read only on Linux and only where
this process may use every CPU the kernel counts (elsewhere torch's default stays).
"""

from __future__ import annotations

import os
import time

INTERVAL_S = 1.0  # between decisions: long enough to average a few forward passes
STAT = "/proc/stat"


def cpu_counters() -> tuple[float, float] | None:
    """(idle, total) seconds summed over every CPU since boot, or None where the kernel does not say."""
    try:
        with open(STAT) as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    hz = os.sysconf("SC_CLK_TCK")
    return (ticks[3] + ticks[4]) / hz, sum(ticks) / hz


def machine_cpus() -> int | None:
    """How many CPUs /proc/stat counts (the whole machine's, also inside a container)."""
    try:
        with open(STAT) as f:
            return sum(1 for line in f if line.startswith("cpu") and line[3:4].isdigit())
    except OSError:
        return None


def threads_for(cores: int, busy_elsewhere: float) -> int:
    """The intra-op threads to use when other processes keep `busy_elsewhere` cores busy. Pure."""
    return max(1, min(cores, round(cores - busy_elsewhere)))


class ThreadGovernor:
    """Sets torch's thread count to the cores other processes leave free; `tick()` after each pass."""

    def __init__(self, interval_s: float = INTERVAL_S, clock=time.perf_counter, cpu_time=time.process_time,
                 counters=cpu_counters) -> None:
        self.clock, self.cpu_time, self.counters = clock, cpu_time, counters
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.interval_s = interval_s
        self.enabled = self.cores > 1 and machine_cpus() == self.cores
        self.last: tuple[float, float, float, float] | None = None  # wall, own cpu, idle, total
        self.pending: int | None = None  # a change seen once; made when seen twice in a row
        self.decisions: list[int] = []

    def tick(self) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if self.last is not None and now - self.last[0] < self.interval_s:
            return
        counters = self.counters()
        if counters is None:
            self.enabled = False
            return
        sample = (now, self.cpu_time(), *counters)
        if self.last is not None:
            wall, own, idle, total = (b - a for a, b in zip(self.last, sample))
            if wall > 0 and total > 0:
                used = (total - idle) / total * self.cores  # cores busy on the whole machine
                self.decide(threads_for(self.cores, max(0.0, used - own / wall)))
        self.last = sample

    def decide(self, target: int) -> None:
        import torch

        current = torch.get_num_threads()
        if target == current:
            self.pending = None
        elif self.pending == target:
            torch.set_num_threads(target)
            self.decisions.append(target)
            self.pending = None
        else:
            self.pending = target


_governor: ThreadGovernor | None = None
_fixed = False  # set_threads(n) was called: the user's count stays


def set_threads(threads: int | None) -> int:
    """Fix torch's intra-op thread count in this process (`--threads`); None: OMP_NUM_THREADS when
    set, else the governor decides. Returns the count in use now."""
    import torch

    global _governor, _fixed
    if threads is not None:
        from .errors import check_int

        check_int("threads", threads, 1)
        torch.set_num_threads(threads)
        _governor, _fixed = None, True
    else:
        _fixed = False
        govern()
    return torch.get_num_threads()


def govern() -> None:
    """Start the governor for CPU engines, unless the count was fixed (set_threads, OMP_NUM_THREADS)."""
    global _governor
    if _governor is None and not _fixed and not os.environ.get("OMP_NUM_THREADS"):
        _governor = ThreadGovernor()


def tick() -> None:
    """Called after each CPU forward pass: lets the governor (when on) re-decide."""
    if _governor is not None:
        _governor.tick()


def governor() -> ThreadGovernor | None:
    return _governor
