"""Errors of the distributed runtime: each names what failed, where, and the fix."""

from __future__ import annotations

from ..errors import HogwildError


class ClusterResourceError(HogwildError, RuntimeError):
    """The cluster cannot hold the shards that were asked for within the wait."""


class ShardFailedError(HogwildError, RuntimeError):
    """A shard's actor died or its loop ended; `ranks` names which."""

    def __init__(self, message: str, ranks: list[int]) -> None:
        super().__init__(message)
        self.ranks = ranks


class ChannelTimeoutError(HogwildError, TimeoutError):
    """No message (shard side) or no acknowledgement (coordinator side) came in time."""

    def __init__(self, message: str, ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.ranks = ranks or []


class ChannelClosedError(HogwildError, EOFError):
    """The coordinator closed the channel: a shard's loop ends cleanly."""


class PayloadTooLargeError(HogwildError, ValueError):
    """A message does not fit the channel's slot."""
