"""The floor's bandwidth helper on the CPU: samples kept, the best one the floor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_the_floor_is_the_best_of_every_sample():
    from bandwidth import measure

    bw = measure("cpu", nbytes=1 << 20, iters=2, samples=3)
    assert len(bw.copies) == len(bw.reads) == 3
    assert bw.value == max(bw.copies + bw.reads) > 0
    assert len(measure("cpu", nbytes=1 << 20, iters=2).copies) == 1  # one sample on the CPU by default
    bw.note("a kernel", 10 * bw.value, 1.0)  # a kernel seen faster than the probes raises the floor
    assert bw.value == pytest.approx(10 * max(bw.copies + bw.reads))


def test_the_saved_floor_keeps_a_slow_device_exact_enough_for_its_rooflines():
    """A loaded CPU's floor of about 1 GB/s is saved to five significant figures, not one decimal
    place, so a roofline computed from the file agrees with the run's (within 0.01%)."""
    from bandwidth import Bandwidth

    slow = Bandwidth("cpu", 1 << 20, copies=[0.97612345e9], reads=[0.5e9], seen={"a kernel": 0.3e9})
    meta = slow.meta()
    assert meta["floor_bandwidth_gbs"] == pytest.approx(slow.gbs, rel=1e-4)
    assert meta["copy_samples_gbs"] == [0.97612] and meta["seen_gbs"] == {"a kernel": 0.3}
    fast = Bandwidth("cuda", 1 << 30, copies=[4174.34e9])
    assert fast.meta()["floor_bandwidth_gbs"] == 4174.3


def test_no_samples_is_refused():
    from bandwidth import measure

    with pytest.raises(ValueError, match="samples: at least 1"):
        measure("cpu", nbytes=1 << 20, iters=2, samples=0)


def test_the_product_probe_reads_the_whole_buffer_as_one_weight():
    """The skinny kernel's read (a GPU's probe; on the GPU where there is one, else under the
    interpreter): one row times the buffer as a [rows, width] weight, every element of it read,
    one output per weight row."""
    pytest.importorskip("triton")
    import torch
    from bandwidth import _product_reader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.rand(64 * 96 + 5, device=device).to(torch.float16)
    x[64 * 96:] = float("nan")  # a ragged tail past the last whole row: not part of the weight
    torch.manual_seed(0)
    out = _product_reader(x, width=64)()
    assert out.shape == (1, 96) and torch.isfinite(out).all()
    weight = x[: 64 * 96].view(96, 64).float()
    torch.manual_seed(0)
    row = torch.rand(1, 64, device=device).to(torch.float16).float()
    torch.testing.assert_close(out.float(), row @ weight.T, atol=2e-2, rtol=2e-2)
