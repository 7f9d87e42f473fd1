"""Trainer-to-engine weight updates: NCCL / gloo groups, CUDA IPC and shared memory, flat buckets.

    import weight_sync
    group = weight_sync.connect(engines, backend="nccl", master_address="10.0.0.1")
    group.push(model.named_parameters(), version=step)   # Hugging Face names
    group.close()

Colocated: ``weight_sync.push_tensors_ipc(engines, named_tensors, version)`` (CUDA IPC) or
``push_tensors_shm`` (shared memory, CPU). Imports are lazy, so ``import weight_sync`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["connect", "WeightSyncGroup", "WeightSyncTarget", "ColocatedTarget", "push_tensors_ipc", "push_tensors_shm",
           "buckets"]

if TYPE_CHECKING:
    from weight_sync import buckets
    from weight_sync.colocated import push_tensors_ipc, push_tensors_shm
    from weight_sync.sender import WeightSyncGroup, connect
    from weight_sync.targets import ColocatedTarget, WeightSyncTarget

_WHERE = {
    "connect": "weight_sync.sender",
    "WeightSyncGroup": "weight_sync.sender",
    "WeightSyncTarget": "weight_sync.targets",
    "ColocatedTarget": "weight_sync.targets",
    "push_tensors_ipc": "weight_sync.colocated",
    "push_tensors_shm": "weight_sync.colocated",
}


def __getattr__(name: str) -> Any:
    import importlib

    if name == "buckets":
        return importlib.import_module("weight_sync.buckets")
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(name)
