"""Checking a weight update against the model before anything is written.

A copy of the model built on the meta device (no memory) runs the very same ``load_weights`` path
on meta tensors: unknown names and wrong shapes raise exactly as a real load would, and the set of
parameters the update covers completely comes out, all without touching the real weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from rollout.config import ModelConfig
from rollout.errors import InvalidArgumentError
from rollout.models.registry import build_model


class UpdateChecker:
    """Validates ``(name, dtype, shape)`` triples of an update against the engine's model."""

    def __init__(self, model_config: ModelConfig, dtype: torch.dtype,
                 build: Callable[[], nn.Module] | None = None) -> None:
        """``build``: makes the model on the meta device (None: the registry's model for ``model_config``)."""
        self._config = model_config
        self._dtype = dtype
        self._build = build
        self._meta: nn.Module | None = None
        self._param_names: frozenset[str] | None = None
        # The last layout that passed and what it covers: a trainer pushes the same layout every step.
        self._last: tuple[tuple, frozenset[str]] | None = None

    @property
    def meta_model(self) -> nn.Module:
        if self._meta is None:  # built on first use: engines that never take updates never pay for it
            self._meta = self._build() if self._build is not None else build_model(self._config, self._dtype, "meta")
        return self._meta

    @property
    def param_names(self) -> frozenset[str]:
        """Our parameter names (tied parameters once); a full update covers all of them."""
        if self._param_names is None:
            self._param_names = frozenset(name for name, _ in self.meta_model.named_parameters())
        return self._param_names

    def check(self, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> frozenset[str]:
        """Raise ``InvalidArgumentError`` naming the first bad tensor; else the parameters fully covered.

        Any floating-point dtype is accepted (the in-place copy converts it to the model's dtype);
        other dtypes are rejected.
        """
        key = tuple((name, dtype, tuple(shape)) for name, dtype, shape in tensors)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        metas = []
        for name, dtype, shape in key:
            if not dtype.is_floating_point:
                raise InvalidArgumentError(
                    f"dtype {str(dtype).removeprefix('torch.')} is not a floating-point weight dtype", field=name
                )
            try:
                metas.append((name, torch.empty(shape, dtype=dtype, device="meta")))
            except RuntimeError as e:  # a negative dimension, or more elements than a tensor can hold
                raise InvalidArgumentError(f"shape {list(shape)} is not a tensor shape ({e})", field=name) from e
        covered = frozenset(self.meta_model.load_weights(metas))
        self._last = (key, covered)
        return covered
