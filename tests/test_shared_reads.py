"""Pages shared across sessions (same prompt, forks) are read once per pass for all readers.

The plan is checked key by key (every pool slot read by one unit at most, every query token
reading exactly the keys its view shows, rotated by its own offset); the Triton kernels
against the reference on such passes (interpreted on the CPU); and an engine pass with two
sessions of one prompt and a fork against the Hugging Face oracle.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hogwild_ray as hw
from hogwild_kernels import QueryGroup, Segment, TritonAttention, concurrent_attention_reference
from hogwild_kernels.plan import WORTH_MERGING, build_plan
from hogwild_kernels.sharing import shared_runs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PAGE = 4


def shared_case(rng: random.Random, sessions: int, pool_pages: int = 600):
    """Query groups of several sessions whose blocks share leading pages: a session either has
    its own prompt, or begins with some full pages of an earlier one's prompt, or is a fork of
    an earlier one (every block's pages, then some blocks copied on write and grown)."""
    free = list(range(pool_pages))
    rng.shuffle(free)

    def grow(pages: list[int], length: int, more: int) -> tuple[list[int], int]:
        pages = list(pages)
        while len(pages) * PAGE < length + more:
            pages.append(free.pop())
        return pages, length + more

    made = []  # per session: [common, own block of each worker] as (pages, length), and fed counts
    groups, start, block_id = [], 0, 0
    for _ in range(sessions):
        kind = rng.choice(["new", "prompt", "fork"]) if made else "new"
        if kind == "fork":
            parent_blocks, fed = rng.choice(made)
            blocks = []
            for pages, length in parent_blocks:
                if rng.random() < 0.5:
                    if length % PAGE:  # copy on write of the partial last page
                        pages = pages[:-1] + [free.pop()]
                    pages, length = grow(pages, length, rng.randint(0, 9))
                blocks.append((pages, length))
            fed = [rng.randint(1, min(3, blocks[1 + w][1])) if blocks[1 + w][1] else 0 for w in range(len(fed))]
        else:
            workers = rng.randint(1, 3)
            if kind == "prompt":
                parent, parent_len = rng.choice(made)[0][0]
                full = rng.randint(0, parent_len // PAGE)
                common = grow(parent[:full], full * PAGE, rng.randint(0, 9))
            else:
                common = grow([], 0, rng.randint(1, 30))
            fed = [rng.randint(1, 3) for _ in range(workers)]
            blocks = [common] + [grow([], 0, rng.randint(0, 10) + f) for f in fed]
        made.append((blocks, fed))
        ids = list(range(block_id, block_id + len(blocks)))
        block_id += len(blocks)
        for w, f in enumerate(fed):
            if not f:
                continue
            segs, offset = [], 0
            for b in [0] + [1 + o for o in range(len(fed)) if o != w] + [1 + w]:  # common, others, own
                pages, length = blocks[b]
                own = b == 1 + w
                visible = length if own or b == 0 else length - fed[b - 1]  # the others lag one pass
                if visible:
                    segs.append(Segment(torch.tensor(pages, dtype=torch.int64), visible, offset, block=ids[b]))
                offset += visible
            position = offset - f
            groups.append(QueryGroup(start, f, position, segs))
            start += f
    return groups, start


def keys_read(plan: dict):
    """Per unit: the pool slots it reads; per token: {slot: rotation delta} over its pairs."""
    by_unit, by_token = [], {}
    table = plan["tables"]
    for u in range(len(plan["unit_item"])):
        item, ks, ke = (int(plan[f][u]) for f in ("unit_item", "unit_kstart", "unit_kend"))
        slots = [int(table[item][k // PAGE]) * PAGE + k % PAGE for k in range(ks, ke)]
        by_unit.append(slots)
        p0, n = int(plan["unit_pair"][u]), int(plan["unit_npairs"][u])
        for p in range(p0, p0 + n):
            seen = by_token.setdefault(int(plan["pair_tok"][p]), {})
            for k, slot in zip(range(ks, ke), slots):
                if k < plan["pair_limit"][p]:
                    assert slot not in seen, "a token reads one key twice"
                    seen[slot] = int(plan["pair_delta"][p])
    return by_unit, by_token


def keys_shown(groups: list[QueryGroup]) -> dict:
    """Per token: {slot: rotation delta} of every key its view shows it."""
    shown = {}
    for g in groups:
        for i in range(g.count):
            pos, seen = g.position + i, shown.setdefault(g.start + i, {})
            for s in g.segments:
                pages = s.pages.tolist()
                for k in range(max(0, min(s.length, pos - s.offset + 1))):
                    seen[pages[k // PAGE] * PAGE + k % PAGE] = pos - s.offset
    return shown


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 7), st.sampled_from([1, 5, 8, 64]))
def test_plan_reads_every_shared_key_once_and_each_token_its_whole_view(rng, sessions, chunk):
    groups, tokens = shared_case(rng, sessions)
    plan = build_plan(groups, tokens, chunk, page_size=PAGE)
    by_unit, by_token = keys_read(plan)
    flat = [s for unit in by_unit for s in unit]
    assert len(flat) == len(set(flat)), "a pool slot is read by two units"
    shown = keys_shown(groups)
    assert {t: v for t, v in by_token.items() if v} == {t: v for t, v in shown.items() if v}
    longest: dict = {}
    for s in (s for g in groups for s in g.segments):
        longest[s.block] = max(longest.get(s.block, 0), s.length)
    assert len(flat) <= sum(longest.values())
    # without the page size blocks are not merged: what is shared is read once per block
    alone, _ = keys_read(build_plan(groups, tokens, chunk))
    assert sum(map(len, alone)) >= len(flat)


def test_sessions_with_one_prompt_read_its_pages_once():
    """Three sessions beginning with the same three full pages and a fork: the plan reads those
    pages once (one item of 12 keys), and each block's own keys once more."""
    common = [10, 11, 12]
    groups, start = [], 0
    for s, own_pages in enumerate([[20, 21], [30], [40, 41]]):
        pages = torch.tensor(common + own_pages)
        length = 12 + len(own_pages) * PAGE - 1
        groups.append(QueryGroup(start, 1, length, [Segment(pages, length, 0, block=f"common{s}"),
                                                    Segment(torch.tensor([50 + s]), 1, length, block=f"cur{s}")]))
        start += 1
    plan = build_plan(groups, start, chunk=64, page_size=PAGE)
    by_unit, _ = keys_read(plan)
    assert sorted(map(len, by_unit)) == [1, 1, 1, 3, 7, 7, 12]
    # where merging saves too little of the pass (here 24 of 53 keys), the engine's eager plans keep
    # blocks apart
    assert sorted(map(len, keys_read(build_plan(groups, start, 64, PAGE, WORTH_MERGING))[0])) == [1, 1, 1, 15, 19, 19]
    lone = build_plan(groups, start, chunk=64)
    assert sorted(int(e - s) for s, e in zip(lone["unit_kstart"], lone["unit_kend"])) == [1, 1, 1, 15, 19, 19]


@given(st.randoms(use_true_random=False))
@settings(max_examples=80, deadline=None)
def test_shared_runs_cover_each_page_once_and_miss_no_sharing(rng):
    """Blocks made like prompts and forks: runs are stretches where all readers agree, each read
    page index is in at most one run, and any two blocks agreeing on pages 0..i share a run at i."""
    import numpy as np

    blocks: list[list[int]] = []
    fresh = iter(range(1000, 100000))
    for _ in range(rng.randint(1, 9)):
        if blocks and rng.random() < 0.7:
            parent = rng.choice(blocks)
            pages = parent[: rng.randint(0, len(parent))]
        else:
            pages = []
        blocks.append(pages + [next(fresh) for _ in range(rng.randint(0 if pages else 1, 6))])
    used = [rng.randint(0, len(p)) for p in blocks]
    runs, own = shared_runs([(np.asarray(p), u) for p, u in zip(blocks, used)])
    covered = set()
    for run in runs:
        assert len(run.readers) > 1 and run.first < run.stop
        for b in run.readers:
            assert blocks[b][run.first:run.stop] == blocks[run.readers[0]][run.first:run.stop]
            assert run.stop <= used[b] and own[b] >= run.stop
            for i in range(run.first, run.stop):
                assert (b, i) not in covered
                covered.add((b, i))
    for b in range(len(blocks)):
        for c in range(b + 1, len(blocks)):
            n = min(used[b], used[c])
            for i in range(n):
                if blocks[b][: i + 1] != blocks[c][: i + 1]:
                    break
                assert any(b in r.readers and c in r.readers and r.first <= i < r.stop for r in runs)


@pytest.mark.parametrize("seed,sessions,block_m", [(0, 3, 16), (1, 5, 16), (2, 6, None), (3, 7, None)])
def test_triton_attention_over_shared_pages_matches_reference(seed, sessions, block_m):
    """block_m None (as on a GPU): units run in launches by how many pairs read them, each with a
    row tile of its size (a unit that all sessions share gets a wide one); 16: one launch."""
    pytest.importorskip("triton")
    rng = random.Random(seed)
    groups, tokens = shared_case(rng, sessions, pool_pages=300)
    for g in groups:
        for s in g.segments:
            s.pages = s.pages.to(DEVICE)
    kv_heads, head_dim = 2, 64
    k_pool = torch.randn(300, PAGE, kv_heads, head_dim, device=DEVICE) * 2
    v_pool = torch.randn(300, PAGE, kv_heads, head_dim, device=DEVICE)
    q = torch.randn(tokens, 8, head_dim, device=DEVICE) * 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)).to(DEVICE)
    tri = TritonAttention(inv_freq, 1.0, head_dim**-0.5, chunk=8)
    tri.block_m, tri.shared_reads = block_m, "always"
    slots = torch.zeros(tokens, dtype=torch.int64, device=DEVICE)
    want = concurrent_attention_reference(q, k_pool, v_pool, groups, inv_freq, 1.0, head_dim**-0.5)
    meta = tri.prepare(groups, slots, slots, page_size=PAGE)
    launches = tri._launches(meta.extra[0], rep=4)
    assert sum(units for _, units, _, _ in launches) == meta.extra[0].unit_item.numel()
    assert len(launches) > 1 if block_m is None else len(launches) == 1
    got = tri.attend(q, k_pool, v_pool, meta)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("graphs", [False, pytest.param(True, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))])
def test_engine_pass_with_shared_prompts_and_a_fork_is_exact(random_model, graphs):
    """Two sessions of one prompt and a fork of the first advance in shared passes with the Triton
    kernels (and CUDA graphs on a GPU): the pass's plan reads the shared prompt pages once, and
    the oracle holds for all."""
    pytest.importorskip("triton")
    from oracle import TOL, oracle_check

    from hogwild_ray.runner.model_runner import host_batch

    path, hf_model = random_model("qwen3", "yarn")
    engine = hw.HogwildEngine.from_pretrained(path, DEVICE.type, "float32", cache_tokens=4096, attention="triton",
                                              cuda_graphs=graphs)
    engine.runner.decoder.attention.shared_reads = "always"  # a pass this small would not merge by itself
    sampling = hw.SamplingParams(temperature=1.0, seed=5)
    # a plain prompt of a few pages: the pages two prompts share are the point here, and the protocol's
    # prompt (ten times longer) would only make the Triton interpreter's prefill slower
    problem = "Compute 12 + 30, then 7 * 6, then compare the two results and say which one is larger."
    first = engine.start(problem, workers=2, max_tokens=24, sampling=sampling, protocol=False)
    second = engine.start(problem, workers=2, max_tokens=24, sampling=hw.SamplingParams(seed=9), protocol=False)
    engine.step([first])
    fork = first.fork()
    page = engine.allocator.page_size
    shared = len(first.prompt_ids) // page
    assert shared >= 2 and second.layout.common.pages[:shared] == first.layout.common.pages[:shared]
    passes = []
    real = engine.runner.forward
    engine.runner.forward = lambda steps, *rest: (passes.append(list(steps)), real(steps, *rest))[1]
    for _ in range(8 if graphs else 3):  # with graphs, enough passes for some to replay one
        engine.step([first, second, fork])
        for session in (first, second, fork):
            assert oracle_check(session, hf_model) <= TOL
    if graphs:
        assert engine.runner.graphs.replays >= 2, engine.runner.graphs.replays
    groups, tokens, *_ = host_batch(passes[-1])
    plan = build_plan(groups, len(tokens), chunk=64, page_size=page)
    read = [int(plan["tables"][i][k // page]) * page + k % page
            for i, ks, ke in zip(plan["unit_item"], plan["unit_kstart"], plan["unit_kend"]) for k in range(ks, ke)]
    assert len(read) == len(set(read))
    prompt_slots = {p * page + j for p in first.layout.common.pages[:shared] for j in range(page)}
    assert prompt_slots <= set(read)
    apart = build_plan(groups, len(tokens), chunk=64)
    assert int((apart["unit_kend"] - apart["unit_kstart"]).sum()) >= len(read) + 2 * shared * page
    for session in (first, second, fork):
        session.close()
    assert engine.allocator.free_pages == engine.allocator.num_pages
