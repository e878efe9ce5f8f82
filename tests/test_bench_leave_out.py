"""leave_out on the CPU: its settings, that every kernel it leaves out is one a pass launches
(a tiny engine's pass under the Triton interpreter), and that the kernels come back after; its
timings are a device's."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("triton")


def test_settings_name_kinds_and_groups_in_one_order():
    from leave_out import leave_out_setting

    assert leave_out_setting("none") == ()
    assert leave_out_setting("merge") == ("merge",)
    assert leave_out_setting("attention") == ("merge", "partials", "append")
    assert leave_out_setting("silu+norms") == ("norms", "silu")
    assert leave_out_setting("small") == ("merge", "append", "norms", "silu")
    assert leave_out_setting("attention+merge") == leave_out_setting("attention")
    for bad in ("", "mergee", "merge+", "none+merge"):
        with pytest.raises(ValueError, match="no kind of kernel.*merge, partials, append, norms, silu, attention"):
            leave_out_setting(bad)


def test_every_kind_names_a_triton_kernel_of_its_module():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from leave_out import KINDS

    for kind, kernels in KINDS.items():
        for module_name, name in kernels:  # (under the interpreter, Triton's stand-in for a compiled kernel)
            kernel = getattr(importlib.import_module(module_name), name)
            assert isinstance(kernel, (JITFunction, InterpretedFunction)) and kernel.__name__ == name, (kind, name)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs a CPU engine's Triton kernels under the interpreter (a GPU machine's Triton "
                           "compiles for the GPU only; there the benchmark itself is the check)")
def test_a_pass_reaches_every_kernel_left_out_and_they_come_back():
    """A tiny engine's decode pass with every kind left out: each stand-in counts launches (a launch
    site that held its kernel would leave it at none: the leave-out would measure nothing), and
    after the block, even one that raised, every module holds its kernel again."""
    import hogwild_ray as hw
    from leave_out import KINDS, NotLaunched, left_out, unreached

    originals = {(m, n): getattr(importlib.import_module(m), n) for kernels in KINDS.values() for m, n in kernels}
    engine = hw.HogwildEngine.from_pretrained("random:tiny", "cpu", "float32", cache_tokens=1024, attention="triton")
    session = engine.start("Compute 12 + 30.", workers=2, max_tokens=4, protocol=False,
                           sampling=hw.SamplingParams(seed=1))
    try:
        engine.step([session])  # the prompt, launched as usual
        with left_out(tuple(KINDS)) as stand_ins:
            assert all(isinstance(getattr(importlib.import_module(m), n), NotLaunched) for m, n in originals)
            engine.step([session])
        layers = engine.runner.decoder.spec.num_layers
        assert stand_ins["_merge_partials_kernel"].launches == layers
        assert stand_ins["_kv_append_kernel"].launches == layers
        assert stand_ins["_add_rms_norm_kernel"].launches >= 2 * layers + 1  # two a layer and the last
        assert unreached(stand_ins) == [] and unreached(stand_ins, ()) == ["_qk_norm_kv_append_kernel"]
        assert {(m, n): getattr(importlib.import_module(m), n) for m, n in originals} == originals
        with pytest.raises(RuntimeError, match="inside"):
            with left_out(("merge", "silu")):
                raise RuntimeError("inside")
        assert {(m, n): getattr(importlib.import_module(m), n) for m, n in originals} == originals
    finally:
        session.close()


def test_main_refuses_an_unknown_kind_in_one_line(capsys):
    import leave_out

    with pytest.raises(SystemExit) as e:
        leave_out.main(["--leave-out", "none,merge,mlp"])
    assert e.value.code == 2
    assert "'mlp' is no kind of kernel" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_main_without_a_gpu_says_so(capsys):
    import leave_out

    with pytest.raises(SystemExit) as e:
        leave_out.main(["--leave-out", "none"])
    assert e.value.code == 2
    assert "torch sees no GPU" in capsys.readouterr().err
