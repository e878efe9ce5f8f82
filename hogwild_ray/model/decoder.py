"""One forward pass of a Llama-family decoder over every worker's fed tokens at once.

All workers' tokens are packed into one batch for the dense layers; attention runs per
worker over its view of the shared paged cache (the kernels package does the work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    plan: Any = None  # a prebuilt attention plan (a CUDA graph's static buffers); None: built per pass


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


# small kernels a decode pass folds into their neighbours (Decoder.folds): "norm", the residual
# norms into the loads of the products after them (passes of up to four rows); "activation", the
# MLP's SiLU(gate) * up into the gate/up product's epilogue (on the skinny kernel); "qk_norm",
# Qwen3's q/k norms into the K/V append's launch; "mlp", the MLP block's gate/up, SiLU and down in
# one launch, a barrier across the grid between the products (hogwild_kernels.mlp; passes of up to 16
# rows on a GPU)
FOLDS = ("norm", "activation", "qk_norm", "mlp")
# a decode pass's matrix products, by name (Decoder.prefetch)
PRODUCTS = ("qkv", "o", "gate_up", "down", "lm_head")


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
        # with the Triton attention, the norms and the MLP activation run as fused Triton kernels too
        self.fused = getattr(self.attention, "name", "") == "triton"
        # and the products of a decode pass's few half-precision rows run, weight shape by weight
        # shape, on whichever of cuBLAS and the skinny kernel was faster on this GPU at start
        # (cuBLAS splits some of them over K and adds a reduction kernel)
        self.products: dict = {}
        # small kernels folded into their neighbours (FOLDS): none by default
        self.folds: set[str] = set()
        if self.fused and weights.embed.is_cuda and weights.embed.dtype in (torch.bfloat16, torch.float16):
            from hogwild_kernels.skinny import choose

            self.products = choose(self._weights_by_shape())
        # tensor-parallel shards launch as before: their all-reduces run on NCCL's own stream, and
        # the chain was not checked across them
        self.chained = False
        # bytes of each weight row a chained product asks the L2 cache for before its wait, by
        # product (PRODUCTS; missing: the kernel's default)
        self.prefetch: dict[str, int] = {}
        # bytes of each row of the next product's weight a chained product asks the L2 cache for
        # as it ends (0: none), so that the memory keeps reading across the boundary
        self.next_bytes = 0
        if self.fused and weights.embed.is_cuda and self.tp is None:
            from hogwild_kernels import pdl

            self.set_chained(pdl.supported(weights.embed.device))

    def set_chained(self, on: bool) -> None:
        """Launch the layers' Triton kernels as programmatic dependents, one of the other
        (hogwild_kernels/pdl.py; Hopper and later), the decode products all on the skinny
        kernel so that they join the chain. Before any CUDA graph is captured."""
        self.chained = self.attention.chained = on

    def _weights_by_shape(self) -> dict[tuple[int, int], list[torch.Tensor]]:
        """Each decode product's weight shape, with a few layers' weights of it."""
        from hogwild_kernels.skinny import by_shape

        return by_shape(((lw.w_qkv, lw.w_o, lw.w_gate_up, lw.w_down) for lw in self.w.layers), (self.w.lm_head,))

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                glu: bool = False, name: str = "", following: torch.Tensor | None = None) -> torch.Tensor:
        """F.linear(x, weight, bias); glu: the weight is [gate; up] and the result SiLU(gate) * up
        of the product: fused.silu_mul after it, or, folded ("activation" in folds), in the skinny
        kernel's epilogue. name: the product's, for its prefetch (self.prefetch); following: the
        next product's weight (self.next_bytes)."""
        if self.products:
            from hogwild_kernels.skinny import MAX_ROWS, bucket, skinny_linear, supported

            if supported(x, weight):
                config = self.products.get((*weight.shape, bucket(x.shape[0])))
                # chained, a few rows join the chain; a wide row tile only where it beat cuBLAS
                if config is not None or (self.chained and x.shape[0] <= MAX_ROWS):
                    fold = glu and "activation" in self.folds  # then the epilogue's own launch shape
                    out = skinny_linear(x, weight, bias, config=None if fold else config, chained=self.chained,
                                        glu=fold, prefetch=self.prefetch.get(name, 0), next_weight=following,
                                        next_bytes=self.next_bytes)
                    return self._activation(out) if glu and not fold else out
        out = F.linear(x, weight, bias)
        return self._activation(out) if glu else out

    def _activation(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of rows [gate | up]."""
        if self.fused:
            from hogwild_kernels.fused import silu_mul

            return silu_mul(gate_up, chained=self.chained)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, RMSNorm of it): the residual stream and the next block's input."""
        if self.fused:
            from hogwild_kernels.fused import add_rms_norm

            return add_rms_norm(x, delta, weight, self.spec.rms_eps, chained=self.chained)
        if delta is not None:
            x = x + delta
        return x, rms_norm(x, weight, self.spec.rms_eps)

    def _norm_linear(self, x: torch.Tensor, delta: torch.Tensor | None, norm_weight: torch.Tensor,
                     weight: torch.Tensor, bias: torch.Tensor | None = None, glu: bool = False, name: str = "",
                     following: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(the product of RMSNorm(x + delta), x + delta): a block's input projection and the
        residual stream; for a few rows on the skinny kernel in one launch (the norm folded into
        the product's loads: Decoder.folds). glu, name, following: as _linear's."""
        if self.products and "norm" in self.folds:
            from hogwild_kernels.skinny import bucket, normed_supported, skinny_norm_linear

            if normed_supported(x, weight) and (delta is None or delta.is_contiguous()):
                config = self.products.get((*weight.shape, bucket(x.shape[0])))
                if config is not None or self.chained:
                    fold = glu and "activation" in self.folds
                    out, x = skinny_norm_linear(x, delta, norm_weight, self.spec.rms_eps, weight, bias,
                                                None if fold else config, self.chained, glu=fold,
                                                prefetch=self.prefetch.get(name, 0), next_weight=following,
                                                next_bytes=self.next_bytes)
                    return (self._activation(out) if glu and not fold else out), x
        x, h = self._add_norm(x, delta, norm_weight)
        return self._linear(h, weight, bias, glu, name, following), x

    def _attention_block(self, lw: LayerWeights, x: torch.Tensor, delta: torch.Tensor | None, meta: PassMeta,
                         cache: KVPool, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the attention block's output, the residual stream with the last block's delta added)."""
        s = self.spec
        qkv, x = self._norm_linear(x, delta, lw.ln_attn, lw.w_qkv, lw.b_qkv, name="qkv", following=lw.w_o)
        q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, s.num_heads, s.head_dim)
        k = k.view(-1, s.num_kv_heads, s.head_dim)
        v = v.view(-1, s.num_kv_heads, s.head_dim)
        if lw.q_norm is not None and self.fused and "qk_norm" in self.folds:
            q = self.attention.append_normed(cache.k[layer], cache.v[layer], qkv, lw.q_norm, lw.k_norm, s.rms_eps,
                                             s.num_heads, meta)
        else:
            if lw.q_norm is not None and self.fused:
                from hogwild_kernels.fused import qk_rms_norm

                q, k = qk_rms_norm(qkv, lw.q_norm, lw.k_norm, s.num_heads, s.num_kv_heads, s.head_dim, s.rms_eps,
                                   chained=self.chained)
            elif lw.q_norm is not None:
                q = self._add_norm(q, None, lw.q_norm)[1]
                k = self._add_norm(k, None, lw.k_norm)[1]
            self.attention.append(cache.k[layer], cache.v[layer], k, v, meta)
        o = self.attention.attend(q, cache.k[layer], cache.v[layer], meta)
        if self.tp is None:
            return self._linear(o.reshape(x.shape[0], -1), lw.w_o, lw.b_o, name="o", following=lw.w_gate_up), x
        out = self.tp.all_reduce(self._linear(o.reshape(x.shape[0], -1), lw.w_o))
        return (out if lw.b_o is None else out + lw.b_o), x  # the bias once, after the sum

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.w.embed[tokens]
        rows = self.w.embed.shape[0]  # vocab-parallel: other ranks' rows give zeros here
        local = tokens - self.tp.rank * rows
        inside = (local >= 0) & (local < rows)
        x = self.w.embed[local.clamp(0, rows - 1)] * inside[:, None].to(self.w.embed.dtype)
        return self.tp.all_reduce(x)

    def _lm_head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._linear(x, self.w.lm_head, name="lm_head")
        if self.tp is None:
            return logits.to(torch.float32)
        return self.tp.all_gather_last_dim(logits)[:, :self.spec.vocab_size].to(torch.float32)

    def _mlp_block(self, lw: LayerWeights, x: torch.Tensor, delta: torch.Tensor, following: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP block's output, the residual stream with the attention's delta added);
        following: the weight of the product after the block's last (the next layer's QKV, or the
        LM head)."""
        if self._mlp_in_one_launch(x, lw):
            from hogwild_kernels.mlp import glu_down

            x, h = self._add_norm(x, delta, lw.ln_mlp)
            return glu_down(h, lw.w_gate_up, lw.w_down, chained=self.chained), x
        act, x = self._norm_linear(x, delta, lw.ln_mlp, lw.w_gate_up, glu=True, name="gate_up", following=lw.w_down)
        out = self._linear(act, lw.w_down, name="down", following=following)
        return (out if self.tp is None else self.tp.all_reduce(out)), x

    def _mlp_in_one_launch(self, x: torch.Tensor, lw: LayerWeights) -> bool:
        """Whether the MLP block runs as one launch ("mlp" in folds): a pass of few
        half-precision rows on one GPU (every program resident at once), whose shapes the
        kernel's tiles divide."""
        if "mlp" not in self.folds or not x.is_cuda or self.tp is not None:
            return False
        from hogwild_kernels.mlp import fits

        return fits(x, lw.w_gate_up, lw.w_down)

    @torch.inference_mode()
    def forward(self, b: ForwardBatch, cache: KVPool, layers: int | None = None) -> torch.Tensor:
        """Logits [G, vocab] (fp32) at each group's last token; K/V of all tokens stored.
        layers: only the first few (a warm-up that launches every kernel of the pass: the first
        layer's norm has no residual to add, every later layer's the same kernels as the second's);
        the logits are then not the model's."""
        x = self._embed(b.tokens)
        meta = self.attention.prepare(b.groups, b.slots, b.key_positions, plan=b.plan, page_size=cache.page_size)
        delta = None  # the last block's output, added to the residual stream by the next norm
        run = self.w.layers[:layers]
        for i, lw in enumerate(run):
            attention, x = self._attention_block(lw, x, delta, meta, cache, i)
            following = run[i + 1].w_qkv if i + 1 < len(run) else self.w.lm_head
            delta, x = self._mlp_block(lw, x, attention, following)
        return self._lm_head(self._add_norm(x[b.last_rows], delta[b.last_rows], self.w.norm)[1])
