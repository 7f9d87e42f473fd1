"""The per-row sampling parameters of one decode step, gathered into tensors once per step."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rollout.errors import InvalidArgumentError
from rollout.sampling.noise import uniform_draws
from rollout.types import SamplingParams

# Temperatures below this are sampled greedily: dividing logits by them risks float32 overflow and
# the distribution they describe is the argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-6


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling parameters of one step, as tensors on the logits' device."""

    temperatures: torch.Tensor  # (B,) float32; 0 = greedy row
    top_ks: torch.Tensor  # (B,) int64; <= 0 = off
    top_ps: torch.Tensor  # (B,) float32 in (0, 1]
    min_ps: torch.Tensor  # (B,) float32 in [0, 1]
    uniforms: torch.Tensor  # (B,) float64 in [0, 1): the row's draw, a function of (seed, step) only
    banned_token_ids: list[list[int]] | None  # per row ids masked to -inf (stop ids before min_new_tokens)
    all_greedy: bool
    need_filter: bool  # any sampling row uses top_k / top_p / min_p
    filtered: torch.Tensor  # (B,) bool: this row samples with top_k / top_p / min_p
    filtered_rows: list[bool]  # the same on the host
    greedy_rows: list[bool]  # temperature 0, on the host
    top_p_only: bool = False  # some row filters, and every filtering row uses top_p alone

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
        bits (they only feed the row's uniform draw).
        ``banned[i]`` lists token ids row ``i`` must not produce (empty or ``None``: none).
        Temperatures below ``GREEDY_TEMPERATURE_EPS`` are stored as 0 (greedy).
        """
        n = len(params)
        if len(seeds) != n:
            raise InvalidArgumentError(f"expected {n} seeds, got {len(seeds)}", field="seeds")
        if len(steps) != n:
            raise InvalidArgumentError(f"expected {n} steps, got {len(steps)}", field="steps")
        banned_rows = banned_lists(banned, n)
        temps = [0.0 if p.temperature < GREEDY_TEMPERATURE_EPS else float(p.temperature) for p in params]
        greedy = [t == 0.0 for t in temps]
        filtered = [not g and (p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0)
                    for p, g in zip(params, greedy, strict=True)]
        # One float64 host tensor (top-k values are exact in it) and one copy to the device, from
        # pinned memory on CUDA so that it does not wait for the device's queue.
        host = torch.tensor(
            [temps, [p.top_k for p in params], [p.top_p for p in params], [p.min_p for p in params],
             uniform_draws(seeds, steps), filtered], dtype=torch.float64,
        ).reshape(6, n)
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        rows = host.to(device, non_blocking=True)
        return cls(
            temperatures=rows[0].to(torch.float32),
            top_ks=rows[1].to(torch.int64),
            top_ps=rows[2].to(torch.float32),
            min_ps=rows[3].to(torch.float32),
            uniforms=rows[4],
            banned_token_ids=banned_rows,
            all_greedy=all(greedy),
            need_filter=any(filtered),
            filtered=rows[5] > 0,
            filtered_rows=filtered,
            greedy_rows=greedy,
            top_p_only=any(filtered) and all(p.top_k <= 0 and p.min_p <= 0.0 for p, f in zip(params, filtered) if f),
        )

    def with_draws(self, uniforms: torch.Tensor, banned: Sequence[Sequence[int] | None] | None) -> SamplingBatch:
        """The same rows with other draws and bans: ``uniforms`` (B,) float64 on the batch's device,
        ``banned`` as ``build`` takes it (``None`` entries: none)."""
        n = self.batch_size
        assert uniforms.shape == (n,) and uniforms.dtype == torch.float64, "uniforms must be (B,) float64"
        return SamplingBatch(
            self.temperatures, self.top_ks, self.top_ps, self.min_ps, uniforms,
            banned_lists([ids or () for ids in banned], n) if banned is not None and any(banned) else None,
            self.all_greedy, self.need_filter, self.filtered, self.filtered_rows, self.greedy_rows, self.top_p_only,
        )

    def select(self, rows: list[int]) -> SamplingBatch:
        """The batch of these rows only, in this order."""
        index = torch.tensor(rows, dtype=torch.int64).to(self.temperatures.device, non_blocking=True)
        banned = None if self.banned_token_ids is None else [self.banned_token_ids[i] for i in rows]
        filtered = [self.filtered_rows[i] for i in rows]
        greedy = [self.greedy_rows[i] for i in rows]
        return SamplingBatch(
            self.temperatures[index], self.top_ks[index], self.top_ps[index], self.min_ps[index],
            self.uniforms[index], banned if banned and any(banned) else None, all(greedy), any(filtered),
            self.filtered[index], filtered, greedy, self.top_p_only and any(filtered),
        )


def banned_lists(banned: Sequence[Sequence[int]] | None, n: int) -> list[list[int]] | None:
    """``n`` rows of banned ids as lists, or None when no row bans anything (the sampler then skips
    the scatter). Raises ``InvalidArgumentError`` on a wrong row count or a negative id."""
    if banned is None:
        return None
    if len(banned) != n:
        raise InvalidArgumentError(f"expected {n} rows, got {len(banned)}", field="banned_token_ids")
    rows = [list(ids) for ids in banned]
    if any(t < 0 for ids in rows for t in ids):
        raise InvalidArgumentError("token ids must be >= 0", field="banned_token_ids")
    return rows if any(rows) else None
