"""Text that must be UTF-8: a file's bytes, a command-line argument, a string from JSON.

Python lets such text through until something far away encodes it (the tokenizer, after the
model has loaded) and fails with a traceback: a file with a bad byte fails when read as
UTF-8, a command-line argument keeps its bad bytes as surrogates (U+DC80-U+DCFF), and a JSON
string may hold a lone surrogate escape ("\\ud800"). These checks name where the bad text is,
so the error comes first, as one line.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidRequestError


def decode(data: bytes, path: str | Path, first_line: int = 1, fix: str = "save it as UTF-8 text") -> str:
    """`data` (the bytes of `path` from line `first_line` on) as text; else an error naming the
    file and the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        raise InvalidRequestError(f"{path}:{line} is not UTF-8 text (byte 0x{data[e.start]:02x}); {fix}") from None


def input_lines(text: str) -> list[str]:
    """The lines of a JSON-lines input file's text: split at newlines only (JSON writers leave
    U+2028, U+2029 and U+0085 raw inside strings, where str.splitlines would cut a line), and a
    byte-order mark at the start (as Windows editors write) dropped."""
    return text.removeprefix("\ufeff").split("\n")


def bad_character(text: str) -> str | None:
    """What in `text` cannot be written as UTF-8, in words (None: all of it can)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate \\u{code:04x}"
        return f"{what} at character {e.start}"
    return None


def check_text(text: str, what: str) -> None:
    """An error naming `what` when `text` cannot be written as UTF-8."""
    bad = bad_character(text)
    if bad is not None:
        raise InvalidRequestError(f"{what} is not valid UTF-8 text ({bad}); give it as UTF-8")
