"""Random-weight models of every supported family, saved as real HF checkpoints.

Attention is made peaky (q/k projections with std 0.5, Qwen3's q/k norm weights near 3)
so that a position error shows in the logits; with the usual init attention is near
uniform and a block placed one position off moves the logits by less than 1e-3.
"""

from __future__ import annotations

from pathlib import Path

import torch

ROPES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
}

CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}


def make_config(family: str, rope: str = "default", vocab_size: int = 49152, **overrides):
    import transformers

    cls = getattr(transformers, CONFIG_CLASSES[family])
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=family in ("qwen2", "qwen3"), bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )
    if family == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    rp = dict(ROPES[rope] or {"rope_type": "default"})
    rp["rope_theta"] = kw.pop("rope_theta", 10000.0)
    cfg = cls(**kw)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = rp
    else:  # transformers 4
        cfg.rope_theta = rp.pop("rope_theta")
        cfg.rope_scaling = rp if rp["rope_type"] != "default" else None
    return cfg


def peaky_init(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(3.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def save_random_model(directory: Path, tokenizer_dir: Path, family: str, rope: str = "default",
                      seed: int = 0, **overrides):
    """Build, initialise and save a random model with the shared tokenizer; returns the HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = make_config(family, rope, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(torch.float32).eval()
    peaky_init(model, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return model


# Overrides for tensor-parallel tests: heads and MLP that split over 3 ranks; one KV head
# (each rank of a tp=2 group then holds a replica of it).
SPLITS_BY_3 = dict(hidden_size=96, intermediate_size=192, num_attention_heads=6, num_key_value_heads=3)
ONE_KV_HEAD = dict(num_key_value_heads=1)
