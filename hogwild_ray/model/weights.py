"""Decoder weights in the engine's fused form (QKV and gate/up), read from HF names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ModelNotFoundError
from .spec import ModelSpec


@dataclass
class LayerWeights:
    ln_attn: torch.Tensor
    w_qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, hidden]
    b_qkv: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    w_o: torch.Tensor
    b_o: torch.Tensor | None
    ln_mlp: torch.Tensor
    w_gate_up: torch.Tensor  # [2 * intermediate, hidden]
    w_down: torch.Tensor


@dataclass
class DecoderWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ModelNotFoundError("the checkpoint has biases for some but not all of q/k/v projections")
    return torch.cat(parts, dim=0)


def load_weights(
    spec: ModelSpec, read: Callable[[str], torch.Tensor | None], device: torch.device, dtype: torch.dtype
) -> DecoderWeights:
    """Read every tensor the decoder needs; a missing one is a clear error."""

    def need(name: str) -> torch.Tensor:
        t = read(name)
        if t is None:
            raise ModelNotFoundError(f"the checkpoint lacks tensor {name!r}; is it a complete {spec.family} model?")
        return t.to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        t = read(name)
        return None if t is None else t.to(device=device, dtype=dtype)

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        layers.append(
            LayerWeights(
                ln_attn=need(p + "input_layernorm.weight"),
                w_qkv=torch.cat([need(a + f"{x}_proj.weight") for x in "qkv"], dim=0),
                b_qkv=_cat([maybe(a + f"{x}_proj.bias") for x in "qkv"]),
                q_norm=need(a + "q_norm.weight") if spec.qk_norm else None,
                k_norm=need(a + "k_norm.weight") if spec.qk_norm else None,
                w_o=need(a + "o_proj.weight"),
                b_o=maybe(a + "o_proj.bias"),
                ln_mlp=need(p + "post_attention_layernorm.weight"),
                w_gate_up=torch.cat([need(p + "mlp.gate_proj.weight"), need(p + "mlp.up_proj.weight")], dim=0),
                w_down=need(p + "mlp.down_proj.weight"),
            )
        )
    embed = need("model.embed_tokens.weight")
    head = embed if spec.tie_embeddings else need("lm_head.weight")  # untied: never guess the head
    return DecoderWeights(embed=embed, layers=layers, norm=need("model.norm.weight"), lm_head=head)
