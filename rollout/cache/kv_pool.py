"""The KV pool: one K and one V tensor per layer, indexed by token slot; and how many slots it gets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
import torch.distributed as dist

from rollout.distributed.tp import SINGLE, TPGroup, kv_heads_per_rank

if TYPE_CHECKING:
    from rollout.config import EngineConfig

CPU_DEFAULT_KV_BYTES = 1 << 30  # the KV budget on CPU when none is configured
CPU_MAX_DEFAULT_SLOTS = 1 << 18

# (shape, dtype, count) -> ``count`` zero-filled tensors of that shape: where the K/V buffers live.
KVAllocator = Callable[[tuple[int, ...], torch.dtype, int], list[torch.Tensor]]


class KVPool:
    """K/V storage for ``num_slots`` token slots in every layer.

    Slot 0 is never handed out by the allocator: padded or dummy tokens (CUDA graph padding) write
    there harmlessly.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        allocate: KVAllocator | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.num_slots = num_slots
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_slots, num_kv_heads, head_dim)
        if allocate is None:
            buffers = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(2 * num_layers)]
        else:  # e.g. from a releasable memory region
            buffers = allocate(shape, dtype, 2 * num_layers)
        self.k_buffers = buffers[:num_layers]
        self.v_buffers = buffers[num_layers:]

    def set_kv(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` (T, num_kv_heads, head_dim) at ``slots`` (T,) of one layer."""
        self.k_buffers[layer_id][slots] = k.to(self.dtype)
        self.v_buffers[layer_id][slots] = v.to(self.dtype)

    @property
    def nbytes(self) -> int:
        per = self.num_slots * self.num_kv_heads * self.head_dim * self.k_buffers[0].element_size()
        return 2 * self.num_layers * per

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def kv_pool_slots(config: EngineConfig, dtype: torch.dtype, device: torch.device, num_kv_heads: int) -> int:
    """Token slots of the KV pool: ``max_total_tokens`` when configured, else what memory allows (on a
    GPU, ``kv_memory_fraction`` of the memory free once the weights are placed). Whole pages, plus
    page 0, the padding page that is never handed out. ``num_kv_heads``: the heads this rank stores."""
    cache = config.cache
    page = cache.page_size
    if cache.max_total_tokens is not None:
        tokens = cache.max_total_tokens
    else:
        m = config.model
        per_slot = KVPool.bytes_per_slot(m.num_hidden_layers, num_kv_heads, m.head_dim, dtype)
        if config.enable_return_routed_experts:  # each slot's routed-expert row (int16) lives beside its KV
            per_slot += len(m.moe_layer_ids) * m.num_experts_per_tok * 2
        if config.spec.method == "eagle":  # and its final hidden state (ModelRunner.feature_store)
            per_slot += m.hidden_size * dtype.itemsize
        if device.type == "cuda":
            torch.cuda.empty_cache()  # weights moved into their region: return the old blocks first
            free, _ = torch.cuda.mem_get_info(device)
            tokens = int(free * cache.kv_memory_fraction) // per_slot
        else:
            tokens = min(CPU_DEFAULT_KV_BYTES // per_slot, CPU_MAX_DEFAULT_SLOTS)
    pages = max(tokens // page, 1)
    return (pages + 1) * page


def create_kv_pool(config: EngineConfig, dtype: torch.dtype, device: torch.device,
                   allocate: KVAllocator | None = None, tp: TPGroup = SINGLE) -> KVPool:
    """The engine's KV pool, sized by ``kv_pool_slots`` (call after the weights are placed).

    With tensor-parallel ranks each rank stores its share of the KV heads, and every rank takes the
    smallest slot count any rank can afford: rank 0 hands out slots for all of them.
    """
    m = config.model
    heads = kv_heads_per_rank(m.num_key_value_heads, tp.size)
    slots = kv_pool_slots(config, dtype, device, heads)
    if tp.size > 1:
        agreed = torch.tensor([slots], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=tp.group)
        slots = int(agreed.item())
    return KVPool(m.num_hidden_layers, slots, heads, m.head_dim, dtype, device, allocate=allocate)
