"""Errors of the distributed runtime: each names what failed, where, and the fix."""

from __future__ import annotations

from ..errors import HogwildError


class ClusterResourceError(HogwildError, RuntimeError):
    """The cluster cannot hold the shards that were asked for within the wait."""


class _RankError(HogwildError):
    """An error about some ranks; pickles with them (it crosses from the coordinator to the driver)."""

    def __init__(self, message: str, ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.ranks = list(ranks or [])

    def __reduce__(self):
        return type(self), (str(self), self.ranks)


class ShardFailedError(_RankError, RuntimeError):
    """A shard's actor died or its loop ended; `ranks` names which."""


class ChannelTimeoutError(_RankError, TimeoutError):
    """No message (shard side) or no acknowledgement (coordinator side) came in time."""


class ChannelClosedError(HogwildError, EOFError):
    """The coordinator closed the channel: a shard's loop ends cleanly."""


class PayloadTooLargeError(HogwildError, ValueError):
    """A message does not fit the channel's slot."""


class CoordinatorFailedError(HogwildError, RuntimeError):
    """The coordinator actor died or stopped answering; the engine is closed."""
