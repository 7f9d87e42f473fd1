"""Reference attention backend in plain torch: a loop over requests, float32 math.

Slow but obviously correct; it is the CPU backend and the oracle the fast backends are tested
against. Query ``j`` of request ``i`` sits at kv position ``prefix_lens[i] + j``::

    kv positions   0 .. prefix-1 | prefix .. prefix+extend-1
    query j sees   all of them up to and including prefix + j
"""

from __future__ import annotations

import torch

from rollout.attention.base import AttentionBackend
from rollout.batch import ForwardBatch


class TorchReferenceBackend(AttentionBackend):
    """Gathers each request's K/V from the pool by ``kv_indices`` and runs masked softmax attention."""

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
                scores = torch.einsum("ehd,shd->hes", qq, kk) * scale  # (Hq, E, S)
                q_pos = torch.arange(extend, device=q.device)[:, None] + prefix  # (E, 1)
                kv_pos = torch.arange(seq_len, device=q.device)[None, :]  # (1, S)
                scores = scores.masked_fill(kv_pos > q_pos, float("-inf"))
                probs = torch.softmax(scores, dim=-1)  # (Hq, E, S)
                out[q_start : q_start + extend] = torch.einsum("hes,shd->ehd", probs, vv).to(q.dtype)
            q_start += extend
            kv_start += seq_len
        return out
