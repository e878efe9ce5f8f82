"""Where results may go, checked before anything loads.

An output that is not a regular file is refused: a rerun reads the output back, and a
device such as /dev/full (or a FIFO) never ends. Each check returns why a path cannot be
used, starting with the path, for the caller to put its flag in front (None: it can be used).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def kind(mode: int) -> str:
    """What a file of this st_mode is, in words."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


def file_problem(path: Path) -> str | None:
    """Why `path` cannot be a results file that is read back and appended to (None: it can)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return _parent_problem(path, Path(os.path.dirname(os.path.abspath(path))))
    except OSError as e:
        return f"{path} cannot be used ({e.strerror}); give the path of a file such as results.jsonl"
    if not stat.S_ISREG(mode):
        return f"{path} is a {kind(mode)}, not a regular file; give the path of a file such as results.jsonl"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"{path} is not readable and writable by you; fix its permissions or write to another file"
    return None


def directory_problem(path: Path) -> str | None:
    """Why `path` cannot be an output directory, made if missing (None: it can)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        here = Path(os.path.abspath(path)).parent
        while not here.exists() and here != here.parent:  # the directory it would be made in
            here = here.parent
        return _parent_problem(path, here)
    except OSError as e:
        return f"{path} cannot be used ({e.strerror}); give a directory"
    if not stat.S_ISDIR(mode):
        return f"{path} is a {kind(mode)}; give a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable by you; fix its permissions or give another directory"
    return None


def _parent_problem(path: Path, parent: Path) -> str | None:
    """Why `path` cannot be made in `parent` (None: it can)."""
    if not parent.is_dir():
        return f"{path}: its directory {parent} does not exist; create it (mkdir -p {parent}) or give another path"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{path}: its directory {parent} is not writable by you; give a path in a directory you can write"
    return None
