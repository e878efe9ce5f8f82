"""A Hogwild! session: N workers, one shared cache, one forward pass per step.

Each `step()` feeds every active worker's pending tokens (the token it sampled last
step, or a forced chunk: a step header, an interjection, the finisher prompt) in one
forward pass, samples one token per worker on the device, and applies the protocol:
a worker whose fed text ends a step (a paragraph break, or a step header the worker wrote
itself, which stays at the end of the finished step: its keys are in the cache already) has
that step moved into the shared history at the start of the next `step()` (so after `step()`
returns, the cache still holds exactly what the last logits were computed from) and gets a
new header as its next chunk.

The finisher forces answers: the chosen workers get `FINISHER_PROMPT` after their pending
tokens and decode greedily (all in the same passes) until each closes its `\\boxed{`. It
runs by itself when a run ends without an answer (worker 0), and on demand in a fork
(`force_answers`, any workers, protocol on or off), which leaves the session unchanged.

`max_steps` caps the session's forward passes, the finisher's included: while the finisher
would still be needed, the workers stop `finisher_tokens` passes early (the finisher writes
one token per pass, the first in the pass that feeds its prompt), but they always get at
least one pass; a finisher that reaches `max_steps` stops there, with what it wrote.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .errors import CacheFullError, ContextLengthError, InvalidRequestError, check_int
from .prompt_text import check_prompt, check_unicode, encode_text, prompt_ids
from .core.detokenize import IncrementalText
from .model.fast_decode import ids_decoder
from .core.layout import CacheLayout, WriteStep
from .core.protocol import (
    FINISHER_PROMPT, HEADER_OTHERS, HEADER_OWN, ProtocolOptions, WorkerProtocol, extract_boxed, is_step_boundary,
)
from .core.results import SolveResult, Stats
from .core.sampling_params import SamplingParams, per_worker
from .core.scheduling import PREFILL_CHUNK, take_chunks
from .executor import Foresight, SessionPass
from .jobs import Job, NeedPass, result_of

if TYPE_CHECKING:
    from .engine import HogwildEngine


@dataclass
class WorkerState:
    proto: WorkerProtocol
    pending: list[int] = field(default_factory=list)  # tokens to feed in the next pass
    reported: int = 0  # how many of `pending` step() already returned (the sampled token)
    sampled: bool = False  # pending[0] is the worker's own last sample (the rest is forced text)
    step_ids: list[int] = field(default_factory=list)  # the current step's tokens, header first
    written: list[list[int]] = field(default_factory=list)  # the step's sampled tokens, in runs forced text splits
    step_text: IncrementalText = field(default_factory=IncrementalText)  # their text, decoded as they come
    header_text: str = ""
    stream: list[int] = field(default_factory=list)  # everything this worker wrote
    unfed: list[int] = field(default_factory=list)  # its last sample, in the stream but not yet in the cache
    generated: int = 0
    status: str = "active"  # active | eos | budget | idle


@dataclass(frozen=True)
class StepEnd:
    """A fed chunk ended its worker's step; the answer that step's own text gives, if any."""

    answer: str | None


def add_written(runs: list[list[int]], chunk: list[int], sampled: bool) -> None:
    """Record a fed chunk in a step's runs of sampled tokens: its first token when the worker
    sampled it (the rest of a chunk is forced text: a header, an injection, a prompt), and a
    break where forced text follows (each run decodes by itself)."""
    if sampled:
        if not runs:
            runs.append([])
        runs[-1].append(chunk[0])
    if len(chunk) > sampled and runs and runs[-1]:
        runs.append([])


class Session:
    """Use `HogwildEngine.start`; this holds the layout, the workers and the stopping rules.

    max_tokens: tokens each worker may generate. max_steps: the most forward passes the session
    runs in all, the finisher's included (see the module docstring); None: no limit."""

    def __init__(
        self, engine: HogwildEngine, problem: str, workers: int, sampling: SamplingParams | list | None,
        layout: str, max_tokens: int | None, max_steps: int | None, options: ProtocolOptions,
        write_prompt: bool = True,
    ) -> None:
        if not isinstance(problem, str) or not problem.strip():
            raise InvalidRequestError("problem must be a non-empty string")
        check_unicode("problem", problem)
        check_int("max_tokens", max_tokens, 1, none="")
        check_int("max_steps", max_steps, 1, none="")
        self.engine, self.options = engine, options
        self.max_tokens, self.max_steps = max_tokens, max_steps
        self.layout = CacheLayout(layout, workers, engine.allocator)
        self.params = per_worker(sampling, workers)
        self.executor = engine.executor.handle(self.layout, self.params)
        _watch(self)
        self.tok = engine.tokenizer
        self.decode_ids = ids_decoder(self.tok)  # tok.decode, cheaper per call (each worker's window, each pass)
        self.prompt_ids = prompt_ids(self.tok, problem, workers, options)
        if write_prompt:  # a scheduled session's pages were reserved when it was admitted
            self._check_fits()
        else:
            self._check_context()
        self.workers = [WorkerState(WorkerProtocol(w, options)) for w in range(workers)]
        self.answer: str | None = None
        self.done = False
        self.stats = Stats(tokens_per_worker=[0] * workers, generated_per_worker=[0] * workers,
                           steps_per_worker=[0] * workers)
        self._last_steps: dict[int, WriteStep] = {}
        self._finishing: list[int] = []
        self._finishers: dict[int, list[int]] = {}  # forced worker -> tokens written after the prompt
        self._forced: dict[int, str | None] = {}  # forced worker -> its answer, once it has one
        self.auto_close = True  # False: a finished run keeps its pages (fork it, then close() it)
        self._t0 = time.perf_counter()
        self._new: dict[int, list[int]] = {}  # the pass in flight: each worker's new tokens so far
        self._fed_outcome: dict[int, StepEnd | None] | Exception | None = None  # the pass in flight's, once taken
        self._unwritten = self._prompt_chunks()  # the shared blocks' tokens, in write order
        if write_prompt:  # else the passes write them (a scheduled session), a chunk at a time
            try:
                while self._unwritten:
                    block, ids = self._unwritten.pop(0)
                    self.executor.prefill(getattr(self.layout, block), ids)
            except BaseException:
                self.close()
                raise
            self._prompt_written()

    def _prompt_written(self) -> None:
        """The shared blocks are in the cache: every worker opens its first step."""
        for ws in self.workers:
            self._open_step(ws)
        if not self.options.enabled:
            # No header to feed: each worker feeds the prompt's last token itself (held back
            # from the prefill), so its first pass yields the first token. Not reported as new.
            for ws in self.workers:
                ws.pending, ws.reported = [self.prompt_ids[-1]], 1

    # ---- setup -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return encode_text(self.tok, text)

    def _check_context(self) -> None:
        check_prompt(len(self.prompt_ids), self.engine.max_context)

    def _check_fits(self) -> None:
        eng, n = self.engine, self.layout.workers
        self._check_context()
        if self.max_tokens is not None:
            per_worker_tokens = self.max_tokens + self.max_tokens // 4 + 64  # + headers and chunks
            need = len(self.prompt_ids) + 128 + n * per_worker_tokens
            have = eng.allocator.free_pages * eng.allocator.page_size
            if need > have:
                raise CacheFullError(
                    f"the K/V cache is too small for this request: about {need} tokens needed "
                    f"({n} workers x {self.max_tokens} max_tokens + prompt), {have} free; pass a larger "
                    "cache_tokens= to from_pretrained, or lower workers or max_tokens"
                )

    def _prompt_chunks(self) -> list[tuple[str, list[int]]]:
        """The prompt and the two constant headers, written once and shared by every worker:
        (block name, ids) in write order."""
        lay, out = self.layout, []
        texts = {id(lay.common): None, id(lay.hdr_others): HEADER_OTHERS, id(lay.hdr_own): HEADER_OWN}
        for block in lay.shared_prefix_blocks():
            text = texts[id(block)]
            if text is None:  # the prompt; without the protocol its last token is fed by the workers
                ids = self.prompt_ids if self.options.enabled else self.prompt_ids[:-1]
            else:
                ids = self.encode(text) if self.options.enabled else []
            if ids:
                out.append((block.name, list(ids)))
        return out

    def _open_step(self, ws: WorkerState) -> None:
        """Queue the forced prefix of the worker's next step (its header)."""
        prefix = ws.proto.next_step_prefix()
        ids = self.encode(prefix)
        ws.pending, ws.reported = ids, 0
        ws.step_ids, ws.written, ws.step_text, ws.header_text = [], [], IncrementalText(), prefix
        self.stats.redundancy_checks = sum(w.proto.checks for w in self.workers)

    # ---- views -------------------------------------------------------------------------
    @property
    def last_views(self) -> list[list[int]]:
        """Flat token ids each worker's last logits were computed from (own fed tokens included)."""
        return [self._last_steps[w].flat_view() if w in self._last_steps else []
                for w in range(self.layout.workers)]

    @property
    def last_logits(self) -> torch.Tensor:
        """[workers, vocab]: each worker's logits from the last pass it was fed in."""
        return self.executor.last_logits()

    @property
    def last_steps(self) -> dict[int, WriteStep]:
        """The layout's record of each worker's last pass: segments, offsets, slots."""
        return dict(self._last_steps)

    def text(self, w: int) -> str:
        return self.tok.decode(self.workers[w].stream)

    # ---- the step ----------------------------------------------------------------------
    def step(self, inject: dict[int, str] | None = None) -> dict[int, list[int]]:
        """One forward pass of all active workers (this session alone); each worker's new tokens.

        inject: {worker: text} fed to a worker after its pending tokens, as text (special-token
        strings in it stay text; only what the worker samples itself can give the answer). Text
        that would not fit the worker's view raises ContextLengthError and nothing is fed: the
        session goes on. A session the scheduler admitted may still have prompt chunks to write:
        such a pass writes the next chunk and returns no tokens."""
        return step_sessions([self], {self: inject} if inject else None)[self]

    @property
    def prefilling(self) -> bool:
        """Prompt chunks are still to be written (a scheduled session's first passes)."""
        return bool(self._unwritten)

    def begin_pass(self, inject: dict[int, str] | None = None, prefill_budget: int = PREFILL_CHUNK
                   ) -> SessionPass | None:
        """This session's part of the next pass: prompt chunks of at most prefill_budget tokens
        while the prompt is unwritten (an empty part when the budget is 0), else what every
        active worker feeds. None: nothing to feed, the run ends (see end_without_pass)."""
        inject = self.check_inject(inject)
        self._fed_outcome = None
        if self._unwritten:
            return SessionPass(self.executor.session, prefill=take_chunks(self._unwritten, prefill_budget))
        extras = {w: self.encode(text) for w, text in inject.items()}
        try:  # a failure part way (e.g. a full cache) ends the session and gives its pages back
            finishing, self._finishing = self._finishing, []
            self.executor.finish_steps(finishing)
        except BaseException:
            self.close()
            raise
        self._check_room(extras)  # with the views as this pass sees them; refused, the session goes on
        new: dict[int, list[int]] = {w: [] for w in range(len(self.workers))}
        fed: dict[int, list[int]] = {}
        for w, ws in enumerate(self.workers):
            extra = extras.get(w, [])
            if ws.status != "active" and not extra:
                continue
            if ws.status != "active":
                ws.status = "active"  # an interjection wakes a stopped worker
            chunk = ws.pending + extra
            if not chunk:
                continue
            new[w].extend(chunk[ws.reported:])
            fed[w] = chunk
        fed = self._enforce_context(fed, new)
        self._new = new
        if not fed:
            return None
        return SessionPass(self.executor.session, fed, greedy=bool(self._finishers))

    def check_inject(self, inject: dict[int, str] | None) -> dict[int, str]:
        """A valid `inject` for the next pass of this session (which must not be done)."""
        if self.done:
            raise InvalidRequestError("this session is done; start a new one")
        inject = inject or {}
        if not isinstance(inject, dict):
            raise InvalidRequestError(f"inject must be a dict {{worker: text}}, got {type(inject).__name__}")
        for w, text in inject.items():
            if not isinstance(w, int) or isinstance(w, bool) or not 0 <= w < len(self.workers):
                raise InvalidRequestError(f"inject names worker {w!r}; workers are 0..{len(self.workers) - 1}")
            if not isinstance(text, str):
                raise InvalidRequestError(f"inject[{w}] must be a string (text to feed), got {type(text).__name__}")
            check_unicode(f"inject[{w}]", text)
        if inject and self._unwritten:
            raise InvalidRequestError("this session is still writing its prompt; inject once it has begun")
        return inject

    def end_without_pass(self) -> dict[int, list[int]]:
        """After begin_pass returned None: the run's end."""
        return self._finish_run(self._new)

    def pass_launched(self, part: SessionPass) -> Foresight | None:
        """What this pass's fed tokens decide, done while the device runs it: they join each
        worker's stream and step, whose text (decoded here) may end the step (the worker then
        gets its next header, and the step moves now unless the session may end with this
        pass). Only what the sampled tokens decide waits for them (end_pass). An error here is
        kept and raised by end_pass (the other sessions of the pass go on). Returns the next
        pass as foreseen now (None where it cannot be: see `_foresee`)."""
        if self._fed_outcome is not None:
            return None
        try:
            outcome = self._fed_outcome = {} if part.prefill else {w: self._take_fed(w, chunk)
                                                                    for w, chunk in part.fed.items()}
            if part.prefill or self._finishers:
                return None
            if self._finishing:
                if self._may_end_with(outcome):
                    return None
                finishing, self._finishing = self._finishing, []
                self.executor.finish_steps(finishing)
            elif self._near_max_steps() or self._answer_stops(outcome):
                return None
            return self._foresee(part, outcome)
        except Exception as e:
            self._fed_outcome = e
            return None

    def _foresee(self, part: SessionPass, outcome: dict[int, StepEnd | None]) -> Foresight | None:
        """The next pass, unless a sample ends its worker's text: each fed worker whose step ended
        feeds its header, each other one its sample, but for one whose max_tokens this sample
        uses up or whose view would outgrow the context. (The session cannot end with this
        pass: `_may_end_with` said so.)"""
        samples, headers = [], {}
        limit, _ = self._view_limit()
        lengths = self.layout.view_lengths()  # a worker whose view would outgrow it stops (_enforce_context)
        for w in part.fed:
            ws = self.workers[w]
            if outcome[w] is not None:
                if lengths[w] + len(ws.pending) <= limit:
                    headers[w] = tuple(ws.pending)
            elif (self.max_tokens is None or ws.generated + 1 < self.max_tokens) and lengths[w] + 1 <= limit:
                samples.append(w)
        if not samples and not headers:
            return None
        return Foresight(tuple(samples), headers, self.engine.eos_ids)

    def _may_end_with(self, outcome: dict[int, StepEnd | None]) -> bool:
        """Whether the session may end with the pass whose fed tokens gave `outcome`, whatever it
        samples: a step that ended in it then stays where it is (the transcript shows it as the
        worker's live text, as it would without moving steps early). A worker whose step ended
        stays active, so only an answer or the pass budget can end the session here."""
        if self._near_max_steps() or self._answer_stops(outcome):
            return True
        if not (self.options.stop_on_answer and self.options.enabled):
            return False
        return any(end is None and extract_boxed(self._written(self.workers[w])) is not None  # an end of text answers
                   for w, end in outcome.items())

    def _near_max_steps(self) -> bool:
        """The pass after this one may be past the workers' share of max_steps."""
        return (self.max_steps is not None
                and self.stats.forward_passes + 1 >= self.max_steps - self.options.finisher_tokens)

    def _answer_stops(self, outcome: dict[int, StepEnd | None]) -> bool:
        """A step that ended in this pass gave an answer, and an answer ends the session."""
        return (self.options.stop_on_answer and self.options.enabled
                and any(end is not None and end.answer is not None for end in outcome.values()))

    def end_pass(self, part: SessionPass, out: tuple[list[WriteStep], list[int]] | Exception) -> dict[int, list[int]]:
        """Take this session's results of a pass (or the error that kept it out: it closes and
        raises); each worker's new tokens."""
        if isinstance(out, Exception):
            self.close()
            raise out
        self.pass_launched(part)  # done already when the executor ran it while the device worked
        outcome, self._fed_outcome = self._fed_outcome, None
        if isinstance(outcome, Exception):
            self.close()
            raise outcome
        if part.prefill:
            if not self._unwritten:
                self._prompt_written()
            return {w: [] for w in range(len(self.workers))}
        steps, sampled = out
        new = self._new
        for s in steps:
            self._last_steps[s.worker] = s
        self.stats.forward_passes += 1
        for s, tok in zip(steps, sampled):  # in plan order: the first answer found is the session's
            self._take_sample(s.worker, tok, outcome[s.worker], new)
        self._check_stop()
        self.stats.seconds = time.perf_counter() - self._t0
        if self.done:
            self._close_run()
        return new

    def _view_limit(self) -> tuple[int, int]:
        """(the most tokens a worker's view may hold now, the part of the context kept for the
        finisher while it may still run)."""
        reserve = (self.options.finisher_tokens + 32) if not self._finishers and self.options.enabled else 0
        return self.engine.max_context - reserve, reserve

    def _check_room(self, extras: dict[int, list[int]]) -> None:
        """Refuse an injection that would push its worker's view past the limit: fed, it would stop
        the worker and be dropped unseen (see `_enforce_context`)."""
        limit, reserve = self._view_limit()
        why = f" (max_context {self.engine.max_context} less {reserve} kept for the finisher)" if reserve else ""
        for w, ids in extras.items():
            used = self.layout.view_length(w) + len(self.workers[w].pending)
            if used + len(ids) > limit:
                raise ContextLengthError(
                    f"inject[{w}] is {len(ids)} tokens, but worker {w}'s view has room for {max(limit - used, 0)} "
                    f"more: it holds {used} of the {limit} tokens a view may hold{why}; inject a shorter text, "
                    "or load the model with a larger max_context")

    def _enforce_context(self, fed: dict[int, list[int]], new: dict[int, list[int]]) -> dict[int, list[int]]:
        """Stop a worker whose view would outgrow the context (keeping room for the finisher)."""
        limit, _ = self._view_limit()
        lengths = self.layout.view_lengths()
        for w in list(fed):
            if lengths[w] + len(fed[w]) > limit:
                self.workers[w].status = "budget"
                new[w] = []
                del fed[w]
        return fed

    def _take_fed(self, w: int, chunk: list[int]) -> StepEnd | None:
        """A fed chunk joins the worker's stream and step; a StepEnd when it ends the step (the
        worker's next header is queued, and its sample of this pass will be dropped)."""
        ws = self.workers[w]
        ws.stream.extend(chunk[ws.reported:])
        ws.unfed = []
        ws.step_ids.extend(chunk)
        add_written(ws.written, chunk, ws.sampled)
        ws.sampled = False
        self.stats.tokens_per_worker[w] = len(ws.stream)
        if w in self._finishers or not self.options.enabled:
            return None
        if not is_step_boundary(ws.step_text.update(self.decode_ids, ws.step_ids), ws.header_text):
            return None
        ws.proto.finished_steps += 1
        self.stats.steps_per_worker[w] = ws.proto.finished_steps
        end = StepEnd(extract_boxed(self._written(ws)))
        self._finishing.append(w)
        self._open_step(ws)  # the sample after a step's end is dropped: a header comes next
        return end

    def _take_sample(self, w: int, tok: int, step_end: StepEnd | None, new: dict[int, list[int]]) -> None:
        """The worker's sampled token of the pass, after its fed chunk was taken (_take_fed)."""
        ws = self.workers[w]
        if w in self._finishers:
            self._after_finisher_pass(ws, tok, new)
            return
        if step_end is not None:
            self._take_answer(step_end.answer)
            return
        if tok in self.engine.eos_ids:
            self._take_answer(extract_boxed(self._written(ws)))
            ws.status, ws.pending, ws.reported = "eos", [], 0
            return
        ws.pending, ws.reported, ws.sampled = [tok], 1, True
        ws.generated += 1
        ws.proto.since_check += 1
        self.stats.generated_per_worker[w] = ws.generated
        new[w].append(tok)
        ws.stream.append(tok)
        ws.unfed = [tok]
        self.stats.tokens_per_worker[w] = len(ws.stream)
        if self.max_tokens is not None and ws.generated >= self.max_tokens:
            ws.status = "budget"

    def _written(self, ws: WorkerState) -> str:
        """The text of the worker's current step that it sampled itself, run by run: forced text
        (its header, injections) is left out, so that only the model's own words give the answer."""
        return "".join(self.tok.decode(run) for run in ws.written if run)

    def _take_answer(self, ans: str | None) -> None:
        """The session's answer is the first one found."""
        if ans is not None and self.answer is None:
            self.answer = ans

    # ---- stopping and the finisher ----------------------------------------------------
    def _check_stop(self) -> None:
        if self._finishers:
            return
        if self.answer is not None and self.options.stop_on_answer and self.options.enabled:
            self.stats.stop_reason = "answer"
            self.done = True
            return
        if self._workers_out_of_passes():
            for ws in self.workers:
                if ws.status == "active":
                    ws.status = "budget"
        if all(ws.status != "active" for ws in self.workers):
            reason = "eos" if all(ws.status == "eos" for ws in self.workers) else "budget"
            self.stats.stop_reason = reason
            if self._finisher_due() and not self._out_of_passes():
                self._start_finisher()
            else:
                self.done = True

    def _finisher_due(self) -> bool:
        """Whether the finisher would run if every worker stopped now."""
        return self.answer is None and self.options.enabled and self.options.finisher

    def _out_of_passes(self) -> bool:
        """max_steps reached: not one more forward pass, the finisher's included."""
        return self.max_steps is not None and self.stats.forward_passes >= self.max_steps

    def _workers_out_of_passes(self) -> bool:
        """The workers' share of max_steps is used up: all of it, less the `finisher_tokens` passes
        kept for the finisher while it would run (the workers get at least one pass)."""
        if self.max_steps is None:
            return False
        reserve = self.options.finisher_tokens if self._finisher_due() else 0
        return self.stats.forward_passes >= max(self.max_steps - reserve, 1)

    @property
    def finishing(self) -> bool:
        """True while the finisher runs (the workers are being forced to answer)."""
        return bool(self._finishers) and not self.done

    def _start_finisher(self, workers: Sequence[int] = (0,)) -> None:
        """Force the given workers to state an answer, greedily; the others go idle. Out of
        budget without an answer the session does this for worker 0 by itself."""
        prompt = self.encode(FINISHER_PROMPT)
        self._finishers, self._forced = {w: [] for w in workers}, {}
        for w, ws in enumerate(self.workers):
            if w in self._finishers:
                ws.pending, ws.status = ws.pending + prompt, "active"
            else:
                ws.status = "idle"

    def _after_finisher_pass(self, ws: WorkerState, tok: int, new: dict[int, list[int]]) -> None:
        w = ws.proto.index
        ids = self._finishers[w]
        eos = tok in self.engine.eos_ids
        if not eos:
            ids.append(tok)
            ws.pending, ws.reported, ws.sampled = [tok], 1, True
            ws.stream.append(tok)
            ws.unfed = [tok]
            new[w].append(tok)
        text = self.tok.decode(ids)
        ans = extract_boxed("\\boxed{" + text)
        if eos or ans is not None or len(ids) >= self.options.finisher_tokens or self._out_of_passes():
            self._forced[w] = ans if ans is not None else (text.split("}")[0].strip() or None)
            ws.status, ws.pending, ws.sampled = "idle", [], False
        if len(self._forced) == len(self._finishers):
            first = next(iter(self._finishers))
            self.answer = self.answer if self.answer is not None else self._forced[first]
            self.stats.stop_reason += "+finisher"
            self.done = True

    def force_answers(self, workers: Sequence[int] | None = None) -> list[str | None]:
        """Each given worker's answer if it had to give one now (default: every worker).

        A fork of this session gets the finisher prompt after each worker's pending tokens
        and decodes greedily, all the workers in the same passes, until each closes its
        `\\boxed{` (or writes `finisher_tokens` tokens); the fork is then closed. This session
        is unchanged: it goes on as if this was never called. Works with the protocol on or
        off, on a running session or on a finished one that kept its pages (`auto_close`)."""
        return result_of(self.forced_answers_job(workers))

    def forced_answers_job(self, workers: Sequence[int] | None = None) -> Job:
        """`force_answers` as a job (hogwild_ray.jobs): it asks for the fork's passes, so that a
        scheduler runs them beside other sessions; its value is the answers. Checked now."""
        workers = list(range(len(self.workers))) if workers is None else list(workers)
        if not workers or len(set(workers)) != len(workers) or any(
                not isinstance(w, int) or isinstance(w, bool) or not 0 <= w < len(self.workers) for w in workers):
            raise InvalidRequestError(f"force_answers needs distinct workers in 0..{len(self.workers) - 1}, "
                                      f"got {workers!r}")
        if self.finishing:
            raise InvalidRequestError("the finisher is already running; step the session to its end instead")
        return self._forced_answers(workers)

    def _forced_answers(self, workers: list[int]) -> Job:
        twin = self.fork()
        try:
            twin.auto_close, twin.done = False, False
            twin.max_steps = None  # the session's pass cap is not the fork's
            twin._start_finisher(workers)
            while not twin.done:
                yield NeedPass(twin)
            return [twin._forced.get(w) for w in workers]
        finally:
            twin.close()

    def _finish_run(self, new: dict[int, list[int]]) -> dict[int, list[int]]:
        self._check_stop()
        if not self.done and not any(ws.status == "active" for ws in self.workers):
            self.done = True
        if self.done:
            self._close_run()
        return new

    def _close_run(self) -> None:
        self.stats.seconds = time.perf_counter() - self._t0
        self.stats.tokens_per_worker = [len(ws.stream) for ws in self.workers]
        if self.auto_close:
            self.close()

    def fork(self) -> Session:
        """A copy of this session that shares every K/V page with it (copy on write: nothing is
        copied now) and diverges from here; stepping either never changes the other. Close
        both. In-process engines only."""
        if not self.executor.can_fork:
            raise InvalidRequestError("fork() needs an in-process engine (backend='local'); the Ray "
                                      "backend's shards serve one session at a time")
        if self.done and not self.layout.common.pages:
            raise InvalidRequestError("this session is closed; fork it before close()")
        shared = {"engine", "executor", "layout", "tok", "options"}
        twin = copy.copy(self)
        for name, value in vars(self).items():
            if name not in shared:
                setattr(twin, name, copy.deepcopy(value))
        with self.engine.executor_operation():
            twin.layout = self.layout.fork()
            twin.executor = self.executor.fork(twin.layout)
        _watch(twin)
        return twin

    def close(self) -> None:
        """Give the session's cache pages back (idempotent)."""
        self.done = True
        with self.engine.executor_operation():
            self.executor.close()

    # ---- results ------------------------------------------------------------------------
    def result(self) -> SolveResult:
        lay = self.layout
        history = self.tok.decode(lay.common.tokens[len(self.prompt_ids):])
        skip = 0 if self.options.enabled else 1  # without the protocol a block opens with the prompt's last token
        live = [self.tok.decode(lay.cur[w].tokens[skip:] + ws.unfed) for w, ws in enumerate(self.workers)]
        transcript = "\n\n".join(t.strip() for t in [history, *live] if t.strip())
        texts = [self.tok.decode(ws.stream) for ws in self.workers]
        return SolveResult(self.answer, texts, transcript, self.stats)


def _watch(session: Session) -> None:
    """Give the session's pages back if it is collected without close(): the finalizer holds its
    engine and executor handle, never the session; a closed handle makes it a no-op, and it does
    not run at interpreter exit (the process's pool goes with it)."""
    weakref.finalize(session, _collected, session.engine, session.executor).atexit = False


def _collected(engine: HogwildEngine, handle) -> None:
    try:
        if not handle.closed:
            orphaned = getattr(engine, "_orphaned", None)
            orphaned(handle) if orphaned is not None else handle.close()
    except Exception:  # a finalizer must not raise (e.g. the engine's executor is already gone)
        pass


def run_pass(sessions: Sequence[Session], inject: dict[Session, dict[int, str]] | None = None,
             prefill_budget: int = PREFILL_CHUNK, launch_ahead: bool = True
             ) -> dict[Session, dict[int, list[int]] | Exception]:
    """One forward pass for the given sessions of one engine: each one's new tokens, or the
    error that ended it (it is closed; the others ran), or that refused its inject (it goes on,
    nothing fed). Prompt chunks share `prefill_budget` tokens, first come first served; a
    session left without budget waits (no new tokens). launch_ahead=False: the sessions
    foresee nothing, so the next pass is not launched ahead (a caller that knows a newcomer
    joins it)."""
    if not isinstance(sessions, (list, tuple)) or not all(isinstance(s, Session) for s in sessions):
        raise InvalidRequestError(f"sessions must be a list of this engine's sessions (engine.start's), got "
                                  f"{_kinds(sessions)}")
    if len({id(s) for s in sessions}) != len(sessions):
        raise InvalidRequestError("a session is listed twice; list each session once")
    if len({id(s.executor.executor) for s in sessions}) > 1:
        raise InvalidRequestError("these sessions belong to different engines; step each engine's sessions apart")
    if not sessions:
        return {}
    with sessions[0].engine.executor_operation():  # the pass's pages planned and written with no other thread between
        return _run_pass(sessions, inject, prefill_budget, launch_ahead)


def _kinds(values: object) -> str:
    if isinstance(values, (list, tuple)):
        return "a list of " + ", ".join(sorted({type(v).__name__ for v in values})) if values else "an empty list"
    return f"a {type(values).__name__}"


def _run_pass(sessions: Sequence[Session], inject: dict[Session, dict[int, str]] | None, prefill_budget: int,
              launch_ahead: bool) -> dict[Session, dict[int, list[int]] | Exception]:
    inject = inject or {}
    for s in sessions:
        s.check_inject(inject.get(s))
    out: dict[Session, dict[int, list[int]] | Exception] = {}
    parts: list[tuple[Session, SessionPass]] = []
    for s in sessions:
        page = s.layout.page_size  # whole pages while a prompt is long: its pages can be shared
        budget = prefill_budget if prefill_budget >= page else 0
        try:
            part = s.begin_pass(inject.get(s), budget - budget % page)
        except Exception as e:  # the session closed itself, or refused its inject (it goes on)
            out[s] = e
            continue
        if part is None:
            out[s] = s.end_without_pass()
        elif part.prefill or part.fed:
            prefill_budget -= sum(len(ids) for _, ids in part.prefill)
            parts.append((s, part))
        else:
            out[s] = {w: [] for w in range(len(s.workers))}  # its prompt waits for room in a pass
    if parts:
        t0 = time.perf_counter()
        before = sum(sum(s.stats.generated_per_worker) for s, _ in parts)

        def while_running(ran: set[int]) -> dict[int, Foresight | None]:  # the device runs the pass
            sights = {part.session: s.pass_launched(part) for s, part in parts if part.session in ran}
            return sights if launch_ahead else {}

        try:
            results = parts[0][0].executor.executor.run([part for _, part in parts], while_running)
        except BaseException:
            for s, _ in parts:
                s.close()
            raise
        for s, part in parts:
            try:
                out[s] = s.end_pass(part, results[part.session])
            except Exception as e:
                out[s] = e
        generated = sum(sum(s.stats.generated_per_worker) for s, _ in parts) - before
        prompt = sum(len(ids) for _, part in parts for _, ids in part.prefill)
        parts[0][0].engine.counters.record(sum(part.rows for _, part in parts), len(parts), generated, prompt,
                                           time.perf_counter() - t0)
    return out


def step_sessions(sessions: Sequence[Session], inject: dict[Session, dict[int, str]] | None = None,
                  prefill_budget: int = PREFILL_CHUNK) -> dict[Session, dict[int, list[int]]]:
    """`run_pass`, raising the first session's error after the pass (the others advanced)."""
    out = run_pass(sessions, inject, prefill_budget)
    for value in out.values():
        if isinstance(value, Exception):
            raise value
    return out  # type: ignore[return-value]
