"""CUDA graphs of the decode pass: one forward of every worker's single token, replayed.

A decode pass (each fed worker feeds exactly one token) has the same shape step after
step; only its inputs change: the tokens, their block-local positions and pool slots,
and the attention plan (who reads which pages, with which rotation). Those live in
fixed-size device buffers refilled by one asynchronous copy each per pass, so a graph
captured once per (tokens, blocks) shape replays every later pass of that shape with
no launch overhead. Passes where a worker feeds a few tokens (a header after each step's
end, a short injection: up to `max_chunk`, MAX_CHUNK by default) have graphs of their own:
each group's logits and sample are taken at its last token, a buffer loaded per pass.
Longer chunks (the prompt) run eagerly; so does anything a graph's buffers cannot hold.
Real text ends a step every few dozen tokens per worker, so with many workers a header
pass comes every other pass or so. Run eagerly, those passes cost about a second each on
average on an H200 (random:qwen3-8b, 16 workers, a step ending every ~30 passes: mean step
721 ms with decode passes only graphed, 150 ms with chunks of up to 16 tokens, 9.9 ms with 32),
most of it, it turned out, Triton compiling the attention kernels again for each new
alignment of the plan's arrays (since fixed: hogwild_kernels.plan.aligned_offsets).

A pass is padded to its graph's size (`captured_size`: a multiple of 16 tokens and groups
past 8) so that the passes real text makes share a few graphs. On an H100 (random:qwen3-8b,
16 workers, a step ending every ~30 passes, 1,200 passes) the workers fed 16 to 51 tokens a
pass in 15 different counts: 25 captures of about 50-60 ms of the host's time each, with both
key tiles. Padded to four sizes, 11 captures, and a mean step 7% shorter, the median the same.
The padding tokens belong to no group (no worker's view reads them; their attention is zero)
and write their K/V to the pool's scratch page; the padding groups are greedy rows whose
logits nobody reads.

Sampling is captured too: each row's seed, draw number, temperature, top-k and top-p go in
with the inputs (sampling.SampleTable), the draws are counter-based (no RNG state on the
device), and the graph's output is the sampled ids: reading them is the step's one sync. A
greedy pass with no greedy graph of its shape replays the sampling graph of that shape where
there is one (its rows at temperature 0 take the argmax, as a greedy graph would): a
server's sessions sample, and each one's finisher, at its end, is greedy, which would
otherwise capture the same shapes again. It costs the greedy pass the sampling's elementwise
work over its rows of logits (a read and a write of rows x vocab floats), against a capture
of tens of milliseconds; a greedy graph already captured for the shape is kept to.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from hogwild_kernels import QueryGroup
from hogwild_kernels.plan import CopyFence, PlanCaps, StaticPlan, build_plan

from ..cache import KVPool
from ..core.graph_sizes import captured_size, pow2
from ..sampling import TABLE_ROWS, SampleTable, sample_tokens
from .decoder import Decoder, ForwardBatch


Feed = Callable[[torch.Tensor], None]  # writes a pass's tokens taken on the device into its input tokens
MAX_CHUNK = 32  # the longest chunk a graphed pass may feed per worker: headers and short injections
# layers a capture's warm-up runs: enough to compile and load every kernel the pass launches
# (Decoder.forward), which no capture may do, at a fraction of a whole pass's launches
WARMUP_LAYERS = 2


class _Graph:
    """One captured pass (and its sampling) and the static buffers it reads and writes: `caps.tokens`
    tokens in `rows` groups, the logits and samples taken at each group's last token."""

    def __init__(self, caps: PlanCaps, rows: int, decode: bool, mode: str | None, scratch_slot: int,
                 device: torch.device) -> None:
        t, pin = caps.tokens, device.type == "cuda"  # (on a CPU the buffers serve checks without a capture)
        self.scratch_slot = scratch_slot  # where the padding tokens' K/V go
        self.plan = StaticPlan(caps, device)
        self.host = torch.zeros(3 * t, dtype=torch.int32, pin_memory=pin)
        self.inputs = torch.zeros(3 * t, dtype=torch.int32, device=device)
        tokens, key_positions, slots = self.inputs.split(t)
        # a decode pass's: every token is its group's last (a padding group's, a padding token)
        self.last_rows = torch.arange(rows, device=device)
        self.last_rows_host = None
        if not decode:  # a pass with chunks: where each group ends changes pass by pass
            self.last_rows_host = torch.zeros(rows, dtype=torch.int64, pin_memory=pin)
        self.batch = ForwardBatch(tokens, key_positions, slots, [], self.last_rows, plan=self.plan.plan)
        self.mode = mode  # how the pass samples (SampleTable.mode), None: it does not
        self.sampling = mode not in (None, "greedy")
        if self.sampling:
            self.table_host = torch.zeros(TABLE_ROWS, rows, dtype=torch.float64, pin_memory=pin)
            self.table = torch.zeros(TABLE_ROWS, rows, dtype=torch.float64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.sampled: torch.Tensor | None = None
        self.staged: Staged | None = None  # whose plan the buffers hold, when it was staged ahead
        self.fence = CopyFence(device)  # the pinned inputs above, until their last copy has run

    def load(self, host_plan: dict | None, tokens: list[int], key_positions: list[int], slots: list[int],
             last_rows: list[int], table: SampleTable | None, feed: Feed | None = None) -> None:
        """Fill the input buffers (and the plan, unless it was staged: host_plan None), the pass
        padded to the graph's tokens and groups; feed: what writes tokens taken on the device
        into them, after the copy."""
        if host_plan is not None:
            self.plan.load(host_plan)
        self.staged = None
        self.fence.wait()
        h = self.host.numpy().reshape(3, -1)
        t, rows = len(tokens), len(last_rows)
        h[:, :t] = tokens, key_positions, slots
        h[:2, t:], h[2, t:] = 0, self.scratch_slot  # padding: token 0 at position 0, K/V to the scratch page
        self.inputs.copy_(self.host, non_blocking=True)
        if self.last_rows_host is not None:
            last = self.last_rows_host.numpy()
            last[:rows], last[rows:] = last_rows, 0  # the padding groups read row 0's logits, unread
            self.last_rows.copy_(self.last_rows_host, non_blocking=True)
        if self.sampling:
            values = self.table_host.numpy()
            values[:, :rows], values[:, rows:] = table.values, 0.0  # padding groups: greedy rows
            self.table.copy_(self.table_host, non_blocking=True)
        self.fence.mark()
        if feed is not None:
            feed(self.batch.tokens)

    def forward(self, decoder: Decoder, cache: KVPool, layers: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = decoder.forward(self.batch, cache, layers)
        if self.mode is None:
            return logits, None
        return logits, sample_tokens(logits, self.table if self.sampling else None, self.mode)


class GraphKey(NamedTuple):
    """What a captured graph serves: passes padded to `tokens` tokens in `groups` groups."""

    tokens: int
    items: int  # blocks read, to a power of two
    pairs: int  # the most readers of one unit, to a power of two
    long_keys: bool  # the key tile the capture keeps
    mode: str | None  # how it samples (SampleTable.mode), None: it does not
    groups: int
    decode: bool  # every group feeds one token (each group's last row is fixed)
    batched: bool  # no block that every token reads (several sessions): the units it allots


@dataclass(eq=False)
class Staged:
    """A plan loaded ahead into a graph's buffers for a predicted pass (see DecodeGraphs.stage)."""

    entry: _Graph
    mode: str | None


class DecodeGraphs:
    """Captures and replays decode passes of one decoder over one K/V pool."""

    def __init__(self, decoder: Decoder, cache: KVPool, max_context: int, max_chunk: int = MAX_CHUNK) -> None:
        """max_chunk: the most tokens one group of a graphed pass may feed (1: decode passes only;
        more: also passes where some workers feed a header or a short injection, each pass shape
        then a graph of its own)."""
        self.decoder, self.cache, self.max_chunk = decoder, cache, max_chunk
        self.padded = True  # passes padded to few sizes (captured_size); False: a graph per exact size
        self.warmup_layers: int | None = WARMUP_LAYERS  # None: a whole pass
        self.attention = decoder.attention
        self.device = cache.k.device
        self.max_pages = -(-max_context // cache.page_size) + 1
        self.graphs: dict[GraphKey, _Graph] = {}
        self.last: _Graph | None = None
        self.replays = 0
        self.uses: dict[_Graph, int] = {}  # replays of each graph (a benchmark clears it to count a stretch)
        self.staged_hits = 0  # passes whose plan was staged while the previous pass ran
        self.captures = 0  # graphs captured: each new pass shape's one-time cost (a warm-up's, or the pass's)
        self.capture_seconds = 0.0  # the host's time in those captures
        self.unfit = 0  # passes it serves that ran eagerly all the same: their plan did not fit a graph's buffers

    def serves(self, groups: list[QueryGroup]) -> bool:
        """A decode pass (every group feeds one token), or one whose chunks are at most max_chunk."""
        return bool(groups) and all(g.count <= self.max_chunk for g in groups)

    def run(self, groups: list[QueryGroup], tokens: list[int], key_positions: list[int], slots: list[int],
            last_rows: list[int], table: SampleTable | None = None,
            staged: Staged | None = None, feed: Feed | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Logits [groups, vocab] of a pass at each group's last row (last_rows, host_batch's) and,
        given a sampling table, its sampled ids (drawn inside the graph); None when no graph can
        hold the pass. staged: the ticket of `stage` for this very pass, if any; feed: writes
        the tokens that come from the device into the input tokens."""
        mode = None if table is None else table.mode
        if staged is not None and staged.entry.staged is staged and staged.mode == mode:
            entry, host = staged.entry, None  # its plan went in while the previous pass ran
            self.staged_hits += 1
        else:
            entry, host = self._entry(groups, len(tokens), mode)
            if entry is None:
                self.unfit += 1
                return None
        entry.load(host, tokens, key_positions, slots, last_rows, table, feed)
        if entry.graph is None:
            self._capture(entry)
        entry.graph.replay()
        self.last, self.replays = entry, self.replays + 1
        self.uses[entry] = self.uses.get(entry, 0) + 1
        rows = len(last_rows)
        return entry.logits[:rows], None if entry.sampled is None else entry.sampled[:rows]

    def stage(self, groups: list[QueryGroup], mode: str | None) -> Staged | None:
        """Build and load the plan of a predicted next decode pass now, while the device still
        runs this one (the copy queues behind it). `run` given the returned ticket skips that
        work if nothing else has loaded the graph since; the caller vouches that the pass it
        runs has exactly these groups."""
        if not self.serves(groups):
            return None
        entry, host = self._entry(groups, sum(g.count for g in groups), mode)
        if entry is None or entry.graph is None:
            return None
        entry.plan.load(host)
        entry.staged = Staged(entry, mode)
        return entry.staged

    def _entry(self, groups: list[QueryGroup], t: int, mode: str | None) -> tuple[_Graph | None, dict]:
        """The graph for this pass's shape, padded (made if new, not captured), and its host plan;
        None when the plan does not fit the graph's buffers."""
        size = captured_size if self.padded else int
        t = size(t)  # the padding tokens, past every group's, are in no group
        host = build_plan(groups, t, self.attention.chunk_rule(self.device, capped=False), self.cache.page_size,
                          longest_first=self.attention.longest_first)
        items = pow2(host["tables"].shape[0])
        pairs = min(t, pow2(max(1, host["max_pairs"])))  # a graph per power of two of a unit's readers
        key = GraphKey(t, items, pairs, self.attention.long_keys(int(host["chunk"])), mode,
                       size(len(groups)), decode=all(g.count == 1 for g in groups), batched=host["batched"])
        if mode == "greedy" and key not in self.graphs and key._replace(mode="sample") in self.graphs:
            key = key._replace(mode="sample")  # its greedy rows (temperature 0) draw the argmax: the same ids
        entry = self.graphs.get(key)
        if entry is None:
            units = self.attention.target_units(self.device, key.batched) + items
            caps = PlanCaps(t, items, self.max_pages, units, unit_pairs=pairs)
            entry = self.graphs[key] = _Graph(caps, key.groups, key.decode, mode, self.cache.scratch_slot,
                                              self.device)
        return (entry if entry.plan.fits(host) else None), host

    def _capture(self, entry: _Graph) -> None:
        """Warm up on a side stream (compiles the kernels: the first WARMUP_LAYERS layers of the
        pass, whose K/V the replay then writes again, alike), then capture. With a whole pass
        as the warm-up, a capture took about 61 ms of the host's time at 16 workers of
        random:qwen3-8b on an H100, the warm-up 17-35 ms of it (the same when captured without
        torch.cuda.graph's device sync and emptied caches)."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            entry.forward(self.decoder, self.cache, self.warmup_layers)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            entry.logits, entry.sampled = entry.forward(self.decoder, self.cache)
        entry.graph = graph
        self.captures += 1
        self.capture_seconds += time.perf_counter() - t0

    def replay_last(self, times: int) -> float:
        """Mean GPU seconds of the last decode pass replayed `times` times back to back (its
        K/V are rewritten with the same values, the same tokens drawn): the pass's device time,
        sampling included, without any host work."""
        if self.last is None or self.last.graph is None:
            raise RuntimeError("no decode pass has run yet")
        return _replay_seconds(self.last, times, self.device)

    def replay_each(self, times: int) -> list[tuple[int, bool, float]]:
        """Per graph replayed since `uses` was cleared: its replays, whether its passes feed one
        token per group (plain decode), and its mean GPU seconds replayed `times` times back to
        back. An older graph rewrites the K/V of its last pass's slots, which may hold other
        values by now: measure after the work whose passes are counted."""
        return [(n, entry.last_rows_host is None, _replay_seconds(entry, times, self.device))
                for entry, n in self.uses.items() if entry.graph is not None]


def _replay_seconds(entry: _Graph, times: int, device: torch.device) -> float:
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(times):
        entry.graph.replay()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / times
