"""One forward pass of a Llama-family decoder over every worker's fed tokens at once.

All workers' tokens are packed into one batch for the dense layers; attention runs per
worker over its view of the shared paged cache (the kernels package does the work).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from hogwild_kernels import PassMeta, QueryGroup, TorchAttention

from ..cache import KVPool
from .parallel import TensorParallel
from .spec import ModelSpec
from .weights import DecoderWeights, LayerWeights


@dataclass
class ForwardBatch:
    """Device tensors of one forward pass (built from the layout's WriteSteps)."""

    tokens: torch.Tensor  # [T] token ids, workers packed one after another
    key_positions: torch.Tensor  # [T] block-local positions of the new keys
    slots: torch.Tensor  # [T] pool slots that receive their K/V
    groups: list[QueryGroup]  # one per worker (or shared block) fed in this pass
    last_rows: torch.Tensor  # [G] row of each group's last token: where logits are taken


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Decoder:
    """Stateless apart from its weights: the cache is passed in.

    With a TensorParallel of world > 1, spec holds this rank's head and MLP sizes, the
    weights are its slices, and vocab_size is the full vocab the logits are gathered to."""

    def __init__(self, spec: ModelSpec, weights: DecoderWeights, attention=None,
                 parallel: TensorParallel | None = None) -> None:
        self.spec, self.w = spec, weights
        self.tp = parallel if parallel is not None and parallel.world > 1 else None
        self.inv_freq = spec.inv_freq.to(weights.embed.device)
        self.attention = attention or TorchAttention(self.inv_freq, spec.rope_scale, spec.sm_scale)

    def _attention_block(self, lw: LayerWeights, x: torch.Tensor, meta: PassMeta, cache: KVPool,
                         layer: int) -> torch.Tensor:
        s = self.spec
        h = rms_norm(x, lw.ln_attn, s.rms_eps)
        qkv = F.linear(h, lw.w_qkv, lw.b_qkv)
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)
        k = k.view(-1, s.num_kv_heads, s.head_dim)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if lw.q_norm is not None:
            q = rms_norm(q, lw.q_norm, s.rms_eps)
            k = rms_norm(k, lw.k_norm, s.rms_eps)
        self.attention.append(cache.k[layer], cache.v[layer], k, v, meta)
        o = self.attention.attend(q, cache.k[layer], cache.v[layer], meta)
        if self.tp is None:
            return F.linear(o.reshape(x.shape[0], -1), lw.w_o, lw.b_o)
        out = self.tp.all_reduce(F.linear(o.reshape(x.shape[0], -1), lw.w_o))
        return out if lw.b_o is None else out + lw.b_o  # the bias once, after the sum

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.w.embed[tokens]
        rows = self.w.embed.shape[0]  # vocab-parallel: other ranks' rows give zeros here
        local = tokens - self.tp.rank * rows
        inside = (local >= 0) & (local < rows)
        x = self.w.embed[local.clamp(0, rows - 1)] * inside[:, None].to(self.w.embed.dtype)
        return self.tp.all_reduce(x)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.w.lm_head)
        if self.tp is None:
            return logits.to(torch.float32)
        return self.tp.all_gather_last_dim(logits)[:, :self.spec.vocab_size].to(torch.float32)

    def _mlp_block(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, lw.ln_mlp, self.spec.rms_eps)
        gate, up = F.linear(h, lw.w_gate_up).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, lw.w_down)
        return out if self.tp is None else self.tp.all_reduce(out)

    @torch.inference_mode()
    def forward(self, b: ForwardBatch, cache: KVPool) -> torch.Tensor:
        """Logits [G, vocab] (fp32) at each group's last token; K/V of all tokens stored."""
        x = self._embed(b.tokens)
        meta = self.attention.prepare(b.groups, b.slots, b.key_positions)
        for i, lw in enumerate(self.w.layers):
            x = x + self._attention_block(lw, x, meta, cache, i)
            x = x + self._mlp_block(lw, x)
        x = rms_norm(x[b.last_rows], self.w.norm, self.spec.rms_eps)
        return self._lm_head(x)
