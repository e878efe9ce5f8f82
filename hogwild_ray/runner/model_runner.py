"""ModelRunner: one rank's model, K/V pool, CUDA graphs and on-device sampling.

It knows nothing of sessions, tokenizers or the protocol: a forward pass is a list of
WriteSteps (whose writes, at which positions, reading which segments of the pool) and a
sampling table, wherever the steps come from (one session or many). The in-process
executor and every Ray shard drive this same class; the page copies of forked layouts and
the relocations of finished steps are its other device work.
"""

from __future__ import annotations

import math
from itertools import accumulate

import torch
from hogwild_kernels import QueryGroup, make_attention

from ..cache import KVPool
from ..config import EngineConfig
from ..core.layout import Relocation, WriteStep
from ..model import Decoder, ForwardBatch, ModelSpec
from ..model.graphs import DecodeGraphs, Feed, Staged
from ..model.loader import Checkpoint, load_config, locate, weight_reader
from ..model.parallel import TensorParallel, shard_plan
from ..model.shapes import tensor_shapes
from ..model.spec import spec_from_config
from ..model.weights import load_weights
from ..sampling import SampleTable, sample_eagerly
from ..transfer import to_device
from .memory import check_pool_fits


class ModelRunner:
    """Runs forward passes of one rank's slice of the model over its slice of the K/V pool."""

    def __init__(self, spec: ModelSpec, decoder: Decoder, cache: KVPool, device: torch.device, max_context: int,
                 cuda_graphs: bool = False) -> None:
        self.spec, self.decoder, self.cache, self.device = spec, decoder, cache, device
        self.graphs = DecodeGraphs(decoder, cache, max_context) if cuda_graphs else None
        self.eager_passes = 0  # forward passes no graph replayed (all of them without graphs)

    @classmethod
    def load(cls, config: EngineConfig, cuda_graphs: bool, parallel: TensorParallel | None = None, *,
             ckpt: Checkpoint | None = None, model_config=None, spec: ModelSpec | None = None) -> ModelRunner:
        """This rank's weights (its slice when `parallel` spans several ranks) and a pool of
        `config.pages` (a sized config); ckpt, model_config, spec: the model's, when read already."""
        ckpt = ckpt if ckpt is not None else locate(config.model)
        model_config = model_config if model_config is not None else load_config(ckpt)
        spec = spec if spec is not None else spec_from_config(model_config)
        plan = shard_plan(spec, parallel.rank, parallel.world) if parallel and parallel.world > 1 else None
        local = plan.local_spec(spec) if plan else spec  # this rank's head and MLP sizes
        device, dtype = config.torch_device, config.torch_dtype
        weight_bytes = sum(math.prod(s) for s in tensor_shapes(model_config).values()) * dtype.itemsize
        check_pool_fits(config.pages, config.page_size, local.kv_bytes_per_token(dtype),
                        weight_bytes // (parallel.world if parallel else 1), device)
        weights = load_weights(spec, weight_reader(ckpt, model_config), device, dtype, tp=plan)
        cache = KVPool(spec.num_layers, config.pages, config.page_size, local.num_kv_heads, spec.head_dim, dtype,
                       device)
        backend = make_attention(config.attention, device, spec.inv_freq, spec.rope_scale, spec.sm_scale,
                                 local.num_kv_heads, spec.num_heads // spec.num_kv_heads)
        return cls(spec, Decoder(local, weights, backend, parallel), cache, device, config.max_context, cuda_graphs)

    # ---- page moves --------------------------------------------------------------------------
    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole pages (src, dst): a forked layout's copy on write."""
        self.cache.copy_pages(copies)

    def relocate(self, reloc: Relocation) -> None:
        """Move a finished step's K/V, its keys rotated once by the shift."""
        self.cache.relocate(reloc, self.decoder.inv_freq)

    # ---- the forward pass --------------------------------------------------------------------
    def forward(self, steps: list[WriteStep], table: SampleTable | None = None, staged: Staged | None = None,
                batch: tuple | None = None, feed: Feed | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward pass over the given writes: logits [len(steps), vocab] and, given a
        sampling table, one sampled id per step (on the device). A decode pass replays a CUDA
        graph, the sampling inside it, when the runner has them; staged: what `stage_decode`
        returned for exactly this pass; batch: `host_batch(steps)`, where the caller made it
        ahead (a pass launched ahead lays its inputs out while the previous pass runs); feed:
        writes the tokens it takes from the previous pass's samples on the device into its
        input tokens (the batch's are placeholders there)."""
        groups, tokens, key_pos, slots, last = batch if batch is not None else host_batch(steps)
        if self.graphs is not None and self.graphs.serves(groups):
            out = self.graphs.run(groups, tokens, key_pos, slots, last, table, staged, feed)
            if out is not None:
                return out
        self.eager_passes += 1
        inputs = self._device_batch(groups, tokens, key_pos, slots, last)
        if feed is not None:
            feed(inputs.tokens)
        logits = self.decoder.forward(inputs, self.cache)
        if self.device.type == "cpu":
            from .. import threads

            threads.tick()  # the thread governor, when on, re-decides about once a second
        return logits, None if table is None else sample_eagerly(logits, table)

    def stage_decode(self, views: list[tuple[int, list]], mode: str | None,
                     counts: list[int] | None = None) -> Staged | None:
        """Load the attention plan of a predicted pass (per view: its first token's position and
        segments, from CacheLayout.preview, and counts[i] tokens, one by default) while the
        current pass runs; None without graphs, or when no graph holds such a pass."""
        if self.graphs is None:
            return None
        counts = counts or [1] * len(views)
        return self.graphs.stage([QueryGroup(start, n, pos, segs) for start, n, (pos, segs)
                                  in zip(accumulate(counts, initial=0), counts, views)], mode)

    def _device_batch(self, groups: list[QueryGroup], tokens: list[int], key_pos: list[int], slots: list[int],
                      last: list[int]) -> ForwardBatch:
        """The pass's index tensors in one host-to-device copy (asynchronous on CUDA)."""
        t, g = len(tokens), len(last)
        tok, kpos, slot, rows = to_device(tokens + key_pos + slots + last, self.device).split([t, t, t, g])
        return ForwardBatch(tok, kpos, slot, groups, rows)


def host_batch(steps: list[WriteStep]) -> tuple[list[QueryGroup], list[int], list[int], list[int], list[int]]:
    """The kernels' query groups and the flat token, key-position, slot and last-row lists of a pass."""
    tokens, key_pos, slots, groups, last = [], [], [], [], []
    for s in steps:
        n = len(s.tokens)
        # the layout's segment views serve as the kernels' segments: one block, one key
        groups.append(QueryGroup(len(tokens), n, s.position, s.segments))
        tokens.extend(s.tokens)
        key_pos.extend(range(s.local_start, s.local_start + n))
        slots.extend(s.slots)
        last.append(len(tokens) - 1)
    return groups, tokens, key_pos, slots, last
