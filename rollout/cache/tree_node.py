"""The radix tree's node and match types (see ``radix_tree``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


class TreeNode:
    """One run of tokens and their slots. Root and namespace nodes have an empty key."""

    __slots__ = ("children", "id", "key", "last_access", "lock_ref", "namespace", "parent", "value")

    def __init__(
        self,
        key: tuple[int, ...],
        value: torch.Tensor,
        parent: TreeNode | None,
        namespace: int | None,
        nid: int,
    ) -> None:
        self.children: dict[object, TreeNode] = {}  # first page of the child's key (or namespace) -> child
        self.parent = parent  # None for the root and for nodes that were evicted
        self.key = key
        self.value = value  # (len(key),) int64 slots
        self.lock_ref = 0
        self.last_access = 0
        self.namespace = namespace
        self.id = nid  # tie-break in the heap, so nodes themselves are never compared

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, ns={self.namespace}, len={len(self.key)}, lock={self.lock_ref})"


@dataclass(frozen=True, slots=True)
class MatchResult:
    """A cached prefix: its slots, the deepest node covering exactly it, and its length in tokens."""

    slots: torch.Tensor  # (length,) int64, page aligned
    node: TreeNode  # root or namespace node when nothing matched
    length: int


def as_key(tokens: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    """Token ids as the tuple keys of the tree."""
    if isinstance(tokens, torch.Tensor):
        return tuple(tokens.tolist())
    return tuple(tokens)
