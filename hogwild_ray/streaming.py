"""Turn a running session into events, step by step.

Reads only what both a local `Session` and the Ray engine's `RemoteSession` show (each
worker's stream tokens, the stats, the statuses, the answer), so both engines stream the
same events from one piece of code. Text is decoded incrementally: a token that ends
part way through a character is held back until the character is complete.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from .core.events import Answer, Done, Event, Progress, RedundancyCheck, StepFinished, WorkerText
from .core.protocol import REDUNDANCY_QUESTION
from .jobs import Job, NeedPass, run_alone


class TextTracker:
    """One worker's text, decoded as its tokens arrive; the current step's text so far."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0  # decode window: ids[prefix:read] is already emitted
        self.emitted = ""
        self.step_text = ""
        self.asked = False  # the redundancy question already appeared in this step

    def feed(self, ids: list[int]) -> str:
        """Take the stream's new tokens; the text they complete."""
        self.ids.extend(ids)
        if len(self.ids) == self.read:
            return ""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(before) or not text.startswith(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return self._emit(text[len(before):])

    def flush(self, final: str) -> str:
        """At the end: whatever of the final text was not emitted yet."""
        return self._emit(final[len(self.emitted):]) if final.startswith(self.emitted) else ""

    def _emit(self, delta: str) -> str:
        self.emitted += delta
        self.step_text += delta
        return delta


def session_events(session: Any, on_step: Callable[[Any, dict[int, list[int]]], None] | None = None
                   ) -> Iterator[Event]:
    """Step `session` to its end by itself, yielding its events; closes it however the loop ends."""
    return run_alone(event_job(session, on_step))


def event_job(session: Any, on_step: Callable[[Any, dict[int, list[int]]], None] | None = None) -> Job:
    """The job (hogwild_ray.jobs) that runs `session` to its end, yielding its events; the last
    is Done. It asks for one pass at a time; closes the session however it ends."""
    trackers = [TextTracker(session.tok) for _ in session.workers]
    seen = [len(ws.stream) for ws in session.workers]  # tokens before the first step (none today)
    finished = list(session.stats.steps_per_worker)
    answered = False
    try:
        while not session.done:
            new = yield NeedPass(session)
            if on_step is not None:
                on_step(session, new)
            st = session.stats
            n = st.forward_passes
            if n == 0:
                continue  # a pass that wrote prompt chunks: nothing to tell yet
            for w, (ws, tr) in enumerate(zip(session.workers, trackers)):
                delta = tr.feed(ws.stream[seen[w]:])
                seen[w] = len(ws.stream)
                if delta:
                    yield WorkerText(w, n, delta)
                if not tr.asked and REDUNDANCY_QUESTION in tr.step_text:
                    tr.asked = True
                    yield RedundancyCheck(w, n, REDUNDANCY_QUESTION)
                if st.steps_per_worker[w] > finished[w]:
                    finished[w] = st.steps_per_worker[w]
                    yield StepFinished(w, finished[w], tr.step_text, n)
                    tr.step_text, tr.asked = "", False
            if session.answer is not None and not answered:
                answered = True
                yield Answer(session.answer, n)
            yield Progress(n, list(st.generated_per_worker), list(st.steps_per_worker),
                           [ws.status for ws in session.workers], st.seconds, st.redundancy_checks)
    finally:
        session.close()
    result = session.result()
    for w, (tr, text) in enumerate(zip(trackers, result.worker_texts)):
        tail = tr.flush(text)
        if tail:
            yield WorkerText(w, result.stats.forward_passes, tail)
    yield Done.of(result)


def final_result(events: Iterator[Event]):
    """Consume a stream; the SolveResult its Done event carries."""
    done = None
    for event in events:
        if isinstance(event, Done):
            done = event
    if done is None:  # session_events always ends with Done unless it raised
        raise RuntimeError("the event stream ended without a Done event")
    return done.result()
