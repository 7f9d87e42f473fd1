"""Assembling stream chunks into final ``GenerateOutput`` objects."""

from __future__ import annotations

import numpy as np

from rollout.types import FinishReason, GenerateOutput, StreamChunk


class OutputAssembler:
    """Collects the chunks of one request's ``n`` samples into ``GenerateOutput``s, in index order."""

    def __init__(self, request_id: str, n: int, *, logprobs: bool, raw_logprobs: bool, top_logprobs: bool,
                 routed_experts: bool = False) -> None:
        self.outputs = [
            GenerateOutput(
                request_id=request_id, index=i, prompt_tokens=0, output_ids=[],
                finish_reason=FinishReason.ABORT,
                output_logprobs=[] if logprobs else None,
                output_raw_logprobs=[] if raw_logprobs else None,
                output_top_logprobs=[] if top_logprobs else None,
            )
            for i in range(n)
        ]
        # Each sample's routed-expert pieces, joined into one array when it finishes.
        self._routed: list[list[np.ndarray]] | None = [[] for _ in range(n)] if routed_experts else None
        self.left = n

    def add(self, chunk: StreamChunk) -> bool:
        """Add a chunk; returns True once every sample has finished."""
        out = self.outputs[chunk.index]
        out.output_ids.extend(chunk.token_ids)
        out.weight_versions.extend(chunk.weight_versions)
        if out.output_logprobs is not None and chunk.logprobs is not None:
            out.output_logprobs.extend(chunk.logprobs)
        if out.output_raw_logprobs is not None and chunk.raw_logprobs is not None:
            out.output_raw_logprobs.extend(chunk.raw_logprobs)
        if out.output_top_logprobs is not None and chunk.top_logprobs is not None:
            out.output_top_logprobs.extend(chunk.top_logprobs)
        if self._routed is not None:
            if chunk.routed_experts is not None:
                self._routed[chunk.index].append(chunk.routed_experts)
            if chunk.prompt_routed_experts is not None:
                out.prompt_routed_experts = chunk.prompt_routed_experts
        if chunk.finished:
            out.finish_reason = chunk.finish_reason or FinishReason.ABORT
            out.matched_stop = chunk.matched_stop
            out.prompt_tokens = chunk.prompt_tokens
            out.cached_tokens = chunk.cached_tokens
            if self._routed is not None and self._routed[chunk.index]:
                out.routed_experts = np.concatenate(self._routed[chunk.index])
                self._routed[chunk.index] = []
            self.left -= 1
        return self.left == 0
