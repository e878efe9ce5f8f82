"""LocalExecutor: every session's passes on one ModelRunner, in this process.

Also what each Ray shard runs: the shard replays the coordinator's operations on its own
copies of the layouts through this same class, with its slice of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import count

import numpy as np
import torch

from ..core.layout import Block, CacheLayout, Relocation, WriteStep
from ..core.scheduling import PREFILL_CHUNK
from ..model.graphs import Staged
from ..runner import ModelRunner
from ..core.sampling_params import SamplingParams
from ..sampling import SampleTable, Sampler
from ..transfer import to_device
from ..errors import CacheFullError
from .base import Executor, SessionPass, WhileRunning, plan_session

MODES = ("greedy", "sample", "filter")  # a pass's sampling mode: the most general of its sessions'


@dataclass
class Ahead:
    """A staged guess: the sessions of the next pass, in order, with their workers, the tokens
    each feeds (one, or a header's) and those workers' view positions."""

    sessions: list[int]
    workers: list[list[int]]
    counts: list[list[int]]
    positions: list[list[int]]
    ticket: Staged

    def came_true(self, planned: list[tuple[SessionPass, list[WriteStep], list[WriteStep]]]) -> bool:
        return ([p.session for p, _, _ in planned] == self.sessions
                and all(not shared and [s.worker for s in steps] == workers
                        and [len(s.tokens) for s in steps] == counts and [s.position for s in steps] == positions
                        for (_, shared, steps), workers, counts, positions
                        in zip(planned, self.workers, self.counts, self.positions)))


@dataclass
class SessionState:
    """What the executor keeps of one session: its layout, its sampler and its last logits."""

    layout: CacheLayout
    sampler: Sampler
    last: torch.Tensor  # [workers, vocab]


def merge_tables(tables: list[SampleTable]) -> SampleTable:
    """One table for a pass of several sessions: their rows side by side, the most general mode."""
    if len(tables) == 1:
        return tables[0]
    mode = max((t.mode for t in tables), key=MODES.index)
    return SampleTable(np.concatenate([t.values for t in tables], axis=1), mode)


class LocalExecutor(Executor):
    """Runs passes of any number of sessions on one runner."""

    can_fork = True

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.sessions: dict[int, SessionState] = {}
        self._ids = count()
        self.ahead: Ahead | None = None  # the next pass's attention plan, staged on a guess
        self.staged_passes = 0  # passes that found their plan staged
        # steps moved while the pass that ended them runs: their old pages are given back when the
        # next operation starts, so that until then everything that pass read stays as it was
        # (what the oracle and other inspections of the last pass read)
        self._moved: list[tuple[CacheLayout, Relocation]] = []
        self._in_pass = False  # while_running runs (a step moved then keeps its old pages until the next operation)

    def open(self, layout: CacheLayout, params: list[SamplingParams], session: int | None = None) -> int:
        sid = next(self._ids) if session is None else session
        vocab = self.runner.spec.vocab_size
        last = torch.full((layout.workers, vocab), float("nan"), device=self.runner.device)
        self.sessions[sid] = SessionState(layout, Sampler(params, self.runner.device), last)
        return sid

    def _release_moved(self) -> None:
        moved, self._moved = self._moved, []
        for layout, reloc in moved:
            layout.release(reloc)

    def prefill(self, session: int, block: Block, ids: list[int]) -> None:
        """In passes of at most PREFILL_CHUNK tokens (a long prompt's activations and attention
        partials stay small)."""
        self._release_moved()
        st = self.sessions[session]
        self.ahead = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            step = st.layout.write_shared(block, ids[start : start + PREFILL_CHUNK])
            self.runner.copy_pages(st.layout.take_copies())
            if step is not None:  # else another prompt's pages hold it all
                self.runner.forward([step])

    def finish_steps(self, session: int, workers: list[int]) -> None:
        """Re-rotating keys once; the source pages are given back after the move (when the next
        operation starts, for a move made while a pass runs)."""
        st = self.sessions[session]
        if workers:
            self.ahead = None  # the views change: a staged plan no longer holds
        for w in workers:
            reloc = st.layout.finish_step(w)
            self.runner.copy_pages(st.layout.take_copies())
            if reloc is not None:
                self.runner.relocate(reloc)
                if self._in_pass:
                    self._moved.append((st.layout, reloc))
                else:
                    st.layout.release(reloc)

    def run(self, passes: list[SessionPass], while_running: WhileRunning | None = None
            ) -> dict[int, tuple[list[WriteStep], list[int]] | Exception]:
        """Plans every session's writes (in the order given), then one forward pass for all.

        A session whose writes do not fit the cache is left out of the pass (its error is its
        result); the others run. While the device runs the pass, while_running takes what its
        fed tokens decide (a step that ends moves now), then the next pass's attention plan is
        staged on the guess that every worker fed now feeds one token next (or the header after
        its moved step), in the same sessions, and nothing else changes; the next pass uses it
        only if that came true."""
        self._release_moved()
        planned, tables, failed, copied = [], [], {}, False
        ahead, self.ahead = self.ahead, None
        for p in passes:
            st = self.sessions[p.session]
            try:
                shared, steps = plan_session(st.layout, p)
            except CacheFullError as e:
                st.layout.take_copies()  # nothing of a failed plan reaches the pool
                failed[p.session] = e
                continue
            copies = st.layout.take_copies()
            copied = copied or bool(copies)
            self.runner.copy_pages(copies)
            planned.append((p, shared, steps))
            tables.append(st.sampler.table([s.worker for s in steps], p.greedy).after_rows(len(shared)))
        staged = ahead.ticket if ahead is not None and not copied and not failed and ahead.came_true(planned) else None
        self.staged_passes += staged is not None
        writes = [s for _, shared, steps in planned for s in shared + steps]
        ran = {p.session for p, _, _ in planned}
        if not writes:  # nothing to compute: failures, or prompt chunks that other prompts' pages held
            if while_running is not None:
                while_running(ran)
            return {**failed, **{p.session: ([], []) for p, _, _ in planned}}
        table = merge_tables(tables)
        logits, tokens = self.runner.forward(writes, table, staged)
        rows, row = [], 0  # each session's worker rows of the pass
        for p, shared, steps in planned:
            row += len(shared)  # a prompt chunk's row: its logits and sample are not used
            if steps:
                order = to_device([s.worker for s in steps], self.runner.device)
                self.sessions[p.session].last.index_copy_(0, order, logits[row : row + len(steps)])  # no sync
            rows.append(slice(row, row + len(steps)))
            row += len(steps)
        self._in_pass = True  # steps that move now keep their old pages until the next operation
        try:
            headers = while_running(ran) if while_running is not None else None
        finally:
            self._in_pass = False
        self.ahead = self._stage_next(planned, table.mode, headers or {})
        ids = tokens.tolist()  # the one host sync
        out: dict[int, tuple[list[WriteStep], list[int]] | Exception] = dict(failed)
        for (p, _, steps), r in zip(planned, rows):
            out[p.session] = (steps, ids[r])
        return out

    def _stage_next(self, planned: list[tuple[SessionPass, list[WriteStep], list[WriteStep]]],
                    mode: str, headers: dict[int, dict[int, int]]) -> Ahead | None:
        """While the device runs this pass, stage the next one's plan on the guess that every
        worker fed now (one token, or a chunk such as a header) feeds one token next in the same
        sessions, or the header that `headers` (session -> worker -> tokens) names, and nothing
        else changes: each layout's views (which its next `plan` reuses if the guess comes true
        and every worker feeds one token) and, with CUDA graphs, the attention plan."""
        if any(shared for _, shared, _ in planned):  # prompt chunks: the next pass writes more of them
            return None
        views, workers, counts, positions = [], [], [], []
        for p, _, steps in planned:
            mine = [s.worker for s in steps]
            header = headers.get(p.session, {})
            seen = self.sessions[p.session].layout.preview(mine, header)
            if seen is None:
                return None
            views += seen
            workers.append(mine)
            counts.append([header.get(w, 1) for w in mine])
            positions.append([pos for pos, _ in seen])
        if self.runner.graphs is None:
            return None
        ticket = self.runner.stage_decode(views, mode, [n for c in counts for n in c]) if views else None
        if ticket is None:
            return None
        return Ahead([p.session for p, _, _ in planned], workers, counts, positions, ticket)

    def last_logits(self, session: int) -> torch.Tensor:
        return self.sessions[session].last

    def fork(self, session: int, layout: CacheLayout) -> int:
        """The same seeds, draw counts and last logits, then apart."""
        st = self.sessions[session]
        self.ahead = None  # shared pages: this layout's next writes copy on write
        sid = next(self._ids)
        self.sessions[sid] = SessionState(layout, st.sampler.copy(), st.last.clone())
        return sid

    def close(self, session: int) -> torch.Tensor | None:
        self._release_moved()
        st = self.sessions.pop(session, None)
        if st is None:
            return None
        self.ahead = None
        st.layout.close()
        return st.last
