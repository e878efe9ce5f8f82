"""Attention kernels for hogwild-ray: a torch reference (and, on GPUs, Triton)."""

from .backends import PassMeta, TorchAttention, TritonAttention, make_attention
from .reference import QueryGroup, Segment, concurrent_attention_reference, gather_segment
from .rope import apply_rope, rope_cos_sin, rotate_keys_by

__all__ = [
    "PassMeta",
    "TorchAttention",
    "TritonAttention",
    "make_attention",
    "QueryGroup",
    "Segment",
    "apply_rope",
    "concurrent_attention_reference",
    "gather_segment",
    "rope_cos_sin",
    "rotate_keys_by",
]
