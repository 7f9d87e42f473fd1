"""Which device the engine runs on."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """The engine's device with its index: ``"cuda"`` means the current CUDA device when it is built.

    Other threads (the engine loop) make this device current before running kernels, which needs
    an explicit index.
    """
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
