"""Engine side of weight updates: registers the update control operations on an EngineCore.

Operations (arguments are plain values; see ``rollout.weights.updater`` and ``weight_sync``):

- ``init_weight_update_group``: master_address, master_port, rank_offset, world_size, group_name,
  backend ("nccl" | "gloo"), timeout_s. Joins the trainer's group; returns the group name.
- ``destroy_weight_update_group``: group_name. Returns the group name.
- ``update_weights_from_distributed``: group_name, names, dtypes, shapes, offsets, bucket_sizes
  (or flat_bucket), version. Receives the broadcast buckets; returns the new version.
- ``update_weights_from_tensor``: names, dtypes, shapes, offsets, bucket_sizes (or flat_bucket),
  sources (one per bucket: {"cuda_ipc": {...}} or {"shared_memory": {...}}), version.
- ``update_weights_from_disk``: model_path, version (None: the current version + 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rollout.engine_core import EngineCore


def attach_weight_updates(core: EngineCore) -> None:
    """Register the weight-update operations on ``core.controls``."""
    from rollout.weights.updater import WeightUpdater

    updater = WeightUpdater(core)
    core.controls.update({
        "init_weight_update_group": updater.init_group,
        "destroy_weight_update_group": updater.destroy_group,
        "update_weights_from_distributed": updater.from_distributed,
        "update_weights_from_tensor": updater.from_tensor,
        "update_weights_from_disk": updater.from_disk,
    })
