"""Sampling parameters and the on-device sampler (one host sync per step: the ids)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from hogwild_kernels.gumbel import gumbel_scores

from .core.sampling_params import SamplingParams
from .transfer import to_device


TABLE_ROWS = 6  # seed low, seed high, draw number, top_k, temperature, top_p
_GREEDY_ROW = (0.0,) * TABLE_ROWS  # a greedy row: its sample is the argmax


@dataclass(frozen=True)
class SampleTable:
    """One pass's sampling inputs, one column per row of logits (float64: every field exact).

    A few numbers per row go to the device in one copy; `sample_tokens` (eager, or captured
    in a decode pass's CUDA graph, keyed by `mode`) turns them and the logits into ids."""

    values: np.ndarray  # [TABLE_ROWS, rows]
    mode: str  # "greedy" (argmax only), "sample" (Gumbel draws) or "filter" (draws after top-k / top-p)

    def after_rows(self, n: int) -> SampleTable:
        """This table behind n greedy rows whose samples nobody reads (a pass's prompt chunks)."""
        if n == 0:
            return self
        return SampleTable(np.concatenate([np.zeros((TABLE_ROWS, n)), self.values], axis=1), self.mode)


class Sampler:
    """Each worker's sampling params, seed and count of draws; the draws themselves are
    counter-based (hogwild_kernels.gumbel), so this host state is all there is to an RNG."""

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.params, self.device = params, device
        fresh = random.SystemRandom()  # unseeded workers: their own seeds; torch's global RNG untouched
        self.seeds = [p.seed if p.seed is not None else fresh.randrange(2**63) for p in params]
        self.draws = [0] * len(params)

    def copy(self) -> Sampler:
        """The same seeds and draw counts (a fork goes on drawing what this one would)."""
        twin = Sampler(self.params, self.device)
        twin.seeds, twin.draws = list(self.seeds), list(self.draws)
        return twin

    def table(self, workers: list[int], greedy: bool = False, count: bool = True) -> SampleTable:
        """The table for one row per given worker (in order); counts a draw for each sampling one
        (count=False: not yet, see `count`). greedy: every row takes the argmax (the finisher)."""
        flat: list[float] = []  # row by row, then one array (a pass builds one table per session)
        sampled = filtered = False
        for w in workers:
            p = self.params[w]
            if greedy or p.greedy:
                flat += _GREEDY_ROW
                continue
            seed = self.seeds[w]
            flat += (seed & 0xFFFFFFFF, seed >> 32, self.draws[w], p.top_k, p.temperature, p.top_p)
            self.draws[w] += count
            sampled, filtered = True, filtered or p.top_k > 0 or p.top_p < 1.0
        values = np.array(flat, dtype=np.float64).reshape(len(workers), TABLE_ROWS).T.copy()
        return SampleTable(values, "filter" if filtered else "sample" if sampled else "greedy")

    def count(self, workers: list[int], by: int = 1) -> None:
        """Count the draws of a table made with count=False (by=-1: take back those a table
        counted, its pass dropped unused)."""
        for w in workers:
            if not self.params[w].greedy:
                self.draws[w] += by

    def sample(self, logits: torch.Tensor, workers: list[int], greedy: bool = False) -> torch.Tensor:
        """Token ids [len(workers)] for rows of logits [len(workers), vocab] (stays on the device)."""
        return sample_eagerly(logits, self.table(workers, greedy))


def sample_eagerly(logits: torch.Tensor, table: SampleTable) -> torch.Tensor:
    """sample_tokens with the table copied to the logits' device (a pass outside any graph)."""
    values = None if table.mode == "greedy" else to_device(table.values, logits.device, torch.float64)
    return sample_tokens(logits, values, table.mode)


def sample_tokens(logits: torch.Tensor, table: torch.Tensor | None, mode: str) -> torch.Tensor:
    """One id per row: temperature, then top-k, then top-p (nucleus), then the Gumbel-max trick
    (argmax of logits plus Gumbel noise is a draw from their softmax); rows at temperature 0
    (greedy) take the argmax. Only device work: a CUDA graph can capture it."""
    if mode == "greedy":
        return logits.argmax(-1)
    seed_lo, seed_hi, draws, top_k, temperature, top_p = table
    temperature = temperature.to(torch.float32)
    x = logits.to(torch.float32) / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if mode == "filter":
        x = _cut(x, top_k.to(torch.int64), top_p.to(torch.float32))
    seeds = (seed_hi.to(torch.int64) << 32) | seed_lo.to(torch.int64)
    return gumbel_scores(x, temperature, seeds, draws.to(torch.int64)).argmax(-1)


def _cut(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """-inf outside each row's top_k (0: no cut) and outside the smallest prefix reaching top_p."""
    vocab = x.shape[-1]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    rank = torch.arange(vocab, device=x.device)
    keep = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    sorted_x = sorted_x.masked_fill(rank >= keep[:, None], float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    beyond = (probs.cumsum(-1) - probs > top_p[:, None]) & (top_p < 1.0)[:, None]
    sorted_x = sorted_x.masked_fill(beyond, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)


def sample_one(logits: torch.Tensor, p: SamplingParams, draw: int = 0) -> torch.Tensor:
    """Draw number `draw` of p's seed (0 when unset) from a vector of logits (see sample_tokens)."""
    sampler = Sampler([p], logits.device)
    sampler.seeds[0], sampler.draws[0] = p.seed or 0, draw
    return sampler.sample(logits[None], [0])[0]
