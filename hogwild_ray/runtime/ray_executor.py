"""RayExecutor: sessions' passes run by the shard actors of a ShardedEngine.

It implements the Executor seam. The coordinator keeps its own copy of every layout and
does the bookkeeping (plans, relocations, page releases) here; every shard replays the same
`(method, args)` messages on its copies with its slice of the model, and rank 0 replies
the sampled tokens of every session in the pass.

A pass takes two messages. "run" launches it (every rank acks once it is under way); while
the shards compute, the coordinator plans its copies and its sessions take what the pass's
fed tokens decide; "meanwhile" then carries the steps they moved (each shard moves them in
the pass, as the in-process executor does) and each session's next pass as foreseen, from
which a shard may launch that pass right behind this one, fed its samples on the device (see
`LocalExecutor.run`). Rank 0's reply to "meanwhile" carries the samples.

Every operation runs inside the engine's `executor_operation`: a session collected without
close() is closed (its pages released, a "close" message sent) between operations, never in
the middle of one, so every shard's copy of the allocator sees the coordinator's order.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from itertools import count
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ..errors import CacheFullError
from ..executor import Executor, SessionPass
from ..executor.base import WhileRunning, plan_session
from ..core.layout import Block, CacheLayout, Relocation, WriteStep
from ..core.sampling_params import SamplingParams
from .errors import ChannelTimeoutError, ShardFailedError

if TYPE_CHECKING:
    from .sharded import ShardedEngine


def concrete(params: list[SamplingParams]) -> list[SamplingParams]:
    """Every worker with an explicit seed, so that all ranks sample identically."""
    return [p if p.seed is not None else dataclasses.replace(p, seed=random.randrange(2**63)) for p in params]


def _first_death(group, err: ShardFailedError) -> ShardFailedError:
    """When several ranks failed, name one whose actor died: the others' collectives broke because of it."""
    import ray
    from ray.exceptions import RayActorError

    if len(err.ranks) < 2:
        return err
    dead = []
    for ref, rank in group.loops.items():
        if rank in err.ranks:
            try:
                ray.get(ref, timeout=0)
            except RayActorError:
                dead.append(rank)
            except Exception:
                pass
    if not dead or min(dead) == min(err.ranks):
        return err
    return ShardFailedError(f"shard rank {min(dead)} failed: its actor died (the other ranks' errors follow "
                            f"from it; the first reported was: {err})", err.ranks)


def _operation(method: Callable) -> Callable:
    """Run `method` inside the engine's executor_operation (no page release interleaves with it)."""
    @functools.wraps(method)
    def run(self: RayExecutor, *args: Any, **kwargs: Any) -> Any:
        with self.engine.executor_operation():
            return method(self, *args, **kwargs)
    return run


class RayExecutor(Executor):
    """Runs passes on the engine's shard group; the layout bookkeeping stays in this process."""

    def __init__(self, engine: ShardedEngine) -> None:
        self.engine = engine
        self.layouts: dict[int, CacheLayout] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._finishing: dict[int, list[int]] = {}  # finished steps the shards move with the next message
        # steps moved while a pass runs: their old pages are given back when the next run, prefill
        # or close starts, where every shard's executor gives its copies' back (the same order)
        self._moved: list[tuple[CacheLayout, Relocation]] = []
        self._in_pass = False
        self._launched = (0, 0)  # rank 0's passes launched ahead, used and dropped, as of its last reply
        # the sessions of the pass rank 0 holds launched ahead (as of its last reply to a pass,
        # unless an operation on one of them has dropped it since); empty: none held
        self._launched_for: frozenset[int] = frozenset()
        self._ids = count()
        self._broken = False

    def _call(self, method: str, *args: Any, meanwhile: Callable[[], tuple] | None = None) -> Any:
        """Send one `(method, args)` message to every shard and gather rank 0's reply; a failed
        shard ends the group. With `meanwhile` the message launches a pass: meanwhile runs here
        after the send, while the shards work, and returns the message that follows the pass's
        launch (every rank acks the launch first); the reply is rank 0's to that one."""
        group = self.engine.group
        if group is None:
            raise ShardFailedError("the engine's shard group is closed (a shard failed earlier, or close() "
                                   "was called); open a new engine", [])
        try:
            group.send((method, args))
            if meanwhile is None:
                return group.gather()
            error, follow = None, ("meanwhile", ([], []))
            try:
                follow = meanwhile()
            except Exception as e:  # the shards wait for the message that follows: it goes anyway
                error = e
            group.gather()  # every rank launched the pass
            group.send(follow)
            reply = group.gather()
            if error is not None:
                raise error
            return reply
        except ShardFailedError as e:
            cause = _first_death(group, e)
            self._broken = True
            self.engine.close()  # nothing of a broken group is reusable
            if cause is e:
                raise
            raise cause from e
        except ChannelTimeoutError:
            self._broken = True
            self.engine.close()
            raise

    def _pending(self) -> list[tuple[int, list[int]]]:
        """The finished steps the shards have not moved yet, handed over (every message that may
        take or give pages carries them first, so each copy of the allocator sees one order)."""
        pending, self._finishing = list(self._finishing.items()), {}
        return pending

    def _release_moved(self) -> None:
        moved, self._moved = self._moved, []
        for layout, reloc in moved:
            layout.release(reloc)

    @_operation
    def open(self, layout: CacheLayout, params: list[SamplingParams]) -> int:
        sid = next(self._ids)
        self._call("open", self._pending(), sid, layout.kind, layout.workers, concrete(params))
        self.layouts[sid] = layout
        return sid

    @_operation
    def prefill(self, session: int, block: Block, ids: list[int]) -> None:
        self._release_moved()
        self._dropped_launched(session)
        self.layouts[session].write_shared(block, ids)
        self._call("prefill", self._pending(), session, block.name, list(ids))

    @_operation
    def finish_steps(self, session: int, workers: list[int]) -> None:
        """Bookkeeping here; the shards move the K/V with the next message (a pass's "meanwhile",
        for steps moved while it runs)."""
        layout = self.layouts[session]
        for w in workers:
            reloc = layout.finish_step(w)
            if reloc is not None:
                if self._in_pass:
                    self._moved.append((layout, reloc))
                else:
                    layout.release(reloc)
        if workers:
            self._finishing.setdefault(session, []).extend(workers)
            if not self._in_pass:  # (a pass's own reply tells what it launched)
                self._dropped_launched(session)

    def _dropped_launched(self, session: int) -> None:
        """The shards drop a pass launched ahead for this session (see LocalExecutor) when the
        operation reaches them: it is no longer held."""
        if session in self._launched_for:
            self._launched_for = frozenset()

    @_operation
    def run(self, passes: list[SessionPass], while_running: WhileRunning | None = None
            ) -> dict[int, tuple[list[WriteStep], list[int]] | Exception]:
        """One forward pass on every shard for all the given sessions.

        When the free pages surely cover this pass, this process plans its copies of the layouts
        while the shards run it; otherwise it plans first, so that a session whose writes do not
        fit is known here (each shard's copy fails the same way and leaves it out too).
        while_running runs here while the shards work, after the planning; the steps it moves and
        the next pass it foresees follow the pass to the shards (see the module's docstring)."""
        self._release_moved()
        finishing = self._pending()
        wire = [(p.session, {w: list(t) for w, t in p.fed.items()}, p.greedy,
                 [(block, list(ids)) for block, ids in p.prefill]) for p in passes]
        pool = self.engine.allocator  # every session's layout takes its pages from it
        worst_pages = sum(len(t) // pool.page_size + 2 for p in passes for t in p.fed.values())
        worst_pages += sum(len(ids) // pool.page_size + 2 for p in passes for _, ids in p.prefill)
        planned: dict[int, list[WriteStep] | Exception] = {}

        def plan() -> None:
            for p in passes:
                layout = self.layouts[p.session]
                try:
                    planned[p.session] = plan_session(layout, p)[1]
                except CacheFullError as e:
                    planned[p.session] = e
                layout.take_copies()  # the shards make their own copies of the pages

        def meanwhile() -> tuple:
            if not planned:
                plan()
            foreseen = {}
            if while_running is not None:
                self._in_pass = True
                try:
                    ran = {s for s, steps in planned.items() if not isinstance(steps, Exception)}
                    foreseen = while_running(ran) or {}
                finally:
                    self._in_pass = False
            sights = [[sid, None if sight is None else sight.plain()] for sid, sight in foreseen.items()]
            return "meanwhile", (self._pending(), sights)

        if worst_pages > pool.free_pages:
            plan()
        tokens, launched = self._call("run", finishing, wire, meanwhile=meanwhile)
        self._launched = (int(launched[0]), int(launched[1]))
        self._launched_for = frozenset(p.session for p in passes) if launched[2] else frozenset()
        for p in passes:
            self.logits.pop(p.session, None)
        out: dict[int, tuple[list[WriteStep], list[int]] | Exception] = {}
        for p in passes:
            steps = planned[p.session]
            out[p.session] = steps if isinstance(steps, Exception) else (steps, list(tokens[p.session]))
        return out

    @_operation
    def launch_ahead(self, on: bool | None = None) -> tuple[bool, int, int]:
        """Whether the shards launch each pass ahead (set to `on` first unless None; on by default
        with CUDA, see LocalExecutor), and rank 0's passes launched ahead so far: used, dropped."""
        on_now, used, dropped = self._call("launch_ahead", None if on is None else bool(on))
        self._launched = (int(used), int(dropped))
        return bool(on_now), int(used), int(dropped)

    # the in-process executor's names, for code that reads or sets either; the counts as of rank
    # 0's last reply (every pass's carries them: metrics read them without a message)
    prelaunch = property(lambda self: self.launch_ahead()[0], lambda self, on: self.launch_ahead(on))
    prelaunched = property(lambda self: self._launched[0])
    prelaunch_dropped = property(lambda self: self._launched[1])
    holds_launched = property(lambda self: bool(self._launched_for))

    @_operation
    def last_logits(self, session: int) -> torch.Tensor:
        """From rank 0 (one message per worker); NaN rows for workers never fed."""
        if session not in self.logits:
            rows = [torch.from_numpy(np.asarray(self._call("logits", session, w)))
                    for w in range(self.layouts[session].workers)]
            self.logits[session] = torch.stack(rows)
        return self.logits[session]

    @_operation
    def read_kv(self, pages: list[int]) -> np.ndarray:
        """Every KV head's stored K and V of `pages`: [2, layers, len(pages), page_size, kv heads, head_dim]
        (float32, gathered from the ranks on rank 0; for inspection and the oracle, not the hot path)."""
        return np.asarray(self._call("kv", list(pages)))

    @_operation
    def close(self, session: int) -> torch.Tensor | None:
        layout = self.layouts.pop(session, None)
        final = self.logits.pop(session, None)
        if layout is None:
            return None
        self._release_moved()  # as every shard's executor does when the close message comes
        self._dropped_launched(session)
        if not self._broken and self.engine.group is not None:
            self._call("close", self._pending(), session)
        layout.close()
        return final
