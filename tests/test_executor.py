"""The executor seam: one forward pass carries any number of sessions, and each session's
part of it is what that session alone would compute (fp32, CPU). Also the runner alone,
and that the shard side of the seam is the same executor class."""

from __future__ import annotations

import random

import pytest

import hogwild_ray as hw
from hogwild_ray.config import EngineConfig
from hogwild_ray.executor import LocalExecutor, SessionPass, local
from hogwild_ray.core.layout import CacheLayout, PageAllocator
from hogwild_ray.runner import ModelRunner

GREEDY = hw.SamplingParams(temperature=0)
SEEDED = [hw.SamplingParams(temperature=0.9, top_p=0.9, seed=11), hw.SamplingParams(temperature=0.7, seed=5),
          GREEDY, hw.SamplingParams(temperature=1.0, top_k=7, seed=3)]
SPECS = [("combined", 3), ("interleaved", 2), ("contiguous", 4)]  # (layout, workers) of three sessions


@pytest.fixture(scope="module")
def runner_pair(random_model):
    """Two runners over the same weights: one steps the sessions together, the other one by one."""
    path, _ = random_model("qwen3", "yarn")

    def load() -> tuple[ModelRunner, PageAllocator]:
        config = EngineConfig.create(path, "cpu", "float32", cache_tokens=2048, page_size=4, max_context=1024,
                                     attention="torch").sized(4096)
        runner = ModelRunner.load(config, cuda_graphs=False)
        return runner, PageAllocator(512, 4)

    return load(), load()


def scripted_feeds(rng: random.Random, vocab: int, workers: int, passes: int) -> list[dict[int, list[int]]]:
    """Each pass: some workers feed 1-3 tokens (a chunk, like a header), some none."""
    feeds = []
    for _ in range(passes):
        fed = {w: [rng.randrange(vocab) for _ in range(rng.choice((1, 1, 1, 3)))]
               for w in range(workers) if rng.random() < 0.85}
        feeds.append(fed or {0: [rng.randrange(vocab)]})
    return feeds


def open_sessions(executor: LocalExecutor, allocator: PageAllocator, prompts: list[list[int]]) -> list[int]:
    sids = []
    for (kind, workers), prompt in zip(SPECS, prompts):
        layout = CacheLayout(kind, workers, allocator)
        sid = executor.open(layout, SEEDED[:workers])
        executor.prefill(sid, layout.common, prompt)
        sids.append(sid)
    return sids


def test_a_pass_of_several_sessions_equals_each_alone(runner_pair):
    (together_runner, together_pages), (alone_runner, alone_pages) = runner_pair
    vocab = together_runner.spec.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (9, 5, 14)]
    feeds = [scripted_feeds(rng, vocab, workers, 12) for _, workers in SPECS]
    finishing_at = {4: (0, [1]), 7: (2, [0, 3]), 9: (1, [0])}  # pass -> (session, workers whose step ends)

    together, alone = LocalExecutor(together_runner), LocalExecutor(alone_runner)
    t_ids, a_ids = open_sessions(together, together_pages, prompts), open_sessions(alone, alone_pages, prompts)
    for i in range(12):
        if i in finishing_at:
            s, workers = finishing_at[i]
            together.finish_steps(t_ids[s], workers)
            alone.finish_steps(a_ids[s], workers)
        live = [s for s in range(3) if not (s == 1 and i >= 10)]  # session 1 ends early: passes go on without it
        got = together.run([SessionPass(t_ids[s], feeds[s][i]) for s in live])
        for s in live:
            want = alone.run([SessionPass(a_ids[s], feeds[s][i])])[a_ids[s]]
            steps, tokens = got[t_ids[s]]
            assert [x.worker for x in steps] == [x.worker for x in want[0]]
            assert [x.slots for x in steps] != [] and tokens == want[1], (i, s)
            ours, theirs = together.last_logits(t_ids[s]), alone.last_logits(a_ids[s])
            fed = sorted(feeds[s][i])
            scale = theirs[fed].abs().max().item()
            assert (ours[fed] - theirs[fed]).abs().max().item() <= 2e-4 * scale, (i, s)
        if i == 10:
            together.close(t_ids[1])
            alone.close(a_ids[1])
    for s in (0, 2):
        together.close(t_ids[s])
        alone.close(a_ids[s])
    assert together_pages.free_pages == together_pages.num_pages and alone_pages.free_pages == alone_pages.num_pages


def test_a_greedy_session_beside_a_sampling_one_stays_greedy(runner_pair):
    """The pass's sampling mode is the most general of its sessions'; greedy rows still take the argmax."""
    (runner, pages), _ = runner_pair
    executor = LocalExecutor(runner)
    a = CacheLayout("combined", 2, pages)
    b = CacheLayout("combined", 2, pages)
    sa, sb = executor.open(a, [GREEDY, GREEDY]), executor.open(b, SEEDED[:2])
    executor.prefill(sa, a.common, [5, 6, 7])
    executor.prefill(sb, b.common, [5, 6, 7])
    out = executor.run([SessionPass(sa, {0: [1], 1: [2]}), SessionPass(sb, {0: [1], 1: [2]}, greedy=True)])
    for sid in (sa, sb):
        steps, tokens = out[sid]
        assert tokens == executor.last_logits(sid)[[s.worker for s in steps]].argmax(-1).tolist()
    executor.close(sa)
    executor.close(sb)
    assert pages.free_pages == pages.num_pages


def test_host_work_runs_while_the_pass_is_under_way(runner_pair, monkeypatch):
    """while_running is called once a pass, with the sessions in it (not one whose writes did not
    fit), after the device work is queued and before the sampled tokens are read."""
    (runner, _), _ = runner_pair
    pages = PageAllocator(3, 4)
    executor = LocalExecutor(runner)
    a, b = CacheLayout("combined", 2, pages), CacheLayout("combined", 2, pages)
    sa, sb = executor.open(a, [GREEDY, GREEDY]), executor.open(b, [GREEDY, GREEDY])
    executor.prefill(sa, a.common, [5, 6, 7])
    log = []
    forward = runner.forward

    class Read(local.HostCopy):  # the pass's sampled tokens: reading them is the host's wait for the device
        def tolist(self):
            log.append("tokens read")
            return super().tolist()

    def queued(*args, **kwargs):
        out = forward(*args, **kwargs)
        log.append("pass queued")
        return out

    monkeypatch.setattr(runner, "forward", queued)
    monkeypatch.setattr(local, "HostCopy", Read)
    out = executor.run([SessionPass(sa, {0: [1], 1: [2]}), SessionPass(sb, {0: list(range(40))})],
                       lambda ran: log.append(ran))
    assert log == ["pass queued", {sa}, "tokens read"]
    assert isinstance(out[sb], hw.CacheFullError) and len(out[sa][1]) == 2
    executor.close(sa)
    executor.close(sb)
    assert pages.free_pages == pages.num_pages


def test_the_engine_and_every_shard_drive_the_same_runner_and_executor():
    """One runner class per rank, one executor class in process and in each shard."""
    import inspect

    from hogwild_ray.runtime import shard

    source = inspect.getsource(shard.ModelShard._init)
    assert "ModelRunner.load" in source and "LocalExecutor(self.runner)" in source
    assert "HogwildEngine" not in inspect.getsource(shard)


def test_sessions_of_one_engine_share_its_executor(random_model):
    path, _ = random_model("llama", "default")
    engine = hw.HogwildEngine.from_pretrained(path, "cpu", "float32")
    a, b = engine.start("One?", workers=2, sampling=GREEDY), engine.start("Two?", workers=3, sampling=GREEDY)
    assert a.executor.executor is b.executor.executor is engine.executor
    assert a.executor.session != b.executor.session
    a.step(), b.step(), a.step()
    a.close(), b.close()
    assert engine.allocator.free_pages == engine.allocator.num_pages and not engine.executor.sessions
