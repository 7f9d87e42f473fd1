"""Routed mixture-of-experts: top-k router and stacked expert weights.

Expert weights are stacked so one fused kernel can serve all experts::

    w13  (E, 2*I, H)   rows [0, I) = w1 (gate_proj), rows [I, 2I) = w3 (up_proj)
    w2   (E, H, I)     down_proj

``fused_experts`` is the one entry point for the expert computation; the torch loop below is its
reference and CPU path, and ``kernels.moe`` holds the Triton path used on CUDA.

Tensor parallelism splits every expert's intermediate dim ``I`` over the ranks: rank r holds rows
[r*I/n, (r+1)*I/n) of w1 and of w3 (so its w13 is its gate slice then its up slice) and the same
columns of w2. Each rank's combined output is a partial sum over its slice; one all-reduce after
the combine completes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from rollout.distributed.tp import SINGLE, TPGroup
from rollout.errors import InvalidArgumentError
from rollout.layers.expert_placement import ExpertPlacement
from rollout.layers.linear import ReplicatedLinear, copy_checked, load_slice, new_param

if TYPE_CHECKING:
    from rollout.batch import ForwardBatch


def select_experts_reference(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` in torch ops: the reference of the Triton router kernel and the CPU path."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # (T, E)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # (T, k)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return topk_weights, topk_ids


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (float32) over all experts, keep the top ``top_k``, optionally renormalise.

    Returns ``(topk_weights (T, k) float32, topk_ids (T, k) int64)``, each token's experts in
    descending order of probability. Renormalised softmax-then-top-k equals a softmax over the top-k
    logits (Mixtral's formulation). CUDA tensors take one Triton launch (``kernels.moe.routing``),
    everything else ``select_experts_reference``.
    """
    if router_logits.is_cuda:
        try:
            from kernels.moe.routing import topk_softmax
        except ImportError:  # no triton on this machine
            pass
        else:
            return topk_softmax(router_logits, top_k, renormalize)
    return select_experts_reference(router_logits, top_k, renormalize)


def fused_experts_reference(
    hidden: torch.Tensor,  # (T, H)
    w13: torch.Tensor,  # (E, 2I, H)
    w2: torch.Tensor,  # (E, H, I)
    topk_weights: torch.Tensor,  # (T, k)
    topk_ids: torch.Tensor,  # (T, k)
) -> torch.Tensor:  # (T, H)
    """Weighted sum over each token's experts, looping over the experts that received tokens (an id
    of -1, an expert held by another rank, contributes nothing)."""
    out = torch.zeros_like(hidden)
    inter = w2.shape[2]
    for e in torch.unique(topk_ids).tolist():
        if e < 0:
            continue
        token_idx, slot = torch.nonzero(topk_ids == e, as_tuple=True)  # (n,), (n,)
        x = hidden[token_idx]  # (n, H)
        gate_up = F.linear(x, w13[e])  # (n, 2I)
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # (n, I)
        y = F.linear(act, w2[e])  # (n, H)
        y = y * topk_weights[token_idx, slot, None].to(y.dtype)
        out.index_add_(0, token_idx, y)
    return out


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    skip_negative: bool = False,
) -> torch.Tensor:
    """Expert MLPs of every token, combined with its routing weights: (T, H) -> (T, H).

    CUDA tensors go to the Triton grouped-GEMM kernels when triton is installed; everything else
    takes the reference loop. ``skip_negative``: ids of -1 (experts on other ranks) may occur."""
    if hidden.is_cuda:
        try:
            from kernels.moe import fused_experts_triton
        except ImportError:  # no triton on this machine
            pass
        else:
            return fused_experts_triton(hidden, w13, w2, topk_weights, topk_ids, skip_negative=skip_negative)
    return fused_experts_reference(hidden, w13, w2, topk_weights, topk_ids)


class FusedMoE(nn.Module):
    """Stacked expert weights with expert-aware loaders.

    ``weight_loader(param, loaded, shard_id=None, expert_id=None)``: ``shard_id`` "w1" / "w3" fill the
    gate / up half of ``w13[expert_id]``, "w2" fills ``w2[expert_id]``; with both None the whole
    stacked tensor is copied (HF's fused ``experts.gate_up_proj`` / ``experts.down_proj`` layout).
    Every loaded tensor is the full (unsplit) one; the loader takes this rank's slice of it.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tp: TPGroup = SINGLE,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.num_experts = num_experts
        self.tp = tp
        self.expert_parallel = tp.expert_parallel and tp.size > 1
        self.full_intermediate_size = intermediate_size
        self.placement: ExpertPlacement | None = None
        if self.expert_parallel:  # whole experts, in this rank's slots (see expert_placement.py)
            self.placement = ExpertPlacement.contiguous(num_experts, tp.size, tp.spare_expert_slots)
            stacked = self.placement.slots_per_rank
            count, rank, slot = self.placement.routing_tables(device)
            # Updated in place by a rebalance, so CUDA graphs that read them stay valid.
            self.register_buffer("copy_count", count, persistent=False)
            self.register_buffer("copy_rank", rank, persistent=False)
            self.register_buffer("copy_slot", slot, persistent=False)
        else:
            if intermediate_size % tp.size:
                raise InvalidArgumentError(
                    f"{intermediate_size} not divisible by tp_size {tp.size}", field=f"{prefix}.intermediate_size"
                )
            intermediate_size //= tp.size
            stacked = num_experts
        self.intermediate_size = intermediate_size  # this rank's slice (all of it with expert parallelism)
        self.w13 = new_param((stacked, 2 * intermediate_size, hidden_size), dtype, device, self.weight_loader)
        self.w2 = new_param((stacked, hidden_size, intermediate_size), dtype, device, self.weight_loader)

    def local_slots(self, expert_id: int) -> list[int]:
        """This rank's slots holding ``expert_id`` (every expert's slot without expert parallelism)."""
        if self.placement is None:
            return [expert_id]
        return [s for s, e in enumerate(self.placement.slots[self.tp.rank]) if e == expert_id]

    def route_local(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """(T, k) expert ids -> this rank's slot serving each (token, k) pair, or -1 where another
        rank's copy serves it. Copy ``(token + k) % copies``: the same choice on every rank."""
        t, k = topk_ids.shape
        pick = (torch.arange(t, device=topk_ids.device)[:, None] + torch.arange(k, device=topk_ids.device))
        pick = pick % self.copy_count[topk_ids]  # (T, k)
        rank = self.copy_rank[topk_ids, pick]
        return torch.where(rank == self.tp.rank, self.copy_slot[topk_ids, pick], -1)

    def weight_loader(
        self,
        param: nn.Parameter,
        loaded: torch.Tensor,
        shard_id: str | None = None,
        expert_id: int | None = None,
    ) -> None:
        leaf = "w13" if param is self.w13 else "w2"
        name = f"{self.prefix}.{leaf}" if self.prefix else leaf
        if shard_id is None and expert_id is None:
            if self.placement is not None:
                self._load_stacked_experts(param, loaded, name)
            elif self.tp.size == 1:
                copy_checked(param.data, loaded, name)
            else:
                self._load_stacked(param, loaded, name)
            return
        if expert_id is None or not 0 <= expert_id < self.num_experts:
            raise InvalidArgumentError(
                f"expert id {expert_id} out of range [0, {self.num_experts})", field=name
            )
        name = f"{name}[{expert_id}, {shard_id}]"
        inter, full = self.intermediate_size, self.full_intermediate_size
        start = 0 if self.placement is not None else self.tp.rank * inter
        if not ((shard_id in ("w1", "w3") and param is self.w13) or (shard_id == "w2" and param is self.w2)):
            raise InvalidArgumentError(f"shard {shard_id!r} does not belong to {leaf}", field=name)
        slots = self.local_slots(expert_id)
        want = (param.shape[1], full) if shard_id == "w2" else (full, param.shape[2])
        if not slots and tuple(loaded.shape) != want:  # another rank's expert: only its shape is checked
            raise InvalidArgumentError(f"shape mismatch: expected {want}, got {tuple(loaded.shape)}", field=name)
        for slot in slots:
            if shard_id == "w1":
                load_slice(param.data[slot, :inter], loaded, 0, full, start, name)
            elif shard_id == "w3":
                load_slice(param.data[slot, inter:], loaded, 0, full, start, name)
            else:
                load_slice(param.data[slot], loaded, 1, full, start, name)

    def _load_stacked(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        """This rank's slice of a whole stacked tensor: w13 (E, 2I, H) or w2 (E, H, I)."""
        inter, full, start = self.intermediate_size, self.full_intermediate_size, self.tp.rank * self.intermediate_size
        if param is self.w2:
            load_slice(param.data, loaded, 2, full, start, name)
            return
        if loaded.dim() != 3 or loaded.shape[1] != 2 * full:  # raises, naming the full shape
            load_slice(param.data, loaded, 1, 2 * full, 0, name)
        load_slice(param.data[:, :inter], loaded[:, :full], 1, full, start, name)  # gate (w1)
        load_slice(param.data[:, inter:], loaded[:, full:], 1, full, start, name)  # up (w3)

    def _load_stacked_experts(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        """This rank's experts of a whole stacked tensor (E, ...): one copy per slot holding each."""
        want = (self.num_experts, *param.shape[1:])
        if tuple(loaded.shape) != want:
            raise InvalidArgumentError(f"shape {tuple(loaded.shape)} does not match {want}", field=name)
        for slot, e in enumerate(self.placement.slots[self.tp.rank]):
            if e >= 0:
                param.data[slot].copy_(loaded[e])

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        if self.placement is not None:  # this rank's experts only; the all-reduce adds the others'
            out = fused_experts(hidden, self.w13, self.w2, topk_weights, self.route_local(topk_ids),
                                skip_negative=True)
        else:
            out = fused_experts(hidden, self.w13, self.w2, topk_weights, topk_ids)  # (T, H)
        return out if self.tp.size == 1 else self.tp.all_reduce(out)  # sum of every rank's part


class SparseMoeBlock(nn.Module):
    """Router (``gate``) plus experts: the MLP of a sparse decoder layer.

    ``moe_index`` is this layer's place among the model's MoE layers: its column of the step's
    routed-expert buffer (``ForwardBatch.routed_experts``), which it fills when the batch has one.
    """

    # The decoder layer passes the batch to MLPs that say so (the routed-expert buffer travels in it).
    reads_batch = True

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        hidden_size: int,
        intermediate_size: int,
        renormalize: bool,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix: str = "",
        tp: TPGroup = SINGLE,
        moe_index: int = 0,
    ) -> None:
        super().__init__()
        self.moe_index = moe_index
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = ReplicatedLinear(
            hidden_size, num_experts, bias=False, dtype=dtype, device=device, prefix=f"{prefix}.gate"
        )
        self.experts = FusedMoE(
            num_experts,
            hidden_size,
            intermediate_size,
            dtype=dtype,
            device=device,
            prefix=f"{prefix}.experts",
            tp=tp,
        )

        # Tokens routed to each expert since the last rebalance (kept with expert parallelism, where
        # they decide the placement; a scatter on the device, captured in CUDA graphs with the rest).
        counts = torch.zeros(num_experts, dtype=torch.int64, device=device) if self.experts.placement else None
        self.register_buffer("expert_counts", counts, persistent=False)

    def forward(self, hidden: torch.Tensor, batch: ForwardBatch | None = None) -> torch.Tensor:
        router_logits = self.gate(hidden)  # (T, E)
        topk_weights, topk_ids = select_experts(router_logits, self.top_k, self.renormalize)
        if self.expert_counts is not None:
            flat = topk_ids.reshape(-1)
            ones = torch.ones_like(flat)
            if batch is not None:  # CUDA-graph padding rows (and verify fillers) write slot 0: not counted
                real = batch.out_cache_loc[: topk_ids.shape[0]] != 0  # (T,)
                ones = real[:, None].expand_as(topk_ids).reshape(-1).to(flat.dtype)
            self.expert_counts.scatter_add_(0, flat, ones)
        if batch is not None and batch.routed_experts is not None:
            # Row t of the static step buffer is token t of the step: a device copy, no allocation and
            # no host sync, so it is captured by CUDA graphs like any other kernel.
            batch.routed_experts[: topk_ids.shape[0], self.moe_index].copy_(topk_ids)  # (T, k) -> int16
        return self.experts(hidden, topk_weights, topk_ids)  # (T, H)
