"""Passes of new shapes reuse the compiled attention kernels.

Triton compiles a kernel once per *specialisation*: its constexpr values, and for every other
argument the dtype, whether a pointer is 16-byte aligned and whether an integer is 1 or a
multiple of 16. A plan whose arrays were packed back to back gave each pass its own pattern
of aligned pointers, so on a GPU nearly every eager pass (a header, a prompt chunk, a pass
no graph holds) compiled the attention kernels again, about a second each. Here the
specialisation of every launch is computed with Triton's own binder (what its JIT keys its
kernel cache by), so the check runs on the CPU interpreter.
"""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict

import pytest
import torch

triton = pytest.importorskip("triton")

from hogwild_kernels.plan import PlanCaps, StaticPlan, build_plan, plan_attention  # noqa: E402
from test_triton_kernels import DEVICE, backends, random_case, to_device  # noqa: E402


@contextlib.contextmanager
def launch_keys():
    """Yields {kernel name: set of the specialisations it was launched with, constexprs left out};
    from the interpreter's launches (on a GPU the JIT's own launches are left alone: skip)."""
    try:
        from triton.backends.compiler import BaseBackend
        from triton.runtime import interpreter, jit
    except ImportError as e:
        pytest.skip(f"this Triton lacks the binder used here: {e}")
    if DEVICE.type != "cpu":
        pytest.skip("reads the interpreter's launches (the CPU run)")
    keys: dict[str, set] = defaultdict(set)
    binders = {}
    real_run = interpreter.InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        name = self.fn.__name__
        if name not in binders:
            flags = {k: v for k, v in self.kwargs.items() if k.startswith("do_not_specialize")}
            jf = jit.JITFunction(self.fn, **flags)
            binders[name] = jit.create_function_from_signature(jf.signature, jf.params, BaseBackend)
        launch = {k: kwargs.pop(k) for k in list(kwargs) if k in ("num_warps", "num_stages", "launch_pdl")}
        _, spec, _ = binders[name](*args, **kwargs)
        keys[name].add((tuple(s for s in spec if s[0] != "constexpr"), tuple(sorted(launch.items()))))
        return real_run(self, *args, grid=grid, warmup=warmup, **kwargs, **launch)

    interpreter.InterpretedFunction.run = run
    try:
        yield keys
    finally:
        interpreter.InterpretedFunction.run = real_run


def test_passes_of_every_shape_launch_one_specialisation_of_each_kernel():
    """Passes of 1-6 workers feeding 1-9 tokens each over blocks of many lengths (whose plan
    arrays have every length mod 4), page tables of every width (1 among them) and launches
    that start at any unit: apart from tile sizes (constexprs, a few values each), each
    attention kernel is launched with one specialisation, so the GPU compiles it once."""
    rng = random.Random(5)
    _, tri = backends(64)
    with launch_keys() as keys:
        for case in range(6):
            # pages of 64 keys: every block one page (a page table one wide); of 4: many
            q, k_pool, v_pool, groups = random_case(rng, rng.randint(1, 6), 4, 2, 64, page_size=rng.choice([4, 64]),
                                                    shared=rng.randint(1, 3), max_chunk=rng.choice([1, 3, 9]))
            slots = torch.zeros(q.shape[0], dtype=torch.int64, device=DEVICE)
            tri.attend(q, k_pool, v_pool, tri.prepare(to_device(groups), slots, slots))
    assert {"_rope_shift_partial_kernel", "_merge_partials_kernel"} <= set(keys)
    assert {name: len(k) for name, k in keys.items()} == {name: 1 for name in keys}, keys


@pytest.mark.parametrize("seed", range(6))
def test_every_plan_array_starts_16_byte_aligned_and_holds_the_plan(seed):
    """Eager plans (`plan_attention`) and the graphs' fixed-size buffers (`StaticPlan`)."""
    rng = random.Random(seed)
    q, _, _, groups = random_case(rng, rng.randint(1, 7), 4, 2, 64, shared=rng.randint(1, 3),
                                  max_chunk=rng.choice([1, 2, 5]))
    host = build_plan(groups, q.shape[0], 8, None)
    plan = plan_attention(groups, q.shape[0], 8, torch.device("cpu"), None)
    for name in ("tables", "unit_item", "unit_kstart", "unit_kend", "unit_pair", "unit_npairs",
                 "pair_tok", "pair_delta", "pair_limit", "pair_part", "tok_start"):
        got = getattr(plan, name)
        assert got.data_ptr() % 16 == 0, name
        if name not in ("unit_item", "unit_kstart", "unit_kend", "unit_pair", "unit_npairs"):  # units get sorted
            assert got.numpy().tolist() == host[name].tolist(), name
    assert sorted(zip(plan.unit_item.tolist(), plan.unit_kstart.tolist())) == sorted(
        zip(host["unit_item"].tolist(), host["unit_kstart"].tolist()))
    caps = PlanCaps(tokens=q.shape[0], items=host["tables"].shape[0] + rng.randint(0, 5),
                    pages=host["tables"].shape[1] + rng.randint(0, 5), units=len(host["unit_item"]) + rng.randint(0, 5))
    static = StaticPlan(caps, torch.device("cpu"))
    assert static.fits(host)
    static.load(host)
    for name, n in caps.sizes().items():
        view = getattr(static.plan, name)
        assert view.data_ptr() % 16 == 0 and view.numel() == n, name
    for name in ("pair_tok", "pair_delta", "pair_limit", "pair_part", "tok_start", "unit_item", "unit_npairs"):
        filled = getattr(static.plan, name)[: len(host[name])]
        assert filled.tolist() == host[name].tolist(), name
    table = static.plan.tables[: host["tables"].shape[0], : host["tables"].shape[1]]
    assert table.tolist() == host["tables"].tolist()
