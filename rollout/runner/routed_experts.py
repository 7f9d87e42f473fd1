"""Routed-expert capture: the top-k expert ids every MoE layer picked for every token, kept with the KV.

Two int16 device buffers (``L`` MoE layers, ``k`` experts per token)::

    step   (max step tokens, L, k)   row t: token t of the current step; the MoE layers write it
    store  (KV slots, L, k)          row s: the token whose K and V are in slot s

The MoE layers write their column of ``step`` in place during the forward (a static buffer, so a
CUDA graph captures the write like any kernel). After the forward one scatter copies the step's rows
to the slots its tokens' K and V went to: the routing follows the KV. A prompt prefix served from
the prefix cache therefore brings the routing recorded when its KV was computed (under the same
weights: cached prefixes never outlive a weight update), and a slot's row is rewritten whenever its
KV is. CUDA-graph padding tokens write slot 0, which the allocator never hands out.

The scatter runs on every step (it is what keeps cached prefixes' routing valid); nothing is read
back unless a request of the step asked (``gather``): then the wanted (request row, position) pairs
are looked up in the request table and their rows copied to the host without waiting for the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from rollout.batch import BatchPlan

# (shape, dtype, count) -> ``count`` zero-filled tensors (the KV pool's allocator: the store lives in
# the kv_cache memory region with the K and V it describes).
Allocate = Callable[[Sequence[int], torch.dtype, int], list[torch.Tensor]]


class RoutedExpertsRecorder:
    """The step buffer the MoE layers write and the per-slot store the runner reads from."""

    def __init__(self, num_slots: int, max_step_tokens: int, num_moe_layers: int, top_k: int,
                 device: torch.device, allocate: Allocate | None = None) -> None:
        def zeros(rows: int) -> torch.Tensor:
            shape = (rows, num_moe_layers, top_k)
            if allocate is None:
                return torch.zeros(shape, dtype=torch.int16, device=device)
            return allocate(shape, torch.int16, 1)[0]

        self.device = device
        self.step = zeros(max_step_tokens)  # (max step tokens, L, k)
        self.store = zeros(num_slots)  # (num_slots, L, k)

    @property
    def nbytes(self) -> int:
        return (self.step.numel() + self.store.numel()) * self.step.element_size()

    def record(self, out_cache_loc: torch.Tensor) -> None:
        """Copy the step's rows to their tokens' KV slots (``out_cache_loc`` (T,): token t's slot)."""
        n = out_cache_loc.shape[0]
        self.store.index_copy_(0, out_cache_loc, self.step[:n])

    def gather(self, plan: BatchPlan, req_table: torch.Tensor) -> torch.Tensor | None:
        """The rows ``plan.routed_rows()`` lists, on their way to the host (a non-blocking copy; the
        caller waits for the step before reading). None when no entry of the plan asked."""
        wanted = plan.routed_rows()
        if not wanted:
            return None
        rows = np.concatenate([np.full(n, plan.rows[i], dtype=np.int64) for i, _, n in wanted])
        positions = np.concatenate([np.arange(lo, lo + n, dtype=np.int64) for _, lo, n in wanted])
        host = torch.from_numpy(np.stack([rows, positions]))  # (2, R)
        if self.device.type == "cuda":
            host = host.pin_memory()  # a pageable copy would wait for the device
        idx = host.to(self.device, non_blocking=True)
        slots = req_table[idx[0], idx[1]]  # (R,)
        return self.store[slots].to("cpu", non_blocking=True)  # (R, L, k)
