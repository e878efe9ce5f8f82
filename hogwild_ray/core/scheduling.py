"""Pure logic of continuous batching: prompt chunks per pass, the pages a session may need,
first-come-first-served admission. No torch, no model: the scheduler in hogwild_ray.scheduler
drives sessions with it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Hashable, TypeVar

from ..errors import CacheFullError, check_int

PREFILL_CHUNK = 2048  # prompt tokens written per pass (all admitting sessions together)
HEADROOM_TOKENS = 128  # the headers and the step-opening chunks beside the workers' own tokens


def take_chunks(queue: list[tuple[str, list[int]]], budget: int) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Take at most `budget` tokens from the front of `queue` ((block name, ids) in write order),
    splitting an entry where the budget ends; what was taken, in order. `queue` shrinks."""
    taken = []
    while queue and budget > 0:
        block, ids = queue[0]
        part, rest = ids[:budget], ids[budget:]
        taken.append((block, tuple(part)))
        budget -= len(part)
        if rest:
            queue[0] = (block, rest)
        else:
            queue.pop(0)
    return tuple(taken)


def check_workers(workers: int, pool) -> None:
    """Refuse, before anything is allocated for them, more workers than the cache has pages: each
    needs a page of its own (pool: a PageAllocator, num_pages and page_size are read)."""
    check_int("workers", workers, 1)
    if workers > pool.num_pages:
        raise CacheFullError(
            f"workers={workers:,} cannot fit: every worker needs a page of its own ({pool.page_size} tokens) "
            f"and the cache holds {pool.num_pages:,} pages; use fewer workers (a few to a few dozen is "
            "what Hogwild! inference is made for) or a larger cache_tokens=")


def session_pages(kind: str, workers: int, prompt_tokens: int, max_tokens: int | None, max_context: int,
                  page_size: int, forced_tokens: int = 0) -> int:
    """The most pages a session may hold at once: its prompt, every worker's tokens with their
    step headers, one page of slack per block, and one finished step's pages twice while it
    moves. forced_tokens: what forced-answer forks may add per worker (their prompt and answer).

    Without max_tokens the views bound it: every worker's view is at most max_context tokens,
    and in the combined and contiguous layouts one view holds every worker's tokens."""
    per_worker = max_context if max_tokens is None else min(max_tokens + max_tokens // 4 + 64, max_context)
    tokens = prompt_tokens + HEADROOM_TOKENS + workers * per_worker
    if kind != "interleaved":
        tokens = min(tokens, max_context + HEADROOM_TOKENS + workers * 64)
    blocks = workers + 3
    moving = -(-per_worker // page_size)  # a finished step's old and new pages, for a moment
    forks = 0 if not forced_tokens else blocks + workers * -(-forced_tokens // page_size)
    return -(-tokens // page_size) + blocks + moving + forks


K = TypeVar("K", bound=Hashable)


@dataclass
class Waiting(Generic[K]):
    key: K
    pages: int


class Admission(Generic[K]):
    """First come, first served admission by page reservations.

    Every running session holds a reservation of the pages it may need; the head of the
    queue starts when its reservation fits beside theirs (and a concurrency cap allows), and
    nothing behind it overtakes it, so no request waits for ever: reservations only return.
    A request that could not fit in the whole pool is refused when it arrives."""

    def __init__(self, capacity_pages: int, page_size: int, max_running: int | None = None) -> None:
        self.capacity, self.page_size, self.max_running = capacity_pages, page_size, max_running
        self.queue: deque[Waiting[K]] = deque()
        self.running: dict[K, int] = {}

    @property
    def reserved(self) -> int:
        return sum(self.running.values())

    def submit(self, key: K, pages: int) -> None:
        """Queue a request; CacheFullError when it could never fit."""
        if pages > self.capacity:
            raise CacheFullError(
                f"this request may need {pages} pages ({pages * self.page_size} tokens of K/V) and the cache "
                f"has {self.capacity} pages ({self.capacity * self.page_size} tokens) for it; pass a larger "
                "cache_tokens= to from_pretrained, or lower workers or max_tokens")
        self.queue.append(Waiting(key, pages))

    def head_fits(self, free_pages: int | None = None) -> bool:
        """Whether `admit(free_pages)` would start a request now."""
        if not self.queue or (self.max_running is not None and len(self.running) >= self.max_running):
            return False
        pages = self.queue[0].pages
        return self.reserved + pages <= self.capacity and (free_pages is None or pages <= free_pages)

    def admit(self, free_pages: int | None = None) -> list[K]:
        """The requests that start now, in arrival order. free_pages: what the pool has free
        beyond what the running requests may still take (a bound besides the reservations,
        for pages held elsewhere and for requests that outgrew their reservation)."""
        started = []
        while self.head_fits(free_pages):
            head = self.queue[0]
            if free_pages is not None:
                free_pages -= head.pages
            self.queue.popleft()
            self.running[head.key] = head.pages
            started.append(head.key)
        return started

    def grow(self, key: K, pages: int) -> None:
        """A running request holds more than it reserved: its reservation follows, so later
        requests wait for those pages too."""
        if key in self.running and pages > self.running[key]:
            self.running[key] = pages

    def finish(self, key: K) -> None:
        """A running request ended: its reservation returns."""
        self.running.pop(key, None)

    def drop(self, key: K) -> None:
        """A request leaves, running or waiting."""
        self.running.pop(key, None)
        self.queue = deque(w for w in self.queue if w.key != key)
