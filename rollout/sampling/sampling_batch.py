"""The per-row sampling parameters of one decode step, gathered into tensors once per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rollout.errors import InvalidArgumentError
from rollout.types import SamplingParams

# Temperatures below this are sampled greedily: dividing logits by them risks float32 overflow and
# the distribution they describe is the argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-6

_MASK64 = (1 << 64) - 1


def _to_int64(value: int) -> int:
    """Wrap any Python int to a signed 64-bit value so that every seed fits an int64 tensor."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperatures: torch.Tensor  # (B,) float32; 0 = greedy row
    top_ks: torch.Tensor  # (B,) int64; <= 0 = off
    top_ps: torch.Tensor  # (B,) float32 in (0, 1]
    min_ps: torch.Tensor  # (B,) float32 in [0, 1]
    seeds: torch.Tensor  # (B,) int64, every row has a seed (the engine assigns one to requests without)
    steps: torch.Tensor  # (B,) int64, index of the output token being sampled (0 for the first)
    banned_token_ids: list[list[int]] | None  # per row ids masked to -inf (stop ids before min_new_tokens)
    all_greedy: bool
    need_filter: bool  # any sampling row uses top_k / top_p / min_p

    @property
    def batch_size(self) -> int:
        return int(self.temperatures.shape[0])

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        steps: Sequence[int],
        banned: Sequence[Sequence[int]] | None,
        device: torch.device | str,
    ) -> SamplingBatch:
        """Gather one row per entry of ``params``.

        ``seeds[i]`` and ``steps[i]`` fix row ``i``'s random draw; seeds of any size are wrapped to 64
        bits. ``banned[i]`` lists token ids row ``i`` must not produce (empty or ``None``: none).
        Temperatures below ``GREEDY_TEMPERATURE_EPS`` are stored as 0 (greedy).
        """
        n = len(params)
        if len(seeds) != n:
            raise InvalidArgumentError(f"expected {n} seeds, got {len(seeds)}", field="seeds")
        if len(steps) != n:
            raise InvalidArgumentError(f"expected {n} steps, got {len(steps)}", field="steps")
        banned_rows: list[list[int]] | None = None
        if banned is not None:
            if len(banned) != n:
                raise InvalidArgumentError(f"expected {n} rows, got {len(banned)}", field="banned_token_ids")
            banned_rows = [list(ids) for ids in banned]
            if any(t < 0 for ids in banned_rows for t in ids):
                raise InvalidArgumentError("token ids must be >= 0", field="banned_token_ids")
            if not any(banned_rows):
                banned_rows = None  # nothing to mask: let the sampler skip the scatter

        temps = [0.0 if p.temperature < GREEDY_TEMPERATURE_EPS else float(p.temperature) for p in params]
        greedy = [t == 0.0 for t in temps]
        need_filter = any(
            not g and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)
            for p, g in zip(params, greedy, strict=True)
        )
        return cls(
            temperatures=torch.tensor(temps, dtype=torch.float32, device=device),
            top_ks=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_ps=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            min_ps=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            seeds=torch.tensor([_to_int64(int(s)) for s in seeds], dtype=torch.int64, device=device),
            steps=torch.tensor([int(s) for s in steps], dtype=torch.int64, device=device),
            banned_token_ids=banned_rows,
            all_greedy=all(greedy),
            need_filter=need_filter,
        )
