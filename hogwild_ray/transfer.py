"""Host lists to device tensors without stalling the host.

Copying a Python list to a CUDA tensor the plain way waits for the device to finish
everything queued before it; staged through pinned memory the copy is asynchronous, so
the one host sync of a step stays the sampled tokens.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: list[int] | np.ndarray, device: torch.device, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class HostCopy:
    """A device tensor's values on their way to the host: the copy is queued now and read
    later, so that more work can be queued for the device in between (the read waits for
    this copy only, not for what was queued after it)."""

    def __init__(self, values: torch.Tensor) -> None:
        if values.device.type != "cuda":
            self.host, self.done = values.clone(), None  # (later work may reuse the buffer)
            return
        self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        self.host.copy_(values, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record()

    def tolist(self) -> list:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()


class DeviceFeed:
    """Tokens a pass takes from the previous pass's samples on the device, so that it can be
    launched before those samples reach the host: its input tokens[at[i]] = samples[rows[i]]."""

    def __init__(self, at: list[int], rows: list[int], device: torch.device) -> None:
        self.at, self.rows = to_device(at + rows, device).split([len(at), len(rows)])

    def into(self, samples: torch.Tensor, tokens: torch.Tensor) -> None:
        """Write the fed samples into a pass's input tokens (queued after their copy)."""
        tokens.index_copy_(0, self.at, samples.index_select(0, self.rows).to(tokens.dtype))
