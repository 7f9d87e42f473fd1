"""When the layers use the fused kernels of ``kernels.fused`` instead of their torch formulations.

``ROLLOUT_FUSED_OPS``: ``1`` (default) fuses on CUDA tensors; ``0`` never (to compare the two paths
on a GPU); ``all`` on any device, which on CPU means Triton's interpreter (``TRITON_INTERPRET=1``),
for tests of the fused path without a GPU. The torch ops are the kernels' reference.
"""

from __future__ import annotations

import os

import torch

MODE = os.environ.get("ROLLOUT_FUSED_OPS", "1").strip().lower()


def use_fused(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` take the fused Triton kernels."""
    if MODE in ("0", "false", "off", "no"):
        return False
    return x.is_cuda or MODE == "all"
