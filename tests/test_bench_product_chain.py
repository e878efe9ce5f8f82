"""product_chain on the CPU: its settings, its refusals, and that the chain it times is the
engine's products (under the Triton interpreter, a tiny shape); its timings are a device's."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
pytest.importorskip("triton")


def test_settings_sweep_every_product_in_every_launch_shape_between_two_plain_chains():
    from product_chain import GLU_CONFIGS, PRODUCTS, settings

    from hogwild_kernels.skinny import CONFIGS

    from product_chain import MLP_LAUNCHES, NEXT_BYTES

    plain = settings(False)
    assert [name for name, _ in plain] == ["chained", "unchained", "activation in gate/up", "products alone, chained",
                                           "one product over every weight",
                                           *(f"chained, {b} B of the next weight's rows ahead" for b in NEXT_BYTES),
                                           f"products alone, chained, {NEXT_BYTES[1]} B ahead",
                                           *MLP_LAUNCHES, "chained"]
    assert [kw.get("next_bytes", 0) for _, kw in plain] == [0] * 5 + list(NEXT_BYTES) + [NEXT_BYTES[1], 0, 0, 0, 0]
    assert [kw["mlp"] for _, kw in plain if "mlp" in kw] == list(MLP_LAUNCHES.values()) == ["one", "one2", "two"]
    swept = settings(True)
    assert swept[0] == swept[-1] == ("chained", {})
    configs = [kw["configs"] for _, kw in swept if "configs" in kw and not kw.get("glu")]
    assert configs == [{p: c} for p in PRODUCTS for c in CONFIGS]
    folded = [kw["configs"] for _, kw in swept if "configs" in kw and kw.get("glu")]
    assert folded == [{"gate_up": c} for c in GLU_CONFIGS]


def test_the_engine_shapes_row_has_the_products_an_engine_would_launch_otherwise():
    """Where skinny.choose timed a shape other than pick's faster than cuBLAS, a chained engine
    takes it: those products, and only those, get a row of their own."""
    from product_chain import Chain, settings

    from hogwild_kernels.skinny import pick

    chain = Chain("tiny", 1, 1, torch.device("cpu"), torch.float16)
    qkv, down = chain.shapes["qkv"], chain.shapes["down"]
    other = (16, 512, 4, 4)
    assert other != pick(*qkv)
    chosen = {(*qkv, 1): other, (*qkv, 16): pick(*qkv), (*down, 1): pick(*down), (*chain.shapes["o"], 1): None}
    engine = chain.engine_configs(chosen)
    assert engine == {"qkv": other}
    assert (f"chained, the engine's shapes {engine}", {"configs": engine}) in settings(False, engine)
    assert chain.engine_configs({(*down, 1): pick(*down)}) == {}
    assert not any(name.startswith("chained, the engine") for name, _ in settings(False, {}))


def test_the_start_up_timing_sees_every_product_shape_with_a_few_layers_of_weights(monkeypatch):
    """timed_alone hands skinny.choose what an engine's decoder does: each weight shape with up to
    four layers' copies (one LM head). choose itself times on a GPU; here it only reports."""
    import hogwild_kernels.skinny as skinny
    from product_chain import Chain

    seen = {}
    monkeypatch.setattr(skinny, "choose", lambda weights: seen.update(weights) or {"timed": True})
    chain = Chain("tiny", 6, 1, torch.device("cpu"), torch.float16)
    assert chain.timed_alone() == {"timed": True}
    assert {k: len(v) for k, v in seen.items()} == {**{chain.shapes[p]: 4 for p in ("qkv", "o", "gate_up", "down")},
                                                   chain.shapes["lm_head"]: 1}
    assert seen[chain.shapes["down"]][1] is chain.weights[1]["down"]


@pytest.mark.parametrize("args, named", [(["--rows", "17"], "--rows 17"), (["--rows", "0"], "--rows 0"),
                                         (["--layers", "0"], "--layers: must be an integer >= 1"),
                                         (["--replays", "0"], "--replays: must be an integer >= 1")])
def test_bad_arguments_are_refused_before_anything_runs(capsys, args, named):
    import product_chain

    with pytest.raises(SystemExit) as stop:
        product_chain.main(args)
    assert stop.value.code == 2 and named in capsys.readouterr().err


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the interpreter's check (CPU tensors); on a GPU test_triton_kernels checks the kernels' bits")
def test_the_chain_is_the_pass_without_attention_and_its_activation_fold_the_same_bits():
    """On the CPU (interpreted kernels, unchained; fp16: the interpreter has no bf16 dots): logits
    of the vocabulary's width, the same bits with the SiLU in the gate/up product's epilogue,
    and what torch's ops give."""
    from product_chain import Chain

    from hogwild_ray.model.decoder import rms_norm

    torch.manual_seed(0)
    chain = Chain("tiny", 2, 2, torch.device("cpu"), torch.float16)
    got = chain.run(chained=False)
    assert got.shape == (2, chain.shapes["lm_head"][0]) and torch.isfinite(got.float()).all()
    assert torch.equal(chain.run(chained=False, glu=True), got)
    x, delta = chain.x, None
    for lw in chain.weights:
        x = x if delta is None else (x.float() + delta.float()).to(x.dtype)
        o = (rms_norm(x, chain.norm, chain.eps) @ lw["qkv"].T)[:, : chain.attn_width] @ lw["o"].T
        x = (x.float() + o.float()).to(x.dtype)
        gate, up = (rms_norm(x, chain.norm, chain.eps) @ lw["gate_up"].T).chunk(2, dim=-1)
        delta = (torch.nn.functional.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype) @ lw["down"].T
    x = (x.float() + delta.float()).to(x.dtype)
    want = rms_norm(x, chain.norm, chain.eps) @ chain.lm_head.T
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.05)


def test_the_boundary_rows_read_the_same_weights_with_fewer_kernels(monkeypatch):
    """One product over every weight is each weight's product side by side (one buffer, the LM head
    last); the products alone are the chain's products fed one another's outputs, no norm or SiLU.
    The products here are torch's (the skinny kernel itself is tested in test_triton_kernels): what
    is checked is which weights each row reads, and in what order."""
    import hogwild_kernels.skinny as skinny
    from product_chain import Chain

    calls, handed = [], []

    def product(x, w, bias=None, config=None, chained=False, glu=False, prefetch=0, next_weight=None, next_bytes=0):
        calls.append(w)
        handed.append((next_weight, next_bytes))
        return torch.nn.functional.linear(x, w)

    monkeypatch.setattr(skinny, "skinny_linear", product)
    torch.manual_seed(0)
    chain = Chain("tiny", 2, 2, torch.device("cpu"), torch.float16)
    weights = [w for lw in chain.weights for w in lw.values()] + [chain.lm_head]
    assert chain.nbytes == sum(w.numel() * w.element_size() for w in weights)
    rows = torch.cat([w.reshape(-1, chain.x.shape[1]) for w in weights])
    assert torch.equal(chain.every_weight, rows)  # every weight's elements, in order, once
    assert all(w.untyped_storage().data_ptr() == chain.flat.untyped_storage().data_ptr() for w in weights)
    one = chain.run(chained=False, one_product=True)
    assert [w is chain.every_weight for w in calls] == [True] and one.shape == (2, rows.shape[0])
    calls.clear()
    x = chain.x
    for lw in chain.weights:
        o = (x @ lw["qkv"].T)[:, : chain.attn_width] @ lw["o"].T
        x = (o @ lw["gate_up"].T)[:, : chain.inter] @ lw["down"].T
    assert torch.equal(chain.run(chained=False, products_alone=True), x @ chain.lm_head.T)
    assert [id(w) for w in calls] == [id(w) for w in weights]  # each product once, in the pass's order
    calls.clear(), handed.clear()
    chain.run(chained=False, products_alone=True, next_bytes=2048)  # each hands on the next one's weight
    assert [id(n) for n, _ in handed[:-1]] == [id(w) for w in weights[1:]] and handed[-1][0] is None
    assert {b for _, b in handed} == {2048}


def test_boundary_costs_split_the_chain_into_product_boundaries_and_small_kernels():
    from product_chain import ONE_PRODUCT, PRODUCTS_ALONE, boundary_costs

    rows = [{"setting": "chained", "us": 1100.0}, {"setting": PRODUCTS_ALONE, "us": 1000.0},
            {"setting": ONE_PRODUCT, "us": 900.0}, {"setting": "chained", "us": 1140.0}]
    costs = boundary_costs(rows, layers=10)  # 41 products: 40 boundaries; 31 small kernels
    assert costs == {"product_boundary_us": 100.0 / 40, "small_kernel_us": 120.0 / 31}
    assert boundary_costs(rows[:2], layers=10) == {}
