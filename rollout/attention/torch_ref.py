"""Reference attention backend in plain torch: a loop over requests, float32 math.

Slow but obviously correct; it is the CPU backend and the oracle the fast backends are tested
against. Query ``j`` of request ``i`` sits at kv position ``prefix_lens[i] + j``::

    kv positions   0 .. prefix-1 | prefix .. prefix+extend-1
    query j sees   all of them up to and including prefix + j

``deterministic``: each query is computed on its own, over exactly the ``prefix + j + 1`` keys it
sees, so its ops have the same shapes (hence the same reduction order) whether it came in a long
prompt, a small chunk after a cached prefix, or a decode step; the batched einsum's kernels follow
the request's extend and KV lengths instead.
"""

from __future__ import annotations

import torch

from rollout.attention.base import AttentionBackend
from rollout.batch import ForwardBatch
from rollout.cache.kv_pool import KVPool


class TorchReferenceBackend(AttentionBackend):
    """Gathers each request's K/V from the pool by ``kv_indices`` and runs masked softmax attention."""

    def __init__(self, kv_pool: KVPool, deterministic: bool = False) -> None:
        super().__init__(kv_pool)
        self.deterministic = deterministic

    def prepare(self, batch: ForwardBatch) -> None:
        """Nothing to precompute: offsets come from the batch's CPU lists at each layer."""

    def forward(
        self,
        q: torch.Tensor,  # (T, Hq, D)
        k: torch.Tensor,  # (T, Hkv, D)
        v: torch.Tensor,  # (T, Hkv, D)
        layer_id: int,
        scale: float,
        batch: ForwardBatch,
        kv_stored: bool = False,
    ) -> torch.Tensor:  # (T, Hq, D)
        if not kv_stored:
            self.kv_pool.set_kv(layer_id, batch.out_cache_loc, k, v)
        k_buf = self.kv_pool.k_buffers[layer_id]  # (slots, Hkv, D)
        v_buf = self.kv_pool.v_buffers[layer_id]
        num_heads, num_kv_heads = q.shape[1], k_buf.shape[1]
        group = num_heads // num_kv_heads
        out = torch.zeros_like(q)
        q_start = kv_start = 0
        for extend, seq_len, prefix in zip(
            batch.extend_lens_cpu, batch.seq_lens_cpu, batch.prefix_lens_cpu, strict=True
        ):
            assert prefix + extend == seq_len, "seq_len must be prefix + extend"
            if extend > 0:
                slots = batch.kv_indices[kv_start : kv_start + seq_len]  # (S,)
                kk = k_buf[slots].float().repeat_interleave(group, dim=1)  # (S, Hq, D)
                vv = v_buf[slots].float().repeat_interleave(group, dim=1)  # (S, Hq, D)
                qq = q[q_start : q_start + extend].float()  # (E, Hq, D)
                attend = _each_query if self.deterministic else _all_queries
                out[q_start : q_start + extend] = attend(qq, kk, vv, prefix, scale).to(q.dtype)
            q_start += extend
            kv_start += seq_len
        return out


def _all_queries(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """Attention of queries ``qq`` (E, Hq, D) at kv positions ``prefix..`` over ``kk``/``vv`` (S, Hq, D),
    all at once with a causal mask; float32 (E, Hq, D)."""
    extend, seq_len = qq.shape[0], kk.shape[0]
    scores = torch.einsum("ehd,shd->hes", qq, kk) * scale  # (Hq, E, S)
    q_pos = torch.arange(extend, device=qq.device)[:, None] + prefix  # (E, 1)
    kv_pos = torch.arange(seq_len, device=qq.device)[None, :]  # (1, S)
    scores = scores.masked_fill(kv_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # (Hq, E, S)
    return torch.einsum("hes,shd->ehd", probs, vv)


def _each_query(qq: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, prefix: int, scale: float) -> torch.Tensor:
    """Attention of queries ``qq`` (E, Hq, D) at kv positions ``prefix..`` over ``kk``/``vv`` (S, Hq, D),
    one query at a time over exactly the keys it sees; float32 (E, Hq, D)."""
    out = torch.empty_like(qq)
    for j in range(qq.shape[0]):
        n = prefix + j + 1
        scores = (kk[:n] * qq[j]).sum(-1) * scale  # (n, Hq)
        probs = torch.softmax(scores, dim=0)  # (n, Hq)
        out[j] = (probs.unsqueeze(-1) * vv[:n]).sum(0)  # (Hq, D)
    return out
