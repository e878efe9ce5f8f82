"""What a device is, in words: the CPU's model name and a one-line label of a torch device, for
summaries and bug reports. No torch import at module level (torch is imported only to name a
CUDA device)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_name() -> str:
    """The CPU's model name ("Intel(R) Xeon(R) Platinum 8480+"), from /proc/cpuinfo on Linux
    (platform.processor() is often empty or just "x86_64" there); else platform.machine()."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.machine() or platform.processor() or "unknown CPU"


def cpu_cores() -> int:
    """The cores this process may run on (its affinity where the OS tells, else every core)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def device_label(device: str | torch.device) -> str:
    """A device in words: the GPU's name for a CUDA device ("NVIDIA H200"), else
    "cpu: <model name>, N cores"."""
    text = str(device)
    if text.split(":", 1)[0] == "cuda":
        import torch

        return torch.cuda.get_device_name(torch.device(text))
    if text.split(":", 1)[0] == "cpu":
        cores = cpu_cores()
        return f"cpu: {cpu_name()}, {cores} core{'s' if cores != 1 else ''}"
    return text
