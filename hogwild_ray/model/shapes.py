"""Named model shapes for random weights (`random:NAME`): real configs, no download.

Speed does not depend on weight values, so a benchmark needs only a model's shape. Each
entry holds the fields of the published config.json that decide the shape and the
cost (sizes, vocab, rope, context); `build_config` makes the transformers config.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import torch

PREFIX = "random:"

_QWEN3 = dict(model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None, head_dim=128,
              vocab_size=151936, max_position_embeddings=40960, use_sliding_window=False, sliding_window=None,
              attention_bias=False)
_LLAMA31 = dict(model_type="llama", rms_norm_eps=1e-5, rope_theta=500000.0, vocab_size=128256, head_dim=128,
                max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_position_embeddings=8192))
# The tiny shapes use the built-in tokenizer's vocab (SmolLM2's), so every id decodes as itself.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=49152, max_position_embeddings=8192,
             rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None)

SHAPES: dict[str, dict] = {
    # Qwen/Qwen3-0.6B
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    # Qwen/Qwen3-8B
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    # meta-llama/Llama-3.1-8B: Llama-3-8B's shape with the 128k context, so 32k views fit
    "llama3-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    # meta-llama/Llama-3.1-70B (141 GB in bf16: more than one GPU holds)
    "llama3-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    # Qwen/Qwen2.5-32B (QKV bias, as every Qwen2)
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, intermediate_size=27648, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, head_dim=128, vocab_size=152064,
                        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1000000.0, rope_scaling=None,
                        sliding_window=131072, use_sliding_window=False, max_window_layers=64,
                        tie_word_embeddings=False),
    # CPU benchmarks: big enough that the model's compute is not all overhead
    "small": dict(_TINY, model_type="llama", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=False),
    # Tests and CPU runs: 2 layers, hidden 64
    "tiny": dict(_TINY, model_type="llama", tie_word_embeddings=False),
    "tiny-qwen3": dict(_TINY, model_type="qwen3", tie_word_embeddings=True),
}


def shape_name(path: object) -> str | None:
    """NAME for a `random:NAME` model path, else None."""
    s = str(path)
    return s[len(PREFIX):] if s.startswith(PREFIX) else None


def build_config(name: str):
    """The transformers config of a named shape (KeyError for an unknown name)."""
    from transformers import AutoConfig

    fields = dict(SHAPES[name])
    # A random model has no end-of-text token: it runs to its budget (benchmarks keep every worker).
    return AutoConfig.for_model(fields.pop("model_type"), bos_token_id=None, eos_token_id=None,
                                pad_token_id=None, **fields)


def parameter_count(name: str) -> int:
    """Parameters of a named shape (embedding and head counted once each when untied)."""
    s = SHAPES[name]
    h, d, i, v = s["hidden_size"], s["head_dim"], s["intermediate_size"], s["vocab_size"]
    q, kv = s["num_attention_heads"] * d, s["num_key_value_heads"] * d
    layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
    if s["model_type"] == "qwen2":
        layer += q + 2 * kv
    if s["model_type"] == "qwen3":
        layer += 2 * d
    return s["num_hidden_layers"] * layer + v * h * (1 if s["tie_word_embeddings"] else 2) + h


def random_reader(config, seed: int = 0) -> Callable[[str], torch.Tensor | None]:
    """HF tensor names -> random tensors of the config's shapes (None for names the model lacks).

    Normal(0, 0.02) matrices, ones for norms, zeros for biases; each tensor seeded by its name,
    so every tensor-parallel rank draws the same one. Drawn in bf16 on the GPU when there is
    one (an 8B model in about a second, never a float32 copy on the CPU), else on the CPU."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or _count(config) > 2**28 else torch.float32
    shapes = tensor_shapes(config)

    def read(name: str) -> torch.Tensor | None:
        shape = shapes.get(name)
        if shape is None:
            return None
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype, device=device)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype, device=device)
        g = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, 0.02, generator=g)

    return read


def _count(config) -> int:
    return sum(math.prod(s) for s in tensor_shapes(config).values())


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama/Mistral/Qwen2/Qwen3 checkpoint, by its HF name."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * d, (config.num_key_value_heads or config.num_attention_heads) * d
    bias = config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
    o_bias = bias and config.model_type in ("llama", "qwen3")  # Qwen2 biases q/k/v only
    mlp_bias = bool(getattr(config, "mlp_bias", False))  # Llama's option (spec_from_config refuses it)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for n in range(config.num_hidden_layers):
        p, a = f"model.layers.{n}.", f"model.layers.{n}.self_attn."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
                a + "o_proj.weight": (h, q), p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i)}
        if bias:
            out |= {a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,), a + "v_proj.bias": (kv,)}
        if o_bias:
            out[a + "o_proj.bias"] = (h,)
        if mlp_bias:
            out |= {p + "mlp.gate_proj.bias": (i,), p + "mlp.up_proj.bias": (i,), p + "mlp.down_proj.bias": (h,)}
        if config.model_type == "qwen3":
            out |= {a + "q_norm.weight": (d,), a + "k_norm.weight": (d,)}
    return out


class FoldedTokenizer:
    """The built-in model's tokenizer for random shapes, whose vocab is larger than its own.

    Random weights sample ids up to the shape's vocab; the plain tokenizer silently drops the
    ids past its end (and maps them to None tokens), so decode folds them into its range
    (id % len): text stays the same length as the ids and never fails. No end-of-text token:
    a random model runs to its budget."""

    eos_token_id = None

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def fold(self, ids) -> list[int]:
        n = len(self.tokenizer)
        return [int(i) % n for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(self.fold(ids), **kwargs)

    def batch_decode(self, seqs, **kwargs) -> list[str]:
        return [self.decode(s, **kwargs) for s in seqs]

    def convert_ids_to_tokens(self, ids, **kwargs):
        if isinstance(ids, int):
            return self.tokenizer.convert_ids_to_tokens(ids % len(self.tokenizer), **kwargs)
        return self.tokenizer.convert_ids_to_tokens(self.fold(ids), **kwargs)

    def __getattr__(self, name: str):
        inner = self.__dict__.get("tokenizer")  # absent while unpickling
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)
