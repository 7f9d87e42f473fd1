"""Shadow weights: a second copy of every parameter, written while the live weights keep serving.

A zero-pause update (``rollout.control.weight_swap``) loads the new tensors into the shadow through
the model's own ``weight_loader``s, then the live ``weights`` arena ``adopt``s the shadow's memory
between two steps (``memory_saver``: on CUDA the physical memory moves behind the same addresses).

::

    live arena    [ embed | q k v | o | gate up | down | ... ]   the model's parameters (serving v)
    shadow arena  [ embed'| q'k'v'| o'| gate'up'| down'| ... ]   same offsets (receiving v+1)

The loaders tell their parameters apart by identity (``param is self.bias``), so each module that
owns parameters gets a shallow copy whose parameters are the shadow views: its bound loaders write
into the shadow and share everything else with the live module (tensor-parallel rank, expert
placement). The live model is not touched until the switch.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from memory_saver import Arena
from rollout.models.weights import load_named_weights


class ShadowWeights:
    """Shadow views of every parameter of ``model`` (which lives in ``live``) inside ``arena``."""

    def __init__(self, model: nn.Module, live: Arena, arena: Arena) -> None:
        self.live = live
        self.arena = arena
        self._model = model
        base = live.data.data_ptr()
        twins: dict[int, nn.Parameter] = {}  # id(live parameter) -> its shadow
        self._live: dict[str, nn.Parameter] = {}
        self._twins: dict[str, nn.Parameter] = {}
        for name, p in model.named_parameters():  # tied parameters once
            nbytes = p.numel() * p.element_size()
            offset = p.data_ptr() - base
            if not 0 <= offset <= live.nbytes - nbytes or not p.is_contiguous():
                raise RuntimeError(f"parameter {name} is not a contiguous view of the weights arena")
            view = arena.data[offset:offset + nbytes].view(p.dtype).view(p.shape)
            twins[id(p)] = self._twins[name] = nn.Parameter(view, requires_grad=False)
            self._live[name] = p
        clones: dict[int, nn.Module] = {}
        for module in model.modules():
            if not any(v is not None for v in module._parameters.values()):
                continue
            clone = copy.copy(module)  # shares every attribute but the parameter table
            clone._parameters = {k: None if v is None else twins[id(v)] for k, v in module._parameters.items()}
            clones[id(module)] = clone
        for name, p in self._live.items():
            loader = getattr(p, "weight_loader", None)
            if inspect.ismethod(loader) and id(loader.__self__) in clones:
                loader = loader.__func__.__get__(clones[id(loader.__self__)])
            if loader is not None:
                self._twins[name].weight_loader = loader  # type: ignore[attr-defined]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The shadow parameters under the model's names (what ``load_named_weights`` writes into)."""
        return iter(self._twins.items())

    def fill_from_live(self, skip: Iterable[str] = ()) -> None:
        """Copy the live parameters into their shadows, except ``skip`` (those an update fully rewrites):
        an update that covers part of the weights keeps the rest."""
        skipped = set(skip)
        with torch.no_grad():
            for name, twin in self._twins.items():
                if name not in skipped:
                    twin.data.copy_(self._live[name].data)

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Write checkpoint-named tensors into the shadow (as ``model.load_weights`` does into the live
        parameters); returns our parameter names written completely."""
        model = self._model
        return load_named_weights(self, model.name_map, weights, model.config.num_experts)  # type: ignore[arg-type]

    def switch(self) -> None:
        """Make the shadow the live weights (same addresses) and free the old ones. Nothing may run on
        the device's weights during the call; on failure the live weights are as they were."""
        self.live.adopt(self.arena)

    def drop(self) -> None:
        """Free the shadow without switching."""
        self.arena.close()
