"""How each worker picks its next token: the parameters, checked, and one per worker. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import InvalidRequestError, check_int


# temperatures below this sample greedily: dividing float32 logits by 1e-40 makes them all inf, and the
# draw then takes token 0
GREEDY_BELOW = 1e-5
# an int32's range: a larger top_k keeps every token as the vocabulary's size does, and the sampling
# table (float64) could not hold it exactly
TOP_K_LIMIT = 2**31
TOP_K_HINT = "0 turns it off; one past the vocabulary's size keeps every token"


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
        check_int("top_k", self.top_k, 0, TOP_K_LIMIT, hi_text="2**31", hint=TOP_K_HINT)
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        check_int("seed", self.seed, 0, 2**63, none="", hi_text="2**63")

    @property
    def greedy(self) -> bool:
        """temperature 0, or one too small to divide logits by in float32 (vLLM's rule too)."""
        return self.temperature < GREEDY_BELOW


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


GREEDY = SamplingParams(temperature=0.0)


def per_worker(sampling: SamplingParams | list[SamplingParams] | None, workers: int) -> list[SamplingParams]:
    """One SamplingParams per worker; a single one is shared, its seed offset per worker."""
    if sampling is None:
        sampling = SamplingParams()
    if isinstance(sampling, SamplingParams):
        return [
            sampling if sampling.seed is None else SamplingParams(  # (wrapped: any valid seed serves every worker)
                sampling.temperature, sampling.top_k, sampling.top_p, (sampling.seed + w) % 2**63
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
