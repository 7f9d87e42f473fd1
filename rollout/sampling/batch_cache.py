"""Each step's ``SamplingBatch`` without rebuilding the rows that did not change.

A decode step's rows are usually the sequences of the step before, in the same order: their
temperatures, top-k / top-p / min-p and what follows from them are the same tensors again, and only
the draws (one uniform per row, from its seed and step) and the banned ids are new. The cache keeps
the per-row tensors of the last batch on the device and builds them again (one host-to-device copy)
only when the rows' ``SamplingParams`` are not the very same objects in the same order.
``SamplingParams`` is frozen and the cache holds the objects it compares, so the same object means
the same values.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from rollout.sampling.sampling_batch import SamplingBatch
from rollout.types import SamplingParams


class SamplingBatchCache:
    """Builds a step's ``SamplingBatch`` from its rows' parameters and its draws (already on the device)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._params: list[SamplingParams] = []  # the rows of ``_rows``, held so that identity is meaningful
        self._rows: SamplingBatch | None = None  # their tensors (its draws are not used)
        self.builds = 0  # how many times the per-row tensors were built

    def batch(self, params: Sequence[SamplingParams], uniforms: torch.Tensor,
              banned: Sequence[Sequence[int] | None] | None) -> SamplingBatch:
        """The batch of rows ``params`` with draws ``uniforms`` ((B,) float64 on the device) and
        ``banned`` ids per row (``None`` entries or ``None``: none)."""
        rows = self._rows
        if rows is None or len(params) != len(self._params) or not all(map(operator.is_, params, self._params)):
            n = len(params)
            rows = self._rows = SamplingBatch.build(params, [0] * n, [0] * n, None, self.device)
            self._params = list(params)
            self.builds += 1
        return rows.with_draws(uniforms, banned)

    def clear(self) -> None:
        """Forget the kept rows (their tensors are freed once no step uses them)."""
        self._params, self._rows = [], None
