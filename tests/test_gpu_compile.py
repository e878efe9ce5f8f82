"""Every Triton kernel of the package compiles for the GPU on any machine, each path as meant
(gpu_compile.py: the package's own launches, compiled and not run): for Hopper (sm_90, our
machines) every configuration, for the A100 (sm_80) those the engine runs there (unchained)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from hogwild_kernels.backends import PARTIAL_STAGES, PIPELINED_ROWS, PIPELINED_STAGES  # noqa: E402

HERE = Path(__file__).parent
RECORD = "gpu_compile: "  # gpu_compile.RECORD (it cannot be imported here: it refuses the interpreter)
PACKAGE = HERE.parent / "kernels" / "hogwild_kernels"


def defined_kernels() -> set[str]:
    """The package's kernels: decorated module-level functions named *_kernel."""
    return {fn.name for path in PACKAGE.glob("*.py") for fn in ast.parse(path.read_text()).body
            if isinstance(fn, ast.FunctionDef) and fn.name.endswith("_kernel") and fn.decorator_list}


ARCHS = (90, 80)


@pytest.fixture(scope="module")
def launches() -> list[dict]:
    """One record per launch the configurations made for each arch: its kernel, constexprs,
    PTX markers, registers and spills, or a configuration's error. The compiler runs in a
    process of its own per arch, without the interpreter the other tests set."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    records = []
    for arch in ARCHS:
        done = subprocess.run([sys.executable, str(HERE / "gpu_compile.py"), "--arch", str(arch)], env=env,
                              capture_output=True, text=True, timeout=1200)
        got = [json.loads(line[len(RECORD):]) for line in done.stdout.splitlines() if line.startswith(RECORD)]
        assert got, f"nothing compiled for sm_{arch} (exit {done.returncode}): {done.stderr[-3000:]}"
        records += got
    return records


def test_every_configuration_compiles_for_hopper_and_the_a100(launches):
    failed = [f"sm_{r['arch']}, {r['config']}: {r['error']}\n{r['trace']}" for r in launches if "error" in r]
    assert not failed, "\n\n".join(failed)


def test_every_kernel_of_the_package_is_compiled_for_each_arch(launches):
    """A new kernel is compiled here too, or this names it; the A100 runs every kernel unchained."""
    for arch in ARCHS:
        missing = defined_kernels() - {r["kernel"] for r in launches if "kernel" in r and r["arch"] == arch}
        assert not missing, f"kernels no configuration of gpu_compile.py launches for sm_{arch}: {sorted(missing)}"
    assert not any(r["constexprs"].get("CHAINED") for r in launches if "kernel" in r and r["arch"] < 90)


def test_each_path_compiles_to_what_it_is_for(launches):
    """Chained launches wait for their predecessor (and only they); descriptor pages are copied
    by the tensor-memory engine; wide row tiles and chained products prefetch into the L2
    cache (their own weights, and the next product's where given); pages looked up a tile
    ahead with three stages keep the next tile's copies in flight; long units read 128-key tiles; rows just past a power of two take two row tiles; the exact
    (fp32) path is compiled too."""
    ran = [r for r in launches if "kernel" in r and r["arch"] == 90]
    for r in ran:
        chained = bool(r["constexprs"].get("CHAINED"))
        assert ("chain_wait" in r["markers"]) == chained, r
    partial = [r for r in ran if r["kernel"] == "_rope_shift_partial_kernel"]
    for r in partial:
        assert ("tensor_copy" in r["markers"]) == bool(r["constexprs"]["TMA"]), r
        if r["constexprs"]["AHEAD"] or r["constexprs"]["PREFETCH_KEYS"]:
            assert "l2_prefetch" in r["markers"], r
        if r["constexprs"]["PAGES_AHEAD"] and r["constexprs"]["num_stages"] >= 3:  # the next tile's copies in flight
            assert "pipelined" in r["markers"], r
        if r["constexprs"]["CHAINED"] and not r["constexprs"]["TMA"] and "a tile ahead" not in r["config"]:
            # by default a chained launch of narrow 64-key tiles looks its pages up ahead, three stages
            narrow = r["constexprs"]["BLOCK_M"] <= PIPELINED_ROWS and r["constexprs"]["BLOCK_N"] == 64
            assert bool(r["constexprs"]["PAGES_AHEAD"]) == narrow, r
            assert r["constexprs"]["num_stages"] == (PIPELINED_STAGES if narrow else PARTIAL_STAGES), r
    assert any(r["constexprs"]["CHAINED"] and r["constexprs"]["PAGES_AHEAD"] for r in partial)
    assert any(r["constexprs"]["TMA"] for r in partial) and any(r["constexprs"]["AHEAD"] for r in partial)
    # rows just past a power of two in two row tiles (prefetching ahead as wide tiles do), chained or not
    split = [r for r in partial if r["constexprs"]["BLOCK_M2"]]
    assert {r["constexprs"]["CHAINED"] for r in split} == {True, False} and all(r["constexprs"]["AHEAD"] for r in split)
    assert sum(r["constexprs"]["PAGES_AHEAD"] for r in partial) >= 2
    assert {64, 128} <= {r["constexprs"]["BLOCK_N"] for r in partial}
    assert any(r["constexprs"]["IEEE"] for r in partial)
    products = [r for r in ran if r["kernel"] == "_skinny_kernel"]
    assert all("l2_prefetch" in r["markers"] for r in products if r["constexprs"]["PREFETCH"])
    ahead = [r for r in products if r["constexprs"].get("NEXT_LINES")]  # the next weight asked for (chained only)
    assert ahead and all(r["constexprs"]["CHAINED"] and "l2_prefetch" in r["markers"] for r in ahead)
    assert {True, False} <= {r["constexprs"]["GLU"] for r in products}


def test_the_default_paths_spill_no_registers(launches):
    """A spill to local memory costs a hot loop memory traffic of its own: every path the engine
    takes by default (the descriptor pages are an option) fits the registers (the widest row
    tile takes 255 of them, the most a thread has)."""
    spilled = [(r["config"], r["kernel"], r["spill_bytes"]) for r in launches
               if "kernel" in r and r["spill_bytes"] and not r["constexprs"].get("TMA")]
    assert not spilled, spilled
    assert all(0 < r["registers"] <= 255 for r in launches if "kernel" in r)
