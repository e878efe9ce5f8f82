"""Where sessions' passes run: the Executor seam, carrying any number of sessions per pass."""

from .base import Executor, Foresight, SessionHandle, SessionPass
from .local import PREFILL_CHUNK, LocalExecutor

__all__ = ["PREFILL_CHUNK", "Executor", "Foresight", "LocalExecutor", "SessionHandle", "SessionPass"]
