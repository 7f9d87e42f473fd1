"""The one place where this backend is added to verl's two registries.

- ``RolloutReplicaRegistry`` (``verl.workers.rollout.replica``) has ``register(name, loader)``;
  verl's ``LLMServerManager`` looks the replica class up there by ``rollout.name``.
- ``_ROLLOUT_REGISTRY`` (``verl.workers.rollout.base``) maps ``(name, mode)`` to the dotted path
  of the worker-side adapter that ``get_rollout_class`` imports; it has no register function, so
  the entry is set here, once, and never overwrites another backend's.

``register()`` runs when ``integrations.verl`` is imported, which happens in every process that
imports verl once this project is installed (its ``verl.plugins`` entry point), or where
``VERL_USE_EXTERNAL_MODULES=integrations.verl`` is set.
"""

from __future__ import annotations

BACKEND_NAME = "rollout"  # actor_rollout_ref.rollout.name=rollout
ADAPTER_PATH = "integrations.verl.adapter.ServerAdapter"


def _load_replica() -> type:
    from integrations.verl.replica import RolloutServerReplica

    return RolloutServerReplica


def register() -> None:
    """Add this backend under ``BACKEND_NAME`` to both verl registries (idempotent)."""
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    key = (BACKEND_NAME, "async")
    existing = base._ROLLOUT_REGISTRY.get(key)
    if existing is not None and existing != ADAPTER_PATH:
        raise RuntimeError(f"verl already maps rollout {BACKEND_NAME!r} to {existing}")
    base._ROLLOUT_REGISTRY[key] = ADAPTER_PATH
    RolloutReplicaRegistry.register(BACKEND_NAME, _load_replica)
