"""The device's memory bandwidth, measured once, the same way, for every benchmark's floor.

Two plain operations over a buffer well past the caches (1 GiB on a GPU), each launched on
its own (no CUDA graph: a copy captured in a graph reads about 1.5x low on an H200, which
once made a kernel look faster than the memory), timed with CUDA events (host clocks on the
CPU), many iterations, the median kept; on a GPU the best of three such samples (a benchmark
measures as it starts, while the GPU may still be leaving its idle clocks):

* copy: a device-to-device copy, counted as the bytes read plus the bytes written;
* read: a kernel that only reads the buffer once (as a decode pass reads its weights and
  K/V): on a GPU a Triton kernel of 16-byte loads, several in flight per thread, writing one
  word per program, in a few launch shapes, PyTorch's SDPA decoding one query per head
  over the buffer as its K/V (a library's streaming kernel), and the decode products' skinny
  kernel multiplying one row by the buffer as a [rows, 4096] weight (on an H100 one such
  product over 15 GB read 3.21 TB/s where the other probes read 3.00-3.02 in the same run);
  the fastest kept. On the CPU, torch's sum.

The floor's bandwidth is the largest of these: the fastest the device was seen to move
bytes, so a time over it is a lower bound no kernel can beat. A benchmark that times
streaming kernels of its own notes what they achieved (`note`), and the floor rises to it
when that is faster still (on an H200, SDPA over a 4 GB cache read about 6% faster than
the Triton probe). A figure above 100% of a floor is then impossible by construction;
`over_floor` checks it anyway.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field

import torch

from common import significant

METHOD = ("max(device-to-device copy: (read + written) bytes / time, read-only kernels (Triton streaming reads; "
          "SDPA decoding over the buffer as K/V; the skinny product of one row by the buffer as a [rows, 4096] "
          "weight): read bytes / time, kernels timed in the same run: their bytes / "
          "time); each op launched alone (no CUDA graph), the median: on a GPU 1 GiB, 50 runs, CUDA events, the "
          "best of 3 such samples; on the CPU host clocks, 10 runs")
GPU_BYTES = 1 << 30
GPU_SAMPLES = 3
CPU_BYTES = 256 << 20


@dataclass
class Bandwidth:
    """Bytes per second of each sample; `value` is the floor's bandwidth (the best of all)."""

    device: str
    nbytes: int
    copies: list[float] = field(default_factory=list)
    reads: list[float] = field(default_factory=list)
    seen: dict[str, float] = field(default_factory=dict)  # kernels a benchmark timed: bytes / s

    @property
    def value(self) -> float:
        return max(self.copies + self.reads + list(self.seen.values()))

    def note(self, what: str, nbytes: float, seconds: float) -> None:
        """A streaming kernel timed beside the probes: the floor rises to its speed if that is higher."""
        self.seen[what] = max(self.seen.get(what, 0.0), nbytes / seconds)

    @property
    def gbs(self) -> float:
        return self.value / 1e9

    def sample(self, iters: int | None = None) -> Bandwidth:
        """Measure once more (a shared machine's load comes and goes: the best sample is kept)."""
        dev = torch.device(self.device)
        iters = iters or (50 if dev.type == "cuda" else 10)
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32  # what the models stream on each
        x = torch.rand(self.nbytes // dtype.itemsize, device=dev).to(dtype)  # never zeros: they can run faster
        y = torch.empty_like(x)
        self.copies.append(2 * self.nbytes / _median_seconds(lambda: y.copy_(x), dev, iters))
        self.reads.append(max(self.nbytes / _median_seconds(fn, dev, iters) for fn in _readers(x)))
        del x, y
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return self

    def meta(self) -> dict:
        # five significant figures: a GPU's 4174.3 GB/s as a loaded CPU's 0.97612 (one decimal place
        # made that 1.0, and every roofline read from the file 2.5% off the run's)
        gbs = lambda xs: [significant(v / 1e9, 5) for v in xs]  # noqa: E731
        return {"floor_bandwidth_gbs": significant(self.gbs, 5), "bandwidth_method": METHOD,
                "bandwidth_bytes": self.nbytes,
                "copy_samples_gbs": gbs(self.copies), "read_samples_gbs": gbs(self.reads),
                "seen_gbs": {k: significant(v / 1e9, 5) for k, v in self.seen.items()}}


def measure(device: torch.device | str, nbytes: int | None = None, iters: int | None = None,
            samples: int | None = None) -> Bandwidth:
    """The device's bandwidth: `samples` samples of each operation, the best kept (`.sample()`
    adds more). On a GPU three by default: one sample once read about 5% low on an H100 (2.88
    against 3.01-3.05 TB/s in four other processes of the same device run), which lowers the
    floor and flatters every ratio to it; a benchmark measures as it starts, when the GPU may
    still be leaving its idle clocks. On the CPU one."""
    dev = torch.device(device)
    size = nbytes or (GPU_BYTES if dev.type == "cuda" else CPU_BYTES)
    if samples is None:
        samples = GPU_SAMPLES if dev.type == "cuda" else 1
    if samples < 1:
        raise ValueError(f"samples: at least 1, got {samples}")
    bw = Bandwidth(str(dev), size)
    for _ in range(samples):
        bw.sample(iters)
    return bw


def _readers(x: torch.Tensor) -> list:
    """Functions that read x once and write next to nothing (on a GPU, in a few launch shapes;
    a shape this GPU's compiler refuses is left out)."""
    if x.device.type != "cuda":
        return [lambda: x.sum(dtype=torch.float32)]
    from read_kernel import readers

    working = []
    for fn in readers(x.view(torch.int32)) + [_sdpa_reader(x), _product_reader(x)]:
        try:
            fn()
            working.append(fn)
        except Exception as e:  # a Triton compilation error: the other shapes still measure
            print(f"bandwidth.py: a read kernel shape failed ({type(e).__name__}: {str(e)[:120]}); left out")
    return working or [lambda: x.sum(dtype=torch.float32)]


def _sdpa_reader(x: torch.Tensor):
    """SDPA decoding 32 query heads, one query each, over the buffer's halves as K and V (8 KV
    heads of dim 128): every byte read once, a few KB written."""
    import torch.nn.functional as F

    half = x.numel() // 2
    rows = half // (8 * 128)
    batch = 16 if rows % 16 == 0 else 1
    k = x[:half][: batch * 8 * (rows // batch) * 128].view(batch, 8, rows // batch, 128)
    v = x[half:2 * half][: k.numel()].view(k.shape)
    q = torch.rand(batch, 32, 1, 128, device=x.device).to(x.dtype)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _product_reader(x: torch.Tensor, width: int = 4096):
    """The decode products' skinny kernel: one row times the buffer as a [rows, width] weight (its
    whole rows), as a decode pass reads its weights: every byte read once, 2 bytes a weight row written."""
    from hogwild_kernels.skinny import skinny_linear

    weight = x[: x.numel() // width * width].view(-1, width)
    row = torch.rand(1, width, device=x.device).to(x.dtype)
    return lambda: skinny_linear(row, weight)


def _median_seconds(fn, device: torch.device, iters: int) -> float:
    fn()  # warm-up: allocation, the kernel's first launch
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def over_floor(rows: list[dict], key: str, limit: float = 1.0 + 1e-9) -> list[dict]:
    """Rows whose fraction of the floor (rows[i][key]) is above 1: impossible, so a measurement bug."""
    return [r for r in rows if r.get(key) is not None and r[key] > limit]
