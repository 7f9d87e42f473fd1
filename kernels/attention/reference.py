"""Torch references for the paged attention kernels: a loop over requests in float32.

Same arithmetic as ``rollout.attention.torch_ref`` but driven only by the index tensors the
kernels take, so kernels and references are called with identical arguments.
"""

from __future__ import annotations

import torch


def paged_attention_reference(
    q: torch.Tensor,  # (T, Hq, D)
    k_buf: torch.Tensor,  # (num_slots, Hkv, D)
    v_buf: torch.Tensor,  # (num_slots, Hkv, D)
    qo_indptr: torch.Tensor,  # (B+1,)
    kv_indptr: torch.Tensor,  # (B+1,)
    kv_indices: torch.Tensor,  # (sum kv lens,)
    scale: float,
) -> torch.Tensor:  # (T, Hq, D), dtype of q
    """Causal attention of each request's queries (the last ``q_len`` of its ``kv_len`` positions)."""
    group = q.shape[1] // k_buf.shape[1]
    out = torch.zeros_like(q)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    for b in range(len(qo) - 1):
        q_len, kv_len = qo[b + 1] - qo[b], kvp[b + 1] - kvp[b]
        if q_len == 0 or kv_len == 0:
            continue
        slots = kv_indices[kvp[b] : kvp[b + 1]]  # (S,)
        kk = k_buf[slots].float().repeat_interleave(group, dim=1)  # (S, Hq, D)
        vv = v_buf[slots].float().repeat_interleave(group, dim=1)  # (S, Hq, D)
        qq = q[qo[b] : qo[b + 1]].float()  # (E, Hq, D)
        scores = torch.einsum("ehd,shd->hes", qq, kk) * scale  # (Hq, E, S)
        q_pos = torch.arange(q_len, device=q.device)[:, None] + (kv_len - q_len)  # (E, 1)
        kv_pos = torch.arange(kv_len, device=q.device)[None, :]  # (1, S)
        scores = scores.masked_fill(kv_pos > q_pos, float("-inf"))
        out[qo[b] : qo[b + 1]] = torch.einsum("hes,shd->ehd", torch.softmax(scores, -1), vv).to(q.dtype)
    return out


def decode_attention_reference(
    q: torch.Tensor,  # (B, Hq, D)
    k_buf: torch.Tensor,  # (num_slots, Hkv, D)
    v_buf: torch.Tensor,  # (num_slots, Hkv, D)
    kv_indptr: torch.Tensor,  # (B+1,)
    kv_indices: torch.Tensor,  # (sum kv lens,)
    scale: float,
) -> torch.Tensor:  # (B, Hq, D)
    """One query per request, attending to the whole of its KV run."""
    qo_indptr = torch.arange(q.shape[0] + 1, device=q.device)
    return paged_attention_reference(q, k_buf, v_buf, qo_indptr, kv_indptr, kv_indices, scale)
