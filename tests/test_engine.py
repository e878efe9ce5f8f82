"""The engine end to end: loading, greedy decoding against transformers, bad input,
stopping rules and the protocol on a live session, and the real model solving a problem.

Random-weight models (tests/models.py) keep most of this fast; the built-in SmolLM2 model
is used where a test is about it. Every failure must leave the engine's page pool whole.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from dictation import dictate

import hogwild_ray as hw
from hogwild_ray.errors import (
    CacheFullError, ContextLengthError, HogwildError, InvalidRequestError, ModelNotFoundError,
    UnsupportedModelError,
)
from hogwild_ray.core.layout import PageAllocator
from hogwild_ray.model.loader import default_checkpoint, locate
from hogwild_ray.core.protocol import FINISHER_PROMPT, REDUNDANCY_QUESTION

GREEDY = hw.SamplingParams(temperature=0)
HOT = hw.SamplingParams(temperature=1.0, seed=0)
PROBLEM = "What is 2 + 3?"
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


# ---- helpers and fixtures -------------------------------------------------------------------

def pages_free(engine) -> bool:
    return engine.allocator.free_pages == engine.allocator.num_pages


def run_plain(engine, problem: str, n: int, **options):
    """One worker, no protocol, greedy: the tokens step() returns, and the session."""
    session = engine.start(problem, workers=1, protocol=False, sampling=GREEDY, max_tokens=n, **options)
    out = []
    for _ in range(n + 1):
        if session.done:
            break
        out += session.step()[0]
    assert session.done, "one worker without the protocol must yield a token per step"
    return out, session


def hf_greedy(hf_model, ids: list[int], n: int, eos_ids) -> list[int]:
    """transformers' greedy continuation, cut at the first EOS (the engine never reports one)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                pad_token_id=0)[0, len(ids):].tolist()
    cut = [i for i, t in enumerate(out) if t in eos_ids]
    return out[: cut[0]] if cut else out


def hf_last_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor([ids])).logits[0, -1]


def first_logits(engine, problem: str = "2 + 3 =") -> tuple[torch.Tensor, list[int]]:
    """The engine's logits after the plain prompt (one worker, one pass)."""
    session = engine.start(problem, workers=1, protocol=False, chat_template=False, sampling=GREEDY, max_tokens=4)
    session.step()
    logits, view = session.last_logits[0].clone(), session.last_views[0]
    session.close()
    assert view == session.prompt_ids
    return logits, view


def assert_matches_hf(engine, hf_model, problem: str = "2 + 3 =") -> None:
    ours, ids = first_logits(engine, problem)
    ref = hf_last_logits(hf_model, ids)
    assert (ours - ref).abs().max() <= 2e-4 * ref.abs().max()


def copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def llama(random_model):
    """(engine, hf_model, path) of the random Llama, with room for several sessions' pages."""
    path, hf_model = random_model("llama")
    return hw.HogwildEngine.from_pretrained(path, cache_tokens=8192), hf_model, path


@pytest.fixture
def engine(llama):
    """The random Llama's engine; a test that leaves pages taken fails, and only that test."""
    eng = llama[0]
    yield eng
    leaked = eng.allocator.num_pages - eng.allocator.free_pages
    if leaked:
        eng.allocator = PageAllocator(eng.allocator.num_pages, eng.allocator.page_size)
    assert not leaked, f"{leaked} pages still taken after the test"


@pytest.fixture(scope="module")
def gguf_file_engine():
    """The default model loaded through the path of its .gguf file (default_engine: its directory)."""
    ckpt = default_checkpoint()
    return hw.HogwildEngine.from_pretrained(ckpt.directory / ckpt.gguf_file)


# ---- 1. one worker, no protocol: exactly transformers' greedy decoding ---------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_plain_greedy_matches_transformers_random(random_model, family):
    path, hf_model = random_model(family)
    eng = hw.HogwildEngine.from_pretrained(path, cache_tokens=2048)
    out, session = run_plain(eng, PROBLEM, 32)
    ref = hf_greedy(hf_model, session.prompt_ids, 32, eng.eos_ids)
    assert len(ref) == 32 and out == ref
    assert session.stats.forward_passes == 32 and session.stats.stop_reason == "budget"
    assert session.stats.tokens_per_worker == [32] and session.result().worker_texts[0] == eng.tokenizer.decode(out)
    assert pages_free(eng)


def test_plain_greedy_matches_transformers_real(gguf_file_engine, default_hf_model):
    eng = gguf_file_engine
    out, session = run_plain(eng, "Write a short poem about the sea.", 24)
    ref = hf_greedy(default_hf_model, session.prompt_ids, 24, eng.eos_ids)
    assert len(out) >= 8 and out == ref
    assert session.prompt_ids[-4:] == eng.tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert pages_free(eng)


def test_plain_solve_ends(engine):
    """solve() without the protocol runs to its budget: one token per worker per pass."""
    calls = []

    def bounded(session, new):
        calls.append(new)
        assert len(calls) <= 10, "solve() went on without writing a token"

    result = engine.solve("Count: 1, 2, 3,", workers=2, max_tokens=6, sampling=GREEDY, protocol=False,
                          chat_template=False, on_step=bounded)
    assert [len(new[0]) for new in calls] == [1] * 6
    assert result.stats.generated_per_worker == [6, 6] and result.answer is None
    assert result.stats.forward_passes == 6 and pages_free(engine)
    # the transcript holds what the workers wrote, not the prompt's last token they fed
    assert result.transcript == "\n\n".join(t.strip() for t in result.worker_texts if t.strip())


# ---- 2. loading --------------------------------------------------------------------------

def test_sharded_safetensors_match_single_file(llama, tmp_path):
    eng, hf_model, path = llama
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, safe_serialization=True, max_shard_size="2MB")
    copy_model(path, sharded, skip=("model.safetensors", "config.json"))
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    single, _ = first_logits(eng)
    ours, _ = first_logits(hw.HogwildEngine.from_pretrained(sharded, cache_tokens=256))
    assert torch.equal(ours, single)
    assert_matches_hf(eng, hf_model)


def test_gguf_file_and_directory(default_engine, gguf_file_engine):
    ckpt = default_checkpoint()
    assert ckpt.gguf_file.endswith(".gguf")
    assert locate(ckpt.directory) == locate(ckpt.directory / ckpt.gguf_file) == ckpt
    assert default_engine.label == gguf_file_engine.label == str(ckpt.directory / ckpt.gguf_file)
    assert torch.equal(first_logits(default_engine)[0], first_logits(gguf_file_engine)[0])


@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(random_model, tied):
    path, hf_model = random_model("llama", tie_word_embeddings=tied, num_hidden_layers=1)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        has_head = "lm_head.weight" in f.keys()
    assert has_head is not tied
    eng = hw.HogwildEngine.from_pretrained(path, cache_tokens=256)
    assert eng.spec.tie_embeddings is tied
    assert_matches_hf(eng, hf_model)


def test_untied_checkpoint_without_head_is_refused(random_model, tmp_path):
    path, hf_model = random_model("llama", tie_word_embeddings=False, num_hidden_layers=1)
    from safetensors.torch import save_file

    d = copy_model(path, tmp_path / "headless", skip=("model.safetensors",))
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelNotFoundError, match="lm_head.weight"):
        hw.HogwildEngine.from_pretrained(d, cache_tokens=256)


# ---- 3. bad input: a clear error, and nothing left behind --------------------------------

def load_error(path, **kw) -> HogwildError:
    with pytest.raises(HogwildError) as err:
        hw.HogwildEngine.from_pretrained(path, **kw)
    return err.value


def test_missing_path(tmp_path):
    e = load_error(tmp_path / "nowhere")
    assert isinstance(e, ModelNotFoundError) and "does not exist" in str(e) and "nowhere" in str(e)


def test_directory_without_config(tmp_path):
    e = load_error(tmp_path)
    assert isinstance(e, ModelNotFoundError)
    assert "config.json" in str(e) and ".gguf" in str(e)


def test_config_without_weights(llama, tmp_path):
    d = copy_model(llama[2], tmp_path / "m", skip=("model.safetensors",))
    e = load_error(d)
    assert isinstance(e, ModelNotFoundError) and ".safetensors" in str(e)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not to be unpickled")
    e = load_error(d)
    assert isinstance(e, ModelNotFoundError)
    assert "pytorch_model.bin" in str(e) and "never unpickles" in str(e) and "safe_serialization" in str(e)


def test_unsupported_architecture(llama, tmp_path):
    from transformers import GPT2Config

    d = copy_model(llama[2], tmp_path / "gpt2", skip=("config.json",))
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(d)
    e = load_error(d)
    assert isinstance(e, UnsupportedModelError) and "gpt2" in str(e) and "llama" in str(e)


def test_remote_code_is_refused(llama, tmp_path):
    d = copy_model(llama[2], tmp_path / "remote", skip=("config.json",))
    (d / "config.json").write_text(json.dumps(
        {"model_type": "mymodel", "auto_map": {"AutoConfig": "configuration_mymodel.MyConfig",
                                               "AutoModelForCausalLM": "modeling_mymodel.MyModel"}}))
    (d / "configuration_mymodel.py").write_text("raise SystemExit('remote code ran')\n")
    e = load_error(d)
    assert isinstance(e, UnsupportedModelError) and "remote code" in str(e) and "mymodel" in str(e)


@pytest.mark.parametrize("rope,fix", [
    ({"rope_type": "dynamic", "factor": 2.0}, "linear"),
    ({"type": "dynamic", "factor": 2.0}, "linear"),  # the transformers 4 spelling
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8, "factor": 2.0,
      "original_max_position_embeddings": 1024}, "yarn"),
])
def test_position_dependent_rope_is_refused(llama, tmp_path, rope, fix):
    d = copy_model(llama[2], tmp_path / "rope")
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    if "type" in rope:
        cfg["rope_scaling"], cfg["rope_theta"] = rope, 10000.0
    else:
        cfg["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    e = load_error(d)
    kind = rope.get("rope_type", rope.get("type"))
    assert isinstance(e, UnsupportedModelError) and kind in str(e) and fix in str(e)


def test_sliding_window_shorter_than_context(random_model):
    path, hf_model = random_model("mistral", sliding_window=64)
    e = load_error(path)
    assert isinstance(e, UnsupportedModelError) and "sliding" in str(e) and "max_context=64" in str(e)
    eng = hw.HogwildEngine.from_pretrained(path, max_context=64, cache_tokens=256)
    assert eng.max_context == 64
    assert_matches_hf(eng, hf_model)


@pytest.mark.parametrize("workers", [0, -1, 1.5, True, "2", None])
def test_bad_worker_count(engine, workers):
    with pytest.raises(InvalidRequestError, match="workers must be an integer >= 1"):
        engine.start(PROBLEM, workers=workers)
    assert pages_free(engine)


def test_problem_longer_than_context(llama):
    eng = hw.HogwildEngine.from_pretrained(llama[2], max_context=128, cache_tokens=4096)
    with pytest.raises(ContextLengthError, match="max_context") as err:
        eng.start("Add these numbers: " + " + ".join(map(str, range(200))))
    assert "128" in str(err.value)
    assert pages_free(eng)
    out, _ = run_plain(eng, "2 + 3 =", 4, chat_template=False)  # a short one fits
    assert len(out) == 4 and pages_free(eng)


@pytest.mark.parametrize("kwargs,field", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"seed": -1}, "seed"),
])
def test_sampling_out_of_range(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        hw.SamplingParams(**kwargs)


def test_sampling_list_of_the_wrong_length(engine):
    with pytest.raises(InvalidRequestError, match="one per worker"):
        engine.start(PROBLEM, workers=3, sampling=[GREEDY, GREEDY])
    assert pages_free(engine)


def test_cache_too_small(llama):
    eng = hw.HogwildEngine.from_pretrained(llama[2], cache_tokens=64)
    with pytest.raises(CacheFullError, match="cache_tokens"):
        eng.start(PROBLEM, workers=2, max_tokens=100)
    assert pages_free(eng)
    with pytest.raises(CacheFullError, match="cache_tokens"):  # no budget to check: fails in the prefill
        eng.start(PROBLEM, workers=2, max_tokens=None)
    assert pages_free(eng)


def test_cache_full_in_the_middle_of_a_session(llama):
    """With no token budget the pool runs out during a step: the session ends, its pages come back."""
    probe = hw.HogwildEngine.from_pretrained(llama[2], cache_tokens=4096, page_size=16)
    session = probe.start(PROBLEM, workers=2, max_tokens=None)
    session.step()
    used = probe.allocator.num_pages - probe.allocator.free_pages
    session.close()
    eng = hw.HogwildEngine.from_pretrained(llama[2], cache_tokens=(used + 3) * 16, page_size=16)
    session = eng.start(PROBLEM, workers=2, max_tokens=None, sampling=HOT)
    with pytest.raises(CacheFullError, match="cache_tokens"):
        for _ in range(200):
            session.step()
    assert session.done and pages_free(eng)
    assert session.stats.forward_passes > 0


def test_unknown_protocol_option(engine):
    with pytest.raises(InvalidRequestError, match="frobnicate") as err:
        engine.start(PROBLEM, frobnicate=True)
    assert "redundancy_every" in str(err.value)
    assert pages_free(engine)


def test_bad_layout(engine):
    with pytest.raises(InvalidRequestError, match="layout must be one of") as err:
        engine.start(PROBLEM, layout="diagonal")
    assert all(name in str(err.value) for name in hw.LAYOUTS)
    assert pages_free(engine)


@pytest.mark.parametrize("device,words", [("nonsense", "not a torch device"), (3.5, "not a torch device"),
                                          ("cuda", "no CUDA GPU")])
def test_bad_device(llama, device, words):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    e = load_error(llama[2], device=device)
    assert isinstance(e, InvalidRequestError) and words in str(e) and "'cpu'" in str(e)


@pytest.mark.parametrize("dtype", ["float8", torch.int64, "double"])
def test_bad_dtype(llama, dtype):
    e = load_error(llama[2], dtype=dtype)
    assert isinstance(e, InvalidRequestError) and "dtype must be one of" in str(e) and "bfloat16" in str(e)


@pytest.mark.parametrize("inject,words", [({2: "x"}, "workers are 0..1"), ({-1: "x"}, "workers are 0..1"),
                                          ({True: "x"}, "workers are 0..1"), ({"0": "x"}, "workers are 0..1"),
                                          ({0: 5}, "must be a string"), (["x"], "dict")])
def test_bad_inject(engine, inject, words):
    session = engine.start(PROBLEM, workers=2, max_tokens=8, sampling=GREEDY)
    session.step()
    lengths = [session.layout.view_length(w) for w in range(2)]
    with pytest.raises(InvalidRequestError, match=words):
        session.step(inject=inject)
    assert [session.layout.view_length(w) for w in range(2)] == lengths  # nothing was fed
    assert not session.done
    session.step()
    session.close()
    assert pages_free(engine)


def test_step_after_done(engine):
    result_session = engine.start(PROBLEM, workers=2, max_tokens=3, sampling=GREEDY, finisher=False)
    for _ in range(3):
        result_session.step()
    assert result_session.done
    assert pages_free(engine)
    with pytest.raises(InvalidRequestError, match="done"):
        result_session.step()
    closed = engine.start(PROBLEM, workers=2, max_tokens=3)
    closed.close()
    closed.close()  # idempotent
    with pytest.raises(InvalidRequestError, match="start a new one"):
        closed.step()
    assert pages_free(engine)


# ---- 4. stopping and the protocol on a live session ---------------------------------------

def test_forced_step_boundary_moves_into_history(engine):
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=60, redundancy_every=None)
    for _ in range(3):
        session.step()
    text = " So that much is settled...\n\n"
    ids = session.encode(text)
    history = len(session.layout.common.tokens)
    new = session.step(inject={1: text})
    assert new[1] == ids  # the sample after a paragraph break is dropped: a header comes next
    assert session.last_steps[1].tokens[-len(ids):] == ids
    common = session.layout.common.tokens  # the finished step moved while the pass ran
    assert common[-len(ids):] == ids and len(common) > history
    assert session.tok.decode(common[history:]).startswith("**Bob [1]:** ")
    new = session.step()
    header = session.encode("**Bob [2]:** ")
    assert session.last_steps[1].tokens == header and new[1][: len(header)] == header
    assert session.stats.steps_per_worker == [0, 1]
    assert session.layout.cur[1].tokens == header  # the new step's block holds only its header
    session.close()


def rig_samples(session, change) -> None:
    """Let change(pass number (1-based), worker order, sampled tokens) rewrite the session's
    samples of every pass (the engine's executor is patched: engines here live for one test)."""
    executor, sid = session.executor.executor, session.executor.session
    run, passes = executor.run, [0]

    def rigged(parts, while_running=None):
        out = run(parts, while_running)
        if sid in out and not isinstance(out[sid], Exception) and out[sid][0]:
            steps, tokens = out[sid]
            passes[0] += 1
            change(passes[0], [s.worker for s in steps], tokens)
        return out

    executor.run = rigged


def force_samples(session, worker: int, ids: list[int], start: int = 1) -> None:
    """Make `worker` sample ids[0], ids[1], ... at passes start, start + 1, ... (1-based): text the
    model writes itself, one token a pass, each fed in the pass after it was sampled."""

    def change(n, order, tokens):
        if 0 <= n - start < len(ids) and worker in order:
            tokens[order.index(worker)] = ids[n - start]

    rig_samples(session, change)


@pytest.mark.parametrize("imitation", ["\n**Bob [13]:**", " **Alice [2]:**"])
def test_a_step_header_written_by_the_worker_ends_its_step(llama, engine, imitation):
    """A worker that writes a step header of its own (no blank line before it) ends its step once
    the header is complete; the header's tokens stay at the end of the finished step (they are in
    the cache: nothing is recomputed), and the protocol's own next header follows. Exact throughout."""
    from oracle import TOL, oracle_check

    hf_model = llama[1]
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=60, redundancy_every=None, finisher=False)
    ids = session.encode("So 2 + 3 = 5." + imitation)
    force_samples(session, 1, ids)  # sampled in passes 1..n, fed in passes 2..n+1
    for _ in range(len(ids)):
        session.step()
        assert session.stats.steps_per_worker == [0, 0]  # an incomplete header ends nothing
        assert oracle_check(session, hf_model) <= TOL
    history = len(session.layout.common.tokens)
    new = session.step()  # feeds the header's closing `:**`
    assert session.last_steps[1].tokens == ids[-1:]
    assert new[1] == []  # the sample after the step's end is dropped: the protocol's header comes next
    assert session.stats.steps_per_worker == [0, 1]
    assert oracle_check(session, hf_model) <= TOL
    common = session.layout.common.tokens  # the finished step moved while the pass ran
    assert common[-len(ids):] == ids and len(common) > history
    assert session.tok.decode(common[history:]) == "**Bob [1]:** So 2 + 3 = 5." + imitation
    new = session.step()
    assert oracle_check(session, hf_model) <= TOL
    header = session.encode("**Bob [2]:** ")
    assert new[1][: len(header)] == header and session.last_steps[1].tokens == header
    assert session.text(1).startswith("**Bob [1]:** So 2 + 3 = 5." + imitation + "**Bob [2]:** ")
    for _ in range(3):
        session.step()
        assert oracle_check(session, hf_model) <= TOL
    assert session.stats.steps_per_worker == [0, 1]
    session.close()


def test_boxed_answer_stops_the_session(engine, monkeypatch):
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=60)
    session.step()
    text = "Adding them: 2 + 3 = 5, so the answer is \\boxed{42}.\n\n"
    dictate(monkeypatch, session, 0, text)  # worker 0 writes it itself (an injected box is no answer)
    # Its n tokens are sampled in passes 2 .. n + 1, each fed the pass after: the last one, the
    # paragraph break, is fed in pass n + 2, and only then is the step finished and its box the answer
    end = len(session.encode(text)) + 2
    while session.stats.forward_passes < end - 1:
        session.step()
        assert not session.done and session.answer is None  # no paragraph break yet: not a finished step
    assert session.text(0).endswith(text)  # the break is sampled, not yet fed
    session.step()
    assert session.stats.forward_passes == end
    assert session.done and session.answer == "42" and session.stats.stop_reason == "answer"
    assert pages_free(engine)
    result = session.result()
    assert result.answer == "42" and "\\boxed{42}" in result.transcript and "\\boxed{42}" in result.worker_texts[0]


@pytest.mark.parametrize("eos_worker", [0, 1])
def test_the_first_answer_in_worker_order_wins_a_pass(engine, eos_worker):
    """In one pass a worker stops (it samples the end of text, its step holding a box) and another
    one's step ends (its paragraph break is fed, the step holding another box): the session's
    answer is the lower-numbered worker's, whichever way each one ended."""
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=60, redundancy_every=None, finisher=False)
    session.step()
    eos = session.tok.eos_token_id
    stop = session.encode(f"So \\boxed{{{eos_worker}}}") + [eos]  # the end of text is sampled, never fed
    step = session.encode(f"So \\boxed{{{1 - eos_worker}}}.\n\n")  # the break ends the step once it is fed
    filler = session.encode(" and")
    length = max(len(stop), len(step) + 1)
    stop = filler * (length - len(stop)) + stop
    step = filler * (length - 1 - len(step)) + step
    force_samples(session, eos_worker, stop, start=2)
    force_samples(session, 1 - eos_worker, step, start=2)
    while not session.done and session.stats.forward_passes < length + 1:
        session.step()
        assert session.answer is None
    session.step()
    assert session.stats.forward_passes == length + 2
    assert session.workers[eos_worker].status == "eos"
    assert session.stats.steps_per_worker[1 - eos_worker] == 1
    assert session.done and session.answer == "0" and session.stats.stop_reason == "answer"


def _run_forced(engine, forced, max_steps=None):
    """A session where worker w samples the ids forced(session)[w] = (ids, from pass), stepped to
    its end: each pass's new tokens and last logits, and the result."""
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=40, redundancy_every=None, finisher=False,
                           max_steps=max_steps)
    for w, (ids, start) in forced(session).items():
        force_samples(session, w, ids, start=start)
    passes, ended = [], []
    while not session.done:
        passes.append((session.step(), session.last_logits.clone()))
        ended.append(sum(session.stats.steps_per_worker))
    result = session.result()
    return passes, (result.answer, result.worker_texts, result.transcript, result.stats.forward_passes,
                    result.stats.steps_per_worker, result.stats.stop_reason), ended


def _steps_end(session):
    return {0: (session.encode("One part.\n\nTwo parts.\n\n"), 2), 1: (session.encode("Other side.\n\n"), 3)}


def _box_and_step_end_in_one_pass(session):
    """Worker 0 samples the end of text after a box in the pass where worker 1's paragraph break
    (after another box) is fed and ends its step (see the first-answer test above)."""
    stop = session.encode("So \\boxed{0}") + [session.tok.eos_token_id]
    step = session.encode("Then \\boxed{1}.\n\n")
    filler = session.encode(" and")
    length = max(len(stop), len(step) + 1)
    return {0: (filler * (length - len(stop)) + stop, 2), 1: (filler * (length - 1 - len(step)) + step, 2)}


@pytest.mark.parametrize("forced", [_steps_end, _box_and_step_end_in_one_pass])
def test_a_step_moved_while_its_pass_runs_changes_nothing(engine, monkeypatch, forced):
    """A finished step moves into the shared history while the pass that ended it runs (not at
    the next pass), except when the session may end with that pass: the tokens, logits, answer,
    texts and transcript are those of moving it at the next pass."""
    from hogwild_ray.session import Session

    early = _run_forced(engine, forced)
    with monkeypatch.context() as m:
        m.setattr(Session, "_may_end_with", lambda self, outcome: True)  # every step moves at the next pass
        late = _run_forced(engine, forced)
    _same_runs(early, late)


def test_a_step_that_ends_in_the_last_pass_of_max_steps_stays_live(engine, monkeypatch):
    """max_steps ends the session with the very pass where worker 1's step ends: that step is not
    moved early, so the transcript is the one of moving steps at the next pass."""
    from hogwild_ray.session import Session

    def worker_1_ends_a_step(session):  # after worker 0's text in the transcript, unless it moves
        return {1: (session.encode("Other side.\n\n"), 2)}

    ended = _run_forced(engine, worker_1_ends_a_step)[2]
    last = next(i for i, n in enumerate(ended) if n) + 1  # the pass where the step ends
    early = _run_forced(engine, worker_1_ends_a_step, max_steps=last)
    with monkeypatch.context() as m:
        m.setattr(Session, "_may_end_with", lambda self, outcome: True)
        late = _run_forced(engine, worker_1_ends_a_step, max_steps=last)
    _same_runs(early, late)
    assert early[1][3] == last


def _same_runs(early, late) -> None:
    assert early[1] == late[1]
    assert [new for new, _ in early[0]] == [new for new, _ in late[0]]
    for (_, a), (_, b) in zip(early[0], late[0]):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert sum(early[1][4]) >= 1  # steps ended


def test_the_pass_after_a_header_is_planned_ahead(engine):
    """A pass where workers feed chunks (the first pass feeds each worker's header) still has the
    next pass foreseen while it runs: each worker then feeds one token, and that pass's plan
    is the preview's."""
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=60, redundancy_every=None, finisher=False)
    new = session.step()
    assert all(len(tokens) > 1 for tokens in new.values())  # the headers, and each worker's first sample
    used = session.layout.previews_used
    session.step()
    assert session.layout.previews_used == used + 1
    session.close()


def assert_transcript_has_every_last_step(result) -> None:
    """Each worker's last paragraph (its step in progress, or the finisher's answer) up to its
    last sampled token, which was never fed to the cache, is in the transcript."""
    for text in result.worker_texts:
        assert text.split("\n\n")[-1].strip() in result.transcript


def run_collecting(session, limit: int = 400):
    """Step to the end; per worker the concatenated returned tokens, and each pass's returns."""
    streams, passes = [[] for _ in session.workers], []
    for _ in range(limit):
        if session.done:
            break
        new = session.step()
        passes.append((new, session.last_logits.clone()))
        for w, toks in new.items():
            streams[w] += toks
    assert session.done
    return streams, passes


def finisher_passes(session, passes) -> list:
    prompt = session.encode(FINISHER_PROMPT)
    start = next(i for i, (new, _) in enumerate(passes) if new[0][: len(prompt)] == prompt)
    return passes[start:]


def test_budget_without_answer_runs_the_greedy_finisher(engine):
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=8, finisher_tokens=5,
                           redundancy_every=None)
    streams, passes = run_collecting(session)
    fin = finisher_passes(session, passes)
    assert 1 <= len(fin) <= 5
    for new, logits in fin:
        assert new[1] == []  # only worker 0 writes the answer
        assert new[0][-1] == int(logits[0].argmax())  # greedy, although the workers sample at T=1
    assert session.stats.stop_reason == "budget+finisher" and session.answer
    assert session.stats.generated_per_worker == [8, 8]
    result = session.result()
    assert FINISHER_PROMPT.strip() in result.worker_texts[0]
    assert_transcript_has_every_last_step(result)
    assert pages_free(engine)

    off = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=8, finisher=False, redundancy_every=None)
    streams_off, passes_off = run_collecting(off)
    assert off.answer is None and off.stats.stop_reason == "budget"
    assert FINISHER_PROMPT.strip() not in off.result().worker_texts[0]
    assert off.stats.forward_passes == len(passes) - len(fin)  # the same run, without the finisher
    assert streams_off[1] == streams[1]
    assert pages_free(engine)


@pytest.mark.parametrize("max_steps,finisher_tokens", [(1, 32), (3, 32), (7, 4), (7, 32), (40, 4), (40, 32)])
def test_max_steps_caps_every_pass(engine, max_steps, finisher_tokens):
    """max_steps is the session's whole number of forward passes, with the finisher on or off: the
    workers stop early enough for the finisher to end by then (at least one pass is theirs)."""
    off = engine.start(PROBLEM, workers=3, sampling=HOT, max_tokens=500, max_steps=max_steps, finisher=False)
    _, passes = run_collecting(off)
    assert len(passes) == off.stats.forward_passes == max_steps
    assert off.stats.stop_reason == "budget" and pages_free(engine)

    on = engine.start(PROBLEM, workers=3, sampling=HOT, max_tokens=500, max_steps=max_steps,
                      finisher_tokens=finisher_tokens)
    _, passes = run_collecting(on)
    assert len(passes) == on.stats.forward_passes == max_steps
    work = max(max_steps - finisher_tokens, 1)  # the workers' passes; the rest is the finisher's
    if work == max_steps:  # no pass left for the finisher
        assert on.stats.stop_reason == "budget" and on.answer is None
    else:
        fin = finisher_passes(on, passes)
        assert len(passes) - len(fin) == work and len(fin) == max_steps - work
        assert on.stats.stop_reason == "budget+finisher"
    assert on.stats.generated_per_worker == [work] * 3
    assert pages_free(engine)


def test_workers_out_of_tokens_leave_the_finisher_its_passes(engine):
    """Workers that stop (max_tokens) before max_steps binds: the finisher runs in full, within the cap."""
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=3, max_steps=20, finisher_tokens=4,
                           redundancy_every=None)
    _, passes = run_collecting(session)
    fin = finisher_passes(session, passes)
    assert len(passes) - len(fin) == 3 and 1 <= len(fin) <= 4
    assert session.stats.forward_passes == len(passes) <= 20
    assert session.stats.stop_reason == "budget+finisher" and pages_free(engine)


def test_forced_answers_are_not_capped_by_max_steps(engine):
    """force_answers runs in a fork, whose finisher takes the passes it needs whatever max_steps says."""
    answers = []
    for max_steps in (None, 5):
        session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=50, max_steps=max_steps,
                               finisher=False, finisher_tokens=6, redundancy_every=None)
        for _ in range(4):
            session.step()
        answers.append(session.force_answers())
        assert session.stats.forward_passes == 4 and not session.done
        session.close()
    assert answers[0] == answers[1]
    assert all(a is not None and len(engine.tokenizer.encode(a)) > 1 for a in answers[1])
    assert pages_free(engine)


def force_eos(session, when: dict[int, int]):
    """Make worker w sample an EOS token at pass number when[w] (1-based)."""
    eos = min(session.engine.eos_ids)

    def change(n, order, tokens):
        for w, at in when.items():
            if at == n and w in order:
                tokens[order.index(w)] = eos

    rig_samples(session, change)
    return eos


def test_eos_stops_a_worker(engine):
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=50, redundancy_every=None, finisher=False)
    eos = force_eos(session, {1: 4, 0: 9})
    for _ in range(3):
        session.step()
    new = session.step()  # worker 1 samples EOS here
    assert eos not in new[1] and new[0]
    stopped, view = session.last_steps[1], session.last_views[1]
    for _ in range(4):
        new = session.step()
        assert new[1] == [] and new[0]  # worker 1 is no longer fed, worker 0 goes on
        assert session.last_steps[1] is stopped and session.last_views[1] == view
    assert not session.done
    new = session.step()  # pass 9: worker 0 samples EOS: everyone stopped
    assert session.done and session.stats.stop_reason == "eos" and session.answer is None
    assert eos not in session.workers[0].stream + session.workers[1].stream
    assert pages_free(engine)


def test_eos_of_everyone_runs_the_finisher(engine):
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=50, finisher_tokens=3)
    force_eos(session, {0: 2, 1: 2})
    run_collecting(session)
    assert session.stats.stop_reason == "eos+finisher" and session.answer
    assert pages_free(engine)


def test_interjection_is_fed_in_the_same_step(engine):
    session = engine.start(PROBLEM, workers=3, sampling=HOT, max_tokens=60, redundancy_every=None)
    for _ in range(3):
        last = session.step()
    text = " Wait, let me check that."
    ids = session.encode(text)
    new = session.step(inject={1: text})
    assert session.last_steps[1].tokens == [last[1][-1], *ids]  # after its last sample, before its next
    assert session.last_views[1][-len(ids):] == ids
    assert new[1][:-1] == ids and len(new[1]) == len(ids) + 1
    assert session.last_views[0][-len(ids):] != ids  # the others see it one step later
    session.step()
    view0 = session.last_views[0]
    assert any(view0[i:i + len(ids)] == ids for i in range(len(view0)))
    session.close()


def redundancy_texts(engine, every):
    session = engine.start(PROBLEM, workers=2, sampling=HOT, max_tokens=100, redundancy_every=every)
    session.step()
    session.step(inject={0: " First.\n\n"})  # a step of 1 sampled token: no question yet
    for _ in range(8):
        session.step()
    session.step(inject={0: " Second.\n\n"})  # 9 more sampled tokens
    session.step()
    texts = session.text(0), session.stats.redundancy_checks
    session.close()
    return texts


def test_redundancy_question(engine):
    text, checks = redundancy_texts(engine, 5)
    assert text.count(REDUNDANCY_QUESTION) == 1 and checks == 1
    assert "**Alice [2]:** " + REDUNDANCY_QUESTION not in text  # the first step was too short
    assert "**Alice [3]:** " + REDUNDANCY_QUESTION in text
    text, checks = redundancy_texts(engine, None)
    assert REDUNDANCY_QUESTION not in text and checks == 0 and "**Alice [3]:** " in text
    assert pages_free(engine)


@pytest.mark.parametrize("layout", hw.LAYOUTS)
def test_every_layout_runs_and_frees_its_pages(engine, layout):
    session = engine.start(PROBLEM, workers=4, layout=layout, sampling=HOT, max_tokens=200, redundancy_every=7)
    for i in range(30):
        session.step(inject={i % 4: " Done here.\n\n"} if i % 6 == 5 else None)
        for w, view in enumerate(session.last_views):
            assert view[: len(session.prompt_ids)] == session.prompt_ids
            assert view[-len(session.last_steps[w].tokens):] == session.last_steps[w].tokens
    assert sum(session.stats.steps_per_worker) >= 5
    in_use = engine.allocator.num_pages - engine.allocator.free_pages
    assert in_use * engine.allocator.page_size >= max(session.layout.view_length(w) for w in range(4))
    if layout == "contiguous":
        assert session.layout.common.tokens == session.prompt_ids
    else:
        assert len(session.layout.common.tokens) > len(session.prompt_ids)
    session.close()
    assert pages_free(engine)


def test_stats_are_consistent(engine):
    calls = []
    real = engine.runner.forward
    engine.runner.forward = lambda steps, *rest: (calls.append(len(steps)), real(steps, *rest))[1]
    streams = [[], []]
    try:
        result = engine.solve(PROBLEM, workers=2, max_tokens=20, sampling=HOT, redundancy_every=6,
                              on_step=lambda s, new: [streams[w].extend(t) for w, t in new.items()])
    finally:
        del engine.runner.forward
    st = result.stats
    prefill = 3  # the prompt and the two constant headers
    assert st.forward_passes == len(calls) - prefill and all(n <= 2 for n in calls[prefill:])
    assert st.tokens_per_worker == [len(s) for s in streams]
    assert result.worker_texts == [engine.tokenizer.decode(s) for s in streams]
    assert all(0 < g <= 20 for g in st.generated_per_worker)
    assert st.seconds > 0 and st.tokens_per_second > 0 and math.isfinite(st.tokens_per_second)
    assert st.tokens_per_second == pytest.approx(sum(st.generated_per_worker) / st.seconds)
    assert st.to_dict()["forward_passes"] == st.forward_passes
    assert result.worker_texts[0].startswith("**Alice [1]:** ") and result.worker_texts[1].startswith("**Bob [1]:** ")
    assert pages_free(engine)


# ---- 5. the real model, end to end ---------------------------------------------------------

def test_real_model_solves(default_engine):
    result = default_engine.solve("What is 2 + 3?", workers=2, max_tokens=40, sampling=GREEDY)
    assert isinstance(result.answer, str) and result.answer.strip()
    assert result.worker_texts[0].startswith("**Alice [1]:** ")
    assert result.worker_texts[1].startswith("**Bob [1]:** ")
    assert "**Alice [1]:**" in result.transcript and "**Bob [1]:**" in result.transcript
    assert_transcript_has_every_last_step(result)
    st = result.stats
    assert st.stop_reason in ("answer", "budget+finisher", "eos+finisher", "eos")
    assert st.forward_passes > 0 and st.tokens_per_second > 0
    assert all(0 < g <= 40 for g in st.generated_per_worker)
    assert all(n > g for n, g in zip(st.tokens_per_worker, st.generated_per_worker))  # + the headers
    assert pages_free(default_engine)


def test_api_arguments_that_would_misbehave_are_refused_naming_them():
    """Switches given as strings ("no" is truthy), a bare string as many problems (its characters
    would run), an on_step that is not a function (it failed after the first pass), and injected
    text that is not valid Unicode (the tokenizer's own TypeError)."""
    engine = hw.HogwildEngine.from_pretrained("random:tiny", "cpu", "float32", cache_tokens=2048)
    for option in ("protocol", "finisher", "stop_on_answer", "chat_template"):
        with pytest.raises(hw.InvalidRequestError, match=f"{option} must be True or False, got 'no'"):
            engine.start("hi", 2, **{option: "no"})
    with pytest.raises(hw.InvalidRequestError, match="got one str: wrap it in a list"):
        engine.solve_many("What is 2+2?")
    with pytest.raises(hw.InvalidRequestError, match="on_step must be a function"):
        engine.solve("hi", 2, max_tokens=4, on_step=5)
    session = engine.start("hi", 2, max_tokens=8)
    with pytest.raises(hw.InvalidRequestError, match=r"inject\[0\]"):
        session.step(inject={0: "\ud800"})
    with pytest.raises(hw.InvalidRequestError, match="sessions must be a list of this engine's sessions"):
        engine.step([1])
    session.close()
    assert engine.allocator.free_pages == engine.allocator.num_pages
