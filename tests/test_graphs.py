"""CUDA-graph decode: the same tokens and logits as eager passes, one host sync per step.

GPU only (CUDA graphs need a device); the padded plan the graphs read is checked on
CPU in test_triton_kernels.py.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import hogwild_ray as hw
from hogwild_ray.errors import InvalidRequestError
from hogwild_ray.model.graphs import WARMUP_LAYERS

from oracle import FORCED, TOL, run_oracle

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
# a graph's buffers checked on the CPU, without a capture (a GPU runs the capture tests)
cpu_check = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                               reason="Triton on a CPU needs the interpreter")


def test_graphs_need_cuda_and_triton(random_model):
    path, _ = random_model("llama")
    with pytest.raises(InvalidRequestError, match="cuda_graphs=True needs a CUDA device"):
        hw.HogwildEngine.from_pretrained(path, "cpu", cuda_graphs=True)
    with pytest.raises(InvalidRequestError, match="cuda_graphs must be"):
        hw.HogwildEngine.from_pretrained(path, "cpu", cuda_graphs="yes")
    engine = hw.HogwildEngine.from_pretrained(path, "cpu")
    assert engine.graphs is None
    assert (engine.metrics()["graph_captures"], engine.metrics()["graph_capture_seconds"]) == (0, 0.0)


def _run(engine, workers: int, steps: int, before_step=None):
    session = engine.start("Compute 12 * 7 and explain.", workers=workers, max_tokens=400,
                           sampling=hw.SamplingParams(temperature=0.0), redundancy_every=15, stop_on_answer=False)
    tokens, logits = [], []
    for i in range(steps):
        if session.done:
            break
        if before_step is not None:
            before_step(engine, i)
        new = session.step(inject={w: t for w, t in FORCED.get(i, {}).items() if w < workers})
        tokens.append(new)
        logits.append(session.last_logits.clone())
    session.close()
    return tokens, logits


@gpu
@pytest.mark.parametrize("family,rope,workers,layers", [("qwen3", "yarn", 4, 4), ("llama", "llama3", 9, 2)])
def test_graph_decode_equals_eager(random_model, family, rope, workers, layers):
    """Greedy runs with headers, interjections and finished steps (passes with chunks, graphed
    up to max_chunk, eager beyond): the same tokens, logits within fp32 rounding (with 4 layers,
    captures whose warm-up ran only the first WARMUP_LAYERS)."""
    path, _ = random_model(family, rope, num_hidden_layers=layers)
    engine = _eager_and_graphed_agree(path, workers)
    decode_shapes = [key for key in engine.graphs.graphs if key.decode]
    assert engine.graphs.replays >= 20 and len(decode_shapes) <= 4


def _eager_and_graphed_agree(path, workers: int, before_step=None):
    """Run eagerly, then with graphs: the same tokens, logits within fp32 rounding. Returns
    the graphed engine."""
    runs = {}
    for graphs in (False, True):
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "float32", cache_tokens=8192, cuda_graphs=graphs)
        runs[graphs] = _run(engine, workers, 60, before_step)
    (tok_e, log_e), (tok_g, log_g) = runs[False], runs[True]
    assert tok_g == tok_e
    for a, b in zip(log_e, log_g):
        ok = ~torch.isnan(a)
        torch.testing.assert_close(b[ok], a[ok], atol=2e-4 * a[ok].abs().max().item(), rtol=0)
    return engine


@gpu
def test_graphs_are_kept_per_key_tile(random_model):
    """Units long enough for the longer key tile get graphs of their own: a graph keeps the
    tile it was captured with. Halfway through, every unit becomes long enough; the passes
    after it replay new graphs, and the tokens stay the eager engine's."""
    path, _ = random_model("qwen3", "yarn")

    def halfway_long(engine, i):
        engine.decoder.attention.long_unit = 10**9 if i < 30 else 1

    engine = _eager_and_graphed_agree(path, 3, halfway_long)
    tiles = {key.long_keys for key, entry in engine.graphs.graphs.items() if entry.graph is not None}
    assert tiles == {False, True}, engine.graphs.graphs.keys()


@cpu_check
def test_a_padded_graph_pass_reads_its_static_buffers_right(random_model):
    """On the CPU, without a capture: a graph's fixed-size buffers (tokens, positions, slots, the
    attention plan, each group's last row, the sampling table) loaded for a pass where workers feed
    injections (or headers), or one token each, and padded to the graph's size, give the eager
    pass's logits and the same samples; the padding writes no slot but the pool's scratch page's."""
    from hogwild_ray.model.graphs import DecodeGraphs, captured_size
    from hogwild_ray.runner.model_runner import host_batch

    path, _ = random_model("qwen3", "yarn")
    engine = hw.HogwildEngine.from_pretrained(path, "cpu", "float32", cache_tokens=4096, attention="triton")
    runner = engine.runner
    graphs = DecodeGraphs(runner.decoder, runner.cache, engine.max_context, max_chunk=64)
    greedy_first = DecodeGraphs(runner.decoder, runner.cache, engine.max_context, max_chunk=64)
    forward, checked = runner.forward, []
    scratch = runner.cache.scratch_slot

    def both(steps, table=None, staged=None, batch=None):
        logits, tokens = forward(steps, table, staged, batch)
        groups, toks, key_pos, slots, last = host_batch(steps)
        if graphs.serves(groups):
            entry, host = graphs._entry(groups, len(toks), None if table is None else table.mode)
            assert entry.plan.caps.tokens == captured_size(len(toks))
            assert len(entry.last_rows) == captured_size(len(last))
            entry.load(host, toks, key_pos, slots, last, table)
            pool = runner.cache.k.clone(), runner.cache.v.clone()
            got, sampled = entry.forward(runner.decoder, runner.cache)  # rewrites the same K/V
            for before, after in zip(pool, (runner.cache.k, runner.cache.v)):
                changed = (before != after).flatten(3).any(-1).any(0).flatten().nonzero().flatten().tolist()
                assert set(changed) <= set(slots) | set(range(scratch, scratch + runner.cache.page_size))
            rows = len(groups)
            torch.testing.assert_close(got[:rows], logits, atol=2e-4 * logits.abs().max().item(), rtol=0)
            if table is not None:  # a pass of the session's workers (not a shared block's prefill)
                assert sampled[:rows].tolist() == tokens.tolist()
                checked.append((len(toks) - len(groups), entry.plan.caps.tokens - len(toks)))
                # a greedy pass of this shape replays this sampling graph, unless it has its own already
                assert table.mode == "sample" and graphs._entry(groups, len(toks), "greedy")[0] is entry
                own = greedy_first._entry(groups, len(toks), "greedy")[0]
                assert greedy_first._entry(groups, len(toks), "sample")[0] is not own
                assert greedy_first._entry(groups, len(toks), "greedy")[0] is own
        return logits, tokens

    runner.forward = both
    session = engine.start("Compute 12 * 7.", workers=3, max_tokens=40, protocol=False, chat_template=False,
                           sampling=[hw.SamplingParams(temperature=1.0, seed=w) for w in range(3)])
    one = next(word for word in ("Yes", " yes", "Ok", "5") if len(session.encode(word)) == 1)
    injections = (None, {1: "Check the units."}, {0: "Now add 5.", 2: "Explain it."}, {2: one})
    for inject in injections:
        session.step(inject=inject)
    session.close()
    # the injections' passes: each injected worker feeds its sample and the injection's tokens
    assert [extra for extra, _ in checked if extra] == [sum(len(session.encode(text)) for text in inject.values())
                                                        for inject in injections if inject]
    assert (0, 1) in checked  # a decode pass of 3 workers, padded to 4 tokens in 4 groups
    assert any(extra and pad for extra, pad in checked)  # a pass with chunks, padded
    assert (1, 0) in checked  # 4 tokens in 3 groups, padded to 4 groups: its last rows still loaded per pass


@cpu_check
def test_a_pass_whose_plan_does_not_fit_the_graph_runs_eagerly_and_is_counted(random_model):
    """On the CPU: graphs whose buffers hold blocks of 16 keys at most serve the session's decode
    passes (one token a worker) but cannot hold their plans, whose prompt block is longer; each
    such pass is counted as unfit and answered None (the runner then runs it eagerly)."""
    from hogwild_ray.model.graphs import DecodeGraphs
    from hogwild_ray.runner.model_runner import host_batch

    path, _ = random_model("qwen3", "yarn")
    engine = hw.HogwildEngine.from_pretrained(path, "cpu", "float32", cache_tokens=4096, attention="triton")
    runner = engine.runner
    graphs = DecodeGraphs(runner.decoder, runner.cache, max_context=16, max_chunk=1)
    forward, served = runner.forward, []

    def both(steps, table=None, staged=None, batch=None):
        groups, toks, key_pos, slots, last = host_batch(steps)
        if graphs.serves(groups):
            served.append(graphs.run(groups, toks, key_pos, slots, last, table))
        return forward(steps, table, staged, batch)

    runner.forward = both
    session = engine.start("Compute 12 * 7. " * 6, workers=2, max_tokens=8, protocol=False, chat_template=False)
    for _ in range(3):
        session.step()
    session.close()
    assert len(served) >= 2 and served == [None] * len(served) and graphs.unfit == len(served)
    assert graphs.replays == graphs.captures == 0


@gpu
def test_passes_with_chunks_replay_graphs_of_their_own(random_model):
    """With max_chunk, the passes where workers feed headers or injections replay graphs too
    (each group's logits and sample taken at its last token, loaded pass by pass): the same
    tokens as eager passes, logits within fp32 rounding."""
    path, _ = random_model("qwen3", "yarn")

    def chunks_graphed(engine, i):
        if engine.graphs is not None:
            engine.graphs.max_chunk = 64

    engine = _eager_and_graphed_agree(path, 4, chunks_graphed)
    captured = [key for key, entry in engine.graphs.graphs.items() if entry.graph is not None]
    assert any(not key.decode for key in captured), captured


@gpu
@pytest.mark.parametrize("folded", [True, False])
def test_chained_kernels_give_the_same_bits(random_model, folded):
    """A layer's kernels launched as programmatic dependents, one of the other (Hopper and
    later), with the default prefetch or whole weight rows and units prefetched: bit for bit the
    tokens and logits of kernels that each wait for the one before to end, every decode product
    on the skinny kernel in all, every small kernel that can be folded into a neighbour folded,
    or none."""
    from hogwild_kernels import pdl
    from hogwild_kernels.skinny import pick

    from hogwild_ray.model.decoder import FOLDS, PRODUCTS

    if not pdl.supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9 or more")
    path, _ = random_model("qwen3", "yarn")
    runs = {}
    for chain in ("unchained", "chained", "chained, prefetching more"):
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "bfloat16", cache_tokens=8192, cuda_graphs=True)
        engine.decoder.set_chained(chain != "unchained")
        if chain == "chained, prefetching more":
            engine.decoder.prefetch = dict.fromkeys(PRODUCTS, 1 << 16)
            engine.decoder.next_bytes = 8192  # and the next product's weight asked for as each product ends
            engine.decoder.attention.prefetch_keys = 512
        engine.decoder.folds = set(FOLDS) if folded else set()
        engine.decoder.products = {key: pick(*key[:2]) for key in engine.decoder.products}
        runs[chain] = _run(engine, 4, 40)
        assert engine.graphs.replays >= 15
    for chain in ("chained", "chained, prefetching more"):
        assert runs[chain][0] == runs["unchained"][0]
        for a, b in zip(runs["unchained"][1], runs[chain][1]):
            torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


@gpu
def test_oracle_through_graphs(random_model):
    path, hf_model = random_model("qwen3", "yarn")
    engine = hw.HogwildEngine.from_pretrained(path, "cuda", "float32", cache_tokens=4096, cuda_graphs=True)
    worst, finished, _ = run_oracle(engine, hf_model, 5, "combined", steps=40)
    assert worst <= TOL and finished >= 2 and engine.graphs.replays > 0


@gpu
def test_a_capture_compiles_nothing_after_its_short_warm_up(random_model):
    """A capture's warm-up runs only the first few layers, yet no Triton kernel is compiled or
    loaded while a graph captures, in decode passes and in passes with headers, injections and
    their chunks (float16: kernels no other test of this module has compiled in its process).
    A guard more than a proof: the eager prompt passes compile most kernels before the first
    capture, so on an H200 a one-layer warm-up left nothing to compile here either."""
    from triton import knobs

    path, _ = random_model("qwen3", "yarn", num_hidden_layers=4)
    while_capturing = []
    before = knobs.runtime.jit_cache_hook

    def compiling(*, fn, **kw):
        while_capturing.append(torch.cuda.is_current_stream_capturing() and fn.name)
        return before(fn=fn, **kw) if before else False

    knobs.runtime.jit_cache_hook = compiling
    try:
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "float16", cache_tokens=8192, cuda_graphs=True)
        assert engine.graphs.warmup_layers == WARMUP_LAYERS < engine.spec.num_layers
        _run(engine, 4, 40)
    finally:
        knobs.runtime.jit_cache_hook = before
    assert engine.graphs.captures >= 3 and any(not key.decode for key in engine.graphs.graphs)
    assert while_capturing and not any(while_capturing), [name for name in while_capturing if name]


@gpu
def test_one_host_sync_per_step(random_model):
    """Every step, graphed or eager, waits for the device once: for the sampled tokens (their
    copy's event; with the next pass launched behind them, not for that pass). Nothing else
    synchronizes: torch's sync debug mode flags no call."""
    from hogwild_ray.executor import local

    reads = []

    class Counted(local.HostCopy):
        def tolist(self):
            reads.append(1)
            return super().tolist()

    path, _ = random_model("qwen3", "yarn")
    engine = hw.HogwildEngine.from_pretrained(path, "cuda", "bfloat16", cache_tokens=8192, cuda_graphs=True)
    session = engine.start("Compute 12 * 7 and explain.", workers=4, max_tokens=400,
                           sampling=hw.SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
                           redundancy_every=15, stop_on_answer=False)
    for _ in range(5):  # captures and first-time kernel compiles out of the way
        session.step()
    counts = []
    try:
        torch.cuda.set_sync_debug_mode("warn")
        local.HostCopy = Counted
        for i in range(40):
            reads.clear()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                session.step(inject={1: "Let me check.\n\n"} if i == 7 else None)
            counts.append((len(reads), sum("synchroniz" in str(w.message) for w in caught)))
    finally:
        local.HostCopy = Counted.__base__
        torch.cuda.set_sync_debug_mode("default")
        session.close()
    assert engine.graphs.replays >= 20 and engine.executor.prelaunched >= 20
    assert counts == [(1, 0)] * len(counts), counts
    # each graph captured once, and counted (the overhead benchmark's steps that captured one)
    assert engine.graphs.captures == sum(g.graph is not None for g in engine.graphs.graphs.values()) > 0
    metrics = engine.metrics()  # what the server's /metrics sums over its engines
    assert metrics["graph_captures"] == engine.graphs.captures
    assert metrics["graph_capture_seconds"] == engine.graphs.capture_seconds > 0


@gpu
@pytest.mark.parametrize("sampling", [hw.SamplingParams(temperature=0.9, seed=5),
                                      hw.SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=6)])
def test_sampled_graph_decode_equals_eager(random_model, sampling):
    """Sampling inside the graph draws what the eager sampler draws: same seeds, same tokens."""
    path, _ = random_model("qwen3", "yarn")
    runs = {}
    for graphs in (False, True):
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "float32", cache_tokens=8192, cuda_graphs=graphs)
        session = engine.start("Compute 12 * 7 and explain.", workers=5, max_tokens=400, sampling=sampling,
                               redundancy_every=15, stop_on_answer=False)
        runs[graphs] = [session.step() for _ in range(50) if not session.done]
        session.close()
        if graphs:
            assert engine.graphs.replays >= 20
            assert any(entry.sampled is not None and entry.mode != "greedy" for entry in engine.graphs.graphs.values())
    assert runs[True] == runs[False]


@gpu
def test_a_greedy_pass_replays_the_sampling_graph_of_its_shape(random_model):
    """A sampled session, then a greedy one of the same shapes, in one engine: the greedy passes
    replay the sampling graphs (no greedy graph is captured) and take the eager engine's tokens."""
    path, _ = random_model("qwen3", "yarn")
    runs = {}
    for graphs in (False, True):
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "float32", cache_tokens=8192, cuda_graphs=graphs)
        for sampling in (hw.SamplingParams(temperature=0.9, seed=5), hw.SamplingParams(temperature=0.0)):
            session = engine.start("Compute 12 * 7.", workers=3, max_tokens=40, protocol=False,
                                   chat_template=False, sampling=sampling)
            runs[graphs, sampling.temperature] = [session.step() for _ in range(30) if not session.done]
            session.close()
        if graphs:
            modes = {key.mode for key in engine.graphs.graphs if key.decode}
            assert "sample" in modes and "greedy" not in modes, engine.graphs.graphs.keys()
    assert runs[True, 0.0] == runs[False, 0.0] and runs[True, 0.9] == runs[False, 0.9]


@gpu
def test_sampling_runs_inside_the_graph(random_model):
    """A graphed decode step launches one graph and, outside it, at most the copy of the last
    logits and, for a pass launched ahead, the copy of the samples it takes into its inputs
    (a gather, a cast and a scatter): no sampling kernels of its own."""
    from torch.profiler import ProfilerActivity, profile

    path, _ = random_model("qwen3", "yarn")
    engine = hw.HogwildEngine.from_pretrained(path, "cuda", "bfloat16", cache_tokens=8192, cuda_graphs=True)
    session = engine.start("Compute 12 * 7 and explain.", workers=4, max_tokens=400,
                           sampling=hw.SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=1),
                           redundancy_every=None, stop_on_answer=False, protocol=False)
    for _ in range(5):
        session.step()
    replays = engine.graphs.replays
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            session.step()
    session.close()
    names = [e.name for e in prof.events()]
    graph_launches = sum("GraphLaunch" in n for n in names)
    kernels = sum("LaunchKernel" in n for n in names)
    assert engine.graphs.replays - replays == 10 and graph_launches == 10
    assert kernels <= 10 * 4, sorted(set(n for n in names if "Launch" in n))


@gpu
def test_staged_plans_survive_other_sessions_and_forks(random_model):
    """The next pass's plan, staged while the current one runs, is used only when it came true:
    another session replaying the same graph in between, or a fork, makes the step rebuild it.
    Tokens equal an eager engine's, and most decode steps use the staged plan."""
    path, _ = random_model("qwen3", "yarn")
    sampling = hw.SamplingParams(temperature=0.9, seed=11)
    runs = {}
    for graphs in (False, True):
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "float32", cache_tokens=16384, cuda_graphs=graphs)
        one = engine.start("Compute 12 * 7 and explain.", workers=3, max_tokens=400, sampling=sampling,
                           redundancy_every=15, stop_on_answer=False)
        other = engine.start("Name three primes.", workers=3, max_tokens=400, sampling=sampling, protocol=False)
        tokens, forced = [], None
        for i in range(48):
            tokens.append(one.step())
            if i % 5 == 2:
                other.step()
            if i == 20:
                forced = one.force_answers([0, 2])
        runs[graphs] = tokens, forced
        one.close()
        other.close()
        if graphs:
            assert engine.graphs.staged_hits >= 20, engine.graphs.staged_hits
    assert runs[True] == runs[False]


@gpu
def test_batched_decode_passes_replay_graphs_with_staged_plans(random_model):
    """Several sessions (layouts, worker counts, sampling, protocol on and off) in shared passes:
    decode passes replay CUDA graphs, most with their plan staged during the previous pass; the
    tokens equal an eager engine's and the oracle holds for every session."""
    from oracle import oracle_check

    path, hf_model = random_model("qwen3", "yarn")
    runs = {}
    for graphs in (False, True):
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "float32", cache_tokens=16384, cuda_graphs=graphs)
        sessions = [
            engine.start("Compute 12 * 7 and explain.", workers=3, max_tokens=400, redundancy_every=None,
                         sampling=hw.SamplingParams(temperature=0.9, seed=11), stop_on_answer=False),
            engine.start("Name three primes.", workers=2, layout="interleaved", max_tokens=400, protocol=False,
                         sampling=hw.SamplingParams(temperature=0)),
            engine.start("What is 2 + 2?", workers=4, layout="contiguous", max_tokens=400, write_prompt=False,
                         sampling=hw.SamplingParams(temperature=0.7, top_k=20, seed=5), stop_on_answer=False),
        ]
        tokens = []
        for _ in range(40):
            out = engine.step(sessions)
            tokens.append([out[s] for s in sessions])
        if graphs:
            assert engine.graphs.replays >= 25 and engine.executor.staged_passes >= 15, \
                (engine.graphs.replays, engine.executor.staged_passes)
            assert all(oracle_check(s, hf_model) <= TOL for s in sessions)
        for s in sessions:
            s.close()
        runs[graphs] = tokens
    assert runs[True] == runs[False]


@given(st.integers(1, 4096))
def test_captured_sizes_are_few_and_pad_little(n):
    """A pass of n tokens (or groups) goes to the graph of captured_size(n): never fewer, the
    same size for every n it covers, and at most 15 padding rows (63 past 256 rows)."""
    from hogwild_ray.model.graphs import captured_size

    size = captured_size(n)
    assert n <= size == captured_size(size) and captured_size(n - 1 or 1) <= size
    assert size - n < (8 if n <= 8 else 16 if n <= 256 else 64)
    assert size in (1, 2, 4, 8) or size % 16 == 0


@given(st.integers(1, 16), st.integers(0, 80))
def test_a_warm_up_meets_every_padded_size_of_a_decode_pass(workers, max_sessions):
    """The batch sizes a server warms its graphs up with: each at most max_sessions, sorted, and
    between them every captured_size that sessions x workers reach, with the fewest and the
    most sessions of each; a bad count is refused by name."""
    from hogwild_ray.core.graph_sizes import captured_size, warmup_sessions

    sizes = warmup_sessions(workers, max_sessions)
    assert sizes == sorted(set(sizes)) and all(1 <= n <= max_sessions for n in sizes)
    every = range(1, max_sessions + 1)
    for padded in {captured_size(n * workers) for n in every}:
        reach = [n for n in every if captured_size(n * workers) == padded]
        assert reach[0] in sizes and reach[-1] in sizes
    assert len(sizes) <= 2 * len({captured_size(n * workers) for n in every})
    with pytest.raises(ValueError, match="max_sessions must be >= 0"):
        warmup_sessions(workers, -1)
    with pytest.raises(ValueError, match="workers must be >= 1"):
        warmup_sessions(0, max_sessions)


@gpu
def test_a_warm_up_captures_the_decode_graphs_a_batch_then_needs(random_model):
    """A server's warm-up (warm_up_graphs, up to 4 sessions of 2 workers) before 3 real problems
    at once: their decode passes capture fewer graphs than on a cold engine, where every first
    pass of a shape captures its own."""
    from hogwild_ray.graph_warmup import warm_up_graphs

    path, _ = random_model("qwen3", "yarn")
    problems = ["Compute 12 * 7 and explain.", "What is 3 + 4?", "Name three primes."]
    captured = {}
    for sessions in (0, 4):
        engine = hw.HogwildEngine.from_pretrained(path, "cuda", "bfloat16", cache_tokens=8192, cuda_graphs=True)
        done = warm_up_graphs(engine, 2, sessions)
        assert done.sessions == tuple(range(1, sessions + 1)) and (done.captures > 0) == (sessions > 0)
        assert done.captures == engine.graphs.captures
        ready = {key for key, g in engine.graphs.graphs.items() if g.graph is not None}
        engine.solve_many(problems, max_concurrent=3, workers=2, max_tokens=24, sampling=hw.SamplingParams(seed=3),
                          progress=False)
        captured[sessions] = [key for key, g in engine.graphs.graphs.items()
                              if g.graph is not None and key.decode and key not in ready]
        del engine
    assert len(captured[4]) < len(captured[0]), captured
