"""Attention backend name -> factory. GPU libraries are imported only inside their factory."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from rollout.attention.base import AttentionBackend
from rollout.cache.kv_pool import KVPool
from rollout.errors import InvalidArgumentError, quoted


def _torch_backend(kv_pool: KVPool) -> AttentionBackend:
    from rollout.attention.torch_ref import TorchReferenceBackend

    return TorchReferenceBackend(kv_pool)


def _triton_backend(kv_pool: KVPool) -> AttentionBackend:
    from rollout.attention.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(kv_pool)


def _flashinfer_backend(kv_pool: KVPool) -> AttentionBackend:
    try:
        import flashinfer  # noqa: F401
    except ImportError as exc:
        raise InvalidArgumentError(
            f"flashinfer is not installed (pip install flashinfer-python): {exc}", field="attention_backend"
        ) from exc
    from rollout.attention.flashinfer_backend import FlashInferBackend

    return FlashInferBackend(kv_pool)


BACKEND_FACTORIES: dict[str, Callable[[KVPool], AttentionBackend]] = {
    "torch": _torch_backend,
    "triton": _triton_backend,
    "flashinfer": _flashinfer_backend,
}


def create_attention_backend(name: str, kv_pool: KVPool) -> AttentionBackend:
    """The attention backend registered as ``name``, over ``kv_pool``."""
    factory = BACKEND_FACTORIES.get(name)
    if factory is None:
        raise InvalidArgumentError(
            f"unknown backend {quoted(name)}; known: {sorted(BACKEND_FACTORIES)}", field="attention_backend"
        )
    return factory(kv_pool)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken GPU install fails in many ways; it just means "not usable here"
        return False
    return True


def default_attention_backend(device: torch.device | str) -> str:
    """The fastest backend usable on ``device``: flashinfer, else triton on CUDA; torch elsewhere."""
    if torch.device(device).type != "cuda":
        return "torch"
    if _importable("flashinfer"):
        return "flashinfer"
    return "triton" if _importable("triton") else "torch"
