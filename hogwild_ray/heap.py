"""Keep Python's cyclic garbage collector off the passes of a long run.

A full collection walks every tracked object of the process: once torch and transformers
are imported, some 350 thousand, about 0.15 s on a 2-core CPU. A run of many sessions
promotes enough short-lived objects (each pass's steps and views) to set one off every
hundred or so passes, and that pass waits for it (32 sessions x 4 workers: 1.5-1.8 ms a
pass on average, all of it in 0.15 s stalls). While a run goes on, the objects that were
alive when it began are frozen (`gc.freeze`: collections skip them); when the last run
ends they are put back, so garbage among them is collected as before. A process that froze
its heap itself is left as it is.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_runs = 0  # runs going on now, on any thread
_frozen_here = False  # whether the first of them froze the heap (and the last must put it back)


@contextmanager
def settled() -> Iterator[None]:
    """Around a run of passes: the objects alive at its start are out of the collector's way."""
    global _runs, _frozen_here
    with _lock:
        if _runs == 0:
            _frozen_here = gc.get_freeze_count() == 0
            if _frozen_here:
                gc.freeze()
        _runs += 1
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0 and _frozen_here:
                gc.unfreeze()
                _frozen_here = False
