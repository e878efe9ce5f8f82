"""The Ray backend end to end on a real local Ray cluster (gloo): a coordinator actor beside
tensor-parallel shard actors must pass the oracle, give the in-process engine's tokens, fail
fast and clearly, and leave nothing behind."""

from __future__ import annotations

import itertools

import time

import pytest
import torch
from models import ONE_KV_HEAD, SPLITS_BY_3
from oracle import TOL, run_oracle

ray = pytest.importorskip("ray")

import hogwild_ray as hw  # noqa: E402
from hogwild_ray.errors import InvalidRequestError, UnsupportedModelError  # noqa: E402
from hogwild_ray.runtime import (  # noqa: E402
    ChannelTimeoutError, ClusterResourceError, CoordinatorFailedError, ShardFailedError,
)
from ray_state import assert_clean  # noqa: E402
from hogwild_ray.runtime.engine import RayHogwildEngine  # noqa: E402
from hogwild_ray.runtime.remote_session import RemoteSession  # noqa: E402

CPUS = 4
STEPS = 64
FORCED = {4: {0: "First part done.\n\n"}, 9: {1: "Let me check that.\n\n"}, 14: {2: "So far so good.\n\n"},
          40: {1: "Another idea:"}}
KW = dict(device="cpu", cache_tokens=2048, attention="torch")  # CPU shards (gloo), GPU or not


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(num_cpus=CPUS, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def ray_engine(path, tp: int, **kw) -> RayHogwildEngine:
    return hw.HogwildEngine.from_pretrained(str(path), backend="ray", tp=tp, **KW, **kw)


def run_session(engine, steps: int = STEPS) -> tuple[list, torch.Tensor]:
    session = engine.start("Compute 12 * 7 and explain.", workers=3, max_tokens=200,
                           sampling=hw.SamplingParams(temperature=0), redundancy_every=8)
    tokens, logits = [], []
    try:
        for i in range(steps):
            tokens.append(session.step(inject=FORCED.get(i)))
            logits.append(session.last_logits.clone())
    finally:
        session.close()
    return tokens, torch.stack(logits)


@pytest.fixture(scope="module")
def llama(random_model):
    return random_model("llama", "default")


@pytest.fixture(scope="class")
def tp2_engine(llama):
    """The tp=2 engine of the class below, freed after it."""
    engine = ray_engine(llama[0], 2)
    yield engine
    engine.close()


class TestOneEngine:
    """Several sessions on one tp=2 engine (freed before the other tests: the cluster has 4 CPUs)."""

    def test_tp2_matches_the_local_engine(self, llama, tp2_engine):
        """64 greedy steps of 3 workers with injections and steps ending, the shards launching each
        pass ahead: the same tokens and logits as the in-process engine; then the same shards serve
        a second session and a whole solve() inside the coordinator, launching when asked."""
        local = hw.HogwildEngine.from_pretrained(llama[0], **KW)
        local_tokens, local_logits = run_session(local)
        assert isinstance(tp2_engine, RayHogwildEngine)
        assert tp2_engine.launch_ahead(True)[0]
        tokens, logits = run_session(tp2_engine)
        on, used, dropped = tp2_engine.launch_ahead(False)
        assert not on and used >= 50 and dropped >= len(FORCED)  # each injection drops the pass launched
        metrics = tp2_engine.metrics()
        assert (metrics["passes_launched_ahead"], metrics["launched_ahead_dropped"]) == (used, dropped)
        assert tokens == local_tokens
        scale = local_logits.nan_to_num().abs().max().item()
        assert torch.equal(logits.isnan(), local_logits.isnan())
        assert (logits - local_logits).nan_to_num().abs().max().item() <= TOL * scale
        again, _ = run_session(tp2_engine, steps=3)  # a second session on the same shards
        assert again == local_tokens[:3]
        ask = dict(workers=2, max_tokens=12, sampling=hw.SamplingParams(temperature=0))
        ours, theirs = tp2_engine.solve("Compute 3 + 4.", **ask), local.solve("Compute 3 + 4.", **ask)
        assert (ours.worker_texts, ours.answer, ours.stats.forward_passes) == \
            (theirs.worker_texts, theirs.answer, theirs.stats.forward_passes)
        pages = tp2_engine.allocator
        assert pages.free_pages == pages.num_pages

    def test_shards_get_the_model_from_the_coordinator_and_never_import_transformers(self, tp2_engine):
        """The coordinator reads the model while the shards start and hands them its spec: the
        shards' processes (seconds of CPU each otherwise) never import transformers."""
        import sys

        def imported(actor: object) -> bool:
            return "transformers" in sys.modules

        shards = tp2_engine.shard_actors()
        assert len(shards) == 2
        held = ray.get([a.__ray_call__.options(concurrency_group="health").remote(imported) for a in shards])
        assert held == [False, False]
        assert ray.get(tp2_engine.coordinator.__ray_call__.remote(imported))  # the tokenizer and config: read there

    def test_session_proxy_mirrors_the_session(self, tp2_engine):
        """What progress displays read (workers, text, stats, done) is mirrored from each step's reply."""
        seen = []
        result = tp2_engine.solve("Compute 2 + 2.", workers=2, max_tokens=8, sampling=hw.SamplingParams(temperature=0),
                              on_step=lambda s, new: seen.append((type(s), s.stats.forward_passes, s.text(0))))
        assert seen and all(t is RemoteSession for t, _, _ in seen)
        assert seen[-1][1] == result.stats.forward_passes and seen[-1][2] == result.worker_texts[0]
        session = tp2_engine.start("Compute 2 + 2.", workers=2, max_tokens=8)
        with pytest.raises(InvalidRequestError, match="inject names worker 5"):
            session.step(inject={5: "x"})
        assert not session.done  # a rejected request leaves the session as it was, as in process
        newer = tp2_engine.start("Compute 5 + 5.", workers=2, max_tokens=8)
        with pytest.raises(InvalidRequestError, match="one session at a time"):
            session.step()
        newer.close()
        assert newer.done

    def test_solve_many_batches_in_the_coordinator(self, llama, tp2_engine):
        """solve_many through the Ray engine runs its problems in shared passes on the shards (the
        coordinator's scheduler, shared prompt pages included): the same records as the in-process
        engine's; stream_many left early frees every page."""
        problems = [{"id": f"q{i}", "problem": f"Compute {i} + {i + 5}."} for i in range(4)]
        ask = dict(workers=2, max_tokens=10, sampling=hw.SamplingParams(temperature=0), progress=False)
        local = hw.HogwildEngine.from_pretrained(llama[0], **KW)
        theirs = local.solve_many(problems, **ask)
        before = tp2_engine.metrics()
        ours = tp2_engine.solve_many(problems, **ask)
        after = tp2_engine.metrics()
        key = lambda r: (r["id"], r["worker_texts"], r["answer"], r["stats"]["forward_passes"])  # noqa: E731
        assert [key(r) for r in ours] == [key(r) for r in theirs]
        passes = after["passes"] - before["passes"]
        in_passes = after["sessions_per_pass"] * after["passes"] - before["sessions_per_pass"] * before["passes"]
        assert in_passes / passes > 1.5 and after["prompt_pages_reused"] > before["prompt_pages_reused"]
        stream = tp2_engine.stream_many(problems, workers=2, max_tokens=50)
        seen = {pid for pid, _ in itertools.islice(stream, 12)}
        assert seen <= {p["id"] for p in problems}
        stream.close()
        pages = tp2_engine.allocator
        assert pages.free_pages == pages.num_pages

    def test_oracle_tp2(self, llama, tp2_engine):
        check_oracle(tp2_engine, llama[1])


def check_oracle(engine, hf_model) -> None:
    worst, finished, session = run_oracle(engine, hf_model, 3, "combined")
    assert worst <= TOL, f"max relative logit error {worst:.2e}"
    assert finished >= 4 and session.stats.redundancy_checks >= 1


@pytest.mark.parametrize("tp, family, rope, overrides", [
    (3, "qwen3", "yarn", SPLITS_BY_3),
    (2, "qwen2", "default", ONE_KV_HEAD),  # fewer KV heads than ranks: each rank holds a replica
], ids=["tp3", "tp2-one-kv-head"])
def test_oracle_through_the_ray_engine(random_model, tp, family, rope, overrides):
    path, hf_model = random_model(family, rope, **overrides)
    with ray_engine(path, tp) as engine:
        check_oracle(engine, hf_model)


# ----------------------------------------------------------------------------- failures

def test_killed_shard_is_a_clear_error_and_releases_everything(llama):
    engine = ray_engine(llama[0], 2, step_timeout_s=20)
    session = engine.start("Compute 12 * 7.", workers=2, max_tokens=100, sampling=hw.SamplingParams(temperature=0))
    session.step()
    ray.kill(engine.shard_actors()[1])
    start = time.monotonic()
    with pytest.raises(ShardFailedError, match="shard rank 1 failed") as err:
        for _ in range(5):
            session.step()
    assert time.monotonic() - start < 20
    assert 1 in err.value.ranks and session.done
    session.close()  # no-ops once the engine released everything
    engine.close()
    assert_clean()


def test_killed_coordinator_is_a_clear_error_within_the_step_timeout(llama):
    engine = ray_engine(llama[0], 2, step_timeout_s=5)
    session = engine.start("Compute 12 * 7.", workers=2, max_tokens=100)
    session.step()
    ray.kill(engine.coordinator)
    start = time.monotonic()
    with pytest.raises(CoordinatorFailedError, match=r"coordinator actor \(actor [0-9a-f]+(, pid \d+)?\) died"):
        session.step()
    assert time.monotonic() - start < 5
    assert engine.coordinator is None and session.done
    with pytest.raises(CoordinatorFailedError, match="engine is closed"):
        engine.start("Compute 1 + 1.")
    engine.close()
    assert_clean()  # the shards (the coordinator's children) and the group went with it


def test_hung_rank_fails_the_step_within_the_timeout(llama):
    """Rank 1 sleeps instead of running its pass; rank 0 waits in the collective; the step must not hang."""
    engine = ray_engine(llama[0], 2, step_timeout_s=3)
    session = engine.start("Compute 12 * 7.", workers=2, max_tokens=100)
    session.step()
    engine.stall_rank(1, 3600)
    start = time.monotonic()
    with pytest.raises(ChannelTimeoutError, match=r"rank\(s\) \[0, 1\] did not answer within 3 s") as err:
        session.step()
    elapsed = time.monotonic() - start
    assert 3 <= elapsed < 3 + 3, elapsed  # the timeout, then the release
    assert 1 in err.value.ranks and engine.coordinator is None
    engine.close()
    assert_clean()


def test_too_few_resources_is_a_clear_error_within_the_wait(random_model):
    splits_by_8 = random_model("llama", "default", num_attention_heads=8)  # so the shape is not what fails
    start = time.monotonic()
    with pytest.raises(ClusterResourceError) as err:
        ray_engine(splits_by_8[0], 8, placement_timeout_s=2)
    assert time.monotonic() - start < 2 + 2
    msg = str(err.value)
    assert "8 shard(s) of 1 CPU each on one node within 2 s" in msg and f"'CPU': {CPUS}" in msg
    assert "lower the tensor-parallel degree" in msg
    assert_clean()


def test_bad_backend_arguments(llama):
    with pytest.raises(InvalidRequestError, match="backend must be"):
        hw.HogwildEngine.from_pretrained(None, backend="mpi")
    with pytest.raises(InvalidRequestError, match="tp must be an integer >= 1"):
        hw.HogwildEngine.from_pretrained(None, backend="ray", tp=0)
    with pytest.raises(InvalidRequestError, match="needs backend='ray'"):
        hw.HogwildEngine.from_pretrained(None, tp=2)
    with pytest.raises(InvalidRequestError, match="step_timeout_s must be"):
        ray_engine(llama[0], 2, step_timeout_s=0)
    with pytest.raises(UnsupportedModelError, match="cannot be split over tp=3"):  # found before any shard starts
        ray_engine(llama[0], 3)
    assert_clean()


def view_kv(read, steps, page_size: int) -> torch.Tensor:
    """K and V of every token the steps' views read: [2, layers, tokens, kv heads, dim] (read(pages) as read_kv)."""
    slots = sorted({seg.block.pages[t // page_size] * page_size + t % page_size
                    for s in steps for seg in s.segments for t in range(seg.length)})
    pages = sorted({slot // page_size for slot in slots})
    kv = torch.as_tensor(read(pages)).flatten(2, 3)  # [2, layers, pages * page_size, heads, dim]
    return kv[:, :, [pages.index(slot // page_size) * page_size + slot % page_size for slot in slots]]


def test_shards_run_several_sessions_in_one_pass(llama):
    """The Ray executor's passes of three sessions (tp=2, gloo) equal the in-process executor's:
    the shards replay every session's layout operations, in the coordinator's order, steps moved
    between passes and while one runs included; with the shards launching each pass ahead from
    the sessions' foresight (used when it comes true, dropped when the sessions ask for another),
    the same tokens, slots, stored K/V and last logits."""
    import random

    from hogwild_ray.config import EngineConfig
    from hogwild_ray.core.layout import CacheLayout
    from hogwild_ray.executor import SessionPass
    from hogwild_ray.executor.base import Foresight
    from hogwild_ray.runtime.placement import release, reserve
    from hogwild_ray.runtime.sharded import ShardedEngine

    options = dict(cache_tokens=2048, page_size=4, max_context=1024, attention="torch", cuda_graphs=False,
                   step_timeout_s=60)
    pg = reserve(2, False, 30)
    sharded = None
    try:
        config = EngineConfig.create(str(llama[0]), "cpu", "float32", backend="ray", tp=2, **options)
        sharded = ShardedEngine.create(config, pg)
        assert sharded.executor.launch_ahead(True) == (True, 0, 0)
        local = hw.HogwildEngine.from_pretrained(llama[0], "cpu", "float32", cache_tokens=2048, page_size=4,
                                                 max_context=1024, attention="torch")
        rng = random.Random(1)
        vocab = local.spec.vocab_size
        specs = [("combined", 3), ("interleaved", 2), ("contiguous", 2)]
        params = [hw.SamplingParams(temperature=0.8, seed=7 + w) for w in range(3)]
        pairs = []
        for kind, workers in specs:
            prompt = [rng.randrange(vocab) for _ in range(rng.randrange(4, 12))]
            ids = []
            for engine in (sharded, local):
                layout = CacheLayout(kind, workers, engine.allocator)
                sid = engine.executor.open(layout, params[:workers])
                engine.executor.prefill(sid, layout.common, prompt)
                ids.append(sid)
            pairs.append((ids, workers))
        header = [rng.randrange(vocab) for _ in range(3)]
        sights, feeds = None, [{w: [rng.randrange(vocab)] for w in range(workers)} for _, workers in pairs]
        for i in range(14):
            if i == 5:
                assert sharded.executor.holds_launched  # pass 4's launched pass, dropped by the move:
                for engine, sid in ((sharded, pairs[0][0][0]), (local, pairs[0][0][1])):
                    engine.executor.finish_steps(sid, [1])
                assert not sharded.executor.holds_launched  # the scheduler need not defer a newcomer
            # each pass foresees the next (every worker feeds its sample; a step moved while it runs
            # feeds a header), but after passes 3 and 10 (random tokens: nothing launched) and 7
            # (foreseen, then other tokens: the pass launched ahead is dropped)
            move = i in (8, 12)
            sights = [Foresight(tuple(w for w in range(workers) if not (move and k == 0 and w > 0)),
                                {1: tuple(header), 2: tuple(header[1:])} if move and k == 0 else {}, frozenset())
                      for k, (_, workers) in enumerate(pairs)] if i not in (3, 10) else None
            meanwhile = []  # the coordinator's host work runs while the shards compute the pass

            def while_running(ran, engine, side):
                meanwhile.append((ran, time.perf_counter()))
                if move:
                    engine.executor.finish_steps(pairs[0][0][side], [2, 1])
                return None if sights is None else {ids[side]: sight for (ids, _), sight in zip(pairs, sights)}

            if i == 9:
                sharded.stall(0, 0.5)
            remote = sharded.executor.run([SessionPass(ids[0], fed) for (ids, _), fed in zip(pairs, feeds)],
                                          lambda ran: while_running(ran, sharded, 0))
            returned = time.perf_counter()
            assert [ran for ran, _ in meanwhile] == [{ids[0] for ids, _ in pairs}]
            if i == 9:
                assert returned - meanwhile[0][1] >= 0.4  # it ran before the stalled shard's reply
            mine = local.executor.run([SessionPass(ids[1], fed) for (ids, _), fed in zip(pairs, feeds)],
                                      lambda ran: while_running(ran, local, 1))
            for ids, _ in pairs:
                assert remote[ids[0]][1] == mine[ids[1]][1], i
                assert [s.slots for s in remote[ids[0]][0]] == [s.slots for s in mine[ids[1]][0]]
            if sights is None or i == 7:
                feeds = [{w: [rng.randrange(vocab)] for w in range(workers)} for _, workers in pairs]
            else:
                feeds = [sight.fed(dict(zip((s.worker for s in remote[ids[0]][0]), remote[ids[0]][1])))
                         for (ids, _), sight in zip(pairs, sights)]
        # used by passes 1-3, 6, 7, 9, 10, 12 and 13; dropped: pass 4's (a step moved before the next
        # pass) and pass 7's (other tokens fed); pass 13's is dropped at the close
        assert sharded.executor.launch_ahead() == (True, 9, 2) and sharded.executor.holds_launched
        cache = local.executor.runner.cache
        for (ids, _) in pairs:
            theirs, ours = sharded.executor.last_logits(ids[0]), local.executor.last_logits(ids[1])
            assert torch.allclose(theirs, ours, atol=2e-4 * ours.abs().max().item())
            kv = [view_kv(sharded.executor.read_kv, remote[ids[0]][0], 4),
                  view_kv(lambda pages: torch.stack([cache.k[:, pages], cache.v[:, pages]]).float(),
                          mine[ids[1]][0], 4)]
            assert torch.allclose(*kv, atol=1e-4 * kv[1].abs().max().item())
            sharded.executor.close(ids[0])
            local.executor.close(ids[1])
            assert not sharded.executor.holds_launched  # pass 13's, dropped at the first close
        assert sharded.allocator.free_pages == sharded.allocator.num_pages
    finally:
        if sharded is not None:
            sharded.close()
        release(pg)
    assert_clean()
