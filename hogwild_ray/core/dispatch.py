"""Which item runs next on a pool of replicas, and what happens to an item whose replica died.

Pure bookkeeping, free of Ray: the pool keeps `window` items in flight (enough for every replica
to stay busy, no fixed split), hands the next one out as soon as one finishes, and puts an item
lost with its replica (the process killed, its node gone) back at the front of the queue, so
that it runs again on whichever replica is alive. Every item finishes exactly once: a result
for an item that is not in flight (a late answer from a replica counted as lost) is refused.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, Hashable, Iterable, TypeVar

from ..errors import HogwildError

K = TypeVar("K", bound=Hashable)


class RetriesExhausted(HogwildError, RuntimeError):
    """An item was lost with its replica more often than allowed (a HogwildError: the CLI shows one line)."""


@dataclass
class Dispatch(Generic[K]):
    """The queue of items, those in flight, and how often each was lost.

    max_attempts: how often one item may start (a first run and its retries) before the run
    stops with RetriesExhausted: an item that kills every replica it lands on is not retried
    for ever."""

    items: Iterable[K]
    window: int
    max_attempts: int = 4
    pending: deque = field(init=False)
    in_flight: set = field(init=False, default_factory=set)
    attempts: dict = field(init=False, default_factory=dict)
    finished: set = field(init=False, default_factory=set)
    retried: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        self.pending = deque(self.items)
        if len(set(self.pending)) != len(self.pending):
            raise ValueError("an item appears twice")

    def next_items(self) -> list[K]:
        """The items to start now: as many as the window has room for."""
        out = []
        while self.pending and len(self.in_flight) < self.window:
            key = self.pending.popleft()
            self.in_flight.add(key)
            self.attempts[key] = self.attempts.get(key, 0) + 1
            out.append(key)
        return out

    def finish(self, key: K) -> bool:
        """`key` gave its result; False (ignore the result) when it is not in flight."""
        if key not in self.in_flight:
            return False
        self.in_flight.remove(key)
        self.finished.add(key)
        return True

    def lose(self, key: K, why: str = "its replica died") -> None:
        """`key`'s replica died before it finished: it goes back to the front of the queue.
        RetriesExhausted once it has started max_attempts times."""
        if key not in self.in_flight:
            return
        self.in_flight.remove(key)
        if self.attempts[key] >= self.max_attempts:
            raise RetriesExhausted(
                f"item {key!r} was lost {self.attempts[key]} times ({why}); stopping rather than losing more replicas "
                "to it: check the replicas' logs (`ray logs`) and the nodes' memory and GPUs, or run fewer "
                "--replicas or a lower --max-concurrent")
        self.pending.appendleft(key)
        self.retried += 1

    @property
    def done(self) -> bool:
        return not self.pending and not self.in_flight
