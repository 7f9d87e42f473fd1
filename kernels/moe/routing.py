"""Router top-k in one Triton launch: softmax (fp32) over the expert logits, the top ``k``
probabilities, and optionally their renormalisation to sum 1.

``rollout.layers.moe.select_experts``'s torch code (softmax, ``torch.topk``, divide) is the reference
and the CPU path. Each program holds ``BLOCK_T`` tokens' logits in registers and picks the k experts
by k rounds of "largest remaining logit" (the same order as the largest probability, since the
softmax is monotonic), so the ids of a token come out in descending order of probability, like
``torch.topk``'s; equal logits go to the lower expert id first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 4096  # the logits of a token stay in registers
_ELEMENTS_PER_PROGRAM = 2048  # BLOCK_T * E_PAD: tokens per program scale down as experts grow


@triton.jit
def _topk_softmax_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_t,
                         TOP_K: tl.constexpr, K_PAD: tl.constexpr, E_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, RENORMALIZE: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    experts = tl.arange(0, E_PAD)
    mask_t = tokens < num_tokens
    mask_e = experts < num_experts
    logits = tl.load(logits_ptr + tokens[:, None].to(tl.int64) * stride_t + experts[None, :],
                     mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)  # (BLOCK_T, E_PAD)
    logits = tl.where(mask_e[None, :], logits, float("-inf"))  # padding experts: probability 0, never picked
    top = tl.max(logits, axis=1)
    denom = tl.sum(tl.exp(logits - top[:, None]), axis=1)
    slots = tl.arange(0, K_PAD)
    picked_w = tl.zeros([BLOCK_T, K_PAD], tl.float32)
    picked_id = tl.zeros([BLOCK_T, K_PAD], tl.int32)
    available = mask_e[None, :] & mask_t[:, None]  # (BLOCK_T, E_PAD): real experts not yet picked
    remaining = logits
    for j in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=1)  # (BLOCK_T,)
        idx = tl.min(tl.where(available & (remaining == best[:, None]), experts[None, :], E_PAD), axis=1)
        prob = tl.exp(best - top) / denom
        picked_w = tl.where(slots[None, :] == j, prob[:, None], picked_w)
        picked_id = tl.where(slots[None, :] == j, idx[:, None], picked_id)
        taken = experts[None, :] == idx[:, None]
        available = available & ~taken
        remaining = tl.where(taken, float("-inf"), remaining)
    if RENORMALIZE:
        picked_w = picked_w / tl.sum(picked_w, axis=1)[:, None]  # slots >= TOP_K hold 0
    out = tokens[:, None].to(tl.int64) * TOP_K + slots[None, :]
    mask = mask_t[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, picked_w, mask=mask)
    tl.store(ids_ptr + out, picked_id.to(tl.int64), mask=mask)


def topk_softmax(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights (T, k) float32, ids (T, k) int64)`` of the ``top_k`` most probable experts of each
    token, in descending order of probability; ``renormalize`` makes each row of weights sum to 1."""
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts or num_experts > MAX_EXPERTS:
        raise ValueError(f"top_k={top_k} of {num_experts} experts (at most {MAX_EXPERTS}) is not supported")
    if router_logits.stride(-1) != 1:
        router_logits = router_logits.contiguous()
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    e_pad = triton.next_power_of_2(num_experts)
    block_t = max(1, min(64, _ELEMENTS_PER_PROGRAM // e_pad))
    _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), E_PAD=e_pad, BLOCK_T=block_t,
        RENORMALIZE=renormalize, num_warps=4,
    )
    return weights, ids
