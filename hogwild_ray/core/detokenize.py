"""Incremental detokenization: a growing token list's text without decoding all of it each time.

Decoding a worker's whole step on every pass costs time that grows with the step. Here
only a window of the last few tokens is decoded: the text of ids[prefix:] minus that of
ids[prefix:read] is what the newest tokens add (both windows start at the same token, so
tokenizers that treat a leading token specially agree with themselves); a window that
ends inside a multi-byte character adds nothing until the character is complete.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class IncrementalText:
    text: str = ""
    prefix: int = 0  # first token of the decode window
    read: int = 0  # tokens whose text is already in `text`

    def update(self, decode: Callable[[list[int]], str], ids: list[int]) -> str:
        """The text of `ids` (which only ever grow), decoding just the new tokens' window
        (decode: a tokenizer's decode of a list of ids)."""
        if len(ids) <= self.read:
            return self.text
        before = decode(ids[self.prefix : self.read]) if self.read > self.prefix else ""
        after = decode(ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(ids)
        return self.text
