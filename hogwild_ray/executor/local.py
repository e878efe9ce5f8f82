"""LocalExecutor: every session's passes on one ModelRunner, in this process.

Also what each Ray shard runs: the shard replays the coordinator's operations on its own
copies of the layouts through this same class, with its slice of the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from itertools import count

import numpy as np
import torch

from ..core.layout import Block, CacheLayout, Relocation, WriteStep
from ..core.scheduling import PREFILL_CHUNK
from ..model.graphs import Staged
from ..runner import ModelRunner
from ..runner.model_runner import host_batch
from ..core.sampling_params import SamplingParams
from ..sampling import SampleTable, Sampler
from ..transfer import DeviceFeed, HostCopy, to_device
from ..errors import CacheFullError
from .base import Executor, Foresight, SessionPass, WhileRunning, plan_session

log = logging.getLogger(__name__)
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
class Launched:
    """A pass launched before the sessions asked for it: what it foresaw (see Ready) and its
    outputs on the device. Its sampling rows counted their draws."""

    ready: Ready
    logits: torch.Tensor
    tokens: torch.Tensor | None
    _parts: list[SessionPass] | None = None

    @property
    def parts(self) -> list[SessionPass]:
        """The pass as the sessions would ask for it, in order (made when first asked: the
        sessions' work, which overlaps the device, compares it, not the launch)."""
        if self._parts is None:
            self._parts = [SessionPass(sid, sight.fed({s.worker: s.tokens[0] for s in steps}))
                           for sid, sight, steps in self.ready.sights]
        return self._parts

    @property
    def steps(self) -> list[list[WriteStep]]:
        return [steps for _, _, steps in self.ready.sights]

    @property
    def mode(self) -> str:
        return self.ready.table.mode

    def sessions(self) -> set[int]:
        return {sid for sid, _, _ in self.ready.sights}


def same_writes(a: list[WriteStep], b: list[WriteStep]) -> bool:
    """Whether two plans write the same tokens to the same slots, read over the same views."""
    def key(s: WriteStep) -> tuple:
        return s.worker, s.tokens, s.local_start, s.position, s.slots

    def views(s: WriteStep) -> list[tuple]:
        return [(id(v.block), v.length, v.offset) for v in s.segments]

    # a plan made from the preview holds the preview's views themselves
    return len(a) == len(b) and all(key(x) == key(y) and (x.segments is y.segments or views(x) == views(y))
                                    for x, y in zip(a, b))


@dataclass
class Ready:
    """The next pass, laid out while the current one runs for launching it ahead: per session
    its foresight and the writes it foresees, the pass's sampling table (its draws not yet
    counted), its inputs as the runner takes them (host_batch's, each sampled token a
    placeholder), where each sampling worker's token comes from (its write, its row among this
    pass's samples, the ids that would end its text), the copy of those samples into the inputs
    on the device, and the staged attention plan it may use. The pass is launched before this
    pass's samples reach the host; its writes are given their tokens after the sync."""

    sights: list[tuple[int, Foresight, list[WriteStep]]]
    table: SampleTable
    batch: tuple[list, list[int], list[int], list[int], list[int]]
    feeds: list[tuple[WriteStep, int, frozenset[int]]]
    feed: DeviceFeed | None
    staged: Staged | None

    def take(self, ids: list[int]) -> bool:
        """Give each sampling worker's write its token from this pass's samples (`ids`); False
        if one ends its worker's text (the pass launched with it must be dropped)."""
        for step, row, stop_ids in self.feeds:
            if ids[row] in stop_ids:
                return False
            step.tokens = [ids[row]]
        return True


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
        # launch the next pass right behind this one, its samples fed on the device, when every
        # session of it foresaw that pass (see run); on a GPU, where the launch overlaps the host's work
        self.prelaunch = runner.device.type == "cuda"
        self.launched: Launched | None = None
        self.prelaunched = self.prelaunch_dropped = 0  # passes launched ahead: used, dropped
        self.launch_failures = 0  # launches ahead that raised (the first is logged)

    def open(self, layout: CacheLayout, params: list[SamplingParams], session: int | None = None) -> int:
        sid = next(self._ids) if session is None else session
        vocab = self.runner.spec.vocab_size
        last = torch.full((layout.workers, vocab), float("nan"), device=self.runner.device)
        self.sessions[sid] = SessionState(layout, Sampler(params, self.runner.device), last)
        return sid

    @property
    def holds_launched(self) -> bool:
        return self.launched is not None

    def _drop_launched(self, session: int | None = None) -> None:
        """Give up the pass launched ahead (all of it, or only if it holds `session`): its
        outputs go unread and its draws are taken back. Its writes went to slots past the ends
        of the blocks that no view reads; later writes there come after it on the device."""
        launched = self.launched
        if launched is None or (session is not None and session not in launched.sessions()):
            return
        self.launched = None
        self.prelaunch_dropped += 1
        for sid, _, steps in launched.ready.sights:
            st = self.sessions.get(sid)
            if st is not None:
                st.sampler.count([s.worker for s in steps], by=-1)

    def _release_moved(self) -> None:
        moved, self._moved = self._moved, []
        for layout, reloc in moved:
            layout.release(reloc)

    def prefill(self, session: int, block: Block, ids: list[int]) -> None:
        """In passes of at most PREFILL_CHUNK tokens (a long prompt's activations and attention
        partials stay small)."""
        self._release_moved()
        self._drop_launched(session)
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
            self._drop_launched(session)
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
        fed tokens decide (a step that ends moves now) and foresees the next pass; that pass's
        attention plan is then staged on the guess that every session foresaw it (or, where one
        did not, that every worker fed now feeds one token next), and the next pass uses it only
        if that came true. When every session foresaw it, the next pass is launched right behind
        this one, before this one's samples are read (they are copied into its inputs on the
        device), and before the sessions ask for it: the device goes from pass to pass without
        waiting for the host, whose work between passes (the sync, the sessions taking their
        tokens, the jobs they serve) overlaps the next pass. It is used only if the sessions then
        ask for exactly it (its writes are checked to be the ones the layouts plan), and dropped
        unused otherwise (also when one of the samples it was fed ends its worker's text)."""
        self._release_moved()
        if self.launched is not None and passes != self.launched.parts:
            self._drop_launched()
        launched, self.launched = self.launched, None
        if launched is not None:
            planned, failed = self._claim(launched), {}
            logits, tokens, mode = launched.logits, launched.tokens, launched.mode
            self.prelaunched += 1
        else:
            planned, failed, launch = self._plan(passes)
            if launch is None:  # nothing to compute: failures, or prompt chunks that other prompts' pages held
                if while_running is not None:
                    while_running({p.session for p, _, _ in planned})
                return {**failed, **{p.session: ([], []) for p, _, _ in planned}}
            (logits, tokens), mode = launch
        rows = self._keep_last_logits(planned, logits)
        self._in_pass = True  # steps that move now keep their old pages until the next operation
        try:
            foreseen = (while_running({p.session for p, _, _ in planned}) if while_running is not None else None) or {}
        finally:
            self._in_pass = False
        self.ahead = self._stage_next(planned, mode, foreseen)
        ready = self._ready(planned, rows, foreseen) if self.prelaunch and foreseen else None
        samples = HostCopy(tokens)  # queued before a pass launched next may overwrite a graph's samples
        if ready is not None:  # the next pass goes in behind this one, fed its samples on the device
            self.launched = self._launch_ahead(ready, tokens)
        ids = samples.tolist()  # the one host sync: this pass's samples, not the next pass
        if self.launched is not None and not ready.take(ids):
            self._drop_launched()  # a sample ended its worker's text
        out: dict[int, tuple[list[WriteStep], list[int]] | Exception] = dict(failed)
        for (p, _, steps), r in zip(planned, rows):
            out[p.session] = (steps, ids[r])
        return out

    def _plan(self, passes: list[SessionPass]):
        """Each session's writes planned and the pass launched: (planned, failed, ((logits,
        tokens), sampling mode) or None when there is nothing to compute)."""
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
        if not writes:
            return planned, failed, None
        table = merge_tables(tables)
        return planned, failed, (self.runner.forward(writes, table, staged), table.mode)

    def _keep_last_logits(self, planned, logits: torch.Tensor) -> list[slice]:
        """Each session's fed workers' logits into its last logits (no sync; every session's worker
        order in one copy to the device); their rows of the pass."""
        rows, row = [], 0
        for _, shared, steps in planned:
            row += len(shared)  # a prompt chunk's row: its logits and sample are not used
            rows.append(slice(row, row + len(steps)))
            row += len(steps)
        workers = [s.worker for _, _, steps in planned for s in steps]
        if workers:
            orders = to_device(workers, self.runner.device).split([len(steps) for _, _, steps in planned])
            for (p, _, steps), r, order in zip(planned, rows, orders):
                if steps:
                    self.sessions[p.session].last.index_copy_(0, order, logits[r])
        return rows

    def _claim(self, launched: Launched) -> list[tuple[SessionPass, list[WriteStep], list[WriteStep]]]:
        """The sessions asked for the pass launched ahead: their layouts plan it as usual (their
        books), and must find the writes it made."""
        planned = []
        for part, foreseen in zip(launched.parts, launched.steps):
            layout = self.sessions[part.session].layout
            shared, steps = plan_session(layout, part)
            if layout.take_copies() or shared or not same_writes(steps, foreseen):
                raise RuntimeError(f"session {part.session}'s writes differ from those of the pass launched for it "
                                   "ahead; this is a bug in hogwild-ray")
            planned.append((part, shared, steps))
        return planned

    def _ready(self, planned, rows: list[slice], foreseen: dict[int, Foresight | None]) -> Ready | None:
        """While the device runs this pass, lay out the next one as every session of this one
        foresaw it (None if one did not, or if a layout cannot lay its writes out unchanged:
        see CacheLayout.foreseen): all but the samples it feeds, which come with the sync
        (rows: each session's rows of this pass's samples)."""
        sights, tables, feeds = [], [], []
        for (p, _, steps), r in zip(planned, rows):
            sight = foreseen.get(p.session)
            if sight is None:
                return None
            st = self.sessions[p.session]
            mine = st.layout.foreseen({**{w: [0] for w in sight.samples},
                                       **{w: list(h) for w, h in sight.headers.items()}})
            if mine is None:
                return None
            row_of = {s.worker: row for s, row in zip(steps, range(r.start, r.stop))}
            feeds += [(s, row_of[s.worker], sight.stop_ids) for s in mine if s.worker in sight.samples]
            sights.append((p.session, sight, mine))
            tables.append(st.sampler.table([s.worker for s in mine], count=False))
        writes = [s for _, _, mine in sights for s in mine]
        batch = host_batch(writes)
        at = {id(s): g.start for s, g in zip(writes, batch[0])}
        feed = DeviceFeed([at[id(s)] for s, _, _ in feeds], [row for _, row, _ in feeds],
                          self.runner.device) if feeds else None
        ahead = self.ahead
        staged = ahead.ticket if ahead is not None and ahead.came_true(
            [(SessionPass(sid), [], mine) for sid, _, mine in sights]) else None
        return Ready(sights, merge_tables(tables), batch, feeds, feed, staged)

    def _launch_ahead(self, ready: Ready, samples: torch.Tensor) -> Launched | None:
        """Launch the next pass as `ready` laid it out, fed on the device with this pass's
        `samples` (not yet read: its writes get their tokens after the sync, see Ready.take);
        None if the launch failed."""
        self.ahead = None  # the staged plan is this pass's, or no pass's
        feed = partial(ready.feed.into, samples) if ready.feed is not None else None
        try:
            logits, tokens = self.runner.forward([s for _, _, steps in ready.sights for s in steps], ready.table,
                                                 ready.staged, ready.batch, feed)
        except Exception as e:  # this pass's results stand; the pass asked for next meets the error itself
            self.launch_failures += 1
            if self.launch_failures == 1:  # (every later pass would say the same)
                log.warning("launching a pass ahead failed (%s: %s); passes run when asked until it works",
                            type(e).__name__, e)
            return None
        self.staged_passes += ready.staged is not None
        for sid, _, steps in ready.sights:
            self.sessions[sid].sampler.count([s.worker for s in steps])
        return Launched(ready, logits, tokens)

    def _stage_next(self, planned: list[tuple[SessionPass, list[WriteStep], list[WriteStep]]],
                    mode: str, foreseen: dict[int, Foresight | None]) -> Ahead | None:
        """While the device runs this pass, stage the next one's plan on the guess that each
        session feeds what it foresaw (`foreseen`), or, where it foresaw nothing, that every
        worker fed now (one token, or a chunk such as a header) feeds one token next, and
        nothing else changes: each layout's views (which its next `plan` reuses if the guess
        comes true and every worker feeds one token) and, with CUDA graphs, the attention plan."""
        if any(shared for _, shared, _ in planned):  # prompt chunks: the next pass writes more of them
            return None
        views, workers, counts, positions = [], [], [], []
        for p, _, steps in planned:
            sight = foreseen.get(p.session)
            header = sight.counts() if sight is not None else {}
            mine = sorted(header) if sight is not None else [s.worker for s in steps]
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
        self._drop_launched(session)  # its draws are counted back before the copy takes them
        st = self.sessions[session]
        self.ahead = None  # shared pages: this layout's next writes copy on write
        sid = next(self._ids)
        self.sessions[sid] = SessionState(layout, st.sampler.copy(), st.last.clone())
        return sid

    def close(self, session: int) -> torch.Tensor | None:
        self._release_moved()
        self._drop_launched(session)
        st = self.sessions.pop(session, None)
        if st is None:
            return None
        self.ahead = None
        st.layout.close()
        return st.last
