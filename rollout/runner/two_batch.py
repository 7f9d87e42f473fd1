"""Two-batch decode: a large decode batch as two halves on two streams, their attention taking turns.

At a large batch a decode layer is attention, which reads every request's KV and is bound by memory
bandwidth, then the matmuls, norms and activation, which at a few hundred rows are bound by latency
and leave most of the bandwidth unused. Cut in two halves, each on its own stream, with the halves'
attention kernels taking turns layer by layer (half A's layer i after half B's layer i - 1, half
B's layer i after half A's), each half's matmuls run while the other half's attention reads::

    stream A | attn A0 | o, mlp, qkv A ...| attn A1 | o, mlp, qkv A ...| attn A2
    stream B           | attn B0          | o, mlp, qkv B ...| attn B1 | ...

The decode graphs (``DecodeGraphRunner``) capture this for graph sizes of at least
``ROLLOUT_TWO_BATCH_MIN`` rows (0, the default: never), for dense models on one rank with a backend
whose ``prepare`` is captured (Triton). Each half has an attention backend of its own, since a
backend keeps its step's plan. Each half's rows are computed as in the whole batch: its tokens,
logits and KV are the same (decode rows do not mix).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import torch

from rollout.batch import ForwardBatch

if TYPE_CHECKING:
    from rollout.attention.base import AttentionBackend


def two_batch_min() -> int:
    """Graph sizes from which decode runs as two halves (``ROLLOUT_TWO_BATCH_MIN``); 0: never."""
    return max(0, int(os.environ.get("ROLLOUT_TWO_BATCH_MIN", "0") or 0))


class AttentionTurns:
    """Events that order two halves' attention per layer: A's layer i after B's layer i - 1, B's
    layer i after A's layer i. The halves' layers must be issued interleaved (A's layer i, then
    B's), so that every event is recorded before a stream waits on it."""

    def __init__(self, num_layers: int) -> None:
        self.done = ([torch.cuda.Event() for _ in range(num_layers)], [torch.cuda.Event() for _ in range(num_layers)])

    def half(self, second: bool) -> HalfTurn:
        return HalfTurn(self, second)


@dataclasses.dataclass(frozen=True)
class HalfTurn:
    """One half's side of ``AttentionTurns`` (``ForwardBatch.attn_turn``): the decoder layer calls
    ``wait`` before its attention and ``done`` after it, on the half's stream."""

    turns: AttentionTurns
    second: bool

    def wait(self, layer: int) -> None:
        a_done, b_done = self.turns.done
        if self.second:
            torch.cuda.current_stream().wait_event(a_done[layer])
        elif layer > 0:
            torch.cuda.current_stream().wait_event(b_done[layer - 1])

    def done(self, layer: int) -> None:
        self.turns.done[int(self.second)][layer].record()


def split_decode_batch(
    batch: ForwardBatch, second_backend: AttentionBackend, qo_indptr: torch.Tensor, logits_indices: torch.Tensor,
    turns: AttentionTurns | None = None,
) -> tuple[ForwardBatch, ForwardBatch]:
    """Rows ``[0, B // 2)`` with ``batch``'s backend and ``[B // 2, B)`` with ``second_backend``, as
    views of ``batch``'s tensors. ``qo_indptr`` and ``logits_indices`` are ``arange`` buffers of at
    least ``B + 1`` and ``B`` entries (a decode row is one token). Request-table batches only."""
    assert batch.is_decode and batch.req_rows is not None and batch.kv_indices is None, "a table-mode decode batch"
    b = batch.batch_size
    h = b // 2

    def half(lo: int, hi: int, backend: AttentionBackend, second: bool) -> ForwardBatch:
        n = hi - lo
        return dataclasses.replace(
            batch, input_ids=batch.input_ids[lo:hi], positions=batch.positions[lo:hi],
            out_cache_loc=batch.out_cache_loc[lo:hi], qo_indptr=qo_indptr[: n + 1], seq_lens=batch.seq_lens[lo:hi],
            logits_indices=logits_indices[:n], seq_lens_cpu=batch.seq_lens_cpu[lo:hi],
            extend_lens_cpu=batch.extend_lens_cpu[lo:hi], prefix_lens_cpu=batch.prefix_lens_cpu[lo:hi],
            attn_backend=backend, req_rows=batch.req_rows[lo:hi],
            attn_turn=turns.half(second) if turns is not None else None)

    return half(0, h, batch.attn_backend, False), half(h, b, second_backend, True)


def forward_halves(model: torch.nn.Module, a: ForwardBatch, b: ForwardBatch,
                   side: torch.cuda.Stream | None) -> torch.Tensor:
    """Final-normed hidden states (B, hidden) of the two halves, ``a``'s rows first: ``prepare``
    and the model's layers for each, ``b``'s on ``side`` (forked from the current stream and joined
    back), issued layer by layer. Without ``side`` (a CPU) the halves run one after the other."""
    inner = model.model  # LlamaModel: begin / layers / finish
    if side is None:
        outs = []
        for half in (a, b):
            half.attn_backend.prepare(half)
            outs.append(model(half))
        return torch.cat(outs)
    main = torch.cuda.current_stream(side.device)
    side.wait_stream(main)
    a.attn_backend.prepare(a)
    hidden_a, rope_a = inner.begin(a)
    with torch.cuda.stream(side):
        b.attn_backend.prepare(b)
        hidden_b, rope_b = inner.begin(b)
    res_a = res_b = None
    for layer in inner.layers:
        hidden_a, res_a = layer(rope_a, hidden_a, res_a, a)
        with torch.cuda.stream(side):
            hidden_b, res_b = layer(rope_b, hidden_b, res_b, b)
    out_a = inner.finish(hidden_a, res_a)
    with torch.cuda.stream(side):
        out_b = inner.finish(hidden_b, res_b)
    main.wait_stream(side)
    return torch.cat([out_a, out_b])
