"""Weight updates of the draft model or head (speculative methods "draft", "eagle"): the tensors named
``draft.<name>``.

Any update may carry the draft's tensors beside the target's: ``draft.<name>`` is the draft
checkpoint's ``<name>`` (``draft.model.norm.weight`` -> the draft's ``model.norm.weight``; an EAGLE
head's names as in its checkpoint, ``draft.fc.weight``, ``draft.layers.0.self_attn.q_proj.weight``);
every other name is the target's, as before. A head that shares the target's embedding or LM head
has no ``draft.`` name for them: the target's updates change them.

- Group pushes and shared-memory / CUDA IPC tensors: the names as sent.
- Disk (``update_weights_from_disk(path)``): the ``draft.``-prefixed keys of the checkpoint at
  ``path``, and every tensor of the checkpoint in its subdirectory ``path/draft/`` when there is one
  (a draft model's own HF directory, copied or linked there).

The draft's tensors are checked with the target's before anything is written (a meta copy of the
draft model runs its ``load_weights``, as ``weight_checks`` does for the target): a bad draft name,
shape or dtype rejects the whole update, and ``draft.`` names on an engine without a draft model
are rejected with INVALID_ARGUMENT. Nothing is written then.

An update that carries draft tensors makes the draft current with its version, so drafting goes
on under ``on_stale_weights="disable"``; an update of the target only leaves the draft at its
version, stale once the target's moved on (``rollout.spec.speculator``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import torch

from rollout.control.checkpoint_specs import checkpoint_specs
from rollout.control.weight_checks import UpdateChecker
from rollout.errors import InvalidArgumentError, quoted
from rollout.models.loader import iter_checkpoint
from rollout.models.weights import CheckpointNameMap, WeightWriter

if TYPE_CHECKING:
    from rollout.spec.drafting import Drafter

DRAFT_PREFIX = "draft."
DRAFT_SUBDIR = "draft"  # a disk update's draft checkpoint: <model_path>/draft/

Spec = tuple[str, torch.dtype, tuple[int, ...]]
Named = tuple[str, torch.Tensor]


def split_specs(specs: Iterable[Spec]) -> tuple[list[Spec], list[Spec]]:
    """The target's ``(name, dtype, shape)`` and the draft's (their names without ``draft.``)."""
    target: list[Spec] = []
    draft: list[Spec] = []
    for name, dtype, shape in specs:
        if name.startswith(DRAFT_PREFIX):
            draft.append((name[len(DRAFT_PREFIX):], dtype, shape))
        else:
            target.append((name, dtype, shape))
    return target, draft


def no_draft_model(name: str) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"names starting with {DRAFT_PREFIX!r} are the draft model's, and this engine has no draft model "
        "(speculative_method 'draft' or 'eagle' with a draft_model_path); nothing was written", field=name)


def route(named: Iterable[Named], put: Callable[[str, torch.Tensor], None] | None) -> Iterator[Named]:
    """The target's tensors of ``named``; each draft tensor goes to ``put`` (its name without the
    prefix) as it comes, so a stream whose views are valid only until the next item is read once."""
    for name, tensor in named:
        if not name.startswith(DRAFT_PREFIX):
            yield name, tensor
        elif put is None:  # the check refused these before; a guard, not a path
            raise no_draft_model(name)
        else:
            put(name[len(DRAFT_PREFIX):], tensor)


def _draft_dir(model_path: str) -> str | None:
    path = os.path.join(model_path, DRAFT_SUBDIR)
    return path if os.path.isdir(path) else None


def update_checkpoint_specs(model_path: str) -> list[Spec]:
    """``(name, dtype, shape)`` of a disk update: the checkpoint's, then its ``draft/`` one's as ``draft.``."""
    specs = checkpoint_specs(model_path)
    sub = _draft_dir(model_path)
    if sub is not None:
        specs += [(DRAFT_PREFIX + n, d, s) for n, d, s in checkpoint_specs(sub)]
    return specs


def iter_update_checkpoint(model_path: str) -> Iterator[Named]:
    """The tensors of a disk update, in the order of ``update_checkpoint_specs``."""
    sub = _draft_dir(model_path)
    if sub is None:
        return iter_checkpoint(model_path)
    draft = ((DRAFT_PREFIX + n, t) for n, t in iter_checkpoint(sub))
    return itertools.chain(iter_checkpoint(model_path), draft)


class DraftWeights:
    """The draft model (or EAGLE head) as the destination of an update's ``draft.`` tensors."""

    def __init__(self, draft: Drafter) -> None:
        self._draft = draft
        self._checker = UpdateChecker(draft.model_config, draft.runner.dtype, build=draft.build_meta)

    def check(self, specs: list[Spec]) -> None:
        """Raise ``InvalidArgumentError`` (naming the tensor as sent, ``draft.`` included) unless
        every draft tensor fits the draft model."""
        try:
            self._checker.check(specs)
        except InvalidArgumentError as e:
            if e.field != "weights":
                raise InvalidArgumentError(f"(draft model) {e.reason}", field=DRAFT_PREFIX + str(e.field)) from None
            name_map = self._checker.meta_model.name_map
            unknown = [DRAFT_PREFIX + n for n, _, _ in specs if not _known(name_map, n)]
            shown = ", ".join(quoted(n) for n in unknown[:10]) + (
                f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise InvalidArgumentError(f"unexpected draft model keys: {shown}", field="weights") from None

    def writer(self) -> WeightWriter:
        """Writes checkpoint-named tensors into the live draft model, one at a time."""
        model = self._draft.runner.model
        return WeightWriter(model, model.name_map, self._draft.model_config.num_experts)

    def copy(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` on the draft's device (a swap keeps the draft's tensors until the switch)."""
        return tensor.to(self._draft.runner.device, copy=True)

    def loaded(self, version: int) -> None:
        """New draft weights were written by the update that made ``version`` current: the draft goes
        with it, and the draft KV computed with the old weights is dropped."""
        self._draft.weight_version = version
        self._draft.kv.forget_all()

    def spoiled(self) -> None:
        """Some draft tensors were written, then the update failed: the draft goes with no version
        (stale under ``on_stale_weights="disable"`` until a push carries its weights)."""
        self._draft.weight_version = None
        self._draft.kv.forget_all()


def _known(name_map: CheckpointNameMap, name: str) -> bool:
    try:
        name_map.target(name)
    except InvalidArgumentError:
        return False
    return True
