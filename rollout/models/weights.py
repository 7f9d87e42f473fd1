"""Mapping Hugging Face checkpoint names onto our (fused) parameters, and the in-place load loop.

Checkpoints store q/k/v, gate/up and every expert as separate tensors; our layers fuse them. The
``StackedRule`` table says which checkpoint module fills which slice of which fused parameter; the
expert pattern does the same for per-expert tensors. Both the legacy per-expert layout
(``mlp.experts.{e}.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``) and
transformers 5's fused layout (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``) load, and so
do our own parameter names (the whole fused tensor at once).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from rollout.errors import InvalidArgumentError, quoted


@dataclass(frozen=True, slots=True)
class StackedRule:
    """Checkpoint module ``ckpt`` is shard ``shard_id`` of our fused module ``ours``."""

    ours: str  # e.g. "qkv_proj"
    ckpt: str  # e.g. "q_proj"
    shard_id: str | int


DENSE_STACKED_RULES: tuple[StackedRule, ...] = (
    StackedRule("qkv_proj", "q_proj", "q"),
    StackedRule("qkv_proj", "k_proj", "k"),
    StackedRule("qkv_proj", "v_proj", "v"),
    StackedRule("gate_up_proj", "gate_proj", 0),
    StackedRule("gate_up_proj", "up_proj", 1),
)

# Per-expert checkpoint leaf -> (our stacked parameter, shard id of FusedMoE.weight_loader).
EXPERT_LEAVES: dict[str, tuple[str, str]] = {
    "gate_proj": ("w13", "w1"),
    "up_proj": ("w13", "w3"),
    "down_proj": ("w2", "w2"),
    "w1": ("w13", "w1"),
    "w3": ("w13", "w3"),
    "w2": ("w2", "w2"),
}
_EXPERT_RE = re.compile(r"^(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED_EXPERT_RE = re.compile(r"^(.*)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_IGNORED_RE = re.compile(r"rotary_emb\.inv_freq$")
TIED_HEAD = "lm_head.weight"
TIED_EMBEDDING = "model.embed_tokens.weight"


@dataclass(frozen=True, slots=True)
class WeightTarget:
    """Where one checkpoint tensor goes: our parameter and the slice of it (None: all of it)."""

    param_name: str
    shard_id: str | int | None = None
    expert_id: int | None = None


class CheckpointNameMap:
    """Checkpoint name -> ``WeightTarget`` (or None for names that are skipped)."""

    def __init__(
        self, param_names: Iterable[str], tied_lm_head: bool, expert_style: str | None = None
    ) -> None:
        # expert_style: None (dense), "qwen3_moe" (mlp.experts.{e}.gate_proj) or "mixtral"
        # (block_sparse_moe.experts.{e}.w1); only used to name the expected checkpoint keys.
        self.param_names = frozenset(param_names)
        self.tied_lm_head = tied_lm_head
        self.expert_style = expert_style

    def is_tied_head(self, name: str) -> bool:
        """``name`` is the LM head of a model whose head is its input embedding (one tensor)."""
        return self.tied_lm_head and name == TIED_HEAD

    def target(self, name: str) -> WeightTarget | None:
        """Our destination of checkpoint tensor ``name``; raises for names we do not know. A tied LM
        head has none of its own: ``WeightWriter`` writes it into the embedding when that is absent."""
        if _IGNORED_RE.search(name) or self.is_tied_head(name):
            return None
        if name in self.param_names:
            return WeightTarget(name)
        m = _EXPERT_RE.match(name)
        if m and m.group(3) in EXPERT_LEAVES:
            ours, shard = EXPERT_LEAVES[m.group(3)]
            return self._known(WeightTarget(f"{m.group(1)}.mlp.experts.{ours}", shard, int(m.group(2))), name)
        m = _FUSED_EXPERT_RE.match(name)
        if m:
            ours = "w13" if m.group(2) == "gate_up_proj" else "w2"
            return self._known(WeightTarget(f"{m.group(1)}.mlp.experts.{ours}"), name)
        renamed = name.replace(".block_sparse_moe.", ".mlp.")
        if renamed in self.param_names:
            return WeightTarget(renamed)
        for rule in DENSE_STACKED_RULES:
            dotted = f".{rule.ckpt}."
            if dotted in renamed:
                return self._known(
                    WeightTarget(renamed.replace(dotted, f".{rule.ours}."), rule.shard_id), name
                )
        raise InvalidArgumentError("unexpected checkpoint key", field=name)

    def _known(self, target: WeightTarget, name: str) -> WeightTarget:
        if target.param_name not in self.param_names:
            raise InvalidArgumentError("unexpected checkpoint key", field=name)
        return target

    def checkpoint_names(self, param_name: str, num_experts: int = 0) -> list[str]:
        """The legacy-layout checkpoint keys that together fill our parameter ``param_name``."""
        for ours, leaves in (
            ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
            ("gate_up_proj", ("gate_proj", "up_proj")),
        ):
            if f".{ours}." in param_name:
                return [param_name.replace(f".{ours}.", f".{leaf}.") for leaf in leaves]
        m = re.match(r"^(.*)\.mlp\.experts\.(w13|w2)$", param_name)
        if m:
            mixtral = self.expert_style == "mixtral"
            block = "block_sparse_moe" if mixtral else "mlp"
            if mixtral:
                leaves = ("w1", "w3") if m.group(2) == "w13" else ("w2",)
            else:
                leaves = ("gate_proj", "up_proj") if m.group(2) == "w13" else ("down_proj",)
            return [
                f"{m.group(1)}.{block}.experts.{e}.{leaf}.weight"
                for e in range(num_experts)
                for leaf in leaves
            ]
        if self.expert_style == "mixtral" and param_name.endswith(".mlp.gate.weight"):
            return [param_name.replace(".mlp.gate.", ".block_sparse_moe.gate.")]
        return [param_name]


def load_named_weights(
    model: nn.Module,
    name_map: CheckpointNameMap,
    weights: Iterable[tuple[str, torch.Tensor]],
    num_experts: int = 0,
    coverage: dict[str, set] | None = None,
) -> set[str]:
    """Copy every checkpoint tensor into its parameter slice through the parameter's weight_loader.

    Returns our parameter names that were written completely (every shard) by this call, or, with
    ``coverage`` (the shards earlier calls of one update wrote, updated here), by all of them. Unknown
    checkpoint keys are collected and reported together after the others were loaded; a shape
    mismatch raises at once, naming the checkpoint key.
    """
    writer = WeightWriter(model, name_map, num_experts, coverage)
    for ckpt_name, tensor in weights:
        writer.write(ckpt_name, tensor)
    return writer.finish()


class WeightWriter:
    """``load_named_weights`` one tensor at a time: for a caller that hands tensors over as they come
    (e.g. the ``draft.`` tensors of an update whose stream mostly goes to another model)."""

    def __init__(self, model: nn.Module, name_map: CheckpointNameMap, num_experts: int = 0,
                 coverage: dict[str, set] | None = None) -> None:
        """``coverage``: parameter -> shards written before (by earlier calls of the same update); it
        is updated in place, so a parameter whose shards come in several calls counts once complete."""
        self._name_map = name_map
        self._params = dict(model.named_parameters())
        self._needed = {name: len(name_map.checkpoint_names(name, num_experts)) for name in self._params}
        self._covered: dict[str, set] = coverage if coverage is not None else {}
        self._unknown: list[str] = []
        self._tied_head: torch.Tensor | None = None

    @torch.no_grad()
    def write(self, ckpt_name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor into its parameter (an unknown name is reported by ``finish``)."""
        try:
            target = self._name_map.target(ckpt_name)
        except InvalidArgumentError:
            self._unknown.append(ckpt_name)
            return
        if target is None:
            if self._name_map.is_tied_head(ckpt_name):
                self._tied_head = tensor
            return
        param = self._params[target.param_name]
        loader = param.weight_loader  # type: ignore[attr-defined]
        try:
            if target.expert_id is not None:
                loader(param, tensor, target.shard_id, target.expert_id)
            elif target.shard_id is not None:
                loader(param, tensor, target.shard_id)
            else:
                loader(param, tensor)
        except InvalidArgumentError as err:
            if err.field == ckpt_name:
                raise
            # Name the key the caller sent once; the parameter only when it is another name.
            into = f" (loading into {err.field})" if err.field else ""
            raise InvalidArgumentError(err.reason + into, field=ckpt_name) from err
        self._covered.setdefault(target.param_name, set()).add(
            None
            if target.shard_id is None and target.expert_id is None
            else (target.shard_id, target.expert_id)
        )

    def finish(self) -> set[str]:
        """Raise for the unknown keys seen; else our parameter names written completely.

        A tied LM head seen without the embedding is written into the embedding (their one tensor),
        never dropped: a trainer may name the shared tensor either way. Beside the embedding it is
        skipped, as transformers does when it ties them."""
        head, self._tied_head = self._tied_head, None
        if head is not None and TIED_EMBEDDING not in self._covered:
            try:
                self.write(TIED_EMBEDDING, head)
            except InvalidArgumentError as err:  # name the key the caller sent
                raise InvalidArgumentError(err.reason, field=TIED_HEAD) from err
        if self._unknown:
            unknown = self._unknown
            shown = ", ".join(quoted(n) for n in unknown[:10]) + (
                f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
            raise InvalidArgumentError(f"unexpected checkpoint keys: {shown}", field="weights")
        needed = self._needed
        return {name for name, shards in self._covered.items() if None in shards or len(shards) >= needed[name]}
