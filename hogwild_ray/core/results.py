"""What a finished run returns: plain dataclasses."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Stats:
    forward_passes: int = 0
    tokens_per_worker: list[int] = field(default_factory=list)  # tokens in each worker's stream
    generated_per_worker: list[int] = field(default_factory=list)  # of those, sampled by the model
    steps_per_worker: list[int] = field(default_factory=list)  # finished steps
    redundancy_checks: int = 0
    seconds: float = 0.0
    stop_reason: str = ""

    @property
    def tokens_per_second(self) -> float:
        return sum(self.generated_per_worker) / self.seconds if self.seconds > 0 else 0.0

    @property
    def forward_passes_per_second(self) -> float:
        return self.forward_passes / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


@dataclass
class SolveResult:
    answer: str | None
    worker_texts: list[str]
    transcript: str
    stats: Stats
