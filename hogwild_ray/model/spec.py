"""What the engine needs to know of a model, read from its Hugging Face config.

Only decoder-only RoPE transformers whose rotation angle is linear in position can
share a cache through RoPE shifts; everything else is refused here, by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedModelError

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    qk_norm: bool
    tie_embeddings: bool
    inv_freq: torch.Tensor  # [head_dim // 2], fp32
    rope_scale: float  # attention factor multiplying cos/sin (YaRN), else 1
    max_positions: int
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def sm_scale(self) -> float:
        return self.head_dim**-0.5

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(dtype).bits // 8

    def check_context(self, context: int) -> None:
        """Refuse a sliding window shorter than the context we would serve."""
        if self.sliding_window is not None and self.sliding_window < context:
            raise UnsupportedModelError(
                f"this {self.family} model uses sliding-window attention ({self.sliding_window} tokens), "
                f"shorter than the context of {context} tokens; hogwild-ray attends to the whole view. "
                f"Pass max_context={self.sliding_window} (or less) to from_pretrained."
            )


def rope_parameters(cfg) -> dict:
    """rope settings from a transformers 5 (`rope_parameters`) or 4 (`rope_scaling`) config."""
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return dict(rp)
    rp = dict(getattr(cfg, "rope_scaling", None) or {})
    rp.setdefault("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return rp


def rope_frequencies(cfg, head_dim: int) -> tuple[torch.Tensor, float]:
    rp = rope_parameters(cfg)
    rope_type = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rope_type == "dynamic":
        raise UnsupportedModelError(
            "rope scaling 'dynamic' (dynamic NTK) changes every rotation as the sequence grows, "
            "so keys stored once cannot be shared; use a model with none/linear/llama3/yarn scaling"
        )
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope scaling {rope_type!r} is not supported (its angle is not linear in position); "
            f"supported: {', '.join(ROPE_TYPES)}"
        )
    if float(rp.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise UnsupportedModelError("partial rotary embeddings are not supported (partial_rotary_factor != 1)")
    if rope_type == "default":
        exps = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
        return 1.0 / (float(rp["rope_theta"]) ** exps), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, factor = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    return inv_freq.to(torch.float32), float(factor)


def _sliding_window(cfg, family: str) -> int | None:
    window = getattr(cfg, "sliding_window", None)
    if not window:
        return None
    if family in ("qwen2", "qwen3"):
        if not getattr(cfg, "use_sliding_window", False):
            return None
    return int(window)


def spec_from_config(cfg) -> ModelSpec:
    """Validate a transformers config and turn it into a ModelSpec."""
    family = getattr(cfg, "model_type", None)
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"model type {family!r} is not supported; hogwild-ray serves decoder-only RoPE "
            f"transformers of the families {', '.join(FAMILIES)}"
        )
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedModelError(f"activation {act!r} is not supported (only SiLU-gated MLPs)")
    if getattr(cfg, "mlp_bias", False):
        raise UnsupportedModelError("MLP biases (mlp_bias=true in config.json) are not supported; "
                                    "hogwild-ray serves bias-free SiLU-gated MLPs")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if cfg.num_attention_heads % kv_heads:
        raise UnsupportedModelError(
            f"{cfg.num_attention_heads} query heads are not a multiple of {kv_heads} KV heads"
        )
    inv_freq, rope_scale = rope_frequencies(cfg, head_dim)
    eos = getattr(cfg, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return ModelSpec(
        family=family,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        rms_eps=float(cfg.rms_norm_eps),
        qk_norm=family == "qwen3",
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        inv_freq=inv_freq,
        rope_scale=rope_scale,
        max_positions=int(getattr(cfg, "max_position_embeddings", 4096)),
        sliding_window=_sliding_window(cfg, family),
        eos_token_ids=eos_ids,
    )
