"""The paged K/V pool on a device: one preallocated tensor pair for all layers."""

from __future__ import annotations

import torch
from hogwild_kernels import rotate_keys_by

from .core.layout import Relocation
from .transfer import to_device


class KVPool:
    """k, v: [layers, pages + 1, page_size, kv_heads, head_dim]; slots index pages * page_size.

    The last page is scratch, never handed out: a captured pass padded to its graph's size
    writes its padding tokens' K/V there (`scratch_slot`), where no view reads them."""

    def __init__(
        self, layers: int, pages: int, page_size: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (layers, pages + 1, page_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.page_size = page_size
        self.scratch_slot = pages * page_size

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(t.shape[0], -1, t.shape[3], t.shape[4])

    def relocate(self, reloc: Relocation, inv_freq: torch.Tensor) -> None:
        """Move a finished step: keys rotated forward by reloc.delta, values copied."""
        if not reloc.src_slots:
            return
        src, dst = to_device(reloc.src_slots + reloc.dst_slots, self.k.device).split(len(reloc.src_slots))
        k, v = self._flat(self.k), self._flat(self.v)
        k[:, dst] = rotate_keys_by(k[:, src], reloc.delta, inv_freq)
        v[:, dst] = v[:, src]

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole pages (src, dst) in every layer: a forked layout's copy on write."""
        if not copies:
            return
        src, dst = to_device([c[0] for c in copies] + [c[1] for c in copies], self.k.device).split(len(copies))
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
