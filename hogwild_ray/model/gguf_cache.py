"""A GGUF file's config and tokenizer, kept as Hugging Face files after the first read.

transformers reads each of them by parsing the file's whole metadata (every vocabulary string):
seconds each for the built-in model, on every start. Saved once under $HOGWILD_CACHE (default
~/.cache/hogwild-ray), keyed by the file's resolved path, size and modification time and the
transformers version, they load in a fraction of a second. An entry is written to a temporary
directory and renamed into place, so a kill never leaves half of one; a cache that cannot be
written (or HOGWILD_CACHE=none) is skipped, and a damaged entry is read from the file again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

DONE = "complete"  # written last: an entry without it is ignored


def cache_root() -> Path | None:
    """Where entries live; None when caching is off."""
    value = os.environ.get("HOGWILD_CACHE")
    if value is not None and value.strip().lower() in ("", "none", "off", "0"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hogwild-ray"


def entry(gguf: Path, kind: str) -> Path | None:
    """The directory of `kind` ("config" or "tokenizer") for this file as it is now."""
    import transformers

    root = cache_root()
    if root is None:
        return None
    try:
        real = gguf.resolve()
        st = real.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{real}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()
    return root / "gguf" / f"{key[:24]}-{kind}"


def cached(gguf: Path, kind: str, parse: Callable[[], Any], reload: Callable[[Path], Any]) -> Any:
    """reload(entry) when a complete entry exists; else parse() (an object with save_pretrained),
    saved as the entry for next time."""
    where = entry(gguf, kind)
    if where is not None and (where / DONE).is_file():
        try:
            return reload(where)
        except Exception:  # damaged or from another version: read the file again and replace it
            pass
    value = parse()
    if where is not None:
        store(where, value)
    return value


def store(where: Path, value: Any) -> None:
    """Save `value` at `where` all at once (a temporary directory renamed into place), or not at all."""
    tmp: Path | None = None
    old: Path | None = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=where.parent, prefix=".partial-"))
        value.save_pretrained(str(tmp))
        (tmp / DONE).write_text("")
        if where.exists():  # moved aside whole: another process reading it never sees it half deleted
            old = Path(tempfile.mkdtemp(dir=where.parent, prefix=".partial-"))
            os.rename(where, old / "entry")
        os.rename(tmp, where)
        tmp = None
    except OSError:  # read-only, full, or another process put its entry there first
        pass
    finally:
        for d in (tmp, old):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
