"""Which device a measurement runs on (torch.device from a name; is it CUDA)."""

from __future__ import annotations

import torch


def as_device(device: torch.device | str | None) -> torch.device | None:
    if device is None:
        return None
    return device if isinstance(device, torch.device) else torch.device(device)


def is_cuda(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda"
