"""Sampling parameters and the on-device sampler (one host sync per step: the ids)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidRequestError


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
        """Token ids [len(workers)] for rows of logits [len(workers), vocab] (stays on device)."""
        out = logits.argmax(-1)  # every greedy row at once
        if greedy:
            return out
        for row, w in enumerate(workers):
            p = self.params[w]
            if not p.greedy:
                out[row] = sample_one(logits[row], p, self.generators[w])
        return out


def sample_one(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), then a draw."""
    x = logits.to(torch.float32) / p.temperature
    if p.top_k > 0 and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        drop = probs.cumsum(-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
        x = x.scatter(0, order, sorted_x.masked_fill(drop, float("-inf")))
    probs = torch.softmax(x, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[0]
