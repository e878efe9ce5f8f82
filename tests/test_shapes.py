"""Named random shapes (`random:NAME`): lookup, configs against the published ones, weights, decode."""

from __future__ import annotations

import pickle

import pytest
import torch

import hogwild_ray as hw
from hogwild_ray.errors import ModelNotFoundError
from hogwild_ray.model import locate, spec_from_config
from hogwild_ray.model.loader import load_config, load_tokenizer, weight_reader
from hogwild_ray.model.shapes import SHAPES, parameter_count

# From the published config.json files (Qwen/Qwen3-8B, meta-llama/Llama-3.1-8B, Qwen/Qwen2.5-32B).
PUBLISHED = {
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_type="default",
                     tie_word_embeddings=False),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                      max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3",
                      tie_word_embeddings=False),
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, head_dim=128, vocab_size=152064,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1000000.0,
                        rope_type="default", tie_word_embeddings=False),
}
# Parameter counts as published (billions, rounded as the model cards round them).
BILLIONS = {"qwen3-8b": 8.2, "llama3-8b": 8.0, "qwen2.5-32b": 32.8, "qwen3-0.6b": 0.6, "llama3-70b": 70.6}


def test_locate_names_and_errors():
    ckpt = locate("random:qwen3-8b")
    assert ckpt.is_random and ckpt.shape == "qwen3-8b" and ckpt.label == "random:qwen3-8b"
    for name in ("qwen3-8b", "llama3-8b", "qwen2.5-32b", "qwen3-0.6b", "llama3-70b", "tiny"):
        assert name in SHAPES
    with pytest.raises(ModelNotFoundError, match="random:qwen3-8b.*random:tiny|random:tiny.*random:qwen3-8b"):
        locate("random:qwen3-9b")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_configs_match_the_published_models(name):
    cfg = load_config(locate(f"random:{name}"))
    want = PUBLISHED[name]
    from hogwild_ray.model.spec import rope_parameters

    rp = rope_parameters(cfg)
    for field, value in want.items():
        got = rp.get("rope_type", "default") if field == "rope_type" else (
            rp["rope_theta"] if field == "rope_theta" else getattr(cfg, field))
        assert got == value, (name, field, got, value)
    spec = spec_from_config(cfg)  # the engine accepts it, no sliding window, no end-of-text token
    assert spec.sliding_window is None and spec.eos_token_ids == ()
    if name == "llama3-8b":
        assert rp["factor"] == 8.0 and rp["original_max_position_embeddings"] == 8192


@pytest.mark.parametrize("name", sorted(BILLIONS))
def test_parameter_counts(name):
    assert parameter_count(name) / 1e9 == pytest.approx(BILLIONS[name], abs=0.06)


def test_weights_have_the_engines_shapes_and_init():
    ckpt = locate("random:tiny-qwen3")
    cfg = load_config(ckpt)
    read = weight_reader(ckpt, cfg)
    w = read("model.layers.1.self_attn.q_proj.weight")
    assert w.shape == (4 * 16, 64) and 0.015 < w.float().std() < 0.025
    assert torch.equal(read("model.layers.1.self_attn.q_proj.weight"), w)  # seeded by name: ranks agree
    assert torch.all(read("model.layers.0.self_attn.k_norm.weight") == 1)
    assert read("lm_head.weight") is None and read("model.layers.0.self_attn.q_proj.bias") is None  # tied, no bias
    assert read("model.layers.2.mlp.up_proj.weight") is None
    qwen2 = load_config(locate("random:qwen2.5-32b"))
    from hogwild_ray.model.shapes import tensor_shapes

    shapes = tensor_shapes(qwen2)
    assert shapes["model.layers.63.self_attn.k_proj.bias"] == (1024,) and shapes["lm_head.weight"] == (152064, 5120)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == parameter_count("qwen2.5-32b")


def test_decode_folds_ids_past_the_vocab():
    tok = load_tokenizer(locate("random:qwen3-8b"))
    n = len(tok)
    assert n == 49152 and tok.eos_token_id is None
    ids = [tok("Hello")["input_ids"][0], n + 5, 151935]
    text = tok.decode(ids)
    assert text == tok.tokenizer.decode([ids[0], 5, 151935 % n]) and text.startswith("Hello")
    assert tok.tokenizer.decode([n + 5]) == ""  # what the plain tokenizer does: the id vanishes
    assert None not in tok.convert_ids_to_tokens(ids) and tok.convert_ids_to_tokens(n) == tok.convert_ids_to_tokens(0)
    assert tok.decode(torch.tensor(ids)) == text and tok.batch_decode([ids]) == [text]
    assert pickle.loads(pickle.dumps(tok)).decode(ids) == text  # the Ray coordinator ships it


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen3"])
def test_tiny_random_engine_runs_a_session(name):
    engine = hw.HogwildEngine.from_pretrained(f"random:{name}")
    assert engine.label == f"random:{name}" and engine.eos_ids == frozenset()
    session = engine.start("What is 2 + 2?", workers=2, protocol=False, max_tokens=8,
                           sampling=hw.SamplingParams(temperature=1.0, seed=0))
    while not session.done:
        session.step()
    result = session.result()
    assert result.stats.tokens_per_worker == [8, 8] and result.stats.stop_reason == "budget"
    assert all(isinstance(t, str) for t in result.worker_texts)


def test_big_vocab_samples_decode_in_a_session():
    """A shape whose vocab exceeds the tokenizer's samples ids past it; the session's text survives."""
    from hogwild_ray.model.shapes import SHAPES as shapes

    shapes["tiny-bigvocab"] = dict(shapes["tiny"], vocab_size=151936)
    try:
        engine = hw.HogwildEngine.from_pretrained("random:tiny-bigvocab")
        result = engine.solve("Hi", workers=2, max_tokens=24, protocol=False,
                              sampling=hw.SamplingParams(temperature=1.0, seed=1))
    finally:
        del shapes["tiny-bigvocab"]
    assert len(result.worker_texts) == 2 and all(result.worker_texts)
