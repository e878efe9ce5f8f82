"""A GGUF file's metadata in milliseconds: the key/value header, tensors never read.

transformers and the gguf package parse the whole header, token strings included, into
Python objects (7-12 s for the built-in model on a busy 2-core machine). Checking a request
against the model (tensor-parallel degree, heads, context) before anything heavy starts
needs only a few numbers, so this walks the header and keeps scalars and array lengths.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelNotFoundError

MAGIC = b"GGUF"
# value type -> struct format of a scalar (8: string, 9: array, handled apart)
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


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


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's data lies: its shape in torch's order, GGML type, offset in the data section."""

    shape: tuple[int, ...]
    ggml_type: int
    offset: int


@dataclass(frozen=True)
class Layout:
    meta: dict[str, object]
    tensors: dict[str, TensorEntry]
    data_start: int  # the data section's offset in the file


def read_header(path: str | Path) -> tuple[dict[str, object], dict[str, tuple[int, ...]]]:
    """The header's keys (scalars and strings as values, arrays as their ArrayLength) and the
    tensors the file holds: name -> shape, in torch's order (GGUF lists the innermost size first)."""
    layout = read_layout(path)
    return layout.meta, {name: t.shape for name, t in layout.tensors.items()}


def read_layout(path: str | Path) -> Layout:
    """The header and where each tensor's bytes lie, without reading them."""
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
            entries: dict[str, TensorEntry] = {}
            for _ in range(tensors):  # name, dims, their sizes, type, offset
                name = cur.string()
                sizes = [cur.take("Q") for _ in range(cur.take("I"))]
                ggml_type, offset = cur.take("I"), cur.take("Q")
                entries[name] = TensorEntry(tuple(reversed(sizes)), ggml_type, offset)
            align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise ValueError(f"general.alignment is {align!r}, not a power of two")
            return Layout(meta, entries, -(-cur.at // align) * align)
    except (struct.error, ValueError, IndexError) as e:
        raise ModelNotFoundError(f"{str(p)!r} has a damaged GGUF header ({e}); download the file again") from e


# llama.cpp's tensor names (the same for every supported family) -> Hugging Face's
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# tensors a GGUF file may hold that transformers does not read: llama3's rope factors (the config has them)
IGNORED = frozenset({"rope_freqs.weight"})


def hf_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor (the GGUF name itself when it has none), so that a
    GGUF file's tensors are checked against the config like a safetensors checkpoint's."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return name
