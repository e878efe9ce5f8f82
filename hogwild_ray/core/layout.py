"""The logical layout of the shared cache: blocks, pages, per-worker views. Pure logic.

A block is a run of tokens whose K/V sit in the pool with keys rotated at block-local
positions 0..len-1. A worker's view is an ordered list of blocks; the position of a
token in a view is the sum of the visible lengths of the blocks before it plus its
block-local position. Layouts (DESIGN §1):

* combined:    [common, hdr_others, cur[o] for o != w, hdr_own, cur[w]];
               a finished step moves from cur[w] to the end of common.
* contiguous:  the same blocks, but nothing moves: cur[w] is w's whole trace.
* interleaved: [common, hdr_own, cur[w]]: only finished steps are shared.

Moving a finished step re-rotates its keys once by the common length (the caller does
the copy, see `Relocation`), so a view always has at most workers + 3 segments and the
per-step work does not grow with the number of finished steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import CacheFullError, InvalidRequestError, check_int

LAYOUTS = ("combined", "contiguous", "interleaved")
SPARE_HEADROOM = 16  # a worker's block takes a spare page only while over 1/16 of the pool is free


class PageAllocator:
    """Free list of fixed-size pages of the K/V pool, with reference counts.

    A page can belong to several sessions (a fork shares every page of its parent); it
    returns to the free list when the last owner releases it.
    """

    def __init__(self, num_pages: int, page_size: int) -> None:
        if num_pages < 1 or page_size < 1:
            raise InvalidRequestError(f"the cache needs >= 1 page of >= 1 token, got {num_pages} x {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._prefix: dict[tuple, int] = {}  # (previous page or None, the page's tokens) -> a full prompt page
        self._prefix_key: dict[int, tuple] = {}
        self.prefix_reused = 0  # prompt pages attached instead of computed, since the start

    def remember(self, previous: int | None, tokens: tuple[int, ...], page: int) -> None:
        """A full page of prompt K/V that a later prompt starting with the same tokens may share
        (previous: the page before it in its block, which pins everything before)."""
        key = (previous, tokens)
        if key not in self._prefix and page not in self._prefix_key:
            self._prefix[key], self._prefix_key[page] = page, key

    def lookup(self, previous: int | None, tokens: tuple[int, ...]) -> int | None:
        """A live page holding exactly these prompt tokens after `previous`, if any."""
        return self._prefix.get((previous, tokens))

    def share(self, pages: list[int]) -> None:
        """One more owner for each of `pages`."""
        for p in pages:
            self._refs[p] += 1

    def is_shared(self, page: int) -> bool:
        return self._refs[page] > 1

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def shared_pages(self) -> int:
        """Pages with more than one owner (forks, shared prompts)."""
        return sum(1 for r in self._refs if r > 1)

    def alloc(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CacheFullError(
                f"the K/V cache is full: {n} more pages of {self.page_size} tokens needed, "
                f"{len(self._free)} of {self.num_pages} free; pass a larger cache_tokens= to "
                "from_pretrained, or lower workers / max_tokens"
            )
        taken, self._free = self._free[len(self._free) - n :], self._free[: len(self._free) - n]
        for p in taken:
            self._refs[p] = 1
        return taken[::-1]

    def release(self, pages: list[int]) -> None:
        """One owner fewer for each of `pages`; pages nobody owns any more are free again."""
        freed = []
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p] == 0:
                freed.append(p)
                key = self._prefix_key.pop(p, None)
                if key is not None:
                    del self._prefix[key]
        self._free.extend(reversed(freed))


@dataclass(eq=False)
class Block:
    """Tokens whose K/V live in `pages`, keys rotated at positions 0..len-1."""

    name: str
    tokens: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def slots(self, start: int, stop: int, page_size: int) -> list[int]:
        """Flat pool slots (page * page_size + offset) of tokens start..stop-1."""
        return [self.pages[i // page_size] * page_size + i % page_size for i in range(start, stop)]


@dataclass(slots=True)
class SegmentView:
    """A block as one worker sees it in one step: a visible prefix at a view offset."""

    block: Block
    length: int
    offset: int

    @property
    def pages(self) -> list[int]:
        """The block's pages (what the attention kernels read as a segment)."""
        return self.block.pages


@dataclass
class WriteStep:
    """Tokens fed into one block in one forward pass, and the view their queries attend."""

    worker: int | None  # None for the shared blocks written at session start
    block: Block
    tokens: list[int]
    local_start: int  # block-local position of the first token
    position: int  # view position of the first token
    slots: list[int]  # pool slots that receive the K/V
    segments: list[SegmentView]

    def flat_view(self) -> list[int]:
        """The flat token ids of this view, the fed tokens included."""
        return [t for s in self.segments for t in s.block.tokens[: s.length]]


@dataclass
class Relocation:
    """Copy K/V from src to dst slots, rotating keys forward by `delta` positions."""

    src_slots: list[int]
    dst_slots: list[int]
    delta: int
    freed_pages: list[int]


class CacheLayout:
    """Blocks and views of one session, for any number of workers >= 1."""

    def __init__(self, kind: str, workers: int, allocator: PageAllocator) -> None:
        if kind not in LAYOUTS:
            raise InvalidRequestError(f"layout must be one of {', '.join(LAYOUTS)}, got {kind!r}")
        check_int("workers", workers, 1)
        self.kind, self.workers, self.allocator = kind, workers, allocator
        self.common = Block("common")
        self.hdr_others = Block("hdr_others")
        self.hdr_own = Block("hdr_own")
        self.cur = [Block(f"cur{w}") for w in range(workers)]
        self._copies: list[tuple[int, int]] = []  # (src page, dst page) K/V copies owed to the pool
        # the last preview (the write count then, its workers, its views): the
        # next plan reuses those views when nothing changed since and each of them feeds one token
        # a preview: (state, workers, each one's view position and segments, its first slot, its token count)
        self._previewed: tuple[int, tuple[int, ...], list[tuple[int, list[SegmentView]]], list[int],
                               tuple[int, ...]] | None = None
        self.previews_used = 0  # plans that took a preview's views
        self._writes = 0  # writes and moved steps so far (see _state)

    def fork(self) -> CacheLayout:
        """A copy of this layout that shares every page (no K/V is copied now).

        Pages are written only by appending, so full pages stay shared for good; the
        partially filled last page of a block is copied by whichever side appends to it
        first (copy on write, see `take_copies`)."""
        twin = CacheLayout(self.kind, self.workers, self.allocator)
        for name in ("common", "hdr_others", "hdr_own"):
            setattr(twin, name, self._share(getattr(self, name)))
        twin.cur = [self._share(b) for b in self.cur]
        return twin

    def _share(self, block: Block) -> Block:
        """The twin's copy of a block: its pages holding tokens are shared (a spare page stays
        this block's: whichever side writes into a page of its own needs no copy)."""
        pages = block.pages[: -(-len(block) // self.page_size)]
        self.allocator.share(pages)
        return Block(block.name, list(block.tokens), list(pages))

    def take_copies(self) -> list[tuple[int, int]]:
        """The page copies (src, dst) that the pool must make before this layout's next
        write; each is handed out once."""
        copies, self._copies = self._copies, []
        return copies

    @property
    def page_size(self) -> int:
        return self.allocator.page_size

    def blocks(self) -> list[Block]:
        return [self.common, self.hdr_others, self.hdr_own, *self.cur]

    def view_blocks(self, w: int) -> list[Block]:
        if self.kind == "interleaved":
            return [self.common, self.hdr_own, self.cur[w]]
        others = [self.cur[o] for o in range(self.workers) if o != w]
        return [self.common, *([self.hdr_others] if others else []), *others, self.hdr_own, self.cur[w]]

    def shared_prefix_blocks(self) -> list[Block]:
        """The constant blocks written at start, in the order they are written."""
        if self.kind == "interleaved" or self.workers == 1:
            return [self.common, self.hdr_own]
        return [self.common, self.hdr_others, self.hdr_own]

    def _append(self, block: Block, tokens: list[int], spare: bool = False) -> tuple[int, list[int]]:
        """Write tokens at the block's end (pages allocated, the partial last page copied if it
        is shared); their slots. spare: a worker's block whose pages are now full takes its
        next page at once, while the pool has room to spare (SPARE_HEADROOM), so that the
        next one-token step needs no page and `preview` can foresee it."""
        self._writes += 1
        start, end = len(block), len(block) + len(tokens)
        if tokens and start % self.page_size and self.allocator.is_shared(block.pages[-1]):
            old, new = block.pages[-1], self.allocator.alloc(1)[0]  # copy on write
            self._copies.append((old, new))
            self.allocator.release([old])
            block.pages[-1] = new
        need = -(-end // self.page_size) - len(block.pages)
        if need > 0:
            block.pages.extend(self.allocator.alloc(need))
        block.tokens.extend(tokens)
        if spare:
            self._take_spare(block)
        return start, block.slots(start, end, self.page_size)

    def _take_spare(self, block: Block) -> None:
        """A block whose pages just filled takes its next page, while the pool has room to spare."""
        end, pool = len(block), self.allocator
        if end % self.page_size == 0 and len(block.pages) * self.page_size == end \
                and pool.free_pages > pool.num_pages // SPARE_HEADROOM:
            block.pages.extend(pool.alloc(1))

    def _write(self, worker: int | None, block: Block, tokens: list[int], context: list[Block]) -> WriteStep:
        lengths = {id(b): len(b) for b in context}
        start, slots = self._append(block, tokens)
        segments, offset = [], 0
        for b in context:
            length = len(b) if b is block else lengths[id(b)]
            if length:
                segments.append(SegmentView(b, length, offset))
            if b is block:
                position = offset + start
            offset += length
        return WriteStep(worker, block, list(tokens), start, position, slots, segments)

    def write_shared(self, block: Block, tokens: list[int]) -> WriteStep | None:
        """Fill a shared constant block; it attends to the shared blocks before it. The prompt
        block first takes the full pages another prompt with the same leading tokens already
        holds (their K/V are the same: keys sit at block-local positions, and a page's content
        depends only on the tokens up to its end); None when nothing is left to compute."""
        order = self.shared_prefix_blocks()
        before = len(block)
        if block is self.common:
            tokens = self._reuse_prompt_pages(tokens)
            if not tokens:
                return None
        step = self._write(None, block, tokens, order[: order.index(block) + 1])
        if block is self.common:
            self._offer_prompt_pages(before)
        return step

    def _reuse_prompt_pages(self, tokens: list[int]) -> list[int]:
        self._writes += 1
        b, ps, pool = self.common, self.page_size, self.allocator
        while len(b) % ps == 0 and len(tokens) >= ps:
            page = pool.lookup(b.pages[-1] if b.pages else None, tuple(tokens[:ps]))
            if page is None:
                break
            pool.share([page])
            pool.prefix_reused += 1
            b.pages.append(page)
            b.tokens.extend(tokens[:ps])
            tokens = tokens[ps:]
        return tokens

    def _offer_prompt_pages(self, before: int) -> None:
        """Every prompt page this write filled up, for later prompts to share."""
        b, ps = self.common, self.page_size
        for i in range(before // ps, len(b) // ps):
            self.allocator.remember(b.pages[i - 1] if i else None, tuple(b.tokens[i * ps:(i + 1) * ps]), b.pages[i])

    def _state(self) -> int:
        """What a worker's view depends on (every block's identity and length) changes only with a
        write or a moved step, which count themselves here."""
        return self._writes

    def plan(self, fed: dict[int, list[int]]) -> list[WriteStep]:
        """Append every worker's fed tokens; each worker sees the others as they were
        before this step (the one-step lag) and its own block causally.

        When the last `preview` foresaw exactly this step (the same workers, one token each,
        no block changed since), its views are used as they are: building them is most of a
        step's host work with many workers, and the preview ran while the device was busy."""
        previewed, self._previewed = self._previewed, None
        feeding = tuple(w for w in sorted(fed) if fed[w])
        if (previewed is not None and previewed[1] == feeding and previewed[4] == (1,) * len(feeding)
                and all(len(fed[w]) == 1 for w in feeding) and previewed[0] == self._state()):
            self.previews_used += 1
            steps = []
            for w, (position, segments), slot in zip(feeding, previewed[2], previewed[3]):
                own, start = self.cur[w], len(self.cur[w])
                if self.allocator.is_shared(own.pages[start // self.page_size]):  # a fork since: copy on write
                    _, slots = self._append(own, fed[w], spare=True)
                else:  # the page the preview found: the token goes to its slot
                    own.tokens.append(fed[w][0])
                    self._writes += 1
                    self._take_spare(own)
                    slots = [slot]
                steps.append(WriteStep(w, own, [fed[w][0]], start, position, slots, segments))
            return steps
        lengths = {id(b): len(b) for b in self.blocks()}
        steps = []
        for w in sorted(fed):
            if not fed[w]:
                continue
            blocks = self.view_blocks(w)
            own = self.cur[w]
            start, slots = self._append(own, fed[w], spare=True)
            segments, offset = [], 0
            for b in blocks:
                length = len(b) if b is own else lengths[id(b)]
                if length:
                    segments.append(SegmentView(b, length, offset))
                offset += length
            steps.append(WriteStep(w, own, list(fed[w]), start, offset - len(own) + start, slots, segments))
        return steps

    def preview(self, workers: list[int], counts: dict[int, int] | None = None
                ) -> list[tuple[int, list[SegmentView]]] | None:
        """What `plan` will hand out if each of `workers` feeds one token next (or counts[w],
        a header after a moved step), changing nothing: each one's view position (of its first
        token) and segments, in plan order. None when a write would need a new page (no spare
        one) or a copy on write (then there is nothing cheap to predict). The next `plan`
        reuses these views if the guess comes true and every worker feeds one token."""
        self._previewed, out, slots, fed = None, [], [], []
        counts = counts or {}
        for w in sorted(workers):
            own, k = self.cur[w], counts.get(w, 1)
            n = len(own)
            for page in range(n // self.page_size, (n + k - 1) // self.page_size + 1):
                if page >= len(own.pages) or self.allocator.is_shared(own.pages[page]):
                    return None
            slots.append(own.pages[n // self.page_size] * self.page_size + n % self.page_size)
            segments, offset = [], 0
            for b in self.view_blocks(w):  # its own block comes last
                length = n + k if b is own else len(b)
                if length:
                    segments.append(SegmentView(b, length, offset))
                offset += length
            out.append((offset - k, segments))
            fed.append(k)
        self._previewed = (self._state(), tuple(sorted(workers)), out, slots, tuple(fed))
        return out

    def foreseen(self, fed: dict[int, list[int]]) -> list[WriteStep] | None:
        """The writes `plan(fed)` will make, changing nothing, when the last `preview` foresaw
        exactly these workers and token counts and nothing changed since: what a pass launched
        ahead of its planning computes (`plan` then checks it found the same). None otherwise."""
        previewed = self._previewed
        feeding = tuple(sorted(fed))
        if (previewed is None or previewed[1] != feeding or previewed[0] != self._state()
                or previewed[4] != tuple(len(fed[w]) for w in feeding) or not all(previewed[4])):
            return None
        steps = []
        for w, (position, segments), first in zip(feeding, previewed[2], previewed[3]):
            own, n = self.cur[w], len(self.cur[w])
            ps = self.page_size
            slots = [first] + [own.pages[i // ps] * ps + i % ps for i in range(n + 1, n + len(fed[w]))]
            steps.append(WriteStep(w, own, list(fed[w]), n, position, slots, segments))
        return steps

    def view_length(self, w: int) -> int:
        return sum(len(b) for b in self.view_blocks(w))

    def view_lengths(self) -> list[int]:
        """Every worker's view length in one pass over the blocks (view_length for each worker
        would sum each of their views: workers x blocks). A combined or contiguous view holds
        every block (but the others' header, for a lone worker)."""
        if self.kind == "interleaved":
            shared = len(self.common) + len(self.hdr_own)
            return [shared + len(cur) for cur in self.cur]
        total = sum(len(b) for b in self.blocks()) - (len(self.hdr_others) if self.workers == 1 else 0)
        return [total] * self.workers

    def finish_step(self, w: int) -> Relocation | None:
        """Move worker w's finished step to the end of common (not in `contiguous`).

        Returns the copy to make; the caller makes it, then calls `release(reloc)`."""
        if self.kind == "contiguous":
            return None
        self._writes += 1
        cur, delta = self.cur[w], len(self.common)
        src = cur.slots(0, len(cur), self.page_size)
        _, dst = self._append(self.common, cur.tokens)
        self.cur[w] = Block(f"cur{w}")
        self._take_spare(self.cur[w])  # its first page now: `preview` can foresee the header it gets next
        return Relocation(src, dst, delta, cur.pages)

    def release(self, reloc: Relocation) -> None:
        self.allocator.release(reloc.freed_pages)

    def close(self) -> None:
        """Give every page back to the allocator."""
        for b in self.blocks():
            self.allocator.release(b.pages)
            b.pages = []
