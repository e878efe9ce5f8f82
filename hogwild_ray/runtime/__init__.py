"""The distributed runtime: shard actors in a placement group, fed through a step channel."""

from .channel import ShmChannel, SocketChannel, StepChannel, connect
from .errors import (
    ChannelClosedError, ChannelTimeoutError, ClusterResourceError, CoordinatorFailedError, PayloadTooLargeError,
    ShardFailedError,
)
from .placement import release, reserve
from .supervisor import ShardGroup

__all__ = [
    "ChannelClosedError", "ChannelTimeoutError", "ClusterResourceError", "CoordinatorFailedError",
    "PayloadTooLargeError", "ShardFailedError",
    "ShardGroup", "ShmChannel", "SocketChannel", "StepChannel", "connect", "release", "reserve",
]
