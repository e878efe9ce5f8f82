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
