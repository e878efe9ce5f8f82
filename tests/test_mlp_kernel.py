"""The MLP block in one launch (hogwild_kernels/mlp.py): its two phases under the interpreter
give what the skinny products give, bit for bit; on a GPU the one launch with its barrier
gives the two launches' bits, replay after replay (the barrier's words left as found)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16  # the interpreter lacks bf16 dots
# tiles that divide the small shapes below: 16 features and 64-wide steps; 32 columns and 64-wide steps
SMALL = (16, 64, 32, 64, 4, 2)


def _weights(rows: int, hidden: int, inter: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=g).to(DEVICE, DTYPE)
    gate_up = (torch.randn(2 * inter, hidden, generator=g) / hidden**0.5).to(DEVICE, DTYPE)
    down = (torch.randn(hidden, inter, generator=g) / inter**0.5).to(DEVICE, DTYPE)
    return x, gate_up, down


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_the_two_phases_give_the_skinny_products_bits(rows):
    """Two launches, GATE_UP then DOWN: silu_mul of the gate/up product then the down product, as the skinny
    kernel computes them with the same tiles, to the bit; and within rounding of fp32 torch."""
    from hogwild_kernels.mlp import glu_down
    from hogwild_kernels.skinny import skinny_linear

    x, gate_up, down = _weights(rows, 128, 192, rows)
    got = glu_down(x, gate_up, down, one_launch=False, config=SMALL)
    act = skinny_linear(x, gate_up, config=(16, 64, 4, 2), glu=True)
    assert torch.equal(got, skinny_linear(act, down, config=(32, 64, 4, 2)))
    g, u = (x.float() @ gate_up.float().T).chunk(2, dim=-1)
    want = (torch.nn.functional.silu(g) * u) @ down.float().T
    assert ((got.float() - want).norm() / want.norm()).item() < 2e-2
    # a few programs dealt every tile in turn: the same bits
    assert torch.equal(glu_down(x, gate_up, down, one_launch=False, config=SMALL, programs=3), got)


def test_bad_shapes_and_settings_are_refused_before_any_launch():
    from hogwild_kernels.mlp import glu_down

    x, gate_up, down = _weights(2, 128, 192, 0)
    many = torch.zeros(17, 128, dtype=DTYPE, device=DEVICE)
    for args, named in [((x, gate_up[1:], down), "gate/up weight"), ((x, gate_up, down.T.contiguous()), "down weight"),
                        ((many, gate_up, down), "1 to 16 half-precision rows"),
                        ((x.float(), gate_up, down), "of their dtype")]:
        with pytest.raises(ValueError, match=named):
            glu_down(*args, config=SMALL)
    with pytest.raises(ValueError, match="must divide"):
        glu_down(x, gate_up, down, config=(128, 64, 32, 64, 4, 2))  # 128 features do not divide 192
    with pytest.raises(ValueError, match="count of bytes"):
        glu_down(x, gate_up, down, config=SMALL, prefetch=-1)
    if DEVICE.type != "cuda":  # the barrier would wait for programs the interpreter runs later
        with pytest.raises(ValueError, match="needs a GPU"):
            glu_down(x, gate_up, down, config=SMALL)
    else:  # more programs than can be resident at once: the barrier would never open
        from hogwild_kernels.mlp import PER_SM, resident_programs

        with pytest.raises(ValueError, match="programs an SM"):
            glu_down(x, gate_up, down, config=SMALL, programs=PER_SM * resident_programs(DEVICE) + 1)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the barrier needs every program resident at once: a GPU")
@pytest.mark.parametrize("rows,hidden,inter", [(1, 4096, 12288), (4, 1024, 3072), (16, 512, 1536)])
def test_one_launch_gives_the_two_launches_bits_again_and_again(rows, hidden, inter):
    """The barrier: each program's activation is every program's after it (else the down
    product reads stale or unwritten rows); its words are left as found, so the next launches
    and a CUDA graph's replays pass it too; chained (Hopper) the same bits."""
    from hogwild_kernels import pdl
    from hogwild_kernels.mlp import _sync, glu_down

    x, gate_up, down = _weights(rows, hidden, inter, hidden)
    want = glu_down(x, gate_up, down, one_launch=False)
    for _ in range(20):
        assert torch.equal(glu_down(x, gate_up, down), want)
    assert _sync(x.device)[0].item() == 0
    assert torch.equal(glu_down(x, gate_up, down, programs=7, prefetch=0), want)
    if pdl.supported(DEVICE):
        assert torch.equal(glu_down(x, gate_up, down, chained=True), want)
    graph = torch.cuda.CUDAGraph()
    glu_down(x, gate_up, down, chained=pdl.supported(DEVICE))  # compiled before the capture
    with torch.cuda.graph(graph):
        out = glu_down(x, gate_up, down, chained=pdl.supported(DEVICE))
    for _ in range(20):
        out.zero_()
        graph.replay()
        assert torch.equal(out, want)


def _decoder(shape: str = "tiny"):
    import hogwild_ray as hw

    engine = hw.HogwildEngine.from_pretrained(f"random:{shape}", DEVICE.type, "float16", cache_tokens=512,
                                              attention="triton")
    return engine.runner.decoder


def test_the_decoder_takes_the_one_launch_only_where_it_can_run():
    """The "mlp" fold: rows of at most 16 on a GPU whose shapes the tiles divide; never under the
    interpreter (its programs run one at a time: the barrier would wait forever) nor with
    tensor-parallel shards."""
    from hogwild_kernels.mlp import fits

    decoder = _decoder("small")  # hidden 512, MLP 1536: the tiles' multiples, so only the rules below refuse
    lw = decoder.w.layers[0]
    x = torch.zeros(2, lw.w_down.shape[0], dtype=lw.w_down.dtype, device=DEVICE)
    assert fits(x, lw.w_gate_up, lw.w_down)
    decoder.folds = set()
    assert not decoder._mlp_in_one_launch(x, lw)
    decoder.folds = {"mlp"}
    assert decoder._mlp_in_one_launch(x, lw) == (DEVICE.type == "cuda" and fits(x, lw.w_gate_up, lw.w_down))
    assert not decoder._mlp_in_one_launch(torch.zeros(17, x.shape[1], dtype=x.dtype, device=DEVICE), lw)
    assert not fits(x[:, :-1], lw.w_gate_up, lw.w_down) and not fits(x.float(), lw.w_gate_up, lw.w_down)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the barrier needs every program resident at once: a GPU")
def test_the_mlp_fold_gives_the_unfolded_blocks_output():
    """A layer's MLP block with the fold (one launch) and without (the skinny products, SiLU
    between): the same residual stream, and the block's output within rounding (the down
    product's sums may group differently)."""
    from hogwild_kernels import mlp

    decoder = _decoder("small")  # hidden 512, MLP 1536: the tiles' multiples
    lw = decoder.w.layers[0]
    assert mlp.fits(torch.zeros(1, lw.w_down.shape[0], dtype=lw.w_down.dtype, device=DEVICE), lw.w_gate_up, lw.w_down)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, lw.w_down.shape[0], generator=g).to(DEVICE, lw.w_down.dtype)
    delta = torch.randn(3, lw.w_down.shape[0], generator=g).to(DEVICE, lw.w_down.dtype)
    decoder.folds = set()
    want, want_x = decoder._mlp_block(lw, x, delta, lw.w_qkv)
    decoder.folds = {"mlp"}
    got, got_x = decoder._mlp_block(lw, x, delta, lw.w_qkv)
    assert torch.equal(got_x, want_x)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def _greedy_run(engine, steps: int = 40) -> tuple[list, list]:
    import hogwild_ray as hw

    session = engine.start("Compute 12 * 7 and explain.", workers=4, max_tokens=400,
                           sampling=hw.SamplingParams(temperature=0.0), stop_on_answer=False)
    tokens, logits = [], []
    while len(tokens) < steps and not session.done:
        tokens.append(session.step())
        logits.append(session.last_logits.clone())
    session.close()
    return tokens, logits


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs and the barrier need a GPU")
def test_a_graphed_engine_with_the_mlp_fold_runs_it_replay_after_replay(monkeypatch):
    """A whole engine (random:small, whose sizes the tiles divide) with the "mlp" fold through
    CUDA graphs: chained (where the GPU can chain) and not, the same tokens and logits bit for
    bit over many replays; the first pass's logits those of eager passes within bf16 rounding
    (graphs pad their attention plans); and the one launch is what ran, not the products."""
    import hogwild_ray as hw
    from hogwild_kernels import mlp, pdl

    launches = []
    real = mlp.glu_down
    monkeypatch.setattr(mlp, "glu_down", lambda *a, **k: launches.append(k.get("chained")) or real(*a, **k))
    runs = {}
    for mode in ("eager", "graphs", "graphs, chained"):
        engine = hw.HogwildEngine.from_pretrained("random:small", "cuda", "bfloat16", cache_tokens=8192,
                                                  cuda_graphs=mode != "eager")
        engine.decoder.folds |= {"mlp"}
        engine.decoder.set_chained(mode.endswith("chained") and pdl.supported(DEVICE))
        runs[mode] = _greedy_run(engine)
        if mode != "eager":
            assert engine.graphs.replays >= 20
    assert launches and (True in launches) == pdl.supported(DEVICE)
    assert runs["graphs, chained"][0] == runs["graphs"][0]
    for a, b in zip(runs["graphs"][1], runs["graphs, chained"][1]):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)
    first_eager, first_graphed = runs["eager"][1][0], runs["graphs"][1][0]
    assert ((first_graphed - first_eager).norm() / first_eager.norm()).item() < 1e-2
