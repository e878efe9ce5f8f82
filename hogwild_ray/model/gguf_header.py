"""A GGUF file's metadata in milliseconds: the key/value header, tensors never read.

transformers and the gguf package parse the whole header, token strings included, into
Python objects (7-12 s for the built-in model on a busy 2-core machine). Checking a request
against the model (tensor-parallel degree, heads, context) before anything heavy starts
needs only a few numbers, so this walks the header and keeps scalars and array lengths.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

from ..errors import ModelNotFoundError

MAGIC = b"GGUF"
# value type -> struct format of a scalar (8: string, 9: array, handled apart)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.at = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.at)[0]
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.take("Q")
        text = bytes(self.buf[self.at:self.at + n]).decode("utf-8", errors="replace")
        self.at += n
        return text

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            self.at += 8 + struct.unpack_from("<Q", self.buf, self.at)[0]

    def value(self, vtype: int):
        if vtype in SCALARS:
            return self.take(SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("I"), self.take("Q")
            if etype == STRING:
                self.skip_strings(count)
            elif etype in SCALARS:
                self.at += count * struct.calcsize(SCALARS[etype])
            else:  # nested arrays: walk them
                for _ in range(count):
                    self.value(etype)
            return ArrayLength(count)
        raise ValueError(f"unknown GGUF value type {vtype}")


class ArrayLength(int):
    """An array's length, standing in for the array (its items are skipped)."""


def read_header(path: str | Path) -> tuple[dict[str, object], list[str]]:
    """The header's keys (scalars and strings as values, arrays as their ArrayLength) and the
    names of the tensors the file holds."""
    p = Path(path)
    try:
        with p.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != MAGIC:
                raise ModelNotFoundError(f"{str(p)!r} is not a GGUF file (it does not start with 'GGUF')")
            cur = _Cursor(buf)
            cur.at = 4
            version = cur.take("I")
            if version not in (2, 3):
                raise ModelNotFoundError(f"{str(p)!r} is GGUF version {version}; versions 2 and 3 are read")
            tensors, keys = cur.take("Q"), cur.take("Q")
            meta: dict[str, object] = {}
            for _ in range(keys):
                key = cur.string()
                meta[key] = cur.value(cur.take("I"))
            names = []
            for _ in range(tensors):  # name, dims, their sizes, type, offset
                names.append(cur.string())
                dims = cur.take("I")
                cur.at += 8 * dims + 4 + 8
            return meta, names
    except (struct.error, ValueError, IndexError) as e:
        raise ModelNotFoundError(f"{str(p)!r} has a damaged GGUF header ({e}); download the file again") from e
