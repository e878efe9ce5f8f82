"""Sampling parameters and the on-device sampler (one host sync per step: the ids)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError
from .transfer import to_device


@dataclass(frozen=True)
class SamplingParams:
    """How one worker picks its next token. temperature=0 means greedy."""

    temperature: float = 0.6
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise InvalidRequestError(
                f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}"
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**63
        ):
            raise InvalidRequestError(f"seed must be an integer in [0, 2**63) or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


GREEDY = SamplingParams(temperature=0.0)


def per_worker(sampling: SamplingParams | list[SamplingParams] | None, workers: int) -> list[SamplingParams]:
    """One SamplingParams per worker; a single one is shared, its seed offset per worker."""
    if sampling is None:
        sampling = SamplingParams()
    if isinstance(sampling, SamplingParams):
        return [
            sampling if sampling.seed is None else SamplingParams(
                sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed + w
            )
            for w in range(workers)
        ]
    if not isinstance(sampling, (list, tuple)):
        raise InvalidRequestError(
            f"sampling must be one SamplingParams or a list of {workers} (one per worker), "
            f"got {type(sampling).__name__}"
        )
    sampling = list(sampling)
    if len(sampling) != workers or not all(isinstance(s, SamplingParams) for s in sampling):
        raise InvalidRequestError(
            f"sampling must be one SamplingParams or a list of {workers} (one per worker), got {len(sampling)} items"
        )
    return sampling


class Sampler:
    """Samples one token per worker on the logits' device, each worker with its own RNG."""

    def __init__(self, params: list[SamplingParams], device: torch.device) -> None:
        self.params = params
        self.generators: list[torch.Generator | None] = []
        for p in params:
            if p.greedy:
                self.generators.append(None)
                continue
            g = torch.Generator(device=device)
            if p.seed is not None:
                g.manual_seed(p.seed)
            else:
                g.seed()  # its own nondeterministic seed; the global RNG stays as the user set it
            self.generators.append(g)

    def sample(self, logits: torch.Tensor, workers: list[int], greedy: bool = False) -> torch.Tensor:
        """Token ids [len(workers)] for rows of logits [len(workers), vocab] (stays on device).

        Greedy rows take the argmax; the others are drawn together in one batch of
        operations (each from its own worker's generator), however many workers sample."""
        out = logits.argmax(-1)
        if greedy:
            return out
        rows = [r for r, w in enumerate(workers) if not self.params[w].greedy]
        if not rows:
            return out
        params = [self.params[workers[r]] for r in rows]
        gens = [self.generators[workers[r]] for r in rows]
        if len(rows) == len(workers):
            return sample_rows(logits, params, gens)
        index = to_device(rows, logits.device)
        return out.index_put_((index,), sample_rows(logits[index], params, gens))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """One draw per row: temperature, then top-k, then top-p (nucleus), then the Gumbel-max
    trick (argmax of logits plus Gumbel noise is a draw from their softmax)."""
    vocab = logits.shape[-1]
    x = logits.to(torch.float32) / to_device([p.temperature for p in params], logits.device, torch.float32)[:, None]
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p for p in params]
    if min(top_k) < vocab or min(top_p) < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        if min(top_k) < vocab:
            rank = torch.arange(vocab, device=x.device)
            sorted_x = sorted_x.masked_fill(rank >= to_device(top_k, x.device)[:, None], float("-inf"))
        if min(top_p) < 1.0:
            probs = torch.softmax(sorted_x, dim=-1)
            limit = to_device(top_p, x.device, torch.float32)[:, None]
            sorted_x = sorted_x.masked_fill(probs.cumsum(-1) - probs > limit, float("-inf"))  # smallest prefix reaching top_p
        x = torch.empty_like(x).scatter_(-1, order, sorted_x)
    u = torch.stack([torch.rand(vocab, device=x.device, generator=g) for g in generators])
    return (x - torch.log(-torch.log(u))).argmax(-1)


def sample_one(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One draw from a vector of logits (see sample_rows)."""
    return sample_rows(logits[None], [p], [generator])[0]
