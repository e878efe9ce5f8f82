"""JSON-lines results that a run appends to and a rerun resumes from: the one reader and the
writers of `batch` and `eval`.

A kill can stop a write anywhere, so whatever follows the last newline is a line cut short:
the reader ignores it, and before a run appends to the file, `resume` cuts it off in place
(one truncate at the end of the last complete line, then fsync). A last line that is a whole
JSON object (a file another tool wrote without a final newline) is a record, and `resume`
adds its newline instead. Finished lines are never
rewritten, so no interruption can lose them, and every append starts on a fresh line, so
records never fuse. A bad line anywhere else is an error naming the file and the line.
Only regular files are read: a device or a FIFO could be read forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import InvalidRequestError
from .output_paths import kind
from .utf8 import decode

FSYNC_SECONDS = 1.0  # appended lines reach the disk at least this often (and on close)


@dataclass(frozen=True)
class Scan:
    """A JSONL file as read: its complete lines' objects as (line number, object), the byte
    where the last complete line ends, and the file's size when read."""

    records: list[tuple[int, dict]]
    end: int
    size: int
    unterminated: bool = False  # the last record is whole but has no newline after it

    @property
    def cut(self) -> bool:
        """Whether the file ends with a line cut short (no newline after it)."""
        return self.size > self.end


def parse_line(raw: bytes, path: str | Path, number: int, fix: str) -> dict | None:
    """The object of one complete line (None for a blank line); else an error naming the line."""
    text = decode(raw, path, number, fix=f"the line is damaged; {fix}")
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"{path}:{number} is not a JSON line ({e.msg}): it was cut short or "
                                  f"damaged; {fix}") from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{path}:{number} is a JSON {type(value).__name__}, not an object; {fix}")
    return value


def scan(path: Path, fix: str) -> Scan:
    """Every complete line of `path` (none when it does not exist); the text after the last
    newline, a line a kill cut short, is left out. `fix`: what to do about a bad line."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block: it is refused below
    except FileNotFoundError:
        return Scan([], 0, 0)
    except OSError as e:
        raise InvalidRequestError(f"{path} cannot be read ({e.strerror}); {fix}") from None
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise InvalidRequestError(f"{path} is a {kind(mode)}, not a regular file; give the path of a file "
                                      "such as results.jsonl")
        records, end, number, tail = [], 0, 0, b""
        for raw in f:
            if not raw.endswith(b"\n"):
                tail = raw  # only the last line can lack its newline
                break
            number += 1
            end += len(raw)
            value = parse_line(raw, path, number, fix)
            if value is not None:
                records.append((number, value))
    whole = _whole_record(tail)
    if whole is not None:  # a complete record that another tool wrote without a final newline: kept
        return Scan([*records, (number + 1, whole)], end + len(tail), end + len(tail), unterminated=True)
    return Scan(records, end, end + len(tail))


def _whole_record(tail: bytes) -> dict | None:
    """The object of a last line without its newline, if it is a whole JSON object (a line a kill cut
    short is not: it lacks at least its closing brace); else None."""
    if not tail.strip():
        return None
    try:
        value = json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def resume(path: Path, fix: str) -> list[tuple[int, dict]]:
    """The records of `path`, which is left ready to append to: a line cut short at its end is
    truncated away in place and the truncation fsync'd (a kill before or after that one call
    leaves every complete line as it was)."""
    seen = scan(path, fix)
    if seen.cut or seen.unterminated:
        try:
            fd = os.open(path, os.O_WRONLY | (os.O_APPEND if seen.unterminated else 0))
            try:
                if os.fstat(fd).st_size != seen.size:
                    raise InvalidRequestError(f"{path} grew while it was read: is another run writing to it? "
                                              "Let that one finish, or write to another file")
                if seen.unterminated:  # the whole last record stays; its newline is added
                    os.write(fd, b"\n")
                else:
                    os.ftruncate(fd, seen.end)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise InvalidRequestError(f"{path} cannot be written ({e.strerror}); {fix}") from None
    return seen.records


def lines_of(records: Iterable[dict[str, Any]]) -> bytes:
    """Records as JSON lines (ASCII: any string, even one that is not valid Unicode, is escaped)."""
    return "".join(json.dumps(r) + "\n" for r in records).encode("ascii")


class Appender:
    """Appends JSON lines to a file that ends on a complete line (after `resume`, or a new one):
    each call's lines go to the file in one write, with no buffer for a kill to lose, and are
    fsync'd at least every `fsync_seconds` and on close. exclusive: the file must be new.
    lock: the file is this run's alone while it is open (an advisory lock, which `in_use` sees);
    another run's Appender with `lock` on it is refused, naming the file."""

    def __init__(self, path: Path, exclusive: bool = False, fsync_seconds: float = FSYNC_SECONDS,
                 lock: bool = False) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | (os.O_EXCL if exclusive else 0)
        self.fd: int | None = os.open(path, flags, 0o666)
        self.path, self.fsync_seconds, self.synced = path, fsync_seconds, time.monotonic()
        if lock:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self.fd)
                self.fd = None
                raise InvalidRequestError(f"{path} is being written by another run: let that one finish, or "
                                          "write to another file") from None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        data = memoryview(lines_of(records))
        while data:  # a short write goes on where it stopped
            data = data[os.write(self.fd, data):]
        if time.monotonic() - self.synced >= self.fsync_seconds:
            self.sync()

    def sync(self) -> None:
        os.fsync(self.fd)
        self.synced = time.monotonic()

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def in_use(path: Path) -> bool:
    """Whether a run holds `path` open with Appender(lock=True) now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing releases the lock, if taken)


@contextlib.contextmanager
def directory_lock(directory: Path) -> Iterator[None]:
    """Holds `directory` for this process alone (an advisory lock on the directory itself, so that
    nothing is left in it); another process waits here until it is let go."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def replace_atomically(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """Write `path` whole through a temporary file, fsync'd, then renamed over it: a kill at
    any moment leaves either the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        data = memoryview(lines_of(records))
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself
    finally:
        os.close(dir_fd)
