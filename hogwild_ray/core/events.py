"""What `engine.stream()` yields: plain dataclasses that travel as JSON.

Events are derived from what a session shows (each worker's stream, the stats, the answer),
so the local and the Ray engine stream the same events. `event.to_json()` gives a dict for
`json.dumps`, with a `kind` field; `from_json` turns such a dict (or its text) back into the
event. Order within one `session.step()`: WorkerText, RedundancyCheck, StepFinished (per
worker, in worker order), then Answer (once, when the answer is first found), then Progress.
At the end, a WorkerText for any text completed only by the last tokens, then Done, once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Union

from ..errors import InvalidRequestError
from .results import SolveResult, Stats


class _Event:
    kind: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}  # type: ignore[call-overload]


@dataclass
class WorkerText(_Event):
    """New text of one worker; a worker's WorkerTexts concatenated are its whole text.

    step: the session step (forward pass, 1-based) that produced it."""

    kind: ClassVar[str] = "worker_text"
    worker: int
    step: int
    text: str


@dataclass
class StepFinished(_Event):
    """A worker ended a step (at a paragraph break, or at a step header the worker wrote itself,
    which stays at the step's end); it joins the shared history.

    step_index: the number in the step's header (`**Bob [3]:**` -> 3), which is also the worker's
    count of finished steps (1-based); text: the step, header included."""

    kind: ClassVar[str] = "step_finished"
    worker: int
    step_index: int
    text: str
    step: int


@dataclass
class RedundancyCheck(_Event):
    """The forced question "is another worker already doing this?" was put to a worker."""

    kind: ClassVar[str] = "redundancy_check"
    worker: int
    step: int
    question: str


@dataclass
class Answer(_Event):
    """The session's final answer was found (in a step's \\boxed{}, or by the finisher)."""

    kind: ClassVar[str] = "answer"
    text: str
    step: int


@dataclass
class Progress(_Event):
    """Counters after each session step: what progress displays show."""

    kind: ClassVar[str] = "progress"
    step: int
    generated_per_worker: list[int]
    steps_per_worker: list[int]
    statuses: list[str]
    seconds: float
    redundancy_checks: int = 0

    @property
    def tokens_per_second(self) -> float:
        return sum(self.generated_per_worker) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Done(_Event):
    """The session ended: everything `engine.solve()` returns."""

    kind: ClassVar[str] = "done"
    answer: str | None
    worker_texts: list[str]
    transcript: str
    stats: Stats = field(default_factory=Stats)

    @classmethod
    def of(cls, result: SolveResult) -> Done:
        return cls(result.answer, list(result.worker_texts), result.transcript, result.stats)

    def result(self) -> SolveResult:
        return SolveResult(self.answer, self.worker_texts, self.transcript, self.stats)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "answer": self.answer, "worker_texts": self.worker_texts,
                "transcript": self.transcript, "stats": self.stats.to_dict()}


@dataclass
class Error(_Event):
    """A problem of a batch that could not run (too long for the context, or more than the
    cache could ever hold); the others go on. error: the exception's class name."""

    kind: ClassVar[str] = "error"
    error: str
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Error:
        return cls(type(exc).__name__, str(exc))


Event = Union[WorkerText, StepFinished, RedundancyCheck, Answer, Progress, Done, Error]
KINDS: dict[str, type] = {c.kind: c for c in (WorkerText, StepFinished, RedundancyCheck, Answer, Progress, Done,
                                             Error)}


def from_json(data: dict[str, Any] | str) -> Event:
    """The event a `to_json()` dict (or its JSON text) describes."""
    if isinstance(data, str):
        data = json.loads(data)
    if not isinstance(data, dict) or data.get("kind") not in KINDS:
        kind = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise InvalidRequestError(f"not an event: kind {kind!r}; kinds are {', '.join(KINDS)}")
    cls = KINDS[data["kind"]]
    kw = {f.name: data[f.name] for f in fields(cls) if f.name in data}
    if cls is Done:
        names = {f.name for f in fields(Stats)}
        kw["stats"] = Stats(**{k: v for k, v in data.get("stats", {}).items() if k in names})
    return cls(**kw)
