"""Property tests of the cache layout: blocks, views, offsets, slots and pages.

A plain model keeps the tokens every block should hold (token ids are unique integers,
so every token can be followed), and a dictionary of pool slots keeps what the K/V pool
would hold. After every operation the layout must agree with both.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild_ray.errors import CacheFullError, InvalidRequestError
from hogwild_ray.core.layout import LAYOUTS, CacheLayout, PageAllocator


class Model:
    """What each block should hold, what the pool should hold, and what was written."""

    def __init__(self, kind: str, workers: int, page_size: int, num_pages: int = 4096) -> None:
        self.kind, self.workers, self.page_size = kind, workers, page_size
        self.alloc = PageAllocator(num_pages, page_size)
        self.lay = CacheLayout(kind, workers, self.alloc)
        self.tokens = {name: [] for name in self.names()}
        self.pool: dict[int, int] = {}  # slot -> token whose K/V sit there
        self.issued: list[int] = []
        self.finished: list[list[int]] = []  # finished steps, in finish order
        self.shared: list[int] = []  # prompt tokens written into common at start
        self.pages: dict[str, list[int]] = {}  # pages each block held after the last check
        self._ids = itertools.count(1000)

    def names(self) -> list[str]:
        return ["common", "hdr_others", "hdr_own", *(f"cur{w}" for w in range(self.workers))]

    def block(self, name: str):
        return self.lay.cur[int(name[3:])] if name.startswith("cur") else getattr(self.lay, name)

    def fresh(self, n: int) -> list[int]:
        ids = [next(self._ids) for _ in range(n)]
        self.issued.extend(ids)
        return ids

    def view_names(self, w: int) -> list[str]:
        if self.kind == "interleaved":
            return ["common", "hdr_own", f"cur{w}"]
        others = [f"cur{o}" for o in range(self.workers) if o != w]
        return ["common", *(["hdr_others"] if self.workers > 1 else []), *others, "hdr_own", f"cur{w}"]

    def expected_slots(self, name: str, start: int, stop: int) -> list[int]:
        pages, ps = self.block(name).pages, self.page_size
        return [pages[i // ps] * ps + i % ps for i in range(start, stop)]

    # ---- operations -------------------------------------------------------------------
    def prefill(self, sizes: dict[str, int]) -> None:
        names = {id(self.lay.common): "common", id(self.lay.hdr_others): "hdr_others",
                 id(self.lay.hdr_own): "hdr_own"}
        order = [names[id(b)] for b in self.lay.shared_prefix_blocks()]
        if self.kind == "interleaved" or self.workers == 1:
            assert order == ["common", "hdr_own"]
        else:
            assert order == ["common", "hdr_others", "hdr_own"]
        for i, name in enumerate(order):
            toks = self.fresh(sizes[name])
            before = {n: len(self.tokens[n]) for n in order}
            step = self.lay.write_shared(self.block(name), toks)
            self.tokens[name].extend(toks)
            if name == "common":
                self.shared.extend(toks)
            assert step.worker is None and step.block is self.block(name) and step.tokens == toks
            assert step.local_start == before[name]
            want, offset = [], 0
            for n in order[: i + 1]:
                length = len(self.tokens[n]) if n == name else before[n]
                if length:
                    want.append((n, length, offset))
                if n == name:
                    assert step.position == offset + before[name]
                offset += length
            assert [(s.block, s.length, s.offset) for s in step.segments] == [
                (self.block(n), ln, o) for n, ln, o in want]
            assert step.slots == self.expected_slots(name, before[name], len(self.tokens[name]))
            self._write_pool(step.slots, toks)
        self.check()

    def plan(self, sizes: dict[int, int]) -> None:
        fed = {w: self.fresh(n) for w, n in sizes.items()}
        before = {n: len(t) for n, t in self.tokens.items()}
        steps = self.lay.plan(fed)
        assert [s.worker for s in steps] == sorted(w for w in fed if fed[w])
        for w in sorted(fed):
            self.tokens[f"cur{w}"].extend(fed[w])
        for s in steps:
            w, own = s.worker, f"cur{s.worker}"
            assert s.block is self.lay.cur[w] and s.tokens == fed[w]
            assert s.local_start == before[own]
            want, offset, own_offset = [], 0, None
            for n in self.view_names(w):
                # the one-step lag: others as they were before this plan, own block causal
                length = len(self.tokens[n]) if n == own else before[n]
                if length:
                    want.append((self.block(n), length, offset))
                if n == own:
                    own_offset = offset
                offset += length
            assert [(g.block, g.length, g.offset) for g in s.segments] == want
            assert s.position == own_offset + s.local_start
            assert s.slots == self.expected_slots(own, before[own], len(self.tokens[own]))
            flat = [t for n in self.view_names(w)
                    for t in self.tokens[n][: len(self.tokens[n]) if n == own else before[n]]]
            assert s.flat_view() == flat
            assert s.position + len(fed[w]) == len(flat)
            self._write_pool(s.slots, fed[w])
        self.check()

    def finish(self, w: int) -> None:
        name = f"cur{w}"
        old = self.lay.cur[w]
        old_pages, old_slots = list(old.pages), self.expected_slots(name, 0, len(old))
        common_len = len(self.tokens["common"])
        reloc = self.lay.finish_step(w)
        if self.kind == "contiguous":
            assert reloc is None
            assert self.lay.cur[w] is old
            self.check()
            return
        step = self.tokens[name]
        assert reloc.delta == common_len
        assert reloc.src_slots == old_slots
        assert reloc.dst_slots == self.expected_slots("common", common_len, common_len + len(step))
        assert reloc.freed_pages == old_pages
        assert self.lay.cur[w] is not old and len(self.lay.cur[w]) == 0
        # the copy the caller makes: keys at cur-local i land at common-local delta + i
        moved = [self.pool[s] for s in reloc.src_slots]
        for s, t in zip(reloc.dst_slots, moved):
            self.pool[s] = t
        # until release, the old pages belong to the relocation, not to the allocator
        owned = [p for b in self.lay.blocks() for p in b.pages]
        assert not set(owned) & set(old_pages)
        assert len(owned) + len(old_pages) + self.alloc.free_pages == self.alloc.num_pages
        self.lay.release(reloc)
        for p in old_pages:
            for i in range(self.page_size):
                self.pool.pop(p * self.page_size + i, None)
        self.tokens["common"].extend(step)
        self.finished.append(step)
        self.tokens[name] = []
        self.pages.pop(name, None)
        self.check()

    def _write_pool(self, slots: list[int], toks: list[int]) -> None:
        assert len(slots) == len(toks) == len(set(slots))
        for s, t in zip(slots, toks):
            self.pool[s] = t

    # ---- the invariants ---------------------------------------------------------------
    def check(self) -> None:
        lay, ps = self.lay, self.page_size
        for name in self.names():
            b = self.block(name)
            assert b.tokens == self.tokens[name], name
            # a page for every page's worth of tokens; a worker's full block (or one a moved step left
            # empty) may hold one spare page
            spare = len(b.pages) - math.ceil(len(b) / ps)
            assert spare == 0 or (spare == 1 and name.startswith("cur") and len(b) % ps == 0), name
            # pages of a block only ever grow at the end: written K/V never move silently
            prev = self.pages.get(name, [])
            assert b.pages[: len(prev)] == prev, name
            self.pages[name] = list(b.pages)
            # the pool holds each block's tokens at its slots
            assert [self.pool.get(s) for s in b.slots(0, len(b), ps)] == b.tokens, name
        for w in range(self.workers):
            assert lay.view_blocks(w) == [self.block(n) for n in self.view_names(w)]
            assert lay.view_length(w) == sum(len(self.tokens[n]) for n in self.view_names(w))
        assert lay.view_lengths() == [lay.view_length(w) for w in range(self.workers)]
        # finished steps sit at the end of common in the order they finished
        assert self.tokens["common"] == self.shared + [t for s in self.finished for t in s]
        # no token lost or duplicated
        everything = [t for b in lay.blocks() for t in b.tokens]
        assert Counter(everything) == Counter(self.issued)
        # page accounting: owned + free == total, nobody owns a page twice, free is disjoint
        owned = [p for b in lay.blocks() for p in b.pages]
        assert len(owned) == len(set(owned))
        assert len(owned) + self.alloc.free_pages == self.alloc.num_pages
        free = self.alloc.alloc(self.alloc.free_pages)
        self.alloc.release(free)
        assert not set(free) & set(owned)
        assert set(free) | set(owned) == set(range(self.alloc.num_pages))

    def close(self) -> None:
        self.lay.close()
        assert self.alloc.free_pages == self.alloc.num_pages
        assert all(not b.pages for b in self.lay.blocks())
        pages = self.alloc.alloc(self.alloc.num_pages)
        assert sorted(pages) == list(range(self.alloc.num_pages))


@st.composite
def scenarios(draw):
    workers = draw(st.integers(1, 6))
    page_size = draw(st.integers(1, 4))
    prefill = {n: draw(st.integers(1, 6)) for n in ("common", "hdr_others", "hdr_own")}
    worker = st.integers(0, workers - 1)
    plan = st.dictionaries(worker, st.integers(0, 5), min_size=1).map(lambda d: ("plan", d))
    finish = worker.map(lambda w: ("finish", w))
    ops = draw(st.lists(st.one_of(plan, plan, finish), max_size=30))
    return workers, page_size, prefill, ops


@pytest.mark.parametrize("kind", LAYOUTS)
@settings(max_examples=100, deadline=None)
@given(scenarios())
def test_random_interleavings(kind, scenario):
    workers, page_size, prefill, ops = scenario
    m = Model(kind, workers, page_size)
    m.check()
    m.prefill(prefill)
    for op, arg in ops:
        if op == "plan":
            m.plan(arg)
        else:
            m.finish(arg)
    m.close()


def test_views_of_three_workers_spelled_out():
    """The DESIGN §1 picture, written out by hand for A, B, C."""
    for kind in ("combined", "contiguous"):
        lay = CacheLayout(kind, 3, PageAllocator(64, 4))
        c, ho, hw, cur = lay.common, lay.hdr_others, lay.hdr_own, lay.cur
        assert lay.view_blocks(0) == [c, ho, cur[1], cur[2], hw, cur[0]]
        assert lay.view_blocks(1) == [c, ho, cur[0], cur[2], hw, cur[1]]
        assert lay.view_blocks(2) == [c, ho, cur[0], cur[1], hw, cur[2]]
    lay = CacheLayout("interleaved", 3, PageAllocator(64, 4))
    assert lay.view_blocks(1) == [lay.common, lay.hdr_own, lay.cur[1]]
    lay = CacheLayout("combined", 1, PageAllocator(64, 4))
    assert lay.view_blocks(0) == [lay.common, lay.hdr_own, lay.cur[0]]


def test_one_step_lag_by_hand():
    lay = CacheLayout("combined", 2, PageAllocator(64, 2))
    lay.write_shared(lay.common, [1, 2, 3])
    lay.write_shared(lay.hdr_others, [4])
    lay.write_shared(lay.hdr_own, [5, 6])
    a, b = lay.plan({0: [10, 11], 1: [20]})
    # A sees B's block empty (lag), its own two tokens causally
    assert a.flat_view() == [1, 2, 3, 4, 5, 6, 10, 11] and a.position == 6
    assert b.flat_view() == [1, 2, 3, 4, 5, 6, 20] and b.position == 6
    a, b = lay.plan({0: [12], 1: [21]})
    assert a.flat_view() == [1, 2, 3, 4, 20, 5, 6, 10, 11, 12] and a.position == 9
    assert b.flat_view() == [1, 2, 3, 4, 10, 11, 5, 6, 20, 21] and b.position == 9
    reloc = lay.finish_step(0)
    assert reloc.delta == 3 and len(reloc.src_slots) == 3
    lay.release(reloc)
    (b,) = lay.plan({1: [22]})
    assert b.flat_view() == [1, 2, 3, 10, 11, 12, 4, 5, 6, 20, 21, 22]
    assert [(s.length, s.offset) for s in b.segments] == [(6, 0), (1, 6), (2, 7), (3, 9)]


# ---- the pool running out ---------------------------------------------------------------

@pytest.mark.parametrize("kind", LAYOUTS)
def test_cache_full_names_cache_tokens_and_changes_nothing(kind):
    alloc = PageAllocator(3, 4)
    lay = CacheLayout(kind, 2, alloc)
    lay.write_shared(lay.common, list(range(5)))  # 2 pages
    lay.plan({0: [100, 101, 102]})  # 1 page: the pool is now full
    assert alloc.free_pages == 0
    lay.plan({0: [103]})  # still fits in worker 0's page
    with pytest.raises(CacheFullError, match="cache_tokens") as err:
        lay.plan({1: [200]})
    assert isinstance(err.value, RuntimeError)
    assert lay.cur[1].tokens == [] and lay.cur[1].pages == [] and alloc.free_pages == 0
    with pytest.raises(CacheFullError, match="cache_tokens"):
        lay.plan({0: [104]})
    assert lay.cur[0].tokens == [100, 101, 102, 103] and len(lay.cur[0].pages) == 1
    if kind != "contiguous":
        # moving the step needs room in common before the step's page is freed
        with pytest.raises(CacheFullError):
            lay.finish_step(0)
        assert lay.cur[0].tokens == [100, 101, 102, 103] and len(lay.common) == 5
    lay.close()
    assert alloc.free_pages == 3
    lay2 = CacheLayout(kind, 1, alloc)
    lay2.write_shared(lay2.common, list(range(12)))  # the whole pool again
    assert alloc.free_pages == 0


def test_cache_full_from_the_allocator():
    alloc = PageAllocator(2, 8)
    assert sorted(alloc.alloc(2)) == [0, 1]
    with pytest.raises(CacheFullError, match="cache_tokens"):
        alloc.alloc(1)


# ---- invalid arguments ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["", "Combined", "shared", None])
def test_invalid_layout_name(kind):
    with pytest.raises(InvalidRequestError, match="layout") as err:
        CacheLayout(kind, 2, PageAllocator(8, 4))
    for name in LAYOUTS:
        assert name in str(err.value)


@pytest.mark.parametrize("workers", [0, -1, 1.5, "2", True, None])
def test_invalid_worker_count(workers):
    with pytest.raises(InvalidRequestError, match="workers"):
        CacheLayout("combined", workers, PageAllocator(8, 4))


@pytest.mark.parametrize("pages, size", [(0, 4), (4, 0), (-1, 1)])
def test_invalid_pool(pages, size):
    with pytest.raises(InvalidRequestError):
        PageAllocator(pages, size)


def test_fork_shares_pages_and_copies_a_partial_page_on_write():
    alloc = PageAllocator(64, 4)
    parent = CacheLayout("combined", 2, alloc)
    parent.write_shared(parent.common, list(range(6)))  # 1 full page + half a page
    parent.plan({0: [10, 11], 1: [20]})
    assert parent.take_copies() == []  # nothing shared yet
    used = 64 - alloc.free_pages
    child = parent.fork()
    assert alloc.free_pages == 64 - used  # no page copied by the fork itself
    assert [b.pages for b in child.blocks()] == [b.pages for b in parent.blocks()]
    # the child appends to common's half-full page: it gets a private copy of that page only
    child.plan({0: [12]})
    assert child.take_copies() == [(parent.cur[0].pages[-1], child.cur[0].pages[-1])]
    step = child.finish_step(0)
    copies = child.take_copies()
    assert copies == [(parent.common.pages[1], child.common.pages[1])]  # 6 + 3 tokens: one page more
    assert child.common.pages[0] == parent.common.pages[0]  # full pages stay shared
    child.release(step)
    # the parent was not changed, and it copies when it writes to a page still shared
    assert parent.common.tokens == list(range(6)) and parent.cur[0].tokens == [10, 11]
    parent.plan({1: [21]})
    assert len(parent.take_copies()) == 1
    child.close()
    parent.close()
    assert alloc.free_pages == 64


def test_page_refcounts():
    alloc = PageAllocator(4, 2)
    pages = alloc.alloc(2)
    alloc.share(pages)
    assert alloc.is_shared(pages[0])
    alloc.release(pages)
    assert alloc.free_pages == 2 and not alloc.is_shared(pages[0])
    alloc.release(pages)
    assert alloc.free_pages == 4


# ---- preview: the next decode pass, predicted ---------------------------------------------

@pytest.mark.parametrize("kind", LAYOUTS)
@settings(max_examples=60, deadline=None)
@given(workers=st.integers(1, 5), page_size=st.integers(1, 5), feeds=st.lists(st.integers(1, 4), min_size=5,
                                                                                max_size=5), chunk=st.integers(1, 4))
def test_preview_is_what_plan_then_hands_out(kind, workers, page_size, feeds, chunk):
    """Whenever preview predicts, a plan of that many tokens each (one, or `chunk` for the first
    worker, as a header after a moved step) matches it exactly and allocates no page but the
    spares of blocks it fills; it declines exactly when a worker's block has no page for one
    of its next tokens; `foreseen` lays out the same writes, changing nothing, for exactly the
    previewed counts."""
    lay = CacheLayout(kind, workers, PageAllocator(512, page_size))
    for block, n in zip(lay.shared_prefix_blocks(), (3, 1, 2)):
        lay.write_shared(block, list(range(n)))
    for w in range(workers):
        lay.plan({w: list(range(feeds[w % 5]))})
    chosen = [w for w in range(workers) if w % 2 == 0 or workers == 1]
    counts = {chosen[0]: chunk}
    for _ in range(2 * page_size + 1):
        views = lay.preview(chosen, counts)
        opens_page = any((len(lay.cur[w]) + counts.get(w, 1) - 1) // page_size >= len(lay.cur[w].pages)
                         for w in chosen)
        assert (views is None) == opens_page
        fed = {w: [7 + i for i in range(counts.get(w, 1))] for w in chosen}
        foreseen = lay.foreseen(fed)  # the writes a pass launched ahead makes: those of the plan
        assert (foreseen is None) == (views is None) and lay.foreseen({**fed, chosen[0]: [7] * (chunk + 1)}) is None
        free = lay.allocator.free_pages
        steps = lay.plan(fed)
        if views is None:
            continue
        assert [(f.worker, f.tokens, f.local_start, f.position, f.slots) for f in foreseen] == [
            (s.worker, s.tokens, s.local_start, s.position, s.slots) for s in steps]
        assert [[(v.block, v.length, v.offset) for v in f.segments] for f in foreseen] == [
            [(v.block, v.length, v.offset) for v in s.segments] for s in steps]
        spares = sum(len(lay.cur[w]) % page_size == 0 for w in chosen)  # blocks just filled take their next page
        assert lay.allocator.free_pages == free - spares and not lay.take_copies()
        assert [pos for pos, _ in views] == [s.position for s in steps]
        for (_, segs), s in zip(views, steps):
            assert [(v.block, v.length, v.offset) for v in segs] == [(v.block, v.length, v.offset)
                                                                      for v in s.segments]
    lay.close()


def test_a_full_block_takes_a_spare_page_so_the_next_step_is_foreseen():
    """A worker's write that fills its last page takes the next page at once: the next one-token
    step is previewed (no page to open) and planned from the preview without allocating. A
    fork shares no spare page; moving the step and closing give the spares back."""
    alloc = PageAllocator(64, 4)
    lay = CacheLayout("combined", 2, alloc)
    lay.write_shared(lay.common, [1, 2, 3])
    lay.plan({0: [10, 11, 12], 1: [20]})
    free = alloc.free_pages
    lay.plan({0: [13], 1: [21]})  # worker 0's page is full: it takes a spare
    assert len(lay.cur[0].pages) == 2 and len(lay.cur[1].pages) == 1 and alloc.free_pages == free - 1
    views = lay.preview([0, 1])
    assert views is not None
    used, free = lay.previews_used, alloc.free_pages
    steps = lay.plan({0: [14], 1: [22]})
    assert lay.previews_used == used + 1 and alloc.free_pages == free
    assert steps[0].slots == [lay.cur[0].pages[1] * 4]  # the spare page receives the token
    lay.plan({0: [15, 16, 17]})  # fills the spare: the next spare
    spare = lay.cur[0].pages[2]
    twin = lay.fork()
    assert twin.cur[0].pages == lay.cur[0].pages[:2] and not alloc.is_shared(spare)
    twin.plan({0: [18]})
    lay.plan({0: [18]})
    assert not lay.take_copies() and not twin.take_copies()  # each wrote into a page of its own
    assert lay.cur[0].pages[2] == spare and twin.cur[0].pages[2] != spare
    reloc = lay.finish_step(0)
    assert spare in reloc.freed_pages
    lay.release(reloc)
    twin.close()
    lay.close()
    assert alloc.free_pages == 64


def test_no_spare_page_when_the_pool_runs_low():
    """Spares leave the last 1/16 of the pool alone: a block filled then opens its next page
    when it writes into it, as before."""
    alloc = PageAllocator(16, 2)
    lay = CacheLayout("combined", 1, alloc)
    lay.write_shared(lay.common, list(range(26)))  # 13 pages: 3 free
    lay.plan({0: [1, 2]})  # 2 free after its page: more than 16 // 16, a spare
    assert len(lay.cur[0].pages) == 2 and alloc.free_pages == 1
    lay.plan({0: [3, 4]})  # fills the spare; 1 free is not more than 1: no spare
    assert len(lay.cur[0].pages) == 2 and alloc.free_pages == 1
    assert lay.preview([0]) is None
    lay.plan({0: [5]})  # opens the last page when it writes into it
    assert alloc.free_pages == 0
    lay.close()
    assert alloc.free_pages == 16


def test_preview_declines_a_shared_last_page():
    lay = CacheLayout("combined", 2, PageAllocator(64, 4))
    lay.write_shared(lay.common, [1, 2, 3])
    lay.plan({0: [1], 1: [2]})
    assert lay.preview([0, 1]) is not None
    twin = lay.fork()
    assert lay.preview([0, 1]) is None and twin.preview([1]) is None  # the next write copies on write
    twin.close()
    lay.close()


def step_facts(steps) -> list[tuple]:
    return [(s.worker, s.block.name, s.tokens, s.local_start, s.position, s.slots,
             [(seg.block.name, seg.length, seg.offset) for seg in s.segments]) for s in steps]


@st.composite
def preview_scenarios(draw):
    workers = draw(st.integers(1, 5))
    page_size = draw(st.integers(1, 8))
    worker = st.integers(0, workers - 1)
    plan = st.dictionaries(worker, st.integers(0, 2), min_size=1).map(lambda d: ("plan", d))
    preview = st.lists(worker, unique=True).map(lambda ws: ("preview", ws))
    # a preview of a header (several tokens) for one worker, then a plan of whatever comes
    headed = st.tuples(worker, st.integers(2, 4)).map(lambda wk: ("preview", [wk[0]], {wk[0]: wk[1]}))
    foreseen = st.lists(worker, unique=True, min_size=1).map(lambda ws: ("foreseen", ws))  # a preview come true
    ops = draw(st.lists(st.one_of(plan, preview, headed, foreseen, foreseen, worker.map(lambda w: ("finish", w)),
                                  st.just(("fork", None)), st.just(("drop forks", None))), max_size=40))
    return workers, page_size, ops


@pytest.mark.parametrize("kind", LAYOUTS)
@settings(max_examples=100, deadline=None)
@given(preview_scenarios())
def test_a_plan_that_reuses_a_preview_equals_one_built_afresh(kind, scenario):
    """Two layouts driven alike, one previewing before its plans: every plan hands out the same
    writes, slots and views, whatever happened between the preview and the plan (other
    workers fed, steps finished, pages shared by a fork and copied on write)."""
    workers, page_size, ops = scenario
    alloc_a, alloc_b = PageAllocator(4096, page_size), PageAllocator(4096, page_size)
    a, b = CacheLayout(kind, workers, alloc_a), CacheLayout(kind, workers, alloc_b)
    for lay in (a, b):
        lay.write_shared(lay.common, [1, 2, 3])
        lay.write_shared(lay.hdr_own, [4, 5])
        if workers > 1 and kind != "interleaved":
            lay.write_shared(lay.hdr_others, [6])
    forks, ids = [], itertools.count(100)
    for op, arg, *counts in ops:
        if op == "plan":
            fed = {w: [next(ids) for _ in range(n)] for w, n in arg.items()}
            assert step_facts(a.plan(fed)) == step_facts(b.plan(fed))
            assert a.take_copies() == b.take_copies()
        elif op == "preview":
            a.preview(arg, *counts)
        elif op == "foreseen":
            a.preview(arg)
            fed = {w: [next(ids)] for w in arg}
            assert step_facts(a.plan(fed)) == step_facts(b.plan(fed))
            assert a.take_copies() == b.take_copies()
        elif op == "finish":
            ra, rb = a.finish_step(arg), b.finish_step(arg)
            assert (ra is None) == (rb is None)
            if ra is not None:
                assert (ra.src_slots, ra.dst_slots, ra.delta) == (rb.src_slots, rb.dst_slots, rb.delta)
                a.release(ra)
                b.release(rb)
        elif op == "fork":
            forks.append((a.fork(), b.fork()))
        else:
            for fa, fb in forks:
                fa.close()
                fb.close()
            forks.clear()


def test_a_foreseen_step_takes_the_previewed_views():
    lay = CacheLayout("combined", 3, PageAllocator(64, 8))
    lay.write_shared(lay.common, [1, 2, 3])
    lay.plan({0: [10], 1: [11], 2: [12]})
    foreseen = lay.preview([0, 1, 2])
    steps = lay.plan({0: [20], 1: [21], 2: [22]})
    assert lay.previews_used == 1 and [s.segments for s in steps] == [segs for _, segs in foreseen]
    assert [s.position for s in steps] == [pos for pos, _ in foreseen]
    lay.preview([0, 1, 2])
    lay.plan({0: [30], 1: [31]})  # worker 2 fed nothing: not what was foreseen
    lay.preview([0, 1])
    lay.finish_step(0)  # a block moved since the preview
    lay.plan({0: [40], 1: [41]})
    assert lay.previews_used == 1



def test_a_header_preview_is_not_taken_for_a_one_token_step():
    """A preview of a header (three tokens for worker 0) foresees other views than one token
    each: a plan where worker 0 feeds one token builds its own, the same as a layout that
    never previewed."""
    a, b = (CacheLayout("combined", 2, PageAllocator(64, 8)) for _ in range(2))
    for lay in (a, b):
        lay.write_shared(lay.common, [1, 2, 3])
        lay.plan({0: [10], 1: [11]})
    assert a.preview([0, 1], {0: 3}) is not None
    assert step_facts(a.plan({0: [20], 1: [21]})) == step_facts(b.plan({0: [20], 1: [21]}))
    assert a.previews_used == 0
