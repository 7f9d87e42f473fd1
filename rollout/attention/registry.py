"""Attention backend name -> factory. GPU libraries are imported only inside their factory."""

from __future__ import annotations

from collections.abc import Callable

from rollout.attention.base import AttentionBackend
from rollout.cache.kv_pool import KVPool
from rollout.errors import InvalidArgumentError


def _torch_backend(kv_pool: KVPool) -> AttentionBackend:
    from rollout.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend(kv_pool)


BACKEND_FACTORIES: dict[str, Callable[[KVPool], AttentionBackend]] = {
    "torch": _torch_backend,
}


def create_attention_backend(name: str, kv_pool: KVPool) -> AttentionBackend:
    """The attention backend registered as ``name``, over ``kv_pool``."""
    factory = BACKEND_FACTORIES.get(name)
    if factory is None:
        raise InvalidArgumentError(
            f"unknown backend {name!r}; known: {sorted(BACKEND_FACTORIES)}", field="attention_backend"
        )
    return factory(kv_pool)
