"""A GGUF file's tensors under Hugging Face names, dequantized straight from the mapped file.

Going through transformers (`from_pretrained(gguf_file=...)`) parses the whole metadata, token
strings included, builds a full Hugging Face model and copies every tensor into it: about 12 s
for the built-in model on a busy 2-core machine, against about 1 s here. The result is the same
tensors: the gguf package's own dequantizers, and llama's query/key rows put back in Hugging
Face's rotary order as llama.cpp's converter permuted them (what transformers undoes too).
"""

from __future__ import annotations

import mmap
from math import prod
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import ModelNotFoundError
from .gguf_header import IGNORED, Layout, TensorEntry, hf_name, read_layout

PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp's converter interleaves these q/k rows


def gguf_reader(path: Path, num_heads: int, num_kv_heads: int) -> Callable[[str], torch.Tensor | None]:
    """A function from Hugging Face tensor names to float32 tensors (None when absent); each
    tensor is read and dequantized when asked for, so a rank slicing its part holds one at a time."""
    layout = read_layout(path)
    permuted = layout.meta.get("general.architecture") in PERMUTED_ARCHITECTURES
    by_hf = {hf_name(n): (n, t) for n, t in layout.tensors.items() if n not in IGNORED}
    with path.open("rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def read(name: str) -> torch.Tensor | None:
        if name not in by_hf:
            return None
        gguf_name, entry = by_hf[name]
        values = _dequantize(data, layout, gguf_name, entry, path)
        if permuted and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            values = unpermute_rotary_rows(values, num_heads if ".q_proj." in name else num_kv_heads)
        return torch.from_numpy(np.ascontiguousarray(values))

    return read


def _dequantize(data: mmap.mmap, layout: Layout, name: str, entry: TensorEntry, path: Path) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

    try:
        qtype = GGMLQuantizationType(entry.ggml_type)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ModelNotFoundError(f"tensor {name!r} of {str(path)!r} has GGML type {entry.ggml_type}, which the "
                                 "gguf package does not know; upgrade gguf or convert the file again") from None
    *outer, inner = entry.shape or (1,)
    if inner % block:
        raise ModelNotFoundError(f"tensor {name!r} of {str(path)!r} has rows of {inner} values, not whole "
                                 f"{qtype.name} blocks of {block}; download or convert the file again")
    row_bytes = inner // block * block_bytes
    start, size = layout.data_start + entry.offset, prod(outer) * row_bytes
    if start + size > len(data):
        raise ModelNotFoundError(f"tensor {name!r} of {str(path)!r} runs past the end of the file; the file is "
                                 "cut short: download it again")
    raw = np.frombuffer(data, dtype=np.uint8, count=size, offset=start).reshape(*outer, row_bytes)
    try:
        values = dequantize(raw, qtype)
    except NotImplementedError as e:
        raise ModelNotFoundError(f"tensor {name!r} of {str(path)!r} is {qtype.name}, which the gguf package "
                                 f"cannot dequantize ({e}); convert the file to another type") from None
    values = values.reshape(entry.shape)
    if values.dtype != np.float32 or not values.flags.writeable:  # F32 and F16 come back as views of the file
        values = values.astype(np.float32)
    return values


def unpermute_rotary_rows(weights: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's permutation of a q/k projection: each head's rows go from interleaved
    pairs back to Hugging Face's two halves."""
    half = weights.shape[0] // heads // 2
    return weights.reshape(heads, half, 2, *weights.shape[1:]).swapaxes(2, 1).reshape(weights.shape)
