"""Tensor parallelism over torch.distributed (gloo): every rank runs the same session on its
slice of the model; rank 0's tokens and logits must match the whole model in one process."""

from __future__ import annotations

import datetime
import socket

import pytest
import torch
from oracle import TOL

import hogwild_ray as hw
from hogwild_ray.errors import UnsupportedModelError
from hogwild_ray.model.parallel import TensorParallel, shard_plan, valid_tp_sizes
from hogwild_ray.model.spec import ModelSpec

STEPS = 20
FORCED = {4: {0: "First part done.\n\n"}, 9: {1: "Let me check that.\n\n"}, 14: {0: "So far so good.\n\n"}}


def run_session(engine) -> dict:
    """The same greedy session on every rank: per-step new tokens and last logits."""
    session = engine.start("Compute 12 * 7 and explain.", workers=2, max_tokens=100,
                           sampling=hw.SamplingParams(temperature=0), redundancy_every=8)
    tokens, logits = [], []
    for i in range(STEPS):
        tokens.append(session.step(inject=FORCED.get(i)))
        logits.append(session.last_logits.clone())
    finished = sum(session.stats.steps_per_worker)
    session.close()
    return {"tokens": tokens, "logits": torch.stack(logits), "finished": finished,
            "kv_heads": engine.cache.k.shape[3]}


def _rank_main(rank: int, world: int, port: int, jobs: dict[str, tuple[int, str]], out: str) -> None:
    """One process per rank, for every case: a tp=n case runs on the subgroup of ranks 0..n-1."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        sizes = sorted({n for n, _ in jobs.values()})
        groups = {n: dist.new_group(list(range(n))) if n < world else None for n in sizes}  # same order everywhere
        for name, (n, path) in jobs.items():
            if rank >= n:
                continue
            engine = hw.HogwildEngine.from_pretrained(path, cache_tokens=2048, attention="torch",
                                                      parallel=TensorParallel(rank, n, groups[n]))
            result = run_session(engine)
            if rank == 0:
                torch.save(result, f"{out}/{name}.pt")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = {
    "tp2-llama": (2, "llama", {}),
    "tp3-llama-padded-vocab-bias": (3, "llama", dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                                     intermediate_size=192, vocab_size=49157, attention_bias=True)),
    "tp2-qwen3-one-kv-head": (2, "qwen3", dict(num_attention_heads=4, num_key_value_heads=1)),
}


@pytest.fixture(scope="module")
def tp_runs(random_model, tmp_path_factory):
    """Every case's rank-0 result, from one set of spawned ranks (spawning costs seconds each)."""
    jobs = {name: (n, str(random_model(family, "default", **config)[0])) for name, (n, family, config) in CASES.items()}
    out = tmp_path_factory.mktemp("tp")
    world = max(n for n, _ in jobs.values())
    torch.multiprocessing.spawn(_rank_main, args=(world, free_port(), jobs, str(out)), nprocs=world)
    return {name: (path, torch.load(out / f"{name}.pt")) for name, (_, path) in jobs.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_tensor_parallel_matches_one_process(tp_runs, case):
    world, _, config = CASES[case]
    path, got = tp_runs[case]
    ref = run_session(hw.HogwildEngine.from_pretrained(path, cache_tokens=2048, attention="torch"))
    assert got["tokens"] == ref["tokens"]
    scale = ref["logits"].abs().max()
    assert ((got["logits"] - ref["logits"]).abs().max() / scale).item() <= TOL
    assert ref["finished"] >= 3, "the forced boundaries must finish steps"
    assert got["kv_heads"] == max(1, config.get("num_key_value_heads", 2) // world)


def _spec(heads: int, kv: int, inter: int = 128, vocab: int = 1000) -> ModelSpec:
    return ModelSpec("llama", vocab, 64, 2, heads, kv, 16, inter, 1e-6, False, False, torch.ones(8), 1.0, 2048,
                     None, ())


@pytest.mark.parametrize("heads,kv,inter,world,why", [
    (6, 3, 192, 4, "6 query heads are not divisible by 4"),
    (4, 4, 128, 8, "4 query heads are not divisible by 8"),
    (6, 3, 192, 2, "3 KV heads are not divisible by 2"),
    (6, 2, 192, 3, "3 is not a multiple of the 2 KV heads"),
    (4, 2, 129, 2, "intermediate size 129 is not divisible by 2"),
])
def test_shard_plan_refuses_bad_splits(heads, kv, inter, world, why):
    spec = _spec(heads, kv, inter)
    with pytest.raises(UnsupportedModelError, match=why) as e:
        shard_plan(spec, 0, world)
    assert f"Valid tp values: {', '.join(map(str, valid_tp_sizes(spec)))}" in str(e.value)


def test_shard_plan_slices():
    assert valid_tp_sizes(_spec(6, 3, 192)) == [1, 3, 6]
    assert valid_tp_sizes(_spec(8, 2, 128)) == [1, 2, 4, 8]
    plans = [shard_plan(_spec(8, 2, 128, vocab=1001), r, 4) for r in range(4)]
    assert [p.kv_heads for p in plans] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]  # replicated
    assert [p.q_heads for p in plans] == [range(2 * r, 2 * r + 2) for r in range(4)]
    assert plans[-1].vocab == range(753, 1004)  # the last rank padded to 251 rows
    with pytest.raises(UnsupportedModelError, match="rank 4"):
        shard_plan(_spec(8, 2), 4, 4)


def test_sliced_weights_reassemble(random_model):
    """Each rank's slices, put back together, are the whole model's tensors."""
    from hogwild_ray.model import locate, spec_from_config
    from hogwild_ray.model.loader import load_config, weight_reader
    from hogwild_ray.model.weights import load_weights

    path, _ = random_model("llama", "default")
    ckpt = locate(path)
    config = load_config(ckpt)
    spec = spec_from_config(config)
    read = weight_reader(ckpt, config)
    full = load_weights(spec, read, torch.device("cpu"), torch.float32)
    parts = [load_weights(spec, read, torch.device("cpu"), torch.float32, tp=shard_plan(spec, r, 2)) for r in (0, 1)]
    d, hq, hkv = spec.head_dim, spec.num_heads // 2, spec.num_kv_heads // 2
    qkv = [p.layers[0].w_qkv.split([hq * d, hkv * d, hkv * d]) for p in parts]
    for i in range(3):
        assert torch.equal(torch.cat([x[i] for x in qkv]), full.layers[0].w_qkv.split(
            [spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d])[i])
    assert torch.equal(torch.cat([p.layers[1].w_o for p in parts], 1), full.layers[1].w_o)
    assert torch.equal(torch.cat([p.layers[1].w_down for p in parts], 1), full.layers[1].w_down)
    assert torch.equal(torch.cat([p.embed for p in parts]), full.embed)
    assert torch.equal(torch.cat([p.lm_head for p in parts]), full.lm_head)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events")
def test_timed_collectives_are_folded_without_waiting_for_the_gpu():
    """After a pass the shard folds only the collectives the GPU has finished (a pass launched
    ahead keeps running); collective_seconds waits for the rest."""
    tp = TensorParallel(0, 1, None, timed=True)
    x = torch.ones(1, device="cuda")
    start = tp._start(x)
    torch.cuda._sleep(200_000_000)  # about 0.1 s of device time, as a long collective would take
    tp._stop(x, start)
    tp.fold_finished()
    assert len(tp._events) == 1 and tp._seconds == 0.0  # still running: nothing waited for it
    assert tp.collective_seconds() > 0.01 and not tp._events
