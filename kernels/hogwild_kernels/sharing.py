"""Stretches of different blocks that are the same pages: what a pass reads once for all.

Sessions whose prompts begin with the same tokens share those prompt pages, and a fork
shares every page of its parent until one side writes; to the plan they are different
blocks, yet at the same page index they hold the same K/V (keys sit at block-local
positions, so a page's content does not depend on who reads it). A *run* is a stretch of
page indexes [first, stop) over which a set of blocks has the same page at every index;
the plan makes it one item read by all of them, and each block's own item starts where
its last run stops. Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Run:
    first: int  # first page index of the stretch
    stop: int  # one past its last page index
    readers: tuple[int, ...]  # the blocks (indexes into the input) that hold these pages


def shared_runs(blocks: list[tuple[np.ndarray, int]]) -> tuple[list[Run], list[int]]:
    """blocks: each one's page ids and how many of its leading pages this pass reads.

    Returns the runs (each page of a block in at most one run, runs in order along it) and,
    per block, the first page index that no run covers (its own part starts there)."""
    own = [0] * len(blocks)
    firsts = np.fromiter((pages[0] if used > 0 else -1 - b for b, (pages, used) in enumerate(blocks)),
                         dtype=np.int64, count=len(blocks))
    _, which, count = np.unique(firsts, return_inverse=True, return_counts=True)
    by_first: dict[int, list[int]] = {}
    for b in np.flatnonzero(count[which] > 1).tolist():  # blocks whose first page another one has
        by_first.setdefault(int(firsts[b]), []).append(b)
    todo = [(0, readers) for readers in by_first.values() if len(readers) > 1]
    runs = []
    while todo:
        first, readers = todo.pop()
        stop = min(blocks[b][1] for b in readers)
        pages = np.stack([blocks[b][0][first:stop] for b in readers])
        same = (pages == pages[0]).all(axis=0)  # same[0] holds: the readers agree at `first`
        end = first + (len(same) if same.all() else int(np.argmin(same)))
        runs.append(Run(first, end, tuple(readers)))
        after: dict[int, list[int]] = {}
        for b in readers:
            own[b] = end
            if blocks[b][1] > end:
                after.setdefault(int(blocks[b][0][end]), []).append(b)
        todo.extend((end, group) for group in after.values() if len(group) > 1)
    return runs, own
