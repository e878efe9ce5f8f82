"""A shard without a model: answers each step from the message alone.

It runs the same loop a model shard runs (connect once, recv, work, reply, until the
channel closes), so tests and benchmarks measure the control path by itself.
"""

from __future__ import annotations

import time
from typing import Any

from .channel import ShmSpec, SocketSpec, connect
from .errors import ChannelClosedError, ChannelTimeoutError


class EchoShard:
    """Rank 0 replies with the sum of the fed token ids; `hang_at`/`fail_at` = (rank, step) stall or fail a loop."""

    def __init__(self, hang_at: tuple[int, int] | None = None, fail_at: tuple[int, int] | None = None) -> None:
        self.hang_at, self.fail_at = hang_at, fail_at

    def run_loop(self, spec: ShmSpec | SocketSpec, rank: int) -> int:
        """Serve steps until the channel closes; the number of steps served."""
        ch, steps = connect(spec, rank), 0
        try:
            while True:
                try:
                    msg: dict[str, Any] = ch.recv(timeout=1.0)
                except ChannelTimeoutError:
                    continue
                except ChannelClosedError:
                    return steps
                if (rank, msg.get("step")) == self.hang_at:
                    time.sleep(3600)
                if (rank, msg.get("step")) == self.fail_at:
                    raise RuntimeError(f"rank {rank} failed on purpose at step {msg['step']}")
                fed = msg.get("fed", {})
                ch.reply({"step": msg.get("step"), "sum": sum(sum(ids) for ids in fed.values())})
                steps += 1
        finally:
            ch.close()
