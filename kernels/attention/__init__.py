"""Triton paged attention over the ``KVPool`` layout, with flashinfer-style index metadata."""

from kernels.attention.decode import NewTokenRope, decode_attention, decode_attention_qkv
from kernels.attention.decode_plan import (
    DecodePieces,
    balanced_splits,
    choose_max_splits,
    cut_pieces,
    decode_grid,
    decode_workspace,
    piece_buffers,
    plan_kv_splits,
    runs_from_indptr,
    uniform_pieces,
)
from kernels.attention.extend import extend_attention
from kernels.attention.reference import decode_attention_reference, paged_attention_reference

__all__ = [
    "DecodePieces",
    "NewTokenRope",
    "balanced_splits",
    "choose_max_splits",
    "cut_pieces",
    "decode_attention",
    "decode_attention_qkv",
    "decode_attention_reference",
    "decode_grid",
    "decode_workspace",
    "extend_attention",
    "paged_attention_reference",
    "piece_buffers",
    "plan_kv_splits",
    "runs_from_indptr",
    "uniform_pieces",
]
