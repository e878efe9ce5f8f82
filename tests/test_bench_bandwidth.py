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


def test_no_samples_is_refused():
    from bandwidth import measure

    with pytest.raises(ValueError, match="samples: at least 1"):
        measure("cpu", nbytes=1 << 20, iters=2, samples=0)
